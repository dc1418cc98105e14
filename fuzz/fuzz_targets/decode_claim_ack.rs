//! Fuzz target: decode_claim_ack.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    use d402_protocol::messages::WireMessage;
    let _ = d402_protocol::messages::ClaimAck::from_bytes(data);
});
