//! Frames: the typed messages of the protocol and their byte encoding (see the
//! crate docs for the layout).

use bytes::{BufMut, Bytes, BytesMut};

use crate::block::{BlockHash, Encoding};
use crate::limits::{
    MAGIC, MAX_BODY_LEN, MAX_ERROR_LEN, MAX_HASHES_PER_FRAME, MAX_NAME_LEN, MAX_STREAMS,
    MAX_VOLUMES, VERSION,
};
use crate::reader::Reader;
use crate::DecodeError;

mod partial;
mod restore;

pub use partial::{ByteRange, PartialAppliedFrame, PartialBlockFrame};
pub use restore::{PointSelector, RestoreInfo, RestoreRequest};

/// Length of the fixed frame header.
pub const HEADER_LEN: usize = 16;
/// Length of the trailing CRC.
pub const CRC_LEN: usize = 4;

/// Frame kinds. Values are on the wire: never renumber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
#[allow(missing_docs)]
pub enum Kind {
    Hello = 1,
    Error = 2,
    Open = 3,
    Welcome = 4,
    Join = 5,
    Joined = 6,
    Block = 7,
    Received = 8,
    EndPoint = 9,
    Durable = 10,
    GetHashes = 11,
    Hashes = 12,
    HashesEnd = 13,
    Goodbye = 14,
    Ping = 15,
    Restore = 16,
    RestoreInfo = 17,
    Fetch = 18,
    Fetched = 19,
    Checkpoint = 20,
    Checkpointed = 21,
    Resume = 22,
    SyncState = 23,
    ZeroRun = 24,
    PartialBlock = 25,
    PartialApplied = 26,
    HashesPacked = 29,
}

impl Kind {
    /// The kind for a wire byte.
    pub fn from_u8(v: u8) -> Result<Self, DecodeError> {
        Ok(match v {
            1 => Self::Hello,
            2 => Self::Error,
            3 => Self::Open,
            4 => Self::Welcome,
            5 => Self::Join,
            6 => Self::Joined,
            7 => Self::Block,
            8 => Self::Received,
            9 => Self::EndPoint,
            10 => Self::Durable,
            11 => Self::GetHashes,
            12 => Self::Hashes,
            13 => Self::HashesEnd,
            14 => Self::Goodbye,
            15 => Self::Ping,
            16 => Self::Restore,
            17 => Self::RestoreInfo,
            18 => Self::Fetch,
            19 => Self::Fetched,
            20 => Self::Checkpoint,
            21 => Self::Checkpointed,
            22 => Self::Resume,
            23 => Self::SyncState,
            24 => Self::ZeroRun,
            25 => Self::PartialBlock,
            26 => Self::PartialApplied,
            29 => Self::HashesPacked,
            other => return Err(DecodeError::UnknownKind(other)),
        })
    }
}

/// Error codes carried by [`Frame::Error`]. Values are on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
#[non_exhaustive]
#[allow(missing_docs)]
pub enum ErrorCode {
    Protocol = 1,
    Unauthorized = 2,
    BadBlock = 3,
    Storage = 4,
    Busy = 5,
    Timeout = 6,
    Superseded = 7,
    Shutdown = 8,
    /// The receiver's own bug (a panicked task, a poisoned lock): not the
    /// agent's fault, and gone once the receiver is restarted, so agents
    /// retry with their backoff. Older agents read it as `Other`.
    Internal = 9,
    /// The server's blocks would take more than its quota on the receiver;
    /// nothing of the point is committed. Agents retry with their backoff
    /// (pruning, then garbage collection, or a raised quota makes room).
    /// Older agents read it as `Other` and stop.
    QuotaExceeded = 10,
    Other = 0xffff,
}

impl ErrorCode {
    /// The code for a wire value; unknown values map to `Other`.
    pub fn from_u16(v: u16) -> Self {
        match v {
            1 => Self::Protocol,
            2 => Self::Unauthorized,
            3 => Self::BadBlock,
            4 => Self::Storage,
            5 => Self::Busy,
            6 => Self::Timeout,
            7 => Self::Superseded,
            8 => Self::Shutdown,
            9 => Self::Internal,
            10 => Self::QuotaExceeded,
            _ => Self::Other,
        }
    }

