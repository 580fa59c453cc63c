//! Point ids are numbered per server: two servers committing in turn each
//! see their own points as 1, 2, 3 (the ids tell nothing of the other's
//! commits), and operators restore by the same ids with `--server`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use pilotlight::{
    agent_config, assert_same_bytes, file_len, overwrite_random_4k, replicate_once, run_bin,
    sample_image, TestReceiver,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_server_numbers_its_own_points() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let rcv = TestReceiver::create(root).await;
    let servers = ["alpha", "beta"];
    let mut setups = Vec::new();
    for (i, name) in servers.iter().enumerate() {
        let id = rcv.enroll(name);
        let img = root.join(format!("{name}.img"));
        sample_image(&img, 1 << 20, 40 + i as u64);
        let cfg = agent_config(
            rcv.addr,
            &id,
            &root.join(format!("{name}-state")),
            &[("root", &img)],
        );
        setups.push((name, img, cfg));
    }
    // alpha, beta, alpha, beta, alpha, beta.
    let mut copies = Vec::new();
    for round in 1..=3u64 {
        for (name, img, cfg) in &setups {
            overwrite_random_4k(img, 4, round * 10);
            let p = replicate_once(cfg).await;
            assert_eq!(
                p.point, round,
                "{name}'s point {round} is its number {round}"
            );
            let copy = root.join(format!("{name}-{round}"));
            std::fs::copy(img, &copy).unwrap();
            copies.push((name.to_string(), round, copy));
        }
    }
    for name in servers {
        let ids: Vec<i64> = pilotlight_receiver::admin::points(&rcv.dir, Some(name))
            .unwrap()
            .iter()
            .map(|p| p.id)
            .collect();
        assert_eq!(ids, [1, 2, 3], "{name}");
    }
    // Every point restores by (server, id) to what the source held.
    for (name, point, copy) in &copies {
        let out = root.join(format!("restored-{name}-{point}"));
        rcv.restore(name, "root", *point, &out);
        assert_same_bytes(&out, copy, file_len(copy));
    }
    // `verify --point` alone is ambiguous and refused; with --server it runs.
    let dir = rcv.dir.to_str().unwrap().to_owned();
    let out = run_bin(
        "pilotlight-receiver",
        &["verify", "--dir", &dir, "--point", "2"],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--server"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = pilotlight_receiver::verify::verify(&rcv.dir, Some("beta"), Some(2), false).unwrap();
    assert!(v.ok && v.points_checked == 1, "{v:?}");
    rcv.stop().await;
}
