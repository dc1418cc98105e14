//! The x402 wire format (coinbase/x402 `specs/x402-specification-v2.md`,
//! `specs/transports-v2/http.md` and the v1 HTTP transport).
//!
//! | direction | v2 | v1 |
//! |---|---|---|
//! | server → client, 402 | `PAYMENT-REQUIRED` header: base64 JSON [`PaymentRequired`] | JSON body [`PaymentRequiredV1`] |
//! | client → server | `PAYMENT-SIGNATURE` header: base64 JSON [`PaymentPayload`] | `X-PAYMENT` header: base64 JSON [`PaymentPayloadV1`] |
//! | server → client, result | `PAYMENT-RESPONSE`: base64 JSON [`SettlementResponse`] | `X-PAYMENT-RESPONSE`: the same |
//!
//! Amounts are decimal strings of integer smallest units ([`Units`]); a number, a sign, a
//! fraction, an exponent or a leading zero is refused. Networks are CAIP-2 ids in v2
//! (`eip155:8453`, `d402:local`) and short names in v1 (`base`, `d402-local`); see
//! [`network_v1_name`] and [`network_v2_id`].
//!
//! Decoders check the encoded size against a cap before decoding anything
//! ([`MAX_HEADER`], [`MAX_RESPONSE_HEADER`], [`MAX_V1_BODY`]), then base64 (standard
//! alphabet, padding optional), then JSON, then `x402Version`, then the fields; every failure
//! is a typed [`X402Error`]. Unknown JSON fields are ignored, as x402 clients add their own.
//!
//! The d402 extension: [`SettlementResponse::receipt`] carries the gateway's signed
//! [`SettlementReceipt`] (its JSON form; [`SettlementResponse::verified_receipt`] checks it).

use std::fmt;

use base64::{
    Engine,
    alphabet::STANDARD,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de::DeserializeOwned};
use serde_json::{Map, Value};
use thiserror::Error;

use d402_protocol::{PublicKey, Signed, messages::SettlementReceipt};

/// x402 version of the header form.
pub const X402_V2: u8 = 2;
/// x402 version of the body form.
pub const X402_V1: u8 = 1;

/// v2 402 challenge header.
pub const PAYMENT_REQUIRED: &str = "PAYMENT-REQUIRED";
/// v2 payment header.
pub const PAYMENT_SIGNATURE: &str = "PAYMENT-SIGNATURE";
/// v1 payment header.
pub const X_PAYMENT: &str = "X-PAYMENT";
/// v2 settlement response header.
pub const PAYMENT_RESPONSE: &str = "PAYMENT-RESPONSE";
/// v1 settlement response header.
pub const X_PAYMENT_RESPONSE: &str = "X-PAYMENT-RESPONSE";

/// Largest `PAYMENT-REQUIRED`, `PAYMENT-SIGNATURE` or `X-PAYMENT` value decoded (encoded
/// length).
pub const MAX_HEADER: usize = 16 * 1024;
/// Largest `PAYMENT-RESPONSE` / `X-PAYMENT-RESPONSE` value decoded: it carries the signed
/// receipt (up to 64 transfers).
pub const MAX_RESPONSE_HEADER: usize = 64 * 1024;
/// Largest v1 JSON 402 body decoded.
pub const MAX_V1_BODY: usize = 64 * 1024;
/// Most entries in `accepts`.
pub const MAX_ACCEPTS: usize = 16;

/// The x402 scheme d402's rails use.
pub const SCHEME_EXACT: &str = "exact";

/// Known networks: CAIP-2 id (v2) and v1 name.
pub const NETWORKS: &[(&str, &str)] = &[
    ("d402:local", "d402-local"),
    ("eip155:8453", "base"),
    ("eip155:84532", "base-sepolia"),
    ("solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp", "solana"),
    ("solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1", "solana-devnet"),
];

/// The v1 name of a v2 network id (unknown ids pass through unchanged).
pub fn network_v1_name(v2: &str) -> &str {
    NETWORKS
        .iter()
        .find(|(id, _)| *id == v2)
        .map_or(v2, |(_, name)| name)
}

/// The v2 id of a v1 network name (unknown names, and v2 ids, pass through unchanged).
pub fn network_v2_id(v1: &str) -> &str {
    NETWORKS
        .iter()
        .find(|(_, name)| *name == v1)
        .map_or(v1, |(id, _)| id)
}

