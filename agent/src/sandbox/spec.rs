//! What one confined run is allowed to do: the contract between the agent
//! and stage 2, written as JSON into the run directory.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use rollguard_shared::endpoint::{IpNet, Protocol};
use rollguard_shared::manifest::Scope;
use rollguard_shared::path::ScopePath;
use serde::{Deserialize, Serialize};

use super::limits::{LimitsError, RunLimits};

/// Oldest Landlock ABI we run under: ABI 3 adds `LANDLOCK_ACCESS_FS_TRUNCATE`,
/// without which a read-only file could still be emptied with `O_TRUNC`.
pub const MIN_LANDLOCK_ABI: u32 = 3;
/// Landlock ABI that can filter TCP by port (needed for a network scope).
pub const NETWORK_LANDLOCK_ABI: u32 = 4;

const MAX_RUN_ID: usize = 64;
const MAX_ENV_VARS: usize = 64;
const MAX_ENV_VALUE: usize = 4096;
/// Variables the sandbox sets beyond `ROLLGUARD_*`, each only with exactly
/// this value: a package install's debconf never prompts (there is no one
/// to answer). Nothing else, so no variable can change what a program
/// loads (`LD_PRELOAD`, `PATH`, ...).
pub const FIXED_ENV: [(&str, &str); 1] = [("DEBIAN_FRONTEND", "noninteractive")];
const MAX_PROTECTED: usize = 1024;
/// Most network rules in one run (every address a name resolved to is one).
pub const MAX_NET_RULES: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("run id {0:?} is invalid: use 1-64 characters of [A-Za-z0-9_-]")]
    BadRunId(String),
    #[error("{what} {path:?} must be an absolute path without '.' or '..' components")]
    BadPath { what: &'static str, path: PathBuf },
    #[error("the command is empty or has an argument with a NUL byte")]
    BadCommand,
    #[error("environment variable {0:?} is not allowed: extra variables must match ROLLGUARD_[A-Z0-9_]+ and have no NUL byte")]
    BadEnv(String),
    #[error("too many {0}")]
    TooMany(&'static str),
    #[error("landlock minimum ABI {0} is below the supported floor of {MIN_LANDLOCK_ABI}")]
    AbiTooLow(u32),
    #[error("resource limits: {0}")]
    Limits(#[from] LimitsError),
    #[error("network rule with port 0")]
    PortZero,
    #[error("pinned path {0:?} lies in no write or delete scope")]
    PinOutsideScopes(PathBuf),
}

/// One destination the kernel lets the run reach: a `scope.network` entry
/// with its name (if any) resolved. Enforced on address and port by the
/// run cgroup's BPF programs ([`super::net_filter`]); TCP ports also by
/// Landlock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetRule {
    pub protocol: Protocol,
    pub net: IpNet,
    pub port: u16,
}

/// The bundle's scope, in the form stage 2 needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxScope {
    /// Create, modify, truncate beneath these.
    pub write: Vec<ScopePath>,
    /// Unlink, rmdir, rename-away beneath these.
    pub delete: Vec<ScopePath>,
    /// When non-empty, reads are confined to these plus system directories.
    pub read: Vec<ScopePath>,
    /// Allowed destinations; empty means a private network namespace with
    /// only `lo`.
    pub network: Vec<NetRule>,
}

impl SandboxScope {
    /// The manifest's paths with `network`, the manifest's network scope
    /// as resolved for this run ([`super::net_scope::resolve`]).
    pub fn new(scope: &Scope, network: Vec<NetRule>) -> Self {
        SandboxScope {
            write: scope.write.clone(),
            delete: scope.delete.clone(),
            read: scope.read.clone(),
            network,
        }
    }

    /// TCP ports of the network rules, sorted, once each (Landlock's part).
    pub fn tcp_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .network
            .iter()
            .filter(|r| r.protocol == Protocol::Tcp)
            .map(|r| r.port)
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }
}

