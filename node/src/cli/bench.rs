//! `d402 bench …`: measurements behind the numbers the issues name.
//!
//! `d402 bench discovery` runs real nodes on loopback in this process (each with its own
//! swarm, event loop, key and redb database in a temporary directory) and reports:
//! - the floor: a bare libp2p ping round trip between two minimal swarms;
//! - join latency: time from starting a worker until a gateway's capability lookup returns
//!   it (p50 over `--joins` joins into a running network);
//! - lookup latency with `--nodes` nodes (all DHT servers, `--providers` of them offering
//!   the capability), from `--lookups` different nodes, run to completion and stopped at
//!   the first `--providers` results;
//! - the RSS of a real `d402 node` process (this binary) idling in that network.

use std::{
    io::BufRead,
    net::Ipv4Addr,
    path::PathBuf,
    process::{Command, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use d402_protocol::{Cid, SigningKey};
use d402_runtime::{Executor, ExecutorConfig, Grants, Runner, Snapshotters};
use futures::StreamExt;
use libp2p::{Multiaddr, noise, ping, swarm::SwarmEvent, tcp, yamux};

use crate::{
    net::{self, LookupOptions, NetConfig, NetHandle, Node, PeerSpec},
    state::State,
};

/// `d402 bench` subcommands.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Discovery: join latency, lookup latency at scale, idle RSS (issue 5).
    Discovery(DiscoveryArgs),
    /// Market: coordinator overhead for fanout 3 / quorum 2 against three bare round trips
    /// (issue 6).
    Market(super::bench_market::MarketArgs),
    /// Gateway: paid-task overhead end to end with 64 clients, against its floor (issue 7).
    Gateway(super::bench_gateway::GatewayArgs),
}

/// Arguments of `d402 bench discovery`.
#[derive(Debug, Args)]
pub struct DiscoveryArgs {
    /// Nodes in the scale run.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Workers joining one by one in the join-latency run.
    #[arg(long, default_value_t = 20)]
    joins: usize,
    /// Lookups in the scale run (each from a different node).
    #[arg(long, default_value_t = 20)]
    lookups: usize,
    /// Workers offering the capability in the scale run.
    #[arg(long, default_value_t = 10)]
    providers: usize,
    /// Skip the RSS measurement of a `d402 node` process.
    #[arg(long)]
    skip_rss: bool,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,libp2p_kad=error")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cmd {
        BenchCommand::Discovery(args) => rt.block_on(discovery(args)),
        BenchCommand::Market(args) => rt.block_on(super::bench_market::market(args)),
        BenchCommand::Gateway(args) => rt.block_on(super::bench_gateway::gateway(args)),
    }
}

/// A temporary directory removed on drop.
pub(super) struct TmpDir(pub(super) PathBuf);

impl TmpDir {
    pub(super) fn new() -> anyhow::Result<TmpDir> {
        TmpDir::new_in(None)
    }

