//! d402 settlement: the [`Rail`] trait, the x402 wire format, the embedded `local` rail,
//! commission splits and price parsing (DESIGN.md §6).
//!
//! - [`x402`]: `PAYMENT-REQUIRED`, the v1 402 body, `PAYMENT-SIGNATURE` / `X-PAYMENT` and
//!   `PAYMENT-RESPONSE` / `X-PAYMENT-RESPONSE`, with size caps and typed errors.
//! - [`rail`]: the [`Rail`] trait (quote, challenge, verify, lock, capture with splits,
//!   refund) and [`plan_transfers`], the split every rail settles by.
//! - [`local`]: the [`LocalRail`], an escrow ledger in the gateway's redb.
//! - [`client`]: builds payment headers from a 402 challenge.
//! - [`amount`]: assets and decimal price parsing (`$0.01` → `10000`).
//! - [`wallet`]: local-rail wallet keys and addresses (no file I/O).
//!
//! Amounts are `u64` counts of the asset's smallest unit everywhere; no floats.
//!
//! A gateway's paid request, in short:
//!
//! ```
//! # use std::sync::Arc;
//! # use d402_protocol::{SigningKey, TaskId, Cid};
//! use d402_settlement::{
//!     CapturePlan, CommissionTerms, LocalRail, LocalRailConfig, QuoteRequest, Rail,
//!     WorkerPayout, client, x402,
//! };
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! let db = Arc::new(redb::Database::create(dir.path().join("node.redb"))?);
//! let gateway_key = SigningKey::from_bytes(&[1; 32]);
//! let config = LocalRailConfig { dev_mode: true, ..LocalRailConfig::default() };
//! let rail = LocalRail::open(db, gateway_key, config)?;
//!
//! // 402: quote the server-owned price and send the challenge.
//! let quote = rail.quote(&QuoteRequest {
//!     capability: "web.page_to_markdown@1".parse()?,
//!     price_units: rail.asset().parse("$0.01")?,
//!     creator_commission_bps: 1000,
//! })?;
//! let resource = x402::ResourceInfo {
//!     url: "http://127.0.0.1:8080/v1/tasks".into(),
//!     description: Some("web.page_to_markdown@1".into()),
//!     mime_type: Some("application/json".into()),
//! };
//! let challenge = x402::PaymentRequired::new(
//!     resource.clone(),
//!     vec![rail.challenge(&quote, &resource)?],
//! );
//! let header = challenge.to_header()?; // PAYMENT-REQUIRED
//! let v1_body = challenge.to_v1().to_json()?; // the 402 body
//!
//! // The client pays (dev mode: fund it first).
//! let payer = SigningKey::from_bytes(&[2; 32]);
//! let now = 1_700_000_000_000;
//! rail.faucet(&d402_settlement::wallet::address(&payer), 1_000_000, now)?;
//! let seen = client::read_challenge(Some(&header), Some(&v1_body))?;
//! let (_, value) = client::pay_local(&seen, &payer, now, None)?.header_v2()?;
//!
//! // The gateway verifies and locks before any work (the futures are plain async).
//! let payment = x402::Payment::from_headers(Some(&value), None)?.expect("a payment");
//! let task_id = TaskId([7; 16]);
//! let verified = rail.verify_payment(&payment, &challenge, now)?;
//! rail.lock_payment(task_id, &verified, now)?;
//!
//! // Settle: one accepted worker at 3000 units, 10% to the creator, the gateway keeps 7000.
//! let worker = SigningKey::from_bytes(&[3; 32]);
//! let creator = SigningKey::from_bytes(&[4; 32]);
//! let plan = CapturePlan {
//!     payouts: vec![WorkerPayout {
//!         worker: d402_settlement::wallet::address(&worker),
//!         gross: 3000,
//!         claim_cid: Cid::raw(b"claim"),
//!     }],
//!     commission: CommissionTerms {
//!         registration_cid: Some(Cid::raw(b"registration")),
//!         bps: 1000,
//!         creator_wallet: Some(d402_settlement::wallet::address(&creator)),
//!     },
//! };
//! let receipt = rail.capture_task(task_id, &plan, now)?;
//! let response = x402::SettlementResponse::settled(rail.network(), receipt);
//! let _payment_response_header = response.to_header()?;
//! assert_eq!(rail.balance(&d402_settlement::wallet::address(&worker))?, 2700);
//! # Ok(()) }
//! ```

pub mod amount;
pub mod client;
pub mod local;
pub mod rail;
pub mod wallet;
pub mod x402;

pub use amount::{AmountError, Asset, format_decimal, parse_decimal};
pub use local::{LOCAL_NETWORK, LocalRail, LocalRailConfig};
pub use rail::{
    CapturePlan, CommissionTerms, EscrowState, EscrowStatus, Lock, Quote, QuoteRequest, Rail,
    RailError, RailFuture, VerifiedPayment, WorkerPayout, plan_transfers,
};
