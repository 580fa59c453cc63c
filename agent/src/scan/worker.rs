//! One scan worker: it takes units of a volume, reads and hashes their
//! blocks, compresses and sends those that changed, and gathers those that
//! became zeros into runs.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use pilotlight_protocol::block::{is_zero, zero_hash, Encoder};
use pilotlight_protocol::frame::{BlockFrame, ByteRange};
use pilotlight_protocol::limits::{block_len, BLOCK_HEADER_LEN, ZERO_RUN_LEN};
use pilotlight_protocol::{BlockHash, Encoding, Frame, PartialBlockFrame, ZeroRunFrame};

use super::{AlignedBuf, PartialRead, ScanJob, ScanResult, Sink, MERGED_LATER};
use crate::link::Outgoing;
use crate::sparse::{Source, Unit};
use crate::trace::PAGE;
use crate::AgentError;

/// What the workers of one scan share.
pub(super) struct Shared<'a> {
    pub(super) job: &'a ScanJob<'a>,
    pub(super) sink: &'a Sink<'a>,
    pub(super) src: Source<'a>,
    pub(super) units: &'a [Unit],
    /// The next unit to take.
    pub(super) next: AtomicU64,
    pub(super) per_chunk: u64,
    /// Hash of a whole zero block.
    pub(super) full_zero: BlockHash,
    pub(super) level: i32,
    /// A worker failed: the others stop.
    pub(super) failed: AtomicBool,
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

pub(super) fn worker(sh: &Shared<'_>, out: &mut ScanResult) -> Result<(), AgentError> {
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
        let unit = usize::try_from(unit).unwrap_or(usize::MAX);
        let Some(&u) = sh.units.get(unit) else {
            // The whole blocks are taken: then the partial ones.
            let more = unit
                .checked_sub(sh.units.len())
                .and_then(|k| sh.job.partial.get(k));
            match more {
                Some(&p) => {
                    w.flush(out)?;
                    w.partial(p, out)?;
                    continue;
                }
                None => return w.flush(out),
            }
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
            if !job.from_memory {
                out.bytes_read += len as u64;
                metrics::counter!("pilotlight_agent_bytes_read_total").increment(len as u64);
            }
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

    /// Read the written pages of block `p.index` and send them as a
    /// `PartialBlock` over the block's base.
    fn partial(&mut self, p: PartialRead, out: &mut ScanResult) -> Result<(), AgentError> {
        let sh = self.sh;
        let job = sh.job;
        let bs = u64::from(job.block_size);
        let base_hash = match p.base {
            Some(h) => Some(h),
            None => {
                job.base.read(p.index, 1, &mut self.base)?;
                self.base.first().copied()
            }
        };
        let base_hash = match base_hash {
            Some(h) if h != MERGED_LATER => h,
            _ => {
                return Err(AgentError::Internal(format!(
                    "block {} of volume {} was planned as pages without a known base",
                    p.index, job.name
                )))
            }
        };
        let mut data = BytesMut::with_capacity((p.pages.count() * PAGE) as usize);
        let mut ranges = Vec::with_capacity(p.pages.runs().len());
        for &(first, end) in p.pages.runs() {
            let offset = u64::from(first) * PAGE;
            let len = u64::from(end.saturating_sub(first)) * PAGE;
            if offset + len > bs {
                return Err(AgentError::Internal("pages past their block".into()));
            }
            let buf = self
                .buf
                .get_mut(len as usize)
                .filter(|d| d.len() as u64 == len)
                .ok_or_else(|| AgentError::Internal("pages larger than the buffer".into()))?;
            sh.src
                .file
                .read_exact_at(buf, p.index * bs + offset)
                .map_err(|e| sh.src_err(e))?;
            data.extend_from_slice(buf);
            ranges.push(ByteRange {
                offset: offset as u32,
                len: len as u32,
            });
        }
        let read = data.len() as u64;
        if !job.from_memory {
            out.bytes_read += read;
            metrics::counter!("pilotlight_agent_bytes_read_total").increment(read);
        }
        if let Some(progress) = sh.sink.progress {
            progress.fetch_add(read, Ordering::Relaxed);
        }
        let frame = PartialBlockFrame {
            tag: job.tag,
            volume: job.vol_idx,
            index: p.index,
            raw_len: job.block_size,
            base_hash,
            ranges,
            data: data.freeze(),
        };
        let cost = frame.body_len();
        out.payload_bytes += read;
        send(sh.sink, Frame::PartialBlock(frame), cost, out)?;
        out.changed.push((p.index, MERGED_LATER));
        out.partial += 1;
        out.partial_sent.push((p.index, p.pages, base_hash));
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
