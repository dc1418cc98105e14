//! Capability manifests.
//!
//! A manifest names a capability (`namespace.name`) and version, pins its Wasm
//! implementation by `raw` CID, describes its input and output with JSON Schemas, and says
//! what it needs: permissions (snapshotters, egress) and resource limits. JSON is the form
//! people edit; the manifest CID is the `dag-cbor` CID of its canonical CBOR.

use serde::{Deserialize, Serialize};

use d402_protocol::{CapabilityRef, Cid, Codec, cbor, types::validate_capability_id};

use crate::error::{CapabilityError, Result};

/// Manifest format version this implementation writes and reads.
pub const MANIFEST_FORMAT: u16 = 1;
/// Largest canonical manifest accepted.
pub const MAX_MANIFEST: usize = 64 * 1024;
/// The ABI every implementation must speak (documented in `docs/DECISIONS.md`).
pub const WASM_ABI: &str = "d402-wasm-1";
/// Largest manifest JSON file read.
pub const MAX_MANIFEST_JSON: usize = 256 * 1024;
/// Largest Wasm module accepted (the blob-exchange cap).
pub const MAX_WASM: usize = d402_protocol::protocol_ids::MAX_BLOB;

/// The smallest valid Wasm module: the magic number and version 1, no sections.
///
/// Its raw CID is the template's placeholder implementation CID; authors replace it with the
/// CID of their own module (`d402 capability template --wasm module.wasm` fills it in).
pub const EMPTY_WASM_MODULE: &[u8] = b"\0asm\x01\0\0\0";

/// The raw CID of [`EMPTY_WASM_MODULE`], the template's placeholder implementation.
pub fn placeholder_implementation_cid() -> Cid {
    Cid::raw(EMPTY_WASM_MODULE)
}

/// Checks the size and the header of a Wasm binary: the `\0asm` magic followed by either
/// core module version 1 or the component-model layer 1 preamble.
pub fn check_wasm_binary(wasm: &[u8]) -> Result<()> {
    if wasm.len() > MAX_WASM {
        return Err(CapabilityError::TooLarge {
            what: "Wasm module",
            len: wasm.len(),
            max: MAX_WASM,
        });
    }
    const CORE: &[u8] = b"\0asm\x01\0\0\0";
    const COMPONENT: &[u8] = b"\0asm\x0d\0\x01\0";
    let header = wasm.get(..8).unwrap_or(wasm);
    if header != CORE && header != COMPONENT {
        return Err(CapabilityError::invalid(
            "wasm",
            "is not a Wasm binary (expected the \\0asm magic and version 1, or a component)",
        ));
    }
    Ok(())
}

/// Upper bounds a manifest may ask for; operators grant less.
pub mod bounds {
    /// Most fuel a manifest may ask for.
    pub const MAX_FUEL: u64 = 10_000_000_000;
    /// Most linear memory a manifest may ask for (4 GiB, the wasm32 limit).
    pub const MAX_MEMORY_BYTES: u64 = 4 * 1024 * 1024 * 1024;
    /// Longest wall time a manifest may ask for (10 minutes).
    pub const MAX_WALL_TIME_MS: u64 = 600_000;
    /// Largest output a manifest may declare (the claim cap).
    pub const MAX_OUTPUT_BYTES: u64 = d402_protocol::messages::MAX_OUTPUT as u64;
}

/// A snapshotter the capability asks the worker to run before the Wasm step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotterKind {
    /// A plain HTTP(S) fetch under the URL policy.
    Fetch,
    /// Headless Chromium under the URL policy.
    Playwright,
}

/// Network access the capability asks for on the host side. Wasm itself never has sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Egress {
    /// No network access at all.
    None,
    /// Public HTTP(S) through the URL policy (never private, loopback or metadata addresses).
    PublicHttp,
}

/// What the capability asks the worker to permit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Permissions {
    /// Snapshotters it can use, in order of preference; empty when it takes no snapshot.
    pub snapshotters: Vec<SnapshotterKind>,
    /// Host-side egress it needs.
    pub egress: Egress,
}

/// Resource limits for one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Wasm fuel (deterministic; also the billing unit).
    pub fuel: u64,
    /// Largest linear memory, in bytes.
    pub memory_bytes: u64,
    /// Wall-clock backstop for the whole run, snapshot included, in milliseconds.
    pub wall_time_ms: u64,
    /// Largest output, in bytes.
    pub output_bytes: u64,
}

/// The Wasm implementation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Implementation {
    /// `raw` CID of the module bytes.
    pub cid: Cid,
    /// The host ABI, [`WASM_ABI`].
    pub abi: String,
}

