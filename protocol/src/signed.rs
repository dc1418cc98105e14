//! Signed envelopes with domain separation.
//!
//! A signature covers `SIGNATURE_CONTEXT || len(domain) || domain || canonical(body)`, where
//! the domain is fixed per message kind (see [`Signable::DOMAIN`]). A signature made for one
//! kind therefore never verifies as another, even when the bodies happen to share bytes.
//! Verification uses `verify_strict` (no small-order keys, no malleable signatures).

use ed25519_dalek::{Signer, SigningKey};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{
    cbor,
    content_id::Cid,
    error::{ProtocolError, Result},
    keys::{PublicKey, Signature},
    messages::WireMessage,
};

/// Prefix of every signed message; bump the suffix to change the scheme.
pub const SIGNATURE_CONTEXT: &[u8] = b"d402-signature-v1\0";

/// Bytes an envelope adds around its body: the key, the signature, the field names.
pub const ENVELOPE_OVERHEAD: usize = 192;

/// A body kind that can be signed.
pub trait Signable: Serialize + DeserializeOwned {
    /// Domain-separation tag, unique per kind, e.g. `d402/bid/1`.
    const DOMAIN: &'static str;
    /// Name used in errors.
    const KIND: &'static str;
    /// Largest canonical body accepted, checked before decoding.
    const MAX_BODY: usize;

    /// Checks the body's own rules (version, field ranges, internal CIDs). Called before
    /// signing and after decoding.
    fn validate(&self) -> Result<()> {
        Ok(())
    }
}

/// The exact bytes that are signed for `body_bytes` under `domain`.
pub fn signing_input(domain: &str, body_bytes: &[u8]) -> Vec<u8> {
    debug_assert!(domain.len() < 256, "domains are short constants");
    let mut input =
        Vec::with_capacity(SIGNATURE_CONTEXT.len() + 1 + domain.len() + body_bytes.len());
    input.extend_from_slice(SIGNATURE_CONTEXT);
    input.push(domain.len() as u8);
    input.extend_from_slice(domain.as_bytes());
    input.extend_from_slice(body_bytes);
    input
}

/// A body, the key that signed it and the signature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signed<T> {
    /// The signed content.
    pub body: T,
    /// Who signed it.
    pub signer: PublicKey,
    /// Signature over [`signing_input`] of `T::DOMAIN` and the body's canonical bytes.
    pub signature: Signature,
}

impl<T: Signable> Signed<T> {
    /// Validates and signs `body` with `key`.
    pub fn sign(body: T, key: &SigningKey) -> Result<Self> {
        body.validate()?;
        let body_bytes = cbor::to_canonical(&body)?;
        let signature = key.sign(&signing_input(T::DOMAIN, &body_bytes));
        Ok(Signed {
            body,
            signer: PublicKey(key.verifying_key().to_bytes()),
            signature: Signature(signature.to_bytes()),
        })
    }

    /// Checks the body's rules and the signature.
    pub fn verify(&self) -> Result<()> {
        self.body.validate()?;
        let body_bytes = cbor::to_canonical(&self.body)?;
        let key = self.signer.verifying_key()?;
        let sig = ed25519_dalek::Signature::from_bytes(&self.signature.0);
        key.verify_strict(&signing_input(T::DOMAIN, &body_bytes), &sig)
            .map_err(|_| ProtocolError::BadSignature { domain: T::DOMAIN })
    }

    /// Checks that `expected` signed it, then verifies.
    pub fn verify_from(&self, expected: &PublicKey) -> Result<()> {
        if &self.signer != expected {
            return Err(ProtocolError::BadSignature { domain: T::DOMAIN });
        }
        self.verify()
    }

    /// Canonical bytes of the whole envelope.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        cbor::to_canonical(self)
    }

    /// Decodes an envelope (size cap first, canonical form), validates the body and
    /// verifies the signature.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let signed: Self = cbor::from_canonical(bytes, Self::max_size(), T::KIND)?;
        signed.verify()?;
        Ok(signed)
    }

    /// Largest encoded envelope accepted for this kind.
    pub const fn max_size() -> usize {
        T::MAX_BODY + ENVELOPE_OVERHEAD
    }

    /// The `dag-cbor` CID of the whole envelope (body, signer and signature).
    pub fn cid(&self) -> Result<Cid> {
        Ok(Cid::dag_cbor(&self.to_bytes()?))
    }
}

/// A signed envelope is a wire message: its cap is [`Signed::max_size`], and decoding also
/// checks the body's rules and the signature.
impl<T: Signable> WireMessage for Signed<T> {
    const KIND: &'static str = T::KIND;
    const MAX_SIZE: usize = Signed::<T>::max_size();

    fn to_bytes(&self) -> Result<Vec<u8>> {
        Signed::to_bytes(self)
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Signed::<T>::from_bytes(bytes)
    }
}
