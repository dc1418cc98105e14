//! Fuzz target: canonical_value.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = d402_protocol::cbor::from_canonical::<ciborium_value::value::Value>(data, 1 << 20, "value") {
        // Whatever decodes as canonical must re-encode to the same bytes.
        assert_eq!(d402_protocol::cbor::to_canonical(&value).ok().as_deref(), Some(data));
    }
});
