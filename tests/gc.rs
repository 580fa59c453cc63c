//! Garbage collection: pruned points give their pack space back, kept points
//! restore byte for byte, collection runs alongside replication inside
//! `serve`, and a kill -9 at any moment of a collection loses nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pilotlight::{
    agent_config, assert_same_bytes, bin, file_len, overwrite_random_4k, pack_bytes,
    replicate_once, restore_point, sample_image, ChildGuard, Deadline, TestReceiver,
};
use pilotlight_receiver::gc::GcOptions;
use pilotlight_receiver::retention::Policy;
use pilotlight_receiver::store::Store;
use pilotlight_receiver::ReceiverConfig;
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;

/// What the packs hold when nothing in them is dead: one record (48-byte
/// header + payload) per block some point references, plus a 16-byte header
/// per pack.
fn compact_bytes(dir: &Path) -> u64 {
    let store = Store::open(dir).unwrap();
    let cat = store.catalog().unwrap();
    let packs = cat.packs().unwrap().len() as u64;
    let records: u64 = cat
        .referenced_hashes()
        .unwrap()
        .iter()
        .map(|h| 48 + u64::from(cat.block(h).unwrap().unwrap().stored_len))
        .sum();
    records + 16 * packs
}

fn point_ids(dir: &Path, server: &str) -> Vec<i64> {
    pilotlight_receiver::admin::points(dir, Some(server))
        .unwrap()
        .iter()
        .map(|p| p.id)
        .collect()
}

/// Restore every point in `copies` that still exists and compare it with
/// the source as it was; returns how many were checked.
fn restore_all(dir: &Path, server: &str, copies: &[(i64, PathBuf)], scratch: &Path) -> usize {
    let kept = point_ids(dir, server);
    let mut n = 0;
    for (point, copy) in copies.iter().filter(|(p, _)| kept.contains(p)) {
        let out = scratch.join(format!("restored-{point}"));
        restore_point(dir, server, "root", *point as u64, &out);
        assert_same_bytes(&out, copy, file_len(copy));
        std::fs::remove_file(&out).unwrap();
        n += 1;
    }
    assert_eq!(n, kept.len(), "a kept point has no copy to compare with");
    n
}

