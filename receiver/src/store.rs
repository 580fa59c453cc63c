//! The point store: catalog + packs + the block index (in the catalog,
//! behind a bounded cache: [`BlockIndex`]), and the staging images derived
//! from them.
//!
//! Commit order (the durability contract, carried out by `commit.rs`): pack
//! data fsynced → catalog transaction committed → `DURABLE` sent → staging
//! image updated. A crash at any step leaves every acknowledged point
//! restorable; [`Store::open_for_serve`] cuts unfinished pack tails, and
//! `serve`'s staging task brings staging images up to date in the
//! background.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use pilotlight_protocol::block::Decoder;
use pilotlight_protocol::{BlockHash, Encoding};

pub use crate::catalog::BlockIndex;
use crate::catalog::{Catalog, Group, DEFAULT_CACHE_ENTRIES};
use crate::owners::Owners;
use crate::pack::{pack_path, parse_pack_name, BlockLoc, OpenPacks, PackReader, PackWriter};
use crate::quota::DedupScope;
use crate::ReceiveError;

/// Name of the catalog file in the receiver directory.
pub const CATALOG_FILE: &str = "catalog.db";

/// Lock file held by the one process that may write packs (`serve`, `gc`).
pub const LOCK_FILE: &str = "serve.lock";

/// Mode of the files the receiver creates in its directory (packs, staging
/// images, the catalog, the lock): the owner's only, whatever the umask.
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// Mode of the directories the receiver creates (the receiver directory,
/// `packs/`, `staging/` and one per server in it).
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// The store of one receiver directory.
pub struct Store {
    dir: PathBuf,
    catalog: Mutex<Catalog>,
    /// Commits waiting for the catalog, batched into one transaction.
    group: Group,
    /// Held for reading by a data stream from looking a block up until
    /// its reference is recorded in the session, for writing by garbage
    /// collection while it takes blocks out of the index.
    gate: RwLock<()>,
    /// Where each committed block is, and who stored it.
    index: BlockIndex,
    /// What each server's stored blocks take.
    owners: Owners,
    next_pack: AtomicU64,
    store_id: [u8; 16],
    writers: Mutex<Vec<PackWriter>>,
    committed: Mutex<HashMap<u64, u64>>,
    open_packs: OpenPacks,
    _lock: Option<nix::fcntl::Flock<File>>,
}

impl Store {
    /// Open the store for reading and for commands that do not replicate
    /// (restore, verify, points). Makes no repairs.
    pub fn open(dir: &Path) -> Result<Self, ReceiveError> {
        let db = dir.join(CATALOG_FILE);
        if !db.exists() {
            return Err(ReceiveError::NotFound(format!(
                "{} is not a receiver directory (no {CATALOG_FILE}; run `pilotlight-receiver init`)",
                dir.display()
            )));
        }
        let mut catalog = Catalog::open(&db)?;
        let store_id = catalog.store_id()?;
        catalog.checkpoint_in_background(&db)?;
        Ok(Self {
            dir: dir.to_owned(),
            catalog: Mutex::new(catalog),
            group: Group::default(),
            gate: RwLock::new(()),
            index: BlockIndex::new(&db, DEFAULT_CACHE_ENTRIES),
            owners: Owners::default(),
            next_pack: AtomicU64::new(1),
            store_id,
            writers: Mutex::new(Vec::new()),
            committed: Mutex::new(HashMap::new()),
            open_packs: OpenPacks::default(),
            _lock: None,
        })
    }