/// A capability manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Format version, [`MANIFEST_FORMAT`].
    pub format: u16,
    /// `namespace.name`.
    pub id: String,
    /// Positive integer version.
    pub version: u32,
    /// What it does, for people.
    pub description: String,
    /// The Wasm module.
    pub implementation: Implementation,
    /// JSON Schema of the input (integers only: no floats in signed data).
    pub input_schema: serde_json::Value,
    /// JSON Schema of the output.
    pub output_schema: serde_json::Value,
    /// What it needs permitted.
    pub permissions: Permissions,
    /// What it needs granted.
    pub limits: Limits,
}

impl Manifest {
    /// `id@version`.
    pub fn capability(&self) -> CapabilityRef {
        CapabilityRef {
            id: self.id.clone(),
            version: self.version,
        }
    }

    /// Namespace of the id (before the last dot).
    pub fn namespace(&self) -> &str {
        self.id.rsplit_once('.').map(|(ns, _)| ns).unwrap_or("")
    }

    /// Checks every rule; the error names the field and the rule.
    pub fn validate(&self) -> Result<()> {
        if self.format != MANIFEST_FORMAT {
            return Err(CapabilityError::invalid(
                "format",
                format!("must be {MANIFEST_FORMAT}"),
            ));
        }
        validate_capability_id(&self.id).map_err(|e| match e {
            d402_protocol::ProtocolError::InvalidField { reason, .. } => {
                CapabilityError::invalid("id", reason)
            }
            other => CapabilityError::invalid("id", other.to_string()),
        })?;
        if self.version == 0 {
            return Err(CapabilityError::invalid("version", "must be 1 or more"));
        }
        if self.description.len() > 4096 {
            return Err(CapabilityError::invalid(
                "description",
                "at most 4096 bytes",
            ));
        }
        if self.implementation.cid.codec() != Codec::Raw {
            return Err(CapabilityError::invalid(
                "implementation.cid",
                "must be a raw CID (bafk…) of the Wasm module bytes",
            ));
        }
        if self.implementation.abi != WASM_ABI {
            return Err(CapabilityError::invalid(
                "implementation.abi",
                format!("must be {WASM_ABI:?}"),
            ));
        }
        for (field, schema) in [
            ("input_schema", &self.input_schema),
            ("output_schema", &self.output_schema),
        ] {
            check_schema(field, schema)?;
        }
        // The input schema is enforced (gateway and worker), so it must use only what the
        // checks understand; the output schema is documentation.
        self.input_checks()?;
        let mut seen = Vec::new();
        for s in &self.permissions.snapshotters {
            if seen.contains(s) {
                return Err(CapabilityError::invalid(
                    "permissions.snapshotters",
                    "lists a snapshotter twice",
                ));
            }
            seen.push(*s);
        }
        if !self.permissions.snapshotters.is_empty() && self.permissions.egress == Egress::None {
            return Err(CapabilityError::invalid(
                "permissions.egress",
                "snapshotters need egress public_http",
            ));
        }
        let l = &self.limits;
        for (field, value, max) in [
            ("limits.fuel", l.fuel, bounds::MAX_FUEL),
            (
                "limits.memory_bytes",
                l.memory_bytes,
                bounds::MAX_MEMORY_BYTES,
            ),
            (
                "limits.wall_time_ms",
                l.wall_time_ms,
                bounds::MAX_WALL_TIME_MS,
            ),
            (
                "limits.output_bytes",
                l.output_bytes,
                bounds::MAX_OUTPUT_BYTES,
            ),
        ] {
            if value == 0 || value > max {
                return Err(CapabilityError::invalid(
                    field,
                    format!("must be between 1 and {max}"),
                ));
            }
        }
        if !l.memory_bytes.is_multiple_of(65_536) {
            return Err(CapabilityError::invalid(
                "limits.memory_bytes",
                "must be a multiple of the 64 KiB Wasm page",
            ));
        }
        self.cid().map_err(|e| match e {
            CapabilityError::Protocol(p) => {
                CapabilityError::invalid("manifest", format!("has no canonical form: {p}"))
            }
            other => other,
        })?;
        Ok(())
    }

