//! End to end: `rollguard rollout retry ID --failed` on a real fleet. A
//! host whose run failed runs the same signed bundle again once the cause
//! is fixed, and only that host; hosts that succeeded are never retried,
//! and an agent refuses a forced retry of a version that succeeded there;
//! a run cut short by an agent crash is retried too.

use std::path::{Path, PathBuf};
use std::process::Command;

use rollguard_tests::fleet::{manifest, script, wait_for, Fleet};

const HOSTS: &[(&str, &[(&str, &str)])] = &[
    ("mail-01", &[("role", "mail")]),
    ("mail-02", &[("role", "mail")]),
    ("mail-03", &[("role", "mail")]),
];

fn policy(fleet: &Fleet, host: &str) -> PathBuf {
    fleet.root().join("agents").join(host).join("agent.toml")
}

/// `rollguard-agent run --retry --json` on `host`, beside its daemon.
fn local_retry(fleet: &Fleet, host: &str, bundle: &Path) -> (serde_json::Value, i32) {
    let out = rollguard_tests::run(
        Command::new(rollguard_tests::bin("rollguard-agent"))
            .args(["run", "--retry", "--json", "--policy"])
            .arg(policy(fleet, host))
            .arg(bundle),
    );
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (report, out.status.code().unwrap_or(-1))
}

#[test]
fn a_failed_host_is_retried_with_the_same_bundle_and_a_succeeded_one_never() {
    let mut fleet = Fleet::new(HOSTS);
    fleet.start_controller();
    fleet.start_agents();
    // The bundle fails on hosts that carry a `fail` marker.
    std::fs::write(fleet.mail("mail-02").join("fail"), "").unwrap();
    let bundle = fleet.bundle(
        "flaky",
        &manifest("mail-flaky", 1, "\"mail-*\"", "1m"),
        &script("if [ -e \"$H/fail\" ]; then echo broken >&2; exit 3; fi\ntouch \"$H/done\""),
    );
    let id = fleet.start_rollout(
        &bundle,
        &["--waves", "1,100%", "--bake", "1s", "--max-failures", "0"],
    );
    fleet.wait_state(&id, "halted");
    // mail-03 may still be running when mail-02's failure halts the rollout.
    let status = wait_for("every host of wave 2 to report", || {
        let s = fleet.status(&id);
        let states = Fleet::host_states(&s);
        (!states.values().any(|v| v == "dispatched")).then_some(s)
    });
    let states = Fleet::host_states(&status);
    assert_eq!(states["mail-01"], "succeeded", "{status:#}");
    assert_eq!(states["mail-02"], "failed", "{status:#}");
    assert_eq!(states["mail-03"], "succeeded", "{status:#}");

    // Without the fix nothing changes on the host itself: a plain order of
    // the same version is rollback-refused (as it always was).
    let out = rollguard_tests::run(
        Command::new(rollguard_tests::bin("rollguard-agent"))
            .args(["run", "--json", "--policy"])
            .arg(policy(&fleet, "mail-02"))
            .arg(&bundle),
    );
    let plain: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plain["status"], "refused", "{plain:#}");
    assert_eq!(plain["refusal"], "rollback", "{plain:#}");

    // The cause fixed, the failed host is retried, and only it.
    std::fs::remove_file(fleet.mail("mail-02").join("fail")).unwrap();
    let answer = fleet.cli_json(&["rollout", "retry", &id, "--failed"]);
    assert_eq!(answer["retry_of"], id.as_str(), "{answer:#}");
    assert_eq!(
        answer["retried"],
        serde_json::json!(["mail-02"]),
        "{answer:#}"
    );
    let skipped: Vec<(&str, &str)> = answer["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["host"].as_str().unwrap(), s["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        skipped,
        vec![("mail-01", "succeeded"), ("mail-03", "succeeded")],
        "{answer:#}"
    );
    let retry = answer["rollout"]["id"].as_str().unwrap().to_string();
    assert_ne!(retry, id);
    assert_eq!(answer["rollout"]["plan"]["retry_of"], id.as_str());
    assert_eq!(
        answer["rollout"]["plan"]["bundle"]["sha256"], status["plan"]["bundle"]["sha256"],
        "the same bundle"
    );
    let done = fleet.wait_state(&retry, "completed");
    assert_eq!(
        Fleet::host_states(&done)["mail-02"],
        "succeeded",
        "{done:#}\n{}",
        fleet.logs()
    );
    assert!(fleet.mail("mail-02").join("done").exists());
    // The host's own run log says which run of the version it was.
    let log = std::fs::read_to_string(
        fleet
            .root()
            .join("agents")
            .join("mail-02")
            .join("state")
            .join("audit.log"),
    )
    .unwrap();
    assert!(log.contains(r#""attempt":2"#), "{log}");
    assert_eq!(fleet.runs_on("mail-02"), vec![id.clone(), retry.clone()]);
    for h in ["mail-01", "mail-03"] {
        assert_eq!(fleet.runs_on(h), vec![id.clone()], "{h} ran exactly once");
    }

    // Nothing failed in the retry: nothing to retry (a JSON error under --json).
    let out = rollguard_tests::run(
        fleet
            .cli()
            .args(["rollout", "retry", &retry, "--failed", "--json"]),
    );
    assert!(!out.status.success());
    let err: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        err["error"].as_str().unwrap().contains("nothing to retry"),
        "{err:#}"
    );
    // The original halted: retrying it again while the retry runs is refused
    // elsewhere (engine test); now it is done, the failed host succeeded in
    // the retry, and a second retry of the original is refused by the agent.
    let again = fleet.cli_json(&["rollout", "retry", &id, "--failed"]);
    let again_id = again["rollout"]["id"].as_str().unwrap().to_string();
    let refused = fleet.wait_state(&again_id, "halted");
    let host = &refused["hosts"][0];
    assert_eq!(host["state"], "refused", "{refused:#}");
    assert_eq!(host["report"]["refusal"], "rollback", "{refused:#}");
    assert!(
        host["report"]["reason"]
            .as_str()
            .unwrap()
            .contains("success is final"),
        "{refused:#}"
    );
    assert_eq!(fleet.runs_on("mail-02"), vec![id.clone(), retry.clone()]);

    // Forced on a host where it succeeded, locally: refused too.
    for h in ["mail-01", "mail-02"] {
        let (report, code) = local_retry(&fleet, h, &bundle);
        assert_eq!(report["status"], "refused", "{report:#}");
        assert_eq!(report["refusal"], "rollback", "{report:#}");
        assert!(
            report["reason"]
                .as_str()
                .unwrap()
                .contains("success is final"),
            "{report:#}"
        );
        assert_ne!(code, 0);
    }
    assert_eq!(fleet.runs_on("mail-01"), vec![id.clone()]);
}

