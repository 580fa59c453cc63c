//! The block index on disk: where each stored block is (`blocks`) and which
//! server has stored it (`server_blocks`), looked up in the catalog with
//! prepared statements on connections of their own (WAL readers: a commit
//! in progress never holds them up), behind a bounded cache of what was
//! found.
//!
//! The cache only ever says "stored, here" or "this server stored it":
//! a miss goes to the catalog, and a stale "not stored" costs at most a
//! second copy of a block (the catalog keeps the newest location). What
//! changes a location (a commit's new copy, garbage collection moving or
//! dropping a block) updates the cache while the catalog is held, and bumps
//! an epoch so that a lookup that read the catalog before that change does
//! not put its older answer back.
//!
//! Memory: two generations of at most `entries / 2` each (a hit moves an
//! entry to the young one; when the young one is full the old one is
//! dropped), so about 120 bytes times `entries`, plus each reader
//! connection's page cache ([`READER_CACHE_KIB`], at most [`READERS`]
//! kept).

use std::collections::HashMap;
use std::hash::Hash;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use pilotlight_protocol::BlockHash;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::blocks::block_loc;
use crate::pack::BlockLoc;
use crate::ReceiveError;

/// Cache entries (locations and ownerships together) by default: about
/// 30 MiB (some 117 bytes an entry, `benches/receiver_scale.rs`),
/// whatever the size of the store. With the writer's page cache (64 MiB),
/// the readers' (`READERS` x 8 MiB) and garbage collection's (16 MiB),
/// the catalog's share of a receiver stays near 150 MiB.
pub const DEFAULT_CACHE_ENTRIES: usize = 1 << 18;

/// Reader connections kept for lookups.
const READERS: usize = 4;

/// Page cache of each reader connection, KiB.
const READER_CACHE_KIB: i64 = 8 << 10;

/// A map of bounded size: two generations, the old one dropped whole when
/// the young one fills.
#[derive(Debug)]
struct TwoGen<K, V> {
    young: HashMap<K, V>,
    old: HashMap<K, V>,
    half: usize,
}

impl<K: Hash + Eq + Copy, V: Copy> TwoGen<K, V> {
    fn new(entries: usize) -> Self {
        Self {
            young: HashMap::new(),
            old: HashMap::new(),
            half: (entries / 2).max(1),
        }
    }

    fn get(&mut self, k: &K) -> Option<V> {
        if let Some(v) = self.young.get(k) {
            return Some(*v);
        }
        let v = self.old.remove(k)?;
        self.put(*k, v);
        Some(v)
    }

    fn put(&mut self, k: K, v: V) {
        if self.young.len() >= self.half && !self.young.contains_key(&k) {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(k, v);
    }

    fn clear(&mut self) {
        self.young = HashMap::new();
        self.old = HashMap::new();
    }

    fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }
}

/// What the cache holds.
#[derive(Debug)]
struct Cache {
    locs: TwoGen<BlockHash, BlockLoc>,
    owned: TwoGen<(i64, BlockHash), ()>,
    /// Bumped by every change of a location or an ownership.
    epoch: u64,
}

/// The block index: lookups in the catalog behind a bounded cache.
pub struct BlockIndex {
    path: PathBuf,
    readers: Mutex<Vec<Connection>>,
    cache: Mutex<Cache>,
    lookups: AtomicU64,
}

