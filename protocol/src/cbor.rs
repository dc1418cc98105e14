//! Canonical CBOR: exactly one encoding per value.
//!
//! Rules (also in `docs/DECISIONS.md`):
//! - definite lengths only, integers and lengths in their shortest form (ciborium's writer);
//! - maps have text keys only, sorted by encoded length and then bytewise (the DAG-CBOR /
//!   RFC 7049 canonical order), with no duplicates; so struct fields have a fixed order;
//! - no floats; no tags except 42 (a CID link, as in DAG-CBOR);
//! - nesting at most [`MAX_DEPTH`] levels.
//!
//! Decoding checks the size cap first, parses with a recursion limit, and then re-encodes
//! the value: if the bytes differ from the input the input was not canonical (other integer
//! widths, other key order, indefinite lengths, unknown fields) and is refused.

use ciborium::value::Value;
use serde::{Serialize, de::DeserializeOwned};

use crate::error::{ProtocolError, Result};

/// Deepest nesting accepted by the decoder and the encoder.
pub const MAX_DEPTH: usize = 64;

/// CBOR tag for a CID link (DAG-CBOR).
pub const CID_TAG: u64 = 42;

/// Encodes `value` canonically.
///
/// ciborium writes the value directly (struct fields in declaration order) and the maps are
/// then put in canonical order ([`crate::cbor_reorder`]); what that pass does not handle
/// (floats, other tags, indefinite lengths, …) takes the general path through a
/// [`Value`] tree, which gives the same bytes or the error.
pub fn to_canonical<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    if let Ok(direct) = to_local(value)
        && let Ok(out) = crate::cbor_reorder::reorder(&direct)
    {
        return Ok(out);
    }
    to_canonical_via_value(value)
}

/// [`to_canonical`] through a [`Value`] tree: the general path (and the reference the fast
/// path is tested against).
pub fn to_canonical_via_value<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    let value = Value::serialized(value).map_err(|e| ProtocolError::Encode(e.to_string()))?;
    let value = canonicalize(value, 0)?;
    let mut out = Vec::with_capacity(128);
    ciborium::into_writer(&value, &mut out).map_err(|e| ProtocolError::Encode(e.to_string()))?;
    Ok(out)
}

/// Decodes one canonical value of at most `max` bytes, refusing anything else.
///
/// `kind` names what is decoded in errors.
pub fn from_canonical<T: Serialize + DeserializeOwned>(
    bytes: &[u8],
    max: usize,
    kind: &'static str,
) -> Result<T> {
    let value: T = from_local(bytes, max, kind)?;
    let again = to_canonical(&value).map_err(|e| match e {
        ProtocolError::FloatNotAllowed => ProtocolError::FloatNotAllowed,
        _ => ProtocolError::NonCanonical,
    })?;
    if again != bytes {
        return Err(ProtocolError::NonCanonical);
    }
    Ok(value)
}

/// Encodes `value` in CBOR without canonicalising it: struct fields in declaration order,
/// integers shortest-form. For a node's own records (redb rows), which nobody signs and no
/// other implementation reads; several times cheaper than [`to_canonical`] because it skips
/// the detour through a [`Value`] tree. Never use it for what is signed or hashed.
pub fn to_local<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(256);
    ciborium::into_writer(value, &mut out).map_err(|e| ProtocolError::Encode(e.to_string()))?;
    Ok(out)
}

/// Decodes one value of at most `max` bytes written by [`to_local`] (or [`to_canonical`]):
/// the size cap, the recursion limit and the trailing-bytes check apply, the canonical-form
/// check does not.
pub fn from_local<T: DeserializeOwned>(bytes: &[u8], max: usize, kind: &'static str) -> Result<T> {
    if bytes.len() > max {
        return Err(ProtocolError::TooLarge {
            kind,
            len: bytes.len(),
            max,
        });
    }
    let mut reader = bytes;
    let value: T = ciborium::de::from_reader_with_recursion_limit(&mut reader, MAX_DEPTH).map_err(
        |e| match e {
            ciborium::de::Error::RecursionLimitExceeded => ProtocolError::TooDeep(MAX_DEPTH),
            other => ProtocolError::Malformed(other.to_string()),
        },
    )?;
    if !reader.is_empty() {
        return Err(ProtocolError::TrailingBytes(reader.len()));
    }
    Ok(value)
}

