//! The host policy (`/etc/rollguard/agent.toml`): who this host is, whose
//! signatures it trusts, what no bundle may ever touch, and the ceiling on
//! what any bundle may change.
//!
//! The policy is the host's own word and outranks every bundle: a bundle
//! that names a protected path, or a write/delete path outside the
//! ceiling, is refused before anything runs (see [`HostPolicy::check_scope`]).
//!
//! Parsing is strict (`deny_unknown_fields` on every table, so a typo such as
//! `[protected]` is an error rather than a silently missing protection) and
//! produces typed values; nothing downstream handles raw strings.
//!
//! ```toml
//! [host]
//! name = "mail-03.tokyo"
//! labels = { role = "mail", site = "tokyo" }
//! [trust]
//! allowed_signers = "/etc/rollguard/allowed_signers"
//! threshold = 1
//! delete_threshold = 2
//! [protect]
//! paths = ["/backup", "/srv/backup"]
//! [limits]
//! allow_scopes = ["/etc", "/var", "/srv", "/opt", "/usr/local"]
//! allow_network = ["tcp:10.0.0.0/8:443", "udp:10.0.0.53:53"]   # optional
//! [state]
//! dir = "/var/lib/rollguard"
//! # Optional: per-run resource limits (unset keys: the built-in defaults
//! # 512 pids, 1024 MiB, 1000 millicores, 256 MiB /tmp, 1024 KiB output),
//! # and what a bundle's `[run.resources]` may ask for at most (unset keys:
//! # the host's default, so a bundle can only lower them).
//! [resources]
//! pids = 512
//! memory_mib = 1024
//! [resources.max]
//! memory_mib = 4096
//! # Optional: services bundles may have the agent reload or restart
//! # (globs; absent or empty: none).
//! [services]
//! allow = ["postfix.service", "php*-fpm.service"]
//! ```
//!
//! Extending: a new table (the coming `[controller]`) is one more `Option`
//! field on [`RawPolicy`] and one more typed field on [`HostPolicy`]; until
//! then an unknown table is an error, as it must be.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use rollguard_shared::endpoint::{EndpointHost, IpNet, NetworkEndpoint, Protocol};
use rollguard_shared::manifest::{ResourceRequest, Scope};
use rollguard_shared::path::{PathError, ScopePath};
use rollguard_shared::report::RefusalKind;
use rollguard_shared::targets::{validate_label, HostIdentity, TargetError};
use serde::Deserialize;

use crate::sandbox::limits::{LimitsError, RunLimits, KIB, MIB};

mod services;
use crate::sandbox::NetRule;
pub use services::{ServicesPolicy, ServicesPolicyError};

/// Largest policy file we read.
pub const MAX_POLICY_BYTES: u64 = 256 * 1024;
/// Where the agent keeps its state when `[state]` is absent.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/rollguard";
const MAX_LABELS: usize = 64;
const MAX_PATHS: usize = 1024;
/// Symlink hops we follow by hand when resolving a path prefix.
const MAX_SYMLINK_HOPS: usize = 40;

