//! Runs whose agent died: found, killed, logged, cleared.
//!
//! A run is marked in progress, durably, before its bundle starts, and the
//! marker is cleared only after its result is in the run log. A marker
//! whose agent process is gone (a crash, SIGKILL, a reboot) is a run that
//! nobody supervises any more: no timeout, no denial collection, no report.
//! Recovery, for each such run:
//!
//! 1. kills whatever is left of it (its cgroup, if it still exists): a
//!    bundle must not go on running unsupervised;
//! 2. appends `run_interrupted` to the run log (the run is not started
//!    again on its own: its version stays used, as for any run that
//!    started; only an operator's retry order may run it again, see
//!    `state::may_start`) and records the version's outcome `interrupted`
//!    if it still says `started` for this run, unless the log
//!    already holds the run's result: the runner removes a finished run's
//!    marker without flushing the removal, so a crash can bring the marker
//!    of a finished run back ([`RunLog::finished_runs`]);
//! 3. removes its scratch directory, then its marker (durably).
//!
//! Every step may be repeated, so a crash during recovery is finished by the
//! next one (at worst the log holds the interruption twice). A run whose
//! leftovers cannot be killed keeps its marker and is an error: it is
//! retried next time, never forgotten.
//!
//! `rollguard-agent run` and the daemon call this before running anything.

use crate::run_log::{RunLog, RunLogError, RunLogEvent};
use crate::sandbox::cgroup::{CgroupError, RunCgroup};
use crate::state::{RunMarker, StateDir, StateError};
use std::time::Duration;

/// How long the leftovers of an interrupted run get to die after SIGKILL
/// (`cgroup.kill`) before recovery reports them as unkillable.
const KILL_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("state directory: {0}")]
    State(#[from] StateError),
    #[error("run log: {0}")]
    RunLog(#[from] RunLogError),
    #[error("leftovers of interrupted run {run_id}: {source}")]
    Cgroup { run_id: String, source: CgroupError },
}

/// One interrupted run, now recorded and cleaned up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    pub marker: RunMarker,
    /// Whether its cgroup still existed (and was killed and removed).
    pub cgroup_removed: bool,
    /// Whether the run log already held its result (only the marker was
    /// left over; no `run_interrupted` was recorded).
    pub already_finished: bool,
}

/// Record and clean up every run of `state` whose agent process is gone.
/// Runs of live agents (another `rollguard-agent run` in progress) are not
/// touched.
pub fn recover_interrupted_runs(
    state: &StateDir,
    log: &RunLog,
) -> Result<Vec<Recovered>, RecoveryError> {
    // The common case, nothing to do, costs one directory listing and no
    // lock; otherwise look again under the lock so two agents starting at
    // once do not both recover the same run.
    if state.interrupted_runs()?.is_empty() {
        return Ok(Vec::new());
    }
    let lock = state.lock()?;
    let markers = state.interrupted_runs()?;
    let finished_runs =
        log.finished_runs(&markers.iter().map(|m| m.run_id.to_string()).collect())?;
    let mut recovered = Vec::new();
    for marker in markers {
        let run_id = marker.run_id.to_string();
        let finished = finished_runs.contains(&run_id);
        if finished {
            tracing::info!(
                run_id,
                bundle = %marker.bundle.name,
                "in-progress marker of a run whose result is logged (its removal was lost): clearing it"
            );
        } else {
            tracing::warn!(
                run_id,
                bundle = %marker.bundle.name,
                version = marker.bundle.version,
                "run was in progress when its agent stopped: killing what is left of it, recording it interrupted"
            );
        }
        let cgroup = RunCgroup::existing(&run_id).map_err(|source| RecoveryError::Cgroup {
            run_id: run_id.clone(),
            source,
        })?;
        let cgroup_removed = cgroup.is_some();
        if let Some(cgroup) = cgroup {
            cgroup
                .kill_and_remove(KILL_GRACE)
                .map_err(|source| RecoveryError::Cgroup {
                    run_id: run_id.clone(),
                    source,
                })?;
        }
        if !finished {
            log.append_locked(
                &lock,
                RunLogEvent::RunInterrupted {
                    run_id: run_id.clone(),
                    bundle: marker.bundle.clone(),
                    manifest_sha256: marker.manifest_sha256.clone(),
                },
            )?;
            // Its version's record says the run did not succeed (if it still
            // says `started` for this run: an outcome recorded before the
            // crash, a success included, stays; and not when the log holds
            // the result: a record still `started` then is one whose outcome
            // could not be written, never retried). A retry order may then
            // run the version again ([`crate::state::may_start`]).
            match rollguard_shared::manifest::BundleName::parse(&marker.bundle.name) {
                Ok(name) => {
                    state.record_outcome_locked(
                        &lock,
                        &name,
                        marker.bundle.version,
                        &marker.run_id,
                        crate::state::VersionOutcome::Interrupted,
                    )?;
                }
                Err(e) => tracing::warn!(run_id, "marker names an invalid bundle: {e}"),
            }
        }
        // Its audit rules, if the agent died before removing them.
        crate::sandbox::launch::remove_exit_rules(&state.run_dir(&marker.run_id));
        if let Err(e) = state.remove_run_dir(&marker.run_id) {
            // Scratch only: the bundle's unpacked payload. Worth a warning,
            // not worth keeping the run unrecorded.
            tracing::warn!(run_id, "cannot remove the run directory: {e}");
        }
        state.clear_in_progress(&marker.run_id)?;
        recovered.push(Recovered {
            marker,
            cgroup_removed,
            already_finished: finished,
        });
    }
    Ok(recovered)
}

#[cfg(test)]
mod tests;
