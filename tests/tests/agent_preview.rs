//! End to end: `rollguard-agent run --preview`, real signed bundles run as
//! root on the real kernel against overlays of the host. The preview
//! reports exactly what the run would change, the same denials as a real
//! run, and leaves every byte, mode and time on disk as it was; the
//! version is not used up.

use std::fs;
use std::path::{Path, PathBuf};

use rollguard_tests::host::{disk, manifest, Host, Keys, PolicyOptions};
use serde_json::Value;

/// The report's denials as a set (sorted, each once).
fn denial_set(report: &Value) -> Vec<(String, String)> {
    let mut d = rollguard_tests::host::denials(report);
    d.sort();
    d.dedup();
    d
}

/// (change, path relative to the host root) of each listed change.
fn changes(report: &Value, root: &Path) -> Vec<(String, String)> {
    let preview = &report["preview"];
    assert_eq!(preview["complete"], true, "{report:#}");
    preview["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let path = Path::new(c["path"].as_str().unwrap());
            (
                c["change"].as_str().unwrap().to_string(),
                path.strip_prefix(root).unwrap().display().to_string(),
            )
        })
        .collect()
}

fn change<'a>(report: &'a Value, root: &Path, rel: &str) -> &'a Value {
    let path = root.join(rel);
    report["preview"]["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["path"].as_str() == path.to_str())
        .unwrap_or_else(|| panic!("no change listed for {rel}: {report:#}"))
}

/// A version-1 bundle NAME for `mail-*.tokyo` with SCOPE (manifest
/// lines) and SCRIPT, signed by alice.
fn signed(host: &Host, keys: &Keys, name: &str, scope: &str, script: &str) -> PathBuf {
    let src = host.bundle_source(name, &manifest(name, 1, "\"mail-*.tokyo\"", scope), script);
    host.build_signed(&src, keys, &["alice"])
}

#[test]
fn a_preview_reports_exactly_its_changes_changes_nothing_and_leaves_the_version() {
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-01.tokyo", &keys, PolicyOptions::default());
    let root = host.root();
    fs::set_permissions(
        root.join("etc/mail/main.cf"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let script = "#!/bin/sh\nset -e\n\
        printf 'queue_lifetime = 1d\\n' > @ROOT@/etc/mail/main.cf\n\
        chmod 600 @ROOT@/etc/mail/main.cf\n\
        echo 'relay = none' > @ROOT@/etc/mail/extra.cf\n\
        rm @ROOT@/var/spool/tmp/stale-1\n\
        mkdir @ROOT@/var/spool/tmp/newdir\n\
        echo x > @ROOT@/var/spool/tmp/newdir/f\n\
        cat @ROOT@/etc/mail/main.cf\n";
    let bundle = signed(&host, &keys, "edit", "write = [\"@ROOT@/etc/mail\", \"@ROOT@/var/spool/tmp\"]\ndelete = [\"@ROOT@/var/spool/tmp\"]", script);
    let before = disk(&root);

    let (report, code) = host.preview(&bundle);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["status"], "succeeded", "{report:#}");
    assert_eq!(report["denials"], serde_json::json!([]), "{report:#}");
    // The bundle saw its own changes while it ran.
    assert_eq!(
        report["stdout_tail"].as_str().unwrap(),
        "queue_lifetime = 1d\n"
    );
    assert_eq!(
        changes(&report, &root),
        [
            ("created", "etc/mail/extra.cf"),
            ("modified", "etc/mail/main.cf"),
            ("created", "var/spool/tmp/newdir"),
            ("created", "var/spool/tmp/newdir/f"),
            ("deleted", "var/spool/tmp/stale-1"),
        ]
        .map(|(c, p)| (c.to_string(), p.to_string()))
    );
    let main_cf = change(&report, &root, "etc/mail/main.cf");
    assert_eq!(main_cf["before"]["mode"], 0o644);
    assert_eq!(main_cf["after"]["mode"], 0o600);
    assert_eq!(main_cf["before"]["size"], 20);
    assert_eq!(main_cf["after"]["size"], 20);
    let diff = main_cf["diff"].as_str().unwrap();
    assert!(
        diff.contains("-queue_lifetime = 5d\n") && diff.contains("+queue_lifetime = 1d\n"),
        "{diff}"
    );
    let created = change(&report, &root, "etc/mail/extra.cf");
    assert!(created["before"].is_null());
    assert!(created["diff"]
        .as_str()
        .unwrap()
        .contains("+relay = none\n"));
    let deleted = change(&report, &root, "var/spool/tmp/stale-1");
    assert_eq!(deleted["before"]["size"], 6);
    assert!(deleted["after"].is_null());
    assert_eq!(
        change(&report, &root, "var/spool/tmp/newdir")["after"]["kind"],
        "dir"
    );

    // Nothing reached the disk: bytes, modes, owners and times.
    assert_eq!(disk(&root), before, "a preview changed the disk");

    // The version was not used up: the same bundle runs for real now,
    // and does what the preview said.
    let (real, code) = host.run(&bundle);
    assert_eq!(code, 0, "{real:#}");
    assert!(real["preview"].is_null());
    assert_eq!(
        fs::read_to_string(root.join("etc/mail/main.cf")).unwrap(),
        "queue_lifetime = 1d\n"
    );
    assert!(!root.join("var/spool/tmp/stale-1").exists());
    assert!(root.join("var/spool/tmp/newdir/f").exists());
    // And now it is used up, preview or not.
    let (again, _) = host.preview(&bundle);
    assert_eq!(again["status"], "refused", "{again:#}");
    assert_eq!(again["refusal"], "rollback", "{again:#}");
}

#[test]
fn a_preview_of_the_2012_replay_reports_the_same_denials_as_the_real_run() {
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-02.tokyo", &keys, PolicyOptions::default());
    let root = host.root();
    // The 2012 script: clean the spool, then the stray line.
    let script = "#!/bin/sh\n\
        rm -rf @ROOT@/var/spool/tmp/*\n\
        rm -rf @ROOT@/home/customers @ROOT@/backup/daily\n\
        echo cleaned\n";
    let bundle = signed(
        &host,
        &keys,
        "replay",
        "delete = [\"@ROOT@/var/spool/tmp\"]",
        script,
    );
    let before = disk(&root);

    let (preview, code) = host.preview(&bundle);
    assert_eq!(code, 1, "denials are not a success: {preview:#}");
    assert_eq!(disk(&root), before, "a preview changed the disk");
    assert_eq!(
        changes(&preview, &root),
        [("deleted".to_string(), "var/spool/tmp/stale-1".to_string())]
    );
    let previewed = denial_set(&preview);
    assert!(
        previewed.iter().any(|(_, p)| p.contains("home/customers")),
        "the stray delete must be reported: {preview:#}"
    );

    let (real, code) = host.run(&bundle);
    assert_eq!(code, 1, "{real:#}");
    assert_eq!(
        denial_set(&real),
        previewed,
        "preview: {preview:#}\nreal: {real:#}"
    );
    // The real run did what the preview said, and no more.
    assert!(!root.join("var/spool/tmp/stale-1").exists());
    assert!(root.join("home/customers/alice/mail/inbox").exists());
    assert!(root.join("backup/daily/customers.tar").exists());
}

#[test]
fn a_preview_that_fills_its_layers_fails_and_says_so() {
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-03.tokyo", &keys, PolicyOptions::default());
    host.append_policy("[resources]\ntmp_mib = 4\n");
    let root = host.root();
    let script = "#!/bin/sh\n\
        dd if=/dev/zero of=@ROOT@/var/spool/tmp/big bs=1M count=12 2>/dev/null\n\
        echo dd=$?\n";
    let bundle = signed(
        &host,
        &keys,
        "fill",
        "write = [\"@ROOT@/var/spool/tmp\"]",
        script,
    );
    let before = disk(&root);
    let (report, code) = host.preview(&bundle);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["status"], "failed", "{report:#}");
    assert!(
        report["limits_hit"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l == "preview"),
        "{report:#}"
    );
    assert!(report["reason"].as_str().unwrap().contains("preview"));
    assert_eq!(report["preview"]["complete"], false, "{report:#}");
    assert_eq!(disk(&root), before, "a preview changed the disk");
}

