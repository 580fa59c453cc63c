//! The scan tracker and the read → hash → compress pipeline.
//!
//! Worker threads (one per core) take chunks of about 2 MiB of a volume, read
//! them with `pread`, hash every block with BLAKE3, compare with the hashes of
//! the last point, and compress changed blocks with zstd. Changed blocks go to
//! the data streams holding a share of the in-flight window. Blocks that
//! became zeros (read back as zeros, or in a hole of a sparse image, which is
//! not read at all: see `agent::sparse`) go as runs: one `ZeroRun` frame
//! per run of consecutive such blocks to a receiver that takes them, one
//! zero `Block` each to one that does not. A block live tracking saw
//! written only in a few pages ([`PartialRead`]) is read as those pages and
//! sent as a `PartialBlock` over the hash of the block the receiver
//! committed; its new hash comes back in `PartialApplied` (until then it is
//! recorded as [`MERGED_LATER`]).

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pilotlight_protocol::block::zero_hash;
use pilotlight_protocol::limits::{block_count, block_len};
use pilotlight_protocol::BlockHash;
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::hashfile::BaseHashes;
use crate::link::Outgoing;
use crate::sparse::{units_along, Source, Unit};
use crate::trace::Pages;
use crate::AgentError;

mod worker;

use worker::{worker, Shared};

/// Bytes read per work unit.
const CHUNK_BYTES: u64 = 2 << 20;

/// The hash a scan records for a block sent as pages: the receiver's
/// `PartialApplied` gives the real one (no BLAKE3 output is expected to be
/// all ones).
pub const MERGED_LATER: BlockHash = BlockHash([0xff; 32]);

/// A block to read only in part: its written pages, sent as a
/// `PartialBlock` over its base hash (which must be the hash of the block
/// in a point the receiver committed: the caller checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartialRead {
    /// Block index (a whole block: never a short last one).
    pub index: u64,
    /// The pages written since the base was read.
    pub pages: Pages,
    /// The base hash, when it is not the one of the scan's base hashes
    /// (the block went as pages earlier in the same point, whose hash is
    /// not known yet: the same base, more pages).
    pub base: Option<BlockHash>,
}

/// One volume to scan in one cycle.
pub struct ScanJob<'a> {
    /// Index of the volume in the session.
    pub vol_idx: u16,
    /// Volume name (for errors).
    pub name: &'a str,
    /// What to read (the volume or its clone).
    pub path: &'a Path,
    /// Volume size.
    pub size: u64,
    /// Block size.
    pub block_size: u32,
    /// Hashes of the last point, read per work unit.
    pub base: &'a dyn BaseHashes,
    /// The point's tag.
    pub tag: u64,
    /// Read only these blocks (ascending), not the whole volume.
    pub only: Option<&'a [u64]>,
    /// With `only`: read these blocks (ascending, none in `only`) only in
    /// part, and send them as `PartialBlock`s.
    pub partial: &'a [PartialRead],
    /// Without `only`: read only this span of blocks (first, count), not
    /// the whole volume (a full sync reads a volume in parts, checkpointing
    /// between them).
    pub range: Option<(u64, u64)>,
    /// Read with O_DIRECT (block devices): the device's page cache is not
    /// kept in step with a filesystem mounted on it, nor with direct writes
    /// in flight, so a buffered read could return data older than a write
    /// that already completed.
    pub direct: bool,
    /// `path` is the frozen delta kept in memory (`agent::freeze::capture`,
    /// which counted the volume's reads): reading it is not a read of the
    /// volume.
    pub from_memory: bool,
}

/// Alignment of O_DIRECT buffers (covers 512 and 4096-byte sectors).
pub(crate) const DIRECT_ALIGN: usize = 4096;

/// A zeroed buffer of `len` bytes aligned for O_DIRECT, carved out of a
/// slightly larger allocation.
#[derive(Default)]
pub(crate) struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub(crate) fn new(len: usize) -> Self {
        let raw = vec![0u8; len + DIRECT_ALIGN];
        let start = raw.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        Self { raw, start, len }
    }

    pub(crate) fn get_mut(&mut self, n: usize) -> Option<&mut [u8]> {
        let end = self.start.checked_add(n.min(self.len))?;
        self.raw.get_mut(self.start..end)
    }

    fn get(&self, n: usize) -> Option<&[u8]> {
        let end = self.start.checked_add(n.min(self.len))?;
        self.raw.get(self.start..end)
    }
}

/// Bytes of blocks not asked for that a read may span to join two runs
/// of blocks that are: one read of a few clean blocks costs less than a
/// second request (random 4 KiB writes leave dirty blocks close together).
const GAP_BYTES: u64 = 64 << 10;

/// Work units: spans of consecutive blocks to read, at most `per_chunk`
/// long. With a list (ascending), a span covers runs of listed blocks and
/// gaps of at most `gap` blocks between them.
fn work_units(blocks: u64, per_chunk: u64, gap: u64, only: Option<&[u64]>) -> Vec<(u64, u64)> {
    match only {
        None => (0..blocks.div_ceil(per_chunk))
            .map(|c| (c * per_chunk, per_chunk.min(blocks - c * per_chunk)))
            .collect(),
        Some(list) => {
            let mut units: Vec<(u64, u64)> = Vec::new();
            for &i in list.iter().filter(|&&i| i < blocks) {
                match units.last_mut() {
                    Some((first, n)) if i < *first + *n => {}
                    Some((first, n)) if i - (*first + *n) <= gap && i - *first < per_chunk => {
                        *n = i - *first + 1;
                    }
                    _ => units.push((i, 1)),
                }
            }
            units
        }
    }
}

