use super::*;
use std::os::unix::fs::symlink;
use std::sync::{Arc, Barrier};

fn name(s: &str) -> BundleName {
    BundleName::parse(s).unwrap()
}

fn fresh() -> (tempfile::TempDir, StateDir) {
    let tmp = tempfile::tempdir().unwrap();
    let state = StateDir::open(&tmp.path().join("state")).unwrap();
    (tmp, state)
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().mode() & 0o7777
}

#[test]
fn creates_private_directory() {
    let (_tmp, state) = fresh();
    assert_eq!(mode(state.root()), 0o700);
    for sub in [VERSIONS_DIR, IN_PROGRESS_DIR, RUNS_DIR] {
        assert_eq!(mode(&state.root().join(sub)), 0o700, "{sub}");
    }
    // Opening again is fine.
    StateDir::open(state.root()).unwrap();
}

#[test]
fn refuses_unsafe_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("real");
    fs::create_dir(&real).unwrap();
    fs::set_permissions(&real, fs::Permissions::from_mode(0o700)).unwrap();
    let link = tmp.path().join("link");
    symlink(&real, &link).unwrap();
    let e = StateDir::open(&link).unwrap_err();
    assert!(e.to_string().contains("symlink"), "{e}");

    fs::set_permissions(&real, fs::Permissions::from_mode(0o777)).unwrap();
    let e = StateDir::open(&real).unwrap_err();
    assert!(e.to_string().contains("lets group or others write"), "{e}");
    fs::set_permissions(&real, fs::Permissions::from_mode(0o770)).unwrap();
    assert!(StateDir::open(&real).is_err());
    fs::set_permissions(&real, fs::Permissions::from_mode(0o700)).unwrap();
    StateDir::open(&real).unwrap();

    let file = tmp.path().join("file");
    fs::write(&file, "").unwrap();
    let e = StateDir::open(&file).unwrap_err();
    assert!(e.to_string().contains("not a directory"), "{e}");

    let e = StateDir::open(Path::new("relative/state")).unwrap_err();
    assert!(e.to_string().contains("not absolute"), "{e}");

    // A subdirectory replaced by a symlink is refused too.
    let state = tmp.path().join("s2");
    StateDir::open(&state).unwrap();
    fs::remove_dir(state.join(RUNS_DIR)).unwrap();
    symlink(&real, state.join(RUNS_DIR)).unwrap();
    let e = StateDir::open(&state).unwrap_err();
    assert!(e.to_string().contains("symlink"), "{e}");
}

#[test]
fn refuses_directory_owned_by_someone_else() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("other");
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
    let me = nix::unistd::geteuid().as_raw();
    let other = if me == 0 { 65534 } else { me };
    if me == 0 {
        nix::unistd::chown(&dir, Some(nix::unistd::Uid::from_raw(other)), None).unwrap();
        let e = StateDir::open(&dir).unwrap_err();
        assert!(e.to_string().contains("owned by uid 65534"), "{e}");
    } else {
        // Not root: we cannot give a directory away; check our own is accepted.
        StateDir::open(&dir).unwrap();
    }
}

