//! `~/.config/rollguard/cli.toml`, the operator CLI's configuration.
//!
//! Relative paths are resolved against the directory of the file, so a CA
//! directory can be moved as a whole. Unknown keys are errors.

use std::path::{Path, PathBuf};

use rollguard_shared::tls_client::ControllerUrls;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum CliConfigError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// `~/.config/rollguard/cli.toml`: where the controller is and which
/// operator certificate to use.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CliConfig {
    /// One URL, or the replicas' (`["https://c1:8443", "https://c2:8443"]`).
    pub url: Option<ControllerUrls>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl CliConfig {
    /// The default location, if `$HOME` is known.
    pub fn default_path() -> Option<PathBuf> {
        if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|x| !x.is_empty()) {
            return Some(PathBuf::from(x).join("rollguard/cli.toml"));
        }
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/rollguard/cli.toml"))
    }

    /// Load a file; a missing default file is an empty configuration.
    pub fn load(path: &Path, must_exist: bool) -> Result<Self, CliConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
                return Ok(Self::default())
            }
            Err(source) => {
                return Err(CliConfigError::Io {
                    path: path.to_path_buf(),
                    error: source,
                })
            }
        };
        let mut c: CliConfig = toml::from_str(&text).map_err(|e| CliConfigError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut c.ca, &mut c.cert, &mut c.key].into_iter().flatten() {
            *p = resolve(base, p);
        }
        Ok(c)
    }
}