/// Everything that can be wrong with a host policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read host policy {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("host policy {0} is larger than {MAX_POLICY_BYTES} bytes")]
    TooLarge(PathBuf),
    #[error("host policy is not valid: {0}")]
    Toml(String),
    #[error("host.name is empty: the host's name is what bundles target")]
    EmptyHostName,
    #[error(
        "host.name {0:?} is invalid: use 1-253 characters of letters, digits, '-', '.' and '_'"
    )]
    BadHostName(String),
    #[error("host.labels: {0}")]
    BadLabel(#[from] TargetError),
    #[error("host.labels has more than {MAX_LABELS} entries")]
    TooManyLabels,
    #[error("{key}: {source}")]
    Path {
        key: &'static str,
        source: PathError,
    },
    #[error("resources: {0}")]
    Resources(#[from] crate::sandbox::limits::LimitsError),
    #[error("{0} has more than {MAX_PATHS} entries")]
    TooManyPaths(&'static str),
    #[error("trust.threshold must be at least 1 (0 would run unsigned bundles)")]
    ZeroThreshold,
    #[error("trust.delete_threshold ({delete}) must be at least trust.threshold ({threshold}): deleting needs more approval, not less")]
    DeleteThresholdTooLow { threshold: usize, delete: usize },
    #[error("trust.allowed_signers {path}: {why}")]
    AllowedSigners { path: PathBuf, why: String },
    #[error("[controller]: {0}")]
    Controller(String),
    /// A file the agent trusts that someone else could replace.
    #[error(transparent)]
    Untrusted(#[from] crate::trust_path::TrustPathError),
    #[error("limits.allow_network entry {entry:?}: {why}")]
    NetworkCeiling { entry: String, why: String },
    #[error(transparent)]
    Services(#[from] ServicesPolicyError),
}

/// Why a bundle's scope is not acceptable on this host. Each maps to a
/// [`RefusalKind`] via [`ScopeViolation::refusal_kind`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeViolation {
    #[error("scope.{key} path {path} overlaps protected path {protected} ({reason}){}", via_note(.via))]
    ProtectedPath {
        key: &'static str,
        path: ScopePath,
        protected: ScopePath,
        reason: ProtectionReason,
        /// The resolved (symlink-free) spelling through which the overlap
        /// was found, when it differs from what the bundle wrote.
        via: Option<String>,
    },
    /// A protected symlink inside a scope is pinned as the link; what it
    /// points to is protected under its resolved name. Another symlink on
    /// the way there that the bundle could replace would redirect it.
    #[error("scope.{key} path {path} holds the symlink {link}, through which protected path {protected} ({reason}) resolves: the bundle could redirect it")]
    RedirectablePin {
        key: &'static str,
        path: ScopePath,
        link: PathBuf,
        protected: ScopePath,
        reason: ProtectionReason,
    },
    #[error("scope.{key} path {path} is outside this host's allow_scopes ceiling {ceiling:?}{}", via_note(.via))]
    ScopeCeiling {
        key: &'static str,
        path: ScopePath,
        ceiling: Vec<String>,
        via: Option<String>,
    },
    #[error("scope.network entry {entry} allows {protocol}:{net}:{port}, outside this host's allow_network ceiling {ceiling:?}")]
    NetworkCeiling {
        entry: String,
        protocol: Protocol,
        net: IpNet,
        port: u16,
        ceiling: Vec<String>,
    },
}

fn via_note(via: &Option<String>) -> String {
    match via {
        Some(v) => format!(" (it resolves to {v})"),
        None => String::new(),
    }
}

impl ScopeViolation {
    pub fn refusal_kind(&self) -> RefusalKind {
        match self {
            ScopeViolation::ProtectedPath { .. } | ScopeViolation::RedirectablePin { .. } => {
                RefusalKind::ProtectedPath
            }
            ScopeViolation::ScopeCeiling { .. } | ScopeViolation::NetworkCeiling { .. } => {
                RefusalKind::ScopeCeiling
            }
        }
    }
}

/// Why a path is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtectionReason {
    /// Listed in `[protect] paths`.
    Configured,
    /// The agent's own state directory (rollback versions, run log, kill
    /// switch): a bundle that could write there could undo rollback
    /// protection or rewrite the audit trail.
    StateDir,
    /// The allowed-signers file: a bundle that could write it could make
    /// itself trusted.
    TrustFile,
    /// The policy file itself.
    PolicyFile,
    /// The running agent executable. Readable (it is public), never
    /// writable. Readable matters for cost too: an unreadable path makes
    /// the sandbox grant reads on every sibling of it and of each of its
    /// ancestors (`/usr/sbin` holds a few hundred entries), one Landlock
    /// rule each, at every run.
    AgentExecutable,
    /// The agent's controller credentials (`[controller]` cert, key, CA): a
    /// bundle that could read the key could impersonate this host.
    ControllerCredentials,
    /// The agent's programs (its binary's directory, the stage-2 program
    /// at every place it is looked for, and those directories): a bundle
    /// that could replace stage 2 would make the next run unconfined.
    /// Readable (they are public), never writable.
    AgentPrograms,
    /// The agent's configuration directory (`/etc/rollguard`). Readable
    /// except for the files protected in full, never writable.
    AgentConfigDir,
    /// The dynamic loader's configuration (`/etc/ld.so.preload`, its cache
    /// and `ld.so.conf`): a bundle that could write them would run its code
    /// inside the next (unconfined) agent or stage-2 process. Readable
    /// (every dynamically linked program reads the cache), never writable.
    DynamicLoader,
    /// The agent's systemd unit and its drop-ins (and the drop-ins that
    /// apply to every service): a bundle that could write them would
    /// decide how the agent starts next. Readable, never writable.
    ServiceUnit,
    /// The agent unit's enablement links (`systemctl enable`'s
    /// `rollguard-agent.service` in a `.wants`, `.requires` or `.upholds`
    /// directory of a unit directory) and their names in the unit
    /// directories that would override them: a bundle that removed one, or
    /// masked it, would keep the agent from starting at the next boot.
    /// Pinned as links inside a scope; readable, never writable.
    ServiceEnablement,
}

impl ProtectionReason {
    /// Whether bundles may still read (and execute) the path: only its
    /// write and delete scopes are refused, and the sandbox grants no write
    /// beneath it. The others are neither readable nor writable.
    pub fn bundles_may_read(self) -> bool {
        matches!(
            self,
            ProtectionReason::AgentExecutable
                | ProtectionReason::AgentPrograms
                | ProtectionReason::AgentConfigDir
                | ProtectionReason::DynamicLoader
                | ProtectionReason::ServiceUnit
                | ProtectionReason::ServiceEnablement
        )
    }
}

/// The agent's configuration directory (the packages put the policy and
/// `allowed_signers` there).
pub const AGENT_CONFIG_DIR: &str = "/etc/rollguard";

/// The dynamic loader's files every process started by the agent trusts.
pub const DYNAMIC_LOADER_PATHS: [&str; 4] = [
    "/etc/ld.so.preload",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
];

/// Where systemd looks for the agent's unit and drop-ins (`systemd.unit(5)`
/// load path, system manager: control, transient, configuration, attached
/// (portable services), runtime, local and vendor directories; systemd
/// 252's `systemd-analyze unit-paths` lists them, with the generator
/// directories under `/run`, which the sandbox replaces), **highest
/// priority first**, as systemd orders them: an entry in an earlier one
/// overrides the same name in a later one.
pub const SYSTEMD_UNIT_DIRS: [&str; 10] = [
    "/etc/systemd/system.control",
    "/run/systemd/system.control",
    "/run/systemd/transient",
    "/etc/systemd/system",
    "/etc/systemd/system.attached",
    "/run/systemd/system",
    "/run/systemd/system.attached",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
];

pub use rollguard_shared::services::AGENT_UNIT;
use rollguard_shared::services::ENABLEMENT_DIRS;

/// Unit file and drop-in directories that configure `rollguard-agent.service`:
/// its own, the prefix drop-ins (`rollguard-.service.d`) and the drop-ins
/// for every service (`service.d`, systemd 246+).
const SYSTEMD_UNIT_NAMES: [&str; 4] = [
    "rollguard-agent.service",
    "rollguard-agent.service.d",
    "rollguard-.service.d",
    "service.d",
];

/// The agent's enablement links (see [`ProtectionReason::ServiceEnablement`])
/// in `unit_dirs` (highest priority first): every `rollguard-agent.service`
/// in a `.wants`, `.requires` or `.upholds` directory that exists now (as
/// the directory is spelled there; systemd follows a symlinked one), and
/// the same name in the directory of that name in **every unit directory
/// of higher priority**, whether it exists or not: there an entry linking
/// to `/dev/null` (or an empty file) would mask the dependency (systemd
/// 233+), which is as good as removing the link. A link's name in a
/// directory of lower priority is not protected (the link overrides it),
/// nor in a target that has none (making one only enables the agent).
/// What cannot be read is logged and skipped.
fn agent_unit_links(unit_dirs: &[&str]) -> Vec<PathBuf> {
    let mut links = std::collections::BTreeSet::new();
    let skipped = |path: &Path, e: &std::io::Error| {
        tracing::warn!(path = %path.display(), "cannot look for the agent's enablement links here: {e}");
    };
    for (rank, dir) in unit_dirs.iter().enumerate() {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                skipped(Path::new(dir), &e);
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    skipped(Path::new(dir), &e);
                    continue;
                }
            };
            let name = entry.file_name();
            let Some(name) = name.to_str().filter(|n| {
                ENABLEMENT_DIRS
                    .iter()
                    .any(|(_, suffix)| n.len() > suffix.len() && n.ends_with(suffix))
            }) else {
                continue;
            };
            if !fs::metadata(entry.path()).is_ok_and(|m| m.is_dir()) {
                continue;
            }
            let link = entry.path().join(AGENT_UNIT);
            match fs::symlink_metadata(&link) {
                Ok(_) => {
                    links.insert(link);
                    for higher in &unit_dirs[..rank] {
                        links.insert(Path::new(higher).join(name).join(AGENT_UNIT));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => skipped(&link, &e),
            }
        }
    }
    links.into_iter().collect()
}

impl fmt::Display for ProtectionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProtectionReason::Configured => "listed in [protect]",
            ProtectionReason::StateDir => "the agent's state directory",
            ProtectionReason::TrustFile => "the allowed-signers file",
            ProtectionReason::PolicyFile => "the host policy file",
            ProtectionReason::AgentExecutable => "the agent executable",
            ProtectionReason::ControllerCredentials => "the agent's controller credentials",
            ProtectionReason::AgentPrograms => "the agent's programs (stage 2 runs unconfined)",
            ProtectionReason::AgentConfigDir => "the agent's configuration directory",
            ProtectionReason::DynamicLoader => "the dynamic loader's configuration",
            ProtectionReason::ServiceUnit => "the agent's systemd unit",
            ProtectionReason::ServiceEnablement => "the agent's unit enablement link",
        })
    }
}

