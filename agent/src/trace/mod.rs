//! Live change tracking of block devices through the kernel's block
//! tracepoints, with no kernel module.
//!
//! A private tracing instance (`tracefs/instances/pilotlight-PID-N`) records
//! `block_rq_complete` and `block_bio_complete` for the volumes' devices
//! only (a filter on `dev`). Completion, not submission: a block is marked
//! dirty once its new data can be read, so reading it after the mark never
//! returns the old data for good (a write still in flight while a block is
//! read completes later, and marks it again).
//!
//! The agent reads the instance's `trace_pipe` on demand ([`Tracer::sync`]):
//! it writes a numbered marker to `trace_marker` and reads until the marker
//! comes back, so every write that completed before the call is accounted
//! for. Events the kernel dropped (a full buffer: the `overrun` and `dropped
//! events` counters of `per_cpu/cpu*/stats`, or `[LOST n EVENTS]` in the
//! pipe) make every volume need a full rescan: tracking never loses a change
//! silently.
//!
//! [`Tracking`] is what the replication loop uses: the dirty blocks not yet
//! in a point, the blocks of points sent but not yet durable (put back if
//! the session dies), which volumes need a rescan and why, and the dirty set
//! saved at a clean stop, reused at the next start only if the device's
//! write counters (`/sys/dev/block/M:m/stat`) show no write in between.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use roaring::RoaringTreemap;

use crate::AgentError;

/// Where tracefs is usually mounted.
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
/// The events recorded.
const EVENTS: [&str; 2] = ["block/block_rq_complete", "block/block_bio_complete"];
/// How long a marker may take to come back through the pipe.
const SYNC_DEADLINE: Duration = Duration::from_secs(10);
/// Longest a point waits when the only dirty blocks are the ones the last
/// thaw wrote itself.
pub const ECHO_HOLD: Duration = Duration::from_secs(60);
/// The rescan reason of a volume the receiver has nothing of.
pub const INITIAL_SYNC: &str = "initial sync";
/// File in the state directory holding the dirty set of a clean stop.
pub const DIRTY_FILE: &str = "dirty.bin";
const DIRTY_MAGIC: &[u8; 8] = b"PLDIRTY1";

fn trace_err(what: impl std::fmt::Display) -> AgentError {
    AgentError::Trace(what.to_string())
}

/// A volume's device as the block layer reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Device {
    /// `major << 20 | minor` of the device the events name (the whole disk
    /// for a partition).
    pub dev: u32,
    /// First sector of the volume on that device (a partition's start).
    pub start: u64,
    /// The volume's own `major:minor` (for its write counters).
    pub own: (u32, u32),
}

impl Device {
    /// Resolve the block device at `path`.
    pub fn of(name: &str, path: &Path) -> Result<Self, AgentError> {
        let meta = std::fs::metadata(path).map_err(|e| AgentError::Source {
            volume: name.to_owned(),
            path: path.to_owned(),
            source: e,
        })?;
        if !meta.file_type().is_block_device() {
            return Err(AgentError::Config(format!(
                "--track trace needs a block device; volume {name} ({}) is not one (use --track scan)",
                path.display()
            )));
        }
        Self::of_dev(meta.rdev())
    }

    /// The device `major:minor` encoded in `rdev` (a partition resolved to
    /// its disk and start).
    fn of_dev(rdev: u64) -> Result<Self, AgentError> {
        let (major, minor) = (
            nix::sys::stat::major(rdev) as u32,
            nix::sys::stat::minor(rdev) as u32,
        );
        let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        let (disk, start) = if sys.join("partition").exists() {
            let start = read_u64(&sys.join("start"))?;
            let parent = std::fs::read_to_string(sys.join("../dev"))
                .map_err(|e| trace_err(format!("{}: {e}", sys.join("../dev").display())))?;
            let (ma, mi) = parse_major_minor(parent.trim()).ok_or_else(|| {
                trace_err(format!(
                    "cannot parse the disk of partition {major}:{minor}"
                ))
            })?;
            ((ma, mi), start)
        } else {
            ((major, minor), 0)
        };
        Ok(Self {
            dev: (disk.0 << 20) | disk.1,
            start,
            own: (major, minor),
        })
    }

    /// Completed writes and discards so far: `[write I/Os, write sectors,
    /// discard I/Os, discard sectors]`.
    pub fn write_counters(&self) -> Result<[u64; 4], AgentError> {
        let path = format!("/sys/dev/block/{}:{}/stat", self.own.0, self.own.1);
        let text = std::fs::read_to_string(&path).map_err(|e| trace_err(format!("{path}: {e}")))?;
        let f: Vec<u64> = text
            .split_whitespace()
            .map(|t| t.parse().unwrap_or(0))
            .collect();
        let at = |i: usize| f.get(i).copied().unwrap_or(0);
        Ok([at(4), at(6), at(11), at(13)])
    }
}

