//! A large simulated fleet on loopback, for the scale test and the
//! benchmarks (`tests/examples/scale.rs`): one real controller
//! (`rollguard-controller serve`) and N real agent daemons run by a few
//! `rollguard-simulate` processes. Every host has its own policy,
//! state directory and enrolled certificate, its own mutual-TLS connection,
//! and runs bundles through the real verifier and kernel sandbox.
//!
//! ```text
//! ROOT/ctl/                     CA directory, controller config, database, log
//! ROOT/keys/                    the signing key, allowed_signers
//! ROOT/hosts/ggg/sim-nnnnn/     agent.toml, creds/, state/ (ggg = nnnnn / 100)
//! ROOT/work/                    the (empty) write scope of the test bundles
//! ROOT/sim-K.log                log of the simulate process starting at host K
//! ```
//!
//! ROOT is under `/var/lib/rollguard-scale` (the sandbox gives every bundle a
//! private `/tmp`, so trees there would be invisible to it).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rollguard_cli::client::Client;
use rollguard_controller::pki::{issue, CaDir, Role};
use serde_json::Value;

use crate::simulate::Executor;
use crate::{bin, run, run_ok};

pub const BASE: &str = "/var/lib/rollguard-scale";
/// Host directory prefix (`rollguard-simulate --prefix`).
pub const PREFIX: &str = "sim-";

pub struct ScaleFleet {
    dir: tempfile::TempDir,
    pub port: u16,
    pub count: usize,
    controller: Option<Child>,
    /// Further controller replicas (PostgreSQL): port, process
    /// (`ctl/controller-N.toml`, N from 1). See [`ScaleFleet::replicated`].
    replicas: Vec<(u16, Option<Child>)>,
    sims: Vec<Child>,
    operator: std::sync::OnceLock<Client>,
    /// What answers run orders in the simulated hosts.
    pub executor: Executor,
}

/// A free loopback port (bound, then released for the controller to take).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

fn spawn_logged(cmd: &mut Command, log: &Path, level: &str) -> Child {
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    let err = out.try_clone().expect("dup log fd");
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .env("RUST_LOG", level);
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

/// Poll `f` every `every` until it returns `Some`, or panic with `what`
/// after `patience` (a failure, never a timing assertion).
pub fn poll<T>(
    what: &str,
    patience: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < patience, "gave up waiting for {what}");
        std::thread::sleep(every);
    }
}

/// An ed25519 signing key `alice` (ssh-keygen) and its allowed_signers file,
/// inside the fleet's own tree (a shared directory of test keys would put
/// its siblings into every run's sandbox rules).
fn make_keys(dir: &Path) {
    fs::create_dir_all(dir).expect("keys dir");
    let key = dir.join("alice");
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "alice", "-f"])
            .arg(&key),
    );
    let public = fs::read_to_string(key.with_extension("pub")).expect("public key");
    let mut fields = public.split_whitespace();
    let allowed = format!(
        "alice {} {}\n",
        fields.next().expect("key type"),
        fields.next().expect("key")
    );
    fs::write(dir.join("allowed_signers"), allowed).expect("allowed_signers");
    crate::root_only(&dir.join("allowed_signers"), 0o644);
}

/// The name of host `i`.
pub fn host_name(i: usize) -> String {
    format!("{PREFIX}{i:05}")
}

impl ScaleFleet {
    /// A CA, a controller configuration and `count` enrolled hosts with
    /// their policies; nothing started yet. `kill_ack_timeout` is how long
    /// `rollguard kill` waits for the agents' confirmations.
    pub fn new(count: usize, kill_ack_timeout: &str) -> Self {
        Self::build(count, kill_ack_timeout, None, 0)
    }

    /// `1 + extra` controller replicas on the PostgreSQL database `url`;
    /// host `i` lists replica `i % (1 + extra)` first, so the hosts are
    /// spread over the replicas.
    pub fn replicated(count: usize, kill_ack_timeout: &str, url: &str, extra: usize) -> Self {
        Self::build(count, kill_ack_timeout, Some(url), extra)
    }