/// One protected path: as written, plus every spelling it resolved to when
/// the policy was loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectedPath {
    pub path: ScopePath,
    /// ResolvedPath forms (`canonicalize`, or the longest existing prefix
    /// resolved when the path does not exist yet). Empty when resolution
    /// yields the path itself.
    pub resolved: Vec<ScopePath>,
    pub reason: ProtectionReason,
}

/// `[trust]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustPolicy {
    pub allowed_signers: PathBuf,
    /// Distinct principals required for any bundle (>= 1).
    pub threshold: usize,
    /// Required instead when the bundle's `scope.delete` is non-empty
    /// (>= `threshold`).
    pub delete_threshold: usize,
}

/// The parsed host policy.
#[derive(Debug, Clone)]
pub struct HostPolicy {
    host: HostIdentity,
    trust: TrustPolicy,
    protect: Vec<ProtectedPath>,
    allow_scopes: Vec<ScopePath>,
    /// `None`: no network ceiling (any destination a bundle names).
    allow_network: Option<Vec<NetworkEndpoint>>,
    state_dir: PathBuf,
    resources: HostResources,
    controller: Option<crate::daemon::config::ControllerSection>,
    services: ServicesPolicy,
}

/// `[resources]`: every run's limits, and the most a bundle may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostResources {
    pub default: RunLimits,
    pub max: RunLimits,
}

impl HostResources {
    fn parse(raw: Option<RawResources>) -> Result<Self, PolicyError> {
        let raw = raw.unwrap_or_default();
        let default = overlay(RunLimits::default(), &raw.defaults());
        let max = overlay(default, &raw.max.unwrap_or_default());
        default.validate()?;
        max.validate()?;
        default.within(&max)?;
        Ok(HostResources { default, max })
    }

    /// The limits of a run whose bundle asks for `request`: the host's
    /// defaults with the request applied, refused above the host's max.
    pub fn for_run(&self, request: &ResourceRequest) -> Result<RunLimits, LimitsError> {
        let limits = overlay(self.default, request);
        limits.within(&self.max)?;
        limits.validate()?;
        Ok(limits)
    }
}

/// `base` with the keys set in `request` replaced.
fn overlay(base: RunLimits, request: &ResourceRequest) -> RunLimits {
    RunLimits {
        pids: request.pids.unwrap_or(base.pids),
        memory_bytes: request
            .memory_mib
            .map_or(base.memory_bytes, |m| m.saturating_mul(MIB)),
        cpu_millicores: request.cpu_millicores.unwrap_or(base.cpu_millicores),
        tmp_bytes: request
            .tmp_mib
            .map_or(base.tmp_bytes, |m| m.saturating_mul(MIB)),
        output_bytes: request
            .output_kib
            .map_or(base.output_bytes, |k| k.saturating_mul(KIB)),
    }
}

// ---- raw serde layer ------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    host: RawHost,
    trust: RawTrust,
    protect: RawProtect,
    limits: RawLimits,
    state: Option<RawState>,
    resources: Option<RawResources>,
    controller: Option<crate::daemon::config::ControllerSection>,
    services: Option<services::RawServicesPolicy>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResources {
    pids: Option<u32>,
    memory_mib: Option<u64>,
    cpu_millicores: Option<u32>,
    tmp_mib: Option<u64>,
    output_kib: Option<u64>,
    max: Option<ResourceRequest>,
}

