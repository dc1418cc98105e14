//! A capability's `input_schema`, compiled and checked against task inputs.
//!
//! d402 checks inputs with a documented subset of JSON Schema (draft 2020-12): the keywords
//! in [`SUPPORTED`]. A manifest whose input schema uses anything else is refused when it is
//! validated, so what a capability declares is always what the network enforces: a gateway
//! refuses a nonconforming input with `422 invalid_input` before it asks for payment, and a
//! worker refuses a lease whose input does not conform.
//!
//! - Types: `type` (a name or a list of names: `null`, `boolean`, `object`, `array`,
//!   `number`, `integer`, `string`), `enum`, `const`.
//! - Objects: `properties`, `required`, `additionalProperties` (a boolean or a schema),
//!   `minProperties`, `maxProperties`.
//! - Arrays: `items` (one schema for every item), `minItems`, `maxItems`, `uniqueItems`.
//! - Strings: `minLength`, `maxLength` (in Unicode scalar values), `pattern` (Rust `regex`
//!   syntax, which has no look-around or back-references; unanchored, as in JSON Schema),
//!   `format: "uri"` (a scheme, then no whitespace or control characters).
//! - Numbers: `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum` (integers: a
//!   manifest carries no floats), `multipleOf` (a positive integer).
//! - Annotations, not checked: `$schema`, `$id`, `$comment`, `title`, `description`,
//!   `default`, `examples`, `deprecated`, `readOnly`, `writeOnly`, `contentMediaType`,
//!   `contentEncoding`.
//!
//! A boolean schema (`true` accepts anything, `false` nothing) is allowed where a schema is.
//! Compilation caps nesting at [`MAX_DEPTH`], the number of patterns at [`MAX_PATTERNS`] and
//! each pattern's compiled size, so a manifest cannot make its checks expensive; checking is
//! linear in the input (`uniqueItems` hashes each item's JSON text; like `enum` and `const`
//! it compares values as written, so `1` and `1.0` differ).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Number, Value};

/// The keywords this module understands (checked or annotation).
pub const SUPPORTED: &[&str] = &[
    "type",
    "enum",
    "const",
    "properties",
    "required",
    "additionalProperties",
    "minProperties",
    "maxProperties",
    "items",
    "minItems",
    "maxItems",
    "uniqueItems",
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "$schema",
    "$id",
    "$comment",
    "title",
    "description",
    "default",
    "examples",
    "deprecated",
    "readOnly",
    "writeOnly",
    "contentMediaType",
    "contentEncoding",
];

/// Deepest nesting of schemas in a schema.
pub const MAX_DEPTH: usize = 32;

/// Largest compiled form of one `pattern`, in bytes.
pub const MAX_PATTERN_SIZE: usize = 64 * 1024;

/// Most `pattern`s in one schema (manifests arrive from untrusted peers and are compiled
/// when validated: this bounds the work and memory one manifest can cost).
pub const MAX_PATTERNS: usize = 32;

/// The most violations one check reports.
pub const MAX_VIOLATIONS: usize = 8;

/// Why a schema cannot be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct SchemaError {
    /// JSON pointer to the offending place in the schema (`""` is the root).
    pub path: String,
    /// What is wrong there.
    pub message: String,
}

/// One way an input breaks its schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// JSON pointer to the offending value in the input (`""` is the input itself).
    pub path: String,
    /// What is wrong with it.
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = if self.path.is_empty() {
            "input"
        } else {
            &self.path
        };
        write!(f, "{at}: {}", self.message)
    }
}

/// A compiled input schema. Cheap to clone.
#[derive(Debug, Clone)]
pub struct InputSchema {
    root: std::sync::Arc<Node>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Null,
    Boolean,
    Object,
    Array,
    Number,
    Integer,
    String,
}

