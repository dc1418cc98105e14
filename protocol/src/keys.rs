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

/// A decompressed key and whether it is of small order ("weak": it verifies signatures on
/// almost any message, so [`PublicKey::verify_strict`] refuses it).
#[derive(Clone, Copy)]
struct CachedKey {
    key: VerifyingKey,
    weak: bool,
}

fn key_cache() -> MutexGuard<'static, HashMap<[u8; 32], CachedKey>> {
    static CACHE: OnceLock<Mutex<HashMap<[u8; 32], CachedKey>>> = OnceLock::new();
    CACHE
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// The y coordinates (little-endian, sign bit cleared) of every encoding of a point of small
/// order: 0 and 1, p − 1, the two order-8 values, and the non-canonical p and p + 1 (which
/// decode as 0 and 1). Checked against curve25519-dalek's torsion points in the tests.
const SMALL_ORDER_Y: [[u8; 32]; 7] = [
    [0; 32],
    {
        let mut y = [0; 32];
        y[0] = 1;
        y
    },
    near_p(0xec),
    [
        0x26, 0xe8, 0x95, 0x8f, 0xc2, 0xb2, 0x27, 0xb0, 0x45, 0xc3, 0xf4, 0x89, 0xf2, 0xef, 0x98,
        0xf0, 0xd5, 0xdf, 0xac, 0x05, 0xd3, 0xc6, 0x33, 0x39, 0xb1, 0x38, 0x02, 0x88, 0x6d, 0x53,
        0xfc, 0x05,
    ],
    [
        0xc7, 0x17, 0x6a, 0x70, 0x3d, 0x4d, 0xd8, 0x4f, 0xba, 0x3c, 0x0b, 0x76, 0x0d, 0x10, 0x67,
        0x0f, 0x2a, 0x20, 0x53, 0xfa, 0x2c, 0x39, 0xcc, 0xc6, 0x4e, 0xc7, 0xfd, 0x77, 0x92, 0xac,
        0x03, 0x7a,
    ],
    near_p(0xed),
    near_p(0xee),
];

/// p − 1, p or p + 1 (p = 2^255 − 19) in little-endian, by its lowest byte.
const fn near_p(low: u8) -> [u8; 32] {
    let mut y = [0xff; 32];
    y[0] = low;
    y[31] = 0x7f;
    y
}

/// Whether the 32 bytes encode a point of small order (with either sign bit).
fn is_small_order_encoding(bytes: &[u8; 32]) -> bool {
    let mut y = *bytes;
    y[31] &= 0x7f;
    SMALL_ORDER_Y.contains(&y)
}

impl PublicKey {
    /// The dalek verifying key, refusing bytes that are not a valid point. Valid keys are
    /// cached (up to [`KEY_CACHE_CAP`] of them; the cache is emptied when full).
    pub fn verifying_key(&self) -> Result<VerifyingKey> {
        Ok(self.cached()?.key)
    }

    fn cached(&self) -> Result<CachedKey> {
        if let Some(k) = key_cache().get(&self.0) {
            return Ok(*k);
        }
        let key = VerifyingKey::from_bytes(&self.0).map_err(|_| ProtocolError::InvalidPublicKey)?;
        let entry = CachedKey {
            key,
            weak: key.is_weak(),
        };
        let mut cache = key_cache();
        if cache.len() >= KEY_CACHE_CAP {
            cache.clear();
        }
        cache.insert(self.0, entry);
        Ok(entry)
    }

    /// Whether `signature` is this key's over the concatenation of `message` — exactly
    /// ed25519-dalek's `verify_strict`: the signature's `s` must be canonical, its `R` and
    /// the key must not be of small order, and `R` must equal the recomputed commitment.
    ///
    /// It costs one decompression less than `verify_strict`. `verify_strict` decompresses
    /// `R` to test its order and then compares `R`'s *bytes* with the recomputed
    /// commitment's canonical encoding; so only a canonical encoding can pass, and the
    /// canonical encodings of the eight small-order points are known constants. Testing
    /// the bytes against them (and the key's order once per cached key), then running the
    /// same commitment check as `verify_strict` (dalek's `verify`), accepts and refuses the
    /// same signatures (tested against `verify_strict`, including crafted small-order `R`
    /// and weak keys). The message comes in parts so that domain, context and body need
    /// not be copied into one buffer.
    ///
    /// Errors only when the key's bytes are not a point ([`ProtocolError::InvalidPublicKey`]);
    /// a signature that does not verify is `Ok(false)`.
    pub fn verify_strict(&self, message: &[&[u8]], signature: &Signature) -> Result<bool> {
        use ed25519_dalek::ed25519::signature::MultipartVerifier;
        let CachedKey { key, weak } = self.cached()?;
        let r: &[u8; 32] = signature.0[..32].try_into().unwrap_or(&[0; 32]);
        if weak || is_small_order_encoding(r) {
            return Ok(false);
        }
        let sig = ed25519_dalek::Signature::from_bytes(&signature.0);
        Ok(key.multipart_verify(message, &sig).is_ok())
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

    use curve25519_dalek::{
        edwards::{CompressedEdwardsY, EdwardsPoint},
        scalar::Scalar,
        traits::IsIdentity,
    };
    use ed25519_dalek::{Signer, Verifier};
    use sha2::Digest;

    /// All eight points of small order: the multiples of an order-8 point.
    fn torsion() -> Vec<EdwardsPoint> {
        let p8 = CompressedEdwardsY(SMALL_ORDER_Y[3]).decompress().unwrap();
        assert!(!(p8 * Scalar::from(4u64)).is_identity(), "of order 8");
        (0u64..8).map(|k| p8 * Scalar::from(k)).collect()
    }

    #[test]
    fn the_small_order_list_holds_every_encoding_of_a_small_order_point_and_nothing_else() {
        let points = torsion();
        let mut seen: Vec<[u8; 32]> = points.iter().map(|p| p.compress().0).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 8, "eight distinct points");
        for p in &points {
            assert!(p.is_small_order());
            let mut enc = p.compress().0;
            assert!(is_small_order_encoding(&enc));
            enc[31] ^= 0x80;
            assert!(is_small_order_encoding(&enc), "either sign bit");
        }
        for y in SMALL_ORDER_Y {
            for sign in [0u8, 0x80] {
                let mut enc = y;
                enc[31] |= sign;
                if let Some(p) = CompressedEdwardsY(enc).decompress() {
                    assert!(
                        p.is_small_order(),
                        "{enc:?} decodes to a point of large order"
                    );
                }
            }
        }
        // A point of large order is not in the list.
        let b = EdwardsPoint::mul_base(&Scalar::from(5u64)).compress().0;
        assert!(!is_small_order_encoding(&b));
    }

