//! Stage 3 of a run: release the held sandbox, wait for it, and read what
//! happened into the report: status, exit code, output tails, limits hit,
//! and the denials (the kernel audit's and the run cgroup's BPF programs').

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rollguard_shared::report::{Denial, ExpectedDenial, Preview, RunReport, RunStatus};

use super::admit::Admission;
use super::prepare::{Prepared, StartingListener};
use super::RunOptions;
use crate::sandbox::{HeldChild, RunOutcome, Termination};
use crate::state::RunId;

/// How long to wait after the bundle ends for its Landlock domain to be
/// deallocated (the record that carries the authoritative denial count).
const AUDIT_SETTLE: Duration = Duration::from_secs(2);
/// The Landlock ABI whose restrict_self can log denials after exec.
const LANDLOCK_LOG_EXEC_ABI: u32 = 7;
/// How much of stdout/stderr goes into the report.
const TAIL_BYTES: u64 = 4096;

/// A run that has ended, with its report so far.
pub(super) struct Executed {
    pub admission: Admission,
    pub run_id: RunId,
    pub packages_before: Option<crate::packages::Snapshot>,
    /// A preview with `[packages]`: the database as the preview left it,
    /// read from its layers before they went.
    pub packages_after_preview: Option<crate::packages::PreviewAfter>,
    /// The run's service-request directory, handed over by stage 2.
    pub service_requests: Option<Arc<OwnedFd>>,
    /// The run's audit rules being removed; joined when dropped.
    pub rules_removal: RulesRemoval,
    pub report: RunReport,
}

/// The run's audit rules (see [`crate::sandbox::ExitRules`]) being removed
/// on a thread of their own, once the denials are collected: the removal
/// forks a detached process and waits for the middle one, a millisecond
/// on an idle machine, several when both cores are busy, and nothing after
/// the collection depends on it. Dropping this joins the thread, so a
/// one-shot run cannot exit before the removal is handed over (a rule left
/// behind would slow every system call on the host until a sweep). The
/// caller keeps it until just before the run's in-progress marker goes
/// (`finish`), so recovery still covers an agent killed before the
/// hand-over.
#[must_use = "dropping it waits for the removal"]
pub(super) struct RulesRemoval(Option<std::thread::JoinHandle<()>>);

impl RulesRemoval {
    fn none() -> RulesRemoval {
        RulesRemoval(None)
    }

    fn start(rules: crate::sandbox::ExitRules) -> RulesRemoval {
        // When no thread can be had, the closure is dropped unrun, and
        // with it the rules: removed here and now, as before.
        let thread = std::thread::Builder::new()
            .name("audit-rules".into())
            .spawn(move || drop(rules));
        RulesRemoval(thread.ok())
    }
}

impl Drop for RulesRemoval {
    fn drop(&mut self) {
        if let Some(thread) = self.0.take() {
            // `ExitRules`' drop logs its errors and does not panic.
            let _ = thread.join();
        }
    }
}

/// Release the prepared run and wait for it.
pub(super) fn execute(prepared: Prepared, opts: &RunOptions) -> Executed {
    let Prepared {
        admission,
        held,
        audit,
        run_id,
        packages_before,
        mut report,
    } = prepared;
    if opts.preview {
        // Unknown until read from the layers (`complete` false).
        report.preview = Some(Preview::default());
    }
    let (service_requests, packages_after_preview, rules_removal) =
        release_and_wait(held, audit, run_id.as_str(), &admission, opts, &mut report);
    Executed {
        admission,
        run_id,
        packages_before,
        packages_after_preview,
        service_requests,
        rules_removal,
        report,
    }
}

