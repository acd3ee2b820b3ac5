//! A real host, end to end: our own `.deb`, installed with `dpkg -i` into a
//! container booting systemd 252 (Debian 12), its `rollguard-agent.service`
//! started by that systemd from the unit as shipped (no drop-in, every
//! hardening line applies), connected to a controller on this machine.
//! Rollouts through the controller then show the hardened unit leaves the
//! agent what it needs: its cgroups (per-run cgroups beneath its own,
//! `Delegate=yes`), namespaces, Landlock and seccomp.
//!
//! 1. A signed bundle rolls out: the host reports success and the change
//!    is on the container's disk, nothing else changed.
//! 2. The 2012 replay (a mail fix with a stray `rm -rf` of customer data
//!    and backups) on the same host: the deletes are denied by the kernel,
//!    nothing protected is lost, and the rollout halts.
//!
//! 3. A patch (`[packages]`/`[services]`) on the same host: a test package
//!    (`rgpkgtest`: a conffile, a long-running service with its unit in
//!    `/lib/systemd/system`, a postinst calling `deb-systemd-invoke
//!    restart`), v1 installed bare with `dpkg -i` and its service started;
//!    a signed bundle installing v2 and declaring `restart =
//!    ["rgpkgtest.service"]` rolls out: dpkg in the container shows v2, the
//!    service has a new MainPID, the report the controller holds says
//!    `main_pid_before`/`after` and success. The package's scope contains
//!    the agent's unit directory: the agent's unit there is pinned
//!    read-only, its missing drop-in directories are created empty and
//!    pinned (and stay, empty, afterwards). The policy allows the scope and
//!    the service (`fleet_host::allow_patch`); the step is
//!    `fleet_host::patch_rolls_out`, reusable (it narrates through a
//!    callback and returns what happened).
//!
//! Each run prints its namespaces and cgroups, and the test checks them
//! against the agent's: namespaces of its own, a cgroup of its own beneath
//! the service's (and in the v1 controllers on a hybrid host). Landlock and
//! seccomp show by the run having run at all: the agent refuses a bundle
//! when either cannot be enforced (with nspawn 252's filter unchanged it
//! does: "Landlock is not built into this kernel").
//!
//! What the container needs beyond nspawn's defaults, and why (details,
//! each checked by taking it away, at
//! `rollguard_tests::fleet_host::host_options`):
//! - CAP_NET_ADMIN: in the unit's `CapabilityBoundingSet=`, not in nspawn's
//!   default set; loopback in each run's network namespace (without it
//!   every run fails before the bundle executes);
//! - CAP_AUDIT_READ: in the unit's set, not in nspawn's; useless in a
//!   container (below), granted so that the service has exactly the unit's
//!   bounding set, which the test checks;
//! - the system calls `landlock_*` and `bpf` (and `clone3`), which nspawn
//!   252's own filter lacks: without them the agent refuses every bundle.
//!
//! Audit is impossible in a container: nspawn refuses `NETLINK_AUDIT`
//! sockets, and the kernel serves audit status and rules only to the
//! initial PID namespace. So the agent there cannot observe denials and its
//! reports say so (`denials: null`, never zero): the controller halts every
//! rollout on such a report, the good one included, and the replay's
//! denials show in the bundle's stderr ("Read-only file system") and on the
//! disk. The patch is halted the same way, and resumed like step 1: an
//! operator accepting unknown denials. Kernel-audit denial reports are tested outside containers
//! (`agent_run.rs`, `fleet_rollout.rs`).
//!
//! Needs root, `systemd-container`, `mmdebstrap`, `zstd` and `cargo-deb`
//! (`scripts/install-deps`, `packaging/install-tools`). Never skipped.

use rollguard_tests::fleet::Fleet;
use rollguard_tests::fleet_host::{
    self, FleetHost, FleetHostPolicy, PatchPackages, UNIT, UNIT_PATH,
};
use serde_json::Value;

const HOST: &str = "mail-ct-01";

/// Customer data and a protected backup volume on the host; what no
/// bundle here may change.
const PROTECTED: &[&str] = &["/srv/customers", "/srv/backup"];

