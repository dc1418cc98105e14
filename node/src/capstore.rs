//! The local capability store: manifests, registrations and Wasm modules by CID, under
//! `<state>/capabilities/`.
//!
//! ```text
//! <state>/capabilities/
//!   manifests/<cid>.cbor       canonical CBOR of a manifest; the file hashes to its dag-cbor CID
//!   wasm/<cid>.wasm            a Wasm module; the file hashes to its raw CID
//!   registrations/<cid>.cbor   canonical CBOR of a registration document; <cid> is the body CID
//!   namespaces.json            the namespace registry (first publisher key owns a namespace)
//!   index.json                 id@version -> manifest CID (+ registration CID)
//!   .lock                      held (flock) while the store is changed
//! ```
//!
//! Every file is written atomically (temporary file, fsync, rename, fsync of the directory)
//! and every CID is checked before a file is written and again when it is read. Blobs are
//! written before the index that names them, so a crash leaves at worst an unreferenced blob.
//!
//! [`resolve_offer`] is what a node calls at start-up for each `--offer id@version`: the
//! store first, then the capabilities built into the binary ([`builtin_capabilities`]).

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Read, Write},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use d402_capabilities::{
    CapabilityError, CapabilityRegistration, Manifest, NamespaceRegistry,
    manifest::{MAX_MANIFEST, MAX_WASM, check_wasm_binary},
    namespace::Claim,
    registration::MAX_REGISTRATION_DOCUMENT,
};
use d402_protocol::{CapabilityRef, Cid};

/// Directory of the store under a node's `--state`.
pub const STORE_DIR: &str = "capabilities";
/// Largest index or namespace file read.
pub const MAX_INDEX: usize = 4 * 1024 * 1024;
const INDEX_VERSION: u16 = 1;

/// Errors of the capability store. Each message is one line.
#[derive(Debug, Error)]
pub enum CapStoreError {
    /// The capability is neither in the store nor built in.
    #[error(
        "capability {capability} is not in the store at {} (and is not built in); import it \
         with d402 capability import --state {} --file capability.json --wasm module.wasm",
        dir.display(),
        state.display()
    )]
    NotInStore {
        /// What was asked for.
        capability: CapabilityRef,
        /// The store directory.
        dir: PathBuf,
        /// The node's state directory.
        state: PathBuf,
    },
    /// Another manifest is already stored under the same `id@version`.
    #[error(
        "{capability} is already in the store as manifest {existing}, not {new}; pass --replace \
         to offer the new manifest under this id@version"
    )]
    Conflict {
        /// The `id@version`.
        capability: CapabilityRef,
        /// The manifest stored now.
        existing: Box<Cid>,
        /// The manifest being imported.
        new: Box<Cid>,
    },
    /// A file could not be read or written.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A stored file fails its CID or format check.
    #[error("store file {} is corrupt: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The input breaks a capability rule (manifest, Wasm, registration, namespace).
    #[error(transparent)]
    Invalid(#[from] CapabilityError),
}

/// Shorthand for results of the store.
pub type Result<T, E = CapStoreError> = std::result::Result<T, E>;

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> CapStoreError + 'a {
    move |source| CapStoreError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// One `id@version` in the index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexEntry {
    /// The manifest offered under this `id@version`.
    pub manifest: Cid,
    /// Its registration, if one was imported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration: Option<Cid>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Index {
    v: u16,
    capabilities: BTreeMap<String, IndexEntry>,
}

/// Where a resolved capability came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The local store under `--state`.
    Store,
    /// Built into the `d402` binary.
    BuiltIn,
}

/// A capability ready to offer: its verified manifest, registration and Wasm module.
#[derive(Debug, Clone)]
pub struct ResolvedCapability {
    /// `id@version`.
    pub capability: CapabilityRef,
    /// The manifest (validated).
    pub manifest: Manifest,
    /// Its CID (checked against the stored bytes).
    pub manifest_cid: Cid,
    /// Its registration (CID checked, signature verified when signed).
    pub registration: Option<CapabilityRegistration>,
    /// The module bytes (checked against the manifest's implementation CID).
    pub wasm: Vec<u8>,
    /// The module's file in the store; `None` for a built-in capability.
    pub wasm_path: Option<PathBuf>,
    /// Where it came from.
    pub source: Source,
}

