//! The controller store's contract, run against both backends: SQLite (a
//! file in a temporary directory) and a real PostgreSQL started for the
//! test (`tests/src/postgres.rs`). Every check gets a fresh database.
//!
//! What the engine relies on: a dispatch is durable before its order is
//! sent, nothing is dispatched once a rollout is halted, a report is stored
//! once, kill state survives a reopen with a generation that only grows,
//! and the operator log stays one unbroken hash chain, even when several
//! controllers (replicas on PostgreSQL) write at once.

use std::collections::BTreeMap;
use std::sync::Arc;

use rollguard_controller::config::{DatabaseUrl, Storage};
use rollguard_controller::store::{
    self, verify_operator_log, AgentRecord, BundleMeta, Inventory, NewReport, Outcome,
    PresenceUpdate, ReportOutcome, RolloutRecord, Store,
};
use rollguard_shared::protocol::{
    BundleSummary, KillOrder, KillScope, Plan, RolloutId, RolloutState, Sha256Hex, WavePhase,
};
use rollguard_shared::report::{RunReport, RunStatus};
use rollguard_tests::postgres::PgCluster;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

async fn open(storage: &Storage) -> Arc<dyn Store> {
    store::open(storage)
        .await
        .unwrap_or_else(|e| panic!("opening {storage:?}: {e}"))
        .store
}

fn plan() -> Plan {
    Plan {
        bundle: BundleSummary {
            sha256: Sha256Hex::of(b"b"),
            name: "b".into(),
            version: 1,
            size: 1,
        },
        targets: serde_json::Value::Null,
        scope: serde_json::Value::Null,
        services: serde_json::Value::Null,
        signers: vec![],
        timeout_secs: 60,
        bake_secs: 0,
        max_failures: 0,
        halt_on: Default::default(),
        waves: vec![vec!["a".into()], vec!["b".into(), "c".into()]],
        out_of_scope: 0,
        left_out: vec![],
        offline: vec![],
        include_offline: false,
        preview: false,
        after_preview: None,
        retry_of: None,
    }
}

fn report(host: &str, status: RunStatus) -> RunReport {
    RunReport {
        exit_code: Some(0),
        denials: Some(vec![]),
        denial_count: Some(0),
        duration_ms: 1,
        ..RunReport::new(host, status)
    }
}

/// A store with one bundle and one running rollout `r-1`.
async fn with_rollout(storage: &Storage) -> (Arc<dyn Store>, RolloutId) {
    let store = open(storage).await;
    let sha = Sha256Hex::of(b"b");
    let meta = BundleMeta {
        sha256: sha.clone(),
        name: "b".into(),
        version: 1,
        size: 1,
        manifest: b"m".to_vec(),
        signers: vec!["ops@example".into()],
    };
    store.put_bundle(&meta, b"bundle bytes").await.unwrap();
    // Storing the same bundle again is a no-op, not an error.
    store.put_bundle(&meta, b"bundle bytes").await.unwrap();
    assert_eq!(store.bundle_meta(&sha).await.unwrap(), Some(meta));
    assert_eq!(
        store.bundle_bytes(&sha).await.unwrap().as_deref(),
        Some(&b"bundle bytes"[..])
    );
    assert_eq!(store.bundle_meta(&Sha256Hex::of(b"x")).await.unwrap(), None);
    let id = RolloutId::parse("r-1").unwrap();
    store
        .create_rollout(&RolloutRecord {
            id: id.clone(),
            bundle_sha256: sha,
            state: RolloutState::Running,
            phase: WavePhase::Dispatching,
            current_wave: 0,
            plan: plan(),
            bake_until: None,
            halt_reason: None,
            ack_failures: 0,
            ack_alerts: 0,
            created_at: 1,
            updated_at: 1,
        })
        .await
        .unwrap();
    (store, id)
}

async fn agents_are_upserted_and_listed_by_name(storage: Storage) {
    let store = open(&storage).await;
    let agent = |name: &str, role: &str| AgentRecord {
        name: name.into(),
        labels: BTreeMap::from([("role".to_string(), role.to_string())]),
        inventory: Default::default(),
    };
    for a in [
        agent("web-2", "web"),
        agent("Web-1", "web"),
        agent("db-1", "db"),
    ] {
        store.upsert_agent(&a).await.unwrap();
    }
    store.upsert_agent(&agent("db-1", "backup")).await.unwrap();
    let names: Vec<(String, String)> = store
        .list_agents()
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.name, a.labels["role"].clone()))
        .collect();
    // Bytewise order on both backends, whatever PostgreSQL's locale.
    assert_eq!(
        names,
        [("Web-1", "web"), ("db-1", "backup"), ("web-2", "web")]
            .map(|(n, r)| (n.to_string(), r.to_string()))
    );
}

