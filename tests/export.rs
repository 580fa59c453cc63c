//! Instant export: recovery points served over NBD by
//! `pilotlight-receiver export`, read by real clients (nbdinfo, nbdcopy,
//! qemu-img, qemu-io) and by a raw client that sends what real clients
//! never do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use pilotlight::{
    agent_config, assert_same_bytes, bin, file_len, overwrite_random_4k, replicate_once,
    require_tools, sample_image, ChildGuard, Deadline, TestReceiver,
};
use pilotlight_agent::AgentConfig;

const MIB: u64 = 1 << 20;
/// Not a multiple of the 64 KiB block: the last block is short.
const SIZE: u64 = 8 * MIB + 12_288;

/// A running `pilotlight-receiver export`.
struct Exported {
    child: ChildGuard,
    uri: String,
}

impl Exported {
    /// Export `point` of db1/root; `how` is `--socket PATH`, `--listen ADDR`
    /// and more flags.
    fn start(dir: &Path, point: u64, how: &[&str]) -> Self {
        let mut child = Command::new(bin("pilotlight-receiver"))
            .args(["export", "--server", "db1", "--volume", "root", "--point"])
            .arg(point.to_string())
            .arg("--dir")
            .arg(dir)
            .args(how)
            .env(
                "RUST_LOG",
                std::env::var("EXPORT_LOG").unwrap_or("warn".into()),
            )
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn export");
        let stdout = child.stdout.take().unwrap();
        let child = ChildGuard(child);
        let mut uri = String::new();
        std::io::BufReader::new(stdout).read_line(&mut uri).unwrap();
        let uri = uri.trim().to_owned();
        assert!(uri.starts_with("nbd"), "export printed {uri:?}");
        Self { child, uri }
    }

    /// The TCP address of a `nbd://` export.
    fn addr(&self) -> String {
        let rest = self.uri.strip_prefix("nbd://").unwrap();
        rest.split('/').next().unwrap().to_owned()
    }

    /// SIGTERM, and wait for a clean exit.
    fn stop(mut self) {
        let pid = self.child.0.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let deadline = Deadline::after(Duration::from_secs(20));
        loop {
            if let Some(status) = self.child.0.try_wait().unwrap() {
                assert!(status.success(), "export exited with {status}");
                return;
            }
            deadline.next_blocking(|| "export did not stop on SIGTERM".into());
        }
    }
}

/// A receiver with db1/root replicated twice; returns the points, the
/// copies of the source at each, and the agent's configuration.
async fn two_points(root: &Path) -> (TestReceiver, Vec<(u64, PathBuf)>, AgentConfig, PathBuf) {
    let rcv = TestReceiver::create(root).await;
    let identity = rcv.enroll("db1");
    let src = root.join("root.img");
    sample_image(&src, SIZE, 7);
    let cfg = agent_config(rcv.addr, &identity, &root.join("state"), &[("root", &src)]);
    let mut points = Vec::new();
    for v in 0..2u64 {
        if v > 0 {
            overwrite_random_4k(&src, 40, 50 + v);
        }
        let report = replicate_once(&cfg).await;
        let copy = root.join(format!("root.v{v}"));
        std::fs::copy(&src, &copy).unwrap();
        points.push((report.point, copy));
    }
    (rcv, points, cfg, src)
}

fn run(program: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn pins(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("exports"))
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "pin"))
            })
            .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nbdinfo, nbdcopy, qemu-img"]
