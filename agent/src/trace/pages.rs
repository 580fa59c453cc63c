//! Which 4 KiB pages of each dirty block were written (sub-block
//! tracking, issue 19): a block written only in a few places is read and
//! sent as those pages (a `PartialBlock` the receiver merges with the
//! block's last committed content), not whole.
//!
//! Writes complete in 512-byte sectors; their ranges are rounded out to
//! whole 4 KiB pages, which O_DIRECT reads need. A block keeps its pages
//! as at most [`MAX_RUNS`] runs; written in more places, or in more than
//! half of its pages, it collapses to whole (reading it whole then costs
//! at most twice what was written). Memory: a block read whole costs its
//! bit in the dirty set only; a block with pages costs one
//! `BTreeMap<u64, Pages>` entry, 26 bytes of key and value and about 50
//! with the tree's nodes; at most [`MAX_RANGED_BLOCKS`] per volume (about
//! 13 MiB), past which newly dirty blocks are whole.

use std::collections::BTreeMap;

use roaring::RoaringTreemap;

/// Bytes per page: the unit of sub-block reads (O_DIRECT alignment).
pub const PAGE: u64 = 4096;
/// Most runs of written pages kept per block.
pub const MAX_RUNS: usize = 4;
/// Most blocks per volume whose pages are kept.
pub const MAX_RANGED_BLOCKS: usize = 1 << 18;

/// The written pages of one block: ascending, disjoint, non-adjacent runs
/// `(first, end)` of page numbers within the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pages {
    runs: [(u16, u16); MAX_RUNS],
    n: u8,
}

impl Pages {
    /// Pages `first..end` of a block.
    pub fn one(first: u16, end: u16) -> Self {
        let mut runs = [(0, 0); MAX_RUNS];
        runs[0] = (first, end);
        Self { runs, n: 1 }
    }

    /// The runs, ascending.
    pub fn runs(&self) -> &[(u16, u16)] {
        self.runs.get(..usize::from(self.n)).unwrap_or_default()
    }

    /// Number of pages.
    pub fn count(&self) -> u64 {
        self.runs()
            .iter()
            .map(|&(a, b)| u64::from(b.saturating_sub(a)))
            .sum()
    }

    /// Whether pages this many of a block of `per_block` pages are worth
    /// sending apart (at most half of the block).
    fn small(count: u64, per_block: u16) -> bool {
        count * 2 <= u64::from(per_block)
    }

    /// Add pages `first..end`; false if the block is now to be read whole
    /// (more than [`MAX_RUNS`] runs, or more than half of its
    /// `per_block` pages).
    #[must_use]
    pub fn add(&mut self, first: u16, end: u16, per_block: u16) -> bool {
        let mut all = [(0u16, 0u16); MAX_RUNS + 1];
        let mut k = 0;
        for &r in self.runs().iter().chain(std::iter::once(&(first, end))) {
            if let Some(slot) = all.get_mut(k) {
                *slot = r;
                k += 1;
            }
        }
        let all = all.get_mut(..k).unwrap_or_default();
        all.sort_unstable();
        let mut out = [(0u16, 0u16); MAX_RUNS];
        let mut n = 0usize;
        for &(a, b) in all.iter() {
            match n.checked_sub(1).and_then(|last| out.get_mut(last)) {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => {
                    let Some(slot) = out.get_mut(n) else {
                        return false;
                    };
                    *slot = (a, b);
                    n += 1;
                }
            }
        }
        self.runs = out;
        self.n = n as u8;
        Self::small(self.count(), per_block)
    }
}

/// The dirty blocks of a volume, with the written pages of those written
/// only in part.
#[derive(Debug, Clone, Default)]
pub struct Dirty {
    /// Every dirty block.
    pub blocks: RoaringTreemap,
    /// Of those, the ones only partly written: their pages. A block in
    /// `blocks` and not here is read whole.
    pub pages: BTreeMap<u64, Pages>,
    /// Bytes per block.
    block_size: u64,
    /// Pages per block; 0 when the block size leaves nothing to split
    /// (one page), then no pages are kept.
    per_block: u16,
}

impl Dirty {
    /// An empty set for blocks of `block_size` bytes.
    pub fn new(block_size: u32) -> Self {
        let per = u64::from(block_size) / PAGE;
        Self {
            blocks: RoaringTreemap::new(),
            pages: BTreeMap::new(),
            block_size: u64::from(block_size),
            per_block: if per >= 2 {
                u16::try_from(per).unwrap_or(0)
            } else {
                0
            },
        }
    }

    /// `blocks`, all to be read whole.
    pub fn whole(blocks: RoaringTreemap, block_size: u32) -> Self {
        let mut d = Self::new(block_size);
        d.blocks = blocks;
        d
    }

