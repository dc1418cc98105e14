//! `web.page_to_markdown@1`, the committed Wasm module, run through the real executor:
//! golden Markdown for real-world-like pages, determinism, hostile nesting.
//!
//! Regenerate the expected `.md` files with `UPDATE_GOLDEN=1 cargo test -p d402-runtime
//! --test page_to_markdown` after an intended change (and rebuild the module first with
//! `examples/page_to_markdown/build.sh --update`).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use d402_capabilities::Manifest;
use d402_protocol::Cid;
use d402_runtime::{
    Executor, ExecutorConfig, Outcome, RunLimits, TrapReason,
    executor::abi::{SnapshotInput, encode_input},
};

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/page_to_markdown")
}

fn manifest() -> Manifest {
    let json = std::fs::read(example_dir().join("capability.json")).unwrap();
    let m: Manifest = serde_json::from_slice(&json).unwrap();
    m.validate().unwrap();
    m
}

fn module() -> (Cid, Vec<u8>) {
    let bytes = std::fs::read(example_dir().join("page_to_markdown.wasm")).unwrap();
    (manifest().implementation.cid, bytes)
}

fn convert(ex: &Executor, url: &str, html: &[u8]) -> Outcome {
    let (cid, bytes) = module();
    let prepared = ex.prepare(&cid, &bytes).unwrap();
    let input = serde_json::to_vec(&serde_json::json!({ "url": url })).unwrap();
    let buf = encode_input(
        &input,
        Some(SnapshotInput {
            final_url: url,
            body: html,
        }),
    )
    .unwrap();
    ex.run(&prepared, &buf, &RunLimits::from(&manifest().limits))
        .unwrap()
}

#[test]
fn manifest_names_the_committed_module() {
    let m = manifest();
    let (_, bytes) = module();
    assert_eq!(m.implementation.cid, Cid::raw(&bytes));
    assert_eq!(m.id, "web.page_to_markdown");
    assert_eq!(m.version, 1);
    use d402_capabilities::{Egress, SnapshotterKind};
    assert_eq!(
        m.permissions.snapshotters,
        vec![SnapshotterKind::Playwright, SnapshotterKind::Fetch]
    );
    assert_eq!(m.permissions.egress, Egress::PublicHttp);
}

#[test]
fn golden_fixtures() {
    let ex = Executor::new(ExecutorConfig::default()).unwrap();
    let dir = example_dir().join("fixtures");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "html"))
        .collect();
    names.sort();
    assert!(names.len() >= 5, "fixtures missing");
    let mut failures = Vec::new();
    for html_path in names {
        let url = std::fs::read_to_string(html_path.with_extension("url")).unwrap();
        let html = std::fs::read(&html_path).unwrap();
        let out = convert(&ex, url.trim(), &html);
        let Outcome::Ok { output, fuel_used } = out else {
            panic!("{}: {out:?}", html_path.display());
        };
        assert!(fuel_used > 0);
        let md_path = html_path.with_extension("md");
        if update {
            std::fs::write(&md_path, &output).unwrap();
            continue;
        }
        let expected = std::fs::read(&md_path).unwrap_or_default();
        if expected != output {
            failures.push(format!(
                "{}:\n--- expected\n{}\n--- got\n{}",
                md_path.display(),
                String::from_utf8_lossy(&expected),
                String::from_utf8_lossy(&output)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn same_page_gives_identical_bytes_and_fuel_on_two_executors() {
    let html = std::fs::read(example_dir().join("fixtures/docs_reference.html")).unwrap();
    let url = "https://doc.example.org/std/collections/hash_map/struct.HashMap.html";
    let a = convert(
        &Executor::new(ExecutorConfig::default()).unwrap(),
        url,
        &html,
    );
    let b = convert(
        &Executor::new(ExecutorConfig::default()).unwrap(),
        url,
        &html,
    );
    assert!(matches!(a, Outcome::Ok { .. }));
    assert_eq!(a, b);
}

#[test]
fn deeply_nested_html_does_not_crash_the_worker() {
    let ex = Executor::new(ExecutorConfig::default()).unwrap();
    let depth = 100_000;
    let cases = [
        format!(
            "{}deep text{}",
            "<div>".repeat(depth),
            "</div>".repeat(depth)
        ),
        format!("<ul>{}item", "<li><ul>".repeat(depth)),
        format!("{}x", "<b><i><a href=/x>".repeat(depth)),
        format!("{}cell", "<table><tr><td>".repeat(depth)),
        format!("{}q", "<blockquote>".repeat(depth)),
    ];
    for html in cases {
        let out = convert(&ex, "https://deep.example/", html.as_bytes());
        match out {
            Outcome::Ok { output, .. } => {
                assert!(
                    output.len() < 64 * 1024,
                    "unbounded output: {}",
                    output.len()
                )
            }
            Outcome::Trap {
                reason: TrapReason::OutOfFuel | TrapReason::MemoryLimit(_),
                ..
            } => {}
            other => panic!("unexpected outcome: {other:?}"),
        }
    }
    // The worker is still healthy.
    let out = convert(&ex, "https://x.example/", b"<h1>ok</h1>");
    assert_eq!(out.into_output().unwrap().0, b"# ok\n");
}

#[test]
fn bad_task_input_is_a_guest_error() {
    let ex = Executor::new(ExecutorConfig::default()).unwrap();
    let (cid, bytes) = module();
    let prepared = ex.prepare(&cid, &bytes).unwrap();
    let limits = RunLimits::from(&manifest().limits);
    for input in [
        &br#"{"uri":"https://a/"}"#[..],
        b"not json",
        br#"{"url":"file:///etc/passwd"}"#,
    ] {
        let buf = encode_input(
            input,
            Some(SnapshotInput {
                final_url: "https://a/",
                body: b"<p>x</p>",
            }),
        )
        .unwrap();
        let out = ex.run(&prepared, &buf, &limits).unwrap();
        assert!(
            matches!(
                out,
                Outcome::Trap {
                    reason: TrapReason::GuestError(_),
                    ..
                }
            ),
            "{out:?}"
        );
    }
    // No snapshot at all.
    let buf = encode_input(br#"{"url":"https://a/"}"#, None).unwrap();
    let out = ex.run(&prepared, &buf, &limits).unwrap();
    assert!(matches!(
        out,
        Outcome::Trap {
            reason: TrapReason::GuestError(_),
            ..
        }
    ));
}
