//! The agent's own run log: an append-only, hash-chained JSON-lines file
//! (`audit.log` in the state directory) recording every run started, every
//! run finished (with its denials) and every refusal.
//!
//! Each line is one entry:
//!
//! ```json
//! {"seq":1,"time":"2026-05-01T10:00:00Z","prev":"000…000","event":{"type":"run_started",…}}
//! ```
//!
//! `seq` counts from 1 without gaps; `prev` is the lowercase hex SHA-256 of
//! the previous line's bytes (without its newline), or 64 zeros for the
//! first entry. Entries are appended with `O_APPEND`, one `write` per line,
//! and fsynced before `append` returns, under the state directory's lock so
//! concurrent agents cannot interleave or fork the chain.
//!
//! What the chain protects against, and what it does not:
//! - It detects accidental damage and any edit, removal or reordering of
//!   entries *followed by* at least one intact entry: [`verify`] names the
//!   first line that does not follow from the one before it.
//! - It does **not** stop someone with root on the host from rewriting the
//!   whole file and recomputing every hash, or from cutting entries off the
//!   end: a chain only proves consistency with itself. The mitigations are
//!   to keep the head (`seq` + hash, see [`head`]) somewhere the host
//!   cannot rewrite and check it with [`verify_anchored`], and to ship
//!   entries off the host as they are written (the controller will receive
//!   them in a later issue).

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rollguard_shared::manifest::Scope;
use rollguard_shared::report::{
    BundleRef, Denial, ExpectedDenial, PackageChange, RefusalKind, RunReport, RunStatus,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::state::{fsync_dir, StateDir, StateError, StateLock};

/// The file kept the name it had when the run log was called the audit
/// log: renaming it would cut an installed host off its own chain.
pub const RUN_LOG_FILE: &str = "audit.log";
/// `prev` of the first entry.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Longest line we accept when reading the log back.
const MAX_LINE: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RunLogError {
    #[error("cannot {action} run log {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("run log {path}: the last line is damaged ({why}); refusing to extend a chain that cannot be verified — move the file aside to start a new one")]
    DamagedTail { path: PathBuf, why: String },
    #[error("run log line {line}: {kind}")]
    Broken { line: u64, kind: ChainBreak },
    #[error("run log does not contain the recorded head (seq {seq}): {why}")]
    AnchorMismatch { seq: u64, why: String },
    #[error("cannot encode run log entry: {0}")]
    Encode(String),
}

/// How a line fails to follow from the one before it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainBreak {
    #[error("not a valid entry ({0})")]
    Malformed(String),
    #[error("the last line is incomplete (no final newline): truncated write or cut file")]
    TruncatedLastLine,
    #[error("seq is {found}, expected {expected}: a line was removed, inserted or moved")]
    UnexpectedSeq { expected: u64, found: u64 },
    #[error("prev does not match the hash of the line before: that line was edited or a line between them was removed")]
    PrevMismatch,
}

/// What the scope of a run was, as plain strings for the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeSummary {
    pub write: Vec<String>,
    pub delete: Vec<String>,
    pub read: Vec<String>,
    pub network: Vec<String>,
}

impl From<&Scope> for ScopeSummary {
    fn from(s: &Scope) -> Self {
        let paths = |v: &[rollguard_shared::ScopePath]| v.iter().map(|p| p.to_string()).collect();
        ScopeSummary {
            write: paths(&s.write),
            delete: paths(&s.delete),
            read: paths(&s.read),
            network: s.network.iter().map(|n| n.to_string()).collect(),
        }
    }
}

