//! A point's commit: one transaction over `points`, `volumes`,
//! `point_blocks`, `point_volumes`, `blocks`, `server_blocks` and `packs`.

use pilotlight_protocol::BlockHash;
use rusqlite::{params, Connection, OptionalExtension};

use super::blocks::record_packs;
use super::Catalog;
use crate::pack::BlockLoc;
use crate::ReceiveError;

/// One block reference of a point being committed.
#[derive(Debug, Clone, Copy)]
pub struct BlockRef {
    /// Index into the session's volumes.
    pub volume: u16,
    /// Block index.
    pub index: u64,
    /// Raw length.
    pub raw_len: u32,
    /// Content hash; `None` for a zero block.
    pub hash: Option<BlockHash>,
}

/// A run of zero blocks of a point being committed (one `ZeroRun` frame):
/// recorded as one zero reference (`hash` NULL) per block, exactly as
/// `count` zero blocks would be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroRun {
    /// Index into the session's volumes.
    pub volume: u16,
    /// First block index.
    pub first: u64,
    /// Number of blocks (the receiver checked `first + count` against the
    /// volume before recording the run).
    pub count: u64,
    /// How many of the point's [`BlockRef`]s were recorded before this run:
    /// a block sent twice in one point keeps the copy recorded last, be it
    /// a block or a run.
    pub at: usize,
}

/// What a commit records.
pub struct NewPoint<'a> {
    /// Server row id.
    pub server_id: i64,
    /// Creation time: the receiver's clock at the commit (ms since the
    /// epoch). Retention and `restore --at` go by it.
    pub created_ms: i64,
    /// When the agent says it took the point, by its own clock (ms since the
    /// epoch); kept for the operator, never trusted.
    pub source_ms: i64,
    /// Consistency label.
    pub consistency: &'a str,
    /// Commit mode label.
    pub commit: &'a str,
    /// `(name, block size, size)` of each volume in the session, by session
    /// index. Volumes new to the catalog are created by the commit.
    pub volumes: &'a [(&'a str, u32, u64)],
    /// Changed blocks.
    pub blocks: &'a [BlockRef],
    /// Runs of zero blocks, in the order they were recorded (by `at`).
    pub zero_runs: &'a [ZeroRun],
    /// Blocks first stored by this point.
    pub new_blocks: &'a [(BlockHash, BlockLoc)],
    /// `(pack id, committed length)` of packs written by this point.
    pub packs: &'a [(u64, u64)],
    /// Whether the point completes the server's in-progress sync (takes
    /// its blocks, before its own); otherwise the commit drops the sync.
    pub merge_sync: bool,
}

/// `(volume row id, size)` of each session volume, by session index.
type VolumeIds = Vec<(i64, u64)>;

/// `(changed blocks, changed bytes)` of each session volume.
type Counts = Vec<(u64, u64)>;

impl Catalog {
    /// The newest point of a server (its catalog key).
    pub fn latest_point(&self, server_id: i64) -> Result<Option<i64>, ReceiveError> {
        Ok(self.conn.query_row(
            "SELECT max(id) FROM points WHERE server_id=?1",
            params![server_id],
            |r| r.get(0),
        )?)
    }

    /// The number of the point with catalog key `key` among its server's
    /// points (1, 2, 3, ...): its id as agents and operators see it.
    pub fn point_seq(&self, key: i64) -> Result<i64, ReceiveError> {
        self.conn
            .query_row("SELECT seq FROM points WHERE id=?1", params![key], |r| {
                r.get(0)
            })
            .optional()?
            .ok_or_else(|| ReceiveError::NotFound(format!("no point with key {key}")))
    }