async fn exported_points_read_as_restored() {
    require_tools(&["nbdinfo", "nbdcopy", "qemu-img"]);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (rcv, points, cfg, src) = two_points(root).await;
    let sock = root.join("old.sock");
    let old = Exported::start(&rcv.dir, points[0].0, &["--socket", sock.to_str().unwrap()]);
    let new = Exported::start(&rcv.dir, points[1].0, &["--listen", "127.0.0.1:0"]);
    assert!(
        old.uri.starts_with("nbd+unix:///db1/root?socket="),
        "{}",
        old.uri
    );
    assert!(new.uri.starts_with("nbd://127.0.0.1:"), "{}", new.uri);
    assert_eq!(pins(&rcv.dir), 2);

    for (exp, (point, copy)) in [(&old, &points[0]), (&new, &points[1])] {
        let info: serde_json::Value =
            serde_json::from_slice(&run("nbdinfo", &["--json", &exp.uri]).stdout).unwrap();
        assert_eq!(info["exports"][0]["export-size"], SIZE, "{info}");
        let map = String::from_utf8(run("nbdinfo", &["--map", &exp.uri]).stdout).unwrap();
        assert!(map.contains("hole,zero"), "zero blocks are holes: {map}");
        assert!(map.contains("data"), "{map}");
        let restored = root.join(format!("restored-{point}"));
        rcv.restore("db1", "root", *point, &restored);
        let copied = root.join(format!("copied-{point}"));
        run("nbdcopy", &[&exp.uri, copied.to_str().unwrap()]);
        assert_eq!(file_len(&copied), SIZE);
        assert_same_bytes(&copied, &restored, SIZE);
        assert_same_bytes(&copied, copy, SIZE);
        run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                restored.to_str().unwrap(),
                &exp.uri,
            ],
        );
    }

    // A third point while both are exported; the oldest still reads as it was.
    overwrite_random_4k(&src, 40, 99);
    let third = replicate_once(&cfg).await;
    assert!(third.point > points[1].0);
    let again = root.join("copied-again");
    run("nbdcopy", &[&old.uri, again.to_str().unwrap()]);
    assert_same_bytes(&again, &points[0].1, SIZE);

    // An unknown export name: nbdinfo fails cleanly, the export goes on.
    let bad = format!("nbd://{}/db1/nope", new.addr());
    let out = Command::new("nbdinfo").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    run("nbdinfo", &["--size", &new.uri]);

    old.stop();
    new.stop();
    assert!(!sock.exists(), "the socket is removed");
    assert_eq!(pins(&rcv.dir), 0, "the pins are removed");
    rcv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs qemu-io"]
async fn writes_to_a_writable_export_never_reach_the_point() {
    require_tools(&["qemu-io"]);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (rcv, points, _, _) = two_points(root).await;
    let (point, copy) = &points[0];
    let kept = root.join("kept.img");
    let exp = Exported::start(
        &rcv.dir,
        *point,
        &[
            "--listen",
            "127.0.0.1:0",
            "--writable",
            "--keep-overlay",
            kept.to_str().unwrap(),
        ],
    );
    let io = |cmd: &str| run("qemu-io", &["-f", "raw", "-c", cmd, &exp.uri]);
    io("write -P 0xab 0 64k");
    io("write -P 0xcd 100000 5000"); // unaligned, across blocks
    io("write -z 1048576 65536");
    // Another connection sees the overlay.
    io("read -P 0xab 0 64k");
    io("read -P 0xcd 100000 5000");
    io("read -P 0 1048576 65536");
    exp.stop();
    // The kept overlay holds the written blocks and names them.
    let mut head = vec![0u8; 65536];
    std::fs::File::open(&kept)
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert!(head.iter().all(|b| *b == 0xab));
    let side: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("kept.img.blocks.json")).unwrap()).unwrap();
    assert_eq!(side["point"], *point);
    // 0..64k and 100000..105000: blocks 0 and 1; 1 MiB: block 16.
    assert_eq!(side["blocks"][1], serde_json::json!([16, 17]), "{side}");
    assert_eq!(side["blocks"][0], serde_json::json!([0, 2]), "{side}");
    let report = pilotlight_receiver::verify::verify(&rcv.dir, None, None, false).unwrap();
    assert!(report.ok, "{:?}", report.damaged);
    let restored = root.join("restored");
    rcv.restore("db1", "root", *point, &restored);
    assert_same_bytes(&restored, copy, SIZE);
    rcv.stop().await;
}

