//! The gateway's persisted tasks (`tasks` table): every step of a task is committed here
//! before the next message goes out, so a restarted gateway resumes from the phase it was
//! in.

use d402_protocol::{
    Amount, CapabilityRef, Cid, RailKind, Signed, TaskId, UnixMillis,
    messages::{Bid, BidRequest, Claim, Lease, SnapshotMeta, Verdict},
    types::MESSAGE_VERSION,
};
use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use crate::{
    group_commit::{CombinedError, Ticket},
    state::{State, StateError, decode, encode},
};

/// Task rows: task id (16 bytes) → CBOR of [`TaskRecord`].
pub const TASKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("tasks");

/// Largest encoded task record (a few claims of up to 4 MiB each).
pub const MAX_TASK_RECORD: usize = 64 * 1024 * 1024;

/// Snapshots pinned for open tasks: task id (16 bytes) ‖ CID bytes → CBOR of
/// [`PinnedSnapshot`] (two tasks on the same static page pin the same CID). The
/// gateway serves a pinned snapshot to the workers it leases and to validators; keeping it
/// here (not only in the in-memory blob store) lets a restarted gateway serve it again.
pub const PINNED_SNAPSHOTS: TableDefinition<&[u8], &[u8]> =
    TableDefinition::new("pinned_snapshots");

/// Largest encoded pinned snapshot row.
const MAX_PINNED_ROW: usize = d402_protocol::protocol_ids::MAX_BLOB + 8 * 1024;

fn pin_key(task: &TaskId, cid: &Cid) -> Vec<u8> {
    let mut k = task.0.to_vec();
    k.extend_from_slice(&cid.to_bytes());
    k
}

/// A snapshot the gateway pinned, with what it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinnedSnapshot {
    /// The bytes (checked against the CID when fetched from the primary).
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
    /// Final URL, status, length, snapshotter.
    pub meta: SnapshotMeta,
}

/// What the buyer asked for and the gateway's terms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// The task.
    pub task_id: TaskId,
    /// The capability.
    pub capability: CapabilityRef,
    /// The exact manifest.
    pub manifest_cid: Cid,
    /// The input.
    #[serde(with = "serde_bytes")]
    pub input: Vec<u8>,
    /// The rail paid on.
    pub rail: RailKind,
    /// The most paid to all workers together.
    pub budget: Amount,
    /// Workers leased in parallel.
    pub fanout: u32,
    /// Agreeing claims needed.
    pub quorum: u32,
    /// When the result is due.
    pub deadline: UnixMillis,
    /// Whether the capability takes a snapshot (its manifest names snapshotters). When it
    /// does, the primary is leased alone and its snapshot pinned for the others; when it
    /// does not, there is nothing to pin and `fanout` workers are leased at once. Records
    /// written before this field existed read as `true` (the cautious path).
    #[serde(default = "takes_snapshot_default")]
    pub takes_snapshot: bool,
}

impl TaskSpec {
    /// The bid request for this task: at most `max_each` per worker, asking for a bid that
    /// covers `standing` leases (1: this task alone).
    pub fn bid_request(&self, max_each: u64, standing: u32) -> BidRequest {
        BidRequest {
            v: MESSAGE_VERSION,
            task_id: self.task_id,
            capability: self.capability.clone(),
            manifest_cid: self.manifest_cid,
            input_cid: Cid::raw(&self.input),
            input_len: self.input.len() as u64,
            rail: self.rail,
            max_price: Amount {
                asset: self.budget.asset.clone(),
                units: max_each,
            },
            deadline: self.deadline,
            standing,
        }
    }
}

fn takes_snapshot_default() -> bool {
    true
}

/// Where a task is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Asking for bids.
    Bidding,
    /// Leasing and collecting claims.
    Leasing,
    /// A quorum agreed.
    Accepted,
    /// Given up.
    Failed {
        /// Why.
        reason: String,
    },
}

impl Phase {
    /// Whether the task is finished.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Phase::Accepted | Phase::Failed { .. })
    }
}

