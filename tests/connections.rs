//! Connections and bounds against a live receiver, over real TLS on
//! loopback: idle TCP connections cannot lock enrolled agents out, a full
//! receiver says `Busy`, a flood of blocks without `EndPoint` is cut at the
//! point's cap, and a revocation closes a live session within seconds.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod peer;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use peer::{block, expect_error, session, store_snapshot, tls_connect, world, world_with};
use pilotlight::{agent_config, replicate_once, sample_image};
use pilotlight_agent::AgentError;
use pilotlight_protocol::block::zero_hash;
use pilotlight_protocol::codec::FrameCodec;
use pilotlight_protocol::frame::{BlockFrame, ErrorCode};
use pilotlight_protocol::{Encoding, Frame};
use pilotlight_receiver::ReceiverConfig;
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::codec::Framed;

/// A TCP connection to `to` from the loopback address `from`.
async fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::from((from, 0))).unwrap();
    s.connect(to).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tcp_connections_do_not_lock_out_an_agent() {
    let w = world_with(ReceiverConfig::default()).await;
    // 300 connections that never send a byte, from another loopback address.
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(connect_from([127, 0, 0, 2], w.rcv.addr).await);
    }
    pilotlight::overwrite_random_4k(&w.good_img, 8, 5);
    let cfg = agent_config(
        w.rcv.addr,
        &w.good_id,
        &w.root.join("good-state"),
        &[("root", &w.good_img)],
    );
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), replicate_once(&cfg))
        .await
        .expect("a point within 5 s while 300 idle connections are open");
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_receiver_says_busy_and_the_agent_may_retry() {
    // The good agent uses a control connection and two data streams.
    let w = world_with(ReceiverConfig {
        max_connections: 4,
        ..ReceiverConfig::default()
    })
    .await;
    let before = store_snapshot(&w.rcv.dir);
    let other = w.enroll("other");
    let held = (
        session(w.rcv.addr, &w.good_id).await,
        session(w.rcv.addr, &other).await,
    );
    // An authenticated connection past the limit: an Error frame, no reset.
    let tls = tls_connect(w.rcv.addr, &w.good_id).await.unwrap();
    let mut conn = Framed::new(tls, FrameCodec::default());
    let _ = conn.send(&Frame::hello()).await;
    expect_error(&mut conn, ErrorCode::Busy, "busy").await;
    // A real agent hears the same, and takes it as a reason to come back.
    let img = w.root.join("third.img");
    sample_image(&img, 1 << 20, 3);
    let third = w.enroll("third");
    let mut cfg = agent_config(w.rcv.addr, &third, &w.root.join("t"), &[("root", &img)]);
    cfg.once_attempts = 1;
    match pilotlight_agent::run(cfg, Default::default()).await {
        Err(
            e @ AgentError::Remote {
                code: ErrorCode::Busy,
                ..
            },
        ) => assert!(e.is_retryable()),
        other => panic!("expected Busy, got {other:?}"),
    }
    drop(held);
    w.good_agent_still_works(&before).await;
}