/// A capability shipped inside the `d402` binary.
#[derive(Debug, Clone)]
pub struct BuiltinCapability {
    /// Its manifest.
    pub manifest: Manifest,
    /// Its Wasm module, e.g. from `include_bytes!`.
    pub wasm: &'static [u8],
    /// Its registration, if it ships with one.
    pub registration: Option<CapabilityRegistration>,
}

/// The capabilities built into this binary: `web.page_to_markdown@1` from
/// `examples/page_to_markdown` (its manifest, its committed Wasm module and its signed
/// registration). They are checked like any stored capability when resolved.
pub fn builtin_capabilities() -> Vec<BuiltinCapability> {
    const MANIFEST: &[u8] = include_bytes!("../../examples/page_to_markdown/capability.json");
    const WASM: &[u8] = include_bytes!("../../examples/page_to_markdown/page_to_markdown.wasm");
    const REGISTRATION: &[u8] =
        include_bytes!("../../examples/page_to_markdown/capability.registration.json");
    let parsed = Manifest::from_json(MANIFEST).and_then(|manifest| {
        CapabilityRegistration::from_json(REGISTRATION).map(|reg| (manifest, reg))
    });
    match parsed {
        Ok((manifest, registration)) => vec![BuiltinCapability {
            manifest,
            wasm: WASM,
            registration: Some(registration),
        }],
        Err(e) => {
            tracing::error!(error = %e, "the built-in web.page_to_markdown@1 does not parse");
            Vec::new()
        }
    }
}

/// Resolves `--offer id@version` for the node at `state`: the store first, then the
/// built-in capabilities. Everything returned has been verified (CIDs, signature, module).
pub fn resolve_offer(state: &Path, capability: &CapabilityRef) -> Result<ResolvedCapability> {
    let store = CapStore::new(state);
    if let Some(found) = store.get(capability)? {
        return Ok(found);
    }
    for builtin in builtin_capabilities() {
        if &builtin.manifest.capability() == capability {
            return resolve_builtin(builtin);
        }
    }
    Err(CapStoreError::NotInStore {
        capability: capability.clone(),
        dir: store.dir().to_path_buf(),
        state: state.to_path_buf(),
    })
}

fn resolve_builtin(b: BuiltinCapability) -> Result<ResolvedCapability> {
    b.manifest.validate()?;
    b.manifest.check_wasm(b.wasm)?;
    if let Some(reg) = &b.registration {
        reg.verify()?;
        reg.body().check_manifest(&b.manifest)?;
    }
    Ok(ResolvedCapability {
        capability: b.manifest.capability(),
        manifest_cid: b.manifest.cid()?,
        manifest: b.manifest,
        registration: b.registration,
        wasm: b.wasm.to_vec(),
        wasm_path: None,
        source: Source::BuiltIn,
    })
}

/// What [`CapStore::import`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportOutcome {
    /// `id@version`.
    pub capability: CapabilityRef,
    /// The manifest's CID.
    pub manifest_cid: Cid,
    /// The module's CID.
    pub wasm_cid: Cid,
    /// The registration's CID, if one was imported.
    pub registration_cid: Option<Cid>,
    /// The manifest previously stored under this `id@version`, when it was replaced.
    pub replaced: Option<Cid>,
    /// Whether the import claimed the namespace for the registration's publisher.
    pub claimed_namespace: bool,
}

/// One row of [`CapStore::list`].
#[derive(Debug)]
pub struct ListEntry {
    /// The `id@version` key.
    pub capability: String,
    /// The index entry.
    pub entry: IndexEntry,
    /// The verified capability, or why it failed verification.
    pub loaded: Result<ResolvedCapability>,
}

