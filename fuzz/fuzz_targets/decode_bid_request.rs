//! Fuzz target: decode_bid_request.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = d402_protocol::Signed::<d402_protocol::messages::BidRequest>::from_bytes(data);
});
