//! Golden bytes: the wire format is fixed. A format change must break this.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use bytes::{Bytes, BytesMut};
use pilotlight_protocol::block::{BlockHash, Encoding};
use pilotlight_protocol::frame::ByteRange;
use pilotlight_protocol::frame::{
    BlockFrame, CommitMode, Consistency, ErrorCode, PointSelector, RestoreInfo, RestoreRequest,
    VolumeDecl,
};
use pilotlight_protocol::golden::{self, hex};
use pilotlight_protocol::{
    DecodeError, Frame, PartialAppliedFrame, PartialBlockFrame, ZeroRunFrame,
};

fn check(frame: Frame, seq: u64, golden: &str) {
    let mut buf = BytesMut::new();
    frame.encode(seq, &mut buf);
    assert_eq!(
        hex(&buf),
        hex(&unhex(golden)),
        "encoding of {:?} changed",
        frame.kind()
    );
    let mut wire = BytesMut::from(&unhex(golden)[..]);
    assert_eq!(Frame::decode(&mut wire).unwrap(), Some((seq, frame)));
    assert!(wire.is_empty());
}

/// The header laid out by hand from the crate docs, not from the encoder.
#[test]
fn durable_frame_matches_the_documented_layout() {
    let mut want = Vec::new();
    want.extend_from_slice(&16u32.to_le_bytes()); // len
    want.push(10); // kind Durable
    want.push(0); // flags
    want.extend_from_slice(&[0, 0]); // reserved
    want.extend_from_slice(&3u64.to_le_bytes()); // seq
    want.extend_from_slice(&7u64.to_le_bytes()); // tag
    want.extend_from_slice(&42u64.to_le_bytes()); // point
    let crc = crc32fast::hash(&want);
    want.extend_from_slice(&crc.to_le_bytes());
    let mut buf = BytesMut::new();
    Frame::Durable { tag: 7, point: 42 }.encode(3, &mut buf);
    assert_eq!(hex(&buf), hex(&want));
}

/// The ZeroRun body laid out by hand from the crate docs.
#[test]
fn zero_run_frame_matches_the_documented_layout() {
    let mut want = Vec::new();
    want.extend_from_slice(&26u32.to_le_bytes()); // len
    want.push(24); // kind ZeroRun
    want.extend_from_slice(&[0, 0, 0]); // flags, reserved
    want.extend_from_slice(&11u64.to_le_bytes()); // seq
    want.extend_from_slice(&2u64.to_le_bytes()); // tag
    want.extend_from_slice(&1u16.to_le_bytes()); // volume
    want.extend_from_slice(&0x100u64.to_le_bytes()); // first
    want.extend_from_slice(&(1u64 << 32).to_le_bytes()); // count
    let crc = crc32fast::hash(&want);
    want.extend_from_slice(&crc.to_le_bytes());
    let golden = std::fs::read_to_string(testdata("zerorun.hex")).unwrap();
    assert_eq!(hex(&unhex(&golden)), hex(&want));
}

fn partial_block() -> Frame {
    Frame::PartialBlock(PartialBlockFrame {
        tag: 3,
        volume: 1,
        index: 0x0203,
        raw_len: 4096,
        base_hash: BlockHash::of(b"base"),
        ranges: vec![
            ByteRange { offset: 0, len: 2 },
            ByteRange {
                offset: 0x0200,
                len: 3,
            },
        ],
        data: Bytes::from_static(b"abcde"),
    })
}

/// The PartialBlock body laid out by hand from the crate docs.
#[test]
fn partial_block_frame_matches_the_documented_layout() {
    let mut want = Vec::new();
    let body_len = 8 + 2 + 8 + 4 + 32 + 2 + 2 * 8 + 5;
    want.extend_from_slice(&(body_len as u32).to_le_bytes()); // len
    want.push(25); // kind PartialBlock
    want.extend_from_slice(&[0, 0, 0]); // flags, reserved
    want.extend_from_slice(&12u64.to_le_bytes()); // seq
    want.extend_from_slice(&3u64.to_le_bytes()); // tag
    want.extend_from_slice(&1u16.to_le_bytes()); // volume
    want.extend_from_slice(&0x0203u64.to_le_bytes()); // index
    want.extend_from_slice(&4096u32.to_le_bytes()); // raw_len
    want.extend_from_slice(BlockHash::of(b"base").as_bytes()); // base_hash
    want.extend_from_slice(&2u16.to_le_bytes()); // count
    for (offset, len) in [(0u32, 2u32), (0x0200, 3)] {
        want.extend_from_slice(&offset.to_le_bytes());
        want.extend_from_slice(&len.to_le_bytes());
    }
    want.extend_from_slice(b"abcde"); // data
    let crc = crc32fast::hash(&want);
    want.extend_from_slice(&crc.to_le_bytes());
    let golden = std::fs::read_to_string(testdata("partialblock.hex")).unwrap();
    assert_eq!(hex(&unhex(&golden)), hex(&want));
}

