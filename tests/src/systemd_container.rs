//! A real systemd for tests: Debian 12's systemd 252, booted as PID 1 of a
//! container with `systemd-nspawn`, on this machine's kernel.
//!
//! The machine's own PID 1 is not systemd, so tests that need the real
//! thing (restarts through systemd's D-Bus API, the packaged agent started
//! from its own unit) boot one. As `packaging/systemd-test` does:
//!
//! - the root file system is Debian bookworm minbase with systemd, dbus,
//!   systemd-sysv and rpm, built once with `mmdebstrap` and cached as a
//!   tarball in `target/systemd-root/` (the same file the script uses),
//!   then extracted once beside it;
//! - each instance boots that tree with `--volatile=overlay` (its writes go
//!   to a tmpfs; the tree stays pristine, and instances share it) or, with
//!   [`BootOptions::private_copy`], an extracted copy of its own;
//! - `--register=no --keep-unit` (the host has no machined), `--console=pipe`;
//! - each instance in cgroups of its own (`rollguard-ct-NAME` in each
//!   hierarchy nspawn uses), so parallel instances do not collide, removed
//!   on drop.
//!
//! Talk to it with [`SystemdContainer::command`] (`nsenter` into all its
//! namespaces) or over D-Bus at [`SystemdContainer::bus_address`]. The
//! host's own `systemctl` does not work here (the host was not booted with
//! systemd).
//!
//! Needs root, `systemd-container`, `mmdebstrap` and `zstd`
//! (`scripts/install-deps`).

use std::fs;
use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{run, run_ok};

/// The packages of the cached root; its file name says them.
const ROOT_PACKAGES: &str = "systemd,dbus,systemd-sysv,rpm";
const SUITE: &str = "bookworm";

/// How often, and how many times, boot and shutdown are polled. Bounds, not
/// expectations: a slow machine only uses more of them.
const POLL: Duration = Duration::from_millis(20);
const BOOT_POLLS: u32 = 6000; // 2 minutes
const STOP_POLLS: u32 = 1500; // 30 s, then SIGKILL

/// How to boot an instance.
#[derive(Debug, Clone, Default)]
pub struct BootOptions {
    /// Extra `systemd-nspawn` arguments: `--bind-ro=HOST:CONTAINER`,
    /// `--capability=...`, `--system-call-filter=...`,
    /// `--private-network`, `--setenv=...`.
    pub nspawn_args: Vec<String>,
    /// Boot an extracted copy of the root that belongs to this instance
    /// (on disk, under `target/`), instead of a tmpfs overlay over the
    /// shared tree: for tests that need a real file system under `/` (the
    /// agent's read-only remounts, Landlock on a plain ext4/xfs tree) or
    /// much data.
    pub private_copy: bool,
}

/// A booted container; powered off and cleaned up on drop.
pub struct SystemdContainer {
    name: String,
    nspawn: Child,
    pid1: u32,
    scratch: PathBuf,
    cgroups: Vec<PathBuf>,
}

/// `target/` (where the test binary's profile directory is).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent() // deps
        .and_then(Path::parent) // debug
        .and_then(Path::parent) // target
        .expect("target/<profile>/deps/<test>")
        .to_path_buf()
}

/// The shared root tree, built and extracted on first use. Several test
/// processes may get here at once: an exclusive lock on a file beside the
/// cache serialises them; the tree is renamed into place only once whole.
pub fn root_tree() -> PathBuf {
    let (dir, stem) = cache();
    let tarball = root_tarball();
    let tree = dir.join(&stem);
    if tree.join("usr/lib/systemd/systemd").exists() {
        return tree;
    }
    let lock = fs::File::create(dir.join(".lock")).expect("create the cache lock");
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("lock target/systemd-root/.lock");
    if tree.join("usr/lib/systemd/systemd").exists() {
        return tree;
    }
    if !tarball.exists() {
        let partial = dir.join(format!("{stem}.partial.tar.zst"));
        run_ok(
            Command::new("mmdebstrap")
                .args(["--quiet", "--variant=minbase"])
                .arg(format!("--include={ROOT_PACKAGES}"))
                .arg(SUITE)
                .arg(&partial),
        );
        fs::rename(&partial, &tarball).expect("rename the built root");
    }
    let partial = dir.join(format!("{stem}.partial"));
    let _ = fs::remove_dir_all(&partial);
    extract(&tarball, &partial);
    fs::rename(&partial, &tree).expect("rename the extracted root");
    tree
}

