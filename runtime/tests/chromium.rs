//! The headless-Chromium snapshotter against Debian's real `chromium` and loopback pages.
//!
//! Needs `/usr/bin/chromium` (`apt-get install -y chromium`); the tests fail loudly without
//! it rather than skip. The tests share one lock so that process scans see only their own
//! browsers.

#![allow(clippy::unwrap_used)]

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use d402_capabilities::{Manifest, SnapshotterKind};
use d402_runtime::{
    ChromiumConfig, ChromiumSnapshotter, Executor, ExecutorConfig, RunLimits, SnapshotError,
    UrlPolicy,
    chromium::process::live_processes_in_group,
    executor::abi::{SnapshotInput, encode_input},
    policy::StaticResolver,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::Mutex,
};

static SERIAL: Mutex<()> = Mutex::const_new(());

fn require_chromium() {
    assert!(
        std::path::Path::new(d402_runtime::chromium::DEFAULT_BINARY).is_file(),
        "these tests need Debian's chromium: apt-get install -y chromium"
    );
}

/// A loopback server; `hits` counts requests.
async fn serve(
    hits: Arc<AtomicUsize>,
    respond: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
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
            let hits = hits.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                hits.fetch_add(1, Ordering::SeqCst);
                let head = String::from_utf8_lossy(&buf).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                match respond(&path) {
                    Some(resp) => {
                        let _ = s.write_all(resp.as_bytes()).await;
                        let _ = s.shutdown().await;
                    }
                    None => tokio::time::sleep(Duration::from_secs(120)).await,
                }
            });
        }
    });
    addr
}

fn html(body: &str) -> Option<String> {
    Some(format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ))
}

const JS_PAGE: &str = r#"<!doctype html><html><head><title>t</title></head><body>
<div id="app">Loading…</div>
<script>
  setTimeout(function () {
    document.getElementById('app').innerHTML =
      '<h1>Built by JavaScript</h1><p>Rendered at <em>runtime</em> with a <a href="/next">link</a>.</p>' +
      '<ul><li>one</li><li>two</li></ul>';
  }, 20);
</script></body></html>"#;

fn loopback_snapshotter(config: ChromiumConfig) -> ChromiumSnapshotter {
    ChromiumSnapshotter::with_resolver(
        UrlPolicy::allow_loopback_for_tests().with_allowlist(vec!["127.0.0.1".into()]),
        config,
        Arc::new(StaticResolver::new(vec![(
            "localhost".into(),
            vec!["127.0.0.1".parse().unwrap()],
        )])),
    )
}

fn example(path: &str) -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/page_to_markdown")
            .join(path),
    )
    .unwrap()
}

