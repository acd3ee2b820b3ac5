//! End to end, in high availability: two real controller replicas on one
//! real PostgreSQL, twenty real agent daemons, each given both replicas'
//! URLs (half of them list the second replica first, so both serve agents).
//!
//! - The leader is SIGKILLed mid-rollout: the other replica takes the
//!   leadership, resumes the rollout from the database, the agents of the
//!   dead replica fail over to it, and the rollout completes. Every host ran
//!   exactly once, per its own record.
//! - `kill --all` sent to the follower reaches every agent, including those
//!   connected to the leader.
//! - A revocation recorded in the database (`revoke --config`) is enforced
//!   by a replica whose own revoked.list does not have it.
//! - PostgreSQL restarts mid-rollout, and then the follower restarts: the
//!   replicas reconnect, the rollout completes, every host ran once.

use rollguard_tests::fleet::{manifest, script, wait_for, Fleet};
use rollguard_tests::postgres::PgCluster;

const AGENTS: usize = 20;

fn names() -> Vec<String> {
    (1..=AGENTS).map(|i| format!("mail-{i:02}")).collect()
}

/// A fleet of [`AGENTS`] agents and two replicas, both started (replica 0
/// first, so it is the leader), every agent connected.
fn replicated_fleet(pg: &PgCluster, db: &str) -> Fleet {
    pg.create_database(db);
    let names = names();
    let labels: &[(&str, &str)] = &[("role", "mail")];
    let hosts: Vec<(&str, &[(&str, &str)])> = names.iter().map(|n| (n.as_str(), labels)).collect();
    let mut fleet = Fleet::replicated(&hosts, &pg.url(db), 1);
    fleet.start_controller();
    wait_for("replica 0 to lead", || leads(&fleet, 0).then_some(()));
    fleet.start_replica(1);
    fleet.start_agents();
    let on_follower = names
        .iter()
        .filter(|n| fleet.connected_to(n) == Some(1))
        .count();
    assert!(
        on_follower > 0 && on_follower < AGENTS,
        "both replicas serve agents ({on_follower} of {AGENTS} on the follower)"
    );
    fleet
}

/// Replica `i`'s `rollguard_leader` gauge.
fn leads(fleet: &Fleet, i: usize) -> bool {
    let op = rollguard_cli::client::Client::connect_with(
        &fleet.replica_url(i),
        &fleet.ctl().join("ca.crt"),
        &fleet.ctl().join("operator.crt"),
        &fleet.ctl().join("operator.key"),
    )
    .unwrap();
    let metrics = op.get_text("/metrics").unwrap();
    let value = metrics
        .lines()
        .find_map(|l| l.strip_prefix("rollguard_leader "))
        .unwrap_or_else(|| panic!("no rollguard_leader in:\n{metrics}"));
    value == "1"
}

#[test]
fn leader_sigkill_mid_rollout_completes_through_the_other_replica() {
    let pg = PgCluster::start();
    let mut fleet = replicated_fleet(&pg, "failover");
    let bundle = fleet.bundle(
        "slow",
        &manifest("mail-slow", 1, "\"mail-*\"", "2m"),
        &script("sleep 2\ntouch \"$H/done\""),
    );
    let id = fleet.start_rollout(&bundle, &["--waves", "1,2,100%", "--bake", "1s"]);
    wait_for("wave 2 to be dispatched", || {
        let s = fleet.status(&id);
        Fleet::host_states(&s)
            .values()
            .any(|state| state == "dispatched")
            .then_some(())
            .filter(|_| s["current_wave"] == 1)
    });
    // SIGKILL the leader (replica 0): no shutdown of any kind.
    let (l0, l1) = (leads(&fleet, 0), leads(&fleet, 1));
    assert!(l0 && !l1, "replica 0 leads: {l0} {l1}\n{}", fleet.logs());
    fleet.kill_controller();
    wait_for("replica 1 to take the leadership", || {
        leads(&fleet, 1).then_some(())
    });
    let status = fleet.wait_state(&id, "completed");
    let states = Fleet::host_states(&status);
    assert_eq!(states.len(), AGENTS, "{status:#}");
    assert!(
        states.values().all(|s| s == "succeeded"),
        "{status:#}\n{}",
        fleet.logs()
    );
    for name in names() {
        assert_eq!(
            fleet.runs_on(&name),
            vec![id.clone()],
            "{name} ran exactly once\n{}\npostgres:\n{}",
            fleet.logs(),
            pg.log_tail()
        );
    }
    // Every agent is now served by the surviving replica.
    for name in names() {
        fleet.wait_connected(&name);
        assert_eq!(fleet.connected_to(&name), Some(1), "{name}");
    }
}

