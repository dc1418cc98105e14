//! Discovery over real TCP on loopback: several nodes in one process, each with its own
//! swarm, event loop, key and redb database.

#![allow(clippy::unwrap_used)] // tests panic on failure by design

mod net_support;

use net_support::*;

/// Bootstrap → worker → gateway: the gateway finds the worker's capability through the
/// bootstrap they share, by Kademlia provider records and at the rendezvous point, and
/// both sides persist what they verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_bootstrap_worker_gateway() {
    init_logs();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let boot = start(dirs[0].path(), Role::Bootstrap, vec![]).await;
    let worker = start(dirs[1].path(), Role::Worker, vec![boot.host_port_spec()]).await;
    let cap = capability("web.page_to_markdown manifest");
    worker.handle.provide(cap).await.unwrap();
    let gateway = start(dirs[2].path(), Role::Gateway, vec![boot.host_port_spec()]).await;

    let w = worker.peer_id();
    let via_kad = find(&gateway.handle, cap, w, |p| p.via_kad).await;
    assert_eq!(via_kad.peer_id, w);
    find(&gateway.handle, cap, w, |p| {
        p.via_rendezvous && !p.addrs.is_empty()
    })
    .await;

    // The gateway dialled the worker it found and verified its signed record.
    let summary = eventually("gateway verified the worker", || {
        let h = gateway.handle.clone();
        async move {
            h.peers()
                .await
                .unwrap()
                .into_iter()
                .find(|p| p.peer_id == w && !p.addrs.is_empty())
        }
    })
    .await;
    // The worker is a DHT client: known, but not in the gateway's routing table.
    assert!(!summary.in_routing_table);
    assert!(
        summary
            .addrs
            .iter()
            .all(|a| a.to_string().contains("127.0.0.1"))
    );
    // Its signed record carries both transports on the same port number.
    let text: Vec<String> = summary.addrs.iter().map(|a| a.to_string()).collect();
    assert!(text.iter().any(|a| a.contains("/tcp/")), "{text:?}");
    assert!(text.iter().any(|a| a.ends_with("/quic-v1")), "{text:?}");

    // The bootstrap (a DHT server) is in the gateway's routing table and the learnt
    // PeerId matches the one the host:port led to.
    let table = gateway.handle.routing_table().await.unwrap();
    assert!(table.contains(&boot.peer_id()));
    let boots = gateway.handle.bootstraps().await.unwrap();
    assert_eq!(
        boots[0].peer_id.as_deref(),
        Some(boot.peer_id().to_string().as_str())
    );
    assert!(boots[0].connected);

    // Persisted (read through the running node's own handle: it holds the file).
    let persisted = gateway.state.known_peers().unwrap();
    let ids: Vec<Vec<u8>> = persisted.iter().map(|(id, _)| id.clone()).collect();
    assert!(ids.contains(&boot.peer_id().to_bytes()));
    assert!(ids.contains(&w.to_bytes()));
    let (_, boot_row) = persisted
        .iter()
        .find(|(id, _)| *id == boot.peer_id().to_bytes())
        .unwrap();
    assert!(boot_row.kad_server && boot_row.rendezvous_point);
    assert!(boot_row.protocols.iter().any(|p| p == "/d402/kad/1.0.0"));

    // The worker never appears as its own provider, and a capability nobody offers
    // returns nothing (and does not hang).
    let none = worker
        .handle
        .find_providers(capability("nobody offers this"), Default::default())
        .await
        .unwrap();
    assert!(none.is_empty());

    gateway.stop().await;
    worker.stop().await;
    boot.stop().await;
}

