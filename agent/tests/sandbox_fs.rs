//! Filesystem confinement, asserted on disk: what a bundle may and may not
//! do to files, run as root through the real launcher.

mod sandbox_support;

use std::fs;

use rollguard_agent::sandbox::Termination;
use sandbox_support::{Entry, Tree};

#[test]
fn scoped_write_succeeds() {
    let t = Tree::new();
    let before = t.snapshot();
    let run = t.sh(&format!(
        "printf new > {app}/new.conf && printf more >> {app}/app.conf && mkdir {app}/conf.d && printf x > {app}/conf.d/y",
        app = t.s("etc/app")
    ));
    assert_eq!(run.exit_code(), 0, "{}", run.stderr);
    assert_eq!(fs::read(t.p("etc/app/new.conf")).unwrap(), b"new");
    assert!(fs::read(t.p("etc/app/app.conf"))
        .unwrap()
        .ends_with(b"more"));
    assert_eq!(fs::read(t.p("etc/app/conf.d/y")).unwrap(), b"x");
    // Nothing outside the write scope changed.
    assert_eq!(t.snapshot().without("etc/app"), before.without("etc/app"));
}

#[test]
fn rm_rf_of_protected_dirs_fails_and_every_byte_survives() {
    let t = Tree::new();
    let before = t.snapshot();
    let run = t.sh(&format!(
        "rm -rf {c} {b}; echo rm_status=$?; rm {c}/index; echo rm_file_status=$?",
        c = t.s("customers"),
        b = t.s("backup")
    ));
    assert_ne!(run.value("rm_status"), "0");
    assert_ne!(run.value("rm_file_status"), "0");
    // Covered by a read-only mount: refused before Landlock is asked.
    assert!(
        run.stderr.contains("Read-only file system") || run.stderr.contains("Permission denied"),
        "stderr: {}",
        run.stderr
    );
    assert_eq!(t.snapshot(), before);
}

#[test]
fn reading_a_protected_file_is_denied() {
    let t = Tree::new();
    let run = t.sh(&format!(
        "cat {f} > /dev/null; echo cat_status=$?; ls {d} > /dev/null; echo ls_status=$?; \
         cat /proc/self/root{f} > /dev/null; echo proc_root_status=$?",
        f = t.s("backup/full.tar"),
        d = t.s("customers")
    ));
    assert_ne!(run.value("cat_status"), "0");
    assert_ne!(run.value("ls_status"), "0");
    assert_ne!(run.value("proc_root_status"), "0");
    assert!(
        run.stderr.contains("Permission denied"),
        "stderr: {}",
        run.stderr
    );
}

