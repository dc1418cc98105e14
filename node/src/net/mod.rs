//! The libp2p node.
//!
//! One task owns the [`libp2p::Swarm`] and runs one event loop (`event_loop.rs`); the rest of
//! the node talks to it through a cloneable [`NetHandle`] that sends typed commands with
//! reply channels. [`start`] builds the swarm (TCP and QUIC on the same port number, noise,
//! yamux, DNS), listens, loads the peers persisted in the node's database and spawns the
//! loop.
//!
//! Discovery: the node dials every bootstrap `--peer` (each independently, with exponential
//! backoff), learns peers through identify and Kademlia, admits a peer only from its signed
//! peer record (the record's PeerId must be the connection's), commits it to the database,
//! and only then puts it in the routing table. On restart it redials the persisted peers.
//!
//! Capability rendezvous: [`NetHandle::provide`] announces a manifest CID as a Kademlia
//! provider record under one of [`capability_key::SHARDS`] keys and registers it at every
//! rendezvous point; [`NetHandle::find_providers`] queries all shards and all rendezvous
//! points in parallel.

mod backoff;
mod behaviour;
pub mod capability_key;
pub mod codec;
mod command;
mod error;
mod event_loop;
mod identity;
mod market_rr;
mod peer_addr;
pub mod pipe;
mod swarm;

use std::{net::IpAddr, time::Duration};

use d402_protocol::SigningKey;
use libp2p::{Multiaddr, PeerId, multiaddr::Protocol};
use tokio::sync::mpsc;
use tracing::Instrument;

pub use backoff::Backoff;
pub use behaviour::{MAX_KAD_PACKET, PROTOCOL_VERSION};
pub use command::{BootstrapStatus, LookupOptions, NetHandle, PeerSummary, Provider};
pub use error::NetError;
pub use event_loop::verified_addresses;
pub use identity::{keypair_from_signing_key, peer_id_of, public_key_of};
pub use market_rr::{Inbound, RrError};
pub use peer_addr::PeerSpec;

use crate::state::State;

/// The host a node announces to others (`--advertise-host`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdvertiseHost {
    /// An IP address.
    Ip(IpAddr),
    /// A DNS name, announced as `/dns/<name>`.
    Dns(String),
}

impl AdvertiseHost {
    /// Parses an IP address or a DNS name.
    pub fn parse(s: &str) -> Result<AdvertiseHost, NetError> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(AdvertiseHost::Ip(ip));
        }
        // Reuse the `--peer` host checks.
        PeerSpec::from_str_host(s)?;
        Ok(AdvertiseHost::Dns(s.to_string()))
    }

    fn protocol(&self) -> Protocol<'static> {
        match self {
            AdvertiseHost::Ip(IpAddr::V4(ip)) => Protocol::Ip4(*ip),
            AdvertiseHost::Ip(IpAddr::V6(ip)) => Protocol::Ip6(*ip),
            AdvertiseHost::Dns(name) => Protocol::Dns(name.clone().into()),
        }
    }
}

/// Timers and limits of the network layer. The defaults suit a real deployment; tests and
/// benchmarks shorten some of them.
#[derive(Debug, Clone)]
pub struct Timings {
    /// First redial delay after a failed dial.
    pub backoff_initial: Duration,
    /// Longest redial delay.
    pub backoff_max: Duration,
    /// Persisted peers are given up (until the next start) after this many failed dials.
    pub persisted_max_failures: u32,
    /// Most persisted peers redialled at start (most recently seen first).
    pub persisted_redial: usize,
    /// How often our provider records are republished.
    pub provider_republish: Duration,
    /// How long provider records live.
    pub provider_ttl: Duration,
    /// Registration lifetime asked of rendezvous points, in seconds (refreshed at half).
    pub rendezvous_ttl_secs: u64,
    /// Kademlia query timeout.
    pub query_timeout: Duration,
    /// Connections idle this long are closed.
    pub idle_connection_timeout: Duration,
    /// A verified peer whose record did not change is rewritten (last-seen) at most this often.
    pub persist_refresh: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            persisted_max_failures: 6,
            persisted_redial: 64,
            provider_republish: Duration::from_secs(10 * 60),
            provider_ttl: Duration::from_secs(30 * 60),
            rendezvous_ttl_secs: libp2p::rendezvous::MIN_TTL,
            query_timeout: Duration::from_secs(30),
            idle_connection_timeout: Duration::from_secs(10 * 60),
            persist_refresh: Duration::from_secs(60),
        }
    }
}

/// How to run the network layer.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Interface to listen on (`--host`).
    pub listen_ip: IpAddr,
    /// TCP port, and the UDP port for QUIC (`--port`; 0 lets the OS choose).
    pub port: u16,
    /// Also listen on QUIC (UDP, same port number as TCP).
    pub quic: bool,
    /// The external host announced (`--advertise-host`). Without it the node announces its
    /// listen addresses when `listen_ip` is a specific address, and its non-loopback
    /// interface addresses when it listens on `0.0.0.0` / `::`.
    pub advertise: Option<AdvertiseHost>,
    /// Bootstrap peers (`--peer`).
    pub bootstrap: Vec<PeerSpec>,
    /// Serve the DHT (bootstrap, gateway, validator, and publicly reachable workers).
    pub kad_server: bool,
    /// Be a rendezvous point (bootstrap nodes); otherwise a rendezvous client.
    pub rendezvous_server: bool,
    /// Most established connections.
    pub max_connections: u32,
    /// Agent string announced in identify.
    pub agent: String,
    /// Timers and limits.
    pub timings: Timings,
    /// Send leases on long-lived pipes and accept them ([`pipe`]); off, every lease goes
    /// by request-response (`/d402/lease/1`).
    pub lease_pipes: bool,
}

