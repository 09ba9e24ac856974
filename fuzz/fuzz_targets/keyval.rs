#![no_main]
//! Command-line option strings (keyval/JSON) converted against the schema.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    strata_qmp::fuzzing::keyval(data);
});
