//! A READ's answer: the pieces the disk read (data, and runs of zeros the
//! point never stored), and how they go on the wire. With structured
//! replies a run of zeros is one `NBD_REPLY_TYPE_OFFSET_HOLE` chunk (12
//! bytes instead of the zeros) and each run of data one
//! `NBD_REPLY_TYPE_OFFSET_DATA` chunk; without structured replies, or when
//! the client asked `NBD_CMD_FLAG_DF` (one content chunk), every byte is
//! sent, zeros from a shared zero buffer. The data pieces are the decoded
//! blocks themselves (`Bytes`), never copied into a reply buffer: the
//! connection writes headers and blocks with vectored writes.
//!
//! ```text
//! structured, data | zeros | data:
//!   CHUNK_MAGIC | 0    | OFFSET_DATA | cookie | 8+n1 | offset1 | data[n1]
//!   CHUNK_MAGIC | 0    | OFFSET_HOLE | cookie | 12   | offset2 | n2:u32
//!   CHUNK_MAGIC | DONE | OFFSET_DATA | cookie | 8+n3 | offset3 | data[n3]
//! simple:
//!   SIMPLE_MAGIC | 0 | cookie | data[n1] zeros[n2] data[n3]
//! ```
//!
//! The whole read is done (and every block verified) before the first
//! header is made, so a damaged block is answered with an error alone,
//! never after data that claimed success.

use std::io::IoSlice;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::wire::{
    chunk_header, simple_reply, CHUNK_DONE, CHUNK_NONE, CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE,
};

/// Zeros that unstructured replies send for holes, a slice at a time.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Buffers one vectored write hands to the socket at most (below every
/// system's `IOV_MAX`).
const MAX_SLICES: usize = 64;

/// One piece of a read, in the order of the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Piece {
    /// Bytes read (verified).
    Data(Bytes),
    /// This many bytes of zeros: nothing stored.
    Zeros(usize),
}

impl Piece {
    /// Bytes of the volume it stands for.
    fn len(&self) -> usize {
        match self {
            Self::Data(b) => b.len(),
            Self::Zeros(n) => *n,
        }
    }
}

/// The pieces of one read, in order; adjacent runs of zeros are merged.
#[derive(Debug, Default)]
pub(crate) struct Pieces(Vec<Piece>);

impl Pieces {
    /// Append data.
    pub(crate) fn data(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.0.push(Piece::Data(b));
        }
    }

    /// Append `n` zeros.
    pub(crate) fn zeros(&mut self, n: usize) {
        match self.0.last_mut() {
            Some(Piece::Zeros(z)) => *z += n,
            _ if n > 0 => self.0.push(Piece::Zeros(n)),
            _ => {}
        }
    }

    /// Bytes read in all.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0.iter().map(Piece::len).sum()
    }

    /// The pieces.
    #[cfg(test)]
    pub(crate) fn pieces(&self) -> &[Piece] {
        &self.0
    }
}

/// A reply, encoded: headers and data in the order they go on the wire.
#[derive(Debug, Default)]
pub(crate) struct Encoded(Vec<Bytes>);

impl From<BytesMut> for Encoded {
    fn from(b: BytesMut) -> Self {
        Self(vec![b.freeze()])
    }
}

/// How a READ is answered.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadReply {
    /// The client's cookie.
    pub(crate) cookie: u64,
    /// Where the read starts.
    pub(crate) offset: u64,
    /// Structured replies were negotiated.
    pub(crate) structured: bool,
    /// Holes may be sent as holes: structured, and no `NBD_CMD_FLAG_DF`.
    pub(crate) holes: bool,
}