/// What went wrong decoding or encoding x402 data.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum X402Error {
    /// The encoded value is larger than the cap; nothing was decoded.
    #[error("{what}: {len} bytes exceeds the cap of {max} bytes")]
    TooLarge {
        /// Header or body name.
        what: &'static str,
        /// Encoded length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// Empty header value.
    #[error("{0} is empty")]
    Empty(&'static str),
    /// Not base64.
    #[error("{what} is not valid base64: {detail}")]
    Base64 {
        /// Header name.
        what: &'static str,
        /// Decoder message.
        detail: String,
    },
    /// Not JSON of the expected shape.
    #[error("{what} is not valid x402 JSON: {detail}")]
    Json {
        /// Header or body name.
        what: &'static str,
        /// Parser message.
        detail: String,
    },
    /// `x402Version` is missing or not the one this header carries.
    #[error("{what} has x402Version {found}, expected {expected}")]
    WrongVersion {
        /// Header or body name.
        what: &'static str,
        /// The version found (`missing` when absent).
        found: String,
        /// The version this header or body carries.
        expected: u8,
    },
    /// A field breaks a rule.
    #[error("{what}: invalid {field}: {reason}")]
    InvalidField {
        /// Header or body name.
        what: &'static str,
        /// The field.
        field: &'static str,
        /// The rule.
        reason: String,
    },
    /// Both `PAYMENT-SIGNATURE` and `X-PAYMENT` were sent.
    #[error("send either PAYMENT-SIGNATURE (x402 v2) or X-PAYMENT (v1), not both")]
    BothPaymentHeaders,
    /// Encoding failed.
    #[error("cannot encode {what}: {detail}")]
    Encode {
        /// What was encoded.
        what: &'static str,
        /// Encoder message.
        detail: String,
    },
}

impl X402Error {
    /// The x402 `errorReason` / `invalidReason` code for this error.
    pub fn code(&self) -> &'static str {
        match self {
            X402Error::WrongVersion { .. } => "invalid_x402_version",
            X402Error::Encode { .. } => "unexpected_verify_error",
            _ => "invalid_payload",
        }
    }

    fn field(what: &'static str, field: &'static str, reason: impl Into<String>) -> Self {
        X402Error::InvalidField {
            what,
            field,
            reason: reason.into(),
        }
    }
}

/// A count of an asset's smallest unit, written in JSON as a decimal string (`"10000"`).
///
/// Decoding accepts only `0` or a non-zero digit followed by digits, fitting a `u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Units(pub u64);

impl Units {
    /// Parses the strict decimal form.
    pub fn parse(text: &str) -> Option<Units> {
        let ok = !text.is_empty()
            && text.len() <= 20
            && text.bytes().all(|b| b.is_ascii_digit())
            && (text == "0" || !text.starts_with('0'));
        if !ok {
            return None;
        }
        text.parse().ok().map(Units)
    }
}

impl fmt::Display for Units {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Serialize for Units {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Units {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Units::parse(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "amount {text:?} must be a decimal string of integer smallest units"
            ))
        })
    }
}

/// The protected resource (`resource` in v2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceInfo {
    /// URL of the resource.
    pub url: String,
    /// What it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// MIME type of the response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
}

/// One way to pay (an entry of `accepts`, and `accepted` in a v2 payment).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequirements {
    /// Payment scheme, e.g. `exact`.
    pub scheme: String,
    /// CAIP-2 network id, e.g. `d402:local`.
    pub network: String,
    /// Exact amount in smallest units.
    pub amount: Units,
    /// Asset id on the network.
    pub asset: String,
    /// Recipient address.
    pub pay_to: String,
    /// Longest a payment authorization may stay valid.
    pub max_timeout_seconds: u64,
    /// Scheme-specific details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<Map<String, Value>>,
}

impl PaymentRequirements {
    fn validate(&self, what: &'static str) -> Result<(), X402Error> {
        for (field, value) in [
            ("scheme", &self.scheme),
            ("network", &self.network),
            ("asset", &self.asset),
            ("payTo", &self.pay_to),
        ] {
            if value.is_empty() {
                return Err(X402Error::field(what, field, "is empty"));
            }
        }
        Ok(())
    }

    /// Whether `other` names the same payment: scheme, network, amount, asset and payTo.
    /// (`maxTimeoutSeconds` and `extra` are advisory and not compared.)
    pub fn same_terms(&self, other: &PaymentRequirements) -> bool {
        self.scheme == other.scheme
            && self.network == other.network
            && self.amount == other.amount
            && self.asset == other.asset
            && self.pay_to == other.pay_to
    }

    /// The v1 form of this requirement for `resource`.
    pub fn to_v1(&self, resource: &ResourceInfo) -> PaymentRequirementsV1 {
        PaymentRequirementsV1 {
            scheme: self.scheme.clone(),
            network: network_v1_name(&self.network).to_string(),
            max_amount_required: self.amount,
            resource: resource.url.clone(),
            description: resource.description.clone().unwrap_or_default(),
            mime_type: resource.mime_type.clone().unwrap_or_default(),
            pay_to: self.pay_to.clone(),
            max_timeout_seconds: self.max_timeout_seconds,
            asset: self.asset.clone(),
            extra: self.extra.clone(),
            output_schema: None,
        }
    }
}

