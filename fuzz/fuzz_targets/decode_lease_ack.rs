//! Fuzz target: decode_lease_ack.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    use d402_protocol::messages::WireMessage;
    let _ = d402_protocol::messages::LeaseAck::from_bytes(data);
});
