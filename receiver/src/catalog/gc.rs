//! Garbage collection's side of the catalog, by SQL over the catalog rather
//! than sets in memory: what the points and syncs reference is a temporary
//! table of the collection's own connection (`live`, on disk, its own
//! bounded page cache), the blocks found dead move to `gc_doomed` (out of
//! the block index) until the collection decides, and one pack's rows move
//! to the packs they were copied to, or go, in one transaction.
//!
//! ```text
//! temp.live(hash, server_id)   every (block, server) a point or sync refers to
//! temp.pinned(hash)            what live sessions hold (uncommitted points)
//! temp.dead(pack_id, hash, offset)   blocks no point referred to (candidates)
//! gc_doomed(pack_id, hash, ..)       a `blocks` row taken out of the index
//! ```

use pilotlight_protocol::BlockHash;
use rusqlite::{params, Connection};

use super::blocks::{block_loc, hash_from_ref, record_packs};
use super::Catalog;
use crate::pack::BlockLoc;
use crate::ReceiveError;

/// Page cache of the collection's temporary tables, KiB.
const TEMP_CACHE_KIB: i64 = 16 << 10;

impl Catalog {
    /// Step 1 (a read of the catalog, commits go on): fill `temp.live` with
    /// every `(hash, server)` a point or an in-progress sync refers to, and
    /// `temp.dead` with the blocks none refers to. Returns the newest point
    /// id that read saw: what a later point refers to is added by
    /// [`Catalog::gc_settle`].
    pub fn gc_mark(&mut self) -> Result<i64, ReceiveError> {
        let c = &self.conn;
        c.pragma_update(Some("temp"), "cache_size", -TEMP_CACHE_KIB)?;
        c.execute_batch(
            "DROP TABLE IF EXISTS temp.live; DROP TABLE IF EXISTS temp.dead;
             DROP TABLE IF EXISTS temp.pinned;
             CREATE TEMP TABLE live(hash BLOB NOT NULL, server_id INTEGER NOT NULL,
                                    PRIMARY KEY(hash, server_id)) WITHOUT ROWID;
             CREATE TEMP TABLE dead(pack_id INTEGER NOT NULL, hash BLOB NOT NULL,
                                    offset INTEGER NOT NULL,
                                    PRIMARY KEY(pack_id, hash)) WITHOUT ROWID;
             CREATE TEMP TABLE pinned(hash BLOB PRIMARY KEY) WITHOUT ROWID;",
        )?;
        let tx = self.conn.transaction()?;
        let mark: i64 =
            tx.query_row("SELECT coalesce(max(id), 0) FROM points", [], |r| r.get(0))?;
        tx.execute_batch(
            "INSERT OR IGNORE INTO temp.live(hash, server_id)
               SELECT pb.hash, v.server_id FROM point_blocks pb
               JOIN volumes v ON v.id = pb.volume_id WHERE pb.hash IS NOT NULL;
             INSERT OR IGNORE INTO temp.live(hash, server_id)
               SELECT hash, server_id FROM sync_blocks WHERE hash IS NOT NULL;
             INSERT INTO temp.dead(pack_id, hash, offset)
               SELECT b.pack_id, b.hash, b.offset FROM blocks b
               WHERE NOT EXISTS (SELECT 1 FROM temp.live l WHERE l.hash = b.hash);",
        )?;
        tx.commit()?;
        Ok(mark)
    }

