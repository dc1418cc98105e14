//! Content identifiers: CIDv1 with a sha2-256 multihash.
//!
//! Protocol objects use the `dag-cbor` codec (0x71) over their canonical CBOR; blobs such as
//! Wasm modules, snapshots and task outputs use `raw` (0x55). No other version, codec or
//! hash is accepted. In CBOR a CID is a tag-42 byte string holding a zero byte and the
//! binary CID (as in DAG-CBOR); in JSON it is the base32 string (`bafy…`, `bafk…`).

use std::{fmt, str::FromStr};

use multihash::Multihash;
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};
use sha2::{Digest, Sha256};

use crate::error::{ProtocolError, Result};

/// Multicodec code of DAG-CBOR.
pub const DAG_CBOR: u64 = 0x71;
/// Multicodec code of raw bytes.
pub const RAW: u64 = 0x55;
/// Multihash code of sha2-256.
pub const SHA2_256: u64 = 0x12;

/// What a CID addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    /// A protocol object in canonical CBOR.
    DagCbor,
    /// Opaque bytes: a Wasm module, a snapshot, an output.
    Raw,
}

impl Codec {
    fn code(self) -> u64 {
        match self {
            Codec::DagCbor => DAG_CBOR,
            Codec::Raw => RAW,
        }
    }
}

/// A CIDv1 with a sha2-256 digest and either the `dag-cbor` or the `raw` codec.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cid(cid::Cid);

impl Cid {
    /// The CID of `bytes` under `codec`.
    pub fn compute(codec: Codec, bytes: &[u8]) -> Cid {
        let digest = Sha256::digest(bytes);
        // A 32-byte digest always fits the 64-byte multihash.
        let mh = Multihash::<64>::wrap(SHA2_256, &digest)
            .unwrap_or_else(|_| unreachable!("32-byte digest fits"));
        Cid(cid::Cid::new_v1(codec.code(), mh))
    }

    /// The `raw` CID of a blob.
    pub fn raw(bytes: &[u8]) -> Cid {
        Self::compute(Codec::Raw, bytes)
    }

    /// The `dag-cbor` CID of canonical CBOR bytes.
    pub fn dag_cbor(bytes: &[u8]) -> Cid {
        Self::compute(Codec::DagCbor, bytes)
    }

    /// The `dag-cbor` CID of a value's canonical encoding.
    pub fn of<T: Serialize + ?Sized>(value: &T) -> Result<Cid> {
        Ok(Self::dag_cbor(&crate::cbor::to_canonical(value)?))
    }

    /// The codec of this CID.
    pub fn codec(&self) -> Codec {
        if self.0.codec() == DAG_CBOR {
            Codec::DagCbor
        } else {
            Codec::Raw
        }
    }

    /// Checks that `bytes` hash to this CID under its own codec.
    pub fn verify(&self, bytes: &[u8]) -> Result<()> {
        let actual = Self::compute(self.codec(), bytes);
        if actual == *self {
            Ok(())
        } else {
            Err(ProtocolError::CidMismatch {
                expected: self.to_string(),
                actual: actual.to_string(),
            })
        }
    }

    /// The binary form (version, codec, multihash).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.to_bytes()
    }

    /// The binary form written into `buf` after `skip` bytes, without allocating: the
    /// written part of `buf` (`skip` bytes, then the form). A checked CID (v1, a codec of
    /// two varint bytes at most, a 32-byte sha2-256 multihash) takes at most 37 bytes; a
    /// form that does not fit falls back to [`Cid::to_bytes`].
    fn write_into<'a>(&self, buf: &'a mut [u8; BINARY_BUF], skip: usize) -> Binary<'a> {
        let (_, rest) = buf.split_at_mut(skip);
        match self.0.write_bytes(&mut rest[..]) {
            Ok(n) => Binary::Inline(&buf[..skip + n]),
            Err(_) => {
                let mut v = vec![0; skip];
                v.extend_from_slice(&self.0.to_bytes());
                Binary::Heap(v)
            }
        }
    }

    /// Parses the binary form, accepting only CIDv1 / sha2-256 / dag-cbor or raw.
    pub fn from_bytes(bytes: &[u8]) -> Result<Cid> {
        let inner =
            cid::Cid::try_from(bytes).map_err(|e| ProtocolError::InvalidCid(e.to_string()))?;
        let cid = Self::check(inner)?;
        let mut buf = [0; BINARY_BUF];
        if cid.write_into(&mut buf, 0).as_slice() != bytes {
            return Err(ProtocolError::InvalidCid("non-minimal binary form".into()));
        }
        Ok(cid)
    }

    fn check(inner: cid::Cid) -> Result<Cid> {
        if inner.version() != cid::Version::V1 {
            return Err(ProtocolError::InvalidCid("only CIDv1 is accepted".into()));
        }
        if inner.codec() != DAG_CBOR && inner.codec() != RAW {
            return Err(ProtocolError::InvalidCid(format!(
                "codec 0x{:x} is not dag-cbor or raw",
                inner.codec()
            )));
        }
        if inner.hash().code() != SHA2_256 || inner.hash().size() != 32 {
            return Err(ProtocolError::InvalidCid(
                "only sha2-256 digests are accepted".into(),
            ));
        }
        Ok(Cid(inner))
    }
}

