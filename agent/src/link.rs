//! The agent's connections to the receiver: one control connection and N data
//! streams over TLS 1.3, with an in-flight byte window.
//!
//! ```text
//! scan workers -(async_channel, bounded)-> data stream tasks -> TLS
//!     ^ window permits (Semaphore) released when the receiver acks RECEIVED
//! control: cycle driver -> EndPoint / GetHashes; reader task -> Durable, Hashes
//! ```

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pilotlight_protocol::codec::{CodecError, FrameCodec};
use pilotlight_protocol::frame::{CommitMode, VolumeDecl};
use pilotlight_protocol::limits::{
    BLOCK_HEADER_LEN, FEATURE_CHECKPOINT, FEATURE_PARTIAL, FEATURE_PING, FEATURE_ZEROS, VERSION,
    ZERO_RUN_LEN,
};
use pilotlight_protocol::{BlockHash, DecodeError, Frame};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use crate::AgentError;
use pilotlight_protocol::tls::RECEIVER_NAME;

mod acks;

use acks::{Acks, Learned};

/// Bytes of block frames that may be sent but not yet acknowledged.
pub const MAX_IN_FLIGHT_BYTES: usize = 64 << 20;
/// Depth of the queue from scan workers to the data streams.
pub const SEND_QUEUE: usize = 32;
/// Depth of the queue of control frames from the receiver.
const CONTROL_QUEUE: usize = 64;
/// Time allowed to connect and finish the handshakes.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// A TCP stream that counts the bytes written to the wire (TLS included)
/// and, given a `read` counter, those read from it.
pub struct Counted {
    inner: TcpStream,
    written: Arc<AtomicU64>,
    read: Option<Arc<AtomicU64>>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Some(read) = &self.read {
            let n = buf.filled().len().saturating_sub(before);
            read.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

type Stream = TlsStream<Counted>;
/// The read half of a connection to the receiver.
pub(crate) type Reader = FramedRead<ReadHalf<Stream>, FrameCodec>;
/// The write half of a connection to the receiver.
pub(crate) type Writer = FramedWrite<WriteHalf<Stream>, FrameCodec>;

/// A data-stream frame (a `Block` or a `ZeroRun`) on its way, holding its
/// share of the in-flight window.
pub struct Outgoing {
    /// The frame.
    pub frame: Frame,
    /// Released when the receiver acknowledges it.
    pub permit: OwnedSemaphorePermit,
}

impl Outgoing {
    /// Bytes the frame takes on the wire (header and CRC included), for the
    /// rate cap.
    fn wire_len(&self) -> usize {
        let body = match &self.frame {
            Frame::Block(b) => b.payload.len() + BLOCK_HEADER_LEN,
            Frame::ZeroRun(_) => ZERO_RUN_LEN,
            Frame::PartialBlock(p) => p.body_len(),
            _ => 0,
        };
        body + 20
    }
}

/// How to connect.
pub struct LinkConfig {
    /// `host:port` of the receiver.
    pub receiver: String,
    /// TLS client configuration from the identity.
    pub tls: Arc<rustls::ClientConfig>,
    /// Data streams.
    pub streams: u16,
    /// Commit mode.
    pub commit: CommitMode,
    /// Volumes to declare.
    pub volumes: Vec<VolumeDecl>,
    /// Counter of bytes written to the network.
    pub wire_bytes: Arc<AtomicU64>,
    /// Send-rate cap shared by the data streams.
    pub throttle: Option<Arc<crate::throttle::Throttle>>,
    /// How often to send `Ping` on the control connection (to a receiver
    /// that takes it), so that a receiver may close silent ones.
    pub ping_interval: Duration,
}

/// An open session with the receiver.
pub struct Link {
    /// Shared with the pinger task.
    ctrl_wr: Arc<tokio::sync::Mutex<Writer>>,
    ctrl_rx: mpsc::Receiver<Result<Frame, AgentError>>,
    /// Where scan workers put blocks.
    pub data_tx: async_channel::Sender<Outgoing>,
    /// The in-flight window.
    pub window: Arc<Semaphore>,
    tasks: JoinSet<()>,
    reader: JoinSet<()>,
    cancel: CancellationToken,
    first_error: Arc<Mutex<Option<AgentError>>>,
    /// Session id.
    pub session: u64,
    /// Receiver store id.
    pub store_id: [u8; 16],
    /// The receiver's last durable point of this server (0 = none).
    pub last_point: u64,
    /// Whether the receiver keeps checkpoints of full syncs
    /// ([`FEATURE_CHECKPOINT`]).
    pub checkpoints: bool,
    /// The receiver takes `ZeroRun` frames (its `Hello` advertised
    /// `FEATURE_ZEROS`).
    pub zero_runs: bool,
    /// The receiver merges `PartialBlock` frames (its `Hello` advertised
    /// `FEATURE_PARTIAL`).
    pub partial: bool,
    /// The new hashes of partial blocks (`PartialApplied`), by point tag,
    /// volume and block, until their point's `DURABLE` takes them.
    learned: Learned,
}

/// A codec error as the agent's error: I/O is the network's, the rest the
/// peer's bytes.
pub(crate) fn codec_err(e: CodecError) -> AgentError {
    match e {
        CodecError::Io(e) => AgentError::Net(e),
        CodecError::Decode(d) => AgentError::Decode(d),
    }
}

async fn read_frame(rd: &mut Reader) -> Result<Frame, AgentError> {
    match rd.next().await {
        None => Err(AgentError::Net(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "receiver closed the connection",
        ))),
        Some(Err(e)) => Err(codec_err(e)),
        Some(Ok((_, Frame::Error { code, message }))) => Err(AgentError::Remote { code, message }),
        Some(Ok((_, f))) => Ok(f),
    }
}

/// TCP to `receiver` (keepalive, no delay), then TLS with the agent's
/// identity, counting the bytes `written` (and `read`, if given) on the
/// socket; the framed halves, before any `Hello`.
pub(crate) async fn connect_tls(
    receiver: &str,
    tls: Arc<rustls::ClientConfig>,
    written: Arc<AtomicU64>,
    read: Option<Arc<AtomicU64>>,
) -> Result<(Reader, Writer), AgentError> {
    let tcp = TcpStream::connect(receiver)
        .await
        .map_err(AgentError::Net)?;
    if let Err(e) = pilotlight_protocol::net::tune(socket2::SockRef::from(&tcp)) {
        tracing::debug!(cause = %e, "cannot set TCP keepalive or nodelay");
    }
    let name = ServerName::try_from(RECEIVER_NAME)
        .map_err(|e| AgentError::Config(format!("server name: {e}")))?;
    let counted = Counted {
        inner: tcp,
        written,
        read,
    };
    let stream = TlsConnector::from(tls)
        .connect(name, counted)
        .await
        .map_err(AgentError::Net)?;
    let (r, w) = tokio::io::split(stream);
    Ok((
        FramedRead::new(r, FrameCodec::default()),
        FramedWrite::new(w, FrameCodec::default()),
    ))
}

/// Open one TLS connection and exchange `Hello`; returns its halves and
/// the features the receiver's `Hello` advertised.
async fn open_stream(cfg: &LinkConfig) -> Result<(Reader, Writer, u32), AgentError> {
    let (mut rd, mut wr) =
        connect_tls(&cfg.receiver, cfg.tls.clone(), cfg.wire_bytes.clone(), None).await?;
    wr.send(&Frame::hello()).await.map_err(codec_err)?;
    match read_frame(&mut rd).await? {
        Frame::Hello { version, features } if version == VERSION => Ok((rd, wr, features)),
        Frame::Hello { version, .. } => Err(DecodeError::BadVersion {
            got: version,
            supported: VERSION,
        }
        .into()),
        other => Err(AgentError::Protocol(format!(
            "expected Hello, got {:?}",
            other.kind()
        ))),
    }
}

impl Link {
    /// Connect the control connection and all data streams.
    pub async fn connect(cfg: &LinkConfig) -> Result<Self, AgentError> {
        tokio::time::timeout(CONNECT_TIMEOUT, Self::connect_inner(cfg))
            .await
            .map_err(|_| {
                AgentError::Net(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connecting to the receiver timed out",
                ))
            })?
    }