impl ReadReply {
    /// The successful answer made of `pieces`.
    pub(crate) fn encode(&self, pieces: Pieces) -> Encoded {
        let mut heads = BytesMut::with_capacity(32 * (pieces.0.len() + 1));
        let mut out = Vec::with_capacity(2 * pieces.0.len() + 1);
        if !self.structured || !self.holes {
            let total: usize = pieces.0.iter().map(Piece::len).sum();
            if self.structured {
                // INVARIANT: a read is at most MAX_PAYLOAD (32 MiB) long.
                let len = u32::try_from(total + 8).unwrap_or(u32::MAX);
                let kind = if total == 0 {
                    CHUNK_NONE
                } else {
                    CHUNK_OFFSET_DATA
                };
                chunk_header(&mut heads, CHUNK_DONE, kind, self.cookie, len);
                if total > 0 {
                    heads.put_u64(self.offset);
                }
            } else {
                simple_reply(&mut heads, 0, self.cookie);
            }
            out.push(heads.split().freeze());
            for p in pieces.0 {
                match p {
                    Piece::Data(b) => out.push(b),
                    Piece::Zeros(n) => push_zeros(&mut out, n),
                }
            }
            return Encoded(out);
        }
        let mut at = self.offset;
        let mut pieces = pieces.0.into_iter().peekable();
        let mut any = false;
        while let Some(p) = pieces.next() {
            any = true;
            match p {
                Piece::Zeros(n) => {
                    let done = if pieces.peek().is_none() {
                        CHUNK_DONE
                    } else {
                        0
                    };
                    chunk_header(&mut heads, done, CHUNK_OFFSET_HOLE, self.cookie, 12);
                    heads.put_u64(at);
                    // INVARIANT: a read is at most MAX_PAYLOAD (32 MiB) long.
                    heads.put_u32(u32::try_from(n).unwrap_or(u32::MAX));
                    out.push(heads.split().freeze());
                    at += n as u64;
                }
                Piece::Data(first) => {
                    let mut data = vec![first];
                    while let Some(Piece::Data(_)) = pieces.peek() {
                        if let Some(Piece::Data(b)) = pieces.next() {
                            data.push(b);
                        }
                    }
                    let n: usize = data.iter().map(Bytes::len).sum();
                    let done = if pieces.peek().is_none() {
                        CHUNK_DONE
                    } else {
                        0
                    };
                    // INVARIANT: a read is at most MAX_PAYLOAD (32 MiB) long.
                    let len = u32::try_from(n + 8).unwrap_or(u32::MAX);
                    chunk_header(&mut heads, done, CHUNK_OFFSET_DATA, self.cookie, len);
                    heads.put_u64(at);
                    out.push(heads.split().freeze());
                    out.extend(data);
                    at += n as u64;
                }
            }
        }
        if !any {
            chunk_header(&mut heads, CHUNK_DONE, CHUNK_NONE, self.cookie, 0);
            out.push(heads.split().freeze());
        }
        Encoded(out)
    }
}

/// `n` zeros as slices of [`ZEROS`].
fn push_zeros(out: &mut Vec<Bytes>, mut n: usize) {
    while n > 0 {
        let k = n.min(ZEROS.len());
        out.push(Bytes::from_static(ZEROS.get(..k).unwrap_or_default()));
        n -= k;
    }
}

