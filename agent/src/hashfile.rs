//! One volume's block hashes on disk, and the view of them a scan compares
//! against: the agent's memory does not grow with the size of its volumes.
//!
//! ```text
//! hashes-<id>.bin: record [32] x blocks      (id: hex of blake3(volume name)[..16])
//! record i:        BLAKE3 of block i, or 32 zero bytes for a block of zeros
//!                  (of block i's length: the last block may be short)
//! ```
//!
//! A new volume's file is created sparse (every block zero) and costs no
//! disk until blocks change. Records are read with `pread` in the order the
//! scan needs them (the page cache does the caching) and written in place
//! with `pwrite`. Which point a file holds is recorded only in `state.bin`
//! ([`state`](crate::state)), written after the records are synced.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use pilotlight_protocol::block::zero_hash;
use pilotlight_protocol::limits::{block_count, block_len};
use pilotlight_protocol::BlockHash;

use crate::state::state_err;
use crate::AgentError;

/// Bytes per record.
const RECORD: u64 = 32;
/// The record of a block of zeros.
const ZERO_RECORD: [u8; 32] = [0; 32];

/// File name of volume `name`'s hashes in the state directory: the name
/// hashed, since a volume name may hold any character.
pub fn file_name(name: &str) -> String {
    let h = blake3::hash(name.as_bytes());
    let hex: String = h.as_bytes()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("hashes-{hex}.bin")
}

/// One volume's hash file.
#[derive(Debug)]
pub struct HashFile {
    file: File,
    path: PathBuf,
    size: u64,
    block_size: u32,
    blocks: u64,
    full_zero: BlockHash,
    /// Hash of the last block when it is zeros (it may be short).
    last_zero: BlockHash,
}

impl HashFile {
    fn with(file: File, path: PathBuf, size: u64, block_size: u32) -> Self {
        let blocks = block_count(size, block_size);
        let last_len = blocks
            .checked_sub(1)
            .map_or(block_size, |l| block_len(size, block_size, l));
        Self {
            file,
            path,
            size,
            block_size,
            blocks,
            full_zero: zero_hash(block_size as usize),
            last_zero: zero_hash(last_len as usize),
        }
    }

    /// Open the existing hash file of volume `name`; `None` if there is none
    /// or its length does not match the volume.
    pub fn open(
        dir: &Path,
        name: &str,
        size: u64,
        block_size: u32,
    ) -> Result<Option<Self>, AgentError> {
        let path = dir.join(file_name(name));
        let file = match File::options().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(state_err(&path, e)),
        };
        let len = file.metadata().map_err(|e| state_err(&path, e))?.len();
        let hf = Self::with(file, path, size, block_size);
        Ok((Some(len) == hf.blocks.checked_mul(RECORD)).then_some(hf))
    }

    /// (Re)create the hash file of volume `name` with every block zero:
    /// sparse, private to the agent (0600).
    pub fn create_zero(
        dir: &Path,
        name: &str,
        size: u64,
        block_size: u32,
    ) -> Result<Self, AgentError> {
        let path = dir.join(file_name(name));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| state_err(&path, e))?;
        let hf = Self::with(file, path, size, block_size);
        let len = hf
            .blocks
            .checked_mul(RECORD)
            .ok_or_else(|| AgentError::Internal("hash file size overflows".into()))?;
        hf.file.set_len(len).map_err(|e| state_err(&hf.path, e))?;
        Ok(hf)
    }

    /// Number of blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Whether the file is for a volume of this geometry.
    pub fn fits(&self, size: u64, block_size: u32) -> bool {
        self.size == size && self.block_size == block_size
    }

    fn zero_of(&self, index: u64) -> BlockHash {
        if index + 1 == self.blocks {
            self.last_zero
        } else {
            self.full_zero
        }
    }

    /// The hashes of blocks `first..first + count` (clamped to the volume),
    /// into `out` (cleared first).
    pub fn read(&self, first: u64, count: u64, out: &mut Vec<BlockHash>) -> Result<(), AgentError> {
        out.clear();
        let count = count.min(self.blocks.saturating_sub(first));
        let mut buf = vec![0u8; (count * RECORD) as usize];
        self.file
            .read_exact_at(&mut buf, first * RECORD)
            .map_err(|e| state_err(&self.path, e))?;
        for (k, rec) in buf.chunks_exact(RECORD as usize).enumerate() {
            let index = first + k as u64;
            out.push(match <[u8; 32]>::try_from(rec) {
                Ok(r) if r != ZERO_RECORD => BlockHash(r),
                _ => self.zero_of(index),
            });
        }
        Ok(())
    }

    /// The record of `hash` at `index`: zeros for a block of zeros.
    fn record(&self, index: u64, hash: &BlockHash) -> [u8; 32] {
        if *hash == self.zero_of(index) {
            ZERO_RECORD
        } else {
            hash.0
        }
    }

    /// Write `changes` (block, hash; sorted by block, no duplicates) in
    /// place, a run of consecutive blocks per `pwrite`. Blocks past the end
    /// are ignored. Not durable until [`sync`](Self::sync).
    pub fn write(&self, changes: &[(u64, BlockHash)]) -> Result<(), AgentError> {
        let mut buf: Vec<u8> = Vec::new();
        let mut run_start = 0u64;
        let mut next = None;
        for &(index, ref hash) in changes.iter().filter(|(i, _)| *i < self.blocks) {
            if next != Some(index) {
                self.write_run(run_start, &buf)?;
                buf.clear();
                run_start = index;
            }
            buf.extend_from_slice(&self.record(index, hash));
            next = Some(index + 1);
        }
        self.write_run(run_start, &buf)
    }

    /// Write hashes of blocks `start..` into a file made by
    /// [`create_zero`](Self::create_zero): zero blocks are skipped (the
    /// file is already zeros there), so a mostly empty volume stays sparse.
    pub fn fill(&self, start: u64, hashes: &[BlockHash]) -> Result<(), AgentError> {
        let changes: Vec<(u64, BlockHash)> = hashes
            .iter()
            .enumerate()
            .map(|(k, h)| (start + k as u64, *h))
            .filter(|(i, h)| *h != self.zero_of(*i))
            .collect();
        self.write(&changes)
    }

    fn write_run(&self, first: u64, buf: &[u8]) -> Result<(), AgentError> {
        if buf.is_empty() {
            return Ok(());
        }
        self.file
            .write_all_at(buf, first * RECORD)
            .map_err(|e| state_err(&self.path, e))
    }

    /// Make the records written so far durable (`fdatasync`).
    pub fn sync(&self) -> Result<(), AgentError> {
        self.file.sync_data().map_err(|e| state_err(&self.path, e))
    }
}

