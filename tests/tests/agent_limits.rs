//! End to end: resource limits through `rollguard-agent run`, from the host
//! policy and the bundle's `[run.resources]`, with the report's
//! `limits_hit`, and a host process a bundle tries to re-limit.

use std::fs;

use rollguard_tests::host::{manifest, Host, Keys, PolicyOptions};
use serde_json::Value;

fn with_resources(host: &Host, table: &str) {
    let mut policy = fs::read_to_string(host.policy()).unwrap();
    policy.push_str(table);
    fs::write(host.policy(), policy).unwrap();
}

fn run_script(host: &Host, keys: &Keys, name: &str, run_table: &str, script: &str) -> Value {
    let man = format!(
        "{}{run_table}",
        manifest(name, 1, "\"mail-*\"", "write = [\"@ROOT@/etc/mail\"]")
    );
    let src = host.bundle_source(name, &man, script);
    let bundle = host.build_signed(&src, keys, &["alice"]);
    host.run(&bundle).0
}

#[test]
fn a_fork_bomb_hits_the_hosts_pids_limit_and_fails_the_run() {
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-03.tokyo", &keys, PolicyOptions::default());
    with_resources(&host, "\n[resources]\npids = 40\n");
    let report = run_script(
        &host,
        &keys,
        "bomb",
        "",
        "#!/bin/sh\ni=0\nwhile [ $i -lt 300 ]; do sleep 3201 & i=$((i+1)); done\nwait\n",
    );
    assert_eq!(report["status"], "failed", "{report:#}");
    assert_eq!(
        report["limits_hit"],
        serde_json::json!(["pids"]),
        "{report:#}"
    );
    assert!(
        report["reason"]
            .as_str()
            .unwrap()
            .contains("resource limit hit: pids"),
        "{report:#}"
    );
}

#[test]
fn a_bundle_may_ask_for_limits_only_within_the_hosts_max() {
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-03.tokyo", &keys, PolicyOptions::default());
    with_resources(
        &host,
        "\n[resources]\ntmp_mib = 4\n[resources.max]\ntmp_mib = 16\n",
    );
    let fill = "#!/bin/sh\ndd if=/dev/zero of=/tmp/fill bs=1M count=12 2>/dev/null\necho dd=$?\n";

    // The host's 4 MiB: the 12 MiB file does not fit.
    let report = run_script(&host, &keys, "small", "", fill);
    assert_eq!(
        report["limits_hit"],
        serde_json::json!(["tmp"]),
        "{report:#}"
    );
    assert_eq!(report["status"], "failed");

    // Asking for 16 MiB (the host's max): it fits.
    let report = run_script(
        &host,
        &keys,
        "asks",
        "\n[run.resources]\ntmp_mib = 16\n",
        fill,
    );
    assert_eq!(report["status"], "succeeded", "{report:#}");
    assert!(report.get("limits_hit").is_none(), "{report:#}");

    // Asking for more than the host's max: refused, nothing ran.
    let report = run_script(
        &host,
        &keys,
        "greedy",
        "\n[run.resources]\ntmp_mib = 64\n",
        "#!/bin/sh\ntouch @ROOT@/etc/mail/greedy-ran\n",
    );
    assert_eq!(report["status"], "refused", "{report:#}");
    assert_eq!(report["refusal"], "scope_ceiling", "{report:#}");
    assert!(!host.root().join("etc/mail/greedy-ran").exists());
}

#[test]
fn the_agent_cannot_be_relimited_by_its_bundle() {
    // The attack that killed the agent mid-run: prlimit on its pid. The
    // run's PID namespace has no pid for it; the run's own denial is still
    // reported.
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-03.tokyo", &keys, PolicyOptions::default());
    let script = "#!/bin/sh\n\
        for p in $(seq 1 400); do [ \"$p\" = \"$$\" ] || prlimit --pid $p --fsize=0:0 --cpu=1:1 2>/dev/null; done\n\
        rm -rf @ROOT@/backup 2>/dev/null\n\
        echo done\n";
    let report = run_script(&host, &keys, "relimit", "", script);
    // The agent lived to report, the denied rm is in the report.
    assert_eq!(report["stdout_tail"], "done\n", "{report:#}");
    let denials = report["denials"].as_array().expect("denials known");
    assert!(!denials.is_empty(), "{report:#}");
    assert!(host.root().join("backup/daily/customers.tar").exists());
}
