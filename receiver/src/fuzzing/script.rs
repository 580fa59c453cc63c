//! The session fuzzer's script: how input bytes become the declared volumes
//! and, step by step, the frames (or raw bytes) an agent side sends.

use bytes::Bytes;
use pilotlight_protocol::frame::{
    BlockFrame, CommitMode, Consistency, ErrorCode, PointSelector, RestoreInfo, RestoreRequest,
    VolumeDecl,
};
use pilotlight_protocol::limits::{block_len, FEATURE_RESTORE, MAX_FETCH_PER_FRAME, VERSION};
use pilotlight_protocol::{BlockHash, Encoding, Frame};

use super::{settle, Run, BS};

/// The input, read a byte at a time; past its end every byte is 0.
pub(super) struct Input<'a>(pub(super) &'a [u8]);

impl Input<'_> {
    pub(super) fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u64(&mut self) -> u64 {
        (0..8).fold(0, |n, i| n | u64::from(self.u8()) << (8 * i))
    }
}

/// What the script's `Open` declares.
pub(super) struct Script {
    volumes: Vec<VolumeDecl>,
    streams: u16,
}

impl Script {
    pub(super) fn read(input: &mut Input<'_>) -> Self {
        let count = 1 + usize::from(input.u8() % 2);
        let volumes = (0..count)
            .map(|i| {
                let b = input.u8();
                // 0 to 4 blocks, the last one short when bit 4 is set.
                let blocks = u64::from(b % 5);
                let short = if b & 0x10 != 0 && blocks > 0 { 1000 } else { 0 };
                VolumeDecl {
                    name: format!("v{i}"),
                    size: blocks * u64::from(BS) - short,
                    block_size: BS,
                }
            })
            .collect();
        Self {
            volumes,
            streams: u16::from(input.u8() % 4),
        }
    }
}

/// What one step sends.
pub(super) enum Out {
    Frame(Frame),
    Raw(Vec<u8>),
}

impl Run {
    /// The frame (or bytes) a send step sends.
    pub(super) async fn message(&mut self, script: &Script, input: &mut Input<'_>) -> Out {
        let kind = input.u8();
        let frame = match kind % 14 {
            0 => Frame::Hello {
                version: if kind & 0x80 == 0 { VERSION } else { !VERSION },
                features: if kind & 0x40 == 0 { 0 } else { FEATURE_RESTORE },
            },
            1 => open(script, input),
            2 => Frame::Join {
                session: self.session_id(input).await,
            },
            3..=5 => Frame::Block(self.block(script, input)),
            6 => self.end_point(input),
            7 => Frame::GetHashes {
                volume: u16::from(input.u8() % 3),
            },
            8 if kind >= 0x80 => self.zero_run(input),
            8 => Frame::Goodbye,
            9 => Frame::Error {
                code: ErrorCode::Protocol,
                message: "fuzzing".into(),
            },
            10 => receiver_only(input),
            11 => Frame::Checkpoint {
                tag: u64::from(input.u8() % 4),
                blocks: u64::from(input.u8()),
                done: 0,
                total: input.u64(),
            },
            12 => Frame::Resume {
                sync: input.u64(),
                generation: u64::from(input.u8()),
            },
            13 if kind & 0x80 != 0 => restore(input),
            13 if kind & 0x40 != 0 => partial_block(input),
            _ => {
                let len = input.u8() % 32;
                return Out::Raw((0..len).map(|_| input.u8()).collect());
            }
        };
        Out::Frame(frame)
    }

    /// A session id to join: one a `Welcome` named (waiting a moment for
    /// the first), or, for a pick from 0xf0, any.
    async fn session_id(&self, input: &mut Input<'_>) -> u64 {
        let pick = input.u8();
        if pick >= 0xf0 {
            return input.u64();
        }
        for _ in 0..100 {
            let seen = self
                .seen
                .lock()
                .map(|s| s.welcomes.clone())
                .unwrap_or_default();
            if let Some(&id) = seen.iter().rev().nth(usize::from(pick % 4)).or(seen.last()) {
                return id;
            }
            settle().await;
        }
        0
    }

    /// A block: well formed most often, else with a bad hash, a payload
    /// that does not decode, or the wrong length; for a declared volume or
    /// not, in range or not.
    fn block(&mut self, script: &Script, input: &mut Input<'_>) -> BlockFrame {
        let (a, b, fill) = (input.u8(), input.u8(), input.u8());
        let tag = u64::from(a % 4);
        let volume = (a >> 2) % 3;
        let size = script
            .volumes
            .get(usize::from(volume))
            .map_or(u64::from(BS), |v| v.size);
        let index = u64::from(b % 6);
        let raw_len = match block_len(size, BS, index) {
            0 => BS,
            n => n,
        };
        let raw = vec![fill; raw_len as usize];
        let mut hash = BlockHash::of(&raw);
        let (mut encoding, mut payload) = match (fill, self.encoder.as_mut()) {
            (0, _) | (_, None) => (Encoding::Zero, Bytes::new()),
            (_, Some(enc)) => {
                let (e, p) = enc.encode(&raw);
                (e, Bytes::copy_from_slice(p))
            }
        };
        let mut raw_len = raw_len;
        match (a >> 4) % 8 {
            4 => (encoding, payload) = (Encoding::Raw, Bytes::from(raw)),
            5 => hash.0[0] ^= 1,
            6 => (encoding, payload) = (Encoding::Zstd, Bytes::from(vec![fill; 64])),
            7 => raw_len = raw_len.wrapping_add(u32::from(b)),
            _ => {}
        }
        let sent = self.blocks_sent.entry(tag).or_default();
        *sent = sent.saturating_add(1);
        BlockFrame {
            tag,
            volume: u16::from(volume),
            encoding,
            index,
            raw_len,
            hash,
            payload,
        }
    }

