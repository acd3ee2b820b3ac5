//! End to end: a real Prometheus Alertmanager (the Debian package) on
//! loopback, whose webhook receiver posts to the controller over mutual TLS
//! with an alert-source certificate. A firing critical alert halts a rollout
//! while it bakes; a warning does not.
//!
//! And the level-triggered gates: with `[alertmanager] url` in the
//! controller's configuration (and no webhook reaching the controller), an
//! alert already active refuses `rollout start` and `rollout resume`, and
//! one that starts during a bake halts the rollout before its next wave.

use std::fs;
use std::process::{Child, Command, Stdio};

use rollguard_tests::fleet::{manifest, script, wait_for, Fleet};
use rollguard_tests::{run, run_ok};

const HOSTS: &[(&str, &[(&str, &str)])] = &[
    ("mail-01", &[("role", "mail")]),
    ("mail-02", &[("role", "mail")]),
    ("mail-03", &[("role", "mail")]),
    ("mail-04", &[("role", "mail")]),
    ("mail-05", &[("role", "mail")]),
];

const ALERTMANAGER: &str = "/usr/bin/prometheus-alertmanager";

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn amtool(url: &str, args: &[&str]) -> std::process::Output {
    run(Command::new("amtool")
        .arg(format!("--alertmanager.url={url}"))
        .args(args))
}

/// Start Alertmanager on loopback with `config` (its YAML) in `dir`;
/// returns it and its URL once it answers.
fn start_alertmanager(
    dir: &std::path::Path,
    config: impl FnOnce(&str) -> String,
) -> (KillOnDrop, String) {
    assert!(
        std::path::Path::new(ALERTMANAGER).exists(),
        "{ALERTMANAGER} is missing: install the prometheus-alertmanager package (scripts/install-deps does)"
    );
    fs::create_dir_all(dir).unwrap();
    let am_port = free_port();
    let am_url = format!("http://127.0.0.1:{am_port}");
    fs::write(dir.join("alertmanager.yml"), config(&am_url)).unwrap();
    let log = fs::File::create(dir.join("alertmanager.log")).unwrap();
    let am = KillOnDrop(
        Command::new(ALERTMANAGER)
            .arg(format!(
                "--config.file={}",
                dir.join("alertmanager.yml").display()
            ))
            .arg(format!("--storage.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{am_port}"))
            .arg("--cluster.listen-address=")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start prometheus-alertmanager"),
    );
    wait_for("Alertmanager to be ready", || {
        amtool(&am_url, &["config", "show"])
            .status
            .success()
            .then_some(())
    });
    (am, am_url)
}

