//! End to end: `[[notify]]` posts the fleet's events to an operator's hook,
//! here a real HTTP listener on loopback that fails its first post (so the
//! controller must retry). The 2012 replay's halt arrives with the canary's
//! denied paths; a kill and its lift arrive with who did them; a good
//! rollout's completion arrives too.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use rollguard_tests::fleet::{manifest, script, wait_for, Fleet};
use serde_json::Value;

const HOSTS: &[(&str, &[(&str, &str)])] = &[
    ("mail-01", &[("role", "mail")]),
    ("mail-02", &[("role", "mail")]),
    ("mail-03", &[("role", "mail")]),
];

/// The bodies a hook accepted.
type Received = Arc<Mutex<Vec<Value>>>;

/// A minimal HTTP/1.1 hook: answers 503 to its first request, 200 to the
/// rest, and keeps every JSON body it accepted; also counts requests.
fn hook() -> (u16, Received, Arc<Mutex<usize>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let got = Arc::new(Mutex::new(Vec::new()));
    let refused = Arc::new(Mutex::new(0));
    let (g, r) = (got.clone(), refused.clone());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut length = 0;
            let mut first = String::new();
            reader.read_line(&mut first).unwrap_or_default();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap_or_default();
            let first_ever = {
                let mut n = r.lock().unwrap();
                *n += 1;
                *n == 1
            };
            let answer = if first_ever {
                "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
            } else {
                assert!(first.starts_with("POST /hooks/rollguard-T0KEN "), "{first}");
                g.lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).unwrap());
                "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
            };
            let _ = conn.write_all(answer.as_bytes());
        }
    });
    (port, got, refused)
}

fn wait_event(got: &Received, event: &str) -> Value {
    wait_for(&format!("the hook to get {event}"), || {
        got.lock()
            .unwrap()
            .iter()
            .find(|e| e["event"] == event)
            .cloned()
    })
}

#[test]
fn the_fleets_events_reach_the_operators_hook() {
    let (port, got, requests) = hook();
    let mut fleet = Fleet::new(HOSTS);
    let config = fleet.ctl().join("controller.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[[notify]]\nurl = \"http://127.0.0.1:{port}/hooks/rollguard-T0KEN\"\n"
    ));
    std::fs::write(&config, text).unwrap();
    fleet.start_controller();
    fleet.start_agents();

    // The 2012 replay: its canary's deletes are denied, the rollout halts,
    // and the hook hears it with the denied paths.
    let incident = fleet.bundle(
        "incident",
        &manifest("mail-fix-2012", 1, "\"mail-*\"", "1m"),
        &script("rm -rf \"@FLEET@/customers/$ROLLGUARD_HOST\"\necho done"),
    );
    let id = fleet.start_rollout(
        &incident,
        &["--waves", "1,100%", "--bake", "1s", "--canary", "mail-02"],
    );
    fleet.wait_state(&id, "halted");
    let started = wait_event(&got, "rollout.started");
    assert_eq!(started["rollout"], id.as_str(), "{started:#}");
    assert_eq!(started["bundle"], "mail-fix-2012", "{started:#}");
    assert_eq!(started["hosts"], 3, "{started:#}");
    let halted = wait_event(&got, "rollout.halted");
    assert_eq!(halted["rollout"], id.as_str(), "{halted:#}");
    assert!(
        halted["reason"].as_str().unwrap().contains("mail-02"),
        "{halted:#}"
    );
    let denials = halted["denials"].as_array().unwrap();
    assert!(
        denials.iter().any(|d| d["host"] == "mail-02"
            && d["path"].as_str().is_some_and(|p| p.contains("customers"))),
        "{halted:#}"
    );
    assert!(halted["at"].is_string(), "{halted:#}");
    // The first post was refused (503) and retried: nothing was lost.
    assert!(*requests.lock().unwrap() >= 3);

    // A kill and its lift, each with who did it.
    fleet.cli_json(&["kill", "--all", "--reason", "drill"]);
    let kill = wait_event(&got, "kill.issued");
    assert_eq!(
        (&kill["reason"], &kill["scope"]),
        (&"drill".into(), &"all".into()),
        "{kill:#}"
    );
    assert_eq!(kill["by"], "admin", "{kill:#}");
    fleet.cli_json(&["kill", "--lift"]);
    let lifted = wait_event(&got, "kill.lifted");
    assert_eq!(lifted["by"], "admin", "{lifted:#}");

    // A good rollout completes, and says so.
    let good = fleet.bundle(
        "good",
        &manifest("mail-fix", 2, "\"mail-*\"", "1m"),
        &script("echo 'queue_lifetime = 2d' > \"$H/main.cf\""),
    );
    let id = fleet.start_rollout(&good, &["--waves", "1,100%", "--bake", "1s"]);
    fleet.wait_state(&id, "completed");
    let done = wait_for("the completion", || {
        got.lock()
            .unwrap()
            .iter()
            .find(|e| e["event"] == "rollout.completed" && e["rollout"] == id.as_str())
            .cloned()
    });
    assert_eq!(done["rollout"], id.as_str());
}
