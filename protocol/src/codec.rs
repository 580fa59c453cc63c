//! The one async-facing piece of this crate: a `tokio_util` codec.

use bytes::BytesMut;

use crate::{DecodeError, Frame};

/// Frames over a byte stream. Decoding yields `(seq, frame)`; encoding numbers
/// outgoing frames itself.
#[derive(Debug, Default)]
pub struct FrameCodec {
    next_seq: u64,
    next_in: u64,
    last_in: u64,
}

/// Errors of the codec: a socket error or a decode error.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The stream failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The peer sent bytes that are not a valid frame.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

impl tokio_util::codec::Decoder for FrameCodec {
    type Item = (u64, Frame);
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, CodecError> {
        match Frame::decode(src)? {
            None => Ok(None),
            Some((seq, frame)) => {
                if seq != self.next_in {
                    return Err(DecodeError::Invalid("frame sequence number").into());
                }
                self.last_in = seq;
                self.next_in += 1;
                Ok(Some((seq, frame)))
            }
        }
    }
}

impl tokio_util::codec::Encoder<&Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        frame.encode(self.next_seq, dst);
        self.next_seq += 1;
        Ok(())
    }
}

impl FrameCodec {
    /// The seq the next encoded frame will carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The seq of the last decoded frame.
    pub fn last_seq(&self) -> u64 {
        self.last_in
    }
}
