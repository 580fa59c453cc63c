//! Pruning's side of the catalog: a point goes, its changes folded into the
//! next point of its server.

use rusqlite::params;

use super::Catalog;
use crate::ReceiveError;

impl Catalog {
    /// Delete point `id` of `server_id`, folding the blocks it changed into
    /// the next point of the server (where that point did not change them
    /// itself), so that every later point restores exactly as before. The
    /// newest point cannot be deleted. Blocks stay in the store.
    pub fn delete_point(&mut self, server_id: i64, id: i64) -> Result<(), ReceiveError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let next: Option<i64> = tx.query_row(
            "SELECT min(id) FROM points WHERE server_id=?1 AND id>?2",
            params![server_id, id],
            |r| r.get(0),
        )?;
        let Some(next) = next else {
            return Err(ReceiveError::Refused(format!(
                "point {id} is the newest point; it is never pruned"
            )));
        };
        tx.execute(
            "INSERT OR IGNORE INTO point_blocks(volume_id, block_index, point_id, hash)
             SELECT volume_id, block_index, ?2, hash FROM point_blocks WHERE point_id=?1",
            params![id, next],
        )?;
        tx.execute("DELETE FROM point_blocks WHERE point_id=?1", params![id])?;
        tx.execute("DELETE FROM point_volumes WHERE point_id=?1", params![id])?;
        let n = tx.execute(
            "DELETE FROM points WHERE id=?1 AND server_id=?2",
            params![id, server_id],
        )?;
        if n != 1 {
            return Err(ReceiveError::NotFound(format!("there is no point {id}")));
        }
        tx.commit()?;
        Ok(())
    }
}
