//! A real fleet host: our own `rollguard-agent` .deb installed with
//! `dpkg -i` into a container that boots systemd 252 (Debian 12), started
//! by that systemd from the unit the package ships, hardening and all, and
//! connected to a controller running on this machine.
//!
//! - [`agent_deb`] builds the package as `packaging/build` does (`cargo
//!   deb` with the package's own metadata: assets, maintainer scripts,
//!   unit, conffile, man pages and completions generated from the CLI),
//!   from the binaries the other end-to-end tests use (this test profile's,
//!   stripped) instead of a release build.
//! - [`FleetHost::install`] boots the container with [`host_options`] and
//!   installs the package; [`FleetHost::configure`] gives the agent what an
//!   operator would (host policy, `allowed_signers`, its certificate from
//!   `rollguard-controller enroll`, the fleet CA); [`FleetHost::start_agent`]
//!   is `systemctl start rollguard-agent.service`.
//!
//! The container shares this machine's network (no `--private-network`), so
//! the agent reaches the controller on 127.0.0.1, as a host reaches its
//! controller's address. What else the container needs, and why, is in
//! [`host_options`].

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

use crate::fleet::{wait_for, Fleet};
use crate::run_ok;
use crate::systemd_container::{BootOptions, SystemdContainer};

/// Where the package installs its unit (cargo-deb's `lib/systemd/system/`).
pub const UNIT_PATH: &str = "/lib/systemd/system/rollguard-agent.service";
pub const UNIT: &str = "rollguard-agent.service";

/// `target/<profile>/` of the running test binary.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent() // deps
        .and_then(Path::parent) // <profile>
        .expect("target/<profile>/deps/<test>")
        .to_path_buf()
}

/// The workspace's top directory (this crate is `tests/` in it).
fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

/// Our `rollguard-agent_<version>-1_<arch>.deb`, built once per test
/// process into `target/<profile>/fleet-host-packages/`.
///
/// As `packaging/build`: man pages and completions from
/// `rollguard-packaging`'s generator (man pages gzip'ed with `-9n`), then
/// `cargo deb --no-build` with the package's metadata. Differences, none of
/// which the package's contents depend on: the binaries are this profile's
/// (`--profile dev` maps the metadata's `target/release/` to
/// `target/debug/`; `--strip` drops their debug information, as the
/// release profile's `strip = "symbols"` does), and `--fast` compression.
/// `cargo test -p rollguard-tests` does not rebuild them: build the agent
/// first (`cargo build -p rollguard-agent -p rollguard-controller -p
/// rollguard-cli`).
pub fn agent_deb() -> PathBuf {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(build_agent_deb).clone()
}

fn build_agent_deb() -> PathBuf {
    let profile_dir = profile_dir();
    let target_dir = profile_dir.parent().expect("target/").to_path_buf();
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_string(),
        Some(other) => other.to_string(),
        None => panic!("no profile in {}", profile_dir.display()),
    };
    for b in ["rollguard-agent", "rollguard-sandbox-exec"] {
        crate::bin(b);
    }
    let out = profile_dir.join("fleet-host-packages");
    fs::create_dir_all(&out).expect("create fleet-host-packages");
    // Test processes that build at once take turns.
    let lock = fs::File::create(out.join(".lock")).expect("create the package lock");
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("lock fleet-host-packages/.lock");

    let assets = profile_dir.join("packaging-assets");
    let _ = fs::remove_dir_all(&assets);
    let written = rollguard_packaging::generate_assets(&assets)
        .unwrap_or_else(|e| panic!("generating man pages and completions: {e}"));
    let man_pages: Vec<&PathBuf> = written
        .iter()
        .filter(|p| p.components().any(|c| c.as_os_str() == "man"))
        .collect();
    assert!(!man_pages.is_empty(), "no man pages generated");
    run_ok(Command::new("gzip").arg("-9nf").args(man_pages));

    for old in fs::read_dir(&out)
        .expect("read fleet-host-packages")
        .flatten()
    {
        if old.path().extension().is_some_and(|e| e == "deb") {
            fs::remove_file(old.path()).expect("remove an old .deb");
        }
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let has_cargo_deb = Command::new(&cargo)
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        has_cargo_deb,
        "cargo-deb is missing: packaging/install-tools build (scripts/install-deps) installs it"
    );
    run_ok(
        Command::new(cargo)
            .current_dir(workspace_dir())
            .env("CARGO_TARGET_DIR", &target_dir)
            .args([
                "deb",
                "--no-build",
                "--locked",
                "--quiet",
                "--strip",
                "--fast",
            ])
            .args(["--profile", &profile])
            .args(["-p", "rollguard-agent", "-o"])
            .arg(&out),
    );
    let debs: Vec<PathBuf> = fs::read_dir(&out)
        .expect("read fleet-host-packages")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "cargo deb made {debs:?}");
    debs.into_iter().next().unwrap()
}

