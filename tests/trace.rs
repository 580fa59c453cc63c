//! Live tracking with block tracepoints (`--track trace`) on real loop
//! devices: fio on ext4 with freeze consistency, lost events forcing a
//! rescan, and restarts with and without writes in between. Every point
//! checked is restored and compared (byte for byte, or by e2fsck and fio's
//! own verify). They need root, loop devices, tracefs and fio, so they are
//! `#[ignore]`d with that reason; run with `--include-ignored` (as `.ci/run`
//! does), they fail, saying what is missing, where something is.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use pilotlight::tracing_agent::{require_tracing, TracingAgent as Agent};
use pilotlight::{
    assert_same_bytes, require_tools, restore_point_cli, run_bin, spawn_receiver, ChildGuard,
    Deadline, LoopDevice, SmallFs,
};
use pilotlight_agent::status::State;
use pilotlight_protocol::clock::now_ms;

const MIB: u64 = 1 << 20;

fn enroll(dir: &Path, server: &str) -> PathBuf {
    let out = dir.parent().unwrap().join(format!("{server}.pem"));
    let o = run_bin(
        "pilotlight-receiver",
        &[
            "enroll",
            "--dir",
            dir.to_str().unwrap(),
            "--server",
            server,
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success());
    out
}

fn receiver(root: &Path) -> (PathBuf, ChildGuard, String) {
    let dir = root.join("receiver");
    let o = run_bin(
        "pilotlight-receiver",
        &[
            "init",
            "--dir",
            dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
    );
    assert!(o.status.success());
    let (child, addr) = spawn_receiver(&dir);
    (dir, child, addr.to_string())
}

fn point_consistency(dir: &Path, point: u64) -> String {
    let o = run_bin(
        "pilotlight-receiver",
        &["points", "--dir", dir.to_str().unwrap(), "--json"],
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"].as_u64() == Some(point))
        .map(|p| p["consistency"].as_str().unwrap().to_owned())
        .unwrap_or_else(|| panic!("no point {point}"))
}

/// Compare a restored image with the device, reading the device afresh
/// (its page cache dropped first).
fn assert_device_equals(restored: &Path, dev: &Path, len: u64) {
    let ok = Command::new("blockdev")
        .arg("--flushbufs")
        .arg(dev)
        .status()
        .unwrap();
    assert!(ok.success());
    assert_same_bytes(restored, dev, len);
}

/// A loop device over a zeroed image of some size, and a receiver (the real
/// binary) with one server enrolled, all under one temporary directory.
struct RawDisk {
    dev: LoopDevice,
    size: u64,
    server: String,
    dir: PathBuf,
    rcv: Option<ChildGuard>,
    addr: String,
    id: PathBuf,
    // Last: removed once the loop device is detached.
    tmp: tempfile::TempDir,
}

impl RawDisk {
    fn new(size: u64, server: &str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("disk.img");
        std::fs::File::create(&img).unwrap().set_len(size).unwrap();
        let dev = LoopDevice::attach(&img);
        let (dir, rcv, addr) = receiver(tmp.path());
        let id = enroll(&dir, server);
        Self {
            dev,
            size,
            server: server.to_owned(),
            dir,
            rcv: Some(rcv),
            addr,
            id,
            tmp,
        }
    }

    /// An agent replicating this disk, its state beside it.
    fn agent(&self, extra: &[&str]) -> Agent {
        Agent::start(
            &self.addr,
            &self.id,
            &self.tmp.path().join("state"),
            &self.dev.path,
            extra,
        )
    }

    /// Restore `point` of this disk and compare it with the device.
    fn assert_point_is_device(&self, point: u64) {
        let out = self.tmp.path().join("restored.img");
        restore_point_cli(&self.dir, &self.server, "root", point, &out);
        assert_device_equals(&out, &self.dev.path, self.size);
    }
}

/// Write `count` random 4 KiB blocks at random offsets of `dev` (O_DIRECT,
/// through the block layer like any writer).
fn random_writes(dev: &Path, count: u32, seed: u64) {
    let size = std::fs::File::open(dev)
        .and_then(|mut f| std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)))
        .unwrap();
    let o = Command::new("fio")
        .args([
            "--name=burst",
            "--rw=randwrite",
            "--bs=4k",
            "--direct=1",
            "--ioengine=libaio",
            "--iodepth=16",
            &format!("--number_ios={count}"),
            &format!("--size={size}"),
            &format!("--randseed={seed}"),
            "--randrepeat=0",
            "--norandommap",
            "--output-format=terse",
        ])
        .arg(format!("--filename={}", dev.display()))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "fio: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// ext4 on a loop device (its image under `root/src`).
fn ext4(root: &Path, size: u64) -> SmallFs {
    let src_root = root.join("src");
    std::fs::create_dir_all(&src_root).unwrap();
    SmallFs::create_with(&src_root, size, &["mkfs.ext4", "-q", "-F"])
}

/// fio with verify headers on ext4 while the agent replicates in trace mode
/// with freeze consistency: a point taken mid-run restores to a filesystem
/// e2fsck accepts, and the final point's files pass fio's verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: loop devices, tracefs, mkfs.ext4, e2fsck, fsfreeze and fio"]
async fn fio_on_ext4_points_are_consistent() {
    fio_on_ext4("4096").await;
}

/// The same with the default 64 KiB blocks: fio's 4 KiB writes go as
/// partial blocks, through pre-copy rounds and the frozen capture.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: loop devices, tracefs, mkfs.ext4, e2fsck, fsfreeze and fio"]
async fn fio_on_ext4_points_of_partial_blocks_are_consistent() {
    fio_on_ext4("65536").await;
}

async fn fio_on_ext4(block_size: &str) {
    require_tracing();
    require_tools(&["fio", "e2fsck", "fsfreeze"]);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let fs = ext4(root, 256 * MIB);
    let target_img = root.join("target.img");
    std::fs::File::create(&target_img)
        .unwrap()
        .set_len(256 * MIB)
        .unwrap();
    let target = LoopDevice::attach(&target_img);
    let (dir, _rcv, addr) = receiver(root);
    let id = enroll(&dir, "fs1");
    let freeze = format!("freeze:{}", fs.mount.display());
    let mut agent = Agent::start(
        &addr,
        &id,
        &root.join("state"),
        fs.device(),
        &[
            "--consistency",
            &freeze,
            "--interval",
            "1s",
            "--block-size",
            block_size,
        ],
    );
    agent.initial_sync().await;

    let fio_args = |dir: &Path| -> Vec<String> {
        vec![
            "--name=pl".into(),
            format!("--directory={}", dir.display()),
            "--rw=randwrite".into(),
            "--bs=4k".into(),
            "--size=48M".into(),
            "--nrfiles=4".into(),
            "--ioengine=psync".into(),
            "--verify=crc32c".into(),
            "--rate=6m".into(),
            "--fsync=64".into(),
            // The data is on the device (and so traced) when fio exits.
            "--end_fsync=1".into(),
            "--output-format=terse".into(),
        ]
    };
    let fio_start = now_ms();
    // fio runs in the test's directory: it leaves its verify state file
    // (`local-pl-0-verify.state`) in its working directory.
    let mut fio = ChildGuard(
        Command::new("fio")
            .current_dir(root)
            .args(fio_args(&fs.mount))
            .arg("--do_verify=0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // A consistent point taken while fio writes.
    let mid = agent
        .wait(60, "a point while fio writes", |s| {
            s.last_point_ms.is_some_and(|t| t > fio_start + 1500)
        })
        .await;
    assert!(
        fio.0.try_wait().unwrap().is_none(),
        "fio finished before a point was taken mid-run"
    );
    let mid_point = mid.last_point.unwrap();
    let fio_status = fio.0.wait().unwrap();
    assert!(fio_status.success(), "fio failed");
    let fio_end = now_ms();
    let last = agent.caught_up(fio_end).await;
    let st = agent.status().unwrap();
    let tracking = st.tracking.clone().unwrap();
    eprintln!(
        "freeze: last {:?} ms, longest {:?} ms; rescans {}; {} partial blocks, {:?} read per written",
        tracking.last_freeze_ms,
        tracking.max_freeze_ms,
        tracking.rescans,
        tracking.partial_blocks_total,
        tracking.read_per_written
    );
    if block_size != "4096" {
        assert!(
            tracking.partial_blocks_total > 0,
            "no partial block was sent"
        );
    }
    assert!(tracking.max_freeze_ms.is_some(), "no freeze was reported");
    for line in agent.log().lines().filter(|l| l.contains("thawed")) {
        eprintln!("{line}");
    }
    agent.stop().await;

    assert_eq!(point_consistency(&dir, mid_point), "crash-consistent");
    assert_eq!(point_consistency(&dir, last), "crash-consistent");
    let check = |point: u64, verify: bool| {
        restore_point_cli(&dir, "fs1", "root", point, &target.path);
        let fsck = Command::new("e2fsck")
            .arg("-fy")
            .arg(&target.path)
            .output()
            .unwrap();
        let code = fsck.status.code().unwrap_or(-1);
        assert!(
            code == 0 || code == 1,
            "e2fsck of point {point} exited {code}: {}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        let mnt = root.join(format!("check-{point}"));
        std::fs::create_dir_all(&mnt).unwrap();
        let ok = Command::new("mount")
            .arg(&target.path)
            .arg(&mnt)
            .status()
            .unwrap();
        assert!(ok.success(), "point {point} does not mount");
        let verified = if verify {
            let o = Command::new("fio")
                .current_dir(root)
                .args(fio_args(&mnt))
                .arg("--verify_only")
                .output()
                .unwrap();
            Some(o)
        } else {
            None
        };
        let _ = Command::new("umount").arg(&mnt).status();
        if let Some(o) = verified {
            assert!(
                o.status.success(),
                "fio verify of point {point}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    };
    check(mid_point, false);
    check(last, true);
}

/// A tiny trace buffer and a burst of writes lose events; the agent says
/// `rescan`, scans in full, and its next point equals the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: loop devices, tracefs and fio"]
async fn lost_events_force_a_rescan() {
    require_tracing();
    require_tools(&["fio"]);
    let disk = RawDisk::new(64 * MIB, "burst");
    let dev = &disk.dev;
    let mut agent = disk.agent(&["--trace-buffer-kb", "4", "--interval", "1s"]);
    let first = agent.initial_sync().await;
    let rescans = first.tracking.unwrap().rescans;

    // The burst runs in the background while the status is watched every
    // few milliseconds: it says `rescan` while a full scan runs, and the
    // counters keep the reason.
    let burst_dev = dev.path.clone();
    let burst = std::thread::spawn(move || random_writes(&burst_dev, 20_000, 1));
    let mut states = std::collections::BTreeSet::new();
    // Looked at every 2 ms: `rescan` may last only a moment.
    let deadline = Deadline::after(Duration::from_secs(60)).every(Duration::from_millis(2));
    loop {
        if let Some(s) = agent.status() {
            states.insert(s.state);
            let rescanned = s.tracking.as_ref().is_some_and(|t| {
                t.rescans > rescans
                    && t.last_rescan_reason
                        .as_deref()
                        .is_some_and(|r| r.contains("lost"))
            });
            if rescanned && states.contains(&State::Rescan) && burst.is_finished() {
                break;
            }
        }
        deadline
            .next(|| {
                format!(
                    "no rescan seen; states {states:?}, status {:?}\n{}",
                    agent.status(),
                    agent.log()
                )
            })
            .await;
    }
    burst.join().unwrap();
    eprintln!("states seen during the burst: {states:?}");
    let done = now_ms();
    let point = agent.caught_up(done).await;
    disk.assert_point_is_device(point);
    let log = agent.log();
    assert!(log.contains("trace events were lost"), "{log}");
    agent.stop().await;
}

/// A clean stop saves the dirty set: a restart with the device untouched
/// needs no rescan, and later writes replicate exactly. Writes while the
/// agent is stopped make the next start rescan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: loop devices, tracefs and fio"]
async fn restarts_rescan_only_when_needed() {
    require_tracing();
    require_tools(&["fio"]);
    let disk = RawDisk::new(32 * MIB, "rs");
    let (root, dev) = (disk.tmp.path(), &disk.dev);
    let state = root.join("state");

    let mut agent = disk.agent(&[]);
    agent.initial_sync().await;
    random_writes(&dev.path, 200, 2);
    let p = agent.caught_up(now_ms()).await;
    disk.assert_point_is_device(p);
    agent.stop().await;
    assert!(state.join(pilotlight_agent::trace::DIRTY_FILE).exists());

    // Untouched in between: no rescan.
    let started = now_ms();
    let mut agent = disk.agent(&[]);
    agent
        .wait(60, "tracking to start", |s| {
            s.collected_ms.is_some_and(|c| c > started)
        })
        .await;
    random_writes(&dev.path, 200, 3);
    let p = agent.caught_up(now_ms()).await;
    let st = agent.status().unwrap();
    assert_eq!(st.tracking.unwrap().rescans, 0, "a clean restart rescanned");
    disk.assert_point_is_device(p);
    agent.stop().await;

    // Written while stopped: the start rescans, and the point is exact.
    random_writes(&dev.path, 50, 4);
    let mut agent = disk.agent(&[]);
    let p = agent.caught_up(now_ms()).await;
    let t = agent.status().unwrap().tracking.unwrap();
    assert_eq!(t.rescans, 1);
    assert!(
        t.last_rescan_reason
            .as_deref()
            .unwrap()
            .contains("while the agent was stopped"),
        "{t:?}"
    );
    disk.assert_point_is_device(p);

    // kill -9: no saved set, so the next start rescans too.
    drop(agent);
    assert!(!state.join(pilotlight_agent::trace::DIRTY_FILE).exists());
    let mut agent = disk.agent(&[]);
    let p = agent.caught_up(now_ms()).await;
    assert_eq!(agent.status().unwrap().tracking.unwrap().rescans, 1);
    disk.assert_point_is_device(p);
    agent.stop().await;
}

/// `--track trace` on an image file is a configuration error, said once.
#[test]
fn trace_needs_a_block_device() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("f.img");
    std::fs::File::create(&img).unwrap().set_len(MIB).unwrap();
    let o = run_bin(
        "pilotlight-agent",
        &[
            "run",
            "--once",
            "--receiver",
            "127.0.0.1:1",
            "--identity",
            "/nonexistent.pem",
            "--state",
            tmp.path().join("st").to_str().unwrap(),
            "--volume",
            &format!("root={}", img.display()),
            "--track",
            "trace",
        ],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("needs a block device"), "{err}");
}

/// The receiver goes away (kill -9) while the device is written, and comes
/// back on the same port: the agent says `disconnected` with a growing lag,
/// reconnects by itself, and its next point equals the device: blocks of
/// points that never became durable are read again, not forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: loop devices, tracefs and fio"]
async fn keeps_going_through_a_receiver_outage() {
    require_tracing();
    require_tools(&["fio"]);
    let mut disk = RawDisk::new(32 * MIB, "out");
    let (dev, dir, addr) = (&disk.dev, &disk.dir, &disk.addr);
    let mut agent = disk.agent(&[]);
    agent.initial_sync().await;
    random_writes(&dev.path, 300, 5);
    drop(disk.rcv.take());
    random_writes(&dev.path, 300, 6);
    agent
        .wait(60, "the agent to notice", |s| {
            s.state == State::Disconnected && s.lag_seconds.is_some_and(|l| l > 0.0)
        })
        .await;
    random_writes(&dev.path, 300, 7);
    let (_rcv, _) = pilotlight::spawn_receiver_on(dir, addr);
    let p = agent.caught_up(now_ms()).await;
    disk.assert_point_is_device(p);
    agent.stop().await;
}

/// The receiver stops answering but keeps its connections (SIGSTOP): once
/// the point sent has waited `--stall-after` for its ack, the status says
/// `stalled`; when the receiver resumes, the point becomes durable, the
/// status says `continuous` again and the point equals the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: loop devices, tracefs and fio"]
async fn says_stalled_while_acks_do_not_come() {
    require_tracing();
    require_tools(&["fio"]);
    let disk = RawDisk::new(32 * MIB, "stall");
    let dev = &disk.dev;
    let mut agent = disk.agent(&["--stall-after", "2s"]);
    let first = agent.initial_sync().await.last_point;
    let rcv = disk.rcv.as_ref().unwrap().0.id().to_string();
    let signal = |sig: &str, pid: &str| {
        Command::new("kill")
            .args([sig, pid])
            .status()
            .is_ok_and(|s| s.success())
    };
    assert!(signal("-STOP", &rcv));
    // Resumed whatever happens, so that the guard can stop it.
    struct Resume<F: Fn(&str, &str) -> bool>(String, F);
    impl<F: Fn(&str, &str) -> bool> Drop for Resume<F> {
        fn drop(&mut self) {
            (self.1)("-CONT", &self.0);
        }
    }
    let resume = Resume(rcv, signal);
    random_writes(&dev.path, 200, 11);
    let stalled = agent
        .wait(30, "the status to say stalled", |s| {
            s.state == State::Stalled
        })
        .await;
    assert!(stalled.pending_points > 0, "{stalled:?}");
    assert_eq!(
        stalled.last_point, first,
        "no point can be durable meanwhile"
    );
    drop(resume);
    let p = agent.caught_up(now_ms()).await;
    assert!(p > first.unwrap());
    agent
        .wait(30, "the status to say continuous again", |s| {
            s.state == State::Continuous
        })
        .await;
    disk.assert_point_is_device(p);
    agent.stop().await;
}

/// The agent's state directory on the very filesystem it freezes: nothing
/// is written there while it is frozen (that would wait for the thaw
/// forever), points keep coming, each holding the writes made before it,
/// and once nothing is written the agent makes no more points: its own
/// status updates go to the runtime directory, not to the volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: loop devices, tracefs, mkfs.ext4 and fsfreeze"]
async fn state_on_the_frozen_filesystem() {
    require_tracing();
    require_tools(&["fsfreeze"]);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let fs = ext4(root, 64 * MIB);
    let (dir, _rcv, addr) = receiver(root);
    let id = enroll(&dir, "self");
    let freeze = format!("freeze:{}", fs.mount.display());
    // The log goes elsewhere: lines appended to a file on the volume at
    // every point are changes to replicate, and would make the next one.
    let mut agent = Agent::start_logging_to(
        &addr,
        &id,
        &fs.mount.join("agent-state"),
        fs.device(),
        &["--consistency", &freeze],
        &root.join("agent.log"),
    );
    let _thaw = Thaw(fs.mount.clone());
    agent.initial_sync().await;
    let first = agent.status().unwrap().last_point.unwrap();
    for i in 0..3u8 {
        // Written from a thread: a filesystem left frozen would block it.
        let path = fs.mount.join(format!("f{i}"));
        let writer = std::thread::spawn(move || {
            std::fs::write(&path, vec![i; 1 << 20]).unwrap();
            std::fs::File::open(&path).unwrap().sync_all().unwrap();
        });
        let deadline = Deadline::after(Duration::from_secs(30));
        while !writer.is_finished() {
            deadline
                .next(|| {
                    format!(
                        "a write to the filesystem hangs: it was left frozen\n{}",
                        agent.log()
                    )
                })
                .await;
        }
        writer.join().unwrap();
        let done = now_ms();
        agent
            .wait(60, "a point after the write", |s| {
                s.last_point_ms.is_some_and(|t| t > done)
            })
            .await;
    }
    let st = agent.status().unwrap();
    assert!(st.last_point.unwrap() > first);
    assert_eq!(
        point_consistency(&dir, st.last_point.unwrap()),
        "crash-consistent"
    );
    assert!(st.tracking.unwrap().max_freeze_ms.is_some());
    let link = std::fs::read_link(fs.mount.join("agent-state/status.json")).unwrap();
    assert!(link.starts_with("/run/pilotlight"), "{}", link.display());
    // The runtime status outlives the agent (so that `status` reads it after
    // a stop); this test's goes with the test.
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _runtime = Remove(link.parent().unwrap().to_owned());
    // Idle: once the writes' own trailing metadata (the journal commits
    // within ext4's 5 s) is replicated, the agent brings in 8 s of trace
    // events (with a status update every second) and makes no point.
    let settle = now_ms() + 6000;
    agent
        .wait(60, "the writes to settle", |s| {
            s.collected_ms.is_some_and(|c| c > settle) && s.pending_points == 0
        })
        .await;
    let idle = agent.status().unwrap().last_point;
    let quiet_from = now_ms();
    agent
        .wait(60, "8 s of trace events collected", |s| {
            s.collected_ms.is_some_and(|c| c > quiet_from + 8000)
        })
        .await;
    assert_eq!(
        agent.status().unwrap().last_point,
        idle,
        "points made while nothing was written\n{}",
        agent.log()
    );
    agent.stop().await;
}

/// Thaws a filesystem on drop, whatever a test left (dropped before the
/// agent, which could not exit while blocked on it).
struct Thaw(PathBuf);

impl Drop for Thaw {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze")
            .arg("-u")
            .arg(&self.0)
            .stderr(Stdio::null())
            .status();
    }
}

/// Write `len` bytes to `path` and fsync, from a thread; panics unless it
/// completes within `within` (a frozen filesystem blocks it).
async fn write_within(path: PathBuf, len: usize, within: Duration, why: impl Fn() -> String) {
    let start = std::time::Instant::now();
    let writer = std::thread::spawn(move || {
        std::fs::write(&path, vec![7u8; len]).unwrap();
        std::fs::File::open(&path).unwrap().sync_all().unwrap();
    });
    let deadline = Deadline::after(within);
    while !writer.is_finished() {
        deadline
            .next(|| format!("a write blocked for {:?}: {}", start.elapsed(), why()))
            .await;
    }
    writer.join().unwrap();
}

/// Remove the tracing instances a killed agent left behind.
fn remove_instances_of(pid: u32) {
    for e in std::fs::read_dir("/sys/kernel/tracing/instances").unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("pilotlight-{pid}-")) {
            let _ = std::fs::remove_dir(Path::new("/sys/kernel/tracing/instances").join(name));
        }
    }
}

/// The debug-build knob that makes the agent hold each freeze until the
/// watchdog ends it, as a stalled agent would.
const HOLD_FREEZE: &[(&str, &str)] = &[("PILOTLIGHT_TEST_HOLD_FREEZE", "1")];

/// A live-tracking agent that freezes an ext4 mount on a loop device for
/// its points (`--consistency freeze:MOUNT` and `extra`, environment
/// `env`), replicating to a receiver (the real binary) with `server`
/// enrolled; the initial sync done. Fields drop in order: the mount is
/// thawed before the agent is killed, which could not exit while blocked
/// on it.
struct Freezing {
    _thaw: Thaw,
    agent: Agent,
    fs: SmallFs,
    dir: PathBuf,
    rcv: ChildGuard,
    _tmp: tempfile::TempDir,
}

impl Freezing {
    async fn start(server: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        require_tracing();
        require_tools(&["fsfreeze"]);
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let fs = ext4(root, 64 * MIB);
        let (dir, rcv, addr) = receiver(root);
        let id = enroll(&dir, server);
        let freeze = format!("freeze:{}", fs.mount.display());
        let args = [&["--consistency", freeze.as_str()][..], extra].concat();
        let mut agent = Agent::start_with_env(
            &addr,
            &id,
            &root.join("state"),
            fs.device(),
            &args,
            &root.join("agent.log"),
            env,
        );
        let thaw = Thaw(fs.mount.clone());
        agent.initial_sync().await;
        Self {
            _thaw: thaw,
            agent,
            fs,
            dir,
            rcv,
            _tmp: tmp,
        }
    }
}

/// A freeze the agent holds (the debug-build knob
/// `PILOTLIGHT_TEST_HOLD_FREEZE`, as a stalled agent would) is thawed by
/// the watchdog at `--freeze-limit`: writes to the mount complete within
/// the limit (plus a margin), no freeze lasts much longer than the limit,
/// and those points are labelled fuzzy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: loop devices, tracefs, mkfs.ext4 and fsfreeze"]
async fn the_watchdog_thaws_a_freeze_at_its_limit() {
    let mut held = Freezing::start("held", &["--freeze-limit", "1s"], HOLD_FREEZE).await;
    let (agent, fs, dir) = (&mut held.agent, &held.fs, &held.dir);
    for i in 0..3 {
        write_within(
            fs.mount.join(format!("f{i}")),
            256 << 10,
            Duration::from_secs(4),
            || agent.log(),
        )
        .await;
        let done = now_ms();
        agent
            .wait(60, "a point after the write", |s| {
                s.last_point_ms.is_some_and(|t| t > done)
            })
            .await;
    }
    let st = agent.status().unwrap();
    let longest = st.tracking.as_ref().unwrap().max_freeze_ms.unwrap();
    assert!(
        (1000.0..2500.0).contains(&longest),
        "longest freeze {longest} ms with a 1 s limit"
    );
    assert!(st.tracking.as_ref().unwrap().watchdog_thaws >= 3);
    assert!(
        agent.log().contains("watchdog thaws"),
        "no watchdog thaw logged:\n{}",
        agent.log()
    );
    assert_eq!(point_consistency(dir, st.last_point.unwrap()), "fuzzy");
    held.agent.stop().await;
}

/// kill -9 of the agent while it holds a freeze: its guard process thaws
/// the filesystem at once (the limit here is a minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: loop devices, tracefs, mkfs.ext4 and fsfreeze"]
async fn a_kill_9_while_frozen_is_thawed_by_the_guard() {
    let mut killed = Freezing::start("killed", &["--freeze-limit", "60s"], HOLD_FREEZE).await;
    let (agent, fs) = (&mut killed.agent, &killed.fs);
    write_within(
        fs.mount.join("before"),
        256 << 10,
        Duration::from_secs(10),
        || agent.log(),
    )
    .await;
    let deadline = Deadline::after(Duration::from_secs(60));
    while !agent.log().contains("holding the freeze") {
        deadline
            .next(|| format!("the agent never froze:\n{}", agent.log()))
            .await;
    }
    let pid = agent.pid();
    let ok = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let _ = agent.child.0.wait();
    remove_instances_of(pid);
    write_within(fs.mount.join("after"), 4096, Duration::from_secs(5), || {
        "the filesystem stayed frozen after kill -9 of the agent".into()
    })
    .await;
}

/// The receiver SIGSTOPped while the agent freezes and sends: the freeze
/// only reads, so writes to the mount keep completing within the default
/// limit (plus a margin); after SIGCONT the writes reach a point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: loop devices, tracefs, mkfs.ext4 and fsfreeze"]
async fn a_stopped_receiver_never_holds_a_freeze() {
    let mut stopped = Freezing::start("stopped", &[], &[]).await;
    let (agent, fs, rcv) = (&mut stopped.agent, &stopped.fs, &stopped.rcv);
    let signal = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &rcv.0.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    };
    signal("-STOP");
    let start = std::time::Instant::now();
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(6) {
        // Small writes: under pre-copy's threshold, so each point freezes
        // at once and its delta goes to the stopped receiver.
        write_within(
            fs.mount.join(format!("w{}", i % 8)),
            128 << 10,
            Duration::from_secs(4),
            || agent.log(),
        )
        .await;
        i += 1;
    }
    signal("-CONT");
    let done = now_ms();
    let st = agent
        .wait(90, "a point after SIGCONT", |s| {
            s.last_point_ms.is_some_and(|t| t > done)
        })
        .await;
    let longest = st.tracking.unwrap().max_freeze_ms.unwrap();
    assert!(longest < 2000.0, "longest freeze {longest} ms");
    stopped.agent.stop().await;
}
