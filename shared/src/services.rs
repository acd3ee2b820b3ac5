//! Service actions: the systemd units a bundle asks the agent to reload or
//! restart, the requests its maintainer scripts made inside the sandbox, and
//! what the agent did about each.
//!
//! The bundle never talks to systemd itself: its sandbox has no `AF_UNIX`
//! and a private `/run`. It *declares* actions (`[services]` in the
//! manifest) and its package scripts' requests are *captured*; the agent
//! then performs the ones the host's `[services] allow` list permits, over
//! systemd's D-Bus API, after the run succeeded.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The agent's own systemd unit.
pub const AGENT_UNIT: &str = "rollguard-agent.service";

/// The `[Install]` keys whose values `systemctl enable` turns into links,
/// with the suffix of the directory (`TARGET.wants`...) each goes in.
pub const ENABLEMENT_DIRS: [(&str, &str); 3] = [
    ("WantedBy", ".wants"),
    ("RequiredBy", ".requires"),
    ("UpheldBy", ".upholds"),
];

/// Longest unit name systemd accepts (`UNIT_NAME_MAX`).
const UNIT_NAME_MAX: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitNameError {
    #[error("unit name {0:?} is invalid: use a systemd unit name such as \"postfix.service\" ([A-Za-z0-9:_.\\\\@-], at most {UNIT_NAME_MAX} bytes, with a unit type suffix)")]
    Invalid(String),
}

/// A systemd unit name, checked against systemd's own grammar
/// (`unit_name_is_valid`): a name, an optional `@instance`, and a type
/// suffix. Only `.service` units can be acted upon; other types parse so
/// that an error can say what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UnitName(String);

/// The unit types systemd knows, as the suffix of a unit's name.
pub const UNIT_TYPES: &[&str] = &[
    "service",
    "socket",
    "target",
    "timer",
    "path",
    "mount",
    "automount",
    "swap",
    "slice",
    "scope",
    "device",
];

impl UnitName {
    pub fn parse(raw: &str) -> Result<Self, UnitNameError> {
        let bad = || UnitNameError::Invalid(raw.to_string());
        if raw.is_empty() || raw.len() > UNIT_NAME_MAX {
            return Err(bad());
        }
        let (stem, suffix) = raw.rsplit_once('.').ok_or_else(bad)?;
        if !UNIT_TYPES.contains(&suffix) || stem.is_empty() {
            return Err(bad());
        }
        let ok = |c: char| c.is_ascii_alphanumeric() || ":_.\\-".contains(c);
        let (prefix, instance) = match stem.split_once('@') {
            Some((p, i)) => (p, Some(i)),
            None => (stem, None),
        };
        if prefix.is_empty() || !prefix.chars().all(ok) {
            return Err(bad());
        }
        if let Some(i) = instance {
            // A template ("foo@.service") cannot be started; an instance can.
            if i.is_empty() || !i.chars().all(ok) {
                return Err(bad());
            }
        }
        Ok(UnitName(raw.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True for `.service` units, the only type the broker acts upon.
    pub fn is_service(&self) -> bool {
        self.0.ends_with(".service")
    }
}

impl TryFrom<String> for UnitName {
    type Error = UnitNameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        UnitName::parse(&s)
    }
}

impl From<UnitName> for String {
    fn from(u: UnitName) -> String {
        u.0
    }
}

impl fmt::Display for UnitName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What may be done to a unit. Start and stop are deliberately absent: a
/// patch reloads or restarts what runs; it does not change what runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceAction {
    /// `ReloadUnit`: runs the unit's `ExecReload=`.
    Reload,
    /// `RestartUnit`: stops and starts the unit.
    Restart,
    /// `TryRestartUnit`: restarts the unit only if it is running
    /// (`systemctl try-restart`, `deb-systemd-invoke try-restart`).
    TryRestart,
}

impl ServiceAction {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceAction::Reload => "reload",
            ServiceAction::Restart => "restart",
            ServiceAction::TryRestart => "try_restart",
        }
    }
}

