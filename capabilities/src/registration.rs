//! Capability registrations: a manifest CID bound to creator commission terms.
//!
//! A [`Registration`] body names the exact manifest (by CID), the capability and its
//! namespace, the creator's commission in basis points, a creator wallet per chain, the
//! publisher's key and the creation time. It is signed as a
//! [`Signed<Registration>`](d402_protocol::Signed) under [`REGISTRATION_DOMAIN`].
//!
//! **Registration CID**: the `dag-cbor` CID of the canonical CBOR of the body. The body
//! holds every term and the publisher key, so any change to a term changes the CID, and the
//! signature (over the same canonical body bytes) no longer verifies. The signature is not
//! part of the CID, so the signed and the unsigned form of the same terms share a name; the
//! signature only proves who bound them (ed25519 signatures are deterministic and verified
//! strictly, so an envelope is unique for its body and key anyway).
//!
//! **Unsigned registrations** state terms that nobody vouches for: the body has no
//! `publisher`, and the document has no `signer` or `signature`. A gateway accepts one only
//! with `require_signed_capability_registration = false` and no trusted-namespace list.
//!
//! The JSON document a publisher hands out ([`RegistrationDocument`]) carries the CID
//! first so that it is visible, then the body, then the signer and signature.

use serde::{Deserialize, Serialize};

use d402_protocol::{
    CapabilityRef, Cid, Codec, PublicKey, Signable, Signature, Signed, SigningKey, UnixMillis,
    Wallets, cbor, signed::ENVELOPE_OVERHEAD,
};

use crate::{
    commission::{self, Split},
    error::{CapabilityError, Result},
    manifest::Manifest,
    namespace::validate_namespace,
    wallet,
};

/// Signature domain of registrations.
pub const REGISTRATION_DOMAIN: &str = "d402/capability-registration/1";
/// Body version this implementation writes and reads.
pub const REGISTRATION_VERSION: u16 = 1;
/// Largest canonical body accepted.
pub const MAX_REGISTRATION_BODY: usize = 4 * 1024;
/// Largest registration JSON document read.
pub const MAX_REGISTRATION_JSON: usize = 64 * 1024;
/// Largest canonical [`RegistrationDocument`] (the store's form).
pub const MAX_REGISTRATION_DOCUMENT: usize = MAX_REGISTRATION_BODY + ENVELOPE_OVERHEAD + 64;

/// The terms a publisher binds to one exact manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// Body version, [`REGISTRATION_VERSION`].
    pub v: u16,
    /// The exact manifest these terms apply to.
    pub manifest_cid: Cid,
    /// The manifest's `id@version`.
    pub capability: CapabilityRef,
    /// The capability id's namespace (everything before its last dot).
    pub namespace: String,
    /// Creator commission in basis points of the accepted gross worker payout (0..=10000).
    pub creator_commission_bps: u16,
    /// Where the creator is paid, per chain. Needs the chain of every rail a gateway may use.
    pub creator_wallets: Wallets,
    /// The publisher key that signs; absent only in an unsigned registration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publisher: Option<PublicKey>,
    /// When it was made, in milliseconds since the Unix epoch.
    pub created_at: UnixMillis,
}

impl Registration {
    /// Terms for `manifest` (which must be valid) with `publisher` set, not yet signed.
    pub fn for_manifest(
        manifest: &Manifest,
        creator_commission_bps: u16,
        creator_wallets: Wallets,
        publisher: Option<PublicKey>,
        created_at: UnixMillis,
    ) -> Result<Self> {
        manifest.validate()?;
        let body = Registration {
            v: REGISTRATION_VERSION,
            manifest_cid: manifest.cid()?,
            capability: manifest.capability(),
            namespace: manifest.namespace().to_string(),
            creator_commission_bps,
            creator_wallets,
            publisher,
            created_at,
        };
        body.validate_terms()?;
        Ok(body)
    }

