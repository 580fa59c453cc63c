//! End to end: real agent and receiver over loopback TLS, real files and
//! block devices; every restored point compared byte for byte.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::{Path, PathBuf};

use pilotlight::{
    agent_config, assert_same_bytes, compressed_size_of_blocks, copy_bytes, file_len,
    overwrite_random_4k, replicate_once, sample_image, Deadline, LoopDevice, TestReceiver,
};
use pilotlight_agent::CommitMode;

const MIB: u64 = 1 << 20;

/// Two volumes of one server through three versions; every point of every
/// volume restored and compared with the copy of the source taken at it.
async fn three_versions(commit: CommitMode) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let rcv = TestReceiver::create(root).await;
    let identity = rcv.enroll("db1");
    let (a, b) = (root.join("a.img"), root.join("b.img"));
    // Sizes that are not a multiple of the block size exercise the short last block.
    sample_image(&a, 24 * MIB + 12_345, 1);
    sample_image(&b, 16 * MIB, 2);
    let mut cfg = agent_config(
        rcv.addr,
        &identity,
        &root.join("state"),
        &[("root", &a), ("data", &b)],
    );
    cfg.commit = commit;
    let mut versions: Vec<(u64, PathBuf, PathBuf)> = Vec::new();
    for v in 0..3u64 {
        if v > 0 {
            overwrite_random_4k(&a, 50, 100 + v);
            overwrite_random_4k(&b, 20, 200 + v);
        }
        let report = replicate_once(&cfg).await;
        let (ca, cb) = (root.join(format!("a.v{v}")), root.join(format!("b.v{v}")));
        std::fs::copy(&a, &ca).unwrap();
        std::fs::copy(&b, &cb).unwrap();
        versions.push((report.point, ca, cb));
    }
    let points: Vec<u64> = versions.iter().map(|v| v.0).collect();
    assert!(
        points.windows(2).all(|w| w[0] < w[1]),
        "points not increasing: {points:?}"
    );
    for (point, ca, cb) in &versions {
        for (vol, src) in [("root", ca), ("data", cb)] {
            let out = root.join(format!("restore-{vol}-{point}"));
            rcv.restore("db1", vol, *point, &out);
            assert_eq!(
                file_len(&out),
                file_len(src),
                "size of {vol} at point {point}"
            );
            assert_same_bytes(&out, src, file_len(src));
        }
    }
    // The staging images equal the latest point.
    rcv.wait_staging("db1").await;
    let (_, ca, cb) = versions.last().unwrap();
    assert_same_bytes(&rcv.dir.join("staging/db1/root.img"), ca, file_len(ca));
    assert_same_bytes(&rcv.dir.join("staging/db1/data.img"), cb, file_len(cb));
    let report = pilotlight_receiver::verify::verify(&rcv.dir, None, None, false).unwrap();
    assert!(report.ok, "{:?}", report.damaged);
    rcv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_volumes_three_versions_sync() {
    three_versions(CommitMode::Sync).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_volumes_three_versions_async() {
    three_versions(CommitMode::Async).await;
}

/// Async commit pipelines several points on one connection; every one
/// becomes durable, in order, and restores to the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_pipeline_commits_every_point_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let rcv = TestReceiver::create(root).await;
    let identity = rcv.enroll("web");
    let img = root.join("web.img");
    sample_image(&img, 8 * MIB, 9);
    let mut cfg = agent_config(rcv.addr, &identity, &root.join("state"), &[("root", &img)]);
    cfg.once = false;
    cfg.commit = CommitMode::Async;
    cfg.interval = std::time::Duration::ZERO;
    let stop = tokio_util::sync::CancellationToken::new();
    let agent = tokio::spawn(pilotlight_agent::run(cfg.clone(), stop.clone()));
    // Wait (with a deadline) until the receiver holds five points.
    let deadline = Deadline::after(std::time::Duration::from_secs(60));
    loop {
        let n = pilotlight_receiver::admin::points(&rcv.dir, Some("web"))
            .unwrap()
            .len();
        if n >= 5 {
            break;
        }
        deadline
            .next(|| format!("only {n} points after 60 s"))
            .await;
    }
    stop.cancel();
    let reports = agent.await.unwrap().unwrap();
    let ids: Vec<u64> = reports.iter().map(|r| r.point).collect();
    assert!(
        ids.len() >= 5 && ids.windows(2).all(|w| w[0] < w[1]),
        "{ids:?}"
    );
    let points = pilotlight_receiver::admin::points(&rcv.dir, Some("web")).unwrap();
    assert!(points.iter().all(|p| p.commit == "async"));
    // Nothing acknowledged durable is missing from the receiver.
    for id in &ids {
        assert!(
            points.iter().any(|p| p.id as u64 == *id),
            "acked point {id} missing"
        );
    }
    for id in [ids[0], *ids.last().unwrap()] {
        let out = root.join(format!("r{id}"));
        rcv.restore("web", "root", id, &out);
        assert_same_bytes(&out, &img, file_len(&img));
    }
    rcv.stop().await;
}

