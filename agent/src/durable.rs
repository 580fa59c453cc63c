//! The block hashes as of the receiver's last durable point, in one hash
//! file per volume ([`hashfile`](crate::hashfile)): each point's changes are
//! written in place when its `DURABLE` comes (cost in the number of changed
//! blocks, not in the size of the volumes), and `state.bin` records the
//! point at most every [`STATE_SAVE_EVERY`](crate::policy::STATE_SAVE_EVERY)
//! and when the session ends.
//!
//! Order on disk: before the first record of a saved point changes,
//! `state.bin` is rewritten with no point (last point 0); at a save the
//! files are synced (`fdatasync`) and only then is the point written. A
//! crash anywhere between leaves a state that the next start does not
//! trust: it fetches the receiver's hashes instead.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use pilotlight_protocol::BlockHash;

use crate::blocking::off_async;
use crate::hashfile::{settle_order, HashFile};
use crate::policy;
use crate::session::Volume;
use crate::state::{StateHeader, VolumeMeta};
use crate::AgentError;

/// One session's durable hash files, one per volume, in volume order.
pub(crate) struct DurableHashes {
    store_id: [u8; 16],
    last_point: u64,
    files: Vec<Arc<HashFile>>,
    /// When `state.bin` was last written in this session.
    saved_at: Option<Instant>,
    /// Whether the last durable point is not written yet.
    unsaved: bool,
    /// Whether `state.bin` names a point (the files must not change before
    /// it is withdrawn).
    header_trusted: bool,
    /// Per volume, the changes of the durable points not yet in the hash
    /// files, oldest first. They are written at the next save, not at
    /// each `DURABLE`: a state directory on a traced volume would
    /// otherwise make every point cause the next one.
    unflushed: Vec<Vec<(u64, BlockHash)>>,
    /// Whether the files hold checkpointed blocks of a full sync not yet
    /// durable as a point: `state.bin` names no point until it is.
    sync_pending: bool,
}

impl DurableHashes {
    /// `header_trusted`: whether `state.bin` names the point the files hold.
    pub(crate) fn new(
        store_id: [u8; 16],
        last_point: u64,
        files: Vec<Arc<HashFile>>,
        header_trusted: bool,
    ) -> Self {
        Self {
            store_id,
            last_point,
            files,
            saved_at: None,
            unsaved: false,
            header_trusted,
            unflushed: Vec::new(),
            sync_pending: false,
        }
    }

    /// The files hold the checkpoints of a sync that a resumed session
    /// completes (its `state.bin` names no point).
    pub(crate) fn resuming(mut self) -> Self {
        self.sync_pending = true;
        self.header_trusted = false;
        self
    }

    /// The receiver's last durable point.
    pub(crate) fn last_point(&self) -> u64 {
        self.last_point
    }

    /// The point that completes the sync is durable: the next save may
    /// name it (and forgets the checkpoint record).
    pub(crate) fn complete_sync(&mut self) {
        self.sync_pending = false;
        self.unsaved = true;
    }

    /// A checkpoint the receiver confirmed: write the changes of the
    /// durable points not in the files yet, then the sync's `changes`, into
    /// the hash files, sync them, then write `record` (`sync.bin`).
    /// `state.bin` is withdrawn first (if it names a point): the files hold
    /// more than any point now. Blocking I/O, off the async workers.
    pub(crate) fn checkpoint(
        &mut self,
        dir: &Path,
        vols: &[Volume],
        changes: &mut [Vec<(u64, BlockHash)>],
        record: &crate::checkpoint::SyncRecord,
    ) -> Result<(), AgentError> {
        let untrusted = self.header(vols, 0);
        let withdraw = self.header_trusted;
        let mut unflushed = std::mem::take(&mut self.unflushed);
        let files = &self.files;
        let written = off_async(|| {
            if withdraw {
                untrusted.save(dir)?;
            }
            for (i, file) in files.iter().enumerate() {
                for ch in [unflushed.get_mut(i), changes.get_mut(i)]
                    .into_iter()
                    .flatten()
                {
                    settle_order(ch);
                    file.write(ch)?;
                }
            }
            for f in files {
                f.sync()?;
            }
            record.save(dir)
        });
        self.header_trusted = false;
        self.sync_pending = true;
        if let Err(e) = written {
            self.unflushed = unflushed;
            return Err(e);
        }
        Ok(())
    }