    /// Checks every rule of the terms (not the signature); errors name the field.
    pub fn validate_terms(&self) -> Result<()> {
        if self.v != REGISTRATION_VERSION {
            return Err(CapabilityError::invalid(
                "v",
                format!("must be {REGISTRATION_VERSION}"),
            ));
        }
        if self.manifest_cid.codec() != Codec::DagCbor {
            return Err(CapabilityError::invalid(
                "manifest_cid",
                "must be a dag-cbor CID (bafy…) of a manifest",
            ));
        }
        self.capability.validate().map_err(|e| match e {
            d402_protocol::ProtocolError::InvalidField { field, reason } => {
                CapabilityError::invalid(format!("capability.{field}"), reason)
            }
            other => CapabilityError::invalid("capability", other.to_string()),
        })?;
        validate_namespace("namespace", &self.namespace)?;
        if self.namespace != self.capability.namespace() {
            return Err(CapabilityError::invalid(
                "namespace",
                format!(
                    "{:?} is not the namespace of {} (which is {:?})",
                    self.namespace,
                    self.capability,
                    self.capability.namespace()
                ),
            ));
        }
        commission::check_bps(self.creator_commission_bps)?;
        wallet::check_wallets("creator_wallets", &self.creator_wallets)?;
        if self.creator_commission_bps > 0 && self.creator_wallets.is_empty() {
            return Err(CapabilityError::invalid(
                "creator_wallets",
                "a commission above 0 bps needs at least one creator wallet",
            ));
        }
        Ok(())
    }

    /// Checks that these terms are for exactly `manifest`: its CID, id, version, namespace.
    pub fn check_manifest(&self, manifest: &Manifest) -> Result<()> {
        let cid = manifest.cid()?;
        if self.manifest_cid != cid {
            return Err(CapabilityError::invalid(
                "manifest_cid",
                format!(
                    "the registration is for manifest {} but this manifest is {cid}; terms \
                     apply only to the exact manifest CID",
                    self.manifest_cid
                ),
            ));
        }
        if self.capability != manifest.capability() {
            return Err(CapabilityError::invalid(
                "capability",
                format!(
                    "is {} but the manifest is {}",
                    self.capability,
                    manifest.capability()
                ),
            ));
        }
        Ok(())
    }

    /// The registration CID: `dag-cbor` CID of the canonical body.
    pub fn cid(&self) -> Result<Cid> {
        Ok(Cid::of(self)?)
    }

    /// Splits a gross worker payout by these terms.
    pub fn split(&self, gross: u64) -> Result<Split> {
        commission::split(gross, self.creator_commission_bps)
    }
}

impl Signable for Registration {
    const DOMAIN: &'static str = REGISTRATION_DOMAIN;
    const KIND: &'static str = "capability registration";
    const MAX_BODY: usize = MAX_REGISTRATION_BODY;

    fn validate(&self) -> d402_protocol::Result<()> {
        self.validate_terms()
            .map_err(|e| d402_protocol::ProtocolError::field("registration", e.to_string()))?;
        if self.publisher.is_none() {
            return Err(d402_protocol::ProtocolError::field(
                "publisher",
                "a signed registration names its publisher key",
            ));
        }
        let len = cbor::to_canonical(self)?.len();
        if len > MAX_REGISTRATION_BODY {
            return Err(d402_protocol::ProtocolError::TooLarge {
                kind: Self::KIND,
                len,
                max: MAX_REGISTRATION_BODY,
            });
        }
        Ok(())
    }
}

/// A registration as handed around: signed by its publisher, or unsigned.
#[derive(Debug, Clone, PartialEq)]
pub enum CapabilityRegistration {
    /// Signed by the key in `body.publisher`.
    Signed(Signed<Registration>),
    /// Terms without a publisher or signature.
    Unsigned(Registration),
}

impl CapabilityRegistration {
    /// Signs `body` with `key`, setting `body.publisher` to the key's public half.
    pub fn sign(mut body: Registration, key: &SigningKey) -> Result<Self> {
        body.publisher = Some(PublicKey::from(key.verifying_key()));
        body.validate_terms()?;
        let signed = Signed::sign(body, key)?;
        Ok(Self::Signed(signed))
    }

    /// An unsigned registration; `body.publisher` must be absent.
    pub fn unsigned(body: Registration) -> Result<Self> {
        body.validate_terms()?;
        if body.publisher.is_some() {
            return Err(CapabilityError::invalid(
                "publisher",
                "an unsigned registration names no publisher (a claim nobody signed proves nothing)",
            ));
        }
        Ok(Self::Unsigned(body))
    }

    /// The terms.
    pub fn body(&self) -> &Registration {
        match self {
            Self::Signed(s) => &s.body,
            Self::Unsigned(b) => b,
        }
    }

    /// Whether it carries a signature.
    pub fn is_signed(&self) -> bool {
        matches!(self, Self::Signed(_))
    }

    /// The registration CID (of the body; see the module docs).
    pub fn cid(&self) -> Result<Cid> {
        self.body().cid()
    }