#[test]
fn record_started_enforces_increasing_versions() {
    let (_tmp, state) = fresh();
    let n = name("postfix-tls");
    assert_eq!(state.last_version(&n).unwrap(), None);
    state.record_started(&n, 3).unwrap();
    assert_eq!(state.last_version(&n).unwrap(), Some(3));
    let e = state.record_started(&n, 3).unwrap_err();
    assert_eq!(e.refusal_kind(), RefusalKind::Rollback);
    assert!(
        matches!(
            &e,
            RecordStartedError::NotNewer(NotNewer {
                candidate: 3,
                last: 3,
                ..
            })
        ),
        "{e}"
    );
    assert!(state.record_started(&n, 2).is_err());
    state.record_started(&n, 4).unwrap();
    // Other names are independent.
    state.record_started(&name("other"), 1).unwrap();
    // Durable across reopening, and no temporary files left behind.
    let again = StateDir::open(state.root()).unwrap();
    assert_eq!(again.last_version(&n).unwrap(), Some(4));
    let names: Vec<_> = fs::read_dir(state.root().join(VERSIONS_DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, vec!["other".to_string(), "postfix-tls".to_string()]);
    assert_eq!(
        mode(&state.root().join(VERSIONS_DIR).join("postfix-tls")),
        0o600
    );
}

#[test]
fn corrupt_version_file_is_a_host_error() {
    let (_tmp, state) = fresh();
    let n = name("x");
    fs::write(state.root().join(VERSIONS_DIR).join("x"), "seven").unwrap();
    assert!(matches!(
        state.last_version(&n),
        Err(StateError::Corrupt { .. })
    ));
    let e = state.record_started(&n, 8).unwrap_err();
    assert_eq!(e.refusal_kind(), RefusalKind::HostError);
    // A symlink planted as a version file is not followed.
    fs::remove_file(state.root().join(VERSIONS_DIR).join("x")).unwrap();
    let elsewhere = state.root().join("elsewhere");
    fs::write(&elsewhere, r#"{"version":1,"time":"2026-01-01T00:00:00Z"}"#).unwrap();
    symlink(&elsewhere, state.root().join(VERSIONS_DIR).join("x")).unwrap();
    assert!(matches!(state.last_version(&n), Err(StateError::Io(_))));
}

#[test]
fn lock_is_exclusive_across_open_file_descriptions() {
    let (_tmp, state) = fresh();
    let held = state.lock().unwrap();
    let path = state.root().join(LOCK_FILE);
    let other = File::open(&path).unwrap();
    match Flock::lock(other, FlockArg::LockExclusiveNonblock) {
        Err((_, errno)) => assert_eq!(errno, nix::errno::Errno::EWOULDBLOCK),
        Ok(_) => panic!("a second exclusive lock succeeded while the state lock was held"),
    }
    drop(held);
    let other = File::open(&path).unwrap();
    assert!(Flock::lock(other, FlockArg::LockExclusiveNonblock).is_ok());
}

#[test]
fn concurrent_record_started_lets_exactly_one_through() {
    let (_tmp, state) = fresh();
    let n = name("race");
    let threads = 8;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let state = StateDir::open(state.root()).unwrap();
            let barrier = barrier.clone();
            let n = n.clone();
            std::thread::spawn(move || {
                barrier.wait();
                state.record_started(&n, 1).is_ok()
            })
        })
        .collect();
    let ok = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(|ok| *ok)
        .count();
    assert_eq!(ok, 1);
    assert_eq!(state.last_version(&n).unwrap(), Some(1));
}

#[test]
fn run_directories() {
    let (_tmp, state) = fresh();
    let id = RunId::generate().unwrap();
    let dir = state.create_run_dir(&id).unwrap();
    assert_eq!(dir, state.run_dir(&id));
    assert_eq!(mode(&dir), 0o700);
    fs::create_dir(dir.join("sub")).unwrap();
    fs::write(dir.join("sub/file"), "x").unwrap();
    assert!(
        state.create_run_dir(&id).is_err(),
        "creating twice must fail"
    );
    state.remove_run_dir(&id).unwrap();
    assert!(!dir.exists());
    state.remove_run_dir(&id).unwrap();
}

#[test]
fn run_ids() {
    let a = RunId::generate().unwrap();
    let b = RunId::generate().unwrap();
    assert_ne!(a, b);
    assert_eq!(RunId::parse(a.as_str()).unwrap(), a);
    assert!(RunId::parse("").is_err());
    assert!(RunId::parse("../etc").is_err());
    assert!(RunId::parse("-x").is_err());
    assert!(RunId::parse("a/b").is_err());
    assert!(RunId::parse(&"a".repeat(65)).is_err());
    let json = serde_json::to_string(&a).unwrap();
    assert_eq!(serde_json::from_str::<RunId>(&json).unwrap(), a);
    assert!(serde_json::from_str::<RunId>("\"../x\"").is_err());
}

