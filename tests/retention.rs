//! Retention on real points: prune removes exactly what the policy says, and
//! every remaining point restores byte-identical.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::PathBuf;

use pilotlight::{
    agent_config, assert_same_bytes, file_len, overwrite_random_4k, replicate_once, sample_image,
    TestReceiver,
};
use pilotlight_receiver::retention::Policy;

fn none() -> Policy {
    Policy {
        keep_within: None,
        keep_last: 0,
        keep_hourly: 0,
        keep_daily: 0,
        keep_weekly: 0,
        keep_monthly: 0,
    }
}

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
            ..none()
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
            ..none()
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
        ..none()
    };
    let items = pilotlight_receiver::admin::prune(&rcv.dir, None, &within, true).unwrap();
    assert!(items.iter().all(|i| i.keep));
    pilotlight_receiver::admin::prune(
        &rcv.dir,
        None,
        &Policy {
            keep_hourly: 24,
            ..none()
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