/// What a plain content compare would miss: files deleted beneath a
/// directory removed and made again (their parent is new, not marked
/// opaque itself), a change of the scope directory's own mode, and an
/// extended attribute set with mode and bytes unchanged.
#[test]
fn a_preview_sees_deletions_under_remade_directories_scope_modes_and_xattrs() {
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-04.tokyo", &keys, PolicyOptions::default());
    let root = host.root();
    let keys_dir = root.join("var/spool/tmp/keys/authorized");
    fs::create_dir_all(&keys_dir).unwrap();
    fs::write(keys_dir.join("id.pub"), "ssh-ed25519 AAAA host\n").unwrap();
    fs::set_permissions(
        root.join("var/spool/tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let script = "#!/bin/sh\nset -e\n\
        cd @ROOT@/var/spool/tmp\n\
        rm -rf keys\n\
        mkdir -p keys/authorized\n\
        chmod 700 @ROOT@/var/spool/tmp\n\
        /usr/bin/python3 -c 'import os; os.setxattr(\"@ROOT@/etc/mail/main.cf\", \"user.note\", b\"x\")'\n";
    let bundle = signed(&host, &keys, "remade", "write = [\"@ROOT@/etc/mail\", \"@ROOT@/var/spool/tmp\"]\ndelete = [\"@ROOT@/var/spool/tmp\"]", script);
    let before = disk(&root);
    let (report, code) = host.preview(&bundle);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(disk(&root), before, "a preview changed the disk");
    assert_eq!(
        changes(&report, &root),
        [
            ("modified", "etc/mail/main.cf"),
            ("modified", "var/spool/tmp"),
            ("deleted", "var/spool/tmp/keys/authorized/id.pub"),
        ]
        .map(|(c, p)| (c.to_string(), p.to_string()))
    );
    let main_cf = change(&report, &root, "etc/mail/main.cf");
    assert_eq!(main_cf["xattrs_changed"], true, "{report:#}");
    assert!(main_cf["diff"].is_null(), "{report:#}");
    let scope = change(&report, &root, "var/spool/tmp");
    assert_eq!(scope["before"]["mode"], 0o755);
    assert_eq!(scope["after"]["mode"], 0o700);
}
