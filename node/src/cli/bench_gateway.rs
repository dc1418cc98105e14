//! `d402 bench gateway`: the paid-task overhead of the gateway (issue 7 "Numbers").
//!
//! In this process, on loopback: a gateway (real axum HTTP, real coordinator over libp2p,
//! the real `local` rail in its redb) and three workers (real libp2p, real wasmtime)
//! selling a trivial echo capability, registered with a signed 10% creator commission;
//! fanout 3, quorum 2. Clients (the code of `d402 task run`) each keep one HTTP
//! connection and run paid tasks end to end: `POST` → `402` → sign a local-rail payment →
//! `POST` with `PAYMENT-SIGNATURE` → verify, lock (durable), bids, leases, claims from
//! three workers, quorum of two, capture with splits (durable) → `200` with the receipt,
//! which the client verifies.
//!
//! Reported: p50 of one client running tasks one after another (unloaded), p50/p99 and
//! throughput with `--clients` concurrent clients (each taking the next task from a shared
//! count, so that all of them are at work until the last tasks), and in the same run the
//! floor: p50 of a bare axum request over the same client, p50 of a bare libp2p
//! request-response round trip (TCP, noise, yamux, CBOR) between two minimal swarms, and
//! their sum "one HTTP request plus three round trips", with the ratio.

