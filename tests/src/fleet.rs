//! A fleet on loopback for the end-to-end tests: a real controller
//! (`rollguard-controller serve`) and real agent daemons
//! (`rollguard-agent serve`), each agent with its own policy, state
//! directory, certificate and local socket, driven with the real `rollguard`
//! CLI.
//!
//! One bundle is rolled out to every host, so the hosts' trees share a
//! layout keyed by host name (the runner gives each run `ROLLGUARD_HOST`):
//!
//! ```text
//! FLEET/mail/<host>/          what a mail fix may change (scope.write = FLEET/mail)
//! FLEET/customers/<host>/     customer data: outside every bundle's scope
//! FLEET/backup/<host>/        backups: protected by every host's policy
//! FLEET/agents/<host>/        policy, state dir, credentials, socket, log
//! FLEET/ctl/                  the controller's CA directory, config, database, log
//! ```
//!
//! Everything lives under `/var/lib/rollguard-tests` (the sandbox gives each
//! bundle a private `/tmp`). Processes are killed when the [`Fleet`] drops.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::host::Keys;
use crate::{bin, run, run_ok};

const BASE: &str = "/var/lib/rollguard-tests";
/// Upper bound for anything the tests wait for (a failure, not a timing
/// assertion: tests wait for states, and give up only after this).
pub const PATIENCE: Duration = Duration::from_secs(180);

