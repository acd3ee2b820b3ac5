//! End to end: `rollguard bundle build/sign` then `rollguard-agent run` on
//! real directory trees under the real kernel mechanisms. Each test checks
//! the disk afterwards, not just the report. Needs root (CI runs as root).

use std::fs;

use rollguard_tests::host::{denials, manifest, Host, Keys, PolicyOptions};
use rollguard_tests::{agent, run};
use serde_json::Value;

#[test]
fn scoped_bundle_succeeds_and_changes_only_its_scope() {
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-01.tokyo", &keys, PolicyOptions::default());
    let customers = host.snapshot("home");
    let src = host.bundle_source(
        "ok",
        &manifest("fix-mail", 1, "\"mail-*.tokyo\"", "write = [\"@ROOT@/etc/mail\"]\ndelete = [\"@ROOT@/var/spool/tmp\"]"),
        "#!/bin/sh\nset -eu\necho 'queue_lifetime = 2d' > @ROOT@/etc/mail/main.cf\nrm @ROOT@/var/spool/tmp/stale-1\nmktemp >/dev/null\necho ok\n",
    );
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    let (report, code) = host.run(&bundle);
    assert_eq!(report["status"], "succeeded", "{report:#}");
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["denials"], serde_json::json!([]), "{report:#}");
    assert_eq!(report["bundle"]["name"], "fix-mail");
    assert_eq!(report["signers"], serde_json::json!(["alice"]));
    assert!(report["stdout_tail"].as_str().unwrap().contains("ok"));
    assert_eq!(
        fs::read_to_string(host.root().join("etc/mail/main.cf")).unwrap(),
        "queue_lifetime = 2d\n"
    );
    assert!(!host.root().join("var/spool/tmp/stale-1").exists());
    assert_eq!(host.snapshot("home"), customers);
}

/// A program that starts threads is not an alert: glibc tries `clone3`
/// first, the sandbox answers ENOSYS (it cannot inspect clone3's flags)
/// without auditing it, and glibc falls back to `clone`, which is checked.
/// (dpkg-deb unpacking an xz package does this; every rollout of one would
/// otherwise halt.)
#[test]
fn threads_are_not_denials() {
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-01.tokyo", &keys, PolicyOptions::default());
    let src = host.bundle_source(
        "threads",
        &manifest("threads", 1, "\"mail-*.tokyo\"", "write = [\"@ROOT@/etc/mail\"]"),
        "#!/bin/sh\nset -eu\n/usr/bin/python3 -c 'import threading\nts = [threading.Thread(target=lambda: None) for _ in range(4)]\nfor t in ts: t.start()\nfor t in ts: t.join()\nprint(\"threads ok\")'\n",
    );
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    let (report, code) = host.run(&bundle);
    assert_eq!(report["status"], "succeeded", "{report:#}");
    assert_eq!(code, 0, "{report:#}");
    assert!(
        report["stdout_tail"]
            .as_str()
            .unwrap()
            .contains("threads ok"),
        "{report:#}"
    );
    assert_eq!(report["denials"], serde_json::json!([]), "{report:#}");
}

