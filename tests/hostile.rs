//! Bad input and unauthorised peers, each against a live receiver: a clear,
//! specific error, a closed session, nothing stored, and a good agent
//! replicating correctly right after.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod peer;

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::SinkExt;
use peer::{block, expect_error, hello, session, store_snapshot, tls_connect, world};
use pilotlight::{agent_config, replicate_once, sample_image, wait_until};
use pilotlight_agent::AgentError;
use pilotlight_protocol::codec::FrameCodec;
use pilotlight_protocol::frame::ErrorCode;
use pilotlight_protocol::{BlockHash, Encoding, Frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_instead_of_tls() {
    let w = world().await;
    let before = store_snapshot(&w.rcv.dir);
    let mut tcp = TcpStream::connect(w.rcv.addr).await.unwrap();
    let junk: Vec<u8> = (0..4096).map(|_| rand::random::<u8>()).collect();
    let _ = tcp.write_all(&junk).await;
    let mut buf = [0u8; 1024];
    // The receiver closes the connection (at most a TLS alert comes back).
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "connection left open");
    w.good_agent_still_works(&before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_from_another_ca_is_refused() {
    let w = world().await;
    let before = store_snapshot(&w.rcv.dir);
    let other = w.root.join("other-ca");
    pilotlight_receiver::admin::init(&other, None).unwrap();
    let foreign = w.root.join("foreign.pem");
    pilotlight_receiver::admin::enroll(&other, "good", &foreign).unwrap();
    let img = w.root.join("f.img");
    sample_image(&img, 1 << 20, 1);
    let cfg = agent_config(
        w.rcv.addr,
        &foreign,
        &w.root.join("f-state"),
        &[("root", &img)],
    );
    let err = pilotlight_agent::run(cfg, Default::default())
        .await
        .unwrap_err();
    // The agent also refuses the receiver: its certificate is from another CA.
    match err {
        AgentError::Net(e) => assert!(
            e.to_string().contains("certificate") || e.to_string().contains("Unknown"),
            "{e}"
        ),
        other => panic!("expected a TLS failure, got {other}"),
    }
    w.good_agent_still_works(&before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_identity_is_refused_and_reenrollment_works() {
    let w = world().await;
    let id = w.enroll("rev");
    let img = w.root.join("rev.img");
    sample_image(&img, 1 << 20, 2);
    let cfg = agent_config(
        w.rcv.addr,
        &id,
        &w.root.join("rev-state"),
        &[("root", &img)],
    );
    replicate_once(&cfg).await;
    pilotlight_receiver::admin::revoke(&w.rcv.dir, "rev").unwrap();
    let before = store_snapshot(&w.rcv.dir);
    let err = pilotlight_agent::run(cfg.clone(), Default::default())
        .await
        .unwrap_err();
    match err {
        AgentError::Remote {
            code: ErrorCode::Unauthorized,
            message,
        } => assert!(message.contains("revoked"), "{message}"),
        other => panic!("expected Unauthorized, got {other}"),
    }
    w.good_agent_still_works(&before).await;
    // A fresh enrollment replaces the revoked identity.
    std::fs::remove_file(&id).unwrap();
    let id2 = w.enroll("rev");
    assert_eq!(id, id2);
    replicate_once(&cfg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_identity_then_garbage() {
    let w = world().await;
    let before = store_snapshot(&w.rcv.dir);
    let mut tls = tls_connect(w.rcv.addr, &w.good_id).await.unwrap();
    let mut junk = vec![0u8; 64];
    junk[4] = 0xEE; // an unknown frame kind
    tls.write_all(&junk).await.unwrap();
    let mut conn = Framed::new(tls, FrameCodec::default());
    expect_error(&mut conn, ErrorCode::Protocol, "unknown frame kind 238").await;
    w.good_agent_still_works(&before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_length_prefix() {
    let w = world().await;
    let before = store_snapshot(&w.rcv.dir);
    let mut conn = hello(w.rcv.addr, &w.good_id).await;
    let mut raw = BytesMut::new();
    raw.put_u32_le(0x7fff_ffff);
    raw.put_u8(7);
    raw.put_bytes(0, 11);
    conn.get_mut().write_all(&raw).await.unwrap();
    expect_error(&mut conn, ErrorCode::Protocol, "exceeds the limit").await;
    w.good_agent_still_works(&before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_bomb_is_rejected() {
    let w = world().await;
    let before = store_snapshot(&w.rcv.dir);
    let (_control, mut data, _) = session(w.rcv.addr, &w.good_id).await;
    let huge = vec![0u8; 64 << 20];
    let bomb = zstd::bulk::compress(&huge, 19).unwrap();
    let mut b = block(1, 0, &huge[..65536]);
    b.encoding = Encoding::Zstd;
    b.payload = Bytes::from(bomb);
    data.send(&Frame::Block(b)).await.unwrap();
    expect_error(&mut data, ErrorCode::BadBlock, "does not decompress").await;
    w.good_agent_still_works(&before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_with_wrong_hash_ends_the_session() {
    let w = world().await;
    let before = store_snapshot(&w.rcv.dir);
    let (mut control, mut data, _) = session(w.rcv.addr, &w.good_id).await;
    // A good block first (it reaches a pack), then a bad one.
    data.send(&Frame::Block(block(1, 0, &[7u8; 65536])))
        .await
        .unwrap();
    let mut bad = block(1, 1, &[8u8; 65536]);
    bad.hash = BlockHash::of(&[9u8; 65536]);
    data.send(&Frame::Block(bad)).await.unwrap();
    expect_error(&mut data, ErrorCode::BadBlock, "does not match its BLAKE3").await;
    // The whole session is closed, the control connection included.
    expect_error(
        &mut control,
        ErrorCode::BadBlock,
        "does not match its BLAKE3",
    )
    .await;
    w.good_agent_still_works(&before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_servers_session_cannot_be_joined() {
    let w = world().await;
    let (_control, _data, session_id) = session(w.rcv.addr, &w.good_id).await;
    let intruder = w.enroll("intruder");
    let before = store_snapshot(&w.rcv.dir);
    let mut conn = hello(w.rcv.addr, &intruder).await;
    conn.send(&Frame::Join {
        session: session_id,
    })
    .await
    .unwrap();
    expect_error(&mut conn, ErrorCode::Unauthorized, "no session").await;
    drop(_control);
    drop(_data);
    w.good_agent_still_works(&before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_block_index() {
    let w = world().await;
    let before = store_snapshot(&w.rcv.dir);
    let (_control, mut data, _) = session(w.rcv.addr, &w.good_id).await;
    data.send(&Frame::Block(block(1, 16, &[1u8; 65536])))
        .await
        .unwrap();
    expect_error(&mut data, ErrorCode::Protocol, "out of range").await;
    w.good_agent_still_works(&before).await;
}

fn zero_run(first: u64, count: u64) -> Frame {
    Frame::ZeroRun(pilotlight_protocol::ZeroRunFrame {
        tag: 1,
        volume: 0,
        first,
        count,
    })
}

/// The volume holds 16 blocks: a run from 10 of 7 blocks ends past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_run_past_the_volume_end() {
    let w = world().await;
    let before = store_snapshot(&w.rcv.dir);
    let (_control, mut data, _) = session(w.rcv.addr, &w.good_id).await;
    data.send(&zero_run(10, 7)).await.unwrap();
    expect_error(&mut data, ErrorCode::Protocol, "out of range").await;
    w.good_agent_still_works(&before).await;
}

/// A run of no blocks, or one whose end overflows, is not a frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_run_of_zero_blocks_or_wrapping() {
    let w = world().await;
    let before = store_snapshot(&w.rcv.dir);
    for (first, count, needle) in [(3, 0, "zero run count"), (u64::MAX - 1, 4, "zero run end")] {
        let (_control, mut data, _) = session(w.rcv.addr, &w.good_id).await;
        data.send(&zero_run(first, count)).await.unwrap();
        expect_error(&mut data, ErrorCode::Protocol, needle).await;
    }
    w.good_agent_still_works(&before).await;
}

fn partial(index: u64, base_hash: pilotlight_protocol::BlockHash) -> Frame {
    Frame::PartialBlock(pilotlight_protocol::PartialBlockFrame {
        tag: 1,
        volume: 0,
        index,
        raw_len: 65536,
        base_hash,
        ranges: vec![
            pilotlight_protocol::frame::ByteRange {
                offset: 100,
                len: 4,
            },
            pilotlight_protocol::frame::ByteRange {
                offset: 60000,
                len: 3,
            },
        ],
        data: bytes::Bytes::from_static(b"abcdxyz"),
    })
}

/// Frames only a receiver sends (a partial block's merged hash, a packed
/// hash listing), sent by an agent on a data stream or on the control
/// connection, end that session with a clear error and store nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_only_frames_from_an_agent_end_the_session() {
    let w = world().await;
    let before = store_snapshot(&w.rcv.dir);
    let hash = pilotlight_protocol::BlockHash::of(b"merged");
    let frames = [
        Frame::PartialApplied(pilotlight_protocol::PartialAppliedFrame {
            tag: 1,
            volume: 0,
            index: 0,
            hash,
        }),
        Frame::HashesPacked {
            volume: 0,
            start: 0,
            hashes: vec![hash, hash],
        },
    ];
    for frame in &frames {
        let (_control, mut data, _) = session(w.rcv.addr, &w.good_id).await;
        data.send(frame).await.unwrap();
        expect_error(&mut data, ErrorCode::Protocol, "unexpected").await;
        let (mut control, _data, _) = session(w.rcv.addr, &w.good_id).await;
        control.send(frame).await.unwrap();
        expect_error(&mut control, ErrorCode::Protocol, "unexpected").await;
    }
    w.good_agent_still_works(&before).await;
}

/// A `PartialBlock` whose base is no block this server stored (here: bytes
/// it never sent) ends the session; nothing of it is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_block_on_a_base_never_stored() {
    let w = world().await;
    let before = store_snapshot(&w.rcv.dir);
    let (_control, mut data, _) = session(w.rcv.addr, &w.good_id).await;
    let base = pilotlight_protocol::BlockHash::of(&[0x5au8; 65536]);
    data.send(&partial(0, base)).await.unwrap();
    expect_error(&mut data, ErrorCode::Protocol, "not a stored block").await;
    w.good_agent_still_works(&before).await;
}

/// A `PartialBlock` on a block of the server's earlier point: the receiver
/// answers the merged block's hash before acking it, and the point restores
/// with the ranges written over the old block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_block_merges_with_its_stored_base() {
    let w = world().await;
    let old = std::fs::read(&w.good_img).unwrap();
    let (index, base) = old
        .chunks(65536)
        .take(16)
        .enumerate()
        .find(|(_, b)| b.iter().any(|&x| x != 0))
        .map(|(i, b)| (i as u64, b.to_vec()))
        .expect("a block of data in the first megabyte");
    let mut merged = base.clone();
    merged[100..104].copy_from_slice(b"abcd");
    merged[60000..60003].copy_from_slice(b"xyz");
    let (mut control, mut data, _) = session(w.rcv.addr, &w.good_id).await;
    data.send(&partial(index, pilotlight_protocol::BlockHash::of(&base)))
        .await
        .unwrap();
    // The answer comes before the Received that covers the frame.
    let applied = match tokio::time::timeout(
        Duration::from_secs(20),
        futures_util::StreamExt::next(&mut data),
    )
    .await
    .expect("PartialApplied in time")
    {
        Some(Ok((_, Frame::PartialApplied(a)))) => a,
        other => panic!("expected PartialApplied, got {other:?}"),
    };
    assert_eq!(applied.index, index);
    assert_eq!(applied.hash, pilotlight_protocol::BlockHash::of(&merged));
    control
        .send(&Frame::EndPoint {
            tag: 1,
            blocks: 1,
            created_ms: 1,
            consistency: pilotlight_protocol::frame::Consistency::Fuzzy,
            commit: pilotlight_protocol::frame::CommitMode::Sync,
        })
        .await
        .unwrap();
    let point = loop {
        match tokio::time::timeout(
            Duration::from_secs(20),
            futures_util::StreamExt::next(&mut control),
        )
        .await
        .expect("Durable in time")
        {
            Some(Ok((_, Frame::Durable { point, .. }))) => break point,
            Some(Ok((_, Frame::Ping))) => continue,
            other => panic!("expected Durable, got {other:?}"),
        }
    };
    let out = w.root.join("partial.img");
    w.rcv.restore("good", "root", point, &out);
    let got = std::fs::read(&out).unwrap();
    let at = index as usize * 65536;
    assert_eq!(&got[at..at + 65536], &merged[..], "block {index}");
}

/// Overlapping runs are honest up to the point's block cap (the volume's
/// 16 blocks, 4 times): each counts its blocks, and the run that would pass
/// the cap is refused whole, before anything of it is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_zero_runs_past_the_point_cap() {
    let w = world().await;
    let before = store_snapshot(&w.rcv.dir);
    let (_control, mut data, _) = session(w.rcv.addr, &w.good_id).await;
    for _ in 0..4 {
        data.send(&zero_run(0, 16)).await.unwrap();
    }
    data.send(&zero_run(15, 1)).await.unwrap();
    expect_error(&mut data, ErrorCode::Protocol, "more than 64 blocks").await;
    w.good_agent_still_works(&before).await;
}

/// Overlapping runs and blocks within the cap make one point, whose block
/// map says zero for each block a run named last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_zero_runs_commit_as_one_zero_per_block() {
    let w = world().await;
    let (mut control, mut data, _) = session(w.rcv.addr, &w.good_id).await;
    data.send(&Frame::Block(block(1, 5, &[9u8; 65536])))
        .await
        .unwrap();
    data.send(&zero_run(2, 6)).await.unwrap();
    data.send(&zero_run(4, 12)).await.unwrap();
    data.send(&Frame::Block(block(1, 6, &[8u8; 65536])))
        .await
        .unwrap();
    control
        .send(&Frame::EndPoint {
            tag: 1,
            blocks: 1 + 6 + 12 + 1,
            created_ms: 1,
            consistency: pilotlight_protocol::frame::Consistency::Fuzzy,
            commit: pilotlight_protocol::frame::CommitMode::Sync,
        })
        .await
        .unwrap();
    let point = loop {
        match tokio::time::timeout(
            Duration::from_secs(20),
            futures_util::StreamExt::next(&mut control),
        )
        .await
        .expect("Durable in time")
        {
            Some(Ok((_, Frame::Durable { point, .. }))) => break point,
            Some(Ok((_, Frame::Ping))) => continue,
            other => panic!("expected Durable, got {other:?}"),
        }
    };
    let out = w.root.join("zero-runs.img");
    w.rcv.restore("good", "root", point, &out);
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len(), 1 << 20);
    // Blocks 0 and 1 are the world's earlier point's; 2..16 are this one's.
    for (i, b) in got.chunks(65536).enumerate().skip(2) {
        let want = if i == 6 { 8u8 } else { 0 };
        assert!(b.iter().all(|&x| x == want), "block {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_stalling_mid_frame_times_out() {
    let w = world().await;
    let before = store_snapshot(&w.rcv.dir);
    let (_control, mut data, _) = session(w.rcv.addr, &w.good_id).await;
    let mut raw = BytesMut::new();
    Frame::Block(block(1, 0, &[3u8; 65536])).encode(0, &mut raw);
    data.get_mut().write_all(&raw[..1000]).await.unwrap();
    data.get_mut().flush().await.unwrap();
    expect_error(&mut data, ErrorCode::Timeout, "idle").await;
    w.good_agent_still_works(&before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_protocol_version_is_named() {
    let w = world().await;
    let before = store_snapshot(&w.rcv.dir);
    let tls = tls_connect(w.rcv.addr, &w.good_id).await.unwrap();
    let mut conn = Framed::new(tls, FrameCodec::default());
    conn.send(&Frame::Hello {
        version: 99,
        features: 0,
    })
    .await
    .unwrap();
    expect_error(
        &mut conn,
        ErrorCode::Protocol,
        "unsupported protocol version 99",
    )
    .await;
    w.good_agent_still_works(&before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_stops_a_live_session() {
    let w = world().await;
    let id = w.enroll("live");
    let img = w.root.join("live.img");
    sample_image(&img, 2 << 20, 12);
    let mut cfg = agent_config(
        w.rcv.addr,
        &id,
        &w.root.join("live-state"),
        &[("root", &img)],
    );
    cfg.once = false;
    cfg.interval = Duration::from_millis(50);
    let agent = tokio::spawn(pilotlight_agent::run(cfg, Default::default()));
    let points = || {
        pilotlight_receiver::admin::points(&w.rcv.dir, Some("live"))
            .unwrap()
            .len()
    };
    wait_until(
        Duration::from_secs(30),
        "the live agent to make points",
        || points() >= 2,
    )
    .await;
    pilotlight_receiver::admin::revoke(&w.rcv.dir, "live").unwrap();
    let at_revoke = points();
    let err = tokio::time::timeout(Duration::from_secs(30), agent)
        .await
        .expect("agent stopped")
        .unwrap()
        .unwrap_err();
    match err {
        AgentError::Remote {
            code: ErrorCode::Unauthorized,
            message,
        } => assert!(message.contains("revoked"), "{message}"),
        other => panic!("expected Unauthorized, got {other}"),
    }
    // At most a commit already past its check when the revocation landed.
    assert!(
        points() <= at_revoke + 1,
        "points kept coming after the revocation"
    );
}

/// A restore connection of the server "good": `Hello` with the restore
/// feature, `Restore` of `volume` at `point`.
async fn restore_conn(
    w: &peer::World,
    (server, volume): (&str, &str),
    point: pilotlight_protocol::frame::PointSelector,
) -> peer::Conn {
    use futures_util::StreamExt;
    use pilotlight_protocol::limits::{FEATURE_PING, FEATURE_RESTORE, VERSION};
    let tls = tls_connect(w.rcv.addr, &w.good_id).await.unwrap();
    let mut c = Framed::new(tls, FrameCodec::default());
    let hello = Frame::Hello {
        version: VERSION,
        features: FEATURE_PING | FEATURE_RESTORE,
    };
    c.send(&hello).await.unwrap();
    match c.next().await.unwrap().unwrap().1 {
        Frame::Hello { features, .. } => assert_ne!(features & FEATURE_RESTORE, 0),
        other => panic!("expected Hello, got {other:?}"),
    }
    let req = pilotlight_protocol::frame::RestoreRequest {
        server: server.into(),
        volume: volume.into(),
        point,
    };
    c.send(&Frame::Restore(req)).await.unwrap();
    c
}

/// Read the answer to `Restore` up to `HashesEnd`; returns the block count.
async fn restore_listing(c: &mut peer::Conn) -> u64 {
    use futures_util::StreamExt;
    loop {
        match c.next().await.unwrap().unwrap().1 {
            Frame::RestoreInfo(_) | Frame::Hashes { .. } => {}
            Frame::HashesEnd { blocks, .. } => return blocks,
            other => panic!("expected the listing, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_fetch_past_the_end_is_refused() {
    use pilotlight_protocol::frame::PointSelector;
    let w = world().await;
    let before = store_snapshot(&w.rcv.dir);
    let mut c = restore_conn(&w, ("", "root"), PointSelector::Latest).await;
    let blocks = restore_listing(&mut c).await;
    c.send(&Frame::Fetch {
        indexes: vec![0, blocks],
    })
    .await
    .unwrap();
    let past = format!("fetch of block {blocks} past the end of volume root");
    expect_error(&mut c, ErrorCode::Protocol, &past).await;
    w.good_agent_still_works(&before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_fetch_flood_beyond_the_window_is_refused() {
    use pilotlight_protocol::frame::PointSelector;
    use pilotlight_protocol::limits::{FETCH_WINDOW, MAX_FETCH_PER_FRAME};
    let w = world().await;
    let before = store_snapshot(&w.rcv.dir);
    let mut c = restore_conn(&w, ("", "root"), PointSelector::Latest).await;
    restore_listing(&mut c).await;
    // Far more than the window, without reading a block: the receiver
    // cannot have sent enough to stay within it.
    let frames = 8 * FETCH_WINDOW / MAX_FETCH_PER_FRAME;
    for _ in 0..frames {
        let flood = Frame::Fetch {
            indexes: vec![0; MAX_FETCH_PER_FRAME],
        };
        if c.feed(&flood).await.is_err() {
            break;
        }
    }
    let _ = c.flush().await;
    expect_error(&mut c, ErrorCode::Protocol, "fetch window exceeded").await;
    w.good_agent_still_works(&before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_of_an_unknown_volume_point_or_server_is_refused() {
    use pilotlight_protocol::frame::{PointSelector, RestoreRequest};
    let w = world().await;
    let before = store_snapshot(&w.rcv.dir);
    let mut c = restore_conn(&w, ("", "nope"), PointSelector::Latest).await;
    expect_error(
        &mut c,
        ErrorCode::Other,
        "server good has no volume named nope",
    )
    .await;
    let mut c = restore_conn(&w, ("", "root"), PointSelector::Id(99)).await;
    expect_error(&mut c, ErrorCode::Other, "server good has no point 99").await;
    let mut c = restore_conn(&w, ("", "root"), PointSelector::At(0)).await;
    expect_error(&mut c, ErrorCode::Other, "no point at or before").await;
    // Another server's, enrolled or not: the same refusal.
    w.enroll("other");
    for server in ["other", "ghost"] {
        let mut c = restore_conn(&w, (server, "root"), PointSelector::Latest).await;
        let no = format!("server good may not restore the volumes of server {server}");
        expect_error(&mut c, ErrorCode::Unauthorized, &no).await;
    }
    // A Restore from a peer whose Hello lacks the restore feature.
    let mut c = hello(w.rcv.addr, &w.good_id).await;
    let req = RestoreRequest {
        server: String::new(),
        volume: "root".into(),
        point: PointSelector::Latest,
    };
    c.send(&Frame::Restore(req)).await.unwrap();
    expect_error(&mut c, ErrorCode::Protocol, "restore feature").await;
    let mut c = restore_conn(&w, ("", "root"), PointSelector::Latest).await;
    restore_listing(&mut c).await;
    c.send(&Frame::Goodbye).await.unwrap();
    w.good_agent_still_works(&before).await;
}

/// Checkpoint frames from a peer that lies (issue 15): one for a point out
/// of order, one that announces fewer blocks than arrived, and a `Resume`
/// of a sync the receiver never made each end the session with a protocol
/// error (or, for the last, an answer that resumes nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_checkpoints_end_the_session() {
    let w = world().await;
    let before = store_snapshot(&w.rcv.dir);
    // A Resume of a sync that does not exist resumes nothing.
    let (mut control, _data, _) = session(w.rcv.addr, &w.good_id).await;
    control
        .send(&Frame::Resume {
            sync: 42,
            generation: 7,
        })
        .await
        .unwrap();
    match futures_util::StreamExt::next(&mut control).await {
        Some(Ok((_, Frame::SyncState { resumed, .. }))) => assert!(!resumed),
        other => panic!("expected SyncState, got {other:?}"),
    }
    // A checkpoint of a point that is not next.
    control
        .send(&Frame::Checkpoint {
            tag: 5,
            blocks: 0,
            done: 0,
            total: 1,
        })
        .await
        .unwrap();
    expect_error(&mut control, ErrorCode::Protocol, "out of order").await;
    // More blocks arrived than the checkpoint says were sent.
    let (mut control, mut data, _) = session(w.rcv.addr, &w.good_id).await;
    for i in 0..2 {
        data.send(&Frame::Block(block(1, i, &[i as u8 + 1; 65536])))
            .await
            .unwrap();
    }
    // Both recorded (Hello and Join were frames 0 and 1 of the stream).
    let mut acked = 0;
    while acked < 3 {
        match futures_util::StreamExt::next(&mut data).await {
            Some(Ok((_, Frame::Received { seq }))) => acked = seq,
            other => panic!("expected Received, got {other:?}"),
        }
    }
    control
        .send(&Frame::Checkpoint {
            tag: 1,
            blocks: 1,
            done: 0,
            total: 1,
        })
        .await
        .unwrap();
    expect_error(
        &mut control,
        ErrorCode::Protocol,
        "announced 1 blocks but 2",
    )
    .await;
    drop((control, data));
    // Nothing of it was kept: the snapshot counts packs and points; the
    // refused checkpoints recorded nothing.
    w.good_agent_still_works(&before).await;
}
