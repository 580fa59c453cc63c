//! A protocol-speaking test peer with an enrolled identity, and the world it
//! attacks: a live receiver holding one good point, and the checks that an
//! attack changed nothing. Shared by `hostile.rs` and `connections.rs`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)] // each test file uses its own part

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use pilotlight::{
    agent_config, assert_same_bytes, file_len, replicate_once, sample_image, TestReceiver,
};
use pilotlight_protocol::codec::FrameCodec;
use pilotlight_protocol::frame::{BlockFrame, CommitMode, ErrorCode, VolumeDecl};
use pilotlight_protocol::{BlockHash, Encoding, Frame};
use pilotlight_receiver::ReceiverConfig;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_util::codec::Framed;

pub(crate) type Conn = Framed<TlsStream<TcpStream>, FrameCodec>;

/// Everything the store holds on disk, to show that nothing changed.
pub(crate) fn store_snapshot(dir: &Path) -> (Vec<(String, u64)>, usize, Vec<String>) {
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

pub(crate) struct World {
    _tmp: tempfile::TempDir,
    pub(crate) root: PathBuf,
    pub(crate) rcv: TestReceiver,
    pub(crate) good_id: PathBuf,
    pub(crate) good_img: PathBuf,
}

/// The world of `hostile.rs`: short idle and handshake timeouts.
pub(crate) async fn world() -> World {
    world_with(ReceiverConfig {
        idle_timeout_secs: 2,
        handshake_timeout_secs: 2,
        ..ReceiverConfig::default()
    })
    .await
}

/// A receiver served with `cfg`, holding one point of the server "good".
pub(crate) async fn world_with(cfg: ReceiverConfig) -> World {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_owned();
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
    pub(crate) async fn good_agent_still_works(
        &self,
        before: &(Vec<(String, u64)>, usize, Vec<String>),
    ) {
        // The receiver cuts an aborted session's uncommitted pack tail when
        // it sees the connection go, which may be just after the client's
        // last read: wait for that, bounded.
        let deadline = pilotlight::Deadline::after(std::time::Duration::from_secs(10));
        while &store_snapshot(&self.rcv.dir) != before && !deadline.passed() {
            deadline
                .next(|| "the store changed and did not settle".into())
                .await;
        }
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

    pub(crate) fn enroll(&self, server: &str) -> PathBuf {
        self.rcv.enroll(server)
    }
}

pub(crate) async fn tls_connect(
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

pub(crate) async fn hello(addr: std::net::SocketAddr, identity: &Path) -> Conn {
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
pub(crate) async fn session(addr: std::net::SocketAddr, identity: &Path) -> (Conn, Conn, u64) {
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
pub(crate) async fn expect_error(conn: &mut Conn, code: ErrorCode, needle: &str) {
    let frame = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match conn.next().await {
                Some(Ok((_, Frame::Received { .. } | Frame::Fetched(_)))) => continue,
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

pub(crate) fn block(tag: u64, index: u64, data: &[u8]) -> BlockFrame {
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
