//! Stopping the agent while the receiver is stalled (it keeps its
//! connections and reads what is sent, but never answers) ends within a
//! deadline: neither a point's wait for its ack nor the connection's
//! handshake holds the stop.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pilotlight::{agent_config, overwrite_random_4k, sample_image, wait_until, TestReceiver};
use pilotlight_agent::status::Status;
use pilotlight_agent::{AgentConfig, CommitMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;
/// How long a stop may take at most.
const STOP_DEADLINE: Duration = Duration::from_secs(15);

/// A TCP proxy in front of the receiver. Once stalled, it keeps reading
/// what the agent sends (counting it) and forwards nothing either way: to
/// the agent, the receiver accepted everything and never answers.
struct StallingProxy {
    addr: SocketAddr,
    stalled: Arc<AtomicBool>,
    swallowed: Arc<AtomicU64>,
}

impl StallingProxy {
    async fn start(to: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stalled = Arc::new(AtomicBool::new(false));
        let swallowed = Arc::new(AtomicU64::new(0));
        let (s, w) = (stalled.clone(), swallowed.clone());
        tokio::spawn(async move {
            while let Ok((agent, _)) = listener.accept().await {
                let receiver = TcpStream::connect(to).await.unwrap();
                let (ar, aw) = agent.into_split();
                let (rr, rw) = receiver.into_split();
                tokio::spawn(pump(ar, rw, s.clone(), Some(w.clone())));
                tokio::spawn(pump(rr, aw, s.clone(), None));
            }
        });
        Self {
            addr,
            stalled,
            swallowed,
        }
    }

    fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }

    fn swallowed(&self) -> u64 {
        self.swallowed.load(Ordering::SeqCst)
    }
}

