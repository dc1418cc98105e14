//! libp2p protocol names and their size caps and timeouts.

/// Kademlia DHT protocol.
pub const KAD: &str = "/d402/kad/1.0.0";
/// Bid request → bid response.
pub const BID: &str = "/d402/bid/1";
/// Lease → lease ack.
pub const LEASE: &str = "/d402/lease/1";
/// Many leases on one long-lived stream, each a frame `u32 length ‖ u64 id ‖ lease`,
/// answered by a frame `u32 length ‖ u64 id ‖ lease ack` in any order (a gateway's pipe to
/// a worker; [`LEASE`] is the fallback).
pub const LEASE_PIPE: &str = "/d402/lease-pipe/1";
/// Claim → claim ack.
pub const CLAIM: &str = "/d402/claim/1";
/// Verdict request → verdict.
pub const VERDICT: &str = "/d402/verdict/1";
/// Content-addressed blob exchange (snapshots, manifests, Wasm modules).
pub const BLOB: &str = "/d402/blob/1";

/// Largest blob served over [`BLOB`] (a snapshot or a Wasm module).
pub const MAX_BLOB: usize = 16 * 1024 * 1024;

/// Default request timeout for bid, lease and claim exchanges, in milliseconds.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