    fn build(count: usize, kill_ack_timeout: &str, postgres: Option<&str>, extra: usize) -> Self {
        fs::create_dir_all(BASE).expect("create the scale base directory");
        crate::root_only(Path::new(BASE), 0o755);
        let dir = tempfile::Builder::new()
            .prefix("fleet-")
            .tempdir_in(BASE)
            .expect("scale fleet directory");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        make_keys(&dir.path().join("keys"));
        let port = free_port();
        let ctl = dir.path().join("ctl");
        run_ok(
            Command::new(bin("rollguard-controller"))
                .args(["init", "--dir"])
                .arg(&ctl)
                .args(["--listen", &format!("127.0.0.1:{port}")]),
        );
        let config = fs::read_to_string(ctl.join("controller.toml")).expect("controller.toml");
        let mut config = config.replace(
            "kill_ack_timeout = \"3s\"",
            &format!("kill_ack_timeout = {kill_ack_timeout:?}"),
        );
        if let Some(url) = postgres {
            config = config.replace(
                "kind = \"sqlite\"\npath = \"controller.db\"",
                &format!("kind = \"postgres\"\nurl = \"{url}\""),
            );
            assert!(config.contains("postgres"), "storage section not found");
        }
        fs::write(ctl.join("controller.toml"), &config).expect("write controller.toml");
        let replicas: Vec<(u16, Option<Child>)> = (0..extra).map(|_| (free_port(), None)).collect();
        for (i, (p, _)) in replicas.iter().enumerate() {
            let listen = |p: u16| format!("listen = \"127.0.0.1:{p}\"");
            fs::write(
                ctl.join(format!("controller-{}.toml", i + 1)),
                config.replace(&listen(port), &listen(*p)),
            )
            .expect("write a replica's controller.toml");
        }
        fs::create_dir_all(dir.path().join("work")).expect("work dir");
        let fleet = ScaleFleet {
            dir,
            port,
            count,
            controller: None,
            replicas,
            sims: Vec::new(),
            operator: std::sync::OnceLock::new(),
            executor: Executor::Sandbox,
        };
        fleet.enroll_all();
        fleet
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }
    pub fn ctl(&self) -> PathBuf {
        self.root().join("ctl")
    }
    pub fn hosts_dir(&self) -> PathBuf {
        self.root().join("hosts")
    }
    /// `hosts/ggg/sim-nnnnn` (see `crate::simulate`:
    /// grouped so no directory on the way to a host's protected paths has
    /// thousands of entries, as none has on a real host).
    pub fn host_dir(&self, i: usize) -> PathBuf {
        self.hosts_dir()
            .join(format!("{:03}", i / 100))
            .join(host_name(i))
    }
    pub fn state_dir(&self, i: usize) -> PathBuf {
        self.host_dir(i).join("state")
    }
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Replica `i`'s URL (0: [`ScaleFleet::url`]).
    pub fn replica_url(&self, i: usize) -> String {
        match i {
            0 => self.url(),
            i => format!("https://127.0.0.1:{}", self.replicas[i - 1].0),
        }
    }

    /// Host `i`'s `[controller] url` (TOML): every replica, replica
    /// `i % replicas` first.
    fn host_urls(&self, i: usize) -> String {
        let count = self.replicas.len() + 1;
        let urls: Vec<String> = (0..count)
            .map(|k| self.replica_url((i + k) % count))
            .collect();
        format!("{urls:?}")
    }

    /// Start every further replica (after [`ScaleFleet::start_controller`]).
    pub fn start_replicas(&mut self) {
        for i in 1..=self.replicas.len() {
            let child = spawn_logged(
                Command::new(bin("rollguard-controller"))
                    .arg("serve")
                    .arg("--config")
                    .arg(self.ctl().join(format!("controller-{i}.toml"))),
                &self.ctl().join(format!("controller-{i}.log")),
                "warn",
            );
            self.replicas[i - 1].1 = Some(child);
            let url = self.replica_url(i);
            poll(
                "a replica to answer",
                Duration::from_secs(60),
                Duration::from_millis(100),
                || {
                    run(crate::operator_cli(&url, &self.ctl(), self.root())
                        .args(["agents", "--json"]))
                    .status
                    .success()
                    .then_some(())
                },
            );
        }
    }

