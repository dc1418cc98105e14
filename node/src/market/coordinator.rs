//! The gateway's coordinator: buys one task from untrusted workers.
//!
//! Bidding: candidates are the providers of the manifest CID (Kademlia and rendezvous) and
//! the connected peers; bid requests go out in parallel, each asking for a standing bid
//! ([`super::standing`]); valid bids are ranked with [`selection::select`] within
//! [`selection::per_worker_max`] of the budget (each bid not chosen is logged with its
//! reason). A new task whose gateway holds `fanout` eligible standing bids skips the round
//! and is ranked and leased on those at once. Leasing: the primary (best bid) is leased first with
//! no snapshot pinned; when its claim names a snapshot, the coordinator fetches it from the
//! primary over `/d402/blob/1`, checks it is plausible (length, final URL host, status) and
//! pins it; the next bids are leased with that snapshot CID and fetch it from this node.
//! Every lease carries a fencing token, strictly increasing per task. A lease that times
//! out or is refused is replaced by the next bid until the task's deadline. Claims are
//! decided by [`quorum::decide`]; dissenting claims are rejected; outcomes go to
//! [`Reputation`]. Each step is committed to the `tasks` table ([`super::tasks`]) before
//! the next message goes out, and [`Coordinator::resume`] re-drives open tasks.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use d402_protocol::{
    Cid, Signed, SigningKey, TaskId,
    messages::{
        Bid, BidResponse, Claim, ClaimAck, DeclineReason, Lease, LeaseAck, MAX_BID_USES,
        VerdictOutcome,
    },
    types::MESSAGE_VERSION,
};
use futures::{StreamExt, future::join_all, stream::FuturesUnordered};
use libp2p::{Multiaddr, PeerId};
use tokio::sync::Notify;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{
    blobs::{self, BlobStore},
    busy, now_ms,
    quorum::{self, Decision, Vote},
    reputation::{Outcome, Reputation},
    selection::{self, Candidate},
    standing::{StandingBids, Wanted},
    tasks::{
        BidRec, ClaimJudgement, ClaimRec, LeaseRec, LeaseStatus, PassedBid, Phase, PinnedSnapshot,
        TaskRecord, TaskSpec, Tasks, VerdictRec,
    },
    validator::validator_key,
};
use crate::{
    group_commit::CombinedError,
    net::{
        LookupOptions, NetHandle,
        codec::{VerdictRequest, VerdictResponse},
        public_key_of,
    },
    state::{State, StateError},
};

/// Why a claim was refused (the code leads the reason sent in [`ClaimAck::Refused`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimRefusal {
    /// No such task.
    UnknownTask,
    /// No lease with that CID was issued.
    UnknownLease,
    /// Not signed by the leased worker, or not sent by it.
    BadSignature,
    /// The claim's fencing token is not the lease's, or the lease was superseded.
    StaleFencingToken,
    /// The lease's deadline passed.
    LeaseExpired,
    /// The lease already has a claim.
    Duplicate,
    /// The claim is not over the pinned snapshot.
    WrongSnapshot,
    /// The task is closed.
    TaskClosed,
    /// Internal error (database).
    Internal,
}

impl ClaimRefusal {
    /// The stable code.
    pub fn code(self) -> &'static str {
        match self {
            ClaimRefusal::UnknownTask => "unknown_task",
            ClaimRefusal::UnknownLease => "unknown_lease",
            ClaimRefusal::BadSignature => "bad_signature",
            ClaimRefusal::StaleFencingToken => "stale_fencing_token",
            ClaimRefusal::LeaseExpired => "lease_expired",
            ClaimRefusal::Duplicate => "duplicate_claim",
            ClaimRefusal::WrongSnapshot => "wrong_snapshot",
            ClaimRefusal::TaskClosed => "task_closed",
            ClaimRefusal::Internal => "internal",
        }
    }

    fn ack(self) -> ClaimAck {
        ClaimAck::Refused {
            reason: self.code().to_string(),
        }
    }
}

impl From<StateError> for ClaimRefusal {
    fn from(e: StateError) -> Self {
        warn!(error = %e, "task database error");
        ClaimRefusal::Internal
    }
}

/// Errors of the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The database failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// A message could not be signed or encoded.
    #[error(transparent)]
    Protocol(#[from] d402_protocol::ProtocolError),
    /// The task id is taken.
    #[error("task {0} exists")]
    Exists(TaskId),
    /// The task vanished.
    #[error("task {0} not found")]
    NotFound(TaskId),
    /// The runtime is shutting down: a database write did not run.
    #[error("interrupted: the node is shutting down")]
    Interrupted,
    /// The acceptance hook failed: the acceptance did not commit.
    #[error(transparent)]
    Hook(#[from] HookFailed),
}

/// Timers and terms of the coordinator.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// How long a lease runs before it is reassigned (capped by the task's deadline).
    pub lease_timeout: Duration,
    /// How long the provider lookup may take.
    pub lookup_timeout: Duration,
    /// Agreeing validator verdicts required on top of the quorum (`--validators N`); 0
    /// asks none. Copied into each new task's record, so a resumed task keeps its terms.
    pub validators: u32,
    /// Validators asked first (`--validator-peer`), before those found under
    /// [`super::validator::validator_key`].
    pub validator_peers: Vec<(PeerId, Vec<Multiaddr>)>,
    /// How many leases each bid request asks the worker to cover ([`StandingBids`]); 1
    /// asks every task's bids anew.
    pub standing_bids: u32,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            lease_timeout: Duration::from_secs(60),
            lookup_timeout: Duration::from_secs(5),
            validators: 0,
            validator_peers: Vec::new(),
            standing_bids: 256,
        }
    }
}

struct Inner {
    net: NetHandle,
    key: SigningKey,
    tasks: Tasks,
    reputation: Reputation,
    blobs: BlobStore,
    cfg: CoordinatorConfig,
    /// Per task, what wakes whoever waits for its claims (the driver, the gateway waiting
    /// for late claims).
    wake: Mutex<Wakers>,
    /// Whether the reputation table is in the tasks' database, so that outcomes commit in
    /// the same transaction as the judgement they follow from.
    joint: bool,
    /// Leases that were open when this coordinator resumed their task: if they expire, the
    /// worker is not charged a timeout, because its claim may have reached the gateway that
    /// died (an inline claim in a lease's answer has no acknowledgement to retry on).
    inherited: Mutex<HashSet<Cid>>,
    /// Called inside the transaction that accepts a task ([`Coordinator::on_acceptance`]).
    accept_hook: std::sync::OnceLock<AcceptHook>,
    /// Providers found per manifest CID and when they were looked up: a DHT walk per task
    /// would dominate a paid task's latency, so one walk serves [`PROVIDER_TTL`].
    providers: Mutex<HashMap<Cid, (Instant, Vec<Provider>)>>,
    /// Standing bids received, to lease new tasks on without a bid round.
    standing: StandingBids,
    /// Backoffs from busy workers (shared with the gateway's metrics).
    backoffs: Arc<busy::Backoffs>,
}

/// The wake-ups of tasks being waited for. An entry is dropped when its task's driver
/// ends ([`Coordinator::forget_changes`]); entries nobody holds are also swept once the map
/// doubles, so tasks that end in odd ways cannot grow it without bound. A waiter always
/// registers before it reads the record, so a swept entry loses no change.
#[derive(Default)]
struct Wakers {
    map: HashMap<TaskId, Arc<Notify>>,
    sweep_at: usize,
}

/// The fewest entries [`Wakers`] keeps before it sweeps.
const WAKERS_SWEEP_MIN: usize = 1024;

impl Wakers {
    fn get(&mut self, id: &TaskId) -> Arc<Notify> {
        if self.map.len() >= self.sweep_at.max(WAKERS_SWEEP_MIN) && !self.map.contains_key(id) {
            self.map.retain(|_, n| Arc::strong_count(n) > 1);
            self.sweep_at = 2 * self.map.len();
        }
        self.map.entry(*id).or_default().clone()
    }
}

/// What runs inside the transaction that accepts a task, with the accepted record, and
/// again in the transaction that records a late claim closing the last open lease of an
/// accepted task: the gateway captures the task's payment there, so that acceptance (or the
/// last claim) and payment commit together. A refusal it can settle later must leave the
/// transaction untouched and return `Ok` (the rail's `_in` forms check before they write);
/// an error returned means the transaction may be partly written, and nothing of it
/// commits: the task stays undecided. When claims were deciding it, they are refused
/// ([`ClaimRefusal::Internal`]); when the driver was (validators' verdicts, a pinned
/// snapshot, a resumed task), the run ends with [`CoordinatorError::Hook`] and the task's
/// record is left as it was before the decision (the gateway then refunds it).
pub type AcceptHook =
    Arc<dyn Fn(&redb::WriteTransaction, &TaskRecord) -> Result<(), HookFailed> + Send + Sync>;

/// An [`AcceptHook`] failed after it may have written to the transaction (a storage error):
/// the transaction must not commit.
#[derive(Debug, thiserror::Error)]
#[error("the acceptance hook failed: {0}")]
pub struct HookFailed(pub String);

