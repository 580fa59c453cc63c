//! One point's cycle: pre-copy rounds (with a freeze ahead), the snapshot
//! or freeze, the final read and send, the thaw, and `EndPoint`.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use pilotlight_protocol::frame::Consistency;
use pilotlight_protocol::Frame;

use crate::consistency::{prepare, Snapshot};
use crate::hashfile::View;
use crate::policy::{self, Precopy};
use crate::replicate::PointReport;
use crate::scan::{scan, PartialRead, ScanJob, Sink};
use crate::session::{Pending, Session, Wait};
use crate::trace::{Plan, RescanReason, Tracking};
use crate::{AgentError, ConsistencyMode};
use pilotlight_protocol::clock::now_ms;

mod frozen;
mod partial;

/// How a cycle ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The point went out (`EndPoint` sent); it is pending.
    Sent,
    /// Nothing was written since the last point: no point.
    Nothing,
    /// Stopped before the point was complete.
    Stopped,
}

/// How a point's pre-copy rounds ended.
enum Precopied {
    /// Stopped before the point was complete.
    Stopped,
    /// Take the freeze.
    Freeze,
    /// The disk is saturated by its workload and `unsent` bytes are left:
    /// no freeze.
    Saturated { unsent: u64 },
}

/// What one point has read and sent so far.
pub(crate) struct Point {
    pub(crate) tag: u64,
    created_ms: i64,
    pub(crate) report: PointReport,
    pub(crate) changes: Vec<Vec<(u64, pilotlight_protocol::BlockHash)>>,
    /// Whether pre-copy rounds sent some of it unfrozen.
    precopied: bool,
    /// How long the last barrier before the freeze waited.
    barrier: std::time::Duration,
    /// A full sync that checkpoints: its progress.
    pub(crate) sync: Option<crate::checkpoint::SyncProgress>,
    /// Blocks sent as pages (`PartialBlock`).
    partial: u64,
    /// Per volume, what it sent as pages (a later round sends such a block
    /// over the same base).
    pages_sent: Vec<partial::SentPages>,
}

