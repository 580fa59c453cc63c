//! Entry points shared by the cargo-fuzz targets (`fuzz/fuzz_targets/`) and
//! the tests that replay their seeds and random inputs (`agent/tests/
//! fuzz_parsers.rs`), so that a plain `cargo test` exercises what the
//! fuzzers do. Not part of the API.
//!
//! Both files end in a checksum of everything before it, which random bytes
//! almost never match: each entry point parses the input as it is, then
//! again with the right checksum appended, so the fuzzer reaches the fields.

use crate::state::{parse, AgentState, Parsed};
use crate::trace::saved::SavedDirty;

/// `state.bin` of either version: parsing arbitrary bytes never panics,
/// and what parses is exactly the bytes that version's writer gives for
/// the state it yields (no trailing bytes, no second spelling of one
/// state).
pub fn state_file(data: &[u8]) {
    check_state(data);
    let mut summed = data.to_vec();
    summed.extend_from_slice(blake3::hash(data).as_bytes());
    check_state(&summed);
}

fn check_state(data: &[u8]) {
    match parse(data) {
        None => {}
        Some(Parsed::Header(h)) => {
            let again = h.serialize();
            assert!(again == data, "state.bin v2 re-encodes differently: {h:?}");
        }
        Some(Parsed::Inline(s)) => {
            let again = version_1(&s);
            assert!(again == data, "state.bin v1 re-encodes differently: {s:?}");
        }
    }
}

/// The version 1 layout (hashes inline), as the agents before the hash
/// files wrote it: only read now, so its writer lives here.
fn version_1(s: &AgentState) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"PLAGST01");
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&s.store_id);
    out.extend_from_slice(&s.last_point.to_le_bytes());
    out.extend_from_slice(&(s.volumes.len() as u32).to_le_bytes());
    for v in &s.volumes {
        out.push(v.name.len() as u8);
        out.extend_from_slice(v.name.as_bytes());
        out.extend_from_slice(&v.size.to_le_bytes());
        out.extend_from_slice(&v.block_size.to_le_bytes());
        out.extend_from_slice(&(v.hashes.len() as u64).to_le_bytes());
        for h in &v.hashes {
            out.extend_from_slice(&h.0);
        }
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// The checkpoint record (`sync.bin`): parsing arbitrary bytes never
/// panics, and what parses is exactly what `SyncRecord::serialize` writes
/// for the record it yields.
pub fn sync_file(data: &[u8]) {
    check_sync(data);
    let mut summed = data.to_vec();
    summed.extend_from_slice(blake3::hash(data).as_bytes());
    check_sync(&summed);
}

fn check_sync(data: &[u8]) {
    if let Some(rec) = crate::checkpoint::SyncRecord::parse(data) {
        assert!(
            rec.serialize() == data,
            "sync.bin does not re-encode exactly: {rec:?}"
        );
    }
}

/// The saved dirty set (`dirty.bin`): parsing arbitrary bytes never
/// panics, and what parses is what `SavedDirty::encode` writes for the
/// set it yields, up to the order of a treemap's keys (the roaring crate
/// reads them in any order): the same set, in as many bytes.
pub fn dirty_file(data: &[u8]) {
    check_dirty(data);
    let mut summed = data.to_vec();
    summed.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    check_dirty(&summed);
}

fn check_dirty(data: &[u8]) {
    let Ok(saved) = SavedDirty::parse(data) else {
        return;
    };
    let again = saved.encode();
    assert!(
        again.is_ok(),
        "a parsed dirty set does not encode: {saved:?}"
    );
    if let Ok(bytes) = again {
        assert!(
            bytes.len() == data.len(),
            "dirty.bin re-encodes to another length: {saved:?}"
        );
        let back = SavedDirty::parse(&bytes);
        assert!(
            back.as_ref() == Ok(&saved),
            "dirty.bin does not round-trip: {saved:?} -> {back:?}"
        );
    }
}
