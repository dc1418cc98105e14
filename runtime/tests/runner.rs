//! Whole capability runs: grants before work, snapshot then Wasm, fallback to fetch.

#![allow(clippy::unwrap_used)]

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use d402_capabilities::{Manifest, SnapshotterKind};
use d402_runtime::{
    ChromiumConfig, ChromiumSnapshotter, ExecError, Executor, ExecutorConfig, FetchConfig,
    FetchSnapshotter, GivenSnapshot, GrantError, Grants, RunError, RunLimits, Runner,
    SnapshotError, Snapshotters, TrapReason, UrlPolicy, runner::INLINE_FUEL,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

fn example(path: &str) -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/page_to_markdown")
            .join(path),
    )
    .unwrap()
}

fn manifest() -> Manifest {
    serde_json::from_slice(&example("capability.json")).unwrap()
}

async fn serve(hits: Arc<AtomicUsize>, body: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let hits = hits.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                hits.fetch_add(1, Ordering::SeqCst);
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

fn runner(grants: Grants, chromium: Option<ChromiumSnapshotter>, fallback: bool) -> Runner {
    let policy = UrlPolicy::allow_loopback_for_tests();
    Runner::new(
        Executor::new(ExecutorConfig::default()).unwrap(),
        grants,
        Snapshotters {
            fetch: Some(FetchSnapshotter::new(policy, FetchConfig::default()).unwrap()),
            chromium,
            fallback_to_fetch: fallback,
        },
    )
}

fn missing_browser() -> ChromiumSnapshotter {
    ChromiumSnapshotter::new(
        UrlPolicy::allow_loopback_for_tests(),
        ChromiumConfig {
            binary: "/nonexistent/chromium".into(),
            ..ChromiumConfig::default()
        },
    )
}

fn input(addr: SocketAddr) -> Vec<u8> {
    format!(r#"{{"url":"http://{addr}/article"}}"#).into_bytes()
}

#[tokio::test]
async fn fetch_then_wasm_produces_markdown_and_cids() {
    let hits = Arc::new(AtomicUsize::new(0));
    let addr = serve(
        hits.clone(),
        "<h1>Title</h1><p>Body <a href=\"/x\">x</a></p>",
    )
    .await;
    let r = runner(
        Grants {
            snapshotters: [SnapshotterKind::Fetch].into_iter().collect(),
            ..Grants::default()
        },
        None,
        false,
    );
    let out = r
        .run(
            &manifest(),
            &example("page_to_markdown.wasm"),
            &input(addr),
            None,
        )
        .await
        .unwrap();
    let md = String::from_utf8(out.output.clone()).unwrap();
    assert_eq!(md, format!("# Title\n\nBody [x](http://{addr}/x)\n"));
    assert_eq!(out.output_cid, d402_protocol::Cid::raw(&out.output));
    let snap = out.snapshot.unwrap();
    assert_eq!(snap.snapshotter, SnapshotterKind::Fetch);
    assert_eq!(snap.meta().snapshotter, "fetch");
    assert!(out.fuel_used > 0);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn grants_refuse_before_any_work() {
    let hits = Arc::new(AtomicUsize::new(0));
    let addr = serve(hits.clone(), "<p>x</p>").await;
    let stingy = Grants {
        max_fuel: 1_000,
        ..Grants::default()
    };
    let err = runner(stingy, None, false)
        .run(
            &manifest(),
            &example("page_to_markdown.wasm"),
            &input(addr),
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            RunError::Grant(GrantError::LimitAboveGrant { limit: "fuel", .. })
        ),
        "{err}"
    );
    let no_snapshotters = Grants {
        snapshotters: Default::default(),
        ..Grants::default()
    };
    let err = runner(no_snapshotters, None, false)
        .run(
            &manifest(),
            &example("page_to_markdown.wasm"),
            &input(addr),
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RunError::Grant(_)), "{err}");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "work was done before refusing"
    );
}

