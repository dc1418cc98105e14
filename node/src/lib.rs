//! The d402 node: roles, the libp2p node, the gateway's HTTP API, state, and the `d402`
//! command's implementation. The `d402` binary is a thin wrapper over [`cli`].

pub mod capstore;
pub mod cli;
pub mod config;
pub mod gateway;
pub mod group_commit;
pub mod journal;
pub mod keys;
pub mod market;
pub mod net;
pub mod state;
