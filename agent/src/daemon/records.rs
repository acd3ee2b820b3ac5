//! The daemon's durable records, under `<state dir>/daemon/`:
//!
//! ```text
//! rollouts/<rollout id>.json  one per rollout this host was ordered to run:
//!                             started → finished (with the report) → acked
//! rollouts/<id>.json.corrupt  a record that could not be read, kept aside;
//!                             its rollout is reported interrupted, never run
//! serve.lock                  flock'd by the running daemon (its pid inside)
//! kill.json                   the fleet kill state last received + any local kill
//!                             (read and written by `kill_switch::store`)
//! bundles/<rollout id>.bundle downloads in progress (removed after the run,
//!                             and all of them when the daemon starts)
//! ```
//!
//! "Started" is written (fsync'd, atomically renamed) before the bundle
//! runs, so after a crash the daemon knows the run may have happened and
//! reports it `interrupted` instead of running it again; "finished" is
//! written before the report is sent, so no report is lost.

use nix::fcntl::{Flock, FlockArg};
use rollguard_shared::PathIoError;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rollguard_shared::protocol::{RolloutId, Sha256Hex};
use rollguard_shared::report::RunReport;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Io(#[from] PathIoError),
    #[error("daemon record {path} is corrupt: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error(
        "another rollguard-agent serve (pid {holder}) is using this state directory ({path} is locked); one daemon per host"
    )]
    Busy { path: PathBuf, holder: String },
    /// From the one durable-write helper shared with the state directory.
    #[error(transparent)]
    Write(#[from] crate::state::StateError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Started,
    Finished,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostRolloutRecord {
    pub rollout_id: RolloutId,
    /// None only in the record that replaced an unreadable one.
    pub bundle_sha256: Option<Sha256Hex>,
    pub phase: Phase,
    #[serde(default)]
    pub report: Option<RunReport>,
    /// The controller accepted the report.
    #[serde(default)]
    pub acked: bool,
}

/// [`Records::all`]: the records read, and each corrupt one as its rollout
/// id and why.
pub struct AllRecords {
    pub readable: Vec<HostRolloutRecord>,
    pub corrupt: Vec<(RolloutId, String)>,
}

/// The daemon's claim on its state directory; dropped, the claim ends.
pub struct InstanceLock {
    _file: Flock<fs::File>,
}

pub struct Records {
    root: PathBuf,
}

const MAX_RECORD: u64 = 1024 * 1024;

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<Option<T>, RecordError> {
    let f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(PathIoError::new("opening", path, e).into()),
    };
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_RECORD + 1), &mut bytes)
        .map_err(PathIoError::at("reading", path))?;
    if bytes.len() as u64 > MAX_RECORD {
        return Err(RecordError::Corrupt {
            path: path.to_path_buf(),
            why: "too large".into(),
        });
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| RecordError::Corrupt {
            path: path.to_path_buf(),
            why: e.to_string(),
        })
}

/// The daemon's directory in the state directory.
pub const DAEMON_DIR: &str = "daemon";