/// 30 points of mostly unique data, written over a few receiver runs so the
/// store has several packs. Returns the copies of the source at each point.
async fn thirty_points(root: &Path, server: &str) -> (PathBuf, Vec<(i64, PathBuf)>) {
    let dir = root.join("receiver");
    pilotlight_receiver::admin::init(&dir, Some("127.0.0.1:0")).unwrap();
    let img = root.join(format!("{server}.img"));
    sample_image(&img, 4 * MIB, 7);
    let mut copies = Vec::new();
    let mut rcv = TestReceiver::serve(&dir).await;
    let id = rcv.enroll(server);
    for i in 0..30u64 {
        if i > 0 && i % 6 == 0 {
            rcv.stop().await;
            rcv = TestReceiver::serve(&dir).await;
        }
        if i > 0 {
            overwrite_random_4k(&img, 24, i);
        }
        let cfg = agent_config(rcv.addr, &id, &root.join("state"), &[("root", &img)]);
        let p = replicate_once(&cfg).await;
        let copy = root.join(format!("v{}", p.point));
        std::fs::copy(&img, &copy).unwrap();
        copies.push((p.point as i64, copy));
    }
    rcv.stop().await;
    (dir, copies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_unique_data_frees_its_pack_space() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (dir, copies) = thirty_points(root, "gc").await;
    let before = pack_bytes(&dir);
    let packs_before = std::fs::read_dir(dir.join("packs")).unwrap().count();
    assert!(
        packs_before >= 4,
        "{packs_before} packs: the test wants several"
    );

    let keep = Policy {
        keep_last: 5,
        ..Policy::none()
    };
    pilotlight_receiver::admin::prune(&dir, None, &keep, false).unwrap();
    // Pruning alone touches only the catalog.
    assert_eq!(pack_bytes(&dir), before);
    let report = pilotlight_receiver::admin::gc(
        &dir,
        GcOptions {
            min_dead_percent: 0,
        },
    )
    .unwrap();
    let after = pack_bytes(&dir);
    assert!(
        after < before * 2 / 3,
        "packs: {before} bytes before, {after} after ({report:?})"
    );
    assert_eq!(report.bytes_freed, before - after, "{report:?}");
    assert_eq!(after, compact_bytes(&dir), "dead bytes left behind");
    assert!(report.packs_damaged.is_empty());
    assert_eq!(restore_all(&dir, "gc", &copies, root), 5);
    let v = pilotlight_receiver::verify::verify(&dir, None, None, false).unwrap();
    assert!(v.ok && v.points_checked == 5, "{v:?}");

    // A second collection finds nothing; replication goes on on top.
    let again = pilotlight_receiver::admin::gc(&dir, GcOptions::default()).unwrap();
    assert_eq!(
        (again.bytes_freed, again.blocks_dropped),
        (0, 0),
        "{again:?}"
    );
    let rcv = TestReceiver::serve(&dir).await;
    let img = root.join("gc.img");
    overwrite_random_4k(&img, 8, 1000);
    let cfg = agent_config(
        rcv.addr,
        &root.join("gc.pem"),
        &root.join("state"),
        &[("root", &img)],
    );
    let p = replicate_once(&cfg).await;
    let out = root.join("after-gc");
    rcv.restore("gc", "root", p.point, &out);
    assert_same_bytes(&out, &img, file_len(&img));
    // `gc` refuses while `serve` holds the directory.
    let err = pilotlight_receiver::admin::gc(&dir, GcOptions::default()).unwrap_err();
    assert!(
        matches!(err, pilotlight_receiver::ReceiveError::Refused(_)),
        "{err}"
    );
    rcv.stop().await;
}

/// `serve` prunes and collects by itself every `prune_interval_secs` while an
/// agent replicates. The source cycles through three contents, so blocks of
/// pruned points come back while they are being collected: each cycle either
/// refers to the stored copy or stores a new one, never to a dropped one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_collects_while_replicating() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let cfg = ReceiverConfig {
        prune_interval_secs: 1,
        gc_min_dead_percent: 0,
        retention: Policy {
            keep_last: 2,
            ..Policy::none()
        },
        ..ReceiverConfig::default()
    };
    let rcv = TestReceiver::create_with(root, &cfg).await;
    let id = rcv.enroll("live");
    let variants: Vec<PathBuf> = (0..3u64)
        .map(|s| {
            let v = root.join(format!("variant{s}"));
            sample_image(&v, 2 * MIB, 100 + s);
            v
        })
        .collect();
    let img = root.join("live.img");
    let agent = agent_config(rcv.addr, &id, &root.join("state"), &[("root", &img)]);
    let mut copies = Vec::new();
    let mut pruned_during = false;
    let start = Instant::now();
    let mut i = 0u64;
    // At least 40 cycles, and at least three maintenance passes.
    while i < 40 || start.elapsed() < Duration::from_secs(3) {
        std::fs::copy(&variants[(i % 3) as usize], &img).unwrap();
        overwrite_random_4k(&img, 2, i);
        let p = replicate_once(&agent).await;
        let copy = root.join(format!("c{}", p.point));
        std::fs::copy(&img, &copy).unwrap();
        copies.push((p.point as i64, copy));
        // The newest point restores right away, whatever the collector does.
        let out = root.join("newest");
        rcv.restore("live", "root", p.point, &out);
        assert_same_bytes(&out, &img, file_len(&img));
        pruned_during |= point_ids(&rcv.dir, "live").len() < copies.len();
        i += 1;
    }
    assert!(pruned_during, "serve never pruned while replicating");
    // Once the agent is quiet, the next pass leaves exactly the two newest
    // points and packs with nothing dead in them.
    let deadline = Deadline::after(Duration::from_secs(30)).every(Duration::from_millis(50));
    loop {
        let ids = point_ids(&rcv.dir, "live");
        if ids.len() == 2 && pack_bytes(&rcv.dir) == compact_bytes(&rcv.dir) {
            break;
        }
        deadline
            .next(|| {
                format!(
                    "store not compact: points {ids:?}, {} pack bytes, {} needed",
                    pack_bytes(&rcv.dir),
                    compact_bytes(&rcv.dir)
                )
            })
            .await;
    }
    assert_eq!(restore_all(&rcv.dir, "live", &copies, root), 2);
    let v = pilotlight_receiver::verify::verify(&rcv.dir, None, None, false).unwrap();
    assert!(v.ok, "{v:?}");
    rcv.stop().await;
}