impl Session<'_> {
    /// Make point `tag`: read, send and end it. `wire_before` is the
    /// session's wire byte count when the last point ended.
    pub(crate) async fn cycle(
        &mut self,
        tag: u64,
        wire_before: &mut u64,
    ) -> Result<Outcome, AgentError> {
        let cfg = self.agent.cfg;
        let sources: Vec<_> = self
            .vols
            .iter()
            .map(|v| (v.name.clone(), v.path.clone(), v.is_device))
            .collect();
        // A full scan in trace mode is not frozen (it may take long); its
        // point is fuzzy and the next, frozen one is consistent.
        let full = self.any_rescan();
        let mut mode = if full {
            ConsistencyMode::None
        } else {
            cfg.consistency.clone()
        };
        let mut point = Point {
            tag,
            // The point's time: before anything is read (or frozen), so
            // that it holds every write that completed before it.
            created_ms: now_ms(),
            report: PointReport {
                point: 0,
                consistency: Consistency::Fuzzy,
                blocks_sent: 0,
                payload_bytes: 0,
                wire_bytes: 0,
                bytes_read: 0,
                frames_sent: 0,
            },
            changes: vec![Vec::new(); self.vols.len()],
            precopied: false,
            barrier: std::time::Duration::ZERO,
            sync: None,
            partial: 0,
            pages_sent: Vec::new(),
        };
        let freeze_mount = match &cfg.consistency {
            ConsistencyMode::Freeze(m) if !full && self.agent.collector.is_live() => {
                Some(m.clone())
            }
            _ => None,
        };
        if let Some(mount) = freeze_mount {
            match self.precopy(&mut point, &mount).await? {
                Precopied::Stopped => return Ok(Outcome::Stopped),
                Precopied::Freeze => {}
                Precopied::Saturated { unsent } => {
                    // Reading that much frozen would block the workload
                    // for long on a disk it already saturates.
                    tracing::warn!(
                        tag = point.tag,
                        unsent,
                        "disk saturated by its workload with more than the freeze's delta left: no freeze, the point is fuzzy"
                    );
                    mode = ConsistencyMode::None;
                }
            }
        }
        // A freeze counts from the FIFREEZE call: writers block while it
        // flushes, too.
        let frozen_at = Instant::now();
        let freezer = Arc::clone(self.agent.freezer);
        let mut snapshot = tokio::task::spawn_blocking(move || prepare(&mode, &sources, &freezer))
            .await
            .map_err(|e| AgentError::task("snapshot", e))??;
        let freeze_call = frozen_at.elapsed();
        let plans = match self.frozen_plans(&snapshot, point.precopied, full) {
            Ok(mut p) => {
                if let Some(p) = p.as_mut() {
                    self.keep_pages(p, &point);
                }
                p
            }
            Err(e) => {
                snapshot.release_freeze();
                return Err(e);
            }
        };
        let nothing =
            !point.precopied && plans.as_ref().is_some_and(|p| p.iter().all(Plan::is_empty));
        if nothing && !cfg.once {
            snapshot.release_freeze();
            drop(snapshot);
            if let Some(t) = self.agent.collector.get_mut() {
                t.unplan();
            }
            return Ok(Outcome::Nothing);
        }
        point.report.consistency = snapshot.consistency;
        if self.full_sync(plans.as_deref()) {
            point.sync = Some(self.sync_progress());
            if self.resumed {
                // Read partly before the restart, partly after: not from
                // one instant.
                point.report.consistency = Consistency::Fuzzy;
            }
        }
        // Frozen: read the final delta into memory and thaw before
        // anything is hashed, compressed or sent.
        let captured = self
            .read_frozen(&mut snapshot, plans.as_deref(), &mut point, freeze_call)
            .await?;
        // Thawed (the barrier is no part of the freeze): every block of this
        // point sent before and read again is recorded by the receiver
        // before the frozen delta's copy is sent. Where a point carries a
        // block twice, the receiver keeps the one recorded last, and that
        // must be the one read last.
        let barrier_start = Instant::now();
        if self.resends(plans.as_deref(), &point) && !self.barrier().await? {
            return Ok(Outcome::Stopped);
        }
        point.barrier = barrier_start.elapsed();
        let sources: Vec<ReadFrom> = self
            .vols
            .iter()
            .enumerate()
            .map(|(i, v)| ReadFrom {
                path: captured.path(i, snapshot.paths.get(i).unwrap_or(&v.path)),
                from_memory: captured.holds(i),
            })
            .collect();
        let sent = self
            .send_volumes(&sources, plans.as_deref(), &mut point)
            .await;
        drop(captured);
        drop(snapshot);
        if !sent? {
            return Ok(Outcome::Stopped);
        }
        self.end_point(point, wire_before).await?;
        Ok(Outcome::Sent)
    }

    /// Whether some volume needs a full scan.
    fn any_rescan(&self) -> bool {
        self.agent
            .collector
            .get()
            .is_some_and(|t| (0..self.vols.len()).any(|i| t.needs_rescan(i).is_some()))
    }

    /// With a freeze ahead, send the dirty blocks unfrozen first, in rounds
    /// (each after a syncfs, so that the page cache's writes reach the
    /// device and the tracer): the freeze then covers only what was
    /// written during the last one.
    async fn precopy(
        &mut self,
        point: &mut Point,
        mount: &std::path::Path,
    ) -> Result<Precopied, AgentError> {
        let interval = self.agent.cfg.interval;
        let start = Instant::now();
        let volume_blocks = self
            .vols
            .iter()
            .map(|v| pilotlight_protocol::limits::block_count(v.size, v.block_size))
            .fold(0u64, u64::saturating_add);
        let mut previous = None;
        for round in 0.. {
            let lag = self
                .agent
                .collector
                .get()
                .map_or(std::time::Duration::ZERO, Tracking::lag);
            if round > 0 && policy::lag_budget_spent(lag, self.agent.cfg.max_lag) {
                tracing::info!(
                    tag = point.tag,
                    round,
                    lag_ms = lag.as_millis() as u64,
                    "pre-copy rounds used three quarters of --max-lag; freezing"
                );
                break;
            }
            if policy::precopy_budget_spent(point.report.blocks_sent, volume_blocks) {
                tracing::info!(
                    tag = point.tag,
                    round,
                    blocks = point.report.blocks_sent,
                    "pre-copy sent twice the volumes' blocks; freezing"
                );
                break;
            }
            let round_start = Instant::now();
            let m = mount.to_owned();
            tokio::task::spawn_blocking(move || crate::consistency::sync_filesystem(&m))
                .await
                .map_err(|e| AgentError::task("syncfs", e))??;
            let synced = round_start.elapsed();
            self.agent.collector.collect()?;
            // Rounds may chase writers for long: keep the status's lag
            // current meanwhile.
            let state = self.live_state();
            self.agent
                .collector
                .report(self.agent.reporter, |_| Some(state));
            let Some(mut unsent) = self.agent.collector.get().map(|t| t.unsent_read_bytes()) else {
                break;
            };
            // On a disk saturated by its workload (as the last wait found
            // it: before the point, or pacing its rounds) rounds cannot
            // catch up with it, and each takes a share of its operations:
            // one round (of the writes coalesced while the point waited: see
            // `defer_point`), then the freeze, or no freeze if much is left.
            if round > 0 && self.agent.collector.saturated() {
                if unsent > policy::FREEZE_DELTA_MAX {
                    return Ok(Precopied::Saturated { unsent });
                }
                tracing::info!(tag = point.tag, round, unsent, "disk saturated: freezing");
                break;
            }
            match policy::precopy(round, unsent, previous, start.elapsed(), interval) {
                Precopy::Freeze => break,
                Precopy::Round => {}
                Precopy::PaceThenRound => {
                    // Writers outpace the rounds: pace them (the wait keeps
                    // the status's state and lag current).
                    self.wait(Wait::Interval { early: false }).await?;
                    if self.agent.shutdown.is_cancelled() {
                        return Ok(Precopied::Stopped);
                    }
                    self.agent.collector.collect()?;
                    unsent = self
                        .agent
                        .collector
                        .get()
                        .map_or(0, |t| t.unsent_read_bytes());
                }
            }
            previous = Some(unsent);
            let precopied = point.precopied;
            let Some(t) = self.agent.collector.get_mut() else {
                break;
            };
            let mut pre = if precopied { t.plan_more() } else { t.plan() };
            self.keep_pages(&mut pre, point);
            let barrier_start = Instant::now();
            // A block sent again by this round (see the barrier after the
            // thaw).
            if self.resends(Some(&pre), point) && !self.barrier().await? {
                return Ok(Precopied::Stopped);
            }
            let barrier = barrier_start.elapsed();
            point.precopied = true;
            let live: Vec<ReadFrom> = self
                .vols
                .iter()
                .map(|v| ReadFrom {
                    path: v.path.clone(),
                    from_memory: false,
                })
                .collect();
            if !self.send_volumes(&live, Some(&pre), point).await? {
                return Ok(Precopied::Stopped);
            }
            tracing::debug!(
                tag = point.tag,
                round,
                unsent,
                syncfs_ms = synced.as_millis() as u64,
                barrier_ms = barrier.as_millis() as u64,
                round_ms = round_start.elapsed().as_millis() as u64,
                "pre-copy round sent"
            );
        }
        Ok(Precopied::Freeze)
    }

    /// Whether `plans` read a block that `point` sent already.
    fn resends(&self, plans: Option<&[Plan]>, point: &Point) -> bool {
        if !point.precopied {
            return false;
        }
        let Some(plans) = plans else {
            return true;
        };
        plans.iter().enumerate().any(|(i, plan)| match plan {
            Plan::Blocks(list, _) => self.view.get(i).is_none_or(|view| {
                list.iter()
                    .any(|&b| view.sent(b).is_some_and(|(_, tag)| tag == point.tag))
            }),
            Plan::Full(_) => true,
        })
    }

    /// Wait until the receiver has recorded every block sent; false if
    /// stopped meanwhile.
    async fn barrier(&mut self) -> Result<bool, AgentError> {
        tokio::select! {
            r = self.link.barrier() => r.map(|()| true),
            () = self.agent.shutdown.cancelled() => Ok(false),
        }
    }

    /// Right after the snapshot or freeze: with live tracking, what to
    /// read (every write that completed before the freeze is in the dirty
    /// sets), and the state the status shows while it is read.
    fn frozen_plans(
        &mut self,
        snapshot: &Snapshot,
        precopied: bool,
        full: bool,
    ) -> Result<Option<Vec<Plan>>, AgentError> {
        self.agent.collector.collect()?;
        let Some(t) = self.agent.collector.get_mut() else {
            return Ok(None);
        };
        let plans = if precopied { t.plan_more() } else { t.plan() };
        let initial = plans
            .iter()
            .any(|p| matches!(p, Plan::Full(RescanReason::InitialSync)));
        let state = policy::cycle_state(initial, full, self.live_state());
        let reporter = &mut *self.agent.reporter;
        reporter.set_state(state);
        if let Some(t) = self.agent.collector.get() {
            reporter.track(t);
        }
        // Never write a file while a filesystem is frozen: the state
        // directory may be on it.
        if !snapshot.is_frozen() {
            reporter.save();
        }
        Ok(Some(plans))
    }

    /// Send `EndPoint`; the point is pending until its `DURABLE`.
    async fn end_point(&mut self, point: Point, wire_before: &mut u64) -> Result<(), AgentError> {
        let mut report = point.report;
        self.link
            .send(&Frame::EndPoint {
                tag: point.tag,
                blocks: report.blocks_sent,
                created_ms: point.created_ms,
                consistency: report.consistency,
                commit: self.agent.cfg.commit,
            })
            .await?;
        let wire_now = self.wire.load(Ordering::Relaxed);
        report.wire_bytes = wire_now - *wire_before;
        metrics::counter!("pilotlight_agent_wire_bytes_sent_total").increment(report.wire_bytes);
        *wire_before = wire_now;
        self.pending.push_back(Pending {
            tag: point.tag,
            changes: point.changes,
            report,
            created_ms: point.created_ms,
            ended: Instant::now(),
            partial: point.partial,
        });
        self.agent.reporter.pending(self.pending.len());
        Ok(())
    }

    /// Read, hash and send what `plans` says of every volume (all of each
    /// without plans) from `paths`, comparing with the session's view and
    /// updating it with what changed. A full sync reads each volume in
    /// parts and checkpoints between them when due. Returns false if
    /// stopped.
    async fn send_volumes(
        &mut self,
        sources: &[ReadFrom],
        plans: Option<&[Plan]>,
        point: &mut Point,
    ) -> Result<bool, AgentError> {
        let cfg = self.agent.cfg;
        let workers = if cfg.workers == 0 {
            // Reads are part of the work: more workers than cores keep the disk busy.
            std::thread::available_parallelism().map_or(2, |n| n.get()) * 2
        } else {
            cfg.workers
        };
        for i in 0..self.vols.len() {
            let Some(v) = self.vols.get(i) else { break };
            let (size, _) = crate::volume::probe(&v.name, &v.path)?;
            if size != v.size {
                return Err(AgentError::Resized(v.name.clone()));
            }
            let (vsize, bs) = (v.size, v.block_size);
            let (path, from_memory) = sources
                .get(i)
                .map_or((v.path.clone(), false), |s| (s.path.clone(), s.from_memory));
            let (only, partial): (Option<Vec<u64>>, Vec<PartialRead>) =
                match plans.and_then(|p| p.get(i)) {
                    Some(p) if p.is_empty() => continue,
                    Some(Plan::Blocks(b, pages)) => {
                        let (whole, partial) = partial::split(b, pages, point.pages_sent.get(i));
                        (Some(whole), partial)
                    }
                    Some(Plan::Full(_)) | None => (None, Vec::new()),
                };
            let blocks = pilotlight_protocol::limits::block_count(vsize, bs);
            let parts: Vec<Option<(u64, u64)>> = match (&only, &point.sync) {
                (None, Some(_)) => {
                    let step = cfg.checkpoints.segment_blocks(bs);
                    (0..blocks.div_ceil(step))
                        .map(|k| Some((k * step, step.min(blocks - k * step))))
                        .collect()
                }
                _ => vec![None],
            };
            for range in parts {
                let part = Part {
                    vol: i,
                    path: path.clone(),
                    from_memory,
                    only: only.as_deref(),
                    partial: &partial,
                    range,
                    zero_runs: point.sync.is_none(),
                };
                let Some(mut result) = self.scan_part(&part, point.tag, workers).await? else {
                    return Ok(false);
                };
                if let Some(slot) = self.view.get_mut(i) {
                    slot.record(point.tag, &result.changed);
                }
                let report = &mut point.report;
                report.blocks_sent += result.changed.len() as u64;
                report.payload_bytes += result.payload_bytes;
                report.bytes_read += result.bytes_read;
                report.frames_sent += result.frames;
                point.partial += result.partial;
                if result.partial > 0 {
                    self.partial_tag = point.tag;
                }
                Self::note_pages_sent(point, i, std::mem::take(&mut result.partial_sent));
                if let Some(t) = self.agent.collector.get_mut() {
                    t.note_read(result.bytes_read, only.is_some(), result.partial);
                }
                if let Some(sp) = point.sync.as_mut() {
                    let (first, n) = range.unwrap_or((0, blocks));
                    let end = first
                        .saturating_add(n)
                        .saturating_mul(u64::from(bs))
                        .min(vsize);
                    sp.done += end.saturating_sub(first.saturating_mul(u64::from(bs)));
                    sp.sent += result.changed.len() as u64 * u64::from(bs);
                }
                if let Some(c) = point.changes.get_mut(i) {
                    c.extend(result.changed);
                }
                if !self.after_part(point).await? {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Scan one part of a volume (blocking work, off the async workers);
    /// `None` if stopped.
    async fn scan_part(
        &mut self,
        part: &Part<'_>,
        tag: u64,
        workers: usize,
    ) -> Result<Option<crate::scan::ScanResult>, AgentError> {
        let cfg = self.agent.cfg;
        let i = part.vol;
        let (Some(v), Some(slot), Some(file)) =
            (self.vols.get(i), self.view.get_mut(i), self.durable.file(i))
        else {
            return Ok(Some(crate::scan::ScanResult::default()));
        };
        let overlay = std::mem::take(slot);
        let file = file.clone();
        let (tx, window, stop) = (
            self.link.data_tx.clone(),
            self.link.window.clone(),
            self.agent.shutdown.clone(),
        );
        let (name, vsize, bs, level) = (v.name.clone(), v.size, v.block_size, cfg.zstd_level);
        let vol_idx = u16::try_from(i)
            .map_err(|_| AgentError::Internal(format!("volume index {i} out of range")))?;
        let rt = tokio::runtime::Handle::current();
        let progress = cfg.progress.clone();
        let zero_runs = self.link.zero_runs && part.zero_runs;
        // A device is read directly (a snapshot never clones one).
        let direct = v.is_device && part.path == v.path;
        let from_memory = part.from_memory;
        let (path, only, partial, range) = (
            part.path.clone(),
            part.only.map(<[u64]>::to_vec),
            part.partial.to_vec(),
            part.range,
        );
        let (overlay, result) = tokio::task::spawn_blocking(move || {
            let base = View {
                file: &file,
                overlay: &overlay,
            };
            let job = ScanJob {
                vol_idx,
                name: &name,
                path: &path,
                size: vsize,
                block_size: bs,
                base: &base,
                tag,
                only: only.as_deref(),
                partial: &partial,
                range,
                direct,
                from_memory,
            };
            let sink = Sink {
                tx: &tx,
                window: &window,
                rt: &rt,
                stop: &stop,
                progress: progress.as_deref(),
                zero_runs,
            };
            let r = scan(&job, &sink, workers, level);
            (overlay, r)
        })
        .await
        .map_err(|e| AgentError::task("scan", e))?;
        if let Some(slot) = self.view.get_mut(i) {
            *slot = overlay;
        }
        match result {
            Err(AgentError::Net(_)) => Err(self.link.take_error()),
            Err(AgentError::Stopped) if self.agent.shutdown.is_cancelled() => Ok(None),
            r => r.map(Some),
        }
    }
}

/// Where a cycle reads one volume.
struct ReadFrom {
    path: PathBuf,
    /// `path` is the frozen delta in memory.
    from_memory: bool,
}

/// One part of one volume to scan.
struct Part<'a> {
    vol: usize,
    path: PathBuf,
    from_memory: bool,
    only: Option<&'a [u64]>,
    /// With `only`: blocks read as their written pages.
    partial: &'a [PartialRead],
    range: Option<(u64, u64)>,
    /// Zero blocks may go as `ZeroRun`s. Not in a checkpointed full sync:
    /// a checkpoint counts and keeps `Block`s, and a run it did not keep
    /// would be lost to a resume.
    zero_runs: bool,
}