    /// Checks the terms and, when signed, that the signer is the body's publisher and that
    /// the signature verifies. An unsigned registration passes when its terms are valid and
    /// it names no publisher; whether unsigned terms are acceptable is the policy's call.
    pub fn verify(&self) -> Result<()> {
        self.body().validate_terms()?;
        match self {
            Self::Signed(s) => {
                if s.body.publisher != Some(s.signer) {
                    return Err(CapabilityError::Signature(format!(
                        "signed by {} but the body names publisher {}",
                        s.signer,
                        s.body
                            .publisher
                            .map_or_else(|| "none".to_string(), |p| p.to_string())
                    )));
                }
                s.verify()
                    .map_err(|e| CapabilityError::Signature(e.to_string()))
            }
            Self::Unsigned(b) => {
                if b.publisher.is_some() {
                    return Err(CapabilityError::Signature(
                        "the body names a publisher but carries no signature".into(),
                    ));
                }
                Ok(())
            }
        }
    }

    /// The verified publisher key: `Some` only for a signed registration that verifies.
    pub fn verified_publisher(&self) -> Option<PublicKey> {
        match self {
            Self::Signed(s) if self.verify().is_ok() => Some(s.signer),
            _ => None,
        }
    }

    /// The document form, with its CID.
    pub fn to_document(&self) -> Result<RegistrationDocument> {
        let (signer, signature) = match self {
            Self::Signed(s) => (Some(s.signer), Some(s.signature)),
            Self::Unsigned(_) => (None, None),
        };
        Ok(RegistrationDocument {
            registration_cid: self.cid()?,
            body: self.body().clone(),
            signer,
            signature,
        })
    }

    /// Reads a document: checks the stated CID against the body and the pairing of signer
    /// and signature. Does not verify the signature (see [`Self::verify`]), so that a
    /// policy can refuse with its own reason.
    pub fn from_document(doc: RegistrationDocument) -> Result<Self> {
        let actual = doc.body.cid()?;
        if actual != doc.registration_cid {
            return Err(CapabilityError::CidMismatch {
                what: "registration_cid",
                stated: Box::new(doc.registration_cid),
                actual: Box::new(actual),
            });
        }
        match (doc.signer, doc.signature) {
            (Some(signer), Some(signature)) => Ok(Self::Signed(Signed {
                body: doc.body,
                signer,
                signature,
            })),
            (None, None) => Ok(Self::Unsigned(doc.body)),
            _ => Err(CapabilityError::invalid(
                "signature",
                "signer and signature must both be present (signed) or both absent (unsigned)",
            )),
        }
    }

    /// Parses the JSON document (at most [`MAX_REGISTRATION_JSON`] bytes, no unknown fields)
    /// and checks its CID. Does not verify the signature.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        if bytes.len() > MAX_REGISTRATION_JSON {
            return Err(CapabilityError::TooLarge {
                what: "registration JSON",
                len: bytes.len(),
                max: MAX_REGISTRATION_JSON,
            });
        }
        let doc: RegistrationDocument =
            serde_json::from_slice(bytes).map_err(|e| CapabilityError::json("registration", &e))?;
        Self::from_document(doc)
    }

    /// The JSON document, pretty-printed.
    pub fn to_json_pretty(&self) -> Result<String> {
        serde_json::to_string_pretty(&self.to_document()?)
            .map_err(|e| CapabilityError::json("registration", &e))
    }

    /// Canonical CBOR of the document (the store's form).
    pub fn to_canonical(&self) -> Result<Vec<u8>> {
        Ok(cbor::to_canonical(&self.to_document()?)?)
    }

    /// Decodes the canonical CBOR document (size cap first) and checks its CID.
    pub fn from_canonical(bytes: &[u8]) -> Result<Self> {
        let doc: RegistrationDocument = cbor::from_canonical(
            bytes,
            MAX_REGISTRATION_DOCUMENT,
            "capability registration document",
        )?;
        Self::from_document(doc)
    }
}

