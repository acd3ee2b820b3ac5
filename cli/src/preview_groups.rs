//! `rollguard rollout changes ID`: a preview rollout's hosts grouped by
//! identical findings (the changes each would make, its denials, its
//! failure), largest group first, so 4,812 hosts that would make the same
//! one-line edit read as one line and the one host that would delete a
//! customer's home stands out.

use std::collections::BTreeMap;

use rollguard_shared::protocol::{HostRun, RolloutStatus};
use rollguard_shared::report::{ChangeKind, FileMeta, PathChange, Preview, RunStatus};
use rollguard_shared::terminal::printable;
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

/// Files every dpkg run rewrites whole, holding the host's own records:
/// its database of every package, the journal of it, its log with times.
/// On a preview of a .deb bundle (as the signed plan says, not as a host
/// reports) their sizes and bytes differ from host to host whatever the
/// bundle does, so hosts would never share a group. A modification of one
/// groups by path, type, mode and owner, not by size or contents; what the
/// install changes in them is the packages' versions and states, which are
/// listed (and grouped on). Created or deleted, it is compared in full like
/// any file, and so is everything else beneath the database (a package's
/// file list, its maintainer scripts, a journal entry not named as dpkg
/// names them: digits only).
fn host_records(deb_plan: bool, c: &PathChange) -> bool {
    use rollguard_shared::manifest::packages::{DPKG_ADMINDIR, DPKG_LOG};
    if !deb_plan || c.change != ChangeKind::Modified {
        return false;
    }
    if c.path == DPKG_LOG {
        return true;
    }
    let Some(rest) = c
        .path
        .strip_prefix(DPKG_ADMINDIR)
        .and_then(|p| p.strip_prefix('/'))
    else {
        return false;
    };
    matches!(rest, "status" | "status-old")
        || rest
            .strip_prefix("updates/")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// `c` with what [`host_records`] does not compare taken out: the sizes
/// and the diff.
fn without_contents(c: &PathChange) -> PathChange {
    let size = |m: &Option<FileMeta>| m.map(|m| FileMeta { size: 0, ..m });
    PathChange {
        before: size(&c.before),
        after: size(&c.after),
        diff: None,
        ..c.clone()
    }
}

/// Whether the rollout's signed plan installs .deb packages.
fn deb_plan(status: &RolloutStatus) -> bool {
    status.plan.scope["packages"]["kind"] == "deb"
}

/// One host's findings, as lines, and whether they are clean.
fn findings(h: &HostRun, deb_plan: bool) -> Key {
    let Some(r) = &h.report else {
        return (
            vec![format!("no result ({})", h.state)],
            false,
            String::new(),
        );
    };
    // Each change as compared, and whether it is the host's own records
    // (see `host_records`), whose contents are not.
    let compared: Vec<(PathChange, bool)> = r
        .preview
        .iter()
        .flat_map(|p| &p.changes)
        .map(|c| match host_records(deb_plan, c) {
            true => (without_contents(c), true),
            false => (c.clone(), false),
        })
        .collect();
    let preview = r.preview.as_ref().map(|p| Preview {
        changes: compared.iter().map(|(c, _)| c.clone()).collect(),
        changes_dropped: p.changes_dropped,
        complete: p.complete,
    });
    let exact = serde_json::json!([
        r.status,
        r.denials,
        r.denial_count,
        r.limits_hit,
        preview,
        r.packages,
        r.triggers_pending,
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
            lines.extend(
                r.packages
                    .iter()
                    .map(|c| format!("package {}", c.summary())),
            );
            if !r.triggers_pending.is_empty() {
                lines.push(format!(
                    "triggers left pending in {}",
                    r.triggers_pending.join(", ")
                ));
            }
            lines.extend(compared.iter().map(|(c, records)| match records {
                true => format!(
                    "{} (this host's package records: contents not compared)",
                    c.summary()
                ),
                false => c.summary(),
            }));
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
    let deb = deb_plan(status);
    for h in &status.hosts {
        by.entry(findings(h, deb)).or_default().push(h.host.clone());
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
    print!("{}", render(status, groups));
}

/// What [`print`] shows.
fn render(status: &RolloutStatus, groups: &[Group]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let unclean: usize = groups.iter().filter(|g| !g.clean).map(|g| g.count).sum();
    let _ = writeln!(
        out,
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
        // Everything below is what hosts reported (paths a bundle chose,
        // reasons quoting them): printed escaped (see `terminal`).
        let mut names = g
            .hosts
            .iter()
            .take(HOSTS_SHOWN)
            .map(|h| printable(h))
            .collect::<Vec<_>>();
        if g.count > HOSTS_SHOWN {
            names.push(format!("and {} more", g.count - HOSTS_SHOWN));
        }
        let _ = writeln!(
            out,
            "{} host(s){}: {}",
            g.count,
            if g.clean { "" } else { " [NOT CLEAN]" },
            names.join(", ")
        );
        for line in &g.lines {
            let _ = writeln!(out, "    {}", printable(line));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rollguard_shared::report::{Denial, FileKind, PackageChange, RunReport};

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

    fn preview_status() -> RolloutStatus {
        serde_json::from_value(serde_json::json!({
            "id": "r-1", "state": "completed",
            "phase": "dispatching", "current_wave": 1, "wave_count": 1,
            "plan": {"bundle": {"sha256": "0".repeat(64), "name": "b", "version": 1, "size": 1},
                     "targets": {}, "scope": {}, "signers": [], "timeout_secs": 1, "bake_secs": 0,
                     "max_failures": 0, "halt_on": {}, "waves": [], "out_of_scope": 0, "preview": true},
            "hosts": [], "created_at": "x", "updated_at": "x"
        }))
        .unwrap_or_else(|e| panic!("fixture: {e}"))
    }

    #[test]
    fn hosts_with_the_same_findings_are_one_group_largest_first() {
        let mut status = preview_status();
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

    /// The changes of `h`'s preview report.
    fn changes(h: &mut HostRun) -> &mut Vec<PathChange> {
        &mut h.report.as_mut().unwrap().preview.as_mut().unwrap().changes
    }

    /// A host previewing `rgtest` from `before` to 2.0: its own package
    /// records (`status`, the log) of `records` bytes, and the package's
    /// file list with `list` in it.
    fn package_host(name: &str, before: &str, records: u64, list: &str) -> HostRun {
        let mut h = host(
            name,
            &[
                "/usr/bin/rgtest",
                "/var/lib/dpkg/info/rgtest.list",
                "/var/lib/dpkg/status",
                "/var/lib/dpkg/status-old",
                "/var/lib/dpkg/updates/0001",
                "/var/log/dpkg.log",
            ],
            &[],
        );
        h.report.as_mut().unwrap().packages = vec![PackageChange {
            manager: "dpkg".into(),
            name: "rgtest".into(),
            version: "2.0".into(),
            before: Some(before.into()),
            after: Some("2.0".into()),
            state: None,
            error: None,
        }];
        for c in changes(&mut h) {
            if c.path.ends_with(".list") {
                c.diff = Some(format!("--- a\n+++ b\n@@ -1 +1 @@\n-/x\n+{list}\n"));
            } else if !c.path.starts_with("/usr") {
                // The host's own: sizes and a log line with its time.
                c.after.as_mut().unwrap().size = records;
                c.diff = Some(format!("--- a\n+++ b\n@@ -0,0 +1 @@\n+{records} upgrade\n"));
            }
        }
        h
    }

    #[test]
    fn a_package_preview_groups_on_the_packages_not_on_each_hosts_own_records() {
        let mut status = preview_status();
        status.plan.scope = serde_json::json!({"packages": {"kind": "deb"}});
        // The status file made setuid: compared, whatever its contents.
        let mut m5 = package_host("m5", "1.0", 790_000, "/usr/bin/rgtest");
        for c in changes(&mut m5) {
            if c.path == "/var/lib/dpkg/status" {
                c.after.as_mut().unwrap().mode = 0o4777;
            }
        }
        // A journal entry dpkg would not name so: compared in full.
        let mut m6 = package_host("m6", "1.0", 790_000, "/usr/bin/rgtest");
        for c in changes(&mut m6) {
            if c.path == "/var/lib/dpkg/updates/0001" {
                c.path = "/var/lib/dpkg/updates/0001.sh".into();
            }
        }
        status.hosts = vec![
            package_host("m1", "1.0", 790_000, "/usr/bin/rgtest"),
            package_host("m2", "1.0", 8_100_000, "/usr/bin/rgtest"),
            // Another version before: another install.
            package_host("m3", "0.9", 790_000, "/usr/bin/rgtest"),
            // A file list of its own is not the host's records: compared.
            package_host("m4", "1.0", 790_000, "/usr/bin/other"),
            m5,
            m6,
        ];
        let g = groups(&status);
        assert_eq!(g.len(), 5, "{g:#?}");
        assert_eq!(g[0].hosts, ["m1", "m2"]);
        assert!(g[0].clean);
        assert_eq!(
            g[0].lines,
            [
                "package rgtest 1.0 -> 2.0",
                "modify /usr/bin/rgtest (+1 \u{2212}1)",
                "modify /var/lib/dpkg/info/rgtest.list (+1 \u{2212}1)",
                "modify /var/lib/dpkg/status (this host's package records: contents not compared)",
                "modify /var/lib/dpkg/status-old (this host's package records: contents not compared)",
                "modify /var/lib/dpkg/updates/0001 (this host's package records: contents not compared)",
                "modify /var/log/dpkg.log (this host's package records: contents not compared)",
            ]
        );
        let alone = |name: &str| {
            g.iter()
                .find(|g| g.hosts == [name])
                .unwrap_or_else(|| panic!("{name} alone: {g:#?}"))
        };
        assert_eq!(alone("m3").lines[0], "package rgtest 0.9 -> 2.0");
        assert_eq!(alone("m4").lines, g[0].lines);
        assert!(alone("m5").lines.contains(
            &"modify /var/lib/dpkg/status (mode 644 -> 4777) (this host's package records: contents not compared)"
                .to_string()
        ));
        assert!(alone("m6")
            .lines
            .contains(&"modify /var/lib/dpkg/updates/0001.sh (+1 \u{2212}0)".to_string()));

        // A plan without packages (whatever a host's report says): the same
        // paths are files like any other, compared in full.
        status.plan.scope = serde_json::json!({});
        let g = groups(&status);
        assert_eq!(g.len(), 6, "{g:#?}");
    }

    #[test]
    fn what_hosts_reported_is_shown_escaped() {
        let mut status = preview_status();
        // A bundle's chosen path, quoted by its host's report: a line that
        // would move the cursor up and print a clean verdict over the
        // denial above it.
        status.hosts = vec![host(
            "m1",
            &["/etc/x\u{1b}[1A\u{1b}[2K1 host(s): clean\r"],
            &["/home"],
        )];
        let shown = render(&status, &groups(&status));
        assert!(
            !shown.chars().any(|c| c.is_control() && c != '\n'),
            "{shown}"
        );
        assert!(
            shown.contains("/etc/x\\x1b[1A\\x1b[2K1 host(s): clean\\r"),
            "{shown}"
        );
        assert!(shown.contains("DENIED erofs.unlinkat /home"), "{shown}");
    }
}
