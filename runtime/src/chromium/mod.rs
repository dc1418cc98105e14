//! The `playwright` snapshotter: headless Chromium (Debian's `chromium`) driven over the
//! DevTools protocol, every request of the page going through the URL policy.
//!
//! One browser per snapshot, in a fresh temporary profile that is deleted afterwards:
//!
//! 1. the URL is checked (and resolved) up front, so an obviously refused URL never starts a
//!    browser;
//! 2. an [`EgressProxy`] is started on loopback with the same policy; Chromium gets
//!    `--proxy-server` pointing at it, `--proxy-bypass-list=<-loopback>` (so loopback is
//!    proxied and refused too) and `--host-resolver-rules` that make every name fail inside
//!    the browser, so nothing can go around the proxy; WebRTC may not use non-proxied UDP and
//!    QUIC is off;
//! 3. the browser runs in its own process group with rlimits (CPU seconds, data size, file
//!    size, no core dumps) and a scrubbed environment pointing into the profile;
//! 4. the page is loaded, given a short settle time for scripts, and its rendered DOM
//!    (`document.documentElement.outerHTML`) is the snapshot;
//! 5. the browser is closed (`Browser.close`), and whatever happens — success, error, wall
//!    clock deadline — its whole process group is killed and reaped.

mod cdp;
pub mod process;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use d402_capabilities::SnapshotterKind;
use d402_protocol::Cid;
use serde_json::{Value, json};

use crate::{
    policy::{Resolver, SystemResolver, UrlPolicy},
    proxy::EgressProxy,
    snapshot::{Snapshot, SnapshotError, Timing, now_millis},
};
use cdp::{Cdp, CdpError};
pub use process::BrowserLimits;

/// Where Debian installs the browser.
pub const DEFAULT_BINARY: &str = "/usr/bin/chromium";

/// How the browser is run.
#[derive(Debug, Clone)]
pub struct ChromiumConfig {
    /// The browser binary.
    pub binary: PathBuf,
    /// Wall-clock deadline for the whole snapshot, browser start included.
    pub deadline: Duration,
    /// Time given to scripts after the load event before the DOM is read.
    pub settle: Duration,
    /// Largest rendered HTML accepted, in bytes.
    pub max_html: u64,
    /// Resource limits of the browser processes.
    pub limits: BrowserLimits,
}

impl Default for ChromiumConfig {
    fn default() -> Self {
        ChromiumConfig {
            binary: PathBuf::from(DEFAULT_BINARY),
            deadline: Duration::from_secs(45),
            settle: Duration::from_millis(300),
            max_html: 8 * 1024 * 1024,
            limits: BrowserLimits::default(),
        }
    }
}

/// The headless-Chromium snapshotter.
#[derive(Clone)]
pub struct ChromiumSnapshotter {
    policy: UrlPolicy,
    resolver: Arc<dyn Resolver>,
    config: ChromiumConfig,
    launched: Arc<Mutex<Vec<i32>>>,
}

impl std::fmt::Debug for ChromiumSnapshotter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChromiumSnapshotter")
            .field("policy", &self.policy)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What the browser returned.
struct Rendered {
    html: String,
    final_url: String,
    status: u16,
    content_type: Option<String>,
    loaded_after: Duration,
}

const READ_DOM: &str = "JSON.stringify([document.documentElement ? \
    document.documentElement.outerHTML : '', location.href])";

impl ChromiumSnapshotter {
    /// A snapshotter using the system resolver.
    pub fn new(policy: UrlPolicy, config: ChromiumConfig) -> Self {
        Self::with_resolver(policy, config, Arc::new(SystemResolver))
    }

