//! `[packages]` with real .deb files: v1 installed bare into this machine's
//! dpkg database, v2 through a signed bundle run by `rollguard-agent run`,
//! dpkg and the maintainer scripts confined. Purged afterwards. Needs root.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use rollguard_tests::host::{disk, Host, Keys};
use rollguard_tests::packages::{self as pkg, Cleanup, Variant};
use rollguard_tests::{rollguard, run_ok};
use serde_json::{json, Value};

fn sign(bundle: &Path, keys: &Keys) {
    run_ok(
        rollguard()
            .args(["bundle", "sign"])
            .arg(bundle)
            .arg("--key")
            .arg(keys.key("alice"))
            .args(["--signer", "alice"]),
    );
}

/// One test's turn at this machine's dpkg database: the lock, held until
/// the test package is purged (fields drop in order, the purge first).
struct Turn {
    _cleanup: Cleanup,
    _db: std::sync::MutexGuard<'static, ()>,
}

/// What every test here starts with: its turn at the database, alice's
/// key, the test host, and a directory for the packages it builds.
fn setup() -> (Turn, Keys, Host, PathBuf) {
    let db = pkg::lock();
    // Left by a test killed before its cleanup: every deb run would fail.
    let _ = fs::remove_file(STRAY_JOURNAL_ENTRY);
    let turn = Turn {
        _cleanup: Cleanup { rpm: false },
        _db: db,
    };
    let keys = Keys::new(&["alice"]);
    let host = pkg::host(&keys);
    let out = host.root().join("debs");
    fs::create_dir_all(&out).unwrap();
    (turn, keys, host, out)
}

fn install_bare(deb: &Path) {
    run_ok(Command::new("dpkg").arg("-i").arg(deb));
}

/// A bundle installing `deb`, built and signed; the build's warnings.
fn bundle(
    host: &Host,
    keys: &Keys,
    label: &str,
    version: u64,
    deb: &Path,
) -> (std::path::PathBuf, String) {
    let src = pkg::bundle_source(host, label, version, deb);
    let (bundle, warnings) = pkg::build_bundle(&src);
    sign(&bundle, keys);
    (bundle, warnings)
}

/// The package without its postinst's restart request (see
/// [`Variant::no_service_request`]).
fn quiet() -> Variant {
    Variant {
        no_service_request: true,
        ..Variant::default()
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// Every expected denial has one of the documented reasons (and they are
/// shown, not dropped).
fn assert_expected_denials_are_typed(report: &Value) {
    for d in report["expected_denials"].as_array().into_iter().flatten() {
        let reason = d["reason"].as_str().unwrap();
        assert!(
            [
                "glibc-nscd-probe",
                "dpkg-new-cleanup",
                "deb-systemd-helper-cleanup"
            ]
            .contains(&reason),
            "{report:#}"
        );
    }
}

/// The evil postinst's write into `/etc` (by its shell) is denied and
/// named.
fn assert_postinst_write_into_etc_denied(report: &Value) {
    let denials = report["denials"]
        .as_array()
        .expect("denials are known here");
    assert!(
        denials
            .iter()
            .any(|d| d["path"] == "/etc/" && d["exe"].as_str().is_some_and(|e| e.ends_with("sh"))),
        "{report:#}"
    );
}

#[test]
fn a_signed_bundle_upgrades_a_package_inside_its_derived_scope() {
    let (_turn, keys, host, out) = setup();
    let v1 = pkg::build_deb(&out, "1.0", &quiet());
    let v2 = pkg::build_deb(&out, "2.0", &quiet());
    install_bare(&v1);
    assert_eq!(pkg::dpkg_status().unwrap().0, "1.0");

    let (bundle, warnings) = bundle(&host, &keys, "up", 1, &v2);
    assert_eq!(warnings, "", "no build warnings for this package");

    // The signed manifest carries the derived scope: the package's
    // directories, the database, dpkg's log; nothing else.
    let inspected = pkg::inspect(&bundle);
    let p = &inspected["packages"];
    assert_eq!(p["kind"], "deb");
    assert_eq!(p["database"], "/var/lib/dpkg");
    assert_eq!(
        p["install"],
        json!([{ "file": "pkgs/rgpkgtest_2.0_all.deb", "name": "rgpkgtest", "version": "2.0" }])
    );
    assert_eq!(
        strings(&p["write"]),
        [
            "/etc/rgpkgtest",
            "/usr/lib/rgpkgtest",
            "/var/lib/dpkg",
            "/var/log/dpkg.log"
        ]
    );
    assert_eq!(
        strings(&p["delete"]),
        ["/etc/rgpkgtest", "/usr/lib/rgpkgtest", "/var/lib/dpkg"]
    );
    assert_eq!(
        inspected["scope"]["write"],
        json!([]),
        "the author's scope stays apart"
    );
    assert_eq!(inspected["run"]["command"], json!([]));
    let text = run_ok(rollguard().args(["bundle", "inspect"]).arg(&bundle));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("derived from the packages"), "{text}");
    assert!(text.contains("rgpkgtest 2.0"), "{text}");

    // The administrator changed the conffile: --force-confold keeps it.
    fs::write(pkg::CONFFILE, "setting = local\n").unwrap();
    let backup_before = host.snapshot("backup");

    let (report, code) = host.run(&bundle);
    assert_eq!(report["status"], "succeeded", "{report:#}");
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["denials"], json!([]), "{report:#}");
    assert_eq!(report["denial_count"], 0, "{report:#}");
    assert_expected_denials_are_typed(&report);
    assert_eq!(
        report["packages"],
        json!([{ "manager": "dpkg", "name": "rgpkgtest", "version": "2.0", "before": "1.0", "after": "2.0" }]),
        "{report:#}"
    );
    let (version, status) = pkg::dpkg_status().unwrap();
    assert_eq!(
        (version.as_str(), status.as_str()),
        ("2.0", "install ok installed")
    );
    assert_eq!(
        fs::read_to_string(pkg::PROGRAM).unwrap(),
        "#!/bin/sh\necho rgpkgtest 2.0\nexec sleep infinity\n"
    );
    assert!(fs::read_to_string(pkg::UNIT)
        .unwrap()
        .contains("package 2.0"));
    assert_eq!(
        fs::read_to_string(pkg::CONFFILE).unwrap(),
        "setting = local\n"
    );
    assert_eq!(
        fs::read_to_string(format!("{}.dpkg-dist", pkg::CONFFILE)).unwrap(),
        pkg::conffile_text("2.0")
    );
    assert_eq!(host.snapshot("backup"), backup_before);
}

