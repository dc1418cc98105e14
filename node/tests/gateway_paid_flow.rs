//! The gateway's paid flow end to end: real HTTP (hyper client against the axum gateway),
//! real libp2p on loopback, real wasmtime workers, the real `local` rail in the gateway's
//! redb. A gateway and three workers selling `test.echo@1`, registered with a signed 10%
//! creator commission:
//! - no payment: 402 with `PAYMENT-REQUIRED` and the v1 body;
//! - paid with `client::pay_local`: 200 with the output, the claims, the split and a receipt
//!   signed by the gateway's rail key, plus `PAYMENT-RESPONSE`; every balance (payer,
//!   workers, creator, gateway) matches the split to the unit and the ledger balances;
//! - the same payment again: refused (`payment_replayed`), nothing charged;
//! - no workers left: 503 `no_workers`, refunded, the payer's balance unchanged.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod gateway_support;
mod market_support;

use std::{collections::BTreeMap, net::SocketAddr};

use d402_capabilities::{CapabilityRegistration, registration::Registration};
use d402_node::{
    capstore::{self, CapStore},
    gateway::{GatewayPolicy, GatewaySettings},
    market::{now_ms, worker::WorkerConfig},
};
use d402_protocol::{Chain, PublicKey, RailKind, SigningKey};
use d402_settlement::{
    Asset, client, wallet,
    x402::{PAYMENT_REQUIRED, PAYMENT_RESPONSE, PAYMENT_SIGNATURE, SettlementResponse},
};
use gateway_support::{balance, funded_payer, gateway_with_rail, http, json_of, start_http};
use market_support::*;
use serde_json::{Value, json};

const PRICE: u64 = 10_000; // $0.01
const BUDGET: &str = "0.009"; // 9_000 units: at most 3_000 per worker with fanout 3
const FLOOR: u64 = 2_000; // each worker's bid
const BPS: u64 = 1_000; // 10% creator commission
const FUNDS: u64 = 1_000_000;
/// Paid tasks sent at once in step 3b.
const CONCURRENT: usize = 12;

fn task_request() -> Value {
    json!({"capability": "test.echo@1", "input": {"msg": "hello, paid world"}})
}