#[test]
fn out_of_scope_writes_deletes_renames_links_and_symlink_swaps_are_denied() {
    let t = Tree::new();
    let before = t.snapshot();
    let ops = [
        ("write_other", format!("printf x > {}", t.s("other/new"))),
        (
            "append_other",
            format!("printf x >> {}", t.s("other/notes.txt")),
        ),
        ("truncate_other", format!(": > {}", t.s("other/notes.txt"))),
        (
            "write_protected",
            format!("printf x > {}", t.s("customers/new")),
        ),
        (
            "overwrite_protected",
            format!("printf x > {}", t.s("customers/index")),
        ),
        // scope.write does not include removing.
        (
            "delete_in_write_scope",
            format!("rm {}", t.s("etc/app/app.conf")),
        ),
        (
            "rename_in_write_scope",
            format!("mv {} {}", t.s("etc/app/app.conf"), t.s("etc/app/renamed")),
        ),
        ("delete_other", format!("rm {}", t.s("other/notes.txt"))),
        (
            "rename_protected_away",
            format!("mv {} {}", t.s("customers/index"), t.s("spool/tmp/")),
        ),
        (
            "rename_protected_into_write",
            format!("mv {} {}", t.s("customers/index"), t.s("etc/app/")),
        ),
        (
            "hardlink_protected_into_write",
            format!("ln {} {}", t.s("customers/index"), t.s("etc/app/index")),
        ),
        (
            "hardlink_out_to_other",
            format!("ln {} {}", t.s("etc/app/app.conf"), t.s("other/link")),
        ),
        (
            "rename_delete_scope_itself",
            format!("mv {} {}", t.s("spool/tmp"), t.s("spool/tmp2")),
        ),
        (
            "symlink_swap_write",
            format!(
                "ln -s {b} {app}/evil && printf x > {app}/evil/planted",
                b = t.s("backup"),
                app = t.s("etc/app")
            ),
        ),
        (
            "symlink_swap_overwrite",
            format!(
                "ln -s {idx} {app}/evil2 && printf x > {app}/evil2",
                idx = t.s("customers/index"),
                app = t.s("etc/app")
            ),
        ),
        // Landlock does not cover metadata; seccomp refuses set-id bits.
        (
            "setuid_in_write_scope",
            format!("chmod u+s {}", t.s("etc/app/app.conf")),
        ),
        (
            "setgid_out_of_scope",
            format!("chmod g+s {}", t.s("other/notes.txt")),
        ),
    ];
    let script: String = ops
        .iter()
        .map(|(name, cmd)| format!("({cmd}) 2>/dev/null; echo {name}=$?\n"))
        .collect();
    let run = t.sh(&script);
    for (name, _) in &ops {
        assert_ne!(run.value(name), "0", "{name} succeeded inside the sandbox");
    }
    // The only changes allowed: the two symlinks created in the write
    // scope (MAKE_SYM is a write right); everything else is byte-identical.
    let after = t.snapshot();
    let mut expected = before.0.clone();
    for link in ["etc/app/evil", "etc/app/evil2"] {
        if let Some(e) = after.0.get(std::path::Path::new(link)) {
            assert!(matches!(e, Entry::Symlink { .. }));
            expected.insert(link.into(), e.clone());
        }
    }
    assert_eq!(after.0, expected);
    assert!(!t.p("backup/planted").exists());
}

#[test]
fn deletes_within_the_delete_scope_work() {
    let t = Tree::new();
    let before = t.snapshot();
    let run = t.sh(&format!(
        "rm -rf {d}/job1 {d}/old && rm {d}/job2 && echo ok=yes",
        d = t.s("spool/tmp")
    ));
    assert_eq!(run.value("ok"), "yes", "{}", run.stderr);
    assert!(
        t.snapshot().under("spool/tmp").len() == 1,
        "only spool/tmp itself remains"
    );
    assert!(t.p("spool/tmp").is_dir());
    assert_eq!(
        t.snapshot().without("spool/tmp"),
        before.without("spool/tmp")
    );
}

#[test]
fn in_place_edit_needs_the_delete_scope_too() {
    let t = Tree::new();
    // sed -i writes a temporary file and renames it over the original;
    // Landlock counts replacing the original as removing it.
    let mut spec = t.spec(&format!(
        "sed -i s/^/x/ {app}/app.conf; echo write_only=$?; sed -i s/^/x/ {spool}/job1; echo write_delete=$?",
        app = t.s("etc/app"),
        spool = t.s("spool/tmp")
    ));
    spec.scope.write.extend(t.scope(&["spool/tmp"]));
    let run = t.run(&spec);
    assert_ne!(run.value("write_only"), "0");
    assert_eq!(run.value("write_delete"), "0", "{}", run.stderr);
    assert!(fs::read(t.p("spool/tmp/job1")).unwrap().starts_with(b"x"));
}

#[test]
fn destructive_sweeps_leave_everything_outside_the_scopes_intact() {
    let t = Tree::new();
    // Make the test tree the only writable place, to limit the blast radius
    // should the sandbox ever be broken.
    let before = t.snapshot();
    let host_files = [
        "/usr/bin/sh",
        "/etc/passwd",
        "/usr/lib/os-release",
        env!("CARGO_BIN_EXE_rollguard-agent"),
    ];
    let run = t.sh(&format!(
        "rm -rf --no-preserve-root / 2>/dev/null; \
         rm -rf /usr /etc /var /root /home /srv /opt /bin /sbin /lib /boot 2>/dev/null; \
         find / -xdev -delete 2>/dev/null; \
         find {root} -delete 2>/dev/null; \
         rm -rf {root} 2>/dev/null; \
         for f in {root}/customers/* {root}/backup/* {root}/other/*; do printf '' > \"$f\"; done 2>/dev/null; \
         dd if=/dev/zero of={root}/customers/index bs=1k count=1 conv=notrunc 2>/dev/null; \
         echo finished=yes",
        root = t.root.display()
    ));
    assert_eq!(run.value("finished"), "yes");
    let after = t.snapshot();
    // spool/tmp (the delete scope) may have been emptied; nothing else changed.
    assert_eq!(after.without("spool/tmp"), before.without("spool/tmp"));
    for file in host_files {
        assert!(fs::metadata(file).is_ok(), "{file} is gone");
    }
}

