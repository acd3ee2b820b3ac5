//! End to end: a real Prometheus Alertmanager (the Debian package) on
//! loopback, whose webhook receiver posts to the controller over mutual TLS
//! with an alert-source certificate. A firing critical alert halts a rollout
//! while it bakes; a warning does not.

use std::fs;
use std::process::{Child, Command, Stdio};

use rollguard_tests::fleet::{manifest, script, wait_for, Fleet};
use rollguard_tests::{bin, run, run_ok};

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

#[test]
fn a_firing_critical_alert_halts_a_baking_rollout() {
    assert!(
        std::path::Path::new(ALERTMANAGER).exists(),
        "{ALERTMANAGER} is missing: install the prometheus-alertmanager package (scripts/install-deps does)"
    );
    let mut fleet = Fleet::new(HOSTS);
    fleet.start_controller();
    fleet.start_agents();

    // Alertmanager authenticates to the controller with its own certificate
    // (alert-source role: it may post alerts, nothing else).
    let am_dir = fleet.root().join("alertmanager");
    run_ok(
        Command::new(bin("rollguard-controller"))
            .args(["enroll", "--role", "alert-source", "--dir"])
            .arg(fleet.ctl())
            .arg("alertmanager")
            .arg("--out")
            .arg(&am_dir),
    );
    let am_port = free_port();
    let am_url = format!("http://127.0.0.1:{am_port}");
    let config = format!(
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
    );
    fs::write(am_dir.join("alertmanager.yml"), config).unwrap();
    let log = fs::File::create(am_dir.join("alertmanager.log")).unwrap();
    let _am = KillOnDrop(
        Command::new(ALERTMANAGER)
            .arg(format!(
                "--config.file={}",
                am_dir.join("alertmanager.yml").display()
            ))
            .arg(format!("--storage.path={}", am_dir.join("data").display()))
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
