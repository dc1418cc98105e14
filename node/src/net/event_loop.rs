//! The one task that owns the swarm.
//!
//! It selects over swarm events, commands from [`NetHandle`](super::NetHandle)s, finished
//! database writes and a housekeeping tick. Nothing here blocks: database writes run on
//! tokio's blocking pool and their completion comes back as an event, after which the peer
//! is admitted (commit before acknowledge).
//!
//! The market issue adds one arm per request-response behaviour to
//! [`EventLoop::on_behaviour_event`] and its commands to [`Command`].

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use d402_protocol::Cid;
use futures::{FutureExt, StreamExt, future::BoxFuture, stream::FuturesUnordered};
use libp2p::{
    Multiaddr, PeerId, Swarm,
    core::{ConnectedPoint, PeerRecord, SignedEnvelope},
    identify,
    kad::{self, store::RecordStore},
    multiaddr::Protocol,
    rendezvous,
    swarm::{
        ConnectionId, SwarmEvent,
        dial_opts::{DialOpts, PeerCondition},
    },
};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, trace, warn};

use super::{
    AdvertiseHost, NetConfig, NetError, PeerSpec,
    backoff::Backoff,
    behaviour::{Behaviour, BehaviourEvent, PROTOCOL_VERSION},
    capability_key::{self, KEY_LEN},
    codec::{BidProto, BlobProto, ClaimProto, LeaseProto, VerdictProto},
    command::{BootstrapStatus, Command, LookupOptions, PeerSummary, Provider},
    market_rr::MarketRr,
    pipe::Pipes,
};
use crate::state::{KnownPeer, State, StateError};

/// How often housekeeping runs (redials, lookup deadlines, rendezvous refresh).
const TICK: Duration = Duration::from_millis(100);
/// Most addresses taken from one signed peer record.
const MAX_RECORD_ADDRS: usize = 16;
/// A lookup's rendezvous discovery asks for at most this many registrations.
const RENDEZVOUS_LIMIT: u64 = 200;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The addresses a peer may be reached at, taken only from its signed peer record, and
/// only when that record is signed by `peer` itself. Addresses naming another PeerId, or
/// unspecified / port-0 addresses, are dropped. `None` when there is no valid record.
pub fn verified_addresses(
    peer: &PeerId,
    record: Option<&SignedEnvelope>,
) -> Option<Vec<Multiaddr>> {
    let record = PeerRecord::from_signed_envelope(record?.clone()).ok()?;
    if record.peer_id() != *peer {
        return None;
    }
    Some(
        record
            .addresses()
            .iter()
            .filter(|a| usable_addr(a, peer))
            .take(MAX_RECORD_ADDRS)
            .cloned()
            .collect(),
    )
}

fn usable_addr(addr: &Multiaddr, peer: &PeerId) -> bool {
    addr.iter().all(|p| match p {
        Protocol::Ip4(ip) => !ip.is_unspecified(),
        Protocol::Ip6(ip) => !ip.is_unspecified(),
        Protocol::Tcp(port) | Protocol::Udp(port) => port != 0,
        Protocol::P2p(id) => id == *peer,
        _ => true,
    })
}

/// Why a peer is being dialled repeatedly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TargetKind {
    /// A `--peer`: retried forever with backoff.
    Bootstrap,
    /// A peer from the database: retried until `persisted_max_failures`.
    Persisted,
}

struct DialTarget {
    kind: TargetKind,
    input: String,
    addrs: Vec<Multiaddr>,
    peer: Option<PeerId>,
    attempt: Option<ConnectionId>,
    next_at: Option<Instant>,
    backoff: Backoff,
    connected: bool,
    last_error: Option<String>,
}

/// What the node knows about a verified peer.
#[derive(Debug, Clone)]
struct PeerView {
    addrs: Vec<Multiaddr>,
    protocols: Vec<String>,
    agent: String,
    kad_server: bool,
    rendezvous_point: bool,
    first_seen_ms: u64,
    last_seen_ms: u64,
    persisted_at: Option<Instant>,
    rtt: Option<Duration>,
}

impl PeerView {
    fn from_known(p: &KnownPeer) -> PeerView {
        PeerView {
            addrs: p.addrs.iter().filter_map(|a| a.parse().ok()).collect(),
            protocols: p.protocols.clone(),
            agent: p.agent.clone(),
            kad_server: p.kad_server,
            rendezvous_point: p.rendezvous_point,
            first_seen_ms: p.first_seen_ms,
            last_seen_ms: p.last_seen_ms,
            persisted_at: None,
            rtt: None,
        }
    }

    fn to_known(&self) -> KnownPeer {
        KnownPeer {
            addrs: self.addrs.iter().map(|a| a.to_string()).collect(),
            protocols: self.protocols.clone(),
            agent: self.agent.clone(),
            kad_server: self.kad_server,
            rendezvous_point: self.rendezvous_point,
            first_seen_ms: self.first_seen_ms,
            last_seen_ms: self.last_seen_ms,
        }
    }
}

struct Lookup {
    cid: Cid,
    limit: Option<usize>,
    deadline: Instant,
    queries: HashSet<kad::QueryId>,
    rendezvous_pending: HashSet<PeerId>,
    found: HashMap<PeerId, Provider>,
    reply: oneshot::Sender<Vec<Provider>>,
}

