//! Bad input and unauthorised peers, each against a live receiver: a clear,
//! specific error, a closed session, nothing stored, and a good agent
//! replicating correctly right after.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use pilotlight::{
    agent_config, assert_same_bytes, file_len, replicate_once, sample_image, wait_until,
    TestReceiver,
};
use pilotlight_agent::AgentError;
use pilotlight_protocol::codec::FrameCodec;
use pilotlight_protocol::frame::{BlockFrame, CommitMode, ErrorCode, VolumeDecl};
use pilotlight_protocol::{BlockHash, Encoding, Frame};
use pilotlight_receiver::ReceiverConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_util::codec::Framed;

type Conn = Framed<TlsStream<TcpStream>, FrameCodec>;

/// Everything the store holds on disk, to show that nothing changed.
fn store_snapshot(dir: &Path) -> (Vec<(String, u64)>, usize, Vec<String>) {
    let mut packs: Vec<(String, u64)> = std::fs::read_dir(dir.join("packs"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .collect();
    packs.sort();
    let points = pilotlight_receiver::admin::points(dir, None).unwrap().len();
    let store = pilotlight_receiver::store::Store::open(dir).unwrap();
    let mut vols = Vec::new();
    let servers = store.catalog().unwrap().servers().unwrap();
    for s in servers {
        let volumes = store.catalog().unwrap().volumes(s.id).unwrap();
        for v in volumes {
            vols.push(format!("{}/{}", s.name, v.name));
        }
    }
    (packs, points, vols)
}

struct World {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    rcv: TestReceiver,
    good_id: PathBuf,
    good_img: PathBuf,
}

async fn world() -> World {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_owned();
    let cfg = ReceiverConfig {
        idle_timeout_secs: 2,
        handshake_timeout_secs: 2,
        ..ReceiverConfig::default()
    };
    let rcv = TestReceiver::create_with(&root, &cfg).await;
    let good_id = rcv.enroll("good");
    let good_img = root.join("good.img");
    sample_image(&good_img, 4 << 20, 77);
    // One point already stored, so "unchanged" has something to protect.
    replicate_once(&agent_config(
        rcv.addr,
        &good_id,
        &root.join("good-state"),
        &[("root", &good_img)],
    ))
    .await;
    World {
        _tmp: tmp,
        root,
        rcv,
        good_id,
        good_img,
    }
}

impl World {
    /// After an attack: the store is unchanged and a good agent replicates.
    async fn good_agent_still_works(&self, before: &(Vec<(String, u64)>, usize, Vec<String>)) {
        assert_eq!(&store_snapshot(&self.rcv.dir), before, "the store changed");
        pilotlight::overwrite_random_4k(&self.good_img, 8, rand::random());
        let cfg = agent_config(
            self.rcv.addr,
            &self.good_id,
            &self.root.join("good-state"),
            &[("root", &self.good_img)],
        );
        let p = replicate_once(&cfg).await;
        let out = self.root.join(format!("good-{}", p.point));
        self.rcv.restore("good", "root", p.point, &out);
        assert_same_bytes(&out, &self.good_img, file_len(&self.good_img));
    }

    fn enroll(&self, server: &str) -> PathBuf {
        self.rcv.enroll(server)
    }
}

async fn tls_connect(
    addr: std::net::SocketAddr,
    identity: &Path,
) -> Result<TlsStream<TcpStream>, std::io::Error> {
    let cfg = pilotlight_agent::identity::client_config(identity).unwrap();
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from("pilotlight-receiver").unwrap();
    tokio_rustls::TlsConnector::from(Arc::clone(&cfg))
        .connect(name, tcp)
        .await
}

async fn hello(addr: std::net::SocketAddr, identity: &Path) -> Conn {
    let mut c = Framed::new(
        tls_connect(addr, identity).await.unwrap(),
        FrameCodec::default(),
    );
    c.send(&Frame::hello()).await.unwrap();
    match c.next().await.unwrap().unwrap().1 {
        Frame::Hello { .. } => c,
        other => panic!("expected Hello, got {other:?}"),
    }
}

/// Open a session with one 1 MiB volume and join one data stream.
async fn session(addr: std::net::SocketAddr, identity: &Path) -> (Conn, Conn, u64) {
    let mut control = hello(addr, identity).await;
    let volumes = vec![VolumeDecl {
        name: "root".into(),
        size: 1 << 20,
        block_size: 65536,
    }];
    control
        .send(&Frame::Open {
            streams: 1,
            commit: CommitMode::Sync,
            volumes,
        })
        .await
        .unwrap();
    let session = match control.next().await.unwrap().unwrap().1 {
        Frame::Welcome { session, .. } => session,
        other => panic!("expected Welcome, got {other:?}"),
    };
    let mut data = hello(addr, identity).await;
    data.send(&Frame::Join { session }).await.unwrap();
    assert_eq!(data.next().await.unwrap().unwrap().1, Frame::Joined);
    (control, data, session)
}

/// The receiver's answer: an Error frame with `code` whose sentence contains
/// `needle`, then the connection closes.
async fn expect_error(conn: &mut Conn, code: ErrorCode, needle: &str) {
    let frame = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match conn.next().await {
                Some(Ok((_, Frame::Received { .. }))) => continue,
                Some(Ok((_, f))) => return Some(f),
                _ => return None,
            }
        }
    })
    .await
    .expect("the receiver answered in time");
    match frame {
        Some(Frame::Error { code: c, message }) => {
            assert_eq!(c, code, "error code for {message:?}");
            assert!(
                message.contains(needle),
                "error {message:?} does not mention {needle:?}"
            );
        }
        other => panic!("expected an Error frame, got {other:?}"),
    }
    let end = tokio::time::timeout(Duration::from_secs(10), conn.next())
        .await
        .expect("closed in time");
    assert!(
        !matches!(end, Some(Ok(_))),
        "connection still open: {end:?}"
    );
}

fn block(tag: u64, index: u64, data: &[u8]) -> BlockFrame {
    BlockFrame {
        tag,
        volume: 0,
        encoding: Encoding::Raw,
        index,
        raw_len: data.len() as u32,
        hash: BlockHash::of(data),
        payload: Bytes::copy_from_slice(data),
    }
}

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