#[test]
fn a_maintainer_script_writing_outside_the_derived_scope_is_denied_and_reported() {
    let (_turn, keys, host, out) = setup();
    let backup = host.root().join("backup");
    let v1 = pkg::build_deb(&out, "1.0", &Variant::default());
    let evil = pkg::build_deb(
        &out,
        "2.0",
        &Variant {
            // Into the operator-protected backup (allowed to fail), then
            // into /etc (fails the postinst).
            // Also lists `/`: only an rpm install's run may (see
            // packages_rpm.rs), a dpkg run is refused and it is reported.
            postinst: format!(
                "  ls / > /dev/null 2>&1 || true\n  echo pwned > {}/evil || true\n  echo pwned > {}\n",
                backup.display(),
                pkg::EVIL,
            ),
            ..Variant::default()
        },
    );
    install_bare(&v1);
    let backup_before = host.snapshot("backup");
    let etc_before: Vec<_> = fs::read_dir("/etc")
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();

    let (bundle, _) = bundle(&host, &keys, "evil", 1, &evil);
    // The derived scope is the same as the honest v2's: a script's writes
    // are not facts of the package.
    let write = strings(&pkg::inspect(&bundle)["packages"]["write"]);
    assert_eq!(
        write,
        [
            "/etc/rgpkgtest",
            "/usr/lib/rgpkgtest",
            "/var/lib/dpkg",
            "/var/log/dpkg.log"
        ]
    );

    let (report, code) = host.run(&bundle);
    assert_eq!(report["status"], "failed", "{report:#}");
    assert_ne!(code, 0);
    let denials = report["denials"]
        .as_array()
        .expect("denials are known here");
    assert!(!denials.is_empty(), "{report:#}");
    assert!(report["denial_count"].as_u64().unwrap() > 0, "{report:#}");
    // The write into the protected backup and the one into /etc, each
    // refused by the kernel and named.
    assert!(
        denials.iter().any(|d| d["path"]
            .as_str()
            .is_some_and(|p| p.starts_with(host.root().join("backup").to_str().unwrap()))),
        "{report:#}"
    );
    assert_postinst_write_into_etc_denied(&report);
    assert!(
        denials.contains(&json!({ "access": "fs.read_dir", "path": "/", "exe": "/usr/bin/ls" })),
        "{report:#}"
    );
    assert_expected_denials_are_typed(&report);
    // The postinst failed, so dpkg left the package half-configured, and
    // the report says so.
    assert_eq!(
        report["packages"][0]["state"], "half-configured",
        "{report:#}"
    );
    assert!(
        report["reason"]
            .as_str()
            .unwrap()
            .contains("half-configured"),
        "{report:#}"
    );
    assert!(
        !Path::new(pkg::EVIL).exists(),
        "the write outside the scope must not happen"
    );
    assert_eq!(host.snapshot("backup"), backup_before);
    let etc_after: Vec<_> = fs::read_dir("/etc")
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(etc_before.len(), etc_after.len());
}

