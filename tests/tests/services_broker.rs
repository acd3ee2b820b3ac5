//! The service broker and the stale-service scan against a real systemd
//! (252, Debian 12) booted in a container on this machine's kernel
//! (`rollguard_tests::systemd_container`), reached over its D-Bus system
//! bus as the agent reaches the host's. Needs root; never skipped.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use rollguard_agent::services::{self, stale, Bus, ServiceRun, DEFAULT_JOB_TIMEOUT};
use rollguard_shared::services::{
    ActionSource, PlannedAction, ServiceAction, ServiceOutcome, UnitName,
};
use rollguard_tests::systemd_container::SystemdContainer;

fn act(unit: &str, action: ServiceAction, source: ActionSource) -> PlannedAction {
    PlannedAction {
        unit: UnitName::parse(unit).unwrap(),
        action,
        source,
    }
}

fn bus(ct: &SystemdContainer) -> Bus {
    Bus::Address(ct.bus_address())
}

/// Every unit permitted (the plans' names stand for the host's allow list
/// here; an alias's unit is checked by `permits`).
fn permit_all(_: &UnitName) -> bool {
    true
}

fn perform(ct: &SystemdContainer, plan: &[PlannedAction]) -> Vec<ServiceOutcome> {
    services::perform(&bus(ct), plan, DEFAULT_JOB_TIMEOUT, &permit_all)
}

/// A long-running service whose reload appends its MainPID to a marker.
const DEMO_UNIT: &str = "\
[Service]
ExecStart=/bin/sleep infinity
ExecReload=/bin/sh -c 'echo \"reload $MAINPID\" >> /run/demo.reloads'
";

#[test]
fn a_declared_restart_changes_main_pid_and_a_reload_runs_exec_reload() {
    let ct = SystemdContainer::boot();
    ct.install_unit("demo.service", DEMO_UNIT);
    ct.sh("systemctl start demo.service");
    let first = ct.main_pid("demo.service");
    assert_ne!(first, 0);

    let out = perform(
        &ct,
        &[act(
            "demo.service",
            ServiceAction::Restart,
            ActionSource::Declared,
        )],
    );
    assert_eq!(out.len(), 1, "{out:?}");
    let o = &out[0];
    eprintln!("restart: {o:?}");
    let second = ct.main_pid("demo.service");
    assert_eq!(o.result, "done", "{o:?}");
    assert!(o.succeeded());
    assert_eq!(o.action, ServiceAction::Restart);
    assert_eq!(o.source, ActionSource::Declared);
    assert_eq!(o.main_pid_before, Some(first), "{o:?}");
    assert_eq!(o.main_pid_after, Some(second), "{o:?}");
    assert_ne!(first, second, "a restart starts a new process");

    // A reload runs ExecReload= and keeps the process.
    let out = perform(
        &ct,
        &[act(
            "demo.service",
            ServiceAction::Reload,
            ActionSource::Captured,
        )],
    );
    let o = &out[0];
    eprintln!("reload: {o:?}");
    assert_eq!(o.result, "done", "{o:?}");
    assert_eq!(o.main_pid_before, Some(second));
    assert_eq!(o.main_pid_after, Some(second), "a reload keeps MainPID");
    assert_eq!(ct.sh("cat /run/demo.reloads"), format!("reload {second}\n"));
    assert_eq!(ct.main_pid("demo.service"), second);

    // Asked twice, in several ways: one restart, reported once.
    let out = perform(
        &ct,
        &[
            act(
                "demo.service",
                ServiceAction::Reload,
                ActionSource::Declared,
            ),
            act(
                "demo.service",
                ServiceAction::Restart,
                ActionSource::Captured,
            ),
            act(
                "demo.service",
                ServiceAction::TryRestart,
                ActionSource::Stale,
            ),
        ],
    );
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].action, ServiceAction::Restart);
    assert_eq!(out[0].source, ActionSource::Captured);
    assert_eq!(out[0].result, "done");
    let third = ct.main_pid("demo.service");
    assert_ne!(third, second);
    assert_eq!(
        ct.sh("cat /run/demo.reloads"),
        format!("reload {second}\n"),
        "the reload merged into the restart did not run"
    );

    // try-restart leaves a stopped unit stopped, and that is a success.
    ct.sh("systemctl stop demo.service");
    let out = perform(
        &ct,
        &[act(
            "demo.service",
            ServiceAction::TryRestart,
            ActionSource::Stale,
        )],
    );
    assert!(out[0].succeeded(), "{:?}", out[0]);
    assert_eq!(out[0].main_pid_before, None);
    assert_eq!(out[0].main_pid_after, None);
    assert_eq!(ct.unit_property("demo.service", "ActiveState"), "inactive");
}

