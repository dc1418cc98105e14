//! The `local` rail: accounts and a per-task escrow ledger in the gateway's redb.
//!
//! It is the embedded default for the devnet and tests. Accounts are ed25519 public keys
//! (their base58 form is the address). A payer authorises a payment by signing a
//! [`LocalAuthorization`] over the x402 terms; the gateway verifies it, then [locks] it: in
//! one redb write transaction the nonce is marked used, the payer is debited and the task's
//! escrow is credited. [Capture] pays the accepted workers and the creator from the escrow
//! and the gateway keeps the rest; [refund] returns the escrow to the payer. Every movement
//! is a [`LedgerEntry`] in the journal, tagged with the task, the claim and the
//! registration CID. Balances are created only by the [faucet], and only in dev mode.
//!
//! Every state change is one write transaction, committed (with redb's immediate
//! durability) before the call returns. Each operation also has an `_in` form that works
//! inside the caller's write transaction, so the gateway can commit its own task record
//! and the money movement atomically. Do not call the plain forms while holding a write
//! transaction on the same database: redb has one writer at a time, and they would wait
//! for it forever.
//!
//! The `_in` forms are as durable as the caller's transaction: keep redb's default
//! (immediate) durability for it.
//!
//! An `_in` operation that refuses (a replay, insufficient funds, a bad plan …) has
//! written nothing to the transaction: everything is checked before the first write. So
//! a caller may run several operations in one transaction and commit once (group
//! commit), keeping the ones that succeeded; only a storage error leaves the transaction
//! unusable, and then it must be aborted. A durable commit costs milliseconds (an fsync),
//! so grouping is how a busy gateway reaches high task rates (docs/BENCHMARKS.md).
//!
//! The methods are synchronous (a commit waits for an fsync); the [`Rail`] impl runs them
//! when its future is polled. An async gateway may prefer to call the synchronous forms on
//! a blocking thread.
//!
//! [locks]: LocalRail::lock_payment
//! [Capture]: LocalRail::capture_task
//! [refund]: LocalRail::refund_task
//! [faucet]: LocalRail::faucet

pub mod authorization;
pub mod ledger;

use std::{fmt, sync::Arc};

use redb::{Database, ReadableDatabase, ReadableTable, Table, TableDefinition, WriteTransaction};
use serde_json::{Map, Value};
use tracing::{debug, info};

use d402_capabilities::commission;
use d402_protocol::{
    Amount, PublicKey, RailKind, Signed, SigningKey, TaskId, UnixMillis,
    messages::{PayeeRole, SettlementReceipt, Transfer},
    types::MESSAGE_VERSION,
};

pub use authorization::{LOCAL_PAYMENT_DOMAIN, LocalAuthorization, NONCE_LEN};
pub use ledger::{Account, Audit, EscrowRecord, LedgerEntry, LedgerReader};

use crate::{
    amount::Asset,
    rail::{
        CapturePlan, EscrowState, EscrowStatus, Lock, Proof, Quote, QuoteRequest, Rail, RailError,
        RailFuture, VerifiedPayment, plan_transfers,
    },
    x402::{Payment, PaymentRequired, PaymentRequirements, SCHEME_EXACT},
};
use ledger::{
    BALANCES, ESCROWS, ESCROWS_NAME, JOURNAL, MAX_ESCROW_RECORD, META, META_MINTED,
    META_NEXT_ENTRY, META_SCHEMA, NONCES, SCHEMA_VERSION, decode, encode, tx_ref,
};

/// The x402 network id of the local rail (v1 name: `d402-local`).
pub const LOCAL_NETWORK: &str = "d402:local";

/// Clock difference tolerated between payer and gateway when bounding a validity window.
pub const CLOCK_SKEW_MS: u64 = 60_000;

/// Default `maxTimeoutSeconds`: how long a payment authorization may stay valid.
pub const DEFAULT_MAX_TIMEOUT_SECONDS: u64 = 300;

/// Longest `maxTimeoutSeconds` accepted in the configuration (one day).
pub const MAX_TIMEOUT_SECONDS: u64 = 86_400;

/// Facts fixed when the ledger is created (`asset`, `decimals`).
const INFO: TableDefinition<&str, &str> = TableDefinition::new("settlement_local_info");

/// How a local rail is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalRailConfig {
    /// The asset of the ledger. Fixed when the ledger is created.
    pub asset: Asset,
    /// Whether the faucet may credit balances. Never in production.
    pub dev_mode: bool,
    /// `maxTimeoutSeconds` of the challenges.
    pub max_timeout_seconds: u64,
}