impl std::fmt::Debug for BlockIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockIndex")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl BlockIndex {
    /// The index of the catalog at `path`, caching at most `entries`.
    pub fn new(path: &Path, entries: usize) -> Self {
        let half = entries / 2;
        Self {
            path: path.to_owned(),
            readers: Mutex::new(Vec::new()),
            cache: Mutex::new(Cache {
                locs: TwoGen::new(half),
                owned: TwoGen::new(half),
                epoch: 0,
            }),
            lookups: AtomicU64::new(0),
        }
    }

    /// Where the block `hash` is, if the catalog has it.
    pub fn loc(&self, hash: &BlockHash) -> Result<Option<BlockLoc>, ReceiveError> {
        let epoch = {
            let mut c = self.cache()?;
            if let Some(l) = c.locs.get(hash) {
                return Ok(Some(l));
            }
            c.epoch
        };
        let found = self.with_reader(|conn| {
            let row = conn
                .prepare_cached(
                    "SELECT pack_id, offset, stored_len, raw_len, encoding FROM blocks WHERE hash=?1",
                )?
                .query_row(params![&hash.0[..]], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })
                .optional()?;
            row.map(|(p, o, s, r, e)| block_loc(p, o, s, r, e))
                .transpose()
        })?;
        if let Some(l) = found {
            let mut c = self.cache()?;
            if c.epoch == epoch {
                c.locs.put(*hash, l);
            }
        }
        Ok(found)
    }

    /// Whether `server` has stored the block `hash`.
    pub fn owns(&self, server: i64, hash: &BlockHash) -> Result<bool, ReceiveError> {
        let key = (server, *hash);
        let epoch = {
            let mut c = self.cache()?;
            if c.owned.get(&key).is_some() {
                return Ok(true);
            }
            c.epoch
        };
        let found = self.with_reader(|conn| {
            Ok(conn
                .prepare_cached("SELECT 1 FROM server_blocks WHERE server_id=?1 AND hash=?2")?
                .query_row(params![server, &hash.0[..]], |_| Ok(()))
                .optional()?
                .is_some())
        })?;
        if found {
            let mut c = self.cache()?;
            if c.epoch == epoch {
                c.owned.put(key, ());
            }
        }
        Ok(found)
    }

    /// Committed blocks now at these locations (called with the catalog
    /// held, right after the transaction that wrote them).
    pub fn located(&self, blocks: &[(BlockHash, BlockLoc)]) -> Result<(), ReceiveError> {
        let mut c = self.cache()?;
        c.epoch += 1;
        for (h, l) in blocks {
            c.locs.put(*h, *l);
        }
        Ok(())
    }

    /// `server` has stored `hashes` (committed).
    pub fn owned<'a>(
        &self,
        server: i64,
        hashes: impl Iterator<Item = &'a BlockHash>,
    ) -> Result<(), ReceiveError> {
        let mut c = self.cache()?;
        for h in hashes {
            c.owned.put((server, *h), ());
        }
        Ok(())
    }

    /// Forget every location (garbage collection took blocks out of the
    /// catalog's `blocks`).
    pub fn forget_all(&self) -> Result<(), ReceiveError> {
        let mut c = self.cache()?;
        c.epoch += 1;
        c.locs.clear();
        Ok(())
    }

    /// Garbage collection copied blocks of pack `old` to these locations
    /// (called with the catalog held, right after that transaction): a
    /// cached location in `old` moves with them.
    pub fn moved(&self, old: u64, moved: &[(BlockHash, BlockLoc)]) -> Result<(), ReceiveError> {
        let mut c = self.cache()?;
        c.epoch += 1;
        for (h, new) in moved {
            // Not cached: the catalog has it right. Cached elsewhere: a
            // newer copy, which the move did not touch.
            if c.locs.get(h).is_some_and(|l| l.pack == old) {
                c.locs.put(*h, *new);
            }
        }
        Ok(())
    }

    /// Forget every ownership (garbage collection dropped some).
    pub fn forget_owners(&self) -> Result<(), ReceiveError> {
        let mut c = self.cache()?;
        c.epoch += 1;
        c.owned.clear();
        Ok(())
    }

    /// Entries cached now.
    pub fn cached(&self) -> usize {
        self.cache
            .lock()
            .map_or(0, |c| c.locs.len() + c.owned.len())
    }

    /// Lookups that went to the catalog so far.
    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::Relaxed)
    }

    fn cache(&self) -> Result<std::sync::MutexGuard<'_, Cache>, ReceiveError> {
        self.cache
            .lock()
            .map_err(|_| ReceiveError::poisoned("block index"))
    }

    /// Run `f` on a reader connection: a pooled one, or a new one.
    fn with_reader<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, ReceiveError>,
    ) -> Result<T, ReceiveError> {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let pooled = self.readers.lock().ok().and_then(|mut r| r.pop());
        let conn = match pooled {
            Some(c) => c,
            None => self.open_reader()?,
        };
        let out = f(&conn);
        if let Ok(mut r) = self.readers.lock() {
            if r.len() < READERS {
                r.push(conn);
            }
        }
        out
    }

    fn open_reader(&self) -> Result<Connection, ReceiveError> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        conn.pragma_update(None, "query_only", true)?;
        conn.pragma_update(None, "cache_size", -READER_CACHE_KIB)?;
        Ok(conn)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use pilotlight_protocol::Encoding;

    use super::*;
    use crate::catalog::{BlockRef, Catalog, NewPoint};

    fn loc(i: u64) -> BlockLoc {
        BlockLoc {
            pack: 1,
            offset: 16 + i * 100,
            stored_len: 90,
            raw_len: 4096,
            encoding: Encoding::Zstd,
        }
    }

    /// Lookups find committed blocks in the catalog, whatever the cache
    /// holds (never more than its bound); a block a collection took out of
    /// `blocks` is not found until it is put back.
    #[test]
    fn lookups_read_the_catalog_behind_a_bounded_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let mut cat = Catalog::open(&path).unwrap();
        cat.set_identity("web1", "01").unwrap();
        cat.set_identity("db2", "02").unwrap();
        let web = cat.require_server("web1").unwrap().id;
        let db = cat.require_server("db2").unwrap().id;
        let hashes: Vec<BlockHash> = (0..100u8).map(|b| BlockHash([b; 32])).collect();
        let new: Vec<(BlockHash, BlockLoc)> =
            hashes.iter().zip(0..).map(|(h, i)| (*h, loc(i))).collect();
        // Point 1 of web1 refers to the first 50 only: the rest are garbage.
        let refs: Vec<BlockRef> = (0..50u64)
            .map(|i| BlockRef {
                volume: 0,
                index: i,
                raw_len: 4096,
                hash: Some(hashes[i as usize]),
            })
            .collect();
        let (_, charged) = cat
            .commit_point_charged(&NewPoint {
                server_id: web,
                created_ms: 1,
                source_ms: 1,
                consistency: "fuzzy",
                commit: "sync",
                volumes: &[("root", 4096, 100 * 4096)],
                blocks: &refs,
                zero_runs: &[],
                new_blocks: &new,
                packs: &[(1, 16 + 100 * 100)],
                merge_sync: false,
            })
            .unwrap();
        assert_eq!(
            charged,
            50 * 90,
            "each block the server had not stored, once"
        );

        let index = BlockIndex::new(&path, 8);
        for (i, h) in hashes.iter().enumerate() {
            assert_eq!(index.loc(h).unwrap(), Some(loc(i as u64)));
            assert_eq!(index.owns(web, h).unwrap(), i < 50);
            assert!(!index.owns(db, h).unwrap());
            assert!(index.cached() <= 8, "{}", index.cached());
        }
        assert!(index.lookups() >= 200);

        let mut gc = Catalog::open(&path).unwrap();
        let mark = gc.gc_mark().unwrap();
        assert_eq!(
            gc.gc_doom(&[hashes[99]], &[]).unwrap(),
            49,
            "unreferenced, not pinned"
        );
        index.forget_all().unwrap();
        assert_eq!(index.loc(&hashes[60]).unwrap(), None);
        assert!(index.loc(&hashes[99]).unwrap().is_some(), "pinned");
        assert!(index.loc(&hashes[10]).unwrap().is_some(), "referenced");
        // Still readable where it was, by a restore that asks the catalog.
        assert_eq!(gc.block(&hashes[60]).unwrap(), Some(loc(60)));
        assert_eq!(gc.gc_settle(mark).unwrap(), 0);
        gc.undoom_all().unwrap();
        assert_eq!(index.loc(&hashes[60]).unwrap(), Some(loc(60)));
    }

    #[test]
    fn two_generations_hold_at_most_their_bound_and_keep_what_is_used() {
        let mut m: TwoGen<u32, u32> = TwoGen::new(4);
        for k in 0..100 {
            m.put(k, k);
            assert!(m.len() <= 4, "{}", m.len());
        }
        // The newest are there; a hit in the old generation moves it young.
        assert_eq!(m.get(&99), Some(99));
        assert_eq!(m.get(&98), Some(98));
        assert_eq!(m.get(&0), None);
        m.put(100, 100);
        assert_eq!(m.get(&98), Some(98));
        m.clear();
        assert_eq!(m.get(&98), None);
    }
}