    /// Open the store to serve: cut unfinished pack tails, drop packs no
    /// commit reached and load the block index. Staging images are not
    /// touched: `serve`'s staging task repairs them in the background
    /// ([`crate::staging`]), so that no staging failure keeps `serve` from
    /// starting.
    ///
    /// Only one process at a time may do this (it holds `serve.lock` while
    /// the store lives): two writers of the same packs would cut each
    /// other's data.
    pub fn open_for_serve(dir: &Path) -> Result<Self, ReceiveError> {
        let mut store = Self::open(dir)?;
        store._lock = Some(lock_exclusive(dir)?);
        create_private_dir(&dir.join("packs"))?;
        let committed: HashMap<u64, u64> = store.catalog()?.packs()?.into_iter().collect();
        let mut max_id = committed.keys().copied().max().unwrap_or(0);
        // Nor an id whose objects wait for their Object Lock retention.
        max_id = max_id.max(crate::objstore::lock::highest_deferred_pack(dir)?);
        let packs_dir = dir.join("packs");
        let entries =
            std::fs::read_dir(&packs_dir).map_err(|e| ReceiveError::storage(&packs_dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| ReceiveError::storage(&packs_dir, e))?;
            let Some(id) = entry.file_name().to_str().and_then(parse_pack_name) else {
                continue;
            };
            max_id = max_id.max(id);
            let path = entry.path();
            match committed.get(&id) {
                None => {
                    tracing::info!(pack = id, "removing pack that no commit reached");
                    std::fs::remove_file(&path).map_err(|e| ReceiveError::storage(&path, e))?;
                }
                Some(&len) => {
                    let f = File::options()
                        .write(true)
                        .open(&path)
                        .map_err(|e| ReceiveError::storage(&path, e))?;
                    let actual = f
                        .metadata()
                        .map_err(|e| ReceiveError::storage(&path, e))?
                        .len();
                    if actual > len {
                        tracing::info!(
                            pack = id,
                            cut = actual - len,
                            "cutting unfinished pack tail"
                        );
                        f.set_len(len)
                            .map_err(|e| ReceiveError::storage(&path, e))?;
                        f.sync_all().map_err(|e| ReceiveError::storage(&path, e))?;
                    } else if actual < len {
                        return Err(ReceiveError::Corrupt(format!(
                            "pack {} is {actual} bytes but the catalog committed {len}",
                            path.display()
                        )));
                    }
                }
            }
        }
        sync_dir(&packs_dir)?;
        store.next_pack.store(max_id + 1, Ordering::SeqCst);
        *store.committed.lock().map_err(|_| poisoned())? = committed;
        {
            let mut cat = store.catalog()?;
            // A collection killed before it finished: its blocks stay.
            cat.undoom_all()?;
            store.owners.reload(&cat)?;
        }
        Ok(store)
    }

    /// The same store with a block index cache of `entries` (see
    /// `index_cache_entries` in the receiver's configuration).
    pub fn with_index_cache(mut self, entries: usize) -> Self {
        self.index = BlockIndex::new(&self.dir.join(CATALOG_FILE), entries);
        self
    }

    /// The receiver directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// This store's random id (lets an agent tell receivers apart).
    pub fn store_id(&self) -> [u8; 16] {
        self.store_id
    }

