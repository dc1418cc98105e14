use serde::{Deserialize, Serialize};

use crate::{
    Cid, Signable, Signed,
    error::{ProtocolError, Result},
    messages::{MAX_REASON, WireMessage},
    types::{
        Amount, CapabilityRef, RailKind, TaskId, UnixMillis, Wallets, check_len, check_version,
        check_wallets,
    },
};

/// A gateway asks a worker to bid on a task (`/d402/bid/1` request). Signed by the gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BidRequest {
    /// Body version.
    pub v: u16,
    /// The task.
    pub task_id: TaskId,
    /// What is to be run.
    pub capability: CapabilityRef,
    /// The exact manifest required.
    pub manifest_cid: Cid,
    /// CID (`raw`) of the task input, so the worker can size the job.
    pub input_cid: Cid,
    /// Length of the input in bytes.
    pub input_len: u64,
    /// The rail the gateway will pay on.
    pub rail: RailKind,
    /// The most the gateway pays this worker for the task.
    pub max_price: Amount,
    /// When the result is due.
    pub deadline: UnixMillis,
    /// How many leases the gateway would like to place under the bid, this task's first:
    /// 1 asks for a bid on this task alone; more asks for a standing bid that later tasks of
    /// the same manifest, rail and price may cite until it expires (omitted when 1).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub standing: u32,
}

/// The most leases one standing bid may cover.
pub const MAX_BID_USES: u32 = 1024;

fn one() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

fn check_uses(field: &'static str, n: u32) -> Result<()> {
    if n == 0 || n > MAX_BID_USES {
        return Err(ProtocolError::field(field, "must be 1 to 1024"));
    }
    Ok(())
}

impl Signable for BidRequest {
    const DOMAIN: &'static str = "d402/bid-request/1";
    const KIND: &'static str = "bid request";
    const MAX_BODY: usize = 4 * 1024;

    fn validate(&self) -> Result<()> {
        check_version(Self::KIND, self.v)?;
        self.capability.validate()?;
        self.max_price.validate("max_price")?;
        if self.input_len > super::MAX_INPUT as u64 {
            return Err(ProtocolError::field("input_len", "above the input cap"));
        }
        check_uses("standing", self.standing)
    }
}

/// A worker's signed bid for one bid request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bid {
    /// Body version.
    pub v: u16,
    /// The task.
    pub task_id: TaskId,
    /// CID of the signed bid request this answers.
    pub request_cid: Cid,
    /// The manifest the worker will run (must equal the request's).
    pub manifest_cid: Cid,
    /// The price asked.
    pub price: Amount,
    /// The rail (must equal the request's).
    pub rail: RailKind,
    /// Where to pay, per chain.
    pub payout: Wallets,
    /// The bid lapses at this time unless a lease arrives.
    pub expires_at: UnixMillis,
    /// How many leases the bid covers (omitted when 1). Above 1 it is a standing bid: a
    /// lease for another task of the same manifest and price, from the gateway that asked,
    /// may cite it until it expires or its uses run out; each task's lease is still checked
    /// on its own and may be refused (e.g. no capacity).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub uses: u32,
}

impl Signable for Bid {
    const DOMAIN: &'static str = "d402/bid/1";
    const KIND: &'static str = "bid";
    const MAX_BODY: usize = 4 * 1024;

    fn validate(&self) -> Result<()> {
        check_version(Self::KIND, self.v)?;
        self.price.validate("price")?;
        check_wallets("payout", &self.payout)?;
        if !self.payout.contains_key(&self.rail.payout_chain()) {
            return Err(ProtocolError::field(
                "payout",
                format!(
                    "no {} wallet for rail {}",
                    self.rail.payout_chain(),
                    self.rail
                ),
            ));
        }
        check_uses("uses", self.uses)
    }
}

/// Why a worker declined to bid. Declines are typed, never silent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeclineReason {
    /// The worker does not offer this manifest CID.
    NotOffered,
    /// All execution slots are taken.
    NoCapacity,
    /// The gateway's maximum is below the worker's floor.
    PriceBelowFloor {
        /// The worker's floor, in the request's asset.
        floor: u64,
    },
    /// The worker does not accept this rail.
    RailNotSupported,
    /// The worker's own policy refuses this manifest.
    ManifestRefused {
        /// Why.
        reason: String,
    },
    /// The deadline cannot be met or has passed.
    DeadlineTooSoon,
    /// The inbound queue is full; try later.
    Busy,
    /// The request was malformed or badly signed.
    BadRequest {
        /// Why.
        reason: String,
    },
}

impl DeclineReason {
    fn validate(&self) -> Result<()> {
        match self {
            DeclineReason::ManifestRefused { reason } | DeclineReason::BadRequest { reason } => {
                check_len("reason", reason, MAX_REASON)
            }
            _ => Ok(()),
        }
    }
}

/// The answer on `/d402/bid/1`: a signed bid, or a typed decline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BidResponse {
    /// The worker bids.
    Bid(Box<Signed<Bid>>),
    /// The worker declines, with the reason.
    Declined(DeclineReason),
}

impl WireMessage for BidResponse {
    const KIND: &'static str = "bid response";
    const MAX_SIZE: usize = Signed::<Bid>::max_size() + 64;

    fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let r: Self = crate::cbor::from_canonical(bytes, Self::MAX_SIZE, Self::KIND)?;
        match &r {
            BidResponse::Bid(bid) => bid.verify()?,
            BidResponse::Declined(reason) => reason.validate()?,
        }
        Ok(r)
    }
}
