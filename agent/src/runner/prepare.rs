//! Stage 2 of a run: everything up to the point of no return. The sandbox
//! is started held and the payload unpacked; the run's start is then made
//! durable. A refusal here withdraws the held sandbox and removes the run
//! directory: nothing of the bundle ran and no version was used up.

use std::time::Instant;

use rollguard_shared::archive::OpenedBundle;
use rollguard_shared::report::{RefusalKind, RunReport};

use super::admit::{check_pins, Admission, Resolution};
use super::{empty_report, remove_run_dir, Refusal, RunOptions};
use crate::kernel_audit::AuditListener;
use crate::policy::HostPolicy;
use crate::run_log::{RunLog, RunLogEvent};
use crate::sandbox::spec::MIN_LANDLOCK_ABI;
use crate::sandbox::{HeldChild, SandboxScope, SandboxSpec};
use crate::state::{BeginRunError, RunId, RunMarker, StateDir};

/// A run whose start is durable, its sandbox confined and held.
pub(super) struct Prepared {
    pub admission: Admission,
    pub held: HeldChild,
    pub audit: StartingListener,
    pub run_id: RunId,
    /// The package database before the run (`[packages]` only).
    pub packages_before: Option<crate::packages::Snapshot>,
    /// The report so far: bundle, signers, run id, network grants.
    pub report: RunReport,
}

