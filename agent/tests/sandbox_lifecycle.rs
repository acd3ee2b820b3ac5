//! The parent side: cgroup containment, timeout, kill switch, leftovers,
//! reporting (pid, audit session), failures, and the kernel probe.

mod sandbox_support;

use std::fs;
use std::io::Write;
use std::time::{Duration, Instant};

use rollguard_agent::sandbox::status::{self, Event, Step, RELEASE_BYTE, REQUESTS_DIR_BYTE};
use rollguard_agent::sandbox::{KernelSupport, RunCgroup, Termination};
use sandbox_support::{is_alive, launcher, processes_with_cmdline, Tree};

#[test]
fn timeout_kills_double_forked_children() {
    let t = Tree::new();
    // The background sleep is re-parented away from the shell (double
    // fork); only the cgroup still ties it to the run.
    let spec = t.spec("(sleep 1001 &) ; sleep 1001");
    let child = launcher().spawn(&spec).unwrap();
    let cgroup = child.cgroup().path().to_path_buf();
    // Wait until both sleeps run, so the kill has something to find.
    let deadline = Instant::now() + Duration::from_secs(60);
    while processes_with_cmdline(&["sleep", "1001"]).len() < 2 {
        assert!(Instant::now() < deadline, "the sleeps never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let sleepers = processes_with_cmdline(&["sleep", "1001"]);
    let outcome = child.wait(Duration::from_secs(2)).unwrap();
    assert_eq!(outcome.termination, Termination::TimedOut);
    // sh + two sleeps (dash does not exec the last command).
    assert!(
        outcome.killed_processes >= 2,
        "killed {}",
        outcome.killed_processes
    );
    for pid in sleepers {
        assert!(!is_alive(pid), "sleep {pid} survived");
    }
    assert!(processes_with_cmdline(&["sleep", "1001"]).is_empty());
    assert!(!cgroup.exists(), "the run cgroup was not removed");
}

#[test]
fn processes_left_behind_are_counted_and_killed() {
    let t = Tree::new();
    let run = t.sh("(sleep 1002 &); (sleep 1002 &); echo started=yes");
    assert_eq!(run.exit_code(), 0);
    assert_eq!(run.outcome.leftover_processes, 2);
    assert!(processes_with_cmdline(&["sleep", "1002"]).is_empty());
}

#[test]
fn kill_switch_kills_the_whole_run() {
    let t = Tree::new();
    let marker = t.p("etc/app/started");
    let spec = t.spec(&format!(
        "(sleep 1003 &); touch {}; sleep 1003",
        marker.display()
    ));
    let child = launcher().spawn(&spec).unwrap();
    let handle = child.kill_handle();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "the run never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let killer = std::thread::spawn(move || handle.kill().unwrap());
    let outcome = child.wait(Duration::from_secs(600)).unwrap();
    killer.join().unwrap();
    assert_eq!(outcome.termination, Termination::Killed);
    assert!(
        outcome.killed_processes >= 2,
        "killed {}",
        outcome.killed_processes
    );
    assert!(processes_with_cmdline(&["sleep", "1003"]).is_empty());
}

#[test]
fn the_bundle_is_the_process_that_created_the_domain_and_has_its_own_audit_session() {
    let t = Tree::new();
    let run = t.sh("echo pid=$$; echo parent=$PPID; echo session=$(cut -d' ' -f6 /proc/$$/stat); echo ses=$(cat /proc/self/sessionid); echo cgroup=$(cat /proc/self/cgroup | grep '^0::')");
    assert_eq!(run.exit_code(), 0);
    // Stage 2 (PID 1 of the run's PID namespace, `outcome.pid` on the
    // host) created the domain and forked the main process, pid 2.
    assert_eq!(run.value("pid"), "2");
    assert_eq!(run.value("parent"), "1");
    // A session of its own (stage 2's): no controlling terminal.
    assert_eq!(run.value("session"), "1");
    let session = run.outcome.audit_session.expect("audit session reported");
    assert_eq!(run.value("ses"), session.to_string());
    let own = fs::read_to_string("/proc/self/sessionid").unwrap();
    assert_ne!(
        own.trim(),
        session.to_string(),
        "the run shares the test's audit session"
    );
    assert!(run
        .value("cgroup")
        .ends_with(&format!("/rollguard-runs/{}", run.outcome.run_id)));
    let confinement = run.outcome.confinement.as_ref().unwrap();
    assert_eq!(confinement.audit_session, session);
    assert!(confinement.landlock_abi >= 3);
    assert!(confinement.landlock_fs_rules > 0);
    assert_eq!(
        confinement.seccomp_filters,
        if cfg!(target_arch = "x86_64") { 3 } else { 2 }
    );

    // Two runs never share a session.
    let other = t.sh("true");
    assert_ne!(other.outcome.audit_session, Some(session));
}

#[test]
fn exit_codes_and_exec_failures_are_reported() {
    let t = Tree::new();
    assert_eq!(t.sh("exit 7").exit_code(), 7);
    let run = t.sh("kill -TERM $$");
    assert_eq!(
        run.outcome.termination,
        Termination::Signaled {
            signal: libc::SIGTERM
        }
    );
    let mut spec = t.spec("");
    spec.command = vec!["/nonexistent/program".into()];
    let run = t.run(&spec);
    assert!(
        matches!(&run.outcome.termination, Termination::ExecFailed { error } if error.contains("/nonexistent/program")),
        "{:?}",
        run.outcome.termination
    );
    // Confinement was complete when exec failed.
    assert!(run.outcome.confinement.is_some());
}

#[test]
fn a_missing_scope_path_fails_closed_before_anything_runs() {
    let t = Tree::new();
    let mut spec = t.spec(&format!("touch {}", t.p("spool/tmp/marker").display()));
    spec.scope.write = t.scope(&["etc/does-not-exist"]);
    let run = t.run(&spec);
    assert!(
        matches!(&run.outcome.termination, Termination::SetupFailed { step, error } if step == "landlock" && error.contains("does not exist")),
        "{:?}",
        run.outcome.termination
    );
    assert!(!t.p("spool/tmp/marker").exists());
    assert!(run.stderr.contains("nothing was run"), "{}", run.stderr);
}

#[test]
fn the_run_cgroup_is_unique_per_run_id() {
    let t = Tree::new();
    let spec = t.spec("sleep 1004");
    let first = launcher().spawn(&spec).unwrap();
    let second = launcher().spawn(&spec);
    assert!(second.is_err(), "a second run with the same id was started");
    first.kill().unwrap();
    assert_eq!(
        first.wait(Duration::from_secs(600)).unwrap().termination,
        Termination::Killed
    );
}

#[test]
fn this_kernel_supports_everything_the_sandbox_needs() {
    let support = KernelSupport::probe();
    support.require(false).unwrap();
    support.require(true).unwrap();
    assert!(support.landlock_abi.unwrap() >= 4);
    assert!(support.cgroup_kill && support.seccomp_filter && support.audit_sessions);
    let json = serde_json::to_value(&support).unwrap();
    assert!(json.get("landlock_abi").is_some());
}

#[test]
fn an_unsupervised_run_is_killed_and_recoverable() {
    let t = Tree::new();
    let spec = t.spec("(sleep 1005 &); sleep 1005");
    let child = launcher().spawn(&spec).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while processes_with_cmdline(&["sleep", "1005"]).len() < 2 {
        assert!(Instant::now() < deadline, "the sleeps never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Dropping the handle without waiting kills the whole run.
    drop(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !processes_with_cmdline(&["sleep", "1005"]).is_empty() {
        assert!(Instant::now() < deadline, "the dropped run kept running");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The dropped run's cgroup is removed in the background.
    let deadline = Instant::now() + Duration::from_secs(60);
    while RunCgroup::existing(&spec.run_id).unwrap().is_some() {
        assert!(Instant::now() < deadline, "the dropped run's cgroup stayed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn recovery_finds_and_removes_a_run_cgroup_left_behind() {
    // What an agent restarted after a crash sees: a run cgroup with a
    // process still in it.
    let run_id = sandbox_support::unique_run_id();
    let cgroup = RunCgroup::create(&run_id).unwrap();
    let mut orphan = std::process::Command::new("sleep")
        .arg("1007")
        .spawn()
        .unwrap();
    cgroup.add_process(orphan.id()).unwrap();
    assert!(RunCgroup::list_run_ids().unwrap().contains(&run_id));
    let found = RunCgroup::existing(&run_id)
        .unwrap()
        .expect("run cgroup found by id");
    assert_eq!(found.processes().unwrap(), vec![orphan.id()]);
    found.kill_and_remove(Duration::from_secs(60)).unwrap();
    assert!(RunCgroup::existing(&run_id).unwrap().is_none());
    let status = orphan.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
}

#[test]
fn stage2_joins_the_run_cgroup_itself_when_not_placed_there() {
    // Run stage 2 directly (no launcher): it starts in the test's cgroup
    // and must move itself before anything else.
    let t = Tree::new();
    let (spec, cgroup, mut stage2) = stage2_by_hand(&t, "cat /proc/self/cgroup");
    let (mut agent_end, stage2_end) = std::os::unix::net::UnixStream::pair().unwrap();
    let stage2 = stage2
        .stdin(std::os::fd::OwnedFd::from(stage2_end))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The session id, then the release byte, as the launcher reads and
    // sends them once the run is durable.
    read_what_stage2_sends_before_the_release(&mut agent_end);
    agent_end.write_all(&[RELEASE_BYTE]).unwrap();
    let out = stage2.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let line = stdout.lines().find(|l| l.starts_with("0::")).unwrap();
    assert!(
        line.ends_with(&format!("/rollguard-runs/{}", spec.run_id)),
        "{line}"
    );
    cgroup.kill_and_remove(Duration::from_secs(60)).unwrap();
}

#[test]
fn a_held_run_executes_nothing_until_released() {
    let t = Tree::new();
    let (ran, spec) = leaves_a_file(&t);
    let held = launcher().spawn_held(&spec).unwrap();
    let pid = held.pid();
    // Time enough for stage 2 to confine itself and reach the gate: held,
    // it is still the stage-2 program, and the bundle has not run.
    std::thread::sleep(Duration::from_millis(300));
    assert!(!ran.exists());
    let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe.file_name().unwrap(), "rollguard-sandbox-exec");
    let outcome = held
        .release()
        .unwrap()
        .wait(Duration::from_secs(60))
        .unwrap();
    assert_eq!(outcome.termination, Termination::Exited { code: 0 });
    assert_eq!(fs::read_to_string(&ran).unwrap(), "ran\n");
    assert!(outcome.confinement.is_some());
}

#[test]
fn a_withdrawn_run_executes_nothing_and_leaves_no_cgroup() {
    let t = Tree::new();
    let (ran, spec) = leaves_a_file(&t);
    let held = launcher().spawn_held(&spec).unwrap();
    let pid = held.pid();
    held.withdraw().unwrap();
    assert!(!is_alive(pid));
    assert!(RunCgroup::existing(&spec.run_id).unwrap().is_none());
    assert!(!ran.exists());
}

#[test]
fn stage2_executes_nothing_when_the_agent_goes_away_before_the_release() {
    // The agent died (or withdrew) before releasing the run: end-of-file on
    // the gate. Stage 2 confines itself, then exits without executing.
    let t = Tree::new();
    let ran = t.p("etc/app/ran");
    let (spec, cgroup, mut stage2) = stage2_by_hand(&t, &format!("echo ran > {}", ran.display()));
    // The gate is a socket pair: stage 2 sends its audit session id on it,
    // then waits for the release byte. The agent's end goes away once the
    // id has arrived.
    let (mut agent_end, stage2_end) = std::os::unix::net::UnixStream::pair().unwrap();
    let child = stage2
        .stdin(std::os::fd::OwnedFd::from(stage2_end))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(stage2);
    read_what_stage2_sends_before_the_release(&mut agent_end);
    drop(agent_end);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(!ran.exists());
    let events = status::read_events(&spec.run_dir).unwrap();
    assert!(
        matches!(
            events.as_slice(),
            [Event::SetupFailed {
                step: Step::Release,
                ..
            }]
        ),
        "{events:?}"
    );
    cgroup.kill_and_remove(Duration::from_secs(60)).unwrap();
}

/// What stage 2 sends on its gate before it waits for the release, read as
/// the launcher reads it: the audit session id (one decimal line), then one
/// [`REQUESTS_DIR_BYTE`] carrying the run's request directory. The
/// descriptor is not received here (a plain read discards it); only the
/// order matters: an agent end dropped before this byte was sent would fail
/// stage 2 at its mount step instead of at the release.
fn read_what_stage2_sends_before_the_release(gate: &mut std::os::unix::net::UnixStream) {
    let mut byte = [0u8; 1];
    let mut line = Vec::new();
    while std::io::Read::read(gate, &mut byte).unwrap() == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    let line = String::from_utf8(line).unwrap();
    assert!(line.parse::<u32>().is_ok(), "session line {line:?}");
    assert_eq!(std::io::Read::read(gate, &mut byte).unwrap(), 1);
    assert_eq!(byte[0], REQUESTS_DIR_BYTE);
}

/// A run that leaves `etc/app/ran` behind if it executes.
fn leaves_a_file(t: &Tree) -> (std::path::PathBuf, rollguard_agent::sandbox::SandboxSpec) {
    let ran = t.p("etc/app/ran");
    let spec = t.spec(&format!("echo ran > {}", ran.display()));
    (ran, spec)
}

/// Stage 2 started by hand (no launcher, so in the test's own cgroup),
/// with a plan for `script` and its run cgroup created.
fn stage2_by_hand(
    t: &Tree,
    script: &str,
) -> (
    rollguard_agent::sandbox::SandboxSpec,
    RunCgroup,
    std::process::Command,
) {
    let spec = t.spec(script);
    let cgroup = RunCgroup::create(&spec.run_id).unwrap();
    let enforcement =
        rollguard_agent::sandbox::cgroup_limits::apply(&cgroup, &spec.run_id, &spec.limits)
            .unwrap();
    let plan = rollguard_agent::sandbox::spec::Stage2Plan {
        spec: spec.clone(),
        cgroup_dir: cgroup.path().to_path_buf(),
        cgroup_v1_dirs: enforcement.v1_dirs(),
    };
    let plan_path = t.p("run/plan.json");
    fs::write(&plan_path, serde_json::to_vec(&plan).unwrap()).unwrap();
    // Stage 2 insists on being PID 1 of a new PID namespace, as the
    // launcher's CLONE_NEWPID makes it: util-linux `unshare --fork` does
    // the same by hand and passes its exit status on.
    let mut stage2 = std::process::Command::new("unshare");
    stage2
        .args(["--pid", "--fork", "--kill-child"])
        .arg(env!("CARGO_BIN_EXE_rollguard-sandbox-exec"))
        .arg(&plan_path);
    (spec, cgroup, stage2)
}
