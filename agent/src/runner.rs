//! One run of one bundle: verify, refuse or run confined, report.
//!
//! This is where the host's policy meets the bundle. The order matters and
//! is the same for `rollguard-agent run` and the daemon:
//!
//! 1. kill switch in force → refuse;
//! 2. open the bundle as hostile input (manifest + signatures only);
//! 3. signatures: distinct principals ≥ the host's threshold (the stricter
//!    `delete_threshold` when the bundle deletes);
//! 4. expiry; 5. this host in `[targets]`; 6. scopes against protected
//!    paths and the host's ceiling; 7. the kernel can confine it; 8. version
//!    newer than any run here (cheap check, before unpacking), and the
//!    sandbox's stage-2 program installed and safe (`[packages]`: the
//!    checks cover the scope derived from the packages too, and the package
//!    directories the host lacks are created after them, see
//!    [`crate::packages`]);
//! 9. start the sandbox *held* (stage 2 confines itself meanwhile but
//!    executes nothing until step 11), unpack the payload (digests
//!    checked) into a private run directory;
//! 10. record the version as started (the atomic rollback check), mark the
//!     run in progress and log it, under the state lock, all three durable
//!     before step 11 (flushed together: `StateDir::begin_run`);
//! 11. release the sandbox (the audit listener, started on another thread
//!     after step 8, is running by then), wait (timeout kills the cgroup),
//!     collect denials;
//! 12. service actions (`services::after_run`): the captured requests
//!     read and decided against `[services] allow`, and after a clean
//!     success the declared and allowed ones performed (declared units
//!     were checked against the allow list with the scopes, step 6);
//! 13. log the result, then clear the in-progress marker; remove the run
//!     dir.
//!
//! Every refusal happens before step 11 and withdraws a held sandbox, so a
//! refused bundle never burns a version and never executes anything.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rollguard_shared::archive::{self, Limits};
use rollguard_shared::report::{
    BundleRef, Denial, ExpectedDenial, RefusalKind, RunReport, RunStatus,
};
use rollguard_shared::signature::{self, AllowedSigners, RawSignature};
use sha2::{Digest, Sha256};

use crate::audit_log::{AuditEvent, AuditLog};
use crate::kernel_audit::AuditListener;
use crate::policy::{HostPolicy, ProtectedNow};
use crate::sandbox::net_scope;
use crate::sandbox::spec::MIN_LANDLOCK_ABI;
use crate::sandbox::{
    HeldChild, KernelSupport, KillHandle, Launcher, RunOutcome, SandboxScope, SandboxSpec,
    Termination,
};
use crate::state::{BeginRunError, RunId, RunMarker, StateDir};

/// How long to wait after the bundle ends for its Landlock domain to be
/// deallocated (the record that carries the authoritative denial count).
const AUDIT_SETTLE: Duration = Duration::from_secs(2);
/// The Landlock ABI whose restrict_self can log denials after exec.
const LANDLOCK_LOG_EXEC_ABI: u32 = 7;
/// How much of stdout/stderr goes into the report.
const TAIL_BYTES: u64 = 4096;

/// Called with the run's kill handle as soon as the bundle is running (the
/// daemon keeps it for kill-switch orders).
pub type OnStart = Arc<dyn Fn(&str, KillHandle) + Send + Sync>;

/// Options of one run.
#[derive(Clone)]
pub struct RunOptions {
    /// The `rollguard-agent` binary; the sandbox's stage-2 program is the
    /// one installed beside it ([`Launcher::beside`]).
    pub agent_exe: PathBuf,
    /// The rollout this run belongs to (daemon runs), passed to the bundle
    /// as `ROLLGUARD_ROLLOUT`.
    pub rollout_id: Option<String>,
    pub on_start: Option<OnStart>,
    /// The stage-2 program opened and checked once (the daemon, at start);
    /// `None`: look for it beside `agent_exe` on this run.
    pub launcher: Option<Launcher>,
}

impl RunOptions {
    /// Options for the running agent binary itself.
    pub fn current() -> std::io::Result<Self> {
        Ok(RunOptions {
            agent_exe: std::env::current_exe()?,
            rollout_id: None,
            on_start: None,
            launcher: None,
        })
    }
}

/// A refusal: the kind and the sentence.
struct Refusal(RefusalKind, String);

impl Refusal {
    fn new(kind: RefusalKind, why: impl std::fmt::Display) -> Self {
        Refusal(kind, why.to_string())
    }
}