fn marker(id: &str, agent: AgentProcess) -> RunMarker {
    RunMarker {
        run_id: RunId::parse(id).unwrap(),
        bundle: BundleRef {
            name: "postfix".into(),
            version: 7,
        },
        manifest_sha256: "ab".repeat(32),
        started: jiff::Timestamp::now(),
        agent,
    }
}

#[test]
fn interrupted_runs_are_those_whose_agent_is_gone() {
    let (_tmp, state) = fresh();
    assert!(state.interrupted_runs().unwrap().is_empty());
    let me = AgentProcess::current().unwrap();
    assert!(me.is_alive());

    // Our own live run: not interrupted.
    let live = RunMarker::new(
        RunId::parse("2-live").unwrap(),
        BundleRef {
            name: "a".into(),
            version: 1,
        },
        "00".repeat(32),
    )
    .unwrap();
    state.mark_in_progress(&live).unwrap();
    // Same pid but a different start time: the pid was reused, the agent is gone.
    let reused = marker(
        "1-reused",
        AgentProcess {
            start_time: me.start_time + 1,
            ..me.clone()
        },
    );
    state.mark_in_progress(&reused).unwrap();
    // A previous boot.
    let rebooted = marker(
        "3-rebooted",
        AgentProcess {
            boot_id: "not-this-boot".into(),
            ..me.clone()
        },
    );
    state.mark_in_progress(&rebooted).unwrap();
    // A process that has exited.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let child_pid = child.id();
    child.wait().unwrap();
    let exited = marker(
        "4-exited",
        AgentProcess {
            pid: child_pid,
            ..me.clone()
        },
    );
    state.mark_in_progress(&exited).unwrap();

    let found = state.interrupted_runs().unwrap();
    let ids: Vec<_> = found
        .iter()
        .map(|m| m.run_id.as_str().to_string())
        .collect();
    assert_eq!(ids, vec!["1-reused", "3-rebooted", "4-exited"]);
    assert_eq!(found[0], reused);

    // Durable across reopening; cleared markers disappear.
    let again = StateDir::open(state.root()).unwrap();
    again.clear_in_progress(&reused.run_id).unwrap();
    again.clear_in_progress(&reused.run_id).unwrap();
    let ids: Vec<_> = again
        .interrupted_runs()
        .unwrap()
        .into_iter()
        .map(|m| m.run_id.to_string())
        .collect();
    assert_eq!(ids, vec!["3-rebooted", "4-exited"]);
}

#[test]
fn corrupt_marker_is_an_error_not_ignored() {
    let (_tmp, state) = fresh();
    fs::write(state.root().join(IN_PROGRESS_DIR).join("x.json"), "{").unwrap();
    assert!(matches!(
        state.interrupted_runs(),
        Err(StateError::Corrupt { .. })
    ));
    // A leftover temporary file from a crash between write and rename is skipped.
    fs::remove_file(state.root().join(IN_PROGRESS_DIR).join("x.json")).unwrap();
    fs::write(
        state.root().join(IN_PROGRESS_DIR).join(".x.json.tmp-1-0"),
        "{",
    )
    .unwrap();
    assert!(state.interrupted_runs().unwrap().is_empty());
}