#[test]
fn kill_all_through_the_follower_reaches_every_agent() {
    let pg = PgCluster::start();
    let fleet = replicated_fleet(&pg, "kill");
    let bundle = fleet.bundle(
        "long",
        &manifest("mail-long", 1, "\"mail-*\"", "10m"),
        &script("echo started >> \"$H/started\"\nsleep 600"),
    );
    let id = fleet.start_rollout(
        &bundle,
        &["--waves", "100%", "--all-at-once", "--bake", "0s"],
    );
    wait_for("the bundle to run on every host", || {
        names()
            .iter()
            .all(|n| fleet.mail(n).join("started").exists())
            .then_some(())
    });
    // Through the follower (replica 1) only.
    let killed = rollguard_tests::cli_json(
        fleet.cli_at(1),
        &["kill", "--all", "--reason", "replica test"],
    );
    assert!(
        killed["halted_rollouts"]
            .as_array()
            .is_some_and(|h| h.iter().any(|r| r == id.as_str())),
        "{killed:#}"
    );
    // The answer counts the whole fleet: the leader's agents too, through
    // the leader's answer.
    assert_eq!(killed["agents_sent"], AGENTS, "{killed:#}");
    assert_eq!(killed["agents_acked"], AGENTS, "{killed:#}");
    assert!(killed.get("replicas_silent").is_none(), "{killed:#}");
    let status = fleet.wait_state(&id, "halted");
    wait_for("every host to report its run killed", || {
        let s = fleet.status(&id);
        let states = Fleet::host_states(&s);
        (states.len() == AGENTS && states.values().all(|s| s == "killed")).then_some(())
    });
    assert!(
        status["halt_reason"]
            .as_str()
            .is_some_and(|r| r.contains("kill switch")),
        "{status:#}"
    );
    // No bundle process is left on any host.
    let left = std::process::Command::new("pgrep")
        .args(["-f", "sleep 600"])
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "left running: {}",
        String::from_utf8_lossy(&left.stdout)
    );
}

#[test]
fn a_revocation_in_the_database_is_enforced_by_every_replica() {
    let pg = PgCluster::start();
    let fleet = replicated_fleet(&pg, "revoke");
    // mail-02 lists replica 1 first; replica 1 has its own revoked.list.
    assert_eq!(fleet.connected_to("mail-02"), Some(1));
    rollguard_tests::run_ok(
        std::process::Command::new(rollguard_tests::bin("rollguard-controller"))
            .args(["revoke", "--dir"])
            .arg(fleet.ctl())
            .arg("--config")
            .arg(fleet.ctl().join("controller.toml"))
            .arg("mail-02"),
    );
    let own_list = std::fs::read_to_string(fleet.ctl().join("revoked-1.list")).unwrap();
    assert!(!own_list.contains("mail-02"), "{own_list}");
    wait_for("mail-02 to be refused by both replicas", || {
        fleet.connected_to("mail-02").is_none().then_some(())
    });
    // The others stay connected.
    for name in names().iter().filter(|n| *n != "mail-02") {
        assert!(fleet.connected_to(name).is_some(), "{name}");
    }
}

#[test]
fn postgres_and_a_replica_restart_mid_rollout_and_nothing_is_lost_or_repeated() {
    let pg = PgCluster::start();
    let mut fleet = replicated_fleet(&pg, "restarts");
    let bundle = fleet.bundle(
        "slow",
        &manifest("mail-slow", 1, "\"mail-*\"", "2m"),
        &script("sleep 2\ntouch \"$H/done\""),
    );
    let id = fleet.start_rollout(&bundle, &["--waves", "1,2,100%", "--bake", "2s"]);
    wait_for("wave 2 to be dispatched", || {
        let s = fleet.status(&id);
        (s["current_wave"] == 1).then_some(())
    });
    // The database goes away while wave 2 runs and reports.
    pg.stop("fast");
    std::thread::sleep(std::time::Duration::from_secs(3));
    pg.restart();
    wait_for("wave 3 to be dispatched", || {
        let s = fleet.status(&id);
        (s["current_wave"] == 2).then_some(())
    });
    // The follower restarts while the last wave runs; its agents fail over
    // to the leader and come back as they please.
    fleet.kill_replica(1);
    fleet.start_replica(1);
    let status = fleet.wait_state(&id, "completed");
    let states = Fleet::host_states(&status);
    assert_eq!(states.len(), AGENTS, "{status:#}");
    assert!(
        states.values().all(|s| s == "succeeded"),
        "{status:#}\n{}",
        fleet.logs()
    );
    for name in names() {
        assert_eq!(
            fleet.runs_on(&name),
            vec![id.clone()],
            "{name} ran exactly once\n{}\npostgres:\n{}",
            fleet.logs(),
            pg.log_tail()
        );
    }
    assert!(leads(&fleet, 0) || leads(&fleet, 1), "one replica leads");
    assert!(!(leads(&fleet, 0) && leads(&fleet, 1)), "only one leads");
}
