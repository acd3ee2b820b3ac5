//! Pins: protected paths inside a write and delete scope stay exactly as
//! they were whatever the bundle tries (write, truncate, chmod, chown,
//! utimes, xattrs, unlink, rename away, rename over, rename a directory
//! above and recreate the path, hard links, `/proc/self/fd` reopen), while
//! the rest of the scope stays writable; every refusal is reported with its
//! system call and path. Real runs, real kernel, as root.

mod sandbox_support;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rollguard_agent::kernel_audit::{AuditListener, RunDenials};
use rollguard_agent::sandbox::{SandboxSpec, Termination};
use sandbox_support::{Run, Tree};

const WAIT: Duration = Duration::from_secs(10);

/// Content, mode, owner, times (not atime), xattrs of every entry at or
/// beneath `path`.
fn state(path: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = fs::symlink_metadata(&p).unwrap();
        let mut xattrs: Vec<String> = xattr_names(&p);
        xattrs.sort();
        let body = if m.is_file() {
            String::from_utf8_lossy(&fs::read(&p).unwrap()).into_owned()
        } else {
            String::new()
        };
        out.insert(
            p.clone(),
            format!(
                "mode={:o} uid={} gid={} mtime={}.{} ctime={}.{} ino={} xattrs={xattrs:?} body={body:?}",
                m.mode(),
                m.uid(),
                m.gid(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
                m.ino()
            ),
        );
        if m.is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out
}

fn xattr_names(p: &Path) -> Vec<String> {
    let out = std::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg("import os,sys; print('\\n'.join(os.listxattr(sys.argv[1], follow_symlinks=False)))")
        .arg(p)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Run `spec` with an audit listener, as the agent does.
fn run_with_denials(t: &Tree, spec: &SandboxSpec) -> (Run, RunDenials) {
    let listener = AuditListener::start().expect("audit must be usable on this host");
    let run = t.run(spec);
    let denials = listener.collect_for_run(run.outcome.pid, run.outcome.audit_session, WAIT);
    assert!(denials.is_complete(), "gaps: {:?}", denials.gaps);
    (run, denials)
}

fn reported(denials: &RunDenials, prefix: &str, path: &Path) -> bool {
    let path = path.display().to_string();
    denials.denials.iter().any(|d| {
        d.denial.access.starts_with(prefix) && d.denial.path.as_deref() == Some(path.as_str())
    })
}

/// Every attack, in Python so each prints its errno: `<name>=<errno>`
/// (`0`: it worked).
const ATTACKS: &str = r#"
import errno, os, sys
S = sys.argv[1]
P = S + "/lib/rg/stage2"        # a pinned file
U = S + "/unit/agent.service"   # another one
D = S + "/conf.d"               # a pinned directory
def attempt(name, f):
    try:
        f()
        print(name + "=0")
    except OSError as e:
        print(name + "=" + str(e.errno))
def write():
    with open(P, "w") as f: f.write("evil")
def append():
    with open(P, "a") as f: f.write("evil")
def via_proc():
    fd = os.open(P, os.O_PATH)
    os.chmod("/proc/self/fd/%d" % fd, 0o777)
def reopen():
    fd = os.open(P, os.O_PATH)
    os.open("/proc/self/fd/%d" % fd, os.O_WRONLY)
def replace_dir_above():
    os.rename(S + "/lib", S + "/lib.old")
    os.makedirs(S + "/lib/rg")
    with open(P, "w") as f: f.write("evil")
def replace_rg():
    os.rename(S + "/lib/rg", S + "/lib/rg.old")
def move_rg():
    os.rename(S + "/lib/rg", S + "/rg.old")
def symlink_over():
    os.symlink("/bin/true", S + "/lib/rg/link")
    os.rename(S + "/lib/rg/link", P)
attempt("write", write)
attempt("append", append)
attempt("truncate", lambda: os.truncate(P, 0))
attempt("chmod", lambda: os.chmod(P, 0o777))
attempt("chown", lambda: os.chown(P, 65534, 65534))
attempt("utime", lambda: os.utime(P, (1, 1)))
attempt("setxattr", lambda: os.setxattr(P, "user.evil", b"1"))
attempt("via_proc", via_proc)
attempt("reopen", reopen)
attempt("unlink", lambda: os.unlink(P))
attempt("rename_away", lambda: os.rename(P, S + "/stolen"))
attempt("rename_over", lambda: os.rename(S + "/decoy", P))
attempt("rename_away_beside", lambda: os.rename(P, S + "/lib/rg/stolen"))
def rename_over_beside():
    with open(S + "/lib/rg/decoy", "w") as f: f.write("evil")
    os.rename(S + "/lib/rg/decoy", P)
attempt("rename_over_beside", rename_over_beside)
attempt("symlink_over", symlink_over)
attempt("link", lambda: os.link(P, S + "/hardlink"))
attempt("replace_dir_above", replace_dir_above)
attempt("replace_rg", replace_rg)
attempt("move_rg", move_rg)
attempt("rmdir_above", lambda: os.rmdir(S + "/lib/rg"))
attempt("unit_unlink", lambda: os.unlink(U))
attempt("unit_write", lambda: open(U, "w"))
attempt("dir_create", lambda: open(D + "/evil.conf", "w"))
attempt("dir_rename", lambda: os.rename(D, S + "/conf.old"))
attempt("dir_rmdir", lambda: os.rmdir(D))
attempt("dir_unlink_inside", lambda: os.unlink(D + "/a.conf"))
attempt("dir_chmod", lambda: os.chmod(D, 0o777))
attempt("secret_read", lambda: open(D + "/secret").read())
# The rest of the scope is the bundle's.
def ok_work():
    with open(S + "/new", "w") as f: f.write("new")
    with open(S + "/lib/other.so", "w") as f: f.write("upgraded")
    with open(S + "/lib/rg/beside", "w") as f: f.write("beside")
    os.unlink(S + "/old")
    os.makedirs(S + "/lib/newdir")
attempt("ok_work", ok_work)
"#;

#[test]
fn pinned_paths_inside_a_scope_stay_unchanged_and_every_attempt_is_reported() {
    let t = Tree::new();
    let sys = t.p("sys");
    for (rel, body) in [
        ("sys/lib/rg/stage2", "the real stage 2"),
        ("sys/lib/other.so", "old"),
        ("sys/unit/agent.service", "[Service]"),
        ("sys/conf.d/a.conf", "a"),
        ("sys/conf.d/secret", "secret"),
        ("sys/decoy", "decoy"),
        ("sys/old", "old"),
    ] {
        fs::create_dir_all(t.p(rel).parent().unwrap()).unwrap();
        fs::write(t.p(rel), body).unwrap();
    }
    fs::write(t.p("payload/attacks.py"), ATTACKS).unwrap();
    let pinned = [
        t.p("sys/lib/rg/stage2"),
        t.p("sys/unit/agent.service"),
        t.p("sys/conf.d"),
    ];
    let before: Vec<_> = pinned.iter().map(|p| state(p)).collect();
    let above: Vec<_> = [t.p("sys/lib"), t.p("sys/lib/rg"), t.p("sys/unit")]
        .iter()
        .map(|p| fs::symlink_metadata(p).unwrap().ino())
        .collect();

    let mut spec = t.spec(&format!(
        "/usr/bin/python3 {} {}",
        t.s("payload/attacks.py"),
        sys.display()
    ));
    spec.scope.write = t.scope(&["sys"]);
    spec.scope.delete = t.scope(&["sys"]);
    spec.pins = pinned.to_vec();
    // A path bundles may not read, beneath a pin: read-only and covered.
    spec.protected.push(t.p("sys/conf.d/secret"));
    let (run, denials) = run_with_denials(&t, &spec);
    assert_eq!(run.exit_code(), 0, "{}\n{}", run.stdout, run.stderr);
    let confinement = run.outcome.confinement.clone().expect("confined");
    // Three pins and the directories above them (lib, lib/rg, unit).
    assert_eq!(confinement.pinned_mounts, 6, "{confinement:?}");

    let erofs = "30";
    let ebusy = "16";
    let exdev = "18";
    for (name, errno) in [
        ("write", erofs),
        ("append", erofs),
        ("truncate", erofs),
        ("chmod", erofs),
        ("chown", erofs),
        ("utime", erofs),
        ("setxattr", erofs),
        ("via_proc", erofs),
        ("reopen", erofs),
        ("unlink", ebusy),
        // Out of (or into) the pin's directory: another mount, refused
        // before the mount point is looked at.
        ("rename_away", exdev),
        ("rename_over", exdev),
        ("rename_away_beside", ebusy),
        ("rename_over_beside", ebusy),
        ("symlink_over", ebusy),
        ("link", exdev),
        ("replace_dir_above", ebusy),
        ("replace_rg", ebusy),
        // Out of its mount: refused before the mount point is looked at.
        ("move_rg", exdev),
        ("rmdir_above", ebusy),
        ("unit_unlink", ebusy),
        ("unit_write", erofs),
        ("dir_create", erofs),
        ("dir_rename", ebusy),
        ("dir_rmdir", ebusy),
        ("dir_unlink_inside", erofs),
        ("dir_chmod", erofs),
        // The cover: an empty mode-000 node (root keeps DAC_OVERRIDE, so
        // Landlock answers).
        ("secret_read", "13"),
        ("ok_work", "0"),
    ] {
        assert_eq!(run.value(name), errno, "{name}\n{}", run.stdout);
    }

    let after: Vec<_> = pinned.iter().map(|p| state(p)).collect();
    assert_eq!(after, before, "a pinned path changed");
    let above_after: Vec<_> = [t.p("sys/lib"), t.p("sys/lib/rg"), t.p("sys/unit")]
        .iter()
        .map(|p| fs::symlink_metadata(p).unwrap().ino())
        .collect();
    assert_eq!(above_after, above, "a directory above a pin was replaced");
    for gone in [
        "sys/stolen",
        "sys/hardlink",
        "sys/lib.old",
        "sys/rg.old",
        "sys/conf.old",
    ] {
        assert!(!t.p(gone).exists(), "{gone}");
    }
    // The rest of the scope changed as the bundle asked.
    assert_eq!(fs::read_to_string(t.p("sys/new")).unwrap(), "new");
    assert_eq!(
        fs::read_to_string(t.p("sys/lib/other.so")).unwrap(),
        "upgraded"
    );
    assert_eq!(
        fs::read_to_string(t.p("sys/lib/rg/beside")).unwrap(),
        "beside"
    );
    assert!(!t.p("sys/old").exists());
    assert!(t.p("sys/lib/newdir").is_dir());

    // Reported: the read-only refusals and the mount-point refusals, each
    // with its path.
    let p = t.p("sys/lib/rg/stage2");
    assert!(reported(&denials, "erofs.", &p), "{denials:#?}");
    assert!(reported(&denials, "ebusy.unlink", &p), "{denials:#?}");
    assert!(reported(&denials, "ebusy.rename", &p), "{denials:#?}");
    assert!(
        reported(&denials, "ebusy.rename", &t.p("sys/lib")),
        "{denials:#?}"
    );
    assert!(
        reported(&denials, "ebusy.rmdir", &t.p("sys/lib/rg")),
        "{denials:#?}"
    );
    assert!(
        reported(&denials, "ebusy.rmdir", &t.p("sys/conf.d")),
        "{denials:#?}"
    );
    // A name that cannot be created: audit names the directory.
    assert!(
        reported(
            &denials,
            "erofs.openat",
            Path::new(&format!("{}/", t.s("sys/conf.d")))
        ),
        "{denials:#?}"
    );
}

#[test]
fn a_protected_path_inside_a_scope_without_a_pin_is_refused_by_stage_2() {
    // The agent never asks for this; stage 2 checks again on its own.
    let t = Tree::new();
    let mut spec = t.spec("echo ran");
    spec.scope.write = t.scope(&["etc"]);
    spec.protected.push(t.p("etc/app/app.conf"));
    let run = t.run(&spec);
    assert!(!run.stdout.contains("ran"), "{}", run.stdout);
    assert!(
        matches!(&run.outcome.termination, Termination::SetupFailed { step, error } if step == "mounts" && error.contains("overlaps the protected path")),
        "{:?}",
        run.outcome.termination
    );
}

#[test]
fn a_pin_that_could_be_created_directly_in_the_scope_is_refused_by_stage_2() {
    let t = Tree::new();
    let mut spec = t.spec("echo ran");
    spec.scope.write = t.scope(&["etc/app"]);
    spec.pins = vec![t.p("etc/app/ld.so.preload")];
    let run = t.run(&spec);
    assert!(!run.stdout.contains("ran"), "{}", run.stdout);
    assert!(
        matches!(&run.outcome.termination, Termination::SetupFailed { step, error } if step == "mounts" && error.contains("could create it")),
        "{:?}",
        run.outcome.termination
    );
    assert!(!t.p("etc/app/ld.so.preload").exists());
}
