//! End to end: automatic halts and recovery on a real fleet — a failure
//! threshold halts and `rollout resume` continues; a controller killed with
//! SIGKILL mid-rollout resumes from its database without any host running
//! twice; an agent killed mid-run reports the run `interrupted` and never
//! runs it again.

use rollguard_tests::fleet::{manifest, script, wait_for, Fleet};

const HOSTS: &[(&str, &[(&str, &str)])] = &[
    ("mail-01", &[("role", "mail")]),
    ("mail-02", &[("role", "mail")]),
    ("mail-03", &[("role", "mail")]),
    ("mail-04", &[("role", "mail")]),
    ("mail-05", &[("role", "mail")]),
];
const ALL: [&str; 5] = ["mail-01", "mail-02", "mail-03", "mail-04", "mail-05"];

#[test]
fn failure_threshold_halts_and_resume_continues() {
    let mut fleet = Fleet::new(HOSTS);
    fleet.start_controller();
    fleet.start_agents();
    // The bundle fails on hosts that carry a `fail` marker.
    std::fs::write(fleet.mail("mail-02").join("fail"), "").unwrap();
    let bundle = fleet.bundle(
        "flaky",
        &manifest("mail-flaky", 1, "\"mail-*\"", "1m"),
        &script("if [ -e \"$H/fail\" ]; then echo broken >&2; exit 3; fi"),
    );
    let id = fleet.start_rollout(
        &bundle,
        &["--waves", "1,2,100%", "--bake", "1s", "--max-failures", "0"],
    );
    let status = fleet.wait_state(&id, "halted");
    let states = Fleet::host_states(&status);
    assert_eq!(states["mail-01"], "succeeded");
    assert_eq!(states["mail-02"], "failed", "{status:#}");
    for h in ["mail-03", "mail-04", "mail-05"] {
        assert_eq!(states[h], "pending", "{status:#}");
    }
    assert!(
        status["halt_reason"]
            .as_str()
            .unwrap()
            .contains("max-failures"),
        "{status:#}"
    );
    assert_eq!(status["hosts"][1]["report"]["exit_code"], 3);

    // An explicit operator action continues it; the failure is acknowledged.
    let resumed = fleet.cli_json(&["rollout", "resume", &id]);
    assert_eq!(resumed["state"], "running");
    let status = fleet.wait_state(&id, "completed");
    let states = Fleet::host_states(&status);
    for h in ["mail-01", "mail-03", "mail-04", "mail-05"] {
        assert_eq!(states[h], "succeeded", "{status:#}");
    }
    for h in ALL {
        assert_eq!(fleet.runs_on(h), vec![id.clone()], "{h} ran exactly once");
    }
    // Resuming a completed rollout is refused with a clear error.
    let out = rollguard_tests::run(fleet.cli().args(["rollout", "resume", &id]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not halted"));
}

#[test]
fn controller_sigkill_mid_rollout_resumes_without_rerunning_any_host() {
    let mut fleet = Fleet::new(HOSTS);
    fleet.start_controller();
    fleet.start_agents();
    // Each run takes a moment, so results arrive while the controller is down.
    let bundle = fleet.bundle(
        "slow",
        &manifest("mail-slow", 1, "\"mail-*\"", "2m"),
        &script("sleep 3\ntouch \"$H/done\""),
    );
    let id = fleet.start_rollout(&bundle, &["--waves", "1,2,100%", "--bake", "2s"]);
    // Kill the controller while wave 2 is running on its host.
    wait_for("wave 2 to be dispatched", || {
        let s = fleet.status(&id);
        (Fleet::host_states(&s)["mail-02"] == "dispatched").then_some(())
    });
    fleet.kill_controller();
    // mail-02 finishes its run while the controller is down.
    wait_for("mail-02's run to finish", || {
        fleet.mail("mail-02").join("done").exists().then_some(())
    });
    fleet.start_controller();
    let status = fleet.wait_state(&id, "completed");
    let states = Fleet::host_states(&status);
    assert!(states.values().all(|s| s == "succeeded"), "{status:#}");
    for h in ALL {
        assert_eq!(
            fleet.runs_on(h),
            vec![id.clone()],
            "{h} ran exactly once\n{}",
            fleet.logs()
        );
    }
}

#[test]
fn agent_killed_mid_run_reports_interrupted_and_never_reruns() {
    let mut fleet = Fleet::new(HOSTS);
    fleet.start_controller();
    fleet.start_agents();
    let bundle = fleet.bundle(
        "long",
        &manifest("mail-long", 1, "\"mail-01\"", "2m"),
        &script("sleep 4"),
    );
    let id = fleet.start_rollout(&bundle, &["--waves", "100%", "--bake", "1s"]);
    wait_for("the run to start on mail-01", || {
        (!fleet.runs_on("mail-01").is_empty()).then_some(())
    });
    fleet.stop_agent("mail-01"); // SIGKILL, mid-run
    fleet.start_agent("mail-01");
    let status = fleet.wait_state(&id, "halted");
    let states = Fleet::host_states(&status);
    assert_eq!(states["mail-01"], "interrupted", "{status:#}");
    assert_eq!(
        fleet.runs_on("mail-01"),
        vec![id.clone()],
        "the interrupted run was not started again"
    );
}
