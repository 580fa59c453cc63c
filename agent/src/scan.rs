//! The scan tracker and the read → hash → compress pipeline.
//!
//! Worker threads (one per core) take chunks of about 2 MiB of a volume, read
//! them with `pread`, hash every block with BLAKE3, compare with the hashes of
//! the last point, and compress changed blocks with zstd. Changed blocks go to
//! the data streams holding a share of the in-flight window. Blocks that
//! became zeros (read back as zeros, or in a hole of a sparse image, which is
//! not read at all: see [`crate::sparse`]) go as runs: one `ZeroRun` frame
//! per run of consecutive such blocks to a receiver that takes them, one
//! zero `Block` each to one that does not.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use pilotlight_protocol::block::{is_zero, zero_hash, Encoder};
use pilotlight_protocol::frame::BlockFrame;
use pilotlight_protocol::limits::{block_count, block_len, BLOCK_HEADER_LEN, ZERO_RUN_LEN};
use pilotlight_protocol::{BlockHash, Encoding, Frame, ZeroRunFrame};
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::hashfile::BaseHashes;
use crate::link::Outgoing;
use crate::sparse::{units_along, Source, Unit};
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
    /// Read with O_DIRECT (block devices): the device's page cache is not
    /// kept in step with a filesystem mounted on it, nor with direct writes
    /// in flight, so a buffered read could return data older than a write
    /// that already completed.
    pub direct: bool,
}

/// Alignment of O_DIRECT buffers (covers 512 and 4096-byte sectors).
const DIRECT_ALIGN: usize = 4096;

/// A zeroed buffer of `len` bytes aligned for O_DIRECT, carved out of a
/// slightly larger allocation.
#[derive(Default)]
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let raw = vec![0u8; len + DIRECT_ALIGN];
        let start = raw.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        Self { raw, start, len }
    }

    fn get_mut(&mut self, n: usize) -> Option<&mut [u8]> {
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
    let units: Vec<Unit> = match (job.only, src.data_extents(job.size)) {
        (None, Some(extents)) => units_along(&extents, blocks, job.block_size, per_chunk),
        (only, _) => work_units(blocks, per_chunk, gap, only)
            .into_iter()
            .map(|(first, count)| Unit::data(first, count))
            .collect(),
    };
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
    }
    Ok(total)
}

/// What the workers of one scan share.
struct Shared<'a> {
    job: &'a ScanJob<'a>,
    sink: &'a Sink<'a>,
    src: Source<'a>,
    units: &'a [Unit],
    /// The next unit to take.
    next: AtomicU64,
    per_chunk: u64,
    /// Hash of a whole zero block.
    full_zero: BlockHash,
    level: i32,
    /// A worker failed: the others stop.
    failed: AtomicBool,
}

impl Shared<'_> {
    /// Hash of block `index` if it is all zeros (the last may be short).
    fn zero_of(&self, index: u64) -> (u32, BlockHash) {
        let len = block_len(self.job.size, self.job.block_size, index);
        if len == self.job.block_size {
            (len, self.full_zero)
        } else {
            (len, zero_hash(len as usize))
        }
    }

    fn src_err(&self, e: std::io::Error) -> AgentError {
        AgentError::Source {
            volume: self.job.name.to_owned(),
            path: self.job.path.to_owned(),
            source: e,
        }
    }
}

/// One worker's state: its buffers, its encoder and the run of zero blocks
/// it has not sent yet.
struct Worker<'a> {
    sh: &'a Shared<'a>,
    encoder: Encoder,
    buf: AlignedBuf,
    base: Vec<BlockHash>,
    /// `(first, count)` of changed blocks that are zeros, not sent yet.
    run: Option<(u64, u64)>,
}

