//! Small value types shared by the messages.

use std::{collections::BTreeMap, fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

use crate::error::{ProtocolError, Result};

/// Milliseconds since the Unix epoch.
pub type UnixMillis = u64;

/// The version every message body of this implementation carries.
pub const MESSAGE_VERSION: u16 = 1;

/// Checks a body's version field.
pub fn check_version(kind: &'static str, found: u16) -> Result<()> {
    if found == MESSAGE_VERSION {
        Ok(())
    } else {
        Err(ProtocolError::UnsupportedVersion {
            kind,
            found,
            expected: MESSAGE_VERSION,
        })
    }
}

/// Checks a text field's length in bytes.
pub fn check_len(field: &'static str, value: &str, max: usize) -> Result<()> {
    if value.len() > max {
        Err(ProtocolError::field(
            field,
            format!("longer than {max} bytes"),
        ))
    } else {
        Ok(())
    }
}

/// A task's id: 16 random bytes chosen by the gateway; hex in text.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId(pub [u8; 16]);

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TaskId({self})")
    }
}

impl FromStr for TaskId {
    type Err = ProtocolError;
    fn from_str(s: &str) -> Result<Self> {
        let mut out = [0u8; 16];
        hex::decode_to_slice(s, &mut out)
            .map_err(|_| ProtocolError::field("task_id", "must be 32 hex digits"))?;
        Ok(TaskId(out))
    }
}

impl Serialize for TaskId {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for TaskId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        if d.is_human_readable() {
            String::deserialize(d)?.parse().map_err(de::Error::custom)
        } else {
            let bytes = serde_bytes::ByteBuf::deserialize(d)?;
            <[u8; 16]>::try_from(bytes.as_slice())
                .map(TaskId)
                .map_err(|_| de::Error::custom("task id must be 16 bytes"))
        }
    }
}

/// Longest capability id accepted (`namespace.name`).
pub const MAX_CAPABILITY_ID: usize = 128;

/// A capability and its version, written `namespace.name@version`, e.g.
/// `web.page_to_markdown@1`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CapabilityRef {
    /// `namespace.name`: lowercase ASCII letters, digits and `_`, in two or more
    /// dot-separated segments, each starting with a letter.
    pub id: String,
    /// A positive integer version.
    pub version: u32,
}

impl CapabilityRef {
    /// Checks the id syntax and the version.
    pub fn validate(&self) -> Result<()> {
        validate_capability_id(&self.id)?;
        if self.version == 0 {
            return Err(ProtocolError::field("version", "must be 1 or more"));
        }
        Ok(())
    }

    /// The namespace: everything before the last dot.
    pub fn namespace(&self) -> &str {
        self.id.rsplit_once('.').map(|(ns, _)| ns).unwrap_or("")
    }
}

/// Checks the syntax of a capability id (`namespace.name`).
pub fn validate_capability_id(id: &str) -> Result<()> {
    check_len("id", id, MAX_CAPABILITY_ID)?;
    let segments: Vec<&str> = id.split('.').collect();
    if segments.len() < 2 {
        return Err(ProtocolError::field(
            "id",
            format!("{id:?} must be namespace.name (at least one dot)"),
        ));
    }
    for seg in segments {
        let mut chars = seg.chars();
        let ok_start = chars.next().is_some_and(|c| c.is_ascii_lowercase());
        let ok_rest = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !ok_start || !ok_rest {
            return Err(ProtocolError::field(
                "id",
                format!(
                    "segment {seg:?} of {id:?} must start with a-z and contain only a-z, 0-9 and _"
                ),
            ));
        }
    }
    Ok(())
}

impl fmt::Display for CapabilityRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.id, self.version)
    }
}

impl FromStr for CapabilityRef {
    type Err = ProtocolError;
    fn from_str(s: &str) -> Result<Self> {
        let (id, version) = s.split_once('@').ok_or_else(|| {
            ProtocolError::field("capability", format!("{s:?} must be id@version"))
        })?;
        let version = version
            .parse::<u32>()
            .ok()
            .filter(|v| v.to_string() == version)
            .ok_or_else(|| {
                ProtocolError::field("capability", format!("version {version:?} is not a number"))
            })?;
        let r = CapabilityRef {
            id: id.to_string(),
            version,
        };
        r.validate()?;
        Ok(r)
    }
}

/// A chain family; payout and creator wallets are given per chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Chain {
    /// The embedded `local` ledger (ed25519 public keys, base58).
    Local,
    /// Solana (base58 32-byte addresses).
    Solana,
    /// EVM chains such as Base (20-byte hex addresses).
    Evm,
}

