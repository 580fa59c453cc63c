//! Hash listing (`GetHashes`): the block hashes of one volume at the
//! server's latest point, so that a resyncing agent sends only the blocks
//! that differ. Blocks the point does not store are zero blocks.

use std::iter::Peekable;
use std::sync::Arc;

use pilotlight_protocol::limits::{block_count, block_len, MAX_HASHES_PER_FRAME};
use pilotlight_protocol::{block, BlockHash, Frame};

use crate::session::Session;
use crate::store::{blocking, Store};
use crate::wire::{send_in, Writer};
use crate::ReceiveError;

/// Send the hashes of the session's volume `volume` at the latest point:
/// `Hashes` frames, then `HashesEnd`.
pub(crate) async fn send_hashes(
    wr: &mut Writer,
    store: &Arc<Store>,
    session: &Session,
    volume: u16,
) -> Result<(), ReceiveError> {
    let Some(v) = session.volumes.get(usize::from(volume)).cloned() else {
        return Err(ReceiveError::Protocol(format!(
            "GetHashes for undeclared volume {volume}"
        )));
    };
    let block_size = v.block_size;
    let store = store.clone();
    let server_id = session.server_id;
    let (point, size, map) = blocking(move || {
        let cat = store.catalog()?;
        let Some(point) = cat.latest_point(server_id)? else {
            return Ok((0, 0, Vec::new()));
        };
        // The agent knows the point by its number among its server's.
        let seq = cat.point_seq(point)?;
        let Some(row) = cat.volume(server_id, &v.name)? else {
            return Ok((seq, 0, Vec::new()));
        };
        Ok((seq, row.size, cat.block_map(row.id, point, 0)?))
    })
    .await?;
    let listing = Listing::new(volume, size, block_size, map);
    let blocks = listing.total;
    for frame in listing {
        send_in(wr, &frame, session).await?;
    }
    let end = Frame::HashesEnd {
        volume,
        point: point as u64,
        blocks,
    };
    send_in(wr, &end, session).await
}

/// The `Hashes` frames of one volume, built from its block map (`(index,
/// hash)` in index order, `None` for a zero block; absent = zero).
pub(crate) struct Listing<M: Iterator<Item = (u64, Option<BlockHash>)>> {
    volume: u16,
    size: u64,
    block_size: u32,
    /// Blocks in the volume.
    pub(crate) total: u64,
    /// First block of the next frame.
    start: u64,
    map: Peekable<M>,
    zero_full: BlockHash,
}

impl Listing<std::vec::IntoIter<(u64, Option<BlockHash>)>> {
    pub(crate) fn new(
        volume: u16,
        size: u64,
        block_size: u32,
        map: Vec<(u64, Option<BlockHash>)>,
    ) -> Self {
        Self {
            volume,
            size,
            block_size,
            total: block_count(size, block_size),
            start: 0,
            map: map.into_iter().peekable(),
            zero_full: block::zero_hash(block_size as usize),
        }
    }
}

impl<M: Iterator<Item = (u64, Option<BlockHash>)>> Listing<M> {
    /// The hash of block `i`: the stored one, or that of zeros.
    fn hash(&mut self, i: u64) -> BlockHash {
        while self.map.peek().is_some_and(|(idx, _)| *idx < i) {
            self.map.next();
        }
        match self.map.peek() {
            Some((idx, Some(h))) if *idx == i => *h,
            _ => {
                let len = block_len(self.size, self.block_size, i);
                if len == self.block_size {
                    self.zero_full
                } else {
                    block::zero_hash(len as usize)
                }
            }
        }
    }
}

impl<M: Iterator<Item = (u64, Option<BlockHash>)>> Iterator for Listing<M> {
    type Item = Frame;

    fn next(&mut self) -> Option<Frame> {
        if self.start >= self.total {
            return None;
        }
        let start = self.start;
        let end = (start + MAX_HASHES_PER_FRAME as u64).min(self.total);
        let hashes = (start..end).map(|i| self.hash(i)).collect();
        self.start = end;
        Some(Frame::Hashes {
            volume: self.volume,
            start,
            hashes,
        })
    }
}

#[cfg(test)]
#[allow(clippy::panic)] // test code
mod tests {
    use super::*;

    fn frames(
        size: u64,
        bs: u32,
        map: Vec<(u64, Option<BlockHash>)>,
    ) -> Vec<(u64, Vec<BlockHash>)> {
        Listing::new(3, size, bs, map)
            .map(|f| match f {
                Frame::Hashes {
                    volume: 3,
                    start,
                    hashes,
                } => (start, hashes),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn an_empty_volume_lists_nothing() {
        assert!(frames(0, 4096, Vec::new()).is_empty());
    }

    #[test]
    fn stored_hashes_fill_their_slots_and_the_rest_hash_zeros() {
        let h = BlockHash::of(b"x");
        // Three blocks, the last one short: 4096 + 4096 + 100 bytes.
        let got = frames(8292, 4096, vec![(0, None), (1, Some(h))]);
        let zero = block::zero_hash(4096);
        assert_eq!(
            got,
            vec![(0, vec![zero, h, block::zero_hash(100)])],
            "the short last block hashes as 100 zero bytes"
        );
    }

    #[test]
    fn long_volumes_are_split_into_frames_of_the_protocol_limit() {
        let n = MAX_HASHES_PER_FRAME as u64;
        let got = frames((2 * n + 1) * 512, 512, Vec::new());
        let starts: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
        assert_eq!(starts, vec![0, n, 2 * n]);
        assert_eq!(
            got.iter().map(|(_, h)| h.len() as u64).sum::<u64>(),
            2 * n + 1
        );
    }
}
