//! The crate's error type.

use thiserror::Error;

/// Everything that can go wrong while encoding, decoding, hashing or verifying protocol
/// objects. Decoders return these for any input; they never panic.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtocolError {
    /// The input is larger than the cap for its kind; nothing was parsed.
    #[error("{kind}: {len} bytes exceeds the cap of {max} bytes")]
    TooLarge {
        /// What was being decoded.
        kind: &'static str,
        /// Length of the input.
        len: usize,
        /// The cap for this kind.
        max: usize,
    },
    /// The bytes are not well-formed CBOR for the expected type.
    #[error("malformed CBOR: {0}")]
    Malformed(String),
    /// Bytes were left over after the one CBOR item.
    #[error("{0} trailing bytes after the CBOR item")]
    TrailingBytes(usize),
    /// The bytes decode, but are not the canonical encoding of the value they hold.
    #[error("not canonical CBOR (d402 accepts exactly one encoding per value)")]
    NonCanonical,
    /// A float was found; floats are never allowed in protocol objects.
    #[error("floats are not allowed in protocol objects")]
    FloatNotAllowed,
    /// A map key that is not a text string (DAG-CBOR allows text keys only).
    #[error("map keys must be text strings")]
    NonTextKey,
    /// The same key twice in one map.
    #[error("duplicate map key {0:?}")]
    DuplicateKey(String),
    /// A CBOR tag other than 42 (CID).
    #[error("CBOR tag {0} is not allowed (only 42, a CID)")]
    UnsupportedTag(u64),
    /// Values nest deeper than [`crate::cbor::MAX_DEPTH`].
    #[error("nesting deeper than {0} levels")]
    TooDeep(usize),
    /// A message version this implementation does not speak.
    #[error("{kind} version {found} is not supported (expected {expected})")]
    UnsupportedVersion {
        /// What was being decoded.
        kind: &'static str,
        /// Version found in the message.
        found: u16,
        /// Version this implementation speaks.
        expected: u16,
    },
    /// A CID that cannot be parsed or uses a codec or hash d402 does not accept.
    #[error("invalid CID: {0}")]
    InvalidCid(String),
    /// Content does not hash to the CID it was presented under.
    #[error("CID mismatch: expected {expected}, content hashes to {actual}")]
    CidMismatch {
        /// The CID the content was supposed to have.
        expected: String,
        /// The CID the content actually has.
        actual: String,
    },
    /// A public key that is not a valid ed25519 point.
    #[error("invalid ed25519 public key")]
    InvalidPublicKey,
    /// The signature does not verify for this domain, signer and body.
    #[error("signature does not verify for domain {domain}")]
    BadSignature {
        /// The signature domain that was checked.
        domain: &'static str,
    },
    /// A field breaks a rule of its message kind.
    #[error("invalid {field}: {reason}")]
    InvalidField {
        /// The field's name.
        field: &'static str,
        /// The rule it breaks.
        reason: String,
    },
    /// Encoding failed (only for values that cannot be represented, such as floats).
    #[error("encoding failed: {0}")]
    Encode(String),
}

/// Shorthand for results of this crate.
pub type Result<T, E = ProtocolError> = std::result::Result<T, E>;

impl ProtocolError {
    /// An [`ProtocolError::InvalidField`] error.
    pub fn field(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidField {
            field,
            reason: reason.into(),
        }
    }
}