    /// When a server's newest point was created (receiver's clock, ms).
    pub fn latest_point_time(&self, server_id: i64) -> Result<Option<i64>, ReceiveError> {
        Ok(self
            .conn
            .query_row(
                "SELECT created_ms FROM points WHERE server_id=?1 ORDER BY id DESC LIMIT 1",
                params![server_id],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// The number of a server's newest point (0 when it has none).
    pub fn latest_seq(&self, server_id: i64) -> Result<i64, ReceiveError> {
        Ok(self.conn.query_row(
            "SELECT coalesce(max(seq), 0) FROM points WHERE server_id=?1",
            params![server_id],
            |r| r.get(0),
        )?)
    }

    /// Record a point atomically; returns its id.
    pub fn commit_point(&mut self, p: &NewPoint<'_>) -> Result<i64, ReceiveError> {
        self.commit_point_charged(p).map(|(id, _)| id)
    }

    /// [`commit_point`](Self::commit_point), and what the point adds to
    /// its server's usage: the stored bytes of the blocks the server had
    /// not stored before.
    pub fn commit_point_charged(&mut self, p: &NewPoint<'_>) -> Result<(i64, u64), ReceiveError> {
        self.atomically(|tx| commit_rows(tx, p))
    }
}

/// The rows of a point, inside the caller's transaction; returns its id and
/// what it charges its server.
fn commit_rows(tx: &Connection, p: &NewPoint<'_>) -> Result<(i64, u64), ReceiveError> {
    // The server's next number: the newest point is never pruned, so a
    // number is never given twice.
    tx.execute(
        "INSERT INTO points(server_id, created_ms, consistency, commit_mode, source_ms, seq)
         VALUES(?1, ?2, ?3, ?4, ?5,
                (SELECT coalesce(max(seq), 0) + 1 FROM points WHERE server_id=?1))",
        params![
            p.server_id,
            p.created_ms,
            p.consistency,
            p.commit,
            p.source_ms
        ],
    )?;
    let point_id = tx.last_insert_rowid();
    let ids = volume_ids(tx, p)?;
    let merged = if p.merge_sync {
        super::syncs::merge_sync(tx, p.server_id, point_id, &ids)?
    } else {
        super::syncs::drop_sync(tx, p.server_id)?;
        Vec::new()
    };
    let mut counts = record_point_blocks(tx, p, point_id, &ids)?;
    for (c, m) in counts.iter_mut().zip(&merged) {
        c.0 += m.0;
        c.1 += m.1;
    }
    super::volumes::end_rows_beyond_resizes(tx, point_id, p.volumes, &ids)?;
    record_point_volumes(tx, point_id, &ids, &counts)?;
    record_new_blocks(tx, p.new_blocks)?;
    let charged =
        super::server_blocks::record_server_blocks(tx, p.server_id, p.blocks, p.new_blocks)?;
    record_packs(tx, p.packs)?;
    Ok((point_id, charged))
}

/// The row of each session volume, created where the catalog has none.
fn volume_ids(tx: &Connection, p: &NewPoint<'_>) -> Result<VolumeIds, ReceiveError> {
    let mut ids = Vec::with_capacity(p.volumes.len());
    for &(name, block_size, size) in p.volumes {
        let id: Option<i64> = tx
            .query_row(
                "SELECT id FROM volumes WHERE server_id=?1 AND name=?2",
                params![p.server_id, name],
                |r| r.get(0),
            )
            .optional()?;
        let id = match id {
            Some(id) => id,
            None => {
                tx.execute(
                    "INSERT INTO volumes(server_id, name, block_size, size) VALUES(?1, ?2, ?3, ?4)",
                    params![p.server_id, name, block_size, size as i64],
                )?;
                tx.last_insert_rowid()
            }
        };
        ids.push((id, size));
    }
    Ok(ids)
}

/// The point's changed blocks, the zero runs expanded in their place;
/// returns what changed in each volume.
fn record_point_blocks(
    tx: &Connection,
    p: &NewPoint<'_>,
    point_id: i64,
    ids: &VolumeIds,
) -> Result<Counts, ReceiveError> {
    let mut rows = PointBlockRows {
        // A block sent twice in one point (the agent's pre-copy, then
        // the frozen delta) is one changed block: the copy recorded
        // last wins, and it is counted once.
        ins: tx.prepare_cached(
            "INSERT OR IGNORE INTO point_blocks(volume_id, block_index, point_id, hash) VALUES(?1, ?2, ?3, ?4)",
        )?,
        again: tx.prepare_cached(
            "UPDATE point_blocks SET hash=?4 WHERE volume_id=?1 AND block_index=?2 AND point_id=?3",
        )?,
        point_id,
        counts: vec![(0u64, 0u64); p.volumes.len()],
    };
    let mut runs = p.zero_runs.iter().peekable();
    for (at, b) in p.blocks.iter().enumerate() {
        while let Some(run) = runs.next_if(|r| r.at <= at) {
            rows.zero_run(p, ids, run)?;
        }
        let volume_id = volume_id(ids, b.volume)?;
        rows.put(volume_id, b.volume, b.index, b.hash.as_ref(), b.raw_len)?;
    }
    for run in runs {
        rows.zero_run(p, ids, run)?;
    }
    Ok(rows.counts)
}

/// The catalog row of session volume `volume`.
fn volume_id(ids: &VolumeIds, volume: u16) -> Result<i64, ReceiveError> {
    ids.get(usize::from(volume))
        .map(|&(id, _)| id)
        .ok_or_else(|| ReceiveError::Corrupt(format!("block refers to undeclared volume {volume}")))
}

/// The statements that write a point's `point_blocks` rows, and what they
/// counted per volume.
struct PointBlockRows<'c> {
    ins: rusqlite::CachedStatement<'c>,
    again: rusqlite::CachedStatement<'c>,
    point_id: i64,
    counts: Counts,
}

impl PointBlockRows<'_> {
    /// One reference: a new row counts, a second copy replaces the first.
    fn put(
        &mut self,
        volume_id: i64,
        volume: u16,
        index: u64,
        hash: Option<&BlockHash>,
        raw_len: u32,
    ) -> Result<(), ReceiveError> {
        let row = params![
            volume_id,
            index as i64,
            self.point_id,
            hash.map(|h| &h.0[..])
        ];
        if self.ins.execute(row)? == 0 {
            self.again.execute(row)?;
            return Ok(());
        }
        if let Some(c) = self.counts.get_mut(usize::from(volume)) {
            c.0 += 1;
            c.1 += u64::from(raw_len);
        }
        Ok(())
    }

    /// Every block of a zero run, as a zero reference.
    fn zero_run(
        &mut self,
        p: &NewPoint<'_>,
        ids: &VolumeIds,
        run: &ZeroRun,
    ) -> Result<(), ReceiveError> {
        let volume_id = volume_id(ids, run.volume)?;
        let Some(&(_, block_size, size)) = p.volumes.get(usize::from(run.volume)) else {
            return Err(ReceiveError::Corrupt(format!(
                "zero run refers to undeclared volume {}",
                run.volume
            )));
        };
        for index in run.first..run.first.saturating_add(run.count) {
            let raw_len = pilotlight_protocol::limits::block_len(size, block_size, index);
            self.put(volume_id, run.volume, index, None, raw_len)?;
        }
        Ok(())
    }
}

/// Each volume's size and changes at the point.
fn record_point_volumes(
    tx: &Connection,
    point_id: i64,
    ids: &VolumeIds,
    counts: &Counts,
) -> Result<(), ReceiveError> {
    let mut pv = tx.prepare_cached(
        "INSERT INTO point_volumes(point_id, volume_id, size, changed_blocks, changed_bytes) VALUES(?1, ?2, ?3, ?4, ?5)",
    )?;
    let mut vs = tx.prepare_cached("UPDATE volumes SET size=?2 WHERE id=?1")?;
    for (&(volume_id, size), &(blocks, bytes)) in ids.iter().zip(counts) {
        pv.execute(params![
            point_id,
            volume_id,
            size as i64,
            blocks as i64,
            bytes as i64
        ])?;
        vs.execute(params![volume_id, size as i64])?;
    }
    Ok(())
}

/// Where the blocks first stored by the point are.
pub(super) fn record_new_blocks(
    tx: &Connection,
    new_blocks: &[(BlockHash, BlockLoc)],
) -> Result<(), ReceiveError> {
    let mut nb = tx.prepare_cached(
        // The newest copy wins: an older one may be on its way out
        // with garbage collection.
        "INSERT OR REPLACE INTO blocks(hash, pack_id, offset, stored_len, raw_len, encoding) VALUES(?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for (h, loc) in new_blocks {
        nb.execute(params![
            &h.0[..],
            loc.pack as i64,
            loc.offset as i64,
            loc.stored_len,
            loc.raw_len,
            loc.encoding as u8
        ])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use pilotlight_protocol::Encoding;

    use super::*;

    #[test]
    fn a_block_sent_twice_in_a_point_counts_once_and_the_last_copy_wins() {
        let dir = tempfile::tempdir().unwrap();
        let mut cat = Catalog::open(&dir.path().join("catalog.db")).unwrap();
        cat.set_identity("web1", "01").unwrap();
        let server_id = cat.require_server("web1").unwrap().id;
        let [h1, h2, h3] = [1u8, 2, 3].map(|b| BlockHash([b; 32]));
        let block = |index, hash| BlockRef {
            volume: 0,
            index,
            raw_len: 4096,
            hash: Some(hash),
        };
        let loc = |offset| BlockLoc {
            pack: 1,
            offset,
            stored_len: 4096,
            raw_len: 4096,
            encoding: Encoding::Raw,
        };
        // Block 5 pre-copied, then sent again with the frozen delta.
        let point = cat
            .commit_point(&NewPoint {
                server_id,
                created_ms: 1,
                source_ms: 2,
                consistency: "crash-consistent",
                commit: "sync",
                volumes: &[("root", 4096, 16 * 4096)],
                blocks: &[block(5, h1), block(6, h3), block(5, h2)],
                zero_runs: &[],
                new_blocks: &[(h1, loc(0)), (h3, loc(5000)), (h2, loc(10000))],
                packs: &[(1, 15000)],
                merge_sync: false,
            })
            .unwrap();
        let info = cat.points(Some("web1")).unwrap();
        assert_eq!(info.len(), 1);
        assert_eq!(info[0].volumes[0].changed_bytes, 2 * 4096);
        let vol = cat.volume(server_id, "root").unwrap().unwrap();
        assert_eq!(
            cat.block_map(vol.id, point, 0).unwrap(),
            vec![(5, Some(h2)), (6, Some(h3))]
        );
    }

    #[test]
    fn a_zero_run_is_a_zero_reference_per_block_in_the_order_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let mut cat = Catalog::open(&dir.path().join("catalog.db")).unwrap();
        cat.set_identity("web1", "01").unwrap();
        let server_id = cat.require_server("web1").unwrap().id;
        let [h1, h2] = [1u8, 2].map(|b| BlockHash([b; 32]));
        let block = |index, hash| BlockRef {
            volume: 0,
            index,
            raw_len: 4096,
            hash: Some(hash),
        };
        let loc = BlockLoc {
            pack: 1,
            offset: 0,
            stored_len: 4096,
            raw_len: 4096,
            encoding: Encoding::Raw,
        };
        // 10 blocks, the last one short (100 bytes). Block 2 is data, then
        // a run 1..4 zeros it; block 3 is zeroed, then data again (h2);
        // a run 8..10 takes the short last block.
        let size = 9 * 4096 + 100;
        let run = |first, count, at| ZeroRun {
            volume: 0,
            first,
            count,
            at,
        };
        let point = cat
            .commit_point(&NewPoint {
                server_id,
                created_ms: 1,
                source_ms: 2,
                consistency: "crash-consistent",
                commit: "sync",
                volumes: &[("root", 4096, size)],
                blocks: &[block(2, h1), block(3, h2)],
                zero_runs: &[run(1, 3, 1), run(8, 2, 2)],
                new_blocks: &[(h1, loc), (h2, loc)],
                packs: &[(1, 8192)],
                merge_sync: false,
            })
            .unwrap();
        let info = cat.points(Some("web1")).unwrap();
        assert_eq!(info[0].volumes[0].changed_bytes, 4 * 4096 + 100);
        let vol = cat.volume(server_id, "root").unwrap().unwrap();
        assert_eq!(
            cat.block_map(vol.id, point, 0).unwrap(),
            vec![(1, None), (2, None), (3, Some(h2)), (8, None), (9, None)]
        );
    }
}
