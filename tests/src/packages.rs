//! Real test packages for the `[packages]` tests (tests/tests/packages_*.rs):
//! built with `dpkg-deb` and `rpmbuild`, installed into this machine's
//! package databases, removed again by [`Cleanup`].
//!
//! The package (`rgpkgtest`) ships a conffile (`/etc/rgpkgtest/rgpkgtest.conf`),
//! a program and a systemd unit (`/usr/lib/rgpkgtest/`), and a postinst
//! that asks for a restart (`deb-systemd-invoke restart`, rpm's %post
//! `systemctl try-restart`). By default the unit is shipped outside the
//! systemd load path: this machine has no agent unit in its unit
//! directories, and a package writing there is refused (the agent pins its
//! unit read-only inside such a scope, and cannot pin a unit file that is
//! missing; tested on its own). [`Variant::unit_in_systemd_dir`] ships it
//! in `/lib/systemd/system`, for hosts that run the packaged agent.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use crate::host::{Host, Keys};
use crate::{root_only, run, run_ok};

/// The test package's name.
pub const NAME: &str = "rgpkgtest";
/// Its conffile.
pub const CONFFILE: &str = "/etc/rgpkgtest/rgpkgtest.conf";
/// Its program.
pub const PROGRAM: &str = "/usr/lib/rgpkgtest/rgpkgtest-daemon";
/// Its unit (outside the systemd load path, see the module docs).
pub const UNIT: &str = "/usr/lib/rgpkgtest/rgpkgtest.service";
/// Where an evil maintainer script writes.
pub const EVIL: &str = "/etc/rgpkgtest-evil";

/// Tests touching the machine's package databases run one at a time.
static DATABASE: Mutex<()> = Mutex::new(());

pub fn lock() -> MutexGuard<'static, ()> {
    DATABASE.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a test package does beyond the plain one.
#[derive(Default, Clone)]
pub struct Variant {
    /// Extra shell lines for the postinst (`%post`).
    pub postinst: String,
    /// The postinst (`%post`) asks for no restart. For tests on this machine,
    /// whose PID 1 is not systemd: a captured request for an allowed unit
    /// could not be performed here, and one for a unit outside the host's
    /// `[services] allow` is a denial that fails the run (as it must; shown
    /// with a real systemd in services_run.rs and fleet_host.rs).
    pub no_service_request: bool,
    /// Ship the unit in /lib/systemd/system (where the agent's unit is).
    pub unit_in_systemd_dir: bool,
    /// Also ship [`LIB_FILE`], beneath `/lib` (a symlink to `usr/lib` on a
    /// merged-/usr host).
    pub lib_file: bool,
    /// An enabled service, as debhelper packages one: the unit has an
    /// `[Install]` section, the postinst runs `dh_installsystemd`'s snippet
    /// (`deb-systemd-helper` unmask, was-enabled, enable or update-state),
    /// the postrm its purge. Its unit must be where `deb-systemd-helper`
    /// looks ([`Variant::unit_in_systemd_dir`]).
    pub systemd_helper: bool,
}

/// `dh_installsystemd`'s postinst snippet (debhelper 13, Debian 12) for
/// the test unit.
fn systemd_helper_postinst() -> String {
    format!(
        "  deb-systemd-helper unmask '{NAME}.service' >/dev/null || true\n  \
         if deb-systemd-helper --quiet was-enabled '{NAME}.service'; then\n    \
         deb-systemd-helper enable '{NAME}.service' >/dev/null || true\n  \
         else\n    deb-systemd-helper update-state '{NAME}.service' >/dev/null || true\n  fi"
    )
}

/// A file beneath a merged-/usr alias.
pub const LIB_FILE: &str = "/lib/rgpkgtest-lib/plugin";

fn unit_text(version: &str, install: bool) -> String {
    format!(
        "[Unit]\nDescription=rollguard test package {version}\n\n[Service]\nExecStart={PROGRAM}\n{}",
        if install {
            "\n[Install]\nWantedBy=multi-user.target\n"
        } else {
            ""
        }
    )
}

fn program_text(version: &str) -> String {
    format!("#!/bin/sh\necho rgpkgtest {version}\nexec sleep infinity\n")
}

pub fn conffile_text(version: &str) -> String {
    format!("setting = {version}\n")
}

