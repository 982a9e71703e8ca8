//! The edgefleet contract, shared by the agent, the controller and the operator
//! CLI: the bundle format and the rules that decide whether a bundle may be
//! installed, the trust root, and the MQTT topics and messages.
//!
//! This crate owns formats and rules only. It has no async runtime, no sockets, no
//! database and no clock of its own: time is always an argument. Its only I/O is
//! `std::io` readers and writers handed in by the caller, and [`unpack`], which
//! writes a verified bundle into a directory.
//!
//! The formats are specified in `docs/bundle.md` and `docs/protocol.md`.

pub mod bundle;
pub mod cbor;
pub mod commands;
pub mod durable;
pub mod golden;
pub mod ids;
pub mod keys;
pub mod manifest;
pub mod protocol;
pub mod reference;
pub mod time;
pub mod trust;
pub mod unpack;

pub use bundle::{BundleError, Limits, Policy, RawHeader, Refusal, VerifiedHeader};
pub use ids::{Arch, ArtifactName, DeviceId, Digest, KeyId, ModelChannel};
pub use keys::{PublicKey, SecretKey};
pub use time::UnixTime;
pub use trust::{SignedTrustRoot, TrustRoot};
