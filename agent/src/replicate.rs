//! The replication loop: sessions one after another, reconnecting with a
//! backoff when one fails. A session ([`session`](crate::session)) agrees
//! on the base with the receiver and runs cycles ([`cycle`](crate::cycle)).

use std::sync::Arc;

use pilotlight_protocol::frame::Consistency;
use tokio_util::sync::CancellationToken;

use crate::collector::Collector;
use crate::policy::Backoff;
use crate::reporter::Reporter;
use crate::session::Agent;
use crate::state::StateHeader;
use crate::trace::{TrackedVolume, Tracking};
use crate::{identity, session, volume, AgentConfig, AgentError, Track};

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
    /// Frames sent on the data streams (a run of zero blocks is one frame
    /// to a receiver that takes `ZeroRun`).
    pub frames_sent: u64,
}

/// Replicate until `shutdown` (or, with `once`, until one point is durable).
/// Returns the points made durable, oldest first.
pub async fn run(
    cfg: AgentConfig,
    shutdown: CancellationToken,
) -> Result<Vec<PointReport>, AgentError> {
    crate::state::prepare_dir(&cfg.state_dir)?;
    let tracking = match cfg.track {
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
    let mut collector = Collector::new(tracking);
    let result = replicate(&cfg, tls, &shutdown, &mut collector).await;
    if let Some(t) = collector.into_tracking() {
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
    let local = StateHeader::load(&cfg.state_dir)?;
    let mut vols = Vec::new();
    for spec in &cfg.volumes {
        let (size, _) = volume::probe(&spec.name, &spec.path)?;
        let block_size = local
            .as_ref()
            .and_then(|s| s.volume(&spec.name))
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
    collector: &mut Collector,
) -> Result<Vec<PointReport>, AgentError> {
    let mut reports = Vec::new();
    let mut backoff = Backoff::default();
    let mut reporter = Reporter::new(cfg);
    let freezer = Arc::new(crate::freeze::Freezer::new(cfg.freeze.clone()));
    loop {
        let agent = Agent {
            cfg,
            shutdown,
            collector: &mut *collector,
            reporter: &mut reporter,
            reports: &mut reports,
            freezer: &freezer,
        };
        let (progressed, result) = session::run(agent, tls.clone()).await;
        match result {
            Ok(()) => {
                reporter.stopped(true);
                return Ok(reports);
            }
            Err(AgentError::Stopped) if shutdown.is_cancelled() => {
                reporter.stopped(false);
                return Ok(reports);
            }
            Err(e) if e.is_retryable() => {
                let attempt = backoff.failed(progressed);
                if cfg.once && attempt >= cfg.once_attempts {
                    return Err(e);
                }
                reporter.disconnected(&e);
                let wait = backoff.next_wait(rand::random::<u64>());
                tracing::warn!(cause = %e, retry_in = ?wait, "replication interrupted; reconnecting");
                if !pause(wait, shutdown, collector, &mut reporter).await? {
                    return Ok(reports);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Wait `wait` before reconnecting; false if stopped meanwhile. Live
/// tracking keeps reading the trace buffer (so that it does not overrun)
/// and the status keeps showing the lag growing.
async fn pause(
    wait: std::time::Duration,
    shutdown: &CancellationToken,
    collector: &mut Collector,
    reporter: &mut Reporter,
) -> Result<bool, AgentError> {
    let until = tokio::time::sleep(wait);
    tokio::pin!(until);
    loop {
        tokio::select! {
            () = &mut until => return Ok(true),
            () = shutdown.cancelled() => return Ok(false),
            () = collector.tick() => {
                collector.collect()?;
                collector.report(reporter, |_| None);
            }
        }
    }
}
