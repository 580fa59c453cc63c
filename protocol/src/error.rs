//! Decoding errors.

/// Why bytes from the peer could not be decoded. Holds no strings: it is
/// cheap, `Copy`, and matched on by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// A frame body longer than [`crate::limits::MAX_BODY_LEN`].
    #[error("frame body of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// A frame kind this version does not know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The frame's CRC does not match its bytes.
    #[error("frame checksum mismatch")]
    BadCrc,
    /// Flags or reserved bits set that version 1 does not define.
    #[error("reserved header bits set")]
    Reserved,
    /// A body ended before a field was complete.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// A body had bytes after its last field.
    #[error("trailing bytes after {0}")]
    TrailingData(&'static str),
    /// The connection did not start with the pilotlight magic.
    #[error("not a pilotlight peer (bad magic)")]
    BadMagic,
    /// The peer speaks a protocol version we do not.
    #[error("unsupported protocol version {got} (this build speaks {supported})")]
    BadVersion {
        /// Version the peer sent.
        got: u16,
        /// Version we speak.
        supported: u16,
    },
    /// A field holds a value outside its allowed range.
    #[error("invalid {0}")]
    Invalid(&'static str),
}
