//! The `local` rail's tables in the gateway's redb, their records, and read access.
//!
//! | table | key | value |
//! |---|---|---|
//! | `settlement_local_balances` | account public key (32 bytes) | balance in smallest units |
//! | `settlement_local_escrows` | task id (16 bytes) | CBOR [`EscrowRecord`] |
//! | `settlement_local_nonces` | payment nonce (32 bytes) | the task id it paid for |
//! | `settlement_local_journal` | entry number | CBOR [`LedgerEntry`] |
//! | `settlement_local_meta` | `schema`, `minted`, `next_entry` | counters |
//!
//! Invariant (checked by [`LedgerReader::audit`]): the sum of all balances plus the units of
//! every escrow still `Locked` equals `minted`, the total the faucet ever credited.

use redb::{ReadTransaction, ReadableTable, ReadableTableMetadata, TableDefinition, TableError};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use d402_protocol::{
    Amount, Cid, PublicKey, Signed, TaskId, UnixMillis, cbor,
    messages::{PayeeRole, SettlementReceipt},
};

use crate::{
    local::authorization::LocalAuthorization,
    rail::{EscrowState, EscrowStatus, RailError},
};

pub(crate) const ESCROWS_NAME: &str = "settlement_local_escrows";
pub(crate) const JOURNAL_NAME: &str = "settlement_local_journal";

/// Balances: account key → units.
pub(crate) const BALANCES: TableDefinition<&[u8; 32], u64> =
    TableDefinition::new("settlement_local_balances");
/// Escrows: task id → [`EscrowRecord`].
pub(crate) const ESCROWS: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new(ESCROWS_NAME);
/// Used nonces: nonce → task id.
pub(crate) const NONCES: TableDefinition<&[u8], &[u8; 16]> =
    TableDefinition::new("settlement_local_nonces");
/// Journal: entry number → [`LedgerEntry`].
pub(crate) const JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new(JOURNAL_NAME);
/// Counters.
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("settlement_local_meta");

/// Schema version of these tables.
pub const SCHEMA_VERSION: u64 = 1;
pub(crate) const META_SCHEMA: &str = "schema";
pub(crate) const META_MINTED: &str = "minted";
pub(crate) const META_NEXT_ENTRY: &str = "next_entry";

/// Largest stored escrow record (it holds the authorization and the receipt).
pub const MAX_ESCROW_RECORD: usize = 64 * 1024;
/// Largest stored journal entry.
pub const MAX_LEDGER_ENTRY: usize = 1024;

/// A side of a ledger movement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Account {
    /// Money created by the dev-mode faucet.
    Faucet,
    /// A wallet (payer, worker, creator or the gateway).
    Wallet(PublicKey),
    /// A task's escrow.
    Escrow(TaskId),
}

/// One movement of money, as recorded in the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// Entry number (`local:<seq>` in receipts).
    pub seq: u64,
    /// When it was committed.
    pub at: UnixMillis,
    /// Where the money came from.
    pub from: Account,
    /// Where it went.
    pub to: Account,
    /// Smallest units moved.
    pub units: u64,
    /// The task, for locks, payouts and refunds.
    pub task_id: Option<TaskId>,
    /// Who was paid, for payouts and refunds.
    pub role: Option<PayeeRole>,
    /// The claim a worker or creator payout is for.
    pub claim_cid: Option<Cid>,
    /// The registration whose terms set a creator commission.
    pub registration_cid: Option<Cid>,
}

impl LedgerEntry {
    /// The reference used in receipts: `local:<seq>`.
    pub fn tx_ref(&self) -> String {
        tx_ref(self.seq)
    }
}

pub(crate) fn tx_ref(seq: u64) -> String {
    format!("local:{seq}")
}