#[test]
fn failures_are_outcomes_and_do_not_stop_the_next_unit() {
    let ct = SystemdContainer::boot();
    // Runs until its configuration breaks; then it cannot start again.
    ct.install_unit(
        "breaks.service",
        "[Service]\nExecStartPre=/bin/sh -c 'test ! -e /etc/breaks.broken'\nExecStart=/bin/sleep infinity\n",
    );
    ct.install_unit("demo.service", DEMO_UNIT);
    ct.sh("systemctl start breaks.service demo.service && touch /etc/breaks.broken");
    let breaks_pid = ct.main_pid("breaks.service");
    let demo_pid = ct.main_pid("demo.service");

    let out = perform(
        &ct,
        &[
            act(
                "breaks.service",
                ServiceAction::Restart,
                ActionSource::Declared,
            ),
            act(
                "no-such-unit.service",
                ServiceAction::Restart,
                ActionSource::Captured,
            ),
            act(
                "dbus.socket",
                ServiceAction::Restart,
                ActionSource::Declared,
            ),
            act(
                "demo.service",
                ServiceAction::Restart,
                ActionSource::Declared,
            ),
        ],
    );
    let units: Vec<_> = out.iter().map(|o| o.unit.as_str()).collect();
    assert_eq!(
        units,
        [
            "breaks.service",
            "no-such-unit.service",
            "dbus.socket",
            "demo.service"
        ],
        "one outcome per unit, in the plan's order"
    );

    assert_eq!(out[0].result, "failed", "{:?}", out[0]);
    assert!(!out[0].succeeded());
    assert_eq!(out[0].main_pid_before, Some(breaks_pid));
    assert_eq!(out[0].main_pid_after, None, "{:?}", out[0]);
    assert_eq!(ct.unit_property("breaks.service", "ActiveState"), "failed");

    assert!(
        out[1].result.starts_with("error: ") && out[1].result.contains("not-found"),
        "{:?}",
        out[1]
    );
    assert!(
        out[2].result.starts_with("error: ") && out[2].result.contains(".service"),
        "{:?}",
        out[2]
    );
    assert_eq!(
        ct.unit_property("dbus.socket", "ActiveState"),
        "active",
        "a non-service unit is never acted upon"
    );

    assert_eq!(out[3].result, "done", "{:?}", out[3]);
    assert_eq!(out[3].main_pid_before, Some(demo_pid));
    assert_ne!(ct.main_pid("demo.service"), demo_pid);

    // Reloading a stopped unit: systemd's job result is "invalid" (there
    // is nothing to reload), and that is no success.
    ct.sh("systemctl stop demo.service");
    let out = perform(
        &ct,
        &[act(
            "demo.service",
            ServiceAction::Reload,
            ActionSource::Declared,
        )],
    );
    assert_eq!(out[0].result, "invalid", "{:?}", out[0]);
    assert!(!out[0].succeeded());
}

/// An alias acts on another unit, which `allow` did not check (a package
/// can ship the symlink in a unit directory): the broker acts only when
/// that unit is permitted too.
#[test]
fn an_alias_is_acted_upon_only_when_its_unit_is_permitted() {
    let ct = SystemdContainer::boot();
    ct.install_unit("demo.service", DEMO_UNIT);
    ct.sh(
        "ln -s /etc/systemd/system/demo.service /etc/systemd/system/php9-fpm.service \
         && systemctl daemon-reload && systemctl start demo.service",
    );
    let pid = ct.main_pid("demo.service");
    let plan = [act(
        "php9-fpm.service",
        ServiceAction::Restart,
        ActionSource::Captured,
    )];
    let only_php = |u: &UnitName| u.as_str().starts_with("php");
    let out = services::perform(&bus(&ct), &plan, DEFAULT_JOB_TIMEOUT, &only_php);
    assert!(
        out[0].result.starts_with("error: ") && out[0].result.contains("alias of demo.service"),
        "{:?}",
        out[0]
    );
    assert!(!out[0].succeeded());
    assert_eq!(
        ct.main_pid("demo.service"),
        pid,
        "demo.service was restarted"
    );

    // Permitted (as `sshd.service` for `ssh.service` on Debian): done.
    let out = perform(&ct, &plan);
    assert_eq!(out[0].result, "done", "{:?}", out[0]);
    assert_ne!(
        ct.main_pid("demo.service"),
        pid,
        "demo.service was not restarted"
    );
}

