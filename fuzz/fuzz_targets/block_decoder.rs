//! Arbitrary bytes into the bounded block decoder (see `protocol::fuzzing`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| pilotlight_protocol::fuzzing::decode_block(data));
