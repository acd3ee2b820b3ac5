//! `[packages]` with real .rpm files: v1 installed bare into this machine's
//! rpm database, v2 through a signed bundle run by `rollguard-agent run`,
//! rpm and its scriptlets confined. Removed afterwards. Needs root.
//!
//! rpm 4.18 (Debian 12) creates each file relative to directory
//! descriptors it opens from `/` down (`openat(-1, "/", O_RDONLY)`, then
//! `etc`, ...), which needs Landlock's READ_DIR on every ancestor: an rpm
//! install's run may list every directory (names only; a protected file's
//! content stays unreadable, `SandboxSpec::list_every_directory`). Its
//! scriptlets get rpm's own PATH, which the agent begins with the
//! sandbox's shims so that a `systemctl` request is captured.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use rollguard_tests::host::{Host, Keys};
use rollguard_tests::packages::{self as pkg, Cleanup, Variant};
use rollguard_tests::{rollguard, run_ok};
use serde_json::{json, Value};

/// The package without its `%post`'s restart request.
fn quiet() -> Variant {
    Variant {
        no_service_request: true,
        ..Variant::default()
    }
}

/// A host with v1 installed bare (and the `/bin/sh` provider rpm's
/// scriptlet dependency needs on this Debian machine), and the directory
/// for the packages.
fn host_with_v1(keys: &Keys) -> (Host, PathBuf) {
    let host = pkg::host(keys);
    let out = host.root().join("rpms");
    fs::create_dir_all(&out).unwrap();
    let sh = pkg::build_sh_provider(&out);
    run_ok(Command::new("rpm").arg("-i").arg(&sh));
    let v1 = pkg::build_rpm(&out, "1.0", &quiet());
    run_ok(Command::new("rpm").arg("-i").arg(&v1));
    assert_eq!(pkg::rpm_version().as_deref(), Some("1.0-1"));
    (host, out)
}

/// A bundle installing `rpm`, built and signed by alice.
fn signed_bundle(host: &Host, keys: &Keys, label: &str, rpm: &Path) -> PathBuf {
    let src = pkg::bundle_source(host, label, 1, rpm);
    let (bundle, warnings) = pkg::build_bundle(&src);
    assert_eq!(warnings, "");
    run_ok(
        rollguard()
            .args(["bundle", "sign"])
            .arg(&bundle)
            .arg("--key")
            .arg(keys.key("alice"))
            .args(["--signer", "alice"]),
    );
    bundle
}

fn rpm_dbpath() -> String {
    String::from_utf8(run_ok(Command::new("rpm").args(["-E", "%_dbpath"])).stdout)
        .unwrap()
        .trim()
        .to_string()
}

/// Only the expected denials rpm causes by itself (glibc's nscd probe).
fn assert_only_rpm_expected_denials(report: &Value) {
    for d in report["expected_denials"].as_array().into_iter().flatten() {
        assert_eq!(d["reason"], "glibc-nscd-probe", "{report:#}");
        assert_eq!(d["exe"], "/usr/bin/rpm", "{report:#}");
    }
}

#[test]
fn a_signed_bundle_upgrades_an_rpm_inside_its_derived_scope() {
    let _db = pkg::lock();
    let _cleanup = Cleanup { rpm: true };
    let keys = Keys::new(&["alice"]);
    let (host, out) = host_with_v1(&keys);
    let v2 = pkg::build_rpm(&out, "2.0", &quiet());
    let bundle = signed_bundle(&host, &keys, "rpm", &v2);

    // The derived scope: the package's directories and rpm's database.
    let dbpath = rpm_dbpath();
    let p = &pkg::inspect(&bundle)["packages"];
    assert_eq!(p["kind"], "rpm");
    assert_eq!(p["database"], dbpath.as_str());
    assert_eq!(
        p["install"],
        json!([{ "file": "pkgs/rgpkgtest-2.0-1.noarch.rpm", "name": "rgpkgtest", "version": "2.0-1" }])
    );
    let mut expected = vec!["/etc/rgpkgtest", dbpath.as_str(), "/usr/lib/rgpkgtest"];
    expected.sort();
    assert_eq!(p["write"], json!(expected));
    assert_eq!(p["delete"], json!(expected));

    let backup_before = host.snapshot("backup");
    let (report, code) = host.run(&bundle);
    assert_eq!(report["status"], "succeeded", "{report:#}");
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["denials"], json!([]), "{report:#}");
    assert_only_rpm_expected_denials(&report);
    assert_eq!(
        report["packages"],
        json!([{ "manager": "rpm", "name": "rgpkgtest", "version": "2.0-1", "before": "1.0-1", "after": "2.0-1" }]),
        "{report:#}"
    );
    assert_eq!(pkg::rpm_version().as_deref(), Some("2.0-1"));
    assert!(fs::read_to_string(pkg::PROGRAM).unwrap().contains("2.0"));
    assert_eq!(
        fs::read_to_string(pkg::CONFFILE).unwrap(),
        pkg::conffile_text("2.0")
    );
    assert_eq!(host.snapshot("backup"), backup_before);
}

