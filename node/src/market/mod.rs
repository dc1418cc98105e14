//! The market: how a gateway buys work from workers it does not trust.
//!
//! The decisions, free of any transport so that they can be tested on their own:
//! - [`selection`]: which bids to lease, by price and reputation within the budget, and why
//!   each other bid was not chosen;
//! - [`quorum`]: when claims agree on an output, which claims are rejected, and when a
//!   quorum has become impossible;
//! - [`reputation`]: per-worker counters, the score that drives selection, and bans.
//!
//! Driven over libp2p request-response ([`crate::net::codec`]):
//! - [`worker`]: bids, leases, runs and claims;
//! - [`coordinator`]: the gateway's side, persisted in [`tasks`], leasing on the
//!   [`standing`] bids it holds when it can;
//! - [`blobs`]: snapshots, manifests and modules by CID;
//! - [`busy`]: backing off from workers whose slots are all taken;
//! - [`validator`]: re-runs a claim's deterministic step and signs a verdict;
//! - [`service`]: dispatches inbound requests from the bounded queue;
//! - [`ops`]: the status `d402 ops-monitor` shows, served on the node's control socket.

pub mod blobs;
pub mod busy;
pub mod coordinator;
pub mod ops;
pub mod quorum;
pub mod reputation;
pub mod selection;
pub mod service;
pub mod standing;
pub mod tasks;
pub mod validator;
pub mod worker;

/// Now, in Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
