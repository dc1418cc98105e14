//! `d402 capability …`: write, check, register, verify, import and list capabilities.
//!
//! Every command validates all of its input before it creates a key or writes a file, so a
//! refused command writes nothing. Errors are one line naming the file, field and rule; the
//! binary exits with code 2 on any error.

use std::{
    fs,
    io::{self, Read, Write},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use d402_capabilities::{
    CapabilityRegistration, Manifest, Registration, SnapshotterKind,
    commission::BPS_DENOMINATOR,
    manifest::{MAX_MANIFEST_JSON, MAX_WASM, placeholder_implementation_cid},
    namespace::validate_namespace,
    registration::MAX_REGISTRATION_JSON,
    wallet,
};
use d402_protocol::{Chain, Cid, PublicKey, Wallets};

use crate::{
    capstore::{CapStore, Source, builtin_capabilities},
    keys,
};

/// File name of the publisher key under `--state`.
pub const PUBLISHER_KEY_FILE: &str = "publisher.key";

/// The `d402 capability` subcommands.
#[derive(Debug, Subcommand)]
pub enum CapabilityCommand {
    /// Print a complete, valid manifest to edit (JSON on stdout).
    Template(TemplateArgs),
    /// Check a manifest (and, with --wasm, that it pins that module).
    Validate(ValidateArgs),
    /// Sign commission terms for a manifest with the publisher key under --state.
    Register(RegisterArgs),
    /// Check a registration's CID and signature (and its manifest) and print its terms.
    Verify(VerifyArgs),
    /// Put a manifest, its Wasm module and its registration into a node's store.
    Import(ImportArgs),
    /// List the capabilities in a node's store, each verified.
    List(ListArgs),
    /// Run a capability locally through the worker's executor (snapshot, Wasm, limits).
    Run(super::capability_run::RunArgs),
    /// Fetch a capability by manifest CID from a peer that has it, verify it and import it.
    Fetch(super::capability_fetch::FetchArgs),
}

/// `d402 capability template`.
#[derive(Debug, Args)]
#[command(disable_version_flag = true)]
pub struct TemplateArgs {
    /// Capability id, `namespace.name`.
    #[arg(long)]
    id: String,
    /// Version, 1 or more.
    #[arg(long)]
    version: u32,
    /// The built Wasm module: its raw CID becomes the implementation CID. Without it the
    /// implementation is a placeholder (the empty module) to replace.
    #[arg(long)]
    wasm: Option<PathBuf>,
    /// A snapshotter the capability needs (fetch or playwright); repeat for a fallback.
    /// With one, the input is `{"url": …}` and egress is public_http.
    #[arg(long, value_parser = parse_snapshotter)]
    snapshotter: Vec<SnapshotterKind>,
}

/// `d402 capability validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The manifest JSON.
    #[arg(long)]
    file: PathBuf,
    /// The Wasm module the manifest should pin.
    #[arg(long)]
    wasm: Option<PathBuf>,
}

/// `d402 capability register`.
#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// The manifest JSON.
    #[arg(long)]
    file: PathBuf,
    /// Publisher state directory: holds `publisher.key` (created 0600 when missing) and the
    /// namespace registry.
    #[arg(long, required_unless_present = "unsigned")]
    state: Option<PathBuf>,
    /// The namespace; must be the manifest id's namespace.
    #[arg(long)]
    namespace: String,
    /// Creator commission in basis points of accepted gross worker payout (0..=10000).
    #[arg(long, default_value_t = 0)]
    creator_commission_bps: u64,
    /// Creator wallet for Solana rails (base58 32-byte address).
    #[arg(long)]
    creator_solana_wallet: Option<String>,
    /// Creator wallet for EVM rails (0x + 40 hex; EIP-55 checksum when mixed case).
    #[arg(long)]
    creator_evm_wallet: Option<String>,
    /// Creator wallet for the embedded `local` rail (base58 ed25519 public key).
    #[arg(long)]
    creator_local_wallet: Option<String>,
    /// Print an unsigned registration (no publisher, no key); gateways that require signed
    /// registrations refuse it.
    #[arg(long, conflicts_with = "state")]
    unsigned: bool,
}

