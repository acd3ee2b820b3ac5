//! End to end: the roles of people's certificates. A viewer reads and
//! changes nothing; an operator may stop everything (halt, kill) but not
//! lift a kill; an administrator (the certificate `init` issues) may. Real
//! controller, real agents, certificates enrolled with the controller's
//! own `enroll --role`.

use rollguard_cli::client::Client;
use rollguard_tests::fleet::Fleet;
use serde_json::{json, Value};

const HOSTS: &[(&str, &[(&str, &str)])] = &[("mail-01", &[("role", "mail")])];

fn forbidden<T: std::fmt::Debug>(r: anyhow::Result<T>, role: &str) {
    match r {
        Ok(v) => panic!("a {role} certificate was allowed: {v:?}"),
        Err(e) => {
            let e = format!("{e:#}");
            assert!(
                e.contains("403") && e.contains(&format!("{role} certificates may not call")),
                "{e}"
            );
        }
    }
}

#[test]
fn viewers_read_operators_stop_and_only_admins_lift_a_kill() {
    let mut fleet = Fleet::new(HOSTS);
    fleet.start_controller();
    fleet.start_agents();
    let url = fleet.url();
    let ca = fleet.ctl().join("ca.crt");
    let person = |name: &str, role: &str| {
        let out = fleet.enroll_person(name, role);
        Client::connect_with(
            &url,
            &ca,
            &out.join(format!("{name}.crt")),
            &out.join(format!("{name}.key")),
        )
        .unwrap()
    };
    let viewer = person("val", "viewer");
    let operator = person("olga", "operator");
    let admin = Client::connect_with(
        &url,
        &ca,
        &fleet.ctl().join("operator.crt"),
        &fleet.ctl().join("operator.key"),
    )
    .unwrap();
    let kill = json!({"scope": "all", "reason": "roles test"});

    // A viewer reads everything and changes nothing.
    for path in ["/v1/rollouts", "/v1/agents", "/v1/kill"] {
        viewer.get::<Value>(path).unwrap();
    }
    forbidden(viewer.post::<_, Value>("/v1/kill", &kill), "viewer");
    forbidden(
        viewer.post::<_, Value>("/v1/kill/lift", &json!({})),
        "viewer",
    );
    forbidden(
        viewer.post::<_, Value>("/v1/rollouts/plan", &json!({})),
        "viewer",
    );
    forbidden(
        viewer.post::<_, Value>("/v1/rollouts/r-1/retry", &json!({"failed": true})),
        "viewer",
    );

    // An operator stops everything, but cannot lift the stop.
    let killed: Value = operator.post("/v1/kill", &kill).unwrap();
    assert_eq!(killed["state"]["all"]["reason"], "roles test", "{killed:#}");
    assert_eq!(killed["state"]["all"]["by"], "olga", "{killed:#}");
    forbidden(
        operator.post::<_, Value>("/v1/kill/lift", &json!({})),
        "operator",
    );
    let state: Value = viewer.get("/v1/kill").unwrap();
    assert_eq!(
        state["all"]["reason"], "roles test",
        "still in force: {state:#}"
    );

    // The administrator lifts it.
    let lifted: Value = admin.post("/v1/kill/lift", &json!({})).unwrap();
    assert_eq!(lifted["state"]["all"], Value::Null, "{lifted:#}");
}
