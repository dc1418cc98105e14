//! On-disk cache of compiled modules, keyed by implementation CID and engine configuration.
//!
//! A file is `<cid>-<engine hash>.cwasm` under a node-owned directory (mode 0700): the
//! SHA-256 of the artifact, then the artifact written by [`wasmtime::Module::serialize`].
//! Files are written to a temporary name and renamed, so a reader never sees half a file;
//! the digest catches a truncated or corrupted file, which is then recompiled.
#![allow(unsafe_code)]

use std::{
    fs,
    hash::{Hash, Hasher},
    io::Write,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
};

use d402_protocol::Cid;
use sha2::{Digest, Sha256};
use wasmtime::{Engine, Module};

use crate::executor::ExecError;

/// Largest artifact read back (a compiled module is a few times its Wasm size).
const MAX_ARTIFACT: u64 = 512 * 1024 * 1024;

/// The on-disk artifact cache.
#[derive(Debug, Clone)]
pub(crate) struct DiskCache {
    dir: PathBuf,
    engine_hash: String,
}

struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        // Only `write` is used; the digest is read with `finalize`.
        0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

impl DiskCache {
    /// Opens (creating, owner-only) the cache directory.
    pub(crate) fn open(dir: &Path, engine: &Engine) -> Result<DiskCache, ExecError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| ExecError::Cache(format!("create {}: {e}", dir.display())))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| ExecError::Cache(format!("chmod {}: {e}", dir.display())))?;
        let mut hasher = ShaHasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let digest = hasher.0.finalize();
        Ok(DiskCache {
            dir: dir.to_path_buf(),
            engine_hash: hex::encode(&digest[..12]),
        })
    }

    fn path(&self, cid: &Cid) -> PathBuf {
        self.dir.join(format!("{cid}-{}.cwasm", self.engine_hash))
    }

    /// Loads a compiled module, or `None` when absent, unreadable or corrupt.
    pub(crate) fn load(&self, engine: &Engine, cid: &Cid) -> Option<Module> {
        let path = self.path(cid);
        let meta = fs::metadata(&path).ok()?;
        if meta.len() > MAX_ARTIFACT || meta.len() < 32 {
            return None;
        }
        let bytes = fs::read(&path).ok()?;
        let (digest, artifact) = bytes.split_at(32);
        if Sha256::digest(artifact).as_slice() != digest {
            tracing::warn!(path = %path.display(), "corrupt compiled-module cache entry; recompiling");
            let _ = fs::remove_file(&path);
            return None;
        }
        // SAFETY: `Module::deserialize` trusts its input to be an artifact produced by
        // `Module::serialize` of a compatible engine, since it maps that code as executable.
        // The bytes come from the node-owned cache directory, created mode 0700 by this
        // process, under a name carrying the engine-compatibility hash; they were written by
        // `store` below from `Module::serialize` of an engine with this configuration, and
        // their SHA-256 (checked just above) rules out truncation and corruption. Anyone who
        // can write this directory already controls the node. Wasmtime also checks the
        // artifact's version and configuration header itself and errors on mismatch.
        match unsafe { Module::deserialize(engine, artifact) } {
            Ok(module) => Some(module),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "stale compiled-module cache entry; recompiling");
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    /// Stores a compiled module.
    pub(crate) fn store(&self, cid: &Cid, module: &Module) -> Result<(), ExecError> {
        let artifact = module
            .serialize()
            .map_err(|e| ExecError::Cache(format!("serialize: {e}")))?;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)
            .map_err(|e| ExecError::Cache(format!("temp file: {e}")))?;
        tmp.write_all(&Sha256::digest(&artifact))
            .and_then(|()| tmp.write_all(&artifact))
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(|e| ExecError::Cache(format!("write: {e}")))?;
        tmp.persist(self.path(cid))
            .map_err(|e| ExecError::Cache(format!("rename: {e}")))?;
        Ok(())
    }
}
