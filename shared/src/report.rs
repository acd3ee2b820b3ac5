//! The run report: what an agent says about one attempt to run a bundle.
//!
//! The same JSON object is printed by `rollguard-agent run --json` and sent
//! to the controller by the daemon, which halts rollouts on refusals and
//! denials. Field names are part of the interface; add, never rename.

use serde::{Deserialize, Serialize};

use crate::services::{CapturedRequest, ServiceOutcome, StaleService};

mod fit;

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Ran and exited 0 (denials may still be present: see [`RunReport::is_alert`]).
    Succeeded,
    /// Ran and exited non-zero or died of a signal.
    Failed,
    /// Not run at all: verification or policy said no. Nothing executed.
    Refused,
    /// Killed by the agent when the bundle's timeout passed.
    TimedOut,
    /// Killed by a kill-switch order.
    Killed,
    /// The agent restarted while the run was in progress; it is not re-run.
    Interrupted,
}

/// Why a bundle was refused, for machines; `reason` carries the sentence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalKind {
    /// The file is not a well-formed bundle (tar, manifest, payload digests).
    BadBundle,
    /// Fewer valid distinct signers than the host's threshold.
    Signatures,
    Expired,
    /// Version not newer than one already run (rollback protection).
    Rollback,
    /// This host is not in the bundle's `[targets]`.
    NotTarget,
    /// A scope path overlaps a protected path of the host.
    ProtectedPath,
    /// A scope path lies outside the host's `allow_scopes` ceiling.
    ScopeCeiling,
    /// The kernel lacks a mechanism needed to confine the bundle.
    KernelUnsupported,
    /// A kill-switch order is in force on this host.
    KillSwitch,
    /// The host's own state or configuration prevented the run.
    HostError,
}

/// One access the kernel refused while the bundle ran.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Denial {
    /// What was refused, e.g. `fs.remove_file`, `fs.write_file`,
    /// `net.connect_tcp`, `scope.signal`, `syscall.mount`.
    pub access: String,
    /// The object, when the kernel names one (a path, a port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The program that attempted it, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
}

/// One `scope.network` entry and the addresses the kernel allowed for it
/// in this run: a host name is resolved by the agent when the run starts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NetworkGrant {
    /// The entry in canonical form, e.g. `tcp:mirror.internal:80`.
    pub entry: String,
    /// Address blocks allowed for it, e.g. `10.0.0.7`, `10.0.0.0/24`.
    pub addresses: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleRef {
    pub name: String,
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunReport {
    pub status: RunStatus,
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<RefusalKind>,
    /// `None` means the agent could not observe denials on this host (audit
    /// unavailable): unknown, never "zero".
    pub denials: Option<Vec<Denial>>,
    /// Total denials the kernel counted for the run's Landlock domain; may
    /// exceed `denials.len()` when records were rate-limited or deduplicated.
    #[serde(default)]
    pub denial_count: Option<u64>,
    pub bundle: Option<BundleRef>,
    pub host: String,
    pub duration_ms: u64,
    /// Principals whose signatures met the host's threshold.
    #[serde(default)]
    pub signers: Vec<String>,
    /// Processes still alive in the run's cgroup after the main process
    /// exited (they were killed).
    #[serde(default)]
    pub leftover_processes: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stdout_tail: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stderr_tail: String,
    /// Resource limits the run ran into (`pids`, `memory`, `tmp`); a run
    /// that hit one failed, and it is an alert.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limits_hit: Vec<String>,
    /// Bytes of stdout / stderr beyond the host's output limit, dropped
    /// between the kept head and tail.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub stdout_dropped_bytes: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub stderr_dropped_bytes: u64,
    /// The run's network scope as enforced (names resolved at run start).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network: Vec<NetworkGrant>,
    /// Service requests programs made inside the sandbox (maintainer
    /// scripts' `deb-systemd-invoke`, `systemctl`...), captured, not
    /// performed there; each says what the agent did with it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services_captured: Vec<CapturedRequest>,
    /// The reloads and restarts the agent performed after the run, one per
    /// unit (its strongest action asked for), with systemd's result.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceOutcome>,
    /// Processes still mapping files the run's packages replaced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stale_services: Vec<StaleService>,
    /// The bundle's `[packages]`, each with the version installed before
    /// and after the run as the package database says.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<PackageChange>,
    /// Packages whose triggers are pending after the run (at most 64):
    /// dpkg runs with `--no-triggers`, so a trigger the bundle's packages
    /// activate in another package (libc-bin's ldconfig, man-db) does not
    /// run in the sandbox; apt runs it at its end, or
    /// `dpkg --triggers-only --pending` (docs/bundle-format.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub triggers_pending: Vec<String>,
    /// Denials the agent recognised as a known, harmless side effect of the
    /// package manager (each with its reason; docs/bundle-format.md lists
    /// them). Not in `denials` nor `denial_count`, so they do not halt a
    /// rollout, but shown here, never dropped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expected_denials: Vec<ExpectedDenial>,
    /// A preview (`rollguard-agent run --preview`): the run's writes went
    /// to a throw-away layer over its scopes, nothing reached the disk, no
    /// service action was performed and the version was not used up. What
    /// it would have changed is here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<Preview>,
}

/// What a preview run would have changed (see [`RunReport::preview`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preview {
    /// Each path created, modified or deleted beneath the scopes, sorted
    /// by path. A rename shows as its two halves: the old path deleted,
    /// the new one created.
    pub changes: Vec<PathChange>,
    /// Changes beyond the report's bound: counted, not listed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub changes_dropped: u64,
    /// `false`: the changes could not all be read (the report's reason
    /// says why, and the run failed), or the report was cut to fit the
    /// controller's limit (`RunReport::fit`; the reason says what was
    /// cut): what is listed is not everything, or not in full.
    pub complete: bool,
}

