//! Dirty-block bookkeeping across cycles and sessions: the blocks not yet
//! in a point, the points sent but not yet durable, which volumes need a
//! full rescan and why, the lag and backlog the status shows, and the
//! thaw's own writes held back.
//!
//! The events come from an [`EventSource`]: the tracefs [`Tracer`] in the
//! agent, a fake one in the unit tests.

use std::collections::VecDeque;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use roaring::RoaringTreemap;

use super::plan::{min_opt, InFlight};
use super::saved::{boot_id, SavedDirty, SavedVolume};
use pilotlight_protocol::clock::now_ms;

use super::{Device, Dirty, EventSource, Plan, RescanReason, Target, Tracer};
use crate::AgentError;

/// Longest a point waits when the only dirty blocks are the ones the last
/// thaw wrote itself.
pub const ECHO_HOLD: Duration = Duration::from_secs(60);

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
    /// Why the last one was needed (a [`RescanReason`]'s sentence).
    pub last_rescan_reason: Option<String>,
    /// Milliseconds the filesystem was frozen for the last point.
    pub last_freeze_ms: Option<f64>,
    /// Longest freeze so far.
    pub max_freeze_ms: Option<f64>,
    /// Freezes the watchdog ended at `--freeze-limit` (their points are
    /// fuzzy).
    #[serde(default)]
    pub watchdog_thaws: u64,
    /// Bytes read while frozen for the last point (its final delta, kept
    /// in memory until sent).
    #[serde(default)]
    pub last_frozen_read_bytes: Option<u64>,
    /// Bytes the agent read of the volumes since it started, full scans
    /// included.
    #[serde(default)]
    pub read_bytes_total: u64,
    /// Of those, the bytes read for dirty blocks (not by full scans).
    #[serde(default)]
    pub tracked_read_bytes_total: u64,
    /// Bytes the workload wrote to the volumes as the tracer saw them
    /// (completed writes, discards included).
    #[serde(default)]
    pub traced_write_bytes_total: u64,
    /// `tracked_read_bytes_total / traced_write_bytes_total`: bytes read
    /// per byte written (none before a write).
    #[serde(default)]
    pub read_per_written: Option<f64>,
    /// Blocks sent as their written pages (`PartialBlock`).
    #[serde(default)]
    pub partial_blocks_total: u64,
    /// Writes the volumes' disks had in flight on average (smoothed over
    /// about a second; from 2 the disk counts as saturated).
    #[serde(default)]
    pub disk_queue: Option<f64>,
    /// Intervals a due point waited because the disk was saturated
    /// (`--max-lag`).
    #[serde(default)]
    pub deferred_intervals_total: u64,
}

/// One volume's bookkeeping.
#[derive(Debug)]
struct VolumeTrack {
    vol: TrackedVolume,
    device: Device,
    /// Dirty blocks not yet in a point, with their written pages.
    unsent: Dirty,
    /// When the oldest of them was written.
    unsent_first: Option<i64>,
    /// Why the volume needs a full scan before its next point, if it does.
    rescan: Option<RescanReason>,
    /// Since when its changes are unknown (for the lag).
    rescan_since: Option<i64>,
    /// Blocks the last thaw wrote itself (ext4 rewrites its superblock on
    /// thaw): alone, they do not call for a point.
    echo: RoaringTreemap,
}

impl VolumeTrack {
    /// Bytes of its dirty blocks not yet in a point.
    fn unsent_bytes(&self) -> u64 {
        self.unsent.blocks.len() * u64::from(self.vol.block_size)
    }

    /// Flag it for a full scan (keeping an earlier reason), remembering
    /// since when its changes are unknown.
    fn flag_rescan(&mut self, reason: RescanReason, since: i64) {
        self.rescan.get_or_insert(reason);
        self.rescan_since = Some(self.rescan_since.map_or(since, |x| x.min(since)));
    }
}

/// Dirty-block bookkeeping across cycles and sessions.
pub struct Tracking<S = Tracer> {
    source: S,
    vols: Vec<VolumeTrack>,
    inflight: VecDeque<InFlight>,
    /// When the last thaw's writes were taken as [`VolumeTrack::echo`].
    echo_at: Option<Instant>,
    /// When the last [`collect`](Self::collect) started: every write that
    /// completed before it is in a point or in the backlog.
    pub collected_ms: i64,
    /// Counters for status.
    pub stats: TrackStats,
    /// Partial blocks are not sent until a point is durable again (a
    /// session ended with some unconfirmed: the receiver may have refused
    /// one).
    partial_paused: bool,
}

