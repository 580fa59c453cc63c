//! Shared helpers of the end-to-end tests and benchmarks (the root package's
//! library): sample data, an in-process receiver on 127.0.0.1, agent
//! configurations, the real binaries, and byte-for-byte comparisons.
//!
//! This is test code: a failed step panics with a message, as a test should.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod tracing_agent;

use std::fs::File;
use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use pilotlight_agent::{AgentConfig, CommitMode, ConsistencyMode, PointReport, VolumeSpec};
use pilotlight_receiver::restore::{PointSel, RestoreRequest};
use pilotlight_receiver::ReceiverConfig;
use rand::{Rng, RngCore, SeedableRng};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A receiver served in-process on 127.0.0.1 with an OS-chosen port.
pub struct TestReceiver {
    /// Receiver directory.
    pub dir: PathBuf,
    /// Where it listens.
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), pilotlight_receiver::ReceiveError>>,
}

impl TestReceiver {
    /// Create a receiver directory under `root` (init) and serve it.
    pub async fn create(root: &Path) -> Self {
        let dir = root.join("receiver");
        pilotlight_receiver::admin::init(&dir, Some("127.0.0.1:0")).expect("init receiver");
        Self::serve(&dir).await
    }

    /// Create a receiver directory with this configuration and serve it.
    pub async fn create_with(root: &Path, cfg: &ReceiverConfig) -> Self {
        let dir = root.join("receiver");
        pilotlight_receiver::admin::init(&dir, Some("127.0.0.1:0")).expect("init receiver");
        let text = toml::to_string(cfg).expect("config toml");
        std::fs::write(dir.join("receiver.toml"), text).expect("write receiver.toml");
        Self::serve(&dir).await
    }

    /// Serve an existing receiver directory.
    pub async fn serve(dir: &Path) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let shutdown = CancellationToken::new();
        let cfg = ReceiverConfig::load(dir).expect("config");
        let task = tokio::spawn(pilotlight_receiver::server::run(
            listener,
            dir.to_owned(),
            cfg,
            shutdown.clone(),
        ));
        Self {
            dir: dir.to_owned(),
            addr,
            shutdown,
            task,
        }
    }

    /// Enroll `server`; returns the identity file.
    pub fn enroll(&self, server: &str) -> PathBuf {
        let out = self
            .dir
            .parent()
            .unwrap_or(&self.dir)
            .join(format!("{server}.pem"));
        pilotlight_receiver::admin::enroll(&self.dir, server, &out).expect("enroll");
        out
    }

    /// Stop serving and wait for the server to finish.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task
            .await
            .expect("receiver task")
            .expect("receiver run");
    }

    /// Wait (up to 60 s) until the staging images of `server` equal its
    /// latest point: staging runs in a task of its own after `DURABLE`.
    pub async fn wait_staging(&self, server: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let Err(behind) = staging_caught_up(&self.dir, server) else {
                return;
            };
            assert!(std::time::Instant::now() < deadline, "{behind}");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Restore `volume` of `point` of `server` to `to` (replacing it).
    pub fn restore(&self, server: &str, volume: &str, point: u64, to: &Path) {
        restore_point(&self.dir, server, volume, point, to);
    }
}

/// Whether every staging image of `server` in the receiver directory `dir`
/// equals the server's latest point, or what is behind.
fn staging_caught_up(dir: &Path, server: &str) -> Result<(), String> {
    let store = pilotlight_receiver::store::Store::open(dir).expect("open store");
    let cat = store.catalog().expect("catalog");
    let id = cat.require_server(server).expect("server").id;
    let latest = cat.latest_point(id).expect("latest point");
    let volumes = cat.volumes(id).expect("volumes");
    if latest.is_some_and(|p| volumes.iter().all(|v| v.staging_point == p)) {
        Ok(())
    } else {
        Err(format!(
            "staging of {server} still behind point {latest:?}: {volumes:?}"
        ))
    }
}

