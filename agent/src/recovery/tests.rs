//! Needs root and cgroup v2 (like every sandbox test): a real leftover
//! process in a real run cgroup must be dead afterwards.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use rollguard_shared::report::BundleRef;

use super::*;
use crate::run_log;
use crate::state::{AgentProcess, RunId};

fn fresh() -> (tempfile::TempDir, StateDir, RunLog) {
    let tmp = tempfile::tempdir().unwrap();
    let state = StateDir::open(&tmp.path().join("state")).unwrap();
    let log = RunLog::new(&state);
    (tmp, state, log)
}

/// A marker of a run started by an agent of an earlier boot (so certainly
/// dead).
fn dead_agents_marker() -> RunMarker {
    let mut agent = AgentProcess::current().unwrap();
    agent.boot_id = "an-earlier-boot".into();
    RunMarker {
        run_id: RunId::generate().unwrap(),
        bundle: BundleRef {
            name: "mail-fix".into(),
            version: 3,
        },
        manifest_sha256: "cd".repeat(32),
        started: jiff::Timestamp::now(),
        agent,
    }
}

fn log_lines(log: &RunLog) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log.path())
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn nothing_to_recover_writes_nothing() {
    let (_tmp, state, log) = fresh();
    assert!(recover_interrupted_runs(&state, &log).unwrap().is_empty());
    assert!(!log.path().exists(), "an empty recovery wrote the run log");
}

#[test]
fn leftover_process_is_killed_and_the_run_logged_once() {
    let (_tmp, state, log) = fresh();
    let marker = dead_agents_marker();
    state.mark_in_progress(&marker).unwrap();
    state.create_run_dir(&marker.run_id).unwrap();

    // What a crashed agent leaves behind: its bundle still running in the
    // run's cgroup.
    let cgroup = RunCgroup::create(marker.run_id.as_str()).unwrap();
    let mut leftover = Command::new("sleep").arg("600").spawn().unwrap();
    cgroup.add_process(leftover.id()).unwrap();
    let cgroup_dir = cgroup.path().to_path_buf();

    let recovered = recover_interrupted_runs(&state, &log).unwrap();
    assert_eq!(recovered.len(), 1);
    assert_eq!(recovered[0].marker, marker);
    assert!(recovered[0].cgroup_removed);

    let status = leftover.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "leftover not SIGKILLed: {status}");
    assert!(!cgroup_dir.exists(), "run cgroup left behind");
    assert!(
        !state.run_dir(&marker.run_id).exists(),
        "run dir left behind"
    );
    assert!(state.interrupted_runs().unwrap().is_empty(), "marker left");

    let lines = log_lines(&log);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let event = &lines[0];
    assert_eq!(event["event"]["type"], "run_interrupted", "{event}");
    assert_eq!(event["event"]["run_id"], marker.run_id.as_str());
    run_log::verify(log.path()).expect("chain intact");

    // Done is done: a second recovery finds nothing.
    assert!(recover_interrupted_runs(&state, &log).unwrap().is_empty());
    assert_eq!(log_lines(&log).len(), 1);
}

#[test]
fn a_live_agents_run_is_left_alone() {
    let (_tmp, state, log) = fresh();
    let mut marker = dead_agents_marker();
    marker.agent = AgentProcess::current().unwrap(); // this test process: alive
    state.mark_in_progress(&marker).unwrap();
    assert!(recover_interrupted_runs(&state, &log).unwrap().is_empty());
    assert_eq!(state.interrupted_runs().unwrap().len(), 0);
    assert!(!log.path().exists());
}

#[test]
fn run_without_cgroup_is_still_recorded() {
    let (_tmp, state, log) = fresh();
    let marker = dead_agents_marker();
    state.mark_in_progress(&marker).unwrap();
    let recovered = recover_interrupted_runs(&state, &log).unwrap();
    assert_eq!(recovered.len(), 1);
    assert!(!recovered[0].cgroup_removed);
    assert_eq!(log_lines(&log).len(), 1);
}

/// What a crash can leave after a run that finished: its result in the log
/// and its marker back (the runner does not flush the marker's removal).
fn finished_event(marker: &RunMarker) -> run_log::RunLogEvent {
    run_log::RunLogEvent::RunFinished {
        run_id: marker.run_id.to_string(),
        bundle: marker.bundle.clone(),
        manifest_sha256: marker.manifest_sha256.clone(),
        status: rollguard_shared::report::RunStatus::Succeeded,
        exit_code: Some(0),
        reason: None,
        denials: Some(Vec::new()),
        denial_count: Some(0),
        duration_ms: 9,
        expected_denials: vec![],
        packages: vec![],
    }
}