/// Where an action came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionSource {
    /// `[services] reload`/`restart` in the signed manifest.
    Declared,
    /// Requested inside the sandbox (policy-rc.d, systemctl, invoke-rc.d,
    /// deb-systemd-invoke, service) and captured, not performed.
    Captured,
    /// `restart_stale`: the unit still mapped a file the packages replaced.
    Stale,
}

/// One service request a program inside the sandbox made and the sandbox
/// captured instead of performing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapturedRequest {
    /// The unit as the program named it (normalised to `NAME.service` when
    /// it gave a bare name, as systemctl does).
    pub unit: String,
    /// The verb as the program spelled it (`restart`, `try-restart`,
    /// `reload`, `start`, `stop`, `daemon-reload`, ...).
    pub verb: String,
    /// Which shim caught it: `policy-rc.d`, `systemctl`, `invoke-rc.d`,
    /// `deb-systemd-invoke`, `service`.
    pub via: String,
    /// What the agent did with it: `performed`, `denied` (unit outside the
    /// host's allow list: an alert), `ignored` (a verb with no effect on
    /// running code, e.g. `enable`, `daemon-reload`; see docs), `skipped`
    /// (the agent performed nothing, or the unit is the agent's own), or
    /// `preview` (a preview, which performs nothing).
    pub disposition: String,
}

impl CapturedRequest {
    /// The unit is outside the host's allow list: an alert.
    pub fn is_denied(&self) -> bool {
        self.disposition == "denied"
    }
}

/// What the agent did to one unit, and what came of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceOutcome {
    pub unit: UnitName,
    pub action: ServiceAction,
    pub source: ActionSource,
    /// systemd's job result: `done`, `failed`, `timeout`, `canceled`,
    /// `dependency`, `skipped`, `invalid` (e.g. reloading a stopped unit);
    /// `timeout` also when the agent stopped waiting; or `error: ...` when
    /// the call itself failed (docs/services.md).
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub main_pid_before: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub main_pid_after: Option<u32>,
    pub duration_ms: u64,
    /// systemd reloaded its unit files before this action (`systemctl
    /// daemon-reload`), because the unit's file or a drop-in had changed
    /// on disk: a package replaced it (docs/services.md).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub daemon_reloaded: bool,
}

impl ServiceOutcome {
    /// The result of an action a preview run would have performed (it
    /// performed none).
    pub const PREVIEW: &'static str = "preview";

    pub fn succeeded(&self) -> bool {
        self.result == "done" || self.result == "skipped" || self.result == Self::PREVIEW
    }
}

/// A process that still maps a file the run's packages replaced or
/// deleted: it runs old code until restarted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaleService {
    /// The unit the process belongs to, from its cgroup; `None` for a
    /// process outside any service (a user session, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    pub pid: u32,
    pub exe: String,
    /// The replaced files it still maps.
    pub files: Vec<String>,
}

/// One action the agent is to perform after the run, and why: what the
/// broker (agent/src/services/) is handed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedAction {
    pub unit: UnitName,
    pub action: ServiceAction,
    pub source: ActionSource,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_names_follow_systemds_grammar() {
        for ok in [
            "postfix.service",
            "php8.2-fpm.service",
            "getty@tty1.service",
            "dev-sda1.device",
            "a:b_c\\x2d.service",
        ] {
            assert!(UnitName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "postfix",
            ".service",
            "getty@.service",
            "foo.exe",
            "a b.service",
            "../x.service",
            "x/y.service",
            &"a".repeat(300),
        ] {
            assert!(UnitName::parse(bad).is_err(), "{bad:?}");
        }
        assert!(UnitName::parse("x.service").unwrap().is_service());
        assert!(!UnitName::parse("x.socket").unwrap().is_service());
    }
}
