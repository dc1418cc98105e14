//! The local rail against real redb files: the paid flow in both x402 versions, replay,
//! verification failures, idempotent capture and refund, restart, atomic use inside the
//! caller's transaction, and concurrent double spends.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::*;
use d402_protocol::{Cid, PublicKey, TaskId, messages::PayeeRole};
use d402_settlement::{
    CapturePlan, CommissionTerms, EscrowState, LocalRail, LocalRailConfig, Rail, RailError,
    WorkerPayout, client,
    local::{Account, LedgerReader},
    x402::{self, Payment, PaymentRequired, PaymentRequiredV1, SettlementResponse},
};
use redb::{Database, ReadableDatabase, TableDefinition};

fn file_rail(dir: &tempfile::TempDir, config: LocalRailConfig) -> (Arc<Database>, LocalRail) {
    let db = Arc::new(Database::create(dir.path().join("node.redb")).unwrap());
    let rail = LocalRail::open(db.clone(), gateway_key(), config).unwrap();
    (db, rail)
}

fn plan(workers: &[(u8, u64)], bps: u16) -> CapturePlan {
    CapturePlan {
        payouts: workers
            .iter()
            .map(|&(w, gross)| WorkerPayout {
                worker: addr(w),
                gross,
                claim_cid: Cid::raw(&[w]),
            })
            .collect(),
        commission: CommissionTerms {
            registration_cid: Some(Cid::raw(b"registration")),
            bps,
            creator_wallet: Some(addr(50)),
        },
    }
}

fn task(n: u8) -> TaskId {
    TaskId([n; 16])
}

#[test]
fn paid_task_v2_splits_to_the_unit() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, rail) = file_rail(&dir, dev_config());
    assert_eq!(rail.faucet(&addr(1), 1_000_000, NOW).unwrap(), 1_000_000);

    let price = rail.asset().parse("$0.01").unwrap();
    assert_eq!(price, 10_000);
    let challenge = challenge(&rail, price);
    let header = pay_header(&challenge, &key(1), NOW);
    let verified = verify(&rail, &challenge, &header, NOW).unwrap();
    assert_eq!(verified.payer(), addr(1));
    assert_eq!(verified.amount().units, 10_000);
    let lock = rail.lock_payment(task(1), &verified, NOW).unwrap();
    assert!(!lock.already_locked);
    assert_eq!(rail.balance(&addr(1)).unwrap(), 990_000);

    // Fanout 3, two accepted at 3000 each, 10% creator commission.
    let receipt = rail
        .capture_task(task(1), &plan(&[(11, 3000), (12, 3000)], 1000), NOW + 5)
        .unwrap();
    receipt
        .verify_from(&PublicKey::from(gateway_key().verifying_key()))
        .unwrap();
    assert_eq!(rail.balance(&addr(11)).unwrap(), 2700);
    assert_eq!(rail.balance(&addr(12)).unwrap(), 2700);
    assert_eq!(rail.balance(&addr(50)).unwrap(), 600);
    assert_eq!(rail.balance(&rail.address()).unwrap(), 4000);
    assert_eq!(rail.balance(&addr(1)).unwrap(), 990_000);
    let roles: Vec<_> = receipt
        .body
        .transfers
        .iter()
        .map(|t| (t.role, t.units))
        .collect();
    assert_eq!(
        roles,
        [
            (PayeeRole::Creator, 300),
            (PayeeRole::Worker, 2700),
            (PayeeRole::Creator, 300),
            (PayeeRole::Worker, 2700),
            (PayeeRole::Gateway, 4000),
        ]
    );
    assert_eq!(receipt.body.charged.units, 10_000);
    assert_eq!(receipt.body.payer, addr(1));
    assert_eq!(receipt.body.tx_refs.len(), 5);

    // The journal records every transfer with task, claim and registration.
    let entries = rail.read(|r| r.task_entries(&task(1))).unwrap();
    assert_eq!(entries.len(), 6);
    assert_eq!(entries[0].from, Account::Wallet(addr(1).parse().unwrap()));
    assert_eq!(entries[0].to, Account::Escrow(task(1)));
    for e in &entries[1..5] {
        assert_eq!(e.task_id, Some(task(1)));
        assert!(e.claim_cid.is_some());
        assert_eq!(e.registration_cid, Some(Cid::raw(b"registration")));
    }
    assert_eq!(entries[5].role, Some(PayeeRole::Gateway));
    assert_eq!(entries[5].claim_cid, None);
    for (e, (t, r)) in entries[1..]
        .iter()
        .zip(receipt.body.transfers.iter().zip(&receipt.body.tx_refs))
    {
        assert_eq!(&e.tx_ref(), r);
        assert_eq!((e.role, e.units), (Some(t.role), t.units));
        assert_eq!(e.to, Account::Wallet(t.to.parse().unwrap()));
        assert_eq!(e.from, Account::Escrow(task(1)));
    }

    // PAYMENT-RESPONSE carries the receipt; the client verifies the gateway's signature.
    let response = SettlementResponse::settled(rail.network(), receipt.clone());
    let back = x402_ok(&response.to_header().unwrap());
    assert!(back.success);
    assert_eq!(back.payer.as_deref(), Some(addr(1).as_str()));
    let gw = PublicKey::from(gateway_key().verifying_key());
    assert_eq!(back.verified_receipt(Some(&gw)).unwrap(), Some(&receipt));
    let stranger = PublicKey::from(key(99).verifying_key());
    assert!(back.verified_receipt(Some(&stranger)).is_err());

    let audit = rail.audit().unwrap();
    assert!(audit.is_balanced(), "{audit:?}");
    assert_eq!(audit.minted, 1_000_000);
    assert_eq!(audit.locked_tasks, 0);
}