/// A bundle for this host: writes `/etc/mail`, runs `script` as `run.sh`.
fn bundle(fleet: &Fleet, name: &str, script: &str) -> std::path::PathBuf {
    let manifest = format!(
        "[bundle]\nname = {name:?}\nversion = 1\ndescription = \"fleet host test\"\n\
         expires = 2099-01-01T00:00:00Z\n\n[targets]\nhosts = [\"mail-ct-*\"]\n\n\
         [scope]\nwrite = [\"/etc/mail\"]\n\n[run]\ncommand = [\"./run.sh\"]\ntimeout = \"1m\"\n"
    );
    fleet.bundle(name, &manifest, &format!("#!/bin/sh\n{script}\n"))
}

/// The one host's entry in a rollout's status.
fn host_entry(status: &Value) -> &Value {
    status["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .find(|h| h["host"] == HOST)
        .unwrap_or_else(|| panic!("{HOST} is not in the rollout: {status:#}"))
}

/// The container can observe no denials: every report says "unknown", and
/// the controller halts the rollout on it.
fn assert_halted_on_unknown_denials(status: &Value) {
    let reason = status["halt_reason"].as_str().unwrap_or("");
    assert!(
        reason.contains(HOST) && reason.contains("could not observe denials"),
        "{status:#}"
    );
    let report = &host_entry(status)["report"];
    assert!(
        report["denials"].is_null(),
        "denials are unknown in a container, never zero: {report:#}"
    );
}

#[test]
fn the_packaged_agent_under_its_own_unit_rolls_out_and_halts_the_2012_replay() {
    let deb = fleet_host::agent_deb();
    let mut fleet = Fleet::new(&[]);
    fleet.start_controller();
    let host = FleetHost::install(HOST, &deb);
    host.ct.sh(
        "mkdir -p /srv/customers/alice /srv/customers/bob /srv/backup/daily /etc/mail && \
         echo 'alice mail' > /srv/customers/alice/inbox && \
         echo 'INSERT INTO orders VALUES (42);' > /srv/customers/bob/shop.sql && \
         echo 'nightly copy of every customer' > /srv/backup/daily/customers.tar && \
         echo 'queue_lifetime = 5d' > /etc/mail/main.cf",
    );
    // The patch step's package: v1 installed bare, its service running;
    // the policy allows its derived scope and its service.
    let patch = PatchPackages::build(&fleet.root().join("patch-debs"));
    fleet_host::install_patch_v1(&host, &patch.v1);
    let mut policy = FleetHostPolicy::default();
    fleet_host::allow_patch(&mut policy);
    host.configure(&fleet, &policy);
    assert_unit_as_shipped(&host);
    host.start_agent(&fleet);
    assert_agent_runs_under_the_unit(&host);

    let protected = host.snapshot(PROTECTED);
    signed_bundle_rolls_out(&fleet, &host);
    assert_eq!(
        host.snapshot(PROTECTED),
        protected,
        "customers or backups changed"
    );
    replay_2012_halts(&fleet, &host);
    assert_eq!(
        host.snapshot(PROTECTED),
        protected,
        "customers or backups changed"
    );
    // Step 3: the patch.
    let outcome = fleet_host::patch_rolls_out(&fleet, &host, &patch, &mut |line| {
        eprintln!("patch: {line}")
    });
    eprintln!("patch on {HOST}: {:#}", outcome.report);
    assert_eq!(
        host.snapshot(PROTECTED),
        protected,
        "customers or backups changed"
    );
    // The agent's unit is as shipped still; the drop-in directories the
    // agent made (empty) configure nothing.
    assert_unit_as_shipped(&host);
    for dir in [
        "rollguard-agent.service.d",
        "rollguard-.service.d",
        "service.d",
    ] {
        let dir = format!("/usr/lib/systemd/system/{dir}");
        assert_eq!(
            host.ct
                .sh(&format!("stat -c '%F %a %U:%G' {dir}; ls -A {dir} | wc -l")),
            "directory 755 root:root\n0\n",
            "{dir}"
        );
    }
    eprintln!("--- the agent's journal ---\n{}", host.journal());
    assert_logs_reach_journald_with_priorities(&host);
}

/// Under its unit, stderr is the journal: the agent logs to journald
/// natively, so each record has its own priority (`journalctl -p warning`
/// shows the warnings) rather than the one priority of stderr lines, info.
fn assert_logs_reach_journald_with_priorities(host: &FleetHost) {
    let entries = host.journal_entries();
    // Sent natively (`_TRANSPORT=journal`), not as stderr lines
    // (`_TRANSPORT=stdout`, all at the unit's one priority).
    let agent: Vec<&Value> = entries
        .iter()
        .filter(|e| e["SYSLOG_IDENTIFIER"] == "rollguard-agent" && e["_TRANSPORT"] == "journal")
        .collect();
    // The agent logs warnings and errors by default; a container always
    // gives it warnings (no kernel audit there).
    assert!(
        agent
            .iter()
            .any(|e| e["PRIORITY"] == "4"
                && e["MESSAGE"].as_str().is_some_and(|m| m.contains("audit"))),
        "the agent sent journald no warning (priority 4): {entries:#?}"
    );
}

/// The service systemd knows is the package's file, byte for byte this
/// repository's unit, with no drop-in.
fn assert_unit_as_shipped(host: &FleetHost) {
    assert_eq!(host.ct.unit_property(UNIT, "FragmentPath"), UNIT_PATH);
    assert_eq!(
        host.ct.unit_property(UNIT, "DropInPaths"),
        "",
        "no drop-in changes the unit"
    );
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/systemd/rollguard-agent.service"
    ))
    .unwrap();
    assert_eq!(host.read(UNIT_PATH).as_deref(), Some(shipped.as_str()));
    assert_eq!(
        host.ct.unit_property(UNIT, "UnitFileState"),
        "enabled",
        "the package enables the service (it starts at boot)"
    );
}