    /// Every running controller process (replica 0 first).
    pub fn controller_pids(&self) -> Vec<u32> {
        self.controller
            .iter()
            .chain(self.replicas.iter().filter_map(|r| r.1.as_ref()))
            .map(Child::id)
            .collect()
    }

    /// Enroll every host (in-process, with the controller's own PKI code:
    /// the same certificates `rollguard-controller enroll` makes, without
    /// 10,000 process starts) and write its policy.
    fn enroll_all(&self) {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let chunk = self.count.div_ceil(threads).max(1);
        std::thread::scope(|s| {
            for start in (0..self.count).step_by(chunk) {
                let end = (start + chunk).min(self.count);
                s.spawn(move || {
                    for i in start..end {
                        self.enroll(i);
                    }
                });
            }
        });
    }

    fn enroll(&self, i: usize) {
        let name = host_name(i);
        let dir = self.host_dir(i);
        let creds = dir.join("creds");
        fs::create_dir_all(&creds).expect("creds dir");
        let (cert, key) =
            issue(&CaDir::new(self.ctl()), Role::Agent, &name).expect("issue agent certificate");
        fs::write(creds.join("agent.crt"), cert).expect("write cert");
        fs::write(creds.join("agent.key"), key).expect("write key");
        fs::set_permissions(creds.join("agent.key"), fs::Permissions::from_mode(0o600))
            .expect("chmod key");
        let policy = format!(
            "[host]\nname = {name:?}\nlabels = {{ role = \"sim\" }}\n\n\
             [trust]\nallowed_signers = {signers:?}\nthreshold = 1\ndelete_threshold = 1\n\n\
             [protect]\npaths = []\n\n\
             [limits]\nallow_scopes = [{work:?}]\n\n\
             [state]\ndir = {state:?}\n\n\
             [controller]\nurl = {url}\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n",
            signers = self.root().join("keys/allowed_signers"),
            work = self.root().join("work"),
            state = dir.join("state"),
            url = self.host_urls(i),
            ca = self.ctl().join("ca.crt"),
            cert = creds.join("agent.crt"),
            key = creds.join("agent.key"),
        );
        fs::write(dir.join("agent.toml"), policy).expect("write policy");
        crate::root_only(&dir.join("agent.toml"), 0o600);
    }

    /// Start the controller and wait until it answers.
    pub fn start_controller(&mut self) {
        assert!(self.controller.is_none(), "controller already running");
        // SCALE_CONTROLLER_CMD: a wrapper to run the controller under (a
        // profiler), given the controller's arguments.
        let program = std::env::var_os("SCALE_CONTROLLER_CMD")
            .map(PathBuf::from)
            .unwrap_or_else(|| bin("rollguard-controller"));
        let child = spawn_logged(
            Command::new(program)
                .arg("serve")
                .arg("--config")
                .arg(self.ctl().join("controller.toml")),
            &self.ctl().join("controller.log"),
            "warn",
        );
        self.controller = Some(child);
        poll(
            "the controller to answer",
            Duration::from_secs(60),
            Duration::from_millis(100),
            || {
                run(self.cli().args(["agents", "--json"]))
                    .status
                    .success()
                    .then_some(())
            },
        );
    }

    pub fn controller_pid(&self) -> u32 {
        self.controller.as_ref().expect("controller running").id()
    }

    pub fn sim_pids(&self) -> Vec<u32> {
        self.sims.iter().map(Child::id).collect()
    }

    /// Start the hosts in `processes` `rollguard-simulate` processes
    /// (one protocol thread each) and wait until every host is connected.
    /// Returns how long connecting took.
    /// `max_running` bounds the bundles running at once per process (0:
    /// unbounded; see `rollguard-simulate --help`).
    pub fn start_agents(&mut self, processes: usize, max_running: usize) -> Duration {
        self.start_agents_of(self.count, processes, max_running)
    }