/// One thing that happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RunLogEvent {
    /// Recorded after verification and policy checks passed, before the
    /// bundle is executed.
    RunStarted {
        run_id: String,
        bundle: BundleRef,
        manifest_sha256: String,
        signers: Vec<String>,
        scope: ScopeSummary,
        /// A retry of the same version (`state::may_start`): which run of
        /// it on this host this is (2 or more). Absent for a first run.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attempt: Option<u32>,
    },
    RunFinished {
        run_id: String,
        bundle: BundleRef,
        manifest_sha256: String,
        status: RunStatus,
        exit_code: Option<i32>,
        reason: Option<String>,
        /// `None`: denials could not be observed (unknown, not zero).
        denials: Option<Vec<Denial>>,
        denial_count: Option<u64>,
        duration_ms: u64,
        /// Denials recognised as the package manager's harmless side
        /// effects (`packages::expected`), kept in the log too.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        expected_denials: Vec<ExpectedDenial>,
        /// `[packages]`: versions before and after.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        packages: Vec<PackageChange>,
    },
    /// A bundle that was not run. `bundle` is absent when the file was too
    /// broken to name one.
    Refused {
        bundle: Option<BundleRef>,
        manifest_sha256: Option<String>,
        refusal: RefusalKind,
        reason: String,
    },
    /// Found at startup: a run whose agent died before reporting it.
    RunInterrupted {
        run_id: String,
        bundle: BundleRef,
        manifest_sha256: String,
    },
    /// A preview run (`rollguard-agent run --preview`): the bundle ran
    /// against throw-away layers; nothing of the host changed and no
    /// version was used up.
    Previewed {
        run_id: String,
        bundle: BundleRef,
        manifest_sha256: String,
        status: RunStatus,
        denial_count: Option<u64>,
        /// Paths it would have changed.
        changes: u64,
    },
    KillSet {
        reason: String,
    },
    KillCleared,
}

impl RunLogEvent {
    /// The `run_finished` entry for a report of a run that executed.
    pub fn run_finished(
        report: &RunReport,
        run_id: &str,
        bundle: BundleRef,
        manifest_sha256: &str,
    ) -> Self {
        RunLogEvent::RunFinished {
            run_id: run_id.to_string(),
            bundle,
            manifest_sha256: manifest_sha256.to_string(),
            status: report.status,
            exit_code: report.exit_code,
            reason: report.reason.clone(),
            denials: report.denials.clone(),
            denial_count: report.denial_count,
            duration_ms: report.duration_ms,
            expected_denials: report.expected_denials.clone(),
            packages: report.packages.clone(),
        }
    }
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunLogEntry {
    pub seq: u64,
    pub time: jiff::Timestamp,
    pub prev: String,
    pub event: RunLogEvent,
}

/// The last entry of a chain: keep a copy off the host to detect rewrites
/// and truncation with [`verify_anchored`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub seq: u64,
    /// Hex SHA-256 of the entry's line.
    pub hash: String,
}

/// A chain that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub entries: u64,
    /// `None` for an empty log.
    pub head: Option<Head>,
}

/// The run log of a state directory.
#[derive(Debug, Clone)]
pub struct RunLog {
    state: StateDir,
    path: PathBuf,
}

fn line_hash(line: &[u8]) -> String {
    hex::encode(Sha256::digest(line))
}