/// A new task's record with the leases issued in it ([`Coordinator::prepare`]).
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The record to commit.
    pub record: TaskRecord,
    /// The leases to send once it is committed (none when the task must ask for bids).
    pub leases: Vec<LeaseRec>,
}

/// How long the claims answering a round of leases wait for each other once the first is
/// in, so that claims of runs done together are recorded (and the task decided and paid)
/// in one commit. A gateway answers only once every lease of the round is closed (or after
/// the late-claim grace), so waiting for the round's last claim costs an answer nothing and
/// saves a commit per task whenever the claims come apart (under load, often by more than a
/// few ms; 3 ms before session 11, DECISIONS "The coordinator's critical path"). Claims
/// that come together are recorded at once: the wait ends with the round's last answer.
pub const CLAIM_BATCH_WAIT: Duration = Duration::from_millis(30);

/// A peer to ask for a bid, with the addresses to dial it at.
type Provider = (PeerId, Vec<Multiaddr>);

/// How long a provider lookup is reused for new tasks of the same manifest.
pub const PROVIDER_TTL: Duration = Duration::from_secs(30);

/// How long a lookup that found no provider is reused (the connected peers are asked for
/// bids all the same).
pub const PROVIDER_MISS_TTL: Duration = Duration::from_secs(2);

/// A standing bid is leased on only while it has this long left to live (a lease must
/// reach the worker before the bid lapses).
pub const STANDING_MARGIN: Duration = Duration::from_secs(2);

/// The coordinator. Cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator").finish()
    }
}

fn peer_from(bytes: &[u8]) -> Option<PeerId> {
    PeerId::from_bytes(bytes).ok()
}

impl Coordinator {
    /// A coordinator signing with `key` (the node key), persisting in `state`.
    pub fn new(
        key: SigningKey,
        net: NetHandle,
        state: State,
        reputation: Reputation,
        blobs: BlobStore,
        cfg: CoordinatorConfig,
    ) -> Coordinator {
        let tasks = Tasks::new(state);
        let joint = tasks.shares_database(reputation.state());
        Coordinator {
            inner: Arc::new(Inner {
                key,
                net,
                tasks,
                joint,
                inherited: Mutex::default(),
                accept_hook: std::sync::OnceLock::new(),
                reputation,
                blobs,
                cfg,
                wake: Mutex::default(),
                providers: Mutex::default(),
                standing: StandingBids::default(),
                backoffs: Arc::default(),
            }),
        }
    }

    /// Sets the hook run inside every acceptance's transaction (once; a second call is
    /// ignored and returns false).
    pub fn on_acceptance(&self, hook: AcceptHook) -> bool {
        self.inner.accept_hook.set(hook).is_ok()
    }

    /// The persisted tasks.
    pub fn tasks(&self) -> &Tasks {
        &self.inner.tasks
    }

    /// The reputation table.
    pub fn reputation(&self) -> &Reputation {
        &self.inner.reputation
    }

    /// How many standing bids this coordinator holds (see [`super::standing`]).
    pub fn standing_bids(&self) -> usize {
        self.inner.standing.len()
    }

    /// How often this coordinator backed off from busy workers (see [`super::busy`]).
    pub fn backoffs(&self) -> Arc<busy::Backoffs> {
        self.inner.backoffs.clone()
    }

    fn notify(&self, id: &TaskId) -> Arc<Notify> {
        self.inner
            .wake
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
    }

    /// What is notified when claims of task `id` are recorded or one of its leases closes.
    /// Call `notified()` on it (and `enable` it) before reading the record, then await it.
    pub fn changes(&self, id: &TaskId) -> Arc<Notify> {
        self.notify(id)
    }

    /// Drops the wake-up of task `id` (its waiters are done with it).
    pub fn forget_changes(&self, id: &TaskId) {
        self.inner
            .wake
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .remove(id);
    }

