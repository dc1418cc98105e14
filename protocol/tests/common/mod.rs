//! Sample messages and proptest strategies shared by the protocol tests.
#![allow(dead_code, missing_docs)]

use std::collections::BTreeMap;

use d402_protocol::{
    Amount, CapabilityRef, Chain, Cid, PublicKey, RailKind, SigningKey, TaskId, messages::*,
};
use proptest::prelude::*;

pub fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

pub fn usdc(units: u64) -> Amount {
    Amount {
        asset: "local:USDC".into(),
        units,
    }
}

pub fn wallets() -> BTreeMap<Chain, String> {
    [
        (
            Chain::Local,
            "5LocaLWaLLet1111111111111111111111111111111".to_string(),
        ),
        (
            Chain::Solana,
            "So11111111111111111111111111111111111111112".to_string(),
        ),
    ]
    .into_iter()
    .collect()
}

pub fn capability() -> CapabilityRef {
    "web.page_to_markdown@1".parse().unwrap()
}

pub fn offer() -> Offer {
    Offer {
        v: 1,
        capability: capability(),
        manifest_cid: Cid::dag_cbor(b"manifest"),
        price_floor: usdc(1_000),
        rails: vec![RailKind::Local, RailKind::SolanaTaskEscrow],
        payout: wallets(),
        issued_at: 1_700_000_000_000,
        expires_at: 1_700_000_600_000,
    }
}

pub fn bid_request() -> BidRequest {
    BidRequest {
        v: 1,
        task_id: TaskId([9; 16]),
        capability: capability(),
        manifest_cid: Cid::dag_cbor(b"manifest"),
        input_cid: Cid::raw(br#"{"url":"https://example.com/"}"#),
        input_len: 30,
        rail: RailKind::Local,
        max_price: usdc(3_000),
        deadline: 1_700_000_030_000,
        standing: 1,
    }
}

pub fn bid() -> Bid {
    Bid {
        v: 1,
        task_id: TaskId([9; 16]),
        request_cid: Cid::dag_cbor(b"request"),
        manifest_cid: Cid::dag_cbor(b"manifest"),
        price: usdc(2_000),
        rail: RailKind::Local,
        payout: wallets(),
        expires_at: 1_700_000_010_000,
        uses: 1,
    }
}

pub fn lease() -> Lease {
    Lease {
        v: 1,
        task_id: TaskId([9; 16]),
        worker: PublicKey(key(2).verifying_key().to_bytes()),
        bid_cid: Cid::dag_cbor(b"bid"),
        manifest_cid: Cid::dag_cbor(b"manifest"),
        input: br#"{"url":"https://example.com/"}"#.to_vec(),
        snapshot_cid: None,
        price: usdc(2_000),
        deadline: 1_700_000_030_000,
        fencing_token: 1,
    }
}

pub fn claim() -> Claim {
    let output = b"# Example\n\nHello.\n".to_vec();
    Claim {
        v: 1,
        task_id: TaskId([9; 16]),
        lease_cid: Cid::dag_cbor(b"lease"),
        fencing_token: 1,
        output_cid: Cid::raw(&output),
        output,
        snapshot_cid: Some(Cid::raw(b"<html></html>")),
        snapshot: Some(SnapshotMeta {
            final_url: "https://example.com/".into(),
            status: 200,
            len: 13,
            snapshotter: "fetch".into(),
            taken_at: 1_700_000_001_000,
        }),
        fuel_used: 123_456,
        finished_at: 1_700_000_002_000,
    }
}

pub fn verdict() -> Verdict {
    Verdict {
        v: 1,
        task_id: TaskId([9; 16]),
        claim_cid: Cid::dag_cbor(b"claim"),
        output_cid: Cid::raw(b"out"),
        outcome: VerdictOutcome::Disagree {
            recomputed: Cid::raw(b"other"),
        },
        fuel_used: 99,
        judged_at: 1_700_000_003_000,
    }
}

pub fn receipt() -> SettlementReceipt {
    SettlementReceipt {
        v: 1,
        task_id: TaskId([9; 16]),
        rail: RailKind::Local,
        payer: "PayerWaLLet".into(),
        charged: usdc(10_000),
        transfers: vec![
            Transfer {
                role: PayeeRole::Worker,
                to: "w".into(),
                units: 1_800,
                claim_cid: Some(Cid::dag_cbor(b"claim")),
                registration_cid: Some(Cid::dag_cbor(b"reg")),
            },
            Transfer {
                role: PayeeRole::Creator,
                to: "c".into(),
                units: 200,
                claim_cid: Some(Cid::dag_cbor(b"claim")),
                registration_cid: Some(Cid::dag_cbor(b"reg")),
            },
            Transfer {
                role: PayeeRole::Gateway,
                to: "g".into(),
                units: 8_000,
                claim_cid: None,
                registration_cid: None,
            },
        ],
        tx_refs: vec!["ledger:1".into()],
        settled_at: 1_700_000_004_000,
    }
}

// ---- strategies ----

pub fn any_cid() -> impl Strategy<Value = Cid> {
    (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..16)).prop_map(|(raw, b)| {
        if raw { Cid::raw(&b) } else { Cid::dag_cbor(&b) }
    })
}

