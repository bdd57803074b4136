//! What tidegate keeps beyond its process: the state file (pins across restarts) and the
//! shared store (pins across instances).

pub mod shared;
pub mod state_file;
