//! The block index (`blocks`: where each stored block is), the committed
//! length of each pack (`packs`), and a volume's blocks at a point
//! (`point_blocks`).

use std::collections::HashSet;

use pilotlight_protocol::{BlockHash, Encoding};
use rusqlite::{params, Connection, OptionalExtension};

use super::Catalog;
use crate::pack::BlockLoc;
use crate::ReceiveError;

impl Catalog {
    /// Every stored block (hash and location), for the in-memory index.
    pub fn all_blocks(&self) -> Result<Vec<(BlockHash, BlockLoc)>, ReceiveError> {
        let mut st = self
            .conn
            .prepare("SELECT hash, pack_id, offset, stored_len, raw_len, encoding FROM blocks")?;
        let mut rows = st.query([])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let Some(h) = hash_from_blob(Some(r.get(0)?))? else {
                continue;
            };
            out.push((
                h,
                block_loc(r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)?,
            ));
        }
        Ok(out)
    }

    /// Where the block with `hash` is stored.
    pub fn block(&self, hash: &BlockHash) -> Result<Option<BlockLoc>, ReceiveError> {
        let row = self
            .conn
            .prepare_cached(
                // A block a garbage collection is deciding on is still
                // where it was.
                "SELECT pack_id, offset, stored_len, raw_len, encoding FROM blocks WHERE hash=?1
                 UNION ALL
                 SELECT pack_id, offset, stored_len, raw_len, encoding FROM gc_doomed WHERE hash=?1
                 LIMIT 1",
            )?
            .query_row(params![&hash.0[..]], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, u32>(2)?,
                    r.get::<_, u32>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })
            .optional()?;
        row.map(|(p, o, s, r, e)| block_loc(p, o, s, r, e))
            .transpose()
    }

    /// Every hash some point references.
    pub fn referenced_hashes(&self) -> Result<HashSet<BlockHash>, ReceiveError> {
        let mut st = self.conn.prepare(
            "SELECT hash FROM point_blocks WHERE hash IS NOT NULL
             UNION SELECT hash FROM sync_blocks WHERE hash IS NOT NULL",
        )?;
        let mut rows = st.query([])?;
        let mut out = HashSet::new();
        while let Some(r) = rows.next()? {
            if let Some(h) = hash_from_blob(Some(r.get(0)?))? {
                out.insert(h);
            }
        }
        Ok(out)
    }

    /// Committed length of every pack.
    pub fn packs(&self) -> Result<Vec<(u64, u64)>, ReceiveError> {
        let mut st = self.conn.prepare("SELECT id, committed_len FROM packs")?;
        let rows = st.query_map([], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Block contents of a volume at point `point`: `(index, hash)` in index
    /// order for every block that has a row (absent blocks are zeros; `None`
    /// hashes are zero blocks). Only the rows of points after `after` count
    /// (0: all of them).
    pub fn block_map(
        &self,
        volume_id: i64,
        point: i64,
        after: i64,
    ) -> Result<Vec<(u64, Option<BlockHash>)>, ReceiveError> {
        let mut st = self.conn.prepare_cached(
            "SELECT block_index, hash FROM point_blocks
             WHERE volume_id=?1 AND point_id<=?2 AND point_id>?3
             ORDER BY point_id ASC, block_index ASC",
        )?;
        // Primary-key order (schema version 8: by point, then index), so no
        // sort in SQLite: each point's rows are a run sorted by index.
        let mut rows = st.query(params![volume_id, point, after])?;
        let mut out: Vec<(u64, Option<BlockHash>)> = Vec::new();
        while let Some(r) = rows.next()? {
            let index = r.get::<_, i64>(0)? as u64;
            out.push((index, hash_from_ref(r.get_ref(1)?)?));
        }
        // A stable sort merges the runs and keeps, within an index, the
        // order of the points: the last row of each index is the newest.
        out.sort_by_key(|(i, _)| *i);
        out.reverse();
        out.dedup_by_key(|(i, _)| *i);
        out.reverse();
        Ok(out)
    }
}

/// Record `(pack id, committed length)` of packs written, inside the
/// caller's transaction; a pack's committed length only grows.
pub(super) fn record_packs(tx: &Connection, packs: &[(u64, u64)]) -> Result<(), ReceiveError> {
    let mut pk = tx.prepare_cached(
        "INSERT INTO packs(id, committed_len) VALUES(?1, ?2)
                 ON CONFLICT(id) DO UPDATE SET committed_len=max(committed_len, excluded.committed_len)",
    )?;
    for &(id, len) in packs {
        pk.execute(params![id as i64, len as i64])?;
    }
    Ok(())
}

pub(super) fn hash_from_blob(blob: Option<Vec<u8>>) -> Result<Option<BlockHash>, rusqlite::Error> {
    match blob {
        None => Ok(None),
        Some(b) => {
            let arr: [u8; 32] = b.try_into().map_err(|_| {
                rusqlite::Error::FromSqlConversionFailure(
                    3,
                    rusqlite::types::Type::Blob,
                    "block hash is not 32 bytes".into(),
                )
            })?;
            Ok(Some(BlockHash(arr)))
        }
    }
}

/// A hash column read in place (no copy of the blob per row).
pub(super) fn hash_from_ref(
    v: rusqlite::types::ValueRef<'_>,
) -> Result<Option<BlockHash>, rusqlite::Error> {
    match v {
        rusqlite::types::ValueRef::Null => Ok(None),
        rusqlite::types::ValueRef::Blob(b) => {
            let arr: [u8; 32] = b.try_into().map_err(|_| {
                rusqlite::Error::FromSqlConversionFailure(
                    1,
                    rusqlite::types::Type::Blob,
                    "block hash is not 32 bytes".into(),
                )
            })?;
            Ok(Some(BlockHash(arr)))
        }
        other => Err(rusqlite::Error::FromSqlConversionFailure(
            1,
            other.data_type(),
            "block hash is not a blob".into(),
        )),
    }
}

fn encoding_from_i64(v: i64) -> Result<Encoding, ReceiveError> {
    u8::try_from(v)
        .ok()
        .and_then(|v| Encoding::from_u8(v).ok())
        .ok_or_else(|| ReceiveError::Corrupt(format!("unknown block encoding {v} in catalog")))
}

pub(super) fn block_loc(
    pack: i64,
    offset: i64,
    stored_len: u32,
    raw_len: u32,
    encoding: i64,
) -> Result<BlockLoc, ReceiveError> {
    Ok(BlockLoc {
        pack: pack as u64,
        offset: offset as u64,
        stored_len,
        raw_len,
        encoding: encoding_from_i64(encoding)?,
    })
}