    /// Whether an agent should reconnect and try again after this error.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::Storage
                | Self::Busy
                | Self::Timeout
                | Self::Shutdown
                | Self::Internal
                | Self::QuotaExceeded
        )
    }
}

/// How a point was made consistent. Values are on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Consistency {
    /// Data was not read from one instant.
    Fuzzy = 0,
    /// All volumes were read from one instant (reflink clone, frozen fs).
    CrashConsistent = 1,
}

impl Consistency {
    /// Decode the wire byte.
    pub fn from_u8(v: u8) -> Result<Self, DecodeError> {
        match v {
            0 => Ok(Self::Fuzzy),
            1 => Ok(Self::CrashConsistent),
            _ => Err(DecodeError::Invalid("consistency")),
        }
    }

    /// The label shown to users.
    pub fn label(self) -> &'static str {
        match self {
            Self::Fuzzy => "fuzzy",
            Self::CrashConsistent => "crash-consistent",
        }
    }
}

/// Commit mode of a session. Values are on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CommitMode {
    /// Wait for each point to be durable before the next.
    Sync = 0,
    /// Pipeline points; durability is acknowledged as it comes.
    Async = 1,
}

impl CommitMode {
    /// Decode the wire byte.
    pub fn from_u8(v: u8) -> Result<Self, DecodeError> {
        match v {
            0 => Ok(Self::Sync),
            1 => Ok(Self::Async),
            _ => Err(DecodeError::Invalid("commit mode")),
        }
    }

    /// The label shown to users.
    pub fn label(self) -> &'static str {
        match self {
            Self::Sync => "sync",
            Self::Async => "async",
        }
    }
}

/// A volume as an agent declares it when it opens a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeDecl {
    /// Volume name, `[a-z0-9._-]{1,64}`.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Block size in bytes.
    pub block_size: u32,
}

/// One block of a point on a data stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockFrame {
    /// The agent's tag of the point this block belongs to.
    pub tag: u64,
    /// Index of the volume in the session's `Open`.
    pub volume: u16,
    /// How `payload` encodes the block.
    pub encoding: Encoding,
    /// Block index within the volume.
    pub index: u64,
    /// Length of the raw block.
    pub raw_len: u32,
    /// BLAKE3 of the raw block.
    pub hash: BlockHash,
    /// Encoded block (empty for a zero block).
    pub payload: Bytes,
}

/// A run of all-zero blocks of a point on a data stream: blocks `first ..
/// first + count` of `volume` are zeros (each as a `Block` of encoding 0
/// would say), in one frame. Sent only to a receiver whose `Hello`
/// advertised [`crate::limits::FEATURE_ZEROS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroRunFrame {
    /// The agent's tag of the point these blocks belong to.
    pub tag: u64,
    /// Index of the volume in the session's `Open`.
    pub volume: u16,
    /// First block index of the run.
    pub first: u64,
    /// Number of blocks in the run (at least 1; `first + count` does not
    /// overflow). The receiver checks it against the volume.
    pub count: u64,
}

