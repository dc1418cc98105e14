//! The d402 worker runtime: what a worker runs when it sells a capability.
//!
//! - [`executor`]: the sandboxed Wasm executor on wasmtime (fuel, epoch deadline, memory
//!   and table limits, no imports at all, a module cache keyed by implementation CID);
//! - [`policy`]: the URL policy every snapshotter obeys (http(s) only, no loopback,
//!   private, link-local, CGNAT or metadata addresses after DNS and on every redirect);
//! - [`fetch`]: the plain HTTP snapshotter; [`chromium`]: the headless-Chromium
//!   (`playwright`) snapshotter and its egress [`proxy`];
//! - [`grants`]: what the operator permits, checked before any work;
//! - [`runner`]: a whole capability run (grants, snapshot, Wasm).

pub mod chromium;
pub mod executor;
pub mod fetch;
pub mod grants;
pub mod policy;
pub mod proxy;
pub mod runner;
pub mod snapshot;

pub use chromium::{ChromiumConfig, ChromiumSnapshotter};
pub use executor::{
    ExecError, Executor, ExecutorConfig, Outcome, PreparedModule, RunLimits, TrapReason,
};
pub use fetch::{FetchConfig, FetchSnapshotter};
pub use grants::{GrantError, Grants};
pub use policy::{PolicyError, UrlPolicy};
pub use runner::{GivenSnapshot, RunError, RunOutput, Runner, Snapshotters};
pub use snapshot::{Snapshot, SnapshotError};
