//! Signed envelopes with domain separation.
//!
//! A signature covers `SIGNATURE_CONTEXT || len(domain) || domain || canonical(body)`, where
//! the domain is fixed per message kind (see [`Signable::DOMAIN`]). A signature made for one
//! kind therefore never verifies as another, even when the bodies happen to share bytes.
//! Verification is ed25519-dalek's `verify_strict` (no small-order keys or commitments, no
//! malleable signatures), computed by [`PublicKey::verify_strict`].

use ed25519_dalek::{SigningKey, ed25519::signature::MultipartSigner};
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

/// [`signing_input`] in parts, without copying the body: `len` holds the domain's length
/// byte.
fn signing_parts<'a>(domain: &'a str, len: &'a [u8; 1], body_bytes: &'a [u8]) -> [&'a [u8]; 4] {
    debug_assert!(domain.len() < 256, "domains are short constants");
    [SIGNATURE_CONTEXT, len, domain.as_bytes(), body_bytes]
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
        let len = [T::DOMAIN.len() as u8];
        let signature = key.multipart_sign(&signing_parts(T::DOMAIN, &len, &body_bytes));
        Ok(Signed {
            body,
            signer: PublicKey(key.verifying_key().to_bytes()),
            signature: Signature(signature.to_bytes()),
        })
    }

    /// Checks the body's rules and the signature.
    pub fn verify(&self) -> Result<()> {
        self.body.validate()?;
        self.check_signature(&cbor::to_canonical(&self.body)?)
    }

    /// [`Signed::verify`] of the envelope decoded from `envelope`, which must be its
    /// canonical encoding (as [`cbor::from_canonical`] checked it): the body's canonical
    /// bytes are the part of it between `body` and `signer`, so the body is not encoded
    /// again. Falls back to encoding it if `envelope` is not laid out so.
    pub(crate) fn verify_encoded(&self, envelope: &[u8]) -> Result<()> {
        self.body.validate()?;
        match body_in_envelope(envelope) {
            Some(body_bytes) => self.check_signature(body_bytes),
            None => self.check_signature(&cbor::to_canonical(&self.body)?),
        }
    }

    /// Verifies the signature over `body_bytes`, the body's canonical bytes.
    fn check_signature(&self, body_bytes: &[u8]) -> Result<()> {
        let len = [T::DOMAIN.len() as u8];
        let parts = signing_parts(T::DOMAIN, &len, body_bytes);
        if self.signer.verify_strict(&parts, &self.signature)? {
            Ok(())
        } else {
            Err(ProtocolError::BadSignature { domain: T::DOMAIN })
        }
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
        signed.verify_encoded(bytes)?;
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

/// The body's bytes inside `envelope`, the canonical encoding of a [`Signed`]: a map whose
/// keys sort `body`, `signer`, `signature`, the last two byte strings of 32 and 64 bytes.
/// `None` if `envelope` is not laid out so.
fn body_in_envelope(envelope: &[u8]) -> Option<&[u8]> {
    // Map of 3; text "body".
    const HEAD: &[u8] = &[0xa3, 0x64, b'b', b'o', b'd', b'y'];
    // Text "signer"; byte string of 32.
    const SIGNER: &[u8] = &[0x66, b's', b'i', b'g', b'n', b'e', b'r', 0x58, 32];
    // Text "signature"; byte string of 64.
    const SIGNATURE: &[u8] = &[
        0x69, b's', b'i', b'g', b'n', b'a', b't', b'u', b'r', b'e', 0x58, 64,
    ];
    let tail = SIGNER.len() + 32 + SIGNATURE.len() + 64;
    let body_end = envelope.len().checked_sub(tail)?;
    if body_end <= HEAD.len() || !envelope.starts_with(HEAD) {
        return None;
    }
    let rest = &envelope[body_end..];
    (rest.starts_with(SIGNER) && rest[SIGNER.len() + 32..].starts_with(SIGNATURE))
        .then(|| &envelope[HEAD.len()..body_end])
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Note {
        v: u16,
        text: String,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    }

    impl Signable for Note {
        const DOMAIN: &'static str = "d402/test-note/1";
        const KIND: &'static str = "note";
        const MAX_BODY: usize = 4096;
    }

    #[test]
    fn a_signature_covers_exactly_the_signing_input() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let body = Note {
            v: 1,
            text: "parts".into(),
            data: vec![1, 2, 3],
        };
        let signed = Signed::sign(body.clone(), &key).unwrap();
        let input = signing_input(Note::DOMAIN, &cbor::to_canonical(&body).unwrap());
        let sig = ed25519_dalek::Signature::from_bytes(&signed.signature.0);
        key.verifying_key().verify_strict(&input, &sig).unwrap();
        assert!(
            signed
                .signer
                .verify_strict(&[input.as_slice()], &signed.signature)
                .unwrap()
        );
        signed.verify().unwrap();
    }

    #[test]
    fn the_body_inside_an_envelope_is_its_canonical_encoding() {
        let key = SigningKey::from_bytes(&[7; 32]);
        for len in [0, 1, 23, 24, 300, 3000] {
            let body = Note {
                v: 1,
                text: "x".repeat(len % 100),
                data: vec![9; len],
            };
            let signed = Signed::sign(body.clone(), &key).unwrap();
            let bytes = signed.to_bytes().unwrap();
            assert_eq!(
                body_in_envelope(&bytes),
                Some(cbor::to_canonical(&body).unwrap().as_slice())
            );
            assert_eq!(Signed::<Note>::from_bytes(&bytes).unwrap(), signed);
        }
        // Not an envelope: no slice is taken.
        assert_eq!(body_in_envelope(&[0xa3]), None);
        assert_eq!(body_in_envelope(&[0u8; 300]), None);
    }
}
