//! A small HTTP/1.1 client over hyper for the commands that talk to a gateway
//! (`d402 wallet`, `d402 task run`, `d402 devnet`, `d402 bench gateway`).
//!
//! Plain `http://` only: a gateway behind TLS is reached through its terminating proxy's
//! `http://` side or not at all from this client (a clear error says so). Every response
//! body is read under a cap, every request under a deadline. A [`Connection`] keeps one
//! keep-alive connection and reconnects when the server closed it.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Largest response body read (a task's output is capped at 4 MiB by its manifest; the
/// JSON around it, the claims and the receipt add little).
pub const MAX_RESPONSE_BODY: usize = 16 * 1024 * 1024;

/// A gateway's base URL: `http://host:port` (a path prefix is kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    /// `host:port` for the `Host` header and the TCP connection.
    authority: String,
    host: String,
    port: u16,
    /// Path prefix without a trailing slash (usually empty).
    prefix: String,
}

impl BaseUrl {
    /// Parses `http://host[:port][/prefix]`.
    pub fn parse(text: &str) -> anyhow::Result<BaseUrl> {
        let uri: Uri = text
            .trim()
            .parse()
            .with_context(|| format!("{text:?} is not a URL like http://127.0.0.1:8080"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => bail!(
                "{text}: this client speaks plain http:// only (run it against the gateway's \
                 http address, e.g. behind your TLS proxy)"
            ),
            _ => bail!("{text:?} is not an http:// URL"),
        }
        let authority = uri
            .authority()
            .with_context(|| format!("{text:?} has no host"))?;
        if authority.as_str().contains('@') {
            bail!("{text:?}: credentials in the URL are not supported");
        }
        let host = authority.host().trim_matches(['[', ']']).to_string();
        if host.is_empty() {
            bail!("{text:?} has no host");
        }
        let port = authority.port_u16().unwrap_or(80);
        if uri.query().is_some() {
            bail!("{text:?}: the gateway URL takes no query");
        }
        Ok(BaseUrl {
            authority: authority.as_str().to_string(),
            host,
            port,
            prefix: uri.path().trim_end_matches('/').to_string(),
        })
    }

    /// The full URL of `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}{path}", self.authority, self.prefix)
    }

    fn path(&self, path: &str) -> String {
        format!("{}{path}", self.prefix)
    }
}

impl std::fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.authority, self.prefix)
    }
}

/// A response: status, headers and the whole body.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body bytes (at most [`MAX_RESPONSE_BODY`]).
    pub body: Bytes,
}

impl Response {
    /// A header as text, when present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "the gateway answered {} with a body that is not JSON: {}",
                self.status,
                preview(&self.body)
            )
        })
    }

    /// `code: message` of a JSON error body (`{"error":{"code","message"}}`), else a
    /// preview of the body.
    pub fn error_text(&self) -> String {
        match serde_json::from_slice::<serde_json::Value>(&self.body) {
            Ok(v) => match (
                v.pointer("/error/code").and_then(|c| c.as_str()),
                v.pointer("/error/message").and_then(|m| m.as_str()),
            ) {
                (Some(code), Some(message)) => format!("{code}: {message}"),
                (Some(code), None) => code.to_string(),
                _ => preview(&self.body),
            },
            Err(_) => preview(&self.body),
        }
    }
}

/// The first 300 characters of a body, for messages.
fn preview(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut s: String = text.chars().take(300).collect();
    if text.chars().count() > 300 {
        s.push('…');
    }
    s
}

/// One keep-alive HTTP/1.1 connection to a gateway, reopened when the server closed it.
pub struct Connection {
    base: BaseUrl,
    sender: Option<SendRequest<Full<Bytes>>>,
    timeout: Duration,
}

impl Connection {
    /// A connection to `base` (opened on the first request); each request must finish
    /// within `timeout`.
    pub fn new(base: BaseUrl, timeout: Duration) -> Connection {
        Connection {
            base,
            sender: None,
            timeout,
        }
    }

    async fn open(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        let stream = TcpStream::connect((self.base.host.as_str(), self.base.port))
            .await
            .with_context(|| format!("cannot connect to {}", self.base))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .with_context(|| format!("HTTP handshake with {} failed", self.base))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "gateway connection closed");
            }
        });
        Ok(sender)
    }

    /// Sends one request and reads the whole response.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<Response> {
        let what = format!("{method} {}", self.base.url(path));
        tokio::time::timeout(self.timeout, self.send_inner(method, path, headers, body))
            .await
            .map_err(|_| anyhow::anyhow!("{what}: no answer within {:?}", self.timeout))?
            .with_context(|| what)
    }

    async fn send_inner(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<Response> {
        let reusable = match self.sender.take() {
            Some(mut s) => s.ready().await.is_ok().then_some(s),
            None => None,
        };
        let mut sender = match reusable {
            Some(s) => s,
            None => self.open().await?,
        };
        let mut req = http::Request::builder()
            .method(method)
            .uri(self.base.path(path))
            .header(header::HOST, &self.base.authority)
            .header(header::ACCEPT, "application/json");
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        for (name, value) in headers {
            req = req.header(
                *name,
                HeaderValue::from_str(value).with_context(|| format!("bad {name} header"))?,
            );
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = sender.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, MAX_RESPONSE_BODY)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the body: {e}"))?
            .to_bytes();
        self.sender = Some(sender);
        Ok(Response {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// `GET path`.
    pub async fn get(&mut self, path: &str) -> anyhow::Result<Response> {
        self.send(Method::GET, path, &[], None).await
    }

    /// `POST path` with a JSON body.
    pub async fn post_json(
        &mut self,
        path: &str,
        headers: &[(&str, String)],
        body: &serde_json::Value,
    ) -> anyhow::Result<Response> {
        self.send(Method::POST, path, headers, Some(serde_json::to_vec(body)?))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_parse() {
        let b = BaseUrl::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(b.url("/v1/tasks"), "http://127.0.0.1:8080/v1/tasks");
        let b = BaseUrl::parse("http://gw.example/api/").unwrap();
        assert_eq!(b.port, 80);
        assert_eq!(b.url("/v1/tasks"), "http://gw.example/api/v1/tasks");
        let b = BaseUrl::parse("http://[::1]:9/").unwrap();
        assert_eq!(b.host, "::1");
        for bad in [
            "https://gw.example",
            "ftp://x",
            "127.0.0.1:8080",
            "http://u:p@h/",
            "http://h/?q=1",
            "",
        ] {
            assert!(BaseUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
