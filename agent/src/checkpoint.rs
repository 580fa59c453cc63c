//! Checkpoints of a full sync (initial sync or rescan), the agent's side.
//!
//! While a full sync runs, every [`CheckpointPolicy::bytes`] of data sent or
//! [`CheckpointPolicy::every`] (whichever comes first) the session asks the
//! receiver to make what it received durable as the server's in-progress
//! sync (`Checkpoint`), waits for `Checkpointed`, and only then records it
//! here: the sync's changes go into the hash files (see
//! `DurableHashes::checkpoint` in the `durable` module) and `sync.bin` says
//! which checkpoint they hold.
//!
//! After a restart the agent offers that checkpoint (`Resume`); when the
//! receiver still holds it, the hash files are the base of the next point,
//! which completes the sync: every block is read again (locally: the agent
//! cannot know what changed while it was not running, image files have no
//! tracking), but only blocks whose hash differs from the checkpointed one
//! are sent.
//!
//! ```text
//! sync.bin: magic "PLAGSY01" | version u32 = 1 | store_id [16] | sync u64
//!           | generation u64 | base_point u64 | done u64 | total u64
//!           | blake3 of everything before [32]
//! ```
//!
//! `base_point` is the receiver's last durable point when the sync began (0:
//! the initial sync); a checkpoint is offered only while it is still the
//! receiver's last point. Written atomically (write, fsync, rename, fsync
//! directory), after the hash files are synced.

use std::path::Path;
use std::time::{Duration, Instant};

use pilotlight_protocol::atomic_file::Access;
use pilotlight_protocol::reader::Reader;
use pilotlight_protocol::Frame;

use crate::blocking::off_async;
use crate::cycle::Point;
use crate::hashfile::HashFile;
use crate::link::Link;
use crate::session::{Session, Volume};
use crate::state::{state_err, write_atomic};
use crate::trace::Plan;
use crate::AgentError;

const MAGIC: [u8; 8] = *b"PLAGSY01";
const VERSION: u32 = 1;
/// File name of the checkpoint record in the state directory.
pub const SYNC_FILE: &str = "sync.bin";

/// The last checkpoint the receiver confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncRecord {
    /// The receiver's store.
    pub store_id: [u8; 16],
    /// The sync's id (chosen by the receiver).
    pub sync: u64,
    /// The checkpoint's number within the sync.
    pub generation: u64,
    /// The receiver's last durable point when the sync began.
    pub base_point: u64,
    /// Bytes read at the checkpoint.
    pub done: u64,
    /// Bytes the sync reads in all.
    pub total: u64,
}

impl SyncRecord {
    /// The file's bytes.
    pub fn serialize(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(100);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.store_id);
        for v in [
            self.sync,
            self.generation,
            self.base_point,
            self.done,
            self.total,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Parse the file's bytes; `None` when they are not a record.
    pub fn parse(data: &[u8]) -> Option<Self> {
        let body_len = data.len().checked_sub(32)?;
        let (body, sum) = data.split_at(body_len);
        if blake3::hash(body).as_bytes() != sum {
            return None;
        }
        let mut r = Reader::new(body, "sync.bin");
        if r.array::<8>().ok()? != MAGIC || r.u32().ok()? != VERSION {
            return None;
        }
        let rec = Self {
            store_id: r.array().ok()?,
            sync: r.u64().ok()?,
            generation: r.u64().ok()?,
            base_point: r.u64().ok()?,
            done: r.u64().ok()?,
            total: r.u64().ok()?,
        };
        r.finish().ok()?;
        Some(rec)
    }

    /// The record in `dir`, if there is a sound one. Blocking.
    pub fn load(dir: &Path) -> Result<Option<Self>, AgentError> {
        let path = dir.join(SYNC_FILE);
        match std::fs::read(&path) {
            Ok(d) => {
                let rec = Self::parse(&d);
                if rec.is_none() {
                    tracing::warn!(path = %path.display(), "checkpoint record is damaged; ignored");
                }
                Ok(rec)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(state_err(&path, e)),
        }
    }

    /// Write the record to `dir` atomically. Blocking; the hash files must
    /// be synced first.
    pub fn save(&self, dir: &Path) -> Result<(), AgentError> {
        write_atomic(dir, SYNC_FILE, &self.serialize(), Access::Private)
    }

    /// Remove the record (the sync completed or was given up). Blocking.
    pub fn forget(dir: &Path) -> Result<(), AgentError> {
        let path = dir.join(SYNC_FILE);
        match std::fs::remove_file(&path) {
            Ok(()) => {
                pilotlight_protocol::atomic_file::sync_dir(dir).map_err(|e| state_err(dir, e))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(state_err(&path, e)),
        }
    }
}

/// When a full sync checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointPolicy {
    /// After this many bytes of blocks sent since the last checkpoint.
    pub bytes: u64,
    /// Or after this long.
    pub every: Duration,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        Self {
            bytes: 1 << 30,
            every: Duration::from_secs(30),
        }
    }
}

impl CheckpointPolicy {
    /// Blocks of `block_size` scanned between two looks at the policy: a
    /// fraction of the bytes (so that a checkpoint lands near them), at
    /// least 1 MiB, at most 256 MiB of volume.
    pub fn segment_blocks(&self, block_size: u32) -> u64 {
        let bytes = (self.bytes / 4).clamp(1 << 20, 256 << 20);
        (bytes / u64::from(block_size.max(1))).max(1)
    }

