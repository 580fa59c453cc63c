//! Retention on real points: prune removes exactly what the policy says, and
//! every remaining point restores byte-identical.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::PathBuf;

use pilotlight::{
    agent_config, assert_same_bytes, file_len, overwrite_random_4k, pack_bytes, pack_records,
    replicate_once, sample_image, TestReceiver,
};
use pilotlight_receiver::retention::Policy;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_keeps_exactly_the_policy_and_the_rest_restores() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let rcv = TestReceiver::create(root).await;
    let id = rcv.enroll("ret");
    let img = root.join("ret.img");
    sample_image(&img, 2 << 20, 30);
    let cfg = agent_config(rcv.addr, &id, &root.join("state"), &[("root", &img)]);
    let mut copies: Vec<(i64, PathBuf)> = Vec::new();
    for i in 0..30u64 {
        if i > 0 {
            overwrite_random_4k(&img, 3, i);
        }
        let p = replicate_once(&cfg).await;
        let copy = root.join(format!("v{}", p.point));
        std::fs::copy(&img, &copy).unwrap();
        copies.push((p.point as i64, copy));
    }
    let ids = |dir: &std::path::Path| -> Vec<i64> {
        pilotlight_receiver::admin::points(dir, Some("ret"))
            .unwrap()
            .iter()
            .map(|p| p.id)
            .collect()
    };
    let all: Vec<i64> = copies.iter().map(|c| c.0).collect();
    assert_eq!(ids(&rcv.dir), all);

    // A dry run removes nothing and says what would go.
    let items = pilotlight_receiver::admin::prune(
        &rcv.dir,
        Some("ret"),
        &Policy {
            keep_last: 20,
            ..Policy::none()
        },
        true,
    )
    .unwrap();
    assert_eq!(items.iter().filter(|i| !i.keep).count(), 10);
    assert_eq!(ids(&rcv.dir), all);

    // keep-last 20: exactly the 20 newest remain, and all of them restore.
    pilotlight_receiver::admin::prune(
        &rcv.dir,
        None,
        &Policy {
            keep_last: 20,
            ..Policy::none()
        },
        false,
    )
    .unwrap();
    assert_eq!(ids(&rcv.dir), all[10..].to_vec());
    for (point, copy) in &copies[10..] {
        let out = root.join(format!("r{point}"));
        rcv.restore("ret", "root", *point as u64, &out);
        assert_same_bytes(&out, copy, file_len(copy));
    }

    // keep-hourly 24: all points are in one hour, so only the newest stays;
    // keep-within 1h would have kept them all.
    let within = Policy {
        keep_within: Some(std::time::Duration::from_secs(3600)),
        ..Policy::none()
    };
    let items = pilotlight_receiver::admin::prune(&rcv.dir, None, &within, true).unwrap();
    assert!(items.iter().all(|i| i.keep));
    pilotlight_receiver::admin::prune(
        &rcv.dir,
        None,
        &Policy {
            keep_hourly: 24,
            ..Policy::none()
        },
        false,
    )
    .unwrap();
    let newest = *all.last().unwrap();
    assert_eq!(ids(&rcv.dir), vec![newest]);
    let out = root.join("newest");
    rcv.restore("ret", "root", newest as u64, &out);
    assert_same_bytes(&out, &img, file_len(&img));
    let v = pilotlight_receiver::verify::verify(&rcv.dir, None, None, false).unwrap();
    assert!(v.ok && v.points_checked == 1, "{v:?}");

    // Replication goes on from the kept point.
    overwrite_random_4k(&img, 3, 99);
    let p = replicate_once(&cfg).await;
    let out = root.join("after");
    rcv.restore("ret", "root", p.point, &out);
    assert_same_bytes(&out, &img, file_len(&img));
    rcv.stop().await;
}