/// Every file in `dir` (temporary files included).
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn begin_run_records_version_and_marker_with_the_lock_held_alongside() {
    let (_tmp, state) = fresh();
    let me = AgentProcess::current().unwrap();
    let m = marker("1-run", me.clone());
    let root = state.root().to_path_buf();
    state
        .begin_run(&name("postfix"), &m, false, |_lock: &StateLock, _| {
            // The state lock is held for the concurrent step: another open
            // file description cannot take it.
            let other = OpenOptions::new()
                .read(true)
                .write(true)
                .open(root.join(LOCK_FILE))
                .unwrap();
            let busy = Flock::lock(other, FlockArg::LockExclusiveNonblock).is_err();
            if busy {
                Ok(())
            } else {
                Err("the state lock was not held")
            }
        })
        .unwrap();
    assert_eq!(state.last_version(&name("postfix")).unwrap(), Some(7));
    let interrupted: Vec<RunMarker> = fs::read_dir(root.join(IN_PROGRESS_DIR))
        .unwrap()
        .map(|e| read_json(&e.unwrap().path()).unwrap().unwrap())
        .collect();
    assert_eq!(interrupted, vec![m.clone()]);
    // No temporary file left behind.
    assert_eq!(entries(&root.join(VERSIONS_DIR)), vec!["postfix"]);
    assert_eq!(entries(&root.join(IN_PROGRESS_DIR)), vec!["1-run.json"]);

    // The same version again: refused as a rollback, nothing run alongside.
    let again = marker("2-run", me);
    let mut called = false;
    let e = state
        .begin_run(&name("postfix"), &again, false, |_, _| {
            called = true;
            Ok::<(), &str>(())
        })
        .unwrap_err();
    assert!(matches!(
        e,
        BeginRunError::Record(RecordStartedError::NotNewer(_))
    ));
    assert!(!called);
    assert_eq!(entries(&root.join(IN_PROGRESS_DIR)), vec!["1-run.json"]);
}

#[test]
fn begin_run_records_nothing_when_the_step_alongside_fails() {
    let (_tmp, state) = fresh();
    let m = marker("1-run", AgentProcess::current().unwrap());
    let e = state
        .begin_run(&name("postfix"), &m, false, |_, _| Err("run log is full"))
        .unwrap_err();
    assert!(matches!(e, BeginRunError::Alongside("run log is full")));
    // The version is not used up, no marker, no temporary files.
    assert_eq!(state.last_version(&name("postfix")).unwrap(), None);
    assert!(entries(&state.root().join(VERSIONS_DIR)).is_empty());
    assert!(entries(&state.root().join(IN_PROGRESS_DIR)).is_empty());
    // So the same version can still run.
    state
        .begin_run(&name("postfix"), &m, false, |_, _| Ok::<(), &str>(()))
        .unwrap();
    assert_eq!(state.last_version(&name("postfix")).unwrap(), Some(7));
}

#[test]
fn begin_run_refuses_a_marker_for_another_bundle() {
    let (_tmp, state) = fresh();
    let m = marker("1-run", AgentProcess::current().unwrap());
    let e = state
        .begin_run(&name("other"), &m, false, |_, _| Ok::<(), &str>(()))
        .unwrap_err();
    assert!(e.to_string().contains("names bundle"), "{e}");
    assert_eq!(state.last_version(&name("other")).unwrap(), None);
    assert_eq!(state.last_version(&name("postfix")).unwrap(), None);
}

// ---- the retry rule ----------------------------------------------------

/// Begin run `id` of postfix version 7, as a retry or not.
fn begin(state: &StateDir, id: &str, retry: bool) -> Result<(), BeginRunError<&'static str>> {
    let m = marker(id, AgentProcess::current().unwrap());
    state.begin_run(&name("postfix"), &m, retry, |_, _| Ok::<(), &str>(()))
}

/// End run `id` of postfix version 7 with `outcome`.
fn end(state: &StateDir, id: &str, outcome: VersionOutcome) {
    assert!(state
        .record_outcome(&name("postfix"), 7, &RunId::parse(id).unwrap(), outcome)
        .unwrap());
    state.clear_in_progress(&RunId::parse(id).unwrap()).unwrap();
}

fn not_retryable(e: BeginRunError<&'static str>) -> NotRetryable {
    match e {
        BeginRunError::Record(RecordStartedError::NotRetryable(n)) => n,
        other => panic!("expected a refused retry, got {other}"),
    }
}

