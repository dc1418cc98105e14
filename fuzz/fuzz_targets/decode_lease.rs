//! Fuzz target: decode_lease.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = d402_protocol::Signed::<d402_protocol::messages::Lease>::from_bytes(data);
});