/// The v2 402 challenge, carried base64-encoded in `PAYMENT-REQUIRED`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequired {
    /// Always 2.
    pub x402_version: u8,
    /// Why payment is required (or why the last payment failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What is being sold.
    pub resource: ResourceInfo,
    /// The ways to pay, at least one.
    pub accepts: Vec<PaymentRequirements>,
    /// Protocol extensions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Map<String, Value>>,
}

impl PaymentRequired {
    /// A v2 challenge for `resource` listing `accepts`.
    pub fn new(resource: ResourceInfo, accepts: Vec<PaymentRequirements>) -> Self {
        PaymentRequired {
            x402_version: X402_V2,
            error: Some(format!("{PAYMENT_SIGNATURE} header is required")),
            resource,
            accepts,
            extensions: None,
        }
    }

    /// The `PAYMENT-REQUIRED` header value.
    pub fn to_header(&self) -> Result<String, X402Error> {
        self.validate(PAYMENT_REQUIRED)?;
        encode_base64_json(PAYMENT_REQUIRED, self)
    }

    /// Decodes a `PAYMENT-REQUIRED` header value.
    pub fn from_header(value: &str) -> Result<Self, X402Error> {
        let v: Self = decode_header(PAYMENT_REQUIRED, value, MAX_HEADER, Some(X402_V2))?;
        v.validate(PAYMENT_REQUIRED)?;
        Ok(v)
    }

    fn validate(&self, what: &'static str) -> Result<(), X402Error> {
        check_version(what, self.x402_version, X402_V2)?;
        if self.resource.url.is_empty() {
            return Err(X402Error::field(what, "resource.url", "is empty"));
        }
        if self.accepts.is_empty() || self.accepts.len() > MAX_ACCEPTS {
            return Err(X402Error::field(
                what,
                "accepts",
                format!("must list 1 to {MAX_ACCEPTS} entries"),
            ));
        }
        self.accepts.iter().try_for_each(|a| a.validate(what))
    }

    /// The v1 JSON body equivalent.
    pub fn to_v1(&self) -> PaymentRequiredV1 {
        PaymentRequiredV1 {
            x402_version: X402_V1,
            error: self
                .error
                .clone()
                .map(|e| e.replace(PAYMENT_SIGNATURE, X_PAYMENT))
                .unwrap_or_else(|| format!("{X_PAYMENT} header is required")),
            accepts: self
                .accepts
                .iter()
                .map(|a| a.to_v1(&self.resource))
                .collect(),
        }
    }

    /// The first requirement with this scheme and (v2) network.
    pub fn find(&self, scheme: &str, network: &str) -> Option<&PaymentRequirements> {
        self.accepts
            .iter()
            .find(|a| a.scheme == scheme && a.network == network)
    }
}

/// One way to pay in the v1 body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequirementsV1 {
    /// Payment scheme.
    pub scheme: String,
    /// v1 network name.
    pub network: String,
    /// Amount in smallest units (for `exact`, the amount).
    pub max_amount_required: Units,
    /// URL of the resource.
    pub resource: String,
    /// What it is.
    #[serde(default)]
    pub description: String,
    /// MIME type of the response.
    #[serde(default)]
    pub mime_type: String,
    /// Recipient address.
    pub pay_to: String,
    /// Longest a payment may stay valid.
    pub max_timeout_seconds: u64,
    /// Asset id.
    pub asset: String,
    /// Scheme-specific details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<Map<String, Value>>,
    /// Schema of the resource's input and output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_schema: Option<Value>,
}

impl PaymentRequirementsV1 {
    /// The v2 requirement and resource this entry describes.
    pub fn to_v2(&self) -> (PaymentRequirements, ResourceInfo) {
        let non_empty = |s: &String| (!s.is_empty()).then(|| s.clone());
        (
            PaymentRequirements {
                scheme: self.scheme.clone(),
                network: network_v2_id(&self.network).to_string(),
                amount: self.max_amount_required,
                asset: self.asset.clone(),
                pay_to: self.pay_to.clone(),
                max_timeout_seconds: self.max_timeout_seconds,
                extra: self.extra.clone(),
            },
            ResourceInfo {
                url: self.resource.clone(),
                description: non_empty(&self.description),
                mime_type: non_empty(&self.mime_type),
            },
        )
    }
}

