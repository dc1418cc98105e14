//! `d402 wallet new|balance|faucet`: wallets of the embedded `local` rail.
//!
//! A wallet is an ed25519 key in its own owner-only file (64 hex digits, the format of
//! `node/src/keys.rs`); its local-rail address is the base58 public key. Balances live in
//! a gateway's ledger and are read and (in dev mode only) credited over its HTTP API:
//! `GET /v1/local/accounts/{address}` and `POST /v1/local/faucet`.

use std::{
    fs,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use d402_protocol::SigningKey;
use d402_settlement::{Asset, wallet, x402::Units};
use serde_json::json;

use super::http_client::{BaseUrl, Connection};
use crate::keys;

/// `d402 wallet` subcommands.
#[derive(Debug, Subcommand)]
pub enum WalletCommand {
    /// Create a new local-rail wallet key file (owner-only) and print its address.
    New(NewArgs),
    /// Print a local-rail balance as a gateway's ledger holds it.
    Balance(BalanceArgs),
    /// Credit a wallet from a dev-mode gateway's faucet (`--dev-faucet true`).
    Faucet(FaucetArgs),
}

/// `d402 wallet new`.
#[derive(Debug, Args)]
pub struct NewArgs {
    /// The key file to create; an existing file is never overwritten.
    #[arg(long)]
    wallet: PathBuf,
}

/// `d402 wallet balance`.
#[derive(Debug, Args)]
pub struct BalanceArgs {
    /// The gateway, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    gateway: String,
    /// The wallet key file whose balance to read.
    #[arg(long, required_unless_present = "address", conflicts_with = "address")]
    wallet: Option<PathBuf>,
    /// A local-rail address (base58 public key) instead of a wallet file.
    #[arg(long)]
    address: Option<String>,
    /// Print the gateway's JSON answer.
    #[arg(long)]
    json: bool,
}

/// `d402 wallet faucet`.
#[derive(Debug, Args)]
pub struct FaucetArgs {
    /// The gateway, e.g. http://127.0.0.1:8080 (it must run with --dev-faucet true).
    #[arg(long)]
    gateway: String,
    /// The wallet key file to credit.
    #[arg(long)]
    wallet: PathBuf,
    /// How much, in whole units of the local dollar (6 decimals), e.g. 1.00 or $0.25.
    #[arg(long)]
    amount: String,
    /// Print the gateway's JSON answer.
    #[arg(long)]
    json: bool,
}

/// Runs a `d402 wallet` subcommand.
pub fn run(cmd: WalletCommand) -> anyhow::Result<()> {
    match cmd {
        WalletCommand::New(a) => {
            let key = create_wallet(&a.wallet)?;
            println!("{}", wallet::address(&key));
            eprintln!(
                "created wallet {} (owner-only); its local-rail address is on stdout",
                a.wallet.display()
            );
            Ok(())
        }
        WalletCommand::Balance(a) => {
            let address = match (&a.wallet, &a.address) {
                (Some(path), _) => wallet::address(&load_wallet(path)?),
                (None, Some(addr)) => {
                    wallet::parse_address(addr)?;
                    addr.trim().to_string()
                }
                (None, None) => bail!("give --wallet or --address"),
            };
            let base = BaseUrl::parse(&a.gateway)?;
            let rt = runtime()?;
            let (units, asset, raw) = rt.block_on(async {
                let mut conn = Connection::new(base, REQUEST_TIMEOUT);
                balance(&mut conn, &address).await
            })?;
            if a.json {
                println!("{raw}");
            } else {
                println!("{address} {}", describe_units(units, &asset));
            }
            Ok(())
        }
        WalletCommand::Faucet(a) => {
            let units = Asset::local_usdc()
                .parse(&a.amount)
                .with_context(|| format!("--amount {:?}", a.amount))?;
            if units == 0 {
                bail!("--amount must be above 0");
            }
            let key = load_wallet(&a.wallet)?;
            let address = wallet::address(&key);
            let base = BaseUrl::parse(&a.gateway)?;
            let rt = runtime()?;
            let (balance, raw) = rt.block_on(async {
                let mut conn = Connection::new(base, REQUEST_TIMEOUT);
                faucet(&mut conn, &address, units).await
            })?;
            if a.json {
                println!("{raw}");
            } else {
                let asset = Asset::local_usdc();
                println!(
                    "{address} credited {}; balance {}",
                    describe_units(units, &asset.id),
                    describe_units(balance, &asset.id)
                );
            }
            Ok(())
        }
    }
}

/// How long one wallet request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// `12.5 USDC (12500000 units)` for the local dollar; `N units of ASSET` otherwise.
pub fn describe_units(units: u64, asset_id: &str) -> String {
    let local = Asset::local_usdc();
    if asset_id == local.id {
        format!("{} {} ({units} units)", local.format(units), local.symbol)
    } else {
        format!("{units} units of {asset_id}")
    }
}

/// Creates a new wallet key file, owner-only (0600), refusing to replace any file.
///
/// The key is written to a temporary file in the same directory, synced, then linked to
/// `path` (`link` fails when `path` exists, so a racing writer cannot be overwritten
/// either) and the temporary name removed.
pub fn create_wallet(path: &Path) -> anyhow::Result<SigningKey> {
    if path.exists() || path.symlink_metadata().is_ok() {
        bail!(
            "{} already exists; a wallet file is never overwritten (choose another path)",
            path.display()
        );
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let key = wallet::generate()?;
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).context("no randomness from the OS")?;
    let tmp = dir.join(format!(".wallet-{}.tmp", hex::encode(nonce)));
    let write = || -> anyhow::Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        file.write_all(wallet::to_key_text(&key).as_bytes())?;
        file.sync_all()?;
        Ok(())
    };
    let linked = write().and_then(|()| {
        fs::hard_link(&tmp, path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                anyhow::anyhow!("{} already exists; not overwritten", path.display())
            } else {
                anyhow::Error::new(e).context(format!("cannot create {}", path.display()))
            }
        })
    });
    let _ = fs::remove_file(&tmp);
    linked?;
    if let Ok(d) = fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(key)
}

