//! The disk an export serves: the point's image, under the overlay when the
//! export is writable. Reads, writes and block status in bytes; every call
//! is blocking (pack reads, file writes) and runs off the async workers.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::image::PointImage;
use super::overlay::Overlay;
use super::reply::Pieces;
use super::wire::{STATE_HOLE, STATE_ZERO};
use crate::ReceiveError;

/// Blocks one block-status answer looks at, at most (the client asks again
/// from where the answer ends).
const MAX_STATUS_BLOCKS: u64 = 1 << 20;

/// What a write was refused for.
#[derive(Debug)]
pub(crate) enum WriteError {
    /// The export is read-only.
    ReadOnly,
    /// The overlay failed.
    Failed(ReceiveError),
}

/// Reads worked on at once per available core, across all clients of an
/// export: enough to keep every core decompressing and verifying while
/// other reads wait for the disk, few enough that a client with many
/// requests in flight (nbdcopy: 4 connections x 64) does not start a
/// thread for each, which costs more in switches and lock contention than
/// it gains.
const READERS_PER_CORE: usize = 2;

/// The served disk.
pub(crate) struct Disk {
    image: PointImage,
    overlay: Option<Overlay>,
    /// Slots of the reads worked on at once.
    readers: Arc<Semaphore>,
}

impl Disk {
    /// A read-only disk, or a writable one over a new overlay.
    pub(crate) fn new(
        dir: &Path,
        image: PointImage,
        writable: bool,
        keep_overlay: Option<&Path>,
    ) -> Result<Self, ReceiveError> {
        let overlay = if writable {
            Some(Overlay::create(dir, keep_overlay, &image)?)
        } else {
            None
        };
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let readers = Arc::new(Semaphore::new((cores * READERS_PER_CORE).clamp(2, 16)));
        Ok(Self {
            image,
            overlay,
            readers,
        })
    }

    /// Bytes of the disk.
    pub(crate) fn size(&self) -> u64 {
        self.image.size
    }

    /// Bytes per block of the volume.
    pub(crate) fn block_size(&self) -> u32 {
        self.image.block_size
    }

    /// A slot to work on one read in; held until the read is done.
    pub(crate) async fn read_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.readers.clone().acquire_owned().await.ok()
    }

    /// Whether writes are accepted.
    pub(crate) fn writable(&self) -> bool {
        self.overlay.is_some()
    }

    /// `len` bytes at `offset` (the caller checked the range), block by
    /// block: the overlay's blocks from the overlay, the rest from the
    /// point (zeros as zeros, data as the verified blocks themselves).
    pub(crate) fn read(&self, offset: u64, len: usize) -> Result<Pieces, ReceiveError> {
        let bs = u64::from(self.image.block_size);
        let mut out = Pieces::default();
        let mut done = 0usize;
        while done < len {
            let pos = offset + done as u64;
            let (index, within) = (pos / bs, (pos % bs) as usize);
            let n = (bs as usize - within).min(len - done);
            let held = match &self.overlay {
                Some(o) => o.read_block(index, pos, n)?,
                None => None,
            };
            match held {
                Some(b) => out.data(b),
                None => self.image.piece(index, within, n, &mut out)?,
            }
            done += n;
        }
        Ok(out)
    }

    /// Write `data` at `offset`, or `len` zeros when `data` is `None`.
    pub(crate) fn write(
        &self,
        offset: u64,
        len: usize,
        data: Option<&[u8]>,
        fua: bool,
    ) -> Result<(), WriteError> {
        let o = self.overlay.as_ref().ok_or(WriteError::ReadOnly)?;
        o.write(&self.image, offset, len, data)
            .map_err(WriteError::Failed)?;
        if fua {
            o.flush().map_err(WriteError::Failed)?;
        }
        Ok(())
    }

    /// Make writes durable (nothing to do on a read-only disk).
    pub(crate) fn flush(&self) -> Result<(), ReceiveError> {
        self.overlay.as_ref().map_or(Ok(()), Overlay::flush)
    }

    /// `base:allocation` of `[offset, offset + len)`: `(length, state)`
    /// runs, blocks of zeros the point never stored as holes that read as
    /// zeros, everything else (stored data, overlay blocks) as data. With
    /// `one`, only the first run. May end before `len` (see
    /// [`MAX_STATUS_BLOCKS`]).
    pub(crate) fn extents(&self, offset: u64, len: u32, one: bool) -> Vec<(u32, u32)> {
        let bs = u64::from(self.image.block_size);
        let end = offset + u64::from(len);
        let mut runs: Vec<(u32, u32)> = Vec::new();
        let mut pos = offset;
        let mut looked = 0u64;
        while pos < end && looked < MAX_STATUS_BLOCKS {
            let index = pos / bs;
            let next = ((index + 1) * bs).min(end);
            let zero =
                self.image.is_zero(index) && self.overlay.as_ref().is_none_or(|o| !o.holds(index));
            let state = if zero { STATE_HOLE | STATE_ZERO } else { 0 };
            // INVARIANT: each piece is at most `len`, a u32.
            let n = u32::try_from(next - pos).unwrap_or(u32::MAX);
            match runs.last_mut() {
                Some((l, s)) if *s == state => *l += n,
                _ => {
                    if one && !runs.is_empty() {
                        break;
                    }
                    runs.push((n, state));
                }
            }
            pos = next;
            looked += 1;
        }
        runs
    }

    /// The export stops: keep or drop the overlay.
    pub(crate) fn finish(
        &self,
        server: &str,
        volume: &str,
        point: i64,
    ) -> Result<(), ReceiveError> {
        match &self.overlay {
            Some(o) => o.finish(server, volume, point, self.image.size),
            None => Ok(()),
        }
    }
}
