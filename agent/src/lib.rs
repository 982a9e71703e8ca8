//! The edgefleet device agent. This session provides the model runtime
//! ([`model`]), which `edgefleet bundle build` also uses to prove a model before it
//! is signed; the install path, MQTT link and local API follow (issue 3).

pub mod model;
