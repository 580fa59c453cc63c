//! The numbers and byte layouts of the NBD protocol (fixed newstyle, as
//! written down in the NBD project's `doc/proto.md`), and the few encoders
//! and decoders the option and transmission phases share.
//!
//! NBD is big-endian ("network byte order") by its own spec, unlike our own
//! wire format: every field here goes through `bytes`' `put_u*` / `try_get_u*`
//! (big-endian), never through `to_be_bytes`.
//!
//! ```text
//! server greeting   NBDMAGIC:u64 | IHAVEOPT:u64 | handshake flags:u16
//! client flags      flags:u32
//! option            IHAVEOPT:u64 | option:u32 | length:u32 | data[length]
//! option reply      REPLY_MAGIC:u64 | option:u32 | type:u32 | length:u32 | data[length]
//! request           REQUEST_MAGIC:u32 | flags:u16 | type:u16 | cookie:u64 | offset:u64 | length:u32
//!                   (+ data[length] for WRITE)
//! simple reply      SIMPLE_MAGIC:u32 | error:u32 | cookie:u64 (+ data for READ)
//! structured chunk  CHUNK_MAGIC:u32 | flags:u16 | type:u16 | cookie:u64 | length:u32 | data[length]
//!   OFFSET_DATA     data = offset:u64 | bytes[length - 8]
//!   OFFSET_HOLE     data = offset:u64 | hole size:u32          (reads as zeros)
//! ```

use bytes::{Buf, BufMut, BytesMut};

/// `NBDMAGIC`, first in the server's greeting.
pub(crate) const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, in the greeting and before every option.
pub(crate) const OPT_MAGIC: u64 = 0x4948_4156_454f_5054;
/// Magic of option replies.
pub(crate) const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of transmission requests.
pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of simple replies.
pub(crate) const SIMPLE_MAGIC: u32 = 0x6744_6698;
/// Magic of structured reply chunks.
pub(crate) const CHUNK_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: fixed newstyle.
pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Handshake flag: the 124 zero bytes after `NBD_OPT_EXPORT_NAME` may go.
pub(crate) const FLAG_NO_ZEROES: u16 = 2;
/// Client flags this server knows (`C_FIXED_NEWSTYLE`, `C_NO_ZEROES`);
/// any other bit closes the connection, as the spec requires.
pub(crate) const KNOWN_CLIENT_FLAGS: u32 = 1 | 2;

/// Options.
pub(crate) const OPT_EXPORT_NAME: u32 = 1;
pub(crate) const OPT_ABORT: u32 = 2;
pub(crate) const OPT_LIST: u32 = 3;
pub(crate) const OPT_STARTTLS: u32 = 5;
pub(crate) const OPT_INFO: u32 = 6;
pub(crate) const OPT_GO: u32 = 7;
pub(crate) const OPT_STRUCTURED_REPLY: u32 = 8;
pub(crate) const OPT_LIST_META_CONTEXT: u32 = 9;
pub(crate) const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub(crate) const REP_ACK: u32 = 1;
pub(crate) const REP_SERVER: u32 = 2;
pub(crate) const REP_INFO: u32 = 3;
pub(crate) const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub(crate) const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub(crate) const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub(crate) const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
pub(crate) const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;

/// `NBD_REP_INFO` types.
pub(crate) const INFO_EXPORT: u16 = 0;
pub(crate) const INFO_NAME: u16 = 1;
pub(crate) const INFO_DESCRIPTION: u16 = 2;
pub(crate) const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub(crate) const TF_HAS_FLAGS: u16 = 1;
pub(crate) const TF_READ_ONLY: u16 = 1 << 1;
pub(crate) const TF_SEND_FLUSH: u16 = 1 << 2;
pub(crate) const TF_SEND_FUA: u16 = 1 << 3;
pub(crate) const TF_SEND_TRIM: u16 = 1 << 5;
pub(crate) const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub(crate) const TF_CAN_MULTI_CONN: u16 = 1 << 8;

/// Commands.
pub(crate) const CMD_READ: u16 = 0;
pub(crate) const CMD_WRITE: u16 = 1;
pub(crate) const CMD_DISC: u16 = 2;
pub(crate) const CMD_FLUSH: u16 = 3;
pub(crate) const CMD_TRIM: u16 = 4;
pub(crate) const CMD_WRITE_ZEROES: u16 = 6;
pub(crate) const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: the write is durable before the reply.
pub(crate) const CMD_FLAG_FUA: u16 = 1;
/// Command flag: answer a READ with one content chunk ("don't fragment").
pub(crate) const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: answer block status with one descriptor only.
pub(crate) const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Structured reply chunk flag: the last chunk of this reply.
pub(crate) const CHUNK_DONE: u16 = 1;
/// Structured reply chunk types.
pub(crate) const CHUNK_NONE: u16 = 0;
pub(crate) const CHUNK_OFFSET_DATA: u16 = 1;
pub(crate) const CHUNK_OFFSET_HOLE: u16 = 2;
pub(crate) const CHUNK_BLOCK_STATUS: u16 = 5;
pub(crate) const CHUNK_ERROR: u16 = (1 << 15) | 1;

/// Errors (the errno values NBD carries).
pub(crate) const EPERM: u32 = 1;
pub(crate) const EIO: u32 = 5;
pub(crate) const EINVAL: u32 = 22;
pub(crate) const ENOSPC: u32 = 28;
pub(crate) const EOVERFLOW: u32 = 75;

