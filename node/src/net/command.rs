//! The cloneable handle to the event loop and the commands it sends.

use std::{sync::Arc, time::Duration};

use d402_protocol::Cid;
use libp2p::{Multiaddr, PeerId};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::{
    NetError,
    codec::{BidProto, BlobProto, ClaimProto, LeaseProto, RrProtocol, VerdictProto},
    market_rr::{Inbound, MarketOp, RrError, Wired},
    pipe::{PipeStats, Pipes},
};

/// A worker offering a capability, as a lookup found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Provider {
    /// The worker.
    #[serde(serialize_with = "ser_display")]
    pub peer_id: PeerId,
    /// Its addresses from a signed peer record (empty until the node has verified it; the
    /// node dials every provider it finds, so the record follows shortly).
    #[serde(serialize_with = "ser_display_vec")]
    pub addrs: Vec<Multiaddr>,
    /// Found through a Kademlia provider record.
    pub via_kad: bool,
    /// Found at a rendezvous point.
    pub via_rendezvous: bool,
}

/// How a capability lookup runs.
#[derive(Debug, Clone, Copy)]
pub struct LookupOptions {
    /// Stop as soon as this many providers are found (`None`: run every query to its end).
    pub limit: Option<usize>,
    /// Give up on the queries still running after this long, returning what was found.
    pub timeout: Duration,
}

impl Default for LookupOptions {
    fn default() -> Self {
        LookupOptions {
            limit: None,
            timeout: Duration::from_secs(10),
        }
    }
}

/// A verified peer as the running node sees it.
#[derive(Debug, Clone, Serialize)]
pub struct PeerSummary {
    /// The peer.
    #[serde(serialize_with = "ser_display")]
    pub peer_id: PeerId,
    /// Addresses from its signed peer record.
    #[serde(serialize_with = "ser_display_vec")]
    pub addrs: Vec<Multiaddr>,
    /// Protocols it announced.
    pub protocols: Vec<String>,
    /// Whether it is connected now.
    pub connected: bool,
    /// Whether it is in the Kademlia routing table.
    pub in_routing_table: bool,
    /// Last verified (Unix milliseconds).
    pub last_seen_ms: u64,
    /// Last ping round trip, when known.
    pub rtt_us: Option<u64>,
}

/// One `--peer` and how dialling it goes.
#[derive(Debug, Clone, Serialize)]
pub struct BootstrapStatus {
    /// What the operator wrote.
    pub input: String,
    /// The address dialled.
    pub addr: String,
    /// The PeerId learnt in the handshake.
    pub peer_id: Option<String>,
    /// Connected now.
    pub connected: bool,
    /// Consecutive failed dials.
    pub failures: u32,
    /// The last dial error.
    pub last_error: Option<String>,
}

fn ser_display<S: serde::Serializer, T: std::fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn ser_display_vec<S: serde::Serializer, T: std::fmt::Display>(
    v: &[T],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|x| x.to_string()))
}

/// A request to the event loop.
pub(crate) enum Command {
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    ExternalAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Connect {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<PeerId, NetError>>,
    },
    ConnectedPeers(oneshot::Sender<Vec<PeerId>>),
    Peers(oneshot::Sender<Vec<PeerSummary>>),
    RoutingTable(oneshot::Sender<Vec<PeerId>>),
    Bootstraps(oneshot::Sender<Vec<BootstrapStatus>>),
    Provide {
        cid: Cid,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    StopProviding {
        cid: Cid,
        reply: oneshot::Sender<()>,
    },
    FindProviders {
        cid: Cid,
        opts: LookupOptions,
        reply: oneshot::Sender<Vec<Provider>>,
    },
    /// A market request-response operation (send a request, register the service queue).
    Market(MarketOp),
    /// A request to `peer`: when it is not connected, the addresses of its known record
    /// are added before `op` runs, so the request can dial it.
    MarketTo {
        peer: PeerId,
        op: MarketOp,
    },
    Shutdown(oneshot::Sender<()>),
}

/// A cloneable handle to the node's event loop. Every method fails with
/// [`NetError::Stopped`] once the loop has ended.
#[derive(Clone, Debug)]
pub struct NetHandle {
    tx: mpsc::Sender<Command>,
    local: PeerId,
    pipes: Arc<Pipes>,
}

impl NetHandle {
    pub(crate) fn new(tx: mpsc::Sender<Command>, local: PeerId, pipes: Arc<Pipes>) -> Self {
        NetHandle { tx, local, pipes }
    }

    /// This node's PeerId.
    pub fn local_peer_id(&self) -> PeerId {
        self.local
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NetError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    /// Addresses the node listens on.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NetError> {
        self.ask(Command::ListenAddrs).await
    }

    /// Addresses the node announces (in its signed peer record).
    pub async fn external_addrs(&self) -> Result<Vec<Multiaddr>, NetError> {
        self.ask(Command::ExternalAddrs).await
    }

    /// Dials `addr` and waits for the connection; returns the PeerId learnt in the
    /// handshake. A `/p2p/<id>` suffix must match.
    pub async fn connect(&self, addr: Multiaddr) -> Result<PeerId, NetError> {
        self.ask(|reply| Command::Connect { addr, reply }).await?
    }

