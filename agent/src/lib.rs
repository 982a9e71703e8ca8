//! The edgefleet device agent.
//!
//! Present: the model runtime ([`model`]), the A/B slot state machine ([`slots`]),
//! the data directory and install path ([`store`]), OIP v2 tensors ([`oip`]) and the
//! local commands (`install`, `status`, `revert`, `activate`, `infer`) and the local
//! OIP v2 HTTP API ([`api`], `run`). Not yet: the MQTT link, telemetry, the
//! configuration file (issue 3).

pub mod api;
pub mod chunks;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod drift;
pub mod http;
pub mod link;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod oip;
pub mod reference_stats;
pub mod samples;
pub mod service;
pub mod shadow;
pub mod slots;
pub mod spool;
pub mod store;
pub mod sysinfo_probe;
pub mod trees;