pub struct AgentProc {
    pub name: String,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl AgentProc {
    pub fn policy(&self) -> PathBuf {
        self.dir.join("agent.toml")
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }
}

pub struct Fleet {
    dir: tempfile::TempDir,
    pub keys: Keys,
    pub port: u16,
    controller: Option<Child>,
    /// Further controller replicas (PostgreSQL only): each its port and
    /// process, `ctl/controller-N.toml` (N from 1); see [`Fleet::replicated`].
    replicas: Vec<(u16, Option<Child>)>,
    pub agents: BTreeMap<String, AgentProc>,
}

/// A free loopback port (bound, then released for the controller to take).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

fn spawn_logged(cmd: &mut Command, log: &Path) -> Child {
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let err = out.try_clone().unwrap();
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .env("RUST_LOG", "info");
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

/// Poll `f` until it returns `Some`, or panic with `what` after [`PATIENCE`].
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < PATIENCE, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Fleet {
    /// A CA, a controller config and one agent per `(name, labels)`; nothing
    /// is started yet.
    pub fn new(hosts: &[(&str, &[(&str, &str)])]) -> Self {
        Self::build(hosts, None, 0)
    }

    /// `1 + extra` controller replicas on the PostgreSQL database `url`
    /// (same CA, server certificate and database; their own ports). Agents
    /// get every replica's URL: even-numbered agents list replica 0 first,
    /// odd ones replica 1, so both replicas serve agents.
    pub fn replicated(hosts: &[(&str, &[(&str, &str)])], url: &str, extra: usize) -> Self {
        Self::build(hosts, Some(url), extra)
    }

    fn build(hosts: &[(&str, &[(&str, &str)])], postgres: Option<&str>, extra: usize) -> Self {
        fs::create_dir_all(BASE).unwrap();
        crate::root_only(Path::new(BASE), 0o755);
        let dir = tempfile::Builder::new()
            .prefix("fleet-")
            .tempdir_in(BASE)
            .unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let keys = Keys::new(&["alice", "bob"]);
        let port = free_port();
        let ctl = dir.path().join("ctl");
        run_ok(
            Command::new(bin("rollguard-controller"))
                .args(["init", "--dir"])
                .arg(&ctl)
                .args(["--listen", &format!("127.0.0.1:{port}")]),
        );
        // Short result margin: a host that never answers times out soon.
        // Generous kill acknowledgement wait: `kill` returns as soon as every
        // agent confirmed, and a loaded CI machine must not turn a slow
        // confirmation into a failure.
        let config = fs::read_to_string(ctl.join("controller.toml")).unwrap();
        let config = config
            .replace("result_margin = \"60s\"", "result_margin = \"20s\"")
            .replace("kill_ack_timeout = \"3s\"", "kill_ack_timeout = \"20s\"");
        fs::write(ctl.join("controller.toml"), &config).unwrap();
        let replicas: Vec<(u16, Option<Child>)> = (0..extra).map(|_| (free_port(), None)).collect();
        for (i, (p, _)) in replicas.iter().enumerate() {
            // Each replica its own port and its own revoked.list (as on
            // separate machines): only the database is shared.
            let listen = |p: u16| format!("listen = \"127.0.0.1:{p}\"");
            let revoked = format!("revoked-{}.list", i + 1);
            fs::copy(ctl.join("revoked.list"), ctl.join(&revoked)).unwrap();
            fs::write(
                ctl.join(format!("controller-{}.toml", i + 1)),
                config.replace(&listen(port), &listen(*p)).replace(
                    "revoked = \"revoked.list\"",
                    &format!("revoked = \"{revoked}\""),
                ),
            )
            .unwrap();
        }
        let mut fleet = Fleet {
            dir,
            keys,
            port,
            controller: None,
            replicas,
            agents: BTreeMap::new(),
        };
        if let Some(url) = postgres {
            fleet.use_postgres(url);
        }
        for (name, labels) in hosts {
            fleet.add_agent(name, labels);
        }
        fleet
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn ctl(&self) -> PathBuf {
        self.root().join("ctl")
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn mail(&self, host: &str) -> PathBuf {
        self.root().join("mail").join(host)
    }
    pub fn customers(&self, host: &str) -> PathBuf {
        self.root().join("customers").join(host)
    }
    pub fn backup(&self, host: &str) -> PathBuf {
        self.root().join("backup").join(host)
    }

    fn add_agent(&mut self, name: &str, labels: &[(&str, &str)]) {
        let root = self.root().to_path_buf();
        for (path, body) in [
            (self.mail(name).join("main.cf"), "queue_lifetime = 5d\n"),
            (self.customers(name).join("alice/inbox"), "alice's mail\n"),
            (
                self.customers(name).join("bob/db.sql"),
                "INSERT INTO t VALUES (1);\n",
            ),
            (
                self.backup(name).join("daily/customers.tar"),
                "backup of every customer\n",
            ),
        ] {
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, body).unwrap();
        }
        let dir = root.join("agents").join(name);
        fs::create_dir_all(&dir).unwrap();
        let creds = dir.join("creds");
        self.enroll(name, &creds);
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k} = {v:?}")).collect();
        // `url` is a TOML string, or with replicas an array (Debug of a
        // Vec<String> is valid TOML).
        let policy = format!(
            "[host]\nname = {name:?}\nlabels = {{ {labels} }}\n\n\
             [trust]\nallowed_signers = {signers:?}\nthreshold = 1\ndelete_threshold = 1\n\n\
             [protect]\npaths = [{backup:?}]\n\n\
             [limits]\nallow_scopes = [{mail:?}, {customers:?}]\n\n\
             [state]\ndir = {state:?}\n\n\
             [controller]\nurl = {url}\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n",
            labels = labels.join(", "),
            signers = self.keys.allowed_signers(),
            backup = root.join("backup"),
            mail = root.join("mail"),
            customers = root.join("customers"),
            state = dir.join("state"),
            url = self.agent_urls(self.agents.len()),
            ca = self.ctl().join("ca.crt"),
            cert = creds.join(format!("{name}.crt")),
            key = creds.join(format!("{name}.key")),
        );
        fs::write(dir.join("agent.toml"), policy).unwrap();
        crate::root_only(&dir.join("agent.toml"), 0o600);
        self.agents.insert(
            name.to_string(),
            AgentProc {
                name: name.to_string(),
                dir,
                child: None,
            },
        );
    }

    /// `rollguard-controller enroll NAME --out OUT`: the host's certificate
    /// and key, `OUT/NAME.crt` and `OUT/NAME.key`. The fleet CA is
    /// [`Fleet::ctl`]`/ca.crt`.
    pub fn enroll(&self, name: &str, out: &Path) {
        run_ok(
            Command::new(bin("rollguard-controller"))
                .args(["enroll", "--dir"])
                .arg(self.ctl())
                .arg(name)
                .arg("--out")
                .arg(out),
        );
    }

    /// A person's certificate with `role` (`rollguard-controller enroll
    /// --role ROLE NAME`), in `ROOT/NAME/NAME.crt` and `.key`; returns that
    /// directory.
    pub fn enroll_person(&self, name: &str, role: &str) -> PathBuf {
        let out = self.root().join(name);
        run_ok(
            Command::new(bin("rollguard-controller"))
                .args(["enroll", "--role", role, "--dir"])
                .arg(self.ctl())
                .arg(name)
                .arg("--out")
                .arg(&out),
        );
        out
    }

    /// The `rollguard` CLI with the certificate of a person enrolled with
    /// [`Fleet::enroll_person`] instead of the operator's.
    pub fn cli_as(&self, name: &str) -> Command {
        let dir = self.root().join(name);
        let mut cmd = self.cli();
        cmd.env("ROLLGUARD_CERT", dir.join(format!("{name}.crt")))
            .env("ROLLGUARD_KEY", dir.join(format!("{name}.key")));
        cmd
    }

    /// The 2012 replay: a mail fix (`touch $H/enabled`) with a stray line
    /// deleting the host's customer data and backups, for `mail-*`.
    pub fn incident_bundle(&self) -> PathBuf {
        self.bundle(
            "incident",
            &manifest("mail-fix-2012", 1, "\"mail-*\"", "1m"),
            &script(
                "touch \"$H/enabled\"\nrm -rf \"@FLEET@/customers/$ROLLGUARD_HOST\" \"@FLEET@/backup/$ROLLGUARD_HOST\"\necho done",
            ),
        )
    }

    /// Keep the controller's state in PostgreSQL (`url`, a database of a
    /// [`crate::postgres::PgCluster`]) instead of the default SQLite file.
    pub fn use_postgres(&self, url: &str) {
        for path in self.replica_configs() {
            let config = fs::read_to_string(&path).unwrap();
            let sqlite = "kind = \"sqlite\"\npath = \"controller.db\"";
            assert!(config.contains(sqlite), "storage section not found");
            let config = config.replace(sqlite, &format!("kind = \"postgres\"\nurl = \"{url}\""));
            fs::write(&path, config).unwrap();
        }
    }

    /// Every replica's configuration file, replica 0 first.
    fn replica_configs(&self) -> Vec<PathBuf> {
        let mut out = vec![self.ctl().join("controller.toml")];
        out.extend(
            (1..=self.replicas.len()).map(|i| self.ctl().join(format!("controller-{i}.toml"))),
        );
        out
    }

    /// Replica `i`'s URL (0: [`Fleet::url`]).
    pub fn replica_url(&self, i: usize) -> String {
        match i {
            0 => self.url(),
            i => format!("https://127.0.0.1:{}", self.replicas[i - 1].0),
        }
    }

    /// The `url` value of agent number `n`'s policy (TOML).
    fn agent_urls(&self, n: usize) -> String {
        if self.replicas.is_empty() {
            return format!("{:?}", self.url());
        }
        let count = self.replicas.len() + 1;
        let urls: Vec<String> = (0..count)
            .map(|k| self.replica_url((n + k) % count))
            .collect();
        format!("{urls:?}")
    }

    /// Start replica `i` (from 1) and wait until it answers.
    pub fn start_replica(&mut self, i: usize) {
        assert!(
            self.replicas[i - 1].1.is_none(),
            "replica {i} already running"
        );
        let child = spawn_logged(
            Command::new(bin("rollguard-controller"))
                .arg("serve")
                .arg("--config")
                .arg(self.ctl().join(format!("controller-{i}.toml"))),
            &self.ctl().join(format!("controller-{i}.log")),
        );
        self.replicas[i - 1].1 = Some(child);
        wait_for(&format!("replica {i} to answer"), || {
            let out = run(self.cli_at(i).args(["agents", "--json"]));
            out.status.success().then_some(())
        });
    }

    /// SIGKILL replica `i` (from 1).
    pub fn kill_replica(&mut self, i: usize) {
        let mut child = self.replicas[i - 1].1.take().expect("replica not running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// The `rollguard` CLI talking to replica `i` only.
    pub fn cli_at(&self, i: usize) -> Command {
        crate::operator_cli(&self.replica_url(i), &self.ctl(), self.root())
    }

    /// Start (or restart) the controller and wait until it answers.
    pub fn start_controller(&mut self) {
        assert!(self.controller.is_none(), "controller already running");
        let child = spawn_logged(
            Command::new(bin("rollguard-controller"))
                .arg("serve")
                .arg("--config")
                .arg(self.ctl().join("controller.toml")),
            &self.ctl().join("controller.log"),
        );
        self.controller = Some(child);
        wait_for("the controller to answer", || {
            let out = run(self.cli().args(["agents", "--json"]));
            out.status.success().then_some(())
        });
    }

    /// SIGKILL the controller (no shutdown of any kind) and reap it.
    pub fn kill_controller(&mut self) {
        let mut child = self.controller.take().expect("controller not running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    pub fn start_agent(&mut self, name: &str) {
        self.start_agent_with(name, &bin("rollguard-agent"));
    }

    /// Start agent `name` from the `rollguard-agent` binary `program` (an
    /// installation elsewhere, with its stage-2 program beside it).
    pub fn start_agent_with(&mut self, name: &str, program: &Path) {
        let agent = self
            .agents
            .get_mut(name)
            .unwrap_or_else(|| panic!("no agent {name}"));
        assert!(agent.child.is_none(), "agent {name} already running");
        let child = spawn_logged(
            Command::new(program)
                .args(["serve", "--policy"])
                .arg(agent.policy())
                .arg("--socket")
                .arg(agent.socket()),
            &agent.log(),
        );
        agent.child = Some(child);
    }

    /// Start every agent and wait until all are connected.
    pub fn start_agents(&mut self) {
        let names: Vec<String> = self.agents.keys().cloned().collect();
        for n in &names {
            self.start_agent(n);
        }
        for n in &names {
            self.wait_connected(n);
        }
    }

    pub fn stop_agent(&mut self, name: &str) {
        let agent = self.agents.get_mut(name).unwrap();
        let mut child = agent.child.take().expect("agent not running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Wait until agent `name` is connected (to any running replica), and
    /// every running replica knows it (a rollout planned on any of them
    /// counts it online).
    pub fn wait_connected(&self, name: &str) {
        wait_for(&format!("agent {name} to connect"), || {
            let seen = self
                .running_replicas()
                .into_iter()
                .all(|i| self.connection_seen_by(i, name).is_some());
            seen.then_some(())
        });
    }

    /// The indices of the running controllers (0: the first).
    fn running_replicas(&self) -> Vec<usize> {
        std::iter::once(0)
            .filter(|_| self.controller.is_some())
            .chain(
                self.replicas
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.1.is_some())
                    .map(|(i, _)| i + 1),
            )
            .collect()
    }

    /// Where replica `i` says agent `name` is connected (the `controller`
    /// of its `rollguard agents` entry), if it says it is.
    fn connection_seen_by(&self, i: usize, name: &str) -> Option<String> {
        let agents = crate::cli_json(self.cli_at(i), &["agents"]);
        agents.as_array()?.iter().find_map(|a| {
            (a["name"] == name && a["connected"] == true)
                .then(|| a["controller"].as_str().unwrap_or_default().to_string())
        })
    }

    /// The running replica agent `name` is connected to, if any: the one
    /// whose port ends the `controller` it is listed with.
    pub fn connected_to(&self, name: &str) -> Option<usize> {
        let running = self.running_replicas();
        let controller = running
            .iter()
            .find_map(|&i| self.connection_seen_by(i, name))?;
        running.into_iter().find(|&i| {
            let port = self
                .replica_url(i)
                .rsplit(':')
                .next()
                .unwrap_or_default()
                .to_string();
            controller.ends_with(&format!(":{port}"))
        })
    }

    /// The `rollguard` CLI with the operator certificate (every replica's
    /// URL, in order).
    pub fn cli(&self) -> Command {
        let urls: Vec<String> = (0..=self.replicas.len())
            .map(|i| self.replica_url(i))
            .collect();
        crate::operator_cli(&urls.join(","), &self.ctl(), self.root())
    }

    /// Run `rollguard ARGS --json`, requiring success, and parse stdout.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        crate::cli_json(self.cli(), args)
    }

    /// Write a bundle source whose manifest and script may use `@FLEET@`
    /// (the fleet directory), then build and sign it.
    pub fn bundle(&self, label: &str, manifest: &str, script: &str) -> PathBuf {
        let src = self.root().join(format!("src-{label}"));
        fs::create_dir_all(&src).unwrap();
        let fleet = self.root().to_str().unwrap();
        fs::write(src.join("bundle.toml"), manifest.replace("@FLEET@", fleet)).unwrap();
        let script_path = src.join("run.sh");
        fs::write(&script_path, script.replace("@FLEET@", fleet)).unwrap();
        fs::set_permissions(&script_path, fs::Permissions::from_mode(0o755)).unwrap();
        let out = self.root().join(format!("{label}.bundle"));
        crate::build_and_sign(&src, &out, &self.keys.key("alice"), "alice")
    }

    /// `rollguard rollout start BUNDLE ARGS --json`; returns the rollout id.
    pub fn start_rollout(&self, bundle: &Path, args: &[&str]) -> String {
        crate::start_rollout(self.cli(), bundle, args)
    }

    pub fn status(&self, id: &str) -> Value {
        crate::rollout_status(self.cli(), id)
    }

    /// Wait until the rollout's state is `state` ("completed", "halted").
    pub fn wait_state(&self, id: &str, state: &str) -> Value {
        wait_for(&format!("rollout {id} to be {state}"), || {
            let s = self.status(id);
            if s["state"] == state {
                return Some(s);
            }
            assert!(
                s["state"] == "running" || s["state"] == state,
                "rollout {id} became {} (expected {state}): {s:#}\n{}",
                s["state"],
                self.logs()
            );
            None
        })
    }

    /// Hosts of a status document with their state, in plan order.
    pub fn host_states(status: &Value) -> BTreeMap<String, String> {
        status["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                (
                    h["host"].as_str().unwrap().to_string(),
                    h["state"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// Lines a host's runs recorded in `FLEET/mail/<host>/runs` (each run
    /// of a test bundle appends its rollout id).
    pub fn runs_on(&self, host: &str) -> Vec<String> {
        fs::read_to_string(self.mail(host).join("runs"))
            .map(|t| t.lines().map(String::from).collect())
            .unwrap_or_default()
    }

    /// Controller and agent logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let mut add = |label: &str, path: PathBuf| {
            let text = fs::read_to_string(&path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            out.push_str(&format!("--- {label} ---\n"));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        };
        add("controller", self.ctl().join("controller.log"));
        for i in 1..=self.replicas.len() {
            add(
                &format!("controller replica {i}"),
                self.ctl().join(format!("controller-{i}.log")),
            );
        }
        for a in self.agents.values() {
            add(&a.name, a.log());
        }
        out
    }

    /// Every file under `dir` with its bytes.
    pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        crate::snapshot(dir)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let replicas = self.replicas.iter_mut().filter_map(|r| r.1.take());
        for mut c in self.controller.take().into_iter().chain(replicas) {
            let _ = c.kill();
            let _ = c.wait();
        }
        for a in self.agents.values_mut() {
            if let Some(mut c) = a.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A manifest for fleet bundles: targets `hosts`, writes `FLEET/mail`.
pub fn manifest(name: &str, version: u64, hosts: &str, timeout: &str) -> String {
    format!(
        "[bundle]\nname = {name:?}\nversion = {version}\ndescription = \"fleet test\"\nexpires = 2099-01-01T00:00:00Z\n\n\
         [targets]\nhosts = [{hosts}]\n\n[scope]\nwrite = [\"@FLEET@/mail\"]\n\n\
         [run]\ncommand = [\"./run.sh\"]\ntimeout = {timeout:?}\n"
    )
}

/// A script that records the run in `FLEET/mail/$ROLLGUARD_HOST/runs` and
/// then does `rest`.
pub fn script(rest: &str) -> String {
    format!("#!/bin/sh\nset -u\nH=\"@FLEET@/mail/$ROLLGUARD_HOST\"\necho \"${{ROLLGUARD_ROLLOUT:-manual}}\" >> \"$H/runs\"\n{rest}\n")
}