impl RawResources {
    fn defaults(&self) -> ResourceRequest {
        ResourceRequest {
            pids: self.pids,
            memory_mib: self.memory_mib,
            cpu_millicores: self.cpu_millicores,
            tmp_mib: self.tmp_mib,
            output_kib: self.output_kib,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrust {
    allowed_signers: String,
    threshold: u32,
    delete_threshold: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProtect {
    paths: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    allow_scopes: Vec<String>,
    allow_network: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    dir: String,
}

impl HostPolicy {
    /// Read and parse the policy file. Besides what [`HostPolicy::parse`]
    /// protects, the policy file itself and the running agent executable are
    /// protected too.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let read_err = |source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        // Whoever can write the policy decides what is protected and whose
        // signatures count: it must be root's alone.
        crate::trust_path::check(path, "host policy")?;
        if meta.len() > MAX_POLICY_BYTES {
            return Err(PolicyError::TooLarge(path.to_path_buf()));
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        let mut policy = Self::parse(&text)?;
        let absolute = std::path::absolute(path).map_err(read_err)?;
        if let Some(p) = absolute.to_str().and_then(|s| ScopePath::parse(s).ok()) {
            policy.add_protected(p, ProtectionReason::PolicyFile);
        }
        if let Ok(exe) = std::env::current_exe() {
            if let Some(p) = exe.to_str().and_then(|s| ScopePath::parse(s).ok()) {
                policy.add_protected(p, ProtectionReason::AgentExecutable);
            }
            policy.protect_agent_programs(&exe);
        }
        Ok(policy)
    }

    /// Protect (from writes) what every run trusts besides the policy: the
    /// programs installed with the agent binary `agent_exe` (its directory,
    /// each place the stage-2 program is looked for, those directories),
    /// the agent's configuration directory, the dynamic loader's files,
    /// the agent's systemd unit with its drop-ins and its enablement links.
    /// Paths that do not exist are protected too (a bundle must not create
    /// a stage-2 program where the agent would look for one first, or a
    /// drop-in); of the enablement links, those there now and their names
    /// where an entry would override them ([`agent_unit_links`]).
    pub fn protect_agent_programs(&mut self, agent_exe: &Path) {
        let mut programs: Vec<PathBuf> = agent_exe
            .parent()
            .into_iter()
            .map(Path::to_path_buf)
            .collect();
        for candidate in crate::sandbox::launch::stage2_candidates(agent_exe) {
            programs.extend(candidate.parent().map(Path::to_path_buf));
            programs.push(candidate);
        }
        let fixed = std::iter::once((
            PathBuf::from(AGENT_CONFIG_DIR),
            ProtectionReason::AgentConfigDir,
        ))
        .chain(
            DYNAMIC_LOADER_PATHS
                .iter()
                .map(|p| (PathBuf::from(p), ProtectionReason::DynamicLoader)),
        )
        .chain(SYSTEMD_UNIT_DIRS.iter().flat_map(|dir| {
            SYSTEMD_UNIT_NAMES
                .iter()
                .map(move |name| (Path::new(dir).join(name), ProtectionReason::ServiceUnit))
        }))
        .chain(
            agent_unit_links(&SYSTEMD_UNIT_DIRS)
                .into_iter()
                .map(|link| (link, ProtectionReason::ServiceEnablement)),
        );
        let all = programs
            .into_iter()
            .map(|p| (p, ProtectionReason::AgentPrograms))
            .chain(fixed);
        let mut lookups = Lookups::default();
        for (path, reason) in all {
            match path.to_str().map(ScopePath::parse) {
                Some(Ok(p)) => self.add_protected_with(p, reason, &mut lookups),
                // `/` or a non-UTF-8 install path: nothing sensible to add;
                // say so rather than pretend.
                _ => {
                    tracing::warn!(path = %path.display(), "cannot protect this path (not a valid scope path)")
                }
            }
        }
    }

    /// Parse policy text. Touches the filesystem to resolve protected paths
    /// and to check that the allowed-signers file exists: a host that cannot
    /// verify signatures must not start believing it can.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        if text.len() as u64 > MAX_POLICY_BYTES {
            return Err(PolicyError::TooLarge(PathBuf::from("<text>")));
        }
        let raw: RawPolicy = toml::from_str(text).map_err(|e| PolicyError::Toml(e.to_string()))?;

        let host = parse_host(raw.host)?;

        let trust = parse_trust(raw.trust)?;

        let configured = parse_paths("protect.paths", &raw.protect.paths)?;
        let allow_scopes = parse_paths("limits.allow_scopes", &raw.limits.allow_scopes)?;
        let allow_network = raw
            .limits
            .allow_network
            .as_deref()
            .map(parse_network_ceiling)
            .transpose()?;
        let state_dir = match raw.state {
            Some(s) => ScopePath::parse(&s.dir).map_err(|source| PolicyError::Path {
                key: "state.dir",
                source,
            })?,
            None => ScopePath::parse(DEFAULT_STATE_DIR).map_err(|source| PolicyError::Path {
                key: "state.dir",
                source,
            })?,
        };

        let resources = HostResources::parse(raw.resources)?;
        let services = ServicesPolicy::parse(raw.services)?;

        let mut policy = HostPolicy {
            host,
            trust,
            protect: Vec::new(),
            allow_scopes,
            allow_network,
            state_dir: state_dir.as_path().to_path_buf(),
            resources,
            controller: None,
            services,
        };
        for p in configured {
            policy.add_protected(p, ProtectionReason::Configured);
        }
        policy.add_protected(state_dir, ProtectionReason::StateDir);
        let signers = ScopePath::parse(&policy.trust.allowed_signers.to_string_lossy()).map_err(
            |source| PolicyError::Path {
                key: "trust.allowed_signers",
                source,
            },
        )?;
        policy.add_protected(signers, ProtectionReason::TrustFile);
        if let Some(controller) = raw.controller {
            controller.validate().map_err(PolicyError::Controller)?;
            for p in [&controller.key, &controller.cert, &controller.ca] {
                let path =
                    ScopePath::parse(&p.to_string_lossy()).map_err(|source| PolicyError::Path {
                        key: "controller",
                        source,
                    })?;
                policy.add_protected(path, ProtectionReason::ControllerCredentials);
            }
            policy.controller = Some(controller);
        }
        Ok(policy)
    }

    fn add_protected(&mut self, path: ScopePath, reason: ProtectionReason) {
        self.add_protected_with(path, reason, &mut Lookups::default());
    }

    fn add_protected_with(
        &mut self,
        path: ScopePath,
        reason: ProtectionReason,
        lookups: &mut Lookups,
    ) {
        if self.protect.iter().any(|p| p.path == path) {
            return;
        }
        let resolved = resolved_forms_with(&path, lookups);
        self.protect.push(ProtectedPath {
            path,
            resolved,
            reason,
        });
    }

    pub fn identity(&self) -> HostIdentity {
        self.host.clone()
    }

    pub fn trust(&self) -> &TrustPolicy {
        &self.trust
    }

    /// Every protected path with its resolved forms, including the implicit
    /// ones (state dir, allowed-signers file, policy file, agent executable).
    pub fn protected(&self) -> &[ProtectedPath] {
        &self.protect
    }

    /// Every spelling of every protected path that bundles may not read —
    /// as written, as resolved at load and as resolved *now* — deduplicated.
    /// The sandbox must keep all of these out of the bundle's reach, reads
    /// included. Resolving again on each call matters for the daemon, which
    /// loads the policy once: a protected symlink re-pointed since then
    /// protects its new target from the next run on.
    pub fn protected_canonical(&self) -> Vec<ScopePath> {
        self.protected_now().canonical()
    }

    /// Every spelling of every path a bundle may not *change*: the
    /// protected paths of [`Self::protected_canonical`] and the
    /// write-protected ones (the agent's programs, `/etc/rollguard`, the
    /// loader's files, the agent's unit). Another mount of any of them
    /// inside a write or delete scope would let a bundle write through it.
    pub fn write_protected_canonical(&self) -> Vec<ScopePath> {
        self.protected_now().write_protected()
    }

    /// The protected paths with their spellings resolved now, once: a run
    /// takes one of these and makes every check and the sandbox's list
    /// from it. Resolving walks each path a component at a time (a
    /// `statx` per component, a few hundred for the implicit paths), which
    /// was a tenth of a trivial run's CPU when each check did it again.
    pub fn protected_now(&self) -> ProtectedNow<'_> {
        let mut forms = Vec::new();
        let mut lookups = Lookups::default();
        for p in &self.protect {
            forms.push((p, p.path.clone()));
            let now = resolved_forms_with(&p.path, &mut lookups);
            for r in p.resolved.iter().cloned().chain(now) {
                forms.push((p, r));
            }
        }
        ProtectedNow {
            policy: self,
            forms,
        }
    }

    pub fn allow_scopes(&self) -> &[ScopePath] {
        &self.allow_scopes
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// `[resources]`: run limits and the ceiling for bundles.
    /// `[services]`: which units bundles may have reloaded or restarted.
    pub fn services(&self) -> &ServicesPolicy {
        &self.services
    }

    pub fn resources(&self) -> &HostResources {
        &self.resources
    }

    /// `[controller]`: where the daemon (`rollguard-agent serve`) connects.
    pub fn controller(&self) -> Option<&crate::daemon::config::ControllerSection> {
        self.controller.as_ref()
    }

    /// Signatures required for a bundle with this scope.
    pub fn required_threshold(&self, scope: &Scope) -> usize {
        if scope.delete.is_empty() {
            self.trust.threshold
        } else {
            self.trust.delete_threshold
        }
    }

    /// Check a run's network rules (the bundle's `scope.network` with its
    /// names resolved, so a name cannot point past the ceiling) against
    /// `limits.allow_network`: each rule's protocol and port must equal a
    /// ceiling entry's, and its address block lie within that entry's.
    /// Without `allow_network` there is no ceiling; an empty one allows no
    /// network at all.
    pub fn check_network(&self, grants: &[(String, NetRule)]) -> Result<(), ScopeViolation> {
        let Some(ceiling) = &self.allow_network else {
            return Ok(());
        };
        for (entry, rule) in grants {
            let within = ceiling.iter().any(|c| match &c.host {
                EndpointHost::Net(block) => {
                    c.protocol == rule.protocol
                        && c.port == rule.port
                        && block.prefix() <= rule.net.prefix()
                        && block.contains(rule.net.addr())
                }
                EndpointHost::Name(_) => false,
            });
            if !within {
                return Err(ScopeViolation::NetworkCeiling {
                    entry: entry.clone(),
                    protocol: rule.protocol,
                    net: rule.net,
                    port: rule.port,
                    ceiling: ceiling.iter().map(|c| c.to_string()).collect(),
                });
            }
        }
        Ok(())
    }

    /// Check a bundle's scope against this host's policy (see
    /// [`ProtectedNow::check_scope`]), with the protected paths resolved now.
    pub fn check_scope(&self, scope: &Scope) -> Result<Pins, ScopeViolation> {
        self.protected_now().check_scope(scope)
    }
}

/// The protected paths of a [`HostPolicy`] with every spelling they have at
/// one moment: as written, as resolved at load, as resolved when this was
/// made ([`HostPolicy::protected_now`]).
#[derive(Debug)]
pub struct ProtectedNow<'p> {
    policy: &'p HostPolicy,
    forms: Vec<(&'p ProtectedPath, ScopePath)>,
}

impl ProtectedNow<'_> {
    /// The spellings of the paths bundles may not read, sorted and
    /// deduplicated (see [`HostPolicy::protected_canonical`]).
    pub fn canonical(&self) -> Vec<ScopePath> {
        self.spellings_of(|p| !p.reason.bundles_may_read())
    }

    /// The spellings of every path bundles may not change (see
    /// [`HostPolicy::write_protected_canonical`]).
    pub fn write_protected(&self) -> Vec<ScopePath> {
        self.spellings_of(|_| true)
    }

    fn spellings_of(&self, which: impl Fn(&ProtectedPath) -> bool) -> Vec<ScopePath> {
        let mut out: Vec<ScopePath> = self
            .forms
            .iter()
            .filter(|(p, _)| which(p))
            .map(|(_, form)| form.clone())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Check a bundle's scope against this host's policy; returns the
    /// protected paths the sandbox must pin inside the write and delete
    /// scopes (see [`Pins`]).
    ///
    /// - No scope path (write, delete or read) may be a protected path or
    ///   lie within one. Both sides are compared as written and resolved
    ///   (resolved again now, so a symlink created since the policy was
    ///   loaded still counts), so `/srv/data -> /backup` is caught.
    /// - A read scope may contain a path bundles may read
    ///   ([`ProtectionReason::bundles_may_read`]), no other protected path.
    /// - A write or delete scope may contain (be a proper ancestor of) a
    ///   protected path only where the sandbox can keep it unchanged: a
    ///   path bundles may read (the agent's programs, its configuration
    ///   directory, the loader's files, its unit) becomes a pin, bound
    ///   read-only onto itself in the run's mount namespace; a path bundles
    ///   may not read that the agent protects on its own (state directory,
    ///   trust file, policy file, controller credentials) is accepted only
    ///   at or beneath such a pin (read-only with it, and covered as
    ///   everywhere). A path listed in `[protect]` stays refused inside any
    ///   scope: the operator asked for it to be out of reach.
    /// - Write and delete paths must lie within `allow_scopes`, both as
    ///   written and resolved (a Landlock rule follows the symlink, so the
    ///   resolved path is what would actually be granted).
    /// - Read paths are *not* subject to the ceiling: reading changes
    ///   nothing, and bundles legitimately read configuration outside the
    ///   directories they change. The protected check still applies to
    ///   them, so backups cannot be read (or exfiltrated) either.
    pub fn check_scope(&self, scope: &Scope) -> Result<Pins, ScopeViolation> {
        let policy = self.policy;
        let mut pins: Vec<ScopePath> = Vec::new();
        for (key, path) in scope.all_paths() {
            // Paths bundles may read are only guarded against changes.
            let protected: Vec<&(&ProtectedPath, ScopePath)> = self
                .forms
                .iter()
                .filter(|(p, _)| key != "read" || !p.reason.bundles_may_read())
                .collect();
            let changing = key != "read";
            let violation =
                |p: &ProtectedPath, via: Option<String>| ScopeViolation::ProtectedPath {
                    key,
                    path: path.clone(),
                    protected: p.path.clone(),
                    reason: p.reason,
                    via,
                };
            pins.extend(pins_within(path, &protected, changing).map_err(|p| violation(p, None))?);
            match resolve_symlinks(path) {
                ResolvedPath::Path(r) => pins.extend(
                    pins_within(&r, &protected, changing)
                        .map_err(|p| violation(p, Some(r.to_string())))?,
                ),
                // `/` contains every protected path; an unresolvable path
                // might be anything. There is always at least one protected
                // path (the state directory).
                ResolvedPath::Root => {
                    if let Some(p) = policy.protect.first() {
                        return Err(violation(p, Some("/".into())));
                    }
                }
                ResolvedPath::Unresolvable => {
                    if let Some(p) = policy.protect.first() {
                        return Err(violation(p, Some("an unresolvable symlink chain".into())));
                    }
                }
            }
        }
        let ceiling_resolved: Vec<ScopePath> = policy
            .allow_scopes
            .iter()
            .flat_map(|c| std::iter::once(c.clone()).chain(resolved_forms(c)))
            .collect();
        for (key, path) in scope.changing_paths() {
            let violation = |via: Option<String>| ScopeViolation::ScopeCeiling {
                key,
                path: path.clone(),
                ceiling: policy.allow_scopes.iter().map(|c| c.to_string()).collect(),
                via,
            };
            if !policy.allow_scopes.iter().any(|c| path.is_within(c)) {
                return Err(violation(None));
            }
            match resolve_symlinks(path) {
                ResolvedPath::Path(r) => {
                    if !ceiling_resolved.iter().any(|c| r.is_within(c)) {
                        return Err(violation(Some(r.to_string())));
                    }
                }
                ResolvedPath::Root => return Err(violation(Some("/".into()))),
                ResolvedPath::Unresolvable => {
                    return Err(violation(Some("an unresolvable symlink chain".into())))
                }
            }
        }
        pins.sort();
        pins.dedup();
        self.check_pins_not_redirectable(scope, &pins)?;
        // The agent's unit drop-in directories: the ones the runner may
        // create, empty, when missing directly in a scope (see
        // [`Pins::drop_in_dirs`]).
        let drop_in_dirs = pins
            .iter()
            .filter(|pin| {
                self.forms.iter().any(|(p, form)| {
                    form == *pin
                        && p.reason == ProtectionReason::ServiceUnit
                        && is_unit_drop_in_dir(form.as_path())
                })
            })
            .cloned()
            .collect();
        Ok(Pins {
            paths: pins,
            drop_in_dirs,
        })
    }

    /// A pin that is a symlink is pinned as the link (`sandbox::pins`), and
    /// what it points to is protected under its resolved name. No other
    /// symlink on the way from the link to its target may lie in a write
    /// or delete scope: the bundle could replace it and so redirect the
    /// link to a place of its own.
    fn check_pins_not_redirectable(
        &self,
        scope: &Scope,
        pins: &[ScopePath],
    ) -> Result<(), ScopeViolation> {
        for pin in pins {
            let Ok(target) = fs::read_link(pin.as_path()) else {
                continue;
            };
            let Some(parent) = pin.as_path().parent() else {
                continue;
            };
            let mut met = Vec::new();
            let _ = resolve_path_noting(&parent.join(target), &mut Lookups::default(), &mut met);
            for link in met {
                let Some((key, path)) = scope
                    .changing_paths()
                    .find(|(_, s)| link.starts_with(s.as_path()))
                else {
                    continue;
                };
                let protected = self
                    .forms
                    .iter()
                    .find(|(_, form)| form == pin)
                    .map(|(p, _)| *p)
                    .expect("a pin is one of the protected forms");
                return Err(ScopeViolation::RedirectablePin {
                    key,
                    path: path.clone(),
                    link,
                    protected: protected.path.clone(),
                    reason: protected.reason,
                });
            }
        }
        Ok(())
    }
}

/// Whether `path` names one of the drop-in directories of the agent's
/// unit ([`SYSTEMD_UNIT_NAMES`] ending in `.d`).
fn is_unit_drop_in_dir(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".d") && SYSTEMD_UNIT_NAMES.contains(&n))
}

