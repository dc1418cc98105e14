//! Every message kind: encode, decode, tamper, cross-domain.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use d402_protocol::{
    Cid, ProtocolError, Signable, Signed, cbor, messages::*, signed::signing_input,
};
use ed25519_dalek::Signer;

/// Encodes, decodes, re-encodes; then flips every bit of every byte position (stepping
/// through large messages) and checks each altered envelope is refused with a typed error.
fn exercise<T: Signable + std::fmt::Debug + PartialEq + Clone>(body: T) {
    let signed = Signed::sign(body.clone(), &key(1)).unwrap();
    let bytes = signed.to_bytes().unwrap();
    let back = Signed::<T>::from_bytes(&bytes).unwrap();
    assert_eq!(back.body, body);
    assert_eq!(
        back.to_bytes().unwrap(),
        bytes,
        "re-encoding is byte-identical"
    );
    assert_eq!(back.cid().unwrap(), signed.cid().unwrap());

    let step = (bytes.len() / 2048).max(1);
    let mut refused = 0;
    for i in (0..bytes.len()).step_by(step) {
        for bit in [0x01u8, 0x80] {
            let mut t = bytes.clone();
            t[i] ^= bit;
            let err = Signed::<T>::from_bytes(&t).expect_err(&format!(
                "{}: flipping bit {bit:#x} of byte {i} was accepted",
                T::KIND
            ));
            // Every refusal is one of the typed errors; none is a panic.
            let _: ProtocolError = err;
            refused += 1;
        }
    }
    assert!(refused > 0);
}

#[test]
fn offer_round_trips_and_resists_tampering() {
    exercise(offer());
}

#[test]
fn bid_request_round_trips_and_resists_tampering() {
    exercise(bid_request());
}

#[test]
fn bid_round_trips_and_resists_tampering() {
    exercise(bid());
}

#[test]
fn standing_bids_round_trip_and_single_use_encodings_are_unchanged() {
    let mut req = bid_request();
    req.standing = 64;
    exercise(req.clone());
    let mut b = bid();
    b.uses = 64;
    exercise(b.clone());
    // A single-use bid or request carries no count at all: its bytes are those of a peer
    // that has never heard of standing bids, and it decodes with a count of 1.
    let single = cbor::to_canonical(&bid()).unwrap();
    let standing = cbor::to_canonical(&b).unwrap();
    assert!(single.len() < standing.len());
    let back: Bid = cbor::from_canonical(&single, 4096, "bid").unwrap();
    assert_eq!(back.uses, 1);
    // No bid covers zero leases or more than the cap.
    for uses in [0, MAX_BID_USES + 1] {
        b.uses = uses;
        assert!(b.validate().is_err(), "uses {uses} was accepted");
        req.standing = uses;
        assert!(req.validate().is_err(), "standing {uses} was accepted");
    }
}

#[test]
fn lease_round_trips_and_resists_tampering() {
    exercise(lease());
}

#[test]
fn claim_round_trips_and_resists_tampering() {
    exercise(claim());
}

#[test]
fn verdict_round_trips_and_resists_tampering() {
    exercise(verdict());
}

#[test]
fn receipt_round_trips_and_resists_tampering() {
    exercise(receipt());
}

#[test]
fn tampered_body_fails_signature_with_typed_error() {
    let mut signed = Signed::sign(bid(), &key(1)).unwrap();
    signed.body.price.units += 1;
    assert_eq!(
        signed.verify().unwrap_err(),
        ProtocolError::BadSignature {
            domain: "d402/bid/1"
        }
    );
    let bytes = signed.to_bytes().unwrap();
    assert_eq!(
        Signed::<Bid>::from_bytes(&bytes).unwrap_err(),
        ProtocolError::BadSignature {
            domain: "d402/bid/1"
        }
    );
}

#[test]
fn bid_signature_presented_as_lease_signature_fails() {
    // Same signer, same bytes, other domain: the signature must not carry over.
    let k = key(1);
    let body_bytes = cbor::to_canonical(&bid()).unwrap();
    let sig = k.sign(&signing_input(Bid::DOMAIN, &body_bytes));
    assert!(
        k.verifying_key()
            .verify_strict(&signing_input(Lease::DOMAIN, &body_bytes), &sig)
            .is_err()
    );

    // And at the type level: a bid's signature attached to a lease body fails.
    let signed_bid = Signed::sign(bid(), &k).unwrap();
    let forged = Signed {
        body: lease(),
        signer: signed_bid.signer,
        signature: signed_bid.signature,
    };
    assert_eq!(
        forged.verify().unwrap_err(),
        ProtocolError::BadSignature {
            domain: "d402/lease/1"
        }
    );

    // A whole signed bid envelope does not decode as a lease.
    let bytes = signed_bid.to_bytes().unwrap();
    assert!(Signed::<Lease>::from_bytes(&bytes).is_err());
}

#[test]
fn domains_are_unique() {
    let domains = [
        Offer::DOMAIN,
        BidRequest::DOMAIN,
        Bid::DOMAIN,
        Lease::DOMAIN,
        Claim::DOMAIN,
        Verdict::DOMAIN,
        SettlementReceipt::DOMAIN,
    ];
    let mut sorted = domains.to_vec();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), domains.len());
}

#[test]
fn wrong_signer_is_refused() {
    let signed = Signed::sign(verdict(), &key(1)).unwrap();
    let other = d402_protocol::PublicKey(key(2).verifying_key().to_bytes());
    assert!(signed.verify_from(&other).is_err());
    assert!(signed.verify_from(&signed.signer).is_ok());
}

