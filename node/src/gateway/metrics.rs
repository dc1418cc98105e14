//! The gateway's counters and histograms, served at `GET /metrics` in the Prometheus text
//! exposition format 0.0.4 ([`CONTENT_TYPE`]).
//!
//! Hand-written on atomics (no metrics crate): every label value comes from a bounded set
//! (route templates, status codes, `&'static str` outcome and refusal codes, payee roles),
//! so the number of series is bounded too.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `d402_gateway_http_requests_total` | counter | `route`, `status` |
//! | `d402_gateway_payments_verified_total` | counter | |
//! | `d402_gateway_payments_refused_total` | counter | `code` |
//! | `d402_gateway_task_requests_total` | counter | `outcome` (every `POST /v1/tasks`) |
//! | `d402_gateway_tasks_total` | counter | `outcome`: `completed`, `failed`, `refunded` |
//! | `d402_gateway_task_duration_seconds` | histogram | (paid tasks, payment to answer) |
//! | `d402_gateway_settled_units_total` | counter | `role`: `worker`, `creator`, `gateway`, `refund` |
//! | `d402_gateway_uptime_seconds` | gauge | |
//! | `d402_gateway_busy_backoffs_total` | counter | `kind`: `lease` (refused `no_capacity`), `bid_round` (declined for want of a slot) |

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    extract::{MatchedPath, Request, State},
    http::{HeaderValue, header},
    middleware::Next,
    response::{IntoResponse, Response},
};

use d402_protocol::messages::{PayeeRole, SettlementReceipt};

use crate::market::busy::Backoffs;

/// `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds (seconds) of the task latency histogram's buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How a paid task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TaskOutcome {
    /// Accepted and captured.
    Completed,
    /// Failed (the payment is refunded, see [`TaskOutcome::Refunded`]) or errored.
    Failed,
    /// Not served; the payment went back.
    Refunded,
}

impl TaskOutcome {
    fn label(self) -> &'static str {
        match self {
            TaskOutcome::Completed => "completed",
            TaskOutcome::Failed => "failed",
            TaskOutcome::Refunded => "refunded",
        }
    }
}

/// A histogram of durations with fixed buckets; the sum is kept in microseconds.
#[derive(Debug)]
struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        // Non-cumulative per bucket; rendering accumulates.
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

fn role_index(role: PayeeRole) -> usize {
    match role {
        PayeeRole::Worker => 0,
        PayeeRole::Creator => 1,
        PayeeRole::Gateway => 2,
        PayeeRole::Refund => 3,
    }
}

const ROLES: [&str; 4] = ["worker", "creator", "gateway", "refund"];

/// The gateway's metrics. Share it as `Arc<Metrics>`.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    payments_verified: AtomicU64,
    payments_refused: Mutex<BTreeMap<&'static str, u64>>,
    task_requests: Mutex<BTreeMap<&'static str, u64>>,
    tasks: [AtomicU64; 3],
    latency: Histogram,
    settled_units: [AtomicU64; 4],
    backoffs: Arc<Backoffs>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn bump<K: Ord>(map: &Mutex<BTreeMap<K, u64>>, key: K) {
    let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
    let v = m.entry(key).or_default();
    *v = v.saturating_add(1);
}

/// Escapes a label value (backslash, double quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Most distinct `(route, status)` series kept; later ones are counted under `route="other"`.
const MAX_REQUEST_SERIES: usize = 256;

impl Metrics {
    /// All zero.
    pub fn new() -> Self {
        Self::with_backoffs(Arc::default())
    }

    /// Metrics that also show `backoffs` (the coordinator's, [`Coordinator::backoffs`]).
    ///
    /// [`Coordinator::backoffs`]: crate::market::coordinator::Coordinator::backoffs
    pub fn with_backoffs(backoffs: Arc<Backoffs>) -> Self {
        Metrics {
            started: Instant::now(),
            requests: Mutex::new(BTreeMap::new()),
            payments_verified: AtomicU64::new(0),
            payments_refused: Mutex::new(BTreeMap::new()),
            task_requests: Mutex::new(BTreeMap::new()),
            tasks: std::array::from_fn(|_| AtomicU64::new(0)),
            latency: Histogram::new(),
            settled_units: std::array::from_fn(|_| AtomicU64::new(0)),
            backoffs,
        }
    }