#[test]
fn a_run_cut_short_by_an_agent_crash_is_retried() {
    let mut fleet = Fleet::new(HOSTS);
    fleet.start_controller();
    fleet.start_agents();
    // Long on the first run, quick on the next.
    let bundle = fleet.bundle(
        "long",
        &manifest("mail-long", 1, "\"mail-01\"", "2m"),
        &script("if [ ! -e \"$H/quick\" ]; then touch \"$H/quick\"; sleep 4; fi"),
    );
    let id = fleet.start_rollout(&bundle, &["--waves", "100%", "--bake", "1s"]);
    wait_for("the run to start on mail-01", || {
        (!fleet.runs_on("mail-01").is_empty()).then_some(())
    });
    fleet.stop_agent("mail-01"); // SIGKILL, mid-run
    fleet.start_agent("mail-01");
    let status = fleet.wait_state(&id, "halted");
    assert_eq!(Fleet::host_states(&status)["mail-01"], "interrupted");

    let answer = fleet.cli_json(&["rollout", "retry", &id, "--failed"]);
    assert_eq!(
        answer["retried"],
        serde_json::json!(["mail-01"]),
        "{answer:#}"
    );
    let retry = answer["rollout"]["id"].as_str().unwrap().to_string();
    let done = fleet.wait_state(&retry, "completed");
    assert_eq!(
        Fleet::host_states(&done)["mail-01"],
        "succeeded",
        "{done:#}\n{}",
        fleet.logs()
    );
    assert_eq!(fleet.runs_on("mail-01"), vec![id, retry]);
}
