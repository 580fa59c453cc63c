//! Durability: acknowledged points survive kill -9 of either side, and
//! replication resumes by itself without resending what is durable.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pilotlight::{
    agent_config, assert_same_bytes, bin, file_len, overwrite_random_4k, replicate_once,
    sample_image, spawn_receiver, spawn_receiver_on, ChildGuard, Deadline, TestReceiver,
};
use rand::{Rng, RngCore, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: u64 = 1 << 20;

/// Overwrite a contiguous random quarter of the image with random bytes, so
/// that a cycle has a few MiB to send.
fn rewrite_quarter(path: &Path, rng: &mut rand::rngs::StdRng) {
    use std::os::unix::fs::FileExt;
    let len = file_len(path);
    let chunk = len / 4;
    let start = rng.random_range(0..4) * chunk;
    let mut buf = vec![0u8; chunk as usize];
    rng.fill_bytes(&mut buf);
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.write_all_at(&buf, start).unwrap();
}

fn spawn_agent(addr: &str, identity: &Path, state: &Path, img: &Path) -> ChildGuard {
    let child = Command::new(bin("pilotlight-agent"))
        .args(["run", "--once", "--receiver", addr, "--identity"])
        .arg(identity)
        .arg("--state")
        .arg(state)
        .arg("--volume")
        .arg(format!("root={}", img.display()))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    ChildGuard(child)
}

/// Wait (with a deadline) for an agent to exit; its point id if it succeeded.
async fn agent_result(mut agent: ChildGuard, timeout: Duration) -> Option<u64> {
    let deadline = Deadline::after(timeout);
    loop {
        if let Some(status) = agent.0.try_wait().unwrap() {
            let mut out = String::new();
            std::io::Read::read_to_string(agent.0.stdout.as_mut().unwrap(), &mut out).unwrap();
            return status
                .success()
                .then(|| out.trim().parse().expect("point id"));
        }
        deadline
            .next(|| format!("agent did not finish within {timeout:?}"))
            .await;
    }
}

/// A clean first cycle: its point with a copy of the source, and how long a
/// cycle takes (the scale of the seeded kill moments).
async fn first_point(
    listen: &str,
    id: &Path,
    state: &Path,
    img: &Path,
    root: &Path,
) -> (Duration, (u64, PathBuf)) {
    let start = Instant::now();
    let p = agent_result(spawn_agent(listen, id, state, img), Duration::from_secs(60))
        .await
        .expect("first point");
    let cycle = start.elapsed();
    let copy = root.join(format!("v{p}"));
    std::fs::copy(img, &copy).unwrap();
    (cycle, (p, copy))
}

/// The points acknowledged durable so far, each with a copy of the source as
/// it was at that point.
struct Acked {
    points: Vec<(u64, PathBuf)>,
    /// How many of `points` have been restored and compared.
    restored: usize,
}

impl Acked {
    fn new(first: (u64, PathBuf)) -> Self {
        Self {
            points: vec![first],
            restored: 0,
        }
    }

    fn push(&mut self, point: u64, copy: PathBuf) {
        self.points.push((point, copy));
    }

    fn len(&self) -> usize {
        self.points.len()
    }

    /// After a fault: every point acknowledged since the last check restores
    /// to its copy byte for byte (each point is restored once), every point
    /// acknowledged before is still listed, and the store verifies (every
    /// stored block matches its hash).
    fn check(&mut self, dir: &Path, scratch: &Path) {
        for (point, copy) in &self.points[self.restored..] {
            let out = scratch.join(format!("check-{point}"));
            let req = pilotlight_receiver::restore::RestoreRequest {
                server: "s1".into(),
                volume: "root".into(),
                point: pilotlight_receiver::restore::PointSel::Id(*point as i64),
                to: out.clone(),
                force: true,
                progress: false,
            };
            pilotlight_receiver::restore::restore(dir, &req)
                .unwrap_or_else(|e| panic!("acknowledged point {point} does not restore: {e}"));
            assert_same_bytes(&out, copy, file_len(copy));
            std::fs::remove_file(&out).unwrap();
        }
        self.restored = self.points.len();
        let listed: Vec<i64> = pilotlight_receiver::admin::points(dir, Some("s1"))
            .unwrap()
            .iter()
            .map(|p| p.id)
            .collect();
        for (point, _) in &self.points {
            assert!(
                listed.contains(&(*point as i64)),
                "acknowledged point {point} is gone; the receiver lists {listed:?}"
            );
        }
        let v = pilotlight_receiver::verify::verify(dir, None, None, false).unwrap();
        assert!(v.ok, "verify found damage: {:?}", v.damaged);
    }
}

fn setup(root: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let dir = root.join("rcv");
    pilotlight_receiver::admin::init(&dir, Some("127.0.0.1:0")).unwrap();
    let id = root.join("s1.pem");
    pilotlight_receiver::admin::enroll(&dir, "s1", &id).unwrap();
    let img = root.join("s1.img");
    sample_image(&img, 16 * MIB, 42);
    (dir, id, img)
}

/// SIGKILL the receiver at 24 seeded moments of a multi-point transfer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_killed_at_seeded_moments_loses_no_acknowledged_point() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (dir, id, img) = setup(root);
    let state = root.join("state");
    let (mut rx, addr) = spawn_receiver(&dir);
    let listen = addr.to_string();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let (cycle, first) = first_point(&listen, &id, &state, &img, root).await;
    let mut acked = Acked::new(first);

    for round in 0..24 {
        rewrite_quarter(&img, &mut rng);
        let copy = root.join(format!("round{round}"));
        std::fs::copy(&img, &copy).unwrap();
        let agent = spawn_agent(&listen, &id, &state, &img);
        // The fault: SIGKILL at a seeded moment within about one cycle (a
        // moment of the workload, not a wait for anything).
        let delay = cycle.mul_f64(rng.random_range(0.0..1.5));
        tokio::time::sleep(delay).await;
        drop(rx); // SIGKILL and reap
        (rx, _) = spawn_receiver_on(&dir, &listen);
        if let Some(p) = agent_result(agent, Duration::from_secs(60)).await {
            acked.push(p, copy);
        }
        acked.check(&dir, root);
    }
    // A final cycle leaves the receiver equal to the source.
    let p = agent_result(
        spawn_agent(&listen, &id, &state, &img),
        Duration::from_secs(60),
    )
    .await
    .expect("final point");
    acked.push(p, img.clone());
    acked.check(&dir, root);
    assert!(
        acked.len() >= 10,
        "too few rounds completed: {}",
        acked.len()
    );
    drop(rx);
}

