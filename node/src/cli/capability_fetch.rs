//! `d402 capability fetch`: gets a capability first published elsewhere from a peer that
//! has it (over `/d402/blob/1`), verifies each part against its CID and imports it into the
//! node's store, so that `--offer id@version` can name it.
//!
//! It runs its own short-lived network identity (a random key and a database in a
//! temporary directory), so it works while the node that owns `--state` runs.

use std::{net::Ipv4Addr, path::PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use d402_protocol::{Cid, SigningKey};
use libp2p::{Multiaddr, multiaddr::Protocol};

use crate::{
    capstore::CapStore,
    market::blobs,
    net::{self, NetConfig},
    state::State,
};

/// Arguments of `d402 capability fetch`.
#[derive(Debug, Args)]
pub struct FetchArgs {
    /// The node's state directory (its capability store receives the capability).
    #[arg(long, env = "D402_STATE", value_name = "DIR")]
    state: PathBuf,
    /// The peer that has it: a multiaddr ending in `/p2p/<PeerId>`.
    #[arg(long, value_name = "MULTIADDR")]
    peer: String,
    /// The manifest's CID.
    #[arg(long, value_name = "CID")]
    manifest_cid: String,
    /// The registration's CID, to fetch it too.
    #[arg(long, value_name = "CID")]
    registration_cid: Option<String>,
    /// Replace another manifest already stored under the same id@version.
    #[arg(long)]
    replace: bool,
}

/// A temporary directory removed on drop.
struct TmpDir(PathBuf);

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run(a: FetchArgs) -> anyhow::Result<()> {
    let addr: Multiaddr = a
        .peer
        .parse()
        .with_context(|| format!("--peer {:?} is not a multiaddr", a.peer))?;
    let Some(Protocol::P2p(peer)) = addr.iter().last() else {
        bail!("--peer {:?} must end in /p2p/<PeerId>", a.peer);
    };
    let manifest_cid: Cid = a
        .manifest_cid
        .parse()
        .map_err(|e| anyhow::anyhow!("--manifest-cid {:?}: {e}", a.manifest_cid))?;
    let registration_cid: Option<Cid> = match &a.registration_cid {
        Some(c) => Some(
            c.parse()
                .map_err(|e| anyhow::anyhow!("--registration-cid {c:?}: {e}"))?,
        ),
        None => None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let fetched = rt.block_on(async {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).context("no randomness")?;
        let dir = TmpDir(std::env::temp_dir().join(format!(
            "d402-capability-fetch-{}-{}",
            std::process::id(),
            hex::encode(&seed[..4])
        )));
        let state = State::open(&dir.0)?;
        let mut cfg = NetConfig::new(Ipv4Addr::LOCALHOST.into(), 0);
        cfg.quic = false;
        let node = net::start(cfg, &SigningKey::from_bytes(&seed), state).await?;
        let handle = node.handle();
        let result = async {
            handle
                .connect(addr.clone())
                .await
                .with_context(|| format!("cannot connect to {addr}"))?;
            blobs::fetch_capability(&handle, peer, vec![addr], manifest_cid, registration_cid)
                .await
                .with_context(|| format!("cannot fetch manifest {manifest_cid} from {peer}"))
        }
        .await;
        node.shutdown().await;
        drop(dir);
        result
    })?;
    let out = CapStore::new(&a.state).import(
        &fetched.manifest,
        &fetched.wasm,
        fetched.registration.as_ref(),
        a.replace,
    )?;
    println!(
        "{}",
        serde_json::json!({
            "capability": out.capability.to_string(),
            "manifest_cid": out.manifest_cid.to_string(),
            "wasm_cid": out.wasm_cid.to_string(),
            "registration_cid": out.registration_cid.map(|c| c.to_string()),
            "replaced": out.replaced.map(|c| c.to_string()),
            "from": peer.to_string(),
        })
    );
    Ok(())
}