/// A bid received, in selection order (chosen first, then replacements).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BidRec {
    /// The bidder's PeerId bytes.
    #[serde(with = "serde_bytes")]
    pub peer: Vec<u8>,
    /// The signed bid.
    pub bid: Signed<Bid>,
    /// Its CID.
    pub bid_cid: Cid,
    /// A lease was sent for it.
    pub used: bool,
    /// One use of this standing bid was counted in the gateway's book when it was chosen
    /// (so leasing it does not count another).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reserved: bool,
    /// Leases on this bid refused in a row for want of a free slot (the worker is busy, not
    /// gone: the bid is leased again after a backoff, see [`super::busy`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub busy: u32,
    /// After a busy refusal, not leased again before this time.
    #[serde(default, skip_serializing_if = "is_zero_ms")]
    pub retry_at: UnixMillis,
}

/// A bid that was refused or not chosen, and why (the gateway's "why idle" for the bidder).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassedBid {
    /// The bidder's PeerId bytes.
    #[serde(with = "serde_bytes")]
    pub peer: Vec<u8>,
    /// Why: a stable code first (`bad_signature`, `mismatch`, `over_budget`, `banned`,
    /// `low_score`, `outranked`), then details.
    pub reason: String,
}

/// What became of a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseStatus {
    /// Written and sent; the worker may have accepted it already (an acknowledgement is not
    /// committed on its own when every lease of the round was accepted: the claim that
    /// follows moves it to `Claimed`).
    Sent,
    /// The worker accepted it (recorded when another lease of the same round was refused).
    Accepted,
    /// The worker refused it or could not be reached.
    Refused,
    /// Its deadline passed without a claim (superseded by a replacement).
    Expired,
    /// Its claim arrived.
    Claimed,
}

/// A lease issued.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseRec {
    /// The worker's PeerId bytes.
    #[serde(with = "serde_bytes")]
    pub peer: Vec<u8>,
    /// The signed lease.
    pub lease: Signed<Lease>,
    /// Its CID.
    pub lease_cid: Cid,
    /// Its status.
    pub status: LeaseStatus,
}

impl LeaseRec {
    /// Sent or accepted, claim not in yet.
    pub fn is_open(&self) -> bool {
        matches!(self.status, LeaseStatus::Sent | LeaseStatus::Accepted)
    }
}

/// How a claim was judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClaimJudgement {
    /// Not decided yet.
    Pending,
    /// Agreed with the accepted result.
    Accepted,
    /// Disagreed with it.
    Rejected,
    /// Cannot count (its snapshot could not be fetched or is implausible).
    Unusable,
}

/// A claim received.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimRec {
    /// The signed claim.
    pub claim: Signed<Claim>,
    /// How it was judged.
    pub judgement: ClaimJudgement,
    /// The claim's CID once computed (not stored: a record's settlement and its answer
    /// both name every claim, and each CID costs an encoding of the envelope).
    #[serde(skip)]
    cid: std::sync::OnceLock<Cid>,
}

/// Equal when the claims and judgements are (whether a CID was computed is not compared).
impl PartialEq for ClaimRec {
    fn eq(&self, other: &Self) -> bool {
        self.claim == other.claim && self.judgement == other.judgement
    }
}

impl ClaimRec {
    /// A claim just received, judged so.
    pub fn new(claim: Signed<Claim>, judgement: ClaimJudgement) -> Self {
        ClaimRec {
            claim,
            judgement,
            cid: std::sync::OnceLock::new(),
        }
    }

    /// The claim's CID (the `dag-cbor` CID of its envelope), computed once.
    pub fn cid(&self) -> Result<Cid, d402_protocol::ProtocolError> {
        if let Some(c) = self.cid.get() {
            return Ok(*c);
        }
        let c = self.claim.cid()?;
        Ok(*self.cid.get_or_init(|| c))
    }
}