/// Sort one volume's changes by block and keep the last hash of each block
/// (a point may carry a block twice: the later one is what it holds).
pub(crate) fn settle_order(changes: &mut Vec<(u64, BlockHash)>) {
    // Stable: of equal blocks, the later change stays later.
    changes.sort_by_key(|c| c.0);
    let mut out: Vec<(u64, BlockHash)> = Vec::with_capacity(changes.len());
    for c in changes.drain(..) {
        match out.last_mut() {
            Some(last) if last.0 == c.0 => *last = c,
            _ => out.push(c),
        }
    }
    *changes = out;
}

/// The hashes a scan compares against, read per work unit.
pub trait BaseHashes: Sync {
    /// Number of blocks.
    fn blocks(&self) -> u64;
    /// The hashes of blocks `first..first + count` into `out` (cleared
    /// first; fewer past the end).
    fn read(&self, first: u64, count: u64, out: &mut Vec<BlockHash>) -> Result<(), AgentError>;
}

impl BaseHashes for Vec<BlockHash> {
    fn blocks(&self) -> u64 {
        self.len() as u64
    }

    fn read(&self, first: u64, count: u64, out: &mut Vec<BlockHash>) -> Result<(), AgentError> {
        out.clear();
        let start = usize::try_from(first).unwrap_or(usize::MAX).min(self.len());
        let end = start
            .saturating_add(usize::try_from(count).unwrap_or(usize::MAX))
            .min(self.len());
        out.extend_from_slice(self.get(start..end).unwrap_or_default());
        Ok(())
    }
}

/// The changes of the points sent and not yet durable, over the durable
/// hash file: per block, the hash last sent and the tag of its point.
#[derive(Debug, Default)]
pub(crate) struct Overlay {
    sent: BTreeMap<u64, (BlockHash, u64)>,
}

impl Overlay {
    /// Point `tag` sent `changes`.
    pub(crate) fn record(&mut self, tag: u64, changes: &[(u64, BlockHash)]) {
        for &(i, h) in changes {
            self.sent.insert(i, (h, tag));
        }
    }

    /// The durable points up to `tag` are written into the file: forget
    /// what they alone hold; a later point's change of a block stays.
    pub(crate) fn settle_through(&mut self, tag: u64) {
        self.sent.retain(|_, &mut (_, t)| t > tag);
    }

    /// The hash last sent of block `index` and its point's tag, if a
    /// point not yet in the file sent it.
    pub(crate) fn sent(&self, index: u64) -> Option<(BlockHash, u64)> {
        self.sent.get(&index).copied()
    }

    /// Point `tag` sent block `index` as a partial block whose new hash is
    /// now known: record it, unless the block was sent again since (whole,
    /// later in the same point, or by a later point).
    pub(crate) fn resolve(&mut self, tag: u64, index: u64, hash: BlockHash) {
        let placeholder = crate::scan::MERGED_LATER;
        if let Some(e) = self
            .sent
            .get_mut(&index)
            .filter(|e| e.1 == tag && e.0 == placeholder)
        {
            e.0 = hash;
        }
    }

