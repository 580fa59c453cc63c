//! The block hashes as of the receiver's last durable point: advanced in
//! place by each point's changes when its `DURABLE` comes (cost in the
//! number of changed blocks, not in the size of the volumes), and written
//! to `state.bin` at most every [`STATE_SAVE_EVERY`](crate::policy::STATE_SAVE_EVERY)
//! and when the session ends.

use std::path::Path;
use std::time::Instant;

use pilotlight_protocol::BlockHash;

use crate::blocking::off_async;
use crate::policy;
use crate::session::Volume;
use crate::state::{StateView, VolumeView};
use crate::AgentError;

/// One session's durable hash tables, one per volume, in volume order.
pub(crate) struct DurableHashes {
    store_id: [u8; 16],
    last_point: u64,
    tables: Vec<Vec<BlockHash>>,
    /// When `state.bin` was last written in this session.
    saved_at: Option<Instant>,
    /// Whether the last durable point is not written yet.
    unsaved: bool,
}

impl DurableHashes {
    pub(crate) fn new(store_id: [u8; 16], last_point: u64, tables: Vec<Vec<BlockHash>>) -> Self {
        Self {
            store_id,
            last_point,
            tables,
            saved_at: None,
            unsaved: false,
        }
    }

    #[cfg(test)]
    pub(crate) fn tables(&self) -> &[Vec<BlockHash>] {
        &self.tables
    }

    /// Point `point` is durable with `changes` (per volume: block, hash).
    pub(crate) fn advance(&mut self, point: u64, changes: &[Vec<(u64, BlockHash)>]) {
        for (table, ch) in self.tables.iter_mut().zip(changes) {
            for &(i, h) in ch {
                if let Some(slot) = usize::try_from(i).ok().and_then(|i| table.get_mut(i)) {
                    *slot = h;
                }
            }
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
    ) -> Result<(), AgentError> {
        if policy::state_save_due(once, self.saved_at.map(|t| t.elapsed())) {
            self.save(dir, vols)?;
        }
        Ok(())
    }

    /// Write `state.bin` if the last durable point is not in it yet.
    pub(crate) fn save_unsaved(&mut self, dir: &Path, vols: &[Volume]) -> Result<(), AgentError> {
        if self.unsaved {
            self.save(dir, vols)?;
        }
        Ok(())
    }

    /// Write `state.bin` (blocking I/O and fsync, off the async workers).
    fn save(&mut self, dir: &Path, vols: &[Volume]) -> Result<(), AgentError> {
        let view = StateView {
            store_id: self.store_id,
            last_point: self.last_point,
            volumes: vols
                .iter()
                .zip(&self.tables)
                .map(|(v, h)| VolumeView {
                    name: &v.name,
                    size: v.size,
                    block_size: v.block_size,
                    hashes: h,
                })
                .collect(),
        };
        off_async(|| view.save(dir))?;
        self.saved_at = Some(Instant::now());
        self.unsaved = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use super::*;
    use crate::state::AgentState;

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
        let vols = [vol("a", 3), vol("b", 2)];
        let zero = BlockHash([0; 32]);
        let mut d = DurableHashes::new([9; 16], 4, vec![vec![zero; 3], vec![zero; 2]]);
        d.advance(
            5,
            &[
                vec![(1, BlockHash([1; 32]))],
                vec![(0, BlockHash([2; 32])), (9, zero)],
            ],
        );
        assert_eq!(d.tables()[0], [zero, BlockHash([1; 32]), zero]);
        assert_eq!(d.tables()[1], [BlockHash([2; 32]), zero]);
        // The first durable point of a session is written at once...
        d.save_if_due(false, dir.path(), &vols).unwrap();
        let st = AgentState::load(dir.path()).unwrap().unwrap();
        assert_eq!((st.store_id, st.last_point), ([9; 16], 5));
        assert_eq!(st.volumes[1].hashes, d.tables()[1]);
        // ...later ones wait, and the end of the session writes them.
        d.advance(6, &[vec![], vec![(1, BlockHash([3; 32]))]]);
        d.save_if_due(false, dir.path(), &vols).unwrap();
        assert_eq!(AgentState::load(dir.path()).unwrap().unwrap().last_point, 5);
        d.save_unsaved(dir.path(), &vols).unwrap();
        let st = AgentState::load(dir.path()).unwrap().unwrap();
        assert_eq!(st.last_point, 6);
        assert_eq!(st.volumes[1].hashes[1], BlockHash([3; 32]));
    }
}
