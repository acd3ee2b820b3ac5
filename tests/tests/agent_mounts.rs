//! End to end: read-only mounts outside the scopes, covered protected
//! paths and mount aliases, with real signed bundles run by
//! `rollguard-agent run` as root on the real kernel.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use rollguard_tests::host::{denials, manifest, Host, Keys, PolicyOptions};
use serde_json::Value;

/// mode, owner, mtime, ctime of `path`.
fn stat(path: &Path) -> (u32, u32, u32, i64, i64, i64, i64) {
    let m = fs::symlink_metadata(path).unwrap();
    (
        m.mode(),
        m.uid(),
        m.gid(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    )
}

/// The run was refused before anything ran, for a protected path (exit
/// status 2); the reason it gives.
fn refused_for_protected_path(report: &Value, code: i32) -> &str {
    assert_eq!(
        (report["status"].as_str(), code),
        (Some("refused"), 2),
        "{report:#}"
    );
    assert_eq!(report["refusal"], "protected_path", "{report:#}");
    report["reason"].as_str().unwrap()
}

#[test]
fn metadata_changes_on_protected_and_out_of_scope_files_fail_and_are_reported() {
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-01.tokyo", &keys, PolicyOptions::default());
    let backup = host.root().join("backup/daily/customers.tar");
    let backup_dir = host.root().join("backup");
    let config = host.root().join("etc/mail/main.cf");
    let policy = host.policy();
    let watched = [&backup_dir, &backup, &config, &policy];
    let before: Vec<_> = watched.iter().map(|p| stat(p)).collect();
    let script = "#!/bin/sh\n\
        for f in @ROOT@/backup @ROOT@/etc/mail/main.cf @POLICY@; do\n\
          chmod 000 \"$f\"; chown nobody \"$f\"; touch -d 2001-01-01 \"$f\"\n\
          /usr/bin/python3 -c \"import os,sys; os.setxattr(sys.argv[1], 'user.x', b'1')\" \"$f\"\n\
        done\n\
        chmod 000 @ROOT@/backup/daily/customers.tar\n\
        echo changed > @ROOT@/var/spool/tmp/in-scope\n\
        echo done\n"
        .replace("@POLICY@", policy.to_str().unwrap());
    let src = host.bundle_source(
        "meta",
        &manifest(
            "meta",
            1,
            "\"mail-*.tokyo\"",
            "write = [\"@ROOT@/var/spool/tmp\"]",
        ),
        &script,
    );
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    let (report, code) = host.run(&bundle);
    assert_eq!(code, 1, "a run with denials is not a success: {report:#}");
    assert!(report["stdout_tail"].as_str().unwrap().contains("done"));
    let after: Vec<_> = watched.iter().map(|p| stat(p)).collect();
    assert_eq!(after, before, "metadata changed");
    // In scope still works.
    assert_eq!(
        fs::read_to_string(host.root().join("var/spool/tmp/in-scope")).unwrap(),
        "changed\n"
    );
    let d = denials(&report);
    for path in [&backup_dir, &config, &policy] {
        for call in ["fchmodat", "fchownat", "utimensat", "setxattr"] {
            let access = format!("erofs.{call}");
            assert!(
                d.iter()
                    .any(|(a, p)| *a == access && Path::new(p) == path.as_path()),
                "{access} on {} not reported: {report:#}",
                path.display()
            );
        }
    }
    assert!(report["denial_count"].as_u64().unwrap() >= d.len() as u64);
}

struct Bind(PathBuf);

impl Bind {
    fn new(source: &Path, target: &Path) -> Bind {
        fs::create_dir_all(target).unwrap();
        assert!(Command::new("mount")
            .arg("--bind")
            .arg(source)
            .arg(target)
            .status()
            .unwrap()
            .success());
        Bind(target.to_path_buf())
    }
}

impl Drop for Bind {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn another_mount_of_etc_inside_a_write_scope_is_refused() {
    // /etc holds what the next run trusts (the loader's files, the
    // agent's unit and configuration): write-protected, though readable.
    // A bind of it inside a write scope would let a bundle write there.
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-01.tokyo", &keys, PolicyOptions::default());
    let alias = host.root().join("var/spool/tmp/etc-mirror");
    let bind = Bind::new(Path::new("/etc"), &alias);
    let src = host.bundle_source(
        "etc-alias",
        &manifest(
            "etc-alias",
            1,
            "\"mail-*.tokyo\"",
            "write = [\"@ROOT@/var/spool/tmp\"]",
        ),
        "#!/bin/sh\necho x > @ROOT@/var/spool/tmp/etc-mirror/ld.so.conf.d/zz-rollguard-test.conf\n",
    );
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    let (report, code) = host.run(&bundle);
    drop(bind);
    // Should the bundle have run, leave the host's /etc as it was.
    let planted = Path::new("/etc/ld.so.conf.d/zz-rollguard-test.conf");
    let escaped = planted.exists();
    let _ = fs::remove_file(planted);
    assert!(
        !escaped,
        "the bundle wrote into /etc through the bind: {report:#}"
    );
    let reason = refused_for_protected_path(&report, code);
    assert!(reason.contains(alias.to_str().unwrap()), "{reason}");
}

#[test]
fn a_protected_tree_mounted_beneath_a_delete_scope_is_refused_naming_both_mounts() {
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-01.tokyo", &keys, PolicyOptions::default());
    let alias = host.root().join("var/spool/tmp/backup-mirror");
    let _bind = Bind::new(&host.root().join("backup"), &alias);
    let before = host.snapshot("backup");
    let src = host.bundle_source(
        "alias",
        &manifest(
            "alias",
            1,
            "\"mail-*.tokyo\"",
            "delete = [\"@ROOT@/var/spool/tmp\"]",
        ),
        "#!/bin/sh\nrm -rf @ROOT@/var/spool/tmp/*\ntouch @ROOT@/var/spool/tmp/ran\n",
    );
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    let (report, code) = host.run(&bundle);
    let reason = refused_for_protected_path(&report, code);
    assert!(reason.contains(alias.to_str().unwrap()), "{reason}");
    assert!(
        reason.contains(host.root().join("backup").to_str().unwrap()),
        "{reason}"
    );
    // Both mounts named, each by id ("mount 46 (...)").
    let ids = reason
        .match_indices("mount ")
        .filter(|(i, m)| reason[i + m.len()..].starts_with(|c: char| c.is_ascii_digit()))
        .count();
    assert_eq!(ids, 2, "{reason}");
    assert!(!host.root().join("var/spool/tmp/ran").exists());
    assert_eq!(host.snapshot("backup"), before);
    drop(_bind);
    // Without the second mount the same bundle runs (a fresh version).
    let src = host.bundle_source(
        "alias2",
        &manifest(
            "alias",
            2,
            "\"mail-*.tokyo\"",
            "delete = [\"@ROOT@/var/spool/tmp\"]",
        ),
        "#!/bin/sh\nrm -rf @ROOT@/var/spool/tmp/*\necho ok\n",
    );
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    let (report, _) = host.run(&bundle);
    assert_eq!(report["status"], "succeeded", "{report:#}");
    assert_eq!(host.snapshot("backup"), before);
}

/// The agent installed inside the host tree (`usr/sbin`, stage 2 in
/// `usr/lib/rollguard`), so its programs are auto-protected paths there.
fn install_agent(host: &Host) -> PathBuf {
    let r = host.root();
    for (bin, dir) in [
        ("rollguard-agent", "usr/sbin"),
        ("rollguard-sandbox-exec", "usr/lib/rollguard"),
    ] {
        fs::create_dir_all(r.join(dir)).unwrap();
        rollguard_tests::install_program(&rollguard_tests::bin(bin), &r.join(dir).join(bin));
        rollguard_tests::root_only(&r.join(dir).join(bin), 0o755);
    }
    fs::create_dir_all(r.join("usr/share/doc")).unwrap();
    r.join("usr/sbin/rollguard-agent")
}

fn run_with(host: &Host, agent: &Path, bundle: &Path) -> (Value, i32) {
    let out = rollguard_tests::run(
        Command::new(agent)
            .args(["run", "--json", "--policy"])
            .arg(host.policy())
            .arg(bundle),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (report, out.status.code().unwrap_or(-1))
}

#[test]
fn the_agents_programs_inside_a_write_scope_are_pinned_and_attacks_on_them_reported() {
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-01.tokyo", &keys, PolicyOptions::default());
    let agent = install_agent(&host);
    let r = host.root();
    let stage2 = r.join("usr/lib/rollguard/rollguard-sandbox-exec");
    let scope = "write = [\"@ROOT@/usr\"]\ndelete = [\"@ROOT@/usr\"]";
    let script = "#!/bin/sh\n\
        U=@ROOT@/usr\n\
        echo evil > $U/lib/rollguard/rollguard-sandbox-exec\n\
        chmod 777 $U/lib/rollguard/rollguard-sandbox-exec\n\
        rm -f $U/sbin/rollguard-agent\n\
        mv $U/lib $U/lib.old\n\
        mv $U/lib/rollguard $U/lib/rg.old\n\
        echo evil > $U/libexec/rollguard-sandbox-exec\n\
        echo upgraded > $U/share/doc/new\n\
        echo done\n";

    // Where stage 2 would also be looked for (usr/libexec/rollguard) does
    // not exist, and nothing below the scope could hold it read-only.
    let src = host.bundle_source("pin-1", &manifest("pin", 1, "\"mail-*\"", scope), script);
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    let (report, code) = run_with(&host, &agent, &bundle);
    let reason = refused_for_protected_path(&report, code);
    assert!(
        reason.contains("libexec/rollguard") && reason.contains("could create it"),
        "{reason}"
    );

    // With usr/libexec there, the run goes ahead: usr/libexec is pinned
    // read-only instead.
    fs::create_dir_all(r.join("usr/libexec")).unwrap();
    let before = host.snapshot("usr");
    let src = host.bundle_source("pin-2", &manifest("pin", 2, "\"mail-*\"", scope), script);
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    let (report, code) = run_with(&host, &agent, &bundle);
    assert_eq!(code, 1, "a run with denials is not a success: {report:#}");
    assert!(
        report["stdout_tail"].as_str().unwrap().contains("done"),
        "{report:#}"
    );
    let mut after = host.snapshot("usr");
    assert_eq!(
        after.remove(&r.join("usr/share/doc/new")),
        Some(b"upgraded\n".to_vec()),
        "the rest of the scope is writable"
    );
    assert_eq!(after, before, "a pinned program changed");
    assert_eq!(fs::metadata(&stage2).unwrap().mode() & 0o777, 0o755);
    let d = denials(&report);
    let has = |prefix: &str, path: &Path| {
        d.iter()
            .any(|(a, p)| a.starts_with(prefix) && Path::new(p) == path)
    };
    assert!(has("erofs.", &stage2), "{report:#}");
    // The agent's directory is pinned as a whole: the unlink in it is
    // refused read-only (audit names the directory).
    assert!(
        has(
            "erofs.unlinkat",
            Path::new(&format!("{}/", r.join("usr/sbin").display()))
        ),
        "{report:#}"
    );
    assert!(has("ebusy.rename", &r.join("usr/lib")), "{report:#}");
    assert!(
        has("ebusy.rename", &r.join("usr/lib/rollguard")),
        "{report:#}"
    );
}

#[test]
fn an_operators_protected_path_inside_a_write_scope_is_still_refused() {
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-01.tokyo", &keys, PolicyOptions::default());
    let src = host.bundle_source(
        "above-backup",
        &manifest("above", 1, "\"mail-*\"", "write = [\"@ROOT@\"]"),
        "#!/bin/sh\ntouch @ROOT@/ran\n",
    );
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    let (report, code) = host.run(&bundle);
    let reason = refused_for_protected_path(&report, code);
    assert!(
        reason.contains(host.root().join("backup").to_str().unwrap())
            && reason.contains("listed in [protect]"),
        "{reason}"
    );
    assert!(!host.root().join("ran").exists());
}

/// A systemd unit directory of this machine the tests may use (nothing
/// reads it here: this machine's PID 1 is not systemd), removed again with
/// all it holds when the test ends.
const UNIT_DIR: &str = "/usr/local/lib/systemd/system";

/// The tests that use [`UNIT_DIR`], one at a time.
static UNIT_DIR_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A test's turn at [`UNIT_DIR`], taken only where this machine has no
/// such directory; the directory is removed when the turn ends.
struct UnitDirTurn {
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

impl UnitDirTurn {
    fn take() -> UnitDirTurn {
        let one_at_a_time = UNIT_DIR_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        assert!(
            !Path::new(UNIT_DIR).exists(),
            "{UNIT_DIR} exists on this machine: the test would change it"
        );
        UnitDirTurn {
            _one_at_a_time: one_at_a_time,
        }
    }
}

impl Drop for UnitDirTurn {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(UNIT_DIR);
        let _ = fs::remove_dir("/usr/local/lib/systemd");
    }
}

#[test]
fn a_missing_drop_in_directory_of_the_agents_unit_in_a_scope_is_created_empty_and_pinned() {
    let _turn = UnitDirTurn::take();
    let unit_dir = Path::new(UNIT_DIR);
    fs::create_dir_all(unit_dir).unwrap();
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-01.tokyo", &keys, PolicyOptions::default());
    let policy = fs::read_to_string(host.policy()).unwrap().replace(
        "allow_scopes = [",
        &format!("allow_scopes = [{UNIT_DIR:?}, "),
    );
    fs::write(host.policy(), policy).unwrap();
    let drop_ins = [
        "rollguard-agent.service.d",
        "rollguard-.service.d",
        "service.d",
    ];
    let scope = format!("write = [{UNIT_DIR:?}]\ndelete = [{UNIT_DIR:?}]");
    let script = format!(
        "#!/bin/sh\n\
         D={UNIT_DIR}\n\
         echo '[Service]' > $D/rollguard-agent.service.d/evil.conf\n\
         mkdir $D/service.d/sub\n\
         rmdir $D/rollguard-.service.d\n\
         mv $D/service.d $D/gone.d\n\
         echo '[Service]' > $D/rgtest.service\n\
         echo done\n"
    );

    // The agent's unit file itself is not made up: missing directly in
    // the scope, the run is refused, and nothing is created.
    let src = host.bundle_source("ph-1", &manifest("ph", 1, "\"mail-*\"", &scope), &script);
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    let (report, code) = host.run(&bundle);
    let reason = refused_for_protected_path(&report, code);
    assert!(
        reason.contains("rollguard-agent.service ") && reason.contains("could create it"),
        "{reason}"
    );
    assert_eq!(fs::read_dir(unit_dir).unwrap().count(), 0);

    // With the unit there (as on a host that runs the packaged agent), the
    // missing drop-in directories are created empty and pinned: the run
    // goes ahead, the rest of the scope is writable, and every attempt on
    // them fails and is reported.
    let unit = unit_dir.join("rollguard-agent.service");
    fs::write(&unit, "[Service]\nExecStart=/bin/true\n").unwrap();
    let src = host.bundle_source("ph-2", &manifest("ph", 2, "\"mail-*\"", &scope), &script);
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    let (report, code) = host.run(&bundle);
    assert_eq!(code, 1, "a run with denials is not a success: {report:#}");
    assert!(
        report["stdout_tail"].as_str().unwrap().contains("done"),
        "{report:#}"
    );
    assert_eq!(
        fs::read_to_string(unit_dir.join("rgtest.service")).unwrap(),
        "[Service]\n"
    );
    for name in drop_ins {
        let dir = unit_dir.join(name);
        let m = fs::symlink_metadata(&dir).unwrap();
        assert!(m.is_dir(), "{name}");
        assert_eq!(
            (m.mode() & 0o7777, m.uid(), m.gid()),
            (0o755, 0, 0),
            "{name}"
        );
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            0,
            "{name} is not empty"
        );
    }
    assert!(!unit_dir.join("gone.d").exists());
    assert_eq!(
        fs::read_to_string(&unit).unwrap(),
        "[Service]\nExecStart=/bin/true\n"
    );
    let d = denials(&report);
    let has = |prefix: &str, path: &Path| {
        d.iter()
            .any(|(a, p)| a.starts_with(prefix) && Path::new(p.trim_end_matches('/')) == path)
    };
    for (prefix, name) in [
        ("erofs.", "rollguard-agent.service.d"),
        ("erofs.", "service.d"),
        ("ebusy.", "rollguard-.service.d"),
        ("ebusy.rename", "service.d"),
    ] {
        assert!(
            has(prefix, &unit_dir.join(name)),
            "{prefix} on {name} not reported: {report:#}"
        );
    }
}

#[test]
fn a_directory_between_two_nested_scopes_above_a_pin_cannot_be_renamed() {
    // Write scopes `/usr/local/lib` and `/usr/local/lib/systemd/system`:
    // the unit directory is the innermost scope (a mount point), but
    // `/usr/local/lib/systemd` between the two scopes must not be
    // renamable either, or the bundle moves the whole unit directory
    // away and writes a fresh one with a drop-in for the agent's unit.
    let moved = Path::new("/usr/local/lib/systemd.old");
    assert!(
        !moved.exists(),
        "{} exists on this machine: the test would change it",
        moved.display()
    );
    let _turn = UnitDirTurn::take();
    let unit_dir = Path::new(UNIT_DIR);
    struct RemoveMoved;
    impl Drop for RemoveMoved {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all("/usr/local/lib/systemd.old");
        }
    }
    let _cleanup = RemoveMoved;
    fs::create_dir_all(unit_dir).unwrap();
    let unit = unit_dir.join("rollguard-agent.service");
    fs::write(&unit, "[Service]\nExecStart=/bin/true\n").unwrap();
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-01.tokyo", &keys, PolicyOptions::default());
    let policy = fs::read_to_string(host.policy())
        .unwrap()
        .replace("allow_scopes = [", "allow_scopes = [\"/usr/local/lib\", ");
    fs::write(host.policy(), policy).unwrap();
    let scope = format!(
        "write = [\"/usr/local/lib\", {UNIT_DIR:?}]\ndelete = [\"/usr/local/lib\", {UNIT_DIR:?}]"
    );
    let script = "#!/bin/sh\n\
         mv /usr/local/lib/systemd /usr/local/lib/systemd.old\n\
         mkdir -p /usr/local/lib/systemd/system/rollguard-agent.service.d\n\
         echo '[Service]' > /usr/local/lib/systemd/system/rollguard-agent.service.d/evil.conf\n\
         echo done\n";
    let src = host.bundle_source("nest", &manifest("nest", 1, "\"mail-*\"", &scope), script);
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    let (report, code) = host.run(&bundle);
    assert!(
        !moved.exists(),
        "the directory above the unit directory was renamed: {report:#}"
    );
    assert!(
        !unit_dir
            .join("rollguard-agent.service.d/evil.conf")
            .exists(),
        "{report:#}"
    );
    assert_eq!(
        fs::read_to_string(&unit).unwrap(),
        "[Service]\nExecStart=/bin/true\n"
    );
    assert_eq!(code, 1, "a run with denials is not a success: {report:#}");
    let d = denials(&report);
    assert!(
        d.iter().any(|(a, p)| a.starts_with("ebusy.rename")
            && Path::new(p) == Path::new("/usr/local/lib/systemd")),
        "{report:#}"
    );
}

/// The pins against the other ways of reaching a file: a hard link to the
/// pinned program (then written through), a descriptor reopened for
/// writing through `/proc/self/fd` (also from `O_PATH`), chmod, utimes,
/// xattrs and truncate through such descriptors, a symlink swapped over
/// the pinned directory, the scope itself renamed, and a file created in
/// the pinned directory. None changes anything; the refusals the kernel
/// audits are reported.
#[test]
fn pins_hold_against_hard_links_proc_fd_reopens_and_symlink_swaps() {
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-01.tokyo", &keys, PolicyOptions::default());
    let agent = install_agent(&host);
    let r = host.root();
    fs::create_dir_all(r.join("usr/libexec")).unwrap();
    let stage2 = r.join("usr/lib/rollguard/rollguard-sandbox-exec");
    let scope = "write = [\"@ROOT@/usr\"]\ndelete = [\"@ROOT@/usr\"]";
    let script = r#"#!/bin/sh
U=@ROOT@/usr
P=$U/lib/rollguard/rollguard-sandbox-exec
ln $P $U/share/doc/hl && echo evil >> $U/share/doc/hl && echo LINKED
exec 3<$P
echo evil 2>/dev/null > /proc/self/fd/3 && echo REOPENED
exec 3<&-
/usr/bin/python3 - "$P" <<'PY'
import os, sys
p = sys.argv[1]
for flags in (os.O_PATH, os.O_RDONLY):
    fd = os.open(p, flags)
    via = '/proc/self/fd/%d' % fd
    for what, act in (
        ('chmod', lambda: os.chmod(via, 0o777)),
        ('utime', lambda: os.utime(via, (0, 0))),
        ('xattr', lambda: os.setxattr(via, 'user.rg', b'x')),
        ('truncate', lambda: os.truncate(via, 0)),
        ('write', lambda: os.close(os.open(via, os.O_WRONLY | os.O_APPEND))),
    ):
        try:
            act()
            print('CHANGED', what, flags)
        except OSError as e:
            print('refused', what, e.errno)
    os.close(fd)
PY
mkdir -p /tmp/evil && ln -sfn /tmp/evil $U/lib/rollguard 2>/dev/null && echo SWAPPED
mv -T $U/lib/rollguard $U/lib/rg.old 2>/dev/null && echo MOVED
mv $U $U.old 2>/dev/null && echo SCOPE_MOVED
echo evil > $U/lib/rollguard/new 2>/dev/null && echo CREATED
echo done
"#;
    let before = host.snapshot("usr");
    let before_stat = stat(&stage2);
    let src = host.bundle_source("pin-fd", &manifest("pin", 1, "\"mail-*\"", scope), script);
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    let (report, code) = run_with(&host, &agent, &bundle);
    let out = report["stdout_tail"].as_str().unwrap();
    assert!(out.contains("done"), "{report:#}");
    for escaped in [
        "LINKED",
        "REOPENED",
        "CHANGED",
        "SWAPPED",
        "MOVED",
        "SCOPE_MOVED",
        "CREATED",
    ] {
        assert!(!out.contains(escaped), "{escaped}: {report:#}");
    }
    // Ten refusals (EROFS; ETXTBSY for a write open, as the program runs
    // as this run's init).
    assert_eq!(out.matches("refused").count(), 10, "{report:#}");
    assert_eq!(host.snapshot("usr"), before, "a pinned path changed");
    assert_eq!(stat(&stage2), before_stat);
    assert!(!r.join("usr/share/doc/hl").exists());
    assert!(!r.join("usr.old").exists());
    assert_eq!(code, 1, "a run with denials is not a success: {report:#}");
    let d = denials(&report);
    // Audit names the path as the call gave it: the descriptor's.
    for call in ["chmod", "utimensat", "setxattr", "truncate", "openat"] {
        assert!(
            d.iter()
                .any(|(a, p)| *a == format!("erofs.{call}") && p.starts_with("/proc/self/fd/")),
            "erofs.{call} through /proc/self/fd not reported: {report:#}"
        );
    }
    assert!(
        d.iter()
            .any(|(a, p)| a.starts_with("ebusy.rename")
                && Path::new(p) == r.join("usr/lib/rollguard")),
        "{report:#}"
    );
}

/// systemd reads drop-ins under each alias of a unit: a symlink
/// `x.service -> rollguard-agent.service` in a unit directory makes
/// `x.service.d/*.conf` configure the agent. One the run makes is removed
/// after it, reported as a denial, and fails the run; one already there
/// refuses the next bundle that could write that directory.
#[test]
fn an_alias_of_the_agents_unit_made_by_the_run_is_removed_reported_and_fails_it() {
    let _turn = UnitDirTurn::take();
    let unit_dir = Path::new(UNIT_DIR);
    fs::create_dir_all(unit_dir).unwrap();
    let unit = unit_dir.join("rollguard-agent.service");
    fs::write(&unit, "[Service]\nExecStart=/bin/true\n").unwrap();
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-01.tokyo", &keys, PolicyOptions::default());
    let policy = fs::read_to_string(host.policy()).unwrap().replace(
        "allow_scopes = [",
        &format!("allow_scopes = [{UNIT_DIR:?}, "),
    );
    fs::write(host.policy(), policy).unwrap();
    let scope = format!("write = [{UNIT_DIR:?}]");
    let script = format!(
        "#!/bin/sh\n\
         D={UNIT_DIR}\n\
         ln -s rollguard-agent.service $D/x.service\n\
         ln -s x.service $D/y.service\n\
         ln -s /dev/null $D/masked.service\n\
         mkdir $D/x.service.d\n\
         printf '[Service]\\nExecStartPre=/bin/sh -c id\\n' > $D/x.service.d/evil.conf\n\
         echo done\n"
    );
    let src = host.bundle_source("al-1", &manifest("al", 1, "\"mail-*\"", &scope), &script);
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    let (report, code) = host.run(&bundle);
    assert_eq!(
        (report["status"].as_str(), code),
        (Some("failed"), 1),
        "{report:#}"
    );
    assert!(
        report["stdout_tail"].as_str().unwrap().contains("done"),
        "{report:#}"
    );
    for name in ["x.service", "y.service"] {
        assert!(
            fs::symlink_metadata(unit_dir.join(name)).is_err(),
            "{name} was not removed"
        );
        assert!(
            denials(&report).contains(&(
                "systemd.alias_agent_unit".to_string(),
                unit_dir.join(name).display().to_string()
            )),
            "{name} not reported: {report:#}"
        );
    }
    // Other symlinks (a mask) are the bundle's business.
    assert!(fs::symlink_metadata(unit_dir.join("masked.service")).is_ok());
    assert!(report["reason"]
        .as_str()
        .unwrap()
        .contains("alias of the agent's unit"));
    assert_eq!(
        fs::read_to_string(&unit).unwrap(),
        "[Service]\nExecStart=/bin/true\n"
    );

    // One already there (made outside any run) refuses the next bundle
    // that could write its directory, before anything runs.
    std::os::unix::fs::symlink("rollguard-agent.service", unit_dir.join("z.service")).unwrap();
    let src = host.bundle_source("al-2", &manifest("al", 2, "\"mail-*\"", &scope), &script);
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    let (report, code) = host.run(&bundle);
    let reason = refused_for_protected_path(&report, code);
    assert!(reason.contains("z.service"), "{reason}");
    assert!(fs::symlink_metadata(unit_dir.join("x.service")).is_err());
}

/// `systemctl enable` makes the agent start at boot with a link
/// `multi-user.target.wants/rollguard-agent.service`. A bundle allowed to
/// write that directory (a package's first install enabling its own unit
/// needs it) must not remove or retarget the agent's link: it is pinned as
/// the link itself, and the rest of the directory stays writable. A scope
/// above it cannot carry the directory away either.
#[test]
fn the_agents_enablement_link_is_pinned_as_a_link_in_a_scope() {
    let _turn = UnitDirTurn::take();
    let unit_dir = Path::new(UNIT_DIR);
    let wants = unit_dir.join("multi-user.target.wants");
    fs::create_dir_all(&wants).unwrap();
    let unit = unit_dir.join("rollguard-agent.service");
    fs::write(&unit, "[Service]\nExecStart=/bin/true\n").unwrap();
    let link = wants.join("rollguard-agent.service");
    std::os::unix::fs::symlink("../rollguard-agent.service", &link).unwrap();
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-01.tokyo", &keys, PolicyOptions::default());
    // This machine's own `multi-user.target.wants` in /etc overrides the
    // test's (lower-priority) one: allowed too, for the last step.
    let etc_wants = "/etc/systemd/system/multi-user.target.wants";
    let policy = fs::read_to_string(host.policy()).unwrap().replace(
        "allow_scopes = [",
        &format!("allow_scopes = [{UNIT_DIR:?}, {etc_wants:?}, "),
    );
    fs::write(host.policy(), policy).unwrap();
    let script = format!(
        "#!/bin/sh\n\
         W={}\n\
         rm -f $W/rollguard-agent.service\n\
         mv $W/rollguard-agent.service $W/moved.service\n\
         ln -sfn /dev/null $W/rollguard-agent.service\n\
         ln -s ../rgtest.service $W/rgtest.service\n\
         mv $W {UNIT_DIR}/gone.wants\n\
         echo done\n",
        wants.display()
    );
    let unchanged = || {
        assert_eq!(
            fs::read_link(&link).unwrap(),
            Path::new("../rollguard-agent.service"),
            "the agent's enablement link changed"
        );
        assert!(!wants.join("moved.service").exists());
        assert!(!unit_dir.join("gone.wants").exists());
    };

    // The directory itself as the scope (what `bundle build` derives for a
    // package whose unit is WantedBy=multi-user.target).
    let scope = format!(
        "write = [{0:?}]\ndelete = [{0:?}]",
        wants.display().to_string()
    );
    let src = host.bundle_source("en-1", &manifest("en", 1, "\"mail-*\"", &scope), &script);
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    let (report, code) = host.run(&bundle);
    assert_eq!(code, 1, "a run with denials is not a success: {report:#}");
    assert!(
        report["stdout_tail"].as_str().unwrap().contains("done"),
        "{report:#}"
    );
    unchanged();
    assert_eq!(
        fs::read_link(wants.join("rgtest.service")).unwrap(),
        Path::new("../rgtest.service"),
        "the rest of the directory is writable"
    );
    let d = denials(&report);
    let has = |prefix: &str, path: &Path| {
        d.iter()
            .any(|(a, p)| a.starts_with(prefix) && Path::new(p.trim_end_matches('/')) == path)
    };
    assert!(has("ebusy.unlink", &link), "{report:#}");
    assert!(has("ebusy.rename", &link), "{report:#}");
    fs::remove_file(wants.join("rgtest.service")).unwrap();

    // A scope above it: the directory is a mount point too, so it cannot
    // be renamed away with the link.
    let scope = format!("write = [{UNIT_DIR:?}]\ndelete = [{UNIT_DIR:?}]");
    let src = host.bundle_source("en-2", &manifest("en", 2, "\"mail-*\"", &scope), &script);
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    let (report, code) = host.run(&bundle);
    assert_eq!(code, 1, "a run with denials is not a success: {report:#}");
    unchanged();
    let d = denials(&report);
    assert!(
        d.iter()
            .any(|(a, p)| a.starts_with("ebusy.rename")
                && Path::new(p.trim_end_matches('/')) == wants),
        "{report:#}"
    );

    // The same directory in a unit directory of higher priority: an entry
    // of the agent's name there (a link to /dev/null) would mask the link,
    // so the name is protected there too; missing, directly in the scope,
    // the bundle is refused before anything runs.
    {
        struct RemoveIfMade(bool);
        impl Drop for RemoveIfMade {
            fn drop(&mut self) {
                if self.0 {
                    let _ = fs::remove_dir("/etc/systemd/system/multi-user.target.wants");
                }
            }
        }
        let _made = RemoveIfMade(!Path::new(etc_wants).exists());
        fs::create_dir_all(etc_wants).unwrap();
        let scope = format!("write = [{etc_wants:?}]\ndelete = [{etc_wants:?}]");
        let mask = format!("#!/bin/sh\nln -s /dev/null {etc_wants}/rollguard-agent.service\n");
        let src = host.bundle_source("en-3", &manifest("en", 3, "\"mail-*\"", &scope), &mask);
        let bundle = host.build_signed(&src, &keys, &["alice"]);
        let (report, code) = host.run(&bundle);
        let reason = refused_for_protected_path(&report, code);
        assert!(
            reason.contains(&format!("{etc_wants}/rollguard-agent.service")),
            "{reason}"
        );
        assert!(fs::symlink_metadata(format!("{etc_wants}/rollguard-agent.service")).is_err());
    }
}
