//! `d402 node` configuration: flags, a TOML file (`--config`) and `D402_*` environment
//! variables. Flags win over the environment, which wins over the file.
//!
//! Every flag of the operator guide's worker and gateway commands is accepted and
//! validated here, including those used by later subsystems, so a bad value is refused at
//! start with a message naming the flag. Money is parsed by hand from its decimal string
//! into integer smallest units; no float is involved.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use clap::Args;
use d402_capabilities::SnapshotterKind;
use d402_protocol::{CapabilityRef, Chain, Cid, PublicKey, RailKind, Wallets};
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

use crate::net::{AdvertiseHost, PeerSpec};

/// Decimals of the gateway's price unit (USDC-like assets have 6).
pub const PRICE_DECIMALS: u32 = 6;
/// Default `--worker-price`: $0.001 in units of 6 decimals.
pub const DEFAULT_WORKER_PRICE_UNITS: u64 = 1_000;
/// Largest `--fanout`.
pub const MAX_FANOUT: u32 = 16;
/// Largest `--validators`.
pub const MAX_VALIDATORS: u32 = 16;
/// Largest config file read.
const MAX_CONFIG_FILE: u64 = 1024 * 1024;

/// Flags of `d402 node`. Each one also reads `D402_<NAME>` (e.g. `D402_PORT`); lists
/// (`--peer`, `--offer`, `--validators`) read comma-separated values from the environment.
#[derive(Debug, Clone, Default, Args)]
pub struct NodeArgs {
    /// TOML file with any of these settings (keys are the flag names, e.g. `port = 9000`,
    /// `peer = ["10.0.0.1:9000"]`). Flags and D402_* variables override it.
    #[arg(long, env = "D402_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A name for this node in logs.
    #[arg(long, env = "D402_LABEL")]
    pub label: Option<String>,
    /// State directory (key, database). Default `.d402/<label>`.
    #[arg(long, env = "D402_STATE", value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// Interface to listen on for peers (TCP and QUIC). Default 0.0.0.0.
    #[arg(long, env = "D402_HOST")]
    pub host: Option<String>,
    /// Host (IP or DNS name) announced to peers in the signed peer record.
    #[arg(long, env = "D402_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,
    /// Peer port: TCP, and UDP for QUIC. Default 9000; 0 lets the OS choose.
    #[arg(long, env = "D402_PORT")]
    pub port: Option<u16>,
    /// Bootstrap peer, `host:port` or a multiaddr (repeatable).
    #[arg(long = "peer", env = "D402_PEER", value_delimiter = ',')]
    pub peer: Vec<String>,
    /// Capability sold by this worker (or, on a gateway, sold to apps), `id@version`
    /// (repeatable).
    #[arg(long = "offer", env = "D402_OFFER", value_delimiter = ',')]
    pub offer: Vec<String>,
    /// Snapshotter for page capabilities: `playwright` (headless Chromium) or `fetch`.
    #[arg(long, env = "D402_SNAPSHOTTER")]
    pub snapshotter: Option<String>,
    /// Fall back to a plain fetch when the browser snapshot fails.
    #[arg(long, env = "D402_FALLBACK_TO_FETCH", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub fallback_to_fetch: Option<bool>,
    /// Solana address (base58) that receives this worker's payouts.
    #[arg(long, env = "D402_SOLANA_PAYOUT_WALLET")]
    pub solana_payout_wallet: Option<String>,
    /// EVM address (0x…) that receives this worker's payouts on EVM rails.
    #[arg(long, env = "D402_EVM_PAYOUT_WALLET")]
    pub evm_payout_wallet: Option<String>,
    /// Local-rail address (base58 ed25519 key) that receives this worker's payouts on the
    /// `local` rail. Default: the address of a `payout.key` wallet created in `--state`.
    #[arg(long, env = "D402_LOCAL_PAYOUT_WALLET")]
    pub local_payout_wallet: Option<String>,
    /// Worker: the lowest price it bids per task, e.g. '$0.001' (6 decimals). Default $0.001.
    #[arg(long, env = "D402_WORKER_PRICE")]
    pub worker_price: Option<String>,
    /// Let this node's snapshotters fetch loopback addresses (127.0.0.0/8, ::1), for devnets
    /// and tests whose pages are served on this machine. Private, link-local and metadata
    /// addresses stay refused. Default false.
    #[arg(long, env = "D402_ALLOW_LOOPBACK_URLS", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub allow_loopback_urls: Option<bool>,
    /// Interface for the gateway's HTTP API. Default 127.0.0.1.
    #[arg(long, env = "D402_HTTP_HOST")]
    pub http_host: Option<String>,
    /// Port of the gateway's HTTP API; setting it makes this node a gateway.
    #[arg(long, env = "D402_HTTP_PORT")]
    pub http_port: Option<u16>,
    /// Settlement rail: local, solana-direct, solana-task-escrow, solana-channel,
    /// base-task-escrow, base-x402-solana-channel.
    #[arg(long, env = "D402_PAYMENT")]
    pub payment: Option<String>,
    /// Price per task charged to apps, e.g. '$0.01' (6 decimals).
    #[arg(long, env = "D402_GATEWAY_PRICE")]
    pub gateway_price: Option<String>,
    /// Most the gateway pays workers per task, e.g. 0.01 (6 decimals).
    #[arg(long, env = "D402_GATEWAY_BUDGET")]
    pub gateway_budget: Option<String>,
    /// Gateway on the `local` rail: serve `POST /v1/local/faucet`, which credits balances
    /// out of thin air. Devnets and tests only. Default false.
    #[arg(long, env = "D402_DEV_FAUCET", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub dev_faucet: Option<bool>,
    /// Gateway: trust the capabilities of NAMESPACE only when their registration is signed
    /// by PUBLISHER_KEY (base58), written `NAMESPACE=PUBLISHER_KEY` (repeatable; several keys
    /// may be trusted for one namespace). With any given, other namespaces are refused.
    /// Default: any namespace.
    #[arg(
        long = "trusted-namespace",
        env = "D402_TRUSTED_NAMESPACE",
        value_delimiter = ','
    )]
    pub trusted_namespace: Vec<String>,
    /// Gateway: sell only these exact manifest CIDs (repeatable). Default: any manifest
    /// that passes the other checks.
    #[arg(
        long = "accept-manifest-cid",
        env = "D402_ACCEPT_MANIFEST_CID",
        value_delimiter = ','
    )]
    pub accept_manifest_cid: Vec<String>,
    /// Sell only capabilities with a registration.
    #[arg(long, env = "D402_REQUIRE_CAPABILITY_REGISTRATION", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub require_capability_registration: Option<bool>,
    /// Sell only capabilities whose registration is signed by its publisher.
    #[arg(long, env = "D402_REQUIRE_SIGNED_CAPABILITY_REGISTRATION", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub require_signed_capability_registration: Option<bool>,
    /// Highest creator commission accepted, in basis points (0 to 10000).
    #[arg(long, env = "D402_MAX_CREATOR_COMMISSION_BPS")]
    pub max_creator_commission_bps: Option<u16>,
    /// Run as a validator (re-checks results and signs verdicts).
    #[arg(long, env = "D402_VALIDATOR", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub validator: Option<bool>,
    /// Gateway: agreeing validator verdicts required per task on top of the quorum
    /// (a count, 0 to 16). Default 0.
    #[arg(long = "validators", env = "D402_VALIDATORS")]
    pub validators: Option<String>,
    /// Gateway: a validator to ask first, as a PeerId or a multiaddr ending in
    /// `/p2p/<PeerId>` (repeatable). Others are found under the validators' well-known key.
    #[arg(
        long = "validator-peer",
        env = "D402_VALIDATOR_PEER",
        value_delimiter = ','
    )]
    pub validator_peer: Vec<String>,
    /// Workers leased per task. Default 1.
    #[arg(long, env = "D402_FANOUT")]
    pub fanout: Option<u32>,
    /// Agreeing claims needed to accept a result. Default 1.
    #[arg(long, env = "D402_QUORUM")]
    pub quorum: Option<u32>,
    /// Kademlia mode: auto (server on bootstrap, gateway and validator nodes, and on
    /// workers that advertise a public address), server or client.
    #[arg(long, env = "D402_KAD_MODE")]
    pub kad_mode: Option<String>,
    /// Most peer connections. Default 512.
    #[arg(long, env = "D402_MAX_CONNECTIONS")]
    pub max_connections: Option<u32>,
    /// Gateway: hours a request's answer stays replayable under its `Idempotency-Key`
    /// (1 to 720); older answers are purged and the key may run again. Default 24.
    #[arg(long, env = "D402_IDEMPOTENCY_TTL_HOURS")]
    pub idempotency_ttl_hours: Option<u32>,
    /// Log format: text or json.
    #[arg(long, env = "D402_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Print the effective configuration as JSON and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Stop (as on SIGTERM) when standard input reaches its end: a supervisor that holds
    /// the other end of a pipe takes its children down with it even when it is killed
    /// with SIGKILL (`d402 devnet` starts its nodes so).
    #[arg(long, hide = true)]
    pub exit_with_stdin: bool,
}