    /// Runs `f` on the blocking pool: a commit waits for the disk, and the async workers
    /// must keep serving the network meanwhile (on two cores, two commits in flight on the
    /// async workers stall every connection of the node).
    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Coordinator) -> Result<R, CoordinatorError> + Send + 'static,
    ) -> Result<R, CoordinatorError> {
        let me = self.clone();
        match tokio::task::spawn_blocking(move || f(&me)).await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(CoordinatorError::Interrupted),
        }
    }

    /// The record a new task starts with, on this coordinator's terms (to be created with
    /// [`Tasks::create_in`] in a caller's transaction, then driven with
    /// [`Coordinator::drive`]).
    pub fn new_record(&self, spec: TaskSpec) -> TaskRecord {
        let mut rec = TaskRecord::new(spec, now_ms());
        rec.validators = self.inner.cfg.validators;
        rec
    }

    /// Runs a new task to its end and returns its final record, on disk.
    ///
    /// The creation (with the first leases) commits without waiting for the disk: the
    /// leases go out at once, and the commit that decides the task, durable, persists the
    /// creation with it. Until then nobody has been answered; after a crash in between the
    /// task is simply unknown (its leases' claims are refused as such).
    pub async fn run_task(&self, spec: TaskSpec) -> Result<TaskRecord, CoordinatorError> {
        let id = spec.task_id;
        let Prepared { record, leases } = self.prepare(spec)?;
        // Without durability, and when redb's write lock is free, the commit costs less here
        // than a hop to the blocking pool and back; otherwise it may wait there for another
        // writer's transaction (and fsync).
        let (created, ticket) = match self.inner.tasks.try_create_deferred(&record)? {
            Some(done) => done,
            None => {
                self.blocking(move |c| Ok(c.inner.tasks.create_deferred(&record)?))
                    .await?
            }
        };
        if !created {
            // The task that exists may be another call's deferred creation: on disk
            // before it is answered from (this ticket's sync covers every commit before).
            self.blocking(move |c| Ok(c.inner.tasks.sync(ticket)?))
                .await?;
            return Err(CoordinatorError::Exists(id));
        }
        let done = self.launch(id, leases).await;
        // Usually covered already by a later durable commit of the task's.
        if !self.inner.tasks.is_durable(ticket) {
            self.blocking(move |c| Ok(c.inner.tasks.sync(ticket)?))
                .await?;
        }
        done
    }

    /// A new task's record and, when the standing bids suffice ([`super::standing`]), its
    /// first leases already issued in it: the caller commits the record (alone with
    /// [`Tasks::create`], or in its own transaction with [`Tasks::create_in`]) and then
    /// calls [`Coordinator::launch`], so that creation and leasing cost one commit.
    pub fn prepare(&self, spec: TaskSpec) -> Result<Prepared, CoordinatorError> {
        let mut record = self.new_record(spec);
        let now = now_ms();
        let fanout = record.spec.fanout.max(1) as usize;
        let max_each = selection::per_worker_max(record.spec.budget.units, fanout);
        let mut leases = Vec::new();
        if let Some(bids) = self.standing_choice(&record.spec, fanout, max_each, now)? {
            info!(task = %record.spec.task_id, bids = bids.len(), "leasing on standing bids");
            record.bids = bids;
            record.standing = true;
            record.phase = Phase::Leasing;
            let want = leases_wanted(&record);
            leases = self.issue_leases(&mut record, want, now)?;
        }
        Ok(Prepared { record, leases })
    }

    /// Sends the leases [`Coordinator::prepare`] issued (their record committed), then
    /// drives the task to its end.
    pub async fn launch(
        &self,
        id: TaskId,
        leases: Vec<LeaseRec>,
    ) -> Result<TaskRecord, CoordinatorError> {
        if !leases.is_empty() {
            let decided = self
                .send_leases(&id, &leases)
                .instrument(info_span!("task", task = %id))
                .await?;
            // Their claims decided it (the usual case): nothing left to drive.
            if let Some(done) = decided {
                self.forget_changes(&id);
                return Ok(self.finished(done));
            }
        }
        self.drive(id).await
    }

    /// Re-drives every open task in the background (call once at start).
    pub fn resume(&self) -> Result<Vec<TaskId>, CoordinatorError> {
        let mut ids = Vec::new();
        for rec in self.inner.tasks.all()? {
            if rec.phase.is_terminal() {
                continue;
            }
            let id = rec.spec.task_id;
            info!(task = %id, phase = ?rec.phase, "resuming task");
            self.inner
                .inherited
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(
                    rec.leases
                        .iter()
                        .filter(|l| l.is_open())
                        .map(|l| l.lease_cid),
                );
            // Serve the pinned snapshot again before anyone leased asks for it.
            self.restore_pinned(&rec)?;
            ids.push(id);
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.drive(id).await {
                    warn!(task = %id, error = %e, "resumed task failed");
                }
            });
        }
        Ok(ids)
    }

    /// Drives a task from its persisted phase to its end.
    pub async fn drive(&self, id: TaskId) -> Result<TaskRecord, CoordinatorError> {
        let span = info_span!("task", task = %id);
        // Held for the whole drive, so the entry (and a permit a claim leaves in it between
        // a read of the record and the next wait) is never swept.
        let _wake = self.notify(&id);
        let done = async {
            // Bid rounds in a row that too many busy workers declined.
            let mut busy_rounds = 0;
            loop {
                let rec = self
                    .inner
                    .tasks
                    .get(&id)?
                    .ok_or(CoordinatorError::NotFound(id))?;
                match rec.phase {
                    Phase::Bidding => self.bid_round(&rec, &mut busy_rounds).await?,
                    Phase::Leasing => {
                        self.restore_pinned(&rec)?;
                        if let Some(done) = self.lease_step(&rec).await? {
                            return Ok::<_, CoordinatorError>(done);
                        }
                    }
                    Phase::Accepted | Phase::Failed { .. } => return Ok(rec),
                }
            }
        }
        .instrument(span)
        .await;
        self.forget_changes(&id);
        Ok(self.finished(done?))
    }

    /// What follows a task's end, whoever saw it: returns its final record.
    fn finished(&self, done: TaskRecord) -> TaskRecord {
        let id = done.spec.task_id;
        // Leases inherited from before a restart are settled with the task.
        self.inner
            .inherited
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|c| !done.leases.iter().any(|l| l.lease_cid == *c));
        // The task is over: its pinned snapshot need not survive a restart any more (the
        // in-memory copy still serves late fetches until evicted).
        if let Some(cid) = done.pinned
            && let Err(e) = self.inner.tasks.remove_snapshot(&id, &cid)
        {
            warn!(task = %id, error = %e, "cannot forget the pinned snapshot");
        }
        done
    }

    /// Puts the task's pinned snapshot back in the blob store from the database when it is
    /// not there (after a restart, or evicted by other snapshots).
    fn restore_pinned(&self, rec: &TaskRecord) -> Result<(), CoordinatorError> {
        let inner = &self.inner;
        let Some(cid) = rec.pinned else {
            return Ok(());
        };
        if inner.blobs.get(&cid).is_some() {
            return Ok(());
        }
        match inner.tasks.snapshot(&rec.spec.task_id, &cid)? {
            Some(s) => {
                info!(task = %rec.spec.task_id, snapshot = %cid, "pinned snapshot restored from the database");
                inner.blobs.put(cid, Arc::new(s.bytes), Some(s.meta));
            }
            None => {
                warn!(task = %rec.spec.task_id, snapshot = %cid, "pinned snapshot missing from the database")
            }
        }
        Ok(())
    }

    /// The providers of `manifest`: from the cache while it is younger than
    /// [`PROVIDER_TTL`], else from a Kademlia lookup (an empty answer is kept only
    /// [`PROVIDER_MISS_TTL`], so a network that is still forming is soon asked again, while
    /// a run of tasks does not walk the DHT for each).
    async fn providers(&self, manifest: Cid) -> Vec<Provider> {
        let fresh = |(at, found): &(Instant, Vec<Provider>)| {
            at.elapsed()
                < if found.is_empty() {
                    PROVIDER_MISS_TTL
                } else {
                    PROVIDER_TTL
                }
        };
        if let Some((_, found)) = self
            .inner
            .providers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&manifest)
            .filter(|entry| fresh(entry))
        {
            return found.clone();
        }
        let opts = LookupOptions {
            limit: None,
            timeout: self.inner.cfg.lookup_timeout,
        };
        let found: Vec<Provider> = match self.inner.net.find_providers(manifest, opts).await {
            Ok(found) => found.into_iter().map(|p| (p.peer_id, p.addrs)).collect(),
            Err(e) => {
                debug!(%manifest, error = %e, "provider lookup failed");
                Vec::new()
            }
        };
        let mut cache = self
            .inner
            .providers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        cache.retain(|_, entry| fresh(entry));
        cache.insert(manifest, (Instant::now(), found.clone()));
        found
    }

    async fn candidates(&self, spec: &TaskSpec) -> Vec<(PeerId, Vec<Multiaddr>)> {
        let net = &self.inner.net;
        let mut out: Vec<(PeerId, Vec<Multiaddr>)> = Vec::new();
        let mut seen = HashSet::new();
        seen.insert(net.local_peer_id());
        for (peer, addrs) in self.providers(spec.manifest_cid).await {
            if seen.insert(peer) {
                out.push((peer, addrs));
            }
        }
        if let Ok(conn) = net.connected_peers().await {
            for p in conn {
                if seen.insert(p) {
                    out.push((p, Vec::new()));
                }
            }
        }
        out
    }

    /// Ranks `bids` by price and their workers' reputation ([`selection::select`]); each
    /// candidate is named by its signer and its index in `bids`.
    fn rank<'a>(
        &self,
        bids: impl Iterator<Item = &'a Signed<Bid>>,
        fanout: usize,
        max_each: u64,
        now: u64,
    ) -> Result<selection::Selection<([u8; 32], usize)>, CoordinatorError> {
        let reputation = &self.inner.reputation;
        let mut cands = Vec::new();
        for (i, bid) in bids.enumerate() {
            let record = reputation.get(&bid.signer.0)?;
            cands.push(Candidate {
                worker: (bid.signer.0, i),
                price: bid.body.price.units,
                score: record.score(),
                ineligible: record.ineligible(now, reputation.policy()),
            });
        }
        Ok(selection::select(cands, fanout, max_each))
    }

    /// The bids of a task's first round from the standing bids alone, when `fanout` of them
    /// are eligible: the chosen ones' uses reserved, chosen first, then the replacements.
    fn standing_choice(
        &self,
        spec: &TaskSpec,
        fanout: usize,
        max_each: u64,
        now: u64,
    ) -> Result<Option<Vec<BidRec>>, CoordinatorError> {
        let inner = &self.inner;
        if inner.cfg.standing_bids <= 1 {
            return Ok(None);
        }
        let usable = inner.standing.usable(Wanted {
            manifest: &spec.manifest_cid,
            rail: spec.rail,
            asset: &spec.budget.asset,
            max_each,
            valid_until: now.saturating_add(STANDING_MARGIN.as_millis() as u64),
        });
        if usable.len() < fanout {
            return Ok(None);
        }
        let sel = self.rank(usable.iter().map(|(_, b, _)| &**b), fanout, max_each, now)?;
        let chosen: Vec<Cid> = sel.chosen.iter().map(|c| usable[c.worker.1].2).collect();
        if chosen.len() < fanout || !inner.standing.reserve(&chosen) {
            return Ok(None);
        }
        let bids = sel
            .chosen
            .iter()
            .map(|c| (c, true))
            .chain(sel.replacements().map(|c| (c, false)))
            .map(|(c, reserved)| {
                let (peer, bid, bid_cid) = &usable[c.worker.1];
                BidRec {
                    peer: peer.to_bytes(),
                    bid: (**bid).clone(),
                    bid_cid: *bid_cid,
                    used: false,
                    reserved,
                    busy: 0,
                    retry_at: 0,
                }
            })
            .collect();
        Ok(Some(bids))
    }

    /// Commits a round's ranked bids with the first leases, then sends those: the primary
    /// alone when its snapshot is to be pinned, else `fanout` at once.
    async fn commit_bids(
        &self,
        id: TaskId,
        bids: Vec<BidRec>,
        passed: Vec<PassedBid>,
        standing: bool,
        now: u64,
    ) -> Result<(), CoordinatorError> {
        let first = self
            .blocking(move |c| {
                c.inner.tasks.update(&id, |r| {
                    r.bids = bids;
                    r.passed = passed;
                    r.standing = standing;
                    r.updated_at = now;
                    if r.bids.is_empty() {
                        r.phase = Phase::Failed {
                            reason: "no usable bids".into(),
                        };
                        return Ok::<_, CoordinatorError>(Vec::new());
                    }
                    r.phase = Phase::Leasing;
                    c.issue_leases(r, leases_wanted(r), now_ms())
                })
            })
            .await?
            .unwrap_or_default();
        self.send_leases(&id, &first).await.map(|_| ())
    }

    /// One bid round: ranks the bids and commits them with the first leases. A round that
    /// leaves fewer bids than the quorum because workers declined for want of a free slot
    /// commits nothing: it waits a backoff (counted in `busy_rounds`) and the driver asks
    /// again, within the task's deadline.
    async fn bid_round(
        &self,
        rec: &TaskRecord,
        busy_rounds: &mut u32,
    ) -> Result<(), CoordinatorError> {
        let spec = &rec.spec;
        let inner = &self.inner;
        let fanout = spec.fanout.max(1) as usize;
        let max_each = selection::per_worker_max(spec.budget.units, fanout);
        // A task's first round leases on standing bids when there are enough; a task that
        // comes back to bidding asks the network.
        if rec.bids.is_empty()
            && rec.leases.is_empty()
            && let Some(bids) = self.standing_choice(spec, fanout, max_each, now_ms())?
        {
            info!(bids = bids.len(), "leasing on standing bids");
            return self
                .commit_bids(spec.task_id, bids, Vec::new(), true, now_ms())
                .await;
        }
        let req = Signed::sign(
            spec.bid_request(max_each, inner.cfg.standing_bids.clamp(1, MAX_BID_USES)),
            &inner.key,
        )?;
        let request_cid = req.cid()?;
        let cands = self.candidates(spec).await;
        info!(candidates = cands.len(), "requesting bids");
        let answers = join_all(cands.into_iter().map(|(peer, addrs)| {
            let req = req.clone();
            async move { (peer, inner.net.request_bid(peer, addrs, req).await) }
        }))
        .await;
        let now = now_ms();
        let mut valid = Vec::new();
        let mut passed = Vec::new();
        let mut full = 0;
        for (peer, answer) in answers {
            match answer {
                Ok(BidResponse::Bid(bid)) => {
                    // The codec verified the bid's signature; it must be the peer's.
                    let signed = public_key_of(&peer).is_ok_and(|k| bid.signer == k);
                    let matches = bid.body.request_cid == request_cid
                        && bid.body.task_id == spec.task_id
                        && bid.body.manifest_cid == spec.manifest_cid
                        && bid.body.rail == spec.rail
                        && bid.body.price.asset == spec.budget.asset
                        && bid.body.expires_at > now;
                    let refused = match (signed, matches) {
                        (true, true) => None,
                        (false, _) => Some("bad_signature: not signed by the responding peer"),
                        (true, false) => Some("mismatch: the bid does not answer the request"),
                    };
                    match refused {
                        None => valid.push((peer, *bid)),
                        Some(reason) => {
                            warn!(%peer, reason, "bid refused");
                            passed.push(PassedBid {
                                peer: peer.to_bytes(),
                                reason: reason.into(),
                            });
                        }
                    }
                }
                Ok(BidResponse::Declined(reason)) => {
                    info!(%peer, ?reason, "bid request declined");
                    full += usize::from(reason == DeclineReason::NoCapacity);
                    if let Ok(k) = public_key_of(&peer)
                        && let Err(e) = inner.reputation.record(&k.0, Outcome::Declined, now)
                    {
                        warn!(error = %e, "cannot record a decline");
                    }
                }
                Err(e) => debug!(%peer, error = %e, "no bid"),
            }
        }
        if full > 0 && valid.len() < spec.quorum.max(1) as usize {
            *busy_rounds += 1;
            let wait = busy::backoff(*busy_rounds);
            if now.saturating_add(wait.as_millis() as u64) < spec.deadline {
                info!(
                    busy = full,
                    bids = valid.len(),
                    ?wait,
                    "workers busy; asking again later"
                );
                inner.backoffs.bid_round();
                tokio::time::sleep(wait).await;
                return Ok(());
            }
        }
        *busy_rounds = 0;
        let sel = self.rank(valid.iter().map(|(_, b)| b), fanout, max_each, now)?;
        for (c, why) in &sel.passed {
            let reason = why.describe();
            info!(peer = %valid[c.worker.1].0, price = c.price, %reason, "bid not chosen");
            passed.push(PassedBid {
                peer: valid[c.worker.1].0.to_bytes(),
                reason,
            });
        }
        let order: Vec<usize> = sel
            .chosen
            .iter()
            .chain(sel.replacements())
            .map(|c| c.worker.1)
            .collect();
        let chosen = sel.chosen.len();
        let mut bids = Vec::new();
        for (rank, i) in order.into_iter().enumerate() {
            let (peer, bid) = &valid[i];
            let bid_cid = bid.cid()?;
            // Standing bids go to the book for the next tasks, less the use this task's
            // lease takes if the bid is chosen.
            let reserved = rank < chosen && bid.body.uses > 1;
            inner
                .standing
                .keep(*peer, bid, bid_cid, u32::from(reserved), now);
            bids.push(BidRec {
                peer: peer.to_bytes(),
                bid_cid,
                bid: bid.clone(),
                used: false,
                reserved,
                busy: 0,
                retry_at: 0,
            });
        }
        info!(bids = bids.len(), chosen, "bids ranked");
        self.commit_bids(spec.task_id, bids, passed, false, now)
            .await
    }

    /// One pass of the leasing phase: expire, decide, pin, lease more, wait. Returns the
    /// final record when the task ends.
    async fn lease_step(&self, rec: &TaskRecord) -> Result<Option<TaskRecord>, CoordinatorError> {
        let inner = &self.inner;
        let id = rec.spec.task_id;
        let notify = self.notify(&id);
        let notified = notify.notified();
        let now = now_ms();

        // 1. Expire leases past their deadline (and the task past its own); nothing is
        // written when nothing expired.
        let due = now >= rec.spec.deadline
            || rec
                .leases
                .iter()
                .any(|l| l.is_open() && l.lease.body.deadline <= now);
        let expired = if !due {
            Vec::new()
        } else {
            inner
                .tasks
                .update(&id, |r| {
                    let mut gone = Vec::new();
                    for l in r.leases.iter_mut() {
                        if l.is_open() && l.lease.body.deadline <= now {
                            l.status = LeaseStatus::Expired;
                            gone.push((l.lease.body.worker, l.lease_cid));
                        }
                    }
                    if now >= r.spec.deadline {
                        r.phase = Phase::Failed {
                            reason: "deadline passed without a quorum".into(),
                        };
                    }
                    Ok::<_, CoordinatorError>(gone)
                })?
                .unwrap_or_default()
        };
        for (w, lease) in expired {
            let inherited = inner
                .inherited
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&lease);
            if inherited {
                info!(worker = %hex::encode(w.0), "lease from before the restart timed out; reassigning, not charged");
            } else {
                info!(worker = %hex::encode(w.0), "lease timed out; reassigning");
                inner.reputation.record(&w.0, Outcome::TimedOut, now)?;
            }
        }

        // 2. Pin the primary's snapshot once its claim is in.
        let fresh;
        let rec = if due {
            fresh = inner
                .tasks
                .get(&id)?
                .ok_or(CoordinatorError::NotFound(id))?;
            &fresh
        } else {
            rec
        };
        if rec.phase.is_terminal() {
            return Ok(Some(rec.clone()));
        }
        let primary_pending = rec.spec.takes_snapshot && !rec.primary_done;
        if primary_pending
            && let Some(first) = rec
                .claims
                .iter()
                .find(|c| c.judgement == ClaimJudgement::Pending)
        {
            self.pin_primary(rec, &first.claim).await?;
            return Ok(None);
        }

        // 3. Decide (usually done already when the claim completing the quorum came in,
        // see `record_claim`; here for validators and resumed tasks).
        let open = rec.leases.iter().filter(|l| l.is_open()).count();
        if let Some(output_cid) = quorum_reached(rec) {
            // 3b. The validators' verdicts, when the task requires some.
            if rec.validators > 0 {
                match self.validate(rec, output_cid).await? {
                    Validation::Agreed => {}
                    Validation::Blocked(reason) => {
                        warn!(%reason, "acceptance blocked by a validator");
                        let r = inner
                            .tasks
                            .update(&id, |r| {
                                r.phase = Phase::Failed { reason };
                                r.updated_at = now_ms();
                                Ok::<_, CoordinatorError>(r.clone())
                            })?
                            .ok_or(CoordinatorError::NotFound(id))?;
                        return Ok(Some(r));
                    }
                    Validation::Pending => {
                        let left = rec.spec.deadline.saturating_sub(now_ms());
                        let wait = Duration::from_millis(left.clamp(1, 500));
                        let _ = tokio::time::timeout(wait, notified).await;
                        return Ok(None);
                    }
                }
            }
            // Judge every claim recorded by now, including any that arrived after the
            // record was read (each claim credited once).
            let (done, judged) = inner
                .tasks
                .update_with(&id, |txn, r| {
                    let judged = self.accept_in(txn, r, output_cid, now)?;
                    Ok::<_, CoordinatorError>((r.clone(), judged))
                })?
                .ok_or(CoordinatorError::NotFound(id))?;
            self.after_acceptance(&done, &judged, now)?;
            return Ok(Some(done));
        }

        // 4. Lease more.
        let want = leases_wanted(rec);
        if want > 0 {
            let sent = self.lease_next(rec, want).await?;
            // Bids that expired unused (the primary took longer than their validity, or
            // this gateway was down) are asked for again rather than given up on; the
            // task's deadline bounds the rounds.
            let now = now_ms();
            // Every bid left is a busy worker's: lease it again once its backoff is over.
            if sent == 0
                && open == 0
                && let Some(at) = busy::next_retry(rec, now)
            {
                debug!(
                    in_ms = at.saturating_sub(now),
                    "workers busy; leasing again later"
                );
                let wait = Duration::from_millis(at.saturating_sub(now).max(1));
                let _ = tokio::time::timeout(wait, notified).await;
                return Ok(None);
            }
            if sent == 0
                && open == 0
                && now < rec.spec.deadline
                && (rec.standing
                    || rec
                        .bids
                        .iter()
                        .any(|b| !b.used && b.bid.body.expires_at <= now))
            {
                info!("bids expired unused or standing bids spent; asking for bids again");
                inner.tasks.update(&id, |r| {
                    r.phase = Phase::Bidding;
                    r.updated_at = now;
                    Ok::<_, CoordinatorError>(())
                })?;
                return Ok(None);
            }
            if sent == 0 && open == 0 {
                let r = inner
                    .tasks
                    .update(&id, |r| {
                        r.phase = Phase::Failed {
                            reason: "no bidders left to lease".into(),
                        };
                        Ok::<_, CoordinatorError>(r.clone())
                    })?
                    .ok_or(CoordinatorError::NotFound(id))?;
                warn!("no bidders left; task failed");
                return Ok(Some(r));
            }
            if sent > 0 {
                return Ok(None);
            }
        }

        // 5. Wait for a claim, the next lease deadline, the end of a busy worker's backoff
        // (when a lease is still wanted) or the task deadline.
        let retry = (want > 0)
            .then(|| busy::next_retry(rec, now_ms()))
            .flatten();
        let next = rec
            .leases
            .iter()
            .filter(|l| l.is_open())
            .map(|l| l.lease.body.deadline)
            .chain(retry)
            .chain([rec.spec.deadline])
            .min()
            .unwrap_or(rec.spec.deadline);
        let wait = Duration::from_millis(next.saturating_sub(now_ms()).clamp(1, 1000));
        let _ = tokio::time::timeout(wait, notified).await;
        Ok(None)
    }

    async fn pin_primary(
        &self,
        rec: &TaskRecord,
        claim: &Signed<Claim>,
    ) -> Result<(), CoordinatorError> {
        let inner = &self.inner;
        let id = rec.spec.task_id;
        let c = &claim.body;
        let mut usable = true;
        if let (Some(cid), Some(meta)) = (c.snapshot_cid, &c.snapshot) {
            let peer = rec
                .leases
                .iter()
                .find(|l| Some(l.lease_cid) == Some(c.lease_cid))
                .and_then(|l| peer_from(&l.peer));
            let fetched = match peer {
                // A peer not connected (e.g. after this gateway restarted) is dialled at
                // the addresses of its signed record (`NetHandle::request`).
                Some(p) => blobs::fetch(&inner.net, p, Vec::new(), cid).await.ok(),
                None => None,
            };
            match fetched {
                Some((bytes, _)) if plausible(&rec.spec.input, meta, bytes.len()) => {
                    // Committed before the leases that name it go out.
                    let snap = PinnedSnapshot {
                        bytes,
                        meta: meta.clone(),
                    };
                    inner.tasks.put_snapshot(&id, &cid, &snap)?;
                    inner.blobs.put(cid, Arc::new(snap.bytes), Some(snap.meta));
                    info!(snapshot = %cid, "primary snapshot pinned");
                }
                _ => {
                    warn!(snapshot = %cid, "primary snapshot unavailable or implausible");
                    usable = false;
                }
            }
        }
        inner.tasks.update(&id, |r| {
            if usable {
                r.primary_done = true;
                r.pinned = c.snapshot_cid;
            } else if let Some(x) = r
                .claims
                .iter_mut()
                .find(|x| x.claim.body.lease_cid == c.lease_cid)
            {
                x.judgement = ClaimJudgement::Unusable;
            }
            Ok::<_, CoordinatorError>(())
        })?;
        Ok(())
    }

    /// Signs leases for up to `want` unused, unexpired bids of workers not already leased
    /// for the task, and records them in `r` (the caller commits `r` before sending them).
    fn issue_leases(
        &self,
        r: &mut TaskRecord,
        want: usize,
        now: u64,
    ) -> Result<Vec<LeaseRec>, CoordinatorError> {
        let lease_deadline = now
            .saturating_add(self.inner.cfg.lease_timeout.as_millis() as u64)
            .min(r.spec.deadline);
        let busy: HashSet<[u8; 32]> = r
            .leases
            .iter()
            .filter(|l| l.is_open() || l.status == LeaseStatus::Claimed)
            .map(|l| l.lease.body.worker.0)
            .collect();
        let mut out = Vec::new();
        let pinned = r.pinned;
        for i in 0..r.bids.len() {
            if out.len() >= want {
                break;
            }
            let b = &r.bids[i];
            if b.used
                || busy.contains(&b.bid.signer.0)
                || b.bid.body.expires_at <= now
                || b.retry_at > now
            {
                continue;
            }
            let lease = Signed::sign(
                Lease {
                    v: MESSAGE_VERSION,
                    task_id: r.spec.task_id,
                    worker: b.bid.signer,
                    bid_cid: b.bid_cid,
                    manifest_cid: r.spec.manifest_cid,
                    input: r.spec.input.clone(),
                    snapshot_cid: pinned,
                    price: b.bid.body.price.clone(),
                    deadline: lease_deadline,
                    fencing_token: r.next_token,
                },
                &self.inner.key,
            )?;
            r.next_token += 1;
            let reserve = b.bid.body.uses > 1 && !b.reserved;
            if reserve {
                // A replacement on a standing bid: its use is taken now (if the book has
                // none left, the worker refuses the lease and the next bid is tried).
                self.inner.standing.reserve(&[b.bid_cid]);
            }
            let rec = LeaseRec {
                peer: b.peer.clone(),
                lease_cid: lease.cid()?,
                lease,
                status: LeaseStatus::Sent,
            };
            r.bids[i].used = true;
            // Once: a lease refused for want of a free slot is sent again on this use.
            r.bids[i].reserved |= reserve;
            out.push(rec.clone());
            r.leases.push(rec);
        }
        r.updated_at = now;
        Ok(out)
    }

    /// Leases up to `want` unused bids (persisting each lease before sending); returns how
    /// many were sent.
    async fn lease_next(&self, rec: &TaskRecord, want: usize) -> Result<usize, CoordinatorError> {
        let id = rec.spec.task_id;
        let now = now_ms();
        let to_send = self
            .inner
            .tasks
            .update(&id, |r| self.issue_leases(r, want, now))?
            .unwrap_or_default();
        self.send_leases(&id, &to_send).await?;
        Ok(to_send.len())
    }

    /// Sends leases already committed, in parallel, records each inline claim as it comes
    /// (exactly as one received on `/d402/claim/1`), and records the refusals. Returns the
    /// task's final record when its inline claims decided it and every lease was accepted
    /// (nothing else written since).
    async fn send_leases(
        &self,
        id: &TaskId,
        to_send: &[LeaseRec],
    ) -> Result<Option<TaskRecord>, CoordinatorError> {
        let inner = &self.inner;
        let mut pending: FuturesUnordered<_> = to_send
            .iter()
            .map(|l| async move {
                let ack = match peer_from(&l.peer) {
                    Some(p) => {
                        inner
                            .net
                            .request_lease(p, Vec::new(), l.lease.clone())
                            .await
                    }
                    None => Err(crate::net::RrError::Dial("bad peer id".into())),
                };
                (l, ack)
            })
            .collect();
        // Inline claims are recorded as they come, those that came together in one commit
        // (off the async workers; `on_claims` logs refusals).
        let mut results = Vec::with_capacity(to_send.len());
        let mut decided = None;
        while let Some(first) = pending.next().await {
            let mut ready = vec![first];
            let until = tokio::time::Instant::now() + CLAIM_BATCH_WAIT;
            while let Ok(Some(more)) = tokio::time::timeout_at(until, pending.next()).await {
                ready.push(more);
            }
            let claims: Vec<(PeerId, Signed<Claim>)> = ready
                .iter()
                .filter_map(|(l, ack)| match ack {
                    Ok(LeaseAck::Claimed(c)) => Some((peer_from(&l.peer)?, (**c).clone())),
                    _ => None,
                })
                .collect();
            if !claims.is_empty() {
                // Kept only if this batch decided the task: a later batch changes the
                // record (the driver reads it again then).
                let recorded = if inner.joint {
                    Some(self.record_and_ack_async(claims).await)
                } else {
                    // The outcomes are written apart from the record, each durably.
                    self.blocking(move |c| Ok(c.record_and_ack(claims)))
                        .await
                        .ok()
                };
                decided = recorded.and_then(|(_, done)| done);
            }
            results.extend(ready.into_iter().map(|(l, ack)| (l.lease_cid, ack)));
        }
        let mut accepted = 0;
        let statuses: Vec<(Cid, LeaseStatus, bool)> = results
            .into_iter()
            .map(|(cid, ack)| {
                // A worker that refused for want of a free slot still holds its bid (it is
                // busy, not gone); any other refusal or a failed delivery drops it.
                let full = matches!(&ack, Ok(LeaseAck::Refused { reason }) if reason.starts_with("no_capacity"));
                if !full
                    && !matches!(ack, Ok(LeaseAck::Accepted | LeaseAck::Claimed(_)))
                    && let Some(l) = to_send.iter().find(|l| l.lease_cid == cid)
                    && inner.standing.forget(&l.lease.body.bid_cid)
                {
                    debug!(lease = %cid, "standing bid dropped");
                }
                let s = match ack {
                    Ok(LeaseAck::Accepted | LeaseAck::Claimed(_)) => {
                        accepted += 1;
                        LeaseStatus::Accepted
                    }
                    Ok(LeaseAck::Refused { reason }) => {
                        info!(lease = %cid, %reason, "lease refused");
                        LeaseStatus::Refused
                    }
                    Err(e) => {
                        info!(lease = %cid, error = %e, "lease not delivered");
                        LeaseStatus::Refused
                    }
                };
                (cid, s, full)
            })
            .collect();
        // `Sent` and `Accepted` are both open: only refusals need writing (the next pass
        // replaces those leases), so an all-accepted round costs no commit.
        if statuses.iter().any(|(_, s, _)| *s != LeaseStatus::Accepted) {
            let now = now_ms();
            let full = statuses.iter().filter(|(_, _, full)| *full).count();
            inner.backoffs.lease(full as u64);
            inner.tasks.update(id, |r| {
                for (cid, s, full) in &statuses {
                    let Some(l) = r.leases.iter_mut().find(|l| l.lease_cid == *cid) else {
                        continue;
                    };
                    if l.status != LeaseStatus::Sent {
                        continue;
                    }
                    l.status = *s;
                    // A busy worker's bid is leased again after a backoff (the task's
                    // deadline bounds the attempts).
                    let bid_cid = l.lease.body.bid_cid;
                    if *full && let Some(b) = r.bids.iter_mut().find(|b| b.bid_cid == bid_cid) {
                        b.busy = b.busy.saturating_add(1);
                        b.retry_at = now + busy::backoff(b.busy).as_millis() as u64;
                        b.used = false;
                    }
                }
                Ok::<_, CoordinatorError>(())
            })?;
            // The driver replaces refused leases: wake it now rather than at its timer.
            self.notify(id).notify_one();
            debug!(sent = to_send.len(), accepted, "leases sent");
            return Ok(None);
        }
        debug!(sent = to_send.len(), accepted, "leases sent");
        Ok(decided)
    }

    /// Validators to ask: `validator_peers` first, then those announced under the
    /// validator key; never this node nor a worker leased for the task.
    async fn validator_candidates(&self, rec: &TaskRecord) -> Vec<(PeerId, Vec<Multiaddr>)> {
        let net = &self.inner.net;
        let mut seen: HashSet<PeerId> = rec
            .leases
            .iter()
            .filter_map(|l| peer_from(&l.peer))
            .collect();
        seen.insert(net.local_peer_id());
        let mut out = Vec::new();
        for (p, a) in &self.inner.cfg.validator_peers {
            if seen.insert(*p) {
                out.push((*p, a.clone()));
            }
        }
        let opts = LookupOptions {
            limit: None,
            timeout: self.inner.cfg.lookup_timeout,
        };
        if let Ok(found) = net.find_providers(validator_key(), opts).await {
            for p in found {
                if seen.insert(p.peer_id) {
                    out.push((p.peer_id, p.addrs));
                }
            }
        }
        out
    }

    /// Asks validators for verdicts on the first claim agreeing with `output_cid` until the
    /// task's required number agree; every verdict is committed to the task before it is
    /// acted on. Any `disagree` blocks acceptance; `unable` counts neither way.
    async fn validate(
        &self,
        rec: &TaskRecord,
        output_cid: Cid,
    ) -> Result<Validation, CoordinatorError> {
        let inner = &self.inner;
        let id = rec.spec.task_id;
        let need = rec.validators as usize;
        let Some(claim) = rec
            .claims
            .iter()
            .find(|c| {
                c.judgement != ClaimJudgement::Unusable && c.claim.body.output_cid == output_cid
            })
            .map(|c| c.claim.clone())
        else {
            return Ok(Validation::Pending);
        };
        let claim_cid = claim.cid()?;
        let Some(lease) = rec
            .leases
            .iter()
            .find(|l| l.lease_cid == claim.body.lease_cid)
            .map(|l| l.lease.clone())
        else {
            return Ok(Validation::Pending);
        };
        let judged = |r: &TaskRecord| tally(&r.verdicts, &claim_cid, need);
        if let Some(done) = judged(rec) {
            return Ok(done);
        }
        let asked: HashSet<Vec<u8>> = rec
            .verdicts
            .iter()
            .filter(|v| v.verdict.body.claim_cid == claim_cid)
            .map(|v| v.peer.clone())
            .collect();
        let agreeing = rec
            .verdicts
            .iter()
            .filter(|v| v.verdict.body.claim_cid == claim_cid)
            .filter(|v| v.verdict.body.outcome == VerdictOutcome::Agree)
            .count();
        let cands: Vec<_> = self
            .validator_candidates(rec)
            .await
            .into_iter()
            .filter(|(p, _)| !asked.contains(&p.to_bytes()))
            .take(need.saturating_sub(agreeing))
            .collect();
        if cands.is_empty() {
            debug!("no validator left to ask yet");
            return Ok(Validation::Pending);
        }
        info!(validators = cands.len(), claim = %claim_cid, "asking for verdicts");
        let request = VerdictRequest { lease, claim };
        let answers = join_all(cands.into_iter().map(|(peer, addrs)| {
            let request = request.clone();
            async move { (peer, inner.net.request_verdict(peer, addrs, request).await) }
        }))
        .await;
        let mut fresh = Vec::new();
        for (peer, answer) in answers {
            match answer {
                Ok(VerdictResponse::Verdict(v)) => {
                    let ok = public_key_of(&peer)
                        .ok()
                        .filter(|k| v.verify_from(k).is_ok())
                        .is_some()
                        && v.body.task_id == id
                        && v.body.claim_cid == claim_cid
                        && v.body.output_cid == output_cid;
                    if ok {
                        info!(%peer, outcome = ?v.body.outcome, "verdict received");
                        fresh.push(VerdictRec {
                            peer: peer.to_bytes(),
                            verdict: *v,
                        });
                    } else {
                        warn!(%peer, "verdict refused: bad signature or not about this claim");
                    }
                }
                Ok(VerdictResponse::Busy) => info!(%peer, "validator busy"),
                Ok(VerdictResponse::Refused { reason }) => {
                    info!(%peer, %reason, "validator refused the request")
                }
                Err(e) => info!(%peer, error = %e, "no verdict"),
            }
        }
        if fresh.is_empty() {
            return Ok(Validation::Pending);
        }
        let r = inner
            .tasks
            .update(&id, |r| {
                for v in fresh {
                    if !r
                        .verdicts
                        .iter()
                        .any(|x| x.peer == v.peer && x.verdict.body.claim_cid == claim_cid)
                    {
                        r.verdicts.push(v);
                    }
                }
                r.updated_at = now_ms();
                Ok::<_, CoordinatorError>(r.clone())
            })?
            .ok_or(CoordinatorError::NotFound(id))?;
        Ok(judged(&r).unwrap_or(Validation::Pending))
    }

    /// Accepts `output_cid` in `r` inside `txn`: every claim is judged against it, the task
    /// is `Accepted`, and the outcomes of the claims judged now (each claim is credited
    /// once) are recorded in the same transaction when the tables share a database.
    /// Returns those claims' workers and judgements.
    fn accept_in(
        &self,
        txn: &redb::WriteTransaction,
        r: &mut TaskRecord,
        output_cid: Cid,
        now: u64,
    ) -> Result<Vec<([u8; 32], ClaimJudgement)>, CoordinatorError> {
        let mut judged = Vec::new();
        for c in r.claims.iter_mut() {
            let judgement = if c.claim.body.output_cid == output_cid {
                ClaimJudgement::Accepted
            } else {
                ClaimJudgement::Rejected
            };
            if c.judgement == ClaimJudgement::Pending {
                judged.push((c.claim.signer.0, judgement));
            }
            c.judgement = judgement;
        }
        r.accepted_output = Some(output_cid);
        r.phase = Phase::Accepted;
        r.updated_at = now;
        if let Some(hook) = self.inner.accept_hook.get() {
            hook(txn, r)?;
        }
        if self.inner.joint {
            for (w, judgement) in &judged {
                self.inner
                    .reputation
                    .record_in(txn, w, outcome_of(*judgement), now)?;
            }
        }
        Ok(judged)
    }

    /// After [`Coordinator::accept_in`] committed: logs, and records the outcomes when the
    /// reputation table is in another database.
    fn after_acceptance(
        &self,
        done: &TaskRecord,
        judged: &[([u8; 32], ClaimJudgement)],
        now: u64,
    ) -> Result<(), CoordinatorError> {
        for (w, judgement) in judged {
            if *judgement == ClaimJudgement::Rejected {
                info!(worker = %hex::encode(w), "claim rejected: disagrees with the quorum");
            }
            if !self.inner.joint {
                self.inner
                    .reputation
                    .record(w, outcome_of(*judgement), now)?;
            }
        }
        let agreeing = done
            .claims
            .iter()
            .filter(|c| c.judgement == ClaimJudgement::Accepted)
            .count();
        let output = done
            .accepted_output
            .map(|c| c.to_string())
            .unwrap_or_default();
        info!(task = %done.spec.task_id, %output, agreeing, dissenting = done.claims.len() - agreeing, "task accepted");
        Ok(())
    }

    /// Handles a claim from `peer`: checks it against the lease it names and records it
    /// (committed before the acknowledgement).
    pub fn on_claim(&self, peer: PeerId, claim: Signed<Claim>) -> ClaimAck {
        self.on_claims(vec![(peer, claim)])
            .pop()
            .unwrap_or(ClaimAck::Refused {
                reason: ClaimRefusal::Internal.code().into(),
            })
    }

    /// Handles claims that arrived together (all of one task, e.g. the inline claims of one
    /// round of leases): each is checked as by [`Coordinator::on_claim`], and those accepted
    /// are recorded in one commit, before any acknowledgement. Answers in order.
    pub fn on_claims(&self, claims: Vec<(PeerId, Signed<Claim>)>) -> Vec<ClaimAck> {
        self.record_and_ack(claims).0
    }

    /// [`Coordinator::on_claims`], also returning the task's record when these claims
    /// decided it.
    fn record_and_ack(
        &self,
        claims: Vec<(PeerId, Signed<Claim>)>,
    ) -> (Vec<ClaimAck>, Option<TaskRecord>) {
        let recorded = self.record_claims(&claims);
        self.acks(&claims, recorded)
    }

    /// [`Coordinator::record_and_ack`] from an async task, when the task's record and the
    /// outcomes share the database (nothing else to write): the commit is queued for the
    /// database's commit thread instead of holding a thread of the blocking pool.
    async fn record_and_ack_async(
        &self,
        claims: Vec<(PeerId, Signed<Claim>)>,
    ) -> (Vec<ClaimAck>, Option<TaskRecord>) {
        let recorded = match self.claims_write(&claims) {
            Some(w) => {
                let written = self
                    .inner
                    .tasks
                    .update_combined_async(w.task_id, w.apply)
                    .await;
                self.claims_recorded(&claims, w.checked, w.now, written)
            }
            None => (Vec::new(), None),
        };
        self.acks(&claims, recorded)
    }

    /// The acknowledgements of `claims`, recorded as `recorded` says (and their task's
    /// waiters woken when one was).
    fn acks(
        &self,
        claims: &[(PeerId, Signed<Claim>)],
        recorded: ClaimsRecorded,
    ) -> (Vec<ClaimAck>, Option<TaskRecord>) {
        let (results, decided) = recorded;
        let mut acks = Vec::with_capacity(claims.len());
        let mut woken = false;
        for ((peer, claim), result) in claims.iter().zip(results) {
            match result {
                Ok(()) => {
                    if !woken {
                        self.notify(&claim.body.task_id).notify_one();
                        woken = true;
                    }
                    acks.push(ClaimAck::Received);
                }
                Err(r) => {
                    info!(%peer, task = %claim.body.task_id, reason = r.code(), "claim refused");
                    acks.push(r.ack());
                }
            }
        }
        (acks, decided)
    }

    /// Checks `claim` from `peer` against `r` and records it there (inside `txn`, with its
    /// reputation row when it is judged on arrival). Returns its judgement.
    fn apply_claim(
        &self,
        txn: &redb::WriteTransaction,
        r: &mut TaskRecord,
        claim: &Signed<Claim>,
        now: u64,
    ) -> Result<ClaimJudgement, ClaimRefusal> {
        let c = &claim.body;
        let accepted = r.accepted_output;
        let phase = r.phase.clone();
        let li = r
            .leases
            .iter()
            .position(|l| l.lease_cid == c.lease_cid)
            .ok_or(ClaimRefusal::UnknownLease)?;
        let lease = &r.leases[li];
        if lease.lease.body.worker != claim.signer {
            return Err(ClaimRefusal::BadSignature);
        }
        if lease.lease.body.fencing_token != c.fencing_token {
            return Err(ClaimRefusal::StaleFencingToken);
        }
        match lease.status {
            LeaseStatus::Claimed => return Err(ClaimRefusal::Duplicate),
            LeaseStatus::Expired | LeaseStatus::Refused => {
                return Err(ClaimRefusal::StaleFencingToken);
            }
            LeaseStatus::Sent | LeaseStatus::Accepted => {}
        }
        if lease.lease.body.deadline <= now {
            return Err(ClaimRefusal::LeaseExpired);
        }
        if lease.lease.body.snapshot_cid.is_some()
            && c.snapshot_cid != lease.lease.body.snapshot_cid
        {
            return Err(ClaimRefusal::WrongSnapshot);
        }
        if matches!(phase, Phase::Failed { .. }) {
            return Err(ClaimRefusal::TaskClosed);
        }
        let judgement = match accepted {
            Some(out) if out == c.output_cid => ClaimJudgement::Accepted,
            Some(_) => ClaimJudgement::Rejected,
            None => ClaimJudgement::Pending,
        };
        // A claim judged on arrival (the task was decided already): its outcome commits
        // with it when the tables share a database (written first: a failure leaves `r`
        // as it was).
        if self.inner.joint && judgement != ClaimJudgement::Pending {
            self.inner
                .reputation
                .record_in(txn, &claim.signer.0, outcome_of(judgement), now)?;
        }
        r.leases[li].status = LeaseStatus::Claimed;
        r.claims.push(ClaimRec::new(claim.clone(), judgement));
        r.updated_at = now;
        Ok(judgement)
    }

    /// Records claims of one task in one transaction (combined with other tasks' writes
    /// under load: [`Tasks::update_combined`]); one result per claim, and the task's record
    /// if they decided it. Nothing is written when every claim is refused.
    fn record_claims(&self, claims: &[(PeerId, Signed<Claim>)]) -> ClaimsRecorded {
        let Some(w) = self.claims_write(claims) else {
            return (Vec::new(), None);
        };
        let written = self.inner.tasks.update_combined(w.task_id, w.apply);
        self.claims_recorded(claims, w.checked, w.now, written)
    }

    /// The commit of [`Coordinator::record_claims`], to be made by the caller (`None`: no
    /// claims).
    fn claims_write(
        &self,
        claims: &[(PeerId, Signed<Claim>)],
    ) -> Option<ClaimsWrite<impl ApplyClaims>> {
        let now = now_ms();
        // The codec verified each claim's signature when it decoded it (on `/d402/claim/1`
        // or inline in a lease's answer); it must be the sending peer's.
        let checked: Vec<Result<ClaimJudgement, ClaimRefusal>> = claims
            .iter()
            .map(|(peer, claim)| match public_key_of(peer) {
                Ok(from) if claim.signer == from => Ok(ClaimJudgement::Pending),
                _ => Err(ClaimRefusal::BadSignature),
            })
            .collect();
        let task_id = claims.first().map(|(_, c)| c.body.task_id)?;
        let me = self.clone();
        let owned: Arc<[Signed<Claim>]> = claims.iter().map(|(_, c)| c.clone()).collect();
        let pre = checked.clone();
        Some(ClaimsWrite {
            task_id,
            checked,
            now,
            apply: move |txn: &redb::WriteTransaction, r: &mut TaskRecord| {
                me.apply_claims(txn, r, &owned, pre.clone(), now)
            },
        })
    }

    /// What became of `claims` once their commit (`written`) returned.
    fn claims_recorded(
        &self,
        claims: &[(PeerId, Signed<Claim>)],
        checked: Vec<Result<ClaimJudgement, ClaimRefusal>>,
        now: u64,
        written: Result<Option<Applied>, Aborted>,
    ) -> ClaimsRecorded {
        let inner = &self.inner;
        let task_id = match claims.first() {
            Some((_, c)) => c.body.task_id,
            None => return (Vec::new(), None),
        };
        let (results, decided) = match written {
            Ok(Some(done)) => done,
            Ok(None) => {
                let refused = checked
                    .into_iter()
                    .map(|r| r.and(Err(ClaimRefusal::UnknownTask)))
                    .collect();
                return (refused, None);
            }
            Err(Aborted {
                reason, results, ..
            }) => {
                // Each claim keeps its own refusal; those that would have been accepted
                // share the transaction's failure (nothing was written).
                let results = results.unwrap_or(checked);
                return (
                    results.into_iter().map(|r| r.and(Err(reason))).collect(),
                    None,
                );
            }
        };
        if let Some((done, judged)) = &decided
            && let Err(e) = self.after_acceptance(done, judged, now)
        {
            warn!(task = %task_id, error = %e, "cannot record the outcomes");
        }
        let results = results
            .into_iter()
            .zip(claims)
            .map(|(result, (peer, claim))| {
                let judgement = result?;
                if judgement == ClaimJudgement::Rejected {
                    info!(%peer, "late claim rejected: disagrees with the accepted result");
                }
                if !inner.joint && judgement != ClaimJudgement::Pending {
                    inner
                        .reputation
                        .record(&claim.signer.0, outcome_of(judgement), now)?;
                }
                Ok(())
            })
            .collect();
        (results, decided.map(|(done, _)| done))
    }

    /// The write of [`Coordinator::record_claims`] on the task's record `r` inside `txn`:
    /// applies each claim whose check `results` passed, and decides the task when they
    /// complete its quorum. Runs again from the start if its combined transaction is
    /// dropped, so everything it computes is in what it returns.
    fn apply_claims(
        &self,
        txn: &redb::WriteTransaction,
        r: &mut TaskRecord,
        claims: &[Signed<Claim>],
        mut results: Vec<Result<ClaimJudgement, ClaimRefusal>>,
        now: u64,
    ) -> Result<Applied, Aborted> {
        let task_id = r.spec.task_id;
        let was_accepted = r.phase == Phase::Accepted;
        let mut any = false;
        for (claim, result) in claims.iter().zip(results.iter_mut()) {
            if result.is_err() {
                continue;
            }
            if claim.body.task_id != task_id {
                *result = Err(ClaimRefusal::UnknownTask);
                continue;
            }
            *result = self.apply_claim(txn, r, claim, now);
            any |= result.is_ok();
        }
        let write_failed = results
            .iter()
            .any(|r| matches!(r, Err(ClaimRefusal::Internal)));
        if write_failed || !any {
            // Nothing to write: every claim was refused before its first write (the
            // transaction is untouched). Or a claim's write failed (its reputation row): the
            // transaction may hold part of it and must not commit.
            return Err(Aborted {
                reason: if write_failed {
                    ClaimRefusal::Internal
                } else {
                    ClaimRefusal::Duplicate
                },
                results: Some(results),
                untouched: !write_failed,
            });
        }
        // The claim that completes the quorum decides the task in the same commit, unless a
        // step stands between (the primary's snapshot to pin and check, validators to ask):
        // those are the driver's.
        let pin_pending = r.spec.takes_snapshot && !r.primary_done;
        let mut decided = None;
        if r.phase == Phase::Leasing
            && r.validators == 0
            && !pin_pending
            && let Some(output_cid) = quorum_reached(r)
        {
            match self.accept_in(txn, r, output_cid, now) {
                Ok(judged) => decided = Some((r.clone(), judged)),
                Err(e) => {
                    warn!(task = %task_id, error = %e, "cannot decide the task");
                    return Err(Aborted {
                        reason: ClaimRefusal::Internal,
                        results: Some(results),
                        untouched: false,
                    });
                }
            }
        } else if was_accepted
            && !r.leases.iter().any(|l| l.is_open())
            && let Some(hook) = self.inner.accept_hook.get()
        {
            // The last open lease of an accepted task brought its claim: the task is
            // complete, and the hook settles it in this commit (it waited for this claim,
            // which may be paid too).
            if let Err(e) = hook(txn, r) {
                warn!(task = %task_id, error = %e, "the late claim is not recorded");
                return Err(Aborted {
                    reason: ClaimRefusal::Internal,
                    results: Some(results),
                    untouched: false,
                });
            }
        }
        Ok((results, decided))
    }
}

