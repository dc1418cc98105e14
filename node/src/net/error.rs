//! Errors of the networking layer.

use thiserror::Error;

/// What can go wrong while starting the node or talking to its event loop.
#[derive(Debug, Error)]
pub enum NetError {
    /// The node's key cannot be turned into a libp2p identity.
    #[error("invalid node key: {0}")]
    Key(String),
    /// A peer id does not hold an ed25519 public key.
    #[error("peer id {0} does not embed an ed25519 public key")]
    NotEd25519(String),
    /// A `--peer` value is neither `host:port` nor a multiaddr.
    #[error("invalid peer address {input:?}: {reason}")]
    PeerAddress {
        /// What was given.
        input: String,
        /// Why it was refused.
        reason: String,
    },
    /// Building the transport failed.
    #[error("cannot build the libp2p transport: {0}")]
    Transport(String),
    /// Listening on an address failed.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: String,
        /// The cause.
        reason: String,
    },
    /// Dialling failed immediately (no address, denied by limits, ...).
    #[error("cannot dial {target}: {reason}")]
    Dial {
        /// Who or where.
        target: String,
        /// The cause.
        reason: String,
    },
    /// The Kademlia provider store refused a record.
    #[error("cannot store provider record: {0}")]
    Provide(String),
    /// The node's database failed.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// The event loop has stopped (the node is shutting down).
    #[error("the network event loop has stopped")]
    Stopped,
}
