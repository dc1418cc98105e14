//! The typed messages of a paid task (DESIGN.md §3), one module per kind.
//!
//! Every body carries a version (`v`), has a size cap checked before decoding, a signature
//! domain of its own, and rules checked by [`Signable::validate`](crate::Signable::validate)
//! both before signing and after decoding.

mod bid;
mod claim;
mod lease;
mod offer;
mod receipt;
mod verdict;

pub use bid::{Bid, BidRequest, BidResponse, DeclineReason, MAX_BID_USES};
pub use claim::{Claim, ClaimAck, SnapshotMeta};
pub use lease::{Lease, LeaseAck};
pub use offer::Offer;
pub use receipt::{PayeeRole, SettlementReceipt, Transfer};
pub use verdict::{Verdict, VerdictOutcome};

use crate::{cbor, error::Result};
use serde::{Serialize, de::DeserializeOwned};

/// An unsigned wire message (a response or acknowledgement) with a size cap.
pub trait WireMessage: Serialize + DeserializeOwned {
    /// Name used in errors.
    const KIND: &'static str;
    /// Largest encoding accepted.
    const MAX_SIZE: usize;

    /// Canonical bytes.
    fn to_bytes(&self) -> Result<Vec<u8>> {
        cbor::to_canonical(self)
    }

    /// Decodes with the size cap and the canonical check.
    fn from_bytes(bytes: &[u8]) -> Result<Self> {
        cbor::from_canonical(bytes, Self::MAX_SIZE, Self::KIND)
    }
}

/// Largest task input carried in a lease (the input itself, e.g. a URL as JSON).
pub const MAX_INPUT: usize = 64 * 1024;
/// Largest task output carried in a claim.
pub const MAX_OUTPUT: usize = 4 * 1024 * 1024;
/// Longest free-text reason or detail in a message.
pub const MAX_REASON: usize = 512;
/// Longest URL carried in snapshot metadata.
pub const MAX_URL: usize = 2048;
