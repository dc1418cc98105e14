//! d402 settlement (not built yet).
//!
//! This crate will hold the `Rail` trait (quote, challenge, verify, lock, capture with
//! splits, refund), the embedded `local` rail and the chain rails (Solana direct, task
//! escrow and channels; Base task escrow; the Base x402 to Solana channel hybrid), and
//! channel maintenance. Amounts are integers in the asset's smallest unit. It is tracked
//! by the gateway-and-payments issue; until then it exports nothing.
