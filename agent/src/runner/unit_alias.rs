//! After the run, before any service action: aliases of the agent's own
//! systemd unit that the bundle made.
//!
//! The agent's unit file and drop-in directories are protected under every
//! name systemd would look them up by (`policy::SYSTEMD_UNIT_DIRS` ×
//! `SYSTEMD_UNIT_NAMES`), and pinned when inside a write scope. But systemd
//! also reads drop-ins under each *alias* of a unit: a symlink
//! `x.service -> rollguard-agent.service` at the top level of a unit
//! directory makes `x.service.d/*.conf` apply to the agent's unit at the
//! next `daemon-reload` or boot (checked on systemd 252). Such names cannot
//! be listed in advance, and refusing symlinks in unit directories would
//! break packages that ship their own aliases and masks. So after the run
//! (every process of the bundle is gone by then, nothing races this scan),
//! each unit directory the run could write is searched for a symlink whose
//! chain names the agent's unit; each one found is removed and reported as
//! a denial, and the run fails (so nothing is performed, and the rollout
//! halts). One that exists before the run in such a directory refuses the
//! bundle: its drop-in directory would be the bundle's to write.
//!
//! Not covered, by design: a write scope over a unit directory lets the
//! bundle add units of its own that systemd runs as root at the next boot
//! (docs/sandbox.md, "Known limits"). This check keeps the agent's own
//! confinement from being rewritten that way; it does not make such a
//! scope safe.

use std::fs;
use std::path::{Path, PathBuf};

use rollguard_shared::manifest::Scope;
use rollguard_shared::report::{Denial, RunReport, RunStatus};

use crate::policy::{AGENT_UNIT, SYSTEMD_UNIT_DIRS};

/// The report's name for this denial (`Denial::access`).
pub const ACCESS: &str = "systemd.alias_agent_unit";

/// Symlink hops followed before giving up (the kernel's own limit is 40);
/// a longer chain is treated as naming the agent's unit.
const MAX_HOPS: usize = 40;

/// Before the run: an alias of the agent's unit already in a unit
/// directory the run could write is refused (the bundle could give it
/// drop-ins), as is a unit directory that cannot be searched.
pub(super) fn check_none(scope: &Scope) -> Result<(), String> {
    let (found, errors) = find(scope);
    if !found.is_empty() {
        return Err(format!(
            "{} in a unit directory this bundle could write: an alias of the agent's unit {AGENT_UNIT}, whose drop-ins would configure the agent",
            display(&found)
        ));
    }
    if !errors.is_empty() {
        return Err(format!(
            "cannot check the unit directories for aliases of {AGENT_UNIT}: {}",
            errors.join("; ")
        ));
    }
    Ok(())
}

/// After the run: find, remove and report the aliases of the agent's unit
/// in the unit directories `scope` could write; any found (or a directory
/// that could not be searched) fails the run.
pub(super) fn remove_new(scope: &Scope, report: &mut RunReport) {
    let (found, mut errors) = find(scope);
    if found.is_empty() && errors.is_empty() {
        return;
    }
    let mut why = Vec::new();
    if !found.is_empty() {
        for path in &found {
            tracing::error!(path = %path.display(), "the run made an alias of the agent's unit; removing it");
            if let Err(e) = fs::remove_file(path) {
                errors.push(format!("removing {}: {e}", path.display()));
            }
        }
        why.push(format!(
            "the run made an alias of the agent's unit {AGENT_UNIT} (removed): {}",
            display(&found)
        ));
        if let Some(count) = report.denial_count.as_mut() {
            *count += found.len() as u64;
        }
        // Known for certain, whatever the audit could see: an unknown
        // (`None`) list becomes the list of what this scan found.
        report
            .denials
            .get_or_insert_with(Vec::new)
            .extend(found.iter().map(|path| Denial {
                access: ACCESS.to_string(),
                path: Some(path.display().to_string()),
                exe: None,
            }));
    }
    if !errors.is_empty() {
        // Fail closed: a unit directory we could not search may hold one.
        why.push(format!(
            "cannot check the unit directories for aliases of {AGENT_UNIT}: {}",
            errors.join("; ")
        ));
    }
    if report.status == RunStatus::Succeeded {
        report.status = RunStatus::Failed;
    }
    let why = why.join("; ");
    report.reason = Some(match report.reason.take() {
        Some(r) => format!("{r}; {why}"),
        None => why,
    });
}

fn display(paths: &[PathBuf]) -> String {
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    names.join(", ")
}

/// The symlinks naming the agent's unit at the top level of the unit
/// directories `scope` could write, and the directories that could not be
/// searched.
fn find(scope: &Scope) -> (Vec<PathBuf>, Vec<String>) {
    let mut found = Vec::new();
    let mut errors = Vec::new();
    for dir in writable_unit_dirs(scope) {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                errors.push(format!("{}: {e}", dir.display()));
                continue;
            }
        };
        for entry in entries {
            match entry {
                Ok(entry) => {
                    let path = entry.path();
                    if entry.file_type().is_ok_and(|t| t.is_symlink()) && names_agent_unit(&path) {
                        found.push(path);
                    }
                }
                Err(e) => errors.push(format!("{}: {e}", dir.display())),
            }
        }
    }
    found.sort();
    (found, errors)
}

/// The unit directories (as real paths, once each) inside one of the
/// scope's write paths: where the bundle could have made a top-level entry.
fn writable_unit_dirs(scope: &Scope) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = SYSTEMD_UNIT_DIRS
        .iter()
        .filter_map(|d| fs::canonicalize(d).ok())
        .filter(|d| scope.write.iter().any(|w| d.starts_with(w.as_path())))
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

/// Whether the symlink at `link` names the agent's unit anywhere along its
/// chain (by file name, as systemd resolves an alias), or the chain is too
/// long to tell.
fn names_agent_unit(link: &Path) -> bool {
    let mut current = link.to_path_buf();
    for _ in 0..MAX_HOPS {
        let target = match fs::read_link(&current) {
            Ok(t) => t,
            // Not a symlink (the chain ends) or gone.
            Err(_) => return false,
        };
        if target.file_name().is_some_and(|n| n == AGENT_UNIT) {
            return true;
        }
        current = match current.parent() {
            Some(parent) => parent.join(&target),
            None => target,
        };
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn a_chain_naming_the_agent_unit_is_found_and_others_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::write(d.join("web.service"), "").unwrap();
        symlink("web.service", d.join("www.service")).unwrap();
        symlink("/dev/null", d.join("masked.service")).unwrap();
        symlink(AGENT_UNIT, d.join("x.service")).unwrap();
        symlink("x.service", d.join("y.service")).unwrap();
        symlink(format!("/nowhere/{AGENT_UNIT}"), d.join("z.service")).unwrap();
        symlink("loop.service", d.join("loop.service")).unwrap();
        assert!(!names_agent_unit(&d.join("www.service")));
        assert!(!names_agent_unit(&d.join("masked.service")));
        assert!(names_agent_unit(&d.join("x.service")));
        assert!(names_agent_unit(&d.join("y.service")));
        assert!(names_agent_unit(&d.join("z.service")));
        // Too long to tell: counted as naming it.
        assert!(names_agent_unit(&d.join("loop.service")));
    }
}