/// The HashesPacked body laid out by hand from the `hashpack` docs.
#[test]
fn hashes_packed_frame_matches_the_documented_layout() {
    let mut body = Vec::new();
    body.extend_from_slice(&0u16.to_le_bytes()); // volume
    body.extend_from_slice(&0x20u64.to_le_bytes()); // start
    body.extend_from_slice(&6u32.to_le_bytes()); // count
    body.extend_from_slice(&[0, 3]); // three new hashes: slots 0, 1, 2
    for b in [0x11, 0x22, 0x33] {
        body.extend_from_slice(&[b; 32]);
    }
    body.extend_from_slice(&[1, 0, 2, 0]); // slot 0 twice
    body.extend_from_slice(&[1, 2, 1, 0]); // slot 2 once
    let mut want = (body.len() as u32).to_le_bytes().to_vec();
    want.extend_from_slice(&[29, 0, 0, 0]); // kind HashesPacked, flags, reserved
    want.extend_from_slice(&15u64.to_le_bytes()); // seq
    want.extend_from_slice(&body);
    let crc = crc32fast::hash(&want);
    want.extend_from_slice(&crc.to_le_bytes());
    let golden = std::fs::read_to_string(testdata("hashespacked.hex")).unwrap();
    assert_eq!(hex(&unhex(&golden)), hex(&want));
}

/// Every frame kind, as it is pinned in `testdata/NAME`.
fn fixtures() -> Vec<(&'static str, Frame, u64)> {
    vec![
        ("hello.hex", Frame::hello(), 0),
        (
            "error.hex",
            Frame::Error {
                code: ErrorCode::Unauthorized,
                message: "no".into(),
            },
            1,
        ),
        (
            "open.hex",
            Frame::Open {
                streams: 2,
                commit: CommitMode::Async,
                volumes: vec![VolumeDecl {
                    name: "root".into(),
                    size: 1 << 30,
                    block_size: 65536,
                }],
            },
            0,
        ),
        (
            "welcome.hex",
            Frame::Welcome {
                session: 0x0102030405060708,
                store_id: [0xAA; 16],
                last_point: 5,
            },
            0,
        ),
        ("join.hex", Frame::Join { session: 9 }, 0),
        ("joined.hex", Frame::Joined, 1),
        (
            "block.hex",
            Frame::Block(BlockFrame {
                tag: 1,
                volume: 0,
                encoding: Encoding::Raw,
                index: 3,
                raw_len: 4,
                hash: BlockHash::of(b"abcd"),
                payload: Bytes::from_static(b"abcd"),
            }),
            5,
        ),
        ("received.hex", Frame::Received { seq: 5 }, 2),
        (
            "endpoint.hex",
            Frame::EndPoint {
                tag: 1,
                blocks: 300,
                created_ms: 1_790_000_000_000,
                consistency: Consistency::CrashConsistent,
                commit: CommitMode::Sync,
            },
            4,
        ),
        ("gethashes.hex", Frame::GetHashes { volume: 1 }, 6),
        (
            "hashes.hex",
            Frame::Hashes {
                volume: 1,
                start: 0,
                hashes: vec![BlockHash([0x11; 32])],
            },
            7,
        ),
        (
            "hashesend.hex",
            Frame::HashesEnd {
                volume: 1,
                point: 5,
                blocks: 1,
            },
            8,
        ),
        ("goodbye.hex", Frame::Goodbye, 9),
        ("ping.hex", Frame::Ping, 10),
        (
            "restore.hex",
            Frame::Restore(RestoreRequest {
                server: "web1-recovery".into(),
                volume: "root".into(),
                point: PointSelector::At(1_790_000_000_000),
            }),
            0,
        ),
        (
            "restore_latest.hex",
            Frame::Restore(RestoreRequest {
                server: String::new(),
                volume: "root".into(),
                point: PointSelector::Latest,
            }),
            0,
        ),
        (
            "restoreinfo.hex",
            Frame::RestoreInfo(RestoreInfo {
                point: 5,
                size: 1 << 30,
                block_size: 65536,
            }),
            1,
        ),
        (
            "fetch.hex",
            Frame::Fetch {
                indexes: vec![3, 0x0102_0304],
            },
            1,
        ),
        (
            "fetched.hex",
            Frame::Fetched(BlockFrame {
                tag: 5,
                volume: 0,
                encoding: Encoding::Raw,
                index: 3,
                raw_len: 4,
                hash: BlockHash::of(b"abcd"),
                payload: Bytes::from_static(b"abcd"),
            }),
            4,
        ),
        (
            "checkpoint.hex",
            Frame::Checkpoint {
                tag: 1,
                blocks: 16384,
                done: 1 << 30,
                total: 4 << 30,
            },
            11,
        ),
        (
            "checkpointed.hex",
            Frame::Checkpointed {
                tag: 1,
                sync: 0x0102030405060708,
                generation: 3,
            },
            12,
        ),
        (
            "resume.hex",
            Frame::Resume {
                sync: 0x0102030405060708,
                generation: 3,
            },
            13,
        ),
        (
            "syncstate.hex",
            Frame::SyncState {
                sync: 0x0102030405060708,
                generation: 4,
                done: 1 << 30,
                total: 4 << 30,
                resumed: true,
            },
            14,
        ),
        (
            "zerorun.hex",
            Frame::ZeroRun(ZeroRunFrame {
                tag: 2,
                volume: 1,
                first: 0x0100,
                count: 0x0001_0000_0000,
            }),
            11,
        ),
        ("partialblock.hex", partial_block(), 12),
        (
            "partialapplied.hex",
            Frame::PartialApplied(PartialAppliedFrame {
                tag: 3,
                volume: 1,
                index: 0x0203,
                hash: BlockHash::of(b"merged"),
            }),
            13,
        ),
        (
            // Three new hashes, a run of the first, one of the third.
            "hashespacked.hex",
            Frame::HashesPacked {
                volume: 0,
                start: 0x20,
                hashes: vec![
                    BlockHash([0x11; 32]),
                    BlockHash([0x22; 32]),
                    BlockHash([0x33; 32]),
                    BlockHash([0x11; 32]),
                    BlockHash([0x11; 32]),
                    BlockHash([0x33; 32]),
                ],
            },
            15,
        ),
    ]
}

