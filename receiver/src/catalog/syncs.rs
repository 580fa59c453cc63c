//! In-progress full syncs (schema version 6): what a server's initial sync
//! or rescan has made durable at its checkpoints, before its point exists.
//!
//! ```text
//! syncs(server_id, sync_id, generation, base_seq, started_ms, updated_ms,
//!       done_bytes, total_bytes, volumes)          at most one per server
//! sync_blocks(server_id, volume, block_index, hash, raw_len)
//!                                                   volume = index in `volumes`
//! ```
//!
//! A sync is never a point: nothing restores, exports or prunes it. Its
//! blocks are kept by garbage collection and charged to its server like a
//! point's. The commit of the server's next point either takes the sync's
//! blocks into that point (the point completes it) or drops the sync (the
//! agent started over): see [`super::points`].

use rusqlite::{params, Connection, OptionalExtension};

use pilotlight_protocol::BlockHash;

use super::blocks::{hash_from_blob, record_packs};
use super::points::{record_new_blocks, BlockRef, ZeroRun};
use super::server_blocks::record_server_blocks;
use super::Catalog;
use crate::pack::BlockLoc;
use crate::ReceiveError;

/// A server's in-progress sync as the catalog holds it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SyncRow {
    /// Server name.
    pub server: String,
    /// The sync's id (chosen by the receiver at its first checkpoint).
    pub sync_id: u64,
    /// Its last durable checkpoint (1, 2, ...).
    pub generation: u64,
    /// The server's point it builds on (its number; 0 = none: initial sync).
    pub base_seq: i64,
    /// First checkpoint (receiver's clock, ms).
    pub started_ms: i64,
    /// Last checkpoint (receiver's clock, ms).
    pub updated_ms: i64,
    /// Bytes the agent had read at the last checkpoint.
    pub done_bytes: u64,
    /// Bytes the sync reads in all.
    pub total_bytes: u64,
    /// The session's volumes, `name:block_size:size` joined by `,`.
    pub volumes: String,
    /// Block references held.
    pub blocks: u64,
}

/// What a checkpoint records.
pub struct NewCheckpoint<'a> {
    /// Server row id.
    pub server_id: i64,
    /// `None`: start a new sync (dropping any other of the server) with
    /// this id; `Some`: add to this sync.
    pub continues: Option<u64>,
    /// The id of a new sync.
    pub new_id: u64,
    /// The server's latest point number (the base of a new sync).
    pub base_seq: i64,
    /// Now (receiver's clock, ms).
    pub now_ms: i64,
    /// Agent's progress.
    pub done_bytes: u64,
    /// Agent's total.
    pub total_bytes: u64,
    /// The session's volumes signature (see [`SyncRow::volumes`]).
    pub volumes: &'a str,
    /// Blocks received since the last checkpoint.
    pub blocks: &'a [BlockRef],
    /// Runs of zero blocks received with them (by `at` into `blocks`),
    /// kept as a zero reference per block: the receiver's own spills of a
    /// point take runs along (an agent's checkpoint never has any).
    pub zero_runs: &'a [ZeroRun],
    /// `(block size, size)` of each session volume, by session index (the
    /// length of a zero run's last block).
    pub sizes: &'a [(u32, u64)],
    /// Blocks first stored by them.
    pub new_blocks: &'a [(BlockHash, BlockLoc)],
    /// `(pack id, committed length)` of the packs written.
    pub packs: &'a [(u64, u64)],
}

/// The signature of a session's volumes kept with its sync.
pub fn volumes_signature<'a>(vols: impl Iterator<Item = (&'a str, u32, u64)>) -> String {
    vols.map(|(n, bs, size)| format!("{n}:{bs}:{size}"))
        .collect::<Vec<_>>()
        .join(",")
}

impl Catalog {
    /// The in-progress sync of a server (by row id).
    pub fn sync_of(&self, server_id: i64) -> Result<Option<SyncRow>, ReceiveError> {
        Ok(self
            .conn
            .query_row(
                &select_syncs("WHERE s.server_id=?1"),
                params![server_id],
                row,
            )
            .optional()?)
    }

