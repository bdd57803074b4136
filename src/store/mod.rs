//! What tidegate keeps beyond its process: the state file (pins across restarts).

pub mod state_file;