impl Tracking<Tracer> {
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
        let mut t = Self::new(tracer, vols.into_iter().zip(devices).collect());
        if let Some(saved) = saved {
            t.resume(&saved, &boot_id(), Device::write_counters)?;
        }
        Ok(t)
    }

    /// The tracing instance's directory.
    pub fn instance(&self) -> &Path {
        self.source.dir()
    }

    /// A clean stop: save what is dirty and not durable, with the devices'
    /// write counters, so that the next start needs no rescan if nothing is
    /// written meanwhile. Volumes that still need a rescan are not saved.
    pub fn save_clean(mut self, state_dir: &Path) -> Result<(), AgentError> {
        self.collect()?;
        self.requeue();
        let saved = self.to_saved(boot_id(), Device::write_counters)?;
        // The tracer stops before the counters could move on our account.
        drop(self);
        saved.save(state_dir)
    }
}

impl<S: EventSource> Tracking<S> {
    /// Track `vols` with events from `source` (numbered in the same order).
    /// Every volume needs a rescan until [`resume`](Self::resume) says
    /// otherwise.
    fn new(source: S, vols: Vec<(TrackedVolume, Device)>) -> Self {
        let now = now_ms();
        let vols = vols
            .into_iter()
            .map(|(vol, device)| VolumeTrack {
                unsent: Dirty::new(vol.block_size),
                vol,
                device,
                unsent_first: None,
                rescan: Some(RescanReason::NoSavedDirtySet),
                rescan_since: Some(now),
                echo: RoaringTreemap::new(),
            })
            .collect();
        Self {
            source,
            vols,
            inflight: VecDeque::new(),
            echo_at: None,
            collected_ms: 0,
            stats: TrackStats::default(),
            partial_paused: false,
        }
    }

    /// Take up the dirty set a clean stop saved, for each volume whose
    /// device was not written since: same boot, same device, same write
    /// `counters`, same block size.
    fn resume(
        &mut self,
        saved: &SavedDirty,
        boot: &str,
        counters: impl Fn(&Device) -> Result<[u64; 4], AgentError>,
    ) -> Result<(), AgentError> {
        for v in &mut self.vols {
            let Some(s) = saved.volumes.iter().find(|s| s.name == v.vol.name) else {
                continue;
            };
            let now = counters(&v.device)?;
            if saved.boot_id != boot
                || v.device.own != s.own
                || now != s.counters
                || s.block_size != v.vol.block_size
            {
                v.rescan = Some(RescanReason::WrittenWhileStopped);
                continue;
            }
            v.unsent = Dirty::whole(s.dirty.clone(), v.vol.block_size);
            v.rescan = None;
            v.rescan_since = None;
            v.unsent_first = (!s.dirty.is_empty()).then(now_ms);
        }
        Ok(())
    }

    /// What a clean stop saves: the dirty blocks of every volume that does
    /// not need a rescan, with its device's write `counters`.
    fn to_saved(
        &self,
        boot_id: String,
        counters: impl Fn(&Device) -> Result<[u64; 4], AgentError>,
    ) -> Result<SavedDirty, AgentError> {
        let mut volumes = Vec::new();
        for v in self.vols.iter().filter(|v| v.rescan.is_none()) {
            volumes.push(SavedVolume {
                name: v.vol.name.clone(),
                own: v.device.own,
                block_size: v.vol.block_size,
                counters: counters(&v.device)?,
                dirty: v.unsent.blocks.clone(),
            });
        }
        Ok(SavedDirty { boot_id, volumes })
    }

    /// Whether `path` lies on a filesystem whose disk holds a traced
    /// volume (then writes there are changes to replicate).
    pub fn traces_path(&self, path: &Path) -> bool {
        let Ok(meta) = std::fs::metadata(path) else {
            return false;
        };
        Device::of_dev(meta.dev()).is_ok_and(|d| self.vols.iter().any(|v| v.device.dev == d.dev))
    }

