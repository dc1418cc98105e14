//! The built `d402` binary: the operator guide's worker and gateway commands start and
//! stay up, `d402 peers` reads a running node's database, configuration sources combine
//! as documented, and bad flags are refused clearly.

#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

const D402: &str = env!("CARGO_BIN_EXE_d402");
const TIMEOUT: Duration = Duration::from_secs(60);
const WALLET: &str = "4Nd1mYQpH3wLMa3wVwTuQKkqYHT9J3uj2cNQ6gZ5jXL1";

/// A `d402 node` process, killed on drop.
struct Proc {
    child: Child,
    listening: serde_json::Value,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn start(args: &[&str]) -> Proc {
        let mut child = Command::new(D402)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start d402");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(TIMEOUT).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("d402 node {args:?} printed nothing in {TIMEOUT:?}")
        });
        let listening: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|_| panic!("not a JSON line from {args:?}: {line:?}"));
        assert_eq!(listening["event"], "listening");
        Proc { child, listening }
    }

    fn tcp_port(&self) -> u16 {
        self.listening["listen"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|a| a.as_str())
            .find_map(|a| a.split("/tcp/").nth(1).and_then(|p| p.parse().ok()))
            .expect("a TCP listen address")
    }

    fn peer_id(&self) -> String {
        self.listening["peer_id"].as_str().unwrap().to_string()
    }

    fn assert_running(&mut self, what: &str) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "{what} exited early"
        );
    }

    /// SIGTERM, then expect a clean exit.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(ok.success());
        let end = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "exit status {status}");
                return;
            }
            assert!(Instant::now() < end, "node did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn peers_json(state: &Path) -> Vec<serde_json::Value> {
    let out = Command::new(D402)
        .args(["peers", "--json", "--state"])
        .arg(state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "d402 peers failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn operator_guide_worker_and_gateway_commands_stay_up() {
    let dir = tempfile::tempdir().unwrap();
    let st = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let boot_state = st("boot");
    let boot = Proc::start(&[
        "node",
        "--label",
        "boot-1",
        "--state",
        &boot_state,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
    ]);
    let boot_peer = format!("127.0.0.1:{}", boot.tcp_port());

    // The guide's worker command; only the ports differ (0: chosen by the OS) and the
    // placeholders are filled in.
    let worker_state = st("worker-1");
    let mut worker = Proc::start(&[
        "node",
        "--label",
        "worker-1",
        "--state",
        &worker_state,
        "--host",
        "0.0.0.0",
        "--advertise-host",
        "127.0.0.1",
        "--port",
        "0",
        "--peer",
        &boot_peer,
        "--offer",
        "web.page_to_markdown@1",
        "--snapshotter",
        "playwright",
        "--fallback-to-fetch",
        "true",
        "--solana-payout-wallet",
        WALLET,
    ]);
    let worker_peer = format!("127.0.0.1:{}", worker.tcp_port());
    assert!(
        worker.listening["external"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a.as_str().unwrap().starts_with("/ip4/127.0.0.1/tcp/")),
        "advertised host announced: {}",
        worker.listening
    );

    // The guide's gateway command (its --peer is the worker, as in the guide).
    let gateway_state = st("gateway-1");
    let mut gateway = Proc::start(&[
        "node",
        "--label",
        "gateway-1",
        "--state",
        &gateway_state,
        "--host",
        "0.0.0.0",
        "--advertise-host",
        "127.0.0.1",
        "--port",
        "0",
        "--peer",
        &worker_peer,
        "--http-host",
        "127.0.0.1",
        "--http-port",
        "0",
        "--payment",
        "solana-direct",
        "--gateway-price",
        "$0.01",
        "--gateway-budget",
        "0.01",
        "--offer",
        "web.page_to_markdown@1",
        "--require-capability-registration",
        "true",
        "--require-signed-capability-registration",
        "true",
        "--max-creator-commission-bps",
        "2000",
    ]);

    // Both stay up, and the bootstrap's database (read while it runs) lists the worker.
    let worker_id = worker.peer_id();
    let end = Instant::now() + TIMEOUT;
    loop {
        worker.assert_running("worker");
        gateway.assert_running("gateway");
        let peers = peers_json(Path::new(&boot_state));
        if peers.iter().any(|p| p["peer_id"] == worker_id.as_str()) {
            break;
        }
        assert!(
            Instant::now() < end,
            "bootstrap never listed the worker: {peers:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The gateway learnt the worker through its --peer and persisted it.
    let end = Instant::now() + TIMEOUT;
    loop {
        let peers = peers_json(Path::new(&gateway_state));
        if let Some(p) = peers.iter().find(|p| p["peer_id"] == worker_id.as_str()) {
            assert!(!p["addrs"].as_array().unwrap().is_empty());
            break;
        }
        assert!(Instant::now() < end, "gateway never listed the worker");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A few more seconds up.
    std::thread::sleep(Duration::from_secs(2));
    worker.assert_running("worker");
    gateway.assert_running("gateway");

    // The guide's gateway asks for solana-direct, which this build cannot run: its HTTP port
    // says so on every paid request (and never asks for a payment), /healthz still answers.
    assert_eq!(gateway.listening["rail_unavailable"], "solana-direct");
    let http = gateway.listening["http"].as_str().unwrap().to_string();
    let refused = http_request(&http, "POST", "/v1/tasks", "{}");
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(
        refused.contains(r#""code":"rail_unavailable""#),
        "{refused}"
    );
    assert!(
        !refused
            .lines()
            .any(|l| l.to_ascii_lowercase().starts_with("payment-required:")),
        "{refused}"
    );
    assert!(http_request(&http, "GET", "/healthz", "").starts_with("HTTP/1.1 200"));

    let gateway_id = gateway.peer_id();
    gateway.stop();
    worker.stop();
    boot.stop();

    // The identity persists: a restart keeps the PeerId.
    let again = Proc::start(&[
        "node",
        "--label",
        "gateway-1",
        "--state",
        &gateway_state,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--http-port",
        "0",
    ]);
    assert_eq!(again.peer_id(), gateway_id);
    again.stop();
}

/// One HTTP/1.1 request over a plain socket; the whole answer as text.
fn http_request(addr: &str, method: &str, path: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn print_config(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(D402);
    cmd.arg("node").args(args).arg("--print-config");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn flags_over_environment_over_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node.toml");
    std::fs::write(
        &file,
        "label = \"file-label\"\nport = 7100\nhost = \"127.0.0.1\"\npeer = [\"10.9.9.9:1\"]\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let (ok, out, err) = print_config(
        &["--config", f, "--port", "7300"],
        &[
            ("D402_PORT", "7200"),
            ("D402_LABEL", "env-label"),
            ("D402_PEER", "10.0.0.1:1,10.0.0.2:2"),
        ],
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["port"], 7300, "flag wins");
    assert_eq!(v["label"], "env-label", "environment beats the file");
    assert_eq!(v["host"], "127.0.0.1", "file fills the rest");
    assert_eq!(v["peer"].as_array().unwrap().len(), 2);
    assert_eq!(v["roles"]["bootstrap"], true);
}

#[test]
fn bad_flags_are_refused_with_the_flag_named() {
    for (args, needle) in [
        (&["--gateway-price", "$0.01"][..], "--gateway-price"),
        (
            &["--http-port", "1", "--gateway-price", "$0.0000001"][..],
            "--gateway-price",
        ),
        (&["--peer", "not an address"][..], "--peer"),
        (&["--offer", "page@1"][..], "--offer"),
        (&["--fallback-to-fetch", "perhaps"][..], "fallback-to-fetch"),
    ] {
        let (ok, _, err) = print_config(args, &[]);
        assert!(!ok, "{args:?} accepted");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn peers_without_a_database_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(D402)
        .args(["peers", "--state"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no database"));
}

#[test]
fn an_offer_that_does_not_resolve_stops_the_node_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(D402)
        .args(["node", "--host", "127.0.0.1", "--port", "0", "--state"])
        .arg(dir.path())
        .args(["--offer", "example.not_imported@1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--offer example.not_imported@1"), "{err}");
    assert!(err.contains("d402 capability import"), "{err}");
    // It never joined the network, so it made no identity key.
    assert!(!dir.path().join("node.key").exists());
}

#[test]
fn a_node_started_with_exit_with_stdin_stops_when_its_supervisor_goes() {
    // What `d402 devnet` relies on when it is killed with SIGKILL: the kernel closes the
    // pipe it holds, and the node shuts down cleanly.
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("n");
    let mut child = Command::new(D402)
        .args([
            "node",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--exit-with-stdin",
        ])
        .arg("--state")
        .arg(&state)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start d402");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    assert!(line.contains("\"listening\""), "{line}");
    // Still running while the pipe is open.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "exited with its stdin open"
    );
    drop(child.stdin.take());
    let end = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("the node did not stop when its stdin closed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}
