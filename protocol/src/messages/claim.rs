use serde::{Deserialize, Serialize};

use crate::{
    Cid, Signable,
    error::{ProtocolError, Result},
    messages::{MAX_OUTPUT, MAX_REASON, MAX_URL, WireMessage},
    types::{TaskId, UnixMillis, check_len, check_version},
};

/// What a snapshot was: enough to check that a pinned snapshot is plausible.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// The URL the page was finally loaded from, after redirects.
    pub final_url: String,
    /// HTTP status of the final response.
    pub status: u16,
    /// Length of the snapshot in bytes.
    pub len: u64,
    /// Which snapshotter took it (`fetch`, `playwright`).
    pub snapshotter: String,
    /// When it was taken.
    pub taken_at: UnixMillis,
}

/// A worker's result for a lease (`/d402/claim/1` request). Signed by the worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    /// Body version.
    pub v: u16,
    /// The task.
    pub task_id: TaskId,
    /// CID of the signed lease this fulfils.
    pub lease_cid: Cid,
    /// The lease's fencing token.
    pub fencing_token: u64,
    /// The output bytes.
    #[serde(with = "serde_bytes")]
    pub output: Vec<u8>,
    /// `raw` CID of `output`; quorum compares these.
    pub output_cid: Cid,
    /// `raw` CID of the snapshot the Wasm ran on, if the capability takes one.
    pub snapshot_cid: Option<Cid>,
    /// The snapshot's metadata, when there is one.
    pub snapshot: Option<SnapshotMeta>,
    /// Fuel the Wasm step used (deterministic).
    pub fuel_used: u64,
    /// When the worker finished.
    pub finished_at: UnixMillis,
}

impl Signable for Claim {
    const DOMAIN: &'static str = "d402/claim/1";
    const KIND: &'static str = "claim";
    const MAX_BODY: usize = MAX_OUTPUT + 4 * 1024;

    fn validate(&self) -> Result<()> {
        check_version(Self::KIND, self.v)?;
        if self.output.len() > MAX_OUTPUT {
            return Err(ProtocolError::field(
                "output",
                format!("longer than {MAX_OUTPUT} bytes"),
            ));
        }
        let actual = Cid::raw(&self.output);
        if actual != self.output_cid {
            return Err(ProtocolError::field(
                "output_cid",
                format!("output hashes to {actual}, not {}", self.output_cid),
            ));
        }
        if self.snapshot.is_some() != self.snapshot_cid.is_some() {
            return Err(ProtocolError::field(
                "snapshot",
                "metadata and snapshot_cid come together",
            ));
        }
        if let Some(meta) = &self.snapshot {
            check_len("snapshot.final_url", &meta.final_url, MAX_URL)?;
            check_len("snapshot.snapshotter", &meta.snapshotter, 32)?;
        }
        Ok(())
    }
}

/// The gateway's answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClaimAck {
    /// Recorded; the outcome follows the quorum.
    Received,
    /// Refused (stale fencing token, lease expired, never issued, bad signature …).
    Refused {
        /// Why.
        reason: String,
    },
}

impl WireMessage for ClaimAck {
    const KIND: &'static str = "claim ack";
    const MAX_SIZE: usize = MAX_REASON + 64;

    fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let ack: Self = crate::cbor::from_canonical(bytes, Self::MAX_SIZE, Self::KIND)?;
        if let ClaimAck::Refused { reason } = &ack {
            check_len("reason", reason, MAX_REASON)?;
        }
        Ok(ack)
    }
}