/// The derived scope is exactly what the install needs: a `%post` that
/// writes elsewhere is denied by the kernel and reported (rpm itself exits
/// 0 after a failed `%post`: the denials are what halts a rollout), and
/// the write did not happen.
#[test]
fn an_rpm_scriptlet_writing_outside_the_derived_scope_is_denied_and_reported() {
    let _db = pkg::lock();
    let _cleanup = Cleanup { rpm: true };
    let keys = Keys::new(&["alice"]);
    let (host, out) = host_with_v1(&keys);
    let backup = host.root().join("backup");
    let evil = pkg::build_rpm(
        &out,
        "2.0",
        &Variant {
            // Listing every directory is granted to an rpm install's
            // run, reading a protected file never (the agent's policy),
            // and a protected tree lists nothing (it is covered).
            postinst: format!(
                "cat {} > {LEAK} || :\nls -A {} > {LISTING} || :\necho pwned > {}/evil || :\necho pwned > {} || exit 1\n",
                host.policy().display(),
                backup.display(),
                backup.display(),
                pkg::EVIL
            ),
            ..quiet()
        },
    );
    let bundle = signed_bundle(&host, &keys, "rpm-evil", &evil);
    let backup_before = host.snapshot("backup");
    let (report, code) = host.run(&bundle);
    // rpm exits 0 after a failed %post; the denials are the answer.
    assert_eq!(code, 1, "a run with denials is exit 1: {report:#}");
    let denials = report["denials"]
        .as_array()
        .expect("denials are known here");
    assert!(report["denial_count"].as_u64().unwrap() >= 3, "{report:#}");
    assert!(
        denials.iter().any(|d| d["path"]
            .as_str()
            .is_some_and(|p| p.starts_with(backup.to_str().unwrap()))),
        "{report:#}"
    );
    assert!(
        denials.iter().any(|d| d["path"] == "/etc/"),
        "the write into /etc is named: {report:#}"
    );
    assert!(
        denials
            .iter()
            .any(|d| d["access"] == "fs.read_file" && d["path"].as_str() == host.policy().to_str()),
        "reading the agent's policy is denied and named: {report:#}"
    );
    assert!(!Path::new(pkg::EVIL).exists());
    assert_eq!(host.snapshot("backup"), backup_before);
    assert_eq!(
        fs::read(LEAK).unwrap(),
        b"",
        "nothing of the policy was read"
    );
    assert_eq!(
        fs::read(LISTING).unwrap(),
        b"",
        "the protected tree lists nothing"
    );
}

/// Where the `%post` above writes what it could read of the agent's
/// policy, and of the protected tree's listing (in the package's scope).
const LEAK: &str = "/etc/rgpkgtest/leak";
const LISTING: &str = "/etc/rgpkgtest/listing";

/// A `%post`'s `systemctl try-restart`, with rpm's own scriptlet PATH:
/// captured by the sandbox's shim, not performed; the unit is outside this
/// host's `[services] allow`, so it is a denial and the run fails (rpm
/// itself installed v2).
#[test]
fn an_rpm_scriptlets_service_request_is_captured() {
    let _db = pkg::lock();
    let _cleanup = Cleanup { rpm: true };
    let keys = Keys::new(&["alice"]);
    let (host, out) = host_with_v1(&keys);
    let v2 = pkg::build_rpm(&out, "2.0", &Variant::default());
    let bundle = signed_bundle(&host, &keys, "rpm-restart", &v2);
    let (report, _) = host.run(&bundle);
    assert_eq!(report["status"], "failed", "{report:#}");
    assert_eq!(
        report["services_captured"][0]["unit"], "rgpkgtest.service",
        "{report:#}"
    );
    assert_eq!(
        report["services_captured"][0]["disposition"], "denied",
        "{report:#}"
    );
    let denials = report["denials"].as_array().unwrap();
    assert!(
        denials
            .iter()
            .any(|d| d["access"] == "service.try-restart" && d["path"] == "rgpkgtest.service"),
        "{report:#}"
    );
    // Not the real systemctl: no socket was tried.
    assert!(
        !denials.iter().any(|d| d["access"] == "syscall.socket"),
        "{report:#}"
    );
    assert_eq!(pkg::rpm_version().as_deref(), Some("2.0-1"));
}