/// A task's escrow as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EscrowRecord {
    /// Record version (1).
    pub v: u16,
    /// The task.
    pub task_id: TaskId,
    /// Who paid.
    pub payer: PublicKey,
    /// The asset.
    pub asset: String,
    /// Units held (or once held).
    pub units: u64,
    /// The payer's signed authorization, kept as evidence.
    pub authorization: Signed<LocalAuthorization>,
    /// When it was locked.
    pub locked_at: UnixMillis,
    /// The journal entry of the lock.
    pub lock_entry: u64,
    /// Where it stands.
    pub state: EscrowState,
    /// CID of the capture plan, once captured.
    pub plan_cid: Option<Cid>,
    /// The receipt, once captured or refunded.
    pub receipt: Option<Signed<SettlementReceipt>>,
}

impl EscrowRecord {
    /// The rail-neutral status.
    pub fn status(&self) -> EscrowStatus {
        EscrowStatus {
            task_id: self.task_id,
            state: self.state,
            payer: self.payer.to_string(),
            amount: Amount {
                asset: self.asset.clone(),
                units: self.units,
            },
            receipt: self.receipt.clone(),
        }
    }
}

/// A ledger row's CBOR (rows are this node's own: no canonicalisation, see
/// [`cbor::to_local`]).
pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, RailError> {
    Ok(cbor::to_local(value)?)
}

/// Decodes a ledger row of at most `max` bytes.
pub(crate) fn decode<T: DeserializeOwned>(
    table: &'static str,
    bytes: &[u8],
    max: usize,
) -> Result<T, RailError> {
    cbor::from_local(bytes, max, table).map_err(|e| RailError::Corrupt {
        table,
        reason: e.to_string(),
    })
}

/// Totals of the ledger, from [`LedgerReader::audit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Audit {
    /// Everything the faucet ever credited.
    pub minted: u64,
    /// Sum of all balances.
    pub balances: u128,
    /// Sum of the escrows still locked.
    pub locked: u128,
    /// Accounts with a balance row.
    pub accounts: u64,
    /// Escrows still locked.
    pub locked_tasks: u64,
}

impl Audit {
    /// Whether balances plus locked escrow equal what was minted.
    pub fn is_balanced(&self) -> bool {
        self.balances + self.locked == u128::from(self.minted)
    }
}

/// Read access to the local ledger through any read transaction, including one on a
/// `redb::ReadOnlyDatabase` opened by another process while the node runs.
pub struct LedgerReader<'t> {
    txn: &'t ReadTransaction,
}

