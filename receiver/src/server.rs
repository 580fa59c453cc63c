//! The TLS server: accept loop, per-connection handshake, control sessions
//! and data streams.
//!
//! ```text
//! accept loop (connection limit) -> per connection: TLS, identity, Hello
//!   control: Open -> Welcome; EndPoint -> wait for blocks -> fsync packs
//!            -> catalog commit -> Durable -> staging update
//!   data:    Join -> Joined; Block -> applier (blocking: verify, dedup,
//!            pack append) -> Received
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pilotlight_protocol::block::Decoder;
use pilotlight_protocol::codec::{CodecError, FrameCodec};
use pilotlight_protocol::frame::{BlockFrame, CommitMode, Consistency, VolumeDecl};
use pilotlight_protocol::limits::{
    block_count, block_len, BLOCK_HEADER_LEN, MAX_HASHES_PER_FRAME, VERSION,
};
use pilotlight_protocol::{block, DecodeError, Encoding, Frame};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::catalog::{BlockRef, NewPoint};
use crate::config::ReceiverConfig;
use crate::pack::PackWriter;
use crate::session::{Session, SessionVolume};
use crate::store::Store;
use crate::{pki, ReceiveError};

/// Depth of the queue from a data stream's reader to its applier.
const APPLY_QUEUE: usize = 8;
/// Depth of the queue of acks from an applier (must exceed `APPLY_QUEUE` + 2).
const ACK_QUEUE: usize = 64;
/// Grace period for in-flight work at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A block on its way to the applier, with its share of the session's
/// in-flight byte budget.
type Applying = (u64, BlockFrame, OwnedSemaphorePermit);

type Reader = FramedRead<ReadHalf<TlsStream<TcpStream>>, FrameCodec>;
type Writer = FramedWrite<WriteHalf<TlsStream<TcpStream>>, FrameCodec>;

struct ActiveServer {
    cancel: CancellationToken,
    lock: Arc<tokio::sync::Mutex<()>>,
}

struct Shared {
    store: Arc<Store>,
    cfg: ReceiverConfig,
    sessions: Mutex<HashMap<u64, Arc<Session>>>,
    /// Every session still alive anywhere (a commit may outlive its
    /// control connection): garbage collection asks them all for pins.
    alive: Mutex<Vec<std::sync::Weak<Session>>>,
    active: Mutex<HashMap<i64, ActiveServer>>,
    live: Mutex<crate::live::Live>,
}

impl Shared {
    /// Record that `server` connected (or, with `None`, disconnected).
    fn set_live(&self, server: &str, since: Option<String>) {
        let Ok(mut live) = self.live.lock() else {
            return;
        };
        match since {
            Some(t) => live.connected.insert(server.to_owned(), t),
            None => live.connected.remove(server),
        };
        if let Err(e) = live.save(self.store.dir()) {
            tracing::debug!(cause = %e, "cannot write live.json");
        }
    }
}

impl Shared {
    /// What the sessions alive now hold on to.
    fn pins(&self) -> Result<crate::gc::Pins, ReceiveError> {
        let mut pins = crate::gc::Pins::default();
        let mut alive = self.alive.lock().map_err(|_| Self::lock_err())?;
        alive.retain(|w| w.strong_count() > 0);
        for s in alive.iter().filter_map(std::sync::Weak::upgrade) {
            s.pins(&mut pins)?;
        }
        Ok(pins)
    }

    /// Prune by the configured policy, then collect garbage.
    fn maintain(&self) -> Result<(), ReceiveError> {
        let store = &self.store;
        let removed = crate::admin::prune_store(store, None, &self.cfg.retention, false)?
            .iter()
            .filter(|i| !i.keep)
            .count();
        let opts = crate::gc::GcOptions {
            min_dead_percent: self.cfg.gc_min_dead_percent,
        };
        let report = crate::gc::collect(store, &|| self.pins(), opts)?;
        metrics::counter!("pilotlight_receiver_points_pruned_total").increment(removed as u64);
        metrics::counter!("pilotlight_receiver_gc_bytes_freed_total").increment(report.bytes_freed);
        tracing::info!(
            pruned = removed,
            packs_removed = report.packs_removed,
            packs_rewritten = report.packs_rewritten,
            bytes_freed = report.bytes_freed,
            "maintenance done"
        );

        Ok(())
    }

