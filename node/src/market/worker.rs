//! The worker side of the market: bids, leases, runs, claims.
//!
//! - A bid request is answered with a signed bid only for an offered manifest CID, a
//!   supported rail, a maximum at or above the floor, a deadline that can be met and a free
//!   execution slot; otherwise with a typed [`DeclineReason`]. Every decline is logged and
//!   counted ([`Worker::declines`]: "why idle").
//! - A lease is accepted only if it is signed by the peer that sent it, names this worker,
//!   carries the CID of a bid this worker issued to that same gateway for that task, matches
//!   the bid (manifest, price) and neither the bid nor the lease has expired, and a slot is
//!   free. The slot is held until the run ends.
//! - The run: when the lease pins a snapshot, it is fetched by CID over `/d402/blob/1` from
//!   the lease's signer (the gateway pins the primary's snapshot and serves it, see
//!   docs/DECISIONS.md "Market") and the Wasm runs on it; otherwise the runtime takes its
//!   own snapshot, which this worker then serves. A run that ends within
//!   [`WorkerConfig::inline_claim_window`] answers the lease itself with the signed claim
//!   ([`LeaseAck::Claimed`], one round trip for lease and claim); a longer run answers
//!   `Accepted` when the window closes and sends the claim on `/d402/claim/1` when done,
//!   retried until the lease's deadline; past it the lease is abandoned. A run that fails
//!   within the window refuses the lease (`run_failed: …`) so that the gateway reassigns it
//!   at once.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use d402_capabilities::{InputSchema, Manifest};
use d402_protocol::{
    Amount, Cid, PublicKey, RailKind, Signed, SigningKey, TaskId, Wallets,
    messages::{
        Bid, BidRequest, BidResponse, Claim, ClaimAck, DeclineReason, Lease, LeaseAck, SnapshotMeta,
    },
    types::MESSAGE_VERSION,
};
use d402_runtime::{GivenSnapshot, Runner};
use libp2p::PeerId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tracing::{Instrument, debug, info, info_span, warn};

use super::{blobs, blobs::BlobStore, now_ms};
use crate::net::{NetHandle, public_key_of};

/// A capability this worker sells.
#[derive(Debug, Clone)]
pub struct OfferedCapability {
    /// The manifest.
    pub manifest: Manifest,
    /// Its CID (what bid requests must name).
    pub manifest_cid: Cid,
    /// The module (checked against the manifest by whoever built this).
    pub wasm: Arc<Vec<u8>>,
    /// The lowest price bid, in smallest units of `asset`.
    pub floor: u64,
    /// The asset the floor is in.
    pub asset: String,
}

/// Faults a worker can be told to commit; only in builds with the `test-faults` feature
/// (integration tests), never in a release binary.
#[cfg(feature = "test-faults")]
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Corrupt every output (a lying worker).
    pub corrupt_output: bool,
    /// Wait this long after a run before claiming.
    pub claim_delay: Duration,
}

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// What it sells.
    pub offers: Vec<OfferedCapability>,
    /// Rails it accepts.
    pub rails: Vec<RailKind>,
    /// Where to pay it, per chain.
    pub payout: Wallets,
    /// Runs at once (execution slots).
    pub max_concurrent: usize,
    /// How long a bid stays valid without a lease.
    pub bid_ttl: Duration,
    /// The most leases one standing bid covers (a gateway asks for a number; it gets at most
    /// this). 1 makes every bid single-use.
    pub max_bid_uses: u32,
    /// The least time before a request's deadline for a bid to be worth making.
    pub min_lead: Duration,
    /// How long the answer to a lease waits for the run: a run done by then answers with
    /// its claim ([`LeaseAck::Claimed`]); otherwise the answer is `Accepted` and the claim
    /// follows on `/d402/claim/1`. Zero always answers `Accepted` at once.
    pub inline_claim_window: Duration,
    /// Faults to commit (tests only).
    #[cfg(feature = "test-faults")]
    pub faults: Faults,
}