#[test]
fn a_version_that_succeeded_never_runs_again() {
    let (_tmp, state) = fresh();
    begin(&state, "1-run", false).unwrap();
    end(&state, "1-run", VersionOutcome::Succeeded);
    let e = not_retryable(begin(&state, "2-run", true).unwrap_err());
    assert!(e.why.contains("succeeded"), "{e}");
    // Without the retry marker: the plain rollback refusal.
    assert!(matches!(
        begin(&state, "2-run", false).unwrap_err(),
        BeginRunError::Record(RecordStartedError::NotNewer(_))
    ));
    let record = state.version_record(&name("postfix")).unwrap().unwrap();
    assert_eq!(record.outcome, Some(VersionOutcome::Succeeded));
    assert_eq!(record.attempts, Some(1));
}

#[test]
fn a_retry_runs_only_the_same_bundle_again() {
    let (_tmp, state) = fresh();
    begin(&state, "1-run", false).unwrap();
    end(&state, "1-run", VersionOutcome::Failed);
    // Another manifest of the same name and version: refused, retry or not.
    let mut other = marker("2-run", AgentProcess::current().unwrap());
    other.manifest_sha256 = "ef".repeat(32);
    let e = state
        .begin_run(&name("postfix"), &other, true, |_, _| Ok::<(), &str>(()))
        .unwrap_err();
    assert!(not_retryable(e).why.contains("not the one"));
    // A record without the digest (written by record_started): refused.
    let mut record = state.version_record(&name("postfix")).unwrap().unwrap();
    record.manifest_sha256 = None;
    assert!(may_start("postfix", Some(&record), 7, true, &"ab".repeat(32)).is_err());
    // The same bundle: accepted.
    begin(&state, "3-run", true).unwrap();
}

#[test]
fn an_outcome_only_ever_tightens() {
    let (_tmp, state) = fresh();
    begin(&state, "1-run", false).unwrap();
    let run = RunId::parse("1-run").unwrap();
    let postfix = name("postfix");
    let outcome = |s: &StateDir| s.version_record(&postfix).unwrap().unwrap().outcome;
    assert!(state
        .record_outcome(&postfix, 7, &run, VersionOutcome::Failed)
        .unwrap());
    // Failed may still become denied (a service request outside the policy)...
    assert!(state
        .record_outcome(&postfix, 7, &run, VersionOutcome::Denied)
        .unwrap());
    assert_eq!(outcome(&state), Some(VersionOutcome::Denied));
    // ... never retryable again, nor a success.
    for o in [
        VersionOutcome::Failed,
        VersionOutcome::Succeeded,
        VersionOutcome::Started,
    ] {
        assert!(!state.record_outcome(&postfix, 7, &run, o).unwrap());
    }
    assert_eq!(outcome(&state), Some(VersionOutcome::Denied));
}

#[test]
fn a_failed_version_runs_again_only_for_a_retry_order() {
    let (_tmp, state) = fresh();
    begin(&state, "1-run", false).unwrap();
    end(&state, "1-run", VersionOutcome::Failed);
    // Not a retry: refused as before.
    let e = begin(&state, "2-run", false).unwrap_err();
    assert!(
        matches!(e, BeginRunError::Record(RecordStartedError::NotNewer(_))),
        "{e}"
    );
    // A retry: accepted, counted (the step alongside, the run log entry,
    // is told which run of the version it is), recorded as started by the
    // new run.
    let mut attempt = 0;
    state
        .begin_run(
            &name("postfix"),
            &marker("2-run", AgentProcess::current().unwrap()),
            true,
            |_, n| {
                attempt = n;
                Ok::<(), &str>(())
            },
        )
        .unwrap();
    assert_eq!(attempt, 2);
    let record = state.version_record(&name("postfix")).unwrap().unwrap();
    assert_eq!(record.version, 7);
    assert_eq!(record.outcome, Some(VersionOutcome::Started));
    assert_eq!(record.attempts, Some(2));
    assert_eq!(record.run_id, Some(RunId::parse("2-run").unwrap()));
    // While it runs (no end recorded), a second retry is refused.
    let e = not_retryable(begin(&state, "3-run", true).unwrap_err());
    assert!(e.why.contains("no recorded end"), "{e}");
    end(&state, "2-run", VersionOutcome::Succeeded);
    let e = not_retryable(begin(&state, "3-run", true).unwrap_err());
    assert!(e.why.contains("succeeded"), "{e}");
}

