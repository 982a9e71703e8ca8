//! The controller service (`edgefleet serve`): [`serve::start`] wires the
//! store ([`db`]), the fleet ([`fleet`]: devices, commands, chunk serving,
//! rollouts driven by the pure [`engine`]), the HTTP [`api`], the embedded
//! [`broker`] behind its [`gate`], and the certificate authority ([`ca`]).

pub mod api;
pub mod broker;
pub mod ca;
pub mod config;
pub mod db;
pub mod engine;
pub mod fetch_limits;
pub mod fleet;
pub mod gate;
pub mod npy;
pub mod samples;
pub mod serve;
pub mod tags;
