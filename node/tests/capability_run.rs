//! `d402 capability run` end to end: the real binary, the committed page_to_markdown module,
//! a page from a file and a page served on loopback.

#![allow(clippy::unwrap_used)]

use std::{
    io::{Read, Write},
    net::TcpListener,
    path::{Path, PathBuf},
    process::Command,
};

fn example(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/page_to_markdown")
        .join(path)
}

fn d402() -> Command {
    Command::new(env!("CARGO_BIN_EXE_d402"))
}

#[test]
fn runs_page_to_markdown_on_a_local_html_file() {
    let out = d402()
        .args(["capability", "run", "--manifest"])
        .arg(example("capability.json"))
        .arg("--wasm")
        .arg(example("page_to_markdown.wasm"))
        .args([
            "--input",
            r#"{"url":"https://doc.example.org/std/collections/hash_map/struct.HashMap.html"}"#,
        ])
        .arg("--html")
        .arg(example("fixtures/docs_reference.html"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = std::fs::read(example("fixtures/docs_reference.md")).unwrap();
    assert_eq!(out.stdout, expected);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("output_cid=bafk"), "{stderr}");
    assert!(stderr.contains("fuel_used="), "{stderr}");
}

#[test]
fn fetches_a_loopback_page_only_with_allow_loopback() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        // Serve exactly one request (the refused run never connects).
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).unwrap();
        let body = "<h1>Served</h1><p>over <b>loopback</b></p>";
        write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
    });
    let input = format!(r#"{{"url":"http://{addr}/"}}"#);
    let run = |extra: &[&str]| {
        d402()
            .args(["capability", "run", "--manifest"])
            .arg(example("capability.json"))
            .arg("--wasm")
            .arg(example("page_to_markdown.wasm"))
            .args(["--input", &input, "--snapshotter", "fetch", "--json"])
            .args(extra)
            .output()
            .unwrap()
    };
    let refused = run(&[]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("loopback"), "{err}");

    let ok = run(&["--allow-loopback"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(v["output"], "# Served\n\nover **loopback**\n");
    assert_eq!(v["snapshot"]["snapshotter"], "fetch");
    assert_eq!(v["snapshot"]["status"], 200);
    assert!(v["fuel_used"].as_u64().unwrap() > 0);
    server.join().unwrap();
}

#[test]
fn a_module_that_is_not_the_manifests_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("other.wasm");
    std::fs::write(&wasm, b"\0asm\x01\0\0\0").unwrap();
    let out = d402()
        .args(["capability", "run", "--manifest"])
        .arg(example("capability.json"))
        .arg("--wasm")
        .arg(&wasm)
        .args(["--input", r#"{"url":"https://a.example/"}"#, "--html"])
        .arg(example("fixtures/blog_post.html"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CID"), "{err}");
}

#[test]
fn the_committed_registration_verifies_against_the_committed_manifest() {
    let out = d402()
        .args(["capability", "verify", "--file"])
        .arg(example("capability.registration.json"))
        .arg("--manifest")
        .arg(example("capability.json"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