/// The v1 JSON 402 body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequiredV1 {
    /// Always 1.
    pub x402_version: u8,
    /// Why payment is required.
    pub error: String,
    /// The ways to pay.
    pub accepts: Vec<PaymentRequirementsV1>,
}

impl PaymentRequiredV1 {
    /// The JSON body bytes.
    pub fn to_json(&self) -> Result<Vec<u8>, X402Error> {
        serde_json::to_vec(self).map_err(|e| X402Error::Encode {
            what: "x402 v1 body",
            detail: e.to_string(),
        })
    }

    /// Decodes a v1 402 body.
    pub fn from_json(bytes: &[u8]) -> Result<Self, X402Error> {
        const WHAT: &str = "x402 v1 body";
        check_len(WHAT, bytes.len(), MAX_V1_BODY)?;
        let v: Self = decode_json(WHAT, bytes, Some(X402_V1))?;
        if v.accepts.is_empty() || v.accepts.len() > MAX_ACCEPTS {
            return Err(X402Error::field(
                WHAT,
                "accepts",
                format!("must list 1 to {MAX_ACCEPTS} entries"),
            ));
        }
        for a in &v.accepts {
            a.to_v2().0.validate(WHAT)?;
        }
        Ok(v)
    }

    /// The v2 challenge equivalent (resource from the first entry).
    pub fn to_v2(&self) -> Option<PaymentRequired> {
        let resource = self.accepts.first()?.to_v2().1;
        Some(PaymentRequired {
            x402_version: X402_V2,
            error: Some(self.error.clone()),
            resource,
            accepts: self.accepts.iter().map(|a| a.to_v2().0).collect(),
            extensions: None,
        })
    }
}

/// A v2 payment, carried base64-encoded in `PAYMENT-SIGNATURE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentPayload {
    /// Always 2.
    pub x402_version: u8,
    /// The resource paid for, as the client saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<ResourceInfo>,
    /// The requirement chosen from `accepts`.
    pub accepted: PaymentRequirements,
    /// Scheme- and network-specific payment data.
    pub payload: Map<String, Value>,
    /// Protocol extensions echoed by the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Map<String, Value>>,
}

impl PaymentPayload {
    /// The `PAYMENT-SIGNATURE` header value.
    pub fn to_header(&self) -> Result<String, X402Error> {
        check_version(PAYMENT_SIGNATURE, self.x402_version, X402_V2)?;
        encode_base64_json(PAYMENT_SIGNATURE, self)
    }

    /// Decodes a `PAYMENT-SIGNATURE` header value.
    pub fn from_header(value: &str) -> Result<Self, X402Error> {
        let v: Self = decode_header(PAYMENT_SIGNATURE, value, MAX_HEADER, Some(X402_V2))?;
        v.accepted.validate(PAYMENT_SIGNATURE)?;
        Ok(v)
    }
}

/// A v1 payment, carried base64-encoded in `X-PAYMENT`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentPayloadV1 {
    /// Always 1.
    pub x402_version: u8,
    /// Payment scheme.
    pub scheme: String,
    /// v1 network name.
    pub network: String,
    /// Scheme- and network-specific payment data.
    pub payload: Map<String, Value>,
}

impl PaymentPayloadV1 {
    /// The `X-PAYMENT` header value.
    pub fn to_header(&self) -> Result<String, X402Error> {
        check_version(X_PAYMENT, self.x402_version, X402_V1)?;
        encode_base64_json(X_PAYMENT, self)
    }

    /// Decodes an `X-PAYMENT` header value.
    pub fn from_header(value: &str) -> Result<Self, X402Error> {
        let v: Self = decode_header(X_PAYMENT, value, MAX_HEADER, Some(X402_V1))?;
        if v.scheme.is_empty() || v.network.is_empty() {
            return Err(X402Error::field(
                X_PAYMENT,
                "scheme/network",
                "must not be empty",
            ));
        }
        Ok(v)
    }
}

/// A client's payment in either version, as the gateway received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payment {
    /// From `PAYMENT-SIGNATURE`.
    V2(PaymentPayload),
    /// From `X-PAYMENT`.
    V1(PaymentPayloadV1),
}

impl Payment {
    /// Decodes whichever payment header is present: `Ok(None)` when neither is, an error
    /// when both are.
    pub fn from_headers(
        payment_signature: Option<&str>,
        x_payment: Option<&str>,
    ) -> Result<Option<Payment>, X402Error> {
        match (payment_signature, x_payment) {
            (Some(_), Some(_)) => Err(X402Error::BothPaymentHeaders),
            (Some(v2), None) => PaymentPayload::from_header(v2).map(|p| Some(Payment::V2(p))),
            (None, Some(v1)) => PaymentPayloadV1::from_header(v1).map(|p| Some(Payment::V1(p))),
            (None, None) => Ok(None),
        }
    }

