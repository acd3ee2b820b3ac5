//! The stage-2 program is the file the agent checked: replacing its path
//! after the check does not change what runs, and a program someone else
//! could have modified since is refused before anything starts.
//!
//! Real runs as root under the real kernel mechanisms (see
//! `sandbox_support`).

mod sandbox_support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use rollguard_agent::sandbox::{Launcher, SandboxError, Termination};
use sandbox_support::{Tree, TIMEOUT};

/// A copy of the stage-2 program in `dir` of the test tree (a root-owned
/// 0755 file in 0755/0700 directories: acceptable).
fn install_stage2(t: &Tree, dir: &str) -> PathBuf {
    let dir = t.p(dir);
    fs::create_dir_all(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.join("rollguard-sandbox-exec");
    fs::copy(env!("CARGO_BIN_EXE_rollguard-sandbox-exec"), &path).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn a_stage2_program_replaced_after_the_check_is_not_what_runs() {
    let t = Tree::new();
    let stage2 = install_stage2(&t, "install/lib/rollguard");
    let launcher = Launcher::new(&stage2).expect("a safe stage-2 program");

    // The attack: a different program renamed over the checked path. Had
    // it run, it would have run the bundle unconfined and left a mark.
    let marker = t.p("other/replaced-stage2-ran");
    let fake = t.p("install/lib/rollguard/.fake");
    fs::write(
        &fake,
        format!(
            "#!/bin/sh\ntouch {}\necho unconfined-run\n",
            marker.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    fs::rename(&fake, &stage2).unwrap();

    let spec = t.spec("grep '^Seccomp:' /proc/self/status | tr -d '\\t' | sed 's/:/=/'; echo ran");
    let child = launcher.spawn(&spec).expect("spawn");
    let outcome = child.wait(TIMEOUT).expect("wait");
    let stdout = fs::read_to_string(&outcome.stdout).unwrap();
    assert_eq!(
        outcome.termination,
        Termination::Exited { code: 0 },
        "{stdout}"
    );
    assert!(!marker.exists(), "the replacement ran");
    assert!(!stdout.contains("unconfined-run"), "{stdout}");
    // The checked program ran and confined the bundle.
    assert!(stdout.contains("Seccomp=2"), "{stdout}");
    let confinement = outcome
        .confinement
        .expect("stage 2 reported its confinement");
    assert!(confinement.seccomp_filters > 0, "{confinement:?}");
    assert!(confinement.landlock_fs_rules > 0, "{confinement:?}");
}

#[test]
fn a_stage2_program_made_writable_after_the_check_is_refused_before_anything_runs() {
    let t = Tree::new();
    let stage2 = install_stage2(&t, "install2/lib/rollguard");
    let launcher = Launcher::new(&stage2).expect("a safe stage-2 program");
    // Landlock does not cover chmod: a bundle could have done this.
    fs::set_permissions(&stage2, fs::Permissions::from_mode(0o757)).unwrap();
    let marker = t.p("etc/app/ran");
    let spec = t.spec(&format!("touch {}", marker.display()));
    let err = launcher.spawn(&spec).unwrap_err();
    assert!(matches!(err, SandboxError::Stage2Unsafe { .. }), "{err}");
    assert!(
        err.to_string().contains("writable by group or others"),
        "{err}"
    );
    assert!(!marker.exists());
    // No run cgroup was left behind (nothing was started).
    let runs = rollguard_agent::sandbox::cgroup::runs_parent().unwrap();
    assert!(!runs.join(&spec.run_id).exists());

    // Fixed again: it runs.
    fs::set_permissions(&stage2, fs::Permissions::from_mode(0o755)).unwrap();
    let child = launcher.spawn(&spec).expect("spawn");
    let outcome = child.wait(TIMEOUT).expect("wait");
    assert_eq!(outcome.termination, Termination::Exited { code: 0 });
    assert!(marker.exists());
}

#[test]
fn a_stage2_program_under_a_writable_directory_is_refused() {
    let t = Tree::new();
    let stage2 = install_stage2(&t, "install3/opt/lib/rollguard");
    // A grandparent others may write: they could rename lib/ away and put
    // their own tree in its place.
    fs::set_permissions(t.p("install3/opt"), fs::Permissions::from_mode(0o777)).unwrap();
    let err = Launcher::new(&stage2).unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "{} is writable by group or others",
            t.s("install3/opt")
        )),
        "{err}"
    );
    assert!(err.contains("chmod go-w"), "{err}");
}
