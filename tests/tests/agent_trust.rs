//! End to end: the agent's own programs and trust files, and reports that
//! tell the truth. Real bundles, built and signed, run by the real
//! `rollguard-agent` under the real kernel; each test looks at the disk
//! afterwards. Needs root (CI runs as root).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use rollguard_tests::host::{manifest, Host, Keys, PolicyOptions};
use rollguard_tests::run;
use serde_json::Value;

/// A source install of the agent under the host's tree (which bundles may
/// write: `allow_scopes` is the whole root), as the attack suite found:
/// `ROOT/opt/rollguard/bin/{rollguard-agent,rollguard-sandbox-exec}`.
fn source_install(host: &Host) -> PathBuf {
    let bin = host.root().join("opt/rollguard/bin");
    fs::create_dir_all(&bin).unwrap();
    for name in ["rollguard-agent", "rollguard-sandbox-exec"] {
        rollguard_tests::install_program(&rollguard_tests::bin(name), &bin.join(name));
        fs::set_permissions(bin.join(name), fs::Permissions::from_mode(0o755)).unwrap();
    }
    bin.join("rollguard-agent")
}

fn run_with(agent: &Path, host: &Host, bundle: &Path) -> Value {
    let out = run(Command::new(agent)
        .args(["run", "--json", "--policy"])
        .arg(host.policy())
        .arg(bundle));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The attack: a bundle scoped to the stage-2 program's path (or the
/// dynamic loader's preload file, or the agent's unit) is refused before
/// anything runs, the program is untouched, and the next bundle is
/// confined (its out-of-scope write denied and reported).
#[test]
fn bundles_scoped_to_the_agents_programs_loader_or_unit_are_refused() {
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-11.tokyo", &keys, PolicyOptions::default());
    let agent = source_install(&host);
    let stage2 = agent.with_file_name("rollguard-sandbox-exec");
    let stage2_before = fs::read(&stage2).unwrap();
    let replace = format!(
        "#!/bin/sh\nprintf '#!/bin/sh\\nexec \"$@\"\\n' > {0}\nchmod 755 {0}\n",
        stage2.display()
    );

    for (label, scope, why) in [
        (
            "stage2",
            format!("write = [{:?}]", stage2.display().to_string()),
            "stage 2 runs unconfined",
        ),
        (
            "stage2-dir",
            format!(
                "delete = [{:?}]",
                stage2.parent().unwrap().display().to_string()
            ),
            // Found through the agent binary beside it first.
            "overlaps protected path",
        ),
        (
            "next-stage2",
            // Where stage 2 would be looked for if the first place were
            // empty: not there yet, and still protected.
            format!(
                "write = [{:?}]",
                host.root()
                    .join("opt/rollguard/lib/rollguard/rollguard-sandbox-exec")
                    .display()
                    .to_string()
            ),
            "stage 2 runs unconfined",
        ),
        (
            "preload",
            "write = [\"/etc/ld.so.preload\"]".to_string(),
            "dynamic loader",
        ),
        (
            "unit",
            "write = [\"/etc/systemd/system/rollguard-agent.service.d\"]".to_string(),
            "systemd unit",
        ),
    ] {
        let src = host.bundle_source(label, &manifest(label, 1, "\"mail-*\"", &scope), &replace);
        let bundle = host.build_signed(&src, &keys, &["alice"]);
        let report = run_with(&agent, &host, &bundle);
        assert_eq!(report["status"], "refused", "{label}: {report:#}");
        assert_eq!(report["refusal"], "protected_path", "{label}: {report:#}");
        let reason = report["reason"].as_str().unwrap();
        assert!(reason.contains(why), "{label}: {reason}");
        assert_eq!(fs::read(&stage2).unwrap(), stage2_before, "{label}");
    }
    // The next bundle is confined by the real stage 2: its write outside
    // its scope is denied and reported.
    let src = host.bundle_source(
        "next",
        &manifest("next", 1, "\"mail-*\"", "write = [\"@ROOT@/etc/mail\"]"),
        "#!/bin/sh\necho evil > @ROOT@/home/customers/bob/db.sql\ntouch @ROOT@/etc/mail/ran\n",
    );
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    let before = host.snapshot("home");
    let report = run_with(&agent, &host, &bundle);
    assert_eq!(report["status"], "succeeded", "{report:#}");
    assert!(host.root().join("etc/mail/ran").exists());
    assert_eq!(host.snapshot("home"), before);
    let denials = report["denials"].as_array().expect("denials known");
    assert!(
        denials.iter().any(|d| d["path"]
            .as_str()
            .unwrap_or("")
            .contains("home/customers/bob")),
        "{report:#}"
    );
}

/// An allowed_signers file a group may write is refused when the policy is
/// loaded, with the file, its owner and mode and the fix; nothing runs.
/// Likewise a policy file others may write.
#[test]
fn a_group_writable_allowed_signers_or_policy_is_refused_at_load() {
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-12.tokyo", &keys, PolicyOptions::default());
    let src = host.bundle_source(
        "b",
        &manifest("b", 1, "\"mail-*\"", "write = [\"@ROOT@/etc/mail\"]"),
        "#!/bin/sh\ntouch @ROOT@/etc/mail/ran\n",
    );
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    let agent_run = || {
        run(rollguard_tests::agent()
            .args(["run", "--json", "--policy"])
            .arg(host.policy())
            .arg(&bundle))
    };

    // Under --json the error is one JSON object on stdout.
    let error_of = |out: &std::process::Output| {
        assert_eq!(out.status.code(), Some(3), "{out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("not a JSON error ({e}): {out:?}"));
        assert_eq!(v["status"], "error", "{v}");
        v["error"].as_str().unwrap_or_default().to_string()
    };

    let signers = keys.allowed_signers();
    fs::set_permissions(&signers, fs::Permissions::from_mode(0o664)).unwrap();
    let error = error_of(&agent_run());
    assert!(error.contains(&signers.display().to_string()), "{error}");
    assert!(error.contains("mode 0664"), "{error}");
    assert!(error.contains("owner uid 0"), "{error}");
    assert!(
        error.contains(&format!("chmod go-w {}", signers.display())),
        "{error}"
    );
    assert!(!host.root().join("etc/mail/ran").exists());

    fs::set_permissions(&signers, fs::Permissions::from_mode(0o644)).unwrap();
    fs::set_permissions(host.policy(), fs::Permissions::from_mode(0o646)).unwrap();
    let error = error_of(&agent_run());
    assert!(error.contains("host policy"), "{error}");
    assert!(error.contains("mode 0646"), "{error}");
    assert!(!host.root().join("etc/mail/ran").exists());

    // Fixed: it runs.
    fs::set_permissions(host.policy(), fs::Permissions::from_mode(0o600)).unwrap();
    let out = agent_run();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(host.root().join("etc/mail/ran").exists());
}

/// A bundle whose output carries terminal escapes cannot hide the DENIED
/// block of the printed report: every control character is shown escaped.
#[test]
fn escape_sequences_in_output_are_printed_escaped() {
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-13.tokyo", &keys, PolicyOptions::default());
    let src = host.bundle_source(
        "esc",
        &manifest("esc", 1, "\"mail-*\"", "write = [\"@ROOT@/etc/mail\"]"),
        // Try to delete customer data (denied), then clear the screen, move
        // the cursor up over the DENIED block, set the window title and
        // print a fake all-clear, with \r and backspaces for good measure.
        "#!/bin/sh\nrm -f @ROOT@/home/customers/bob/db.sql\nprintf 'ok\\033[2J\\033[H\\033[5A\\033]0;fine\\007  denials: none\\r\\b\\b\\n'\nprintf '\\033[1A\\033[2K' >&2\nexit 0\n",
    );
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    let out = run(rollguard_tests::agent()
        .args(["run", "--policy"])
        .arg(host.policy())
        .arg(&bundle));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        !stdout.bytes().any(|b| b < 0x20 && b != b'\n'),
        "raw control characters reached the terminal: {stdout:?}"
    );
    assert!(stdout.contains("DENIED"), "{stdout}");
    assert!(
        stdout.contains("ok\\x1b[2J\\x1b[H\\x1b[5A\\x1b]0;fine\\x07  denials: none\\r\\x08\\x08"),
        "{stdout}"
    );
    assert!(stdout.contains("\\x1b[1A\\x1b[2K"), "{stdout}");
    assert!(host.root().join("home/customers/bob/db.sql").exists());

    // --json escapes them too (JSON's own escaping), and decodes to the
    // bundle's exact bytes.
    let src = host.bundle_source(
        "esc2",
        &manifest("esc", 2, "\"mail-*\"", "write = [\"@ROOT@/etc/mail\"]"),
        "#!/bin/sh\nprintf 'ok\\033[2J\\r\\n'\n",
    );
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    let out = run(rollguard_tests::agent()
        .args(["run", "--json", "--policy"])
        .arg(host.policy())
        .arg(&bundle));
    assert!(
        !out.stdout.iter().any(|b| *b < 0x20 && *b != b'\n'),
        "{:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["stdout_tail"], "ok\u{1b}[2J\r\n", "{report:#}");
}

/// `/proc/sys/kernel/seccomp/actions_logged` restored on drop, even when
/// the test fails. Other tests on this machine run concurrently, so the
/// window is kept to one agent run.
struct ActionsLogged {
    original: String,
}

const ACTIONS_LOGGED: &str = "/proc/sys/kernel/seccomp/actions_logged";

impl ActionsLogged {
    fn without_errno() -> Self {
        let original = fs::read_to_string(ACTIONS_LOGGED).unwrap();
        assert!(
            original.split_whitespace().any(|a| a == "errno"),
            "this host does not log seccomp errno actions to begin with: {original}"
        );
        let reduced: Vec<&str> = original
            .split_whitespace()
            .filter(|a| *a != "errno")
            .collect();
        fs::write(ACTIONS_LOGGED, reduced.join(" ")).unwrap();
        ActionsLogged { original }
    }
}

impl Drop for ActionsLogged {
    fn drop(&mut self) {
        if let Err(e) = fs::write(ACTIONS_LOGGED, self.original.trim()) {
            eprintln!("RESTORING {ACTIONS_LOGGED} FAILED: {e}");
        }
    }
}

/// When the kernel does not log seccomp's errno results, a refused
/// syscall leaves no record: the report says denials are unknown (null),
/// never zero.
#[test]
fn denials_are_unknown_when_seccomp_does_not_log_errno() {
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-14.tokyo", &keys, PolicyOptions::default());
    let src = host.bundle_source(
        "sc",
        &manifest("sc", 1, "\"mail-*\"", "write = [\"@ROOT@/etc/mail\"]"),
        // unshare(CLONE_NEWNS) is refused by seccomp (EPERM).
        "#!/bin/sh\nunshare -m true && echo unshared\ntouch @ROOT@/etc/mail/ran\n",
    );
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    // The same bundle, next version, for the run with errno logged again.
    let src2 = host.bundle_source(
        "sc2",
        &manifest("sc", 2, "\"mail-*\"", "write = [\"@ROOT@/etc/mail\"]"),
        "#!/bin/sh\nunshare -m true && echo unshared\ntouch @ROOT@/etc/mail/ran2\n",
    );
    let bundle2 = host.build_signed(&src2, &keys, &["alice"]);
    let report = {
        let _window = ActionsLogged::without_errno();
        host.run(&bundle).0
    };
    assert!(
        fs::read_to_string(ACTIONS_LOGGED)
            .unwrap()
            .split_whitespace()
            .any(|a| a == "errno"),
        "actions_logged not restored"
    );
    assert_eq!(report["status"], "succeeded", "{report:#}");
    assert!(host.root().join("etc/mail/ran").exists());
    assert!(
        !report["stdout_tail"]
            .as_str()
            .unwrap_or("")
            .contains("unshared"),
        "{report:#}"
    );
    assert!(report["denials"].is_null(), "{report:#}");
    assert!(report["denial_count"].is_null(), "{report:#}");

    // With errno logged (restored), the same attempt is seen and reported.
    let (report, _) = host.run(&bundle2);
    assert_eq!(report["status"], "succeeded", "{report:#}");
    let denials = report["denials"].as_array().expect("denials known");
    assert!(
        denials
            .iter()
            .any(|d| d["access"].as_str().unwrap_or("").contains("unshare")),
        "{report:#}"
    );
}

/// The daemon opens and checks its stage-2 program once, at start, and
/// every run executes that file: a program renamed over its path later
/// (as a bundle with write access there could have done before the path
/// was protected) never runs, and the runs stay confined.
#[test]
fn the_daemon_runs_the_stage2_program_it_checked_at_start() {
    use rollguard_tests::fleet::{manifest as fleet_manifest, script, Fleet};
    let mut fleet = Fleet::new(&[("mail-01", &[("role", "mail")])]);
    // A separate installation, so its stage 2 can be replaced.
    let bin = fleet.root().join("install/bin");
    fs::create_dir_all(&bin).unwrap();
    for name in ["rollguard-agent", "rollguard-sandbox-exec"] {
        rollguard_tests::install_program(&rollguard_tests::bin(name), &bin.join(name));
        fs::set_permissions(bin.join(name), fs::Permissions::from_mode(0o755)).unwrap();
    }
    fleet.start_controller();
    fleet.start_agent_with("mail-01", &bin.join("rollguard-agent"));
    fleet.wait_connected("mail-01");

    let marker = fleet.root().join("replacement-ran");
    let fake = bin.join(".fake");
    fs::write(&fake, format!("#!/bin/sh\ntouch {}\n", marker.display())).unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    fs::rename(&fake, bin.join("rollguard-sandbox-exec")).unwrap();

    let bundle = fleet.bundle(
        "pinned",
        &fleet_manifest("pinned", 1, "\"mail-*\"", "1m"),
        &script("grep '^Seccomp:' /proc/self/status > \"$H/seccomp\""),
    );
    let id = fleet.start_rollout(&bundle, &["--waves", "100%", "--bake", "1s"]);
    let status = fleet.wait_state(&id, "completed");
    assert!(!marker.exists(), "the replaced program ran: {status:#}");
    let seccomp = fs::read_to_string(fleet.mail("mail-01").join("seccomp")).unwrap();
    assert!(seccomp.trim_end().ends_with('2'), "{seccomp}");
}
