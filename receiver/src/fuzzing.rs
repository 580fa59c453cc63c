//! The session fuzzer's harness, shared by the cargo-fuzz target
//! `receiver_session` and the tests that replay its seeds and random inputs
//! (`tests/fuzz_session.rs`). Not part of the API; built with the `fuzzing`
//! feature only.
//!
//! The input is a script of agent connections: each step opens (on first
//! use) one of [`CONNS`] in-memory connections as an enrolled server (`web`,
//! `db`) or as an identity the catalog refused, and sends it a frame in any
//! order: `Hello`, `Open`, `Join`, `Block`, `ZeroRun`, `EndPoint`, `GetHashes`,
//! `Goodbye`, `Restore` and `Fetch` (a restore connection, issue 17),
//! `Checkpoint` and `Resume` (issue 15), a frame only the receiver sends, or
//! raw bytes. Each
//! connection is served by the receiver's own connection code
//! (`Connection::serve_authorized`: everything after TLS) over a real
//! store in a temporary directory, on a runtime with paused time that the
//! script advances (a data stream's blocking applier keeps tokio from
//! advancing it on its own), so every timeout passes in a few steps.
//!
//! ```text
//! input:  volumes u8 | (blocks u8){volumes} | streams u8 | step*
//! step:   op u8, then the op's bytes (a missing byte reads as 0);
//!         see `Run::step` and `Run::message`
//! ```
//!
//! What must hold, whatever the script ([`session`] asserts it):
//! - no panic, and every connection ends once the agent side has closed
//!   (no hang);
//! - every error a connection ends with is one a peer can cause (a
//!   protocol, frame, block, authorization or timeout error), never the
//!   receiver's own (storage, catalog, internal);
//! - every point in the catalog comes from an `EndPoint` the script sent,
//!   and every `Durable` the agent side read names a point in the catalog.
#![allow(clippy::panic)] // a harness: a broken property is a panic, for the fuzzer to find

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pilotlight_protocol::block::Encoder;
use pilotlight_protocol::codec::FrameCodec;
use pilotlight_protocol::frame::ErrorCode;
use pilotlight_protocol::Frame;
use tokio::io::{AsyncWriteExt, DuplexStream, WriteHalf};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use crate::admission::Admission;
use crate::config::ReceiverConfig;
use crate::connection::Connection;
use crate::handshake::AuthorizedPeer;
use crate::registry::Registry;
use crate::server::Shared;
use crate::staging::Staging;
use crate::store::Store;
use crate::ReceiveError;

mod script;

use script::{Input, Out, Script};

/// Connections a script may hold open at once.
pub const CONNS: usize = 4;
/// Steps of a script past which the rest of the input is ignored.
pub const MAX_STEPS: usize = 96;
/// Block size of every declared volume.
const BS: u32 = 4096;
/// Virtual time within which every connection must have ended once the
/// agent side closed: far beyond every timeout of the receiver.
const HANG_LIMIT: Duration = Duration::from_secs(600);
/// How far virtual time moves at a time while waiting for the end.
const TICK: Duration = Duration::from_secs(2);
/// The enrolled servers a connection may be.
const SERVERS: [&str; 2] = ["web", "db"];

/// What a script made the receiver do, for tests that check a seed reaches
/// what it was written for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Points in the catalog.
    pub points: usize,
    /// `Durable` frames the agent sides read.
    pub durable: usize,
    /// Connections that ended with an error.
    pub errors: usize,
}