/// The daemon runs as the unit says: `serve`, in the service's cgroup,
/// with exactly the unit's capability bounding set and no_new_privs.
fn assert_agent_runs_under_the_unit(host: &FleetHost) {
    assert_eq!(host.ct.unit_property(UNIT, "ActiveState"), "active");
    let pid = host.ct.main_pid(UNIT);
    assert_ne!(pid, 0);
    let cmdline = host.ct.sh(&format!("tr '\\0' ' ' < /proc/{pid}/cmdline"));
    assert_eq!(
        cmdline.trim(),
        "/usr/sbin/rollguard-agent serve --policy /etc/rollguard/agent.toml"
    );
    let status = host.ct.sh(&format!("cat /proc/{pid}/status"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {name} in {status}"))
    };
    assert_eq!(field("NoNewPrivs:"), "1");
    let bounding = u64::from_str_radix(&field("CapBnd:"), 16).unwrap();
    let capability_bounding_set = host.ct.unit_property(UNIT, "CapabilityBoundingSet");
    let wanted: u64 = capability_bounding_set
        .split_whitespace()
        .map(|name| 1u64 << cap_number(name))
        .sum();
    assert_eq!(
        bounding, wanted,
        "the agent has the unit's capabilities ({capability_bounding_set}), no fewer"
    );
    let cgroup = host.ct.sh(&format!("cat /proc/{pid}/cgroup"));
    assert!(
        cgroup.contains(&format!("/system.slice/{UNIT}")),
        "{cgroup}"
    );
}

/// Capability numbers (linux/capability.h) of the names the unit uses.
fn cap_number(name: &str) -> u32 {
    match name {
        "cap_chown" => 0,
        "cap_dac_override" => 1,
        "cap_dac_read_search" => 2,
        "cap_fowner" => 3,
        "cap_fsetid" => 4,
        "cap_kill" => 5,
        "cap_setgid" => 6,
        "cap_setuid" => 7,
        "cap_setpcap" => 8,
        "cap_linux_immutable" => 9,
        "cap_net_bind_service" => 10,
        "cap_net_admin" => 12,
        "cap_mknod" => 27,
        "cap_sys_admin" => 21,
        "cap_audit_control" => 30,
        "cap_audit_read" => 37,
        other => panic!("capability {other} is not in this table"),
    }
}

/// Step 1: a signed bundle rolls out to the host and succeeds there.
fn signed_bundle_rolls_out(fleet: &Fleet, host: &FleetHost) {
    let b = bundle(
        fleet,
        "fix-mail",
        "set -eu\necho \"$ROLLGUARD_ROLLOUT\" >> /etc/mail/runs\n\
         echo 'queue_lifetime = 2d' > /etc/mail/main.cf\n\
         for ns in mnt net pid ipc; do echo \"ns $ns $(readlink /proc/self/ns/$ns)\"; done\n\
         sed 's/^/cgroup /' /proc/self/cgroup\necho 'mail fixed'",
    );
    let id = fleet.start_rollout(&b, &["--waves", "100%", "--all-at-once", "--bake", "1s"]);
    let status = wait_halted_or_completed(fleet, host, &id);
    let entry = host_entry(&status);
    eprintln!("fix-mail on {HOST}: {:#}", entry["report"]);
    assert_eq!(
        entry["state"],
        "succeeded",
        "{status:#}\n{}",
        host.journal()
    );
    let report = &entry["report"];
    assert_eq!(report["status"], "succeeded", "{report:#}");
    assert_eq!(report["exit_code"], 0, "{report:#}");
    assert_eq!(
        host.read("/etc/mail/main.cf").as_deref(),
        Some("queue_lifetime = 2d\n")
    );
    assert_eq!(host.read("/etc/mail/runs"), Some(format!("{id}\n")));
    assert_run_confined(host, report);
    assert_halted_on_unknown_denials(&status);
    // An operator who accepts unknown denials resumes: nothing is left to
    // do, and the host does not run the bundle again.
    let resumed = fleet.cli_json(&["rollout", "resume", &id]);
    assert_eq!(resumed["state"], "running", "{resumed:#}");
    let status = wait_halted_or_completed(fleet, host, &id);
    assert_eq!(status["state"], "completed", "{status:#}");
    assert_eq!(host.read("/etc/mail/runs"), Some(format!("{id}\n")));
}

/// The run printed its namespaces and cgroups (`ns KIND ID`, `cgroup
/// LINE`): namespaces of its own, not the agent's, and a cgroup of its own
/// beneath the agent's service (`Delegate=yes`), in each hierarchy the
/// agent limits runs through.
fn assert_run_confined(host: &FleetHost, report: &Value) {
    let stdout = report["stdout_tail"].as_str().unwrap_or("");
    let run_id = report["run_id"].as_str().expect("run_id");
    let agent = host.ct.main_pid(UNIT);
    for kind in ["mnt", "net", "pid", "ipc"] {
        let agent_ns = host.ct.sh(&format!("readlink /proc/{agent}/ns/{kind}"));
        let run_ns = stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("ns {kind} ")))
            .unwrap_or_else(|| panic!("the run printed no {kind} namespace: {stdout}"));
        assert!(run_ns.starts_with(&format!("{kind}:[")), "{run_ns}");
        assert_ne!(
            run_ns,
            agent_ns.trim(),
            "the run has a {kind} namespace of its own"
        );
    }
    let cgroups: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("cgroup "))
        .collect();
    let unified = format!("0::/system.slice/{UNIT}/rollguard-runs/{run_id}");
    assert!(
        cgroups.contains(&unified.as_str()),
        "the run is in {unified}: {cgroups:?}"
    );
    // On a hybrid host the agent limits runs through the v1 controllers.
    for c in ["pids", "memory", "cpu"] {
        if let Some(line) = cgroups.iter().find(|l| l.contains(&format!(":{c}:"))) {
            assert!(
                line.ends_with(&format!("/rollguard-runs/{run_id}")),
                "{line}"
            );
        }
    }
}