#[test]
fn an_older_version_never_runs_retry_or_not() {
    let (_tmp, state) = fresh();
    begin(&state, "1-run", false).unwrap();
    end(&state, "1-run", VersionOutcome::Failed);
    let older = RunMarker {
        bundle: BundleRef {
            name: "postfix".into(),
            version: 6,
        },
        ..marker("2-run", AgentProcess::current().unwrap())
    };
    let e = state
        .begin_run(&name("postfix"), &older, true, |_, _| Ok::<(), &str>(()))
        .unwrap_err();
    assert!(
        matches!(e, BeginRunError::Record(RecordStartedError::NotNewer(_))),
        "{e}"
    );
    // A newer version is a first run, retry marker or not.
    let newer = RunMarker {
        bundle: BundleRef {
            name: "postfix".into(),
            version: 8,
        },
        ..marker("3-run", AgentProcess::current().unwrap())
    };
    state
        .begin_run(&name("postfix"), &newer, true, |_, _| Ok::<(), &str>(()))
        .unwrap();
    let record = state.version_record(&name("postfix")).unwrap().unwrap();
    assert_eq!((record.version, record.attempts), (8, Some(1)));
}

#[test]
fn denied_and_refused_runs_are_never_retried() {
    let (_tmp, state) = fresh();
    begin(&state, "1-run", false).unwrap();
    end(&state, "1-run", VersionOutcome::Denied);
    let e = not_retryable(begin(&state, "2-run", true).unwrap_err());
    assert!(e.why.contains("denial"), "{e}");
    assert_eq!(
        RecordStartedError::NotRetryable(e).refusal_kind(),
        RefusalKind::Rollback
    );
}

#[test]
fn outcomes_of_reports() {
    use rollguard_shared::report::{Denial, RunReport, RunStatus};
    let report = |status, denials: Option<Vec<Denial>>| RunReport {
        denial_count: denials.as_ref().map(|d| d.len() as u64),
        denials,
        ..RunReport::new("h", status)
    };
    let o = |r: &RunReport| VersionOutcome::of_report(r);
    assert_eq!(
        o(&report(RunStatus::Succeeded, Some(vec![]))),
        VersionOutcome::Succeeded
    );
    assert_eq!(
        o(&report(RunStatus::Failed, Some(vec![]))),
        VersionOutcome::Failed
    );
    assert_eq!(
        o(&report(RunStatus::TimedOut, Some(vec![]))),
        VersionOutcome::TimedOut
    );
    // Unknown denials are not zero, a killed run's included.
    assert_eq!(o(&report(RunStatus::Failed, None)), VersionOutcome::Denied);
    assert_eq!(o(&report(RunStatus::Killed, None)), VersionOutcome::Denied);
    assert_eq!(
        o(&report(RunStatus::Killed, Some(vec![]))),
        VersionOutcome::Killed
    );
    let mut denied = report(RunStatus::Failed, Some(vec![]));
    denied.denial_count = Some(1);
    assert_eq!(o(&denied), VersionOutcome::Denied);
    let mut limited = report(RunStatus::Failed, Some(vec![]));
    limited.limits_hit = vec!["memory".into()];
    assert_eq!(o(&limited), VersionOutcome::Denied);
    assert_eq!(
        o(&report(RunStatus::Refused, Some(vec![]))),
        VersionOutcome::Denied
    );
    for (outcome, retryable) in [
        (VersionOutcome::Started, false),
        (VersionOutcome::Succeeded, false),
        (VersionOutcome::Denied, false),
        (VersionOutcome::Failed, true),
        (VersionOutcome::TimedOut, true),
        (VersionOutcome::Killed, true),
        (VersionOutcome::Interrupted, true),
    ] {
        assert_eq!(outcome.is_retryable(), retryable, "{outcome:?}");
    }
}

