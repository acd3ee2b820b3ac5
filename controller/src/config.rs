//! `controller.toml`, the server's configuration (the operator CLI's
//! `cli.toml` is the `rollguard-cli` crate's).
//!
//! Relative paths are resolved against the directory of the file that names
//! them, so a CA directory can be moved as a whole. Unknown keys are errors.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::alertmanager_api::{AlertmanagerApi, ApiUrl};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawController {
    listen: String,
    tls: RawTls,
    #[serde(default)]
    storage: RawStorage,
    #[serde(default)]
    rollouts: RawRollouts,
    #[serde(default)]
    limits: RawControllerLimits,
    /// Absent: no alert gates (only the webhook halts rollouts).
    #[serde(default)]
    alertmanager: Option<RawAlertmanager>,
    #[serde(default)]
    notify: Vec<RawNotify>,
    /// Absent: no enrollment listener, no renewal (fail closed).
    #[serde(default)]
    enrollment: Option<RawEnrollment>,
}

/// `[enrollment]`: agents enroll with one-time tokens and renew.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnrollment {
    listen: String,
    agents_ca_key: PathBuf,
    #[serde(default = "default_enroll_ca")]
    ca: PathBuf,
    #[serde(default = "default_cert_lifetime")]
    cert_lifetime: String,
}

fn default_enroll_ca() -> PathBuf {
    "ca.crt".into()
}

fn default_cert_lifetime() -> String {
    "90d".into()
}

/// The parsed `[enrollment]` section.
#[derive(Debug, Clone)]
pub struct Enrollment {
    /// The server-auth-only listener serving `/v1/enroll*`.
    pub listen: SocketAddr,
    /// The agents' issuing CA key, to sign agents' signing requests.
    pub agents_ca_key: PathBuf,
    /// The fleet's root CA certificate, served at `/v1/enroll/ca` and
    /// returned with every certificate.
    pub ca: PathBuf,
    /// Validity of the certificates signed for signing requests.
    pub cert_lifetime: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlertmanager {
    url: String,
    #[serde(default = "default_am_timeout")]
    timeout: String,
}

fn default_am_timeout() -> String {
    "3s".into()
}

/// `[[notify]]`: where events are posted (`src/notify.rs`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    url: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    agents_ca: PathBuf,
    operators_ca: PathBuf,
    revoked: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
enum RawStorage {
    Sqlite { path: PathBuf },
    Postgres { url: String },
}

impl Default for RawStorage {
    fn default() -> Self {
        RawStorage::Sqlite {
            path: "controller.db".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRollouts {
    #[serde(default = "default_margin")]
    result_margin: String,
    #[serde(default = "default_kill_ack")]
    kill_ack_timeout: String,
}

impl Default for RawRollouts {
    fn default() -> Self {
        RawRollouts {
            result_margin: default_margin(),
            kill_ack_timeout: default_kill_ack(),
        }
    }
}

fn default_margin() -> String {
    "60s".into()
}
fn default_kill_ack() -> String {
    "3s".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControllerLimits {
    #[serde(default = "default_max_bundle")]
    max_bundle_bytes: u64,
}

impl Default for RawControllerLimits {
    fn default() -> Self {
        RawControllerLimits {
            max_bundle_bytes: default_max_bundle(),
        }
    }
}

fn default_max_bundle() -> u64 {
    256 * 1024 * 1024
}

#[derive(Debug, Clone)]
pub enum Storage {
    Sqlite(PathBuf),
    /// Replicas in high availability share one PostgreSQL database.
    Postgres(DatabaseUrl),
}

/// A `postgres://` URL (libpq's syntax), checked when the file is read so a
/// typo is a configuration error, not a failure at first use. Its `Debug`
/// hides the password: configurations end up in logs.
#[derive(Clone)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err("storage.url: a postgres:// URL is required".to_string());
        }
        url.parse::<sqlx::postgres::PgConnectOptions>()
            .map_err(|e| format!("storage.url: {e}"))?;
        Ok(DatabaseUrl(url.to_string()))
    }

    /// The URL with its password, for connecting only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // postgres://user:secret@host/db -> postgres://user:***@host/db
        let shown = match (self.0.find("://"), self.0.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                let userinfo = &self.0[scheme + 3..at];
                match userinfo.find(':') {
                    Some(colon) => format!(
                        "{}{}:***{}",
                        &self.0[..scheme + 3],
                        &userinfo[..colon],
                        &self.0[at..]
                    ),
                    None => self.0.clone(),
                }
            }
            _ => self.0.clone(),
        };
        f.debug_tuple("DatabaseUrl").field(&shown).finish()
    }
}