/// What [`Coordinator::apply_claims`] computed: each claim's judgement or refusal, and the
/// task's record with the judgements it made when the claims decided it.
/// Each claim's outcome, and the task's record when they decided it.
type ClaimsRecorded = (Vec<Result<(), ClaimRefusal>>, Option<TaskRecord>);

/// What [`ClaimsWrite::apply`] is: [`Coordinator::apply_claims`] on the task's record.
trait ApplyClaims:
    FnMut(&redb::WriteTransaction, &mut TaskRecord) -> Result<Applied, Aborted> + Send + 'static
{
}

impl<F> ApplyClaims for F where
    F: FnMut(&redb::WriteTransaction, &mut TaskRecord) -> Result<Applied, Aborted> + Send + 'static
{
}

/// The commit of a batch of claims ([`Coordinator::claims_write`]): `apply` on the task's
/// record, in a combined write.
struct ClaimsWrite<F> {
    task_id: TaskId,
    /// Each claim's check before the record is read.
    checked: Vec<Result<ClaimJudgement, ClaimRefusal>>,
    now: u64,
    apply: F,
}

type Applied = (
    Vec<Result<ClaimJudgement, ClaimRefusal>>,
    Option<(TaskRecord, Vec<([u8; 32], ClaimJudgement)>)>,
);

