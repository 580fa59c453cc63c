//! Sparse image files: where their data is (SEEK_DATA / SEEK_HOLE), and the
//! work units of a whole-volume scan cut along it.
//!
//! A scan of a regular file first maps its data extents once. Runs of
//! blocks wholly inside a hole of at least one chunk become *hole units*:
//! the worker that takes one asks again, just before it would read, whether
//! the span is still one hole (a live image may have been written since the
//! map), and if so sends its blocks that differ from the base as runs of
//! zeros without reading anything; otherwise it reads the span chunk by
//! chunk like any other. Everything else is cut into chunk-sized *data
//! units*, read as before (a chunk that turns out to be a hole is still
//! skipped). So a 1 TiB image holding a few GiB costs a few thousand units,
//! not half a million.

use std::fs::File;

/// Most blocks of one hole unit: big holes are cut so that the workers
/// share them (each block's base hash is still looked at).
const HOLE_UNIT_BLOCKS: u64 = 1 << 20;

/// Extents mapped at most: a file more fragmented than this is scanned in
/// plain chunks (each chunk still skipped when it is a hole).
const MAX_EXTENTS: usize = 1 << 20;

/// A span of consecutive blocks for one worker to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unit {
    /// First block.
    pub(crate) first: u64,
    /// Number of blocks.
    pub(crate) count: u64,
    /// The span was one hole when the file was mapped.
    pub(crate) hole: bool,
}

impl Unit {
    pub(crate) fn data(first: u64, count: u64) -> Self {
        Self {
            first,
            count,
            hole: false,
        }
    }
}

/// What a worker reads from.
#[derive(Clone, Copy)]
pub(crate) struct Source<'a> {
    pub(crate) file: &'a File,
    /// A regular file, whose holes need no read.
    pub(crate) sparse: bool,
}

impl Source<'_> {
    /// Whether `[offset, offset + len)` is one hole (reads as zeros): the
    /// next data at or after `offset` starts at or past its end. Asked just
    /// before the read it replaces, so it is what a read would have seen.
    pub(crate) fn is_hole(&self, offset: u64, len: u64) -> bool {
        if !self.sparse {
            return false;
        }
        match next_data(self.file, offset) {
            Some(Some(data)) => data >= offset.saturating_add(len),
            // No data from `offset` to the end of the file.
            Some(None) => true,
            // No SEEK_DATA here (or another error): read.
            None => false,
        }
    }

    /// The byte ranges of the file's data below `size` (ascending), or
    /// `None` when the file cannot be mapped (no SEEK_DATA, too many
    /// extents): then it is scanned chunk by chunk.
    pub(crate) fn data_extents(&self, size: u64) -> Option<Vec<(u64, u64)>> {
        if !self.sparse {
            return None;
        }
        let mut extents = Vec::new();
        let mut at = 0u64;
        while at < size {
            let Some(start) = next_data(self.file, at)? else {
                break;
            };
            if start >= size {
                break;
            }
            let end = next_hole(self.file, start)?.min(size);
            if end <= start || extents.len() >= MAX_EXTENTS {
                return None;
            }
            extents.push((start, end));
            at = end;
        }
        Some(extents)
    }
}

/// `Some(Some(offset))` of the next data at or after `offset`,
/// `Some(None)` when there is none, `None` when the file cannot tell.
fn next_data(file: &File, offset: u64) -> Option<Option<u64>> {
    let off = libc::off_t::try_from(offset).ok()?;
    match nix::unistd::lseek(file, off, nix::unistd::Whence::SeekData) {
        Ok(data) => u64::try_from(data).ok().map(Some),
        Err(nix::errno::Errno::ENXIO) => Some(None),
        Err(_) => None,
    }
}

/// The start of the hole at or after `offset` (the end of the file counts).
fn next_hole(file: &File, offset: u64) -> Option<u64> {
    let off = libc::off_t::try_from(offset).ok()?;
    nix::unistd::lseek(file, off, nix::unistd::Whence::SeekHole)
        .ok()
        .and_then(|h| u64::try_from(h).ok())
}