impl WorkerConfig {
    /// A configuration with defaults for `offers`, paid on `rails` at `payout`.
    pub fn new(offers: Vec<OfferedCapability>, rails: Vec<RailKind>, payout: Wallets) -> Self {
        WorkerConfig {
            offers,
            rails,
            payout,
            max_concurrent: 4,
            bid_ttl: Duration::from_secs(30),
            max_bid_uses: 256,
            min_lead: Duration::from_millis(500),
            inline_claim_window: Duration::from_millis(100),
            #[cfg(feature = "test-faults")]
            faults: Faults::default(),
        }
    }
}

#[derive(Debug, Clone)]
struct IssuedBid {
    bid: Bid,
    gateway: PublicKey,
    /// Leases the bid may still cover.
    uses_left: u32,
    /// Tasks already leased under it (one lease per task and bid).
    leased: HashSet<TaskId>,
}

struct Inner {
    key: SigningKey,
    me: PublicKey,
    net: NetHandle,
    runner: Runner,
    cfg: WorkerConfig,
    slots: Arc<Semaphore>,
    bids: Mutex<HashMap<Cid, IssuedBid>>,
    declines: Mutex<BTreeMap<String, u64>>,
    blobs: BlobStore,
    /// Each offered manifest's compiled input schema (or why it cannot be enforced): a
    /// lease's input is checked before it runs.
    input_checks: HashMap<Cid, Result<InputSchema, String>>,
    leases_accepted: AtomicU64,
    claims_sent: AtomicU64,
    claims_inline: AtomicU64,
    bids_made: AtomicU64,
}

/// A worker. Cheap to clone.
#[derive(Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("me", &self.inner.me)
            .finish()
    }
}

fn decline_name(d: &DeclineReason) -> &'static str {
    match d {
        DeclineReason::NotOffered => "not_offered",
        DeclineReason::NoCapacity => "no_capacity",
        DeclineReason::PriceBelowFloor { .. } => "price_below_floor",
        DeclineReason::RailNotSupported => "rail_not_supported",
        DeclineReason::ManifestRefused { .. } => "manifest_refused",
        DeclineReason::DeadlineTooSoon => "deadline_too_soon",
        DeclineReason::Busy => "busy",
        DeclineReason::BadRequest { .. } => "bad_request",
    }
}

/// Checks a lease's input (JSON bytes) against its manifest's input schema; the refusal
/// reason (`invalid_input: …`) on failure.
fn check_input(checks: Option<&Result<InputSchema, String>>, input: &[u8]) -> Result<(), String> {
    let checks = match checks {
        Some(Ok(c)) => c,
        Some(Err(e)) => {
            return Err(format!(
                "invalid_input: the input schema cannot be checked ({e})"
            ));
        }
        None => return Err("not_offered".into()),
    };
    let value: serde_json::Value = serde_json::from_slice(input)
        .map_err(|e| format!("invalid_input: the input is not JSON ({e})"))?;
    checks.check(&value).map_err(|v| {
        let listed: Vec<String> = v.iter().map(|v| v.to_string()).collect();
        format!("invalid_input: {}", listed.join("; "))
    })
}

fn refuse(reason: impl Into<String>) -> LeaseAck {
    let mut reason = reason.into();
    // Capped on the wire; cut on a character boundary (a reason may quote the input).
    let mut end = d402_protocol::messages::MAX_REASON.min(reason.len());
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason.truncate(end);
    LeaseAck::Refused { reason }
}

impl Worker {
    /// A worker signing with `key`, running with `runner`, serving its blobs from `blobs`.
    /// The offered manifests and modules are pinned in `blobs` so that other operators can
    /// fetch them by CID.
    pub fn new(
        key: SigningKey,
        net: NetHandle,
        runner: Runner,
        cfg: WorkerConfig,
        blobs: BlobStore,
    ) -> Worker {
        for o in &cfg.offers {
            if let Ok(bytes) = o.manifest.to_canonical() {
                blobs.pin(o.manifest_cid, Arc::new(bytes));
            }
            blobs.pin(o.manifest.implementation.cid, o.wasm.clone());
        }
        let input_checks = cfg
            .offers
            .iter()
            .map(|o| {
                let checks = o.manifest.input_checks().map_err(|e| e.to_string());
                if let Err(e) = &checks {
                    warn!(manifest = %o.manifest_cid, error = %e, "input schema cannot be enforced; its leases are refused");
                }
                (o.manifest_cid, checks)
            })
            .collect();
        Worker {
            inner: Arc::new(Inner {
                me: PublicKey(key.verifying_key().to_bytes()),
                key,
                net,
                runner,
                slots: Arc::new(Semaphore::new(cfg.max_concurrent.max(1))),
                cfg,
                bids: Mutex::default(),
                declines: Mutex::default(),
                blobs,
                input_checks,
                leases_accepted: AtomicU64::new(0),
                claims_sent: AtomicU64::new(0),
                claims_inline: AtomicU64::new(0),
                bids_made: AtomicU64::new(0),
            }),
        }
    }

