//! The fuzz target `receiver_session` (`fuzz/fuzz_targets/`), run by plain
//! `cargo test`: every seed in `fuzz/seeds/receiver_session/`, then random
//! scripts for a bounded number of cases. The harness and its checks live
//! in `pilotlight_receiver::fuzzing` (feature `fuzzing`), shared with the
//! fuzzer: no panic, no hang, only errors a peer can cause, and no point
//! without its `EndPoint`.
//!
//! A panic in a task whose result the receiver drops (a blocking applier)
//! would not reach the harness: a panic hook counts the panics of tokio's
//! blocking threads, and each run asserts there was none.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

use pilotlight_receiver::fuzzing::{self, Outcome};
use proptest::prelude::*;

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Count every panic on tokio's blocking threads (then report it as
/// usual); the harness itself sees those of the tasks it spawns.
fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            if thread.name().is_some_and(|n| n.starts_with("tokio")) {
                PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

/// Run one script; no panic anywhere, even in a task nobody joins.
fn run(data: &[u8]) -> Outcome {
    count_panics();
    let outcome = fuzzing::session(data);
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a blocking task panicked");
    outcome
}

fn seed_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/receiver_session")
}

fn seed(name: &str) -> Vec<u8> {
    let path = seed_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_seed_replays() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(seed_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    for path in files {
        let data = std::fs::read(&path).unwrap();
        run(&data);
        // Every prefix too: a script cut anywhere.
        for len in (0..data.len()).step_by(7) {
            run(&data[..len]);
        }
    }
}

/// The seeds reach what they were written for, so the fuzzer starts from
/// sessions that commit, fail and take over.
#[test]
fn the_seeds_reach_commits_and_failures() {
    let ok = run(&seed("one_session_two_points.bin"));
    assert_eq!((ok.points, ok.durable, ok.errors), (2, 2, 0), "{ok:?}");
    let none = run(&seed("blocks_without_end_point.bin"));
    assert_eq!(none.points, 0, "{none:?}");
    let takeover = run(&seed("takeover.bin"));
    assert!(takeover.errors > 0 && takeover.points <= 1, "{takeover:?}");
    let hostile = run(&seed("hostile.bin"));
    assert_eq!(hostile.points, 0, "{hostile:?}");
    assert!(hostile.errors >= 3, "{hostile:?}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random scripts, and random scripts that start as a seed does (past
    /// its `Hello` and `Open`), which reach the data streams more often.
    #[test]
    fn random_scripts(tail in proptest::collection::vec(any::<u8>(), 0..256), from_seed in any::<bool>()) {
        let mut data = if from_seed { seed("one_session_two_points.bin")[..15].to_vec() } else { Vec::new() };
        data.extend_from_slice(&tail);
        run(&data);
    }
}
