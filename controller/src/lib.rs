//! The edgefleet controller and operator CLI. This session provides the operator
//! commands for keys, trust roots and bundles ([`operator`]) and the first part of
//! the demo ([`demo`]); the controller service follows (issue 4).

pub mod api;
pub mod broker;
pub mod ca;
pub mod cli;
pub mod config;
pub mod db;
pub mod demo;
pub mod engine;
pub mod fetch_limits;
pub mod flash;
pub mod fleet;
pub mod gate;
pub mod npy;
pub mod operator;
pub mod remote;
pub mod samples;
pub mod serve;
