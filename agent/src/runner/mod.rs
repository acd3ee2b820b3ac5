//! One run of one bundle: verify, refuse or run confined, report.
//!
//! This is where the host's policy meets the bundle, in four stages, the
//! same for `rollguard-agent run` and the daemon:
//!
//! 1. [`admit`]: every check that writes nothing. A kill-switch order in
//!    force; the bundle opened as hostile input (manifest and signatures
//!    only); signatures (distinct principals ≥ the host's threshold, the
//!    stricter `delete_threshold` when the bundle deletes); expiry; this
//!    host in `[targets]`; declared service actions against `[services]
//!    allow`; resource limits; the kernel able to confine it; the version
//!    newer than any run here; the sandbox's stage-2 program installed and
//!    safe; network names resolved within the ceiling (after the local
//!    checks: a lookup may take seconds); last, the scopes (the author's
//!    and the one derived from `[packages]`) against the protected paths
//!    resolved now, pins, mount aliases and the host's ceiling.
//! 2. [`prepare`]: the audit listener started on another thread; a private
//!    run directory; the sandbox spec built from the protected paths as
//!    `admit` resolved them (one resolution for the checks and the
//!    sandbox); missing package and drop-in directories created; the
//!    sandbox started *held* (stage 2 confines itself, executes nothing);
//!    the payload unpacked (digests checked); then the point of no return:
//!    the version recorded as started (the atomic rollback check, and for a
//!    retry the retry rule: `state::may_start`), the run
//!    marked in progress and logged, all three durable together
//!    (`StateDir::begin_run`).
//! 3. [`execute`]: the sandbox released, waited for (a timeout kills the
//!    cgroup), its status, output tails, limits and denials read into the
//!    report.
//! 4. [`finish`]: package results, service actions (`services::after_run`:
//!    captured requests decided against `[services] allow`; after a clean
//!    success the declared and allowed ones performed), the version's
//!    outcome recorded (what a retry is decided on), the result logged,
//!    then the in-progress marker cleared and the run directory removed.
//!
//! Every refusal happens before the sandbox is released and withdraws a
//! held sandbox, so a refused bundle never burns a version and never
//! executes anything. What the sandbox itself does, step by step, is
//! listed once, in [`crate::sandbox::stage2`].

mod admit;
mod execute;
mod prepare;
mod unit_alias;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rollguard_shared::report::{BundleRef, RefusalKind, RunReport, RunStatus};

use crate::policy::HostPolicy;
use crate::run_log::{RunLog, RunLogEvent};
use crate::sandbox::{KillHandle, Launcher};
use crate::state::{RunId, StateDir};

/// Called with the run's kill handle once stage 2 is held in the run's
/// cgroup, just before the bundle is released (the daemon keeps it for
/// kill-switch orders; a kill it remembered from earlier kills the held
/// stage 2, and the bundle never executes).
pub type OnStart = Arc<dyn Fn(&str, KillHandle) + Send + Sync>;

/// Options of one run.
#[derive(Clone)]
pub struct RunOptions {
    /// The `rollguard-agent` binary; the sandbox's stage-2 program is the
    /// one installed beside it ([`Launcher::beside`]).
    pub agent_exe: PathBuf,
    /// The rollout this run belongs to (daemon runs), passed to the bundle
    /// as `ROLLGUARD_ROLLOUT`.
    pub rollout_id: Option<String>,
    pub on_start: Option<OnStart>,
    /// The stage-2 program opened and checked once (the daemon, at start);
    /// `None`: look for it beside `agent_exe` on this run.
    pub launcher: Option<Launcher>,
    /// A preview: the scopes are throw-away overlays, nothing reaches the
    /// disk, no service action is performed, the version is not used up
    /// (see [`crate::preview`]).
    pub preview: bool,
    /// A retry (`Order::Run` with `retry`, `rollguard-agent run --retry`):
    /// the version last started here may run again if its last run here
    /// did not succeed, had no denial, and it ran fewer than
    /// [`crate::state::MAX_ATTEMPTS`] times ([`crate::state::may_start`]).
    pub retry: bool,
}

