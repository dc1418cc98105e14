//! The URL policy, the `fetch` snapshotter and the egress proxy against real sockets.
//!
//! Nothing here ever connects outside loopback: every refused target is refused before a
//! connection is attempted (that is the point), and names resolve through a fixed table.

#![allow(clippy::unwrap_used)]

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use d402_runtime::{
    FetchConfig, FetchSnapshotter, PolicyError, SnapshotError, UrlPolicy, policy::StaticResolver,
    proxy::EgressProxy,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Names for the tests: each stands for a public-looking name whose DNS answer is private.
fn resolver() -> Arc<StaticResolver> {
    Arc::new(StaticResolver::new(vec![
        ("localhost".into(), vec![ip("127.0.0.1"), ip("::1")]),
        ("metadata.cloud.example".into(), vec![ip("169.254.169.254")]),
        ("intranet.example".into(), vec![ip("10.1.2.3")]),
        ("office.example".into(), vec![ip("192.168.0.10")]),
        ("cgnat.example".into(), vec![ip("100.100.1.1")]),
        ("ula.example".into(), vec![ip("fd00::1")]),
        ("mapped.example".into(), vec![ip("::ffff:10.0.0.1")]),
        // A rebinding-style answer: one public and one private address.
        (
            "mixed.example".into(),
            vec![ip("93.184.215.14"), ip("10.0.0.1")],
        ),
    ]))
}

fn fetcher(policy: UrlPolicy, config: FetchConfig) -> FetchSnapshotter {
    FetchSnapshotter::with_resolver(policy, config, resolver()).unwrap()
}

#[tokio::test]
async fn ssrf_table_is_all_refused() {
    let f = fetcher(UrlPolicy::new(), FetchConfig::default());
    let table = [
        // loopback, by literal, name and obfuscated spellings
        "http://127.0.0.1/",
        "http://127.0.0.1:22/",
        "http://localhost/",
        "http://[::1]/",
        "http://2130706433/",
        "http://0x7f.1/",
        "http://0x7f000001/",
        "http://0177.0.0.1/",
        "http://017700000001/",
        "http://127.1/",
        "http://%31%32%37.0.0.1/",
        "http://0x7F.0.0.1/",
        // private, link-local and metadata, CGNAT
        "http://10.0.0.1/",
        "http://172.16.0.1/",
        "http://192.168.1.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://100.64.0.1/",
        "http://0.0.0.0/",
        "http://255.255.255.255/",
        "http://224.0.0.1/",
        "http://192.0.2.1/",
        "http://198.18.0.1/",
        // IPv6
        "http://[::]/",
        "http://[fc00::1]/",
        "http://[fd12:3456::1]/",
        "http://[fe80::1]/",
        "http://[ff02::1]/",
        "http://[2001:db8::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:a9fe:a9fe]/",
        "http://[64:ff9b::a9fe:a9fe]/",
        "http://[64:ff9b::7f00:1]/",
        "http://[2002:7f00:1::1]/",
        "http://[2002:a9fe:a9fe::1]/",
        "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",
        "http://[::127.0.0.1]/",
        // names that resolve to forbidden addresses
        "http://metadata.cloud.example/computeMetadata/v1/",
        "http://intranet.example/",
        "http://office.example/",
        "http://cgnat.example/",
        "https://ula.example/",
        "http://mapped.example/",
        "http://mixed.example/",
        // schemes and user info
        "ftp://example.com/",
        "file:///etc/passwd",
        "gopher://example.com/",
        "javascript:alert(1)",
        "data:text/html,hi",
        "http://user:pass@example.com/",
        "http://user@example.com/",
    ];
    for url in table {
        match f.snapshot(url).await {
            Err(SnapshotError::Policy(reason)) => {
                let _ = reason.to_string();
            }
            other => panic!("{url} was not refused by the policy: {other:?}"),
        }
    }
    // The reasons name the problem.
    let reason = |url: &'static str| {
        let f = f.clone();
        async move {
            match f.snapshot(url).await {
                Err(SnapshotError::Policy(p)) => p,
                other => panic!("{other:?}"),
            }
        }
    };
    assert!(matches!(
        reason("http://0x7f.1/").await,
        PolicyError::ObfuscatedHost(_)
    ));
    assert!(matches!(
        reason("http://169.254.169.254/").await,
        PolicyError::Forbidden {
            range: "link-local",
            ..
        }
    ));
    assert!(matches!(
        reason("http://metadata.cloud.example/").await,
        PolicyError::Forbidden { .. }
    ));
    assert!(matches!(
        reason("http://user@example.com/").await,
        PolicyError::UserInfo
    ));
    assert!(matches!(
        reason("ftp://example.com/").await,
        PolicyError::Scheme(_)
    ));
}

