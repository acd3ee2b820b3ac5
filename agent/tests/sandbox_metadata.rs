//! Metadata changes (chmod, chown, utimes, xattrs, ACLs, chattr) outside
//! the write/delete scopes and on protected paths fail, leave every byte
//! of metadata as it was, and are reported with the system call and the
//! path; device nodes are dead everywhere but the sandbox's own `/dev`;
//! other mounts of protected data are covered. Real runs, real kernel.

mod sandbox_support;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rollguard_agent::kernel_audit::{AuditListener, RunDenials};
use rollguard_agent::sandbox::{SandboxSpec, Termination};
use sandbox_support::{Run, Tree};

const WAIT: Duration = Duration::from_secs(10);

/// Everything a metadata change could touch: stat fields (not atime) and
/// every extended attribute with its value, plus the ext4 inode flags.
#[derive(Debug, PartialEq, Eq)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
    ctime: (i64, i64),
    xattrs: BTreeMap<String, Vec<u8>>,
    flags: String,
}

fn meta(path: &Path) -> Meta {
    let m = fs::symlink_metadata(path).unwrap();
    let xattrs = python(&format!(
        "import os\nfor n in sorted(os.listxattr({p:?}, follow_symlinks=False)):\n    print(n, os.getxattr({p:?}, n, follow_symlinks=False).hex())",
        p = path.display().to_string()
    ))
    .lines()
    .map(|l| {
        let (n, v) = l.split_once(' ').unwrap();
        (n.to_string(), hex::decode(v).unwrap())
    })
    .collect();
    let flags = Command::new("lsattr").arg("-d").arg(path).output().unwrap();
    Meta {
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
        xattrs,
        flags: String::from_utf8_lossy(&flags.stdout)
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string(),
    }
}

