//! A whole capability run, as a worker (or `d402 capability run`) does it: grants first,
//! then the snapshot (or a pinned one), then the Wasm step, all within the manifest's wall
//! time.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use d402_capabilities::{Manifest, SnapshotterKind};
use d402_protocol::{Cid, messages::MAX_INPUT};
use tracing::Instrument;

use crate::{
    chromium::ChromiumSnapshotter,
    executor::{
        ExecError, Executor, Outcome, RunLimits, TrapReason,
        abi::{SnapshotInput, encode_input},
    },
    fetch::FetchSnapshotter,
    grants::{GrantError, Grants},
    snapshot::{Snapshot, SnapshotError, snapshotter_name},
};

/// Fuel a run may spend on the async thread that asked for it (about a millisecond of
/// guest code on this project's machines) before it is moved to the blocking pool, where
/// it starts again with its whole budget. Most small capabilities end within it and skip
/// the two thread hand-offs of the pool; a long run pays at most this much twice.
pub const INLINE_FUEL: u64 = 1_000_000;

/// Why a run produced no output.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The manifest asks for more than the operator grants.
    #[error("refused by the operator's grants: {0}")]
    Grant(#[from] GrantError),
    /// The task input is unusable.
    #[error("bad task input: {0}")]
    Input(String),
    /// The snapshot failed.
    #[error("snapshot failed: {0}")]
    Snapshot(#[from] SnapshotError),
    /// The module could not be prepared or run.
    #[error(transparent)]
    Exec(#[from] ExecError),
    /// The module stopped without output.
    #[error("capability stopped: {reason} (fuel used {fuel_used})")]
    Trap {
        /// Why.
        reason: TrapReason,
        /// Fuel consumed.
        fuel_used: u64,
    },
    /// The manifest's wall time ran out.
    #[error("wall time of {0:?} exhausted")]
    WallTime(Duration),
}

/// The result of a successful run.
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// The output bytes.
    pub output: Vec<u8>,
    /// `raw` CID of the output (what quorum compares).
    pub output_cid: Cid,
    /// Fuel the Wasm step used.
    pub fuel_used: u64,
    /// The snapshot the module ran on, if the capability takes one.
    pub snapshot: Option<Snapshot>,
    /// Time spent in the Wasm step.
    pub wasm_time: Duration,
}

/// The worker's snapshotters and how to choose among them.
#[derive(Debug, Clone, Default)]
pub struct Snapshotters {
    /// The plain HTTP snapshotter, if this worker runs it.
    pub fetch: Option<FetchSnapshotter>,
    /// The headless-Chromium snapshotter, if this worker runs it.
    pub chromium: Option<ChromiumSnapshotter>,
    /// Use `fetch` when the browser is missing or fails (never after a policy refusal).
    pub fallback_to_fetch: bool,
}

impl Snapshotters {
    /// Snapshots `url` with the first of `preference` this worker runs, falling back to
    /// `fetch` when allowed. A fallback snapshot says why in [`Snapshot::fallback`].
    pub async fn take(
        &self,
        preference: &[SnapshotterKind],
        url: &str,
    ) -> Result<Snapshot, SnapshotError> {
        let fetch_allowed = preference.contains(&SnapshotterKind::Fetch);
        let mut last = SnapshotError::Unavailable("none");
        for kind in preference {
            match kind {
                SnapshotterKind::Playwright => {
                    let Some(chromium) = &self.chromium else {
                        last = SnapshotError::Unavailable("playwright");
                        continue;
                    };
                    match chromium.snapshot(url).await {
                        Ok(s) => return Ok(s),
                        Err(e) if e.is_policy() => return Err(e),
                        Err(e) => {
                            if self.fallback_to_fetch
                                && fetch_allowed
                                && let Some(fetch) = &self.fetch
                            {
                                tracing::warn!(error = %e, "browser snapshot failed; falling back to fetch");
                                let mut s = fetch.snapshot(url).await?;
                                s.fallback =
                                    Some(format!("playwright failed ({e}); fell back to fetch"));
                                return Ok(s);
                            }
                            return Err(e);
                        }
                    }
                }
                SnapshotterKind::Fetch => {
                    let Some(fetch) = &self.fetch else {
                        last = SnapshotError::Unavailable("fetch");
                        continue;
                    };
                    return fetch.snapshot(url).await;
                }
            }
        }
        Err(last)
    }
}

/// Runs capabilities for a worker.
#[derive(Debug, Clone)]
pub struct Runner {
    executor: Executor,
    grants: Arc<Grants>,
    snapshotters: Snapshotters,
}

/// A snapshot the caller already has (pinned by CID in a lease, or a local file).
#[derive(Debug, Clone, Copy)]
pub struct GivenSnapshot<'a> {
    /// The URL the snapshot was taken from.
    pub final_url: &'a str,
    /// Its bytes.
    pub body: &'a [u8],
}

impl Runner {
    /// A runner with these parts.
    pub fn new(executor: Executor, grants: Grants, snapshotters: Snapshotters) -> Self {
        Runner {
            executor,
            grants: Arc::new(grants),
            snapshotters,
        }
    }

    /// The grants in force.
    pub fn grants(&self) -> &Grants {
        &self.grants
    }

