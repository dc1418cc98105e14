//! The egress proxy the browser must use: an HTTP proxy on loopback that applies the URL
//! policy to every request the page makes.
//!
//! - `CONNECT host:port` (HTTPS, WebSockets): the host is checked and resolved once, the
//!   tunnel goes to a checked address only;
//! - absolute-form requests (`GET http://host/path`): checked, resolved, forwarded to a
//!   checked address, the response streamed back (redirects are the browser's to follow, and
//!   each hop comes back through here);
//! - anything refused gets `403` and is recorded (see [`EgressProxy::refused`]).
//!
//! Chromium is started with `--proxy-server` pointing here, `--proxy-bypass-list=<-loopback>`
//! (so even loopback goes through the proxy) and host-resolver rules that make every
//! other name fail to resolve inside the browser.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, task::JoinSet};

use crate::{
    fetch::connect_checked,
    policy::{Resolver, UrlPolicy},
};

type ProxyBody = BoxBody<Bytes, hyper::Error>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_RECORDED: usize = 256;

struct Shared {
    policy: UrlPolicy,
    resolver: Arc<dyn Resolver>,
    refused: Mutex<Vec<String>>,
    allowed: Mutex<Vec<String>>,
}

/// A running egress proxy; dropping it stops it and every connection through it.
pub struct EgressProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for EgressProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressProxy")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EgressProxy {
    /// Starts a proxy on an ephemeral loopback port.
    pub async fn start(policy: UrlPolicy, resolver: Arc<dyn Resolver>) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            policy,
            resolver,
            refused: Mutex::new(Vec::new()),
            allowed: Mutex::new(Vec::new()),
        });
        let for_task = shared.clone();
        let task = tokio::spawn(async move {
            // Connections live in the set: aborting this task drops it and aborts them all.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let shared = for_task.clone();
                        conns.spawn(async move {
                            let service = service_fn(move |req| handle(shared.clone(), req));
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .with_upgrades()
                                .await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(EgressProxy { addr, shared, task })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests refused so far (`target: reason`), oldest first.
    pub fn refused(&self) -> Vec<String> {
        self.shared
            .refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Targets let through so far, oldest first.
    pub fn allowed(&self) -> Vec<String> {
        self.shared
            .allowed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn record(list: &Mutex<Vec<String>>, entry: String) {
    let mut l = list.lock().unwrap_or_else(|p| p.into_inner());
    if l.len() < MAX_RECORDED {
        l.push(entry);
    }
}

fn text(status: StatusCode, msg: String) -> Response<ProxyBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(msg))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut()
        .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
    r
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    Ok(if req.method() == Method::CONNECT {
        connect(shared, req).await
    } else {
        forward(shared, req).await
    })
}

async fn connect(shared: Arc<Shared>, req: Request<Incoming>) -> Response<ProxyBody> {
    let Some(authority) = req.uri().authority().map(|a| a.to_string()) else {
        return text(StatusCode::BAD_REQUEST, "CONNECT needs host:port".into());
    };
    let target = format!("https://{authority}/");
    let checked = match shared
        .policy
        .resolve(&target, shared.resolver.as_ref())
        .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(%authority, reason = %e, "egress proxy refused CONNECT");
            record(&shared.refused, format!("{authority}: {e}"));
            return text(
                StatusCode::FORBIDDEN,
                format!("refused by d402 URL policy: {e}"),
            );
        }
    };
    let host = checked.url.host_str().unwrap_or_default().to_string();
    let upstream = match connect_checked(&host, &checked.addrs, CONNECT_TIMEOUT).await {
        Ok(s) => s,
        Err(e) => return text(StatusCode::BAD_GATEWAY, e.to_string()),
    };
    record(&shared.allowed, authority);
    tokio::spawn(async move {
        if let Ok(upgraded) = hyper::upgrade::on(req).await {
            let mut client = TokioIo::new(upgraded);
            let mut upstream = upstream;
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        }
    });
    Response::new(
        http_body_util::Empty::new()
            .map_err(|never: Infallible| match never {})
            .boxed(),
    )
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

async fn forward(shared: Arc<Shared>, req: Request<Incoming>) -> Response<ProxyBody> {
    let target = req.uri().to_string();
    if req.uri().scheme_str() != Some("http") {
        record(
            &shared.refused,
            format!("{target}: not an absolute http URL"),
        );
        return text(
            StatusCode::BAD_REQUEST,
            "only absolute http:// requests and CONNECT are proxied".into(),
        );
    }
    let checked = match shared
        .policy
        .resolve(&target, shared.resolver.as_ref())
        .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(%target, reason = %e, "egress proxy refused request");
            record(&shared.refused, format!("{target}: {e}"));
            return text(
                StatusCode::FORBIDDEN,
                format!("refused by d402 URL policy: {e}"),
            );
        }
    };
    let url = checked.url;
    let host = url.host_str().unwrap_or_default().to_string();
    let upstream = match connect_checked(&host, &checked.addrs, CONNECT_TIMEOUT).await {
        Ok(s) => s,
        Err(e) => return text(StatusCode::BAD_GATEWAY, e.to_string()),
    };
    let (mut sender, conn) =
        match hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await {
            Ok(x) => x,
            Err(e) => return text(StatusCode::BAD_GATEWAY, e.to_string()),
        };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let (mut parts, body) = req.into_parts();
    let path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    };
    parts.uri = match path.parse() {
        Ok(u) => u,
        Err(_) => return text(StatusCode::BAD_REQUEST, "bad path".into()),
    };
    for h in HOP_BY_HOP {
        parts.headers.remove(*h);
    }
    let host_header = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host,
    };
    if let Ok(v) = http::HeaderValue::from_str(&host_header) {
        parts.headers.insert(header::HOST, v);
    }
    parts
        .headers
        .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
    record(&shared.allowed, target);
    match sender.send_request(Request::from_parts(parts, body)).await {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            for h in HOP_BY_HOP {
                parts.headers.remove(*h);
            }
            Response::from_parts(parts, body.boxed())
        }
        Err(e) => text(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}