    /// Take everything, leaving an empty set for the same block size.
    pub fn take(&mut self) -> Self {
        let empty = Self {
            blocks: RoaringTreemap::new(),
            pages: BTreeMap::new(),
            block_size: self.block_size,
            per_block: self.per_block,
        };
        std::mem::replace(self, empty)
    }

    /// Whether nothing is dirty.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Bytes a point reads of these blocks: whole blocks, and the written
    /// pages of those kept as pages (an estimate: a point may still read
    /// such a block whole, see `cycle::partial`).
    pub fn read_bytes(&self) -> u64 {
        let ranged = self.pages.len() as u64;
        let pages: u64 = self.pages.values().map(Pages::count).sum();
        self.blocks.len().saturating_sub(ranged) * self.block_size + pages * PAGE
    }

    /// Bytes `start..end` of the volume were written.
    pub fn mark(&mut self, start: u64, end: u64) {
        if end <= start || self.block_size == 0 {
            return;
        }
        let bs = self.block_size;
        let (first, last) = (start / bs, (end - 1) / bs);
        let per = u64::from(self.per_block);
        if per == 0 {
            // One page per block: blocks only.
            self.mark_whole(first, last);
            return;
        }
        // The pages of block `b` the write covers, if not all of them.
        let part = |b: u64| {
            let lo = (start.max(b * bs) - b * bs) / PAGE;
            let hi = (end.min((b + 1) * bs) - b * bs).div_ceil(PAGE);
            (lo != 0 || hi < per).then_some((lo as u16, hi.min(per) as u16))
        };
        let head = part(first);
        let tail = if last == first { None } else { part(last) };
        if let Some((lo, hi)) = head {
            self.mark_pages(first, lo, hi);
        }
        if let Some((lo, hi)) = tail {
            self.mark_pages(last, lo, hi);
        }
        let from = first + u64::from(head.is_some());
        let to = if tail.is_some() { last - 1 } else { last };
        if from <= to {
            self.mark_whole(from, to);
        }
    }

    /// Pages `lo..hi` of block `b` were written.
    fn mark_pages(&mut self, b: u64, lo: u16, hi: u16) {
        if !self.blocks.contains(b) {
            self.blocks.insert(b);
            let p = Pages::one(lo, hi);
            if Pages::small(p.count(), self.per_block) && self.pages.len() < MAX_RANGED_BLOCKS {
                self.pages.insert(b, p);
            }
        } else if let Some(p) = self.pages.get_mut(&b) {
            if !p.add(lo, hi, self.per_block) {
                self.pages.remove(&b);
            }
        }
    }

    /// Blocks `first..=last` were written whole.
    fn mark_whole(&mut self, first: u64, last: u64) {
        self.blocks.insert_range(first..=last);
        if self.pages.is_empty() {
            return;
        }
        let drop: Vec<u64> = self.pages.range(first..=last).map(|(&b, _)| b).collect();
        for b in drop {
            self.pages.remove(&b);
        }
    }

    /// Add `blocks`, all read whole.
    pub fn add_whole(&mut self, blocks: &RoaringTreemap) {
        if !self.pages.is_empty() {
            self.pages.retain(|b, _| !blocks.contains(*b));
        }
        self.blocks |= blocks;
    }

