//! The crate's error type.

use thiserror::Error;

/// Errors of manifests, registrations, policy and the store.
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
}

/// Shorthand for results of this crate.
pub type Result<T, E = CapabilityError> = std::result::Result<T, E>;
