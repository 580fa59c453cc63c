//! Per-server quotas: a server over its quota gets a typed error and
//! nothing of its point is committed, other servers keep committing, a
//! raised quota lets it go on, and `status` shows each server's usage.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod peer;

use std::path::Path;

use futures_util::SinkExt;
use peer::{block, expect_error, session, store_snapshot, world_with};
use pilotlight_protocol::Frame;

use pilotlight::{
    agent_config, assert_same_bytes, file_len, replicate_once, sample_image, TestReceiver,
};
use pilotlight_agent::AgentError;
use pilotlight_protocol::frame::ErrorCode;
use pilotlight_receiver::quota::{DedupScope, Size};
use pilotlight_receiver::status::ServerStatus;
use pilotlight_receiver::ReceiverConfig;

const MIB: u64 = 1 << 20;

fn line(dir: &Path, server: &str) -> ServerStatus {
    let status = pilotlight_receiver::status::status(dir).unwrap();
    status
        .servers
        .into_iter()
        .find(|s| s.server == server)
        .unwrap()
}

fn points(dir: &Path, server: &str) -> usize {
    pilotlight_receiver::admin::points(dir, Some(server))
        .unwrap()
        .len()
}

fn config(scope: DedupScope, small_quota: u64) -> ReceiverConfig {
    let mut cfg = ReceiverConfig {
        dedup: scope,
        ..ReceiverConfig::default()
    };
    cfg.quotas.insert("small".into(), Size(Some(small_quota)));
    cfg
}

/// `big` (no quota) and `small` (a quota of 1 MiB) replicate 4 MiB images
/// of mostly incompressible data; `small` is refused until its quota is
/// raised.
async fn over_quota(scope: DedupScope) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let rcv = TestReceiver::create_with(root, &config(scope, MIB)).await;
    let dir = rcv.dir.clone();
    let (big_img, small_img) = (root.join("big.img"), root.join("small.img"));
    sample_image(&big_img, 4 * MIB, 3);
    std::fs::copy(&big_img, &small_img).unwrap();
    let (big_id, small_id) = (rcv.enroll("big"), rcv.enroll("small"));
    let agent = |addr, id: &Path, server: &str, img: &Path| {
        let mut cfg = agent_config(
            addr,
            id,
            &root.join(format!("state-{server}")),
            &[("root", img)],
        );
        cfg.once_attempts = 1;
        cfg
    };
    // big first: under global dedup, small then writes nothing at all, and
    // only the commit's check can refuse it.
    replicate_once(&agent(rcv.addr, &big_id, "big", &big_img)).await;

    let small = agent(rcv.addr, &small_id, "small", &small_img);
    let err = pilotlight_agent::run(small, tokio_util::sync::CancellationToken::new())
        .await
        .unwrap_err();
    match &err {
        AgentError::Remote { code, message } => {
            assert_eq!(*code, ErrorCode::QuotaExceeded, "{message}");
            assert!(message.contains("over its quota"), "{message}");
        }
        other => panic!("expected the quota error, got {other:?}"),
    }
    assert!(err.is_retryable(), "the agent backs off and tries again");
    assert_eq!(
        points(&dir, "small"),
        0,
        "nothing of the point is committed"
    );
    let s = line(&dir, "small");
    assert_eq!((s.quota, s.quota_used), (Some(MIB), 0));

    // Another server keeps committing meanwhile.
    sample_image(&big_img, 4 * MIB, 4);
    let p = replicate_once(&agent(rcv.addr, &big_id, "big", &big_img)).await;
    let out = root.join("big-restored");
    rcv.restore("big", "root", p.point, &out);
    assert_same_bytes(&out, &big_img, file_len(&big_img));
    let b = line(&dir, "big");
    assert_eq!(b.quota, None);
    assert!(b.quota_used > MIB, "{b:?}");
    rcv.stop().await;

    // A raised quota (the configuration is read at start) lets it go on.
    let text = toml::to_string(&config(scope, 64 * MIB)).unwrap();
    std::fs::write(dir.join("receiver.toml"), text).unwrap();
    let rcv = TestReceiver::serve(&dir).await;
    let p = replicate_once(&agent(rcv.addr, &small_id, "small", &small_img)).await;
    let out = root.join("small-restored");
    rcv.restore("small", "root", p.point, &out);
    assert_same_bytes(&out, &small_img, file_len(&small_img));
    let s = line(&dir, "small");
    assert_eq!(s.quota, Some(64 * MIB));
    assert!(s.quota_used > MIB && s.quota_used <= 64 * MIB, "{s:?}");
    rcv.stop().await;

    let out = pilotlight::run_bin(
        "pilotlight-receiver",
        &["status", "--dir", dir.to_str().unwrap()],
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("quota used/limit") && text.contains("/64.0 MiB"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_over_its_quota_commits_nothing_until_the_quota_is_raised() {
    over_quota(DedupScope::Server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_shared_under_global_dedup_count_toward_the_quota() {
    over_quota(DedupScope::Global).await;
}

/// Distinct 64 KiB blocks, block `i` of them.
fn distinct(i: u64) -> Vec<u8> {
    let mut data = vec![0u8; 65536];
    for (n, chunk) in data.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(i * 1_000_003 + n as u64).to_le_bytes());
    }
    data
}

/// A peer that writes distinct blocks without ever ending its point.
async fn flood(cfg: ReceiverConfig, code: ErrorCode, needle: &str) {
    let w = world_with(cfg).await;
    let id = w.enroll("flood");
    let before = store_snapshot(&w.rcv.dir);
    let (mut control, mut data, _) = session(w.rcv.addr, &id).await;
    // 64 blocks (4 MiB) to the 16 of its 1 MiB volume: the most one point
    // may send with the default resend factor.
    for i in 0..64 {
        // The receiver may close the stream before all of them are sent.
        if data
            .send(&Frame::Block(block(1, i % 16, &distinct(i))))
            .await
            .is_err()
        {
            break;
        }
    }
    expect_error(&mut data, code, needle).await;
    expect_error(&mut control, code, needle).await;
    // Nothing of the point: the good server's point is all there is.
    assert_eq!(store_snapshot(&w.rcv.dir).1, before.1);
    assert_eq!(points(&w.rcv.dir, "flood"), 0);
    w.good_agent_still_works(&before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_blocks_past_the_quota_is_refused() {
    let mut cfg = ReceiverConfig::default();
    cfg.quotas.insert("flood".into(), Size(Some(200 << 10)));
    flood(cfg, ErrorCode::QuotaExceeded, "over its quota").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_may_not_write_more_uncommitted_bytes_than_its_cap() {
    // Room for the good server's first point (about 2.2 MiB of its 4 MiB
    // image is stored), not for the flood's 4 MiB.
    let cfg = ReceiverConfig {
        max_session_uncommitted: Some(Size(Some(3584 << 10))),
        ..ReceiverConfig::default()
    };
    flood(
        cfg,
        ErrorCode::Protocol,
        "uncommitted points of this session",
    )
    .await;
}