    /// A snapshotter using `resolver` (for the up-front check and the proxy).
    pub fn with_resolver(
        policy: UrlPolicy,
        config: ChromiumConfig,
        resolver: Arc<dyn Resolver>,
    ) -> Self {
        ChromiumSnapshotter {
            policy,
            resolver,
            config,
            launched: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Whether the browser binary is there.
    pub fn available(&self) -> bool {
        self.config.binary.is_file()
    }

    /// Process groups of the browsers started so far (the last 1,000), for diagnostics and
    /// leak checks.
    pub fn launched_process_groups(&self) -> Vec<i32> {
        self.launched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn args(&self, profile: &std::path::Path, proxy: std::net::SocketAddr) -> Vec<String> {
        let mut args: Vec<String> = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            "--no-zygote",
            "--disable-crash-reporter",
            "--disable-breakpad",
            "--disable-extensions",
            "--disable-default-apps",
            "--disable-domain-reliability",
            "--disable-client-side-phishing-detection",
            "--disable-dev-shm-usage",
            "--no-default-browser-check",
            "--mute-audio",
            "--force-webrtc-ip-handling-policy=disable_non_proxied_udp",
            "--disable-features=Translate,OptimizationHints,MediaRouter,DialMediaRouteProvider,AutofillServerCommunication,CertificateTransparencyComponentUpdater,InterestFeedContentSuggestions",
            "--window-size=1280,800",
            "--remote-debugging-pipe",
            "--proxy-bypass-list=<-loopback>",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        args.push(format!("--proxy-server=http://{proxy}"));
        args.push(format!(
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE {}",
            proxy.ip()
        ));
        args
    }

    /// Loads `url` in a fresh browser and returns the rendered HTML.
    pub async fn snapshot(&self, url: &str) -> Result<Snapshot, SnapshotError> {
        let span = tracing::info_span!("snapshot_chromium", url = %url);
        tracing::Instrument::instrument(self.snapshot_in_span(url), span).await
    }

    async fn snapshot_in_span(&self, url: &str) -> Result<Snapshot, SnapshotError> {
        let started = Instant::now();
        // Refuse what the policy refuses before starting anything.
        let checked = self.policy.resolve(url, self.resolver.as_ref()).await?;
        if !self.available() {
            return Err(SnapshotError::BrowserMissing(self.config.binary.clone()));
        }
        let proxy = EgressProxy::start(self.policy.clone(), self.resolver.clone()).await?;
        let profile = tempfile::Builder::new()
            .prefix("d402-chromium-")
            .tempdir()?;
        let (mut browser, pipe) = process::spawn(
            &self.config.binary,
            &self.args(profile.path(), proxy.addr()),
            profile.path(),
            self.config.limits,
        )
        .map_err(|e| {
            SnapshotError::Browser(format!(
                "could not start {}: {e}",
                self.config.binary.display()
            ))
        })?;
        {
            let mut l = self.launched.lock().unwrap_or_else(|p| p.into_inner());
            if l.len() >= 1000 {
                l.remove(0);
            }
            l.push(browser.pgid());
        }
        let mut cdp = Cdp::new(pipe.to_browser, pipe.from_browser)
            .map_err(|e| SnapshotError::Browser(e.to_string()))?;
        let deadline = self.config.deadline;
        let target = checked.url.to_string();
        let rendered = tokio::time::timeout(deadline, self.drive(&mut cdp, &target, started))
            .await
            .unwrap_or(Err(DriveError::Timeout));
        // Close politely, then make sure: the whole group is killed and reaped either way.
        if !matches!(rendered, Err(DriveError::Timeout)) {
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                cdp.call("Browser.close", json!({}), None),
            )
            .await;
            browser.wait_exit(Duration::from_secs(3)).await;
        }
        browser.kill_and_reap();
        process::kill_profile_processes(profile.path());
        drop(cdp);
        let log_tail = std::fs::read_to_string(profile.path().join("chromium.log"))
            .map(|s| {
                let t: Vec<&str> = s.lines().rev().take(3).collect();
                t.into_iter().rev().collect::<Vec<_>>().join(" | ")
            })
            .unwrap_or_default();
        drop(profile);
        let refused = proxy.refused();
        drop(proxy);
        let r = match rendered {
            Ok(r) => r,
            Err(DriveError::Timeout) => return Err(SnapshotError::Timeout(deadline)),
            Err(DriveError::Navigation(msg)) if !refused.is_empty() => {
                return Err(SnapshotError::EgressRefused(format!(
                    "{msg}; egress proxy refused: {}",
                    refused.join("; ")
                )));
            }
            Err(DriveError::Navigation(msg)) => return Err(SnapshotError::Browser(msg)),
            Err(DriveError::Cdp(e)) => {
                return Err(SnapshotError::Browser(format!(
                    "{e} (browser log: {log_tail})"
                )));
            }
            Err(DriveError::TooLarge) => return Err(SnapshotError::TooLarge(self.config.max_html)),
        };
        if !(200..300).contains(&r.status) {
            if r.status == 403 && !refused.is_empty() {
                return Err(SnapshotError::EgressRefused(refused.join("; ")));
            }
            return Err(SnapshotError::Status(r.status));
        }
        let body = r.html.into_bytes();
        Ok(Snapshot {
            cid: Cid::raw(&body),
            body,
            final_url: r.final_url,
            status: r.status,
            content_type: r.content_type,
            snapshotter: SnapshotterKind::Playwright,
            redirects: Vec::new(),
            timing: Timing {
                total: started.elapsed(),
                first_byte: r.loaded_after,
            },
            taken_at: now_millis(),
            fallback: None,
        })
    }

    async fn drive(
        &self,
        cdp: &mut Cdp,
        url: &str,
        started: Instant,
    ) -> Result<Rendered, DriveError> {
        let target = cdp
            .call("Target.createTarget", json!({ "url": "about:blank" }), None)
            .await?;
        let target_id = target["targetId"].as_str().unwrap_or_default().to_string();
        let attached = cdp
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
                None,
            )
            .await?;
        let session = attached["sessionId"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let s = Some(session.as_str());
        cdp.call("Page.enable", json!({}), s).await?;
        cdp.call("Network.enable", json!({}), s).await?;
        let nav = cdp.call("Page.navigate", json!({ "url": url }), s).await?;
        if let Some(err) = nav["errorText"].as_str().filter(|e| !e.is_empty()) {
            return Err(DriveError::Navigation(format!("navigation failed: {err}")));
        }
        let frame_id = nav["frameId"].as_str().unwrap_or_default().to_string();
        cdp.wait_event("Page.loadEventFired", s).await?;
        let loaded_after = started.elapsed();
        tokio::time::sleep(self.config.settle).await;
        let eval = cdp
            .call(
                "Runtime.evaluate",
                json!({ "expression": READ_DOM, "returnByValue": true }),
                s,
            )
            .await?;
        let value = eval["result"]["value"].as_str().unwrap_or("[\"\",\"\"]");
        if value.len() as u64 > self.config.max_html.saturating_mul(2).saturating_add(4096) {
            return Err(DriveError::TooLarge);
        }
        let parsed: Value = serde_json::from_str(value)
            .map_err(|e| DriveError::Cdp(CdpError::Malformed(e.to_string())))?;
        let html = parsed[0].as_str().unwrap_or_default().to_string();
        if html.len() as u64 > self.config.max_html {
            return Err(DriveError::TooLarge);
        }
        let final_url = parsed[1].as_str().unwrap_or(url).to_string();
        // The main document's last response: its status and type.
        let (status, content_type) = cdp
            .events()
            .filter(|e| {
                e["method"] == "Network.responseReceived"
                    && e["params"]["type"] == "Document"
                    && e["params"]["frameId"] == frame_id.as_str()
            })
            .last()
            .map(|e| {
                let r = &e["params"]["response"];
                (
                    r["status"].as_f64().map_or(0, |s| s as u16),
                    r["mimeType"].as_str().map(str::to_string),
                )
            })
            .unwrap_or((0, None));
        if status == 0 {
            return Err(DriveError::Navigation(
                "no response for the main document".into(),
            ));
        }
        Ok(Rendered {
            html,
            final_url,
            status,
            content_type,
            loaded_after,
        })
    }
}

enum DriveError {
    Timeout,
    Navigation(String),
    TooLarge,
    Cdp(CdpError),
}

impl From<CdpError> for DriveError {
    fn from(e: CdpError) -> Self {
        DriveError::Cdp(e)
    }
}
