//! The validator: answers `/d402/verdict/1` by re-running the deterministic Wasm step of a
//! claim and signing a [`Verdict`].
//!
//! A request carries the gateway's signed lease (task input, manifest CID, pinned snapshot)
//! and the worker's signed claim. The validator checks that the lease is signed by the peer
//! that asks, that the claim is signed by the leased worker and answers that lease (lease
//! CID, task, fencing token, pinned snapshot). It then gets what it needs by CID, each
//! verified against its CID before use:
//! - the manifest and its Wasm module: from its own blob store or capability store, else
//!   from the requesting gateway, else from the worker that claimed (workers serve the
//!   capabilities they offer);
//! - the snapshot named by the claim: from the requesting gateway, which pinned it (see
//!   docs/DECISIONS.md "Market"); its length must match the claim's metadata and it must be
//!   plausible for the input ([`super::coordinator::plausible`]).
//!
//! The validator never takes a snapshot of its own: a capability that needs one is judged
//! only on the claim's snapshot. It then runs the module with [`Runner::run`] on the
//! input and that snapshot and signs `Agree` when the output CID is the claim's,
//! `Disagree { recomputed }` otherwise, and `Unable { reason }` when it could not re-run
//! (blob unavailable, trap, out of fuel). Runs are limited to
//! [`ValidatorConfig::max_concurrent`]; past that the answer is `Busy`.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use d402_capabilities::Manifest;
use d402_protocol::{
    Cid, PublicKey, Signed, SigningKey,
    messages::{MAX_REASON, Verdict, VerdictOutcome},
    types::MESSAGE_VERSION,
};
use d402_runtime::{GivenSnapshot, Runner};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, oneshot};
use tracing::{Instrument, debug, info, info_span, warn};

use super::{
    blobs::{self, BlobStore},
    coordinator::plausible,
    now_ms,
};
use crate::{
    capstore::CapStore,
    net::{NetHandle, codec::VerdictRequest, codec::VerdictResponse, peer_id_of, public_key_of},
};

/// The well-known key validators announce themselves under (a provider record in the DHT
/// and a rendezvous registration, like a capability's manifest CID): the raw CID of
/// `b"d402/validator/1"`. Gateways look validators up with it.
pub fn validator_key() -> Cid {
    Cid::raw(b"d402/validator/1")
}

/// Faults a validator can be told to commit; only with the `test-faults` feature.
#[cfg(feature = "test-faults")]
#[derive(Debug, Clone, Default)]
pub struct ValidatorFaults {
    /// Sign `Disagree` whatever the re-run gives (a lying or broken validator).
    pub always_disagree: bool,
}

/// How a validator runs.
#[derive(Debug, Clone)]
pub struct ValidatorConfig {
    /// Re-runs at once; more requests are answered `Busy`.
    pub max_concurrent: usize,
    /// The node's state directory, whose capability store is searched before fetching.
    pub state_dir: Option<PathBuf>,
    /// Faults to commit (tests only).
    #[cfg(feature = "test-faults")]
    pub faults: ValidatorFaults,
}

impl Default for ValidatorConfig {
    fn default() -> Self {
        ValidatorConfig {
            max_concurrent: 2,
            state_dir: None,
            #[cfg(feature = "test-faults")]
            faults: ValidatorFaults::default(),
        }
    }
}

/// Counters of a validator (for `d402 ops-monitor`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidatorStats {
    /// Verdicts signed `agree`.
    pub agreed: u64,
    /// Verdicts signed `disagree`.
    pub disagreed: u64,
    /// Verdicts signed `unable`.
    pub unable: u64,
    /// Requests refused (bad lease or claim), by reason code.
    pub refused: std::collections::BTreeMap<String, u64>,
    /// Requests answered `busy`.
    pub busy: u64,
}

struct Inner {
    key: SigningKey,
    me: PublicKey,
    net: NetHandle,
    runner: Runner,
    blobs: BlobStore,
    cfg: ValidatorConfig,
    slots: Arc<Semaphore>,
    agreed: AtomicU64,
    disagreed: AtomicU64,
    unable: AtomicU64,
    busy: AtomicU64,
    refused: Mutex<std::collections::BTreeMap<String, u64>>,
    /// Manifests fetched, by CID (modules go to the blob store).
    manifests: Mutex<HashMap<Cid, Manifest>>,
}

