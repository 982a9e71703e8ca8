//! The operator's tools: [`operator`] (keys, trust roots, bundle build, sign
//! and verify), [`flash`] (a device's first install), [`demo`], the API
//! [`client`], the controller's commands in [`remote`], and the command line that parses for all of them
//! ([`cli`]).

pub mod cli;
pub mod client;
pub mod demo;
pub mod flash;
pub mod load;
pub mod operator;
pub mod remote;