    /// Lock the catalog. Use from blocking contexts only.
    pub fn catalog(&self) -> Result<MutexGuard<'_, Catalog>, ReceiveError> {
        self.catalog.lock().map_err(|_| poisoned())
    }

    /// Run `job` in the catalog's next group commit (see
    /// [`crate::catalog::Group`]): its writes share one transaction and one
    /// WAL fsync with those of the commits waiting beside it, and its
    /// `after` step runs once that transaction is durable, the catalog
    /// still held (the in-memory index follows the catalog). Blocking.
    pub fn write<T, A, F>(&self, job: F) -> Result<T, ReceiveError>
    where
        T: Send + 'static,
        A: FnOnce() -> T + Send + 'static,
        F: FnOnce(&mut Catalog) -> Result<A, ReceiveError> + Send + 'static,
    {
        self.group.write(&self.catalog, job)
    }

    /// Where a committed block with `hash` is, if it is stored.
    pub fn lookup(&self, hash: &BlockHash) -> Option<BlockLoc> {
        self.index.loc(hash).ok().flatten()
    }

    /// Where the block `hash` is, if it is stored and `server` may refer
    /// to it: under [`DedupScope::Server`] only a block that server stored.
    /// A data stream asks this holding [`Store::index_read`].
    pub fn find(
        &self,
        server: i64,
        hash: &BlockHash,
        scope: DedupScope,
    ) -> Result<Option<BlockLoc>, ReceiveError> {
        let Some(loc) = self.index.loc(hash)? else {
            return Ok(None);
        };
        let visible = match scope {
            DedupScope::Server => self.index.owns(server, hash)?,
            DedupScope::Global => true,
        };
        Ok(visible.then_some(loc))
    }

    /// The block index (its cache is updated with the catalog held).
    pub fn index(&self) -> &BlockIndex {
        &self.index
    }

    /// Committed blocks at these locations: into the index's cache. Called
    /// with the catalog held, right after the commit that wrote them (the
    /// catalog keeps the newest location of a hash, and so does the cache).
    pub fn index_blocks(&self, blocks: &[(BlockHash, BlockLoc)]) -> Result<(), ReceiveError> {
        self.index.located(blocks)
    }

    /// The gate, for reading. A data stream holds it from looking a hash
    /// up until the reference is recorded in its session, so that garbage
    /// collection (which takes it for writing) sees every such reference.
    pub fn index_read(&self) -> Result<RwLockReadGuard<'_, ()>, ReceiveError> {
        self.gate.read().map_err(|_| poisoned())
    }

    /// The gate, for writing, for garbage collection.
    pub fn index_write(&self) -> Result<RwLockWriteGuard<'_, ()>, ReceiveError> {
        self.gate.write().map_err(|_| poisoned())
    }

    /// What each server's stored blocks take.
    pub fn owners(&self) -> &Owners {
        &self.owners
    }

    /// Ids of packs a writer may still append to.
    pub fn open_packs(&self) -> std::collections::HashSet<u64> {
        self.open_packs
            .lock()
            .map(|o| o.clone())
            .unwrap_or_default()
    }

    /// A writer that is not pooled (garbage collection's).
    pub fn new_writer(&self) -> PackWriter {
        PackWriter::new(&self.dir, self.open_packs.clone())
    }

    /// Close the pooled writers (their packs hold only committed records),
    /// so that their packs can be collected.
    pub fn close_pooled_writers(&self) {
        if let Ok(mut pool) = self.writers.lock() {
            pool.clear();
        }
    }

    /// The length of pack `id` that commits have made durable (0 if none).
    pub(crate) fn committed_len(&self, id: u64) -> u64 {
        self.committed
            .lock()
            .ok()
            .and_then(|c| c.get(&id).copied())
            .unwrap_or(0)
    }

    /// Forget a pack that garbage collection removed.
    pub fn forget_pack(&self, id: u64) {
        if let Ok(mut c) = self.committed.lock() {
            c.remove(&id);
        }
    }

    /// A pack writer for a data stream: one that an earlier stream returned
    /// (so packs fill up instead of multiplying) or a new one.
    pub fn take_writer(&self) -> PackWriter {
        self.writers
            .lock()
            .ok()
            .and_then(|mut w| w.pop())
            .unwrap_or_else(|| self.new_writer())
    }

    /// Give a writer back once its session is over: first cut its pack back
    /// to what is committed, since anything past that belongs to points that
    /// died with the session.
    pub fn return_writer(&self, mut w: PackWriter) {
        let committed = w
            .current_pack()
            .and_then(|id| self.committed.lock().ok().and_then(|c| c.get(&id).copied()))
            .unwrap_or(0);
        if !w.rollback(committed) {
            return;
        }
        if let Ok(mut pool) = self.writers.lock() {
            pool.push(w);
        }
    }

    /// Record pack lengths a commit made durable.
    pub fn note_committed(&self, packs: &[(u64, u64)]) -> Result<(), ReceiveError> {
        let mut c = self.committed.lock().map_err(|_| poisoned())?;
        for &(id, len) in packs {
            let e = c.entry(id).or_insert(0);
            *e = (*e).max(len);
        }
        Ok(())
    }

    /// A fresh pack id.
    pub fn alloc_pack_id(&self) -> u64 {
        self.next_pack.fetch_add(1, Ordering::SeqCst)
    }

    /// Path of a server's staging image of `volume`.
    pub fn staging_path(&self, server: &str, volume: &str) -> PathBuf {
        self.dir
            .join("staging")
            .join(server)
            .join(format!("{volume}.img"))
    }

    /// Location of a block that a committed point references.
    pub fn locate(&self, hash: &BlockHash) -> Result<BlockLoc, ReceiveError> {
        if let Some(loc) = self.lookup(hash) {
            return Ok(loc);
        }
        self.catalog()?.block(hash)?.ok_or_else(|| {
            ReceiveError::Corrupt(format!(
                "block {} is referenced but not stored",
                hash.to_hex()
            ))
        })
    }
}

/// Reads, decompresses and verifies stored blocks. One per thread.
pub struct BlockFetcher {
    reader: PackReader,
    decoder: Decoder,
    payload: Vec<u8>,
}

impl BlockFetcher {
    /// A fetcher over the packs of `dir`.
    pub fn new(dir: &Path) -> Result<Self, ReceiveError> {
        let decoder = Decoder::new().map_err(|e| ReceiveError::storage(dir, e))?;
        Ok(Self {
            reader: PackReader::new(dir),
            decoder,
            payload: Vec::new(),
        })
    }