#[tokio::test]
async fn missing_browser_falls_back_to_fetch_only_when_allowed_and_says_so() {
    let addr = serve(Arc::new(AtomicUsize::new(0)), "<h2>fallback</h2>").await;
    let with = runner(Grants::default(), Some(missing_browser()), true)
        .run(
            &manifest(),
            &example("page_to_markdown.wasm"),
            &input(addr),
            None,
        )
        .await
        .unwrap();
    assert_eq!(with.output, b"## fallback\n");
    let snap = with.snapshot.unwrap();
    assert_eq!(snap.snapshotter, SnapshotterKind::Fetch);
    let note = snap.fallback.unwrap();
    assert!(note.contains("playwright failed"), "{note}");

    let without = runner(Grants::default(), Some(missing_browser()), false)
        .run(
            &manifest(),
            &example("page_to_markdown.wasm"),
            &input(addr),
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            without,
            RunError::Snapshot(SnapshotError::BrowserMissing(_))
        ),
        "{without}"
    );

    // A policy refusal is final: no fallback fetch of a forbidden URL.
    let strict = Runner::new(
        Executor::new(ExecutorConfig::default()).unwrap(),
        Grants::default(),
        Snapshotters {
            fetch: Some(FetchSnapshotter::new(UrlPolicy::new(), FetchConfig::default()).unwrap()),
            chromium: Some(ChromiumSnapshotter::new(
                UrlPolicy::new(),
                ChromiumConfig {
                    binary: "/nonexistent/chromium".into(),
                    ..ChromiumConfig::default()
                },
            )),
            fallback_to_fetch: true,
        },
    );
    let err = strict
        .run(
            &manifest(),
            &example("page_to_markdown.wasm"),
            &input(addr),
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, RunError::Snapshot(ref e) if e.is_policy()),
        "{err}"
    );
}

/// A run that needs more than [`INLINE_FUEL`] starts on the calling thread, runs out there,
/// and is run again whole on the blocking pool: same output and fuel as one run with the
/// whole budget, and a budget that runs out is reported whole, not at the inline cap.
#[tokio::test]
async fn a_run_longer_than_the_inline_budget_is_run_again_with_its_whole_budget() {
    let r = runner(Grants::default(), None, false);
    let body = "<p>many words</p>".repeat(10_000);
    let given = || {
        Some(GivenSnapshot {
            final_url: "https://pinned.example/",
            body: body.as_bytes(),
        })
    };
    let input = br#"{"url":"https://pinned.example/"}"#;
    let wasm = example("page_to_markdown.wasm");
    let out = r.run(&manifest(), &wasm, input, given()).await.unwrap();
    assert!(out.fuel_used > INLINE_FUEL, "{}", out.fuel_used);

    // The same run straight on the executor, with the whole budget.
    let m = manifest();
    let module = r.executor().prepare(&m.implementation.cid, &wasm).unwrap();
    let buf = d402_runtime::executor::abi::encode_input(
        input,
        Some(d402_runtime::executor::abi::SnapshotInput {
            final_url: "https://pinned.example/",
            body: body.as_bytes(),
        }),
    )
    .unwrap();
    let direct = r
        .executor()
        .run(&module, &buf, &RunLimits::from(&m.limits))
        .unwrap();
    assert_eq!(direct.into_output().unwrap(), (out.output, out.fuel_used));

    let mut short = manifest();
    short.limits.fuel = 3 * INLINE_FUEL;
    let err = r.run(&short, &wasm, input, given()).await.unwrap_err();
    assert!(
        matches!(
            err,
            RunError::Trap {
                reason: TrapReason::OutOfFuel,
                fuel_used
            } if fuel_used == 3 * INLINE_FUEL
        ),
        "{err}"
    );
}

#[tokio::test]
async fn given_snapshot_needs_no_network_and_traps_are_reported() {
    let r = runner(Grants::default(), None, false);
    let out = r
        .run(
            &manifest(),
            &example("page_to_markdown.wasm"),
            br#"{"url":"https://pinned.example/"}"#,
            Some(GivenSnapshot {
                final_url: "https://pinned.example/",
                body: b"<h3>pinned</h3>",
            }),
        )
        .await
        .unwrap();
    assert_eq!(out.output, b"### pinned\n");
    assert!(out.snapshot.is_none());

    let mut starving = manifest();
    starving.limits.fuel = 10_000;
    let err = r
        .run(
            &starving,
            &example("page_to_markdown.wasm"),
            br#"{"url":"https://pinned.example/"}"#,
            Some(GivenSnapshot {
                final_url: "https://pinned.example/",
                body: "<p>many words</p>".repeat(10_000).as_bytes(),
            }),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            RunError::Trap {
                reason: TrapReason::OutOfFuel,
                fuel_used: 10_000
            }
        ),
        "{err}"
    );

    // Once compiled, the module of the manifest's CID runs from memory whatever bytes come
    // with the call: what runs is always the code the CID names.
    let out = r
        .run(
            &manifest(),
            b"\0asm\x01\0\0\0",
            br#"{"url":"https://pinned.example/"}"#,
            Some(GivenSnapshot {
                final_url: "https://pinned.example/",
                body: b"<h3>cached</h3>",
            }),
        )
        .await
        .unwrap();
    assert_eq!(out.output, b"### cached\n");

    // Bytes that must be compiled are checked first: the wrong module for the manifest is
    // refused by CID.
    let err = runner(Grants::default(), None, false)
        .run(
            &manifest(),
            b"\0asm\x01\0\0\0",
            br#"{"url":"https://pinned.example/"}"#,
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, RunError::Exec(ExecError::CidMismatch { .. })),
        "{err}"
    );
}