/// Room for a checked CID's binary form and a link's leading zero byte.
const BINARY_BUF: usize = 48;

/// A binary form written by [`Cid::write_into`].
enum Binary<'a> {
    Inline(&'a [u8]),
    Heap(Vec<u8>),
}

impl Binary<'_> {
    fn as_slice(&self) -> &[u8] {
        match self {
            Binary::Inline(b) => b,
            Binary::Heap(v) => v,
        }
    }
}

impl fmt::Display for Cid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for Cid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cid({})", self.0)
    }
}

impl FromStr for Cid {
    type Err = ProtocolError;
    fn from_str(s: &str) -> Result<Cid> {
        if s.len() > 128 {
            return Err(ProtocolError::InvalidCid("too long".into()));
        }
        let inner = cid::Cid::try_from(s).map_err(|e| ProtocolError::InvalidCid(e.to_string()))?;
        let cid = Self::check(inner)?;
        if cid.to_string() != s {
            return Err(ProtocolError::InvalidCid(
                "not the canonical base32 string form".into(),
            ));
        }
        Ok(cid)
    }
}

impl Serialize for Cid {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            // The link's zero byte, then the binary form.
            let mut buf = [0; BINARY_BUF];
            let bytes = self.write_into(&mut buf, 1);
            ciborium::tag::Required::<&serde_bytes::Bytes, { crate::cbor::CID_TAG }>(
                serde_bytes::Bytes::new(bytes.as_slice()),
            )
            .serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for Cid {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Cid, D::Error> {
        if deserializer.is_human_readable() {
            let s = String::deserialize(deserializer)?;
            s.parse().map_err(de::Error::custom)
        } else {
            let ciborium::tag::Required(bytes) = ciborium::tag::Required::<
                serde_bytes::ByteBuf,
                { crate::cbor::CID_TAG },
            >::deserialize(deserializer)?;
            match bytes.split_first() {
                Some((0, rest)) => Cid::from_bytes(rest).map_err(de::Error::custom),
                _ => Err(de::Error::custom("CID link must start with a zero byte")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_encodes_as_tag_42_of_a_zero_byte_and_the_binary_form() {
        for cid in [Cid::raw(b"x"), Cid::dag_cbor(b"y")] {
            let mut want = vec![0xd8, 42, 0x58, 37, 0];
            want.extend_from_slice(&cid.to_bytes());
            assert_eq!(crate::cbor::to_canonical(&cid).unwrap(), want);
            let back: Cid = crate::cbor::from_canonical(&want, 64, "cid").unwrap();
            assert_eq!(back, cid);
            let mut buf = [0; BINARY_BUF];
            assert!(matches!(cid.write_into(&mut buf, 1), Binary::Inline(b) if b == &want[4..]));
        }
    }

    #[test]
    fn raw_and_dag_cbor_differ_and_verify() {
        let raw = Cid::raw(b"hello");
        let cbor = Cid::dag_cbor(b"hello");
        assert_ne!(raw, cbor);
        assert_eq!(raw.codec(), Codec::Raw);
        assert_eq!(cbor.codec(), Codec::DagCbor);
        raw.verify(b"hello").unwrap();
        assert!(matches!(
            raw.verify(b"hellO"),
            Err(ProtocolError::CidMismatch { .. })
        ));
        assert!(raw.to_string().starts_with("bafk"));
        assert!(cbor.to_string().starts_with("bafy"));
    }

    #[test]
    fn string_and_binary_round_trip() {
        let c = Cid::raw(b"x");
        assert_eq!(c.to_string().parse::<Cid>().unwrap(), c);
        assert_eq!(Cid::from_bytes(&c.to_bytes()).unwrap(), c);
    }

    #[test]
    fn cbor_form_is_tag_42() {
        let c = Cid::raw(b"x");
        let bytes = crate::cbor::to_canonical(&c).unwrap();
        assert_eq!(&bytes[..2], &[0xd8, 42]);
        let back: Cid = crate::cbor::from_canonical(&bytes, 128, "cid").unwrap();
        assert_eq!(back, c);
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(json, format!("\"{c}\""));
    }

    #[test]
    fn other_codecs_and_versions_are_refused() {
        // CIDv0 (a bare sha2-256 multihash, base58btc "Qm…").
        assert!(
            "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"
                .parse::<Cid>()
                .is_err()
        );
        // dag-pb (0x70) CIDv1.
        let mh = Multihash::<64>::wrap(SHA2_256, &[0u8; 32]).unwrap();
        let pb = cid::Cid::new_v1(0x70, mh);
        assert!(Cid::from_bytes(&pb.to_bytes()).is_err());
        // identity hash.
        let id = Multihash::<64>::wrap(0x00, b"abc").unwrap();
        assert!(Cid::from_bytes(&cid::Cid::new_v1(RAW, id).to_bytes()).is_err());
    }
}
