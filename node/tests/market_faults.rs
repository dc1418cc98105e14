//! The market under faults, on loopback with real nodes (libp2p, wasmtime, redb): a lying
//! worker, a worker killed mid-lease, a gateway restarted mid-task, refused messages, and
//! quorum over a live page that changes on every load.

#![allow(clippy::unwrap_used)]

mod market_support;

use std::time::Duration;

use d402_node::market::{
    coordinator::CoordinatorConfig,
    now_ms,
    reputation::Policy,
    tasks::{ClaimJudgement, LeaseStatus, Phase},
};
use d402_protocol::{Cid, Signed, SigningKey, TaskId, messages::Claim};
use market_support::*;

/// 2 honest workers and 1 that corrupts its output, fanout 3, quorum 2. Each task is
/// accepted with the honest output and the liar's claim is rejected; its score drops with
/// each rejection; after the policy's 3 consecutive rejections it is banned, and the next
/// task does not lease it.
///
/// `min_score` is 0 here: with the default minimum the liar's score (200 000 ppm after one
/// rejection) already keeps it out of the second task, before any ban.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liar_is_rejected_loses_reputation_and_is_banned() {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let offer = echo_offer(10);
    let mut workers = Vec::new();
    for (i, d) in dirs[1..].iter().enumerate() {
        let mut cfg = worker_cfg(&offer, i);
        cfg.faults.corrupt_output = i == 2;
        workers.push(start_worker(d.path(), cfg).await);
    }
    let liar = workers[2].key();
    let policy = Policy {
        min_score: 0,
        ..Policy::default()
    };
    assert_eq!(policy.ban_after, 3, "the default ban threshold");
    let gw = start_gateway(dirs[0].path(), seed(), 0, coordinator_config(), policy).await;
    for w in &workers {
        gw.net.connect(w.addr.clone()).await.unwrap();
    }
    let coord = gw.coordinator.clone().unwrap();
    let mut last_score = coord.reputation().get(&liar).unwrap().score();
    for round in 1..=3u64 {
        let spec = task(&offer, format!(r#"{{"n":{round}}}"#).as_bytes(), 3, 2);
        // The liar's claim is judged too (on arrival when it lands after the decision).
        let rec = run_accepted(&coord, spec, 3).await;
        let accepted = rec.accepted_output.unwrap();
        for c in &rec.claims {
            if c.claim.signer.0 == liar {
                assert_ne!(c.claim.body.output_cid, accepted);
                assert_eq!(c.judgement, ClaimJudgement::Rejected, "round {round}");
            } else {
                assert_eq!(c.claim.body.output_cid, accepted);
                assert_eq!(c.judgement, ClaimJudgement::Accepted, "round {round}");
            }
        }
        let r = eventually("the liar's rejection recorded", || {
            let c = coord.clone();
            async move {
                let r = c.reputation().get(&liar).unwrap();
                (r.rejected == round).then_some(r)
            }
        })
        .await;
        assert_eq!(r.accepted, 0);
        assert!(
            r.score() < last_score,
            "round {round}: score {} did not drop from {last_score}",
            r.score()
        );
        last_score = r.score();
        if round < 3 {
            assert_eq!(r.banned_until, 0, "not banned before the threshold");
        }
    }
    let r = coord.reputation().get(&liar).unwrap();
    assert_eq!(r.bans, 1);
    assert!(r.banned_at(now_ms()), "{r:?}");
    for w in &workers[..2] {
        let h = coord.reputation().get(&w.key()).unwrap();
        assert_eq!((h.rejected, h.bans), (0, 0));
    }
    let leases_before = workers[2].worker.as_ref().unwrap().leases_accepted();
    assert_eq!(leases_before, 3);

    // The banned liar still bids, but is not leased.
    let spec = task(&offer, br#"{"n":4}"#, 3, 2);
    let id = spec.task_id;
    run_accepted(&coord, spec, 2).await;
    // Let any stray lease land before looking.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rec = coord.tasks().get(&id).unwrap().unwrap();
    assert!(
        rec.leases.iter().all(|l| l.lease.body.worker.0 != liar),
        "the banned worker was leased"
    );
    assert_eq!(rec.leases.len(), 2);
    let passed: Vec<_> = rec
        .passed
        .iter()
        .filter(|p| p.peer == workers[2].peer().to_bytes())
        .collect();
    assert_eq!(passed.len(), 1, "{:?}", rec.passed);
    assert!(passed[0].reason.starts_with("banned"), "{:?}", passed[0]);
    assert_eq!(
        workers[2].worker.as_ref().unwrap().leases_accepted(),
        leases_before
    );
    for w in workers {
        w.stop().await;
    }
    gw.stop().await;
}

/// The primary worker accepts its lease and its node is shut down before it claims: the
/// lease times out, is reassigned to the next bidder, the task is accepted before its
/// deadline, and the dead worker is charged a timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_lease_is_reassigned_and_task_completes() {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let honest = echo_offer(10);
    // The victim asks less, so it ranks first and is leased first (the primary). It holds
    // its claim back long enough to be killed with the lease accepted and unclaimed.
    let cheap = d402_node::market::worker::OfferedCapability {
        floor: 5,
        ..honest.clone()
    };
    let mut cfg = worker_cfg(&cheap, 0);
    cfg.faults.claim_delay = Duration::from_secs(120);
    // Acknowledges at once, so that the gateway holds an accepted lease when it dies.
    cfg.inline_claim_window = Duration::ZERO;
    let victim = start_worker(dirs[1].path(), cfg).await;
    let mut others = Vec::new();
    for (i, d) in dirs[2..].iter().enumerate() {
        others.push(start_worker(d.path(), worker_cfg(&honest, i + 1)).await);
    }
    let cfg = CoordinatorConfig {
        lease_timeout: Duration::from_secs(6),
        ..coordinator_config()
    };
    let gw = start_gateway(dirs[0].path(), seed(), 0, cfg, Policy::default()).await;
    gw.net.connect(victim.addr.clone()).await.unwrap();
    for w in &others {
        gw.net.connect(w.addr.clone()).await.unwrap();
    }
    let coord = gw.coordinator.clone().unwrap();
    let spec = task(&honest, br#"{"n":"killed"}"#, 2, 2);
    let (id, deadline) = (spec.task_id, spec.deadline);
    let run = tokio::spawn({
        let c = coord.clone();
        async move { c.run_task(spec).await }
    });
    let vw = victim.worker.clone().unwrap();
    eventually("the victim accepts its lease", || {
        let vw = vw.clone();
        async move { (vw.leases_accepted() == 1).then_some(()) }
    })
    .await;
    // The acknowledgement leaves just after the count; on a loaded machine (8 tests of this
    // file at once on two cores) it can trail by many milliseconds, and a worker stopped
    // before it left has refused, not accepted, as far as the gateway knows.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let victim_key = victim.key();
    victim.stop().await;

    let done = tokio::time::timeout(TIMEOUT, run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(done.phase, Phase::Accepted, "{done:?}");
    assert!(done.updated_at < deadline, "accepted after the deadline");
    let first = &done.leases[0];
    assert_eq!(
        first.lease.body.worker.0, victim_key,
        "the victim was the primary"
    );
    assert_eq!(first.status, LeaseStatus::Expired);
    let replacements: Vec<_> = done.leases[1..]
        .iter()
        .map(|l| l.lease.body.worker.0)
        .collect();
    assert!(replacements.len() >= 2, "{replacements:?}");
    assert!(!replacements.contains(&victim_key));
    assert!(done.claims.iter().all(|c| c.claim.signer.0 != victim_key));
    let r = eventually("the timeout recorded", || {
        let c = coord.clone();
        async move {
            let r = c.reputation().get(&victim_key).unwrap();
            (r.timed_out > 0).then_some(r)
        }
    })
    .await;
    assert_eq!((r.timed_out, r.accepted, r.rejected), (1, 0, 0));
    let _ = id;
    for w in others {
        w.stop().await;
    }
    gw.stop().await;
}

/// A claim the gateway must refuse, signed by `key`.
fn claim(key: &SigningKey, task_id: TaskId, lease_cid: Cid) -> Signed<Claim> {
    let output = b"forged".to_vec();
    Signed::sign(
        Claim {
            v: 1,
            task_id,
            lease_cid,
            fencing_token: 1,
            output_cid: Cid::raw(&output),
            output,
            snapshot_cid: None,
            snapshot: None,
            fuel_used: 1,
            finished_at: now_ms(),
        },
        key,
    )
    .unwrap()
}

/// A worker whose bids are signed by another key than its node's is not leased, and the
/// gateway records why; claims for a lease or task it never issued, or signed by another
/// key than the sender's, are refused with typed reasons over `/d402/claim/1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_bids_and_unknown_claims_are_refused_with_reasons() {
    let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let offer = echo_offer(10);
    let mut workers = Vec::new();
    for (i, d) in dirs[1..4].iter().enumerate() {
        workers.push(start_worker(d.path(), worker_cfg(&offer, i)).await);
    }
    // The impostor asks least, so it would be chosen first if its bid were taken.
    let cheap = d402_node::market::worker::OfferedCapability {
        floor: 1,
        ..offer.clone()
    };
    let other_key = seed();
    let impostor = start_worker_with(
        dirs[4].path(),
        worker_cfg(&cheap, 9),
        runner(),
        Some(other_key),
    )
    .await;
    let gw = start_gateway(
        dirs[0].path(),
        seed(),
        0,
        coordinator_config(),
        Policy::default(),
    )
    .await;
    for w in workers.iter().chain([&impostor]) {
        gw.net.connect(w.addr.clone()).await.unwrap();
    }
    let coord = gw.coordinator.clone().unwrap();
    let spec = task(&offer, br#"{"n":"impostor"}"#, 3, 2);
    let id = spec.task_id;
    let done = accepted(&coord, spec).await;
    let imp_peer = impostor.peer().to_bytes();
    assert!(done.bids.iter().all(|b| b.peer != imp_peer));
    assert!(done.leases.iter().all(|l| l.peer != imp_peer));
    let why: Vec<_> = done.passed.iter().filter(|p| p.peer == imp_peer).collect();
    assert_eq!(why.len(), 1, "{:?}", done.passed);
    assert!(why[0].reason.starts_with("bad_signature"), "{:?}", why[0]);
    assert_eq!(impostor.worker.as_ref().unwrap().leases_accepted(), 0);

    // Claims over the real protocol, sent by the impostor's node (its node key).
    let sender = SigningKey::from_bytes(&impostor.seed);
    let ask = |c: Signed<Claim>| {
        let net = impostor.net.clone();
        let (peer, addr) = (gw.peer(), gw.addr.clone());
        async move { net.request_claim(peer, vec![addr], c).await.unwrap() }
    };
    let refused = |reason: &str| d402_protocol::messages::ClaimAck::Refused {
        reason: reason.into(),
    };
    // A lease never issued, for a task that exists.
    let ack = ask(claim(&sender, id, Cid::raw(b"never issued"))).await;
    assert_eq!(ack, refused("unknown_lease"));
    // A real lease of the task, but claimed by someone else than its worker.
    let lease_cid = done.leases[0].lease_cid;
    let ack = ask(claim(&sender, id, lease_cid)).await;
    assert_eq!(ack, refused("bad_signature"));
    // A task never created.
    let ack = ask(claim(&sender, TaskId([7; 16]), Cid::raw(b"x"))).await;
    assert_eq!(ack, refused("unknown_task"));
    // Signed by a key that is not the sender's.
    let ack = ask(claim(&SigningKey::from_bytes(&other_key), id, lease_cid)).await;
    assert_eq!(ack, refused("bad_signature"));
    // The leased worker itself: a second claim on its claimed lease, and one with another
    // fencing token than its lease's.
    let rec = eventually("the first lease claimed", || {
        let c = coord.clone();
        async move {
            let r = c.tasks().get(&id).unwrap()?;
            (r.leases[0].status == LeaseStatus::Claimed).then_some(r)
        }
    })
    .await;
    let first = &rec.leases[0];
    let owner = workers
        .iter()
        .find(|w| w.key() == first.lease.body.worker.0)
        .unwrap();
    let owner_key = SigningKey::from_bytes(&owner.seed);
    let send = |c: Signed<Claim>| {
        let net = owner.net.clone();
        let (peer, addr) = (gw.peer(), gw.addr.clone());
        async move { net.request_claim(peer, vec![addr], c).await.unwrap() }
    };
    let mut again = claim(&owner_key, id, first.lease_cid);
    again.body.fencing_token = first.lease.body.fencing_token;
    let again = Signed::sign(again.body, &owner_key).unwrap();
    assert_eq!(send(again.clone()).await, refused("duplicate_claim"));
    let mut stale = again.body.clone();
    stale.fencing_token += 100;
    let stale = Signed::sign(stale, &owner_key).unwrap();
    assert_eq!(send(stale).await, refused("stale_fencing_token"));
    // Nothing of that changed the task.
    let after = coord.tasks().get(&id).unwrap().unwrap();
    assert!(after.claims.len() <= 3, "one claim per lease at most");
    assert!(
        after
            .claims
            .iter()
            .all(|c| c.claim.body.output != b"forged")
    );
    for w in workers.into_iter().chain([impostor]) {
        w.stop().await;
    }
    gw.stop().await;
}

/// A raw request-response codec: sends whatever bytes it is given on `/d402/claim/1`, so
/// that the test can put on the wire what the node's own codec refuses to send.
#[derive(Clone, Default)]
struct RawCodec;

impl libp2p::request_response::Codec for RawCodec {
    type Protocol = libp2p::StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &Self::Protocol, io: &mut T) -> std::io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        use futures::AsyncReadExt;
        let mut b = Vec::new();
        io.take(1 << 20).read_to_end(&mut b).await?;
        Ok(b)
    }

    /// A stream closed without a byte is no response.
    async fn read_response<T>(&mut self, p: &Self::Protocol, io: &mut T) -> std::io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        let b = self.read_request(p, io).await?;
        if b.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the stream closed without a response",
            ));
        }
        Ok(b)
    }

    async fn write_request<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        use futures::AsyncWriteExt;
        io.write_all(&req).await?;
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        p: &Self::Protocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        self.write_request(p, io, res).await
    }
}

