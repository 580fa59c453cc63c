//! Power loss, not only kill -9: the receiver's store and the agent's state
//! live on an ext4 filesystem whose device records every write and flush in
//! order (nbdkit running `tests/support/recorder.py`, behind `nbdfuse` and a
//! loop device). A workload enrolls a server, makes points, prunes, collects
//! garbage and makes more points, noting the log's length at every
//! acknowledgement (the initial sync checkpoints every 512 KiB). Crash images are then built from the log: the device at
//! every flush, and at random flushes with a random subset of the writes
//! that followed (some torn at a 512-byte sector). Each image is repaired as
//! after a power cut (`e2fsck -fy`, then mounted, which replays the
//! journal) and must keep every promise made before the cut: every point
//! acknowledged DURABLE is listed and restores byte for byte, every listed
//! point restores as it was made, `verify` finds no damage, and on a sample
//! of images a receiver serves the store again and the agent, with the state
//! it had at the cut, makes a new point that restores byte for byte.
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

use pilotlight::{
    agent_config, overwrite_random_4k, replicate_once, require_root, require_tools, restore_point,
    sample_image, ChildGuard, Deadline, LoopDevice, TestReceiver,
};
use pilotlight_receiver::retention::Policy;
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
const VOLUME_NAME: &str = "disk";
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
    /// Log position when `enroll` returned.
    enrolled: Option<u64>,
    /// Log position when prune began, and the points it removed.
    pruned: Option<(u64, Vec<u64>)>,
    /// The volume's contents at the end.
    last: Vec<u8>,
}

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
    log: &'a Log,
    promises: &'a Promises,
    fsck_repairs: usize,
    points_restored: usize,
    new_points: usize,
    /// Images where the agent had recorded a checkpoint (sync.bin).
    with_checkpoint: usize,
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
            .filter(|id| match &p.pruned {
                Some((at, removed)) => crash.end <= *at || !removed.contains(id),
                None => true,
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
        if crash.new_point {
            self.new_point(agent, &dir).await?;
        }
        Ok(())
    }

    /// Serve the store again and make a point with the agent's state as it
    /// was at the cut; the point must restore the volume as it is now.
    async fn new_point(&mut self, agent: &Path, dir: &Path) -> Result<(), String> {
        let receiver = TestReceiver::serve(dir).await;
        let mut cfg = agent_config(
            receiver.addr,
            &agent.join("web1.pem"),
            &agent.join("state"),
            &[(VOLUME_NAME, self.source)],
        );
        checkpoint_often(&mut cfg);
        let point = tokio::time::timeout(Duration::from_secs(60), replicate_once(&cfg))
            .await
            .map_err(|_| "the agent made no point within 60 s".to_string())?;
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
        restore_point(dir, SERVER, VOLUME_NAME, point.point, &restored);
        let got = std::fs::read(&restored).map_err(|e| e.to_string())?;
        if got != self.promises.last {
            return Err(format!(
                "the new point {} restores different bytes",
                point.point
            ));
        }
        self.new_points += 1;
        Ok(())
    }
}

/// Make points, prune, collect garbage and make more, on the recorded
/// filesystem; note every promise with the log position it was made at.
async fn workload(rec: &Recording, source: &Path) -> Promises {
    let mut p = Promises::default();
    let dir = rec.mounts[0].join("store");
    pilotlight_receiver::admin::init(&dir, Some("127.0.0.1:0")).expect("init");
    let agent = &rec.mounts[1];
    pilotlight_receiver::admin::enroll(&dir, SERVER, &agent.join("web1.pem")).expect("enroll");
    p.enrolled = Some(rec.position());
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
    p.pruned = Some((start, removed));
    let gc = pilotlight_receiver::admin::gc(&dir, Default::default()).expect("gc");
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
    p.last = std::fs::read(source).expect("read source");
    p
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
    checkpoint_often(&mut cfg);
    overwrite_random_4k(source, 24, seed);
    let content = std::fs::read(source).expect("read source");
    let point = replicate_once(&cfg).await.point;
    p.acked.push((point, rec.position()));
    p.contents.insert(point, content);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, nbdkit with its Python plugin, nbdfuse, e2fsprogs"]
async fn acknowledged_points_survive_power_loss() {
    require_root("loop devices and mounts");
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
    let promises = workload(&rec, &source).await;
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
        log: &log,
        promises: &promises,
        fsck_repairs: 0,
        points_restored: 0,
        new_points: 0,
        with_checkpoint: 0,
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
         {} acknowledged points, {} point restores, {} new points, {} with a checkpoint recorded by the agent, {} with the journal replayed or repaired by e2fsck, {} failed; \
         workload {:.1} s, checks {:.1} s",
        crashes.len(),
        crashes.iter().filter(|c| !c.partial).count(),
        promises.acked.len(),
        checker.points_restored,
        checker.new_points,
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