#[test]
fn attempts_of_one_version_are_bounded() {
    let (_tmp, state) = fresh();
    begin(&state, "1-run", false).unwrap();
    end(&state, "1-run", VersionOutcome::Failed);
    for (attempt, id) in [(2, "2-run"), (3, "3-run")] {
        begin(&state, id, true).unwrap();
        assert_eq!(
            state
                .version_record(&name("postfix"))
                .unwrap()
                .unwrap()
                .attempts,
            Some(attempt)
        );
        end(&state, id, VersionOutcome::TimedOut);
    }
    let e = not_retryable(begin(&state, "4-run", true).unwrap_err());
    assert_eq!(MAX_ATTEMPTS, 3);
    assert!(e.why.contains("already ran 3 time(s)"), "{e}");
    // Durable: a reopened state directory says the same.
    let again = StateDir::open(state.root()).unwrap();
    let m = marker("4-run", AgentProcess::current().unwrap());
    assert!(again
        .begin_run(&name("postfix"), &m, true, |_, _| Ok::<(), &str>(()))
        .is_err());
}

#[test]
fn a_version_file_from_before_retries_reads_and_is_never_retried() {
    let (_tmp, state) = fresh();
    let path = state.root().join(VERSIONS_DIR).join("postfix");
    fs::write(&path, r#"{"version":7,"time":"2026-01-01T00:00:00Z"}"#).unwrap();
    let record = state.version_record(&name("postfix")).unwrap().unwrap();
    assert_eq!(
        (record.version, record.outcome, record.attempts),
        (7, None, None)
    );
    assert_eq!(state.last_version(&name("postfix")).unwrap(), Some(7));
    let e = not_retryable(begin(&state, "1-run", true).unwrap_err());
    assert!(e.why.contains("not recorded"), "{e}");
    // An outcome without a count is not trusted either.
    fs::write(
        &path,
        r#"{"version":7,"time":"2026-01-01T00:00:00Z","outcome":"failed"}"#,
    )
    .unwrap();
    assert!(begin(&state, "1-run", true).is_err());
    // Newer versions run as they always did.
    state.record_started(&name("postfix"), 8).unwrap();
    // Unknown fields and outcomes are corrupt, never guessed at.
    for bad in [
        r#"{"version":9,"time":"2026-01-01T00:00:00Z","outcome":"sort_of","attempts":1}"#,
        r#"{"version":9,"time":"2026-01-01T00:00:00Z","retries_left":9}"#,
    ] {
        fs::write(&path, bad).unwrap();
        assert!(matches!(
            state.version_record(&name("postfix")),
            Err(StateError::Corrupt { .. })
        ));
    }
}

#[test]
fn an_outcome_is_recorded_only_over_its_own_started_run() {
    let (_tmp, state) = fresh();
    let run = |id: &str| RunId::parse(id).unwrap();
    begin(&state, "1-run", false).unwrap();
    // Another run's, or another version's, outcome changes nothing.
    assert!(!state
        .record_outcome(&name("postfix"), 7, &run("9-other"), VersionOutcome::Failed)
        .unwrap());
    assert!(!state
        .record_outcome(&name("postfix"), 6, &run("1-run"), VersionOutcome::Failed)
        .unwrap());
    assert!(state
        .record_outcome(
            &name("postfix"),
            7,
            &run("1-run"),
            VersionOutcome::Succeeded
        )
        .unwrap());
    // Recorded once: a success is never turned into anything else
    // (recovery after a crash between the outcome and the log included).
    assert!(!state
        .record_outcome(
            &name("postfix"),
            7,
            &run("1-run"),
            VersionOutcome::Interrupted
        )
        .unwrap());
    assert_eq!(
        state
            .version_record(&name("postfix"))
            .unwrap()
            .unwrap()
            .outcome,
        Some(VersionOutcome::Succeeded)
    );
    // No bundle record at all: nothing written.
    assert!(!state
        .record_outcome(&name("other"), 1, &run("1-run"), VersionOutcome::Failed)
        .unwrap());
    assert!(state.version_record(&name("other")).unwrap().is_none());
}