impl Records {
    /// Open (creating, mode 0700) `<state dir>/daemon`.
    pub fn open(state_dir: &Path) -> Result<Self, RecordError> {
        let root = state_dir.join(DAEMON_DIR);
        for sub in ["", "rollouts", "bundles"] {
            let p = root.join(sub);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&p)
                .map_err(PathIoError::at("creating", &p))?;
        }
        Ok(Records { root })
    }

    /// Take `daemon/serve.lock` (an exclusive `flock`, released when the
    /// process exits, however it exits), or say which process holds it.
    pub fn lock_instance(&self) -> Result<InstanceLock, RecordError> {
        use std::io::{Seek, Write};
        let path = self.root.join("serve.lock");
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(PathIoError::at("opening", &path))?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let holder = fs::read_to_string(&path).unwrap_or_default();
                return Err(RecordError::Busy {
                    path,
                    holder: holder.trim().to_string(),
                });
            }
            Err((_, e)) => return Err(PathIoError::new("locking", &path, e.into()).into()),
        };
        // The holder's pid, for the message above; advisory only.
        let _ = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()));
        Ok(InstanceLock { _file: file })
    }

    /// Remove every file of the download directory (`bundles/`); how many.
    /// Only when no run of this process has begun.
    pub fn remove_downloads(&self) -> std::io::Result<usize> {
        let mut n = 0;
        for entry in fs::read_dir(self.root.join("bundles"))? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                fs::remove_file(entry.path())?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// `<state dir>/daemon`, where the kill switch keeps its record too
    /// ([`crate::kill_switch::store`]).
    pub fn dir(&self) -> &Path {
        &self.root
    }

    fn rollouts_dir(&self) -> PathBuf {
        self.root.join("rollouts")
    }

    /// Where the rollout's bundle is downloaded to. One file per rollout,
    /// not per bundle: two rollouts of the same bundle (a preview and its
    /// run) may be under way at once, and one's removal or download must
    /// not touch the other's file.
    pub fn bundle_path(&self, id: &RolloutId) -> PathBuf {
        self.root.join("bundles").join(format!("{id}.bundle"))
    }

    pub fn get(&self, id: &RolloutId) -> Result<Option<HostRolloutRecord>, RecordError> {
        let path = self.rollouts_dir().join(format!("{id}.json"));
        let rec: Option<HostRolloutRecord> = read_json(&path)?;
        if let Some(r) = &rec {
            if &r.rollout_id != id {
                return Err(RecordError::Corrupt {
                    path,
                    why: format!("names rollout {}", r.rollout_id),
                });
            }
        }
        Ok(rec)
    }

    pub fn put(&self, rec: &HostRolloutRecord) -> Result<(), RecordError> {
        let bytes = serde_json::to_vec(rec).map_err(|e| RecordError::Corrupt {
            path: self.root.clone(),
            why: e.to_string(),
        })?;
        crate::state::write_durable(
            &self.rollouts_dir(),
            &format!("{}.json", rec.rollout_id),
            &bytes,
        )?;
        Ok(())
    }

    /// Copy a corrupt record aside (`<id>.json.corrupt`, for the operator;
    /// never read again) before a new record replaces it. A copy, not a
    /// rename: the record must exist at every moment, or a crash between
    /// the two would leave the rollout with none, free to run again. Best
    /// effort (the bytes may be unreadable): a failure is logged.
    pub fn keep_aside(&self, id: &RolloutId) -> PathBuf {
        let from = self.rollouts_dir().join(format!("{id}.json"));
        let to = self.rollouts_dir().join(format!("{id}.json.corrupt"));
        if let Err(e) = fs::copy(&from, &to).and_then(|_| fs::File::open(&to)?.sync_all()) {
            tracing::warn!(rollout = %id, error = %e, "cannot keep a copy of the unreadable record");
        }
        to
    }

    /// Every record, in file-name order.
    pub fn all(&self) -> Result<AllRecords, RecordError> {
        let dir = self.rollouts_dir();
        let mut out = Vec::new();
        let mut corrupt = Vec::new();
        let mut names: Vec<String> = fs::read_dir(&dir)
            .map_err(PathIoError::at("listing", &dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        for name in names {
            let Some(id) = name
                .strip_suffix(".json")
                .filter(|_| !name.starts_with('.'))
            else {
                continue;
            };
            let Ok(id) = RolloutId::parse(id) else {
                continue;
            };
            match self.get(&id) {
                Ok(Some(rec)) => out.push(rec),
                Ok(None) => {}
                Err(RecordError::Corrupt { why, .. }) => corrupt.push((id, why)),
                Err(e) => return Err(e),
            }
        }
        Ok(AllRecords {
            readable: out,
            corrupt,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let id = RolloutId::parse("r-1").unwrap();
        {
            let r = Records::open(dir.path()).unwrap();
            assert!(r.get(&id).unwrap().is_none());
            r.put(&HostRolloutRecord {
                rollout_id: id.clone(),
                bundle_sha256: Some(Sha256Hex::of(b"x")),
                phase: Phase::Started,
                report: None,
                acked: false,
            })
            .unwrap();
        }
        let r = Records::open(dir.path()).unwrap();
        assert_eq!(r.get(&id).unwrap().unwrap().phase, Phase::Started);
        assert_eq!(r.all().unwrap().readable.len(), 1);
    }

    #[test]
    fn one_daemon_per_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        let r = Records::open(dir.path()).unwrap();
        let held = r.lock_instance().unwrap();
        let again = Records::open(dir.path()).unwrap().lock_instance();
        let Err(RecordError::Busy { holder, .. }) = again else {
            panic!("a second daemon must be refused");
        };
        assert_eq!(holder, std::process::id().to_string());
        drop(held);
        r.lock_instance()
            .expect("free again once the first is gone");
    }

    #[test]
    fn a_corrupt_record_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let r = Records::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("daemon/rollouts/r-2.json"), b"{garbage").unwrap();
        assert!(matches!(
            r.get(&RolloutId::parse("r-2").unwrap()),
            Err(RecordError::Corrupt { .. })
        ));
    }
}
