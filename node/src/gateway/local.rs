//! The `local` rail's endpoints: `GET /v1/local/accounts/{address}` (a balance) and, only
//! with `--dev-faucet true`, `POST /v1/local/faucet` (credits out of thin air; devnets and
//! tests). Amounts are integer strings of the asset's smallest unit.

use std::sync::Arc;

use axum::{
    Json,
    body::Body,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Deserialize;

use d402_settlement::{Rail, RailError};

use super::{AppState, error::ApiError};
use crate::market::now_ms;

/// Largest faucet request body.
const MAX_FAUCET_BODY: usize = 4 * 1024;

fn rail_error(e: RailError) -> ApiError {
    match e {
        RailError::InvalidAddress { .. } => {
            ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string())
        }
        RailError::FaucetDisabled => {
            ApiError::new(StatusCode::FORBIDDEN, "faucet_disabled", e.to_string())
        }
        RailError::Overflow(_) => {
            ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string())
        }
        other => {
            tracing::warn!(error = %other, "local rail error");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                other.to_string(),
            )
        }
    }
}

/// `GET /v1/local/accounts/{address}`.
pub async fn account(State(app): State<Arc<AppState>>, Path(address): Path<String>) -> Response {
    match app.rail.balance(&address) {
        Ok(units) => Json(serde_json::json!({
            "address": address,
            "asset": app.rail.asset().id,
            "units": units.to_string(),
        }))
        .into_response(),
        Err(e) => rail_error(e).into_response(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaucetRequest {
    address: String,
    units: String,
}

/// `POST /v1/local/faucet`: `{"address":"…","units":"<u64>"}` → `{"address","units":"<new
/// balance>"}`; 403 `faucet_disabled` unless the node runs with `--dev-faucet true`.
pub async fn faucet(State(app): State<Arc<AppState>>, body: Body) -> Response {
    match faucet_inner(&app, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn faucet_inner(app: &Arc<AppState>, body: Body) -> Result<Response, ApiError> {
    if !app.config.dev_faucet || !app.rail.config().dev_mode {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "faucet_disabled",
            "the faucet is off: it runs only on a gateway started with --dev-faucet true",
        ));
    }
    let bytes = axum::body::to_bytes(body, MAX_FAUCET_BODY)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body is larger than {MAX_FAUCET_BODY} bytes"),
            )
        })?;
    let req: FaucetRequest = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("the body must be {{\"address\":\"…\",\"units\":\"<integer>\"}}: {e}"),
        )
    })?;
    let units: u64 = req
        .units
        .parse()
        .ok()
        .filter(|u| *u > 0 && req.units.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("units {:?} must be a positive integer string", req.units),
            )
        })?;
    let rail = app.rail.clone();
    let address = req.address.clone();
    let balance = tokio::task::spawn_blocking(move || rail.faucet(&address, units, now_ms()))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(rail_error)?;
    Ok(Json(serde_json::json!({
        "address": req.address,
        "units": balance.to_string(),
    }))
    .into_response())
}