    /// Every in-progress sync, or that of one server.
    pub fn syncs(&self, server: Option<&str>) -> Result<Vec<SyncRow>, ReceiveError> {
        let mut st = self.conn.prepare(&select_syncs(
            "WHERE (?1 IS NULL OR sv.name = ?1) ORDER BY sv.name",
        ))?;
        let rows = st.query_map(params![server], row)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Record a checkpoint atomically; returns the sync's id and generation.
    pub fn checkpoint(&mut self, c: &NewCheckpoint<'_>) -> Result<(u64, u64), ReceiveError> {
        self.checkpoint_charged(c).map(|(id, g, _)| (id, g))
    }

    /// [`checkpoint`](Self::checkpoint), and what it adds to its server's
    /// usage (see [`Catalog::commit_point_charged`]).
    pub fn checkpoint_charged(
        &mut self,
        c: &NewCheckpoint<'_>,
    ) -> Result<(u64, u64, u64), ReceiveError> {
        self.atomically(|tx| checkpoint_rows(tx, c))
    }

    /// The number an in-progress sync of `server` is shown with (the one
    /// its point gets when it completes), if it has one.
    pub fn sync_seq(&self, server: &str) -> Result<Option<(i64, SyncRow)>, ReceiveError> {
        let Some(row) = self.syncs(Some(server))?.into_iter().next() else {
            return Ok(None);
        };
        let sv = self.require_server(server)?;
        Ok(Some((self.latest_seq(sv.id)? + 1, row)))
    }

    /// Refuse point `id` of `server` with a sentence that says why when it
    /// is the server's sync in progress (which is not a point).
    pub fn refuse_in_progress(&self, server: &str, id: i64) -> Result<(), ReceiveError> {
        match self.sync_seq(server)? {
            Some((seq, row)) if seq == id => Err(ReceiveError::Refused(format!(
                "point {id} of server {server} is a sync in progress ({} of {} bytes read at its \
                 last checkpoint), not a recovery point: it cannot be restored, exported or \
                 verified until it completes",
                row.done_bytes, row.total_bytes
            ))),
            _ => Ok(()),
        }
    }

    /// The hashes every in-progress sync refers to (kept by GC).
    pub fn sync_hashes(&self) -> Result<Vec<(i64, BlockHash)>, ReceiveError> {
        let mut st = self
            .conn
            .prepare("SELECT DISTINCT server_id, hash FROM sync_blocks WHERE hash IS NOT NULL")?;
        let mut rows = st.query([])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            if let Some(h) = hash_from_blob(Some(r.get(1)?))? {
                out.push((r.get(0)?, h));
            }
        }
        Ok(out)
    }
}

