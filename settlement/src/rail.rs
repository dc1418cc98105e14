//! The [`Rail`] trait (DESIGN.md §6) and the values that cross it.
//!
//! A paid task goes through a rail in this order:
//!
//! 1. [`Rail::quote`]: the server-owned price for a capability, checked against what the
//!    rail can settle (a rail that cannot split refuses commission-bearing terms).
//! 2. [`Rail::challenge`]: the x402 [`PaymentRequirements`] for the quote, to list in the
//!    402 (`PAYMENT-REQUIRED` and the v1 body). The gateway keeps the whole
//!    [`PaymentRequired`] it sent (it is a pure function of its policy and the request, so it
//!    can also recompute it) and passes it back to `verify`.
//! 3. [`Rail::verify`]: checks a client's [`Payment`] against that challenge without moving
//!    money: signature, terms, amount, validity window, replay, funds. Returns an opaque
//!    [`VerifiedPayment`] that only a rail can make.
//! 4. [`Rail::lock`]: moves the payment into escrow for the task, durably, consuming the
//!    nonce in the same step. Idempotent: locking the same payment for the same task again
//!    returns the first lock.
//! 5. [`Rail::capture`] with a [`CapturePlan`]: pays each accepted worker its gross payout
//!    split into creator commission and worker net ([`plan_transfers`]), the gateway keeps
//!    the rest, and a signed [`SettlementReceipt`] is returned. Or [`Rail::refund`]: the
//!    escrow goes back to the payer (for rails that only hold an authorization, this is a
//!    void). Each is idempotent per task, and a task is captured or refunded, never both.
//!
//! Methods that may talk to a chain are async and return a boxed [`RailFuture`], so that
//! the trait is object-safe (`Arc<dyn Rail>`) without an async runtime dependency here.

use std::{future::Future, pin::Pin};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use d402_capabilities::{AcceptedTerms, commission};
use d402_protocol::{
    Amount, CapabilityRef, Cid, ProtocolError, RailKind, Signed, TaskId, UnixMillis,
    messages::{PayeeRole, SettlementReceipt, Transfer},
};

use crate::{
    amount::Asset,
    x402::{Payment, PaymentRequired, PaymentRequirements, ResourceInfo, X402Error},
};

/// The future returned by a rail's async methods.
pub type RailFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, RailError>> + Send + 'a>>;

/// Most worker payouts in one capture: two transfers each plus the gateway's margin must fit
/// the receipt's 64 transfers.
pub const MAX_PAYOUTS: usize = 31;

/// A settlement rail: see the module docs for the order of calls.
pub trait Rail: Send + Sync {
    /// Which rail this is.
    fn kind(&self) -> RailKind;

    /// The CAIP-2 network id used in x402 terms, e.g. `d402:local`.
    fn network(&self) -> &str;

    /// The asset payments are made in.
    fn asset(&self) -> &Asset;

    /// The address payments go to (the gateway's account or escrow on this rail).
    fn pay_to(&self) -> String;

    /// Prices a task. Refuses a zero price, and commission-bearing terms on a rail that
    /// cannot split them.
    fn quote(&self, request: &QuoteRequest) -> Result<Quote, RailError>;

    /// The x402 requirement for `quote`, to list in the 402's `accepts`. The default covers
    /// rails whose terms are all in the quote; rails override it to add `extra` fields.
    fn challenge(
        &self,
        quote: &Quote,
        _resource: &ResourceInfo,
    ) -> Result<PaymentRequirements, RailError> {
        Ok(quote.requirements())
    }