/// The parsed, resolved server configuration.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub agents_ca: PathBuf,
    pub operators_ca: PathBuf,
    pub revoked: PathBuf,
    pub storage: Storage,
    /// Added to a bundle's own timeout to get the per-host result deadline.
    pub result_margin: Duration,
    /// How long `kill` waits for agents to acknowledge before answering.
    pub kill_ack_timeout: Duration,
    pub max_bundle_bytes: u64,
    /// `[alertmanager]`: where to ask for active alerts before a rollout
    /// starts, resumes or dispatches a wave (None: no such checks).
    pub alertmanager: Option<AlertmanagerApi>,
    /// `[[notify]]` targets.
    pub notify: Vec<crate::notify::NotifyUrl>,
    /// `[enrollment]`, if enabled.
    pub enrollment: Option<Enrollment>,
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

impl ControllerConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            error: source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let raw: RawController = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let listen = raw
            .listen
            .parse()
            .map_err(|_| invalid(format!("listen {:?} is not ip:port", raw.listen)))?;
        let dur = |key: &str, v: &str| {
            humantime::parse_duration(v).map_err(|e| invalid(format!("rollouts.{key} {v:?}: {e}")))
        };
        let alertmanager = match &raw.alertmanager {
            None => None,
            Some(am) => {
                let timeout = humantime::parse_duration(&am.timeout)
                    .map_err(|e| invalid(format!("alertmanager.timeout {:?}: {e}", am.timeout)))?;
                if timeout.is_zero() || timeout > Duration::from_secs(60) {
                    return Err(invalid(format!(
                        "alertmanager.timeout {:?}: must be more than 0 and at most 60s",
                        am.timeout
                    )));
                }
                Some(AlertmanagerApi {
                    url: ApiUrl::parse(&am.url).map_err(|e| invalid(e.to_string()))?,
                    timeout,
                })
            }
        };
        let enrollment = match &raw.enrollment {
            None => None,
            Some(e) => {
                let lifetime = humantime::parse_duration(&e.cert_lifetime).map_err(|err| {
                    invalid(format!(
                        "enrollment.cert_lifetime {:?}: {err}",
                        e.cert_lifetime
                    ))
                })?;
                if lifetime < Duration::from_secs(10) || lifetime > Duration::from_secs(825 * 86400)
                {
                    return Err(invalid(format!(
                        "enrollment.cert_lifetime {:?}: must be between 10s and 825d",
                        e.cert_lifetime
                    )));
                }
                Some(Enrollment {
                    listen: e.listen.parse().map_err(|_| {
                        invalid(format!("enrollment.listen {:?} is not ip:port", e.listen))
                    })?,
                    agents_ca_key: resolve(base, &e.agents_ca_key),
                    ca: resolve(base, &e.ca),
                    cert_lifetime: lifetime,
                })
            }
        };
        Ok(ControllerConfig {
            enrollment,
            listen,
            cert: resolve(base, &raw.tls.cert),
            key: resolve(base, &raw.tls.key),
            agents_ca: resolve(base, &raw.tls.agents_ca),
            operators_ca: resolve(base, &raw.tls.operators_ca),
            revoked: resolve(base, &raw.tls.revoked),
            storage: match raw.storage {
                RawStorage::Sqlite { path } => Storage::Sqlite(resolve(base, &path)),
                RawStorage::Postgres { url } => {
                    Storage::Postgres(DatabaseUrl::parse(&url).map_err(invalid)?)
                }
            },
            result_margin: dur("result_margin", &raw.rollouts.result_margin)?,
            kill_ack_timeout: dur("kill_ack_timeout", &raw.rollouts.kill_ack_timeout)?,
            max_bundle_bytes: raw.limits.max_bundle_bytes,
            alertmanager,
            notify: raw
                .notify
                .iter()
                .map(|n| crate::notify::NotifyUrl::parse(&n.url).map_err(invalid))
                .collect::<Result<_, _>>()?,
        })
    }

    /// The file `rollguard-controller init` writes.
    pub fn commented_template(listen: &str) -> String {
        format!(
            r#"# rollguard controller configuration (written by `rollguard-controller init`).
# Relative paths are relative to this file's directory.

# Address of the HTTPS server (mutual TLS: agents and operators both present
# certificates issued by this directory's CAs).
listen = "{listen}"

[tls]
# The controller's server certificate (signed by ca/root.crt, which agents
# and operators trust as `ca`).
cert = "server.crt"
key = "server.key"
# Client certificates are accepted only from these two issuing CAs; which one
# signed a certificate decides its role (agent or operator).
agents_ca = "ca/agents-ca.crt"
operators_ca = "ca/operators-ca.crt"
# Serial numbers refused even though their certificates verify
# (`rollguard-controller revoke NAME` appends to it; re-read while running).
revoked = "revoked.list"

[storage]
# Rollouts, dispatches, reports, kill orders and the operator log.
kind = "sqlite"
path = "controller.db"
# Replicas in high availability share one PostgreSQL database instead
# (the password may be given by PGPASSWORD or ~/.pgpass rather than here):
#   kind = "postgres"
#   url = "postgres://rollguard@db.example/rollguard"

[rollouts]
# A host that has not reported within the bundle's own timeout plus this
# margin counts as timed out, which halts its rollout.
result_margin = "60s"
# `rollguard kill` waits this long for agents to confirm their bundles are dead.
kill_ack_timeout = "3s"

[limits]
# Largest bundle an operator may upload.
max_bundle_bytes = 268435456

# Alert gates (optional): with this section, the controller asks
# Alertmanager's API for the active alerts (neither silenced nor inhibited)
# before it starts or resumes a rollout and before each wave. An alert
# matching the rollout's halt_on refuses the start or resume, or halts the
# rollout before the wave; so does an Alertmanager that cannot be asked or
# answers garbage (the alert state is unknown). Without it, only alerts
# posted to the webhook halt rollouts.
# [alertmanager]
# url = "http://127.0.0.1:9093"   # http://host[:port][/route-prefix]; plain HTTP only
# timeout = "3s"                  # per question, connecting included

# Events posted as JSON (rollout started, halted with its first denials,
# completed; kill issued, lifted), retried with backoff, never blocking a
# rollout. One table per target; http:// or https:// (system trust store).
# [[notify]]
# url = "https://chat.example.com/hooks/rollguard-TOKEN"

# Enrollment (optional): hosts generate their own key and get a certificate
# with a one-time token (`rollguard-controller token create --host NAME`,
# then `rollguard-agent enroll` on the host). With this section the
# controller serves `/v1/enroll` on a second address, server-authenticated
# TLS only (a host has no certificate yet), and signs agent certificates
# with the agents CA key below, which must then be on this machine (with
# replicas: on each replica serving enrollment). Without it, no such
# listener exists and certificates come only from `rollguard-controller
# enroll` (the key made centrally, e.g. for air-gapped hosts).
# [enrollment]
# listen = "0.0.0.0:8444"
# agents_ca_key = "ca/agents-ca.key"
# ca = "ca.crt"                  # the root CA, given to enrolling hosts
# cert_lifetime = "90d"          # agents renew at two thirds of it
"#
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_targets_are_parsed_and_strict() {
        let base = ControllerConfig::commented_template("127.0.0.1:9443");
        let parse = |extra: &str| {
            ControllerConfig::parse(&format!("{base}\n{extra}"), Path::new("/etc/rg/c.toml"))
        };
        let c = parse("[[notify]]\nurl = \"https://hooks.example/x\"\n[[notify]]\nurl = \"http://127.0.0.1:9/y\"\n").unwrap();
        assert_eq!(c.notify.len(), 2);
        assert!(parse("").unwrap().notify.is_empty());
        for bad in [
            "[[notify]]\nurl = \"ftp://x/\"\n",
            "[[notify]]\nurl = \"https://x/\"\nretries = 3\n",
            "[[notify]]\n",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn template_parses_and_resolves() {
        let text = ControllerConfig::commented_template("127.0.0.1:9443");
        let c = ControllerConfig::parse(&text, Path::new("/etc/rg/controller.toml")).unwrap();
        assert_eq!(c.listen.port(), 9443);
        assert_eq!(c.cert, PathBuf::from("/etc/rg/server.crt"));
        assert!(
            matches!(c.storage, Storage::Sqlite(ref p) if p == Path::new("/etc/rg/controller.db"))
        );
        assert_eq!(c.result_margin, Duration::from_secs(60));
    }

    #[test]
    fn alertmanager_section() {
        let base = ControllerConfig::commented_template("127.0.0.1:9443");
        let c = ControllerConfig::parse(&base, Path::new("/x/c.toml")).unwrap();
        assert_eq!(c.alertmanager, None);
        let text = format!("{base}\n[alertmanager]\nurl = \"http://127.0.0.1:9093\"\n");
        let c = ControllerConfig::parse(&text, Path::new("/x/c.toml")).unwrap();
        let am = c.alertmanager.unwrap();
        assert_eq!(am.url.as_str(), "http://127.0.0.1:9093");
        assert_eq!(am.timeout, Duration::from_secs(3));
        for bad in [
            "url = \"https://am:9093\"",
            "url = \"http://am:9093\"\ntimeout = \"0s\"",
            "url = \"http://am:9093\"\ntimeout = \"soon\"",
            "url = \"http://am:9093\"\nsurprise = 1",
            "timeout = \"3s\"",
        ] {
            let text = format!("{base}\n[alertmanager]\n{bad}\n");
            assert!(
                ControllerConfig::parse(&text, Path::new("/x/c.toml")).is_err(),
                "{bad}"
            );
        }
        // The commented examples in the template ([alertmanager] and
        // [[notify]]) are what one uncomments.
        let uncommented = base
            .replace("# [alertmanager]", "[alertmanager]")
            .replace("# [[notify]]", "[[notify]]")
            .replace("# url = ", "url = ")
            .replace("# timeout = ", "timeout = ");
        let c = ControllerConfig::parse(&uncommented, Path::new("/x/c.toml")).unwrap();
        assert!(c.alertmanager.is_some());
        assert_eq!(c.notify.len(), 1);
    }

    #[test]
    fn postgres_storage() {
        let base = ControllerConfig::commented_template("127.0.0.1:9443");
        let with = |storage: &str| {
            let text = base.replace("kind = \"sqlite\"\npath = \"controller.db\"", storage);
            assert_ne!(text, base);
            ControllerConfig::parse(&text, Path::new("/x/c.toml"))
        };
        let c = with("kind = \"postgres\"\nurl = \"postgres://rg:s3cret@db/rollguard\"").unwrap();
        let Storage::Postgres(url) = &c.storage else {
            panic!("{:?}", c.storage)
        };
        assert_eq!(url.expose(), "postgres://rg:s3cret@db/rollguard");
        let shown = format!("{:?}", c.storage);
        assert!(
            !shown.contains("s3cret") && shown.contains("rg:***@db"),
            "{shown}"
        );
        for bad in [
            "kind = \"postgres\"",
            "kind = \"postgres\"\nurl = \"mysql://db/x\"",
            "kind = \"postgres\"\nurl = \"postgres://db/x\"\npath = \"c.db\"",
            "kind = \"oracle\"\nurl = \"postgres://db/x\"",
        ] {
            assert!(with(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn enrollment_section() {
        let base = ControllerConfig::commented_template("127.0.0.1:9443");
        let c = ControllerConfig::parse(&base, Path::new("/x/c.toml")).unwrap();
        assert!(c.enrollment.is_none(), "absent: no enrollment listener");
        // The template's commented section is what one uncomments.
        let uncommented = base
            .replace("# [enrollment]", "[enrollment]")
            .replace("# listen = ", "listen = ")
            .replace("# agents_ca_key = ", "agents_ca_key = ")
            .replace("# ca = ", "ca = ")
            .replace("# cert_lifetime = ", "cert_lifetime = ");
        let c = ControllerConfig::parse(&uncommented, Path::new("/x/c.toml")).unwrap();
        let e = c.enrollment.unwrap();
        assert_eq!(e.listen.port(), 8444);
        assert_eq!(e.agents_ca_key, PathBuf::from("/x/ca/agents-ca.key"));
        assert_eq!(e.ca, PathBuf::from("/x/ca.crt"));
        assert_eq!(e.cert_lifetime, Duration::from_secs(90 * 86400));
        for bad in [
            "listen = \"0.0.0.0:8444\"",
            "agents_ca_key = \"k\"",
            "listen = \"nowhere\"\nagents_ca_key = \"k\"",
            "listen = \"0.0.0.0:8444\"\nagents_ca_key = \"k\"\ncert_lifetime = \"1s\"",
            "listen = \"0.0.0.0:8444\"\nagents_ca_key = \"k\"\ncert_lifetime = \"9000d\"",
            "listen = \"0.0.0.0:8444\"\nagents_ca_key = \"k\"\nsurprise = 1",
        ] {
            let text = format!("{base}\n[enrollment]\n{bad}\n");
            assert!(
                ControllerConfig::parse(&text, Path::new("/x/c.toml")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_errors() {
        let text = ControllerConfig::commented_template("127.0.0.1:9443") + "\nsurprise = 1\n";
        assert!(ControllerConfig::parse(&text, Path::new("/x/c.toml")).is_err());
        let bad_listen = ControllerConfig::commented_template("nowhere");
        assert!(ControllerConfig::parse(&bad_listen, Path::new("/x/c.toml")).is_err());
    }
}
