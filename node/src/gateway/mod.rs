//! The gateway's HTTP API (`--http-port`): paid tasks over x402, the capabilities sold,
//! health, metrics and the OpenAPI document. See the HTTP contract in DESIGN.md §3/§6.
//!
//! The parts that plug into the router:
//! - [`error`]: [`error::ApiError`], the JSON error shape of every non-2xx answer;
//! - [`tasks`]: `POST /v1/tasks` (policy, x402 challenge, verify, durable lock, the task
//!   through the [`Coordinator`], capture with splits or refund) and `GET /v1/tasks/{id}`;
//! - [`local`]: the `local` rail's account and faucet endpoints;
//! - [`policy`]: the server-owned policy (price, budget, fanout, quorum, URL and capability
//!   acceptance) checked before any payment;
//! - [`idempotency`]: `Idempotency-Key` records in the node's redb;
//! - [`metrics`]: Prometheus text exposition;
//! - [`health`], [`cors`], [`capabilities`], [`openapi`]: the small routes and layers.
//!
//! [`Gateway::start`] binds the listener, settles every payment a crash left locked
//! (capture when the task was accepted, refund otherwise, once its task ends) and serves
//! [`ROUTES`].

pub mod capabilities;
pub mod cors;
pub mod error;
pub mod health;
pub mod idempotency;
pub mod local;
pub mod metrics;
pub mod openapi;
pub mod policy;
pub mod tasks;
pub mod unavailable;

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use axum::{
    Json, Router,
    extract::State,
    routing::{MethodRouter, get, post},
};
use tokio::{sync::oneshot, task::JoinHandle};
use tracing::{info, warn};

use d402_settlement::{LocalRail, Rail};

use crate::{market::coordinator::Coordinator, net::NetHandle, state::State as NodeState};

pub use idempotency::Idempotency;
pub use metrics::Metrics;
pub use policy::{GatewayPolicy, GatewaySettings};

/// Every route the gateway serves: (method, path in axum syntax). The router is built
/// from this list and the OpenAPI sync test checks it against the document.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/tasks"),
    ("GET", "/v1/tasks/{id}"),
    ("GET", "/v1/capabilities"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/v1/local/accounts/{address}"),
    ("POST", "/v1/local/faucet"),
];

/// Largest `POST /v1/tasks` body.
pub const MAX_TASK_BODY: usize = policy::MAX_REQUEST_BODY;

/// How long a task may run before it fails (and is refunded).
pub const DEFAULT_TASK_TIMEOUT: Duration = Duration::from_secs(60);

/// How the HTTP side runs.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Where to listen (port 0: the OS chooses).
    pub listen: SocketAddr,
    /// Base URL of the x402 `resource` (e.g. `https://api.example.com`); default
    /// `http://<bound address>`.
    pub public_url: Option<String>,
    /// Serve `POST /v1/local/faucet` (devnet and tests only).
    pub dev_faucet: bool,
    /// A task's deadline after its payment is locked.
    pub task_timeout: Duration,
    /// Largest `POST /v1/tasks` body.
    pub max_body: usize,
    /// How long a keyed request's answer is kept for replay; older finished records are
    /// purged every `idempotency_ttl / 24`, kept between a second and an hour.
    pub idempotency_ttl: Duration,
}

impl GatewayConfig {
    /// Defaults for `listen`.
    pub fn new(listen: SocketAddr, dev_faucet: bool) -> Self {
        GatewayConfig {
            listen,
            public_url: None,
            dev_faucet,
            task_timeout: DEFAULT_TASK_TIMEOUT,
            max_body: MAX_TASK_BODY,
            idempotency_ttl: idempotency::DEFAULT_TTL,
        }
    }
}

/// What the gateway is built from.
pub struct GatewayParts {
    /// The `local` rail, on the node's database.
    pub rail: Arc<LocalRail>,
    /// Buys the work.
    pub coordinator: Coordinator,
    /// The network.
    pub net: NetHandle,
    /// The node's database.
    pub state: NodeState,
    /// The server-owned policy.
    pub policy: GatewayPolicy,
}

/// What every handler sees.
pub struct AppState {
    /// The configuration, `public_url` resolved.
    pub config: GatewayConfig,
    /// The rail.
    pub rail: Arc<LocalRail>,
    /// The coordinator.
    pub coordinator: Coordinator,
    /// The network.
    pub net: NetHandle,
    /// The node's database.
    pub state: NodeState,
    /// The policy.
    pub policy: Arc<GatewayPolicy>,
    /// `Idempotency-Key` records.
    pub idempotency: Idempotency,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// When the gateway started.
    pub started: Instant,
    /// The last readiness answer.
    pub ready: health::ReadyCache,
}

impl AppState {
    /// The x402 `resource` URL of `POST /v1/tasks`.
    pub fn tasks_url(&self) -> String {
        format!(
            "{}/v1/tasks",
            self.config
                .public_url
                .as_deref()
                .unwrap_or("")
                .trim_end_matches('/')
        )
    }
}

