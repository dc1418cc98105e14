//! Operator grants: what a worker's operator permits a capability to use.
//!
//! A worker sells only what its operator offers and grants: which snapshotters may run,
//! whether the host may reach the public web for it, and the most fuel, memory, wall time and
//! output it accepts. [`Grants::check`] refuses a manifest that asks for more, naming what,
//! before any work is done.
//!
//! A manifest lists its snapshotters as alternatives in order of preference, so it needs
//! at least one of them granted; the run then uses the first granted one (see
//! [`Grants::snapshotters_for`]).

use std::collections::BTreeSet;

use d402_capabilities::{Egress, Manifest, SnapshotterKind, manifest::WASM_ABI};

use crate::snapshot::snapshotter_name;

/// Why a manifest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// The operator does not offer this capability.
    #[error("{0} is not offered by this worker")]
    NotOffered(String),
    /// None of the snapshotters the manifest can use is granted.
    #[error(
        "the manifest needs one of the snapshotters [{asked}] and this worker grants [{granted}]"
    )]
    SnapshotterNotGranted {
        /// What the manifest lists.
        asked: String,
        /// What the operator grants.
        granted: String,
    },
    /// The manifest needs egress and the operator grants none.
    #[error("the manifest needs public_http egress and this worker grants none")]
    EgressNotGranted,
    /// A limit above the operator's maximum.
    #[error("the manifest asks for {limit} {asked}, above this worker's maximum of {granted}")]
    LimitAboveGrant {
        /// Which limit (`fuel`, `memory_bytes`, `wall_time_ms`, `output_bytes`).
        limit: &'static str,
        /// The manifest's value.
        asked: u64,
        /// The operator's maximum.
        granted: u64,
    },
    /// An ABI this worker does not run.
    #[error("implementation ABI {0:?} is not supported (this worker runs {WASM_ABI:?})")]
    UnsupportedAbi(String),
}

/// What the operator grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grants {
    /// Capabilities offered (`id@version`); `None` leaves the offer check to the caller.
    pub offers: Option<BTreeSet<String>>,
    /// Snapshotters the operator lets run.
    pub snapshotters: BTreeSet<SnapshotterKind>,
    /// Host-side egress allowed (always through the URL policy).
    pub egress: Egress,
    /// Most fuel per run.
    pub max_fuel: u64,
    /// Most linear memory per run, in bytes.
    pub max_memory_bytes: u64,
    /// Longest run, snapshot included, in milliseconds.
    pub max_wall_time_ms: u64,
    /// Largest output, in bytes.
    pub max_output_bytes: u64,
}

impl Default for Grants {
    /// Conservative defaults for a worker: both snapshotters, public egress, 5·10⁹ fuel,
    /// 512 MiB memory, 60 s, 4 MiB output; no offer list.
    fn default() -> Self {
        Grants {
            offers: None,
            snapshotters: [SnapshotterKind::Fetch, SnapshotterKind::Playwright]
                .into_iter()
                .collect(),
            egress: Egress::PublicHttp,
            max_fuel: 5_000_000_000,
            max_memory_bytes: 512 * 1024 * 1024,
            max_wall_time_ms: 60_000,
            max_output_bytes: d402_protocol::messages::MAX_OUTPUT as u64,
        }
    }
}