#[test]
fn a_firing_critical_alert_halts_a_baking_rollout() {
    let mut fleet = Fleet::new(HOSTS);
    fleet.start_controller();
    fleet.start_agents();

    // Alertmanager authenticates to the controller with its own certificate
    // (alert-source role: it may post alerts, nothing else).
    let am_dir = fleet.enroll_person("alertmanager", "alert-source");
    let (_am, am_url) = start_alertmanager(&am_dir, |_| {
        format!(
            r#"route:
  receiver: rollguard
  group_by: ['alertname']
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: rollguard
    webhook_configs:
      - url: "{url}/v1/alerts/alertmanager"
        send_resolved: false
        http_config:
          tls_config:
            ca_file: "{ca}"
            cert_file: "{cert}"
            key_file: "{key}"
"#,
            url = fleet.url(),
            ca = fleet.ctl().join("ca.crt").display(),
            cert = am_dir.join("alertmanager.crt").display(),
            key = am_dir.join("alertmanager.key").display(),
        )
    });

    let bundle = fleet.bundle(
        "baking",
        &manifest("mail-fix", 1, "\"mail-*\"", "1m"),
        &script("true"),
    );
    let id = fleet.start_rollout(&bundle, &["--waves", "1,100%", "--bake", "30m"]);
    wait_for("wave 1 to bake", || {
        (fleet.status(&id)["phase"] == "baking").then_some(())
    });

    // A warning does not match the default halt selector (severity=critical).
    let out = amtool(
        &am_url,
        &[
            "alert",
            "add",
            "alertname=QueueSlow",
            "severity=warning",
            "service=mail",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = amtool(
        &am_url,
        &[
            "alert",
            "add",
            "alertname=MailQueueStuck",
            "severity=critical",
            "service=mail",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let status = fleet.wait_state(&id, "halted");
    let reason = status["halt_reason"].as_str().unwrap();
    assert!(reason.contains("alert MailQueueStuck fired"), "{reason}");
    let states = Fleet::host_states(&status);
    assert_eq!(states["mail-01"], "succeeded");
    for h in ["mail-02", "mail-03", "mail-04", "mail-05"] {
        assert_eq!(
            states[h], "pending",
            "no further wave after the alert: {status:#}"
        );
        assert!(fleet.runs_on(h).is_empty());
    }
}

/// An Alertmanager whose only receiver sends nothing anywhere (the
/// controller hears of alerts only by asking), and a fleet whose controller
/// asks it: `[alertmanager] url` in controller.toml. Controller and agents
/// are running.
fn gated_fleet() -> (Fleet, KillOnDrop, String) {
    let mut fleet = Fleet::new(HOSTS);
    let (am, am_url) = start_alertmanager(&fleet.root().join("alertmanager"), |_| {
        "route:\n  receiver: silent\n  group_wait: 0s\n  group_interval: 1s\n  repeat_interval: 1h\n\
         receivers:\n  - name: silent\n"
            .to_string()
    });
    let config = fleet.ctl().join("controller.toml");
    let mut text = fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[alertmanager]\nurl = \"{am_url}\"\ntimeout = \"3s\"\n"
    ));
    fs::write(&config, text).unwrap();
    fleet.start_controller();
    fleet.start_agents();
    (fleet, am, am_url)
}

/// `date -u -d OFFSET` in RFC 3339 (amtool's --start/--end).
fn rfc3339(offset: &str) -> String {
    let out = run_ok(Command::new("date").args(["-u", "-d", offset, "+%Y-%m-%dT%H:%M:%SZ"]));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Alerts named `name` that Alertmanager's API lists as active now.
fn active_alerts(am_url: &str, name: &str) -> usize {
    let out = amtool(
        am_url,
        &["-o", "json", "alert", "query", &format!("alertname={name}")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array().map_or(0, Vec::len)
}

const STUCK: &[&str] = &[
    "alertname=MailQueueStuck",
    "severity=critical",
    "service=mail",
];

fn fire(am_url: &str, labels: &[&str]) {
    let mut args = vec!["alert", "add"];
    args.extend_from_slice(labels);
    args.push("--annotation=summary=mail queue is not draining");
    let out = amtool(am_url, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("Alertmanager to list the alert", || {
        (active_alerts(am_url, "MailQueueStuck") > 0).then_some(())
    });
}

/// Post the alert again as ended a second ago: Alertmanager resolves it.
fn resolve(am_url: &str, labels: &[&str]) {
    let start = format!("--start={}", rfc3339("-120 seconds"));
    let end = format!("--end={}", rfc3339("-1 second"));
    let mut args = vec!["alert", "add"];
    args.extend_from_slice(labels);
    args.push(&start);
    args.push(&end);
    let out = amtool(am_url, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("Alertmanager to stop listing the alert", || {
        (active_alerts(am_url, "MailQueueStuck") == 0).then_some(())
    });
}

#[test]
fn an_alert_firing_before_the_start_refuses_it_until_it_ends() {
    let (fleet, _am, am_url) = gated_fleet();
    let bundle = fleet.bundle(
        "gated",
        &manifest("mail-fix", 1, "\"mail-*\"", "1m"),
        &script("true"),
    );

    // A bad matcher is refused before anything is asked or sent.
    let out = run(fleet.cli().args(["rollout", "plan"]).arg(&bundle).args([
        "--waves",
        "1,100%",
        "--halt-on",
        "service=~(unclosed",
    ]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad regex"), "{err}");

    fire(&am_url, STUCK);
    let start = |extra: &[&str]| {
        run(fleet
            .cli()
            .args(["rollout", "start"])
            .arg(&bundle)
            .args(["--waves", "1,100%", "--bake", "1s"])
            .args(extra))
    };
    // Refused: the default halt_on (severity=critical), and an operator
    // regex that matches it too.
    for extra in [
        &[][..],
        &["--halt-on", "service=~\"mail|web\",severity!=warning"][..],
    ] {
        let out = start(extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "start was not refused: {err}");
        assert!(
            err.contains("not starting the rollout")
                && err.contains("alert MailQueueStuck is firing"),
            "{err}"
        );
    }
    let list = fleet.cli_json(&["rollout", "list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list:#}");
    for (h, _) in HOSTS {
        assert!(fleet.runs_on(h).is_empty(), "{h} ran something");
    }

    // Once the alert has ended, the same start goes through.
    resolve(&am_url, STUCK);
    let id = fleet.start_rollout(&bundle, &["--waves", "1,100%", "--bake", "1s"]);
    let status = fleet.wait_state(&id, "completed");
    for (h, _) in HOSTS {
        assert_eq!(fleet.runs_on(h), vec![id.clone()], "{status:#}");
    }
}

#[test]
fn an_alert_that_starts_during_a_bake_halts_before_the_next_wave_without_the_webhook() {
    let (fleet, _am, am_url) = gated_fleet();
    let bundle = fleet.bundle(
        "gated-bake",
        &manifest("mail-fix", 1, "\"mail-*\"", "1m"),
        &script("true"),
    );
    let id = fleet.start_rollout(&bundle, &["--waves", "1,100%", "--bake", "20s"]);
    wait_for("wave 1 to bake", || {
        (fleet.status(&id)["phase"] == "baking").then_some(())
    });
    fire(&am_url, STUCK);

    let status = fleet.wait_state(&id, "halted");
    let reason = status["halt_reason"].as_str().unwrap();
    assert!(
        reason.contains("before wave 2") && reason.contains("alert MailQueueStuck is firing"),
        "{reason}"
    );
    let states = Fleet::host_states(&status);
    assert_eq!(states["mail-01"], "succeeded");
    for h in ["mail-02", "mail-03", "mail-04", "mail-05"] {
        assert_eq!(states[h], "pending", "{status:#}");
        assert!(fleet.runs_on(h).is_empty());
    }

    // Resume is refused while the alert is active, and goes on after it.
    let out = run(fleet.cli().args(["rollout", "resume", &id]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "resume was not refused: {err}");
    assert!(err.contains("alert MailQueueStuck is firing"), "{err}");
    resolve(&am_url, STUCK);
    run_ok(fleet.cli().args(["rollout", "resume", &id]));
    fleet.wait_state(&id, "completed");
    for h in ["mail-02", "mail-03", "mail-04", "mail-05"] {
        assert_eq!(fleet.runs_on(h), vec![id.clone()]);
    }
}
