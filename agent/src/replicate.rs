//! The replication loop: connect, agree on the base with the receiver, run
//! cycles, advance the durable state on `DURABLE`, reconnect on failure.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pilotlight_protocol::frame::{CommitMode, Consistency, VolumeDecl};
use pilotlight_protocol::limits::block_count;
use pilotlight_protocol::{BlockHash, Frame};
use tokio_util::sync::CancellationToken;

use crate::consistency::prepare;
use crate::link::{Link, LinkConfig};
use crate::scan::{scan, zero_table, ScanJob, Sink};
use crate::state::{AgentState, VolumeHashes};
use crate::status::{ms_rfc3339, Status, StatusVolume};
use crate::trace::{Plan, RescanReason, TrackedVolume, Tracking};
use crate::{identity, volume, AgentConfig, AgentError, Track};

/// How often live tracking reads the trace buffer while it waits.
const COLLECT_EVERY: Duration = Duration::from_millis(100);
/// Dirty bytes from which a frozen point first sends them unfrozen.
const PRECOPY_MIN_BYTES: u64 = 1 << 20;
/// Unfrozen rounds sent back to back before the freeze.
const PRECOPY_ROUNDS: usize = 5;
/// Most dirty bytes read while frozen after the back-to-back rounds: with
/// more, writers outpace the agent, and it sends one more round per
/// interval (sparing the foreground a long freeze and a busy agent) until
/// the delta fits or `precopy_patience` has passed.
const FREEZE_DELTA_MAX: u64 = 16 << 20;
/// Least time between two saves of the durable hash tables (`state.bin`)
/// in continuous mode: a whole table per point would be megabytes written
/// and fsynced every second, and on a traced volume each save would make
/// the next point. A session saves its last durable point when it ends,
/// and a state older than the receiver's last point only means that the
/// next start fetches the receiver's hashes.
const STATE_SAVE_EVERY: Duration = Duration::from_secs(60);
/// First reconnect delay in continuous mode.
const BACKOFF_START: Duration = Duration::from_millis(500);
/// Longest reconnect delay.
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// A point the receiver acknowledged durable.
#[derive(Debug, Clone)]
pub struct PointReport {
    /// The receiver's point id.
    pub point: u64,
    /// How consistent it is.
    pub consistency: Consistency,
    /// Blocks sent for it.
    pub blocks_sent: u64,
    /// Encoded payload bytes sent.
    pub payload_bytes: u64,
    /// Bytes written to the network while sending it (TLS included).
    pub wire_bytes: u64,
    /// Bytes read from the volumes.
    pub bytes_read: u64,
}

struct Pending {
    tag: u64,
    changes: Vec<Vec<(u64, BlockHash)>>,
    report: PointReport,
    created_ms: i64,
    /// When its EndPoint went out.
    ended: std::time::Instant,
}

struct Volume {
    name: String,
    path: std::path::PathBuf,
    size: u64,
    block_size: u32,
    is_device: bool,
}

/// Replicate until `shutdown` (or, with `once`, until one point is durable).
/// Returns the points made durable, oldest first.
pub async fn run(
    cfg: AgentConfig,
    shutdown: CancellationToken,
) -> Result<Vec<PointReport>, AgentError> {
    std::fs::create_dir_all(&cfg.state_dir).map_err(|e| AgentError::State {
        path: cfg.state_dir.clone(),
        source: e,
    })?;
    let mut tracking = match cfg.track {
        Track::Scan => None,
        Track::Trace => Some(start_tracking(&cfg)?),
    };
    if let Some(t) = &tracking {
        tracing::info!(instance = %t.instance().display(), "tracking writes with block tracepoints");
    }
    let elsewhere = tracking
        .as_ref()
        .is_some_and(|t| t.traces_path(&cfg.state_dir));
    match crate::status::place(&cfg.state_dir, elsewhere) {
        Ok(()) if elsewhere => tracing::info!(
            dir = crate::status::RUNTIME_DIR,
            "the state directory is on a traced volume: the status is kept in the runtime directory"
        ),
        Ok(()) => {}
        Err(e) => {
            tracing::warn!(cause = %e, "cannot keep the status in the runtime directory; writing it to the state directory, which makes points of its own");
            crate::status::place(&cfg.state_dir, false)?;
        }
    }
    let tls = identity::client_config(&cfg.identity)?;
    let result = replicate(&cfg, tls, &shutdown, tracking.as_mut()).await;
    if let Some(t) = tracking {
        // Saved even after an error: what is dirty stays dirty. Only a
        // save that completes lets the next start skip its rescan.
        if let Err(e) = t.save_clean(&cfg.state_dir) {
            tracing::warn!(cause = %e, "cannot save the dirty set; the next start rescans");
        }
    }
    result
}

