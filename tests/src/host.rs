//! A test host: a directory tree standing in for a server's filesystem
//! (customer data, a backup volume, config dirs), a host policy, signing
//! keys and helpers to build, sign and run bundles on it.
//!
//! Trees live under `/var/lib/rollguard-tests`, not `/tmp`: the sandbox gives
//! every bundle a private `/tmp`, so a tree there would be invisible to it.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::{agent, rollguard, root_only, run, run_ok};

const BASE: &str = "/var/lib/rollguard-tests";

/// Signing keys and the matching `allowed_signers` file, shared by hosts.
pub struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    /// Create ed25519 keys with `ssh-keygen` for each principal.
    pub fn new(principals: &[&str]) -> Self {
        fs::create_dir_all(BASE).unwrap();
        root_only(Path::new(BASE), 0o755);
        let dir = tempfile::Builder::new()
            .prefix("keys-")
            .tempdir_in(BASE)
            .unwrap();
        let mut allowed = String::new();
        for p in principals {
            let key = dir.path().join(p);
            run_ok(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-C", p, "-f"])
                    .arg(&key),
            );
            let public = fs::read_to_string(key.with_extension("pub")).unwrap();
            let mut fields = public.split_whitespace();
            allowed.push_str(&format!(
                "{p} {} {}\n",
                fields.next().unwrap(),
                fields.next().unwrap()
            ));
        }
        fs::write(dir.path().join("allowed_signers"), allowed).unwrap();
        root_only(&dir.path().join("allowed_signers"), 0o644);
        Keys { dir }
    }

    pub fn key(&self, principal: &str) -> PathBuf {
        self.dir.path().join(principal)
    }

    pub fn allowed_signers(&self) -> PathBuf {
        self.dir.path().join("allowed_signers")
    }
}

/// One simulated host.
pub struct Host {
    dir: tempfile::TempDir,
    pub name: String,
}

/// Policy knobs a test may change.
pub struct PolicyOptions {
    pub labels: BTreeMap<String, String>,
    pub threshold: u32,
    pub delete_threshold: u32,
}

impl Default for PolicyOptions {
    fn default() -> Self {
        PolicyOptions {
            labels: BTreeMap::from([("role".to_string(), "mail".to_string())]),
            threshold: 1,
            delete_threshold: 1,
        }
    }
}