    /// Checks `payment` against the `challenge` the gateway issued, at time `now`, without
    /// moving money.
    fn verify<'a>(
        &'a self,
        payment: &'a Payment,
        challenge: &'a PaymentRequired,
        now: UnixMillis,
    ) -> RailFuture<'a, VerifiedPayment>;

    /// Moves a verified payment into escrow for `task_id`, durably, and consumes its nonce.
    fn lock<'a>(
        &'a self,
        task_id: TaskId,
        payment: &'a VerifiedPayment,
        now: UnixMillis,
    ) -> RailFuture<'a, Lock>;

    /// Pays out a locked task by `plan` and returns the signed receipt. A retry with the
    /// same plan returns the same receipt and pays nothing again.
    fn capture<'a>(
        &'a self,
        task_id: TaskId,
        plan: &'a CapturePlan,
        now: UnixMillis,
    ) -> RailFuture<'a, Signed<SettlementReceipt>>;

    /// Returns a locked task's escrow to the payer (or voids the authorization) and returns
    /// the signed receipt. A retry returns the same receipt.
    fn refund<'a>(
        &'a self,
        task_id: TaskId,
        now: UnixMillis,
    ) -> RailFuture<'a, Signed<SettlementReceipt>>;

    /// What the rail holds for `task_id`, for recovery after a restart.
    fn escrow_status<'a>(&'a self, task_id: TaskId) -> RailFuture<'a, Option<EscrowStatus>>;
}

/// What the gateway asks a rail to price.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuoteRequest {
    /// The capability sold.
    pub capability: CapabilityRef,
    /// The server-owned price per task, in smallest units of the rail's asset.
    pub price_units: u64,
    /// The creator commission of the accepted registration (0 without one).
    pub creator_commission_bps: u16,
}

/// A rail's price for a task: everything that goes into the x402 requirement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quote {
    /// The rail.
    pub rail: RailKind,
    /// The x402 scheme (`exact`).
    pub scheme: String,
    /// The CAIP-2 network id.
    pub network: String,
    /// What the client pays.
    pub amount: Amount,
    /// Where it pays.
    pub pay_to: String,
    /// Longest a payment authorization may be valid for.
    pub max_timeout_seconds: u64,
    /// Scheme-specific x402 `extra`.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Quote {
    /// The x402 requirement of this quote.
    pub fn requirements(&self) -> PaymentRequirements {
        PaymentRequirements {
            scheme: self.scheme.clone(),
            network: self.network.clone(),
            amount: crate::x402::Units(self.amount.units),
            asset: self.amount.asset.clone(),
            pay_to: self.pay_to.clone(),
            max_timeout_seconds: self.max_timeout_seconds,
            extra: Some(self.extra.clone()),
        }
    }
}

/// Rail-specific evidence behind a [`VerifiedPayment`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Proof {
    /// A payer-signed authorization on the local ledger.
    Local(Box<Signed<crate::local::LocalAuthorization>>),
}

/// A payment that a rail verified. Only rails construct it; [`Rail::lock`] takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedPayment {
    pub(crate) rail: RailKind,
    pub(crate) payer: String,
    pub(crate) amount: Amount,
    pub(crate) nonce: Vec<u8>,
    pub(crate) valid_before: UnixMillis,
    pub(crate) resource: String,
    pub(crate) proof: Proof,
}

impl VerifiedPayment {
    /// The rail that verified it.
    pub fn rail(&self) -> RailKind {
        self.rail
    }
    /// The payer's address on the rail.
    pub fn payer(&self) -> &str {
        &self.payer
    }
    /// What is paid.
    pub fn amount(&self) -> &Amount {
        &self.amount
    }
    /// The payment's nonce (accepted once, ever).
    pub fn nonce(&self) -> &[u8] {
        &self.nonce
    }
    /// The end of the authorization's validity window.
    pub fn valid_before(&self) -> UnixMillis {
        self.valid_before
    }
    /// The resource URL the payer signed for.
    pub fn resource(&self) -> &str {
        &self.resource
    }
}

/// A payment held in escrow for a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    /// The task.
    pub task_id: TaskId,
    /// Who paid.
    pub payer: String,
    /// What is held.
    pub amount: Amount,
    /// Ledger entry or transaction id of the lock.
    pub tx_ref: String,
    /// When it was locked.
    pub locked_at: UnixMillis,
    /// True when this call found the lock already made (a retry).
    pub already_locked: bool,
}

/// Where a task's payment stands on a rail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EscrowState {
    /// Held; neither captured nor refunded.
    Locked,
    /// Paid out.
    Captured,
    /// Returned to the payer.
    Refunded,
}