/// The rows of a checkpoint, inside the caller's transaction; returns the
/// sync's id and generation, and what it charges its server.
fn checkpoint_rows(
    tx: &Connection,
    c: &NewCheckpoint<'_>,
) -> Result<(u64, u64, u64), ReceiveError> {
    let current: Option<(i64, i64)> = tx
        .query_row(
            "SELECT sync_id, generation FROM syncs WHERE server_id=?1",
            params![c.server_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let (id, generation) = match (c.continues, current) {
        (Some(id), Some((cur, g))) if cur as u64 == id => {
            tx.execute(
                "UPDATE syncs SET generation=?2, updated_ms=?3, done_bytes=?4, total_bytes=?5
                 WHERE server_id=?1",
                params![
                    c.server_id,
                    g + 1,
                    c.now_ms,
                    c.done_bytes as i64,
                    c.total_bytes as i64
                ],
            )?;
            (id, g as u64 + 1)
        }
        (Some(id), _) => {
            return Err(ReceiveError::Protocol(format!(
                "checkpoint of sync {id:016x}, which the catalog no longer holds"
            )))
        }
        (None, _) => {
            drop_sync(tx, c.server_id)?;
            tx.execute(
                "INSERT INTO syncs(server_id, sync_id, generation, base_seq, started_ms,
                                   updated_ms, done_bytes, total_bytes, volumes)
                 VALUES(?1, ?2, 1, ?3, ?4, ?4, ?5, ?6, ?7)",
                params![
                    c.server_id,
                    c.new_id as i64,
                    c.base_seq,
                    c.now_ms,
                    c.done_bytes as i64,
                    c.total_bytes as i64,
                    c.volumes
                ],
            )?;
            (c.new_id, 1)
        }
    };
    record_sync_blocks(tx, c)?;
    record_new_blocks(tx, c.new_blocks)?;
    let charged = record_server_blocks(tx, c.server_id, c.blocks, c.new_blocks)?;
    record_packs(tx, c.packs)?;
    Ok((id, generation, charged))
}

/// The blocks of a checkpoint in `sync_blocks`, zero runs expanded in
/// their place: the copy recorded last wins, as within a point.
fn record_sync_blocks(tx: &Connection, c: &NewCheckpoint<'_>) -> Result<(), ReceiveError> {
    let mut ins = tx.prepare_cached(
        "INSERT OR REPLACE INTO sync_blocks(server_id, volume, block_index, hash, raw_len)
         VALUES(?1, ?2, ?3, ?4, ?5)",
    )?;
    let mut runs = c.zero_runs.iter().peekable();
    for (at, b) in c.blocks.iter().enumerate() {
        while let Some(run) = runs.next_if(|r| r.at <= at) {
            sync_zero_run(&mut ins, c, run)?;
        }
        ins.execute(params![
            c.server_id,
            b.volume,
            b.index as i64,
            b.hash.as_ref().map(|h| &h.0[..]),
            b.raw_len
        ])?;
    }
    for run in runs {
        sync_zero_run(&mut ins, c, run)?;
    }
    Ok(())
}

/// Every block of a zero run, as a zero reference of the sync.
fn sync_zero_run(
    ins: &mut rusqlite::CachedStatement<'_>,
    c: &NewCheckpoint<'_>,
    run: &ZeroRun,
) -> Result<(), ReceiveError> {
    let Some(&(block_size, size)) = c.sizes.get(usize::from(run.volume)) else {
        return Err(ReceiveError::Corrupt(format!(
            "zero run refers to undeclared volume {}",
            run.volume
        )));
    };
    for index in run.first..run.first.saturating_add(run.count) {
        let raw_len = pilotlight_protocol::limits::block_len(size, block_size, index);
        ins.execute(params![
            c.server_id,
            run.volume,
            index as i64,
            None::<&[u8]>,
            raw_len
        ])?;
    }
    Ok(())
}

fn select_syncs(filter: &str) -> String {
    format!(
        "SELECT sv.name, s.sync_id, s.generation, s.base_seq, s.started_ms, s.updated_ms,
                s.done_bytes, s.total_bytes, s.volumes,
                (SELECT count(*) FROM sync_blocks b WHERE b.server_id = s.server_id)
         FROM syncs s JOIN servers sv ON sv.id = s.server_id {filter}"
    )
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SyncRow> {
    Ok(SyncRow {
        server: r.get(0)?,
        sync_id: r.get::<_, i64>(1)? as u64,
        generation: r.get::<_, i64>(2)? as u64,
        base_seq: r.get(3)?,
        started_ms: r.get(4)?,
        updated_ms: r.get(5)?,
        done_bytes: r.get::<_, i64>(6)?.max(0) as u64,
        total_bytes: r.get::<_, i64>(7)?.max(0) as u64,
        volumes: r.get(8)?,
        blocks: r.get::<_, i64>(9)?.max(0) as u64,
    })
}

/// Delete a server's in-progress sync (inside a transaction).
pub(super) fn drop_sync(tx: &Connection, server_id: i64) -> Result<(), ReceiveError> {
    tx.execute(
        "DELETE FROM sync_blocks WHERE server_id=?1",
        params![server_id],
    )?;
    tx.execute("DELETE FROM syncs WHERE server_id=?1", params![server_id])?;
    Ok(())
}

/// Inside a point's commit: take the server's in-progress sync into point
/// `point_id` (the session volume `i` is the volume row `ids[i].0`), then
/// drop the sync. Returns `(blocks, bytes)` taken per session volume.
pub(super) fn merge_sync(
    tx: &Connection,
    server_id: i64,
    point_id: i64,
    ids: &[(i64, u64)],
) -> Result<Vec<(u64, u64)>, ReceiveError> {
    let mut counts = vec![(0u64, 0u64); ids.len()];
    let mut ins = tx.prepare_cached(
        "INSERT INTO point_blocks(volume_id, block_index, point_id, hash)
         SELECT ?1, block_index, ?2, hash FROM sync_blocks WHERE server_id=?3 AND volume=?4",
    )?;
    let mut sum = tx.prepare_cached(
        "SELECT count(*), coalesce(sum(raw_len), 0) FROM sync_blocks
         WHERE server_id=?1 AND volume=?2",
    )?;
    for (i, (&(volume_id, _), c)) in ids.iter().zip(counts.iter_mut()).enumerate() {
        let (n, bytes): (i64, i64) =
            sum.query_row(params![server_id, i as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
        ins.execute(params![volume_id, point_id, server_id, i as i64])?;
        *c = (n.max(0) as u64, bytes.max(0) as u64);
    }
    drop_sync(tx, server_id)?;
    Ok(counts)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use pilotlight_protocol::Encoding;

    use super::*;
    use crate::catalog::NewPoint;

    const BS: u32 = 4096;

    fn block(index: u64, hash: Option<BlockHash>) -> BlockRef {
        BlockRef {
            volume: 0,
            index,
            raw_len: BS,
            hash,
        }
    }

    fn loc(offset: u64) -> BlockLoc {
        BlockLoc {
            pack: 1,
            offset,
            stored_len: BS,
            raw_len: BS,
            encoding: Encoding::Raw,
        }
    }

    fn checkpoint<'a>(
        server_id: i64,
        continues: Option<u64>,
        blocks: &'a [BlockRef],
        new_blocks: &'a [(BlockHash, BlockLoc)],
    ) -> NewCheckpoint<'a> {
        NewCheckpoint {
            server_id,
            continues,
            new_id: 77,
            base_seq: 0,
            now_ms: 1000,
            done_bytes: 8192,
            total_bytes: 16384,
            volumes: "root:4096:16384",
            blocks,
            zero_runs: &[],
            sizes: &[(BS, 16384)],
            new_blocks,
            packs: &[(1, 1 << 20)],
        }
    }

    fn point<'a>(server_id: i64, blocks: &'a [BlockRef], merge_sync: bool) -> NewPoint<'a> {
        NewPoint {
            server_id,
            created_ms: 2000,
            source_ms: 2000,
            consistency: "fuzzy",
            commit: "sync",
            volumes: &[("root", BS, 16384)],
            blocks,
            zero_runs: &[],
            new_blocks: &[],
            packs: &[],
            merge_sync,
        }
    }

    /// Two checkpoints, then the point: the point's block map holds the
    /// sync's blocks (a block sent again after a checkpoint wins), the sync
    /// is gone, and GC kept its hashes meanwhile.
    #[test]
    fn checkpoints_become_the_point_that_completes_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut cat = Catalog::open(&dir.path().join("catalog.db")).unwrap();
        cat.set_identity("web1", "01").unwrap();
        let server = cat.require_server("web1").unwrap().id;
        let [h1, h2, h3] = [1u8, 2, 3].map(|b| BlockHash([b; 32]));
        let first = [block(0, Some(h1)), block(1, Some(h2))];
        let (id, g) = cat
            .checkpoint(&checkpoint(
                server,
                None,
                &first,
                &[(h1, loc(0)), (h2, loc(5000))],
            ))
            .unwrap();
        assert_eq!((id, g), (77, 1));
        let again = [block(1, Some(h3)), block(2, None)];
        let (id, g) = cat
            .checkpoint(&checkpoint(server, Some(77), &again, &[(h3, loc(10000))]))
            .unwrap();
        assert_eq!((id, g), (77, 2));
        // A checkpoint of a sync the catalog does not hold is refused.
        assert!(cat
            .checkpoint(&checkpoint(server, Some(78), &again, &[]))
            .is_err());
        let row = cat.sync_of(server).unwrap().unwrap();
        assert_eq!((row.generation, row.blocks, row.base_seq), (2, 3, 0));
        assert_eq!(cat.syncs(Some("web1")).unwrap(), vec![row]);
        // Not a point: none listed, GC keeps its blocks, restore refuses it.
        assert!(cat.points(Some("web1")).unwrap().is_empty());
        let live = cat.referenced_hashes().unwrap();
        // (Block 1's first copy was replaced by the second checkpoint.)
        assert!(live.contains(&h1) && live.contains(&h3) && !live.contains(&h2));
        let refused = cat.refuse_in_progress("web1", 1).unwrap_err();
        assert!(
            refused.to_string().contains("sync in progress"),
            "{refused}"
        );
        cat.refuse_in_progress("web1", 2).unwrap();

        let key = cat
            .commit_point(&point(server, &[block(3, Some(h1))], true))
            .unwrap();
        assert!(cat.sync_of(server).unwrap().is_none());
        let vol = cat.volume(server, "root").unwrap().unwrap();
        assert_eq!(
            cat.block_map(vol.id, key, 0).unwrap(),
            vec![(0, Some(h1)), (1, Some(h3)), (2, None), (3, Some(h1))]
        );
        let info = cat.points(Some("web1")).unwrap();
        assert_eq!(info[0].volumes[0].changed_bytes, 4 * u64::from(BS));
    }

    /// A point that does not complete the sync drops it: the agent
    /// started over.
    #[test]
    fn another_point_drops_the_sync() {
        let dir = tempfile::tempdir().unwrap();
        let mut cat = Catalog::open(&dir.path().join("catalog.db")).unwrap();
        cat.set_identity("web1", "01").unwrap();
        let server = cat.require_server("web1").unwrap().id;
        let h = BlockHash([5; 32]);
        cat.checkpoint(&checkpoint(
            server,
            None,
            &[block(0, Some(h))],
            &[(h, loc(0))],
        ))
        .unwrap();
        let key = cat
            .commit_point(&point(server, &[block(1, None)], false))
            .unwrap();
        assert!(cat.sync_of(server).unwrap().is_none());
        let vol = cat.volume(server, "root").unwrap().unwrap();
        assert_eq!(cat.block_map(vol.id, key, 0).unwrap(), vec![(1, None)]);
        assert!(!cat.referenced_hashes().unwrap().contains(&h));
    }
}
