//! One connection's worth of replication: the link to the receiver, the
//! durable hashes, the points sent and not yet durable, and their acks.
//! Each point's own work is in [`cycle`](crate::cycle).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pilotlight_protocol::frame::VolumeDecl;
use pilotlight_protocol::{BlockHash, Frame};
use tokio_util::sync::CancellationToken;

use crate::collector::Collector;
use crate::durable::DurableHashes;
use crate::hashfile::Overlay;
use crate::link::{Link, LinkConfig};
use crate::replicate::PointReport;
use crate::reporter::Reporter;
use crate::state::StateHeader;
use crate::status::{State, StatusVolume};
use crate::{policy, resync, volume, AgentConfig, AgentError};
use pilotlight_protocol::clock::now_ms;

/// Time a stopping agent gives the receiver to acknowledge the points
/// already sent and to close the session politely. A stalled receiver
/// does not hold the stop longer.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A volume as replicated in this session.
pub(crate) struct Volume {
    pub(crate) name: String,
    pub(crate) path: PathBuf,
    pub(crate) size: u64,
    pub(crate) block_size: u32,
    pub(crate) is_device: bool,
}

/// A point sent and not yet durable.
pub(crate) struct Pending {
    pub(crate) tag: u64,
    pub(crate) changes: Vec<Vec<(u64, BlockHash)>>,
    pub(crate) report: PointReport,
    pub(crate) created_ms: i64,
    /// When its EndPoint went out.
    pub(crate) ended: Instant,
    /// Blocks it sent as pages, whose hashes the receiver gives.
    pub(crate) partial: u64,
}

/// What the agent shares across sessions.
pub(crate) struct Agent<'a> {
    pub(crate) cfg: &'a AgentConfig,
    pub(crate) shutdown: &'a CancellationToken,
    pub(crate) collector: &'a mut Collector,
    pub(crate) reporter: &'a mut Reporter,
    pub(crate) reports: &'a mut Vec<PointReport>,
    /// Freezes filesystems (and keeps the guard process).
    pub(crate) freezer: &'a Arc<crate::freeze::Freezer>,
}

/// What ends a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// Until at most this many points are pending.
    Drain(usize),
    /// Until the interval is up or the agent stops; with `early`, also when
    /// live tracking finds a point due sooner.
    Interval { early: bool },
}

/// An open session.
pub(crate) struct Session<'a> {
    pub(crate) agent: Agent<'a>,
    pub(crate) link: Link,
    pub(crate) vols: Vec<Volume>,
    pub(crate) durable: DurableHashes,
    /// The hashes as sent: the durable files under the changes of the
    /// points pending (per volume).
    pub(crate) view: Vec<Overlay>,
    pub(crate) pending: VecDeque<Pending>,
    /// Bytes written to the network by this session.
    pub(crate) wire: Arc<AtomicU64>,
    /// Whether a point became durable in this session.
    pub(crate) progressed: bool,
    /// When the stop began, while the last acks are awaited.
    stop_deadline: Option<tokio::time::Instant>,
    /// When the next interval wait ends, if not an interval from its start:
    /// points start an interval apart (a cycle's own time counts).
    next_point_at: Option<tokio::time::Instant>,
    /// Whether the session's first point continues a sync checkpointed
    /// before a restart.
    pub(crate) resumed: bool,
    /// The point whose durability completes the sync in progress (its
    /// checkpoints are in the hash files).
    pub(crate) sync_tag: Option<u64>,
    /// The last point that sent partial blocks (0: none).
    pub(crate) partial_tag: u64,
    /// The last point made durable (0: none yet).
    pub(crate) durable_tag: u64,
}

/// Run one session; however it ends, the state of its last durable point
/// is saved. Returns whether a point became durable.
pub(crate) async fn run(
    agent: Agent<'_>,
    tls: Arc<rustls::ClientConfig>,
) -> (bool, Result<(), AgentError>) {
    let mut session = match Session::open(agent, tls).await {
        Ok(s) => s,
        Err(e) => return (false, Err(e)),
    };
    let result = session
        .replicate()
        .await
        .map_err(|e| session.partial_fallback(e));
    let dir = session.agent.cfg.state_dir.clone();
    if let Err(e) = session.durable.save_unsaved(&dir, &session.vols) {
        tracing::warn!(cause = %e, "cannot save the local state; the next start fetches the receiver's hashes");
        return (session.progressed, result.and(Err(e)));
    }
    (session.progressed, result)
}