/// Release the sandbox, wait, and fill in status, exit code, denials and
/// output tails. The packages' expected denials are moved aside. Returns
/// the run's service-request directory, if stage 2 handed it over, and a
/// `[packages]` preview's database as it left it.
fn release_and_wait(
    held: HeldChild,
    audit: StartingListener,
    run_id: &str,
    admission: &Admission,
    opts: &RunOptions,
    report: &mut RunReport,
) -> (
    Option<Arc<OwnedFd>>,
    Option<crate::packages::PreviewAfter>,
    RulesRemoval,
) {
    let timeout = admission.manifest.run.timeout;
    let kernel = &admission.kernel;
    let packages = admission.packages.as_ref();
    // Listening before the release: stage 2 does nothing Landlock or
    // seccomp could deny before it executes the bundle, so no record of
    // this run can be missed.
    let audit = audit.join().map_err(|e| {
        tracing::warn!("denials cannot be observed on this host: {e}");
        e
    });
    // The kill switch is attached before the release: a kill that came
    // while the run was admitted and prepared (remembered by the daemon's
    // signal) kills the held stage 2 here, before the bundle executes,
    // and one that comes from now on is the cgroup's `cgroup.kill`.
    if let Some(on_start) = &opts.on_start {
        on_start(run_id, held.kill_handle());
    }
    let child = match held.release() {
        Ok(c) => c,
        Err(e) => {
            report.status = RunStatus::Failed;
            report.reason = Some(format!("could not start the sandbox: {e}"));
            return (None, None, RulesRemoval::none());
        }
    };
    // The run's audit rules stay until its denials are collected (the
    // end of this function): the kernel answers no audit request while it
    // removes a rule.
    let (outcome, exit_rules) = match child.wait_keeping_exit_rules(timeout) {
        Ok(o) => o,
        Err(e) => {
            report.status = RunStatus::Failed;
            report.reason = Some(format!("lost track of the run: {e}"));
            // The bundle was released and its denials are not collected:
            // unknown, never zero (and so never retried).
            report.denials = None;
            report.denial_count = None;
            return (None, None, RulesRemoval::none());
        }
    };
    report.leftover_processes = outcome.leftover_processes as u32;
    report.stdout_tail = tail(&outcome.stdout);
    report.stderr_tail = tail(&outcome.stderr);
    report.limits_hit = outcome
        .limits_hit
        .iter()
        .map(|l| l.as_str().to_string())
        .collect();
    report.stdout_dropped_bytes = outcome.stdout_dropped.unwrap_or(0);
    report.stderr_dropped_bytes = outcome.stderr_dropped.unwrap_or(0);
    let (status, exit_code, reason) = match &outcome.termination {
        Termination::Exited { code: 0 } => (RunStatus::Succeeded, Some(0), None),
        Termination::Exited { code } => (
            RunStatus::Failed,
            Some(*code),
            Some(format!("exited with status {code}")),
        ),
        Termination::Signaled { signal } => (
            RunStatus::Failed,
            None,
            Some(format!("killed by signal {signal}")),
        ),
        Termination::TimedOut => (
            RunStatus::TimedOut,
            None,
            Some(format!(
                "timed out after {}",
                humantime::format_duration(timeout)
            )),
        ),
        Termination::Killed => (
            RunStatus::Killed,
            None,
            Some("killed by a kill-switch order".to_string()),
        ),
        Termination::SetupFailed { step, error } => (
            RunStatus::Failed,
            None,
            Some(format!(
                "sandbox setup failed at {step}: {error}; nothing was executed"
            )),
        ),
        Termination::ExecFailed { error } => (
            RunStatus::Failed,
            None,
            Some(format!("could not execute the command: {error}")),
        ),
    };
    report.status = status;
    report.exit_code = exit_code;
    report.reason = reason;
    // A resource limit hit fails the run (the controller counts it as a
    // failure and, through `is_alert`, halts): what it did is incomplete.
    if !report.limits_hit.is_empty() {
        if report.status == RunStatus::Succeeded {
            report.status = RunStatus::Failed;
        }
        let note = format!("resource limit hit: {}", report.limits_hit.join(", "));
        report.reason = Some(match report.reason.take() {
            Some(r) => format!("{r}; {note}"),
            None => note,
        });
    }
    if outcome.leftover_processes > 0 {
        let note = format!(
            "{} process(es) left behind were killed",
            outcome.leftover_processes
        );
        report.reason = Some(match report.reason.take() {
            Some(r) => format!("{r}; {note}"),
            None => note,
        });
    }
    // Without Landlock's log-after-exec flag (ABI 7), denials by the bundle
    // are never audited, so "none seen" would be a false zero. Likewise
    // when the kernel does not log seccomp's errno results (checked before
    // the run and again after it, since an administrator can change it at
    // any time): a refused syscall would leave no record.
    let landlock_logs_exec = kernel
        .landlock_abi
        .is_some_and(|abi| abi >= LANDLOCK_LOG_EXEC_ABI);
    let seccomp_logs_errno =
        kernel.seccomp_errno_logged && crate::sandbox::kernel::seccomp_errno_logged();
    if !seccomp_logs_errno {
        tracing::warn!(
            "seccomp does not log errno actions (/proc/sys/kernel/seccomp/actions_logged): \
             refused syscalls leave no record, so this run's denials are unknown"
        );
    }
    match audit
        .ok()
        .filter(|_| landlock_logs_exec && seccomp_logs_errno)
        .ok_or(())
    {
        Ok(listener) => {
            let mut denials =
                listener.collect_for_run(outcome.pid, outcome.audit_session, AUDIT_SETTLE);
            // Writes refused by the read-only mounts are seen only through
            // the run's audit rules; the bundle ran without them.
            if outcome.confinement.as_ref().is_some_and(|c| !c.exit_audit) {
                denials.gaps.push(
                    "the audit rules reporting writes refused by read-only mounts could not be added"
                        .into(),
                );
            }
            if !denials.is_complete() {
                tracing::warn!(gaps = ?denials.gaps, "denial records may be incomplete");
            }
            // The package manager's known harmless refusals, moved aside
            // with their reason (see `packages::expected`), still reported.
            if let Some(p) = packages {
                report.expected_denials = denials
                    .take_expected(|d| crate::packages::expected::explain(p, d))
                    .into_iter()
                    .map(|(d, reason)| ExpectedDenial {
                        reason: reason.to_string(),
                        denial: d.denial,
                        records: d.records,
                    })
                    .collect();
            }
            let (list, count) = denials.report_fields();
            report.denials = list;
            report.denial_count = count;
        }
        Err(_) => {
            report.denials = None;
            report.denial_count = None;
        }
    }
    add_filter_denials(outcome.filter_denials.as_ref(), &outcome.run_id, report);
    // Collected: the rules go now, not after a preview's walk of its
    // layers, which may take a while on a large change set.
    let rules_removal = RulesRemoval::start(exit_rules);
    let packages_after = if opts.preview {
        read_preview(&outcome, report);
        match (packages, &outcome.preview_layers) {
            (Some(p), Some(layers)) => Some(crate::packages::PreviewAfter::read(p, layers)),
            _ => None,
        }
    } else {
        None
    };
    (outcome.service_requests, packages_after, rules_removal)
}