impl Default for LocalRailConfig {
    fn default() -> Self {
        LocalRailConfig {
            asset: Asset::local_usdc(),
            dev_mode: false,
            max_timeout_seconds: DEFAULT_MAX_TIMEOUT_SECONDS,
        }
    }
}

/// The `local` rail over a redb database the node opened.
pub struct LocalRail {
    db: Arc<Database>,
    operator: SigningKey,
    operator_key: PublicKey,
    /// `operator_key` in base58, encoded once (every challenge and capture names it).
    operator_address: String,
    config: LocalRailConfig,
}

impl fmt::Debug for LocalRail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalRail")
            .field("operator", &self.operator_key)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Parses a local-rail address (a base58 ed25519 public key).
pub fn parse_address(field: &'static str, address: &str) -> Result<PublicKey, RailError> {
    address
        .parse::<PublicKey>()
        .map_err(|_| RailError::InvalidAddress {
            field,
            address: address.to_string(),
        })
}

/// The tables one write operation works on.
struct Tables<'t> {
    balances: Table<'t, &'static [u8; 32], u64>,
    escrows: Table<'t, &'static [u8; 16], &'static [u8]>,
    nonces: Table<'t, &'static [u8], &'static [u8; 16]>,
    journal: Table<'t, u64, &'static [u8]>,
    meta: Table<'t, &'static str, u64>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, RailError> {
        Ok(Tables {
            balances: txn.open_table(BALANCES)?,
            escrows: txn.open_table(ESCROWS)?,
            nonces: txn.open_table(NONCES)?,
            journal: txn.open_table(JOURNAL)?,
            meta: txn.open_table(META)?,
        })
    }

    fn balance(&self, who: &PublicKey) -> Result<u64, RailError> {
        Ok(self.balances.get(&who.0)?.map_or(0, |v| v.value()))
    }

    fn credit(&mut self, who: &PublicKey, units: u64) -> Result<u64, RailError> {
        let new = self
            .balance(who)?
            .checked_add(units)
            .ok_or(RailError::Overflow("balance"))?;
        self.balances.insert(&who.0, new)?;
        Ok(new)
    }

    fn debit(&mut self, who: &PublicKey, units: u64) -> Result<u64, RailError> {
        let balance = self.balance(who)?;
        let new = balance
            .checked_sub(units)
            .ok_or_else(|| RailError::InsufficientFunds {
                address: who.to_string(),
                balance,
                needed: units,
            })?;
        self.balances.insert(&who.0, new)?;
        Ok(new)
    }

    /// Checks that crediting all of `credits` overflows no balance (it cannot while the
    /// ledger balances, as no balance exceeds the minted total, but an operation checks
    /// everything before its first write).
    fn check_credits(&self, credits: &[(PublicKey, u64)]) -> Result<(), RailError> {
        let mut totals = std::collections::BTreeMap::<PublicKey, u64>::new();
        for (who, units) in credits {
            let total = totals.entry(*who).or_default();
            *total = total
                .checked_add(*units)
                .ok_or(RailError::Overflow("balance"))?;
        }
        for (who, units) in totals {
            self.balance(&who)?
                .checked_add(units)
                .ok_or(RailError::Overflow("balance"))?;
        }
        Ok(())
    }

    fn meta(&self, key: &str) -> Result<u64, RailError> {
        Ok(self.meta.get(key)?.map_or(0, |v| v.value()))
    }

    /// Appends a journal entry (its `seq` is assigned here) and returns its number.
    fn append(&mut self, mut entry: LedgerEntry) -> Result<u64, RailError> {
        let seq = self.meta(META_NEXT_ENTRY)?;
        let next = seq.checked_add(1).ok_or(RailError::Overflow("journal"))?;
        entry.seq = seq;
        self.journal.insert(seq, encode(&entry)?.as_slice())?;
        self.meta.insert(META_NEXT_ENTRY, next)?;
        Ok(seq)
    }

    fn escrow(&self, task_id: &TaskId) -> Result<Option<EscrowRecord>, RailError> {
        self.escrows
            .get(&task_id.0)?
            .map(|v| decode(ESCROWS_NAME, v.value(), MAX_ESCROW_RECORD))
            .transpose()
    }

    fn put_escrow(&mut self, rec: &EscrowRecord) -> Result<(), RailError> {
        self.escrows
            .insert(&rec.task_id.0, encode(rec)?.as_slice())?;
        Ok(())
    }
}

