//! Property tests: round trips, and "any bytes decode to a value or an error, never a panic".

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use d402_protocol::{Cid, Signable, Signed, cbor, messages::*};
use proptest::prelude::*;

fn round_trip<T: Signable + std::fmt::Debug + PartialEq + Clone>(
    body: T,
) -> Result<(), TestCaseError> {
    let signed = Signed::sign(body, &key(3)).unwrap();
    let bytes = signed.to_bytes().unwrap();
    // The fast canonical encoder gives the general path's bytes.
    prop_assert_eq!(&cbor::to_canonical_via_value(&signed).unwrap(), &bytes);
    let back = Signed::<T>::from_bytes(&bytes).unwrap();
    prop_assert_eq!(&back, &signed);
    prop_assert_eq!(back.to_bytes().unwrap(), bytes);
    Ok(())
}

fn decode_all(bytes: &[u8]) {
    let _ = Signed::<Offer>::from_bytes(bytes);
    let _ = Signed::<BidRequest>::from_bytes(bytes);
    let _ = Signed::<Bid>::from_bytes(bytes);
    let _ = Signed::<Lease>::from_bytes(bytes);
    let _ = Signed::<Claim>::from_bytes(bytes);
    let _ = Signed::<Verdict>::from_bytes(bytes);
    let _ = Signed::<SettlementReceipt>::from_bytes(bytes);
    let _ = BidResponse::from_bytes(bytes);
    let _ = LeaseAck::from_bytes(bytes);
    let _ = ClaimAck::from_bytes(bytes);
    let _ = Cid::from_bytes(bytes);
    let _ = cbor::from_canonical::<ciborium::value::Value>(bytes, 1 << 20, "value");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn bids_round_trip(b in any_bid()) { round_trip(b)?; }

    #[test]
    fn leases_round_trip(l in any_lease()) { round_trip(l)?; }

    #[test]
    fn claims_round_trip(c in any_claim()) { round_trip(c)?; }

    #[test]
    fn verdicts_round_trip(v in any_verdict()) { round_trip(v)?; }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        decode_all(&bytes);
    }

    #[test]
    fn mutated_envelopes_never_panic_and_never_verify_changed(
        c in any_claim(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let signed = Signed::sign(c, &key(3)).unwrap();
        let original = signed.to_bytes().unwrap();
        let mut bytes = original.clone();
        for (i, b) in edits {
            let i = i.index(bytes.len());
            bytes[i] = b;
        }
        decode_all(&bytes);
        if bytes != original {
            prop_assert!(Signed::<Claim>::from_bytes(&bytes).is_err());
        }
    }

    #[test]
    fn truncations_are_refused(b in any_bid(), cut in any::<prop::sample::Index>()) {
        let bytes = Signed::sign(b, &key(3)).unwrap().to_bytes().unwrap();
        let cut = cut.index(bytes.len());
        prop_assert!(Signed::<Bid>::from_bytes(&bytes[..cut]).is_err());
    }
}