/// Protected paths inside the write and delete scopes that the sandbox
/// keeps unchanged (each spelling of them found there, sorted, once each):
/// stage 2 binds each onto itself read-only in the run's mount namespace and
/// makes every directory between its outermost scope and it a mount point,
/// so it can be neither changed nor renamed, removed or replaced (see
/// `docs/sandbox.md`, "Protected paths inside a write scope").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pins {
    /// Every pin.
    pub paths: Vec<ScopePath>,
    /// The pins that are drop-in directories of the agent's unit
    /// (`rollguard-agent.service.d`, `rollguard-.service.d`, `service.d`
    /// protected as [`ProtectionReason::ServiceUnit`]). A missing one
    /// cannot be mounted on; when it would lie directly in its scope, the
    /// runner creates it as an empty directory instead of refusing the run
    /// (an empty drop-in directory configures nothing), and it is then
    /// pinned like one that existed. Never the unit file itself (systemd
    /// 252's `systemctl enable`/`mask` fail on a directory of that name)
    /// nor any other protected path (`/etc/ld.so.preload` as a directory
    /// would break every program).
    pub drop_in_dirs: Vec<ScopePath>,
}

/// The pins `protected` requires inside the scope path `scope`, or the
/// protected path that makes `scope` unacceptable (see
/// [`ProtectedNow::check_scope`]). `changing`: a write or delete scope.
fn pins_within<'p>(
    scope: &ScopePath,
    protected: &[&(&'p ProtectedPath, ScopePath)],
    changing: bool,
) -> Result<Vec<ScopePath>, &'p ProtectedPath> {
    let inside = |form: &ScopePath| changing && form != scope && form.is_within(scope);
    let pins: Vec<ScopePath> = protected
        .iter()
        .filter(|(p, form)| p.reason.bundles_may_read() && inside(form))
        .map(|(_, form)| form.clone())
        .collect();
    for (p, form) in protected {
        if !form.overlaps(scope) {
            continue;
        }
        let acceptable = inside(form)
            && match p.reason {
                r if r.bundles_may_read() => true,
                // The operator's own list: out of reach, never pinned.
                ProtectionReason::Configured => false,
                // Read-only with the pin above it, and covered.
                _ => pins.iter().any(|pin| form.is_within(pin)),
            };
        if !acceptable {
            return Err(p);
        }
    }
    Ok(pins)
}

