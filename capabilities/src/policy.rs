//! The gateway's acceptance policy for capabilities and their commission terms.
//!
//! [`AcceptancePolicy::check`] takes a manifest and the registration offered for it (if
//! any) and returns the [`AcceptedTerms`] a gateway settles by, or a typed [`Refusal`]. The
//! checks, in order:
//!
//! 1. the manifest is valid;
//! 2. its CID is in `accepted_manifest_cids` (when that list is set);
//! 3. a registration is present when `require_capability_registration`;
//! 4. the registration is for exactly this manifest CID (a new version or a fork needs its
//!    own registration) and its terms are valid and agree with the manifest;
//! 5. it is signed when `require_signed_capability_registration`, and a signature present
//!    always verifies (signer = the body's publisher, domain-separated);
//! 6. with `trusted_namespaces` set, the namespace is listed and the registration is signed
//!    by one of its keys (a manifest alone proves no publisher, so it is refused there);
//! 7. the commission is at most `max_creator_commission_bps`;
//! 8. a commission above zero needs a rail that can split it and a creator wallet on the
//!    chain of the gateway's rail.
//!
//! Without a registration (when none is required) the terms are zero commission.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use d402_protocol::{CapabilityRef, Chain, Cid, PublicKey, RailKind};

use crate::{
    commission::{self, BPS_DENOMINATOR, Split},
    error::{CapabilityError, Result},
    manifest::Manifest,
    registration::CapabilityRegistration,
};

/// What a gateway accepts. Serializable so that it can come from a config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceptancePolicy {
    /// Manifest CIDs the gateway sells; `None` accepts any CID that passes the other checks.
    #[serde(default)]
    pub accepted_manifest_cids: Option<BTreeSet<Cid>>,
    /// Namespace → publisher keys trusted for it; `None` trusts any namespace.
    #[serde(default)]
    pub trusted_namespaces: Option<BTreeMap<String, BTreeSet<PublicKey>>>,
    /// Refuse a manifest offered without a registration.
    pub require_capability_registration: bool,
    /// Refuse an unsigned registration.
    pub require_signed_capability_registration: bool,
    /// Largest creator commission accepted, in basis points.
    pub max_creator_commission_bps: u16,
    /// The rail the gateway settles on.
    pub rail: RailKind,
}

/// Terms a gateway settles an accepted capability by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedTerms {
    /// The exact manifest accepted.
    pub manifest_cid: Cid,
    /// Its `id@version`.
    pub capability: CapabilityRef,
    /// The registration the terms come from, if any.
    pub registration_cid: Option<Cid>,
    /// The verified publisher; `None` for no registration or an unsigned one.
    pub publisher: Option<PublicKey>,
    /// Creator commission in basis points (0 without a registration).
    pub creator_commission_bps: u16,
    /// The creator's wallet on the rail's chain; `Some` whenever the commission is above 0.
    pub creator_wallet: Option<String>,
    /// The rail the terms were checked for.
    pub rail: RailKind,
}

impl AcceptedTerms {
    /// Splits a gross worker payout by these terms.
    pub fn split(&self, gross: u64) -> Split {
        // The bps was checked against 10000 when the terms were accepted.
        commission::split(gross, self.creator_commission_bps).unwrap_or(Split {
            creator: 0,
            worker_net: gross,
        })
    }
}