/// A running gateway.
pub struct Gateway {
    addr: SocketAddr,
    app: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
    purger: JoinHandle<()>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.purger.abort();
    }
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("addr", &self.addr).finish()
    }
}

fn route(method: &str, path: &str) -> anyhow::Result<MethodRouter<Arc<AppState>>> {
    Ok(match (method, path) {
        ("POST", "/v1/tasks") => post(tasks::create),
        ("GET", "/v1/tasks/{id}") => get(tasks::get_task),
        ("GET", "/v1/capabilities") => get(|State(app): State<Arc<AppState>>| async move {
            Json(capabilities::body(&app.policy, app.rail.network()))
        }),
        ("GET", "/healthz") => get(|| async { health::healthz() }),
        ("GET", "/readyz") => get(|State(app): State<Arc<AppState>>| async move {
            let manifests: Vec<_> = app.policy.sellable().map(|(o, _)| o.manifest_cid).collect();
            app.ready
                .get(health::check(&app.net, &manifests, true))
                .await
                .response()
        }),
        ("GET", "/metrics") => {
            get(|State(app): State<Arc<AppState>>| async move { app.metrics.response() })
        }
        ("GET", "/openapi.json") => get(|| async { Json(openapi::document()) }),
        ("GET", "/v1/local/accounts/{address}") => get(local::account),
        ("POST", "/v1/local/faucet") => post(local::faucet),
        _ => anyhow::bail!("no handler for {method} {path}"),
    })
}

/// The router over [`ROUTES`], counting every answer in [`Metrics`].
pub fn router(app: Arc<AppState>) -> anyhow::Result<Router> {
    let mut r = Router::new();
    for (method, path) in ROUTES {
        r = r.route(path, route(method, path)?);
    }
    let metrics = app.metrics.clone();
    Ok(r.fallback(|| async {
        error::ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "not_found",
            "no such route",
        )
    })
    .with_state(app)
    .layer(cors::layer())
    .layer(axum::middleware::from_fn_with_state(
        metrics,
        metrics::track,
    )))
}

impl Gateway {
    /// Binds `config.listen`, settles what a previous run left locked (resuming the
    /// coordinator's open tasks), and serves the API until [`Gateway::shutdown`].
    pub async fn start(config: GatewayConfig, parts: GatewayParts) -> anyhow::Result<Gateway> {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen for HTTP on {}", config.listen))?;
        let addr = listener.local_addr()?;
        let mut config = config;
        if config.public_url.is_none() {
            config.public_url = Some(format!("http://{addr}"));
        }
        let idempotency = Idempotency::new(parts.state.clone())
            .with_stale_resolver(tasks::stale_resolver(&parts));
        // Acceptance and payment in one commit when the rail is in the coordinator's
        // database (always in `d402 node`).
        if Arc::ptr_eq(parts.rail.database(), parts.coordinator.tasks().database()) {
            parts
                .coordinator
                .on_acceptance(tasks::capture_on_acceptance(
                    parts.rail.clone(),
                    idempotency.clone(),
                ));
        }
        let metrics = Arc::new(Metrics::with_backoffs(parts.coordinator.backoffs()));
        let app = Arc::new(AppState {
            config,
            idempotency,
            rail: parts.rail,
            coordinator: parts.coordinator,
            net: parts.net,
            state: parts.state,
            policy: Arc::new(parts.policy),
            metrics,
            started: Instant::now(),
            ready: health::ReadyCache::new(),
        });
        let recovered = tasks::recover(&app).context("cannot settle the tasks of the last run")?;
        if recovered > 0 {
            info!(
                tasks = recovered,
                "settling payments left locked by the last run"
            );
        }
        let router = router(app.clone())?;
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let serve = axum::serve(listener, router).with_graceful_shutdown(async move {
                let _ = stopped.await;
            });
            if let Err(e) = serve.await {
                warn!(error = %e, "the HTTP server stopped");
            }
        });
        let ttl = app.config.idempotency_ttl;
        let purger = tokio::spawn(app.idempotency.clone().purge_periodically(
            ttl,
            (ttl / 24).clamp(Duration::from_secs(1), Duration::from_secs(3600)),
        ));
        info!(%addr, "gateway HTTP API listening");
        Ok(Gateway {
            addr,
            app,
            stop: Some(stop),
            server,
            purger,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<bound address>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The handlers' shared state (rail, coordinator, policy).
    pub fn app(&self) -> &Arc<AppState> {
        &self.app
    }

    /// Stops accepting requests and waits (up to 10 s) for those in flight.
    pub async fn shutdown(mut self) {
        self.purger.abort();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if tokio::time::timeout(Duration::from_secs(10), &mut self.server)
            .await
            .is_err()
        {
            self.server.abort();
        }
    }
}
