//! Power loss, not only kill -9: the receiver's store and the agent's state
//! live on an ext4 filesystem whose device records every write and flush in
//! order (nbdkit running `tests/support/recorder.py`, behind `nbdfuse` and a
//! loop device). A workload enrolls a server and an operator, makes points,
//! prunes, collects garbage and makes more points (the initial sync
//! checkpoints every 512 KiB); then makes points while `serve` prunes and
//! collects garbage by itself; then runs a live-tracking agent on a loop
//! device over the volume and stops it cleanly after a write, so that it
//! saves its dirty set. It notes the log's length at every acknowledgement.
//! Crash images are then built from the log: the device at
//! every flush, and at random flushes with a random subset of the writes
//! that followed (some torn at a 512-byte sector). Each image is repaired as
//! after a power cut (`e2fsck -fy`, then mounted, which replays the
//! journal) and must keep every promise made before the cut: the identity
//! files enrollment wrote are whole, every point
//! acknowledged DURABLE is listed and restores byte for byte, every listed
//! point restores as it was made, `verify` finds no damage, and on a sample
//! of images (and on every image after the dirty set was saved) a receiver
//! serves the store again and the agent, with the state it had at the cut,
//! makes a new point that restores byte for byte: the live-tracking agent
//! where the image may hold its state, taking up the saved dirty set where
//! the image holds it (the device is unchanged since), so a stale or torn
//! set that lost a write would show.
//!
//! `PILOTLIGHT_POWER_IMAGES` (default 1000) sets how many images to check,
//! `PILOTLIGHT_POWER_SEED` the seed of the random choices (printed);
//! `benches/power.sh` runs longer campaigns. A failing image is kept and its
//! path printed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pilotlight::tracing_agent::{require_tracing, TracingAgent};
use pilotlight::{
    agent_config, overwrite_random_4k, replicate_once, require_root, require_tools, restore_point,
    sample_image, ChildGuard, Deadline, LoopDevice, TestReceiver,
};
use pilotlight_agent::status::State;
use pilotlight_agent::trace::DIRTY_FILE;
use pilotlight_protocol::atomic_file::Access;
use pilotlight_protocol::clock::now_ms;
use pilotlight_receiver::retention::Policy;
use pilotlight_receiver::ReceiverConfig;
use rand::RngCore;
use rand::{Rng, SeedableRng};

/// The recorded disk holds two filesystems, the store's and the agent's
/// (offset, size): one order of writes and flushes for both, as on one
/// disk, while an fsync of one does not commit the other's journal (an
/// agent's fsync on the same filesystem would hide a receiver's missing one).
const PARTS: [(u64, u64); 2] = [(0, 32 << 20), (32 << 20, 16 << 20)];
/// Size of the recorded disk.
const DISK_SIZE: u64 = 48 << 20;
/// Mount points of the parts, under a recording's or a check's root.
const MOUNTS: [&str; 2] = ["store-fs", "agent-fs"];
/// Size of the replicated volume.
const VOLUME: u64 = 4 << 20;
const SERVER: &str = "web1";
/// The volume's name: the one `TracingAgent` gives its device.
const VOLUME_NAME: &str = "root";
/// Block size of every agent here.
const BLOCK_SIZE: u32 = 64 << 10;
/// The tracing agent's flags for it.
const TRACE_BLOCKS: [&str; 2] = ["--block-size", "65536"];
/// One image in this many also takes a new point.
const NEW_POINT_EVERY: usize = 40;

/// The store's and the agent's device: nbdkit (recorder.py) -> nbdfuse ->
/// a loop device per part -> ext4.
struct Recording {
    /// Mount points: the store's filesystem, the agent's.
    mounts: [PathBuf; 2],
    fuse: PathBuf,
    log: PathBuf,
    devs: Vec<LoopDevice>,
    nbdfuse: Option<ChildGuard>,
    nbdkit: Option<ChildGuard>,
}

