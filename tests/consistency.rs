//! Consistency labels are honest: reflink clones and a frozen filesystem give
//! crash-consistent points; the filesystem is always thawed afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::time::Duration;

use pilotlight::{
    agent_config, assert_same_bytes, file_len, replicate_once, require_tools, sample_image,
    Deadline, SmallFs, TestReceiver,
};
use pilotlight_agent::ConsistencyMode;
use pilotlight_protocol::frame::Consistency;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: loop devices and mkfs.xfs (xfsprogs) for a reflink filesystem"]
async fn reflink_clone_makes_a_crash_consistent_point() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let fs = SmallFs::create_with(
        root,
        512 << 20,
        &["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    );
    let rcv = TestReceiver::create(root).await;
    let id = rcv.enroll("xfs");
    let (a, b) = (fs.mount.join("a.img"), fs.mount.join("b.img"));
    sample_image(&a, 8 << 20, 1);
    sample_image(&b, 4 << 20, 2);
    let cfg = agent_config(rcv.addr, &id, &root.join("state"), &[("root", &a)]);
    let p = replicate_once(&cfg).await;
    assert_eq!(p.consistency, Consistency::CrashConsistent);
    let pts = pilotlight_receiver::admin::points(&rcv.dir, Some("xfs")).unwrap();
    assert_eq!(pts.last().unwrap().consistency, "crash-consistent");
    let out = root.join("out");
    rcv.restore("xfs", "root", p.point, &out);
    assert_same_bytes(&out, &a, file_len(&a));
    // No clone is left behind.
    let names: Vec<_> = std::fs::read_dir(&fs.mount)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| !n.to_string_lossy().contains("pilotlight-clone")),
        "{names:?}"
    );
    // Several volumes are cloned one after another: not one instant, so fuzzy.
    let cfg2 = agent_config(
        rcv.addr,
        &id,
        &root.join("state"),
        &[("root", &a), ("data", &b)],
    );
    let p2 = replicate_once(&cfg2).await;
    assert_eq!(p2.consistency, Consistency::Fuzzy);
    // Explicit reflink on a filesystem without it is an error, not a silent downgrade.
    let plain = root.join("plain.img");
    sample_image(&plain, 1 << 20, 3);
    let mut cfg3 = agent_config(
        rcv.addr,
        &rcv.enroll("plain"),
        &root.join("state3"),
        &[("root", &plain)],
    );
    cfg3.consistency = ConsistencyMode::Reflink;
    let err = pilotlight_agent::run(cfg3, Default::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot reflink"), "{err}");
    rcv.stop().await;
    drop(fs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: loop devices, mkfs.ext4 and fsfreeze"]
async fn frozen_filesystem_makes_a_crash_consistent_point_and_is_thawed() {
    require_tools(&["fsfreeze"]);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let fs = SmallFs::create(root, 64 << 20);
    let rcv = TestReceiver::create(root).await;
    let id = rcv.enroll("frz");
    let img = fs.mount.join("disk.img");
    sample_image(&img, 16 << 20, 4);
    let mut cfg = agent_config(rcv.addr, &id, &root.join("state"), &[("root", &img)]);
    cfg.consistency = ConsistencyMode::Freeze(fs.mount.clone());
    let p = replicate_once(&cfg).await;
    assert_eq!(p.consistency, Consistency::CrashConsistent);
    // The filesystem takes writes again (a frozen one would block this write).
    let probe = fs.mount.join("after");
    let writer = std::thread::spawn(move || std::fs::write(&probe, b"thawed").is_ok());
    let deadline = Deadline::after(Duration::from_secs(20));
    while !writer.is_finished() {
        deadline
            .next(|| {
                let _ = std::process::Command::new("fsfreeze")
                    .arg("-u")
                    .arg(&fs.mount)
                    .status();
                "the filesystem was left frozen".into()
            })
            .await;
    }
    assert!(writer.join().unwrap());
    let out = root.join("out");
    rcv.restore("frz", "root", p.point, &out);
    assert_same_bytes(&out, &img, file_len(&img));
    rcv.stop().await;
    drop(fs);
}

/// A final delta over the freeze's memory budget is not read frozen: the
/// filesystem is thawed at once, the volume read live, and the point is
/// labelled fuzzy (here an idle image, so it still restores byte-exact).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: loop devices, mkfs.ext4 and fsfreeze"]
async fn a_delta_over_the_freeze_memory_budget_is_read_live_and_fuzzy() {
    require_tools(&["fsfreeze"]);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let fs = SmallFs::create(root, 64 << 20);
    let rcv = TestReceiver::create(root).await;
    let id = rcv.enroll("big");
    let img = fs.mount.join("disk.img");
    sample_image(&img, 16 << 20, 5);
    let mut cfg = agent_config(rcv.addr, &id, &root.join("state"), &[("root", &img)]);
    cfg.consistency = ConsistencyMode::Freeze(fs.mount.clone());
    // The whole 16 MiB volume is the delta of a scan; 1 MiB may be held.
    cfg.freeze.memory = 1 << 20;
    let p = replicate_once(&cfg).await;
    assert_eq!(p.consistency, Consistency::Fuzzy);
    let probe = fs.mount.join("after");
    let writer = std::thread::spawn(move || std::fs::write(&probe, b"thawed").is_ok());
    let deadline = Deadline::after(Duration::from_secs(20));
    while !writer.is_finished() {
        deadline
            .next(|| {
                let _ = std::process::Command::new("fsfreeze")
                    .arg("-u")
                    .arg(&fs.mount)
                    .status();
                "the filesystem was left frozen".into()
            })
            .await;
    }
    assert!(writer.join().unwrap());
    let out = root.join("out");
    rcv.restore("big", "root", p.point, &out);
    assert_same_bytes(&out, &img, file_len(&img));
    rcv.stop().await;
    drop(fs);
}
