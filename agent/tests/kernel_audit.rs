//! End-to-end test of the denial reporter against the real kernel: a probe
//! process confines itself with Landlock (or seccomp), execs a program that
//! tries something forbidden, and the listener must report exactly that.
//!
//! Needs root (audit control and the audit multicast group) and a kernel
//! with Landlock ABI 7 and audit — as on the development machines and CI.
//! There is no skip: if audit is unavailable the test fails, loudly.
//!
//! `harness = false`: the test binary re-executes itself as the probe
//! (`--probe-landlock` / `--probe-seccomp`), because the confinement must be
//! applied in a fresh single-threaded process before `exec`, which the
//! standard test harness (threads, no `main`) cannot give us.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rollguard_agent::kernel_audit::{AuditListener, DenialCount};
use rollguard_shared::report::Denial;

/// Upper bound for waiting on in-flight records; collection returns as
/// soon as they are in (normally milliseconds). Not an assertion on time.
const WAIT: Duration = Duration::from_secs(30);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--probe-landlock") => probe_landlock(&args[2..]),
        Some("--probe-seccomp") => probe_seccomp(&args[2..]),
        Some("--probe-landlock-nested") => probe_landlock_nested(&args[2..]),
        _ => run_tests(&args[1..]),
    }
}

// ---- probes (run in a child process) ---------------------------------------

/// Confine this process with Landlock — read and execute everywhere,
/// nothing else — logging denials after exec as the sandbox must, then
/// exec `rm -f FILES…`.
fn probe_landlock(files: &[String]) -> ! {
    confine_read_only();
    let err = Command::new("rm").arg("-f").args(files).exec();
    fail(&format!("exec rm: {err}"))
}

/// Like a sandbox's stage 2 whose bundle confines itself further: start an
/// audit session (printed on stdout), confine this process, then run a
/// *child* that adds its own nested domain and execs `rm`. The denials are
/// attributed to the child's domain, which only the session ties to the run.
fn probe_landlock_nested(files: &[String]) -> ! {
    let ses = start_audit_session(0).unwrap_or_else(|e| fail(&format!("audit session: {e}")));
    println!("{ses}");
    confine_read_only();
    let status = Command::new(std::env::current_exe().unwrap_or_else(|e| fail(&format!("{e}"))))
        .arg("--probe-landlock")
        .args(files)
        .status()
        .unwrap_or_else(|e| fail(&format!("spawn: {e}")));
    std::process::exit(status.code().unwrap_or(126))
}

fn confine_read_only() {
    use landlock::{
        path_beneath_rules, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr,
        RulesetStatus, ABI,
    };
    let abi = ABI::V5;
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(path_beneath_rules(["/"], AccessFs::from_read(abi))))
        .and_then(|r| r.log_new_exec(true))
        .and_then(|r| r.restrict_self())
        .unwrap_or_else(|e| fail(&format!("landlock: {e}")));
    if status.ruleset == RulesetStatus::NotEnforced {
        fail("landlock is not enforced on this kernel");
    }
}

/// Start a new audit session (printed on stdout), install a seccomp filter
/// that kills on mkdir/mkdirat (a KILL verdict is always logged), then exec
/// `mkdir DIR`.
fn probe_seccomp(args: &[String]) -> ! {
    use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
    let ses = start_audit_session(0).unwrap_or_else(|e| fail(&format!("audit session: {e}")));
    println!("{ses}");
    let arch =
        TargetArch::try_from(std::env::consts::ARCH).unwrap_or_else(|e| fail(&format!("{e}")));
    let mut rules = BTreeMap::new();
    #[cfg(target_arch = "x86_64")]
    rules.insert(libc_sys_mkdir(), vec![]);
    rules.insert(libc_sys_mkdirat(), vec![]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::KillProcess,
        arch,
    )
    .unwrap_or_else(|e| fail(&format!("seccomp filter: {e}")));
    let program: BpfProgram = filter
        .try_into()
        .unwrap_or_else(|e: seccompiler::BackendError| fail(&format!("{e}")));
    seccompiler::apply_filter(&program).unwrap_or_else(|e| fail(&format!("seccomp: {e}")));
    let err = Command::new("mkdir").args(args).exec();
    fail(&format!("exec mkdir: {err}"))
}

#[cfg(target_arch = "x86_64")]
fn libc_sys_mkdir() -> i64 {
    83
}

fn libc_sys_mkdirat() -> i64 {
    if cfg!(target_arch = "x86_64") {
        258
    } else {
        34
    }
}

/// Give this process a fresh audit session (as the sandbox's stage 2 does)
/// and return its id.
fn start_audit_session(loginuid: u32) -> std::io::Result<u32> {
    std::fs::write("/proc/self/loginuid", loginuid.to_string())?;
    let text = std::fs::read_to_string("/proc/self/sessionid")?;
    text.trim().parse().map_err(std::io::Error::other)
}

fn fail(msg: &str) -> ! {
    eprintln!("probe: {msg}");
    std::process::exit(127)
}

// ---- tests ------------------------------------------------------------------

fn run_tests(args: &[String]) {
    let tests: &[(&str, fn())] = &[
        (
            "landlock_denials_are_reported_with_path_and_kernel_count",
            landlock_denials_are_reported,
        ),
        (
            "a_run_without_denials_reports_zero_not_unknown",
            a_run_without_denials_reports_zero,
        ),
        (
            "seccomp_denials_are_reported_for_the_audit_session",
            seccomp_denials_are_reported,
        ),
        (
            "denials_in_a_nested_domain_are_found_through_the_session",
            nested_domain_denials_are_found,
        ),
    ];
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let mut failed = Vec::new();
    let mut ran = 0;
    for (name, test) in tests {
        if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        ran += 1;
        println!("test {name} ...");
        match std::panic::catch_unwind(test) {
            Ok(()) => println!("test {name} ... ok"),
            Err(_) => {
                println!("test {name} ... FAILED");
                failed.push(*name);
            }
        }
    }
    println!("\n{ran} tests, {} failed", failed.len());
    if !failed.is_empty() {
        println!("failures: {failed:?}");
        std::process::exit(1);
    }
}

