//! CORS for browser apps: any origin may `GET` and `POST`, send the payment and
//! idempotency headers, and read the x402 answer headers.

use axum::http::{HeaderName, Method, header};
use tower_http::cors::{Any, CorsLayer};

use d402_settlement::x402::{
    PAYMENT_REQUIRED, PAYMENT_RESPONSE, PAYMENT_SIGNATURE, X_PAYMENT, X_PAYMENT_RESPONSE,
};

/// Request headers a browser may send.
pub fn allowed_headers() -> Vec<HeaderName> {
    vec![
        header::CONTENT_TYPE,
        HeaderName::from_static("idempotency-key"),
        lower(PAYMENT_SIGNATURE),
        lower(X_PAYMENT),
    ]
}

/// Response headers a browser may read.
pub fn exposed_headers() -> Vec<HeaderName> {
    vec![
        lower(PAYMENT_REQUIRED),
        lower(PAYMENT_RESPONSE),
        lower(X_PAYMENT_RESPONSE),
    ]
}

fn lower(name: &str) -> HeaderName {
    // The x402 names are static ASCII tokens; lowercase them for the header map.
    HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
        .unwrap_or_else(|_| HeaderName::from_static("x-invalid"))
}

/// The gateway's CORS layer.
pub fn layer() -> CorsLayer {
    CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers(allowed_headers())
        .expose_headers(exposed_headers())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::{Router, body::Body, http::Request, routing::post};
    use tower::ServiceExt;

    #[tokio::test]
    async fn preflight_and_exposed_headers() {
        let app = Router::new()
            .route("/v1/tasks", post(|| async { "ok" }))
            .layer(layer());
        let pre = app
            .clone()
            .oneshot(
                Request::builder()
                    .method("OPTIONS")
                    .uri("/v1/tasks")
                    .header("origin", "https://app.example")
                    .header("access-control-request-method", "POST")
                    .header(
                        "access-control-request-headers",
                        "content-type,idempotency-key,payment-signature,x-payment",
                    )
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert!(pre.status().is_success(), "{}", pre.status());
        let h = pre.headers();
        assert_eq!(h["access-control-allow-origin"], "*");
        let methods = h["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            methods.contains("GET") && methods.contains("POST"),
            "{methods}"
        );
        let allowed = h["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .to_ascii_lowercase();
        for name in [
            "content-type",
            "idempotency-key",
            "payment-signature",
            "x-payment",
        ] {
            assert!(allowed.contains(name), "{allowed}");
        }
        let r = app
            .oneshot(
                Request::builder()
                    .method("POST")
                    .uri("/v1/tasks")
                    .header("origin", "https://app.example")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let exposed = r.headers()["access-control-expose-headers"]
            .to_str()
            .unwrap()
            .to_ascii_lowercase();
        for name in ["payment-required", "payment-response", "x-payment-response"] {
            assert!(exposed.contains(name), "{exposed}");
        }
    }
}