    /// Add what `other` holds: a block either set holds whole is whole.
    pub fn merge(&mut self, other: Self) {
        let per = self.per_block;
        let Self {
            blocks: other_blocks,
            pages: mut other_pages,
            ..
        } = other;
        self.pages.retain(|b, p| {
            if !other_blocks.contains(*b) {
                return true;
            }
            match other_pages.remove(b) {
                None => false,
                Some(q) => q.runs().iter().all(|&(a, e)| p.add(a, e, per)),
            }
        });
        for (b, q) in other_pages {
            if !self.blocks.contains(b) && self.pages.len() < MAX_RANGED_BLOCKS {
                self.pages.insert(b, q);
            }
        }
        self.blocks |= other_blocks;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: u32 = 64 << 10;

    fn runs(d: &Dirty, b: u64) -> Option<Vec<(u16, u16)>> {
        d.pages.get(&b).map(|p| p.runs().to_vec())
    }

    #[test]
    fn a_small_write_keeps_its_pages_rounded_out() {
        let mut d = Dirty::new(BS);
        // 512 bytes at 4 KiB + 100 of block 2: page 1.
        let at = 2 * u64::from(BS) + 4096 + 100;
        d.mark(at, at + 512);
        assert_eq!(d.blocks.iter().collect::<Vec<_>>(), [2]);
        assert_eq!(runs(&d, 2), Some(vec![(1, 2)]));
        // Straddling pages 3 and 4.
        let at = 2 * u64::from(BS) + 4 * 4096 - 512;
        d.mark(at, at + 1024);
        assert_eq!(runs(&d, 2), Some(vec![(1, 2), (3, 5)]));
        // Adjacent runs join.
        d.mark(2 * u64::from(BS) + 2 * 4096, 2 * u64::from(BS) + 3 * 4096);
        assert_eq!(runs(&d, 2), Some(vec![(1, 5)]));
    }

    #[test]
    fn blocks_collapse_to_whole_past_a_few_runs_or_half_the_block() {
        let base = 5 * u64::from(BS);
        let mut d = Dirty::new(BS);
        for k in [0u64, 2, 4, 6] {
            d.mark(base + k * PAGE, base + (k + 1) * PAGE);
        }
        assert_eq!(runs(&d, 5).map(|r| r.len()), Some(4));
        d.mark(base + 8 * PAGE, base + 9 * PAGE);
        assert_eq!(runs(&d, 5), None, "a fifth run: whole");
        assert!(d.blocks.contains(5));
        let mut d = Dirty::new(BS);
        d.mark(base, base + 8 * PAGE);
        assert_eq!(runs(&d, 5), Some(vec![(0, 8)]), "half: kept");
        d.mark(base + 9 * PAGE, base + 10 * PAGE);
        assert_eq!(runs(&d, 5), None, "more than half: whole");
    }

    #[test]
    fn a_write_across_blocks_keeps_the_ends_and_marks_the_middle_whole() {
        let bs = u64::from(BS);
        let mut d = Dirty::new(BS);
        d.mark(3 * bs + 5 * PAGE, 3 * bs + 6 * PAGE);
        d.mark(3 * bs + 15 * PAGE, 6 * bs + PAGE);
        assert_eq!(d.blocks.iter().collect::<Vec<_>>(), [3, 4, 5, 6]);
        assert_eq!(runs(&d, 3), Some(vec![(5, 6), (15, 16)]));
        assert_eq!(runs(&d, 4), None);
        assert_eq!(runs(&d, 5), None);
        assert_eq!(runs(&d, 6), Some(vec![(0, 1)]));
        // A whole block later written in part stays whole.
        d.mark(4 * bs, 4 * bs + PAGE);
        assert_eq!(runs(&d, 4), None);
        // A write covering a block with pages makes it whole.
        d.mark(3 * bs, 4 * bs);
        assert_eq!(runs(&d, 3), None);
        // A write of exactly one whole block.
        let mut d = Dirty::new(BS);
        d.mark(9 * bs, 10 * bs);
        assert_eq!(d.blocks.iter().collect::<Vec<_>>(), [9]);
        assert!(d.pages.is_empty());
    }

    #[test]
    fn read_bytes_count_whole_blocks_and_kept_pages() {
        let mut d = Dirty::new(BS);
        assert_eq!(d.read_bytes(), 0);
        // Block 0: one page; block 1: pages 2-3; blocks 3-4 whole.
        d.mark(0, 100);
        d.mark(u64::from(BS) + 2 * PAGE, u64::from(BS) + 4 * PAGE);
        d.mark(3 * u64::from(BS), 5 * u64::from(BS));
        assert_eq!(d.read_bytes(), 3 * PAGE + 2 * u64::from(BS));
        // Half of block 0 and more: read whole.
        d.mark(PAGE, 9 * PAGE);
        assert_eq!(d.read_bytes(), 2 * PAGE + 3 * u64::from(BS));
    }

    #[test]
    fn one_page_blocks_keep_no_pages() {
        let mut d = Dirty::new(4096);
        d.mark(4096 + 100, 3 * 4096 + 512);
        assert!(d.pages.is_empty());
        assert_eq!(d.blocks.iter().collect::<Vec<_>>(), [1, 2, 3]);
    }

    #[test]
    fn merging_keeps_pages_only_where_both_sides_have_them() {
        let bs = u64::from(BS);
        let mut a = Dirty::new(BS);
        a.mark(bs, bs + PAGE); // 1: pages
        a.mark(2 * bs, 2 * bs + PAGE); // 2: pages, whole in b
        a.add_whole(&RoaringTreemap::from_iter([3u64])); // 3: whole
        let mut b = Dirty::new(BS);
        b.mark(bs + 4 * PAGE, bs + 5 * PAGE);
        b.mark(2 * bs, 3 * bs);
        b.mark(3 * bs + PAGE, 3 * bs + 2 * PAGE);
        b.mark(7 * bs, 7 * bs + PAGE); // 7: new, pages
        a.merge(b);
        assert_eq!(a.blocks.iter().collect::<Vec<_>>(), [1, 2, 3, 7]);
        assert_eq!(runs(&a, 1), Some(vec![(0, 1), (4, 5)]));
        assert_eq!(runs(&a, 2), None);
        assert_eq!(runs(&a, 3), None);
        assert_eq!(runs(&a, 7), Some(vec![(0, 1)]));
        let taken = a.take();
        assert!(a.is_empty());
        a.mark(bs, bs + PAGE);
        assert_eq!(runs(&a, 1), Some(vec![(0, 1)]), "take keeps the block size");
        assert_eq!(taken.blocks.len(), 4);
    }
}
