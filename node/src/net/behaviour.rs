//! The node's composed `NetworkBehaviour`. Behaviours stay thin: every decision (what
//! enters the routing table, what is persisted, where offers are announced) is made in
//! the event loop ([`super::event_loop`]).
//!
//! The market's request-response protocols (`/d402/bid/1`, `/d402/lease/1`,
//! `/d402/claim/1`, `/d402/verdict/1`, `/d402/blob/1`) are one behaviour each, with the
//! codec, caps and timeouts of [`super::codec`].
//!
//! Slots for later issues, each added as one more field here and one more arm in the event
//! loop's `on_behaviour_event`:
//! - NAT traversal: `relay::Behaviour` (server, on public nodes) and `relay::client`
//!   (the transport half comes from `SwarmBuilder::with_relay_client`, see
//!   [`super::swarm`]), `dcutr::Behaviour` and `autonat::v2` client/server.
//!
//! Developers can put their own behaviour beside these the same way (see `examples/`).

use std::time::Duration;

use libp2p::{
    StreamProtocol, connection_limits, identify,
    identity::Keypair,
    kad, ping, rendezvous, request_response,
    swarm::{NetworkBehaviour, behaviour::toggle::Toggle},
};

use super::codec::{self, BidProto, BlobProto, ClaimProto, D402Codec, LeaseProto, VerdictProto};

use d402_protocol::protocol_ids;

/// The identify protocol version every d402 node announces; peers announcing another are
/// not added to the routing table or persisted.
pub const PROTOCOL_VERSION: &str = "/d402/1.0.0";

/// Largest Kademlia message accepted (libp2p's default); a larger one closes that stream.
pub const MAX_KAD_PACKET: usize = 16 * 1024;

/// Most concurrent streams per connection of the bid, lease and claim protocols. A gateway
/// with many tasks in flight holds one bid or lease stream per task on each worker's
/// connection (a lease's stream stays open until its inline claim, see
/// [`crate::market::worker`]); past this the worker drops the stream and the gateway loses
/// that bid. Each stream's messages are capped by the codec, and the market service's
/// bounded queue answers "busy" beyond its length.
pub const MARKET_STREAMS: usize = 256;

/// How the behaviour is set up.
#[derive(Debug, Clone)]
pub struct BehaviourConfig {
    /// Kademlia server (answers DHT queries, enters others' routing tables) or client.
    pub kad_server: bool,
    /// Run a rendezvous point (bootstrap nodes) instead of a rendezvous client.
    pub rendezvous_server: bool,
    /// Most established connections in total.
    pub max_connections: u32,
    /// Most established connections per peer.
    pub max_connections_per_peer: u32,
    /// Most pending inbound connections (handshakes in progress).
    pub max_pending_incoming: u32,
    /// Interval between provider record republications.
    pub provider_republish: Duration,
    /// Lifetime of provider records (ours at others, others' at us).
    pub provider_ttl: Duration,
    /// Kademlia query timeout.
    pub query_timeout: Duration,
    /// The agent string announced in identify.
    pub agent: String,
}

/// Every behaviour of a d402 node.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Refuses connections past the configured limits (checked before handshakes finish).
    pub limits: connection_limits::Behaviour,
    /// identify with signed peer records: the only source of addresses for the routing table.
    pub identify: identify::Behaviour,
    /// Liveness and round-trip time.
    pub ping: ping::Behaviour,
    /// Kademlia under `/d402/kad/1.0.0`, manual routing-table inserts, filtered stores.
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    /// Rendezvous point (bootstrap nodes).
    pub rendezvous_server: Toggle<rendezvous::server::Behaviour>,
    /// Rendezvous client (every other node).
    pub rendezvous_client: Toggle<rendezvous::client::Behaviour>,
    /// `/d402/bid/1` (see [`codec`]).
    pub bid: request_response::Behaviour<D402Codec<BidProto>>,
    /// `/d402/lease/1`.
    pub lease: request_response::Behaviour<D402Codec<LeaseProto>>,
    /// `/d402/claim/1`.
    pub claim: request_response::Behaviour<D402Codec<ClaimProto>>,
    /// `/d402/verdict/1`.
    pub verdict: request_response::Behaviour<D402Codec<VerdictProto>>,
    /// `/d402/blob/1`.
    pub blob: request_response::Behaviour<D402Codec<BlobProto>>,
    /// Long-lived streams: the lease pipes (`/d402/lease-pipe/1`, [`super::pipe`]).
    pub pipe: libp2p_stream::Behaviour,
}

impl Behaviour {
    /// Builds the behaviour for `keypair`.
    pub fn new(keypair: &Keypair, cfg: &BehaviourConfig) -> Behaviour {
        let peer_id = keypair.public().to_peer_id();

        let limits = connection_limits::ConnectionLimits::default()
            .with_max_established(Some(cfg.max_connections))
            .with_max_established_per_peer(Some(cfg.max_connections_per_peer))
            .with_max_pending_incoming(Some(cfg.max_pending_incoming));

        let identify = identify::Behaviour::new(
            identify::Config::new_with_signed_peer_record(PROTOCOL_VERSION.to_string(), keypair)
                .with_agent_version(cfg.agent.clone())
                // Announce only the external addresses the node chose (see
                // `NetConfig::advertise`), never every interface it listens on.
                .with_hide_listen_addrs(true)
                .with_push_listen_addr_updates(true),
        );

        let mut kad_cfg = kad::Config::new(StreamProtocol::new(protocol_ids::KAD));
        kad_cfg
            // Peers enter the routing table only from verified signed peer records.
            .set_kbucket_inserts(kad::BucketInserts::Manual)
            // Inbound records and provider records are checked by the event loop.
            .set_record_filtering(kad::StoreInserts::FilterBoth)
            .set_provider_publication_interval(Some(cfg.provider_republish))
            .set_provider_record_ttl(Some(cfg.provider_ttl))
            .set_query_timeout(cfg.query_timeout)
            .set_max_packet_size(MAX_KAD_PACKET);
        let store = kad::store::MemoryStore::with_config(
            peer_id,
            kad::store::MemoryStoreConfig {
                // d402 publishes no Kademlia values, only provider records.
                max_records: 0,
                max_value_bytes: 0,
                ..Default::default()
            },
        );
        let mut kad = kad::Behaviour::with_config(peer_id, store, kad_cfg);
        kad.set_mode(Some(if cfg.kad_server {
            kad::Mode::Server
        } else {
            kad::Mode::Client
        }));

        let (server, client) = if cfg.rendezvous_server {
            (
                Some(rendezvous::server::Behaviour::new(
                    rendezvous::server::Config::default(),
                )),
                None,
            )
        } else {
            (
                None,
                Some(rendezvous::client::Behaviour::new(keypair.clone())),
            )
        };

        Behaviour {
            limits: connection_limits::Behaviour::new(limits),
            identify,
            ping: ping::Behaviour::new(ping::Config::new()),
            kad,
            rendezvous_server: server.into(),
            rendezvous_client: client.into(),
            bid: codec::behaviour(MARKET_STREAMS),
            lease: codec::behaviour(MARKET_STREAMS),
            claim: codec::behaviour(MARKET_STREAMS),
            verdict: codec::behaviour(8),
            blob: codec::behaviour(8),
            pipe: libp2p_stream::Behaviour::new(),
        }
    }
}
