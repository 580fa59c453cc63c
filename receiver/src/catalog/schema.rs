//! The catalog's tables and their version, kept in SQLite's
//! `PRAGMA user_version`.
//!
//! Version 0 is a catalog made before the version was recorded: when it has
//! our tables, they are those of version 1. Opening an older catalog
//! upgrades it in place, in one transaction, and stamps the version. A
//! catalog with a greater version than [`SCHEMA_VERSION`] was written by a
//! newer receiver and is refused before anything in it changes.
//!
//! | version | change |
//! |---|---|
//! | 1 | the tables below, without `points.source_ms` |
//! | 2 | `points.created_ms` is the receiver's clock at the commit; the agent's time moves to the new `points.source_ms` (old rows: `source_ms = created_ms`, the only time they have) |
//! | 3 | new table `server_blocks(server_id, hash)`: the blocks each server has stored (dedup is scoped per server, quotas charge by it); filled from the block maps of the existing points |
//! | 4 | `points.seq`: each server numbers its own points 1, 2, 3, ... (what agents and operators see as the point's id, so that no server learns another's commit rate from the ids); old rows are numbered in commit order |
//! | 5 | new table `restore_grants(server_id, from_server_id, granted_ms)`: which server may restore which other server's volumes over the network (`grant --restore-from`); created empty |
//! | 6 | new tables `syncs` and `sync_blocks`: a server's in-progress full sync, durable at each checkpoint, not a point (see `syncs.rs`); created empty |
//! | 7 | new table `journal(id, tbl, k1..k4)`: the keys of catalog rows changed since they last went to the object store, written by triggers that `objstore::journal` installs only in a directory with a `[store]` (see there); created empty |
//! | 8 | `point_blocks` keyed by `(volume_id, point_id, block_index)` (was `(volume_id, block_index, point_id)`): a point's rows are one run, written in a few pages, instead of a page per changed block among its volume's rows (the table is rebuilt); new table `gc_doomed`: blocks a garbage collection took out of the block index until it decides (created empty; a receiver that starts to serve puts any left back); new index `blocks_by_pack` (a pack's blocks without a scan of `blocks`) |
//! | 9 | new table `store_deferred(pack, due_ms)`: packs garbage collection removed whose objects in the bucket are still under S3 Object Lock retention (`[store] object_lock_days`) until `due_ms`; deleted from the bucket, and from the table, once due (see `objstore::lock`); created empty |

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior};

use crate::ReceiveError;