impl ZeroRunFrame {
    /// One past the last block of the run.
    pub fn end(&self) -> u64 {
        self.first.saturating_add(self.count)
    }
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Frame {
    Hello {
        version: u16,
        features: u32,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    Open {
        streams: u16,
        commit: CommitMode,
        volumes: Vec<VolumeDecl>,
    },
    Welcome {
        session: u64,
        store_id: [u8; 16],
        last_point: u64,
    },
    Join {
        session: u64,
    },
    Joined,
    Block(BlockFrame),
    /// Every block frame of this stream up to `seq` is recorded (acks are
    /// cumulative; a receiver may ack a run of blocks at once).
    Received {
        seq: u64,
    },
    EndPoint {
        tag: u64,
        blocks: u64,
        created_ms: i64,
        consistency: Consistency,
        commit: CommitMode,
    },
    Durable {
        tag: u64,
        point: u64,
    },
    GetHashes {
        volume: u16,
    },
    Hashes {
        volume: u16,
        start: u64,
        hashes: Vec<BlockHash>,
    },
    HashesEnd {
        volume: u16,
        point: u64,
        blocks: u64,
    },
    Goodbye,
    /// "Still here": sent on an idle control connection by a peer whose
    /// `Hello` advertised [`crate::limits::FEATURE_PING`]; no answer.
    Ping,
    /// An agent asks for a point of a volume to restore (the first frame
    /// after `Hello`, instead of `Open` or `Join`).
    Restore(RestoreRequest),
    /// The receiver's answer to `Restore`, followed by the point's
    /// `Hashes` (volume 0) and `HashesEnd`.
    RestoreInfo(RestoreInfo),
    /// The agent asks for these blocks of the restored volume (at most
    /// [`crate::limits::MAX_FETCH_PER_FRAME`]; at most
    /// [`crate::limits::FETCH_WINDOW`] asked for and not yet answered).
    Fetch {
        indexes: Vec<u64>,
    },
    /// One fetched block, in the order asked for: a `Block` body whose
    /// `tag` is the point and `volume` is 0.
    Fetched(BlockFrame),
    /// Make every block of the full sync `tag` received so far (`blocks`
    /// of them, counted from the point's first block) durable as the
    /// server's in-progress sync; `done` of `total` bytes are read.
    Checkpoint {
        tag: u64,
        blocks: u64,
        done: u64,
        total: u64,
    },
    /// The blocks of `Checkpoint{tag}` are durable in sync `sync`, as its
    /// checkpoint number `generation`.
    Checkpointed {
        tag: u64,
        sync: u64,
        generation: u64,
    },
    /// Asked once, before the session's first point: the agent holds
    /// checkpoint `generation` of sync `sync` (0, 0: none) and would
    /// continue it.
    Resume {
        sync: u64,
        generation: u64,
    },
    /// The answer to `Resume`: the in-progress sync the receiver holds for
    /// the server (`sync` 0: none), its last durable checkpoint and
    /// progress, and whether the session's next point continues it.
    SyncState {
        sync: u64,
        generation: u64,
        done: u64,
        total: u64,
        resumed: bool,
    },
    /// A run of zero blocks (kind 24, [`crate::limits::FEATURE_ZEROS`]).
    ZeroRun(ZeroRunFrame),
    /// Some byte ranges of a block (kind 25,
    /// [`crate::limits::FEATURE_PARTIAL`]).
    PartialBlock(PartialBlockFrame),
    /// A partial block's merged hash (kind 26).
    PartialApplied(PartialAppliedFrame),
    /// `Hashes` with repeats coded short (kind 29, [`crate::hashpack`]),
    /// only to a peer whose `Hello` has
    /// [`crate::limits::FEATURE_HASHPACK`].
    HashesPacked {
        volume: u16,
        start: u64,
        hashes: Vec<BlockHash>,
    },
}

impl Frame {
    /// The `Hello` this build sends.
    pub fn hello() -> Self {
        Self::Hello {
            version: VERSION,
            features: crate::limits::FEATURE_PING
                | crate::limits::FEATURE_CHECKPOINT
                | crate::limits::FEATURE_ZEROS,
        }
    }

    /// This frame's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Self::Hello { .. } => Kind::Hello,
            Self::Error { .. } => Kind::Error,
            Self::Open { .. } => Kind::Open,
            Self::Welcome { .. } => Kind::Welcome,
            Self::Join { .. } => Kind::Join,
            Self::Joined => Kind::Joined,
            Self::Block(_) => Kind::Block,
            Self::Received { .. } => Kind::Received,
            Self::EndPoint { .. } => Kind::EndPoint,
            Self::Durable { .. } => Kind::Durable,
            Self::GetHashes { .. } => Kind::GetHashes,
            Self::Hashes { .. } => Kind::Hashes,
            Self::HashesEnd { .. } => Kind::HashesEnd,
            Self::Goodbye => Kind::Goodbye,
            Self::Ping => Kind::Ping,
            Self::Restore(_) => Kind::Restore,
            Self::RestoreInfo(_) => Kind::RestoreInfo,
            Self::Fetch { .. } => Kind::Fetch,
            Self::Fetched(_) => Kind::Fetched,
            Self::Checkpoint { .. } => Kind::Checkpoint,
            Self::Checkpointed { .. } => Kind::Checkpointed,
            Self::Resume { .. } => Kind::Resume,
            Self::SyncState { .. } => Kind::SyncState,
            Self::ZeroRun(_) => Kind::ZeroRun,
            Self::PartialBlock(_) => Kind::PartialBlock,
            Self::PartialApplied(_) => Kind::PartialApplied,
            Self::HashesPacked { .. } => Kind::HashesPacked,
        }
    }