    /// A complete, valid manifest for `id@version` with conservative defaults, for an author
    /// to edit: a generic object input (or a `url` input when `snapshotters` is not empty),
    /// a generic object output, 10^9 fuel, 64 MiB memory, 30 s wall time, 1 MiB output.
    ///
    /// `implementation` is the raw CID of the Wasm module; pass
    /// [`placeholder_implementation_cid`] when the module does not exist yet.
    pub fn template(
        id: &str,
        version: u32,
        implementation: Cid,
        snapshotters: Vec<SnapshotterKind>,
    ) -> Result<Self> {
        let (egress, input_schema) = if snapshotters.is_empty() {
            (
                Egress::None,
                serde_json::json!({
                    "type": "object",
                    "properties": {},
                    "additionalProperties": true
                }),
            )
        } else {
            (
                Egress::PublicHttp,
                serde_json::json!({
                    "type": "object",
                    "required": ["url"],
                    "properties": {
                        "url": { "type": "string", "maxLength": d402_protocol::messages::MAX_URL }
                    },
                    "additionalProperties": false
                }),
            )
        };
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            id: id.to_string(),
            version,
            description: format!(
                "{id}@{version}: describe what this capability does, what its input and \
                 output mean, and what it needs."
            ),
            implementation: Implementation {
                cid: implementation,
                abi: WASM_ABI.to_string(),
            },
            input_schema,
            output_schema: serde_json::json!({ "type": "object" }),
            permissions: Permissions {
                snapshotters,
                egress,
            },
            limits: Limits {
                fuel: 1_000_000_000,
                memory_bytes: 64 * 1024 * 1024,
                wall_time_ms: 30_000,
                output_bytes: 1024 * 1024,
            },
        };
        manifest.validate()?;
        Ok(manifest)
    }

    /// Parses the JSON form (at most [`MAX_MANIFEST_JSON`] bytes, no unknown fields) and
    /// validates it.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        if bytes.len() > MAX_MANIFEST_JSON {
            return Err(CapabilityError::TooLarge {
                what: "manifest JSON",
                len: bytes.len(),
                max: MAX_MANIFEST_JSON,
            });
        }
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|e| CapabilityError::json("manifest", &e))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// The JSON form, pretty-printed.
    pub fn to_json_pretty(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(|e| CapabilityError::json("manifest", &e))
    }

    /// Checks that `wasm` is a Wasm binary within [`MAX_WASM`] bytes whose raw CID is the
    /// manifest's implementation CID.
    pub fn check_wasm(&self, wasm: &[u8]) -> Result<()> {
        check_wasm_binary(wasm)?;
        let actual = Cid::raw(wasm);
        if actual != self.implementation.cid {
            return Err(CapabilityError::invalid(
                "implementation.cid",
                format!(
                    "is {} but the Wasm file hashes to {actual}: the manifest does not pin this module",
                    self.implementation.cid
                ),
            ));
        }
        Ok(())
    }

    /// Whether the implementation CID is still the template's placeholder.
    pub fn has_placeholder_implementation(&self) -> bool {
        self.implementation.cid == placeholder_implementation_cid()
    }

    /// Canonical CBOR bytes (what is hashed and signed).
    pub fn to_canonical(&self) -> Result<Vec<u8>> {
        Ok(cbor::to_canonical(self)?)
    }

    /// Decodes canonical CBOR and validates.
    pub fn from_canonical(bytes: &[u8]) -> Result<Self> {
        let m: Manifest = cbor::from_canonical(bytes, MAX_MANIFEST, "manifest")?;
        m.validate()?;
        Ok(m)
    }

    /// The manifest CID: `dag-cbor` CID of the canonical CBOR.
    pub fn cid(&self) -> Result<Cid> {
        let bytes = self.to_canonical()?;
        if bytes.len() > MAX_MANIFEST {
            return Err(CapabilityError::invalid(
                "manifest",
                format!("canonical form is over {MAX_MANIFEST} bytes"),
            ));
        }
        Ok(Cid::dag_cbor(&bytes))
    }
}

impl Manifest {
    /// The compiled `input_schema` (see [`crate::schema`]) that task inputs must satisfy.
    pub fn input_checks(&self) -> Result<crate::schema::InputSchema> {
        crate::schema::InputSchema::compile(&self.input_schema)
            .map_err(|e| CapabilityError::invalid(format!("input_schema{}", e.path), e.message))
    }
}