#[test]
fn a_fresh_install_gets_its_missing_directories_and_nothing_runs_twice() {
    let (_turn, keys, host, out) = setup();
    let v2 = pkg::build_deb(&out, "2.0", &quiet());
    assert!(!Path::new("/etc/rgpkgtest").exists());

    let (bundle, _) = bundle(&host, &keys, "fresh", 1, &v2);
    let (report, _) = host.run(&bundle);
    assert_eq!(report["status"], "succeeded", "{report:#}");
    assert_eq!(report["denials"], json!([]), "{report:#}");
    assert_eq!(report["packages"][0]["before"], Value::Null, "{report:#}");
    assert_eq!(report["packages"][0]["after"], "2.0", "{report:#}");
    for dir in ["/etc/rgpkgtest", "/usr/lib/rgpkgtest"] {
        let m = fs::metadata(dir).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o755, "{dir}");
    }
    assert_eq!(
        fs::read_to_string(pkg::CONFFILE).unwrap(),
        pkg::conffile_text("2.0")
    );

    // The same bundle again: rollback protection refuses it before dpkg runs.
    let (again, _) = host.run(&bundle);
    assert_eq!(again["status"], "refused", "{again:#}");
    assert_eq!(again["refusal"], "rollback", "{again:#}");
}

/// A package writing into a systemd unit directory, where the agent's own
/// unit lives: warned at build. On this machine no agent unit is installed
/// there, and the agent does not make one up (only its missing drop-in
/// directories become empty placeholders), so the pin cannot be mounted
/// and the run is refused before anything runs. With the agent's unit in
/// place the same package installs (tests/tests/fleet_host.rs).
#[test]
fn a_package_writing_into_the_agents_unit_directory_is_refused() {
    let (_turn, keys, host, out) = setup();
    let v1 = pkg::build_deb(&out, "1.0", &Variant::default());
    let v2 = pkg::build_deb(
        &out,
        "2.0",
        &Variant {
            unit_in_systemd_dir: true,
            ..Variant::default()
        },
    );
    install_bare(&v1);

    let (bundle, warnings) = bundle(&host, &keys, "unit", 1, &v2);
    assert!(
        warnings.contains("/lib/systemd/system")
            && warnings.contains("agents protect their own unit"),
        "{warnings}"
    );
    let (report, code) = host.run(&bundle);
    assert_eq!(report["status"], "refused", "{report:#}");
    assert_eq!(report["refusal"], "protected_path", "{report:#}");
    assert_eq!(code, 2, "{report:#}");
    assert_eq!(pkg::dpkg_status().unwrap().0, "1.0");
    assert!(!Path::new("/lib/systemd/system/rgpkgtest.service").exists());
}

/// The files an upgrade replaced, as the agent computes them for the
/// stale-services scan: every file v1 owned that is another inode (or gone)
/// after the upgrade; directories never.
#[test]
fn the_replaced_files_are_those_the_upgrade_swapped() {
    use rollguard_agent::packages::Snapshot;
    use rollguard_shared::manifest::packages::PackageToken;
    use rollguard_shared::manifest::{DerivedPackage, PackageKind, Packages, PayloadPath};
    use rollguard_shared::ScopePath;

    // The host only for its directory (kept alive with it).
    let (_turn, _keys, _host, out) = setup();
    // With a file beneath `/lib`: named as processes map it, through its
    // real directory (`/usr/lib` on a merged-/usr host).
    let lib = Variant {
        lib_file: true,
        ..Variant::default()
    };
    let v1 = pkg::build_deb(&out, "1.0", &lib);
    let v2 = pkg::build_deb(&out, "2.0", &lib);
    install_bare(&v1);
    let packages = Packages {
        kind: PackageKind::Deb,
        install: vec![DerivedPackage {
            file: PayloadPath::parse("pkgs/rgpkgtest_2.0_all.deb").unwrap(),
            name: PackageToken::parse(pkg::NAME).unwrap(),
            version: PackageToken::parse("2.0").unwrap(),
        }],
        database: ScopePath::parse("/var/lib/dpkg").unwrap(),
        write: vec![],
        delete: vec![],
    };
    let before = Snapshot::take(&packages);
    install_bare(&v2);
    let outcome = before.finish(&packages);
    let replaced: Vec<_> = outcome
        .replaced
        .iter()
        .map(|p| p.to_str().unwrap())
        .collect();
    let lib_file = Path::new(pkg::LIB_FILE);
    let mapped = fs::canonicalize(lib_file.parent().unwrap())
        .unwrap()
        .join(lib_file.file_name().unwrap());
    let mut expected = vec![
        pkg::CONFFILE,
        pkg::PROGRAM,
        pkg::UNIT,
        mapped.to_str().unwrap(),
    ];
    expected.sort_by(|a, b| Path::new(a).cmp(Path::new(b)));
    assert_eq!(replaced, expected);
    assert_eq!(outcome.mismatch, None);
    assert_eq!(outcome.changes[0].before.as_deref(), Some("1.0"));
    assert_eq!(outcome.changes[0].after.as_deref(), Some("2.0"));
}