/// A raw NBD client: what real clients never send.
struct Raw(TcpStream);

const OPT_MAGIC: u64 = 0x4948_4156_454f_5054;

impl Raw {
    fn connect(addr: &str) -> Self {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = Self(s);
        let mut greeting = [0u8; 18];
        r.0.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        r
    }

    fn send(&mut self, b: &[u8]) {
        self.0.write_all(b).unwrap();
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = BytesMut::new();
        b.put_u64(OPT_MAGIC);
        b.put_u32(option);
        b.put_u32(data.len() as u32);
        b.put_slice(data);
        self.send(&b);
    }

    /// The next option reply: (option, type, data).
    fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h).unwrap();
        let mut b = &h[..];
        assert_eq!(b.get_u64(), 0x0003_e889_0455_65a9);
        let (opt, kind, len) = (b.get_u32(), b.get_u32(), b.get_u32());
        let mut data = vec![0u8; len as usize];
        self.0.read_exact(&mut data).unwrap();
        (opt, kind, data)
    }

    /// NBD_OPT_GO on `name`; the reply type that ends it.
    fn go(&mut self, name: &str) -> u32 {
        let mut d = BytesMut::new();
        d.put_u32(name.len() as u32);
        d.put_slice(name.as_bytes());
        d.put_u16(0);
        self.option(7, &d);
        loop {
            let (_, kind, _) = self.reply();
            if kind != 3 {
                return kind;
            }
        }
    }

    #[track_caller]
    /// A request; returns the simple reply's error (and reads `read` bytes of data).
    fn request(&mut self, kind: u16, offset: u64, len: u32, payload: &[u8], read: usize) -> u32 {
        let mut b = BytesMut::new();
        b.put_u32(0x2560_9513);
        b.put_u16(0);
        b.put_u16(kind);
        b.put_u64(42);
        b.put_u64(offset);
        b.put_u32(len);
        b.put_slice(payload);
        self.send(&b);
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).unwrap();
        let mut r = &h[..];
        assert_eq!(r.get_u32(), 0x6744_6698);
        let err = r.get_u32();
        assert_eq!(r.get_u64(), 42);
        if err == 0 && read > 0 {
            let mut data = vec![0u8; read];
            self.0.read_exact(&mut data).unwrap();
        }
        err
    }

    /// A READ answered by a simple reply: its data.
    fn read_data(&mut self, offset: u64, len: u32) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u32(0x2560_9513);
        b.put_u32(0); // flags 0, NBD_CMD_READ
        b.put_u64(5);
        b.put_u64(offset);
        b.put_u32(len);
        self.send(&b);
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).unwrap();
        let mut r = &h[..];
        assert_eq!((r.get_u32(), r.get_u32(), r.get_u64()), (0x6744_6698, 0, 5));
        let mut data = vec![0u8; len as usize];
        self.0.read_exact(&mut data).unwrap();
        data
    }

    /// Negotiate structured replies, then NBD_OPT_GO on `name`.
    fn structured(addr: &str, name: &str) -> Self {
        let mut c = Self::connect(addr);
        c.send(&[0, 0, 0, 3]);
        c.option(8, b"");
        assert_eq!(c.reply().1, 1, "structured replies acknowledged");
        assert_eq!(c.go(name), 1);
        c
    }

    /// A READ with command `flags`, answered in structured chunks:
    /// `(chunk flags, chunk type, payload)` up to the one flagged done.
    fn read_chunks(&mut self, flags: u16, offset: u64, len: u32) -> Vec<(u16, u16, Vec<u8>)> {
        let mut b = BytesMut::new();
        b.put_u32(0x2560_9513);
        b.put_u16(flags);
        b.put_u16(0);
        b.put_u64(77);
        b.put_u64(offset);
        b.put_u32(len);
        self.send(&b);
        let mut chunks = Vec::new();
        loop {
            let mut h = [0u8; 20];
            self.0.read_exact(&mut h).unwrap();
            let mut r = &h[..];
            assert_eq!(r.get_u32(), 0x668e_33ef);
            let (flags, kind, cookie, n) = (r.get_u16(), r.get_u16(), r.get_u64(), r.get_u32());
            assert_eq!(cookie, 77);
            let mut payload = vec![0u8; n as usize];
            self.0.read_exact(&mut payload).unwrap();
            chunks.push((flags, kind, payload));
            if flags & 1 != 0 {
                return chunks;
            }
        }
    }

    /// Whether the server closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_nbd_errors_or_a_closed_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (rcv, points, _, _) = two_points(root).await;
    let exp = Exported::start(&rcv.dir, points[1].0, &["--listen", "127.0.0.1:0"]);
    let addr = exp.addr();

    // A good client in transmission all along.
    let mut good = Raw::connect(&addr);
    good.send(&[0, 0, 0, 3]);
    assert_eq!(good.go("db1/root"), 1, "GO acknowledged");
    assert_eq!(good.request(0, 0, 4096, &[], 4096), 0);

    // Haggling: unknown export, unknown option, then abort.
    let mut c = Raw::connect(&addr);
    c.send(&[0, 0, 0, 3]);
    assert_eq!(c.go("db1/nope"), (1 << 31) | 6, "NBD_REP_ERR_UNKNOWN");
    c.option(99, b"whatever");
    assert_eq!(c.reply().1, (1 << 31) | 1, "NBD_REP_ERR_UNSUP");
    c.option(3, b"");
    let (_, kind, server) = c.reply();
    assert_eq!(kind, 2);
    assert_eq!(&server[4..], b"db1/root");
    assert_eq!(c.reply().1, 1);
    // Option data that lies about its lengths, and meta contexts before
    // structured replies: NBD_REP_ERR_INVALID, and the haggling goes on.
    let mut lying = BytesMut::new();
    lying.put_u32(4000); // a name of 4000 bytes in 8
    lying.put_slice(b"db1/root");
    c.option(7, &lying);
    assert_eq!(c.reply().1, (1 << 31) | 3, "GO with a truncated name");
    c.option(6, &[0, 0]);
    assert_eq!(
        c.reply().1,
        (1 << 31) | 3,
        "INFO shorter than its name length"
    );
    let mut meta = BytesMut::new();
    meta.put_u32(8);
    meta.put_slice(b"db1/root");
    meta.put_u32(1);
    meta.put_u32(15);
    meta.put_slice(b"base:allocation");
    c.option(10, &meta);
    assert_eq!(
        c.reply().1,
        (1 << 31) | 3,
        "SET_META_CONTEXT before structured replies"
    );
    c.option(8, b"junk");
    assert_eq!(c.reply().1, (1 << 31) | 3, "STRUCTURED_REPLY with data");
    c.option(2, b"");
    assert_eq!(c.reply().1, 1, "abort acknowledged");
    assert!(c.closed());

    // Malformed handshakes close the connection.
    let mut c = Raw::connect(&addr);
    c.send(&[0xff, 0xff, 0xff, 0xff]);
    assert!(c.closed(), "unknown client flags");
    let mut c = Raw::connect(&addr);
    c.send(&[0, 0, 0, 3]);
    let mut huge = BytesMut::new();
    huge.put_u64(OPT_MAGIC);
    huge.put_u32(7);
    huge.put_u32(u32::MAX);
    c.send(&huge);
    assert!(c.closed(), "an option of 4 GiB");
    let mut c = Raw::connect(&addr);
    c.send(&[0, 0, 0, 3]);
    c.send(b"NOTMAGIC\0\0\0\x07\0\0\0\0");
    assert!(c.closed(), "an option without IHAVEOPT");
    let mut c = Raw::connect(&addr);
    c.send(&[0, 0, 0, 3]);
    c.send(b"NBD_OPT_EXPORT_NAME with garbage");
    assert!(c.closed());

    // Transmission: past the end and too long are errors, writes to a
    // read-only export EPERM, and the connection goes on.
    assert_eq!(
        good.request(0, SIZE - 512, 1024, &[], 0),
        22,
        "EINVAL past the end"
    );
    assert_eq!(
        good.request(0, u64::MAX - 10, 512, &[], 0),
        22,
        "EINVAL, no overflow"
    );
    assert_eq!(
        good.request(0, 0, 64 << 20, &[], 0),
        22,
        "a read over 32 MiB"
    );
    assert_eq!(good.request(1, 0, 512, &[0xab; 512], 0), 1, "EPERM");
    assert_eq!(good.request(6, 0, 512, &[], 0), 1, "EPERM for WRITE_ZEROES");
    assert_eq!(good.request(4, 0, 512, &[], 0), 1, "EPERM for TRIM");
    assert_eq!(
        good.request(3, 0, 0, &[], 0),
        0,
        "FLUSH of a read-only export"
    );
    assert_eq!(
        good.request(99, 0, 512, &[], 0),
        22,
        "EINVAL for an unknown command"
    );
    assert_eq!(
        good.request(7, 0, 512, &[], 0),
        22,
        "no block status without a context"
    );
    assert_eq!(good.request(0, SIZE - 512, 512, &[], 512), 0);
    // With structured replies, errors come as an error chunk.
    let mut c = Raw::connect(&addr);
    c.send(&[0, 0, 0, 3]);
    c.option(8, b"");
    assert_eq!(c.reply().1, 1);
    assert_eq!(c.go("db1/root"), 1);
    let mut req = BytesMut::new();
    req.put_u32(0x2560_9513);
    req.put_u16(0);
    req.put_u16(0);
    req.put_u64(9);
    req.put_u64(SIZE);
    req.put_u32(512);
    c.send(&req);
    let mut chunk = [0u8; 26];
    c.0.read_exact(&mut chunk).unwrap();
    let mut r = &chunk[..];
    assert_eq!(r.get_u32(), 0x668e_33ef);
    assert_eq!((r.get_u16(), r.get_u16(), r.get_u64()), (1, 0x8001, 9));
    assert_eq!((r.get_u32(), r.get_u32()), (6, 22), "EINVAL past the end");
    // A WRITE longer than any payload closes that connection only (its
    // data cannot be skipped safely).
    let mut c = Raw::connect(&addr);
    c.send(&[0, 0, 0, 3]);
    assert_eq!(c.go("db1/root"), 1);
    let mut req = BytesMut::new();
    req.put_u32(0x2560_9513);
    req.put_u16(0);
    req.put_u16(1);
    req.put_u64(3);
    req.put_u64(0);
    req.put_u32(64 << 20);
    c.send(&req);
    assert!(c.closed(), "a 64 MiB write");
    // A request without its magic closes that connection only.
    let mut c = Raw::connect(&addr);
    c.send(&[0, 0, 0, 3]);
    assert_eq!(c.go(""), 1, "the default export");
    c.send(&[0u8; 28]);
    assert!(c.closed());
    assert_eq!(good.request(0, 0, 65536, &[], 65536), 0);
    let mut disc = BytesMut::new();
    disc.put_u32(0x2560_9513);
    disc.put_u32(2); // flags 0, NBD_CMD_DISC
    disc.put_bytes(0, 20);
    good.send(&disc);
    assert!(good.closed());
    exp.stop();
    rcv.stop().await;
}

