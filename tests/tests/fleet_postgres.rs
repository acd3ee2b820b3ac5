//! End to end on PostgreSQL: a real controller keeps its state in a real
//! PostgreSQL server (started for the test, `tests/src/postgres.rs`) and
//! rolls a bundle out to real agent daemons. The controller is SIGKILLed
//! mid-rollout and PostgreSQL is restarted mid-rollout; each time the
//! rollout completes and every host ran exactly once (its own record).

use rollguard_tests::fleet::{manifest, script, wait_for, Fleet};
use rollguard_tests::postgres::PgCluster;

const HOSTS: &[(&str, &[(&str, &str)])] = &[
    ("mail-01", &[("role", "mail")]),
    ("mail-02", &[("role", "mail")]),
    ("mail-03", &[("role", "mail")]),
    ("mail-04", &[("role", "mail")]),
];

fn fleet_on(pg: &PgCluster, db: &str) -> Fleet {
    pg.create_database(db);
    let fleet = Fleet::new(HOSTS);
    fleet.use_postgres(&pg.url(db));
    fleet
}

fn assert_each_ran_once(fleet: &Fleet, id: &str, pg: &PgCluster) {
    for (h, _) in HOSTS {
        assert_eq!(
            fleet.runs_on(h),
            vec![id.to_string()],
            "{h} ran exactly once\n{}\npostgres:\n{}",
            fleet.logs(),
            pg.log_tail()
        );
    }
}

#[test]
fn controller_sigkill_mid_rollout_resumes_from_postgres() {
    let pg = PgCluster::start();
    let mut fleet = fleet_on(&pg, "sigkill");
    fleet.start_controller();
    fleet.start_agents();
    let bundle = fleet.bundle(
        "slow",
        &manifest("mail-slow", 1, "\"mail-*\"", "2m"),
        &script("sleep 3\ntouch \"$H/done\""),
    );
    let id = fleet.start_rollout(&bundle, &["--waves", "1,1,100%", "--bake", "1s"]);
    wait_for("wave 2 to be dispatched", || {
        let s = fleet.status(&id);
        (Fleet::host_states(&s)["mail-02"] == "dispatched").then_some(())
    });
    fleet.kill_controller();
    // mail-02 finishes while no controller is up; its report waits.
    wait_for("mail-02's run to finish", || {
        fleet.mail("mail-02").join("done").exists().then_some(())
    });
    fleet.start_controller();
    let status = fleet.wait_state(&id, "completed");
    assert!(
        Fleet::host_states(&status)
            .values()
            .all(|s| s == "succeeded"),
        "{status:#}"
    );
    assert_each_ran_once(&fleet, &id, &pg);
    // The operator log the controller kept in PostgreSQL verifies.
    let out = rollguard_tests::run_ok(
        std::process::Command::new(rollguard_tests::bin("rollguard-controller"))
            .args(["log", "verify", "--json", "--config"])
            .arg(fleet.ctl().join("controller.toml")),
    );
    let verdict: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(verdict["ok"], true, "{verdict}");
    assert!(verdict["entries"].as_u64().unwrap() >= 1, "{verdict}");
}

#[test]
fn postgres_restart_mid_rollout_loses_and_repeats_nothing() {
    let pg = PgCluster::start();
    let mut fleet = fleet_on(&pg, "restart");
    fleet.start_controller();
    fleet.start_agents();
    let bundle = fleet.bundle(
        "slow",
        &manifest("mail-slow", 1, "\"mail-*\"", "2m"),
        &script("sleep 3\ntouch \"$H/done\""),
    );
    let id = fleet.start_rollout(&bundle, &["--waves", "1,1,100%", "--bake", "1s"]);
    wait_for("wave 2 to be dispatched", || {
        let s = fleet.status(&id);
        (Fleet::host_states(&s)["mail-02"] == "dispatched").then_some(())
    });
    // The database goes away while mail-02 runs and reports.
    pg.stop("fast");
    wait_for("mail-02's run to finish", || {
        fleet.mail("mail-02").join("done").exists().then_some(())
    });
    std::thread::sleep(std::time::Duration::from_secs(2));
    pg.restart();
    let status = fleet.wait_state(&id, "completed");
    assert!(
        Fleet::host_states(&status)
            .values()
            .all(|s| s == "succeeded"),
        "{status:#}\n{}",
        fleet.logs()
    );
    assert_each_ran_once(&fleet, &id, &pg);
}
