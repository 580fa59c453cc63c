//! Partial blocks (issue 19, `FEATURE_PARTIAL`): a `PartialBlock` frame
//! carries only some byte ranges of a block and the BLAKE3 of the block
//! they apply to. The applier reads that base from the store, verified
//! against its hash (`store::BlockFetcher`), copies the ranges over it,
//! hashes the result and hands it on as a whole block (compressed like an
//! agent's), so dedup, packs, quota and the session see nothing new. The
//! stream answers `PartialApplied` with the new hash before the `Received`
//! that covers the frame.
//!
//! The base must be a block this server stored in a committed point (under
//! `dedup = "global"`, any server's), or the all-zero block: a hash the
//! server could not have read is refused, so a partial block reveals
//! nothing of another server's data. Decoding (`protocol::frame`) already
//! refused ranges that overlap, descend, leave the block or do not match
//! the data.

use pilotlight_protocol::block::{zero_hash, Encoder, Encoding};
use pilotlight_protocol::frame::{BlockFrame, PartialAppliedFrame};
use pilotlight_protocol::limits::{block_count, block_len};
use pilotlight_protocol::{BlockHash, PartialBlockFrame};

use crate::session::Session;
use crate::store::{BlockFetcher, Store};
use crate::ReceiveError;

/// One applier's partial-block merger: its fetcher, encoder and buffer.
pub(crate) struct Merger {
    fetcher: BlockFetcher,
    encoder: Encoder,
    block: Vec<u8>,
}

impl Merger {
    pub(crate) fn new(store: &Store) -> Result<Self, ReceiveError> {
        Ok(Self {
            fetcher: BlockFetcher::new(store.dir())?,
            encoder: Encoder::new(1).map_err(|e| ReceiveError::storage(store.dir(), e))?,
            block: Vec::new(),
        })
    }

    /// The whole block `p` makes, as a `Block` frame to apply, and the
    /// answer for the agent.
    pub(crate) fn merge(
        &mut self,
        session: &Session,
        store: &Store,
        p: &PartialBlockFrame,
    ) -> Result<(BlockFrame, PartialAppliedFrame), ReceiveError> {
        let Some(v) = session.volumes.get(usize::from(p.volume)) else {
            return Err(ReceiveError::Protocol(format!(
                "partial block for undeclared volume {}",
                p.volume
            )));
        };
        let count = block_count(v.size, v.block_size);
        let expected = block_len(v.size, v.block_size, p.index);
        if p.index >= count || p.raw_len != expected {
            return Err(ReceiveError::Protocol(format!(
                "partial block {} of {} bytes does not fit volume {} ({count} blocks)",
                p.index, p.raw_len, v.name
            )));
        }
        let base_encoding = self.base(session, store, p)?;
        if !p.apply(&mut self.block) {
            return Err(ReceiveError::Protocol(format!(
                "partial block {} of volume {}: ranges do not fit the block",
                p.index, v.name
            )));
        }
        let hash = BlockHash::of(&self.block);
        // A base stored raw did not compress; a few pages over it will not
        // either (compressing them took most of the receiver's CPU under
        // 4 KiB random writes of such data).
        let (encoding, payload) = if base_encoding == Encoding::Raw {
            (Encoding::Raw, self.block.as_slice())
        } else {
            self.encoder.encode(&self.block)
        };
        let payload = bytes::Bytes::copy_from_slice(payload);
        metrics::counter!("pilotlight_receiver_partial_blocks_total").increment(1);
        let block = BlockFrame {
            tag: p.tag,
            volume: p.volume,
            encoding,
            index: p.index,
            raw_len: p.raw_len,
            hash,
            payload,
        };
        let applied = PartialAppliedFrame {
            tag: p.tag,
            volume: p.volume,
            index: p.index,
            hash,
        };
        Ok((block, applied))
    }

    /// Read the base block of `p` into the buffer, verified; how the base
    /// is stored.
    fn base(
        &mut self,
        session: &Session,
        store: &Store,
        p: &PartialBlockFrame,
    ) -> Result<Encoding, ReceiveError> {
        let len = p.raw_len as usize;
        if p.base_hash == zero_hash(len) {
            self.block.clear();
            self.block.resize(len, 0);
            return Ok(Encoding::Zero);
        }
        let loc = {
            let _gate = store.index_read()?;
            store.find(session.server_id, &p.base_hash, session.limits.dedup)?
        };
        let Some(loc) = loc.filter(|l| l.raw_len == p.raw_len) else {
            return Err(ReceiveError::Protocol(format!(
                "partial block {}: its base {} is not a stored block of this server",
                p.index,
                p.base_hash.to_hex()
            )));
        };
        self.fetcher
            .fetch_current(store, &loc, &p.base_hash, &mut self.block)?;
        Ok(loc.encoding)
    }
}
