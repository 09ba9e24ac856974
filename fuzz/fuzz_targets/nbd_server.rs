#![no_main]

use libfuzzer_sys::fuzz_target;

// Arbitrary client bytes through the real NBD server connection code (handshake, then the
// request loop) over an in-memory stream; see `strata_nbd::fuzzing::server_session`.
fuzz_target!(|data: &[u8]| {
    strata_nbd::fuzzing::server_session(data);
});