/// Why a gateway refuses a capability. [`Refusal::code`] is the stable JSON error code.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refusal {
    /// The manifest itself breaks a rule.
    #[error("invalid manifest: {0}")]
    InvalidManifest(String),
    /// The manifest CID is not on the gateway's list.
    #[error("manifest {cid} is not an accepted manifest CID")]
    UnknownManifestCid {
        /// The manifest's CID.
        cid: Cid,
    },
    /// No registration was offered and one is required.
    #[error("manifest {cid} has no capability registration and this gateway requires one")]
    RegistrationMissing {
        /// The manifest's CID.
        cid: Cid,
    },
    /// The registration names another manifest (another version, a fork, an edit).
    #[error(
        "the registration is for manifest {registered}, not {manifest}: terms apply only to the \
         exact manifest CID"
    )]
    RegistrationForOtherManifest {
        /// The manifest's CID.
        manifest: Box<Cid>,
        /// The CID the registration names.
        registered: Box<Cid>,
    },
    /// The registration's terms break a rule or disagree with the manifest.
    #[error("invalid registration: {0}")]
    InvalidRegistration(String),
    /// The registration is unsigned and the gateway requires a signature.
    #[error("the registration is unsigned and this gateway requires signed registrations")]
    Unsigned,
    /// The signature does not verify.
    #[error("the registration's signature is invalid: {0}")]
    SignatureInvalid(String),
    /// The namespace is not on the gateway's trusted list.
    #[error("namespace {namespace:?} is not trusted by this gateway")]
    UntrustedNamespace {
        /// The manifest's namespace.
        namespace: String,
    },
    /// The namespace is trusted, but not for this publisher (or no signature proves one).
    #[error("{}", match publisher {
        Some(p) => format!("publisher {p} is not trusted for namespace {namespace:?}"),
        None => format!("no signed registration proves a trusted publisher for namespace {namespace:?}"),
    })]
    UntrustedPublisher {
        /// The manifest's namespace.
        namespace: String,
        /// The verified publisher, if any.
        publisher: Option<PublicKey>,
    },
    /// The commission is above the gateway's cap.
    #[error("creator commission {bps} bps is above this gateway's cap of {cap} bps")]
    CommissionAboveCap {
        /// The registration's commission.
        bps: u16,
        /// The gateway's cap.
        cap: u16,
    },
    /// The rail cannot split a payout, and the terms carry a commission.
    #[error(
        "rail {rail} pays the provider directly and cannot split a {bps} bps creator \
         commission; use a split-settlement rail"
    )]
    RailCannotSplit {
        /// The gateway's rail.
        rail: RailKind,
        /// The registration's commission.
        bps: u16,
    },
    /// The registration has no creator wallet on the rail's chain.
    #[error("the registration has no creator {chain} wallet, needed for rail {rail}")]
    RailWalletMissing {
        /// The gateway's rail.
        rail: RailKind,
        /// The chain a wallet is needed on.
        chain: Chain,
    },
}

impl Refusal {
    /// A stable snake_case code for JSON error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::InvalidManifest(_) => "invalid_manifest",
            Refusal::UnknownManifestCid { .. } => "unknown_manifest_cid",
            Refusal::RegistrationMissing { .. } => "registration_missing",
            Refusal::RegistrationForOtherManifest { .. } => "registration_for_other_manifest",
            Refusal::InvalidRegistration(_) => "invalid_registration",
            Refusal::Unsigned => "registration_unsigned",
            Refusal::SignatureInvalid(_) => "registration_signature_invalid",
            Refusal::UntrustedNamespace { .. } => "untrusted_namespace",
            Refusal::UntrustedPublisher { .. } => "untrusted_publisher",
            Refusal::CommissionAboveCap { .. } => "commission_above_cap",
            Refusal::RailCannotSplit { .. } => "rail_cannot_split_commission",
            Refusal::RailWalletMissing { .. } => "rail_wallet_missing",
        }
    }
}

impl AcceptancePolicy {
    /// The strict default for `rail`: registrations required and signed, any commission up
    /// to 100%, no CID or namespace lists.
    pub fn new(rail: RailKind) -> Self {
        AcceptancePolicy {
            accepted_manifest_cids: None,
            trusted_namespaces: None,
            require_capability_registration: true,
            require_signed_capability_registration: true,
            max_creator_commission_bps: BPS_DENOMINATOR,
            rail,
        }
    }