#[test]
fn read_scope_confines_reads() {
    let t = Tree::new();
    let mut spec = t.spec(&format!(
        "cat {conf} > /dev/null; echo in_scope=$?; cat {notes} > /dev/null; echo out_of_scope=$?; \
         cat /etc/hostname > /dev/null; echo etc=$?; /usr/bin/env true; echo exec=$?",
        conf = t.s("etc/app/app.conf"),
        notes = t.s("other/notes.txt")
    ));
    spec.scope.read = t.scope(&["etc"]);
    let run = t.run(&spec);
    assert_eq!(run.value("in_scope"), "0", "{}", run.stderr);
    assert_ne!(run.value("out_of_scope"), "0");
    assert_ne!(run.value("etc"), "0");
    assert_eq!(run.value("exec"), "0");
}

#[test]
fn payload_runs_from_the_payload_directory() {
    let t = Tree::new();
    let mut spec = t.spec("");
    spec.command = vec!["./run.sh".into(), "arg1".into()];
    let run = t.run(&spec);
    assert_eq!(run.exit_code(), 0, "{}", run.stderr);
    assert_eq!(run.stdout.trim(), "payload-ran arg1");
    // The payload itself is read-only to the bundle.
    let run = t.sh(&format!("printf x >> {}/run.sh; echo w=$?", t.s("payload")));
    assert_ne!(run.value("w"), "0");
}

#[test]
fn a_scope_path_reached_through_a_symlink_is_refused_and_nothing_runs() {
    let t = Tree::new();
    std::os::unix::fs::symlink(t.p("backup"), t.p("etc/app-link")).unwrap();
    let mut spec = t.spec(&format!("printf ran > {}/marker", t.s("spool/tmp")));
    spec.scope.write = t.scope(&["etc/app-link"]);
    let run = t.run(&spec);
    match &run.outcome.termination {
        Termination::SetupFailed { step, error } => {
            assert_eq!(step, "landlock");
            assert!(
                error.contains("resolves to") || error.contains("symlink"),
                "{error}"
            );
        }
        other => panic!("expected a setup failure, got {other:?}"),
    }
    assert!(!t.p("spool/tmp/marker").exists());
}

#[test]
fn a_scope_overlapping_a_protected_path_is_refused_and_nothing_runs() {
    let t = Tree::new();
    let mut spec = t.spec(&format!("printf ran > {}/marker", t.s("spool/tmp")));
    spec.scope.delete.extend(t.scope(&["customers/a"]));
    let run = t.run(&spec);
    assert!(
        matches!(&run.outcome.termination, Termination::SetupFailed { step, error } if (step == "mounts" || step == "landlock") && error.contains("protected")),
        "{:?}",
        run.outcome.termination
    );
    assert!(!t.p("spool/tmp/marker").exists());

    // A write scope containing a protected path cannot be granted either.
    let mut spec = t.spec(&format!("printf ran > {}/marker", t.s("spool/tmp")));
    spec.scope.write = t.scope(&["customers"]);
    spec.protected = vec![t.p("customers/a")];
    let run = t.run(&spec);
    assert!(
        matches!(&run.outcome.termination, Termination::SetupFailed { .. }),
        "{:?}",
        run.outcome.termination
    );
    assert!(!t.p("spool/tmp/marker").exists());
}

#[test]
fn an_unmet_landlock_requirement_fails_closed() {
    let t = Tree::new();
    let mut spec = t.spec(&format!("printf ran > {}/marker", t.s("spool/tmp")));
    spec.landlock_min_abi = 99;
    let run = t.run(&spec);
    match &run.outcome.termination {
        Termination::SetupFailed { step, error } => {
            assert_eq!(step, "landlock");
            assert!(error.contains("needs at least 99"), "{error}");
        }
        other => panic!("expected a setup failure, got {other:?}"),
    }
    assert!(run.outcome.confinement.is_none());
    assert!(!t.p("spool/tmp/marker").exists());
}

