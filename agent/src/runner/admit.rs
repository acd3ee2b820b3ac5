//! Stage 1 of a run: every check that writes nothing. A bundle that fails
//! one is refused with nothing written but the refusal's log entry.

use std::path::{Path, PathBuf};

use rollguard_shared::archive::{self, Limits, OpenedBundle};
use rollguard_shared::manifest::{Manifest, PackageKind, Packages, Scope};
use rollguard_shared::report::{BundleRef, RefusalKind};
use rollguard_shared::signature::{self, AllowedSigners, RawSignature};
use sha2::{Digest, Sha256};

use super::{Known, Refusal, RunOptions};
use crate::policy::{HostPolicy, Pins, ProtectedNow};
use crate::run_log::RunLog;
use crate::sandbox::limits::RunLimits;
use crate::sandbox::net_scope;
use crate::sandbox::pins::Placeholder;
use crate::sandbox::{KernelSupport, Launcher};
use crate::state::StateDir;

/// What the checks established about a bundle that passed them all.
pub(super) struct Admission {
    pub manifest: Manifest,
    /// `[packages]`, with merged-/usr aliases resolved for this host.
    pub packages: Option<Packages>,
    /// What the run may change: the author's scope and the one derived
    /// from the packages. Every check and the sandbox use this union.
    pub scope: Scope,
    pub bundle: BundleRef,
    pub manifest_sha256: String,
    /// The distinct principals whose signatures counted.
    pub signers: Vec<String>,
    pub limits: RunLimits,
    pub kernel: KernelSupport,
    pub network: net_scope::Resolved,
    pub launcher: Launcher,
}

/// The protected paths as this run's checks resolved them, handed to
/// [`super::prepare`] for the sandbox: one resolution, so the sandbox's
/// protected list and its pins are those the checks passed.
pub(super) struct Resolution<'p> {
    pub protected: ProtectedNow<'p>,
    pub pins: Pins,
    /// Missing drop-in directories of the agent's unit directly in a
    /// scope, created empty before the run ([`check_pins`]).
    pub placeholders: Vec<Placeholder>,
}

/// Run every check, in order; `known` is filled in as soon as the
/// manifest parsed, so a refusal after that names the bundle. Returns the
/// bundle positioned at its payload, unpacked (digests checked) in
/// [`super::prepare`].
pub(super) fn admit<'p>(
    policy: &'p HostPolicy,
    state: &StateDir,
    log: &RunLog,
    bundle_path: &Path,
    opts: &RunOptions,
    known: &mut Option<Known>,
) -> Result<(OpenedBundle<'static>, Admission, Resolution<'p>), Refusal> {
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
    if let Some(order) = crate::kill_switch::host_kill_in_force(state)
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
    let packages = manifest
        .packages
        .as_ref()
        .map(crate::packages::on_this_host);
    // A preview reads the database it would leave from its layers, which
    // only dpkg's is read from (rpm's is a database file only rpm reads).
    if opts.preview
        && packages
            .as_ref()
            .is_some_and(|p| p.kind != PackageKind::Deb)
    {
        // Not `BadBundle` (the file is well formed): this agent cannot
        // preview it, as a host limit.
        return Err(Refusal::new(
            RefusalKind::HostError,
            "a preview of .rpm packages is not supported: what rpm would leave in its database cannot be read from the preview's layers; nothing was run",
        ));
    }
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
    // Rollback protection, and for a retry order the retry rule (the same
    // version only after a run here that did not succeed; checked again,
    // atomically, when the run begins).
    let last = state
        .version_record(&manifest.bundle.name)
        .map_err(|e| Refusal::new(RefusalKind::HostError, e))?;
    crate::state::may_start(
        bundle.name.as_str(),
        last.as_ref(),
        bundle.version,
        opts.retry,
        &manifest_sha256,
    )
    .map_err(|e| Refusal::new(e.refusal_kind(), e))?;
    // The stage-2 program, found (and checked) before anything is written:
    // without it nothing can be confined, and the version must not be used
    // up by a run that cannot start.
    let launcher = match &opts.launcher {
        Some(l) => l.clone(),
        None => Launcher::beside(&opts.agent_exe)
            .map_err(|e| Refusal::new(RefusalKind::HostError, e))?,
    };
    // Names in the network scope are resolved now, once: the kernel
    // enforces the addresses they had at the start of the run, and the
    // report shows them. A name that does not resolve refuses the run.
    // After the local checks above (a lookup may take seconds, and a
    // bundle they refuse needs none), before the protected paths.
    let network = net_scope::resolve(&manifest.scope.network, net_scope::system_lookup)
        .map_err(|e| Refusal::new(RefusalKind::HostError, e))?;
    // The host's ceiling applies to what the names resolved to.
    policy
        .check_network(&network.by_entry)
        .map_err(|e| Refusal::new(e.refusal_kind(), e))?;
    // Last, the protected paths, resolved once for the checks here and
    // for the sandbox's list (`prepare`): between this resolution and the
    // sandbox's start comes only the agent's local work (the run
    // directory, missing package directories), no name lookup.
    let protected = policy.protected_now();
    let pins = protected
        .check_scope(&scope)
        .map_err(|e| Refusal::new(e.refusal_kind(), e))?;
    // Missing drop-in directories of the agent's unit are created in
    // `prepare`, not now: nothing is written before every check has passed.
    let placeholders = check_pins(&scope, &pins, true)?;
    check_mount_aliases(&protected, &scope)?;
    super::unit_alias::check_none(&scope)
        .map_err(|e| Refusal::new(RefusalKind::ProtectedPath, e))?;
    let admission = Admission {
        manifest,
        packages,
        scope,
        bundle,
        manifest_sha256,
        signers: verified.principals,
        limits,
        kernel,
        network,
        launcher,
    };
    let resolution = Resolution {
        protected,
        pins,
        placeholders,
    };
    Ok((opened, admission, resolution))
}

/// Every pin must be one stage 2 can mount: a protected path that does not
/// exist directly in a scope (`/etc/ld.so.preload` in a scope `/etc`) could
/// be created by the bundle, so the run is refused (see
/// [`crate::sandbox::pins::plan`]; stage 2 plans again before mounting).
/// With `placeholders`, a missing drop-in directory of the agent's unit
/// directly in a scope is returned instead, to be created empty before the
/// run ([`crate::policy::Pins::drop_in_dirs`]).
pub(super) fn check_pins(
    scope: &Scope,
    pins: &Pins,
    placeholders: bool,
) -> Result<Vec<Placeholder>, Refusal> {
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

/// A write or delete scope must not hold another mount of protected data
/// (a backup volume bind-mounted beneath a spool directory): the path
/// checks above cannot see it, and deleting beneath the scope would delete
/// the protected data. Read from the agent's own mount table, which the
/// sandbox's namespace copies (stage 2 checks its copy again).
fn check_mount_aliases(protected: &ProtectedNow<'_>, scope: &Scope) -> Result<(), Refusal> {
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