/// SIGKILL the agent at 24 seeded moments; a restart with the same state
/// always ends with the receiver equal to the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_at_seeded_moments_resumes_to_an_exact_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (dir, id, img) = setup(root);
    let state = root.join("state");
    let (rx, addr) = spawn_receiver(&dir);
    let listen = addr.to_string();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xa9e47);
    let (cycle, first) = first_point(&listen, &id, &state, &img, root).await;
    let mut acked = Acked::new(first);
    for round in 0..24 {
        rewrite_quarter(&img, &mut rng);
        let mut agent = spawn_agent(&listen, &id, &state, &img);
        // The fault: SIGKILL at a seeded moment within about one cycle (a
        // moment of the workload, not a wait for anything).
        tokio::time::sleep(cycle.mul_f64(rng.random_range(0.0..1.5))).await;
        agent.0.kill().unwrap(); // SIGKILL
        agent.0.wait().unwrap();
        // Restart with the same state: the receiver must end equal to the source.
        let copy = root.join(format!("round{round}"));
        std::fs::copy(&img, &copy).unwrap();
        let p = agent_result(
            spawn_agent(&listen, &id, &state, &img),
            Duration::from_secs(60),
        )
        .await
        .expect("restarted agent makes a point");
        acked.push(p, copy);
        acked.check(&dir, root);
    }
    drop(rx);
}

/// A proxy that forwards agent→receiver bytes, counts them, and once armed
/// cuts every connection after `cut_after` more bytes.
struct CuttingProxy {
    addr: std::net::SocketAddr,
    forwarded: Arc<AtomicU64>,
    cut_at: Arc<AtomicU64>,
    cut_done: Arc<AtomicBool>,
}

