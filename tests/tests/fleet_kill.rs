//! End to end: the kill switch. `rollguard kill --all` kills a long-running
//! bundle on every agent (each agent confirms its cgroup.kill before the
//! command returns), new runs are refused until `--lift` — also on an agent
//! restarted during the kill — and `rollguard-agent kill` does the same on
//! one host without the controller.

use std::process::Command;

use rollguard_tests::fleet::{manifest, script, wait_for, Fleet};
use rollguard_tests::{bin, run, run_ok};
use serde_json::Value;

const HOSTS: &[(&str, &[(&str, &str)])] = &[
    ("mail-01", &[("role", "mail")]),
    ("mail-02", &[("role", "mail")]),
    ("mail-03", &[("role", "mail")]),
    ("mail-04", &[("role", "mail")]),
    ("mail-05", &[("role", "mail")]),
];
const ALL: [&str; 5] = ["mail-01", "mail-02", "mail-03", "mail-04", "mail-05"];

/// Processes whose command line contains `marker`.
fn alive(marker: &str) -> Vec<String> {
    let out = run(Command::new("pgrep").args(["-f", marker]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect()
}

/// `rollguard-agent run --json` on one host: the report.
fn agent_run(fleet: &Fleet, host: &str, bundle: &std::path::Path) -> Value {
    let out = run(Command::new(bin("rollguard-agent"))
        .args(["run", "--json", "--policy"])
        .arg(fleet.agents[host].policy())
        .arg(bundle));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no report ({e}): {}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn kill_all_kills_everywhere_and_refuses_until_lifted() {
    let mut fleet = Fleet::new(HOSTS);
    fleet.start_controller();
    fleet.start_agents();
    let marker = format!("sleep 6{}", fleet.port);
    let bundle = fleet.bundle(
        "long",
        &manifest("mail-long", 1, "\"mail-*\"", "10m"),
        &script(&marker),
    );
    let id = fleet.start_rollout(
        &bundle,
        &["--waves", "100%", "--all-at-once", "--bake", "1s"],
    );
    wait_for("the bundle to run on every host", || {
        ALL.iter()
            .all(|h| !fleet.runs_on(h).is_empty())
            .then_some(())
    });
    wait_for("every bundle process to be up", || {
        (alive(&marker).len() >= ALL.len()).then_some(())
    });

    let kill = fleet.cli_json(&["kill", "--all", "--reason", "incident 2012-06-20"]);
    assert_eq!(kill["agents_sent"], 5, "{kill:#}");
    assert_eq!(
        kill["agents_acked"], 5,
        "every agent confirmed its kill: {kill:#}"
    );
    assert_eq!(kill["agents_pending"], serde_json::json!([]));
    assert_eq!(kill["halted_rollouts"], serde_json::json!([id]));
    // cgroup.kill was confirmed by every agent; the processes are gone.
    wait_for("the killed bundles' processes to be gone", || {
        alive(&marker).is_empty().then_some(())
    });
    let status = fleet.wait_state(&id, "halted");
    wait_for("every host to report its run killed", || {
        let s = fleet.status(&id);
        Fleet::host_states(&s)
            .values()
            .all(|st| st == "killed")
            .then_some(())
    });
    assert!(
        status["halt_reason"]
            .as_str()
            .unwrap()
            .contains("kill switch"),
        "{status:#}"
    );

    // New runs are refused: by the controller, and by every agent itself.
    let out = run(fleet
        .cli()
        .args(["rollout", "start"])
        .arg(&bundle)
        .args(["--waves", "100%"]));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("kill is in force"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let other = fleet.bundle(
        "other",
        &manifest("mail-other", 1, "\"mail-*\"", "1m"),
        &script("true"),
    );
    let report = agent_run(&fleet, "mail-01", &other);
    assert_eq!(
        (report["status"].as_str(), report["refusal"].as_str()),
        (Some("refused"), Some("kill_switch")),
        "{report:#}"
    );

    // An agent restarted during the kill still refuses.
    fleet.stop_agent("mail-02");
    fleet.start_agent("mail-02");
    fleet.wait_connected("mail-02");
    let report = agent_run(&fleet, "mail-02", &other);
    assert_eq!(report["refusal"], "kill_switch", "{report:#}");
    let local = run_ok(
        Command::new(bin("rollguard-agent"))
            .args(["kill", "--status", "--json", "--socket"])
            .arg(fleet.agents["mail-02"].socket()),
    );
    let local: Value = serde_json::from_slice(&local.stdout).unwrap();
    assert_eq!(
        local["kill"]["fleet"]["all"]["reason"], "incident 2012-06-20",
        "{local:#}"
    );

    // Lifting needs the operator certificate: an agent's is refused.
    let creds = fleet.agents["mail-01"].dir.join("creds");
    let out = run(fleet
        .cli()
        .env("ROLLGUARD_CERT", creds.join("mail-01.crt"))
        .env("ROLLGUARD_KEY", creds.join("mail-01.key"))
        .args(["kill", "--lift"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("agent certificates may not call"));

    let lifted = fleet.cli_json(&["kill", "--lift"]);
    assert_eq!(lifted["state"]["all"], Value::Null, "{lifted:#}");
    assert_eq!(lifted["agents_acked"], 5, "{lifted:#}");
    let report = agent_run(&fleet, "mail-02", &other);
    assert_eq!(report["status"], "succeeded", "{report:#}");
    let again = fleet.bundle(
        "after",
        &manifest("mail-after", 1, "\"mail-*\"", "1m"),
        &script("true"),
    );
    let id2 = fleet.start_rollout(
        &again,
        &["--waves", "100%", "--all-at-once", "--bake", "1s"],
    );
    fleet.wait_state(&id2, "completed");
}

#[test]
fn host_local_kill_without_the_controller() {
    let mut fleet = Fleet::new(&HOSTS[..1]);
    fleet.start_controller();
    fleet.start_agents();
    let marker = format!("sleep 7{}", fleet.port);
    let bundle = fleet.bundle(
        "long",
        &manifest("mail-long", 1, "\"mail-01\"", "10m"),
        &script(&marker),
    );
    let id = fleet.start_rollout(&bundle, &["--waves", "100%", "--bake", "1s"]);
    wait_for("the bundle process to be up", || {
        (!alive(&marker).is_empty()).then_some(())
    });
    fleet.kill_controller();

    let socket = fleet.agents["mail-01"].socket();
    let out = run_ok(
        Command::new(bin("rollguard-agent"))
            .args([
                "kill",
                "--reason",
                "controller unreachable",
                "--json",
                "--socket",
            ])
            .arg(&socket),
    );
    let resp: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(resp["killed"], 1, "{resp:#}");
    wait_for("the bundle process to be gone", || {
        alive(&marker).is_empty().then_some(())
    });
    let other = fleet.bundle(
        "other",
        &manifest("mail-other", 1, "\"mail-01\"", "1m"),
        &script("true"),
    );
    assert_eq!(
        agent_run(&fleet, "mail-01", &other)["refusal"],
        "kill_switch"
    );

    // The controller comes back; its (empty) fleet kill state does not lift
    // the local kill, and the killed run is reported.
    fleet.start_controller();
    fleet.wait_connected("mail-01");
    let status = fleet.wait_state(&id, "halted");
    wait_for("the killed run's report", || {
        (Fleet::host_states(&fleet.status(&id))["mail-01"] == "killed").then_some(())
    });
    assert!(status["halt_reason"].is_string());
    assert_eq!(
        agent_run(&fleet, "mail-01", &other)["refusal"],
        "kill_switch"
    );
    run_ok(
        Command::new(bin("rollguard-agent"))
            .args(["kill", "--lift", "--socket"])
            .arg(&socket),
    );
    assert_eq!(agent_run(&fleet, "mail-01", &other)["status"], "succeeded");
}