/// After the gateway restarts with the bootstrap gone, it reconnects to the worker from
/// the peers persisted in its database, with the same PeerId.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_gateway_reconnects_from_persisted_peers() {
    init_logs();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let boot = start(dirs[0].path(), Role::Bootstrap, vec![]).await;
    let worker = start(dirs[1].path(), Role::Worker, vec![boot.spec()]).await;
    let cap = capability("restart capability");
    worker.handle.provide(cap).await.unwrap();
    let gateway = start(dirs[2].path(), Role::Gateway, vec![boot.spec()]).await;
    let w = worker.peer_id();
    let g = gateway.peer_id();
    find(&gateway.handle, cap, w, |p| !p.addrs.is_empty()).await;
    eventually("gateway persisted the worker", || {
        let state = gateway.state.clone();
        async move {
            let peers = state.known_peers().ok()?;
            peers
                .iter()
                .any(|(id, p)| *id == w.to_bytes() && !p.addrs.is_empty())
                .then_some(())
        }
    })
    .await;

    let (gdir, gseed, grole) = gateway.stop().await;
    let boot_spec = boot.spec();
    boot.stop().await;
    eventually("worker saw the gateway leave", || {
        let h = worker.handle.clone();
        async move { (!h.connected_peers().await.unwrap().contains(&g)).then_some(()) }
    })
    .await;

    // Same state, same key, bootstrap still configured but dead.
    let gateway = start_with(&gdir, gseed, config(grole, vec![boot_spec]), grole).await;
    assert_eq!(gateway.peer_id(), g, "PeerId is stable across restarts");
    eventually("restarted gateway reconnects to the worker", || {
        let h = gateway.handle.clone();
        async move {
            h.connected_peers()
                .await
                .unwrap()
                .contains(&w)
                .then_some(())
        }
    })
    .await;
    let status = eventually("dead bootstrap is retried", || {
        let h = gateway.handle.clone();
        async move {
            let b = h.bootstraps().await.unwrap().remove(0);
            (b.failures >= 1 && b.last_error.is_some()).then_some(b)
        }
    })
    .await;
    assert!(!status.connected);

    gateway.stop().await;
    worker.stop().await;
}

/// Two bootstraps, one dead: discovery still works through the live one, and the dead one
/// is logged and retried while the node keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_bootstraps_one_dead() {
    init_logs();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let dead: d402_node::net::PeerSpec = format!("127.0.0.1:{}", dead_port()).parse().unwrap();
    let unresolvable: d402_node::net::PeerSpec = "no-such-host.invalid:9000".parse().unwrap();
    let boot = start(dirs[0].path(), Role::Bootstrap, vec![]).await;
    let worker = start(
        dirs[1].path(),
        Role::Worker,
        vec![dead.clone(), boot.host_port_spec()],
    )
    .await;
    let cap = capability("two bootstraps");
    worker.handle.provide(cap).await.unwrap();
    let gateway = start(
        dirs[2].path(),
        Role::Gateway,
        vec![dead, unresolvable, boot.host_port_spec()],
    )
    .await;

    find(&gateway.handle, cap, worker.peer_id(), |_| true).await;
    let statuses = eventually("both dead bootstraps retried", || {
        let h = gateway.handle.clone();
        async move {
            let s = h.bootstraps().await.unwrap();
            (s[0].failures >= 2 && s[1].failures >= 2 && s[2].connected).then_some(s)
        }
    })
    .await;
    assert!(statuses[0].last_error.is_some() && statuses[1].last_error.is_some());
    // Still alive and serving commands.
    assert!(!gateway.handle.listen_addrs().await.unwrap().is_empty());

    gateway.stop().await;
    worker.stop().await;
    boot.stop().await;
}

/// More than K (20) workers offer one capability: the sharded provider keys let a lookup
/// return every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_providers_exceed_one_key() {
    init_logs();
    const WORKERS: usize = 24;
    let boot_dir = tempfile::tempdir().unwrap();
    let boot = start(boot_dir.path(), Role::Bootstrap, vec![]).await;
    let cap = capability("popular capability");
    let mut dirs = Vec::new();
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let d = tempfile::tempdir().unwrap();
        let w = start(d.path(), Role::Worker, vec![boot.spec()]).await;
        w.handle.provide(cap).await.unwrap();
        dirs.push(d);
        workers.push(w);
    }
    let gdir = tempfile::tempdir().unwrap();
    let gateway = start(gdir.path(), Role::Gateway, vec![boot.spec()]).await;
    let found = eventually("all workers found through the DHT", || {
        let h = gateway.handle.clone();
        async move {
            let r = h.find_providers(cap, Default::default()).await.unwrap();
            let kad = r.iter().filter(|p| p.via_kad).count();
            (kad >= WORKERS).then_some(r)
        }
    })
    .await;
    for w in &workers {
        assert!(found.iter().any(|p| p.peer_id == w.peer_id()));
    }
    let shards: std::collections::HashSet<u16> = workers
        .iter()
        .map(|w| d402_node::net::capability_key::shard_of(&w.peer_id()))
        .collect();
    assert!(shards.len() > 1, "workers spread over shards");

    gateway.stop().await;
    for w in workers {
        w.stop().await;
    }
    boot.stop().await;
}
