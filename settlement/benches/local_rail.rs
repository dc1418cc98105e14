//! Cost of the local rail per paid task on a real redb file, against the floor of a bare
//! redb write commit measured in the same run.
//!
//! `cargo bench -p d402-settlement --bench local_rail`
//!
//! - `floor/redb_commit`: one write transaction with one insert, committed (one fsync).
//! - `floor/sign_verify`: one ed25519 signature and one strict verification.
//! - `verify`: decode a `PAYMENT-SIGNATURE` header and verify it (signature, terms, window,
//!   nonce and balance reads).
//! - `paid_task`: the whole rail side of a paid task: the client signs, the gateway decodes
//!   and verifies, locks (one commit) and captures three payouts with a 10% commission and a
//!   signed receipt (one commit).
//! - `grouped_32/paid_task`: the same for 32 tasks whose locks share one write transaction
//!   and whose captures share another (group commit through the `_in` forms); throughput
//!   is reported per task.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::{hint::black_box, sync::Arc};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use d402_protocol::{Cid, Signable, Signed, SigningKey, TaskId};
use d402_settlement::{
    CapturePlan, CommissionTerms, LocalRail, LocalRailConfig, QuoteRequest, Rail, WorkerPayout,
    client, wallet,
    x402::{Payment, PaymentRequired, ResourceInfo},
};
use redb::{Database, TableDefinition};
use serde::{Deserialize, Serialize};

const NOW: u64 = 1_764_000_000_000;
const FLOOR: TableDefinition<u64, u64> = TableDefinition::new("bench_floor");

#[derive(Serialize, Deserialize)]
struct Body {
    n: u64,
}

impl Signable for Body {
    const DOMAIN: &'static str = "d402/bench/1";
    const KIND: &'static str = "bench";
    const MAX_BODY: usize = 64;
}

fn setup(dir: &tempfile::TempDir) -> (Arc<Database>, LocalRail, PaymentRequired) {
    let db = Arc::new(Database::create(dir.path().join("bench.redb")).unwrap());
    let config = LocalRailConfig {
        dev_mode: true,
        ..LocalRailConfig::default()
    };
    let rail = LocalRail::open(db.clone(), SigningKey::from_bytes(&[1; 32]), config).unwrap();
    let quote = rail
        .quote(&QuoteRequest {
            capability: "web.page_to_markdown@1".parse().unwrap(),
            price_units: 10_000,
            creator_commission_bps: 1000,
        })
        .unwrap();
    let resource = ResourceInfo {
        url: "http://127.0.0.1:8080/v1/tasks".into(),
        description: None,
        mime_type: None,
    };
    let challenge = PaymentRequired::new(
        resource.clone(),
        vec![rail.challenge(&quote, &resource).unwrap()],
    );
    (db, rail, challenge)
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (db, rail, challenge) = setup(&dir);
    let payer = SigningKey::from_bytes(&[2; 32]);
    rail.faucet(&wallet::address(&payer), u64::MAX / 2, NOW)
        .unwrap();
    let plan = CapturePlan {
        payouts: (3u8..6)
            .map(|w| WorkerPayout {
                worker: wallet::address(&SigningKey::from_bytes(&[w; 32])),
                gross: 2000,
                claim_cid: Cid::raw(&[w]),
            })
            .collect(),
        commission: CommissionTerms {
            registration_cid: Some(Cid::raw(b"registration")),
            bps: 1000,
            creator_wallet: Some(wallet::address(&SigningKey::from_bytes(&[9; 32]))),
        },
    };

    let mut group = c.benchmark_group("local_rail");
    let mut n = 0u64;
    group.bench_function("floor/redb_commit", |b| {
        b.iter(|| {
            n += 1;
            let txn = db.begin_write().unwrap();
            txn.open_table(FLOOR).unwrap().insert(n, n).unwrap();
            txn.commit().unwrap();
        })
    });
    let key = SigningKey::from_bytes(&[5; 32]);
    group.bench_function("floor/sign_verify", |b| {
        b.iter(|| {
            n += 1;
            let s = Signed::sign(Body { n }, &key).unwrap();
            black_box(s.verify()).unwrap();
        })
    });

    let header = client::pay_local(&challenge, &payer, NOW, None)
        .unwrap()
        .header_v2()
        .unwrap()
        .1;
    group.bench_function("verify", |b| {
        b.iter(|| {
            let p = Payment::from_headers(Some(&header), None).unwrap().unwrap();
            black_box(rail.verify_payment(&p, &challenge, NOW).unwrap());
        })
    });

    group.bench_function("paid_task", |b| {
        b.iter(|| {
            n += 1;
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&n.to_be_bytes());
            let task = TaskId(id);
            let (_, value) = client::pay_local(&challenge, &payer, NOW, None)
                .unwrap()
                .header_v2()
                .unwrap();
            let p = Payment::from_headers(Some(&value), None).unwrap().unwrap();
            let v = rail.verify_payment(&p, &challenge, NOW).unwrap();
            rail.lock_payment(task, &v, NOW).unwrap();
            black_box(rail.capture_task(task, &plan, NOW).unwrap());
        })
    });
    group.finish();

    const GROUP: u64 = 32;
    let mut grouped = c.benchmark_group("grouped_32");
    grouped.throughput(Throughput::Elements(GROUP));
    grouped.bench_function("paid_task", |b| {
        b.iter(|| {
            let mut tasks = Vec::with_capacity(GROUP as usize);
            for _ in 0..GROUP {
                n += 1;
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&n.to_be_bytes());
                let (_, value) = client::pay_local(&challenge, &payer, NOW, None)
                    .unwrap()
                    .header_v2()
                    .unwrap();
                let p = Payment::from_headers(Some(&value), None).unwrap().unwrap();
                tasks.push((
                    TaskId(id),
                    rail.verify_payment(&p, &challenge, NOW).unwrap(),
                ));
            }
            let txn = db.begin_write().unwrap();
            for (task, v) in &tasks {
                rail.lock_in(&txn, *task, v, NOW).unwrap();
            }
            txn.commit().unwrap();
            let txn = db.begin_write().unwrap();
            for (task, _) in &tasks {
                black_box(rail.capture_in(&txn, *task, &plan, NOW).unwrap());
            }
            txn.commit().unwrap();
        })
    });
    grouped.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