    /// A fresh directory under `base` (default: the system's temporary directory), removed
    /// on drop.
    pub(super) fn new_in(base: Option<&std::path::Path>) -> anyhow::Result<TmpDir> {
        static N: AtomicU64 = AtomicU64::new(0);
        let base = base.map_or_else(std::env::temp_dir, |b| b.to_path_buf());
        let p = base.join(format!(
            "d402-bench-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p)?;
        Ok(TmpDir(p))
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct BenchNode {
    node: Node,
    addr: Multiaddr,
    _dir: TmpDir,
}

/// A fresh node key for a benchmark's node.
pub(super) fn random_key() -> anyhow::Result<SigningKey> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).context("no randomness")?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Starts a node with `cfg` on `state` and returns it with its TCP listen address.
pub(super) async fn start_node(
    cfg: NetConfig,
    key: &SigningKey,
    state: State,
) -> anyhow::Result<(Node, Multiaddr)> {
    let node = net::start(cfg, key, state).await?;
    let addr = node
        .handle()
        .listen_addrs()
        .await?
        .into_iter()
        .find(|a| {
            a.iter()
                .any(|p| matches!(p, libp2p::multiaddr::Protocol::Tcp(_)))
        })
        .context("no TCP listen address")?;
    Ok((node, addr))
}

/// A market benchmark's node: loopback TCP only, its database in `dir`, leases on pipes
/// or not.
pub(super) async fn start_market_node(
    key: &SigningKey,
    dir: &TmpDir,
    lease_pipes: bool,
) -> anyhow::Result<(Node, NetHandle, Multiaddr, State)> {
    let state = State::open(&dir.0)?;
    let mut cfg = NetConfig::new(Ipv4Addr::LOCALHOST.into(), 0);
    cfg.quic = false;
    cfg.lease_pipes = lease_pipes;
    let (node, addr) = start_node(cfg, key, state.clone()).await?;
    let net = node.handle();
    Ok((node, net, addr, state))
}

/// A runner for the echo capability of the market benchmarks (no cache on disk, every
/// grant allowed, no snapshotters).
pub(super) fn echo_runner(max_concurrent: u32, max_memory_bytes: u64) -> anyhow::Result<Runner> {
    let executor = Executor::new(ExecutorConfig {
        cache_dir: None,
        max_concurrent,
        max_memory_bytes,
    })?;
    Ok(Runner::new(
        executor,
        Grants::permissive(),
        Snapshotters::default(),
    ))
}

async fn spawn(
    kad_server: bool,
    rendezvous: bool,
    boot: &[&BenchNode],
) -> anyhow::Result<BenchNode> {
    let dir = TmpDir::new()?;
    let state = State::open(&dir.0)?;
    let mut cfg = NetConfig::new(Ipv4Addr::LOCALHOST.into(), 0);
    cfg.kad_server = kad_server;
    cfg.rendezvous_server = rendezvous;
    cfg.timings.backoff_initial = Duration::from_millis(200);
    cfg.bootstrap = boot
        .iter()
        .map(|b| {
            format!("{}/p2p/{}", b.addr, b.node.peer_id())
                .parse::<PeerSpec>()
                .map_err(anyhow::Error::from)
        })
        .collect::<anyhow::Result<_>>()?;
    let (node, addr) = start_node(cfg, &random_key()?, state).await?;
    Ok(BenchNode {
        node,
        addr,
        _dir: dir,
    })
}

pub(super) fn percentile(samples: &[Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut s = samples.to_vec();
    s.sort();
    // Nearest-rank on an index (no float touches money; this is a latency).
    let rank = ((p * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The floor: p50 of ping round trips between two bare swarms (TCP, noise, yamux, ping).
async fn ping_floor(samples: usize) -> anyhow::Result<Duration> {
    let mk = || -> anyhow::Result<libp2p::Swarm<ping::Behaviour>> {
        Ok(libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                tcp::Config::new().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )?
            .with_behaviour(|_| {
                ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_millis(20)))
            })?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(30)))
            .build())
    };
    let mut a = mk()?;
    let mut b = mk()?;
    a.listen_on("/ip4/127.0.0.1/tcp/0".parse()?)?;
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = a.select_next_some().await {
            break address;
        }
    };
    b.dial(addr)?;
    let mut rtts = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while rtts.len() < samples && Instant::now() < deadline {
        tokio::select! {
            _ = a.select_next_some() => {}
            ev = b.select_next_some() => {
                if let SwarmEvent::Behaviour(ping::Event { result: Ok(rtt), .. }) = ev {
                    rtts.push(rtt);
                }
            }
        }
    }
    if rtts.is_empty() {
        bail!("no ping round trip measured");
    }
    Ok(percentile(&rtts, 0.5))
}

async fn wait_until<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

struct JoinResult {
    samples: Vec<Duration>,
    failures: usize,
}

/// Workers join a running network one at a time; each is timed from its start until the
/// gateway's lookup returns it.
async fn join_latency(joins: usize, cid: Cid) -> anyhow::Result<(JoinResult, Vec<BenchNode>)> {
    let boot = spawn(true, true, &[]).await?;
    let gateway = spawn(true, false, &[&boot]).await?;
    let mut net = vec![];
    for _ in 0..5 {
        net.push(spawn(true, false, &[&boot]).await?);
    }
    let gh = gateway.node.handle();
    wait_until(Duration::from_secs(20), || {
        let gh = gh.clone();
        async move {
            gh.routing_table()
                .await
                .map(|t| !t.is_empty())
                .unwrap_or(false)
        }
    })
    .await;
    let mut samples = Vec::new();
    let mut failures = 0;
    let mut workers = Vec::new();
    for _ in 0..joins {
        let t0 = Instant::now();
        let w = spawn(false, false, &[&boot]).await?;
        w.node.handle().provide(cid).await?;
        let me = w.node.peer_id();
        let mut found = false;
        while t0.elapsed() < Duration::from_secs(10) {
            let r = gh
                .find_providers(
                    cid,
                    LookupOptions {
                        limit: None,
                        timeout: Duration::from_secs(2),
                    },
                )
                .await?;
            if r.iter().any(|p| p.peer_id == me) {
                found = true;
                break;
            }
        }
        if found {
            samples.push(t0.elapsed());
        } else {
            failures += 1;
        }
        workers.push(w);
    }
    let mut all = vec![boot, gateway];
    all.extend(net);
    all.extend(workers);
    Ok((JoinResult { samples, failures }, all))
}

struct ScaleResult {
    nodes: usize,
    full: Vec<Duration>,
    limited: Vec<Duration>,
    found_full: Vec<usize>,
    settle: Duration,
}

/// `n` DHT servers on loopback; `providers` of them offer `cid`; lookups from others.
async fn scale(
    n: usize,
    providers: usize,
    lookups: usize,
    cid: Cid,
) -> anyhow::Result<ScaleResult> {
    if n < providers + lookups + 1 {
        bail!("--nodes must exceed --providers + --lookups");
    }
    let t0 = Instant::now();
    let boot = spawn(true, true, &[]).await?;
    let mut nodes = Vec::with_capacity(n - 1);
    for _ in 1..n {
        nodes.push(spawn(true, false, &[&boot]).await?);
    }
    // Settle: every node has joined the DHT (has a few routing-table entries).
    let handles: Vec<_> = nodes.iter().map(|b| b.node.handle()).collect();
    let min_table = 5.min(n - 1);
    wait_until(Duration::from_secs(120), || {
        let handles = handles.clone();
        async move {
            for h in &handles {
                if h.routing_table().await.map(|t| t.len()).unwrap_or(0) < min_table {
                    return false;
                }
            }
            true
        }
    })
    .await;
    for b in nodes.iter().take(providers) {
        b.node.handle().provide(cid).await?;
    }
    // Ready when a lookup from the last node sees every provider.
    let probe = nodes[n - 2].node.handle();
    wait_until(Duration::from_secs(60), || {
        let probe = probe.clone();
        async move {
            probe
                .find_providers(cid, LookupOptions::default())
                .await
                .map(|r| r.len() >= providers)
                .unwrap_or(false)
        }
    })
    .await;
    let settle = t0.elapsed();
    let mut full = Vec::new();
    let mut found_full = Vec::new();
    let mut limited = Vec::new();
    for (j, b) in nodes.iter().skip(providers).take(lookups).enumerate() {
        let h = b.node.handle();
        let t = Instant::now();
        let r = h
            .find_providers(
                cid,
                LookupOptions {
                    limit: None,
                    timeout: Duration::from_secs(10),
                },
            )
            .await?;
        full.push(t.elapsed());
        found_full.push(r.len());
        // A second node, cold, stopping at the first `providers` results.
        let other = &nodes[(providers + lookups + j) % (n - 1)];
        let t = Instant::now();
        let _ = other
            .node
            .handle()
            .find_providers(
                cid,
                LookupOptions {
                    limit: Some(providers),
                    timeout: Duration::from_secs(10),
                },
            )
            .await?;
        limited.push(t.elapsed());
    }
    for b in nodes {
        b.node.shutdown().await;
    }
    boot.node.shutdown().await;
    Ok(ScaleResult {
        nodes: n,
        full,
        limited,
        found_full,
        settle,
    })
}

/// RSS of a real `d402 node` process, idle after joining through `boot`.
async fn idle_rss(boot: &BenchNode) -> anyhow::Result<u64> {
    let exe = std::env::current_exe()?;
    let dir = TmpDir::new()?;
    let peer = format!("{}/p2p/{}", boot.addr, boot.node.peer_id());
    let mut child = Command::new(exe)
        .args([
            "node",
            "--label",
            "rss",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--peer",
            &peer,
        ])
        .arg("--state")
        .arg(&dir.0)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start d402 node")?;
    let pid = child.id();
    let stdout = child.stdout.take().context("no stdout")?;
    let ready = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .map(|_| line)
    });
    let line = tokio::time::timeout(Duration::from_secs(30), ready).await;
    let result = (|| {
        let line = line.context("node did not start in 30 s")???;
        if !line.contains("\"listening\"") {
            bail!("unexpected first line from d402 node: {line}");
        }
        Ok(())
    })();
    if result.is_ok() {
        // Idle: joined, identified, nothing to do.
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
        });
    let _ = child.kill();
    let _ = child.wait();
    result?;
    rss.context("cannot read VmRSS")
}