fn parse_host(raw: RawHost) -> Result<HostIdentity, PolicyError> {
    if raw.name.is_empty() {
        return Err(PolicyError::EmptyHostName);
    }
    let name_ok = raw.name.len() <= 253
        && raw
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        && !raw.name.starts_with(['-', '.']);
    if !name_ok {
        return Err(PolicyError::BadHostName(raw.name));
    }
    if raw.labels.len() > MAX_LABELS {
        return Err(PolicyError::TooManyLabels);
    }
    for (k, v) in &raw.labels {
        validate_label(k, v)?;
    }
    Ok(HostIdentity {
        name: raw.name,
        labels: raw.labels,
    })
}

fn parse_trust(raw: RawTrust) -> Result<TrustPolicy, PolicyError> {
    let path = ScopePath::parse(&raw.allowed_signers).map_err(|source| PolicyError::Path {
        key: "trust.allowed_signers",
        source,
    })?;
    let signers_err = |why: String| PolicyError::AllowedSigners {
        path: path.as_path().to_path_buf(),
        why,
    };
    match std::fs::metadata(path.as_path()) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Err(signers_err("is not a regular file".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(signers_err(
                "does not exist: without it no signature can be verified, so the agent would refuse every bundle"
                    .into(),
            ))
        }
        Err(e) => return Err(signers_err(e.to_string())),
    }
    // Whoever can write it can make their own key trusted.
    crate::trust_path::check(path.as_path(), "trust.allowed_signers")?;
    let threshold = raw.threshold as usize;
    let delete = raw.delete_threshold as usize;
    if threshold == 0 {
        return Err(PolicyError::ZeroThreshold);
    }
    if delete < threshold {
        return Err(PolicyError::DeleteThresholdTooLow { threshold, delete });
    }
    Ok(TrustPolicy {
        allowed_signers: path.as_path().to_path_buf(),
        threshold,
        delete_threshold: delete,
    })
}