    /// Like [`Self::start_agents`] for hosts `0..hosts` only; waits until
    /// `hosts` agents are connected in all.
    pub fn start_agents_of(
        &mut self,
        hosts: usize,
        processes: usize,
        max_running: usize,
    ) -> Duration {
        let started = Instant::now();
        let per = hosts.div_ceil(processes.max(1));
        for first in (0..hosts).step_by(per.max(1)) {
            let count = per.min(hosts - first);
            let child = spawn_logged(
                Command::new(bin("rollguard-simulate"))
                    .arg("--dir")
                    .arg(self.hosts_dir())
                    .args(["--prefix", PREFIX])
                    .args(["--first", &first.to_string()])
                    .args(["--count", &count.to_string()])
                    .args(["--max-running", &max_running.to_string()])
                    .args([
                        "--executor",
                        match self.executor {
                            Executor::Sandbox => "sandbox",
                            Executor::Harness => "harness",
                        },
                    ]),
                &self.root().join(format!("sim-{first}.log")),
                "warn",
            );
            self.sims.push(child);
        }
        let patience = Duration::from_secs(120 + hosts as u64 / 20);
        poll(
            "every simulated agent to connect",
            patience,
            Duration::from_millis(500),
            || {
                for c in &mut self.sims {
                    if let Ok(Some(status)) = c.try_wait() {
                        panic!("a simulate process exited ({status}):\n{}", self.logs());
                    }
                }
                (self.connected() >= hosts).then_some(())
            },
        );
        started.elapsed()
    }

    /// Start host `i` as a standalone `rollguard-agent serve` (the real
    /// daemon binary, one process) and wait until the controller counts
    /// `expect_connected` agents. Returns its pid.
    pub fn start_serve(&mut self, i: usize, expect_connected: usize) -> u32 {
        let dir = self.host_dir(i);
        let child = spawn_logged(
            Command::new(bin("rollguard-agent"))
                .args(["serve", "--policy"])
                .arg(dir.join("agent.toml"))
                .arg("--socket")
                .arg(dir.join("agent.sock")),
            &self.root().join(format!("serve-{i}.log")),
            "warn",
        );
        let pid = child.id();
        self.sims.push(child);
        poll(
            "the standalone agent to connect",
            Duration::from_secs(60),
            Duration::from_millis(100),
            || (self.connected() >= expect_connected).then_some(()),
        );
        pid
    }

    /// How many agents the controller counts as connected (its
    /// `rollguard_connected_agents` gauge).
    pub fn connected(&self) -> usize {
        let here = self.metric("rollguard_connected_agents").unwrap_or(0.0) as usize;
        let elsewhere: usize = (1..=self.replicas.len())
            .filter(|&i| self.replicas[i - 1].1.is_some())
            .filter_map(|i| {
                let op = Client::connect_with(
                    &self.replica_url(i),
                    &self.ctl().join("ca.crt"),
                    &self.ctl().join("operator.crt"),
                    &self.ctl().join("operator.key"),
                )
                .ok()?;
                let text = op.get_text("/metrics").ok()?;
                text.lines()
                    .find_map(|l| l.strip_prefix("rollguard_connected_agents "))
                    .and_then(|v| v.trim().parse::<usize>().ok())
            })
            .sum();
        here + elsewhere
    }

    /// A persistent operator connection (cheap to poll with, unlike
    /// starting the CLI for every look).
    pub fn operator(&self) -> &Client {
        self.operator.get_or_init(|| {
            Client::connect_with(
                &self.url(),
                &self.ctl().join("ca.crt"),
                &self.ctl().join("operator.crt"),
                &self.ctl().join("operator.key"),
            )
            .expect("operator connection to the controller")
        })
    }

    /// One sample of the controller's `/metrics` (`name` with its labels,
    /// e.g. `rollguard_rollouts{state="completed"}`).
    pub fn metric(&self, name: &str) -> Option<f64> {
        let text = self.operator().get_text("/metrics").ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    /// The `rollguard` CLI with the operator certificate.
    pub fn cli(&self) -> Command {
        crate::operator_cli(&self.url(), &self.ctl(), self.root())
    }

    /// Run `rollguard ARGS --json`, requiring success, and parse stdout.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        crate::cli_json(self.cli(), args)
    }