/// The parts of `units` within the span `(first, count)` of blocks.
fn clip(units: Vec<Unit>, (first, count): (u64, u64)) -> Vec<Unit> {
    let end = first.saturating_add(count);
    units
        .into_iter()
        .filter_map(|mut u| {
            let (a, b) = (u.first.max(first), u.first.saturating_add(u.count).min(end));
            (a < b).then(|| {
                u.first = a;
                u.count = b - a;
                u
            })
        })
        .collect()
}

/// What a scan found and sent.
#[derive(Debug, Default)]
pub struct ScanResult {
    /// Changed blocks and their new hashes.
    pub changed: Vec<(u64, BlockHash)>,
    /// Encoded payload bytes sent.
    pub payload_bytes: u64,
    /// Bytes read from the volume.
    pub bytes_read: u64,
    /// Frames sent (blocks and zero runs).
    pub frames: u64,
    /// Blocks sent as pages (`PartialBlock`).
    pub partial: u64,
    /// Those blocks: index, pages and the base they went over.
    pub partial_sent: Vec<(u64, Pages, BlockHash)>,
}

/// Where scan workers send, and what stops them.
pub struct Sink<'a> {
    /// Data stream queue.
    pub tx: &'a async_channel::Sender<Outgoing>,
    /// In-flight window.
    pub window: &'a Arc<Semaphore>,
    /// Runtime handle to wait on the window from worker threads.
    pub rt: &'a Handle,
    /// Stops the scan.
    pub stop: &'a CancellationToken,
    /// Counts bytes read, for a progress display.
    pub progress: Option<&'a AtomicU64>,
    /// The receiver takes `ZeroRun` frames (its `Hello` advertised
    /// `FEATURE_ZEROS`); otherwise each zero block is a `Block` frame.
    pub zero_runs: bool,
}

/// Scan one volume with `workers` threads (blocking; call from a blocking task).
pub fn scan(
    job: &ScanJob<'_>,
    sink: &Sink<'_>,
    workers: usize,
    level: i32,
) -> Result<ScanResult, AgentError> {
    let src_err = |e| AgentError::Source {
        volume: job.name.to_owned(),
        path: job.path.to_owned(),
        source: e,
    };
    let file = if job.direct {
        use std::os::unix::fs::OpenOptionsExt;
        File::options()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(job.path)
    } else {
        File::open(job.path)
    }
    .map_err(src_err)?;
    let blocks = block_count(job.size, job.block_size);
    if job.base.blocks() != blocks {
        return Err(AgentError::Internal(format!(
            "hash table of volume {} does not match its size",
            job.name
        )));
    }
    // Holes of an image file read as zeros without a read (SEEK_DATA);
    // devices and O_DIRECT reads are read whole.
    let sparse = !job.direct && file.metadata().map(|m| m.is_file()).unwrap_or(false);
    let src = Source {
        file: &file,
        sparse,
    };
    let per_chunk = (CHUNK_BYTES / u64::from(job.block_size)).max(1);
    let gap = GAP_BYTES / u64::from(job.block_size);
    let mut units: Vec<Unit> = match (job.only, src.data_extents(job.size)) {
        (None, Some(extents)) => units_along(&extents, blocks, job.block_size, per_chunk),
        (only, _) => work_units(blocks, per_chunk, gap, only)
            .into_iter()
            .map(|(first, count)| Unit::data(first, count))
            .collect(),
    };
    if let (Some(range), None) = (job.range, job.only) {
        units = clip(units, range);
    }
    let shared = Shared {
        job,
        sink,
        src,
        units: &units,
        next: AtomicU64::new(0),
        per_chunk,
        full_zero: zero_hash(job.block_size as usize),
        level,
        failed: AtomicBool::new(false),
    };
    let first_error: Mutex<Option<AgentError>> = Mutex::new(None);
    let results: Vec<ScanResult> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers.max(1))
            .map(|_| {
                s.spawn(|| {
                    let mut out = ScanResult::default();
                    if let Err(e) = worker(&shared, &mut out) {
                        shared.failed.store(true, Ordering::Relaxed);
                        if let Ok(mut slot) = first_error.lock() {
                            slot.get_or_insert(e);
                        }
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    if let Some(e) = first_error.into_inner().ok().flatten() {
        return Err(e);
    }
    if results.len() != workers.max(1) {
        return Err(AgentError::Internal("a scan worker panicked".into()));
    }
    let mut total = ScanResult::default();
    for r in results {
        total.changed.extend(r.changed);
        total.payload_bytes += r.payload_bytes;
        total.bytes_read += r.bytes_read;
        total.frames += r.frames;
        total.partial += r.partial;
        total.partial_sent.extend(r.partial_sent);
    }
    Ok(total)
}

/// Hashes of an all-zero volume (the base when the receiver has nothing).
pub fn zero_table(size: u64, block_size: u32) -> Vec<BlockHash> {
    let full = zero_hash(block_size as usize);
    (0..block_count(size, block_size))
        .map(|i| {
            let len = block_len(size, block_size, i);
            if len == block_size {
                full
            } else {
                zero_hash(len as usize)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;