fn python(code: &str) -> String {
    let out = Command::new("/usr/bin/python3")
        .args(["-c", code])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `system.posix_acl_access` value granting user nobody rwx (an
/// extended ACL: user::rw-, user:65534:rwx, group::r--, mask::rwx, other::r--).
const ACL: &str = "b'\\x02\\x00\\x00\\x00' + b''.join(__import__('struct').pack('<HHI', t, p, i) for t, p, i in [(1,6,0xffffffff),(2,7,65534),(4,4,0xffffffff),(0x10,7,0xffffffff),(0x20,4,0xffffffff)])";

/// Shell lines that try every metadata change on `path` and print
/// `<name>_<label>=<status>`.
fn attempts(path: &str, label: &str) -> String {
    let py = |what: &str, code: &str| {
        format!(
            "/usr/bin/python3 -c \"import os\ntry:\n    {code}\n    print('{what}_{label}=0')\nexcept OSError as e:\n    print('{what}_{label}=' + str(e.errno))\"\n"
        )
    };
    format!(
        "chmod 000 {path}; echo chmod_{label}=$?\n\
         chown nobody {path}; echo chown_{label}=$?\n\
         touch -d 2001-01-01 {path}; echo touch_{label}=$?\n\
         chattr +i {path}; echo chattr_{label}=$?\n{}{}",
        py(
            "xattr",
            &format!("os.setxattr('{path}', 'user.rollguard', b'x')")
        ),
        py(
            "acl",
            &format!("os.setxattr('{path}', 'system.posix_acl_access', {ACL})")
        ),
    )
}

/// Run `spec` with an audit listener, as the agent does.
fn run_with_denials(t: &Tree, spec: &SandboxSpec) -> (Run, RunDenials) {
    let listener = AuditListener::start().expect("audit must be usable on this host");
    let run = t.run(spec);
    let denials = listener.collect_for_run(run.outcome.pid, run.outcome.audit_session, WAIT);
    assert!(denials.is_complete(), "gaps: {:?}", denials.gaps);
    (run, denials)
}

fn has(denials: &RunDenials, access: &str, path: &Path) -> bool {
    let path = path.display().to_string();
    denials
        .denials
        .iter()
        .any(|d| d.denial.access == access && d.denial.path.as_deref() == Some(path.as_str()))
}

#[test]
fn metadata_changes_outside_the_scopes_and_on_protected_paths_fail_unchanged_and_are_reported() {
    let t = Tree::new();
    fs::create_dir_all(t.p("keys")).unwrap();
    fs::write(t.p("keys/signers"), "alice ssh-ed25519 AAAA\n").unwrap();
    // Something to remove: a user xattr set before the run.
    python(&format!(
        "import os; os.setxattr({:?}, 'user.keep', b'1')",
        t.s("other/notes.txt")
    ));
    let targets = [
        ("out", t.p("other/notes.txt")),
        ("pfile", t.p("keys/signers")),
        ("pdir", t.p("customers")),
    ];
    let before: Vec<Meta> = targets.iter().map(|(_, p)| meta(p)).collect();
    let under_protected = meta(&t.p("customers/index"));

    let mut script: String = targets
        .iter()
        .map(|(label, p)| attempts(&p.display().to_string(), label))
        .collect();
    script.push_str(&format!(
        "/usr/bin/python3 -c \"import os; os.removexattr('{}', 'user.keep')\"; echo rmxattr_out=$?\n",
        t.s("other/notes.txt")
    ));
    // Beneath a protected directory nothing is even there to change.
    script.push_str(&format!(
        "chmod 000 {}; echo chmod_under=$?\n",
        t.s("customers/index")
    ));
    // In scope, metadata changes still work.
    script.push_str(&format!(
        "chmod 600 {f} && touch -d 2001-01-01 {f}; echo inscope=$?\n",
        f = t.s("etc/app/app.conf")
    ));
    let mut spec = t.spec(&script);
    spec.protected.push(t.p("keys/signers"));
    let (run, denials) = run_with_denials(&t, &spec);
    assert_eq!(run.exit_code(), 0, "{}", run.stderr);

    for (label, _) in &targets {
        for what in ["chmod", "chown", "touch", "chattr", "xattr", "acl"] {
            let status = run.value(&format!("{what}_{label}"));
            assert_ne!(status, "0", "{what} on {label} succeeded\n{}", run.stdout);
        }
        // The calls made with a path fail with EROFS (30).
        assert_eq!(run.value(&format!("xattr_{label}")), "30");
        assert_eq!(run.value(&format!("acl_{label}")), "30");
    }
    assert_ne!(run.value("rmxattr_out"), "0");
    assert_ne!(run.value("chmod_under"), "0");
    assert_eq!(run.value("inscope"), "0", "{}", run.stderr);

    let after: Vec<Meta> = targets.iter().map(|(_, p)| meta(p)).collect();
    assert_eq!(after, before, "metadata changed");
    assert_eq!(meta(&t.p("customers/index")), under_protected);
    let conf = fs::metadata(t.p("etc/app/app.conf")).unwrap();
    assert_eq!(conf.mode() & 0o777, 0o600);

    // Each refusal is reported with its system call and path.
    for (_, p) in &targets {
        assert!(
            has(&denials, "erofs.fchmodat", p),
            "chmod {p:?}: {denials:#?}"
        );
        assert!(
            has(&denials, "erofs.fchownat", p),
            "chown {p:?}: {denials:#?}"
        );
        assert!(
            has(&denials, "erofs.utimensat", p),
            "touch {p:?}: {denials:#?}"
        );
        assert!(
            has(&denials, "erofs.setxattr", p),
            "xattr/acl {p:?}: {denials:#?}"
        );
    }
    assert!(
        has(&denials, "erofs.removexattr", &t.p("other/notes.txt")),
        "{denials:#?}"
    );
    // chattr: the flags ioctl on a file opened for reading carries no path
    // in audit; the protected ones cannot even be opened (Landlock).
    assert!(
        denials
            .denials
            .iter()
            .any(|d| d.denial.access == "erofs.ioctl"),
        "{denials:#?}"
    );
    assert!(denials.syscall_exit_denials > 0);
}

#[test]
fn a_block_device_in_a_write_scope_cannot_be_opened() {
    let t = Tree::new();
    // A loop device number no loop device uses (so nothing is at risk if
    // this test were wrong): unconfined, the open fails with ENXIO.
    let dev = t.p("etc/app/disk");
    let status = Command::new("mknod")
        .arg(&dev)
        .args(["b", "7", "250"])
        .status()
        .unwrap();
    assert!(status.success());
    let script = format!(
        "/usr/bin/python3 -c \"import os\ntry:\n    os.open('{d}', os.O_WRONLY)\n    print('open=0')\nexcept OSError as e:\n    print('open=' + str(e.errno))\"\n\
         printf x > {w}; echo write=$?",
        d = dev.display(),
        w = t.s("etc/app/new")
    );
    let run = t.sh(&script);
    assert_eq!(run.exit_code(), 0, "{}", run.stderr);
    // EPERM from the run cgroup's device program, before the driver is
    // asked (which would say ENXIO), and recorded.
    assert_eq!(run.value("open"), "1", "{}", run.stdout);
    let denials = run.outcome.filter_denials.clone().unwrap();
    assert!(
        denials.records.iter().any(|d| d.object == "block 7:250"),
        "{denials:?}"
    );
    assert_eq!(run.value("write"), "0");
    assert_eq!(fs::read(t.p("etc/app/new")).unwrap(), b"x");
}

/// Bind-mount `source` on `target` in the host's namespace for the
/// duration of a test.
struct Bind(std::path::PathBuf);

impl Bind {
    fn new(source: &Path, target: &Path) -> Bind {
        fs::create_dir_all(target).unwrap();
        let ok = Command::new("mount")
            .arg("--bind")
            .arg(source)
            .arg(target)
            .status()
            .unwrap()
            .success();
        assert!(ok);
        Bind(target.to_path_buf())
    }
}

impl Drop for Bind {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn another_mount_of_protected_data_is_covered_in_the_sandbox() {
    let t = Tree::new();
    let _alias = Bind::new(&t.p("backup"), &t.p("other/backup-view"));
    let before = t.snapshot();
    let run = t.sh(&format!(
        "ls -A {v}; echo ls=$?; cat {v}/full.tar >/dev/null; echo cat=$?; rm -rf {v}/nightly; echo rm=$?; chmod 000 {v}; echo chmod=$?",
        v = t.s("other/backup-view")
    ));
    assert_eq!(run.exit_code(), 0, "{}", run.stderr);
    assert_eq!(run.value("ls"), "0");
    assert!(!run.stdout.contains("full.tar"), "{}", run.stdout);
    assert_ne!(run.value("cat"), "0");
    assert_ne!(run.value("chmod"), "0");
    assert_eq!(t.snapshot().under("backup"), before.under("backup"));
    assert!(t.p("backup/nightly/2026-01-01.tar").exists());
}

#[test]
fn a_delete_scope_holding_another_mount_of_protected_data_fails_closed_naming_both_mounts() {
    let t = Tree::new();
    let _alias = Bind::new(&t.p("backup"), &t.p("spool/tmp/backup-view"));
    let run = t.sh(&format!("rm -rf {}; echo ran", t.s("spool/tmp")));
    match &run.outcome.termination {
        Termination::SetupFailed { error, .. } => {
            assert!(error.contains(&t.s("spool/tmp/backup-view")), "{error}");
            assert!(error.contains(&t.s("backup")), "{error}");
        }
        other => panic!("ran: {other:?}\n{}", run.stdout),
    }
    assert!(!run.stdout.contains("ran"));
    assert!(t.p("backup/full.tar").exists());
    assert!(t.p("spool/tmp/job1").exists());
}