impl<'a> Session<'a> {
    /// Connect and agree on the base with the receiver.
    async fn open(agent: Agent<'a>, tls: Arc<rustls::ClientConfig>) -> Result<Self, AgentError> {
        let cfg = agent.cfg;
        let mut vols = probe(cfg)?;
        let local = crate::blocking::off_async(|| StateHeader::load(&cfg.state_dir))?;
        // Keep the block size a volume was first replicated with.
        if let Some(st) = &local {
            for v in &mut vols {
                if let Some(h) = st.volume(&v.name) {
                    v.block_size = h.block_size;
                }
            }
        }
        let wire = Arc::new(AtomicU64::new(0));
        let link_cfg = LinkConfig {
            receiver: cfg.receiver.clone(),
            tls,
            streams: cfg.streams,
            commit: cfg.commit,
            volumes: vols
                .iter()
                .map(|v| VolumeDecl {
                    name: v.name.clone(),
                    size: v.size,
                    block_size: v.block_size,
                })
                .collect(),
            wire_bytes: wire.clone(),
            throttle: cfg
                .limit_mbps
                .map(|m| Arc::new(crate::throttle::Throttle::new(m))),
            ping_interval: cfg.ping_interval,
        };
        let mut link = tokio::select! {
            l = Link::connect(&link_cfg) => l?,
            () = agent.shutdown.cancelled() => return Err(AgentError::Stopped),
        };
        tracing::info!(
            session = link.session,
            last_point = link.last_point,
            "connected to the receiver"
        );
        agent.reporter.volumes(vols.iter().map(|v| StatusVolume {
            name: v.name.clone(),
            path: v.path.display().to_string(),
            size: v.size,
        }));
        if let Some(t) = agent.collector.get_mut() {
            // Points of a session that died are not durable: their blocks
            // are dirty again.
            t.requeue();
        }
        // A checksum resync waits on the receiver's hash listing: a stop
        // does not wait for it (nothing was sent yet; the link just drops).
        let dir = &cfg.state_dir;
        let resumed = tokio::select! {
            r = crate::checkpoint::offer(&mut link, dir, &vols) => r?,
            () = agent.shutdown.cancelled() => return Err(AgentError::Stopped),
        };
        let tracking = agent.collector.get_mut();
        let (files, trusted) = tokio::select! {
            t = resync::base(&mut link, &vols, dir, local.as_ref(), tracking, resumed) => t?,
            () = agent.shutdown.cancelled() => return Err(AgentError::Stopped),
        };
        let view = vols.iter().map(|_| Overlay::default()).collect();
        let mut durable = DurableHashes::new(link.store_id, link.last_point, files, trusted);
        if resumed {
            durable = durable.resuming();
        }
        Ok(Self {
            resumed,
            // The session's first point completes the resumed sync.
            sync_tag: resumed.then_some(1),
            durable,
            agent,
            link,
            vols,
            view,
            pending: VecDeque::new(),
            wire,
            progressed: false,
            stop_deadline: None,
            next_point_at: None,
            partial_tag: 0,
            durable_tag: 0,
        })
    }

