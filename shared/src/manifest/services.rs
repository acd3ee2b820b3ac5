//! `[services]` of the manifest: the reloads and restarts the agent is to
//! perform, outside the sandbox, after the command succeeded (docs/services.md).
//!
//! ```toml
//! [services]
//! reload  = ["postfix.service"]
//! restart = ["dovecot.service"]
//! restart_stale = true
//! ```
//!
//! Only `.service` units: `ReloadUnit`/`RestartUnit` accept other types,
//! but restarting a socket, timer or target acts on units the bundle did
//! not name, and the broker acts on services only. A unit may be listed in
//! one of the two lists, once: a unit in both would be restarted (the
//! stronger action), which the author should say plainly.

use serde::{Deserialize, Serialize};

use crate::services::UnitName;

/// Most units one list may name.
pub const MAX_SERVICE_UNITS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServicesError {
    #[error("services.{key}: {source}")]
    Unit {
        key: &'static str,
        source: crate::services::UnitNameError,
    },
    #[error(
        "services.{key}: {unit} is not a .service unit; only services are reloaded or restarted"
    )]
    NotAService { key: &'static str, unit: String },
    #[error("services.{key} lists {unit} twice")]
    Duplicate { key: &'static str, unit: String },
    #[error("{unit} is in both services.reload and services.restart; keep it in one (a restart makes the reload pointless)")]
    InBoth { unit: String },
    #[error("services.{0} has more than {MAX_SERVICE_UNITS} entries")]
    TooMany(&'static str),
}

/// The parsed `[services]` section; empty when absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Services {
    pub reload: Vec<UnitName>,
    pub restart: Vec<UnitName>,
    /// Also restart (try-restart) the allowed units still mapping files the
    /// run's packages replaced.
    pub restart_stale: bool,
}

impl Services {
    pub fn is_empty(&self) -> bool {
        self.reload.is_empty() && self.restart.is_empty() && !self.restart_stale
    }

    /// Every declared unit with the key that names it.
    pub fn declared(&self) -> impl Iterator<Item = (&'static str, &UnitName)> {
        self.reload
            .iter()
            .map(|u| ("reload", u))
            .chain(self.restart.iter().map(|u| ("restart", u)))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServices {
    #[serde(default)]
    reload: Vec<String>,
    #[serde(default)]
    restart: Vec<String>,
    #[serde(default)]
    restart_stale: bool,
}

impl RawServices {
    pub(super) fn parse(self) -> Result<Services, ServicesError> {
        let reload = units("reload", &self.reload)?;
        let restart = units("restart", &self.restart)?;
        if let Some(u) = reload.iter().find(|u| restart.contains(u)) {
            return Err(ServicesError::InBoth {
                unit: u.to_string(),
            });
        }
        Ok(Services {
            reload,
            restart,
            restart_stale: self.restart_stale,
        })
    }
}

fn units(key: &'static str, raw: &[String]) -> Result<Vec<UnitName>, ServicesError> {
    if raw.len() > MAX_SERVICE_UNITS {
        return Err(ServicesError::TooMany(key));
    }
    let mut out: Vec<UnitName> = Vec::with_capacity(raw.len());
    for r in raw {
        let unit = UnitName::parse(r).map_err(|source| ServicesError::Unit { key, source })?;
        if !unit.is_service() {
            return Err(ServicesError::NotAService {
                key,
                unit: r.clone(),
            });
        }
        if out.contains(&unit) {
            return Err(ServicesError::Duplicate {
                key,
                unit: r.clone(),
            });
        }
        out.push(unit);
    }
    Ok(out)
}
