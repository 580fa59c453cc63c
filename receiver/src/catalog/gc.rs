//! Garbage collection's side of the catalog: the rows of one pack's blocks
//! move to the packs they were copied to, or go, in one transaction.

use pilotlight_protocol::BlockHash;
use rusqlite::params;

use super::blocks::record_packs;
use super::Catalog;
use crate::pack::BlockLoc;
use crate::ReceiveError;

impl Catalog {
    /// Garbage collection of pack `old`, in one transaction: blocks in
    /// `moved` now live at their new location (rows that moved elsewhere
    /// meanwhile are left alone), rows of `dead` blocks go, and `new_packs`
    /// become committed. Returns whether `old` has no blocks left, in which
    /// case its row is gone and its file may be removed.
    pub fn collect_pack(
        &mut self,
        old: u64,
        moved: &[(BlockHash, BlockLoc)],
        dead: &[BlockHash],
        new_packs: &[(u64, u64)],
    ) -> Result<bool, ReceiveError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let old_id = old as i64;
        {
            record_packs(&tx, new_packs)?;
            let mut mv = tx.prepare_cached(
                "UPDATE blocks SET pack_id=?2, offset=?3 WHERE hash=?1 AND pack_id=?4",
            )?;
            for (h, loc) in moved {
                mv.execute(params![
                    &h.0[..],
                    loc.pack as i64,
                    loc.offset as i64,
                    old_id
                ])?;
            }
            let mut del = tx.prepare_cached("DELETE FROM blocks WHERE hash=?1 AND pack_id=?2")?;
            for h in dead {
                del.execute(params![&h.0[..], old_id])?;
            }
        }
        let left: i64 = tx.query_row(
            "SELECT count(*) FROM blocks WHERE pack_id=?1",
            params![old_id],
            |r| r.get(0),
        )?;
        if left == 0 {
            tx.execute("DELETE FROM packs WHERE id=?1", params![old_id])?;
        }
        tx.commit()?;
        Ok(left == 0)
    }
}