/// A file in dpkg's journal directory that dpkg does not write (its
/// entries are named by digits) and ignores, which the agent's direct
/// read declines.
const STRAY_JOURNAL_ENTRY: &str = "/var/lib/dpkg/updates/rollguard-test-stray";

/// Removes a file when dropped (also when the test panics).
struct RemoveOnDrop(&'static str);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(self.0);
    }
}

/// After the run the agent reads dpkg's database only directly. When that
/// read declines (here: an entry the postinst leaves in dpkg's journal
/// directory, which dpkg itself ignores), the packages' state is unknown
/// and the run fails, instead of dpkg-query being run, as root and outside
/// the sandbox, on a database (and, where the scope holds them, with a
/// program and libraries) the run could have changed.
#[test]
fn after_the_run_a_database_the_direct_read_declines_is_unknown_not_queried() {
    let (_turn, keys, host, out) = setup();
    // Dropped before the turn (declared after it): gone before the purge.
    let stray = RemoveOnDrop(STRAY_JOURNAL_ENTRY);
    let v1 = pkg::build_deb(&out, "1.0", &quiet());
    let v2 = pkg::build_deb(
        &out,
        "2.0",
        &Variant {
            postinst: format!("  touch {}\n", stray.0),
            ..quiet()
        },
    );
    install_bare(&v1);
    let (bundle, _) = bundle(&host, &keys, "stray", 1, &v2);
    let (report, _) = host.run(&bundle);
    assert!(Path::new(stray.0).exists(), "{report:#}");
    assert_eq!(report["status"], "failed", "{report:#}");
    let reason = report["reason"].as_str().unwrap();
    assert!(
        reason.contains("rgpkgtest is unknown after the run"),
        "{report:#}"
    );
    let error = report["packages"][0]["error"].as_str().unwrap();
    assert!(error.contains("does not run dpkg-query"), "{report:#}");
    assert_eq!(report["packages"][0]["after"], Value::Null, "{report:#}");
}

/// A package naming `/lib/...` (as most Debian 12 packages still do) on a
/// merged-/usr host, where `/lib` is a symlink: the signed scope says
/// `/lib/rgpkgtest-lib`, the agent enforces its real path.
#[test]
fn a_package_under_a_merged_usr_alias_installs_through_its_real_path() {
    let (_turn, keys, host, out) = setup();
    let lib = Variant {
        lib_file: true,
        ..quiet()
    };
    let v1 = pkg::build_deb(&out, "1.0", &lib);
    let v2 = pkg::build_deb(&out, "2.0", &lib);
    install_bare(&v1);

    let (bundle, _) = bundle(&host, &keys, "lib", 1, &v2);
    let write = strings(&pkg::inspect(&bundle)["packages"]["write"]);
    assert!(
        write.contains(&"/lib/rgpkgtest-lib".to_string()),
        "{write:?}"
    );
    let (report, _) = host.run(&bundle);
    assert_eq!(report["status"], "succeeded", "{report:#}");
    assert_eq!(report["denials"], json!([]), "{report:#}");
    assert_expected_denials_are_typed(&report);
    assert_eq!(fs::read_to_string(pkg::LIB_FILE).unwrap(), "plugin 2.0\n");
}

