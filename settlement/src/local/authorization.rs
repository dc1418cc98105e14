//! The payer's signed authorization on the `local` rail and its x402 payload form.
//!
//! The payer signs a [`LocalAuthorization`] (domain [`LOCAL_PAYMENT_DOMAIN`]) over the x402
//! terms: its own key, `payTo`, asset, amount, resource URL, a random 32-byte nonce and a
//! validity window in unix milliseconds. In the x402 `payload` it travels as JSON:
//!
//! ```json
//! {
//!   "signature": "<128 hex digits>",
//!   "authorization": {
//!     "from": "<payer, base58>", "to": "<payTo, base58>", "asset": "local:USDC",
//!     "value": "10000", "resource": "http://…/v1/tasks",
//!     "validAfter": "<unix ms>", "validBefore": "<unix ms>", "nonce": "<64 hex digits>"
//!   }
//! }
//! ```
//!
//! The signature covers the canonical CBOR of the body rebuilt from these fields, so any
//! edit to a field breaks it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use d402_protocol::{
    ProtocolError, PublicKey, Signable, Signature, Signed, UnixMillis,
    messages::MAX_URL,
    types::{MAX_ASSET, check_len, check_version},
};

use crate::{rail::RailError, x402::Units};

/// Signature domain of local-rail payment authorizations.
pub const LOCAL_PAYMENT_DOMAIN: &str = "d402/payment/local/1";

/// Length of a payment nonce in bytes.
pub const NONCE_LEN: usize = 32;

/// What a payer signs to pay on the `local` rail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalAuthorization {
    /// Body version (1).
    pub v: u16,
    /// The payer; must be the signer.
    pub payer: PublicKey,
    /// The recipient (`payTo`): the gateway's account.
    pub pay_to: PublicKey,
    /// The asset id (`local:USDC`).
    pub asset: String,
    /// Smallest units paid.
    pub amount: u64,
    /// The resource URL paid for.
    pub resource: String,
    /// Random bytes; a nonce is accepted once, ever.
    #[serde(with = "serde_bytes")]
    pub nonce: Vec<u8>,
    /// Valid from this time (unix ms, inclusive).
    pub valid_after: UnixMillis,
    /// Valid until this time (unix ms, exclusive).
    pub valid_before: UnixMillis,
}

impl Signable for LocalAuthorization {
    const DOMAIN: &'static str = LOCAL_PAYMENT_DOMAIN;
    const KIND: &'static str = "local payment authorization";
    const MAX_BODY: usize = 4 * 1024;