/// What we know about the bundle once its manifest parsed.
struct Known {
    bundle: BundleRef,
    manifest_sha256: String,
}

fn empty_report(host: &str, started: Instant) -> RunReport {
    RunReport {
        denials: Some(vec![]),
        denial_count: Some(0),
        duration_ms: started.elapsed().as_millis() as u64,
        ..RunReport::new(host, RunStatus::Refused)
    }
}

/// Verify `bundle_path` against `policy` and run it once, confined. Never
/// panics on bad input; every outcome is a report.
pub fn run_bundle(policy: &HostPolicy, bundle_path: &Path, opts: &RunOptions) -> RunReport {
    let started = Instant::now();
    let host = policy.identity().name;
    let state = match StateDir::open(policy.state_dir()) {
        Ok(s) => s,
        Err(e) => {
            let mut r = empty_report(&host, started);
            r.refusal = Some(RefusalKind::HostError);
            r.reason = Some(format!("state directory: {e}"));
            return r;
        }
    };
    let log = AuditLog::new(&state);
    let mut known = None;
    let result = prepare_and_run(policy, &state, &log, bundle_path, opts, &mut known, started);
    match result {
        Ok(report) => report,
        Err(Refusal(kind, reason)) => {
            tracing::warn!(bundle = %bundle_path.display(), ?kind, %reason, "bundle refused");
            let mut r = empty_report(&host, started);
            r.refusal = Some(kind);
            r.reason = Some(reason.clone());
            r.bundle = known.as_ref().map(|k: &Known| k.bundle.clone());
            let event = AuditEvent::Refused {
                bundle: r.bundle.clone(),
                manifest_sha256: known.map(|k| k.manifest_sha256),
                refusal: kind,
                reason,
            };
            if let Err(e) = log.append(event) {
                tracing::error!("cannot record the refusal in the audit log: {e}");
            }
            r
        }
    }
}