/// Sends `bytes` on `/d402/claim/1` to `peer` at `addr` from a bare libp2p node keyed `from`; returns
/// the response bytes or the failure.
async fn send_raw_claim(
    from: &SigningKey,
    peer: libp2p::PeerId,
    addr: libp2p::Multiaddr,
    bytes: Vec<u8>,
) -> Result<Vec<u8>, String> {
    use futures::StreamExt;
    use libp2p::{
        StreamProtocol, noise,
        request_response::{self, Event, Message, ProtocolSupport},
        swarm::SwarmEvent,
        tcp, yamux,
    };
    let key = d402_node::net::keypair_from_signing_key(from).unwrap();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::new(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| {
            request_response::Behaviour::<RawCodec>::new(
                [(
                    StreamProtocol::new(d402_protocol::protocol_ids::CLAIM),
                    ProtocolSupport::Outbound,
                )],
                request_response::Config::default().with_request_timeout(Duration::from_secs(60)),
            )
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    swarm.add_peer_address(peer, addr);
    let id = swarm.behaviour_mut().send_request(&peer, bytes);
    let wait = async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(Event::Message {
                    message:
                        Message::Response {
                            request_id,
                            response,
                        },
                    ..
                }) if request_id == id => return Ok(response),
                SwarmEvent::Behaviour(Event::OutboundFailure {
                    request_id, error, ..
                }) if request_id == id => return Err(error.to_string()),
                _ => {}
            }
        }
    };
    tokio::time::timeout(TIMEOUT, wait).await.unwrap()
}