/// A preview's changes, read from its layers into the report. Without
/// them the run fails: what it would change is unknown, never "nothing".
fn read_preview(outcome: &RunOutcome, report: &mut RunReport) {
    let started = !matches!(outcome.termination, Termination::SetupFailed { .. });
    let mut full = false;
    let read = match &outcome.preview_layers {
        Some(root) => {
            full = crate::preview::is_full(root);
            if full {
                // The run's writes hit the layers' bound (the host's tmp
                // limit): what is listed is only part of it.
                report.limits_hit.push("preview".to_string());
                fail(
                    report,
                    "resource limit hit: preview (the preview layers are full; the run's writes were cut short)",
                );
            }
            crate::preview::read_changes(root).map_err(|e| e.to_string())
        }
        None if !started => return,
        None => Err("the sandbox did not hand over its preview layers".to_string()),
    };
    match read {
        Ok(preview) => {
            report.preview = Some(Preview {
                complete: !full,
                ..preview
            })
        }
        Err(e) => fail(
            report,
            &format!("cannot read what the preview changed: {e}; its changes are unknown"),
        ),
    }
}

/// The run fails (a succeeded run becomes failed), with `why` added to
/// its reason.
fn fail(report: &mut RunReport, why: &str) {
    if report.status == RunStatus::Succeeded {
        report.status = RunStatus::Failed;
    }
    report.reason = Some(match report.reason.take() {
        Some(r) => format!("{r}; {why}"),
        None => why.to_string(),
    });
}

