#![no_main]
//! QMP stream parser + schema validation of each parsed command.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    strata_qmp::fuzzing::qmp_json(data);
});