    fn lock_err() -> ReceiveError {
        ReceiveError::Corrupt("receiver lock poisoned".into())
    }
}

/// Serve agents on `listener` from the receiver directory `dir` until
/// `shutdown` is cancelled.
pub async fn run(
    listener: TcpListener,
    dir: PathBuf,
    cfg: ReceiverConfig,
    shutdown: CancellationToken,
) -> Result<(), ReceiveError> {
    let open_dir = dir.clone();
    let store = tokio::task::spawn_blocking(move || Store::open_for_serve(&open_dir))
        .await
        .map_err(|e| ReceiveError::Corrupt(format!("store open task failed: {e}")))??;
    let tls = TlsAcceptor::from(pki::server_config(&dir)?);
    let limit = Arc::new(Semaphore::new(cfg.max_connections.max(1)));
    let shared = Arc::new(Shared {
        store: Arc::new(store),
        cfg,
        sessions: Mutex::new(HashMap::new()),
        alive: Mutex::new(Vec::new()),
        active: Mutex::new(HashMap::new()),
        live: Mutex::new(crate::live::Live {
            pid: std::process::id(),
            ..Default::default()
        }),
    });
    if let Ok(live) = shared.live.lock() {
        let _ = live.save(shared.store.dir());
    }
    tracing::info!(addr = ?listener.local_addr().ok(), "receiver serving");
    let tracker = TaskTracker::new();
    if let Some(every) = shared.cfg.prune_interval() {
        tracker.spawn(maintenance(shared.clone(), every, shutdown.clone()));
    }
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(cause = %e, "accept failed");
                        continue;
                    }
                };
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "connection refused: at the connection limit");
                    drop(tcp);
                    continue;
                };
                let conn = Connection { shared: shared.clone(), tls: tls.clone(), cancel: shutdown.child_token(), peer };
                tracker.spawn(conn.serve(tcp, permit));
            }
        }
    }
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the shutdown grace period");
    }
    Ok(())
}

/// Prune and collect garbage every `every`, off the async threads. One pass
/// at a time; a failed pass is logged and retried at the next tick.
async fn maintenance(shared: Arc<Shared>, every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let s = shared.clone();
        if let Err(e) = blocking(move || s.maintain()).await {
            tracing::warn!(cause = %e, "maintenance (prune, garbage collection) failed");
        }
    }
}

struct Connection {
    shared: Arc<Shared>,
    tls: TlsAcceptor,
    cancel: CancellationToken,
    peer: SocketAddr,
}

enum Role {
    Control(Box<Session>),
    Data,
}