async fn discovery(args: DiscoveryArgs) -> anyhow::Result<()> {
    let cid = Cid::dag_cbor(b"d402 bench capability");
    let floor = ping_floor(50).await?;
    eprintln!("floor measured; running {} joins…", args.joins);
    let (join, join_net) = join_latency(args.joins, cid).await?;
    let rss_kb = if args.skip_rss {
        None
    } else {
        Some(idle_rss(&join_net[0]).await?)
    };
    for b in join_net {
        b.node.shutdown().await;
    }
    eprintln!("running {} nodes…", args.nodes);
    let cid2 = Cid::dag_cbor(b"d402 bench capability at scale");
    let sc = scale(args.nodes, args.providers, args.lookups, cid2).await?;

    let join_p50 = percentile(&join.samples, 0.5);
    let join_p95 = percentile(&join.samples, 0.95);
    let full_p50 = percentile(&sc.full, 0.5);
    let full_p95 = percentile(&sc.full, 0.95);
    let lim_p50 = percentile(&sc.limited, 0.5);
    let min_found = sc.found_full.iter().copied().min().unwrap_or(0);
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "floor_ping_rtt_p50_ms": ms(floor),
                "join_samples": join.samples.len(),
                "join_failures": join.failures,
                "join_p50_ms": ms(join_p50),
                "join_p95_ms": ms(join_p95),
                "scale_nodes": sc.nodes,
                "scale_settle_ms": ms(sc.settle),
                "lookup_full_p50_ms": ms(full_p50),
                "lookup_full_p95_ms": ms(full_p95),
                "lookup_limited_p50_ms": ms(lim_p50),
                "lookup_min_providers_found": min_found,
                "providers": args.providers,
                "idle_rss_kb": rss_kb,
            })
        );
    } else {
        println!(
            "floor: bare libp2p ping RTT p50        {:8.3} ms",
            ms(floor)
        );
        println!(
            "join → found by gateway lookup  p50   {:8.1} ms  p95 {:.1} ms  ({} joins, {} not found in 10 s)",
            ms(join_p50),
            ms(join_p95),
            join.samples.len(),
            join.failures
        );
        println!(
            "{} nodes: lookup to completion  p50   {:8.1} ms  p95 {:.1} ms  (found ≥ {} of {} providers; settle {:.1} s)",
            sc.nodes,
            ms(full_p50),
            ms(full_p95),
            min_found,
            args.providers,
            sc.settle.as_secs_f64()
        );
        println!(
            "{} nodes: lookup until {} found p50   {:8.1} ms",
            sc.nodes,
            args.providers,
            ms(lim_p50)
        );
        match rss_kb {
            Some(kb) => println!(
                "idle `d402 node` RSS                  {:8.1} MB",
                kb as f64 / 1024.0
            ),
            None => println!("idle `d402 node` RSS                  skipped"),
        }
    }
    Ok(())
}
