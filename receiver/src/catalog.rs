//! The catalog: servers, volumes, points and the block index, in SQLite (WAL,
//! synchronous=FULL) so that it stays readable with the `sqlite3` tool.
//!
//! ```text
//! meta(key, value)                         store_id, schema version
//! servers(id, name, cert_serial, revoked)  one row per enrolled server
//! volumes(id, server_id, name, block_size, size, staging_point)
//! points(id, server_id, created_ms, consistency, commit_mode)
//! point_volumes(point_id, volume_id, size, changed_blocks, changed_bytes)
//! point_blocks(volume_id, block_index, point_id, hash)   hash NULL = zero block
//! blocks(hash, pack_id, offset, stored_len, raw_len, encoding)
//! packs(id, committed_len)
//! ```
//!
//! A point stores only the blocks that changed since its parent (the previous
//! point of the same server). The content of block `i` of a volume at point
//! `P` is the row of `point_blocks` with the greatest `point_id <= P`; no row
//! means zeros.

use std::collections::HashSet;
use std::path::Path;

use pilotlight_protocol::{BlockHash, Encoding};
use rusqlite::{params, Connection, OptionalExtension};

use crate::pack::BlockLoc;
use crate::ReceiveError;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS servers(
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    cert_serial TEXT,
    revoked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS volumes(
    id INTEGER PRIMARY KEY,
    server_id INTEGER NOT NULL REFERENCES servers(id),
    name TEXT NOT NULL,
    block_size INTEGER NOT NULL,
    size INTEGER NOT NULL,
    staging_point INTEGER NOT NULL DEFAULT 0,
    UNIQUE(server_id, name));
CREATE TABLE IF NOT EXISTS points(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    server_id INTEGER NOT NULL REFERENCES servers(id),
    created_ms INTEGER NOT NULL,
    consistency TEXT NOT NULL,
    commit_mode TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS points_by_server ON points(server_id, id);
CREATE TABLE IF NOT EXISTS point_volumes(
    point_id INTEGER NOT NULL REFERENCES points(id),
    volume_id INTEGER NOT NULL REFERENCES volumes(id),
    size INTEGER NOT NULL,
    changed_blocks INTEGER NOT NULL,
    changed_bytes INTEGER NOT NULL,
    PRIMARY KEY(point_id, volume_id));
CREATE TABLE IF NOT EXISTS point_blocks(
    volume_id INTEGER NOT NULL,
    block_index INTEGER NOT NULL,
    point_id INTEGER NOT NULL,
    hash BLOB,
    PRIMARY KEY(volume_id, block_index, point_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS point_blocks_by_point ON point_blocks(point_id);
CREATE TABLE IF NOT EXISTS blocks(
    hash BLOB PRIMARY KEY,
    pack_id INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    stored_len INTEGER NOT NULL,
    raw_len INTEGER NOT NULL,
    encoding INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS packs(
    id INTEGER PRIMARY KEY,
    committed_len INTEGER NOT NULL);
";

/// A server row.
#[derive(Debug, Clone)]
pub struct ServerRow {
    /// Row id.
    pub id: i64,
    /// Server name.
    pub name: String,
    /// Serial (hex) of the identity currently allowed, if any.
    pub cert_serial: Option<String>,
    /// Whether the server's identity was revoked.
    pub revoked: bool,
}

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

/// A point with its volumes, as `points` lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PointInfo {
    /// Point id.
    pub id: i64,
    /// Server name.
    pub server: String,
    /// Creation time (RFC 3339).
    pub created: String,
    /// Creation time, milliseconds since the epoch.
    #[serde(skip)]
    pub created_ms: i64,
    /// `crash-consistent` or `fuzzy`.
    pub consistency: String,
    /// `sync` or `async`.
    pub commit: String,
    /// The volumes in the point.
    pub volumes: Vec<PointVolumeInfo>,
}

/// One volume of a point.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PointVolumeInfo {
    /// Volume name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Bytes of blocks that changed since the parent point.
    pub changed_bytes: u64,
    /// Volume row id.
    #[serde(skip)]
    pub volume_id: i64,
    /// Block size.
    #[serde(skip)]
    pub block_size: u32,
}

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

/// What a commit records.
pub struct NewPoint<'a> {
    /// Server row id.
    pub server_id: i64,
    /// Creation time.
    pub created_ms: i64,
    /// Consistency label.
    pub consistency: &'a str,
    /// Commit mode label.
    pub commit: &'a str,
    /// `(name, block size, size)` of each volume in the session, by session
    /// index. Volumes new to the catalog are created by the commit.
    pub volumes: &'a [(&'a str, u32, u64)],
    /// Changed blocks.
    pub blocks: &'a [BlockRef],
    /// Blocks first stored by this point.
    pub new_blocks: &'a [(BlockHash, BlockLoc)],
    /// `(pack id, committed length)` of packs written by this point.
    pub packs: &'a [(u64, u64)],
}