fn parse_major_minor(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn read_u64(path: &Path) -> Result<u64, AgentError> {
    std::fs::read_to_string(path)
        .map_err(|e| trace_err(format!("{}: {e}", path.display())))?
        .trim()
        .parse()
        .map_err(|e| trace_err(format!("{}: {e}", path.display())))
}

/// A volume as the tracer maps it.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Its device.
    pub device: Device,
    /// Volume size in bytes.
    pub size: u64,
    /// Block size.
    pub block_size: u32,
}

impl Target {
    /// Mark the blocks a completed request of `nr` sectors at `sector`
    /// touched.
    fn mark(&self, set: &mut RoaringTreemap, sector: u64, nr: u64) -> bool {
        let end = sector.saturating_add(nr);
        let (lo, hi) = (
            self.device.start,
            self.device.start + self.size.div_ceil(512),
        );
        if nr == 0 || end <= lo || sector >= hi {
            return false;
        }
        let first = (sector.max(lo) - lo) * 512;
        let last = (end.min(hi) - lo) * 512 - 1;
        let bs = u64::from(self.block_size);
        set.insert_range(first / bs..=last / bs);
        true
    }
}

/// One parsed line of `trace_pipe`.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    Write { dev: u32, sector: u64, nr: u64 },
    Marker(u64),
    Lost,
    Other,
}

fn parse_line(line: &str) -> Line {
    if line.contains("[LOST ") {
        return Line::Lost;
    }
    if let Some(rest) = line.split("tracing_mark_write: pilotlight-sync-").nth(1) {
        return rest.trim().parse().map_or(Line::Other, Line::Marker);
    }
    let Some(rest) = line
        .split_once("block_rq_complete: ")
        .or_else(|| line.split_once("block_bio_complete: "))
        .map(|(_, r)| r)
    else {
        return Line::Other;
    };
    let t: Vec<&str> = rest.split_whitespace().collect();
    let (Some(dev), Some(rwbs)) = (t.first(), t.get(1)) else {
        return Line::Other;
    };
    // Reads change nothing; anything else (writes, discards, write-zeroes)
    // may have.
    if rwbs.starts_with('R') {
        return Line::Other;
    }
    let Some(plus) = t.iter().position(|x| *x == "+") else {
        return Line::Other;
    };
    let parsed = (|| {
        let (ma, mi) = dev.split_once(',')?;
        let (ma, mi): (u32, u32) = (ma.parse().ok()?, mi.parse().ok()?);
        let sector: u64 = t.get(plus.checked_sub(1)?)?.parse().ok()?;
        let nr: u64 = t.get(plus + 1)?.parse().ok()?;
        Some(Line::Write {
            dev: (ma << 20) | mi,
            sector,
            nr,
        })
    })();
    parsed.unwrap_or(Line::Other)
}

/// A private tracing instance recording the volumes' completed writes.
/// Removed on drop.
pub struct Tracer {
    dir: PathBuf,
    /// `None` only while dropping (an open pipe keeps the instance busy).
    pipe: Option<File>,
    partial: Vec<u8>,
    targets: Vec<Target>,
    dirty: Vec<RoaringTreemap>,
    first_ms: Vec<Option<i64>>,
    seq: u64,
    lost_seen: u64,
}

