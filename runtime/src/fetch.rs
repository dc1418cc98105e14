//! The `fetch` snapshotter: HTTP/1.1 over connections made only to policy-checked
//! addresses.
//!
//! Each hop: parse and check the URL, resolve the name once and check every address,
//! connect to one of those addresses (never a second lookup), speak TLS (rustls with the
//! ring provider and the Mozilla roots from `webpki-roots`, the same on every worker) with
//! the host name for SNI and verification, send one `GET`. Redirects are followed by hand,
//! each target re-checked, at most [`FetchConfig::max_redirects`] of them. The body is read
//! up to [`FetchConfig::max_body`]; time to first byte and total time are capped. Bodies are
//! asked for uncompressed (`Accept-Encoding: identity`) so the cap applies to real bytes.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use d402_capabilities::SnapshotterKind;
use d402_protocol::Cid;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use url::Url;

use crate::{
    policy::{Resolver, SystemResolver, UrlPolicy},
    snapshot::{Snapshot, SnapshotError, Timing, now_millis},
};

/// Limits of the `fetch` snapshotter.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Largest body accepted.
    pub max_body: u64,
    /// Whole snapshot, all hops included.
    pub total_timeout: Duration,
    /// From sending a request to its response headers.
    pub first_byte_timeout: Duration,
    /// One TCP connect attempt.
    pub connect_timeout: Duration,
    /// Most redirects followed.
    pub max_redirects: usize,
    /// `User-Agent` sent.
    pub user_agent: String,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            max_body: 8 * 1024 * 1024,
            total_timeout: Duration::from_secs(30),
            first_byte_timeout: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(10),
            max_redirects: 5,
            user_agent: concat!("d402-worker/", env!("CARGO_PKG_VERSION"), " (fetch)").into(),
        }
    }
}

/// A byte stream to a checked address, plain or TLS.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// The TLS client configuration: ring provider, Mozilla roots, HTTP/1.1 only.
pub(crate) fn tls_config() -> Result<Arc<rustls::ClientConfig>, SnapshotError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| SnapshotError::Tls {
        host: String::new(),
        message: e.to_string(),
    })?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Connects to the first of `addrs` that answers. These must be addresses the policy
/// returned.
pub(crate) async fn connect_checked(
    host: &str,
    addrs: &[SocketAddr],
    timeout: Duration,
) -> Result<TcpStream, SnapshotError> {
    let mut last = String::from("no address");
    for addr in addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => last = format!("{addr}: {e}"),
            Err(_) => last = format!("{addr}: connect timed out after {timeout:?}"),
        }
    }
    Err(SnapshotError::Connect {
        host: host.to_string(),
        message: last,
    })
}

/// The `fetch` snapshotter.
#[derive(Clone)]
pub struct FetchSnapshotter {
    policy: UrlPolicy,
    resolver: Arc<dyn Resolver>,
    tls: Arc<rustls::ClientConfig>,
    config: FetchConfig,
}

impl std::fmt::Debug for FetchSnapshotter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchSnapshotter")
            .field("policy", &self.policy)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

struct Response {
    status: StatusCode,
    location: Option<String>,
    content_type: Option<String>,
    body: hyper::body::Incoming,
    conn: tokio::task::JoinHandle<()>,
}

impl FetchSnapshotter {
    /// A snapshotter using the system resolver.
    pub fn new(policy: UrlPolicy, config: FetchConfig) -> Result<Self, SnapshotError> {
        Self::with_resolver(policy, config, Arc::new(SystemResolver))
    }

    /// A snapshotter using `resolver` for names.
    pub fn with_resolver(
        policy: UrlPolicy,
        config: FetchConfig,
        resolver: Arc<dyn Resolver>,
    ) -> Result<Self, SnapshotError> {
        Ok(FetchSnapshotter {
            policy,
            resolver,
            tls: tls_config()?,
            config,
        })
    }

    /// The policy in force.
    pub fn policy(&self) -> &UrlPolicy {
        &self.policy
    }

    /// Fetches `url` under the policy and the limits.
    pub async fn snapshot(&self, url: &str) -> Result<Snapshot, SnapshotError> {
        let span = tracing::info_span!("snapshot_fetch", url = %url);
        let total = self.config.total_timeout;
        let fetch = tracing::Instrument::instrument(self.snapshot_inner(url), span);
        match tokio::time::timeout(total, fetch).await {
            Ok(r) => r,
            Err(_) => Err(SnapshotError::Timeout(total)),
        }
    }

