//! The market: how a gateway buys work from workers it does not trust.
//!
//! This module holds the decisions, free of any transport so that they can be tested on
//! their own and reused by the coordinator that drives them over libp2p:
//! - [`selection`]: which bids to lease, by price and reputation within the budget, and why
//!   each other bid was not chosen;
//! - [`quorum`]: when claims agree on an output, which claims are rejected, and when a
//!   quorum has become impossible;
//! - [`reputation`]: per-worker counters, the score that drives selection, and bans.

pub mod quorum;
pub mod reputation;
pub mod selection;
