use std::time::Duration;

use rollguard_shared::manifest::{PayloadFile, PayloadPath, SourceManifest};
use rollguard_shared::protocol::{KillOrder, KillScope, Order, RolloutStatus};
use rollguard_shared::report::{Denial, RunReport, RunStatus};

use super::*;
use crate::hub::Registration;
use crate::store::sqlite::SqliteStore;

const SOURCE: &str = r#"
[bundle]
name = "fix-web"
version = 3
expires = 2099-12-31T00:00:00Z

[targets]
hosts = ["web-*"]

[scope]
write = ["/srv/www/"]

[run]
command = ["./apply.sh"]
timeout = "TIMEOUT"
"#;

fn manifest_bytes(timeout: &str) -> Vec<u8> {
    let file = PayloadFile {
        path: PayloadPath::parse("apply.sh").unwrap(),
        size: 1,
        mode: 0o755,
        sha256: [1; 32],
    };
    SourceManifest::render_built(&SOURCE.replace("TIMEOUT", timeout), &[file]).into_bytes()
}

struct EngineFleet {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    engine: Arc<Engine>,
    agents: BTreeMap<String, Registration>,
    sha: Sha256Hex,
}

async fn fleet(hosts: &[&str], timeout: &str, margin: Duration) -> EngineFleet {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let engine = engine_on(&path, margin).await;
    let sha = Sha256Hex::of(b"bundle");
    let meta = BundleMeta {
        sha256: sha.clone(),
        name: "fix-web".into(),
        version: 3,
        size: 6,
        manifest: manifest_bytes(timeout),
        signers: vec!["alice".into()],
    };
    engine.store.put_bundle(&meta, b"bundle").await.unwrap();
    let mut agents = BTreeMap::new();
    for h in hosts {
        engine.register_agent(h, &BTreeMap::new()).await.unwrap();
        agents.insert(h.to_string(), engine.hub.connect(h, BTreeMap::new()));
    }
    EngineFleet {
        _dir: dir,
        path,
        engine,
        agents,
        sha,
    }
}

async fn engine_on(path: &std::path::Path, margin: Duration) -> Arc<Engine> {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(path).await.unwrap());
    Engine::new(
        store,
        crate::cluster::Cluster::alone(),
        Hub::new(),
        Arc::new(Metrics::new()),
        margin,
        Duration::from_millis(200),
        None,
        crate::notify::Notifier::default(),
    )
}

fn request(sha: &Sha256Hex, waves: &str, max_failures: u32) -> RolloutRequest {
    RolloutRequest {
        bundle_sha256: sha.clone(),
        waves: WaveSize::parse_list(waves).unwrap(),
        bake_secs: 0,
        max_failures,
        canaries: vec![],
        halt_on: Default::default(),
        all_at_once: false,
        limit: vec![],
        exclude: vec![],
        include_offline: false,
        preview: false,
        after_preview: None,
        override_reason: None,
    }
}

fn report(host: &str, status: RunStatus) -> RunReport {
    RunReport {
        exit_code: Some(if status == RunStatus::Succeeded { 0 } else { 1 }),
        denials: Some(vec![]),
        denial_count: Some(0),
        duration_ms: 5,
        signers: vec!["alice".into()],
        ..RunReport::new(host, status)
    }
}

/// Orders queued for `host` right now (without waiting).
fn drain(f: &mut EngineFleet, host: &str) -> Vec<Order> {
    let reg = f.agents.get_mut(host).unwrap();
    let mut out = Vec::new();
    while let Ok(line) = reg.rx.try_recv() {
        out.push(serde_json::from_slice(&line).unwrap());
    }
    out
}

/// Wait for the next order to `host` (the engine sends just after it
/// records the dispatch), then take whatever else is queued.
async fn next_orders(f: &mut EngineFleet, host: &str) -> Vec<Order> {
    let reg = f.agents.get_mut(host).unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), reg.rx.recv())
        .await
        .expect("an order within 10s")
        .expect("stream open");
    let mut out = vec![serde_json::from_slice(&first).unwrap()];
    out.extend(drain(f, host));
    out
}

fn runs(orders: &[Order]) -> usize {
    orders
        .iter()
        .filter(|o| matches!(o, Order::Run { .. }))
        .count()
}

/// Poll the rollout until `pred` holds (the engine runs in its own task).
async fn wait_status(
    engine: &Engine,
    id: &RolloutId,
    pred: impl Fn(&RolloutStatus) -> bool,
) -> RolloutStatus {
    for _ in 0..500 {
        let s = engine.status(id).await.unwrap();
        if pred(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "rollout {id} never reached the expected state: {:#?}",
        engine.status(id).await.unwrap()
    );
}

fn host_state<'a>(s: &'a RolloutStatus, host: &str) -> &'a str {
    &s.hosts.iter().find(|h| h.host == host).unwrap().state
}

/// A rollout of `waves` (no failure allowed), started and its first wave
/// dispatched to web-1.
async fn start_first_wave(f: &EngineFleet, waves: &str) -> RolloutId {
    let id = f
        .engine
        .start(&request(&f.sha, waves, 0), "admin")
        .await
        .unwrap()
        .id;
    wait_status(&f.engine, &id, |s| host_state(s, "web-1") == "dispatched").await;
    id
}

/// A kill order as an on-call operator would give it.
fn oncall_kill() -> KillOrder {
    KillOrder {
        reason: "incident".into(),
        by: "oncall".into(),
        at: "2026-12-08T00:00:00Z".into(),
    }
}

/// A connection of the test's own to the engine's SQLite file, to make the
/// database fail for real (a trigger, a renamed table).
async fn database_file(f: &EngineFleet) -> sqlx::sqlite::SqliteConnection {
    use sqlx::Connection;
    sqlx::sqlite::SqliteConnection::connect(&format!("sqlite://{}", f.path.display()))
        .await
        .unwrap()
}