    /// Append this frame, numbered `seq`, to `dst`. Only appends.
    ///
    /// Callers keep bodies within the limits (names, message lengths, hashes
    /// per frame); an over-long error message is cut at a character boundary.
    pub fn encode(&self, seq: u64, dst: &mut BytesMut) {
        let start = dst.len();
        dst.put_bytes(0, HEADER_LEN);
        self.encode_body(dst);
        let body_len = dst.len() - start - HEADER_LEN;
        let header = &mut dst[start..start + HEADER_LEN];
        // INVARIANT: bodies we build are far below 4 GiB.
        let len = u32::try_from(body_len).unwrap_or(u32::MAX);
        header[0..4].copy_from_slice(&len.to_le_bytes());
        header[4] = self.kind() as u8;
        header[5] = 0;
        header[6..8].copy_from_slice(&0u16.to_le_bytes());
        header[8..16].copy_from_slice(&seq.to_le_bytes());
        let crc = crc32fast::hash(&dst[start..]);
        dst.put_u32_le(crc);
    }

    fn encode_body(&self, dst: &mut BytesMut) {
        match self {
            Self::Hello { version, features } => {
                dst.put_slice(&MAGIC);
                dst.put_u16_le(*version);
                dst.put_u32_le(*features);
            }
            Self::Error { code, message } => {
                let mut end = message.len().min(MAX_ERROR_LEN);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                dst.put_u16_le(*code as u16);
                dst.put_u16_le(end as u16);
                dst.put_slice(&message.as_bytes()[..end]);
            }
            Self::Open {
                streams,
                commit,
                volumes,
            } => {
                dst.put_u16_le(*streams);
                dst.put_u8(*commit as u8);
                dst.put_u16_le(volumes.len() as u16);
                for v in volumes {
                    let name = &v.name.as_bytes()[..v.name.len().min(MAX_NAME_LEN)];
                    dst.put_u8(name.len() as u8);
                    dst.put_slice(name);
                    dst.put_u64_le(v.size);
                    dst.put_u32_le(v.block_size);
                }
            }
            Self::Welcome {
                session,
                store_id,
                last_point,
            } => {
                dst.put_u64_le(*session);
                dst.put_slice(store_id);
                dst.put_u64_le(*last_point);
            }
            Self::Join { session } => dst.put_u64_le(*session),
            Self::Joined | Self::Goodbye | Self::Ping => {}
            Self::Restore(r) => r.encode(dst),
            Self::RestoreInfo(i) => i.encode(dst),
            Self::Fetch { indexes } => restore::encode_fetch(indexes, dst),
            Self::Block(b) | Self::Fetched(b) => {
                b.encode_header(dst);
                dst.put_slice(&b.payload);
            }
            Self::Received { seq } => dst.put_u64_le(*seq),
            Self::EndPoint {
                tag,
                blocks,
                created_ms,
                consistency,
                commit,
            } => {
                dst.put_u64_le(*tag);
                dst.put_u64_le(*blocks);
                dst.put_i64_le(*created_ms);
                dst.put_u8(*consistency as u8);
                dst.put_u8(*commit as u8);
            }
            Self::Durable { tag, point } => {
                dst.put_u64_le(*tag);
                dst.put_u64_le(*point);
            }
            Self::GetHashes { volume } => dst.put_u16_le(*volume),
            Self::Hashes {
                volume,
                start,
                hashes,
            } => {
                dst.put_u16_le(*volume);
                dst.put_u64_le(*start);
                for h in hashes {
                    dst.put_slice(h.as_bytes());
                }
            }
            Self::HashesPacked {
                volume,
                start,
                hashes,
            } => crate::hashpack::encode(*volume, *start, hashes, dst),
            Self::HashesEnd {
                volume,
                point,
                blocks,
            } => {
                dst.put_u16_le(*volume);
                dst.put_u64_le(*point);
                dst.put_u64_le(*blocks);
            }
            Self::Checkpoint {
                tag,
                blocks,
                done,
                total,
            } => {
                for v in [tag, blocks, done, total] {
                    dst.put_u64_le(*v);
                }
            }
            Self::Checkpointed {
                tag,
                sync,
                generation,
            } => {
                for v in [tag, sync, generation] {
                    dst.put_u64_le(*v);
                }
            }
            Self::Resume { sync, generation } => {
                dst.put_u64_le(*sync);
                dst.put_u64_le(*generation);
            }
            Self::SyncState {
                sync,
                generation,
                done,
                total,
                resumed,
            } => {
                for v in [sync, generation, done, total] {
                    dst.put_u64_le(*v);
                }
                dst.put_u8(u8::from(*resumed));
            }
            Self::ZeroRun(z) => {
                dst.put_u64_le(z.tag);
                dst.put_u16_le(z.volume);
                dst.put_u64_le(z.first);
                dst.put_u64_le(z.count);
            }
            Self::PartialBlock(p) => p.encode(dst),
            Self::PartialApplied(a) => a.encode(dst),
        }
    }