/// `d402 capability verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The registration JSON.
    #[arg(long)]
    file: PathBuf,
    /// The manifest JSON the registration should be for.
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// Accept an unsigned registration (its terms are checked, nobody vouches for them).
    #[arg(long)]
    allow_unsigned: bool,
    /// Print the terms as JSON.
    #[arg(long)]
    json: bool,
}

/// `d402 capability import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The node's state directory; the store is `<state>/capabilities`.
    #[arg(long)]
    state: PathBuf,
    /// The manifest JSON.
    #[arg(long)]
    file: PathBuf,
    /// The Wasm module the manifest pins.
    #[arg(long)]
    wasm: PathBuf,
    /// The registration JSON for this exact manifest.
    #[arg(long)]
    registration: Option<PathBuf>,
    /// Replace another manifest already stored under the same id@version.
    #[arg(long)]
    replace: bool,
}

/// `d402 capability list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// The node's state directory.
    #[arg(long)]
    state: PathBuf,
}

fn parse_snapshotter(s: &str) -> Result<SnapshotterKind, String> {
    match s {
        "fetch" => Ok(SnapshotterKind::Fetch),
        "playwright" => Ok(SnapshotterKind::Playwright),
        other => Err(format!(
            "{other:?} is not a snapshotter (fetch or playwright)"
        )),
    }
}

/// Runs a `d402 capability` subcommand.
pub fn run(cmd: CapabilityCommand) -> anyhow::Result<()> {
    match cmd {
        CapabilityCommand::Template(a) => template(a),
        CapabilityCommand::Validate(a) => validate(a),
        CapabilityCommand::Register(a) => register(a),
        CapabilityCommand::Verify(a) => verify(a),
        CapabilityCommand::Import(a) => import(a),
        CapabilityCommand::List(a) => list(a),
        CapabilityCommand::Run(a) => super::capability_run::run(a),
        CapabilityCommand::Fetch(a) => super::capability_fetch::run(a),
    }
}

/// Reads at most `max` bytes of a file named on the command line.
pub(super) fn read_input(path: &Path, max: usize) -> anyhow::Result<Vec<u8>> {
    let file = fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(max as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() > max {
        bail!("{} is larger than the cap of {max} bytes", path.display());
    }
    Ok(bytes)
}

fn read_manifest(path: &Path) -> anyhow::Result<Manifest> {
    let bytes = read_input(path, MAX_MANIFEST_JSON)?;
    Manifest::from_json(&bytes).with_context(|| format!("{}", path.display()))
}

fn read_registration(path: &Path) -> anyhow::Result<CapabilityRegistration> {
    let bytes = read_input(path, MAX_REGISTRATION_JSON)?;
    CapabilityRegistration::from_json(&bytes).with_context(|| format!("{}", path.display()))
}

fn read_wasm(manifest: &Manifest, path: &Path) -> anyhow::Result<Vec<u8>> {
    let wasm = read_input(path, MAX_WASM)?;
    manifest
        .check_wasm(&wasm)
        .with_context(|| format!("{}", path.display()))?;
    Ok(wasm)
}

/// Writes `text` and a newline to stdout, reporting a closed pipe as an error.
fn print_out(text: &str) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{text}")
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}

fn warn_placeholder(manifest: &Manifest) {
    if manifest.has_placeholder_implementation() {
        eprintln!(
            "note: implementation.cid {} is the template's placeholder (an empty Wasm module); \
             build your module and run d402 capability template --wasm, or set the raw CID yourself",
            manifest.implementation.cid
        );
    }
}

fn template(a: TemplateArgs) -> anyhow::Result<()> {
    let implementation = match &a.wasm {
        Some(path) => {
            let wasm = read_input(path, MAX_WASM)?;
            d402_capabilities::manifest::check_wasm_binary(&wasm)
                .with_context(|| format!("{}", path.display()))?;
            Cid::raw(&wasm)
        }
        None => placeholder_implementation_cid(),
    };
    let manifest = Manifest::template(&a.id, a.version, implementation, a.snapshotter)?;
    print_out(&manifest.to_json_pretty()?)?;
    warn_placeholder(&manifest);
    Ok(())
}

