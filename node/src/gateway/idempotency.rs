//! `Idempotency-Key` records, in the node's redb (table [`IDEMPOTENCY`]).
//!
//! A keyed `POST /v1/tasks` goes through [`Idempotency::begin`] after its payment header
//! was read and before anything is verified or charged:
//!
//! - first use of the key: a `running` record (the request hash, the task id, this
//!   process's boot id) is committed, and the caller goes on ([`Begin::New`]);
//! - the same key with a different request (capability + input): [`Begin::Mismatch`],
//!   answered `422 idempotency_key_reused`;
//! - the same request while the first is running: [`Begin::Running`], answered
//!   `409 idempotency_in_progress`;
//! - the same request after it finished: [`Begin::Done`] with the stored answer (status,
//!   headers, body), replayed as is: no second charge.
//!
//! The caller ends a record with [`Idempotency::finish`] (the answer, committed before it
//! is sent) or [`Idempotency::abandon`] (the request failed before any charge, so a retry
//! with the same key starts afresh).
//!
//! **After a crash**, a `running` record from an earlier boot can be stale. `begin` asks the
//! gateway's [`StaleResolver`] what became of its task: not charged (the record is replaced
//! and the request runs), still being settled (409), or finished (its answer is stored and
//! replayed). Without a resolver a stale record answers 409 until the gateway's recovery
//! calls [`Idempotency::finish`] or [`Idempotency::abandon`] for it.

use std::sync::Arc;

use axum::http::StatusCode;
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use d402_protocol::{TaskId, UnixMillis};

use tracing::{info, warn};

use super::error::ApiError;
use crate::state::{State, StateError, decode, encode};

/// Key bytes → CBOR of a record.
pub const IDEMPOTENCY: TableDefinition<&[u8], &[u8]> = TableDefinition::new("idempotency");

/// Longest key accepted (visible ASCII).
pub const MAX_KEY: usize = 128;

/// Largest stored record (a full answer: output, claims and receipt).
pub const MAX_RECORD: usize = 8 * 1024 * 1024;

/// An answer as sent, to replay byte for byte.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredResponse {
    /// HTTP status.
    pub status: u16,
    /// Headers (name, value), e.g. `PAYMENT-RESPONSE`.
    pub headers: Vec<(String, String)>,
    /// The body.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// What [`Idempotency::begin`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// First use: a running record is committed; go on with the request.
    New,
    /// The same request is still running (or being settled after a restart).
    Running {
        /// Its task.
        task_id: TaskId,
    },
    /// The same request finished: replay this answer.
    Done(StoredResponse),
    /// The key was used for a different request.
    Mismatch,
}

impl Begin {
    /// [`Begin::New`] → `Ok(None)`, [`Begin::Done`] → `Ok(Some(answer))`,
    /// [`Begin::Running`] → `409 idempotency_in_progress`, [`Begin::Mismatch`] →
    /// `422 idempotency_key_reused`.
    pub fn into_result(self) -> Result<Option<StoredResponse>, ApiError> {
        match self {
            Begin::New => Ok(None),
            Begin::Done(r) => Ok(Some(r)),
            Begin::Running { task_id } => Err(ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_in_progress",
                format!(
                    "a request with this Idempotency-Key is still running (task {task_id}); \
                     retry later to get its answer"
                ),
            )),
            Begin::Mismatch => Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was used for a different request (capability or input); \
                 use a new key",
            )),
        }
    }
}

/// What became of the task of a `running` record left by an earlier boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StaleTask {
    /// Nothing was charged for it: the key may run a new request.
    NotCharged,
    /// It was charged and is still being run or settled.
    InProgress,
    /// It ended: this is its answer.
    Finished(StoredResponse),
}

/// Tells what became of a task after a restart (the gateway's tasks and rail know).
pub type StaleResolver = Arc<dyn Fn(TaskId) -> StaleTask + Send + Sync>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Phase {
    Running { boot: [u8; 16] },
    Done(StoredResponse),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    v: u8,
    request_hash: [u8; 32],
    task_id: TaskId,
    created_at: UnixMillis,
    phase: Phase,
}