/// A task's escrow on a rail.
#[derive(Debug, Clone, PartialEq)]
pub struct EscrowStatus {
    /// The task.
    pub task_id: TaskId,
    /// Its state.
    pub state: EscrowState,
    /// Who paid.
    pub payer: String,
    /// What was paid.
    pub amount: Amount,
    /// The receipt, once captured or refunded.
    pub receipt: Option<Signed<SettlementReceipt>>,
}

/// Creator commission terms a capture applies, from the accepted signed registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommissionTerms {
    /// The registration the terms come from.
    pub registration_cid: Option<Cid>,
    /// Commission in basis points of each gross worker payout.
    pub bps: u16,
    /// The creator's address on the rail's chain; needed when a commission is paid.
    pub creator_wallet: Option<String>,
}

impl CommissionTerms {
    /// No commission (no registration, or one with 0 bps).
    pub fn none() -> Self {
        CommissionTerms {
            registration_cid: None,
            bps: 0,
            creator_wallet: None,
        }
    }
}

impl From<&AcceptedTerms> for CommissionTerms {
    fn from(terms: &AcceptedTerms) -> Self {
        CommissionTerms {
            registration_cid: terms.registration_cid,
            bps: terms.creator_commission_bps,
            creator_wallet: terms.creator_wallet.clone(),
        }
    }
}

/// One accepted worker's payout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerPayout {
    /// The worker's payout address on the rail's chain (from its bid).
    pub worker: String,
    /// The worker's accepted bid price: the gross payout, before commission.
    pub gross: u64,
    /// The worker's accepted claim.
    pub claim_cid: Cid,
}

/// How a captured task is paid out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapturePlan {
    /// Accepted workers; losers and no-shows are not listed.
    pub payouts: Vec<WorkerPayout>,
    /// The creator commission applied to every payout.
    pub commission: CommissionTerms,
}

impl CapturePlan {
    /// The plan's identity: a retried capture must present the same plan.
    pub fn cid(&self) -> Result<Cid, RailError> {
        Ok(Cid::of(self)?)
    }
}

/// The transfers that settle `escrow` units paid by `payer` according to `plan`: per
/// payout, the creator's `floor(gross * bps / 10000)` (when above 0) and the worker's net
/// (when above 0), each tagged with the claim and registration CID; then the gateway's
/// margin `escrow - Σ gross` (when above 0). They always add up to `escrow`.
pub fn plan_transfers(
    escrow: u64,
    gateway: &str,
    plan: &CapturePlan,
) -> Result<Vec<Transfer>, RailError> {
    if plan.payouts.len() > MAX_PAYOUTS {
        return Err(RailError::InvalidPlan(format!(
            "{} payouts; at most {MAX_PAYOUTS}",
            plan.payouts.len()
        )));
    }
    let terms = &plan.commission;
    commission::check_bps(terms.bps).map_err(|e| RailError::InvalidPlan(e.to_string()))?;
    let mut paid: u64 = 0;
    let mut transfers = Vec::with_capacity(plan.payouts.len() * 2 + 1);
    for p in &plan.payouts {
        paid = paid
            .checked_add(p.gross)
            .filter(|&sum| sum <= escrow)
            .ok_or_else(|| {
                RailError::InvalidPlan(format!(
                    "payouts add up to more than the {escrow} units held"
                ))
            })?;
        let split = commission::split(p.gross, terms.bps)
            .map_err(|e| RailError::InvalidPlan(e.to_string()))?;
        if split.creator > 0 {
            let creator = terms.creator_wallet.clone().ok_or_else(|| {
                RailError::InvalidPlan(format!(
                    "a {} bps commission needs a creator wallet",
                    terms.bps
                ))
            })?;
            transfers.push(Transfer {
                role: PayeeRole::Creator,
                to: creator,
                units: split.creator,
                claim_cid: Some(p.claim_cid),
                registration_cid: terms.registration_cid,
            });
        }
        if split.worker_net > 0 {
            transfers.push(Transfer {
                role: PayeeRole::Worker,
                to: p.worker.clone(),
                units: split.worker_net,
                claim_cid: Some(p.claim_cid),
                registration_cid: terms.registration_cid,
            });
        }
    }
    let margin = escrow - paid;
    if margin > 0 {
        transfers.push(Transfer {
            role: PayeeRole::Gateway,
            to: gateway.to_string(),
            units: margin,
            claim_cid: None,
            registration_cid: None,
        });
    }
    Ok(transfers)
}