fn validate(a: ValidateArgs) -> anyhow::Result<()> {
    let manifest = read_manifest(&a.file)?;
    let cid = manifest.cid()?;
    match &a.wasm {
        Some(path) => {
            read_wasm(&manifest, path)?;
            print_out(&format!(
                "valid: {} manifest {cid}; implementation {} matches {}",
                manifest.capability(),
                manifest.implementation.cid,
                path.display()
            ))?;
        }
        None => {
            print_out(&format!("valid: {} manifest {cid}", manifest.capability()))?;
            warn_placeholder(&manifest);
        }
    }
    Ok(())
}

fn now_ms() -> anyhow::Result<u64> {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the system clock is before 1970")?;
    u64::try_from(d.as_millis()).context("the system clock is out of range")
}

fn creator_wallets(a: &RegisterArgs) -> anyhow::Result<Wallets> {
    let mut wallets = Wallets::new();
    for (flag, chain, value) in [
        (
            "--creator-solana-wallet",
            Chain::Solana,
            &a.creator_solana_wallet,
        ),
        ("--creator-evm-wallet", Chain::Evm, &a.creator_evm_wallet),
        (
            "--creator-local-wallet",
            Chain::Local,
            &a.creator_local_wallet,
        ),
    ] {
        if let Some(address) = value {
            wallet::check_address(flag, chain, address)?;
            wallets.insert(chain, address.clone());
        }
    }
    Ok(wallets)
}

fn register(a: RegisterArgs) -> anyhow::Result<()> {
    // 1. Everything that can be checked without the state: nothing is written yet.
    let manifest = read_manifest(&a.file)?;
    validate_namespace("--namespace", &a.namespace)?;
    if a.namespace != manifest.namespace() {
        bail!(
            "--namespace {:?} does not match the manifest id {} (its namespace is {:?})",
            a.namespace,
            manifest.id,
            manifest.namespace()
        );
    }
    let bps = u16::try_from(a.creator_commission_bps)
        .ok()
        .filter(|b| *b <= BPS_DENOMINATOR)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--creator-commission-bps {} is above {BPS_DENOMINATOR} (100%)",
                a.creator_commission_bps
            )
        })?;
    let wallets = creator_wallets(&a)?;
    let body = Registration::for_manifest(&manifest, bps, wallets, None, now_ms()?)
        .map_err(|e| anyhow::anyhow!("{}", flag_names(&e.to_string())))?;

    let Some(state) = a.state.as_deref() else {
        // --unsigned: no key, no state.
        let reg = CapabilityRegistration::unsigned(body)?;
        print_out(&reg.to_json_pretty()?)?;
        eprintln!(
            "unsigned registration {} for {} ({} bps); gateways that require signed \
             registrations refuse it",
            reg.cid()?,
            manifest.capability(),
            bps
        );
        warn_missing_wallets(reg.body());
        return Ok(());
    };

    // 2. The state: a directory (or missing), its key and namespace registry read first.
    if state.exists() && !state.is_dir() {
        bail!("--state {} is not a directory", state.display());
    }
    let store = CapStore::new(state);
    let namespaces = store.namespaces()?;
    let key_path = state.join(PUBLISHER_KEY_FILE);
    if key_path.exists() {
        // An existing key must load (owner-only mode, well-formed) and own the namespace.
        let key = keys::load(&key_path)?;
        namespaces.check(&a.namespace, &PublicKey::from(key.verifying_key()))?;
    } else if let Some((owned, owner)) = namespaces.overlapping_owner(&a.namespace) {
        bail!(
            "namespace {:?} is owned by publisher {owner} (through {owned:?}) and {} has no \
             publisher key; restore that key or register under a namespace of your own",
            a.namespace,
            key_path.display()
        );
    }

    // 3. Key, check ownership, sign, then record the namespace.
    let key = keys::load_or_create(&key_path)?;
    let publisher = PublicKey::from(key.verifying_key());
    namespaces.check(&a.namespace, &publisher)?;
    let reg = CapabilityRegistration::sign(body, &key)?;
    let claimed = store.claim_namespace(&a.namespace, &publisher)?;
    let json = reg.to_json_pretty()?;
    print_out(&json)?;
    eprintln!(
        "registered {} manifest {}: registration {}, {} bps, publisher {}{}",
        manifest.capability(),
        reg.body().manifest_cid,
        reg.cid()?,
        bps,
        publisher,
        if claimed {
            format!(" (now owns namespace {:?})", a.namespace)
        } else {
            String::new()
        }
    );
    warn_placeholder(&manifest);
    warn_missing_wallets(reg.body());
    Ok(())
}

