//! `[packages]` with real .rpm files: v1 installed bare into this machine's
//! rpm database, v2 through a signed bundle run by `rollguard-agent run`.
//! Removed afterwards. Needs root.
//!
//! rpm 4.18 (Debian 12) creates each file relative to directory descriptors
//! it opens from `/` down (`openat(-1, "/", O_RDONLY)`, then `etc`, ...):
//! opening a directory for reading needs Landlock's READ_DIR on it, and the
//! sandbox never grants READ_DIR on an ancestor of a read-protected path
//! (the agent's state directory and policy lie beneath `/`, `/etc`, `/var`),
//! because the grant would extend to the protected path. So rpm cannot
//! install inside the sandbox today: the test shows that the scope is
//! derived and signed, that rpm runs confined, and that its refused walk is
//! reported as a denial and changes nothing (docs/bundle-format.md).

use std::fs;
use std::path::Path;
use std::process::Command;

use rollguard_tests::packages::{self as pkg, Cleanup, Variant};
use rollguard_tests::{host::Keys, rollguard, run_ok};
use serde_json::json;

#[test]
fn an_rpm_install_is_confined_and_what_the_sandbox_refuses_is_reported() {
    let _db = pkg::lock();
    let _cleanup = Cleanup { rpm: true };
    let keys = Keys::new(&["alice"]);
    let host = pkg::host(&keys);
    let out = host.root().join("rpms");
    fs::create_dir_all(&out).unwrap();
    // Setup, bare: what a real rpm host's database already provides.
    let sh = pkg::build_sh_provider(&out);
    run_ok(Command::new("rpm").arg("-i").arg(&sh));
    let v1 = pkg::build_rpm(&out, "1.0", &Variant::default());
    let v2 = pkg::build_rpm(&out, "2.0", &Variant::default());
    run_ok(Command::new("rpm").arg("-i").arg(&v1));
    assert_eq!(pkg::rpm_version().as_deref(), Some("1.0-1"));

    let src = pkg::bundle_source(&host, "rpm", 1, &v2);
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

    // The derived scope: the package's directories and rpm's database.
    let dbpath = String::from_utf8(run_ok(Command::new("rpm").args(["-E", "%_dbpath"])).stdout)
        .unwrap()
        .trim()
        .to_string();
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

    let conffile_before = fs::read_to_string(pkg::CONFFILE).unwrap();
    let (report, code) = host.run(&bundle);
    assert_eq!(report["status"], "failed", "{report:#}");
    assert_ne!(code, 0);
    let denials = report["denials"]
        .as_array()
        .expect("denials are known here");
    assert!(
        denials.contains(&json!({ "access": "fs.read_dir", "path": "/", "exe": "/usr/bin/rpm" })),
        "{report:#}"
    );
    for d in report["expected_denials"].as_array().into_iter().flatten() {
        assert_eq!(d["reason"], "glibc-nscd-probe", "{report:#}");
        assert_eq!(d["exe"], "/usr/bin/rpm", "{report:#}");
    }
    assert_eq!(
        report["packages"],
        json!([{ "manager": "rpm", "name": "rgpkgtest", "version": "2.0-1", "before": "1.0-1", "after": "1.0-1" }]),
        "{report:#}"
    );
    assert!(
        report["reason"]
            .as_str()
            .unwrap()
            .contains("not 2.0-1 installed"),
        "{report:#}"
    );
    // Nothing changed: the database and the files are v1's.
    assert_eq!(pkg::rpm_version().as_deref(), Some("1.0-1"));
    assert_eq!(fs::read_to_string(pkg::CONFFILE).unwrap(), conffile_before);
    assert!(fs::read_to_string(pkg::PROGRAM).unwrap().contains("1.0"));
    assert!(!Path::new(pkg::EVIL).exists());
}
