//! The edgefleet device agent.
//!
//! Present: the model runtime ([`model`]), the A/B slot state machine ([`slots`]),
//! the data directory and install path ([`store`]), OIP v2 tensors ([`oip`]) and the
//! local commands (`install`, `status`, `revert`, `activate`, `infer`) and the local
//! OIP v2 HTTP API ([`api`], `run`). Not yet: the MQTT link, telemetry, the
//! configuration file (issue 3).

pub mod api;
pub mod cli;
pub mod config;
pub mod model;
pub mod oip;
pub mod slots;
pub mod store;