/// The work units of a whole volume of `blocks` blocks of `block_size`
/// bytes, given its data extents (byte ranges, ascending): spans of at
/// least `per_chunk` blocks wholly in holes become hole units (cut at
/// [`HOLE_UNIT_BLOCKS`]), the rest data units of at most `per_chunk`.
pub(crate) fn units_along(
    extents: &[(u64, u64)],
    blocks: u64,
    block_size: u32,
    per_chunk: u64,
) -> Vec<Unit> {
    let bs = u64::from(block_size.max(1));
    let per_chunk = per_chunk.max(1);
    // Data spans in whole blocks, joined across holes shorter than a chunk.
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for &(start, end) in extents {
        let (first, last) = (start / bs, end.div_ceil(bs).min(blocks));
        match spans.last_mut() {
            Some((_, e)) if first < e.saturating_add(per_chunk) => *e = (*e).max(last),
            _ => spans.push((first, last)),
        }
    }
    let mut units = Vec::new();
    let mut at = 0u64;
    let hole = |units: &mut Vec<Unit>, from: u64, to: u64| {
        let mut f = from;
        while f < to {
            let n = (to - f).min(HOLE_UNIT_BLOCKS);
            units.push(Unit {
                first: f,
                count: n,
                hole: true,
            });
            f += n;
        }
    };
    for (first, last) in spans {
        if first > at {
            hole(&mut units, at, first);
        }
        let mut f = first.max(at);
        while f < last {
            let n = (last - f).min(per_chunk);
            units.push(Unit::data(f, n));
            f += n;
        }
        at = at.max(last);
    }
    hole(&mut units, at, blocks);
    units
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use super::*;

    #[test]
    fn units_follow_the_data_and_leave_big_holes_whole() {
        let bs = 4096u32;
        let b = |n: u64| n * 4096;
        // 100 blocks; data in blocks 0..2 (ending mid-block), 3..4 (a hole
        // of one block between: joined), 50..52, and nothing past 52.
        let extents = [(0, b(1) + 10), (b(3), b(4)), (b(50), b(52))];
        let units = units_along(&extents, 100, bs, 4);
        assert_eq!(
            units,
            vec![
                Unit::data(0, 4),
                Unit {
                    first: 4,
                    count: 46,
                    hole: true
                },
                Unit::data(50, 2),
                Unit {
                    first: 52,
                    count: 48,
                    hole: true
                },
            ]
        );
        // No data: one hole (cut at the unit limit); all data: chunks.
        let empty = units_along(&[], HOLE_UNIT_BLOCKS + 3, bs, 4);
        assert_eq!(empty.len(), 2);
        assert!(empty.iter().all(|u| u.hole));
        assert_eq!(empty[1].count, 3);
        assert_eq!(
            units_along(&[(0, b(10))], 10, bs, 4),
            vec![Unit::data(0, 4), Unit::data(4, 4), Unit::data(8, 2)]
        );
    }

    #[test]
    fn every_block_is_in_exactly_one_unit() {
        let bs = 65536u32;
        for extents in [
            vec![(0u64, 1u64)],
            vec![(65536 * 7 + 1, 65536 * 9), (65536 * 9 + 5, 65536 * 40)],
            vec![(65536 * 99, 65536 * 100 + 17)],
        ] {
            let units = units_along(&extents, 101, bs, 32);
            let mut next = 0;
            for u in &units {
                assert_eq!(u.first, next, "{units:?}");
                assert!(u.count > 0);
                next += u.count;
            }
            assert_eq!(next, 101);
            // Every data byte is in a data unit.
            for &(s, e) in &extents {
                for byte in [s, e - 1] {
                    let blk = byte / 65536;
                    let u = units
                        .iter()
                        .find(|u| (u.first..u.first + u.count).contains(&blk));
                    assert!(!u.unwrap().hole, "{blk} in {units:?}");
                }
            }
        }
    }

    #[test]
    fn a_sparse_file_maps_to_its_data() {
        use std::os::unix::fs::FileExt;
        let f = tempfile::tempfile().unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 8 << 20).unwrap();
        let src = Source {
            file: &f,
            sparse: true,
        };
        let Some(ext) = src.data_extents(64 << 20) else {
            return; // a filesystem without SEEK_DATA
        };
        assert!(!ext.is_empty());
        assert!(ext
            .iter()
            .all(|&(s, e)| s <= 8 << 20 && e >= (8 << 20) + 4096));
        assert!(src.is_hole(0, 8 << 20) || ext[0].0 == 0);
        assert!(!src.is_hole(8 << 20, 4096));
    }
}