/// The store under one state directory.
#[derive(Debug, Clone)]
pub struct CapStore {
    dir: PathBuf,
}

impl CapStore {
    /// The store of the node whose state directory is `state` (no I/O).
    pub fn new(state: &Path) -> Self {
        CapStore {
            dir: state.join(STORE_DIR),
        }
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn manifest_path(&self, cid: &Cid) -> PathBuf {
        self.dir.join("manifests").join(format!("{cid}.cbor"))
    }

    fn wasm_path(&self, cid: &Cid) -> PathBuf {
        self.dir.join("wasm").join(format!("{cid}.wasm"))
    }

    fn registration_path(&self, cid: &Cid) -> PathBuf {
        self.dir.join("registrations").join(format!("{cid}.cbor"))
    }

    fn index_path(&self) -> PathBuf {
        self.dir.join("index.json")
    }

    fn namespaces_path(&self) -> PathBuf {
        self.dir.join("namespaces.json")
    }

    /// The namespace registry (empty when the store has none yet).
    pub fn namespaces(&self) -> Result<NamespaceRegistry> {
        let path = self.namespaces_path();
        match read_capped(&path, MAX_INDEX)? {
            None => Ok(NamespaceRegistry::new()),
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| CapStoreError::Corrupt {
                path,
                reason: e.to_string(),
            }),
        }
    }

    /// Records that `namespace` belongs to `publisher` (refused when another key owns it),
    /// holding the store lock. Returns whether the claim is new.
    pub fn claim_namespace(
        &self,
        namespace: &str,
        publisher: &d402_protocol::PublicKey,
    ) -> Result<bool> {
        let _lock = self.lock()?;
        let mut registry = self.namespaces()?;
        let claim = registry.claim(namespace, publisher)?;
        if claim == Claim::New {
            write_json_atomic(&self.namespaces_path(), &registry)?;
        }
        Ok(claim == Claim::New)
    }