/// The postinst's `deb-systemd-invoke restart` of a unit the host's
/// `[services] allow` does not list: captured inside the sandbox, not
/// performed, reported as a denial with the unit, and the run fails (the
/// controller halts on it).
#[test]
fn a_postinst_restart_of_a_unit_the_host_does_not_allow_is_a_denial() {
    let (_turn, keys, host, out) = setup();
    let v1 = pkg::build_deb(&out, "1.0", &quiet());
    let v2 = pkg::build_deb(&out, "2.0", &Variant::default());
    install_bare(&v1);

    let (bundle, _) = bundle(&host, &keys, "asks", 1, &v2);
    let (report, code) = host.run(&bundle);
    assert_eq!(report["status"], "failed", "{report:#}");
    assert_ne!(code, 0, "{report:#}");
    assert_eq!(
        report["denials"],
        json!([{ "access": "service.restart", "exe": "deb-systemd-invoke", "path": "rgpkgtest.service" }]),
        "{report:#}"
    );
    assert_eq!(
        report["services_captured"][0]["disposition"], "denied",
        "{report:#}"
    );
    assert!(
        report["services"].as_array().is_none_or(|a| a.is_empty()),
        "nothing performed: {report:#}"
    );
}

/// A service package as debhelper builds it calls `deb-systemd-helper`,
/// which rewrites its state in `/var/lib/systemd/deb-systemd-helper-enabled`
/// on every upgrade: that directory is derived (write and delete), and
/// nothing else of systemd's. The upgrade itself, on a real systemd with
/// the unit enabled, is `fleet_host.rs`'s patch step.
#[test]
fn a_service_package_gets_the_unit_enablement_state_in_its_scope() {
    let keys = Keys::new(&["alice"]);
    let host = pkg::host(&keys);
    let out = host.root().join("debs");
    fs::create_dir_all(&out).unwrap();
    let service = Variant {
        unit_in_systemd_dir: true,
        systemd_helper: true,
        ..quiet()
    };
    let deb = pkg::build_deb(&out, "2.0", &service);
    let (built, _) = bundle(&host, &keys, "dsh", 1, &deb);
    let p = &pkg::inspect(&built)["packages"];
    let state = "/var/lib/systemd/deb-systemd-helper-enabled".to_string();
    assert!(strings(&p["write"]).contains(&state), "{p:#}");
    assert!(strings(&p["delete"]).contains(&state), "{p:#}");
    // Its unit's `WantedBy=multi-user.target`: where `enable` links it,
    // to write only (a link is made, none removed), and nothing else of
    // /etc/systemd.
    let under_etc_systemd = |key: &str| -> Vec<String> {
        strings(&p[key])
            .into_iter()
            .filter(|w| w.starts_with("/etc/systemd"))
            .collect()
    };
    assert_eq!(
        under_etc_systemd("write"),
        ["/etc/systemd/system/multi-user.target.wants"],
        "{p:#}"
    );
    assert!(under_etc_systemd("delete").is_empty(), "{p:#}");
    // Without the helper in its scripts, the directory is not derived.
    let plain = pkg::build_deb(&out, "2.1", &quiet());
    let (built, _) = bundle(&host, &keys, "plain", 1, &plain);
    let p = &pkg::inspect(&built)["packages"];
    assert!(!strings(&p["write"]).contains(&state), "{p:#}");
}

/// What [`a_first_install_enables_its_unit_and_leaves_the_agents_link`]
/// puts on this machine as a packaged agent's host has it (the agent's
/// unit, its enablement link), removed again with what the run made (the
/// drop-in directories the agent creates empty to pin them, the test
/// package's enablement, a directory that was missing), whatever happens.
struct AgentUnitOnThisMachine {
    /// Directories that did not exist before, deepest last.
    made_dirs: Vec<PathBuf>,
}

const VENDOR_UNITS: &str = "/usr/lib/systemd/system";
const MULTI_USER_WANTS: &str = "/etc/systemd/system/multi-user.target.wants";
const DSH_STATE: &str = "/var/lib/systemd/deb-systemd-helper-enabled";

fn agent_unit() -> PathBuf {
    Path::new(VENDOR_UNITS).join("rollguard-agent.service")
}

fn agent_link() -> PathBuf {
    Path::new(MULTI_USER_WANTS).join("rollguard-agent.service")
}