/// Start live tracking of the configured volumes, with the block size each
/// was first replicated with.
fn start_tracking(cfg: &AgentConfig) -> Result<Tracking, AgentError> {
    let local = AgentState::load(&cfg.state_dir)?;
    let mut vols = Vec::new();
    for spec in &cfg.volumes {
        let (size, _) = volume::probe(&spec.name, &spec.path)?;
        let block_size = local
            .as_ref()
            .and_then(|s| s.volumes.iter().find(|h| h.name == spec.name))
            .map_or(cfg.block_size, |h| h.block_size);
        vols.push(TrackedVolume {
            name: spec.name.clone(),
            path: spec.path.clone(),
            size,
            block_size,
        });
    }
    Tracking::start(vols, &cfg.state_dir, cfg.trace_buffer_kb)
}

async fn replicate(
    cfg: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    shutdown: &CancellationToken,
    mut tracking: Option<&mut Tracking>,
) -> Result<Vec<PointReport>, AgentError> {
    let mut reports = Vec::new();
    let mut attempt = 0u32;
    let mut backoff = BACKOFF_START;
    let mut status = Status {
        receiver: cfg.receiver.clone(),
        state: "initial-sync".into(),
        ..Status::default()
    };
    loop {
        let mut r = Replicator {
            cfg,
            reports: &mut reports,
            status: &mut status,
            shutdown,
            durable_this_session: false,
            store_id: [0; 16],
            tracking: tracking.as_deref_mut(),
            waiting_since: None,
            state_saved: None,
            unsaved: None,
        };
        let result = r.session(tls.clone()).await;
        let progressed = r.durable_this_session;
        match result {
            Ok(()) => {
                status.state = "stopped".into();
                status.pending_points = 0;
                let _ = status.save(&cfg.state_dir);
                return Ok(reports);
            }
            Err(AgentError::Stopped) if shutdown.is_cancelled() => {
                status.state = "stopped".into();
                let _ = status.save(&cfg.state_dir);
                return Ok(reports);
            }
            Err(e) if e.is_retryable() => {
                if progressed {
                    attempt = 0;
                    backoff = BACKOFF_START;
                }
                attempt += 1;
                if cfg.once && attempt >= cfg.once_attempts {
                    return Err(e);
                }
                status.state = "disconnected".into();
                status.last_error = Some(e.to_string());
                let _ = status.save(&cfg.state_dir);
                let jitter = Duration::from_millis(
                    rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1),
                );
                tracing::warn!(cause = %e, retry_in = ?(backoff + jitter), "replication interrupted; reconnecting");
                // While waiting, live tracking keeps reading the trace
                // buffer (so that it does not overrun) and the status keeps
                // showing the lag growing.
                let until = tokio::time::Instant::now() + backoff + jitter;
                let mut last_status = std::time::Instant::now();
                loop {
                    tokio::select! {
                        () = tokio::time::sleep_until(until.min(tokio::time::Instant::now() + COLLECT_EVERY)) => {}
                        () = shutdown.cancelled() => return Ok(reports),
                    }
                    if let Some(t) = tracking.as_deref_mut() {
                        t.collect()?;
                        if last_status.elapsed() >= Duration::from_secs(1) {
                            last_status = std::time::Instant::now();
                            tracking_status(t, &mut status);
                            let _ = status.save(&cfg.state_dir);
                        }
                    }
                    if tokio::time::Instant::now() >= until {
                        break;
                    }
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            Err(e) => return Err(e),
        }
    }
}

struct Replicator<'a> {
    cfg: &'a AgentConfig,
    reports: &'a mut Vec<PointReport>,
    status: &'a mut Status,
    shutdown: &'a CancellationToken,
    durable_this_session: bool,
    store_id: [u8; 16],
    tracking: Option<&'a mut Tracking>,
    /// Since when the oldest pending point has waited for its ack.
    waiting_since: Option<std::time::Instant>,
    /// When `state.bin` was last written in this session.
    state_saved: Option<std::time::Instant>,
    /// The state of the last durable point, if not written yet.
    unsaved: Option<AgentState>,
}