    /// Build and sign a bundle targeting every simulated host that runs
    /// `command` (an absolute path and its arguments) with write scope
    /// ROOT/work.
    pub fn bundle(&self, name: &str, command: &[&str], timeout: &str) -> PathBuf {
        let src = self.root().join(format!("src-{name}"));
        fs::create_dir_all(&src).expect("bundle source dir");
        let manifest = format!(
            "[bundle]\nname = {name:?}\nversion = 1\ndescription = \"scale test\"\nexpires = 2099-01-01T00:00:00Z\n\n\
             [targets]\nhosts = [\"{PREFIX}*\"]\n\n[scope]\nwrite = [{work:?}]\n\n\
             [run]\ncommand = {command:?}\ntimeout = {timeout:?}\n",
            work = self.root().join("work"),
        );
        fs::write(src.join("bundle.toml"), manifest).expect("write manifest");
        fs::write(src.join("README"), "nothing to unpack but this\n").expect("write payload");
        let out = self.root().join(format!("{name}.bundle"));
        crate::build_and_sign(&src, &out, &self.root().join("keys/alice"), "alice")
    }

    /// `rollguard rollout start BUNDLE ARGS --json`; returns the rollout id.
    pub fn start_rollout(&self, bundle: &Path, args: &[&str]) -> String {
        crate::start_rollout(self.cli(), bundle, args)
    }

    pub fn status(&self, id: &str) -> Value {
        crate::rollout_status(self.cli(), id)
    }

    /// Wait (polling every `every`) until the rollout is `state`; panics if
    /// it ends in another state.
    pub fn wait_state(&self, id: &str, state: &str, patience: Duration, every: Duration) -> Value {
        poll(
            &format!("rollout {id} to be {state}"),
            patience,
            every,
            || {
                let s = self.status(id);
                if s["state"] == state {
                    return Some(s);
                }
                assert!(
                    s["state"] == "running",
                    "rollout {id} became {} (expected {state}): halt reason {}\n\
                     hosts that did not succeed:\n{}\n{}",
                    s["state"],
                    s["halt_reason"],
                    unsuccessful_hosts(&s),
                    self.logs()
                );
                None
            },
        )
    }

    /// The tails of the controller's and the simulate processes' logs.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let mut paths = vec![self.ctl().join("controller.log")];
        if let Ok(entries) = fs::read_dir(self.root()) {
            let mut sims: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "log"))
                .collect();
            sims.sort();
            paths.extend(sims);
        }
        for path in paths {
            let text = fs::read_to_string(&path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            out.push_str(&format!("--- {} ---\n", path.display()));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Stop every agent process (the controller keeps running).
    pub fn stop_agents(&mut self) {
        for mut c in self.sims.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        poll(
            "the controller to see the agents gone",
            Duration::from_secs(120),
            Duration::from_millis(200),
            || (self.connected() == 0).then_some(()),
        );
    }

    fn stop(&mut self) {
        for mut c in self.sims.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        let replicas = self.replicas.iter_mut().filter_map(|r| r.1.take());
        for mut c in self.controller.take().into_iter().chain(replicas) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ScaleFleet {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Processes whose command line contains `marker` (scanning /proc), by pid.
pub fn processes_with(marker: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains(marker) && !text.contains("pgrep") {
            out.push(pid);
        }
    }
    out
}

/// Whether a process is gone (no such pid, or a zombie / dead entry).
pub fn is_dead(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            // "pid (comm) S ...": the state follows the last ')'.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .unwrap_or("");
            state == "Z" || state == "X"
        }
    }
}

/// VmRSS of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Each host of a rollout status that has an outcome other than success,
/// with its report: what a failed scale run needs to be diagnosed.
fn unsuccessful_hosts(status: &Value) -> String {
    let hosts = status["hosts"].as_array().cloned().unwrap_or_default();
    let lines: Vec<String> = hosts
        .iter()
        .filter(|h| {
            !matches!(
                h["state"].as_str(),
                Some("succeeded" | "pending" | "dispatched")
            )
        })
        .map(|h| format!("{} {}: {}", h["host"], h["state"], h["report"]))
        .collect();
    if lines.is_empty() {
        "(none)".to_string()
    } else {
        lines.join("\n")
    }
}
