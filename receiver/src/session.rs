//! A replication session: one agent's control connection and the points it
//! has in flight, shared with its data streams.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::sync::{Arc, Mutex, MutexGuard};

use pilotlight_protocol::frame::CommitMode;
use pilotlight_protocol::{BlockHash, ZeroRunFrame};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::catalog::{BlockRef, ZeroRun};
use crate::pack::{BlockLoc, PackWriter};
use crate::store::Store;
use crate::ReceiveError;

/// The resend factor of [`Session::new`]; the server sets the configured
/// one (`point_resend_factor`).
const DEFAULT_RESEND_FACTOR: u64 = 4;

/// Block references a point keeps in memory before the session spills
/// them to the catalog as an in-progress sync (see [`Session::spill`]):
/// about 200 bytes each with the location and pending hash of a new block,
/// so some 3 MiB per session; 1 GiB of 64 KiB blocks, an agent's
/// checkpoint. A spill holds the catalog about as long as such a
/// checkpoint (`benches/receiver_scale.rs`).
pub const SPILL_REFS: usize = 1 << 14;

/// The least `point_resend_factor` honoured: agents send at most 3x their
/// volumes' blocks in one point (pre-copy rounds 2x, the frozen delta 1x), and
/// a lower cap would refuse honest points.
pub const MIN_RESEND_FACTOR: u64 = 3;

/// Most blocks one point of a session with `volumes` may send: each
/// volume's block count, `factor` times (at least [`MIN_RESEND_FACTOR`]).
pub fn point_block_cap(volumes: &[SessionVolume], factor: u64) -> u64 {
    volumes
        .iter()
        .map(|v| pilotlight_protocol::limits::block_count(v.size, v.block_size))
        .fold(0u64, u64::saturating_add)
        .saturating_mul(factor.max(MIN_RESEND_FACTOR))
}

/// A volume as the session declared it, with its catalog row.
#[derive(Debug, Clone)]
pub struct SessionVolume {
    /// Name.
    pub name: String,
    /// Size declared for this session.
    pub size: u64,
    /// Block size.
    pub block_size: u32,
}

/// A point being received.
#[derive(Default)]
pub struct PendingPoint {
    /// Changed blocks.
    pub refs: Vec<BlockRef>,
    /// Runs of zero blocks, kept as runs until the commit writes a row per
    /// block (ordered by `at`, the number of `refs` recorded before each).
    pub zero_runs: Vec<ZeroRun>,
    /// Blocks first written for this point.
    pub new_blocks: Vec<(BlockHash, BlockLoc)>,
    /// Packs written for this point: file and end of the last record.
    pub packs: HashMap<u64, (Arc<File>, u64)>,
    /// Blocks received so far (a zero run counts its blocks).
    pub received: u64,
}

/// Mutable state of a session.
#[derive(Default)]
pub struct SessionState {
    /// Tag of the last committed point (0 = none yet).
    pub committed_tag: u64,
    /// Points being received, by tag.
    pub pending: BTreeMap<u64, PendingPoint>,
    /// Points taken out of `pending` whose catalog commit is under way.
    pub committing: BTreeMap<u64, Arc<PendingPoint>>,
    /// Hashes claimed for writing by uncommitted points of this session, with
    /// the earliest tag that writes them.
    pub pending_hashes: HashMap<BlockHash, u64>,
    /// Data streams joined so far.
    pub streams_joined: u16,
    /// The server's in-progress sync this session adds to, and the tag of
    /// the point that completes it.
    pub sync: Option<AttachedSync>,
    /// The part of a point (by tag) being spilled to the catalog now: out
    /// of `pending`, not in the catalog yet (garbage collection pins it,
    /// and the point's commit or checkpoint waits for it).
    pub spilling: Option<(u64, Arc<PendingPoint>)>,
}

impl SessionState {
    /// Whether part of point `tag` is being spilled.
    pub fn spilling(&self, tag: u64) -> bool {
        self.spilling.as_ref().is_some_and(|(t, _)| *t == tag)
    }
}