/// A claim over the protocol's size cap, sent by a peer that ignores the cap, gets no
/// answer: the gateway's codec reads at most the cap and closes that stream. The gateway
/// keeps serving: a well-formed claim afterwards gets its typed refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_claim_is_refused_by_the_codec_cap() {
    use d402_node::net::codec::{ClaimProto, RrProtocol};
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(
        dir.path(),
        seed(),
        0,
        coordinator_config(),
        Policy::default(),
    )
    .await;
    // A claim whose output is over the limit: the protocol crate refuses to sign it, so
    // the envelope is built by hand (its signature is over a smaller body).
    let key = SigningKey::from_bytes(&seed());
    let mut big = claim(&key, TaskId([1; 16]), Cid::raw(b"lease"));
    big.body.output = vec![b'x'; d402_protocol::messages::MAX_OUTPUT + 8 * 1024];
    big.body.output_cid = Cid::raw(&big.body.output);
    let bytes = big.to_bytes().unwrap();
    assert!(bytes.len() > ClaimProto::REQUEST_MAX);
    let answer = send_raw_claim(&key, gw.peer(), gw.addr.clone(), bytes).await;
    assert!(
        answer.is_err(),
        "an oversized claim was answered: {answer:?}"
    );

    // The same bare peer, with a well-formed claim, gets a typed refusal: the protocol
    // works and the node is still serving.
    let small = claim(&key, TaskId([1; 16]), Cid::raw(b"lease"));
    let answer = send_raw_claim(&key, gw.peer(), gw.addr.clone(), small.to_bytes().unwrap())
        .await
        .unwrap();
    let ack: d402_protocol::messages::ClaimAck =
        d402_protocol::messages::WireMessage::from_bytes(&answer).unwrap();
    assert_eq!(
        ack,
        d402_protocol::messages::ClaimAck::Refused {
            reason: "unknown_task".into()
        }
    );
    gw.stop().await;
}