/// The same settings read from a TOML file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    label: Option<String>,
    state: Option<PathBuf>,
    host: Option<String>,
    advertise_host: Option<String>,
    port: Option<u16>,
    #[serde(default)]
    peer: Vec<String>,
    #[serde(default)]
    offer: Vec<String>,
    snapshotter: Option<String>,
    fallback_to_fetch: Option<bool>,
    solana_payout_wallet: Option<String>,
    evm_payout_wallet: Option<String>,
    local_payout_wallet: Option<String>,
    worker_price: Option<String>,
    allow_loopback_urls: Option<bool>,
    http_host: Option<String>,
    http_port: Option<u16>,
    payment: Option<String>,
    gateway_price: Option<String>,
    gateway_budget: Option<String>,
    dev_faucet: Option<bool>,
    #[serde(default)]
    trusted_namespace: Vec<String>,
    #[serde(default)]
    accept_manifest_cid: Vec<String>,
    require_capability_registration: Option<bool>,
    require_signed_capability_registration: Option<bool>,
    max_creator_commission_bps: Option<u16>,
    validator: Option<bool>,
    validators: Option<u32>,
    #[serde(default)]
    validator_peer: Vec<String>,
    fanout: Option<u32>,
    quorum: Option<u32>,
    kad_mode: Option<String>,
    max_connections: Option<u32>,
    idempotency_ttl_hours: Option<u32>,
    log_format: Option<String>,
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(format!("{s:?} is not true or false")),
    }
}