/// A session's link to its server's in-progress sync (see the
/// receiver's `checkpoint` module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttachedSync {
    /// The sync's id.
    pub id: u64,
    /// The point (tag) whose commit completes it.
    pub tag: u64,
    /// Whether only the receiver knows it: made by spilling the point
    /// ([`Session::spill`]), never reported to the agent by `Checkpointed`.
    /// The receiver spills only into a sync of its own.
    pub spilled: bool,
}

/// One agent session.
pub struct Session {
    /// Random session id, used by data streams to join.
    pub id: u64,
    /// Server row id.
    pub server_id: i64,
    /// Server name.
    pub server: String,
    /// Declared commit mode.
    pub commit: CommitMode,
    /// Declared data streams.
    pub streams: u16,
    /// Declared volumes, in the agent's order.
    pub volumes: Vec<SessionVolume>,
    state: Mutex<SessionState>,
    /// Woken whenever a block is recorded.
    pub progress: Notify,
    /// Cancelled when the session ends, for whatever reason.
    pub cancel: CancellationToken,
    /// Most points that may be pending at once.
    pub max_pending: usize,
    /// Most blocks one point may send: the blocks of the declared volumes
    /// times the resend factor (pre-copy rounds resend blocks). Bounds the
    /// memory of a pending point.
    pub max_point_blocks: u64,
    /// Block references a point keeps in memory before they are spilled
    /// ([`SPILL_REFS`]).
    pub spill_refs: usize,
    /// Set by [`Session::record`] when a point holds `spill_refs`
    /// references, so that [`Session::spill`] costs nothing otherwise.
    spill_due: std::sync::atomic::AtomicBool,
    /// Bytes of block frames read but not yet applied, across the session's streams.
    pub inflight: Arc<tokio::sync::Semaphore>,
    /// Serial (hex) of the identity that opened the session.
    pub serial: String,
    /// Set when the agent ended the session with Goodbye.
    pub ended: std::sync::atomic::AtomicBool,
    /// Dedup scope, quota and uncommitted-bytes cap of the session.
    pub limits: crate::quota::Limits,
    /// Pack bytes (stored lengths) written for points not committed yet.
    pub uncommitted: std::sync::atomic::AtomicU64,
    /// Connection slots taken for the data streams not connected yet (see
    /// `Admission::reserve`).
    slots: Mutex<Vec<tokio::sync::OwnedSemaphorePermit>>,
    /// Pack writers of finished data streams, returned to the store when the
    /// session is gone.
    writers: Mutex<Vec<PackWriter>>,
    store: Arc<Store>,
    failure: Mutex<Option<(pilotlight_protocol::frame::ErrorCode, String)>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        // No stream or commit of this session is running any more: whatever
        // its writers wrote past the committed length is dead.
        if let Ok(mut ws) = self.writers.lock() {
            for w in ws.drain(..) {
                self.store.return_writer(w);
            }
        }
    }
}

