//! Shared helpers of the networking integration tests: real nodes on loopback, each with
//! its own key and redb database in a temporary directory, ports chosen by the OS.

#![allow(dead_code, clippy::unwrap_used)]

use std::{
    future::Future,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use d402_node::{
    net::{self, LookupOptions, NetConfig, NetHandle, Node, PeerSpec, Provider},
    state::State,
};
use d402_protocol::{Cid, SigningKey};
use libp2p::{Multiaddr, PeerId, multiaddr::Protocol};

/// Generous: CI machines are small and busy.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Roles of a test node.
#[derive(Clone, Copy, Debug)]
pub enum Role {
    /// DHT server and rendezvous point.
    Bootstrap,
    /// DHT server, rendezvous client.
    Gateway,
    /// DHT client, rendezvous client.
    Worker,
}

/// A running test node and what is needed to restart it.
pub struct TestNode {
    pub node: Node,
    pub handle: NetHandle,
    pub addr: Multiaddr,
    pub dir: PathBuf,
    pub seed: [u8; 32],
    pub role: Role,
    /// The node's database (the node holds the file; read it through this handle).
    pub state: State,
}

impl TestNode {
    pub fn peer_id(&self) -> PeerId {
        self.handle.local_peer_id()
    }

    /// `--peer` form of this node: its TCP address and PeerId.
    pub fn spec(&self) -> PeerSpec {
        format!("{}/p2p/{}", self.addr, self.peer_id())
            .parse()
            .expect("valid multiaddr")
    }

    /// `--peer` form without the PeerId, as operators write `host:port`.
    pub fn host_port_spec(&self) -> PeerSpec {
        let port = self
            .addr
            .iter()
            .find_map(|p| match p {
                Protocol::Tcp(p) => Some(p),
                _ => None,
            })
            .expect("tcp port");
        format!("127.0.0.1:{port}")
            .parse()
            .expect("valid host:port")
    }

    pub async fn stop(self) -> (PathBuf, [u8; 32], Role) {
        self.node.shutdown().await;
        drop(self.state);
        (self.dir, self.seed, self.role)
    }
}

pub fn seed() -> [u8; 32] {
    let mut s = [0u8; 32];
    getrandom::fill(&mut s).expect("randomness");
    s
}

pub fn config(role: Role, boot: Vec<PeerSpec>) -> NetConfig {
    let mut cfg = NetConfig::new(Ipv4Addr::LOCALHOST.into(), 0);
    cfg.kad_server = !matches!(role, Role::Worker);
    cfg.rendezvous_server = matches!(role, Role::Bootstrap);
    cfg.bootstrap = boot;
    cfg.timings.backoff_initial = Duration::from_millis(200);
    cfg.timings.backoff_max = Duration::from_secs(2);
    cfg
}

pub async fn start_with(dir: &Path, seed: [u8; 32], cfg: NetConfig, role: Role) -> TestNode {
    let state = State::open(dir).expect("open state");
    let node = net::start(cfg, &SigningKey::from_bytes(&seed), state.clone())
        .await
        .expect("node starts");
    let handle = node.handle();
    let addr = handle
        .listen_addrs()
        .await
        .expect("listen addrs")
        .into_iter()
        .find(|a| a.iter().any(|p| matches!(p, Protocol::Tcp(_))))
        .expect("a TCP listen address");
    TestNode {
        node,
        handle,
        addr,
        dir: dir.to_path_buf(),
        seed,
        role,
        state,
    }
}

pub async fn start(dir: &Path, role: Role, boot: Vec<PeerSpec>) -> TestNode {
    start_with(dir, seed(), config(role, boot), role).await
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after [`TIMEOUT`].
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Looks `cid` up from `h` until `want` is among the providers; returns that provider.
pub async fn find(h: &NetHandle, cid: Cid, want: PeerId, pred: fn(&Provider) -> bool) -> Provider {
    eventually("capability lookup returns the worker", || {
        let h = h.clone();
        async move {
            let r = h
                .find_providers(
                    cid,
                    LookupOptions {
                        limit: None,
                        timeout: Duration::from_secs(5),
                    },
                )
                .await
                .expect("lookup");
            r.into_iter().find(|p| p.peer_id == want && pred(p))
        }
    })
    .await
}

pub fn capability(name: &str) -> Cid {
    Cid::dag_cbor(name.as_bytes())
}

/// A loopback TCP port nobody listens on (bound, then released).
pub fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    drop(l);
    port
}

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