#[test]
fn the_run_directory_may_not_be_in_a_write_scope() {
    let t = Tree::new();
    let mut spec = t.spec(&format!("printf ran > {}/marker", t.s("spool/tmp")));
    fs::create_dir_all(t.p("etc/app/run")).unwrap();
    spec.run_dir = t.p("etc/app/run");
    let run = t.run(&spec);
    assert!(
        matches!(&run.outcome.termination, Termination::SetupFailed { error, .. } if error.contains("forge")),
        "{:?}",
        run.outcome.termination
    );
    assert!(!t.p("spool/tmp/marker").exists());
}

#[test]
fn private_tmp_is_private() {
    let t = Tree::new();
    let host_sentinel = tempfile::NamedTempFile::new_in("/tmp").unwrap();
    let name = host_sentinel
        .path()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let run = t.sh(&format!(
        "test -e /tmp/{name}; echo sees_host=$?; rm -rf /tmp/* /var/tmp/* /dev/shm/*; \
         printf scratch > /tmp/scratch && printf s > /dev/shm/s && echo scratch_ok=yes; \
         echo home=$HOME tmpdir=$TMPDIR"
    ));
    assert_eq!(run.value("sees_host"), "1");
    assert_eq!(run.value("scratch_ok"), "yes", "{}", run.stderr);
    assert!(host_sentinel.path().exists());
    assert!(!std::path::Path::new("/tmp/scratch").exists());
    assert!(run.stdout.contains("home=/tmp tmpdir=/tmp"));
}

/// An rpm install's run may list every directory
/// (`SandboxSpec::list_every_directory`): names only. A protected
/// directory still lists nothing (it is covered), its files stay out of
/// reach however they are named (a path, relative to the directory, an
/// `O_PATH` descriptor reopened through `/proc`) and cannot be truncated.
/// With a read scope the grant is not made at all.
#[test]
fn listing_every_directory_lists_names_and_reads_no_protected_file() {
    let t = Tree::new();
    let before = t.snapshot();
    let f = t.s("backup/full.tar");
    let d = t.s("backup");
    let mut spec = t.spec(&format!(
        "ls {root} > /dev/null; echo ls_ancestor=$?; \
         ls -A {d} > {out}; echo ls_protected=$?; echo listed=$(wc -c < {out}); \
         cat {f} > /dev/null; echo cat=$?; \
         (cd {d} && cat full.tar > /dev/null); echo cat_relative=$?; \
         python3 -c 'import os,sys; fd=os.open(sys.argv[1], os.O_PATH); os.open(\"/proc/self/fd/%d\" % fd, os.O_RDONLY)' {f} 2>/dev/null; echo reopen=$?; \
         sh -c ': > {f}' 2>/dev/null; echo truncate=$?",
        root = t.root.display(),
        out = t.s("etc/app/listing"),
    ));
    spec.list_every_directory = true;
    let run = t.run(&spec);
    assert_eq!(run.value("ls_ancestor"), "0", "{}", run.stderr);
    assert_eq!(run.value("ls_protected"), "0", "{}", run.stderr);
    assert_eq!(
        run.value("listed"),
        "0",
        "a covered directory lists nothing"
    );
    for denied in ["cat", "cat_relative", "reopen", "truncate"] {
        assert_ne!(run.value(denied), "0", "{denied}: {}", run.stderr);
    }
    assert_eq!(
        t.snapshot().without("etc/app"),
        before.without("etc/app"),
        "nothing outside the write scope changed"
    );

    // Without the grant the ancestor cannot be listed; with a read scope
    // the grant is not made.
    let plain = t.sh(&format!("ls {} > /dev/null; echo ls=$?", t.root.display()));
    assert_ne!(plain.value("ls"), "0");
    let mut scoped = t.spec(&format!("ls {} > /dev/null; echo ls=$?", t.root.display()));
    scoped.list_every_directory = true;
    scoped.scope.read = t.scope(&["etc"]);
    let run = t.run(&scoped);
    assert_ne!(run.value("ls"), "0", "{}", run.stderr);
}