impl Recording {
    fn start(root: &Path, base: &Path) -> Self {
        let sock = root.join("nbd.sock");
        let log = root.join("writes.log");
        let recorder = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/recorder.py");
        let nbdkit = Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(&sock)
            .arg("python")
            .arg(&recorder)
            .arg(format!("base={}", base.display()))
            .arg(format!("log={}", log.display()))
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn nbdkit");
        let nbdkit = ChildGuard(nbdkit);
        let deadline = Deadline::after(Duration::from_secs(30));
        while !sock.exists() {
            deadline.next_blocking(|| "nbdkit did not create its socket".into());
        }
        let fuse = root.join("fuse");
        std::fs::create_dir_all(&fuse).expect("fuse dir");
        let nbdfuse = Command::new("nbdfuse")
            .arg(&fuse)
            .arg("--unix")
            .arg(&sock)
            .spawn()
            .expect("spawn nbdfuse");
        let nbdfuse = ChildGuard(nbdfuse);
        let file = fuse.join("nbd");
        let deadline = Deadline::after(Duration::from_secs(30));
        while std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) != DISK_SIZE {
            deadline.next_blocking(|| "nbdfuse did not show the device".into());
        }
        let mounts = MOUNTS.map(|m| root.join(m));
        let devs = PARTS
            .iter()
            .zip(&mounts)
            .map(|(&(offset, size), mount)| {
                let dev = attach_part(&file, offset, size);
                mount_at(&dev.path, mount).expect("mount a recorded filesystem");
                dev
            })
            .collect();
        Self {
            mounts,
            fuse,
            log,
            devs,
            nbdfuse: Some(nbdfuse),
            nbdkit: Some(nbdkit),
        }
    }

    /// The log's length now: every flush answered before this call is in it.
    fn position(&self) -> u64 {
        std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0)
    }

    /// Unmount everything and return the log.
    fn finish(mut self) -> Vec<u8> {
        self.teardown();
        std::fs::read(&self.log).expect("read the write log")
    }

    fn teardown(&mut self) {
        if self.devs.is_empty() {
            return;
        }
        for m in &self.mounts {
            let _ = Command::new("umount").arg(m).status();
        }
        self.devs.clear();
        let _ = Command::new("umount").arg(&self.fuse).status();
        if let Some(mut f) = self.nbdfuse.take() {
            let _ = f.0.wait();
        }
        self.nbdkit.take();
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// A loop device over `size` bytes at `offset` of `file`.
fn attach_part(file: &Path, offset: u64, size: u64) -> LoopDevice {
    let out = Command::new("losetup")
        .args(["--find", "--show", "--offset"])
        .arg(offset.to_string())
        .arg("--sizelimit")
        .arg(size.to_string())
        .arg(file)
        .output()
        .expect("run losetup");
    assert!(out.status.success(), "losetup: {out:?}");
    LoopDevice {
        path: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
    }
}

fn mount_at(dev: &Path, at: &Path) -> Result<(), String> {
    std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
    let out = Command::new("mount")
        .arg(dev)
        .arg(at)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "mount failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// One record of the write log.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// Data at `off`: `len` bytes at `data` in the log.
    Write {
        off: u64,
        len: usize,
        data: usize,
    },
    Zero {
        off: u64,
        len: usize,
    },
    Flush,
}

/// The log parsed: its records and where each starts in the log.
struct Log {
    bytes: Vec<u8>,
    ops: Vec<(u64, Op)>,
}

impl Log {
    fn parse(bytes: Vec<u8>) -> Self {
        let mut ops = Vec::new();
        let mut i = 0;
        while i + 13 <= bytes.len() {
            let kind = bytes[i];
            let off = u64::from_le_bytes(bytes[i + 1..i + 9].try_into().unwrap());
            let len = u32::from_le_bytes(bytes[i + 9..i + 13].try_into().unwrap()) as usize;
            let op = match kind {
                1 => {
                    if i + 13 + len > bytes.len() {
                        break; // cut short at the end: the recorder was stopped
                    }
                    Op::Write {
                        off,
                        len,
                        data: i + 13,
                    }
                }
                2 => Op::Flush,
                3 => Op::Zero { off, len },
                k => panic!("write log record of unknown kind {k} at {i}"),
            };
            ops.push((i as u64, op));
            i += 13 + if kind == 1 { len } else { 0 };
        }
        Self { bytes, ops }
    }

    /// Indexes just after each flush (the first is 0: nothing written).
    fn boundaries(&self) -> Vec<usize> {
        let mut b = vec![0];
        b.extend(
            self.ops
                .iter()
                .enumerate()
                .filter(|(_, (_, op))| matches!(op, Op::Flush))
                .map(|(i, _)| i + 1),
        );
        b
    }

    /// How many flushes precede log position `pos`.
    fn flushes_before(&self, pos: u64) -> usize {
        self.ops
            .iter()
            .filter(|(p, op)| *p < pos && matches!(op, Op::Flush))
            .count()
    }

    fn apply(&self, image: &mut [u8], op: Op, torn: Option<(usize, usize)>) {
        match op {
            Op::Write { off, len, data } => {
                let (from, to) = torn.unwrap_or((0, len));
                let off = off as usize;
                image[off + from..off + to].copy_from_slice(&self.bytes[data + from..data + to]);
            }
            Op::Zero { off, len } => image[off as usize..off as usize + len].fill(0),
            Op::Flush => {}
        }
    }
}

/// What the workload was promised, by log position.
#[derive(Default)]
struct Promises {
    /// The contents each point was made of, by point id.
    contents: BTreeMap<u64, Vec<u8>>,
    /// Points acknowledged DURABLE, with the log position at the ack.
    acked: Vec<(u64, u64)>,
    /// Log position when `enroll` returned, and the identity it wrote.
    enrolled: Option<u64>,
    identity: Vec<u8>,
    /// Log position when an operator identity was issued, and the files it
    /// wrote (relative to the agent's filesystem) with their bytes.
    operator: Option<(u64, Vec<Issued>)>,
    /// Log position when a prune (by `prune`, or by the maintenance of a
    /// serving receiver) may have begun, and the points it removed.
    pruned: Vec<(u64, Vec<u64>)>,
    /// Log position when the live-tracking agent started, and when its
    /// clean stop had saved the dirty set (`dirty.bin`).
    traced: Option<u64>,
    dirty_saved: Option<u64>,
    /// The volume's contents at the end.
    last: Vec<u8>,
}

/// A file an enrollment wrote (relative to the agent's filesystem) and its bytes.
type Issued = (PathBuf, Vec<u8>);

/// One crash image to check: what it was built from and what it must hold.
struct Crash {
    name: String,
    /// Flushes fully included.
    flushes: usize,
    /// With a random part of the writes after the last flush (else none).
    partial: bool,
    /// Log position past every write the image may hold.
    end: u64,
    new_point: bool,
}

struct Checker<'a> {
    root: &'a Path,
    source: &'a Path,
    /// The loop device over `source` that the live-tracking agent traces.
    device: &'a Path,
    log: &'a Log,
    promises: &'a Promises,
    fsck_repairs: usize,
    points_restored: usize,
    new_points: usize,
    /// Images where the agent had recorded a checkpoint (sync.bin).
    with_checkpoint: usize,
    /// New points made by the live-tracking agent, and of them those that
    /// took up a saved dirty set instead of rescanning.
    traced_points: usize,
    dirty_resumed: usize,
    /// Time spent writing images, in e2fsck, mounting, checking the store.
    phases: [Duration; 4],
}

