//! `d402 capability run`: runs a capability locally through the worker's executor, for
//! capability authors.
//!
//! The same path a worker takes: the manifest is validated, the module checked against its
//! implementation CID, the snapshot taken under the URL policy (or read from `--html`), and
//! the module run under the manifest's fuel, memory, time and output limits. The output goes
//! to stdout; a summary (output CID, fuel, snapshot) to stderr, or everything as JSON with
//! `--json`.

use std::{io::Write, path::PathBuf};

use anyhow::{Context, bail};
use clap::Args;

use d402_capabilities::{
    Manifest, SnapshotterKind,
    manifest::{MAX_MANIFEST_JSON, MAX_WASM},
};
use d402_protocol::messages::MAX_INPUT;
use d402_runtime::{
    ChromiumConfig, ChromiumSnapshotter, Executor, ExecutorConfig, FetchConfig, FetchSnapshotter,
    GivenSnapshot, Grants, Runner, Snapshotters, UrlPolicy, snapshot::snapshotter_name,
};

/// `d402 capability run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The manifest JSON.
    #[arg(long)]
    manifest: PathBuf,
    /// The Wasm module (must hash to the manifest's implementation CID).
    #[arg(long)]
    wasm: PathBuf,
    /// The task input, JSON (for web capabilities `{"url": "https://…"}`).
    #[arg(long)]
    input: String,
    /// Snapshotter to use (fetch or playwright); default: the manifest's order of preference.
    #[arg(long, value_parser = parse_snapshotter)]
    snapshotter: Option<SnapshotterKind>,
    /// Use this file as the page snapshot instead of fetching (the input's URL is its base).
    #[arg(long)]
    html: Option<PathBuf>,
    /// Allow loopback addresses (pages served on this machine). For testing only.
    #[arg(long)]
    allow_loopback: bool,
    /// Use fetch when the browser is missing or fails.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    fallback_to_fetch: bool,
    /// The Chromium binary.
    #[arg(long, default_value = d402_runtime::chromium::DEFAULT_BINARY)]
    chromium: PathBuf,
    /// Print one JSON object (output as text, CIDs, fuel, snapshot) instead of raw output.
    #[arg(long)]
    json: bool,
}

fn parse_snapshotter(s: &str) -> Result<SnapshotterKind, String> {
    match s {
        "fetch" => Ok(SnapshotterKind::Fetch),
        "playwright" => Ok(SnapshotterKind::Playwright),
        other => Err(format!(
            "{other:?} is not a snapshotter (fetch or playwright)"
        )),
    }
}

/// Runs `d402 capability run`.
pub fn run(a: RunArgs) -> anyhow::Result<()> {
    let manifest = Manifest::from_json(&super::capability::read_input(
        &a.manifest,
        MAX_MANIFEST_JSON,
    )?)
    .with_context(|| a.manifest.display().to_string())?;
    let wasm = super::capability::read_input(&a.wasm, MAX_WASM)?;
    if a.input.len() > MAX_INPUT {
        bail!("--input is larger than {MAX_INPUT} bytes");
    }
    let input = a.input.clone().into_bytes();
    let html = match &a.html {
        Some(p) => Some(super::capability::read_input(p, 64 * 1024 * 1024)?),
        None => None,
    };
    let policy = if a.allow_loopback {
        UrlPolicy::allow_loopback_for_tests()
    } else {
        UrlPolicy::new()
    };
    let mut grants = Grants::permissive();
    if let Some(only) = a.snapshotter {
        if !manifest.permissions.snapshotters.contains(&only) {
            bail!(
                "--snapshotter {}: the manifest does not list it",
                snapshotter_name(only)
            );
        }
        grants.snapshotters = [only].into_iter().collect();
    }
    let executor = Executor::new(ExecutorConfig {
        max_memory_bytes: manifest.limits.memory_bytes.max(64 * 1024),
        max_concurrent: 2,
        cache_dir: None,
    })?;
    let snapshotters = Snapshotters {
        fetch: Some(FetchSnapshotter::new(
            policy.clone(),
            FetchConfig::default(),
        )?),
        chromium: Some(ChromiumSnapshotter::new(
            policy,
            ChromiumConfig {
                binary: a.chromium.clone(),
                ..ChromiumConfig::default()
            },
        )),
        fallback_to_fetch: a.fallback_to_fetch,
    };
    let runner = Runner::new(executor, grants, snapshotters);
    let base_url = if html.is_some() {
        Some(d402_runtime::runner::input_url(&input)?)
    } else {
        None
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let out = rt.block_on(async {
        let given = match (&html, &base_url) {
            (Some(body), Some(url)) => Some(GivenSnapshot {
                final_url: url,
                body,
            }),
            _ => None,
        };
        runner.run(&manifest, &wasm, &input, given).await
    })?;
    let snapshot = out.snapshot.as_ref().map(|s| {
        serde_json::json!({
            "snapshotter": snapshotter_name(s.snapshotter),
            "cid": s.cid.to_string(),
            "final_url": s.final_url,
            "status": s.status,
            "len": s.body.len(),
            "content_type": s.content_type,
            "redirects": s.redirects,
            "total_ms": s.timing.total.as_millis() as u64,
            "first_byte_ms": s.timing.first_byte.as_millis() as u64,
            "fallback": s.fallback,
        })
    });
    let mut stdout = std::io::stdout().lock();
    if a.json {
        let v = serde_json::json!({
            "capability": manifest.capability().to_string(),
            "implementation_cid": manifest.implementation.cid.to_string(),
            "output": String::from_utf8_lossy(&out.output),
            "output_cid": out.output_cid.to_string(),
            "output_len": out.output.len(),
            "fuel_used": out.fuel_used,
            "wasm_ms": out.wasm_time.as_millis() as u64,
            "snapshot": snapshot,
        });
        writeln!(stdout, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        stdout.write_all(&out.output)?;
        let mut summary = format!(
            "ok: output_cid={} len={} fuel_used={} wasm_ms={}",
            out.output_cid,
            out.output.len(),
            out.fuel_used,
            out.wasm_time.as_millis()
        );
        if let Some(s) = &out.snapshot {
            summary.push_str(&format!(
                " snapshot={} snapshot_cid={} status={} final_url={}",
                snapshotter_name(s.snapshotter),
                s.cid,
                s.status,
                s.final_url
            ));
            if let Some(f) = &s.fallback {
                summary.push_str(&format!(" ({f})"));
            }
        }
        eprintln!("{summary}");
    }
    stdout.flush()?;
    Ok(())
}
