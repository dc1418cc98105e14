//! Property test of the local ledger: over random sequences of faucet, pay+lock, capture
//! with random splits, refund and replayed payments, every balance matches a model to the
//! unit, the sum of all balances plus locked escrow changes only by the faucet, nothing
//! underflows, and a replayed nonce is always refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::*;
use d402_protocol::{Cid, PublicKey, TaskId};
use d402_settlement::{
    CapturePlan, CommissionTerms, EscrowState, LocalRail, RailError, VerifiedPayment, WorkerPayout,
    wallet, x402::PaymentRequired,
};
use proptest::prelude::*;

/// Accounts 0..ACCOUNTS are payers and workers; the creator and the gateway are extra.
const ACCOUNTS: u8 = 5;
const CREATOR: u8 = 50;

#[derive(Debug, Clone)]
enum Op {
    Faucet {
        who: u8,
        units: u64,
    },
    PayLock {
        payer: u8,
        price: u64,
    },
    Capture {
        pick: usize,
        workers: Vec<(u8, u16)>,
        bps: u16,
        retry_other_plan: bool,
    },
    Refund {
        pick: usize,
    },
    Replay {
        pick: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..ACCOUNTS, 0u64..200_000).prop_map(|(who, units)| Op::Faucet { who, units }),
        4 => (0..ACCOUNTS, 1u64..60_000).prop_map(|(payer, price)| Op::PayLock { payer, price }),
        3 => (
            any::<usize>(),
            proptest::collection::vec((0..ACCOUNTS, 0u16..=10_000), 0..4),
            prop_oneof![Just(0u16), Just(1000u16), Just(10_000u16), 0u16..=10_000],
            any::<bool>(),
        )
            .prop_map(|(pick, workers, bps, retry_other_plan)| Op::Capture {
                pick,
                workers,
                bps,
                retry_other_plan,
            }),
        2 => any::<usize>().prop_map(|pick| Op::Refund { pick }),
        2 => any::<usize>().prop_map(|pick| Op::Replay { pick }),
    ]
}

struct Task {
    id: TaskId,
    payer: PublicKey,
    units: u64,
    state: EscrowState,
    plan: Option<CapturePlan>,
}

struct Model {
    balances: BTreeMap<PublicKey, u64>,
    minted: u64,
    tasks: Vec<Task>,
    /// Locked payments: the challenge, the header and the verified payment.
    paid: Vec<(PaymentRequired, String, VerifiedPayment)>,
    next_task: u64,
}

impl Model {
    fn credit(&mut self, who: PublicKey, units: u64) {
        let b = self.balances.entry(who).or_default();
        *b = b.checked_add(units).expect("model balance overflow");
    }
    fn debit(&mut self, who: PublicKey, units: u64) {
        let b = self.balances.entry(who).or_default();
        *b = b.checked_sub(units).expect("model balance underflow");
    }
    fn balance(&self, who: &PublicKey) -> u64 {
        self.balances.get(who).copied().unwrap_or(0)
    }
    fn new_task(&mut self) -> TaskId {
        self.next_task += 1;
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.next_task.to_be_bytes());
        TaskId(id)
    }
}

fn pk(n: u8) -> PublicKey {
    wallet::public_key(&key(n))
}

fn gateway() -> PublicKey {
    wallet::public_key(&gateway_key())
}

fn make_plan(units: u64, workers: &[(u8, u16)], bps: u16) -> CapturePlan {
    let mut left = units;
    let payouts = workers
        .iter()
        .enumerate()
        .map(|(i, &(w, frac))| {
            let gross = (u128::from(units) * u128::from(frac) / 10_000) as u64;
            let gross = gross.min(left);
            left -= gross;
            WorkerPayout {
                worker: addr(w),
                gross,
                claim_cid: Cid::raw(&[w, i as u8]),
            }
        })
        .collect();
    CapturePlan {
        payouts,
        commission: CommissionTerms {
            registration_cid: Some(Cid::raw(b"registration")),
            bps,
            creator_wallet: Some(addr(CREATOR)),
        },
    }
}

