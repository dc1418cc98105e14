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
        validate_capability_id(&self.id)
            .map_err(|e| CapabilityError::invalid("id", e.to_string()))?;
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
        Ok(())
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