    /// Number of blocks held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.sent.len()
    }
}

/// What the receiver will hold once the points sent are durable: the
/// durable file with the pending changes over it.
pub(crate) struct View<'a> {
    pub(crate) file: &'a HashFile,
    pub(crate) overlay: &'a Overlay,
}

impl BaseHashes for View<'_> {
    fn blocks(&self) -> u64 {
        self.file.blocks()
    }

    fn read(&self, first: u64, count: u64, out: &mut Vec<BlockHash>) -> Result<(), AgentError> {
        self.file.read(first, count, out)?;
        for (&i, &(h, _)) in self.overlay.sent.range(first..first.saturating_add(count)) {
            if let Some(slot) = usize::try_from(i - first).ok().and_then(|k| out.get_mut(k)) {
                *slot = h;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use super::*;

    #[test]
    fn a_new_file_is_sparse_zeros_and_short_last_blocks_hash_short() {
        let dir = tempfile::tempdir().unwrap();
        let size = 3 * 4096 + 5;
        let f = HashFile::create_zero(dir.path(), "root", size, 4096).unwrap();
        let mut out = Vec::new();
        f.read(0, 10, &mut out).unwrap();
        assert_eq!(
            out,
            [
                zero_hash(4096),
                zero_hash(4096),
                zero_hash(4096),
                zero_hash(5)
            ]
        );
        let meta = std::fs::metadata(dir.path().join(file_name("root"))).unwrap();
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 4 * 32);
        assert_eq!(meta.blocks(), 0, "sparse");
    }

    #[test]
    fn writes_in_place_read_back_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let f = HashFile::create_zero(dir.path(), "v", 10 * 4096, 4096).unwrap();
        let mut ch = vec![
            (7, BlockHash([7; 32])),
            (2, BlockHash([1; 32])),
            (3, BlockHash([3; 32])),
            (2, BlockHash([2; 32])),
            (99, BlockHash([9; 32])),
        ];
        settle_order(&mut ch);
        assert_eq!(ch.first(), Some(&(2, BlockHash([2; 32]))));
        f.write(&ch).unwrap();
        f.sync().unwrap();
        drop(f);
        assert!(HashFile::open(dir.path(), "v", 11 * 4096, 4096)
            .unwrap()
            .is_none());
        let f = HashFile::open(dir.path(), "v", 10 * 4096, 4096)
            .unwrap()
            .unwrap();
        let mut out = Vec::new();
        f.read(2, 6, &mut out).unwrap();
        let z = zero_hash(4096);
        assert_eq!(
            out,
            [
                BlockHash([2; 32]),
                BlockHash([3; 32]),
                z,
                z,
                z,
                BlockHash([7; 32])
            ]
        );
        // Back to zeros: a zero record.
        f.write(&[(3, z)]).unwrap();
        f.read(3, 1, &mut out).unwrap();
        assert_eq!(out, [z]);
    }

    #[test]
    fn a_partial_blocks_hash_is_resolved_only_if_not_sent_again() {
        use crate::scan::MERGED_LATER;
        let mut o = Overlay::default();
        let (m, h) = (BlockHash([1; 32]), BlockHash([2; 32]));
        // Sent as pages, then whole later in the same point: the whole
        // block's hash stays.
        o.record(3, &[(5, MERGED_LATER)]);
        o.record(3, &[(5, h)]);
        o.resolve(3, 5, m);
        assert_eq!(o.sent(5), Some((h, 3)));
        // Sent as pages alone: resolved.
        o.record(3, &[(6, MERGED_LATER)]);
        o.resolve(3, 6, m);
        assert_eq!(o.sent(6), Some((m, 3)));
        // By another point: untouched.
        o.record(4, &[(7, MERGED_LATER)]);
        o.resolve(3, 7, m);
        assert_eq!(o.sent(7), Some((MERGED_LATER, 4)));
    }

    #[test]
    fn the_view_is_the_file_under_the_pending_points() {
        let dir = tempfile::tempdir().unwrap();
        let f = HashFile::create_zero(dir.path(), "v", 4 * 4096, 4096).unwrap();
        let mut o = Overlay::default();
        let (a, b) = (BlockHash([1; 32]), BlockHash([2; 32]));
        o.record(1, &[(1, a), (2, a)]);
        o.record(2, &[(2, b)]);
        let mut out = Vec::new();
        View {
            file: &f,
            overlay: &o,
        }
        .read(0, 4, &mut out)
        .unwrap();
        let z = zero_hash(4096);
        assert_eq!(out, [z, a, b, z]);
        // Point 1 durable and written: its block 1 leaves the overlay,
        // block 2 is point 2's.
        f.write(&[(1, a), (2, a)]).unwrap();
        o.settle_through(1);
        assert_eq!(o.len(), 1);
        View {
            file: &f,
            overlay: &o,
        }
        .read(1, 2, &mut out)
        .unwrap();
        assert_eq!(out, [a, b]);
    }
}
