//! End to end: a preview rollout on a real fleet (controller, agent
//! daemons, real sandboxes). Every in-scope host runs the real script
//! against an overlay at once; nothing changes on any host; `rollout
//! changes` groups the hosts by identical findings; `--after-preview`
//! refuses to follow a preview with a denial unless an operator gives a
//! reason, and follows a clean one.

use rollguard_tests::fleet::{manifest, wait_for, Fleet};
use serde_json::Value;

const HOSTS: &[(&str, &[(&str, &str)])] = &[
    ("mail-01", &[("role", "mail")]),
    ("mail-02", &[("role", "mail")]),
    ("mail-03", &[("role", "mail")]),
    ("mail-04", &[("role", "mail")]),
];

/// Every file of every host's data (mail, customers, backups) with its
/// bytes; not the agents' and controller's own state.
fn hosts_data(fleet: &Fleet) -> Vec<std::collections::BTreeMap<std::path::PathBuf, Vec<u8>>> {
    ["mail", "customers", "backup"]
        .iter()
        .map(|d| Fleet::snapshot(&fleet.root().join(d)))
        .collect()
}

/// `rollguard ARGS --json`, whatever its exit status: (status, JSON,
/// stderr).
fn cli_any(fleet: &Fleet, args: &[&str]) -> (i32, Value, String) {
    let out = rollguard_tests::run(fleet.cli().args(args).arg("--json"));
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (
        out.status.code().unwrap_or(-1),
        v,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_fleet_preview_changes_nothing_groups_hosts_and_gates_the_real_rollout() {
    let mut fleet = Fleet::new(HOSTS);
    let shared = fleet.root().join("mail/shared.cf");
    std::fs::write(&shared, "queue_lifetime = 5d\n").unwrap();
    // One host carries a leftover that sends the script down the stray
    // delete of 2012.
    std::fs::write(fleet.mail("mail-03").join("stray"), "").unwrap();
    fleet.start_controller();
    fleet.start_agents();
    // Every host edits the same file (each in its own overlay in a
    // preview); mail-03 also tries to delete its customers.
    let bundle = fleet.bundle(
        "edit",
        &manifest("mail-edit", 1, "\"mail-*\"", "1m"),
        "#!/bin/sh\n\
         echo 'queue_lifetime = 1d' > @FLEET@/mail/shared.cf\n\
         if [ -e \"@FLEET@/mail/$ROLLGUARD_HOST/stray\" ]; then rm -rf \"@FLEET@/customers/$ROLLGUARD_HOST\"; fi\n\
         exit 0\n",
    );
    let before = hosts_data(&fleet);

    let id = fleet.start_rollout(&bundle, &["--preview"]);
    let status = fleet.wait_state(&id, "completed");
    assert_eq!(status["plan"]["preview"], true);
    assert_eq!(
        status["plan"]["waves"].as_array().unwrap().len(),
        1,
        "a preview goes everywhere at once: {status:#}"
    );
    // A denial does not halt a preview: every host was heard from.
    let states = Fleet::host_states(&status);
    assert!(states.values().all(|s| s == "succeeded"), "{status:#}");
    assert_eq!(
        hosts_data(&fleet),
        before,
        "a preview changed a host\n{}",
        fleet.logs()
    );

    // Grouped: three hosts make the same edit; mail-03 stands apart.
    let (code, groups, _) = cli_any(&fleet, &["rollout", "changes", &id]);
    assert_eq!(code, 1, "a denial makes the preview unclean: {groups:#}");
    let groups = groups.as_array().unwrap();
    assert_eq!(groups.len(), 2, "{groups:#?}");
    let shared_line = format!("modify {} (+1 \u{2212}1)", shared.display());
    assert_eq!(
        groups[0]["hosts"],
        serde_json::json!(["mail-01", "mail-02", "mail-04"])
    );
    assert_eq!(groups[0]["lines"], serde_json::json!([shared_line]));
    assert_eq!(groups[0]["clean"], true);
    assert_eq!(groups[1]["hosts"], serde_json::json!(["mail-03"]));
    assert_eq!(groups[1]["clean"], false);
    let lines: Vec<&str> = groups[1]["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    let customers = fleet.customers("mail-03");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("DENIED") && l.contains(customers.to_str().unwrap())),
        "{lines:?}"
    );
    assert!(lines.contains(&shared_line.as_str()), "{lines:?}");

    // The real rollout after it: refused because of mail-03's denial.
    let out = rollguard_tests::run(fleet.cli().args(["rollout", "start"]).arg(&bundle).args([
        "--after-preview",
        &id,
        "--waves",
        "1,100%",
        "--bake",
        "1s",
    ]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not clean") && err.contains("mail-03"),
        "{err}"
    );
    assert_eq!(hosts_data(&fleet), before, "a refused start changed a host");

    // Without mail-03 the preview was clean: it starts, and runs for real
    // (the preview used no version up).
    let real = fleet.start_rollout(
        &bundle,
        &[
            "--after-preview",
            &id,
            "--exclude",
            "mail-03",
            "--waves",
            "1,100%",
            "--bake",
            "1s",
        ],
    );
    let status = fleet.wait_state(&real, "completed");
    assert_eq!(status["plan"]["after_preview"]["rollout"], id.as_str());
    assert!(status["plan"]["after_preview"]["override_reason"].is_null());
    assert_eq!(
        std::fs::read_to_string(&shared).unwrap(),
        "queue_lifetime = 1d\n"
    );

    // With every host, only an operator's reason overrides the denial;
    // the reason is kept with the rollout.
    let v2 = fleet.bundle(
        "edit-2",
        &manifest("mail-edit", 2, "\"mail-*\"", "1m"),
        "#!/bin/sh\nexit 0\n",
    );
    let (code, answer, _) = cli_any(
        &fleet,
        &[
            "rollout",
            "start",
            v2.to_str().unwrap(),
            "--after-preview",
            &id,
            "--override-reason",
            "mail-03 is decommissioned tonight",
        ],
    );
    // Under --json the error is the JSON object on stdout.
    assert_ne!(code, 0, "another bundle than the one previewed: {answer:#}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap_or("")
            .contains("another bundle"),
        "{answer:#}"
    );
    let forced = fleet.start_rollout(
        &bundle,
        &[
            "--after-preview",
            &id,
            "--override-reason",
            "mail-03 is decommissioned tonight",
            "--waves",
            "1,100%",
            "--bake",
            "1s",
        ],
    );
    let status = fleet.status(&forced);
    assert_eq!(
        status["plan"]["after_preview"]["override_reason"],
        "mail-03 is decommissioned tonight"
    );
    // It runs for real now (the hosts that already ran version 1 refuse
    // it as a rollback, which halts it): it ends either way.
    wait_for("the overridden rollout to halt or complete", || {
        let s = fleet.status(&forced);
        (s["state"] != "running").then_some(())
    });
}
