//! `POST /v1/tasks` and `GET /v1/tasks/{id}`: the paid flow.
//!
//! In order, each step committed before the next:
//! 1. the body (capped) is parsed and the policy admits it (capability, input, terms);
//! 2. without a payment header: `402` with `PAYMENT-REQUIRED` (v2) and the v1 JSON body;
//! 3. with `Idempotency-Key`: a stored answer is returned as is (nothing charged again);
//! 4. the payment is verified on the rail (signature, terms, window, nonce, funds);
//! 5. the payment is locked in escrow and the task's [`PaidTask`] row and the coordinator's
//!    task record written, in one redb transaction: no work starts before the money is
//!    held, and a crash after it resumes the task;
//! 6. the task runs through the [`Coordinator`](crate::market::coordinator::Coordinator),
//!    in a task of its own so that a client hanging up does not stop it;
//! 7. an accepted task is captured: each accepted worker is paid its bid, split into
//!    creator commission (the registration's terms, recorded at step 5) and worker net,
//!    and the gateway keeps the rest; any other outcome is refunded;
//! 8. the answer (`200` with `PAYMENT-RESPONSE`, or `503` refunded) is stored under the
//!    idempotency key and sent.
//!
//! After a crash, [`recover`] settles every payment still locked: once its task ends
//! (resumed by the coordinator) it is captured or refunded the same way; a payment whose
//! task never started is refunded.

use std::{sync::Arc, time::Instant};

use axum::{
    body::Body,
    extract::{Path, State},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use base64::Engine as _;
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use d402_runtime::policy::SystemResolver;
use sha2::{Digest, Sha256};
use tracing::{Instrument, debug, info, info_span, warn};

use d402_protocol::{
    CapabilityRef, Chain, Cid, RailKind, Signed, TaskId, UnixMillis, messages::SettlementReceipt,
};
use d402_settlement::{
    CapturePlan, CommissionTerms, EscrowState, EscrowStatus, LocalRail, QuoteRequest, Rail,
    RailError, WorkerPayout,
    x402::{
        PAYMENT_REQUIRED, PAYMENT_SIGNATURE, Payment, PaymentRequired, ResourceInfo,
        SettlementResponse, X_PAYMENT, X402_V1,
    },
};

use super::{
    AppState, GatewayParts,
    error::ApiError,
    idempotency::{Begin, Idempotency, IdempotencyError, StaleResolver, StaleTask, StoredResponse},
    policy::{Admitted, parse_task_request},
};
use crate::{
    group_commit::{CombinedError, Deferred},
    market::{
        coordinator::{AcceptHook, HookFailed},
        now_ms,
        tasks::{ClaimJudgement, Phase, TaskRecord, TaskSpec, Tasks},
    },
    state::{State as NodeState, StateError, decode, encode},
};

/// Paid tasks: task id (16 bytes) → CBOR of [`PaidTask`], written in the same
/// transaction as the payment's lock.
pub const PAID_TASKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("gateway_tasks");

/// Largest encoded [`PaidTask`].
const MAX_PAID_TASK: usize = 16 * 1024;

/// Longest `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

/// What the gateway sold for a locked payment: enough to settle it after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaidTask {
    /// Row version (1).
    pub v: u16,
    /// The task.
    pub task_id: TaskId,
    /// The capability sold.
    pub capability: CapabilityRef,
    /// Its exact manifest.
    pub manifest_cid: Cid,
    /// The commission terms accepted when it was sold.
    pub commission: CommissionTerms,
    /// What was charged.
    pub price_units: u64,
    /// Workers leased and agreeing claims needed.
    pub fanout: u32,
    /// Agreeing claims needed.
    pub quorum: u32,
    /// The payer's address.
    pub payer: String,
    /// x402 version of the payment (picks the response header).
    pub x402_version: u8,
    /// The request's `Idempotency-Key`, if any.
    pub idempotency_key: Option<String>,
    /// When the payment was locked.
    pub created_at: UnixMillis,
}

/// Reads a paid task.
pub fn paid_task(state: &NodeState, id: &TaskId) -> Result<Option<PaidTask>, StateError> {
    state.read(|txn| {
        let t = match txn.open_table(PAID_TASKS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        match t.get(&id.0[..])? {
            Some(v) => Ok(Some(decode("gateway_tasks", v.value(), MAX_PAID_TASK)?)),
            None => Ok(None),
        }
    })
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    warn!(error = %e, "gateway internal error");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
}

fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Result<Option<&'h str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v.to_str().map(Some).map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("header {name} is not visible ASCII"),
            )
        }),
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(k) = header_str(headers, "idempotency-key")? else {
        return Ok(None);
    };
    if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY || !k.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"),
        ));
    }
    Ok(Some(k.to_string()))
}

/// The hash an idempotency key is bound to: the capability and the input, not the payment
/// (a retry may carry a fresh payment; it is not charged).
pub fn request_hash(capability: &str, input: &serde_json::Value) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"d402/gateway/task-request/1\n");
    h.update(capability.as_bytes());
    h.update(b"\n");
    h.update(input.to_string().as_bytes());
    h.finalize().into()
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> StoredResponse {
    StoredResponse {
        status: status.as_u16(),
        headers: Vec::new(),
        body: body.to_string().into_bytes(),
    }
}