#[test]
fn paid_task_v1_from_the_json_body() {
    let rail = in_memory_rail();
    rail.faucet(&addr(2), 50_000, NOW).unwrap();
    let challenge = challenge(&rail, 20_000);
    let body = challenge.to_v1().to_json().unwrap();
    assert_eq!(
        PaymentRequiredV1::from_json(&body).unwrap().accepts[0].network,
        "d402-local"
    );
    let seen = client::read_challenge(None, Some(&body)).unwrap();
    let payment = client::pay_local(&seen, &key(2), NOW, Some(20_000)).unwrap();
    let (name, value) = payment.header_v1().unwrap();
    assert_eq!(name, "X-PAYMENT");
    let decoded = Payment::from_headers(None, Some(&value)).unwrap().unwrap();
    assert_eq!(decoded.response_header_name(), "X-PAYMENT-RESPONSE");
    let verified = rail.verify_payment(&decoded, &challenge, NOW).unwrap();
    rail.lock_payment(task(2), &verified, NOW).unwrap();
    let receipt = rail.refund_task(task(2), NOW).unwrap();
    assert_eq!(receipt.body.transfers[0].role, PayeeRole::Refund);
    assert_eq!(rail.balance(&addr(2)).unwrap(), 50_000);
    let entries = rail.read(|r| r.task_entries(&task(2))).unwrap();
    let roles: Vec<_> = entries.iter().map(|e| (e.role, e.units)).collect();
    assert_eq!(roles, [(None, 20_000), (Some(PayeeRole::Refund), 20_000)]);
    assert_eq!(entries[1].to, Account::Wallet(addr(2).parse().unwrap()));
    let resp = SettlementResponse::refunded(rail.network(), "task_not_served", Some(receipt));
    let back = x402_ok(&resp.to_header().unwrap());
    assert!(!back.success);
    assert_eq!(back.error_reason.as_deref(), Some("task_not_served"));
    assert!(back.verified_receipt(None).unwrap().is_some());
    // The client's price limit.
    assert!(matches!(
        client::pay_local(&seen, &key(2), NOW, Some(19_999)),
        Err(client::ClientError::AboveLimit {
            amount: 20_000,
            max: 19_999
        })
    ));
}