/// The bytes a structured READ's chunks stand for, `len` from `offset`;
/// also how many hole chunks and data chunks there were.
fn assemble(chunks: &[(u16, u16, Vec<u8>)], offset: u64, len: usize) -> (Vec<u8>, usize, usize) {
    let mut out = vec![0xeeu8; len];
    let (mut holes, mut datas) = (0, 0);
    for (_, kind, payload) in chunks {
        let mut p = &payload[..];
        match kind {
            1 => {
                let at = (p.get_u64() - offset) as usize;
                out[at..at + p.len()].copy_from_slice(p);
                datas += 1;
            }
            2 => {
                assert_eq!(payload.len(), 12, "a hole chunk is 12 bytes");
                let at = (p.get_u64() - offset) as usize;
                let n = p.get_u32() as usize;
                assert!(n > 0);
                out[at..at + n].fill(0);
                holes += 1;
            }
            0 => assert!(payload.is_empty()),
            other => panic!("unexpected chunk type {other:#x}"),
        }
    }
    (out, holes, datas)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_reads_answer_zero_blocks_as_holes() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (rcv, points, _, _) = two_points(root).await;
    let (point, copy) = &points[1];
    let want = std::fs::read(copy).unwrap();
    let bs = 64 * 1024usize;
    let zero_block = want
        .chunks(bs)
        .position(|b| b.iter().all(|x| *x == 0))
        .expect("the sample image has zero blocks");
    let exp = Exported::start(&rcv.dir, *point, &["--listen", "127.0.0.1:0"]);
    let mut c = Raw::structured(&exp.addr(), "db1/root");

    // The whole disk in one read: zero blocks come as holes, data as data,
    // and together they are the point.
    let chunks = c.read_chunks(0, 0, SIZE as u32);
    let (got, holes, datas) = assemble(&chunks, 0, SIZE as usize);
    assert!(holes > 0 && datas > 0, "{holes} holes, {datas} data chunks");
    assert!(got == want, "the chunks read as the point");
    for (_, kind, payload) in &chunks {
        if *kind == 2 {
            let mut p = &payload[..];
            let (at, n) = (p.get_u64() as usize, p.get_u32() as usize);
            assert!(at % bs == 0 && n % bs == 0, "holes are whole blocks");
            assert!(want[at..at + n].iter().all(|x| *x == 0));
        }
    }
    // A read inside one zero block is one hole, flagged done.
    let at = (zero_block * bs + 512) as u64;
    let chunks = c.read_chunks(0, at, 4096);
    assert_eq!(chunks.len(), 1, "{chunks:?}");
    assert_eq!((chunks[0].0, chunks[0].1), (1, 2));
    assert_eq!(assemble(&chunks, at, 4096).0, vec![0u8; 4096]);
    // "Don't fragment": one data chunk with the zeros written out.
    let chunks = c.read_chunks(1 << 2, 0, SIZE as u32);
    assert_eq!(chunks.len(), 1, "one chunk with NBD_CMD_FLAG_DF");
    let (got, holes, _) = assemble(&chunks, 0, SIZE as usize);
    assert!(holes == 0 && got == want);
    // Without structured replies the zeros are sent as data.
    let mut plain = Raw::connect(&exp.addr());
    plain.send(&[0, 0, 0, 3]);
    assert_eq!(plain.go("db1/root"), 1);
    let data = plain.read_data(0, SIZE as u32);
    assert!(data == want, "a simple reply carries every byte");
    exp.stop();
    rcv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_keeps_the_exported_point_until_the_export_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (rcv, points, _, _) = two_points(root).await;
    let (old, copy) = &points[0];
    let sock = root.join("x.sock");
    let exp = Exported::start(&rcv.dir, *old, &["--socket", sock.to_str().unwrap()]);
    let mut policy = pilotlight_receiver::retention::Policy::none();
    policy.keep_last = 1;
    let items = pilotlight_receiver::admin::prune(&rcv.dir, Some("db1"), &policy, false).unwrap();
    let item = items.iter().find(|i| i.point == *old as i64).unwrap();
    assert!(item.keep && item.reasons.contains(&"exported"), "{item:?}");
    let listed = pilotlight_receiver::admin::points(&rcv.dir, Some("db1")).unwrap();
    assert!(listed.iter().any(|p| p.id == *old as i64));
    let restored = root.join("restored");
    rcv.restore("db1", "root", *old, &restored);
    assert_same_bytes(&restored, copy, SIZE);
    exp.stop();
    let items = pilotlight_receiver::admin::prune(&rcv.dir, Some("db1"), &policy, false).unwrap();
    assert!(items.iter().any(|i| i.point == *old as i64 && i.removed()));
    rcv.stop().await;
}