impl RunLog {
    pub fn new(state: &StateDir) -> Self {
        RunLog {
            state: state.clone(),
            path: state.root().join(RUN_LOG_FILE),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Which of `run_ids` have their result (`run_finished`) in the log.
    ///
    /// Recovery asks this of in-progress markers whose agent is gone: the
    /// runner clears a run's marker only after its result is durable here,
    /// but does not wait for that removal to reach the disk (see
    /// [`StateDir::clear_logged_in_progress`]), so after a crash a marker can
    /// reappear for a run that finished. Reads the whole file once, parsing
    /// only the lines that mention one of the runs; it runs only for markers
    /// of dead agents. A line that does not parse counts as no result
    /// (recovery then records the run as interrupted: a duplicate record,
    /// never a lost one).
    pub fn finished_runs(
        &self,
        run_ids: &BTreeSet<String>,
    ) -> Result<BTreeSet<String>, RunLogError> {
        let io_err = |source| RunLogError::Io {
            action: "read",
            path: self.path.clone(),
            source,
        };
        let mut found = BTreeSet::new();
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(found),
            Err(e) => return Err(io_err(e)),
        };
        let mentions = |line: &[u8], id: &str| {
            !id.is_empty() && line.windows(id.len()).any(|w| w == id.as_bytes())
        };
        let mut reader = BufReader::new(file);
        let mut line = Vec::new();
        while found.len() < run_ids.len() && read_line(&mut reader, &mut line).map_err(io_err)? {
            if !run_ids.iter().any(|id| mentions(&line, id)) {
                continue;
            }
            let Ok(entry) = serde_json::from_slice::<RawEntry>(&line) else {
                continue;
            };
            if entry.event.get("type").and_then(|t| t.as_str()) != Some("run_finished") {
                continue;
            }
            if let Some(id) = entry.event.get("run_id").and_then(|r| r.as_str()) {
                if run_ids.contains(id) {
                    found.insert(id.to_string());
                }
            }
        }
        Ok(found)
    }

    /// Append an entry durably; returns the new head.
    pub fn append(&self, event: RunLogEvent) -> Result<Head, RunLogError> {
        let lock = self.state.lock()?;
        self.append_locked(&lock, event)
    }

    /// [`RunLog::append`] for a caller that already holds the state lock
    /// (see [`StateDir::begin_run`]).
    pub fn append_locked(
        &self,
        _lock: &StateLock,
        event: RunLogEvent,
    ) -> Result<Head, RunLogError> {
        let io_err = |action| {
            let path = self.path.clone();
            move |source| RunLogError::Io {
                action,
                path,
                source,
            }
        };
        let existed = self.path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&self.path)
            .map_err(io_err("open"))?;
        let (seq, prev) = match last_line(&file, &self.path)? {
            None => (1, GENESIS_PREV.to_string()),
            Some(line) => {
                let entry: RawEntry =
                    serde_json::from_slice(&line).map_err(|e| RunLogError::DamagedTail {
                        path: self.path.clone(),
                        why: e.to_string(),
                    })?;
                let next = entry
                    .seq
                    .checked_add(1)
                    .ok_or_else(|| RunLogError::DamagedTail {
                        path: self.path.clone(),
                        why: "seq overflow".into(),
                    })?;
                (next, line_hash(&line))
            }
        };
        let entry = RunLogEntry {
            seq,
            time: jiff::Timestamp::now(),
            prev,
            event,
        };
        let mut line =
            serde_json::to_vec(&entry).map_err(|e| RunLogError::Encode(e.to_string()))?;
        let hash = line_hash(&line);
        line.push(b'\n');
        // One write: with O_APPEND the kernel places it at the end
        // atomically with respect to other appenders.
        file.write_all(&line).map_err(io_err("append to"))?;
        file.sync_all().map_err(io_err("fsync"))?;
        if !existed {
            fsync_dir(self.state.root())?;
        }
        Ok(Head { seq, hash })
    }
}

/// The last complete line of the file (without its newline), `None` when
/// the file is empty. A file that does not end in a newline has a damaged
/// tail.
fn last_line(file: &File, path: &Path) -> Result<Option<Vec<u8>>, RunLogError> {
    let io_err = |source| RunLogError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    };
    let len = file.metadata().map_err(io_err)?.len();
    if len == 0 {
        return Ok(None);
    }
    let mut last = [0u8; 1];
    file.read_exact_at(&mut last, len - 1).map_err(io_err)?;
    if last[0] != b'\n' {
        return Err(RunLogError::DamagedTail {
            path: path.to_path_buf(),
            why: "it does not end with a newline".into(),
        });
    }
    // Read backwards in growing chunks until the newline before the last line.
    let end = len - 1;
    let mut chunk: u64 = 8192;
    loop {
        let start = end.saturating_sub(chunk);
        let mut buf = vec![0u8; (end - start) as usize];
        file.read_exact_at(&mut buf, start).map_err(io_err)?;
        if let Some(i) = buf.iter().rposition(|b| *b == b'\n') {
            return Ok(Some(buf[i + 1..].to_vec()));
        }
        if start == 0 {
            return Ok(Some(buf));
        }
        if chunk as usize >= MAX_LINE {
            return Err(RunLogError::DamagedTail {
                path: path.to_path_buf(),
                why: format!("the last line is longer than {MAX_LINE} bytes"),
            });
        }
        chunk *= 2;
    }
}

/// The head of the log at `path` (verifying the whole chain on the way).
pub fn head(path: &Path) -> Result<Option<Head>, RunLogError> {
    Ok(verify(path)?.head)
}