/// The run's audit rules (keyed on its audit session, which the bundle
/// reads from `/proc/self/sessionid`) are gone soon after the run: while
/// one is left, every system call on the host takes audit's slow path.
/// Their removal is handed to a detached process after the denials are
/// collected; the run's report waits only for that hand-over.
#[test]
fn the_runs_audit_rules_are_removed_after_it() {
    use rollguard_agent::kernel_audit::exit_rules::sessions_with_rules;
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-01.tokyo", &keys, PolicyOptions::default());
    let src = host.bundle_source(
        "session",
        &manifest(
            "session",
            1,
            "\"mail-*.tokyo\"",
            "write = [\"@ROOT@/etc/mail\"]",
        ),
        "#!/bin/sh\nset -eu\necho \"session=$(cat /proc/self/sessionid)\"\n",
    );
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    let (report, code) = host.run(&bundle);
    assert_eq!(report["status"], "succeeded", "{report:#}");
    assert_eq!(code, 0, "{report:#}");
    // Known to be none: the run's rules were in place (without them the
    // count would be unknown).
    assert_eq!(report["denial_count"], 0, "{report:#}");
    let tail = report["stdout_tail"].as_str().unwrap();
    let session: u32 = tail
        .trim()
        .strip_prefix("session=")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no session in {tail:?}"));
    assert!(session != 0 && session != u32::MAX, "{tail}");
    // The detached removal waits for a kernel grace period: polled, with
    // a bound far above it (this is no timing assertion).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left = sessions_with_rules().expect("list the audit rules");
        if !left.contains(&session) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the rules of session {session} are still there: {left:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The 2012 incident, replayed: a mail fix that creates a flag file on
/// targets, with a stray line deleting customer data and backups.
#[test]
fn incident_replay_target_denied_and_non_target_refused() {
    let keys = Keys::new(&["alice"]);
    let target = Host::new("mail-01.tokyo", &keys, PolicyOptions::default());
    let other = Host::new("web-07.tokyo", &keys, PolicyOptions::default());
    let script = "#!/bin/sh\ntouch @ROOT@/etc/mail/enabled\nrm -rf @ROOT@/home/customers @ROOT@/backup\nfind @ROOT@/home -delete\necho done\n";
    let man = manifest(
        "mail-fix-2012",
        1,
        "\"mail-*.tokyo\"",
        "write = [\"@ROOT@/etc/mail\"]",
    );

    for host in [&target, &other] {
        let before_home = host.snapshot("home");
        let before_backup = host.snapshot("backup");
        let src = host.bundle_source("incident", &man, script);
        let bundle = host.build_signed(&src, &keys, &["alice"]);
        let (report, code) = host.run(&bundle);
        if host.name == "web-07.tokyo" {
            // Not a target: refused before anything ran.
            assert_eq!(report["status"], "refused", "{report:#}");
            assert_eq!(report["refusal"], "not_target");
            assert_eq!(code, 2);
            assert!(
                !host.root().join("etc/mail/enabled").exists(),
                "nothing may run on a non-target"
            );
        } else {
            // Target: the intended change happens, the stray delete is
            // denied by the kernel and reported with its path.
            assert!(host.root().join("etc/mail/enabled").exists(), "{report:#}");
            let denials = denials(&report);
            let home = host.root().join("home/customers");
            // Outside every scope the mount is read-only: the kernel
            // answers EROFS (reported through the run's audit rules)
            // before Landlock is asked.
            assert!(
                denials.iter().any(
                    |(a, p)| (a.starts_with("fs.remove") || a == "erofs.unlinkat")
                        && p.starts_with(home.to_str().unwrap())
                ),
                "customer delete not reported: {report:#}"
            );
            assert!(
                denials
                    .iter()
                    .any(|(_, p)| p.starts_with(host.root().join("backup").to_str().unwrap())),
                "backup access not reported: {report:#}"
            );
            assert!(report["denial_count"].as_u64().unwrap() >= denials.len() as u64);
            assert_eq!(code, 1, "a run with denials is not a success");
        }
        assert_eq!(
            host.snapshot("home"),
            before_home,
            "customer data changed on {}",
            host.name
        );
        assert_eq!(
            host.snapshot("backup"),
            before_backup,
            "backup changed on {}",
            host.name
        );
    }
}

#[test]
fn refusals_execute_nothing() {
    let keys = Keys::new(&["alice", "bob", "mallory"]);
    let opts = PolicyOptions {
        delete_threshold: 2,
        ..PolicyOptions::default()
    };
    let host = Host::new("mail-02.tokyo", &keys, opts);
    // The first thing every script does is leave a mark.
    let script = "#!/bin/sh\ntouch @ROOT@/etc/mail/ran-$ROLLGUARD_BUNDLE_VERSION\n";
    let write = "write = [\"@ROOT@/etc/mail\"]";
    let ran = |v: u64| host.root().join(format!("etc/mail/ran-{v}")).exists();
    let case = |label: &str, man: String, signers: &[&str]| {
        let src = host.bundle_source(label, &man, script);
        let bundle = host.build_signed(&src, &keys, signers);
        host.run(&bundle)
    };

    // Expired.
    let expired = manifest("r", 1, "\"mail-*\"", write).replace("2099-01-01", "2001-01-01");
    let (report, code) = case("expired", expired, &["alice"]);
    assert_eq!(
        (report["refusal"].as_str(), code),
        (Some("expired"), 2),
        "{report:#}"
    );
    assert!(!ran(1));

    // Unsigned, and signed by a key not in allowed_signers.
    let (report, _) = case("unsigned", manifest("r", 1, "\"mail-*\"", write), &[]);
    assert_eq!(report["refusal"], "signatures", "{report:#}");
    fs::write(
        keys.allowed_signers(),
        fs::read_to_string(keys.allowed_signers())
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("mallory"))
            .collect::<Vec<_>>()
            .join("\n")
            + "\n",
    )
    .unwrap();
    let (report, _) = case(
        "untrusted",
        manifest("r", 1, "\"mail-*\"", write),
        &["mallory"],
    );
    assert_eq!(report["refusal"], "signatures", "{report:#}");
    assert!(!ran(1));

    // A deleting bundle needs delete_threshold (2) distinct principals: the
    // same signer twice does not count twice.
    let deleting = manifest(
        "r",
        1,
        "\"mail-*\"",
        &format!("{write}\ndelete = [\"@ROOT@/var/spool/tmp\"]"),
    );
    let (report, _) = case("delete-1", deleting.clone(), &["alice"]);
    assert_eq!(report["refusal"], "signatures", "{report:#}");
    assert!(!ran(1));

    // Scope touching the protected backup, and scope above the ceiling.
    let (report, _) = case(
        "protected",
        manifest("r", 1, "\"mail-*\"", "write = [\"@ROOT@/backup/daily\"]"),
        &["alice"],
    );
    assert_eq!(report["refusal"], "protected_path", "{report:#}");
    let (report, _) = case(
        "ceiling",
        // (Not /etc: that now overlaps protected paths, /etc/ld.so.preload
        // and the agent's unit among them, and is refused as such.)
        manifest("r", 1, "\"mail-*\"", "write = [\"/srv/www\"]"),
        &["alice"],
    );
    assert_eq!(report["refusal"], "scope_ceiling", "{report:#}");
    // Labels must match too: this host is role=mail.
    let web_only = manifest("r", 1, "\"mail-*\"", write)
        .replace("[scope]", "labels = { role = \"web\" }\n\n[scope]");
    let (report, _) = case("labels", web_only, &["alice"]);
    assert_eq!(report["refusal"], "not_target", "{report:#}");
    assert!(!ran(1));

    // Two distinct signers: runs. Then rollback protection: the same version
    // again, and an older one, are refused and do not run.
    let (report, code) = case("delete-2", deleting, &["alice", "bob"]);
    assert_eq!(
        (report["status"].as_str(), code),
        (Some("succeeded"), 0),
        "{report:#}"
    );
    assert!(ran(1));
    fs::remove_file(host.root().join("etc/mail/ran-1")).unwrap();
    let (report, _) = case("again", manifest("r", 1, "\"mail-*\"", write), &["alice"]);
    assert_eq!(report["refusal"], "rollback", "{report:#}");
    let (report, _) = case("older", manifest("r", 0, "\"mail-*\"", write), &["alice"]);
    assert_eq!(report["refusal"], "rollback", "{report:#}");
    assert!(!ran(1) && !ran(0));

    // A tampered bundle (one payload byte flipped) is refused.
    let src = host.bundle_source("tamper", &manifest("r", 5, "\"mail-*\"", write), script);
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    let mut bytes = fs::read(&bundle).unwrap();
    let at = bytes
        .windows(6)
        .rposition(|w| w == b"touch ")
        .expect("script in the tar");
    bytes[at] = b'T';
    fs::write(&bundle, bytes).unwrap();
    let (report, _) = host.run(&bundle);
    assert_eq!(report["refusal"], "bad_bundle", "{report:#}");
    assert!(!ran(5));
}

#[test]
fn timeout_kills_the_whole_tree() {
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-03.tokyo", &keys, PolicyOptions::default());
    let man = manifest("slow", 1, "\"mail-*\"", "write = [\"@ROOT@/etc/mail\"]")
        .replace("\"30s\"", "\"2s\"");
    // A double-forked daemon says it started, then everything sleeps. The
    // run has its own PID namespace (`$$` is not a host pid), so the daemon
    // is found on the host by its command line.
    let script = "#!/bin/sh\n(setsid sh -c 'echo started > @ROOT@/etc/mail/daemon.started; exec sleep 1019' &)\nsleep 1000\n";
    let src = host.bundle_source("slow", &man, script);
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    let (report, code) = host.run(&bundle);
    assert_eq!(report["status"], "timed_out", "{report:#}");
    assert_eq!(code, 1);
    assert!(host.root().join("etc/mail/daemon.started").exists());
    // Dead means gone, or a zombie (it has left its cgroup and runs nothing).
    let survivors: Vec<String> = fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let path = e.ok()?.path();
            let cmdline = fs::read(path.join("cmdline")).ok()?;
            (cmdline == b"sleep\x001019\x00").then(|| {
                let stat = fs::read_to_string(path.join("stat")).unwrap_or_default();
                format!("{}: {stat}", path.display())
            })
        })
        .filter(|s| !s.contains(") Z "))
        .collect();
    assert!(
        survivors.is_empty(),
        "the double-forked daemon survived the timeout: {survivors:?}"
    );
}