fn entry(at: UnixMillis, from: Account, to: Account, units: u64) -> LedgerEntry {
    LedgerEntry {
        seq: 0,
        at,
        from,
        to,
        units,
        task_id: None,
        role: None,
        claim_cid: None,
        registration_cid: None,
    }
}

fn lock_of(rec: &EscrowRecord, already_locked: bool) -> Lock {
    Lock {
        task_id: rec.task_id,
        payer: rec.payer.to_string(),
        amount: Amount {
            asset: rec.asset.clone(),
            units: rec.units,
        },
        tx_ref: tx_ref(rec.lock_entry),
        locked_at: rec.locked_at,
        already_locked,
    }
}

fn mismatch(field: &'static str, expected: impl ToString, found: impl ToString) -> RailError {
    RailError::TermMismatch {
        field,
        expected: expected.to_string(),
        found: found.to_string(),
    }
}

fn check_terms(expected: &PaymentRequirements, got: &PaymentRequirements) -> Result<(), RailError> {
    if got.pay_to != expected.pay_to {
        return Err(mismatch("payTo", &expected.pay_to, &got.pay_to));
    }
    if got.asset != expected.asset {
        return Err(mismatch("asset", &expected.asset, &got.asset));
    }
    if got.amount != expected.amount {
        return Err(mismatch("amount", expected.amount, got.amount));
    }
    Ok(())
}

fn check_window(a: &LocalAuthorization, now: UnixMillis) -> Result<(), RailError> {
    if now < a.valid_after {
        return Err(RailError::NotYetValid {
            valid_after: a.valid_after,
            now,
        });
    }
    if now >= a.valid_before {
        return Err(RailError::Expired {
            valid_before: a.valid_before,
            now,
        });
    }
    Ok(())
}

impl LocalRail {
    /// Opens the rail on `db`, creating its tables on first use. `operator` is the
    /// gateway's key: its public key is the `payTo` account that keeps the margin, and it
    /// signs the receipts. Refuses a ledger created with another asset.
    pub fn open(
        db: Arc<Database>,
        operator: SigningKey,
        config: LocalRailConfig,
    ) -> Result<Self, RailError> {
        config
            .asset
            .validate()
            .map_err(|e| RailError::Config(e.to_string()))?;
        if config.max_timeout_seconds == 0 || config.max_timeout_seconds > MAX_TIMEOUT_SECONDS {
            return Err(RailError::Config(format!(
                "max_timeout_seconds must be 1 to {MAX_TIMEOUT_SECONDS}"
            )));
        }
        let txn = db.begin_write()?;
        {
            let mut t = Tables::open(&txn)?;
            let schema = t.meta.get(META_SCHEMA)?.map(|v| v.value());
            match schema {
                None => {
                    t.meta.insert(META_SCHEMA, SCHEMA_VERSION)?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(other) => {
                    return Err(RailError::Config(format!(
                        "the local ledger has schema {other}; this d402 reads {SCHEMA_VERSION}"
                    )));
                }
            }
            let mut info = txn.open_table(INFO)?;
            let decimals = config.asset.decimals.to_string();
            for (key, want) in [("asset", config.asset.id.as_str()), ("decimals", &decimals)] {
                let found = info.get(key)?.map(|v| v.value().to_string());
                match found {
                    None => {
                        info.insert(key, want)?;
                    }
                    Some(found) if found == want => {}
                    Some(found) => {
                        return Err(RailError::Config(format!(
                            "the local ledger holds {key} {found:?}, not {want:?}"
                        )));
                    }
                }
            }
        }
        txn.commit()?;
        let operator_key = PublicKey::from(operator.verifying_key());
        Ok(LocalRail {
            db,
            operator,
            operator_address: operator_key.to_string(),
            operator_key,
            config,
        })
    }

    /// The database handle.
    pub fn database(&self) -> &Arc<Database> {
        &self.db
    }

    /// The gateway's account (`payTo`), base58.
    pub fn address(&self) -> String {
        self.operator_address.clone()
    }

    /// The configuration.
    pub fn config(&self) -> &LocalRailConfig {
        &self.config
    }

    fn write<R>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<R, RailError>,
    ) -> Result<R, RailError> {
        let txn = self.db.begin_write()?;
        let out = f(&txn)?;
        txn.commit()?;
        Ok(out)
    }