    /// The x402 version.
    pub fn version(&self) -> u8 {
        match self {
            Payment::V2(_) => X402_V2,
            Payment::V1(_) => X402_V1,
        }
    }

    /// The scheme.
    pub fn scheme(&self) -> &str {
        match self {
            Payment::V2(p) => &p.accepted.scheme,
            Payment::V1(p) => &p.scheme,
        }
    }

    /// The network as a v2 (CAIP-2) id.
    pub fn network(&self) -> &str {
        match self {
            Payment::V2(p) => &p.accepted.network,
            Payment::V1(p) => network_v2_id(&p.network),
        }
    }

    /// The scheme-specific payload.
    pub fn payload(&self) -> &Map<String, Value> {
        match self {
            Payment::V2(p) => &p.payload,
            Payment::V1(p) => &p.payload,
        }
    }

    /// The requirement the client says it accepted (v2 only).
    pub fn accepted(&self) -> Option<&PaymentRequirements> {
        match self {
            Payment::V2(p) => Some(&p.accepted),
            Payment::V1(_) => None,
        }
    }

    /// The name of the response header to answer with.
    pub fn response_header_name(&self) -> &'static str {
        match self {
            Payment::V2(_) => PAYMENT_RESPONSE,
            Payment::V1(_) => X_PAYMENT_RESPONSE,
        }
    }
}

/// The settlement result, carried base64-encoded in `PAYMENT-RESPONSE` (v2) or
/// `X-PAYMENT-RESPONSE` (v1), plus d402's signed receipt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SettlementResponse {
    /// Whether the payment was settled (false for a refund or a failure).
    pub success: bool,
    /// Why not, as an x402 error code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_reason: Option<String>,
    /// The payer's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer: Option<String>,
    /// Transaction or ledger entry id; empty when nothing was settled.
    #[serde(default)]
    pub transaction: String,
    /// CAIP-2 network id.
    pub network: String,
    /// d402: the gateway's signed account of every transfer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<Signed<SettlementReceipt>>,
}

impl SettlementResponse {
    /// A successful settlement described by `receipt`.
    pub fn settled(network: &str, receipt: Signed<SettlementReceipt>) -> Self {
        SettlementResponse {
            success: true,
            error_reason: None,
            payer: Some(receipt.body.payer.clone()),
            transaction: receipt.body.tx_refs.first().cloned().unwrap_or_default(),
            network: network.to_string(),
            receipt: Some(receipt),
        }
    }

    /// A payment that was refunded or voided (`reason` is an x402-style code such as
    /// `task_not_served`), with the refund receipt when there is one.
    pub fn refunded(
        network: &str,
        reason: &str,
        receipt: Option<Signed<SettlementReceipt>>,
    ) -> Self {
        SettlementResponse {
            success: false,
            error_reason: Some(reason.to_string()),
            payer: receipt.as_ref().map(|r| r.body.payer.clone()),
            transaction: receipt
                .as_ref()
                .and_then(|r| r.body.tx_refs.first().cloned())
                .unwrap_or_default(),
            network: network.to_string(),
            receipt,
        }
    }

    /// The header value (the same for `PAYMENT-RESPONSE` and `X-PAYMENT-RESPONSE`).
    pub fn to_header(&self) -> Result<String, X402Error> {
        encode_base64_json(PAYMENT_RESPONSE, self)
    }

    /// Decodes a `PAYMENT-RESPONSE` / `X-PAYMENT-RESPONSE` value. The receipt, if any, is
    /// decoded but not verified: see [`SettlementResponse::verified_receipt`].
    pub fn from_header(value: &str) -> Result<Self, X402Error> {
        decode_header(PAYMENT_RESPONSE, value, MAX_RESPONSE_HEADER, None)
    }

    /// The receipt after checking its rules and signature and, when `gateway` is given,
    /// that the gateway signed it.
    pub fn verified_receipt(
        &self,
        gateway: Option<&PublicKey>,
    ) -> Result<Option<&Signed<SettlementReceipt>>, X402Error> {
        let Some(receipt) = &self.receipt else {
            return Ok(None);
        };
        let checked = match gateway {
            Some(key) => receipt.verify_from(key),
            None => receipt.verify(),
        };
        checked.map_err(|e| X402Error::field(PAYMENT_RESPONSE, "receipt", e.to_string()))?;
        Ok(Some(receipt))
    }
}

fn base64_engine() -> GeneralPurpose {
    GeneralPurpose::new(
        &STANDARD,
        GeneralPurposeConfig::new()
            .with_encode_padding(true)
            .with_decode_padding_mode(DecodePaddingMode::Indifferent),
    )
}