impl Checker<'_> {
    /// Check one image; `Err` says what promise it broke.
    async fn check(&mut self, image: &[u8], crash: &Crash) -> Result<(), String> {
        let mut devs = Vec::new();
        let mut mounts = Vec::new();
        for (i, &(offset, size)) in PARTS.iter().enumerate() {
            let file = self.root.join(format!("crash{i}.img"));
            let t = Instant::now();
            let part = &image[offset as usize..(offset + size) as usize];
            std::fs::write(&file, part).map_err(|e| format!("write image: {e}"))?;
            self.phases[0] += t.elapsed();
            let t = Instant::now();
            let fsck = Command::new("e2fsck")
                .args(["-f", "-y"])
                .arg(&file)
                .output()
                .map_err(|e| e.to_string())?;
            match fsck.status.code() {
                Some(0) => {}
                Some(1 | 2) => self.fsck_repairs += 1,
                _ => {
                    return Err(format!(
                        "e2fsck could not repair the {} filesystem: {}",
                        MOUNTS[i],
                        String::from_utf8_lossy(&fsck.stdout).trim()
                    ))
                }
            }
            self.phases[1] += t.elapsed();
            let t = Instant::now();
            let dev = LoopDevice::attach(&file);
            let mount = self.root.join(MOUNTS[i]);
            let mounted = mount_at(&dev.path, &mount);
            devs.push(dev);
            self.phases[2] += t.elapsed();
            if let Err(e) = mounted {
                Self::unmount(&mounts);
                return Err(e);
            }
            mounts.push(mount);
        }
        let t = Instant::now();
        let result = self.check_mounted(&mounts[0], &mounts[1], crash).await;
        self.phases[3] += t.elapsed();
        let t = Instant::now();
        Self::unmount(&mounts);
        drop(devs);
        self.phases[2] += t.elapsed();
        result
    }

    fn unmount(mounts: &[PathBuf]) {
        for m in mounts {
            let _ = Command::new("umount").arg(m).status();
        }
    }

    async fn check_mounted(
        &mut self,
        store_fs: &Path,
        agent: &Path,
        crash: &Crash,
    ) -> Result<(), String> {
        let p = self.promises;
        let dir = store_fs.join("store");
        if agent.join("state/sync.bin").exists() {
            self.with_checkpoint += 1;
        }
        let required: Vec<u64> = p
            .acked
            .iter()
            .filter(|(_, at)| self.log.flushes_before(*at) <= crash.flushes)
            .map(|(id, _)| *id)
            .filter(|id| {
                p.pruned
                    .iter()
                    .all(|(at, removed)| crash.end <= *at || !removed.contains(id))
            })
            .collect();
        let enrolled = p
            .enrolled
            .is_some_and(|at| self.log.flushes_before(at) <= crash.flushes);
        if !enrolled {
            // Nothing was promised yet; whatever is there must not be wrong.
            return match pilotlight_receiver::admin::points(&dir, Some(SERVER)) {
                Ok(listed) if !listed.is_empty() => Err("points before enroll".into()),
                _ => Ok(()),
            };
        }
        // The files enrollment wrote are there, whole, once it returned.
        let mut issued = vec![(PathBuf::from("web1.pem"), p.identity.clone())];
        if let Some((at, files)) = &p.operator {
            if self.log.flushes_before(*at) <= crash.flushes {
                issued.extend(files.iter().cloned());
            }
        }
        for (file, want) in &issued {
            let got = std::fs::read(agent.join(file))
                .map_err(|e| format!("{} (issued before the cut): {e}", file.display()))?;
            if got != *want {
                return Err(format!(
                    "{} differs from what was issued before the cut",
                    file.display()
                ));
            }
        }
        let listed = pilotlight_receiver::admin::points(&dir, Some(SERVER))
            .map_err(|e| format!("the store does not open: {e}"))?;
        let ids: Vec<u64> = listed.iter().map(|pt| pt.id as u64).collect();
        for id in &required {
            if !ids.contains(id) {
                return Err(format!(
                    "point {id}, acknowledged DURABLE before the cut, is gone (listed: {ids:?})"
                ));
            }
        }
        let restored = self.root.join("restored.img");
        for id in &ids {
            let want = p
                .contents
                .get(id)
                .ok_or_else(|| format!("point {id} was never made"))?;
            let req = pilotlight_receiver::restore::RestoreRequest {
                server: SERVER.into(),
                volume: VOLUME_NAME.into(),
                point: pilotlight_receiver::restore::PointSel::Id(*id as i64),
                to: restored.clone(),
                force: true,
                progress: false,
            };
            pilotlight_receiver::restore::restore(&dir, &req)
                .map_err(|e| format!("restore of point {id}: {e}"))?;
            let got = std::fs::read(&restored).map_err(|e| e.to_string())?;
            if got != *want {
                return Err(format!("point {id} restores different bytes"));
            }
            self.points_restored += 1;
        }
        let report = pilotlight_receiver::verify::verify(&dir, None, None, false)
            .map_err(|e| format!("verify: {e}"))?;
        if !report.damaged.is_empty() {
            return Err(format!("verify found damage: {:?}", report.damaged));
        }
        // The first images after the dirty set was saved, and some later.
        let after_dirty_saved = p.dirty_saved.is_some_and(|at| {
            let saved = self.log.flushes_before(at);
            saved <= crash.flushes
                && ((crash.flushes - saved) < 3 || (crash.flushes - saved).is_multiple_of(8))
        });
        if crash.new_point || after_dirty_saved {
            let traced = p.traced.is_some_and(|at| crash.end > at);
            self.new_point(agent, &dir, traced).await?;
        }
        Ok(())
    }

    /// Serve the store again and make a point with the agent's state as it
    /// was at the cut; the point must restore the volume as it is now.
    /// Where the image may hold the live-tracking agent's state (`traced`),
    /// that agent makes it, on the loop device, taking up any dirty set its
    /// clean stop saved (the device is unchanged since, so it is trusted).
    async fn new_point(&mut self, agent: &Path, dir: &Path, traced: bool) -> Result<(), String> {
        let receiver = TestReceiver::serve(dir).await;
        let point = if traced {
            self.traced_point(agent, dir, &receiver).await?
        } else {
            let mut cfg = agent_config(
                receiver.addr,
                &agent.join("web1.pem"),
                &agent.join("state"),
                &[(VOLUME_NAME, self.source)],
            );
            cfg.block_size = BLOCK_SIZE;
            checkpoint_often(&mut cfg);
            tokio::time::timeout(Duration::from_secs(60), replicate_once(&cfg))
                .await
                .map_err(|_| "the agent made no point within 60 s".to_string())?
                .point
        };
        // Staging was repaired at start (or rebuilt): it must follow.
        receiver.wait_staging(SERVER).await;
        receiver.stop().await;
        let staging = pilotlight_receiver::store::Store::open(dir)
            .map_err(|e| format!("reopen: {e}"))?
            .staging_path(SERVER, VOLUME_NAME);
        let staged = std::fs::read(&staging).map_err(|e| format!("staging image: {e}"))?;
        if staged.get(..self.promises.last.len()) != Some(&self.promises.last[..]) {
            return Err("the staging image differs from the new point".into());
        }
        let restored = self.root.join("new.img");
        restore_point(dir, SERVER, VOLUME_NAME, point, &restored);
        let got = std::fs::read(&restored).map_err(|e| e.to_string())?;
        if got != self.promises.last {
            return Err(format!("the new point {point} restores different bytes"));
        }
        self.new_points += 1;
        Ok(())
    }

    /// A point by the live-tracking agent with the state on the image.
    async fn traced_point(
        &mut self,
        agent: &Path,
        dir: &Path,
        receiver: &TestReceiver,
    ) -> Result<u64, String> {
        let newest = pilotlight_receiver::admin::points(dir, Some(SERVER))
            .map_err(|e| format!("points: {e}"))?
            .iter()
            .map(|pt| pt.id as u64)
            .max()
            .unwrap_or(0);
        let resumable = agent.join("state").join(DIRTY_FILE).exists();
        let started = now_ms();
        let mut tracing = TracingAgent::start(
            &receiver.addr.to_string(),
            &agent.join("web1.pem"),
            &agent.join("state"),
            self.device,
            &[&TRACE_BLOCKS[..], &["--interval", "1s", "--commit", "sync"]].concat(),
        );
        let st = tracing
            .wait(60, "a new point", |s| {
                s.last_point.is_some_and(|id| id > newest)
                    && s.collected_ms.is_some_and(|c| c > started)
                    && s.backlog_bytes == Some(0)
                    && s.pending_points == 0
            })
            .await;
        tracing.stop().await;
        let rescans = st.tracking.map_or(0, |t| t.rescans);
        self.traced_points += 1;
        if resumable && rescans == 0 {
            self.dirty_resumed += 1;
        }
        st.last_point.ok_or_else(|| "no point".to_string())
    }
}