impl Tracer {
    /// Start recording for `targets`, with `buffer_kb` of trace buffer per
    /// CPU.
    pub fn start(targets: Vec<Target>, buffer_kb: u32) -> Result<Self, AgentError> {
        let root = tracefs()?;
        let instances = root.join("instances");
        remove_stale(&instances);
        let dir = instances.join(format!(
            "pilotlight-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir(&dir)
            .map_err(|e| trace_err(format!("cannot create {}: {e}", dir.display())))?;
        // From here on, dropping `guard` removes the instance.
        let guard = InstanceGuard(dir.clone());
        write_file(&dir.join("buffer_size_kb"), &buffer_kb.max(1).to_string())?;
        // One clock for all CPUs, so that the pipe orders a write that
        // completed on one CPU before a marker written later on another.
        if let Err(e) = write_file(&dir.join("trace_clock"), "mono") {
            tracing::warn!(cause = %e, "cannot use the mono trace clock; events are ordered by per-CPU clocks");
        }
        let mut devs: Vec<u32> = targets.iter().map(|t| t.device.dev).collect();
        devs.sort_unstable();
        devs.dedup();
        let filter = devs
            .iter()
            .map(|d| format!("dev == {d}"))
            .collect::<Vec<_>>()
            .join(" || ");
        let mut enabled = 0;
        for ev in EVENTS {
            let ev_dir = dir.join("events").join(ev);
            if !ev_dir.exists() {
                continue;
            }
            write_file(&ev_dir.join("filter"), &filter)?;
            write_file(&ev_dir.join("enable"), "1")?;
            enabled += 1;
        }
        if enabled == 0 {
            return Err(trace_err(format!(
                "this kernel has no block completion tracepoints under {}",
                dir.join("events/block").display()
            )));
        }
        let pipe = File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(dir.join("trace_pipe"))
            .map_err(|e| trace_err(format!("cannot open trace_pipe: {e}")))?;
        std::mem::forget(guard);
        let n = targets.len();
        let mut t = Self {
            lost_seen: 0,
            dir,
            pipe: Some(pipe),
            partial: Vec::new(),
            targets,
            dirty: vec![RoaringTreemap::new(); n],
            first_ms: vec![None; n],
            seq: 0,
        };
        t.lost_seen = t.lost_counter()?;
        Ok(t)
    }

    /// The instance's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sum of events the kernel dropped or overwrote, over all CPUs.
    fn lost_counter(&self) -> Result<u64, AgentError> {
        let per_cpu = self.dir.join("per_cpu");
        let entries = std::fs::read_dir(&per_cpu)
            .map_err(|e| trace_err(format!("{}: {e}", per_cpu.display())))?;
        let mut sum = 0u64;
        for e in entries.flatten() {
            let Ok(text) = std::fs::read_to_string(e.path().join("stats")) else {
                continue;
            };
            for line in text.lines() {
                let Some((k, v)) = line.split_once(':') else {
                    continue;
                };
                if matches!(k.trim(), "overrun" | "dropped events" | "commit overrun") {
                    sum += v.trim().parse::<u64>().unwrap_or(0);
                }
            }
        }
        Ok(sum)
    }

    /// Read every event recorded up to now into the dirty sets. Returns
    /// whether events were lost since the last call.
    pub fn sync(&mut self) -> Result<bool, AgentError> {
        self.seq += 1;
        let marker = self.seq;
        write_file(
            &self.dir.join("trace_marker"),
            &format!("pilotlight-sync-{marker}"),
        )?;
        let Some(mut pipe) = self.pipe.take() else {
            return Err(trace_err("the trace pipe is closed"));
        };
        let r = self.read_to_marker(&mut pipe, marker);
        self.pipe = Some(pipe);
        let lost = r?;
        let counter = self.lost_counter()?;
        if counter != self.lost_seen {
            self.lost_seen = counter;
            return Ok(true);
        }
        Ok(lost)
    }

    /// Read the pipe until `marker` comes back. Returns whether the pipe
    /// reported lost events.
    fn read_to_marker(&mut self, pipe: &mut File, marker: u64) -> Result<bool, AgentError> {
        let deadline = Instant::now() + SYNC_DEADLINE;
        let mut lost = false;
        let mut buf = vec![0u8; 64 << 10];
        let mut seen = false;
        while !seen {
            match pipe.read(&mut buf) {
                Ok(0) => {}
                Ok(n) => {
                    self.partial
                        .extend_from_slice(buf.get(..n).unwrap_or_default());
                    let (s, l) = self.consume(marker);
                    seen |= s;
                    lost |= l;
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // The marker itself may be among the events a full
                    // buffer dropped: then stop waiting, everything is
                    // rescanned anyway.
                    if self.lost_counter()? != self.lost_seen {
                        return Ok(true);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(trace_err(format!("reading trace_pipe: {e}"))),
            }
            if Instant::now() > deadline {
                return Err(trace_err(
                    "the trace marker did not come back within 10 s; tracing stopped working",
                ));
            }
            let mut fds = [nix::poll::PollFd::new(
                std::os::fd::AsFd::as_fd(&*pipe),
                nix::poll::PollFlags::POLLIN,
            )];
            let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(50u8));
        }
        Ok(lost)
    }

    /// Parse the complete lines in `partial`. Returns (marker seen, lost).
    fn consume(&mut self, marker: u64) -> (bool, bool) {
        let (mut seen, mut lost) = (false, false);
        let now = now_ms();
        let mut start = 0;
        while let Some(nl) = self
            .partial
            .get(start..)
            .and_then(|p| p.iter().position(|&b| b == b'\n'))
        {
            let line =
                String::from_utf8_lossy(self.partial.get(start..start + nl).unwrap_or_default());
            start += nl + 1;
            match parse_line(&line) {
                Line::Write { dev, sector, nr } => {
                    tracing::trace!(dev, sector, nr, "write completed");
                    for (i, t) in self.targets.iter().enumerate() {
                        if t.device.dev != dev {
                            continue;
                        }
                        if let Some(set) = self.dirty.get_mut(i) {
                            if t.mark(set, sector, nr) {
                                if let Some(f) = self.first_ms.get_mut(i) {
                                    f.get_or_insert(now);
                                }
                            }
                        }
                    }
                }
                Line::Marker(m) if m == marker => seen = true,
                Line::Lost => lost = true,
                Line::Marker(_) | Line::Other => {}
            }
        }
        self.partial.drain(..start);
        (seen, lost)
    }

    /// Take the dirty set of volume `i` and when its first write was seen.
    pub fn take(&mut self, i: usize) -> (RoaringTreemap, Option<i64>) {
        let set = self
            .dirty
            .get_mut(i)
            .map(std::mem::take)
            .unwrap_or_default();
        let first = self.first_ms.get_mut(i).and_then(Option::take);
        (set, first)
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        for ev in EVENTS {
            let _ = write_file(&self.dir.join("events").join(ev).join("enable"), "0");
        }
        drop(self.pipe.take());
        remove_instance(&self.dir);
    }
}

struct InstanceGuard(PathBuf);

impl Drop for InstanceGuard {
    fn drop(&mut self) {
        remove_instance(&self.0);
    }
}

fn remove_instance(dir: &Path) {
    if let Err(e) = std::fs::remove_dir(dir) {
        tracing::warn!(instance = %dir.display(), cause = %e, "cannot remove the tracing instance");
    }
}

/// Remove instances left by agents that are gone (killed).
fn remove_stale(instances: &Path) {
    let Ok(entries) = std::fs::read_dir(instances) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("pilotlight-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!(instance = %name, "removing a tracing instance a stopped agent left");
            remove_instance(&e.path());
        }
    }
}

fn tracefs() -> Result<PathBuf, AgentError> {
    for p in TRACEFS {
        if Path::new(p).join("instances").is_dir() {
            return Ok(PathBuf::from(p));
        }
    }
    let target = Path::new(TRACEFS[0]);
    nix::mount::mount(
        Some("nodev"),
        target,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| {
        trace_err(format!(
            "tracefs is not mounted and cannot be mounted at {} ({e}); live tracking needs root and a kernel with tracing (use --track scan)",
            target.display()
        ))
    })?;
    if target.join("instances").is_dir() {
        Ok(target.to_owned())
    } else {
        Err(trace_err("tracefs has no instances directory"))
    }
}

fn write_file(path: &Path, text: &str) -> Result<(), AgentError> {
    let mut f = File::options()
        .write(true)
        .open(path)
        .map_err(|e| trace_err(format!("{}: {e}", path.display())))?;
    f.write_all(text.as_bytes())
        .map_err(|e| trace_err(format!("writing {text:?} to {}: {e}", path.display())))
}

/// Run blocking tracefs I/O (a marker round trip through the pipe) without
/// holding up an async worker thread that also drives the TLS streams.
fn off_async<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    i64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000)
        .unwrap_or(i64::MAX)
}