    /// Checks the policy's own values.
    pub fn validate(&self) -> Result<()> {
        commission::check_bps(self.max_creator_commission_bps).map_err(|_| {
            CapabilityError::invalid(
                "max_creator_commission_bps",
                format!("{} is above 10000", self.max_creator_commission_bps),
            )
        })?;
        if let Some(ns) = &self.trusted_namespaces {
            for (namespace, keys) in ns {
                crate::namespace::validate_namespace("trusted_namespaces", namespace)?;
                if keys.is_empty() {
                    return Err(CapabilityError::invalid(
                        "trusted_namespaces",
                        format!("namespace {namespace:?} lists no publisher key"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks `manifest` with its `registration` for the gateway's own rail.
    pub fn check(
        &self,
        manifest: &Manifest,
        registration: Option<&CapabilityRegistration>,
    ) -> Result<AcceptedTerms, Refusal> {
        self.check_for_rail(manifest, registration, self.rail)
    }

    /// Checks `manifest` with its `registration` for settlement on `rail`.
    pub fn check_for_rail(
        &self,
        manifest: &Manifest,
        registration: Option<&CapabilityRegistration>,
        rail: RailKind,
    ) -> Result<AcceptedTerms, Refusal> {
        manifest
            .validate()
            .map_err(|e| Refusal::InvalidManifest(e.to_string()))?;
        let cid = manifest
            .cid()
            .map_err(|e| Refusal::InvalidManifest(e.to_string()))?;
        if let Some(accepted) = &self.accepted_manifest_cids
            && !accepted.contains(&cid)
        {
            return Err(Refusal::UnknownManifestCid { cid });
        }
        let namespace = manifest.namespace().to_string();

        let Some(reg) = registration else {
            if self.require_capability_registration {
                return Err(Refusal::RegistrationMissing { cid });
            }
            if let Some(trusted) = &self.trusted_namespaces {
                return Err(if trusted.contains_key(&namespace) {
                    Refusal::UntrustedPublisher {
                        namespace,
                        publisher: None,
                    }
                } else {
                    Refusal::UntrustedNamespace { namespace }
                });
            }
            return Ok(AcceptedTerms {
                manifest_cid: cid,
                capability: manifest.capability(),
                registration_cid: None,
                publisher: None,
                creator_commission_bps: 0,
                creator_wallet: None,
                rail,
            });
        };

        let body = reg.body();
        if body.manifest_cid != cid {
            return Err(Refusal::RegistrationForOtherManifest {
                manifest: Box::new(cid),
                registered: Box::new(body.manifest_cid),
            });
        }
        body.validate_terms()
            .and_then(|()| body.check_manifest(manifest))
            .map_err(|e| Refusal::InvalidRegistration(e.to_string()))?;
        let registration_cid = reg
            .cid()
            .map_err(|e| Refusal::InvalidRegistration(e.to_string()))?;

        let publisher = match reg {
            CapabilityRegistration::Signed(s) => {
                reg.verify()
                    .map_err(|e| Refusal::SignatureInvalid(e.to_string()))?;
                Some(s.signer)
            }
            CapabilityRegistration::Unsigned(_) => {
                if self.require_signed_capability_registration {
                    return Err(Refusal::Unsigned);
                }
                reg.verify()
                    .map_err(|e| Refusal::InvalidRegistration(e.to_string()))?;
                None
            }
        };

        if let Some(trusted) = &self.trusted_namespaces {
            let Some(keys) = trusted.get(&namespace) else {
                return Err(Refusal::UntrustedNamespace { namespace });
            };
            if !publisher.is_some_and(|p| keys.contains(&p)) {
                return Err(Refusal::UntrustedPublisher {
                    namespace,
                    publisher,
                });
            }
        }

        let bps = body.creator_commission_bps;
        if bps > self.max_creator_commission_bps {
            return Err(Refusal::CommissionAboveCap {
                bps,
                cap: self.max_creator_commission_bps,
            });
        }
        let creator_wallet = if bps > 0 {
            if !rail.splits_commission() {
                return Err(Refusal::RailCannotSplit { rail, bps });
            }
            let chain = rail.payout_chain();
            let wallet = body
                .creator_wallets
                .get(&chain)
                .ok_or(Refusal::RailWalletMissing { rail, chain })?;
            Some(wallet.clone())
        } else {
            None
        };

        Ok(AcceptedTerms {
            manifest_cid: cid,
            capability: manifest.capability(),
            registration_cid: Some(registration_cid),
            publisher,
            creator_commission_bps: bps,
            creator_wallet,
            rail,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registration::{
        Registration,
        tests::{EVM, SOL, key, manifest, signed, wallets},
    };
    use d402_protocol::Signed;

    fn pk(n: u8) -> PublicKey {
        PublicKey::from(key(n).verifying_key())
    }

    fn policy() -> AcceptancePolicy {
        AcceptancePolicy {
            max_creator_commission_bps: 2000,
            ..AcceptancePolicy::new(RailKind::SolanaTaskEscrow)
        }
    }

    #[test]
    fn accepts_signed_terms_and_reports_them() {
        let m = manifest();
        let reg = signed(1000);
        let mut p = policy();
        p.accepted_manifest_cids = Some([m.cid().unwrap()].into());
        p.trusted_namespaces = Some([("example".to_string(), [pk(1)].into())].into());
        p.validate().unwrap();
        let terms = p.check(&m, Some(&reg)).unwrap();
        assert_eq!(terms.manifest_cid, m.cid().unwrap());
        assert_eq!(terms.registration_cid, Some(reg.cid().unwrap()));
        assert_eq!(terms.publisher, Some(pk(1)));
        assert_eq!(terms.creator_commission_bps, 1000);
        assert_eq!(terms.creator_wallet.as_deref(), Some(SOL));
        assert_eq!(terms.split(1_000_000).creator, 100_000);
        // On an EVM rail the EVM wallet is used.
        let terms = p
            .check_for_rail(&m, Some(&reg), RailKind::BaseTaskEscrow)
            .unwrap();
        assert_eq!(terms.creator_wallet.as_deref(), Some(EVM));
    }

    #[test]
    fn refuses_invalid_manifest() {
        let mut m = manifest();
        m.limits.fuel = 0;
        let r = policy().check(&m, None).unwrap_err();
        assert!(matches!(r, Refusal::InvalidManifest(_)), "{r}");
        assert!(r.to_string().contains("limits.fuel"), "{r}");
    }

    #[test]
    fn refuses_unknown_cid() {
        let mut p = policy();
        p.accepted_manifest_cids = Some([Cid::dag_cbor(b"another")].into());
        let r = p.check(&manifest(), Some(&signed(1000))).unwrap_err();
        assert_eq!(r.code(), "unknown_manifest_cid");
        assert!(matches!(r, Refusal::UnknownManifestCid { .. }));
    }

    #[test]
    fn refuses_missing_registration_when_required() {
        let r = policy().check(&manifest(), None).unwrap_err();
        assert!(matches!(r, Refusal::RegistrationMissing { .. }), "{r}");
        // Not required: accepted with no commission.
        let mut p = policy();
        p.require_capability_registration = false;
        let terms = p.check(&manifest(), None).unwrap();
        assert_eq!(terms.creator_commission_bps, 0);
        assert_eq!(terms.registration_cid, None);
    }

    #[test]
    fn refuses_registration_for_another_manifest() {
        // A new version of the manifest: same id, version 2, no registration of its own.
        let mut v2 = manifest();
        v2.version = 2;
        let r = policy().check(&v2, Some(&signed(1000))).unwrap_err();
        assert!(
            matches!(r, Refusal::RegistrationForOtherManifest { .. }),
            "{r}"
        );
        // A fork: another namespace, same module.
        let mut fork = manifest();
        fork.id = "forker.extract_product".into();
        let r = policy().check(&fork, Some(&signed(1000))).unwrap_err();
        assert_eq!(r.code(), "registration_for_other_manifest");
        // An edit of the limits is another manifest too.
        let mut edited = manifest();
        edited.limits.fuel += 1;
        let r = policy().check(&edited, Some(&signed(1000))).unwrap_err();
        assert_eq!(r.code(), "registration_for_other_manifest");
    }

    #[test]
    fn refuses_invalid_terms() {
        let m = manifest();
        let mut body = Registration::for_manifest(&m, 1000, wallets(), None, 1).unwrap();
        body.creator_commission_bps = 10_001;
        let reg = CapabilityRegistration::Unsigned(body);
        let r = policy().check(&m, Some(&reg)).unwrap_err();
        assert!(matches!(r, Refusal::InvalidRegistration(_)), "{r}");
    }

    #[test]
    fn refuses_unsigned_when_signature_required_and_accepts_it_otherwise() {
        let m = manifest();
        let body = Registration::for_manifest(&m, 1000, wallets(), None, 1).unwrap();
        let reg = CapabilityRegistration::unsigned(body).unwrap();
        let r = policy().check(&m, Some(&reg)).unwrap_err();
        assert_eq!(r, Refusal::Unsigned);
        let mut p = policy();
        p.require_signed_capability_registration = false;
        let terms = p.check(&m, Some(&reg)).unwrap();
        assert_eq!(terms.publisher, None);
        assert_eq!(terms.creator_commission_bps, 1000);
        assert_eq!(terms.creator_wallet.as_deref(), Some(SOL));
        // But a trusted-namespace list needs a signature to prove the publisher.
        p.trusted_namespaces = Some([("example".to_string(), [pk(1)].into())].into());
        let r = p.check(&m, Some(&reg)).unwrap_err();
        assert!(
            matches!(
                r,
                Refusal::UntrustedPublisher {
                    publisher: None,
                    ..
                }
            ),
            "{r}"
        );
    }

    #[test]
    fn refuses_bad_signature() {
        let m = manifest();
        let CapabilityRegistration::Signed(mut s) = signed(1000) else {
            unreachable!()
        };
        // Lower the commission after signing: CID changes, signature breaks.
        s.body.creator_commission_bps = 500;
        let r = policy()
            .check(&m, Some(&CapabilityRegistration::Signed(s.clone())))
            .unwrap_err();
        assert!(matches!(r, Refusal::SignatureInvalid(_)), "{r}");
        // Signed by a key other than the named publisher.
        let resigned = Signed::sign(s.body.clone(), &key(2)).unwrap();
        s.signature = resigned.signature;
        s.signer = resigned.signer;
        let r = policy()
            .check(&m, Some(&CapabilityRegistration::Signed(s)))
            .unwrap_err();
        assert_eq!(r.code(), "registration_signature_invalid");
    }

    #[test]
    fn refuses_untrusted_namespace_and_publisher() {
        let m = manifest();
        let mut p = policy();
        p.trusted_namespaces = Some([("web".to_string(), [pk(1)].into())].into());
        let r = p.check(&m, Some(&signed(1000))).unwrap_err();
        assert_eq!(
            r,
            Refusal::UntrustedNamespace {
                namespace: "example".into()
            }
        );
        p.trusted_namespaces = Some([("example".to_string(), [pk(3)].into())].into());
        let r = p.check(&m, Some(&signed(1000))).unwrap_err();
        assert_eq!(
            r,
            Refusal::UntrustedPublisher {
                namespace: "example".into(),
                publisher: Some(pk(1))
            }
        );
        // Without a registration (not required), a trusted list still refuses.
        p.require_capability_registration = false;
        let r = p.check(&m, None).unwrap_err();
        assert_eq!(r.code(), "untrusted_publisher");
        p.trusted_namespaces = Some(BTreeMap::new());
        let r = p.check(&m, None).unwrap_err();
        assert_eq!(r.code(), "untrusted_namespace");
    }

    #[test]
    fn refuses_commission_above_cap() {
        let r = policy()
            .check(&manifest(), Some(&signed(2001)))
            .unwrap_err();
        assert_eq!(
            r,
            Refusal::CommissionAboveCap {
                bps: 2001,
                cap: 2000
            }
        );
        // At the cap is fine.
        policy().check(&manifest(), Some(&signed(2000))).unwrap();
    }

    #[test]
    fn refuses_missing_rail_wallet() {
        let m = manifest();
        let only_evm = [(Chain::Evm, EVM.to_string())].into_iter().collect();
        let body = Registration::for_manifest(&m, 1000, only_evm, None, 1).unwrap();
        let reg = CapabilityRegistration::sign(body, &key(1)).unwrap();
        let r = policy().check(&m, Some(&reg)).unwrap_err();
        assert_eq!(
            r,
            Refusal::RailWalletMissing {
                rail: RailKind::SolanaTaskEscrow,
                chain: Chain::Solana
            }
        );
        // The local rail needs a local wallet.
        let r = policy()
            .check_for_rail(&m, Some(&signed(1000)), RailKind::Local)
            .unwrap_err();
        assert_eq!(r.code(), "rail_wallet_missing");
        // The EVM rail is fine with it.
        policy()
            .check_for_rail(&m, Some(&reg), RailKind::BaseTaskEscrow)
            .unwrap();
    }

    #[test]
    fn refuses_commission_on_rail_that_cannot_split() {
        let m = manifest();
        let r = policy()
            .check_for_rail(&m, Some(&signed(1000)), RailKind::SolanaDirect)
            .unwrap_err();
        assert_eq!(
            r,
            Refusal::RailCannotSplit {
                rail: RailKind::SolanaDirect,
                bps: 1000
            }
        );
        // A zero-commission registration is fine on solana-direct, with no wallet needed.
        let body = Registration::for_manifest(&m, 0, Default::default(), None, 1).unwrap();
        let reg = CapabilityRegistration::sign(body, &key(1)).unwrap();
        let terms = policy()
            .check_for_rail(&m, Some(&reg), RailKind::SolanaDirect)
            .unwrap();
        assert_eq!(terms.creator_wallet, None);
    }

    #[test]
    fn policy_validates_itself_and_reads_json() {
        let mut p = policy();
        p.max_creator_commission_bps = 10_001;
        assert!(p.validate().is_err());
        let json = r#"{
            "accepted_manifest_cids": null,
            "require_capability_registration": true,
            "require_signed_capability_registration": false,
            "max_creator_commission_bps": 2000,
            "rail": "base-task-escrow"
        }"#;
        let p: AcceptancePolicy = serde_json::from_str(json).unwrap();
        p.validate().unwrap();
        assert_eq!(p.rail, RailKind::BaseTaskEscrow);
        assert!(serde_json::from_str::<AcceptancePolicy>(r#"{"bogus": 1}"#).is_err());
    }
}