/// A loopback HTTP server answering every request with `respond(path)`.
async fn serve(
    respond: impl Fn(&str, SocketAddr) -> Vec<u8> + Send + Sync + 'static,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let respond = Arc::new(respond);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let respond = respond.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                let resp = respond(&path, addr);
                if resp.is_empty() {
                    // Never answer: hold the connection open.
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    return;
                }
                let _ = s.write_all(&resp).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

fn ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn redirect(to: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

async fn test_server() -> SocketAddr {
    serve(|path, me| match path {
        "/page" => ok("<h1>hello</h1>"),
        "/hop1" => redirect("/hop2"),
        "/hop2" => redirect(&format!("http://{me}/page")),
        "/to-private" => redirect("http://10.0.0.1/admin"),
        "/to-metadata" => redirect("http://169.254.169.254/latest/meta-data/"),
        "/to-mapped" => redirect("http://[::ffff:a9fe:a9fe]/"),
        "/to-obfuscated" => redirect("http://0x7f.1/"),
        "/to-name" => redirect("http://metadata.cloud.example/"),
        "/to-file" => redirect("file:///etc/passwd"),
        "/loop" => redirect("/loop"),
        "/big" => ok(&"x".repeat(300_000)),
        "/big-unsized" => {
            let mut r = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec();
            r.extend(std::iter::repeat_n(b'y', 300_000));
            r
        }
        "/404" => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
        "/hang" => Vec::new(),
        _ => ok("?"),
    })
    .await
}

#[tokio::test]
async fn loopback_is_refused_by_default_and_allowed_only_for_tests() {
    let addr = test_server().await;
    let url = format!("http://{addr}/page");
    let strict = fetcher(UrlPolicy::new(), FetchConfig::default());
    assert!(matches!(
        strict.snapshot(&url).await,
        Err(SnapshotError::Policy(PolicyError::Forbidden {
            range: "loopback",
            ..
        }))
    ));
    let lax = fetcher(
        UrlPolicy::allow_loopback_for_tests(),
        FetchConfig::default(),
    );
    let snap = lax.snapshot(&url).await.unwrap();
    assert_eq!(snap.body, b"<h1>hello</h1>");
    assert_eq!(snap.status, 200);
    assert_eq!(snap.final_url, url);
    assert_eq!(snap.cid, d402_protocol::Cid::raw(b"<h1>hello</h1>"));
    assert_eq!(snap.content_type.as_deref(), Some("text/html"));
    assert!(snap.timing.total >= snap.timing.first_byte);
}

#[tokio::test]
async fn redirects_are_followed_by_hand_and_every_hop_rechecked() {
    let addr = test_server().await;
    let f = fetcher(
        UrlPolicy::allow_loopback_for_tests(),
        FetchConfig::default(),
    );
    let snap = f.snapshot(&format!("http://{addr}/hop1")).await.unwrap();
    assert_eq!(snap.final_url, format!("http://{addr}/page"));
    assert_eq!(snap.redirects.len(), 2);
    assert_eq!(snap.body, b"<h1>hello</h1>");

    // A page on an allowed address that redirects to a private one is refused at the hop,
    // even though loopback itself is allowed here.
    for path in [
        "/to-private",
        "/to-metadata",
        "/to-mapped",
        "/to-obfuscated",
        "/to-name",
        "/to-file",
    ] {
        match f.snapshot(&format!("http://{addr}{path}")).await {
            Err(SnapshotError::Policy(_)) => {}
            other => panic!("{path}: {other:?}"),
        }
    }
    assert!(matches!(
        f.snapshot(&format!("http://{addr}/loop")).await,
        Err(SnapshotError::TooManyRedirects(5))
    ));
}

#[tokio::test]
async fn body_size_time_to_first_byte_and_status_are_capped() {
    let addr = test_server().await;
    let config = FetchConfig {
        max_body: 100_000,
        first_byte_timeout: Duration::from_millis(500),
        ..FetchConfig::default()
    };
    let f = fetcher(UrlPolicy::allow_loopback_for_tests(), config);
    for path in ["/big", "/big-unsized"] {
        assert!(
            matches!(
                f.snapshot(&format!("http://{addr}{path}")).await,
                Err(SnapshotError::TooLarge(100_000))
            ),
            "{path}"
        );
    }
    let started = std::time::Instant::now();
    assert!(matches!(
        f.snapshot(&format!("http://{addr}/hang")).await,
        Err(SnapshotError::FirstByteTimeout(_))
    ));
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(matches!(
        f.snapshot(&format!("http://{addr}/404")).await,
        Err(SnapshotError::Status(404))
    ));

    let total = FetchConfig {
        total_timeout: Duration::from_millis(500),
        first_byte_timeout: Duration::from_secs(30),
        ..FetchConfig::default()
    };
    let f = fetcher(UrlPolicy::allow_loopback_for_tests(), total);
    assert!(matches!(
        f.snapshot(&format!("http://{addr}/hang")).await,
        Err(SnapshotError::Timeout(_))
    ));
}

#[tokio::test]
async fn operator_allowlist_restricts_hosts() {
    let addr = test_server().await;
    let policy = UrlPolicy::allow_loopback_for_tests().with_allowlist(vec!["localhost".into()]);
    let f = fetcher(policy, FetchConfig::default());
    assert!(matches!(
        f.snapshot(&format!("http://{addr}/page")).await,
        Err(SnapshotError::Policy(PolicyError::NotAllowlisted(_)))
    ));
    let snap = f
        .snapshot(&format!("http://localhost:{}/page", addr.port()))
        .await
        .unwrap();
    assert_eq!(snap.body, b"<h1>hello</h1>");
}

async fn raw_request(proxy: SocketAddr, request: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_string()
}

#[tokio::test]
async fn egress_proxy_applies_the_policy_to_every_request() {
    let addr = test_server().await;
    let proxy = EgressProxy::start(UrlPolicy::allow_loopback_for_tests(), resolver())
        .await
        .unwrap();
    let p = proxy.addr();

    let ok = raw_request(
        p,
        &format!("GET http://{addr}/page HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.ends_with("<h1>hello</h1>"), "{ok}");

    for req in [
        "GET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n",
        "GET http://intranet.example/ HTTP/1.1\r\nHost: intranet.example\r\nConnection: close\r\n\r\n",
        "GET http://0x7f.1/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "CONNECT 10.0.0.1:443 HTTP/1.1\r\nHost: 10.0.0.1:443\r\n\r\n",
        "CONNECT metadata.cloud.example:443 HTTP/1.1\r\nHost: metadata.cloud.example:443\r\n\r\n",
        "CONNECT [fe80::1]:443 HTTP/1.1\r\nHost: [fe80::1]:443\r\n\r\n",
    ] {
        let resp = raw_request(p, req).await;
        assert!(resp.starts_with("HTTP/1.1 403"), "{req:?} -> {resp}");
    }
    assert_eq!(proxy.refused().len(), 6, "{:?}", proxy.refused());

    // A CONNECT tunnel to an allowed address carries bytes both ways.
    let mut s = tokio::net::TcpStream::connect(p).await.unwrap();
    s.write_all(format!("CONNECT {addr} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 19];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head[..12], b"HTTP/1.1 200");
    let mut rest = Vec::new();
    while !rest.ends_with(b"\r\n\r\n") && !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        rest.push(b[0]);
    }
    s.write_all(b"GET /page HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    assert!(String::from_utf8_lossy(&out).ends_with("<h1>hello</h1>"));

    // With the default policy even the loopback page is refused.
    let strict = EgressProxy::start(UrlPolicy::new(), resolver())
        .await
        .unwrap();
    let resp = raw_request(
        strict.addr(),
        &format!("GET http://{addr}/page HTTP/1.1\r\nHost: {addr}\r\n\r\n"),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
}
