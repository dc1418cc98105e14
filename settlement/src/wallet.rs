//! Wallets of the `local` rail, without file I/O (the `d402 wallet` CLI reads and writes
//! the files, owner-only, as `node/src/keys.rs` does).
//!
//! A wallet is an ed25519 key. Its file holds the 32-byte secret seed as 64 hex digits and
//! a newline, the same format as the node's identity key. Its address on the local rail is
//! the base58 public key.

use thiserror::Error;

use d402_protocol::{PublicKey, SigningKey};

/// Why a wallet text was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WalletError {
    /// Not 64 hex digits.
    #[error("a wallet key file holds 64 hex digits (a 32-byte ed25519 seed)")]
    BadKeyText,
    /// Not a base58 32-byte key.
    #[error("{0:?} is not a local-rail address (a base58 ed25519 public key)")]
    BadAddress(String),
    /// No randomness.
    #[error("no randomness from the OS: {0}")]
    Random(String),
}

/// A new random wallet key.
pub fn generate() -> Result<SigningKey, WalletError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| WalletError::Random(e.to_string()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// The key file contents: 64 hex digits and a newline. Secret: write it owner-only.
pub fn to_key_text(key: &SigningKey) -> String {
    format!("{}\n", hex::encode(key.to_bytes()))
}

/// Parses key file contents (surrounding whitespace ignored).
pub fn from_key_text(text: &str) -> Result<SigningKey, WalletError> {
    let mut seed = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut seed).map_err(|_| WalletError::BadKeyText)?;
    Ok(SigningKey::from_bytes(&seed))
}

/// The wallet's public key.
pub fn public_key(key: &SigningKey) -> PublicKey {
    PublicKey::from(key.verifying_key())
}

/// The wallet's local-rail address: its base58 public key.
pub fn address(key: &SigningKey) -> String {
    public_key(key).to_string()
}

/// Parses a local-rail address.
pub fn parse_address(address: &str) -> Result<PublicKey, WalletError> {
    address
        .trim()
        .parse()
        .map_err(|_| WalletError::BadAddress(address.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_text_round_trips() {
        let key = generate().unwrap();
        let text = to_key_text(&key);
        assert_eq!(text.len(), 65);
        assert!(text.ends_with('\n'));
        assert_eq!(from_key_text(&text).unwrap().to_bytes(), key.to_bytes());
        assert_ne!(generate().unwrap().to_bytes(), key.to_bytes());
    }

    #[test]
    fn bad_key_text_is_refused() {
        for bad in ["", "abc", &"g".repeat(64), &"a".repeat(63), &"a".repeat(66)] {
            assert_eq!(from_key_text(bad).unwrap_err(), WalletError::BadKeyText);
        }
    }

    #[test]
    fn address_is_base58_public_key() {
        let key = SigningKey::from_bytes(&[9; 32]);
        let addr = address(&key);
        assert_eq!(parse_address(&addr).unwrap(), public_key(&key));
        assert_eq!(addr, public_key(&key).to_string());
        assert!(parse_address("0OIl").is_err());
        assert!(parse_address("1111").is_err());
    }
}
