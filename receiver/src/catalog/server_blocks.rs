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
//! block any more ([`Catalog::gc_settle`]).

use std::collections::{HashMap, HashSet};

use pilotlight_protocol::BlockHash;
use rusqlite::{params, Connection, OptionalExtension};

use super::blocks::hash_from_blob;
use super::points::BlockRef;
use super::Catalog;
use crate::pack::BlockLoc;
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

    /// What each server is charged for (see [`Catalog::server_usage`]), by
    /// server id: one pass over `server_blocks`.
    pub fn usage_by_server(&self) -> Result<HashMap<i64, u64>, ReceiveError> {
        let mut st = self.conn.prepare(
            "SELECT s.server_id, sum(b.stored_len) FROM server_blocks s
             JOIN blocks b ON b.hash = s.hash GROUP BY s.server_id",
        )?;
        let rows = st.query_map([], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Option<i64>>(1)?))
        })?;
        let mut out = HashMap::new();
        for row in rows {
            let (server, bytes) = row?;
            out.insert(server, bytes.unwrap_or(0).max(0) as u64);
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
}

/// Record, inside a point's (or a checkpoint's) transaction, that server
/// `server_id` has stored every (non-zero) block of `blocks`; returns what
/// that adds to its usage: the stored bytes of the blocks it had not
/// stored yet, each once (`fresh`: the locations of the blocks first
/// stored by the same transaction; any other is looked up).
pub(super) fn record_server_blocks(
    tx: &Connection,
    server_id: i64,
    blocks: &[BlockRef],
    fresh: &[(BlockHash, BlockLoc)],
) -> Result<u64, ReceiveError> {
    let sizes: HashMap<&BlockHash, u32> = fresh.iter().map(|(h, l)| (h, l.stored_len)).collect();
    let mut ins =
        tx.prepare_cached("INSERT OR IGNORE INTO server_blocks(server_id, hash) VALUES(?1, ?2)")?;
    let mut size = tx.prepare_cached("SELECT stored_len FROM blocks WHERE hash=?1")?;
    let mut charged = 0u64;
    for h in blocks.iter().filter_map(|b| b.hash.as_ref()) {
        if ins.execute(params![server_id, &h.0[..]])? == 0 {
            continue;
        }
        let len = match sizes.get(h) {
            Some(&l) => l,
            None => size
                .query_row(params![&h.0[..]], |r| r.get::<_, u32>(0))
                .optional()?
                .unwrap_or(0),
        };
        charged += u64::from(len);
    }
    Ok(charged)
}
