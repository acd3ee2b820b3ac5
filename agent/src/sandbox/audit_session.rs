//! A fresh kernel audit session for the run.
//!
//! Seccomp denial records (`AUDIT_SECCOMP`) carry `ses=` but no Landlock
//! domain id, so the session id is what ties them to a run. Writing a valid
//! uid to `/proc/self/loginuid` makes the kernel allocate a new session id
//! for this process, inherited by everything it starts. Changing an already
//! set loginuid needs CAP_AUDIT_CONTROL, which stage 2 still has at this
//! point and drops right after; the bundle can never change it again.

use std::fs;
use std::io;

/// `(uid_t)-1`: loginuid never set.
const UNSET: &str = "4294967295";

#[derive(Debug, thiserror::Error)]
pub enum AuditSessionError {
    #[error("cannot read {file}: {source} (kernel built without CONFIG_AUDITSYSCALL?)")]
    Read {
        file: &'static str,
        source: io::Error,
    },
    #[error("cannot write /proc/self/loginuid: {0} (is the loginuid immutable on this host?)")]
    Write(io::Error),
    #[error("the kernel did not assign a new audit session (before {before}, after {after})")]
    NotAssigned { before: String, after: String },
}

fn read(file: &'static str) -> Result<String, AuditSessionError> {
    fs::read_to_string(file)
        .map(|s| s.trim().to_string())
        .map_err(|source| AuditSessionError::Read { file, source })
}

/// Start a new audit session and return its id.
pub fn start_new() -> Result<u32, AuditSessionError> {
    let before = read("/proc/self/sessionid")?;
    let loginuid = read("/proc/self/loginuid")?;
    // Keep the login uid when one is set (it names the operator who started
    // the agent); otherwise claim uid 0, the agent's identity.
    let value = if loginuid == UNSET {
        "0".to_string()
    } else {
        loginuid
    };
    // One write(2) of the whole value, as the kernel requires.
    fs::write("/proc/self/loginuid", value.as_bytes()).map_err(AuditSessionError::Write)?;
    let after = read("/proc/self/sessionid")?;
    match after.parse::<u32>() {
        Ok(id) if id != u32::MAX && after != before => Ok(id),
        _ => Err(AuditSessionError::NotAssigned { before, after }),
    }
}