async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    stalled: Arc<AtomicBool>,
    swallowed: Option<Arc<AtomicU64>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if stalled.load(Ordering::SeqCst) {
            if let Some(s) = &swallowed {
                s.fetch_add(n as u64, Ordering::SeqCst);
            }
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Wait until `cond` holds; fails the test after `secs`.
async fn wait_for(secs: u64, what: &str, cond: impl Fn() -> bool) {
    wait_until(Duration::from_secs(secs), what, cond).await;
}

/// A TCP proxy in front of the receiver that can hold back what the
/// receiver says on the control connection (the first one), from the moment
/// the first data stream connects until released: the agent sends a whole
/// point and the receiver commits it, but its `DURABLE` waits here.
struct AckHoldingProxy {
    addr: SocketAddr,
    hold: tokio::sync::watch::Sender<bool>,
}

impl AckHoldingProxy {
    async fn start(to: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (hold, held) = tokio::sync::watch::channel(false);
        let holder = hold.clone();
        tokio::spawn(async move {
            let mut first = true;
            while let Ok((agent, _)) = listener.accept().await {
                let receiver = TcpStream::connect(to).await.unwrap();
                let (ar, aw) = agent.into_split();
                let (rr, rw) = receiver.into_split();
                let never = Arc::new(AtomicBool::new(false));
                tokio::spawn(pump(ar, rw, never.clone(), None));
                if first {
                    tokio::spawn(pump_unless_held(rr, aw, held.clone()));
                    first = false;
                } else {
                    // A data stream: the control connection's Welcome is in.
                    holder.send_replace(true);
                    tokio::spawn(pump(rr, aw, never, None));
                }
            }
        });
        Self { addr, hold }
    }

    fn release(&self) {
        self.hold.send_replace(false);
    }
}

/// Forward `from` to `to`, keeping what arrives while `hold` is set and
/// writing it out once it is cleared.
async fn pump_unless_held(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut hold: tokio::sync::watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut kept = Vec::new();
    loop {
        if !*hold.borrow() && !kept.is_empty() {
            if to.write_all(&kept).await.is_err() {
                return;
            }
            kept.clear();
        }
        tokio::select! {
            r = from.read(&mut buf) => {
                let n = match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if *hold.borrow() {
                    kept.extend_from_slice(&buf[..n]);
                } else if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            changed = hold.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// A receiver with server `s1` enrolled, and a sample image of `size`
/// bytes (seeded) for it, in a temporary directory.
async fn setup(size: u64, seed: u64) -> (tempfile::TempDir, TestReceiver, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let rcv = TestReceiver::create(tmp.path()).await;
    let identity = rcv.enroll("s1");
    let img = tmp.path().join("a.img");
    sample_image(&img, size, seed);
    (tmp, rcv, identity, img)
}

fn continuous(cfg: &mut AgentConfig) {
    cfg.once = false;
    cfg.commit = CommitMode::Sync;
    cfg.interval = Duration::from_millis(200);
}

/// A point sent to a receiver that stalls before its ack: the stop gives
/// up waiting for the ack after a grace, and `run` returns the points made
/// durable before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_while_a_point_waits_for_its_ack() {
    let (tmp, rcv, identity, img) = setup(8 * MIB, 1).await;
    let root = tmp.path();
    let proxy = StallingProxy::start(rcv.addr).await;
    let state = root.join("state");
    let mut cfg = agent_config(proxy.addr, &identity, &state, &[("root", &img)]);
    continuous(&mut cfg);
    let stop = CancellationToken::new();
    let agent = tokio::spawn(pilotlight_agent::run(cfg, stop.clone()));
    wait_for(60, "a first durable point", || {
        Status::load(&state).is_ok_and(|s| s.last_point.is_some())
    })
    .await;
    proxy.stall();
    overwrite_random_4k(&img, 200, 2);
    // The next point goes into the void: its blocks and EndPoint are read
    // and never answered.
    wait_for(60, "the next point to be sent", || {
        proxy.swallowed() > 256 * 1024
    })
    .await;
    stop.cancel();
    let stopped = Instant::now();
    let reports = tokio::time::timeout(STOP_DEADLINE, agent)
        .await
        .expect("the agent stops within the deadline")
        .unwrap()
        .unwrap();
    assert!(!reports.is_empty(), "the first point was durable");
    eprintln!("stopped in {:?}", stopped.elapsed());
    rcv.stop().await;
}

/// A receiver that accepts the connection and never finishes the
/// handshake: the stop does not wait for the connection's timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_while_connecting_to_a_stalled_receiver() {
    let (tmp, rcv, identity, img) = setup(MIB, 1).await;
    let root = tmp.path();
    let proxy = StallingProxy::start(rcv.addr).await;
    proxy.stall();
    let mut cfg = agent_config(
        proxy.addr,
        &identity,
        &root.join("state"),
        &[("root", &img)],
    );
    continuous(&mut cfg);
    let stop = CancellationToken::new();
    let agent = tokio::spawn(pilotlight_agent::run(cfg, stop.clone()));
    wait_for(60, "the TLS handshake to start", || proxy.swallowed() > 0).await;
    stop.cancel();
    let reports = tokio::time::timeout(Duration::from_secs(5), agent)
        .await
        .expect("the agent stops without waiting for the connection timeout")
        .unwrap()
        .unwrap();
    assert!(reports.is_empty());
    rcv.stop().await;
}

/// A stop that comes while a point waits for its `DURABLE`, which then
/// arrives: the agent takes it and closes at once, without waiting for the
/// next interval or the stop's grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_while_waiting_for_an_ack_that_then_comes_closes_at_once() {
    let (tmp, rcv, identity, img) = setup(8 * MIB, 3).await;
    let root = tmp.path();
    let proxy = AckHoldingProxy::start(rcv.addr).await;
    let mut cfg = agent_config(
        proxy.addr,
        &identity,
        &root.join("state"),
        &[("root", &img)],
    );
    continuous(&mut cfg);
    // The next point is a minute away: only the stop ends the session.
    cfg.interval = Duration::from_secs(60);
    let stop = CancellationToken::new();
    let agent = tokio::spawn(pilotlight_agent::run(cfg, stop.clone()));
    let dir = rcv.dir.clone();
    wait_for(60, "the receiver to commit the first point", || {
        pilotlight_receiver::admin::points(&dir, None).is_ok_and(|p| p.len() == 1)
    })
    .await;
    stop.cancel();
    proxy.release();
    let released = Instant::now();
    let reports = tokio::time::timeout(STOP_DEADLINE, agent)
        .await
        .expect("the agent stops")
        .unwrap()
        .unwrap();
    let took = released.elapsed();
    assert_eq!(reports.len(), 1, "the held point was durable");
    assert!(
        took < Duration::from_secs(3),
        "took {took:?} to stop once the ack came (the stop's grace is 5 s)"
    );
    rcv.stop().await;
}