/// Step 2: the 2012 replay. Its intended change happens, its stray deletes
/// are denied, and the rollout halts.
fn replay_2012_halts(fleet: &Fleet, host: &FleetHost) {
    let b = bundle(
        fleet,
        "mail-fix-2012",
        "touch /etc/mail/enabled\nrm -rf /srv/customers /srv/backup\necho done",
    );
    let id = fleet.start_rollout(&b, &["--waves", "100%", "--all-at-once", "--bake", "1s"]);
    let status = wait_halted_or_completed(fleet, host, &id);
    assert_eq!(status["state"], "halted", "{status:#}");
    let entry = host_entry(&status);
    let report = &entry["report"];
    eprintln!("2012 replay on {HOST}: {report:#}");
    assert!(
        host.read("/etc/mail/enabled").is_some(),
        "the in-scope part ran: {report:#}"
    );
    let stderr = report["stderr_tail"].as_str().unwrap_or("");
    for p in PROTECTED {
        assert!(
            stderr.contains(&format!("cannot remove '{p}")),
            "the kernel denied removing {p}: {report:#}"
        );
    }
    assert_halted_on_unknown_denials(&status);
}

/// Wait until rollout `id` has stopped moving: halted or completed.
fn wait_halted_or_completed(fleet: &Fleet, host: &FleetHost, id: &str) -> Value {
    fleet_host::wait_halted_or_completed(fleet, host, id)
}
