//! Property tests: every frame round-trips, any split of a byte stream decodes
//! to the same frames, and random bytes never panic the decoders (the same
//! entry points the fuzz targets use).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use bytes::{Bytes, BytesMut};
use pilotlight_protocol::block::{BlockHash, Encoding};
use pilotlight_protocol::frame::{
    BlockFrame, CommitMode, Consistency, ErrorCode, PointSelector, RestoreInfo, RestoreRequest,
    VolumeDecl,
};
use pilotlight_protocol::limits::{valid_name, MAX_FETCH_PER_FRAME, MAX_VOLUME_SIZE};
use pilotlight_protocol::{fuzzing, Frame};
use proptest::prelude::*;

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9._-]{1,64}".prop_filter("not . or ..", |s| s != "." && s != "..")
}

fn hash() -> impl Strategy<Value = BlockHash> {
    any::<[u8; 32]>().prop_map(BlockHash)
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<u16>(), any::<u32>())
            .prop_map(|(version, features)| Frame::Hello { version, features }),
        "[ -~]{0,200}".prop_map(|message| Frame::Error {
            code: ErrorCode::Storage,
            message
        }),
        (
            1u16..=16,
            proptest::collection::vec((name(), 0u64..1 << 40, 12u32..=22), 1..4)
        )
            .prop_map(|(streams, v)| {
                Frame::Open {
                    streams,
                    commit: CommitMode::Async,
                    volumes: v
                        .into_iter()
                        .map(|(name, size, shift)| VolumeDecl {
                            name,
                            size,
                            block_size: 1 << shift,
                        })
                        .collect(),
                }
            }),
        (any::<u64>(), any::<[u8; 16]>(), any::<u64>()).prop_map(
            |(session, store_id, last_point)| Frame::Welcome {
                session,
                store_id,
                last_point
            }
        ),
        any::<u64>().prop_map(|session| Frame::Join { session }),
        Just(Frame::Joined),
        Just(Frame::Goodbye),
        Just(Frame::Ping),
        (any::<u64>(), any::<u16>(), 0..u64::MAX / 2, 1..u64::MAX / 2).prop_map(
            |(tag, volume, first, count)| Frame::ZeroRun(pilotlight_protocol::ZeroRunFrame {
                tag,
                volume,
                first,
                count,
            })
        ),
        (
            any::<u64>(),
            any::<u16>(),
            any::<u64>(),
            hash(),
            proptest::collection::vec((1u32..64, 1u32..64), 1..8)
        )
            .prop_map(|(tag, volume, index, base_hash, gaps)| {
                // Ascending, disjoint ranges: a gap, then a length.
                let mut at = 0u32;
                let mut ranges = Vec::new();
                for (gap, len) in gaps {
                    ranges.push(pilotlight_protocol::frame::ByteRange {
                        offset: at + gap,
                        len,
                    });
                    at += gap + len;
                }
                let data: Vec<u8> = (0..at)
                    .map(|i| i as u8)
                    .take(ranges.iter().map(|r| r.len as usize).sum())
                    .collect();
                Frame::PartialBlock(pilotlight_protocol::PartialBlockFrame {
                    tag,
                    volume,
                    index,
                    raw_len: 4096,
                    base_hash,
                    ranges,
                    data: Bytes::from(data),
                })
            }),
        (any::<u64>(), any::<u16>(), any::<u64>(), hash()).prop_map(
            |(tag, volume, index, hash)| Frame::PartialApplied(
                pilotlight_protocol::PartialAppliedFrame {
                    tag,
                    volume,
                    index,
                    hash,
                }
            )
        ),
        (
            any::<u64>(),
            any::<u16>(),
            any::<u64>(),
            hash(),
            proptest::collection::vec(any::<u8>(), 1..2000)
        )
            .prop_map(
                |(tag, volume, index, hash, payload)| Frame::Block(BlockFrame {
                    tag,
                    volume,
                    encoding: Encoding::Raw,
                    index,
                    raw_len: payload.len() as u32,
                    hash,
                    payload: Bytes::from(payload),
                })
            ),
        (
            any::<u64>(),
            any::<u16>(),
            any::<u64>(),
            1u32..1 << 22,
            hash()
        )
            .prop_map(|(tag, volume, index, raw_len, hash)| {
                Frame::Block(BlockFrame {
                    tag,
                    volume,
                    encoding: Encoding::Zero,
                    index,
                    raw_len,
                    hash,
                    payload: Bytes::new(),
                })
            }),
        any::<u64>().prop_map(|seq| Frame::Received { seq }),
        (any::<u64>(), any::<u64>(), any::<i64>()).prop_map(|(tag, blocks, created_ms)| {
            Frame::EndPoint {
                tag,
                blocks,
                created_ms,
                consistency: Consistency::CrashConsistent,
                commit: CommitMode::Sync,
            }
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(tag, point)| Frame::Durable { tag, point }),
        any::<u16>().prop_map(|volume| Frame::GetHashes { volume }),
        (
            any::<u16>(),
            any::<u64>(),
            proptest::collection::vec(hash(), 0..50)
        )
            .prop_map(|(volume, start, hashes)| Frame::Hashes {
                volume,
                start,
                hashes
            }),
        (
            any::<u16>(),
            any::<u64>(),
            // Few distinct hashes: runs and repeats.
            proptest::collection::vec(0u8..4, 1..600)
        )
            .prop_map(|(volume, start, picks)| Frame::HashesPacked {
                volume,
                start,
                hashes: picks.into_iter().map(|b| BlockHash([b; 32])).collect(),
            }),
        (any::<u16>(), any::<u64>(), any::<u64>()).prop_map(|(volume, point, blocks)| {
            Frame::HashesEnd {
                volume,
                point,
                blocks,
            }
        }),
        (
            prop_oneof![Just(String::new()), "[a-z0-9._-]{1,64}"],
            "[a-z0-9_-]{1,64}",
            prop_oneof![
                Just(PointSelector::Latest),
                any::<u64>().prop_map(PointSelector::Id),
                any::<i64>().prop_map(PointSelector::At),
            ],
        )
            .prop_filter("valid names", |(s, v, _)| {
                (s.is_empty() || valid_name(s)) && valid_name(v)
            })
            .prop_map(|(server, volume, point)| Frame::Restore(RestoreRequest {
                server,
                volume,
                point
            })),
        (any::<u64>(), 0..=MAX_VOLUME_SIZE, 12u32..=22).prop_map(|(point, size, shift)| {
            Frame::RestoreInfo(RestoreInfo {
                point,
                size,
                block_size: 1 << shift,
            })
        }),
        proptest::collection::vec(any::<u64>(), 1..=MAX_FETCH_PER_FRAME)
            .prop_map(|indexes| Frame::Fetch { indexes }),
        (
            any::<u64>(),
            any::<u64>(),
            hash(),
            proptest::collection::vec(any::<u8>(), 1..2000)
        )
            .prop_map(|(tag, index, hash, payload)| Frame::Fetched(BlockFrame {
                tag,
                volume: 0,
                encoding: Encoding::Raw,
                index,
                raw_len: payload.len() as u32,
                hash,
                payload: Bytes::from(payload),
            })),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(tag, blocks, a, b)| {
            Frame::Checkpoint {
                tag,
                blocks,
                done: a.min(b),
                total: a.max(b),
            }
        }),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(tag, sync, generation)| {
            Frame::Checkpointed {
                tag,
                sync,
                generation,
            }
        }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(sync, generation)| Frame::Resume { sync, generation }),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>()
        )
            .prop_map(|(sync, generation, done, total, resumed)| {
                Frame::SyncState {
                    sync,
                    generation,
                    done,
                    total,
                    resumed,
                }
            }),
    ]
}