/// The file form of a registration: its CID, the body, and for a signed one the signer and
/// signature. JSON for people (`d402 capability register` prints it); canonical CBOR in the
/// capability store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrationDocument {
    /// CID of the canonical body, checked on reading.
    pub registration_cid: Cid,
    /// The terms.
    pub body: Registration,
    /// The signing publisher key (base58 in JSON); absent when unsigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<PublicKey>,
    /// Signature over the body under [`REGISTRATION_DOMAIN`] (hex in JSON); absent when
    /// unsigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<Signature>,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::manifest::{SnapshotterKind, placeholder_implementation_cid};
    use d402_protocol::Chain;

    pub(crate) const SOL: &str = "So11111111111111111111111111111111111111112";
    pub(crate) const EVM: &str = "0x000000000000000000000000000000000000c0de";

    pub(crate) fn manifest() -> Manifest {
        Manifest::template(
            "example.extract_product",
            1,
            placeholder_implementation_cid(),
            vec![SnapshotterKind::Fetch],
        )
        .unwrap()
    }

    pub(crate) fn wallets() -> Wallets {
        [
            (Chain::Solana, SOL.to_string()),
            (Chain::Evm, EVM.to_string()),
        ]
        .into_iter()
        .collect()
    }

    pub(crate) fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    pub(crate) fn signed(bps: u16) -> CapabilityRegistration {
        let body = Registration::for_manifest(&manifest(), bps, wallets(), None, 1_700_000_000_000)
            .unwrap();
        CapabilityRegistration::sign(body, &key(1)).unwrap()
    }

    #[test]
    fn sign_verify_and_json_round_trip() {
        let reg = signed(1000);
        reg.verify().unwrap();
        assert_eq!(
            reg.verified_publisher(),
            Some(PublicKey::from(key(1).verifying_key()))
        );
        let json = reg.to_json_pretty().unwrap();
        assert!(
            json.trim_start()
                .starts_with("{\n  \"registration_cid\": \"bafy")
        );
        let back = CapabilityRegistration::from_json(json.as_bytes()).unwrap();
        assert_eq!(back, reg);
        back.verify().unwrap();
        let cbor = reg.to_canonical().unwrap();
        assert_eq!(CapabilityRegistration::from_canonical(&cbor).unwrap(), reg);
        reg.body().check_manifest(&manifest()).unwrap();
        assert_eq!(reg.body().split(10_000).unwrap().creator, 1000);
    }

    /// Whether the raw ed25519 signature verifies over the body's canonical bytes under the
    /// registration domain (independent of the term rules).
    fn raw_signature_valid(s: &Signed<Registration>) -> bool {
        let bytes = cbor::to_canonical(&s.body).unwrap();
        let input = d402_protocol::signed::signing_input(REGISTRATION_DOMAIN, &bytes);
        let key = s.signer.verifying_key().unwrap();
        let sig = ed25519_dalek::Signature::from_bytes(&s.signature.0);
        key.verify_strict(&input, &sig).is_ok()
    }

    /// Changes one field of a signed registration's body, as an attacker editing the file
    /// would, and checks that the CID changes and the signature breaks.
    fn assert_tamper_detected(tamper: impl FnOnce(&mut Registration)) {
        let reg = signed(1000);
        let CapabilityRegistration::Signed(mut s) = reg.clone() else {
            unreachable!()
        };
        assert!(raw_signature_valid(&s));
        let before = reg.cid().unwrap();
        tamper(&mut s.body);
        assert!(!raw_signature_valid(&s), "signature still verifies");
        let terms_still_valid = s.body.validate_terms().is_ok();
        let tampered = CapabilityRegistration::Signed(s);
        assert_ne!(tampered.cid().unwrap(), before, "CID did not change");
        let err = tampered.verify().unwrap_err();
        if terms_still_valid {
            assert!(
                matches!(err, CapabilityError::Signature(_)),
                "expected a signature error, got {err}"
            );
        }
        assert_eq!(tampered.verified_publisher(), None);
        // The old document's CID no longer matches the tampered body either.
        let mut doc = tampered.to_document().unwrap();
        doc.registration_cid = before;
        assert!(matches!(
            CapabilityRegistration::from_document(doc),
            Err(CapabilityError::CidMismatch { .. })
        ));
    }

    #[test]
    fn tamper_bps() {
        assert_tamper_detected(|b| b.creator_commission_bps = 9000);
    }

    #[test]
    fn tamper_solana_wallet() {
        assert_tamper_detected(|b| {
            b.creator_wallets.insert(
                Chain::Solana,
                "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v".into(),
            );
        });
    }

    #[test]
    fn tamper_evm_wallet() {
        assert_tamper_detected(|b| {
            b.creator_wallets.insert(
                Chain::Evm,
                "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed".into(),
            );
        });
    }

    #[test]
    fn tamper_manifest_cid() {
        assert_tamper_detected(|b| b.manifest_cid = Cid::dag_cbor(b"another manifest"));
    }

    #[test]
    fn tamper_namespace_alone() {
        // The namespace no longer matches the id: refused by the rules and the signature.
        assert_tamper_detected(|b| b.namespace = "attacker".into());
    }

    #[test]
    fn tamper_namespace() {
        // A consistent namespace change (capability id moved with it) so that the terms
        // stay valid and only the signature can catch it.
        assert_tamper_detected(|b| {
            b.namespace = "attacker".into();
            b.capability.id = "attacker.extract_product".into();
        });
    }

    #[test]
    fn tamper_publisher_and_time() {
        assert_tamper_detected(|b| b.created_at += 1);
        let reg = signed(1000);
        let CapabilityRegistration::Signed(mut s) = reg else {
            unreachable!()
        };
        // Re-signing with another key while claiming the first key as publisher fails.
        let other = Signed::sign(s.body.clone(), &key(2)).unwrap();
        s.signer = other.signer;
        s.signature = other.signature;
        assert!(CapabilityRegistration::Signed(s).verify().is_err());
    }

    #[test]
    fn signature_of_another_domain_does_not_verify() {
        // The same body bytes signed under another domain must not verify as a registration.
        use ed25519_dalek::Signer;
        let reg = signed(1000);
        let body = reg.body().clone();
        let bytes = cbor::to_canonical(&body).unwrap();
        let input = d402_protocol::signed::signing_input("d402/offer/1", &bytes);
        let forged = CapabilityRegistration::Signed(Signed {
            body,
            signer: PublicKey::from(key(1).verifying_key()),
            signature: Signature(key(1).sign(&input).to_bytes()),
        });
        assert!(forged.verify().is_err());
    }

    #[test]
    fn unsigned_form() {
        let body = Registration::for_manifest(&manifest(), 500, wallets(), None, 1).unwrap();
        let reg = CapabilityRegistration::unsigned(body.clone()).unwrap();
        reg.verify().unwrap();
        assert!(!reg.is_signed());
        assert_eq!(reg.verified_publisher(), None);
        let json = reg.to_json_pretty().unwrap();
        assert!(!json.contains("signature"));
        assert_eq!(
            CapabilityRegistration::from_json(json.as_bytes()).unwrap(),
            reg
        );
        // A publisher claim without a signature is refused.
        let mut claimed = body;
        claimed.publisher = Some(PublicKey::from(key(1).verifying_key()));
        assert!(CapabilityRegistration::unsigned(claimed.clone()).is_err());
        assert!(CapabilityRegistration::Unsigned(claimed).verify().is_err());
    }

    #[test]
    fn bad_terms_are_named() {
        let m = manifest();
        let err = Registration::for_manifest(&m, 10_001, wallets(), None, 1).unwrap_err();
        assert!(
            err.to_string().starts_with("creator_commission_bps:"),
            "{err}"
        );
        let mut w = wallets();
        w.insert(Chain::Evm, "0xabc".into());
        let err = Registration::for_manifest(&m, 1000, w, None, 1).unwrap_err();
        assert!(err.to_string().starts_with("creator_wallets.evm:"), "{err}");
        let err = Registration::for_manifest(&m, 1000, Wallets::new(), None, 1).unwrap_err();
        assert!(err.to_string().starts_with("creator_wallets:"), "{err}");
        // Zero commission needs no wallet.
        Registration::for_manifest(&m, 0, Wallets::new(), None, 1).unwrap();
        let mut body = Registration::for_manifest(&m, 1000, wallets(), None, 1).unwrap();
        body.namespace = "other".into();
        let err = body.validate_terms().unwrap_err();
        assert!(err.to_string().starts_with("namespace:"), "{err}");
    }

    #[test]
    fn json_refuses_unknown_fields_and_half_signatures() {
        let reg = signed(1000);
        let mut v: serde_json::Value =
            serde_json::from_str(&reg.to_json_pretty().unwrap()).unwrap();
        v["body"]["extra"] = serde_json::json!(1);
        let err = CapabilityRegistration::from_json(v.to_string().as_bytes()).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
        let mut v: serde_json::Value =
            serde_json::from_str(&reg.to_json_pretty().unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("signature");
        let err = CapabilityRegistration::from_json(v.to_string().as_bytes()).unwrap_err();
        assert!(err.to_string().starts_with("signature:"), "{err}");
    }
}