#[test]
fn a_nonce_is_accepted_once() {
    let rail = in_memory_rail();
    rail.faucet(&addr(3), 100_000, NOW).unwrap();
    let challenge = challenge(&rail, 10_000);
    let header = pay_header(&challenge, &key(3), NOW);
    let first = verify(&rail, &challenge, &header, NOW).unwrap();
    let again = verify(&rail, &challenge, &header, NOW).unwrap(); // not used yet
    rail.lock_payment(task(1), &first, NOW).unwrap();

    let err = verify(&rail, &challenge, &header, NOW + 1).unwrap_err();
    assert!(matches!(err, RailError::NonceReplayed));
    assert!(err.is_payment_error());
    assert_eq!(err.code(), "nonce_replayed");
    // A payment verified before the first lock cannot be locked for another task either.
    assert!(matches!(
        rail.lock_payment(task(2), &again, NOW),
        Err(RailError::NonceReplayed)
    ));
    // Locking it again for the same task is the same lock, charged once.
    let retry = rail.lock_payment(task(1), &again, NOW).unwrap();
    assert!(retry.already_locked);
    assert_eq!(rail.balance(&addr(3)).unwrap(), 90_000);
    // A second, fresh payment cannot be locked into an already paid task.
    let other = verify(
        &rail,
        &challenge,
        &pay_header(&challenge, &key(3), NOW),
        NOW,
    )
    .unwrap();
    assert!(matches!(
        rail.lock_payment(task(1), &other, NOW),
        Err(RailError::TaskAlreadyLocked(_))
    ));
    assert_eq!(rail.balance(&addr(3)).unwrap(), 90_000);
    assert!(rail.audit().unwrap().is_balanced());
}

#[test]
fn bad_payments_are_refused_with_codes() {
    let rail = in_memory_rail();
    rail.faucet(&addr(4), 100_000, NOW).unwrap();
    let challenge = challenge(&rail, 10_000);

    let check = |header: &str, now: u64, code: &str| {
        let err = verify(&rail, &challenge, header, now).unwrap_err();
        assert_eq!(err.code(), code, "{err}");
        assert!(err.is_payment_error(), "{err}");
    };

    // Signed for another amount, payTo or resource: the client paid a different challenge.
    let mut cheaper = challenge.clone();
    cheaper.accepts[0].amount = x402::Units(9_999);
    let mut p = client::pay_local(&cheaper, &key(4), NOW, None).unwrap();
    check(&p.header_v2().unwrap().1, NOW, "amount_mismatch");
    // … even when it claims to accept the right terms.
    p.v2.accepted = challenge.accepts[0].clone();
    check(&p.header_v2().unwrap().1, NOW, "amount_mismatch");
    let v1 = p.header_v1().unwrap().1;
    let err = rail
        .verify_payment(
            &Payment::from_headers(None, Some(&v1)).unwrap().unwrap(),
            &challenge,
            NOW,
        )
        .unwrap_err();
    assert_eq!(err.code(), "amount_mismatch");

    let mut elsewhere = challenge.clone();
    elsewhere.accepts[0].pay_to = addr(66);
    let p = client::pay_local(&elsewhere, &key(4), NOW, None).unwrap();
    check(&p.header_v2().unwrap().1, NOW, "recipient_mismatch");

    let mut other_resource = challenge.clone();
    other_resource.resource.url = "http://127.0.0.1:8080/v1/other".into();
    let mut p = client::pay_local(&other_resource, &key(4), NOW, None).unwrap();
    check(&p.header_v2().unwrap().1, NOW, "terms_mismatch");
    p.v2.resource = None; // the signed resource still differs
    check(&p.header_v2().unwrap().1, NOW, "terms_mismatch");

    // Window: too early, expired, too long.
    let header = pay_header(&challenge, &key(4), NOW);
    check(&header, NOW - 31_000, "payment_not_yet_valid");
    check(&header, NOW + 300_000, "payment_expired");
    let mut long = challenge.clone();
    long.accepts[0].max_timeout_seconds = 3600;
    let p = client::pay_local(&long, &key(4), NOW, None).unwrap();
    let mut h = p.v2.clone();
    h.accepted = challenge.accepts[0].clone();
    check(&h.to_header().unwrap(), NOW, "payment_window_too_long");

    // Tampered payload: the signature no longer verifies.
    let p = client::pay_local(&challenge, &key(4), NOW, None).unwrap();
    let mut tampered = p.v2.clone();
    tampered.payload["authorization"]["from"] = addr(5).into();
    check(&tampered.to_header().unwrap(), NOW, "invalid_signature");
    let mut garbage = p.v2.clone();
    garbage.payload.remove("signature");
    check(&garbage.to_header().unwrap(), NOW, "invalid_payload");

    // Wrong network or scheme.
    let mut net = p.v2.clone();
    net.accepted.network = "eip155:8453".into();
    check(&net.to_header().unwrap(), NOW, "invalid_network");
    let mut scheme = p.v2.clone();
    scheme.accepted.scheme = "upto".into();
    check(&scheme.to_header().unwrap(), NOW, "invalid_scheme");

    // A payer without funds.
    let poor = pay_header(&challenge, &key(6), NOW);
    check(&poor, NOW, "insufficient_funds");

    // A challenge not issued by this rail is the gateway's error, not the client's.
    let foreign = PaymentRequired::new(resource(), vec![elsewhere.accepts[0].clone()]);
    let err = verify(&rail, &foreign, &header, NOW).unwrap_err();
    assert!(!err.is_payment_error());

    // Nothing moved.
    assert_eq!(rail.balance(&addr(4)).unwrap(), 100_000);
    assert_eq!(rail.audit().unwrap().locked_tasks, 0);
}

