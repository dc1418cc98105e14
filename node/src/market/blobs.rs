//! Content-addressed blobs a node serves over `/d402/blob/1` (snapshots it took or pinned,
//! manifests and Wasm modules it offers), and fetching one from a peer.
//!
//! The store is in memory and bounded: pinned capability files stay; snapshots are evicted
//! oldest first past [`BlobStore::new`]'s byte budget.

use std::{
    collections::{HashMap, VecDeque},
    path::Path,
    sync::{Arc, Mutex},
};

use d402_protocol::{Cid, messages::SnapshotMeta, protocol_ids::MAX_BLOB};
use libp2p::{Multiaddr, PeerId};

use crate::{
    capstore::CapStore,
    net::{
        NetHandle, RrError,
        codec::{BlobRequest, BlobResponse},
    },
};

/// Why a blob could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The request failed.
    #[error("blob request failed: {0}")]
    Net(#[from] RrError),
    /// The peer does not have it.
    #[error("the peer does not have {0}")]
    NotFound(Cid),
    /// The peer is busy.
    #[error("the peer is busy")]
    Busy,
    /// The bytes do not hash to the CID.
    #[error("the bytes served for {0} do not match it")]
    Mismatch(Cid),
    /// The bytes are not a valid manifest, module or registration (says which CID and why).
    #[error("{0}")]
    Invalid(String),
}

/// A held blob: its bytes and, for a snapshot, what it was.
pub type Blob = (Arc<Vec<u8>>, Option<SnapshotMeta>);

#[derive(Default)]
struct Inner {
    capstore: Option<CapStore>,
    pinned: HashMap<Cid, Blob>,
    cache: HashMap<Cid, Blob>,
    order: VecDeque<Cid>,
    cache_bytes: usize,
}

/// The node's blob store. Cheap to clone.
#[derive(Clone)]
pub struct BlobStore {
    inner: Arc<Mutex<Inner>>,
    budget: usize,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStore")
            .field("budget", &self.budget)
            .finish()
    }
}