/// Kademlia mode choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KadMode {
    /// Decide from the roles and the advertised address.
    Auto,
    /// Always serve the DHT.
    Server,
    /// Never serve the DHT.
    Client,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The roles a configuration gives the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Roles {
    /// Sells its `--offer`s to the peer network (offers and no `--http-port`).
    pub worker: bool,
    /// Serves the HTTP task API (`--http-port`).
    pub gateway: bool,
    /// Validates results (`--validator`).
    pub validator: bool,
    /// Introduces peers: no `--offer` and no `--http-port`. Runs a rendezvous point.
    pub bootstrap: bool,
}

/// A validated `d402 node` configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Name in logs.
    pub label: String,
    /// State directory.
    pub state_dir: PathBuf,
    /// Listen interface.
    pub host: IpAddr,
    /// Announced host.
    pub advertise_host: Option<AdvertiseHost>,
    /// Peer port.
    pub port: u16,
    /// Bootstrap peers.
    pub peers: Vec<PeerSpec>,
    /// Capabilities offered (worker) or sold (gateway).
    pub offers: Vec<CapabilityRef>,
    /// Snapshotter choice.
    pub snapshotter: Option<SnapshotterKind>,
    /// Fall back to fetch when the browser fails.
    pub fallback_to_fetch: bool,
    /// Payout wallets per chain (`local` only when `--local-payout-wallet` is given; the
    /// node adds its `payout.key` wallet otherwise).
    pub payout: Wallets,
    /// Worker: lowest price bid per task, in smallest units.
    pub worker_price_units: u64,
    /// Snapshotters may fetch loopback addresses.
    pub allow_loopback_urls: bool,
    /// Gateway HTTP interface and port.
    pub http: Option<(IpAddr, u16)>,
    /// Settlement rail.
    pub payment: Option<RailKind>,
    /// Price per task in smallest units.
    pub gateway_price_units: Option<u64>,
    /// Budget per task in smallest units.
    pub gateway_budget_units: Option<u64>,
    /// Serve the local rail's faucet.
    pub dev_faucet: bool,
    /// Trusted namespaces and the publisher keys trusted for each (empty: any namespace).
    pub trusted_namespaces: Vec<(String, PublicKey)>,
    /// Manifest CIDs the gateway sells (empty: any that passes the other checks).
    pub accepted_manifest_cids: Vec<Cid>,
    /// Require a capability registration.
    pub require_capability_registration: bool,
    /// Require a signed capability registration.
    pub require_signed_capability_registration: bool,
    /// Commission cap in basis points.
    pub max_creator_commission_bps: Option<u16>,
    /// Validator role.
    pub validator: bool,
    /// Agreeing validator verdicts required per task.
    pub validators: u32,
    /// Validators asked first, with their addresses when given.
    pub validator_peers: Vec<(PeerId, Vec<Multiaddr>)>,
    /// Workers per task.
    pub fanout: u32,
    /// Agreeing claims needed.
    pub quorum: u32,
    /// Kademlia mode choice.
    pub kad_mode: KadMode,
    /// Connection limit.
    pub max_connections: u32,
    /// How long an idempotent answer is kept (gateway).
    pub idempotency_ttl: std::time::Duration,
    /// Log format.
    pub log_format: LogFormat,
}

impl NodeArgs {
    /// Reads `--config` (if any) and merges: flags and environment over the file.
    pub fn resolve(&self) -> anyhow::Result<NodeConfig> {
        let file = match &self.config {
            Some(path) => read_file_config(path)?,
            None => FileConfig::default(),
        };
        merge(self, file).validate()
    }
}

fn read_file_config(path: &Path) -> anyhow::Result<FileConfig> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    if meta.len() > MAX_CONFIG_FILE {
        bail!("config file {} is larger than 1 MiB", path.display());
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
}

fn merge(a: &NodeArgs, f: FileConfig) -> NodeArgs {
    fn list(cli: &[String], file: Vec<String>) -> Vec<String> {
        if cli.is_empty() { file } else { cli.to_vec() }
    }
    NodeArgs {
        config: a.config.clone(),
        label: a.label.clone().or(f.label),
        state: a.state.clone().or(f.state),
        host: a.host.clone().or(f.host),
        advertise_host: a.advertise_host.clone().or(f.advertise_host),
        port: a.port.or(f.port),
        peer: list(&a.peer, f.peer),
        offer: list(&a.offer, f.offer),
        snapshotter: a.snapshotter.clone().or(f.snapshotter),
        fallback_to_fetch: a.fallback_to_fetch.or(f.fallback_to_fetch),
        solana_payout_wallet: a.solana_payout_wallet.clone().or(f.solana_payout_wallet),
        evm_payout_wallet: a.evm_payout_wallet.clone().or(f.evm_payout_wallet),
        local_payout_wallet: a.local_payout_wallet.clone().or(f.local_payout_wallet),
        worker_price: a.worker_price.clone().or(f.worker_price),
        allow_loopback_urls: a.allow_loopback_urls.or(f.allow_loopback_urls),
        http_host: a.http_host.clone().or(f.http_host),
        http_port: a.http_port.or(f.http_port),
        payment: a.payment.clone().or(f.payment),
        gateway_price: a.gateway_price.clone().or(f.gateway_price),
        gateway_budget: a.gateway_budget.clone().or(f.gateway_budget),
        dev_faucet: a.dev_faucet.or(f.dev_faucet),
        trusted_namespace: list(&a.trusted_namespace, f.trusted_namespace),
        accept_manifest_cid: list(&a.accept_manifest_cid, f.accept_manifest_cid),
        require_capability_registration: a
            .require_capability_registration
            .or(f.require_capability_registration),
        require_signed_capability_registration: a
            .require_signed_capability_registration
            .or(f.require_signed_capability_registration),
        max_creator_commission_bps: a
            .max_creator_commission_bps
            .or(f.max_creator_commission_bps),
        validator: a.validator.or(f.validator),
        validators: a.validators.clone().or(f.validators.map(|n| n.to_string())),
        validator_peer: list(&a.validator_peer, f.validator_peer),
        fanout: a.fanout.or(f.fanout),
        quorum: a.quorum.or(f.quorum),
        kad_mode: a.kad_mode.clone().or(f.kad_mode),
        max_connections: a.max_connections.or(f.max_connections),
        idempotency_ttl_hours: a.idempotency_ttl_hours.or(f.idempotency_ttl_hours),
        log_format: a.log_format.clone().or(f.log_format),
        print_config: a.print_config,
        exit_with_stdin: a.exit_with_stdin,
    }
}