/// Make points, prune, collect garbage and make more, on the recorded
/// filesystem; then again with prune and garbage collection running inside
/// `serve`; then with a live-tracking agent on a loop device over the
/// volume, stopped cleanly after a write so that it saves its dirty set.
/// Note every promise with the log position it was made at. Returns the
/// loop device, which the checks trace again.
async fn workload(rec: &Recording, source: &Path) -> (Promises, LoopDevice) {
    let mut p = Promises::default();
    let dir = rec.mounts[0].join("store");
    pilotlight_receiver::admin::init(&dir, Some("127.0.0.1:0")).expect("init");
    let agent = &rec.mounts[1];
    pilotlight_receiver::admin::enroll(&dir, SERVER, &agent.join("web1.pem")).expect("enroll");
    p.enrolled = Some(rec.position());
    p.identity = std::fs::read(agent.join("web1.pem")).expect("identity");
    let ops = agent.join("ops.pem");
    let nbd = pilotlight_receiver::admin::enroll_operator(&dir, "ops", &ops).expect("operator");
    let mut files = vec![
        ops,
        nbd.join("ca-cert.pem"),
        nbd.join("client-cert.pem"),
        nbd.join("client-key.pem"),
    ];
    p.operator = Some((
        rec.position(),
        files
            .drain(..)
            .map(|f| {
                let bytes = std::fs::read(&f).expect("operator file");
                (
                    f.strip_prefix(agent)
                        .expect("under the agent's fs")
                        .to_owned(),
                    bytes,
                )
            })
            .collect(),
    ));
    let mut seed = 1;
    let receiver = TestReceiver::serve(&dir).await;
    for _ in 0..5 {
        seed += 1;
        round(&mut p, rec, &receiver, source, seed).await;
    }
    receiver.stop().await;
    let start = rec.position();
    let mut policy = Policy::none();
    policy.keep_last = 2;
    let items =
        pilotlight_receiver::admin::prune(&dir, Some(SERVER), &policy, false).expect("prune");
    let removed: Vec<u64> = items
        .iter()
        .filter(|i| i.removed())
        .map(|i| i.point as u64)
        .collect();
    assert!(!removed.is_empty(), "prune removed nothing: {items:?}");
    p.pruned.push((start, removed));
    // Any dead block makes a pack worth rewriting: with 4 KiB blocks a
    // round kills only a few percent of one.
    let opts = pilotlight_receiver::gc::GcOptions {
        min_dead_percent: 1,
    };
    let gc = pilotlight_receiver::admin::gc(&dir, opts).expect("gc");
    assert!(
        gc.packs_removed + gc.packs_rewritten > 0,
        "gc rewrote and removed nothing, so the images would not cover it: {gc:?}"
    );
    let receiver = TestReceiver::serve(&dir).await;
    for _ in 0..3 {
        seed += 1;
        round(&mut p, rec, &receiver, source, seed).await;
    }
    receiver.wait_staging(SERVER).await;
    receiver.stop().await;
    seed = maintained(&mut p, rec, source, seed).await;
    let device = traced(&mut p, rec, source, seed).await;
    p.last = std::fs::read(source).expect("read source");
    (p, device)
}