impl Replicator<'_> {
    /// The hashes each volume's next point is compared against: the local
    /// state when it matches the receiver's last durable point, otherwise the
    /// receiver's own hashes (checksum resync), or zeros when the receiver has
    /// nothing of this server.
    async fn base(
        &mut self,
        link: &mut Link,
        vols: &[Volume],
        local: Option<AgentState>,
    ) -> Result<Vec<Vec<BlockHash>>, AgentError> {
        self.store_id = link.store_id;
        let mut out = Vec::with_capacity(vols.len());
        for (i, v) in vols.iter().enumerate() {
            let count = block_count(v.size, v.block_size) as usize;
            if link.last_point == 0 {
                out.push(zero_table(v.size, v.block_size));
                if let Some(t) = self.tracking.as_deref_mut() {
                    t.force_rescan(i, RescanReason::InitialSync);
                }
                continue;
            }
            let trusted = local
                .as_ref()
                .filter(|s| s.store_id == link.store_id && s.last_point == link.last_point)
                .and_then(|s| {
                    s.volumes.iter().find(|h| {
                        h.name == v.name && h.size == v.size && h.block_size == v.block_size
                    })
                })
                .filter(|h| h.hashes.len() == count);
            if let Some(h) = trusted {
                out.push(h.hashes.clone());
                continue;
            }
            tracing::info!(volume = %v.name, "local state does not match the receiver; fetching its block hashes");
            if let Some(t) = self.tracking.as_deref_mut() {
                t.force_rescan(i, RescanReason::ChecksumResync);
            }
            let idx = i as u16;
            link.send(&Frame::GetHashes { volume: idx }).await?;
            let mut table = zero_table(v.size, v.block_size);
            loop {
                match link.recv().await? {
                    Frame::Hashes {
                        volume,
                        start,
                        hashes,
                    } if volume == idx => {
                        for (k, h) in hashes.into_iter().enumerate() {
                            if let Some(slot) = usize::try_from(start)
                                .ok()
                                .and_then(|s| table.get_mut(s + k))
                            {
                                *slot = h;
                            }
                        }
                    }
                    Frame::HashesEnd { volume, .. } if volume == idx => break,
                    other => {
                        return Err(AgentError::Protocol(format!(
                            "unexpected {:?} while fetching hashes",
                            other.kind()
                        )))
                    }
                }
            }
            out.push(table);
        }
        Ok(out)
    }

    fn probe(&self) -> Result<Vec<Volume>, AgentError> {
        let mut vols = Vec::new();
        for spec in &self.cfg.volumes {
            let (size, is_device) = volume::probe(&spec.name, &spec.path)?;
            vols.push(Volume {
                name: spec.name.clone(),
                path: spec.path.clone(),
                size,
                block_size: self.cfg.block_size,
                is_device,
            });
        }
        Ok(vols)
    }

    /// One connection's worth of replication; however it ends, the state of
    /// its last durable point is saved.
    async fn session(&mut self, tls: Arc<rustls::ClientConfig>) -> Result<(), AgentError> {
        let result = self.connected(tls).await;
        if let Some(state) = self.unsaved.take() {
            if let Err(e) = state.save(&self.cfg.state_dir) {
                tracing::warn!(cause = %e, "cannot save the local state; the next start fetches the receiver's hashes");
                return result.and(Err(e));
            }
        }
        result
    }

    async fn connected(&mut self, tls: Arc<rustls::ClientConfig>) -> Result<(), AgentError> {
        let mut vols = self.probe()?;
        let local = AgentState::load(&self.cfg.state_dir)?;
        // Keep the block size a volume was first replicated with.
        if let Some(st) = &local {
            for v in &mut vols {
                if let Some(h) = st.volumes.iter().find(|h| h.name == v.name) {
                    v.block_size = h.block_size;
                }
            }
        }
        let wire = Arc::new(AtomicU64::new(0));
        let decls: Vec<VolumeDecl> = vols
            .iter()
            .map(|v| VolumeDecl {
                name: v.name.clone(),
                size: v.size,
                block_size: v.block_size,
            })
            .collect();
        let link_cfg = LinkConfig {
            receiver: self.cfg.receiver.clone(),
            tls,
            streams: self.cfg.streams,
            commit: self.cfg.commit,
            volumes: decls,
            wire_bytes: wire.clone(),
            throttle: self
                .cfg
                .limit_mbps
                .map(|m| Arc::new(crate::throttle::Throttle::new(m))),
        };
        let mut link = Link::connect(&link_cfg).await?;
        tracing::info!(
            session = link.session,
            last_point = link.last_point,
            "connected to the receiver"
        );
        self.status.volumes = vols
            .iter()
            .map(|v| StatusVolume {
                name: v.name.clone(),
                path: v.path.display().to_string(),
                size: v.size,
            })
            .collect();
        if let Some(t) = self.tracking.as_deref_mut() {
            // Points of a session that died are not durable: their blocks
            // are dirty again.
            t.requeue();
        }
        let mut durable = self.base(&mut link, &vols, local).await?;
        let mut view = durable.clone();
        let mut pending: VecDeque<Pending> = VecDeque::new();
        let mut tag = 0u64;
        let workers = if self.cfg.workers == 0 {
            // Reads are part of the work: more workers than cores keep the disk busy.
            std::thread::available_parallelism().map_or(2, |n| n.get()) * 2
        } else {
            self.cfg.workers
        };
        // The first point of a session also pays for the connection.
        let mut wire_before = 0;
        loop {
            if self.shutdown.is_cancelled() {
                self.drain(&mut link, &mut pending, &mut durable, &vols, 0)
                    .await?;
                link.close().await;
                return Ok(());
            }
            if let (Some(t), false) = (self.tracking.as_deref_mut(), self.cfg.once) {
                // No point (and no freeze) while nothing worth one is dirty.
                t.collect()?;
                if !t.worth_a_point() {
                    self.wait_next(&mut link, &mut pending, &mut durable, &vols, true)
                        .await?;
                    continue;
                }
            }
            tag += 1;
            let sources: Vec<_> = vols
                .iter()
                .map(|v| (v.name.clone(), v.path.clone(), v.is_device))
                .collect();
            // A full scan in trace mode is not frozen (it may take long);
            // its point is fuzzy and the next, frozen one is consistent.
            let full = self
                .tracking
                .as_deref()
                .is_some_and(|t| (0..vols.len()).any(|i| t.needs_rescan(i).is_some()));
            let mode = if full {
                crate::ConsistencyMode::None
            } else {
                self.cfg.consistency.clone()
            };
            // The point's time: before anything is read (or frozen), so that
            // it holds every write that completed before it.
            let created_ms = now_ms();
            let mut report = PointReport {
                point: 0,
                consistency: Consistency::Fuzzy,
                blocks_sent: 0,
                payload_bytes: 0,
                wire_bytes: 0,
                bytes_read: 0,
            };
            let mut changes = vec![Vec::new(); vols.len()];
            // With a freeze, the dirty blocks are first sent unfrozen, in up
            // to PRECOPY_ROUNDS rounds (each after a syncfs, so that the
            // page cache's writes reach the device and the tracer): the
            // freeze then covers only what was written during the last one.
            let freeze_mount = match &self.cfg.consistency {
                crate::ConsistencyMode::Freeze(m) if !full && self.tracking.is_some() => {
                    Some(m.clone())
                }
                _ => None,
            };
            let mut precopied = false;
            let precopy_start = std::time::Instant::now();
            for round in 0.. {
                let Some(mount) = freeze_mount.clone() else {
                    break;
                };
                let round_start = std::time::Instant::now();
                tokio::task::spawn_blocking(move || crate::consistency::sync_filesystem(&mount))
                    .await
                    .map_err(|e| AgentError::Protocol(format!("syncfs task failed: {e}")))??;
                let Some(t) = self.tracking.as_deref_mut() else {
                    break;
                };
                let synced = round_start.elapsed();
                t.collect()?;
                let min = if round == 0 {
                    PRECOPY_MIN_BYTES
                } else {
                    PRECOPY_MIN_BYTES / 4
                };
                let mut unsent = t.unsent_bytes();
                if unsent < min {
                    break;
                }
                if round >= PRECOPY_ROUNDS {
                    if unsent <= FREEZE_DELTA_MAX
                        || precopy_start.elapsed() >= self.precopy_patience()
                    {
                        break;
                    }
                    // Writers outpace the rounds: pace them (the wait keeps
                    // the status's state and lag current).
                    self.wait_next(&mut link, &mut pending, &mut durable, &vols, false)
                        .await?;
                    if self.shutdown.is_cancelled() {
                        return self
                            .abandon_cycle(link, &mut pending, &mut durable, &vols)
                            .await;
                    }
                    let Some(t) = self.tracking.as_deref_mut() else {
                        break;
                    };
                    t.collect()?;
                    unsent = t.unsent_bytes();
                }
                let Some(t) = self.tracking.as_deref_mut() else {
                    break;
                };
                let pre = if precopied { t.plan_more() } else { t.plan() };
                let barrier_start = std::time::Instant::now();
                if precopied {
                    // A block may be sent again by this round (see below).
                    link.barrier().await?;
                }
                let barrier = barrier_start.elapsed();
                precopied = true;
                let live: Vec<PathBuf> = vols.iter().map(|v| v.path.clone()).collect();
                let sent = self
                    .send_volumes(
                        &mut link,
                        &vols,
                        &mut view,
                        &live,
                        Some(&pre),
                        tag,
                        workers,
                        &mut report,
                        &mut changes,
                    )
                    .await?;
                if !sent {
                    return self
                        .abandon_cycle(link, &mut pending, &mut durable, &vols)
                        .await;
                }
                tracing::debug!(
                    tag,
                    round,
                    unsent,
                    syncfs_ms = synced.as_millis() as u64,
                    barrier_ms = barrier.as_millis() as u64,
                    round_ms = round_start.elapsed().as_millis() as u64,
                    "pre-copy round sent"
                );
            }
            let barrier_start = std::time::Instant::now();
            if precopied {
                // Every block sent so far is recorded by the receiver before
                // any block of the frozen delta is sent: where a point
                // carries a block twice, the receiver keeps the one recorded
                // last, and that must be the one read last.
                link.barrier().await?;
            }
            let barrier = barrier_start.elapsed();
            // A freeze counts from the FIFREEZE call: writers block while it
            // flushes, too.
            let frozen_at = std::time::Instant::now();
            let mut snapshot = tokio::task::spawn_blocking(move || prepare(&mode, &sources))
                .await
                .map_err(|e| AgentError::Protocol(format!("snapshot task failed: {e}")))??;
            let freeze_call = frozen_at.elapsed();
            let plans: Option<Vec<Plan>> = match self.tracking.as_deref_mut() {
                Some(t) => {
                    // After the freeze: every write that completed before it
                    // is in the dirty sets.
                    if let Err(e) = t.collect() {
                        snapshot.release_freeze();
                        return Err(e);
                    }
                    let plans = if precopied { t.plan_more() } else { t.plan() };
                    let initial = plans
                        .iter()
                        .any(|p| matches!(p, Plan::Full(RescanReason::InitialSync)));
                    self.status.state = match (initial, full) {
                        (true, _) => "initial-sync".into(),
                        (false, true) => "rescan".into(),
                        (false, false) => self.live_state(),
                    };
                    self.refresh_status();
                    // Never write a file while a filesystem is frozen: the
                    // state directory may be on it.
                    if !snapshot.is_frozen() {
                        let _ = self.status.save(&self.cfg.state_dir);
                    }
                    Some(plans)
                }
                None => None,
            };
            let nothing = !precopied
                && plans.as_ref().is_some_and(|p| {
                    p.iter()
                        .all(|p| matches!(p, Plan::Blocks(b) if b.is_empty()))
                });
            if nothing && !self.cfg.once {
                // Nothing was written: no point. Wait for the next tick.
                snapshot.release_freeze();
                drop(snapshot);
                if let Some(t) = self.tracking.as_deref_mut() {
                    t.unplan();
                }
                tag -= 1;
                self.wait_next(&mut link, &mut pending, &mut durable, &vols, true)
                    .await?;
                continue;
            }
            let consistency = snapshot.consistency;
            report.consistency = consistency;
            let paths: Vec<PathBuf> = (0..vols.len())
                .map(|i| {
                    snapshot
                        .paths
                        .get(i)
                        .cloned()
                        .unwrap_or_else(|| vols[i].path.clone())
                })
                .collect();
            let sent = self
                .send_volumes(
                    &mut link,
                    &vols,
                    &mut view,
                    &paths,
                    plans.as_deref(),
                    tag,
                    workers,
                    &mut report,
                    &mut changes,
                )
                .await?;
            if !sent {
                drop(snapshot);
                return self
                    .abandon_cycle(link, &mut pending, &mut durable, &vols)
                    .await;
            }
            let was_frozen = snapshot.is_frozen();
            snapshot.release_freeze();
            drop(snapshot);
            if let (true, Some(t)) = (was_frozen, self.tracking.as_deref_mut()) {
                let frozen = frozen_at.elapsed();
                t.note_freeze(frozen);
                t.note_thaw()?;
                let _ = self.status.save(&self.cfg.state_dir);
                tracing::info!(
                    tag,
                    frozen_ms = frozen.as_secs_f64() * 1000.0,
                    fifreeze_ms = freeze_call.as_secs_f64() * 1000.0,
                    barrier_ms = barrier.as_secs_f64() * 1000.0,
                    precopied,
                    blocks = report.blocks_sent,
                    "filesystem thawed"
                );
            }
            link.send(&Frame::EndPoint {
                tag,
                blocks: report.blocks_sent,
                created_ms,
                consistency,
                commit: self.cfg.commit,
            })
            .await?;
            let wire_now = wire.load(Ordering::Relaxed);
            report.wire_bytes = wire_now - wire_before;
            metrics::counter!("pilotlight_agent_wire_bytes_sent_total")
                .increment(report.wire_bytes);
            wire_before = wire_now;
            pending.push_back(Pending {
                tag,
                changes,
                report,
                created_ms,
                ended: std::time::Instant::now(),
            });
            self.status.pending_points = pending.len();
            self.waiting_since = pending.front().map(|p| p.ended);
            let keep = if self.cfg.once || self.cfg.commit == CommitMode::Sync {
                0
            } else {
                self.cfg.max_async_pending.max(1) - 1
            };
            self.drain(&mut link, &mut pending, &mut durable, &vols, keep)
                .await?;
            if self.cfg.once {
                link.close().await;
                return Ok(());
            }
            self.wait_next(&mut link, &mut pending, &mut durable, &vols, true)
                .await?;
        }
    }

    /// Stopped mid-cycle: give this point's dirty blocks back, finish the
    /// points already sent and close the link.
    async fn abandon_cycle(
        &mut self,
        mut link: Link,
        pending: &mut VecDeque<Pending>,
        durable: &mut [Vec<BlockHash>],
        vols: &[Volume],
    ) -> Result<(), AgentError> {
        if let Some(t) = self.tracking.as_deref_mut() {
            t.unplan();
        }
        self.drain(&mut link, pending, durable, vols, 0).await?;
        link.close().await;
        Ok(())
    }

    /// Read, hash and send what `plans` says of every volume (all of each
    /// without plans) for point `tag`, comparing with `view` and updating
    /// it with what changed. Returns false if stopped.
    #[allow(clippy::too_many_arguments)]
    async fn send_volumes(
        &mut self,
        link: &mut Link,
        vols: &[Volume],
        view: &mut [Vec<BlockHash>],
        paths: &[PathBuf],
        plans: Option<&[Plan]>,
        tag: u64,
        workers: usize,
        report: &mut PointReport,
        changes: &mut [Vec<(u64, BlockHash)>],
    ) -> Result<bool, AgentError> {
        for (i, v) in vols.iter().enumerate() {
            let (size, _) = volume::probe(&v.name, &v.path)?;
            if size != v.size {
                return Err(AgentError::Resized(v.name.clone()));
            }
            let path = paths.get(i).cloned().unwrap_or_else(|| v.path.clone());
            let only: Option<Vec<u64>> = match plans.and_then(|p| p.get(i)) {
                Some(Plan::Blocks(b)) if b.is_empty() => continue,
                Some(Plan::Blocks(b)) => Some(b.clone()),
                Some(Plan::Full(_)) | None => None,
            };
            let Some(slot) = view.get_mut(i) else {
                continue;
            };
            let base = std::mem::take(slot);
            let (tx, window, stop) = (
                link.data_tx.clone(),
                link.window.clone(),
                self.shutdown.clone(),
            );
            let (name, vsize, bs, level) =
                (v.name.clone(), v.size, v.block_size, self.cfg.zstd_level);
            let rt = tokio::runtime::Handle::current();
            let progress = self.cfg.progress.clone();
            // A device is read directly (a snapshot never clones one).
            let direct = v.is_device && path == v.path;
            let (base, result) = tokio::task::spawn_blocking(move || {
                let job = ScanJob {
                    vol_idx: i as u16,
                    name: &name,
                    path: &path,
                    size: vsize,
                    block_size: bs,
                    base: &base,
                    tag,
                    only: only.as_deref(),
                    direct,
                };
                let sink = Sink {
                    tx: &tx,
                    window: &window,
                    rt: &rt,
                    stop: &stop,
                    progress: progress.as_deref(),
                };
                let r = scan(&job, &sink, workers, level);
                (base, r)
            })
            .await
            .map_err(|e| AgentError::Protocol(format!("scan task failed: {e}")))?;
            let Some(slot) = view.get_mut(i) else {
                continue;
            };
            *slot = base;
            let result = match result {
                Err(AgentError::Net(_)) => return Err(link.take_error()),
                Err(AgentError::Stopped) if self.shutdown.is_cancelled() => return Ok(false),
                r => r?,
            };
            for &(index, h) in &result.changed {
                if let Some(s) = slot.get_mut(index as usize) {
                    *s = h;
                }
            }
            report.blocks_sent += result.changed.len() as u64;
            report.payload_bytes += result.payload_bytes;
            report.bytes_read += result.bytes_read;
            if let Some(c) = changes.get_mut(i) {
                c.extend(result.changed);
            }
        }
        Ok(true)
    }

    /// Wait for the next cycle, taking acks as they come. With live
    /// tracking, bring in trace events every 100 ms (so the trace buffer
    /// never fills between points), start `early` when much is dirty, and
    /// keep the status's lag and state current.
    async fn wait_next(
        &mut self,
        link: &mut Link,
        pending: &mut VecDeque<Pending>,
        durable: &mut [Vec<BlockHash>],
        vols: &[Volume],
        early: bool,
    ) -> Result<(), AgentError> {
        let sleep = tokio::time::sleep(self.cfg.interval);
        tokio::pin!(sleep);
        let mut tick = collect_ticker();
        let mut last_status = std::time::Instant::now();
        loop {
            tokio::select! {
                () = &mut sleep => break,
                () = self.shutdown.cancelled() => break,
                f = link.recv() => self.on_frame(f?, pending, durable, vols)?,
                _ = tick.tick(), if self.tracking.is_some() => {
                    let Some(t) = self.tracking.as_deref_mut() else { continue };
                    t.collect()?;
                    if early && (t.unsent_bytes() >= self.cfg.early_point_bytes
                        || (0..vols.len()).any(|i| t.needs_rescan(i).is_some()))
                    {
                        // Early: much is dirty, or changes are unknown.
                        break;
                    }
                    self.status_tick(&mut last_status);
                }
            }
        }
        Ok(())
    }

    /// How long pre-copy rounds may chase writers before the freeze is
    /// taken whatever the delta: bounds the time between points.
    fn precopy_patience(&self) -> Duration {
        (self.cfg.interval * 10).max(Duration::from_secs(30))
    }

    /// The DRS-like state while tracking: `stalled` when points have waited
    /// for their ack longer than `stall_after`, `backlog` when the oldest
    /// write not yet durable is far older than the interval, else
    /// `continuous`.
    fn live_state(&self) -> String {
        let Some(t) = self.tracking.as_deref() else {
            return "continuous".into();
        };
        let patience = (self.cfg.interval * 10).max(Duration::from_secs(10));
        if self
            .waiting_since
            .is_some_and(|t| t.elapsed() > self.cfg.stall_after)
        {
            "stalled".into()
        } else if Duration::from_millis(t.lag_ms().max(0) as u64) > patience {
            "backlog".into()
        } else {
            "continuous".into()
        }
    }

    /// At most once a second: the live state, lag and backlog into
    /// status.json.
    fn status_tick(&mut self, last: &mut std::time::Instant) {
        if last.elapsed() >= Duration::from_secs(1) {
            *last = std::time::Instant::now();
            self.status.state = self.live_state();
            self.refresh_status();
            let _ = self.status.save(&self.cfg.state_dir);
        }
    }

    /// Copy tracking's lag, backlog and counters into the status.
    fn refresh_status(&mut self) {
        if let Some(t) = self.tracking.as_deref() {
            tracking_status(t, self.status);
        }
    }

    /// Wait until at most `keep` points are pending.
    async fn drain(
        &mut self,
        link: &mut Link,
        pending: &mut VecDeque<Pending>,
        durable: &mut [Vec<BlockHash>],
        vols: &[Volume],
        keep: usize,
    ) -> Result<(), AgentError> {
        // With live tracking, the trace buffer is read while the acks are
        // awaited too, and the status says `stalled` if they take too long.
        let mut tick = collect_ticker();
        let mut last_status = std::time::Instant::now();
        while pending.len() > keep {
            tokio::select! {
                f = link.recv() => self.on_frame(f?, pending, durable, vols)?,
                _ = tick.tick(), if self.tracking.is_some() => {
                    if let Some(t) = self.tracking.as_deref_mut() {
                        t.collect()?;
                    }
                    self.status_tick(&mut last_status);
                }
            }
        }
        Ok(())
    }

    fn on_frame(
        &mut self,
        frame: Frame,
        pending: &mut VecDeque<Pending>,
        durable: &mut [Vec<BlockHash>],
        vols: &[Volume],
    ) -> Result<(), AgentError> {
        let Frame::Durable { tag, point } = frame else {
            return Err(AgentError::Protocol(format!(
                "unexpected {:?} on the control connection",
                frame.kind()
            )));
        };
        let Some(p) = pending.pop_front().filter(|p| p.tag == tag) else {
            return Err(AgentError::Protocol(format!(
                "Durable for tag {tag}, which is not the oldest pending point"
            )));
        };
        self.waiting_since = pending.front().map(|p| p.ended);
        if let Some(t) = self.tracking.as_deref_mut() {
            t.durable();
        }
        for (table, ch) in durable.iter_mut().zip(&p.changes) {
            for &(i, h) in ch {
                if let Some(slot) = table.get_mut(i as usize) {
                    *slot = h;
                }
            }
        }
        let state = AgentState {
            store_id: self.store_id,
            last_point: point,
            volumes: vols
                .iter()
                .zip(durable.iter())
                .map(|(v, h)| VolumeHashes {
                    name: v.name.clone(),
                    size: v.size,
                    block_size: v.block_size,
                    hashes: h.clone(),
                })
                .collect(),
        };
        if self.cfg.once
            || self
                .state_saved
                .is_none_or(|t| t.elapsed() >= STATE_SAVE_EVERY)
        {
            state.save(&self.cfg.state_dir)?;
            self.state_saved = Some(std::time::Instant::now());
            self.unsaved = None;
        } else {
            self.unsaved = Some(state);
        }
        self.durable_this_session = true;
        let mut report = p.report;
        report.point = point;
        let lag = (now_ms() - p.created_ms).max(0) as f64 / 1000.0;
        metrics::counter!("pilotlight_agent_points_total").increment(1);
        metrics::counter!("pilotlight_agent_blocks_sent_total").increment(report.blocks_sent);
        metrics::counter!("pilotlight_agent_payload_bytes_sent_total")
            .increment(report.payload_bytes);
        metrics::gauge!("pilotlight_agent_lag_seconds").set(lag);
        metrics::histogram!("pilotlight_agent_point_seconds").record(lag);
        tracing::info!(
            point,
            blocks = report.blocks_sent,
            bytes = report.payload_bytes,
            "point durable"
        );
        self.status.pending_points = pending.len();
        if let Some(t) = self.tracking.as_deref_mut() {
            // Lag and backlog as of now, not as of the last collection.
            t.collect()?;
        }
        self.status.state = self.live_state();
        self.refresh_status();
        self.status.last_point = Some(point);
        self.status.last_point_time = Some(ms_rfc3339(p.created_ms));
        self.status.last_point_ms = Some(p.created_ms);
        self.status.last_point_lag_seconds = Some((now_ms() - p.created_ms).max(0) as f64 / 1000.0);
        self.status.pending_points = pending.len();
        self.status.last_error = None;
        self.status.save(&self.cfg.state_dir)?;
        self.reports.push(report);
        if self.reports.len() > 10_000 {
            self.reports.drain(..5_000);
        }
        Ok(())
    }
}

/// How often live tracking reads the trace buffer between points: often
/// enough that it does not overrun.
fn collect_ticker() -> tokio::time::Interval {
    let mut tick = tokio::time::interval(COLLECT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// Copy tracking's lag, backlog and counters into `status` and the metrics.
fn tracking_status(t: &Tracking, status: &mut Status) {
    let lag = t.lag_ms() as f64 / 1000.0;
    status.lag_seconds = Some(lag);
    status.backlog_bytes = Some(t.backlog_bytes());
    status.collected_ms = Some(t.collected_ms);
    status.tracking = Some(t.stats.clone());
    metrics::gauge!("pilotlight_agent_lag_seconds").set(lag);
    metrics::gauge!("pilotlight_agent_backlog_bytes").set(t.backlog_bytes() as f64);
}

fn now_ms() -> i64 {
    i64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000)
        .unwrap_or(i64::MAX)
}