    /// Whether a checkpoint is due, `sent` bytes and `since` after the last.
    pub fn due(&self, sent: u64, since: Duration) -> bool {
        sent > 0 && (sent >= self.bytes || since >= self.every)
    }
}

/// A full sync in progress in this session: its progress, for the status
/// and the next `Checkpoint`.
#[derive(Debug)]
pub(crate) struct SyncProgress {
    /// Bytes of the volumes read so far.
    pub(crate) done: u64,
    /// Bytes of the volumes in all.
    pub(crate) total: u64,
    /// Bytes of blocks sent since the last checkpoint.
    pub(crate) sent: u64,
    /// When the last checkpoint was (or the sync began).
    pub(crate) last: Instant,
    /// When the sync began in this session.
    pub(crate) started: Instant,
}

impl SyncProgress {
    pub(crate) fn new(total: u64) -> Self {
        let now = Instant::now();
        Self {
            done: 0,
            total,
            sent: 0,
            last: now,
            started: now,
        }
    }

    /// Seconds left at the rate so far (`None` until there is a rate).
    pub(crate) fn eta_seconds(&self) -> Option<f64> {
        eta(self.done, self.total, self.started.elapsed())
    }
}

/// Seconds to read the rest of `total` at the rate of `done` in `elapsed`.
pub(crate) fn eta(done: u64, total: u64, elapsed: Duration) -> Option<f64> {
    let secs = elapsed.as_secs_f64();
    if done == 0 || secs <= 0.0 {
        return None;
    }
    let rate = done as f64 / secs;
    Some(total.saturating_sub(done) as f64 / rate)
}

/// Offer the checkpoint recorded in `dir` to the receiver (`Resume`) and
/// return whether the session's first point continues it (its hash files
/// are then the base). A record the receiver does not take is forgotten.
pub(crate) async fn offer(
    link: &mut Link,
    dir: &Path,
    vols: &[Volume],
) -> Result<bool, AgentError> {
    let local = off_async(|| SyncRecord::load(dir))?;
    if !link.checkpoints {
        if local.is_some() {
            off_async(|| SyncRecord::forget(dir))?;
        }
        return Ok(false);
    }
    // Offered only while it builds on the receiver's last point and every
    // hash file it wrote is there.
    let usable = local.filter(|r| {
        r.store_id == link.store_id
            && r.base_point == link.last_point
            && vols.iter().all(|v| {
                off_async(|| HashFile::open(dir, &v.name, v.size, v.block_size))
                    .ok()
                    .flatten()
                    .is_some()
            })
    });
    // Nothing to offer, nothing to ask: the session's first point drops
    // whatever sync the receiver may hold for this server.
    let Some((sync, generation)) = usable.map(|r| (r.sync, r.generation)) else {
        if local.is_some() {
            off_async(|| SyncRecord::forget(dir))?;
        }
        return Ok(false);
    };
    link.send(&Frame::Resume { sync, generation }).await?;
    let resumed = match link.recv().await? {
        Frame::SyncState {
            resumed,
            generation: held,
            done,
            total,
            ..
        } => {
            if resumed {
                tracing::info!(
                    sync = format_args!("{sync:016x}"),
                    generation = held,
                    done,
                    total,
                    "resuming the sync from its last checkpoint"
                );
            }
            resumed
        }
        other => {
            return Err(AgentError::Protocol(format!(
                "expected SyncState, got {:?}",
                other.kind()
            )))
        }
    };
    if !resumed && local.is_some() {
        off_async(|| SyncRecord::forget(dir))?;
    }
    Ok(resumed)
}

impl Session<'_> {
    /// Whether this cycle is a full sync that checkpoints: the receiver
    /// keeps checkpoints, every volume is read whole, and it is the initial
    /// sync (no durable point yet) or a rescan of live tracking.
    pub(crate) fn full_sync(&self, plans: Option<&[Plan]>) -> bool {
        let whole = plans.is_none_or(|p| p.iter().all(|p| matches!(p, Plan::Full(_))));
        let sync = self.durable.last_point() == 0 || plans.is_some() || self.resumed;
        self.link.checkpoints && whole && sync
    }

    /// The progress of a full sync starting now.
    pub(crate) fn sync_progress(&self) -> SyncProgress {
        SyncProgress::new(self.vols.iter().map(|v| v.size).sum())
    }