/// The catalog connection.
pub struct Catalog {
    conn: Connection,
}

fn hash_from_blob(blob: Option<Vec<u8>>) -> Result<Option<BlockHash>, rusqlite::Error> {
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

fn encoding_from_i64(v: i64) -> Result<Encoding, ReceiveError> {
    u8::try_from(v)
        .ok()
        .and_then(|v| Encoding::from_u8(v).ok())
        .ok_or_else(|| ReceiveError::Corrupt(format!("unknown block encoding {v} in catalog")))
}

/// SQLite page cache per connection, KiB.
const CACHE_KIB: i64 = 64 << 10;

impl Catalog {
    /// Open (creating if needed) the catalog at `path`.
    pub fn open(path: &Path) -> Result<Self, ReceiveError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Block rows are keyed by hash, so a point's inserts land all over
        // the tree: with SQLite's 2 MiB default, most of them read a page
        // back from the file first. 64 MiB holds the tree of a few million
        // blocks.
        conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self { conn })
    }

    /// The store id, created on first use.
    pub fn store_id(&mut self) -> Result<[u8; 16], ReceiveError> {
        let existing: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key='store_id'", [], |r| {
                r.get(0)
            })
            .optional()?;
        let hex = match existing {
            Some(h) => h,
            None => {
                let id: [u8; 16] = rand::random();
                let h = hex(&id);
                self.conn.execute(
                    "INSERT INTO meta(key, value) VALUES('store_id', ?1)",
                    params![h],
                )?;
                h
            }
        };
        let mut out = [0u8; 16];
        if hex.len() != 32 {
            return Err(ReceiveError::Corrupt(
                "store id in catalog is malformed".into(),
            ));
        }
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|_| ReceiveError::Corrupt("store id in catalog is malformed".into()))?;
        }
        Ok(out)
    }

    /// Record a newly enrolled identity for `name` (creating the server).
    pub fn set_identity(&mut self, name: &str, serial: &str) -> Result<(), ReceiveError> {
        self.conn.execute(
            "INSERT INTO servers(name, cert_serial, revoked) VALUES(?1, ?2, 0)
             ON CONFLICT(name) DO UPDATE SET cert_serial=excluded.cert_serial, revoked=0",
            params![name, serial],
        )?;
        Ok(())
    }

    /// Revoke the current identity of `name`.
    pub fn revoke(&mut self, name: &str) -> Result<bool, ReceiveError> {
        let n = self.conn.execute(
            "UPDATE servers SET revoked=1, cert_serial=NULL WHERE name=?1",
            params![name],
        )?;
        Ok(n > 0)
    }

    /// The server called `name`, or the error an operator sees when it does
    /// not exist.
    pub fn require_server(&self, name: &str) -> Result<ServerRow, ReceiveError> {
        self.server(name)?.ok_or_else(|| no_such_server(name))
    }

    /// The server called `name`, if it exists.
    pub fn server(&self, name: &str) -> Result<Option<ServerRow>, ReceiveError> {
        Ok(self
            .conn
            .query_row(
                "SELECT id, name, cert_serial, revoked FROM servers WHERE name=?1",
                params![name],
                |r| {
                    Ok(ServerRow {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        cert_serial: r.get(2)?,
                        revoked: r.get::<_, i64>(3)? != 0,
                    })
                },
            )
            .optional()?)
    }

    /// All servers, by name.
    pub fn servers(&self) -> Result<Vec<ServerRow>, ReceiveError> {
        let mut st = self
            .conn
            .prepare("SELECT id, name, cert_serial, revoked FROM servers ORDER BY name")?;
        let rows = st.query_map([], |r| {
            Ok(ServerRow {
                id: r.get(0)?,
                name: r.get(1)?,
                cert_serial: r.get(2)?,
                revoked: r.get::<_, i64>(3)? != 0,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

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

    /// The newest point of a server.
    pub fn latest_point(&self, server_id: i64) -> Result<Option<i64>, ReceiveError> {
        Ok(self.conn.query_row(
            "SELECT max(id) FROM points WHERE server_id=?1",
            params![server_id],
            |r| r.get(0),
        )?)
    }

    /// Record a point atomically; returns its id.
    pub fn commit_point(&mut self, p: &NewPoint<'_>) -> Result<i64, ReceiveError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO points(server_id, created_ms, consistency, commit_mode) VALUES(?1, ?2, ?3, ?4)",
            params![p.server_id, p.created_ms, p.consistency, p.commit],
        )?;
        let point_id = tx.last_insert_rowid();
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
        {
            let mut counts = vec![(0u64, 0u64); p.volumes.len()];
            // A block sent twice in one point (the agent's pre-copy, then
            // the frozen delta) is one changed block: the copy recorded
            // last wins, and it is counted once.
            let mut ins = tx.prepare_cached(
                "INSERT OR IGNORE INTO point_blocks(volume_id, block_index, point_id, hash) VALUES(?1, ?2, ?3, ?4)",
            )?;
            let mut again = tx.prepare_cached(
                "UPDATE point_blocks SET hash=?4 WHERE volume_id=?1 AND block_index=?2 AND point_id=?3",
            )?;
            for b in p.blocks {
                let Some(&(volume_id, _)) = ids.get(usize::from(b.volume)) else {
                    return Err(ReceiveError::Corrupt(format!(
                        "block refers to undeclared volume {}",
                        b.volume
                    )));
                };
                let row = params![
                    volume_id,
                    b.index as i64,
                    point_id,
                    b.hash.as_ref().map(|h| &h.0[..])
                ];
                if ins.execute(row)? == 0 {
                    again.execute(row)?;
                    continue;
                }
                if let Some(c) = counts.get_mut(usize::from(b.volume)) {
                    c.0 += 1;
                    c.1 += u64::from(b.raw_len);
                }
            }
            let mut pv = tx.prepare_cached(
                "INSERT INTO point_volumes(point_id, volume_id, size, changed_blocks, changed_bytes) VALUES(?1, ?2, ?3, ?4, ?5)",
            )?;
            let mut vs = tx.prepare_cached("UPDATE volumes SET size=?2 WHERE id=?1")?;
            for (&(volume_id, size), &(blocks, bytes)) in ids.iter().zip(&counts) {
                pv.execute(params![
                    point_id,
                    volume_id,
                    size as i64,
                    blocks as i64,
                    bytes as i64
                ])?;
                vs.execute(params![volume_id, size as i64])?;
            }
            let mut nb = tx.prepare_cached(
                // The newest copy wins: an older one may be on its way out
                // with garbage collection.
                "INSERT OR REPLACE INTO blocks(hash, pack_id, offset, stored_len, raw_len, encoding) VALUES(?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for (h, loc) in p.new_blocks {
                nb.execute(params![
                    &h.0[..],
                    loc.pack as i64,
                    loc.offset as i64,
                    loc.stored_len,
                    loc.raw_len,
                    loc.encoding as u8
                ])?;
            }
            let mut pk = tx.prepare_cached(
                "INSERT INTO packs(id, committed_len) VALUES(?1, ?2)
                 ON CONFLICT(id) DO UPDATE SET committed_len=max(committed_len, excluded.committed_len)",
            )?;
            for &(id, len) in p.packs {
                pk.execute(params![id as i64, len as i64])?;
            }
        }
        tx.commit()?;
        Ok(point_id)
    }

    /// Bytes in packs of the distinct blocks a server's points reference.
    pub fn stored_bytes(&self, server_id: i64) -> Result<u64, ReceiveError> {
        let n: Option<i64> = self.conn.query_row(
            "SELECT sum(b.stored_len) FROM blocks b WHERE b.hash IN
               (SELECT DISTINCT pb.hash FROM point_blocks pb JOIN volumes v ON v.id = pb.volume_id
                WHERE v.server_id = ?1 AND pb.hash IS NOT NULL)",
            params![server_id],
            |r| r.get(0),
        )?;
        Ok(n.unwrap_or(0).max(0) as u64)
    }

    /// Record that the staging image of a volume equals `point`.
    pub fn set_staging_point(&mut self, volume_id: i64, point: i64) -> Result<(), ReceiveError> {
        self.conn.execute(
            "UPDATE volumes SET staging_point=?2 WHERE id=?1",
            params![volume_id, point],
        )?;
        Ok(())
    }

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
                "SELECT pack_id, offset, stored_len, raw_len, encoding FROM blocks WHERE hash=?1",
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
        let mut st = self
            .conn
            .prepare("SELECT DISTINCT hash FROM point_blocks WHERE hash IS NOT NULL")?;
        let mut rows = st.query([])?;
        let mut out = HashSet::new();
        while let Some(r) = rows.next()? {
            if let Some(h) = hash_from_blob(Some(r.get(0)?))? {
                out.insert(h);
            }
        }
        Ok(out)
    }

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
            let mut pk = tx.prepare_cached(
                "INSERT INTO packs(id, committed_len) VALUES(?1, ?2)
                 ON CONFLICT(id) DO UPDATE SET committed_len=max(committed_len, excluded.committed_len)",
            )?;
            for &(id, len) in new_packs {
                pk.execute(params![id as i64, len as i64])?;
            }
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
    /// hashes are zero blocks).
    pub fn block_map(
        &self,
        volume_id: i64,
        point: i64,
        after: i64,
    ) -> Result<Vec<(u64, Option<BlockHash>)>, ReceiveError> {
        let mut st = self.conn.prepare_cached(
            "SELECT block_index, hash FROM point_blocks
             WHERE volume_id=?1 AND point_id<=?2 AND point_id>?3
             ORDER BY block_index ASC, point_id ASC",
        )?;
        // Primary-key order, so no sort: the last row of each index wins.
        let mut rows = st.query(params![volume_id, point, after])?;
        let mut out: Vec<(u64, Option<BlockHash>)> = Vec::new();
        while let Some(r) = rows.next()? {
            let index = r.get::<_, i64>(0)? as u64;
            let hash = hash_from_blob(r.get(1)?)?;
            match out.last_mut() {
                Some((i, h)) if *i == index => *h = hash,
                _ => out.push((index, hash)),
            }
        }
        Ok(out)
    }

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

    /// Points, newest last, optionally of one server only.
    pub fn points(&self, server: Option<&str>) -> Result<Vec<PointInfo>, ReceiveError> {
        let mut st = self.conn.prepare(
            "SELECT p.id, s.name, p.created_ms, p.consistency, p.commit_mode
             FROM points p JOIN servers s ON s.id = p.server_id
             WHERE ?1 IS NULL OR s.name = ?1 ORDER BY p.id",
        )?;
        let rows = st.query_map(params![server], |r| {
            Ok(PointInfo {
                id: r.get(0)?,
                server: r.get(1)?,
                created_ms: r.get(2)?,
                created: String::new(),
                consistency: r.get(3)?,
                commit: r.get(4)?,
                volumes: Vec::new(),
            })
        })?;
        let mut points: Vec<PointInfo> = rows.collect::<Result<_, _>>()?;
        let mut vst = self.conn.prepare_cached(
            "SELECT v.name, pv.size, pv.changed_bytes, v.id, v.block_size FROM point_volumes pv
             JOIN volumes v ON v.id = pv.volume_id WHERE pv.point_id=?1 ORDER BY v.name",
        )?;
        for p in &mut points {
            p.created = rfc3339(p.created_ms);
            let vols = vst.query_map(params![p.id], |r| {
                Ok(PointVolumeInfo {
                    name: r.get(0)?,
                    size: r.get::<_, i64>(1)? as u64,
                    changed_bytes: r.get::<_, i64>(2)? as u64,
                    volume_id: r.get(3)?,
                    block_size: r.get(4)?,
                })
            })?;
            p.volumes = vols.collect::<Result<_, _>>()?;
        }
        Ok(points)
    }
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

fn block_loc(
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

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// RFC 3339 (UTC) of milliseconds since the epoch.
pub fn rfc3339(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The error for a server name the receiver does not know.
pub fn no_such_server(name: &str) -> ReceiveError {
    ReceiveError::NotFound(format!("there is no server named {name} on this receiver"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
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
                consistency: "crash-consistent",
                commit: "sync",
                volumes: &[("root", 4096, 16 * 4096)],
                blocks: &[block(5, h1), block(6, h3), block(5, h2)],
                new_blocks: &[(h1, loc(0)), (h3, loc(5000)), (h2, loc(10000))],
                packs: &[(1, 15000)],
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
}