/// What a cycle reads of one volume.
#[derive(Debug)]
pub enum Plan {
    /// Every block (initial sync, lost events, unclean stop...).
    Full(&'static str),
    /// Only these blocks, ascending.
    Blocks(Vec<u64>),
}

/// A volume as tracking knows it.
#[derive(Debug, Clone)]
pub struct TrackedVolume {
    /// Name.
    pub name: String,
    /// Path of the block device.
    pub path: PathBuf,
    /// Size.
    pub size: u64,
    /// Block size.
    pub block_size: u32,
}

/// Counters for status and metrics.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct TrackStats {
    /// Full rescans done since the agent started.
    pub rescans: u64,
    /// Why the last one was needed.
    pub last_rescan_reason: Option<String>,
    /// Milliseconds the filesystem was frozen for the last point.
    pub last_freeze_ms: Option<f64>,
    /// Longest freeze so far.
    pub max_freeze_ms: Option<f64>,
}

/// What one point sent but not yet durable took of each volume.
#[derive(Default)]
struct InFlight {
    /// Dirty blocks read for it.
    sets: Vec<RoaringTreemap>,
    /// Volumes scanned in full for it.
    full: Vec<bool>,
    /// When its oldest write (or unknown change) happened.
    first: Option<i64>,
}

impl InFlight {
    /// Add what a plan took of volume `i`.
    fn add(&mut self, i: usize, set: RoaringTreemap, full: bool) {
        match (self.sets.get_mut(i), self.full.get_mut(i)) {
            (Some(s), Some(f)) => {
                *s |= set;
                *f |= full;
            }
            _ => {
                self.sets.push(set);
                self.full.push(full);
            }
        }
    }
}

