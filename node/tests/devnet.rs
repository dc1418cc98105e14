//! `d402 devnet` end to end, as a user runs it: the built binary starts a bootstrap, a
//! validator, three workers (headless Chromium snapshots) and a gateway as child
//! processes, funds a client, serves a page on loopback and runs one paid task. The test
//! checks what it prints: the page's Markdown, the 10% creator commission, balances that
//! add up to the unit. With `--keep-running` it then drives the running devnet with the
//! client commands (`d402 wallet new|faucet|balance`, `d402 task run` in x402 v1 and v2,
//! a price cap that refuses to pay) and stops it with SIGTERM: every child must be gone.
//!
//! Needs Debian's `chromium`. Without it the test is skipped with a loud message, except
//! under CI (`CI` set), where it must run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use d402_settlement::parse_decimal;

const BIN: &str = env!("CARGO_BIN_EXE_d402");
/// Generous: a loaded 2-core CI machine, debug build, Chromium starting three times.
const DEVNET_TIMEOUT: Duration = Duration::from_secs(240);

fn chromium_or_skip() -> bool {
    if Path::new("/usr/bin/chromium").is_file() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("CI is set but /usr/bin/chromium is missing: install Debian's chromium");
    }
    eprintln!(
        "\n!!!!!!!!\nSKIPPING the devnet test: /usr/bin/chromium is not installed \
         (apt-get install -y chromium). Under CI this test runs and fails instead.\n!!!!!!!!\n"
    );
    false
}

