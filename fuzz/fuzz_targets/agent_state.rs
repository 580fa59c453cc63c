//! Arbitrary bytes as the agent's `state.bin` (see `agent::fuzzing`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| pilotlight_agent::fuzzing::state_file(data));
