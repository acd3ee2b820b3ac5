//! Service actions through real `rollguard-agent run`s of signed bundles:
//! declared reloads and restarts, and requests captured inside the sandbox
//! (`systemctl`, `deb-systemd-invoke`, `invoke-rc.d`, `service`), decided
//! against the host's `[services] allow` and performed by the agent on a
//! real systemd (252, booted in a container, reached over its bus as
//! `DBUS_SYSTEM_BUS_ADDRESS`). Needs root; never skipped.

use std::fs;

use rollguard_tests::host::{manifest, Host, Keys, PolicyOptions};
use rollguard_tests::systemd_container::SystemdContainer;
use serde_json::Value;

/// A long-running service whose reload appends its MainPID to a marker.
fn demo_unit(marker: &str) -> String {
    format!(
        "[Service]\nExecStart=/bin/sleep infinity\nExecReload=/bin/sh -c 'echo \"reload $MAINPID\" >> /run/{marker}.reloads'\n"
    )
}

fn with_services(name: &str, version: u64, services: &str) -> String {
    format!(
        "{}\n[services]\n{services}\n",
        manifest(name, version, "\"mail-*.tokyo\"", "")
    )
}

struct Setup {
    keys: Keys,
    host: Host,
    ct: SystemdContainer,
}

fn setup(allow: &str, units: &[&str]) -> Setup {
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-01.tokyo", &keys, PolicyOptions::default());
    host.append_policy(&format!("[services]\nallow = [{allow}]\n"));
    let ct = SystemdContainer::boot();
    for u in units {
        ct.install_unit(u, &demo_unit(u));
        ct.sh(&format!("systemctl start {u}"));
    }
    Setup { keys, host, ct }
}

impl Setup {
    fn run(&self, label: &str, manifest: &str, script: &str) -> (Value, i32) {
        let src = self.host.bundle_source(label, manifest, script);
        let bundle = self.host.build_signed(&src, &self.keys, &["alice"]);
        let bus = self.ct.bus_address();
        self.host
            .run_env(&bundle, &[("DBUS_SYSTEM_BUS_ADDRESS", bus.as_str())])
    }
}

fn outcome<'a>(report: &'a Value, unit: &str) -> &'a Value {
    report["services"]
        .as_array()
        .unwrap_or_else(|| panic!("no services in {report:#}"))
        .iter()
        .find(|o| o["unit"] == unit)
        .unwrap_or_else(|| panic!("no outcome for {unit}: {report:#}"))
}