fn prepare_and_run(
    policy: &HostPolicy,
    state: &StateDir,
    log: &AuditLog,
    bundle_path: &Path,
    opts: &RunOptions,
    known: &mut Option<Known>,
    started: Instant,
) -> Result<RunReport, Refusal> {
    let host = policy.identity();
    // Runs of a dead agent first: their leftovers killed, their end logged.
    // A leftover that cannot be killed is a host error: nothing new runs
    // beside an unsupervised bundle.
    crate::recovery::recover_interrupted_runs(state, log).map_err(|e| {
        Refusal::new(
            RefusalKind::HostError,
            format!("recovering interrupted runs: {e}"),
        )
    })?;
    if let Some(order) = state
        .kill_in_force()
        .map_err(|e| Refusal::new(RefusalKind::HostError, e))?
    {
        return Err(Refusal::new(
            RefusalKind::KillSwitch,
            format!(
                "a kill-switch order is in force on this host: {}",
                order.reason
            ),
        ));
    }

    let opened = archive::open_file(bundle_path, &Limits::default()).map_err(|e| {
        Refusal::new(
            RefusalKind::BadBundle,
            format!("{}: {e}", bundle_path.display()),
        )
    })?;
    let manifest = opened.manifest.clone();
    // What the run may change: the author's scope and the one derived from
    // the packages (merged-/usr aliases resolved for this host). Every check
    // below and the sandbox use the union.
    let packages = manifest
        .packages
        .as_ref()
        .map(crate::packages::on_this_host);
    let scope = match &packages {
        Some(p) => manifest.scope.with_packages(p),
        None => manifest.scope.clone(),
    };
    let manifest_sha256 = hex::encode(Sha256::digest(&opened.manifest_bytes));
    let bundle = BundleRef {
        name: manifest.bundle.name.to_string(),
        version: manifest.bundle.version,
    };
    *known = Some(Known {
        bundle: bundle.clone(),
        manifest_sha256: manifest_sha256.clone(),
    });

    // Trust: the host's own threshold, stricter for bundles that delete.
    // The file is checked again on every run (the daemon loaded the policy
    // long ago, and chmod/chown are beyond Landlock): if anyone but root
    // could have edited it since, nothing it says counts.
    crate::trust_path::check(&policy.trust().allowed_signers, "trust.allowed_signers")
        .map_err(|e| Refusal::new(RefusalKind::HostError, format!("trust file: {e}")))?;
    let allowed = AllowedSigners::load(&policy.trust().allowed_signers)
        .map_err(|e| Refusal::new(RefusalKind::HostError, format!("trust file: {e}")))?;
    let threshold = policy.required_threshold(&scope);
    let signatures: Vec<RawSignature> = opened.signatures.iter().cloned().map(Into::into).collect();
    let now = jiff::Timestamp::now();
    let verified = signature::verify_threshold(
        &opened.manifest_bytes,
        &signatures,
        &allowed,
        now,
        threshold,
    )
    .map_err(|e| Refusal::new(RefusalKind::Signatures, e))?;

    if manifest.is_expired(now) {
        return Err(Refusal::new(
            RefusalKind::Expired,
            format!("bundle expired at {}", manifest.bundle.expires),
        ));
    }
    manifest
        .targets
        .check(&host)
        .map_err(|e| Refusal::new(RefusalKind::NotTarget, e))?;
    // The protected paths resolved once for the checks (the sandbox's list
    // below resolves them again, just before the run).
    let protected = policy.protected_now();
    let pins = protected
        .check_scope(&scope)
        .map_err(|e| Refusal::new(e.refusal_kind(), e))?;
    // Missing drop-in directories of the agent's unit are created just
    // before the sandbox starts (below), not now: nothing is written
    // before every check has passed.
    check_pins(&scope, &pins, true)?;
    check_mount_aliases(&protected, &scope)?;
    // Declared service actions: each unit allowed by the host, or refused.
    crate::services::after_run::check_declared(&manifest.services, policy.services())
        .map_err(|e| Refusal::new(RefusalKind::ScopeCeiling, e))?;
    // Resource limits: the host's, or the bundle's request within the
    // host's ceiling (beyond it, refused like a scope beyond the ceiling).
    let limits = policy
        .resources()
        .for_run(&manifest.run.resources)
        .map_err(|e| Refusal::new(RefusalKind::ScopeCeiling, format!("run.resources: {e}")))?;
    let kernel = KernelSupport::probe();
    kernel
        .require(!manifest.scope.network.is_empty())
        .map_err(|e| Refusal::new(RefusalKind::KernelUnsupported, e))?;
    let last = state
        .last_version(&manifest.bundle.name)
        .map_err(|e| Refusal::new(RefusalKind::HostError, e))?;
    rollguard_shared::version::check_newer(bundle.name.as_str(), last, bundle.version)
        .map_err(|e| Refusal::new(RefusalKind::Rollback, e))?;
    // Names in the network scope are resolved now, once: the kernel then
    // enforces the addresses they had at the start of the run, and the
    // report shows them. A name that does not resolve refuses the run.
    let network = net_scope::resolve(&manifest.scope.network, net_scope::system_lookup)
        .map_err(|e| Refusal::new(RefusalKind::HostError, e))?;
    // The host's ceiling applies to what the names resolved to.
    policy
        .check_network(&network.by_entry)
        .map_err(|e| Refusal::new(e.refusal_kind(), e))?;
    // The stage-2 program, found (and checked) before anything is written:
    // without it nothing can be confined, and the version must not be used
    // up by a run that cannot start.
    let launcher = match &opts.launcher {
        Some(l) => l.clone(),
        None => Launcher::beside(&opts.agent_exe)
            .map_err(|e| Refusal::new(RefusalKind::HostError, e))?,
    };

    // Every check that needs no disk write has passed: start listening for
    // the run's audit records now, on another thread. Its kernel round trips
    // (each status request spawns a kernel thread) then overlap with the
    // unpacking and the durable state writes below instead of adding to
    // them. It is joined before the sandbox is released, so no record of the
    // run can be missed.
    let audit = StartingListener::spawn();

    // A private run directory: the payload, the plan, the bundle's output.
    let run_id = RunId::generate().map_err(|e| Refusal::new(RefusalKind::HostError, e))?;
    let run_dir = state
        .create_run_dir(&run_id)
        .map_err(|e| Refusal::new(RefusalKind::HostError, e))?;
    let cleanup = |state: &StateDir| {
        if let Err(e) = state.remove_run_dir(&run_id) {
            tracing::warn!(run_id = %run_id, "cannot remove the run directory: {e}");
        }
    };
    let payload_dir = run_dir.join("payload");
    if let Err(e) = std::fs::create_dir(&payload_dir) {
        cleanup(state);
        return Err(Refusal::new(
            RefusalKind::HostError,
            format!("{}: {e}", payload_dir.display()),
        ));
    }

    let env = [
        ("ROLLGUARD_BUNDLE", bundle.name.clone()),
        ("ROLLGUARD_BUNDLE_VERSION", bundle.version.to_string()),
        ("ROLLGUARD_HOST", host.name.clone()),
        ("ROLLGUARD_RUN_ID", run_id.to_string()),
    ]
    .into_iter()
    .chain(opts.rollout_id.clone().map(|r| ("ROLLGUARD_ROLLOUT", r)))
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    // Resolved again: name resolution above may have taken seconds, and a
    // protected symlink re-pointed meanwhile must count from this run. The
    // pins come from the same resolution as the sandbox's protected list,
    // so a path that became protected inside a scope is pinned (or the
    // run refused) too.
    let now = policy.protected_now();
    let pins = match now.check_scope(&scope) {
        Ok(pins) => pins,
        Err(e) => {
            cleanup(state);
            return Err(Refusal::new(e.refusal_kind(), e));
        }
    };
    let placeholders = match check_pins(&scope, &pins, true) {
        Ok(p) => p,
        Err(e) => {
            cleanup(state);
            return Err(e);
        }
    };
    let pins_now = pins;
    let pins: Vec<PathBuf> = pins_now
        .paths
        .iter()
        .map(|p| p.as_path().to_path_buf())
        .collect();
    let spec = SandboxSpec {
        run_id: run_id.to_string(),
        payload_dir: payload_dir.clone(),
        run_dir: run_dir.clone(),
        command: match &packages {
            Some(p) => crate::packages::sandbox_command(p, &manifest.run.command),
            None => manifest.run.command.clone(),
        },
        env,
        scope: SandboxScope::new(&scope, network.rules),
        protected: now
            .canonical()
            .iter()
            .map(|p| p.as_path().to_path_buf())
            .collect(),
        pins,
        landlock_min_abi: MIN_LANDLOCK_ABI,
        limits,
    };

    // Missing package directories are created now, as the sandbox's rules
    // attach to existing directories (see `packages`). The only write
    // outside the agent's own state before the run; a refusal below leaves
    // them, empty.
    if let Some(p) = &packages {
        if let Err(e) = crate::packages::prepare(p) {
            cleanup(state);
            return Err(Refusal::new(
                RefusalKind::HostError,
                format!("[packages]: {e}"),
            ));
        }
    }
    // Then the missing drop-in directories of the agent's unit directly in
    // a scope: empty directories (they configure nothing), pinned like
    // existing ones; the pins are then planned again without placeholders,
    // as stage 2 will, and must all be mountable (see
    // `sandbox::pins::create_placeholder`). Left behind after the run.
    if !placeholders.is_empty() {
        if let Err(e) = create_placeholders(&run_id, &placeholders)
            .and_then(|()| check_pins(&scope, &pins_now, false).map(|_| ()))
        {
            cleanup(state);
            return Err(e);
        }
    }

    // Stage 2 starts now, held: it confines itself (about 2 ms of CPU) on
    // the other core while the payload is unpacked and the start is made
    // durable below, and executes nothing until it is released after that.
    // A refusal from here on withdraws it (nothing of the bundle ran).
    let held = launcher.spawn_held(&spec).map_err(|e| {
        cleanup(state);
        Refusal::new(
            RefusalKind::HostError,
            format!("could not start the sandbox: {e}"),
        )
    })?;
    let refuse = |held: HeldChild, refusal: Refusal| {
        if let Err(e) = held.withdraw() {
            tracing::error!(run_id = %run_id, "withdrawing the held sandbox: {e}");
        }
        cleanup(state);
        refusal
    };

    // Unpack into the private run directory; digests are checked on the
    // way. The held stage 2's Landlock rule for the payload directory
    // covers what is unpacked into it afterwards.
    if let Err(e) = opened.unpack_payload(&payload_dir) {
        return Err(refuse(
            held,
            Refusal::new(RefusalKind::BadBundle, format!("payload: {e}")),
        ));
    }

    // The package database before the run: versions, files owned.
    let packages_before = packages.as_ref().map(crate::packages::Snapshot::take);

    // Point of no return: durable before acted upon. The version (the
    // atomic rollback check), the in-progress marker and the audit log entry
    // are flushed together (see `StateDir::begin_run`).
    let marker = match RunMarker::new(run_id.clone(), bundle.clone(), manifest_sha256.clone()) {
        Ok(m) => m,
        Err(e) => return Err(refuse(held, Refusal::new(RefusalKind::HostError, e))),
    };
    let started_event = AuditEvent::RunStarted {
        run_id: run_id.to_string(),
        bundle: bundle.clone(),
        manifest_sha256: manifest_sha256.clone(),
        signers: verified.principals.clone(),
        scope: (&scope).into(),
    };
    let begun = state.begin_run(&manifest.bundle.name, &marker, |lock| {
        log.append_locked(lock, started_event).map(drop)
    });
    match begun {
        Ok(()) => {}
        Err(BeginRunError::Record(e)) => {
            return Err(refuse(held, Refusal::new(e.refusal_kind(), e)));
        }
        // No unlogged runs: an audit log we cannot write is a host error.
        Err(BeginRunError::Alongside(e)) => {
            return Err(refuse(
                held,
                Refusal::new(RefusalKind::HostError, format!("audit log: {e}")),
            ));
        }
    }

    let mut report = empty_report(&host.name, started);
    report.bundle = Some(bundle.clone());
    report.signers = verified.principals;
    report.run_id = Some(run_id.to_string());
    report.network = network.grants;

    execute(
        held,
        &spec.run_id,
        opts,
        manifest.run.timeout,
        &kernel,
        audit,
        packages.as_ref(),
        &mut report,
    );
    // Files the packages replaced or removed: the stale-services scan's
    // input (restart_stale, and `stale_services` in the report).
    let replaced = match (&packages, packages_before) {
        (Some(p), Some(before)) => crate::packages::after_run(p, before, &mut report),
        _ => Default::default(),
    };
    crate::services::after_run::after_run(
        &manifest.services,
        policy.services(),
        &run_dir,
        &replaced,
        &mut report,
    );
    report.duration_ms = started.elapsed().as_millis() as u64;

    // The scratch directory goes on another thread: removing it is not
    // state (see `StateDir::remove_run_dir`) and on a journaling file
    // system it can wait for the flushes below.
    std::thread::scope(|scope| {
        scope.spawn(|| cleanup(state));
        // The result first, then the marker: a crash in between leaves a
        // marker, and recovery records the run as interrupted.
        match log.append(AuditEvent::run_finished(
            &report,
            run_id.as_str(),
            bundle,
            &manifest_sha256,
        )) {
            Ok(_) => {
                if let Err(e) = state.clear_logged_in_progress(&run_id) {
                    tracing::error!(run_id = %run_id, "cannot clear the in-progress marker: {e}");
                }
            }
            // Keeping the marker keeps the run from being lost: recovery
            // records it as interrupted.
            Err(e) => tracing::error!(
                run_id = %run_id,
                "cannot record the result in the audit log (the in-progress marker stays): {e}"
            ),
        }
    });
    Ok(report)
}