/// `limits.allow_network`: scope-entry syntax with addresses or blocks
/// only. A name is refused: the host's ceiling must not depend on what a
/// resolver answers.
fn parse_network_ceiling(raw: &[String]) -> Result<Vec<NetworkEndpoint>, PolicyError> {
    if raw.len() > MAX_PATHS {
        return Err(PolicyError::TooManyPaths("limits.allow_network"));
    }
    raw.iter()
        .map(|entry| {
            let bad = |why: String| PolicyError::NetworkCeiling {
                entry: entry.clone(),
                why,
            };
            let e = NetworkEndpoint::parse(entry).map_err(|e| bad(e.to_string()))?;
            match e.host {
                EndpointHost::Net(_) => Ok(e),
                EndpointHost::Name(_) => Err(bad(
                    "a ceiling names addresses or blocks, not host names".into(),
                )),
            }
        })
        .collect()
}

fn parse_paths(key: &'static str, raw: &[String]) -> Result<Vec<ScopePath>, PolicyError> {
    if raw.len() > MAX_PATHS {
        return Err(PolicyError::TooManyPaths(key));
    }
    let mut out: Vec<ScopePath> = raw
        .iter()
        .map(|p| ScopePath::parse(p).map_err(|source| PolicyError::Path { key, source }))
        .collect::<Result<_, _>>()?;
    out.sort();
    out.dedup();
    Ok(out)
}

