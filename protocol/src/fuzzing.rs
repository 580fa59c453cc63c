//! Entry points shared by the cargo-fuzz targets and the proptests, so that a
//! plain `cargo test` exercises what the fuzzers do.

use bytes::BytesMut;

use crate::block::{Decoder, Encoding};
use crate::{BlockHash, Frame};

/// Feed arbitrary bytes to the frame decoder until it stops; it must never
/// panic, and every frame it yields must re-encode to bytes that decode to
/// the same frame.
pub fn decode_frames(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some((seq, frame))) = Frame::decode(&mut buf) {
        let mut again = BytesMut::new();
        frame.encode(seq, &mut again);
        let back = Frame::decode(&mut again);
        assert!(matches!(back, Ok(Some((s, ref f))) if s == seq && *f == frame));
    }
}

/// Feed arbitrary bytes to the block decoder as every encoding, with a raw
/// length taken from the input; it must never panic nor grow its buffer past
/// the declared length.
pub fn decode_block(data: &[u8]) {
    let Some((&len_byte, rest)) = data.split_first() else {
        return;
    };
    let raw_len = (u32::from(len_byte) + 1) * 512;
    let Ok(mut dec) = Decoder::new() else { return };
    let mut out = Vec::new();
    for enc in [Encoding::Zero, Encoding::Raw, Encoding::Zstd] {
        let hash = BlockHash::of(rest);
        let _ = dec.decode(enc, rest, raw_len, &hash, &mut out);
        assert!(out.len() <= raw_len as usize);
        let _ = dec.verify(enc, rest, raw_len, &hash, &mut out);
        assert!(out.len() <= raw_len as usize);
    }
}