    /// Runs `f` with a reader over a fresh read transaction.
    pub fn read<R>(
        &self,
        f: impl FnOnce(&LedgerReader<'_>) -> Result<R, RailError>,
    ) -> Result<R, RailError> {
        let txn = self.db.begin_read()?;
        f(&LedgerReader::new(&txn))
    }

    /// The balance of a base58 address.
    pub fn balance(&self, address: &str) -> Result<u64, RailError> {
        let key = parse_address("account", address)?;
        self.read(|r| r.balance(&key))
    }

    /// Balances, locked escrow and minted total (see [`Audit::is_balanced`]).
    pub fn audit(&self) -> Result<Audit, RailError> {
        self.read(|r| r.audit())
    }

    /// Credits `units` to `address` out of thin air: dev mode only. Returns the new
    /// balance.
    pub fn faucet(&self, address: &str, units: u64, now: UnixMillis) -> Result<u64, RailError> {
        if !self.config.dev_mode {
            return Err(RailError::FaucetDisabled);
        }
        let to = parse_address("account", address)?;
        let balance = self.write(|txn| {
            let mut t = Tables::open(txn)?;
            let minted = t
                .meta(META_MINTED)?
                .checked_add(units)
                .ok_or(RailError::Overflow("minted total"))?;
            t.check_credits(&[(to, units)])?;
            let balance = t.credit(&to, units)?;
            t.meta.insert(META_MINTED, minted)?;
            t.append(entry(now, Account::Faucet, Account::Wallet(to), units))?;
            Ok(balance)
        })?;
        info!(account = %to, units, balance, "faucet credited");
        Ok(balance)
    }

    /// Checks `payment` against the local requirement of `challenge` at `now`, without
    /// moving money: the signature, that the signed terms are the challenge's (payTo,
    /// asset, amount, resource), the validity window (not before `valid_after`, not at or
    /// after `valid_before`, and ending no later than `maxTimeoutSeconds` plus
    /// [`CLOCK_SKEW_MS`] from now), that the nonce was never used, and the payer's balance.
    pub fn verify_payment(
        &self,
        payment: &Payment,
        challenge: &PaymentRequired,
        now: UnixMillis,
    ) -> Result<VerifiedPayment, RailError> {
        let expected = challenge.find(SCHEME_EXACT, LOCAL_NETWORK).ok_or_else(|| {
            RailError::NotInChallenge {
                scheme: SCHEME_EXACT.into(),
                network: LOCAL_NETWORK.into(),
            }
        })?;
        if expected.pay_to != self.address() || expected.asset != self.config.asset.id {
            return Err(RailError::Config(
                "the challenge's local requirement was not issued by this rail".into(),
            ));
        }
        if payment.scheme() != SCHEME_EXACT {
            return Err(RailError::WrongScheme {
                expected: SCHEME_EXACT.into(),
                found: payment.scheme().into(),
            });
        }
        if payment.network() != LOCAL_NETWORK {
            return Err(RailError::WrongNetwork {
                expected: LOCAL_NETWORK.into(),
                found: payment.network().into(),
            });
        }
        if let Some(accepted) = payment.accepted() {
            check_terms(expected, accepted)?;
        }
        if let Payment::V2(p) = payment
            && let Some(r) = &p.resource
            && r.url != challenge.resource.url
        {
            return Err(mismatch("resource", &challenge.resource.url, &r.url));
        }
        let signed = authorization::from_payload(payment.payload())?;
        signed
            .verify_from(&signed.body.payer)
            .map_err(|e| RailError::BadSignature(e.to_string()))?;
        let a = &signed.body;
        if a.pay_to.to_string() != expected.pay_to {
            return Err(mismatch("payTo", &expected.pay_to, a.pay_to));
        }
        if a.asset != expected.asset {
            return Err(mismatch("asset", &expected.asset, &a.asset));
        }
        if a.amount != expected.amount.0 {
            return Err(mismatch("amount", expected.amount, a.amount));
        }
        if a.resource != challenge.resource.url {
            return Err(mismatch("resource", &challenge.resource.url, &a.resource));
        }
        check_window(a, now)?;
        let latest = now
            .saturating_add(expected.max_timeout_seconds.saturating_mul(1000))
            .saturating_add(CLOCK_SKEW_MS);
        if a.valid_before > latest {
            return Err(RailError::WindowTooLong {
                valid_before: a.valid_before,
                latest,
            });
        }
        self.read(|r| {
            if r.nonce_used(&a.nonce)?.is_some() {
                return Err(RailError::NonceReplayed);
            }
            let balance = r.balance(&a.payer)?;
            if balance < a.amount {
                return Err(RailError::InsufficientFunds {
                    address: a.payer.to_string(),
                    balance,
                    needed: a.amount,
                });
            }
            Ok(())
        })?;
        debug!(payer = %a.payer, units = a.amount, "local payment verified");
        Ok(VerifiedPayment {
            rail: RailKind::Local,
            payer: a.payer.to_string(),
            amount: self.config.asset.amount(a.amount),
            nonce: a.nonce.clone(),
            valid_before: a.valid_before,
            resource: a.resource.clone(),
            proof: Proof::Local(Box::new(signed)),
        })
    }

    /// [`LocalRail::lock_in`] in its own write transaction.
    pub fn lock_payment(
        &self,
        task_id: TaskId,
        payment: &VerifiedPayment,
        now: UnixMillis,
    ) -> Result<Lock, RailError> {
        self.write(|txn| self.lock_in(txn, task_id, payment, now))
    }

    /// Locks a verified payment into the task's escrow inside `txn`: marks the nonce used,
    /// debits the payer, records the escrow and a journal entry. Locking the same payment
    /// for the same task again returns the first lock (`already_locked`); the same nonce
    /// for another task is a replay; another payment for a locked task is refused.
    pub fn lock_in(
        &self,
        txn: &WriteTransaction,
        task_id: TaskId,
        payment: &VerifiedPayment,
        now: UnixMillis,
    ) -> Result<Lock, RailError> {
        let Proof::Local(signed) = &payment.proof;
        let a = &signed.body;
        if payment.rail != RailKind::Local || a.pay_to != self.operator_key {
            return Err(mismatch("payTo", self.address(), a.pay_to));
        }
        if a.asset != self.config.asset.id {
            return Err(mismatch("asset", &self.config.asset.id, &a.asset));
        }
        let mut t = Tables::open(txn)?;
        let used_by = t
            .nonces
            .get(a.nonce.as_slice())?
            .map(|v| TaskId(*v.value()));
        if let Some(used_by) = used_by {
            if used_by == task_id
                && let Some(rec) = t.escrow(&task_id)?
                && rec.authorization.body.nonce == a.nonce
            {
                return Ok(lock_of(&rec, true));
            }
            info!(%task_id, payer = %a.payer, first_task = %used_by, "replayed nonce refused");
            return Err(RailError::NonceReplayed);
        }
        if t.escrow(&task_id)?.is_some() {
            return Err(RailError::TaskAlreadyLocked(task_id));
        }
        check_window(a, now)?;
        t.debit(&a.payer, a.amount)?;
        let mut e = entry(
            now,
            Account::Wallet(a.payer),
            Account::Escrow(task_id),
            a.amount,
        );
        e.task_id = Some(task_id);
        let seq = t.append(e)?;
        let rec = EscrowRecord {
            v: MESSAGE_VERSION,
            task_id,
            payer: a.payer,
            asset: a.asset.clone(),
            units: a.amount,
            authorization: (**signed).clone(),
            locked_at: now,
            lock_entry: seq,
            state: EscrowState::Locked,
            plan_cid: None,
            receipt: None,
        };
        t.put_escrow(&rec)?;
        t.nonces.insert(a.nonce.as_slice(), &task_id.0)?;
        info!(%task_id, payer = %a.payer, units = a.amount, "payment locked in escrow");
        Ok(lock_of(&rec, false))
    }

    /// [`LocalRail::capture_in`] in its own write transaction.
    pub fn capture_task(
        &self,
        task_id: TaskId,
        plan: &CapturePlan,
        now: UnixMillis,
    ) -> Result<Signed<SettlementReceipt>, RailError> {
        self.write(|txn| self.capture_in(txn, task_id, plan, now))
    }

    /// Pays out a locked task inside `txn` by [`plan_transfers`]: each worker its net, the
    /// creator its commission, the gateway the rest; returns the receipt signed by the
    /// operator key. A retry with the same plan returns the stored receipt; another plan
    /// is [`RailError::PlanConflict`]; a refunded task is [`RailError::AlreadyRefunded`].
    /// Every error but [`RailError::PartlyWritten`] leaves `txn` untouched.
    pub fn capture_in(
        &self,
        txn: &WriteTransaction,
        task_id: TaskId,
        plan: &CapturePlan,
        now: UnixMillis,
    ) -> Result<Signed<SettlementReceipt>, RailError> {
        let mut t = Tables::open(txn)?;
        let mut rec = t.escrow(&task_id)?.ok_or(RailError::UnknownTask(task_id))?;
        let plan_cid = plan.cid()?;
        match rec.state {
            EscrowState::Locked => {}
            EscrowState::Captured if rec.plan_cid == Some(plan_cid) => {
                return rec.receipt.ok_or_else(|| RailError::Corrupt {
                    table: ESCROWS_NAME,
                    reason: format!("captured task {task_id} has no receipt"),
                });
            }
            EscrowState::Captured => return Err(RailError::PlanConflict(task_id)),
            EscrowState::Refunded => return Err(RailError::AlreadyRefunded(task_id)),
        }
        // Everything that can be refused is checked, and the receipt signed, before the
        // first write: a refused capture leaves `txn` untouched.
        let transfers = plan_transfers(rec.units, &self.address(), plan)?;
        let payees = transfers
            .iter()
            .map(|tr| {
                let field = match tr.role {
                    PayeeRole::Worker => "worker",
                    PayeeRole::Creator => "creator",
                    PayeeRole::Gateway => "gateway",
                    PayeeRole::Refund => "payer",
                };
                Ok((parse_address(field, &tr.to)?, tr.units))
            })
            .collect::<Result<Vec<_>, RailError>>()?;
        t.check_credits(&payees)?;
        let first = t.meta(META_NEXT_ENTRY)?;
        let tx_refs = (0..payees.len() as u64)
            .map(|i| first.checked_add(i).map(tx_ref))
            .collect::<Option<Vec<_>>>()
            .ok_or(RailError::Overflow("journal"))?;
        let receipt = self.sign_receipt(&rec, transfers.clone(), tx_refs, now)?;
        rec.state = EscrowState::Captured;
        rec.plan_cid = Some(plan_cid);
        rec.receipt = Some(receipt.clone());
        // From the first write on, a failure leaves part of the capture in `txn`.
        let mut write = || -> Result<(), RailError> {
            for (tr, (to, units)) in transfers.iter().zip(&payees) {
                t.credit(to, *units)?;
                let mut e = entry(now, Account::Escrow(task_id), Account::Wallet(*to), *units);
                e.task_id = Some(task_id);
                e.role = Some(tr.role);
                e.claim_cid = tr.claim_cid;
                e.registration_cid = tr.registration_cid;
                t.append(e)?;
            }
            t.put_escrow(&rec)
        };
        write().map_err(|e| RailError::PartlyWritten(Box::new(e)))?;
        info!(
            %task_id,
            units = rec.units,
            workers = plan.payouts.len(),
            bps = plan.commission.bps,
            "task captured"
        );
        Ok(receipt)
    }

    /// [`LocalRail::refund_in`] in its own write transaction.
    pub fn refund_task(
        &self,
        task_id: TaskId,
        now: UnixMillis,
    ) -> Result<Signed<SettlementReceipt>, RailError> {
        self.write(|txn| self.refund_in(txn, task_id, now))
    }

    /// Returns a locked task's escrow to the payer inside `txn`, with a signed receipt. A
    /// retry returns the stored receipt; a captured task is [`RailError::AlreadyCaptured`].
    pub fn refund_in(
        &self,
        txn: &WriteTransaction,
        task_id: TaskId,
        now: UnixMillis,
    ) -> Result<Signed<SettlementReceipt>, RailError> {
        let mut t = Tables::open(txn)?;
        let mut rec = t.escrow(&task_id)?.ok_or(RailError::UnknownTask(task_id))?;
        match rec.state {
            EscrowState::Locked => {}
            EscrowState::Refunded => {
                return rec.receipt.ok_or_else(|| RailError::Corrupt {
                    table: ESCROWS_NAME,
                    reason: format!("refunded task {task_id} has no receipt"),
                });
            }
            EscrowState::Captured => return Err(RailError::AlreadyCaptured(task_id)),
        }
        t.check_credits(&[(rec.payer, rec.units)])?;
        let seq = t.meta(META_NEXT_ENTRY)?;
        let transfers = vec![Transfer {
            role: PayeeRole::Refund,
            to: rec.payer.to_string(),
            units: rec.units,
            claim_cid: None,
            registration_cid: None,
        }];
        let receipt = self.sign_receipt(&rec, transfers, vec![tx_ref(seq)], now)?;
        t.credit(&rec.payer, rec.units)?;
        let mut e = entry(
            now,
            Account::Escrow(task_id),
            Account::Wallet(rec.payer),
            rec.units,
        );
        e.task_id = Some(task_id);
        e.role = Some(PayeeRole::Refund);
        t.append(e)?;
        rec.state = EscrowState::Refunded;
        rec.receipt = Some(receipt.clone());
        t.put_escrow(&rec)?;
        info!(%task_id, units = rec.units, "task refunded");
        Ok(receipt)
    }

    fn sign_receipt(
        &self,
        rec: &EscrowRecord,
        transfers: Vec<Transfer>,
        tx_refs: Vec<String>,
        now: UnixMillis,
    ) -> Result<Signed<SettlementReceipt>, RailError> {
        let body = SettlementReceipt {
            v: MESSAGE_VERSION,
            task_id: rec.task_id,
            rail: RailKind::Local,
            payer: rec.payer.to_string(),
            charged: Amount {
                asset: rec.asset.clone(),
                units: rec.units,
            },
            transfers,
            tx_refs,
            settled_at: now,
        };
        Ok(Signed::sign(body, &self.operator)?)
    }

    /// The task's escrow, if a payment was ever locked for it.
    pub fn escrow(&self, task_id: TaskId) -> Result<Option<EscrowStatus>, RailError> {
        self.read(|r| Ok(r.escrow(&task_id)?.map(|rec| rec.status())))
    }

    fn extra(&self) -> Map<String, Value> {
        let mut extra = Map::new();
        extra.insert("name".into(), self.config.asset.symbol.clone().into());
        extra.insert("decimals".into(), self.config.asset.decimals.into());
        extra.insert("domain".into(), LOCAL_PAYMENT_DOMAIN.into());
        extra
    }
}

impl Rail for LocalRail {
    fn kind(&self) -> RailKind {
        RailKind::Local
    }