use std::{
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Args;
use d402_capabilities::{CapabilityRegistration, Manifest, registration::Registration};
use d402_protocol::{Chain, Cid, RailKind, SigningKey};
use d402_settlement::{Asset, LocalRail, LocalRailConfig, wallet};
use futures::StreamExt;
use libp2p::{Multiaddr, StreamProtocol, noise, request_response, swarm::SwarmEvent, tcp, yamux};
use serde_json::{Map, Value, json};

use super::{
    bench::{TmpDir, echo_runner, ms, percentile, random_key, start_market_node},
    http_client::{BaseUrl, Connection},
    task::{PayOptions, TaskOutcome, TaskRequest, fetch_challenge, pay_challenge, run_paid_task},
};
use crate::{
    capstore::{self, CapStore},
    gateway::{Gateway, GatewayConfig, GatewayParts, GatewayPolicy, GatewaySettings},
    market::{
        blobs::BlobStore,
        coordinator::{Coordinator, CoordinatorConfig},
        reputation::{Policy, Reputation},
        service::{self, Services},
        worker::{OfferedCapability, Worker, WorkerConfig},
    },
    net::{NetHandle, Node},
    state::State,
};

/// Arguments of `d402 bench gateway`.
#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// Concurrent clients in the loaded run.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Paid tasks in the loaded run (spread over the clients). Fewer make a run of well
    /// under a second, in which the clients' start and end weigh on the rate.
    #[arg(long, default_value_t = 3000)]
    tasks: usize,
    /// Paid tasks each client runs before the loaded run is measured (its connection, the
    /// nodes' caches and memory reach their steady state); not counted. With 5 per client
    /// the resident set still grew by ~130 MiB during the loaded run; with 50 it grows by
    /// 0–30 MiB (the output's "memory during the loaded run" line shows it).
    #[arg(long, default_value_t = 50)]
    warmup_per_client: usize,
    /// Paid tasks run one after another by one client (the unloaded p50).
    #[arg(long, default_value_t = 200)]
    sequential: usize,
    /// Samples of each floor measurement.
    #[arg(long, default_value_t = 100)]
    floor_samples: usize,
    /// The coordinator's provider lookup timeout per task, in ms (the lookup runs to
    /// completion or to this timeout before bids are asked).
    #[arg(long, default_value_t = 200)]
    lookup_timeout_ms: u64,
    /// Where the nodes' databases go (default: the system's temporary directory). A tmpfs
    /// such as /dev/shm takes the disk's fsync latency out of the numbers.
    #[arg(long, value_name = "DIR")]
    dir: Option<std::path::PathBuf>,
    /// Send leases on long-lived pipes (`/d402/lease-pipe/1`); `false` sends each on its own
    /// request-response stream (`/d402/lease/1`), to compare.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    lease_pipes: bool,
    /// Give each client a fixed share of `--tasks` instead of letting the clients take the
    /// next task from a shared count. With fixed shares the clients that finish first stand
    /// idle while the slowest finish theirs, so the end of the run has fewer than
    /// `--clients` clients at work and counts towards the rate; kept to compare.
    #[arg(long)]
    fixed_shares: bool,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

/// The echo module (d402-wasm-1): its output is its whole input. The binary of
/// `(module (memory (export "memory") 2)
///   (func (export "d402_alloc") (param i32) (result i32) (i32.const 1024))
///   (func (export "d402_run") (param i32 i32) (result i64)
///     (i64.or (i64.shl (i64.extend_i32_u (local.get 0)) (i64.const 32))
///             (i64.extend_i32_u (local.get 1)))))`
/// (checked against `wat` in the tests).
pub const ECHO_WASM: &[u8] = &[
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version
    0x01, 0x0c, 0x02, 0x60, 0x01, 0x7f, 0x01, 0x7f, 0x60, 0x02, 0x7f, 0x7f, 0x01,
    0x7e, // types
    0x03, 0x03, 0x02, 0x00, 0x01, // functions
    0x05, 0x03, 0x01, 0x00, 0x02, // memory
    0x07, 0x22, 0x03, // exports
    0x06, b'm', b'e', b'm', b'o', b'r', b'y', 0x02, 0x00, //
    0x0a, b'd', b'4', b'0', b'2', b'_', b'a', b'l', b'l', b'o', b'c', 0x00, 0x00, //
    0x08, b'd', b'4', b'0', b'2', b'_', b'r', b'u', b'n', 0x00, 0x01, //
    0x0a, 0x14, 0x02, // code
    0x05, 0x00, 0x41, 0x80, 0x08, 0x0b, //
    0x0c, 0x00, 0x20, 0x00, 0xad, 0x42, 0x20, 0x86, 0x20, 0x01, 0xad, 0x84, 0x0b,
];

const PRICE: &str = "$0.01";
const BUDGET: &str = "0.009";
const WORKER_FLOOR: u64 = 2_000;
const COMMISSION_BPS: u16 = 1_000;
/// Per-worker concurrency (bids, runs) and executor slots: enough for the clients.
const WORKER_CONCURRENCY: usize = 64;

struct Peer {
    node: Node,
    net: NetHandle,
    addr: Multiaddr,
    service: tokio::task::JoinHandle<()>,
    _dir: TmpDir,
}

async fn start_peer(
    key: &SigningKey,
    dir: TmpDir,
    lease_pipes: bool,
    services: impl FnOnce(&NetHandle, &State) -> anyhow::Result<Services>,
) -> anyhow::Result<(Peer, State)> {
    let (node, net, addr, state) = start_market_node(key, &dir, lease_pipes).await?;
    let services = services(&net, &state)?;
    let service = service::serve(&net, services, 1024).await?;
    Ok((
        Peer {
            node,
            net,
            addr,
            service,
            _dir: dir,
        },
        state,
    ))
}

/// Results of one run.
#[derive(Debug, Default, serde::Serialize)]
struct Numbers {
    sequential_p50_ms: f64,
    /// Of one client's paid tasks: the unpaid request answered `402`.
    sequential_challenge_p50_ms: f64,
    /// Of one client's paid tasks: the paid request, from signing the payment to the
    /// verified receipt.
    sequential_paid_p50_ms: f64,
    loaded_p50_ms: f64,
    loaded_p99_ms: f64,
    loaded_tasks_per_s: f64,
    loaded_cpu_ms_per_task: f64,
    /// Minor page faults per paid task during the loaded run (memory still growing shows
    /// here: the run is not yet in its steady state).
    loaded_minor_faults_per_task: f64,
    /// How much the peak resident set grew during the loaded run.
    loaded_peak_rss_growth_mib: f64,
    /// When the first and the last client ran out of tasks, after the loaded run's start.
    loaded_first_client_done_s: f64,
    loaded_last_client_done_s: f64,
    loaded_ok: usize,
    loaded_failed: usize,
    warmup_failed: usize,
    floor_axum_p50_ms: f64,
    floor_axum_loaded_req_per_s: f64,
    floor_rr_p50_ms: f64,
    floor_p50_ms: f64,
    ratio_p50: f64,
}

/// Runs `d402 bench gateway`.
pub async fn gateway(args: GatewayArgs) -> anyhow::Result<()> {
    if args.clients == 0 || args.tasks == 0 || args.sequential == 0 || args.floor_samples == 0 {
        bail!("--clients, --tasks, --sequential and --floor-samples must be above 0");
    }
    let wasm = ECHO_WASM.to_vec();
    let manifest = Manifest::template("bench.echo", 1, Cid::raw(&wasm), Vec::new())?;
    let offer = OfferedCapability {
        manifest_cid: manifest.cid()?,
        manifest: manifest.clone(),
        wasm: Arc::new(wasm.clone()),
        floor: WORKER_FLOOR,
        asset: Asset::local_usdc().id,
    };

    // Workers.
    let mut workers = Vec::new();
    for _ in 0..3 {
        let key = random_key()?;
        let payout = wallet::address(&random_key()?);
        let mut cfg = WorkerConfig::new(
            vec![offer.clone()],
            vec![RailKind::Local],
            [(Chain::Local, payout)].into_iter().collect(),
        );
        cfg.max_concurrent = WORKER_CONCURRENCY;
        let run = echo_runner(WORKER_CONCURRENCY as u32, 512 * 1024 * 1024)?;
        let k = key.clone();
        let (peer, _) = start_peer(
            &key,
            TmpDir::new_in(args.dir.as_deref())?,
            args.lease_pipes,
            move |net, _| {
                let blobs = BlobStore::new(64 * 1024 * 1024);
                Ok(Services {
                    worker: Some(Worker::new(k, net.clone(), run, cfg, blobs.clone())),
                    coordinator: None,
                    validator: None,
                    blobs,
                })
            },
        )
        .await?;
        workers.push(peer);
    }

    // The gateway: capability registered (signed, 10%) and imported into its store.
    let gw_dir = TmpDir::new_in(args.dir.as_deref())?;
    let publisher = random_key()?;
    let creator = wallet::address(&random_key()?);
    let terms = Registration::for_manifest(
        &manifest,
        COMMISSION_BPS,
        [(Chain::Local, creator)].into_iter().collect(),
        None,
        d402_node_now()?,
    )?;
    let registration = CapabilityRegistration::sign(terms, &publisher)?;
    CapStore::new(&gw_dir.0).import(&manifest, &wasm, Some(&registration), false)?;
    let resolved = capstore::resolve_offer(&gw_dir.0, &manifest.capability())?;
    let gw_key = random_key()?;
    let coordinator_cell = std::sync::OnceLock::new();
    let (gw, gw_state) = start_peer(&gw_key, gw_dir, args.lease_pipes, |net, state| {
        let blobs = BlobStore::new(64 * 1024 * 1024);
        let c = Coordinator::new(
            gw_key.clone(),
            net.clone(),
            state.clone(),
            Reputation::new(state.clone(), Policy::default()),
            blobs.clone(),
            CoordinatorConfig {
                lookup_timeout: Duration::from_millis(args.lookup_timeout_ms),
                ..CoordinatorConfig::default()
            },
        );
        let _ = coordinator_cell.set(c.clone());
        Ok(Services {
            worker: None,
            coordinator: Some(c),
            validator: None,
            blobs,
        })
    })
    .await?;
    let coordinator = coordinator_cell
        .into_inner()
        .context("the coordinator was not built")?;
    for w in &workers {
        gw.net.connect(w.addr.clone()).await?;
    }
    let rail = Arc::new(LocalRail::open(
        gw_state.database().clone(),
        random_key()?,
        LocalRailConfig {
            dev_mode: true,
            ..LocalRailConfig::default()
        },
    )?);
    let mut settings = GatewaySettings::new(RailKind::Local, Asset::local_usdc());
    settings.price = Some(PRICE.into());
    settings.budget = Some(BUDGET.into());
    settings.fanout = 3;
    settings.quorum = 2;
    settings.require_capability_registration = true;
    settings.require_signed_capability_registration = true;
    let policy = GatewayPolicy::new(&settings, &[resolved])?;
    let gateway = Gateway::start(
        GatewayConfig::new((Ipv4Addr::LOCALHOST, 0).into(), true),
        GatewayParts {
            rail: rail.clone(),
            coordinator,
            net: gw.net.clone(),
            state: gw_state.clone(),
            policy,
        },
    )
    .await?;
    let base = BaseUrl::parse(&format!("http://{}", gateway.local_addr()))?;

    // Payers, funded in the rail directly.
    let payers: Vec<SigningKey> = (0..args.clients.max(1))
        .map(|_| random_key())
        .collect::<anyhow::Result<_>>()?;
    for p in &payers {
        rail.faucet(&wallet::address(p), 1_000_000_000, d402_node_now()?)?;
    }
    let request = TaskRequest {
        capability: manifest.capability().to_string(),
        input: [("msg".to_string(), Value::String("bench".into()))]
            .into_iter()
            .collect::<Map<String, Value>>(),
        idempotency_key: None,
    };
    let options = PayOptions {
        max_units: Asset::local_usdc().parse(PRICE)?,
        x402_version: 2,
    };

    let mut n = Numbers::default();
    // Warm-up (module compile, connections), then one client, one task at a time.
    let mut conn = Connection::new(base.clone(), Duration::from_secs(60));
    for _ in 0..3 {
        paid(&mut conn, &request, &payers[0], &options).await?;
    }
    let mut seq = Vec::with_capacity(args.sequential);
    let mut challenges = Vec::with_capacity(args.sequential);
    let mut payments = Vec::with_capacity(args.sequential);
    for _ in 0..args.sequential {
        let t = Instant::now();
        let challenge = fetch_challenge(&mut conn, &request, &options).await?;
        let asked = t.elapsed();
        let outcome = pay_challenge(&mut conn, &challenge, &payers[0], &options).await?;
        let done = t.elapsed();
        check_paid(&outcome)?;
        seq.push(done);
        challenges.push(asked);
        payments.push(done - asked);
    }
    n.sequential_p50_ms = ms(percentile(&seq, 0.5));
    n.sequential_challenge_p50_ms = ms(percentile(&challenges, 0.5));
    n.sequential_paid_p50_ms = ms(percentile(&payments, 0.5));
    eprintln!(
        "paid task, 1 client: p50 {:.2} ms over {} tasks",
        n.sequential_p50_ms, args.sequential
    );

    // Loaded: --clients clients running --tasks tasks, measured once every client has run
    // its warm-up tasks. Each client takes the next task from a shared count, so all of
    // them are at work until the last tasks are taken (or, with --fixed-shares, each runs
    // its own share).
    let warmed = Arc::new(tokio::sync::Barrier::new(args.clients + 1));
    let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Arc::new(std::sync::OnceLock::<Instant>::new());
    let mut handles = Vec::new();
    for (i, payer) in payers.iter().enumerate() {
        let share = args.tasks / args.clients + usize::from(i < args.tasks % args.clients);
        let (base, request, payer) = (base.clone(), request.clone(), payer.clone());
        let (warmup, warmed) = (args.warmup_per_client, warmed.clone());
        let (taken, start, total, fixed) =
            (taken.clone(), start.clone(), args.tasks, args.fixed_shares);
        handles.push(tokio::spawn(async move {
            let mut conn = Connection::new(base, Duration::from_secs(120));
            let mut warmup_failed = 0usize;
            for _ in 0..warmup {
                if let Err(e) = paid(&mut conn, &request, &payer, &options).await {
                    warmup_failed += 1;
                    tracing::warn!(error = %format!("{e:#}"), "warm-up paid task failed");
                }
            }
            warmed.wait().await;
            let mut lat = Vec::with_capacity(share);
            let mut failed = 0usize;
            let mut mine = 0usize;
            let mut next = || {
                mine += 1;
                if fixed {
                    mine <= share
                } else {
                    taken.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total
                }
            };
            while next() {
                let t = Instant::now();
                match paid(&mut conn, &request, &payer, &options).await {
                    Ok(()) => lat.push(t.elapsed()),
                    Err(e) => {
                        failed += 1;
                        tracing::warn!(error = %format!("{e:#}"), "paid task failed");
                    }
                }
            }
            let done = start.get().map_or(Duration::ZERO, Instant::elapsed);
            (lat, failed, warmup_failed, done)
        }));
    }
    warmed.wait().await;
    let before = process_usage()?;
    let started = Instant::now();
    let _ = start.set(started);
    let mut lat = Vec::new();
    let (mut first_done, mut last_done) = (Duration::MAX, Duration::ZERO);
    for h in handles {
        let (l, f, w, done) = h.await?;
        lat.extend(l);
        n.loaded_failed += f;
        n.warmup_failed += w;
        first_done = first_done.min(done);
        last_done = last_done.max(done);
    }
    n.loaded_first_client_done_s = first_done.as_secs_f64();
    n.loaded_last_client_done_s = last_done.as_secs_f64();
    let elapsed = started.elapsed();
    let after = process_usage()?;
    let cpu = after.cpu.saturating_sub(before.cpu);
    n.loaded_ok = lat.len();
    n.loaded_cpu_ms_per_task = ms(cpu) / lat.len().max(1) as f64;
    n.loaded_minor_faults_per_task =
        after.minor_faults.saturating_sub(before.minor_faults) as f64 / lat.len().max(1) as f64;
    n.loaded_peak_rss_growth_mib =
        after.max_rss_kib.saturating_sub(before.max_rss_kib) as f64 / 1024.0;
    n.loaded_p50_ms = ms(percentile(&lat, 0.5));
    n.loaded_p99_ms = ms(percentile(&lat, 0.99));
    n.loaded_tasks_per_s = lat.len() as f64 / elapsed.as_secs_f64();
    eprintln!(
        "paid task, {} clients: {} ok, {} failed ({} of the warm-up's {} failed), p50 {:.2} ms, p99 {:.2} ms, {:.0} tasks/s",
        args.clients,
        n.loaded_ok,
        n.loaded_failed,
        n.warmup_failed,
        args.clients * args.warmup_per_client,
        n.loaded_p50_ms,
        n.loaded_p99_ms,
        n.loaded_tasks_per_s
    );
    gateway.shutdown().await;
    for p in workers.into_iter().chain([gw]) {
        p.service.abort();
        p.node.shutdown().await;
    }

    // The floor, in the same run.
    let (axum_p50, axum_rate) = axum_floor(args.floor_samples, args.clients).await?;
    n.floor_axum_p50_ms = ms(axum_p50);
    n.floor_axum_loaded_req_per_s = axum_rate;
    n.floor_rr_p50_ms = ms(rr_floor(args.floor_samples).await?);
    n.floor_p50_ms = n.floor_axum_p50_ms + 3.0 * n.floor_rr_p50_ms;
    n.ratio_p50 = n.sequential_p50_ms / n.floor_p50_ms;

    if args.json {
        println!("{}", serde_json::to_string_pretty(&n)?);
    } else {
        println!(
            "paid task end to end (402, pay, verify, lock, fanout 3, quorum 2, capture on local), echo capability, loopback"
        );
        println!(
            "  1 client:   p50 {:.2} ms ({} tasks; the 402 exchange p50 {:.2} ms, the paid request p50 {:.2} ms)",
            n.sequential_p50_ms,
            args.sequential,
            n.sequential_challenge_p50_ms,
            n.sequential_paid_p50_ms
        );
        println!(
            "  {} clients: p50 {:.2} ms, p99 {:.2} ms, {:.0} paid tasks/s ({} ok, {} failed; after {} warm-up tasks per client, {} failed)",
            args.clients,
            n.loaded_p50_ms,
            n.loaded_p99_ms,
            n.loaded_tasks_per_s,
            n.loaded_ok,
            n.loaded_failed,
            args.warmup_per_client,
            n.warmup_failed
        );
        println!(
            "  the clients ran out of tasks {:.2}-{:.2} s after the start ({})",
            n.loaded_first_client_done_s,
            n.loaded_last_client_done_s,
            if args.fixed_shares {
                "a fixed share each"
            } else {
                "taken from a shared count"
            }
        );
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        println!(
            "  CPU per paid task under load: {:.2} ms (all parties, this process; 1,000 paid tasks/s on {} cores needs at most {} ms)",
            n.loaded_cpu_ms_per_task, cores, cores
        );
        println!(
            "  memory during the loaded run: peak resident set +{:.0} MiB, {:.1} minor page faults per paid task",
            n.loaded_peak_rss_growth_mib, n.loaded_minor_faults_per_task
        );
        println!(
            "floor: bare axum request p50 {:.3} ms ({:.0} req/s with {} clients); bare libp2p request-response round trip p50 {:.3} ms",
            n.floor_axum_p50_ms, n.floor_axum_loaded_req_per_s, args.clients, n.floor_rr_p50_ms
        );
        println!(
            "floor (1 axum request + 3 round trips): {:.3} ms; paid task p50 / floor = {:.1}x",
            n.floor_p50_ms, n.ratio_p50
        );
    }
    Ok(())
}

/// What this process has used so far, over all its threads (every party of the benchmark
/// runs in it).
#[derive(Debug, Clone, Copy)]
struct Usage {
    /// CPU time, user and system.
    cpu: Duration,
    /// Page faults served without I/O (first touches of new memory, among others).
    minor_faults: u64,
    /// The largest resident set so far, in KiB.
    max_rss_kib: u64,
}

fn process_usage() -> anyhow::Result<Usage> {
    use nix::sys::{
        resource::{UsageWho, getrusage},
        time::TimeVal,
    };
    let usage = getrusage(UsageWho::RUSAGE_SELF).context("getrusage")?;
    let time = |t: TimeVal| {
        Duration::from_secs(t.tv_sec().max(0) as u64)
            + Duration::from_micros(t.tv_usec().max(0) as u64)
    };
    Ok(Usage {
        cpu: time(usage.user_time()) + time(usage.system_time()),
        minor_faults: usage.minor_page_faults().max(0) as u64,
        max_rss_kib: usage.max_rss().max(0) as u64,
    })
}

fn d402_node_now() -> anyhow::Result<u64> {
    Ok(crate::market::now_ms())
}

async fn paid(
    conn: &mut Connection,
    request: &TaskRequest,
    payer: &SigningKey,
    options: &PayOptions,
) -> anyhow::Result<()> {
    check_paid(&run_paid_task(conn, request, payer, options).await?)
}

/// Fails unless the paid request succeeded with a receipt.
fn check_paid(outcome: &TaskOutcome) -> anyhow::Result<()> {
    if !outcome.response.status.is_success() || outcome.receipt.is_none() {
        bail!(
            "{} {}",
            outcome.response.status,
            outcome.response.error_text()
        );
    }
    Ok(())
}

/// A bare axum route answering a small JSON body: p50 of one client's requests, and
/// requests/s with `clients` clients.
async fn axum_floor(samples: usize, clients: usize) -> anyhow::Result<(Duration, f64)> {
    use axum::{Json, Router, routing::post};
    let app = Router::new().route("/", post(|| async { Json(json!({"ok": true})) }));
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let base = BaseUrl::parse(&format!("http://{}", listener.local_addr()?))?;
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let body = json!({"capability": "x", "input": {}});
    let mut conn = Connection::new(base.clone(), Duration::from_secs(10));
    let mut lat = Vec::with_capacity(samples);
    for _ in 0..samples + 10 {
        let t = Instant::now();
        conn.post_json("/", &[], &body).await?;
        lat.push(t.elapsed());
    }
    let p50 = percentile(&lat[10..], 0.5);
    let per_client = samples.max(clients) / clients.max(1);
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..clients {
        let (base, body) = (base.clone(), body.clone());
        handles.push(tokio::spawn(async move {
            let mut conn = Connection::new(base, Duration::from_secs(10));
            for _ in 0..per_client {
                conn.post_json("/", &[], &body).await?;
            }
            anyhow::Ok(per_client)
        }));
    }
    let mut done = 0;
    for h in handles {
        done += h.await??;
    }
    let rate = done as f64 / started.elapsed().as_secs_f64();
    server.abort();
    Ok((p50, rate))
}

/// p50 of bare libp2p request-response round trips (64-byte request echoed back) between
/// two minimal swarms: TCP, noise, yamux, CBOR codec.
async fn rr_floor(samples: usize) -> anyhow::Result<Duration> {
    type Rr = request_response::cbor::Behaviour<Vec<u8>, Vec<u8>>;
    let mk = || -> anyhow::Result<libp2p::Swarm<Rr>> {
        Ok(libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                tcp::Config::new().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )?
            .with_behaviour(|_| {
                Rr::new(
                    [(
                        StreamProtocol::new("/d402-bench/rr/1"),
                        request_response::ProtocolSupport::Full,
                    )],
                    request_response::Config::default(),
                )
            })?
            .with_swarm_config(|c| {
                // As the node's own swarm (`net::swarm::build`).
                c.with_idle_connection_timeout(Duration::from_secs(60))
                    .with_substream_upgrade_protocol_override(
                        libp2p::core::upgrade::Version::V1Lazy,
                    )
            })
            .build())
    };
    let mut server = mk()?;
    let mut client = mk()?;
    server.listen_on("/ip4/127.0.0.1/tcp/0".parse()?)?;
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = server.select_next_some().await {
            break address;
        }
    };
    let server_id = *server.local_peer_id();
    client.add_peer_address(server_id, addr);
    let mut rtts = Vec::with_capacity(samples);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut sent_at = Instant::now();
    client
        .behaviour_mut()
        .send_request(&server_id, vec![7u8; 64]);
    let mut count = 0usize;
    while rtts.len() < samples {
        if Instant::now() > deadline {
            bail!(
                "request-response floor: only {} round trips in 60 s",
                rtts.len()
            );
        }
        tokio::select! {
            ev = server.select_next_some() => {
                if let SwarmEvent::Behaviour(request_response::Event::Message {
                    message: request_response::Message::Request { request, channel, .. }, ..
                }) = ev {
                    let _ = server.behaviour_mut().send_response(channel, request);
                }
            }
            ev = client.select_next_some() => {
                match ev {
                    SwarmEvent::Behaviour(request_response::Event::Message {
                        message: request_response::Message::Response { .. }, ..
                    }) => {
                        // The first (dial + handshake) is not a round trip.
                        if count > 0 {
                            rtts.push(sent_at.elapsed());
                        }
                        count += 1;
                        sent_at = Instant::now();
                        client.behaviour_mut().send_request(&server_id, vec![7u8; 64]);
                    }
                    SwarmEvent::Behaviour(request_response::Event::OutboundFailure { error, .. }) => {
                        bail!("request-response floor: {error}");
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(percentile(&rtts, 0.5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_usage_counts_the_work_done_and_the_memory_touched() {
        let before = process_usage().unwrap();
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        // 64 MiB touched page by page: faults (the peak resident set may not grow, when a
        // test running beside this one had a higher peak already).
        let mut v = vec![0u8; 64 << 20];
        for i in (0..v.len()).step_by(4096) {
            v[i] = 1;
        }
        std::hint::black_box(&v);
        let after = process_usage().unwrap();
        assert!(after.cpu > before.cpu);
        assert!(after.minor_faults > before.minor_faults);
        assert!(after.max_rss_kib >= before.max_rss_kib);
    }

    #[test]
    fn echo_wasm_is_the_wat_module() {
        let wat = wat::parse_str(
            r#"(module
  (memory (export "memory") 2)
  (func (export "d402_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "d402_run") (param i32 i32) (result i64)
    (i64.or (i64.shl (i64.extend_i32_u (local.get 0)) (i64.const 32))
            (i64.extend_i32_u (local.get 1)))))"#,
        )
        .unwrap();
        assert_eq!(wat, ECHO_WASM);
        d402_capabilities::manifest::check_wasm_binary(ECHO_WASM).unwrap();
    }
}