fn check_schema(field: &str, schema: &serde_json::Value) -> Result<()> {
    if !schema.is_object() {
        return Err(CapabilityError::invalid(
            field,
            "must be a JSON Schema object",
        ));
    }
    fn no_floats(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::Number(n) => n.is_i64() || n.is_u64(),
            serde_json::Value::Array(a) => a.iter().all(no_floats),
            serde_json::Value::Object(o) => o.values().all(no_floats),
            _ => true,
        }
    }
    if !no_floats(schema) {
        return Err(CapabilityError::invalid(
            field,
            "must not contain non-integer numbers (no floats in signed data)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> Manifest {
        Manifest::template(
            "example.extract_product",
            1,
            placeholder_implementation_cid(),
            vec![],
        )
        .unwrap()
    }

    #[test]
    fn template_is_valid_and_round_trips() {
        for snapshotters in [
            vec![],
            vec![SnapshotterKind::Playwright, SnapshotterKind::Fetch],
        ] {
            let m = Manifest::template(
                "example.extract_product",
                1,
                placeholder_implementation_cid(),
                snapshotters,
            )
            .unwrap();
            m.validate().unwrap();
            assert!(m.has_placeholder_implementation());
            let json = m.to_json_pretty().unwrap();
            let back = Manifest::from_json(json.as_bytes()).unwrap();
            assert_eq!(back, m);
            assert_eq!(back.cid().unwrap(), m.cid().unwrap());
            let cbor = m.to_canonical().unwrap();
            assert_eq!(Manifest::from_canonical(&cbor).unwrap(), m);
        }
        assert!(
            Manifest::template(
                "extract_product",
                1,
                placeholder_implementation_cid(),
                vec![]
            )
            .is_err()
        );
        assert!(
            Manifest::template("example.x", 0, placeholder_implementation_cid(), vec![]).is_err()
        );
    }

    #[test]
    fn placeholder_is_the_empty_module() {
        check_wasm_binary(EMPTY_WASM_MODULE).unwrap();
        template().check_wasm(EMPTY_WASM_MODULE).unwrap();
    }

    #[test]
    fn wasm_must_match_and_be_wasm() {
        let m = template();
        let other = b"\0asm\x01\0\0\0\x00\x00";
        let err = m.check_wasm(other).unwrap_err().to_string();
        assert!(err.starts_with("implementation.cid: "), "{err}");
        let err = m.check_wasm(b"not wasm at all").unwrap_err().to_string();
        assert!(err.starts_with("wasm: "), "{err}");
        check_wasm_binary(b"\0asm\x0d\0\x01\0").unwrap();
        assert!(check_wasm_binary(b"\0asm").is_err());
    }

    fn json_with(edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let mut v = serde_json::to_value(template()).unwrap();
        edit(&mut v);
        serde_json::to_vec(&v).unwrap()
    }

    fn json_err(edit: impl FnOnce(&mut serde_json::Value)) -> String {
        Manifest::from_json(&json_with(edit))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn json_errors_name_the_field_and_rule() {
        let e = json_err(|v| v["id"] = "extract_product".into());
        assert!(e.starts_with("id: ") && e.contains("namespace.name"), "{e}");
        let e = json_err(|v| v["bogus"] = 1.into());
        assert!(e.contains("unknown field `bogus`"), "{e}");
        let e = json_err(|v| v["limits"]["extra"] = 1.into());
        assert!(e.contains("unknown field `extra`"), "{e}");
        let e = json_err(|v| v["limits"]["fuel"] = 0.into());
        assert!(e.starts_with("limits.fuel: "), "{e}");
        let e = json_err(|v| v["limits"]["memory_bytes"] = 1000.into());
        assert!(e.starts_with("limits.memory_bytes: "), "{e}");
        let e = json_err(|v| v["version"] = 0.into());
        assert!(e.starts_with("version: "), "{e}");
        let e = json_err(|v| v["input_schema"]["maximum"] = serde_json::json!(1.5));
        assert!(e.starts_with("input_schema: "), "{e}");
        let e = json_err(|v| v["output_schema"] = serde_json::json!([]));
        assert!(e.starts_with("output_schema: "), "{e}");
        // The input schema is enforced, so it may use only the keywords the checks know.
        let e = json_err(|v| v["input_schema"]["oneOf"] = serde_json::json!([]));
        assert!(e.starts_with("input_schema/oneOf: "), "{e}");
        let e = json_err(|v| v["implementation"]["abi"] = "wasi".into());
        assert!(e.starts_with("implementation.abi: "), "{e}");
        let e = json_err(|v| v["implementation"]["cid"] = Cid::dag_cbor(b"x").to_string().into());
        assert!(e.starts_with("implementation.cid: "), "{e}");
        let e = json_err(|v| v["permissions"]["snapshotters"] = serde_json::json!(["fetch"]));
        assert!(e.starts_with("permissions.egress: "), "{e}");
        let e = json_err(|v| v["permissions"]["snapshotters"] = serde_json::json!(["ftp"]));
        assert!(e.contains("unknown variant"), "{e}");
        let e = Manifest::from_json(b"{ not json").unwrap_err().to_string();
        assert!(e.starts_with("manifest is not valid JSON"), "{e}");
        let big = vec![b' '; MAX_MANIFEST_JSON + 1];
        assert!(matches!(
            Manifest::from_json(&big),
            Err(CapabilityError::TooLarge { .. })
        ));
        for e in [
            json_err(|v| v["id"] = "Example.x".into()),
            Manifest::from_json(b"{").unwrap_err().to_string(),
        ] {
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