    /// Decode one frame from the front of `src`.
    ///
    /// Returns `Ok(None)` when `src` does not yet hold a whole frame (and
    /// reserves room for it once its length is known and allowed). The length
    /// is checked against [`MAX_BODY_LEN`] before anything is reserved.
    /// Returns the frame's `seq` with it.
    pub fn decode(src: &mut BytesMut) -> Result<Option<(u64, Frame)>, DecodeError> {
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let mut len_bytes = [0u8; 4];
        len_bytes.copy_from_slice(&src[0..4]);
        let body_len = u32::from_le_bytes(len_bytes) as usize;
        if body_len > MAX_BODY_LEN {
            return Err(DecodeError::TooLarge(body_len));
        }
        // The kind is checked early so that garbage fails fast.
        Kind::from_u8(src[4])?;
        let total = HEADER_LEN + body_len + CRC_LEN;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        let frame = src.split_to(total).freeze();
        Self::parse(frame).map(Some)
    }

    /// Parse exactly one whole frame (header, body, CRC).
    pub fn parse(frame: Bytes) -> Result<(u64, Frame), DecodeError> {
        if frame.len() < HEADER_LEN + CRC_LEN {
            return Err(DecodeError::Truncated("frame"));
        }
        let crc_at = frame.len() - CRC_LEN;
        let mut crc_bytes = [0u8; 4];
        crc_bytes.copy_from_slice(&frame[crc_at..]);
        if crc32fast::hash(&frame[..crc_at]) != u32::from_le_bytes(crc_bytes) {
            return Err(DecodeError::BadCrc);
        }
        let mut head = Reader::new(&frame[..HEADER_LEN], "header");
        let body_len = head.u32()? as usize;
        if body_len != crc_at - HEADER_LEN {
            return Err(DecodeError::Truncated("frame"));
        }
        let kind = Kind::from_u8(head.u8()?)?;
        if head.u8()? != 0 || head.u16()? != 0 {
            return Err(DecodeError::Reserved);
        }
        let seq = head.u64()?;
        let body = frame.slice(HEADER_LEN..crc_at);
        Ok((seq, Self::parse_body(kind, body)?))
    }