impl fmt::Display for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Chain::Local => "local",
            Chain::Solana => "solana",
            Chain::Evm => "evm",
        })
    }
}

/// A settlement rail (DESIGN.md §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RailKind {
    /// Escrow ledger in the gateway's database (devnet, tests).
    Local,
    /// x402 `exact` on Solana; cannot split commission.
    SolanaDirect,
    /// Per-task escrow on Solana.
    SolanaTaskEscrow,
    /// Payment channel per buyer on Solana.
    SolanaChannel,
    /// Per-task escrow on Base.
    BaseTaskEscrow,
    /// x402 on Base funding work through a Solana channel.
    BaseX402SolanaChannel,
}

impl RailKind {
    /// All rails, in a fixed order.
    pub const ALL: [RailKind; 6] = [
        RailKind::Local,
        RailKind::SolanaDirect,
        RailKind::SolanaTaskEscrow,
        RailKind::SolanaChannel,
        RailKind::BaseTaskEscrow,
        RailKind::BaseX402SolanaChannel,
    ];

    /// The chain whose wallets receive payouts on this rail.
    pub fn payout_chain(self) -> Chain {
        match self {
            RailKind::Local => Chain::Local,
            RailKind::SolanaDirect
            | RailKind::SolanaTaskEscrow
            | RailKind::SolanaChannel
            | RailKind::BaseX402SolanaChannel => Chain::Solana,
            RailKind::BaseTaskEscrow => Chain::Evm,
        }
    }

    /// Whether the rail can split a payout between worker and creator.
    pub fn splits_commission(self) -> bool {
        !matches!(self, RailKind::SolanaDirect)
    }

    /// The name used on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            RailKind::Local => "local",
            RailKind::SolanaDirect => "solana-direct",
            RailKind::SolanaTaskEscrow => "solana-task-escrow",
            RailKind::SolanaChannel => "solana-channel",
            RailKind::BaseTaskEscrow => "base-task-escrow",
            RailKind::BaseX402SolanaChannel => "base-x402-solana-channel",
        }
    }
}

impl fmt::Display for RailKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RailKind {
    type Err = ProtocolError;
    fn from_str(s: &str) -> Result<Self> {
        RailKind::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| ProtocolError::field("rail", format!("unknown rail {s:?}")))
    }
}

/// Longest wallet address string accepted.
pub const MAX_WALLET: usize = 128;

/// Wallet addresses per chain. Addresses are checked for form by the crates that know the
/// chain; here only their length is capped.
pub type Wallets = BTreeMap<Chain, String>;

/// Checks the wallet map's size and string lengths.
pub fn check_wallets(field: &'static str, wallets: &Wallets) -> Result<()> {
    for addr in wallets.values() {
        if addr.is_empty() {
            return Err(ProtocolError::field(field, "empty address"));
        }
        check_len(field, addr, MAX_WALLET)?;
    }
    Ok(())
}

/// Longest asset identifier accepted (`local:USDC`, a mint address, a token contract).
pub const MAX_ASSET: usize = 96;

/// An amount of an asset in its smallest unit. Money is never a float.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Amount {
    /// The asset, e.g. `local:USDC`, an SPL mint or an ERC-20 address with a chain prefix.
    pub asset: String,
    /// Count of the asset's smallest unit.
    pub units: u64,
}

impl Amount {
    /// Checks the asset's length.
    pub fn validate(&self, field: &'static str) -> Result<()> {
        if self.asset.is_empty() {
            return Err(ProtocolError::field(field, "asset is empty"));
        }
        check_len(field, &self.asset, MAX_ASSET)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_refs_parse_and_refuse() {
        let r: CapabilityRef = "web.page_to_markdown@1".parse().unwrap();
        assert_eq!(r.id, "web.page_to_markdown");
        assert_eq!(r.version, 1);
        assert_eq!(r.namespace(), "web");
        assert_eq!(r.to_string(), "web.page_to_markdown@1");
        for bad in [
            "page@1",
            "web.page",
            "web.page@0",
            "web.page@01",
            "Web.page@1",
            "web..page@1",
            "web.1page@1",
            "web.page@x",
            "web.pa-ge@1",
            "",
        ] {
            assert!(bad.parse::<CapabilityRef>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn rails_round_trip_names() {
        for r in RailKind::ALL {
            assert_eq!(r.as_str().parse::<RailKind>().unwrap(), r);
            assert_eq!(serde_json::to_string(&r).unwrap(), format!("\"{r}\""));
        }
        assert!(!RailKind::SolanaDirect.splits_commission());
    }
}
