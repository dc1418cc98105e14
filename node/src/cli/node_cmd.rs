//! `d402 node`: runs a node with the operator guide's flags.
//!
//! It opens the state directory (database, identity key), starts the network layer,
//! announces the worker's offers, prints one JSON line on stdout once it listens
//! (`{"event":"listening","peer_id":…,"listen":[…],"external":[…]}`) and runs until
//! SIGINT or SIGTERM. Logs go to stderr (`--log-format json` for JSON lines).

use std::time::Duration;

use anyhow::Context;
use tracing::{info, warn};

use crate::{
    capstore,
    config::{LogFormat, NodeArgs, NodeConfig},
    keys,
    net::{self, NetConfig},
    state::State,
};

/// File name of the node identity key inside `--state`.
pub const NODE_KEY_FILE: &str = "node.key";

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
    rt.block_on(run_node(cfg))
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

async fn run_node(cfg: NodeConfig) -> anyhow::Result<()> {
    let roles = cfg.roles();
    let span = tracing::info_span!("node", label = %cfg.label);
    let _enter = span.enter();
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
    if roles.gateway {
        warn!("the gateway HTTP API is not part of this build yet; running as a DHT server only");
    }

    // Give the listeners a moment to report every address (QUIC comes up after TCP).
    tokio::time::sleep(Duration::from_millis(50)).await;
    let listen = handle.listen_addrs().await?;
    let external = handle.external_addrs().await?;
    println!(
        "{}",
        serde_json::json!({
            "event": "listening",
            "peer_id": node.peer_id().to_string(),
            "listen": listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "external": external.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        })
    );

    wait_for_signal().await?;
    info!("shutting down");
    node.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot wait for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}