/// `target/systemd-root/` and the cache's file stem.
fn cache() -> (PathBuf, String) {
    let dir = target_dir().join("systemd-root");
    fs::create_dir_all(&dir).expect("create target/systemd-root");
    let stem = format!("{SUITE}-minbase-{}", ROOT_PACKAGES.replace(',', "-"));
    (dir, stem)
}

/// The cached root tarball (built by [`root_tree`] if missing).
pub fn root_tarball() -> PathBuf {
    let (dir, stem) = cache();
    dir.join(format!("{stem}.tar.zst"))
}

fn extract(tarball: &Path, into: &Path) {
    fs::create_dir_all(into).expect("create the root directory");
    run_ok(
        Command::new("tar")
            .args(["--zstd", "--numeric-owner", "-xpf"])
            .arg(tarball)
            .arg("-C")
            .arg(into),
    );
}

/// The cgroup directories nspawn should start in, one per hierarchy it
/// uses: the unified one and v1 `name=systemd` on a hybrid host (this
/// project's machines), the root on a pure v2 host.
fn cgroup_parents() -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    if base.join("cgroup.controllers").exists() {
        return vec![base.to_path_buf()];
    }
    ["unified", "systemd"]
        .iter()
        .map(|h| base.join(h))
        .filter(|p| p.is_dir())
        .collect()
}

impl SystemdContainer {
    /// Boot with the defaults: an overlay over the shared root, nspawn's
    /// own capability set and system call filter, the host's network.
    pub fn boot() -> Self {
        Self::boot_with(BootOptions::default())
    }

