//! The d402 wire protocol: canonical CBOR, CIDs, domain-separated signed envelopes, the
//! typed messages of a paid task, protocol ids and size caps.
//!
//! This crate does no I/O and is not async. Every decoder checks a size cap before it
//! parses, refuses non-canonical encodings, and returns a [`ProtocolError`] for any input:
//! it never panics.
//!
//! ```
//! use d402_protocol::{Signed, messages::Verdict, messages::VerdictOutcome, Cid, TaskId};
//! let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
//! let verdict = Verdict {
//!     v: 1,
//!     task_id: TaskId([1; 16]),
//!     claim_cid: Cid::dag_cbor(b"claim"),
//!     output_cid: Cid::raw(b"output"),
//!     outcome: VerdictOutcome::Agree,
//!     fuel_used: 10,
//!     judged_at: 1,
//! };
//! let bytes = Signed::sign(verdict, &key)?.to_bytes()?;
//! let back = Signed::<Verdict>::from_bytes(&bytes)?; // checks cap, form and signature
//! assert_eq!(back.body.fuel_used, 10);
//! # Ok::<(), d402_protocol::ProtocolError>(())
//! ```

pub mod cbor;
mod cbor_reorder;
pub mod content_id;
pub mod error;
pub mod keys;
pub mod messages;
pub mod protocol_ids;
pub mod signed;
pub mod types;

pub use content_id::{Cid, Codec};
pub use ed25519_dalek::{SigningKey, VerifyingKey};
pub use error::{ProtocolError, Result};
pub use keys::{PublicKey, Signature};
pub use signed::{Signable, Signed};
pub use types::{Amount, CapabilityRef, Chain, RailKind, TaskId, UnixMillis, Wallets};