/// Turns a stored answer into a response.
pub fn to_response(stored: &StoredResponse) -> Response {
    let mut r = Response::new(Body::from(stored.body.clone()));
    *r.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for (name, value) in &stored.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::try_from(name.as_str()),
            HeaderValue::try_from(value.as_str()),
        ) {
            h.insert(n, v);
        }
    }
    r
}

/// The challenge for an admitted request.
fn challenge(app: &AppState, admitted: &Admitted) -> Result<PaymentRequired, ApiError> {
    let rail = &app.rail;
    let quote = rail
        .quote(&QuoteRequest {
            capability: admitted.capability.clone(),
            price_units: admitted.price_units,
            creator_commission_bps: admitted.terms.creator_commission_bps,
        })
        .map_err(internal)?;
    let resource = ResourceInfo {
        url: app.tasks_url(),
        description: Some(admitted.capability.to_string()),
        mime_type: Some("application/json".into()),
    };
    let accepts = vec![rail.challenge(&quote, &resource).map_err(internal)?];
    Ok(PaymentRequired::new(resource, accepts))
}

/// A `402`: the challenge (with `error` set to `code` when a payment was refused) in
/// `PAYMENT-REQUIRED` and as the v1 body; a refusal adds a human `message` to the body.
fn payment_required(
    challenge: &PaymentRequired,
    refused: Option<(&'static str, String)>,
) -> Result<StoredResponse, ApiError> {
    let mut c = challenge.clone();
    if let Some((code, _)) = &refused {
        c.error = Some((*code).to_string());
    }
    let header = c.to_header().map_err(internal)?;
    let mut body = serde_json::to_value(c.to_v1()).map_err(internal)?;
    if let Some((code, message)) = refused {
        body["error"] = code.into();
        body["message"] = message.into();
    }
    let mut r = json_response(StatusCode::PAYMENT_REQUIRED, &body);
    r.headers.push((PAYMENT_REQUIRED.to_string(), header));
    Ok(r)
}

fn payment_refusal(e: &RailError) -> &'static str {
    match e {
        RailError::NonceReplayed => "payment_replayed",
        RailError::InsufficientFunds { .. } => "payment_insufficient",
        _ => "payment_invalid",
    }
}

/// `POST /v1/tasks`.
pub async fn create(State(app): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let (outcome, response) = match create_inner(&app, &headers, body).await {
        Ok((outcome, stored)) => (outcome, to_response(&stored)),
        Err(e) => ("refused", e.into_response()),
    };
    app.metrics.observe_task(outcome, started.elapsed());
    response
}

