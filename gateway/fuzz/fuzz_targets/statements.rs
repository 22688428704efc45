#![no_main]
//! See `regiongate::fuzzing::statements`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    regiongate::fuzzing::statements(data);
});
