use serde::{Deserialize, Serialize};

use crate::{
    Cid, PublicKey, Signable, Signed,
    error::{ProtocolError, Result},
    messages::{Claim, MAX_INPUT, MAX_REASON, WireMessage},
    types::{Amount, TaskId, UnixMillis, check_len, check_version},
};

/// The gateway leases a task to one bidder (`/d402/lease/1` request). Signed by the gateway.
///
/// The fencing token grows with every (re)assignment of the task; a claim carrying an older
/// token than the task's current one is stale and refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    /// Body version.
    pub v: u16,
    /// The task.
    pub task_id: TaskId,
    /// The worker the lease is for.
    pub worker: PublicKey,
    /// CID of the worker's signed bid this lease accepts.
    pub bid_cid: Cid,
    /// The manifest to run.
    pub manifest_cid: Cid,
    /// The task input.
    #[serde(with = "serde_bytes")]
    pub input: Vec<u8>,
    /// When set, the worker must run on this pinned snapshot (fetched by CID) instead of
    /// taking its own, so that claims compare over the deterministic step.
    pub snapshot_cid: Option<Cid>,
    /// The agreed price.
    pub price: Amount,
    /// The claim must arrive before this time.
    pub deadline: UnixMillis,
    /// Monotonic per task; see the type's docs.
    pub fencing_token: u64,
}

impl Signable for Lease {
    const DOMAIN: &'static str = "d402/lease/1";
    const KIND: &'static str = "lease";
    const MAX_BODY: usize = MAX_INPUT + 1024;

    fn validate(&self) -> Result<()> {
        check_version(Self::KIND, self.v)?;
        self.price.validate("price")?;
        if self.input.len() > MAX_INPUT {
            return Err(ProtocolError::field(
                "input",
                format!("longer than {MAX_INPUT} bytes"),
            ));
        }
        Ok(())
    }
}

/// The worker's answer to a lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseAck {
    /// The worker will run it and send a claim on `/d402/claim/1`.
    Accepted,
    /// The worker accepted the lease, ran it at once and answers with its claim: a run
    /// that ends within the worker's inline window saves the claim's own round trip. The
    /// gateway treats it exactly as a claim received on `/d402/claim/1`.
    Claimed(Box<Signed<Claim>>),
    /// The worker refuses the lease.
    Refused {
        /// Why (does not match the bid, bad signature, expired, no capacity …).
        reason: String,
    },
}

/// How the canonical encoding of [`LeaseAck::Claimed`] starts: a map of one entry whose key
/// is the text `claimed`.
const CLAIMED_PREFIX: &[u8] = &[0xa1, 0x67, b'c', b'l', b'a', b'i', b'm', b'e', b'd'];

impl WireMessage for LeaseAck {
    const KIND: &'static str = "lease ack";
    const MAX_SIZE: usize = Signed::<Claim>::max_size() + 64;

    /// Decodes an answer; an inline claim is validated and its signature verified as on
    /// `/d402/claim/1`.
    fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let ack: Self = crate::cbor::from_canonical(bytes, Self::MAX_SIZE, Self::KIND)?;
        match &ack {
            LeaseAck::Refused { reason } => check_len("reason", reason, MAX_REASON)?,
            // Canonical `{"claimed": envelope}`: the envelope is the rest of the bytes.
            LeaseAck::Claimed(claim) => match bytes.strip_prefix(CLAIMED_PREFIX) {
                Some(envelope) => claim.verify_encoded(envelope)?,
                None => claim.verify()?,
            },
            LeaseAck::Accepted => {}
        }
        Ok(ack)
    }
}