impl RunOptions {
    /// Options for the running agent binary itself.
    pub fn current() -> std::io::Result<Self> {
        Ok(RunOptions {
            agent_exe: std::env::current_exe()?,
            rollout_id: None,
            on_start: None,
            launcher: None,
            preview: false,
            retry: false,
        })
    }
}

/// A refusal: the kind and the sentence.
struct Refusal(RefusalKind, String);

impl Refusal {
    fn new(kind: RefusalKind, why: impl std::fmt::Display) -> Self {
        Refusal(kind, why.to_string())
    }
}

/// What we know about the bundle once its manifest parsed (for the
/// refusal's report and log entry).
struct Known {
    bundle: BundleRef,
    manifest_sha256: String,
}

/// A report before anything ran: denials known to be none.
fn empty_report(host: &str, started: Instant) -> RunReport {
    RunReport {
        denials: Some(vec![]),
        denial_count: Some(0),
        duration_ms: started.elapsed().as_millis() as u64,
        ..RunReport::new(host, RunStatus::Refused)
    }
}

/// Verify `bundle_path` against `policy` and run it once, confined. Never
/// panics on bad input; every outcome is a report.
pub fn run_bundle(policy: &HostPolicy, bundle_path: &Path, opts: &RunOptions) -> RunReport {
    let started = Instant::now();
    let host = policy.identity().name;
    let state = match StateDir::open(policy.state_dir()) {
        Ok(s) => s,
        Err(e) => {
            let mut r = empty_report(&host, started);
            r.refusal = Some(RefusalKind::HostError);
            r.reason = Some(format!("state directory: {e}"));
            return r;
        }
    };
    let log = RunLog::new(&state);
    let mut known = None;
    let result = admit::admit(policy, &state, &log, bundle_path, opts, &mut known)
        .and_then(|admitted| prepare::prepare(policy, &state, &log, admitted, opts, started));
    match result {
        Ok(prepared) => {
            let run = execute::execute(prepared, opts);
            finish(policy, &state, &log, run, started)
        }
        Err(Refusal(kind, reason)) => {
            tracing::warn!(bundle = %bundle_path.display(), ?kind, %reason, "bundle refused");
            let mut r = empty_report(&host, started);
            r.refusal = Some(kind);
            r.reason = Some(reason.clone());
            r.bundle = known.as_ref().map(|k: &Known| k.bundle.clone());
            let event = RunLogEvent::Refused {
                bundle: r.bundle.clone(),
                manifest_sha256: known.map(|k| k.manifest_sha256),
                refusal: kind,
                reason,
            };
            if let Err(e) = log.append(event) {
                tracing::error!("cannot record the refusal in the run log: {e}");
            }
            r
        }
    }
}