fn worker(sh: &Shared<'_>, out: &mut ScanResult) -> Result<(), AgentError> {
    let bs = u64::from(sh.job.block_size);
    let mut w = Worker {
        sh,
        encoder: Encoder::new(sh.level).map_err(|e| sh.src_err(e))?,
        buf: AlignedBuf::new((sh.per_chunk * bs) as usize),
        base: Vec::with_capacity(sh.per_chunk as usize),
        run: None,
    };
    loop {
        if sh.failed.load(Ordering::Relaxed) || sh.sink.stop.is_cancelled() {
            return Err(AgentError::Stopped);
        }
        let unit = sh.next.fetch_add(1, Ordering::Relaxed);
        let Some(&u) = usize::try_from(unit).ok().and_then(|u| sh.units.get(u)) else {
            return w.flush(out);
        };
        let (offset, end) = (u.first * bs, sh.job.size.min((u.first + u.count) * bs));
        if u.hole && sh.src.is_hole(offset, end - offset) {
            w.hole(u.first, u.count, out)?;
        } else {
            // A unit mapped as a hole that holds data now is read by chunks.
            let mut first = u.first;
            while first < u.first + u.count {
                let count = (u.first + u.count - first).min(sh.per_chunk);
                w.chunk(first, count, out)?;
                first += count;
            }
        }
        // A run does not span units: another worker sends what follows.
        w.flush(out)?;
    }
}

impl Worker<'_> {
    /// Blocks `first..first + count`, one hole: those whose base is not
    /// zeros become zeros, without a read.
    fn hole(&mut self, first: u64, count: u64, out: &mut ScanResult) -> Result<(), AgentError> {
        let sh = self.sh;
        if let Some(p) = sh.sink.progress {
            let len = block_len_sum(sh.job.size, sh.job.block_size, first, count);
            p.fetch_add(len, Ordering::Relaxed);
        }
        let step = (sh.per_chunk * 64).max(1);
        let mut at = first;
        while at < first + count {
            let n = (first + count - at).min(step);
            sh.job.base.read(at, n, &mut self.base)?;
            for i in 0..n {
                let index = at + i;
                let (_, zero) = sh.zero_of(index);
                match self.base.get(i as usize) {
                    Some(old) if *old != zero => self.zero(index, zero, out)?,
                    _ => self.flush(out)?,
                }
            }
            at += n;
        }
        Ok(())
    }

    /// Read blocks `first..first + count` (at most a chunk; not at all when
    /// they are one hole) and send those that changed.
    fn chunk(&mut self, first: u64, count: u64, out: &mut ScanResult) -> Result<(), AgentError> {
        let sh = self.sh;
        let job = sh.job;
        let bs = u64::from(job.block_size);
        let offset = first * bs;
        let len = (job.size - offset).min(count * bs) as usize;
        job.base.read(first, count, &mut self.base)?;
        let hole = sh.src.is_hole(offset, len as u64);
        let data = self
            .buf
            .get_mut(len)
            .filter(|d| d.len() == len)
            .ok_or_else(|| AgentError::Internal("chunk larger than its buffer".into()))?;
        if !hole {
            sh.src
                .file
                .read_exact_at(data, offset)
                .map_err(|e| sh.src_err(e))?;
            out.bytes_read += len as u64;
            metrics::counter!("pilotlight_agent_bytes_read_total").increment(len as u64);
        }
        if let Some(p) = sh.sink.progress {
            p.fetch_add(len as u64, Ordering::Relaxed);
        }
        // With a list, the span may hold blocks not asked for: skip them.
        let mut wanted = job.only.map(|list| {
            let start = list.partition_point(|&b| b < first);
            list.get(start..).unwrap_or_default().iter().peekable()
        });
        let data = std::mem::take(&mut self.buf);
        let result = (|| {
            let bytes = data
                .get(len)
                .ok_or_else(|| AgentError::Internal("chunk larger than its buffer".into()))?;
            for (i, block) in bytes.chunks(job.block_size as usize).enumerate() {
                let index = first + i as u64;
                if let Some(w) = wanted.as_mut() {
                    while w.next_if(|&&b| b < index).is_some() {}
                    if w.next_if(|&&b| b == index).is_none() {
                        self.flush(out)?;
                        continue;
                    }
                }
                let (blen, zero_hash) = sh.zero_of(index);
                let block = block.get(..blen as usize).unwrap_or(block);
                // A hole's blocks are zeros; the buffer holds an earlier read.
                let zero = hole || is_zero(block);
                let hash = if zero {
                    zero_hash
                } else {
                    BlockHash::of(block)
                };
                let Some(&old) = self.base.get(i) else {
                    continue;
                };
                if old == hash {
                    self.flush(out)?;
                } else if zero {
                    self.zero(index, hash, out)?;
                } else {
                    self.flush(out)?;
                    self.data(index, block, hash, out)?;
                }
            }
            Ok(())
        })();
        self.buf = data;
        result
    }

    /// Block `index` changed to zeros: it joins (or starts) the run.
    fn zero(
        &mut self,
        index: u64,
        hash: BlockHash,
        out: &mut ScanResult,
    ) -> Result<(), AgentError> {
        match &mut self.run {
            Some((first, count)) if *first + *count == index => *count += 1,
            _ => {
                self.flush(out)?;
                self.run = Some((index, 1));
            }
        }
        out.changed.push((index, hash));
        Ok(())
    }

    /// Send the pending run of zero blocks, if any.
    fn flush(&mut self, out: &mut ScanResult) -> Result<(), AgentError> {
        let Some((first, count)) = self.run.take() else {
            return Ok(());
        };
        let sh = self.sh;
        if sh.sink.zero_runs {
            let frame = Frame::ZeroRun(ZeroRunFrame {
                tag: sh.job.tag,
                volume: sh.job.vol_idx,
                first,
                count,
            });
            return send(sh.sink, frame, ZERO_RUN_LEN, out);
        }
        for index in first..first + count {
            let (raw_len, hash) = sh.zero_of(index);
            let frame = Frame::Block(BlockFrame {
                tag: sh.job.tag,
                volume: sh.job.vol_idx,
                encoding: Encoding::Zero,
                index,
                raw_len,
                hash,
                payload: Bytes::new(),
            });
            send(sh.sink, frame, BLOCK_HEADER_LEN, out)?;
        }
        Ok(())
    }

    /// Compress and send a changed block of data.
    fn data(
        &mut self,
        index: u64,
        block: &[u8],
        hash: BlockHash,
        out: &mut ScanResult,
    ) -> Result<(), AgentError> {
        let sh = self.sh;
        metrics::counter!("pilotlight_agent_bytes_compressed_total").increment(block.len() as u64);
        let (encoding, payload) = self.encoder.encode(block);
        let payload = Bytes::copy_from_slice(payload);
        out.payload_bytes += payload.len() as u64;
        let cost = payload.len() + BLOCK_HEADER_LEN;
        let frame = Frame::Block(BlockFrame {
            tag: sh.job.tag,
            volume: sh.job.vol_idx,
            encoding,
            index,
            raw_len: block.len() as u32,
            hash,
            payload,
        });
        send(sh.sink, frame, cost, out)?;
        out.changed.push((index, hash));
        Ok(())
    }
}