    fn k_of(r: &[u8; 32], a: &[u8; 32], msg: &[u8]) -> Scalar {
        let h = sha2::Sha512::new()
            .chain_update(r)
            .chain_update(a)
            .chain_update(msg)
            .finalize();
        Scalar::from_bytes_mod_order_wide(&h.into())
    }

    fn sig_of(r: [u8; 32], s: Scalar) -> Signature {
        let mut out = [0u8; 64];
        out[..32].copy_from_slice(&r);
        out[32..].copy_from_slice(s.as_bytes());
        Signature(out)
    }

    /// Ours, dalek's `verify_strict` and dalek's `verify` on one signature.
    fn verdicts(key: &[u8; 32], msg: &[u8], sig: &Signature) -> (bool, bool, bool) {
        let pk = PublicKey(*key);
        let dalek = VerifyingKey::from_bytes(key).unwrap();
        let ds = ed25519_dalek::Signature::from_bytes(&sig.0);
        // In two parts, to check that the parts are concatenated.
        let (m1, m2) = msg.split_at(msg.len() / 2);
        (
            pk.verify_strict(&[m1, m2], sig).unwrap(),
            dalek.verify_strict(msg, &ds).is_ok(),
            dalek.verify(msg, &ds).is_ok(),
        )
    }

    #[test]
    fn verify_strict_agrees_with_dalek_on_good_and_damaged_signatures() {
        for seed in 0u8..16 {
            let sk = SigningKey::from_bytes(&[seed; 32]);
            let key = sk.verifying_key().to_bytes();
            let msg: Vec<u8> = (0..(seed as usize * 37)).map(|i| i as u8 ^ seed).collect();
            let good = Signature(sk.sign(&msg).to_bytes());
            assert_eq!(verdicts(&key, &msg, &good), (true, true, true));
            for bit in (0..512).step_by(7) {
                let mut bad = good;
                bad.0[bit / 8] ^= 1 << (bit % 8);
                let (ours, strict, _) = verdicts(&key, &msg, &bad);
                assert_eq!(ours, strict, "bit {bit} of the signature");
                assert!(!ours);
            }
            if !msg.is_empty() {
                let mut other = msg.clone();
                other[0] ^= 1;
                assert_eq!(verdicts(&key, &other, &good), (false, false, false));
            }
        }
    }

    #[test]
    fn verify_strict_refuses_a_small_order_commitment_that_plain_verify_accepts() {
        let sk = SigningKey::from_bytes(&[9u8; 32]);
        let a = sk.to_scalar();
        // The identity as R: s = k·a balances the equation for the key a·B.
        let key = sk.verifying_key().to_bytes();
        let r = EdwardsPoint::default().compress().0;
        let msg = b"identity commitment";
        let sig = sig_of(r, k_of(&r, &key, msg) * a);
        assert_eq!(verdicts(&key, msg, &sig), (false, false, true));

        // An order-8 R, with the key a·B + T (T of order 8, so the key is not weak): for
        // s = k·a, R must equal −k·T, which holds for about one message in eight.
        let t = torsion()[1];
        let mixed = EdwardsPoint::mul_base(&a) + t;
        let mixed_key = mixed.compress().0;
        assert!(!VerifyingKey::from_bytes(&mixed_key).unwrap().is_weak());
        let mut found = 0;
        for n in 0u32..400 {
            let msg = n.to_le_bytes();
            for r_point in torsion() {
                let r = r_point.compress().0;
                let k = k_of(&r, &mixed_key, &msg);
                if -(t * k) == r_point && !r_point.is_identity() {
                    let sig = sig_of(r, k * a);
                    assert_eq!(verdicts(&mixed_key, &msg, &sig), (false, false, true));
                    found += 1;
                }
            }
        }
        assert!(found > 10, "found {found} crafted signatures");
    }

    #[test]
    fn verify_strict_refuses_a_weak_key_that_plain_verify_accepts() {
        // The identity as the key: R = s·B verifies any message under plain `verify`.
        let key = EdwardsPoint::default().compress().0;
        let s = Scalar::from(123_456_789u64);
        let r = EdwardsPoint::mul_base(&s).compress().0;
        let sig = sig_of(r, s);
        assert_eq!(verdicts(&key, b"anything", &sig), (false, false, true));
        assert_eq!(verdicts(&key, b"anything else", &sig), (false, false, true));
    }

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
