//! The agent's state directory (`/var/lib/rollguard` by default).
//!
//! Principle: *state changes are durable before they are acted on*. Every
//! file here is replaced atomically and durably (write a temporary file,
//! fsync it, rename it over the old one, fsync the directory), so after a
//! crash or power loss each file holds either the old or the new content,
//! never a mix, and a change that was reported done survives.
//!
//! Layout:
//!
//! ```text
//! lock                   flock(2) target serializing every read-modify-write
//! versions/<bundle>      last version started per bundle name (rollback protection),
//!                        with how that version's last run here ended and how
//!                        many times it ran (the retry rule, [`may_start`])
//! in-progress/<run>.json durable "run in progress" markers
//! runs/<run>/            per-run scratch directories
//! kill.json              host-wide kill-switch order, when one is in force
//!                        (read and written by `kill_switch::store`)
//! audit.log              hash-chained run log (see `run_log`; the file
//!                        keeps its first name so a host keeps its chain)
//! ```
//!
//! The directory is created `0700` if missing, and refused if it is a
//! symlink, not owned by us, or writable by group or others: whoever can
//! write here can roll versions back, hide runs or rewrite the run log.

use rollguard_shared::PathIoError;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{Flock, FlockArg};
use rollguard_shared::manifest::BundleName;
use rollguard_shared::report::{BundleRef, RefusalKind};
use rollguard_shared::version::{check_newer, NotNewer};
use serde::{Deserialize, Serialize};

const LOCK_FILE: &str = "lock";
const VERSIONS_DIR: &str = "versions";
const IN_PROGRESS_DIR: &str = "in-progress";
const RUNS_DIR: &str = "runs";
/// Largest state file we read back (they are all tiny).
const MAX_STATE_FILE: u64 = 64 * 1024;

/// Problems with the state directory. Any of these makes the agent refuse
/// to run bundles (`RefusalKind::HostError`): without trustworthy state it
/// cannot enforce rollback protection.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {path} is unsafe: {why}")]
    Unsafe { path: PathBuf, why: String },
    #[error(transparent)]
    Untrusted(crate::trust_path::TrustPathError),
    #[error(transparent)]
    Io(#[from] PathIoError),
    #[error("state file {path} is corrupt: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("cannot lock {path}: {errno}")]
    Lock {
        path: PathBuf,
        errno: nix::errno::Errno,
    },
    #[error(transparent)]
    BadRunId(#[from] BadRunId),
}

/// Why `record_started` did not record.
#[derive(Debug, thiserror::Error)]
pub enum RecordStartedError {
    #[error(transparent)]
    NotNewer(#[from] NotNewer),
    #[error(transparent)]
    NotRetryable(#[from] NotRetryable),
    #[error(transparent)]
    State(#[from] StateError),
}

impl RecordStartedError {
    pub fn refusal_kind(&self) -> RefusalKind {
        match self {
            // A refused retry is rollback protection too: the version is
            // not newer than one already run here.
            RecordStartedError::NotNewer(_) | RecordStartedError::NotRetryable(_) => {
                RefusalKind::Rollback
            }
            RecordStartedError::State(_) => RefusalKind::HostError,
        }
    }
}

/// Runs of one version on one host, at most (the first and its retries):
/// a controller cannot loop a failing bundle on a host forever.
pub const MAX_ATTEMPTS: u32 = 3;

/// How the last run of the version in a version record ended, as far as
/// this host knows. Only [`VersionOutcome::is_retryable`] outcomes let the
/// same version run again, and only for a retry order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VersionOutcome {
    /// Written when the run begins, replaced when it ends. Still there:
    /// the run is going on, or its end could not be recorded.
    Started,
    /// Exited 0. Final: this version never runs here again.
    Succeeded,
    /// Exited non-zero or died of a signal, with no denial.
    Failed,
    /// Killed at the bundle's timeout, with no denial.
    TimedOut,
    /// Killed by a kill-switch order.
    Killed,
    /// The agent stopped while it ran (recorded by crash recovery).
    Interrupted,
    /// Ended with a kernel denial, denials that could not be observed, a
    /// resource limit hit or a service action the host refused: the
    /// bundle must change, never run again as it is.
    Denied,
}

impl VersionOutcome {
    /// Whether a retry order may run the same version again.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            VersionOutcome::Failed
                | VersionOutcome::TimedOut
                | VersionOutcome::Killed
                | VersionOutcome::Interrupted
        )
    }

    /// The outcome a finished run's report records. Success is success;
    /// anything else with a denial (or unknown denials: unknown is not
    /// zero), a limit hit or a refused service action is
    /// [`VersionOutcome::Denied`].
    pub fn of_report(report: &rollguard_shared::report::RunReport) -> Self {
        use rollguard_shared::report::RunStatus;
        if report.status == RunStatus::Succeeded {
            return VersionOutcome::Succeeded;
        }
        // Unknown denials are not zero, a killed run's included: what could
        // not be observed may have been denied.
        let denied = match &report.denials {
            None => true,
            Some(d) => !d.is_empty() || report.denial_count.unwrap_or(0) > 0,
        };
        if denied
            || !report.limits_hit.is_empty()
            || report.services_captured.iter().any(|c| c.is_denied())
        {
            return VersionOutcome::Denied;
        }
        match report.status {
            RunStatus::Failed => VersionOutcome::Failed,
            RunStatus::TimedOut => VersionOutcome::TimedOut,
            RunStatus::Killed => VersionOutcome::Killed,
            RunStatus::Interrupted => VersionOutcome::Interrupted,
            // A refusal after the version was recorded: not retried.
            RunStatus::Refused | RunStatus::Succeeded => VersionOutcome::Denied,
        }
    }
}

/// A retry order for a version this host will not run again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "bundle {name:?} version {version} is not retried on this host: {why} (rollback protection)"
)]
pub struct NotRetryable {
    pub name: String,
    pub version: u64,
    pub why: String,
}