    /// A `ZeroRun`: for a declared volume or not, in range or past the
    /// end, of no blocks, or (for a count byte from 0xf0) wrapping past u64.
    fn zero_run(&mut self, input: &mut Input<'_>) -> Frame {
        let (a, b, n) = (input.u8(), input.u8(), input.u8());
        let tag = u64::from(a % 4);
        let count = if n >= 0xf0 {
            u64::MAX
        } else {
            u64::from(n % 8)
        };
        let sent = self.blocks_sent.entry(tag).or_default();
        *sent = sent.saturating_add(count);
        Frame::ZeroRun(pilotlight_protocol::ZeroRunFrame {
            tag,
            volume: u16::from((a >> 2) % 3),
            first: u64::from(b % 6),
            count,
        })
    }

    /// An `EndPoint`: for the blocks sent so far with its tag, or any count.
    fn end_point(&self, input: &mut Input<'_>) -> Frame {
        let flags = input.u8();
        let tag = u64::from(flags % 4);
        let blocks = if flags & 0x10 == 0 {
            self.blocks_sent.get(&tag).copied().unwrap_or(0)
        } else {
            u64::from(input.u8())
        };
        Frame::EndPoint {
            tag,
            blocks,
            created_ms: input.u64() as i64,
            consistency: if flags & 0x20 == 0 {
                Consistency::Fuzzy
            } else {
                Consistency::CrashConsistent
            },
            commit: if flags & 0x40 == 0 {
                CommitMode::Sync
            } else {
                CommitMode::Async
            },
        }
    }
}

/// The script's `Open`, or a variation of it: other streams or commit
/// mode, a volume declared twice, another block size, an empty volume.
fn open(script: &Script, input: &mut Input<'_>) -> Frame {
    let flags = input.u8();
    let mut volumes = script.volumes.clone();
    if flags & 0x04 != 0 {
        volumes.extend(volumes.first().cloned());
    }
    if let Some(first) = volumes.first_mut() {
        if flags & 0x08 != 0 {
            first.block_size = 2 * BS;
        }
        if flags & 0x10 != 0 {
            first.size = 0;
        }
    }
    Frame::Open {
        streams: if flags & 0x01 == 0 {
            script.streams
        } else {
            u16::from(input.u8() % 20)
        },
        commit: if flags & 0x02 == 0 {
            CommitMode::Sync
        } else {
            CommitMode::Async
        },
        volumes,
    }
}

/// A frame only the receiver sends.
/// A frame of a restore connection: `Restore` of a volume (declared by the
/// script's `Open` or not) of the connection's server, another one or
/// none, at a point that may not exist; or `Fetch` of blocks in range or
/// not, or of a flood of them.
fn restore(input: &mut Input<'_>) -> Frame {
    let (a, b) = (input.u8(), input.u8());
    if a & 0x80 != 0 {
        let n = if b & 0x80 != 0 {
            MAX_FETCH_PER_FRAME
        } else {
            1 + usize::from(b % 4)
        };
        return Frame::Fetch {
            indexes: (0..n).map(|i| u64::from(b % 8) + i as u64 % 3).collect(),
        };
    }
    let server = ["", "web", "db", "ghost"][usize::from(a % 4)];
    let volume = ["v0", "v1", "nope"][usize::from((a >> 2) % 3)];
    let point = match (a >> 4) % 3 {
        0 => PointSelector::Latest,
        1 => PointSelector::Id(u64::from(b % 4)),
        _ => PointSelector::At(i64::from(b) << 40),
    };
    Frame::Restore(RestoreRequest {
        server: server.into(),
        volume: volume.into(),
        point,
    })
}

fn receiver_only(input: &mut Input<'_>) -> Frame {
    let n = input.u64();
    match input.u8() % 8 {
        0 => Frame::Welcome {
            session: n,
            store_id: [0; 16],
            last_point: n,
        },
        1 => Frame::Joined,
        2 => Frame::Received { seq: n },
        3 => Frame::Durable { tag: n, point: n },
        6 => Frame::Checkpointed {
            tag: n,
            sync: n,
            generation: n,
        },
        7 => Frame::SyncState {
            sync: n,
            generation: n,
            done: 0,
            total: n,
            resumed: true,
        },
        4 => Frame::Hashes {
            volume: 0,
            start: n,
            hashes: vec![BlockHash::of(&[]); 2],
        },
        5 if n & 1 != 0 => Frame::RestoreInfo(RestoreInfo {
            point: n,
            size: n >> 24,
            block_size: BS,
        }),
        _ => Frame::HashesEnd {
            volume: 0,
            point: n,
            blocks: n,
        },
    }
}

/// A `PartialBlock` (kind 25): ranges in or past a block (or overlapping,
/// for a stride of 0), on a base that is no stored block.
fn partial_block(input: &mut Input<'_>) -> Frame {
    let (a, b, n) = (input.u8(), input.u8(), input.u8());
    let ranges: Vec<pilotlight_protocol::frame::ByteRange> = (0..=u32::from(n % 4))
        .map(|i| pilotlight_protocol::frame::ByteRange {
            offset: i * u32::from(b).max(1) * 16,
            len: u32::from(b % 16) + 1,
        })
        .collect();
    let len: usize = ranges.iter().map(|r| r.len as usize).sum();
    Frame::PartialBlock(pilotlight_protocol::PartialBlockFrame {
        tag: u64::from(a % 4),
        volume: u16::from((a >> 2) % 3),
        index: u64::from(b % 6),
        raw_len: BS,
        base_hash: BlockHash::of(&[]),
        ranges,
        data: Bytes::from(vec![a; len]),
    })
}