fn listener() -> AuditListener {
    AuditListener::start()
        .unwrap_or_else(|e| panic!("the kernel audit listener must work here (root, audit): {e}"))
}

fn probe(mode: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.arg(mode).args(args);
    cmd
}

fn landlock_denials_are_reported() {
    let listener = listener();
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|n| dir.path().join(n).to_str().unwrap().to_string())
        .collect();
    for f in &files {
        std::fs::write(f, "precious").unwrap();
    }
    let mut child = probe(
        "--probe-landlock",
        &files.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .spawn()
    .unwrap();
    let pid = child.id();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "rm must fail: {status:?}");
    for f in &files {
        assert!(
            Path::new(f).exists(),
            "{f} was removed: the probe was not confined"
        );
    }

    let collecting = std::time::Instant::now();
    let denials = listener.collect_for_run(pid, None, WAIT);
    // Informational only (no timing assertion): how long collection took.
    println!("collected in {:?}", collecting.elapsed());
    assert!(denials.is_complete(), "gaps: {:?}", denials.gaps);
    assert_eq!(denials.domains.len(), 1, "{denials:?}");
    assert!(denials.landlock_count_final, "{denials:?}");
    // rm unlinks each file once; Landlock checks (and logs) removal
    // against the directory the entry is removed from.
    assert_eq!(denials.landlock_denials, 3, "{denials:?}");
    // The program comes from the SYSCALL record of the same event.
    let dir_path = dir.path().to_str().unwrap().to_string();
    let rm = which("rm");
    assert_eq!(
        denials.denials,
        vec![DenialCount {
            denial: Denial {
                access: "fs.remove_file".into(),
                path: Some(dir_path.clone()),
                exe: Some(rm)
            },
            records: 3
        }],
        "{denials:?}"
    );
    let (list, count) = denials.report_fields();
    assert_eq!(count, Some(3));
    assert_eq!(list.unwrap()[0].path.as_deref(), Some(dir_path.as_str()));
}

/// The canonical path of a program on PATH (what the kernel reports as `exe`).
fn which(program: &str) -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{program} not on PATH"));
    std::fs::canonicalize(found)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string()
}

fn a_run_without_denials_reports_zero() {
    let listener = listener();
    // A confined process that is denied, and an unrelated one that is not.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x");
    std::fs::write(&file, "").unwrap();
    let mut denied = probe("--probe-landlock", &[file.to_str().unwrap()])
        .spawn()
        .unwrap();
    let mut quiet = Command::new("true").spawn().unwrap();
    let quiet_pid = quiet.id();
    assert!(quiet.wait().unwrap().success());
    let denied_pid = denied.id();
    denied.wait().unwrap();

    let none = listener.collect_for_run(quiet_pid, None, WAIT);
    assert!(none.is_complete(), "gaps: {:?}", none.gaps);
    assert!(none.denials.is_empty(), "{none:?}");
    assert_eq!(none.report_fields(), (Some(vec![]), Some(0)));
    // The denied one is still attributed to its own run.
    let some = listener.collect_for_run(denied_pid, None, WAIT);
    assert_eq!(some.total(), 1, "{some:?}");
}

fn seccomp_denials_are_reported() {
    let listener = listener();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("new");
    let mut child = probe("--probe-seccomp", &[target.to_str().unwrap()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(31),
        "mkdir must be killed by SIGSYS: {status:?}"
    );
    assert!(!target.exists());
    let ses: u32 = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("probe printed {line:?}"));

    let denials = listener.collect_for_run(pid, Some(ses), WAIT);
    assert!(denials.is_complete(), "gaps: {:?}", denials.gaps);
    assert_eq!(denials.seccomp_denials, 1, "{denials:?}");
    assert_eq!(denials.denials.len(), 1, "{denials:?}");
    let d = &denials.denials[0].denial;
    assert!(
        d.access == "syscall.mkdir" || d.access == "syscall.mkdirat",
        "{d:?}"
    );
    assert_eq!(d.path, None);
    assert!(
        d.exe.as_deref().is_some_and(|e| e.ends_with("/mkdir")),
        "{d:?}"
    );
    // Another session's view does not include it.
    let other = listener.collect_for_run(pid, Some(ses.wrapping_add(1_000_000)), WAIT);
    assert_eq!(other.seccomp_denials, 0);
}

fn nested_domain_denials_are_found() {
    let listener = listener();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x");
    std::fs::write(&file, "").unwrap();
    let mut child = probe("--probe-landlock-nested", &[file.to_str().unwrap()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(1));
    assert!(file.exists());
    let ses: u32 = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("probe printed {line:?}"));

    let denials = listener.collect_for_run(pid, Some(ses), WAIT);
    assert!(denials.is_complete(), "gaps: {:?}", denials.gaps);
    assert_eq!(
        denials.denial_list(),
        vec![Denial {
            access: "fs.remove_file".into(),
            path: Some(dir.path().to_str().unwrap().to_string()),
            exe: Some(which("rm"))
        }],
        "{denials:?}"
    );
    assert_eq!(denials.total(), 1);
}