/// Whether `candidate` of `name` may start here, given the version record
/// `last` and whether the order is a retry: the attempt number it would
/// be (1 for a first run).
///
/// - A version newer than the last one started (or none): always, retry
///   order or not (a retry order for a version never started here is a
///   first run).
/// - An older version: never.
/// - The same version: only for a retry order of the same bundle (its
///   manifest's digest is the record's), only when the record says
///   its last run here did not succeed and had no denial
///   ([`VersionOutcome::is_retryable`]), and only while it ran fewer than
///   [`MAX_ATTEMPTS`] times. A record without an outcome (written by an
///   agent from before retries) or without a count is not retried: fail
///   closed.
pub fn may_start(
    name: &str,
    last: Option<&VersionRecord>,
    candidate: u64,
    retry: bool,
    manifest_sha256: &str,
) -> Result<u32, RecordStartedError> {
    let Some(last) = last else { return Ok(1) };
    if candidate != last.version || !retry {
        check_newer(name, Some(last.version), candidate)?;
        return Ok(1);
    }
    let refuse = |why: String| {
        Err(RecordStartedError::NotRetryable(NotRetryable {
            name: name.to_string(),
            version: candidate,
            why,
        }))
    };
    let (Some(outcome), Some(attempts)) = (last.outcome, last.attempts) else {
        return refuse(
            "how its last run here ended is not recorded (a record from before retries)".into(),
        );
    };
    if !outcome.is_retryable() {
        let why = match outcome {
            VersionOutcome::Succeeded => "it succeeded here, and success is final",
            VersionOutcome::Started => {
                "its last run here has no recorded end (still running, or the end could not be recorded)"
            }
            _ => "its last run here had a denial, unknown denials, a limit hit or a refused service action: it needs a new bundle",
        };
        return refuse(why.into());
    }
    // A retry runs the same signed bytes again, never another bundle that
    // carries the same name and version (a rebuild, a variant for other
    // hosts): the agent checks it, not only an honest controller.
    if last.manifest_sha256.as_deref() != Some(manifest_sha256) {
        return refuse(
            "the bundle is not the one whose run here did not succeed (another manifest of the same version, or a record without its digest): a retry runs the same bundle again"
                .into(),
        );
    }
    if attempts >= MAX_ATTEMPTS {
        return refuse(format!(
            "it already ran {attempts} time(s) here, the most a version may (last: {})",
            serde_json::to_value(outcome)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default()
        ));
    }
    Ok(attempts + 1)
}

