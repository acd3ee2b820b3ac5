//! Where the kill state is kept on disk: two files, for two readers.
//!
//! ```text
//! <state dir>/kill.json         the host-wide kill switch (HostKill), while one is in force
//! <state dir>/daemon/kill.json  the daemon's record (KillFile): the fleet kill state
//!                               last received + any local kill
//! ```
//!
//! The host-wide switch is what the runner checks before every run
//! ([`crate::runner`]'s admission), with or without a daemon, so even a
//! manual `rollguard-agent run` is refused while it is set. The daemon's
//! record holds more (rollout-scoped kills, who ordered what), and the
//! daemon keeps the switch in step with it (see [`super::KillSwitch`]).
//!
//! Both are replaced atomically and durably, like every state file
//! ([`crate::state`]). Their names and formats are those of earlier
//! releases: existing state directories keep working.

use std::path::Path;

use rollguard_shared::protocol::{KillOrder, KillState, RolloutId};
use serde::{Deserialize, Serialize};

use crate::daemon::records::RecordError;
use crate::state::{StateDir, StateError};

/// The host-wide switch's file, in the state directory.
const HOST_KILL_FILE: &str = "kill.json";
/// The daemon's record, in the daemon's directory
/// ([`crate::daemon::records::Records::dir`]).
const DAEMON_KILL_FILE: &str = "kill.json";

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

/// What is in force on this host, as the daemon records it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KillFile {
    /// As last received from the controller.
    #[serde(default)]
    pub fleet: KillState,
    /// Set by `rollguard-agent kill` on this host; lifted only there.
    #[serde(default)]
    pub local: Option<KillOrder>,
}

impl KillFile {
    /// The order that forbids running `rollout` here, if any.
    pub fn covering(&self, rollout: &RolloutId) -> Option<&KillOrder> {
        self.local.as_ref().or_else(|| self.fleet.covering(rollout))
    }
    /// The order that forbids running anything here, if any.
    pub fn host_wide(&self) -> Option<&KillOrder> {
        self.local.as_ref().or(self.fleet.all.as_ref())
    }
}

/// The daemon's record in `daemon_dir`; nothing in force when there is
/// none. A record that cannot be read is an error (the caller decides what
/// is in force then: the daemon treats it as a local kill).
pub fn load_daemon_kill(daemon_dir: &Path) -> Result<KillFile, RecordError> {
    Ok(crate::daemon::records::read_json(&daemon_dir.join(DAEMON_KILL_FILE))?.unwrap_or_default())
}

/// Replace the daemon's record in `daemon_dir`, atomically and durably.
pub fn save_daemon_kill(daemon_dir: &Path, kill: &KillFile) -> Result<(), RecordError> {
    let bytes = serde_json::to_vec(kill).map_err(|e| RecordError::Corrupt {
        path: daemon_dir.to_path_buf(),
        why: e.to_string(),
    })?;
    crate::state::write_durable(daemon_dir, DAEMON_KILL_FILE, &bytes)?;
    Ok(())
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

    #[test]
    fn the_daemon_record_round_trips_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let id = RolloutId::parse("r-1").unwrap();
        {
            let r = crate::daemon::records::Records::open(dir.path()).unwrap();
            let k = KillFile {
                local: Some(KillOrder {
                    reason: "r".into(),
                    by: "local".into(),
                    at: "t".into(),
                }),
                ..Default::default()
            };
            save_daemon_kill(r.dir(), &k).unwrap();
        }
        let r = crate::daemon::records::Records::open(dir.path()).unwrap();
        let k = load_daemon_kill(r.dir()).unwrap();
        assert!(k.host_wide().is_some());
        assert!(k.covering(&id).is_some());
        // Where earlier releases kept it.
        assert!(dir.path().join("daemon/kill.json").is_file());
    }

    #[test]
    fn a_corrupt_daemon_record_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let r = crate::daemon::records::Records::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("daemon/kill.json"), b"{garbage").unwrap();
        assert!(load_daemon_kill(r.dir()).is_err());
    }
}