/// Build `rgpkgtest_VERSION_all.deb` in `out` with `dpkg-deb`.
pub fn build_deb(out: &Path, version: &str, variant: &Variant) -> PathBuf {
    let root = out.join(format!("deb-{version}-tree"));
    let _ = fs::remove_dir_all(&root);
    let write = |rel: &str, text: &str, mode: u32| write_in(&root, rel, text, mode);
    write(
        "DEBIAN/control",
        &format!("Package: {NAME}\nVersion: {version}\nArchitecture: all\nMaintainer: rollguard tests <tests@example.invalid>\nDescription: rollguard test package\n"),
        0o644,
    );
    write("DEBIAN/conffiles", &format!("{CONFFILE}\n"), 0o644);
    write(
        "DEBIAN/postinst",
        &format!(
            "#!/bin/sh\nset -e\nif [ \"$1\" = configure ]; then\n{}\n  {}\n{}\nfi\n",
            if variant.systemd_helper {
                systemd_helper_postinst()
            } else {
                "  :".to_string()
            },
            if variant.no_service_request {
                ":".to_string()
            } else {
                format!("deb-systemd-invoke restart {NAME}.service")
            },
            variant.postinst
        ),
        0o755,
    );
    if variant.systemd_helper {
        write(
            "DEBIAN/postrm",
            &format!(
                "#!/bin/sh\nset -e\nif [ \"$1\" = purge ]; then\n  deb-systemd-helper purge '{NAME}.service' >/dev/null || true\nfi\n"
            ),
            0o755,
        );
    }
    write(CONFFILE, &conffile_text(version), 0o644);
    write(PROGRAM, &program_text(version), 0o755);
    let unit = if variant.unit_in_systemd_dir {
        "/lib/systemd/system/rgpkgtest.service"
    } else {
        UNIT
    };
    write(unit, &unit_text(version, variant.systemd_helper), 0o644);
    if variant.lib_file {
        write(LIB_FILE, &format!("plugin {version}\n"), 0o644);
    }
    let deb = out.join(format!("{NAME}_{version}_all.deb"));
    dpkg_deb_build(&root, &deb);
    deb
}

/// Write `text` at `rel` (absolute or relative) beneath `root` with
/// `mode`, making the directories above it.
fn write_in(root: &Path, rel: &str, text: &str, mode: u32) {
    let p = root.join(rel.trim_start_matches('/'));
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, text).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
}

/// Build the package tree `root` into `deb`, its directories as packages
/// ship them (root:root 0755).
fn dpkg_deb_build(root: &Path, deb: &Path) {
    for dir in walk_dirs(root) {
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    run_ok(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zgzip", "--build"])
            .arg(root)
            .arg(deb),
    );
}

/// A package interested in a file trigger on the test package's
/// directory, as man-db is in `/usr/share/man` or libc-bin in `ldconfig`:
/// when it runs (`triggered`) its postinst appends to [`TRIGGER_RAN`],
/// outside the test package's derived scope. `interest` (not `-noawait`):
/// the package activating it awaits it.
pub fn build_trigger_consumer(out: &Path) -> PathBuf {
    let root = out.join("trigger-consumer-tree");
    let _ = fs::remove_dir_all(&root);
    let write = |rel: &str, text: &str, mode: u32| write_in(&root, rel, text, mode);
    write(
        "DEBIAN/control",
        &format!("Package: {TRIGGER_CONSUMER}\nVersion: 1.0\nArchitecture: all\nMaintainer: rollguard tests <tests@example.invalid>\nDescription: rollguard test trigger consumer\n"),
        0o644,
    );
    write(
        "DEBIAN/triggers",
        &format!("interest /usr/lib/rgpkgtest\ninterest-noawait {TRIGGER_NAME}\n"),
        0o644,
    );
    write(
        "DEBIAN/postinst",
        &format!("#!/bin/sh\nset -e\nif [ \"$1\" = triggered ]; then\n  echo \"$2\" >> {TRIGGER_RAN}\nfi\n"),
        0o755,
    );
    fs::create_dir_all(
        root.join(TRIGGER_RAN.trim_start_matches('/'))
            .parent()
            .unwrap(),
    )
    .unwrap();
    let deb = out.join(format!("{TRIGGER_CONSUMER}_1.0_all.deb"));
    dpkg_deb_build(&root, &deb);
    deb
}

/// The package [`build_trigger_consumer`] makes.
pub const TRIGGER_CONSUMER: &str = "rgpkgtest-trigger-consumer";
/// An explicit trigger it is interested in (besides the test package's
/// directory): `dpkg-trigger` in a postinst activates it.
pub const TRIGGER_NAME: &str = "rgpkgtest-trig";
/// Where its trigger writes when it runs.
pub const TRIGGER_RAN: &str = "/usr/lib/rgpkgtest-trigger/ran";

fn walk_dirs(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let d = out[i].clone();
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() && !p.ends_with("DEBIAN") {
                out.push(p);
            }
        }
        i += 1;
    }
    out
}