    async fn connect_inner(cfg: &LinkConfig) -> Result<Self, AgentError> {
        let (mut crd, mut cwr, features) = open_stream(cfg).await?;
        let pings = features & FEATURE_PING != 0;
        let open = Frame::Open {
            streams: cfg.streams,
            commit: cfg.commit,
            volumes: cfg.volumes.clone(),
        };
        cwr.send(&open).await.map_err(codec_err)?;
        let (session, store_id, last_point) = match read_frame(&mut crd).await? {
            Frame::Welcome {
                session,
                store_id,
                last_point,
            } => (session, store_id, last_point),
            other => {
                return Err(AgentError::Protocol(format!(
                    "expected Welcome, got {:?}",
                    other.kind()
                )))
            }
        };
        let cancel = CancellationToken::new();
        let first_error = Arc::new(Mutex::new(None));
        let window = Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES));
        let (data_tx, data_rx) = async_channel::bounded::<Outgoing>(SEND_QUEUE);
        let learned = Learned::default();
        let mut tasks = JoinSet::new();
        for _ in 0..cfg.streams {
            let (mut rd, mut wr, _) = open_stream(cfg).await?;
            wr.send(&Frame::Join { session }).await.map_err(codec_err)?;
            match read_frame(&mut rd).await? {
                Frame::Joined => {}
                other => {
                    return Err(AgentError::Protocol(format!(
                        "expected Joined, got {:?}",
                        other.kind()
                    )))
                }
            }
            let fail = Failer {
                cancel: cancel.clone(),
                first_error: first_error.clone(),
                chan: data_tx.clone(),
                window: window.clone(),
            };
            tasks.spawn(data_stream(
                (rd, wr),
                data_rx.clone(),
                cancel.clone(),
                fail,
                cfg.throttle.clone(),
                learned.clone(),
            ));
        }
        let (ctrl_tx, ctrl_rx) = mpsc::channel(CONTROL_QUEUE);
        let fail = Failer {
            cancel: cancel.clone(),
            first_error: first_error.clone(),
            chan: data_tx.clone(),
            window: window.clone(),
        };
        let mut reader = JoinSet::new();
        reader.spawn(control_reader(crd, ctrl_tx, cancel.clone(), fail));
        let ctrl_wr = Arc::new(tokio::sync::Mutex::new(cwr));
        if pings {
            reader.spawn(pinger(ctrl_wr.clone(), cfg.ping_interval, cancel.clone()));
        }
        Ok(Self {
            ctrl_wr,
            ctrl_rx,
            data_tx,
            window,
            tasks,
            reader,
            cancel,
            first_error,
            session,
            store_id,
            last_point,
            checkpoints: features & FEATURE_CHECKPOINT != 0,
            zero_runs: features & FEATURE_ZEROS != 0,
            partial: features & FEATURE_PARTIAL != 0,
            learned,
        })
    }

    /// The new hash the receiver gave block `index` of volume `volume`,
    /// sent as a partial block in point `tag` (the last answer, if sent
    /// twice).
    pub(crate) fn learned(&self, tag: u64, volume: u16, index: u64) -> Option<BlockHash> {
        self.learned
            .lock()
            .ok()
            .and_then(|m| m.get(&(tag, volume, index)).copied())
    }

    /// Forget the answers for point `tag` (it is durable).
    pub(crate) fn forget_learned(&self, tag: u64) {
        if let Ok(mut m) = self.learned.lock() {
            m.retain(|k, _| k.0 != tag);
        }
    }

    /// Send a control frame.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), AgentError> {
        self.ctrl_wr
            .lock()
            .await
            .send(frame)
            .await
            .map_err(codec_err)
    }

    /// The next control frame from the receiver; fails when any stream fails.
    pub async fn recv(&mut self) -> Result<Frame, AgentError> {
        tokio::select! {
            f = self.ctrl_rx.recv() => match f {
                Some(r) => r,
                None => Err(self.take_error()),
            },
            () = self.cancel.cancelled() => Err(self.take_error()),
        }
    }

    /// Wait until the receiver has acknowledged (recorded) every block
    /// sent so far: the whole window is free again.
    pub async fn barrier(&self) -> Result<(), AgentError> {
        let whole = u32::try_from(MAX_IN_FLIGHT_BYTES).unwrap_or(u32::MAX);
        match self.window.clone().acquire_many_owned(whole).await {
            Ok(all) => {
                drop(all);
                Ok(())
            }
            Err(_) => Err(self.take_error()),
        }
    }

    /// The error that broke the link.
    pub fn take_error(&self) -> AgentError {
        self.first_error
            .lock()
            .ok()
            .and_then(|mut e| e.take())
            .unwrap_or_else(|| {
                AgentError::Net(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "link to the receiver closed",
                ))
            })
    }

    /// End the session politely: the data streams say Goodbye and wait for
    /// their last acks, then the control connection says Goodbye.
    pub async fn close(&mut self) {
        self.data_tx.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while self.tasks.join_next().await.is_some() {}
            let mut wr = self.ctrl_wr.lock().await;
            let _ = wr.send(&Frame::Goodbye).await;
            let _ = wr.get_mut().shutdown().await;
        })
        .await;
        self.cancel.cancel();
        self.tasks.abort_all();
        self.reader.abort_all();
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.data_tx.close();
        self.window.close();
    }
}