    /// Cycles until stopped (or, with `once`, one point durable).
    async fn replicate(&mut self) -> Result<(), AgentError> {
        let mut tag = 0u64;
        // The first point of a session also pays for the connection.
        let mut wire_before = 0;
        loop {
            if self.agent.shutdown.is_cancelled() {
                return self.finish().await;
            }
            let once = self.agent.cfg.once;
            if let (Some(t), false) = (self.agent.collector.get_mut(), once) {
                // No point (and no freeze) while nothing worth one is dirty.
                t.collect()?;
                if !t.worth_a_point() {
                    self.wait(Wait::Interval { early: true }).await?;
                    continue;
                }
                if self.defer_point() {
                    self.wait(Wait::Interval { early: false }).await?;
                    continue;
                }
            }
            tag += 1;
            self.next_point_at = Some(tokio::time::Instant::now() + self.agent.cfg.interval);
            match self.cycle(tag, &mut wire_before).await? {
                crate::cycle::Outcome::Sent => {}
                crate::cycle::Outcome::Nothing => {
                    // Nothing was written: no point. Wait for the next tick.
                    tag -= 1;
                    self.wait(Wait::Interval { early: true }).await?;
                    continue;
                }
                crate::cycle::Outcome::Stopped => return self.abandon_cycle().await,
            }
            let cfg = self.agent.cfg;
            let keep = policy::pending_keep(once, cfg.commit, cfg.max_async_pending);
            self.wait(Wait::Drain(keep)).await?;
            if once {
                self.close().await;
                return Ok(());
            }
            self.wait(Wait::Interval { early: true }).await?;
        }
    }

    /// Whether the point that is due waits one more interval: the disk is
    /// saturated by its workload and the lag allows it (`--max-lag`).
    fn defer_point(&mut self) -> bool {
        let saturated = self.agent.collector.saturated();
        let cfg = self.agent.cfg;
        let Some(t) = self.agent.collector.get_mut() else {
            return false;
        };
        let lag = t.lag();
        let defer = policy::defer_point(saturated, lag, cfg.interval, cfg.max_lag);
        if defer {
            t.stats.deferred_intervals_total += 1;
            tracing::debug!(
                lag_ms = lag.as_millis() as u64,
                queue = t.stats.disk_queue,
                "disk saturated: the point waits an interval"
            );
        }
        defer
    }

    /// Stopped mid-cycle: give this point's dirty blocks back, finish the
    /// points already sent and close the link.
    pub(crate) async fn abandon_cycle(&mut self) -> Result<(), AgentError> {
        if let Some(t) = self.agent.collector.get_mut() {
            t.unplan();
        }
        self.finish().await
    }

    /// Stopping: wait (within the grace) for the acks of the points sent,
    /// then close the link.
    async fn finish(&mut self) -> Result<(), AgentError> {
        self.wait(Wait::Drain(0)).await?;
        self.close().await;
        Ok(())
    }

    /// Close the link politely, within what is left of the stop's grace.
    async fn close(&mut self) {
        match self.stop_deadline {
            Some(d) => {
                let _ = tokio::time::timeout_at(d, self.link.close()).await;
            }
            None => self.link.close().await,
        }
    }

    /// How long the oldest pending point has waited for its ack.
    pub(crate) fn ack_wait(&self) -> Option<Duration> {
        self.pending.front().map(|p| p.ended.elapsed())
    }

    /// The live state as of now.
    pub(crate) fn live_state(&self) -> State {
        self.agent
            .reporter
            .live_state(self.agent.collector.get(), self.ack_wait())
    }