/// Add what the run cgroup's BPF programs refused (network destinations,
/// devices) to the kernel audit's denials. If their record could not be
/// read, the run's denials are unknown.
fn add_filter_denials(
    filtered: Option<&crate::sandbox::cgroup_filters::FilterDenials>,
    run_id: &str,
    report: &mut RunReport,
) {
    let Some(filtered) = filtered else {
        tracing::warn!(run_id = %run_id, "the run cgroup's BPF denial record could not be read; denials are unknown");
        report.denials = None;
        report.denial_count = None;
        return;
    };
    for d in &filtered.records {
        tracing::warn!(run_id = %run_id, access = %d.access, object = %d.object, "denied by the run cgroup's BPF program");
    }
    // Where the kernel's audit could not be used, the other denials are
    // unknown, but these are known: the run had a denial, so it fails
    // (and no service action follows it), with them named in the reason.
    if report.denials.is_none() && filtered.count > 0 {
        let named: Vec<String> = filtered
            .records
            .iter()
            .take(8)
            .map(|d| format!("{} {}", d.access, d.object))
            .collect();
        fail(
            report,
            &format!(
                "denied by the run cgroup's BPF program ({} in all, other denials unknown): {}",
                filtered.count,
                named.join(", ")
            ),
        );
    }
    if let Some(list) = report.denials.as_mut() {
        list.extend(filtered.records.iter().map(|d| Denial {
            access: d.access.clone(),
            path: Some(d.object.clone()),
            exe: None,
        }));
    }
    if let Some(count) = report.denial_count.as_mut() {
        *count += filtered.count;
    }
}

/// The last [`TAIL_BYTES`] of a file, lossily decoded.
fn tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)));
    let mut buf = Vec::new();
    let _ = f.take(TAIL_BYTES).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::cgroup_filters::{FilterDenial, FilterDenials};

    fn one_refused_connect() -> FilterDenials {
        FilterDenials {
            count: 1,
            records: vec![FilterDenial {
                access: "net.connect_tcp".into(),
                object: "10.0.0.9:25".into(),
            }],
        }
    }

    #[test]
    fn filter_denials_join_known_ones() {
        let mut report = RunReport::new("h", RunStatus::Succeeded);
        report.denials = Some(vec![]);
        report.denial_count = Some(0);
        add_filter_denials(Some(&one_refused_connect()), "r", &mut report);
        assert_eq!(report.denial_count, Some(1));
        assert_eq!(report.denials.as_ref().unwrap().len(), 1);
    }

    /// Without the kernel's audit the other denials are unknown, but a
    /// refusal of the cgroup's programs is known: the run fails on it (so
    /// no service action follows), and the reason names it.
    #[test]
    fn a_known_filter_denial_fails_a_run_whose_other_denials_are_unknown() {
        let mut report = RunReport::new("h", RunStatus::Succeeded);
        add_filter_denials(Some(&one_refused_connect()), "r", &mut report);
        assert_eq!(report.status, RunStatus::Failed);
        assert_eq!(report.denials, None, "the rest stays unknown");
        let reason = report.reason.unwrap();
        assert!(reason.contains("net.connect_tcp 10.0.0.9:25"), "{reason}");
        // None refused: nothing changes.
        let mut report = RunReport::new("h", RunStatus::Succeeded);
        add_filter_denials(
            Some(&FilterDenials {
                count: 0,
                records: vec![],
            }),
            "r",
            &mut report,
        );
        assert_eq!(report.status, RunStatus::Succeeded);
    }
}