#[test]
fn unsupported_version_is_typed() {
    let mut v = verdict();
    v.v = 2;
    assert_eq!(
        Signed::sign(v, &key(1)).unwrap_err(),
        ProtocolError::UnsupportedVersion {
            kind: "verdict",
            found: 2,
            expected: 1
        }
    );
}

#[test]
fn claim_output_must_match_its_cid() {
    let mut c = claim();
    c.output.push(b'!');
    assert!(matches!(
        Signed::sign(c, &key(1)).unwrap_err(),
        ProtocolError::InvalidField {
            field: "output_cid",
            ..
        }
    ));
}

#[test]
fn oversized_claim_is_refused() {
    // Output over the cap: refused when signing and when decoding.
    let mut c = claim();
    c.output = vec![b'x'; MAX_OUTPUT + 1];
    c.output_cid = Cid::raw(&c.output);
    assert!(matches!(
        Signed::sign(c.clone(), &key(1)).unwrap_err(),
        ProtocolError::InvalidField {
            field: "output",
            ..
        }
    ));
    let forged = Signed {
        body: c.clone(),
        signer: d402_protocol::PublicKey([0; 32]),
        signature: d402_protocol::Signature([0; 64]),
    };
    let bytes = cbor::to_canonical(&forged).unwrap();
    assert!(matches!(
        Signed::<Claim>::from_bytes(&bytes).unwrap_err(),
        ProtocolError::InvalidField {
            field: "output",
            ..
        }
    ));
    // An envelope over the kind's cap is refused before any parsing.
    let mut huge = bytes;
    huge.resize(Signed::<Claim>::max_size() + 1, 0);
    assert!(matches!(
        Signed::<Claim>::from_bytes(&huge).unwrap_err(),
        ProtocolError::TooLarge { kind: "claim", .. }
    ));
}

#[test]
fn receipt_transfers_must_sum_to_charge() {
    let mut r = receipt();
    r.transfers[0].units += 1;
    assert!(matches!(
        Signed::sign(r, &key(1)).unwrap_err(),
        ProtocolError::InvalidField {
            field: "transfers",
            ..
        }
    ));
}

#[test]
fn offer_needs_a_wallet_for_each_rail() {
    let mut o = offer();
    o.rails.push(d402_protocol::RailKind::BaseTaskEscrow);
    assert!(matches!(
        Signed::sign(o, &key(1)).unwrap_err(),
        ProtocolError::InvalidField {
            field: "payout",
            ..
        }
    ));
}

#[test]
fn responses_round_trip() {
    let bid = Signed::sign(bid(), &key(2)).unwrap();
    for r in [
        BidResponse::Bid(Box::new(bid)),
        BidResponse::Declined(DeclineReason::NotOffered),
        BidResponse::Declined(DeclineReason::PriceBelowFloor { floor: 5 }),
        BidResponse::Declined(DeclineReason::ManifestRefused {
            reason: "egress not granted".into(),
        }),
    ] {
        let bytes = r.to_bytes().unwrap();
        assert_eq!(BidResponse::from_bytes(&bytes).unwrap(), r);
    }
    for a in [
        LeaseAck::Accepted,
        LeaseAck::Claimed(Box::new(Signed::sign(claim(), &key(3)).unwrap())),
        LeaseAck::Refused {
            reason: "expired".into(),
        },
    ] {
        assert_eq!(LeaseAck::from_bytes(&a.to_bytes().unwrap()).unwrap(), a);
    }
    for a in [
        ClaimAck::Received,
        ClaimAck::Refused {
            reason: "stale".into(),
        },
    ] {
        assert_eq!(ClaimAck::from_bytes(&a.to_bytes().unwrap()).unwrap(), a);
    }
}

#[test]
fn bid_response_with_forged_bid_is_refused() {
    let mut bid = Signed::sign(bid(), &key(2)).unwrap();
    bid.body.price.units = 1;
    let bytes = BidResponse::Bid(Box::new(bid)).to_bytes().unwrap();
    assert!(matches!(
        BidResponse::from_bytes(&bytes).unwrap_err(),
        ProtocolError::BadSignature { .. }
    ));
}

#[test]
fn lease_ack_with_forged_inline_claim_is_refused() {
    let mut claim = Signed::sign(claim(), &key(3)).unwrap();
    claim.body.fuel_used += 1;
    let bytes = LeaseAck::Claimed(Box::new(claim)).to_bytes().unwrap();
    assert!(matches!(
        LeaseAck::from_bytes(&bytes).unwrap_err(),
        ProtocolError::BadSignature { .. }
    ));
}

#[test]
fn lease_ack_with_inline_claim_resists_tampering() {
    let claim = Signed::sign(claim(), &key(3)).unwrap();
    let bytes = LeaseAck::Claimed(Box::new(claim.clone()))
        .to_bytes()
        .unwrap();
    // `{"claimed": envelope}`: the decoder verifies the claim over the envelope's own bytes.
    assert_eq!(&bytes[..9], b"\xa1\x67claimed");
    assert_eq!(bytes[9..], claim.to_bytes().unwrap()[..]);
    for i in 0..bytes.len() {
        for bit in [0x01u8, 0x80] {
            let mut t = bytes.clone();
            t[i] ^= bit;
            assert!(
                LeaseAck::from_bytes(&t).is_err(),
                "flipping bit {bit:#x} of byte {i} was accepted"
            );
        }
    }
}

#[test]
fn json_form_is_readable_and_round_trips() {
    let signed = Signed::sign(claim(), &key(1)).unwrap();
    let json = serde_json::to_string(&signed).unwrap();
    assert!(json.contains("\"lease_cid\":\"bafy"));
    let back: Signed<Claim> = serde_json::from_str(&json).unwrap();
    back.verify().unwrap();
    assert_eq!(back, signed);
}