    fn index(&self) -> Result<Index> {
        let path = self.index_path();
        let Some(bytes) = read_capped(&path, MAX_INDEX)? else {
            return Ok(Index {
                v: INDEX_VERSION,
                capabilities: BTreeMap::new(),
            });
        };
        let index: Index = serde_json::from_slice(&bytes).map_err(|e| CapStoreError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if index.v != INDEX_VERSION {
            return Err(CapStoreError::Corrupt {
                path,
                reason: format!("index version {} is not {INDEX_VERSION}", index.v),
            });
        }
        Ok(index)
    }

    fn lock(&self) -> Result<fs::File> {
        fs::create_dir_all(&self.dir).map_err(io_err("create", &self.dir))?;
        let path = self.dir.join(".lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("create", &path))?;
        file.lock().map_err(io_err("lock", &path))?;
        Ok(file)
    }

    /// Checks everything [`Self::import`] would check, without writing: the manifest, the
    /// module against its implementation CID, the registration (CID, signature, same
    /// manifest) and the namespace owner.
    pub fn check_import(
        &self,
        manifest: &Manifest,
        wasm: &[u8],
        registration: Option<&CapabilityRegistration>,
    ) -> Result<()> {
        manifest.validate()?;
        manifest.check_wasm(wasm)?;
        if let Some(reg) = registration {
            reg.verify()?;
            reg.body().check_manifest(manifest)?;
            if reg.is_signed() {
                self.namespaces()?.check_registration(reg)?;
            }
        }
        Ok(())
    }

    /// Stores a manifest, its module and optionally its registration, and points
    /// `id@version` at them. A signed registration claims its namespace for its publisher
    /// (refused when another key owns it). Another manifest already under the same
    /// `id@version` is replaced only with `replace`.
    pub fn import(
        &self,
        manifest: &Manifest,
        wasm: &[u8],
        registration: Option<&CapabilityRegistration>,
        replace: bool,
    ) -> Result<ImportOutcome> {
        self.check_import(manifest, wasm, registration)?;
        let capability = manifest.capability();
        let manifest_cid = manifest.cid()?;
        let wasm_cid = Cid::raw(wasm);
        let _lock = self.lock()?;

        // Re-read under the lock: another import may have changed them.
        let mut index = self.index()?;
        let key = capability.to_string();
        let previous = index.capabilities.get(&key).cloned();
        let replaced = match &previous {
            Some(e) if e.manifest != manifest_cid => {
                if !replace {
                    return Err(CapStoreError::Conflict {
                        capability,
                        existing: Box::new(e.manifest),
                        new: Box::new(manifest_cid),
                    });
                }
                Some(e.manifest)
            }
            _ => None,
        };
        let mut namespaces = self.namespaces()?;
        let claimed = match registration {
            Some(reg) if reg.is_signed() => namespaces.register(reg)? == Claim::New,
            _ => false,
        };

        write_blob(&self.wasm_path(&wasm_cid), wasm)?;
        let manifest_bytes = manifest.to_canonical()?;
        write_blob(&self.manifest_path(&manifest_cid), &manifest_bytes)?;
        let registration_cid = match registration {
            Some(reg) => {
                let cid = reg.cid()?;
                write_blob(&self.registration_path(&cid), &reg.to_canonical()?)?;
                Some(cid)
            }
            // Re-importing the same manifest without a registration keeps the one it had.
            None => previous
                .filter(|e| e.manifest == manifest_cid)
                .and_then(|e| e.registration),
        };
        if claimed {
            write_json_atomic(&self.namespaces_path(), &namespaces)?;
        }
        index.capabilities.insert(
            key,
            IndexEntry {
                manifest: manifest_cid,
                registration: registration_cid,
            },
        );
        write_json_atomic(&self.index_path(), &index)?;
        tracing::info!(
            capability = %capability,
            manifest = %manifest_cid,
            registration = ?registration_cid.map(|c| c.to_string()),
            "capability imported"
        );
        Ok(ImportOutcome {
            capability,
            manifest_cid,
            wasm_cid,
            registration_cid,
            replaced,
            claimed_namespace: claimed,
        })
    }

    /// The stored capability for `id@version`, verified; `None` when it is not indexed.
    pub fn get(&self, capability: &CapabilityRef) -> Result<Option<ResolvedCapability>> {
        let index = self.index()?;
        match index.capabilities.get(&capability.to_string()) {
            None => Ok(None),
            Some(entry) => self.load_entry(entry).map(Some),
        }
    }

    /// Every indexed capability, each verified (a failure is reported per entry).
    pub fn list(&self) -> Result<Vec<ListEntry>> {
        let index = self.index()?;
        Ok(index
            .capabilities
            .into_iter()
            .map(|(capability, entry)| ListEntry {
                loaded: self.load_entry(&entry),
                capability,
                entry,
            })
            .collect())
    }

    fn load_entry(&self, entry: &IndexEntry) -> Result<ResolvedCapability> {
        let manifest = self.load_manifest(&entry.manifest)?;
        let wasm_cid = manifest.implementation.cid;
        let wasm_path = self.wasm_path(&wasm_cid);
        let wasm = self.load_wasm(&wasm_cid)?;
        let registration = match &entry.registration {
            None => None,
            Some(cid) => {
                let reg = self.load_registration(cid)?;
                reg.body()
                    .check_manifest(&manifest)
                    .map_err(|e| CapStoreError::Corrupt {
                        path: self.registration_path(cid),
                        reason: e.to_string(),
                    })?;
                Some(reg)
            }
        };
        tracing::debug!(capability = %manifest.capability(), manifest = %entry.manifest, "capability loaded");
        Ok(ResolvedCapability {
            capability: manifest.capability(),
            manifest,
            manifest_cid: entry.manifest,
            registration,
            wasm,
            wasm_path: Some(wasm_path),
            source: Source::Store,
        })
    }

    /// The bytes stored under `cid`, verified, for serving over `/d402/blob/1`: a
    /// manifest's canonical CBOR (hashes to its CID), a module (hashes to its raw CID), or
    /// a registration's canonical CBOR (its CID is the registration's [`CapabilityRegistration::cid`],
    /// checked by the fetcher after decoding). `None` when the store has no such file or
    /// it fails its check.
    pub fn load_blob(&self, cid: &Cid) -> Option<Vec<u8>> {
        if self.manifest_path(cid).exists() {
            return self
                .load_manifest(cid)
                .and_then(|m| Ok(m.to_canonical()?))
                .ok();
        }
        if self.wasm_path(cid).exists() {
            return self.load_wasm(cid).ok();
        }
        if self.registration_path(cid).exists() {
            return self
                .load_registration(cid)
                .and_then(|r| Ok(r.to_canonical()?))
                .ok();
        }
        None
    }

    /// Loads and verifies the manifest with CID `cid`.
    pub fn load_manifest(&self, cid: &Cid) -> Result<Manifest> {
        let path = self.manifest_path(cid);
        let bytes = read_required(&path, MAX_MANIFEST)?;
        let corrupt = |reason: String| CapStoreError::Corrupt {
            path: path.clone(),
            reason,
        };
        cid.verify(&bytes).map_err(|e| corrupt(e.to_string()))?;
        Manifest::from_canonical(&bytes).map_err(|e| corrupt(e.to_string()))
    }

    /// Loads and verifies the module with raw CID `cid`.
    pub fn load_wasm(&self, cid: &Cid) -> Result<Vec<u8>> {
        let path = self.wasm_path(cid);
        let bytes = read_required(&path, MAX_WASM)?;
        let corrupt = |reason: String| CapStoreError::Corrupt {
            path: path.clone(),
            reason,
        };
        cid.verify(&bytes).map_err(|e| corrupt(e.to_string()))?;
        check_wasm_binary(&bytes).map_err(|e| corrupt(e.to_string()))?;
        Ok(bytes)
    }

    /// Loads and verifies the registration with CID `cid` (CID, terms, signature).
    pub fn load_registration(&self, cid: &Cid) -> Result<CapabilityRegistration> {
        let path = self.registration_path(cid);
        let bytes = read_required(&path, MAX_REGISTRATION_DOCUMENT)?;
        let corrupt = |reason: String| CapStoreError::Corrupt {
            path: path.clone(),
            reason,
        };
        let reg =
            CapabilityRegistration::from_canonical(&bytes).map_err(|e| corrupt(e.to_string()))?;
        let actual = reg.cid().map_err(|e| corrupt(e.to_string()))?;
        if &actual != cid {
            return Err(corrupt(format!("holds registration {actual}, not {cid}")));
        }
        reg.verify().map_err(|e| corrupt(e.to_string()))?;
        Ok(reg)
    }
}

/// Reads at most `max` bytes of `path`; `None` when it does not exist.
fn read_capped(path: &Path, max: usize) -> Result<Option<Vec<u8>>> {
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("read", path)(e)),
    };
    let mut bytes = Vec::new();
    file.take(max as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err("read", path))?;
    if bytes.len() > max {
        return Err(CapStoreError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("larger than the cap of {max} bytes"),
        });
    }
    Ok(Some(bytes))
}