impl Kind {
    fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "null" => Kind::Null,
            "boolean" => Kind::Boolean,
            "object" => Kind::Object,
            "array" => Kind::Array,
            "number" => Kind::Number,
            "integer" => Kind::Integer,
            "string" => Kind::String,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Null => "null",
            Kind::Boolean => "boolean",
            Kind::Object => "object",
            Kind::Array => "array",
            Kind::Number => "number",
            Kind::Integer => "integer",
            Kind::String => "string",
        }
    }

    fn matches(self, v: &Value) -> bool {
        match (self, v) {
            (Kind::Null, Value::Null)
            | (Kind::Boolean, Value::Bool(_))
            | (Kind::Object, Value::Object(_))
            | (Kind::Array, Value::Array(_))
            | (Kind::Number, Value::Number(_))
            | (Kind::String, Value::String(_)) => true,
            (Kind::Integer, Value::Number(n)) => is_integer(n),
            _ => false,
        }
    }
}

fn is_integer(n: &Number) -> bool {
    n.is_i64()
        || n.is_u64()
        || n.as_f64()
            .is_some_and(|f| f.is_finite() && f.fract() == 0.0)
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Object(_) => "object",
        Value::Array(_) => "array",
        Value::Number(n) if is_integer(n) => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
    }
}

#[derive(Debug, Default)]
enum Node {
    /// `true` or `{}`.
    #[default]
    Any,
    /// `false`.
    Nothing,
    Rules(Box<Rules>),
}

#[derive(Debug, Default)]
struct Rules {
    types: Option<BTreeSet<Kind>>,
    one_of_values: Option<Vec<Value>>,
    constant: Option<Value>,
    properties: BTreeMap<String, Node>,
    required: Vec<String>,
    additional: Option<Node>,
    min_properties: Option<u64>,
    max_properties: Option<u64>,
    items: Option<Node>,
    min_items: Option<u64>,
    max_items: Option<u64>,
    unique_items: bool,
    min_length: Option<u64>,
    max_length: Option<u64>,
    pattern: Option<(String, regex::Regex)>,
    uri: bool,
    minimum: Option<i128>,
    maximum: Option<i128>,
    exclusive_minimum: Option<i128>,
    exclusive_maximum: Option<i128>,
    multiple_of: Option<u64>,
}

fn pointer(base: &str, token: &str) -> String {
    format!("{base}/{}", token.replace('~', "~0").replace('/', "~1"))
}

fn err(path: &str, message: impl Into<String>) -> SchemaError {
    SchemaError {
        path: path.to_string(),
        message: message.into(),
    }
}

impl InputSchema {
    /// Compiles `schema`, refusing keywords outside [`SUPPORTED`], malformed values and
    /// nesting deeper than [`MAX_DEPTH`].
    pub fn compile(schema: &Value) -> Result<InputSchema, SchemaError> {
        let mut patterns = 0;
        Ok(InputSchema {
            root: std::sync::Arc::new(compile(schema, "", 0, &mut patterns)?),
        })
    }

    /// Checks `input`; on failure, up to [`MAX_VIOLATIONS`] violations in document order.
    pub fn check(&self, input: &Value) -> Result<(), Vec<Violation>> {
        let mut out = Vec::new();
        check(&self.root, input, "", &mut out);
        if out.is_empty() { Ok(()) } else { Err(out) }
    }
}

fn uint(v: &Value, path: &str, key: &str) -> Result<u64, SchemaError> {
    v.as_u64()
        .ok_or_else(|| err(&pointer(path, key), "must be a non-negative integer"))
}

fn int(v: &Value, path: &str, key: &str) -> Result<i128, SchemaError> {
    match v {
        Value::Number(n) if n.is_i64() => Ok(i128::from(n.as_i64().unwrap_or_default())),
        Value::Number(n) if n.is_u64() => Ok(i128::from(n.as_u64().unwrap_or_default())),
        _ => Err(err(&pointer(path, key), "must be an integer")),
    }
}