#[test]
fn audit_log_detects_edits_and_removals() {
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-04.tokyo", &keys, PolicyOptions::default());
    for v in 1..=3 {
        let src = host.bundle_source(
            &format!("v{v}"),
            &manifest("logged", v, "\"mail-*\"", "write = [\"@ROOT@/etc/mail\"]"),
            "#!/bin/sh\ntrue\n",
        );
        let bundle = host.build_signed(&src, &keys, &["alice"]);
        assert_eq!(host.run(&bundle).0["status"], "succeeded");
    }
    let verify = || {
        run(agent()
            .args(["log", "verify", "--json", "--policy"])
            .arg(host.policy()))
    };
    let out = verify();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["entries"], 6, "started + finished per run");

    let log = host.state_dir().join("audit.log");
    let original = fs::read_to_string(&log).unwrap();
    // Edit one result.
    let edited = original.replacen("\"succeeded\"", "\"failed\"", 1);
    assert_ne!(edited, original);
    fs::write(&log, &edited).unwrap();
    assert!(
        !verify().status.success(),
        "an edited line must be detected"
    );
    // Remove one line.
    let removed: Vec<&str> = original
        .lines()
        .enumerate()
        .filter(|(i, _)| *i != 2)
        .map(|(_, l)| l)
        .collect();
    fs::write(&log, removed.join("\n") + "\n").unwrap();
    assert!(
        !verify().status.success(),
        "a removed line must be detected"
    );
    fs::write(&log, &original).unwrap();
    assert!(verify().status.success());
}