/// Parses a decimal amount such as `$0.01` or `0.01` into integer units with `decimals`
/// fractional digits (`0.01` with 6 decimals is 10000). Refuses signs, exponents, more
/// fractional digits than the asset has (unless they are zeros) and overflow.
pub fn parse_amount(input: &str, decimals: u32) -> Result<u64, String> {
    let s = input.trim();
    let s = s.strip_prefix('$').unwrap_or(s);
    if s.is_empty() {
        return Err(format!("{input:?} is empty"));
    }
    let (whole, frac) = match s.split_once('.') {
        Some((w, f)) => (w, f),
        None => (s, ""),
    };
    let digits = |t: &str| t.chars().all(|c| c.is_ascii_digit());
    if !digits(whole) || !digits(frac) || (whole.is_empty() && frac.is_empty()) {
        return Err(format!(
            "{input:?} is not a decimal amount like 0.01 or $0.01"
        ));
    }
    if s.ends_with('.') {
        return Err(format!("{input:?} ends with a dot"));
    }
    let frac_trimmed = frac.trim_end_matches('0');
    if frac_trimmed.len() > decimals as usize {
        return Err(format!(
            "{input:?} has more than {decimals} decimal places (the smallest unit is 10^-{decimals})"
        ));
    }
    let overflow = || format!("{input:?} is too large");
    let scale = 10u64.checked_pow(decimals).ok_or_else(overflow)?;
    let whole_units = if whole.is_empty() {
        0
    } else {
        whole
            .parse::<u64>()
            .map_err(|_| overflow())?
            .checked_mul(scale)
            .ok_or_else(overflow)?
    };
    let mut frac_units = 0u64;
    for (i, c) in frac_trimmed.chars().enumerate() {
        let d = u64::from(c as u8 - b'0');
        frac_units += d * 10u64.pow(decimals - 1 - i as u32);
    }
    whole_units.checked_add(frac_units).ok_or_else(overflow)
}

/// A `--validator-peer`: a PeerId, or a multiaddr ending in `/p2p/<PeerId>` (dialled as is).
fn parse_validator_peer(s: &str) -> anyhow::Result<(PeerId, Vec<Multiaddr>)> {
    if let Ok(p) = s.parse::<PeerId>() {
        return Ok((p, Vec::new()));
    }
    let addr: Multiaddr = s.parse().map_err(|_| {
        anyhow::anyhow!("--validator-peer {s:?} is neither a PeerId nor a multiaddr")
    })?;
    match addr.iter().last() {
        Some(libp2p::multiaddr::Protocol::P2p(p)) => Ok((p, vec![addr])),
        _ => bail!("--validator-peer {s:?}: the multiaddr must end in /p2p/<PeerId>"),
    }
}

/// Parses `--trusted-namespace NAMESPACE=PUBLISHER_KEY` (the key in base58).
pub fn parse_trusted_namespace(text: &str) -> Result<(String, PublicKey), String> {
    let (ns, key) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} must be NAMESPACE=PUBLISHER_KEY"))?;
    d402_capabilities::namespace::validate_namespace("namespace", ns)
        .map_err(|e| format!("{text:?}: {e}"))?;
    let key = key
        .parse::<PublicKey>()
        .map_err(|_| format!("{text:?}: {key:?} is not a base58 ed25519 public key"))?;
    Ok((ns.to_string(), key))
}

fn parse_ip(flag: &str, s: &str) -> anyhow::Result<IpAddr> {
    if s == "localhost" {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    s.parse()
        .with_context(|| format!("--{flag} {s:?} is not an IP address"))
}

fn check_label(label: &str) -> anyhow::Result<()> {
    if label.is_empty()
        || label.len() > 64
        || !label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        bail!("--label {label:?} must be 1 to 64 characters of A-Z a-z 0-9 - _ .");
    }
    Ok(())
}

fn check_evm_address(s: &str) -> anyhow::Result<()> {
    let hex = s
        .strip_prefix("0x")
        .filter(|h| h.len() == 40 && h.chars().all(|c| c.is_ascii_hexdigit()));
    if hex.is_none() {
        bail!("--evm-payout-wallet {s:?} is not a 0x-prefixed 20-byte hex address");
    }
    Ok(())
}

fn is_public(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || (o[0] == 100 && (o[1] & 0xc0) == 64))
        }
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || (seg[0] & 0xfe00) == 0xfc00
                || (seg[0] & 0xffc0) == 0xfe80)
        }
    }
}

