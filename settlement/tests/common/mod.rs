//! Shared helpers for the settlement integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    future::Future,
    pin::pin,
    sync::Arc,
    task::{Context, Poll, Waker},
};

use d402_protocol::SigningKey;
use d402_settlement::{
    LocalRail, LocalRailConfig, QuoteRequest, Rail, RailError, VerifiedPayment, client, wallet,
    x402::{self, Payment, PaymentRequired, ResourceInfo},
};

pub const NOW: u64 = 1_764_000_000_000;
pub const URL: &str = "http://127.0.0.1:8080/v1/tasks";

pub fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

pub fn addr(n: u8) -> String {
    wallet::address(&key(n))
}

pub fn gateway_key() -> SigningKey {
    key(200)
}

pub fn dev_config() -> LocalRailConfig {
    LocalRailConfig {
        dev_mode: true,
        ..LocalRailConfig::default()
    }
}

pub fn in_memory_rail() -> LocalRail {
    let db = redb::Database::builder()
        .create_with_backend(redb::backends::InMemoryBackend::new())
        .expect("in-memory redb");
    LocalRail::open(Arc::new(db), gateway_key(), dev_config()).expect("open rail")
}

pub fn resource() -> ResourceInfo {
    ResourceInfo {
        url: URL.into(),
        description: Some("web.page_to_markdown@1".into()),
        mime_type: Some("application/json".into()),
    }
}

/// The 402 challenge the gateway sends for a task at `price` units.
pub fn challenge(rail: &LocalRail, price: u64) -> PaymentRequired {
    let quote = rail
        .quote(&QuoteRequest {
            capability: "web.page_to_markdown@1".parse().expect("capability"),
            price_units: price,
            creator_commission_bps: 1000,
        })
        .expect("quote");
    let req = rail.challenge(&quote, &resource()).expect("challenge");
    PaymentRequired::new(resource(), vec![req])
}

/// The client's `PAYMENT-SIGNATURE` value for `challenge`, through the real header.
pub fn pay_header(challenge: &PaymentRequired, payer: &SigningKey, now: u64) -> String {
    let header = challenge.to_header().expect("encode 402");
    let seen = client::read_challenge(Some(&header), None).expect("read 402");
    client::pay_local(&seen, payer, now, None)
        .expect("pay")
        .header_v2()
        .expect("header")
        .1
}

pub fn decode_v2(value: &str) -> Payment {
    Payment::from_headers(Some(value), None)
        .expect("decode")
        .expect("present")
}

pub fn verify(
    rail: &LocalRail,
    challenge: &PaymentRequired,
    header: &str,
    now: u64,
) -> Result<VerifiedPayment, RailError> {
    rail.verify_payment(&decode_v2(header), challenge, now)
}

/// Polls a rail future that completes without waiting (the local rail's do).
pub fn ready<T>(fut: impl Future<Output = T>) -> T {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("local rail futures complete on first poll"),
    }
}

pub fn x402_ok(h: &str) -> x402::SettlementResponse {
    x402::SettlementResponse::from_header(h).expect("payment response")
}