/// Presence: first seen is kept, a stream gone from one replica does not
/// disconnect the agent from another, a label change keeps the
/// inventory, removing an agent returns its record and forgets it.
async fn presence_is_recorded_in_order_and_agents_removed(storage: Storage) {
    let store = open(&storage).await;
    let agent = AgentRecord {
        name: "web-1".into(),
        labels: BTreeMap::new(),
        inventory: Default::default(),
    };
    store.upsert_agent(&agent).await.unwrap();
    let connected = |at: i64, replica: u64, version: &str| PresenceUpdate::Connected {
        name: "web-1".into(),
        at,
        replica,
        agent_version: version.into(),
        kernel: "6.18.0".into(),
        landlock_abi: Some(7),
        cert_serial: format!("serial-{version}"),
        cert_not_after: Some(at + 1000),
    };
    let gone = |at: i64, replica: u64| PresenceUpdate::Gone {
        name: "web-1".into(),
        at,
        replica,
    };
    store
        .record_presence(&[
            connected(10, 1, "0.1"),
            gone(20, 1),
            connected(30, 2, "0.2"),
            // Replica 1 saw the old stream close late: changes nothing.
            gone(40, 1),
            // An agent nobody registered is skipped.
            PresenceUpdate::Gone {
                name: "ghost".into(),
                at: 40,
                replica: 2,
            },
        ])
        .await
        .unwrap();
    // A label change (upsert) keeps what presence recorded.
    store
        .upsert_agent(&AgentRecord {
            labels: BTreeMap::from([("role".to_string(), "web".to_string())]),
            ..agent.clone()
        })
        .await
        .unwrap();
    let listed = store.list_agents().await.unwrap();
    assert_eq!(listed.len(), 1);
    let inv = &listed[0].inventory;
    assert_eq!(
        inv,
        &Inventory {
            first_seen: Some(10),
            last_seen: Some(30),
            agent_version: Some("0.2".into()),
            kernel: Some("6.18.0".into()),
            landlock_abi: Some(7),
            connected_to: Some(2),
            cert_serial: Some("serial-0.2".into()),
            cert_not_after: Some(1030),
        }
    );
    store.record_presence(&[gone(50, 2)]).await.unwrap();
    let inv = store.list_agents().await.unwrap()[0].inventory.clone();
    assert_eq!((inv.connected_to, inv.last_seen), (None, Some(50)));
    let removed = store.remove_agent("web-1").await.unwrap().unwrap();
    assert_eq!(removed.inventory.cert_serial.as_deref(), Some("serial-0.2"));
    assert!(store.list_agents().await.unwrap().is_empty());
    assert!(store.remove_agent("web-1").await.unwrap().is_none());
}

