use serde::{Deserialize, Serialize};

use crate::{
    Cid, Signable,
    error::Result,
    messages::MAX_REASON,
    types::{TaskId, UnixMillis, check_len, check_version},
};

/// What a validator found when it re-ran the deterministic step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerdictOutcome {
    /// The re-run produced the claimed output CID.
    Agree,
    /// The re-run produced another output.
    Disagree {
        /// The output CID the validator computed.
        recomputed: Cid,
    },
    /// The validator could not re-run it (snapshot unavailable, out of fuel …).
    Unable {
        /// Why.
        reason: String,
    },
}

/// A validator's signed verdict on a claim (`/d402/verdict/1`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// Body version.
    pub v: u16,
    /// The task.
    pub task_id: TaskId,
    /// CID of the signed claim judged.
    pub claim_cid: Cid,
    /// The output CID the claim asserted.
    pub output_cid: Cid,
    /// What the validator found.
    pub outcome: VerdictOutcome,
    /// Fuel the re-run used.
    pub fuel_used: u64,
    /// When it was judged.
    pub judged_at: UnixMillis,
}

impl Signable for Verdict {
    const DOMAIN: &'static str = "d402/verdict/1";
    const KIND: &'static str = "verdict";
    const MAX_BODY: usize = 2 * 1024;

    fn validate(&self) -> Result<()> {
        check_version(Self::KIND, self.v)?;
        if let VerdictOutcome::Unable { reason } = &self.outcome {
            check_len("reason", reason, MAX_REASON)?;
        }
        Ok(())
    }
}