/// A task as the gateway persists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// The request.
    pub spec: TaskSpec,
    /// Where it is.
    pub phase: Phase,
    /// Bids, in selection order.
    pub bids: Vec<BidRec>,
    /// Bids refused or not chosen, with the reason (`outranked` ones stay in `bids` as
    /// replacements).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub passed: Vec<PassedBid>,
    /// Leases, in order of issue.
    pub leases: Vec<LeaseRec>,
    /// Claims, in order of arrival.
    pub claims: Vec<ClaimRec>,
    /// The next fencing token (strictly increasing per task).
    pub next_token: u64,
    /// The primary's claim is in (with or without a snapshot).
    pub primary_done: bool,
    /// The snapshot pinned for the other workers.
    pub pinned: Option<Cid>,
    /// The accepted output.
    pub accepted_output: Option<Cid>,
    /// Last update.
    pub updated_at: UnixMillis,
    /// Agreeing validator verdicts required on top of the quorum (absent when 0, so
    /// records written before validators existed still decode).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub validators: u32,
    /// Signed verdicts received, in order of arrival (committed before they are acted on).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verdicts: Vec<VerdictRec>,
    /// The bids came from the gateway's standing bids, not from a round for this task: when
    /// none of them can be leased any more, the task asks for bids instead of failing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub standing: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_zero_ms(n: &UnixMillis) -> bool {
    *n == 0
}

/// A validator's verdict on one of the task's claims.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerdictRec {
    /// The validator's PeerId bytes.
    #[serde(with = "serde_bytes")]
    pub peer: Vec<u8>,
    /// The signed verdict (names the claim by CID).
    pub verdict: Signed<Verdict>,
}

impl TaskRecord {
    /// A new task in [`Phase::Bidding`].
    pub fn new(spec: TaskSpec, now: UnixMillis) -> TaskRecord {
        TaskRecord {
            spec,
            phase: Phase::Bidding,
            bids: Vec::new(),
            passed: Vec::new(),
            leases: Vec::new(),
            claims: Vec::new(),
            next_token: 1,
            primary_done: false,
            pinned: None,
            accepted_output: None,
            updated_at: now,
            validators: 0,
            verdicts: Vec::new(),
            standing: false,
        }
    }
}

/// The `tasks` table.
#[derive(Debug, Clone)]
pub struct Tasks {
    state: State,
}

/// The combined write of [`Tasks::update_combined`]: `f` on task `id`'s record as `txn`
/// reads it, the record written back (`Ok(None)`: no such task).
fn update_in<R, E, F>(
    id: TaskId,
    mut f: F,
) -> impl FnMut(&WriteTransaction) -> Result<Option<R>, E> + Send + 'static
where
    F: FnMut(&WriteTransaction, &mut TaskRecord) -> Result<R, E> + Send + 'static,
    R: Send + 'static,
    E: From<StateError> + Send + 'static,
{
    move |txn| {
        let mut t = txn.open_table(TASKS).map_err(StateError::from)?;
        let mut rec: TaskRecord = match t.get(&id.0[..]).map_err(StateError::from)? {
            Some(v) => decode("tasks", v.value(), MAX_TASK_RECORD)?,
            None => return Ok(None),
        };
        let out = f(txn, &mut rec)?;
        let bytes = encode("tasks", &rec)?;
        t.insert(&id.0[..], bytes.as_slice())
            .map_err(StateError::from)?;
        Ok(Some(out))
    }
}

impl Tasks {
    /// The table in `state`.
    pub fn new(state: State) -> Tasks {
        Tasks { state }
    }

    /// Inserts a new task (refused if it exists).
    pub fn create(&self, rec: &TaskRecord) -> Result<bool, StateError> {
        self.state.write(|txn| Tasks::create_in(txn, rec))
    }

    /// [`Tasks::create`] without waiting for the disk: the record is durable with the next
    /// durable commit, and [`State::sync`] of the ticket waits for it.
    pub fn create_deferred(&self, rec: &TaskRecord) -> Result<(bool, Ticket), StateError> {
        self.state
            .write_deferred(|txn| Tasks::create_in(txn, rec))?
    }