async fn rollout_progress_and_states(storage: Storage) {
    let (store, id) = with_rollout(&storage).await;
    assert!(store
        .update_progress(&id, WavePhase::Baking, 1, Some(77))
        .await
        .unwrap());
    let r = store.rollout(&id).await.unwrap().unwrap();
    assert_eq!(
        (r.phase, r.current_wave, r.bake_until, r.plan),
        (WavePhase::Baking, 1, Some(77), plan())
    );
    assert_eq!(
        store
            .rollouts_in_state(RolloutState::Running)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(store.complete(&id).await.unwrap());
    assert!(!store.complete(&id).await.unwrap(), "completing twice");
    let r = store.rollout(&id).await.unwrap().unwrap();
    assert_eq!((r.state, r.bake_until), (RolloutState::Completed, None));
    assert!(
        !store.halt(&id, "late").await.unwrap(),
        "a completed rollout"
    );
    assert!(store
        .rollouts_in_state(RolloutState::Running)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.rollouts().await.unwrap().len(), 1);
    assert_eq!(
        store
            .rollout(&RolloutId::parse("r-none").unwrap())
            .await
            .unwrap(),
        None
    );
}

async fn dispatch_is_refused_once_halted(storage: Storage) {
    let (store, id) = with_rollout(&storage).await;
    assert!(store
        .record_dispatches(&id, 0, &["a".into()], 10)
        .await
        .unwrap());
    assert_eq!(store.pending_orders("a").await.unwrap().len(), 1);
    assert!(store.halt(&id, "test").await.unwrap());
    assert!(
        !store.halt(&id, "again").await.unwrap(),
        "halting twice is a no-op"
    );
    assert!(!store
        .record_dispatches(&id, 1, &["b".into()], 11)
        .await
        .unwrap());
    assert!(!store
        .update_progress(&id, WavePhase::Baking, 0, None)
        .await
        .unwrap());
    assert!(
        store.pending_orders("a").await.unwrap().is_empty(),
        "no orders for halted rollouts"
    );
    assert_eq!(store.dispatches(&id).await.unwrap().len(), 1);
    let r = store.rollout(&id).await.unwrap().unwrap();
    assert_eq!(r.halt_reason.as_deref(), Some("test"));
    assert!(store.resume(&id, 2, 1).await.unwrap());
    assert!(!store.resume(&id, 0, 0).await.unwrap(), "not halted");
    let r = store.rollout(&id).await.unwrap().unwrap();
    assert_eq!(
        (r.state, r.halt_reason, r.ack_failures, r.ack_alerts),
        (RolloutState::Running, None, 2, 1)
    );
}

async fn reports_are_stored_once_and_only_for_dispatched_hosts(storage: Storage) {
    let (store, id) = with_rollout(&storage).await;
    store
        .record_dispatches(&id, 0, &["a".into()], 10)
        .await
        .unwrap();
    store
        .record_dispatches(&id, 0, &["a".into()], 99)
        .await
        .unwrap();
    assert_eq!(
        store.dispatches(&id).await.unwrap()[0].dispatched_at,
        10,
        "re-dispatch keeps the first record"
    );
    let order = &store.pending_orders("a").await.unwrap()[0];
    assert_eq!(
        (&order.rollout_id, order.bundle_size),
        (&id, 1),
        "{order:?}"
    );
    let r = report("a", RunStatus::Succeeded);
    assert_eq!(
        store.record_report(&id, "a", &r, 20).await.unwrap(),
        ReportOutcome::Stored
    );
    assert_eq!(
        store.record_report(&id, "a", &r, 21).await.unwrap(),
        ReportOutcome::Duplicate
    );
    assert_eq!(
        store.record_report(&id, "b", &r, 21).await.unwrap(),
        ReportOutcome::NotDispatched
    );
    assert!(store.pending_orders("a").await.unwrap().is_empty());
    match &store.dispatches(&id).await.unwrap()[0].outcome {
        Outcome::Reported(rep) => assert_eq!(**rep, r),
        other => panic!("{other:?}"),
    }
}

async fn a_batch_of_reports_gets_one_outcome_each(storage: Storage) {
    let (store, id) = with_rollout(&storage).await;
    store
        .record_dispatches(&id, 0, &["a".into(), "b".into()], 10)
        .await
        .unwrap();
    let item = |host: &str| NewReport {
        rollout_id: id.clone(),
        host: host.into(),
        report: report(host, RunStatus::Succeeded),
        at: 20,
    };
    let out = store
        .record_reports(&[item("a"), item("zz"), item("b"), item("a")])
        .await
        .unwrap();
    assert_eq!(
        out,
        vec![
            ReportOutcome::Stored,
            ReportOutcome::NotDispatched,
            ReportOutcome::Stored,
            ReportOutcome::Duplicate
        ]
    );
}

async fn a_late_report_replaces_a_timeout(storage: Storage) {
    let (store, id) = with_rollout(&storage).await;
    store
        .record_dispatches(&id, 0, &["a".into(), "b".into()], 10)
        .await
        .unwrap();
    store.mark_timed_out(&id, &["a".into()]).await.unwrap();
    let outcomes: Vec<Outcome> = store
        .dispatches(&id)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.outcome)
        .collect();
    assert_eq!(outcomes, vec![Outcome::TimedOut, Outcome::Dispatched]);
    assert!(store.pending_orders("a").await.unwrap().is_empty());
    assert_eq!(
        store
            .record_report(&id, "a", &report("a", RunStatus::Failed), 30)
            .await
            .unwrap(),
        ReportOutcome::Stored
    );
    // A report is never turned back into a timeout.
    store.mark_timed_out(&id, &["a".into()]).await.unwrap();
    let a = store.dispatches(&id).await.unwrap().remove(0);
    assert!(matches!(a.outcome, Outcome::Reported(_)));
    // ...and the timeout it followed still counts.
    assert!(a.reported_late);
    store
        .record_report(&id, "b", &report("b", RunStatus::Succeeded), 40)
        .await
        .unwrap();
    assert!(!store.dispatches(&id).await.unwrap()[1].reported_late);
}

