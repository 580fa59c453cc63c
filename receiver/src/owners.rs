//! In memory, which server has stored which block (the catalog's
//! `server_blocks`), and what that charges each server: the scope of
//! deduplication and the committed part of a server's quota usage.
//!
//! The store keeps one [`Owners`] beside its block index. Lock order: the
//! index first, then the owners. A commit adds the point's blocks right
//! after its catalog transaction; garbage collection reloads the whole of
//! it from the catalog after it dropped the rows of unreferenced blocks.

use std::collections::{HashMap, HashSet};

use pilotlight_protocol::BlockHash;

use crate::catalog::Catalog;
use crate::store::BlockIndex;
use crate::ReceiveError;

/// Which server has stored which block, and the stored bytes of them.
#[derive(Debug, Default)]
pub struct Owners {
    blocks: HashMap<i64, HashSet<BlockHash>>,
    used: HashMap<i64, u64>,
}

impl Owners {
    /// Load from the catalog; sizes come from `index` (committed blocks).
    pub fn load(cat: &Catalog, index: &BlockIndex) -> Result<Self, ReceiveError> {
        let blocks = cat.all_server_blocks()?;
        let used = blocks
            .iter()
            .map(|(server, hashes)| {
                let bytes = hashes
                    .iter()
                    .filter_map(|h| index.get(h))
                    .map(|l| u64::from(l.stored_len))
                    .sum();
                (*server, bytes)
            })
            .collect();
        Ok(Self { blocks, used })
    }

    /// Whether `server` has stored the block `hash`.
    pub fn owns(&self, server: i64, hash: &BlockHash) -> bool {
        self.blocks.get(&server).is_some_and(|s| s.contains(hash))
    }

    /// Stored bytes of the blocks `server` has stored.
    pub fn used(&self, server: i64) -> u64 {
        self.used.get(&server).copied().unwrap_or(0)
    }

    /// What committing `hashes` for `server` adds to its usage: the stored
    /// bytes (per `index`) of those it has not stored yet, each counted once.
    pub fn charge<'a>(
        &self,
        server: i64,
        hashes: impl Iterator<Item = &'a BlockHash>,
        index: &BlockIndex,
        pending: &HashMap<BlockHash, u64>,
    ) -> u64 {
        let mut seen = HashSet::new();
        hashes
            .filter(|h| !self.owns(server, h) && seen.insert(**h))
            .map(|h| {
                pending
                    .get(h)
                    .copied()
                    .or_else(|| index.get(h).map(|l| u64::from(l.stored_len)))
                    .unwrap_or(0)
            })
            .sum()
    }

    /// `server` has stored `hashes` (committed, so in `index`).
    pub fn add<'a>(
        &mut self,
        server: i64,
        hashes: impl Iterator<Item = &'a BlockHash>,
        index: &BlockIndex,
    ) {
        let set = self.blocks.entry(server).or_default();
        let used = self.used.entry(server).or_insert(0);
        for h in hashes {
            if set.insert(*h) {
                *used += index.get(h).map_or(0, |l| u64::from(l.stored_len));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::BlockLoc;

    #[test]
    fn each_server_is_charged_once_per_block_it_stored_shared_or_not() {
        let (a, b) = (BlockHash([1; 32]), BlockHash([2; 32]));
        let loc = |stored_len| BlockLoc {
            pack: 1,
            offset: 16,
            stored_len,
            raw_len: 4096,
            encoding: pilotlight_protocol::Encoding::Zstd,
        };
        let index: BlockIndex = [(a, loc(100)), (b, loc(7))].into_iter().collect();
        let mut owners = Owners::default();
        let none = HashMap::new();
        assert_eq!(owners.charge(1, [a, a, b].iter(), &index, &none), 107);
        owners.add(1, [a, a].iter(), &index);
        assert!(owners.owns(1, &a) && !owners.owns(2, &a));
        assert_eq!(owners.used(1), 100);
        assert_eq!(owners.charge(1, [a, b].iter(), &index, &none), 7);
        owners.add(2, [a, b].iter(), &index);
        assert_eq!((owners.used(1), owners.used(2)), (100, 107));
    }
}