/// Where block `index`'s record of db1/root at `point` is: (pack file, payload offset).
fn block_record(dir: &Path, point: u64, index: u64) -> Option<(PathBuf, u64)> {
    let store = pilotlight_receiver::store::Store::open(dir).unwrap();
    let cat = store.catalog().unwrap();
    let p = cat
        .points(Some("db1"))
        .unwrap()
        .into_iter()
        .find(|p| p.id == point as i64)?;
    let vol = p.volumes.iter().find(|v| v.name == "root")?;
    let map = cat.block_map(vol.volume_id, p.id, 0).unwrap();
    let hash = map.iter().find(|(i, _)| *i == index)?.1?;
    let loc = cat.block(&hash).unwrap()?;
    let payload = loc.offset + pilotlight_receiver::pack::RECORD_HEADER_LEN as u64;
    Some((pilotlight_receiver::pack::pack_path(dir, loc.pack), payload))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_block_reads_as_eio_never_as_wrong_data() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (rcv, points, _, _) = two_points(root).await;
    let point = points[1].0;
    let bs = 64 * 1024u64;
    let blocks = SIZE.div_ceil(bs);
    let data_block = (0..blocks)
        .find(|i| block_record(&rcv.dir, point, *i).is_some())
        .unwrap();
    let (pack, at) = block_record(&rcv.dir, point, data_block).unwrap();
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&pack)
        .unwrap();
    let mut byte = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut byte, at + 3).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[byte[0] ^ 0xff], at + 3).unwrap();
    drop(f);

    let exp = Exported::start(&rcv.dir, point, &["--listen", "127.0.0.1:0"]);
    let mut c = Raw::connect(&exp.addr());
    c.send(&[0, 0, 0, 3]);
    assert_eq!(c.go("db1/root"), 1);
    assert_eq!(c.request(0, data_block * bs + 512, 4096, &[], 0), 5, "EIO");
    // With structured replies: an error chunk alone, no data before it,
    // also when the read spans good blocks and holes as well.
    let mut s = Raw::structured(&exp.addr(), "db1/root");
    let from = data_block.saturating_sub(1) * bs;
    let chunks = s.read_chunks(0, from, (3 * bs) as u32);
    assert_eq!(chunks.len(), 1, "{chunks:?}");
    let (flags, kind, payload) = &chunks[0];
    assert_eq!((*flags, *kind), (1, 0x8001));
    assert_eq!((&payload[..]).get_u32(), 5, "EIO");
    // The rest of the disk still reads.
    let other = (0..blocks).find(|i| *i != data_block).unwrap();
    assert_eq!(c.request(0, other * bs, 4096, &[], 4096), 0);
    exp.stop();
    rcv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_past_the_limit_are_closed_and_the_rest_served() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (rcv, points, _, _) = two_points(root).await;
    let exp = Exported::start(&rcv.dir, points[0].0, &["--listen", "127.0.0.1:0"]);
    let mut clients: Vec<Raw> = (0..pilotlight_receiver::export::MAX_CLIENTS)
        .map(|_| {
            let mut c = Raw::connect(&exp.addr());
            c.send(&[0, 0, 0, 3]);
            assert_eq!(c.go("db1/root"), 1);
            c
        })
        .collect();
    let mut extra = TcpStream::connect(exp.addr()).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut b = [0u8; 1];
    assert!(matches!(extra.read(&mut b), Ok(0) | Err(_)), "one too many");
    for c in &mut clients {
        assert_eq!(c.request(0, 0, 512, &[], 512), 0);
    }
    drop(clients);
    exp.stop();
    rcv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_nbd_is_refused_off_loopback_and_unknown_points_fail() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (rcv, points, _, _) = two_points(root).await;
    let dir = rcv.dir.to_str().unwrap().to_owned();
    let point = points[0].0.to_string();
    let export = |extra: &[&str]| {
        let mut args = vec![
            "export", "--dir", &dir, "--server", "db1", "--volume", "root",
        ];
        args.extend_from_slice(extra);
        pilotlight::run_bin("pilotlight-receiver", &args)
    };
    let out = export(&["--point", &point, "--listen", "0.0.0.0:0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("loopback"), "{err}");
    let out = export(&["--point", "999"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no point 999"),
        "{err}"
    );
    let out = export(&["--latest", "--keep-overlay", "/tmp/x"]);
    assert!(!out.status.success(), "--keep-overlay needs --writable");
    let out = pilotlight::run_bin(
        "pilotlight-receiver",
        &[
            "export", "--dir", &dir, "--server", "db1", "--volume", "nope", "--latest",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("nope"), "{err}");
    assert_eq!(pins(&rcv.dir), 0, "a refused export leaves no pin");
    rcv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs qemu-io, nbdcopy"]
async fn a_drill_exports_every_volume_writable_and_changes_nothing() {
    require_tools(&["qemu-io", "nbdcopy"]);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let rcv = TestReceiver::create(root).await;
    let identity = rcv.enroll("db1");
    let (a, b) = (root.join("a.img"), root.join("b.img"));
    sample_image(&a, SIZE, 1);
    sample_image(&b, 4 * MIB, 2);
    let cfg = agent_config(
        rcv.addr,
        &identity,
        &root.join("state"),
        &[("root", &a), ("data", &b)],
    );
    let point = replicate_once(&cfg).await.point;
    let sockets = root.join("drill");
    let mut child = Command::new(bin("pilotlight-receiver"))
        .args(["drill", "--server", "db1", "--latest", "--dir"])
        .arg(&rcv.dir)
        .arg("--socket-dir")
        .arg(&sockets)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let drill = Exported {
        child: ChildGuard(child),
        uri: String::new(),
    };
    let mut uris = std::collections::HashMap::new();
    for _ in 0..2 {
        let line = lines.next().unwrap().unwrap();
        let (vol, uri) = line.split_once(' ').unwrap();
        uris.insert(vol.to_owned(), uri.to_owned());
    }
    for (vol, src, size) in [("root", &a, SIZE), ("data", &b, 4 * MIB)] {
        let uri = &uris[vol];
        assert!(uri.starts_with("nbd+unix:///db1/"), "{uri}");
        run("qemu-io", &["-f", "raw", "-c", "write -P 0x5a 0 64k", uri]);
        run("qemu-io", &["-f", "raw", "-c", "read -P 0x5a 0 64k", uri]);
        let copied = root.join(format!("drill-{vol}"));
        run("nbdcopy", &[uri, copied.to_str().unwrap()]);
        let restored = root.join(format!("restored-{vol}"));
        rcv.restore("db1", vol, point, &restored);
        // The drill sees its write; past it, the point.
        let mut head = vec![0u8; 65536];
        std::fs::File::open(&copied)
            .unwrap()
            .read_exact(&mut head)
            .unwrap();
        assert!(head.iter().all(|x| *x == 0x5a));
        assert_same_bytes(&restored, src, size);
    }
    assert_eq!(pins(&rcv.dir), 2);
    drill.stop();
    assert_eq!(pins(&rcv.dir), 0);
    assert!(!sockets.join("root.sock").exists());
    let report = pilotlight_receiver::verify::verify(&rcv.dir, None, None, false).unwrap();
    assert!(report.ok, "{:?}", report.damaged);
    rcv.stop().await;
}