/// The agent dies (SIGKILL) while its bundle runs: the bundle does not go on
/// unsupervised past the next agent start. The next `rollguard-agent run`
/// kills what is left, logs the run as interrupted, never runs it again, and
/// then runs the new bundle.
#[test]
fn crashed_agents_bundle_is_killed_and_logged_at_the_next_run() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-05.tokyo", &keys, PolicyOptions::default());
    let pid_file = host.root().join("etc/mail/sleeper.pid");
    let man = manifest("long", 1, "\"mail-*\"", "write = [\"@ROOT@/etc/mail\"]")
        .replace("\"30s\"", "\"10m\"");
    // `$$` is the pid in the run's own PID namespace, not the host's: the
    // bundle is found on the host by its command line once it says it runs.
    let script = "#!/bin/sh\necho $$ > @ROOT@/etc/mail/sleeper.pid\nexec sleep 1021\n";
    let src = host.bundle_source("long", &man, script);
    let bundle = host.build_signed(&src, &keys, &["alice"]);

    let mut first = Command::new(rollguard_tests::bin("rollguard-agent"))
        .args(["run", "--json", "--policy"])
        .arg(host.policy())
        .arg(&bundle)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the bundle runs (it wrote its pid), then kill the agent.
    let start = Instant::now();
    let pid = loop {
        if fs::read_to_string(&pid_file).is_ok_and(|p| p.ends_with('\n')) {
            if let Some(pid) = fs::read_dir("/proc").unwrap().find_map(|e| {
                let e = e.ok()?;
                (fs::read(e.path().join("cmdline")).ok()? == b"sleep\x001021\x00")
                    .then(|| e.file_name().to_string_lossy().into_owned())
            }) {
                break pid;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the bundle never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    first.kill().unwrap();
    first.wait().unwrap();
    let alive = |pid: &str| {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .map(|zombie| !zombie)
            .unwrap_or(false)
    };
    assert!(
        alive(&pid),
        "the bundle died with its agent: nothing to recover"
    );

    // The next run, of another bundle, recovers first.
    let src = host.bundle_source(
        "next",
        &manifest("next", 1, "\"mail-*\"", "write = [\"@ROOT@/etc/mail\"]"),
        "#!/bin/sh\ntrue\n",
    );
    let next = host.build_signed(&src, &keys, &["alice"]);
    let (report, code) = host.run(&next);
    assert_eq!(report["status"], "succeeded", "{report:#}");
    assert_eq!(code, 0);
    assert!(
        !alive(&pid),
        "the crashed agent's bundle {pid} is still running"
    );

    let log = fs::read_to_string(host.state_dir().join("audit.log")).unwrap();
    let events: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let types: Vec<&str> = events
        .iter()
        .map(|e| e["event"]["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "run_started",
            "run_interrupted",
            "run_started",
            "run_finished"
        ],
        "{log}"
    );
    assert_eq!(events[0]["event"]["run_id"], events[1]["event"]["run_id"]);

    // Never again: the interrupted version stays used.
    let (report, _) = host.run(&bundle);
    assert_eq!(report["status"], "refused", "{report:#}");
    assert_eq!(report["refusal"], "rollback", "{report:#}");
}

/// An agent installed without its stage-2 program cannot confine anything:
/// it refuses (a host error) before recording anything, so the bundle runs
/// once the installation is repaired.
#[test]
fn missing_stage2_program_refuses_and_uses_up_nothing() {
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-03.tokyo", &keys, PolicyOptions::default());
    let src = host.bundle_source(
        "lone",
        &manifest("fix-mail", 1, "\"mail-*\"", "write = [\"@ROOT@/etc/mail\"]"),
        "#!/bin/sh\ntouch @ROOT@/etc/mail/ran\n",
    );
    let bundle = host.build_signed(&src, &keys, &["alice"]);

    // The agent binary alone, in a directory of its own.
    let lone = host.root().join("lone-install/sbin/rollguard-agent");
    fs::create_dir_all(lone.parent().unwrap()).unwrap();
    rollguard_tests::install_program(&rollguard_tests::bin("rollguard-agent"), &lone);
    let out = run(std::process::Command::new(&lone)
        .args(["run", "--json", "--policy"])
        .arg(host.policy())
        .arg(&bundle));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["status"], "refused", "{report:#}");
    assert_eq!(report["refusal"], "host_error", "{report:#}");
    assert!(
        report["reason"]
            .as_str()
            .unwrap()
            .contains("rollguard-sandbox-exec"),
        "{report:#}"
    );
    assert!(!host.root().join("etc/mail/ran").exists());

    // The installed agent (stage 2 beside it) runs the same version.
    let (report, code) = host.run(&bundle);
    assert_eq!(
        (report["status"].as_str(), code),
        (Some("succeeded"), 0),
        "{report:#}"
    );
    assert!(host.root().join("etc/mail/ran").exists());
}

/// `rollguard-agent check` says whether bundles can be confined here: the
/// policy, the kernel's mechanisms and the stage-2 program, as a run would
/// find them.
#[test]
fn check_reports_the_kernel_and_the_stage2_program() {
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-04.tokyo", &keys, PolicyOptions::default());
    let check = |agent: &std::path::Path| {
        let out = run(std::process::Command::new(agent)
            .args(["check", "--json", "--policy"])
            .arg(host.policy()));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        (v, out.status.code())
    };

    let (v, code) = check(&rollguard_tests::bin("rollguard-agent"));
    assert_eq!((v["ok"].as_bool(), code), (Some(true), Some(0)), "{v:#}");
    assert!(v["kernel"]["landlock_abi"].as_u64().unwrap() >= 3, "{v:#}");
    assert_eq!(v["kernel"]["cgroup_bpf"], true, "{v:#}");
    assert!(
        v["stage2_program"]
            .as_str()
            .unwrap()
            .ends_with("/rollguard-sandbox-exec"),
        "{v:#}"
    );

    let lone = host.root().join("lone-install/sbin/rollguard-agent");
    fs::create_dir_all(lone.parent().unwrap()).unwrap();
    rollguard_tests::install_program(&rollguard_tests::bin("rollguard-agent"), &lone);
    let (v, code) = check(&lone);
    assert_eq!(v["ok"], false, "{v:#}");
    assert_ne!(code, Some(0));
    assert!(v["stage2_program"].is_null(), "{v:#}");
    assert!(
        v["stage2_error"]
            .as_str()
            .unwrap()
            .contains("rollguard-sandbox-exec"),
        "{v:#}"
    );
}

/// The network scope end to end: a signed bundle with a host name and a
/// UDP entry. The name is resolved at run start and shown in the report;
/// only the listed protocol, address and port get through; every refusal
/// is in the report with its address and port (or its system call), and
/// the listeners outside the scope receive nothing. Loopback only.
#[test]
fn network_scope_is_enforced_and_every_refusal_reported() {
    use std::io::{ErrorKind, Read};
    use std::net::{TcpListener, UdpSocket};
    use std::time::Duration;

    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-01.tokyo", &keys, PolicyOptions::default());
    let tcp = |addr: &str| {
        let l = TcpListener::bind(addr).unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        (l, port)
    };
    let udp = |addr: &str| {
        let s = UdpSocket::bind(addr).unwrap();
        s.set_nonblocking(true).unwrap();
        let port = s.local_addr().unwrap().port();
        (s, port)
    };
    let (allowed, a) = tcp("127.0.0.1:0");
    let (other_port, b) = tcp("127.0.0.1:0");
    let (other_addr, _) = tcp(&format!("127.0.0.3:{a}"));
    let (dns, u) = udp("127.0.0.1:0");
    let (other_udp, u2) = udp("127.0.0.1:0");
    let script = format!(
        r#"#!/usr/bin/python3
import socket
def attempt(name, f):
    try:
        f(); print(name + '=ok')
    except OSError as e:
        print('%s=%s' % (name, e.errno))
def tcp(host, port):
    s = socket.create_connection((host, port), timeout=5); s.sendall(b'hello'); s.close()
def udp(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b'hello', (host, port)); s.close()
attempt('tcp_allowed', lambda: tcp('127.0.0.1', {a}))
attempt('tcp_other_port', lambda: tcp('127.0.0.1', {b}))
attempt('tcp_other_addr', lambda: tcp('127.0.0.3', {a}))
attempt('udp_allowed', lambda: udp('127.0.0.1', {u}))
attempt('udp_other_port', lambda: udp('127.0.0.1', {u2}))
attempt('mptcp', lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262))
"#
    );
    let scope = format!("network = [\"tcp:localhost:{a}\", \"udp:127.0.0.1:{u}\"]");
    let src = host.bundle_source(
        "net",
        &manifest("net-check", 1, "\"mail-*.tokyo\"", &scope),
        &script,
    );
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    // `rollguard bundle inspect` shows the entries in canonical form, and
    // says which are names.
    let inspect = rollguard_tests::run_ok(
        rollguard_tests::rollguard()
            .args(["bundle", "inspect", "--json"])
            .arg(&bundle),
    );
    let meta: Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(
        meta["scope"]["network"],
        serde_json::json!([format!("tcp:localhost:{a}"), format!("udp:127.0.0.1:{u}")])
    );
    let inspect = rollguard_tests::run_ok(
        rollguard_tests::rollguard()
            .args(["bundle", "inspect"])
            .arg(&bundle),
    );
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        text.contains(&format!(
            "tcp:localhost:{a} (name: resolved by each agent at run start)"
        )),
        "{text}"
    );
    let (report, code) = host.run(&bundle);
    let stdout = report["stdout_tail"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let value = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name}= in {report:#}"))
            .to_string()
    };
    assert_eq!(value("tcp_allowed"), "ok", "{report:#}");
    assert_eq!(value("udp_allowed"), "ok", "{report:#}");
    // EACCES from Landlock's TCP port rule; EPERM from the cgroup's
    // address filter and from seccomp.
    const EPERM: &str = "1";
    const EACCES: &str = "13";
    assert_eq!(value("tcp_other_port"), EACCES);
    for name in ["tcp_other_addr", "udp_other_port", "mptcp"] {
        assert_eq!(value(name), EPERM, "{name}");
    }

    // The name, resolved at run start, with what it resolved to.
    let grants = report["network"].as_array().expect("network in the report");
    let localhost = grants
        .iter()
        .find(|g| g["entry"] == format!("tcp:localhost:{a}"))
        .unwrap_or_else(|| panic!("{report:#}"));
    assert!(
        localhost["addresses"]
            .as_array()
            .unwrap()
            .contains(&Value::from("127.0.0.1")),
        "{report:#}"
    );

    // Every refusal, with its address and port or its system call.
    let denials = denials(&report);
    for expected in [
        ("net.connect_tcp", format!("127.0.0.1:{b}")),
        ("net.connect_tcp", format!("127.0.0.3:{a}")),
        ("net.sendmsg_udp", format!("127.0.0.1:{u2}")),
    ] {
        assert!(
            denials.contains(&(expected.0.to_string(), expected.1.clone())),
            "{expected:?} not in {denials:?}"
        );
    }
    assert!(
        denials.iter().any(|(access, _)| access == "syscall.socket"),
        "{denials:?}"
    );
    assert!(report["denial_count"].as_u64().unwrap() >= 4, "{report:#}");
    assert_eq!(code, 1, "a run with denials is not a success");

    // Only the listed destinations received anything.
    allowed.set_nonblocking(false).unwrap();
    let (mut conn, _) = allowed.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut got = Vec::new();
    conn.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"hello");
    dns.set_nonblocking(false).unwrap();
    dns.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 16];
    let n = dns.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello");
    for (l, what) in [(&other_port, "other port"), (&other_addr, "other address")] {
        assert!(
            matches!(l.accept(), Err(ref e) if e.kind() == ErrorKind::WouldBlock),
            "{what} got a connection"
        );
    }
    assert!(
        matches!(other_udp.recv(&mut buf), Err(ref e) if e.kind() == ErrorKind::WouldBlock),
        "the other UDP port got a datagram"
    );
}

