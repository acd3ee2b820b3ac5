//! The `[controller]` section of the host policy: where the controller is
//! and which certificate this host presents.
//!
//! ```toml
//! [controller]
//! url = "https://controller.example:8443"  # or the replicas: ["https://c1:8443", "https://c2:8443"]
//! ca = "/etc/rollguard/ca.crt"          # the fleet root CA (rollguard-controller init)
//! cert = "/etc/rollguard/agent.crt"     # rollguard-controller enroll HOSTNAME
//! key = "/etc/rollguard/agent.key"
//! ```

use std::path::{Path, PathBuf};

use rollguard_shared::tls_client::ControllerUrls;
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerSection {
    /// The controller, or its replicas in the order to try them.
    pub url: ControllerUrls,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerConfigError {
    #[error("{path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{0}: the policy has no [controller] section (url, ca, cert, key): `serve` needs one")]
    Missing(PathBuf),
}

impl ControllerSection {
    /// Read the `[controller]` table of a policy file. Only that table is
    /// interpreted here; the rest of the policy is `HostPolicy`'s business.
    pub fn from_policy_file(path: &Path) -> Result<Self, ControllerConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ControllerConfigError::Read {
            path: path.to_path_buf(),
            error: source,
        })?;
        Self::from_policy_text(&text, path)
    }

    pub fn from_policy_text(text: &str, path: &Path) -> Result<Self, ControllerConfigError> {
        let invalid = |message: String| ControllerConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let table: toml::Table = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let section = table
            .get("controller")
            .ok_or_else(|| ControllerConfigError::Missing(path.to_path_buf()))?;
        let section: ControllerSection = section
            .clone()
            .try_into()
            .map_err(|e: toml::de::Error| invalid(format!("[controller]: {e}")))?;
        section
            .validate()
            .map_err(|e| invalid(format!("[controller]: {e}")))?;
        Ok(section)
    }

    /// The checks `HostPolicy` applies when it parses `[controller]`.
    pub fn validate(&self) -> Result<(), String> {
        for (key, p) in [("ca", &self.ca), ("cert", &self.cert), ("key", &self.key)] {
            if !p.is_absolute() {
                return Err(format!("{key} {p:?} must be an absolute path"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_the_controller_table() {
        let text = r#"
[host]
name = "web-1"
[controller]
url = "https://127.0.0.1:8443"
ca = "/etc/rollguard/ca.crt"
cert = "/etc/rollguard/agent.crt"
key = "/etc/rollguard/agent.key"
"#;
        let c = ControllerSection::from_policy_text(text, Path::new("p.toml")).unwrap();
        assert_eq!(c.url.to_string(), "https://127.0.0.1:8443");
        let two = text.replace(
            "url = \"https://127.0.0.1:8443\"",
            "url = [\"https://c1:8443\", \"https://c2:8443\"]",
        );
        let c = ControllerSection::from_policy_text(&two, Path::new("p.toml")).unwrap();
        assert_eq!(c.url.as_slice().len(), 2);
        let none = text.replace("url = \"https://127.0.0.1:8443\"", "url = []");
        assert!(ControllerSection::from_policy_text(&none, Path::new("p.toml")).is_err());
        let missing =
            ControllerSection::from_policy_text("[host]\nname='x'\n", Path::new("p.toml"));
        assert!(matches!(missing, Err(ControllerConfigError::Missing(_))));
        let extra = text.replace("[controller]\n", "[controller]\nsurprise = 1\n");
        assert!(ControllerSection::from_policy_text(&extra, Path::new("p.toml")).is_err());
        let plain = text.replace("https://", "http://");
        assert!(ControllerSection::from_policy_text(&plain, Path::new("p.toml")).is_err());
        let relative = text.replace("/etc/rollguard/ca.crt", "ca.crt");
        assert!(ControllerSection::from_policy_text(&relative, Path::new("p.toml")).is_err());
    }
}
