//! The `volumes` table: each server's volumes, their size at the latest
//! point and the point their staging image equals; and what a change of
//! size does to a volume's block rows.
//!
//! # Shrink then grow
//!
//! A point that shrinks a volume ends the rows beyond its new size: for
//! every block index past the new end whose newest row holds data, the
//! point records a zero row (`hash` NULL). When the volume grows again, the
//! tail reads as zeros unless the agent sends data for it, as it does on
//! the source (a file or device grown back reads zeros there). Without
//! those rows, the old rows would show through and a restore of a later
//! point would return pre-shrink data. Prune folds the zero rows into the
//! next point like any other row, so they outlive the point that wrote
//! them.

use pilotlight_protocol::limits::block_count;
use rusqlite::{params, Connection, OptionalExtension};

use super::Catalog;
use crate::ReceiveError;

/// A volume row.
#[derive(Debug, Clone)]
pub struct VolumeRow {
    /// Row id.
    pub id: i64,
    /// Volume name.
    pub name: String,
    /// Block size.
    pub block_size: u32,
    /// Size at the latest point.
    pub size: u64,
    /// The point the staging image is known to equal.
    pub staging_point: i64,
}

impl Catalog {
    /// The volume `name` of server `server_id`.
    pub fn volume(&self, server_id: i64, name: &str) -> Result<Option<VolumeRow>, ReceiveError> {
        Ok(self
            .conn
            .query_row(
                "SELECT id, name, block_size, size, staging_point FROM volumes WHERE server_id=?1 AND name=?2",
                params![server_id, name],
                volume_row,
            )
            .optional()?)
    }