/// The gateway is shut down while the primary holds an accepted lease and before any claim
/// (claims are delayed); the same state directory, key and port are reopened, `resume`
/// re-drives the task from redb, the primary's claim reaches the restarted gateway, the
/// remaining leases go out, and the task is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_gateway_resumes_the_task_from_redb() {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let offer = echo_offer(10);
    let mut workers = Vec::new();
    for (i, d) in dirs[1..].iter().enumerate() {
        let mut cfg = worker_cfg(&offer, i);
        // Long enough for the restart to happen before any claim, even on a busy machine.
        cfg.faults.claim_delay = Duration::from_secs(5);
        // Shorter than that: the bids not yet leased have expired when the primary's claim
        // reaches the restarted gateway, which must ask for bids again.
        cfg.bid_ttl = Duration::from_secs(3);
        workers.push(start_worker(d.path(), cfg).await);
    }
    let gw_seed = seed();
    let cfg = CoordinatorConfig {
        lease_timeout: Duration::from_secs(40),
        ..coordinator_config()
    };
    let gw = start_gateway(dirs[0].path(), gw_seed, 0, cfg.clone(), Policy::default()).await;
    let (port, gw_peer) = (gw.port(), gw.peer());
    for w in &workers {
        gw.net.connect(w.addr.clone()).await.unwrap();
    }
    let mut spec = task(&offer, br#"{"n":"restart"}"#, 3, 2);
    spec.deadline = now_ms() + 120_000;
    // The primary-first path (as for a capability that snapshots): the echo module takes no
    // snapshot, so it would otherwise lease all three at once and no bid would expire.
    spec.takes_snapshot = true;
    let id = spec.task_id;
    let (first_lease, first_bids) = {
        let coord = gw.coordinator.clone().unwrap();
        let run = tokio::spawn({
            let c = coord.clone();
            async move { c.run_task(spec).await }
        });
        // An accepted lease stays `Sent` in redb (acknowledgements cost no commit), so the
        // worker side says when it was accepted.
        let accepted = || {
            workers
                .iter()
                .map(|w| w.worker.as_ref().unwrap().leases_accepted())
                .sum::<u64>()
        };
        let lease = eventually("the primary's lease accepted", || {
            let c = coord.clone();
            let n = accepted();
            async move {
                let r = c.tasks().get(&id).unwrap()?;
                let bids: Vec<Cid> = r.bids.iter().map(|b| b.bid_cid).collect();
                r.leases
                    .iter()
                    .find(|l| l.is_open())
                    .filter(|_| n >= 1)
                    .map(|l| (l.lease_cid, bids))
            }
        })
        .await;
        // The crash: the task's driver and the node go away; only redb remains.
        run.abort();
        let _ = run.await;
        lease
    };
    gw.stop().await;
    assert!(
        workers
            .iter()
            .all(|w| w.worker.as_ref().unwrap().claims_sent() == 0),
        "a claim got in before the restart"
    );

    let gw = start_gateway(dirs[0].path(), gw_seed, port, cfg, Policy::default()).await;
    assert_eq!(gw.peer(), gw_peer);
    let coord = gw.coordinator.clone().unwrap();
    let before = coord.tasks().get(&id).unwrap().unwrap();
    assert_eq!(before.phase, Phase::Leasing);
    assert!(before.claims.is_empty());
    assert_eq!(coord.resume().unwrap(), vec![id]);
    let done = eventually("the resumed task ends", || {
        let c = coord.clone();
        async move {
            let r = c.tasks().get(&id).unwrap()?;
            r.phase.is_terminal().then_some(r)
        }
    })
    .await;
    assert_eq!(done.phase, Phase::Accepted, "{done:?}");
    assert_eq!(
        done.leases[0].lease_cid, first_lease,
        "the first lease was kept"
    );
    assert!(
        done.claims
            .iter()
            .any(|c| c.claim.body.lease_cid == first_lease),
        "the primary's claim reached the restarted gateway"
    );
    let tokens: Vec<u64> = done
        .leases
        .iter()
        .map(|l| l.lease.body.fencing_token)
        .collect();
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
    assert!(done.leases.len() >= 2);
    // The bids the first gateway collected had expired: the later leases answer new ones.
    assert!(
        done.leases[1..]
            .iter()
            .all(|l| !first_bids.contains(&l.lease.body.bid_cid)),
    );
    for w in workers {
        w.stop().await;
    }
    gw.stop().await;
}

