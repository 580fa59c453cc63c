//! Entry points shared by the cargo-fuzz targets (`fuzz/fuzz_targets/`) and
//! the tests that replay their seeds and random inputs (`agent/tests/
//! fuzz_parsers.rs`), so that a plain `cargo test` exercises what the
//! fuzzers do. Not part of the API.
//!
//! Both files end in a checksum of everything before it, which random bytes
//! almost never match: each entry point parses the input as it is, then
//! again with the right checksum appended, so the fuzzer reaches the fields.

use crate::state::AgentState;
use crate::trace::saved::SavedDirty;

/// `state.bin`: parsing arbitrary bytes never panics, and what parses is
/// exactly what `AgentState::save` writes for the state it yields (no
/// trailing bytes, no second spelling of one state).
pub fn state_file(data: &[u8]) {
    check_state(data);
    let mut summed = data.to_vec();
    summed.extend_from_slice(blake3::hash(data).as_bytes());
    check_state(&summed);
}

fn check_state(data: &[u8]) {
    if let Some(state) = AgentState::parse(data) {
        let again = state.view().serialize();
        assert!(again == data, "state.bin re-encodes differently: {state:?}");
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
