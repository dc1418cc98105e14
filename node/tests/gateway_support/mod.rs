//! HTTP helpers shared by the gateway's integration tests: one request over a fresh
//! hyper connection, JSON bodies, local-rail balances and paying a 402 challenge.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{net::SocketAddr, path::Path, sync::Arc};

use d402_node::{
    gateway::{Gateway, GatewayConfig, GatewayParts, GatewayPolicy},
    market::{now_ms, reputation::Policy},
};
use d402_protocol::SigningKey;
use d402_settlement::{LocalRail, LocalRailConfig, client, x402::PAYMENT_REQUIRED};
use http_body_util::{BodyExt, Full};
use hyper::HeaderMap;
use serde_json::Value;

use crate::market_support::{MarketNode, TIMEOUT, coordinator_config, seed, start_gateway};

/// A gateway node (coordinator over libp2p, default reputation policy) in `dir` with a
/// dev-mode `local` rail in its redb, paid to `rail_key`.
pub async fn gateway_with_rail(dir: &Path, rail_key: SigningKey) -> (MarketNode, Arc<LocalRail>) {
    let gw = start_gateway(dir, seed(), 0, coordinator_config(), Policy::default()).await;
    let rail = LocalRail::open(
        gw.state.database().clone(),
        rail_key,
        LocalRailConfig {
            dev_mode: true,
            ..LocalRailConfig::default()
        },
    )
    .unwrap();
    (gw, Arc::new(rail))
}

/// The HTTP gateway on 127.0.0.1 (any port) over `gw`'s coordinator and `rail`, with
/// `policy`, the local wallet endpoints on.
pub async fn start_http(gw: &MarketNode, rail: &Arc<LocalRail>, policy: GatewayPolicy) -> Gateway {
    Gateway::start(
        GatewayConfig::new("127.0.0.1:0".parse().unwrap(), true),
        GatewayParts {
            rail: rail.clone(),
            coordinator: gw.coordinator.clone().unwrap(),
            net: gw.net.clone(),
            state: gw.state.clone(),
            policy,
        },
    )
    .await
    .unwrap()
}

/// One HTTP/1.1 request over a fresh connection: status, headers and body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Option<Value>,
) -> (u16, HeaderMap, Vec<u8>) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, v.as_str());
    }
    let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
    let req = req.body(Full::new(bytes::Bytes::from(bytes))).unwrap();
    let resp = tokio::time::timeout(TIMEOUT, sender.send_request(req))
        .await
        .expect("the gateway answers in time")
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (status, headers, body)
}

/// The body as JSON (panics with the body when it is not).
pub fn json_of(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// A new payer funded with `units` by the gateway's dev faucet: its key and address.
pub async fn funded_payer(addr: SocketAddr, units: u64) -> (SigningKey, String) {
    let payer = d402_settlement::wallet::generate().unwrap();
    let payer_addr = d402_settlement::wallet::address(&payer);
    let (status, _, body) = http(
        addr,
        "POST",
        "/v1/local/faucet",
        &[],
        Some(serde_json::json!({"address": payer_addr, "units": units.to_string()})),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json_of(&body)["units"], units.to_string());
    (payer, payer_addr)
}

/// A local-rail account's balance, through the gateway's wallet endpoint.
pub async fn balance(addr: SocketAddr, who: &str) -> u64 {
    let (status, _, body) =
        http(addr, "GET", &format!("/v1/local/accounts/{who}"), &[], None).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    json_of(&body)["units"].as_str().unwrap().parse().unwrap()
}

/// Asks for `request` without paying, expects the 402 and pays its challenge (at most
/// `max_price` units): the `PAYMENT-SIGNATURE` value.
pub async fn pay(addr: SocketAddr, payer: &SigningKey, request: &Value, max_price: u64) -> String {
    let (status, headers, body) = http(addr, "POST", "/v1/tasks", &[], Some(request.clone())).await;
    assert_eq!(status, 402, "{}", String::from_utf8_lossy(&body));
    let header = headers
        .get(PAYMENT_REQUIRED)
        .expect("PAYMENT-REQUIRED")
        .to_str()
        .unwrap();
    let challenge = client::read_challenge(Some(header), Some(&body)).unwrap();
    let payment = client::pay_local(&challenge, payer, now_ms(), Some(max_price)).unwrap();
    payment.header_v2().unwrap().1
}