/// A page on loopback whose body changes on every load; counts its loads.
struct LivePage {
    url: String,
    loads: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LivePage {
    fn start() -> LivePage {
        use std::{
            io::{Read, Write},
            sync::{
                Arc,
                atomic::{AtomicBool, AtomicU64, Ordering},
            },
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}/news", listener.local_addr().unwrap());
        let loads = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (loads, stop) = (loads.clone(), stop.clone());
            move || {
                while !stop.load(Ordering::SeqCst) {
                    let Ok((mut s, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    let mut req = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let n = loads.fetch_add(1, Ordering::SeqCst) + 1;
                    let body = format!(
                        "<!doctype html><html><head><title>Live</title></head><body>\
                         <h1>Live news</h1><p>Load number {n} at {} ns.</p>\
                         <p>Stable paragraph.</p></body></html>",
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap()
                            .as_nanos()
                    );
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                }
            }
        });
        LivePage {
            url,
            loads,
            stop,
            thread: Some(thread),
        }
    }

    fn loads(&self) -> u64 {
        self.loads.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for LivePage {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The built-in `web.page_to_markdown@1`, offered at `floor`.
fn page_offer(floor: u64) -> d402_node::market::worker::OfferedCapability {
    let builtin = d402_node::capstore::builtin_capabilities()
        .into_iter()
        .find(|b| b.manifest.id == "web.page_to_markdown")
        .unwrap();
    d402_node::market::worker::OfferedCapability {
        manifest_cid: builtin.manifest.cid().unwrap(),
        manifest: builtin.manifest.clone(),
        wasm: std::sync::Arc::new(builtin.wasm.to_vec()),
        floor,
        asset: ASSET.into(),
    }
}

/// A runner whose only snapshotter is the real `fetch`, allowed to load loopback pages.
fn fetch_runner() -> d402_runtime::Runner {
    use d402_capabilities::SnapshotterKind;
    use d402_runtime::{
        Executor, ExecutorConfig, FetchConfig, FetchSnapshotter, Grants, Runner, Snapshotters,
        UrlPolicy,
    };
    let executor = Executor::new(ExecutorConfig {
        cache_dir: None,
        max_concurrent: 2,
        max_memory_bytes: 512 * 1024 * 1024,
    })
    .unwrap();
    let grants = Grants {
        snapshotters: [SnapshotterKind::Fetch].into_iter().collect(),
        ..Grants::default()
    };
    let fetch = FetchSnapshotter::new(
        UrlPolicy::allow_loopback_for_tests(),
        FetchConfig::default(),
    )
    .unwrap();
    Runner::new(
        executor,
        grants,
        Snapshotters {
            fetch: Some(fetch),
            chromium: None,
            fallback_to_fetch: false,
        },
    )
}

/// Quorum over a page that differs on every load: the built-in `web.page_to_markdown@1`
/// run by 3 workers with the real `fetch` snapshotter (loopback allowed for the test),
/// fanout 3, quorum 2. Only the primary loads the page; the gateway pins its snapshot and
/// the other leased workers fetch it by CID over `/d402/blob/1` and re-run the Wasm on it,
/// so all three claims name the same snapshot CID and agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_over_a_live_page_via_a_pinned_snapshot() {
    let page = LivePage::start();
    let offer = page_offer(10);
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut workers = Vec::new();
    for (i, d) in dirs[1..].iter().enumerate() {
        workers
            .push(start_worker_with(d.path(), worker_cfg(&offer, i), fetch_runner(), None).await);
    }
    let (gw, coord) = gateway_for(dirs[0].path(), &workers).await;
    let input = serde_json::to_vec(&serde_json::json!({ "url": page.url })).unwrap();
    let spec = task(&offer, &input, 3, 2);
    let rec = run_accepted(&coord, spec, 3).await;
    let pinned = rec.pinned.expect("a snapshot was pinned");
    for c in &rec.claims {
        assert_eq!(c.claim.body.snapshot_cid, Some(pinned));
        assert_eq!(c.judgement, ClaimJudgement::Accepted);
        assert_eq!(Some(c.claim.body.output_cid), rec.accepted_output);
    }
    // Leases after the primary's named the pinned snapshot.
    assert!(
        rec.leases[1..]
            .iter()
            .all(|l| l.lease.body.snapshot_cid == Some(pinned))
    );
    assert_eq!(rec.leases[0].lease.body.snapshot_cid, None);
    let markdown = String::from_utf8(rec.claims[0].claim.body.output.clone()).unwrap();
    assert!(markdown.contains("Load number 1 at"), "{markdown}");
    assert_eq!(page.loads(), 1, "only the primary loads the page");
    for w in workers {
        w.stop().await;
    }
    gw.stop().await;
}

/// The gateway restarts after it pinned the primary's snapshot of a live page. The two
/// other leased workers never claim (their leases time out after the restart), so the
/// replacement bidder is leased by the restarted gateway with the pinned snapshot, which it
/// must fetch from that gateway: the snapshot is kept in redb, not only in memory. The task
/// is accepted on the primary's and the replacement's agreeing claims, and the page was
/// loaded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_gateway_serves_the_pinned_snapshot_again() {
    let page = LivePage::start();
    let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    // Ranked by price: the primary (5), two that accept and never claim (10), the
    // replacement (20).
    let mut workers = Vec::new();
    for (i, (floor, silent)) in [(5, false), (10, true), (10, true), (20, false)]
        .into_iter()
        .enumerate()
    {
        let mut cfg = worker_cfg(&page_offer(floor), i);
        if silent {
            cfg.faults.claim_delay = Duration::from_secs(300);
        }
        workers.push(start_worker_with(dirs[i + 1].path(), cfg, fetch_runner(), None).await);
    }
    let gw_seed = seed();
    let cfg = CoordinatorConfig {
        lease_timeout: Duration::from_secs(10),
        ..coordinator_config()
    };
    let gw = start_gateway(dirs[0].path(), gw_seed, 0, cfg.clone(), Policy::default()).await;
    let port = gw.port();
    for w in &workers {
        gw.net.connect(w.addr.clone()).await.unwrap();
    }
    let offer = page_offer(20);
    let input = serde_json::to_vec(&serde_json::json!({ "url": page.url })).unwrap();
    let mut spec = task(&offer, &input, 3, 2);
    spec.deadline = now_ms() + 120_000;
    let id = spec.task_id;
    let pinned = {
        let coord = gw.coordinator.clone().unwrap();
        let run = tokio::spawn({
            let c = coord.clone();
            async move { c.run_task(spec).await }
        });
        let pinned = eventually("snapshot pinned and both silent workers leased", || {
            let c = coord.clone();
            let silent_accepted: u64 = workers[1..3]
                .iter()
                .map(|w| w.worker.as_ref().unwrap().leases_accepted())
                .sum();
            async move {
                let r = c.tasks().get(&id).unwrap()?;
                let open = r.leases.iter().filter(|l| l.is_open()).count();
                (open == 2 && silent_accepted == 2)
                    .then_some(r.pinned)
                    .flatten()
            }
        })
        .await;
        run.abort();
        let _ = run.await;
        pinned
    };
    gw.stop().await;
    let replacement = workers[3].key();

    let gw = start_gateway(dirs[0].path(), gw_seed, port, cfg, Policy::default()).await;
    let coord = gw.coordinator.clone().unwrap();
    assert_eq!(coord.resume().unwrap(), vec![id]);
    let done = eventually("the resumed task ends", || {
        let c = coord.clone();
        async move {
            let r = c.tasks().get(&id).unwrap()?;
            r.phase.is_terminal().then_some(r)
        }
    })
    .await;
    assert_eq!(done.phase, Phase::Accepted, "{done:?}");
    assert_eq!(done.pinned, Some(pinned));
    let late = done
        .claims
        .iter()
        .find(|c| c.claim.signer.0 == replacement)
        .expect("the replacement claimed");
    assert_eq!(late.claim.body.snapshot_cid, Some(pinned));
    assert_eq!(late.judgement, ClaimJudgement::Accepted);
    let expired: Vec<_> = done
        .leases
        .iter()
        .filter(|l| l.status == LeaseStatus::Expired)
        .collect();
    assert_eq!(expired.len(), 2);
    // Their leases were open when the gateway went down: a claim may have been lost with
    // it, so the silent workers are not charged a timeout.
    for l in expired {
        let r = coord.reputation().get(&l.lease.body.worker.0).unwrap();
        assert_eq!(r.timed_out, 0, "{r:?}");
    }
    assert_eq!(page.loads(), 1, "only the primary loaded the page");
    // The task is over: its snapshot row is gone.
    let kept = eventually("the pinned snapshot forgotten", || {
        let c = coord.clone();
        async move {
            c.tasks()
                .snapshot(&id, &pinned)
                .unwrap()
                .is_none()
                .then_some(())
        }
    });
    kept.await;
    for w in workers {
        w.stop().await;
    }
    gw.stop().await;
}

/// A restarted gateway that does not know its workers any more (its peer table emptied
/// while it was down, so it redials nobody) still gets the claim: the worker redials the
/// gateway at the addresses of its signed record (same key, same port).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_redials_a_restarted_gateway_to_claim() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let offer = echo_offer(10);
    let mut cfg = worker_cfg(&offer, 0);
    cfg.faults.claim_delay = Duration::from_secs(4);
    let worker = start_worker(dirs[1].path(), cfg).await;
    let gw_seed = seed();
    let cfg = CoordinatorConfig {
        lease_timeout: Duration::from_secs(40),
        ..coordinator_config()
    };
    let gw = start_gateway(dirs[0].path(), gw_seed, 0, cfg.clone(), Policy::default()).await;
    let port = gw.port();
    gw.net.connect(worker.addr.clone()).await.unwrap();
    let mut spec = task(&offer, br#"{"n":"redial"}"#, 1, 1);
    spec.deadline = now_ms() + 120_000;
    let id = spec.task_id;
    {
        let coord = gw.coordinator.clone().unwrap();
        let run = tokio::spawn({
            let c = coord.clone();
            async move { c.run_task(spec).await }
        });
        eventually("the lease accepted", || {
            let c = coord.clone();
            let n = worker.worker.as_ref().unwrap().leases_accepted();
            async move {
                let r = c.tasks().get(&id).unwrap()?;
                (n >= 1 && r.leases.iter().any(|l| l.is_open())).then_some(())
            }
        })
        .await;
        run.abort();
        let _ = run.await;
    }
    gw.stop().await;
    {
        let state = open_state(dirs[0].path()).await;
        for (peer, _) in state.known_peers().unwrap() {
            state.remove_peer(&peer).unwrap();
        }
    }
    let gw = start_gateway(dirs[0].path(), gw_seed, port, cfg, Policy::default()).await;
    let coord = gw.coordinator.clone().unwrap();
    assert_eq!(coord.resume().unwrap(), vec![id]);
    let done = eventually("the resumed task ends", || {
        let c = coord.clone();
        async move {
            let r = c.tasks().get(&id).unwrap()?;
            r.phase.is_terminal().then_some(r)
        }
    })
    .await;
    assert_eq!(done.phase, Phase::Accepted, "{:?}", done.phase);
    // The claim's acknowledgement reaches the worker just after the gateway recorded it
    // (and decided the task in the same commit).
    let w = worker.worker.clone().unwrap();
    eventually("the claim acknowledged", || {
        let w = w.clone();
        async move { (w.claims_sent() == 1).then_some(()) }
    })
    .await;
    worker.stop().await;
    gw.stop().await;
}
