//! The point a restore connection serves: one volume as it was at one
//! point, its block map resolved once (`restore::point_blocks`, the map
//! `restore` and `verify` read), each block read from its pack with the
//! store's [`BlockFetcher`] (decompressed and BLAKE3-checked) and sent as it
//! is stored if compressed (not compressed again), compressed if stored raw.

use std::sync::Arc;

use bytes::Bytes;
use pilotlight_protocol::block::{zero_hash, Encoder};
use pilotlight_protocol::frame::BlockFrame;
use pilotlight_protocol::limits::{block_count, block_len};
use pilotlight_protocol::{BlockHash, Encoding};

use crate::restore::PointBlock;
use crate::store::{BlockFetcher, Store};
use crate::ReceiveError;

/// Most threads reading one batch of fetched blocks.
const READERS: usize = 4;
/// zstd level of a block stored raw, compressed to be sent (the agent's
/// default).
const ZSTD_LEVEL: i32 = 1;

/// One volume of one point, ready to be fetched from.
pub(crate) struct Source {
    pub(crate) store: Arc<Store>,
    /// The server whose point it is.
    pub(crate) server: String,
    /// The volume's name.
    pub(crate) volume: String,
    /// The point's id, as its server numbers its points.
    pub(crate) point: i64,
    /// Bytes of the volume at the point.
    pub(crate) size: u64,
    /// Its block size.
    pub(crate) block_size: u32,
    /// Data and zero blocks with a row, by index; absent = zeros.
    pub(crate) blocks: Vec<PointBlock>,
}

impl Source {
    /// Blocks in the volume.
    pub(crate) fn total(&self) -> u64 {
        block_count(self.size, self.block_size)
    }

    /// `(index, hash)` of every block with a row, for the hash listing.
    pub(crate) fn hashes(&self) -> Vec<(u64, Option<BlockHash>)> {
        self.blocks
            .iter()
            .map(|(i, e)| (*i, e.map(|(h, _)| h)))
            .collect()
    }

    /// Refuse a fetch of a block past the end of the volume.
    pub(crate) fn check(&self, indexes: &[u64]) -> Result<(), ReceiveError> {
        let total = self.total();
        match indexes.iter().find(|&&i| i >= total) {
            Some(i) => Err(ReceiveError::Protocol(format!(
                "fetch of block {i} past the end of volume {} ({total} blocks)",
                self.volume
            ))),
            None => Ok(()),
        }
    }

    /// Block `index` as a `Fetched` body, verified: compressed as stored,
    /// or compressed now by `enc` if it was stored raw (the agent's encoder
    /// stores blocks raw without trying while they compress poorly).
    /// Blocking.
    pub(crate) fn read(
        &self,
        index: u64,
        (fetcher, enc): (&mut BlockFetcher, &mut Encoder),
        out: &mut Vec<u8>,
    ) -> Result<BlockFrame, ReceiveError> {
        let len = block_len(self.size, self.block_size, index);
        let entry = self
            .blocks
            .binary_search_by_key(&index, |(i, _)| *i)
            .ok()
            .and_then(|at| self.blocks.get(at))
            .and_then(|(_, e)| *e);
        let mut frame = BlockFrame {
            tag: self.point as u64,
            volume: 0,
            encoding: Encoding::Zero,
            index,
            raw_len: len,
            hash: zero_hash(len as usize),
            payload: Bytes::new(),
        };
        let Some((hash, loc)) = entry else {
            return Ok(frame);
        };
        let encoding = fetcher
            .fetch_stored(&self.store, &loc, &hash, out)
            .map_err(|e| self.damaged(index, &e))?;
        if out.len() == len as usize {
            frame.hash = hash;
            if encoding == Encoding::Zstd && fetcher.payload().len() <= out.len() {
                frame.encoding = Encoding::Zstd;
                frame.payload = Bytes::copy_from_slice(fetcher.payload());
                return Ok(frame);
            }
        } else {
            // Stored before the volume grew (or shrank): the volume's block
            // is the stored bytes cut or padded with zeros to its length.
            out.resize(len as usize, 0);
            frame.hash = BlockHash::of(out);
        }
        let (encoding, payload) = enc.encode(out);
        frame.encoding = encoding;
        frame.payload = Bytes::copy_from_slice(payload);
        Ok(frame)
    }

    fn damaged(&self, index: u64, e: &ReceiveError) -> ReceiveError {
        tracing::error!(
            server = %self.server,
            volume = %self.volume,
            point = self.point,
            block = index,
            cause = %e,
            "damaged block: the restore that asked for it fails"
        );
        ReceiveError::Corrupt(format!(
            "block {index} of volume {} of server {} (point {}) cannot be read: {e}",
            self.volume, self.server, self.point
        ))
    }

    /// The blocks `indexes`, in order, read on up to [`READERS`] threads
    /// with the fetchers of `pool` (made as needed, kept for the next
    /// batch). Blocking.
    pub(crate) fn read_batch(
        &self,
        indexes: &[u64],
        pool: &mut Vec<BlockFetcher>,
    ) -> Result<Vec<BlockFrame>, ReceiveError> {
        let threads = READERS.min(indexes.len()).max(1);
        while pool.len() < threads {
            pool.push(BlockFetcher::new(self.store.dir())?);
        }
        let per = indexes.len().div_ceil(threads).max(1);
        let parts: Vec<Result<Vec<BlockFrame>, ReceiveError>> = std::thread::scope(|s| {
            let handles: Vec<_> = indexes
                .chunks(per)
                .zip(pool.iter_mut())
                .map(|(part, fetcher)| {
                    s.spawn(move || {
                        let mut out = Vec::new();
                        let mut enc = Encoder::new(ZSTD_LEVEL)
                            .map_err(|e| ReceiveError::storage(self.store.dir(), e))?;
                        part.iter()
                            .map(|&i| self.read(i, (fetcher, &mut enc), &mut out))
                            .collect()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(ReceiveError::Internal("a fetch reader panicked".into()))
                    })
                })
                .collect()
        });
        let mut frames = Vec::with_capacity(indexes.len());
        for part in parts {
            frames.extend(part?);
        }
        Ok(frames)
    }
}
