//! The saved dirty set: golden bytes, round trip, damage.

use super::*;
use pilotlight_protocol::golden::{self, hex};

/// The fixture pinning the format, annotated one field per line.
const FIXTURE: &str = include_str!("../../../tests/testdata/dirty.hex");

/// A fixed dirty set: a small range, a block past 2^32 (a second treemap
/// bucket), and an empty set.
fn fixed() -> SavedDirty {
    let mut root = RoaringTreemap::new();
    root.insert_range(10..20);
    let mut data = RoaringTreemap::new();
    data.insert(0);
    data.insert(1 << 33);
    SavedDirty {
        boot_id: "3f1c9b2e-5d47-4a8e-9c61-0b2d7e4f8a13".into(),
        volumes: vec![
            SavedVolume {
                name: "root".into(),
                own: (7, 3),
                block_size: 4096,
                counters: [1, 2, 3, 4],
                dirty: root,
            },
            SavedVolume {
                name: "data".into(),
                own: (259, 1),
                block_size: 65536,
                counters: [100, 800, 0, 0],
                dirty: data,
            },
            SavedVolume {
                name: "swap".into(),
                own: (8, 2),
                block_size: 4096,
                counters: [5, 6, 7, 8],
                dirty: RoaringTreemap::new(),
            },
        ],
    }
}

/// `saved` laid out by hand from the module's diagram, one field a line:
/// `(bytes, what)`.
fn documented_layout(saved: &SavedDirty) -> Vec<(Vec<u8>, String)> {
    let mut lines: Vec<(Vec<u8>, String)> = Vec::new();
    let text = |s: &str| {
        let mut b = (s.len() as u16).to_le_bytes().to_vec();
        b.extend_from_slice(s.as_bytes());
        b
    };
    lines.push((b"PLDIRTY1".to_vec(), "magic".into()));
    lines.push((text(&saved.boot_id), "boot_id len u16, boot_id".into()));
    let count = saved.volumes.len() as u32;
    lines.push((count.to_le_bytes().to_vec(), "volume count u32".into()));
    for v in &saved.volumes {
        let name = &v.name;
        lines.push((text(name), format!("{name}: name len u16, name")));
        let mut dev = v.own.0.to_le_bytes().to_vec();
        dev.extend_from_slice(&v.own.1.to_le_bytes());
        let own = format!("{}:{}", v.own.0, v.own.1);
        lines.push((dev, format!("{name}: major u32, minor u32 ({own})")));
        let bs = v.block_size;
        lines.push((bs.to_le_bytes().to_vec(), format!("{name}: block_size u32")));
        for (c, what) in v.counters.iter().zip(["write I/Os", "write sectors"]) {
            lines.push((c.to_le_bytes().to_vec(), format!("{name}: {what} u64")));
        }
        for (c, what) in v.counters[2..]
            .iter()
            .zip(["discard I/Os", "discard sectors"])
        {
            lines.push((c.to_le_bytes().to_vec(), format!("{name}: {what} u64")));
        }
        let mut bm = Vec::new();
        v.dirty.serialize_into(&mut bm).unwrap();
        let len = bm.len() as u64;
        lines.push((
            len.to_le_bytes().to_vec(),
            format!("{name}: bitmap len u64"),
        ));
        let blocks: Vec<u64> = v.dirty.iter().collect();
        let what = format!("{name}: roaring treemap of {blocks:?}");
        lines.push((bm, what));
    }
    let body: Vec<u8> = lines.iter().flat_map(|(b, _)| b.clone()).collect();
    let crc = crc32fast::hash(&body).to_le_bytes().to_vec();
    lines.push((crc, "crc32 u32 of all the above".into()));
    lines
}

fn annotated(lines: &[(Vec<u8>, String)]) -> String {
    let mut out = String::from(
        "# agent/src/trace/saved.rs: the dirty set of a clean stop (dirty.bin), one field a line.\n\
         # Regenerate (only for a deliberate format change, with a new magic):\n\
         # cargo test -p pilotlight-agent --lib -- --ignored regenerate_dirty_fixture\n",
    );
    for (b, what) in lines {
        out.push_str(&format!("{}  # {what}\n", hex(b)));
    }
    out
}

#[test]
fn encoding_matches_the_golden_fixture() {
    let bytes = fixed().encode().unwrap();
    assert_eq!(
        hex(&bytes),
        hex(&unhex(FIXTURE)),
        "dirty.bin format changed"
    );
}

