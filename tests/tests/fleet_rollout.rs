//! End to end: a real controller and six real agent daemons on loopback.
//! Staged waves on a good bundle, and the 2012 incident replayed through
//! the fleet: the canary's stray delete is denied and the rollout halts
//! before any other host receives the bundle.

use rollguard_tests::fleet::{manifest, script, Fleet};

const HOSTS: &[(&str, &[(&str, &str)])] = &[
    ("mail-01", &[("role", "mail")]),
    ("mail-02", &[("role", "mail")]),
    ("mail-03", &[("role", "mail")]),
    ("mail-04", &[("role", "mail")]),
    ("mail-05", &[("role", "mail")]),
    ("web-01", &[("role", "web")]),
];

#[test]
fn good_bundle_rolls_out_in_waves_to_in_scope_hosts_only() {
    let mut fleet = Fleet::new(HOSTS);
    fleet.start_controller();
    fleet.start_agents();
    let bundle = fleet.bundle(
        "good",
        &manifest("mail-fix", 1, "\"mail-*\"", "1m"),
        &script("echo 'queue_lifetime = 2d' > \"$H/main.cf\""),
    );

    let plan = fleet.cli_json(&[
        "rollout",
        "plan",
        bundle.to_str().unwrap(),
        "--waves",
        "1,2,100%",
        "--bake",
        "1s",
    ]);
    assert_eq!(
        plan["waves"],
        serde_json::json!([["mail-01"], ["mail-02"], ["mail-03", "mail-04", "mail-05"]]),
        "{plan:#}"
    );
    assert_eq!(plan["out_of_scope"], 1);
    assert!(
        plan["signers"][0].as_str().unwrap().starts_with("alice"),
        "{plan:#}"
    );
    assert!(fleet.runs_on("mail-01").is_empty(), "plan runs nothing");
    // The human-readable plan leads with the blast radius.
    let text = rollguard_tests::run_ok(
        fleet
            .cli()
            .args(["rollout", "plan"])
            .arg(&bundle)
            .args(["--waves", "1,2,100%"]),
    );
    let text = String::from_utf8_lossy(&text.stdout);
    let mail = fleet.root().join("mail");
    for line in [
        "targets  hosts mail-*; labels (any)".to_string(),
        format!("writes   {}", mail.display()),
        "deletes  nothing".to_string(),
        "network  none".to_string(),
        "wave 3  (3 host(s)): mail-03, mail-04, mail-05".to_string(),
    ] {
        assert!(text.contains(&line), "{line:?} not in:\n{text}");
    }
    // Everything at once (the 2012 mistake) needs an explicit flag.
    let out = rollguard_tests::run(
        fleet
            .cli()
            .args(["rollout", "start"])
            .arg(&bundle)
            .args(["--waves", "100%"]),
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no canary"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let id = fleet.start_rollout(
        &bundle,
        &["--waves", "1,2,100%", "--bake", "1s", "--max-failures", "0"],
    );
    // A script follows it live: `watch --json` streams its changes.
    let events = fleet
        .cli()
        .args(["rollout", "watch", "--json", &id])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = fleet.wait_state(&id, "completed");
    assert_watch_events(events.wait_with_output().unwrap(), &id);
    let states = Fleet::host_states(&status);
    assert_eq!(states.len(), 5, "{status:#}");
    assert!(states.values().all(|s| s == "succeeded"), "{status:#}");
    for h in ["mail-01", "mail-02", "mail-03", "mail-04", "mail-05"] {
        assert_eq!(fleet.runs_on(h), vec![id.clone()], "{h} ran exactly once");
        assert_eq!(
            std::fs::read_to_string(fleet.mail(h).join("main.cf")).unwrap(),
            "queue_lifetime = 2d\n"
        );
    }
    assert!(
        fleet.runs_on("web-01").is_empty(),
        "out-of-scope host never ran it"
    );
    assert_eq!(
        std::fs::read_to_string(fleet.mail("web-01").join("main.cf")).unwrap(),
        "queue_lifetime = 5d\n"
    );
    // Each host's report is the agent's own run report.
    let first = &status["hosts"][0]["report"];
    assert_eq!(first["bundle"]["name"], "mail-fix");
    assert_eq!(first["denials"], serde_json::json!([]));

    // `watch` follows it to the end (no terminal here: only the outcome).
    let watch = rollguard_tests::run_ok(fleet.cli().args(["rollout", "watch", &id]));
    assert!(String::from_utf8_lossy(&watch.stderr).contains("completed"));
    let agents = rollguard_tests::run_ok(fleet.cli().args(["agents"]));
    assert!(String::from_utf8_lossy(&agents.stdout).contains("web-01"));
    let op = rollguard_cli::client::Client::connect_with(
        &fleet.url(),
        &fleet.ctl().join("ca.crt"),
        &fleet.ctl().join("operator.crt"),
        &fleet.ctl().join("operator.key"),
    )
    .unwrap();
    let metrics = op.get_text("/metrics").unwrap();
    for line in [
        "rollguard_connected_agents 6",
        "rollguard_runs_total{result=\"succeeded\"} 5",
        "rollguard_rollouts{state=\"completed\"} 1",
        "rollguard_denials_total 0",
    ] {
        assert!(metrics.contains(line), "{line} not in:\n{metrics}");
    }

    // The list, and the operator audit log's hash chain.
    let list = fleet.cli_json(&["rollout", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    let audit = rollguard_tests::run_ok(
        std::process::Command::new(rollguard_tests::bin("rollguard-controller"))
            .args(["log", "verify", "--json", "--config"])
            .arg(fleet.ctl().join("controller.toml")),
    );
    let audit: serde_json::Value = serde_json::from_slice(&audit.stdout).unwrap();
    assert_eq!(audit["ok"], true, "{audit:#}");
}

#[test]
fn incident_replay_canary_denial_halts_after_wave_one() {
    let mut fleet = Fleet::new(HOSTS);
    fleet.start_controller();
    fleet.start_agents();
    let protected_before: Vec<_> = [
        "mail-01", "mail-02", "mail-03", "mail-04", "mail-05", "web-01",
    ]
    .iter()
    .map(|h| {
        (
            Fleet::snapshot(&fleet.customers(h)),
            Fleet::snapshot(&fleet.backup(h)),
        )
    })
    .collect();
    // The 2012 program: a mail fix with a stray line deleting customer data
    // and backups on the host it runs on.
    let bundle = fleet.incident_bundle();
    let id = fleet.start_rollout(
        &bundle,
        &["--waves", "1,100%", "--bake", "1s", "--canary", "mail-03"],
    );
    let status = fleet.wait_state(&id, "halted");
    let states = Fleet::host_states(&status);
    assert_eq!(
        states["mail-03"], "succeeded",
        "the script exits 0, but its deletes were denied: {status:#}"
    );
    let reason = status["halt_reason"].as_str().unwrap();
    assert!(
        reason.contains("mail-03") && reason.contains("denied"),
        "{reason}"
    );
    let canary = status["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == "mail-03")
        .unwrap();
    let denials = canary["report"]["denials"]
        .as_array()
        .expect("denials observed");
    assert!(
        denials
            .iter()
            .any(|d| d["path"].as_str().unwrap_or("").contains("customers")),
        "the denied delete is reported with its path: {canary:#}"
    );
    for h in ["mail-01", "mail-02", "mail-04", "mail-05"] {
        assert_eq!(states[h], "pending", "{h} never received the bundle");
        assert!(fleet.runs_on(h).is_empty());
    }
    assert!(fleet.runs_on("web-01").is_empty());
    let protected_after: Vec<_> = [
        "mail-01", "mail-02", "mail-03", "mail-04", "mail-05", "web-01",
    ]
    .iter()
    .map(|h| {
        (
            Fleet::snapshot(&fleet.customers(h)),
            Fleet::snapshot(&fleet.backup(h)),
        )
    })
    .collect();
    assert_eq!(
        protected_before, protected_after,
        "no customer or backup file changed anywhere"
    );
    assert!(
        fleet.mail("mail-03").join("enabled").exists(),
        "the in-scope part of the canary run happened"
    );
}

/// `rollout watch --json` of a rollout followed from its start to its end:
/// one JSON object per line, the rollout first, each host's success with
/// its report, and the end last, with the status the command exits with.
fn assert_watch_events(out: std::process::Output, id: &str) {
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(events.iter().all(|e| e["id"] == id), "{events:#?}");
    assert_eq!(events[0]["event"], "rollout", "{events:#?}");
    let end = events.last().unwrap();
    assert_eq!(
        (&end["event"], &end["state"], &end["exit_code"]),
        (&"end".into(), &"completed".into(), &0.into()),
        "{events:#?}"
    );
    for h in ["mail-01", "mail-02", "mail-03", "mail-04", "mail-05"] {
        let done = events
            .iter()
            .find(|e| e["event"] == "host" && e["host"] == h && e["state"] == "succeeded")
            .unwrap_or_else(|| panic!("no success event for {h}: {events:#?}"));
        assert_eq!(done["report"]["host"], h, "{done:#}");
    }
}

/// `--limit` and `--exclude` narrow the bundle's targets for one rollout:
/// the plan names the hosts left out, only the kept hosts run the bundle,
/// and a pattern matching none of the targets (a typo) is refused before
/// anything starts, never ignored.
#[test]
fn limit_and_exclude_choose_among_the_targets() {
    let mut fleet = Fleet::new(HOSTS);
    fleet.start_controller();
    fleet.start_agents();
    let bundle = fleet.bundle(
        "limited",
        &manifest("mail-fix", 1, "\"mail-*\"", "1m"),
        &script("echo 'queue_lifetime = 2d' > \"$H/main.cf\""),
    );
    let b = bundle.to_str().unwrap();
    let narrowed = [
        "--limit",
        "mail-0[1-3]",
        "--limit",
        "web-01",
        "--exclude",
        "mail-02",
    ];
    // web-01 is not a target: a --limit cannot widen the bundle's targets.
    let out = rollguard_tests::run(fleet.cli().args(["rollout", "plan", b]).args(narrowed));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--limit \"web-01\" matches no host"), "{err}");

    let narrowed = ["--limit", "mail-0[1-3]", "--exclude", "mail-02"];
    let mut args = vec!["rollout", "plan", b, "--waves", "1,100%"];
    args.extend(narrowed);
    let plan = fleet.cli_json(&args);
    assert_eq!(
        plan["waves"],
        serde_json::json!([["mail-01"], ["mail-03"]]),
        "{plan:#}"
    );
    assert_eq!(
        plan["left_out"],
        serde_json::json!(["mail-02", "mail-04", "mail-05"]),
        "{plan:#}"
    );

    // A mistyped --exclude would send the bundle to the host it spares.
    let out = rollguard_tests::run(fleet.cli().args([
        "rollout",
        "start",
        b,
        "--waves",
        "1,100%",
        "--exclude",
        "mial-02",
    ]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--exclude \"mial-02\" matches no host"),
        "{err}"
    );

    let mut start = vec!["--waves", "1,100%", "--bake", "1s"];
    start.extend(narrowed);
    let id = fleet.start_rollout(&bundle, &start);
    let status = fleet.wait_state(&id, "completed");
    for h in ["mail-01", "mail-03"] {
        assert_eq!(fleet.runs_on(h), vec![id.clone()], "{h} ran it: {status:#}");
    }
    for h in ["mail-02", "mail-04", "mail-05", "web-01"] {
        assert!(fleet.runs_on(h).is_empty(), "{h} was left out: {status:#}");
    }
}