/// Everything a rail can refuse or fail at.
#[derive(Debug, Error)]
pub enum RailError {
    /// The payment header does not decode.
    #[error(transparent)]
    X402(#[from] X402Error),
    /// The payment is for another scheme.
    #[error("scheme {found:?} is not accepted here (expected {expected:?})")]
    WrongScheme {
        /// The rail's scheme.
        expected: String,
        /// The payment's.
        found: String,
    },
    /// The payment is for another network.
    #[error("network {found:?} is not this rail's ({expected:?})")]
    WrongNetwork {
        /// The rail's network.
        expected: String,
        /// The payment's.
        found: String,
    },
    /// The challenge lists nothing this rail can verify.
    #[error("the challenge has no {scheme} requirement on {network}")]
    NotInChallenge {
        /// The rail's scheme.
        scheme: String,
        /// The rail's network.
        network: String,
    },
    /// A payment term differs from the challenge.
    #[error("payment {field} is {found:?}, the challenge says {expected:?}")]
    TermMismatch {
        /// The term (`payTo`, `asset`, `amount`, `resource`, …).
        field: &'static str,
        /// The challenge's value.
        expected: String,
        /// The payment's value.
        found: String,
    },
    /// The payment's scheme payload is malformed.
    #[error("malformed payment payload: {0}")]
    BadPayload(String),
    /// The payer's signature does not verify.
    #[error("the payment signature does not verify: {0}")]
    BadSignature(String),
    /// The authorization is not valid yet.
    #[error("the payment is valid only after {valid_after} (now {now})")]
    NotYetValid {
        /// Start of the window (unix ms).
        valid_after: UnixMillis,
        /// The time checked.
        now: UnixMillis,
    },
    /// The authorization has expired.
    #[error("the payment expired at {valid_before} (now {now})")]
    Expired {
        /// End of the window (unix ms).
        valid_before: UnixMillis,
        /// The time checked.
        now: UnixMillis,
    },
    /// The authorization stays valid for longer than the challenge allows.
    #[error("the payment is valid until {valid_before}, beyond the allowed {latest}")]
    WindowTooLong {
        /// End of the window (unix ms).
        valid_before: UnixMillis,
        /// The latest end accepted.
        latest: UnixMillis,
    },
    /// The nonce was used before (on this or another task).
    #[error("payment nonce already used: replay refused")]
    NonceReplayed,
    /// The payer cannot cover the payment.
    #[error("insufficient funds: {address} holds {balance}, {needed} needed")]
    InsufficientFunds {
        /// The payer.
        address: String,
        /// Its balance.
        balance: u64,
        /// The payment.
        needed: u64,
    },
    /// An address is not valid on this rail.
    #[error("invalid {field} address {address:?}")]
    InvalidAddress {
        /// Which address.
        field: &'static str,
        /// The text.
        address: String,
    },
    /// The quote request cannot be priced on this rail.
    #[error("cannot quote: {0}")]
    InvalidQuote(String),
    /// The rail cannot split a creator commission.
    #[error("rail {rail} cannot split a {bps} bps creator commission; use a split-settlement rail")]
    CommissionNotSupported {
        /// The rail.
        rail: RailKind,
        /// The commission.
        bps: u16,
    },
    /// The capture plan is invalid (pays more than held, missing creator wallet, …).
    #[error("invalid capture plan: {0}")]
    InvalidPlan(String),
    /// No payment is held for the task.
    #[error("no payment is held for task {0}")]
    UnknownTask(TaskId),
    /// The task already holds another payment.
    #[error("task {0} already holds another payment")]
    TaskAlreadyLocked(TaskId),
    /// The task was captured; it cannot be refunded.
    #[error("task {0} was already captured")]
    AlreadyCaptured(TaskId),
    /// The task was refunded; it cannot be captured.
    #[error("task {0} was already refunded")]
    AlreadyRefunded(TaskId),
    /// A retried capture presented another plan than the first.
    #[error("task {0} was captured with another plan")]
    PlanConflict(TaskId),
    /// The faucet is only available in dev mode.
    #[error("the faucet is disabled: the local rail is not in dev mode")]
    FaucetDisabled,
    /// A balance or total would overflow.
    #[error("{0} would overflow")]
    Overflow(&'static str),
    /// The rail's own configuration is invalid.
    #[error("invalid rail configuration: {0}")]
    Config(String),
    /// A protocol object failed to encode, decode or sign.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The database failed.
    #[error("settlement database error: {0}")]
    Storage(Box<redb::Error>),
    /// A write of an operation inside a caller's transaction failed after the operation's
    /// first write: the transaction holds part of it and must not commit. (Every other
    /// error of the `_in` operations is returned before their first write.)
    #[error("settlement write failed halfway: {0}")]
    PartlyWritten(Box<RailError>),
    /// A stored row does not decode.
    #[error("damaged settlement row in {table}: {reason}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// Why.
        reason: String,
    },
}

macro_rules! storage_from {
    ($($t:ty),*) => {$(
        impl From<$t> for RailError {
            fn from(e: $t) -> Self {
                RailError::Storage(Box::new(e.into()))
            }
        }
    )*};
}
storage_from!(
    redb::Error,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl RailError {
    /// True when the client's payment is at fault (answer 402 with [`RailError::code`]);
    /// false for the gateway's own errors (a bad plan, storage, configuration).
    pub fn is_payment_error(&self) -> bool {
        matches!(
            self,
            RailError::X402(_)
                | RailError::WrongScheme { .. }
                | RailError::WrongNetwork { .. }
                | RailError::TermMismatch { .. }
                | RailError::BadPayload(_)
                | RailError::BadSignature(_)
                | RailError::NotYetValid { .. }
                | RailError::Expired { .. }
                | RailError::WindowTooLong { .. }
                | RailError::NonceReplayed
                | RailError::InsufficientFunds { .. }
                | RailError::InvalidAddress { field: "payer", .. }
        )
    }

    /// A stable snake_case code, used as the x402 `errorReason` / `invalidReason` and in
    /// JSON error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            RailError::X402(e) => e.code(),
            RailError::WrongScheme { .. } => "invalid_scheme",
            RailError::WrongNetwork { .. } => "invalid_network",
            RailError::NotInChallenge { .. } => "invalid_payment_requirements",
            RailError::TermMismatch { field: "payTo", .. } => "recipient_mismatch",
            RailError::TermMismatch {
                field: "amount", ..
            } => "amount_mismatch",
            RailError::TermMismatch { .. } => "terms_mismatch",
            RailError::BadPayload(_) => "invalid_payload",
            RailError::BadSignature(_) => "invalid_signature",
            RailError::NotYetValid { .. } => "payment_not_yet_valid",
            RailError::Expired { .. } => "payment_expired",
            RailError::WindowTooLong { .. } => "payment_window_too_long",
            RailError::NonceReplayed => "nonce_replayed",
            RailError::InsufficientFunds { .. } => "insufficient_funds",
            RailError::InvalidAddress { .. } => "invalid_address",
            RailError::InvalidQuote(_) => "invalid_quote",
            RailError::CommissionNotSupported { .. } => "rail_cannot_split_commission",
            RailError::InvalidPlan(_) => "invalid_capture_plan",
            RailError::UnknownTask(_) => "unknown_task",
            RailError::TaskAlreadyLocked(_) => "task_already_paid",
            RailError::AlreadyCaptured(_) => "already_captured",
            RailError::AlreadyRefunded(_) => "already_refunded",
            RailError::PlanConflict(_) => "capture_plan_conflict",
            RailError::FaucetDisabled => "faucet_disabled",
            RailError::Overflow(_) => "overflow",
            RailError::Config(_) => "rail_config",
            RailError::Protocol(_) => "protocol_error",
            RailError::Storage(_) => "storage_error",
            RailError::PartlyWritten(_) => "storage_error",
            RailError::Corrupt { .. } => "storage_corrupt",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn payout(worker: &str, gross: u64, n: u8) -> WorkerPayout {
        WorkerPayout {
            worker: worker.into(),
            gross,
            claim_cid: Cid::raw(&[n]),
        }
    }

    fn terms(bps: u16) -> CommissionTerms {
        CommissionTerms {
            registration_cid: Some(Cid::raw(b"reg")),
            bps,
            creator_wallet: Some("creator".into()),
        }
    }

    #[test]
    fn splits_a_ten_percent_commission() {
        let plan = CapturePlan {
            payouts: vec![payout("w1", 3000, 1), payout("w2", 3000, 2)],
            commission: terms(1000),
        };
        let t = plan_transfers(10_000, "gw", &plan).unwrap();
        let summary: Vec<_> = t.iter().map(|t| (t.role, t.to.as_str(), t.units)).collect();
        assert_eq!(
            summary,
            [
                (PayeeRole::Creator, "creator", 300),
                (PayeeRole::Worker, "w1", 2700),
                (PayeeRole::Creator, "creator", 300),
                (PayeeRole::Worker, "w2", 2700),
                (PayeeRole::Gateway, "gw", 4000),
            ]
        );
        assert_eq!(t[1].claim_cid, Some(Cid::raw(&[1])));
        assert_eq!(t[1].registration_cid, Some(Cid::raw(b"reg")));
        assert_eq!(t[4].claim_cid, None);
    }

    #[test]
    fn refuses_bad_plans() {
        let over = CapturePlan {
            payouts: vec![payout("w", 6000, 1), payout("w", 6000, 2)],
            commission: CommissionTerms::none(),
        };
        assert!(matches!(
            plan_transfers(10_000, "gw", &over),
            Err(RailError::InvalidPlan(_))
        ));
        let overflow = CapturePlan {
            payouts: vec![payout("w", u64::MAX, 1), payout("w", 1, 2)],
            commission: CommissionTerms::none(),
        };
        assert!(plan_transfers(u64::MAX, "gw", &overflow).is_err());
        let mut no_wallet = terms(500);
        no_wallet.creator_wallet = None;
        let plan = CapturePlan {
            payouts: vec![payout("w", 1000, 1)],
            commission: no_wallet.clone(),
        };
        assert!(plan_transfers(1000, "gw", &plan).is_err());
        // A commission that rounds to zero needs no creator wallet.
        let tiny = CapturePlan {
            payouts: vec![payout("w", 19, 1)],
            commission: no_wallet,
        };
        assert_eq!(plan_transfers(19, "gw", &tiny).unwrap().len(), 1);
        let bad_bps = CapturePlan {
            payouts: vec![],
            commission: terms(10_001),
        };
        assert!(plan_transfers(1, "gw", &bad_bps).is_err());
        let many = CapturePlan {
            payouts: (0..=MAX_PAYOUTS as u8).map(|i| payout("w", 1, i)).collect(),
            commission: CommissionTerms::none(),
        };
        assert!(plan_transfers(1000, "gw", &many).is_err());
    }

    proptest! {
        #[test]
        fn transfers_add_up_to_the_escrow(
            escrow in any::<u64>(),
            grosses in proptest::collection::vec(any::<u64>(), 0..=MAX_PAYOUTS),
            bps in 0u16..=10_000,
        ) {
            let mut left = escrow;
            let payouts: Vec<_> = grosses.iter().enumerate().map(|(i, g)| {
                let gross = if left == 0 { 0 } else { g % (left + 1) };
                left -= gross;
                payout("w", gross, i as u8)
            }).collect();
            let plan = CapturePlan { payouts, commission: terms(bps) };
            let t = plan_transfers(escrow, "gw", &plan).unwrap();
            let sum: u128 = t.iter().map(|t| u128::from(t.units)).sum();
            prop_assert_eq!(sum, u128::from(escrow));
            prop_assert!(t.iter().all(|t| t.units > 0));
            prop_assert!(t.len() <= 2 * MAX_PAYOUTS + 1);
        }
    }
}
