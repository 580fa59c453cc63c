//! `server_blocks(server_id, hash)`: the blocks each server has stored.
//!
//! A row says "server S sent this block and a point of S committed it". It
//! scopes deduplication (a block counts as already stored for S only when S
//! has a row for it, so commit timing tells S nothing about the blocks of
//! other servers) and it is what S's quota charges: each server pays for
//! the stored bytes of its blocks, whether other servers share them or not.
//!
//! Rows are added by each commit for every block of the point, and go when
//! garbage collection finds that no point of the server references the
//! block any more ([`Catalog::drop_unreferenced_server_blocks`]).

use std::collections::{HashMap, HashSet};

use pilotlight_protocol::BlockHash;
use rusqlite::{params, Connection};

use super::blocks::hash_from_blob;
use super::points::BlockRef;
use super::Catalog;
use crate::ReceiveError;

impl Catalog {
    /// The blocks server `server_id` has stored.
    pub fn server_blocks(&self, server_id: i64) -> Result<HashSet<BlockHash>, ReceiveError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT hash FROM server_blocks WHERE server_id=?1")?;
        let mut rows = st.query(params![server_id])?;
        let mut out = HashSet::new();
        while let Some(r) = rows.next()? {
            if let Some(h) = hash_from_blob(Some(r.get(0)?))? {
                out.insert(h);
            }
        }
        Ok(out)
    }

    /// Every server's stored blocks, by server id.
    pub fn all_server_blocks(&self) -> Result<HashMap<i64, HashSet<BlockHash>>, ReceiveError> {
        let mut st = self
            .conn
            .prepare("SELECT server_id, hash FROM server_blocks")?;
        let mut rows = st.query([])?;
        let mut out: HashMap<i64, HashSet<BlockHash>> = HashMap::new();
        while let Some(r) = rows.next()? {
            let server: i64 = r.get(0)?;
            if let Some(h) = hash_from_blob(Some(r.get(1)?))? {
                out.entry(server).or_default().insert(h);
            }
        }
        Ok(out)
    }

    /// What server `server_id` is charged for: the stored (compressed)
    /// bytes of every block it has stored, shared with other servers or not.
    pub fn server_usage(&self, server_id: i64) -> Result<u64, ReceiveError> {
        let n: Option<i64> = self.conn.query_row(
            "SELECT sum(b.stored_len) FROM server_blocks s JOIN blocks b ON b.hash = s.hash
             WHERE s.server_id = ?1",
            params![server_id],
            |r| r.get(0),
        )?;
        Ok(n.unwrap_or(0).max(0) as u64)
    }

    /// Delete the rows of blocks no point of their server references any
    /// more (pruned away), except `pinned` ones (uncommitted points of live
    /// sessions refer to them; their commit adds the row again anyway).
    /// Returns how many rows went.
    pub fn drop_unreferenced_server_blocks(
        &mut self,
        pinned: &HashSet<BlockHash>,
    ) -> Result<u64, ReceiveError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut referenced: HashSet<(i64, BlockHash)> = HashSet::new();
        {
            let mut st = tx.prepare(
                "SELECT DISTINCT v.server_id, pb.hash
                 FROM point_blocks pb JOIN volumes v ON v.id = pb.volume_id
                 WHERE pb.hash IS NOT NULL
                 UNION SELECT server_id, hash FROM sync_blocks WHERE hash IS NOT NULL",
            )?;
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                if let Some(h) = hash_from_blob(Some(r.get(1)?))? {
                    referenced.insert((r.get(0)?, h));
                }
            }
        }
        let mut gone = Vec::new();
        {
            let mut st = tx.prepare("SELECT server_id, hash FROM server_blocks")?;
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                let server: i64 = r.get(0)?;
                let Some(h) = hash_from_blob(Some(r.get(1)?))? else {
                    continue;
                };
                if !pinned.contains(&h) && !referenced.contains(&(server, h)) {
                    gone.push((server, h));
                }
            }
        }
        {
            let mut del =
                tx.prepare_cached("DELETE FROM server_blocks WHERE server_id=?1 AND hash=?2")?;
            for (server, h) in &gone {
                del.execute(params![server, &h.0[..]])?;
            }
        }
        tx.commit()?;
        Ok(gone.len() as u64)
    }
}

/// Record, inside a point's commit transaction, that server `server_id`
/// has stored every (non-zero) block of the point.
pub(super) fn record_server_blocks(
    tx: &Connection,
    server_id: i64,
    blocks: &[BlockRef],
) -> Result<(), ReceiveError> {
    let mut ins =
        tx.prepare_cached("INSERT OR IGNORE INTO server_blocks(server_id, hash) VALUES(?1, ?2)")?;
    for h in blocks.iter().filter_map(|b| b.hash.as_ref()) {
        ins.execute(params![server_id, &h.0[..]])?;
    }
    Ok(())
}