#[test]
fn funds_spent_between_verify_and_lock_are_refused_atomically() {
    let rail = in_memory_rail();
    rail.faucet(&addr(7), 15_000, NOW).unwrap();
    let challenge = challenge(&rail, 10_000);
    let a = verify(
        &rail,
        &challenge,
        &pay_header(&challenge, &key(7), NOW),
        NOW,
    )
    .unwrap();
    let b = verify(
        &rail,
        &challenge,
        &pay_header(&challenge, &key(7), NOW),
        NOW,
    )
    .unwrap();
    rail.lock_payment(task(1), &a, NOW).unwrap();
    let err = rail.lock_payment(task(2), &b, NOW).unwrap_err();
    assert!(matches!(
        err,
        RailError::InsufficientFunds {
            balance: 5000,
            needed: 10_000,
            ..
        }
    ));
    // The refused lock consumed nothing: its nonce is still unused and no escrow exists.
    assert_eq!(rail.read(|r| r.nonce_used(b.nonce())).unwrap(), None);
    assert!(rail.escrow(task(2)).unwrap().is_none());
    // Expired by the time of the lock.
    rail.faucet(&addr(7), 10_000, NOW).unwrap();
    let err = rail
        .lock_payment(task(2), &b, NOW + 10_000_000)
        .unwrap_err();
    assert_eq!(err.code(), "payment_expired");
}

#[test]
fn capture_and_refund_are_idempotent_and_exclusive() {
    let rail = in_memory_rail();
    rail.faucet(&addr(8), 100_000, NOW).unwrap();
    let challenge = challenge(&rail, 10_000);
    for t in [1, 2] {
        let v = verify(
            &rail,
            &challenge,
            &pay_header(&challenge, &key(8), NOW),
            NOW,
        )
        .unwrap();
        rail.lock_payment(task(t), &v, NOW).unwrap();
    }
    let p = plan(&[(21, 5000)], 2000);
    let first = rail.capture_task(task(1), &p, NOW).unwrap();
    let balances = rail.read(|r| r.balances()).unwrap();
    // A retry after a crash returns the stored receipt and pays nothing again.
    let second = rail.capture_task(task(1), &p, NOW + 99).unwrap();
    assert_eq!(first, second);
    assert_eq!(rail.read(|r| r.balances()).unwrap(), balances);
    assert!(matches!(
        rail.capture_task(task(1), &plan(&[(21, 6000)], 2000), NOW),
        Err(RailError::PlanConflict(_))
    ));
    assert!(matches!(
        rail.refund_task(task(1), NOW),
        Err(RailError::AlreadyCaptured(_))
    ));

    let r1 = rail.refund_task(task(2), NOW).unwrap();
    let r2 = rail.refund_task(task(2), NOW + 1).unwrap();
    assert_eq!(r1, r2);
    assert!(matches!(
        rail.capture_task(task(2), &p, NOW),
        Err(RailError::AlreadyRefunded(_))
    ));
    assert_eq!(rail.balance(&addr(8)).unwrap(), 90_000);
    assert!(matches!(
        rail.refund_task(task(3), NOW),
        Err(RailError::UnknownTask(_))
    ));
    assert!(matches!(
        rail.capture_task(task(3), &p, NOW),
        Err(RailError::UnknownTask(_))
    ));

    let s1 = rail.escrow(task(1)).unwrap().unwrap();
    assert_eq!(s1.state, EscrowState::Captured);
    assert_eq!(s1.receipt, Some(first));
    assert_eq!(
        rail.escrow(task(2)).unwrap().unwrap().state,
        EscrowState::Refunded
    );
    assert!(rail.audit().unwrap().is_balanced());
}

