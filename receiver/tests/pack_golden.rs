//! Golden bytes of a pack file (layout in the `pack` module docs). A format
//! change must break this test: the store holds packs written by every
//! earlier receiver.
//!
//! `testdata/pack.hex` holds a pack of three records, one field per line
//! with its name. It was written from [`documented_layout`] with
//! `PILOTLIGHT_BLESS=1`; a new format needs a new magic, not a bless.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::{Path, PathBuf};

use pilotlight_protocol::golden::{self, hex};
use pilotlight_protocol::{BlockHash, Encoding};
use pilotlight_receiver::pack::{pack_path, BlockLoc, OpenPacks, PackReader, PackWriter};
use pilotlight_receiver::ReceiveError;

/// The fixed inputs: (hash, encoding, raw length, payload) of each record.
fn records() -> Vec<(BlockHash, Encoding, u32, Vec<u8>)> {
    let raw = b"pilotlight".to_vec();
    vec![
        (BlockHash::of(&raw), Encoding::Raw, 10, raw),
        (
            BlockHash::of(&[0; 65536]),
            Encoding::Zero,
            65536,
            Vec::new(),
        ),
        // The pack does not look inside a payload: any bytes stand for a
        // zstd frame here (a real one would pin the zstd version too).
        (
            BlockHash([0xab; 32]),
            Encoding::Zstd,
            4096,
            b"zstd frame".to_vec(),
        ),
    ]
}

/// Where the records are, as the catalog would say.
fn locs() -> Vec<BlockLoc> {
    let mut offset = 16;
    records()
        .iter()
        .map(|(_, encoding, raw_len, payload)| {
            let loc = BlockLoc {
                pack: 1,
                offset,
                stored_len: payload.len() as u32,
                raw_len: *raw_len,
                encoding: *encoding,
            };
            offset = loc.end();
            loc
        })
        .collect()
}

/// The pack laid out by hand from the module docs, field by field.
fn documented_layout() -> Vec<(String, Vec<u8>)> {
    let mut f: Vec<(String, Vec<u8>)> = vec![
        ("pack magic".into(), b"PLPACK01".to_vec()),
        ("reserved u64".into(), vec![0; 8]),
    ];
    for (i, (hash, encoding, raw_len, payload)) in records().into_iter().enumerate() {
        f.push((format!("record {i}: magic"), b"PLBK".to_vec()));
        f.push((format!("record {i}: encoding u8"), vec![encoding as u8]));
        f.push((format!("record {i}: reserved [3]"), vec![0; 3]));
        f.push((
            format!("record {i}: raw_len u32"),
            raw_len.to_le_bytes().to_vec(),
        ));
        f.push((
            format!("record {i}: stored_len u32"),
            (payload.len() as u32).to_le_bytes().to_vec(),
        ));
        f.push((format!("record {i}: hash [32]"), hash.0.to_vec()));
        if !payload.is_empty() {
            f.push((format!("record {i}: payload"), payload));
        }
    }
    f
}

fn fixture_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/pack.hex")
}

fn golden_bytes() -> Vec<u8> {
    unhex(&std::fs::read_to_string(fixture_path()).unwrap())
}

/// With `PILOTLIGHT_BLESS=1`, (re)write the fixture from the documented
/// layout (only from the one test that compares with it).
fn bless() {
    golden::bless(&fixture_path(), &documented_layout()).unwrap();
}

/// A store directory whose pack 1 holds `bytes`.
fn store_with_pack(bytes: &[u8]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("packs")).unwrap();
    std::fs::write(pack_path(dir.path(), 1), bytes).unwrap();
    dir
}

/// The pack a [`PackWriter`] writes for the fixed records, and where it
/// says each went.
fn written_pack() -> (Vec<u8>, Vec<BlockLoc>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("packs")).unwrap();
    let mut w = PackWriter::new(dir.path(), OpenPacks::default());
    let locs = records()
        .iter()
        .map(|(hash, encoding, raw_len, payload)| {
            w.append(hash, *encoding, *raw_len, payload, || 1)
                .unwrap()
                .0
        })
        .collect();
    drop(w);
    (std::fs::read(pack_path(dir.path(), 1)).unwrap(), locs)
}

