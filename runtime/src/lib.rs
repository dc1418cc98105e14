//! The d402 worker runtime (not built yet).
//!
//! This crate will hold what a worker runs when it sells a capability: the Wasm executor on
//! wasmtime (fuel, epoch deadline, memory and table limits, no ambient authority, a module
//! cache keyed by implementation CID), the snapshotters (`fetch` and headless Chromium) that
//! fetch pages under the URL policy (no private, loopback, link-local or metadata
//! addresses after DNS and on every redirect), and the operator's grants. It is tracked by
//! the runtime issue; until then it exports nothing.