fn dispositions(report: &Value) -> Vec<(String, String, String, String)> {
    report["services_captured"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    let s = |k: &str| c[k].as_str().unwrap().to_string();
                    (s("via"), s("verb"), s("unit"), s("disposition"))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn declared_restart_changes_main_pid_and_declared_reload_runs_exec_reload() {
    let s = setup("\"demo*.service\"", &["demo.service", "demo-r.service"]);
    let before = s.ct.main_pid("demo.service");
    let before_r = s.ct.main_pid("demo-r.service");
    let (report, code) = s.run(
        "declared",
        &with_services(
            "declared",
            1,
            "restart = [\"demo.service\"]\nreload = [\"demo-r.service\"]",
        ),
        "#!/bin/sh\necho patched\n",
    );
    assert_eq!(report["status"], "succeeded", "{report:#}");
    assert_eq!(code, 0);
    let after = s.ct.main_pid("demo.service");
    assert_ne!(before, after, "a restart starts a new process");
    let o = outcome(&report, "demo.service");
    assert_eq!(o["action"], "restart");
    assert_eq!(o["source"], "declared");
    assert_eq!(o["result"], "done");
    assert_eq!(o["main_pid_before"], before);
    assert_eq!(o["main_pid_after"], after);
    assert!(o["duration_ms"].is_u64());
    let r = outcome(&report, "demo-r.service");
    assert_eq!(r["action"], "reload");
    assert_eq!(r["result"], "done");
    assert_eq!(r["main_pid_after"], before_r, "a reload keeps the process");
    assert_eq!(
        s.ct.sh("cat /run/demo-r.service.reloads"),
        format!("reload {before_r}\n"),
        "ExecReload= ran once"
    );
}

#[test]
fn captured_requests_are_performed_when_allowed() {
    let units = [
        "capt-a.service",
        "capt-b.service",
        "capt-c.service",
        "capt-d.service",
    ];
    let s = setup("\"capt-*.service\"", &units);
    let before: Vec<u32> = units.iter().map(|u| s.ct.main_pid(u)).collect();
    // What debhelper's postinst does, and the other ways scripts ask.
    let script = "#!/bin/sh\nset -eu\n\
        [ -d /run/systemd/system ] || { echo 'no /run/systemd/system'; exit 1; }\n\
        systemctl --system daemon-reload\n\
        systemctl -q is-active capt-a.service\n\
        [ \"$(systemctl is-enabled capt-a.service)\" = enabled ]\n\
        systemctl restart capt-a.service\n\
        deb-systemd-invoke restart capt-b.service\n\
        invoke-rc.d --skip-systemd-native capt-c restart\n\
        service capt-d reload\n\
        echo done\n";
    let (report, code) = s.run("captured", &with_services("captured", 1, ""), script);
    assert_eq!(report["status"], "succeeded", "{report:#}");
    assert_eq!(code, 0);
    let d = dispositions(&report);
    let want = |via: &str, verb: &str, unit: &str, disp: &str| {
        (
            via.to_string(),
            verb.to_string(),
            unit.to_string(),
            disp.to_string(),
        )
    };
    assert_eq!(
        d,
        vec![
            want("systemctl", "daemon-reload", "", "ignored"),
            want("systemctl", "restart", "capt-a.service", "performed"),
            want(
                "deb-systemd-invoke",
                "restart",
                "capt-b.service",
                "performed"
            ),
            want("invoke-rc.d", "restart", "capt-c.service", "performed"),
            want("service", "reload", "capt-d.service", "performed"),
        ],
        "{report:#}"
    );
    for (i, u) in units.iter().enumerate().take(3) {
        let o = outcome(&report, u);
        assert_eq!(o["action"], "try_restart", "{o}");
        assert_eq!(o["source"], "captured");
        assert_eq!(o["result"], "done", "{o}");
        assert_ne!(s.ct.main_pid(u), before[i], "{u} was restarted");
    }
    let o = outcome(&report, "capt-d.service");
    assert_eq!(o["action"], "reload");
    assert_eq!(s.ct.main_pid("capt-d.service"), before[3]);
    assert_eq!(
        s.ct.sh("cat /run/capt-d.service.reloads"),
        format!("reload {}\n", before[3])
    );
}

#[test]
fn a_disallowed_captured_request_is_a_denial_and_nothing_is_performed() {
    let s = setup("\"capt-a.service\"", &["capt-a.service", "other.service"]);
    let a = s.ct.main_pid("capt-a.service");
    let other = s.ct.main_pid("other.service");
    // The links cannot be replaced by the bundle.
    let script = "#!/bin/sh\n\
        systemctl restart capt-a.service\n\
        systemctl restart other.service\n\
        ln -sf /bin/true /run/rollguard/bin/systemctl 2>/dev/null && echo REPLACED\n\
        echo x > /run/rollguard/bin/systemctl 2>/dev/null && echo OVERWRITTEN\n\
        exit 0\n";
    let (report, code) = s.run("denied", &with_services("denied", 1, ""), script);
    assert_eq!(report["status"], "failed", "{report:#}");
    assert_ne!(code, 0);
    let out = report["stdout_tail"].as_str().unwrap_or("");
    assert!(
        !out.contains("REPLACED") && !out.contains("OVERWRITTEN"),
        "{report:#}"
    );
    let d = dispositions(&report);
    assert!(
        d.contains(&(
            "systemctl".into(),
            "restart".into(),
            "other.service".into(),
            "denied".into()
        )),
        "{report:#}"
    );
    assert!(
        d.contains(&(
            "systemctl".into(),
            "restart".into(),
            "capt-a.service".into(),
            "skipped".into()
        )),
        "{report:#}"
    );
    let denials = report["denials"].as_array().expect("denials known");
    assert!(
        denials
            .iter()
            .any(|x| x["access"] == "service.restart" && x["path"] == "other.service"),
        "{report:#}"
    );
    assert!(report["reason"].as_str().unwrap().contains("other.service"));
    assert!(
        report["services"].is_null(),
        "nothing performed: {report:#}"
    );
    assert_eq!(s.ct.main_pid("capt-a.service"), a);
    assert_eq!(s.ct.main_pid("other.service"), other);
}

#[test]
fn a_declared_unit_outside_allow_refuses_the_bundle_before_it_runs() {
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-01.tokyo", &keys, PolicyOptions::default());
    host.append_policy("[services]\nallow = [\"postfix.service\"]\n");
    let man = format!(
        "{}\n[services]\nrestart = [\"dovecot.service\"]\n",
        manifest(
            "refused",
            1,
            "\"mail-*.tokyo\"",
            "write = [\"@ROOT@/etc/mail\"]"
        )
    );
    let src = host.bundle_source("refused", &man, "#!/bin/sh\ntouch @ROOT@/etc/mail/ran\n");
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    let (report, code) = host.run(&bundle);
    assert_eq!(report["status"], "refused", "{report:#}");
    assert_eq!(report["refusal"], "scope_ceiling");
    let reason = report["reason"].as_str().unwrap();
    assert!(
        reason.contains("dovecot.service") && reason.contains("postfix.service"),
        "{reason}"
    );
    assert_eq!(code, 2);
    assert!(!host.root().join("etc/mail/ran").exists(), "the script ran");
    // Without a [services] table nothing is allowed.
    let bare = Host::new("mail-02.tokyo", &keys, PolicyOptions::default());
    let src = bare.bundle_source("refused", &man, "#!/bin/sh\ntouch @ROOT@/etc/mail/ran\n");
    let bundle = bare.build_signed(&src, &keys, &["alice"]);
    let (report, _) = bare.run(&bundle);
    assert_eq!(report["status"], "refused", "{report:#}");
    assert!(!bare.root().join("etc/mail/ran").exists());
    let _ = fs::metadata(host.root());
}

#[test]
fn a_failing_restart_fails_the_run() {
    let s = setup("\"broken.service\"", &[]);
    s.ct.install_unit(
        "broken.service",
        "[Service]\nType=oneshot\nExecStart=/bin/false\n",
    );
    let (report, code) = s.run(
        "broken",
        &with_services("broken", 1, "restart = [\"broken.service\"]"),
        "#!/bin/sh\nexit 0\n",
    );
    assert_eq!(report["status"], "failed", "{report:#}");
    assert_ne!(code, 0);
    let o = outcome(&report, "broken.service");
    assert_eq!(o["result"], "failed", "{o}");
    assert!(report["reason"]
        .as_str()
        .unwrap()
        .contains("broken.service"));
}

/// Reviewers see `[services]` in what they sign: `inspect` shows it under
/// what the bundle may change, and its JSON carries it.
#[test]
fn inspect_shows_the_services_a_bundle_asks_for() {
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-01.tokyo", &keys, PolicyOptions::default());
    let man = with_services(
        "shown",
        1,
        "reload = [\"postfix.service\"]\nrestart = [\"dovecot.service\"]\nrestart_stale = true",
    );
    let src = host.bundle_source("shown", &man, "#!/bin/sh\n");
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    let out = rollguard_tests::run_ok(
        rollguard_tests::rollguard()
            .args(["bundle", "inspect"])
            .arg(&bundle),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let what = text.split("WHAT it runs").next().unwrap();
    assert!(
        what.contains(
            "services  reload postfix.service; restart dovecot.service; restart stale yes"
        ),
        "{text}"
    );
    let out = rollguard_tests::run_ok(
        rollguard_tests::rollguard()
            .args(["bundle", "inspect", "--json"])
            .arg(&bundle),
    );
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        meta["services"]["restart"],
        serde_json::json!(["dovecot.service"])
    );
    assert_eq!(meta["services"]["restart_stale"], true);
}

/// The request directory is the bundle's to write: a flood of it (a 20 MB
/// file, many files, an oversized record) stays within the run's small
/// tmpfs (never the host's disk, where the run directory lives), the
/// record beyond the agent's bound fails the run, and nothing is
/// performed, not even an allowed request made before the flood.
#[test]
fn flooding_the_request_directory_is_bounded_fails_the_run_and_performs_nothing() {
    let s = setup("\"capt-a.service\"", &["capt-a.service"]);
    let a = s.ct.main_pid("capt-a.service");
    let script = "#!/bin/sh\n\
        R=/run/rollguard/requests\n\
        systemctl restart capt-a.service\n\
        head -c 200000 /dev/zero | tr '\\0' x >> $R/requests.jsonl 2>/dev/null\n\
        dd if=/dev/zero of=$R/flood bs=1M count=20 2>/dev/null\n\
        echo \"flood=$(cat $R/* | wc -c)\"\n\
        i=0; while [ $i -lt 200 ]; do touch $R/f$i 2>/dev/null || break; i=$((i+1)); done\n\
        echo \"files=$i\"\n\
        exit 0\n";
    let (report, code) = s.run(
        "flood",
        &with_services("flood", 1, "restart = [\"capt-a.service\"]"),
        script,
    );
    assert_eq!(report["status"], "failed", "{report:#}");
    assert_ne!(code, 0);
    let out = report["stdout_tail"].as_str().unwrap();
    let figure = |key: &str| -> u64 {
        out.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {report:#}"))
    };
    // Bounded: 128 KiB for everything written there, a handful of files.
    assert!(figure("flood=") <= 128 * 1024, "{report:#}");
    assert!(figure("files=") < 16, "{report:#}");
    let reason = report["reason"].as_str().unwrap();
    assert!(
        reason.contains("larger than 65536 bytes")
            && reason.contains("no service action was performed"),
        "{reason}"
    );
    assert!(report["services"].is_null(), "{report:#}");
    assert_eq!(s.ct.main_pid("capt-a.service"), a, "nothing was restarted");
}

/// A forged record (the bundle writes the file itself) naming a unit
/// systemd would reach by path, or anything but a plain unit name, fails
/// the run with the line named and performs nothing, not even the
/// allowed request before it; a symlink or a FIFO cannot take the
/// record's place (Landlock: regular files only there).
#[test]
fn a_forged_request_record_with_an_injected_unit_name_fails_the_run_and_performs_nothing() {
    let s = setup("\"capt-*.service\"", &["capt-a.service"]);
    let a = s.ct.main_pid("capt-a.service");
    let script = r#"#!/bin/sh
R=/run/rollguard/requests
ln -s /etc/passwd $R/link 2>/dev/null && echo LINKED
mkfifo $R/fifo 2>/dev/null && echo FIFO
systemctl restart capt-a.service
echo '{"via":"systemctl","verb":"restart","unit":"../../capt-a.service"}' >> $R/requests.jsonl
exit 0
"#;
    let (report, code) = s.run("forged", &with_services("forged", 1, ""), script);
    assert_eq!(report["status"], "failed", "{report:#}");
    assert_ne!(code, 0);
    let out = report["stdout_tail"].as_str().unwrap_or("");
    assert!(
        !out.contains("LINKED") && !out.contains("FIFO"),
        "{report:#}"
    );
    let reason = report["reason"].as_str().unwrap();
    assert!(
        reason.contains("service request record line 2")
            && reason.contains("no service action was performed"),
        "{reason}"
    );
    // An attempt: the record the agent cannot read is a denial itself.
    let denials = report["denials"].as_array().expect("denials known");
    assert!(
        denials
            .iter()
            .any(|x| x["access"] == "service.unreadable_record"),
        "{report:#}"
    );
    assert!(report["services"].is_null(), "{report:#}");
    assert_eq!(s.ct.main_pid("capt-a.service"), a, "nothing was restarted");
}

/// The record is append-only for the bundle: once a shim has recorded a
/// request outside `allow`, nothing the bundle does removes it (truncate,
/// overwrite in place, remove, rename, clear the flag, create another
/// file), and a request for another machine's manager (`-M`) is itself a
/// denial, never performed on the host's unit of the same name.
#[test]
fn a_denied_request_cannot_be_erased_from_the_record() {
    let s = setup("\"capt-a.service\"", &["capt-a.service", "other.service"]);
    let a = s.ct.main_pid("capt-a.service");
    let other = s.ct.main_pid("other.service");
    let script = r#"#!/bin/sh
R=/run/rollguard/requests
F=$R/requests.jsonl
systemctl stop other.service
# Each attempt in a subshell: a failed redirection ends a POSIX shell.
systemctl -M ctr restart capt-a.service && echo REMOTE
( : > $F ) 2>/dev/null && echo TRUNCATED
( truncate -s 0 $F ) 2>/dev/null && echo TRUNCATED
( echo '{"via":"systemctl","verb":"restart","unit":"capt-a.service"}' > $F ) 2>/dev/null && echo OVERWROTE
( printf '{"via":"systemctl","verb":"restart","unit":"capt-a.service"}  ' | dd of=$F conv=notrunc status=none ) 2>/dev/null && echo INPLACE
( rm -f $F ) 2>/dev/null; [ -e $F ] || echo REMOVED
( mv $F $R/x ) 2>/dev/null && echo RENAMED
( chattr -a $F ) 2>/dev/null && echo CLEARED
( touch $R/other ) 2>/dev/null && echo CREATED
echo "lines=$(grep -c other.service $F)"
exit 0
"#;
    let (report, code) = s.run("erase", &with_services("erase", 1, ""), script);
    assert_eq!(report["status"], "failed", "{report:#}");
    assert_ne!(code, 0);
    let out = report["stdout_tail"].as_str().unwrap_or("");
    for marker in [
        "REMOTE",
        "TRUNCATED",
        "OVERWROTE",
        "INPLACE",
        "REMOVED",
        "RENAMED",
        "CLEARED",
        "CREATED",
    ] {
        assert!(!out.contains(marker), "{marker}: {report:#}");
    }
    assert!(
        out.contains("lines=1"),
        "the script ran to its end: {report:#}"
    );
    let denials = report["denials"].as_array().expect("denials known");
    assert!(
        denials
            .iter()
            .any(|x| x["access"] == "service.stop" && x["path"] == "other.service"),
        "{report:#}"
    );
    assert!(
        denials
            .iter()
            .any(|x| x["access"] == "service.restart" && x["path"] == ""),
        "the -M request: {report:#}"
    );
    assert!(report["services"].is_null(), "{report:#}");
    assert_eq!(s.ct.main_pid("capt-a.service"), a);
    assert_eq!(s.ct.main_pid("other.service"), other);
}

/// A package changed the unit's file (here: edited in the container, not
/// reloaded, as a dpkg upgrade leaves it): before the restart the agent
/// has systemd reload its unit files, so the new `ExecStart=` runs, and
/// the outcome says so (`daemon_reloaded`).
#[test]
fn a_restart_after_the_unit_file_changed_runs_the_new_definition() {
    let s = setup("\"demo.service\"", &["demo.service"]);
    s.ct.sh("sed -i 's|^ExecStart=.*|ExecStart=/bin/sleep 4242|' /etc/systemd/system/demo.service");
    assert_eq!(
        s.ct.unit_property("demo.service", "NeedDaemonReload"),
        "yes"
    );
    let (report, code) = s.run(
        "unit-changed",
        &with_services("unit-changed", 1, "restart = [\"demo.service\"]"),
        "#!/bin/sh\necho patched\n",
    );
    assert_eq!(report["status"], "succeeded", "{report:#}");
    assert_eq!(code, 0);
    let o = outcome(&report, "demo.service");
    assert_eq!(o["result"], "done", "{report:#}");
    assert_eq!(o["daemon_reloaded"], true, "{report:#}");
    assert_eq!(s.ct.unit_property("demo.service", "NeedDaemonReload"), "no");
    let pid = s.ct.main_pid("demo.service");
    assert_eq!(
        s.ct.sh(&format!("cat /proc/{pid}/cmdline | tr '\\0' ' '"))
            .trim(),
        "/bin/sleep 4242",
        "the new ExecStart= runs"
    );
    // Unchanged since: no reload the next time.
    let (report, _) = s.run(
        "unit-same",
        &with_services("unit-same", 2, "restart = [\"demo.service\"]"),
        "#!/bin/sh\necho patched\n",
    );
    assert!(
        outcome(&report, "demo.service")["daemon_reloaded"].is_null(),
        "{report:#}"
    );
}
