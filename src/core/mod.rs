//! The pure core: every decision tidegate makes, with no I/O, no tasks and no clocks.
//! Time comes in as `now` (unix seconds), so tests drive it without sleeping.

pub mod affinity;
pub mod affinity_cookie;
pub mod backend;
pub mod balance;
pub mod health;
pub mod history;
pub mod launch;
pub mod learn;
pub mod pool;
pub mod registry;
pub mod route;
pub mod session_id;
pub mod snapshot;
pub mod stats;
pub mod trust;
