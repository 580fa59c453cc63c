//! Golden bytes of `state.bin`, the agent's durable state (layout in the
//! `state` module docs). A format change must break this test: an agent
//! upgraded in place reads the file the old one wrote.
//!
//! `testdata/state.bin.hex` holds a version 1 file (hashes inline), one
//! field per line with its name, written from [`documented_layout`] with
//! `PILOTLIGHT_BLESS=1`. The agent no longer writes version 1, but still
//! reads (and migrates) it. `testdata/state.v2.bin.hex` holds version 2 (the
//! hashes in one file per volume), from [`documented_layout_v2`]; a new
//! format needs a new version (and a new fixture), not a bless.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::{Path, PathBuf};

use pilotlight_agent::hashfile::file_name;
use pilotlight_agent::state::{AgentState, StateHeader, VolumeHashes, STATE_FILE};
use pilotlight_protocol::golden::{self, hex};
use pilotlight_protocol::BlockHash;

/// The fixed inputs: two volumes, one of them empty.
fn golden_state() -> AgentState {
    AgentState {
        store_id: std::array::from_fn(|i| i as u8),
        last_point: 0x0102_0304_0506_0708,
        volumes: vec![
            VolumeHashes {
                name: "root".into(),
                size: 3 * 4096 + 5,
                block_size: 4096,
                hashes: (1..=4u8).map(|i| BlockHash([i; 32])).collect(),
            },
            VolumeHashes {
                name: "data".into(),
                size: 0,
                block_size: 65536,
                hashes: Vec::new(),
            },
        ],
    }
}

/// The same state laid out by hand from the module docs, field by field.
fn documented_layout() -> Vec<(String, Vec<u8>)> {
    let s = golden_state();
    let mut f: Vec<(String, Vec<u8>)> = vec![
        ("magic".into(), b"PLAGST01".to_vec()),
        ("version u32".into(), 1u32.to_le_bytes().to_vec()),
        ("store_id [16]".into(), s.store_id.to_vec()),
        ("last_point u64".into(), s.last_point.to_le_bytes().to_vec()),
        ("volumes u32".into(), 2u32.to_le_bytes().to_vec()),
    ];
    for v in &s.volumes {
        let n = &v.name;
        f.push((format!("{n}: name_len u8"), vec![v.name.len() as u8]));
        f.push((format!("{n}: name"), v.name.as_bytes().to_vec()));
        f.push((format!("{n}: size u64"), v.size.to_le_bytes().to_vec()));
        f.push((
            format!("{n}: block_size u32"),
            v.block_size.to_le_bytes().to_vec(),
        ));
        f.push((
            format!("{n}: blocks u64"),
            (v.hashes.len() as u64).to_le_bytes().to_vec(),
        ));
        for (i, h) in v.hashes.iter().enumerate() {
            f.push((format!("{n}: hash of block {i}"), h.0.to_vec()));
        }
    }
    let body: Vec<u8> = f.iter().flat_map(|(_, b)| b.clone()).collect();
    f.push((
        "blake3 of everything before".into(),
        blake3::hash(&body).as_bytes().to_vec(),
    ));
    f
}

fn fixture_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/state.bin.hex")
}

fn golden_bytes() -> Vec<u8> {
    unhex(&std::fs::read_to_string(fixture_path()).unwrap())
}