impl Connection {
    async fn serve(self, tcp: TcpStream, _permit: OwnedSemaphorePermit) {
        let _ = tcp.set_nodelay(true);
        keepalive(&tcp);
        let handshake = self.shared.cfg.handshake_timeout();
        let tls = match tokio::time::timeout(handshake, self.tls.accept(tcp)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::info!(peer = %self.peer, cause = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::info!(peer = %self.peer, "TLS handshake timed out");
                return;
            }
        };
        let identity = pki::peer_identity(tls.get_ref().1.peer_certificates().unwrap_or(&[]));
        let (r, w) = tokio::io::split(tls);
        let mut rd = FramedRead::new(r, FrameCodec::default());
        let mut wr = FramedWrite::new(w, FrameCodec::default());
        let result = match identity {
            Ok((server, serial)) => self.session(&mut rd, &mut wr, server, serial).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            let kind = format!("{:?}", e.code()).to_lowercase();
            metrics::counter!("pilotlight_receiver_errors_total", "kind" => kind).increment(1);
            match &e {
                ReceiveError::Net(_) => {
                    tracing::info!(peer = %self.peer, cause = %e, "connection lost")
                }
                _ => tracing::warn!(peer = %self.peer, cause = %e, "session closed with an error"),
            }
            let frame = Frame::Error {
                code: e.code(),
                message: e.to_string(),
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), wr.send(&frame)).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), wr.get_mut().shutdown()).await;
    }

    async fn session(
        &self,
        rd: &mut Reader,
        wr: &mut Writer,
        server: String,
        serial: String,
    ) -> Result<(), ReceiveError> {
        let store = self.shared.store.clone();
        let name = server.clone();
        let row = blocking(move || store.catalog()?.server(&name)).await?;
        let server_id = match row {
            Some(r) if !r.revoked && r.cert_serial.as_deref() == Some(serial.as_str()) => r.id,
            Some(r) if r.revoked => {
                return Err(ReceiveError::Unauthorized(format!(
                    "the identity of server {server} was revoked"
                )))
            }
            Some(_) => {
                return Err(ReceiveError::Unauthorized(format!(
                    "this identity of server {server} was superseded by a newer enrollment"
                )))
            }
            None => {
                return Err(ReceiveError::Unauthorized(format!(
                    "server {server} is not enrolled"
                )))
            }
        };
        let handshake = self.shared.cfg.handshake_timeout();
        match tokio::time::timeout(handshake, next(rd)).await {
            Err(_) => return Err(ReceiveError::Timeout("waiting for Hello")),
            Ok(f) => match f? {
                Frame::Hello { version, .. } if version == VERSION => {}
                Frame::Hello { version, .. } => {
                    return Err(DecodeError::BadVersion {
                        got: version,
                        supported: VERSION,
                    }
                    .into())
                }
                other => return Err(unexpected(&other, "Hello")),
            },
        }
        send(wr, &Frame::hello()).await?;
        let first = match tokio::time::timeout(handshake, next(rd)).await {
            Err(_) => return Err(ReceiveError::Timeout("waiting for Open or Join")),
            Ok(f) => f?,
        };
        let role = match first {
            Frame::Open {
                streams,
                commit,
                volumes,
            } => {
                let mut session = self
                    .open(server_id, &server, streams, commit, volumes)
                    .await?;
                session.serial = serial.clone();
                Role::Control(Box::new(session))
            }
            Frame::Join { session } => {
                self.data(rd, wr, server_id, session).await?;
                Role::Data
            }
            other => return Err(unexpected(&other, "Open or Join")),
        };
        if let Role::Control(session) = role {
            self.control(rd, wr, Arc::new(*session)).await?;
        }
        Ok(())
    }

    async fn open(
        &self,
        server_id: i64,
        server: &str,
        streams: u16,
        commit: CommitMode,
        decls: Vec<VolumeDecl>,
    ) -> Result<Session, ReceiveError> {
        let mut names = std::collections::HashSet::new();
        for d in &decls {
            if !names.insert(d.name.clone()) {
                return Err(ReceiveError::Protocol(format!(
                    "volume {} declared twice",
                    d.name
                )));
            }
        }
        let store = self.shared.store.clone();
        let volumes = blocking(move || {
            let cat = store.catalog()?;
            decls
                .iter()
                .map(|d| {
                    cat.check_volume(server_id, &d.name, d.block_size)?;
                    Ok(SessionVolume {
                        name: d.name.clone(),
                        size: d.size,
                        block_size: d.block_size,
                    })
                })
                .collect::<Result<Vec<_>, ReceiveError>>()
        })
        .await?;
        let cancel = self.cancel.child_token();
        let id: u64 = rand::random();
        Ok(Session::new(
            id,
            server_id,
            server.to_owned(),
            commit,
            streams,
            volumes,
            cancel,
            self.shared.cfg.max_pending_points,
            self.shared.store.clone(),
            self.shared.cfg.max_session_inflight_mib.max(8) << 20,
        ))
    }

    async fn control(
        &self,
        rd: &mut Reader,
        wr: &mut Writer,
        session: Arc<Session>,
    ) -> Result<(), ReceiveError> {
        // Take over from an older session of the same server: cancel it and
        // wait until it has finished committing.
        let lock = {
            let mut active = self.shared.active.lock().map_err(|_| Shared::lock_err())?;
            let entry = active
                .entry(session.server_id)
                .or_insert_with(|| ActiveServer {
                    cancel: CancellationToken::new(),
                    lock: Arc::new(tokio::sync::Mutex::new(())),
                });
            entry.cancel.cancel();
            entry.cancel = session.cancel.clone();
            entry.lock.clone()
        };
        let _guard = tokio::select! {
            g = lock.lock_owned() => g,
            () = session.cancel.cancelled() => return Err(ReceiveError::Superseded),
        };
        self.shared
            .sessions
            .lock()
            .map_err(|_| Shared::lock_err())?
            .insert(session.id, session.clone());
        self.shared
            .alive
            .lock()
            .map_err(|_| Shared::lock_err())?
            .push(Arc::downgrade(&session));
        metrics::gauge!("pilotlight_receiver_sessions").increment(1.0);
        self.shared
            .set_live(&session.server, Some(crate::catalog::rfc3339(now_ms())));
        let result = self.control_loop(rd, wr, &session).await;
        self.shared.set_live(&session.server, None);
        metrics::gauge!("pilotlight_receiver_sessions").decrement(1.0);
        session.cancel.cancel();
        self.shared
            .sessions
            .lock()
            .map_err(|_| Shared::lock_err())?
            .remove(&session.id);
        result
    }

    async fn control_loop(
        &self,
        rd: &mut Reader,
        wr: &mut Writer,
        session: &Arc<Session>,
    ) -> Result<(), ReceiveError> {
        let store = self.shared.store.clone();
        let server_id = session.server_id;
        let last = blocking(move || store.catalog()?.latest_point(server_id)).await?;
        let welcome = Frame::Welcome {
            session: session.id,
            store_id: self.shared.store.store_id(),
            last_point: last.unwrap_or(0) as u64,
        };
        send(wr, &welcome).await?;
        tracing::info!(server = %session.server, session = session.id, volumes = session.volumes.len(), "session opened");
        loop {
            let frame = tokio::select! {
                () = session.cancel.cancelled() => {
                    return Err(if self.cancel.is_cancelled() { ReceiveError::Shutdown } else { session.cancel_reason() });
                }
                f = next_or_eof(rd) => match f? {
                    Some(f) => f,
                    None => return Ok(()),
                },
            };
            match frame {
                Frame::EndPoint {
                    tag,
                    blocks,
                    created_ms,
                    consistency,
                    commit,
                } => {
                    let point = self
                        .commit(session, tag, blocks, created_ms, consistency, commit)
                        .await?;
                    send(
                        wr,
                        &Frame::Durable {
                            tag,
                            point: point as u64,
                        },
                    )
                    .await?;
                    let store = self.shared.store.clone();
                    let (name, sid) = (session.server.clone(), session.server_id);
                    blocking(move || store.update_staging(&name, sid, point)).await?;
                }
                Frame::GetHashes { volume } => self.send_hashes(wr, session, volume).await?,
                Frame::Goodbye => {
                    session
                        .ended
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                    return Ok(());
                }
                other => return Err(unexpected(&other, "EndPoint, GetHashes or Goodbye")),
            }
        }
    }

    async fn commit(
        &self,
        session: &Arc<Session>,
        tag: u64,
        blocks: u64,
        created_ms: i64,
        consistency: Consistency,
        commit: CommitMode,
    ) -> Result<i64, ReceiveError> {
        if tag != session.state()?.committed_tag + 1 {
            return Err(ReceiveError::Protocol(format!(
                "EndPoint for tag {tag} out of order"
            )));
        }
        let idle = self.shared.cfg.idle_timeout();
        let pending = loop {
            let notified = session.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = session.state()?;
                let received = st.pending.get(&tag).map_or(0, |p| p.received);
                if received > blocks {
                    return Err(ReceiveError::Protocol(format!(
                        "point tag {tag} announced {blocks} blocks but {received} arrived"
                    )));
                }
                if received == blocks {
                    let p = Arc::new(st.pending.remove(&tag).unwrap_or_default());
                    st.committing.insert(tag, p.clone());
                    break p;
                }
            }
            tokio::select! {
                () = &mut notified => {}
                () = session.cancel.cancelled() => return Err(session.cancel_reason()),
                () = tokio::time::sleep(idle) => return Err(ReceiveError::Timeout("waiting for the blocks of a point")),
            }
        };
        let store = self.shared.store.clone();
        let s = session.clone();
        let started = std::time::Instant::now();
        let point = blocking(move || {
            for (id, (file, _)) in &pending.packs {
                file.sync_data().map_err(|e| {
                    ReceiveError::storage(crate::store::pack_file(store.dir(), *id), e)
                })?;
            }
            let volumes: Vec<(&str, u32, u64)> = s
                .volumes
                .iter()
                .map(|v| (v.name.as_str(), v.block_size, v.size))
                .collect();
            let packs: Vec<(u64, u64)> = pending
                .packs
                .iter()
                .map(|(id, (_, end))| (*id, *end))
                .collect();
            let mut cat = store.catalog()?;
            // An identity revoked or superseded while the session ran commits nothing more.
            match cat.server(&s.server)? {
                Some(r) if !r.revoked && r.cert_serial.as_deref() == Some(s.serial.as_str()) => {}
                _ => {
                    return Err(ReceiveError::Unauthorized(format!(
                        "the identity of server {} was revoked or superseded",
                        s.server
                    )))
                }
            }
            let point = cat.commit_point(&NewPoint {
                server_id: s.server_id,
                created_ms,
                consistency: consistency.label(),
                commit: commit.label(),
                volumes: &volumes,
                blocks: &pending.refs,
                new_blocks: &pending.new_blocks,
                packs: &packs,
            })?;
            store.index_blocks(&pending.new_blocks)?;
            store.note_committed(&packs)?;
            drop(cat);
            let mut st = s.state()?;
            st.committed_tag = tag;
            st.committing.remove(&tag);
            for (h, _) in &pending.new_blocks {
                st.pending_hashes.remove(h);
            }
            Ok(point)
        })
        .await?;
        tracing::info!(server = %session.server, point, tag, blocks, "point durable");
        metrics::counter!("pilotlight_receiver_points_total").increment(1);
        metrics::histogram!("pilotlight_receiver_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(point)
    }

    async fn send_hashes(
        &self,
        wr: &mut Writer,
        session: &Arc<Session>,
        volume: u16,
    ) -> Result<(), ReceiveError> {
        let Some(v) = session.volumes.get(usize::from(volume)).cloned() else {
            return Err(ReceiveError::Protocol(format!(
                "GetHashes for undeclared volume {volume}"
            )));
        };
        let store = self.shared.store.clone();
        let server_id = session.server_id;
        let (point, size, map) = blocking(move || {
            let cat = store.catalog()?;
            let Some(point) = cat.latest_point(server_id)? else {
                return Ok((0, 0, Vec::new()));
            };
            let Some(row) = cat.volume(server_id, &v.name)? else {
                return Ok((point, 0, Vec::new()));
            };
            Ok((point, row.size, cat.block_map(row.id, point, 0)?))
        })
        .await?;
        let total = block_count(
            size,
            session
                .volumes
                .get(usize::from(volume))
                .map_or(1, |v| v.block_size),
        );
        let bs = session
            .volumes
            .get(usize::from(volume))
            .map_or(1, |v| v.block_size);
        let mut map = map.into_iter().peekable();
        let zero_full = block::zero_hash(bs as usize);
        let mut start = 0u64;
        while start < total {
            let end = (start + MAX_HASHES_PER_FRAME as u64).min(total);
            let mut hashes = Vec::with_capacity((end - start) as usize);
            for i in start..end {
                let len = block_len(size, bs, i);
                let zero = if len == bs {
                    zero_full
                } else {
                    block::zero_hash(len as usize)
                };
                while map.peek().is_some_and(|(idx, _)| *idx < i) {
                    map.next();
                }
                let h = match map.peek() {
                    Some((idx, Some(h))) if *idx == i => *h,
                    _ => zero,
                };
                hashes.push(h);
            }
            send(
                wr,
                &Frame::Hashes {
                    volume,
                    start,
                    hashes,
                },
            )
            .await?;
            start = end;
        }
        send(
            wr,
            &Frame::HashesEnd {
                volume,
                point: point as u64,
                blocks: total,
            },
        )
        .await
    }

    async fn data(
        &self,
        rd: &mut Reader,
        wr: &mut Writer,
        server_id: i64,
        session_id: u64,
    ) -> Result<(), ReceiveError> {
        let session = {
            let sessions = self
                .shared
                .sessions
                .lock()
                .map_err(|_| Shared::lock_err())?;
            sessions.get(&session_id).cloned()
        };
        let Some(session) = session.filter(|s| s.server_id == server_id) else {
            return Err(ReceiveError::Unauthorized(format!(
                "no session {session_id:#x} of this server to join"
            )));
        };
        {
            let mut st = session.state()?;
            if st.streams_joined >= session.streams {
                return Err(ReceiveError::Protocol(format!(
                    "more than the {} declared data streams",
                    session.streams
                )));
            }
            st.streams_joined += 1;
        }
        send(wr, &Frame::Joined).await?;
        let (apply_tx, apply_rx) = mpsc::channel::<Applying>(APPLY_QUEUE);
        let (ack_tx, mut ack_rx) = mpsc::channel::<Result<u64, ReceiveError>>(ACK_QUEUE);
        let store = self.shared.store.clone();
        let s = session.clone();
        let applier =
            tokio::task::spawn_blocking(move || apply_loop(&s, &store, apply_rx, &ack_tx));
        let idle = self.shared.cfg.idle_timeout();
        let mut apply_tx = Some(apply_tx);
        let result = loop {
            tokio::select! {
                biased;
                () = session.cancel.cancelled() => {
                    break if session.ended.load(std::sync::atomic::Ordering::SeqCst) { Ok(()) } else { Err(session.cancel_reason()) };
                }
                ack = ack_rx.recv() => match ack {
                    Some(Ok(mut seq)) => {
                        // Acks are cumulative: one for every block applied
                        // by now.
                        let mut failed = None;
                        while let Ok(more) = ack_rx.try_recv() {
                            match more {
                                Ok(s) => seq = s,
                                Err(e) => {
                                    failed = Some(e);
                                    break;
                                }
                            }
                        }
                        if let Err(e) = send(wr, &Frame::Received { seq }).await {
                            break Err(e);
                        }
                        if let Some(e) = failed {
                            break Err(e);
                        }
                    }
                    Some(Err(e)) => break Err(e),
                    None => break Ok(()),
                },
                f = tokio::time::timeout(idle, next_or_eof(rd)), if apply_tx.is_some() => match f {
                    // Silence is fine between frames, not in the middle of one.
                    Err(_) if stalled(rd) => break Err(ReceiveError::Timeout("data stream idle mid-transfer")),
                    Err(_) => continue,
                    Ok(Err(e)) => break Err(e),
                    Ok(Ok(None)) | Ok(Ok(Some(Frame::Goodbye))) => apply_tx = None,
                    Ok(Ok(Some(Frame::Block(b)))) => {
                        if let Err(e) = session.check_tag(b.tag) {
                            break Err(e);
                        }
                        let seq = rd.decoder().last_seq();
                        // The session's in-flight byte budget, taken before the
                        // frame is queued; the applier gives it back.
                        let cost = u32::try_from(b.payload.len() + BLOCK_HEADER_LEN).unwrap_or(u32::MAX);
                        let permit = tokio::select! {
                            p = session.inflight.clone().acquire_many_owned(cost) => match p {
                                Ok(p) => p,
                                Err(_) => break Err(session.cancel_reason()),
                            },
                            () = session.cancel.cancelled() => break Err(session.cancel_reason()),
                        };
                        let Some(tx) = apply_tx.as_ref() else { continue };
                        if tx.send((seq, b, permit)).await.is_err() {
                            // The applier stopped; its error is in the ack queue.
                            apply_tx = None;
                        }
                    }
                    Ok(Ok(Some(other))) => break Err(unexpected(&other, "Block")),
                },
            }
        };
        drop(apply_tx);
        drop(ack_rx);
        let _ = applier.await;
        if let Err(e) = &result {
            if !matches!(
                e,
                ReceiveError::Superseded
                    | ReceiveError::SessionFailed { .. }
                    | ReceiveError::Shutdown
            ) {
                // A failed stream fails the whole session: nothing of it is committed.
                session.fail(e);
            }
        }
        result
    }
}