    async fn snapshot_inner(&self, raw: &str) -> Result<Snapshot, SnapshotError> {
        let started = Instant::now();
        let mut url = self.policy.parse(raw)?;
        let mut redirects = Vec::new();
        loop {
            let resp = self.request(&url).await?;
            let first_byte = started.elapsed();
            if resp.status.is_redirection()
                && let Some(location) = resp.location.as_deref()
            {
                resp.conn.abort();
                if redirects.len() >= self.config.max_redirects {
                    return Err(SnapshotError::TooManyRedirects(self.config.max_redirects));
                }
                let next = self.policy.parse_redirect(&url, location)?;
                tracing::debug!(from = %url, to = %next, "following redirect");
                redirects.push(next.to_string());
                url = next;
                continue;
            }
            if !resp.status.is_success() {
                resp.conn.abort();
                return Err(SnapshotError::Status(resp.status.as_u16()));
            }
            let body = self.read_body(resp.body).await;
            resp.conn.abort();
            let body = body?;
            return Ok(Snapshot {
                cid: Cid::raw(&body),
                body,
                final_url: url.to_string(),
                status: resp.status.as_u16(),
                content_type: resp.content_type,
                snapshotter: SnapshotterKind::Fetch,
                redirects,
                timing: Timing {
                    total: started.elapsed(),
                    first_byte,
                },
                taken_at: now_millis(),
                fallback: None,
            });
        }
    }

    async fn read_body(&self, mut body: hyper::body::Incoming) -> Result<Vec<u8>, SnapshotError> {
        let max = self.config.max_body;
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| SnapshotError::Http(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                if out.len() as u64 + data.len() as u64 > max {
                    return Err(SnapshotError::TooLarge(max));
                }
                out.extend_from_slice(&data);
            }
        }
        Ok(out)
    }

    async fn request(&self, url: &Url) -> Result<Response, SnapshotError> {
        let checked = self
            .policy
            .resolve_url(url.clone(), self.resolver.as_ref())
            .await?;
        let host = url.host_str().unwrap_or_default().to_string();
        let tcp = connect_checked(&host, &checked.addrs, self.config.connect_timeout).await?;
        let stream: Box<dyn Stream> = if url.scheme() == "https" {
            let name = match url.host() {
                Some(url::Host::Domain(d)) => {
                    rustls::pki_types::ServerName::try_from(d.to_string()).map_err(|e| {
                        SnapshotError::Tls {
                            host: host.clone(),
                            message: e.to_string(),
                        }
                    })?
                }
                Some(url::Host::Ipv4(ip)) => {
                    rustls::pki_types::ServerName::IpAddress(std::net::IpAddr::V4(ip).into())
                }
                Some(url::Host::Ipv6(ip)) => {
                    rustls::pki_types::ServerName::IpAddress(std::net::IpAddr::V6(ip).into())
                }
                None => return Err(crate::policy::PolicyError::NoHost.into()),
            };
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| SnapshotError::Tls {
                    host: host.clone(),
                    message: e.to_string(),
                })?;
            Box::new(tls)
        } else {
            Box::new(tcp)
        };
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .map_err(|e| SnapshotError::Http(e.to_string()))?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let host_header = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        let path = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        };
        let req = Request::get(path)
            .header(header::HOST, host_header)
            .header(header::USER_AGENT, &self.config.user_agent)
            .header(
                header::ACCEPT,
                "text/html,application/xhtml+xml;q=0.9,*/*;q=0.8",
            )
            .header(header::ACCEPT_ENCODING, "identity")
            .header(header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| SnapshotError::Http(e.to_string()))?;
        let ttfb = self.config.first_byte_timeout;
        let resp = match tokio::time::timeout(ttfb, sender.send_request(req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                conn.abort();
                return Err(SnapshotError::Http(e.to_string()));
            }
            Err(_) => {
                conn.abort();
                return Err(SnapshotError::FirstByteTimeout(ttfb));
            }
        };
        if let Some(len) = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            && len > self.config.max_body
        {
            conn.abort();
            return Err(SnapshotError::TooLarge(self.config.max_body));
        }
        let header_str = |name| {
            resp.headers()
                .get(name)
                .and_then(|v: &http::HeaderValue| v.to_str().ok())
                .map(str::to_string)
        };
        Ok(Response {
            status: resp.status(),
            location: header_str(header::LOCATION),
            content_type: header_str(header::CONTENT_TYPE),
            body: resp.into_body(),
            conn,
        })
    }
}