/// A job that never finishes (its start never completes) ends in the
/// broker's timeout: the result says `timeout`, whatever the machine's
/// speed, and the job is left to systemd, not cancelled.
#[test]
fn a_job_that_never_finishes_times_out() {
    let ct = SystemdContainer::boot();
    ct.install_unit(
        "hangs.service",
        "[Service]\nType=oneshot\nExecStart=/bin/sleep infinity\nTimeoutStartSec=infinity\n",
    );
    let out = services::perform(
        &bus(&ct),
        &[act(
            "hangs.service",
            ServiceAction::Restart,
            ActionSource::Declared,
        )],
        Duration::from_millis(500),
        &permit_all,
    );
    assert_eq!(out[0].result, "timeout", "{:?}", out[0]);
    assert!(!out[0].succeeded());
    assert_eq!(
        ct.unit_property("hangs.service", "ActiveState"),
        "activating",
        "the job is still running in systemd"
    );
}

#[test]
fn a_service_still_running_a_replaced_binary_is_stale_until_restarted() {
    let ct = SystemdContainer::boot();
    // The service runs its own copy of sleep: replacing that copy the way
    // dpkg and rpm do (a new file renamed over the old) leaves the running
    // process mapping the old, now deleted, inode.
    let bin = "/opt/stale-demo/sleepy";
    ct.sh(&format!("mkdir -p /opt/stale-demo && cp /bin/sleep {bin}"));
    ct.install_unit(
        "stale-demo.service",
        &format!("[Service]\nExecStart={bin} infinity\n"),
    );
    ct.sh("systemctl start stale-demo.service");
    let old_pid = ct.main_pid("stale-demo.service");
    let host_pid = ct.host_pid(old_pid).expect("the service's host PID");

    let replaced = BTreeSet::from([PathBuf::from(bin)]);
    assert!(
        stale::scan(&replaced).is_empty(),
        "nothing is stale before the file is replaced"
    );

    ct.sh(&format!("cp /bin/sleep {bin}.new && mv -f {bin}.new {bin}"));
    let t = std::time::Instant::now();
    let found = stale::scan(&replaced);
    eprintln!(
        "stale scan of {} processes: {:?}",
        std::fs::read_dir("/proc")
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .file_name()
                .to_str()
                .unwrap()
                .parse::<u32>()
                .is_ok())
            .count(),
        t.elapsed()
    );
    assert_eq!(found.len(), 1, "{found:?}");
    let s = &found[0];
    assert_eq!(s.pid, host_pid);
    assert_eq!(s.unit.as_deref(), Some("stale-demo.service"));
    assert_eq!(s.files, [bin]);
    assert_eq!(s.exe, format!("{bin} (deleted)"));

    // restart_stale with a host policy that does not allow the unit:
    // nothing is restarted, and it is still reported.
    let b = bus(&ct);
    let deny_all = |_: &UnitName| false;
    let run = ServiceRun {
        bus: &b,
        timeout: DEFAULT_JOB_TIMEOUT,
        replaced: &replaced,
        restart_stale: Some(&deny_all),
        permits: &permit_all,
    };
    let (outcomes, still) = services::perform_all(&run, &[]);
    assert!(outcomes.is_empty(), "{outcomes:?}");
    assert_eq!(still, found);
    assert_eq!(ct.main_pid("stale-demo.service"), old_pid);

    // Allowed: restarted (try-restart, source stale), and no longer stale.
    let allow = |u: &UnitName| u.as_str() == "stale-demo.service";
    let run = ServiceRun {
        restart_stale: Some(&allow),
        ..run
    };
    let (outcomes, still) = services::perform_all(&run, &[]);
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
    let o = &outcomes[0];
    assert_eq!(o.unit.as_str(), "stale-demo.service");
    assert_eq!(o.action, ServiceAction::TryRestart);
    assert_eq!(o.source, ActionSource::Stale);
    assert_eq!(o.result, "done", "{o:?}");
    assert_eq!(o.main_pid_before, Some(old_pid));
    assert_ne!(o.main_pid_after, Some(old_pid));
    assert!(still.is_empty(), "{still:?}");
}