/// `Ping` on the control connection every `every`, so that a receiver can
/// tell a live but quiet session (a long scan that finds nothing to send, an
/// idle interval) from a silent connection. A failed send is left to the
/// control reader, which sees the connection end.
async fn pinger(wr: Arc<tokio::sync::Mutex<Writer>>, every: Duration, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {
                if wr.lock().await.send(&Frame::Ping).await.is_err() {
                    return;
                }
            }
        }
    }
}

struct Failer {
    cancel: CancellationToken,
    first_error: Arc<Mutex<Option<AgentError>>>,
    chan: async_channel::Sender<Outgoing>,
    window: Arc<Semaphore>,
}

impl Failer {
    fn fail(&self, e: AgentError) {
        if let Ok(mut slot) = self.first_error.lock() {
            slot.get_or_insert(e);
        }
        self.chan.close();
        self.window.close();
        self.cancel.cancel();
    }
}

async fn data_stream(
    (mut rd, mut wr): (Reader, Writer),
    rx: async_channel::Receiver<Outgoing>,
    cancel: CancellationToken,
    fail: Failer,
    throttle: Option<Arc<crate::throttle::Throttle>>,
    learned: Learned,
) {
    let mut acks = Acks::new(learned);
    let result: Result<(), AgentError> = async {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                msg = rx.recv() => match msg {
                    Ok(o) => {
                        let mut batch = Some(o);
                        while let Some(o) = batch.take() {
                            let seq = wr.encoder().next_seq();
                            if let Some(t) = &throttle {
                                // Paced: each frame waits for its tokens and goes out at once.
                                t.take(o.wire_len()).await;
                                wr.send(&o.frame).await.map_err(codec_err)?;
                                acks.sent(seq, o);
                                continue;
                            }
                            wr.feed(&o.frame).await.map_err(codec_err)?;
                            acks.sent(seq, o);
                            if !acks.in_flight().is_multiple_of(16) {
                                batch = rx.try_recv().ok();
                            }
                        }
                        wr.flush().await.map_err(codec_err)?;
                    }
                    Err(_) => {
                        // Closed: the session is ending. Wait for the last acks.
                        wr.send(&Frame::Goodbye).await.map_err(codec_err)?;
                        while acks.in_flight() > 0 {
                            acks.take(read_frame(&mut rd).await?)?;
                        }
                        return Ok(());
                    }
                },
                f = read_frame(&mut rd) => acks.take(f?)?,
            }
        }
    }
    .await;
    if let Err(e) = result {
        fail.fail(receiver_reason(&mut rd, e).await);
    }
}

/// A write that failed because the receiver closed the stream usually has
/// the receiver's reason right behind it (an `Error` frame sent just before
/// the close): report that, not the broken pipe.
async fn receiver_reason(rd: &mut Reader, e: AgentError) -> AgentError {
    if !matches!(e, AgentError::Net(_)) {
        return e;
    }
    let reason = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match read_frame(rd).await {
                Ok(Frame::Received { .. } | Frame::PartialApplied(_)) => continue,
                Err(remote @ AgentError::Remote { .. }) => return Some(remote),
                _ => return None,
            }
        }
    })
    .await;
    reason.ok().flatten().unwrap_or(e)
}

async fn control_reader(
    mut rd: Reader,
    tx: mpsc::Sender<Result<Frame, AgentError>>,
    cancel: CancellationToken,
    fail: Failer,
) {
    loop {
        let f = tokio::select! {
            () = cancel.cancelled() => return,
            f = read_frame(&mut rd) => f,
        };
        match f {
            Ok(frame) => {
                if tx.send(Ok(frame)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                fail.fail(e);
                return;
            }
        }
    }
}