/// A second cycle after a small change sends less than twice the
/// compressed size of the changed blocks, counted on the wire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_cycle_sends_little_more_than_the_change() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let rcv = TestReceiver::create(root).await;
    let identity = rcv.enroll("app");
    let img = root.join("app.img");
    sample_image(&img, 64 * MIB, 3);
    let cfg = agent_config(rcv.addr, &identity, &root.join("state"), &[("root", &img)]);
    let first = replicate_once(&cfg).await;
    let offsets = overwrite_random_4k(&img, 16, 77);
    let changed = compressed_size_of_blocks(&img, &offsets, 64 * 1024);
    let second = replicate_once(&cfg).await;
    assert!(second.point > first.point);
    assert!(
        second.wire_bytes < 2 * changed,
        "second cycle put {} bytes on the wire for {} compressed changed bytes",
        second.wire_bytes,
        changed
    );
    assert!(
        first.wire_bytes > 10 * second.wire_bytes,
        "first {} second {}",
        first.wire_bytes,
        second.wire_bytes
    );
    let out = root.join("restored");
    rcv.restore("app", "root", second.point, &out);
    assert_same_bytes(&out, &img, file_len(&img));
    rcv.stop().await;
}

fn backing(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

/// Replicate a loop device and restore it onto another loop device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: loop devices"]
async fn loop_device_replicates_and_restores_onto_another() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (src_file, dst_file) = (root.join("src.backing"), root.join("dst.backing"));
    sample_image(&src_file, 32 * MIB, 5);
    backing(&dst_file, 32 * MIB);
    // Old content on the target that a restore must not leave showing.
    sample_image(&dst_file, 32 * MIB, 6);
    let src = LoopDevice::attach(&src_file);
    let dst = LoopDevice::attach(&dst_file);
    let rcv = TestReceiver::create(root).await;
    let identity = rcv.enroll("db2");
    let cfg = agent_config(
        rcv.addr,
        &identity,
        &root.join("state"),
        &[("disk0", &src.path)],
    );
    let p1 = replicate_once(&cfg).await;
    {
        // Change the device itself, through the block layer.
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::options()
            .write(true)
            .open(&src.path)
            .unwrap();
        f.write_all_at(&[0xAB; 8192], 5 * MIB + 4096).unwrap();
        f.write_all_at(&[0u8; 65536], 0).unwrap();
        f.sync_all().unwrap();
    }
    let p2 = replicate_once(&cfg).await;
    assert!(
        p2.blocks_sent <= 3,
        "sent {} blocks for a 2-block change",
        p2.blocks_sent
    );
    let copy = root.join("src.v2");
    copy_bytes(&src.path, &copy, 32 * MIB);
    // Refused without --force: the device exists.
    let req = pilotlight_receiver::restore::RestoreRequest {
        server: "db2".into(),
        volume: "disk0".into(),
        point: pilotlight_receiver::restore::PointSel::Id(p2.point as i64),
        to: dst.path.clone(),
        force: false,
        progress: false,
    };
    let err = pilotlight_receiver::restore::restore(&rcv.dir, &req).unwrap_err();
    assert!(
        matches!(err, pilotlight_receiver::ReceiveError::Refused(_)),
        "{err}"
    );
    rcv.restore("db2", "disk0", p2.point, &dst.path);
    assert_same_bytes(&dst.path, &copy, 32 * MIB);
    let _ = p1;
    rcv.stop().await;
}

/// The smallest per-session in-flight budget still carries a transfer of many
/// times its size, on several streams, without stalling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_inflight_budget_still_replicates() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let cfg = pilotlight_receiver::ReceiverConfig {
        max_session_inflight_mib: 8,
        ..Default::default()
    };
    let rcv = TestReceiver::create_with(root, &cfg).await;
    let identity = rcv.enroll("tight");
    let img = root.join("tight.img");
    sample_image(&img, 48 * MIB, 17);
    let mut acfg = agent_config(rcv.addr, &identity, &root.join("state"), &[("root", &img)]);
    acfg.streams = 4;
    acfg.block_size = 4 << 20;
    let p = replicate_once(&acfg).await;
    let out = root.join("out");
    rcv.restore("tight", "root", p.point, &out);
    assert_same_bytes(&out, &img, file_len(&img));
    rcv.stop().await;
}