/// Read the next line into `buf` (replacing its contents), newline
/// included, at most `MAX_LINE + 1` bytes of it (a longer line is left
/// without its newline for the caller to reject). `false` at end of file.
fn read_line(reader: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<bool> {
    buf.clear();
    Ok(reader.take(MAX_LINE as u64 + 1).read_until(b'\n', buf)? > 0)
}

/// Entries as `verify` reads them: the event is kept as raw JSON so a log
/// written by a newer agent (with event types this one does not know)
/// still verifies.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    seq: u64,
    time: String,
    prev: String,
    event: serde_json::Value,
}

/// Check the whole chain. `Ok` means every line is a well-formed entry, the
/// `seq`s count 1, 2, 3… and each `prev` is the hash of the line before.
/// Otherwise the error names the first line that breaks the chain.
pub fn verify(path: &Path) -> Result<VerifyReport, RunLogError> {
    walk(path, |_, _| Ok(()))
}

/// [`verify`], and also check that the entry `anchor.seq` hashes to
/// `anchor.hash` — a head recorded earlier somewhere the host cannot
/// rewrite. Detects a rewritten history and a log cut off before the anchor.
pub fn verify_anchored(path: &Path, anchor: &Head) -> Result<VerifyReport, RunLogError> {
    let mut seen = false;
    let report = walk(path, |seq, hash| {
        if seq == anchor.seq {
            seen = true;
            if hash != anchor.hash {
                return Err(RunLogError::AnchorMismatch {
                    seq,
                    why: "the entry there has a different hash: the log was rewritten".into(),
                });
            }
        }
        Ok(())
    })?;
    if !seen {
        return Err(RunLogError::AnchorMismatch {
            seq: anchor.seq,
            why: format!("the log ends at {} entries: it was cut", report.entries),
        });
    }
    Ok(report)
}

fn walk(
    path: &Path,
    mut on_entry: impl FnMut(u64, &str) -> Result<(), RunLogError>,
) -> Result<VerifyReport, RunLogError> {
    let io_err = |source| RunLogError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let mut reader = BufReader::new(file);
    let mut buf = Vec::new();
    let mut line_no: u64 = 0;
    let mut prev_hash = GENESIS_PREV.to_string();
    let mut head = None;
    loop {
        if !read_line(&mut reader, &mut buf).map_err(io_err)? {
            break;
        }
        line_no += 1;
        let broken = |kind| RunLogError::Broken {
            line: line_no,
            kind,
        };
        if buf.last() != Some(&b'\n') {
            if buf.len() > MAX_LINE {
                return Err(broken(ChainBreak::Malformed(format!(
                    "longer than {MAX_LINE} bytes"
                ))));
            }
            return Err(broken(ChainBreak::TruncatedLastLine));
        }
        let line = &buf[..buf.len() - 1];
        let entry: RawEntry = serde_json::from_slice(line)
            .map_err(|e| broken(ChainBreak::Malformed(e.to_string())))?;
        let expected = line_no;
        if entry.seq != expected {
            return Err(broken(ChainBreak::UnexpectedSeq {
                expected,
                found: entry.seq,
            }));
        }
        let prev_ok = entry.prev.len() == 64
            && entry
                .prev
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !prev_ok {
            return Err(broken(ChainBreak::Malformed(
                "prev is not 64 lowercase hex digits".into(),
            )));
        }
        if entry.prev != prev_hash {
            return Err(broken(ChainBreak::PrevMismatch));
        }
        if entry.time.parse::<jiff::Timestamp>().is_err() {
            return Err(broken(ChainBreak::Malformed(format!(
                "time {:?} is not RFC 3339",
                entry.time
            ))));
        }
        if !entry.event.get("type").is_some_and(|t| t.is_string()) {
            return Err(broken(ChainBreak::Malformed("event has no type".into())));
        }
        prev_hash = line_hash(line);
        on_entry(entry.seq, &prev_hash)?;
        head = Some(Head {
            seq: entry.seq,
            hash: prev_hash.clone(),
        });
    }
    Ok(VerifyReport {
        entries: line_no,
        head,
    })
}

#[cfg(test)]
mod tests;
