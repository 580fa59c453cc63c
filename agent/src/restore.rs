//! Restore a point over the network by delta (`pilotlight-agent restore`):
//! fail back onto the original disk, or restore onto any file or device,
//! fetching only the blocks that differ.
//!
//! 1. The target is opened (`target`): a mounted device, or one of the
//!    agent's own replicated volumes while it runs, is refused unless
//!    forced.
//! 2. The receiver answers the request with the point and the hash of every
//!    block (`connection`; the receiver checks the agent's server may
//!    restore that server's volume).
//! 3. The target is hashed in parallel (`compare`), a run of blocks at a
//!    time, and the blocks of each run that differ are fetched, verified
//!    and written (`fetch`) while the next runs are hashed.
//! 4. The target is synced. Each block written was checked (BLAKE3 against
//!    the point's hash) in the buffer that was written, so a successful
//!    sync completes the restore; with [`RestoreConfig::read_back`] the
//!    blocks written are also read back and checked again.
//!
//! Nothing is written but blocks that differ, and each is written whole
//! and verified, so an interrupted restore run again fetches only what
//! still differs.

mod compare;
mod connection;
mod fetch;
mod target;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures_util::SinkExt;
use pilotlight_protocol::frame::{PointSelector, RestoreRequest};
use pilotlight_protocol::Frame;
use tokio::io::AsyncWriteExt;

use crate::volume::VolumeSpec;
use crate::AgentError;

use fetch::{Counters, Plan};
use target::Target;

/// What to restore, from where, and where to.
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    /// `host:port` of the receiver.
    pub receiver: String,
    /// Identity file from `pilotlight-receiver enroll`.
    pub identity: PathBuf,
    /// The server whose volume is restored; `None` = this identity's own.
    pub server: Option<String>,
    /// The volume's name.
    pub volume: String,
    /// Which point.
    pub point: PointSelector,
    /// Target file or block device.
    pub to: PathBuf,
    /// Write a mounted device, or a volume the running agent replicates.
    pub force: bool,
    /// The volumes the agent replicates (its configuration), refused as a
    /// target while it runs.
    pub replicated: Vec<VolumeSpec>,
    /// The agent's state directory (whether it runs: its `status.json`).
    pub state_dir: Option<PathBuf>,
    /// Threads hashing and writing the target (0 = one per core).
    pub workers: usize,
    /// Cap the receive rate at N megabits per second.
    pub limit_mbps: Option<u32>,
    /// Progress, for a display.
    pub progress: Option<Arc<Progress>>,
    /// After the sync, read back every block written and check its hash
    /// again. Without it, each block is checked (BLAKE3 against the
    /// point's hash) in the very buffer that is then written, and the
    /// restore is complete once the target's sync succeeds: the same
    /// guarantee as the receiver's local `restore`. Reading back adds a
    /// check of the storage under the target (a device that loses or
    /// misplaces acknowledged writes), at the cost of reading it again.
    pub read_back: bool,
}

impl RestoreConfig {
    /// A restore of `volume` at `point` to `to`, with the defaults.
    pub fn new(
        receiver: String,
        identity: PathBuf,
        volume: String,
        point: PointSelector,
        to: PathBuf,
    ) -> Self {
        Self {
            receiver,
            identity,
            server: None,
            volume,
            point,
            to,
            force: false,
            replicated: Vec::new(),
            state_dir: None,
            workers: 0,
            limit_mbps: None,
            progress: None,
            read_back: false,
        }
    }
}

/// Where a restore is: its phase, and bytes done of the phase's total.
#[derive(Debug, Default)]
pub struct Progress {
    phase: AtomicU8,
    /// Bytes done in this phase.
    pub done: AtomicU64,
    /// Bytes of this phase.
    pub total: AtomicU64,
}

/// The phases of a restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Connecting and reading the point's hashes.
    Connect,
    /// Hashing the target.
    Compare,
    /// Fetching and writing the blocks that differ.
    Fetch,
    /// Syncing (and, if asked, reading back what was written).
    Check,
}

impl Progress {
    /// The current phase.
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            0 => Phase::Connect,
            1 => Phase::Compare,
            2 => Phase::Fetch,
            _ => Phase::Check,
        }
    }

    fn enter(&self, phase: Phase, total: u64) {
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
        self.phase.store(phase as u8, Ordering::Relaxed);
    }
}

/// What a restore did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    /// The restored point (as its server numbers its points).
    pub point: u64,
    /// The volume.
    pub volume: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its block size.
    pub block_size: u32,
    /// Blocks of the target hashed and compared.
    pub blocks_compared: u64,
    /// Blocks fetched without reading the target: after a long stretch in
    /// which every block differed, a run whose first block differs too is
    /// fetched whole, unread (a blank or replaced target is not read in
    /// full only to be overwritten). Counted in `blocks_fetched`, not in
    /// `blocks_compared`.
    pub blocks_unread: u64,
    /// Blocks that differed, fetched and written.
    pub blocks_fetched: u64,
    /// Bytes of those blocks.
    pub bytes_fetched: u64,
    /// Bytes on the wire, both ways, TLS included.
    pub wire_bytes: u64,
    /// Seconds from start to the checked end.
    pub seconds: f64,
    /// The target holds the point, synced and checked.
    pub complete: bool,
}

