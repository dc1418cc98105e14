//! d402 capabilities (being built).
//!
//! Manifests, signed registrations with creator commission terms, the gateway's acceptance
//! policy, the local capability store and the commission math.
