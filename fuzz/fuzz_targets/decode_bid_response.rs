//! Fuzz target: decode_bid_response.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    use d402_protocol::messages::WireMessage;
    let _ = d402_protocol::messages::BidResponse::from_bytes(data);
});
