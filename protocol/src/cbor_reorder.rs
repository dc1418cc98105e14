//! The fast path of [`crate::cbor::to_canonical`]: CBOR that ciborium wrote straight from a
//! value (struct fields in declaration order), rewritten with every map's entries in
//! canonical key order.
//!
//! One pass over the bytes, copying each item to the output; a map whose keys come out of
//! order has its entries' byte ranges sorted and copied back. Anything outside the plain
//! subset this project's messages use (a float, a non-text key, a duplicate key, an
//! indefinite length, a non-shortest header, a tag other than 42 around a byte string, a
//! simple value other than `false`, `true` and `null`, nesting past [`MAX_DEPTH`]) is
//! [`Unsupported`]: the caller then takes the slow path (a `ciborium::Value` tree), which
//! gives the exact error or result. So the output is either the slow path's bytes or
//! nothing; the tests compare the two on random trees and on every message type.

use crate::cbor::{CID_TAG, MAX_DEPTH};

/// The input is outside the subset handled here; use the general path.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Unsupported;

type Step<T> = Result<T, Unsupported>;

/// `input` (one complete item, ciborium's direct output) with its maps in canonical order.
pub(crate) fn reorder(input: &[u8]) -> Step<Vec<u8>> {
    let mut out = Vec::with_capacity(input.len());
    let mut pos = 0;
    item(input, &mut pos, &mut out, 0)?;
    if pos != input.len() {
        return Err(Unsupported);
    }
    Ok(out)
}

/// A header: major type, argument, and how many bytes it took.
struct Header {
    major: u8,
    info: u8,
    arg: u64,
    len: usize,
}

fn header(input: &[u8], pos: usize) -> Step<Header> {
    let first = *input.get(pos).ok_or(Unsupported)?;
    let (major, info) = (first >> 5, first & 0x1f);
    let (arg, len) = match info {
        0..=23 => (u64::from(info), 1),
        24..=27 => {
            let n = 1usize << (info - 24);
            let bytes = input.get(pos + 1..pos + 1 + n).ok_or(Unsupported)?;
            let arg = bytes.iter().fold(0u64, |a, b| (a << 8) | u64::from(*b));
            // Shortest form only (major 7 uses these for floats, refused below anyway).
            let min = match n {
                1 => 24,
                2 => 0x100,
                4 => 0x1_0000,
                _ => 0x1_0000_0000,
            };
            if arg < min {
                return Err(Unsupported);
            }
            (arg, 1 + n)
        }
        // Reserved, or indefinite length.
        _ => return Err(Unsupported),
    };
    Ok(Header {
        major,
        info,
        arg,
        len,
    })
}

/// Copies the item at `*pos` to `out`, maps reordered, and moves `*pos` past it.
fn item(input: &[u8], pos: &mut usize, out: &mut Vec<u8>, depth: usize) -> Step<()> {
    if depth > MAX_DEPTH {
        return Err(Unsupported);
    }
    let h = header(input, *pos)?;
    let head = &input[*pos..*pos + h.len];
    *pos += h.len;
    match h.major {
        // Integers.
        0 | 1 => out.extend_from_slice(head),
        // Byte and text strings.
        2 | 3 => {
            let n = usize::try_from(h.arg).map_err(|_| Unsupported)?;
            let body = input.get(*pos..*pos + n).ok_or(Unsupported)?;
            out.extend_from_slice(head);
            out.extend_from_slice(body);
            *pos += n;
        }
        4 => {
            out.extend_from_slice(head);
            for _ in 0..h.arg {
                item(input, pos, out, depth + 1)?;
            }
        }
        5 => {
            out.extend_from_slice(head);
            map_entries(input, pos, out, h.arg, depth)?;
        }
        6 => {
            // Only a CID link: tag 42 around a byte string.
            if h.arg != CID_TAG || input.get(*pos).map(|b| b >> 5) != Some(2) {
                return Err(Unsupported);
            }
            out.extend_from_slice(head);
            item(input, pos, out, depth + 1)?;
        }
        // false, true, null.
        7 if matches!(h.info, 20..=22) => out.extend_from_slice(head),
        _ => return Err(Unsupported),
    }
    Ok(())
}

/// One map entry as copied to `out`: where it starts, where its key's text starts, where
/// the key ends, where the entry ends.
#[derive(Clone, Copy)]
struct Entry {
    start: usize,
    key: usize,
    key_end: usize,
    end: usize,
}

fn map_entries(
    input: &[u8],
    pos: &mut usize,
    out: &mut Vec<u8>,
    count: u64,
    depth: usize,
) -> Step<()> {
    let body = out.len();
    let mut entries: Vec<Entry> = Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(64));
    let mut sorted = true;
    for _ in 0..count {
        let start = out.len();
        let k = header(input, *pos)?;
        if k.major != 3 {
            return Err(Unsupported);
        }
        item(input, pos, out, depth + 1)?;
        let (key, key_end) = (start + k.len, out.len());
        item(input, pos, out, depth + 1)?;
        let e = Entry {
            start,
            key,
            key_end,
            end: out.len(),
        };
        if let Some(prev) = entries.last() {
            match order(out, prev, &e) {
                std::cmp::Ordering::Less => {}
                std::cmp::Ordering::Equal => return Err(Unsupported),
                std::cmp::Ordering::Greater => sorted = false,
            }
        }
        entries.push(e);
    }
    if sorted {
        return Ok(());
    }
    entries.sort_by(|a, b| order(out, a, b));
    if entries
        .windows(2)
        .any(|w| order(out, &w[0], &w[1]) == std::cmp::Ordering::Equal)
    {
        return Err(Unsupported);
    }
    let copied = out[body..].to_vec();
    out.truncate(body);
    for e in &entries {
        out.extend_from_slice(&copied[e.start - body..e.end - body]);
    }
    Ok(())
}

