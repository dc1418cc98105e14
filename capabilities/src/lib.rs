//! d402 capabilities: manifests, signed registrations with creator commission terms,
//! namespace ownership, the gateway's acceptance policy and the commission math.
//!
//! This crate does no I/O: the node's capability store and the `d402 capability` commands
//! read and write files and call in here.

pub mod commission;
pub mod error;
pub mod manifest;
pub mod namespace;
pub mod policy;
pub mod registration;
pub mod schema;
pub mod wallet;

pub use error::{CapabilityError, Result};
pub use manifest::{Egress, Implementation, Limits, Manifest, Permissions, SnapshotterKind};
pub use namespace::NamespaceRegistry;
pub use policy::{AcceptancePolicy, AcceptedTerms, Refusal};
pub use registration::{CapabilityRegistration, Registration, RegistrationDocument};
pub use schema::InputSchema;