    /// Why volume `i` needs a full scan before its next point, if it does.
    pub fn needs_rescan(&self, i: usize) -> Option<RescanReason> {
        self.vols.get(i).and_then(|v| v.rescan)
    }

    /// Make volume `i` be scanned in full (its base changed).
    pub fn force_rescan(&mut self, i: usize, reason: RescanReason) {
        if let Some(v) = self.vols.get_mut(i) {
            v.rescan = Some(reason);
            v.rescan_since.get_or_insert_with(now_ms);
        }
    }

    /// Bring in the events recorded so far.
    pub fn collect(&mut self) -> Result<(), AgentError> {
        let started = now_ms();
        if self.source.sync()? {
            tracing::warn!("trace events were lost (buffer overrun); rescanning every volume");
            for v in &mut self.vols {
                v.flag_rescan(RescanReason::LostEvents, started);
            }
        }
        for (i, v) in self.vols.iter_mut().enumerate() {
            let w = self.source.take(i);
            v.unsent.merge(w.dirty);
            if let Some(t) = w.first_ms {
                v.unsent_first.get_or_insert(t);
            }
            self.stats.traced_write_bytes_total += w.bytes;
            metrics::counter!("pilotlight_agent_traced_write_bytes_total").increment(w.bytes);
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
        for (i, v) in self.vols.iter_mut().enumerate() {
            let set = v.unsent.take();
            let mut first = v.unsent_first.take();
            match v.rescan.take() {
                Some(reason) => {
                    let since = v.rescan_since.take();
                    first = min_opt(first, since.or(Some(now_ms())));
                    self.stats.rescans += 1;
                    self.stats.last_rescan_reason = Some(reason.to_string());
                    tracing::info!(volume = %v.vol.name, %reason, "full rescan");
                    plans.push(Plan::Full(reason));
                    point.add(i, RoaringTreemap::new(), true);
                }
                None => {
                    plans.push(Plan::Blocks(set.blocks.iter().collect(), set.pages));
                    point.add(i, set.blocks, false);
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
        for v in &mut self.vols {
            v.echo.clone_from(&v.unsent.blocks);
        }
        self.echo_at = Some(Instant::now());
        Ok(())
    }

    /// Whether what is dirty calls for a point now: a rescan, or dirty
    /// blocks other than the last thaw's own writes (those wait at most
    /// [`ECHO_HOLD`], so that an idle filesystem is not frozen every
    /// interval only to record its own thaw).
    pub fn worth_a_point(&self) -> bool {
        self.worth_a_point_at(Instant::now())
    }

    fn worth_a_point_at(&self, now: Instant) -> bool {
        if self.vols.iter().any(|v| v.rescan.is_some()) {
            return true;
        }
        !self.vols.iter().all(|v| v.unsent.is_empty()) && !self.only_echo(now)
    }

    /// Whether the only dirty blocks are the last thaw's own writes, held
    /// back for less than [`ECHO_HOLD`] so far. Lag and backlog leave them
    /// out.
    fn only_echo(&self, now: Instant) -> bool {
        self.echo_at
            .is_some_and(|t| now.saturating_duration_since(t) < ECHO_HOLD)
            && self.vols.iter().all(|v| v.unsent.blocks.is_subset(&v.echo))
    }

    /// The oldest point in flight became durable (partial blocks may be
    /// sent again).
    pub fn durable(&mut self) {
        self.inflight.pop_front();
        self.partial_paused = false;
    }

    /// A session ended while partial blocks were not confirmed: send
    /// blocks whole until a point is durable again (whenever in doubt,
    /// whole blocks).
    pub fn pause_partial(&mut self) {
        self.partial_paused = true;
    }

    /// Whether partial blocks may be sent.
    pub fn partial_allowed(&self) -> bool {
        !self.partial_paused
    }

    /// Count bytes read of the volumes for a point (`tracked`: for dirty
    /// blocks, not a full scan) and blocks sent as pages.
    pub fn note_read(&mut self, bytes: u64, tracked: bool, partial_blocks: u64) {
        let s = &mut self.stats;
        s.read_bytes_total += bytes;
        s.partial_blocks_total += partial_blocks;
        if tracked {
            s.tracked_read_bytes_total += bytes;
            metrics::counter!("pilotlight_agent_tracked_read_bytes_total").increment(bytes);
        }
        metrics::counter!("pilotlight_agent_partial_blocks_total").increment(partial_blocks);
        s.read_per_written = (s.traced_write_bytes_total > 0)
            .then(|| s.tracked_read_bytes_total as f64 / s.traced_write_bytes_total as f64);
        if let Some(r) = s.read_per_written {
            metrics::gauge!("pilotlight_agent_read_per_written").set(r);
        }
    }

    /// Points that will not become durable: their blocks are dirty again,
    /// and a volume they scanned in full needs that scan again.
    fn put_back(&mut self, p: InFlight) {
        let since = p.first.unwrap_or_else(now_ms);
        for (v, taken) in self.vols.iter_mut().zip(p.volumes) {
            if taken.full {
                v.flag_rescan(RescanReason::FullScanNotDurable, since);
            }
            // Their pages are not known any more: whole.
            v.unsent.add_whole(&taken.set);
            if let Some(t) = p.first {
                v.unsent_first = Some(v.unsent_first.map_or(t, |x| x.min(t)));
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
        self.lag_ms_at(now_ms(), Instant::now())
    }

    /// [`lag_ms`](Self::lag_ms) as a duration.
    pub fn lag(&self) -> Duration {
        Duration::from_millis(u64::try_from(self.lag_ms()).unwrap_or(0))
    }

    fn lag_ms_at(&self, now_ms: i64, now: Instant) -> i64 {
        let echo = self.only_echo(now);
        let oldest = self
            .inflight
            .iter()
            .filter_map(|p| p.first)
            .chain(
                self.vols
                    .iter()
                    .filter_map(|v| v.unsent_first)
                    .filter(|_| !echo),
            )
            .chain(self.vols.iter().filter_map(|v| v.rescan_since))
            .min();
        oldest.map_or(0, |o| (now_ms - o).max(0))
    }

    /// The volumes' own devices `(major, minor)`, for their load.
    pub fn own_devices(&self) -> Vec<(u32, u32)> {
        self.vols.iter().map(|v| v.device.own).collect()
    }

    /// Bytes of blocks dirty and not yet in a point.
    pub fn unsent_bytes(&self) -> u64 {
        self.vols.iter().map(VolumeTrack::unsent_bytes).sum()
    }

    /// Bytes the next point would read for the dirty blocks not yet in a
    /// point: their written pages where kept, else whole blocks (see
    /// [`Dirty::read_bytes`]).
    pub fn unsent_read_bytes(&self) -> u64 {
        self.vols.iter().map(|v| v.unsent.read_bytes()).sum()
    }

    /// Bytes not yet durable: dirty blocks, and the whole of a volume that
    /// needs (or is in) a full scan.
    pub fn backlog_bytes(&self) -> u64 {
        self.backlog_bytes_at(Instant::now())
    }

    fn backlog_bytes_at(&self, now: Instant) -> u64 {
        let mut total = if self.only_echo(now) {
            0
        } else {
            self.unsent_bytes()
        };
        for v in self.vols.iter().filter(|v| v.rescan.is_some()) {
            total += v.vol.size;
        }
        for p in &self.inflight {
            for (taken, v) in p.volumes.iter().zip(&self.vols) {
                total += if taken.full {
                    v.vol.size
                } else {
                    taken.set.len() * u64::from(v.vol.block_size)
                };
            }
        }
        total
    }

    /// Record what a freeze read and whether the watchdog ended it.
    pub fn note_frozen_read(&mut self, bytes: u64, by_watchdog: bool) {
        self.stats.last_frozen_read_bytes = Some(bytes);
        self.stats.watchdog_thaws += u64::from(by_watchdog);
    }

    /// Record how long the filesystem was frozen for a point.
    pub fn note_freeze(&mut self, d: Duration) {
        let ms = d.as_secs_f64() * 1000.0;
        self.stats.last_freeze_ms = Some(ms);
        self.stats.max_freeze_ms = Some(self.stats.max_freeze_ms.map_or(ms, |m| m.max(ms)));
        metrics::histogram!("pilotlight_agent_freeze_seconds").record(d.as_secs_f64());
    }
}

#[cfg(test)]
mod tests;
