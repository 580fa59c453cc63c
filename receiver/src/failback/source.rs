//! The point a restore connection serves: one volume as it was at one
//! point, its block map resolved once (`restore::point_blocks`, the map
//! `restore` and `verify` read), each block's record read from its pack
//! (its header checked against the catalog) and sent as it is stored,
//! neither decompressed nor compressed again: the agent decompresses and
//! checks every block against the point's hash, so checking it here too
//! would only spend the CPU the restore needs. A block stored raw (the
//! agent's encoder stores blocks raw without trying while they compress
//! poorly, text after random data among them) is compressed if a sample of
//! it compresses: random data costs a zstd attempt on an eighth of it, and
//! the decision is the block's own, not that of the blocks read before it.

use std::sync::Arc;

use bytes::Bytes;
use pilotlight_protocol::block::zero_hash;
use pilotlight_protocol::frame::BlockFrame;
use pilotlight_protocol::limits::{block_count, block_len};
use pilotlight_protocol::{BlockHash, Encoding};

use crate::pack::{BlockLoc, PackReader};
use crate::restore::PointBlock;
use crate::store::{BlockFetcher, Store};
use crate::ReceiveError;

/// Most threads reading one batch of fetched blocks.
const READERS: usize = 4;
/// zstd level of a block stored raw, compressed to be sent (the agent's
/// default).
const ZSTD_LEVEL: i32 = 1;
/// Bytes of each of the two samples (the block's start and middle) tried
/// before a block stored raw is compressed whole.
const SAMPLE: usize = 4096;
/// A sample is worth it when zstd takes more than 1/POOR_SHARE off it (the
/// agent's encoder's measure of a poor block).
const POOR_SHARE: usize = 8;

/// Compresses the blocks stored raw that are worth it.
pub(crate) struct Packer {
    zstd: zstd::bulk::Compressor<'static>,
    out: Vec<u8>,
}

impl Packer {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            zstd: zstd::bulk::Compressor::new(ZSTD_LEVEL)?,
            out: Vec::new(),
        })
    }

    /// The encoding and payload of the non-zero block `raw`: zstd when a
    /// sample compresses well and the whole block shrinks, raw otherwise.
    fn pack<'a>(&'a mut self, raw: &'a [u8]) -> (Encoding, &'a [u8]) {
        let mid = (raw.len() / 2).saturating_sub(SAMPLE / 2);
        let samples = [(0, SAMPLE), (mid, mid + SAMPLE)];
        let worth = raw.len() <= 2 * SAMPLE
            || samples
                .iter()
                .filter_map(|&(a, b)| raw.get(a..b))
                .any(|sample| self.shrinks(sample));
        if worth {
            self.out.clear();
            self.out.reserve(zstd::zstd_safe::compress_bound(raw.len()));
            if let Ok(n) = self.zstd.compress_to_buffer(raw, &mut self.out) {
                if let Some(payload) = self.out.get(..n).filter(|_| n < raw.len()) {
                    return (Encoding::Zstd, payload);
                }
            }
        }
        (Encoding::Raw, raw)
    }

    /// Whether zstd takes more than 1/POOR_SHARE off `sample`.
    fn shrinks(&mut self, sample: &[u8]) -> bool {
        self.out.clear();
        self.out
            .reserve(zstd::zstd_safe::compress_bound(sample.len()));
        let good = sample.len() - sample.len() / POOR_SHARE;
        matches!(self.zstd.compress_to_buffer(sample, &mut self.out), Ok(n) if n < good)
    }
}

/// What one reading thread keeps from batch to batch: its open packs, a
/// fetcher (for the rare block that must be decompressed here), its
/// compressor and buffer.
pub(crate) struct Worker {
    packs: PackReader,
    fetcher: BlockFetcher,
    packer: Packer,
    out: Vec<u8>,
}

