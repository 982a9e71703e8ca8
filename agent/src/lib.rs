//! The edgefleet device agent. [`service::run`] wires a running device: the
//! served model and the local OIP v2 API ([`api`], codec [`oip`], server bounds
//! [`http`]), the controller link ([`link`]) and the [`daemon`] that installs
//! over MQTT (its download store in `daemon::download`) and reports telemetry
//! and drift ([`drift`], spooled in [`spool`]). Installs go through [`store`]
//! and the pure A/B slot machine [`slots`]; models run on [`model`] (tract, and
//! the compact tree evaluator in [`trees`]). [`cli`] is the command line;
//! [`reference_stats`] is the build-time side of drift, used by `bundle build`.

pub mod api;
pub mod chunks;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod drift;
pub mod http;
pub mod link;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod notify;
pub use edgefleet_oip as oip;
pub mod reference_stats;
pub mod samples;
pub mod selfupdate;
pub mod service;
pub mod shadow;
pub mod slots;
pub mod spool;
pub mod store;
pub mod sysinfo_probe;
pub mod version;
pub use edgefleet_trees as trees;