/// The host's `allow_network` ceiling outranks the bundle: a destination
/// outside it (here a name resolving outside it) refuses the run before
/// anything executes.
#[test]
fn network_outside_the_hosts_ceiling_is_refused() {
    use std::io::ErrorKind;
    use std::net::TcpListener;

    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-01.tokyo", &keys, PolicyOptions::default());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let a = listener.local_addr().unwrap().port();
    let policy = fs::read_to_string(host.policy()).unwrap().replace(
        "[state]",
        &format!("allow_network = [\"tcp:127.0.0.2:{a}\"]\n\n[state]"),
    );
    fs::write(host.policy(), policy).unwrap();
    let script = format!(
        "#!/usr/bin/python3\nimport socket\nsocket.create_connection(('127.0.0.1', {a}), timeout=5).sendall(b'x')\nopen('@ROOT@/etc/mail/ran', 'w').write('ran')\n"
    );
    let scope = format!("write = [\"@ROOT@/etc/mail\"]\nnetwork = [\"tcp:localhost:{a}\"]");
    let src = host.bundle_source(
        "ceiling",
        &manifest("net-ceiling", 1, "\"mail-*.tokyo\"", &scope),
        &script,
    );
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    let (report, code) = host.run(&bundle);
    assert_eq!(report["status"], "refused", "{report:#}");
    assert_eq!(report["refusal"], "scope_ceiling", "{report:#}");
    assert!(
        report["reason"].as_str().unwrap().contains("allow_network"),
        "{report:#}"
    );
    assert_ne!(code, 0);
    assert!(!host.root().join("etc/mail/ran").exists());
    assert!(matches!(listener.accept(), Err(ref e) if e.kind() == ErrorKind::WouldBlock));
}