impl BlobStore {
    /// A store keeping at most `budget` bytes of evictable blobs (snapshots).
    pub fn new(budget: usize) -> BlobStore {
        BlobStore {
            inner: Arc::default(),
            budget,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `bytes` for as long as the node runs (manifests, Wasm modules).
    pub fn pin(&self, cid: Cid, bytes: Arc<Vec<u8>>) {
        self.lock().pinned.insert(cid, (bytes, None));
    }

    /// Keeps `bytes` until evicted (snapshots). Blobs over [`MAX_BLOB`] are not kept.
    pub fn put(&self, cid: Cid, bytes: Arc<Vec<u8>>, meta: Option<SnapshotMeta>) {
        if bytes.len() > MAX_BLOB || bytes.len() > self.budget {
            return;
        }
        let mut g = self.lock();
        if g.cache.contains_key(&cid) || g.pinned.contains_key(&cid) {
            return;
        }
        g.cache_bytes += bytes.len();
        g.cache.insert(cid, (bytes, meta));
        g.order.push_back(cid);
        while g.cache_bytes > self.budget {
            let Some(old) = g.order.pop_front() else {
                break;
            };
            if let Some((b, _)) = g.cache.remove(&old) {
                g.cache_bytes -= b.len();
            }
        }
    }

    /// Also serves the manifests, registrations and modules of the capability store under
    /// `state_dir` (read from disk, verified, when asked for).
    pub fn serve_capstore(&self, state_dir: &Path) {
        self.lock().capstore = Some(CapStore::new(state_dir));
    }

    /// The bytes of `cid`, if held (in memory, else in the capability store).
    pub fn get(&self, cid: &Cid) -> Option<Blob> {
        let store = {
            let g = self.lock();
            if let Some(b) = g.pinned.get(cid).or_else(|| g.cache.get(cid)) {
                return Some(b.clone());
            }
            g.capstore.clone()
        };
        store
            .and_then(|s| s.load_blob(cid))
            .map(|b| (Arc::new(b), None))
    }

    /// The answer to a blob request.
    pub fn answer(&self, req: &BlobRequest) -> BlobResponse {
        match self.get(&req.cid) {
            Some((bytes, snapshot)) => BlobResponse::Found {
                bytes: bytes.as_ref().clone(),
                snapshot,
            },
            None => BlobResponse::NotFound,
        }
    }
}

/// Fetches `cid` from `peer` and checks the bytes against it.
pub async fn fetch(
    net: &NetHandle,
    peer: PeerId,
    addrs: Vec<Multiaddr>,
    cid: Cid,
) -> Result<(Vec<u8>, Option<SnapshotMeta>), BlobError> {
    match net.request_blob(peer, addrs, BlobRequest { cid }).await? {
        BlobResponse::Found { bytes, snapshot } => {
            cid.verify(&bytes).map_err(|_| BlobError::Mismatch(cid))?;
            Ok((bytes, snapshot))
        }
        BlobResponse::NotFound => Err(BlobError::NotFound(cid)),
        BlobResponse::Busy => Err(BlobError::Busy),
    }
}

/// A capability fetched from a peer, each part verified against its CID: the manifest
/// (canonical, hashes to the manifest CID, valid), its module (hashes to the manifest's
/// implementation CID, a Wasm binary) and, when asked for, its registration (CID, signature
/// and the same manifest).
#[derive(Debug, Clone)]
pub struct FetchedCapability {
    /// The manifest.
    pub manifest: d402_capabilities::Manifest,
    /// The module.
    pub wasm: Vec<u8>,
    /// The registration.
    pub registration: Option<d402_capabilities::CapabilityRegistration>,
}

/// Fetches a capability by manifest CID (and registration CID) from `peer`.
pub async fn fetch_capability(
    net: &NetHandle,
    peer: PeerId,
    addrs: Vec<Multiaddr>,
    manifest_cid: Cid,
    registration_cid: Option<Cid>,
) -> Result<FetchedCapability, BlobError> {
    use d402_capabilities::{CapabilityRegistration, Manifest};
    let invalid = |cid: Cid, what: &'static str, reason: String| {
        BlobError::Invalid(format!("{cid} is not a valid {what}: {reason}"))
    };
    let (bytes, _) = fetch(net, peer, addrs.clone(), manifest_cid).await?;
    let manifest = Manifest::from_canonical(&bytes)
        .map_err(|e| invalid(manifest_cid, "manifest", e.to_string()))?;
    let wasm_cid = manifest.implementation.cid;
    let (wasm, _) = fetch(net, peer, addrs.clone(), wasm_cid).await?;
    manifest
        .check_wasm(&wasm)
        .map_err(|e| invalid(wasm_cid, "module", e.to_string()))?;
    let registration = match registration_cid {
        None => None,
        Some(cid) => {
            // A registration's CID is its own (body) CID, not a hash of the file: decode,
            // then check the CID, the signature and that it is for this manifest.
            let bytes = match net.request_blob(peer, addrs, BlobRequest { cid }).await? {
                BlobResponse::Found { bytes, .. } => bytes,
                BlobResponse::NotFound => return Err(BlobError::NotFound(cid)),
                BlobResponse::Busy => return Err(BlobError::Busy),
            };
            let reg = CapabilityRegistration::from_canonical(&bytes)
                .map_err(|e| invalid(cid, "registration", e.to_string()))?;
            if reg.cid().ok() != Some(cid) {
                return Err(BlobError::Mismatch(cid));
            }
            reg.verify()
                .map_err(|e| invalid(cid, "registration", e.to_string()))?;
            reg.body()
                .check_manifest(&manifest)
                .map_err(|e| invalid(cid, "registration", e.to_string()))?;
            Some(reg)
        }
    };
    Ok(FetchedCapability {
        manifest,
        wasm,
        registration,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_oldest_past_budget_but_keeps_pinned() {
        let s = BlobStore::new(10);
        let a = Arc::new(vec![1u8; 6]);
        let b = Arc::new(vec![2u8; 6]);
        let p = Arc::new(vec![3u8; 100]);
        s.pin(Cid::raw(&p), p.clone());
        s.put(Cid::raw(&a), a.clone(), None);
        s.put(Cid::raw(&b), b.clone(), None);
        assert!(s.get(&Cid::raw(&a)).is_none());
        assert!(s.get(&Cid::raw(&b)).is_some());
        assert!(s.get(&Cid::raw(&p)).is_some());
    }
}