async fn kill_state_is_durable_and_versioned(storage: Storage) {
    {
        let store = open(&storage).await;
        assert!(store.kill_state().await.unwrap().is_empty());
        let order = KillOrder {
            reason: "stop".into(),
            by: "admin".into(),
            at: "t".into(),
        };
        let s = store.add_kill(&KillScope::All, &order).await.unwrap();
        assert_eq!(s.generation, 1);
        assert!(s.all.is_some());
        let s = store
            .add_kill(
                &KillScope::Rollout(RolloutId::parse("r-9").unwrap()),
                &order,
            )
            .await
            .unwrap();
        assert_eq!((s.generation, s.rollouts.len()), (2, 1));
    }
    // Reopened: migrating an up-to-date schema changes nothing.
    let store = open(&storage).await;
    let s = store.kill_state().await.unwrap();
    assert_eq!(s.generation, 2);
    assert!(s.all.is_some());
    let s = store.lift_kill(Some(&KillScope::All)).await.unwrap();
    assert!(s.all.is_none() && s.rollouts.len() == 1 && s.generation == 3);
    let s = store.lift_kill(None).await.unwrap();
    assert!(s.is_empty());
    assert_eq!(s.generation, 4);
}

async fn operator_log_is_hash_chained(storage: Storage) {
    let store = open(&storage).await;
    for i in 0..3 {
        store
            .append_operator_log("admin", "rollout.start", &serde_json::json!({ "i": i }))
            .await
            .unwrap();
    }
    let mut entries = store.operator_log_entries().await.unwrap();
    assert_eq!(entries.len(), 3);
    assert_eq!(verify_operator_log(&entries), Ok(()));
    entries[1].detail = r#"{"i":7}"#.into();
    assert_eq!(verify_operator_log(&entries), Err(2));
    let mut entries = store.operator_log_entries().await.unwrap();
    entries.remove(0);
    assert_eq!(verify_operator_log(&entries), Err(2));
}

/// A retry rollout's `retry_of` reads back from the plan and the column,
/// and the orders it owes are marked retry; a plain rollout's are not.
async fn a_retry_rollout_owes_retry_orders(storage: Storage) {
    let (store, id) = with_rollout(&storage).await;
    let original = store.rollout(&id).await.unwrap().unwrap();
    assert_eq!(original.plan.retry_of, None);
    let retry_id = RolloutId::parse("r-2").unwrap();
    store
        .create_rollout(&RolloutRecord {
            id: retry_id.clone(),
            plan: Plan {
                retry_of: Some(id.clone()),
                ..plan()
            },
            ..original
        })
        .await
        .unwrap();
    let back = store.rollout(&retry_id).await.unwrap().unwrap();
    assert_eq!(back.plan.retry_of, Some(id.clone()));
    for (rollout, host) in [(&id, "a"), (&retry_id, "b")] {
        assert!(store
            .record_dispatches(rollout, 0, &[host.into()], 10)
            .await
            .unwrap());
    }
    let owed = |host: &'static str| {
        let store = store.clone();
        async move { store.pending_orders(host).await.unwrap() }
    };
    let a = owed("a").await;
    assert_eq!((a.len(), a[0].retry), (1, false));
    let b = owed("b").await;
    assert_eq!((b.len(), b[0].retry), (1, true));
    assert_eq!(b[0].rollout_id, retry_id);
}