/// Restore `volume` of `point` of `server` from the receiver directory
/// `dir` to `to` (replacing it).
pub fn restore_point(dir: &Path, server: &str, volume: &str, point: u64, to: &Path) {
    let req = RestoreRequest {
        server: server.into(),
        volume: volume.into(),
        point: PointSel::Id(point as i64),
        to: to.to_owned(),
        force: true,
        progress: false,
    };
    pilotlight_receiver::restore::restore(dir, &req).expect("restore");
}

/// Restore `volume` of `point` of `server` as an operator does, with
/// `pilotlight-receiver restore --force` (beside a running `serve`),
/// failing the test with its stderr.
pub fn restore_point_cli(dir: &Path, server: &str, volume: &str, point: u64, to: &Path) {
    let (dir, to, point_s) = (
        dir.to_str().expect("utf-8 path"),
        to.to_str().expect("utf-8 path"),
        point.to_string(),
    );
    let o = run_bin(
        "pilotlight-receiver",
        &[
            "restore", "--dir", dir, "--server", server, "--volume", volume, "--point", &point_s,
            "--to", to, "--force",
        ],
    );
    assert!(
        o.status.success(),
        "restore of point {point}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Bytes of all pack files of the receiver directory `dir`.
pub fn pack_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir.join("packs"))
        .expect("packs directory")
        .map(|e| {
            e.expect("pack entry")
                .metadata()
                .expect("pack metadata")
                .len()
        })
        .sum()
}

/// Number of block records in the packs under `dir` (walks each pack's
/// record headers: see the format in `pilotlight_receiver::pack`).
pub fn pack_records(dir: &Path) -> u64 {
    use pilotlight_receiver::pack::{PACK_HEADER_LEN, RECORD_HEADER_LEN, RECORD_MAGIC};
    let mut records = 0;
    for e in std::fs::read_dir(dir.join("packs")).expect("packs directory") {
        let bytes = std::fs::read(e.expect("pack entry").path()).expect("read pack");
        let mut at = PACK_HEADER_LEN as usize;
        while at < bytes.len() {
            let head = &bytes[at..at + RECORD_HEADER_LEN];
            assert_eq!(head[..4], RECORD_MAGIC, "record magic at {at}");
            let stored = u32::from_le_bytes(head[12..16].try_into().unwrap()) as usize;
            at += RECORD_HEADER_LEN + stored;
            records += 1;
        }
    }
    records
}

/// An agent configuration for one server against `addr`, making one point.
pub fn agent_config(
    addr: SocketAddr,
    identity: &Path,
    state: &Path,
    volumes: &[(&str, &Path)],
) -> AgentConfig {
    let vols = volumes
        .iter()
        .map(|(n, p)| VolumeSpec {
            name: (*n).to_owned(),
            path: p.to_path_buf(),
        })
        .collect();
    let mut cfg = AgentConfig::new(
        addr.to_string(),
        identity.to_owned(),
        state.to_owned(),
        vols,
    );
    cfg.once = true;
    cfg.commit = CommitMode::Sync;
    cfg.consistency = ConsistencyMode::Auto;
    cfg
}

/// Run the agent once and return the durable point.
pub async fn replicate_once(cfg: &AgentConfig) -> PointReport {
    let reports = pilotlight_agent::run(cfg.clone(), CancellationToken::new())
        .await
        .expect("agent run");
    reports.last().cloned().expect("a durable point")
}

/// Fill `path` with `size` bytes of mixed data: a half random, a quarter
/// zeros, a quarter text, in 64 KiB regions chosen by `seed`.
pub fn sample_image(path: &Path, size: u64, seed: u64) {
    let f = File::create(path).expect("create image");
    f.set_len(size).expect("size image");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let region = 64 * 1024u64;
    let mut buf = vec![0u8; region as usize];
    let text = b"pilotlight keeps a warm copy of every disk; restores are checked byte for byte. ";
    let mut off = 0;
    while off < size {
        let n = region.min(size - off) as usize;
        let Some(data) = buf.get_mut(..n) else { break };
        match rng.random_range(0..4u8) {
            0 | 1 => rng.fill_bytes(data),
            2 => {
                off += n as u64;
                continue;
            }
            _ => {
                for (i, b) in data.iter_mut().enumerate() {
                    *b = text[(i + off as usize) % text.len()];
                }
            }
        }
        f.write_all_at(data, off).expect("write image");
        off += n as u64;
    }
    f.sync_all().expect("sync image");
}