    /// Declines so far, by reason ("why idle").
    pub fn declines(&self) -> BTreeMap<String, u64> {
        self.inner
            .declines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Leases accepted so far.
    pub fn leases_accepted(&self) -> u64 {
        self.inner.leases_accepted.load(Ordering::SeqCst)
    }

    /// Claims the gateway acknowledged so far.
    pub fn claims_sent(&self) -> u64 {
        self.inner.claims_sent.load(Ordering::SeqCst)
    }

    /// Of [`Worker::claims_sent`], those that answered their lease inline.
    pub fn claims_inline(&self) -> u64 {
        self.inner.claims_inline.load(Ordering::SeqCst)
    }

    /// Bids made since start (a standing bid counts once, however many leases it covers).
    pub fn bids_made(&self) -> u64 {
        self.inner.bids_made.load(Ordering::SeqCst)
    }

    fn decline(&self, peer: &PeerId, req: &BidRequest, d: DeclineReason) -> BidResponse {
        let name = decline_name(&d);
        info!(%peer, task = %req.task_id, manifest = %req.manifest_cid, reason = name, detail = ?d, "bid request declined");
        *self
            .inner
            .declines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_string())
            .or_default() += 1;
        BidResponse::Declined(d)
    }

    /// Answers a bid request from `peer`.
    pub fn on_bid_request(&self, peer: PeerId, req: Signed<BidRequest>) -> BidResponse {
        let inner = &self.inner;
        let r = &req.body;
        // The codec verified the request's signature when it decoded it; it must be the
        // sending peer's.
        match public_key_of(&peer) {
            Ok(k) if req.signer == k => {}
            _ => {
                return self.decline(
                    &peer,
                    r,
                    DeclineReason::BadRequest {
                        reason: "not signed by the requesting peer".into(),
                    },
                );
            }
        }
        let Some(offer) = inner
            .cfg
            .offers
            .iter()
            .find(|o| o.manifest_cid == r.manifest_cid)
        else {
            return self.decline(&peer, r, DeclineReason::NotOffered);
        };
        if let Err(e) = inner.runner.grants().check(&offer.manifest) {
            return self.decline(
                &peer,
                r,
                DeclineReason::ManifestRefused {
                    reason: e.to_string(),
                },
            );
        }
        if !inner.cfg.rails.contains(&r.rail)
            || !inner.cfg.payout.contains_key(&r.rail.payout_chain())
        {
            return self.decline(&peer, r, DeclineReason::RailNotSupported);
        }
        if r.max_price.asset != offer.asset || r.max_price.units < offer.floor {
            return self.decline(
                &peer,
                r,
                DeclineReason::PriceBelowFloor { floor: offer.floor },
            );
        }
        let now = now_ms();
        if r.deadline < now.saturating_add(inner.cfg.min_lead.as_millis() as u64) {
            return self.decline(&peer, r, DeclineReason::DeadlineTooSoon);
        }
        if inner.slots.available_permits() == 0 {
            return self.decline(&peer, r, DeclineReason::NoCapacity);
        }
        let request_cid = match req.cid() {
            Ok(c) => c,
            Err(e) => {
                return self.decline(
                    &peer,
                    r,
                    DeclineReason::BadRequest {
                        reason: e.to_string(),
                    },
                );
            }
        };
        let uses = r.standing.clamp(1, inner.cfg.max_bid_uses.max(1));
        let ttl = now.saturating_add(inner.cfg.bid_ttl.as_millis() as u64);
        let bid = Bid {
            v: MESSAGE_VERSION,
            task_id: r.task_id,
            request_cid,
            manifest_cid: r.manifest_cid,
            price: Amount {
                asset: offer.asset.clone(),
                units: offer.floor,
            },
            rail: r.rail,
            payout: inner.cfg.payout.clone(),
            // A single-use bid lapses with its task; a standing one outlives it.
            expires_at: if uses > 1 { ttl } else { ttl.min(r.deadline) },
            uses,
        };
        let signed = match Signed::sign(bid.clone(), &inner.key) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot sign a bid");
                return self.decline(
                    &peer,
                    r,
                    DeclineReason::BadRequest {
                        reason: e.to_string(),
                    },
                );
            }
        };
        let Ok(bid_cid) = signed.cid() else {
            return BidResponse::Declined(DeclineReason::Busy);
        };
        let mut bids = inner.bids.lock().unwrap_or_else(|p| p.into_inner());
        bids.retain(|_, b| b.bid.expires_at > now);
        bids.insert(
            bid_cid,
            IssuedBid {
                bid,
                gateway: req.signer,
                uses_left: uses,
                leased: HashSet::new(),
            },
        );
        inner.bids_made.fetch_add(1, Ordering::SeqCst);
        debug!(%peer, task = %r.task_id, %bid_cid, uses, "bid made");
        BidResponse::Bid(Box::new(signed))
    }

    /// Answers a lease from `peer` on `reply`: a refusal at once; an accepted lease starts
    /// its run, and the answer is its claim if the run ends within the inline window, else
    /// `Accepted` when the window closes (see the module doc).
    pub fn on_lease(&self, peer: PeerId, lease: Signed<Lease>, reply: oneshot::Sender<LeaseAck>) {
        let span = info_span!(
            "lease",
            task = %lease.body.task_id,
            %peer,
            token = lease.body.fencing_token
        );
        let accepted = {
            let _e = span.enter();
            self.accept_lease(peer, &lease)
        };
        match accepted {
            Err(refusal) => {
                let _ = reply.send(refusal);
            }
            Ok((offer, permit)) => {
                let me = self.clone();
                tokio::spawn(
                    async move { me.run_lease(lease, offer, peer, permit, reply).await }
                        .instrument(span),
                );
            }
        }
    }

    /// The checks of a lease; on success the offer and the execution slot it runs in.
    fn accept_lease(
        &self,
        peer: PeerId,
        lease: &Signed<Lease>,
    ) -> Result<(OfferedCapability, OwnedSemaphorePermit), LeaseAck> {
        let inner = &self.inner;
        let l = &lease.body;
        let Ok(gateway) = public_key_of(&peer) else {
            return Err(refuse("bad_signature: the peer has no ed25519 key"));
        };
        // The codec verified the signature when it decoded the lease; it must be the
        // sending peer's.
        if lease.signer != gateway {
            return Err(refuse("bad_signature: not signed by the requesting peer"));
        }
        if l.worker != inner.me {
            return Err(refuse("not_for_me: the lease names another worker"));
        }
        let now = now_ms();
        let issued = {
            let bids = inner.bids.lock().unwrap_or_else(|p| p.into_inner());
            bids.get(&l.bid_cid).cloned()
        };
        let Some(issued) = issued else {
            return Err(refuse("unknown_bid: no bid of this worker has that CID"));
        };
        if issued.gateway != gateway {
            return Err(refuse("unknown_bid: the bid was made to another gateway"));
        }
        if issued.bid.expires_at <= now {
            return Err(refuse("bid_expired"));
        }
        // A single-use bid covers its own task; a standing bid any task of its manifest and
        // price, once each.
        if (issued.bid.uses == 1 && issued.bid.task_id != l.task_id)
            || issued.bid.manifest_cid != l.manifest_cid
            || issued.bid.price != l.price
        {
            return Err(refuse(
                "bid_mismatch: task, manifest or price differ from the bid",
            ));
        }
        if issued.leased.contains(&l.task_id) {
            return Err(refuse(
                "bid_used: this bid already covers a lease of this task",
            ));
        }
        if l.deadline <= now {
            return Err(refuse("lease_expired"));
        }
        let Some(offer) = inner
            .cfg
            .offers
            .iter()
            .find(|o| o.manifest_cid == l.manifest_cid)
            .cloned()
        else {
            return Err(refuse("not_offered"));
        };
        check_input(inner.input_checks.get(&l.manifest_cid), &l.input).map_err(refuse)?;
        let Ok(permit) = inner.slots.clone().try_acquire_owned() else {
            return Err(refuse("no_capacity"));
        };
        // The lease uses the bid up, or one of its uses. Checked again under the lock: two
        // leases citing a bid's last use may arrive together.
        {
            let mut bids = inner.bids.lock().unwrap_or_else(|p| p.into_inner());
            let Some(b) = bids.get_mut(&l.bid_cid) else {
                return Err(refuse("unknown_bid: no bid of this worker has that CID"));
            };
            if b.uses_left == 0 || !b.leased.insert(l.task_id) {
                return Err(refuse(
                    "bid_used: this bid already covers a lease of this task",
                ));
            }
            b.uses_left -= 1;
            if b.uses_left == 0 {
                bids.remove(&l.bid_cid);
            }
        }
        inner.leases_accepted.fetch_add(1, Ordering::SeqCst);
        info!("lease accepted");
        Ok((offer, permit))
    }

    async fn run_lease(
        &self,
        lease: Signed<Lease>,
        offer: OfferedCapability,
        gateway: PeerId,
        _permit: OwnedSemaphorePermit,
        reply: oneshot::Sender<LeaseAck>,
    ) {
        let deadline = lease.body.deadline;
        let left = Duration::from_millis(deadline.saturating_sub(now_ms()));
        let run = tokio::time::timeout(left, self.run_to_claim(&lease, &offer, gateway));
        tokio::pin!(run);
        let window = self.inner.cfg.inline_claim_window;
        let (ran, reply) = if window.is_zero() {
            let _ = reply.send(LeaseAck::Accepted);
            ((&mut run).await, None)
        } else {
            tokio::select! {
            biased;
            ran = &mut run => (ran, Some(reply)),
            _ = tokio::time::sleep(window) => {
                let _ = reply.send(LeaseAck::Accepted);
                ((&mut run).await, None)
            }
            }
        };
        let claim = match ran {
            Ok(Ok(claim)) => claim,
            Ok(Err(e)) => {
                warn!(error = %e, "lease failed; no claim");
                if let Some(reply) = reply {
                    let _ = reply.send(refuse(format!("run_failed: {e}")));
                }
                return;
            }
            Err(_) => {
                warn!("lease deadline passed; abandoned");
                return;
            }
        };
        if let Some(reply) = reply {
            match reply.send(LeaseAck::Claimed(Box::new(claim))) {
                Ok(()) => {
                    self.inner.claims_sent.fetch_add(1, Ordering::SeqCst);
                    self.inner.claims_inline.fetch_add(1, Ordering::SeqCst);
                    debug!("claim answered inline");
                    return;
                }
                // The lease's stream is gone: the claim protocol still reaches the gateway.
                Err(LeaseAck::Claimed(claim)) => {
                    let left = Duration::from_millis(deadline.saturating_sub(now_ms()));
                    self.send_claim_until(gateway, left, *claim).await;
                }
                Err(_) => {}
            }
            return;
        }
        let left = Duration::from_millis(deadline.saturating_sub(now_ms()));
        self.send_claim_until(gateway, left, claim).await;
    }

    async fn send_claim_until(&self, gateway: PeerId, left: Duration, claim: Signed<Claim>) {
        match tokio::time::timeout(left, self.send_claim(gateway, claim)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "claim not accepted"),
            Err(_) => warn!("lease deadline passed before the claim got through; abandoned"),
        }
    }

    /// Runs the lease (fetching its pinned snapshot first, if any) and signs the claim.
    async fn run_to_claim(
        &self,
        lease: &Signed<Lease>,
        offer: &OfferedCapability,
        gateway: PeerId,
    ) -> anyhow::Result<Signed<Claim>> {
        let inner = &self.inner;
        let l = &lease.body;
        let pinned = match l.snapshot_cid {
            Some(cid) => {
                let (bytes, meta) = blobs::fetch(&inner.net, gateway, Vec::new(), cid).await?;
                let meta = meta.ok_or_else(|| {
                    anyhow::anyhow!("the pinned snapshot {cid} came without its metadata")
                })?;
                if meta.len != bytes.len() as u64 {
                    anyhow::bail!("the pinned snapshot's length differs from its metadata");
                }
                Some((cid, bytes, meta))
            }
            None => None,
        };
        let given = pinned.as_ref().map(|(_, body, meta)| GivenSnapshot {
            final_url: &meta.final_url,
            body,
        });
        let out = inner
            .runner
            .run(&offer.manifest, &offer.wasm, &l.input, given)
            .await?;
        #[allow(unused_mut)]
        let mut output = out.output;
        #[cfg(feature = "test-faults")]
        {
            if inner.cfg.faults.corrupt_output {
                output.extend_from_slice(b" (a lie)");
            }
            tokio::time::sleep(inner.cfg.faults.claim_delay).await;
        }
        let (snapshot_cid, snapshot): (Option<Cid>, Option<SnapshotMeta>) =
            match (pinned, out.snapshot) {
                (Some((cid, _, meta)), _) => (Some(cid), Some(meta)),
                (None, Some(s)) => {
                    let meta = s.meta();
                    inner.blobs.put(s.cid, Arc::new(s.body), Some(meta.clone()));
                    (Some(s.cid), Some(meta))
                }
                (None, None) => (None, None),
            };
        let claim = Claim {
            v: MESSAGE_VERSION,
            task_id: l.task_id,
            lease_cid: lease.cid()?,
            fencing_token: l.fencing_token,
            output_cid: Cid::raw(&output),
            output,
            snapshot_cid,
            snapshot,
            fuel_used: out.fuel_used,
            finished_at: now_ms(),
        };
        Ok(Signed::sign(claim, &inner.key)?)
    }

    /// Sends a claim on `/d402/claim/1` to the gateway that signed its lease, redialling and
    /// retrying with backoff until it is received or refused.
    async fn send_claim(&self, gw: PeerId, signed: Signed<Claim>) -> anyhow::Result<()> {
        let inner = &self.inner;
        let mut delay = Duration::from_millis(200);
        loop {
            // A gateway that restarted (connection gone) is redialled at the addresses of
            // its signed peer record (`NetHandle::request`) rather than waited for.
            match inner
                .net
                .request_claim(gw, Vec::new(), signed.clone())
                .await
            {
                Ok(ClaimAck::Received) => {
                    inner.claims_sent.fetch_add(1, Ordering::SeqCst);
                    info!(output = %signed.body.output_cid, "claim received by the gateway");
                    return Ok(());
                }
                Ok(ClaimAck::Refused { reason }) if reason == "busy" => {}
                Ok(ClaimAck::Refused { reason }) => {
                    anyhow::bail!("claim refused: {reason}");
                }
                Err(e) => debug!(error = %e, "claim not delivered; retrying"),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_inputs_are_checked_against_the_manifest_schema() {
        let schema = InputSchema::compile(&serde_json::json!({
            "type": "object",
            "properties": {"url": {"type": "string", "maxLength": 8}},
            "required": ["url"],
            "additionalProperties": false
        }))
        .unwrap();
        let checks = Some(Ok(schema));
        assert_eq!(
            check_input(checks.as_ref(), br#"{"url":"https://"}"#),
            Ok(())
        );
        for (input, why) in [
            (
                &br#"{}"#[..],
                "invalid_input: input: the property \"url\" is required",
            ),
            (
                br#"{"url":"https://example.com"}"#,
                "invalid_input: /url: must be at most 8",
            ),
            (
                br#"{"url":"a","x":1}"#,
                "invalid_input: /x: is not an allowed property",
            ),
            (b"not json", "invalid_input: the input is not JSON"),
        ] {
            let e = check_input(checks.as_ref(), input).unwrap_err();
            assert!(e.starts_with(why), "{e}");
        }
        assert_eq!(check_input(None, b"{}").unwrap_err(), "not_offered");
        let broken = Some(Err("input_schema/oneOf: not supported".to_string()));
        assert!(
            check_input(broken.as_ref(), b"{}")
                .unwrap_err()
                .starts_with("invalid_input")
        );
        // A long reason with multi-byte characters is cut on a character boundary.
        let LeaseAck::Refused { reason } = refuse("é".repeat(1000)) else {
            panic!("a refusal")
        };
        assert!(reason.len() <= d402_protocol::messages::MAX_REASON);
        assert!(reason.chars().all(|c| c == 'é'));
    }
}
