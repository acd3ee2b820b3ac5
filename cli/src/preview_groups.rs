//! `rollguard rollout changes ID`: a preview rollout's hosts grouped by
//! identical findings (the changes each would make, its denials, its
//! failure), largest group first, so 4,812 hosts that would make the same
//! one-line edit read as one line and the one host that would delete a
//! customer's home stands out.

use std::collections::BTreeMap;

use rollguard_shared::protocol::{HostRun, RolloutStatus};
use rollguard_shared::report::RunStatus;
use serde::Serialize;

/// Hosts whose findings are the same, line for line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Group {
    pub count: usize,
    pub hosts: Vec<String>,
    /// What each of them found: `DENIED ...` first, then the changes.
    pub lines: Vec<String>,
    /// Clean: a preview that succeeded, with no denial and nothing else
    /// that would keep `--after-preview` from starting.
    pub clean: bool,
}

/// What makes two hosts' findings the same: the lines shown, whether
/// clean, and every field they summarize in full (two different edits
/// with the same `+1 −1` are two groups).
type Key = (Vec<String>, bool, String);

/// One host's findings, as lines, and whether they are clean.
fn findings(h: &HostRun) -> Key {
    let Some(r) = &h.report else {
        return (
            vec![format!("no result ({})", h.state)],
            false,
            String::new(),
        );
    };
    let exact = serde_json::json!([
        r.status,
        r.denials,
        r.denial_count,
        r.limits_hit,
        r.preview,
        r.services,
        r.services_captured,
    ])
    .to_string();
    let mut lines = Vec::new();
    let mut clean = r.status == RunStatus::Succeeded && !r.is_alert();
    if r.status != RunStatus::Succeeded {
        lines.push(format!(
            "{}: {}",
            h.state.to_uppercase(),
            r.reason.as_deref().unwrap_or("no reason given")
        ));
    }
    match &r.denials {
        None => lines.push("denials UNKNOWN (not observable on this host)".to_string()),
        Some(list) => {
            for d in list {
                lines.push(format!(
                    "DENIED {} {}",
                    d.access,
                    d.path.as_deref().unwrap_or("(no path)")
                ));
            }
            let count = r.denial_count.unwrap_or(0);
            if count > list.len() as u64 {
                lines.push(format!("DENIED {count} in total ({} listed)", list.len()));
            }
        }
    }
    for c in r.services_captured.iter().filter(|c| c.is_denied()) {
        lines.push(format!("DENIED service action {} {}", c.verb, c.unit));
    }
    for hit in &r.limits_hit {
        lines.push(format!("LIMIT HIT {hit}"));
    }
    match &r.preview {
        None if r.status != RunStatus::Refused => {
            clean = false;
            lines.push("not a preview report (ran for real?)".to_string());
        }
        None => clean = false,
        Some(p) => {
            lines.extend(p.changes.iter().map(|c| c.summary()));
            if p.changes_dropped > 0 {
                lines.push(format!("... and {} more change(s)", p.changes_dropped));
            }
            if !p.complete {
                clean = false;
                lines.push("INCOMPLETE: not every change could be read".to_string());
            }
        }
    }
    for s in &r.services {
        lines.push(format!("would {} {}", s.action.as_str(), s.unit.as_str()));
    }
    if lines.is_empty() {
        lines.push("no change".to_string());
    }
    (lines, clean, exact)
}

/// The hosts of `status` grouped by identical findings, largest group
/// first (then by first host).
pub fn groups(status: &RolloutStatus) -> Vec<Group> {
    let mut by: BTreeMap<Key, Vec<String>> = BTreeMap::new();
    for h in &status.hosts {
        by.entry(findings(h)).or_default().push(h.host.clone());
    }
    let mut out: Vec<Group> = by
        .into_iter()
        .map(|((lines, clean, _), mut hosts)| {
            hosts.sort();
            Group {
                count: hosts.len(),
                hosts,
                lines,
                clean,
            }
        })
        .collect();
    out.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.hosts.cmp(&b.hosts)));
    out
}

/// How many host names a group shows before "and N more".
const HOSTS_SHOWN: usize = 5;