proptest! {
    #[test]
    fn any_split_decodes_to_the_same_frames(frames in proptest::collection::vec(frame(), 1..8), cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6)) {
        let mut wire = BytesMut::new();
        for (seq, f) in frames.iter().enumerate() {
            f.encode(seq as u64, &mut wire);
        }
        let wire = wire.freeze();
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
        points.push(wire.len());
        points.sort_unstable();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut at = 0;
        for p in points {
            buf.extend_from_slice(&wire[at..p]);
            at = p;
            while let Some((seq, f)) = Frame::decode(&mut buf).unwrap() {
                prop_assert_eq!(seq, out.len() as u64);
                out.push(f);
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(out, frames);
    }

    #[test]
    fn random_bytes_never_panic_the_frame_decoder(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        fuzzing::decode_frames(&data);
    }

    #[test]
    fn random_bytes_never_panic_the_block_decoder(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        fuzzing::decode_block(&data);
    }

    #[test]
    fn corrupting_any_byte_is_detected(f in frame(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut wire = BytesMut::new();
        f.encode(0, &mut wire);
        let i = at.index(wire.len());
        wire[i] ^= 1 << bit;
        // A flipped bit is never silently accepted as the same frame.
        if let Ok(Some((_, g))) = Frame::decode(&mut wire) {
            prop_assert!(g != f);
        }
    }
}