/// Run the script `data` against a fresh receiver and check what must hold
/// (see the module docs); panics when it does not.
pub fn session(data: &[u8]) -> Outcome {
    let tmp = match tempfile::tempdir() {
        Ok(t) => t,
        Err(e) => return skip("temp dir", &e),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build();
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => return skip("runtime", &e),
    };
    let dir = tmp.path().join("receiver");
    let setup = match template() {
        Some(t) => copy_dir(t, &dir).map_err(|e| ReceiveError::storage(&dir, e)),
        None => Err(ReceiveError::NotFound("no receiver template".into())),
    };
    let store = match setup.and_then(|()| Store::open_for_serve(&dir)) {
        Ok(s) => Arc::new(s),
        Err(e) => return skip("store", &e),
    };
    rt.block_on(async move {
        let run = match Run::new(store, &dir) {
            Ok(r) => r,
            Err(e) => return skip("receiver", &e),
        };
        let mut run = run;
        let mut input = Input(data);
        let script = Script::read(&mut input);
        for _ in 0..MAX_STEPS {
            if input.0.is_empty() {
                break;
            }
            run.step(&script, &mut input).await;
        }
        run.finish().await
    })
}

/// A receiver directory with [`SERVERS`] enrolled, made once per process
/// (keys, certificates, an empty catalog) and copied for every script.
fn template() -> Option<&'static Path> {
    static TEMPLATE: OnceLock<Option<(tempfile::TempDir, PathBuf)>> = OnceLock::new();
    let made = TEMPLATE.get_or_init(|| {
        let tmp = tempfile::tempdir().ok()?;
        let dir = tmp.path().join("receiver");
        crate::admin::init(&dir, None).ok()?;
        for s in SERVERS {
            crate::admin::enroll(&dir, s, &tmp.path().join(format!("{s}.pem"))).ok()?;
        }
        Some((tmp, dir))
    });
    made.as_ref().map(|(_, dir)| dir.as_path())
}

/// Copy the directory tree `from` to `to` (modes included).
fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir(to)?;
    std::fs::set_permissions(to, std::fs::metadata(from)?.permissions())?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// Setup failed for a reason that is not the receiver's session logic (the
/// machine): nothing to check.
fn skip(what: &str, e: &dyn std::fmt::Display) -> Outcome {
    eprintln!("fuzzing: cannot set up the {what}: {e}");
    Outcome::default()
}

/// The agent side of one connection.
struct Client {
    /// Index in [`SERVERS`], or `None` for an identity the catalog refused.
    who: Option<usize>,
    wr: FramedWrite<WriteHalf<DuplexStream>, FrameCodec>,
}

/// What the agent sides read from the receiver.
#[derive(Default)]
struct Seen {
    /// Session ids of every `Welcome`.
    welcomes: Vec<u64>,
    /// `Durable` points, with the server of the connection.
    durable: Vec<(usize, u64)>,
}

/// A receiver serving one script.
struct Run {
    shared: Arc<Shared>,
    tls: TlsAcceptor,
    peers: Vec<AuthorizedPeer>,
    stop: CancellationToken,
    staging: JoinHandle<()>,
    clients: [Option<Client>; CONNS],
    /// The receiver's side of every connection opened.
    served: Vec<JoinHandle<Result<(), ReceiveError>>>,
    readers: Vec<JoinHandle<()>>,
    seen: Arc<Mutex<Seen>>,
    /// `EndPoint` frames sent, by server.
    end_points: [u64; SERVERS.len()],
    /// Blocks sent so far, by tag.
    blocks_sent: HashMap<u64, u64>,
    encoder: Option<Encoder>,
}

impl Run {
    fn new(store: Arc<Store>, dir: &Path) -> Result<Self, ReceiveError> {
        let mut peers = Vec::new();
        {
            let cat = store.catalog()?;
            for s in SERVERS {
                let row = cat.require_server(s)?;
                peers.push(AuthorizedPeer {
                    server: s.to_owned(),
                    server_id: row.id,
                    serial: row.cert_serial.unwrap_or_default(),
                });
            }
        }
        // Short waits, so that a script reaches each of them in few steps.
        let cfg = ReceiverConfig {
            idle_timeout_secs: 10,
            handshake_timeout_secs: 5,
            write_timeout_secs: 5,
            ..ReceiverConfig::default()
        };
        let (staging, task) = Staging::start(store.clone());
        let shared = Arc::new(Shared {
            store,
            admission: Admission::new(&cfg),
            cfg,
            registry: Arc::new(Registry::new(dir.to_owned())),
            staging,
        });
        Ok(Self {
            shared,
            tls: TlsAcceptor::from(crate::pki::server_config(dir)?),
            peers,
            stop: CancellationToken::new(),
            staging: task,
            clients: Default::default(),
            served: Vec::new(),
            readers: Vec::new(),
            seen: Arc::default(),
            end_points: [0; SERVERS.len()],
            blocks_sent: HashMap::new(),
            encoder: Encoder::new(1).ok(),
        })
    }