fn compile(
    schema: &Value,
    path: &str,
    depth: usize,
    patterns: &mut usize,
) -> Result<Node, SchemaError> {
    if depth > MAX_DEPTH {
        return Err(err(path, format!("schemas nest deeper than {MAX_DEPTH}")));
    }
    let obj = match schema {
        Value::Bool(true) => return Ok(Node::Any),
        Value::Bool(false) => return Ok(Node::Nothing),
        Value::Object(o) => o,
        _ => return Err(err(path, "a schema must be an object or a boolean")),
    };
    if let Some(k) = obj.keys().find(|k| !SUPPORTED.contains(&k.as_str())) {
        return Err(err(
            &pointer(path, k),
            format!(
                "keyword {k:?} is not supported by d402's input checks (supported: {})",
                SUPPORTED.join(", ")
            ),
        ));
    }
    let mut r = Rules::default();
    let mut checked = false;
    for (key, v) in obj {
        let at = pointer(path, key);
        match key.as_str() {
            "type" => {
                let names: Vec<&Value> = match v {
                    Value::Array(a) if !a.is_empty() => a.iter().collect(),
                    Value::String(_) => vec![v],
                    _ => return Err(err(&at, "must be a type name or a non-empty list of them")),
                };
                let mut set = BTreeSet::new();
                for n in names {
                    let kind = n
                        .as_str()
                        .and_then(Kind::parse)
                        .ok_or_else(|| err(&at, format!("unknown type {n}")))?;
                    set.insert(kind);
                }
                r.types = Some(set);
            }
            "enum" => {
                let a = v
                    .as_array()
                    .filter(|a| !a.is_empty())
                    .ok_or_else(|| err(&at, "must be a non-empty array"))?;
                r.one_of_values = Some(a.clone());
            }
            "const" => r.constant = Some(v.clone()),
            "properties" => {
                let props = v
                    .as_object()
                    .ok_or_else(|| err(&at, "must be an object of schemas"))?;
                for (name, s) in props {
                    r.properties.insert(
                        name.clone(),
                        compile(s, &pointer(&at, name), depth + 1, patterns)?,
                    );
                }
            }
            "required" => {
                let a = v
                    .as_array()
                    .ok_or_else(|| err(&at, "must be an array of property names"))?;
                let mut seen = BTreeSet::new();
                for n in a {
                    let n = n
                        .as_str()
                        .ok_or_else(|| err(&at, "must be an array of property names"))?;
                    if !seen.insert(n) {
                        return Err(err(&at, format!("lists {n:?} twice")));
                    }
                    r.required.push(n.to_string());
                }
            }
            "additionalProperties" => r.additional = Some(compile(v, &at, depth + 1, patterns)?),
            "minProperties" => r.min_properties = Some(uint(v, path, key)?),
            "maxProperties" => r.max_properties = Some(uint(v, path, key)?),
            "items" => r.items = Some(compile(v, &at, depth + 1, patterns)?),
            "minItems" => r.min_items = Some(uint(v, path, key)?),
            "maxItems" => r.max_items = Some(uint(v, path, key)?),
            "uniqueItems" => {
                r.unique_items = v.as_bool().ok_or_else(|| err(&at, "must be a boolean"))?;
            }
            "minLength" => r.min_length = Some(uint(v, path, key)?),
            "maxLength" => r.max_length = Some(uint(v, path, key)?),
            "pattern" => {
                let p = v.as_str().ok_or_else(|| err(&at, "must be a string"))?;
                *patterns += 1;
                if *patterns > MAX_PATTERNS {
                    return Err(err(
                        &at,
                        format!("a schema may use at most {MAX_PATTERNS} patterns"),
                    ));
                }
                let re = regex::RegexBuilder::new(p)
                    .size_limit(MAX_PATTERN_SIZE)
                    .build()
                    .map_err(|e| err(&at, format!("not a supported regular expression: {e}")))?;
                r.pattern = Some((p.to_string(), re));
            }
            "format" => match v.as_str() {
                Some("uri") => r.uri = true,
                Some(f) => {
                    return Err(err(
                        &at,
                        format!(
                            "format {f:?} is not checked by d402 (only \"uri\"); use a pattern"
                        ),
                    ));
                }
                None => return Err(err(&at, "must be a string")),
            },
            "minimum" => r.minimum = Some(int(v, path, key)?),
            "maximum" => r.maximum = Some(int(v, path, key)?),
            "exclusiveMinimum" => r.exclusive_minimum = Some(int(v, path, key)?),
            "exclusiveMaximum" => r.exclusive_maximum = Some(int(v, path, key)?),
            "multipleOf" => {
                let m = uint(v, path, key)?;
                if m == 0 {
                    return Err(err(&at, "must be above 0"));
                }
                r.multiple_of = Some(m);
            }
            // Annotations.
            _ => continue,
        }
        checked = true;
    }
    Ok(if checked {
        Node::Rules(Box::new(r))
    } else {
        Node::Any
    })
}

