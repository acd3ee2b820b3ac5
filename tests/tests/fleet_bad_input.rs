//! End to end: bad input to the controller gets a clear error and never
//! takes it down — no client certificate, an agent certificate on operator
//! endpoints, an operator certificate on agent endpoints, a revoked
//! certificate, malformed JSON, oversized bodies.

use std::process::Command;

use rollguard_cli::client::Client;
use rollguard_tests::fleet::{wait_for, Fleet};
use rollguard_tests::{bin, run, run_ok};

const HOSTS: &[(&str, &[(&str, &str)])] = &[
    ("mail-01", &[("role", "mail")]),
    ("mail-02", &[("role", "mail")]),
    ("mail-03", &[("role", "mail")]),
    ("mail-04", &[("role", "mail")]),
    ("mail-05", &[("role", "mail")]),
];

fn err_text<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn bad_clients_get_clear_errors_and_the_controller_keeps_serving() {
    let mut fleet = Fleet::new(HOSTS);
    fleet.start_controller();
    fleet.start_agents();
    let url = fleet.url();
    let ca = fleet.ctl().join("ca.crt");
    let op = Client::connect_with(
        &url,
        &ca,
        &fleet.ctl().join("operator.crt"),
        &fleet.ctl().join("operator.key"),
    )
    .unwrap();
    let creds = |h: &str| fleet.agents[h].dir.join("creds");

    // No client certificate: refused in the handshake.
    let anon =
        Client::connect_anonymous(&url, &ca).and_then(|c| c.get::<serde_json::Value>("/v1/agents"));
    let e = err_text(anon);
    // TLS 1.3: the client finishes its side of the handshake before the
    // server checks its certificate, so it may see the server's alert, the
    // close, or a broken pipe while it is still sending the request. That
    // the refusal was the handshake's is checked on the server's side below.
    assert!(
        e.contains("CertificateRequired")
            || e.contains("connection closed")
            || e.contains("broken pipe"),
        "{e}"
    );
    wait_for("the controller to log the refused handshake", || {
        let log = std::fs::read_to_string(fleet.ctl().join("controller.log")).ok()?;
        log.contains("peer sent no certificates").then_some(())
    });

    // An agent certificate cannot call operator endpoints.
    let agent = Client::connect_with(
        &url,
        &ca,
        &creds("mail-01").join("mail-01.crt"),
        &creds("mail-01").join("mail-01.key"),
    )
    .unwrap();
    let e = err_text(agent.get::<serde_json::Value>("/v1/rollouts"));
    assert!(
        e.contains("403") && e.contains("agent certificates may not call"),
        "{e}"
    );
    let e = err_text(agent.post::<_, serde_json::Value>(
        "/v1/kill",
        &serde_json::json!({"scope": "all", "reason": "x"}),
    ));
    assert!(e.contains("403"), "{e}");
    // ... nor register as another host.
    let e = err_text(agent.post::<_, serde_json::Value>(
        "/v1/agent/connect",
        &serde_json::json!({"name": "mail-02"}),
    ));
    assert!(e.contains("cannot register as"), "{e}");
    // A person's certificate (here the administrator's) cannot
    // impersonate an agent.
    let e = err_text(
        op.post::<_, serde_json::Value>("/v1/agent/connect", &serde_json::json!({"name": "admin"})),
    );
    assert!(e.contains("admin certificates may not call"), "{e}");
    let e = err_text(op.post_raw("/v1/agent/reports", b"{}".to_vec()));
    assert!(e.contains("403"), "{e}");

    // Malformed JSON, unknown fields, bad ids, wrong payload versions.
    for (path, body, expect) in [
        ("/v1/kill", &b"{not json"[..], "invalid JSON body"),
        (
            "/v1/kill",
            br#"{"scope":"all","reason":"x","extra":1}"#,
            "unknown field",
        ),
        (
            "/v1/rollouts",
            br#"{"bundle_sha256":"../../etc/passwd"}"#,
            "SHA-256",
        ),
        ("/v1/rollouts/plan", b"[]", "invalid JSON body"),
        (
            "/v1/alerts/alertmanager",
            br#"{"version":"3","alerts":[]}"#,
            "unsupported Alertmanager webhook version",
        ),
        ("/v1/rollouts/..%2F..%2Fx/halt", br#"{"reason":"x"}"#, "400"),
    ] {
        let e = err_text(op.post_raw(path, body.to_vec()));
        assert!(
            e.contains(expect),
            "{path} {:?}: {e}",
            String::from_utf8_lossy(body)
        );
    }
    let e = err_text(op.get::<serde_json::Value>("/v1/rollouts/r-does-not-exist"));
    assert!(e.contains("404") && e.contains("no rollout"), "{e}");

    // Oversized bodies: refused, not buffered.
    let e = err_text(op.post_raw("/v1/kill", vec![b' '; 4 * 1024 * 1024]));
    assert!(e.contains("413"), "{e}");

    // Revocation: the agent's certificate stops working, its order stream
    // closes, and an operator certificate can be revoked too.
    fleet.enroll_person("bob", "operator");
    let bob = Client::connect_with(
        &url,
        &ca,
        &fleet.root().join("bob/bob.crt"),
        &fleet.root().join("bob/bob.key"),
    )
    .unwrap();
    bob.get::<serde_json::Value>("/v1/agents").unwrap();
    for name in ["mail-05", "bob"] {
        run_ok(
            Command::new(bin("rollguard-controller"))
                .args(["revoke", "--dir"])
                .arg(fleet.ctl())
                .arg(name),
        );
    }
    let e = wait_for("the revocation to take effect", || {
        let fresh = Client::connect_with(
            &url,
            &ca,
            &fleet.root().join("bob/bob.crt"),
            &fleet.root().join("bob/bob.key"),
        )
        .ok()?;
        fresh
            .get::<serde_json::Value>("/v1/agents")
            .err()
            .map(|e| format!("{e:#}"))
    });
    assert!(e.contains("revoked"), "{e}");
    let revoked_agent = Client::connect_with(
        &url,
        &ca,
        &creds("mail-05").join("mail-05.crt"),
        &creds("mail-05").join("mail-05.key"),
    )
    .unwrap();
    let e = err_text(revoked_agent.post::<_, serde_json::Value>(
        "/v1/agent/connect",
        &serde_json::json!({"name": "mail-05"}),
    ));
    assert!(e.contains("revoked"), "{e}");
    wait_for("the revoked agent's stream to close", || {
        let agents = fleet.cli_json(&["agents"]);
        agents
            .as_array()?
            .iter()
            .any(|a| a["name"] == "mail-05" && a["connected"] == false)
            .then_some(())
    });

    // Still serving, to the operator and the other agents.
    let agents = fleet.cli_json(&["agents"]);
    let connected = agents
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["connected"] == true)
        .count();
    assert_eq!(connected, 4, "{agents:#}");
    let out = run(fleet.cli().args(["rollout", "list"]));
    assert!(out.status.success());
    let metrics = op.get_text("/metrics").unwrap();
    assert!(
        metrics.contains("rollguard_connected_agents 4"),
        "{metrics}"
    );
}
