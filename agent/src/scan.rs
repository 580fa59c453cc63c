//! The scan tracker and the read → hash → compress pipeline.
//!
//! Worker threads (one per core) take chunks of about 1 MiB of a volume, read
//! them with `pread`, hash every block with BLAKE3, compare with the hashes of
//! the last point, and compress changed blocks with zstd. Changed blocks go to
//! the data streams holding a share of the in-flight window.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use pilotlight_protocol::block::{is_zero, zero_hash, Encoder};
use pilotlight_protocol::frame::BlockFrame;
use pilotlight_protocol::limits::{block_count, block_len, BLOCK_HEADER_LEN};
use pilotlight_protocol::{BlockHash, Encoding};
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::hashfile::BaseHashes;
use crate::link::Outgoing;
use crate::AgentError;

/// Bytes read per work unit.
const CHUNK_BYTES: u64 = 2 << 20;

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
    /// Without `only`: read only this span of blocks (first, count), not
    /// the whole volume (a full sync reads a volume in parts, checkpointing
    /// between them).
    pub range: Option<(u64, u64)>,
    /// Read with O_DIRECT (block devices): the device's page cache is not
    /// kept in step with a filesystem mounted on it, nor with direct writes
    /// in flight, so a buffered read could return data older than a write
    /// that already completed.
    pub direct: bool,
}

/// Alignment of O_DIRECT buffers (covers 512 and 4096-byte sectors).
pub(crate) const DIRECT_ALIGN: usize = 4096;

/// A zeroed buffer of `len` bytes aligned for O_DIRECT, carved out of a
/// slightly larger allocation.
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

