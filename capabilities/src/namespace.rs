//! Namespace ownership: the first publisher key that registers a namespace owns it.
//!
//! Ownership is hierarchical: a key that owns `example` also holds `example.shop`, and a
//! key that owns `example.shop` blocks another key from taking `example`. So no other key
//! can register a capability that reads as if it came from the owner (forks register under
//! a namespace of their own).
//!
//! The registry is pure data; whoever holds it (the node's capability store) persists it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use d402_protocol::PublicKey;

use crate::{
    error::{CapabilityError, Result},
    registration::CapabilityRegistration,
};

/// Longest namespace accepted.
pub const MAX_NAMESPACE: usize = 96;

/// Checks namespace syntax: dot-separated segments of `a-z`, `0-9` and `_`, each starting
/// with a letter (the capability id rules, without the final name).
pub fn validate_namespace(field: &str, namespace: &str) -> Result<()> {
    if namespace.is_empty() {
        return Err(CapabilityError::invalid(field, "namespace is empty"));
    }
    if namespace.len() > MAX_NAMESPACE {
        return Err(CapabilityError::invalid(
            field,
            format!("namespace is longer than {MAX_NAMESPACE} bytes"),
        ));
    }
    for seg in namespace.split('.') {
        let mut chars = seg.chars();
        let ok_start = chars.next().is_some_and(|c| c.is_ascii_lowercase());
        let ok_rest = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !ok_start || !ok_rest {
            return Err(CapabilityError::invalid(
                field,
                format!(
                    "segment {seg:?} of namespace {namespace:?} must start with a-z and contain \
                     only a-z, 0-9 and _"
                ),
            ));
        }
    }
    Ok(())
}

/// Whether `a` and `b` are the same namespace or one contains the other.
fn overlaps(a: &str, b: &str) -> bool {
    fn within(child: &str, parent: &str) -> bool {
        child == parent
            || (child.len() > parent.len()
                && child.starts_with(parent)
                && child.as_bytes()[parent.len()] == b'.')
    }
    within(a, b) || within(b, a)
}

/// Namespace → owning publisher key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceRegistry {
    /// Each owned namespace and its owner.
    pub owners: BTreeMap<String, PublicKey>,
}

/// What a successful claim did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The namespace was free and now belongs to the key.
    New,
    /// The key already owned it (or a parent of it).
    AlreadyOwned,
}

