//! Ed25519 public keys and signatures as they appear on the wire.
//!
//! In CBOR both are byte strings (32 and 64 bytes); in JSON a public key is base58 (the form
//! Solana and libp2p users know) and a signature is hex.

use std::{
    collections::HashMap,
    fmt,
    str::FromStr,
    sync::{Mutex, MutexGuard, OnceLock},
};

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

use crate::error::{ProtocolError, Result};

/// An ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

/// An ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

/// Decompressed keys kept by [`PublicKey::verifying_key`]: a node verifies the same few
/// peers' signatures over and over, and decompressing a point is a fifth of a verification.
const KEY_CACHE_CAP: usize = 1024;

fn key_cache() -> MutexGuard<'static, HashMap<[u8; 32], VerifyingKey>> {
    static CACHE: OnceLock<Mutex<HashMap<[u8; 32], VerifyingKey>>> = OnceLock::new();
    CACHE
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

impl PublicKey {
    /// The dalek verifying key, refusing bytes that are not a valid point. Valid keys are
    /// cached (up to [`KEY_CACHE_CAP`] of them; the cache is emptied when full).
    pub fn verifying_key(&self) -> Result<VerifyingKey> {
        if let Some(k) = key_cache().get(&self.0) {
            return Ok(*k);
        }
        let key = VerifyingKey::from_bytes(&self.0).map_err(|_| ProtocolError::InvalidPublicKey)?;
        let mut cache = key_cache();
        if cache.len() >= KEY_CACHE_CAP {
            cache.clear();
        }
        cache.insert(self.0, key);
        Ok(key)
    }
}

impl From<VerifyingKey> for PublicKey {
    fn from(key: VerifyingKey) -> Self {
        PublicKey(key.to_bytes())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&bs58::encode(self.0).into_string())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = ProtocolError;
    fn from_str(s: &str) -> Result<Self> {
        let mut out = [0u8; 32];
        let n = bs58::decode(s)
            .onto(&mut out)
            .map_err(|_| ProtocolError::InvalidPublicKey)?;
        if n != 32 {
            return Err(ProtocolError::InvalidPublicKey);
        }
        Ok(PublicKey(out))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({})", hex::encode(self.0))
    }
}

fn fixed<const N: usize>(bytes: &[u8]) -> Option<[u8; N]> {
    bytes.try_into().ok()
}

macro_rules! bytes_serde {
    ($ty:ident, $n:literal, $to_text:expr, $from_text:expr) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.serialize_str(&$to_text(self))
                } else {
                    s.serialize_bytes(&self.0)
                }
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                if d.is_human_readable() {
                    let text = String::deserialize(d)?;
                    $from_text(&text).map_err(de::Error::custom)
                } else {
                    let bytes = serde_bytes::ByteBuf::deserialize(d)?;
                    fixed::<$n>(&bytes).map($ty).ok_or_else(|| {
                        de::Error::custom(concat!(stringify!($ty), " must be ", $n, " bytes"))
                    })
                }
            }
        }
    };
}

bytes_serde!(PublicKey, 32, |k: &PublicKey| k.to_string(), |t: &str| {
    t.parse::<PublicKey>()
});
bytes_serde!(
    Signature,
    64,
    |s: &Signature| hex::encode(s.0),
    |t: &str| -> Result<Signature> {
        let bytes = hex::decode(t).map_err(|e| ProtocolError::field("signature", e.to_string()))?;
        fixed::<64>(&bytes)
            .map(Signature)
            .ok_or_else(|| ProtocolError::field("signature", "must be 64 bytes"))
    }
);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use ed25519_dalek::SigningKey;

    use super::*;

    #[test]
    fn verifying_keys_are_cached_and_invalid_points_refused_every_time() {
        let key = SigningKey::from_bytes(&[7u8; 32]).verifying_key();
        let pk = PublicKey::from(key);
        assert_eq!(pk.verifying_key().unwrap(), key);
        assert!(key_cache().contains_key(&pk.0));
        assert_eq!(pk.verifying_key().unwrap(), key);
        // Not a point on the curve (y = 2 has no x).
        let mut bad = [0u8; 32];
        bad[0] = 2;
        for _ in 0..2 {
            assert!(matches!(
                PublicKey(bad).verifying_key(),
                Err(ProtocolError::InvalidPublicKey)
            ));
        }
        assert!(!key_cache().contains_key(&bad));
    }
}
