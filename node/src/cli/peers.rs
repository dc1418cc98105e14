//! `d402 peers --state DIR`: the peers a node has verified, from its database.
//!
//! The database is opened read-only beside the running node (redb's single-writer mode), so
//! this works whether the node runs or not.

use std::{
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use clap::Args;
use libp2p::PeerId;

use crate::state::StateReader;

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

pub fn run(args: PeersArgs) -> anyhow::Result<()> {
    let reader = StateReader::open(&args.state)
        .with_context(|| format!("cannot read the state in {}", args.state.display()))?;
    let peers = reader.known_peers()?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    if args.json {
        let rows: Vec<serde_json::Value> = peers
            .iter()
            .map(|(id, p)| {
                serde_json::json!({
                    "peer_id": peer_text(id),
                    "addrs": p.addrs,
                    "protocols": p.protocols,
                    "agent": p.agent,
                    "kad_server": p.kad_server,
                    "rendezvous_point": p.rendezvous_point,
                    "first_seen_ms": p.first_seen_ms,
                    "last_seen_ms": p.last_seen_ms,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if peers.is_empty() {
        println!("no known peers");
        return Ok(());
    }
    for (id, p) in &peers {
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
            peer_text(id),
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

fn peer_text(id: &[u8]) -> String {
    PeerId::from_bytes(id)
        .map(|p| p.to_string())
        .unwrap_or_else(|_| format!("invalid:{}", hex::encode(id)))
}