/// How a fleet host's container boots, beyond the harness's defaults (an
/// overlay over the cached Debian 12 root, the host's network). Each item
/// was checked by taking it away (the effect is in brackets):
///
/// - `--capability=CAP_NET_ADMIN`: in the unit's `CapabilityBoundingSet=`,
///   not in nspawn's default set. The agent brings up loopback in each
///   run's network namespace, which is owned by the initial user namespace
///   [without it every run fails before the bundle executes: "bringing up
///   the loopback interface: Operation not permitted"].
/// - `--capability=CAP_AUDIT_READ`: in the unit's set, not in nspawn's. On
///   a host it lets the agent join the audit log's multicast group; in a
///   container audit is impossible anyway (below), so it changes nothing
///   there, and it is granted only so that the service runs with exactly
///   the unit's bounding set, which the test checks. Nothing beyond the
///   unit's set is granted: the other capabilities it keeps are in nspawn's
///   default set.
/// - `--system-call-filter=landlock_create_ruleset landlock_add_rule
///   landlock_restrict_self bpf clone3`: nspawn 252's own allow-list
///   predates Landlock and lacks `bpf` [without the Landlock calls the
///   agent refuses every bundle: "Landlock is not built into this kernel";
///   without `bpf`: "cgroup BPF programs cannot be loaded" (each run's
///   device and network programs)]. `clone3` only so that what refuses it
///   is the unit's `RestrictNamespaces=` (ENOSYS, the agent then uses
///   clone(2)), as on a host, not nspawn's filter.
/// - `--bind-ro=DIR:/mnt/packages`: the directory holding the .deb.
///
/// Audit is impossible in any container: nspawn refuses `NETLINK_AUDIT`
/// sockets (EAFNOSUPPORT), and with nspawn's filter off the kernel still
/// answers the audit status request and audit rules from outside the
/// initial PID namespace with EPERM. So the agent there cannot observe
/// denials, and every report says so (`denials: null`, never an empty
/// list), which halts a rollout. Reporting denials from the kernel's audit
/// records is tested outside containers.
///
/// [`FleetHost::install`] also makes the cgroup v1 controller hierarchies
/// writable on a hybrid host, as a host's own systemd leaves them (nspawn
/// mounts them read-only); the agent limits runs through them there.
pub fn host_options(packages: &Path) -> BootOptions {
    BootOptions {
        nspawn_args: vec![
            "--capability=CAP_NET_ADMIN,CAP_AUDIT_READ".into(),
            "--system-call-filter=landlock_create_ruleset landlock_add_rule \
             landlock_restrict_self bpf clone3"
                .into(),
            format!("--bind-ro={}:/mnt/packages", packages.display()),
        ],
        private_copy: false,
    }
}

/// What a fleet host's policy says beyond its name and controller. Trust:
/// the fleet's `allowed_signers`, one signature (deletes too); state in
/// `/var/lib/rollguard`.
#[derive(Debug, Clone)]
pub struct FleetHostPolicy {
    /// `[host] labels`, as TOML inline-table entries: `role = "mail"`.
    pub labels: String,
    /// `[protect] paths`.
    pub protect: Vec<String>,
    /// `[limits] allow_scopes`.
    pub allow_scopes: Vec<String>,
    /// Appended as is: further sections (`[services]`, say).
    pub extra: String,
}

