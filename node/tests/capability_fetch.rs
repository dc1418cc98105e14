//! A capability first published elsewhere: a node serves its store's manifest, module and
//! registration over `/d402/blob/1`, and `d402 capability fetch` (the real binary, its own
//! network identity) gets them by CID, verifies them and imports them, so that `--offer`
//! resolves on the second node.

#![allow(clippy::unwrap_used)]

use std::{net::Ipv4Addr, process::Command};

use d402_capabilities::{CapabilityRegistration, Manifest, Registration};
use d402_node::{
    capstore::{self, CapStore, Source},
    market::{
        blobs::BlobStore,
        service::{self, Services},
    },
    net::{self, NetConfig},
    state::State,
};
use d402_protocol::{Chain, Cid, PublicKey, SigningKey};
use libp2p::multiaddr::Protocol;

const BIN: &str = env!("CARGO_BIN_EXE_d402");

fn echo_wasm() -> Vec<u8> {
    wat::parse_str(
        r#"(module
  (memory (export "memory") 2)
  (func (export "d402_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "d402_run") (param i32) (param i32) (result i64)
    (i64.or (i64.shl (i64.extend_i32_u (local.get 0)) (i64.const 32))
            (i64.extend_i32_u (local.get 1)))))"#,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_a_capability_by_cid_from_a_peer_and_offer_it() {
    let publisher_dir = tempfile::tempdir().unwrap();
    let operator_dir = tempfile::tempdir().unwrap();

    // The publisher's node has the capability in its store, with a signed registration.
    let wasm = echo_wasm();
    let manifest = Manifest::template("elsewhere.echo", 1, Cid::raw(&wasm), Vec::new()).unwrap();
    let creator = PublicKey(SigningKey::from_bytes(&[8; 32]).verifying_key().to_bytes());
    let wallets = [(Chain::Local, creator.to_string())].into_iter().collect();
    let body = Registration::for_manifest(&manifest, 500, wallets, None, 1).unwrap();
    let reg = CapabilityRegistration::sign(body, &SigningKey::from_bytes(&[9; 32])).unwrap();
    let imported = CapStore::new(publisher_dir.path())
        .import(&manifest, &wasm, Some(&reg), false)
        .unwrap();
    let reg_cid = imported.registration_cid.unwrap();

    let state = State::open(publisher_dir.path()).unwrap();
    let mut cfg = NetConfig::new(Ipv4Addr::LOCALHOST.into(), 0);
    cfg.quic = false;
    let node = net::start(cfg, &SigningKey::from_bytes(&[7; 32]), state)
        .await
        .unwrap();
    let handle = node.handle();
    let blobs = BlobStore::new(1024 * 1024);
    blobs.serve_capstore(publisher_dir.path());
    let service = service::serve(
        &handle,
        Services {
            worker: None,
            coordinator: None,
            validator: None,
            blobs,
        },
        16,
    )
    .await
    .unwrap();
    let addr = handle
        .listen_addrs()
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.iter().any(|p| matches!(p, Protocol::Tcp(_))))
        .unwrap();
    let peer = format!("{addr}/p2p/{}", node.peer_id());

    let fetch = |extra: &[&str]| {
        let op = operator_dir.path().to_str().unwrap().to_string();
        let peer = peer.clone();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            let mut args = vec![
                "capability".to_string(),
                "fetch".into(),
                "--state".into(),
                op,
                "--peer".into(),
                peer,
            ];
            args.extend(extra);
            Command::new(BIN).args(&args).output().unwrap()
        })
    };

    // Unknown CID: a clear error, nothing written.
    let out = fetch(&["--manifest-cid", &Cid::raw(b"nothing").to_string()])
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not have"), "{err}");
    assert!(!operator_dir.path().join(capstore::STORE_DIR).exists());

    // The real thing.
    let out = fetch(&[
        "--manifest-cid",
        &imported.manifest_cid.to_string(),
        "--registration-cid",
        &reg_cid.to_string(),
    ])
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["capability"], "elsewhere.echo@1");
    assert_eq!(line["registration_cid"], reg_cid.to_string());

    // `--offer elsewhere.echo@1` now resolves on the operator's node, from its own store.
    let resolved = capstore::resolve_offer(operator_dir.path(), &manifest.capability()).unwrap();
    assert_eq!(resolved.source, Source::Store);
    assert_eq!(resolved.manifest_cid, imported.manifest_cid);
    assert_eq!(resolved.wasm, wasm);
    assert_eq!(resolved.registration, Some(reg));

    service.abort();
    node.shutdown().await;
}
