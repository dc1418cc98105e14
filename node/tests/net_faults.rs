//! Bad input from peers: garbage bytes, oversized Kademlia messages, peers without a valid
//! signed peer record. Each closes a stream or is ignored; the node keeps serving.

#![allow(clippy::unwrap_used)] // tests panic on failure by design

mod net_support;

use std::{
    io::{Read, Write},
    time::Duration,
};

use futures::StreamExt;
use libp2p::{
    PeerId, StreamProtocol, Swarm, identify,
    identity::Keypair,
    kad, noise,
    swarm::{NetworkBehaviour, SwarmEvent},
    tcp, yamux,
};
use net_support::*;

#[derive(NetworkBehaviour)]
struct Probe {
    identify: identify::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
}

/// A bare libp2p peer speaking d402's Kademlia protocol with a 1 MiB message cap.
fn probe(signed_record: bool, protocol_version: &str) -> Swarm<Probe> {
    let key = Keypair::generate_ed25519();
    let id_cfg = if signed_record {
        identify::Config::new_with_signed_peer_record(protocol_version.into(), &key)
    } else {
        identify::Config::new(protocol_version.into(), key.public())
    };
    libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::new(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|key| {
            let pid = key.public().to_peer_id();
            let mut cfg = kad::Config::new(StreamProtocol::new(d402_protocol::protocol_ids::KAD));
            cfg.set_max_packet_size(1024 * 1024)
                .set_query_timeout(Duration::from_secs(20));
            let mut kad = kad::Behaviour::with_config(pid, kad::store::MemoryStore::new(pid), cfg);
            kad.set_mode(Some(kad::Mode::Client));
            Probe {
                identify: identify::Behaviour::new(id_cfg),
                kad,
            }
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

/// Drives `swarm` until `f` returns `Some`, or panics after [`TIMEOUT`].
async fn drive<T>(
    swarm: &mut Swarm<Probe>,
    what: &str,
    mut f: impl FnMut(&mut Swarm<Probe>, SwarmEvent<ProbeEvent>) -> Option<T>,
) -> T {
    let work = async {
        loop {
            let ev = swarm.select_next_some().await;
            if let Some(v) = f(swarm, ev) {
                return v;
            }
        }
    };
    tokio::time::timeout(TIMEOUT, work)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for: {what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_socket_closes_only_that_connection() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), Role::Bootstrap, vec![]).await;
    let port = node.host_port_spec().addr.to_string();
    let port: u16 = port.rsplit('/').next().unwrap().parse().unwrap();

    let junk = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let bytes: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 + 13) as u8).collect();
        let _ = s.write_all(&bytes);
        // The node hangs up (EOF or reset), rather than waiting forever.
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    });
    junk.await.unwrap();

    // Still serving: a real node joins through it.
    let d2 = tempfile::tempdir().unwrap();
    let other = start(d2.path(), Role::Gateway, vec![node.spec()]).await;
    eventually("node still admits peers", || {
        let h = node.handle.clone();
        let p = other.peer_id();
        async move {
            h.peers()
                .await
                .unwrap()
                .iter()
                .any(|s| s.peer_id == p)
                .then_some(())
        }
    })
    .await;
    other.stop().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_kademlia_request_closes_the_stream_not_the_node() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), Role::Bootstrap, vec![]).await;
    let node_id = node.peer_id();
    let mut p = probe(true, d402_node::net::PROTOCOL_VERSION);
    p.behaviour_mut()
        .kad
        .add_address(&node_id, node.addr.clone());

    // A GET_VALUE whose key alone is 64 KiB: four times the node's 16 KiB cap.
    let big = kad::RecordKey::new(&vec![7u8; 64 * 1024]);
    let q = p.behaviour_mut().kad.get_record(big);
    let stats = drive(&mut p, "oversized query ends", |_, ev| match ev {
        SwarmEvent::Behaviour(ProbeEvent::Kad(kad::Event::OutboundQueryProgressed {
            id,
            stats,
            step,
            ..
        })) if id == q && step.last => Some(stats),
        _ => None,
    })
    .await;
    assert_eq!(
        stats.num_successes(),
        0,
        "the node must not answer an oversized request"
    );
    assert!(
        p.is_connected(&node_id),
        "only the stream was closed, not the connection"
    );

    // The same connection still carries well-formed requests.
    let q = p.behaviour_mut().kad.get_closest_peers(PeerId::random());
    let stats = drive(&mut p, "normal query answered", |_, ev| match ev {
        SwarmEvent::Behaviour(ProbeEvent::Kad(kad::Event::OutboundQueryProgressed {
            id,
            stats,
            step,
            ..
        })) if id == q && step.last => Some(stats),
        _ => None,
    })
    .await;
    assert!(
        stats.num_successes() >= 1,
        "the node answers the next request"
    );
    assert!(!node.handle.listen_addrs().await.unwrap().is_empty());
    node.stop().await;
}

/// Waits until the probe has answered the node's identify request (so the node has its
/// identify info), then returns.
async fn identified_by(p: &mut Swarm<Probe>, node: PeerId) {
    drive(p, "node identified the probe", |_, ev| match ev {
        SwarmEvent::Behaviour(ProbeEvent::Identify(identify::Event::Sent { peer_id, .. }))
            if peer_id == node =>
        {
            Some(())
        }
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_peers_with_their_own_signed_record_are_admitted() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), Role::Bootstrap, vec![]).await;
    let node_id = node.peer_id();
    let listen = node.addr.clone();

    // No signed peer record: plain listen addresses are not trusted.
    let mut unsigned = probe(false, d402_node::net::PROTOCOL_VERSION);
    unsigned
        .listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .unwrap();
    unsigned.dial(listen.clone()).unwrap();
    identified_by(&mut unsigned, node_id).await;
    // Not a d402 peer (another identify protocol version).
    let mut foreign = probe(true, "/other/1.0.0");
    foreign
        .listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .unwrap();
    foreign.dial(listen.clone()).unwrap();
    identified_by(&mut foreign, node_id).await;
    // Control: a signed d402 record is admitted.
    let mut good = probe(true, d402_node::net::PROTOCOL_VERSION);
    good.listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .unwrap();
    let addr = drive(&mut good, "listening", |_, ev| match ev {
        SwarmEvent::NewListenAddr { address, .. } => Some(address),
        _ => None,
    })
    .await;
    good.add_external_address(addr);
    good.dial(listen).unwrap();
    let good_id = *good.local_peer_id();
    let h = node.handle.clone();
    let admitted = tokio::spawn(async move {
        eventually("signed peer admitted", || {
            let h = h.clone();
            async move {
                h.peers()
                    .await
                    .unwrap()
                    .into_iter()
                    .find(|p| p.peer_id == good_id)
            }
        })
        .await
    });
    // Keep the probes' connections alive while the node decides.
    let summary = loop {
        if admitted.is_finished() {
            break admitted.await.unwrap();
        }
        tokio::select! {
            _ = good.select_next_some() => {}
            _ = unsigned.select_next_some() => {}
            _ = foreign.select_next_some() => {}
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    };
    assert!(!summary.addrs.is_empty());
    let peers = node.handle.peers().await.unwrap();
    assert!(!peers.iter().any(|p| p.peer_id == *unsigned.local_peer_id()));
    assert!(!peers.iter().any(|p| p.peer_id == *foreign.local_peer_id()));
    let persisted = node.handle.routing_table().await.unwrap();
    assert!(!persisted.contains(unsigned.local_peer_id()));
    node.stop().await;
}
