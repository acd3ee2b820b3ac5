//! The daemon's ordering, dedupe and kill logic with a fake executor (the
//! real runner is exercised end to end in `tests/tests/fleet_*.rs`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Condvar;

use super::*;
use crate::kill_switch::{now, store};
use rollguard_shared::protocol::{KillOrder, KillState};

/// Counts runs; a run named "block" waits until killed.
#[derive(Default)]
struct FakeExecutor {
    runs: AtomicUsize,
    started: Mutex<Vec<String>>,
    started_cv: Condvar,
}

impl FakeExecutor {
    fn wait_started(&self, id: &str) {
        let mut started = lock(&self.started);
        while !started.iter().any(|s| s == id) {
            started = self
                .started_cv
                .wait(started)
                .unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl BundleExecutor for FakeExecutor {
    fn run(
        &self,
        bundle: &std::path::Path,
        rollout_id: &RolloutId,
        _kind: crate::daemon::RunKind,
        kill: KillSignal,
    ) -> RunReport {
        assert!(bundle.exists(), "the bundle is downloaded before the run");
        self.runs.fetch_add(1, Ordering::SeqCst);
        let dead = Arc::new((Mutex::new(false), Condvar::new()));
        let d2 = dead.clone();
        kill.attach(Box::new(move || {
            *lock(&d2.0) = true;
            d2.1.notify_all();
        }));
        lock(&self.started).push(rollout_id.to_string());
        self.started_cv.notify_all();
        let mut report = base_report("web-1", RunStatus::Succeeded);
        report.denials = Some(vec![]);
        report.denial_count = Some(0);
        if rollout_id.as_str().starts_with("block") {
            let mut killed = lock(&dead.0);
            while !*killed {
                killed = dead.1.wait(killed).unwrap_or_else(|e| e.into_inner());
            }
            report.status = RunStatus::Killed;
        }
        report
    }
}

fn identity() -> HostIdentity {
    HostIdentity {
        name: "web-1".into(),
        labels: BTreeMap::new(),
    }
}

fn id(s: &str) -> RolloutId {
    RolloutId::parse(s).unwrap()
}

async fn fake_fetch(path: PathBuf) -> anyhow::Result<()> {
    std::fs::write(path, b"bundle")?;
    Ok(())
}

/// A real run order for `rollout`, whose bundle downloads at once.
async fn run_ordered(d: &Arc<Daemon>, rollout: &str) {
    d.clone()
        .run_order(
            id(rollout),
            Sha256Hex::of(b"bundle"),
            crate::daemon::RunKind::Real,
            fake_fetch,
        )
        .await;
}

/// The record of a run that has started (and not finished).
fn started(rollout: &str) -> HostRolloutRecord {
    HostRolloutRecord {
        rollout_id: id(rollout),
        bundle_sha256: Some(Sha256Hex::of(b"bundle")),
        phase: Phase::Started,
        report: None,
        acked: false,
    }
}

fn report_of(d: &Daemon, rollout: &str) -> Option<RunReport> {
    d.records.get(&id(rollout)).unwrap().and_then(|r| r.report)
}

#[tokio::test]
async fn each_rollout_runs_at_most_once() {
    let dir = tempfile::tempdir().unwrap();
    let exec = Arc::new(FakeExecutor::default());
    let d = Daemon::open(identity(), dir.path(), exec.clone()).unwrap();
    run_ordered(&d, "r-1").await;
    assert_eq!(report_of(&d, "r-1").unwrap().status, RunStatus::Succeeded);
    run_ordered(&d, "r-1").await;
    assert_eq!(
        exec.runs.load(Ordering::SeqCst),
        1,
        "a repeated order is answered from the record"
    );
    assert!(
        lock(&d.unacked).contains(&id("r-1")),
        "and its report is sent again"
    );
    assert!(
        !d.records.bundle_path(&id("r-1")).exists(),
        "the downloaded bundle is removed after the run"
    );
}

/// A second daemon on the same state directory is refused before it
/// touches anything: it would report the first one's running bundle
/// interrupted, delete its downloads, and could run an order twice.
#[test]
fn a_second_daemon_on_the_same_state_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let exec = Arc::new(FakeExecutor::default());
    let first = Daemon::open(identity(), dir.path(), exec.clone()).unwrap();
    let running = started("r-live");
    first.records.put(&running).unwrap();
    let second = Daemon::open(identity(), dir.path(), exec.clone());
    let err = format!("{:#}", second.err().expect("refused"));
    assert!(err.contains("another rollguard-agent serve"), "{err}");
    assert_eq!(
        first.records.get(&id("r-live")).unwrap().unwrap(),
        running,
        "the first daemon's run is left alone"
    );
    drop(first);
    Daemon::open(identity(), dir.path(), exec).expect("the next daemon starts");
}

/// A rollout record that cannot be read (a disk error, a hand edit) no
/// longer keeps the daemon from starting (and its kill switch socket from
/// answering). Whether the run happened is unknown: it is reported
/// interrupted, which halts the rollout, and never run; the record is kept
/// aside for the operator. The same holds for one found by a re-sent order.
#[tokio::test]
async fn an_unreadable_rollout_record_is_reported_interrupted_not_run() {
    let dir = tempfile::tempdir().unwrap();
    let exec = Arc::new(FakeExecutor::default());
    let rollouts = dir.path().join("daemon/rollouts");
    std::fs::create_dir_all(&rollouts).unwrap();
    std::fs::write(rollouts.join("r-3.json"), b"{\"rollout_id\": \"r-3\", garb").unwrap();
    let d = Daemon::open(identity(), dir.path(), exec.clone()).expect("the daemon starts");
    let check = |d: &Daemon, rollout: &str| {
        let r = report_of(d, rollout).unwrap();
        assert_eq!(r.status, RunStatus::Interrupted);
        assert!(r.is_alert(), "it halts the rollout");
        assert!(r.reason.unwrap().contains("could not be read"));
        assert!(rollouts.join(format!("{rollout}.json.corrupt")).exists());
        assert!(lock(&d.unacked).contains(&id(rollout)), "and is sent");
    };
    check(&d, "r-3");
    run_ordered(&d, "r-3").await;
    std::fs::write(rollouts.join("r-4.json"), b"\xff\xfe").unwrap();
    run_ordered(&d, "r-4").await;
    check(&d, "r-4");
    assert_eq!(exec.runs.load(Ordering::SeqCst), 0, "neither ran");
}

#[tokio::test]
async fn a_run_in_progress_at_restart_is_reported_interrupted_not_rerun() {
    let dir = tempfile::tempdir().unwrap();
    let exec = Arc::new(FakeExecutor::default());
    {
        let records = Records::open(dir.path()).unwrap();
        records.put(&started("r-7")).unwrap();
    }
    let d = Daemon::open(identity(), dir.path(), exec.clone()).unwrap();
    assert_eq!(report_of(&d, "r-7").unwrap().status, RunStatus::Interrupted);
    run_ordered(&d, "r-7").await;
    assert_eq!(exec.runs.load(Ordering::SeqCst), 0);
    assert!(
        report_of(&d, "r-7").unwrap().is_alert(),
        "an interrupted run halts the rollout"
    );
}

#[tokio::test]
async fn kill_state_kills_running_bundles_refuses_new_ones_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let exec = Arc::new(FakeExecutor::default());
    let d = Daemon::open(identity(), dir.path(), exec.clone()).unwrap();
    let sha = Sha256Hex::of(b"bundle");
    let running = tokio::spawn(d.clone().run_order(
        id("block-1"),
        sha.clone(),
        crate::daemon::RunKind::Real,
        fake_fetch,
    ));
    let e2 = exec.clone();
    tokio::task::spawn_blocking(move || e2.wait_started("block-1"))
        .await
        .unwrap();
    assert_eq!(d.kill_switch().running(), vec![id("block-1")]);

    let order = KillOrder {
        reason: "incident".into(),
        by: "admin".into(),
        at: now(),
    };
    let killed = d
        .kill_switch()
        .apply_fleet(KillState {
            generation: 1,
            all: Some(order),
            rollouts: vec![],
        })
        .unwrap();
    assert_eq!(killed, 1);
    running.await.unwrap();
    assert_eq!(report_of(&d, "block-1").unwrap().status, RunStatus::Killed);
    assert!(
        store::host_kill_in_force(&StateDir::open(dir.path()).unwrap())
            .unwrap()
            .is_some(),
        "a fleet-wide kill arms the runner's own kill switch"
    );

    run_ordered(&d, "r-2").await;
    let refused = report_of(&d, "r-2").unwrap();
    assert_eq!(
        (refused.status, refused.refusal),
        (RunStatus::Refused, Some(RefusalKind::KillSwitch))
    );
    assert_eq!(exec.runs.load(Ordering::SeqCst), 1);

    // Restarted during the kill: still refuses.
    drop(d);
    let d = Daemon::open(identity(), dir.path(), exec.clone()).unwrap();
    run_ordered(&d, "r-3").await;
    assert_eq!(report_of(&d, "r-3").unwrap().status, RunStatus::Refused);

    // Lifted by the controller: runs again, and the runner's switch is off.
    assert_eq!(
        d.kill_switch()
            .apply_fleet(KillState {
                generation: 2,
                all: None,
                rollouts: vec![]
            })
            .unwrap(),
        0
    );
    assert!(
        store::host_kill_in_force(&StateDir::open(dir.path()).unwrap())
            .unwrap()
            .is_none()
    );
    run_ordered(&d, "r-4").await;
    assert_eq!(report_of(&d, "r-4").unwrap().status, RunStatus::Succeeded);
}

#[tokio::test]
async fn local_kill_is_independent_of_the_fleet_state() {
    let dir = tempfile::tempdir().unwrap();
    let exec = Arc::new(FakeExecutor::default());
    let d = Daemon::open(identity(), dir.path(), exec.clone()).unwrap();
    let sha = Sha256Hex::of(b"bundle");
    let running = tokio::spawn(d.clone().run_order(
        id("block-2"),
        sha.clone(),
        crate::daemon::RunKind::Real,
        fake_fetch,
    ));
    let e2 = exec.clone();
    tokio::task::spawn_blocking(move || e2.wait_started("block-2"))
        .await
        .unwrap();

    let resp = d.handle(LocalRequest::Kill {
        reason: "controller down, stop".into(),
    });
    assert!(resp.ok, "{resp:?}");
    assert_eq!(resp.killed, 1);
    running.await.unwrap();
    // The controller lifting its (fleet) kill does not lift the local one.
    d.kill_switch()
        .apply_fleet(KillState {
            generation: 9,
            all: None,
            rollouts: vec![],
        })
        .unwrap();
    run_ordered(&d, "r-5").await;
    assert_eq!(report_of(&d, "r-5").unwrap().status, RunStatus::Refused);
    assert!(d.handle(LocalRequest::Lift).ok);
    run_ordered(&d, "r-6").await;
    assert_eq!(report_of(&d, "r-6").unwrap().status, RunStatus::Succeeded);
}

#[tokio::test]
async fn rollout_scoped_kill_spares_other_rollouts() {
    let dir = tempfile::tempdir().unwrap();
    let exec = Arc::new(FakeExecutor::default());
    let d = Daemon::open(identity(), dir.path(), exec.clone()).unwrap();
    let order = KillOrder {
        reason: "bad rollout".into(),
        by: "admin".into(),
        at: now(),
    };
    let state = KillState {
        generation: 1,
        all: None,
        rollouts: vec![rollguard_shared::protocol::RolloutKill {
            rollout_id: id("r-bad"),
            order,
        }],
    };
    d.kill_switch().apply_fleet(state).unwrap();
    assert!(
        store::host_kill_in_force(&StateDir::open(dir.path()).unwrap())
            .unwrap()
            .is_none(),
        "a rollout kill is not host-wide"
    );
    run_ordered(&d, "r-bad").await;
    run_ordered(&d, "r-good").await;
    assert_eq!(report_of(&d, "r-bad").unwrap().status, RunStatus::Refused);
    assert_eq!(
        report_of(&d, "r-good").unwrap().status,
        RunStatus::Succeeded
    );
}

#[tokio::test]
async fn a_wrong_bundle_from_the_controller_is_refused_not_run() {
    let dir = tempfile::tempdir().unwrap();
    let exec = Arc::new(FakeExecutor::default());
    let d = Daemon::open(identity(), dir.path(), exec.clone()).unwrap();
    let bad = |_path: PathBuf| async { Err::<(), _>(BadDownload("not the bundle".into()).into()) };
    d.clone()
        .run_order(
            id("r-8"),
            Sha256Hex::of(b"bundle"),
            crate::daemon::RunKind::Real,
            bad,
        )
        .await;
    let r = report_of(&d, "r-8").unwrap();
    assert_eq!(
        (r.status, r.refusal),
        (RunStatus::Refused, Some(RefusalKind::BadBundle))
    );
    assert_eq!(exec.runs.load(Ordering::SeqCst), 0);
    // A transient failure leaves no record: the re-sent order runs it.
    let flaky = |_path: PathBuf| async { Err::<(), _>(anyhow::anyhow!("connection reset")) };
    d.clone()
        .run_order(
            id("r-9"),
            Sha256Hex::of(b"bundle"),
            crate::daemon::RunKind::Real,
            flaky,
        )
        .await;
    assert!(d.records.get(&id("r-9")).unwrap().is_none());
    run_ordered(&d, "r-9").await;
    assert_eq!(report_of(&d, "r-9").unwrap().status, RunStatus::Succeeded);
}

/// A report larger than the controller accepts is cut before it is
/// recorded (and so before it is sent): the record holds what the
/// controller will take, and it is still an alert.
#[test]
fn a_report_too_large_for_the_controller_is_recorded_cut_to_fit() {
    let dir = tempfile::tempdir().unwrap();
    let exec = Arc::new(FakeExecutor::default());
    let d = Daemon::open(identity(), dir.path(), exec).unwrap();
    let mut report = base_report("web-01", RunStatus::Failed);
    report.denials = Some(
        (0..256)
            .map(|i| rollguard_shared::report::Denial {
                access: "fs.write_file".into(),
                path: Some(format!("{}{i}", "/a".repeat(2000))),
                exe: None,
            })
            .collect(),
    );
    report.denial_count = Some(256);
    assert!(report.json_len() > MAX_JSON_BODY);
    d.finish(&id("big-1"), &Sha256Hex::of(b"b"), report);
    let rec = d.records.get(&id("big-1")).unwrap().unwrap();
    let kept = rec.report.unwrap();
    assert!(kept.json_len() <= MAX_REPORT_BYTES);
    assert!(kept.is_alert());
    assert_eq!(kept.denial_count, Some(256));
}

/// A report whose record cannot be written (a full disk; here the record's
/// name is taken by a directory, so the write's rename fails) is sent from
/// memory, not held back until a restart turns it into `interrupted`.
#[test]
fn a_report_whose_record_cannot_be_written_is_still_sent() {
    let dir = tempfile::tempdir().unwrap();
    let exec = Arc::new(FakeExecutor::default());
    let d = Daemon::open(identity(), dir.path(), exec).unwrap();
    std::fs::create_dir(dir.path().join("daemon/rollouts/r-5.json")).unwrap();
    let mut report = base_report("web-1", RunStatus::Failed);
    report.exit_code = Some(3);
    d.finish(&id("r-5"), &Sha256Hex::of(b"b"), report);
    assert!(lock(&d.unacked).contains(&id("r-5")));
    let (sent, record) = d.report_to_send(&id("r-5")).expect("still sent");
    assert_eq!((sent.status, sent.exit_code), (RunStatus::Failed, Some(3)));
    assert!(record.is_none());
    // An order re-sent meanwhile finds no finished record and reports the
    // run interrupted: that must not replace the run's own report.
    d.finish(
        &id("r-5"),
        &Sha256Hex::of(b"b"),
        interrupted_report("web-1"),
    );
    let (sent, _) = d.report_to_send(&id("r-5")).unwrap();
    assert_eq!(sent.status, RunStatus::Failed);
}