/// Overwrite `count` random 4 KiB-aligned 4 KiB blocks of `path` with random
/// data; returns their offsets.
pub fn overwrite_random_4k(path: &Path, count: usize, seed: u64) -> Vec<u64> {
    let f = File::options().write(true).open(path).expect("open image");
    let size = f.metadata().expect("metadata").len();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut buf = [0u8; 4096];
    let mut offsets = Vec::with_capacity(count);
    for _ in 0..count {
        let off = rng.random_range(0..size / 4096) * 4096;
        rng.fill_bytes(&mut buf);
        f.write_all_at(&buf, off).expect("overwrite");
        offsets.push(off);
    }
    f.sync_all().expect("sync");
    offsets
}

/// Panic unless the two files (or devices) hold the same `len` bytes; names
/// the first differing offset.
pub fn assert_same_bytes(a: &Path, b: &Path, len: u64) {
    let mut fa = File::open(a).expect("open a");
    let mut fb = File::open(b).expect("open b");
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(ba.len() as u64) as usize;
        fa.read_exact(&mut ba[..n]).expect("read a");
        fb.read_exact(&mut bb[..n]).expect("read b");
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            panic!(
                "{} and {} differ at byte {}",
                a.display(),
                b.display(),
                off + i as u64
            );
        }
        off += n as u64;
    }
}

/// Size of a file.
pub fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).expect("metadata").len()
}

/// Path of a workspace binary (`pilotlight-agent`, `pilotlight-receiver`),
/// built by `cargo test --workspace` because their crates have integration
/// tests.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is not built; run `cargo test --workspace` (or `cargo build --workspace --bins`) first",
        p.display()
    );
    p
}

/// Run a binary to completion.
pub fn run_bin(name: &str, args: &[&str]) -> Output {
    Command::new(bin(name))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("spawn binary")
}

/// Are we root (needed for loop devices)?
pub fn is_root() -> bool {
    nix_geteuid() == 0
}

fn nix_geteuid() -> u32 {
    // `id -u` avoids an unsafe libc call in the test support crate.
    Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(u32::MAX)
}

/// Fail the test unless it runs as root, naming what root is needed for.
///
/// Tests that need root or a tool are `#[ignore = "needs ..."]`: a plain
/// `cargo test` lists them as ignored, with the reason; run with
/// `--include-ignored` (as `.ci/run` does, as root), a missing prerequisite
/// fails them with the reason, never lets them pass without running.
pub fn require_root(for_what: &str) {
    assert!(
        is_root(),
        "this test needs root for {for_what}: run it as root (`.ci/run` does)"
    );
}

/// The Debian package that provides `program`, for the failure message.
fn package_of(program: &str) -> &'static str {
    match program {
        "fio" => "fio",
        "systemd-analyze" => "systemd",
        "mount" | "umount" => "mount",
        "faketime" => "faketime",
        "nbdinfo" | "nbdcopy" | "nbdfuse" => "libnbd-bin",
        "qemu-img" | "qemu-io" => "qemu-utils",
        "promtool" => "prometheus",
        "nbdkit" => "nbdkit and nbdkit-plugin-python",
        "chromium" => "chromium",
        "curl" => "curl",
        "dpkg" | "dpkg-deb" => "dpkg",
        "strip" => "binutils",
        "useradd" => "passwd",
        "moto_server" => "moto[server] (pip install 'moto[server]')",
        p if p.starts_with("mkfs.xfs") => "xfsprogs",
        p if p.starts_with("mkfs.ext") || p == "e2fsck" => "e2fsprogs",
        _ => "util-linux",
    }
}

