//! The `d402` command line. Each subcommand lives in its own module.

use clap::{Parser, Subcommand};

mod bench;
mod bench_gateway;
mod bench_market;
mod capability;
mod capability_fetch;
mod capability_run;
mod devnet;
mod http_client;
mod node_cmd;
mod ops_monitor;
mod peers;
mod protocol;
mod task;
mod wallet;

/// d402: a peer-to-peer market for compute, paid over HTTP 402.
#[derive(Debug, Parser)]
#[command(name = "d402", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the wire protocol's ids and size caps.
    Protocol,
    /// Write, check, register, verify, import and list capabilities.
    #[command(subcommand)]
    Capability(capability::CapabilityCommand),
    /// Run a node: worker, gateway, bootstrap or validator, by its flags.
    Node(Box<crate::config::NodeArgs>),
    /// List the peers a node knows (reads its database; works while the node runs).
    Peers(peers::PeersArgs),
    /// A node's peers, tasks, reputation, settlements and why it is idle (asks the running
    /// node over `<state>/control.sock`, else reads its database).
    OpsMonitor(ops_monitor::OpsMonitorArgs),
    /// Measure the system (`d402 bench discovery`).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Local-rail wallets: create one, read a balance, use a dev gateway's faucet.
    #[command(subcommand)]
    Wallet(wallet::WalletCommand),
    /// Run a paid task through a gateway (x402: 402, pay, result and receipt).
    #[command(subcommand)]
    Task(task::TaskCommand),
    /// The main job: a local network (bootstrap, validator, 3 workers, gateway) and one
    /// paid task across it, with the split and the balances.
    Devnet(devnet::DevnetArgs),
}

impl Cli {
    /// Runs the parsed command.
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Protocol => protocol::run(),
            Command::Capability(cmd) => capability::run(cmd),
            Command::Node(args) => node_cmd::run(*args),
            Command::Peers(args) => peers::run(args),
            Command::OpsMonitor(args) => ops_monitor::run(args),
            Command::Bench(cmd) => bench::run(cmd),
            Command::Wallet(cmd) => wallet::run(cmd),
            Command::Task(cmd) => task::run(cmd),
            Command::Devnet(args) => devnet::run(args),
        }
    }
}