impl CuttingProxy {
    async fn start(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let forwarded = Arc::new(AtomicU64::new(0));
        let cut_at = Arc::new(AtomicU64::new(u64::MAX));
        let cut_done = Arc::new(AtomicBool::new(false));
        let cut = tokio_util::sync::CancellationToken::new();
        let (f, c, d) = (forwarded.clone(), cut_at.clone(), cut_done.clone());
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let server = tokio::net::TcpStream::connect(target).await.unwrap();
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let (f, c, d, cut2) = (f.clone(), c.clone(), d.clone(), cut.clone());
                let token = if d.load(Ordering::SeqCst) {
                    tokio_util::sync::CancellationToken::new()
                } else {
                    cut.clone()
                };
                let t2 = token.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = tokio::select! {
                            () = token.cancelled() => break,
                            r = cr.read(&mut buf) => match r { Ok(0) | Err(_) => break, Ok(n) => n },
                        };
                        let total = f.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                        if total >= c.load(Ordering::SeqCst) && !d.swap(true, Ordering::SeqCst) {
                            cut2.cancel();
                            break;
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = tokio::select! {
                            () = t2.cancelled() => break,
                            r = sr.read(&mut buf) => match r { Ok(0) | Err(_) => break, Ok(n) => n },
                        };
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            forwarded,
            cut_at,
            cut_done,
        }
    }
}

/// The connection is cut mid-stream; the agent reconnects and resends only
/// the point that was not yet durable, not what was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connection_resumes_from_the_last_durable_point() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let rcv = TestReceiver::create(root).await;
    let identity = rcv.enroll("s1");
    let proxy = CuttingProxy::start(rcv.addr).await;
    let img = root.join("s1.img");
    sample_image(&img, 32 * MIB, 8);
    let mut cfg = agent_config(
        proxy.addr,
        &identity,
        &root.join("state"),
        &[("root", &img)],
    );
    cfg.once_attempts = 5;
    let first = replicate_once(&cfg).await;
    // 0.5% of the 4 KiB blocks change (about 40 of the 512 blocks of 64 KiB).
    let offsets = overwrite_random_4k(&img, 40, 99);
    let changed = pilotlight::compressed_size_of_blocks(&img, &offsets, 64 * 1024);
    let before = proxy.forwarded.load(Ordering::SeqCst);
    proxy.cut_at.store(before + changed / 2, Ordering::SeqCst);
    let second = replicate_once(&cfg).await;
    assert!(
        proxy.cut_done.load(Ordering::SeqCst),
        "the proxy never cut the connection"
    );
    let sent = proxy.forwarded.load(Ordering::SeqCst) - before;
    let resent = sent - second.wire_bytes;
    // What was re-sent is at most what was not yet acknowledged durable (the
    // second point), and far less than the durable first point.
    assert!(
        second.wire_bytes < 2 * changed,
        "retry sent {} for {changed} changed",
        second.wire_bytes
    );
    assert!(
        resent <= second.wire_bytes + 64 * 1024,
        "re-sent {resent} > unacknowledged {}",
        second.wire_bytes
    );
    assert!(
        sent < first.wire_bytes / 2,
        "sent {sent} after the cut vs initial {}",
        first.wire_bytes
    );
    let out = root.join("out");
    rcv.restore("s1", "root", second.point, &out);
    assert_same_bytes(&out, &img, file_len(&img));
    rcv.stop().await;
}

/// The agent's state is wiped after an initial sync: the next cycle fetches
/// the receiver's hashes and sends only what differs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_agent_state_resyncs_by_checksum() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let rcv = TestReceiver::create(root).await;
    let identity = rcv.enroll("s1");
    let img = root.join("s1.img");
    sample_image(&img, 64 * MIB, 21);
    let state = root.join("state");
    let cfg = agent_config(rcv.addr, &identity, &state, &[("root", &img)]);
    replicate_once(&cfg).await;
    // 1% of the volume's 64 KiB blocks change.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::options().write(true).open(&img).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut buf = vec![0u8; 64 * 1024];
        for _ in 0..10 {
            rng.fill_bytes(&mut buf);
            f.write_all_at(&buf, rng.random_range(0..1024u64) * 64 * 1024)
                .unwrap();
        }
    }
    std::fs::remove_dir_all(&state).unwrap();
    let second = replicate_once(&cfg).await;
    assert!(
        second.wire_bytes < 64 * MIB / 20,
        "sent {} bytes (over 5% of the volume) after the state was wiped",
        second.wire_bytes
    );
    let out = root.join("out");
    rcv.restore("s1", "root", second.point, &out);
    assert_same_bytes(&out, &img, file_len(&img));
    rcv.stop().await;
}