    fn network(&self) -> &str {
        LOCAL_NETWORK
    }

    fn asset(&self) -> &Asset {
        &self.config.asset
    }

    fn pay_to(&self) -> String {
        self.address()
    }

    fn quote(&self, request: &QuoteRequest) -> Result<Quote, RailError> {
        request
            .capability
            .validate()
            .map_err(|e| RailError::InvalidQuote(e.to_string()))?;
        if request.price_units == 0 {
            return Err(RailError::InvalidQuote("the price must be above 0".into()));
        }
        commission::check_bps(request.creator_commission_bps)
            .map_err(|e| RailError::InvalidQuote(e.to_string()))?;
        Ok(Quote {
            rail: RailKind::Local,
            scheme: SCHEME_EXACT.into(),
            network: LOCAL_NETWORK.into(),
            amount: self.config.asset.amount(request.price_units),
            pay_to: self.address(),
            max_timeout_seconds: self.config.max_timeout_seconds,
            extra: self.extra(),
        })
    }

    fn verify<'a>(
        &'a self,
        payment: &'a Payment,
        challenge: &'a PaymentRequired,
        now: UnixMillis,
    ) -> RailFuture<'a, VerifiedPayment> {
        Box::pin(async move { self.verify_payment(payment, challenge, now) })
    }

    fn lock<'a>(
        &'a self,
        task_id: TaskId,
        payment: &'a VerifiedPayment,
        now: UnixMillis,
    ) -> RailFuture<'a, Lock> {
        Box::pin(async move { self.lock_payment(task_id, payment, now) })
    }

    fn capture<'a>(
        &'a self,
        task_id: TaskId,
        plan: &'a CapturePlan,
        now: UnixMillis,
    ) -> RailFuture<'a, Signed<SettlementReceipt>> {
        Box::pin(async move { self.capture_task(task_id, plan, now) })
    }

    fn refund<'a>(
        &'a self,
        task_id: TaskId,
        now: UnixMillis,
    ) -> RailFuture<'a, Signed<SettlementReceipt>> {
        Box::pin(async move { self.refund_task(task_id, now) })
    }

    fn escrow_status<'a>(&'a self, task_id: TaskId) -> RailFuture<'a, Option<EscrowStatus>> {
        Box::pin(async move { self.escrow(task_id) })
    }
}
