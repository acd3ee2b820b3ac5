//! End to end: the inventory (`rollguard agents`) on a real controller
//! with real agents. What each agent said of itself, where it is
//! connected and when its certificate expires; offline hosts left out of
//! plans unless asked for; `agents remove` deregisters and revokes, and
//! only an administrator may.

use rollguard_cli::client::Client;
use rollguard_tests::fleet::{manifest, script, wait_for, Fleet};
use rollguard_tests::{run, run_ok};
use serde_json::Value;

/// A host name longer than any fixed column: the table must fit it.
const LONG: &str = "mail-03.customers.eu-west-2.example-hosting.net";

const HOSTS: &[(&str, &[(&str, &str)])] = &[
    ("mail-01", &[("role", "mail")]),
    ("mail-02", &[("role", "mail")]),
    (LONG, &[("role", "mail")]),
];

fn agent<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == name)
        .unwrap_or_else(|| panic!("{name} not listed: {list:#}"))
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_inventory_says_who_is_where_and_offline_hosts_are_left_out_unless_asked() {
    let mut fleet = Fleet::new(HOSTS);
    fleet.start_controller();
    fleet.start_agents();
    let port = fleet.url().rsplit(':').next().unwrap().to_string();

    // ---- what each agent said of itself, and where it is connected ----------
    let list = fleet.cli_json(&["agents"]);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let now = jiff::Timestamp::now();
    for (name, _) in HOSTS {
        let a = agent(&list, name);
        assert_eq!(a["connected"], true, "{a:#}");
        assert_eq!(a["agent_version"], env!("CARGO_PKG_VERSION"), "{a:#}");
        assert_eq!(a["kernel"], kernel.trim(), "{a:#}");
        // CI's kernel offers Landlock (ABI 7); the agent says which.
        assert!(a["landlock_abi"].as_u64().is_some_and(|v| v >= 1), "{a:#}");
        assert!(
            a["controller"]
                .as_str()
                .is_some_and(|c| c.ends_with(&format!(":{port}"))),
            "{a:#}"
        );
        let first: jiff::Timestamp = a["first_seen"].as_str().unwrap().parse().unwrap();
        assert!(first <= now, "{a:#}");
        // Certificates from `enroll` last 825 days.
        let expires: jiff::Timestamp = a["cert_expires"].as_str().unwrap().parse().unwrap();
        assert!(
            expires.duration_since(now).as_secs() > 800 * 86_400,
            "{a:#}"
        );
    }
    // The table fits the long name in its column, header above it.
    let table = stdout(&run_ok(fleet.cli().arg("agents")));
    let header = table.lines().next().unwrap_or_default().to_string();
    let row = table
        .lines()
        .find(|l| l.contains(LONG))
        .unwrap_or_else(|| panic!("{LONG} not in the table:\n{table}"));
    assert!(
        header.contains("NAME") && header.contains("LAST SEEN") && header.contains("LANDLOCK"),
        "{table}"
    );
    // Every column has its header: a connected agent's "now" falls under
    // LAST SEEN, whatever the widths.
    let state_column = header.find("STATE").unwrap();
    assert_eq!(
        row.find("connected"),
        Some(state_column),
        "the columns line up:\n{table}"
    );
    assert_eq!(
        row.find(" now ").map(|i| i + 1),
        header.find("LAST SEEN"),
        "LAST SEEN heads its column:\n{table}"
    );
    // The certificate's expiry is a metric per agent.
    let op = Client::connect_with(
        &fleet.url(),
        &fleet.ctl().join("ca.crt"),
        &fleet.ctl().join("operator.crt"),
        &fleet.ctl().join("operator.key"),
    )
    .unwrap();
    let metrics = op.get_text("/metrics").unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("rollguard_certificate_expiry_seconds{agent=\"mail-01\"}"))
        .unwrap_or_else(|| panic!("no expiry metric for mail-01:\n{metrics}"));
    let secs: i64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(secs > 800 * 86_400, "{line}");

    // ---- an offline host is named and left out, unless asked for -------------
    fleet.stop_agent("mail-02");
    wait_for("mail-02 to be listed offline", || {
        let list = fleet.cli_json(&["agents"]);
        let a = agent(&list, "mail-02").clone();
        (a["connected"] == false).then_some(a)
    });
    let a = agent(&fleet.cli_json(&["agents"]), "mail-02").clone();
    assert!(a["last_seen"].as_str().is_some(), "{a:#}");
    assert!(a.get("controller").is_none(), "{a:#}");
    let bundle = fleet.bundle(
        "inventory",
        &manifest("inventory", 1, "\"mail-*\"", "1m"),
        &script("true"),
    );
    let waves = ["--waves", "1,100%", "--bake", "0s"];
    let plan_cmd = |extra: &[&str]| {
        let mut cmd = fleet.cli();
        cmd.args(["rollout", "plan"])
            .arg(&bundle)
            .args(waves)
            .args(extra);
        cmd
    };
    let out = run_ok(&mut plan_cmd(&[]));
    let warning = String::from_utf8_lossy(&out.stderr);
    assert!(
        warning.contains("1 in-scope host(s) offline, left out") && warning.contains("mail-02"),
        "{warning}"
    );
    let plan: Value = serde_json::from_slice(&run_ok(&mut plan_cmd(&["--json"])).stdout).unwrap();
    assert_eq!(plan["offline"], serde_json::json!(["mail-02"]), "{plan:#}");
    let planned: Vec<&str> = plan["waves"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|w| w.as_array().unwrap().iter().map(|h| h.as_str().unwrap()))
        .collect();
    assert!(!planned.contains(&"mail-02"), "{plan:#}");
    assert_eq!(planned.len(), 2, "{plan:#}");
    let plan: Value =
        serde_json::from_slice(&run_ok(&mut plan_cmd(&["--include-offline", "--json"])).stdout)
            .unwrap();
    assert_eq!(plan["include_offline"], true, "{plan:#}");
    assert!(plan["waves"].to_string().contains("mail-02"), "{plan:#}");
    // Started without it, the rollout completes on the hosts that are there.
    let id = fleet.start_rollout(&bundle, &waves);
    let done = fleet.wait_state(&id, "completed");
    let hosts = Fleet::host_states(&done);
    assert_eq!(hosts.len(), 2, "{done:#}");
    assert!(!hosts.contains_key("mail-02"), "{done:#}");
    assert!(fleet.runs_on("mail-02").is_empty());
}

