//! The copy-on-write overlay of a writable export: every write lands here,
//! the stored point never changes.
//!
//! The overlay is a sparse file the size of the volume plus, in memory, a
//! bitmap of the volume blocks it holds. The first write into a block the
//! overlay does not hold yet copies the point's block into it (unless the
//! write covers the whole block), then the write goes to the file; reads of
//! such a block come from the file. Zeroing a whole block punches a hole.
//!
//! Without `--keep-overlay` the file is unlinked as soon as it is created
//! (in `DIR/exports/`), so it goes when the export stops, however it stops.
//! With `--keep-overlay PATH` it is kept at PATH, with `PATH.blocks.json`
//! beside it naming the point and the blocks the file holds (blocks it does
//! not hold read as the point's, not as the file's zeros).

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;

use super::image::{Block, PointImage};
use crate::store::{punch_hole, PRIVATE_FILE_MODE};
use crate::ReceiveError;

/// The overlay of one writable export.
pub(crate) struct Overlay {
    file: File,
    /// Where it is kept, if it is.
    keep: Option<PathBuf>,
    block_size: u32,
    /// Blocks the overlay holds, one bit each; held across a whole write so
    /// that the copy of a block and the write into it are one step.
    held: Mutex<Vec<u64>>,
}

/// What `--keep-overlay` writes beside the kept file.
#[derive(serde::Serialize)]
struct KeptBlocks<'a> {
    server: &'a str,
    volume: &'a str,
    point: i64,
    size: u64,
    block_size: u32,
    /// Runs `[first, end)` of blocks the file holds.
    blocks: Vec<(u64, u64)>,
}

impl Overlay {
    /// A new overlay for `image`: at `keep` (which must not exist), or an
    /// unlinked file in `dir/exports`.
    pub(crate) fn create(
        dir: &Path,
        keep: Option<&Path>,
        image: &PointImage,
    ) -> Result<Self, ReceiveError> {
        let path = match keep {
            Some(p) => p.to_owned(),
            None => dir.join(super::pin::EXPORTS_DIR).join(format!(
                "overlay-{}-{}.tmp",
                std::process::id(),
                rand::random::<u32>()
            )),
        };
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(PRIVATE_FILE_MODE)
            .open(&path)
            .map_err(|e| ReceiveError::storage(&path, e))?;
        if keep.is_none() {
            std::fs::remove_file(&path).map_err(|e| ReceiveError::storage(&path, e))?;
        }
        file.set_len(image.size)
            .map_err(|e| ReceiveError::storage(&path, e))?;
        let blocks = image.size.div_ceil(u64::from(image.block_size));
        let words = usize::try_from(blocks.div_ceil(64))
            .map_err(|_| ReceiveError::Refused("volume too large for an overlay".into()))?;
        Ok(Self {
            file,
            keep: keep.map(Path::to_owned),
            block_size: image.block_size,
            held: Mutex::new(vec![0u64; words]),
        })
    }

    fn path(&self) -> PathBuf {
        self.keep
            .clone()
            .unwrap_or_else(|| PathBuf::from("(overlay)"))
    }

    /// Whether the overlay holds block `index`.
    pub(crate) fn holds(&self, index: u64) -> bool {
        self.held.lock().is_ok_and(|h| bit(&h, index))
    }

    /// `n` bytes at `pos` (within block `index`) if the overlay holds the
    /// block, `None` if the point's block shows. Blocking.
    pub(crate) fn read_block(
        &self,
        index: u64,
        pos: u64,
        n: usize,
    ) -> Result<Option<Bytes>, ReceiveError> {
        // Held across the read: a write into the block is one step.
        let held = self
            .held
            .lock()
            .map_err(|_| ReceiveError::poisoned("overlay"))?;
        if !bit(&held, index) {
            return Ok(None);
        }
        let mut out = vec![0u8; n];
        self.file
            .read_exact_at(&mut out, pos)
            .map_err(|e| ReceiveError::storage(self.path(), e))?;
        Ok(Some(Bytes::from(out)))
    }