    /// Counts an HTTP answer on `route` (the route template, e.g. `/v1/tasks/{id}`).
    pub fn observe_request(&self, route: &str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        let key = if m.len() >= MAX_REQUEST_SERIES && !m.contains_key(&(route.to_string(), status))
        {
            ("other".to_string(), status)
        } else {
            (route.to_string(), status)
        };
        let v = m.entry(key).or_default();
        *v = v.saturating_add(1);
    }

    /// Counts a payment the rail verified.
    pub fn payment_verified(&self) {
        self.payments_verified.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a payment refused with `code` (`payment_invalid`, `payment_replayed`, …).
    pub fn payment_refused(&self, code: &'static str) {
        bump(&self.payments_refused, code);
    }

    /// Counts one `POST /v1/tasks` by how it was answered (`payment_required`, `refused`,
    /// `replayed`, `completed`, `refunded`, …) and, for a paid task (`completed`,
    /// `refunded`, `failed`), records it in [`Self::task_finished`] too.
    pub fn observe_task(&self, outcome: &'static str, elapsed: Duration) {
        bump(&self.task_requests, outcome);
        match outcome {
            "completed" => self.task_finished(TaskOutcome::Completed, elapsed),
            "refunded" => self.task_finished(TaskOutcome::Refunded, elapsed),
            "failed" => self.task_finished(TaskOutcome::Failed, elapsed),
            _ => {}
        }
    }

    /// Counts a paid task that ended, and its latency.
    pub fn task_finished(&self, outcome: TaskOutcome, elapsed: Duration) {
        let i = match outcome {
            TaskOutcome::Completed => 0,
            TaskOutcome::Failed => 1,
            TaskOutcome::Refunded => 2,
        };
        self.tasks[i].fetch_add(1, Ordering::Relaxed);
        self.latency.observe(elapsed);
    }

    /// Adds `units` paid to `role`.
    pub fn settled(&self, role: PayeeRole, units: u64) {
        let _ = self.settled_units[role_index(role)].try_update(
            Ordering::Relaxed,
            Ordering::Relaxed,
            |v| Some(v.saturating_add(units)),
        );
    }

    /// Adds every transfer of a settlement receipt.
    pub fn observe_receipt(&self, receipt: &SettlementReceipt) {
        for t in &receipt.transfers {
            self.settled(t.role, t.units);
        }
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(2048);
        let _ = self.render_into(&mut out);
        out
    }

    fn render_into(&self, out: &mut String) -> std::fmt::Result {
        writeln!(
            out,
            "# HELP d402_gateway_http_requests_total HTTP answers by route template and status."
        )?;
        writeln!(out, "# TYPE d402_gateway_http_requests_total counter")?;
        for ((route, status), v) in self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            writeln!(
                out,
                "d402_gateway_http_requests_total{{route=\"{}\",status=\"{status}\"}} {v}",
                escape(route)
            )?;
        }
        writeln!(
            out,
            "# HELP d402_gateway_payments_verified_total Payments verified by the rail."
        )?;
        writeln!(out, "# TYPE d402_gateway_payments_verified_total counter")?;
        writeln!(
            out,
            "d402_gateway_payments_verified_total {}",
            self.payments_verified.load(Ordering::Relaxed)
        )?;
        writeln!(
            out,
            "# HELP d402_gateway_payments_refused_total Payments refused, by error code."
        )?;
        writeln!(out, "# TYPE d402_gateway_payments_refused_total counter")?;
        for (code, v) in self
            .payments_refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            writeln!(
                out,
                "d402_gateway_payments_refused_total{{code=\"{}\"}} {v}",
                escape(code)
            )?;
        }
        writeln!(
            out,
            "# HELP d402_gateway_task_requests_total POST /v1/tasks answers by outcome."
        )?;
        writeln!(out, "# TYPE d402_gateway_task_requests_total counter")?;
        for (outcome, v) in self
            .task_requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            writeln!(
                out,
                "d402_gateway_task_requests_total{{outcome=\"{}\"}} {v}",
                escape(outcome)
            )?;
        }
        writeln!(
            out,
            "# HELP d402_gateway_tasks_total Paid tasks that ended, by outcome."
        )?;
        writeln!(out, "# TYPE d402_gateway_tasks_total counter")?;
        for o in [
            TaskOutcome::Completed,
            TaskOutcome::Failed,
            TaskOutcome::Refunded,
        ] {
            let i = match o {
                TaskOutcome::Completed => 0,
                TaskOutcome::Failed => 1,
                TaskOutcome::Refunded => 2,
            };
            writeln!(
                out,
                "d402_gateway_tasks_total{{outcome=\"{}\"}} {}",
                o.label(),
                self.tasks[i].load(Ordering::Relaxed)
            )?;
        }
        writeln!(
            out,
            "# HELP d402_gateway_task_duration_seconds Paid tasks, from payment to answer."
        )?;
        writeln!(out, "# TYPE d402_gateway_task_duration_seconds histogram")?;
        let mut cumulative = 0u64;
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += self.latency.buckets[i].load(Ordering::Relaxed);
            writeln!(
                out,
                "d402_gateway_task_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            )?;
        }
        let count = self.latency.count.load(Ordering::Relaxed);
        writeln!(
            out,
            "d402_gateway_task_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        )?;
        let sum_micros = self.latency.sum_micros.load(Ordering::Relaxed);
        writeln!(
            out,
            "d402_gateway_task_duration_seconds_sum {}.{:06}",
            sum_micros / 1_000_000,
            sum_micros % 1_000_000
        )?;
        writeln!(out, "d402_gateway_task_duration_seconds_count {count}")?;
        writeln!(
            out,
            "# HELP d402_gateway_settled_units_total Smallest units paid out by settlement, by payee role."
        )?;
        writeln!(out, "# TYPE d402_gateway_settled_units_total counter")?;
        for (i, role) in ROLES.iter().enumerate() {
            writeln!(
                out,
                "d402_gateway_settled_units_total{{role=\"{role}\"}} {}",
                self.settled_units[i].load(Ordering::Relaxed)
            )?;
        }
        let busy = self.backoffs.counts();
        writeln!(
            out,
            "# HELP d402_gateway_busy_backoffs_total Waits for busy workers: leases refused for want of a free slot, bid rounds declined for it."
        )?;
        writeln!(out, "# TYPE d402_gateway_busy_backoffs_total counter")?;
        writeln!(
            out,
            "d402_gateway_busy_backoffs_total{{kind=\"lease\"}} {}",
            busy.leases
        )?;
        writeln!(
            out,
            "d402_gateway_busy_backoffs_total{{kind=\"bid_round\"}} {}",
            busy.bid_rounds
        )?;
        writeln!(
            out,
            "# HELP d402_gateway_uptime_seconds Seconds since the gateway started."
        )?;
        writeln!(out, "# TYPE d402_gateway_uptime_seconds gauge")?;
        writeln!(
            out,
            "d402_gateway_uptime_seconds {}",
            self.started.elapsed().as_secs()
        )
    }

    /// The `GET /metrics` answer.
    pub fn response(&self) -> Response {
        let mut r = self.render().into_response();
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        r
    }
}