/// Build `rgpkgtest-VERSION-1.noarch.rpm` in `out` with `rpmbuild`.
pub fn build_rpm(out: &Path, version: &str, variant: &Variant) -> PathBuf {
    let top = out.join(format!("rpm-{version}-top"));
    let _ = fs::remove_dir_all(&top);
    fs::create_dir_all(&top).unwrap();
    let spec = top.join("rgpkgtest.spec");
    let esc = |s: &str| s.replace('%', "%%");
    fs::write(
        &spec,
        format!(
            "Name: {NAME}\nVersion: {version}\nRelease: 1\nSummary: rollguard test package\nLicense: MIT\nBuildArch: noarch\n\
             %description\nrollguard test package\n\
             %install\nmkdir -p %{{buildroot}}/etc/rgpkgtest %{{buildroot}}/usr/lib/rgpkgtest\n\
             cat > %{{buildroot}}{CONFFILE} <<'EOF'\n{}EOF\n\
             cat > %{{buildroot}}{PROGRAM} <<'EOF'\n{}EOF\nchmod 755 %{{buildroot}}{PROGRAM}\n\
             cat > %{{buildroot}}{UNIT} <<'EOF'\n{}EOF\n\
             %post\n{}{}\n\
             %files\n%dir /etc/rgpkgtest\n%config(noreplace) {CONFFILE}\n%dir /usr/lib/rgpkgtest\n{PROGRAM}\n{UNIT}\n",
            esc(&conffile_text(version)),
            esc(&program_text(version)),
            esc(&unit_text(version, false)),
            if variant.no_service_request {
                String::new()
            } else {
                format!("systemctl try-restart {NAME}.service || :\n")
            },
            variant.postinst
        ),
    )
    .unwrap();
    run_ok(
        Command::new("rpmbuild")
            .arg("-bb")
            .arg("--define")
            .arg(format!("_topdir {}", top.display()))
            .arg(&spec),
    );
    top.join(format!("RPMS/noarch/{NAME}-{version}-1.noarch.rpm"))
}

/// A tiny rpm that provides `/bin/sh`: this Debian machine's rpm database
/// is empty, and rpm adds `Requires(post): /bin/sh` to every package with
/// a scriptlet (a real rpm host's database has it). Installed bare, as
/// setup; never `--nodeps` in the agent.
pub fn build_sh_provider(out: &Path) -> PathBuf {
    let top = out.join("rpm-sh-top");
    fs::create_dir_all(&top).unwrap();
    let spec = top.join("sh.spec");
    fs::write(
        &spec,
        "Name: rgpkgtest-sh-provider\nVersion: 1\nRelease: 1\nSummary: provides /bin/sh\nLicense: MIT\nBuildArch: noarch\nProvides: /bin/sh\n%description\ntest setup\n%files\n",
    )
    .unwrap();
    run_ok(
        Command::new("rpmbuild")
            .arg("-bb")
            .arg("--define")
            .arg(format!("_topdir {}", top.display()))
            .arg(&spec),
    );
    top.join("RPMS/noarch/rgpkgtest-sh-provider-1-1.noarch.rpm")
}