async fn create_inner(
    app: &Arc<AppState>,
    headers: &HeaderMap,
    body: Body,
) -> Result<(&'static str, StoredResponse), ApiError> {
    let max = app.config.max_body;
    let bytes = axum::body::to_bytes(body, max).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is larger than {max} bytes (or was cut short)"),
        )
    })?;
    let req = parse_task_request(&bytes)?;
    let key = idempotency_key(headers)?;
    let admitted = app
        .policy
        .admit_resolved(&req.capability, &req.input, &SystemResolver)
        .await?;
    let challenge = challenge(app, &admitted)?;
    let payment = match Payment::from_headers(
        header_str(headers, PAYMENT_SIGNATURE)?,
        header_str(headers, X_PAYMENT)?,
    ) {
        Ok(Some(p)) => p,
        Ok(None) => return Ok(("payment_required", payment_required(&challenge, None)?)),
        Err(e) => {
            app.metrics.payment_refused("payment_invalid");
            return Ok((
                "payment_refused",
                payment_required(&challenge, Some(("payment_invalid", e.to_string())))?,
            ));
        }
    };
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(internal)?;
    let task_id = TaskId(id);
    let hash = request_hash(&req.capability, &req.input);
    // The rail's tables, the coordinator's and the idempotency records share the node's
    // database (always in `d402 node`): the payment lock, the task's record and a new key's
    // claim then commit together.
    let joint = Arc::ptr_eq(app.rail.database(), app.coordinator.tasks().database())
        && Arc::ptr_eq(app.rail.database(), app.state.database());
    // A new key is claimed in the payment's transaction (no commit of its own, nothing to
    // release if the payment is refused); a key seen before goes through `begin`.
    let mut claim_key: Option<String> = None;
    if let Some(k) = &key {
        if joint && app.idempotency.is_unused(k).map_err(ApiError::from)? {
            claim_key = Some(k.clone());
        } else {
            let begun = app
                .idempotency
                .begin(k, hash, task_id)
                .map_err(ApiError::from)?;
            if let Some(stored) = begun.into_result()? {
                return Ok(("replayed", stored));
            }
        }
    }
    let abandon = |why: &str| {
        if let Some(k) = key.as_ref().filter(|_| claim_key.is_none()) {
            info!(
                reason = why,
                "idempotency key released: nothing was charged"
            );
            if let Err(e) = app.idempotency.abandon(k) {
                warn!(error = %e, "cannot release the idempotency key");
            }
        }
    };
    let now = now_ms();
    let verified = match app.rail.verify_payment(&payment, &challenge, now) {
        Ok(v) => v,
        Err(e) => {
            abandon(e.code());
            if e.is_payment_error() {
                info!(reason = e.code(), error = %e, "payment refused");
                let code = payment_refusal(&e);
                app.metrics.payment_refused(code);
                on_disk_if_stateful(app, &e).await?;
                return Ok((
                    "payment_refused",
                    payment_required(&challenge, Some((code, e.to_string())))?,
                ));
            }
            return Err(internal(e));
        }
    };
    app.metrics.payment_verified();
    let paid = PaidTask {
        v: 1,
        task_id,
        capability: admitted.capability.clone(),
        manifest_cid: admitted.manifest_cid,
        commission: admitted.commission.clone(),
        price_units: admitted.price_units,
        fanout: admitted.fanout,
        quorum: admitted.quorum,
        payer: verified.payer().to_string(),
        x402_version: payment.version(),
        idempotency_key: key.clone(),
        created_at: now,
    };
    let spec = TaskSpec {
        task_id,
        capability: admitted.capability,
        manifest_cid: admitted.manifest_cid,
        input: admitted.input,
        rail: RailKind::Local,
        budget: app.rail.asset().amount(admitted.budget_units),
        fanout: admitted.fanout,
        quorum: admitted.quorum,
        deadline: now.saturating_add(app.config.task_timeout.as_millis() as u64),
        takes_snapshot: !admitted.manifest.permissions.snapshotters.is_empty(),
    };
    // Lock the payment and record what was sold in one transaction, before any work; the
    // coordinator's task record joins it when the tables share the database (always in
    // `d402 node`), so a paid task is never without its record, and a crash resumes it.
    // On standing bids the first leases are issued in the record too (sent once it commits).
    let (task, leases) = if joint {
        let p = app.coordinator.prepare(spec).map_err(internal)?;
        (p.record, p.leases)
    } else {
        (app.coordinator.new_record(spec), Vec::new())
    };
    let locked = {
        let rail = app.rail.clone();
        let state = app.state.clone();
        let idempotency = app.idempotency.clone();
        let paid = paid.clone();
        let task = task.clone();
        let claim_key = claim_key.clone();
        // The write: owns what it writes, as a combined write may run twice.
        let record = move || {
            let (rail, idempotency, paid, verified, task, claim_key) = (
                rail.clone(),
                idempotency.clone(),
                paid.clone(),
                verified.clone(),
                task.clone(),
                claim_key.clone(),
            );
            move |txn: &redb::WriteTransaction| {
                if let Some(k) = &claim_key {
                    match idempotency.claim_in(txn, k, hash, task_id) {
                        Ok(Begin::New) => {}
                        Ok(taken) => return Err(LockError::KeyTaken(taken)),
                        Err(e) => return Err(LockError::Key(e)),
                    }
                }
                lock_and_record(txn, &rail, &paid, &verified, now, joint.then_some(&task))
                    .map_err(LockError::Rail)
            }
        };
        let deferred = |written: Result<Deferred<(), LockError>, StateError>| {
            written
                .map_err(|e| LockError::Rail(state_error("node", e)))
                .and_then(|w| w.map(|((), ticket)| Some(ticket)))
        };
        if joint {
            // In the node's database (always in `d402 node`) the lock commits without
            // waiting for the disk: the leases go out at once, and the commit that settles
            // the task (durable, before the answer) persists the lock with it; the answer
            // waits for the ticket regardless (DECISIONS, "Deferred durability for a
            // task's creation"). When redb's write lock is free at once, the commit costs
            // less here than anywhere else; otherwise it joins the writes queued for the
            // database's commit thread, in one transaction with them.
            let inline = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                state.try_write_deferred(record()).transpose()
            }))
            .map_err(|_| internal("the payment lock panicked"))?;
            match inline {
                Some(written) => deferred(written),
                None => {
                    // The write's panic is resumed here: answered as the inline one's.
                    let queued =
                        std::panic::AssertUnwindSafe(state.write_combined_deferred_async(record()));
                    deferred(
                        futures::FutureExt::catch_unwind(queued)
                            .await
                            .map_err(|_| internal("the payment lock panicked"))?,
                    )
                }
            }
        } else {
            // The rail's own database: a durable commit, on the blocking pool.
            let write = record();
            let rail = app.rail.clone();
            tokio::task::spawn_blocking(move || {
                let txn = rail.database().begin_write().map_err(RailError::from)?;
                write(&txn)?;
                txn.commit().map_err(RailError::from)?;
                Ok(None)
            })
            .await
            .map_err(internal)?
        }
    };
    let mut ticket = None;
    let locked = match locked {
        Ok(t) => {
            ticket = t;
            Ok(())
        }
        Err(LockError::Rail(e)) => Err(e),
        Err(LockError::Key(e)) => return Err(e.into()),
        // The same key was claimed by a concurrent request: its answer, 409 or 422; nothing
        // of this one was written.
        Err(LockError::KeyTaken(taken)) => {
            // The other request's claim of the key may not be on disk yet (its commit is
            // deferred): answer from it only once it is.
            on_disk(app).await?;
            return match taken.into_result()? {
                Some(stored) => Ok(("replayed", stored)),
                None => Err(internal("idempotency key claimed twice")),
            };
        }
    };
    if let Err(e) = locked {
        abandon(e.code());
        if e.is_payment_error() {
            let code = payment_refusal(&e);
            app.metrics.payment_refused(code);
            on_disk_if_stateful(app, &e).await?;
            return Ok((
                "payment_refused",
                payment_required(&challenge, Some((code, e.to_string())))?,
            ));
        }
        return Err(internal(e));
    }
    info!(task = %task_id, payer = %paid.payer, units = paid.price_units, capability = %paid.capability, "payment locked; running the task");
    // The rest runs on its own: a client hanging up must not leave money locked.
    let app2 = app.clone();
    let run = tokio::spawn(
        async move {
            let ran = if joint {
                app2.coordinator.launch(task_id, leases).await
            } else {
                app2.coordinator.run_task(task.spec).await
            };
            let rec = match ran {
                Ok(rec) => Some(with_late_claims(&app2, rec).await),
                Err(e) => {
                    warn!(error = %e, "task failed in the coordinator");
                    app2.coordinator.tasks().get(&task_id).ok().flatten()
                }
            };
            finish(&app2, &paid, rec.as_ref()).await
        }
        .instrument(info_span!("task", task = %task_id)),
    );
    let ran = run.await;
    // The lock (and the task's record) on disk before any answer, an error too: usually a
    // later durable commit of the task's covered it already.
    if let Some(t) = ticket.filter(|t| !app.state.is_durable(*t)) {
        let state = app.state.clone();
        tokio::task::spawn_blocking(move || state.sync(t))
            .await
            .map_err(internal)?
            .map_err(internal)?;
    }
    let stored = ran.map_err(internal)??;
    let outcome = if stored.status == 200 {
        "completed"
    } else {
        "refunded"
    };
    Ok((outcome, stored))
}