    /// After each part of a full sync: show the progress, and checkpoint
    /// when due. Returns false if stopped.
    pub(crate) async fn after_part(&mut self, point: &mut Point) -> Result<bool, AgentError> {
        let Some(sp) = point.sync.as_ref() else {
            return Ok(true);
        };
        let first = self
            .agent
            .reporter
            .sync_progress(Some((sp.done, sp.total, sp.eta_seconds())));
        if self.agent.reporter.due() || first {
            self.agent.reporter.save();
        }
        if !self.agent.cfg.checkpoints.due(sp.sent, sp.last.elapsed()) {
            return Ok(true);
        }
        self.checkpoint(point).await
    }

    /// Ask the receiver to make the sync durable so far, wait for its
    /// answer (taking acks of earlier points meanwhile), then record the
    /// checkpoint. Returns false if stopped.
    async fn checkpoint(&mut self, point: &mut Point) -> Result<bool, AgentError> {
        let Some(sp) = point.sync.as_mut() else {
            return Ok(true);
        };
        let (done, total) = (sp.done.min(sp.total), sp.total);
        self.link
            .send(&Frame::Checkpoint {
                tag: point.tag,
                blocks: point.report.blocks_sent,
                done,
                total,
            })
            .await?;
        let (sync, generation) = loop {
            let f = tokio::select! {
                f = self.link.recv() => f?,
                // Live tracking keeps bringing in trace events meanwhile
                // (the commit of a checkpoint may take seconds).
                () = self.agent.collector.tick() => {
                    self.agent.collector.collect()?;
                    continue;
                }
                () = self.agent.shutdown.cancelled() => return Ok(false),
            };
            match f {
                Frame::Checkpointed {
                    tag,
                    sync,
                    generation,
                } if tag == point.tag => break (sync, generation),
                other => self.on_frame(other).await?,
            }
        };
        let record = SyncRecord {
            store_id: self.link.store_id,
            sync,
            generation,
            base_point: self.durable.last_point(),
            done,
            total,
        };
        let dir = self.agent.cfg.state_dir.clone();
        self.durable
            .checkpoint(&dir, &self.vols, &mut point.changes, &record)?;
        for c in &mut point.changes {
            c.clear();
        }
        self.sync_tag = Some(point.tag);
        if let Some(sp) = point.sync.as_mut() {
            sp.sent = 0;
            sp.last = Instant::now();
        }
        metrics::counter!("pilotlight_agent_checkpoints_total").increment(1);
        tracing::info!(
            tag = point.tag,
            generation,
            done,
            total,
            "checkpoint durable"
        );
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use super::*;
    use pilotlight_protocol::golden;

    fn record() -> SyncRecord {
        SyncRecord {
            store_id: [0xAB; 16],
            sync: 0x0102030405060708,
            generation: 3,
            base_point: 0,
            done: 1 << 30,
            total: 4 << 30,
        }
    }

    /// The format is fixed: a change needs a new version and a new fixture.
    #[test]
    fn sync_bin_matches_its_golden_bytes() {
        let path = format!(
            "{}/tests/testdata/sync.v1.bin.hex",
            env!("CARGO_MANIFEST_DIR")
        );
        let bytes = record().serialize();
        golden::bless(
            std::path::Path::new(&path),
            &[("sync.bin v1".to_owned(), bytes.clone())],
        )
        .unwrap();
        let want = golden::unhex(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(golden::hex(&bytes), golden::hex(&want));
        assert_eq!(SyncRecord::parse(&want), Some(record()));
    }

    #[test]
    fn a_damaged_or_truncated_record_is_none() {
        let mut bytes = record().serialize();
        assert!(SyncRecord::parse(&bytes[..bytes.len() - 1]).is_none());
        bytes[20] ^= 1;
        assert!(SyncRecord::parse(&bytes).is_none());
        assert!(SyncRecord::parse(&[]).is_none());
    }

    #[test]
    fn saved_loaded_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(SyncRecord::load(dir.path()).unwrap(), None);
        record().save(dir.path()).unwrap();
        assert_eq!(SyncRecord::load(dir.path()).unwrap(), Some(record()));
        SyncRecord::forget(dir.path()).unwrap();
        SyncRecord::forget(dir.path()).unwrap();
        assert_eq!(SyncRecord::load(dir.path()).unwrap(), None);
    }

    #[test]
    fn due_by_bytes_or_time_and_never_empty() {
        let p = CheckpointPolicy {
            bytes: 100,
            every: Duration::from_secs(30),
        };
        assert!(!p.due(0, Duration::from_secs(60)));
        assert!(!p.due(99, Duration::from_secs(29)));
        assert!(p.due(100, Duration::ZERO));
        assert!(p.due(1, Duration::from_secs(30)));
        assert_eq!(p.segment_blocks(65536), 16);
        assert_eq!(CheckpointPolicy::default().segment_blocks(65536), 4096);
    }

    #[test]
    fn eta_at_the_rate_so_far() {
        assert_eq!(eta(0, 100, Duration::from_secs(5)), None);
        assert_eq!(eta(25, 100, Duration::from_secs(5)), Some(15.0));
        assert_eq!(eta(100, 100, Duration::from_secs(5)), Some(0.0));
    }
}
