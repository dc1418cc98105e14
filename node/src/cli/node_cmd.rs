//! `d402 node`: runs a node with the operator guide's flags.
//!
//! It opens the state directory (database, identity key), starts the network layer and
//! the market service (every node serves blobs), and by role:
//! - worker (`--offer` without `--http-port`): resolves each offer (store, then built-in),
//!   runs a [`Worker`] with the real snapshotters (headless Chromium per `--snapshotter`,
//!   fetch fallback per `--fallback-to-fetch`) under the URL policy, and announces the
//!   offers;
//! - gateway (`--http-port`): runs a [`Coordinator`] (resuming open tasks) and the HTTP
//!   gateway on the `local` rail.
//!
//! It prints one JSON line on stdout once it listens
//! (`{"event":"listening","peer_id":…,"listen":[…],"external":[…],"http":"host:port"}`,
//! `http` on gateways only) and runs until SIGINT or SIGTERM. Logs go to stderr
//! (`--log-format json` for JSON lines).

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::Context;
use d402_capabilities::SnapshotterKind;
use d402_protocol::{Chain, RailKind, SigningKey};
use d402_runtime::{
    ChromiumConfig, ChromiumSnapshotter, Executor, ExecutorConfig, FetchConfig, FetchSnapshotter,
    Grants, Runner, Snapshotters, UrlPolicy,
};
use d402_settlement::{Asset, LocalRail, LocalRailConfig, Rail};
use tracing::{info, warn};

use crate::{
    capstore::{self, ResolvedCapability},
    config::{LogFormat, NodeArgs, NodeConfig},
    gateway::{
        Gateway, GatewayConfig, GatewayParts, GatewayPolicy, GatewaySettings,
        unavailable::Unavailable,
    },
    keys,
    market::{
        blobs::BlobStore,
        coordinator::{Coordinator, CoordinatorConfig},
        reputation::{Policy, Reputation},
        service::{self, Services},
        worker::{OfferedCapability, Worker, WorkerConfig},
    },
    net::{self, NetConfig, NetHandle},
    state::State,
};

/// File name of the node identity key inside `--state`.
pub const NODE_KEY_FILE: &str = "node.key";
/// File name of the worker's default local-rail payout wallet inside `--state`.
pub const PAYOUT_KEY_FILE: &str = "payout.key";
/// File name of the gateway's local-rail key (its `payTo` account; signs receipts).
pub const GATEWAY_KEY_FILE: &str = "gateway.key";
/// Memory for blobs served to peers (snapshots, manifests, modules).
pub const BLOB_BUDGET: usize = 256 * 1024 * 1024;
/// Inbound market requests that may wait before peers are told "busy".
pub const MARKET_QUEUE: usize = 256;