#[test]
fn the_writer_writes_the_documented_layout() {
    let want: Vec<u8> = documented_layout()
        .into_iter()
        .flat_map(|(_, b)| b)
        .collect();
    let (bytes, at) = written_pack();
    assert_eq!(hex(&bytes), hex(&want));
    assert_eq!(at, locs());
}

#[test]
fn the_writer_writes_the_golden_file() {
    bless();
    assert_eq!(
        hex(&written_pack().0),
        hex(&golden_bytes()),
        "the pack format changed: a new format needs a new magic"
    );
}

#[test]
fn the_golden_file_reads_back() {
    let dir = store_with_pack(&golden_bytes());
    let mut r = PackReader::new(dir.path());
    let mut out = Vec::new();
    for ((hash, _, _, payload), loc) in records().iter().zip(locs()) {
        r.read(&loc, hash, &mut out).unwrap();
        assert_eq!(out, *payload, "record at {}", loc.offset);
    }
}

/// A pack cut short (a lost tail) is a storage error naming the pack, for
/// every record it cuts into: never a panic, never short data.
#[test]
fn a_truncated_pack_is_a_storage_error() {
    let golden = golden_bytes();
    for len in 0..golden.len() {
        let dir = store_with_pack(&golden[..len]);
        let mut r = PackReader::new(dir.path());
        let mut out = Vec::new();
        for ((hash, _, _, _), loc) in records().iter().zip(locs()) {
            let got = r.read(&loc, hash, &mut out);
            if loc.end() <= len as u64 {
                assert!(got.is_ok(), "cut at {len}: record at {}", loc.offset);
                continue;
            }
            match got {
                Err(ReceiveError::Storage { path, source }) => {
                    assert_eq!(path, pack_path(dir.path(), 1));
                    assert_eq!(source.kind(), std::io::ErrorKind::UnexpectedEof);
                }
                other => panic!("cut at {len}: record at {}: {other:?}", loc.offset),
            }
        }
    }
}

/// A record header that does not match the catalog (magic, encoding,
/// lengths, hash: every byte the reader checks) is corruption.
#[test]
fn a_damaged_record_header_is_corruption() {
    let golden = golden_bytes();
    for ((hash, _, _, _), loc) in records().iter().zip(locs()) {
        // Byte 5..8 of a header are reserved, and the payload is checked
        // against the hash after decoding, not by the reader.
        for at in (0..5).chain(8..48) {
            let mut bad = golden.clone();
            bad[loc.offset as usize + at] ^= 0x01;
            let dir = store_with_pack(&bad);
            let got = PackReader::new(dir.path()).read(&loc, hash, &mut Vec::new());
            assert!(
                matches!(got, Err(ReceiveError::Corrupt(_))),
                "header byte {at} of the record at {}: {got:?}",
                loc.offset
            );
        }
    }
}

/// A catalog entry pointing at the wrong place or saying the wrong thing
/// is corruption too.
#[test]
fn a_catalog_entry_that_does_not_match_is_corruption() {
    let dir = store_with_pack(&golden_bytes());
    let mut r = PackReader::new(dir.path());
    let locs = locs();
    let (first, second) = (locs[0], locs[1]);
    let hash = records()[0].0;
    let cases = [
        (
            "another offset",
            BlockLoc {
                offset: 17,
                ..first
            },
        ),
        ("another record", second),
        (
            "another encoding",
            BlockLoc {
                encoding: Encoding::Zstd,
                ..first
            },
        ),
        (
            "another raw length",
            BlockLoc {
                raw_len: 11,
                ..first
            },
        ),
        (
            "another stored length",
            BlockLoc {
                stored_len: 9,
                ..first
            },
        ),
    ];
    for (what, loc) in cases {
        let got = r.read(&loc, &hash, &mut Vec::new());
        assert!(
            matches!(got, Err(ReceiveError::Corrupt(_))),
            "{what}: {got:?}"
        );
    }
    let other = BlockHash([0; 32]);
    let got = r.read(&first, &other, &mut Vec::new());
    assert!(
        matches!(got, Err(ReceiveError::Corrupt(_))),
        "another hash: {got:?}"
    );
}

/// The bytes of an annotated hex fixture.
fn unhex(text: &str) -> Vec<u8> {
    golden::unhex(text).expect("the fixture is hex")
}