/// Errors of the idempotency table.
#[derive(Debug, thiserror::Error)]
pub enum IdempotencyError {
    /// The key is empty, too long or not visible ASCII.
    #[error("Idempotency-Key must be 1 to {MAX_KEY} visible ASCII characters")]
    BadKey,
    /// The answer is too large to store.
    #[error("the answer is {0} bytes encoded; at most {MAX_RECORD} are stored")]
    TooLarge(usize),
    /// The database failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// [`Idempotency::finish_in`]'s one write failed: its transaction must not commit.
    /// (Its other errors come before it and leave the transaction untouched.)
    #[error("storing the answer failed: {0}")]
    WriteFailed(StateError),
}

impl From<IdempotencyError> for ApiError {
    fn from(e: IdempotencyError) -> Self {
        match e {
            IdempotencyError::BadKey => {
                ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string())
            }
            other => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                other.to_string(),
            ),
        }
    }
}

/// Checks an `Idempotency-Key` value: 1 to [`MAX_KEY`] visible ASCII characters.
pub fn check_key(key: &str) -> Result<(), IdempotencyError> {
    if key.is_empty() || key.len() > MAX_KEY || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(IdempotencyError::BadKey);
    }
    Ok(())
}

/// The idempotency records of a gateway. Cheap to clone.
#[derive(Clone)]
pub struct Idempotency {
    state: State,
    boot: [u8; 16],
    resolver: Option<StaleResolver>,
}

impl std::fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency")
            .field("state", &self.state)
            .field("resolver", &self.resolver.is_some())
            .finish()
    }
}