impl NetConfig {
    /// A configuration with defaults: QUIC on, client mode, no bootstrap peers.
    pub fn new(listen_ip: IpAddr, port: u16) -> NetConfig {
        NetConfig {
            listen_ip,
            port,
            quic: true,
            advertise: None,
            bootstrap: Vec::new(),
            kad_server: false,
            rendezvous_server: false,
            max_connections: 512,
            agent: format!("d402/{}", env!("CARGO_PKG_VERSION")),
            timings: Timings::default(),
            lease_pipes: true,
        }
    }

    fn tcp_listen_addr(&self) -> Multiaddr {
        let mut a = Multiaddr::from(self.listen_ip);
        a.push(Protocol::Tcp(self.port));
        a
    }
}

fn quic_addr(ip: IpAddr, port: u16) -> Multiaddr {
    let mut a = Multiaddr::from(ip);
    a.push(Protocol::Udp(port));
    a.push(Protocol::QuicV1);
    a
}

/// A running network layer: its handle and its event-loop task.
pub struct Node {
    handle: NetHandle,
    task: tokio::task::JoinHandle<()>,
}

impl Node {
    /// A handle to the event loop (clone it freely).
    pub fn handle(&self) -> NetHandle {
        self.handle.clone()
    }

    /// This node's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.handle.local_peer_id()
    }

    /// Stops the event loop and waits for it (connections are closed, nothing is lost:
    /// every admitted peer was committed when it was admitted).
    pub async fn shutdown(self) {
        self.handle.shutdown().await;
        let _ = self.task.await;
    }

    /// Waits until the event loop ends (after a [`NetHandle::shutdown`]).
    pub async fn join(self) {
        let _ = self.task.await;
    }
}

/// Builds the swarm, starts listening and spawns the event loop.
pub async fn start(cfg: NetConfig, key: &SigningKey, state: State) -> Result<Node, NetError> {
    let keypair = keypair_from_signing_key(key)?;
    let local = keypair.public().to_peer_id();
    let span = tracing::info_span!("net", peer = %local);
    let mut swarm = swarm::build(keypair, &cfg)?;

    let tcp = cfg.tcp_listen_addr();
    swarm.listen_on(tcp.clone()).map_err(|e| NetError::Listen {
        addr: tcp.to_string(),
        reason: e.to_string(),
    })?;
    let (port, first_listen) = swarm::wait_tcp_port(&mut swarm, &tcp).await?;
    if cfg.quic {
        let quic = quic_addr(cfg.listen_ip, port);
        if let Err(e) = swarm.listen_on(quic.clone()) {
            tracing::warn!(parent: &span, addr = %quic, error = %e, "cannot listen on QUIC; TCP only");
        }
    }

    let pipes = std::sync::Arc::new(pipe::Pipes::new(
        swarm.behaviour().pipe.new_control(),
        cfg.lease_pipes,
    ));
    let (tx, rx) = mpsc::channel(256);
    let mut event_loop = event_loop::EventLoop::new(swarm, rx, cfg, state, port, pipes.clone())?;
    event_loop.on_new_listen_addr(first_listen);
    event_loop.start_dialling();
    let task = tokio::spawn(event_loop.run().instrument(span));
    Ok(Node {
        handle: NetHandle::new(tx, local, pipes),
        task,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    /// libp2p's stream and request timeouts (`futures_timer::Delay`) run on Tokio's timer
    /// inside a runtime (the vendored futures-timer, DECISIONS "futures-timer on Tokio's
    /// timers"): with Tokio's clock paused, an hour-long `Delay` fires as soon as the clock
    /// is advanced past it, which a `Delay` of futures-timer's helper thread never would.
    #[tokio::test(start_paused = true)]
    async fn libp2p_timers_run_on_tokio_inside_a_runtime() {
        let mut delay = futures_timer::Delay::new(Duration::from_secs(3600));
        assert!(futures::poll!(&mut delay).is_pending());
        tokio::time::advance(Duration::from_secs(3601)).await;
        tokio::time::timeout(Duration::from_secs(1), &mut delay)
            .await
            .expect("the delay fired on Tokio's clock");

        // `reset` moves the deadline on Tokio's clock too.
        delay.reset(Duration::from_secs(60));
        assert!(futures::poll!(&mut delay).is_pending());
        tokio::time::advance(Duration::from_secs(61)).await;
        tokio::time::timeout(Duration::from_secs(1), &mut delay)
            .await
            .expect("the reset delay fired on Tokio's clock");
    }

    /// Outside a runtime a `Delay` still fires (futures-timer's helper thread).
    #[test]
    fn a_delay_outside_a_runtime_still_fires() {
        let started = std::time::Instant::now();
        futures::executor::block_on(futures_timer::Delay::new(Duration::from_millis(20)));
        assert!(started.elapsed() >= Duration::from_millis(20));
    }
}