fn testdata(name: &str) -> String {
    format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn golden_frames() {
    for (name, frame, seq) in fixtures() {
        let golden = std::fs::read_to_string(testdata(name)).unwrap();
        check(frame, seq, &golden);
    }
}

#[test]
fn malformed_inputs_get_their_specific_errors() {
    let cases: [(&str, DecodeError); 4] = [
        ("bad_kind.hex", DecodeError::UnknownKind(0x63)),
        ("too_large.hex", DecodeError::TooLarge(0xffff_ffff)),
        ("bad_crc.hex", DecodeError::BadCrc),
        ("bad_magic.hex", DecodeError::BadMagic),
    ];
    for (file, want) in cases {
        let text =
            std::fs::read_to_string(format!("{}/testdata/{file}", env!("CARGO_MANIFEST_DIR")))
                .unwrap();
        let mut wire = BytesMut::from(&unhex(&text)[..]);
        assert_eq!(Frame::decode(&mut wire), Err(want), "{file}");
    }
}

/// Regenerate the fixtures after a deliberate format change:
/// `PILOTLIGHT_BLESS=1 cargo test -p pilotlight-protocol --test golden -- --ignored`.
/// Without the variable it writes nothing (CI runs ignored tests too).
#[test]
#[ignore = "writes the fixtures with PILOTLIGHT_BLESS=1"]
fn regenerate_fixtures() {
    if std::env::var_os("PILOTLIGHT_BLESS").is_none() {
        return;
    }
    let dir = format!("{}/testdata", env!("CARGO_MANIFEST_DIR"));
    for (name, f, seq) in fixtures() {
        let mut buf = BytesMut::new();
        f.encode(seq, &mut buf);
        std::fs::write(testdata(name), hex(&buf) + "\n").unwrap();
    }
    // Malformed inputs.
    std::fs::write(
        format!("{dir}/bad_kind.hex"),
        "04000000 63 00 0000 0000000000000000\n",
    )
    .unwrap();
    std::fs::write(
        format!("{dir}/too_large.hex"),
        "ffffffff 07 00 0000 0000000000000000\n",
    )
    .unwrap();
    let mut buf = BytesMut::new();
    Frame::Durable { tag: 1, point: 2 }.encode(0, &mut buf);
    buf[20] ^= 0x01;
    std::fs::write(format!("{dir}/bad_crc.hex"), hex(&buf) + "\n").unwrap();
    let mut body = b"NOTLIGHT".to_vec();
    body.extend_from_slice(&1u16.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    let mut raw = (body.len() as u32).to_le_bytes().to_vec();
    raw.extend_from_slice(&[1, 0, 0, 0]);
    raw.extend_from_slice(&0u64.to_le_bytes());
    raw.extend_from_slice(&body);
    let crc = crc32fast::hash(&raw);
    raw.extend_from_slice(&crc.to_le_bytes());
    std::fs::write(format!("{dir}/bad_magic.hex"), hex(&raw) + "\n").unwrap();
}

/// The bytes of an annotated hex fixture.
fn unhex(text: &str) -> Vec<u8> {
    golden::unhex(text).expect("the fixture is hex")
}
