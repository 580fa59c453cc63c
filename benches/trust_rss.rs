//! Receiver memory under attack (issue 14's benchmark): the resident set of a
//! real `pilotlight-receiver serve` process (release build) while
//!
//! 1. 300 TCP connections sit idle before TLS (and then 300 that finished the
//!    TLS handshake with an enrolled identity and never say Hello), and
//! 2. an enrolled server floods zero-encoded blocks (76 bytes on the wire, no
//!    payload) without `EndPoint`, on a declared 64 GiB volume, until the
//!    receiver cuts the session at the point's cap.
//!
//! Figures are `VmRSS` now and `VmHWM` (peak) from `/proc/PID/status`.
//!
//!     cargo build --release --bins && cargo bench --bench trust_rss
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench code

#[path = "../tests/peer/mod.rs"]
#[allow(unreachable_pub)]
mod peer;

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use pilotlight_protocol::block::zero_hash;
use pilotlight_protocol::codec::FrameCodec;
use pilotlight_protocol::frame::{BlockFrame, CommitMode, VolumeDecl};
use pilotlight_protocol::{Encoding, Frame};
use tokio::net::TcpStream;
use tokio_util::codec::{Framed, FramedRead, FramedWrite};

const BLOCK: u32 = 64 << 10;
/// The flooder's declared volume: 1 Mi blocks of 64 KiB.
const VOLUME: u64 = 64 << 30;

struct Receiver {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Receiver {
    fn start(dir: &Path) -> Self {
        let mut child = Command::new(pilotlight::bin("pilotlight-receiver"))
            .args(["serve", "--listen", "127.0.0.1:0", "--print-addr", "--dir"])
            .arg(dir)
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn pilotlight-receiver");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line.trim().parse().expect("receiver address");
        Self { child, addr }
    }

    /// (VmRSS, VmHWM) in MiB.
    fn memory(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib = |key: &str| -> f64 {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
    }
}

fn report(what: &str, rcv: &Receiver) {
    let (rss, hwm) = rcv.memory();
    println!("| {what} | {rss:.1} | {hwm:.1} |");
}

fn zero_block(tag: u64, index: u64) -> BlockFrame {
    BlockFrame {
        tag,
        volume: 0,
        encoding: Encoding::Zero,
        index,
        raw_len: BLOCK,
        hash: zero_hash(BLOCK as usize),
        payload: bytes::Bytes::new(),
    }
}

type DataWriter =
    FramedWrite<tokio::io::WriteHalf<tokio_rustls::client::TlsStream<TcpStream>>, FrameCodec>;

/// Open a session on one `VOLUME`-byte volume and join one data stream,
/// whose acks a task reads (as an agent does: a flooder that does not read
/// is cut by the receiver's write deadline instead).
async fn big_session(
    addr: SocketAddr,
    identity: &Path,
) -> (peer::Conn, DataWriter, tokio::task::JoinHandle<()>) {
    let mut control = peer::hello(addr, identity).await;
    let volumes = vec![VolumeDecl {
        name: "root".into(),
        size: VOLUME,
        block_size: BLOCK,
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
    let (rd, wr) = tokio::io::split(peer::tls_connect(addr, identity).await.unwrap());
    let mut rd = FramedRead::new(rd, FrameCodec::default());
    let mut wr = FramedWrite::new(wr, FrameCodec::default());
    wr.send(&Frame::hello()).await.unwrap();
    assert!(matches!(
        rd.next().await.unwrap().unwrap().1,
        Frame::Hello { .. }
    ));
    wr.send(&Frame::Join { session }).await.unwrap();
    assert_eq!(rd.next().await.unwrap().unwrap().1, Frame::Joined);
    let acks = tokio::spawn(async move { while let Some(Ok(_)) = rd.next().await {} });
    (control, wr, acks)
}

async fn idle_connections(rcv: &Receiver, id: &Path) {
    let mut tcp = Vec::new();
    for _ in 0..300 {
        tcp.push(TcpStream::connect(rcv.addr).await.unwrap());
    }
    report("300 idle TCP connections (before TLS)", rcv);
    drop(tcp);
    // Past the pre-authentication budget the receiver closes the surplus;
    // count how many it holds.
    let mut tls = Vec::new();
    for _ in 0..300 {
        if let Ok(c) = peer::tls_connect(rcv.addr, id).await {
            tls.push(Framed::new(c, FrameCodec::default()));
        }
    }
    report(
        &format!("{} TLS connections with an identity, no Hello", tls.len()),
        rcv,
    );
}

async fn flood(rcv: &Receiver, id: &Path) {
    let (mut control, mut data, drain) = big_session(rcv.addr, id).await;
    let blocks = VOLUME / u64::from(BLOCK);
    let started = Instant::now();
    let mut sent = 0u64;
    let mut peak = 0.0f64;
    while sent < 8 * blocks {
        let mut batch_ok = true;
        for _ in 0..4096 {
            if data
                .feed(&Frame::Block(zero_block(1, sent % blocks)))
                .await
                .is_err()
            {
                batch_ok = false;
                break;
            }
            sent += 1;
        }
        if !batch_ok || data.flush().await.is_err() {
            break;
        }
        peak = peak.max(rcv.memory().0);
        if sent.is_multiple_of(1 << 20) {
            report(&format!("flood: {} Mi zero blocks sent", sent >> 20), rcv);
        }
    }
    let cut = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match control.next().await {
                Some(Ok((_, Frame::Error { message, .. }))) => return message,
                Some(Ok(_)) => continue,
                _ => return "closed".to_owned(),
            }
        }
    })
    .await
    .unwrap_or_else(|_| "no answer in 30 s".into());
    println!(
        "\nflood: {sent} zero blocks ({:.0} MiB on the wire) in {:.1} s; receiver said: {cut}",
        sent as f64 * 76.0 / 1048576.0,
        started.elapsed().as_secs_f64()
    );
    report("flood: at the cut", rcv);
    drain.abort();
    println!("flood: peak RSS seen while sending: {peak:.1} MiB");
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` lists; nothing to list here
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("receiver");
    pilotlight_receiver::admin::init(&dir, Some("127.0.0.1:0")).unwrap();
    let idle_id = tmp.path().join("idle.pem");
    pilotlight_receiver::admin::enroll(&dir, "idle", &idle_id).unwrap();
    let flood_id = tmp.path().join("flood.pem");
    pilotlight_receiver::admin::enroll(&dir, "flooder", &flood_id).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();

    println!("| receiver state | VmRSS MiB | VmHWM MiB |\n|---|---|---|");
    let rcv = Receiver::start(&dir);
    report("started, idle", &rcv);
    rt.block_on(idle_connections(&rcv, &idle_id));
    drop(rcv);

    let rcv = Receiver::start(&dir);
    report("restarted, idle", &rcv);
    rt.block_on(flood(&rcv, &flood_id));
}