async fn succeed(f: &EngineFleet, id: &RolloutId, host: &str) {
    let r = AgentReport {
        rollout_id: id.clone(),
        report: report(host, RunStatus::Succeeded),
    };
    f.engine.ingest_report(host, r).await.unwrap();
}

#[test]
fn waves_are_cumulative_canaries_first() {
    let hosts: Vec<String> = ["e", "b", "a", "d", "c", "f"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let w = compute_waves(
        hosts.clone(),
        &[],
        &WaveSize::parse_list("1,2,100%").unwrap(),
    )
    .unwrap();
    assert_eq!(w, vec![vec!["a"], vec!["b"], vec!["c", "d", "e", "f"]]);
    let w = compute_waves(
        hosts.clone(),
        &["d".into()],
        &WaveSize::parse_list("1,50%,100%").unwrap(),
    )
    .unwrap();
    assert_eq!(w, vec![vec!["d"], vec!["a", "b"], vec!["c", "e", "f"]]);
    // 1% of 6 is one host, the same as wave 1: that empty wave is dropped.
    let w = compute_waves(
        hosts.clone(),
        &[],
        &WaveSize::parse_list("1,1%,100%").unwrap(),
    )
    .unwrap();
    assert_eq!(w.len(), 2);
    assert!(compute_waves(hosts.clone(), &["zz".into()], &[WaveSize::Percent(100)]).is_err());
    // Waves that stop short leave the rest out; nothing is added silently.
    let w = compute_waves(hosts, &[], &WaveSize::parse_list("2").unwrap()).unwrap();
    assert_eq!(w, vec![vec!["a", "b"]]);
}

#[tokio::test]
async fn good_rollout_goes_wave_by_wave_and_skips_out_of_scope_hosts() {
    let mut f = fleet(
        &["web-1", "web-2", "web-3", "web-4", "db-1"],
        "1m",
        Duration::from_secs(60),
    )
    .await;
    let (plan, _) = f
        .engine
        .plan(&request(&f.sha, "1,2,100%", 0))
        .await
        .unwrap();
    assert_eq!(
        plan.waves,
        vec![vec!["web-1"], vec!["web-2"], vec!["web-3", "web-4"]]
    );
    assert_eq!(plan.out_of_scope, 1);
    assert_eq!(plan.signers, vec!["alice"]);

    let st = f
        .engine
        .start(&request(&f.sha, "1,2,100%", 0), "admin")
        .await
        .unwrap();
    let id = st.id.clone();
    wait_status(&f.engine, &id, |s| host_state(s, "web-1") == "dispatched").await;
    assert_eq!(runs(&next_orders(&mut f, "web-1").await), 1);
    assert_eq!(runs(&drain(&mut f, "web-2")), 0, "wave 2 waits for wave 1");
    succeed(&f, &id, "web-1").await;
    wait_status(&f.engine, &id, |s| host_state(s, "web-2") == "dispatched").await;
    assert_eq!(runs(&drain(&mut f, "web-3")), 0);
    succeed(&f, &id, "web-2").await;
    wait_status(&f.engine, &id, |s| host_state(s, "web-4") == "dispatched").await;
    succeed(&f, &id, "web-3").await;
    succeed(&f, &id, "web-4").await;
    let s = wait_status(&f.engine, &id, |s| s.state == RolloutState::Completed).await;
    assert!(s.hosts.iter().all(|h| h.state == "succeeded"));
    assert_eq!(
        runs(&drain(&mut f, "db-1")),
        0,
        "out-of-scope host never gets the bundle"
    );
    // A duplicate report (agent re-sent after reconnect) changes nothing.
    succeed(&f, &id, "web-1").await;
    // A report for a host never dispatched is refused.
    let stray = AgentReport {
        rollout_id: id.clone(),
        report: report("db-1", RunStatus::Succeeded),
    };
    assert!(matches!(
        f.engine.ingest_report("db-1", stray).await,
        Err(EngineError::NotFound(_))
    ));
    // A host cannot report for another.
    let forged = AgentReport {
        rollout_id: id.clone(),
        report: report("web-2", RunStatus::Failed),
    };
    assert!(matches!(
        f.engine.ingest_report("web-1", forged).await,
        Err(EngineError::Forbidden(_))
    ));
}

#[tokio::test]
async fn everything_at_once_needs_an_explicit_flag() {
    let f = fleet(&["web-1", "web-2"], "1m", Duration::from_secs(60)).await;
    let mut req = request(&f.sha, "100%", 0);
    let err = f.engine.plan(&req).await.unwrap_err();
    assert!(
        matches!(&err, EngineError::BadRequest(m) if m.contains("no canary")),
        "{err}"
    );
    req.all_at_once = true;
    assert_eq!(f.engine.plan(&req).await.unwrap().0.waves.len(), 1);
    // A single in-scope host is its own canary.
    let one = fleet(&["web-1"], "1m", Duration::from_secs(60)).await;
    assert!(one.engine.plan(&request(&one.sha, "100%", 0)).await.is_ok());
}

#[tokio::test]
async fn a_denial_on_the_canary_halts_before_wave_two() {
    let mut f = fleet(&["web-1", "web-2", "web-3"], "1m", Duration::from_secs(60)).await;
    let mut req = request(&f.sha, "1,100%", 5);
    req.canaries = vec!["web-3".into()];
    let id = f.engine.start(&req, "admin").await.unwrap().id;
    wait_status(&f.engine, &id, |s| host_state(s, "web-3") == "dispatched").await;
    let mut r = report("web-3", RunStatus::Succeeded);
    r.denials = Some(vec![Denial {
        access: "fs.remove_file".into(),
        path: Some("/backup/x".into()),
        exe: None,
    }]);
    r.denial_count = Some(1);
    f.engine
        .ingest_report(
            "web-3",
            AgentReport {
                rollout_id: id.clone(),
                report: r,
            },
        )
        .await
        .unwrap();
    let s = wait_status(&f.engine, &id, |s| s.state == RolloutState::Halted).await;
    let reason = s.halt_reason.unwrap();
    assert!(
        reason.contains("web-3") && reason.contains("/backup/x"),
        "{reason}"
    );
    assert_eq!(
        runs(&drain(&mut f, "web-1")) + runs(&drain(&mut f, "web-2")),
        0
    );
    assert_eq!(
        host_state(&f.engine.status(&id).await.unwrap(), "web-1"),
        "pending"
    );
    // The halt is audited.
    let audit = f.engine.store.operator_log_entries().await.unwrap();
    assert!(audit.iter().any(|e| e.action == "rollout.halted"));
}

#[tokio::test]
async fn failures_beyond_the_threshold_halt_and_resume_continues() {
    let mut f = fleet(
        &["web-1", "web-2", "web-3", "web-4"],
        "1m",
        Duration::from_secs(60),
    )
    .await;
    let id = f
        .engine
        .start(&request(&f.sha, "2,100%", 0), "admin")
        .await
        .unwrap()
        .id;
    wait_status(&f.engine, &id, |s| host_state(s, "web-2") == "dispatched").await;
    succeed(&f, &id, "web-1").await;
    let failed = AgentReport {
        rollout_id: id.clone(),
        report: report("web-2", RunStatus::Failed),
    };
    f.engine.ingest_report("web-2", failed).await.unwrap();
    let s = wait_status(&f.engine, &id, |s| s.state == RolloutState::Halted).await;
    assert!(s.halt_reason.unwrap().contains("max-failures"));
    assert_eq!(runs(&drain(&mut f, "web-3")), 0);
    assert!(matches!(
        f.engine
            .resume(&RolloutId::parse("r-none").unwrap(), None, "admin")
            .await,
        Err(EngineError::NotFound(_))
    ));
    f.engine.resume(&id, None, "admin").await.unwrap();
    wait_status(&f.engine, &id, |s| host_state(s, "web-4") == "dispatched").await;
    assert_eq!(runs(&next_orders(&mut f, "web-3").await), 1);
    succeed(&f, &id, "web-3").await;
    succeed(&f, &id, "web-4").await;
    wait_status(&f.engine, &id, |s| s.state == RolloutState::Completed).await;
    assert!(matches!(
        f.engine.resume(&id, None, "admin").await,
        Err(EngineError::Conflict(_))
    ));
}

#[tokio::test]
async fn a_host_that_never_answers_times_out_and_halts() {
    let f = fleet(&["web-1", "web-2"], "1s", Duration::ZERO).await;
    let id = f
        .engine
        .start(&request(&f.sha, "1,100%", 10), "admin")
        .await
        .unwrap()
        .id;
    let s = wait_status(&f.engine, &id, |s| s.state == RolloutState::Halted).await;
    assert_eq!(host_state(&s, "web-1"), "timed_out");
    assert_eq!(host_state(&s, "web-2"), "pending");
}

/// A timeout counts for good. An operator who resumed past a host's
/// timeout acknowledged one alarm; that host's late report must not take
/// the count back, or the next host's denial would be absorbed by the
/// acknowledgement and halt nothing. A late denial is an alarm of its own.
#[test]
fn a_late_report_never_takes_back_the_timeout_it_followed() {
    let id = RolloutId::parse("r-1").unwrap();
    let at = |host: &str, outcome: Outcome, reported_late: bool| DispatchRecord {
        rollout_id: id.clone(),
        host: host.into(),
        wave: 0,
        dispatched_at: 0,
        outcome,
        reported_late,
    };
    let reported = |host: &str, status| Outcome::Reported(Box::new(report(host, status)));
    let timed_out = [at("web-1", Outcome::TimedOut, false)];
    let acked = tally(&timed_out);
    assert_eq!(
        acked,
        Tally {
            failures: 1,
            alarms: 1
        }
    );
    let late_success = at("web-1", reported("web-1", RunStatus::Succeeded), true);
    assert_eq!(tally(std::slice::from_ref(&late_success)), acked);
    let mut denied = report("web-2", RunStatus::Failed);
    denied.denials = Some(vec![Denial {
        access: "fs.remove".into(),
        path: Some("/var/backups".into()),
        exe: None,
    }]);
    denied.denial_count = Some(1);
    let then_a_denial = [
        late_success,
        at("web-2", Outcome::Reported(Box::new(denied.clone())), false),
    ];
    assert!(
        tally(&then_a_denial).alarms > acked.alarms,
        "the next denial halts after a resume"
    );
    denied.host = "web-1".into();
    let late_denial = at("web-1", Outcome::Reported(Box::new(denied)), true);
    assert_eq!(
        tally(&[late_denial]),
        Tally {
            failures: 1,
            alarms: 2
        },
        "a late denial is an alarm beside the timeout, the host one failure"
    );
}

#[tokio::test]
async fn restart_resumes_from_the_database_without_rerunning() {
    let mut f = fleet(&["web-1", "web-2", "web-3"], "1m", Duration::from_secs(60)).await;
    let id = start_first_wave(&f, "1,100%").await;
    assert_eq!(runs(&next_orders(&mut f, "web-1").await), 1);
    // "Crash": a second engine on the same database takes over (the first
    // one's task keeps running in this test, which is harmless: every step
    // is a conditional update).
    let engine2 = engine_on(&f.path, Duration::from_secs(60)).await;
    let greeting = engine2.greeting("web-1").await.unwrap();
    assert_eq!(runs(&greeting), 1, "the owed order is re-sent on reconnect");
    engine2.became_leader().await;
    let r = AgentReport {
        rollout_id: id.clone(),
        report: report("web-1", RunStatus::Succeeded),
    };
    engine2.ingest_report("web-1", r).await.unwrap();
    let s = wait_status(&engine2, &id, |s| host_state(s, "web-3") == "dispatched").await;
    assert_eq!(host_state(&s, "web-1"), "succeeded");
    assert_eq!(
        runs(&engine2.greeting("web-1").await.unwrap()),
        0,
        "a host that reported is never owed again"
    );
    assert_eq!(runs(&engine2.greeting("web-2").await.unwrap()), 1);
}

/// A new leader whose first read of the running rollouts fails (its
/// database busy with a fleet reconnecting) reads again until it can,
/// instead of driving nothing for as long as it leads. The failure is a
/// real one: the table is renamed away on the SQLite file meanwhile.
#[tokio::test]
async fn a_leader_whose_first_read_fails_drives_the_rollouts_once_it_can() {
    let mut f = fleet(&["web-1", "web-2", "web-3"], "1m", Duration::from_secs(60)).await;
    let id = start_first_wave(&f, "1,100%").await;
    assert_eq!(runs(&next_orders(&mut f, "web-1").await), 1);
    f.engine.stepped_down();
    let mut db = database_file(&f).await;
    let rename = |from: &str, to: &str| format!("ALTER TABLE {from} RENAME TO {to}");
    sqlx::query(&rename("rollouts", "rollouts_away"))
        .execute(&mut db)
        .await
        .unwrap();
    let engine2 = engine_on(&f.path, Duration::from_secs(60)).await;
    let taking_over = tokio::spawn({
        let e = engine2.clone();
        async move { e.became_leader().await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    sqlx::query(&rename("rollouts_away", "rollouts"))
        .execute(&mut db)
        .await
        .unwrap();
    taking_over.await.unwrap();
    let r = AgentReport {
        rollout_id: id.clone(),
        report: report("web-1", RunStatus::Succeeded),
    };
    engine2.ingest_report("web-1", r).await.unwrap();
    wait_status(&engine2, &id, |s| host_state(s, "web-3") == "dispatched").await;
}

/// Two replicas on one database: what one remembers of an agent's labels
/// is dropped when the other says it wrote them, so labels set back to
/// what the first saw last are written, not skipped as unchanged.
#[tokio::test]
async fn a_replica_forgets_an_agent_another_replica_wrote() {
    let f = fleet(&["web-1"], "1m", Duration::from_secs(60)).await;
    let (a, b) = (
        f.engine.clone(),
        engine_on(&f.path, Duration::from_secs(60)).await,
    );
    let labels = |v: &str| BTreeMap::from([("role".to_string(), v.to_string())]);
    let stored = |e: Arc<Engine>| async move {
        let all = e.store.list_agents().await.unwrap();
        all.into_iter().find(|x| x.name == "web-1").unwrap().labels
    };
    a.register_agent("web-1", &labels("one")).await.unwrap();
    b.register_agent("web-1", &labels("two")).await.unwrap();
    // What b published, as a's listener receives it.
    a.on_event(
        7,
        ClusterEvent::Agent {
            name: "web-1".into(),
        },
    )
    .await;
    a.register_agent("web-1", &labels("one")).await.unwrap();
    assert_eq!(stored(a.clone()).await, labels("one"));
}

fn previews(orders: &[Order]) -> usize {
    orders
        .iter()
        .filter(|o| matches!(o, Order::Preview { .. }))
        .count()
}

/// A preview rollout sends `Order::Preview`, never `Order::Run`: in its one
/// wave, in the greeting of a reconnecting agent, and from a second engine
/// on the same database; a denial does not halt it.
#[tokio::test]
async fn a_preview_is_only_ever_sent_as_a_preview_and_never_halts() {
    let mut f = fleet(&["web-1", "web-2", "web-3"], "1m", Duration::from_secs(60)).await;
    let req = RolloutRequest {
        preview: true,
        ..request(&f.sha, "1,100%", 0)
    };
    let id = f.engine.start(&req, "admin").await.unwrap().id;
    let s = wait_status(&f.engine, &id, |s| {
        s.hosts.iter().all(|h| h.state == "dispatched")
    })
    .await;
    assert_eq!(s.plan.waves.len(), 1, "one wave: {s:#?}");
    for h in ["web-1", "web-2", "web-3"] {
        let orders = next_orders(&mut f, h).await;
        assert_eq!(
            (previews(&orders), runs(&orders)),
            (1, 0),
            "{h}: {orders:?}"
        );
    }
    let engine2 = engine_on(&f.path, Duration::from_secs(60)).await;
    for e in [&f.engine, &engine2] {
        let greeting = e.greeting("web-2").await.unwrap();
        assert_eq!(
            (previews(&greeting), runs(&greeting)),
            (1, 0),
            "{greeting:?}"
        );
    }
    let mut denied = report("web-1", RunStatus::Succeeded);
    denied.denials = Some(vec![rollguard_shared::report::Denial {
        access: "erofs.unlinkat".into(),
        path: Some("/home/customers".into()),
        exe: None,
    }]);
    denied.denial_count = Some(1);
    f.engine
        .ingest_report(
            "web-1",
            AgentReport {
                rollout_id: id.clone(),
                report: denied,
            },
        )
        .await
        .unwrap();
    succeed(&f, &id, "web-2").await;
    succeed(&f, &id, "web-3").await;
    let s = wait_status(&f.engine, &id, |s| s.state != RolloutState::Running).await;
    assert_eq!(s.state, RolloutState::Completed, "{s:#?}");
    // ... and a real rollout may not follow it without a reason.
    let follow = RolloutRequest {
        after_preview: Some(id.clone()),
        ..request(&f.sha, "1,100%", 0)
    };
    let refused = f.engine.start(&follow, "admin").await.unwrap_err();
    assert!(refused.to_string().contains("web-1"), "{refused}");
}

/// Out-of-range numbers from a request are refused, not wrapped: a bake of
/// u64::MAX seconds would have overflowed into the past and skipped the
/// bake altogether.
#[tokio::test]
async fn a_bake_beyond_thirty_days_is_refused() {
    let f = fleet(&["web-1", "web-2"], "1m", Duration::from_secs(60)).await;
    let mut req = request(&f.sha, "1,100%", 0);
    req.bake_secs = u64::MAX;
    let e = f.engine.start(&req, "admin").await.unwrap_err();
    assert!(matches!(e, EngineError::BadRequest(_)), "{e}");
    req.bake_secs = MAX_BAKE_SECS;
    f.engine.start(&req, "admin").await.unwrap();
}

/// A kill that commits while a rollout is being resumed (after resume's
/// own check, before its write) lists the running rollouts too early to
/// see it; the check after the write finds the kill and halts the rollout
/// before its task dispatches anything. The interleaving is played here
/// step by step: the store's state as it is just after such a write.
#[tokio::test]
async fn a_rollout_made_running_under_a_kill_is_halted_before_it_dispatches() {
    let mut f = fleet(&["web-1", "web-2"], "1m", Duration::from_secs(60)).await;
    let id = start_first_wave(&f, "1,100%").await;
    drain(&mut f, "web-1");
    let order = oncall_kill();
    f.engine
        .store
        .add_kill(&KillScope::All, &order)
        .await
        .unwrap();
    let e = f.engine.halt_if_killed_meanwhile(&id).await.unwrap_err();
    assert!(matches!(e, EngineError::Conflict(_)), "{e}");
    let s = f.engine.status(&id).await.unwrap();
    assert_eq!(s.state, RolloutState::Halted);
    assert!(s.halt_reason.unwrap().contains("kill switch by oncall"));
    assert_eq!(runs(&drain(&mut f, "web-2")), 0);
}

/// The rollout's task checks the kill state before every wave, whatever
/// made the rollout running: here a kill stored without the kill call's
/// halts (as one that missed the rollout would be) stops the next wave.
#[tokio::test]
async fn no_wave_is_dispatched_under_a_kill() {
    let mut f = fleet(&["web-1", "web-2"], "1m", Duration::from_secs(60)).await;
    let id = start_first_wave(&f, "1,100%").await;
    drain(&mut f, "web-1");
    let order = oncall_kill();
    f.engine
        .store
        .add_kill(&KillScope::Rollout(id.clone()), &order)
        .await
        .unwrap();
    succeed(&f, &id, "web-1").await;
    let s = wait_status(&f.engine, &id, |s| s.state == RolloutState::Halted).await;
    assert_eq!(host_state(&s, "web-2"), "pending");
    assert!(s.halt_reason.unwrap().contains("kill switch by oncall"));
    assert_eq!(runs(&drain(&mut f, "web-2")), 0);
}

/// A host enrolled here that never connected has no inventory row; its
/// removal still revokes what was issued to it (before, "no registered
/// agent" and nothing revoked). A name with neither is still unknown.
#[tokio::test]
async fn removing_a_name_that_never_connected_revokes_what_it_was_issued() {
    let f = fleet(&["web-1"], "1m", Duration::from_secs(60)).await;
    f.engine
        .store
        .record_issued_cert("0abc", "ghost", i64::MAX)
        .await
        .unwrap();
    let removed = f.engine.remove_agent("ghost", "admin").await.unwrap();
    assert_eq!(removed.revoked_serials, vec!["0abc".to_string()]);
    assert!(f
        .engine
        .store
        .revoked_serials()
        .await
        .unwrap()
        .contains(&"0abc".to_string()));
    assert!(matches!(
        f.engine.remove_agent("nobody", "admin").await,
        Err(EngineError::NotFound(_))
    ));
}

/// Once a kill is stored it reaches the agents, whatever fails after: here
/// the database refuses to mark the rollout halted (a trigger, on the real
/// SQLite file). The answer says so; the agents get the kill all the same.
#[tokio::test]
async fn a_kill_reaches_the_agents_even_when_its_halts_fail() {
    let mut f = fleet(&["web-1"], "1m", Duration::from_secs(60)).await;
    let id = start_first_wave(&f, "100%").await;
    drain(&mut f, "web-1");
    let mut db = database_file(&f).await;
    sqlx::query(
        "CREATE TRIGGER no_halt BEFORE UPDATE ON rollouts WHEN NEW.state = 'halted'
         BEGIN SELECT RAISE(ABORT, 'the disk is failing'); END",
    )
    .execute(&mut db)
    .await
    .unwrap();
    let resp = f
        .engine
        .kill(KillScope::All, "stop everything", "admin")
        .await
        .expect("a stored kill is answered, not an error");
    assert!(resp.state.all.is_some());
    assert!(resp.halted_rollouts.is_empty());
    assert_eq!(resp.halt_errors.len(), 1, "{:?}", resp.halt_errors);
    assert!(resp.halt_errors[0].contains(id.as_str()));
    assert!(drain(&mut f, "web-1")
        .iter()
        .any(|o| matches!(o, Order::KillState(k) if k.all.is_some())));
}

#[tokio::test]
async fn kill_halts_rollouts_pushes_state_and_blocks_resume_until_lifted() {
    let mut f = fleet(&["web-1", "web-2"], "1m", Duration::from_secs(60)).await;
    let id = start_first_wave(&f, "1,100%").await;
    drain(&mut f, "web-1");
    let engine = f.engine.clone();
    let acker = tokio::spawn({
        let engine = engine.clone();
        async move {
            // Agents acknowledge once they have applied the kill state.
            for _ in 0..100 {
                let st = engine.store.kill_state().await.unwrap();
                if st.generation > 0 {
                    engine.hub.record_kill_ack("web-1", st.generation);
                    engine.hub.record_kill_ack("web-2", st.generation);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let resp = f
        .engine
        .kill(KillScope::All, "stop everything", "admin")
        .await
        .unwrap();
    acker.await.unwrap();
    assert_eq!(resp.halted_rollouts, vec![id.clone()]);
    assert_eq!(resp.agents_sent, 2);
    assert!(resp.state.all.is_some());
    let orders = drain(&mut f, "web-2");
    assert!(orders
        .iter()
        .any(|o| matches!(o, Order::KillState(k) if k.all.is_some())));
    assert!(matches!(
        f.engine.resume(&id, None, "admin").await,
        Err(EngineError::Conflict(_))
    ));
    assert!(matches!(
        f.engine.kill(KillScope::All, " ", "admin").await,
        Err(EngineError::BadRequest(_))
    ));
    assert!(
        matches!(
            f.engine.start(&request(&f.sha, "100%", 0), "admin").await,
            Err(EngineError::Conflict(_))
        ),
        "no new rollout while a fleet-wide kill is in force"
    );
    // Greeting of a (re)connecting agent carries the kill state first.
    assert!(
        matches!(&f.engine.greeting("web-2").await.unwrap()[0], Order::KillState(k) if k.all.is_some())
    );
    let lifted = f.engine.lift(None, "admin").await.unwrap();
    assert!(lifted.state.is_empty());
    f.engine.resume(&id, None, "admin").await.unwrap();
    let actions: Vec<String> = f
        .engine
        .store
        .operator_log_entries()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.action)
        .collect();
    for a in ["rollout.start", "kill", "kill.lift", "rollout.resume"] {
        assert!(
            actions.iter().any(|x| x == a),
            "{a} not audited: {actions:?}"
        );
    }
}

#[tokio::test]
async fn matching_alerts_halt_running_rollouts() {
    let f = fleet(&["web-1", "web-2"], "1m", Duration::from_secs(60)).await;
    let mut req = request(&f.sha, "1,100%", 0);
    req.halt_on = Matchers::parse("service=mail").unwrap();
    let mail = f.engine.start(&req, "admin").await.unwrap().id;
    let default = f
        .engine
        .start(&request(&f.sha, "1,100%", 0), "admin")
        .await
        .unwrap()
        .id;
    let payload = |labels: &str| {
        AlertmanagerPayload::parse(
            format!(r#"{{"version":"4","status":"firing","alerts":[{{"status":"firing","labels":{labels}}}]}}"#).as_bytes(),
        )
        .unwrap()
    };
    let r = f
        .engine
        .alert(&payload(r#"{"alertname":"X","severity":"warning"}"#), "am")
        .await
        .unwrap();
    assert!(r.halted_rollouts.is_empty());
    let r = f
        .engine
        .alert(&payload(r#"{"alertname":"X","severity":"critical"}"#), "am")
        .await
        .unwrap();
    assert_eq!(r.halted_rollouts, vec![default.clone()]);
    let r = f
        .engine
        .alert(&payload(r#"{"alertname":"Q","service":"mail"}"#), "am")
        .await
        .unwrap();
    assert_eq!(r.halted_rollouts, vec![mail.clone()]);
    let s = f.engine.status(&mail).await.unwrap();
    assert!(s.halt_reason.unwrap().contains("alert Q fired"));
}

/// A service request the host's `[services] allow` refused halts the
/// rollout, however many failures it tolerates: it is an alarm, not a
/// failure (the agent lists it as a denial too; this holds without).
#[tokio::test]
async fn a_denied_service_request_halts() {
    let mut f = fleet(&["web-1", "web-2"], "1m", Duration::from_secs(60)).await;
    let mut req = request(&f.sha, "1,100%", 5);
    req.canaries = vec!["web-1".into()];
    let id = f.engine.start(&req, "admin").await.unwrap().id;
    wait_status(&f.engine, &id, |s| host_state(s, "web-1") == "dispatched").await;
    let mut r = report("web-1", RunStatus::Failed);
    r.services_captured = vec![rollguard_shared::services::CapturedRequest {
        unit: "sshd.service".into(),
        verb: "restart".into(),
        via: "systemctl".into(),
        disposition: "denied".into(),
    }];
    f.engine
        .ingest_report(
            "web-1",
            AgentReport {
                rollout_id: id.clone(),
                report: r,
            },
        )
        .await
        .unwrap();
    let s = wait_status(&f.engine, &id, |s| s.state == RolloutState::Halted).await;
    let reason = s.halt_reason.unwrap();
    assert!(reason.contains("sshd.service"), "{reason}");
    assert_eq!(runs(&drain(&mut f, "web-2")), 0);
}

#[test]
fn the_plan_shows_the_scope_derived_from_the_packages_apart() {
    use rollguard_shared::manifest::packages::PackageToken;
    use rollguard_shared::manifest::{Derivation, DerivedPackage, PackageKind};
    use rollguard_shared::ScopePath;
    let source = SOURCE
        .replace("TIMEOUT", "5m")
        .replace("[run]", "[packages]\ninstall = [\"a_2_all.deb\"]\n\n[run]");
    let deb = PayloadFile {
        path: PayloadPath::parse("a_2_all.deb").unwrap(),
        size: 1,
        mode: 0o644,
        sha256: [2; 32],
    };
    let apply = PayloadFile {
        path: PayloadPath::parse("apply.sh").unwrap(),
        size: 1,
        mode: 0o755,
        sha256: [1; 32],
    };
    let derived = Derivation {
        kind: PackageKind::Deb,
        packages: vec![DerivedPackage {
            file: deb.path.clone(),
            name: PackageToken::parse("a").unwrap(),
            version: PackageToken::parse("2").unwrap(),
        }],
        database: ScopePath::parse("/var/lib/dpkg").unwrap(),
        write: [ScopePath::parse("/etc/a").unwrap()].into(),
        delete: [ScopePath::parse("/etc/a").unwrap()].into(),
    };
    let text = SourceManifest::render_built_with(&source, Some(&derived), &[deb, apply]);
    let m = rollguard_shared::Manifest::parse(text.as_bytes()).unwrap();
    let scope = plan_scope(&m);
    assert_eq!(scope["write"], serde_json::json!(["/srv/www"]));
    assert_eq!(scope["packages"]["write"], serde_json::json!(["/etc/a"]));
    assert_eq!(scope["packages"]["install"][0]["name"], "a");
}

/// A stand-in for Alertmanager's API: every request is answered with the
/// status line and body in `answer` at that moment.
async fn fake_alertmanager(
    answer: Arc<Mutex<(String, String)>>,
) -> crate::alertmanager_api::AlertmanagerApi {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let (status, body) = answer.lock().unwrap().clone();
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    crate::alertmanager_api::AlertmanagerApi {
        url: crate::alertmanager_api::ApiUrl::parse(&format!("http://127.0.0.1:{port}")).unwrap(),
        timeout: Duration::from_secs(3),
    }
}

fn active(labels: &str) -> (String, String) {
    (
        "200 OK".into(),
        format!(
            r#"[{{"labels":{labels},"annotations":{{}},"status":{{"state":"active","silencedBy":[],"inhibitedBy":[]}}}}]"#
        ),
    )
}

#[tokio::test]
async fn alert_gates_refuse_start_and_resume_and_halt_before_a_wave() {
    let mut f = fleet(&["web-1", "web-2"], "1m", Duration::from_secs(60)).await;
    let answer = Arc::new(Mutex::new(active(
        r#"{"alertname":"MailQueueStuck","severity":"critical"}"#,
    )));
    let api = fake_alertmanager(answer.clone()).await;
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&f.path).await.unwrap());
    f.engine = Engine::new(
        store,
        crate::cluster::Cluster::alone(),
        f.engine.hub.clone(),
        Arc::new(Metrics::new()),
        Duration::from_secs(60),
        Duration::from_millis(200),
        Some(api),
        crate::notify::Notifier::default(),
    );

    // An alert already firing refuses the start: nothing is recorded.
    let mut req = request(&f.sha, "1,100%", 0);
    req.bake_secs = 3;
    let e = f.engine.start(&req, "admin").await.unwrap_err();
    assert!(
        matches!(&e, EngineError::Conflict(m) if m.contains("alert MailQueueStuck is firing")),
        "{e}"
    );
    assert!(f.engine.list().await.unwrap().is_empty());

    // A non-matching alert does not (a regex matcher that does not match).
    req.halt_on = Matchers::parse("severity=critical,alertname!~\"Mail.*\"").unwrap();
    let id = f.engine.start(&req, "admin").await.unwrap().id;
    assert_eq!(runs(&next_orders(&mut f, "web-1").await), 1);
    succeed(&f, &id, "web-1").await;
    wait_status(&f.engine, &id, |s| s.phase == WavePhase::Baking).await;

    // While it bakes, Alertmanager starts answering garbage: unknown alert
    // state halts the rollout before wave 2.
    *answer.lock().unwrap() = ("200 OK".into(), "<html>busy</html>".into());
    let s = wait_status(&f.engine, &id, |s| s.state == RolloutState::Halted).await;
    let reason = s.halt_reason.unwrap();
    assert!(
        reason.contains("before wave 2") && reason.contains("alert state unknown"),
        "{reason}"
    );
    assert_eq!(
        host_state(&f.engine.status(&id).await.unwrap(), "web-2"),
        "pending"
    );

    // Resume is refused while the state is unknown, and while a matching
    // alert is active; it goes on once none is.
    let e = f.engine.resume(&id, None, "admin").await.unwrap_err();
    assert!(e.to_string().contains("alert state unknown"), "{e}");
    *answer.lock().unwrap() = active(r#"{"alertname":"DiskFull","severity":"critical"}"#);
    let e = f.engine.resume(&id, None, "admin").await.unwrap_err();
    assert!(e.to_string().contains("alert DiskFull is firing"), "{e}");
    *answer.lock().unwrap() = ("200 OK".into(), "[]".into());
    f.engine.resume(&id, None, "admin").await.unwrap();
    assert_eq!(runs(&next_orders(&mut f, "web-2").await), 1);
    succeed(&f, &id, "web-2").await;
    wait_status(&f.engine, &id, |s| s.state == RolloutState::Completed).await;
}

fn patterns(raw: &[&str]) -> Vec<HostPattern> {
    raw.iter().map(|p| HostPattern::parse(p).unwrap()).collect()
}

#[test]
fn limit_and_exclude_narrow_the_targets_and_refuse_what_matches_nothing() {
    let hosts = || -> Vec<String> {
        ["web-1", "web-2", "web-3", "web-4"]
            .map(String::from)
            .to_vec()
    };
    let (kept, left) = narrow(
        hosts(),
        &patterns(&["web-[12]", "web-4"]),
        &patterns(&["web-2"]),
    )
    .unwrap();
    assert_eq!(kept, ["web-1", "web-4"]);
    assert_eq!(left, ["web-2", "web-3"]);
    let (kept, left) = narrow(hosts(), &[], &[]).unwrap();
    assert_eq!((kept.len(), left.len()), (4, 0));
    // A pattern that matches none of the targets is a typo, never a no-op:
    // a mistyped --exclude would send the bundle to the host it spares.
    let e = narrow(hosts(), &[], &patterns(&["wbe-2"])).unwrap_err();
    assert!(e.contains("--exclude \"wbe-2\""), "{e}");
    let e = narrow(hosts(), &patterns(&["db-*"]), &[]).unwrap_err();
    assert!(e.contains("--limit \"db-*\""), "{e}");
    // Nothing left is refused.
    let e = narrow(hosts(), &patterns(&["web-1"]), &patterns(&["web-*"])).unwrap_err();
    assert!(e.contains("leave no host"), "{e}");
}

async fn report_as(f: &EngineFleet, id: &RolloutId, r: RunReport) {
    let host = r.host.clone();
    let r = AgentReport {
        rollout_id: id.clone(),
        report: r,
    };
    f.engine.ingest_report(&host, r).await.unwrap();
}

#[tokio::test]
async fn a_retry_sends_the_same_bundle_marked_retry_only_to_hosts_that_failed_without_a_denial() {
    let mut f = fleet(
        &["web-1", "web-2", "web-3", "web-4", "web-5"],
        "1m",
        Duration::from_secs(60),
    )
    .await;
    let id = f
        .engine
        .start(&request(&f.sha, "1,100%", 10), "alice")
        .await
        .unwrap()
        .id;
    // Not while it runs.
    let e = f.engine.retry(&id, true, "alice").await.unwrap_err();
    assert!(
        matches!(&e, EngineError::Conflict(m) if m.contains("is running")),
        "{e}"
    );
    wait_status(&f.engine, &id, |s| host_state(s, "web-1") == "dispatched").await;
    report_as(&f, &id, report("web-1", RunStatus::Failed)).await;
    wait_status(&f.engine, &id, |s| host_state(s, "web-5") == "dispatched").await;
    succeed(&f, &id, "web-2").await;
    let mut denied = report("web-3", RunStatus::Failed);
    denied.denials = Some(vec![Denial {
        access: "fs.remove_file".into(),
        path: Some("/backup/x".into()),
        exe: None,
    }]);
    denied.denial_count = Some(1);
    report_as(&f, &id, denied).await;
    let mut refused = report("web-4", RunStatus::Refused);
    refused.reason = Some("signatures".into());
    report_as(&f, &id, refused).await;
    report_as(&f, &id, report("web-5", RunStatus::TimedOut)).await;
    wait_status(&f.engine, &id, |s| {
        s.state == RolloutState::Halted && s.hosts.iter().all(|h| h.report.is_some())
    })
    .await;
    for h in ["web-1", "web-2", "web-3", "web-4", "web-5"] {
        drain(&mut f, h);
    }

    let e = f.engine.retry(&id, false, "alice").await.unwrap_err();
    assert!(matches!(e, EngineError::BadRequest(_)), "{e}");
    let a = f.engine.retry(&id, true, "bob").await.unwrap();
    assert_eq!(a.retried, vec!["web-1", "web-5"]);
    let skipped: Vec<(&str, &str)> = a
        .skipped
        .iter()
        .map(|s| (s.host.as_str(), s.state.as_str()))
        .collect();
    assert_eq!(
        skipped,
        vec![
            ("web-2", "succeeded"),
            ("web-3", "failed"),
            ("web-4", "refused")
        ]
    );
    assert!(a.skipped[1].why.contains("denied"), "{:?}", a.skipped[1]);
    let retry = a.rollout;
    assert_ne!(retry.id, id);
    assert_eq!(retry.plan.retry_of.as_ref(), Some(&id));
    assert_eq!(retry.plan.bundle.sha256, f.sha);
    assert_eq!(retry.plan.max_failures, 10);
    assert_eq!(retry.plan.waves, vec![vec!["web-1"], vec!["web-5"]]);
    // The plan says so in its JSON; a plain plan does not mention it.
    let json = serde_json::to_value(&retry.plan).unwrap();
    assert_eq!(json["retry_of"], id.as_str());
    let plain = f.engine.status(&id).await.unwrap().plan;
    assert!(serde_json::to_value(&plain)
        .unwrap()
        .get("retry_of")
        .is_none());

    // One at a time.
    let e = f.engine.retry(&id, true, "alice").await.unwrap_err();
    assert!(
        matches!(&e, EngineError::Conflict(m) if m.contains("already retrying")),
        "{e}"
    );
    // The canary of the retry gets the order, marked retry; the rest waits.
    let orders = next_orders(&mut f, "web-1").await;
    assert!(
        orders.iter().any(
            |o| matches!(o, Order::Run { rollout_id, retry: true, .. } if *rollout_id == retry.id)
        ),
        "{orders:?}"
    );
    assert_eq!(runs(&drain(&mut f, "web-5")), 0);
    // A reconnecting agent is owed the same marked order.
    let greeting = f.engine.greeting("web-1").await.unwrap();
    assert!(
        greeting
            .iter()
            .any(|o| matches!(o, Order::Run { retry: true, .. })),
        "{greeting:?}"
    );
    succeed(&f, &retry.id, "web-1").await;
    wait_status(&f.engine, &retry.id, |s| {
        host_state(s, "web-5") == "dispatched"
    })
    .await;
    succeed(&f, &retry.id, "web-5").await;
    wait_status(&f.engine, &retry.id, |s| s.state == RolloutState::Completed).await;
    // Nothing left to retry in the retry; the operator log has it all.
    let e = f.engine.retry(&retry.id, true, "alice").await.unwrap_err();
    assert!(
        matches!(&e, EngineError::Conflict(m) if m.contains("nothing to retry")),
        "{e}"
    );
    let log = f.engine.store.operator_log_entries().await.unwrap();
    let entry = log.iter().find(|e| e.action == "rollout.retry").unwrap();
    assert_eq!(entry.actor, "bob");
    assert!(entry.detail.contains(id.as_str()), "{}", entry.detail);
    // A preview is not retried: it changed nothing and used up no version.
    let preview = f
        .engine
        .start(
            &RolloutRequest {
                preview: true,
                ..request(&f.sha, "100%", 0)
            },
            "alice",
        )
        .await
        .unwrap()
        .id;
    let e = f.engine.retry(&preview, true, "alice").await.unwrap_err();
    assert!(
        matches!(&e, EngineError::BadRequest(m) if m.contains("is a preview")),
        "{e}"
    );
    // Read back from the database (the column and the plan agree).
    let again = engine_on(&f.path, Duration::from_secs(60)).await;
    assert_eq!(
        again.status(&retry.id).await.unwrap().plan.retry_of,
        Some(id)
    );
}