/// Base64 (standard, padded) of the JSON of `value`.
pub fn encode_base64_json<T: Serialize>(
    what: &'static str,
    value: &T,
) -> Result<String, X402Error> {
    let json = serde_json::to_vec(value).map_err(|e| X402Error::Encode {
        what,
        detail: e.to_string(),
    })?;
    Ok(base64_engine().encode(json))
}

fn check_len(what: &'static str, len: usize, max: usize) -> Result<(), X402Error> {
    if len > max {
        Err(X402Error::TooLarge { what, len, max })
    } else {
        Ok(())
    }
}

fn check_version(what: &'static str, found: u8, expected: u8) -> Result<(), X402Error> {
    if found == expected {
        Ok(())
    } else {
        Err(X402Error::WrongVersion {
            what,
            found: found.to_string(),
            expected,
        })
    }
}

/// Decodes a base64 JSON header value of at most `max` encoded bytes, checking
/// `x402Version` when `version` is given.
pub fn decode_header<T: DeserializeOwned>(
    what: &'static str,
    value: &str,
    max: usize,
    version: Option<u8>,
) -> Result<T, X402Error> {
    check_len(what, value.len(), max)?;
    let value = value.trim();
    if value.is_empty() {
        return Err(X402Error::Empty(what));
    }
    let json = base64_engine()
        .decode(value)
        .map_err(|e| X402Error::Base64 {
            what,
            detail: e.to_string(),
        })?;
    decode_json(what, &json, version)
}

