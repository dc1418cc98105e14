//! The HTTP answer of a gateway whose payment rail is not part of this build (every rail but
//! `local` today): the node still joins the network and serves `/healthz`, and every other
//! request gets `503 rail_unavailable` naming the rail, so an operator following the guide
//! sees at once why nothing is sold, and no client is ever asked to pay.

use std::net::SocketAddr;

use axum::{Router, http::StatusCode, response::Response, routing::get};
use d402_protocol::RailKind;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

use super::{cors, error::ApiError, health};

/// The stable error code of every refused request.
pub const CODE: &str = "rail_unavailable";

/// A running refusal server.
#[derive(Debug)]
pub struct Unavailable {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

/// The router: `/healthz` answers, everything else is `503 rail_unavailable`.
pub fn app(rail: RailKind) -> Router {
    let refuse = move || async move { refusal(rail) };
    Router::new()
        .route("/healthz", get(|| async { health::healthz() }))
        .fallback(refuse)
        .layer(cors::layer())
}

fn refusal(rail: RailKind) -> Response {
    use axum::response::IntoResponse;
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        CODE,
        format!(
            "this gateway is configured for the {rail} rail, which is not available in this \
             build; nothing is sold and nothing is charged (run the gateway with --payment local)"
        ),
    )
    .into_response()
}

impl Unavailable {
    /// Binds `listen` and serves the refusal router.
    pub async fn start(listen: SocketAddr, rail: RailKind) -> std::io::Result<Unavailable> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app(rail)).with_graceful_shutdown(async {
                let _ = rx.await;
            });
            if let Err(e) = serve.await {
                tracing::warn!(error = %e, "the HTTP server stopped");
            }
        });
        Ok(Unavailable {
            addr,
            stop: Some(tx),
            task,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = self.task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt;

    #[tokio::test]
    async fn every_request_but_healthz_is_refused_with_the_rail_named() {
        let app = app(RailKind::SolanaDirect);
        let ok = app
            .clone()
            .oneshot(
                axum::http::Request::get("/healthz")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(ok.status(), StatusCode::OK);
        let refused = app
            .oneshot(
                axum::http::Request::post("/v1/tasks")
                    .body(Body::from("{}"))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(refused.headers().get("payment-required").is_none());
        let body = axum::body::to_bytes(refused.into_body(), 1 << 16)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], CODE);
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("solana-direct"),
            "{v}"
        );
    }
}
