//! The market end to end on loopback with real nodes: honest workers reach a quorum, a
//! lying worker is rejected and loses reputation.

#![allow(clippy::unwrap_used)]

mod market_support;

use d402_node::market::{
    tasks::{ClaimJudgement, LeaseStatus, Phase},
    worker::WorkerConfig,
};
use std::time::Duration;

use d402_protocol::RailKind;
use market_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_honest_workers_fanout_3_quorum_2_accepted_and_all_recorded() {
    // Every claim answers its lease inline (the window is far longer than an echo run).
    honest_quorum(Duration::from_secs(30), 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_on_their_own_protocol_reach_the_same_quorum() {
    // No inline window: every lease is acknowledged at once and claimed on /d402/claim/1.
    honest_quorum(Duration::ZERO, 0).await;
}

/// Leases go on each worker's pipe, and by request-response to a worker that does not
/// speak the pipe protocol: the task is served by all three alike, and the next task sends
/// that worker's lease by request-response at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_go_on_pipes_and_by_request_response_to_a_worker_without() {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let offer = echo_offer(10);
    let mut workers = Vec::new();
    for (i, d) in dirs[1..].iter().enumerate() {
        let cfg = worker_cfg(&offer, i);
        workers.push(if i == 0 {
            start_worker_without_pipes(d.path(), cfg).await
        } else {
            start_worker(d.path(), cfg).await
        });
    }
    let (gw, coord) = gateway_for(dirs[0].path(), &workers).await;
    let first = run_accepted(&coord, task(&offer, br#"{"n":1}"#, 3, 2), 3).await;
    assert!(
        first
            .claims
            .iter()
            .all(|c| c.judgement == ClaimJudgement::Accepted)
    );
    let stats = gw.net.lease_pipe_stats();
    // Two on pipes; the third tried its pipe, which failed before any answer, then went
    // by request-response.
    assert_eq!(stats.on_pipes, 2, "{stats:?}");
    assert_eq!(stats.by_request_response, 1, "{stats:?}");
    run_accepted(&coord, task(&offer, br#"{"n":2}"#, 3, 2), 3).await;
    let stats = gw.net.lease_pipe_stats();
    assert_eq!(stats.on_pipes, 4, "{stats:?}");
    assert_eq!(stats.by_request_response, 2, "{stats:?}");
    for w in &workers {
        assert_eq!(w.worker.as_ref().unwrap().leases_accepted(), 2);
    }
    for w in workers {
        w.stop().await;
    }
    gw.stop().await;
}

/// Three honest workers with `window` as their inline-claim window; each must have sent
/// `inline` of its one claim inline.
async fn honest_quorum(window: Duration, inline: u64) {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let offer = echo_offer(10);
    let mut workers = Vec::new();
    for (i, d) in dirs[1..].iter().enumerate() {
        let mut cfg = worker_cfg(&offer, i);
        cfg.inline_claim_window = window;
        workers.push(start_worker(d.path(), cfg).await);
    }
    let (gw, coord) = gateway_for(dirs[0].path(), &workers).await;
    let spec = task(&offer, br#"{"n":1}"#, 3, 2);
    // The third claim may land after the decision; it is recorded and judged too.
    let rec = run_accepted(&coord, spec, 3).await;
    assert!(rec.accepted_output.is_some());
    assert!(
        rec.claims
            .iter()
            .all(|c| c.judgement == ClaimJudgement::Accepted),
        "{:?}",
        rec.claims.iter().map(|c| c.judgement).collect::<Vec<_>>()
    );
    let tokens: Vec<u64> = rec
        .leases
        .iter()
        .map(|l| l.lease.body.fencing_token)
        .collect();
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
    for w in &workers {
        let worker = w.worker.clone().unwrap();
        // The acknowledgement reaches the worker just after the gateway recorded the claim.
        let sent = eventually("the claim acknowledged", || {
            let worker = worker.clone();
            async move { (worker.claims_sent() == 1).then_some(worker.claims_inline()) }
        })
        .await;
        assert_eq!(sent, inline);
    }
    // Reputation commits with the judgement (the decision, or a late claim's arrival).
    for w in &workers {
        let key = d402_protocol::SigningKey::from_bytes(&w.seed)
            .verifying_key()
            .to_bytes();
        let r = eventually("reputation recorded", || {
            let c = coord.clone();
            async move {
                let r = c.reputation().get(&key).unwrap();
                (r.accepted + r.rejected > 0).then_some(r)
            }
        })
        .await;
        assert_eq!((r.accepted, r.rejected), (1, 0));
    }
    for w in workers {
        w.stop().await;
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_tasks_lease_on_standing_bids_and_a_worker_that_forgot_its_bid_is_asked_again() {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let offer = echo_offer(10);
    let cfg = |i: usize| {
        WorkerConfig::new(
            vec![offer.clone()],
            vec![RailKind::Local],
            wallets(&format!("worker{i}")),
        )
    };
    let mut workers = Vec::new();
    for (i, d) in dirs[1..].iter().enumerate() {
        workers.push(start_worker(d.path(), cfg(i)).await);
    }
    let (gw, coord) = gateway_for(dirs[0].path(), &workers).await;
    let bids_made = |ws: &[MarketNode]| -> Vec<u64> {
        ws.iter()
            .map(|w| w.worker.as_ref().unwrap().bids_made())
            .collect()
    };

    // The first task asks for bids; each worker grants a standing bid.
    let first = run_accepted(&coord, task(&offer, br#"{"n":1}"#, 3, 2), 3).await;
    assert!(!first.standing);
    assert!(first.bids.iter().all(|b| b.bid.body.uses > 1), "{first:?}");
    assert_eq!(bids_made(&workers), vec![1, 1, 1]);

    // The next ones are leased on those bids at once: no worker is asked again.
    for n in 2..5 {
        let input = format!(r#"{{"n":{n}}}"#);
        let rec = run_accepted(&coord, task(&offer, input.as_bytes(), 3, 2), 3).await;
        assert!(rec.standing, "task {n} asked for bids");
        for l in &rec.leases {
            assert!(
                first.bids.iter().any(|b| b.bid_cid == l.lease.body.bid_cid),
                "a lease cites a bid the first round did not get"
            );
        }
    }
    assert_eq!(bids_made(&workers), vec![1, 1, 1]);

    // A restarted worker has forgotten its bid and refuses the lease citing it. With a
    // quorum of 3 the task cannot do without it: the gateway drops that standing bid, asks
    // for bids again and leases the restarted worker on its new bid.
    let last = workers.pop().unwrap();
    let restarted = restart_worker(last, dirs[3].path(), cfg(2)).await;
    workers.push(restarted);
    let rec = run_accepted(&coord, task(&offer, br#"{"n":9}"#, 3, 3), 3).await;
    assert!(!rec.standing, "the task went back to bidding");
    let fresh = workers[2].worker.as_ref().unwrap();
    assert_eq!(fresh.bids_made(), 1);
    assert_eq!(
        rec.claims
            .iter()
            .filter(|c| c.judgement == ClaimJudgement::Accepted)
            .count(),
        3
    );
    for w in workers {
        w.stop().await;
    }
    gw.stop().await;
}

/// The worker's side of a standing bid, driven directly: it covers each task once, as many
/// tasks as its uses, and a single-use bid covers its own task only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standing_bid_covers_each_task_once_until_its_uses_run_out() {
    use d402_node::{market::now_ms, net::peer_id_of};
    use d402_protocol::{
        Signed, SigningKey, TaskId,
        messages::{BidResponse, Lease, LeaseAck},
        types::MESSAGE_VERSION,
    };
    let dir = tempfile::tempdir().unwrap();
    let offer = echo_offer(10);
    let mut cfg = WorkerConfig::new(vec![offer.clone()], vec![RailKind::Local], wallets("w"));
    cfg.max_bid_uses = 2;
    let node = start_worker(dir.path(), cfg).await;
    let worker = node.worker.clone().unwrap();
    let gw_key = SigningKey::from_bytes(&seed());
    let gw = peer_id_of(&d402_protocol::PublicKey(gw_key.verifying_key().to_bytes())).unwrap();

    let bid = |standing: u32| {
        let spec = task(&offer, b"{}", 3, 2);
        let req = spec.bid_request(spec.budget.units, standing);
        match worker.on_bid_request(gw, Signed::sign(req, &gw_key).unwrap()) {
            BidResponse::Bid(b) => *b,
            other => panic!("no bid: {other:?}"),
        }
    };
    let lease = |bid: &Signed<d402_protocol::messages::Bid>, task: TaskId, token: u64| {
        let worker = worker.clone();
        let l = Signed::sign(
            Lease {
                v: MESSAGE_VERSION,
                task_id: task,
                worker: bid.signer,
                bid_cid: bid.cid().unwrap(),
                manifest_cid: bid.body.manifest_cid,
                input: b"{}".to_vec(),
                snapshot_cid: None,
                price: bid.body.price.clone(),
                deadline: now_ms() + 20_000,
                fencing_token: token,
            },
            &gw_key,
        )
        .unwrap();
        async move {
            let (tx, rx) = tokio::sync::oneshot::channel();
            worker.on_lease(gw, l, tx);
            match rx.await.unwrap() {
                LeaseAck::Refused { reason } => Err(reason),
                _ => Ok(()),
            }
        }
    };
    let code = |r: Result<(), String>| r.unwrap_err().split(':').next().unwrap().to_string();

    // Asked for 5 uses, granted the worker's 2; its expiry is the worker's, not the task's.
    let standing = bid(5);
    assert_eq!(standing.body.uses, 2);
    let (a, b, c) = (TaskId([1; 16]), TaskId([2; 16]), TaskId([3; 16]));
    lease(&standing, a, 1).await.unwrap();
    assert_eq!(code(lease(&standing, a, 2).await), "bid_used");
    lease(&standing, b, 1).await.unwrap();
    assert_eq!(code(lease(&standing, c, 1).await), "unknown_bid");

    // A single-use bid covers the task it was asked for, and nothing else.
    let single = bid(1);
    assert_eq!(single.body.uses, 1);
    assert_eq!(code(lease(&single, c, 1).await), "bid_mismatch");
    lease(&single, single.body.task_id, 1).await.unwrap();
    assert_eq!(
        code(lease(&single, single.body.task_id, 2).await),
        "unknown_bid"
    );
    node.stop().await;
}

/// A worker that refuses a lease on its standing bid because all its slots are busy keeps
/// that bid in the gateway's book (it is busy, not gone): the task goes to the next bid, and
/// a later task leases the worker on the same bid without asking it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_worker_keeps_its_standing_bid() {
    let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let cheap = echo_offer(5);
    let offer = echo_offer(10);
    assert_eq!(cheap.manifest_cid, offer.manifest_cid);
    let mut workers = Vec::new();
    for (i, d) in dirs[1..].iter().enumerate() {
        // Worker 0 bids lowest (always chosen), has one slot and holds it 1.5 s per run.
        let mut cfg = WorkerConfig::new(
            vec![if i == 0 { cheap.clone() } else { offer.clone() }],
            vec![RailKind::Local],
            wallets(&format!("worker{i}")),
        );
        if i == 0 {
            cfg.max_concurrent = 1;
            cfg.inline_claim_window = Duration::ZERO;
            cfg.faults.claim_delay = Duration::from_millis(1500);
        }
        workers.push(start_worker(d.path(), cfg).await);
    }
    let (gw, coord) = gateway_for(dirs[0].path(), &workers).await;
    let busy = workers[0].worker.clone().unwrap();

    // Task 1 asks for bids (four standing bids) and leases worker 0, which stays busy.
    let first = coord
        .run_task(task(&offer, br#"{"n":1}"#, 3, 2))
        .await
        .unwrap();
    assert!(!first.standing);
    assert_eq!(coord.standing_bids(), 4);
    // Task 2 runs on the standing bids: worker 0 refuses (no free slot), the two others
    // reach the quorum, and worker 0's bid stays in the book.
    let second = coord
        .run_task(task(&offer, br#"{"n":2}"#, 3, 2))
        .await
        .unwrap();
    assert!(second.standing);
    assert_eq!(second.phase, Phase::Accepted);
    let refused: Vec<_> = second
        .leases
        .iter()
        .filter(|l| l.status == LeaseStatus::Refused)
        .collect();
    assert_eq!(refused.len(), 1, "{:?}", second.leases);
    assert_eq!(refused[0].lease.body.price.units, 5, "worker 0 refused");
    assert_eq!(coord.standing_bids(), 4);
    // Once worker 0 is free, a task leases it on the same bid: it was asked for one bid only.
    eventually("worker 0 free again", || {
        let busy = busy.clone();
        async move { (busy.claims_sent() == 1).then_some(()) }
    })
    .await;
    let third = run_accepted(&coord, task(&offer, br#"{"n":3}"#, 3, 2), 3).await;
    assert!(third.standing);
    assert_eq!(busy.bids_made(), 1);
    assert_eq!(busy.leases_accepted(), 2);
    for w in workers {
        w.stop().await;
    }
    gw.stop().await;
}

/// Workers whose every slot is taken make a task wait, not fail: leases refused
/// `no_capacity` are sent again after a backoff (on standing bids), and bid requests
/// declined for want of a slot are asked again (without them), until the slots free up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_waits_out_busy_workers_on_standing_bids() {
    saturated_workers_then_a_task(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_waits_out_busy_workers_in_bid_rounds() {
    saturated_workers_then_a_task(false).await;
}

/// Three one-slot workers busy for `HOLD` with a first task, then a second task: it must
/// be accepted by the same three once they are free.
async fn saturated_workers_then_a_task(standing: bool) {
    const HOLD: Duration = Duration::from_millis(800);
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let offer = echo_offer(10);
    let mut workers = Vec::new();
    for (i, d) in dirs[1..].iter().enumerate() {
        let mut cfg = worker_cfg(&offer, i);
        cfg.max_concurrent = 1;
        cfg.inline_claim_window = Duration::ZERO;
        cfg.faults.claim_delay = HOLD;
        workers.push(start_worker(d.path(), cfg).await);
    }
    let mut cfg = coordinator_config();
    if !standing {
        cfg.standing_bids = 1;
    }
    let gw = start_gateway(dirs[0].path(), seed(), 0, cfg, Default::default()).await;
    for w in &workers {
        gw.net.connect(w.addr.clone()).await.unwrap();
    }
    let coord = gw.coordinator.clone().unwrap();
    let first = tokio::spawn({
        let coord = coord.clone();
        let spec = task(&offer, br#"{"n":1}"#, 3, 2);
        async move { accepted(&coord, spec).await }
    });
    eventually("every slot taken", || {
        let ws: Vec<_> = workers.iter().map(|w| w.worker.clone().unwrap()).collect();
        async move { ws.iter().all(|w| w.leases_accepted() == 1).then_some(()) }
    })
    .await;
    assert_eq!(coord.standing_bids(), if standing { 3 } else { 0 });
    let started = std::time::Instant::now();
    let second = accepted(&coord, task(&offer, br#"{"n":2}"#, 3, 2)).await;
    assert!(started.elapsed() >= HOLD / 2, "{:?}", started.elapsed());
    assert_eq!(second.standing, standing);
    if standing {
        // Each worker refused at least once, and one of its leases was accepted later.
        assert!(second.bids.iter().all(|b| b.busy >= 1), "{:?}", second.bids);
        let refused = second
            .leases
            .iter()
            .filter(|l| l.status == LeaseStatus::Refused)
            .count();
        assert!(refused >= 3, "{:?}", second.leases);
    } else {
        assert!(
            second
                .leases
                .iter()
                .all(|l| l.status != LeaseStatus::Refused)
        );
    }
    first.await.unwrap();
    for w in workers {
        w.stop().await;
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_claim_closing_the_last_lease_settles_in_its_own_commit() {
    // Two fast workers decide the task; the third claims well after the decision. The
    // acceptance hook (where the gateway captures the payment) runs at the decision, with
    // a lease still open, and again in the commit that records the late claim, with none.
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let offer = echo_offer(10);
    let mut workers = Vec::new();
    for (i, d) in dirs[1..].iter().enumerate() {
        let mut cfg = worker_cfg(&offer, i);
        if i == 2 {
            cfg.faults.claim_delay = Duration::from_millis(500);
        }
        workers.push(start_worker(d.path(), cfg).await);
    }
    let (gw, coord) = gateway_for(dirs[0].path(), &workers).await;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    assert!(coord.on_acceptance(std::sync::Arc::new(move |_txn, r| {
        let open = r.leases.iter().filter(|l| l.is_open()).count();
        log.lock()
            .unwrap()
            .push((r.phase.clone(), open, r.claims.len()));
        Ok(())
    })));
    let rec = run_accepted(&coord, task(&offer, br#"{"n":7}"#, 3, 2), 3).await;
    assert!(
        rec.claims
            .iter()
            .all(|c| c.judgement == ClaimJudgement::Accepted)
    );
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(Phase::Accepted, 1, 2), (Phase::Accepted, 0, 3)]
    );
    for w in workers {
        w.stop().await;
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_acceptance_hook_commits_nothing_of_the_decision() {
    // The hook writes, then fails (as a capture whose write failed would): the claims that
    // would decide the task are refused, nothing the hook wrote commits, and the task is not
    // accepted; it fails at its deadline.
    const MARKER: redb::TableDefinition<&[u8], u64> = redb::TableDefinition::new("test_marker");
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let offer = echo_offer(10);
    let mut workers = Vec::new();
    for (i, d) in dirs[1..].iter().enumerate() {
        workers.push(start_worker(d.path(), worker_cfg(&offer, i)).await);
    }
    let (gw, coord) = gateway_for(dirs[0].path(), &workers).await;
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = calls.clone();
    assert!(coord.on_acceptance(std::sync::Arc::new(move |txn, r| {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut t = txn.open_table(MARKER).unwrap();
        t.insert(&r.spec.task_id.0[..], 1).unwrap();
        Err(d402_node::market::coordinator::HookFailed(
            "disk full".into(),
        ))
    })));
    let mut spec = task(&offer, br#"{"n":11}"#, 3, 2);
    spec.deadline = d402_node::market::now_ms() + 3_000;
    let id = spec.task_id;
    let done = tokio::time::timeout(Duration::from_secs(30), coord.run_task(spec))
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(done.phase, Phase::Failed { .. }),
        "{:?}",
        done.phase
    );
    assert!(done.accepted_output.is_none());
    assert!(done.claims.is_empty(), "claims recorded: {:?}", done.claims);
    assert!(calls.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    let marked = gw
        .state
        .read(|txn| match txn.open_table(MARKER) {
            Ok(t) => Ok(t.get(&id.0[..])?.is_some()),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(false),
            Err(e) => Err(e.into()),
        })
        .unwrap();
    assert!(!marked, "the failed hook's write committed");
    for w in workers {
        w.stop().await;
    }
    gw.stop().await;
}
