//! End to end: read-only mounts outside the scopes, covered protected
//! paths and mount aliases, with real signed bundles run by
//! `rollguard-agent run` as root on the real kernel.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use rollguard_tests::host::{manifest, Host, Keys, PolicyOptions};
use serde_json::Value;

fn denials(report: &Value) -> Vec<(String, String)> {
    report["denials"]
        .as_array()
        .unwrap_or_else(|| panic!("denials must be known on this kernel: {report:#}"))
        .iter()
        .map(|d| {
            (
                d["access"].as_str().unwrap().to_string(),
                d["path"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

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
    assert_eq!(report["status"], "refused", "{report:#}");
    assert_eq!(report["refusal"], "protected_path", "{report:#}");
    assert_eq!(code, 2);
    let reason = report["reason"].as_str().unwrap();
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
    assert_eq!(report["status"], "refused", "{report:#}");
    assert_eq!(report["refusal"], "protected_path", "{report:#}");
    assert_eq!(code, 2);
    let reason = report["reason"].as_str().unwrap();
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
