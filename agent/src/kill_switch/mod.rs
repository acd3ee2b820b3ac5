//! The agent's kill switch: everything that stops bundles on this host and
//! refuses new ones while a kill order is in force.
//!
//! - [`signal`]: the kill switch of one run ([`KillSignal`]), and the hook
//!   that attaches it to the sandbox's `cgroup.kill`.

pub mod signal;

pub use signal::KillSignal;