/// Points while the serving receiver prunes (keeping the newest 2) and
/// collects garbage by itself every second: its maintenance, as an
/// operator runs it. Returns the last seed used.
async fn maintained(p: &mut Promises, rec: &Recording, source: &Path, mut seed: u64) -> u64 {
    let dir = rec.mounts[0].join("store");
    let mut cfg = ReceiverConfig::load(&dir).expect("config");
    let quiet = cfg.clone();
    cfg.prune_interval_secs = 1;
    cfg.gc_min_dead_percent = 1;
    cfg.retention = Policy::none();
    cfg.retention.keep_last = 2;
    write_config(&dir, &cfg);
    let packs = |dir: &Path| -> Vec<std::ffi::OsString> {
        std::fs::read_dir(dir.join("packs"))
            .expect("packs")
            .map(|e| e.expect("entry").file_name())
            .collect()
    };
    let before = packs(&dir);
    let start = rec.position();
    let receiver = TestReceiver::serve(&dir).await;
    for _ in 0..4 {
        seed += 1;
        round(p, rec, &receiver, source, seed).await;
    }
    // Until a pass has pruned down to 2 points and rewritten or removed a
    // pack that was there before.
    let deadline = Deadline::after(Duration::from_secs(60));
    loop {
        let listed = pilotlight_receiver::admin::points(&dir, Some(SERVER)).expect("points");
        let now = packs(&dir);
        if listed.len() <= 2 && before.iter().any(|f| !now.contains(f)) {
            break;
        }
        deadline
            .next(|| format!("maintenance did not prune and collect: {listed:?}"))
            .await;
    }
    receiver.wait_staging(SERVER).await;
    receiver.stop().await;
    let listed: Vec<u64> = pilotlight_receiver::admin::points(&dir, Some(SERVER))
        .expect("points")
        .iter()
        .map(|pt| pt.id as u64)
        .collect();
    let removed = p
        .contents
        .keys()
        .copied()
        .filter(|id| !listed.contains(id))
        .collect();
    p.pruned.push((start, removed));
    write_config(&dir, &quiet);
    seed
}