fn names(kinds: impl IntoIterator<Item = SnapshotterKind>) -> String {
    kinds
        .into_iter()
        .map(snapshotter_name)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Grants {
    /// Grants that allow whatever a valid manifest may ask for (for `d402 capability run`
    /// on an author's machine). Not for selling work.
    pub fn permissive() -> Self {
        use d402_capabilities::manifest::bounds;
        Grants {
            offers: None,
            snapshotters: [SnapshotterKind::Fetch, SnapshotterKind::Playwright]
                .into_iter()
                .collect(),
            egress: Egress::PublicHttp,
            max_fuel: bounds::MAX_FUEL,
            max_memory_bytes: bounds::MAX_MEMORY_BYTES,
            max_wall_time_ms: bounds::MAX_WALL_TIME_MS,
            max_output_bytes: bounds::MAX_OUTPUT_BYTES,
        }
    }

    /// Refuses `manifest` if it asks for anything not granted.
    pub fn check(&self, manifest: &Manifest) -> Result<(), GrantError> {
        if let Some(offers) = &self.offers {
            let id = manifest.capability().to_string();
            if !offers.contains(&id) {
                return Err(GrantError::NotOffered(id));
            }
        }
        if manifest.implementation.abi != WASM_ABI {
            return Err(GrantError::UnsupportedAbi(
                manifest.implementation.abi.clone(),
            ));
        }
        if manifest.permissions.egress == Egress::PublicHttp && self.egress == Egress::None {
            return Err(GrantError::EgressNotGranted);
        }
        let asked = &manifest.permissions.snapshotters;
        if !asked.is_empty() && self.snapshotters_for(manifest).is_empty() {
            return Err(GrantError::SnapshotterNotGranted {
                asked: names(asked.iter().copied()),
                granted: names(self.snapshotters.iter().copied()),
            });
        }
        let l = &manifest.limits;
        for (limit, asked, granted) in [
            ("fuel", l.fuel, self.max_fuel),
            ("memory_bytes", l.memory_bytes, self.max_memory_bytes),
            ("wall_time_ms", l.wall_time_ms, self.max_wall_time_ms),
            ("output_bytes", l.output_bytes, self.max_output_bytes),
        ] {
            if asked > granted {
                return Err(GrantError::LimitAboveGrant {
                    limit,
                    asked,
                    granted,
                });
            }
        }
        Ok(())
    }

    /// The manifest's snapshotters that are granted, in the manifest's order of preference.
    pub fn snapshotters_for(&self, manifest: &Manifest) -> Vec<SnapshotterKind> {
        manifest
            .permissions
            .snapshotters
            .iter()
            .copied()
            .filter(|k| self.snapshotters.contains(k))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use d402_capabilities::{Implementation, Limits, Permissions};
    use d402_protocol::Cid;

    fn manifest() -> Manifest {
        Manifest {
            format: 1,
            id: "web.page_to_markdown".into(),
            version: 1,
            description: "x".into(),
            implementation: Implementation {
                cid: Cid::raw(b"wasm"),
                abi: WASM_ABI.into(),
            },
            input_schema: serde_json::json!({"type": "object"}),
            output_schema: serde_json::json!({"type": "string"}),
            permissions: Permissions {
                snapshotters: vec![SnapshotterKind::Playwright, SnapshotterKind::Fetch],
                egress: Egress::PublicHttp,
            },
            limits: Limits {
                fuel: 1_000_000,
                memory_bytes: 64 * 1024 * 1024,
                wall_time_ms: 30_000,
                output_bytes: 1024 * 1024,
            },
        }
    }

    #[test]
    fn default_grants_accept_a_modest_manifest() {
        Grants::default().check(&manifest()).unwrap();
    }

    #[test]
    fn each_excess_is_refused_with_its_reason() {
        let g = Grants::default();
        let mut m = manifest();
        m.limits.fuel = g.max_fuel + 1;
        assert_eq!(
            g.check(&m),
            Err(GrantError::LimitAboveGrant {
                limit: "fuel",
                asked: g.max_fuel + 1,
                granted: g.max_fuel
            })
        );
        let mut m = manifest();
        m.limits.memory_bytes = 1024 * 1024 * 1024;
        assert!(matches!(
            g.check(&m),
            Err(GrantError::LimitAboveGrant {
                limit: "memory_bytes",
                ..
            })
        ));
        let mut m = manifest();
        m.limits.wall_time_ms = 600_000;
        assert!(
            g.check(&m)
                .unwrap_err()
                .to_string()
                .contains("wall_time_ms 600000")
        );

        let no_egress = Grants {
            egress: Egress::None,
            ..Grants::default()
        };
        assert_eq!(
            no_egress.check(&manifest()),
            Err(GrantError::EgressNotGranted)
        );

        let fetch_only = Grants {
            snapshotters: [SnapshotterKind::Fetch].into_iter().collect(),
            ..Grants::default()
        };
        fetch_only.check(&manifest()).unwrap();
        assert_eq!(
            fetch_only.snapshotters_for(&manifest()),
            vec![SnapshotterKind::Fetch]
        );
        let mut m = manifest();
        m.permissions.snapshotters = vec![SnapshotterKind::Playwright];
        let err = fetch_only.check(&m).unwrap_err();
        assert!(err.to_string().contains("playwright"), "{err}");

        let offered = Grants {
            offers: Some(["other.cap@1".to_string()].into_iter().collect()),
            ..Grants::default()
        };
        assert!(matches!(
            offered.check(&manifest()),
            Err(GrantError::NotOffered(_))
        ));
    }
}