/// Whether a silent data stream is stuck: it is in the middle of a frame.
/// Between frames silence is normal (an agent scanning a large disk may find
/// nothing to send for minutes); TCP keepalive finds dead peers.
fn stalled(rd: &Reader) -> bool {
    !rd.read_buffer().is_empty()
}

/// The blocking half of a data stream: verify, deduplicate, append to a pack,
/// record in the session, ack.
fn apply_loop(
    session: &Session,
    store: &Store,
    mut rx: mpsc::Receiver<Applying>,
    ack: &mpsc::Sender<Result<u64, ReceiveError>>,
) {
    let mut decoder = match Decoder::new() {
        Ok(d) => d,
        Err(e) => {
            let _ = ack.blocking_send(Err(ReceiveError::storage(store.dir(), e)));
            return;
        }
    };
    let mut writer = store.take_writer();
    let mut buf = Vec::new();
    while let Some((seq, b, _permit)) = rx.blocking_recv() {
        let r = apply_one(session, store, &mut decoder, &mut writer, &mut buf, b).map(|()| seq);
        let failed = r.is_err();
        if ack.blocking_send(r).is_err() || failed {
            break;
        }
    }
    session.retire_writer(writer);
}

fn apply_one(
    session: &Session,
    store: &Store,
    decoder: &mut Decoder,
    writer: &mut PackWriter,
    buf: &mut Vec<u8>,
    b: BlockFrame,
) -> Result<(), ReceiveError> {
    let Some(v) = session.volumes.get(usize::from(b.volume)) else {
        return Err(ReceiveError::Protocol(format!(
            "block for undeclared volume {}",
            b.volume
        )));
    };
    let count = block_count(v.size, v.block_size);
    if b.index >= count {
        return Err(ReceiveError::Protocol(format!(
            "block index {} is out of range for volume {} ({count} blocks)",
            b.index, v.name
        )));
    }
    let expected = block_len(v.size, v.block_size, b.index);
    if b.raw_len != expected {
        return Err(ReceiveError::Protocol(format!(
            "block {} of volume {} is {} bytes; expected {expected}",
            b.index, v.name, b.raw_len
        )));
    }
    decoder
        .verify(b.encoding, &b.payload, b.raw_len, &b.hash, buf)
        .map_err(|source| ReceiveError::BadBlock {
            volume: v.name.clone(),
            index: b.index,
            source,
        })?;
    let r = BlockRef {
        volume: b.volume,
        index: b.index,
        raw_len: b.raw_len,
        hash: (b.encoding != Encoding::Zero).then_some(b.hash),
    };
    metrics::counter!("pilotlight_receiver_bytes_received_total").increment(u64::from(b.raw_len));
    if b.encoding == Encoding::Zero {
        return session.record(b.tag, r, None);
    }
    {
        let index = store.index_read()?;
        if index.contains_key(&b.hash) || !session.claim(&b.hash, b.tag)? {
            // Recorded while the index is held: a garbage collection either
            // sees this reference among the session's pins or has already
            // taken the block out of the index (and then it is written anew).
            return session.record(b.tag, r, None);
        }
    }
    let (loc, pack) = writer.append(&b.hash, b.encoding, b.raw_len, &b.payload, || {
        store.alloc_pack_id()
    })?;
    metrics::counter!("pilotlight_receiver_bytes_stored_total")
        .increment(u64::from(loc.stored_len));
    session.record(b.tag, r, Some((b.hash, loc, pack.file)))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ReceiveError> + Send + 'static,
) -> Result<T, ReceiveError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ReceiveError::Corrupt(format!("blocking task failed: {e}")))?
}

