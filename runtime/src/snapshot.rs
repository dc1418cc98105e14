//! What a snapshotter returns, and its errors.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use d402_capabilities::SnapshotterKind;
use d402_protocol::{Cid, messages::SnapshotMeta};

use crate::policy::PolicyError;

/// A page as a snapshotter saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The bytes (HTML for a page).
    pub body: Vec<u8>,
    /// `raw` CID of `body`.
    pub cid: Cid,
    /// The URL finally loaded, after redirects.
    pub final_url: String,
    /// HTTP status of the final response.
    pub status: u16,
    /// `Content-Type` of the final response, when known.
    pub content_type: Option<String>,
    /// Which snapshotter took it.
    pub snapshotter: SnapshotterKind,
    /// Redirect hops followed, in order (each one re-checked by the URL policy).
    pub redirects: Vec<String>,
    /// How long it took.
    pub timing: Timing,
    /// When it was taken (Unix milliseconds).
    pub taken_at: u64,
    /// Set when another snapshotter was asked for and this one stood in: why.
    pub fallback: Option<String>,
}

/// Timing of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timing {
    /// From start to the body in hand.
    pub total: Duration,
    /// From start to the final response's headers (fetch) or the load event (browser).
    pub first_byte: Duration,
}

impl Snapshot {
    /// The protocol's snapshot metadata for a claim.
    pub fn meta(&self) -> SnapshotMeta {
        SnapshotMeta {
            final_url: self.final_url.clone(),
            status: self.status,
            len: self.body.len() as u64,
            snapshotter: snapshotter_name(self.snapshotter).to_string(),
            taken_at: self.taken_at,
        }
    }
}

/// The wire name of a snapshotter (`fetch`, `playwright`).
pub fn snapshotter_name(kind: SnapshotterKind) -> &'static str {
    match kind {
        SnapshotterKind::Fetch => "fetch",
        SnapshotterKind::Playwright => "playwright",
    }
}

pub(crate) fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Why a snapshot failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The URL policy refused the URL, an address, or a redirect hop.
    #[error("refused by the URL policy: {0}")]
    Policy(#[from] PolicyError),
    /// No checked address accepted a connection.
    #[error("could not connect to {host}: {message}")]
    Connect {
        /// The host.
        host: String,
        /// The last error.
        message: String,
    },
    /// TLS failed.
    #[error("TLS with {host} failed: {message}")]
    Tls {
        /// The host.
        host: String,
        /// What failed.
        message: String,
    },
    /// The HTTP exchange failed.
    #[error("HTTP error: {0}")]
    Http(String),
    /// More redirects than allowed.
    #[error("more than {0} redirects")]
    TooManyRedirects(usize),
    /// The final response was not a success.
    #[error("the page answered HTTP {0}")]
    Status(u16),
    /// The body is larger than the cap.
    #[error("the page is larger than {0} bytes")]
    TooLarge(u64),
    /// No response headers in time.
    #[error("no response within {0:?} (time to first byte)")]
    FirstByteTimeout(Duration),
    /// The whole snapshot took too long.
    #[error("snapshot took longer than {0:?}")]
    Timeout(Duration),
    /// The browser's egress proxy refused the page or a redirect hop under the URL policy.
    #[error("refused by the URL policy at the egress proxy: {0}")]
    EgressRefused(String),
    /// The browser binary is not there.
    #[error("browser not found at {0}")]
    BrowserMissing(PathBuf),
    /// The browser failed (did not start, crashed, or the page did not load).
    #[error("browser: {0}")]
    Browser(String),
    /// The capability asked for a snapshotter this worker does not run or grant.
    #[error("snapshotter {0} is not available on this worker")]
    Unavailable(&'static str),
    /// Local I/O failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl SnapshotError {
    /// Whether the failure was the URL policy's refusal (never retried with another
    /// snapshotter: the same policy would refuse again).
    pub fn is_policy(&self) -> bool {
        matches!(
            self,
            SnapshotError::Policy(_) | SnapshotError::EgressRefused(_)
        )
    }
}
