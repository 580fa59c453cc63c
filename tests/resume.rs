//! Resumable initial sync (issue 15): an initial sync killed with -9 (the
//! agent's or the receiver's process) continues from its last checkpoint.
//! Real binaries, real TLS on 127.0.0.1; the send rate is capped so that
//! the kills land mid-sync, at moments read from the agent's status file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod peer;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use pilotlight::{
    assert_same_bytes, bin, restore_point, run_bin, scrape_metrics, ChildGuard, Deadline,
};
use rand::{RngCore, SeedableRng};

const MIB: u64 = 1 << 20;
/// The image: incompressible, so that bytes sent are bytes of data.
const SIZE: u64 = 16 * MIB;
/// A checkpoint every 2 MiB sent (test-only: the default is 1 GiB or 30
/// s); the sync is read in parts of 1 MiB, and the status first shows
/// progress after the first part, before the first checkpoint.
const CHECKPOINT_MIB: &str = "2";
/// 16 Mbit/s: the sync takes about 8 s.
const LIMIT_MBPS: &str = "16";

/// What a resumed sync may receive in all: the data, plus 15% of it or
/// what is not yet checkpointed at a kill (a checkpoint's worth, the part
/// being read, the one in flight), whichever is more.
fn allowed() -> u64 {
    SIZE + (SIZE * 15 / 100).max(3 * MIB)
}

struct Rig {
    _tmp: tempfile::TempDir,
    rcv: PathBuf,
    identity: PathBuf,
    state: PathBuf,
    img: PathBuf,
}