/// The version 2 layout of the same state, from the module docs: the
/// hashes are in the volumes' hash files.
fn documented_layout_v2() -> Vec<(String, Vec<u8>)> {
    let s = golden_state();
    let mut f: Vec<(String, Vec<u8>)> = vec![
        ("magic".into(), b"PLAGST01".to_vec()),
        ("version u32".into(), 2u32.to_le_bytes().to_vec()),
        ("store_id [16]".into(), s.store_id.to_vec()),
        ("last_point u64".into(), s.last_point.to_le_bytes().to_vec()),
        ("volumes u32".into(), 2u32.to_le_bytes().to_vec()),
    ];
    for v in &s.volumes {
        let n = &v.name;
        f.push((format!("{n}: name_len u8"), vec![v.name.len() as u8]));
        f.push((format!("{n}: name"), v.name.as_bytes().to_vec()));
        f.push((format!("{n}: size u64"), v.size.to_le_bytes().to_vec()));
        f.push((
            format!("{n}: block_size u32"),
            v.block_size.to_le_bytes().to_vec(),
        ));
        f.push((
            format!("{n}: blocks u64"),
            (v.hashes.len() as u64).to_le_bytes().to_vec(),
        ));
    }
    let body: Vec<u8> = f.iter().flat_map(|(_, b)| b.clone()).collect();
    f.push((
        "blake3 of everything before".into(),
        blake3::hash(&body).as_bytes().to_vec(),
    ));
    f
}

fn fixture_path_v2() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/state.v2.bin.hex")
}

/// With `PILOTLIGHT_BLESS=1`, (re)write the version 2 fixture from the
/// documented layout (only from the one test that compares with it). The
/// version 1 fixture is never written again.
fn bless_v2() {
    golden::bless(&fixture_path_v2(), &documented_layout_v2()).unwrap();
}

/// The bytes `save` writes for the fixed inputs: `state.bin`, and each
/// volume's hash file.
fn saved_bytes(s: &AgentState) -> (Vec<u8>, Vec<Vec<u8>>) {
    let dir = tempfile::tempdir().unwrap();
    s.save(dir.path()).unwrap();
    let files = s
        .volumes
        .iter()
        .map(|v| std::fs::read(dir.path().join(file_name(&v.name))).unwrap())
        .collect();
    (std::fs::read(dir.path().join(STATE_FILE)).unwrap(), files)
}

/// Load `bytes` as the state file of a fresh directory.
fn load(bytes: &[u8]) -> Option<AgentState> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(STATE_FILE), bytes).unwrap();
    AgentState::load(dir.path()).expect("a readable state file is no error")
}

/// The version 1 fixture is the documented version 1 layout.
#[test]
fn the_v1_golden_file_is_the_documented_layout() {
    let want: Vec<u8> = documented_layout()
        .into_iter()
        .flat_map(|(_, b)| b)
        .collect();
    assert_eq!(hex(&golden_bytes()), hex(&want));
}

#[test]
fn save_writes_the_documented_layout() {
    let want: Vec<u8> = documented_layout_v2()
        .into_iter()
        .flat_map(|(_, b)| b)
        .collect();
    let (state, files) = saved_bytes(&golden_state());
    assert_eq!(hex(&state), hex(&want));
    // Hash files: a 32-byte record per block, nothing else.
    for (v, f) in golden_state().volumes.iter().zip(files) {
        let want: Vec<u8> = v.hashes.iter().flat_map(|h| h.0).collect();
        assert_eq!(hex(&f), hex(&want), "{}", v.name);
    }
}

#[test]
fn save_writes_the_golden_file() {
    bless_v2();
    assert_eq!(
        hex(&saved_bytes(&golden_state()).0),
        hex(&unhex(&std::fs::read_to_string(fixture_path_v2()).unwrap())),
        "state.bin changed: a new format needs a new version"
    );
}

#[test]
fn the_golden_file_loads() {
    assert_eq!(load(&golden_bytes()), Some(golden_state()));
}

/// A version 1 file is migrated on its first load: hash files, and
/// `state.bin` rewritten as version 2; it loads the same afterwards.
#[test]
fn a_v1_state_is_migrated_to_hash_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(STATE_FILE), golden_bytes()).unwrap();
    let header = StateHeader::load(dir.path()).unwrap().unwrap();
    assert_eq!(header, golden_state().header());
    let (state, files) = saved_bytes(&golden_state());
    assert_eq!(
        hex(&std::fs::read(dir.path().join(STATE_FILE)).unwrap()),
        hex(&state)
    );
    for (v, f) in golden_state().volumes.iter().zip(files) {
        let got = std::fs::read(dir.path().join(file_name(&v.name))).unwrap();
        assert_eq!(hex(&got), hex(&f), "{}", v.name);
    }
    assert_eq!(AgentState::load(dir.path()).unwrap(), Some(golden_state()));
}