    /// The hash file of volume `i`.
    pub(crate) fn file(&self, i: usize) -> Option<&Arc<HashFile>> {
        self.files.get(i)
    }

    fn header(&self, vols: &[Volume], last_point: u64) -> StateHeader {
        StateHeader {
            store_id: self.store_id,
            last_point,
            volumes: vols
                .iter()
                .map(|v| VolumeMeta {
                    name: v.name.clone(),
                    size: v.size,
                    block_size: v.block_size,
                })
                .collect(),
        }
    }

    /// Point `point` is durable with `changes` (per volume: block, hash):
    /// kept in memory until the next save writes them (the caller keeps
    /// them in its view until then: see [`Self::save_if_due`]).
    pub(crate) fn advance(&mut self, point: u64, changes: &[Vec<(u64, BlockHash)>]) {
        if self.unflushed.len() < changes.len() {
            self.unflushed.resize_with(changes.len(), Vec::new);
        }
        for (pending, ch) in self.unflushed.iter_mut().zip(changes.iter()) {
            pending.extend_from_slice(ch);
        }
        self.last_point = point;
        self.unsaved = true;
    }

    /// Write `state.bin` now if [`policy::state_save_due`] says so.
    pub(crate) fn save_if_due(
        &mut self,
        once: bool,
        dir: &Path,
        vols: &[Volume],
    ) -> Result<bool, AgentError> {
        if policy::state_save_due(once, self.saved_at.map(|t| t.elapsed())) {
            self.save(dir, vols)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Write `state.bin` if the last durable point is not in it yet.
    pub(crate) fn save_unsaved(&mut self, dir: &Path, vols: &[Volume]) -> Result<(), AgentError> {
        if self.unsaved {
            self.save(dir, vols)?;
        }
        Ok(())
    }

    /// Write the durable changes into the hash files and record their
    /// point in `state.bin` (blocking I/O and fsync, off the async
    /// workers). The order keeps every crash safe: `state.bin` is first
    /// withdrawn (names no point) if it names one, then the records are
    /// written and synced, and only then does `state.bin` name the point.
    fn save(&mut self, dir: &Path, vols: &[Volume]) -> Result<(), AgentError> {
        let named = if self.sync_pending {
            0
        } else {
            self.last_point
        };
        let header = self.header(vols, named);
        let sync_done = !self.sync_pending;
        let withdraw = self.header_trusted && self.unflushed.iter().any(|c| !c.is_empty());
        let untrusted = self.header(vols, 0);
        let mut unflushed = std::mem::take(&mut self.unflushed);
        let files = &self.files;
        let written = off_async(|| {
            if withdraw {
                untrusted.save(dir)?;
            }
            for (file, ch) in files.iter().zip(unflushed.iter_mut()) {
                settle_order(ch);
                file.write(ch)?;
            }
            for f in files {
                f.sync()?;
            }
            header.save(dir)?;
            if sync_done {
                crate::checkpoint::SyncRecord::forget(dir)?;
            }
            Ok(())
        });
        if let Err(e) = written {
            // state.bin names no point now (or still the old one, if
            // nothing was written): the next start resynchronises. The
            // changes stay for a later save, which must not name the point
            // without them (writing them again is harmless).
            self.header_trusted = false;
            self.unflushed = unflushed;
            return Err(e);
        }
        self.saved_at = Some(Instant::now());
        self.unsaved = false;
        self.header_trusted = named != 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use super::*;
    use crate::state::AgentState;
    use pilotlight_protocol::block::zero_hash;

    fn vol(name: &str, blocks: u64) -> Volume {
        Volume {
            name: name.into(),
            path: "/dev/null".into(),
            size: blocks * 4096,
            block_size: 4096,
            is_device: false,
        }
    }

    #[test]
    fn advances_in_place_and_saves_what_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let vols = [vol("a", 3), vol("b", 2)];
        let zero = zero_hash(4096);
        let files = vols
            .iter()
            .map(|v| Arc::new(HashFile::create_zero(d, &v.name, v.size, 4096).unwrap()))
            .collect();
        let mut dh = DurableHashes::new([9; 16], 4, files, false);
        dh.advance(
            5,
            &[
                vec![(1, BlockHash([1; 32]))],
                vec![(0, BlockHash([2; 32])), (9, zero)],
            ],
        );
        // The first durable point of a session is written at once...
        dh.save_if_due(false, d, &vols).unwrap();
        let st = AgentState::load(d).unwrap().unwrap();
        assert_eq!((st.store_id, st.last_point), ([9; 16], 5));
        assert_eq!(st.volumes[0].hashes, [zero, BlockHash([1; 32]), zero]);
        assert_eq!(st.volumes[1].hashes, [BlockHash([2; 32]), zero]);
        // ...later ones wait in memory (state and files still agree on
        // point 5), and the end of the session writes them.
        dh.advance(6, &[vec![], vec![(1, BlockHash([3; 32]))]]);
        assert!(!dh.save_if_due(false, d, &vols).unwrap());
        let st = AgentState::load(d).unwrap().unwrap();
        assert_eq!(st.last_point, 5);
        assert_eq!(st.volumes[1].hashes[1], zero);
        dh.save_unsaved(d, &vols).unwrap();
        let st = AgentState::load(d).unwrap().unwrap();
        assert_eq!(st.last_point, 6);
        assert_eq!(st.volumes[1].hashes[1], BlockHash([3; 32]));
    }

    /// A checkpoint puts the sync's hashes in the files and withdraws
    /// `state.bin` (it names no point while the sync is in progress, even
    /// at a save); the point that completes the sync is named and the
    /// checkpoint record forgotten.
    #[test]
    fn a_checkpoint_withdraws_the_state_until_the_sync_completes() {
        use crate::checkpoint::SyncRecord;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let vols = [vol("a", 3)];
        let zero = zero_hash(4096);
        let files = vec![Arc::new(
            HashFile::create_zero(d, "a", 3 * 4096, 4096).unwrap(),
        )];
        let mut dh = DurableHashes::new([9; 16], 0, files, false);
        dh.advance(4, &[vec![(0, BlockHash([4; 32]))]]);
        dh.save_unsaved(d, &vols).unwrap();
        assert_eq!(AgentState::load(d).unwrap().unwrap().last_point, 4);
        // Point 5 durable, not saved yet; then a checkpoint of the sync.
        dh.advance(5, &[vec![(1, BlockHash([5; 32]))]]);
        let record = SyncRecord {
            store_id: [9; 16],
            sync: 7,
            generation: 1,
            base_point: 5,
            done: 4096,
            total: 3 * 4096,
        };
        let mut changes = vec![vec![(2, BlockHash([6; 32]))]];
        dh.checkpoint(d, &vols, &mut changes, &record).unwrap();
        assert_eq!(SyncRecord::load(d).unwrap(), Some(record));
        // The files hold point 5 and the checkpoint; state.bin names none.
        let st = AgentState::load(d).unwrap().unwrap();
        assert_eq!(st.last_point, 0);
        assert_eq!(
            st.volumes[0].hashes,
            [BlockHash([4; 32]), BlockHash([5; 32]), BlockHash([6; 32])]
        );
        dh.save_unsaved(d, &vols).unwrap();
        assert_eq!(AgentState::load(d).unwrap().unwrap().last_point, 0);
        // The point completing the sync (6) is named; sync.bin is gone.
        dh.advance(6, &[vec![(0, zero)]]);
        dh.complete_sync();
        dh.save_unsaved(d, &vols).unwrap();
        let st = AgentState::load(d).unwrap().unwrap();
        assert_eq!(st.last_point, 6);
        assert_eq!(st.volumes[0].hashes[0], zero);
        assert_eq!(SyncRecord::load(d).unwrap(), None);
    }
}