    /// One step of the script.
    async fn step(&mut self, script: &Script, input: &mut Input<'_>) {
        let op = input.u8();
        let conn = usize::from(op >> 4) % CONNS;
        match op % 4 {
            // Close the agent's side of a connection.
            0 => {
                if let Some(mut c) = self.clients[conn].take() {
                    let _ = c.wr.get_mut().shutdown().await;
                }
            }
            // Let the receiver catch up, and time pass.
            1 => {
                tokio::time::advance(Duration::from_millis(u64::from(input.u8()))).await;
                settle().await;
            }
            // Send a frame, or raw bytes.
            _ => {
                let who = input.u8();
                let out = self.message(script, input).await;
                let client = self.client(conn, who);
                let sent = match &out {
                    Out::Frame(f) => client.wr.send(f).await.is_ok(),
                    Out::Raw(b) => client.wr.get_mut().write_all(b).await.is_ok(),
                };
                if let (true, Some(w), Out::Frame(Frame::EndPoint { .. })) =
                    (sent, client.who, &out)
                {
                    self.end_points[w] += 1;
                }
            }
        }
    }

    /// The agent side of connection `conn`, opened (as server `who % 3`)
    /// if it is not.
    fn client(&mut self, conn: usize, who: u8) -> &mut Client {
        let slot = &mut self.clients[conn];
        if slot.is_none() {
            let who = Some(usize::from(who % 3)).filter(|&w| w < SERVERS.len());
            let authorized = match who.and_then(|w| self.peers.get(w)) {
                Some(p) => Ok(p.clone()),
                None => Err(ReceiveError::Unauthorized("fuzzing: refused".into())),
            };
            let (near, far) = tokio::io::duplex(1 << 16);
            let conn = Connection {
                shared: self.shared.clone(),
                tls: self.tls.clone(),
                cancel: self.stop.child_token(),
                peer: SocketAddr::from((Ipv4Addr::LOCALHOST, 1)),
            };
            let served = tokio::spawn(async move { conn.serve_authorized(far, authorized).await });
            self.served.push(served);
            let (r, w) = tokio::io::split(near);
            self.readers.push(tokio::spawn(read_replies(
                FramedRead::new(r, FrameCodec::default()),
                who,
                self.seen.clone(),
            )));
            *slot = Some(Client {
                who,
                wr: FramedWrite::new(w, FrameCodec::default()),
            });
        }
        // INVARIANT: filled just above.
        #[allow(clippy::unwrap_used)]
        slot.as_mut().unwrap()
    }

