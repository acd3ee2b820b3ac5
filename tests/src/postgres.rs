//! A throwaway PostgreSQL server for the tests: Debian's own `initdb` and
//! `pg_ctl` (the `postgresql` package, installed by `scripts/install-deps`)
//! on a data directory in a temporary directory, run as the unprivileged
//! `nobody` (PostgreSQL refuses to run as root), reachable only through a
//! Unix socket in that directory. Each test gets its own server, so tests
//! can stop and restart it; [`Drop`] stops it.

use std::fs;
use std::os::unix::fs::{chown, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::run;

/// PostgreSQL's superuser in the throwaway cluster (trust authentication
/// over the socket only).
pub const SUPERUSER: &str = "rollguard";

/// `nobody`: present on every Debian system.
const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;

pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
}

/// The newest installed server's binaries (`/usr/lib/postgresql/<major>/bin`).
fn server_bin() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let newest = fs::read_dir(root)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .max()
        .unwrap_or_else(|| {
            panic!(
                "no PostgreSQL server under {}: run scripts/install-deps (package postgresql)",
                root.display()
            )
        });
    root.join(newest.to_string()).join("bin")
}

impl PgCluster {
    /// `initdb` and start a server; panics with its log if it does not come up.
    pub fn start() -> PgCluster {
        let dir = tempfile::Builder::new()
            .prefix("rg-pg")
            .tempdir_in("/tmp")
            .expect("tempdir");
        chown(dir.path(), Some(NOBODY), Some(NOGROUP)).expect("chown the cluster directory");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).expect("chmod");
        let cluster = PgCluster {
            dir,
            bin: server_bin(),
        };
        cluster.as_nobody(
            Command::new(cluster.bin.join("initdb"))
                .arg("--pgdata")
                .arg(cluster.data())
                .args(["--username", SUPERUSER, "--auth", "trust"])
                .args(["--encoding", "UTF8", "--locale", "C.UTF-8", "--no-sync"]),
            "initdb",
        );
        cluster.ctl_start();
        cluster
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The directory of the server's socket (libpq's `host`).
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    fn as_nobody(&self, cmd: &mut Command, what: &str) {
        cmd.uid(NOBODY)
            .gid(NOGROUP)
            .current_dir(self.dir.path())
            .env("HOME", self.dir.path())
            .env_remove("PGDATA");
        let out = run(cmd);
        assert!(
            out.status.success(),
            "{what} failed ({}):\n{}\n{}\nserver log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            fs::read_to_string(self.log()).unwrap_or_default()
        );
    }

    fn ctl_start(&self) {
        let options = format!(
            "-c listen_addresses='' -c unix_socket_directories='{}' -c max_connections=200",
            self.socket_dir().display()
        );
        self.as_nobody(
            Command::new(self.bin.join("pg_ctl"))
                .arg("--pgdata")
                .arg(self.data())
                .arg("--log")
                .arg(self.log())
                .args(["--wait", "--options", &options, "start"]),
            "pg_ctl start",
        );
    }

    /// Stop the server: `fast` (clients are disconnected, data flushed) or
    /// `immediate` (as a crash: recovery replays the WAL at the next start).
    pub fn stop(&self, mode: &str) {
        self.as_nobody(
            Command::new(self.bin.join("pg_ctl"))
                .arg("--pgdata")
                .arg(self.data())
                .args(["--wait", "--mode", mode, "stop"]),
            "pg_ctl stop",
        );
    }

    /// Start the server again after [`PgCluster::stop`].
    pub fn restart(&self) {
        self.ctl_start();
    }

    /// Create a database (named by the caller: one per test or per check).
    pub fn create_database(&self, name: &str) {
        self.as_nobody(
            Command::new(self.bin.join("createdb"))
                .arg("--host")
                .arg(self.socket_dir())
                .args(["--username", SUPERUSER, name]),
            "createdb",
        );
    }

    /// The URL of database `name`, as `[storage] url` takes it.
    pub fn url(&self, name: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@localhost/{name}?host={}",
            self.socket_dir().display()
        )
    }

    /// The tail of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // Best effort: a server that is already stopped is fine.
        let _ = Command::new(self.bin.join("pg_ctl"))
            .arg("--pgdata")
            .arg(self.data())
            .args(["--mode", "immediate", "stop"])
            .uid(NOBODY)
            .gid(NOGROUP)
            .current_dir(self.dir.path())
            .output();
    }
}
