//! Shared helpers of the market integration tests: real nodes on loopback (own key, own
//! redb in a temporary directory, OS-chosen ports), real wasmtime, a trivial capability.

#![allow(dead_code, clippy::unwrap_used)]

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use d402_capabilities::Manifest;
use d402_node::{
    market::{
        blobs::BlobStore,
        coordinator::{Coordinator, CoordinatorConfig},
        now_ms,
        reputation::{Policy, Reputation},
        service::{self, Services},
        tasks::{Phase, TaskRecord, TaskSpec},
        worker::{OfferedCapability, Worker, WorkerConfig},
    },
    net::{self, NetConfig, NetHandle, Node},
    state::State,
};
use d402_protocol::{Amount, Chain, Cid, RailKind, SigningKey, TaskId};
use d402_runtime::{Executor, ExecutorConfig, Grants, Runner, Snapshotters};
use libp2p::{Multiaddr, multiaddr::Protocol};
use tokio::task::JoinHandle;

/// Generous: CI machines are small and busy.
pub const TIMEOUT: Duration = Duration::from_secs(90);

pub const ASSET: &str = "local:USDC";

/// An echo module speaking d402-wasm-1: its output is its whole framed input.
pub fn echo_wasm() -> Vec<u8> {
    wat::parse_str(
        r#"(module
  (memory (export "memory") 2)
  (func (export "d402_alloc") (param $len i32) (result i32) (i32.const 1024))
  (func (export "d402_run") (param $ptr i32) (param $len i32) (result i64)
    (i64.or (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32))
            (i64.extend_i32_u (local.get $len)))))"#,
    )
    .unwrap()
}

/// The trivial capability `test.echo@1`.
pub fn echo_offer(floor: u64) -> OfferedCapability {
    let wasm = echo_wasm();
    let manifest = Manifest::template("test.echo", 1, Cid::raw(&wasm), Vec::new()).unwrap();
    OfferedCapability {
        manifest_cid: manifest.cid().unwrap(),
        manifest,
        wasm: Arc::new(wasm),
        floor,
        asset: ASSET.into(),
    }
}

pub fn runner() -> Runner {
    let executor = Executor::new(ExecutorConfig {
        cache_dir: None,
        max_concurrent: 2,
        max_memory_bytes: 512 * 1024 * 1024,
    })
    .unwrap();
    Runner::new(executor, Grants::permissive(), Snapshotters::default())
}

pub fn seed() -> [u8; 32] {
    let mut s = [0u8; 32];
    getrandom::fill(&mut s).unwrap();
    s
}

/// A running node with its market service.
pub struct MarketNode {
    pub node: Node,
    pub net: NetHandle,
    pub addr: Multiaddr,
    pub state: State,
    pub seed: [u8; 32],
    pub worker: Option<Worker>,
    pub coordinator: Option<Coordinator>,
    pub service: JoinHandle<()>,
}

impl MarketNode {
    /// Stops the service and the network layer and waits for both, so that the node's
    /// database is closed when this returns, but for a blocking task the node had begun
    /// (reopen it with [`open_state`]).
    pub async fn stop(self) {
        self.service.abort();
        let _ = self.service.await;
        self.node.shutdown().await;
    }

    /// The node's public key (what bids, leases and reputation rows name).
    pub fn key(&self) -> [u8; 32] {
        SigningKey::from_bytes(&self.seed)
            .verifying_key()
            .to_bytes()
    }

    /// The node's PeerId.
    pub fn peer(&self) -> libp2p::PeerId {
        self.net.local_peer_id()
    }

    /// The TCP port it listens on.
    pub fn port(&self) -> u16 {
        self.addr
            .iter()
            .find_map(|p| match p {
                Protocol::Tcp(port) => Some(port),
                _ => None,
            })
            .unwrap()
    }
}

/// Loopback TCP on `port` (0: any), no QUIC.
pub fn loopback(port: u16) -> NetConfig {
    NetConfig {
        quic: false,
        ..NetConfig::new(Ipv4Addr::LOCALHOST.into(), port)
    }
}

pub async fn start_net(
    dir: &Path,
    seed: [u8; 32],
    port: u16,
) -> (Node, NetHandle, Multiaddr, State) {
    start_net_with(dir, seed, loopback(port)).await
}

/// Opens the state in `dir`, waiting up to 2 s while a stopped node's last blocking task
/// (a commit or fsync it had begun when its driver was aborted) still holds the file.
pub async fn open_state(dir: &Path) -> State {
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        match State::open(dir) {
            Ok(state) => return state,
            Err(d402_node::state::StateError::Locked(_)) if tokio::time::Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("open state: {e}"),
        }
    }
}

/// A node with `cfg` (e.g. a bootstrap: Kademlia server and rendezvous point), its handle,
/// its TCP address and its state.
pub async fn start_net_with(
    dir: &Path,
    seed: [u8; 32],
    cfg: NetConfig,
) -> (Node, NetHandle, Multiaddr, State) {
    let state = open_state(dir).await;
    let node = net::start(cfg, &SigningKey::from_bytes(&seed), state.clone())
        .await
        .unwrap();
    let net = node.handle();
    let addr = net
        .listen_addrs()
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.iter().any(|p| matches!(p, Protocol::Tcp(_))))
        .unwrap();
    (node, net, addr, state)
}

pub fn wallets(name: &str) -> BTreeMap<Chain, String> {
    [(Chain::Local, name.to_string())].into_iter().collect()
}

