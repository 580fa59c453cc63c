//! The bodies of the partial-block frames (kinds 25 and 26, feature bit
//! [`FEATURE_PARTIAL`](crate::limits::FEATURE_PARTIAL)): an agent that
//! tracks written sector ranges sends only those bytes of a block, with the
//! hash of the block they apply to; the receiver merges them with that
//! base, stores the result as a normal block and answers with its hash.
//! Layouts are drawn in the crate docs.
//!
//! Decoding checks everything that needs no store: at least one and at
//! most [`MAX_PARTIAL_RANGES`](crate::limits::MAX_PARTIAL_RANGES) ranges,
//! none empty, ascending and disjoint, each inside the block (`raw_len`, at
//! most the largest block size), and exactly their bytes as data. The
//! receiver checks the base hash and the block's place in its volume.

use bytes::{BufMut, Bytes, BytesMut};

use crate::block::BlockHash;
use crate::limits::{MAX_BLOCK_SIZE, MAX_PARTIAL_RANGES, PARTIAL_HEADER_LEN, PARTIAL_RANGE_LEN};
use crate::reader::Reader;
use crate::DecodeError;

/// Bytes `offset .. offset + len` of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte, from the start of the block.
    pub offset: u32,
    /// Number of bytes (at least 1).
    pub len: u32,
}

impl ByteRange {
    /// One past the last byte (no overflow: checked when decoding).
    pub fn end(&self) -> u64 {
        u64::from(self.offset) + u64::from(self.len)
    }
}

/// `PartialBlock`: some byte ranges of block `index`, to apply to the block
/// whose BLAKE3 is `base_hash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartialBlockFrame {
    /// The agent's tag of the point.
    pub tag: u64,
    /// Index of the volume in the session's `Open`.
    pub volume: u16,
    /// Block index.
    pub index: u64,
    /// Length of the whole block (the base's and the result's).
    pub raw_len: u32,
    /// BLAKE3 of the block the ranges apply to (the block as the agent last
    /// sent it and the receiver made durable).
    pub base_hash: BlockHash,
    /// Ascending, disjoint, non-empty ranges inside the block.
    pub ranges: Vec<ByteRange>,
    /// The ranges' new bytes, in order (`Σ len` bytes).
    pub data: Bytes,
}

/// `PartialApplied`: the receiver merged a `PartialBlock`; the block's new
/// hash. Sent on the data stream before the `Received` that covers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartialAppliedFrame {
    /// The point's tag.
    pub tag: u64,
    /// Volume index.
    pub volume: u16,
    /// Block index.
    pub index: u64,
    /// BLAKE3 of the merged block.
    pub hash: BlockHash,
}

impl PartialBlockFrame {
    /// Bytes of the body on the wire.
    pub fn body_len(&self) -> usize {
        PARTIAL_HEADER_LEN + self.ranges.len() * PARTIAL_RANGE_LEN + self.data.len()
    }

    pub(super) fn encode(&self, dst: &mut BytesMut) {
        dst.put_u64_le(self.tag);
        dst.put_u16_le(self.volume);
        dst.put_u64_le(self.index);
        dst.put_u32_le(self.raw_len);
        dst.put_slice(self.base_hash.as_bytes());
        // INVARIANT: an encoder holds at most MAX_PARTIAL_RANGES ranges (the
        // agent collapses more into a whole block); a longer list would not
        // decode, so it is cut rather than wrapped.
        let n = self.ranges.len().min(MAX_PARTIAL_RANGES);
        dst.put_u16_le(n as u16);
        for r in self.ranges.iter().take(n) {
            dst.put_u32_le(r.offset);
            dst.put_u32_le(r.len);
        }
        dst.put_slice(&self.data);
    }

