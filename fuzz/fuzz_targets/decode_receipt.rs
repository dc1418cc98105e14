//! Fuzz target: decode_receipt.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = d402_protocol::Signed::<d402_protocol::messages::SettlementReceipt>::from_bytes(data);
});