/// Identical blocks across volumes and servers are stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_volumes_occupy_the_store_once() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let a = root.join("a.img");
    sample_image(&a, 16 << 20, 44);
    let b = root.join("b.img");
    std::fs::copy(&a, &b).unwrap();

    let one = TestReceiver::create(&root.join("one")).await;
    let id = one.enroll("s1");
    replicate_once(&agent_config(
        one.addr,
        &id,
        &root.join("st-one"),
        &[("a", &a)],
    ))
    .await;
    let single = pack_bytes(&one.dir);
    let single_records = pack_records(&one.dir);
    one.stop().await;

    // Across servers, blocks are shared only with `dedup = "global"` (the
    // default writes each server's own copy: tests/dedup.rs).
    let global = pilotlight_receiver::ReceiverConfig {
        dedup: pilotlight_receiver::quota::DedupScope::Global,
        ..pilotlight_receiver::ReceiverConfig::default()
    };
    let two = TestReceiver::create_with(&root.join("two"), &global).await;
    let id1 = two.enroll("s1");
    let id2 = two.enroll("s2");
    let p = replicate_once(&agent_config(
        two.addr,
        &id1,
        &root.join("st-two"),
        &[("a", &a), ("b", &b)],
    ))
    .await;
    let p2 = replicate_once(&agent_config(
        two.addr,
        &id2,
        &root.join("st-s2"),
        &[("c", &b)],
    ))
    .await;
    let double = pack_bytes(&two.dir);
    // Each distinct block is one record, however many volumes hold it.
    assert_eq!(
        pack_records(&two.dir),
        single_records,
        "records of one volume vs the same data three times"
    );
    // The bytes differ only by how each record was encoded: the encoder
    // probes poorly compressing runs (one block in 16 tried), so which blocks
    // of a mixed image are stored raw depends on their order across streams.
    // A second copy of the data would double them.
    assert!(
        double.abs_diff(single) <= single / 20,
        "one volume: {single} bytes; the same data three times: {double}"
    );
    for (server, vol, point) in [
        ("s1", "a", p.point),
        ("s1", "b", p.point),
        ("s2", "c", p2.point),
    ] {
        let out = root.join(format!("{server}-{vol}"));
        two.restore(server, vol, point, &out);
        assert_same_bytes(&out, &a, file_len(&a));
    }
    two.stop().await;
}

/// A flipped byte in a pack is found by verify, which names the point,
/// volume and block, exits non-zero, and says the same in JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_a_damaged_block() {
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let rcv = TestReceiver::create(root).await;
    let id = rcv.enroll("dmg");
    let img = root.join("dmg.img");
    sample_image(&img, 4 << 20, 45);
    let p = replicate_once(&agent_config(
        rcv.addr,
        &id,
        &root.join("state"),
        &[("root", &img)],
    ))
    .await;
    rcv.stop().await;

    let store = pilotlight_receiver::store::Store::open(&root.join("receiver")).unwrap();
    let point = pilotlight_receiver::restore::resolve_point(
        &store,
        "dmg",
        pilotlight_receiver::restore::PointSel::Latest,
    )
    .unwrap();
    let vol = point.volumes[0].clone();
    let blocks = pilotlight_receiver::restore::point_blocks(&store, &vol, point.id).unwrap();
    let (index, (_, loc)) = blocks.iter().find_map(|(i, e)| e.map(|e| (*i, e))).unwrap();
    drop(store);
    let pack = pilotlight_receiver::store::pack_file(&root.join("receiver"), loc.pack);
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&pack)
        .unwrap();
    let at = loc.offset + 48 + u64::from(loc.stored_len) / 2;
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, at).unwrap();
    f.write_all_at(&[byte[0] ^ 0x40], at).unwrap();

    let dir = root.join("receiver");
    let out = pilotlight::run_bin(
        "pilotlight-receiver",
        &["verify", "--dir", dir.to_str().unwrap()],
    );
    assert!(!out.status.success(), "verify passed a damaged store");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "point {} server dmg volume root block {index}",
            p.point
        )),
        "verify did not name the block: {text}"
    );
    let out = pilotlight::run_bin(
        "pilotlight-receiver",
        &["verify", "--dir", dir.to_str().unwrap(), "--json"],
    );
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    let d = v["damaged"].as_array().unwrap();
    assert!(
        d.iter()
            .any(|d| d["point"] == p.point && d["volume"] == "root" && d["block"] == index),
        "{v}"
    );
    // A restore of that point refuses to write bad data.
    let req = pilotlight_receiver::restore::RestoreRequest {
        server: "dmg".into(),
        volume: "root".into(),
        point: pilotlight_receiver::restore::PointSel::Id(p.point as i64),
        to: root.join("out"),
        force: false,
        progress: false,
    };
    let err = pilotlight_receiver::restore::restore(&dir, &req).unwrap_err();
    assert!(err.to_string().contains(&format!("block {index}")), "{err}");
    assert!(
        !root.join("out").exists(),
        "a failed restore left a file behind"
    );
}
