//! Ed25519 public keys and signatures as they appear on the wire.
//!
//! In CBOR both are byte strings (32 and 64 bytes); in JSON a public key is base58 (the form
//! Solana and libp2p users know) and a signature is hex.

use std::{fmt, str::FromStr};

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

use crate::error::{ProtocolError, Result};

/// An ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

/// An ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

impl PublicKey {
    /// The dalek verifying key, refusing bytes that are not a valid point.
    pub fn verifying_key(&self) -> Result<VerifyingKey> {
        VerifyingKey::from_bytes(&self.0).map_err(|_| ProtocolError::InvalidPublicKey)
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
