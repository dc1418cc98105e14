//! Fuzz target: decode_cid.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(cid) = d402_protocol::Cid::from_bytes(data) {
        assert_eq!(cid.to_bytes(), data);
        let text = cid.to_string();
        assert_eq!(text.parse::<d402_protocol::Cid>().ok(), Some(cid));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<d402_protocol::Cid>();
        let _ = text.parse::<d402_protocol::CapabilityRef>();
    }
});