#[test]
fn bad_capture_plans_change_nothing() {
    let rail = in_memory_rail();
    rail.faucet(&addr(9), 10_000, NOW).unwrap();
    let challenge = challenge(&rail, 10_000);
    let v = verify(
        &rail,
        &challenge,
        &pay_header(&challenge, &key(9), NOW),
        NOW,
    )
    .unwrap();
    rail.lock_payment(task(1), &v, NOW).unwrap();
    let over = plan(&[(21, 6000), (22, 6000)], 0);
    assert!(matches!(
        rail.capture_task(task(1), &over, NOW),
        Err(RailError::InvalidPlan(_))
    ));
    let mut bad_addr = plan(&[(21, 1000)], 0);
    bad_addr.payouts[0].worker = "0xnot-a-local-address".into();
    let err = rail.capture_task(task(1), &bad_addr, NOW).unwrap_err();
    assert!(
        matches!(
            err,
            RailError::InvalidAddress {
                field: "worker",
                ..
            }
        ),
        "{err}"
    );
    assert!(!err.is_payment_error());
    let mut bad_creator = plan(&[(21, 1000)], 500);
    bad_creator.commission.creator_wallet = Some("nope".into());
    assert!(rail.capture_task(task(1), &bad_creator, NOW).is_err());
    // Nothing was paid and the task can still be captured properly.
    assert_eq!(rail.balance(&addr(21)).unwrap(), 0);
    assert_eq!(
        rail.escrow(task(1)).unwrap().unwrap().state,
        EscrowState::Locked
    );
    rail.capture_task(task(1), &plan(&[(21, 10_000)], 0), NOW)
        .unwrap();
    assert_eq!(rail.balance(&addr(21)).unwrap(), 10_000);
    assert_eq!(rail.balance(&rail.address()).unwrap(), 0);
}

#[test]
fn faucet_is_dev_mode_only() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, rail) = file_rail(&dir, LocalRailConfig::default());
    let err = rail.faucet(&addr(1), 1, NOW).unwrap_err();
    assert!(matches!(err, RailError::FaucetDisabled));
    assert_eq!(rail.audit().unwrap().minted, 0);
    let dev = in_memory_rail();
    assert!(matches!(
        dev.faucet("not-an-address", 1, NOW),
        Err(RailError::InvalidAddress { .. })
    ));
    dev.faucet(&addr(1), u64::MAX, NOW).unwrap();
    assert!(matches!(
        dev.faucet(&addr(2), 1, NOW),
        Err(RailError::Overflow(_))
    ));
    assert!(dev.audit().unwrap().is_balanced());
}

#[test]
fn state_survives_reopening_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let challenge_now;
    let replay;
    let locked_header;
    {
        let (db, rail) = file_rail(&dir, dev_config());
        rail.faucet(&addr(1), 100_000, NOW).unwrap();
        let challenge = challenge(&rail, 10_000);
        replay = pay_header(&challenge, &key(1), NOW);
        let v = verify(&rail, &challenge, &replay, NOW).unwrap();
        rail.lock_payment(task(1), &v, NOW).unwrap();
        rail.capture_task(task(1), &plan(&[(11, 4000)], 1000), NOW)
            .unwrap();
        locked_header = pay_header(&challenge, &key(1), NOW);
        let v = verify(&rail, &challenge, &locked_header, NOW).unwrap();
        rail.lock_payment(task(2), &v, NOW).unwrap();
        challenge_now = challenge;
        drop(rail);
        drop(db);
    }
    // A restarted gateway, now without dev mode.
    let (_db, rail) = file_rail(&dir, LocalRailConfig::default());
    assert_eq!(rail.balance(&addr(1)).unwrap(), 80_000);
    assert_eq!(rail.balance(&addr(11)).unwrap(), 3600);
    assert_eq!(rail.balance(&addr(50)).unwrap(), 400);
    assert_eq!(rail.balance(&rail.address()).unwrap(), 6000);
    assert_eq!(
        rail.escrow(task(1)).unwrap().unwrap().state,
        EscrowState::Captured
    );
    assert_eq!(
        rail.escrow(task(2)).unwrap().unwrap().state,
        EscrowState::Locked
    );
    assert_eq!(rail.read(|r| r.locked_tasks()).unwrap(), vec![task(2)]);
    for h in [&replay, &locked_header] {
        assert!(matches!(
            verify(&rail, &challenge_now, h, NOW + 10),
            Err(RailError::NonceReplayed)
        ));
    }
    let audit = rail.audit().unwrap();
    assert!(audit.is_balanced());
    assert_eq!(audit.minted, 100_000);
    assert_eq!(audit.locked, 10_000);
    // Recovery: the gateway refunds the task it no longer knows.
    rail.refund_task(task(2), NOW + 20).unwrap();
    assert_eq!(rail.balance(&addr(1)).unwrap(), 90_000);
    drop(rail);
    drop(_db);

    // A read-only reader (another process, e.g. `d402 wallet balance`) sees it too.
    let ro = redb::ReadOnlyDatabase::open(dir.path().join("node.redb")).unwrap();
    let txn = ro.begin_read().unwrap();
    let reader = LedgerReader::new(&txn);
    assert_eq!(reader.balance(&addr(1).parse().unwrap()).unwrap(), 90_000);
    assert_eq!(reader.journal(0, 100).unwrap().len(), 7);
    drop(txn);
    drop(ro);

    // Reopening with another asset is refused.
    let db = Arc::new(Database::open(dir.path().join("node.redb")).unwrap());
    let mut other = LocalRailConfig::default();
    other.asset.id = "local:EURC".into();
    assert!(matches!(
        LocalRail::open(db, gateway_key(), other),
        Err(RailError::Config(_))
    ));
}

