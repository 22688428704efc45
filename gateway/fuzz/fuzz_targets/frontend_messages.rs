#![no_main]
//! See `regiongate::fuzzing::frontend_messages`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    regiongate::fuzzing::frontend_messages(data);
});
