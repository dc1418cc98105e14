//! Checks the form of creator wallet addresses per chain.
//!
//! - `solana` and `local`: base58 text that decodes to exactly 32 bytes (an ed25519 public
//!   key or any other 32-byte Solana address, such as a PDA).
//! - `evm`: `0x` and 40 hex digits (20 bytes). All-lowercase and all-uppercase addresses
//!   carry no checksum and are accepted; mixed case must match the EIP-55 checksum
//!   (keccak-256 of the lowercase hex).

use d402_protocol::{Chain, Wallets, types::MAX_WALLET};
use tiny_keccak::{Hasher, Keccak};

use crate::error::{CapabilityError, Result};

/// Checks one address for `chain`; `field` names it in errors.
pub fn check_address(field: &str, chain: Chain, address: &str) -> Result<()> {
    if address.is_empty() {
        return Err(CapabilityError::invalid(field, "address is empty"));
    }
    if address.len() > MAX_WALLET {
        return Err(CapabilityError::invalid(
            field,
            format!("address is longer than {MAX_WALLET} bytes"),
        ));
    }
    match chain {
        Chain::Solana | Chain::Local => check_base58_32(field, chain, address),
        Chain::Evm => check_evm(field, address),
    }
}

/// Checks every address of a wallet map; the field is `<field>.<chain>`.
pub fn check_wallets(field: &str, wallets: &Wallets) -> Result<()> {
    for (chain, address) in wallets {
        check_address(&format!("{field}.{chain}"), *chain, address)?;
    }
    Ok(())
}

fn check_base58_32(field: &str, chain: Chain, address: &str) -> Result<()> {
    let bytes = bs58::decode(address).into_vec().map_err(|_| {
        CapabilityError::invalid(
            field,
            format!("{address:?} is not base58 (a {chain} address is a base58 32-byte key)"),
        )
    })?;
    if bytes.len() != 32 {
        return Err(CapabilityError::invalid(
            field,
            format!(
                "{address:?} decodes to {} bytes; a {chain} address is 32 bytes",
                bytes.len()
            ),
        ));
    }
    Ok(())
}

fn check_evm(field: &str, address: &str) -> Result<()> {
    let hex_part = address.strip_prefix("0x").ok_or_else(|| {
        CapabilityError::invalid(
            field,
            format!("{address:?} must start with 0x (an EVM address is 0x and 40 hex digits)"),
        )
    })?;
    if hex_part.len() != 40 || !hex_part.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(CapabilityError::invalid(
            field,
            format!("{address:?} must be 0x and 40 hex digits (20 bytes)"),
        ));
    }
    let has_lower = hex_part.bytes().any(|b| b.is_ascii_lowercase());
    let has_upper = hex_part.bytes().any(|b| b.is_ascii_uppercase());
    if has_lower && has_upper && eip55_checksum(hex_part) != hex_part {
        return Err(CapabilityError::invalid(
            field,
            format!(
                "{address:?} has mixed case but fails the EIP-55 checksum (expected 0x{})",
                eip55_checksum(hex_part)
            ),
        ));
    }
    Ok(())
}

/// The EIP-55 mixed-case form of 40 hex digits (without `0x`).
pub fn eip55_checksum(hex40: &str) -> String {
    let lower = hex40.to_ascii_lowercase();
    let mut hash = [0u8; 32];
    let mut keccak = Keccak::v256();
    keccak.update(lower.as_bytes());
    keccak.finalize(&mut hash);
    lower
        .chars()
        .enumerate()
        .map(|(i, c)| {
            let nibble = (hash[i / 2] >> if i % 2 == 0 { 4 } else { 0 }) & 0x0f;
            if c.is_ascii_alphabetic() && nibble >= 8 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eip55_vectors() {
        // The test vectors of EIP-55.
        for addr in [
            "5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
            "fB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
            "dbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB",
            "D1220A0cf47c7B9Be7A2E6BA89F429762e7b9aDb",
        ] {
            assert_eq!(eip55_checksum(addr), addr);
            check_address("w", Chain::Evm, &format!("0x{addr}")).unwrap();
        }
    }

    #[test]
    fn evm_forms() {
        let ok = [
            "0x000000000000000000000000000000000000c0de",
            "0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed",
            "0x5AAEB6053F3E94C9B9A09F33669435E7EF1BEAED",
        ];
        for a in ok {
            check_address("w", Chain::Evm, a).unwrap();
        }
        let bad = [
            "5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",    // no 0x
            "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAeD",  // bad checksum
            "0x5aaeb6053f3e94c9b9a09f33669435e7ef1beae",   // 39 digits
            "0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaedd", // 41 digits
            "0xgaaeb6053f3e94c9b9a09f33669435e7ef1beaed",  // not hex
            "",
        ];
        for a in bad {
            let err = check_address("creator_wallets.evm", Chain::Evm, a).unwrap_err();
            assert!(
                err.to_string().starts_with("creator_wallets.evm: "),
                "{err}"
            );
        }
    }

    #[test]
    fn solana_forms() {
        check_address(
            "w",
            Chain::Solana,
            "So11111111111111111111111111111111111111112",
        )
        .unwrap();
        check_address(
            "w",
            Chain::Solana,
            "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v",
        )
        .unwrap();
        let short = bs58::encode([7u8; 31]).into_string();
        let long = bs58::encode([7u8; 33]).into_string();
        for bad in [
            short.as_str(),
            long.as_str(),
            "0OIl1111111111111111111111111111111111111112", // not base58
            "0x000000000000000000000000000000000000c0de",
            "",
        ] {
            assert!(check_address("w", Chain::Solana, bad).is_err(), "{bad}");
        }
    }
}
