//! The `d402` command: one binary for every role.

use clap::{Parser, Subcommand};

/// d402: a peer-to-peer market for compute, paid over HTTP 402.
#[derive(Debug, Parser)]
#[command(name = "d402", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the wire protocol's ids and size caps.
    Protocol,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Protocol => {
            use d402_protocol::{Signed, messages::*, protocol_ids};
            for (name, id) in [
                ("kad", protocol_ids::KAD),
                ("bid", protocol_ids::BID),
                ("lease", protocol_ids::LEASE),
                ("claim", protocol_ids::CLAIM),
                ("verdict", protocol_ids::VERDICT),
                ("blob", protocol_ids::BLOB),
            ] {
                println!("{name:8} {id}");
            }
            println!("max bid envelope      {} bytes", Signed::<Bid>::max_size());
            println!("max lease envelope    {} bytes", Signed::<Lease>::max_size());
            println!("max claim envelope    {} bytes", Signed::<Claim>::max_size());
            println!("max verdict envelope  {} bytes", Signed::<Verdict>::max_size());
            println!("max blob              {} bytes", protocol_ids::MAX_BLOB);
        }
    }
    Ok(())
}