impl Session {
    /// A new session.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        server_id: i64,
        server: String,
        commit: CommitMode,
        streams: u16,
        volumes: Vec<SessionVolume>,
        cancel: CancellationToken,
        max_pending: usize,
        store: Arc<Store>,
        inflight_bytes: usize,
    ) -> Self {
        let max_point_blocks = point_block_cap(&volumes, DEFAULT_RESEND_FACTOR);
        Self {
            id,
            server_id,
            server,
            commit,
            streams,
            volumes,
            state: Mutex::new(SessionState::default()),
            progress: Notify::new(),
            cancel,
            max_pending,
            max_point_blocks,
            spill_refs: SPILL_REFS,
            spill_due: std::sync::atomic::AtomicBool::new(false),
            serial: String::new(),
            inflight: Arc::new(tokio::sync::Semaphore::new(inflight_bytes)),
            ended: std::sync::atomic::AtomicBool::new(false),
            limits: crate::quota::Limits::default(),
            uncommitted: std::sync::atomic::AtomicU64::new(0),
            slots: Mutex::new(Vec::new()),
            writers: Mutex::new(Vec::new()),
            store,
            failure: Mutex::new(None),
        }
    }

    /// Lock the state.
    pub fn state(&self) -> Result<MutexGuard<'_, SessionState>, ReceiveError> {
        self.state
            .lock()
            .map_err(|_| ReceiveError::poisoned("session"))
    }

    /// End the whole session because of `err` on one of its connections.
    pub fn fail(&self, err: &ReceiveError) {
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert_with(|| (err.code(), err.to_string()));
        }
        self.cancel.cancel();
    }

    /// Why the session was cancelled: the failure of one of its connections,
    /// or (none recorded) a newer session taking over.
    pub fn cancel_reason(&self) -> ReceiveError {
        match self.failure.lock().ok().and_then(|f| f.clone()) {
            Some((code, message)) => ReceiveError::SessionFailed { code, message },
            None => ReceiveError::Superseded,
        }
    }

    /// Keep the connection slots taken for the session's data streams.
    pub fn hold_slots(&self, slots: Vec<tokio::sync::OwnedSemaphorePermit>) {
        if let Ok(mut s) = self.slots.lock() {
            s.extend(slots);
        }
    }

    /// One of the slots kept for the session's data streams, for a stream
    /// connecting now; `None` when none is left.
    pub fn take_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.slots.lock().ok()?.pop()
    }

    /// Give back the slots of data streams that never connected.
    pub fn release_slots(&self) {
        if let Ok(mut s) = self.slots.lock() {
            s.clear();
        }
    }

    /// Keep a finished data stream's pack writer until the session is gone.
    pub fn retire_writer(&self, w: PackWriter) {
        match self.writers.lock() {
            Ok(mut ws) => ws.push(w),
            Err(_) => drop(w),
        }
    }

    /// Check that a block for `tag` may be accepted now.
    pub fn check_tag(&self, tag: u64) -> Result<(), ReceiveError> {
        let st = self.state()?;
        if tag <= st.committed_tag {
            return Err(ReceiveError::Protocol(format!(
                "block for point tag {tag}, which is already committed"
            )));
        }
        if tag - st.committed_tag > self.max_pending as u64 {
            return Err(ReceiveError::Protocol(format!(
                "block for point tag {tag}: more than {} points in flight",
                self.max_pending
            )));
        }
        Ok(())
    }

    /// Claim the writing of `hash` for point `tag`. Returns false when a
    /// point that commits no later than `tag` (this one or an earlier one)
    /// already writes it, so this block can refer to it instead. A block
    /// never refers to data that only a later point writes: that point might
    /// never commit.
    pub fn claim(&self, hash: &BlockHash, tag: u64) -> Result<bool, ReceiveError> {
        let mut st = self.state()?;
        match st.pending_hashes.get(hash) {
            Some(&t) if t <= tag => Ok(false),
            _ => {
                st.pending_hashes.insert(*hash, tag);
                Ok(true)
            }
        }
    }

    /// Add what this session's uncommitted points refer to (hashes) and
    /// write to (packs) to `pins`: garbage collection must keep both.
    pub fn pins(&self, pins: &mut crate::gc::Pins) -> Result<(), ReceiveError> {
        let st = self.state()?;
        let points = st
            .pending
            .values()
            .chain(st.committing.values().map(|p| &**p))
            .chain(st.spilling.iter().map(|(_, p)| &**p));
        for p in points {
            pins.hashes.extend(p.refs.iter().filter_map(|r| r.hash));
            pins.packs.extend(p.packs.keys().copied());
        }
        pins.hashes.extend(st.pending_hashes.keys().copied());
        Ok(())
    }

    /// Record a received block of point `tag`.
    pub fn record(
        &self,
        tag: u64,
        r: BlockRef,
        new: Option<(BlockHash, BlockLoc, Arc<File>)>,
    ) -> Result<(), ReceiveError> {
        {
            let mut st = self.state()?;
            let p = st.pending.entry(tag).or_default();
            if p.received >= self.max_point_blocks {
                return Err(ReceiveError::Protocol(format!(
                    "point tag {tag} has more than {} blocks, the most its declared volumes allow",
                    self.max_point_blocks
                )));
            }
            p.refs.push(r);
            p.received += 1;
            if p.refs.len() >= self.spill_refs {
                self.spill_due
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            if let Some((h, loc, file)) = new {
                let e = p.packs.entry(loc.pack).or_insert((file, 0));
                e.1 = e.1.max(loc.end());
                p.new_blocks.push((h, loc));
            }
        }
        self.progress.notify_waiters();
        Ok(())
    }

    /// Record a run of zero blocks of point `tag` (the caller checked it
    /// against its volume): refused whole, before anything is kept, when
    /// its blocks would take the point past its block cap.
    pub fn record_zeros(&self, run: &ZeroRunFrame) -> Result<(), ReceiveError> {
        let tag = run.tag;
        {
            let mut st = self.state()?;
            let p = st.pending.entry(tag).or_default();
            let received = p.received.saturating_add(run.count);
            if received > self.max_point_blocks {
                return Err(ReceiveError::Protocol(format!(
                    "point tag {tag} has more than {} blocks, the most its declared volumes allow",
                    self.max_point_blocks
                )));
            }
            let at = p.refs.len();
            p.zero_runs.push(ZeroRun {
                volume: run.volume,
                first: run.first,
                count: run.count,
                at,
            });
            p.received = received;
        }
        self.progress.notify_waiters();
        Ok(())
    }
}