/// Stops the devnet if the test fails half-way: SIGTERM first (the devnet then stops its
/// children; a SIGKILLed devnet cannot), SIGKILL after 30 s.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.0.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Processes whose command line mentions `needle` (the devnet's directory).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains(needle) {
            found.push(format!("{}: {text}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

fn d402(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Units of a `1.25 USDC`-style cell.
fn usdc(cell: &str) -> u64 {
    let amount = cell.trim().strip_suffix("USDC").expect(cell).trim();
    parse_decimal(amount, 6).expect(cell)
}

/// The balance rows: (account, before, after) in units.
fn balance_rows(out: &str) -> Vec<(String, u64, u64)> {
    let table = out
        .split("== Balances ==")
        .nth(1)
        .expect("a balances table");
    let mut rows = Vec::new();
    for line in table.lines().skip(2) {
        let cells: Vec<&str> = line.split_whitespace().collect();
        if cells.len() < 6 || cells[0] == "total" {
            break;
        }
        // name, before, USDC, after, USDC, change
        rows.push((
            cells[0].to_string(),
            usdc(&format!("{} USDC", cells[1])),
            usdc(&format!("{} USDC", cells[3])),
        ));
    }
    rows
}

#[test]
fn devnet_runs_a_paid_task_and_serves_the_client_commands() {
    if !chromium_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("devnet");
    let dir_text = dir.to_str().unwrap().to_string();
    let child = Command::new(BIN)
        .args(["devnet", "--dir", &dir_text, "--keep-running"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut guard = Guard(child);
    let (tx, rx) = mpsc::channel::<(bool, String)>();
    let out = guard.0.stdout.take().unwrap();
    let err = guard.0.stderr.take().unwrap();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send((true, line));
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx2.send((false, line));
        }
    });

    // Read until the devnet has printed how to use it (its last line names `wallet balance`).
    let deadline = Instant::now() + DEVNET_TIMEOUT;
    let mut printed = String::new();
    let mut progress = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((true, line)) => {
                printed.push_str(&line);
                printed.push('\n');
                if line.contains("d402 wallet balance") {
                    break;
                }
            }
            Ok((false, line)) => {
                progress.push_str(&line);
                progress.push('\n');
            }
            Err(_) => panic!(
                "the devnet did not come up in {DEVNET_TIMEOUT:?} (or exited: {:?})\nstdout:\n{printed}\nstderr:\n{progress}",
                guard.0.try_wait()
            ),
        }
    }
    let gateway = printed
        .lines()
        .find_map(|l| l.strip_prefix("gateway:"))
        .expect("a gateway line")
        .trim()
        .to_string();
    let all = format!("stdout:\n{printed}\nstderr:\n{progress}");

    // The page's Markdown: converted by the Wasm capability from Chromium's snapshot.
    assert!(printed.contains("# Hello from the d402 devnet"), "{all}");
    assert!(printed.contains("## What happened"), "{all}");
    assert!(printed.contains("1. The client asked for a task"), "{all}");
    assert!(printed.contains("*402 Payment Required*"), "{all}");
    assert!(
        printed.contains("[the design notes](http://127.0.0.1:"),
        "links resolve against the page URL: {all}"
    );
    assert!(!printed.contains("hidden and must not appear"), "{all}");
    assert!(!printed.contains("scripts are dropped"), "{all}");
    // Progress lines as it started.
    for step in [
        "bootstrap up",
        "validator up",
        "worker-3 up",
        "gateway up and ready",
    ] {
        assert!(progress.contains(step), "no progress line {step:?}: {all}");
    }
    // Quorum 2 of fanout 3, and at least two accepted claims.
    assert!(
        printed.contains("(fanout 3, quorum 2)"),
        "no quorum line: {all}"
    );
    assert!(printed.matches(" accepted").count() >= 2, "{all}");

    // The split: 10% of the gross worker payout goes to the creator.
    let line_value = |prefix: &str| -> u64 {
        let line = printed
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line: {all}"));
        let rest = line[prefix.len()..].trim();
        let amount = rest.split(" USDC").next().unwrap();
        parse_decimal(amount.trim(), 6).unwrap()
    };
    let worker_net = line_value("worker net:");
    let commission = line_value("creator commission:");
    let margin = line_value("gateway margin:");
    assert!(
        printed.contains("(10% of") && printed.contains("1000 bps"),
        "no 10% commission line: {all}"
    );
    let gross = worker_net + commission;
    assert!(gross > 0, "{all}");
    assert_eq!(commission, gross / 10, "10% of {gross}: {all}");
    assert_eq!(
        worker_net + commission + margin,
        10_000,
        "the price, $0.01: {all}"
    );

    // Balances add up: the client paid the price, the others got the split, the total
    // is unchanged.
    let rows = balance_rows(&printed);
    let names: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "client", "worker-1", "worker-2", "worker-3", "creator", "gateway"
        ],
        "{all}"
    );
    let before: u64 = rows.iter().map(|r| r.1).sum();
    let after: u64 = rows.iter().map(|r| r.2).sum();
    assert_eq!(before, after, "{all}");
    let (_, client_before, client_after) = rows[0];
    assert_eq!(client_before, 1_000_000, "{all}");
    assert_eq!(client_before - client_after, 10_000, "{all}");
    let workers_gain: u64 = rows[1..4].iter().map(|r| r.2 - r.1).sum();
    assert_eq!(workers_gain, worker_net, "{all}");
    assert_eq!(rows[4].2 - rows[4].1, commission, "{all}");
    assert_eq!(rows[5].2 - rows[5].1, margin, "{all}");
    assert!(printed.contains("unchanged"), "{all}");

    // The running devnet serves the client commands.
    let page = printed
        .lines()
        .find_map(|l| l.strip_prefix("page:"))
        .expect("a page line")
        .trim()
        .to_string();
    let wallet = tmp.path().join("me.key");
    let wallet_text = wallet.to_str().unwrap();
    let created = d402(&["wallet", "new", "--wallet", wallet_text]);
    assert!(created.status.success(), "{}", stderr(&created));
    let address = stdout(&created).trim().to_string();
    let again = d402(&["wallet", "new", "--wallet", wallet_text]);
    assert!(
        !again.status.success(),
        "a wallet file is never overwritten"
    );
    assert!(
        stderr(&again).contains("never overwritten"),
        "{}",
        stderr(&again)
    );

    let funded = d402(&[
        "wallet",
        "faucet",
        "--gateway",
        &gateway,
        "--wallet",
        wallet_text,
        "--amount",
        "0.05",
    ]);
    assert!(funded.status.success(), "{}", stderr(&funded));
    assert!(
        stdout(&funded).contains("balance 0.05 USDC (50000 units)"),
        "{}",
        stdout(&funded)
    );

    // A price cap below the price: refused before paying.
    let capped = d402(&[
        "task",
        "run",
        "--gateway",
        &gateway,
        "--capability",
        "web.page_to_markdown@1",
        "--input",
        &format!("url={page}"),
        "--wallet",
        wallet_text,
        "--max-price",
        "$0.001",
    ]);
    assert!(!capped.status.success());
    assert!(
        stderr(&capped).contains("nothing was paid"),
        "{}",
        stderr(&capped)
    );
    let balance = d402(&[
        "wallet",
        "balance",
        "--gateway",
        &gateway,
        "--address",
        &address,
    ]);
    assert!(balance.status.success(), "{}", stderr(&balance));
    assert_eq!(
        stdout(&balance).trim(),
        format!("{address} 0.05 USDC (50000 units)")
    );

    // Paid with x402 v1 (X-PAYMENT), the whole answer as JSON.
    let v1 = d402(&[
        "task",
        "run",
        "--gateway",
        &gateway,
        "--capability",
        "web.page_to_markdown@1",
        "--input",
        &format!("url={page}"),
        "--wallet",
        wallet_text,
        "--x402-version",
        "1",
        "--idempotency-key",
        "devnet-test-v1",
        "--json",
    ]);
    assert!(v1.status.success(), "{}\n{}", stdout(&v1), stderr(&v1));
    let body: serde_json::Value = serde_json::from_str(&stdout(&v1)).unwrap();
    assert_eq!(body["status"], "completed");
    assert_eq!(body["receipt_verified"], true);
    assert!(
        body["output"]
            .as_str()
            .unwrap()
            .contains("# Hello from the d402 devnet")
    );
    assert!(stderr(&v1).contains("receipt verified"), "{}", stderr(&v1));

    // The same Idempotency-Key again, v2: the stored answer, no second charge.
    let v2 = d402(&[
        "task",
        "run",
        "--gateway",
        &gateway,
        "--capability",
        "web.page_to_markdown@1",
        "--input",
        &format!("url={page}"),
        "--wallet",
        wallet_text,
        "--idempotency-key",
        "devnet-test-v1",
    ]);
    assert!(v2.status.success(), "{}\n{}", stdout(&v2), stderr(&v2));
    assert!(
        stdout(&v2).starts_with("# Hello from the d402 devnet"),
        "{}",
        stdout(&v2)
    );
    let balance = d402(&[
        "wallet",
        "balance",
        "--gateway",
        &gateway,
        "--wallet",
        wallet_text,
    ]);
    assert_eq!(
        stdout(&balance).trim(),
        format!("{address} 0.04 USDC (40000 units)"),
        "one task charged once: {}",
        stderr(&v2)
    );

    // SIGTERM stops the devnet and every child; the state stays in --dir.
    let pid = guard.0.id();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let stop_deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = guard.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < stop_deadline,
            "the devnet did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "a SIGTERM while serving is a normal stop: {status}"
    );
    let left = processes_mentioning(&dir_text);
    assert!(left.is_empty(), "children left running: {left:#?}");
    assert!(dir.join("logs/gateway.log").is_file());
    assert!(dir.join("wallets/client.key").is_file());
}