/// A validator. Cheap to clone.
#[derive(Clone)]
pub struct Validator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Validator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Validator")
            .field("me", &self.inner.me)
            .finish()
    }
}

/// Why a verdict request was refused (the code is the reason sent back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerdictRefusal {
    /// The lease is not signed by the peer that asks.
    LeaseNotFromRequester,
    /// The claim is not signed by the leased worker.
    ClaimNotFromWorker,
    /// The claim does not answer the lease (lease CID, task, fencing token, snapshot).
    ClaimDoesNotMatchLease,
}

impl VerdictRefusal {
    /// The stable code.
    pub fn code(self) -> &'static str {
        match self {
            VerdictRefusal::LeaseNotFromRequester => "lease_not_from_requester",
            VerdictRefusal::ClaimNotFromWorker => "claim_not_from_worker",
            VerdictRefusal::ClaimDoesNotMatchLease => "claim_does_not_match_lease",
        }
    }
}

/// Checks a verdict request against the peer that sent it.
pub fn check_request(peer: &PeerId, req: &VerdictRequest) -> Result<(), VerdictRefusal> {
    let from = public_key_of(peer).map_err(|_| VerdictRefusal::LeaseNotFromRequester)?;
    req.lease
        .verify_from(&from)
        .map_err(|_| VerdictRefusal::LeaseNotFromRequester)?;
    req.claim
        .verify_from(&req.lease.body.worker)
        .map_err(|_| VerdictRefusal::ClaimNotFromWorker)?;
    let (l, c) = (&req.lease.body, &req.claim.body);
    let lease_cid = req
        .lease
        .cid()
        .map_err(|_| VerdictRefusal::ClaimDoesNotMatchLease)?;
    if c.lease_cid != lease_cid
        || c.task_id != l.task_id
        || c.fencing_token != l.fencing_token
        || (l.snapshot_cid.is_some() && c.snapshot_cid != l.snapshot_cid)
    {
        return Err(VerdictRefusal::ClaimDoesNotMatchLease);
    }
    Ok(())
}