/// One confined run. The timeout is not here: it is enforced by the parent
/// ([`super::ConfinedChild::wait`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSpec {
    /// Names the run cgroup (`.../rollguard-runs/<run_id>`).
    pub run_id: String,
    /// The unpacked payload; readable and executable, and the working directory.
    pub payload_dir: PathBuf,
    /// Agent-owned directory for the plan, stdout/stderr and stage-2 status.
    /// Must not be writable by the bundle.
    pub run_dir: PathBuf,
    /// `command[0]` is absolute (`/bin/sh`) or a payload file (`./apply.sh`).
    pub command: Vec<String>,
    /// Extra environment (`ROLLGUARD_*`, and [`FIXED_ENV`] with its exact
    /// values) on top of the fixed clean set.
    pub env: BTreeMap<String, String>,
    pub scope: SandboxScope,
    /// Host-protected paths, canonicalized by the caller: nothing at all is
    /// granted on or beneath them (but READ_DIR with
    /// [`Self::list_every_directory`]; stage 2 covers them with empty
    /// read-only nodes either way, so a listing shows nothing).
    pub protected: Vec<PathBuf>,
    /// Protected paths bundles may read that lie inside a write or delete
    /// scope (the agent's programs, its unit, the loader's files...): bound
    /// read-only onto themselves ([`super::pins`]). A path of `protected`
    /// may lie inside such a scope only at or beneath one of these.
    #[serde(default)]
    pub pins: Vec<PathBuf>,
    /// Lowest Landlock ABI accepted (at least [`MIN_LANDLOCK_ABI`]).
    pub landlock_min_abi: u32,
    /// Resource limits of the run (the host's, or the bundle's within the
    /// host's ceiling).
    pub limits: RunLimits,
    /// A preview: each write/delete scope is an overlay whose upper layer
    /// is a private tmpfs ([`super::preview_layers`]); nothing reaches the
    /// disk.
    #[serde(default)]
    pub preview: bool,
    /// Directory listings everywhere: Landlock's READ_DIR on `/`, so the
    /// names in the ancestors of protected paths (`/`, `/etc`, `/var/lib`)
    /// can be listed; a protected path itself is covered by an empty
    /// read-only node and lists nothing, and no file's content becomes
    /// readable (READ_FILE still skips them). Only for an rpm install
    /// without a read scope: rpm 4.18 opens every directory from `/` down
    /// for reading and creates its files relative to those descriptors
    /// (see `packages::needs_directory_listings`). Ignored when
    /// `scope.read` is set: listing every directory of the host is more
    /// than a read scope says.
    #[serde(default)]
    pub list_every_directory: bool,
}

impl SandboxSpec {
    /// The Landlock ABI this spec needs: the floor, raised to 4 for TCP rules.
    pub fn required_landlock_abi(&self) -> u32 {
        let mut abi = self.landlock_min_abi.max(MIN_LANDLOCK_ABI);
        if !self.scope.network.is_empty() {
            abi = abi.max(NETWORK_LANDLOCK_ABI);
        }
        abi
    }

    /// Structural checks; both the parent and stage 2 run them.
    pub fn validate(&self) -> Result<(), SpecError> {
        let id_ok = !self.run_id.is_empty()
            && self.run_id.len() <= MAX_RUN_ID
            && self
                .run_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !id_ok {
            return Err(SpecError::BadRunId(self.run_id.clone()));
        }
        check_path("payload_dir", &self.payload_dir)?;
        check_path("run_dir", &self.run_dir)?;
        if self.protected.len() > MAX_PROTECTED {
            return Err(SpecError::TooMany("protected paths"));
        }
        for p in &self.protected {
            check_path("protected path", p)?;
        }
        if self.pins.len() > MAX_PROTECTED {
            return Err(SpecError::TooMany("pinned paths"));
        }
        for p in &self.pins {
            check_path("pinned path", p)?;
            if !self.changing_scopes().any(|s| p.starts_with(s) && p != s) {
                return Err(SpecError::PinOutsideScopes(p.clone()));
            }
        }
        if self.command.is_empty()
            || self.command[0].is_empty()
            || self.command.iter().any(|a| a.contains('\0'))
        {
            return Err(SpecError::BadCommand);
        }
        if self.env.len() > MAX_ENV_VARS {
            return Err(SpecError::TooMany("environment variables"));
        }
        for (key, value) in &self.env {
            let key_ok = key.len() > "ROLLGUARD_".len()
                && key.starts_with("ROLLGUARD_")
                && key
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
            let fixed = FIXED_ENV.contains(&(key.as_str(), value.as_str()));
            if !(key_ok || fixed) || value.contains('\0') || value.len() > MAX_ENV_VALUE {
                return Err(SpecError::BadEnv(key.clone()));
            }
        }
        if self.landlock_min_abi < MIN_LANDLOCK_ABI {
            return Err(SpecError::AbiTooLow(self.landlock_min_abi));
        }
        self.limits.validate()?;
        if self.scope.network.len() > MAX_NET_RULES {
            return Err(SpecError::TooMany("network rules"));
        }
        if self.scope.network.iter().any(|r| r.port == 0) {
            return Err(SpecError::PortZero);
        }
        Ok(())
    }