/// Launch the sandbox, wait, and fill in status, exit code, denials and
/// output tails. `packages`: the bundle's, whose expected denials are
/// moved aside.
#[allow(clippy::too_many_arguments)]
fn execute(
    held: HeldChild,
    run_id: &str,
    opts: &RunOptions,
    timeout: Duration,
    kernel: &KernelSupport,
    audit: StartingListener,
    packages: Option<&rollguard_shared::manifest::Packages>,
    report: &mut RunReport,
) {
    // Listening before the release: stage 2 does nothing Landlock or
    // seccomp could deny before it executes the bundle, so no record of
    // this run can be missed.
    let audit = audit.join().map_err(|e| {
        tracing::warn!("denials cannot be observed on this host: {e}");
        e
    });
    let child = match held.release() {
        Ok(c) => c,
        Err(e) => {
            report.status = RunStatus::Failed;
            report.reason = Some(format!("could not start the sandbox: {e}"));
            return;
        }
    };
    if let Some(on_start) = &opts.on_start {
        on_start(run_id, child.kill_handle());
    }
    // The run's audit rules stay until its denials are collected (the
    // end of this function): the kernel answers no audit request while it
    // removes a rule.
    let (outcome, _exit_rules) = match child.wait_keeping_exit_rules(timeout) {
        Ok(o) => o,
        Err(e) => {
            report.status = RunStatus::Failed;
            report.reason = Some(format!("lost track of the run: {e}"));
            return;
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
    add_filter_denials(&outcome, report);
}

/// Add what the run cgroup's BPF programs refused (network destinations,
/// devices) to the kernel audit's denials. If their record could not be
/// read, the run's denials are unknown.
fn add_filter_denials(outcome: &RunOutcome, report: &mut RunReport) {
    let Some(filtered) = &outcome.filter_denials else {
        tracing::warn!(run_id = %outcome.run_id, "the run cgroup's BPF denial record could not be read; denials are unknown");
        report.denials = None;
        report.denial_count = None;
        return;
    };
    for d in &filtered.records {
        tracing::warn!(run_id = %outcome.run_id, access = %d.access, object = %d.object, "denied by the run cgroup's BPF program");
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

/// Every pin must be one stage 2 can mount: a protected path that does not
/// exist directly in a scope (`/etc/ld.so.preload` in a scope `/etc`) could
/// be created by the bundle, so the run is refused (see
/// [`crate::sandbox::pins::plan`]; stage 2 plans again before mounting).
/// With `placeholders`, a missing drop-in directory of the agent's unit
/// directly in a scope is returned instead, to be created empty before the
/// run ([`crate::policy::Pins::drop_in_dirs`]).
fn check_pins(
    scope: &rollguard_shared::manifest::Scope,
    pins: &crate::policy::Pins,
    placeholders: bool,
) -> Result<Vec<crate::sandbox::pins::Placeholder>, Refusal> {
    if pins.paths.is_empty() {
        return Ok(Vec::new());
    }
    let paths = |l: &[rollguard_shared::ScopePath]| -> Vec<PathBuf> {
        l.iter().map(|p| p.as_path().to_path_buf()).collect()
    };
    let scopes: Vec<PathBuf> = paths(&scope.write)
        .into_iter()
        .chain(paths(&scope.delete))
        .collect();
    let may_create = if placeholders {
        paths(&pins.drop_in_dirs)
    } else {
        Vec::new()
    };
    crate::sandbox::pins::plan_with_placeholders(&scopes, &paths(&pins.paths), &may_create)
        .map(|(_, created)| created)
        .map_err(|e| Refusal::new(RefusalKind::ProtectedPath, e))
}

/// Create the placeholders [`check_pins`] returned, each logged.
fn create_placeholders(
    run_id: &RunId,
    placeholders: &[crate::sandbox::pins::Placeholder],
) -> Result<(), Refusal> {
    for p in placeholders {
        let created = crate::sandbox::pins::create_placeholder(p)
            .map_err(|e| Refusal::new(RefusalKind::HostError, format!("placeholder: {e}")))?;
        if created {
            tracing::info!(
                run_id = %run_id,
                path = %p.path.display(),
                "created an empty directory (root:root 0755) for a missing drop-in directory of the agent's unit inside a write scope, pinned read-only for the run and left in place"
            );
        }
    }
    Ok(())
}

/// A write or delete scope must not hold another mount of protected data
/// (a backup volume bind-mounted beneath a spool directory): the path
/// checks above cannot see it, and deleting beneath the scope would delete
/// the protected data. Read from the agent's own mount table, which the
/// sandbox's namespace copies (stage 2 checks its copy again).
fn check_mount_aliases(
    protected: &ProtectedNow<'_>,
    scope: &rollguard_shared::manifest::Scope,
) -> Result<(), Refusal> {
    use crate::sandbox::mountinfo;
    let mounts = mountinfo::read_self().map_err(|e| Refusal::new(RefusalKind::HostError, e))?;
    // Write-protected paths too: a bind of /etc inside a write scope would
    // reach /etc/ld.so.preload or the agent's unit.
    let protected: Vec<PathBuf> = protected
        .write_protected()
        .iter()
        .map(|p| p.as_path().to_path_buf())
        .collect();
    let scopes = scope
        .write
        .iter()
        .map(|p| ("write", p.as_path()))
        .chain(scope.delete.iter().map(|p| ("delete", p.as_path())));
    mountinfo::check_scopes(&mounts, &protected, scopes)
        .map_err(|e| Refusal::new(RefusalKind::ProtectedPath, e))
}

/// An [`AuditListener`] being started on its own thread.
enum StartingListener {
    Thread(std::thread::JoinHandle<Result<AuditListener, String>>),
    /// The thread could not be spawned: start inline at `join`.
    Inline,
}

impl StartingListener {
    fn spawn() -> Self {
        std::thread::Builder::new()
            .name("audit-start".into())
            .spawn(|| AuditListener::start().map_err(|e| e.to_string()))
            .map_or(StartingListener::Inline, StartingListener::Thread)
    }

    fn join(self) -> Result<AuditListener, String> {
        match self {
            StartingListener::Thread(handle) => handle
                .join()
                .unwrap_or_else(|_| Err("the audit listener start panicked".into())),
            StartingListener::Inline => AuditListener::start().map_err(|e| e.to_string()),
        }
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
