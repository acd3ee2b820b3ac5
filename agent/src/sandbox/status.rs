//! How stage 2 tells the parent what happened before `exec`.
//!
//! Stage 2 appends JSON lines to `<run_dir>/stage2-status.jsonl` through a
//! file descriptor opened before any confinement and marked close-on-exec,
//! so the bundle never holds it; the run directory itself is never writable
//! by the bundle (checked in stage 2). The parent reads the file after the
//! run: an `exec` event means the bundle's command was started; anything
//! else (including no file at all) means nothing ran.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Stage 2 could not confine itself; nothing was executed.
pub const EXIT_SETUP_FAILED: u8 = 125;
/// The command exists but could not be executed.
pub const EXIT_EXEC_FAILED: u8 = 126;
/// The command does not exist.
pub const EXIT_NOT_FOUND: u8 = 127;

pub const STATUS_FILE: &str = "stage2-status.jsonl";
/// The byte the agent writes to stage 2's stdin to release a held run
/// (see `launch.rs`); end-of-file instead means the run was withdrawn.
pub const RELEASE_BYTE: u8 = b'R';
/// The byte stage 2 sends on the gate, after its audit session line,
/// carrying the run's service-request directory (`SCM_RIGHTS`).
pub const REQUESTS_DIR_BYTE: u8 = b'Q';
/// The audit session id of the run, as decimal text.
pub const AUDIT_SESSION_FILE: &str = "audit-session";

/// The steps of stage 2, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    Start,
    Cgroup,
    AuditSession,
    Namespaces,
    Mounts,
    Capabilities,
    NoNewPrivs,
    Landlock,
    Seccomp,
    Verify,
    Release,
    Exec,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Step::Start => "start",
            Step::Cgroup => "cgroup",
            Step::AuditSession => "audit-session",
            Step::Namespaces => "namespaces",
            Step::Mounts => "mounts",
            Step::Capabilities => "capabilities",
            Step::NoNewPrivs => "no-new-privs",
            Step::Landlock => "landlock",
            Step::Seccomp => "seccomp",
            Step::Verify => "verify",
            Step::Release => "release",
            Step::Exec => "exec",
        };
        f.write_str(name)
    }
}

/// What was actually applied, reported by stage 2 just before `exec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confinement {
    pub landlock_abi: u32,
    /// Number of Landlock filesystem rules added.
    pub landlock_fs_rules: usize,
    /// TCP ports the bundle may connect to (empty: no network).
    pub tcp_connect_ports: Vec<u16>,
    /// Abstract-unix-socket and signal scoping (Landlock ABI 6).
    pub landlock_scoped: bool,
    /// Landlock denials after `exec` are audited (Landlock ABI 7).
    pub landlock_log_new_exec: bool,
    /// A private network namespace with only `lo`.
    pub private_network: bool,
    /// Number of seccomp filters installed.
    pub seccomp_filters: usize,
    pub audit_session: u32,
    /// Protected paths (and other mounts of their data) covered by an
    /// empty read-only node; everything outside the scopes is read-only.
    #[serde(default)]
    pub masked_paths: usize,
    /// Mounts made to pin protected paths inside the scopes (read-only
    /// pins and the directories above them, see `pins`).
    #[serde(default)]
    pub pinned_mounts: usize,
    /// The audit rules that report writes refused by the read-only mounts
    /// were added; without them the run's denials are unknown.
    #[serde(default)]
    pub exit_audit: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// Confinement complete; the next thing is `exec`.
    Exec {
        program: PathBuf,
        confinement: Confinement,
    },
    SetupFailed {
        step: Step,
        error: String,
    },
    ExecFailed {
        program: PathBuf,
        error: String,
    },
    /// Written by stage 2, the run's init, when the bundle's main process
    /// ended: its exit code or signal, and the processes it left behind
    /// (killed when init exits).
    MainExited {
        code: Option<i32>,
        signal: Option<i32>,
        leftover_processes: usize,
        /// The private `/tmp` or `/var/tmp` was full (its size limit hit).
        #[serde(default)]
        tmp_full: bool,
    },
}

/// Stage 2's side: an append-only, close-on-exec status file.
pub struct StatusWriter {
    file: File,
}

impl StatusWriter {
    pub fn create(run_dir: &Path) -> std::io::Result<Self> {
        // std opens with O_CLOEXEC, so the bundle never inherits this fd.
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(run_dir.join(STATUS_FILE))?;
        Ok(StatusWriter { file })
    }

    /// Best effort: if the status cannot be written, the parent sees no
    /// `exec` event and treats the run as failed, which is the safe reading.
    pub fn record(&mut self, event: &Event) {
        if let Ok(mut line) = serde_json::to_vec(event) {
            line.push(b'\n');
            let _ = self.file.write_all(&line);
        }
    }
}

/// The parent's side: every event, in order. A missing file is no events.
pub fn read_events(run_dir: &Path) -> std::io::Result<Vec<Event>> {
    let text = match std::fs::read_to_string(run_dir.join(STATUS_FILE)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    // A line we cannot parse is skipped: it cannot add an `exec` event, so
    // it can only make the run look failed, never successful.
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_events(dir.path()).unwrap().is_empty());
        let mut w = StatusWriter::create(dir.path()).unwrap();
        let failed = Event::SetupFailed {
            step: Step::Landlock,
            error: "no".into(),
        };
        w.record(&failed);
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(STATUS_FILE))
            .unwrap()
            .write_all(b"garbage\n")
            .unwrap();
        assert_eq!(read_events(dir.path()).unwrap(), vec![failed]);
    }
}