    /// [`Tasks::create_deferred`] only if no write transaction is alive on the database
    /// ([`State::try_write_deferred`]): `Ok(None)`, nothing written, otherwise.
    pub fn try_create_deferred(
        &self,
        rec: &TaskRecord,
    ) -> Result<Option<(bool, Ticket)>, StateError> {
        self.state
            .try_write_deferred(|txn| Tasks::create_in(txn, rec))?
            .transpose()
    }

    /// Waits until a deferred creation ([`Tasks::create_deferred`]) is on disk.
    pub fn sync(&self, ticket: Ticket) -> Result<(), StateError> {
        self.state.sync(ticket)
    }

    /// Whether a deferred creation is on disk already (no waiting).
    pub fn is_durable(&self, ticket: Ticket) -> bool {
        self.state.is_durable(ticket)
    }

    /// [`Tasks::create`] inside `txn` (a write transaction of [`Tasks::database`]), so
    /// that the task commits with other rows (the gateway's payment lock).
    pub fn create_in(txn: &WriteTransaction, rec: &TaskRecord) -> Result<bool, StateError> {
        let key = rec.spec.task_id.0;
        let bytes = encode("tasks", rec)?;
        let mut t = txn.open_table(TASKS)?;
        if t.get(&key[..])?.is_some() {
            return Ok(false);
        }
        t.insert(&key[..], bytes.as_slice())?;
        Ok(true)
    }

    /// The database the table lives in.
    pub fn database(&self) -> &std::sync::Arc<redb::Database> {
        self.state.database()
    }

    /// Reads a task.
    pub fn get(&self, id: &TaskId) -> Result<Option<TaskRecord>, StateError> {
        self.state.read(|txn| {
            let t = match txn.open_table(TASKS) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            match t.get(&id.0[..])? {
                Some(v) => Ok(Some(decode("tasks", v.value(), MAX_TASK_RECORD)?)),
                None => Ok(None),
            }
        })
    }

    /// Reads, changes and writes a task in one transaction (committed before it returns).
    /// `f` returning `Err` writes nothing.
    pub fn update<R, E: From<StateError>>(
        &self,
        id: &TaskId,
        f: impl FnOnce(&mut TaskRecord) -> Result<R, E>,
    ) -> Result<Option<R>, E> {
        self.update_with(id, |_, rec| f(rec))
    }

    /// Whether `other` is the same database as this table's (so that a write to it can join
    /// this table's transactions, see [`Tasks::update_with`]).
    pub fn shares_database(&self, other: &State) -> bool {
        std::sync::Arc::ptr_eq(self.state.database(), other.database())
    }