#[test]
fn marker_of_a_logged_run_is_cleared_without_an_interruption() {
    let (_tmp, state, log) = fresh();
    let marker = dead_agents_marker();
    state.mark_in_progress(&marker).unwrap();
    log.append(finished_event(&marker)).unwrap();

    let recovered = recover_interrupted_runs(&state, &log).unwrap();
    assert_eq!(recovered.len(), 1);
    assert!(recovered[0].already_finished);
    assert!(state.interrupted_runs().unwrap().is_empty(), "marker left");
    let lines = log_lines(&log);
    assert_eq!(lines.len(), 1, "recovery wrote to the log: {lines:?}");
    assert_eq!(lines[0]["event"]["type"], "run_finished");
}

#[test]
fn another_runs_result_does_not_count() {
    let (_tmp, state, log) = fresh();
    let marker = dead_agents_marker();
    state.mark_in_progress(&marker).unwrap();
    // A run of the same bundle with another id, and an entry that merely
    // mentions this run's id in a reason: neither is this run's result.
    let other = dead_agents_marker();
    log.append(finished_event(&other)).unwrap();
    log.append(run_log::RunLogEvent::Refused {
        bundle: Some(marker.bundle.clone()),
        manifest_sha256: None,
        refusal: rollguard_shared::report::RefusalKind::Rollback,
        reason: format!("not {}", marker.run_id),
    })
    .unwrap();

    let recovered = recover_interrupted_runs(&state, &log).unwrap();
    assert_eq!(recovered.len(), 1);
    assert!(!recovered[0].already_finished);
    let lines = log_lines(&log);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[2]["event"]["type"], "run_interrupted");
    assert_eq!(lines[2]["event"]["run_id"], marker.run_id.as_str());
}

#[test]
fn several_markers_are_told_apart_in_one_pass() {
    let (_tmp, state, log) = fresh();
    let done = dead_agents_marker();
    let cut = dead_agents_marker();
    state.mark_in_progress(&done).unwrap();
    state.mark_in_progress(&cut).unwrap();
    log.append(finished_event(&done)).unwrap();

    let recovered = recover_interrupted_runs(&state, &log).unwrap();
    let finished: Vec<(String, bool)> = recovered
        .iter()
        .map(|r| (r.marker.run_id.to_string(), r.already_finished))
        .collect();
    assert!(
        finished.contains(&(done.run_id.to_string(), true)),
        "{finished:?}"
    );
    assert!(
        finished.contains(&(cut.run_id.to_string(), false)),
        "{finished:?}"
    );
    assert!(state.interrupted_runs().unwrap().is_empty(), "markers left");
    let lines = log_lines(&log);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[1]["event"]["type"], "run_interrupted");
    assert_eq!(lines[1]["event"]["run_id"], cut.run_id.as_str());
}

#[test]
fn an_interrupted_run_leaves_its_version_retryable_and_a_logged_one_does_not() {
    use crate::state::VersionOutcome;
    use rollguard_shared::manifest::BundleName;
    let (_tmp, state, log) = fresh();
    let name = BundleName::parse("mail-fix").unwrap();
    // A run begun (version recorded `started`) whose agent died.
    let marker = dead_agents_marker();
    state
        .begin_run(&name, &marker, false, |_, _| Ok::<(), &str>(()))
        .unwrap();
    let record = state.version_record(&name).unwrap().unwrap();
    assert_eq!(record.outcome, Some(VersionOutcome::Started));
    // Not retryable while its end is unknown.
    assert!(
        crate::state::may_start("mail-fix", Some(&record), 3, true, &marker.manifest_sha256)
            .is_err()
    );

    recover_interrupted_runs(&state, &log).unwrap();
    let record = state.version_record(&name).unwrap().unwrap();
    assert_eq!(record.outcome, Some(VersionOutcome::Interrupted));
    assert_eq!(record.attempts, Some(1));
    // A retry order may run it again; a plain order may not.
    assert_eq!(
        crate::state::may_start("mail-fix", Some(&record), 3, true, &marker.manifest_sha256)
            .unwrap(),
        2
    );
    assert!(
        crate::state::may_start("mail-fix", Some(&record), 3, false, &marker.manifest_sha256)
            .is_err()
    );

    // A run whose result is in the log but whose outcome could not be
    // recorded stays `started`: never retried.
    let (_tmp2, state, log) = fresh();
    let marker = dead_agents_marker();
    state
        .begin_run(&name, &marker, false, |_, _| Ok::<(), &str>(()))
        .unwrap();
    log.append(finished_event(&marker)).unwrap();
    recover_interrupted_runs(&state, &log).unwrap();
    let record = state.version_record(&name).unwrap().unwrap();
    assert_eq!(record.outcome, Some(VersionOutcome::Started));
    assert!(
        crate::state::may_start("mail-fix", Some(&record), 3, true, &marker.manifest_sha256)
            .is_err()
    );
}
