//! The pure functions of the hot path: hashing, zero detection, compression
//! and verified decompression of blocks. Both sides use these.

use std::sync::OnceLock;

use crate::DecodeError;

/// BLAKE3 of a raw block: the end-to-end identity of its content.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BlockHash(pub [u8; 32]);

impl BlockHash {
    /// Hash a raw block.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, for messages and JSON.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }
}

impl std::fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockHash({})", &self.to_hex()[..16])
    }
}

/// How a block's payload is encoded. Values are on the wire and on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Encoding {
    /// All-zero block; no payload.
    Zero = 0,
    /// Payload is the raw block.
    Raw = 1,
    /// Payload is a zstd frame of the raw block.
    Zstd = 2,
}

impl Encoding {
    /// Decode the wire byte.
    pub fn from_u8(v: u8) -> Result<Self, DecodeError> {
        match v {
            0 => Ok(Self::Zero),
            1 => Ok(Self::Raw),
            2 => Ok(Self::Zstd),
            _ => Err(DecodeError::Invalid("block encoding")),
        }
    }
}

/// Why a block could not be decoded or verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BlockError {
    /// The zstd payload is corrupt or would decompress past `raw_len`.
    #[error("compressed block does not decompress to its declared {raw_len} bytes")]
    Decompress {
        /// Declared raw length.
        raw_len: u32,
    },
    /// The payload length does not fit the encoding.
    #[error("block payload length does not match its encoding")]
    Length,
    /// BLAKE3 of the decoded block differs from the declared hash.
    #[error("block content does not match its BLAKE3 hash")]
    HashMismatch,
}

/// Is every byte of `data` zero? Fast: compares 64-byte chunks.
pub fn is_zero(data: &[u8]) -> bool {
    let (chunks, tail) = data.split_at(data.len() - data.len() % 64);
    chunks
        .chunks_exact(64)
        .all(|c| c.iter().fold(0u8, |acc, b| acc | b) == 0)
        && tail.iter().all(|&b| b == 0)
}

/// Hash of an all-zero block of `len` bytes. Computed once per process for
/// each power-of-two length up to [`crate::limits::MAX_BLOCK_SIZE`] (every
/// block size); other lengths (a volume's short last block) are computed
/// each time (a [`Decoder`] keeps the last one).
pub fn zero_hash(len: usize) -> BlockHash {
    /// Slot `k` holds the hash of `1 << k` zero bytes.
    static POW2: [OnceLock<BlockHash>; 23] = [const { OnceLock::new() }; 23];
    const _: () = assert!(1 << 22 == crate::limits::MAX_BLOCK_SIZE);
    if len.is_power_of_two() {
        if let Some(slot) = POW2.get(len.trailing_zeros() as usize) {
            return *slot.get_or_init(|| hash_zeros(len));
        }
    }
    hash_zeros(len)
}

/// BLAKE3 of `len` zero bytes, computed.
fn hash_zeros(len: usize) -> BlockHash {
    static ZEROS: [u8; 64 * 1024] = [0u8; 64 * 1024];
    if len <= ZEROS.len() {
        return BlockHash::of(&ZEROS[..len]);
    }
    let mut hasher = blake3::Hasher::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROS.len());
        hasher.update(&ZEROS[..n]);
        left -= n;
    }
    BlockHash(*hasher.finalize().as_bytes())
}

/// A block that zstd shrinks by less than 1/POOR_SHARE of its size is a
/// poor candidate: it costs the CPU of compressing (and decompressing, twice,
/// on the receiver) for little bandwidth.
const POOR_SHARE: usize = 8;
/// After this many poor blocks in a row, an encoder only tries one block in
/// `PROBE_EVERY` (sending the others raw) until a tried one compresses well.
const POOR_STREAK: u32 = 8;
/// See `POOR_STREAK`.
const PROBE_EVERY: u32 = 16;

