//! Shared fixtures for the sandbox integration tests: a temporary tree on
//! real disk (not under /tmp, which the sandbox replaces with a private
//! tmpfs), a spec builder, a runner, and a byte-exact snapshot.
//!
//! These tests run real commands as root under the real kernel mechanisms
//! and must not be skipped: a missing mechanism makes them fail.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rollguard_agent::sandbox::spec::MIN_LANDLOCK_ABI;
use rollguard_agent::sandbox::{Launcher, RunOutcome, SandboxScope, SandboxSpec};
use rollguard_shared::path::ScopePath;

pub const TIMEOUT: Duration = Duration::from_secs(120);

/// A test tree:
///
/// ```text
/// customers/  protected   (a/data.db, b/data.db, index)
/// backup/     protected   (full.tar, nightly/2026-01-01.tar)
/// etc/app/    scope.write (app.conf)
/// spool/tmp/  scope.delete (job1, job2, old/job3)
/// other/      out of every scope (notes.txt)
/// payload/    the payload directory (run.sh)
/// run/        the run directory (agent-owned)
/// ```
pub struct Tree {
    _tmp: tempfile::TempDir,
    pub root: PathBuf,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub fn unique_run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "t{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

fn content(name: &str) -> Vec<u8> {
    // Distinct, non-trivial bytes per file so corruption is visible.
    (0..4096u32)
        .map(|i| (i.wrapping_mul(31) as u8) ^ name.len() as u8 ^ name.as_bytes()[0])
        .collect()
}

impl Tree {
    pub fn new() -> Tree {
        // Not under the target dir or /tmp: the checkout may itself live
        // under /tmp or /var/tmp, which the sandbox replaces with private
        // tmpfs mounts, so trees there would be invisible to the bundle.
        let base = PathBuf::from("/var/lib/rollguard-tests/sandbox");
        fs::create_dir_all(&base).unwrap();
        let tmp = tempfile::Builder::new()
            .prefix("sandbox-")
            .tempdir_in(&base)
            .unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let files = [
            "customers/a/data.db",
            "customers/b/data.db",
            "customers/index",
            "backup/full.tar",
            "backup/nightly/2026-01-01.tar",
            "etc/app/app.conf",
            "spool/tmp/job1",
            "spool/tmp/job2",
            "spool/tmp/old/job3",
            "other/notes.txt",
        ];
        for rel in files {
            let path = root.join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, content(rel)).unwrap();
        }
        fs::create_dir_all(root.join("payload")).unwrap();
        fs::create_dir_all(root.join("run")).unwrap();
        let script = root.join("payload/run.sh");
        fs::write(&script, "#!/bin/sh\necho payload-ran \"$@\"\n").unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        Tree { _tmp: tmp, root }
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    pub fn s(&self, rel: &str) -> String {
        self.p(rel).display().to_string()
    }

    fn scope_path(&self, rel: &str) -> ScopePath {
        ScopePath::parse(&self.s(rel)).unwrap()
    }

    /// `/bin/sh -c SCRIPT` with write `etc/app`, delete `spool/tmp`,
    /// protected `customers` and `backup`, no network.
    pub fn spec(&self, script: &str) -> SandboxSpec {
        SandboxSpec {
            run_id: unique_run_id(),
            payload_dir: self.p("payload"),
            run_dir: self.p("run"),
            command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: BTreeMap::new(),
            scope: SandboxScope {
                write: vec![self.scope_path("etc/app")],
                delete: vec![self.scope_path("spool/tmp")],
                read: vec![],
                network: vec![],
            },
            protected: vec![self.p("customers"), self.p("backup")],
            pins: vec![],
            landlock_min_abi: MIN_LANDLOCK_ABI,
            limits: Default::default(),
            preview: false,
            list_every_directory: false,
        }
    }

    pub fn scope(&self, rels: &[&str]) -> Vec<ScopePath> {
        rels.iter().map(|r| self.scope_path(r)).collect()
    }

    /// Run `spec` to completion and collect its output.
    pub fn run(&self, spec: &SandboxSpec) -> Run {
        let child = launcher().spawn(spec).expect("spawn");
        let outcome = child.wait(TIMEOUT).expect("wait");
        Run {
            stdout: fs::read_to_string(&outcome.stdout).unwrap_or_default(),
            stderr: fs::read_to_string(&outcome.stderr).unwrap_or_default(),
            outcome,
        }
    }

    pub fn sh(&self, script: &str) -> Run {
        self.run(&self.spec(script))
    }

    /// Every path under the tree (except the run directory) with its type,
    /// mode, link count and exact content.
    pub fn snapshot(&self) -> Snapshot {
        let mut entries = BTreeMap::new();
        walk(&self.root, &self.root, &mut entries);
        Snapshot(entries)
    }
}

pub fn launcher() -> Launcher {
    Launcher::new(env!("CARGO_BIN_EXE_rollguard-sandbox-exec")).expect("the stage-2 program")
}

#[derive(Debug)]
pub struct Run {
    pub outcome: RunOutcome,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn exit_code(&self) -> i32 {
        match self.outcome.termination {
            rollguard_agent::sandbox::Termination::Exited { code } => code,
            ref other => panic!(
                "run did not exit normally: {other:?}\nstdout:\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            ),
        }
    }

    /// `name=value` lines printed by the script.
    pub fn value(&self, name: &str) -> String {
        let prefix = format!("{name}=");
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| {
                panic!(
                    "no {name}= in stdout:\n{}\nstderr:\n{}\noutcome: {:?}",
                    self.stdout, self.stderr, self.outcome
                )
            })
            .to_string()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir {
        mode: u32,
    },
    File {
        mode: u32,
        nlink: u64,
        bytes: Vec<u8>,
    },
    Symlink {
        target: PathBuf,
    },
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot(pub BTreeMap<PathBuf, Entry>);

impl Snapshot {
    /// The entries at or beneath `rel`.
    pub fn under(&self, rel: &str) -> BTreeMap<PathBuf, Entry> {
        self.0
            .iter()
            .filter(|(p, _)| p.starts_with(rel))
            .map(|(p, e)| (p.clone(), e.clone()))
            .collect()
    }

    pub fn without(&self, rel: &str) -> BTreeMap<PathBuf, Entry> {
        self.0
            .iter()
            .filter(|(p, _)| !p.starts_with(rel))
            .map(|(p, e)| (p.clone(), e.clone()))
            .collect()
    }
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Entry>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let rel = path.strip_prefix(root).unwrap().to_path_buf();
        if rel.starts_with("run") {
            continue;
        }
        let meta = fs::symlink_metadata(&path).unwrap();
        let mode = meta.mode() & 0o7777;
        let e = if meta.file_type().is_symlink() {
            Entry::Symlink {
                target: fs::read_link(&path).unwrap(),
            }
        } else if meta.is_dir() {
            walk(root, &path, out);
            Entry::Dir { mode }
        } else if meta.is_file() {
            Entry::File {
                mode,
                nlink: meta.nlink(),
                bytes: fs::read(&path).unwrap(),
            }
        } else {
            Entry::Other
        };
        out.insert(rel, e);
    }
}

/// Pids of live processes whose command line is exactly `argv`.
pub fn processes_with_cmdline(argv: &[&str]) -> Vec<u32> {
    let wanted: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = fs::read(e.path().join("cmdline")).ok()?;
            (cmdline == wanted).then_some(pid)
        })
        .collect()
}

/// Whether `pid` is a live (non-zombie) process. Killed processes that
/// were re-parented may linger as zombies until their new parent reaps
/// them; they hold no resources and run nothing.
pub fn is_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesized command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}