/// One path a preview run changed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PathChange {
    pub path: String,
    pub change: ChangeKind,
    /// The path on the host before (absent when created).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<FileMeta>,
    /// The path as the run left it (absent when deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<FileMeta>,
    /// A unified diff, for small text files modified or created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff: Option<String>,
    /// Its extended attributes (ACLs included) differ from the host's.
    #[serde(default, skip_serializing_if = "is_false")]
    pub xattrs_changed: bool,
}

impl PathChange {
    /// Lines added and removed by its diff (none without one), for
    /// one-line summaries such as `modify /etc/x (+1 −1)`.
    pub fn diff_stat(&self) -> Option<(usize, usize)> {
        let diff = self.diff.as_deref()?;
        // The `---`/`+++` header ends at the first hunk; after it a line
        // starting `---` is a removed line.
        Some(
            diff.lines()
                .skip_while(|l| !l.starts_with("@@"))
                .fold((0, 0), |(a, r), l| match l.as_bytes().first() {
                    Some(b'+') => (a + 1, r),
                    Some(b'-') => (a, r + 1),
                    _ => (a, r),
                }),
        )
    }

    /// One line: `modify /etc/x (+1 −1)`, `delete /var/x`, with `xattrs`
    /// when only its extended attributes differ.
    pub fn summary(&self) -> String {
        let mut what = Vec::new();
        let stat = self.diff_stat().filter(|&(a, r)| a + r > 0);
        if let Some((added, removed)) = stat {
            what.push(format!("+{added} \u{2212}{removed}"));
        }
        if let (Some(b), Some(a)) = (&self.before, &self.after) {
            if b.kind != a.kind {
                what.push(format!("{:?} -> {:?}", b.kind, a.kind).to_lowercase());
            }
            if b.mode != a.mode {
                what.push(format!("mode {:o} -> {:o}", b.mode, a.mode));
            }
            if (b.uid, b.gid) != (a.uid, a.gid) {
                what.push(format!("owner {}:{} -> {}:{}", b.uid, b.gid, a.uid, a.gid));
            }
            if b.size != a.size && stat.is_none() {
                what.push(format!("size {} -> {}", b.size, a.size));
            }
        }
        if self.xattrs_changed {
            what.push("xattrs".to_string());
        }
        let mut line = format!("{} {}", self.change.as_str(), self.path);
        if !what.is_empty() {
            line.push_str(&format!(" ({})", what.join(", ")));
        }
        line
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Created,
    Modified,
    Deleted,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Created => "create",
            ChangeKind::Modified => "modify",
            ChangeKind::Deleted => "delete",
        }
    }
}

/// Type, permissions, owner and size of a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileMeta {
    pub kind: FileKind,
    /// Permission bits (with setuid, setgid, sticky), e.g. `0o644`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// A denial recognised as expected (see [`RunReport::expected_denials`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpectedDenial {
    /// Why it is expected, e.g. `glibc-nscd-probe`.
    pub reason: String,
    #[serde(flatten)]
    pub denial: Denial,
    /// How many audit records named it.
    pub records: u64,
}

