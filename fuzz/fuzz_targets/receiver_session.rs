//! A script of agent connections and frames, in any order, against a real
//! receiver store (see `receiver::fuzzing`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    pilotlight_receiver::fuzzing::session(data);
});