    fn parse_body(kind: Kind, body: Bytes) -> Result<Frame, DecodeError> {
        let frame = match kind {
            Kind::Hello => {
                let mut r = Reader::new(&body, "Hello");
                if r.array::<8>()? != MAGIC {
                    return Err(DecodeError::BadMagic);
                }
                let version = r.u16()?;
                let features = r.u32()?;
                r.finish()?;
                Frame::Hello { version, features }
            }
            Kind::Error => {
                let mut r = Reader::new(&body, "Error");
                let code = ErrorCode::from_u16(r.u16()?);
                let len = usize::from(r.u16()?);
                if len > MAX_ERROR_LEN {
                    return Err(DecodeError::Invalid("error message length"));
                }
                let msg = r.take(len)?;
                r.finish()?;
                let message = String::from_utf8_lossy(msg).into_owned();
                Frame::Error { code, message }
            }
            Kind::Open => {
                let mut r = Reader::new(&body, "Open");
                let streams = r.u16()?;
                if streams == 0 || streams > MAX_STREAMS {
                    return Err(DecodeError::Invalid("stream count"));
                }
                let commit = CommitMode::from_u8(r.u8()?)?;
                let count = usize::from(r.u16()?);
                if count == 0 || count > MAX_VOLUMES {
                    return Err(DecodeError::Invalid("volume count"));
                }
                let mut volumes = Vec::with_capacity(count);
                for _ in 0..count {
                    let name_len = usize::from(r.u8()?);
                    let name = std::str::from_utf8(r.take(name_len)?)
                        .map_err(|_| DecodeError::Invalid("volume name"))?;
                    if !crate::limits::valid_name(name) {
                        return Err(DecodeError::Invalid("volume name"));
                    }
                    let size = r.u64()?;
                    let block_size = r.u32()?;
                    if !crate::limits::valid_block_size(block_size) {
                        return Err(DecodeError::Invalid("block size"));
                    }
                    if size > crate::limits::MAX_VOLUME_SIZE {
                        return Err(DecodeError::Invalid("volume size"));
                    }
                    volumes.push(VolumeDecl {
                        name: name.to_owned(),
                        size,
                        block_size,
                    });
                }
                r.finish()?;
                Frame::Open {
                    streams,
                    commit,
                    volumes,
                }
            }
            Kind::Welcome => {
                let mut r = Reader::new(&body, "Welcome");
                let session = r.u64()?;
                let store_id = r.array()?;
                let last_point = r.u64()?;
                r.finish()?;
                Frame::Welcome {
                    session,
                    store_id,
                    last_point,
                }
            }
            Kind::Join => {
                let mut r = Reader::new(&body, "Join");
                let session = r.u64()?;
                r.finish()?;
                Frame::Join { session }
            }
            Kind::Joined => {
                Reader::new(&body, "Joined").finish()?;
                Frame::Joined
            }
            Kind::Goodbye => {
                Reader::new(&body, "Goodbye").finish()?;
                Frame::Goodbye
            }
            Kind::Ping => {
                Reader::new(&body, "Ping").finish()?;
                Frame::Ping
            }
            Kind::Block => Frame::Block(BlockFrame::parse(body)?),
            Kind::PartialBlock => Frame::PartialBlock(PartialBlockFrame::parse(&body)?),
            Kind::PartialApplied => Frame::PartialApplied(PartialAppliedFrame::parse(&body)?),
            Kind::Fetched => Frame::Fetched(BlockFrame::parse(body)?),
            Kind::Restore => Frame::Restore(RestoreRequest::parse(&body)?),
            Kind::RestoreInfo => Frame::RestoreInfo(RestoreInfo::parse(&body)?),
            Kind::Fetch => Frame::Fetch {
                indexes: restore::parse_fetch(&body)?,
            },
            Kind::Received => {
                let mut r = Reader::new(&body, "Received");
                let seq = r.u64()?;
                r.finish()?;
                Frame::Received { seq }
            }
            Kind::EndPoint => {
                let mut r = Reader::new(&body, "EndPoint");
                let tag = r.u64()?;
                let blocks = r.u64()?;
                let created_ms = r.i64()?;
                let consistency = Consistency::from_u8(r.u8()?)?;
                let commit = CommitMode::from_u8(r.u8()?)?;
                r.finish()?;
                Frame::EndPoint {
                    tag,
                    blocks,
                    created_ms,
                    consistency,
                    commit,
                }
            }
            Kind::Durable => {
                let mut r = Reader::new(&body, "Durable");
                let tag = r.u64()?;
                let point = r.u64()?;
                r.finish()?;
                Frame::Durable { tag, point }
            }
            Kind::GetHashes => {
                let mut r = Reader::new(&body, "GetHashes");
                let volume = r.u16()?;
                r.finish()?;
                Frame::GetHashes { volume }
            }
            Kind::Hashes => {
                let mut r = Reader::new(&body, "Hashes");
                let volume = r.u16()?;
                let start = r.u64()?;
                let n = r.remaining() / 32;
                if !r.remaining().is_multiple_of(32) {
                    return Err(DecodeError::TrailingData("Hashes"));
                }
                if n > MAX_HASHES_PER_FRAME {
                    return Err(DecodeError::Invalid("hash count"));
                }
                let mut hashes = Vec::with_capacity(n);
                for _ in 0..n {
                    hashes.push(BlockHash(r.array()?));
                }
                r.finish()?;
                Frame::Hashes {
                    volume,
                    start,
                    hashes,
                }
            }
            Kind::HashesPacked => {
                let (volume, start, hashes) = crate::hashpack::decode(&body)?;
                Frame::HashesPacked {
                    volume,
                    start,
                    hashes,
                }
            }
            Kind::HashesEnd => {
                let mut r = Reader::new(&body, "HashesEnd");
                let volume = r.u16()?;
                let point = r.u64()?;
                let blocks = r.u64()?;
                r.finish()?;
                Frame::HashesEnd {
                    volume,
                    point,
                    blocks,
                }
            }
            Kind::Checkpoint => {
                let mut r = Reader::new(&body, "Checkpoint");
                let (tag, blocks, done, total) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
                r.finish()?;
                if done > total {
                    return Err(DecodeError::Invalid("checkpoint progress"));
                }
                Frame::Checkpoint {
                    tag,
                    blocks,
                    done,
                    total,
                }
            }
            Kind::Checkpointed => {
                let mut r = Reader::new(&body, "Checkpointed");
                let (tag, sync, generation) = (r.u64()?, r.u64()?, r.u64()?);
                r.finish()?;
                Frame::Checkpointed {
                    tag,
                    sync,
                    generation,
                }
            }
            Kind::Resume => {
                let mut r = Reader::new(&body, "Resume");
                let (sync, generation) = (r.u64()?, r.u64()?);
                r.finish()?;
                Frame::Resume { sync, generation }
            }
            Kind::SyncState => {
                let mut r = Reader::new(&body, "SyncState");
                let (sync, generation, done, total) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
                let resumed = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(DecodeError::Invalid("resumed flag")),
                };
                r.finish()?;
                Frame::SyncState {
                    sync,
                    generation,
                    done,
                    total,
                    resumed,
                }
            }
            Kind::ZeroRun => {
                let mut r = Reader::new(&body, "ZeroRun");
                let tag = r.u64()?;
                let volume = r.u16()?;
                let first = r.u64()?;
                let count = r.u64()?;
                r.finish()?;
                if count == 0 {
                    return Err(DecodeError::Invalid("zero run count"));
                }
                if first.checked_add(count).is_none() {
                    return Err(DecodeError::Invalid("zero run end"));
                }
                Frame::ZeroRun(ZeroRunFrame {
                    tag,
                    volume,
                    first,
                    count,
                })
            }
        };
        Ok(frame)
    }
}

