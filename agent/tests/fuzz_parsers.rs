//! The fuzz targets `agent_state`, `agent_sync` and `dirty_set` (`fuzz/fuzz_targets/`),
//! run by plain `cargo test`: every seed in `fuzz/seeds/<target>/`, then
//! random inputs for a bounded number of cases. The checks themselves live
//! in `pilotlight_agent::fuzzing`, shared with the fuzzers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::{Path, PathBuf};

use pilotlight_agent::fuzzing;
use pilotlight_agent::state::{AgentState, STATE_FILE};
use proptest::prelude::*;

/// The seed files of fuzz target `target`.
fn seeds(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    files
}

/// Every seed of `target`, and each of its prefixes and one-bit flips of its
/// first bytes (the mutations a fuzzer tries first).
fn replay(target: &str, check: fn(&[u8])) {
    for path in seeds(target) {
        let data = std::fs::read(&path).unwrap();
        check(&data);
        for len in 0..data.len() {
            check(&data[..len]);
        }
        for i in 0..data.len().min(64) {
            let mut bad = data.clone();
            bad[i] ^= 0x80;
            check(&bad);
        }
    }
}

#[test]
fn state_seeds_replay() {
    replay("agent_state", fuzzing::state_file);
}

#[test]
fn sync_seeds_replay() {
    replay("agent_sync", fuzzing::sync_file);
}

#[test]
fn dirty_seeds_replay() {
    replay("dirty_set", fuzzing::dirty_file);
}

/// The seed `name` of fuzz target `target`.
fn seed(target: &str, name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target)
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Found by the fuzz targets (the golden file with its checksum summed
/// again): a body with a byte after the last volume, under a good
/// checksum, was accepted as the state (or dirty set) without it.
#[test]
fn trailing_bytes_under_a_good_checksum_are_refused() {
    for target in ["agent_state", "dirty_set"] {
        fuzzing::state_file(&seed(target, "golden.bin"));
        fuzzing::dirty_file(&seed(target, "golden.bin"));
        fuzzing::state_file(&seed(target, "trailing_body.bin"));
        fuzzing::dirty_file(&seed(target, "trailing_body.bin"));
    }
    // Through the agent's own loading: the state is ignored.
    let mut body = seed("agent_state", "trailing_body.bin");
    let sum = *blake3::hash(&body).as_bytes();
    body.extend_from_slice(&sum);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(STATE_FILE), &body).unwrap();
    assert_eq!(AgentState::load(dir.path()).unwrap(), None);
}

/// Found by the `dirty_set` fuzz target: a treemap with the same key twice
/// read as the second bitmap alone, dropping the first one's dirty blocks
/// without a word (seed `duplicate_key_body.bin`: the golden set with the
/// `data` volume's second key made equal to its first).
#[test]
fn a_dirty_bitmap_with_a_key_twice_is_refused() {
    fuzzing::dirty_file(&seed("dirty_set", "duplicate_key_body.bin"));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_state_files(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        fuzzing::state_file(&data);
    }

    #[test]
    fn random_sync_files(data in proptest::collection::vec(any::<u8>(), 0..160)) {
        fuzzing::sync_file(&data);
    }

    #[test]
    fn random_dirty_files(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        fuzzing::dirty_file(&data);
    }
}