fn decode_json<T: DeserializeOwned>(
    what: &'static str,
    json: &[u8],
    version: Option<u8>,
) -> Result<T, X402Error> {
    let bad_json = |e: serde_json::Error| X402Error::Json {
        what,
        detail: e.to_string(),
    };
    let value: Value = serde_json::from_slice(json).map_err(bad_json)?;
    if !value.is_object() {
        return Err(X402Error::Json {
            what,
            detail: "expected a JSON object".into(),
        });
    }
    if let Some(expected) = version {
        match value.get("x402Version") {
            Some(Value::Number(n)) if n.as_u64() == Some(u64::from(expected)) => {}
            Some(other) => {
                return Err(X402Error::WrongVersion {
                    what,
                    found: other.to_string(),
                    expected,
                });
            }
            None => {
                return Err(X402Error::WrongVersion {
                    what,
                    found: "missing".into(),
                    expected,
                });
            }
        }
    }
    serde_json::from_value(value).map_err(bad_json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn requirement() -> PaymentRequirements {
        PaymentRequirements {
            scheme: "exact".into(),
            network: "d402:local".into(),
            amount: Units(10_000),
            asset: "local:USDC".into(),
            pay_to: "GatewayAddr".into(),
            max_timeout_seconds: 60,
            extra: Some(
                json!({"name": "USDC", "decimals": 6})
                    .as_object()
                    .cloned()
                    .unwrap(),
            ),
        }
    }

    fn challenge() -> PaymentRequired {
        PaymentRequired::new(
            ResourceInfo {
                url: "http://127.0.0.1:8080/v1/tasks".into(),
                description: Some("web.page_to_markdown@1".into()),
                mime_type: Some("application/json".into()),
            },
            vec![requirement()],
        )
    }

    fn b64(json: &str) -> String {
        base64_engine().encode(json.as_bytes())
    }

    #[test]
    fn payment_required_round_trips_and_matches_the_spec_shape() {
        let c = challenge();
        let header = c.to_header().unwrap();
        assert_eq!(PaymentRequired::from_header(&header).unwrap(), c);
        let json: Value =
            serde_json::from_slice(&base64_engine().decode(&header).unwrap()).unwrap();
        assert_eq!(json["x402Version"], 2);
        assert_eq!(json["resource"]["mimeType"], "application/json");
        assert_eq!(json["accepts"][0]["amount"], "10000");
        assert_eq!(json["accepts"][0]["payTo"], "GatewayAddr");
        assert_eq!(json["accepts"][0]["maxTimeoutSeconds"], 60);
        assert_eq!(json["accepts"][0]["extra"]["decimals"], 6);
    }

    #[test]
    fn decodes_the_spec_example() {
        // The PAYMENT-REQUIRED example of specs/transports-v2/http.md.
        let header = "eyJ4NDAyVmVyc2lvbiI6MiwiZXJyb3IiOiJQQVlNRU5ULVNJR05BVFVSRSBoZWFkZXIgaXMgcmVxdWlyZWQiLCJyZXNvdXJjZSI6eyJ1cmwiOiJodHRwczovL2FwaS5leGFtcGxlLmNvbS9wcmVtaXVtLWRhdGEiLCJkZXNjcmlwdGlvbiI6IkFjY2VzcyB0byBwcmVtaXVtIG1hcmtldCBkYXRhIiwibWltZVR5cGUiOiJhcHBsaWNhdGlvbi9qc29uIn0sImFjY2VwdHMiOlt7InNjaGVtZSI6ImV4YWN0IiwibmV0d29yayI6ImVpcDE1NTo4NDUzMiIsImFtb3VudCI6IjEwMDAwIiwiYXNzZXQiOiIweDAzNkNiRDUzODQyYzU0MjY2MzRlNzkyOTU0MWVDMjMxOGYzZENGN2UiLCJwYXlUbyI6IjB4MjA5NjkzQmM2YWZjMEM1MzI4YkEzNkZhRjAzQzUxNEVGMzEyMjg3QyIsIm1heFRpbWVvdXRTZWNvbmRzIjo2MCwiZXh0cmEiOnsibmFtZSI6IlVTREMiLCJ2ZXJzaW9uIjoiMiJ9fV19";
        let c = PaymentRequired::from_header(header).unwrap();
        assert_eq!(c.accepts[0].network, "eip155:84532");
        assert_eq!(c.accepts[0].amount, Units(10_000));
        assert_eq!(c.resource.url, "https://api.example.com/premium-data");
        assert_eq!(network_v1_name(&c.accepts[0].network), "base-sepolia");
    }

    #[test]
    fn v1_body_carries_the_same_terms() {
        let c = challenge();
        let v1 = c.to_v1();
        let bytes = v1.to_json().unwrap();
        let json: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["x402Version"], 1);
        assert_eq!(json["error"], "X-PAYMENT header is required");
        let a = &json["accepts"][0];
        assert_eq!(a["maxAmountRequired"], "10000");
        assert_eq!(a["network"], "d402-local");
        assert_eq!(a["resource"], "http://127.0.0.1:8080/v1/tasks");
        assert_eq!(a["description"], "web.page_to_markdown@1");
        assert_eq!(a["mimeType"], "application/json");
        assert!(a.get("outputSchema").is_none());
        let back = PaymentRequiredV1::from_json(&bytes).unwrap();
        assert_eq!(back, v1);
        let mut v2 = back.to_v2().unwrap();
        assert_eq!(v2.accepts, c.accepts);
        assert_eq!(v2.resource, c.resource);
        v2.error = c.error.clone();
        assert_eq!(v2, c);
    }

    #[test]
    fn payments_round_trip_in_both_versions() {
        let mut payload = Map::new();
        payload.insert("signature".into(), json!("ab"));
        let v2 = PaymentPayload {
            x402_version: 2,
            resource: Some(challenge().resource),
            accepted: requirement(),
            payload: payload.clone(),
            extensions: None,
        };
        let h = v2.to_header().unwrap();
        let got = Payment::from_headers(Some(&h), None).unwrap().unwrap();
        assert_eq!(got, Payment::V2(v2.clone()));
        assert_eq!(got.network(), "d402:local");
        assert_eq!(got.response_header_name(), PAYMENT_RESPONSE);

        let v1 = PaymentPayloadV1 {
            x402_version: 1,
            scheme: "exact".into(),
            network: "d402-local".into(),
            payload,
        };
        let h1 = v1.to_header().unwrap();
        let got = Payment::from_headers(None, Some(&h1)).unwrap().unwrap();
        assert_eq!(got.network(), "d402:local");
        assert_eq!(got.accepted(), None);
        assert_eq!(got.response_header_name(), X_PAYMENT_RESPONSE);
        assert_eq!(Payment::from_headers(None, None).unwrap(), None);
        assert_eq!(
            Payment::from_headers(Some(&h), Some(&h1)).unwrap_err(),
            X402Error::BothPaymentHeaders
        );
    }

    #[test]
    fn settlement_response_round_trips() {
        let r = SettlementResponse {
            success: false,
            error_reason: Some("insufficient_funds".into()),
            payer: None,
            transaction: String::new(),
            network: "d402:local".into(),
            receipt: None,
        };
        let h = r.to_header().unwrap();
        assert_eq!(SettlementResponse::from_header(&h).unwrap(), r);
        let json: Value = serde_json::from_slice(&base64_engine().decode(&h).unwrap()).unwrap();
        assert_eq!(json["errorReason"], "insufficient_funds");
        assert_eq!(json["transaction"], "");
        // The spec's failure example omits `transaction`.
        let spec =
            b64(r#"{"success":false,"errorReason":"insufficient_funds","network":"eip155:84532"}"#);
        assert!(!SettlementResponse::from_header(&spec).unwrap().success);
    }

    #[test]
    fn malformed_headers_get_typed_errors() {
        let too_big = "A".repeat(MAX_HEADER + 1);
        assert!(matches!(
            PaymentPayload::from_header(&too_big),
            Err(X402Error::TooLarge { len, max: MAX_HEADER, .. }) if len == MAX_HEADER + 1
        ));
        assert!(matches!(
            PaymentPayload::from_header("not base64!!"),
            Err(X402Error::Base64 { .. })
        ));
        assert!(matches!(
            PaymentPayload::from_header("   "),
            Err(X402Error::Empty(_))
        ));
        assert!(matches!(
            PaymentPayload::from_header(&b64("{not json")),
            Err(X402Error::Json { .. })
        ));
        assert!(matches!(
            PaymentPayload::from_header(&b64("[1,2]")),
            Err(X402Error::Json { .. })
        ));
        // A v1 payment in the v2 header, and the other way round.
        let v1 = b64(r#"{"x402Version":1,"scheme":"exact","network":"base","payload":{}}"#);
        let err = PaymentPayload::from_header(&v1).unwrap_err();
        assert!(
            matches!(err, X402Error::WrongVersion { expected: 2, .. }),
            "{err}"
        );
        assert_eq!(err.code(), "invalid_x402_version");
        assert!(PaymentPayloadV1::from_header(&v1).is_ok());
        let mut v2 = challenge();
        assert!(matches!(
            PaymentPayloadV1::from_header(&v2.to_header().unwrap()),
            Err(X402Error::WrongVersion { expected: 1, .. })
        ));
        assert!(matches!(
            PaymentRequired::from_header(&b64(r#"{"accepts":[]}"#)),
            Err(X402Error::WrongVersion { found, .. }) if found == "missing"
        ));
        assert!(matches!(
            PaymentRequired::from_header(&b64(r#"{"x402Version":"2"}"#)),
            Err(X402Error::WrongVersion { .. })
        ));
        // Amounts must be decimal strings of integers.
        for bad in [
            "10000",
            "\"1e4\"",
            "\"-1\"",
            "\"0.5\"",
            "\"010\"",
            "\"18446744073709551616\"",
            "\"\"",
        ] {
            let json = format!(
                r#"{{"x402Version":2,"resource":{{"url":"u"}},"accepts":[{{"scheme":"exact","network":"n","amount":{bad},"asset":"a","payTo":"p","maxTimeoutSeconds":1}}]}}"#
            );
            assert!(
                matches!(
                    PaymentRequired::from_header(&b64(&json)),
                    Err(X402Error::Json { .. })
                ),
                "amount {bad} accepted"
            );
        }
        v2.accepts.clear();
        assert!(matches!(
            v2.to_header(),
            Err(X402Error::InvalidField {
                field: "accepts",
                ..
            })
        ));
        let mut empty_pay_to = challenge();
        empty_pay_to.accepts[0].pay_to.clear();
        let h = encode_base64_json("t", &empty_pay_to).unwrap();
        assert!(matches!(
            PaymentRequired::from_header(&h),
            Err(X402Error::InvalidField { field: "payTo", .. })
        ));
        assert!(matches!(
            SettlementResponse::from_header(&"A".repeat(MAX_RESPONSE_HEADER + 4)),
            Err(X402Error::TooLarge { .. })
        ));
        assert!(matches!(
            PaymentRequiredV1::from_json(&vec![b' '; MAX_V1_BODY + 1]),
            Err(X402Error::TooLarge { .. })
        ));
    }

    #[test]
    fn unpadded_base64_is_accepted() {
        let h = challenge().to_header().unwrap();
        let unpadded = h.trim_end_matches('=');
        assert_eq!(PaymentRequired::from_header(unpadded).unwrap(), challenge());
    }

    #[test]
    fn units_parse_strictly() {
        assert_eq!(Units::parse("0"), Some(Units(0)));
        assert_eq!(Units::parse("18446744073709551615"), Some(Units(u64::MAX)));
        for bad in [
            "",
            "00",
            "01",
            "+1",
            "-1",
            "1.0",
            "1e3",
            " 1",
            "18446744073709551616",
        ] {
            assert_eq!(Units::parse(bad), None, "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let text = String::from_utf8_lossy(&bytes);
            let _ = PaymentRequired::from_header(&text);
            let _ = PaymentPayload::from_header(&text);
            let _ = PaymentPayloadV1::from_header(&text);
            let _ = SettlementResponse::from_header(&text);
            let _ = PaymentRequiredV1::from_json(&bytes);
            let encoded = base64_engine().encode(&bytes);
            let _ = PaymentPayload::from_header(&encoded);
        }
    }
}