async fn send<W: AsyncWrite + Unpin>(
    wr: &mut FramedWrite<W, FrameCodec>,
    frame: &Frame,
) -> Result<(), ReceiveError> {
    wr.send(frame).await.map_err(codec_err)
}

async fn next<R: AsyncRead + Unpin>(
    rd: &mut FramedRead<R, FrameCodec>,
) -> Result<Frame, ReceiveError> {
    next_or_eof(rd).await?.ok_or_else(|| {
        ReceiveError::Net(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "peer closed the connection",
        ))
    })
}

async fn next_or_eof<R: AsyncRead + Unpin>(
    rd: &mut FramedRead<R, FrameCodec>,
) -> Result<Option<Frame>, ReceiveError> {
    match rd.next().await {
        None => Ok(None),
        Some(Ok((_, frame))) => match frame {
            Frame::Error { code, message } => Err(ReceiveError::Protocol(format!(
                "peer reported {code:?}: {message}"
            ))),
            f => Ok(Some(f)),
        },
        Some(Err(e)) => Err(codec_err(e)),
    }
}

fn codec_err(e: CodecError) -> ReceiveError {
    match e {
        CodecError::Io(e) => ReceiveError::Net(e),
        CodecError::Decode(d) => ReceiveError::Decode(d),
    }
}

fn unexpected(frame: &Frame, wanted: &str) -> ReceiveError {
    ReceiveError::Protocol(format!(
        "unexpected {:?} frame; expected {wanted}",
        frame.kind()
    ))
}

/// Turn on TCP keepalive so that a vanished peer is noticed between points.
pub fn keepalive(tcp: &TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(6);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka) {
        tracing::debug!(cause = %e, "cannot enable TCP keepalive");
    }
}

fn now_ms() -> i64 {
    i64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000)
        .unwrap_or(i64::MAX)
}