    fn validate(&self) -> d402_protocol::Result<()> {
        check_version(Self::KIND, self.v)?;
        if self.asset.is_empty() {
            return Err(ProtocolError::field("asset", "is empty"));
        }
        check_len("asset", &self.asset, MAX_ASSET)?;
        check_len("resource", &self.resource, MAX_URL)?;
        if self.amount == 0 {
            return Err(ProtocolError::field("amount", "must be above 0"));
        }
        if self.nonce.len() != NONCE_LEN {
            return Err(ProtocolError::field(
                "nonce",
                format!("must be {NONCE_LEN} bytes"),
            ));
        }
        if self.valid_before <= self.valid_after {
            return Err(ProtocolError::field(
                "valid_before",
                "must be after valid_after",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AuthorizationJson {
    from: String,
    to: String,
    asset: String,
    value: Units,
    resource: String,
    valid_after: Units,
    valid_before: Units,
    nonce: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PayloadJson {
    signature: String,
    authorization: AuthorizationJson,
}

/// The x402 `payload` object for a signed authorization.
pub fn to_payload(signed: &Signed<LocalAuthorization>) -> Map<String, Value> {
    let a = &signed.body;
    let json = PayloadJson {
        signature: hex::encode(signed.signature.0),
        authorization: AuthorizationJson {
            from: a.payer.to_string(),
            to: a.pay_to.to_string(),
            asset: a.asset.clone(),
            value: Units(a.amount),
            resource: a.resource.clone(),
            valid_after: Units(a.valid_after),
            valid_before: Units(a.valid_before),
            nonce: hex::encode(&a.nonce),
        },
    };
    match serde_json::to_value(json) {
        Ok(Value::Object(map)) => map,
        // Plain strings always serialize to an object.
        _ => Map::new(),
    }
}

/// Rebuilds the signed authorization from an x402 `payload` object. Checks the form of
/// every field and the body's rules, but not the signature (see
/// [`Signed::verify_from`]).
pub fn from_payload(payload: &Map<String, Value>) -> Result<Signed<LocalAuthorization>, RailError> {
    let bad = |what: String| RailError::BadPayload(what);
    let json: PayloadJson = serde_json::from_value(Value::Object(payload.clone()))
        .map_err(|e| bad(format!("local payment payload: {e}")))?;
    let a = json.authorization;
    let key = |field: &str, text: &str| -> Result<PublicKey, RailError> {
        text.parse::<PublicKey>().map_err(|_| {
            bad(format!(
                "authorization.{field} {text:?} is not a base58 ed25519 key"
            ))
        })
    };
    let mut signature = [0u8; 64];
    hex::decode_to_slice(&json.signature, &mut signature)
        .map_err(|_| bad("signature must be 128 hex digits".into()))?;
    let nonce = hex::decode(&a.nonce)
        .ok()
        .filter(|n| n.len() == NONCE_LEN)
        .ok_or_else(|| {
            bad(format!(
                "authorization.nonce must be {} hex digits",
                NONCE_LEN * 2
            ))
        })?;
    let body = LocalAuthorization {
        v: 1,
        payer: key("from", &a.from)?,
        pay_to: key("to", &a.to)?,
        asset: a.asset,
        amount: a.value.0,
        resource: a.resource,
        nonce,
        valid_after: a.valid_after.0,
        valid_before: a.valid_before.0,
    };
    body.validate()
        .map_err(|e| bad(format!("authorization: {e}")))?;
    Ok(Signed {
        signer: body.payer,
        body,
        signature: Signature(signature),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use d402_protocol::SigningKey;

    fn signed() -> Signed<LocalAuthorization> {
        let payer = SigningKey::from_bytes(&[1; 32]);
        let body = LocalAuthorization {
            v: 1,
            payer: payer.verifying_key().into(),
            pay_to: SigningKey::from_bytes(&[2; 32]).verifying_key().into(),
            asset: "local:USDC".into(),
            amount: 10_000,
            resource: "http://gw/v1/tasks".into(),
            nonce: vec![7; 32],
            valid_after: 1_000,
            valid_before: 61_000,
        };
        Signed::sign(body, &payer).unwrap()
    }

    #[test]
    fn payload_round_trips_and_verifies() {
        let s = signed();
        let payload = to_payload(&s);
        assert_eq!(payload["authorization"]["value"], "10000");
        assert_eq!(payload["authorization"]["validBefore"], "61000");
        let back = from_payload(&payload).unwrap();
        assert_eq!(back, s);
        back.verify_from(&s.body.payer).unwrap();
    }

    #[test]
    fn any_edit_breaks_the_signature() {
        let payload = to_payload(&signed());
        let other_key = SigningKey::from_bytes(&[3; 32]).verifying_key();
        let edits: [(&str, Value); 7] = [
            ("to", Value::String(PublicKey::from(other_key).to_string())),
            ("asset", "local:EURC".into()),
            ("value", "10001".into()),
            ("resource", "http://gw/v1/other".into()),
            ("validAfter", "999".into()),
            ("validBefore", "61001".into()),
            ("nonce", hex::encode([8u8; 32]).into()),
        ];
        for (field, value) in edits {
            let mut p = payload.clone();
            p["authorization"]
                .as_object_mut()
                .unwrap()
                .insert(field.into(), value);
            let s = from_payload(&p).unwrap();
            assert!(
                s.verify_from(&s.body.payer).is_err(),
                "edit of {field} verified"
            );
        }
    }

    #[test]
    fn malformed_payloads_are_refused() {
        let payload = to_payload(&signed());
        let mut cases = Vec::new();
        let mut p = payload.clone();
        p.remove("signature");
        cases.push(p);
        let mut p = payload.clone();
        p.insert("signature".into(), "zz".into());
        cases.push(p);
        let mut p = payload.clone();
        p.insert("extra".into(), 1.into());
        cases.push(p);
        for (field, value) in [
            ("from", Value::from("not-a-key")),
            ("nonce", Value::from("abcd")),
            ("value", Value::from(10_000)),
            ("value", Value::from("0")),
            ("validBefore", Value::from("1000")),
            ("validAfter", Value::from("1e3")),
        ] {
            let mut p = payload.clone();
            p["authorization"]
                .as_object_mut()
                .unwrap()
                .insert(field.into(), value);
            cases.push(p);
        }
        for p in cases {
            assert!(
                matches!(from_payload(&p), Err(RailError::BadPayload(_))),
                "{p:?} accepted"
            );
        }
    }
}