impl BlockFrame {
    /// Append the fixed part of a `Block` body (everything but the payload).
    pub fn encode_header(&self, dst: &mut BytesMut) {
        dst.put_u64_le(self.tag);
        dst.put_u16_le(self.volume);
        dst.put_u8(self.encoding as u8);
        dst.put_u8(0);
        dst.put_u64_le(self.index);
        dst.put_u32_le(self.raw_len);
        dst.put_slice(self.hash.as_bytes());
    }

    fn parse(body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(&body, "Block");
        let tag = r.u64()?;
        let volume = r.u16()?;
        let encoding = Encoding::from_u8(r.u8()?)?;
        if r.u8()? != 0 {
            return Err(DecodeError::Reserved);
        }
        let index = r.u64()?;
        let raw_len = r.u32()?;
        if raw_len == 0 || raw_len > crate::limits::MAX_BLOCK_SIZE {
            return Err(DecodeError::Invalid("block length"));
        }
        let hash = BlockHash(r.array()?);
        let payload_len = r.rest().len();
        match encoding {
            Encoding::Zero if payload_len != 0 => {
                return Err(DecodeError::TrailingData("zero block"))
            }
            Encoding::Raw if payload_len != raw_len as usize => {
                return Err(DecodeError::Invalid("raw block length"))
            }
            Encoding::Zstd if payload_len == 0 || payload_len > raw_len as usize => {
                return Err(DecodeError::Invalid("compressed block length"))
            }
            _ => {}
        }
        let payload = body.slice(body.len() - payload_len..);
        Ok(Self {
            tag,
            volume,
            encoding,
            index,
            raw_len,
            hash,
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_on_the_wire() {
        for (v, code, retry) in [
            (4, ErrorCode::Storage, true),
            (7, ErrorCode::Superseded, false),
            (9, ErrorCode::Internal, true),
            (10, ErrorCode::QuotaExceeded, true),
            (11, ErrorCode::Other, false),
            (0xffff, ErrorCode::Other, false),
        ] {
            assert_eq!(ErrorCode::from_u16(v), code, "{v}");
            assert_eq!(code.is_retryable(), retry, "{code:?}");
        }
        assert_eq!(ErrorCode::Internal as u16, 9);
    }

    #[test]
    fn a_zero_run_of_no_blocks_or_past_u64_is_refused() {
        for (first, count, why) in [
            (5, 0, "zero run count"),
            (u64::MAX, 1, "zero run end"),
            (1, u64::MAX, "zero run end"),
        ] {
            let mut body = BytesMut::new();
            body.put_u64_le(1);
            body.put_u16_le(0);
            body.put_u64_le(first);
            body.put_u64_le(count);
            let mut buf = BytesMut::new();
            raw_frame(Kind::ZeroRun as u8, &body, &mut buf);
            assert_eq!(Frame::decode(&mut buf), Err(DecodeError::Invalid(why)));
        }
        // Kinds 25-26 are the partial-block frames (issue 19); 27-28 are
        // kept for them and unknown today.
        assert_eq!(Kind::from_u8(25), Ok(Kind::PartialBlock));
        assert_eq!(Kind::from_u8(26), Ok(Kind::PartialApplied));
        for k in 27..=28u8 {
            assert_eq!(Kind::from_u8(k), Err(DecodeError::UnknownKind(k)));
        }
    }

    #[test]
    fn unknown_kind_is_rejected_before_the_body_arrives() {
        let mut buf = BytesMut::from(&[4u8, 0, 0, 0, 99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..]);
        assert_eq!(Frame::decode(&mut buf), Err(DecodeError::UnknownKind(99)));
    }

    #[test]
    fn oversized_length_is_rejected_before_reserving() {
        let mut buf = BytesMut::new();
        buf.put_u32_le(u32::MAX);
        buf.put_u8(Kind::Block as u8);
        buf.put_bytes(0, 11);
        let cap = buf.capacity();
        assert_eq!(
            Frame::decode(&mut buf),
            Err(DecodeError::TooLarge(u32::MAX as usize))
        );
        assert_eq!(buf.capacity(), cap);
    }

    #[test]
    fn corrupted_byte_fails_the_crc() {
        let mut buf = BytesMut::new();
        Frame::Durable { tag: 1, point: 2 }.encode(0, &mut buf);
        buf[HEADER_LEN + 3] ^= 1;
        assert_eq!(Frame::decode(&mut buf), Err(DecodeError::BadCrc));
    }

    #[test]
    fn bad_version_magic() {
        let mut buf = BytesMut::new();
        let mut body = BytesMut::new();
        body.put_slice(b"NOTLIGHT");
        body.put_u16_le(1);
        body.put_u32_le(0);
        raw_frame(Kind::Hello as u8, &body, &mut buf);
        assert_eq!(Frame::decode(&mut buf), Err(DecodeError::BadMagic));
    }

    fn raw_frame(kind: u8, body: &[u8], dst: &mut BytesMut) {
        let start = dst.len();
        dst.put_u32_le(body.len() as u32);
        dst.put_u8(kind);
        dst.put_bytes(0, 3);
        dst.put_u64_le(0);
        dst.put_slice(body);
        let crc = crc32fast::hash(&dst[start..]);
        dst.put_u32_le(crc);
    }
}