type PersistDone = (PeerId, PeerView, Result<(), StateError>);

/// The event loop's state. Built by [`super::start`].
pub(crate) struct EventLoop {
    /// Told which peers are connected (a pipe is opened only to those).
    pipes: Arc<Pipes>,
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    state: State,
    cfg: NetConfig,
    local: PeerId,
    port: u16,
    targets: Vec<DialTarget>,
    pending_connects: HashMap<ConnectionId, oneshot::Sender<Result<PeerId, NetError>>>,
    peers: HashMap<PeerId, PeerView>,
    persisting: FuturesUnordered<BoxFuture<'static, PersistDone>>,
    providing: HashMap<Cid, kad::RecordKey>,
    rendezvous_points: HashSet<PeerId>,
    /// (point, capability) → when to refresh the registration.
    registrations: HashMap<(PeerId, Cid), Instant>,
    lookups: HashMap<u64, Lookup>,
    next_lookup: u64,
    query_lookup: HashMap<kad::QueryId, u64>,
    /// Discover requests per rendezvous point: the one in flight first. Responses carry no
    /// request id, so one request per point is in flight at a time.
    rendezvous_queue: HashMap<PeerId, VecDeque<(Cid, u64)>>,
    last_kad_bootstrap: Option<Instant>,
    shutdown: Option<oneshot::Sender<()>>,
    market: MarketRr,
}

impl EventLoop {
    pub(crate) fn new(
        swarm: Swarm<Behaviour>,
        commands: mpsc::Receiver<Command>,
        cfg: NetConfig,
        state: State,
        port: u16,
        pipes: Arc<Pipes>,
    ) -> Result<EventLoop, NetError> {
        let local = *swarm.local_peer_id();
        let mut el = EventLoop {
            pipes,
            swarm,
            commands,
            state,
            local,
            port,
            targets: Vec::new(),
            pending_connects: HashMap::new(),
            peers: HashMap::new(),
            persisting: FuturesUnordered::new(),
            providing: HashMap::new(),
            rendezvous_points: HashSet::new(),
            registrations: HashMap::new(),
            lookups: HashMap::new(),
            next_lookup: 0,
            query_lookup: HashMap::new(),
            rendezvous_queue: HashMap::new(),
            last_kad_bootstrap: None,
            shutdown: None,
            market: MarketRr::default(),
            cfg,
        };
        if let Some(adv) = el.cfg.advertise.clone() {
            el.add_advertised(&adv);
        }
        for spec in el.cfg.bootstrap.clone() {
            el.add_bootstrap(spec);
        }
        el.load_persisted()?;
        Ok(el)
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(
            self.cfg.timings.backoff_initial,
            self.cfg.timings.backoff_max,
        )
    }

    fn add_advertised(&mut self, adv: &AdvertiseHost) {
        let mut tcp = Multiaddr::empty();
        tcp.push(adv.protocol());
        tcp.push(Protocol::Tcp(self.port));
        self.swarm.add_external_address(tcp);
        if self.cfg.quic {
            let mut quic = Multiaddr::empty();
            quic.push(adv.protocol());
            quic.push(Protocol::Udp(self.port));
            quic.push(Protocol::QuicV1);
            self.swarm.add_external_address(quic);
        }
    }

    fn add_bootstrap(&mut self, spec: PeerSpec) {
        let target = DialTarget {
            kind: TargetKind::Bootstrap,
            input: spec.input.clone(),
            addrs: vec![spec.addr.clone()],
            peer: spec.peer_id,
            attempt: None,
            next_at: Some(Instant::now()),
            backoff: self.backoff(),
            connected: false,
            last_error: None,
        };
        self.targets.push(target);
    }

