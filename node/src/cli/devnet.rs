//! `d402 devnet`: the README's main job. A whole local network in one command, and one
//! paid task across it.
//!
//! As child processes of this same binary, each with its own state directory under
//! `--dir`: a bootstrap, a validator, three workers offering `web.page_to_markdown@1` and
//! a gateway (`--payment local --dev-faucet true`, fanout 3, quorum 2, HTTP on a port the
//! OS chooses). Before they start, a fresh publisher registers the capability with a 10%
//! creator commission (`d402 capability register`, the creator paid to a fresh local
//! wallet) and the registration is imported into every node's store (`d402 capability
//! import`). Then it funds a client wallet from the faucet, serves a small page on
//! 127.0.0.1, runs one paid task through the 402 flow (the code of `d402 task run`) and
//! prints the Markdown, the leased workers, the quorum, the split and the balances before
//! and after. `--keep-running` leaves the network up and prints how to use it.
//!
//! The children run in their own process group. They are stopped (SIGTERM, then SIGKILL)
//! when the devnet ends, on Ctrl-C or SIGTERM, and killed when it unwinds from a panic
//! (`kill_on_drop`). A devnet killed with SIGKILL cannot signal them, so each child's
//! standard input is a pipe from the devnet and each runs with `--exit-with-stdin`: the
//! kernel closes the pipes when the devnet dies, and the children shut down.

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use d402_protocol::{SigningKey, messages::PayeeRole};
use d402_settlement::{Asset, wallet};
use http_body_util::Full;
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    net::TcpListener,
    process::{Child, Command},
};

use super::{
    http_client::{BaseUrl, Connection},
    task::{self, PayOptions, TaskRequest},
    wallet::{balance, create_wallet, describe_units, faucet},
};
use crate::capstore::builtin_capabilities;

/// The capability the devnet sells.
pub const CAPABILITY: &str = "web.page_to_markdown@1";
/// Its namespace.
const NAMESPACE: &str = "web";
/// The creator commission of the devnet's registration: 10%.
pub const COMMISSION_BPS: u64 = 1000;
/// What the client wallet is funded with.
const CLIENT_FUNDS: &str = "1.00";
/// The gateway's price per task.
const PRICE: &str = "$0.01";
/// Workers started.
const WORKERS: usize = 3;
/// Longest wait for one node to print its `listening` line.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for the gateway to be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for the paid task.
const TASK_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a child gets to exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The page the workers snapshot.
const PAGE: &str = r#"<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>d402 devnet page</title>
</head>
<body>
<h1>Hello from the d402 devnet</h1>
<p>This page is served on <strong>127.0.0.1</strong> by <code>d402 devnet</code>. Three
workers snapshotted it in headless Chromium and turned it into Markdown in a Wasm sandbox;
the gateway compared their claims and settled the payment.</p>
<h2>What happened</h2>
<ol>
<li>The client asked for a task and got <em>402 Payment Required</em>.</li>
<li>It paid on the local rail and asked again.</li>
<li>The gateway leased three workers and needed two to agree.</li>
</ol>
<p hidden>This paragraph is hidden and must not appear.</p>
<script>document.title = "scripts are dropped too";</script>
<p>Read more in <a href="/docs/design">the design notes</a>.</p>
</body>
</html>
"#;

/// `d402 devnet`.
#[derive(Debug, Args)]
pub struct DevnetArgs {
    /// Directory for the nodes' state, wallets and logs (created; must be empty). Default:
    /// a fresh temporary directory, removed on exit unless --keep-running.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Stay up after the task: print the gateway URL and a curl example, run until Ctrl-C.
    #[arg(long)]
    keep_running: bool,
    /// Workers' snapshotter: playwright (headless Chromium, the default) or fetch.
    #[arg(long, default_value = "playwright", value_parser = ["playwright", "fetch"])]
    snapshotter: String,
}

/// Runs `d402 devnet`.
pub fn run(a: DevnetArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot install the SIGTERM handler")?;
        let mut net = Devnet::default();
        let serving = net.serving.clone();
        // A signal while setting up is an error; while --keep-running serves, it is the
        // way to stop.
        let stopped = |why: &str| {
            if serving.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err(anyhow::anyhow!("{why} before the devnet was up"))
            }
        };
        let result = tokio::select! {
            r = main_job(&a, &mut net) => r,
            _ = tokio::signal::ctrl_c() => stopped("interrupted (Ctrl-C)"),
            _ = term.recv() => stopped("terminated (SIGTERM)"),
        };
        progress(&net.started, "stopping the network");
        net.stop().await;
        if let Some(dir) = net.temp_dir.take() {
            let _ = fs::remove_dir_all(&dir);
        }
        result
    })
}