    /// Wait, taking acks as they come, and with live tracking bring in
    /// trace events (so that the trace buffer never fills between points)
    /// and keep the status's state and lag current.
    pub(crate) async fn wait(&mut self, until: Wait) -> Result<(), AgentError> {
        let full = tokio::time::Instant::now() + self.agent.cfg.interval;
        let interval_end = match until {
            Wait::Interval { early: true } => self.next_point_at.take().unwrap_or(full),
            _ => full,
        };
        let interval = tokio::time::sleep_until(interval_end);
        tokio::pin!(interval);
        // The agent reads nothing while it waits: the disks' load
        // meanwhile is their workload's (its reads before would slow the
        // workload's writes and count).
        self.agent.collector.load_mut().restart();
        loop {
            let stopping = self.agent.shutdown.is_cancelled();
            match until {
                Wait::Drain(keep) if self.pending.len() <= keep => return Ok(()),
                // A stop that came during an earlier wait: no next point.
                Wait::Interval { .. } if stopping => return Ok(()),
                _ => {}
            }
            let deadline = self.stop_deadline;
            tokio::select! {
                () = &mut interval, if matches!(until, Wait::Interval { .. }) => return Ok(()),
                () = self.agent.shutdown.cancelled(), if !stopping || deadline.is_none() => {
                    if matches!(until, Wait::Interval { .. }) {
                        return Ok(());
                    }
                    self.stop_deadline = Some(tokio::time::Instant::now() + SHUTDOWN_GRACE);
                }
                () = sleep_until_opt(deadline) => {
                    tracing::warn!(pending = self.pending.len(), "stopping without the receiver's last acks");
                    return Err(AgentError::Stopped);
                }
                f = self.link.recv() => self.on_frame(f?).await?,
                () = self.agent.collector.tick() => {
                    self.agent.collector.collect()?;
                    let queue = self.agent.collector.load_mut().sample();
                    let saturated = self.agent.collector.saturated();
                    if let Some(t) = self.agent.collector.get_mut() {
                        t.stats.disk_queue = queue;
                    }
                    if let (Wait::Interval { early: true }, Some(t)) = (until, self.agent.collector.get()) {
                        let rescan = (0..self.vols.len()).any(|i| t.needs_rescan(i).is_some());
                        // On a saturated disk, a point waits for its interval
                        // (or longer: see `defer_point`) whatever is dirty.
                        let early = policy::early_point(t.unsent_bytes(), self.agent.cfg.early_point_bytes, rescan);
                        if early && (!saturated || rescan) {
                            return Ok(());
                        }
                    }
                    let state = self.live_state();
                    self.agent.collector.report(self.agent.reporter, |_| Some(state));
                }
            }
        }
    }

    /// A `DURABLE`: advance the durable hashes, save them when due, report.
    pub(crate) async fn on_frame(&mut self, frame: Frame) -> Result<(), AgentError> {
        let Frame::Durable { tag, point } = frame else {
            return Err(AgentError::Protocol(format!(
                "unexpected {:?} on the control connection",
                frame.kind()
            )));
        };
        let Some(mut p) = self.pending.pop_front().filter(|p| p.tag == tag) else {
            return Err(AgentError::Protocol(format!(
                "Durable for tag {tag}, which is not the oldest pending point"
            )));
        };
        self.resolve_partial(&mut p).await?;
        self.durable_tag = tag;
        if let Some(t) = self.agent.collector.get_mut() {
            t.durable();
        }
        let cfg = self.agent.cfg;
        self.durable.advance(point, &p.changes);
        // The point that completes a sync is saved at once: until then
        // `state.bin` names no point.
        let completes = self.sync_tag == Some(tag);
        if completes {
            self.sync_tag = None;
            self.resumed = false;
            self.durable.complete_sync();
            let _ = self.agent.reporter.sync_progress(None);
        }
        // The view keeps the point's changes until they are in the hash
        // files (written at most every STATE_SAVE_EVERY, or now).
        if self
            .durable
            .save_if_due(cfg.once || completes, &cfg.state_dir, &self.vols)?
        {
            for overlay in &mut self.view {
                overlay.settle_through(tag);
            }
        }
        self.progressed = true;
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
        // Lag and backlog as of now, not as of the last collection.
        self.agent.collector.collect()?;
        let state = self.live_state();
        let reporter = &mut *self.agent.reporter;
        reporter.set_state(state);
        if let Some(t) = self.agent.collector.get() {
            reporter.track(t);
        }
        reporter.durable(point, p.created_ms, now_ms());
        reporter.pending(self.pending.len());
        reporter.save();
        self.agent.reports.push(report);
        if self.agent.reports.len() > 10_000 {
            self.agent.reports.drain(..5_000);
        }
        Ok(())
    }
}

/// Completes at `deadline`; never without one.
async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The configured volumes as they are now.
fn probe(cfg: &AgentConfig) -> Result<Vec<Volume>, AgentError> {
    let mut vols = Vec::new();
    for spec in &cfg.volumes {
        let (size, is_device) = volume::probe(&spec.name, &spec.path)?;
        vols.push(Volume {
            name: spec.name.clone(),
            path: spec.path.clone(),
            size,
            block_size: cfg.block_size,
            is_device,
        });
    }
    Ok(vols)
}