fn apply(rail: &LocalRail, m: &mut Model, op: &Op, now: u64) -> Result<(), TestCaseError> {
    match op.clone() {
        Op::Faucet { who, units } => {
            rail.faucet(&addr(who), units, now).expect("faucet");
            m.credit(pk(who), units);
            m.minted += units;
        }
        Op::PayLock { payer, price } => {
            let challenge = challenge(rail, price);
            let header = pay_header(&challenge, &key(payer), now);
            let verified = verify(rail, &challenge, &header, now);
            if m.balance(&pk(payer)) < price {
                prop_assert!(
                    matches!(verified, Err(RailError::InsufficientFunds { .. })),
                    "{verified:?}"
                );
                return Ok(());
            }
            let verified = verified.expect("verify");
            let id = m.new_task();
            let lock = rail.lock_payment(id, &verified, now).expect("lock");
            prop_assert!(!lock.already_locked);
            m.debit(pk(payer), price);
            m.tasks.push(Task {
                id,
                payer: pk(payer),
                units: price,
                state: EscrowState::Locked,
                plan: None,
            });
            m.paid.push((challenge, header, verified));
        }
        Op::Capture {
            pick,
            workers,
            bps,
            retry_other_plan,
        } => {
            if m.tasks.is_empty() {
                return Ok(());
            }
            let i = pick % m.tasks.len();
            let (id, units, state) = (m.tasks[i].id, m.tasks[i].units, m.tasks[i].state);
            let plan = make_plan(units, &workers, bps);
            let result = rail.capture_task(id, &plan, now);
            match state {
                EscrowState::Locked => {
                    let receipt = result.expect("capture");
                    let mut paid = 0u64;
                    for p in &plan.payouts {
                        let creator = (u128::from(p.gross) * u128::from(bps) / 10_000) as u64;
                        m.credit(pk(CREATOR), creator);
                        m.credit(p.worker.parse().expect("worker"), p.gross - creator);
                        paid += p.gross;
                    }
                    m.credit(gateway(), units - paid);
                    let sum: u64 = receipt.body.transfers.iter().map(|t| t.units).sum();
                    prop_assert_eq!(sum, units);
                    m.tasks[i].state = EscrowState::Captured;
                    m.tasks[i].plan = Some(plan);
                }
                EscrowState::Captured => {
                    let first = m.tasks[i].plan.clone().expect("plan");
                    if retry_other_plan && plan != first {
                        prop_assert!(
                            matches!(result, Err(RailError::PlanConflict(_))),
                            "{result:?}"
                        );
                    } else {
                        let again = rail.capture_task(id, &first, now).expect("retry");
                        let stored = rail.escrow(id).expect("escrow").expect("some");
                        prop_assert_eq!(Some(again), stored.receipt);
                    }
                }
                EscrowState::Refunded => {
                    prop_assert!(
                        matches!(result, Err(RailError::AlreadyRefunded(_))),
                        "{result:?}"
                    );
                }
            }
        }
        Op::Refund { pick } => {
            if m.tasks.is_empty() {
                return Ok(());
            }
            let i = pick % m.tasks.len();
            let (id, payer, units, state) = (
                m.tasks[i].id,
                m.tasks[i].payer,
                m.tasks[i].units,
                m.tasks[i].state,
            );
            let result = rail.refund_task(id, now);
            match state {
                EscrowState::Locked => {
                    result.expect("refund");
                    m.credit(payer, units);
                    m.tasks[i].state = EscrowState::Refunded;
                }
                EscrowState::Refunded => {
                    prop_assert!(result.is_ok(), "{result:?}");
                }
                EscrowState::Captured => {
                    prop_assert!(
                        matches!(result, Err(RailError::AlreadyCaptured(_))),
                        "{result:?}"
                    );
                }
            }
        }
        Op::Replay { pick } => {
            if m.paid.is_empty() {
                return Ok(());
            }
            let (challenge, header, verified) = m.paid[pick % m.paid.len()].clone();
            let again = verify(rail, &challenge, &header, now);
            prop_assert!(matches!(again, Err(RailError::NonceReplayed)), "{again:?}");
            let other_task = m.new_task();
            let lock = rail.lock_payment(other_task, &verified, now);
            prop_assert!(matches!(lock, Err(RailError::NonceReplayed)), "{lock:?}");
        }
    }
    Ok(())
}

fn check(rail: &LocalRail, m: &Model) -> Result<(), TestCaseError> {
    let audit = rail.audit().expect("audit");
    prop_assert!(audit.is_balanced(), "{audit:?}");
    prop_assert_eq!(audit.minted, m.minted);
    let locked: u64 = m
        .tasks
        .iter()
        .filter(|t| t.state == EscrowState::Locked)
        .map(|t| t.units)
        .sum();
    prop_assert_eq!(audit.locked, u128::from(locked));
    let stored: BTreeMap<PublicKey, u64> = rail
        .read(|r| r.balances())
        .expect("balances")
        .into_iter()
        .filter(|(_, b)| *b > 0)
        .collect();
    let model: BTreeMap<PublicKey, u64> = m
        .balances
        .iter()
        .filter(|(_, b)| **b > 0)
        .map(|(k, v)| (*k, *v))
        .collect();
    prop_assert_eq!(stored, model);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn ledger_conserves_money_and_refuses_replays(ops in proptest::collection::vec(op(), 1..40)) {
        let rail = in_memory_rail();
        let mut m = Model {
            balances: BTreeMap::new(),
            minted: 0,
            tasks: Vec::new(),
            paid: Vec::new(),
            next_task: 0,
        };
        for (i, op) in ops.iter().enumerate() {
            let now = NOW + i as u64 * 1000;
            apply(&rail, &mut m, op, now)?;
            check(&rail, &m)?;
        }
    }
}