rollguard_shared::validated_string! {
    /// Identifies one run: `<UTC time>-<16 random hex digits>`, which sorts
    /// by start time and is safe as a file name.
    pub struct RunId;
    error BadRunId =
        "run id {0:?} is invalid: use 1-64 characters of [A-Za-z0-9_-], not starting with '-'";
    check = |raw: &str| {
        !raw.is_empty()
            && raw.len() <= 64
            && !raw.starts_with('-')
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
}

impl RunId {
    /// A fresh id. Randomness comes from `/dev/urandom` (no extra crate
    /// needed for 8 bytes).
    pub fn generate() -> Result<Self, StateError> {
        let mut bytes = [0u8; 8];
        let path = Path::new("/dev/urandom");
        File::open(path)
            .and_then(|mut f| f.read_exact(&mut bytes))
            .map_err(PathIoError::at("reading", path))?;
        let now = jiff::Timestamp::now().strftime("%Y%m%dT%H%M%SZ");
        Ok(RunId::from_trusted(format!("{now}-{}", hex::encode(bytes))))
    }
}

/// The agent process that owns a run, so a restarted agent can tell an
/// interrupted run from one another live agent is still running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentProcess {
    pub pid: u32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22):
    /// with `pid` and `boot_id` it names one process, even after pid reuse.
    pub start_time: u64,
    pub boot_id: String,
}

impl AgentProcess {
    pub fn current() -> Result<Self, StateError> {
        let pid = std::process::id();
        let start_time = process_start_time(pid).ok_or_else(|| StateError::Corrupt {
            path: PathBuf::from("/proc/self/stat"),
            why: "cannot read this process's start time".into(),
        })?;
        Ok(AgentProcess {
            pid,
            start_time,
            boot_id: boot_id()?,
        })
    }

    /// True when this process is still alive (same boot, same pid, same
    /// start time).
    pub fn is_alive(&self) -> bool {
        matches!(boot_id(), Ok(b) if b == self.boot_id)
            && process_start_time(self.pid) == Some(self.start_time)
    }
}

fn boot_id() -> Result<String, StateError> {
    let path = Path::new("/proc/sys/kernel/random/boot_id");
    let text = fs::read_to_string(path).map_err(PathIoError::at("reading", path))?;
    Ok(text.trim().to_string())
}

fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `comm` (field 2) may contain spaces and parentheses: the fields we
    // want follow the *last* ')'. Field 3 is index 0 there, so 22 is 19.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// A durable record that a run has started and not yet been reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunMarker {
    pub run_id: RunId,
    pub bundle: BundleRef,
    /// Hex SHA-256 of the bundle's manifest bytes.
    pub manifest_sha256: String,
    pub started: jiff::Timestamp,
    pub agent: AgentProcess,
}

impl RunMarker {
    /// A marker for a run started now by this process.
    pub fn new(
        run_id: RunId,
        bundle: BundleRef,
        manifest_sha256: String,
    ) -> Result<Self, StateError> {
        Ok(RunMarker {
            run_id,
            bundle,
            manifest_sha256,
            started: jiff::Timestamp::now(),
            agent: AgentProcess::current()?,
        })
    }
}