pub fn any_text(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[a-zA-Z0-9:/._ -]{{1,{max}}}")).unwrap()
}

pub fn any_amount() -> impl Strategy<Value = Amount> {
    (any_text(20), any::<u64>()).prop_map(|(asset, units)| Amount { asset, units })
}

pub fn any_rail() -> impl Strategy<Value = RailKind> {
    proptest::sample::select(RailKind::ALL.to_vec())
}

pub fn any_wallets() -> impl Strategy<Value = BTreeMap<Chain, String>> {
    (any_text(44), any_text(44), any_text(42)).prop_map(|(l, s, e)| {
        [(Chain::Local, l), (Chain::Solana, s), (Chain::Evm, e)]
            .into_iter()
            .collect()
    })
}

pub fn any_bid() -> impl Strategy<Value = Bid> {
    (
        any::<[u8; 16]>(),
        any_cid(),
        any_cid(),
        any_amount(),
        any_rail(),
        any_wallets(),
        any::<u64>(),
        1..=d402_protocol::messages::MAX_BID_USES,
    )
        .prop_map(
            |(t, request_cid, manifest_cid, price, rail, payout, expires_at, uses)| Bid {
                v: 1,
                task_id: TaskId(t),
                request_cid,
                manifest_cid,
                price,
                rail,
                payout,
                expires_at,
                uses,
            },
        )
}

pub fn any_lease() -> impl Strategy<Value = Lease> {
    (
        any::<[u8; 16]>(),
        any::<[u8; 32]>(),
        any_cid(),
        proptest::collection::vec(any::<u8>(), 0..256),
        proptest::option::of(any_cid()),
        any_amount(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(t, w, bid_cid, input, snapshot_cid, price, deadline, fencing_token)| Lease {
                v: 1,
                task_id: TaskId(t),
                worker: PublicKey(w),
                bid_cid,
                manifest_cid: Cid::dag_cbor(b"m"),
                input,
                snapshot_cid,
                price,
                deadline,
                fencing_token,
            },
        )
}

pub fn any_claim() -> impl Strategy<Value = Claim> {
    (
        any::<[u8; 16]>(),
        any_cid(),
        any::<u64>(),
        proptest::collection::vec(any::<u8>(), 0..512),
        proptest::option::of((any_text(100), 100u16..600, any::<u64>())),
        any::<u64>(),
    )
        .prop_map(
            |(t, lease_cid, fencing_token, output, snap, fuel_used)| Claim {
                v: 1,
                task_id: TaskId(t),
                lease_cid,
                fencing_token,
                output_cid: Cid::raw(&output),
                output,
                snapshot_cid: snap.as_ref().map(|(u, _, _)| Cid::raw(u.as_bytes())),
                snapshot: snap.map(|(final_url, status, len)| SnapshotMeta {
                    final_url,
                    status,
                    len,
                    snapshotter: "playwright".into(),
                    taken_at: 5,
                }),
                fuel_used,
                finished_at: 7,
            },
        )
}

pub fn any_verdict() -> impl Strategy<Value = Verdict> {
    let outcome = prop_oneof![
        Just(VerdictOutcome::Agree),
        any_cid().prop_map(|recomputed| VerdictOutcome::Disagree { recomputed }),
        any_text(100).prop_map(|reason| VerdictOutcome::Unable { reason }),
    ];
    (
        any::<[u8; 16]>(),
        any_cid(),
        any_cid(),
        outcome,
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(t, claim_cid, output_cid, outcome, fuel_used, judged_at)| Verdict {
                v: 1,
                task_id: TaskId(t),
                claim_cid,
                output_cid,
                outcome,
                fuel_used,
                judged_at,
            },
        )
}
