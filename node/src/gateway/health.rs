//! `GET /healthz` (the process answers) and `GET /readyz` (the gateway can sell: the
//! network is up, at least one worker offers a capability it sells, and the rail is open).
//!
//! A readiness probe must be cheap, so [`ReadyCache`] keeps the last answer for a few
//! seconds; [`check`] asks the network (connected peers, then a short provider lookup of
//! each sellable manifest CID until one has a worker).

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Serialize;

use d402_protocol::Cid;

use super::error::ApiError;
use crate::net::{LookupOptions, NetHandle};

/// How long a readiness answer is reused.
pub const READY_TTL: Duration = Duration::from_secs(2);

/// How long the provider lookup of one readiness check may take.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// The `/healthz` answer: the process is up.
pub fn healthz() -> Response {
    Json(serde_json::json!({"status": "ok"})).into_response()
}

/// What readiness is decided from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Readiness {
    /// Connected peers.
    pub peers: usize,
    /// Workers found offering a sellable manifest (the lookup stops at the first).
    pub workers: usize,
    /// Capabilities the gateway sells.
    pub sellable: usize,
    /// The rail accepts payments.
    pub rail_open: bool,
}

impl Readiness {
    /// Whether the gateway can sell a task.
    pub fn is_ready(&self) -> bool {
        self.peers > 0 && self.workers > 0 && self.sellable > 0 && self.rail_open
    }

    /// Why not, for the 503's message; `None` when ready.
    pub fn reason(&self) -> Option<String> {
        let mut why = Vec::new();
        if !self.rail_open {
            why.push("the payment rail is not open");
        }
        if self.sellable == 0 {
            why.push("no offered capability passes the gateway's acceptance policy");
        }
        if self.peers == 0 {
            why.push("no peer is connected");
        } else if self.workers == 0 && self.sellable > 0 {
            why.push("no worker offers a capability this gateway sells");
        }
        (!why.is_empty()).then(|| why.join("; "))
    }

    /// `200 {"status":"ready",...}` or `503 not_ready` naming the reason.
    pub fn response(&self) -> Response {
        match self.reason() {
            None => Json(serde_json::json!({
                "status": "ready",
                "peers": self.peers,
                "workers": self.workers,
                "capabilities": self.sellable,
            }))
            .into_response(),
            Some(why) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", why).into_response()
            }
        }
    }
}

/// Asks the network: connected peers, then providers of each of `manifests` (short
/// lookups) until one has a worker.
pub async fn check(net: &NetHandle, manifests: &[Cid], rail_open: bool) -> Readiness {
    let peers = net.connected_peers().await.map_or(0, |p| p.len());
    let mut workers = 0;
    if peers > 0 {
        for cid in manifests {
            let opts = LookupOptions {
                limit: Some(1),
                timeout: LOOKUP_TIMEOUT,
            };
            if let Ok(found) = net.find_providers(*cid, opts).await
                && !found.is_empty()
            {
                workers = found.len();
                break;
            }
        }
    }
    Readiness {
        peers,
        workers,
        sellable: manifests.len(),
        rail_open,
    }
}

/// The last readiness answer, reused for [`READY_TTL`]; a "not ready" is not cached, so a
/// gateway turns ready as soon as it can.
#[derive(Debug, Default)]
pub struct ReadyCache {
    last: Mutex<Option<(Instant, Readiness)>>,
}

impl ReadyCache {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// The cached answer when fresh and ready, else `probe`'s (cached when ready).
    pub async fn get<F>(&self, probe: F) -> Readiness
    where
        F: std::future::Future<Output = Readiness>,
    {
        if let Some((at, r)) = self.last.lock().unwrap_or_else(|p| p.into_inner()).as_ref()
            && at.elapsed() < READY_TTL
        {
            return r.clone();
        }
        let r = probe.await;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        *last = r.is_ready().then(|| (Instant::now(), r.clone()));
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::to_bytes;

    async fn body(r: Response) -> (u16, serde_json::Value) {
        let status = r.status().as_u16();
        let b = to_bytes(r.into_body(), 1 << 20).await.unwrap();
        (status, serde_json::from_slice(&b).unwrap())
    }

    #[tokio::test]
    async fn answers() {
        assert_eq!(
            body(healthz()).await,
            (200, serde_json::json!({"status": "ok"}))
        );
        let ready = Readiness {
            peers: 3,
            workers: 1,
            sellable: 1,
            rail_open: true,
        };
        let (s, b) = body(ready.response()).await;
        assert_eq!((s, b["status"].as_str()), (200, Some("ready")));
        for (r, why) in [
            (
                Readiness {
                    peers: 0,
                    ..ready.clone()
                },
                "no peer",
            ),
            (
                Readiness {
                    workers: 0,
                    ..ready.clone()
                },
                "no worker",
            ),
            (
                Readiness {
                    rail_open: false,
                    ..ready.clone()
                },
                "rail",
            ),
            (
                Readiness {
                    sellable: 0,
                    ..ready.clone()
                },
                "acceptance policy",
            ),
        ] {
            let (s, b) = body(r.response()).await;
            assert_eq!(s, 503);
            assert_eq!(b["error"]["code"], "not_ready");
            assert!(b["error"]["message"].as_str().unwrap().contains(why), "{b}");
        }
    }

    #[tokio::test]
    async fn cache_keeps_ready_only() {
        let cache = ReadyCache::new();
        let not = Readiness {
            peers: 0,
            workers: 0,
            sellable: 1,
            rail_open: true,
        };
        let ready = Readiness {
            peers: 1,
            workers: 1,
            ..not.clone()
        };
        assert_eq!(cache.get(async { not.clone() }).await, not);
        // Not ready was not cached: the next probe runs.
        assert_eq!(cache.get(async { ready.clone() }).await, ready);
        // Ready is cached: the probe is not consulted.
        assert_eq!(cache.get(async { not.clone() }).await, ready);
    }
}
