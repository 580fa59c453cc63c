//! The receiver's disk fills up: the affected session gets a clear error,
//! nothing is lost, other servers keep replicating, and replication completes
//! by itself once space returns.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::time::Duration;

use pilotlight::{
    agent_config, assert_same_bytes, file_len, fill_filesystem, replicate_once, sample_image,
    wait_until, Deadline, SmallFs, TestReceiver,
};
use pilotlight_agent::AgentError;
use pilotlight_protocol::frame::ErrorCode;
use rand::{RngCore, SeedableRng};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: loop devices and mkfs.ext4 for a small filesystem to fill"]
async fn full_disk_gives_a_clear_error_and_recovers_when_space_returns() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let fs = SmallFs::create(root, 24 << 20);
    let rcv = TestReceiver::create(&fs.mount).await;
    let id_a = rcv.enroll("alpha");
    let id_b = rcv.enroll("beta");
    let a = root.join("a.img");
    sample_image(&a, 2 << 20, 1);
    let mut cfg_a = agent_config(rcv.addr, &id_a, &root.join("state-a"), &[("root", &a)]);
    cfg_a.once_attempts = 2;
    let p1 = replicate_once(&cfg_a).await;
    let a1 = root.join("a.v1");
    std::fs::copy(&a, &a1).unwrap();

    // Fill the receiver's disk, leaving less than alpha's next point needs.
    let filler = fill_filesystem(&fs.mount, 256 << 10);
    let mut data = vec![0u8; 2 << 20];
    rand::rngs::StdRng::seed_from_u64(2).fill_bytes(&mut data);
    std::fs::write(&a, &data).unwrap();
    let err = pilotlight_agent::run(cfg_a.clone(), Default::default())
        .await
        .unwrap_err();
    match &err {
        AgentError::Remote {
            code: ErrorCode::Storage,
            message,
        } => {
            assert!(
                message.contains("No space left") || message.contains("disk is full"),
                "unclear error: {message}"
            )
        }
        other => panic!("expected a storage error from the receiver, got {other}"),
    }
    // Nothing acknowledged was lost.
    let out = root.join("a.restored");
    rcv.restore("alpha", "root", p1.point, &out);
    assert_same_bytes(&out, &a1, file_len(&a1));
    std::fs::remove_file(&out).unwrap();

    // Another server keeps replicating (a small volume still fits).
    let b = root.join("b.img");
    std::fs::write(&b, &data[..64 * 1024]).unwrap();
    let pb = replicate_once(&agent_config(
        rcv.addr,
        &id_b,
        &root.join("state-b"),
        &[("root", &b)],
    ))
    .await;
    let outb = root.join("b.restored");
    rcv.restore("beta", "root", pb.point, &outb);
    assert_same_bytes(&outb, &b, file_len(&b));

    // alpha keeps trying in continuous mode; space returns; it completes.
    let mut cont = cfg_a.clone();
    cont.once = false;
    cont.interval = Duration::from_millis(200);
    let stop = tokio_util::sync::CancellationToken::new();
    let agent = tokio::spawn(pilotlight_agent::run(cont, stop.clone()));
    wait_until(
        Duration::from_secs(30),
        "the agent to report the full disk",
        || {
            let st = pilotlight_agent::status::Status::load(&root.join("state-a"));
            st.is_ok_and(|s| {
                s.last_error
                    .is_some_and(|e| e.contains("No space left") || e.contains("disk is full"))
            })
        },
    )
    .await;
    std::fs::remove_file(&filler).unwrap();
    let deadline = Deadline::after(Duration::from_secs(90)).every(Duration::from_millis(50));
    let latest = loop {
        let pts = pilotlight_receiver::admin::points(&rcv.dir, Some("alpha")).unwrap();
        if let Some(p) = pts.last().filter(|p| p.id > p1.point as i64) {
            break p.id;
        }
        deadline
            .next(|| "alpha did not complete after space returned".into())
            .await;
    };
    stop.cancel();
    agent.await.unwrap().unwrap();
    rcv.restore("alpha", "root", latest as u64, &out);
    assert_same_bytes(&out, &a, file_len(&a));
    let v = pilotlight_receiver::verify::verify(&rcv.dir, None, None, false).unwrap();
    assert!(v.ok, "{:?}", v.damaged);
    rcv.stop().await;
    drop(fs);
}