/// The resolved forms of a path that differ from it (at most one; a `Vec`
/// so callers can chain). A path that resolves to `/` or cannot be resolved
/// is represented by the special forms in [`ResolvedPath`] only at check time.
fn resolved_forms(path: &ScopePath) -> Vec<ScopePath> {
    resolved_forms_with(path, &mut Lookups::default())
}

/// [`resolved_forms`], sharing `lookups` with other paths resolved at the
/// same moment.
fn resolved_forms_with(path: &ScopePath, lookups: &mut Lookups) -> Vec<ScopePath> {
    match resolve_symlinks_with(path, lookups) {
        ResolvedPath::Path(r) if &r != path => vec![r],
        _ => Vec::new(),
    }
}

/// What each path looked at during one resolution pass turned out to be.
/// The protected paths share most of their ancestors (a dozen unit
/// directories under `/etc/systemd`, `/run/systemd` and `/usr/lib/systemd`,
/// say), and each look is an `lstat` of the whole path: a pass over all of
/// them asks each ancestor once instead of once per descendant. Lives for
/// one pass only: what it remembers is "now".
#[derive(Debug, Default)]
struct Lookups(std::collections::HashMap<PathBuf, Lookup>);

#[derive(Debug, Clone)]
enum Lookup {
    /// A symlink, with its target.
    Symlink(PathBuf),
    /// A symlink whose target cannot be read.
    UnreadableSymlink,
    /// Anything else: exists, does not exist yet, or cannot be inspected.
    Other,
}

impl Lookups {
    fn look(&mut self, candidate: &Path) -> Lookup {
        if let Some(l) = self.0.get(candidate) {
            return l.clone();
        }
        let l = match std::fs::symlink_metadata(candidate) {
            Ok(m) if m.file_type().is_symlink() => match std::fs::read_link(candidate) {
                Ok(target) => Lookup::Symlink(target),
                Err(_) => Lookup::UnreadableSymlink,
            },
            _ => Lookup::Other,
        };
        self.0.insert(candidate.to_path_buf(), l.clone());
        l
    }
}

/// What a path means once every symlink along it is followed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolvedPath {
    Path(ScopePath),
    /// It resolves to the filesystem root, which contains everything.
    Root,
    /// Too many symlinks, or a target that is not valid UTF-8: we cannot
    /// say what it means, so checks treat it as overlapping everything.
    Unresolvable,
}

/// Follow every symlink along `path`, component by component, like the
/// kernel does at lookup time; components that do not exist (yet) are kept
/// as written. The result is what a Landlock rule created now would cover.
///
/// Hand-written rather than `std::fs::canonicalize`, which fails on
/// non-existent paths — and the interesting case is exactly a bundle scope
/// that will be created beneath a symlinked directory, or a dangling
/// symlink whose target the bundle could create.
pub fn resolve_symlinks(path: &ScopePath) -> ResolvedPath {
    resolve_symlinks_with(path, &mut Lookups::default())
}

fn resolve_symlinks_with(path: &ScopePath, lookups: &mut Lookups) -> ResolvedPath {
    resolve_path_noting(path.as_path(), lookups, &mut Vec::new())
}

/// [`resolve_symlinks_with`] for any absolute path, noting in `met` every
/// symlink it follows (as the path it was found at).
fn resolve_path_noting(path: &Path, lookups: &mut Lookups, met: &mut Vec<PathBuf>) -> ResolvedPath {
    use std::collections::VecDeque;
    use std::ffi::OsString;
    use std::path::Component;

    fn push_components(front: &mut VecDeque<OsString>, p: &Path) {
        let comps: Vec<OsString> = p
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.to_os_string()),
                Component::ParentDir => Some(OsString::from("..")),
                _ => None,
            })
            .collect();
        for c in comps.into_iter().rev() {
            front.push_front(c);
        }
    }

    let mut pending = VecDeque::new();
    push_components(&mut pending, path);
    let mut resolved = PathBuf::from("/");
    let mut hops = 0;
    while let Some(c) = pending.pop_front() {
        if c == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved.join(&c);
        match lookups.look(&candidate) {
            Lookup::Symlink(target) => {
                met.push(candidate);
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return ResolvedPath::Unresolvable;
                }
                if target.is_absolute() {
                    resolved = PathBuf::from("/");
                }
                push_components(&mut pending, &target);
            }
            Lookup::UnreadableSymlink => return ResolvedPath::Unresolvable,
            // Exists, does not exist yet, or cannot be inspected: as written.
            Lookup::Other => resolved = candidate,
        }
    }
    if resolved == Path::new("/") {
        return ResolvedPath::Root;
    }
    match resolved.to_str().map(ScopePath::parse) {
        Some(Ok(p)) => ResolvedPath::Path(p),
        _ => ResolvedPath::Unresolvable,
    }
}

#[cfg(test)]
mod tests;
