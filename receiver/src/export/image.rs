//! The exported point of one volume, read straight from the packs: the
//! volume's block map as of the point (the catalog's `block_map`, the one
//! `restore` and `verify` read), each data block located in the catalog
//! when first read (`Store::locate`, so that a garbage collection that
//! moved it meanwhile is followed) and fetched, decompressed and
//! BLAKE3-checked by the store's [`BlockFetcher`] on every pack read. A
//! damaged block fails that read (and is logged); zero blocks cost no pack
//! read.

use std::sync::Mutex;

use bytes::Bytes;
use pilotlight_protocol::limits::block_len;
use pilotlight_protocol::BlockHash;

use super::cache::{BlockCache, CACHE_BYTES};
use super::reply::Pieces;
use crate::catalog::PointVolumeInfo;
use crate::store::{BlockFetcher, Store};
use crate::ReceiveError;

/// A volume as it was at a point.
pub(crate) struct PointImage {
    store: Store,
    /// Volume name (for logs).
    volume: String,
    /// The point.
    point: i64,
    /// Bytes of the volume.
    pub(crate) size: u64,
    /// Bytes per block.
    pub(crate) block_size: u32,
    /// `(index, hash)` in index order for every block with a row; `None`
    /// and absent blocks are zeros.
    map: Vec<(u64, Option<BlockHash>)>,
    /// Idle fetchers (one per concurrent read, made on demand).
    fetchers: Mutex<Vec<BlockFetcher>>,
    cache: BlockCache,
}

/// One block's content.
pub(crate) enum Block {
    /// All zeros: nothing stored.
    Zero,
    /// The block's bytes, verified.
    Data(Bytes),
}

impl PointImage {
    /// The image of `vol` at the point whose catalog key is `point`, from `store`.
    pub(crate) fn open(
        store: Store,
        vol: &PointVolumeInfo,
        point: i64,
    ) -> Result<Self, ReceiveError> {
        let mut map = store.catalog()?.block_map(vol.volume_id, point, 0)?;
        map.retain(|(index, _)| block_len(vol.size, vol.block_size, *index) > 0);
        Ok(Self {
            store,
            volume: vol.name.clone(),
            point,
            size: vol.size,
            block_size: vol.block_size,
            map,
            fetchers: Mutex::new(Vec::new()),
            cache: BlockCache::new(CACHE_BYTES),
        })
    }

    /// The stored hash of block `index`, `None` for zeros.
    fn hash(&self, index: u64) -> Option<BlockHash> {
        let at = self.map.binary_search_by_key(&index, |(i, _)| *i).ok()?;
        self.map.get(at).and_then(|(_, h)| *h)
    }

    /// Whether block `index` is all zeros without reading it.
    pub(crate) fn is_zero(&self, index: u64) -> bool {
        self.hash(index).is_none()
    }

    /// Length of block `index` (the last one may be short).
    pub(crate) fn block_len(&self, index: u64) -> u32 {
        block_len(self.size, self.block_size, index)
    }

    /// Block `index`, verified, kept in the cache for the next partial
    /// read of it. Blocking: call off the async workers.
    pub(crate) fn block(&self, index: u64) -> Result<Block, ReceiveError> {
        let Some(hash) = self.hash(index) else {
            return Ok(Block::Zero);
        };
        if let Some(b) = self.cache.get(index) {
            return Ok(Block::Data(b));
        }
        let data = self.fetch(index, &hash)?;
        self.cache.put(index, data.clone());
        Ok(Block::Data(data))
    }

    /// Fetch, decompress and verify block `index` (stored as `hash`) from
    /// the packs, logging a damaged one. The block is decoded into a buffer
    /// of its own that the reply sends as is. Blocking.
    fn fetch(&self, index: u64, hash: &BlockHash) -> Result<Bytes, ReceiveError> {
        let mut fetcher = match self.fetchers.lock().ok().and_then(|mut f| f.pop()) {
            Some(f) => f,
            None => BlockFetcher::new(self.store.dir())?,
        };
        let mut out = Vec::new();
        let want = self.block_len(index) as usize;
        let result = self
            .store
            .locate(hash)
            .and_then(|loc| fetcher.fetch_current(&self.store, &loc, hash, &mut out))
            .and_then(|()| {
                if out.len() < want {
                    Err(ReceiveError::Corrupt(format!(
                        "block {index} of volume {} is {} bytes, shorter than the volume says ({want})",
                        self.volume,
                        out.len(),
                    )))
                } else {
                    Ok(())
                }
            });
        if let Ok(mut idle) = self.fetchers.lock() {
            idle.push(fetcher);
        }
        if let Err(e) = &result {
            tracing::error!(
                volume = %self.volume,
                point = self.point,
                block = index,
                hash = %hash.to_hex(),
                cause = %e,
                "damaged block: the read is answered with EIO"
            );
        }
        result?;
        Ok(Bytes::from(out))
    }

    /// Append `n` bytes of block `index` from byte `within` of it to
    /// `out`: zeros for a block never stored (no pack read), else the
    /// verified block or a slice of it. A reader that takes whole blocks
    /// (nbdcopy, qemu-img) will not ask for the block again soon, so a
    /// whole block is not cached; a partial one is, for the next piece.
    /// Blocking.
    pub(crate) fn piece(
        &self,
        index: u64,
        within: usize,
        n: usize,
        out: &mut Pieces,
    ) -> Result<(), ReceiveError> {
        let Some(hash) = self.hash(index) else {
            out.zeros(n);
            return Ok(());
        };
        let whole = within == 0 && n == self.block_len(index) as usize;
        let data = match self.cache.get(index) {
            Some(b) => b,
            None if whole => self.fetch(index, &hash)?,
            None => {
                let b = self.fetch(index, &hash)?;
                self.cache.put(index, b.clone());
                b
            }
        };
        if within + n > data.len() {
            return Err(ReceiveError::Internal(format!(
                "read of {n} bytes at {within} past block {index}"
            )));
        }
        out.data(data.slice(within..within + n));
        Ok(())
    }
}