    /// Peers with at least one open connection.
    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, NetError> {
        self.ask(Command::ConnectedPeers).await
    }

    /// Every verified peer (connected or persisted).
    pub async fn peers(&self) -> Result<Vec<PeerSummary>, NetError> {
        self.ask(Command::Peers).await
    }

    /// The peers in the Kademlia routing table.
    pub async fn routing_table(&self) -> Result<Vec<PeerId>, NetError> {
        self.ask(Command::RoutingTable).await
    }

    /// How dialling each `--peer` goes.
    pub async fn bootstraps(&self) -> Result<Vec<BootstrapStatus>, NetError> {
        self.ask(Command::Bootstraps).await
    }

    /// Announces that this node offers the capability with manifest `cid`: a provider
    /// record under this node's shard key (republished periodically) and a registration at
    /// every rendezvous point. Returns once the record is stored locally; announcements to
    /// the network proceed in the background and are repeated whenever the node (re)joins.
    pub async fn provide(&self, cid: Cid) -> Result<(), NetError> {
        self.ask(|reply| Command::Provide { cid, reply }).await?
    }

    /// Stops announcing `cid` (records at other peers lapse with their TTL).
    pub async fn stop_providing(&self, cid: Cid) -> Result<(), NetError> {
        self.ask(|reply| Command::StopProviding { cid, reply })
            .await
    }

    /// Finds the peers offering the capability with manifest `cid`: every provider shard
    /// in parallel through Kademlia, and every connected rendezvous point.
    pub async fn find_providers(
        &self,
        cid: Cid,
        opts: LookupOptions,
    ) -> Result<Vec<Provider>, NetError> {
        self.ask(|reply| Command::FindProviders { cid, opts, reply })
            .await
    }

    /// Registers the market service: inbound bid, lease, claim, verdict and blob requests are
    /// queued on the returned receiver, at most `capacity` at a time; past that they are
    /// answered "busy" at once. Replaces any earlier registration.
    pub async fn serve_market(&self, capacity: usize) -> Result<mpsc::Receiver<Inbound>, NetError> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        self.pipes.serve(tx.clone());
        let op: MarketOp = Box::new(move |_, rr| rr.serve(tx));
        self.tx
            .send(Command::Market(op))
            .await
            .map_err(|_| NetError::Stopped)?;
        Ok(rx)
    }

    /// Sends a request on market protocol `P` to `peer` and waits for the response; the
    /// protocol's timeout applies. A peer not connected is dialled at `addrs` and at the
    /// addresses of its known record.
    pub(crate) async fn request<P: Wired>(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: P::Request,
    ) -> Result<P::Response, RrError> {
        let (tx, rx) = oneshot::channel();
        let op: MarketOp = Box::new(move |swarm, rr| rr.send::<P>(swarm, peer, addrs, request, tx));
        self.tx
            .send(Command::MarketTo { peer, op })
            .await
            .map_err(|_| RrError::Stopped)?;
        rx.await.map_err(|_| RrError::Stopped)?
    }

    /// Sends a signed bid request on `/d402/bid/1`.
    pub async fn request_bid(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: <BidProto as RrProtocol>::Request,
    ) -> Result<<BidProto as RrProtocol>::Response, RrError> {
        self.request::<BidProto>(peer, addrs, request).await
    }

    /// Sends a signed lease on the pipe to `peer` (`/d402/lease-pipe/1`, see
    /// [`super::pipe`]), or on `/d402/lease/1` when the pipe cannot carry it.
    pub async fn request_lease(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: <LeaseProto as RrProtocol>::Request,
    ) -> Result<<LeaseProto as RrProtocol>::Response, RrError> {
        if let Some(answer) = self.pipes.request(peer, &request).await {
            return answer;
        }
        self.request::<LeaseProto>(peer, addrs, request).await
    }

    /// The node's pipes (tests drive them by hand).
    #[cfg(test)]
    pub(crate) fn pipes(&self) -> &Arc<Pipes> {
        &self.pipes
    }

    /// How many leases this node sent on pipes, and how many by request-response.
    pub fn lease_pipe_stats(&self) -> PipeStats {
        self.pipes.stats()
    }

    /// Sends a signed claim on `/d402/claim/1`.
    pub async fn request_claim(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: <ClaimProto as RrProtocol>::Request,
    ) -> Result<<ClaimProto as RrProtocol>::Response, RrError> {
        self.request::<ClaimProto>(peer, addrs, request).await
    }

    /// Asks a validator for a verdict on `/d402/verdict/1`.
    pub async fn request_verdict(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: <VerdictProto as RrProtocol>::Request,
    ) -> Result<<VerdictProto as RrProtocol>::Response, RrError> {
        self.request::<VerdictProto>(peer, addrs, request).await
    }

    /// Asks for a blob on `/d402/blob/1` (the caller checks the bytes against the CID).
    pub async fn request_blob(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: <BlobProto as RrProtocol>::Request,
    ) -> Result<<BlobProto as RrProtocol>::Response, RrError> {
        self.request::<BlobProto>(peer, addrs, request).await
    }

    /// Asks the event loop to stop. Returns when it has stopped accepting commands.
    pub async fn shutdown(&self) {
        let _ = self.ask(Command::Shutdown).await;
    }
}