fn missing_is_empty<T>(r: Result<T, TableError>) -> Result<Option<T>, RailError> {
    match r {
        Ok(t) => Ok(Some(t)),
        Err(TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl<'t> LedgerReader<'t> {
    /// A reader over `txn`. Tables the rail never created read as empty.
    pub fn new(txn: &'t ReadTransaction) -> Self {
        LedgerReader { txn }
    }

    /// The balance of `account`.
    pub fn balance(&self, account: &PublicKey) -> Result<u64, RailError> {
        let Some(t) = missing_is_empty(self.txn.open_table(BALANCES))? else {
            return Ok(0);
        };
        Ok(t.get(&account.0)?.map_or(0, |v| v.value()))
    }

    /// Every account with a balance row, in key order.
    pub fn balances(&self) -> Result<Vec<(PublicKey, u64)>, RailError> {
        let Some(t) = missing_is_empty(self.txn.open_table(BALANCES))? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((PublicKey(*k.value()), v.value()));
        }
        Ok(out)
    }

    /// The escrow record of `task_id`.
    pub fn escrow(&self, task_id: &TaskId) -> Result<Option<EscrowRecord>, RailError> {
        let Some(t) = missing_is_empty(self.txn.open_table(ESCROWS))? else {
            return Ok(None);
        };
        t.get(&task_id.0)?
            .map(|v| decode(ESCROWS_NAME, v.value(), MAX_ESCROW_RECORD))
            .transpose()
    }

    /// Tasks whose escrow is still locked: after a restart the gateway captures or refunds
    /// each one it still knows, and refunds the others.
    pub fn locked_tasks(&self) -> Result<Vec<TaskId>, RailError> {
        let Some(t) = missing_is_empty(self.txn.open_table(ESCROWS))? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            let rec: EscrowRecord = decode(ESCROWS_NAME, v.value(), MAX_ESCROW_RECORD)?;
            if rec.state == EscrowState::Locked {
                out.push(rec.task_id);
            }
        }
        Ok(out)
    }

    /// The task a nonce paid for, if it was used.
    pub fn nonce_used(&self, nonce: &[u8]) -> Result<Option<TaskId>, RailError> {
        let Some(t) = missing_is_empty(self.txn.open_table(NONCES))? else {
            return Ok(None);
        };
        Ok(t.get(nonce)?.map(|v| TaskId(*v.value())))
    }

    /// Journal entries from `from_seq` on, at most `limit`.
    pub fn journal(&self, from_seq: u64, limit: usize) -> Result<Vec<LedgerEntry>, RailError> {
        let Some(t) = missing_is_empty(self.txn.open_table(JOURNAL))? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for row in t.range(from_seq..)?.take(limit) {
            let (_, v) = row?;
            out.push(decode(JOURNAL_NAME, v.value(), MAX_LEDGER_ENTRY)?);
        }
        Ok(out)
    }

    /// Journal entries of one task: the lock, then the payouts or the refund (found through
    /// the escrow record and its receipt, without scanning the journal).
    pub fn task_entries(&self, task_id: &TaskId) -> Result<Vec<LedgerEntry>, RailError> {
        let Some(rec) = self.escrow(task_id)? else {
            return Ok(Vec::new());
        };
        let Some(t) = missing_is_empty(self.txn.open_table(JOURNAL))? else {
            return Ok(Vec::new());
        };
        let corrupt = |reason: String| RailError::Corrupt {
            table: ESCROWS_NAME,
            reason,
        };
        let mut seqs = vec![rec.lock_entry];
        for r in rec.receipt.iter().flat_map(|r| &r.body.tx_refs) {
            let seq = r
                .strip_prefix("local:")
                .and_then(|n| n.parse::<u64>().ok())
                .ok_or_else(|| corrupt(format!("task {task_id}: bad ledger reference {r:?}")))?;
            seqs.push(seq);
        }
        let mut out = Vec::with_capacity(seqs.len());
        for seq in seqs {
            let row = t.get(seq)?.ok_or_else(|| {
                corrupt(format!("task {task_id}: journal entry {seq} is missing"))
            })?;
            out.push(decode(JOURNAL_NAME, row.value(), MAX_LEDGER_ENTRY)?);
        }
        Ok(out)
    }

    /// A counter of the meta table.
    pub fn meta(&self, key: &str) -> Result<u64, RailError> {
        let Some(t) = missing_is_empty(self.txn.open_table(META))? else {
            return Ok(0);
        };
        Ok(t.get(key)?.map_or(0, |v| v.value()))
    }

    /// Totals over the whole ledger.
    pub fn audit(&self) -> Result<Audit, RailError> {
        let mut audit = Audit {
            minted: self.meta(META_MINTED)?,
            balances: 0,
            locked: 0,
            accounts: 0,
            locked_tasks: 0,
        };
        if let Some(t) = missing_is_empty(self.txn.open_table(BALANCES))? {
            audit.accounts = t.len()?;
            for row in t.iter()? {
                audit.balances += u128::from(row?.1.value());
            }
        }
        if let Some(t) = missing_is_empty(self.txn.open_table(ESCROWS))? {
            for row in t.iter()? {
                let rec: EscrowRecord = decode(ESCROWS_NAME, row?.1.value(), MAX_ESCROW_RECORD)?;
                if rec.state == EscrowState::Locked {
                    audit.locked += u128::from(rec.units);
                    audit.locked_tasks += 1;
                }
            }
        }
        Ok(audit)
    }
}