/// A reusable block encoder: one per worker thread.
///
/// Incompressible data (media, encrypted or already compressed files) and
/// data zstd barely shrinks are common, and on small blocks zstd can cost
/// tens of microseconds a block for a few percent: after a streak of poor
/// blocks the encoder stops trying, except on a probe every `PROBE_EVERY`
/// blocks, and starts again as soon as a probe compresses well.
pub struct Encoder {
    compressor: zstd::bulk::Compressor<'static>,
    out: Vec<u8>,
    /// Poor blocks in a row.
    poor: u32,
    /// Blocks sent raw without trying since the last probe.
    untried: u32,
}

impl Encoder {
    /// An encoder at zstd `level` (1 is the fast default).
    pub fn new(level: i32) -> std::io::Result<Self> {
        Ok(Self {
            compressor: zstd::bulk::Compressor::new(level)?,
            out: Vec::new(),
            poor: 0,
            untried: 0,
        })
    }

    /// Encode a non-zero raw block: zstd if that saves space, raw otherwise
    /// (or without trying, while blocks compress poorly; see [`Encoder`]).
    /// The returned slice borrows this encoder's buffer (or `raw`).
    pub fn encode<'a>(&'a mut self, raw: &'a [u8]) -> (Encoding, &'a [u8]) {
        if self.poor >= POOR_STREAK {
            self.untried += 1;
            if self.untried < PROBE_EVERY {
                return (Encoding::Raw, raw);
            }
            self.untried = 0;
        }
        let bound = zstd::zstd_safe::compress_bound(raw.len());
        self.out.clear();
        self.out.reserve(bound);
        let n = self.compressor.compress_to_buffer(raw, &mut self.out);
        let good = raw.len() - raw.len() / POOR_SHARE;
        self.poor = match n {
            Ok(n) if n < good => 0,
            _ => self.poor.saturating_add(1),
        };
        match n {
            // Poor or not, a block that shrank is sent shrunk.
            Ok(n) if n < raw.len() => (Encoding::Zstd, &self.out[..n]),
            _ => (Encoding::Raw, raw),
        }
    }
}

/// A reusable, bounded block decoder: one per worker thread.
pub struct Decoder {
    decompressor: zstd::bulk::Decompressor<'static>,
    /// The zero hash of the last length that is not a power of two.
    short_zero: Option<(u32, BlockHash)>,
}