/// The shipped unit gives the agent no CAP_SYS_PTRACE, so another user's
/// process's `root` and `exe` links are closed to it (its `maps` and
/// `cgroup` are not). A process that maps the new file must then not be
/// taken for stale, and one still mapping the deleted old file must be
/// found. Capabilities are per thread: the scan runs in a thread that
/// dropped CAP_SYS_PTRACE, and again with it, for the same answer.
#[test]
fn stale_scan_without_cap_sys_ptrace_finds_the_old_file_and_spares_the_new() {
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Child, Command};

    let base = std::path::Path::new("/var/lib/rollguard-tests");
    std::fs::create_dir_all(base).unwrap();
    let dir = tempfile::Builder::new()
        .prefix("stale-")
        .tempdir_in(base)
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.path().join("sleepy");
    rollguard_tests::install_program(std::path::Path::new("/bin/sleep"), &bin);

    struct Killed(Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    // As `nobody`, once its maps show the file (bounded: exec is quick).
    let start = |bin: &std::path::Path| {
        let child = Killed(
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(bin)
                .arg("1000")
                .spawn()
                .expect("setpriv"),
        );
        let maps = format!("/proc/{}/maps", child.0.id());
        let want = bin.to_str().unwrap().to_string();
        for _ in 0..5000 {
            if std::fs::read_to_string(&maps).is_ok_and(|m| m.contains(&want)) {
                return child;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!("{} did not start", bin.display());
    };
    let old = start(&bin);
    let new_copy = dir.path().join("sleepy.new");
    rollguard_tests::install_program(std::path::Path::new("/bin/sleep"), &new_copy);
    std::fs::rename(&new_copy, &bin).unwrap();
    let new = start(&bin);

    let replaced = BTreeSet::from([bin.clone()]);
    for drop_ptrace in [true, false] {
        let replaced = replaced.clone();
        let found = std::thread::spawn(move || {
            if drop_ptrace {
                caps::drop(
                    None,
                    caps::CapSet::Effective,
                    caps::Capability::CAP_SYS_PTRACE,
                )
                .expect("drop CAP_SYS_PTRACE");
            }
            stale::scan(&replaced)
        })
        .join()
        .unwrap();
        let ours: Vec<_> = found
            .iter()
            .filter(|s| s.pid == old.0.id() || s.pid == new.0.id())
            .collect();
        assert_eq!(
            ours.len(),
            1,
            "without CAP_SYS_PTRACE: {drop_ptrace}: {found:?}"
        );
        assert_eq!(ours[0].pid, old.0.id());
        assert_eq!(ours[0].files, [bin.to_str().unwrap()]);
        let exe = if drop_ptrace {
            // argv[0], as setpriv passed it.
            bin.display().to_string()
        } else {
            format!("{} (deleted)", bin.display())
        };
        assert_eq!(ours[0].exe, exe, "without CAP_SYS_PTRACE: {drop_ptrace}");
    }
}

/// Many other jobs finish while the broker's own is queued: their
/// JobRemoved signals reach the broker's subscription too, and its job's
/// result must be picked out from them. (Whether more than zbus's 64
/// queued signals arrive before the call's reply, the stall the broker
/// drains against, depends on timing; this checks the picking out.)
#[test]
fn the_broker_finds_its_job_among_many_others() {
    let ct = SystemdContainer::boot();
    ct.install_unit(
        "flood@.service",
        "[Service]\nType=oneshot\nExecStart=/bin/true\n",
    );
    ct.install_unit("demo.service", DEMO_UNIT);
    ct.sh("systemctl start demo.service");
    let first = ct.main_pid("demo.service");
    let flood: Vec<String> = (0..400).map(|i| format!("flood@{i}.service")).collect();
    let mut starter = ct
        .command(["systemctl", "start", "--no-block"])
        .args(&flood)
        .spawn()
        .expect("systemctl start");
    let out = perform(
        &ct,
        &[act(
            "demo.service",
            ServiceAction::Restart,
            ActionSource::Declared,
        )],
    );
    assert!(starter.wait().unwrap().success());
    assert_eq!(out[0].result, "done", "{:?}", out[0]);
    assert_ne!(ct.main_pid("demo.service"), first);
}