/// Returns once every commit made before the call is on disk: an answer that rests on
/// another request's commit (deferred, see `create_inner`) waits for it.
async fn on_disk(app: &Arc<AppState>) -> Result<(), ApiError> {
    let state = app.state.clone();
    tokio::task::spawn_blocking(move || state.barrier())
        .await
        .map_err(internal)?
        .map_err(internal)
}

/// [`on_disk`] for a refusal that another payment's lock may have caused (its nonce used,
/// its funds taken): that lock must be on disk before the refusal is sent.
async fn on_disk_if_stateful(app: &Arc<AppState>, e: &RailError) -> Result<(), ApiError> {
    match e {
        RailError::NonceReplayed | RailError::InsufficientFunds { .. } => on_disk(app).await,
        _ => Ok(()),
    }
}

/// Why the payment's transaction was not committed.
enum LockError {
    /// The rail refused (a payment error) or failed.
    Rail(RailError),
    /// The idempotency table failed.
    Key(IdempotencyError),
    /// A concurrent request with the same key claimed it first.
    KeyTaken(Begin),
}

/// A key found taken was only read: the writes combined with this one commit without it.
impl CombinedError for LockError {
    fn untouched(&self) -> bool {
        matches!(self, LockError::KeyTaken(_))
    }
}

impl From<RailError> for LockError {
    fn from(e: RailError) -> Self {
        LockError::Rail(e)
    }
}

/// A node database error as the rail reports it.
fn state_error(table: &'static str, e: StateError) -> RailError {
    match e {
        StateError::Db(e) => RailError::Storage(Box::new(e)),
        other => RailError::Corrupt {
            table,
            reason: other.to_string(),
        },
    }
}

/// Locks the payment and records the paid task (and the coordinator's record, when given)
/// in `txn`; the caller commits.
fn lock_and_record(
    txn: &redb::WriteTransaction,
    rail: &LocalRail,
    paid: &PaidTask,
    verified: &d402_settlement::VerifiedPayment,
    now: UnixMillis,
    task: Option<&TaskRecord>,
) -> Result<(), RailError> {
    let bytes = encode("gateway_tasks", paid).map_err(|e| RailError::Corrupt {
        table: "gateway_tasks",
        reason: e.to_string(),
    })?;
    rail.lock_in(txn, paid.task_id, verified, now)?;
    {
        let mut t = txn.open_table(PAID_TASKS)?;
        t.insert(&paid.task_id.0[..], bytes.as_slice())?;
    }
    if let Some(task) = task {
        let created = Tasks::create_in(txn, task).map_err(|e| state_error("tasks", e))?;
        if !created {
            // Task ids are random; a clash aborts the transaction (nothing locked).
            return Err(RailError::Corrupt {
                table: "tasks",
                reason: format!("task {} exists", paid.task_id),
            });
        }
    }
    Ok(())
}

/// How a paid task was settled.
#[derive(Debug, Clone)]
pub enum Settlement {
    /// Paid out.
    Captured(Signed<SettlementReceipt>),
    /// Returned to the payer, with the reason code and text.
    Refunded {
        /// The refund receipt.
        receipt: Signed<SettlementReceipt>,
        /// `no_workers`, `quorum_not_reached` or `internal`.
        code: &'static str,
        /// Why.
        message: String,
    },
}

/// The payouts of an accepted task: every claim judged accepted, paid its lease's price
/// (the worker's bid) to the local-rail wallet of its bid. A claim whose wallet is not a
/// valid local address is left out (the worker cannot be paid; the gateway keeps it).
pub fn capture_plan(rec: &TaskRecord, commission: &CommissionTerms) -> CapturePlan {
    let mut payouts = Vec::new();
    for c in rec
        .claims
        .iter()
        .filter(|c| c.judgement == ClaimJudgement::Accepted)
    {
        let Some(lease) = rec
            .leases
            .iter()
            .find(|l| l.lease_cid == c.claim.body.lease_cid)
        else {
            continue;
        };
        let wallet = rec
            .bids
            .iter()
            .find(|b| b.bid_cid == lease.lease.body.bid_cid)
            .and_then(|b| b.bid.body.payout.get(&Chain::Local));
        let (Some(wallet), Ok(claim_cid)) = (wallet, c.cid()) else {
            warn!(lease = %lease.lease_cid, "accepted claim without a local payout wallet: not paid");
            continue;
        };
        if d402_settlement::wallet::parse_address(wallet).is_err() {
            warn!(%wallet, "accepted claim with an invalid local payout wallet: not paid");
            continue;
        }
        payouts.push(WorkerPayout {
            worker: wallet.clone(),
            gross: lease.lease.body.price.units,
            claim_cid,
        });
    }
    CapturePlan {
        payouts,
        commission: commission.clone(),
    }
}