/// Compares a JSON number with an integer bound: `Some(ordering of n against b)`.
fn cmp(n: &Number, b: i128) -> Option<std::cmp::Ordering> {
    if let Some(i) = n.as_i64() {
        Some(i128::from(i).cmp(&b))
    } else if let Some(u) = n.as_u64() {
        Some(i128::from(u).cmp(&b))
    } else {
        n.as_f64().and_then(|f| f.partial_cmp(&(b as f64)))
    }
}

fn is_uri(s: &str) -> bool {
    let Some((scheme, rest)) = s.split_once(':') else {
        return false;
    };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        && !rest.is_empty()
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn check(node: &Node, v: &Value, path: &str, out: &mut Vec<Violation>) {
    let mut fail = |out: &mut Vec<Violation>, message: String| {
        if out.len() < MAX_VIOLATIONS {
            out.push(Violation {
                path: path.to_string(),
                message,
            });
        }
    };
    let r = match node {
        Node::Any => return,
        Node::Nothing => return fail(out, "no value is allowed here".into()),
        Node::Rules(r) => r,
    };
    if let Some(types) = &r.types
        && !types.iter().any(|t| t.matches(v))
    {
        let want: Vec<&str> = types.iter().map(|t| t.name()).collect();
        // A wrong type makes the other rules meaningless.
        return fail(
            out,
            format!("must be of type {}, not {}", want.join(" or "), kind_of(v)),
        );
    }
    if let Some(values) = &r.one_of_values
        && !values.contains(v)
    {
        fail(
            out,
            format!("must be one of {}", Value::Array(values.clone())),
        );
    }
    if let Some(c) = &r.constant
        && c != v
    {
        fail(out, format!("must be {c}"));
    }
    match v {
        Value::Object(o) => check_object(r, o, path, out, &mut fail),
        Value::Array(a) => {
            if let Some(why) = count_bounds(a.len(), r.min_items, r.max_items, "items") {
                fail(out, why);
            }
            if r.unique_items
                && let Some(j) = first_repeat(a)
            {
                fail(
                    out,
                    format!("items must be unique; item {j} repeats an earlier one"),
                );
            }
            if let Some(items) = &r.items {
                for (i, item) in a.iter().enumerate() {
                    check(items, item, &pointer(path, &i.to_string()), out);
                }
            }
        }
        Value::String(s) => {
            // Length in Unicode scalar values, counted only as far as a bound needs.
            let bound = r
                .max_length
                .map_or(r.min_length.unwrap_or(0), |m| m.saturating_add(1));
            let n = s
                .chars()
                .take(usize::try_from(bound).unwrap_or(usize::MAX))
                .count() as u64;
            if let Some(min) = r.min_length
                && n < min
            {
                fail(out, format!("must be at least {min} characters long"));
            }
            if let Some(max) = r.max_length
                && n > max
            {
                fail(out, format!("must be at most {max} characters long"));
            }
            if let Some((p, re)) = &r.pattern
                && !re.is_match(s)
            {
                fail(out, format!("must match the pattern {p:?}"));
            }
            if r.uri && !is_uri(s) {
                fail(out, "must be a URI (a scheme, then no spaces)".into());
            }
        }
        Value::Number(n) => {
            use std::cmp::Ordering::{Greater, Less};
            let below =
                |b: i128, bad: &[std::cmp::Ordering]| cmp(n, b).is_none_or(|o| bad.contains(&o));
            if let Some(b) = r.minimum
                && below(b, &[Less])
            {
                fail(out, format!("must be at least {b}"));
            }
            if let Some(b) = r.maximum
                && below(b, &[Greater])
            {
                fail(out, format!("must be at most {b}"));
            }
            if let Some(b) = r.exclusive_minimum
                && below(b, &[Less, std::cmp::Ordering::Equal])
            {
                fail(out, format!("must be above {b}"));
            }
            if let Some(b) = r.exclusive_maximum
                && below(b, &[Greater, std::cmp::Ordering::Equal])
            {
                fail(out, format!("must be below {b}"));
            }
            if let Some(m) = r.multiple_of {
                let ok = if let Some(i) = n.as_i64() {
                    i128::from(i) % i128::from(m) == 0
                } else if let Some(u) = n.as_u64() {
                    u % m == 0
                } else {
                    n.as_f64()
                        .is_some_and(|f| f.fract() == 0.0 && f % (m as f64) == 0.0)
                };
                if !ok {
                    fail(out, format!("must be a multiple of {m}"));
                }
            }
        }
        Value::Null | Value::Bool(_) => {}
    }
}

/// Why `n` things (`what`: items, properties) break `min`/`max`, if they do.
fn count_bounds(n: usize, min: Option<u64>, max: Option<u64>, what: &str) -> Option<String> {
    let n = n as u64;
    match (min, max) {
        (Some(min), _) if n < min => Some(format!("must have at least {min} {what}, not {n}")),
        (_, Some(max)) if n > max => Some(format!("must have at most {max} {what}, not {n}")),
        _ => None,
    }
}

/// The index of the first item equal (as JSON text) to an earlier one.
fn first_repeat(items: &[Value]) -> Option<usize> {
    let mut seen = std::collections::HashSet::with_capacity(items.len());
    items.iter().position(|item| !seen.insert(item.to_string()))
}

fn check_object(
    r: &Rules,
    o: &Map<String, Value>,
    path: &str,
    out: &mut Vec<Violation>,
    fail: &mut impl FnMut(&mut Vec<Violation>, String),
) {
    if let Some(why) = count_bounds(o.len(), r.min_properties, r.max_properties, "properties") {
        fail(out, why);
    }
    for name in &r.required {
        if !o.contains_key(name) {
            fail(out, format!("the property {name:?} is required"));
        }
    }
    for (name, value) in o {
        let at = pointer(path, name);
        match (r.properties.get(name), &r.additional) {
            (Some(s), _) => check(s, value, &at, out),
            (None, Some(Node::Nothing)) => {
                if out.len() < MAX_VIOLATIONS {
                    out.push(Violation {
                        path: at,
                        message: "is not an allowed property".into(),
                    });
                }
            }
            (None, Some(s)) => check(s, value, &at, out),
            (None, None) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn page_schema() -> Value {
        json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {
                "url": {
                    "type": "string",
                    "format": "uri",
                    "pattern": "^[Hh][Tt][Tt][Pp][Ss]?://",
                    "maxLength": 2048
                }
            },
            "required": ["url"],
            "additionalProperties": false
        })
    }

    fn paths(r: Result<(), Vec<Violation>>) -> Vec<String> {
        r.unwrap_err().into_iter().map(|v| v.path).collect()
    }

    #[test]
    fn the_page_to_markdown_schema_checks_urls() {
        let s = InputSchema::compile(&page_schema()).unwrap();
        assert!(
            s.check(&json!({"url": "https://example.com/a?b=c"}))
                .is_ok()
        );
        assert_eq!(paths(s.check(&json!({}))), [""]);
        assert_eq!(paths(s.check(&json!({"url": 7}))), ["/url"]);
        assert_eq!(paths(s.check(&json!({"url": "ftp://x"}))), ["/url"]);
        assert_eq!(paths(s.check(&json!({"url": "https://a b"}))), ["/url"]);
        let long = format!("https://{}", "a".repeat(2048));
        assert_eq!(paths(s.check(&json!({ "url": long }))), ["/url"]);
        let e = s
            .check(&json!({"url": "https://x", "extra": 1}))
            .unwrap_err();
        assert_eq!(e[0].path, "/extra");
        assert_eq!(e[0].to_string(), "/extra: is not an allowed property");
        assert_eq!(
            s.check(&json!([1])).unwrap_err()[0].message,
            "must be of type object, not array"
        );
    }

    #[test]
    fn every_checked_keyword_refuses_and_accepts() {
        let s = InputSchema::compile(&json!({
            "type": "object",
            "properties": {
                "n": {"type": "integer", "minimum": 1, "maximum": 10, "multipleOf": 2},
                "x": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 5},
                "tags": {"type": "array", "items": {"type": "string", "minLength": 2},
                         "minItems": 1, "maxItems": 3, "uniqueItems": true},
                "mode": {"enum": ["fast", "slow"]},
                "v": {"const": 1},
                "o": {"type": ["object", "null"], "minProperties": 1, "maxProperties": 1,
                      "additionalProperties": {"type": "boolean"}}
            }
        }))
        .unwrap();
        let ok = json!({"n": 4, "x": 2.5, "tags": ["ab", "cd"], "mode": "fast", "v": 1,
                        "o": {"k": true}});
        assert!(s.check(&ok).is_ok());
        assert!(
            s.check(&json!({"o": null, "n": 4.0})).is_ok(),
            "4.0 is an integer"
        );
        for (bad, path) in [
            (json!({"n": 0}), "/n"),
            (json!({"n": 12}), "/n"),
            (json!({"n": 3}), "/n"),
            (json!({"n": 2.5}), "/n"),
            (json!({"x": 0}), "/x"),
            (json!({"x": 5}), "/x"),
            (json!({"tags": []}), "/tags"),
            (json!({"tags": ["ab", "ab"]}), "/tags"),
            (json!({"tags": ["a"]}), "/tags/0"),
            (json!({"tags": ["ab", "cd", "ef", "gh"]}), "/tags"),
            (json!({"mode": "medium"}), "/mode"),
            (json!({"v": 2}), "/v"),
            (json!({"o": {}}), "/o"),
            (json!({"o": {"k": 1}}), "/o/k"),
        ] {
            assert_eq!(paths(s.check(&bad)), [path], "{bad}");
        }
    }

    #[test]
    fn violations_are_capped_and_pointers_escaped() {
        let s = InputSchema::compile(&json!({"additionalProperties": false})).unwrap();
        let many: Map<String, Value> = (0..20).map(|i| (format!("k{i}"), json!(i))).collect();
        assert_eq!(
            s.check(&Value::Object(many)).unwrap_err().len(),
            MAX_VIOLATIONS
        );
        assert_eq!(paths(s.check(&json!({"a/b~c": 1}))), ["/a~1b~0c"]);
        assert!(
            InputSchema::compile(&json!(true))
                .unwrap()
                .check(&json!(1))
                .is_ok()
        );
        assert!(
            InputSchema::compile(&json!(false))
                .unwrap()
                .check(&json!(1))
                .is_err()
        );
    }

    #[test]
    fn unsupported_or_malformed_schemas_are_refused_with_their_place() {
        for (schema, path) in [
            (json!({"oneOf": []}), "/oneOf"),
            (
                json!({"properties": {"a": {"$ref": "#"}}}),
                "/properties/a/$ref",
            ),
            (json!({"type": "text"}), "/type"),
            (json!({"format": "email"}), "/format"),
            (json!({"pattern": "(?<=a)b"}), "/pattern"),
            (json!({"pattern": "a{1000}{1000}"}), "/pattern"),
            (json!({"pattern": "\\w{2000}"}), "/pattern"),
            (json!({"minLength": -1}), "/minLength"),
            (json!({"multipleOf": 0}), "/multipleOf"),
            (json!({"required": ["a", "a"]}), "/required"),
            (json!({"enum": []}), "/enum"),
            (json!([]), ""),
        ] {
            let e = InputSchema::compile(&schema).unwrap_err();
            assert_eq!(e.path, path, "{schema}: {e}");
        }
        let mut deep = json!({});
        for _ in 0..=MAX_DEPTH {
            deep = json!({ "items": deep });
        }
        assert!(InputSchema::compile(&deep).is_err());
        assert!(InputSchema::compile(&json!({"title": "x", "description": "y"})).is_ok());
        let many: Map<String, Value> = (0..=MAX_PATTERNS)
            .map(|i| (format!("p{i}"), json!({"pattern": "^a"})))
            .collect();
        let e = InputSchema::compile(&json!({ "properties": many })).unwrap_err();
        assert!(e.message.contains("at most"), "{e}");
        // Bounds at the edge of the integer range neither overflow nor wrap.
        let s = InputSchema::compile(&json!({"minLength": 1, "maxLength": u64::MAX})).unwrap();
        assert!(s.check(&json!("abc")).is_ok());
        assert!(s.check(&json!("")).is_err());
    }
}