/// Loads a wallet key file (owner-only, 64 hex digits).
pub fn load_wallet(path: &Path) -> anyhow::Result<SigningKey> {
    keys::load(path).with_context(|| format!("wallet {}", path.display()))
}

/// Reads a balance: `(units, asset id, the JSON answer)`.
pub async fn balance(
    conn: &mut Connection,
    address: &str,
) -> anyhow::Result<(u64, String, serde_json::Value)> {
    let resp = conn
        .get(&format!("/v1/local/accounts/{}", address.trim()))
        .await?;
    if !resp.status.is_success() {
        bail!(
            "the gateway answered {} to the balance request: {}",
            resp.status,
            resp.error_text()
        );
    }
    let v = resp.json()?;
    let units = units_field(&v, "units")?;
    let asset = v
        .get("asset")
        .and_then(|a| a.as_str())
        .unwrap_or_default()
        .to_string();
    Ok((units, asset, v))
}

/// Asks the faucet for `units`: `(new balance, the JSON answer)`.
pub async fn faucet(
    conn: &mut Connection,
    address: &str,
    units: u64,
) -> anyhow::Result<(u64, serde_json::Value)> {
    let resp = conn
        .post_json(
            "/v1/local/faucet",
            &[],
            &json!({"address": address, "units": units.to_string()}),
        )
        .await?;
    if !resp.status.is_success() {
        bail!(
            "the gateway answered {} to the faucet request: {}",
            resp.status,
            resp.error_text()
        );
    }
    let v = resp.json()?;
    Ok((units_field(&v, "units")?, v))
}

/// An integer-string money field (`"12500"`), strictly parsed.
pub fn units_field(v: &serde_json::Value, field: &str) -> anyhow::Result<u64> {
    let text = v
        .get(field)
        .and_then(|u| u.as_str())
        .with_context(|| format!("the gateway's answer has no string field {field:?}: {v}"))?;
    Units::parse(text)
        .map(|u| u.0)
        .with_context(|| format!("{field} {text:?} is not an integer string of units"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn new_wallet_is_owner_only_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/client.key");
        let key = create_wallet(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_wallet(&path).unwrap().to_bytes(), key.to_bytes());
        let before = fs::read(&path).unwrap();
        let err = create_wallet(&path).unwrap_err().to_string();
        assert!(err.contains("never overwritten"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), before);
        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("client.key")]);
    }

    #[test]
    fn units_are_described_in_dollars() {
        assert_eq!(
            describe_units(1_250_000, "local:USDC"),
            "1.25 USDC (1250000 units)"
        );
        assert_eq!(describe_units(7, "x"), "7 units of x");
        let v = json!({"units": "12"});
        assert_eq!(units_field(&v, "units").unwrap(), 12);
        assert!(units_field(&json!({"units": 12}), "units").is_err());
        assert!(units_field(&json!({"units": "1.5"}), "units").is_err());
    }
}