/// A kill that comes while a run is being admitted and prepared (the
/// daemon remembers it on the run's signal) takes effect before the
/// bundle executes: the runner attaches the kill switch to the held
/// stage 2, which dies there. The run ends `killed` and the bundle's
/// script never ran.
#[test]
fn a_kill_before_the_bundle_is_released_means_it_never_executes() {
    use rollguard_agent::kill_switch::KillSignal;
    use rollguard_agent::runner::{run_bundle, RunOptions};
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-01.tokyo", &keys, PolicyOptions::default());
    let src = host.bundle_source(
        "early-kill",
        &manifest(
            "early-kill",
            1,
            "\"mail-*.tokyo\"",
            "write = [\"@ROOT@/etc/mail\"]",
        ),
        "#!/bin/sh\necho ran > @ROOT@/etc/mail/ran\n",
    );
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    let policy = rollguard_agent::policy::HostPolicy::load(&host.policy()).unwrap();
    let signal = KillSignal::new();
    signal.kill();
    let hook = signal.sandbox_hook();
    // Slow to attach: were the hook called after the release, the bundle
    // would have written its file by the time the kill lands.
    let slow_hook: rollguard_agent::runner::OnStart =
        std::sync::Arc::new(move |run_id: &str, handle| {
            std::thread::sleep(std::time::Duration::from_millis(300));
            hook(run_id, handle)
        });
    let opts = RunOptions {
        agent_exe: rollguard_tests::bin("rollguard-agent"),
        rollout_id: None,
        on_start: Some(slow_hook),
        launcher: None,
        preview: false,
        retry: false,
    };
    let report = run_bundle(&policy, &bundle, &opts);
    assert_eq!(
        report.status,
        rollguard_shared::report::RunStatus::Killed,
        "{report:?}"
    );
    assert!(
        !host.root().join("etc/mail/ran").exists(),
        "the bundle executed: {report:?}"
    );
}