pub(super) fn prepare(
    policy: &HostPolicy,
    state: &StateDir,
    log: &RunLog,
    (opened, admission, resolution): (OpenedBundle<'static>, Admission, Resolution<'_>),
    opts: &RunOptions,
    started: Instant,
) -> Result<Prepared, Refusal> {
    let host = policy.identity();
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
    let cleanup = |refusal: Refusal| {
        remove_run_dir(state, &run_id);
        refusal
    };
    let payload_dir = run_dir.join("payload");
    std::fs::create_dir(&payload_dir).map_err(|e| {
        cleanup(Refusal::new(
            RefusalKind::HostError,
            format!("{}: {e}", payload_dir.display()),
        ))
    })?;

    let bundle = &admission.bundle;
    let env = [
        ("ROLLGUARD_BUNDLE", bundle.name.clone()),
        ("ROLLGUARD_BUNDLE_VERSION", bundle.version.to_string()),
        ("ROLLGUARD_HOST", host.name.clone()),
        ("ROLLGUARD_RUN_ID", run_id.to_string()),
    ]
    .into_iter()
    .chain(opts.rollout_id.clone().map(|r| ("ROLLGUARD_ROLLOUT", r)))
    .map(|(k, v)| (k.to_string(), v))
    .chain(
        admission
            .packages
            .iter()
            .flat_map(|_| crate::sandbox::spec::FIXED_ENV)
            .map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .collect();
    // The protected paths as the checks resolved them (after the network
    // names, the one slow step of `admit`); the pins come from the same
    // resolution as the sandbox's protected list.
    let scope = &admission.scope;
    let Resolution {
        protected: now,
        pins,
        placeholders,
    } = resolution;
    let spec = SandboxSpec {
        run_id: run_id.to_string(),
        payload_dir: payload_dir.clone(),
        run_dir: run_dir.clone(),
        command: match &admission.packages {
            Some(p) => crate::packages::sandbox_command(p, &admission.manifest.run.command),
            None => admission.manifest.run.command.clone(),
        },
        env,
        scope: SandboxScope::new(scope, admission.network.rules.clone()),
        protected: now
            .canonical()
            .iter()
            .map(|p| p.as_path().to_path_buf())
            .collect(),
        pins: pins
            .paths
            .iter()
            .map(|p| p.as_path().to_path_buf())
            .collect(),
        landlock_min_abi: MIN_LANDLOCK_ABI,
        limits: admission.limits,
        preview: opts.preview,
        list_every_directory: admission
            .packages
            .as_ref()
            .is_some_and(crate::packages::needs_directory_listings),
    };

    // Missing package directories are created now, as the sandbox's rules
    // attach to existing directories (see `packages`). The only write
    // outside the agent's own state before the run; a refusal below leaves
    // them, empty.
    // A preview changes nothing on the host, so it cannot create them:
    // refused, nothing run.
    if let Some(p) = admission.packages.as_ref().filter(|_| opts.preview) {
        crate::packages::check_host(p).map_err(|e| {
            cleanup(Refusal::new(
                RefusalKind::HostError,
                format!("[packages]: {e}"),
            ))
        })?;
        let missing = crate::packages::missing(p);
        if !missing.is_empty() {
            let paths: Vec<String> = missing.iter().map(|p| p.display().to_string()).collect();
            return Err(cleanup(Refusal::new(
                RefusalKind::HostError,
                format!(
                    "a preview cannot create what the packages' derived scope names and this host lacks ({}): a real run creates it (root:root 0755); nothing was run",
                    paths.join(", ")
                ),
            )));
        }
    } else if let Some(p) = &admission.packages {
        crate::packages::prepare(p).map_err(|e| {
            cleanup(Refusal::new(
                RefusalKind::HostError,
                format!("[packages]: {e}"),
            ))
        })?;
    }
    // Then the missing drop-in directories of the agent's unit directly in
    // a scope: empty directories (they configure nothing), pinned like
    // existing ones; the pins are then planned again without placeholders,
    // as stage 2 will, and must all be mountable (see
    // `sandbox::pins::create_placeholder`). Left behind after the run.
    // A preview changes nothing on the host, so it cannot make them:
    // refused, nothing run.
    if opts.preview && !placeholders.is_empty() {
        let paths: Vec<String> = placeholders
            .iter()
            .map(|p| p.path.display().to_string())
            .collect();
        return Err(cleanup(Refusal::new(
            RefusalKind::HostError,
            format!(
                "a preview cannot pin the agent unit's missing drop-in directories in a write scope ({}): a real run creates them empty; nothing was run",
                paths.join(", ")
            ),
        )));
    }
    if !placeholders.is_empty() {
        create_placeholders(&run_id, &placeholders)
            .and_then(|()| check_pins(scope, &pins, false).map(drop))
            .map_err(cleanup)?;
    }

    // Stage 2 starts now, held: it confines itself (about 2 ms of CPU) on
    // the other core while the payload is unpacked and the start is made
    // durable below, and executes nothing until it is released after that.
    // A refusal from here on withdraws it (nothing of the bundle ran).
    let held = admission.launcher.spawn_held(&spec).map_err(|e| {
        cleanup(Refusal::new(
            RefusalKind::HostError,
            format!("could not start the sandbox: {e}"),
        ))
    })?;
    let refuse = |held: HeldChild, refusal: Refusal| {
        if let Err(e) = held.withdraw() {
            tracing::error!(run_id = %run_id, "withdrawing the held sandbox: {e}");
        }
        cleanup(refusal)
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
    let packages_before = admission
        .packages
        .as_ref()
        .map(crate::packages::Snapshot::take);

    // Point of no return: durable before acted upon. The version (the
    // atomic rollback check), the in-progress marker and the run log entry
    // are flushed together (see `StateDir::begin_run`).
    let marker = match RunMarker::new(
        run_id.clone(),
        bundle.clone(),
        admission.manifest_sha256.clone(),
    ) {
        Ok(m) => m,
        Err(e) => return Err(refuse(held, Refusal::new(RefusalKind::HostError, e))),
    };
    let started_event = |attempt: u32| RunLogEvent::RunStarted {
        run_id: run_id.to_string(),
        bundle: bundle.clone(),
        manifest_sha256: admission.manifest_sha256.clone(),
        signers: admission.signers.clone(),
        scope: scope.into(),
        attempt: (attempt > 1).then_some(attempt),
    };
    // A preview changes nothing on the host: no version used up, no
    // marker (a preview cut short has nothing to recover); it is logged
    // when it ends (`finish_preview`).
    let begun = if opts.preview {
        Ok(())
    } else {
        state.begin_run(
            &admission.manifest.bundle.name,
            &marker,
            opts.retry,
            |lock, attempt| log.append_locked(lock, started_event(attempt)).map(drop),
        )
    };
    match begun {
        Ok(()) => {}
        Err(BeginRunError::Record(e)) => {
            return Err(refuse(held, Refusal::new(e.refusal_kind(), e)));
        }
        // No unlogged runs: an run log we cannot write is a host error.
        Err(BeginRunError::Alongside(e)) => {
            return Err(refuse(
                held,
                Refusal::new(RefusalKind::HostError, format!("run log: {e}")),
            ));
        }
    }

    let mut report = empty_report(&host.name, started);
    report.bundle = Some(bundle.clone());
    report.signers = admission.signers.clone();
    report.run_id = Some(run_id.to_string());
    report.network = admission.network.grants.clone();
    Ok(Prepared {
        admission,
        held,
        audit,
        run_id,
        packages_before,
        report,
    })
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

/// An [`AuditListener`] being started on its own thread.
pub(super) enum StartingListener {
    Thread(std::thread::JoinHandle<Result<AuditListener, String>>),
    /// The thread could not be spawned: start inline at `join`.
    Inline,
}

impl StartingListener {
    pub(super) fn spawn() -> Self {
        std::thread::Builder::new()
            .name("audit-start".into())
            .spawn(|| AuditListener::start().map_err(|e| e.to_string()))
            .map_or(StartingListener::Inline, StartingListener::Thread)
    }

    pub(super) fn join(self) -> Result<AuditListener, String> {
        match self {
            StartingListener::Thread(handle) => handle
                .join()
                .unwrap_or_else(|_| Err("the audit listener start panicked".into())),
            StartingListener::Inline => AuditListener::start().map_err(|e| e.to_string()),
        }
    }
}
