#![no_main]
//! Open an image (read-only, with backing/data-file stand-ins), read and map it.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    strata_qcow2::fuzzing::open(data);
});