fn canonicalize(value: Value, depth: usize) -> Result<Value> {
    if depth > MAX_DEPTH {
        return Err(ProtocolError::TooDeep(MAX_DEPTH));
    }
    Ok(match value {
        Value::Float(_) => return Err(ProtocolError::FloatNotAllowed),
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .map(|v| canonicalize(v, depth + 1))
                .collect::<Result<_>>()?,
        ),
        Value::Map(entries) => {
            let mut sorted = Vec::with_capacity(entries.len());
            for (key, val) in entries {
                let Value::Text(key) = key else {
                    return Err(ProtocolError::NonTextKey);
                };
                sorted.push((key, canonicalize(val, depth + 1)?));
            }
            sorted.sort_by(|(a, _), (b, _)| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
            if let Some(w) = sorted.windows(2).find(|w| w[0].0 == w[1].0) {
                return Err(ProtocolError::DuplicateKey(w[0].0.clone()));
            }
            Value::Map(
                sorted
                    .into_iter()
                    .map(|(k, v)| (Value::Text(k), v))
                    .collect(),
            )
        }
        Value::Tag(CID_TAG, inner) => match *inner {
            Value::Bytes(b) => Value::Tag(CID_TAG, Box::new(Value::Bytes(b))),
            _ => {
                return Err(ProtocolError::InvalidCid(
                    "tag 42 must wrap a byte string".into(),
                ));
            }
        },
        Value::Tag(tag, _) => return Err(ProtocolError::UnsupportedTag(tag)),
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::collections::BTreeMap;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        zeta: u64,
        a: String,
        mid: Option<u32>,
        map: BTreeMap<String, u64>,
    }

    fn sample() -> Sample {
        Sample {
            zeta: 1_000_000,
            a: "x".into(),
            mid: None,
            map: [
                ("bb".to_string(), 1),
                ("a".to_string(), 2),
                ("ccc".to_string(), 3),
            ]
            .into_iter()
            .collect(),
        }
    }

    #[test]
    fn round_trip_is_byte_identical() {
        let bytes = to_canonical(&sample()).unwrap();
        let back: Sample = from_canonical(&bytes, 1024, "sample").unwrap();
        assert_eq!(back, sample());
        assert_eq!(to_canonical(&back).unwrap(), bytes);
    }

    #[test]
    fn keys_are_sorted_length_first() {
        let bytes = to_canonical(&sample()).unwrap();
        let v: Value = ciborium::from_reader(&bytes[..]).unwrap();
        let keys: Vec<_> = v
            .as_map()
            .unwrap()
            .iter()
            .map(|(k, _)| k.as_text().unwrap().to_string())
            .collect();
        assert_eq!(keys, ["a", "map", "mid", "zeta"]);
    }

    #[test]
    fn non_shortest_integer_is_refused() {
        // {"a": 1} with the 1 written as a two-byte integer (0x18 0x01).
        let bytes = [0xa1, 0x61, b'a', 0x18, 0x01];
        let err = from_canonical::<BTreeMap<String, u64>>(&bytes, 64, "t").unwrap_err();
        assert_eq!(err, ProtocolError::NonCanonical);
        let ok = [0xa1, 0x61, b'a', 0x01];
        assert!(from_canonical::<BTreeMap<String, u64>>(&ok, 64, "t").is_ok());
    }

    #[test]
    fn wrong_key_order_is_refused() {
        // {"bb": 1, "a": 2}: longer key first.
        let bytes = [0xa2, 0x62, b'b', b'b', 0x01, 0x61, b'a', 0x02];
        let err = from_canonical::<BTreeMap<String, u64>>(&bytes, 64, "t").unwrap_err();
        assert_eq!(err, ProtocolError::NonCanonical);
    }

    #[test]
    fn indefinite_length_is_refused() {
        // [_ 1, 2] as an indefinite-length array.
        let bytes = [0x9f, 0x01, 0x02, 0xff];
        let err = from_canonical::<Vec<u64>>(&bytes, 64, "t").unwrap_err();
        assert_eq!(err, ProtocolError::NonCanonical);
    }

    #[test]
    fn floats_are_refused_both_ways() {
        assert_eq!(
            to_canonical(&1.5f64).unwrap_err(),
            ProtocolError::FloatNotAllowed
        );
        let bytes = [0xf9, 0x3e, 0x00]; // half-float 1.5
        let err = from_canonical::<f64>(&bytes, 64, "t").unwrap_err();
        assert_eq!(err, ProtocolError::FloatNotAllowed);
    }

    #[test]
    fn local_form_round_trips_and_reads_canonical_rows() {
        let local = to_local(&sample()).unwrap();
        let back: Sample = from_local(&local, 1024, "sample").unwrap();
        assert_eq!(
            to_canonical(&back).unwrap(),
            to_canonical(&sample()).unwrap()
        );
        let canonical = to_canonical(&sample()).unwrap();
        let back: Sample = from_local(&canonical, 1024, "sample").unwrap();
        assert_eq!(to_local(&back).unwrap(), local);
    }

    #[test]
    fn local_form_keeps_the_caps() {
        let bytes = to_local(&vec![1u64; 40]).unwrap();
        assert!(matches!(
            from_local::<Vec<u64>>(&bytes, 8, "t").unwrap_err(),
            ProtocolError::TooLarge { .. }
        ));
        let mut trailing = to_local(&7u64).unwrap();
        trailing.push(0);
        assert!(matches!(
            from_local::<u64>(&trailing, 64, "t").unwrap_err(),
            ProtocolError::TrailingBytes(1)
        ));
        let deep = vec![0x81u8; MAX_DEPTH + 8];
        assert!(from_local::<ciborium::value::Value>(&deep, 1024, "t").is_err());
    }

    #[test]
    fn size_cap_applies_before_parsing() {
        let err = from_canonical::<Vec<u64>>(&[0u8; 65], 64, "t").unwrap_err();
        assert!(matches!(
            err,
            ProtocolError::TooLarge {
                len: 65,
                max: 64,
                ..
            }
        ));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let err = from_canonical::<u64>(&[0x01, 0x02], 64, "t").unwrap_err();
        assert_eq!(err, ProtocolError::TrailingBytes(1));
    }

    #[test]
    fn deep_nesting_is_refused_without_overflow() {
        let mut bytes = vec![0x81u8; 100_000];
        bytes.push(0x01);
        assert!(from_canonical::<Value>(&bytes, 1 << 20, "t").is_err());
    }

    #[test]
    fn unknown_fields_are_refused() {
        #[derive(Serialize)]
        struct Wider {
            a: String,
            extra: u64,
            map: BTreeMap<String, u64>,
            zeta: u64,
        }
        let bytes = to_canonical(&Wider {
            a: "x".into(),
            extra: 9,
            map: BTreeMap::new(),
            zeta: 1,
        })
        .unwrap();
        assert!(from_canonical::<Sample>(&bytes, 1024, "t").is_err());
    }
}
