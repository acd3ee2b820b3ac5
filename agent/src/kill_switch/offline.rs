//! `rollguard-agent kill` when no daemon answers its socket (stopped,
//! crash-looping, not yet started): the same request, made on the two
//! files the daemon keeps in step ([`super::store`]), so that an operator's
//! kill works on a host whatever state its daemon is in.
//!
//! - **kill**: the state directory's host-wide switch is set. Every manual
//!   `rollguard-agent run` checks it, and a daemon that starts later adopts
//!   it as a local kill ([`super::KillSwitch::open`]). There is no running
//!   bundle of the daemon's to kill (a daemon's runs die with it, their
//!   cgroups are killed by its recovery at the next start).
//! - **lift**: the local kill leaves the daemon's record, and the host-wide
//!   switch is cleared unless the record holds a fleet-wide kill (which
//!   only the controller lifts). Both, or the next daemon would set the
//!   switch again from its record.
//! - **status**: what the two files hold.

use std::path::Path;

use crate::daemon::local::{LocalRequest, LocalResponse};
use crate::state::StateDir;

use super::{in_force, store};

/// Make `req` on the files of the state directory `state_dir` (see the
/// module docs); a record that cannot be read is a local kill in force, as
/// for the daemon ([`in_force`]).
pub fn request(state_dir: &Path, req: &LocalRequest) -> anyhow::Result<LocalResponse> {
    let state = StateDir::open(state_dir)?;
    let daemon_dir = state_dir.join(crate::daemon::records::DAEMON_DIR);
    match req {
        LocalRequest::Kill { reason } => {
            store::set_host_kill(&state, reason)?;
        }
        LocalRequest::Lift => {
            let mut kill = in_force(&state, &daemon_dir)?;
            kill.local = None;
            if daemon_dir.is_dir() {
                store::save_daemon_kill(&daemon_dir, &kill)?;
            }
            if kill.host_wide().is_none() {
                store::clear_host_kill(&state)?;
            }
        }
        LocalRequest::Status => {}
    }
    // What is in force now, as the next daemon would recover it.
    Ok(LocalResponse {
        ok: true,
        error: None,
        killed: 0,
        running: Vec::new(),
        kill: in_force(&state, &daemon_dir)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kill_switch::{now, KillFile};
    use rollguard_shared::protocol::KillOrder;

    fn kill(reason: &str) -> LocalRequest {
        LocalRequest::Kill {
            reason: reason.into(),
        }
    }

    #[test]
    fn a_kill_without_the_daemon_arms_the_switch_and_a_lift_clears_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let resp = request(dir.path(), &kill("disk failing")).unwrap();
        assert_eq!(resp.kill.local.unwrap().reason, "disk failing");
        assert!(store::host_kill_in_force(&state).unwrap().is_some());

        let resp = request(dir.path(), &LocalRequest::Status).unwrap();
        assert!(resp.kill.local.is_some());

        let resp = request(dir.path(), &LocalRequest::Lift).unwrap();
        assert!(resp.kill.local.is_none());
        assert!(store::host_kill_in_force(&state).unwrap().is_none());
    }

    /// The daemon's record holds a local kill (set while it ran): a lift
    /// without the daemon removes it there too, or the next daemon would
    /// arm the switch again; a fleet-wide kill in the record stays, and so
    /// does the switch.
    #[test]
    fn a_lift_without_the_daemon_edits_its_record_and_keeps_a_fleet_kill() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let daemon_dir = dir.path().join(crate::daemon::records::DAEMON_DIR);
        std::fs::create_dir_all(&daemon_dir).unwrap();
        let order = |reason: &str| KillOrder {
            reason: reason.into(),
            by: "local".into(),
            at: now(),
        };
        let mut file = KillFile {
            local: Some(order("maintenance")),
            ..KillFile::default()
        };
        store::save_daemon_kill(&daemon_dir, &file).unwrap();
        store::set_host_kill(&state, "maintenance").unwrap();
        request(dir.path(), &LocalRequest::Lift).unwrap();
        assert!(store::load_daemon_kill(&daemon_dir)
            .unwrap()
            .local
            .is_none());
        assert!(store::host_kill_in_force(&state).unwrap().is_none());

        file.local = Some(order("again"));
        file.fleet.all = Some(order("incident"));
        store::save_daemon_kill(&daemon_dir, &file).unwrap();
        store::set_host_kill(&state, "incident").unwrap();
        let resp = request(dir.path(), &LocalRequest::Lift).unwrap();
        assert!(resp.kill.local.is_none());
        assert!(resp.kill.fleet.all.is_some());
        assert!(
            store::host_kill_in_force(&state).unwrap().is_some(),
            "the fleet kill stays"
        );
    }
}