/// Axum middleware counting every answer by route template and status:
/// `router.layer(axum::middleware::from_fn_with_state(metrics, metrics::track))`.
pub async fn track(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(req).await;
    metrics.observe_request(&route, response.status().as_u16());
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::{Router, body::Body, routing::get};
    use d402_protocol::{TaskId, messages::Transfer};
    use tower::ServiceExt;

    fn value(text: &str, series: &str) -> Option<String> {
        text.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')
                .map(str::to_string)
        })
    }

    #[test]
    fn renders_counters_histogram_and_units() {
        let backoffs = Arc::new(Backoffs::default());
        let m = Metrics::with_backoffs(backoffs.clone());
        backoffs.lease(3);
        backoffs.bid_round();
        m.observe_request("/v1/tasks", 402);
        m.observe_request("/v1/tasks", 402);
        m.observe_request("/v1/tasks", 200);
        m.payment_verified();
        m.payment_refused("payment_replayed");
        m.observe_task("payment_required", Duration::from_millis(1));
        m.observe_task("completed", Duration::from_millis(3));
        m.observe_task("refunded", Duration::from_millis(700));
        m.task_finished(TaskOutcome::Failed, Duration::from_secs(100));
        m.observe_receipt(&SettlementReceipt {
            v: 1,
            task_id: TaskId([1; 16]),
            rail: d402_protocol::RailKind::Local,
            payer: "p".into(),
            charged: d402_protocol::Amount {
                asset: "local:USDC".into(),
                units: 10_000,
            },
            transfers: vec![
                Transfer {
                    role: PayeeRole::Worker,
                    to: "w".into(),
                    units: 2700,
                    claim_cid: None,
                    registration_cid: None,
                },
                Transfer {
                    role: PayeeRole::Creator,
                    to: "c".into(),
                    units: 300,
                    claim_cid: None,
                    registration_cid: None,
                },
                Transfer {
                    role: PayeeRole::Gateway,
                    to: "g".into(),
                    units: 7000,
                    claim_cid: None,
                    registration_cid: None,
                },
            ],
            tx_refs: vec![],
            settled_at: 1,
        });
        let t = m.render();
        let v = |s: &str| value(&t, s).unwrap_or_else(|| panic!("{s} missing in\n{t}"));
        assert_eq!(
            v("d402_gateway_http_requests_total{route=\"/v1/tasks\",status=\"402\"}"),
            "2"
        );
        assert_eq!(v("d402_gateway_payments_verified_total"), "1");
        assert_eq!(
            v("d402_gateway_payments_refused_total{code=\"payment_replayed\"}"),
            "1"
        );
        assert_eq!(
            v("d402_gateway_task_requests_total{outcome=\"payment_required\"}"),
            "1"
        );
        assert_eq!(v("d402_gateway_tasks_total{outcome=\"completed\"}"), "1");
        assert_eq!(v("d402_gateway_tasks_total{outcome=\"refunded\"}"), "1");
        assert_eq!(v("d402_gateway_tasks_total{outcome=\"failed\"}"), "1");
        // Cumulative buckets: 3 ms is in le=0.005, 700 ms in le=1, 100 s only in +Inf.
        assert_eq!(
            v("d402_gateway_task_duration_seconds_bucket{le=\"0.0025\"}"),
            "0"
        );
        assert_eq!(
            v("d402_gateway_task_duration_seconds_bucket{le=\"0.005\"}"),
            "1"
        );
        assert_eq!(
            v("d402_gateway_task_duration_seconds_bucket{le=\"1\"}"),
            "2"
        );
        assert_eq!(
            v("d402_gateway_task_duration_seconds_bucket{le=\"30\"}"),
            "2"
        );
        assert_eq!(
            v("d402_gateway_task_duration_seconds_bucket{le=\"+Inf\"}"),
            "3"
        );
        assert_eq!(v("d402_gateway_task_duration_seconds_count"), "3");
        assert_eq!(v("d402_gateway_task_duration_seconds_sum"), "100.703000");
        assert_eq!(
            v("d402_gateway_settled_units_total{role=\"worker\"}"),
            "2700"
        );
        assert_eq!(
            v("d402_gateway_settled_units_total{role=\"creator\"}"),
            "300"
        );
        assert_eq!(
            v("d402_gateway_settled_units_total{role=\"gateway\"}"),
            "7000"
        );
        assert_eq!(v("d402_gateway_busy_backoffs_total{kind=\"lease\"}"), "3");
        assert_eq!(
            v("d402_gateway_busy_backoffs_total{kind=\"bid_round\"}"),
            "1"
        );
        // Every sample line belongs to a declared family.
        for line in t.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            let family = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                t.contains(&format!("# TYPE {family} ")),
                "{line}: no TYPE for {family}"
            );
        }
    }

    #[test]
    fn labels_are_escaped_and_series_bounded() {
        let m = Metrics::new();
        m.observe_request("/a\"b\\c\nd", 200);
        assert!(
            m.render()
                .contains("route=\"/a\\\"b\\\\c\\nd\",status=\"200\"")
        );
        for i in 0..MAX_REQUEST_SERIES + 10 {
            m.observe_request(&format!("/r{i}"), 200);
        }
        let t = m.render();
        assert!(t.contains("route=\"other\""), "{t}");
        let series = t
            .lines()
            .filter(|l| l.starts_with("d402_gateway_http_requests_total{"))
            .count();
        assert!(series <= MAX_REQUEST_SERIES + 1, "{series}");
    }

    #[tokio::test]
    async fn middleware_counts_route_templates() {
        let metrics = Arc::new(Metrics::new());
        let app = Router::new()
            .route("/v1/tasks/{id}", get(|| async { "ok" }))
            .layer(axum::middleware::from_fn_with_state(metrics.clone(), track));
        for uri in ["/v1/tasks/a", "/v1/tasks/b", "/nope"] {
            let _ = app
                .clone()
                .oneshot(
                    axum::http::Request::builder()
                        .uri(uri)
                        .body(Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
        }
        let t = metrics.render();
        assert!(
            t.contains(
                "d402_gateway_http_requests_total{route=\"/v1/tasks/{id}\",status=\"200\"} 2"
            ),
            "{t}"
        );
        assert!(t.contains("route=\"unmatched\",status=\"404\"} 1"), "{t}");
        let r = metrics.response();
        assert_eq!(r.headers().get(header::CONTENT_TYPE).unwrap(), CONTENT_TYPE);
    }
}