/// The one metadata context: which blocks hold data.
pub(crate) const BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation` status bits.
pub(crate) const STATE_HOLE: u32 = 1;
pub(crate) const STATE_ZERO: u32 = 2;

/// Largest payload of a READ or WRITE (and the largest block-status range
/// we answer in full): 32 MiB, the spec's default maximum.
pub(crate) const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option the server reads; a longer one closes the connection
/// before anything is reserved (names are at most 4096 bytes by the spec).
pub(crate) const MAX_OPTION_LEN: u32 = 16 << 10;
/// Options one connection may send before transmission.
pub(crate) const MAX_OPTIONS: usize = 256;
/// Length of a transmission request.
pub(crate) const REQUEST_LEN: usize = 28;
/// Length of an option header after its magic.
pub(crate) const OPTION_HEADER_LEN: usize = 16;

/// One transmission request, as read from the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Request {
    /// Command flags.
    pub(crate) flags: u16,
    /// Command.
    pub(crate) kind: u16,
    /// The client's cookie, echoed in the reply.
    pub(crate) cookie: u64,
    /// Byte offset.
    pub(crate) offset: u64,
    /// Byte length.
    pub(crate) length: u32,
}

impl Request {
    /// Decode a request header; `None` when the magic is wrong (the
    /// connection is then closed: nothing after it can be trusted).
    pub(crate) fn parse(b: &[u8; REQUEST_LEN]) -> Option<Self> {
        let mut slice: &[u8] = b;
        let buf = &mut slice;
        let magic = buf.try_get_u32().ok()?;
        if magic != REQUEST_MAGIC {
            return None;
        }
        Some(Self {
            flags: buf.try_get_u16().ok()?,
            kind: buf.try_get_u16().ok()?,
            cookie: buf.try_get_u64().ok()?,
            offset: buf.try_get_u64().ok()?,
            length: buf.try_get_u32().ok()?,
        })
    }

    /// Whether `[offset, offset + length)` lies within `size` bytes.
    pub(crate) fn within(&self, size: u64) -> bool {
        self.offset
            .checked_add(u64::from(self.length))
            .is_some_and(|end| end <= size)
    }
}

/// An option reply: header and `data`.
pub(crate) fn option_reply(dst: &mut BytesMut, option: u32, kind: u32, data: &[u8]) {
    dst.put_u64(REPLY_MAGIC);
    dst.put_u32(option);
    dst.put_u32(kind);
    // INVARIANT: option replies are built from names of at most 4096 bytes
    // and fixed fields, far below u32::MAX.
    dst.put_u32(u32::try_from(data.len()).unwrap_or(u32::MAX));
    dst.put_slice(data);
}

/// A simple reply header (the data of a READ follows it).
pub(crate) fn simple_reply(dst: &mut BytesMut, error: u32, cookie: u64) {
    dst.put_u32(SIMPLE_MAGIC);
    dst.put_u32(error);
    dst.put_u64(cookie);
}

/// A structured reply chunk header for `len` bytes of data.
pub(crate) fn chunk_header(dst: &mut BytesMut, flags: u16, kind: u16, cookie: u64, len: u32) {
    dst.put_u32(CHUNK_MAGIC);
    dst.put_u16(flags);
    dst.put_u16(kind);
    dst.put_u64(cookie);
    dst.put_u32(len);
}

/// A final error chunk with a short message.
pub(crate) fn error_chunk(dst: &mut BytesMut, cookie: u64, error: u32, message: &str) {
    let msg = message.as_bytes();
    let msg = msg.get(..msg.len().min(1024)).unwrap_or_default();
    // INVARIANT: at most 1024 bytes of message.
    let msg_len = u16::try_from(msg.len()).unwrap_or(0);
    chunk_header(dst, CHUNK_DONE, CHUNK_ERROR, cookie, 6 + u32::from(msg_len));
    dst.put_u32(error);
    dst.put_u16(msg_len);
    dst.put_slice(msg.get(..usize::from(msg_len)).unwrap_or_default());
}

/// A bounds-checked cursor over option data; every read says `None` when
/// the data runs out (the option is then answered `NBD_REP_ERR_INVALID`).
pub(crate) struct Fields<'a>(pub(crate) &'a [u8]);

impl<'a> Fields<'a> {
    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.0.try_get_u16().ok()
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.0.try_get_u32().ok()
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.0.try_get_u64().ok()
    }

    /// `n` bytes.
    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    /// A `u32`-length-prefixed string (not necessarily UTF-8: compared as bytes).
    pub(crate) fn string(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.u32()?).ok()?;
        self.take(n)
    }

    /// Whether every byte was read.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_round_trips_and_a_bad_magic_is_refused() {
        let mut b = BytesMut::new();
        b.put_u32(REQUEST_MAGIC);
        b.put_u16(CMD_FLAG_REQ_ONE);
        b.put_u16(CMD_READ);
        b.put_u64(7);
        b.put_u64(4096);
        b.put_u32(512);
        let arr: [u8; REQUEST_LEN] = b[..].try_into().unwrap();
        let r = Request::parse(&arr).unwrap();
        assert_eq!(
            (r.kind, r.cookie, r.offset, r.length),
            (CMD_READ, 7, 4096, 512)
        );
        assert!(r.within(4608) && !r.within(4607));
        let mut bad = arr;
        bad[0] ^= 1;
        assert!(Request::parse(&bad).is_none());
        let huge = Request {
            offset: u64::MAX,
            ..r
        };
        assert!(!huge.within(u64::MAX));
    }

    #[test]
    fn fields_run_out_without_panicking() {
        let mut f = Fields(&[0, 0, 0, 9, b'a']);
        assert!(f.string().is_none());
        let mut f = Fields(&[0, 0, 0, 1, b'a']);
        assert_eq!(f.string(), Some(&b"a"[..]));
        assert!(f.is_empty() && f.u16().is_none());
    }
}
