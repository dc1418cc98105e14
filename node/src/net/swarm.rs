//! Building the swarm: TCP and QUIC, noise, yamux, DNS.
//!
//! NAT traversal (issue "NAT") adds `.with_relay_client(noise::Config::new,
//! yamux::Config::default)` after `.with_dns()` and passes the relay client into
//! [`Behaviour::new`].

use std::time::Duration;

use futures::StreamExt;
use libp2p::{
    Multiaddr, Swarm, core::upgrade, identity::Keypair, multiaddr::Protocol, noise,
    swarm::SwarmEvent, tcp, yamux,
};

use super::{
    NetConfig, NetError,
    behaviour::{Behaviour, BehaviourConfig},
};

/// Builds the swarm for `keypair`.
pub fn build(keypair: Keypair, cfg: &NetConfig) -> Result<Swarm<Behaviour>, NetError> {
    let bcfg = BehaviourConfig {
        kad_server: cfg.kad_server,
        rendezvous_server: cfg.rendezvous_server,
        max_connections: cfg.max_connections,
        max_connections_per_peer: 4,
        max_pending_incoming: 128,
        provider_republish: cfg.timings.provider_republish,
        provider_ttl: cfg.timings.provider_ttl,
        query_timeout: cfg.timings.query_timeout,
        agent: cfg.agent.clone(),
    };
    let idle = cfg.timings.idle_connection_timeout;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::new().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| NetError::Transport(e.to_string()))?
        .with_quic()
        .with_dns()
        .map_err(|e| NetError::Transport(format!("DNS resolver configuration: {e}")))?
        .with_behaviour(|key| Behaviour::new(key, &bcfg))
        .map_err(|e| NetError::Transport(e.to_string()))?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(idle)
                // A request goes out with its protocol's name instead of after the
                // listener's confirmation: one round trip per request instead of two. Safe
                // here: every substream negotiates one protocol, never nested ones
                // (DECISIONS, "Lazy protocol negotiation").
                .with_substream_upgrade_protocol_override(upgrade::Version::V1Lazy)
        })
        .build();
    Ok(swarm)
}

/// Waits for the TCP listener on `requested` to come up and returns its port (the OS's
/// choice when `requested` asked for port 0) and the listen address reported. The event
/// loop must be given that address: the swarm reports it only once.
pub async fn wait_tcp_port(
    swarm: &mut Swarm<Behaviour>,
    requested: &Multiaddr,
) -> Result<(u16, Multiaddr), NetError> {
    let fail = |reason: String| NetError::Listen {
        addr: requested.to_string(),
        reason,
    };
    let wait = async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::NewListenAddr { address, .. } => {
                    if let Some(port) = address.iter().find_map(|p| match p {
                        Protocol::Tcp(port) => Some(port),
                        _ => None,
                    }) {
                        return Ok((port, address));
                    }
                }
                SwarmEvent::ListenerClosed { reason, .. } => {
                    return Err(fail(format!("listener closed: {reason:?}")));
                }
                SwarmEvent::ListenerError { error, .. } => return Err(fail(error.to_string())),
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .map_err(|_| fail("no listen address after 10 s".into()))?
}