fn min_opt(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

/// Dirty-block bookkeeping across cycles and sessions.
pub struct Tracking {
    tracer: Tracer,
    vols: Vec<TrackedVolume>,
    devices: Vec<Device>,
    unsent: Vec<RoaringTreemap>,
    unsent_first: Vec<Option<i64>>,
    rescan: Vec<Option<&'static str>>,
    rescan_since: Vec<Option<i64>>,
    inflight: VecDeque<InFlight>,
    /// Blocks the last thaw wrote itself (ext4 rewrites its superblock on
    /// thaw), and when: alone, they do not call for a point.
    echo: Vec<RoaringTreemap>,
    echo_at: Option<Instant>,
    /// When the last [`collect`](Self::collect) started: every write that
    /// completed before it is in a point or in the backlog.
    pub collected_ms: i64,
    /// Counters for status.
    pub stats: TrackStats,
}

impl Tracking {
    /// Start tracing `vols`, and pick up the dirty set a clean stop saved in
    /// `state_dir` if nothing was written since.
    pub fn start(
        vols: Vec<TrackedVolume>,
        state_dir: &Path,
        buffer_kb: u32,
    ) -> Result<Self, AgentError> {
        let mut devices = Vec::with_capacity(vols.len());
        for v in &vols {
            devices.push(Device::of(&v.name, &v.path)?);
        }
        let targets = vols
            .iter()
            .zip(&devices)
            .map(|(v, d)| Target {
                device: *d,
                size: v.size,
                block_size: v.block_size,
            })
            .collect();
        // Read (and remove) the saved set before tracing starts: from here
        // on, only a clean stop writes it again.
        let saved = SavedDirty::take(state_dir);
        let tracer = Tracer::start(targets, buffer_kb)?;
        let n = vols.len();
        let mut t = Self {
            tracer,
            devices,
            unsent: vec![RoaringTreemap::new(); n],
            unsent_first: vec![None; n],
            rescan: vec![Some("tracking started without a saved dirty set (first start, or the agent did not stop cleanly)"); n],
            rescan_since: vec![Some(now_ms()); n],
            echo: vec![RoaringTreemap::new(); n],
            echo_at: None,
            inflight: VecDeque::new(),
            collected_ms: 0,
            stats: TrackStats::default(),
            vols,
        };
        if let Some(saved) = saved {
            let boot = boot_id();
            for (i, v) in t.vols.iter().enumerate() {
                let Some(s) = saved.volumes.iter().find(|s| s.name == v.name) else {
                    continue;
                };
                let dev = t.devices.get(i).copied();
                let same_device = dev.is_some_and(|d| d.own == s.own);
                let counters = dev.map(|d| d.write_counters()).transpose()?;
                if saved.boot_id != boot
                    || !same_device
                    || counters != Some(s.counters)
                    || s.block_size != v.block_size
                {
                    if let Some(r) = t.rescan.get_mut(i) {
                        *r =
                            Some("the device was written (or changed) while the agent was stopped");
                    }
                    continue;
                }
                if let (Some(u), Some(r), Some(since)) = (
                    t.unsent.get_mut(i),
                    t.rescan.get_mut(i),
                    t.rescan_since.get_mut(i),
                ) {
                    *u = s.dirty.clone();
                    *r = None;
                    *since = None;
                }
                if let Some(f) = t.unsent_first.get_mut(i) {
                    *f = (!s.dirty.is_empty()).then(now_ms);
                }
            }
        }
        Ok(t)
    }

    /// Whether `path` lies on a filesystem whose disk holds a traced
    /// volume (then writes there are changes to replicate).
    pub fn traces_path(&self, path: &Path) -> bool {
        let Ok(meta) = std::fs::metadata(path) else {
            return false;
        };
        Device::of_dev(meta.dev()).is_ok_and(|d| self.devices.iter().any(|t| t.dev == d.dev))
    }

    /// The tracing instance's directory.
    pub fn instance(&self) -> &Path {
        self.tracer.dir()
    }

    /// Whether volume `i` needs a full scan before its next point.
    pub fn needs_rescan(&self, i: usize) -> Option<&'static str> {
        self.rescan.get(i).copied().flatten()
    }

    /// Make volume `i` be scanned in full (its base changed).
    pub fn force_rescan(&mut self, i: usize, reason: &'static str) {
        if let Some(r) = self.rescan.get_mut(i) {
            *r = Some(reason);
        }
        if let Some(s) = self.rescan_since.get_mut(i) {
            s.get_or_insert_with(now_ms);
        }
    }

    /// Flag volume `i` for a full scan, remembering since when its changes
    /// are unknown (for the lag).
    fn flag_rescan(&mut self, i: usize, reason: &'static str, since: i64) {
        if let Some(r) = self.rescan.get_mut(i) {
            r.get_or_insert(reason);
        }
        if let Some(s) = self.rescan_since.get_mut(i) {
            *s = Some(s.map_or(since, |x| x.min(since)));
        }
    }

    /// Bring in the events recorded so far.
    pub fn collect(&mut self) -> Result<(), AgentError> {
        let started = now_ms();
        let tracer = &mut self.tracer;
        if off_async(|| tracer.sync())? {
            tracing::warn!("trace events were lost (buffer overrun); rescanning every volume");
            for i in 0..self.vols.len() {
                self.flag_rescan(
                    i,
                    "trace events were lost (the trace buffer overran)",
                    started,
                );
            }
        }
        for i in 0..self.vols.len() {
            let (set, first) = self.tracer.take(i);
            if let Some(u) = self.unsent.get_mut(i) {
                *u |= set;
            }
            if let (Some(f), Some(t)) = (self.unsent_first.get_mut(i), first) {
                f.get_or_insert(t);
            }
        }
        self.collected_ms = started;
        Ok(())
    }

    /// What to read of every volume for the next point (call right after
    /// [`collect`](Self::collect)). What is taken stays accounted as in
    /// flight until [`durable`](Self::durable).
    pub fn plan(&mut self) -> Vec<Plan> {
        let mut point = InFlight::default();
        let plans = self.plan_into(&mut point);
        self.inflight.push_back(point);
        plans
    }

    /// Like [`plan`](Self::plan), for the same point as the last plan (the
    /// final, frozen delta after a pre-copy).
    pub fn plan_more(&mut self) -> Vec<Plan> {
        let mut point = self.inflight.pop_back().unwrap_or_default();
        let plans = self.plan_into(&mut point);
        self.inflight.push_back(point);
        plans
    }

    fn plan_into(&mut self, point: &mut InFlight) -> Vec<Plan> {
        let mut plans = Vec::with_capacity(self.vols.len());
        for i in 0..self.vols.len() {
            let set = self
                .unsent
                .get_mut(i)
                .map(std::mem::take)
                .unwrap_or_default();
            let mut first = self.unsent_first.get_mut(i).and_then(Option::take);
            match self.rescan.get_mut(i).and_then(Option::take) {
                Some(reason) => {
                    let since = self.rescan_since.get_mut(i).and_then(Option::take);
                    first = min_opt(first, since.or(Some(now_ms())));
                    self.stats.rescans += 1;
                    self.stats.last_rescan_reason = Some(reason.to_owned());
                    tracing::info!(volume = %self.vols.get(i).map_or("", |v| v.name.as_str()), reason, "full rescan");
                    plans.push(Plan::Full(reason));
                    point.add(i, RoaringTreemap::new(), true);
                }
                None => {
                    plans.push(Plan::Blocks(set.iter().collect()));
                    point.add(i, set, false);
                }
            }
            point.first = min_opt(point.first, first);
        }
        plans
    }

    /// Right after a thaw: what is dirty now was (almost surely) written by
    /// the thaw itself.
    pub fn note_thaw(&mut self) -> Result<(), AgentError> {
        self.collect()?;
        self.echo.clone_from(&self.unsent);
        self.echo_at = Some(Instant::now());
        Ok(())
    }

    /// Whether what is dirty calls for a point now: a rescan, or dirty
    /// blocks other than the last thaw's own writes (those wait at most
    /// [`ECHO_HOLD`], so that an idle filesystem is not frozen every
    /// interval only to record its own thaw).
    pub fn worth_a_point(&self) -> bool {
        if self.rescan.iter().any(Option::is_some) {
            return true;
        }
        !self.unsent.iter().all(RoaringTreemap::is_empty) && !self.only_echo()
    }

    /// Whether the only dirty blocks are the last thaw's own writes, held
    /// back for less than [`ECHO_HOLD`] so far. Lag and backlog leave them
    /// out.
    fn only_echo(&self) -> bool {
        self.echo_at.is_some_and(|t| t.elapsed() < ECHO_HOLD)
            && self
                .unsent
                .iter()
                .zip(&self.echo)
                .all(|(u, e)| u.is_subset(e))
    }

    /// The oldest point in flight became durable.
    pub fn durable(&mut self) {
        self.inflight.pop_front();
    }

    /// Points that will not become durable: their blocks are dirty again,
    /// and a volume they scanned in full needs that scan again.
    fn put_back(&mut self, p: InFlight) {
        let since = p.first.unwrap_or_else(now_ms);
        for (i, (s, full)) in p.sets.into_iter().zip(p.full).enumerate() {
            if full {
                self.flag_rescan(i, "the point of a full scan was not made durable", since);
            }
            if let Some(u) = self.unsent.get_mut(i) {
                *u |= s;
            }
            if let (Some(f), Some(t)) = (self.unsent_first.get_mut(i), p.first) {
                *f = Some(f.map_or(t, |x| x.min(t)));
            }
        }
    }

    /// A session ended with points not durable: put them all back.
    pub fn requeue(&mut self) {
        while let Some(p) = self.inflight.pop_front() {
            self.put_back(p);
        }
    }

    /// Drop the last planned point (its cycle was abandoned before sending
    /// its end, or found nothing to send).
    pub fn unplan(&mut self) {
        if let Some(p) = self.inflight.pop_back() {
            self.put_back(p);
        }
    }

    /// Age in milliseconds of the oldest write not yet durable (0 if none);
    /// for a volume whose changes are unknown (rescan), since they are.
    pub fn lag_ms(&self) -> i64 {
        let echo = self.only_echo();
        let oldest = self
            .inflight
            .iter()
            .filter_map(|p| p.first)
            .chain(
                self.unsent_first
                    .iter()
                    .filter_map(|f| *f)
                    .filter(|_| !echo),
            )
            .chain(self.rescan_since.iter().filter_map(|f| *f))
            .min();
        oldest.map_or(0, |o| (now_ms() - o).max(0))
    }

    /// Bytes of blocks dirty and not yet in a point.
    pub fn unsent_bytes(&self) -> u64 {
        self.unsent
            .iter()
            .zip(&self.vols)
            .map(|(s, v)| s.len() * u64::from(v.block_size))
            .sum()
    }

    /// Bytes not yet durable: dirty blocks, and the whole of a volume that
    /// needs (or is in) a full scan.
    pub fn backlog_bytes(&self) -> u64 {
        let mut total = if self.only_echo() {
            0
        } else {
            self.unsent_bytes()
        };
        for (i, v) in self.vols.iter().enumerate() {
            if self.needs_rescan(i).is_some() {
                total += v.size;
            }
        }
        for p in &self.inflight {
            for (i, (s, full)) in p.sets.iter().zip(&p.full).enumerate() {
                let v = self.vols.get(i);
                total += if *full {
                    v.map_or(0, |v| v.size)
                } else {
                    s.len() * v.map_or(0, |v| u64::from(v.block_size))
                };
            }
        }
        total
    }

    /// Record how long the filesystem was frozen for a point.
    pub fn note_freeze(&mut self, d: Duration) {
        let ms = d.as_secs_f64() * 1000.0;
        self.stats.last_freeze_ms = Some(ms);
        self.stats.max_freeze_ms = Some(self.stats.max_freeze_ms.map_or(ms, |m| m.max(ms)));
        metrics::histogram!("pilotlight_agent_freeze_seconds").record(d.as_secs_f64());
    }

    /// A clean stop: save what is dirty and not durable, with the devices'
    /// write counters, so that the next start needs no rescan if nothing is
    /// written meanwhile. Volumes that still need a rescan are not saved.
    pub fn save_clean(mut self, state_dir: &Path) -> Result<(), AgentError> {
        self.collect()?;
        self.requeue();
        let mut saved = SavedDirty {
            boot_id: boot_id(),
            volumes: Vec::new(),
        };
        for (i, v) in self.vols.iter().enumerate() {
            if self.needs_rescan(i).is_some() {
                continue;
            }
            let (Some(d), Some(set)) = (self.devices.get(i), self.unsent.get(i)) else {
                continue;
            };
            saved.volumes.push(SavedVolume {
                name: v.name.clone(),
                own: d.own,
                block_size: v.block_size,
                counters: d.write_counters()?,
                dirty: set.clone(),
            });
        }
        // The tracer stops before the counters could move on our account.
        drop(self);
        saved.save(state_dir)
    }
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

struct SavedVolume {
    name: String,
    own: (u32, u32),
    block_size: u32,
    counters: [u64; 4],
    dirty: RoaringTreemap,
}

/// The dirty set of a clean stop.
///
/// ```text
/// "PLDIRTY1" | boot_id len u16 | boot_id | count u32 | volume* | crc32 u32
/// volume: name len u16 | name | major u32 | minor u32 | block_size u32
///         | counters 4 x u64 | bitmap len u64 | roaring treemap
/// ```
struct SavedDirty {
    boot_id: String,
    volumes: Vec<SavedVolume>,
}

impl SavedDirty {
    fn save(&self, dir: &Path) -> Result<(), AgentError> {
        let mut out = Vec::new();
        out.extend_from_slice(DIRTY_MAGIC);
        put_str(&mut out, &self.boot_id);
        out.extend_from_slice(&(self.volumes.len() as u32).to_le_bytes());
        for v in &self.volumes {
            put_str(&mut out, &v.name);
            out.extend_from_slice(&v.own.0.to_le_bytes());
            out.extend_from_slice(&v.own.1.to_le_bytes());
            out.extend_from_slice(&v.block_size.to_le_bytes());
            for c in v.counters {
                out.extend_from_slice(&c.to_le_bytes());
            }
            let mut bm = Vec::with_capacity(v.dirty.serialized_size());
            v.dirty
                .serialize_into(&mut bm)
                .map_err(|e| trace_err(format!("dirty set: {e}")))?;
            out.extend_from_slice(&(bm.len() as u64).to_le_bytes());
            out.extend_from_slice(&bm);
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        crate::state::write_atomic(dir, DIRTY_FILE, &out)
    }

    /// Read and remove the saved set; `None` if there is none or it is not
    /// intact (then every volume is rescanned).
    fn take(dir: &Path) -> Option<Self> {
        let path = dir.join(DIRTY_FILE);
        let data = std::fs::read(&path).ok()?;
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(cause = %e, "cannot remove the saved dirty set; not using it");
            return None;
        }
        let parsed = Self::parse(&data);
        if parsed.is_none() {
            tracing::warn!(file = %path.display(), "saved dirty set is damaged; rescanning");
        }
        parsed
    }

    fn parse(data: &[u8]) -> Option<Self> {
        let (body, crc) = data.split_at_checked(data.len().checked_sub(4)?)?;
        if crc32fast::hash(body).to_le_bytes() != crc {
            return None;
        }
        let mut r = Reader(body);
        if r.bytes(8)? != DIRTY_MAGIC {
            return None;
        }
        let boot_id = r.string()?;
        let count = r.u32()?;
        let mut volumes = Vec::new();
        for _ in 0..count {
            let name = r.string()?;
            let own = (r.u32()?, r.u32()?);
            let block_size = r.u32()?;
            let counters = [r.u64()?, r.u64()?, r.u64()?, r.u64()?];
            let len = usize::try_from(r.u64()?).ok()?;
            let dirty = RoaringTreemap::deserialize_from(r.bytes(len)?).ok()?;
            volumes.push(SavedVolume {
                name,
                own,
                block_size,
                counters,
                dirty,
            });
        }
        Some(Self { boot_id, volumes })
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    let n = b.len().min(u16::MAX as usize);
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(b.get(..n).unwrap_or_default());
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let (a, b) = self.0.split_at_checked(n)?;
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.bytes(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.bytes(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.bytes(8)?.try_into().ok()?))
    }
    fn string(&mut self) -> Option<String> {
        let n = usize::from(self.u16()?);
        String::from_utf8(self.bytes(n)?.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_the_kernel_lines() {
        let rq = "  kworker/u8:2-123  [001] d..1. 11015.1: block_rq_complete: 7,0 WS () 800 + 8 be,0,4 [0]";
        assert_eq!(
            parse_line(rq),
            Line::Write {
                dev: 7 << 20,
                sector: 800,
                nr: 8
            }
        );
        let bio = "  dd-1 [000] ..... 1.0: block_bio_complete: 253,1 W 16 + 32 [0]";
        assert_eq!(
            parse_line(bio),
            Line::Write {
                dev: (253 << 20) | 1,
                sector: 16,
                nr: 32
            }
        );
        let read = "  dd-1 [000] ..... 1.0: block_rq_complete: 7,0 R () 0 + 8 be,0,4 [0]";
        assert_eq!(parse_line(read), Line::Other);
        let discard = "  x-1 [000] ..... 1.0: block_rq_complete: 7,0 DS () 64 + 64 none,0,0 [0]";
        assert!(matches!(parse_line(discard), Line::Write { nr: 64, .. }));
        let marker = "  a-9 [001] ..... 2.0: tracing_mark_write: pilotlight-sync-42";
        assert_eq!(parse_line(marker), Line::Marker(42));
        assert_eq!(parse_line("CPU:1 [LOST 120 EVENTS]"), Line::Lost);
        assert_eq!(parse_line("garbage + line"), Line::Other);
    }

    #[test]
    fn marks_the_blocks_a_request_touches() {
        let t = Target {
            device: Device {
                dev: 1,
                start: 2048,
                own: (1, 1),
            },
            size: 1 << 20,
            block_size: 4096,
        };
        let mut s = RoaringTreemap::new();
        // Sectors 2048+7 .. 2048+9 straddle blocks 0 and 1 of the partition.
        assert!(t.mark(&mut s, 2055, 2));
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 1]);
        // Before the partition, and past its end: nothing.
        assert!(!t.mark(&mut s, 0, 2048));
        assert!(!t.mark(&mut s, 2048 + 2048, 8));
        // Overlapping the end is clipped to the last block.
        assert!(t.mark(&mut s, 2048 + 2040, 64));
        assert_eq!(s.max(), Some(255));
    }

    #[test]
    fn saved_dirty_round_trips_and_rejects_damage() {
        let mut dirty = RoaringTreemap::new();
        dirty.insert_range(10..20);
        let saved = SavedDirty {
            boot_id: "b".into(),
            volumes: vec![SavedVolume {
                name: "root".into(),
                own: (7, 3),
                block_size: 4096,
                counters: [1, 2, 3, 4],
                dirty,
            }],
        };
        let dir = tempfile::tempdir().unwrap();
        saved.save(dir.path()).unwrap();
        let mut data = std::fs::read(dir.path().join(DIRTY_FILE)).unwrap();
        let back = SavedDirty::parse(&data).unwrap();
        assert_eq!(back.volumes[0].dirty.len(), 10);
        assert_eq!(back.volumes[0].counters, [1, 2, 3, 4]);
        let mid = data.len() / 2;
        data[mid] ^= 1;
        assert!(SavedDirty::parse(&data).is_none());
        // Taking it removes it: an unclean stop after a start finds nothing.
        assert!(SavedDirty::take(dir.path()).is_some());
        assert!(SavedDirty::take(dir.path()).is_none());
    }
}