/// Write the receiver's configuration as an operator's editor would: a
/// new file renamed over the old.
fn write_config(dir: &Path, cfg: &ReceiverConfig) {
    let text = toml::to_string(cfg).expect("config toml");
    pilotlight_protocol::atomic_file::write(dir, "receiver.toml", text.as_bytes(), Access::Umask)
        .expect("write receiver.toml");
}

/// The live-tracking agent on a loop device over the volume: a point, a
/// write, and a clean stop before the next point, which saves the write
/// in the dirty set (`dirty.bin`) instead of sending it.
async fn traced(p: &mut Promises, rec: &Recording, source: &Path, seed: u64) -> LoopDevice {
    let dir = rec.mounts[0].join("store");
    let agent = &rec.mounts[1];
    let device = LoopDevice::attach(source);
    let receiver = TestReceiver::serve(&dir).await;
    let newest = p.contents.keys().copied().max().unwrap_or(0);
    p.traced = Some(rec.position());
    let content = std::fs::read(source).expect("read source");
    let mut tracing = TracingAgent::start(
        &receiver.addr.to_string(),
        &agent.join("web1.pem"),
        &agent.join("state"),
        &device.path,
        &[&TRACE_BLOCKS[..], &["--interval", "1h", "--commit", "sync"]].concat(),
    );
    let st = tracing
        .wait(60, "the rescan's point", |s| {
            s.last_point.is_some_and(|id| id > newest) && s.state == State::Continuous
        })
        .await;
    let point = st.last_point.expect("a point");
    p.acked.push((point, rec.position()));
    p.contents.insert(point, content);
    let written = now_ms();
    write_device(&device.path, 24, seed);
    tracing
        .wait(60, "the write to be collected", |s| {
            s.collected_ms.is_some_and(|c| c > written)
        })
        .await;
    tracing.stop().await;
    assert!(
        agent.join("state").join(DIRTY_FILE).exists(),
        "the clean stop saved no dirty set"
    );
    p.dirty_saved = Some(rec.position());
    receiver.stop().await;
    // The stop made no point of the write: the dirty set holds it.
    let listed = pilotlight_receiver::admin::points(&dir, Some(SERVER)).expect("points");
    assert!(
        listed.iter().all(|pt| pt.id as u64 <= point),
        "a point was made after the write: {listed:?}"
    );
    device
}