/// Fail the test unless every program of `programs` is installed (found on
/// `PATH` or in /sbin, /usr/sbin), naming the first one missing and its
/// package. See [`require_root`].
pub fn require_tools(programs: &[&str]) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .collect();
    for program in programs {
        assert!(
            dirs.iter().any(|d| d.join(program).is_file()),
            "this test needs `{program}`, which is not installed (Debian package {}; `.ci/run` installs it)",
            package_of(program)
        );
    }
}

/// A deadline for a test waiting on a condition: the loop looks, and if the
/// condition does not hold yet calls [`Deadline::next`], which fails the test
/// once the deadline has passed and otherwise pauses for a moment.
///
/// The one place the tests pause: they wait for a condition, bounded by a
/// deadline, never for a fixed time in the hope that something is done.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    at: std::time::Instant,
    every: std::time::Duration,
}

impl Deadline {
    /// A deadline `timeout` from now, looking again every 10 ms.
    pub fn after(timeout: std::time::Duration) -> Self {
        Self {
            at: std::time::Instant::now() + timeout,
            every: std::time::Duration::from_millis(10),
        }
    }

    /// Look again every `every` instead (shorter to catch a brief state,
    /// longer where looking is costly).
    pub fn every(self, every: std::time::Duration) -> Self {
        Self { every, ..self }
    }

    /// Whether the deadline has passed.
    pub fn passed(&self) -> bool {
        std::time::Instant::now() >= self.at
    }

    /// Fail the test with `why()` if the deadline has passed; otherwise
    /// pause for a moment before the caller looks again.
    pub async fn next(&self, why: impl FnOnce() -> String) {
        if self.passed() {
            panic!("{}", why());
        }
        tokio::time::sleep(self.every).await;
    }

    /// [`Deadline::next`] for a test outside an async runtime: blocks the
    /// thread for the pause.
    pub fn next_blocking(&self, why: impl FnOnce() -> String) {
        if self.passed() {
            panic!("{}", why());
        }
        // The pause of a deadline-bounded wait (a wake-up before it ends
        // only makes the caller look sooner).
        std::thread::park_timeout(self.every);
    }
}

/// Wait until `cond` holds, looking every 10 ms; fail the test, naming
/// `what`, if it does not within `timeout`.
pub async fn wait_until(timeout: std::time::Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Deadline::after(timeout);
    while !cond() {
        deadline
            .next(|| format!("timed out after {timeout:?} waiting for {what}"))
            .await;
    }
}

/// A loop device attached to a backing file, detached on drop.
pub struct LoopDevice {
    /// The device path, e.g. /dev/loop3.
    pub path: PathBuf,
}

