//! d402 capabilities: manifests, signed registrations with creator commission terms, the
//! gateway's acceptance policy, the local capability store and the commission math.

pub mod commission;
pub mod error;
pub mod manifest;

pub use error::{CapabilityError, Result};
pub use manifest::{Egress, Implementation, Limits, Manifest, Permissions, SnapshotterKind};