impl Default for FleetHostPolicy {
    /// A mail host that protects `/srv/backup`, with the package's own
    /// `allow_scopes`.
    fn default() -> Self {
        FleetHostPolicy {
            labels: "role = \"mail\"".into(),
            protect: vec!["/srv/backup".into()],
            allow_scopes: ["/etc", "/var", "/srv", "/opt", "/usr/local"]
                .map(String::from)
                .to_vec(),
            extra: String::new(),
        }
    }
}

impl FleetHostPolicy {
    fn render(&self, name: &str, url: &str) -> String {
        let list = |v: &[String]| {
            v.iter()
                .map(|p| format!("{p:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "[host]\nname = {name:?}\nlabels = {{ {labels} }}\n\n\
             [trust]\nallowed_signers = \"/etc/rollguard/allowed_signers\"\n\
             threshold = 1\ndelete_threshold = 1\n\n\
             [protect]\npaths = [{protect}]\n\n\
             [limits]\nallow_scopes = [{scopes}]\n\n\
             [controller]\nurl = {url:?}\nca = \"/etc/rollguard/ca.crt\"\n\
             cert = \"/etc/rollguard/agent.crt\"\nkey = \"/etc/rollguard/agent.key\"\n\n\
             [state]\ndir = \"/var/lib/rollguard\"\n\n{extra}",
            labels = self.labels,
            protect = list(&self.protect),
            scopes = list(&self.allow_scopes),
            extra = self.extra,
        )
    }
}

/// One host of the fleet: a booted container with our package installed.
pub struct FleetHost {
    pub name: String,
    pub ct: SystemdContainer,
}

impl FleetHost {
    /// Boot a container and `dpkg -i` the package `deb` in it. The package
    /// enables its service; nothing starts it yet (it has no policy).
    pub fn install(name: &str, deb: &Path) -> Self {
        let dir = deb.parent().expect("the .deb's directory");
        let ct = SystemdContainer::boot_with(host_options(dir));
        // As a host's own systemd leaves them (nspawn mounts the v1
        // controller hierarchies read-only on a hybrid host).
        ct.make_cgroup_v1_writable();
        let file = deb.file_name().expect("the .deb's name").to_string_lossy();
        let out = ct
            .command(["dpkg", "-i", &format!("/mnt/packages/{file}")])
            .output()
            .expect("nsenter dpkg -i");
        assert!(
            out.status.success(),
            "dpkg -i {file} in the container: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        FleetHost {
            name: name.to_string(),
            ct,
        }
    }

    /// Give the agent what an operator would after installing: its
    /// certificate and key (`rollguard-controller enroll NAME`) and the
    /// fleet CA beside the policy, the operators' `allowed_signers`, and
    /// the host policy `/etc/rollguard/agent.toml` from `policy`, naming
    /// the controller on 127.0.0.1.
    pub fn configure(&self, fleet: &Fleet, policy: &FleetHostPolicy) {
        let creds = fleet.root().join(format!("creds-{}", self.name));
        fleet.enroll(&self.name, &creds);
        let read = |p: PathBuf| fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        self.ct.write_file(
            "/etc/rollguard/ca.crt",
            &read(fleet.ctl().join("ca.crt")),
            0o644,
        );
        self.ct.write_file(
            "/etc/rollguard/agent.crt",
            &read(creds.join(format!("{}.crt", self.name))),
            0o644,
        );
        self.ct.write_file(
            "/etc/rollguard/agent.key",
            &read(creds.join(format!("{}.key", self.name))),
            0o600,
        );
        self.ct.write_file(
            "/etc/rollguard/allowed_signers",
            &read(fleet.keys.allowed_signers()),
            0o644,
        );
        let toml = policy.render(&self.name, &fleet.url());
        self.ct
            .write_file("/etc/rollguard/agent.toml", toml.as_bytes(), 0o600);
    }

    /// `systemctl start rollguard-agent.service`: returns once the agent
    /// told systemd it is ready (`Type=notify`), then waits until the
    /// controller lists it as connected.
    pub fn start_agent(&self, fleet: &Fleet) {
        let out = self.ct.systemctl(&["start", UNIT]);
        assert!(
            out.status.success(),
            "systemctl start {UNIT}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.journal()
        );
        wait_for(&format!("{} to connect", self.name), || {
            let agents = fleet.cli_json(&["agents"]);
            agents
                .as_array()?
                .iter()
                .any(|a| a["name"] == self.name.as_str() && a["connected"] == true)
                .then_some(())
        });
    }

    /// The agent's journal (the last 80 lines), for failure messages.
    pub fn journal(&self) -> String {
        let out = self
            .ct
            .command([
                "journalctl",
                "-u",
                UNIT,
                "--no-pager",
                "-o",
                "cat",
                "-n",
                "80",
            ])
            .output()
            .expect("journalctl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The agent unit's journal entries, each as journald stores it (all
    /// fields, `journalctl -o json`).
    pub fn journal_entries(&self) -> Vec<serde_json::Value> {
        let out = self
            .ct
            .command(["journalctl", "-u", UNIT, "--no-pager", "-o", "json"])
            .output()
            .expect("journalctl");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Every entry beneath the container's `dirs` (absolute, existing):
    /// name, mode, owner, size, mtime, and each file's SHA-256.
    pub fn snapshot(&self, dirs: &[&str]) -> String {
        let list = dirs.join(" ");
        self.ct.sh(&format!(
            "set -e; find {list} -print0 | sort -z | xargs -0 stat -c '%n %a %U:%G %s %Y'; \
             find {list} -type f -print0 | sort -z | xargs -0 sha256sum"
        ))
    }

    /// A file in the container, if it exists.
    pub fn read(&self, path: &str) -> Option<String> {
        fs::read_to_string(self.ct.root().join(path.trim_start_matches('/'))).ok()
    }
}

/// Wait until rollout `id` has stopped moving (halted or completed) and
/// return its status; panics with the controller's and the host's logs if
/// it ends any other way.
pub fn wait_halted_or_completed(fleet: &Fleet, host: &FleetHost, id: &str) -> Value {
    wait_for(&format!("rollout {id} to finish"), || {
        let s = fleet.status(id);
        match s["state"].as_str() {
            Some("halted") | Some("completed") => Some(s),
            Some("running") => None,
            other => panic!(
                "rollout {id} is {other:?}: {s:#}\n{}\n--- agent ---\n{}",
                fleet.logs(),
                host.journal()
            ),
        }
    })
}

/// `host`'s entry in a rollout's status.
pub fn host_entry<'s>(status: &'s Value, host: &FleetHost) -> &'s Value {
    status["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .find(|h| h["host"] == host.name.as_str())
        .unwrap_or_else(|| panic!("{} is not in the rollout: {status:#}", host.name))
}

/// The patch step's package (`rgpkgtest`, see [`crate::packages`]) with
/// its unit in `/lib/systemd/system`, and its service.
pub const PATCH_SERVICE: &str = "rgpkgtest.service";
pub const PATCH_V1: &str = "1.0";
pub const PATCH_V2: &str = "2.0";

/// What a host's policy needs for the patch step: the package's derived
/// scope beneath `/usr` within `allow_scopes` (its program's directory and
/// the unit directory, in both spellings of a merged-/usr host; `/etc` and
/// `/var` are in the default), and its service in `[services] allow`.
/// A container cannot observe denials (no kernel audit, see
/// [`host_options`]), and the agent performs no service action after a run
/// whose denials are unknown unless the host says
/// `perform_when_denials_unknown = true`, as an operator of such a host
/// would; the controller still halts on those reports.
pub fn allow_patch(policy: &mut FleetHostPolicy) {
    for scope in [
        "/usr/lib/rgpkgtest",
        "/usr/lib/systemd/system",
        "/lib/rgpkgtest",
        "/lib/systemd/system",
    ] {
        if !policy.allow_scopes.iter().any(|s| s == scope) {
            policy.allow_scopes.push(scope.to_string());
        }
    }
    policy.extra.push_str(&format!(
        "[services]\nallow = [{PATCH_SERVICE:?}]\nperform_when_denials_unknown = true\n"
    ));
}

/// The patch's two versions, built with `dpkg-deb` on this machine
/// ([`crate::packages::build_deb`]): a conffile, a long-running service
/// (`/usr/lib/rgpkgtest/rgpkgtest-daemon`, a shell that sleeps) with its
/// unit in `/lib/systemd/system`, enabled as debhelper packages do it
/// (`deb-systemd-helper` in the postinst), and a postinst that calls
/// `deb-systemd-invoke restart`.
#[derive(Debug, Clone)]
pub struct PatchPackages {
    pub v1: PathBuf,
    pub v2: PathBuf,
}

impl PatchPackages {
    pub fn build(out: &Path) -> Self {
        use crate::packages::{build_deb, Variant};
        fs::create_dir_all(out).expect("create the patch's package directory");
        let variant = Variant {
            unit_in_systemd_dir: true,
            systemd_helper: true,
            ..Variant::default()
        };
        PatchPackages {
            v1: build_deb(out, PATCH_V1, &variant),
            v2: build_deb(out, PATCH_V2, &variant),
        }
    }
}

/// Install `deb` bare in the host's container (`dpkg -i`, as its operator
/// did before the fleet existed): its postinst enables the unit
/// (`deb-systemd-helper`) and starts it (`deb-systemd-invoke`); returns
/// its MainPID.
pub fn install_patch_v1(host: &FleetHost, deb: &Path) -> u32 {
    let bytes = fs::read(deb).unwrap_or_else(|e| panic!("{}: {e}", deb.display()));
    host.ct.write_file("/root/patch-v1.deb", &bytes, 0o644);
    host.ct
        .sh("dpkg -i /root/patch-v1.deb && rm /root/patch-v1.deb");
    let out = host.ct.systemctl(&["start", PATCH_SERVICE]);
    assert!(
        out.status.success(),
        "systemctl start {PATCH_SERVICE}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(dpkg_version(host).as_deref(), Some(PATCH_V1));
    let pid = host.ct.main_pid(PATCH_SERVICE);
    assert_ne!(pid, 0, "{PATCH_SERVICE} is not running");
    pid
}

/// The package's version in the host's dpkg database (`dpkg-query`), if
/// installed.
pub fn dpkg_version(host: &FleetHost) -> Option<String> {
    let out = host
        .ct
        .command([
            "dpkg-query",
            "--show",
            "--showformat=${Version} ${db:Status-Status}",
            crate::packages::NAME,
        ])
        .output()
        .expect("nsenter dpkg-query");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    match text.trim().split_once(' ') {
        Some((v, "installed")) if out.status.success() => Some(v.to_string()),
        _ => None,
    }
}

/// What the patch rollout did, as the controller and the container show it.
#[derive(Debug, Clone)]
pub struct PatchOutcome {
    pub rollout: String,
    /// The host's report, as the controller holds it.
    pub report: Value,
    /// The package's version in the container before and after.
    pub version_before: Option<String>,
    pub version_after: Option<String>,
    /// The service's MainPID in the container before and after.
    pub main_pid_before: u32,
    pub main_pid_after: u32,
    /// Why the controller halted the rollout (denials unknown in a
    /// container), before the operator resumed it.
    pub halt_reason: String,
    /// The rollout's state after resuming.
    pub final_state: String,
}

/// `deb-systemd-helper`'s record of the enabled unit, rewritten by every
/// upgrade's postinst (a new file renamed over it).
const PATCH_UNIT_STATE: &str =
    "/var/lib/systemd/deb-systemd-helper-enabled/rgpkgtest.service.dsh-also";

/// The inode of `path` in the container.
fn inode(host: &FleetHost, path: &str) -> String {
    host.ct.sh(&format!("stat -c %i {path}")).trim().to_string()
}

/// The patch step: a signed bundle with `[packages] install = [v2]` and
/// `[services] restart = [PATCH_SERVICE]` rolls out through the
/// controller to `host` (whose policy has [`allow_patch`], and v1 installed
/// by [`install_patch_v1`]). Checks that the host ran it successfully: the
/// package upgraded (dpkg in the container), the declared restart done
/// with a new MainPID, the report's MainPIDs those of the container. A
/// container cannot observe denials, so the controller halts on that
/// report (as on every report from a container); the operator accepts it
/// and resumes, and the rollout completes. `narrate` gets a line per event
/// (for a demo). Panics with the full report on any failure.
pub fn patch_rolls_out(
    fleet: &Fleet,
    host: &FleetHost,
    packages: &PatchPackages,
    narrate: &mut dyn FnMut(&str),
) -> PatchOutcome {
    let version_before = dpkg_version(host);
    let main_pid_before = host.ct.main_pid(PATCH_SERVICE);
    let unit_state_before = inode(host, PATCH_UNIT_STATE);
    narrate(&format!(
        "{}: {} {} installed, {PATCH_SERVICE} MainPID {main_pid_before}",
        host.name,
        crate::packages::NAME,
        version_before.as_deref().unwrap_or("(none)")
    ));

    let src = fleet.root().join("src-patch");
    let _ = fs::remove_dir_all(&src);
    fs::create_dir_all(src.join("debs")).expect("create the patch's source");
    let file = packages
        .v2
        .file_name()
        .expect("the package's name")
        .to_string_lossy()
        .into_owned();
    fs::copy(&packages.v2, src.join("debs").join(&file)).expect("copy the package");
    let manifest = format!(
        "[bundle]\nname = \"patch-rgpkgtest\"\nversion = 1\n\
         description = \"upgrade rgpkgtest to {PATCH_V2}, restart its service\"\n\
         expires = 2099-01-01T00:00:00Z\n\n\
         [targets]\nhosts = [{host:?}]\n\n\
         [packages]\ninstall = [\"debs/{file}\"]\n\n\
         [services]\nrestart = [{PATCH_SERVICE:?}]\n\n\
         [run]\ntimeout = \"2m\"\n",
        host = host.name,
    );
    fs::write(src.join("bundle.toml"), manifest).expect("write the manifest");
    let bundle = crate::build_and_sign(
        &src,
        &fleet.root().join("patch.bundle"),
        &fleet.keys.key("alice"),
        "alice",
    );
    narrate(&format!(
        "bundle patch-rgpkgtest: install {file}, restart {PATCH_SERVICE}; signed by alice"
    ));

    let rollout = fleet.start_rollout(
        &bundle,
        &["--waves", "100%", "--all-at-once", "--bake", "1s"],
    );
    let status = wait_halted_or_completed(fleet, host, &rollout);
    let entry = host_entry(&status, host);
    let report = entry["report"].clone();
    let context = || {
        format!(
            "report: {report:#}\nrollout: {status:#}\n--- agent ---\n{}",
            host.journal()
        )
    };
    assert_eq!(entry["state"], "succeeded", "{}", context());
    assert_eq!(report["status"], "succeeded", "{}", context());

    let version_after = dpkg_version(host);
    assert_eq!(version_after.as_deref(), Some(PATCH_V2), "{}", context());
    // The postinst's `deb-systemd-helper` rewrote its record inside the
    // sandbox: its directory is in the derived scope. (A container cannot
    // report denials; the new inode shows the write was not refused.)
    assert_ne!(
        inode(host, PATCH_UNIT_STATE),
        unit_state_before,
        "deb-systemd-helper's state was not rewritten: {}",
        context()
    );
    assert_eq!(
        host.ct
            .sh("readlink /etc/systemd/system/multi-user.target.wants/rgpkgtest.service")
            .trim(),
        "/lib/systemd/system/rgpkgtest.service",
        "the unit is still enabled"
    );
    let change = report["packages"]
        .as_array()
        .and_then(|l| l.iter().find(|p| p["name"] == crate::packages::NAME))
        .unwrap_or_else(|| panic!("no package change reported: {}", context()));
    assert_eq!(change["before"], PATCH_V1, "{}", context());
    assert_eq!(change["after"], PATCH_V2, "{}", context());
    narrate(&format!(
        "{}: dpkg says {} {} (report: {} -> {})",
        host.name,
        crate::packages::NAME,
        PATCH_V2,
        change["before"],
        change["after"]
    ));

    let main_pid_after = host.ct.main_pid(PATCH_SERVICE);
    assert_eq!(
        host.ct.unit_property(PATCH_SERVICE, "ActiveState"),
        "active",
        "{}",
        context()
    );
    assert_ne!(main_pid_after, 0, "{}", context());
    assert_ne!(
        main_pid_after,
        main_pid_before,
        "not restarted: {}",
        context()
    );
    let outcomes: Vec<&Value> = report["services"]
        .as_array()
        .map(|l| l.iter().filter(|o| o["unit"] == PATCH_SERVICE).collect())
        .unwrap_or_default();
    let declared = outcomes
        .iter()
        .find(|o| o["source"] == "declared" && o["action"] == "restart")
        .unwrap_or_else(|| panic!("no declared restart reported: {}", context()));
    assert_eq!(declared["result"], "done", "{}", context());
    assert_eq!(
        declared["main_pid_before"],
        main_pid_before,
        "{}",
        context()
    );
    assert_ne!(declared["main_pid_after"], main_pid_before, "{}", context());
    // The last action on the unit left the MainPID the container shows.
    assert_eq!(
        outcomes.last().map(|o| o["main_pid_after"].clone()),
        Some(Value::from(main_pid_after)),
        "{}",
        context()
    );
    for o in &outcomes {
        narrate(&format!(
            "{}: {} {} ({}): {}, MainPID {} -> {}",
            host.name,
            o["action"].as_str().unwrap_or("?"),
            PATCH_SERVICE,
            o["source"].as_str().unwrap_or("?"),
            o["result"].as_str().unwrap_or("?"),
            o["main_pid_before"],
            o["main_pid_after"]
        ));
    }
    for c in report["services_captured"].as_array().into_iter().flatten() {
        narrate(&format!(
            "{}: captured in the sandbox: {} {} via {}: {}",
            host.name,
            c["verb"].as_str().unwrap_or("?"),
            c["unit"].as_str().unwrap_or("?"),
            c["via"].as_str().unwrap_or("?"),
            c["disposition"].as_str().unwrap_or("?")
        ));
        assert_ne!(c["disposition"], "denied", "{}", context());
    }

    // Denials are unknown in a container (no audit): the controller halts
    // on that, as on every report from a container; the operator accepts
    // it and resumes. Nothing runs again.
    assert!(report["denials"].is_null(), "{}", context());
    assert_eq!(status["state"], "halted", "{}", context());
    let halt_reason = status["halt_reason"].as_str().unwrap_or("").to_string();
    assert!(
        halt_reason.contains(&host.name) && halt_reason.contains("could not observe denials"),
        "{}",
        context()
    );
    narrate(&format!("controller halted: {halt_reason}; resuming"));
    let resumed = fleet.cli_json(&["rollout", "resume", &rollout]);
    assert_eq!(resumed["state"], "running", "{resumed:#}");
    let status = wait_halted_or_completed(fleet, host, &rollout);
    let final_state = status["state"].as_str().unwrap_or("").to_string();
    assert_eq!(final_state, "completed", "{status:#}");
    assert_eq!(
        host.ct.main_pid(PATCH_SERVICE),
        main_pid_after,
        "the service was not restarted again"
    );
    narrate(&format!("rollout {rollout} {final_state}"));
    PatchOutcome {
        rollout,
        report,
        version_before,
        version_after,
        main_pid_before,
        main_pid_after,
        halt_reason,
        final_state,
    }
}