/// The schema version this receiver reads and writes. Raise it with every
/// change to the tables below, and teach `create` to upgrade the older
/// versions.
pub const SCHEMA_VERSION: i64 = 9;

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
    commit_mode TEXT NOT NULL,
    source_ms INTEGER NOT NULL DEFAULT 0,
    seq INTEGER NOT NULL DEFAULT 0);
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
    PRIMARY KEY(volume_id, point_id, block_index)) WITHOUT ROWID;
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
CREATE TABLE IF NOT EXISTS server_blocks(
    server_id INTEGER NOT NULL REFERENCES servers(id),
    hash BLOB NOT NULL,
    PRIMARY KEY(server_id, hash)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS restore_grants(
    server_id INTEGER NOT NULL REFERENCES servers(id),
    from_server_id INTEGER NOT NULL REFERENCES servers(id),
    granted_ms INTEGER NOT NULL,
    PRIMARY KEY(server_id, from_server_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS syncs(
    server_id INTEGER PRIMARY KEY REFERENCES servers(id),
    sync_id INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    base_seq INTEGER NOT NULL,
    started_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    done_bytes INTEGER NOT NULL,
    total_bytes INTEGER NOT NULL,
    volumes TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sync_blocks(
    server_id INTEGER NOT NULL,
    volume INTEGER NOT NULL,
    block_index INTEGER NOT NULL,
    hash BLOB,
    raw_len INTEGER NOT NULL,
    PRIMARY KEY(server_id, volume, block_index)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS journal(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tbl TEXT NOT NULL,
    k1, k2, k3, k4);
CREATE TABLE IF NOT EXISTS gc_doomed(
    pack_id INTEGER NOT NULL,
    hash BLOB NOT NULL,
    offset INTEGER NOT NULL,
    stored_len INTEGER NOT NULL,
    raw_len INTEGER NOT NULL,
    encoding INTEGER NOT NULL,
    PRIMARY KEY(pack_id, hash)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blocks_by_pack ON blocks(pack_id);
CREATE TABLE IF NOT EXISTS store_deferred(
    pack INTEGER PRIMARY KEY,
    due_ms INTEGER NOT NULL);
";

/// The version recorded in the file (0 when none is).
fn version(conn: &Connection) -> Result<i64, ReceiveError> {
    Ok(conn.pragma_query_value(None, "user_version", |r| r.get(0))?)
}

/// Refuse a catalog this receiver cannot read: one written by a newer
/// receiver, or one whose version is not a version at all.
pub(super) fn check_version(conn: &Connection) -> Result<(), ReceiveError> {
    match version(conn)? {
        found if found > SCHEMA_VERSION => Err(ReceiveError::CatalogTooNew {
            found,
            supported: SCHEMA_VERSION,
        }),
        found if found < 0 => Err(ReceiveError::Corrupt(format!(
            "catalog schema version {found} is not a valid version"
        ))),
        _ => Ok(()),
    }
}

/// Create the tables that do not exist yet, upgrade an older catalog and
/// record the version.
pub(super) fn create(conn: &Connection) -> Result<(), ReceiveError> {
    conn.execute_batch(SCHEMA)?;
    if version(conn)? >= SCHEMA_VERSION {
        return Ok(());
    }
    // One transaction, taken for writing before anything is read: another
    // receiver process opening the same old catalog waits, then finds it
    // upgraded.
    let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    let from = version(&tx)?;
    if from < SCHEMA_VERSION {
        if from < 2 {
            upgrade_to_2(&tx)?;
        }
        if from < 3 {
            upgrade_to_3(&tx)?;
        }
        if from < 4 {
            upgrade_to_4(&tx)?;
        }
        if from < 8 {
            upgrade_to_8(&tx)?;
        }
        // Version 5 adds `restore_grants`, version 6 (resumable syncs)
        // `syncs` and `sync_blocks`, version 7 `journal`, version 8
        // `gc_doomed` and the index `blocks_by_pack`, version 9
        // `store_deferred`: all of `SCHEMA`, created above (the index over
        // the existing rows).
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    }
    tx.commit()?;
    Ok(())
}

/// Whether the `points` table has the column `name` (a fresh file is
/// created with every column; an older one gets them by its upgrades).
fn points_has(conn: &Connection, name: &str) -> Result<bool, ReceiveError> {
    Ok(conn.query_row(
        "SELECT count(*) > 0 FROM pragma_table_info('points') WHERE name=?1",
        [name],
        |r| r.get(0),
    )?)
}

/// Version 1 to 2: the agent's time of each point in `source_ms`. A
/// version-1 row's `created_ms` is the agent's time, the only one known, so
/// it is both. (A fresh file already has the column.)
fn upgrade_to_2(conn: &Connection) -> Result<(), ReceiveError> {
    if !points_has(conn, "source_ms")? {
        conn.execute_batch(
            "ALTER TABLE points ADD COLUMN source_ms INTEGER NOT NULL DEFAULT 0;
             UPDATE points SET source_ms = created_ms;",
        )?;
    }
    Ok(())
}

/// Version 2 to 3: `server_blocks` (created empty by [`SCHEMA`]) gets a
/// row for every block some point of a server references: what each server
/// has stored so far. (A fresh file has no points: nothing to fill.)
fn upgrade_to_3(conn: &Connection) -> Result<(), ReceiveError> {
    conn.execute_batch(
        "INSERT OR IGNORE INTO server_blocks(server_id, hash)
           SELECT DISTINCT v.server_id, pb.hash
           FROM point_blocks pb JOIN volumes v ON v.id = pb.volume_id
           WHERE pb.hash IS NOT NULL;",
    )?;
    Ok(())
}

/// Version 3 to 4: number each server's points 1, 2, 3, ... in commit
/// order, and make the number unique per server. (A fresh file has the
/// column and no points.)
fn upgrade_to_4(conn: &Connection) -> Result<(), ReceiveError> {
    if !points_has(conn, "seq")? {
        conn.execute_batch("ALTER TABLE points ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;")?;
    }
    conn.execute_batch(
        "UPDATE points SET seq = (SELECT count(*) FROM points q
                                  WHERE q.server_id = points.server_id AND q.id <= points.id)
           WHERE seq = 0;
         CREATE UNIQUE INDEX IF NOT EXISTS points_by_seq ON points(server_id, seq);",
    )?;
    Ok(())
}

/// Version 7 to 8: `point_blocks` keyed by point before block index, the
/// rows copied over. (A fresh file has the new key already.)
fn upgrade_to_8(conn: &Connection) -> Result<(), ReceiveError> {
    let second: Option<String> = conn
        .query_row(
            "SELECT name FROM pragma_index_info('sqlite_autoindex_point_blocks_1') WHERE seqno = 1",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if second.as_deref() != Some("block_index") {
        return Ok(());
    }
    conn.execute_batch(
        "CREATE TABLE point_blocks_v8(
             volume_id INTEGER NOT NULL,
             block_index INTEGER NOT NULL,
             point_id INTEGER NOT NULL,
             hash BLOB,
             PRIMARY KEY(volume_id, point_id, block_index)) WITHOUT ROWID;
         INSERT INTO point_blocks_v8(volume_id, block_index, point_id, hash)
             SELECT volume_id, block_index, point_id, hash FROM point_blocks;
         DROP TABLE point_blocks;
         ALTER TABLE point_blocks_v8 RENAME TO point_blocks;
         CREATE INDEX point_blocks_by_point ON point_blocks(point_id);",
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use pilotlight_protocol::BlockHash;

    use super::*;
    use crate::catalog::Catalog;

    fn user_version(path: &std::path::Path) -> i64 {
        version(&Connection::open(path).unwrap()).unwrap()
    }

    #[test]
    fn a_new_catalog_records_the_current_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        Catalog::open(&path).unwrap();
        assert_eq!(user_version(&path), SCHEMA_VERSION);
    }

    #[test]
    fn a_catalog_without_a_version_is_the_current_one_and_is_stamped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let mut cat = Catalog::open(&path).unwrap();
        let id = cat.store_id().unwrap();
        cat.set_identity("web1", "01").unwrap();
        drop(cat);
        // As a receiver made before the version was recorded left it.
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 0)
            .unwrap();
        assert_eq!(user_version(&path), 0);

        let mut cat = Catalog::open(&path).unwrap();
        assert_eq!(user_version(&path), SCHEMA_VERSION);
        assert_eq!(cat.store_id().unwrap(), id);
        assert!(cat.server("web1").unwrap().is_some());
    }

    /// The tables of version 1 as that receiver created them (the fixture of
    /// the upgrade: do not edit), with a point of each server.
    const VERSION_1: &str = "
        CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE servers(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
            cert_serial TEXT, revoked INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE points(id INTEGER PRIMARY KEY AUTOINCREMENT,
            server_id INTEGER NOT NULL REFERENCES servers(id),
            created_ms INTEGER NOT NULL, consistency TEXT NOT NULL,
            commit_mode TEXT NOT NULL);
        CREATE INDEX points_by_server ON points(server_id, id);
        INSERT INTO servers(id, name) VALUES(1, 'web1'), (2, 'db2');
        INSERT INTO points(server_id, created_ms, consistency, commit_mode)
            VALUES(1, 1764460800000, 'crash-consistent', 'sync'),
                  (2, 86400000, 'fuzzy', 'async');
        PRAGMA user_version = 1;";

    #[test]
    fn a_version_1_catalog_is_upgraded_in_place() {
        for stamped in [1, 0] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("catalog.db");
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(VERSION_1).unwrap();
            conn.pragma_update(None, "user_version", stamped).unwrap();
            drop(conn);

            let cat = Catalog::open(&path).unwrap();
            assert_eq!(user_version(&path), SCHEMA_VERSION);
            let points = cat.points(None).unwrap();
            let times: Vec<(i64, i64, &str)> = points
                .iter()
                .map(|p| (p.created_ms, p.source_ms, p.source_time.as_str()))
                .collect();
            assert_eq!(
                times,
                vec![
                    (1764460800000, 1764460800000, "2025-11-30T00:00:00Z"),
                    (86400000, 86400000, "1970-01-02T00:00:00Z"),
                ]
            );
            drop(cat);
            // A second open finds it current and changes nothing.
            Catalog::open(&path).unwrap();
            assert_eq!(user_version(&path), SCHEMA_VERSION);
        }
    }

    /// The tables of version 2 as that receiver created them (the fixture of
    /// the upgrade to 3: do not edit): two servers, each with points whose
    /// block maps share block 0xaa and hold blocks of their own, a zero
    /// block, and a block one point of `web1` replaced later.
    const VERSION_2: &str = "
        CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE servers(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
            cert_serial TEXT, revoked INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE volumes(id INTEGER PRIMARY KEY,
            server_id INTEGER NOT NULL REFERENCES servers(id), name TEXT NOT NULL,
            block_size INTEGER NOT NULL, size INTEGER NOT NULL,
            staging_point INTEGER NOT NULL DEFAULT 0, UNIQUE(server_id, name));
        CREATE TABLE points(id INTEGER PRIMARY KEY AUTOINCREMENT,
            server_id INTEGER NOT NULL REFERENCES servers(id),
            created_ms INTEGER NOT NULL, consistency TEXT NOT NULL,
            commit_mode TEXT NOT NULL, source_ms INTEGER NOT NULL DEFAULT 0);
        CREATE INDEX points_by_server ON points(server_id, id);
        CREATE TABLE point_volumes(point_id INTEGER NOT NULL REFERENCES points(id),
            volume_id INTEGER NOT NULL REFERENCES volumes(id), size INTEGER NOT NULL,
            changed_blocks INTEGER NOT NULL, changed_bytes INTEGER NOT NULL,
            PRIMARY KEY(point_id, volume_id));
        CREATE TABLE point_blocks(volume_id INTEGER NOT NULL,
            block_index INTEGER NOT NULL, point_id INTEGER NOT NULL, hash BLOB,
            PRIMARY KEY(volume_id, block_index, point_id)) WITHOUT ROWID;
        CREATE INDEX point_blocks_by_point ON point_blocks(point_id);
        CREATE TABLE blocks(hash BLOB PRIMARY KEY, pack_id INTEGER NOT NULL,
            offset INTEGER NOT NULL, stored_len INTEGER NOT NULL,
            raw_len INTEGER NOT NULL, encoding INTEGER NOT NULL) WITHOUT ROWID;
        CREATE TABLE packs(id INTEGER PRIMARY KEY, committed_len INTEGER NOT NULL);
        INSERT INTO servers(id, name) VALUES(1, 'web1'), (2, 'db2'), (3, 'idle');
        INSERT INTO volumes(id, server_id, name, block_size, size)
            VALUES(1, 1, 'root', 4096, 16384), (2, 1, 'data', 4096, 8192),
                  (3, 2, 'root', 4096, 16384);
        INSERT INTO points(id, server_id, created_ms, consistency, commit_mode, source_ms)
            VALUES(1, 1, 1000, 'fuzzy', 'sync', 1000), (2, 2, 2000, 'fuzzy', 'sync', 2000),
                  (3, 1, 3000, 'fuzzy', 'sync', 3000);
        INSERT INTO point_blocks(volume_id, block_index, point_id, hash)
            VALUES(1, 0, 1, x'0000000000000000000000000000000000000000000000000000000000000000'), (1, 1, 1, x'aa00000000000000000000000000000000000000000000000000000000000000'),
                  (1, 0, 3, x'bb00000000000000000000000000000000000000000000000000000000000000'), (1, 2, 3, NULL),
                  (2, 0, 1, x'aa00000000000000000000000000000000000000000000000000000000000000'),
                  (3, 0, 2, x'aa00000000000000000000000000000000000000000000000000000000000000'), (3, 1, 2, x'cc00000000000000000000000000000000000000000000000000000000000000');
        INSERT INTO blocks(hash, pack_id, offset, stored_len, raw_len, encoding)
            VALUES(x'0000000000000000000000000000000000000000000000000000000000000000', 1, 16, 100, 4096, 1), (x'aa00000000000000000000000000000000000000000000000000000000000000', 1, 164, 200, 4096, 1),
                  (x'bb00000000000000000000000000000000000000000000000000000000000000', 1, 412, 300, 4096, 1), (x'cc00000000000000000000000000000000000000000000000000000000000000', 1, 760, 400, 4096, 1);
        INSERT INTO packs(id, committed_len) VALUES(1, 1208);
        PRAGMA user_version = 2;";

    /// Version 4: each server's points are numbered 1, 2, ... in commit
    /// order (the fixture interleaves web1's and db2's), and a new point
    /// takes its server's next number.
    #[test]
    fn an_older_catalog_numbers_each_servers_points() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch(VERSION_2)
            .unwrap();
        let mut cat = Catalog::open(&path).unwrap();
        let ids = |cat: &Catalog| -> Vec<(String, i64, i64)> {
            cat.points(None)
                .unwrap()
                .into_iter()
                .map(|p| (p.server, p.id, p.key))
                .collect()
        };
        let want = |v: &[(&str, i64, i64)]| -> Vec<(String, i64, i64)> {
            v.iter()
                .map(|&(s, id, key)| (s.to_owned(), id, key))
                .collect()
        };
        assert_eq!(
            ids(&cat),
            want(&[("web1", 1, 1), ("db2", 1, 2), ("web1", 2, 3)])
        );
        let key = cat
            .commit_point(&crate::catalog::NewPoint {
                server_id: 2,
                created_ms: 4000,
                source_ms: 4000,
                consistency: "fuzzy",
                commit: "sync",
                volumes: &[("root", 4096, 16384)],
                blocks: &[],
                zero_runs: &[],
                new_blocks: &[],
                merge_sync: false,
                packs: &[],
            })
            .unwrap();
        assert_eq!((key, cat.point_seq(key).unwrap()), (4, 2));
        assert_eq!(
            (cat.latest_seq(1).unwrap(), cat.latest_seq(3).unwrap()),
            (2, 0)
        );
    }

    #[test]
    fn a_version_2_catalog_is_upgraded_with_the_blocks_each_server_stored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch(VERSION_2)
            .unwrap();

        let cat = Catalog::open(&path).unwrap();
        assert_eq!(user_version(&path), SCHEMA_VERSION);
        let hash = |b: u8| {
            let mut h = [0u8; 32];
            h[0] = b;
            BlockHash(h)
        };
        let rows = |server| {
            let mut v: Vec<BlockHash> = cat.server_blocks(server).unwrap().into_iter().collect();
            v.sort_unstable_by_key(|h| h.0);
            v
        };
        // Every block any point of the server references (replaced ones
        // too: they are still stored for the older point), no zero blocks.
        assert_eq!(rows(1), vec![hash(0), hash(0xaa), hash(0xbb)]);
        assert_eq!(rows(2), vec![hash(0xaa), hash(0xcc)]);
        assert!(rows(3).is_empty());
        // Each server is charged for what it stored, shared or not.
        assert_eq!(cat.server_usage(1).unwrap(), 100 + 200 + 300);
        assert_eq!(cat.server_usage(2).unwrap(), 200 + 400);
        drop(cat);
        Catalog::open(&path).unwrap();
        assert_eq!(user_version(&path), SCHEMA_VERSION);
    }

    /// Version 8: `point_blocks` of an older catalog is rebuilt keyed by
    /// point first, and block maps read the same as before.
    #[test]
    fn an_older_catalog_gets_point_blocks_keyed_by_point() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch(VERSION_2)
            .unwrap();
        let cat = Catalog::open(&path).unwrap();
        let key: Vec<String> = Connection::open(&path)
            .unwrap()
            .prepare("SELECT name FROM pragma_index_info('sqlite_autoindex_point_blocks_1') ORDER BY seqno")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(key, ["volume_id", "point_id", "block_index"]);
        let hash = |b: u8| {
            let mut h = [0u8; 32];
            h[0] = b;
            Some(BlockHash(h))
        };
        assert_eq!(
            cat.block_map(1, 3, 0).unwrap(),
            vec![(0, hash(0xbb)), (1, hash(0xaa)), (2, None)]
        );
        assert_eq!(
            cat.block_map(1, 1, 0).unwrap(),
            vec![(0, hash(0)), (1, hash(0xaa))]
        );
        assert_eq!(
            cat.block_map(1, 3, 1).unwrap(),
            vec![(0, hash(0xbb)), (2, None)]
        );
    }

    #[test]
    fn a_catalog_of_a_newer_receiver_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        Catalog::open(&path).unwrap();
        let newer = SCHEMA_VERSION + 1;
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", newer)
            .unwrap();

        let err = Catalog::open(&path).err().unwrap();
        assert!(
            matches!(
                err,
                ReceiveError::CatalogTooNew { found, supported }
                    if found == newer && supported == SCHEMA_VERSION
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "catalog schema version {newer} is newer than this receiver supports \
                 ({SCHEMA_VERSION}); upgrade pilotlight-receiver"
            )
        );
        assert!(!err.is_retryable());
        assert_eq!(user_version(&path), newer);
    }
}