pub fn print(status: &RolloutStatus, groups: &[Group]) {
    let unclean: usize = groups.iter().filter(|g| !g.clean).map(|g| g.count).sum();
    println!(
        "preview {} of {} v{}: {} host(s) in {} group(s), {unclean} NOT CLEAN{}",
        status.id,
        status.plan.bundle.name,
        status.plan.bundle.version,
        status.hosts.len(),
        groups.len(),
        if status.state == rollguard_shared::protocol::RolloutState::Running {
            " (still running)"
        } else {
            ""
        }
    );
    for g in groups {
        let mut names = g
            .hosts
            .iter()
            .take(HOSTS_SHOWN)
            .cloned()
            .collect::<Vec<_>>();
        if g.count > HOSTS_SHOWN {
            names.push(format!("and {} more", g.count - HOSTS_SHOWN));
        }
        println!(
            "{} host(s){}: {}",
            g.count,
            if g.clean { "" } else { " [NOT CLEAN]" },
            names.join(", ")
        );
        for line in &g.lines {
            println!("    {line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rollguard_shared::report::{
        ChangeKind, Denial, FileKind, FileMeta, PathChange, Preview, RunReport,
    };

    fn host(name: &str, changes: &[&str], denied: &[&str]) -> HostRun {
        let meta = FileMeta {
            kind: FileKind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 1,
        };
        HostRun {
            host: name.into(),
            wave: 0,
            state: "succeeded".into(),
            report: Some(RunReport {
                denials: Some(
                    denied
                        .iter()
                        .map(|p| Denial {
                            access: "erofs.unlinkat".into(),
                            path: Some(p.to_string()),
                            exe: None,
                        })
                        .collect(),
                ),
                denial_count: Some(denied.len() as u64),
                preview: Some(Preview {
                    changes: changes
                        .iter()
                        .map(|p| PathChange {
                            path: p.to_string(),
                            change: ChangeKind::Modified,
                            before: Some(meta),
                            after: Some(meta),
                            diff: Some("--- a\n+++ b\n@@ -1 +1 @@\n-x\n+y\n".into()),
                            xattrs_changed: false,
                        })
                        .collect(),
                    changes_dropped: 0,
                    complete: true,
                }),
                ..RunReport::new(name, RunStatus::Succeeded)
            }),
        }
    }

    #[test]
    fn hosts_with_the_same_findings_are_one_group_largest_first() {
        let status: RolloutStatus = serde_json::from_value(serde_json::json!({
            "id": "r-1", "state": "completed",
            "phase": "dispatching", "current_wave": 1, "wave_count": 1,
            "plan": {"bundle": {"sha256": "0".repeat(64), "name": "b", "version": 1, "size": 1},
                     "targets": {}, "scope": {}, "signers": [], "timeout_secs": 1, "bake_secs": 0,
                     "max_failures": 0, "halt_on": {}, "waves": [], "out_of_scope": 0, "preview": true},
            "hosts": [], "created_at": "x", "updated_at": "x"
        }))
        .unwrap_or_else(|e| panic!("fixture: {e}"));
        let mut status = status;
        status.hosts = vec![
            host("m3", &["/etc/main.cf"], &[]),
            host("m1", &["/etc/main.cf"], &[]),
            host("m2", &["/etc/main.cf"], &["/home/customers"]),
        ];
        // Same one-line summary, another edit: a group of its own.
        let mut other = host("m4", &["/etc/main.cf"], &[]);
        if let Some(p) = other.report.as_mut().and_then(|r| r.preview.as_mut()) {
            p.changes[0].diff = Some("--- a\n+++ b\n@@ -1 +1 @@\n-z\n+w\n".into());
        }
        status.hosts.push(other);
        let g = groups(&status);
        assert_eq!(g.len(), 3, "{g:#?}");
        assert_eq!(g[2].hosts, ["m4"]);
        assert_eq!(g[2].lines, g[0].lines);
        assert_eq!(g[0].hosts, ["m1", "m3"]);
        assert!(g[0].clean);
        assert_eq!(g[0].lines, ["modify /etc/main.cf (+1 \u{2212}1)"]);
        assert_eq!(g[1].hosts, ["m2"]);
        assert!(!g[1].clean);
        assert_eq!(
            g[1].lines,
            [
                "DENIED erofs.unlinkat /home/customers",
                "modify /etc/main.cf (+1 \u{2212}1)"
            ]
        );
    }
}
