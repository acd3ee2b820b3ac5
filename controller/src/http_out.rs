//! The controller's outbound HTTP, in one place: Alertmanager's API
//! (`alertmanager_api`) and notification hooks (`notify`).
//!
//! One HTTP/1.1 request per connection over hyper's connection API, plain
//! or TLS (rustls with aws-lc-rs, the system's trust store): the controller
//! asks a question before a wave or posts an event a few times a minute, so
//! a pool would buy nothing and keep sockets open. The answer's body is
//! read up to a limit. Callers bound the whole exchange in time with
//! `tokio::time::timeout`; dropping the future also ends the connection
//! ([`AbortOnDrop`]), so a hung peer holds nothing.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Body;
use hyper_util::rt::TokioIo;

/// Where to connect: host (an IPv6 literal without brackets) and port, and
/// TLS with its configuration for `https`.
pub struct Peer<'a> {
    pub host: &'a str,
    pub port: u16,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// Why an exchange failed before an answer was read whole.
#[derive(Debug, thiserror::Error)]
pub enum HttpOutError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("reading the answer: {0}")]
    Body(String),
}

/// Send `request` on a new connection to `peer`; returns the answer's
/// status and its body, at most `limit` bytes (more is an error).
pub async fn exchange<B>(
    peer: &Peer<'_>,
    request: hyper::Request<B>,
    limit: usize,
) -> Result<(hyper::StatusCode, Bytes), HttpOutError>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect((peer.host, peer.port))
        .await
        .map_err(HttpOutError::Connect)?;
    let _ = tcp.set_nodelay(true);
    match &peer.tls {
        None => over(TokioIo::new(tcp), request, limit).await,
        Some(config) => {
            let name = rustls::pki_types::ServerName::try_from(peer.host.to_string())
                .map_err(|e| HttpOutError::Tls(format!("server name: {e}")))?;
            let stream = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| HttpOutError::Tls(e.to_string()))?;
            over(TokioIo::new(stream), request, limit).await
        }
    }
}

async fn over<T, B>(
    io: T,
    request: hyper::Request<B>,
    limit: usize,
) -> Result<(hyper::StatusCode, Bytes), HttpOutError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    let _conn = AbortOnDrop(tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "outbound HTTP connection");
        }
    }));
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = Limited::new(response.into_body(), limit)
        .collect()
        .await
        .map_err(|e| HttpOutError::Body(e.to_string()))?
        .to_bytes();
    Ok((status, body))
}

/// Aborts a task when its owner is dropped. Here: the connection task, when
/// the exchange is done or abandoned (a timeout drops the exchange's
/// future; without this the detached task would keep a hung connection
/// open).
pub(crate) struct AbortOnDrop<T>(pub(crate) tokio::task::JoinHandle<T>);
impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// TLS with the system's trust store (`ca-certificates`). Certificates it
/// cannot parse are skipped (the store is the distribution's, shared with
/// every program); none at all leaves https peers failing, each exchange
/// logged.
pub fn system_tls() -> Option<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!("system trust store: {e}");
    }
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        tracing::error!("no certificate in the system trust store: https peers will fail");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    match rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
    {
        Ok(b) => Some(Arc::new(
            b.with_root_certificates(roots).with_no_client_auth(),
        )),
        Err(e) => {
            tracing::error!("outbound TLS: {e}");
            None
        }
    }
}