const GATEWAY_TASKS: TableDefinition<&[u8; 16], &str> = TableDefinition::new("gateway_tasks");

#[test]
fn lock_inside_the_gateways_transaction_is_atomic() {
    let dir = tempfile::tempdir().unwrap();
    let (db, rail) = file_rail(&dir, dev_config());
    rail.faucet(&addr(1), 10_000, NOW).unwrap();
    let challenge = challenge(&rail, 10_000);
    let v = verify(
        &rail,
        &challenge,
        &pay_header(&challenge, &key(1), NOW),
        NOW,
    )
    .unwrap();

    // The gateway's own write fails after the lock: nothing of either is committed.
    {
        let txn = db.begin_write().unwrap();
        rail.lock_in(&txn, task(1), &v, NOW).unwrap();
        txn.open_table(GATEWAY_TASKS)
            .unwrap()
            .insert(&task(1).0, "paid")
            .unwrap();
        txn.abort().unwrap();
    }
    assert_eq!(rail.balance(&addr(1)).unwrap(), 10_000);
    assert!(rail.escrow(task(1)).unwrap().is_none());

    let txn = db.begin_write().unwrap();
    rail.lock_in(&txn, task(1), &v, NOW).unwrap();
    txn.open_table(GATEWAY_TASKS)
        .unwrap()
        .insert(&task(1).0, "paid")
        .unwrap();
    txn.commit().unwrap();
    assert_eq!(rail.balance(&addr(1)).unwrap(), 0);
    let read = db.begin_read().unwrap();
    let t = read.open_table(GATEWAY_TASKS).unwrap();
    assert_eq!(t.get(&task(1).0).unwrap().unwrap().value(), "paid");
}