impl Host {
    /// A host tree with customer data and a protected backup volume:
    /// `root/home/customers/{alice,bob}/…`, `root/backup/…` (protected),
    /// `root/etc/mail` (config), `root/var/spool/tmp`.
    pub fn new(name: &str, keys: &Keys, opts: PolicyOptions) -> Self {
        fs::create_dir_all(BASE).unwrap();
        root_only(Path::new(BASE), 0o755);
        let dir = tempfile::Builder::new()
            .prefix("host-")
            .tempdir_in(BASE)
            .unwrap();
        let host = Host {
            dir,
            name: name.to_string(),
        };
        let r = host.root();
        for (path, body) in [
            ("home/customers/alice/mail/inbox", "alice's mail\n"),
            ("home/customers/alice/site/index.html", "<h1>alice</h1>\n"),
            ("home/customers/bob/db.sql", "INSERT INTO t VALUES (1);\n"),
            ("backup/daily/customers.tar", "backup of every customer\n"),
            ("etc/mail/main.cf", "queue_lifetime = 5d\n"),
            ("var/spool/tmp/stale-1", "stale\n"),
        ] {
            let p = r.join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, body).unwrap();
        }
        let labels: Vec<String> = opts
            .labels
            .iter()
            .map(|(k, v)| format!("{k} = {v:?}"))
            .collect();
        let policy = format!(
            "[host]\nname = {name:?}\nlabels = {{ {} }}\n\n[trust]\nallowed_signers = {:?}\nthreshold = {}\ndelete_threshold = {}\n\n[protect]\npaths = [{:?}]\n\n[limits]\nallow_scopes = [{:?}]\n\n[state]\ndir = {:?}\n",
            labels.join(", "),
            keys.allowed_signers(),
            opts.threshold,
            opts.delete_threshold,
            r.join("backup"),
            r,
            host.dir.path().join("state"),
        );
        fs::write(host.policy(), policy).unwrap();
        root_only(&host.policy(), 0o600);
        host
    }

    /// The host's filesystem root (absolute).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn policy(&self) -> PathBuf {
        self.dir.path().join("agent.toml")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Every file under the root with its bytes, for before/after checks.
    pub fn snapshot(&self, sub: &str) -> BTreeMap<PathBuf, Vec<u8>> {
        crate::snapshot(&self.root().join(sub))
    }

    /// Write a bundle source (manifest text with `@ROOT@` replaced by this
    /// host's root, plus a `run.sh` script) into a fresh directory.
    pub fn bundle_source(&self, label: &str, manifest: &str, script: &str) -> PathBuf {
        let src = self.dir.path().join(format!("src-{label}"));
        fs::create_dir_all(&src).unwrap();
        let root = self.root();
        let root = root.to_str().unwrap();
        fs::write(src.join("bundle.toml"), manifest.replace("@ROOT@", root)).unwrap();
        let script_path = src.join("run.sh");
        fs::write(&script_path, script.replace("@ROOT@", root)).unwrap();
        fs::set_permissions(&script_path, fs::Permissions::from_mode(0o755)).unwrap();
        src
    }

    /// Build a bundle from `src` and sign it with each of `signers`.
    pub fn build_signed(&self, src: &Path, keys: &Keys, signers: &[&str]) -> PathBuf {
        let out = src.with_extension("bundle");
        run_ok(
            rollguard()
                .args(["bundle", "build"])
                .arg(src)
                .arg("-o")
                .arg(&out),
        );
        for s in signers {
            run_ok(
                rollguard()
                    .args(["bundle", "sign"])
                    .arg(&out)
                    .arg("--key")
                    .arg(keys.key(s))
                    .args(["--signer", s]),
            );
        }
        out
    }

    /// Append `text` (a table such as `[services]`) to the host policy.
    pub fn append_policy(&self, text: &str) {
        let mut policy = fs::read_to_string(self.policy()).unwrap();
        policy.push('\n');
        policy.push_str(text);
        fs::write(self.policy(), policy).unwrap();
        root_only(&self.policy(), 0o600);
    }

    /// `rollguard-agent run --json`: the report and the exit code.
    pub fn run(&self, bundle: &Path) -> (Value, i32) {
        self.run_env(bundle, &[])
    }

    /// [`Host::run`] with extra environment for the agent (e.g.
    /// `DBUS_SYSTEM_BUS_ADDRESS`, the bus the service broker uses).
    pub fn run_env(&self, bundle: &Path, env: &[(&str, &str)]) -> (Value, i32) {
        self.run_with(bundle, env, &[])
    }

    /// `rollguard-agent run --preview --json`: the report and the exit code.
    pub fn preview(&self, bundle: &Path) -> (Value, i32) {
        self.run_with(bundle, &[], &["--preview"])
    }

    fn run_with(&self, bundle: &Path, env: &[(&str, &str)], args: &[&str]) -> (Value, i32) {
        let mut cmd = agent();
        cmd.envs(env.iter().copied());
        let out = run(cmd
            .args(["run", "--json"])
            .args(args)
            .arg("--policy")
            .arg(self.policy())
            .arg(bundle));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let report: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "agent printed no JSON report ({e}):\nstdout: {stdout}\nstderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (report, out.status.code().unwrap_or(-1))
    }
}

/// A manifest with the given targets/scope lines; `@ROOT@` is the host root.
/// (access, path) of each denial a run report lists; panics when the
/// report says its denials are unknown (they are known on the test kernel).
pub fn denials(report: &Value) -> Vec<(String, String)> {
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

pub fn manifest(name: &str, version: u64, hosts: &str, scope: &str) -> String {
    format!(
        "[bundle]\nname = {name:?}\nversion = {version}\ndescription = \"test\"\nexpires = 2099-01-01T00:00:00Z\n\n[targets]\nhosts = [{hosts}]\n\n[scope]\n{scope}\n\n[run]\ncommand = [\"./run.sh\"]\ntimeout = \"30s\"\n"
    )
}

/// Type and mode, owner, group, size, mtime (s, ns), ctime (s, ns) and,
/// for files, bytes.
pub type Stamp = (u32, u32, u32, u64, i64, i64, i64, i64, Vec<u8>);

/// Every path beneath `root` (or `root` itself, a file) with its
/// [`Stamp`]: what a test compares to show nothing on disk changed.
pub fn disk(root: &Path) -> BTreeMap<PathBuf, Stamp> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = fs::symlink_metadata(&p).unwrap();
        let bytes = if m.is_file() {
            fs::read(&p).unwrap()
        } else {
            Vec::new()
        };
        if m.is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
        out.insert(
            p,
            (
                m.mode(),
                m.uid(),
                m.gid(),
                m.size(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
                bytes,
            ),
        );
    }
    out
}
