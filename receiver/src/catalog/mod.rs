//! The catalog: servers, volumes, points and the block index, in SQLite (WAL,
//! synchronous=FULL) so that it stays readable with the `sqlite3` tool.
//!
//! ```text
//! meta(key, value)                         store_id
//! servers(id, name, cert_serial, revoked)  one row per enrolled server
//! volumes(id, server_id, name, block_size, size, staging_point)
//! points(id, server_id, created_ms, consistency, commit_mode)
//! point_volumes(point_id, volume_id, size, changed_blocks, changed_bytes)
//! point_blocks(volume_id, block_index, point_id, hash)   hash NULL = zero block
//! blocks(hash, pack_id, offset, stored_len, raw_len, encoding)
//! packs(id, committed_len)
//! server_blocks(server_id, hash)           the blocks each server has stored
//! restore_grants(server_id, from_server_id, granted_ms)  who may restore whose volumes
//! syncs(server_id, sync_id, generation, ..) a server's in-progress full sync
//! sync_blocks(server_id, volume, block_index, hash, raw_len)   its blocks
//! gc_doomed(pack_id, hash, ..)             blocks a collection took out of the index
//! journal(id, tbl, k1..k4)                 rows changed since the object store last had them
//! ```
//!
//! The block index is `blocks` (by hash) and `server_blocks` itself, looked
//! up through [`BlockIndex`] (its own reader connections, a bounded cache);
//! commits go through [`Group`] (one transaction for the commits waiting
//! at the same time).
//!
//! The schema version is SQLite's `PRAGMA user_version`: see
//! [`SCHEMA_VERSION`].
//!
//! A point stores only the blocks that changed since its parent (the previous
//! point of the same server). The content of block `i` of a volume at point
//! `P` is the row of `point_blocks` with the greatest `point_id <= P`; no row
//! means zeros.
//!
//! [`Catalog`] is one connection. Its methods live beside the tables they
//! touch: `schema.rs` (tables and version), `identities.rs` (servers),
//! `volumes.rs`, `points.rs` (a point's commit), `group.rs` (group
//! commit), `wal.rs` (WAL checkpoints off the commit path), `index.rs` (block lookups and their cache), `blocks.rs` (block
//! rows, packs, block maps), `gc.rs` (garbage collection by SQL), `prune.rs`
//! (deleting a point), `server_blocks.rs` (what each server has stored: the
//! scope of deduplication and of quotas), `grants.rs` (who may restore whose
//! volumes) and `report.rs` (listing points).

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use crate::ReceiveError;

mod blocks;
mod gc;
mod grants;
mod group;
mod identities;
mod index;
mod points;
mod prune;
mod report;
mod schema;
mod server_blocks;
mod syncs;
mod volumes;
mod wal;

pub use gc::PackBlocks;
pub use grants::RestoreGrant;
pub use group::Group;
pub use identities::{no_such_server, ServerRow};
pub use index::{BlockIndex, DEFAULT_CACHE_ENTRIES};
pub use points::{BlockRef, NewPoint, ZeroRun};
pub use report::{PointInfo, PointVolumeInfo};
pub use schema::SCHEMA_VERSION;
pub use syncs::{volumes_signature, NewCheckpoint, SyncRow};
pub use volumes::VolumeRow;

/// The catalog connection.
pub struct Catalog {
    conn: Connection,
    /// The checkpoint thread, when this connection leaves checkpoints to
    /// it (see `wal.rs`).
    wal: Option<wal::Wal>,
}

/// SQLite page cache per connection, KiB.
const CACHE_KIB: i64 = 64 << 10;

impl Catalog {
    /// Open (creating if needed) the catalog at `path`.
    ///
    /// A catalog written by a newer receiver (a greater schema version) is
    /// refused with [`ReceiveError::CatalogTooNew`] before anything in it
    /// changes.
    ///
    /// A new catalog file is created 0600 whatever the umask; SQLite gives
    /// its `-wal` and `-shm` files the mode of the database file.
    pub fn open(path: &Path) -> Result<Self, ReceiveError> {
        create_private(path)?;
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        schema::check_version(&conn)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Block rows are keyed by hash, so a point's inserts land all over
        // the tree: with SQLite's 2 MiB default, most of them read a page
        // back from the file first. 64 MiB holds the tree of a few million
        // blocks.
        conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
        schema::create(&conn)?;
        Ok(Self { conn, wal: None })
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
            *o = hex
                .get(2 * i..2 * i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .ok_or_else(|| ReceiveError::Corrupt("store id in catalog is malformed".into()))?;
        }
        Ok(out)
    }
}

impl Catalog {
    /// Run `f` as one atomic write: its own `IMMEDIATE` transaction, or a
    /// savepoint inside the transaction already open (a group commit's,
    /// see [`Group`]). An error rolls back what `f` wrote.
    pub(crate) fn atomically<T>(
        &mut self,
        f: impl FnOnce(&Connection) -> Result<T, ReceiveError>,
    ) -> Result<T, ReceiveError> {
        if self.conn.is_autocommit() {
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let v = f(&tx)?;
            tx.commit()?;
            self.nudge_checkpoint();
            Ok(v)
        } else {
            let sp = self.conn.savepoint()?;
            let v = f(&sp)?;
            sp.commit()?;
            Ok(v)
        }
    }
}

/// Create `path` empty with mode 0600 if nothing is there (SQLite would
/// create it as the umask allows).
fn create_private(path: &Path) -> Result<(), ReceiveError> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(crate::store::PRIVATE_FILE_MODE)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(ReceiveError::storage(path, e)),
    }
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
