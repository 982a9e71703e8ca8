//! The edgefleet controller and the operator's tools, in two halves:
//! - [`server`]: what `edgefleet serve` runs: the HTTP API, the fleet (devices,
//!   commands, chunk serving), the store, the rollout engine, the embedded
//!   broker and its gate, the certificate authority, configuration;
//! - [`ops`]: what an operator runs on their machine: keys, trust roots and
//!   bundle build/sign/verify, flashing, the demo, and the API client behind
//!   `devices`, `bundles` and `rollout`; `ops::cli` is the command line.

pub mod ops;
pub mod server;