/// An enrollment token is used once, only before it expires, only for its
/// host; issued certificates are found by name.
async fn enrollment_tokens_are_used_once(storage: Storage) {
    let store = open(&storage).await;
    let now = store::now_ms();
    store
        .create_enrollment_token("h1", "web-1", now, now + 60_000)
        .await
        .unwrap();
    store
        .create_enrollment_token("h2", "web-2", now - 120_000, now - 60_000)
        .await
        .unwrap();
    // Another host's name, an unknown hash: refused, and not used up.
    assert!(!store
        .consume_enrollment_token("h1", "web-2", now)
        .await
        .unwrap());
    assert!(!store
        .consume_enrollment_token("nope", "web-1", now)
        .await
        .unwrap());
    assert!(store
        .consume_enrollment_token("h1", "web-1", now)
        .await
        .unwrap());
    assert!(!store
        .consume_enrollment_token("h1", "web-1", now)
        .await
        .unwrap());
    // Expired.
    assert!(!store
        .consume_enrollment_token("h2", "web-2", now)
        .await
        .unwrap());

    store.record_issued_cert("0a", "web-1", now).await.unwrap();
    store.record_issued_cert("0b", "web-1", now).await.unwrap();
    store.record_issued_cert("0a", "web-1", now).await.unwrap();
    store.record_issued_cert("0c", "web-2", now).await.unwrap();
    assert_eq!(
        store.issued_serials("web-1").await.unwrap(),
        vec!["0a".to_string(), "0b".to_string()]
    );
    assert!(store.issued_serials("web-3").await.unwrap().is_empty());
}

/// Every check, each on a fresh database named after it.
async fn contract(fresh: impl Fn(&str) -> Storage) {
    agents_are_upserted_and_listed_by_name(fresh("agents")).await;
    presence_is_recorded_in_order_and_agents_removed(fresh("presence")).await;
    rollout_progress_and_states(fresh("progress")).await;
    dispatch_is_refused_once_halted(fresh("halted")).await;
    reports_are_stored_once_and_only_for_dispatched_hosts(fresh("reports")).await;
    a_batch_of_reports_gets_one_outcome_each(fresh("batch")).await;
    a_late_report_replaces_a_timeout(fresh("late")).await;
    kill_state_is_durable_and_versioned(fresh("kills")).await;
    operator_log_is_hash_chained(fresh("oplog")).await;
    a_retry_rollout_owes_retry_orders(fresh("retry")).await;
    enrollment_tokens_are_used_once(fresh("tokens")).await;
}

#[test]
fn sqlite_meets_the_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(contract(|name| {
        Storage::Sqlite(dir.path().join(format!("{name}.db")))
    }));
}

fn postgres(pg: &PgCluster, name: &str) -> Storage {
    pg.create_database(name);
    Storage::Postgres(DatabaseUrl::parse(&pg.url(name)).expect("url"))
}

#[test]
fn postgres_meets_the_store_contract() {
    let pg = PgCluster::start();
    runtime().block_on(contract(|name| postgres(&pg, name)));
}

/// Two controllers on one database (replicas) write at once: the operator
/// log stays one chain with no sequence number lost or doubled, and a halt
/// racing a wave's dispatch either comes first (nothing dispatched) or
/// after (all of it), never in between.
#[test]
fn postgres_replicas_write_concurrently_without_breaking_invariants() {
    let pg = PgCluster::start();
    let storage = postgres(&pg, "replicas");
    runtime().block_on(async {
        let (a, id) = with_rollout(&storage).await;
        let b = open(&storage).await;
        let appends = (0..40).map(|i| {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                s.append_operator_log("admin", "x", &serde_json::json!({ "i": i }))
                    .await
                    .unwrap()
            })
        });
        for t in appends.collect::<Vec<_>>() {
            t.await.unwrap();
        }
        let entries = a.operator_log_entries().await.unwrap();
        assert_eq!(entries.len(), 40);
        assert_eq!(verify_operator_log(&entries), Ok(()));

        let hosts: Vec<String> = (0..200).map(|i| format!("h{i:03}")).collect();
        let (a2, id2) = (a.clone(), id.clone());
        let dispatch =
            tokio::spawn(async move { a2.record_dispatches(&id2, 0, &hosts, 5).await.unwrap() });
        let halted = b.halt(&id, "operator").await.unwrap();
        let dispatched = dispatch.await.unwrap();
        assert!(halted);
        let n = b.dispatches(&id).await.unwrap().len();
        assert_eq!(n, if dispatched { 200 } else { 0 }, "all or nothing");
    });
    drop(pg);
}