/// Every launched browser's process group is empty. The group was sent SIGKILL, which
/// cannot be caught, but a process finishes dying asynchronously (on a loaded machine that
/// takes a while), so each group gets a few seconds to empty.
fn assert_no_leftovers(snap: &ChromiumSnapshotter) {
    for pgid in snap.launched_process_groups() {
        let until = std::time::Instant::now() + Duration::from_secs(10);
        let mut live = live_processes_in_group(pgid);
        while !live.is_empty() && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
            live = live_processes_in_group(pgid);
        }
        assert!(live.is_empty(), "browser group {pgid} left {live:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renders_a_javascript_built_page_and_converts_it_to_markdown() {
    require_chromium();
    let _g = SERIAL.lock().await;
    let hits = Arc::new(AtomicUsize::new(0));
    let addr = serve(hits, |p| match p {
        "/" => html(JS_PAGE),
        _ => html("other"),
    })
    .await;
    // Generous settle time: CI machines are loaded.
    let snap = loopback_snapshotter(ChromiumConfig {
        settle: Duration::from_millis(1500),
        ..ChromiumConfig::default()
    });
    let url = format!("http://{addr}/");
    let s = snap.snapshot(&url).await.unwrap();
    assert_eq!(s.snapshotter, SnapshotterKind::Playwright);
    assert_eq!(s.status, 200);
    assert_eq!(s.final_url, url);
    assert_eq!(s.cid, d402_protocol::Cid::raw(&s.body));
    let page = String::from_utf8(s.body.clone()).unwrap();
    assert!(page.contains("Built by JavaScript"), "{page}");
    assert!(!page.contains("Loading…"), "{page}");

    // Through the real capability.
    let manifest: Manifest = serde_json::from_slice(&example("capability.json")).unwrap();
    let wasm = example("page_to_markdown.wasm");
    let ex = Executor::new(ExecutorConfig::default()).unwrap();
    let module = ex.prepare(&manifest.implementation.cid, &wasm).unwrap();
    let input = serde_json::to_vec(&serde_json::json!({ "url": url })).unwrap();
    let buf = encode_input(
        &input,
        Some(SnapshotInput {
            final_url: &s.final_url,
            body: &s.body,
        }),
    )
    .unwrap();
    let out = ex
        .run(&module, &buf, &RunLimits::from(&manifest.limits))
        .unwrap();
    let (md, _fuel) = out.into_output().unwrap();
    let md = String::from_utf8(md).unwrap();
    assert!(md.contains("# Built by JavaScript"), "{md}");
    assert!(md.contains(&format!("[link](http://{addr}/next)")), "{md}");
    assert!(md.contains("- two"), "{md}");
    assert_no_leftovers(&snap);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_own_requests_go_through_the_url_policy() {
    require_chromium();
    let _g = SERIAL.lock().await;
    // The "internal" service the page must not reach: only reachable by the name
    // `localhost`, which the allowlist does not contain.
    let secret_hits = Arc::new(AtomicUsize::new(0));
    let secret = serve(secret_hits.clone(), |_| html("SECRET-TOKEN")).await;
    let secret_url = format!("http://localhost:{}/secret", secret.port());
    let page = format!(
        r#"<html><body><p id="s">waiting</p><img src="{secret_url}.png"><script>
        fetch("{secret_url}").then(r => r.text()).then(t => {{ document.getElementById('s').textContent = 'got ' + t; }})
          .catch(e => {{ document.getElementById('s').textContent = 'blocked'; }});
        </script></body></html>"#
    );
    let to = secret_url.clone();
    let addr = serve(Arc::new(AtomicUsize::new(0)), move |p| match p {
        "/" => html(&page),
        "/go" => Some(format!(
            "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )),
        _ => html("x"),
    })
    .await;
    let config = ChromiumConfig {
        settle: Duration::from_millis(2500),
        ..ChromiumConfig::default()
    };
    let snap = loopback_snapshotter(config);
    let s = snap.snapshot(&format!("http://{addr}/")).await.unwrap();
    let body = String::from_utf8_lossy(&s.body);
    assert!(!body.contains("SECRET-TOKEN"), "{body}");
    assert!(body.contains("blocked"), "{body}");

    // A redirect to the forbidden host is refused at the hop.
    match snap.snapshot(&format!("http://{addr}/go")).await {
        Err(e @ SnapshotError::EgressRefused(_)) => assert!(e.is_policy()),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        secret_hits.load(Ordering::SeqCst),
        0,
        "the page reached the forbidden host"
    );

    // The default policy refuses loopback before a browser is even started.
    let strict = ChromiumSnapshotter::new(UrlPolicy::new(), ChromiumConfig::default());
    assert!(matches!(
        strict.snapshot(&format!("http://{addr}/")).await,
        Err(SnapshotError::Policy(_))
    ));
    assert!(strict.launched_process_groups().is_empty());
    assert_no_leftovers(&snap);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_kills_the_browser_and_limits_are_applied() {
    require_chromium();
    let _g = SERIAL.lock().await;
    let addr = serve(Arc::new(AtomicUsize::new(0)), |_| None).await; // never answers
    let config = ChromiumConfig {
        deadline: Duration::from_secs(4),
        ..ChromiumConfig::default()
    };
    let snap = loopback_snapshotter(config);
    let url = format!("http://{addr}/");
    let task = {
        let snap = snap.clone();
        tokio::spawn(async move { snap.snapshot(&url).await })
    };
    // While it runs, the browser has its rlimits.
    let mut limits = String::new();
    for _ in 0..200 {
        if let Some(pgid) = snap.launched_process_groups().first()
            && let Ok(l) = std::fs::read_to_string(format!("/proc/{pgid}/limits"))
        {
            limits = l;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cpu = limits
        .lines()
        .find(|l| l.starts_with("Max cpu time"))
        .unwrap_or_default()
        .to_string();
    assert!(cpu.contains("120"), "{limits}");
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap_or_default()
        .to_string();
    assert!(core.split_whitespace().nth(4) == Some("0"), "{core}");

    let started = std::time::Instant::now();
    let res = task.await.unwrap();
    assert!(matches!(res, Err(SnapshotError::Timeout(_))), "{res:?}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_no_leftovers(&snap);
}

#[tokio::test]
async fn missing_browser_is_reported() {
    let snap = ChromiumSnapshotter::new(
        UrlPolicy::new(),
        ChromiumConfig {
            binary: "/nonexistent/chromium".into(),
            ..ChromiumConfig::default()
        },
    );
    assert!(!snap.available());
    assert!(matches!(
        snap.snapshot("http://93.184.215.14/").await,
        Err(SnapshotError::BrowserMissing(_))
    ));
}

/// Starts and stops the browser many times and checks that nothing is left behind: no
/// process of any of its groups, no process started with one of its profiles, no profile
/// directory. 100 cycles by default (`D402_CHROMIUM_CYCLES` overrides).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_leftover_processes_after_many_start_stop_cycles() {
    require_chromium();
    let _g = SERIAL.lock().await;
    let cycles: usize = std::env::var("D402_CHROMIUM_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let addr = serve(Arc::new(AtomicUsize::new(0)), |_| html("<p>tiny</p>")).await;
    let snap = loopback_snapshotter(ChromiumConfig {
        settle: Duration::ZERO,
        ..ChromiumConfig::default()
    });
    let url = format!("http://{addr}/");
    let started = std::time::Instant::now();
    for i in 0..cycles {
        let s = snap
            .snapshot(&url)
            .await
            .unwrap_or_else(|e| panic!("cycle {i}: {e}"));
        assert!(String::from_utf8_lossy(&s.body).contains("tiny"));
    }
    eprintln!("{cycles} browser cycles in {:?}", started.elapsed());
    let groups = snap.launched_process_groups();
    assert_eq!(groups.len(), cycles);
    assert_no_leftovers(&snap);
    // Nothing anywhere still runs with one of our profiles.
    let mut stray = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline"))
            && String::from_utf8_lossy(&cmd).contains("d402-chromium-")
        {
            stray.push(entry.file_name());
        }
    }
    assert!(
        stray.is_empty(),
        "processes still using a d402 profile: {stray:?}"
    );
}