    /// The write and delete scopes.
    pub fn changing_scopes(&self) -> impl Iterator<Item = &Path> {
        self.scope
            .write
            .iter()
            .chain(&self.scope.delete)
            .map(|s| s.as_path())
    }

    /// Whether the protected path `protected` may lie inside the write or
    /// delete scope `scope`: strictly beneath it, and at or beneath a pin
    /// (read-only with it; its cover goes on top).
    pub fn pinned_within(&self, scope: &Path, protected: &Path) -> bool {
        protected != scope
            && protected.starts_with(scope)
            && self.pins.iter().any(|pin| protected.starts_with(pin))
    }

    /// The program to exec: absolute as given, or resolved in the payload.
    pub fn program(&self) -> PathBuf {
        let first = &self.command[0];
        if first.starts_with('/') {
            PathBuf::from(first)
        } else {
            self.payload_dir
                .join(first.strip_prefix("./").unwrap_or(first))
        }
    }
}

/// What the parent writes for stage 2: the spec plus where the parent put
/// the run cgroup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage2Plan {
    pub spec: SandboxSpec,
    pub cgroup_dir: PathBuf,
    /// Per-run cgroup v1 directories (pids, memory, cpu) stage 2 joins on
    /// hosts whose controllers live in v1 (see `cgroup_limits`).
    #[serde(default)]
    pub cgroup_v1_dirs: Vec<PathBuf>,
}

fn check_path(what: &'static str, path: &Path) -> Result<(), SpecError> {
    let ok = path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if ok {
        Ok(())
    } else {
        Err(SpecError::BadPath {
            what,
            path: path.to_path_buf(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SandboxSpec {
        SandboxSpec {
            run_id: "run-1".into(),
            payload_dir: "/var/lib/rollguard/runs/run-1/payload".into(),
            run_dir: "/var/lib/rollguard/runs/run-1".into(),
            command: vec!["./apply.sh".into()],
            env: BTreeMap::new(),
            scope: SandboxScope::default(),
            protected: vec!["/srv/backup".into()],
            pins: vec![],
            landlock_min_abi: MIN_LANDLOCK_ABI,
            limits: RunLimits::default(),
            preview: false,
            list_every_directory: false,
        }
    }

    #[test]
    fn accepts_a_plain_spec() {
        spec().validate().unwrap();
        assert_eq!(
            spec().program(),
            PathBuf::from("/var/lib/rollguard/runs/run-1/payload/apply.sh")
        );
    }

    #[test]
    fn rejects_bad_fields() {
        let mut s = spec();
        s.run_id = "../x".into();
        assert!(matches!(s.validate(), Err(SpecError::BadRunId(_))));
        let mut s = spec();
        s.protected = vec!["/srv/../etc".into()];
        assert!(matches!(s.validate(), Err(SpecError::BadPath { .. })));
        let mut s = spec();
        s.env.insert("LD_PRELOAD".into(), "/tmp/x.so".into());
        assert!(matches!(s.validate(), Err(SpecError::BadEnv(_))));
        // A fixed variable only with its value.
        let mut s = spec();
        s.env
            .insert("DEBIAN_FRONTEND".into(), "noninteractive".into());
        assert!(s.validate().is_ok());
        s.env.insert("DEBIAN_FRONTEND".into(), "dialog".into());
        assert!(matches!(s.validate(), Err(SpecError::BadEnv(_))));
        let mut s = spec();
        s.command = vec![];
        assert!(matches!(s.validate(), Err(SpecError::BadCommand)));
        let mut s = spec();
        s.landlock_min_abi = 2;
        assert!(matches!(s.validate(), Err(SpecError::AbiTooLow(2))));
    }

    #[test]
    fn network_raises_the_required_abi() {
        let mut s = spec();
        assert_eq!(s.required_landlock_abi(), 3);
        s.scope.network.push(NetRule {
            protocol: Protocol::Tcp,
            net: IpNet::parse("10.0.0.1").unwrap(),
            port: 443,
        });
        assert_eq!(s.required_landlock_abi(), 4);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let mut v = serde_json::to_value(spec()).unwrap();
        v.as_object_mut()
            .unwrap()
            .insert("timeout".into(), 5.into());
        assert!(serde_json::from_value::<SandboxSpec>(v).is_err());
    }
}