    pub(super) fn parse(body: &Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body, "PartialBlock");
        let tag = r.u64()?;
        let volume = r.u16()?;
        let index = r.u64()?;
        let raw_len = r.u32()?;
        if raw_len == 0 || raw_len > MAX_BLOCK_SIZE {
            return Err(DecodeError::Invalid("partial block length"));
        }
        let base_hash = BlockHash(r.array()?);
        let count = usize::from(r.u16()?);
        if count == 0 || count > MAX_PARTIAL_RANGES {
            return Err(DecodeError::Invalid("partial range count"));
        }
        let mut ranges = Vec::with_capacity(count);
        let mut end = 0u64;
        for _ in 0..count {
            let range = ByteRange {
                offset: r.u32()?,
                len: r.u32()?,
            };
            if range.len == 0 {
                return Err(DecodeError::Invalid("empty partial range"));
            }
            if u64::from(range.offset) < end {
                return Err(DecodeError::Invalid("partial ranges overlap or descend"));
            }
            end = range.end();
            if end > u64::from(raw_len) {
                return Err(DecodeError::Invalid("partial range outside the block"));
            }
            ranges.push(range);
        }
        let want: u64 = ranges.iter().map(|r| u64::from(r.len)).sum();
        let at = body.len() - r.remaining();
        if r.remaining() as u64 != want {
            return Err(DecodeError::Invalid("partial data length"));
        }
        Ok(Self {
            tag,
            volume,
            index,
            raw_len,
            base_hash,
            ranges,
            data: body.slice(at..),
        })
    }

    /// Apply the ranges to `base` (the block whose hash is `base_hash`,
    /// `raw_len` bytes long), in place. `false` if its length is not
    /// `raw_len` (then `base` is untouched) or the ranges do not fit it (a
    /// frame built, not decoded).
    pub fn apply(&self, base: &mut [u8]) -> bool {
        if base.len() as u64 != u64::from(self.raw_len) {
            return false;
        }
        let mut data = &self.data[..];
        for r in &self.ranges {
            let (Some(dst), Some((src, rest))) = (
                base.get_mut(r.offset as usize..r.end() as usize),
                data.split_at_checked(r.len as usize),
            ) else {
                return false;
            };
            dst.copy_from_slice(src);
            data = rest;
        }
        true
    }
}

impl PartialAppliedFrame {
    pub(super) fn encode(&self, dst: &mut BytesMut) {
        dst.put_u64_le(self.tag);
        dst.put_u16_le(self.volume);
        dst.put_u64_le(self.index);
        dst.put_slice(self.hash.as_bytes());
    }

    pub(super) fn parse(body: &Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body, "PartialApplied");
        let tag = r.u64()?;
        let volume = r.u16()?;
        let index = r.u64()?;
        let hash = BlockHash(r.array()?);
        r.finish()?;
        Ok(Self {
            tag,
            volume,
            index,
            hash,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(raw_len: u32, ranges: &[(u32, u32)], data: &[u8]) -> PartialBlockFrame {
        PartialBlockFrame {
            tag: 1,
            volume: 0,
            index: 7,
            raw_len,
            base_hash: BlockHash::of(b"base"),
            ranges: ranges
                .iter()
                .map(|&(offset, len)| ByteRange { offset, len })
                .collect(),
            data: Bytes::copy_from_slice(data),
        }
    }

    fn body(f: &PartialBlockFrame) -> Bytes {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        b.freeze()
    }

    #[test]
    fn hostile_bodies_are_refused_with_their_reason() {
        let cases: [(PartialBlockFrame, &str); 7] = [
            (frame(4096, &[], b""), "partial range count"),
            (frame(4096, &[(0, 0)], b""), "empty partial range"),
            (
                frame(4096, &[(0, 8), (4, 8)], &[1; 16]),
                "partial ranges overlap or descend",
            ),
            (
                frame(4096, &[(8, 8), (0, 8)], &[1; 16]),
                "partial ranges overlap or descend",
            ),
            (
                frame(4096, &[(4090, 8)], &[1; 8]),
                "partial range outside the block",
            ),
            (frame(4096, &[(0, 8)], &[1; 7]), "partial data length"),
            (frame(0, &[(0, 1)], &[1]), "partial block length"),
        ];
        for (f, why) in cases {
            assert_eq!(
                PartialBlockFrame::parse(&body(&f)),
                Err(DecodeError::Invalid(why)),
                "{f:?}"
            );
        }
        let mut extra = BytesMut::from(&body(&frame(4096, &[(0, 2)], &[1, 2]))[..]);
        extra.put_u8(0);
        assert_eq!(
            PartialBlockFrame::parse(&extra.freeze()),
            Err(DecodeError::Invalid("partial data length"))
        );
    }

    #[test]
    fn a_range_ending_at_the_last_byte_of_u32_does_not_overflow() {
        let f = frame(MAX_BLOCK_SIZE, &[(u32::MAX, 1)], &[1]);
        assert_eq!(
            PartialBlockFrame::parse(&body(&f)),
            Err(DecodeError::Invalid("partial range outside the block"))
        );
    }

    #[test]
    fn ranges_apply_in_place() {
        let f = frame(8, &[(1, 2), (6, 2)], b"abcd");
        let back = PartialBlockFrame::parse(&body(&f)).unwrap();
        assert_eq!(back, f);
        let mut base = *b"........";
        assert!(back.apply(&mut base));
        assert_eq!(&base, b".ab...cd");
        let mut short = *b".......";
        assert!(!back.apply(&mut short));
        assert_eq!(&short, b".......");
    }
}
