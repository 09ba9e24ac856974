#![no_main]
//! Decompression of arbitrary bytes into a cluster of a chosen size.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    strata_qcow2::fuzzing::decompress(data);
});
