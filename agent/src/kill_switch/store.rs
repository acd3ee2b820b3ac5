//! Where the kill state is kept on disk.
//!
//! ```text
//! <state dir>/kill.json   the host-wide kill switch (HostKill), while one is in force
//! ```
//!
//! The host-wide switch is what the runner checks before every run
//! ([`crate::runner`]'s admission), with or without a daemon, so even a
//! manual `rollguard-agent run` is refused while it is set. The daemon
//! keeps it in step with its own record of the kill state.
//!
//! It is replaced atomically and durably, like every state file
//! ([`crate::state`]). Its name and format are those of earlier
//! releases: existing state directories keep working.

use serde::{Deserialize, Serialize};

use crate::state::{StateDir, StateError};

/// The host-wide switch's file, in the state directory.
const HOST_KILL_FILE: &str = "kill.json";

/// A kill-switch order in force on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostKill {
    pub reason: String,
    /// When it was set; `None` when the order file could not be read (it is
    /// then still in force: see [`host_kill_in_force`]).
    pub since: Option<jiff::Timestamp>,
}

/// Durably put a host-wide kill-switch order in force.
pub fn set_host_kill(state: &StateDir, reason: &str) -> Result<HostKill, StateError> {
    let order = HostKill {
        reason: reason.to_string(),
        since: Some(jiff::Timestamp::now()),
    };
    let body = serde_json::to_vec(&order).map_err(|e| StateError::Corrupt {
        path: state.root().to_path_buf(),
        why: e.to_string(),
    })?;
    let _lock = state.lock()?;
    crate::state::write_durable(state.root(), HOST_KILL_FILE, &body)?;
    Ok(order)
}

/// Durably lift the host-wide kill-switch order (no-op when none is in
/// force).
pub fn clear_host_kill(state: &StateDir) -> Result<(), StateError> {
    let _lock = state.lock()?;
    crate::state::remove_durable(state.root(), HOST_KILL_FILE)
}

/// The host-wide order in force, if any. Fails closed: an order file that
/// exists but cannot be parsed is still an order in force.
pub fn host_kill_in_force(state: &StateDir) -> Result<Option<HostKill>, StateError> {
    let path = state.root().join(HOST_KILL_FILE);
    match crate::state::read_json::<HostKill>(&path) {
        Ok(order) => Ok(order),
        Err(StateError::Corrupt { why, .. }) => Ok(Some(HostKill {
            reason: format!(
                "kill-switch file {} is unreadable ({why}); treated as in force",
                path.display()
            ),
            since: None,
        })),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh() -> (tempfile::TempDir, StateDir) {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(&tmp.path().join("state")).unwrap();
        (tmp, state)
    }

    #[test]
    fn kill_switch() {
        let (_tmp, state) = fresh();
        assert_eq!(host_kill_in_force(&state).unwrap(), None);
        let order = set_host_kill(&state, "wave 2 reported denials").unwrap();
        assert_eq!(order.reason, "wave 2 reported denials");
        let again = StateDir::open(state.root()).unwrap();
        assert_eq!(host_kill_in_force(&again).unwrap(), Some(order));
        clear_host_kill(&again).unwrap();
        assert_eq!(host_kill_in_force(&state).unwrap(), None);
        clear_host_kill(&again).unwrap();
    }

    #[test]
    fn unreadable_kill_order_is_still_in_force() {
        let (_tmp, state) = fresh();
        std::fs::write(state.root().join(HOST_KILL_FILE), "garbage").unwrap();
        let order = host_kill_in_force(&state)
            .unwrap()
            .expect("a corrupt order must count as in force");
        assert!(order.reason.contains("unreadable"), "{}", order.reason);
        assert_eq!(order.since, None);
    }
}