/// Canonical key order: shorter text first, then bytewise.
fn order(out: &[u8], a: &Entry, b: &Entry) -> std::cmp::Ordering {
    let (ka, kb) = (&out[a.key..a.key_end], &out[b.key..b.key_end]);
    ka.len().cmp(&kb.len()).then_with(|| ka.cmp(kb))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use ciborium::value::{Integer, Value};
    use proptest::prelude::*;

    use super::*;
    use crate::{ProtocolError, cbor};

    fn direct(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(v, &mut out).unwrap();
        out
    }

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<u64>().prop_map(|n| Value::Integer(Integer::from(n))),
            any::<i64>().prop_map(|n| Value::Integer(Integer::from(n))),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::Bytes),
            "[a-z]{0,30}".prop_map(Value::Text),
            any::<bool>().prop_map(Value::Bool),
            Just(Value::Null),
            proptest::collection::vec(any::<u8>(), 0..40)
                .prop_map(|b| Value::Tag(42, Box::new(Value::Bytes(b)))),
        ]
    }

    /// Trees of the kinds the fast path handles; map keys are short, so some repeat.
    fn tree() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(5, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::vec(("[a-d]{0,3}", inner), 0..8).prop_map(|es| {
                    Value::Map(es.into_iter().map(|(k, v)| (Value::Text(k), v)).collect())
                }),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// On any tree, the fast path gives the general path's bytes, or declines (then the
        /// general path runs); it declines only where the general path refuses too.
        #[test]
        fn reordering_gives_the_general_paths_bytes(v in tree()) {
            let slow = cbor::to_canonical_via_value(&v);
            match (reorder(&direct(&v)), &slow) {
                (Ok(fast), Ok(slow)) => prop_assert_eq!(&fast, slow),
                (Err(Unsupported), Err(ProtocolError::DuplicateKey(_))) => {}
                (fast, slow) => prop_assert!(false, "fast {:?}, slow {:?}", fast, slow),
            }
            prop_assert_eq!(cbor::to_canonical(&v), slow);
        }

        /// Canonical bytes pass through unchanged.
        #[test]
        fn canonical_bytes_are_left_as_they_are(v in tree()) {
            if let Ok(bytes) = cbor::to_canonical_via_value(&v) {
                prop_assert_eq!(reorder(&bytes).unwrap(), bytes);
            }
        }
    }

    #[test]
    fn what_the_fast_path_does_not_handle_is_declined() {
        let cases: Vec<Vec<u8>> = vec![
            direct(&Value::Float(1.5)),
            direct(&Value::Tag(7, Box::new(Value::Null))),
            direct(&Value::Tag(42, Box::new(Value::Text("x".into())))),
            direct(&Value::Map(vec![(Value::Integer(1.into()), Value::Null)])),
            // {"a": 1, "a": 2}
            vec![0xa2, 0x61, b'a', 0x01, 0x61, b'a', 0x02],
            // Indefinite-length array, a two-byte 1, undefined, a truncated string.
            vec![0x9f, 0x01, 0xff],
            vec![0x18, 0x01],
            vec![0xf7],
            vec![0x62, b'a'],
            // Trailing bytes.
            vec![0x01, 0x02],
            // Too deep.
            [vec![0x81; MAX_DEPTH + 2], vec![0x01]].concat(),
        ];
        for bytes in cases {
            assert_eq!(reorder(&bytes), Err(Unsupported), "{bytes:02x?}");
        }
        // And the public encoder still gives the general path's errors.
        assert_eq!(
            cbor::to_canonical(&1.5f64),
            Err(ProtocolError::FloatNotAllowed)
        );
        let dup = Value::Map(vec![
            (Value::Text("a".into()), Value::Null),
            (Value::Text("a".into()), Value::Null),
        ]);
        assert!(matches!(
            cbor::to_canonical(&dup),
            Err(ProtocolError::DuplicateKey(_))
        ));
    }

    #[test]
    fn nested_maps_are_sorted_at_every_level() {
        // {"bb": {"zz": 1, "a": 2}, "a": [{"ccc": 3, "dd": 4}]}
        let v = Value::Map(vec![
            (
                Value::Text("bb".into()),
                Value::Map(vec![
                    (Value::Text("zz".into()), Value::Integer(1.into())),
                    (Value::Text("a".into()), Value::Integer(2.into())),
                ]),
            ),
            (
                Value::Text("a".into()),
                Value::Array(vec![Value::Map(vec![
                    (Value::Text("ccc".into()), Value::Integer(3.into())),
                    (Value::Text("dd".into()), Value::Integer(4.into())),
                ])]),
            ),
        ]);
        let fast = reorder(&direct(&v)).unwrap();
        assert_eq!(
            fast,
            [
                &[0xa2, 0x61, b'a', 0x81, 0xa2, 0x62, b'd', b'd', 0x04][..],
                &[
                    0x63, b'c', b'c', b'c', 0x03, 0x62, b'b', b'b', 0xa2, 0x61, b'a', 0x02
                ],
                &[0x62, b'z', b'z', 0x01],
            ]
            .concat()
        );
        assert_eq!(fast, cbor::to_canonical_via_value(&v).unwrap());
    }
}