    /// Step 2 (the store's gate held for writing: no data stream is between
    /// a lookup and its record): take the dead blocks out of the index,
    /// except those `pinned` and those in `busy` packs (written to now).
    /// Only rows still where step 1 found them move. Returns how many.
    pub fn gc_doom(&mut self, pinned: &[BlockHash], busy: &[u64]) -> Result<u64, ReceiveError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut pin =
                tx.prepare_cached("INSERT OR IGNORE INTO temp.pinned(hash) VALUES(?1)")?;
            for h in pinned {
                pin.execute(params![&h.0[..]])?;
            }
            let mut out = tx.prepare_cached("DELETE FROM temp.dead WHERE pack_id=?1")?;
            for p in busy {
                out.execute(params![*p as i64])?;
            }
        }
        tx.execute_batch(
            "DELETE FROM temp.dead WHERE hash IN (SELECT hash FROM temp.pinned);
             INSERT OR IGNORE INTO gc_doomed(pack_id, hash, offset, stored_len, raw_len, encoding)
               SELECT b.pack_id, b.hash, b.offset, b.stored_len, b.raw_len, b.encoding
               FROM temp.dead d JOIN blocks b
                 ON b.hash = d.hash AND b.pack_id = d.pack_id AND b.offset = d.offset;
             DELETE FROM blocks WHERE hash IN (SELECT hash FROM gc_doomed)
               AND EXISTS (SELECT 1 FROM gc_doomed g
                           WHERE g.hash = blocks.hash AND g.pack_id = blocks.pack_id
                             AND g.offset = blocks.offset);",
        )?;
        let n: i64 = tx.query_row("SELECT count(*) FROM gc_doomed", [], |r| r.get(0))?;
        tx.commit()?;
        Ok(n.max(0) as u64)
    }

    /// Step 3, in one transaction: add to `temp.live` what points newer
    /// than `mark` and the in-progress syncs refer to now (they may have
    /// taken a block in before step 2); put the doomed blocks they refer to
    /// back; drop the `server_blocks` rows of blocks no point of their
    /// server refers to any more (but not of pinned ones: their commit adds
    /// the row again anyway). Returns how many `server_blocks` rows went.
    pub fn gc_settle(&mut self, mark: i64) -> Result<u64, ReceiveError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT OR IGNORE INTO temp.live(hash, server_id)
               SELECT pb.hash, v.server_id FROM point_blocks pb
               JOIN volumes v ON v.id = pb.volume_id
               WHERE pb.point_id > ?1 AND pb.hash IS NOT NULL",
            params![mark],
        )?;
        tx.execute_batch(
            "INSERT OR IGNORE INTO temp.live(hash, server_id)
               SELECT hash, server_id FROM sync_blocks WHERE hash IS NOT NULL;
             INSERT OR IGNORE INTO blocks(hash, pack_id, offset, stored_len, raw_len, encoding)
               SELECT hash, pack_id, offset, stored_len, raw_len, encoding FROM gc_doomed g
               WHERE EXISTS (SELECT 1 FROM temp.live l WHERE l.hash = g.hash);
             DELETE FROM gc_doomed
               WHERE EXISTS (SELECT 1 FROM temp.live l WHERE l.hash = gc_doomed.hash);",
        )?;
        let dropped = tx.execute(
            "DELETE FROM server_blocks
             WHERE NOT EXISTS (SELECT 1 FROM temp.live l
                               WHERE l.hash = server_blocks.hash
                                 AND l.server_id = server_blocks.server_id)
               AND hash NOT IN (SELECT hash FROM temp.pinned)",
            [],
        )?;
        tx.commit()?;
        Ok(dropped as u64)
    }

    /// The blocks of pack `pack` still in the index, and those taken out
    /// of it (dead).
    pub fn gc_pack_blocks(&self, pack: u64) -> Result<PackBlocks, ReceiveError> {
        Ok(PackBlocks {
            live: rows(
                &self.conn,
                "SELECT hash, pack_id, offset, stored_len, raw_len, encoding FROM blocks
                 WHERE pack_id=?1",
                pack,
            )?,
            dead: rows(
                &self.conn,
                "SELECT hash, pack_id, offset, stored_len, raw_len, encoding FROM gc_doomed
                 WHERE pack_id=?1",
                pack,
            )?,
        })
    }

    /// Put every doomed block back in the index (a collection that kept
    /// their pack, or one a kill interrupted); drop the temporary tables.
    pub fn undoom_all(&mut self) -> Result<(), ReceiveError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(
            "INSERT OR IGNORE INTO blocks(hash, pack_id, offset, stored_len, raw_len, encoding)
               SELECT hash, pack_id, offset, stored_len, raw_len, encoding FROM gc_doomed;
             DELETE FROM gc_doomed;",
        )?;
        tx.commit()?;
        self.conn.execute_batch(
            "DROP TABLE IF EXISTS temp.live; DROP TABLE IF EXISTS temp.dead;
             DROP TABLE IF EXISTS temp.pinned;",
        )?;
        Ok(())
    }

    /// Garbage collection of pack `old`, in one transaction: blocks in
    /// `moved` now live at their new location (rows that moved elsewhere
    /// meanwhile are left alone), the doomed rows of `dead` blocks go, and
    /// `new_packs` become committed. Returns whether `old` has no blocks
    /// left, in which case its row is gone and its file may be removed.
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
            let mut del =
                tx.prepare_cached("DELETE FROM gc_doomed WHERE pack_id=?2 AND hash=?1")?;
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

/// A pack's blocks, as garbage collection finds them.
#[derive(Debug, Default)]
pub struct PackBlocks {
    /// In the index: some point refers to them.
    pub live: Vec<(BlockHash, BlockLoc)>,
    /// Taken out of it: no point refers to them.
    pub dead: Vec<(BlockHash, BlockLoc)>,
}

fn rows(
    conn: &Connection,
    sql: &str,
    pack: u64,
) -> Result<Vec<(BlockHash, BlockLoc)>, ReceiveError> {
    let mut st = conn.prepare_cached(sql)?;
    let mut rows = st.query(params![pack as i64])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let Some(h) = hash_from_ref(r.get_ref(0)?)? else {
            continue;
        };
        out.push((
            h,
            block_loc(r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)?,
        ));
    }
    Ok(out)
}
