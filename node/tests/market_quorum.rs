//! The market end to end on loopback with real nodes: honest workers reach a quorum, a
//! lying worker is rejected and loses reputation.

#![allow(clippy::unwrap_used)]

mod market_support;

use d402_node::market::{reputation::Policy, tasks::ClaimJudgement, worker::WorkerConfig};
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

/// Three honest workers with `window` as their inline-claim window; each must have sent
/// `inline` of its one claim inline.
async fn honest_quorum(window: Duration, inline: u64) {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let offer = echo_offer(10);
    let mut workers = Vec::new();
    for (i, d) in dirs[1..].iter().enumerate() {
        let mut cfg = WorkerConfig::new(
            vec![offer.clone()],
            vec![RailKind::Local],
            wallets(&format!("worker{i}")),
        );
        cfg.inline_claim_window = window;
        workers.push(start_worker(d.path(), cfg).await);
    }
    let gw = start_gateway(
        dirs[0].path(),
        seed(),
        0,
        coordinator_config(),
        Policy::default(),
    )
    .await;
    for w in &workers {
        gw.net.connect(w.addr.clone()).await.unwrap();
    }
    let coord = gw.coordinator.clone().unwrap();
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
