#![no_main]
//! Header parsing of arbitrary bytes: an error or a header, never a panic.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    strata_qcow2::fuzzing::header(data);
});