    /// All volumes of a server.
    pub fn volumes(&self, server_id: i64) -> Result<Vec<VolumeRow>, ReceiveError> {
        let mut st = self.conn.prepare(
            "SELECT id, name, block_size, size, staging_point FROM volumes WHERE server_id=?1 ORDER BY name",
        )?;
        let rows = st.query_map(params![server_id], volume_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Check a declared volume against the catalog: the block size of an
    /// existing volume is fixed. Creates nothing (the first commit does).
    pub fn check_volume(
        &self,
        server_id: i64,
        name: &str,
        block_size: u32,
    ) -> Result<(), ReceiveError> {
        if let Some(v) = self.volume(server_id, name)? {
            if v.block_size != block_size {
                return Err(ReceiveError::Protocol(format!(
                    "volume {name} has block size {} on this receiver; the agent declared {block_size}",
                    v.block_size
                )));
            }
        }
        Ok(())
    }

    /// Record that the staging image of a volume equals `point`.
    pub fn set_staging_point(&mut self, volume_id: i64, point: i64) -> Result<(), ReceiveError> {
        self.conn.execute(
            "UPDATE volumes SET staging_point=?2 WHERE id=?1",
            params![volume_id, point],
        )?;
        Ok(())
    }
}

/// End the rows beyond the new size of every volume of the point being
/// committed whose size changed (see the module docs), inside the caller's
/// transaction. `volumes` is `(name, block size, size)` of each session
/// volume and `ids` its `(row id, size)`, both by session index; call it
/// after the point's own rows are recorded (they are kept) and before the
/// volumes' sizes are updated (the old size is read from there).
pub(super) fn end_rows_beyond_resizes(
    tx: &Connection,
    point_id: i64,
    volumes: &[(&str, u32, u64)],
    ids: &[(i64, u64)],
) -> Result<(), ReceiveError> {
    for (&(_, block_size, size), &(volume_id, _)) in volumes.iter().zip(ids) {
        let before: i64 = tx.query_row(
            "SELECT size FROM volumes WHERE id=?1",
            params![volume_id],
            |r| r.get(0),
        )?;
        let before = before as u64;
        if before == size {
            continue;
        }
        // On a grow, rows past the old end can only be rows an earlier
        // shrink left (a catalog written before shrinks ended them): end
        // those too, keeping the ones this point wrote.
        let from = block_count(before.min(size), block_size);
        end_rows_from(tx, volume_id, point_id, from)?;
    }
    Ok(())
}

/// Record zero rows at `point_id` for every block of the volume from index
/// `from` on whose newest earlier row holds data. Returns how many.
fn end_rows_from(
    tx: &Connection,
    volume_id: i64,
    point_id: i64,
    from: u64,
) -> Result<usize, ReceiveError> {
    // SQLite takes the bare `hash` from the row of max(point_id).
    let n = tx.execute(
        "INSERT OR IGNORE INTO point_blocks(volume_id, block_index, point_id, hash)
         SELECT ?1, block_index, ?3, NULL FROM (
             SELECT block_index, hash, max(point_id) FROM point_blocks
             WHERE volume_id=?1 AND block_index>=?2 AND point_id<?3
             GROUP BY block_index)
         WHERE hash IS NOT NULL",
        params![volume_id, from as i64, point_id],
    )?;
    Ok(n)
}

fn volume_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<VolumeRow> {
    Ok(VolumeRow {
        id: r.get(0)?,
        name: r.get(1)?,
        block_size: r.get(2)?,
        size: r.get::<_, i64>(3)? as u64,
        staging_point: r.get(4)?,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use pilotlight_protocol::{BlockHash, Encoding};

    use super::*;
    use crate::catalog::{BlockRef, NewPoint};
    use crate::pack::BlockLoc;

    const BS: u32 = 4096;

    /// Commit a point of volume "root" at `blocks` blocks (plus `tail`
    /// bytes) with block `i` holding hash `[b; 32]` for each `(i, b)`.
    fn commit(cat: &mut Catalog, server_id: i64, size: u64, data: &[(u64, u8)]) -> i64 {
        let blocks: Vec<BlockRef> = data
            .iter()
            .map(|&(index, b)| BlockRef {
                volume: 0,
                index,
                raw_len: BS,
                hash: Some(BlockHash([b; 32])),
            })
            .collect();
        let new_blocks: Vec<(BlockHash, BlockLoc)> = data
            .iter()
            .map(|&(_, b)| {
                let loc = BlockLoc {
                    pack: 1,
                    offset: u64::from(b) * 8192,
                    stored_len: BS,
                    raw_len: BS,
                    encoding: Encoding::Raw,
                };
                (BlockHash([b; 32]), loc)
            })
            .collect();
        cat.commit_point(&NewPoint {
            server_id,
            created_ms: 1,
            source_ms: 1,
            consistency: "crash-consistent",
            commit: "sync",
            volumes: &[("root", BS, size)],
            blocks: &blocks,
            zero_runs: &[],
            new_blocks: &new_blocks,
            merge_sync: false,
            packs: &[(1, 1 << 20)],
        })
        .unwrap()
    }

    fn at(cat: &Catalog, vol: i64, point: i64) -> Vec<(u64, Option<u8>)> {
        hashes(cat.block_map(vol, point, 0).unwrap())
    }

    fn hashes(map: Vec<(u64, Option<BlockHash>)>) -> Vec<(u64, Option<u8>)> {
        map.into_iter()
            .map(|(i, h)| (i, h.map(|h| h.0[0])))
            .collect()
    }

    #[test]
    fn a_shrink_ends_the_rows_beyond_and_a_grow_reads_zeros_there() {
        let dir = tempfile::tempdir().unwrap();
        let mut cat = Catalog::open(&dir.path().join("catalog.db")).unwrap();
        cat.set_identity("web1", "01").unwrap();
        let server = cat.require_server("web1").unwrap().id;
        let full = 8 * u64::from(BS);
        let p1 = commit(&mut cat, server, full, &[(1, 1), (4, 4), (6, 6), (7, 7)]);
        let vol = cat.volume(server, "root").unwrap().unwrap().id;
        // Shrink to 4.5 blocks: block 4 (now short) is resent, 6 and 7 end.
        let p2 = commit(&mut cat, server, 4 * u64::from(BS) + 100, &[(4, 40)]);
        // Grow back: the agent sends block 7 only.
        let p3 = commit(&mut cat, server, full, &[(7, 70)]);

        assert_eq!(
            at(&cat, vol, p1),
            [(1, Some(1)), (4, Some(4)), (6, Some(6)), (7, Some(7))]
        );
        assert_eq!(
            at(&cat, vol, p2),
            [(1, Some(1)), (4, Some(40)), (6, None), (7, None)]
        );
        assert_eq!(
            at(&cat, vol, p3),
            [(1, Some(1)), (4, Some(40)), (6, None), (7, Some(70))]
        );
        // The zero rows count as no change of the point.
        let info = cat.points(Some("web1")).unwrap();
        assert_eq!(info[1].volumes[0].changed_bytes, u64::from(BS));

        // A second shrink ends only what holds data again; pruning the
        // shrink point keeps later points as they were.
        let p4 = commit(&mut cat, server, 2 * u64::from(BS), &[]);
        assert_eq!(
            at(&cat, vol, p4),
            [(1, Some(1)), (4, None), (6, None), (7, None)]
        );
        cat.delete_point(server, p2).unwrap();
        assert_eq!(
            at(&cat, vol, p3),
            [(1, Some(1)), (4, Some(40)), (6, None), (7, Some(70))]
        );
    }

    #[test]
    fn a_grow_ends_rows_an_earlier_unended_shrink_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let mut cat = Catalog::open(&path).unwrap();
        cat.set_identity("web1", "01").unwrap();
        let server = cat.require_server("web1").unwrap().id;
        commit(&mut cat, server, 8 * u64::from(BS), &[(6, 6)]);
        let vol = cat.volume(server, "root").unwrap().unwrap().id;
        // As a receiver without this fix left a shrink: the size changed,
        // the rows beyond stayed.
        let p2 = commit(&mut cat, server, 2 * u64::from(BS), &[]);
        cat.conn
            .execute("DELETE FROM point_blocks WHERE point_id=?1", params![p2])
            .unwrap();
        let p3 = commit(&mut cat, server, 8 * u64::from(BS), &[(7, 70)]);
        assert_eq!(
            hashes(cat.block_map(vol, p3, 0).unwrap()),
            [(6, None), (7, Some(70))]
        );
    }
}