impl Decoder {
    /// A new decoder.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            decompressor: zstd::bulk::Decompressor::new()?,
            short_zero: None,
        })
    }

    /// [`zero_hash`], with the last short length kept.
    fn zero_hash(&mut self, len: u32) -> BlockHash {
        if len.is_power_of_two() {
            return zero_hash(len as usize);
        }
        match self.short_zero {
            Some((l, h)) if l == len => h,
            _ => {
                let h = zero_hash(len as usize);
                self.short_zero = Some((len, h));
                h
            }
        }
    }

    /// Check that `payload` is a valid encoding of a block of `raw_len` bytes
    /// whose BLAKE3 is `hash`, without keeping the block: raw and zero blocks
    /// are hashed where they are; zstd is decompressed into `scratch`
    /// (bounded by `raw_len`).
    pub fn verify(
        &mut self,
        encoding: Encoding,
        payload: &[u8],
        raw_len: u32,
        hash: &BlockHash,
        scratch: &mut Vec<u8>,
    ) -> Result<(), BlockError> {
        let raw = raw_len as usize;
        let actual = match encoding {
            Encoding::Zero
                if payload.is_empty() && raw <= crate::limits::MAX_BLOCK_SIZE as usize =>
            {
                self.zero_hash(raw_len)
            }
            Encoding::Raw
                if payload.len() == raw && raw <= crate::limits::MAX_BLOCK_SIZE as usize =>
            {
                BlockHash::of(payload)
            }
            Encoding::Zero | Encoding::Raw => return Err(BlockError::Length),
            Encoding::Zstd => return self.decode(encoding, payload, raw_len, hash, scratch),
        };
        if actual != *hash {
            return Err(BlockError::HashMismatch);
        }
        Ok(())
    }

    /// Decode `payload` into `out` (cleared first), never growing it past
    /// `raw_len`, and check that BLAKE3 of the result is `hash`.
    pub fn decode(
        &mut self,
        encoding: Encoding,
        payload: &[u8],
        raw_len: u32,
        hash: &BlockHash,
        out: &mut Vec<u8>,
    ) -> Result<(), BlockError> {
        let raw = raw_len as usize;
        if raw > crate::limits::MAX_BLOCK_SIZE as usize {
            return Err(BlockError::Length);
        }
        out.clear();
        match encoding {
            Encoding::Zero => {
                if !payload.is_empty() {
                    return Err(BlockError::Length);
                }
                out.resize(raw, 0);
            }
            Encoding::Raw => {
                if payload.len() != raw {
                    return Err(BlockError::Length);
                }
                out.extend_from_slice(payload);
            }
            Encoding::Zstd => {
                // The capacity bounds the output: zstd stops with an error
                // rather than write past it.
                out.reserve_exact(raw);
                let n = self
                    .decompressor
                    .decompress_to_buffer(payload, out)
                    .map_err(|_| BlockError::Decompress { raw_len })?;
                if n != raw {
                    return Err(BlockError::Decompress { raw_len });
                }
            }
        }
        if BlockHash::of(out) != *hash {
            return Err(BlockError::HashMismatch);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut b = vec![0u8; 65536 + 7];
        assert!(is_zero(&b));
        b[65536 + 3] = 1;
        assert!(!is_zero(&b));
        b[65536 + 3] = 0;
        b[100] = 1;
        assert!(!is_zero(&b));
        assert_eq!(zero_hash(b.len()), BlockHash::of(&vec![0u8; b.len()]));
        assert_eq!(zero_hash(4 << 20), BlockHash::of(&vec![0u8; 4 << 20]));
    }

    #[test]
    fn zero_hashes_are_right_for_every_size_cached_or_not() {
        for len in (0..=22)
            .map(|k| 1usize << k)
            .chain([0, 100, 4097, (8 << 20) + 1])
        {
            let want = BlockHash::of(&vec![0u8; len]);
            assert_eq!(zero_hash(len), want, "first call, {len} bytes");
            assert_eq!(zero_hash(len), want, "cached, {len} bytes");
        }
        let mut d = Decoder::new().unwrap();
        let mut scratch = Vec::new();
        for len in [100u32, 100, 4096, 100, 300] {
            let h = BlockHash::of(&vec![0u8; len as usize]);
            d.verify(Encoding::Zero, &[], len, &h, &mut scratch)
                .unwrap();
        }
    }

    #[test]
    fn round_trip_compressible_and_random() {
        let mut enc = Encoder::new(1).unwrap();
        let mut dec = Decoder::new().unwrap();
        let text: Vec<u8> = b"pilot light "
            .iter()
            .cycle()
            .take(65536)
            .copied()
            .collect();
        let mut x = 0x1234_5678_u64;
        let random: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for (data, want) in [(&text, Encoding::Zstd), (&random, Encoding::Raw)] {
            let hash = BlockHash::of(data);
            let (e, payload) = enc.encode(data);
            assert_eq!(e, want);
            let payload = payload.to_vec();
            let mut out = Vec::new();
            dec.decode(e, &payload, data.len() as u32, &hash, &mut out)
                .unwrap();
            assert_eq!(&out, data);
        }
    }

    #[test]
    fn poorly_compressing_blocks_are_probed_not_all_tried() {
        let mut x = 0x9e37_79b9_u64;
        let mut random = || -> Vec<u8> {
            (0..4096)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        };
        // Shrinks by about 5%: zstd, but poor.
        let mut nearly_random = random();
        nearly_random[..200].fill(0);
        let text: Vec<u8> = b"pilot light ".iter().cycle().take(4096).copied().collect();
        let mut enc = Encoder::new(1).unwrap();
        let (e, p) = enc.encode(&nearly_random);
        assert!(e == Encoding::Zstd && p.len() > 4096 - 4096 / POOR_SHARE);
        for _ in 1..POOR_STREAK {
            enc.encode(&random());
        }
        // The streak is full: compressible blocks now go raw, but for one
        // probe in PROBE_EVERY, which turns trying back on.
        let kinds: Vec<Encoding> = (0..PROBE_EVERY).map(|_| enc.encode(&text).0).collect();
        let tried = kinds.iter().filter(|&&e| e == Encoding::Zstd).count();
        assert_eq!(tried, 1, "{kinds:?}");
        assert_eq!(kinds.last(), Some(&Encoding::Zstd));
        assert_eq!(enc.encode(&text).0, Encoding::Zstd);
        // Whatever the encoding, the block decodes to itself.
        let mut dec = Decoder::new().unwrap();
        for data in [&text, &random(), &nearly_random] {
            for _ in 0..PROBE_EVERY {
                let (e, p) = enc.encode(data);
                let p = p.to_vec();
                let mut out = Vec::new();
                dec.decode(e, &p, 4096, &BlockHash::of(data), &mut out)
                    .unwrap();
                assert_eq!(&out, data);
            }
        }
    }

    #[test]
    fn bomb_is_bounded_by_declared_length() {
        let big = vec![0u8; 4 << 20];
        let bomb = zstd::bulk::compress(&big, 19).unwrap();
        let mut dec = Decoder::new().unwrap();
        let mut out = Vec::new();
        let err = dec.decode(
            Encoding::Zstd,
            &bomb,
            4096,
            &BlockHash::of(&big[..4096]),
            &mut out,
        );
        assert_eq!(err, Err(BlockError::Decompress { raw_len: 4096 }));
        assert!(
            out.capacity() < 1 << 20,
            "decoder reserved {} bytes",
            out.capacity()
        );
    }

    #[test]
    fn verify_agrees_with_decode() {
        let mut enc = Encoder::new(1).unwrap();
        let mut dec = Decoder::new().unwrap();
        let text: Vec<u8> = b"abc ".iter().cycle().take(8192).copied().collect();
        let zeros = vec![0u8; 8192];
        let mut scratch = Vec::new();
        for data in [&text, &zeros] {
            let hash = BlockHash::of(data);
            let (e, p) = enc.encode(data);
            let p = p.to_vec();
            assert_eq!(dec.verify(e, &p, 8192, &hash, &mut scratch), Ok(()));
            assert_eq!(
                dec.verify(Encoding::Raw, data, 8192, &hash, &mut scratch),
                Ok(())
            );
            let wrong = BlockHash::of(b"x");
            assert_eq!(
                dec.verify(e, &p, 8192, &wrong, &mut scratch),
                Err(BlockError::HashMismatch)
            );
        }
        assert_eq!(
            dec.verify(
                Encoding::Zero,
                &[],
                8192,
                &BlockHash::of(&zeros),
                &mut scratch
            ),
            Ok(())
        );
        assert_eq!(
            dec.verify(
                Encoding::Zero,
                &[1],
                8192,
                &BlockHash::of(&zeros),
                &mut scratch
            ),
            Err(BlockError::Length)
        );
        assert_eq!(
            dec.verify(
                Encoding::Raw,
                &text[..100],
                8192,
                &BlockHash::of(&text),
                &mut scratch
            ),
            Err(BlockError::Length)
        );
    }

    #[test]
    fn wrong_hash_is_rejected() {
        let mut dec = Decoder::new().unwrap();
        let mut out = Vec::new();
        let err = dec.decode(Encoding::Raw, b"abcd", 4, &BlockHash::of(b"abce"), &mut out);
        assert_eq!(err, Err(BlockError::HashMismatch));
    }
}