pub fn run(args: NodeArgs) -> anyhow::Result<()> {
    let cfg = args.resolve()?;
    if args.print_config {
        println!("{}", serde_json::to_string_pretty(&cfg.to_json())?);
        return Ok(());
    }
    init_logging(cfg.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(run_node(cfg, args.exit_with_stdin))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,libp2p=warn,libp2p_kad=error")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second initialisation (tests running several nodes in one process) is harmless.
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// The network configuration a node configuration implies.
pub fn net_config(cfg: &NodeConfig) -> NetConfig {
    let mut n = NetConfig::new(cfg.host, cfg.port);
    n.advertise = cfg.advertise_host.clone();
    n.bootstrap = cfg.peers.clone();
    n.kad_server = cfg.kad_server();
    n.rendezvous_server = cfg.roles().bootstrap;
    n.max_connections = cfg.max_connections;
    n
}

async fn run_node(cfg: NodeConfig, exit_with_stdin: bool) -> anyhow::Result<()> {
    let span = tracing::info_span!("node", label = %cfg.label);
    tracing::Instrument::instrument(run_node_in_span(cfg, exit_with_stdin), span).await
}

async fn run_node_in_span(cfg: NodeConfig, exit_with_stdin: bool) -> anyhow::Result<()> {
    let roles = cfg.roles();
    // A gateway on a rail this build cannot run still joins the network, and its HTTP port
    // refuses every paid request with `rail_unavailable` (see gateway::unavailable).
    let unavailable_rail = cfg
        .payment
        .filter(|rail| roles.gateway && *rail != RailKind::Local);
    let state = State::open(&cfg.state_dir)
        .with_context(|| format!("cannot open state in {}", cfg.state_dir.display()))?;
    // Every --offer must resolve (local store, then the built-in capabilities) before the
    // node joins the network: a worker never announces what it cannot run.
    let mut offers = Vec::with_capacity(cfg.offers.len());
    for offer in &cfg.offers {
        let resolved = capstore::resolve_offer(&cfg.state_dir, offer)
            .with_context(|| format!("--offer {offer}"))?;
        offers.push(resolved);
    }
    let key = keys::load_or_create(&cfg.state_dir.join(NODE_KEY_FILE))?;
    let node = net::start(net_config(&cfg), &key, state.clone())
        .await
        .context("cannot start the network")?;
    let handle = node.handle();
    info!(
        peer_id = %node.peer_id(),
        worker = roles.worker,
        gateway = roles.gateway,
        validator = roles.validator,
        bootstrap = roles.bootstrap,
        kad_server = cfg.kad_server(),
        "node started"
    );

    let blobs = BlobStore::new(BLOB_BUDGET);
    let worker = if roles.worker {
        Some(start_worker(&cfg, &key, &handle, &offers, &blobs)?)
    } else {
        None
    };
    let coordinator = if roles.gateway && unavailable_rail.is_none() {
        Some(Coordinator::new(
            key.clone(),
            handle.clone(),
            state.clone(),
            Reputation::new(state.clone(), Policy::default()),
            blobs.clone(),
            CoordinatorConfig {
                validators: cfg.validators,
                validator_peers: cfg.validator_peers.clone(),
                ..CoordinatorConfig::default()
            },
        ))
    } else {
        None
    };
    // Validator role (--validator) and the gateway's offers by CID for validators.
    let validator =
        crate::market::validator::Validator::start_for_node(&cfg, &key, &handle, &blobs, &offers)?;
    let service = service::serve(
        &handle,
        Services {
            worker: worker.clone(),
            coordinator: coordinator.clone(),
            validator: validator.clone(),
            blobs,
        },
        MARKET_QUEUE,
    )
    .await
    .context("cannot start the market service")?;
    // `d402 ops-monitor` reads the live status here (owner-only Unix socket).
    let _control = crate::market::ops::serve_control(
        &cfg.state_dir,
        crate::market::ops::ControlSources {
            state: state.clone(),
            net: handle.clone(),
            worker,
            validator: validator.clone(),
        },
    )?;
    if let Some(v) = &validator {
        v.announce().await?;
    }

    if roles.worker {
        for resolved in &offers {
            handle.provide(resolved.manifest_cid).await?;
            info!(
                offer = %resolved.capability,
                manifest = %resolved.manifest_cid,
                "offer announced"
            );
        }
    }
    let gateway = match &coordinator {
        Some(c) => Some(start_gateway(&cfg, &state, &handle, c.clone(), &offers).await?),
        None => None,
    };
    let refusing = match unavailable_rail {
        Some(rail) => {
            let (host, port) = cfg.http.context("a gateway needs --http-port")?;
            let u = Unavailable::start((host, port).into(), rail)
                .await
                .context("cannot listen for HTTP")?;
            warn!(
                %rail,
                http = %u.local_addr(),
                "the {rail} rail is not available in this build: the gateway joins the network \
                 but answers every paid request with 503 rail_unavailable (use --payment local)"
            );
            Some(u)
        }
        None => None,
    };

    // Give the listeners a moment to report every address (QUIC comes up after TCP).
    tokio::time::sleep(Duration::from_millis(50)).await;
    let listen = handle.listen_addrs().await?;
    let external = handle.external_addrs().await?;
    let mut line = serde_json::json!({
        "event": "listening",
        "peer_id": node.peer_id().to_string(),
        "listen": listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "external": external.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
    });
    if let Some(g) = &gateway {
        line["http"] = g.local_addr().to_string().into();
    }
    if let (Some(u), Some(rail)) = (&refusing, unavailable_rail) {
        line["http"] = u.local_addr().to_string().into();
        line["rail_unavailable"] = rail.to_string().into();
    }
    println!("{line}");

    wait_for_signal(exit_with_stdin).await?;
    info!("shutting down");
    if let Some(u) = refusing {
        u.shutdown().await;
    }
    if let Some(g) = gateway {
        g.shutdown().await;
    }
    service.abort();
    node.shutdown().await;
    Ok(())
}

/// The URL policy of this node's snapshotters: public addresses only, plus loopback with
/// `--allow-loopback-urls`.
pub fn url_policy(cfg: &NodeConfig) -> UrlPolicy {
    if cfg.allow_loopback_urls {
        warn!(
            "--allow-loopback-urls: snapshotters may fetch 127.0.0.0/8 and ::1 (devnet/tests only)"
        );
        UrlPolicy::allow_loopback_for_tests()
    } else {
        UrlPolicy::new()
    }
}

/// The worker's runner: the Wasm executor (module cache under `--state`), the default
/// grants limited to the offers and the chosen snapshotters, and the snapshotters
/// themselves under the URL policy.
pub fn worker_runner(cfg: &NodeConfig, offers: &[ResolvedCapability]) -> anyhow::Result<Runner> {
    let policy = url_policy(cfg);
    let mut grants = Grants {
        offers: Some(offers.iter().map(|o| o.capability.to_string()).collect()),
        ..Grants::default()
    };
    let fetch = FetchSnapshotter::new(policy.clone(), FetchConfig::default())
        .context("cannot set up the fetch snapshotter")?;
    let chromium = ChromiumSnapshotter::new(policy, ChromiumConfig::default());
    let chromium = match cfg.snapshotter {
        Some(SnapshotterKind::Fetch) => {
            grants.snapshotters = [SnapshotterKind::Fetch].into_iter().collect();
            None
        }
        Some(SnapshotterKind::Playwright) => {
            grants.snapshotters = [SnapshotterKind::Playwright].into_iter().collect();
            if cfg.fallback_to_fetch {
                grants.snapshotters.insert(SnapshotterKind::Fetch);
            }
            if !chromium.available() {
                warn!(
                    binary = d402_runtime::chromium::DEFAULT_BINARY,
                    fallback_to_fetch = cfg.fallback_to_fetch,
                    "--snapshotter playwright: Chromium is not installed"
                );
            }
            Some(chromium)
        }
        // No choice: the manifest's order of preference, Chromium only where installed.
        None => chromium.available().then_some(chromium),
    };
    let executor = Executor::new(ExecutorConfig {
        cache_dir: Some(cfg.state_dir.join("wasm-cache")),
        max_concurrent: 4,
        max_memory_bytes: grants.max_memory_bytes,
    })
    .context("cannot start the Wasm executor")?;
    let snapshotters = Snapshotters {
        fetch: Some(fetch),
        chromium,
        fallback_to_fetch: cfg.fallback_to_fetch,
    };
    Ok(Runner::new(executor, grants, snapshotters))
}

/// The worker's payout wallets: the configured ones, and on the `local` rail either
/// `--local-payout-wallet` or the address of the `payout.key` wallet in `--state`
/// (created on first use, owner-only).
pub fn payout_wallets(cfg: &NodeConfig) -> anyhow::Result<d402_protocol::Wallets> {
    let mut payout = cfg.payout.clone();
    if let std::collections::btree_map::Entry::Vacant(e) = payout.entry(Chain::Local) {
        let wallet = keys::load_or_create(&cfg.state_dir.join(PAYOUT_KEY_FILE))?;
        e.insert(d402_settlement::wallet::address(&wallet));
    }
    Ok(payout)
}

fn start_worker(
    cfg: &NodeConfig,
    key: &SigningKey,
    handle: &NetHandle,
    offers: &[ResolvedCapability],
    blobs: &BlobStore,
) -> anyhow::Result<Worker> {
    let asset = Asset::local_usdc();
    let offered = offers
        .iter()
        .map(|o| OfferedCapability {
            manifest: o.manifest.clone(),
            manifest_cid: o.manifest_cid,
            wasm: Arc::new(o.wasm.clone()),
            floor: cfg.worker_price_units,
            asset: asset.id.clone(),
        })
        .collect();
    let payout = payout_wallets(cfg)?;
    info!(
        local_payout = payout.get(&Chain::Local).map(String::as_str).unwrap_or(""),
        price_units = cfg.worker_price_units,
        "worker ready"
    );
    let runner = worker_runner(cfg, offers)?;
    Ok(Worker::new(
        key.clone(),
        handle.clone(),
        runner,
        WorkerConfig::new(offered, vec![RailKind::Local], payout),
        blobs.clone(),
    ))
}

/// The gateway policy's settings from the node's flags (the rail is `local`).
pub fn gateway_settings(cfg: &NodeConfig, asset: &Asset) -> GatewaySettings {
    let mut s = GatewaySettings::new(RailKind::Local, asset.clone());
    s.price = cfg.gateway_price_units.map(|u| asset.format(u));
    s.budget = cfg.gateway_budget_units.map(|u| asset.format(u));
    s.fanout = cfg.fanout;
    s.quorum = cfg.quorum;
    s.allow_loopback_urls = cfg.allow_loopback_urls;
    s.require_capability_registration = cfg.require_capability_registration;
    s.require_signed_capability_registration = cfg.require_signed_capability_registration;
    s.max_creator_commission_bps = cfg.max_creator_commission_bps;
    s.trusted_namespaces = cfg.trusted_namespaces.clone();
    s.accepted_manifest_cids = cfg.accepted_manifest_cids.clone();
    s
}

/// Opens the local rail in the node's database with the gateway key of `state_dir`.
pub fn open_local_rail(
    state_dir: &Path,
    state: &State,
    dev_mode: bool,
) -> anyhow::Result<Arc<LocalRail>> {
    let gateway_key = keys::load_or_create(&state_dir.join(GATEWAY_KEY_FILE))?;
    let rail = LocalRail::open(
        state.database().clone(),
        gateway_key,
        LocalRailConfig {
            dev_mode,
            ..LocalRailConfig::default()
        },
    )
    .context("cannot open the local rail")?;
    Ok(Arc::new(rail))
}

async fn start_gateway(
    cfg: &NodeConfig,
    state: &State,
    handle: &NetHandle,
    coordinator: Coordinator,
    offers: &[ResolvedCapability],
) -> anyhow::Result<Gateway> {
    let rail = open_local_rail(&cfg.state_dir, state, cfg.dev_faucet)?;
    let policy = GatewayPolicy::new(&gateway_settings(cfg, rail.asset()), offers)?;
    let (host, port) = cfg.http.context("a gateway needs --http-port")?;
    let mut gcfg = GatewayConfig::new((host, port).into(), cfg.dev_faucet);
    gcfg.idempotency_ttl = cfg.idempotency_ttl;
    let g = Gateway::start(
        gcfg,
        GatewayParts {
            rail,
            coordinator,
            net: handle.clone(),
            state: state.clone(),
            policy,
        },
    )
    .await?;
    info!(http = %g.local_addr(), "gateway listening");
    Ok(g)
}

/// Waits for SIGINT or SIGTERM, and with `stdin_eof` also for standard input to end.
async fn wait_for_signal(stdin_eof: bool) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let eof = async {
        if !stdin_eof {
            return std::future::pending::<()>().await;
        }
        // A plain thread, not the blocking pool: the runtime would wait for a read that may
        // never end when it shuts down on a signal.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name("stdin-watch".into())
            .spawn(move || {
                let mut buf = [0u8; 256];
                // Whatever arrives is ignored; the end of the stream (or an error) is the
                // signal.
                while matches!(std::io::Read::read(&mut std::io::stdin(), &mut buf), Ok(n) if n > 0)
                {
                }
                let _ = tx.send(());
            });
        match spawned {
            Ok(_) => {
                let _ = rx.await;
            }
            Err(e) => {
                warn!(error = %e, "cannot watch standard input; only signals stop this node");
                std::future::pending::<()>().await
            }
        }
    };
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot wait for SIGINT")?,
        _ = term.recv() => {}
        _ = eof => info!("standard input closed (the supervising process is gone)"),
    }
    Ok(())
}