    /// [`Tasks::update`], with the transaction also handed to `f` so that rows of other
    /// tables in the same database commit together with the task.
    pub fn update_with<R, E: From<StateError>>(
        &self,
        id: &TaskId,
        f: impl FnOnce(&WriteTransaction, &mut TaskRecord) -> Result<R, E>,
    ) -> Result<Option<R>, E> {
        let mut out = None;
        let mut inner_err = None;
        self.state
            .write(|txn| {
                let mut t = txn.open_table(TASKS)?;
                let mut rec: TaskRecord = match t.get(&id.0[..])? {
                    Some(v) => decode("tasks", v.value(), MAX_TASK_RECORD)?,
                    None => return Ok(()),
                };
                match f(txn, &mut rec) {
                    Ok(r) => {
                        let bytes = encode("tasks", &rec)?;
                        t.insert(&id.0[..], bytes.as_slice())?;
                        out = Some(r);
                        Ok(())
                    }
                    Err(e) => {
                        inner_err = Some(e);
                        // Abort: nothing written.
                        Err(StateError::Corrupt {
                            table: "tasks",
                            reason: "update aborted".into(),
                        })
                    }
                }
            })
            .or_else(|e| match inner_err.is_some() {
                true => Ok(()),
                false => Err(e),
            })?;
        match inner_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// [`Tasks::update_with`] combined with concurrent writes into one transaction
    /// ([`State::write_combined`]): `f` may run twice (each time on the record as the
    /// transaction it is given reads it), so it owns what it needs and returns all it
    /// computes. `Ok(None)` when there is no such task.
    pub fn update_combined<R, E, F>(&self, id: TaskId, f: F) -> Result<Option<R>, E>
    where
        F: FnMut(&WriteTransaction, &mut TaskRecord) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<StateError> + CombinedError + Send + 'static,
    {
        self.state.write_combined(update_in(id, f))?
    }

    /// [`Tasks::update_combined`] for an async task ([`State::write_combined_async`]).
    pub async fn update_combined_async<R, E, F>(&self, id: TaskId, f: F) -> Result<Option<R>, E>
    where
        F: FnMut(&WriteTransaction, &mut TaskRecord) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<StateError> + CombinedError + Send + 'static,
    {
        self.state.write_combined_async(update_in(id, f)).await?
    }

    /// Keeps the snapshot `task` pinned (committed before it returns).
    pub fn put_snapshot(
        &self,
        task: &TaskId,
        cid: &Cid,
        snap: &PinnedSnapshot,
    ) -> Result<(), StateError> {
        let bytes = encode("pinned_snapshots", snap)?;
        self.state.write(|txn| {
            let mut t = txn.open_table(PINNED_SNAPSHOTS)?;
            t.insert(pin_key(task, cid).as_slice(), bytes.as_slice())?;
            Ok(())
        })
    }

    /// The snapshot `task` pinned, if kept.
    pub fn snapshot(&self, task: &TaskId, cid: &Cid) -> Result<Option<PinnedSnapshot>, StateError> {
        self.state.read(|txn| {
            let t = match txn.open_table(PINNED_SNAPSHOTS) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            match t.get(pin_key(task, cid).as_slice())? {
                Some(v) => Ok(Some(decode("pinned_snapshots", v.value(), MAX_PINNED_ROW)?)),
                None => Ok(None),
            }
        })
    }

    /// Forgets the snapshot `task` pinned (the task ended).
    pub fn remove_snapshot(&self, task: &TaskId, cid: &Cid) -> Result<(), StateError> {
        self.state.write(|txn| {
            let mut t = txn.open_table(PINNED_SNAPSHOTS)?;
            t.remove(pin_key(task, cid).as_slice())?;
            Ok(())
        })
    }

    /// Every task (for resuming and `ops-monitor`).
    pub fn all(&self) -> Result<Vec<TaskRecord>, StateError> {
        self.state.read(|txn| {
            let t = match txn.open_table(TASKS) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            };
            let mut out = Vec::new();
            for row in t.iter()? {
                let (_, v) = row?;
                out.push(decode("tasks", v.value(), MAX_TASK_RECORD)?);
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use d402_protocol::SigningKey;

    use super::*;

    #[test]
    fn a_claim_records_cid_is_its_envelopes_and_is_neither_stored_nor_compared() {
        let output = b"out".to_vec();
        let claim = Claim {
            v: 1,
            task_id: TaskId([1; 16]),
            lease_cid: Cid::dag_cbor(b"lease"),
            fencing_token: 1,
            output_cid: Cid::raw(&output),
            output,
            snapshot_cid: None,
            snapshot: None,
            fuel_used: 10,
            finished_at: 1_700_000_000_000,
        };
        let signed = Signed::sign(claim, &SigningKey::from_bytes(&[5; 32])).unwrap();
        let rec = ClaimRec::new(signed.clone(), ClaimJudgement::Accepted);
        let fresh = rec.clone();
        assert_eq!(rec.cid().unwrap(), signed.cid().unwrap());
        assert_eq!(rec.cid().unwrap(), signed.cid().unwrap(), "cached");
        assert_eq!(rec, fresh, "a computed CID does not make records differ");
        let bytes = crate::state::encode("tasks", &rec).unwrap();
        let back: ClaimRec = crate::state::decode("tasks", &bytes, 1 << 20).unwrap();
        assert_eq!(back, rec);
        assert_eq!(crate::state::encode("tasks", &back).unwrap(), bytes);
        assert_eq!(back.cid().unwrap(), signed.cid().unwrap());
    }
}
