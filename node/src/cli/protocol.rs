//! `d402 protocol`: the wire protocol's ids and caps.

use d402_protocol::{Signed, messages::*, protocol_ids};

pub fn run() -> anyhow::Result<()> {
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
    println!(
        "max lease envelope    {} bytes",
        Signed::<Lease>::max_size()
    );
    println!(
        "max claim envelope    {} bytes",
        Signed::<Claim>::max_size()
    );
    println!(
        "max verdict envelope  {} bytes",
        Signed::<Verdict>::max_size()
    );
    println!("max blob              {} bytes", protocol_ids::MAX_BLOB);
    Ok(())
}