/// Notes, on stderr, the chain families a commission-bearing registration has no wallet for:
/// gateways settling on those rails will refuse it.
fn warn_missing_wallets(body: &Registration) {
    if body.creator_commission_bps == 0 {
        return;
    }
    for (chain, flag) in [
        (Chain::Solana, "--creator-solana-wallet"),
        (Chain::Evm, "--creator-evm-wallet"),
    ] {
        if !body.creator_wallets.contains_key(&chain) {
            let rails: Vec<&str> = d402_protocol::RailKind::ALL
                .into_iter()
                .filter(|r| r.splits_commission() && r.payout_chain() == chain)
                .map(|r| r.as_str())
                .collect();
            eprintln!(
                "note: no {flag}: gateways settling on {} will refuse these terms",
                rails.join(", ")
            );
        }
    }
}

/// Rewrites registration field names in an error to the flags that set them.
fn flag_names(message: &str) -> String {
    for (field, flag) in [
        ("creator_wallets.solana:", "--creator-solana-wallet:"),
        ("creator_wallets.evm:", "--creator-evm-wallet:"),
        ("creator_wallets.local:", "--creator-local-wallet:"),
        (
            "creator_wallets:",
            "creator wallets (--creator-solana-wallet, --creator-evm-wallet):",
        ),
        ("creator_commission_bps:", "--creator-commission-bps:"),
    ] {
        if let Some(rest) = message.strip_prefix(field) {
            return format!("{flag}{rest}");
        }
    }
    message.to_string()
}

fn verify(a: VerifyArgs) -> anyhow::Result<()> {
    let reg = read_registration(&a.file)?;
    reg.verify()
        .with_context(|| format!("{}", a.file.display()))?;
    if !reg.is_signed() && !a.allow_unsigned {
        bail!(
            "{}: the registration is unsigned (pass --allow-unsigned to check its terms anyway)",
            a.file.display()
        );
    }
    let manifest_match = match &a.manifest {
        Some(path) => {
            let manifest = read_manifest(path)?;
            reg.body()
                .check_manifest(&manifest)
                .with_context(|| format!("{} against {}", a.file.display(), path.display()))?;
            Some(path.display().to_string())
        }
        None => None,
    };
    let body = reg.body();
    let cid = reg.cid()?;
    if a.json {
        let terms = serde_json::json!({
            "registration_cid": cid.to_string(),
            "signed": reg.is_signed(),
            "publisher": reg.verified_publisher().map(|p| p.to_string()),
            "capability": body.capability.to_string(),
            "manifest_cid": body.manifest_cid.to_string(),
            "manifest_checked": manifest_match,
            "namespace": body.namespace,
            "creator_commission_bps": body.creator_commission_bps,
            "creator_wallets": body.creator_wallets,
            "created_at": body.created_at,
        });
        return print_out(&serde_json::to_string_pretty(&terms)?);
    }
    let mut lines = vec![
        format!("registration  {cid} (CID matches the body)"),
        match reg.verified_publisher() {
            Some(p) => format!("signature     valid, publisher {p}"),
            None => "signature     none (unsigned registration)".to_string(),
        },
        format!("capability    {}", body.capability),
        match &manifest_match {
            Some(path) => format!("manifest      {} (matches {path})", body.manifest_cid),
            None => format!(
                "manifest      {} (not checked: no --manifest)",
                body.manifest_cid
            ),
        },
        format!("namespace     {}", body.namespace),
        format!(
            "commission    {} bps = {}.{:02}% of accepted gross worker payout",
            body.creator_commission_bps,
            body.creator_commission_bps / 100,
            body.creator_commission_bps % 100
        ),
    ];
    for (chain, address) in &body.creator_wallets {
        lines.push(format!("wallet        {:<7}{address}", chain.to_string()));
    }
    lines.push(format!("created_at    {} (ms since 1970)", body.created_at));
    print_out(&lines.join("\n"))
}

