//! The `d402` command line. Each subcommand lives in its own module.

use clap::{Parser, Subcommand};

mod protocol;

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
}

impl Cli {
    /// Runs the parsed command.
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Protocol => protocol::run(),
        }
    }
}
