//! Arbitrary bytes as the agent's checkpoint record, `sync.bin` (see `agent::fuzzing`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| pilotlight_agent::fuzzing::sync_file(data));