fn failure(rec: Option<&TaskRecord>) -> (&'static str, String) {
    match rec {
        None => ("internal", "the task did not start".into()),
        Some(r) if r.bids.is_empty() => (
            "no_workers",
            "no worker bid for this capability; the payment was refunded".into(),
        ),
        Some(r) => (
            "quorum_not_reached",
            format!(
                "{}; the payment was refunded",
                match &r.phase {
                    Phase::Failed { reason } => reason.clone(),
                    _ => "the task did not finish".into(),
                }
            ),
        ),
    }
}

/// The receipt of a task the rail already settled (a retry after a crash or a race).
fn stored_receipt(rail: &LocalRail, id: TaskId) -> Result<EscrowStatus, RailError> {
    rail.escrow(id)?.ok_or(RailError::UnknownTask(id))
}

/// The settlement of a task captured already (with its acceptance, or by an earlier
/// attempt), read without writing; `None` when it is not.
fn captured(rail: &LocalRail, id: TaskId) -> Result<Option<Settlement>, RailError> {
    Ok(match rail.escrow(id)? {
        Some(EscrowStatus {
            state: EscrowState::Captured,
            receipt: Some(receipt),
            ..
        }) => Some(Settlement::Captured(receipt)),
        _ => None,
    })
}

/// Captures an accepted task, refunds any other; idempotent (a settled task returns its
/// receipt).
pub fn settle(
    rail: &LocalRail,
    paid: &PaidTask,
    rec: Option<&TaskRecord>,
) -> Result<Settlement, RailError> {
    let id = paid.task_id;
    let now = now_ms();
    // Captured already, with the acceptance (see `capture_on_acceptance`) or by an earlier
    // attempt: that receipt stands (the record may have gained a late claim since, which
    // must not make a second plan).
    if let Some(done) = captured(rail, id)? {
        return Ok(done);
    }
    let accepted = rec.filter(|r| r.phase == Phase::Accepted);
    let result = match accepted {
        Some(r) => {
            let plan = capture_plan(r, &paid.commission);
            match rail.capture_task(id, &plan, now) {
                Ok(receipt) => Ok(Settlement::Captured(receipt)),
                Err(RailError::InvalidPlan(why)) => {
                    warn!(task = %id, %why, "capture plan refused; refunding");
                    rail.refund_task(id, now)
                        .map(|receipt| Settlement::Refunded {
                            receipt,
                            code: "internal",
                            message: format!("settlement failed ({why}); the payment was refunded"),
                        })
                }
                Err(e) => Err(e),
            }
        }
        None => {
            let (code, message) = failure(rec);
            rail.refund_task(id, now)
                .map(|receipt| Settlement::Refunded {
                    receipt,
                    code,
                    message,
                })
        }
    };
    match result {
        Err(
            RailError::PlanConflict(_)
            | RailError::AlreadyCaptured(_)
            | RailError::AlreadyRefunded(_),
        ) => {
            let status = stored_receipt(rail, id)?;
            let receipt = status.receipt.ok_or(RailError::UnknownTask(id))?;
            Ok(match status.state {
                EscrowState::Captured => Settlement::Captured(receipt),
                _ => {
                    let (code, message) = failure(rec);
                    Settlement::Refunded {
                        receipt,
                        code,
                        message,
                    }
                }
            })
        }
        other => other,
    }
}

/// Settles a finished (or never started) task, builds its answer and stores it under the
/// idempotency key.
pub async fn finish(
    app: &Arc<AppState>,
    paid: &PaidTask,
    rec: Option<&TaskRecord>,
) -> Result<StoredResponse, ApiError> {
    // Usually captured already, in the acceptance's commit: a read (no commit, nothing to
    // wait for on the blocking pool) finds its receipt.
    let settled = match captured(app.rail.as_ref(), paid.task_id).map_err(internal)? {
        Some(s) => s,
        None => {
            let rail = app.rail.clone();
            let paid = paid.clone();
            let rec = rec.cloned();
            tokio::task::spawn_blocking(move || settle(&rail, &paid, rec.as_ref()))
                .await
                .map_err(internal)?
                .map_err(internal)?
        }
    };
    match &settled {
        Settlement::Captured(receipt) => {
            app.metrics.observe_receipt(&receipt.body);
            info!(task = %paid.task_id, "task completed and captured");
        }
        Settlement::Refunded { code, .. } => {
            info!(task = %paid.task_id, code, "task not served; payment refunded");
        }
    }
    // The answer that stands under the key is the one sent: stored with the capture when
    // the task was paid in its acceptance's commit (not built again), else stored now.
    if let Some(k) = &paid.idempotency_key
        && let Ok(Some(stored)) = app.idempotency.stored_answer(k)
    {
        return Ok(stored);
    }
    let stored = answer(app.rail.as_ref(), paid, rec, &settled)?;
    let stored = match &paid.idempotency_key {
        Some(k) => match app.idempotency.finish(k, &stored) {
            Ok(standing) => standing,
            Err(e) => {
                warn!(error = %e, "cannot store the idempotent answer");
                stored
            }
        },
        None => stored,
    };
    Ok(stored)
}