/// Why [`Coordinator::apply_claims`] wrote nothing: the refusal the claims not refused on
/// their own share, and each claim's result when it got that far.
#[derive(Debug)]
struct Aborted {
    reason: ClaimRefusal,
    results: Option<Vec<Result<ClaimJudgement, ClaimRefusal>>>,
    /// Every claim was refused before anything was written: the writes combined with this
    /// one commit without it.
    untouched: bool,
}

impl From<StateError> for Aborted {
    fn from(e: StateError) -> Self {
        Aborted {
            reason: e.into(),
            results: None,
            untouched: false,
        }
    }
}

impl CombinedError for Aborted {
    fn untouched(&self) -> bool {
        self.untouched
    }
}

/// The output CID a quorum of `r`'s usable claims agrees on, if any.
fn quorum_reached(r: &TaskRecord) -> Option<Cid> {
    let votes: Vec<Vote<[u8; 32]>> = r
        .claims
        .iter()
        .filter(|c| c.judgement != ClaimJudgement::Unusable)
        .map(|c| Vote {
            worker: c.claim.signer.0,
            output_cid: c.claim.body.output_cid,
            snapshot_cid: c.claim.body.snapshot_cid,
        })
        .collect();
    let open = r.leases.iter().filter(|l| l.is_open()).count();
    match quorum::decide(&votes, r.spec.quorum as usize, open) {
        Decision::Accepted { output_cid, .. } => Some(output_cid),
        _ => None,
    }
}

