//! [`ApiError`]: every non-2xx answer of the gateway (except the 402, whose body is the
//! x402 v1 JSON) is `{"error":{"code":"<stable_snake_case>","message":"<human text>"}}`.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};

/// An HTTP error with a stable code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// Stable snake_case code, e.g. `capability_refused`.
    pub code: &'static str,
    /// Human-readable reason.
    pub message: String,
}

impl ApiError {
    /// An error with `status`, stable `code` and a human `message`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {"code": self.code, "message": self.message}})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}