/// The answer to a settled task: `200` with the result and `PAYMENT-RESPONSE` (or
/// `X-PAYMENT-RESPONSE` for a v1 payment), or `503` (`500` for an internal failure) with
/// `"refunded": true` and the refund's settlement response.
pub fn answer(
    rail: &LocalRail,
    paid: &PaidTask,
    rec: Option<&TaskRecord>,
    settled: &Settlement,
) -> Result<StoredResponse, ApiError> {
    let network = rail.network();
    let header_name = if paid.x402_version == X402_V1 {
        d402_settlement::x402::X_PAYMENT_RESPONSE
    } else {
        d402_settlement::x402::PAYMENT_RESPONSE
    };
    Ok(match settled {
        Settlement::Captured(receipt) => {
            let escrow = EscrowStatus {
                task_id: paid.task_id,
                state: EscrowState::Captured,
                payer: paid.payer.clone(),
                amount: rail.asset().amount(paid.price_units),
                receipt: Some(receipt.clone()),
            };
            let body = task_body(network, paid, rec, Some(&escrow));
            let header = SettlementResponse::settled(network, receipt.clone())
                .to_header()
                .map_err(internal)?;
            let mut r = json_response(StatusCode::OK, &body);
            r.headers.push((header_name.to_string(), header));
            r
        }
        Settlement::Refunded {
            receipt,
            code,
            message,
        } => {
            let status = if *code == "internal" {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let body = serde_json::json!({
                "error": {"code": code, "message": message},
                "refunded": true,
                "task_id": paid.task_id.to_string(),
                "receipt": receipt,
            });
            let header = SettlementResponse::refunded(network, code, Some(receipt.clone()))
                .to_header()
                .map_err(internal)?;
            let mut r = json_response(status, &body);
            r.headers.push((header_name.to_string(), header));
            r
        }
    })
}

/// How long an accepted task waits for the claims of leases still open before it is
/// settled: an agreeing claim that lands just after the quorum is paid too.
pub const LATE_CLAIM_GRACE: std::time::Duration = std::time::Duration::from_millis(250);

/// `rec` once no lease of an accepted task is open any more, or after [`LATE_CLAIM_GRACE`]
/// (re-read from the database). Any other record is returned as is.
async fn with_late_claims(app: &Arc<AppState>, rec: TaskRecord) -> TaskRecord {
    let open = |r: &TaskRecord| r.leases.iter().any(|l| l.is_open());
    if rec.phase != Phase::Accepted || !open(&rec) {
        return rec;
    }
    let id = rec.spec.task_id;
    let until = tokio::time::Instant::now() + LATE_CLAIM_GRACE;
    let changes = app.coordinator.changes(&id);
    let mut last = rec;
    loop {
        // Registered before the record is read: a claim recorded in between still wakes.
        let changed = changes.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        match app.coordinator.tasks().get(&id) {
            Ok(Some(r)) => {
                let done = !open(&r);
                last = r;
                if done {
                    break;
                }
            }
            _ => break,
        }
        if tokio::time::timeout_at(until, changed).await.is_err() {
            break;
        }
    }
    drop(changes);
    app.coordinator.forget_changes(&id);
    // What was read may hold a commit still in its group's sync (a late claim's, with its
    // capture): on disk before the task is settled and answered from it.
    if let Err(e) = on_disk(app).await {
        warn!(task = %id, error = %e.message, "cannot sync before settling");
    }
    last
}

/// The hook that captures a paid task's payment inside the transaction that accepts it
/// (registered by [`crate::gateway::Gateway::start`] when the rail and the coordinator
/// share the database): one commit for acceptance and payment, and a task can no longer be
/// accepted while its payment stays locked. Only when no lease of the task is still open
/// (otherwise a late agreeing claim would go unpaid: the task is settled after the run). A
/// task without a `PaidTask` row (not sold over HTTP) is left alone; a refused capture
/// (logged) leaves the transaction untouched and [`settle`] decides after the run as
/// before. A failed write (of the capture, or of the stored answer after it) fails the
/// hook, so that nothing of a half-written capture commits.
pub fn capture_on_acceptance(rail: Arc<LocalRail>, idempotency: Idempotency) -> AcceptHook {
    Arc::new(move |txn, rec| {
        let id = rec.spec.task_id;
        let paid: Option<PaidTask> = match txn.open_table(PAID_TASKS) {
            Ok(t) => match t.get(&id.0[..]) {
                Ok(Some(v)) => decode("gateway_tasks", v.value(), MAX_PAID_TASK).ok(),
                _ => None,
            },
            Err(_) => None,
        };
        // Leases still open may bring agreeing claims that are to be paid too: such a task
        // is settled after the run (`with_late_claims`, then `settle`).
        let Some(paid) = paid.filter(|_| !rec.leases.iter().any(|l| l.is_open())) else {
            return Ok(());
        };
        let plan = capture_plan(rec, &paid.commission);
        let receipt = match rail.capture_in(txn, id, &plan, now_ms()) {
            Ok(receipt) => receipt,
            // Settled already (after the run, once the grace for late claims ran out).
            Err(
                e @ (RailError::PlanConflict(_)
                | RailError::AlreadyCaptured(_)
                | RailError::AlreadyRefunded(_)),
            ) => {
                debug!(task = %id, error = %e, "task settled already; the late claim is recorded only");
                return Ok(());
            }
            // A write of the capture failed: part of it is in the transaction.
            Err(e @ RailError::PartlyWritten(_)) => return Err(HookFailed(e.to_string())),
            // Refused before its first write: the transaction is untouched.
            Err(e) => {
                warn!(task = %id, error = %e, "capture with the acceptance refused; settling after the run");
                return Ok(());
            }
        };
        // The answer to a keyed request commits with the capture too (one commit less);
        // `finish` then finds it and sends it as stored.
        if let Some(k) = &paid.idempotency_key {
            let not_stored = match answer(&rail, &paid, Some(rec), &Settlement::Captured(receipt)) {
                Ok(a) => match idempotency.finish_in(txn, k, &a) {
                    Ok(_) => None,
                    // Its write failed (the capture is written): nothing of it may commit.
                    Err(e @ IdempotencyError::WriteFailed(_)) => {
                        return Err(HookFailed(e.to_string()));
                    }
                    Err(e) => Some(e.to_string()),
                },
                Err(e) => Some(e.to_string()),
            };
            if let Some(e) = not_stored {
                warn!(task = %id, error = %e, "answer not stored with the capture; stored after the run");
            }
        }
        Ok(())
    })
}

/// What became of the task of an idempotency record left by an earlier run: not charged
/// (no payment locked), in progress (locked; [`recover`] settles it), or its answer.
pub fn stale_resolver(parts: &GatewayParts) -> StaleResolver {
    let rail = parts.rail.clone();
    let state = parts.state.clone();
    let tasks = parts.coordinator.tasks().clone();
    Arc::new(move |id| {
        let escrow = match rail.escrow(id) {
            Ok(e) => e,
            Err(e) => {
                warn!(task = %id, error = %e, "cannot read the escrow of a stale request");
                return StaleTask::InProgress;
            }
        };
        let Some(escrow) = escrow else {
            return StaleTask::NotCharged;
        };
        let (Some(receipt), Ok(Some(paid))) = (escrow.receipt.clone(), paid_task(&state, &id))
        else {
            return StaleTask::InProgress;
        };
        let rec = tasks.get(&id).ok().flatten();
        let settled = match escrow.state {
            EscrowState::Locked => return StaleTask::InProgress,
            EscrowState::Captured => Settlement::Captured(receipt),
            EscrowState::Refunded => {
                let (code, message) = failure(rec.as_ref());
                Settlement::Refunded {
                    receipt,
                    code,
                    message,
                }
            }
        };
        match answer(&rail, &paid, rec.as_ref(), &settled) {
            Ok(a) => StaleTask::Finished(a),
            Err(_) => StaleTask::InProgress,
        }
    })
}

fn output_json(bytes: &[u8]) -> serde_json::Value {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) {
        return v;
    }
    match std::str::from_utf8(bytes) {
        Ok(s) => serde_json::Value::String(s.to_string()),
        Err(_) => serde_json::json!({
            "base64": base64::engine::general_purpose::STANDARD.encode(bytes)
        }),
    }
}