/// A version 2 `state.bin` whose hash file is missing or of another
/// length is no state.
#[test]
fn a_v2_state_without_its_hash_file_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    golden_state().save(dir.path()).unwrap();
    let root = dir.path().join(file_name("root"));
    std::fs::write(&root, [1u8; 32 * 3]).unwrap();
    assert_eq!(AgentState::load(dir.path()).unwrap(), None);
    std::fs::remove_file(&root).unwrap();
    assert_eq!(AgentState::load(dir.path()).unwrap(), None);
}

/// A damaged file is ignored (the agent then asks the receiver for its
/// hashes), whatever the damage: never a panic, never a wrong state.
#[test]
fn every_truncation_is_ignored() {
    let golden = golden_bytes();
    for len in 0..golden.len() {
        assert_eq!(load(&golden[..len]), None, "truncated to {len} bytes");
    }
    let mut longer = golden.clone();
    longer.push(0);
    assert_eq!(load(&longer), None, "a trailing byte");
}

#[test]
fn every_flipped_bit_is_ignored() {
    let golden = golden_bytes();
    for i in 0..golden.len() {
        for bit in [0x01, 0x80] {
            let mut bad = golden.clone();
            bad[i] ^= bit;
            assert_eq!(load(&bad), None, "byte {i} ^ {bit:#04x}");
        }
    }
}

/// Files whose checksum holds but whose fields do not: still ignored, and
/// without allocating what a wild count asks for.
#[test]
fn well_summed_nonsense_is_ignored() {
    let body_of = |edit: &dyn Fn(&mut Vec<u8>)| -> Vec<u8> {
        let golden = golden_bytes();
        let mut body = golden[..golden.len() - 32].to_vec();
        edit(&mut body);
        let sum = *blake3::hash(&body).as_bytes();
        body.extend_from_slice(&sum);
        body
    };
    type Edit<'a> = &'a dyn Fn(&mut Vec<u8>);
    let cases: [(&str, Edit); 7] = [
        ("version 2", &|b| b[8] = 2),
        ("version 3", &|b| b[8] = 3),
        ("another magic", &|b| b[0] = b'X'),
        ("more volumes than there are", &|b| {
            b[36..40].copy_from_slice(&u32::MAX.to_le_bytes())
        }),
        ("a name longer than the file", &|b| b[40] = 255),
        ("a block count past the end", &|b| {
            // root: name_len (40), name (41..45), size, block_size, blocks.
            b[57..65].copy_from_slice(&u64::MAX.to_le_bytes())
        }),
        ("a name that is not UTF-8", &|b| b[41] = 0xff),
    ];
    for (what, edit) in cases {
        assert_eq!(load(&body_of(edit)), None, "{what}");
    }
    // The edits are where the comments say: an unedited body loads.
    assert_eq!(load(&body_of(&|_| {})), Some(golden_state()));
}

/// The bytes of an annotated hex fixture.
fn unhex(text: &str) -> Vec<u8> {
    golden::unhex(text).expect("the fixture is hex")
}

/// Every truncation and flipped bit of a version 2 `state.bin` is ignored.
#[test]
fn every_damage_of_a_v2_state_is_ignored() {
    let golden = unhex(&std::fs::read_to_string(fixture_path_v2()).unwrap());
    let header = |bytes: &[u8]| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), bytes).unwrap();
        StateHeader::load(dir.path()).unwrap()
    };
    assert_eq!(header(&golden), Some(golden_state().header()));
    for len in 0..golden.len() {
        assert_eq!(header(&golden[..len]), None, "truncated to {len} bytes");
    }
    for i in 0..golden.len() {
        let mut bad = golden.clone();
        bad[i] ^= 0x01;
        assert_eq!(header(&bad), None, "byte {i}");
    }
}