fn read_required(path: &Path, max: usize) -> Result<Vec<u8>> {
    read_capped(path, max)?.ok_or_else(|| CapStoreError::Corrupt {
        path: path.to_path_buf(),
        reason: "the index names it but the file is missing".into(),
    })
}

/// Writes a content-addressed file unless an identical one is there already.
fn write_blob(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Ok(existing) = fs::read(path)
        && existing == bytes
    {
        return Ok(());
    }
    write_atomic(path, bytes)
}

fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| CapStoreError::Corrupt {
        path: path.to_path_buf(),
        reason: format!("cannot encode: {e}"),
    })?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync,
/// rename over `path`, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|e| CapStoreError::Io {
        action: "get randomness for",
        path: path.to_path_buf(),
        source: io::Error::other(e.to_string()),
    })?;
    let tmp = dir.join(format!(".{name}.{}.tmp", hex::encode(nonce)));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        file.write_all(bytes).map_err(io_err("write", &tmp))?;
        file.sync_all().map_err(io_err("sync", &tmp))?;
        drop(file);
        fs::rename(&tmp, path).map_err(io_err("write", path))?;
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("sync", dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use d402_capabilities::{Registration, SnapshotterKind};
    use d402_protocol::{Chain, SigningKey, Wallets};

    /// A minimal valid module distinct from the template's placeholder: an empty custom
    /// section named "t".
    const MODULE: &[u8] = b"\0asm\x01\0\0\0\x00\x02\x01t";

    fn manifest(version: u32) -> Manifest {
        Manifest::template(
            "example.extract_product",
            version,
            Cid::raw(MODULE),
            vec![SnapshotterKind::Fetch],
        )
        .unwrap()
    }

    fn registration(m: &Manifest, key: u8, bps: u16) -> CapabilityRegistration {
        let wallets: Wallets = [(
            Chain::Solana,
            "So11111111111111111111111111111111111111112".to_string(),
        )]
        .into_iter()
        .collect();
        let body = Registration::for_manifest(m, bps, wallets, None, 1).unwrap();
        CapabilityRegistration::sign(body, &SigningKey::from_bytes(&[key; 32])).unwrap()
    }

    #[test]
    fn import_resolve_and_list() {
        let state = tempfile::tempdir().unwrap();
        let store = CapStore::new(state.path());
        let m = manifest(1);
        let reg = registration(&m, 1, 1000);
        let out = store.import(&m, MODULE, Some(&reg), false).unwrap();
        assert!(out.claimed_namespace);
        assert_eq!(out.manifest_cid, m.cid().unwrap());
        let cap: CapabilityRef = "example.extract_product@1".parse().unwrap();
        let r = resolve_offer(state.path(), &cap).unwrap();
        assert_eq!(r.source, Source::Store);
        assert_eq!(r.manifest, m);
        assert_eq!(r.wasm, MODULE);
        assert_eq!(r.registration, Some(reg.clone()));
        assert_eq!(fs::read(r.wasm_path.unwrap()).unwrap(), MODULE);
        // Idempotent.
        let again = store.import(&m, MODULE, None, false).unwrap();
        assert_eq!(again.registration_cid, Some(reg.cid().unwrap()));
        let list = store.list().unwrap();
        assert_eq!(list.len(), 1);
        assert!(list[0].loaded.is_ok());
        // No temporary files left behind.
        for sub in ["", "manifests", "wasm", "registrations"] {
            for e in fs::read_dir(store.dir().join(sub)).unwrap() {
                let name = e.unwrap().file_name().to_string_lossy().into_owned();
                assert!(!name.ends_with(".tmp"), "{name}");
            }
        }
    }

    #[test]
    fn missing_capability_has_a_clear_error() {
        let state = tempfile::tempdir().unwrap();
        let cap: CapabilityRef = "web.page_to_markdown@2".parse().unwrap();
        let err = resolve_offer(state.path(), &cap).unwrap_err().to_string();
        assert!(
            err.starts_with("capability web.page_to_markdown@2 is not in the store at "),
            "{err}"
        );
        assert!(err.contains("d402 capability import --state"), "{err}");
        assert!(!err.contains('\n'));
    }

    #[test]
    fn refuses_wrong_module_other_publisher_and_silent_replacement() {
        let state = tempfile::tempdir().unwrap();
        let store = CapStore::new(state.path());
        let m = manifest(1);
        let err = store
            .import(&m, b"\0asm\x01\0\0\0", None, false)
            .unwrap_err();
        assert!(err.to_string().starts_with("implementation.cid:"), "{err}");
        assert!(!store.dir().exists(), "a refused import wrote something");

        store
            .import(&m, MODULE, Some(&registration(&m, 1, 1000)), false)
            .unwrap();
        // Another key cannot register the namespace.
        let m2 = manifest(2);
        let err = store
            .import(&m2, MODULE, Some(&registration(&m2, 2, 1000)), false)
            .unwrap_err();
        assert!(
            matches!(
                err,
                CapStoreError::Invalid(CapabilityError::NamespaceOwned { .. })
            ),
            "{err}"
        );
        assert!(store.get(&m2.capability()).unwrap().is_none());
        // The owner can.
        store
            .import(&m2, MODULE, Some(&registration(&m2, 1, 500)), false)
            .unwrap();

        // Another manifest under the same id@version needs --replace.
        let mut edited = manifest(1);
        edited.limits.fuel += 1;
        let err = store.import(&edited, MODULE, None, false).unwrap_err();
        assert!(matches!(err, CapStoreError::Conflict { .. }), "{err}");
        let out = store.import(&edited, MODULE, None, true).unwrap();
        assert_eq!(out.replaced, Some(m.cid().unwrap()));
        // The old registration does not follow the new manifest.
        assert_eq!(out.registration_cid, None);
        // A registration for another manifest is refused.
        let err = store
            .import(&edited, MODULE, Some(&registration(&m, 1, 1000)), false)
            .unwrap_err();
        assert!(err.to_string().starts_with("manifest_cid:"), "{err}");
    }

    #[test]
    fn corrupt_files_are_detected_on_load() {
        let state = tempfile::tempdir().unwrap();
        let store = CapStore::new(state.path());
        let m = manifest(1);
        let reg = registration(&m, 1, 1000);
        store.import(&m, MODULE, Some(&reg), false).unwrap();
        let cap = m.capability();

        // A flipped byte in the module.
        let wasm_path = store.wasm_path(&Cid::raw(MODULE));
        let mut bytes = fs::read(&wasm_path).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        fs::write(&wasm_path, &bytes).unwrap();
        let err = resolve_offer(state.path(), &cap).unwrap_err();
        assert!(matches!(err, CapStoreError::Corrupt { .. }), "{err}");
        fs::write(&wasm_path, MODULE).unwrap();

        // A manifest file swapped for another manifest's bytes.
        let manifest_path = store.manifest_path(&m.cid().unwrap());
        fs::write(&manifest_path, manifest(7).to_canonical().unwrap()).unwrap();
        let err = resolve_offer(state.path(), &cap).unwrap_err().to_string();
        assert!(err.contains("CID mismatch"), "{err}");
        fs::write(&manifest_path, m.to_canonical().unwrap()).unwrap();

        // A registration edited in place (commission raised), CID field and all.
        let reg_path = store.registration_path(&reg.cid().unwrap());
        let CapabilityRegistration::Signed(mut s) = reg.clone() else {
            unreachable!()
        };
        s.body.creator_commission_bps = 9000;
        let tampered = CapabilityRegistration::Signed(s);
        fs::write(&reg_path, tampered.to_canonical().unwrap()).unwrap();
        let err = resolve_offer(state.path(), &cap).unwrap_err();
        assert!(matches!(err, CapStoreError::Corrupt { .. }), "{err}");
        fs::write(&reg_path, reg.to_canonical().unwrap()).unwrap();
        resolve_offer(state.path(), &cap).unwrap();

        // A missing file.
        fs::remove_file(&wasm_path).unwrap();
        let err = resolve_offer(state.path(), &cap).unwrap_err().to_string();
        assert!(err.contains("file is missing"), "{err}");
    }

    #[test]
    fn builtins_are_real_or_absent() {
        // No fake entries: every built-in must verify.
        let builtins = builtin_capabilities();
        assert_eq!(
            builtins.len(),
            1,
            "web.page_to_markdown@1 ships in the binary"
        );
        for b in builtins {
            resolve_builtin(b).unwrap();
        }
        let empty = tempfile::tempdir().unwrap();
        let cap: CapabilityRef = "web.page_to_markdown@1".parse().unwrap();
        let found = resolve_offer(empty.path(), &cap).unwrap();
        assert_eq!(found.source, Source::BuiltIn);
        assert_eq!(found.manifest.implementation.cid, Cid::raw(&found.wasm));
    }
}