impl Session {
    /// Bound the memory of the point received now: once it holds
    /// [`Session::spill_refs`] block references, write them (with the
    /// locations of its new blocks and its zero runs) to the catalog as the
    /// server's in-progress sync, the way an agent's checkpoint does,
    /// attached to the point so that its commit takes them in. A kill at
    /// any moment leaves no point: an in-progress sync is never one, and the
    /// server's next commit drops a sync it does not complete.
    ///
    /// Only the next point to commit is spilled, and only into a sync of
    /// the receiver's own (not one an agent checkpoints and may resume).
    /// Called by a data stream after each block, holding no store lock.
    /// Blocking.
    pub fn spill(self: &Arc<Self>) -> Result<(), ReceiveError> {
        if !self
            .spill_due
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            return Ok(());
        }
        let Some((tag, part)) = self.take_spill()? else {
            return Ok(());
        };
        let done = crate::checkpoint::spill(&self.store, self, tag, &part);
        if let Ok(mut st) = self.state() {
            st.spilling = None;
        }
        self.progress.notify_waiters();
        if let Err(e) = &done {
            self.fail(e);
        }
        done
    }

    /// Take the references of the next point to commit out of memory when
    /// it is time to spill them.
    fn take_spill(&self) -> Result<Option<(u64, Arc<PendingPoint>)>, ReceiveError> {
        let mut st = self.state()?;
        let tag = st.committed_tag + 1;
        let own_sync = st.sync.is_none_or(|a| a.spilled && a.tag == tag);
        // An agent's checkpoint of the point under way attaches its own
        // sync when it is done (it waits for a spill the same way).
        let checkpointing = st.committing.contains_key(&tag);
        if st.spilling.is_some() || !own_sync || checkpointing {
            return Ok(None);
        }
        let Some(p) = st.pending.get_mut(&tag) else {
            return Ok(None);
        };
        if p.refs.len() < self.spill_refs.max(1) {
            return Ok(None);
        }
        let part = Arc::new(PendingPoint {
            refs: std::mem::take(&mut p.refs),
            zero_runs: std::mem::take(&mut p.zero_runs),
            new_blocks: std::mem::take(&mut p.new_blocks),
            packs: std::mem::take(&mut p.packs),
            received: p.received,
        });
        st.spilling = Some((tag, part.clone()));
        Ok(Some((tag, part)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(size: u64, block_size: u32) -> SessionVolume {
        SessionVolume {
            name: "v".into(),
            size,
            block_size,
        }
    }

    #[test]
    fn the_point_cap_is_the_declared_blocks_times_the_factor() {
        assert_eq!(point_block_cap(&[vol(1 << 20, 65536)], 4), 64);
        // A short last block counts; volumes add up; a factor under 3
        // (what an honest agent may send) counts as 3.
        let two = [vol((1 << 20) + 1, 65536), vol(8192, 4096)];
        assert_eq!(point_block_cap(&two, 5), 5 * (17 + 2));
        assert_eq!(point_block_cap(&two, 2), 3 * (17 + 2));
        assert_eq!(point_block_cap(&two, 0), 3 * (17 + 2));
        assert_eq!(point_block_cap(&[vol(u64::MAX, 4096)], u64::MAX), u64::MAX);
    }
}