impl NodeArgs {
    fn validate(self) -> anyhow::Result<NodeConfig> {
        let label = self.label.clone().unwrap_or_else(|| "node".to_string());
        check_label(&label)?;
        let state_dir = self
            .state
            .clone()
            .unwrap_or_else(|| PathBuf::from(".d402").join(&label));
        if state_dir.as_os_str().is_empty() {
            bail!("--state is empty");
        }
        let host = match &self.host {
            Some(h) => parse_ip("host", h)?,
            None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        let advertise_host = match &self.advertise_host {
            Some(h) => {
                Some(AdvertiseHost::parse(h).with_context(|| format!("--advertise-host {h:?}"))?)
            }
            None => None,
        };
        if let Some(AdvertiseHost::Ip(ip)) = &advertise_host
            && ip.is_unspecified()
        {
            bail!("--advertise-host must be an address peers can reach, not {ip}");
        }
        let port = self.port.unwrap_or(9000);
        let peers = self
            .peer
            .iter()
            .map(|p| p.parse::<PeerSpec>().context("--peer"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut offers = Vec::new();
        for o in &self.offer {
            let r: CapabilityRef = o
                .parse()
                .map_err(|e| anyhow::anyhow!("--offer {o:?}: {e}"))?;
            if !offers.contains(&r) {
                offers.push(r);
            }
        }
        let snapshotter = match self.snapshotter.as_deref() {
            None => None,
            Some("playwright") => Some(SnapshotterKind::Playwright),
            Some("fetch") => Some(SnapshotterKind::Fetch),
            Some(other) => bail!("--snapshotter {other:?} must be playwright or fetch"),
        };
        let mut payout = Wallets::new();
        if let Some(w) = &self.solana_payout_wallet {
            w.parse::<PublicKey>().map_err(|_| {
                anyhow::anyhow!(
                    "--solana-payout-wallet {w:?} is not a base58 32-byte Solana address"
                )
            })?;
            payout.insert(Chain::Solana, w.clone());
        }
        if let Some(w) = &self.evm_payout_wallet {
            check_evm_address(w)?;
            payout.insert(Chain::Evm, w.clone());
        }
        if let Some(w) = &self.local_payout_wallet {
            w.parse::<PublicKey>().map_err(|_| {
                anyhow::anyhow!(
                    "--local-payout-wallet {w:?} is not a local-rail address (a base58 ed25519 public key)"
                )
            })?;
            payout.insert(Chain::Local, w.clone());
        }
        let worker_price_units = match &self.worker_price {
            Some(p) => parse_amount(p, PRICE_DECIMALS)
                .map_err(|e| anyhow::anyhow!("--worker-price: {e}"))?,
            None => DEFAULT_WORKER_PRICE_UNITS,
        };
        let http = match self.http_port {
            Some(p) => Some((
                parse_ip(
                    "http-host",
                    self.http_host.as_deref().unwrap_or("127.0.0.1"),
                )?,
                p,
            )),
            None => None,
        };
        let payment = match &self.payment {
            Some(p) => Some(
                p.parse::<RailKind>()
                    .map_err(|e| anyhow::anyhow!("--payment: {e}"))?,
            ),
            None => None,
        };
        let gateway_price_units = match &self.gateway_price {
            Some(p) => Some(
                parse_amount(p, PRICE_DECIMALS)
                    .map_err(|e| anyhow::anyhow!("--gateway-price: {e}"))?,
            ),
            None => None,
        };
        let gateway_budget_units = match &self.gateway_budget {
            Some(p) => Some(
                parse_amount(p, PRICE_DECIMALS)
                    .map_err(|e| anyhow::anyhow!("--gateway-budget: {e}"))?,
            ),
            None => None,
        };
        let trusted_namespaces = self
            .trusted_namespace
            .iter()
            .map(|t| {
                parse_trusted_namespace(t).map_err(|e| anyhow::anyhow!("--trusted-namespace {e}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let accepted_manifest_cids = self
            .accept_manifest_cid
            .iter()
            .map(|c| {
                c.trim().parse::<Cid>().map_err(|e| {
                    anyhow::anyhow!("--accept-manifest-cid {c:?} is not a manifest CID: {e}")
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        if let Some(bps) = self.max_creator_commission_bps
            && bps > 10_000
        {
            bail!("--max-creator-commission-bps {bps} is more than 10000 (100%)");
        }
        let validators = match &self.validators {
            None => 0,
            Some(v) => match v.trim().parse::<u32>() {
                Ok(n) if n <= MAX_VALIDATORS => n,
                Ok(n) => bail!("--validators {n} is more than {MAX_VALIDATORS}"),
                Err(_) => bail!(
                    "--validators {v:?} is not a count: it is how many agreeing validator \
                     verdicts a task needs (e.g. --validators 1); name validators with \
                     --validator-peer <PeerId or multiaddr>"
                ),
            },
        };
        let validator_peers = self
            .validator_peer
            .iter()
            .map(|v| parse_validator_peer(v))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let fanout = self.fanout.unwrap_or(1);
        let quorum = self.quorum.unwrap_or(1);
        if fanout == 0 || fanout > MAX_FANOUT {
            bail!("--fanout {fanout} must be 1 to {MAX_FANOUT}");
        }
        if quorum == 0 || quorum > fanout {
            bail!("--quorum {quorum} must be 1 to --fanout ({fanout})");
        }
        let kad_mode = match self.kad_mode.as_deref() {
            None | Some("auto") => KadMode::Auto,
            Some("server") => KadMode::Server,
            Some("client") => KadMode::Client,
            Some(other) => bail!("--kad-mode {other:?} must be auto, server or client"),
        };
        let max_connections = self.max_connections.unwrap_or(512);
        if max_connections < 8 {
            bail!("--max-connections {max_connections} is below 8");
        }
        let ttl_hours = self.idempotency_ttl_hours.unwrap_or(24);
        if !(1..=720).contains(&ttl_hours) {
            bail!("--idempotency-ttl-hours {ttl_hours} must be 1 to 720");
        }
        let log_format = match self.log_format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => bail!("--log-format {other:?} must be text or json"),
        };
        if http.is_none() {
            let gateway_only = [
                ("--gateway-price", self.gateway_price.is_some()),
                ("--gateway-budget", self.gateway_budget.is_some()),
                (
                    "--require-capability-registration",
                    self.require_capability_registration.is_some(),
                ),
                (
                    "--require-signed-capability-registration",
                    self.require_signed_capability_registration.is_some(),
                ),
                (
                    "--max-creator-commission-bps",
                    self.max_creator_commission_bps.is_some(),
                ),
                ("--validators", self.validators.is_some()),
                ("--validator-peer", !validator_peers.is_empty()),
                ("--dev-faucet", self.dev_faucet.is_some()),
                ("--fanout", self.fanout.is_some()),
                ("--quorum", self.quorum.is_some()),
                ("--trusted-namespace", !trusted_namespaces.is_empty()),
                ("--accept-manifest-cid", !accepted_manifest_cids.is_empty()),
                (
                    "--idempotency-ttl-hours",
                    self.idempotency_ttl_hours.is_some(),
                ),
            ];
            if let Some((flag, _)) = gateway_only.iter().find(|(_, set)| *set) {
                bail!("{flag} is a gateway setting: a gateway also needs --http-port");
            }
        }
        Ok(NodeConfig {
            label,
            state_dir,
            host,
            advertise_host,
            port,
            peers,
            offers,
            snapshotter,
            fallback_to_fetch: self.fallback_to_fetch.unwrap_or(false),
            payout,
            worker_price_units,
            allow_loopback_urls: self.allow_loopback_urls.unwrap_or(false),
            http,
            payment,
            gateway_price_units,
            gateway_budget_units,
            dev_faucet: self.dev_faucet.unwrap_or(false),
            trusted_namespaces,
            accepted_manifest_cids,
            require_capability_registration: self.require_capability_registration.unwrap_or(false),
            require_signed_capability_registration: self
                .require_signed_capability_registration
                .unwrap_or(false),
            max_creator_commission_bps: self.max_creator_commission_bps,
            validator: self.validator.unwrap_or(false),
            validators,
            validator_peers,
            fanout,
            quorum,
            kad_mode,
            max_connections,
            idempotency_ttl: std::time::Duration::from_secs(u64::from(ttl_hours) * 3600),
            log_format,
        })
    }
}

impl NodeConfig {
    /// The roles this configuration gives the node.
    pub fn roles(&self) -> Roles {
        let gateway = self.http.is_some();
        Roles {
            worker: !self.offers.is_empty() && !gateway,
            gateway,
            validator: self.validator,
            bootstrap: self.offers.is_empty() && !gateway,
        }
    }

    /// Whether the node serves the Kademlia DHT: bootstrap, gateway and validator nodes do;
    /// a worker does only when it advertises a public IP or a DNS name (it is then taken to
    /// be reachable), or when `--kad-mode server` says so.
    pub fn kad_server(&self) -> bool {
        match self.kad_mode {
            KadMode::Server => true,
            KadMode::Client => false,
            KadMode::Auto => {
                let r = self.roles();
                r.bootstrap
                    || r.gateway
                    || r.validator
                    || match &self.advertise_host {
                        Some(AdvertiseHost::Ip(ip)) => is_public(ip),
                        Some(AdvertiseHost::Dns(_)) => true,
                        None => false,
                    }
            }
        }
    }

    /// The effective configuration as JSON (for `--print-config`; no secrets in it).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "label": self.label,
            "state": self.state_dir,
            "host": self.host.to_string(),
            "advertise_host": self.advertise_host.as_ref().map(|h| match h {
                AdvertiseHost::Ip(ip) => ip.to_string(),
                AdvertiseHost::Dns(n) => n.clone(),
            }),
            "port": self.port,
            "peer": self.peers.iter().map(|p| p.addr.to_string()).collect::<Vec<_>>(),
            "offer": self.offers.iter().map(|o| o.to_string()).collect::<Vec<_>>(),
            "snapshotter": self.snapshotter,
            "fallback_to_fetch": self.fallback_to_fetch,
            "payout": self.payout,
            "worker_price_units": self.worker_price_units,
            "allow_loopback_urls": self.allow_loopback_urls,
            "http": self.http.map(|(h, p)| format!("{h}:{p}")),
            "payment": self.payment,
            "gateway_price_units": self.gateway_price_units,
            "gateway_budget_units": self.gateway_budget_units,
            "dev_faucet": self.dev_faucet,
            "trusted_namespaces": self.trusted_namespaces.iter()
                .map(|(ns, k)| format!("{ns}={k}")).collect::<Vec<_>>(),
            "accepted_manifest_cids": self.accepted_manifest_cids.iter()
                .map(|c| c.to_string()).collect::<Vec<_>>(),
            "require_capability_registration": self.require_capability_registration,
            "require_signed_capability_registration": self.require_signed_capability_registration,
            "max_creator_commission_bps": self.max_creator_commission_bps,
            "validator": self.validator,
            "validators": self.validators,
            "validator_peer": self.validator_peers.iter().map(|(p, a)| match a.first() {
                Some(a) => a.to_string(),
                None => p.to_string(),
            }).collect::<Vec<_>>(),
            "fanout": self.fanout,
            "quorum": self.quorum,
            "kad_mode": self.kad_mode,
            "kad_server": self.kad_server(),
            "roles": self.roles(),
            "max_connections": self.max_connections,
            "idempotency_ttl_hours": self.idempotency_ttl.as_secs() / 3600,
            "log_format": self.log_format,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        args: NodeArgs,
    }

    fn parse(argv: &[&str]) -> anyhow::Result<NodeConfig> {
        let mut full = vec!["t"];
        full.extend_from_slice(argv);
        T::try_parse_from(full)?.args.resolve()
    }

    const WALLET: &str = "4Nd1mYQpH3wLMa3wVwTuQKkqYHT9J3uj2cNQ6gZ5jXL1";

    #[test]
    fn operator_guide_worker_command() {
        let c = parse(&[
            "--label",
            "worker-1",
            "--state",
            ".d402/worker-1",
            "--host",
            "0.0.0.0",
            "--advertise-host",
            "203.0.113.7",
            "--port",
            "9001",
            "--peer",
            "198.51.100.1:9000",
            "--offer",
            "web.page_to_markdown@1",
            "--snapshotter",
            "playwright",
            "--fallback-to-fetch",
            "true",
            "--solana-payout-wallet",
            WALLET,
        ])
        .unwrap();
        assert_eq!(c.label, "worker-1");
        assert_eq!(c.port, 9001);
        assert_eq!(c.peers[0].addr.to_string(), "/ip4/198.51.100.1/tcp/9000");
        assert_eq!(c.offers[0].to_string(), "web.page_to_markdown@1");
        assert!(c.fallback_to_fetch);
        assert!(c.roles().worker && !c.roles().bootstrap && !c.roles().gateway);
        // 203.0.113.0/24 is documentation space: not public, so client mode.
        assert!(!c.kad_server());
        assert_eq!(
            c.payout.get(&Chain::Solana).map(String::as_str),
            Some(WALLET)
        );
    }

    #[test]
    fn operator_guide_gateway_command() {
        let c = parse(&[
            "--label",
            "gateway-1",
            "--state",
            ".d402/gateway-1",
            "--host",
            "0.0.0.0",
            "--advertise-host",
            "198.51.100.2",
            "--port",
            "9000",
            "--peer",
            "198.51.100.3:9001",
            "--http-host",
            "0.0.0.0",
            "--http-port",
            "8080",
            "--payment",
            "solana-direct",
            "--gateway-price",
            "$0.01",
            "--gateway-budget",
            "0.01",
            "--offer",
            "web.page_to_markdown@1",
            "--require-capability-registration",
            "true",
            "--require-signed-capability-registration",
            "true",
            "--max-creator-commission-bps",
            "2000",
        ])
        .unwrap();
        assert_eq!(c.gateway_price_units, Some(10_000));
        assert_eq!(c.gateway_budget_units, Some(10_000));
        assert_eq!(c.payment, Some(RailKind::SolanaDirect));
        assert_eq!(c.max_creator_commission_bps, Some(2000));
        assert!(c.roles().gateway && !c.roles().worker);
        assert!(c.kad_server());
        assert_eq!(c.http, Some(("0.0.0.0".parse().unwrap(), 8080)));
    }

    #[test]
    fn bootstrap_by_default() {
        let c = parse(&[]).unwrap();
        assert!(c.roles().bootstrap);
        assert!(c.kad_server());
        assert_eq!(c.state_dir, PathBuf::from(".d402/node"));
    }

    #[test]
    fn acceptance_lists_parse() {
        let key = "4Nd1mYQpH3wLMa3wVwTuQKkqYHT9J3uj2cNQ6gZ5jXL1";
        let cid = d402_protocol::Cid::dag_cbor(b"manifest").to_string();
        let ns = format!("web={key}");
        let c = parse(&[
            "--http-port",
            "1",
            "--trusted-namespace",
            &ns,
            "--trusted-namespace",
            &format!("acme.tools={key}"),
            "--accept-manifest-cid",
            &cid,
        ])
        .unwrap();
        assert_eq!(c.trusted_namespaces.len(), 2);
        assert_eq!(c.trusted_namespaces[0].0, "web");
        assert_eq!(c.trusted_namespaces[0].1.to_string(), key);
        assert_eq!(c.accepted_manifest_cids[0].to_string(), cid);
        for (argv, flag) in [
            (
                vec!["--http-port", "1", "--trusted-namespace", "web"],
                "--trusted-namespace",
            ),
            (
                vec!["--http-port", "1", "--trusted-namespace", "Web=x"],
                "--trusted-namespace",
            ),
            (
                vec!["--http-port", "1", "--accept-manifest-cid", "bafynope"],
                "--accept-manifest-cid",
            ),
            (vec!["--trusted-namespace", &ns], "--trusted-namespace"),
        ] {
            let err = format!("{:#}", parse(&argv).unwrap_err());
            assert!(err.contains(flag), "{argv:?}: {err}");
        }
    }

    #[test]
    fn amounts_are_exact_integers() {
        assert_eq!(parse_amount("$0.01", 6), Ok(10_000));
        assert_eq!(parse_amount("0.01", 6), Ok(10_000));
        assert_eq!(parse_amount("1", 6), Ok(1_000_000));
        assert_eq!(parse_amount("12.345678", 6), Ok(12_345_678));
        assert_eq!(parse_amount("0.1000000", 6), Ok(100_000));
        assert_eq!(parse_amount(".5", 6), Ok(500_000));
        assert_eq!(parse_amount("18446744073709.551615", 6), Ok(u64::MAX));
        for bad in [
            "",
            "$",
            "-1",
            "+1",
            "1e3",
            "0.0000001",
            "1.2.3",
            "1.",
            "abc",
            "$ 1",
            "1,00",
            "18446744073709.551616",
            "99999999999999999999",
        ] {
            assert!(parse_amount(bad, 6).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn bad_values_name_the_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&["--peer", "nope"], "--peer"),
            (&["--offer", "Bad@1"], "--offer"),
            (&["--snapshotter", "lynx"], "--snapshotter"),
            (&["--solana-payout-wallet", "xyz"], "--solana-payout-wallet"),
            (
                &["--http-port", "1", "--gateway-price", "1.0000001"],
                "--gateway-price",
            ),
            (
                &["--http-port", "1", "--max-creator-commission-bps", "10001"],
                "--max-creator-commission-bps",
            ),
            (
                &["--http-port", "1", "--fanout", "3", "--quorum", "4"],
                "--quorum",
            ),
            (&["--payment", "paypal"], "--payment"),
            (&["--gateway-price", "$0.01"], "--gateway-price"),
            (&["--label", "bad label"], "--label"),
            (&["--host", "example.org"], "--host"),
            (&["--advertise-host", "0.0.0.0"], "--advertise-host"),
            (&["--log-format", "xml"], "--log-format"),
            (&["--kad-mode", "maybe"], "--kad-mode"),
            (
                &["--http-port", "1", "--validators", "12D3KooWnot"],
                "--validator-peer",
            ),
            (&["--http-port", "1", "--validators", "17"], "--validators"),
            (
                &["--http-port", "1", "--validator-peer", "notapeer"],
                "--validator-peer",
            ),
            (
                &[
                    "--http-port",
                    "1",
                    "--validator-peer",
                    "/ip4/127.0.0.1/tcp/1",
                ],
                "/p2p/",
            ),
            (&["--validators", "1"], "--validators"),
            (
                &["--http-port", "1", "--idempotency-ttl-hours", "0"],
                "--idempotency-ttl-hours",
            ),
            (
                &["--idempotency-ttl-hours", "48"],
                "--idempotency-ttl-hours",
            ),
        ];
        for (argv, flag) in cases {
            let err = format!("{:#}", parse(argv).unwrap_err());
            assert!(err.contains(flag), "{argv:?}: {err}");
        }
        assert!(parse(&["--fallback-to-fetch", "maybe"]).is_err());
    }

    #[test]
    fn validators_is_a_count_and_peers_are_separate() {
        let peer = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let addr = format!("/ip4/127.0.0.1/tcp/9000/p2p/{peer}");
        let c = parse(&[
            "--http-port",
            "1",
            "--validators",
            "2",
            "--validator-peer",
            &addr,
            "--validator-peer",
            &peer.to_string(),
        ])
        .unwrap();
        assert_eq!(c.validators, 2);
        assert_eq!(c.validator_peers.len(), 2);
        assert_eq!(c.validator_peers[0].0, peer);
        assert_eq!(c.validator_peers[0].1[0].to_string(), addr);
        assert!(c.validator_peers[1].1.is_empty());
        assert_eq!(parse(&["--http-port", "1"]).unwrap().validators, 0);
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            "label = \"from-file\"\nport = 7000\npeer = [\"127.0.0.1:1234\"]\nhttp-port = 8080\ngateway-price = \"$0.02\"\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let c = parse(&["--config", p, "--port", "7001"]).unwrap();
        assert_eq!(c.label, "from-file");
        assert_eq!(c.port, 7001);
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.gateway_price_units, Some(20_000));
        assert_eq!(c.idempotency_ttl.as_secs(), 24 * 3600);
        std::fs::write(&path, "http-port = 8080\nidempotency-ttl-hours = 48\n").unwrap();
        let c = parse(&["--config", p]).unwrap();
        assert_eq!(c.idempotency_ttl.as_secs(), 48 * 3600);

        std::fs::write(&path, "prot = 1\n").unwrap();
        let err = format!("{:#}", parse(&["--config", p]).unwrap_err());
        assert!(err.contains("prot"), "{err}");
        // Money is never a float, not even in the file.
        std::fs::write(&path, "http-port = 1\ngateway-budget = 0.01\n").unwrap();
        assert!(parse(&["--config", p]).is_err());
    }

    #[test]
    fn public_worker_serves_the_dht() {
        let c = parse(&["--offer", "a.b@1", "--advertise-host", "8.8.8.8"]).unwrap();
        assert!(c.kad_server());
        let c = parse(&["--offer", "a.b@1", "--advertise-host", "10.1.2.3"]).unwrap();
        assert!(!c.kad_server());
        let c = parse(&["--offer", "a.b@1", "--kad-mode", "server"]).unwrap();
        assert!(c.kad_server());
    }
}
