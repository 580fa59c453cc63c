//! A small bounded cache of decompressed blocks, so that a client reading a
//! 64 KiB block 4 KiB at a time decompresses and hashes it once, not
//! sixteen times. First in, first out: an export's reads are mostly
//! sequential, and a miss only costs one verified pack read.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;

/// Bytes of decompressed blocks the cache holds at most.
pub(crate) const CACHE_BYTES: usize = 64 << 20;

/// Decompressed, verified blocks by block index.
pub(crate) struct BlockCache {
    inner: Mutex<Inner>,
    capacity: usize,
}

#[derive(Default)]
struct Inner {
    blocks: HashMap<u64, Bytes>,
    order: VecDeque<u64>,
    bytes: usize,
}

impl BlockCache {
    /// A cache holding at most `capacity` bytes.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            capacity,
        }
    }

    /// The block at `index`, if cached.
    pub(crate) fn get(&self, index: u64) -> Option<Bytes> {
        self.inner.lock().ok()?.blocks.get(&index).cloned()
    }

    /// Remember a verified block, evicting the oldest ones to stay in bounds.
    pub(crate) fn put(&self, index: u64, block: Bytes) {
        if block.len() > self.capacity {
            return;
        }
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if inner.blocks.contains_key(&index) {
            return;
        }
        while inner.bytes + block.len() > self.capacity {
            let Some(old) = inner.order.pop_front() else {
                break;
            };
            if let Some(b) = inner.blocks.remove(&old) {
                inner.bytes -= b.len();
            }
        }
        inner.bytes += block.len();
        inner.order.push_back(index);
        inner.blocks.insert(index, block);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_stays_within_its_bytes_and_drops_the_oldest() {
        let cache = BlockCache::new(10);
        for i in 0..5u64 {
            cache.put(i, Bytes::from(vec![i as u8; 4]));
        }
        // 10 bytes hold two 4-byte blocks: the two newest.
        assert!(cache.get(0).is_none() && cache.get(2).is_none());
        assert_eq!(cache.get(4).as_deref(), Some(&[4u8; 4][..]));
        assert!(cache.get(3).is_some());
        cache.put(9, Bytes::from(vec![0u8; 11]));
        assert!(
            cache.get(9).is_none(),
            "a block larger than the cache is not kept"
        );
    }
}