fn rig(seed: u64) -> Rig {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_owned();
    let rcv = root.join("receiver");
    pilotlight_receiver::admin::init(&rcv, Some("127.0.0.1:0")).unwrap();
    let identity = root.join("web1.pem");
    pilotlight_receiver::admin::enroll(&rcv, "web1", &identity).unwrap();
    let img = root.join("web1.img");
    let mut data = vec![0u8; SIZE as usize];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    std::fs::write(&img, &data).unwrap();
    Rig {
        _tmp: tmp,
        rcv,
        identity,
        state: root.join("state"),
        img,
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// `pilotlight-receiver serve` with metrics on `metrics`.
fn spawn_receiver(dir: &Path, listen: &str, metrics: u16) -> (ChildGuard, SocketAddr) {
    use std::io::BufRead;
    let mut child = Command::new(bin("pilotlight-receiver"))
        .args(["serve", "--listen", listen, "--print-addr"])
        .args(["--metrics", &format!("127.0.0.1:{metrics}"), "--dir"])
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let guard = ChildGuard(child);
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    (guard, line.trim().parse().unwrap())
}

/// The agent, rate-capped, checkpointing every 2 MiB; with `once`, it makes
/// one point and exits, otherwise it serves metrics on `metrics`.
fn spawn_agent(r: &Rig, addr: SocketAddr, once: bool, metrics: u16) -> ChildGuard {
    let mut cmd = Command::new(bin("pilotlight-agent"));
    cmd.args(["run", "--receiver", &addr.to_string(), "--identity"])
        .arg(&r.identity)
        .arg("--state")
        .arg(&r.state)
        .arg("--volume")
        .arg(format!("root={}", r.img.display()))
        .args([
            "--limit-mbps",
            LIMIT_MBPS,
            "--checkpoint-mib",
            CHECKPOINT_MIB,
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if once {
        cmd.arg("--once");
    } else {
        cmd.args([
            "--interval",
            "1h",
            "--metrics",
            &format!("127.0.0.1:{metrics}"),
        ]);
    }
    ChildGuard(cmd.spawn().unwrap())
}

/// The agent's status file, once it is there and whole.
fn status(state: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(state.join("status.json")).ok()?).ok()
}

/// Wait until the agent's status shows the sync at `at` bytes or more.
async fn wait_progress(state: &Path, at: u64) {
    let deadline = Deadline::after(Duration::from_secs(60)).every(Duration::from_millis(20));
    loop {
        let done = status(state).and_then(|s| s["sync"]["done_bytes"].as_u64());
        if done.is_some_and(|d| d >= at) {
            let total = status(state).and_then(|s| s["sync"]["total_bytes"].as_u64());
            assert_eq!(total, Some(SIZE));
            return;
        }
        deadline
            .next(|| format!("the sync did not reach {at} bytes (status: {done:?})"))
            .await;
    }
}

/// The value of counter `name` on a metrics endpoint.
fn counter(port: u16, name: &str) -> Option<f64> {
    let text = scrape_metrics(port)?;
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn kill(mut child: ChildGuard) {
    child.0.kill().unwrap();
    child.0.wait().unwrap();
}

/// Restore point `point` and compare it with the image.
fn assert_restores(r: &Rig, point: u64) {
    let out = r.rcv.parent().unwrap().join("restored.img");
    restore_point(&r.rcv, "web1", "root", point, &out);
    assert_same_bytes(&r.img, &out, SIZE);
}

/// While the agent is dead: `status` shows the sync's progress, `points`
/// lists it as in progress and restore --point refuses it with a sentence
/// that says so.
fn assert_in_progress_not_restorable(r: &Rig) {
    let out = run_bin(
        "pilotlight-receiver",
        &["status", "--json", "--dir", r.rcv.to_str().unwrap()],
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sync = &status[0]["sync"];
    assert_eq!(sync["total_bytes"].as_u64(), Some(SIZE), "{status}");
    assert!(sync["done_bytes"].as_u64().unwrap() > 0, "{status}");
    let out = run_bin(
        "pilotlight-receiver",
        &["points", "--dir", r.rcv.to_str().unwrap()],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("web1") && l.contains("in progress") && l.trim().starts_with('1')),
        "points: {text}"
    );
    let to = r.rcv.parent().unwrap().join("never.img");
    let out = run_bin(
        "pilotlight-receiver",
        &[
            "restore",
            "--dir",
            r.rcv.to_str().unwrap(),
            "--server",
            "web1",
            "--volume",
            "root",
            "--point",
            "1",
            "--to",
            to.to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "restore of a sync in progress succeeded"
    );
    assert!(err.contains("sync in progress"), "restore said: {err}");
    assert!(!to.exists());
}

/// kill -9 of the agent before its first checkpoint, after one, after
/// several: the restarted agent completes the point byte-exact, and the
/// receiver got little more than the data in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_sync_resumes_from_its_last_checkpoint() {
    for (seed, at) in [(1, 1), (2, 4 * MIB), (3, 13 * MIB)] {
        let r = rig(seed);
        let rport = free_port();
        let (_rcv, addr) = spawn_receiver(&r.rcv, "127.0.0.1:0", rport);
        let agent = spawn_agent(&r, addr, true, 0);
        wait_progress(&r.state, at).await;
        kill(agent);
        if at > MIB {
            assert_in_progress_not_restorable(&r);
        }
        let mut agent = spawn_agent(&r, addr, true, 0);
        let deadline = Deadline::after(Duration::from_secs(90));
        let code = loop {
            if let Some(code) = agent.0.try_wait().unwrap() {
                break code;
            }
            deadline
                .next(|| "the restarted agent did not finish".into())
                .await;
        };
        assert!(code.success(), "restarted agent failed ({code})");
        let mut point = String::new();
        std::io::Read::read_to_string(agent.0.stdout.as_mut().unwrap(), &mut point).unwrap();
        assert_eq!(point.trim(), "1", "killed at {at}");
        let received = counter(rport, "pilotlight_receiver_bytes_received_total").unwrap();
        eprintln!("killed at {at}: received {received} bytes in all for {SIZE}");
        assert!(
            received as u64 <= allowed(),
            "killed at {at}: the receiver got {received} bytes in all for {SIZE} of data"
        );
        assert_restores(&r, 1);
    }
}

/// kill -9 of the receiver mid-sync: the agent reconnects to the restarted
/// receiver, which holds the last checkpoint, and continues from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_killed_mid_sync_the_agent_continues_from_the_checkpoint() {
    let r = rig(7);
    let (rcv, addr) = spawn_receiver(&r.rcv, "127.0.0.1:0", free_port());
    let aport = free_port();
    let _agent = spawn_agent(&r, addr, false, aport);
    wait_progress(&r.state, 9 * MIB).await;
    kill(rcv);
    assert_in_progress_not_restorable(&r);
    let (_rcv, _) = spawn_receiver(&r.rcv, &addr.to_string(), free_port());
    let deadline = Deadline::after(Duration::from_secs(90)).every(Duration::from_millis(50));
    while status(&r.state).and_then(|s| s["last_point"].as_u64()) != Some(1) {
        deadline
            .next(|| "the agent made no point after the receiver came back".into())
            .await;
    }
    let sent = counter(aport, "pilotlight_agent_bytes_compressed_total").unwrap();
    eprintln!("receiver killed: the agent sent {sent} bytes in all for {SIZE}");
    assert!(
        sent as u64 <= allowed(),
        "the agent compressed and sent {sent} bytes in all for {SIZE} of data"
    );
    assert!(status(&r.state).unwrap().get("sync").is_none());
    assert_restores(&r, 1);
}

/// A connection from an agent built before checkpoints: its Hello does not
/// advertise them.
async fn old_agent_conn(addr: SocketAddr, identity: &Path) -> peer::Conn {
    use futures_util::{SinkExt, StreamExt};
    use pilotlight_protocol::limits::{FEATURE_PING, VERSION};
    let tls = peer::tls_connect(addr, identity).await.unwrap();
    let mut c =
        tokio_util::codec::Framed::new(tls, pilotlight_protocol::codec::FrameCodec::default());
    c.send(&pilotlight_protocol::Frame::Hello {
        version: VERSION,
        features: FEATURE_PING,
    })
    .await
    .unwrap();
    assert!(matches!(
        c.next().await.unwrap().unwrap().1,
        pilotlight_protocol::Frame::Hello { .. }
    ));
    c
}

/// An agent without checkpoints against a receiver holding a stale sync of
/// its server (left by a newer agent that died): it is sent none of the new
/// frames, its point commits as before, and the sync is dropped, not taken
/// into the point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_agent_commits_as_before_and_a_stale_sync_is_dropped() {
    use futures_util::{SinkExt, StreamExt};
    use pilotlight_protocol::frame::{CommitMode, Consistency, VolumeDecl};
    use pilotlight_protocol::Frame;
    let tmp = tempfile::tempdir().unwrap();
    let rcv = pilotlight::TestReceiver::create(tmp.path()).await;
    let id = rcv.enroll("web1");
    // A newer agent checkpoints two blocks of its initial sync, then dies.
    let (mut control, mut data, _) = peer::session(rcv.addr, &id).await;
    for i in 0..2 {
        data.send(&Frame::Block(peer::block(1, i, &[9u8; 65536])))
            .await
            .unwrap();
    }
    control
        .send(&Frame::Checkpoint {
            tag: 1,
            blocks: 2,
            done: 2 << 16,
            total: 1 << 20,
        })
        .await
        .unwrap();
    assert!(matches!(
        control.next().await.unwrap().unwrap().1,
        Frame::Checkpointed { tag: 1, .. }
    ));
    drop((control, data));
    let dir = rcv.dir.clone();
    wait_until_syncs(&dir, 1).await;

    // The old agent: Open, one block, EndPoint.
    let mut control = old_agent_conn(rcv.addr, &id).await;
    control
        .send(&Frame::Open {
            streams: 1,
            commit: CommitMode::Sync,
            volumes: vec![VolumeDecl {
                name: "root".into(),
                size: 1 << 20,
                block_size: 65536,
            }],
        })
        .await
        .unwrap();
    let session = match control.next().await.unwrap().unwrap().1 {
        Frame::Welcome { session, .. } => session,
        other => panic!("expected Welcome, got {other:?}"),
    };
    let mut data = old_agent_conn(rcv.addr, &id).await;
    data.send(&Frame::Join { session }).await.unwrap();
    assert_eq!(data.next().await.unwrap().unwrap().1, Frame::Joined);
    data.send(&Frame::Block(peer::block(1, 5, &[5u8; 65536])))
        .await
        .unwrap();
    control
        .send(&Frame::EndPoint {
            tag: 1,
            blocks: 1,
            created_ms: 1,
            consistency: Consistency::Fuzzy,
            commit: CommitMode::Sync,
        })
        .await
        .unwrap();
    assert_eq!(
        control.next().await.unwrap().unwrap().1,
        Frame::Durable { tag: 1, point: 1 }
    );
    wait_until_syncs(&dir, 0).await;
    // Block 5 of the point, and none of the stale sync's blocks.
    let out = tmp.path().join("restored.img");
    restore_point(&dir, "web1", "root", 1, &out);
    let restored = std::fs::read(&out).unwrap();
    assert!(restored[..5 << 16].iter().all(|&b| b == 0));
    assert!(restored[5 << 16..6 << 16].iter().all(|&b| b == 5));
    control.send(&Frame::Goodbye).await.unwrap();
}

/// Wait until the receiver directory holds `n` syncs in progress.
async fn wait_until_syncs(dir: &Path, n: usize) {
    let deadline = Deadline::after(Duration::from_secs(10)).every(Duration::from_millis(20));
    loop {
        let got = pilotlight_receiver::admin::syncs(dir, None).unwrap().len();
        if got == n {
            return;
        }
        deadline
            .next(|| format!("{got} syncs in progress, not {n}"))
            .await;
    }
}