/// Bytes of blocks `first..first + count` of a volume of `size`.
fn block_len_sum(size: u64, block_size: u32, first: u64, count: u64) -> u64 {
    let bs = u64::from(block_size);
    let start = first.saturating_mul(bs).min(size);
    first
        .saturating_add(count)
        .saturating_mul(bs)
        .min(size)
        .saturating_sub(start)
}

/// Queue `frame` for the data streams once the window has room for its
/// `cost`. Both waits give way to a stop: a stalled receiver neither frees
/// the window nor drains the queue.
fn send(
    sink: &Sink<'_>,
    frame: Frame,
    cost: usize,
    out: &mut ScanResult,
) -> Result<(), AgentError> {
    let cost = u32::try_from(cost).unwrap_or(u32::MAX);
    let window = sink.window.clone();
    sink.rt.block_on(async {
        let permit = tokio::select! {
            p = window.acquire_many_owned(cost) => p.map_err(|_| link_closed())?,
            () = sink.stop.cancelled() => return Err(AgentError::Stopped),
        };
        let out = Outgoing { frame, permit };
        tokio::select! {
            r = sink.tx.send(out) => r.map_err(|_| link_closed()),
            () = sink.stop.cancelled() => Err(AgentError::Stopped),
        }
    })?;
    out.frames += 1;
    Ok(())
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
            direct: false,
        };
        let sink = Sink {
            tx: &tx,
            window: &window,
            rt: rt.handle(),
            stop: &stop,
            progress: None,
            zero_runs: true,
        };
        let result = scan(&job, &sink, 3, 1).unwrap();
        let mut changed: Vec<u64> = result.changed.iter().map(|c| c.0).collect();
        changed.sort_unstable();
        assert_eq!(changed, [1, 3, 6, 10, 28, 63]);
        // Spans 1..=10 (gaps of 1 and 2 read through), 28, 63.
        assert_eq!(result.bytes_read, (10 + 1 + 1) * 4096);
        let mut sent: Vec<(u64, BlockHash)> = std::iter::from_fn(|| rx.try_recv().ok())
            .filter_map(|o| match o.frame {
                Frame::Block(b) => Some((b.index, b.hash)),
                _ => None,
            })
            .collect();
        sent.sort_unstable_by_key(|s| s.0);
        let want: Vec<(u64, BlockHash)> = [1u64, 3, 6, 10, 28, 63]
            .iter()
            .map(|&i| (i, BlockHash::of(&data[i as usize * 4096..][..4096])))
            .collect();
        assert_eq!(sent, want);
    }

    /// Scan `data` (4 KiB blocks) against `base`; the frames sent.
    fn frames_of(data: &[u8], base: &[BlockHash], zero_runs: bool) -> (ScanResult, Vec<Frame>) {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), data).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (tx, rx) = async_channel::bounded(1024);
        let window = Arc::new(Semaphore::new(64 << 20));
        let stop = CancellationToken::new();
        let base = base.to_vec();
        let job = ScanJob {
            vol_idx: 0,
            name: "v",
            path: file.path(),
            size: data.len() as u64,
            block_size: 4096,
            base: &base,
            tag: 1,
            only: None,
            direct: false,
        };
        let sink = Sink {
            tx: &tx,
            window: &window,
            rt: rt.handle(),
            stop: &stop,
            progress: None,
            zero_runs,
        };
        let result = scan(&job, &sink, 1, 1).unwrap();
        let mut frames: Vec<Frame> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|o| o.frame)
            .collect();
        frames.sort_by_key(|f| match f {
            Frame::Block(b) => b.index,
            Frame::ZeroRun(z) => z.first,
            _ => u64::MAX,
        });
        (result, frames)
    }

    #[test]
    fn blocks_that_became_zeros_go_as_runs_or_one_zero_block_each() {
        // 12 blocks, all data in the base; now blocks 2..5 and 7 are
        // zeros, and the short last block (100 bytes) too.
        let bs = 4096usize;
        let size = 11 * bs + 100;
        let base: Vec<BlockHash> = (0..12).map(|i| BlockHash([i as u8 + 1; 32])).collect();
        let mut data = vec![0u8; size];
        for i in [0usize, 1, 5, 6, 8, 9, 10] {
            data[i * bs..(i + 1) * bs].fill(i as u8 + 1);
        }
        let (r, frames) = frames_of(&data, &base, true);
        let run = |first, count| {
            Frame::ZeroRun(ZeroRunFrame {
                tag: 1,
                volume: 0,
                first,
                count,
            })
        };
        let zero_runs: Vec<&Frame> = frames
            .iter()
            .filter(|f| matches!(f, Frame::ZeroRun(_)))
            .collect();
        assert_eq!(zero_runs, [&run(2, 3), &run(7, 1), &run(11, 1)]);
        assert_eq!(r.frames, frames.len() as u64);
        assert_eq!(r.frames, 7 + 3);
        // Every block is in `changed`, zeros with their zero hash.
        assert_eq!(r.changed.len(), 12);
        assert!(r.changed.contains(&(11, zero_hash(100))));
        assert!(r.changed.contains(&(3, zero_hash(bs))));

        // To a receiver without ZeroRun: one zero Block per block.
        let (r, frames) = frames_of(&data, &base, false);
        assert_eq!(r.frames, 12);
        let zeros: Vec<(u64, u32)> = frames
            .iter()
            .filter_map(|f| match f {
                Frame::Block(b) if b.encoding == Encoding::Zero => Some((b.index, b.raw_len)),
                _ => None,
            })
            .collect();
        assert_eq!(
            zeros,
            [(2, 4096), (3, 4096), (4, 4096), (7, 4096), (11, 100)]
        );
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