/// One running child node.
struct NodeProc {
    name: String,
    child: Child,
    peer_id: String,
    listen: Vec<String>,
    http: Option<String>,
}

/// The devnet's children and directories.
struct Devnet {
    started: Instant,
    nodes: Vec<NodeProc>,
    /// Process group of the children (the first child's pid).
    pgid: Option<u32>,
    /// Removed at the end (the default temporary directory).
    temp_dir: Option<PathBuf>,
    page: Option<tokio::task::JoinHandle<()>>,
    /// Set once `--keep-running` serves: a signal then ends the devnet normally.
    serving: Arc<AtomicBool>,
}

impl Default for Devnet {
    fn default() -> Self {
        Devnet {
            started: Instant::now(),
            nodes: Vec::new(),
            pgid: None,
            temp_dir: None,
            page: None,
            serving: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl Devnet {
    /// SIGTERM to every child, then SIGKILL to those still running after the grace time.
    async fn stop(&mut self) {
        if let Some(page) = self.page.take() {
            page.abort();
        }
        for n in &self.nodes {
            if let Some(pid) = n.child.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        for n in &mut self.nodes {
            if tokio::time::timeout(STOP_GRACE, n.child.wait())
                .await
                .is_err()
            {
                eprintln!("{} did not stop within {STOP_GRACE:?}; killing it", n.name);
                let _ = n.child.kill().await;
            }
        }
        // Anything the children started in their group (Chromium runs in its own group
        // and exits when its worker's pipe closes).
        if let Some(pgid) = self.pgid.take() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        self.nodes.clear();
    }

    fn node(&self, name: &str) -> anyhow::Result<&NodeProc> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name}"))
    }
}

fn progress(started: &Instant, what: &str) {
    eprintln!("[{:>5.1}s] {what}", started.elapsed().as_secs_f64());
}

/// Prepares the directory: `--dir` (created, must be empty) or a fresh temporary one.
fn prepare_dir(a: &DevnetArgs, net: &mut Devnet) -> anyhow::Result<PathBuf> {
    match &a.dir {
        Some(dir) => {
            if dir.exists() {
                if !dir.is_dir() {
                    bail!("--dir {} is not a directory", dir.display());
                }
                if fs::read_dir(dir)?.next().is_some() {
                    bail!(
                        "--dir {} is not empty; give a new or empty directory (a devnet starts \
                         from scratch)",
                        dir.display()
                    );
                }
            }
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            Ok(dir.canonicalize()?)
        }
        None => {
            let mut suffix = [0u8; 6];
            getrandom::fill(&mut suffix).context("no randomness from the OS")?;
            let dir = std::env::temp_dir().join(format!("d402-devnet-{}", hex::encode(suffix)));
            fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            if !a.keep_running {
                net.temp_dir = Some(dir.clone());
            }
            Ok(dir)
        }
    }
}

/// Runs this binary with `args` to completion and returns its stdout.
async fn run_self(args: &[&str]) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let out = clean_env(Command::new(&exe))
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("cannot run {} {}", exe.display(), args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "d402 {} failed: {}",
            args.first().copied().unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes `D402_*` variables, so the user's node settings do not leak into the devnet.
fn clean_env(mut cmd: Command) -> Command {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("D402_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Writes the built-in capability, registers it with a fresh publisher and a 10%
/// commission to `creator`, and returns (manifest, wasm, registration) paths.
async fn register_capability(
    dir: &Path,
    creator: &str,
) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let builtin = builtin_capabilities()
        .into_iter()
        .find(|b| b.manifest.capability().to_string() == CAPABILITY)
        .with_context(|| format!("{CAPABILITY} is not built into this binary"))?;
    let cap_dir = dir.join("capability");
    fs::create_dir_all(&cap_dir)?;
    let manifest = cap_dir.join("capability.json");
    let wasm = cap_dir.join("page_to_markdown.wasm");
    let registration = cap_dir.join("capability.registration.json");
    fs::write(&manifest, builtin.manifest.to_json_pretty()?)?;
    fs::write(&wasm, builtin.wasm)?;
    let publisher = dir.join("publisher");
    let bps = COMMISSION_BPS.to_string();
    let reg = run_self(&[
        "capability",
        "register",
        "--file",
        path_str(&manifest)?,
        "--state",
        path_str(&publisher)?,
        "--namespace",
        NAMESPACE,
        "--creator-commission-bps",
        &bps,
        "--creator-local-wallet",
        creator,
    ])
    .await?;
    fs::write(&registration, reg)?;
    Ok((manifest, wasm, registration))
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// Starts `d402 node <args>` with its logs in `<dir>/logs/<name>.log` and waits for its
/// `listening` line.
async fn start_node(
    net: &mut Devnet,
    dir: &Path,
    name: &str,
    args: Vec<String>,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let logs = dir.join("logs");
    fs::create_dir_all(&logs)?;
    let log_path = logs.join(format!("{name}.log"));
    let log = fs::File::create(&log_path)?;
    let mut cmd = clean_env(Command::new(&exe));
    cmd.arg("node")
        .args(["--label", name])
        .arg("--state")
        .arg(dir.join("nodes").join(name))
        .args(["--host", "127.0.0.1", "--port", "0"])
        .args(&args)
        // The child stops when this pipe closes: when the devnet ends in any way, SIGKILL
        // included (the write end stays in `child` until then).
        .arg("--exit-with-stdin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .process_group(net.pgid.map_or(0, |g| g as i32));
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info,libp2p=warn,libp2p_kad=error");
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    if net.pgid.is_none() {
        net.pgid = child.id();
    }
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let wait = async {
        while let Some(line) = lines.next_line().await? {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && v["event"] == "listening"
            {
                return Ok::<_, anyhow::Error>(Some(v));
            }
        }
        Ok(None)
    };
    let listening = tokio::time::timeout(START_TIMEOUT, wait).await;
    let v = match listening {
        Ok(Ok(Some(v))) => v,
        other => {
            let why = match other {
                Err(_) => format!("did not start within {START_TIMEOUT:?}"),
                Ok(Err(e)) => format!("stdout failed: {e}"),
                _ => "exited before listening".to_string(),
            };
            let _ = child.kill().await;
            bail!("{name} {why}; its log:\n{}", log_tail(&log_path));
        }
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let strings = |key: &str| -> Vec<String> {
        v[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect()
    };
    net.nodes.push(NodeProc {
        name: name.to_string(),
        child,
        peer_id: v["peer_id"].as_str().unwrap_or_default().to_string(),
        listen: strings("listen"),
        http: v["http"].as_str().map(str::to_string),
    });
    Ok(())
}

/// The last 40 lines of a log file.
fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// `/ip4/127.0.0.1/tcp/…/p2p/<id>` of a node.
fn dial_addr(n: &NodeProc) -> anyhow::Result<String> {
    let tcp = n
        .listen
        .iter()
        .find(|a| a.starts_with("/ip4/127.0.0.1/tcp/"))
        .with_context(|| format!("{} has no loopback TCP address: {:?}", n.name, n.listen))?;
    Ok(format!("{tcp}/p2p/{}", n.peer_id))
}

/// Serves [`PAGE`] on 127.0.0.1 (any path answers it; `/favicon.ico` 404).
async fn serve_page() -> anyhow::Result<(u16, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let (status, body) = if req.uri().path() == "/favicon.ico" {
                        (404, Bytes::from_static(b"not found"))
                    } else {
                        (200, Bytes::from_static(PAGE.as_bytes()))
                    };
                    hyper::Response::builder()
                        .status(status)
                        .header("content-type", "text/html; charset=utf-8")
                        .body(Full::new(body))
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((port, task))
}

/// A named local-rail account whose balance the devnet reports.
struct Account {
    name: String,
    address: String,
}

async fn balances(conn: &mut Connection, accounts: &[Account]) -> anyhow::Result<Vec<u64>> {
    let mut out = Vec::with_capacity(accounts.len());
    for a in accounts {
        out.push(balance(conn, &a.address).await?.0);
    }
    Ok(out)
}

async fn wait_ready(conn: &mut Connection) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let last = match conn.get("/readyz").await {
            Ok(r) if r.status.is_success() => return Ok(()),
            Ok(r) => format!("{} {}", r.status, r.error_text()),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!("the gateway is not ready after {READY_TIMEOUT:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn main_job(a: &DevnetArgs, net: &mut Devnet) -> anyhow::Result<()> {
    let started = net.started;
    let step = |what: &str| progress(&started, what);
    if a.snapshotter == "playwright" && !Path::new(d402_runtime::chromium::DEFAULT_BINARY).is_file()
    {
        bail!(
            "Chromium is not installed (no {}): the workers snapshot pages with headless \
             Chromium. Install it (Debian: apt-get install -y chromium, or bash scripts/setup.sh), \
             or run `d402 devnet --snapshotter fetch` to use a plain HTTP fetch instead",
            d402_runtime::chromium::DEFAULT_BINARY
        );
    }
    let dir = prepare_dir(a, net)?;
    step(&format!(
        "devnet in {}{}",
        dir.display(),
        if net.temp_dir.is_some() {
            " (removed on exit; pass --dir to keep it)"
        } else {
            ""
        }
    ));

    // Wallets: the client, the creator, one payout wallet per worker.
    let wallets = dir.join("wallets");
    let client_key = create_wallet(&wallets.join("client.key"))?;
    let creator_key = create_wallet(&wallets.join("creator.key"))?;
    let worker_keys: Vec<SigningKey> = (1..=WORKERS)
        .map(|i| create_wallet(&wallets.join(format!("worker-{i}.key"))))
        .collect::<anyhow::Result<_>>()?;
    let creator = wallet::address(&creator_key);

    // The capability: registered with a 10% commission by a fresh publisher, imported
    // into every node's store.
    let (manifest, wasm, registration) = register_capability(&dir, &creator).await?;
    let reg_json: Value = serde_json::from_slice(&fs::read(&registration)?)?;
    step(&format!(
        "registered {CAPABILITY}: {COMMISSION_BPS} bps ({}%) creator commission to {creator}, \
         publisher {}",
        COMMISSION_BPS / 100,
        reg_json["publisher"].as_str().unwrap_or("(fresh key)")
    ));
    let names: Vec<String> = ["bootstrap", "validator"]
        .into_iter()
        .map(str::to_string)
        .chain((1..=WORKERS).map(|i| format!("worker-{i}")))
        .chain(["gateway".to_string()])
        .collect();
    for name in &names {
        let state = dir.join("nodes").join(name);
        run_self(&[
            "capability",
            "import",
            "--state",
            path_str(&state)?,
            "--file",
            path_str(&manifest)?,
            "--wasm",
            path_str(&wasm)?,
            "--registration",
            path_str(&registration)?,
        ])
        .await?;
    }
    step(&format!(
        "imported the registration into {} node stores",
        names.len()
    ));

    // The network.
    start_node(net, &dir, "bootstrap", vec![]).await?;
    let boot = dial_addr(net.node("bootstrap")?)?;
    step(&format!("bootstrap up: {boot}"));
    start_node(
        net,
        &dir,
        "validator",
        vec!["--peer".into(), boot.clone(), "--validator".into()],
    )
    .await?;
    step(&format!(
        "validator up: {} (--validator; named to the gateway with --validator-peer; the gateway requires 1 agreeing verdict on top of the quorum: --validators 1)",
        net.node("validator")?.peer_id
    ));
    let starts = (1..=WORKERS).map(|i| {
        let name = format!("worker-{i}");
        let args = vec![
            "--peer".to_string(),
            boot.clone(),
            "--offer".into(),
            CAPABILITY.into(),
            "--snapshotter".into(),
            a.snapshotter.clone(),
            "--allow-loopback-urls".into(),
            "--local-payout-wallet".into(),
            wallet::address(&worker_keys[i - 1]),
        ];
        (name, args)
    });
    for (name, args) in starts {
        start_node(net, &dir, &name, args).await?;
        step(&format!(
            "{name} up: {} offering {CAPABILITY} ({} snapshots)",
            net.node(&name)?.peer_id,
            a.snapshotter
        ));
    }
    let validator_peer = net.node("validator")?.peer_id.clone();
    start_node(
        net,
        &dir,
        "gateway",
        vec![
            "--peer".into(),
            boot.clone(),
            "--offer".into(),
            CAPABILITY.into(),
            "--http-host".into(),
            "127.0.0.1".into(),
            "--http-port".into(),
            "0".into(),
            "--payment".into(),
            "local".into(),
            "--dev-faucet".into(),
            "true".into(),
            "--gateway-price".into(),
            PRICE.into(),
            "--fanout".into(),
            "3".into(),
            "--quorum".into(),
            "2".into(),
            "--validator-peer".into(),
            validator_peer,
            "--validators".into(),
            "1".into(),
            "--require-signed-capability-registration".into(),
            "--allow-loopback-urls".into(),
        ],
    )
    .await?;
    let http = net
        .node("gateway")?
        .http
        .clone()
        .context("the gateway printed no http address")?;
    let base = BaseUrl::parse(&format!("http://{http}"))?;
    let mut conn = Connection::new(base.clone(), TASK_TIMEOUT);
    wait_ready(&mut conn).await?;
    step(&format!(
        "gateway up and ready: {base} (fanout 3, quorum 2, price {PRICE})"
    ));

    // The page, the client's money.
    let (page_port, page_task) = serve_page().await?;
    net.page = Some(page_task);
    let page_url = format!("http://127.0.0.1:{page_port}/");
    step(&format!("serving the page at {page_url}"));
    let funds = Asset::local_usdc().parse(CLIENT_FUNDS)?;
    let client = wallet::address(&client_key);
    faucet(&mut conn, &client, funds).await?;
    step(&format!(
        "funded the client wallet {client} with {} from the faucet",
        describe_units(funds, &Asset::local_usdc().id)
    ));

    // The paid task.
    let request = TaskRequest {
        capability: CAPABILITY.to_string(),
        input: [("url".to_string(), Value::String(page_url.clone()))]
            .into_iter()
            .collect(),
        idempotency_key: None,
    };
    let options = PayOptions {
        max_units: Asset::local_usdc().parse(task::DEFAULT_MAX_PRICE)?,
        x402_version: 2,
    };
    let challenge = task::fetch_challenge(&mut conn, &request, &options).await?;
    step(&format!(
        "402 Payment Required: {} to {} on {}",
        describe_units(challenge.amount, &Asset::local_usdc().id),
        challenge.gateway_key,
        d402_settlement::LOCAL_NETWORK
    ));
    let mut accounts = vec![Account {
        name: "client".into(),
        address: client.clone(),
    }];
    for (i, k) in worker_keys.iter().enumerate() {
        accounts.push(Account {
            name: format!("worker-{}", i + 1),
            address: wallet::address(k),
        });
    }
    accounts.push(Account {
        name: "creator".into(),
        address: creator.clone(),
    });
    accounts.push(Account {
        name: "gateway".into(),
        address: challenge.gateway_key.to_string(),
    });
    let before = balances(&mut conn, &accounts).await?;
    let task_started = Instant::now();
    let outcome = task::pay_challenge(&mut conn, &challenge, &client_key, &options).await?;
    if !outcome.response.status.is_success() {
        bail!(
            "the paid task failed: {} {}{}",
            outcome.response.status,
            String::from_utf8_lossy(&outcome.response.body),
            if outcome.refunded() {
                " (the payment was refunded)"
            } else {
                ""
            }
        );
    }
    step(&format!(
        "paid and answered in {:.2}s",
        task_started.elapsed().as_secs_f64()
    ));
    let after = balances(&mut conn, &accounts).await?;

    report(net, &outcome, &accounts, &before, &after, &page_url)?;
    step(&format!("done in {:.1}s", started.elapsed().as_secs_f64()));

    if a.keep_running {
        let client_wallet = wallets.join("client.key");
        println!();
        println!(
            "The devnet keeps running (Ctrl-C stops it). State and logs: {}",
            dir.display()
        );
        println!("gateway: {base}");
        println!("page:    {page_url}");
        println!("try:");
        println!(
            "  curl -i -X POST {} -H 'content-type: application/json' -d '{{\"capability\":\"{CAPABILITY}\",\"input\":{{\"url\":\"{page_url}\"}}}}'",
            base.url("/v1/tasks")
        );
        println!(
            "  d402 task run --gateway {base} --capability {CAPABILITY} --input url={page_url} --wallet {}",
            client_wallet.display()
        );
        println!(
            "  d402 wallet balance --gateway {base} --wallet {}",
            client_wallet.display()
        );
        std::io::stdout().flush()?;
        net.serving.store(true, Ordering::SeqCst);
        watch_children(net).await?;
    }
    Ok(())
}

/// Waits until a child exits (which ends a `--keep-running` devnet with an error).
async fn watch_children(net: &mut Devnet) -> anyhow::Result<()> {
    loop {
        for n in &mut net.nodes {
            if let Some(status) = n.child.try_wait()? {
                bail!("{} exited ({status}); stopping the devnet", n.name);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Prints the Markdown, the workers, the quorum, the split and the balances.
fn report(
    net: &Devnet,
    outcome: &task::TaskOutcome,
    accounts: &[Account],
    before: &[u64],
    after: &[u64],
    page_url: &str,
) -> anyhow::Result<()> {
    let asset = Asset::local_usdc();
    let fmt = |u: u64| format!("{} {}", asset.format(u), asset.symbol);
    let body = outcome.body();
    let receipt = outcome
        .receipt
        .as_ref()
        .context("the answer has no verified receipt")?;
    let peer_names: BTreeMap<&str, &str> = net
        .nodes
        .iter()
        .map(|n| (n.peer_id.as_str(), n.name.as_str()))
        .collect();
    let addr_names: BTreeMap<&str, &str> = accounts
        .iter()
        .map(|a| (a.address.as_str(), a.name.as_str()))
        .collect();
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!(
        "== Markdown of {page_url} (task {}) ==",
        body["task_id"].as_str().unwrap_or("?")
    ));
    line(task::output_text(body)?.trim_end().to_string());
    line(String::new());
    line("== Workers (leased by the gateway; their signed claims) ==".into());
    for c in body["claims"].as_array().into_iter().flatten() {
        let peer = c["worker"].as_str().unwrap_or("?");
        line(format!(
            "leased {:<9} {peer}  claim {}  {}",
            peer_names.get(peer).copied().unwrap_or("(unknown)"),
            c["claim_cid"].as_str().unwrap_or("?"),
            c["judgement"].as_str().unwrap_or("?")
        ));
    }
    let q = &body["quorum"];
    line(format!(
        "quorum: {} of {} leased workers agreed (fanout {}, quorum {})",
        q["agreeing"], q["fanout"], q["fanout"], q["quorum"]
    ));
    line(String::new());
    line(format!(
        "== Split of {} (receipt signed by the gateway, verified) ==",
        fmt(receipt.body.charged.units)
    ));
    let mut worker_net = 0u64;
    let mut commission = 0u64;
    let mut margin = 0u64;
    for t in &receipt.body.transfers {
        let who = addr_names.get(t.to.as_str()).copied().unwrap_or("?");
        line(format!(
            "  {:<8} {:>14}  to {who} {}",
            task::role_name(t.role),
            fmt(t.units),
            t.to
        ));
        match t.role {
            PayeeRole::Worker => worker_net += t.units,
            PayeeRole::Creator => commission += t.units,
            PayeeRole::Gateway => margin += t.units,
            PayeeRole::Refund => {}
        }
    }
    let gross = worker_net + commission;
    line(format!("worker net:         {}", fmt(worker_net)));
    line(format!(
        "creator commission: {} ({}% of {} gross worker payout, {COMMISSION_BPS} bps)",
        fmt(commission),
        COMMISSION_BPS / 100,
        fmt(gross)
    ));
    line(format!("gateway margin:     {}", fmt(margin)));
    line(String::new());
    line("== Balances ==".into());
    line(format!(
        "  {:<10} {:>14} {:>14} {:>15}",
        "account", "before", "after", "change"
    ));
    let mut total_before = 0u64;
    let mut total_after = 0u64;
    for (i, acc) in accounts.iter().enumerate() {
        let (b, a) = (before[i], after[i]);
        total_before += b;
        total_after += a;
        let change = if a >= b {
            format!("+{}", asset.format(a - b))
        } else {
            format!("-{}", asset.format(b - a))
        };
        line(format!(
            "  {:<10} {:>14} {:>14} {:>15}",
            acc.name,
            fmt(b),
            fmt(a),
            change
        ));
    }
    line(format!(
        "  {:<10} {:>14} {:>14} {:>15}",
        "total",
        fmt(total_before),
        fmt(total_after),
        if total_before == total_after {
            "unchanged".to_string()
        } else {
            "CHANGED".to_string()
        }
    ));
    print!("{out}");
    std::io::stdout().flush()?;
    if total_before != total_after {
        bail!("balances do not add up: {total_before} units before, {total_after} after");
    }
    Ok(())
}
