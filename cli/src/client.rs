//! The operator CLI's connection to the controller: mutual TLS with the
//! operator certificate, HTTP/2, blocking calls (a private current-thread
//! runtime), JSON in and out.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::Method;
use rollguard_shared::protocol::ErrorBody;
use rollguard_shared::tls_client::{self, ConnectError, Connector, ControllerUrls, Session};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::config::CliConfig;

/// Where the controller is and which operator certificate to present:
/// flags, then environment, then `~/.config/rollguard/cli.toml`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// Controller URL, e.g. https://controller:8443; replicas separated by
    /// commas (tried in order until one answers).
    #[arg(long, env = "ROLLGUARD_URL")]
    pub url: Option<String>,
    /// The fleet CA certificate (ca.crt from `rollguard-controller init`).
    #[arg(long, env = "ROLLGUARD_CA")]
    pub ca: Option<PathBuf>,
    /// Operator certificate.
    #[arg(long, env = "ROLLGUARD_CERT")]
    pub cert: Option<PathBuf>,
    /// Operator private key.
    #[arg(long, env = "ROLLGUARD_KEY")]
    pub key: Option<PathBuf>,
    /// CLI configuration file (default ~/.config/rollguard/cli.toml).
    #[arg(long, env = "ROLLGUARD_CLI_CONFIG")]
    pub cli_config: Option<PathBuf>,
}

/// Largest answer the CLI reads.
const MAX_ANSWER: usize = 64 * 1024 * 1024;

pub struct Client {
    runtime: tokio::runtime::Runtime,
    session: Session,
}

impl ConnectArgs {
    /// The controller URLs and the TLS configuration with the operator
    /// certificate, from flags, environment and `cli.toml`.
    pub fn resolve(&self) -> Result<(ControllerUrls, std::sync::Arc<rustls::ClientConfig>)> {
        let args = self;
        let file = match &args.cli_config {
            Some(p) => CliConfig::load(p, true)?,
            None => match CliConfig::default_path() {
                Some(p) => CliConfig::load(&p, false)?,
                None => CliConfig::default(),
            },
        };
        let need = |flag: &str, v: Option<PathBuf>| {
            v.ok_or_else(|| {
                anyhow!(
                    "no {flag}: pass --{flag}, set ROLLGUARD_{}, or put it in cli.toml",
                    flag.to_uppercase()
                )
            })
        };
        let url = match (&args.url, file.url) {
            (Some(flag), _) => ControllerUrls::parse(flag)?,
            (None, Some(setting)) => setting,
            (None, None) => {
                bail!("no controller URL: pass --url, set ROLLGUARD_URL, or put url in cli.toml")
            }
        };
        let ca = need("ca", args.ca.clone().or(file.ca))?;
        let cert = need("cert", args.cert.clone().or(file.cert))?;
        let key = need("key", args.key.clone().or(file.key))?;
        Ok((url, tls_client::client_config(&ca, &cert, &key)?))
    }
}

impl Client {
    pub fn connect(args: &ConnectArgs) -> Result<Self> {
        let (url, config) = args.resolve()?;
        Self::open(url, config)
    }

    /// `url`: one controller URL, or replicas separated by commas.
    pub fn connect_with(url: &str, ca: &Path, cert: &Path, key: &Path) -> Result<Self> {
        let url = ControllerUrls::parse(url)?;
        Self::open(url, tls_client::client_config(ca, cert, key)?)
    }

    /// A client that presents no certificate (diagnostics and tests: the
    /// controller must refuse it during the handshake).
    pub fn connect_anonymous(url: &str, ca: &Path) -> Result<Self> {
        let url = ControllerUrls::parse(url)?;
        Self::open(url, tls_client::anonymous_client_config(ca)?)
    }

    fn open(url: ControllerUrls, config: std::sync::Arc<rustls::ClientConfig>) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // No HTTP/2 keep-alive pings: this runtime only runs while a call
        // blocks on it, so an idle CLI could not answer them.
        let connector = Connector::new(url, config);
        let session = runtime.block_on(connector.connect()).map_err(|e| match e {
            ConnectError::Handshake { .. } => {
                anyhow::Error::new(e).context("is the operator certificate accepted?")
            }
            e => e.into(),
        })?;
        Ok(Client { runtime, session })
    }

    fn call(&self, method: Method, path: &str, body: Option<(Vec<u8>, &str)>) -> Result<Bytes> {
        self.runtime.block_on(async {
            let resp = self.session.request(method.clone(), path, body).await?;
            let status = resp.status();
            let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| anyhow!("reading the answer to {method} {path}: {e}"))?
                .to_bytes();
            if !status.is_success() {
                let msg = ErrorBody::message_of(&bytes);
                bail!("controller refused {method} {path} ({status}): {msg}");
            }
            Ok(bytes)
        })
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let bytes = self.call(Method::GET, path, None)?;
        serde_json::from_slice(&bytes).with_context(|| format!("answer to GET {path}"))
    }

    pub fn get_text(&self, path: &str) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.call(Method::GET, path, None)?).into_owned())
    }

    pub fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let bytes = self.call(
            Method::POST,
            path,
            Some((serde_json::to_vec(body)?, "application/json")),
        )?;
        serde_json::from_slice(&bytes).with_context(|| format!("answer to POST {path}"))
    }

    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let bytes = self.call(Method::DELETE, path, None)?;
        serde_json::from_slice(&bytes).with_context(|| format!("answer to DELETE {path}"))
    }

    /// POST arbitrary bytes (tests of malformed and oversized bodies).
    pub fn post_raw(&self, path: &str, body: Vec<u8>) -> Result<Bytes> {
        self.call(Method::POST, path, Some((body, "application/json")))
    }

    pub fn put_bytes<T: DeserializeOwned>(&self, path: &str, body: Vec<u8>) -> Result<T> {
        let bytes = self.call(Method::PUT, path, Some((body, "application/octet-stream")))?;
        serde_json::from_slice(&bytes).with_context(|| format!("answer to PUT {path}"))
    }
}