fn status_of(rec: Option<&TaskRecord>, escrow: Option<&EscrowStatus>) -> &'static str {
    match escrow.map(|e| e.state) {
        Some(EscrowState::Captured) => "completed",
        Some(EscrowState::Refunded) => "refunded",
        _ => match rec.map(|r| &r.phase) {
            Some(Phase::Failed { .. }) => "failed",
            _ => "running",
        },
    }
}

/// The JSON view of a paid task (the `200` body and `GET /v1/tasks/{id}`).
pub fn task_body(
    network: &str,
    paid: &PaidTask,
    rec: Option<&TaskRecord>,
    escrow: Option<&EscrowStatus>,
) -> serde_json::Value {
    let mut body = serde_json::json!({
        "task_id": paid.task_id.to_string(),
        "status": status_of(rec, escrow),
        "capability": paid.capability.to_string(),
        "manifest_cid": paid.manifest_cid.to_string(),
    });
    if let Some(r) = rec {
        let peer_of = |lease_cid: &Cid| {
            r.leases
                .iter()
                .find(|l| &l.lease_cid == lease_cid)
                .and_then(|l| libp2p::PeerId::from_bytes(&l.peer).ok())
                .map(|p| p.to_string())
                .unwrap_or_default()
        };
        let claims: Vec<_> = r
            .claims
            .iter()
            .map(|c| {
                serde_json::json!({
                    "worker": peer_of(&c.claim.body.lease_cid),
                    "claim_cid": c.cid().map(|c| c.to_string()).unwrap_or_default(),
                    "output_cid": c.claim.body.output_cid.to_string(),
                    "judgement": match c.judgement {
                        ClaimJudgement::Pending => "pending",
                        ClaimJudgement::Accepted => "accepted",
                        ClaimJudgement::Rejected => "rejected",
                        ClaimJudgement::Unusable => "unusable",
                    },
                })
            })
            .collect();
        let agreeing = r
            .claims
            .iter()
            .filter(|c| c.judgement == ClaimJudgement::Accepted)
            .count();
        body["quorum"] = serde_json::json!({
            "fanout": r.spec.fanout,
            "quorum": r.spec.quorum,
            "agreeing": agreeing,
        });
        body["claims"] = claims.into();
        if let Some(out) = r.accepted_output {
            body["output_cid"] = out.to_string().into();
            if let Some(c) = r.claims.iter().find(|c| c.claim.body.output_cid == out) {
                body["output"] = output_json(&c.claim.body.output);
            }
        }
        if let Phase::Failed { reason } = &r.phase {
            body["reason"] = reason.clone().into();
        }
    }
    if let Some(receipt) = escrow.and_then(|e| e.receipt.as_ref()) {
        let transfers: Vec<_> = receipt
            .body
            .transfers
            .iter()
            .map(|t| {
                serde_json::json!({
                    "role": t.role,
                    "to": t.to,
                    "units": t.units.to_string(),
                })
            })
            .collect();
        body["settlement"] = serde_json::json!({
            "rail": "local",
            "network": network,
            "asset": receipt.body.charged.asset,
            "price": receipt.body.charged.units.to_string(),
            "transfers": transfers,
        });
        body["receipt"] = serde_json::to_value(receipt).unwrap_or_default();
    }
    body
}