/// `rollguard-agent kill` with no daemon answering its socket (stopped, or
/// crash-looping) sets the state directory's kill switch itself: a manual
/// run is refused until `kill --lift`, which clears it the same way.
#[test]
fn a_local_kill_without_a_daemon_refuses_runs_until_lifted() {
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-01.tokyo", &keys, PolicyOptions::default());
    let socket = host.root().join("no-daemon.sock");
    let kill = |args: &[&str]| {
        let out = run(agent()
            .arg("kill")
            .args(args)
            .arg("--json")
            .arg("--socket")
            .arg(&socket)
            .arg("--policy")
            .arg(host.policy()));
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let resp = kill(&["--reason", "daemon down, disk failing"]);
    assert_eq!(resp["kill"]["local"]["reason"], "daemon down, disk failing");
    let src = host.bundle_source(
        "offline-kill",
        &manifest(
            "offline-kill",
            1,
            "\"mail-*.tokyo\"",
            "write = [\"@ROOT@/etc/mail\"]",
        ),
        "#!/bin/sh\necho ran > @ROOT@/etc/mail/ran\n",
    );
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    let (report, code) = host.run(&bundle);
    assert_eq!(report["status"], "refused", "{report:#}");
    assert_eq!(report["refusal"], "kill_switch", "{report:#}");
    assert_ne!(code, 0);
    assert!(!host.root().join("etc/mail/ran").exists());
    let resp = kill(&["--lift"]);
    assert!(resp["kill"]["local"].is_null(), "{resp:#}");
    let (report, code) = host.run(&bundle);
    assert_eq!(report["status"], "succeeded", "{report:#}");
    assert_eq!(code, 0);
}