    /// The raw block `hash` stored at `loc`, checked against its BLAKE3.
    pub fn fetch(
        &mut self,
        loc: &BlockLoc,
        hash: &BlockHash,
        out: &mut Vec<u8>,
    ) -> Result<(), ReceiveError> {
        self.reader.read(loc, hash, &mut self.payload)?;
        self.decoder
            .decode(loc.encoding, &self.payload, loc.raw_len, hash, out)
            .map_err(|e| {
                ReceiveError::Corrupt(format!("block {} in pack {}: {e}", hash.to_hex(), loc.pack))
            })
    }

    /// Like [`fetch_current`](Self::fetch_current), and says how the record
    /// that was read is encoded: its payload, as stored, is then
    /// [`payload`](Self::payload) (what a network restore sends without
    /// compressing the block again).
    pub fn fetch_stored(
        &mut self,
        store: &Store,
        loc: &BlockLoc,
        hash: &BlockHash,
        out: &mut Vec<u8>,
    ) -> Result<Encoding, ReceiveError> {
        match self.fetch(loc, hash, out) {
            Ok(()) => Ok(loc.encoding),
            Err(first) => match store.locate(hash) {
                Ok(now) if now != *loc => self.fetch(&now, hash, out).map(|()| now.encoding),
                _ => Err(first),
            },
        }
    }

    /// The stored payload of the last block fetched (verified with it).
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// Like [`fetch`](Self::fetch), but if the block is not at `loc` any
    /// more because garbage collection moved it meanwhile (a running `serve`
    /// may collect while a restore reads), fetch it from where the store
    /// says it is now.
    pub fn fetch_current(
        &mut self,
        store: &Store,
        loc: &BlockLoc,
        hash: &BlockHash,
        out: &mut Vec<u8>,
    ) -> Result<(), ReceiveError> {
        match self.fetch(loc, hash, out) {
            Ok(()) => Ok(()),
            Err(first) => match store.locate(hash) {
                Ok(now) if now != *loc => self.fetch(&now, hash, out),
                _ => Err(first),
            },
        }
    }
}

/// Deallocate a byte range of a file, or write zeros where holes are not
/// supported.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(std::io::Error::other("range too large"));
    };
    match fallocate(file, flags, off, l) {
        Ok(()) => Ok(()),
        Err(_) => {
            let zeros = vec![0u8; 1 << 20];
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], offset + done)?;
                done += n as u64;
            }
            Ok(())
        }
    }
}

/// Take `DIR/serve.lock`, or say which kind of process holds it.
fn lock_exclusive(dir: &Path) -> Result<nix::fcntl::Flock<File>, ReceiveError> {
    use nix::fcntl::{Flock, FlockArg};
    let path = dir.join(LOCK_FILE);
    let file = File::options()
        .read(true)
        .write(true)
        .mode(PRIVATE_FILE_MODE)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| ReceiveError::storage(&path, e))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            ReceiveError::Refused(format!(
                "another pilotlight-receiver (serve or gc) is using {}; stop it first",
                dir.display()
            ))
        } else {
            ReceiveError::storage(&path, std::io::Error::from(errno))
        }
    })
}

/// Create `path` (its parents as the umask allows, itself 0700) if it is
/// not there. An existing directory keeps its mode.
pub fn create_private_dir(path: &Path) -> Result<(), ReceiveError> {
    if path.is_dir() {
        return Ok(());
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| ReceiveError::storage(parent, e))?;
    }
    match std::fs::DirBuilder::new()
        .mode(PRIVATE_DIR_MODE)
        .create(path)
    {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => {}
        Err(e) => return Err(ReceiveError::storage(path, e)),
    }
    // The umask may have taken bits the owner needs.
    set_mode(path, PRIVATE_DIR_MODE)
}

/// Set the permission bits of `path`.
pub fn set_mode(path: &Path, mode: u32) -> Result<(), ReceiveError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| ReceiveError::storage(path, e))
}

/// fsync a directory, making renames and creations in it durable.
pub fn sync_dir(dir: &Path) -> Result<(), ReceiveError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ReceiveError::storage(dir, e))
}

/// Run store work (file I/O, fsync, SQLite) on a blocking thread, off the
/// async workers. A task that panics is the receiver's own bug.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ReceiveError> + Send + 'static,
) -> Result<T, ReceiveError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ReceiveError::join("blocking store", e))?
}

/// Path helper for tests and tools.
pub fn pack_file(dir: &Path, id: u64) -> PathBuf {
    pack_path(dir, id)
}

fn poisoned() -> ReceiveError {
    ReceiveError::poisoned("store")
}