#[test]
fn concurrent_double_spend_locks_once() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, rail) = file_rail(&dir, dev_config());
    rail.faucet(&addr(1), 1_000_000, NOW).unwrap();
    let challenge = challenge(&rail, 10_000);
    let header = pay_header(&challenge, &key(1), NOW);
    let rail = Arc::new(rail);
    let handles: Vec<_> = (0..8u8)
        .map(|i| {
            let rail = rail.clone();
            let challenge = challenge.clone();
            let header = header.clone();
            std::thread::spawn(move || {
                let v = verify(&rail, &challenge, &header, NOW)?;
                rail.lock_payment(task(100 + i), &v, NOW)
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "{results:?}");
    assert!(
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| matches!(e, RailError::NonceReplayed))
    );
    assert_eq!(rail.balance(&addr(1)).unwrap(), 990_000);
}

#[test]
fn works_through_dyn_rail() {
    let rail: Arc<dyn Rail> = Arc::new(in_memory_rail());
    assert_eq!(rail.kind(), d402_protocol::RailKind::Local);
    assert_eq!(rail.network(), "d402:local");
    let local = in_memory_rail();
    local.faucet(&addr(1), 10_000, NOW).unwrap();
    let rail: Arc<dyn Rail> = Arc::new(local);
    let quote = rail
        .quote(&d402_settlement::QuoteRequest {
            capability: "web.page_to_markdown@1".parse().unwrap(),
            price_units: 10_000,
            creator_commission_bps: 0,
        })
        .unwrap();
    assert_eq!(quote.amount.units, 10_000);
    assert_eq!(quote.extra["domain"], "d402/payment/local/1");
    let req = rail.challenge(&quote, &resource()).unwrap();
    let challenge = PaymentRequired::new(resource(), vec![req]);
    let payment = decode_v2(&pay_header(&challenge, &key(1), NOW));
    let v = ready(rail.verify(&payment, &challenge, NOW)).unwrap();
    ready(rail.lock(task(1), &v, NOW)).unwrap();
    let status = ready(rail.escrow_status(task(1))).unwrap().unwrap();
    assert_eq!(status.state, EscrowState::Locked);
    let receipt = ready(rail.capture(task(1), &plan(&[(11, 1000)], 0), NOW)).unwrap();
    assert_eq!(receipt.body.charged.units, 10_000);
    assert!(matches!(
        ready(rail.refund(task(1), NOW)),
        Err(RailError::AlreadyCaptured(_))
    ));
    assert!(
        rail.quote(&d402_settlement::QuoteRequest {
            capability: "web.page_to_markdown@1".parse().unwrap(),
            price_units: 0,
            creator_commission_bps: 0,
        })
        .is_err()
    );
}

#[test]
fn refused_operations_leave_a_shared_transaction_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let (db, rail) = file_rail(&dir, dev_config());
    rail.faucet(&addr(1), 25_000, NOW).unwrap();
    let challenge = challenge(&rail, 10_000);
    let pays: Vec<_> = (0..3)
        .map(|_| {
            verify(
                &rail,
                &challenge,
                &pay_header(&challenge, &key(1), NOW),
                NOW,
            )
            .unwrap()
        })
        .collect();
    let journal_before = rail.read(|r| r.journal(0, 100)).unwrap().len();

    // One transaction, several operations, one commit (group commit).
    let txn = db.begin_write().unwrap();
    rail.lock_in(&txn, task(1), &pays[0], NOW).unwrap();
    rail.lock_in(&txn, task(2), &pays[1], NOW).unwrap();
    let err = rail.lock_in(&txn, task(3), &pays[2], NOW).unwrap_err();
    assert!(
        matches!(err, RailError::InsufficientFunds { balance: 5000, .. }),
        "{err}"
    );
    assert!(matches!(
        rail.lock_in(&txn, task(4), &pays[0], NOW),
        Err(RailError::NonceReplayed)
    ));
    let mut bad = plan(&[(11, 3000), (12, 3000)], 1000);
    bad.payouts[1].worker = "not-an-address".into();
    assert!(matches!(
        rail.capture_in(&txn, task(1), &bad, NOW),
        Err(RailError::InvalidAddress { .. })
    ));
    let receipt = rail
        .capture_in(&txn, task(1), &plan(&[(11, 3000)], 1000), NOW)
        .unwrap();
    rail.refund_in(&txn, task(2), NOW).unwrap();
    assert!(matches!(
        rail.refund_in(&txn, task(1), NOW),
        Err(RailError::AlreadyCaptured(_))
    ));
    txn.commit().unwrap();

    assert_eq!(rail.balance(&addr(1)).unwrap(), 15_000);
    assert_eq!(rail.balance(&addr(11)).unwrap(), 2700);
    assert_eq!(rail.balance(&addr(12)).unwrap(), 0);
    assert_eq!(rail.balance(&rail.address()).unwrap(), 7000);
    assert!(rail.escrow(task(3)).unwrap().is_none());
    assert_eq!(rail.read(|r| r.nonce_used(pays[2].nonce())).unwrap(), None);
    // Lock, lock, capture (creator, worker, gateway), refund: 6 entries, no strays.
    let journal = rail.read(|r| r.journal(0, 100)).unwrap();
    assert_eq!(journal.len() - journal_before, 6);
    let entries = rail.read(|r| r.task_entries(&task(1))).unwrap();
    let refs: Vec<_> = entries[1..].iter().map(|e| e.tx_ref()).collect();
    assert_eq!(refs, receipt.body.tx_refs);
    assert!(rail.audit().unwrap().is_balanced());
}