impl NamespaceRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The owner of exactly `namespace`, if it is registered.
    pub fn owner(&self, namespace: &str) -> Option<&PublicKey> {
        self.owners.get(namespace)
    }

    /// An owned namespace that is `namespace`, a parent or a child of it, with its owner.
    pub fn overlapping_owner(&self, namespace: &str) -> Option<(&String, &PublicKey)> {
        self.owners
            .iter()
            .find(|(owned, _)| overlaps(owned, namespace))
    }

    /// Checks that `key` may register `namespace`: no other key owns it, a parent of it or
    /// a child of it.
    pub fn check(&self, namespace: &str, key: &PublicKey) -> Result<Claim> {
        validate_namespace("namespace", namespace)?;
        let mut covered = false;
        for (owned, owner) in &self.owners {
            if !overlaps(owned, namespace) {
                continue;
            }
            if owner != key {
                return Err(CapabilityError::NamespaceOwned {
                    namespace: namespace.to_string(),
                    owned: owned.clone(),
                    owner: *owner,
                    requested: *key,
                });
            }
            // The key owns this namespace itself or a parent of it.
            if namespace == owned || namespace.starts_with(&format!("{owned}.")) {
                covered = true;
            }
        }
        Ok(if covered {
            Claim::AlreadyOwned
        } else {
            Claim::New
        })
    }

    /// Registers `namespace` to `key` unless another key owns it, a parent or a child.
    pub fn claim(&mut self, namespace: &str, key: &PublicKey) -> Result<Claim> {
        let claim = self.check(namespace, key)?;
        if claim == Claim::New {
            self.owners.insert(namespace.to_string(), *key);
        }
        Ok(claim)
    }

    /// Claims the namespace of a signed registration for its verified publisher. Unsigned
    /// registrations cannot own a namespace.
    pub fn register(&mut self, registration: &CapabilityRegistration) -> Result<Claim> {
        let publisher = self.check_registration(registration)?;
        self.claim(&registration.body().namespace, &publisher)
    }

    /// Checks, without changing anything, that [`Self::register`] would succeed, and returns
    /// the verified publisher.
    pub fn check_registration(&self, registration: &CapabilityRegistration) -> Result<PublicKey> {
        registration.verify()?;
        let publisher = registration.verified_publisher().ok_or_else(|| {
            CapabilityError::Signature("an unsigned registration cannot own a namespace".into())
        })?;
        self.check(&registration.body().namespace, &publisher)?;
        Ok(publisher)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registration::{
        CapabilityRegistration, Registration,
        tests::{key, manifest, signed, wallets},
    };

    fn pk(n: u8) -> PublicKey {
        PublicKey::from(key(n).verifying_key())
    }

    #[test]
    fn first_key_owns_and_others_are_refused() {
        let mut r = NamespaceRegistry::new();
        assert_eq!(r.claim("example", &pk(1)).unwrap(), Claim::New);
        assert_eq!(r.claim("example", &pk(1)).unwrap(), Claim::AlreadyOwned);
        let err = r.claim("example", &pk(2)).unwrap_err();
        assert!(
            matches!(err, CapabilityError::NamespaceOwned { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("owned by publisher"), "{err}");
        assert_eq!(r.owner("example"), Some(&pk(1)));
        assert_eq!(
            r.overlapping_owner("example.shop"),
            Some((&"example".to_string(), &pk(1)))
        );
        assert_eq!(r.overlapping_owner("examples"), None);
        // A fork goes under its own namespace.
        assert_eq!(r.claim("forker", &pk(2)).unwrap(), Claim::New);
    }

    #[test]
    fn ownership_is_hierarchical() {
        let mut r = NamespaceRegistry::new();
        r.claim("example", &pk(1)).unwrap();
        // The owner holds children; nobody else may take one.
        assert_eq!(
            r.claim("example.shop", &pk(1)).unwrap(),
            Claim::AlreadyOwned
        );
        assert!(r.claim("example.shop", &pk(2)).is_err());
        // A name that merely shares a prefix is a different namespace.
        assert_eq!(r.claim("examples", &pk(2)).unwrap(), Claim::New);
        // A child owned by one key blocks another key from the parent.
        let mut r = NamespaceRegistry::new();
        r.claim("acme.tools", &pk(1)).unwrap();
        assert!(r.claim("acme", &pk(2)).is_err());
        assert_eq!(r.claim("acme", &pk(1)).unwrap(), Claim::New);
    }

    #[test]
    fn registrations_claim_for_their_verified_publisher() {
        let mut r = NamespaceRegistry::new();
        let reg = signed(1000);
        assert_eq!(r.register(&reg).unwrap(), Claim::New);
        assert_eq!(r.owner("example"), Some(&pk(1)));
        // Another key's registration in the same namespace is refused.
        let body = Registration::for_manifest(&manifest(), 100, wallets(), None, 2).unwrap();
        let other = CapabilityRegistration::sign(body.clone(), &key(2)).unwrap();
        assert!(matches!(
            r.register(&other),
            Err(CapabilityError::NamespaceOwned { .. })
        ));
        // Unsigned registrations own nothing.
        let unsigned = CapabilityRegistration::unsigned(body).unwrap();
        assert!(matches!(
            NamespaceRegistry::new().register(&unsigned),
            Err(CapabilityError::Signature(_))
        ));
    }

    #[test]
    fn namespace_syntax() {
        for ok in ["example", "a.b", "web_2"] {
            validate_namespace("namespace", ok).unwrap();
        }
        for bad in ["", "Example", "a..b", "1a", "a-b", ".a", "a."] {
            assert!(validate_namespace("namespace", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn json_round_trip() {
        let mut r = NamespaceRegistry::new();
        r.claim("example", &pk(1)).unwrap();
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<NamespaceRegistry>(&json).unwrap(), r);
    }
}