    pub fn boot_with(opts: BootOptions) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let tree = root_tree();
        let name = format!(
            "rg-ct-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let scratch = target_dir().join("systemd-containers").join(&name);
        let _ = fs::remove_dir_all(&scratch);
        fs::create_dir_all(&scratch).expect("create the instance directory");

        let (root, volatile) = if opts.private_copy {
            let copy = scratch.join("root");
            extract(&root_tarball(), &copy);
            (copy, None)
        } else {
            (tree, Some("--volatile=overlay"))
        };

        let cgroups: Vec<PathBuf> = cgroup_parents()
            .into_iter()
            .map(|p| p.join(format!("rollguard-ct-{name}")))
            .collect();
        for c in &cgroups {
            fs::create_dir_all(c).unwrap_or_else(|e| panic!("mkdir {}: {e}", c.display()));
        }
        let log = fs::File::create(scratch.join("nspawn.log")).expect("create nspawn.log");
        // The wrapper moves itself into the instance's cgroups, then becomes
        // systemd-nspawn (same PID): nspawn then puts the container beneath
        // them. setsid: no controlling terminal, as for a daemon.
        let mut cmd = Command::new("setsid");
        cmd.arg("bash")
            .arg("-c")
            .arg(r#"for c in $RG_CGROUPS; do echo $$ > "$c/cgroup.procs"; done; exec "$@""#)
            .arg("boot")
            .arg("systemd-nspawn")
            .args(["--boot", "--register=no", "--keep-unit", "--console=pipe"])
            .arg(format!("--machine={name}"))
            .arg(format!("--directory={}", root.display()))
            .args(volatile)
            .args(&opts.nspawn_args)
            .env(
                "RG_CGROUPS",
                cgroups
                    .iter()
                    .map(|c| c.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup nspawn.log"))
            .stderr(log);
        let nspawn = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start systemd-nspawn: {e}"));
        let mut ct = SystemdContainer {
            name,
            pid1: 0,
            nspawn,
            scratch,
            cgroups,
        };
        ct.pid1 = ct.wait_for_pid1();
        let state = ct
            .command(["systemctl", "is-system-running", "--wait"])
            .output();
        let state = state.expect("systemctl is-system-running");
        let state = String::from_utf8_lossy(&state.stdout).trim().to_string();
        assert!(
            state == "running" || state == "degraded",
            "the container's systemd is {state:?}: {}",
            ct.log()
        );
        ct
    }

    fn wait_for_pid1(&mut self) -> u32 {
        let nspawn = self.nspawn.id();
        let children = format!("/proc/{nspawn}/task/{nspawn}/children");
        for _ in 0..BOOT_POLLS {
            if let Ok(Some(status)) = self.nspawn.try_wait() {
                panic!("systemd-nspawn exited ({status}): {}", self.log());
            }
            let leader = fs::read_to_string(&children)
                .ok()
                .and_then(|c| c.split_whitespace().next()?.parse::<u32>().ok());
            if let Some(pid) = leader {
                let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                let private = format!("/proc/{pid}/root/run/systemd/private");
                let up = fs::metadata(&private).is_ok_and(|m| m.file_type().is_socket());
                if comm.trim() == "systemd" && up {
                    return pid;
                }
            }
            std::thread::sleep(POLL);
        }
        panic!("the container's systemd did not come up: {}", self.log());
    }

    /// What nspawn and the container's console printed.
    pub fn log(&self) -> String {
        fs::read_to_string(self.scratch.join("nspawn.log")).unwrap_or_default()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The container's PID 1 (systemd), as the host numbers it.
    pub fn pid1(&self) -> u32 {
        self.pid1
    }

    /// The container's `/`, seen from the host.
    pub fn root(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.pid1))
    }

    /// The container's system bus, for a D-Bus client on the host (uid 0
    /// is root in there too: no user namespace).
    pub fn bus_address(&self) -> String {
        format!(
            "unix:path=/proc/{}/root/run/dbus/system_bus_socket",
            self.pid1
        )
    }

    /// `ARGS` run in all the container's namespaces (`nsenter -a`). Note
    /// that such a process stays in the host's cgroup, outside the
    /// container's cgroup namespace: for something that must run as the
    /// container's own (the agent and its per-run cgroups), use
    /// [`SystemdContainer::run_as_unit`].
    pub fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut c = Command::new("nsenter");
        c.arg("-t").arg(self.pid1.to_string()).arg("-a").args(args);
        c
    }

    /// `sh -c SCRIPT` in the container; must succeed; its stdout.
    pub fn sh(&self, script: &str) -> String {
        let out = run_ok(&mut self.command(["sh", "-c", script]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `systemctl ARGS` in the container (not required to succeed).
    pub fn systemctl(&self, args: &[&str]) -> Output {
        run(self.command(["systemctl"]).args(args))
    }

    /// `ARGS` as a transient service of the container's systemd
    /// (`systemd-run --wait --pipe`): in its cgroups, with its
    /// environment. Not required to succeed.
    pub fn run_as_unit(&self, args: &[&str]) -> Output {
        run(self
            .command(["systemd-run", "--quiet", "--wait", "--pipe"])
            .args(args))
    }

    /// Write `contents` to `path` in the container, with `mode`, creating
    /// its directory.
    pub fn write_file(&self, path: &str, contents: &[u8], mode: u32) {
        let mut child = self
            .command([
                "sh",
                "-c",
                r#"mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1""#,
                "write",
                path,
                &format!("{mode:o}"),
            ])
            .stdin(Stdio::piped())
            .spawn()
            .expect("nsenter");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(contents)
            .expect("write to nsenter");
        let status = child.wait().expect("wait for nsenter");
        assert!(
            status.success(),
            "writing {path} in the container: {status}"
        );
    }

    /// Install a unit file as `/etc/systemd/system/NAME` and reload
    /// systemd. Remember: no `/bin/kill` in a minbase root (use `/bin/sh -c
    /// 'kill -HUP $MAINPID'`), and `$$` is written `$$$$` in a unit.
    pub fn install_unit(&self, name: &str, text: &str) {
        self.write_file(
            &format!("/etc/systemd/system/{name}"),
            text.as_bytes(),
            0o644,
        );
        run_ok(&mut self.command(["systemctl", "daemon-reload"]));
    }

    /// The unit's `MainPID` (container numbering); 0 if none.
    pub fn main_pid(&self, unit: &str) -> u32 {
        let out =
            run_ok(&mut self.command(["systemctl", "show", "-p", "MainPID", "--value", unit]));
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("MainPID of {unit}: {e}"))
    }

    /// A unit property (`systemctl show -p NAME --value`).
    pub fn unit_property(&self, unit: &str, property: &str) -> String {
        let out = run_ok(&mut self.command(["systemctl", "show", "-p", property, "--value", unit]));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The host's PID for the container's `pid`: the process in the
    /// container's PID namespace whose innermost `NSpid` is `pid`.
    pub fn host_pid(&self, pid: u32) -> Option<u32> {
        let ns = fs::read_link(format!("/proc/{}/ns/pid", self.pid1)).ok()?;
        for e in fs::read_dir("/proc").ok()?.flatten() {
            let Some(host) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if fs::read_link(format!("/proc/{host}/ns/pid")).ok().as_ref() != Some(&ns) {
                continue;
            }
            let status = fs::read_to_string(format!("/proc/{host}/status")).unwrap_or_default();
            let inner = status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .and_then(|l| l.split_whitespace().last()?.parse::<u32>().ok());
            if inner == Some(pid) {
                return Some(host);
            }
        }
        None
    }

    /// Make the v1 controller hierarchies (pids, memory, cpu) writable in
    /// the container, as a host's own systemd leaves them (nspawn mounts
    /// them read-only): the agent limits runs through them on a hybrid
    /// host. Nothing to do on a pure v2 host.
    pub fn make_cgroup_v1_writable(&self) {
        for c in ["pids", "memory", "cpu"] {
            let mp = format!("/sys/fs/cgroup/{c}");
            if run(&mut self.command(["mountpoint", "-q", &mp]))
                .status
                .success()
            {
                run_ok(&mut self.command(["mount", "-o", "remount,bind,rw", &mp]));
            }
        }
    }
}

impl Drop for SystemdContainer {
    fn drop(&mut self) {
        // SIGTERM: nspawn asks the container's systemd to power off.
        let pid = Pid::from_raw(self.nspawn.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let mut exited = false;
        for _ in 0..STOP_POLLS {
            if matches!(self.nspawn.try_wait(), Ok(Some(_))) {
                exited = true;
                break;
            }
            std::thread::sleep(POLL);
        }
        if !exited {
            let _ = self.nspawn.kill();
            let _ = self.nspawn.wait();
        }
        // nspawn's cgroups beneath ours (payload/..., supervisor), deepest
        // first; they are empty once it exited.
        for c in &self.cgroups {
            let mut dirs = Vec::new();
            let mut stack = vec![c.clone()];
            while let Some(d) = stack.pop() {
                if let Ok(entries) = fs::read_dir(&d) {
                    for e in entries.flatten() {
                        if e.file_type().is_ok_and(|t| t.is_dir()) {
                            stack.push(e.path());
                        }
                    }
                }
                dirs.push(d);
            }
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for d in dirs {
                let _ = fs::remove_dir(&d);
            }
        }
        let _ = fs::remove_dir_all(&self.scratch);
    }
}