fn now_ms() -> UnixMillis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Idempotency {
    /// The records in `state`, for this boot of the process (a fresh random boot id: a
    /// `running` record with another boot id was left by an earlier run).
    pub fn new(state: State) -> Self {
        let mut boot = [0u8; 16];
        if getrandom::fill(&mut boot).is_err() {
            // Without randomness, the time still differs between boots.
            boot[..16].copy_from_slice(&u128::from(now_ms()).to_le_bytes());
        }
        Idempotency {
            state,
            boot,
            resolver: None,
        }
    }

    /// Resolves `running` records left by an earlier boot with `resolver`.
    pub fn with_stale_resolver(mut self, resolver: StaleResolver) -> Self {
        self.resolver = Some(resolver);
        self
    }

    /// Starts (or finds) the request `request_hash` under `key`; `task_id` is the task the
    /// request will run as if it is new. A new record is committed before this returns.
    pub fn begin(
        &self,
        key: &str,
        request_hash: [u8; 32],
        task_id: TaskId,
    ) -> Result<Begin, IdempotencyError> {
        check_key(key)?;
        let now = now_ms();
        let fresh = Record {
            v: 1,
            request_hash,
            task_id,
            created_at: now,
            phase: Phase::Running { boot: self.boot },
        };
        let fresh_bytes = encode("idempotency", &fresh)?;
        // A stale record is resolved outside the write transaction (the resolver reads
        // other tables), then the decision is re-checked inside one.
        let mut stale: Option<(TaskId, StaleTask)> = None;
        loop {
            let outcome = self.state.write(|tx| {
                let mut t = tx.open_table(IDEMPOTENCY)?;
                let existing = match t.get(key.as_bytes())? {
                    Some(v) => Some(decode::<Record>("idempotency", v.value(), MAX_RECORD)?),
                    None => None,
                };
                let Some(rec) = existing else {
                    t.insert(key.as_bytes(), fresh_bytes.as_slice())?;
                    return Ok(Some(Begin::New));
                };
                if rec.request_hash != request_hash {
                    return Ok(Some(Begin::Mismatch));
                }
                match &rec.phase {
                    Phase::Done(r) => Ok(Some(Begin::Done(r.clone()))),
                    Phase::Running { boot } if *boot == self.boot => Ok(Some(Begin::Running {
                        task_id: rec.task_id,
                    })),
                    Phase::Running { .. } => match &stale {
                        Some((id, verdict)) if *id == rec.task_id => match verdict {
                            StaleTask::NotCharged => {
                                t.insert(key.as_bytes(), fresh_bytes.as_slice())?;
                                Ok(Some(Begin::New))
                            }
                            StaleTask::InProgress => Ok(Some(Begin::Running {
                                task_id: rec.task_id,
                            })),
                            StaleTask::Finished(r) => {
                                let done = Record {
                                    phase: Phase::Done(r.clone()),
                                    ..rec.clone()
                                };
                                let bytes = encode("idempotency", &done)?;
                                t.insert(key.as_bytes(), bytes.as_slice())?;
                                Ok(Some(Begin::Done(r.clone())))
                            }
                        },
                        // Ask the resolver first (outside this transaction).
                        _ if self.resolver.is_some() => {
                            stale = Some((rec.task_id, StaleTask::InProgress));
                            Ok(None)
                        }
                        _ => Ok(Some(Begin::Running {
                            task_id: rec.task_id,
                        })),
                    },
                }
            })?;
            match outcome {
                Some(b) => return Ok(b),
                None => {
                    let (id, _) = stale.take().unwrap_or((task_id, StaleTask::InProgress));
                    let verdict = match &self.resolver {
                        Some(r) => r(id),
                        None => StaleTask::InProgress,
                    };
                    if let StaleTask::Finished(resp) = &verdict
                        && encode("idempotency", resp)?.len() > MAX_RECORD
                    {
                        return Err(IdempotencyError::TooLarge(MAX_RECORD + 1));
                    }
                    stale = Some((id, verdict));
                }
            }
        }
    }

    /// Whether `key` has no record at all (read only). A request whose key is new can claim
    /// it with [`Idempotency::claim_in`] in the transaction that charges it, instead of
    /// committing a `running` record of its own first; any other key goes through
    /// [`Idempotency::begin`].
    pub fn is_unused(&self, key: &str) -> Result<bool, IdempotencyError> {
        Ok(self.record(key)?.is_none())
    }

    /// The answer stored under `key` once its request finished, if any (read only).
    pub fn stored_answer(&self, key: &str) -> Result<Option<StoredResponse>, IdempotencyError> {
        Ok(match self.record(key)? {
            Some(Record {
                phase: Phase::Done(r),
                ..
            }) => Some(r),
            _ => None,
        })
    }

    /// The record under `key`, if any (read only).
    fn record(&self, key: &str) -> Result<Option<Record>, IdempotencyError> {
        check_key(key)?;
        Ok(self.state.read(|tx| {
            let t = match tx.open_table(IDEMPOTENCY) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            match t.get(key.as_bytes())? {
                Some(v) => Ok(Some(decode::<Record>(
                    "idempotency",
                    v.value(),
                    MAX_RECORD,
                )?)),
                None => Ok(None),
            }
        })?)
    }

    /// Claims a key found unused by [`Idempotency::is_unused`] inside `txn` (a write
    /// transaction of this table's database): `Begin::New` with the `running` record written,
    /// or what a request that claimed it meanwhile left ([`Begin::Running`], `Done` or
    /// `Mismatch`), in which case the caller aborts its transaction.
    pub fn claim_in(
        &self,
        txn: &redb::WriteTransaction,
        key: &str,
        request_hash: [u8; 32],
        task_id: TaskId,
    ) -> Result<Begin, IdempotencyError> {
        check_key(key)?;
        let mut t = txn.open_table(IDEMPOTENCY).map_err(StateError::from)?;
        let existing = match t.get(key.as_bytes()).map_err(StateError::from)? {
            Some(v) => Some(decode::<Record>("idempotency", v.value(), MAX_RECORD)?),
            None => None,
        };
        match existing {
            None => {
                let fresh = Record {
                    v: 1,
                    request_hash,
                    task_id,
                    created_at: now_ms(),
                    phase: Phase::Running { boot: self.boot },
                };
                let bytes = encode("idempotency", &fresh)?;
                t.insert(key.as_bytes(), bytes.as_slice())
                    .map_err(StateError::from)?;
                Ok(Begin::New)
            }
            Some(rec) if rec.request_hash != request_hash => Ok(Begin::Mismatch),
            Some(Record {
                phase: Phase::Done(r),
                ..
            }) => Ok(Begin::Done(r)),
            Some(rec) => Ok(Begin::Running {
                task_id: rec.task_id,
            }),
        }
    }

    /// Stores the answer of the request running under `key` (committed before this
    /// returns, so before the answer is sent) and returns the answer that stands: one stored
    /// already (with the task's capture, see [`Idempotency::finish_in`]) is kept and
    /// returned, without a write. Later `begin`s with the same request replay it.
    pub fn finish(
        &self,
        key: &str,
        response: &StoredResponse,
    ) -> Result<StoredResponse, IdempotencyError> {
        if let Some(Record {
            phase: Phase::Done(r),
            ..
        }) = self.record(key)?
        {
            return Ok(r);
        }
        self.state
            .write_with(|tx| self.finish_in(tx, key, response))?
    }

    /// [`Idempotency::finish`] inside `txn` (a write transaction of this table's database):
    /// the gateway stores a task's answer in the transaction that captures its payment. An
    /// answer stored already stands and is returned; a key without a record binds nothing.
    pub fn finish_in(
        &self,
        txn: &redb::WriteTransaction,
        key: &str,
        response: &StoredResponse,
    ) -> Result<StoredResponse, IdempotencyError> {
        check_key(key)?;
        let mut t = txn.open_table(IDEMPOTENCY).map_err(StateError::from)?;
        let rec = match t.get(key.as_bytes()).map_err(StateError::from)? {
            Some(v) => decode::<Record>("idempotency", v.value(), MAX_RECORD)?,
            // Finished without a begin (should not happen): nothing to bind it to.
            None => return Ok(response.clone()),
        };
        if let Phase::Done(r) = rec.phase {
            return Ok(r);
        }
        let rec = Record {
            phase: Phase::Done(response.clone()),
            ..rec
        };
        let bytes = encode("idempotency", &rec)?;
        if bytes.len() > MAX_RECORD {
            return Err(IdempotencyError::TooLarge(bytes.len()));
        }
        t.insert(key.as_bytes(), bytes.as_slice())
            .map_err(|e| IdempotencyError::WriteFailed(e.into()))?;
        Ok(response.clone())
    }

    /// Drops the record of a request that failed before anything was charged, so that a
    /// retry with the same key runs. A finished record is kept.
    pub fn abandon(&self, key: &str) -> Result<(), IdempotencyError> {
        check_key(key)?;
        self.state.write(|tx| {
            let mut t = tx.open_table(IDEMPOTENCY)?;
            let running = match t.get(key.as_bytes())? {
                Some(v) => matches!(
                    decode::<Record>("idempotency", v.value(), MAX_RECORD)?.phase,
                    Phase::Running { .. }
                ),
                None => false,
            };
            if running {
                t.remove(key.as_bytes())?;
            }
            Ok(())
        })?;
        Ok(())
    }

    /// The task a key is bound to, if any (for diagnostics and recovery).
    pub fn task_of(&self, key: &str) -> Result<Option<TaskId>, IdempotencyError> {
        Ok(self.record(key)?.map(|r| r.task_id))
    }

    /// Removes finished records created before `before` (Unix ms); returns how many.
    /// Running records are kept. Candidates are found in a read transaction and removed
    /// [`PURGE_BATCH`] per write transaction (each re-checked there), so a large purge never
    /// holds the writer long enough to stall paid requests.
    pub fn purge_finished_before(&self, before: UnixMillis) -> Result<usize, IdempotencyError> {
        let old = |rec: &Record| matches!(rec.phase, Phase::Done(_)) && rec.created_at < before;
        let candidates: Vec<Vec<u8>> = self
            .state
            .read(|tx| {
                let t = match tx.open_table(IDEMPOTENCY) {
                    Ok(t) => t,
                    Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                    Err(e) => return Err(e.into()),
                };
                let mut out = Vec::new();
                let mut unreadable = 0usize;
                for row in t.iter()? {
                    let (k, v) = row?;
                    // One unreadable record must not stop every later purge: it is left
                    // alone (and reported), the others go.
                    match decode::<Record>("idempotency", v.value(), MAX_RECORD) {
                        Ok(rec) if old(&rec) => out.push(k.value().to_vec()),
                        Ok(_) => {}
                        Err(_) => unreadable += 1,
                    }
                }
                if unreadable > 0 {
                    warn!(
                        unreadable,
                        "idempotency records that cannot be decoded were kept"
                    );
                }
                Ok(out)
            })
            .map_err(IdempotencyError::from)?;
        let mut removed = 0;
        for batch in candidates.chunks(PURGE_BATCH) {
            removed += self
                .state
                .write(|tx| {
                    let mut t = tx.open_table(IDEMPOTENCY)?;
                    let mut n = 0;
                    for k in batch {
                        let gone = match t.get(k.as_slice())? {
                            Some(v) => {
                                old(&decode::<Record>("idempotency", v.value(), MAX_RECORD)?)
                            }
                            None => false,
                        };
                        if gone {
                            t.remove(k.as_slice())?;
                            n += 1;
                        }
                    }
                    Ok(n)
                })
                .map_err(IdempotencyError::from)?;
        }
        Ok(removed)
    }

    /// Purges, every `every`, the finished records older than `ttl` (see
    /// [`Idempotency::purge_finished_before`]); runs until the task is dropped or aborted.
    /// A request retried with the same key after `ttl` runs (and is charged) again.
    pub async fn purge_periodically(self, ttl: std::time::Duration, every: std::time::Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let before = now_ms().saturating_sub(ttl.as_millis() as u64);
            let me = self.clone();
            match tokio::task::spawn_blocking(move || me.purge_finished_before(before)).await {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => info!(removed = n, "old idempotency records purged"),
                Ok(Err(e)) => warn!(error = %e, "cannot purge old idempotency records"),
                Err(e) => warn!(error = %e, "the idempotency purge failed"),
            }
        }
    }
}