    /// Loads verified peers from the database: their signed addresses go back into the
    /// routing table (for DHT servers) and the most recent are redialled.
    fn load_persisted(&mut self) -> Result<(), NetError> {
        let known = self.state.known_peers()?;
        let mut redial = 0;
        for (id, known) in known {
            let Ok(peer) = PeerId::from_bytes(&id) else {
                warn!("skipping a persisted peer with an invalid PeerId");
                continue;
            };
            if peer == self.local {
                continue;
            }
            let view = PeerView::from_known(&known);
            if view.addrs.is_empty() {
                continue;
            }
            if view.kad_server {
                for a in &view.addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer, a.clone());
                }
            }
            if redial < self.cfg.timings.persisted_redial
                && !self.targets.iter().any(|t| t.peer == Some(peer))
            {
                redial += 1;
                self.targets.push(DialTarget {
                    kind: TargetKind::Persisted,
                    input: peer.to_string(),
                    addrs: view.addrs.clone(),
                    peer: Some(peer),
                    attempt: None,
                    next_at: Some(Instant::now()),
                    backoff: self.backoff(),
                    connected: false,
                    last_error: None,
                });
            }
            self.peers.insert(peer, view);
        }
        if redial > 0 {
            info!(peers = redial, "redialling persisted peers");
        }
        Ok(())
    }

    /// Dials every target that is due (called once at start, then from the tick).
    pub(crate) fn start_dialling(&mut self) {
        self.dial_due(Instant::now());
    }

    fn dial_due(&mut self, now: Instant) {
        for i in 0..self.targets.len() {
            let t = &self.targets[i];
            if t.connected || t.attempt.is_some() || t.next_at.is_none_or(|at| at > now) {
                continue;
            }
            if let Some(p) = t.peer
                && self.swarm.is_connected(&p)
            {
                self.targets[i].connected = true;
                self.targets[i].next_at = None;
                continue;
            }
            let opts = match t.peer {
                Some(p) => DialOpts::peer_id(p)
                    .addresses(t.addrs.clone())
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build(),
                None => DialOpts::unknown_peer_id()
                    .address(t.addrs[0].clone())
                    .build(),
            };
            let id = opts.connection_id();
            match self.swarm.dial(opts) {
                Ok(()) => {
                    debug!(addr = %self.targets[i].input, "dialling");
                    self.targets[i].attempt = Some(id);
                    self.targets[i].next_at = None;
                }
                Err(e) => self.target_failed(i, e.to_string()),
            }
        }
    }

    fn target_failed(&mut self, i: usize, error: String) {
        let max = self.cfg.timings.persisted_max_failures;
        let t = &mut self.targets[i];
        t.attempt = None;
        t.connected = false;
        let delay = t.backoff.fail();
        t.last_error = Some(error.clone());
        match t.kind {
            TargetKind::Bootstrap => {
                warn!(addr = %t.input, %error, retry_in_ms = delay.as_millis() as u64, "bootstrap peer unreachable; will retry");
                t.next_at = Some(Instant::now() + delay);
            }
            TargetKind::Persisted if t.backoff.failures() < max => {
                debug!(peer = %t.input, %error, retry_in_ms = delay.as_millis() as u64, "persisted peer unreachable; will retry");
                t.next_at = Some(Instant::now() + delay);
            }
            TargetKind::Persisted => {
                debug!(peer = %t.input, %error, "persisted peer unreachable; giving up until restart");
                t.next_at = None;
            }
        }
    }

    /// Runs until shutdown or until every handle is dropped.
    pub(crate) async fn run(mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        info!(port = self.port, "network started");
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                Some(done) = self.persisting.next(), if !self.persisting.is_empty() => {
                    self.on_persisted(done)
                }
                Some(reply) = self.market.replies.next(), if !self.market.replies.is_empty() => {
                    reply(self.swarm.behaviour_mut())
                }
                _ = tick.tick() => self.on_tick(),
            }
            if self.shutdown.is_some() {
                break;
            }
        }
        // Let in-flight writes finish so that nothing acknowledged is lost.
        while let Some(done) = self.persisting.next().await {
            if let (peer, _, Err(e)) = done {
                warn!(%peer, error = %e, "could not persist peer during shutdown");
            }
        }
        for (_, lookup) in self.lookups.drain() {
            let _ = lookup.reply.send(lookup.found.into_values().collect());
        }
        info!("network stopped");
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        self.dial_due(now);
        let expired: Vec<u64> = self
            .lookups
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.finish_lookup(id);
        }
        let due: Vec<(PeerId, Cid)> = self
            .registrations
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(k, _)| *k)
            .collect();
        for (point, cid) in due {
            self.register_at(point, cid);
        }
    }

    // ---- commands ----

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::ListenAddrs(reply) => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::ExternalAddrs(reply) => {
                let _ = reply.send(self.swarm.external_addresses().cloned().collect());
            }
            Command::Connect { addr, reply } => {
                let mut addr = addr;
                let opts = match addr.iter().last() {
                    Some(Protocol::P2p(id)) => {
                        addr.pop();
                        DialOpts::peer_id(id).addresses(vec![addr.clone()]).build()
                    }
                    _ => DialOpts::unknown_peer_id().address(addr.clone()).build(),
                };
                let id = opts.connection_id();
                match self.swarm.dial(opts) {
                    Ok(()) => {
                        self.pending_connects.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(NetError::Dial {
                            target: addr.to_string(),
                            reason: e.to_string(),
                        }));
                    }
                }
            }
            Command::ConnectedPeers(reply) => {
                let _ = reply.send(self.swarm.connected_peers().cloned().collect());
            }
            Command::Peers(reply) => {
                let table = self.routing_table();
                let mut out: Vec<PeerSummary> = self
                    .peers
                    .iter()
                    .map(|(p, v)| PeerSummary {
                        peer_id: *p,
                        addrs: v.addrs.clone(),
                        protocols: v.protocols.clone(),
                        connected: self.swarm.is_connected(p),
                        in_routing_table: table.contains(p),
                        last_seen_ms: v.last_seen_ms,
                        rtt_us: v.rtt.map(|d| d.as_micros() as u64),
                    })
                    .collect();
                out.sort_by_key(|a| std::cmp::Reverse(a.last_seen_ms));
                let _ = reply.send(out);
            }
            Command::RoutingTable(reply) => {
                let _ = reply.send(self.routing_table().into_iter().collect());
            }
            Command::Bootstraps(reply) => {
                let out = self
                    .targets
                    .iter()
                    .filter(|t| t.kind == TargetKind::Bootstrap)
                    .map(|t| BootstrapStatus {
                        input: t.input.clone(),
                        addr: t.addrs[0].to_string(),
                        peer_id: t.peer.map(|p| p.to_string()),
                        connected: t.connected,
                        failures: t.backoff.failures(),
                        last_error: t.last_error.clone(),
                    })
                    .collect();
                let _ = reply.send(out);
            }
            Command::Provide { cid, reply } => {
                let _ = reply.send(self.provide(cid));
            }
            Command::StopProviding { cid, reply } => {
                if let Some(key) = self.providing.remove(&cid) {
                    self.swarm.behaviour_mut().kad.stop_providing(&key);
                }
                let points: Vec<PeerId> = self.rendezvous_points.iter().copied().collect();
                for point in points {
                    if self.registrations.remove(&(point, cid)).is_some()
                        && let Some(client) = self.swarm.behaviour_mut().rendezvous_client.as_mut()
                    {
                        client.unregister(capability_key::namespace(&cid), point);
                    }
                }
                let _ = reply.send(());
            }
            Command::FindProviders { cid, opts, reply } => self.find_providers(cid, opts, reply),
            Command::Market(op) => op(&mut self.swarm, &mut self.market),
            Command::MarketTo { peer, op } => {
                if !self.swarm.is_connected(&peer)
                    && let Some(v) = self.peers.get(&peer)
                {
                    for a in v.addrs.clone() {
                        self.swarm.add_peer_address(peer, a);
                    }
                }
                op(&mut self.swarm, &mut self.market)
            }
            Command::Shutdown(reply) => self.shutdown = Some(reply),
        }
    }

    fn routing_table(&mut self) -> HashSet<PeerId> {
        let mut out = HashSet::new();
        for bucket in self.swarm.behaviour_mut().kad.kbuckets() {
            for entry in bucket.iter() {
                out.insert(*entry.node.key.preimage());
            }
        }
        out
    }

    fn routing_table_len(&mut self) -> usize {
        self.swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .map(|b| b.num_entries())
            .sum()
    }

    // ---- capability rendezvous ----

    fn provide(&mut self, cid: Cid) -> Result<(), NetError> {
        let key = capability_key::provider_key(&cid, capability_key::shard_of(&self.local));
        self.swarm
            .behaviour_mut()
            .kad
            .start_providing(key.clone())
            .map_err(|e| NetError::Provide(e.to_string()))?;
        info!(capability = %cid, "announcing capability");
        self.providing.insert(cid, key);
        let points: Vec<PeerId> = self.rendezvous_points.iter().copied().collect();
        for point in points {
            self.register_at(point, cid);
        }
        Ok(())
    }

    /// Re-announces every provider record now (after joining or rejoining the DHT).
    fn republish(&mut self) {
        let keys: Vec<kad::RecordKey> = self.providing.values().cloned().collect();
        for key in keys {
            if let Err(e) = self.swarm.behaviour_mut().kad.start_providing(key) {
                warn!(error = %e, "cannot republish provider record");
            }
        }
    }

    fn register_at(&mut self, point: PeerId, cid: Cid) {
        if !self.providing.contains_key(&cid) || !self.swarm.is_connected(&point) {
            self.registrations.remove(&(point, cid));
            return;
        }
        let ttl = self.cfg.timings.rendezvous_ttl_secs;
        let Some(client) = self.swarm.behaviour_mut().rendezvous_client.as_mut() else {
            return;
        };
        match client.register(capability_key::namespace(&cid), point, Some(ttl)) {
            Ok(()) => {
                // Refreshed at half the TTL once confirmed; retried in 30 s if no answer.
                self.registrations
                    .insert((point, cid), Instant::now() + Duration::from_secs(30));
            }
            Err(e) => {
                debug!(%point, error = %e, "cannot register at rendezvous point yet");
                self.registrations
                    .insert((point, cid), Instant::now() + Duration::from_secs(5));
            }
        }
    }

    fn find_providers(
        &mut self,
        cid: Cid,
        opts: LookupOptions,
        reply: oneshot::Sender<Vec<Provider>>,
    ) {
        let id = self.next_lookup;
        self.next_lookup += 1;
        let mut lookup = Lookup {
            cid,
            limit: opts.limit,
            deadline: Instant::now() + opts.timeout,
            queries: HashSet::new(),
            rendezvous_pending: HashSet::new(),
            found: HashMap::new(),
            reply,
        };
        for key in capability_key::all_provider_keys(&cid) {
            let q = self.swarm.behaviour_mut().kad.get_providers(key);
            self.query_lookup.insert(q, id);
            lookup.queries.insert(q);
        }
        if self.swarm.behaviour().rendezvous_client.is_enabled() {
            let points: Vec<PeerId> = self
                .rendezvous_points
                .iter()
                .filter(|p| self.swarm.is_connected(p))
                .copied()
                .collect();
            for point in points {
                lookup.rendezvous_pending.insert(point);
                let queue = self.rendezvous_queue.entry(point).or_default();
                queue.push_back((cid, id));
                if queue.len() == 1 {
                    self.send_discover(point);
                }
            }
        }
        debug!(capability = %cid, lookup = id, "capability lookup started");
        self.lookups.insert(id, lookup);
    }

    fn send_discover(&mut self, point: PeerId) {
        let Some(&(cid, _)) = self.rendezvous_queue.get(&point).and_then(|q| q.front()) else {
            return;
        };
        if let Some(client) = self.swarm.behaviour_mut().rendezvous_client.as_mut() {
            client.discover(
                Some(capability_key::namespace(&cid)),
                None,
                Some(RENDEZVOUS_LIMIT),
                point,
            );
        }
    }

    /// The discover request in flight at `point` has been answered.
    fn discover_done(&mut self, point: PeerId) -> Option<(Cid, u64)> {
        let queue = self.rendezvous_queue.get_mut(&point)?;
        let head = queue.pop_front();
        if queue.is_empty() {
            self.rendezvous_queue.remove(&point);
        } else {
            self.send_discover(point);
        }
        let (cid, id) = head?;
        if let Some(l) = self.lookups.get_mut(&id) {
            l.rendezvous_pending.remove(&point);
        }
        self.maybe_finish(id);
        Some((cid, id))
    }

    fn add_found(&mut self, id: u64, peer: PeerId, addrs: Vec<Multiaddr>, via_kad: bool) {
        if peer == self.local {
            return;
        }
        let known = self
            .peers
            .get(&peer)
            .map(|v| v.addrs.clone())
            .unwrap_or_default();
        let Some(l) = self.lookups.get_mut(&id) else {
            return;
        };
        let entry = l.found.entry(peer).or_insert_with(|| Provider {
            peer_id: peer,
            addrs: known,
            via_kad: false,
            via_rendezvous: false,
        });
        if via_kad {
            entry.via_kad = true;
        } else {
            entry.via_rendezvous = true;
        }
        for a in addrs {
            if !entry.addrs.contains(&a) {
                entry.addrs.push(a);
            }
        }
        if l.limit.is_some_and(|n| l.found.len() >= n) {
            self.finish_lookup(id);
        }
    }

    fn maybe_finish(&mut self, id: u64) {
        if self
            .lookups
            .get(&id)
            .is_some_and(|l| l.queries.is_empty() && l.rendezvous_pending.is_empty())
        {
            self.finish_lookup(id);
        }
    }

    fn finish_lookup(&mut self, id: u64) {
        let Some(l) = self.lookups.remove(&id) else {
            return;
        };
        for q in &l.queries {
            self.query_lookup.remove(q);
            if let Some(mut query) = self.swarm.behaviour_mut().kad.query_mut(q) {
                query.finish();
            }
        }
        let mut found: Vec<Provider> = l.found.into_values().collect();
        for p in &mut found {
            if p.addrs.is_empty()
                && let Some(v) = self.peers.get(&p.peer_id)
            {
                p.addrs = v.addrs.clone();
            }
        }
        found.sort_by_key(|p| p.peer_id);
        debug!(
            capability = %l.cid,
            lookup = id,
            providers = found.len(),
            unfinished_queries = l.queries.len(),
            unanswered_rendezvous = l.rendezvous_pending.len(),
            "capability lookup finished"
        );
        let _ = l.reply.send(found);
    }

    // ---- swarm events ----

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(ev) => self.on_behaviour_event(ev),
            SwarmEvent::NewListenAddr { address, .. } => self.on_new_listen_addr(address),
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.swarm.remove_external_address(&address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), n = num_established.get(), "connected");
                self.pipes.set_connected(peer_id, true);
                if let Some(reply) = self.pending_connects.remove(&connection_id) {
                    let _ = reply.send(Ok(peer_id));
                }
                for t in &mut self.targets {
                    if t.attempt == Some(connection_id)
                        || (t.peer == Some(peer_id) && t.kind == TargetKind::Persisted)
                    {
                        if t.kind == TargetKind::Bootstrap && t.peer.is_none() {
                            info!(addr = %t.input, peer = %peer_id, "connected to bootstrap peer");
                        }
                        t.peer = Some(peer_id);
                        t.attempt = None;
                        t.connected = true;
                        t.next_at = None;
                        t.last_error = None;
                        t.backoff.reset();
                    } else if t.peer == Some(peer_id) {
                        t.connected = true;
                        t.next_at = None;
                    }
                }
                if let ConnectedPoint::Dialer { .. } = endpoint {
                    trace!(peer = %peer_id, "outbound connection");
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                cause,
                ..
            } => {
                debug!(peer = %peer_id, cause = ?cause, "connection closed");
                if num_established == 0 {
                    self.pipes.set_connected(peer_id, false);
                    let initial = self.cfg.timings.backoff_initial;
                    for t in &mut self.targets {
                        if t.peer == Some(peer_id) && t.connected {
                            t.connected = false;
                            // Keep bootstrap paths up; persisted peers are not chased once
                            // they were reached.
                            if t.kind == TargetKind::Bootstrap {
                                t.next_at = Some(Instant::now() + initial);
                            }
                        }
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                if let Some(reply) = self.pending_connects.remove(&connection_id) {
                    let _ = reply.send(Err(NetError::Dial {
                        target: peer_id.map(|p| p.to_string()).unwrap_or_default(),
                        reason: error.to_string(),
                    }));
                }
                if let Some(i) = self
                    .targets
                    .iter()
                    .position(|t| t.attempt == Some(connection_id))
                {
                    self.target_failed(i, error.to_string());
                } else {
                    debug!(peer = ?peer_id, %error, "dial failed");
                }
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                debug!(addr = %send_back_addr, %error, "inbound connection failed");
            }
            SwarmEvent::ListenerError { error, .. } => warn!(%error, "listener error"),
            _ => {}
        }
    }

    /// A listener came up: announce it unless `--advertise-host` replaces it.
    pub(crate) fn on_new_listen_addr(&mut self, address: Multiaddr) {
        info!(%address, "listening");
        if self.cfg.advertise.is_none() && self.announce_listen_addr(&address) {
            self.swarm.add_external_address(address);
        }
    }

    /// Without `--advertise-host`: announce a specific listen address as is; on a wildcard
    /// listener, announce the non-loopback interface addresses (all of them when loopback is
    /// the only interface).
    fn announce_listen_addr(&self, address: &Multiaddr) -> bool {
        if !self.cfg.listen_ip.is_unspecified() {
            return true;
        }
        let loopback = address.iter().any(|p| match p {
            Protocol::Ip4(ip) => ip.is_loopback(),
            Protocol::Ip6(ip) => ip.is_loopback(),
            _ => false,
        });
        !loopback
            || self.swarm.listeners().all(|a| {
                a.iter().any(|p| match p {
                    Protocol::Ip4(ip) => ip.is_loopback(),
                    Protocol::Ip6(ip) => ip.is_loopback(),
                    _ => false,
                })
            })
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        // What a peer said it speaks (identify), to name a refused protocol as such.
        let peers = &self.peers;
        let advertises = |peer: &PeerId, protocol: &str| {
            peers
                .get(peer)
                .map(|v| v.protocols.iter().any(|p| p == protocol))
        };
        match event {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                self.on_identified(peer_id, info)
            }
            BehaviourEvent::Identify(identify::Event::Error { peer_id, error, .. }) => {
                debug!(peer = %peer_id, %error, "identify failed");
            }
            BehaviourEvent::Identify(_) => {}
            BehaviourEvent::Ping(ev) => {
                if let Ok(rtt) = ev.result
                    && let Some(v) = self.peers.get_mut(&ev.peer)
                {
                    v.rtt = Some(rtt);
                }
            }
            BehaviourEvent::Kad(ev) => self.on_kad_event(ev),
            BehaviourEvent::RendezvousClient(ev) => self.on_rendezvous_client(ev),
            BehaviourEvent::RendezvousServer(ev) => {
                debug!(event = ?ev, "rendezvous point");
            }
            BehaviourEvent::Limits(never) => match never {},
            BehaviourEvent::Pipe(()) => {}
            BehaviourEvent::Bid(ev) => {
                self.market
                    .on_event::<BidProto>(&mut self.swarm, ev, advertises)
            }
            BehaviourEvent::Lease(ev) => {
                self.market
                    .on_event::<LeaseProto>(&mut self.swarm, ev, advertises)
            }
            BehaviourEvent::Claim(ev) => {
                self.market
                    .on_event::<ClaimProto>(&mut self.swarm, ev, advertises)
            }
            BehaviourEvent::Verdict(ev) => {
                self.market
                    .on_event::<VerdictProto>(&mut self.swarm, ev, advertises)
            }
            BehaviourEvent::Blob(ev) => {
                self.market
                    .on_event::<BlobProto>(&mut self.swarm, ev, advertises)
            }
        }
    }

    /// identify finished: admit the peer if its signed record is its own.
    fn on_identified(&mut self, peer: PeerId, info: identify::Info) {
        if info.protocol_version != PROTOCOL_VERSION {
            debug!(peer = %peer, version = %info.protocol_version, "not a d402 peer; ignored");
            return;
        }
        let Some(addrs) = verified_addresses(&peer, info.signed_peer_record.as_ref()) else {
            warn!(peer = %peer, "peer sent no valid signed peer record of its own; not admitted");
            return;
        };
        let protocols: Vec<String> = info.protocols.iter().map(|p| p.to_string()).collect();
        let kad_server = protocols
            .iter()
            .any(|p| p == d402_protocol::protocol_ids::KAD);
        let rendezvous_point = protocols
            .iter()
            .any(|p| p.as_str() == rendezvous::PROTOCOL_NAME.as_ref());
        let now = now_ms();
        let refresh = self.cfg.timings.persist_refresh;
        let previous = self.peers.get(&peer);
        let mut view = PeerView {
            addrs,
            protocols,
            agent: info.agent_version,
            kad_server,
            rendezvous_point,
            first_seen_ms: previous.map(|p| p.first_seen_ms).unwrap_or(now),
            last_seen_ms: now,
            persisted_at: previous.and_then(|p| p.persisted_at),
            rtt: previous.and_then(|p| p.rtt),
        };
        let unchanged = previous.is_some_and(|p| {
            p.addrs == view.addrs
                && p.protocols == view.protocols
                && p.persisted_at.is_some_and(|at| at.elapsed() < refresh)
        });
        if unchanged {
            // Already committed recently; admit without another write.
            self.admit(peer, view);
            return;
        }
        view.persisted_at = Some(Instant::now());
        let state = self.state.clone();
        let row = view.to_known();
        let id = peer.to_bytes();
        self.persisting.push(
            tokio::task::spawn_blocking(move || state.upsert_peer(&id, &row))
                .map(move |r| {
                    let r = r.unwrap_or_else(|e| {
                        Err(StateError::Dir {
                            path: Default::default(),
                            reason: format!("persist task failed: {e}"),
                        })
                    });
                    (peer, view, r)
                })
                .boxed(),
        );
    }

    fn on_persisted(&mut self, (peer, view, result): PersistDone) {
        match result {
            Ok(()) => self.admit(peer, view),
            Err(e) => warn!(peer = %peer, error = %e, "cannot persist peer; not admitted"),
        }
    }

    /// The peer's record is committed: put it in the routing table and use it.
    fn admit(&mut self, peer: PeerId, view: PeerView) {
        let was_empty = self.routing_table_len() == 0;
        let is_bootstrap = self
            .targets
            .iter()
            .any(|t| t.kind == TargetKind::Bootstrap && t.peer == Some(peer));
        let kad_server = view.kad_server;
        let point = view.rendezvous_point;
        if kad_server {
            for a in &view.addrs {
                self.swarm.behaviour_mut().kad.add_address(&peer, a.clone());
            }
        }
        let new_point = point && self.rendezvous_points.insert(peer);
        debug!(peer = %peer, kad_server, rendezvous_point = point, addrs = view.addrs.len(), "peer admitted");
        self.peers.insert(peer, view);
        if kad_server && (was_empty || is_bootstrap) {
            self.kad_bootstrap();
            if was_empty {
                self.republish();
            }
        }
        if new_point && self.swarm.behaviour().rendezvous_client.is_enabled() {
            let cids: Vec<Cid> = self.providing.keys().copied().collect();
            for cid in cids {
                self.register_at(peer, cid);
            }
        }
    }

    fn kad_bootstrap(&mut self) {
        if self
            .last_kad_bootstrap
            .is_some_and(|at| at.elapsed() < Duration::from_secs(2))
        {
            return;
        }
        self.last_kad_bootstrap = Some(Instant::now());
        if let Err(e) = self.swarm.behaviour_mut().kad.bootstrap() {
            debug!(error = %e, "kademlia bootstrap not possible yet");
        }
    }

    fn on_kad_event(&mut self, event: kad::Event) {
        match event {
            kad::Event::OutboundQueryProgressed {
                id,
                result,
                step,
                stats,
            } => match result {
                kad::QueryResult::GetProviders(r) => {
                    let lookup = self.query_lookup.get(&id).copied();
                    match r {
                        Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => {
                            for p in providers {
                                if p != self.local && !self.swarm.is_connected(&p) {
                                    // The query still holds the addresses the provider
                                    // record came with; dial now so identify verifies them.
                                    let _ = self.swarm.dial(
                                        DialOpts::peer_id(p)
                                            .condition(PeerCondition::DisconnectedAndNotDialing)
                                            .build(),
                                    );
                                }
                                if let Some(l) = lookup {
                                    self.add_found(l, p, Vec::new(), true);
                                }
                            }
                        }
                        Ok(kad::GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) => {}
                        Err(e) => debug!(error = %e, "provider query ended with an error"),
                    }
                    if step.last {
                        debug!(
                            query = ?id,
                            requests = stats.num_requests(),
                            successes = stats.num_successes(),
                            failures = stats.num_failures(),
                            ms = stats.duration().map(|d| d.as_millis() as u64),
                            "provider query done"
                        );
                        self.query_lookup.remove(&id);
                        if let Some(l) = lookup
                            && let Some(lk) = self.lookups.get_mut(&l)
                        {
                            lk.queries.remove(&id);
                            self.maybe_finish(l);
                        }
                    }
                }
                kad::QueryResult::StartProviding(r) | kad::QueryResult::RepublishProvider(r) => {
                    match r {
                        Ok(ok) => trace!(key = ?ok.key, "provider record announced"),
                        Err(e) => debug!(error = %e, "provider announcement incomplete"),
                    }
                }
                kad::QueryResult::Bootstrap(r) => match r {
                    Ok(ok) if ok.num_remaining == 0 => debug!("kademlia bootstrap done"),
                    Ok(_) => {}
                    Err(e) => debug!(error = %e, "kademlia bootstrap incomplete"),
                },
                other => trace!(result = ?other, "kademlia query progressed"),
            },
            kad::Event::InboundRequest { request } => {
                if let kad::InboundRequest::AddProvider {
                    record: Some(record),
                } = request
                {
                    // kad has checked that the record's provider is the sender. Store only
                    // capability keys; d402 uses no other provider records.
                    if record.key.as_ref().len() == KEY_LEN {
                        if let Err(e) = self
                            .swarm
                            .behaviour_mut()
                            .kad
                            .store_mut()
                            .add_provider(record)
                        {
                            debug!(error = %e, "provider record not stored");
                        }
                    } else {
                        debug!("ignored a provider record under a non-capability key");
                    }
                }
            }
            kad::Event::RoutingUpdated {
                peer, is_new_peer, ..
            } => {
                if is_new_peer {
                    trace!(peer = %peer, "routing table updated");
                }
            }
            other => trace!(event = ?other, "kademlia"),
        }
    }

    fn on_rendezvous_client(&mut self, event: rendezvous::client::Event) {
        use rendezvous::client::Event as E;
        match event {
            E::Registered {
                rendezvous_node,
                ttl,
                namespace,
            } => {
                if let Some(cid) = capability_key::cid_of_namespace(&namespace) {
                    debug!(point = %rendezvous_node, capability = %cid, ttl, "registered at rendezvous point");
                    self.registrations.insert(
                        (rendezvous_node, cid),
                        Instant::now() + Duration::from_secs(ttl.max(2) / 2),
                    );
                }
            }
            E::RegisterFailed {
                rendezvous_node,
                namespace,
                error,
            } => {
                warn!(point = %rendezvous_node, %namespace, ?error, "rendezvous registration refused");
            }
            E::Discovered {
                rendezvous_node,
                registrations,
                ..
            } => {
                if let Some((cid, id)) = self.discover_done(rendezvous_node) {
                    // The registration set belongs to the answered request; still check the
                    // namespace of each, and use only addresses from the signed record.
                    for reg in registrations {
                        if capability_key::cid_of_namespace(&reg.namespace) != Some(cid) {
                            continue;
                        }
                        let peer = reg.record.peer_id();
                        let addrs: Vec<Multiaddr> = reg
                            .record
                            .addresses()
                            .iter()
                            .filter(|a| usable_addr(a, &peer))
                            .take(MAX_RECORD_ADDRS)
                            .cloned()
                            .collect();
                        if peer != self.local && !self.swarm.is_connected(&peer) {
                            let _ = self.swarm.dial(
                                DialOpts::peer_id(peer)
                                    .addresses(addrs.clone())
                                    .condition(PeerCondition::DisconnectedAndNotDialing)
                                    .build(),
                            );
                        }
                        if self.lookups.contains_key(&id) {
                            self.add_found(id, peer, addrs, false);
                        }
                    }
                }
            }
            E::DiscoverFailed {
                rendezvous_node,
                error,
                ..
            } => {
                debug!(point = %rendezvous_node, ?error, "rendezvous discovery failed");
                self.discover_done(rendezvous_node);
            }
            E::Expired { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use libp2p::identity::Keypair;

    use super::*;
    use crate::net::quic_addr;

    fn record(key: &Keypair, addrs: Vec<Multiaddr>) -> SignedEnvelope {
        PeerRecord::new(key, addrs).unwrap().into_signed_envelope()
    }

    #[test]
    fn own_signed_record_is_accepted() {
        let k = Keypair::generate_ed25519();
        let p = k.public().to_peer_id();
        let a: Multiaddr = "/ip4/127.0.0.1/tcp/9000".parse().unwrap();
        let env = record(&k, vec![a.clone()]);
        assert_eq!(verified_addresses(&p, Some(&env)), Some(vec![a]));
    }

    #[test]
    fn record_signed_by_another_peer_is_refused() {
        let k = Keypair::generate_ed25519();
        let other = Keypair::generate_ed25519().public().to_peer_id();
        let env = record(&k, vec!["/ip4/127.0.0.1/tcp/9000".parse().unwrap()]);
        assert_eq!(verified_addresses(&other, Some(&env)), None);
        assert_eq!(verified_addresses(&other, None), None);
    }

    #[test]
    fn unusable_addresses_are_dropped() {
        let k = Keypair::generate_ed25519();
        let p = k.public().to_peer_id();
        let other = PeerId::random();
        let env = record(
            &k,
            vec![
                "/ip4/0.0.0.0/tcp/9000".parse().unwrap(),
                "/ip4/10.0.0.1/tcp/0".parse().unwrap(),
                format!("/ip4/10.0.0.1/tcp/1/p2p/{other}").parse().unwrap(),
                format!("/ip4/10.0.0.1/tcp/2/p2p/{p}").parse().unwrap(),
            ],
        );
        let got = verified_addresses(&p, Some(&env)).unwrap();
        assert_eq!(got.len(), 1);
        assert!(got[0].to_string().contains("/tcp/2/"));
    }

    #[test]
    fn tampered_record_is_refused() {
        let k = Keypair::generate_ed25519();
        let p = k.public().to_peer_id();
        let env = record(&k, vec!["/ip4/127.0.0.1/tcp/9000".parse().unwrap()]);
        let mut bytes = env.into_protobuf_encoding();
        let n = bytes.len();
        bytes[n - 10] ^= 0x01;
        if let Ok(bad) = SignedEnvelope::from_protobuf_encoding(&bytes) {
            assert_eq!(verified_addresses(&p, Some(&bad)), None);
        }
    }

    #[test]
    fn quic_addr_shape() {
        assert_eq!(
            quic_addr("127.0.0.1".parse().unwrap(), 9).to_string(),
            "/ip4/127.0.0.1/udp/9/quic-v1"
        );
    }
}
