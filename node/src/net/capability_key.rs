//! Where a capability is announced: sharded Kademlia provider keys and rendezvous
//! namespaces, both derived from the manifest CID.
//!
//! A Kademlia key holds at most K (20) providers on each of the K peers closest to it, so
//! one key per capability would hide every worker past the twentieth. The provider key is
//! therefore split into [`SHARDS`] keys,
//! `sha256("d402/cap/1" || manifest_cid_bytes || shard as u16 big-endian)`; a worker
//! announces under the one shard its PeerId selects, and a gateway queries all shards in
//! parallel. All nodes of a network must agree on [`SHARDS`]: it is part of the protocol.

use d402_protocol::Cid;
use libp2p::{PeerId, kad::RecordKey, rendezvous::Namespace};
use sha2::{Digest, Sha256};

/// Domain tag of capability provider keys.
pub const KEY_DOMAIN: &[u8] = b"d402/cap/1";
/// Number of provider-key shards per capability.
pub const SHARDS: u16 = 8;
/// Length of a capability provider key (a sha2-256 digest). Inbound provider records
/// under keys of any other length are not stored.
pub const KEY_LEN: usize = 32;
/// Prefix of rendezvous namespaces.
pub const NAMESPACE_PREFIX: &str = "d402/cap/1/";

/// The provider key of `shard` of the capability with manifest `cid`.
pub fn provider_key(cid: &Cid, shard: u16) -> RecordKey {
    let mut h = Sha256::new();
    h.update(KEY_DOMAIN);
    h.update(cid.to_bytes());
    h.update(shard.to_be_bytes());
    RecordKey::new(&h.finalize().as_slice())
}

/// All provider keys of a capability, shard 0 first.
pub fn all_provider_keys(cid: &Cid) -> Vec<RecordKey> {
    (0..SHARDS).map(|s| provider_key(cid, s)).collect()
}

/// The shard a peer announces under: the first two bytes of sha256(PeerId) mod [`SHARDS`].
pub fn shard_of(peer: &PeerId) -> u16 {
    let digest = Sha256::digest(peer.to_bytes());
    u16::from_be_bytes([digest[0], digest[1]]) % SHARDS
}

/// The rendezvous namespace of a capability: `d402/cap/1/<manifest cid>` (under the
/// protocol's 255-byte cap: a CID string is about 60 bytes).
pub fn namespace(cid: &Cid) -> Namespace {
    Namespace::new(format!("{NAMESPACE_PREFIX}{cid}"))
        .unwrap_or_else(|_| unreachable!("a CID string is far below 255 bytes"))
}

/// The capability a rendezvous namespace names, if it is one of ours.
pub fn cid_of_namespace(ns: &Namespace) -> Option<Cid> {
    ns.to_string()
        .strip_prefix(NAMESPACE_PREFIX)
        .and_then(|s| s.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_distinct_per_shard_and_capability() {
        let a = Cid::dag_cbor(b"manifest a");
        let b = Cid::dag_cbor(b"manifest b");
        let keys = all_provider_keys(&a);
        assert_eq!(keys.len(), SHARDS as usize);
        let set: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(set.len(), SHARDS as usize);
        assert!(!keys.contains(&provider_key(&b, 0)));
        assert!(keys.iter().all(|k| k.as_ref().len() == KEY_LEN));
        // Fixed derivation (a change here splits the network).
        let mut h = Sha256::new();
        h.update(b"d402/cap/1");
        h.update(a.to_bytes());
        h.update([0u8, 3]);
        assert_eq!(provider_key(&a, 3).as_ref(), h.finalize().as_slice());
    }

    #[test]
    fn shards_spread_peers() {
        let mut counts = [0usize; SHARDS as usize];
        for _ in 0..400 {
            counts[shard_of(&PeerId::random()) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 10), "{counts:?}");
    }

    #[test]
    fn namespace_round_trips() {
        let a = Cid::dag_cbor(b"manifest a");
        let ns = namespace(&a);
        assert_eq!(cid_of_namespace(&ns), Some(a));
        assert_eq!(cid_of_namespace(&Namespace::from_static("other")), None);
    }
}