/// What a scan found and sent.
#[derive(Debug, Default)]
pub struct ScanResult {
    /// Changed blocks and their new hashes.
    pub changed: Vec<(u64, BlockHash)>,
    /// Encoded payload bytes sent.
    pub payload_bytes: u64,
    /// Bytes read from the volume.
    pub bytes_read: u64,
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
    let per_chunk = (CHUNK_BYTES / u64::from(job.block_size)).max(1);
    let gap = GAP_BYTES / u64::from(job.block_size);
    let units = match (job.range, job.only) {
        (Some((first, count)), None) => {
            let count = count.min(blocks.saturating_sub(first));
            work_units(count, per_chunk, gap, None)
                .into_iter()
                .map(|(f, n)| (f + first, n))
                .collect()
        }
        _ => work_units(blocks, per_chunk, gap, job.only),
    };
    let next = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<AgentError>> = Mutex::new(None);
    let full_zero = zero_hash(job.block_size as usize);
    let results: Vec<ScanResult> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers.max(1))
            .map(|_| {
                s.spawn(|| {
                    let mut out = ScanResult::default();
                    let src = Source {
                        file: &file,
                        sparse,
                    };
                    let r = worker(
                        job, sink, src, &next, &units, per_chunk, full_zero, level, &failed,
                        &mut out,
                    );
                    if let Err(e) = r {
                        failed.store(true, Ordering::Relaxed);
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
    }
    Ok(total)
}

/// What a worker reads from.
#[derive(Clone, Copy)]
struct Source<'a> {
    file: &'a File,
    /// A regular file, whose holes need no read.
    sparse: bool,
}

impl Source<'_> {
    /// Whether `[offset, offset + len)` is one hole (reads as zeros): the
    /// next data at or after `offset` starts at or past its end. Asked just
    /// before the read it replaces, so it is what a read would have seen.
    fn is_hole(&self, offset: u64, len: u64) -> bool {
        if !self.sparse {
            return false;
        }
        let Ok(off) = libc::off_t::try_from(offset) else {
            return false;
        };
        match nix::unistd::lseek(self.file, off, nix::unistd::Whence::SeekData) {
            Ok(data) => u64::try_from(data).is_ok_and(|d| d >= offset.saturating_add(len)),
            // No data from `offset` to the end of the file.
            Err(nix::errno::Errno::ENXIO) => true,
            // No SEEK_DATA here (or another error): read.
            Err(_) => false,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn worker(
    job: &ScanJob<'_>,
    sink: &Sink<'_>,
    src: Source<'_>,
    next: &AtomicU64,
    units: &[(u64, u64)],
    per_chunk: u64,
    full_zero: BlockHash,
    level: i32,
    failed: &AtomicBool,
    out: &mut ScanResult,
) -> Result<(), AgentError> {
    let src_err = |e| AgentError::Source {
        volume: job.name.to_owned(),
        path: job.path.to_owned(),
        source: e,
    };
    let mut encoder = Encoder::new(level).map_err(src_err)?;
    let bs = u64::from(job.block_size);
    let mut buf = AlignedBuf::new((per_chunk * bs) as usize);
    let mut base: Vec<BlockHash> = Vec::with_capacity(per_chunk as usize);
    loop {
        if failed.load(Ordering::Relaxed) || sink.stop.is_cancelled() {
            return Err(AgentError::Stopped);
        }
        let unit = next.fetch_add(1, Ordering::Relaxed);
        let Some(&(first, count)) = usize::try_from(unit).ok().and_then(|u| units.get(u)) else {
            return Ok(());
        };
        let offset = first * bs;
        let len = (job.size - offset).min(count * bs) as usize;
        let data = buf
            .get_mut(len)
            .filter(|d| d.len() == len)
            .ok_or_else(|| AgentError::Internal("chunk larger than its buffer".into()))?;
        job.base.read(first, count, &mut base)?;
        let hole = src.is_hole(offset, len as u64);
        if !hole {
            src.file.read_exact_at(data, offset).map_err(src_err)?;
            out.bytes_read += len as u64;
            metrics::counter!("pilotlight_agent_bytes_read_total").increment(len as u64);
        }
        if let Some(p) = sink.progress {
            p.fetch_add(len as u64, Ordering::Relaxed);
        }
        // With a list, the span may hold blocks not asked for: skip them.
        let mut wanted = job.only.map(|list| {
            let start = list.partition_point(|&b| b < first);
            list.get(start..).unwrap_or_default().iter().peekable()
        });
        for (i, block) in data.chunks(job.block_size as usize).enumerate() {
            let index = first + i as u64;
            if let Some(w) = wanted.as_mut() {
                while w.next_if(|&&b| b < index).is_some() {}
                if w.next_if(|&&b| b == index).is_none() {
                    continue;
                }
            }
            let blen = block_len(job.size, job.block_size, index) as usize;
            let block = block.get(..blen).unwrap_or(block);
            // A hole's blocks are zeros; the buffer holds an earlier read.
            let zero = hole || is_zero(block);
            let hash = match (zero, blen == job.block_size as usize) {
                (true, true) => full_zero,
                (true, false) => zero_hash(blen),
                (false, _) => BlockHash::of(block),
            };
            let Some(old) = base.get(i) else {
                continue;
            };
            if *old == hash {
                continue;
            }
            let (encoding, payload) = if zero {
                (Encoding::Zero, Bytes::new())
            } else {
                metrics::counter!("pilotlight_agent_bytes_compressed_total").increment(blen as u64);
                let (e, p) = encoder.encode(block);
                (e, Bytes::copy_from_slice(p))
            };
            out.payload_bytes += payload.len() as u64;
            let cost = u32::try_from(payload.len() + BLOCK_HEADER_LEN).unwrap_or(u32::MAX);
            let window = sink.window.clone();
            let frame = BlockFrame {
                tag: job.tag,
                volume: job.vol_idx,
                encoding,
                index,
                raw_len: blen as u32,
                hash,
                payload,
            };
            // Both waits give way to a stop: a stalled receiver neither
            // frees the window nor drains the queue.
            sink.rt.block_on(async {
                let permit = tokio::select! {
                    p = window.acquire_many_owned(cost) => p.map_err(|_| link_closed())?,
                    () = sink.stop.cancelled() => return Err(AgentError::Stopped),
                };
                let out = Outgoing {
                    block: frame,
                    permit,
                };
                tokio::select! {
                    r = sink.tx.send(out) => r.map_err(|_| link_closed()),
                    () = sink.stop.cancelled() => Err(AgentError::Stopped),
                }
            })?;
            out.changed.push((index, hash));
        }
    }
}

fn link_closed() -> AgentError {
    AgentError::Net(std::io::Error::new(
        std::io::ErrorKind::BrokenPipe,
        "link closed",
    ))
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
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use super::*;

    #[test]
    fn a_listed_scan_sends_exactly_the_listed_blocks_that_changed() {
        // 64 blocks of 4 KiB, each distinct; the base says block 9 is
        // already as it is now.
        let bs = 4096u32;
        let data: Vec<u8> = (0..64u32 * bs)
            .map(|i| (i / bs * 7 + i % 251) as u8)
            .collect();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &data).unwrap();
        let size = data.len() as u64;
        let mut base = zero_table(size, bs);
        base[9] = BlockHash::of(&data[9 * 4096..10 * 4096]);
        // Gaps of 1, 2 and 17 blocks: the short ones are read through.
        let only = [1, 3, 6, 9, 10, 28, 63];
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (tx, rx) = async_channel::bounded(128);
        let window = Arc::new(Semaphore::new(64 << 20));
        let stop = CancellationToken::new();
        let job = ScanJob {
            vol_idx: 0,
            name: "v",
            path: file.path(),
            size,
            block_size: bs,
            base: &base,
            tag: 1,
            only: Some(&only),
            range: None,
            direct: false,
        };
        let sink = Sink {
            tx: &tx,
            window: &window,
            rt: rt.handle(),
            stop: &stop,
            progress: None,
        };
        let result = scan(&job, &sink, 3, 1).unwrap();
        let mut changed: Vec<u64> = result.changed.iter().map(|c| c.0).collect();
        changed.sort_unstable();
        assert_eq!(changed, [1, 3, 6, 10, 28, 63]);
        // Spans 1..=10 (gaps of 1 and 2 read through), 28, 63.
        assert_eq!(result.bytes_read, (10 + 1 + 1) * 4096);
        let mut sent: Vec<(u64, BlockHash)> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|o| (o.block.index, o.block.hash))
            .collect();
        sent.sort_unstable_by_key(|s| s.0);
        let want: Vec<(u64, BlockHash)> = [1u64, 3, 6, 10, 28, 63]
            .iter()
            .map(|&i| (i, BlockHash::of(&data[i as usize * 4096..][..4096])))
            .collect();
        assert_eq!(sent, want);
    }

    #[test]
    fn work_units_cover_exactly_the_blocks_asked_for() {
        // The whole volume: chunks of 4, the last one short.
        assert_eq!(work_units(10, 4, 0, None), vec![(0, 4), (4, 4), (8, 2)]);
        // A list: consecutive runs, split at the chunk size; duplicates and
        // blocks past the end dropped.
        let only = [1, 2, 3, 4, 5, 5, 9, 11, 12, 40];
        assert_eq!(
            work_units(13, 4, 0, Some(&only)),
            vec![(1, 4), (5, 1), (9, 1), (11, 2)]
        );
        assert!(work_units(13, 4, 0, Some(&[])).is_empty());
        // Gaps of up to one block are read through, within the chunk size.
        assert_eq!(
            work_units(13, 4, 1, Some(&only)),
            vec![(1, 4), (5, 1), (9, 4)]
        );
        assert_eq!(
            work_units(100, 64, 1, Some(&[0, 2, 4, 7, 9])),
            vec![(0, 5), (7, 3)]
        );
    }
}