/// A test host whose policy lets bundles change the system directories the
/// test package uses (and protects the host tree's `backup`).
pub fn host(keys: &Keys) -> Host {
    let host = Host::new("pkg-01.tokyo", keys, Default::default());
    let rpmdb = String::from_utf8(run_ok(Command::new("rpm").args(["-E", "%_dbpath"])).stdout)
        .unwrap_or_default();
    let policy = format!(
        "[host]\nname = \"pkg-01.tokyo\"\n\n[trust]\nallowed_signers = {:?}\nthreshold = 1\ndelete_threshold = 1\n\n[protect]\npaths = [{:?}]\n\n[limits]\nallow_scopes = [\"/etc\", \"/usr/lib\", \"/lib\", \"/var/lib/dpkg\", \"/var/log/dpkg.log\", {:?}, {:?}]\n\n[state]\ndir = {:?}\n",
        keys.allowed_signers(),
        host.root().join("backup"),
        rpmdb.trim(),
        host.root(),
        host.state_dir(),
    );
    fs::write(host.policy(), policy).unwrap();
    root_only(&host.policy(), 0o600);
    host
}

/// A bundle source installing `package` (copied into the payload), with
/// no command.
pub fn bundle_source(host: &Host, label: &str, version: u64, package: &Path) -> PathBuf {
    bundle_source_of(host, label, version, &[package])
}

/// A bundle source installing `packages`, in that order, with no command.
pub fn bundle_source_of(host: &Host, label: &str, version: u64, packages: &[&Path]) -> PathBuf {
    let files: Vec<&str> = packages
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap())
        .collect();
    let install = files
        .iter()
        .map(|f| format!("\"pkgs/{f}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let manifest = format!(
        "[bundle]\nname = \"patch-{NAME}\"\nversion = {version}\ndescription = \"upgrade the test package\"\nexpires = 2099-01-01T00:00:00Z\n\n[targets]\nhosts = [\"pkg-01.tokyo\"]\n\n[packages]\ninstall = [{install}]\n\n[run]\ntimeout = \"120s\"\n"
    );
    let src = host.bundle_source(label, &manifest, "#!/bin/sh\nexit 0\n");
    fs::remove_file(src.join("run.sh")).unwrap();
    fs::create_dir_all(src.join("pkgs")).unwrap();
    for (package, file) in packages.iter().zip(&files) {
        fs::copy(package, src.join("pkgs").join(file)).unwrap();
    }
    src
}

/// `rollguard bundle build` output and stderr (warnings).
pub fn build_bundle(src: &Path) -> (PathBuf, String) {
    let out = src.with_extension("bundle");
    let o = run_ok(
        crate::rollguard()
            .args(["bundle", "build"])
            .arg(src)
            .arg("-o")
            .arg(&out),
    );
    (out, String::from_utf8_lossy(&o.stderr).into_owned())
}

/// `rollguard bundle inspect --json`.
pub fn inspect(bundle: &Path) -> serde_json::Value {
    let o = run_ok(
        crate::rollguard()
            .args(["bundle", "inspect", "--json"])
            .arg(bundle),
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Purges the test packages and what the tests may have left, on drop.
pub struct Cleanup {
    pub rpm: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.rpm {
            let _ = run(Command::new("rpm").args(["-e", NAME]));
            let _ = run(Command::new("rpm").args(["-e", "rgpkgtest-sh-provider"]));
        } else {
            let _ = run(Command::new("dpkg").args(["--purge", TRIGGER_CONSUMER]));
            let _ = run(Command::new("dpkg").args(["--purge", NAME]));
            let _ = fs::remove_dir_all(Path::new(TRIGGER_RAN).parent().unwrap());
        }
        let _ = fs::remove_file(EVIL);
        for dir in [
            "/etc/rgpkgtest",
            "/usr/lib/rgpkgtest",
            "/lib/rgpkgtest-lib",
            "/usr/lib/rgpkgtest-lib",
        ] {
            let _ = fs::remove_dir_all(dir);
        }
        let _ = fs::remove_file("/lib/systemd/system/rgpkgtest.service");
    }
}

/// dpkg's version and status of the test package (`None`: unknown).
pub fn dpkg_status() -> Option<(String, String)> {
    let o = run(Command::new("dpkg-query").args([
        "--show",
        "--showformat=${Version}\t${Status}",
        NAME,
    ]));
    if !o.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let (v, s) = text.split_once('\t')?;
    Some((v.to_string(), s.to_string()))
}

/// rpm's version of the test package (`None`: not installed).
pub fn rpm_version() -> Option<String> {
    let o = run(Command::new("rpm").args(["-q", "--qf", "%{VERSION}-%{RELEASE}", NAME]));
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}