fn unable(reason: impl std::fmt::Display) -> VerdictOutcome {
    let mut reason = reason.to_string();
    if reason.len() > MAX_REASON {
        let mut end = MAX_REASON;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    VerdictOutcome::Unable { reason }
}

impl Validator {
    /// A validator signing with `key` (the node key), re-running with `runner`, caching
    /// fetched modules in `blobs`.
    pub fn new(
        key: SigningKey,
        net: NetHandle,
        runner: Runner,
        cfg: ValidatorConfig,
        blobs: BlobStore,
    ) -> Validator {
        Validator {
            inner: Arc::new(Inner {
                me: PublicKey(key.verifying_key().to_bytes()),
                key,
                net,
                runner,
                blobs,
                slots: Arc::new(Semaphore::new(cfg.max_concurrent.max(1))),
                cfg,
                agreed: AtomicU64::new(0),
                disagreed: AtomicU64::new(0),
                unable: AtomicU64::new(0),
                busy: AtomicU64::new(0),
                refused: Mutex::default(),
                manifests: Mutex::default(),
            }),
        }
    }

    /// The validator of `d402 node --validator`: the default grants, no snapshotter (it
    /// only re-runs on a claim's snapshot), modules cached under `<state>/wasm-cache`, and
    /// the node's capability store searched before fetching.
    pub fn for_node(
        key: SigningKey,
        net: NetHandle,
        state_dir: &std::path::Path,
        blobs: BlobStore,
    ) -> Result<Validator, d402_runtime::executor::ExecError> {
        let grants = d402_runtime::Grants::default();
        let executor = d402_runtime::Executor::new(d402_runtime::ExecutorConfig {
            cache_dir: Some(state_dir.join("wasm-cache")),
            max_concurrent: 2,
            max_memory_bytes: grants.max_memory_bytes,
        })?;
        let runner = Runner::new(executor, grants, d402_runtime::Snapshotters::default());
        let cfg = ValidatorConfig {
            state_dir: Some(state_dir.to_path_buf()),
            ..ValidatorConfig::default()
        };
        Ok(Validator::new(key, net, runner, cfg, blobs))
    }

    /// What `d402 node` starts for validation and capability exchange: the blob store serves
    /// the node's capability store; on a gateway, its offered manifests and modules are kept
    /// in the blob store (validators fetch them from the gateway that asks); with
    /// `--validator`, a validator ([`Validator::for_node`]).
    pub fn start_for_node(
        cfg: &crate::config::NodeConfig,
        key: &SigningKey,
        net: &NetHandle,
        blobs: &BlobStore,
        offers: &[crate::capstore::ResolvedCapability],
    ) -> anyhow::Result<Option<Validator>> {
        let roles = cfg.roles();
        // Manifests, registrations and modules of the store go out by CID to any peer (an
        // operator offering a capability first published elsewhere fetches them).
        blobs.serve_capstore(&cfg.state_dir);
        if roles.gateway {
            for o in offers {
                blobs.pin(o.manifest_cid, Arc::new(o.manifest.to_canonical()?));
                blobs.pin(o.manifest.implementation.cid, Arc::new(o.wasm.clone()));
            }
        }
        if !roles.validator {
            return Ok(None);
        }
        let v = Validator::for_node(key.clone(), net.clone(), &cfg.state_dir, blobs.clone())
            .map_err(|e| anyhow::anyhow!("cannot start the validator's Wasm executor: {e}"))?;
        info!(key = %validator_key(), "validator started");
        Ok(Some(v))
    }

    /// Announces this validator under [`validator_key`] so that gateways find it.
    pub async fn announce(&self) -> Result<(), crate::net::NetError> {
        self.inner.net.provide(validator_key()).await
    }

    /// The counters so far.
    pub fn stats(&self) -> ValidatorStats {
        let i = &self.inner;
        ValidatorStats {
            agreed: i.agreed.load(Ordering::SeqCst),
            disagreed: i.disagreed.load(Ordering::SeqCst),
            unable: i.unable.load(Ordering::SeqCst),
            busy: i.busy.load(Ordering::SeqCst),
            refused: i.refused.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }

    /// Answers a verdict request from `peer` on `reply`: refusals and `Busy` at once, a
    /// verdict once the re-run is done (in a task of its own, so the caller is not held).
    pub fn on_verdict_request(
        &self,
        peer: PeerId,
        req: VerdictRequest,
        reply: oneshot::Sender<VerdictResponse>,
    ) {
        let inner = &self.inner;
        let span = info_span!("verdict", task = %req.claim.body.task_id, %peer);
        if let Err(r) = check_request(&peer, &req) {
            info!(parent: &span, reason = r.code(), "verdict request refused");
            *inner
                .refused
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(r.code().to_string())
                .or_default() += 1;
            let _ = reply.send(VerdictResponse::Refused {
                reason: r.code().to_string(),
            });
            return;
        }
        let Ok(permit) = inner.slots.clone().try_acquire_owned() else {
            inner.busy.fetch_add(1, Ordering::SeqCst);
            let _ = reply.send(VerdictResponse::Busy);
            return;
        };
        let me = self.clone();
        tokio::spawn(
            async move {
                let _permit = permit;
                let response = match me.judge(peer, &req).await {
                    Ok(v) => VerdictResponse::Verdict(Box::new(v)),
                    Err(e) => {
                        warn!(error = %e, "cannot sign a verdict");
                        VerdictResponse::Refused {
                            reason: "internal".into(),
                        }
                    }
                };
                let _ = reply.send(response);
            }
            .instrument(span),
        );
    }

    /// Re-runs the claim's deterministic step and signs the verdict.
    pub async fn judge(
        &self,
        requester: PeerId,
        req: &VerdictRequest,
    ) -> Result<Signed<Verdict>, d402_protocol::ProtocolError> {
        let inner = &self.inner;
        let (l, c) = (&req.lease.body, &req.claim.body);
        let worker = peer_id_of(&l.worker).ok();
        let (outcome, fuel_used) = match self.rerun(requester, worker, req).await {
            Ok((out_cid, fuel)) if out_cid == c.output_cid => (VerdictOutcome::Agree, fuel),
            Ok((recomputed, fuel)) => (VerdictOutcome::Disagree { recomputed }, fuel),
            Err(reason) => (unable(reason), 0),
        };
        #[cfg(feature = "test-faults")]
        let outcome = if inner.cfg.faults.always_disagree {
            let mut lie = c.output.clone();
            lie.extend_from_slice(b" (validator lie)");
            VerdictOutcome::Disagree {
                recomputed: Cid::raw(&lie),
            }
        } else {
            outcome
        };
        match &outcome {
            VerdictOutcome::Agree => inner.agreed.fetch_add(1, Ordering::SeqCst),
            VerdictOutcome::Disagree { .. } => inner.disagreed.fetch_add(1, Ordering::SeqCst),
            VerdictOutcome::Unable { .. } => inner.unable.fetch_add(1, Ordering::SeqCst),
        };
        info!(output = %c.output_cid, outcome = ?outcome, fuel_used, "verdict signed");
        Signed::sign(
            Verdict {
                v: MESSAGE_VERSION,
                task_id: c.task_id,
                claim_cid: req.claim.cid()?,
                output_cid: c.output_cid,
                outcome,
                fuel_used,
                judged_at: now_ms(),
            },
            &inner.key,
        )
    }

    /// Fetches `cid` from the first of `sources` that has it (CID-verified by
    /// [`blobs::fetch`]).
    async fn fetch_from(
        &self,
        sources: &[PeerId],
        cid: Cid,
    ) -> Result<(Vec<u8>, Option<d402_protocol::messages::SnapshotMeta>), String> {
        let mut last = String::from("no peer to fetch from");
        for p in sources {
            // Dialled at its signed record's addresses if not connected.
            match blobs::fetch(&self.inner.net, *p, Vec::new(), cid).await {
                Ok(found) => return Ok(found),
                Err(e) => {
                    debug!(peer = %p, %cid, error = %e, "blob not fetched");
                    last = format!("{cid} from {p}: {e}");
                }
            }
        }
        Err(last)
    }

    async fn manifest(&self, sources: &[PeerId], cid: Cid) -> Result<Manifest, String> {
        let inner = &self.inner;
        if let Some(m) = inner
            .manifests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&cid)
        {
            return Ok(m.clone());
        }
        let local = inner
            .cfg
            .state_dir
            .as_ref()
            .and_then(|d| CapStore::new(d).load_manifest(&cid).ok());
        let m = match local {
            Some(m) => m,
            None => {
                let bytes = match inner.blobs.get(&cid) {
                    Some((b, _)) => b.as_ref().clone(),
                    None => self.fetch_from(sources, cid).await?.0,
                };
                Manifest::from_canonical(&bytes)
                    .map_err(|e| format!("manifest {cid} is invalid: {e}"))?
            }
        };
        if m.cid().map_err(|e| e.to_string())? != cid {
            return Err(format!("manifest {cid} does not hash to its CID"));
        }
        inner
            .manifests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cid, m.clone());
        Ok(m)
    }

    async fn module(&self, sources: &[PeerId], m: &Manifest) -> Result<Arc<Vec<u8>>, String> {
        let inner = &self.inner;
        let cid = m.implementation.cid;
        if let Some((b, _)) = inner.blobs.get(&cid) {
            return Ok(b);
        }
        let local = inner
            .cfg
            .state_dir
            .as_ref()
            .and_then(|d| CapStore::new(d).load_wasm(&cid).ok());
        let bytes = match local {
            Some(b) => b,
            None => self.fetch_from(sources, cid).await?.0,
        };
        m.check_wasm(&bytes)
            .map_err(|e| format!("module {cid}: {e}"))?;
        let bytes = Arc::new(bytes);
        inner.blobs.pin(cid, bytes.clone());
        Ok(bytes)
    }

    /// Re-runs the step; the output CID and fuel, or why it could not.
    async fn rerun(
        &self,
        requester: PeerId,
        worker: Option<PeerId>,
        req: &VerdictRequest,
    ) -> Result<(Cid, u64), String> {
        let (l, c) = (&req.lease.body, &req.claim.body);
        let mut sources = vec![requester];
        sources.extend(worker);
        let manifest = self.manifest(&sources, l.manifest_cid).await?;
        let wasm = self.module(&sources, &manifest).await?;
        let takes_snapshot = !manifest.permissions.snapshotters.is_empty();
        let snapshot = match (c.snapshot_cid, &c.snapshot) {
            (Some(cid), Some(meta)) => {
                let (bytes, _) = self.fetch_from(&[requester], cid).await?;
                if !plausible(&l.input, meta, bytes.len()) {
                    return Err(format!(
                        "snapshot {cid} is implausible (length, status or final URL host)"
                    ));
                }
                Some((bytes, meta.final_url.clone()))
            }
            _ if takes_snapshot => {
                return Err("the capability takes a snapshot but the claim names none".into());
            }
            _ => None,
        };
        let given = snapshot.as_ref().map(|(body, url)| GivenSnapshot {
            final_url: url,
            body,
        });
        let out = self
            .inner
            .runner
            .run(&manifest, &wasm, &l.input, given)
            .await
            .map_err(|e| format!("re-run failed: {e}"))?;
        Ok((out.output_cid, out.fuel_used))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use d402_protocol::{
        Amount, TaskId,
        messages::{Claim, Lease},
    };

    fn key(b: u8) -> SigningKey {
        SigningKey::from_bytes(&[b; 32])
    }

    fn request(gw: &SigningKey, worker: &SigningKey, token: u64) -> VerdictRequest {
        let lease = Signed::sign(
            Lease {
                v: 1,
                task_id: TaskId([1; 16]),
                worker: PublicKey(worker.verifying_key().to_bytes()),
                bid_cid: Cid::raw(b"bid"),
                manifest_cid: Cid::raw(b"manifest"),
                input: b"{}".to_vec(),
                snapshot_cid: None,
                price: Amount {
                    asset: "local:USDC".into(),
                    units: 1,
                },
                deadline: 10,
                fencing_token: 1,
            },
            gw,
        )
        .unwrap();
        let output = b"out".to_vec();
        let claim = Signed::sign(
            Claim {
                v: 1,
                task_id: TaskId([1; 16]),
                lease_cid: lease.cid().unwrap(),
                fencing_token: token,
                output_cid: Cid::raw(&output),
                output,
                snapshot_cid: None,
                snapshot: None,
                fuel_used: 1,
                finished_at: 1,
            },
            worker,
        )
        .unwrap();
        VerdictRequest { lease, claim }
    }

    fn peer(k: &SigningKey) -> PeerId {
        peer_id_of(&PublicKey(k.verifying_key().to_bytes())).unwrap()
    }

    #[test]
    fn requests_are_checked_against_the_requester_and_the_lease() {
        let (gw, w, other) = (key(1), key(2), key(3));
        assert_eq!(check_request(&peer(&gw), &request(&gw, &w, 1)), Ok(()));
        assert_eq!(
            check_request(&peer(&other), &request(&gw, &w, 1)),
            Err(VerdictRefusal::LeaseNotFromRequester)
        );
        assert_eq!(
            check_request(&peer(&gw), &request(&gw, &w, 2)),
            Err(VerdictRefusal::ClaimDoesNotMatchLease)
        );
        // A claim signed by someone other than the leased worker.
        let mut r = request(&gw, &w, 1);
        r.claim = Signed::sign(r.claim.body.clone(), &other).unwrap();
        assert_eq!(
            check_request(&peer(&gw), &r),
            Err(VerdictRefusal::ClaimNotFromWorker)
        );
    }

    #[test]
    fn unable_reasons_fit_the_cap() {
        let VerdictOutcome::Unable { reason } = unable("é".repeat(MAX_REASON)) else {
            unreachable!()
        };
        assert!(reason.len() <= MAX_REASON);
    }
}
