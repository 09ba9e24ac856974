#![no_main]
//! `check` (plain and `-r all`) on arbitrary bytes as an image: a report or an error.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    strata_qcow2::fuzzing::check(data);
});