    /// Close every agent side, wait for every connection to end, then check
    /// what the receiver did.
    async fn finish(mut self) -> Outcome {
        let mut outcome = Outcome::default();
        for c in self.clients.iter_mut().filter_map(Option::take) {
            let mut wr = c.wr;
            let _ = wr.get_mut().shutdown().await;
        }
        let mut waited = Duration::ZERO;
        while !self.served.iter().all(JoinHandle::is_finished) {
            assert!(
                waited < HANG_LIMIT,
                "a connection did not end after its agent closed: hang"
            );
            // Real time first: a commit's blocking work may still be under way.
            for _ in 0..8 {
                settle().await;
            }
            tokio::time::advance(TICK).await;
            waited += TICK;
        }
        for task in std::mem::take(&mut self.served) {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    if std::env::var_os("PILOTLIGHT_FUZZ_LOG").is_some() {
                        eprintln!("fuzzing: a connection ended: {e}");
                    }
                    assert!(peer_caused(&e), "the receiver's own error: {e:?}");
                    outcome.errors += 1;
                }
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
        // The receiver closed every connection: the readers are at their end.
        for r in std::mem::take(&mut self.readers) {
            let _ = r.await;
        }
        let Self {
            shared,
            staging,
            seen,
            end_points,
            ..
        } = self;
        let store = shared.store.clone();
        drop(shared);
        // The staging task drains its queue once its last sender is gone.
        let _ = staging.await;
        let seen = std::mem::take(&mut *seen.lock().unwrap_or_else(|p| p.into_inner()));
        outcome.durable = seen.durable.len();
        outcome.points = check_points(&store, &seen, &end_points);
        outcome
    }
}

/// Give the receiver's tasks, and its blocking work (catalog, fsync), a
/// moment of real time to react to what the script did.
async fn settle() {
    for _ in 0..4 {
        tokio::task::yield_now().await;
        #[allow(clippy::disallowed_methods)] // real time for the blocking pool, not a test wait
        std::thread::sleep(Duration::from_micros(250));
    }
    tokio::task::yield_now().await;
}

/// Read what the receiver sends on one connection until it closes it.
async fn read_replies(
    mut rd: FramedRead<tokio::io::ReadHalf<DuplexStream>, FrameCodec>,
    who: Option<usize>,
    seen: Arc<Mutex<Seen>>,
) {
    while let Some(Ok((_, frame))) = rd.next().await {
        let Ok(mut seen) = seen.lock() else { return };
        match frame {
            Frame::Welcome { session, .. } => seen.welcomes.push(session),
            Frame::Durable { point, .. } => {
                if let Some(w) = who {
                    seen.durable.push((w, point));
                }
            }
            _ => {}
        }
    }
}

/// Whether a peer can cause `e`: anything but the receiver's own failures
/// (storage, catalog, internal), which no frame sequence may provoke.
fn peer_caused(e: &ReceiveError) -> bool {
    use ReceiveError as E;
    match e {
        E::Net(_)
        | E::Decode(_)
        | E::Protocol(_)
        | E::BadBlock { .. }
        | E::Unauthorized(_)
        | E::Timeout(_)
        | E::Superseded
        | E::Busy(_)
        // A restore of a volume or point that does not exist.
        | E::NotFound(_) => true,
        E::SessionFailed { code, .. } => matches!(
            code,
            ErrorCode::Protocol
                | ErrorCode::Unauthorized
                | ErrorCode::BadBlock
                | ErrorCode::Timeout
                | ErrorCode::Superseded
                | ErrorCode::Busy
        ),
        _ => false,
    }
}

/// Every point of a server comes from an `EndPoint` it sent, and every
/// `Durable` names a point of its server. Returns the number of points.
fn check_points(store: &Store, seen: &Seen, end_points: &[u64; SERVERS.len()]) -> usize {
    let mut total = 0;
    let cat = match store.catalog() {
        Ok(c) => c,
        Err(e) => panic!("the catalog after the run: {e}"),
    };
    for (w, name) in SERVERS.iter().enumerate() {
        let points: Vec<u64> = match cat.points(Some(name)) {
            Ok(p) => p.iter().map(|p| p.id as u64).collect(),
            Err(e) => panic!("listing the points of {name}: {e}"),
        };
        assert!(
            points.len() as u64 <= end_points[w],
            "{name}: {} points from {} EndPoint frames",
            points.len(),
            end_points[w]
        );
        for &(_, point) in seen.durable.iter().filter(|(sw, _)| *sw == w) {
            assert!(
                points.contains(&point),
                "{name}: Durable for point {point}, which the catalog does not hold"
            );
        }
        total += points.len();
    }
    total
}
