//! Dedup is scoped per server: a block another server stored is written
//! (and fsynced) again, so commit timing tells a server nothing about the
//! data of others; `dedup = "global"` opts back into sharing. Either way,
//! every point restores byte for byte, and pruning one server then
//! collecting garbage keeps the other's points restorable.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::{Path, PathBuf};

use pilotlight::{
    agent_config, assert_same_bytes, file_len, overwrite_random_4k, pack_records, replicate_once,
    restore_point, sample_image, TestReceiver,
};
use pilotlight_receiver::gc::GcOptions;
use pilotlight_receiver::quota::DedupScope;
use pilotlight_receiver::retention::Policy;
use pilotlight_receiver::store::Store;
use pilotlight_receiver::ReceiverConfig;

const MIB: u64 = 1 << 20;

/// Every point in `copies` (server, point, copy of the source at it) that
/// still exists restores to its copy.
fn restore_all(dir: &Path, copies: &[(&str, u64, PathBuf)], scratch: &Path) -> usize {
    let mut n = 0;
    for (server, point, copy) in copies {
        let kept = pilotlight_receiver::admin::points(dir, Some(server)).unwrap();
        if !kept.iter().any(|p| p.id as u64 == *point) {
            continue;
        }
        let out = scratch.join(format!("restored-{server}-{point}"));
        restore_point(dir, server, "root", *point, &out);
        assert_same_bytes(&out, copy, file_len(copy));
        std::fs::remove_file(&out).unwrap();
        n += 1;
    }
    n
}

fn quota_used(dir: &Path, server: &str) -> u64 {
    let status = pilotlight_receiver::status::status(dir).unwrap();
    status
        .servers
        .iter()
        .find(|s| s.server == server)
        .unwrap()
        .quota_used
}

/// Distinct blocks the points of the store reference.
fn referenced(dir: &Path) -> u64 {
    let store = Store::open(dir).unwrap();
    let n = store.catalog().unwrap().referenced_hashes().unwrap().len();
    n as u64
}

/// Servers `a` and `b` replicate the same image twice under `scope`;
/// checks what the packs hold after each, then prunes `a` to its newest
/// point and collects garbage.
async fn two_servers_same_image(scope: DedupScope) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let cfg = ReceiverConfig {
        dedup: scope,
        ..ReceiverConfig::default()
    };
    let rcv = TestReceiver::create_with(root, &cfg).await;
    let dir = rcv.dir.clone();
    let (img_a, img_b) = (root.join("a.img"), root.join("b.img"));
    sample_image(&img_a, 4 * MIB, 7);
    std::fs::copy(&img_a, &img_b).unwrap();
    let agent = |server: &str, img: &Path| {
        let id = rcv.enroll(server);
        agent_config(
            rcv.addr,
            &id,
            &root.join(format!("state-{server}")),
            &[("root", img)],
        )
    };
    let (cfg_a, cfg_b) = (agent("a", &img_a), agent("b", &img_b));

    let mut copies: Vec<(&str, u64, PathBuf)> = Vec::new();
    let mut keep = |server, point: u64, img: &Path| {
        let copy = root.join(format!("copy-{server}-{point}"));
        std::fs::copy(img, &copy).unwrap();
        copies.push((server, point, copy));
    };
    let p = replicate_once(&cfg_a).await;
    keep("a", p.point, &img_a);
    let of_a = pack_records(&dir);
    assert!(
        of_a > 10,
        "{of_a} records: the image should have many blocks"
    );
    let p = replicate_once(&cfg_b).await;
    keep("b", p.point, &img_b);
    let both = pack_records(&dir);
    match scope {
        // b wrote each of its blocks, as a did: nothing tells b they were there.
        DedupScope::Server => assert_eq!(both, 2 * of_a),
        DedupScope::Global => assert_eq!(both, of_a),
    }
    let used_a = quota_used(&dir, "a");
    // Each server is charged for what it stored, shared or not.
    assert!(used_a > 0);
    assert_eq!(quota_used(&dir, "b"), used_a);

    // The same blocks change on both: a second point of each.
    for (cfg, img, server) in [(&cfg_a, &img_a, "a"), (&cfg_b, &img_b, "b")] {
        overwrite_random_4k(img, 16, 99);
        let p = replicate_once(cfg).await;
        keep(server, p.point, img);
    }
    assert_eq!(restore_all(&dir, &copies, root), 4);
    rcv.stop().await;

    // a keeps its newest point only; b keeps both.
    let newest = Policy {
        keep_last: 1,
        ..Policy::none()
    };
    pilotlight_receiver::admin::prune(&dir, Some("a"), &newest, false).unwrap();
    let before = quota_used(&dir, "a");
    let report = pilotlight_receiver::admin::gc(
        &dir,
        GcOptions {
            min_dead_percent: 0,
        },
    )
    .unwrap();
    assert!(report.packs_damaged.is_empty(), "{report:?}");
    // a is no longer charged for the blocks only its pruned point had.
    let after = quota_used(&dir, "a");
    assert!(
        after < before,
        "a's usage: {before} before gc, {after} after"
    );
    // One record per referenced block is left: the copies of shared
    // blocks that lost to a newer one were dead space, now reclaimed.
    assert_eq!(pack_records(&dir), referenced(&dir));
    assert_eq!(restore_all(&dir, &copies, root), 3);
    let v = pilotlight_receiver::verify::verify(&dir, None, None, false).unwrap();
    assert!(v.ok && v.points_checked == 3, "{v:?}");

    // Replication goes on on top of the collected store.
    let rcv = TestReceiver::serve(&dir).await;
    let cfg_b = agent_config(
        rcv.addr,
        &root.join("b.pem"),
        &root.join("state-b"),
        &[("root", &img_b)],
    );
    overwrite_random_4k(&img_b, 4, 1000);
    let p = replicate_once(&cfg_b).await;
    let out = root.join("after-gc");
    rcv.restore("b", "root", p.point, &out);
    assert_same_bytes(&out, &img_b, file_len(&img_b));
    rcv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_server_writes_its_own_copy_of_blocks_another_stored() {
    two_servers_same_image(DedupScope::Server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_global_dedup_a_server_refers_to_blocks_another_stored() {
    two_servers_same_image(DedupScope::Global).await;
}