#[test]
fn encoding_matches_the_documented_layout() {
    let saved = fixed();
    let want: Vec<u8> = documented_layout(&saved)
        .into_iter()
        .flat_map(|(b, _)| b)
        .collect();
    assert_eq!(hex(&saved.encode().unwrap()), hex(&want));
}

#[test]
fn golden_fixture_decodes_to_the_fixed_set() {
    assert_eq!(SavedDirty::parse(&unhex(FIXTURE)), Ok(fixed()));
}

#[test]
#[ignore = "rewrites agent/tests/testdata/dirty.hex; run only for a deliberate format change"]
fn regenerate_dirty_fixture() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/testdata/dirty.hex");
    std::fs::write(path, annotated(&documented_layout(&fixed()))).unwrap();
}

#[test]
fn save_then_take_round_trips_once() {
    let dir = tempfile::tempdir().unwrap();
    fixed().save(dir.path()).unwrap();
    assert_eq!(SavedDirty::take(dir.path()), Some(fixed()));
    // Taking it removes it: an unclean stop after a start finds nothing.
    assert!(!dir.path().join(DIRTY_FILE).exists());
    assert_eq!(SavedDirty::take(dir.path()), None);
}

#[test]
fn a_damaged_file_is_taken_as_none() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = fixed().encode().unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 1;
    std::fs::write(dir.path().join(DIRTY_FILE), &data).unwrap();
    assert_eq!(SavedDirty::take(dir.path()), None);
    assert!(!dir.path().join(DIRTY_FILE).exists());
}

#[test]
fn every_truncation_is_an_error() {
    let data = fixed().encode().unwrap();
    for n in 0..data.len() {
        assert!(SavedDirty::parse(&data[..n]).is_err(), "{n} bytes parsed");
    }
}

#[test]
fn every_bit_flip_is_an_error() {
    let data = fixed().encode().unwrap();
    for i in 0..data.len() * 8 {
        let mut d = data.clone();
        d[i / 8] ^= 1 << (i % 8);
        assert!(SavedDirty::parse(&d).is_err(), "bit {i} flipped parsed");
    }
}

/// `body` (without a checksum) with a valid checksum appended, so that the
/// parser gets past the crc to the fields.
fn sealed(body: &[u8]) -> Vec<u8> {
    let mut d = body.to_vec();
    d.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    d
}

#[test]
fn damage_behind_a_valid_checksum_is_named() {
    let data = fixed().encode().unwrap();
    let body = &data[..data.len() - 4];
    let mut bad_magic = body.to_vec();
    bad_magic[7] = b'9';
    let mut not_utf8 = body.to_vec();
    not_utf8[10] = 0xff; // first byte of the boot id
    let mut huge_count = body.to_vec();
    let count_at = 8 + 2 + 36;
    huge_count[count_at..count_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    let cases: &[(&str, Vec<u8>, DamagedDirty)] = &[
        ("empty", Vec::new(), DamagedDirty::TooShort),
        ("crc only", sealed(&[]), DamagedDirty::Truncated("magic")),
        ("bad magic", sealed(&bad_magic), DamagedDirty::BadMagic),
        (
            "magic only",
            sealed(b"PLDIRTY1"),
            DamagedDirty::Truncated("boot id"),
        ),
        (
            "boot id not utf-8",
            sealed(&not_utf8),
            DamagedDirty::NotUtf8("boot id"),
        ),
        (
            "cut in the last bitmap",
            sealed(&body[..body.len() - 1]),
            DamagedDirty::Truncated("bitmap"),
        ),
        (
            "more volumes than bytes",
            sealed(&huge_count),
            DamagedDirty::Truncated("volume name"),
        ),
    ];
    for (what, bytes, want) in cases {
        assert_eq!(SavedDirty::parse(bytes).err(), Some(*want), "{what}");
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    for len in 0..512 {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let _ = SavedDirty::parse(&sealed(&bytes));
        let mut with_magic = b"PLDIRTY1".to_vec();
        with_magic.extend_from_slice(&bytes);
        let _ = SavedDirty::parse(&sealed(&with_magic));
    }
}

/// The bytes of an annotated hex fixture.
fn unhex(text: &str) -> Vec<u8> {
    golden::unhex(text).expect("the fixture is hex")
}