/// Records removed per write transaction by [`Idempotency::purge_finished_before`].
pub const PURGE_BATCH: usize = 256;

/// How long a finished request's answer is kept for replay by default (a day, as common
/// payment APIs do).
pub const DEFAULT_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 60 * 60);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn answer(n: u8) -> StoredResponse {
        StoredResponse {
            status: 200,
            headers: vec![("PAYMENT-RESPONSE".into(), format!("h{n}"))],
            body: vec![n; 10],
        }
    }

    #[test]
    fn same_key_same_request_replays_the_stored_answer() {
        let dir = tempfile::tempdir().unwrap();
        let idem = Idempotency::new(State::open(dir.path()).unwrap());
        let h = [1; 32];
        assert_eq!(idem.begin("k-1", h, TaskId([1; 16])).unwrap(), Begin::New);
        // While running: 409.
        let running = idem.begin("k-1", h, TaskId([2; 16])).unwrap();
        assert_eq!(
            running,
            Begin::Running {
                task_id: TaskId([1; 16])
            }
        );
        let e = running.into_result().unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::CONFLICT, "idempotency_in_progress")
        );
        // Another body under the same key: 422, running or done.
        let e = idem
            .begin("k-1", [2; 32], TaskId([3; 16]))
            .unwrap()
            .into_result()
            .unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused")
        );
        idem.finish("k-1", &answer(7)).unwrap();
        assert_eq!(
            idem.begin("k-1", h, TaskId([4; 16])).unwrap(),
            Begin::Done(answer(7))
        );
        assert_eq!(
            idem.begin("k-1", [2; 32], TaskId([5; 16])).unwrap(),
            Begin::Mismatch
        );
        assert_eq!(idem.task_of("k-1").unwrap(), Some(TaskId([1; 16])));
        // Other keys are independent.
        assert_eq!(idem.begin("k-2", h, TaskId([6; 16])).unwrap(), Begin::New);
    }

    #[test]
    fn a_key_claimed_in_a_callers_transaction_behaves_as_begun() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let idem = Idempotency::new(state.clone());
        let h = [1; 32];
        assert!(idem.is_unused("k-1").unwrap());
        let claim = |hash, task| {
            state
                .write(|txn| Ok(idem.claim_in(txn, "k-1", hash, TaskId(task)).unwrap()))
                .unwrap()
        };
        assert_eq!(claim(h, [1; 16]), Begin::New);
        assert!(!idem.is_unused("k-1").unwrap());
        // A second claim (a concurrent duplicate that also found the key unused) sees the
        // first; so does `begin`.
        assert_eq!(
            claim(h, [2; 16]),
            Begin::Running {
                task_id: TaskId([1; 16])
            }
        );
        assert_eq!(claim([2; 32], [3; 16]), Begin::Mismatch);
        assert_eq!(
            idem.begin("k-1", h, TaskId([4; 16])).unwrap(),
            Begin::Running {
                task_id: TaskId([1; 16])
            }
        );
        // The answer stored in a caller's transaction (the capture's) stands: a later
        // `finish` returns it and writes nothing.
        state
            .write(|txn| {
                assert_eq!(idem.finish_in(txn, "k-1", &answer(3)).unwrap(), answer(3));
                Ok(())
            })
            .unwrap();
        assert_eq!(idem.finish("k-1", &answer(4)).unwrap(), answer(3));
        assert_eq!(claim(h, [5; 16]), Begin::Done(answer(3)));
        // A claim whose transaction is dropped leaves nothing.
        {
            let txn = state.database().begin_write().unwrap();
            assert_eq!(
                idem.claim_in(&txn, "k-2", h, TaskId([6; 16])).unwrap(),
                Begin::New
            );
        }
        assert!(idem.is_unused("k-2").unwrap());
        assert!(matches!(idem.is_unused(""), Err(IdempotencyError::BadKey)));
    }

    #[test]
    fn abandoned_keys_run_again_and_finished_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let idem = Idempotency::new(State::open(dir.path()).unwrap());
        assert_eq!(
            idem.begin("k", [1; 32], TaskId([1; 16])).unwrap(),
            Begin::New
        );
        idem.abandon("k").unwrap();
        // After an abandon even another body may use the key.
        assert_eq!(
            idem.begin("k", [2; 32], TaskId([2; 16])).unwrap(),
            Begin::New
        );
        idem.finish("k", &answer(1)).unwrap();
        idem.abandon("k").unwrap();
        assert_eq!(
            idem.begin("k", [2; 32], TaskId([3; 16])).unwrap(),
            Begin::Done(answer(1))
        );
    }

    #[test]
    fn records_survive_a_restart_and_stale_ones_resolve() {
        let dir = tempfile::tempdir().unwrap();
        {
            let idem = Idempotency::new(State::open(dir.path()).unwrap());
            idem.begin("done", [1; 32], TaskId([1; 16])).unwrap();
            idem.finish("done", &answer(1)).unwrap();
            idem.begin("uncharged", [2; 32], TaskId([2; 16])).unwrap();
            idem.begin("charged", [3; 32], TaskId([3; 16])).unwrap();
            idem.begin("settled", [4; 32], TaskId([4; 16])).unwrap();
            idem.begin("orphan", [5; 32], TaskId([5; 16])).unwrap();
        }
        // A new boot: the running records are stale.
        let state = State::open(dir.path()).unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let resolver: StaleResolver = Arc::new(move |id: TaskId| {
            c.fetch_add(1, Ordering::SeqCst);
            match id.0[0] {
                2 => StaleTask::NotCharged,
                3 => StaleTask::InProgress,
                4 => StaleTask::Finished(answer(4)),
                _ => StaleTask::InProgress,
            }
        });
        let idem = Idempotency::new(state.clone()).with_stale_resolver(resolver);
        assert_eq!(
            idem.begin("done", [1; 32], TaskId([9; 16])).unwrap(),
            Begin::Done(answer(1))
        );
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        assert_eq!(
            idem.begin("uncharged", [2; 32], TaskId([20; 16])).unwrap(),
            Begin::New
        );
        // The new run is this boot's: a duplicate now waits for it.
        assert_eq!(
            idem.begin("uncharged", [2; 32], TaskId([21; 16])).unwrap(),
            Begin::Running {
                task_id: TaskId([20; 16])
            }
        );
        assert_eq!(
            idem.begin("charged", [3; 32], TaskId([30; 16])).unwrap(),
            Begin::Running {
                task_id: TaskId([3; 16])
            }
        );
        assert_eq!(
            idem.begin("settled", [4; 32], TaskId([40; 16])).unwrap(),
            Begin::Done(answer(4))
        );
        // Stored: the resolver is not asked again.
        let before = calls.load(Ordering::SeqCst);
        assert_eq!(
            idem.begin("settled", [4; 32], TaskId([41; 16])).unwrap(),
            Begin::Done(answer(4))
        );
        assert_eq!(calls.load(Ordering::SeqCst), before);
        // A mismatch is decided without the resolver.
        assert_eq!(
            idem.begin("orphan", [6; 32], TaskId([50; 16])).unwrap(),
            Begin::Mismatch
        );
        // Without a resolver a stale record stays "in progress" until recovery ends it.
        let plain = Idempotency::new(state);
        assert_eq!(
            plain.begin("orphan", [5; 32], TaskId([51; 16])).unwrap(),
            Begin::Running {
                task_id: TaskId([5; 16])
            }
        );
        plain.finish("orphan", &answer(5)).unwrap();
        assert_eq!(
            plain.begin("orphan", [5; 32], TaskId([52; 16])).unwrap(),
            Begin::Done(answer(5))
        );
    }

    #[test]
    fn concurrent_duplicates_start_once() {
        let dir = tempfile::tempdir().unwrap();
        let idem = Idempotency::new(State::open(dir.path()).unwrap());
        let results: Vec<Begin> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8u8)
                .map(|i| {
                    let idem = idem.clone();
                    s.spawn(move || idem.begin("same", [7; 32], TaskId([i; 16])).unwrap())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let new = results.iter().filter(|b| **b == Begin::New).count();
        assert_eq!(new, 1, "{results:?}");
        assert!(
            results
                .iter()
                .all(|b| matches!(b, Begin::New | Begin::Running { .. }))
        );
    }

    #[test]
    fn keys_are_checked_and_old_answers_purged() {
        let dir = tempfile::tempdir().unwrap();
        let idem = Idempotency::new(State::open(dir.path()).unwrap());
        for bad in ["", "has space", "é", &"k".repeat(MAX_KEY + 1)] {
            let e = idem.begin(bad, [0; 32], TaskId([0; 16])).unwrap_err();
            assert!(matches!(e, IdempotencyError::BadKey), "{bad:?}");
            assert_eq!(ApiError::from(e).code, "bad_request");
        }
        idem.begin(&"k".repeat(MAX_KEY), [0; 32], TaskId([0; 16]))
            .unwrap();
        idem.begin("a", [1; 32], TaskId([1; 16])).unwrap();
        idem.finish("a", &answer(1)).unwrap();
        idem.begin("b", [2; 32], TaskId([2; 16])).unwrap();
        assert_eq!(idem.purge_finished_before(now_ms() + 1).unwrap(), 1);
        assert_eq!(idem.task_of("a").unwrap(), None);
        assert_eq!(idem.task_of("b").unwrap(), Some(TaskId([2; 16])));
        // Too large an answer is refused, not truncated.
        let huge = StoredResponse {
            status: 200,
            headers: vec![],
            body: vec![0; MAX_RECORD + 1],
        };
        assert!(matches!(
            idem.finish("b", &huge),
            Err(IdempotencyError::TooLarge(_))
        ));
        assert_eq!(
            idem.begin("b", [2; 32], TaskId([3; 16])).unwrap(),
            Begin::Running {
                task_id: TaskId([2; 16])
            }
        );
    }

    #[tokio::test]
    async fn finished_records_past_their_ttl_are_purged_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let idem = Idempotency::new(State::open(dir.path()).unwrap());
        // More than one batch of finished records, and one still running.
        for i in 0..(PURGE_BATCH + 10) {
            let k = format!("done-{i}");
            idem.begin(&k, [1; 32], TaskId([1; 16])).unwrap();
            idem.finish(&k, &answer(1)).unwrap();
        }
        idem.begin("running", [2; 32], TaskId([2; 16])).unwrap();
        let purger = tokio::spawn(idem.clone().purge_periodically(
            std::time::Duration::from_millis(100),
            std::time::Duration::from_millis(20),
        ));
        let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while idem.task_of("done-0").unwrap().is_some()
            || idem
                .task_of(&format!("done-{}", PURGE_BATCH + 9))
                .unwrap()
                .is_some()
        {
            assert!(std::time::Instant::now() < end, "never purged");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        purger.abort();
        assert_eq!(idem.task_of("running").unwrap(), Some(TaskId([2; 16])));
        // A fresh finished record is kept until its own TTL passes.
        idem.begin("fresh", [3; 32], TaskId([3; 16])).unwrap();
        idem.finish("fresh", &answer(3)).unwrap();
        assert_eq!(idem.purge_finished_before(now_ms() - 60_000).unwrap(), 0);
        assert_eq!(idem.task_of("fresh").unwrap(), Some(TaskId([3; 16])));
        // An unreadable record is kept and does not stop the purge of the others.
        idem.state
            .write(|tx| {
                tx.open_table(IDEMPOTENCY)?
                    .insert(&b"garbage"[..], &b"\xff\x00"[..])?;
                Ok(())
            })
            .unwrap();
        assert_eq!(idem.purge_finished_before(now_ms() + 1).unwrap(), 1);
        assert_eq!(idem.task_of("fresh").unwrap(), None);
    }
}
