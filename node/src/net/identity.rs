//! The node's libp2p identity is its d402 signing key.
//!
//! The ed25519 seed in the key file under `--state` becomes the libp2p keypair, so the
//! PeerId is stable across restarts and embeds the same public key that signs d402
//! messages (offers, bids, claims). The market checks a message's signer against the
//! PeerId it came from with [`peer_id_of`] / [`public_key_of`].

use d402_protocol::{PublicKey, SigningKey};
use libp2p::{PeerId, identity};

use super::NetError;

/// The libp2p keypair of a d402 signing key (same ed25519 secret).
pub fn keypair_from_signing_key(key: &SigningKey) -> Result<identity::Keypair, NetError> {
    let mut seed = key.to_bytes();
    // `ed25519_from_bytes` zeroizes the buffer it is given.
    identity::Keypair::ed25519_from_bytes(&mut seed).map_err(|e| NetError::Key(e.to_string()))
}

/// The PeerId whose key is `key`.
pub fn peer_id_of(key: &PublicKey) -> Result<PeerId, NetError> {
    let ed = identity::ed25519::PublicKey::try_from_bytes(&key.0)
        .map_err(|e| NetError::Key(e.to_string()))?;
    Ok(identity::PublicKey::from(ed).to_peer_id())
}

/// The ed25519 public key embedded in a PeerId (ed25519 PeerIds use the identity
/// multihash, so the key is inside the id itself).
pub fn public_key_of(peer: &PeerId) -> Result<PublicKey, NetError> {
    let mh: &libp2p::multihash::Multihash<64> = peer.as_ref();
    const IDENTITY: u64 = 0x00;
    if mh.code() != IDENTITY {
        return Err(NetError::NotEd25519(peer.to_string()));
    }
    // The usual form, read without decompressing the point (the connection's handshake
    // proved the key; callers compare it with keys that signed something).
    if let [0x08, 0x01, 0x12, 0x20, key @ ..] = mh.digest()
        && let Ok(key) = <[u8; 32]>::try_from(key)
    {
        return Ok(PublicKey(key));
    }
    let key = identity::PublicKey::try_decode_protobuf(mh.digest())
        .map_err(|_| NetError::NotEd25519(peer.to_string()))?;
    let ed = key
        .try_into_ed25519()
        .map_err(|_| NetError::NotEd25519(peer.to_string()))?;
    Ok(PublicKey(ed.to_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_id_is_the_signing_key() {
        let key = SigningKey::from_bytes(&[9u8; 32]);
        let kp = keypair_from_signing_key(&key).unwrap();
        let pid = kp.public().to_peer_id();
        let pk = PublicKey(key.verifying_key().to_bytes());
        assert_eq!(peer_id_of(&pk).unwrap(), pid);
        assert_eq!(public_key_of(&pid).unwrap(), pk);
        // Stable: the same seed gives the same PeerId.
        let again = keypair_from_signing_key(&SigningKey::from_bytes(&[9u8; 32])).unwrap();
        assert_eq!(again.public().to_peer_id(), pid);
    }

    #[test]
    fn non_ed25519_peer_ids_are_refused() {
        // A sha2-256 multihash PeerId (as RSA keys produce) carries no key.
        let mh = libp2p::multihash::Multihash::<64>::wrap(0x12, &[1u8; 32]).unwrap();
        let pid = PeerId::from_multihash(mh).unwrap();
        assert!(matches!(public_key_of(&pid), Err(NetError::NotEd25519(_))));
    }
}
