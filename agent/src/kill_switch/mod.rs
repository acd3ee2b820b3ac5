//! The agent's kill switch: everything that stops bundles on this host and
//! refuses new ones while a kill order is in force.
//!
//! - [`signal`]: the kill switch of one run ([`KillSignal`]), and the hook
//!   that attaches it to the sandbox's `cgroup.kill`.
//! - [`store`]: the kill state on disk: the daemon's record ([`KillFile`])
//!   and the state directory's host-wide switch ([`HostKill`]) that the
//!   runner checks before every run ([`host_kill_in_force`]).

pub mod signal;
pub mod store;

pub use signal::KillSignal;
pub use store::{host_kill_in_force, HostKill, KillFile};