impl Worker {
    fn new(store: &Store) -> Result<Self, ReceiveError> {
        Ok(Self {
            packs: PackReader::new(store.dir()),
            fetcher: BlockFetcher::new(store.dir())?,
            packer: Packer::new().map_err(|e| ReceiveError::storage(store.dir(), e))?,
            out: Vec::new(),
        })
    }
}

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

    /// Block `index` as a `Fetched` body, its payload as stored: read
    /// from its pack (the record's header checked against the catalog),
    /// neither decompressed nor verified here (the agent decompresses and
    /// checks every block against the point's hash; a damaged one fails
    /// the restore there, naming it), compressed now by `packer` if it was
    /// stored raw and compresses. Blocking.
    pub(crate) fn read(&self, index: u64, w: &mut Worker) -> Result<BlockFrame, ReceiveError> {
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
        if loc.raw_len != len {
            return self.resized(frame, (hash, loc), w);
        }
        let mut payload = Vec::with_capacity(loc.stored_len as usize);
        let loc = self
            .read_record(&loc, &hash, &mut w.packs, &mut payload)
            .map_err(|e| self.damaged(index, &e))?;
        frame.hash = hash;
        frame.encoding = loc.encoding;
        if loc.encoding == Encoding::Raw {
            if let (Encoding::Zstd, packed) = w.packer.pack(&payload) {
                frame.encoding = Encoding::Zstd;
                frame.payload = Bytes::copy_from_slice(packed);
                return Ok(frame);
            }
        }
        frame.payload = Bytes::from(payload);
        Ok(frame)
    }

    /// The record of `hash` at `loc` (header checked), or where the store
    /// says it is now if garbage collection moved it meanwhile (a running
    /// `serve` may collect while a restore reads); returns where it was
    /// read.
    fn read_record(
        &self,
        loc: &BlockLoc,
        hash: &BlockHash,
        packs: &mut PackReader,
        out: &mut Vec<u8>,
    ) -> Result<BlockLoc, ReceiveError> {
        match packs.read(loc, hash, out) {
            Ok(()) => Ok(*loc),
            Err(first) => match self.store.locate(hash) {
                Ok(now) if now != *loc => packs.read(&now, hash, out).map(|()| now),
                _ => Err(first),
            },
        }
    }

    /// A block stored before the volume grew (or shrank): the volume's
    /// block is the stored bytes cut or padded with zeros to its length,
    /// decompressed and verified here, hashed again, and compressed if it
    /// compresses.
    fn resized(
        &self,
        mut frame: BlockFrame,
        (hash, loc): (BlockHash, BlockLoc),
        w: &mut Worker,
    ) -> Result<BlockFrame, ReceiveError> {
        w.fetcher
            .fetch_current(&self.store, &loc, &hash, &mut w.out)
            .map_err(|e| self.damaged(frame.index, &e))?;
        w.out.resize(frame.raw_len as usize, 0);
        frame.hash = BlockHash::of(&w.out);
        let (encoding, payload) = w.packer.pack(&w.out);
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
    /// with the workers of `pool` (made as needed, kept for the next
    /// batch). Blocking.
    pub(crate) fn read_batch(
        &self,
        indexes: &[u64],
        pool: &mut Vec<Worker>,
    ) -> Result<Vec<BlockFrame>, ReceiveError> {
        let threads = READERS.min(indexes.len()).max(1);
        while pool.len() < threads {
            pool.push(Worker::new(&self.store)?);
        }
        let per = indexes.len().div_ceil(threads).max(1);
        let parts: Vec<Result<Vec<BlockFrame>, ReceiveError>> = std::thread::scope(|s| {
            let handles: Vec<_> = indexes
                .chunks(per)
                .zip(pool.iter_mut())
                .map(|(part, w)| s.spawn(move || part.iter().map(|&i| self.read(i, w)).collect()))
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

#[cfg(test)]
#[allow(clippy::unwrap_used)] // test code
mod tests {
    use super::*;

    /// Bytes that do not compress (a xorshift stream).
    fn noise(len: usize, mut x: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn a_raw_block_is_compressed_when_a_sample_compresses_whatever_came_before() {
        let mut p = Packer::new().unwrap();
        let text = b"pilotlight keeps a warm copy of every disk. ".repeat(1500);
        let text = &text[..65536];
        // A run of random blocks does not stop the next text block from
        // being compressed (the agent's encoder, stores raw after a streak).
        for seed in 1..40 {
            let random = noise(65536, seed);
            let (enc, payload) = p.pack(&random);
            assert_eq!((enc, payload.len()), (Encoding::Raw, 65536));
        }
        let (enc, payload) = p.pack(text);
        assert_eq!(enc, Encoding::Zstd);
        assert!(payload.len() < 2000, "{}", payload.len());
        // Text at the middle only (the start random) is still found.
        let mut half = noise(65536, 99);
        half[32768 - 4096..].copy_from_slice(&text[..32768 + 4096]);
        assert_eq!(p.pack(&half).0, Encoding::Zstd);
        // A short block is tried whole.
        assert_eq!(p.pack(&text[..5000]).0, Encoding::Zstd);
    }
}