/// After the run: what the packages did, the service actions, then the
/// result logged before the in-progress marker is cleared.
fn finish(
    policy: &HostPolicy,
    state: &StateDir,
    log: &RunLog,
    run: execute::Executed,
    started: Instant,
) -> RunReport {
    let execute::Executed {
        admission,
        run_id,
        packages_before,
        packages_after_preview,
        service_requests,
        // Kept until the marker goes (below): the report is returned once
        // the run's audit rules are handed over for removal.
        rules_removal,
        mut report,
    } = run;
    if report.preview.is_some() {
        // What the packages would become, from the preview's layers.
        match (&admission.packages, packages_before, packages_after_preview) {
            (Some(p), Some(before), Some(after)) => {
                crate::packages::after_preview(p, before, after, &mut report)
            }
            (Some(_), _, _) if report.status == RunStatus::Succeeded => {
                report.status = RunStatus::Failed;
                report.reason = Some(
                    "the preview's package database could not be read: what it would install is unknown"
                        .into(),
                );
            }
            _ => {}
        }
        let requests = service_requests.as_deref();
        return finish_preview(
            policy, state, log, admission, run_id, requests, report, started,
        );
    }
    // Files the packages replaced or removed: the stale-services scan's
    // input (restart_stale, and `stale_services` in the report).
    let replaced = match (&admission.packages, packages_before) {
        (Some(p), Some(before)) => crate::packages::after_run(p, before, &mut report),
        _ => Default::default(),
    };
    // Before the service step: it may reload systemd.
    unit_alias::remove_new(&admission.scope, &mut report);
    // How this version's run ended, durably, before the service actions
    // (systemd jobs, which can take minutes) and before the result is
    // logged: what a later retry order is decided on. Service actions run
    // only after a success, which is final whatever they do; the one thing
    // the service step can still change is a failed run's service
    // requests outside the policy, which make it `denied` (recorded again
    // below, tighter only). A crash before this leaves the record
    // `started` (recovery makes it `interrupted`). A failure to write it
    // leaves it `started`, not retried, unless the result cannot be logged
    // either (a full or failing disk): then the marker stays and recovery
    // makes the run `interrupted` (docs/fleet.md, "Retrying failed hosts").
    let record_outcome = |report: &RunReport| {
        let outcome = crate::state::VersionOutcome::of_report(report);
        if let Err(e) = state.record_outcome(
            &admission.manifest.bundle.name,
            admission.bundle.version,
            &run_id,
            outcome,
        ) {
            tracing::error!(run_id = %run_id, "cannot record how the run ended (this version will not be retried here): {e}");
        }
        outcome
    };
    let recorded = record_outcome(&report);
    crate::services::after_run::after_run(
        &admission.manifest.services,
        policy.services(),
        service_requests.as_deref(),
        &replaced,
        crate::services::after_run::Perform::Yes,
        &mut report,
    );
    if crate::state::VersionOutcome::of_report(&report) != recorded {
        record_outcome(&report);
    }
    report.duration_ms = started.elapsed().as_millis() as u64;

    // The audit rules' removal handed over before the in-progress marker
    // goes: an agent killed before the hand-over leaves the marker, and
    // recovery removes the rules of a marked run (on a host without the
    // daemon, nothing else would).
    drop(rules_removal);

    // The scratch directory goes on another thread: removing it is not
    // state (see `StateDir::remove_run_dir`) and on a journaling file
    // system it can wait for the flushes below.
    std::thread::scope(|scope| {
        scope.spawn(|| remove_run_dir(state, &run_id));
        // The result first, then the marker: a crash in between leaves a
        // marker, and recovery records the run as interrupted.
        match log.append(RunLogEvent::run_finished(
            &report,
            run_id.as_str(),
            admission.bundle.clone(),
            &admission.manifest_sha256,
        )) {
            Ok(_) => {
                if let Err(e) = state.clear_logged_in_progress(&run_id) {
                    tracing::error!(run_id = %run_id, "cannot clear the in-progress marker: {e}");
                }
            }
            // Keeping the marker keeps the run from being lost: recovery
            // records it as interrupted.
            Err(e) => tracing::error!(
                run_id = %run_id,
                "cannot record the result in the run log (the in-progress marker stays): {e}"
            ),
        }
    });
    report
}

/// After a preview: the service actions it would have performed reported,
/// none performed; the preview logged (nothing else of the host's state
/// changes: no version, no in-progress marker).
#[allow(clippy::too_many_arguments)]
fn finish_preview(
    policy: &HostPolicy,
    state: &StateDir,
    log: &RunLog,
    admission: admit::Admission,
    run_id: RunId,
    service_requests: Option<&std::os::fd::OwnedFd>,
    mut report: RunReport,
    started: Instant,
) -> RunReport {
    crate::services::after_run::after_run(
        &admission.manifest.services,
        policy.services(),
        service_requests,
        &Default::default(),
        crate::services::after_run::Perform::PreviewOnly,
        &mut report,
    );
    report.duration_ms = started.elapsed().as_millis() as u64;
    remove_run_dir(state, &run_id);
    let event = RunLogEvent::Previewed {
        run_id: run_id.to_string(),
        bundle: admission.bundle.clone(),
        manifest_sha256: admission.manifest_sha256.clone(),
        status: report.status,
        denial_count: report.denial_count,
        changes: report
            .preview
            .as_ref()
            .map_or(0, |p| p.changes.len() as u64 + p.changes_dropped),
    };
    if let Err(e) = log.append(event) {
        tracing::error!(run_id = %run_id, "cannot record the preview in the run log: {e}");
    }
    report
}

/// Remove a run's scratch directory; a failure is logged, not fatal.
fn remove_run_dir(state: &StateDir, run_id: &RunId) {
    if let Err(e) = state.remove_run_dir(run_id) {
        tracing::warn!(run_id = %run_id, "cannot remove the run directory: {e}");
    }
}