    /// The executor.
    pub fn executor(&self) -> &Executor {
        &self.executor
    }

    /// Runs `manifest`'s module on `input`: the module of its implementation CID held in
    /// the executor's memory if there is one (then `wasm` is not looked at), otherwise
    /// `wasm`, checked against that CID first. With `given`, the module runs on that
    /// snapshot and nothing is fetched; otherwise a capability that takes a snapshot gets
    /// one of the input's `"url"`.
    pub async fn run(
        &self,
        manifest: &Manifest,
        wasm: &[u8],
        input: &[u8],
        given: Option<GivenSnapshot<'_>>,
    ) -> Result<RunOutput, RunError> {
        let span = tracing::info_span!("capability_run", capability = %manifest.capability(), cid = %manifest.implementation.cid);
        self.run_in_span(manifest, wasm, input, given)
            .instrument(span)
            .await
    }

    async fn run_in_span(
        &self,
        manifest: &Manifest,
        wasm: &[u8],
        input: &[u8],
        given: Option<GivenSnapshot<'_>>,
    ) -> Result<RunOutput, RunError> {
        let started = Instant::now();
        let wall = Duration::from_millis(manifest.limits.wall_time_ms);
        // 1. Grants, before any work.
        self.grants.check(manifest)?;
        if input.len() > MAX_INPUT {
            return Err(RunError::Input(format!("input is over {MAX_INPUT} bytes")));
        }
        // 2. The module: the one compiled for its CID when the memory cache holds it (its
        //    bytes were checked then), else checked, compiled or loaded from the disk cache
        //    on a blocking thread. The common case costs no thread hop and no copy.
        let cid = manifest.implementation.cid;
        let module = match self.executor.in_memory(&cid) {
            Some(module) => module,
            None => {
                let executor = self.executor.clone();
                let bytes = wasm.to_vec();
                tokio::task::spawn_blocking(move || executor.prepare(&cid, &bytes))
                    .await
                    .map_err(|e| RunError::Input(format!("compile task failed: {e}")))??
            }
        };
        // 3. The snapshot.
        let takes_snapshot = !manifest.permissions.snapshotters.is_empty();
        let snapshot = match (given, takes_snapshot) {
            (Some(_), _) | (None, false) => None,
            (None, true) => {
                let url = input_url(input)?;
                let preference = self.grants.snapshotters_for(manifest);
                let remaining = wall.saturating_sub(started.elapsed());
                let snap =
                    tokio::time::timeout(remaining, self.snapshotters.take(&preference, &url))
                        .await
                        .map_err(|_| RunError::WallTime(wall))??;
                tracing::info!(
                    snapshotter = snapshotter_name(snap.snapshotter),
                    cid = %snap.cid,
                    status = snap.status,
                    len = snap.body.len(),
                    fallback = snap.fallback.as_deref().unwrap_or(""),
                    "snapshot taken"
                );
                Some(snap)
            }
        };
        let snapshot_input = match (&given, &snapshot) {
            (Some(g), _) => Some(SnapshotInput {
                final_url: g.final_url,
                body: g.body,
            }),
            (None, Some(s)) => Some(SnapshotInput {
                final_url: &s.final_url,
                body: &s.body,
            }),
            (None, None) => None,
        };
        let buf = encode_input(input, snapshot_input)?;
        // 4. The Wasm step, in what is left of the wall time.
        let remaining = wall.saturating_sub(started.elapsed());
        if remaining.is_zero() {
            return Err(RunError::WallTime(wall));
        }
        let limits = RunLimits {
            wall_time: remaining,
            ..RunLimits::from(&manifest.limits)
        };
        let wasm_started = Instant::now();
        // First on this thread with at most `INLINE_FUEL`: a run that ends within it costs
        // no thread hop. One that needs more is run again, whole, on the blocking pool (a
        // run is deterministic and has no effects, so the first attempt changes nothing).
        let inline = RunLimits {
            fuel: limits.fuel.min(INLINE_FUEL),
            ..limits
        };
        let outcome = match self.executor.run(&module, &buf, &inline)? {
            Outcome::Trap {
                reason: TrapReason::OutOfFuel,
                ..
            } if limits.fuel > inline.fuel => {
                let executor = self.executor.clone();
                tokio::task::spawn_blocking(move || executor.run(&module, &buf, &limits))
                    .await
                    .map_err(|e| RunError::Input(format!("run task failed: {e}")))??
            }
            done => done,
        };
        let wasm_time = wasm_started.elapsed();
        let fuel = outcome.fuel_used();
        match outcome.into_output() {
            Ok((output, fuel_used)) => Ok(RunOutput {
                output_cid: Cid::raw(&output),
                output,
                fuel_used,
                snapshot,
                wasm_time,
            }),
            Err(reason) => Err(RunError::Trap {
                fuel_used: fuel,
                reason,
            }),
        }
    }
}

/// The `"url"` string of a JSON task input.
pub fn input_url(input: &[u8]) -> Result<String, RunError> {
    let v: serde_json::Value =
        serde_json::from_slice(input).map_err(|e| RunError::Input(e.to_string()))?;
    v.get("url")
        .and_then(serde_json::Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| RunError::Input("the input needs a \"url\" string".into()))
}