/// Asks for the task without paying and pays the challenge: the `PAYMENT-SIGNATURE` value.
async fn pay(addr: SocketAddr, payer: &SigningKey) -> String {
    gateway_support::pay(addr, payer, &task_request(), PRICE).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paid_task_splits_to_the_unit_replay_refused_no_workers_refunded() {
    let gw_dir = tempfile::tempdir().unwrap();
    let worker_dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let offer = echo_offer(FLOOR);

    // The capability, registered by its publisher with a 10% commission to the creator.
    let publisher = wallet::generate().unwrap();
    let creator = wallet::address(&wallet::generate().unwrap());
    let terms = Registration::for_manifest(
        &offer.manifest,
        BPS as u16,
        [(Chain::Local, creator.clone())].into_iter().collect(),
        None,
        now_ms(),
    )
    .unwrap();
    let registration = CapabilityRegistration::sign(terms, &publisher).unwrap();
    CapStore::new(gw_dir.path())
        .import(&offer.manifest, &offer.wasm, Some(&registration), false)
        .unwrap();

    // The gateway: coordinator over libp2p, local rail in its redb, HTTP on port 0.
    let gateway_key = wallet::generate().unwrap();
    let gateway_pub = PublicKey::from(gateway_key.verifying_key());
    let (gw, rail) = gateway_with_rail(gw_dir.path(), gateway_key).await;
    let gateway_account = rail.address();
    let resolved = capstore::resolve_offer(gw_dir.path(), &"test.echo@1".parse().unwrap()).unwrap();
    let mut settings = GatewaySettings::new(RailKind::Local, Asset::local_usdc());
    settings.price = Some("$0.01".into());
    settings.budget = Some(BUDGET.into());
    settings.fanout = 3;
    settings.quorum = 2;
    settings.require_capability_registration = true;
    settings.require_signed_capability_registration = true;
    settings.max_creator_commission_bps = Some(2_000);
    let policy = GatewayPolicy::new(&settings, &[resolved]).unwrap();
    let gateway = start_http(&gw, &rail, policy).await;
    let addr = gateway.local_addr();

    // Three workers, each paid to its own local wallet.
    let mut workers = Vec::new();
    let mut worker_wallets = Vec::new();
    for d in &worker_dirs {
        let w = wallet::address(&wallet::generate().unwrap());
        let mut cfg = WorkerConfig::new(
            vec![offer.clone()],
            vec![RailKind::Local],
            [(Chain::Local, w.clone())].into_iter().collect(),
        );
        // Fewer slots than step 3b's leases at once: leases that land together are refused
        // `no_capacity`, and their tasks wait for a slot (backing off) rather than fail.
        cfg.max_concurrent = 2;
        let node = start_worker(d.path(), cfg).await;
        gw.net.connect(node.addr.clone()).await.unwrap();
        workers.push(node);
        worker_wallets.push(w);
    }

    // A payer funded by the dev faucet.
    let (payer, payer_addr) = funded_payer(addr, FUNDS).await;

    // 1. No payment: 402 with both forms of the challenge.
    let (status, headers, body) = http(addr, "POST", "/v1/tasks", &[], Some(task_request())).await;
    assert_eq!(status, 402);
    let v1 = json_of(&body);
    assert_eq!(v1["x402Version"], 1);
    assert_eq!(v1["accepts"][0]["maxAmountRequired"], PRICE.to_string());
    assert_eq!(v1["accepts"][0]["payTo"], gateway_account);
    let challenge = client::read_challenge(
        Some(headers.get(PAYMENT_REQUIRED).unwrap().to_str().unwrap()),
        None,
    )
    .unwrap();
    assert_eq!(challenge.accepts[0].amount.0, PRICE);
    assert_eq!(balance(addr, &payer_addr).await, FUNDS, "nothing charged");

    // 2. Paid: 200 with the output, the quorum, the split and the signed receipt.
    let payment = pay(addr, &payer).await;
    let (status, headers, body) = http(
        addr,
        "POST",
        "/v1/tasks",
        &[(PAYMENT_SIGNATURE, payment.clone())],
        Some(task_request()),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let done = json_of(&body);
    assert_eq!(done["status"], "completed");
    assert_eq!(done["capability"], "test.echo@1");
    // The echo module returns its whole framed input (d402-wasm-1 frame around the JSON).
    let output = done["output"]
        .as_str()
        .expect("UTF-8 output as a JSON string");
    assert!(
        output.contains(r#"{"msg":"hello, paid world"}"#),
        "{output:?}"
    );
    assert_eq!(done["quorum"]["fanout"], 3);
    assert_eq!(done["quorum"]["quorum"], 2);
    let accepted = done["quorum"]["agreeing"].as_u64().unwrap();
    assert!(accepted >= 2, "{done}");
    assert_eq!(done["settlement"]["price"], PRICE.to_string());
    let response =
        SettlementResponse::from_header(headers.get(PAYMENT_RESPONSE).unwrap().to_str().unwrap())
            .unwrap();
    assert!(response.success);
    let receipt = response
        .verified_receipt(Some(&gateway_pub))
        .unwrap()
        .expect("a receipt")
        .clone();
    assert_eq!(receipt.body.payer, payer_addr);
    assert_eq!(receipt.body.charged.units, PRICE);
    assert_eq!(json!(receipt), done["receipt"]);

    // Balances match the split to the unit: each accepted worker its 2000 bid less 10%,
    // the creator 10% of each, the gateway the rest; nobody else got anything.
    let creator_cut = FLOOR * BPS / 10_000;
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for t in &receipt.body.transfers {
        *expected.entry(t.to.clone()).or_default() += t.units;
    }
    let paid_workers: Vec<_> = worker_wallets
        .iter()
        .filter(|w| expected.contains_key(*w))
        .collect();
    assert_eq!(paid_workers.len() as u64, accepted, "{done}");
    for w in &worker_wallets {
        let want = if expected.contains_key(w) {
            FLOOR - creator_cut
        } else {
            0
        };
        assert_eq!(expected.get(w).copied().unwrap_or(0), want);
        assert_eq!(balance(addr, w).await, want, "worker {w}");
    }
    assert_eq!(balance(addr, &creator).await, creator_cut * accepted);
    assert_eq!(
        balance(addr, &gateway_account).await,
        PRICE - FLOOR * accepted
    );
    assert_eq!(balance(addr, &payer_addr).await, FUNDS - PRICE);
    let audit = rail.audit().unwrap();
    assert!(audit.is_balanced(), "{audit:?}");

    // The task can be read back.
    let task_id = done["task_id"].as_str().unwrap().to_string();
    let (status, _, body) = http(addr, "GET", &format!("/v1/tasks/{task_id}"), &[], None).await;
    assert_eq!(status, 200);
    let got = json_of(&body);
    assert_eq!(got["status"], "completed");
    assert_eq!(got["output"], done["output"]);
    assert_eq!(got["receipt"], done["receipt"]);
    let (status, _, body) = http(
        addr,
        "GET",
        "/v1/tasks/00000000000000000000000000000000",
        &[],
        None,
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(json_of(&body)["error"]["code"], "task_not_found");

    // 3. The same payment again: refused before any work, nothing charged.
    let (status, headers, body) = http(
        addr,
        "POST",
        "/v1/tasks",
        &[(PAYMENT_SIGNATURE, payment)],
        Some(task_request()),
    )
    .await;
    assert_eq!(status, 402, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json_of(&body)["error"], "payment_replayed");
    let again = client::read_challenge(
        Some(headers.get(PAYMENT_REQUIRED).unwrap().to_str().unwrap()),
        None,
    )
    .unwrap();
    assert_eq!(again.error.as_deref(), Some("payment_replayed"));
    assert_eq!(balance(addr, &payer_addr).await, FUNDS - PRICE);

    // 3b. Paid tasks at once (under load their commits combine into shared transactions):
    // each answered 200 with its own receipt, and every balance moves by exactly the
    // receipts' transfers (which add up to the price), the payer's by the prices.
    let mut accounts = worker_wallets.clone();
    accounts.extend([creator.clone(), gateway_account.clone(), payer_addr.clone()]);
    let mut before = BTreeMap::new();
    for a in &accounts {
        before.insert(a.clone(), balance(addr, a).await);
    }
    let mut payments = Vec::new();
    for _ in 0..CONCURRENT {
        payments.push(pay(addr, &payer).await);
    }
    let answers = futures::future::join_all(payments.into_iter().map(|payment| async move {
        http(
            addr,
            "POST",
            "/v1/tasks",
            &[(PAYMENT_SIGNATURE, payment)],
            Some(task_request()),
        )
        .await
    }))
    .await;
    let mut moved: BTreeMap<String, i128> = BTreeMap::new();
    let mut tasks = std::collections::BTreeSet::new();
    for (status, headers, body) in answers {
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let done = json_of(&body);
        assert_eq!(done["status"], "completed");
        assert!(tasks.insert(done["task_id"].as_str().unwrap().to_string()));
        let response = SettlementResponse::from_header(
            headers.get(PAYMENT_RESPONSE).unwrap().to_str().unwrap(),
        )
        .unwrap();
        let receipt = response
            .verified_receipt(Some(&gateway_pub))
            .unwrap()
            .expect("a receipt")
            .clone();
        assert_eq!(receipt.body.charged.units, PRICE);
        assert_eq!(
            receipt.body.transfers.iter().map(|t| t.units).sum::<u64>(),
            PRICE
        );
        *moved.entry(payer_addr.clone()).or_default() -= i128::from(PRICE);
        for t in &receipt.body.transfers {
            *moved.entry(t.to.clone()).or_default() += i128::from(t.units);
        }
    }
    for a in &accounts {
        let now = i128::from(balance(addr, a).await);
        let want = i128::from(before[a]) + moved.get(a).copied().unwrap_or(0);
        assert_eq!(now, want, "account {a}");
    }
    assert!(rail.audit().unwrap().is_balanced());
    // Two slots per worker for twelve tasks' leases: some waited for a slot, and it shows.
    let (status, _, body) = http(addr, "GET", "/metrics", &[], None).await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    let waited: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("d402_gateway_busy_backoffs_total{kind=\"lease\"} "))
        .expect("the busy backoffs counter")
        .parse()
        .unwrap();
    assert!(waited > 0, "{text}");

    // 4. No workers left: 503 no_workers, the payment refunded.
    for w in workers {
        w.stop().await;
    }
    let before = balance(addr, &payer_addr).await;
    let payment = pay(addr, &payer).await;
    let (status, headers, body) = http(
        addr,
        "POST",
        "/v1/tasks",
        &[(PAYMENT_SIGNATURE, payment)],
        Some(task_request()),
    )
    .await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    let failed = json_of(&body);
    assert_eq!(failed["error"]["code"], "no_workers", "{failed}");
    assert_eq!(failed["refunded"], true);
    let refund =
        SettlementResponse::from_header(headers.get(PAYMENT_RESPONSE).unwrap().to_str().unwrap())
            .unwrap();
    assert!(!refund.success);
    assert_eq!(refund.error_reason.as_deref(), Some("no_workers"));
    let refund_receipt = refund
        .verified_receipt(Some(&gateway_pub))
        .unwrap()
        .unwrap();
    assert_eq!(refund_receipt.body.transfers.len(), 1);
    assert_eq!(refund_receipt.body.transfers[0].to, payer_addr);
    assert_eq!(refund_receipt.body.transfers[0].units, PRICE);
    assert_eq!(balance(addr, &payer_addr).await, before, "refunded");
    let failed_id = failed["task_id"].as_str().unwrap();
    let (_, _, body) = http(addr, "GET", &format!("/v1/tasks/{failed_id}"), &[], None).await;
    assert_eq!(json_of(&body)["status"], "refunded");
    assert!(rail.audit().unwrap().is_balanced());

    gateway.shutdown().await;
    gw.stop().await;
}

/// A payment locked (with its task row) just before a crash, whose task never reached the
/// coordinator (as with a rail in another database): the restarted gateway refunds it, and
/// `GET /v1/tasks/{id}` says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_locked_before_a_crash_is_refunded_at_restart() {
    crash_after_the_lock(false).await;
}

/// A payment locked with its task row and the coordinator's task record (one transaction,
/// as `d402 node` does) just before a crash: the restarted gateway resumes the task, a
/// worker runs it, and the payment is captured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_locked_with_its_record_before_a_crash_is_resumed_and_captured() {
    crash_after_the_lock(true).await;
}

async fn crash_after_the_lock(with_record: bool) {
    use d402_node::{
        gateway::tasks::{PAID_TASKS, PaidTask},
        market::tasks::{TaskSpec, Tasks},
    };
    use d402_protocol::{Amount, TaskId};
    use d402_settlement::{
        QuoteRequest, Rail,
        x402::{Payment, PaymentRequired, ResourceInfo},
    };

    let gw_dir = tempfile::tempdir().unwrap();
    let offer = echo_offer(FLOOR);
    CapStore::new(gw_dir.path())
        .import(&offer.manifest, &offer.wasm, None, false)
        .unwrap();
    let (gw, rail) = gateway_with_rail(gw_dir.path(), wallet::generate().unwrap()).await;
    let payer = wallet::generate().unwrap();
    let payer_addr = wallet::address(&payer);
    rail.faucet(&payer_addr, FUNDS, now_ms()).unwrap();
    // A worker to run the resumed task.
    let worker_dir = tempfile::tempdir().unwrap();
    let worker = start_worker(
        worker_dir.path(),
        WorkerConfig::new(
            vec![offer.clone()],
            vec![RailKind::Local],
            wallets("resumer"),
        ),
    )
    .await;
    gw.net.connect(worker.addr.clone()).await.unwrap();

    // What the previous run did before it crashed: verified, locked and recorded.
    let capability: d402_protocol::CapabilityRef = "test.echo@1".parse().unwrap();
    let quote = rail
        .quote(&QuoteRequest {
            capability: capability.clone(),
            price_units: PRICE,
            creator_commission_bps: 0,
        })
        .unwrap();
    let resource = ResourceInfo {
        url: "http://127.0.0.1:1/v1/tasks".into(),
        description: None,
        mime_type: None,
    };
    let challenge = PaymentRequired::new(
        resource.clone(),
        vec![rail.challenge(&quote, &resource).unwrap()],
    );
    let value = client::pay_local(&challenge, &payer, now_ms(), None)
        .unwrap()
        .header_v2()
        .unwrap()
        .1;
    let payment = Payment::from_headers(Some(&value), None).unwrap().unwrap();
    let verified = rail.verify_payment(&payment, &challenge, now_ms()).unwrap();
    let task_id = TaskId([42; 16]);
    let paid = PaidTask {
        v: 1,
        task_id,
        capability,
        manifest_cid: offer.manifest_cid,
        commission: d402_settlement::CommissionTerms::none(),
        price_units: PRICE,
        fanout: 1,
        quorum: 1,
        payer: payer_addr.clone(),
        x402_version: 2,
        idempotency_key: None,
        created_at: now_ms(),
    };
    let row = d402_node::state::encode("gateway_tasks", &paid).unwrap();
    let coordinator = gw.coordinator.clone().unwrap();
    let record = coordinator.new_record(TaskSpec {
        task_id,
        capability: paid.capability.clone(),
        manifest_cid: offer.manifest_cid,
        input: br#"{"msg":"resumed"}"#.to_vec(),
        rail: RailKind::Local,
        budget: Amount {
            asset: ASSET.into(),
            units: PRICE,
        },
        fanout: 1,
        quorum: 1,
        deadline: now_ms() + 60_000,
        takes_snapshot: false,
    });
    let txn = rail.database().begin_write().unwrap();
    rail.lock_in(&txn, task_id, &verified, now_ms()).unwrap();
    txn.open_table(PAID_TASKS)
        .unwrap()
        .insert(&task_id.0[..], row.as_slice())
        .unwrap();
    if with_record {
        assert!(Tasks::create_in(&txn, &record).unwrap());
    }
    txn.commit().unwrap();
    assert_eq!(rail.balance(&payer_addr).unwrap(), FUNDS - PRICE);

    // The restart: the gateway settles what was left locked.
    let resolved = capstore::resolve_offer(gw_dir.path(), &"test.echo@1".parse().unwrap()).unwrap();
    let policy = GatewayPolicy::new(
        &GatewaySettings::new(RailKind::Local, Asset::local_usdc()),
        &[resolved],
    )
    .unwrap();
    let gateway = start_http(&gw, &rail, policy).await;
    let settled = eventually("the locked payment is settled", || {
        let rail = rail.clone();
        async move {
            let e = rail.escrow(task_id).unwrap()?;
            (e.state != d402_settlement::EscrowState::Locked).then_some(e.state)
        }
    })
    .await;
    assert!(rail.audit().unwrap().is_balanced());
    let (status, _, body) = http(
        gateway.local_addr(),
        "GET",
        &format!("/v1/tasks/{task_id}"),
        &[],
        None,
    )
    .await;
    assert_eq!(status, 200);
    let got = json_of(&body);
    if with_record {
        // Resumed, run by the worker, accepted and paid out.
        assert_eq!(settled, d402_settlement::EscrowState::Captured);
        assert_eq!(got["status"], "completed", "{got}");
        let w = worker.worker.clone().unwrap();
        eventually("the worker's claim acknowledged", || {
            let w = w.clone();
            async move { (w.claims_sent() == 1).then_some(()) }
        })
        .await;
        assert_eq!(rail.balance(&payer_addr).unwrap(), FUNDS - PRICE);
        let rec = coordinator.tasks().get(&task_id).unwrap().unwrap();
        assert_eq!(rec.phase, d402_node::market::tasks::Phase::Accepted);
    } else {
        assert_eq!(settled, d402_settlement::EscrowState::Refunded);
        assert_eq!(got["status"], "refunded", "{got}");
        assert_eq!(got["settlement"]["transfers"][0]["role"], "refund");
        assert_eq!(rail.balance(&payer_addr).unwrap(), FUNDS);
    }

    gateway.shutdown().await;
    worker.stop().await;
    gw.stop().await;
}
