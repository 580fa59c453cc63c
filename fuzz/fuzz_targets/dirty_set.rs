//! Arbitrary bytes as the agent's saved dirty set (see `agent::fuzzing`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| pilotlight_agent::fuzzing::dirty_file(data));