/// How many more leases a task in [`Phase::Leasing`] wants out: the primary alone first
/// when its snapshot is to be pinned, then up to `max(fanout, quorum)` open leases and
/// usable claims together.
fn leases_wanted(r: &TaskRecord) -> usize {
    let open = r.leases.iter().filter(|l| l.is_open()).count();
    if r.spec.takes_snapshot && !r.primary_done {
        return usize::from(open == 0);
    }
    let claims = r
        .claims
        .iter()
        .filter(|c| c.judgement != ClaimJudgement::Unusable)
        .count();
    (r.spec.fanout as usize)
        .max(r.spec.quorum as usize)
        .saturating_sub(open + claims)
}

/// The reputation outcome of a claim's judgement (accepted or rejected).
fn outcome_of(judgement: ClaimJudgement) -> Outcome {
    if judgement == ClaimJudgement::Accepted {
        Outcome::Accepted
    } else {
        Outcome::Rejected
    }
}

/// Where the validators stand on a task's accepted claim.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Validation {
    /// Enough agreeing verdicts.
    Agreed,
    /// A validator disagreed: the task is not accepted (the reason says who and what).
    Blocked(String),
    /// More verdicts are needed.
    Pending,
}

/// Judges the recorded verdicts on `claim_cid`: any `disagree` blocks, `need` agreeing
/// accept, otherwise `None` (undecided).
fn tally(verdicts: &[VerdictRec], claim_cid: &Cid, need: usize) -> Option<Validation> {
    let mut agreeing = 0;
    for v in verdicts
        .iter()
        .filter(|v| &v.verdict.body.claim_cid == claim_cid)
    {
        match &v.verdict.body.outcome {
            VerdictOutcome::Agree => agreeing += 1,
            VerdictOutcome::Disagree { recomputed } => {
                let who = peer_from(&v.peer)
                    .map(|p| p.to_string())
                    .unwrap_or_default();
                return Some(Validation::Blocked(format!(
                    "validator {who} disagreed: it recomputed {recomputed}, the quorum claimed {}",
                    v.verdict.body.output_cid
                )));
            }
            VerdictOutcome::Unable { .. } => {}
        }
    }
    (agreeing >= need).then_some(Validation::Agreed)
}