/// `versions/<bundle>`: the last version of a bundle started here.
/// `outcome`, `attempts` and `run_id` came with retries; a file without
/// them still reads (and its version is never retried).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionRecord {
    pub version: u64,
    /// When this version's last run began (or its outcome was recorded).
    pub time: jiff::Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<VersionOutcome>,
    /// Runs of this version begun here, the retries included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// The run the outcome belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<RunId>,
    /// Hex SHA-256 of that run's manifest: a retry must be the same bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_sha256: Option<String>,
}

impl VersionRecord {
    fn started(version: u64, attempts: u32, run: Option<(RunId, String)>) -> Self {
        let (run_id, manifest_sha256) = run.unzip();
        VersionRecord {
            version,
            time: jiff::Timestamp::now(),
            outcome: Some(VersionOutcome::Started),
            attempts: Some(attempts),
            run_id,
            manifest_sha256,
        }
    }
}

/// Held while a read-modify-write of the state directory is in progress.
/// Dropping it releases the lock. Not re-entrant: flock(2) locks belong to
/// an open file description, so taking a second one in the same process
/// while holding the first deadlocks.
#[derive(Debug)]
pub struct StateLock {
    _flock: Flock<File>,
}

/// The opened, checked state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Open the state directory, creating it `0700` if it does not exist.
    pub fn open(root: &Path) -> Result<Self, StateError> {
        if !root.is_absolute() {
            return Err(StateError::Unsafe {
                path: root.to_path_buf(),
                why: "path is not absolute".into(),
            });
        }
        match fs::symlink_metadata(root) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(root)
                    .map_err(PathIoError::at("creating", root))?;
                fs::set_permissions(root, fs::Permissions::from_mode(0o700))
                    .map_err(PathIoError::at("chmod", root))?;
                tracing::info!(path = %root.display(), "created state directory");
            }
            Err(e) => return Err(PathIoError::new("inspecting", root, e).into()),
        }
        check_private_dir(root)?;
        // The directories above it too: whoever can write one of them can
        // move the state directory aside and put their own in its place
        // (an empty version record, a forged run log).
        crate::trust_path::check(root, "state directory").map_err(StateError::Untrusted)?;
        let dir = StateDir {
            root: root.to_path_buf(),
        };
        for sub in [VERSIONS_DIR, IN_PROGRESS_DIR, RUNS_DIR] {
            let path = dir.root.join(sub);
            match fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => fsync_dir(&dir.root)?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(PathIoError::new("creating", &path, e).into()),
            }
            check_private_dir(&path)?;
        }
        Ok(dir)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Take the state lock, waiting for other agent processes to release it.
    pub fn lock(&self) -> Result<StateLock, StateError> {
        let path = self.root.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(o_nofollow())
            .open(&path)
            .map_err(PathIoError::at("opening", &path))?;
        let flock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| StateError::Lock { path, errno })?;
        Ok(StateLock { _flock: flock })
    }

    // ---- rollback protection -------------------------------------------

    /// The last version of `name` started on this host.
    pub fn last_version(&self, name: &BundleName) -> Result<Option<u64>, StateError> {
        Ok(self.version_record(name)?.map(|v| v.version))
    }

    /// The record of the last version of `name` started on this host.
    pub fn version_record(&self, name: &BundleName) -> Result<Option<VersionRecord>, StateError> {
        let path = self.root.join(VERSIONS_DIR).join(name.as_str());
        read_json::<VersionRecord>(&path)
    }

    /// Record how run `run_id` of `version` of `name` ended, durably.
    /// Only that very run's record is changed (a newer version started
    /// since, or another run's record, is left alone), and only from
    /// `started`, or from a retryable outcome to one that is not, so this
    /// can never lower a version, make a version retryable again nor turn
    /// a success into anything else. Returns whether it wrote.
    pub fn record_outcome(
        &self,
        name: &BundleName,
        version: u64,
        run_id: &RunId,
        outcome: VersionOutcome,
    ) -> Result<bool, StateError> {
        let lock = self.lock()?;
        self.record_outcome_locked(&lock, name, version, run_id, outcome)
    }

    /// [`StateDir::record_outcome`] with the state lock already held.
    pub fn record_outcome_locked(
        &self,
        _lock: &StateLock,
        name: &BundleName,
        version: u64,
        run_id: &RunId,
        outcome: VersionOutcome,
    ) -> Result<bool, StateError> {
        let Some(mut record) = self.version_record(name)? else {
            return Ok(false);
        };
        // Only ever tighter: `started` becomes how the run ended, and a
        // retryable outcome may still become a non-retryable one (a
        // service request outside the policy, classified after the
        // outcome was first recorded). Never the other way, and never a
        // success changed.
        let tighter = match record.outcome {
            Some(VersionOutcome::Started) => true,
            Some(now) => now.is_retryable() && !outcome.is_retryable(),
            None => false,
        };
        if record.version != version || record.run_id.as_ref() != Some(run_id) || !tighter {
            return Ok(false);
        }
        record.outcome = Some(outcome);
        record.time = jiff::Timestamp::now();
        let body = serde_json::to_vec(&record).map_err(|e| corrupt(&self.root, e))?;
        write_durable(&self.root.join(VERSIONS_DIR), name.as_str(), &body)?;
        Ok(true)
    }

    /// Record that `version` of `name` is about to start. Call this *before*
    /// running the bundle: once it returns, this version (and every older
    /// one) can never run again here, even if the agent crashes mid-run.
    ///
    /// The check against the last version and the update happen under the
    /// state lock, so two concurrent agents cannot both pass.
    pub fn record_started(
        &self,
        name: &BundleName,
        version: u64,
    ) -> Result<(), RecordStartedError> {
        let _lock = self.lock()?;
        let last = self.version_record(name)?;
        // Not a retry: the digest is not looked at.
        let attempt = may_start(name.as_str(), last.as_ref(), version, false, "")?;
        let body = serde_json::to_vec(&VersionRecord::started(version, attempt, None))
            .map_err(|e| corrupt(&self.root, e))?;
        write_durable(&self.root.join(VERSIONS_DIR), name.as_str(), &body)?;
        Ok(())
    }

    /// Everything that must be durable before a bundle runs, with as few
    /// disk flushes as the ordering allows: under the state lock, check
    /// that `marker`'s version is newer than the last one started (as
    /// [`StateDir::record_started`]; for a `retry`, the same version again
    /// under the rule of [`may_start`]), then record the version (its
    /// outcome `started`, the attempt counted) and write the
    /// in-progress marker (as [`StateDir::mark_in_progress`]), while
    /// `alongside` (the run log entry of the run, given the attempt number
    /// of this version, 1 for a first run) runs concurrently on another
    /// thread with the same lock held.
    ///
    /// Each file still goes through the full durable replace (fsync the
    /// temporary file, rename, fsync the directory), but the flushes of the
    /// two files and of `alongside` are issued together, so the file system
    /// commits them in one journal transaction per step: two disk round
    /// trips instead of five. When this returns `Ok`, all three are on
    /// disk. When `alongside` fails nothing is renamed into place: the
    /// version is not used up and no marker exists. A crash part-way can
    /// leave the run's audit entry without a marker, which reads as a run
    /// that started and never executed (as a crash just before `exec`
    /// always could); so can an I/O error while renaming into place.
    pub fn begin_run<E>(
        &self,
        name: &BundleName,
        marker: &RunMarker,
        retry: bool,
        alongside: impl FnOnce(&StateLock, u32) -> Result<(), E> + Send,
    ) -> Result<(), BeginRunError<E>>
    where
        E: Send,
    {
        let lock = self.lock()?;
        if marker.bundle.name != name.as_str() {
            return Err(StateError::Corrupt {
                path: self.root.join(IN_PROGRESS_DIR),
                why: format!(
                    "the marker names bundle {:?}, not {name}",
                    marker.bundle.name
                ),
            }
            .into());
        }
        let version = marker.bundle.version;
        let last = self.version_record(name)?;
        let attempt = may_start(
            name.as_str(),
            last.as_ref(),
            version,
            retry,
            &marker.manifest_sha256,
        )?;
        let version_body = serde_json::to_vec(&VersionRecord::started(
            version,
            attempt,
            Some((marker.run_id.clone(), marker.manifest_sha256.clone())),
        ))
        .map_err(|e| corrupt(&self.root, e))?;
        let marker_body = serde_json::to_vec(marker).map_err(|e| corrupt(&self.root, e))?;
        let versions = self.root.join(VERSIONS_DIR);
        let in_progress = self.root.join(IN_PROGRESS_DIR);
        let mut files = [
            Staged::write(&versions, name.as_str(), &version_body)?,
            Staged::write(&in_progress, &marker_name(&marker.run_id), &marker_body)?,
        ];
        // Step 1: file contents (and the audit entry) on disk.
        // (If no thread can be started, the step runs here, after the
        // flushes: slower, same result.)
        let alongside = std::sync::Mutex::new(Some(alongside));
        let run_alongside = || {
            let step = alongside.lock().ok().and_then(|mut f| f.take());
            step.map(|f| f(&lock, attempt))
        };
        let staged: Vec<(&File, &Path)> =
            files.iter().map(|f| (&f.file, f.tmp.as_path())).collect();
        let (synced, alongside) = std::thread::scope(|scope| {
            let other = std::thread::Builder::new()
                .name("state-alongside".into())
                .spawn_scoped(scope, run_alongside);
            let synced = sync_all_concurrently(&staged);
            let alongside = match other {
                Ok(handle) => handle
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p)),
                Err(_) => run_alongside(),
            };
            (synced, alongside)
        });
        drop(staged);
        let alongside = alongside.ok_or_else(|| StateError::Corrupt {
            path: self.root.clone(),
            why: "the step alongside the state writes did not run".into(),
        })?;
        alongside.map_err(BeginRunError::Alongside)?;
        synced?;
        // Step 2: the new names on disk.
        for f in &mut files {
            f.rename_into_place()?;
        }
        let dirs = [
            (
                File::open(&versions)
                    .map_err(|e| StateError::from(PathIoError::new("fsync", &versions, e)))?,
                &versions,
            ),
            (
                File::open(&in_progress)
                    .map_err(|e| StateError::from(PathIoError::new("fsync", &in_progress, e)))?,
                &in_progress,
            ),
        ];
        let dirs: Vec<(&File, &Path)> = dirs.iter().map(|(f, p)| (f, p.as_path())).collect();
        sync_all_concurrently(&dirs)?;
        Ok(())
    }

    // ---- per-run directories -------------------------------------------

    pub fn run_dir(&self, id: &RunId) -> PathBuf {
        self.root.join(RUNS_DIR).join(id.as_str())
    }

    /// Create `runs/<id>/` (mode 0700). Fails if it already exists.
    ///
    /// Run directories are scratch, not state: nothing in them is needed
    /// after a crash (the durable record of a run is its in-progress marker
    /// and the run log), so their creation and removal are not fsynced.
    /// A crash can at worst leave a stale scratch directory behind.
    pub fn create_run_dir(&self, id: &RunId) -> Result<PathBuf, StateError> {
        let path = self.run_dir(id);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(PathIoError::at("creating", &path))?;
        Ok(path)
    }

    /// Remove `runs/<id>/` and everything in it (missing is fine). Not
    /// fsynced, see [`StateDir::create_run_dir`].
    pub fn remove_run_dir(&self, id: &RunId) -> Result<(), StateError> {
        let path = self.run_dir(id);
        match fs::remove_dir_all(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(PathIoError::new("removing", &path, e).into()),
        }
    }

    // ---- in-progress markers -------------------------------------------

    /// Durably mark a run as in progress. Write it before the bundle is
    /// executed; remove it with [`StateDir::clear_in_progress`] only after
    /// the run's report has been recorded.
    pub fn mark_in_progress(&self, marker: &RunMarker) -> Result<(), StateError> {
        let body = serde_json::to_vec(marker).map_err(|e| corrupt(&self.root, e))?;
        write_durable(
            &self.root.join(IN_PROGRESS_DIR),
            &marker_name(&marker.run_id),
            &body,
        )
    }

    pub fn clear_in_progress(&self, id: &RunId) -> Result<(), StateError> {
        remove_durable(&self.root.join(IN_PROGRESS_DIR), &marker_name(id))
    }

    /// Remove the marker of a run whose result is already durable in the
    /// run log, without waiting for the removal to reach the disk (no
    /// directory fsync: one disk flush less on every run). A crash can bring
    /// the marker back; recovery then finds the run's `run_finished` in the
    /// log ([`crate::run_log::RunLog::finished_runs`]) and only
    /// clears it. Only for a marker whose run's result is logged: any other
    /// marker must go with [`StateDir::clear_in_progress`].
    pub fn clear_logged_in_progress(&self, id: &RunId) -> Result<(), StateError> {
        let path = self.root.join(IN_PROGRESS_DIR).join(marker_name(id));
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(PathIoError::new("removing", &path, e).into())
            }
            _ => Ok(()),
        }
    }

    /// Runs that were started and never reported, whose agent process is
    /// gone (a crash, a reboot, a kill). Runs owned by a live agent process
    /// are not included. Sorted by run id (that is, by start time).
    pub fn interrupted_runs(&self) -> Result<Vec<RunMarker>, StateError> {
        let dir = self.root.join(IN_PROGRESS_DIR);
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(PathIoError::at("listing", &dir))? {
            let entry = entry.map_err(PathIoError::at("listing", &dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            // Skip our own temporary files (a crash between write and rename).
            let Some(stem) = name
                .strip_suffix(".json")
                .filter(|_| !name.starts_with('.'))
            else {
                continue;
            };
            let path = entry.path();
            // Gone since the listing: its run ended and removed it (a
            // concurrent run of the daemon), so it was not interrupted.
            let Some(marker): Option<RunMarker> = read_json(&path)? else {
                continue;
            };
            if marker.run_id.as_str() != stem {
                return Err(StateError::Corrupt {
                    path,
                    why: format!("names run {}", marker.run_id),
                });
            }
            if !marker.agent.is_alive() {
                out.push(marker);
            }
        }
        out.sort_by(|a, b| a.run_id.cmp(&b.run_id));
        Ok(out)
    }
}

fn marker_name(id: &RunId) -> String {
    format!("{id}.json")
}

fn corrupt(path: &Path, e: impl std::fmt::Display) -> StateError {
    StateError::Corrupt {
        path: path.to_path_buf(),
        why: e.to_string(),
    }
}

/// `O_NOFOLLOW`, so a symlink planted where a state file should be is an
/// error rather than followed.
fn o_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

/// A directory only we can change: a real directory (not a symlink), owned
/// by our effective uid, not writable by group or others.
fn check_private_dir(path: &Path) -> Result<(), StateError> {
    let unsafe_dir = |why: String| StateError::Unsafe {
        path: path.to_path_buf(),
        why,
    };
    let meta = fs::symlink_metadata(path).map_err(PathIoError::at("inspecting", path))?;
    if meta.file_type().is_symlink() {
        return Err(unsafe_dir("it is a symlink".into()));
    }
    if !meta.is_dir() {
        return Err(unsafe_dir("it is not a directory".into()));
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(unsafe_dir(format!(
            "it is owned by uid {}, not by the agent (uid {euid})",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(unsafe_dir(format!(
            "mode {:04o} lets group or others write it (use chmod 0700)",
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

/// Read a small JSON state file; `None` when it does not exist.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<Option<T>, StateError> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(o_nofollow())
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(PathIoError::new("opening", path, e).into()),
    };
    let mut bytes = Vec::new();
    file.take(MAX_STATE_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(PathIoError::at("reading", path))?;
    if bytes.len() as u64 > MAX_STATE_FILE {
        return Err(corrupt(path, format!("larger than {MAX_STATE_FILE} bytes")));
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| corrupt(path, e))
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Replace `dir/name` with `bytes`, atomically and durably.
pub(crate) fn write_durable(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StateError> {
    // A failure before the rename removes the temporary file (Staged's drop).
    let mut staged = Staged::write(dir, name, bytes)?;
    staged
        .file
        .sync_all()
        .map_err(PathIoError::at("fsync", &staged.tmp))?;
    staged.rename_into_place()?;
    fsync_dir(dir)
}

/// Why [`StateDir::begin_run`] did not record the run.
#[derive(Debug, thiserror::Error)]
pub enum BeginRunError<E> {
    #[error(transparent)]
    Record(#[from] RecordStartedError),
    /// The concurrent step failed; nothing was recorded.
    #[error("{0}")]
    Alongside(E),
}

impl<E> From<StateError> for BeginRunError<E> {
    fn from(e: StateError) -> Self {
        BeginRunError::Record(RecordStartedError::State(e))
    }
}

/// A temporary file written next to its final name, not yet renamed. The
/// temporary file is removed on drop unless it was renamed into place.
struct Staged {
    file: File,
    tmp: PathBuf,
    target: PathBuf,
    renamed: bool,
}

impl Staged {
    fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<Staged, StateError> {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.tmp-{}-{n}", std::process::id()));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(o_nofollow())
            .open(&tmp)
            .map_err(PathIoError::at("creating", &tmp))?;
        let staged = Staged {
            file: file
                .try_clone()
                .map_err(PathIoError::at("creating", &tmp))?,
            tmp,
            target: dir.join(name),
            renamed: false,
        };
        file.write_all(bytes)
            .map_err(PathIoError::at("writing", &staged.tmp))?;
        Ok(staged)
    }

    fn rename_into_place(&mut self) -> Result<(), StateError> {
        fs::rename(&self.tmp, &self.target)
            .map_err(PathIoError::at("renaming into place", &self.target))?;
        self.renamed = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.renamed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// fsync every file, all at once (one thread each but the last): flushes
/// issued together are committed together by journaling file systems, so
/// this costs about one disk round trip instead of one per file.
fn sync_all_concurrently(files: &[(&File, &Path)]) -> Result<(), StateError> {
    let sync = |(f, path): &(&File, &Path)| -> Result<(), StateError> {
        Ok(f.sync_all().map_err(PathIoError::at("fsync", path))?)
    };
    let Some((last, rest)) = files.split_last() else {
        return Ok(());
    };
    std::thread::scope(|scope| {
        let others: Vec<_> = rest
            .iter()
            .map(|entry| {
                std::thread::Builder::new()
                    .name("state-fsync".into())
                    .spawn_scoped(scope, move || sync(entry))
                    // No thread: flush here instead (slower, same result).
                    .map_err(|_| sync(entry))
            })
            .collect();
        let mut result = sync(last);
        for other in others {
            let r = match other {
                Ok(handle) => handle
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p)),
                Err(inline) => inline,
            };
            result = result.and(r);
        }
        result
    })
}

/// Remove `dir/name` durably (missing is fine).
pub(crate) fn remove_durable(dir: &Path, name: &str) -> Result<(), StateError> {
    let path = dir.join(name);
    match fs::remove_file(&path) {
        Ok(()) => fsync_dir(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(PathIoError::new("removing", &path, e).into()),
    }
}

/// fsync a directory so that entries created, renamed or removed in it are
/// on disk.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), StateError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(PathIoError::at("fsync", dir))?;
    Ok(())
}

#[cfg(test)]
mod tests;
