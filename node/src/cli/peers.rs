//! `d402 peers --state DIR`: the peers a node has verified, from its database.
//!
//! A running node holds its database exclusively, so this asks it over its control socket
//! (`peers`, see [`crate::market::ops`]); when no node runs, it opens the database
//! read-only.

use std::{
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use clap::Args;

use crate::{
    market::ops::{self, PeerEntry},
    state::StateReader,
};

/// Arguments of `d402 peers`.
#[derive(Debug, Args)]
pub struct PeersArgs {
    /// The node's state directory.
    #[arg(long, env = "D402_STATE", value_name = "DIR")]
    state: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// The known peers: from the running node, else from its database.
fn known_peers(args: &PeersArgs) -> anyhow::Result<Vec<PeerEntry>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    if let Some(live) = rt
        .block_on(ops::query_peers(&args.state))
        .context("cannot ask the running node")?
    {
        return Ok(live);
    }
    let reader = StateReader::open(&args.state)
        .with_context(|| format!("cannot read the state in {}", args.state.display()))?;
    Ok(ops::peer_entries(reader.known_peers()?))
}

pub fn run(args: PeersArgs) -> anyhow::Result<()> {
    let peers = known_peers(&args)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&peers)?);
        return Ok(());
    }
    if peers.is_empty() {
        println!("no known peers");
        return Ok(());
    }
    for PeerEntry { peer_id, peer: p } in &peers {
        let ago = now.saturating_sub(p.last_seen_ms) / 1000;
        let mut roles = Vec::new();
        if p.kad_server {
            roles.push("dht");
        }
        if p.rendezvous_point {
            roles.push("rendezvous");
        }
        println!(
            "{}  last seen {} ({}s ago)  {}  {}",
            peer_id,
            p.last_seen_ms,
            ago,
            if roles.is_empty() {
                "client".to_string()
            } else {
                roles.join(",")
            },
            p.agent
        );
        for a in &p.addrs {
            println!("    addr  {a}");
        }
        println!("    protocols  {}", p.protocols.join(" "));
    }
    Ok(())
}
