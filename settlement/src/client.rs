//! The paying side of x402: read a 402 challenge and build the payment headers.
//!
//! ```
//! use d402_settlement::{client, x402};
//! # fn demo(resp_header: &str, payer: &d402_protocol::SigningKey, now: u64) -> Result<(), client::ClientError> {
//! let challenge = client::read_challenge(Some(resp_header), None)?;
//! let payment = client::pay_local(&challenge, payer, now, Some(50_000))?;
//! let (name, value) = payment.header_v2()?; // ("PAYMENT-SIGNATURE", base64 JSON)
//! # let _ = (name, value); Ok(()) }
//! ```

use thiserror::Error;

use d402_protocol::{PublicKey, Signed, SigningKey, UnixMillis};

use crate::{
    local::{LOCAL_NETWORK, LocalAuthorization, NONCE_LEN, authorization},
    x402::{
        PAYMENT_REQUIRED, PAYMENT_SIGNATURE, PaymentPayload, PaymentPayloadV1, PaymentRequired,
        PaymentRequiredV1, PaymentRequirements, SCHEME_EXACT, X_PAYMENT, X402_V1, X402_V2,
        X402Error, network_v1_name,
    },
};

/// How far back the client starts a payment's validity window, so that a gateway whose
/// clock is a little behind still accepts it.
pub const VALID_AFTER_SLACK_MS: u64 = 30_000;

/// Why the client cannot pay.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The 402 could not be decoded.
    #[error(transparent)]
    X402(#[from] X402Error),
    /// The 402 carried neither a `PAYMENT-REQUIRED` header nor a v1 body.
    #[error("the 402 response carries no {PAYMENT_REQUIRED} header and no x402 body")]
    NoChallenge,
    /// Nothing in `accepts` can be paid with this client.
    #[error("the gateway accepts no payment this client can make (wanted {scheme} on {network})")]
    NoUsableRequirement {
        /// Scheme wanted.
        scheme: &'static str,
        /// Network wanted.
        network: &'static str,
    },
    /// The price is above what the client agreed to pay.
    #[error("the gateway asks {amount} units, above the client's limit of {max}")]
    AboveLimit {
        /// Asked.
        amount: u64,
        /// The limit.
        max: u64,
    },
    /// The requirement itself is unusable (bad `payTo`, zero amount or timeout).
    #[error("unusable payment requirement: {0}")]
    BadRequirement(String),
    /// No randomness for the nonce.
    #[error("no randomness from the OS: {0}")]
    Random(String),
    /// Signing failed.
    #[error(transparent)]
    Protocol(#[from] d402_protocol::ProtocolError),
}

/// Reads a 402 response: the v2 `PAYMENT-REQUIRED` header when present, else the v1 JSON
/// body, converted to the v2 form.
pub fn read_challenge(
    payment_required: Option<&str>,
    body: Option<&[u8]>,
) -> Result<PaymentRequired, ClientError> {
    if let Some(header) = payment_required {
        return Ok(PaymentRequired::from_header(header)?);
    }
    let body = body.ok_or(ClientError::NoChallenge)?;
    PaymentRequiredV1::from_json(body)?
        .to_v2()
        .ok_or(ClientError::NoChallenge)
}

/// A signed local-rail payment, ready to send in either version.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalPayment {
    /// The signed authorization.
    pub authorization: Signed<LocalAuthorization>,
    /// The v2 payment (`PAYMENT-SIGNATURE`).
    pub v2: PaymentPayload,
    /// The v1 payment (`X-PAYMENT`).
    pub v1: PaymentPayloadV1,
}

impl LocalPayment {
    /// `("PAYMENT-SIGNATURE", value)`.
    pub fn header_v2(&self) -> Result<(&'static str, String), ClientError> {
        Ok((PAYMENT_SIGNATURE, self.v2.to_header()?))
    }

    /// `("X-PAYMENT", value)`.
    pub fn header_v1(&self) -> Result<(&'static str, String), ClientError> {
        Ok((X_PAYMENT, self.v1.to_header()?))
    }

    /// The payment's nonce.
    pub fn nonce(&self) -> &[u8] {
        &self.authorization.body.nonce
    }
}

/// The local-rail requirement of a challenge.
pub fn local_requirement(challenge: &PaymentRequired) -> Result<&PaymentRequirements, ClientError> {
    challenge
        .find(SCHEME_EXACT, LOCAL_NETWORK)
        .ok_or(ClientError::NoUsableRequirement {
            scheme: SCHEME_EXACT,
            network: LOCAL_NETWORK,
        })
}

/// Pays the challenge's local-rail requirement with `payer`, with a fresh random nonce.
/// Refuses a price above `max_units` when given.
pub fn pay_local(
    challenge: &PaymentRequired,
    payer: &SigningKey,
    now: UnixMillis,
    max_units: Option<u64>,
) -> Result<LocalPayment, ClientError> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|e| ClientError::Random(e.to_string()))?;
    pay_local_with_nonce(challenge, payer, now, max_units, nonce)
}

/// [`pay_local`] with a given nonce (tests; a nonce must never be reused).
pub fn pay_local_with_nonce(
    challenge: &PaymentRequired,
    payer: &SigningKey,
    now: UnixMillis,
    max_units: Option<u64>,
    nonce: [u8; NONCE_LEN],
) -> Result<LocalPayment, ClientError> {
    let req = local_requirement(challenge)?;
    let amount = req.amount.0;
    if let Some(max) = max_units
        && amount > max
    {
        return Err(ClientError::AboveLimit { amount, max });
    }
    if amount == 0 || req.max_timeout_seconds == 0 {
        return Err(ClientError::BadRequirement(
            "amount and maxTimeoutSeconds must be above 0".into(),
        ));
    }
    let pay_to: PublicKey = req
        .pay_to
        .parse()
        .map_err(|_| ClientError::BadRequirement(format!("payTo {:?} is not a key", req.pay_to)))?;
    let body = LocalAuthorization {
        v: 1,
        payer: payer.verifying_key().into(),
        pay_to,
        asset: req.asset.clone(),
        amount,
        resource: challenge.resource.url.clone(),
        nonce: nonce.to_vec(),
        valid_after: now.saturating_sub(VALID_AFTER_SLACK_MS),
        valid_before: now.saturating_add(req.max_timeout_seconds.saturating_mul(1000)),
    };
    let authorization = Signed::sign(body, payer)?;
    let payload = authorization::to_payload(&authorization);
    Ok(LocalPayment {
        v2: PaymentPayload {
            x402_version: X402_V2,
            resource: Some(challenge.resource.clone()),
            accepted: req.clone(),
            payload: payload.clone(),
            extensions: None,
        },
        v1: PaymentPayloadV1 {
            x402_version: X402_V1,
            scheme: req.scheme.clone(),
            network: network_v1_name(&req.network).to_string(),
            payload,
        },
        authorization,
    })
}