fn copy_dir(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}

/// Start `pilotlight-receiver gc` with its log on a pipe.
fn spawn_gc(
    dir: &Path,
) -> (
    ChildGuard,
    std::io::Lines<std::io::BufReader<std::process::ChildStderr>>,
) {
    let mut child = Command::new(bin("pilotlight-receiver"))
        .arg("gc")
        .arg("--dir")
        .arg(dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    (ChildGuard(child), std::io::BufReader::new(err).lines())
}

/// kill -9 of `gc` at seeded moments: after the k-th pack it collected plus
/// a random delay. Every kept point restores byte-identical and verifies,
/// straight after the kill and after a collection run to completion; and the
/// completed collection leaves the store as compact as an uninterrupted one.
#[test]
fn kill_during_gc_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (dir, copies) = rt.block_on(thirty_points(root, "kill"));
    let keep = Policy {
        keep_last: 4,
        ..Policy::none()
    };
    pilotlight_receiver::admin::prune(&dir, None, &keep, false).unwrap();
    std::fs::write(dir.join("receiver.toml"), "gc_min_dead_percent = 0\n").unwrap();

    // An uninterrupted run: how many packs it collects, and the result.
    let clean = root.join("clean");
    copy_dir(&dir, &clean);
    let (mut child, lines) = spawn_gc(&clean);
    let collected = lines
        .map_while(Result::ok)
        .filter(|l| l.contains("collected pack"))
        .count();
    assert!(child.0.wait().unwrap().success());
    assert!(collected >= 3, "only {collected} packs collected");
    let compact = pack_bytes(&clean);

    for seed in 0..6u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let after_pack = rng.random_range(0..collected);
        let delay = Duration::from_micros(rng.random_range(0..3000));
        let victim = root.join(format!("kill-{seed}"));
        copy_dir(&dir, &victim);
        let (mut child, mut lines) = spawn_gc(&victim);
        let mut seen = 0;
        while seen < after_pack {
            match lines.next() {
                Some(Ok(l)) if l.contains("collected pack") => seen += 1,
                Some(Ok(_)) => {}
                _ => break,
            }
        }
        // The seeded kill moment (part of the fault, not a wait).
        let t = Instant::now();
        while t.elapsed() < delay {
            std::hint::spin_loop();
        }
        let _ = child.0.kill();
        let status = child.0.wait().unwrap();
        eprintln!("seed {seed}: killed after pack {after_pack} + {delay:?} ({status})");

        // Straight after the kill, before any repair.
        assert_eq!(
            restore_all(&victim, "kill", &copies, root),
            4,
            "seed {seed}"
        );
        let v = pilotlight_receiver::verify::verify(&victim, None, None, false).unwrap();
        assert!(v.ok && v.points_checked == 4, "seed {seed}: {v:?}");
        // A collection run to completion cleans up after the killed one.
        let (mut again, rest) = spawn_gc(&victim);
        rest.for_each(drop);
        assert!(again.0.wait().unwrap().success(), "seed {seed}");
        assert_eq!(pack_bytes(&victim), compact_bytes(&victim), "seed {seed}");
        // As compact as the uninterrupted run, give or take the header of
        // the pack the killed run was filling.
        assert!(pack_bytes(&victim) <= compact + 16, "seed {seed}");
        assert_eq!(
            restore_all(&victim, "kill", &copies, root),
            4,
            "seed {seed}"
        );
        std::fs::remove_dir_all(&victim).unwrap();
    }
}