/// Whether a snapshot is plausible for the task: its length matches, its status is a
/// success, and its final URL has the host of the input URL (when the input names one).
pub fn plausible(input: &[u8], meta: &d402_protocol::messages::SnapshotMeta, len: usize) -> bool {
    if meta.len != len as u64 || !(200..400).contains(&meta.status) {
        return false;
    }
    let host_of = |u: &str| {
        u.split_once("://").map(|(_, rest)| {
            rest.split(['/', '?', '#'])
                .next()
                .unwrap_or("")
                .to_ascii_lowercase()
        })
    };
    match d402_runtime::runner::input_url(input) {
        Ok(url) => host_of(&url) == host_of(&meta.final_url),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wakers_sweep_entries_nobody_holds_and_keep_held_ones() {
        let mut w = Wakers::default();
        let held: Vec<_> = (0..10u8).map(|i| w.get(&TaskId([i; 16]))).collect();
        for i in 0..10_000u32 {
            let mut id = [0xff; 16];
            id[..4].copy_from_slice(&i.to_be_bytes());
            drop(w.get(&TaskId(id)));
            assert!(w.map.len() <= 2 * WAKERS_SWEEP_MIN, "{}", w.map.len());
        }
        for (i, n) in held.iter().enumerate() {
            assert!(Arc::ptr_eq(n, &w.get(&TaskId([i as u8; 16]))));
        }
    }
}
