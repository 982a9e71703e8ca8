//! Device profiles and the fleet simulator (filled by later issues).
