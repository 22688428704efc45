#![no_main]
//! See `regiongate::fuzzing::startup`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    regiongate::fuzzing::startup(data);
});