/// Restore `cfg.volume` at `cfg.point` onto `cfg.to`.
pub async fn restore(cfg: &RestoreConfig) -> Result<RestoreReport, AgentError> {
    let started = Instant::now();
    let progress = cfg.progress.clone().unwrap_or_default();
    if !cfg.force {
        target::check_not_replicated(&cfg.to, &cfg.replicated, cfg.state_dir.as_deref())?;
    }
    let tls = crate::identity::client_config(&cfg.identity)?;
    let (to, force) = (cfg.to.clone(), cfg.force);
    let mut target = blocking(move || Target::open(&to, force)).await?;
    let wire = Arc::new(AtomicU64::new(0));
    let req = RestoreRequest {
        server: cfg.server.clone().unwrap_or_default(),
        volume: cfg.volume.clone(),
        point: cfg.point,
    };
    let mut conn = connection::open(&cfg.receiver, tls, req, wire.clone()).await?;
    let info = conn.info;
    let shape = (info.size, info.block_size);
    let target = Arc::new(blocking(move || target.fit(info.size).map(|()| target)).await?);
    let hashes = Arc::new(std::mem::take(&mut conn.hashes));
    let workers = match cfg.workers {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };

    progress.enter(Phase::Compare, info.size);
    let throttle = cfg
        .limit_mbps
        .map(|m| Arc::new(crate::throttle::Throttle::new(m)));
    let counters = Arc::new(Counters {
        progress: progress.clone(),
        written: cfg.read_back.then(Default::default),
        ..Counters::default()
    });
    let plan = Plan {
        volume: cfg.volume.clone(),
        info,
        hashes: hashes.clone(),
    };
    let (found_tx, found_rx) = tokio::sync::mpsc::channel(compare::FOUND_QUEUE);
    let (t, h, p, c) = (
        target.clone(),
        hashes.clone(),
        progress.clone(),
        counters.clone(),
    );
    let comparing = blocking(move || {
        let found = compare::differing(&t, shape, &h, workers, &p.done, &found_tx)?;
        // The rest of the fetch is what the bar shows now.
        let block_size = u64::from(shape.1);
        p.enter(Phase::Fetch, found.differ * block_size);
        p.done
            .store(c.bytes.load(Ordering::Relaxed), Ordering::Relaxed);
        Ok(found)
    });
    let fetching = fetch::fetch(
        (&mut conn.rd, &mut conn.wr),
        target.clone(),
        &plan,
        found_rx,
        (workers, throttle),
        counters.clone(),
    );
    let (compared, fetched) = tokio::join!(comparing, fetching);
    // A failed fetch stops the compare: the fetch's error is the cause.
    fetched?;
    let found = compared?;
    tracing::info!(volume = %cfg.volume, point = info.point, differing = found.differ,
        unread = found.unread, "target compared and fetched");

    let written = counters
        .written
        .as_ref()
        .and_then(|w| w.lock().ok().map(|mut w| std::mem::take(&mut *w)))
        .unwrap_or_default();
    progress.enter(
        Phase::Check,
        written.len() as u64 * u64::from(info.block_size),
    );
    let (t, h, p) = (target.clone(), hashes, progress.clone());
    let checking = blocking(move || {
        // Durable first: a write the sync reports failed fails the restore.
        t.sync()?;
        let mut written = written;
        written.sort_unstable();
        compare::recheck(&t, shape, &h, &written, &p.done)
    });
    let still = connection::pinging(&mut conn.wr, checking).await?;
    if let Some(&index) = still.first() {
        return Err(AgentError::BadBlock {
            volume: cfg.volume.clone(),
            point: info.point,
            index,
            why: format!(
                "read back from {} after the restore, it differs ({} blocks do)",
                target.path.display(),
                still.len()
            ),
        });
    }
    let _ = conn.wr.send(&Frame::Goodbye).await;
    let _ = conn.wr.get_mut().shutdown().await;
    Ok(RestoreReport {
        point: info.point,
        volume: cfg.volume.clone(),
        size: info.size,
        block_size: info.block_size,
        blocks_compared: hashes_len(shape) - found.unread,
        blocks_unread: found.unread,
        blocks_fetched: counters.blocks.load(Ordering::Relaxed),
        bytes_fetched: counters.bytes.load(Ordering::Relaxed),
        wire_bytes: wire.load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
        complete: true,
    })
}

fn hashes_len((size, block_size): (u64, u32)) -> u64 {
    pilotlight_protocol::limits::block_count(size, block_size)
}

/// Run blocking `f` on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::task("restore", e))?
}