#[test]
fn only_an_admin_removes_an_agent_and_its_certificate_is_refused_from_then_on() {
    let mut fleet = Fleet::new(HOSTS);
    fleet.start_controller();
    fleet.start_agents();

    // An operator may not.
    fleet.enroll_person("olga", "operator");
    let out = run(fleet
        .cli_as("olga")
        .args(["agents", "remove", "mail-01", "--json"]));
    assert!(!out.status.success());
    let refused: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("operator certificates may not call")),
        "{refused:#}"
    );
    assert_eq!(
        agent(&fleet.cli_json(&["agents"]), "mail-01")["connected"],
        true
    );

    // An admin (the certificate `init` issues) may.
    let removed = fleet.cli_json(&["agents", "remove", "mail-01"]);
    assert_eq!(removed["name"], "mail-01", "{removed:#}");
    assert_eq!(removed["was_connected"], true, "{removed:#}");
    assert_eq!(
        removed["revoked_serials"].as_array().map(Vec::len),
        Some(1),
        "{removed:#}"
    );
    // Gone from the list, and it stays gone: its agent keeps trying to
    // reconnect with the revoked certificate and is refused each time.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let list = fleet.cli_json(&["agents"]);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|a| a["name"] != "mail-01"),
        "{list:#}"
    );
    let log = std::fs::read_to_string(fleet.agents["mail-01"].log()).unwrap();
    assert!(log.contains("revoked"), "{log}");
    // Removing it again: nothing to remove.
    let out = run(fleet.cli().args(["agents", "remove", "mail-01", "--json"]));
    assert!(!out.status.success());
    let again: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        again["error"]
            .as_str()
            .is_some_and(|e| e.contains("no registered agent")),
        "{again:#}"
    );
    // The others are untouched.
    for name in ["mail-02", LONG] {
        assert_eq!(agent(&list, name)["connected"], true, "{list:#}");
    }
}