fn import(a: ImportArgs) -> anyhow::Result<()> {
    let manifest = read_manifest(&a.file)?;
    let wasm = read_wasm(&manifest, &a.wasm)?;
    let registration = a
        .registration
        .as_deref()
        .map(read_registration)
        .transpose()?;
    if a.state.exists() && !a.state.is_dir() {
        bail!("--state {} is not a directory", a.state.display());
    }
    let store = CapStore::new(&a.state);
    if let Some(reg) = &registration {
        let path = a.registration.as_deref().unwrap_or(Path::new(""));
        reg.verify()
            .with_context(|| format!("{}", path.display()))?;
        reg.body()
            .check_manifest(&manifest)
            .with_context(|| format!("{} against {}", path.display(), a.file.display()))?;
    }
    let out = store.import(&manifest, &wasm, registration.as_ref(), a.replace)?;
    print_out(&format!(
        "imported {} manifest {} wasm {} registration {} into {}",
        out.capability,
        out.manifest_cid,
        out.wasm_cid,
        out.registration_cid
            .map_or_else(|| "none".to_string(), |c| c.to_string()),
        store.dir().display()
    ))?;
    if let Some(old) = out.replaced {
        eprintln!("replaced manifest {old} under {}", out.capability);
    }
    Ok(())
}

fn list(a: ListArgs) -> anyhow::Result<()> {
    let store = CapStore::new(&a.state);
    let entries = store.list()?;
    let builtins = builtin_capabilities();
    let mut failed = 0usize;
    let mut lines = Vec::new();
    for e in &entries {
        match &e.loaded {
            Ok(r) => lines.push(describe(&r.capability.to_string(), r.source, r)),
            Err(err) => {
                failed += 1;
                lines.push(format!("{}  FAILED VERIFICATION: {err}", e.capability));
            }
        }
    }
    if lines.is_empty() {
        lines.push(format!("no capabilities in {}", store.dir().display()));
    }
    for b in builtins {
        lines.push(format!(
            "{}  manifest {}  built-in",
            b.manifest.capability(),
            b.manifest.cid()?
        ));
    }
    print_out(&lines.join("\n"))?;
    if failed > 0 {
        bail!(
            "{failed} of {} stored capabilities failed verification",
            entries.len()
        );
    }
    Ok(())
}

fn describe(capability: &str, source: Source, r: &crate::capstore::ResolvedCapability) -> String {
    let registration = match &r.registration {
        None => "no registration".to_string(),
        Some(reg) => format!(
            "registration {} ({} bps, {})",
            reg.cid().map_or_else(|e| e.to_string(), |c| c.to_string()),
            reg.body().creator_commission_bps,
            reg.verified_publisher()
                .map_or_else(|| "unsigned".to_string(), |p| format!("publisher {p}"))
        ),
    };
    format!(
        "{capability}  manifest {}  wasm {} ({} bytes)  {registration}{}",
        r.manifest_cid,
        r.manifest.implementation.cid,
        r.wasm.len(),
        if source == Source::BuiltIn {
            "  built-in"
        } else {
            ""
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_definitions_are_consistent() {
        use clap::CommandFactory;
        crate::cli::Cli::command().debug_assert();
    }

    #[test]
    fn flag_names_replace_field_names() {
        assert_eq!(
            flag_names("creator_wallets.evm: bad"),
            "--creator-evm-wallet: bad"
        );
        assert_eq!(flag_names("other: x"), "other: x");
    }
}