impl AgentUnitOnThisMachine {
    fn install() -> Self {
        for path in [agent_unit(), agent_link()] {
            assert!(
                fs::symlink_metadata(&path).is_err(),
                "{} exists on this machine: the test would change it",
                path.display()
            );
        }
        let made_dirs = [
            MULTI_USER_WANTS.to_string(),
            DSH_STATE.to_string(),
            format!("{DSH_STATE}/multi-user.target.wants"),
            format!("{VENDOR_UNITS}/rollguard-agent.service.d"),
            format!("{VENDOR_UNITS}/rollguard-.service.d"),
            format!("{VENDOR_UNITS}/service.d"),
        ]
        .into_iter()
        .map(PathBuf::from)
        .filter(|d| fs::symlink_metadata(d).is_err())
        .collect();
        // Made before anything is created, so a failure below cleans up.
        let guard = AgentUnitOnThisMachine { made_dirs };
        fs::create_dir_all(MULTI_USER_WANTS).unwrap();
        fs::write(
            agent_unit(),
            "[Service]\nExecStart=/bin/true\n\n[Install]\nWantedBy=multi-user.target\n",
        )
        .unwrap();
        std::os::unix::fs::symlink(agent_unit(), agent_link()).unwrap();
        guard
    }
}

impl Drop for AgentUnitOnThisMachine {
    fn drop(&mut self) {
        // The package first: its postrm's `deb-systemd-helper purge`
        // removes its link by the helper's state. Then what the purge
        // should have removed, in case it could not run.
        let purged = Command::new("dpkg")
            .args(["--purge", pkg::NAME])
            .status()
            .is_ok_and(|s| s.success());
        if !purged {
            eprintln!(
                "could not purge {}; removing its enablement by hand",
                pkg::NAME
            );
        }
        for file in [
            agent_link(),
            agent_unit(),
            Path::new(MULTI_USER_WANTS).join("rgpkgtest.service"),
            Path::new(DSH_STATE).join("rgpkgtest.service.dsh-also"),
            Path::new(DSH_STATE).join("multi-user.target.wants/rgpkgtest.service"),
        ] {
            let _ = fs::remove_file(file);
        }
        // Only if empty: anything else put there meanwhile stays.
        for dir in self.made_dirs.iter().rev() {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// A first install of a service package as debhelper builds it: the
/// postinst's `deb-systemd-helper enable` links the unit into
/// `multi-user.target.wants`, which the build derived from the unit's
/// `WantedBy=`; the run succeeds with no denial. The agent's own link in
/// that directory is pinned as a link, and stays.
#[test]
fn a_first_install_enables_its_unit_and_leaves_the_agents_link() {
    let (_turn, keys, host, out) = setup();
    let _agent_unit = AgentUnitOnThisMachine::install();
    let policy = fs::read_to_string(host.policy()).unwrap().replace(
        "allow_scopes = [",
        "allow_scopes = [\"/var/lib/systemd/deb-systemd-helper-enabled\", ",
    );
    fs::write(host.policy(), policy).unwrap();
    let service = Variant {
        unit_in_systemd_dir: true,
        systemd_helper: true,
        ..quiet()
    };
    let deb = pkg::build_deb(&out, "1.0", &service);
    assert!(pkg::dpkg_status().is_none(), "a first install");
    let (bundle, _) = bundle(&host, &keys, "first", 1, &deb);
    let (report, code) = host.run(&bundle);
    assert_eq!(report["status"], "succeeded", "{report:#}");
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["denials"], json!([]), "{report:#}");
    assert_expected_denials_are_typed(&report);
    assert_eq!(pkg::dpkg_status().unwrap().0, "1.0");
    let enabled = Path::new(MULTI_USER_WANTS).join("rgpkgtest.service");
    assert_eq!(
        fs::read_link(&enabled).ok(),
        Some(PathBuf::from("/lib/systemd/system/rgpkgtest.service")),
        "the unit was not enabled"
    );
    assert_eq!(
        fs::read_link(agent_link()).ok(),
        Some(agent_unit()),
        "the agent's link changed"
    );
}

/// The derived scope on disk: every path of it with its type, mode,
/// owner, size, times and bytes.
fn derived_on_disk(
) -> Vec<std::collections::BTreeMap<std::path::PathBuf, rollguard_tests::host::Stamp>> {
    [
        "/etc/rgpkgtest",
        "/usr/lib/rgpkgtest",
        "/var/lib/dpkg",
        "/var/log/dpkg.log",
    ]
    .iter()
    .map(|p| disk(Path::new(p)))
    .collect()
}

/// `rollguard-agent run --preview` of a `[packages]` bundle: dpkg and the
/// maintainer scripts run for real against overlays of the derived scope;
/// the report says what the install would change (files and database) and
/// which versions it would leave, the same denials as a real run, and
/// nothing reaches the disk.
#[test]
fn a_preview_of_an_upgrade_reports_what_dpkg_would_change_and_changes_nothing() {
    let (_turn, keys, host, out) = setup();
    let v1 = pkg::build_deb(&out, "1.0", &quiet());
    let v2 = pkg::build_deb(&out, "2.0", &quiet());

    // A first install needs directories this host lacks, which only a real
    // run creates: its preview is refused, and creates nothing.
    let (fresh, _) = bundle(&host, &keys, "fresh", 1, &v1);
    let (report, code) = host.preview(&fresh);
    assert_eq!(report["status"], "refused", "{report:#}");
    assert_eq!(code, 2, "{report:#}");
    let reason = report["reason"].as_str().unwrap();
    assert!(
        reason.contains("a preview cannot create") && reason.contains("/etc/rgpkgtest"),
        "{report:#}"
    );
    assert!(!Path::new("/etc/rgpkgtest").exists());
    assert!(!Path::new("/usr/lib/rgpkgtest").exists());

    install_bare(&v1);
    let on_disk = derived_on_disk();
    let (up, _) = bundle(&host, &keys, "up", 2, &v2);
    let (report, code) = host.preview(&up);
    assert_eq!(report["status"], "succeeded", "{report:#}");
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["denials"], json!([]), "{report:#}");
    assert_expected_denials_are_typed(&report);
    // The versions as the preview's own database has them.
    assert_eq!(
        report["packages"],
        json!([{ "manager": "dpkg", "name": "rgpkgtest", "version": "2.0", "before": "1.0", "after": "2.0" }]),
        "{report:#}"
    );
    let preview = &report["preview"];
    assert_eq!(preview["complete"], true, "{report:#}");
    let changed: Vec<(&str, &str)> = preview["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["change"].as_str().unwrap(), c["path"].as_str().unwrap()))
        .collect();
    for wanted in [
        ("modified", pkg::PROGRAM),
        ("modified", pkg::CONFFILE),
        ("modified", "/var/lib/dpkg/status"),
        ("modified", "/var/log/dpkg.log"),
    ] {
        assert!(changed.contains(&wanted), "{wanted:?} not in {changed:#?}");
    }
    let program = preview["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["path"] == pkg::PROGRAM)
        .unwrap();
    assert!(
        program["diff"]
            .as_str()
            .is_some_and(|d| d.contains("+echo rgpkgtest 2.0")),
        "{report:#}"
    );
    // Nothing reached the disk, and the version is not used up.
    assert_eq!(derived_on_disk(), on_disk, "the preview changed the disk");
    assert_eq!(pkg::dpkg_status().unwrap().0, "1.0");
    let (real, _) = host.run(&up);
    assert_eq!(real["status"], "succeeded", "{real:#}");
    assert_eq!(real["packages"], report["packages"], "{real:#}");
    assert_eq!(pkg::dpkg_status().unwrap().0, "2.0");
}

/// A preview of the package whose maintainer script writes outside the
/// derived scope: the same denial and the same failed install as the real
/// run reports (a_maintainer_script_writing_outside_the_derived_scope...),
/// and nothing changed.
#[test]
fn a_preview_of_a_maintainer_script_writing_outside_its_scope_reports_the_denial() {
    let (_turn, keys, host, out) = setup();
    let v1 = pkg::build_deb(&out, "1.0", &quiet());
    let evil = pkg::build_deb(
        &out,
        "2.0",
        &Variant {
            postinst: format!("  echo pwned > {}\n", pkg::EVIL),
            ..quiet()
        },
    );
    install_bare(&v1);
    let on_disk = derived_on_disk();
    let (bundle, _) = bundle(&host, &keys, "evil", 1, &evil);
    let (report, code) = host.preview(&bundle);
    assert_eq!(report["status"], "failed", "{report:#}");
    assert_ne!(code, 0);
    assert_postinst_write_into_etc_denied(&report);
    // The failed postinst leaves the preview's database half-configured,
    // as the real run's would be.
    assert_eq!(
        report["packages"][0]["state"], "half-configured",
        "{report:#}"
    );
    assert!(!Path::new(pkg::EVIL).exists());
    assert_eq!(derived_on_disk(), on_disk, "the preview changed the disk");
    assert_eq!(pkg::dpkg_status().unwrap().0, "1.0");
}

/// A trigger the package activates in another package (here a file
/// trigger, as man-db's on `/usr/share/man`): dpkg runs with
/// `--no-triggers`, so it is recorded, not run in the sandbox, where its
/// write outside the derived scope would fail and leave the other package
/// half-configured. The run succeeds; the report names the package whose
/// triggers are pending; `dpkg --triggers-only --pending` runs them.
#[test]
fn triggers_in_other_packages_are_deferred_to_the_host_and_reported() {
    let (_turn, keys, host, out) = setup();
    let consumer = pkg::build_trigger_consumer(&out);
    let v1 = pkg::build_deb(&out, "1.0", &quiet());
    let v2 = pkg::build_deb(&out, "2.0", &quiet());
    install_bare(&consumer);
    install_bare(&v1);
    // Bare, dpkg ran the trigger at once.
    assert_eq!(
        fs::read_to_string(pkg::TRIGGER_RAN).unwrap(),
        "/usr/lib/rgpkgtest\n"
    );
    fs::remove_file(pkg::TRIGGER_RAN).unwrap();

    let (bundle, _) = bundle(&host, &keys, "trigger", 1, &v2);
    let (report, code) = host.run(&bundle);
    assert_eq!(report["status"], "succeeded", "{report:#}");
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["denials"], json!([]), "{report:#}");
    // Every package pending on the machine is listed; ours among them.
    assert!(
        strings(&report["triggers_pending"]).contains(&pkg::TRIGGER_CONSUMER.to_string()),
        "{report:#}"
    );
    // The package awaits the trigger (`interest`, not `-noawait`): it is
    // configured, and the report says so.
    assert_eq!(report["packages"][0]["after"], "2.0", "{report:#}");
    assert_eq!(
        report["packages"][0]["state"], "triggers-awaited",
        "{report:#}"
    );
    assert!(
        !Path::new(pkg::TRIGGER_RAN).exists(),
        "the trigger did not run in the sandbox"
    );

    // The host processes it: apt at the end of its runs, or by hand.
    run_ok(Command::new("dpkg").args(["--triggers-only", "--pending"]));
    assert_eq!(
        fs::read_to_string(pkg::TRIGGER_RAN).unwrap(),
        "/usr/lib/rgpkgtest\n"
    );
    assert_eq!(
        pkg::dpkg_status().unwrap(),
        ("2.0".to_string(), "install ok installed".to_string())
    );
}

/// A trigger one package of the bundle activates in another package of
/// the bundle is the bundle's own: run in the sandbox right after the
/// install (the consumer's postinst writes in its own directory, which the
/// derived scope grants), so both packages end installed. Triggers in
/// packages outside the bundle stay deferred (the test above).
///
/// A file trigger from unpacking one package into another being unpacked
/// in the same run is no trigger at all (its configure covers it), so the
/// second package's postinst activates an explicit trigger after dpkg
/// configured the first: the consumer is left `triggers-pending`.
#[test]
fn a_trigger_between_two_packages_of_the_bundle_runs_in_the_sandbox() {
    let (_turn, keys, host, out) = setup();
    let consumer = pkg::build_trigger_consumer(&out);
    let v1 = pkg::build_deb(&out, "1.0", &quiet());
    let v2 = pkg::build_deb(
        &out,
        "2.0",
        &Variant {
            postinst: format!("  dpkg-trigger --no-await {}", pkg::TRIGGER_NAME),
            ..quiet()
        },
    );
    install_bare(&v1);
    let _ = fs::remove_file(pkg::TRIGGER_RAN);

    let src = pkg::bundle_source_of(&host, "own-trigger", 1, &[&consumer, &v2]);
    let (bundle, _) = pkg::build_bundle(&src);
    sign(&bundle, &keys);
    let (report, code) = host.run(&bundle);
    assert_eq!(report["status"], "succeeded", "{report:#}");
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["denials"], json!([]), "{report:#}");
    for p in report["packages"].as_array().unwrap() {
        assert_eq!(p["after"], p["version"], "{report:#}");
        assert!(p.get("state").is_none(), "{report:#}");
    }
    // The consumer's trigger ran, inside the run.
    assert_eq!(
        fs::read_to_string(pkg::TRIGGER_RAN).unwrap(),
        format!("{}\n", pkg::TRIGGER_NAME)
    );
    // Nothing left pending on this machine (the field is left out).
    assert!(report.get("triggers_pending").is_none(), "{report:#}");
    assert_eq!(
        pkg::dpkg_status().unwrap(),
        ("2.0".to_string(), "install ok installed".to_string())
    );
    let o = run_ok(Command::new("dpkg-query").args([
        "--show",
        "--showformat=${Status}",
        pkg::TRIGGER_CONSUMER,
    ]));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "install ok installed");
}
