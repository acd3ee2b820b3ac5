//! End to end at fleet scale (correctness, no timing): 200 real agent
//! daemons (`rollguard-simulate`, two processes, each host with its
//! own certificate, policy and state) against a real controller.
//!
//! 1. A no-op bundle rolled out in waves [1, 1%, 10%, 100%] completes with
//!    every host done exactly once: once in the controller's records, once
//!    in each host's own audit log and daemon records.
//! 2. `rollguard kill --all` reaches every agent while each runs a long
//!    bundle: every agent acknowledges, every bundle process dies, every
//!    host reports `killed`.

use std::collections::BTreeMap;
use std::fs;
use std::time::Duration;

use rollguard_tests::scale::{host_name, is_dead, poll, processes_with, ScaleFleet};
use serde_json::Value;

const HOSTS: usize = 200;
/// Upper bound for anything waited for (a failure, not a timing assertion).
const PATIENCE: Duration = Duration::from_secs(600);

/// Each host's audit log entries of type `kind` for bundle `bundle`.
fn audit_count(fleet: &ScaleFleet, i: usize, kind: &str, bundle: &str) -> usize {
    let path = fleet.state_dir(i).join("audit.log");
    let text = fs::read_to_string(&path).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["event"]["type"] == kind && e["event"]["bundle"]["name"] == bundle)
        .count()
}

/// The daemon's record of `rollout` on host `i`.
fn daemon_record(fleet: &ScaleFleet, i: usize, rollout: &str) -> Option<Value> {
    let path = fleet
        .state_dir(i)
        .join("daemon/rollouts")
        .join(format!("{rollout}.json"));
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

fn host_states(status: &Value) -> BTreeMap<String, (String, u64)> {
    let mut out = BTreeMap::new();
    for h in status["hosts"].as_array().expect("hosts") {
        let name = h["host"].as_str().expect("host").to_string();
        let prev = out.insert(
            name.clone(),
            (
                h["state"].as_str().expect("state").to_string(),
                h["wave"].as_u64().expect("wave"),
            ),
        );
        assert!(prev.is_none(), "{name} appears twice in the rollout");
    }
    out
}

#[test]
fn two_hundred_agents_roll_out_once_each_and_all_obey_kill() {
    let mut fleet = ScaleFleet::new(HOSTS, "120s");
    fleet.start_controller();
    // At most 4 bundles at once per process: the simulated hosts share one
    // kernel audit subsystem (see `rollguard-simulate --help`).
    fleet.start_agents(2, 4);

    // ---- 1. waves [1, 1%, 10%, 100%], zero bake --------------------------------
    let noop = fleet.bundle("scale-noop", &["/bin/true"], "1m");
    let id = fleet.start_rollout(&noop, &["--waves", "1,1%,10%,100%", "--bake", "0s"]);
    let status = fleet.wait_state(&id, "completed", PATIENCE, Duration::from_millis(500));
    let states = host_states(&status);
    assert_eq!(states.len(), HOSTS, "every host is in the plan");
    // 1 host, then 1% of 200 = 2 (one more), 10% = 20 (18 more), then the rest.
    let mut per_wave = BTreeMap::new();
    for (host, (state, wave)) in &states {
        assert_eq!(state, "succeeded", "{host}: {status:#}");
        *per_wave.entry(*wave).or_insert(0) += 1;
    }
    assert_eq!(
        per_wave,
        BTreeMap::from([(0, 1), (1, 1), (2, 18), (3, 180)]),
        "wave sizes"
    );
    for i in 0..HOSTS {
        let name = host_name(i);
        assert!(
            states.contains_key(&name),
            "{name} missing from the rollout"
        );
        assert_eq!(
            audit_count(&fleet, i, "run_started", "scale-noop"),
            1,
            "{name} ran the bundle exactly once"
        );
        assert_eq!(audit_count(&fleet, i, "run_finished", "scale-noop"), 1);
        // The controller completed on the stored report; the agent marks it
        // delivered when the answer reaches it, a moment later.
        let rec = poll(
            &format!("{name} to record its report as delivered"),
            PATIENCE,
            Duration::from_millis(100),
            || daemon_record(&fleet, i, &id).filter(|r| r["acked"] == true),
        );
        assert_eq!(rec["phase"], "finished", "{name}: {rec}");
        assert_eq!(rec["report"]["status"], "succeeded", "{name}: {rec}");
    }

    // ---- 2. kill --all while every host runs a long bundle ----------------------
    // Restarted without a bound, so every host's long bundle runs at once.
    fleet.stop_agents();
    fleet.start_agents(2, 0);
    let marker = format!("86{}", fleet.port);
    let long = fleet.bundle("scale-long", &["/bin/sleep", &marker], "10m");
    let id = fleet.start_rollout(&long, &["--waves", "100%", "--all-at-once", "--bake", "0s"]);
    let pids = poll(
        "a bundle process on every host",
        PATIENCE,
        Duration::from_millis(500),
        || {
            let p = processes_with(&format!("sleep {marker}"));
            (p.len() >= HOSTS).then_some(p)
        },
    );
    assert_eq!(pids.len(), HOSTS, "one bundle process per host");
    let kill = fleet.cli_json(&["kill", "--all", "--reason", "scale test"]);
    assert_eq!(kill["agents_sent"], HOSTS, "{kill:#}");
    assert_eq!(
        kill["agents_acked"], HOSTS,
        "every agent confirmed: {kill:#}"
    );
    assert_eq!(kill["agents_pending"], serde_json::json!([]));
    assert_eq!(kill["halted_rollouts"], serde_json::json!([id]));
    poll(
        "every bundle process to be dead",
        PATIENCE,
        Duration::from_millis(100),
        || pids.iter().all(|p| is_dead(*p)).then_some(()),
    );
    let status = poll(
        "every host to report its run killed",
        PATIENCE,
        Duration::from_millis(500),
        || {
            let s = fleet.status(&id);
            host_states(&s)
                .values()
                .all(|(state, _)| state == "killed")
                .then_some(s)
        },
    );
    assert_eq!(status["state"], "halted");
    assert_eq!(host_states(&status).len(), HOSTS);
    for i in 0..HOSTS {
        assert_eq!(
            audit_count(&fleet, i, "run_started", "scale-long"),
            1,
            "{}",
            host_name(i)
        );
    }
    assert!(
        processes_with(&format!("sleep {marker}")).is_empty(),
        "no bundle process survives"
    );
}