/// `GET /v1/tasks/{id}`.
pub async fn get_task(State(app): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "task_not_found",
            format!("no task {id:?} on this gateway"),
        )
        .into_response()
    };
    let Ok(task_id) = id.parse::<TaskId>() else {
        return not_found();
    };
    let paid = match paid_task(&app.state, &task_id) {
        Ok(Some(p)) => p,
        Ok(None) => return not_found(),
        Err(e) => return internal(e).into_response(),
    };
    let rec = match app.coordinator.tasks().get(&task_id) {
        Ok(r) => r,
        Err(e) => return internal(e).into_response(),
    };
    let escrow = match app.rail.escrow(task_id) {
        Ok(e) => e,
        Err(e) => return internal(e).into_response(),
    };
    axum::Json(task_body(
        app.rail.network(),
        &paid,
        rec.as_ref(),
        escrow.as_ref(),
    ))
    .into_response()
}

/// Settles every payment a previous run left locked: the coordinator resumes the open
/// tasks, and each locked payment is captured or refunded once its task ends (refunded at
/// once when its task never started). Returns how many payments were left locked.
pub fn recover(app: &Arc<AppState>) -> anyhow::Result<usize> {
    let resumed = app.coordinator.resume()?;
    if !resumed.is_empty() {
        info!(tasks = resumed.len(), "coordinator tasks resumed");
    }
    let locked = app.rail.read(|r| r.locked_tasks())?;
    for id in &locked {
        let app = app.clone();
        let id = *id;
        tokio::spawn(
            async move {
                if let Err(e) = settle_when_done(&app, id).await {
                    warn!(error = %e, "cannot settle a task of the last run");
                }
            }
            .instrument(info_span!("recover", task = %id)),
        );
    }
    Ok(locked.len())
}

async fn settle_when_done(app: &Arc<AppState>, id: TaskId) -> Result<(), ApiError> {
    let paid = paid_task(&app.state, &id).map_err(internal)?;
    let rec = loop {
        match app.coordinator.tasks().get(&id) {
            Ok(Some(r)) if !r.phase.is_terminal() => {}
            Ok(r) => break r,
            Err(e) => warn!(error = %e, "cannot read the task; retrying"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    match paid {
        Some(paid) => {
            let stored = finish(app, &paid, rec.as_ref()).await?;
            info!(status = stored.status, "payment of the last run settled");
        }
        None => {
            // A lock without its record cannot happen (one transaction); refund it anyway.
            let rail = app.rail.clone();
            tokio::task::spawn_blocking(move || rail.refund_task(id, now_ms()))
                .await
                .map_err(internal)?
                .map_err(internal)?;
            warn!("locked payment without a task record refunded");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_are_json_text_or_base64() {
        assert_eq!(output_json(b"{\"a\":1}"), serde_json::json!({"a": 1}));
        assert_eq!(output_json(b"# Title\n"), serde_json::json!("# Title\n"));
        assert_eq!(
            output_json(&[0xff, 0x00]),
            serde_json::json!({"base64": "/wA="})
        );
    }

    #[test]
    fn request_hash_ignores_nothing_but_the_payment() {
        let a = request_hash("x.y@1", &serde_json::json!({"url": "https://a"}));
        let b = request_hash("x.y@1", &serde_json::json!({"url": "https://b"}));
        let c = request_hash("x.z@1", &serde_json::json!({"url": "https://a"}));
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            a,
            request_hash("x.y@1", &serde_json::json!({"url": "https://a"}))
        );
    }

    #[test]
    fn idempotency_keys_are_checked() {
        let mut h = HeaderMap::new();
        assert_eq!(idempotency_key(&h).unwrap(), None);
        h.insert("idempotency-key", HeaderValue::from_static("abc-1"));
        assert_eq!(idempotency_key(&h).unwrap().as_deref(), Some("abc-1"));
        h.insert("idempotency-key", HeaderValue::from_static("a b"));
        assert!(idempotency_key(&h).is_err());
        let long = "k".repeat(MAX_IDEMPOTENCY_KEY + 1);
        h.insert("idempotency-key", HeaderValue::from_str(&long).unwrap());
        assert!(idempotency_key(&h).is_err());
    }
}
