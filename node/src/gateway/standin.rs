//! Temporary stand-ins for the modules helper "gateway-surface" is writing (policy,
//! idempotency, metrics, health, capabilities, OpenAPI), with the interfaces agreed in the
//! gateway contract. Each is replaced by the real module as it lands; nothing here is meant
//! to stay.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use axum::{
    Json,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};

use d402_capabilities::{AcceptancePolicy, AcceptedTerms};
use d402_protocol::{CapabilityRef, Cid, RailKind};
use d402_settlement::Rail;

use super::{AppState, error::ApiError};
use crate::{capstore, config::NodeConfig};

/// A capability this gateway sells, with the terms it settles by.
#[derive(Debug, Clone)]
pub struct SoldCapability {
    /// `id@version`.
    pub capability: CapabilityRef,
    /// The exact manifest.
    pub manifest_cid: Cid,
    /// The accepted terms (commission, creator wallet).
    pub terms: AcceptedTerms,
}

/// A request the policy admitted.
#[derive(Debug, Clone)]
pub struct Admitted {
    /// `id@version`.
    pub capability: CapabilityRef,
    /// The exact manifest.
    pub manifest_cid: Cid,
    /// Commission terms.
    pub terms: AcceptedTerms,
    /// The bytes sent to workers.
    pub input: Vec<u8>,
    /// Price charged.
    pub price_units: u64,
    /// Most paid to workers together.
    pub budget_units: u64,
    /// Workers leased.
    pub fanout: u32,
    /// Agreeing claims needed.
    pub quorum: u32,
}

/// The server-owned policy (stand-in: capability allowlist and acceptance only).
#[derive(Debug, Clone)]
pub struct GatewayPolicy {
    sold: Vec<SoldCapability>,
    price_units: u64,
    budget_units: u64,
    fanout: u32,
    quorum: u32,
}

impl GatewayPolicy {
    /// From the node's flags: each `--offer` resolved and accepted at start.
    pub fn from_config(cfg: &NodeConfig, rail: &dyn Rail) -> anyhow::Result<GatewayPolicy> {
        let price_units = cfg
            .gateway_price_units
            .unwrap_or(rail.asset().parse("0.01")?);
        let budget_units = cfg.gateway_budget_units.unwrap_or(price_units);
        anyhow::ensure!(
            budget_units <= price_units,
            "--gateway-budget ({budget_units} units) is above --gateway-price ({price_units} units)"
        );
        let mut acceptance = AcceptancePolicy::new(RailKind::Local);
        acceptance.require_capability_registration = cfg.require_capability_registration;
        acceptance.require_signed_capability_registration =
            cfg.require_signed_capability_registration;
        if let Some(bps) = cfg.max_creator_commission_bps {
            acceptance.max_creator_commission_bps = bps;
        }
        let mut sold = Vec::new();
        for offer in &cfg.offers {
            let r = capstore::resolve_offer(&cfg.state_dir, offer)?;
            let terms = acceptance
                .check(&r.manifest, r.registration.as_ref())
                .map_err(|e| anyhow::anyhow!("--offer {offer}: {e}"))?;
            sold.push(SoldCapability {
                capability: r.capability,
                manifest_cid: r.manifest_cid,
                terms,
            });
        }
        Ok(GatewayPolicy {
            sold,
            price_units,
            budget_units,
            fanout: cfg.fanout,
            quorum: cfg.quorum,
        })
    }

    /// Admits a request or says why not (before any payment).
    pub fn admit(&self, capability: &str, input: &serde_json::Value) -> Result<Admitted, ApiError> {
        let cap: CapabilityRef = capability.parse().map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("capability: {e}"),
            )
        })?;
        let sold = self
            .sold
            .iter()
            .find(|s| s.capability == cap)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "unknown_capability",
                    format!("this gateway does not sell {cap}"),
                )
            })?;
        if !input.is_object() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_input",
                "input must be a JSON object",
            ));
        }
        let input = serde_json::to_vec(input)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", e.to_string()))?;
        Ok(Admitted {
            capability: sold.capability.clone(),
            manifest_cid: sold.manifest_cid,
            terms: sold.terms.clone(),
            input,
            price_units: self.price_units,
            budget_units: self.budget_units,
            fanout: self.fanout,
            quorum: self.quorum,
        })
    }

    /// What is sold.
    pub fn sold(&self) -> &[SoldCapability] {
        &self.sold
    }
}

/// A stored answer.
#[derive(Debug, Clone)]
pub struct StoredResponse {
    /// HTTP status.
    pub status: u16,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

/// The outcome of [`Idempotency::begin`].
#[derive(Debug, Clone)]
pub enum Begin {
    /// First use of the key.
    New,
    /// The stored answer of the first use.
    Replay(StoredResponse),
}

/// `Idempotency-Key` records (stand-in: keeps nothing, every key is new).
#[derive(Debug, Clone)]
pub struct Idempotency;

impl Idempotency {
    /// On `state`.
    pub fn new(_state: crate::state::State) -> Self {
        Idempotency
    }

    /// Starts a keyed request.
    pub fn begin(&self, _key: &str, _request_hash: [u8; 32]) -> Result<Begin, ApiError> {
        Ok(Begin::New)
    }

    /// Stores the answer.
    pub fn complete(&self, _key: &str, _response: &StoredResponse) -> Result<(), ApiError> {
        Ok(())
    }

    /// Releases a key whose request failed before payment.
    pub fn abandon(&self, _key: &str) {}
}

/// Counters (stand-in).
#[derive(Debug, Default)]
pub struct Metrics {
    tasks: std::sync::Mutex<BTreeMap<&'static str, u64>>,
}

impl Metrics {
    /// Empty.
    pub fn new() -> Self {
        Metrics::default()
    }

    /// Counts a finished request.
    pub fn observe_task(&self, outcome: &'static str, _elapsed: Duration) {
        *self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(outcome)
            .or_default() += 1;
    }
}

pub(super) async fn healthz() -> Response {
    Json(serde_json::json!({"status": "ok"})).into_response()
}

pub(super) async fn readyz(State(app): State<Arc<AppState>>) -> Response {
    match app.net.connected_peers().await {
        Ok(p) if !p.is_empty() => Json(serde_json::json!({"status": "ready"})).into_response(),
        _ => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "no peer connected",
        )
        .into_response(),
    }
}

pub(super) async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    let mut out = String::from("# TYPE d402_gateway_tasks_total counter\n");
    for (k, v) in app
        .metrics
        .tasks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        out.push_str(&format!(
            "d402_gateway_tasks_total{{outcome=\"{k}\"}} {v}\n"
        ));
    }
    out.into_response()
}

pub(super) async fn openapi() -> Response {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "not_ready",
        "the OpenAPI document is not in this build yet",
    )
    .into_response()
}

pub(super) async fn capabilities(State(app): State<Arc<AppState>>) -> Response {
    let list: Vec<_> = app
        .policy
        .sold()
        .iter()
        .map(|s| {
            serde_json::json!({
                "capability": s.capability.to_string(),
                "manifest_cid": s.manifest_cid.to_string(),
                "creator_commission_bps": s.terms.creator_commission_bps,
                "registration_cid": s.terms.registration_cid.map(|c| c.to_string()),
            })
        })
        .collect();
    Json(serde_json::json!({"capabilities": list})).into_response()
}