/// One package of the bundle and what the run did to the host's package
/// database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageChange {
    /// `dpkg` or `rpm`.
    pub manager: String,
    pub name: String,
    /// The version in the bundle (the signed manifest's).
    pub version: String,
    /// Installed before the run; `None`: not installed.
    pub before: Option<String>,
    /// Installed after the run; `None`: not installed, or unknown when the
    /// database could not be read (`error` says so).
    pub after: Option<String>,
    /// dpkg's state after the run when it is not `installed` (e.g.
    /// `half-configured`: a maintainer script failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl PackageChange {
    /// One line: `rgtest 1.0 -> 2.0`, `(none)` where it is not installed,
    /// dpkg's state when it is not `installed`, and why the database could
    /// not be read.
    pub fn summary(&self) -> String {
        let mut line = format!(
            "{} {} -> {}",
            self.name,
            self.before.as_deref().unwrap_or("(none)"),
            self.after.as_deref().unwrap_or("(none)")
        );
        if let Some(state) = &self.state {
            line.push_str(&format!(" ({state})"));
        }
        if let Some(error) = &self.error {
            line.push_str(&format!(" [unknown: {error}]"));
        }
        line
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl RunReport {
    /// A report with nothing known yet: no exit code, denials unknown
    /// (`None`, never a silent zero), no bundle. Every report starts here,
    /// so a field added later has one default.
    pub fn new(host: &str, status: RunStatus) -> RunReport {
        RunReport {
            status,
            exit_code: None,
            reason: None,
            refusal: None,
            denials: None,
            denial_count: None,
            bundle: None,
            host: host.to_string(),
            duration_ms: 0,
            signers: vec![],
            leftover_processes: 0,
            run_id: None,
            stdout_tail: String::new(),
            stderr_tail: String::new(),
            limits_hit: vec![],
            stdout_dropped_bytes: 0,
            stderr_dropped_bytes: 0,
            network: vec![],
            services_captured: vec![],
            services: vec![],
            stale_services: vec![],
            packages: vec![],
            triggers_pending: vec![],
            expected_denials: vec![],
            preview: None,
        }
    }

    /// True when the controller must halt a rollout on this report: the
    /// bundle was refused, or it attempted something the kernel denied (or
    /// we cannot tell whether it did).
    pub fn is_alert(&self) -> bool {
        if !self.limits_hit.is_empty() {
            // Exhausting the host's resources is an attempt, too.
            return true;
        }
        if self
            .services_captured
            .iter()
            .any(CapturedRequest::is_denied)
        {
            // A service action the host does not allow is an attempt too
            // (the agent also lists it in `denials`; this holds without).
            return true;
        }
        match self.status {
            RunStatus::Refused => true,
            _ => match &self.denials {
                None => self.status != RunStatus::Killed,
                Some(d) => !d.is_empty() || self.denial_count.unwrap_or(0) > 0,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_summary_counts_diff_lines_not_headers() {
        let meta = |mode| FileMeta {
            kind: FileKind::File,
            mode,
            uid: 0,
            gid: 0,
            size: 4,
        };
        let mut c = PathChange {
            path: "/etc/x".into(),
            change: ChangeKind::Modified,
            before: Some(meta(0o644)),
            after: Some(meta(0o600)),
            diff: Some("--- a/x\n+++ b/x\n@@ -1,2 +1,2 @@\n a\n-b\n+c\n+d\n".into()),
            xattrs_changed: false,
        };
        assert_eq!(c.diff_stat(), Some((2, 1)));
        assert_eq!(c.summary(), "modify /etc/x (+2 \u{2212}1, mode 644 -> 600)");
        c.diff = None;
        assert_eq!(c.summary(), "modify /etc/x (mode 644 -> 600)");
        // A removed line that starts with "--" is a removed line.
        c.diff = Some("--- a/x\n+++ b/x\n@@ -1 +1 @@\n--- x\n+++ y\n".into());
        assert_eq!(c.diff_stat(), Some((1, 1)));
    }

    fn base() -> RunReport {
        RunReport {
            exit_code: Some(0),
            denials: Some(vec![]),
            denial_count: Some(0),
            bundle: Some(BundleRef {
                name: "x".into(),
                version: 1,
            }),
            duration_ms: 3,
            signers: vec!["alice".into()],
            ..RunReport::new("h", RunStatus::Succeeded)
        }
    }

    #[test]
    fn json_shape_is_stable() {
        let mut r = base();
        r.denials = Some(vec![Denial {
            access: "fs.remove_file".into(),
            path: Some("/backup/a".into()),
            exe: None,
        }]);
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["status"], "succeeded");
        assert_eq!(v["denials"][0]["access"], "fs.remove_file");
        assert_eq!(v["denials"][0]["path"], "/backup/a");
        assert_eq!(v["bundle"]["version"], 1);
        let back: RunReport = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn a_resource_limit_hit_is_an_alert() {
        let mut r = base();
        r.status = RunStatus::Failed;
        r.limits_hit = vec!["pids".into()];
        assert!(r.is_alert());
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["limits_hit"], serde_json::json!(["pids"]));
        // Absent when empty: older readers see the same JSON as before.
        assert!(serde_json::to_value(base())
            .unwrap()
            .get("limits_hit")
            .is_none());
    }

    #[test]
    fn a_denied_captured_service_request_is_an_alert() {
        let mut r = base();
        r.services_captured = vec![CapturedRequest {
            unit: "dovecot.service".into(),
            verb: "restart".into(),
            via: "systemctl".into(),
            disposition: "performed".into(),
        }];
        assert!(!r.is_alert());
        r.services_captured[0].disposition = "denied".into();
        assert!(r.is_alert());
    }

    #[test]
    fn alerts() {
        assert!(!base().is_alert());
        let mut denied = base();
        denied.denial_count = Some(2);
        assert!(
            denied.is_alert(),
            "a denial is an alert even when the script exited 0"
        );
        let mut unknown = base();
        unknown.denials = None;
        unknown.denial_count = None;
        assert!(unknown.is_alert(), "unknown denials are not 'zero'");
        let mut refused = base();
        refused.status = RunStatus::Refused;
        assert!(refused.is_alert());
        assert_eq!(
            serde_json::to_value(&unknown).unwrap()["denials"],
            serde_json::Value::Null
        );
    }
}