    /// Write `data` at `offset`, or zeros there when `data` is `None`
    /// (`len` bytes). Blocking.
    pub(crate) fn write(
        &self,
        image: &PointImage,
        offset: u64,
        len: usize,
        data: Option<&[u8]>,
    ) -> Result<(), ReceiveError> {
        let mut held = self
            .held
            .lock()
            .map_err(|_| ReceiveError::poisoned("overlay"))?;
        let bs = u64::from(self.block_size);
        self.for_blocks(offset, len, |index, pos, range| {
            let whole = pos % bs == 0 && range.len() as u64 == u64::from(image.block_len(index));
            if !whole && !bit(&held, index) {
                self.copy_in(image, index)?;
            }
            match data {
                Some(d) => {
                    let src = d.get(range).ok_or_else(out_of_range)?;
                    self.file.write_all_at(src, pos)
                }
                None => punch_hole(&self.file, pos, range.len() as u64),
            }
            .map_err(|e| ReceiveError::storage(self.path(), e))?;
            set_bit(&mut held, index);
            Ok(())
        })
    }

    /// Copy block `index` of the point into the overlay.
    fn copy_in(&self, image: &PointImage, index: u64) -> Result<(), ReceiveError> {
        let pos = index * u64::from(self.block_size);
        match image.block(index)? {
            Block::Zero => Ok(()),
            Block::Data(b) => self
                .file
                .write_all_at(&b, pos)
                .map_err(|e| ReceiveError::storage(self.path(), e)),
        }
    }

    /// Make the overlay's writes durable (FLUSH, FUA). Blocking.
    pub(crate) fn flush(&self) -> Result<(), ReceiveError> {
        self.file
            .sync_data()
            .map_err(|e| ReceiveError::storage(self.path(), e))
    }

    /// The export stops: a kept overlay is synced and its block list
    /// written beside it; an unkept one goes with its file descriptor.
    pub(crate) fn finish(
        &self,
        server: &str,
        volume: &str,
        point: i64,
        size: u64,
    ) -> Result<(), ReceiveError> {
        let Some(path) = &self.keep else {
            return Ok(());
        };
        self.flush()?;
        let held = self
            .held
            .lock()
            .map_err(|_| ReceiveError::poisoned("overlay"))?;
        let kept = KeptBlocks {
            server,
            volume,
            point,
            size,
            block_size: self.block_size,
            blocks: runs(&held),
        };
        let json = serde_json::to_vec_pretty(&kept)
            .map_err(|e| ReceiveError::Internal(format!("overlay block list: {e}")))?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .map(|n| format!("{}.blocks.json", n.to_string_lossy()))
            .unwrap_or_else(|| "overlay.blocks.json".into());
        use pilotlight_protocol::atomic_file::{write, Access};
        write(dir, &name, &json, Access::Private).map_err(|(p, e)| ReceiveError::storage(p, e))
    }

    /// Call `f(index, position, range in the buffer)` for each block piece
    /// of `[offset, offset + len)`.
    fn for_blocks(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(u64, u64, std::ops::Range<usize>) -> Result<(), ReceiveError>,
    ) -> Result<(), ReceiveError> {
        let bs = u64::from(self.block_size);
        let mut done = 0usize;
        while done < len {
            let pos = offset + done as u64;
            let n = ((bs - pos % bs) as usize).min(len - done);
            f(pos / bs, pos, done..done + n)?;
            done += n;
        }
        Ok(())
    }
}

fn out_of_range() -> ReceiveError {
    ReceiveError::Internal("overlay range past its buffer".into())
}

fn bit(words: &[u64], index: u64) -> bool {
    usize::try_from(index / 64)
        .ok()
        .and_then(|w| words.get(w))
        .is_some_and(|w| w & (1 << (index % 64)) != 0)
}

fn set_bit(words: &mut [u64], index: u64) {
    if let Some(w) = usize::try_from(index / 64)
        .ok()
        .and_then(|w| words.get_mut(w))
    {
        *w |= 1 << (index % 64);
    }
}

/// Runs `[first, end)` of set bits.
fn runs(words: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for index in 0..words.len() as u64 * 64 {
        if !bit(words, index) {
            continue;
        }
        match out.last_mut() {
            Some((_, end)) if *end == index => *end += 1,
            _ => out.push((index, index + 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_and_runs() {
        let mut w = vec![0u64; 2];
        for i in [0, 1, 2, 63, 64, 100] {
            set_bit(&mut w, i);
        }
        set_bit(&mut w, 10_000); // past the end: ignored
        assert!(bit(&w, 63) && !bit(&w, 3) && !bit(&w, 10_000));
        assert_eq!(runs(&w), vec![(0, 3), (63, 65), (100, 101)]);
    }
}
