//! End to end: a host enrolls without any key being copied to it. The
//! controller (with `[enrollment]`) makes a one-time token
//! (`rollguard-controller token create`); `rollguard-agent enroll` checks
//! the controller's CA against the fingerprint, generates the key on the
//! host and sends a signing request; the agent then serves with those
//! credentials and, its certificates being short-lived here, renews them
//! by itself while staying connected. A token works once, for its host,
//! until it expires; a wrong fingerprint is refused before the token is sent.
//! Removing the agent revokes every certificate it was issued.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use rollguard_tests::fleet::{wait_for, Fleet};
use rollguard_tests::{bin, run, run_ok};
use serde_json::Value;

fn token(config: &Path, host: &str, ttl: &str) -> String {
    let out = run_ok(
        Command::new(bin("rollguard-controller"))
            .args(["token", "create", "--config"])
            .arg(config)
            .args(["--host", host, "--ttl", ttl, "--json"]),
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["host"], host, "{v}");
    v["token"].as_str().unwrap().to_string()
}

fn enroll(url: &str, fingerprint: &str, token: &str, name: &str, dir: &Path) -> Output {
    run(Command::new(bin("rollguard-agent"))
        .args(["enroll", "--url", url, "--ca-fingerprint", fingerprint])
        .args(["--name", name, "--dir"])
        .arg(dir)
        .arg("--json")
        .env("ROLLGUARD_ENROLL_TOKEN", token))
}

/// Failed, saying `why` (with `--json`, the error is a JSON object on stdout).
fn refused(out: &Output, why: &str) {
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "should have failed: {said}");
    assert!(said.contains(why), "expected {why:?} in: {said}");
}

fn entry(fleet: &Fleet, name: &str) -> Option<Value> {
    fleet
        .cli_json(&["agents"])
        .as_array()?
        .iter()
        .find(|a| a["name"] == name)
        .cloned()
}

#[test]
fn a_host_enrolls_with_a_one_time_token_and_renews_by_itself() {
    let mut fleet = Fleet::new(&[("web-1", &[])]);
    let ctl = fleet.ctl();
    let config = ctl.join("controller.toml");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Certificates of 30 s: renewed after about 20 s.
    let mut text = fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[enrollment]\nlisten = \"127.0.0.1:{port}\"\nagents_ca_key = \"ca/agents-ca.key\"\ncert_lifetime = \"30s\"\n"
    ));
    fs::write(&config, text).unwrap();
    fleet.start_controller();
    let url = format!("https://127.0.0.1:{port}");
    let fingerprint = rollguard_controller::pki::fingerprint_of_pem(&ctl.join("ca.crt")).unwrap();
    let dir = fleet.root().join("agents/web-1/enrolled");

    // `init --json` tells the operator the fingerprint.
    let scratch = tempfile::tempdir().unwrap();
    let out = run_ok(
        Command::new(bin("rollguard-controller"))
            .args(["init", "--json", "--dir"])
            .arg(scratch.path().join("ca")),
    );
    let init: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        init["ca_fingerprint"]
            .as_str()
            .is_some_and(|f| f.starts_with("SHA256:") && f.len() == 7 + 64),
        "{init}"
    );

    let t = token(&config, "web-1", "1h");
    assert!(t.starts_with("rgt_"), "{t}");

    // ---- refusals ----------------------------------------------------------
    // Another CA's fingerprint (someone in between, or the wrong
    // controller): refused before the token is sent.
    let other = init["ca_fingerprint"].as_str().unwrap();
    refused(
        &enroll(&url, other, &t, "web-1", &dir),
        "refusing to enroll",
    );
    assert!(!dir.join("agent.key").exists());
    // A token made for another host: refused, and not used up.
    refused(
        &enroll(&url, &fingerprint, &t, "web-2", &dir),
        "token refused",
    );
    // An unknown token.
    let unknown = format!("rgt_{}", "0".repeat(64));
    refused(
        &enroll(&url, &fingerprint, &unknown, "web-1", &dir),
        "token refused",
    );
    // An expired one.
    let expired = token(&config, "web-1", "1s");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    refused(
        &enroll(&url, &fingerprint, &expired, "web-1", &dir),
        "token refused",
    );

    // ---- enrollment ----------------------------------------------------------
    let out = enroll(&url, &fingerprint, &t, "web-1", &dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = dir.join("agent.key");
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        fs::read(dir.join("ca.crt")).unwrap(),
        fs::read(ctl.join("ca.crt")).unwrap()
    );
    // Once only, even into a fresh directory.
    refused(
        &enroll(&url, &fingerprint, &t, "web-1", &fleet.root().join("again")),
        "token refused",
    );
    // An existing key is never replaced without --force.
    let t2 = token(&config, "web-1", "1h");
    refused(
        &enroll(&url, &fingerprint, &t2, "web-1", &dir),
        "already exists",
    );

    // ---- the agent serves with what it enrolled --------------------------------
    let policy_path = fleet.agents["web-1"].policy();
    let creds = fleet.root().join("agents/web-1/creds");
    let policy = fs::read_to_string(&policy_path)
        .unwrap()
        .replace(
            &format!("{:?}", creds.join("web-1.crt")),
            &format!("{:?}", dir.join("agent.crt")),
        )
        .replace(
            &format!("{:?}", creds.join("web-1.key")),
            &format!("{:?}", key),
        )
        .replace(
            &format!("{:?}", ctl.join("ca.crt")),
            &format!("{:?}", dir.join("ca.crt")),
        );
    assert!(policy.contains("enrolled/agent.key"), "{policy}");
    fs::write(&policy_path, policy).unwrap();
    fleet.start_agent("web-1");
    fleet.wait_connected("web-1");
    let first = entry(&fleet, "web-1").unwrap();
    let expires: jiff::Timestamp = first["cert_expires"].as_str().unwrap().parse().unwrap();
    let until = expires.duration_since(jiff::Timestamp::now()).as_secs();
    assert!(until <= 31, "a 30 s certificate: {first:#}");
    let key_before = fs::read(&key).unwrap();

    // ---- renewal by itself, staying connected ------------------------------------
    let renewed = wait_for("the agent to renew its certificate", || {
        let a = entry(&fleet, "web-1")?;
        let later: jiff::Timestamp = a["cert_expires"].as_str()?.parse().ok()?;
        (a["connected"] == true && later > expires && fs::read(&key).ok()? != key_before)
            .then_some(a)
    });
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600,
        "{renewed:#}"
    );
    assert!(!dir.join("agent.key.new").exists() && !dir.join("agent.crt.new").exists());

    // Every enrollment and renewal is in the operator log, whose chain holds.
    let out = run_ok(
        Command::new(bin("rollguard-controller"))
            .args(["log", "verify", "--json", "--config"])
            .arg(&config),
    );
    let verified: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(verified["ok"], true, "{verified}");
    let log = fs::read_to_string(ctl.join("controller.log")).unwrap();
    assert!(log.contains("agent.enroll"), "{log}");
    assert!(log.contains("agent.renew"), "{log}");

    // ---- removal revokes every certificate enrollment and renewal issued ----
    let removed = fleet.cli_json(&["agents", "remove", "web-1"]);
    let revoked = removed["revoked_serials"].as_array().unwrap();
    assert!(revoked.len() >= 2, "enrolled and renewed: {removed:#}");
    // Its agent keeps trying with a revoked certificate (and cannot renew
    // it): it stays out.
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert!(entry(&fleet, "web-1").is_none());
}