/// Overwrite `count` random 4 KiB blocks of the device through the block
/// layer (buffered, then synced), as a live-traced writer does.
fn write_device(dev: &Path, count: usize, seed: u64) {
    let f = std::fs::File::options()
        .write(true)
        .open(dev)
        .expect("open device");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut buf = [0u8; 4096];
    for _ in 0..count {
        let off = rng.random_range(0..VOLUME / 4096) * 4096;
        rng.fill_bytes(&mut buf);
        std::os::unix::fs::FileExt::write_all_at(&f, &buf, off).expect("write device");
    }
    f.sync_all().expect("sync device");
}

/// A full sync of the small volume checkpoints every 512 KiB sent, so that
/// the images cover checkpoints (the receiver's in-progress sync, the
/// agent's sync.bin) and the new points resume from them.
fn checkpoint_often(cfg: &mut pilotlight_agent::AgentConfig) {
    cfg.checkpoints.bytes = 512 << 10;
}

/// Change the volume and make a point of it; note the ack.
async fn round(
    p: &mut Promises,
    rec: &Recording,
    receiver: &TestReceiver,
    source: &Path,
    seed: u64,
) {
    let agent = &rec.mounts[1];
    let mut cfg = agent_config(
        receiver.addr,
        &agent.join("web1.pem"),
        &agent.join("state"),
        &[(VOLUME_NAME, source)],
    );
    cfg.block_size = BLOCK_SIZE;
    checkpoint_often(&mut cfg);
    overwrite_random_4k(source, 24, seed);
    let content = std::fs::read(source).expect("read source");
    let point = replicate_once(&cfg).await.point;
    p.acked.push((point, rec.position()));
    p.contents.insert(point, content);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, tracefs, nbdkit with its Python plugin, nbdfuse, e2fsprogs"]
async fn acknowledged_points_survive_power_loss() {
    require_root("loop devices and mounts");
    require_tracing();
    require_tools(&[
        "nbdkit",
        "nbdfuse",
        "mkfs.ext4",
        "e2fsck",
        "losetup",
        "mount",
    ]);
    let images: usize = std::env::var("PILOTLIGHT_POWER_IMAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let seed: u64 = std::env::var("PILOTLIGHT_POWER_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    println!("power loss: {images} images, PILOTLIGHT_POWER_SEED={seed}");
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let base = root.join("base.img");
    let mut disk = Vec::with_capacity(DISK_SIZE as usize);
    for (i, &(_, size)) in PARTS.iter().enumerate() {
        let part = root.join(format!("part{i}.img"));
        std::fs::File::create(&part)
            .and_then(|f| f.set_len(size))
            .expect("part image");
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&part)
            .output()
            .expect("mkfs.ext4");
        assert!(out.status.success(), "mkfs.ext4: {out:?}");
        disk.extend(std::fs::read(&part).expect("read part"));
    }
    std::fs::write(&base, &disk).expect("write base image");
    let source = root.join("source.img");
    sample_image(&source, VOLUME, 7);

    let rec = Recording::start(root, &base);
    let (promises, device) = workload(&rec, &source).await;
    let log = Log::parse(rec.finish());
    let recorded = started.elapsed();

    let mut base_image = std::fs::read(&base).expect("read base");
    let crashes = plan(&log, images, seed);
    // Images, restores and their fsyncs in memory where /dev/shm is there.
    let scratch = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("scratch dir");
    let mut checker = Checker {
        root: scratch.path(),
        source: &source,
        device: &device.path,
        log: &log,
        promises: &promises,
        fsck_repairs: 0,
        points_restored: 0,
        new_points: 0,
        with_checkpoint: 0,
        traced_points: 0,
        dirty_resumed: 0,
        phases: Default::default(),
    };
    let mut failures = Vec::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let boundaries = log.boundaries();
    let mut applied = 0;
    let mut torn_writes = 0;
    for crash in &crashes {
        // Prefix images come in order of their flush: apply up to it.
        let upto = boundaries[crash.flushes];
        for &(_, op) in &log.ops[applied..upto] {
            log.apply(&mut base_image, op, None);
        }
        applied = upto;
        let image = if !crash.partial {
            std::borrow::Cow::Borrowed(&base_image[..])
        } else {
            let (img, torn) = variant(&log, &base_image, crash.flushes, &boundaries, &mut rng);
            torn_writes += usize::from(torn);
            std::borrow::Cow::Owned(img)
        };
        if let Err(why) = checker.check(&image, crash).await {
            // The first few failing images are kept for a look.
            if failures.len() < 3 {
                let keep = std::env::temp_dir()
                    .join(format!("pilotlight-power-{seed}-{}.img", crash.name));
                let _ = std::fs::write(&keep, &image[..]);
                println!(
                    "FAILED {}: {why} (image kept at {})",
                    crash.name,
                    keep.display()
                );
            } else {
                println!("FAILED {}: {why}", crash.name);
            }
            failures.push(format!("{}: {why}", crash.name));
        }
    }
    let flushes = boundaries.len() - 1;
    println!(
        "power loss: {} images ({} at a flush of {flushes}, the rest with a random part of the writes after one, {torn_writes} with a torn write), \
         {} acknowledged points, {} point restores, {} new points ({} by the live-tracking agent, {} of them from its saved dirty set), {} with a checkpoint recorded by the agent, {} with the journal replayed or repaired by e2fsck, {} failed; \
         workload {:.1} s, checks {:.1} s",
        crashes.len(),
        crashes.iter().filter(|c| !c.partial).count(),
        promises.acked.len(),
        checker.points_restored,
        checker.new_points,
        checker.traced_points,
        checker.dirty_resumed,
        checker.with_checkpoint,
        checker.fsck_repairs,
        failures.len(),
        recorded.as_secs_f64(),
        (started.elapsed() - recorded).as_secs_f64(),
    );
    let [write, fsck, mount, store] = checker.phases.map(|d| d.as_secs_f64());
    println!("power loss: writing images {write:.1} s, e2fsck {fsck:.1} s, mount and unmount {mount:.1} s, store checks {store:.1} s");
    assert!(
        failures.is_empty(),
        "{} crash images broke a promise (seed {seed}):\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        checker.dirty_resumed > 0,
        "no image had the live-tracking agent take up its saved dirty set"
    );
    assert!(
        crashes.len() >= images.min(1000),
        "only {} crash images",
        crashes.len()
    );
}

/// The crash images to check, in the order of their flush: every flush,
/// then random flushes with part of what followed, `images` in all.
fn plan(log: &Log, images: usize, seed: u64) -> Vec<Crash> {
    let boundaries = log.boundaries();
    let end_of = |b: usize| -> u64 {
        log.ops
            .get(b)
            .map_or(log.bytes.len() as u64, |(pos, _)| *pos)
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut crashes: Vec<Crash> = (0..boundaries.len())
        .map(|j| Crash {
            name: format!("flush{j}"),
            flushes: j,
            partial: false,
            end: end_of(boundaries[j]),
            new_point: false,
        })
        .collect();
    // Windows with something written after their flush.
    let windows: Vec<usize> = (0..boundaries.len())
        .filter(|&j| {
            let next = boundaries.get(j + 1).copied().unwrap_or(log.ops.len());
            log.ops[boundaries[j]..next]
                .iter()
                .any(|(_, op)| !matches!(op, Op::Flush))
        })
        .collect();
    let mut n = 0;
    while crashes.len() < images && !windows.is_empty() {
        let j = windows[rng.random_range(0..windows.len())];
        let next = boundaries.get(j + 1).copied().unwrap_or(log.ops.len());
        crashes.push(Crash {
            name: format!("flush{j}-part{n}"),
            flushes: j,
            partial: true,
            end: end_of(next),
            new_point: false,
        });
        n += 1;
    }
    crashes.sort_by_key(|c| c.flushes);
    for (i, c) in crashes.iter_mut().enumerate() {
        c.new_point = i % NEW_POINT_EVERY == NEW_POINT_EVERY - 1;
    }
    if let Some(last) = crashes.last_mut() {
        last.new_point = true;
    }
    crashes
}

/// The image at flush `j` (`prefix`) with a random subset of the writes that
/// followed it, one of them possibly torn at a sector; and whether one was.
fn variant(
    log: &Log,
    prefix: &[u8],
    j: usize,
    boundaries: &[usize],
    rng: &mut impl Rng,
) -> (Vec<u8>, bool) {
    let mut img = prefix.to_vec();
    let next = boundaries.get(j + 1).copied().unwrap_or(log.ops.len());
    let mut torn = false;
    for &(_, op) in &log.ops[boundaries[j]..next] {
        if !rng.random_bool(0.5) {
            continue;
        }
        let cut = match op {
            Op::Write { len, .. } if len > 512 && !torn && rng.random_bool(0.2) => {
                torn = true;
                let sectors = len / 512;
                let a = rng.random_range(0..sectors);
                let b = rng.random_range(a + 1..=sectors);
                Some((a * 512, (b * 512).min(len)))
            }
            _ => None,
        };
        log.apply(&mut img, op, cut);
    }
    (img, torn)
}