/// Write `reply` to `s` with as few system calls as the socket allows.
pub(crate) async fn write<W: AsyncWrite + Unpin>(
    s: &mut W,
    reply: &Encoded,
) -> std::io::Result<()> {
    let mut bufs: &[Bytes] = &reply.0;
    // Bytes of `bufs[0]` already written.
    let mut skip = 0usize;
    while let Some(first) = bufs.first() {
        if !s.is_write_vectored() {
            let rest = first.get(skip..).unwrap_or_default();
            s.write_all(rest).await?;
            bufs = bufs.get(1..).unwrap_or_default();
            skip = 0;
            continue;
        }
        let slices: Vec<IoSlice<'_>> = bufs
            .iter()
            .take(MAX_SLICES)
            .enumerate()
            .map(|(i, b)| {
                IoSlice::new(if i == 0 {
                    b.get(skip..).unwrap_or_default()
                } else {
                    b
                })
            })
            .collect();
        let mut n = s.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        // Advance past what was written.
        n += skip;
        skip = 0;
        while let Some(b) = bufs.first() {
            if n < b.len() {
                skip = n;
                break;
            }
            n -= b.len();
            bufs = bufs.get(1..).unwrap_or_default();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Buf;

    fn read(structured: bool, holes: bool, pieces: Pieces) -> Vec<u8> {
        let r = ReadReply {
            cookie: 9,
            offset: 4096,
            structured,
            holes,
        };
        r.encode(pieces).0.concat()
    }

    fn sample() -> Pieces {
        let mut p = Pieces::default();
        p.data(Bytes::from_static(b"ab"));
        p.data(Bytes::from_static(b"cd"));
        p.zeros(3);
        p.zeros(2);
        p.data(Bytes::from_static(b"e"));
        p
    }

    #[test]
    fn zeros_merge_and_empty_pieces_vanish() {
        let mut p = sample();
        p.zeros(0);
        p.data(Bytes::new());
        assert_eq!(p.len(), 10);
        assert_eq!(p.pieces().len(), 4);
    }

    #[test]
    fn structured_reads_send_holes_as_holes() {
        let b = read(true, true, sample());
        let mut b = &b[..];
        let mut chunks = Vec::new();
        while b.has_remaining() {
            assert_eq!(b.get_u32(), super::super::wire::CHUNK_MAGIC);
            let (flags, kind, cookie, len) = (b.get_u16(), b.get_u16(), b.get_u64(), b.get_u32());
            assert_eq!(cookie, 9);
            let offset = b.get_u64();
            let body = if kind == CHUNK_OFFSET_HOLE {
                assert_eq!(len, 12);
                vec![0u8; b.get_u32() as usize]
            } else {
                let data = b[..len as usize - 8].to_vec();
                b.advance(len as usize - 8);
                data
            };
            chunks.push((flags, kind, offset, body));
        }
        assert_eq!(
            chunks,
            vec![
                (0, CHUNK_OFFSET_DATA, 4096, b"abcd".to_vec()),
                (0, CHUNK_OFFSET_HOLE, 4100, vec![0; 5]),
                (CHUNK_DONE, CHUNK_OFFSET_DATA, 4105, b"e".to_vec()),
            ]
        );
    }

    #[test]
    fn without_holes_every_byte_is_sent_in_one_chunk_or_a_simple_reply() {
        let want = b"abcd\0\0\0\0\0e";
        let df = read(true, false, sample());
        let mut b = &df[..];
        assert_eq!(b.get_u32(), super::super::wire::CHUNK_MAGIC);
        assert_eq!((b.get_u16(), b.get_u16()), (CHUNK_DONE, CHUNK_OFFSET_DATA));
        assert_eq!((b.get_u64(), b.get_u32(), b.get_u64()), (9, 18, 4096));
        assert_eq!(b, want);
        let simple = read(false, false, sample());
        let mut b = &simple[..];
        assert_eq!(b.get_u32(), super::super::wire::SIMPLE_MAGIC);
        assert_eq!((b.get_u32(), b.get_u64()), (0, 9));
        assert_eq!(b, want);
        let mut big = Pieces::default();
        big.zeros(ZEROS.len() * 2 + 1);
        assert_eq!(read(false, false, big).len(), 16 + ZEROS.len() * 2 + 1);
    }

    #[test]
    fn an_empty_read_is_one_final_chunk() {
        let out = read(true, true, Pieces::default());
        let mut b = &out[..];
        assert_eq!(b.get_u32(), super::super::wire::CHUNK_MAGIC);
        assert_eq!((b.get_u16(), b.get_u16()), (CHUNK_DONE, CHUNK_NONE));
        assert_eq!((b.get_u64(), b.get_u32()), (9, 0));
        assert!(b.is_empty());
    }

    /// Writes `enc` into `a` and reads it back from `b`.
    async fn through<A, B>(mut a: A, mut b: B, enc: &Encoded) -> Vec<u8>
    where
        A: AsyncWrite + Unpin,
        B: tokio::io::AsyncRead + Unpin + Send + 'static,
    {
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut b, &mut got)
                .await
                .unwrap();
            got
        });
        write(&mut a, enc).await.unwrap();
        drop(a);
        reader.await.unwrap()
    }

    #[tokio::test]
    async fn a_reply_is_written_whole_through_short_and_vectored_writes() {
        let mut p = Pieces::default();
        for i in 0..200u8 {
            p.data(Bytes::from(vec![i; 1000]));
            p.zeros(usize::from(i) * 10);
        }
        let r = ReadReply {
            cookie: 1,
            offset: 0,
            structured: true,
            holes: true,
        };
        let enc = r.encode(p);
        let want = enc.0.concat();
        let (a, b) = tokio::io::duplex(777);
        assert_eq!(through(a, b, &enc).await, want);
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        assert_eq!(through(a, b, &enc).await, want);
    }
}
