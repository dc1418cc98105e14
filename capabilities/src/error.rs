//! The crate's error type.

use d402_protocol::{Cid, PublicKey};
use thiserror::Error;

/// Errors of manifests, registrations, wallets and the namespace registry.
///
/// Every message is one line and names what is wrong, so that the CLI can print it as is.
#[derive(Debug, Error)]
pub enum CapabilityError {
    /// A field breaks a rule; the message names the field and the rule.
    #[error("{field}: {rule}")]
    Invalid {
        /// Dotted path of the field, e.g. `limits.fuel`.
        field: String,
        /// The rule it breaks.
        rule: String,
    },
    /// A JSON document could not be parsed (syntax, unknown or missing field, wrong type).
    #[error("{what} is not valid JSON for its format: {message}")]
    Json {
        /// What was parsed, e.g. `manifest`.
        what: &'static str,
        /// serde_json's message, with line and column.
        message: String,
    },
    /// A document is larger than its cap; nothing was parsed.
    #[error("{what} is {len} bytes, over the cap of {max} bytes")]
    TooLarge {
        /// What was read.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// A stated CID does not match the content it names.
    #[error("{what}: stated CID {stated} does not match the content, which hashes to {actual}")]
    CidMismatch {
        /// What was checked, e.g. `registration_cid`.
        what: &'static str,
        /// The CID the document states.
        stated: Box<Cid>,
        /// The CID of the content.
        actual: Box<Cid>,
    },
    /// A signature is missing where one is needed, or does not verify.
    #[error("signature: {0}")]
    Signature(String),
    /// A namespace (or a parent or child of it) is owned by another publisher key.
    #[error(
        "namespace {namespace:?} is owned by publisher {owner} (through {owned:?}); \
         key {requested} cannot register it: register forks under a namespace of your own"
    )]
    NamespaceOwned {
        /// The namespace asked for.
        namespace: String,
        /// The owned namespace that conflicts (the same one, a parent or a child).
        owned: String,
        /// Its owner.
        owner: PublicKey,
        /// The key that asked.
        requested: PublicKey,
    },
    /// A protocol-level failure (encoding, CID, signature).
    #[error(transparent)]
    Protocol(#[from] d402_protocol::ProtocolError),
}

impl CapabilityError {
    /// An [`CapabilityError::Invalid`] error.
    pub fn invalid(field: impl Into<String>, rule: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            rule: rule.into(),
        }
    }

    /// A [`CapabilityError::Json`] error from serde_json.
    pub fn json(what: &'static str, err: &serde_json::Error) -> Self {
        Self::Json {
            what,
            message: err.to_string(),
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = CapabilityError> = std::result::Result<T, E>;