impl LoopDevice {
    /// Attach `backing`; panics, saying why, where loop devices are
    /// unavailable (the tests that call this are `#[ignore]`d with the
    /// reason, and fail rather than pass when run without it).
    pub fn attach(backing: &Path) -> Self {
        require_root("loop devices");
        require_tools(&["losetup"]);
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(backing)
            .output()
            .unwrap_or_else(|e| panic!("losetup cannot run: {e}"));
        assert!(
            out.status.success(),
            "losetup cannot attach a loop device: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Self { path }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// Compressed size (zstd level 1) of the 64 KiB blocks of `path` that
/// contain any of `offsets`, as the agent would send them.
pub fn compressed_size_of_blocks(path: &Path, offsets: &[u64], block_size: u64) -> u64 {
    let f = File::open(path).expect("open");
    let size = f.metadata().expect("metadata").len();
    let mut blocks: Vec<u64> = offsets.iter().map(|o| o / block_size).collect();
    blocks.sort_unstable();
    blocks.dedup();
    let mut total = 0;
    let mut buf = vec![0u8; block_size as usize];
    for b in blocks {
        let off = b * block_size;
        let n = block_size.min(size - off) as usize;
        f.read_exact_at(&mut buf[..n], off).expect("read");
        let c = zstd::bulk::compress(&buf[..n], 1).expect("compress");
        total += (c.len() as u64).min(n as u64);
    }
    total
}

/// Copy the first `len` bytes of a file or device to a new file.
pub fn copy_bytes(src: &Path, dst: &Path, len: u64) {
    let mut from = File::open(src).expect("open source");
    let mut to = File::create(dst).expect("create copy");
    let copied = std::io::copy(&mut (&mut from).take(len), &mut to).expect("copy");
    assert_eq!(copied, len, "short copy of {}", src.display());
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `pilotlight-receiver serve` on 127.0.0.1 (OS-chosen port); returns
/// the process and the address it printed.
pub fn spawn_receiver(dir: &Path) -> (ChildGuard, SocketAddr) {
    spawn_receiver_on(dir, "127.0.0.1:0")
}

/// Start `pilotlight-receiver serve` on `listen` (e.g. the port an earlier,
/// killed receiver had).
pub fn spawn_receiver_on(dir: &Path, listen: &str) -> (ChildGuard, SocketAddr) {
    use std::io::BufRead;
    let mut child = Command::new(bin("pilotlight-receiver"))
        .args(["serve", "--listen", listen, "--print-addr", "--dir"])
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn receiver");
    let stdout = child.stdout.take().expect("stdout");
    let guard = ChildGuard(child);
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read address");
    let addr = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("receiver printed {line:?}, not an address"));
    (guard, addr)
}

/// A small ext4 filesystem in a file, loop-mounted; unmounted and detached on
/// drop.
pub struct SmallFs {
    /// Mount point.
    pub mount: PathBuf,
    dev: Option<LoopDevice>,
}

impl SmallFs {
    /// Make and mount an ext4 filesystem of `size` bytes at `root/mnt`.
    pub fn create(root: &Path, size: u64) -> Self {
        Self::create_with(
            root,
            size,
            &["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal"],
        )
    }

    /// Make a filesystem with `mkfs` (program and arguments; the device is
    /// appended) of `size` bytes and mount it at `root/mnt`. Panics, saying
    /// why, where that cannot be done (not root, a tool missing).
    pub fn create_with(root: &Path, size: u64, mkfs: &[&str]) -> Self {
        require_tools(&[mkfs[0], "mount", "umount"]);
        let img = root.join("smallfs.img");
        File::create(&img)
            .and_then(|f| f.set_len(size))
            .expect("filesystem image");
        let dev = LoopDevice::attach(&img);
        let out = Command::new(mkfs[0])
            .args(&mkfs[1..])
            .arg(&dev.path)
            .output()
            .unwrap_or_else(|e| panic!("{} cannot run: {e}", mkfs[0]));
        assert!(
            out.status.success(),
            "{} failed: {}",
            mkfs.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let mount = root.join("mnt");
        std::fs::create_dir_all(&mount).expect("mount point");
        let out = Command::new("mount")
            .arg(&dev.path)
            .arg(&mount)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Self {
            mount,
            dev: Some(dev),
        }
    }
}

impl SmallFs {
    /// The loop device the filesystem is on.
    pub fn device(&self) -> &Path {
        self.dev
            .as_ref()
            .map_or(Path::new(""), |d| d.path.as_path())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        self.dev.take();
    }
}

/// Fill the filesystem holding `path` with a file of zeros written until it
/// is full, then give back `leave` bytes. Returns the filler's path.
pub fn fill_filesystem(dir: &Path, leave: u64) -> PathBuf {
    use std::io::Write;
    let filler = dir.join("filler");
    let mut f = File::create(&filler).expect("filler");
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    while f.write_all(&chunk).is_ok() {
        written += chunk.len() as u64;
    }
    let _ = f.sync_all();
    f.set_len(written.saturating_sub(leave))
        .expect("shrink filler");
    f.sync_all().expect("sync filler");
    filler
}

/// The Prometheus text a `--metrics` endpoint on 127.0.0.1:`port` serves
/// now (HTTP headers included), or `None` while it does not answer.
pub fn scrape_metrics(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    c.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    c.read_to_string(&mut out).ok()?;
    Some(out)
}

/// A moto S3 server on 127.0.0.1 (an OS-chosen port), killed at drop.
/// Its buckets live in its memory: a restarted one starts empty.
pub struct Moto {
    /// The port it listens on.
    pub port: u16,
    child: Option<ChildGuard>,
}

impl Moto {
    /// Start `moto_server` on a free port and wait (up to 60 s) until it
    /// answers.
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut m = Self { port, child: None };
        m.restart();
        m
    }

    /// Start it again on its port (after [`Moto::stop`]).
    pub fn restart(&mut self) {
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn moto_server");
        self.child = Some(ChildGuard(child));
        let deadline = Deadline::after(std::time::Duration::from_secs(60))
            .every(std::time::Duration::from_millis(100));
        while self.request("GET", "/").is_none() {
            deadline.next_blocking(|| format!("moto_server did not answer on port {}", self.port));
        }
    }

    /// Kill it (its buckets are gone with it).
    pub fn stop(&mut self) {
        self.child = None;
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The AWS environment a receiver needs to use it.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
        ]
    }

    /// Create `bucket`.
    pub fn create_bucket(&self, bucket: &str) {
        let status = self
            .request("PUT", &format!("/{bucket}"))
            .expect("moto answers");
        assert!(
            status.starts_with("HTTP/1.1 200"),
            "create bucket {bucket}: {status}"
        );
    }

    /// Create `bucket` with S3 Object Lock enabled and a default retention
    /// of `days` in COMPLIANCE mode: every object put into it is locked
    /// that long.
    pub fn create_locked_bucket(&self, bucket: &str, days: u32) {
        let path = format!("/{bucket}");
        let (status, body) = self
            .call(
                "PUT",
                &path,
                &[("x-amz-bucket-object-lock-enabled", "true")],
                b"",
            )
            .expect("moto answers");
        assert!(
            status.starts_with("HTTP/1.1 200"),
            "create bucket {bucket}: {status} {body}"
        );
        let config = format!(
            "<ObjectLockConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
             <ObjectLockEnabled>Enabled</ObjectLockEnabled><Rule><DefaultRetention>\
             <Mode>COMPLIANCE</Mode><Days>{days}</Days></DefaultRetention></Rule>\
             </ObjectLockConfiguration>"
        );
        let (status, body) = self
            .call(
                "PUT",
                &format!("{path}?object-lock"),
                &[],
                config.as_bytes(),
            )
            .expect("moto answers");
        assert!(
            status.starts_with("HTTP/1.1 200"),
            "lock bucket {bucket}: {status} {body}"
        );
    }

    /// One HTTP request with `headers` and `body`: the status line with the
    /// response's headers, and the body (as text, lossily), or `None` if
    /// nobody answers.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Option<(String, String)> {
        use std::io::{Read, Write};
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.port,
            body.len()
        );
        for (k, v) in headers {
            if !k.eq_ignore_ascii_case("host") {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
        }
        head.push_str("\r\n");
        tcp.write_all(head.as_bytes()).ok()?;
        tcp.write_all(body).ok()?;
        let mut out = Vec::new();
        tcp.read_to_end(&mut out).ok()?;
        let out = String::from_utf8_lossy(&out);
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        (!head.is_empty()).then(|| (head.to_owned(), body.to_owned()))
    }

    /// One plain HTTP request; the status line, or `None` if nobody answers.
    fn request(&self, method: &str, path: &str) -> Option<String> {
        use std::io::{BufRead, Write};
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        write!(
            tcp,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .ok()?;
        let mut line = String::new();
        std::io::BufReader::new(tcp).read_line(&mut line).ok()?;
        (!line.is_empty()).then_some(line)
    }
}

/// A command's output that succeeded: its stdout (panics with its stderr
/// otherwise).
pub fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// A failure as the CLI contract wants it: non-zero exit and exactly one
/// sentence on stderr, mentioning `needle`.
pub fn fails(out: &std::process::Output, needle: &str) {
    assert!(
        !out.status.success(),
        "unexpectedly succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "want one line on stderr, got {err:?}");
    assert!(
        lines[0].contains(needle),
        "stderr {:?} does not mention {needle:?}",
        lines[0]
    );
}