/// A zero block of 64 KiB: 76 bytes on the wire, no payload.
fn zero_block(tag: u64, index: u64) -> BlockFrame {
    BlockFrame {
        tag,
        volume: 0,
        encoding: Encoding::Zero,
        index,
        raw_len: 65536,
        hash: zero_hash(65536),
        payload: bytes::Bytes::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_blocks_without_end_point_is_cut_at_the_cap() {
    let w = world().await;
    let before = store_snapshot(&w.rcv.dir);
    let flooder = w.enroll("flooder");
    // One 1 MiB volume of 64 KiB blocks: 16 blocks, 64 with the resend factor.
    let (mut control, mut data, _) = session(w.rcv.addr, &flooder).await;
    for i in 0..1000u64 {
        if data
            .feed(&Frame::Block(zero_block(1, i % 16)))
            .await
            .is_err()
        {
            break;
        }
    }
    let _ = data.flush().await;
    expect_error(&mut data, ErrorCode::Protocol, "more than 64 blocks").await;
    expect_error(&mut control, ErrorCode::Protocol, "more than 64 blocks").await;
    assert!(
        pilotlight_receiver::admin::points(&w.rcv.dir, Some("flooder"))
            .unwrap()
            .is_empty()
    );
    w.good_agent_still_works(&before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_closes_a_slow_session_within_seconds() {
    let w = world().await;
    let slow = w.enroll("slow");
    let packs_len = || -> u64 {
        std::fs::read_dir(w.rcv.dir.join("packs"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    };
    let at_start = packs_len();
    let (mut control, mut data, _) = session(w.rcv.addr, &slow).await;
    // A long point: a block now and then, never an EndPoint.
    let sender = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        for i in 0..100u64 {
            tick.tick().await;
            let payload = vec![(i % 251) as u8; 65536];
            if data
                .send(&Frame::Block(block(1, i % 16, &payload)))
                .await
                .is_err()
            {
                break;
            }
        }
        data
    });
    pilotlight::wait_until(
        Duration::from_secs(10),
        "the slow point to store blocks",
        || packs_len() > at_start + (128 << 10),
    )
    .await;
    pilotlight_receiver::admin::revoke(&w.rcv.dir, "slow").unwrap();
    let revoked = Instant::now();
    expect_error(&mut control, ErrorCode::Unauthorized, "revoked").await;
    assert!(
        revoked.elapsed() < Duration::from_secs(5),
        "closed {:?} after the revocation",
        revoked.elapsed()
    );
    // The data stream was closed too: the slow sender's writes fail.
    tokio::time::timeout(Duration::from_secs(30), sender)
        .await
        .expect("the sender stopped")
        .unwrap();
    assert!(pilotlight_receiver::admin::points(&w.rcv.dir, Some("slow"))
        .unwrap()
        .is_empty());
    let cfg = agent_config(
        w.rcv.addr,
        &w.good_id,
        &w.root.join("good-state"),
        &[("root", &w.good_img)],
    );
    replicate_once(&cfg).await;
}

/// A control connection that says `Hello` with `Ping` and then nothing is
/// closed after `control_idle_timeout_secs`, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_control_connection_is_closed() {
    let w = world_with(ReceiverConfig {
        control_idle_timeout_secs: 1,
        ..ReceiverConfig::default()
    })
    .await;
    let before = store_snapshot(&w.rcv.dir);
    let quiet = w.enroll("quiet");
    let (mut control, _data, _) = session(w.rcv.addr, &quiet).await;
    let started = Instant::now();
    expect_error(&mut control, ErrorCode::Timeout, "silent").await;
    assert!(started.elapsed() < Duration::from_secs(5));
    w.good_agent_still_works(&before).await;
}

/// Since when `server` has its session, from live.json, if it has one.
fn connected_since(dir: &std::path::Path, server: &str) -> Option<String> {
    pilotlight_receiver::live::Live::load_running(dir)?
        .connected
        .get(server)
        .cloned()
}

/// A real agent with nothing to send for several control idle timeouts keeps
/// its session: its `Ping`s count as activity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_agent_keeps_its_session() {
    let w = world_with(ReceiverConfig {
        control_idle_timeout_secs: 1,
        ..ReceiverConfig::default()
    })
    .await;
    let mut cfg = agent_config(
        w.rcv.addr,
        &w.good_id,
        &w.root.join("good-state"),
        &[("root", &w.good_img)],
    );
    cfg.once = false;
    cfg.interval = Duration::from_secs(3600);
    cfg.ping_interval = Duration::from_millis(200);
    let points = || {
        pilotlight_receiver::admin::points(&w.rcv.dir, Some("good"))
            .unwrap()
            .len()
    };
    let before = points();
    let stop = tokio_util::sync::CancellationToken::new();
    let agent = tokio::spawn(pilotlight_agent::run(cfg, stop.clone()));
    // Its first point is durable: the session is this agent's (not the
    // world's earlier one, which may still be listed for a moment).
    pilotlight::wait_until(Duration::from_secs(20), "the agent's first point", || {
        points() > before
    })
    .await;
    let since = connected_since(&w.rcv.dir, "good").unwrap();
    // The observation window: three control idle timeouts with nothing to
    // send. A session cut for silence would reconnect with a new `since`.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(connected_since(&w.rcv.dir, "good"), Some(since));
    stop.cancel();
    agent.await.unwrap().unwrap();
}