/// Worker `i` selling `offer` on the local rail, paid to wallet `worker{i}`.
pub fn worker_cfg(offer: &OfferedCapability, i: usize) -> WorkerConfig {
    WorkerConfig::new(
        vec![offer.clone()],
        vec![RailKind::Local],
        wallets(&format!("worker{i}")),
    )
}

pub async fn start_worker(dir: &Path, cfg: WorkerConfig) -> MarketNode {
    start_worker_with(dir, cfg, runner(), None).await
}

/// A worker running with `runner`; with `signing_seed`, it signs its bids, claims and
/// everything else with that key instead of its node key (an impostor).
pub async fn start_worker_with(
    dir: &Path,
    cfg: WorkerConfig,
    runner: Runner,
    signing_seed: Option<[u8; 32]>,
) -> MarketNode {
    start_worker_on(dir, cfg, runner, seed(), signing_seed, loopback(0)).await
}

/// A worker that neither opens nor accepts lease pipes (a node from before them): leases
/// reach it by request-response.
pub async fn start_worker_without_pipes(dir: &Path, cfg: WorkerConfig) -> MarketNode {
    let net = NetConfig {
        lease_pipes: false,
        ..loopback(0)
    };
    start_worker_on(dir, cfg, runner(), seed(), None, net).await
}

/// Stops `old` and starts a worker with its key, directory and port again: the same peer,
/// without what it held in memory (e.g. the bids it made).
pub async fn restart_worker(old: MarketNode, dir: &Path, cfg: WorkerConfig) -> MarketNode {
    let (seed, port) = (old.seed, old.port());
    old.stop().await;
    start_worker_on(dir, cfg, runner(), seed, None, loopback(port)).await
}

async fn start_worker_on(
    dir: &Path,
    cfg: WorkerConfig,
    runner: Runner,
    seed: [u8; 32],
    signing_seed: Option<[u8; 32]>,
    net: NetConfig,
) -> MarketNode {
    let (node, net, addr, state) = start_net_with(dir, seed, net).await;
    let blobs = BlobStore::new(64 * 1024 * 1024);
    let worker = Worker::new(
        SigningKey::from_bytes(&signing_seed.unwrap_or(seed)),
        net.clone(),
        runner,
        cfg,
        blobs.clone(),
    );
    let service = service::serve(
        &net,
        Services {
            worker: Some(worker.clone()),
            coordinator: None,
            validator: None,
            blobs,
        },
        64,
    )
    .await
    .unwrap();
    MarketNode {
        node,
        net,
        addr,
        state,
        seed,
        worker: Some(worker),
        coordinator: None,
        service,
    }
}

pub fn coordinator_config() -> CoordinatorConfig {
    CoordinatorConfig {
        lease_timeout: Duration::from_secs(20),
        lookup_timeout: Duration::from_millis(500),
        ..CoordinatorConfig::default()
    }
}

pub async fn start_gateway(
    dir: &Path,
    seed: [u8; 32],
    port: u16,
    cfg: CoordinatorConfig,
    policy: Policy,
) -> MarketNode {
    let (node, net, addr, state) = start_net(dir, seed, port).await;
    let blobs = BlobStore::new(64 * 1024 * 1024);
    let coordinator = Coordinator::new(
        SigningKey::from_bytes(&seed),
        net.clone(),
        state.clone(),
        Reputation::new(state.clone(), policy),
        blobs.clone(),
        cfg,
    );
    let service = service::serve(
        &net,
        Services {
            worker: None,
            coordinator: Some(coordinator.clone()),
            validator: None,
            blobs,
        },
        64,
    )
    .await
    .unwrap();
    MarketNode {
        node,
        net,
        addr,
        state,
        seed,
        worker: None,
        coordinator: Some(coordinator),
        service,
    }
}

/// A gateway on the default terms, connected to `workers`, and its coordinator.
pub async fn gateway_for(dir: &Path, workers: &[MarketNode]) -> (MarketNode, Coordinator) {
    let gw = start_gateway(dir, seed(), 0, coordinator_config(), Policy::default()).await;
    for w in workers {
        gw.net.connect(w.addr.clone()).await.unwrap();
    }
    let coord = gw.coordinator.clone().unwrap();
    (gw, coord)
}

pub fn task(offer: &OfferedCapability, input: &[u8], fanout: u32, quorum: u32) -> TaskSpec {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).unwrap();
    TaskSpec {
        task_id: TaskId(id),
        capability: offer.manifest.capability(),
        manifest_cid: offer.manifest_cid,
        input: input.to_vec(),
        rail: RailKind::Local,
        budget: Amount {
            asset: ASSET.into(),
            units: 1_000,
        },
        fanout,
        quorum,
        deadline: now_ms() + 60_000,
        takes_snapshot: !offer.manifest.permissions.snapshotters.is_empty(),
    }
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after [`TIMEOUT`].
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
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

/// Runs `spec` on `coord` (within [`TIMEOUT`]) and checks it is accepted.
pub async fn accepted(coord: &Coordinator, spec: TaskSpec) -> TaskRecord {
    let done = tokio::time::timeout(TIMEOUT, coord.run_task(spec))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.phase, Phase::Accepted, "{done:?}");
    done
}

/// Runs `spec` on `coord`, checks it is accepted, and returns its record once `claims`
/// claims are recorded (the last may land after the decision and is judged on arrival).
pub async fn run_accepted(coord: &Coordinator, spec: TaskSpec, claims: usize) -> TaskRecord {
    let id = spec.task_id;
    accepted(coord, spec).await;
    eventually("the claims recorded", || {
        let c = coord.clone();
        async move {
            let r = c.tasks().get(&id).unwrap()?;
            (r.claims.len() == claims).then_some(r)
        }
    })
    .await
}
