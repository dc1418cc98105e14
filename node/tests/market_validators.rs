//! Validators on loopback with real nodes: a gateway requiring one validator verdict on top
//! of a quorum of two accepts only with an agreeing signed verdict (which the validator
//! computed by fetching the manifest and module by CID from a worker and re-running the
//! Wasm), and a disagreeing validator blocks acceptance.

#![allow(clippy::unwrap_used)]

mod market_support;

use std::{net::Ipv4Addr, time::Duration};

use d402_node::{
    market::{
        blobs::BlobStore,
        reputation::Policy,
        service::{self, Services},
        tasks::{Phase, TaskRecord},
        validator::{Validator, ValidatorConfig, validator_key},
    },
    net::{self, LookupOptions, NetConfig, public_key_of},
};
use d402_protocol::{SigningKey, messages::VerdictOutcome};
use market_support::*;

struct ValidatorNode {
    node: net::Node,
    addr: libp2p::Multiaddr,
    validator: Validator,
    service: tokio::task::JoinHandle<()>,
}

async fn start_validator(dir: &std::path::Path, cfg: ValidatorConfig) -> ValidatorNode {
    let seed = seed();
    let (node, net, addr, _) = start_net(dir, seed, 0).await;
    let blobs = BlobStore::new(64 * 1024 * 1024);
    let validator = Validator::new(
        SigningKey::from_bytes(&seed),
        net.clone(),
        runner(),
        cfg,
        blobs.clone(),
    );
    let service = service::serve(
        &net,
        Services {
            worker: None,
            coordinator: None,
            validator: Some(validator.clone()),
            blobs,
        },
        16,
    )
    .await
    .unwrap();
    ValidatorNode {
        node,
        addr,
        validator,
        service,
    }
}

/// Three honest workers, one validator (honest or not), a gateway with quorum 2 and one
/// required verdict; returns the task's final record and the validator's PeerId.
/// With `discover`, the gateway is given no validator: it finds the validator under the
/// validator key in the DHT, where the validator announced itself.
async fn run(always_disagree: bool, discover: bool) -> (TaskRecord, libp2p::PeerId, Validator) {
    let dirs: Vec<_> = (0..6).map(|_| tempfile::tempdir().unwrap()).collect();
    let offer = echo_offer(10);
    let mut workers = Vec::new();
    for (i, d) in dirs[2..5].iter().enumerate() {
        workers.push(start_worker(d.path(), worker_cfg(&offer, i)).await);
    }
    #[allow(unused_mut)]
    let mut vcfg = ValidatorConfig::default();
    vcfg.faults.always_disagree = always_disagree;
    let v = start_validator(dirs[1].path(), vcfg).await;
    let vpeer = v.node.peer_id();
    // The validator has neither the manifest nor the module: it fetches both by CID from
    // the worker whose claim it judges, so it must be able to reach the workers.
    for w in &workers {
        v.node.handle().connect(w.addr.clone()).await.unwrap();
    }
    let mut cfg = coordinator_config();
    cfg.validators = 1;
    if !discover {
        cfg.validator_peers = vec![(vpeer, vec![v.addr.clone()])];
    }
    let gw = start_gateway(dirs[0].path(), seed(), 0, cfg, Policy::default()).await;
    for w in &workers {
        gw.net.connect(w.addr.clone()).await.unwrap();
    }
    // With `discover`: a bootstrap (Kademlia server and rendezvous point) that both know,
    // as in `d402 devnet`; the validator announces itself as `d402 node --validator` does.
    let boot = if discover {
        let mut bcfg = NetConfig::new(Ipv4Addr::LOCALHOST.into(), 0);
        bcfg.quic = false;
        bcfg.kad_server = true;
        bcfg.rendezvous_server = true;
        let (boot, _, addr, _) = start_net_with(dirs[5].path(), seed(), bcfg).await;
        v.node.handle().connect(addr.clone()).await.unwrap();
        gw.net.connect(addr).await.unwrap();
        v.validator.announce().await.unwrap();
        // The gateway finds it under the validator key before the task needs it.
        eventually("the validator found under its key", || {
            let net = gw.net.clone();
            async move {
                let opts = LookupOptions {
                    limit: Some(1),
                    timeout: Duration::from_secs(2),
                };
                let found = net.find_providers(validator_key(), opts).await.ok()?;
                found.iter().any(|p| p.peer_id == vpeer).then_some(())
            }
        })
        .await;
        Some(boot)
    } else {
        None
    };
    let coord = gw.coordinator.clone().unwrap();
    let spec = task(&offer, br#"{"n":7}"#, 3, 2);
    let done = tokio::time::timeout(TIMEOUT, coord.run_task(spec))
        .await
        .unwrap()
        .unwrap();
    // What is returned was read back from redb.
    let stored = coord.tasks().get(&done.spec.task_id).unwrap().unwrap();
    assert_eq!(stored.phase, done.phase);
    assert_eq!(stored.verdicts, done.verdicts);
    for w in workers {
        w.stop().await;
    }
    gw.stop().await;
    v.service.abort();
    let validator = v.validator.clone();
    v.node.shutdown().await;
    if let Some(b) = boot {
        b.shutdown().await;
    }
    (done, vpeer, validator)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_2_plus_1_validator_accepted_with_a_recorded_signed_verdict() {
    let (done, vpeer, validator) = run(false, false).await;
    assert_eq!(done.phase, Phase::Accepted, "{done:?}");
    assert_eq!(done.validators, 1);
    assert_eq!(done.verdicts.len(), 1, "{:?}", done.verdicts);
    let v = &done.verdicts[0];
    assert_eq!(v.peer, vpeer.to_bytes());
    // Signed by the validator's node key, about a claim with the accepted output.
    v.verdict
        .verify_from(&public_key_of(&vpeer).unwrap())
        .unwrap();
    assert_eq!(v.verdict.body.outcome, VerdictOutcome::Agree);
    assert_eq!(Some(v.verdict.body.output_cid), done.accepted_output);
    let judged = done
        .claims
        .iter()
        .find(|c| c.claim.cid().unwrap() == v.verdict.body.claim_cid)
        .expect("the verdict names a recorded claim");
    assert_eq!(judged.claim.body.output_cid, v.verdict.body.output_cid);
    assert!(v.verdict.body.fuel_used > 0);
    assert_eq!(validator.stats().agreed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disagreeing_validator_blocks_acceptance() {
    let (done, vpeer, validator) = run(true, false).await;
    let Phase::Failed { reason } = &done.phase else {
        panic!("accepted despite a disagreeing verdict: {done:?}");
    };
    assert!(reason.contains("disagreed"), "{reason}");
    assert!(reason.contains(&vpeer.to_string()), "{reason}");
    assert_eq!(done.accepted_output, None);
    assert_eq!(done.verdicts.len(), 1);
    assert!(matches!(
        done.verdicts[0].verdict.body.outcome,
        VerdictOutcome::Disagree { .. }
    ));
    assert_eq!(validator.stats().disagreed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_validator_announced_in_the_dht_is_found_and_asked() {
    let (done, vpeer, validator) = run(false, true).await;
    assert_eq!(done.phase, Phase::Accepted, "{done:?}");
    assert_eq!(done.verdicts.len(), 1, "{:?}", done.verdicts);
    assert_eq!(done.verdicts[0].peer, vpeer.to_bytes());
    assert_eq!(validator.stats().agreed, 1);
}
