//! The agent's one connection to the controller: TCP + rustls (aws-lc-rs,
//! TLS 1.3, client certificate) + HTTP/2, opened by the client shared with
//! the operator CLI (`rollguard_shared::tls_client`). Every request of a
//! session is a stream on that connection; the order stream is one of them.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::{Method, StatusCode};
use rollguard_shared::tls_client::{
    self, ConnectError, Connector, KeepAlive, RequestError, TlsError, UrlError,
};

use super::config::ControllerSection;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(transparent)]
    Credentials(#[from] TlsError),
    #[error(transparent)]
    BadUrl(#[from] UrlError),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("reading the answer: {0}")]
    Answer(String),
    #[error("controller answered {status}: {body}")]
    Status { status: StatusCode, body: String },
}

/// What is needed to open sessions; built once from the policy.
pub struct Transport {
    connector: Connector,
    section: ControllerSection,
}

impl Transport {
    pub fn new(section: &ControllerSection) -> Result<Self, TransportError> {
        // A renewal a crash interrupted is finished before the files are read.
        if let Err(e) = crate::enroll::finish_renewal(&section.cert, &section.key) {
            tracing::error!(
                error = format!("{e:#}"),
                "cannot finish an interrupted certificate renewal"
            );
        }
        let config = tls_client::client_config(&section.ca, &section.cert, &section.key)?;
        // HTTP/2 pings notice a dead peer (or replica) even when no order
        // is due; the next session then starts with the next replica.
        let connector = Connector::new(section.url.clone(), config).keep_alive(KeepAlive {
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(20),
        });
        Ok(Transport {
            connector,
            section: section.clone(),
        })
    }

    /// The `[controller]` section it was made from (where the certificate
    /// and key are, for renewal).
    pub fn section(&self) -> &ControllerSection {
        &self.section
    }

    /// Open a session: one TLS connection carrying HTTP/2.
    pub async fn connect(&self) -> Result<ControllerSession, TransportError> {
        Ok(ControllerSession {
            inner: self.connector.connect().await?,
        })
    }
}

/// One HTTP/2 connection; clones share it.
#[derive(Clone)]
pub struct ControllerSession {
    inner: tls_client::Session,
}

impl ControllerSession {
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, TransportError> {
        let body = body.map(|b| (b, "application/json"));
        Ok(self.inner.request(method, path, body).await?)
    }

    /// A request whose whole answer (at most `limit` bytes) is read; a
    /// non-2xx status is an error carrying the controller's message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<Bytes, TransportError> {
        let resp = self.request(method, path, body).await?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), limit)
            .collect()
            .await
            .map_err(|e| TransportError::Answer(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            let body = String::from_utf8_lossy(&bytes[..bytes.len().min(1024)]).into_owned();
            return Err(TransportError::Status { status, body });
        }
        Ok(bytes)
    }
}
