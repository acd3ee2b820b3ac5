//! The agent's one connection to the controller: TCP + rustls (aws-lc-rs,
//! TLS 1.3, client certificate) + HTTP/2. Every request of a session is a
//! stream on that connection; the order stream is one of them.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http2;
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;

use super::config::ControllerSection;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{path}: {message}")]
    Credentials { path: String, message: String },
    #[error("controller url {0:?} is invalid: use https://HOST[:PORT]")]
    BadUrl(String),
    #[error(transparent)]
    Tls(#[from] rustls::Error),
    #[error("cannot connect to {addr}: {error}")]
    Connect { addr: String, error: std::io::Error },
    #[error("connecting to {0} timed out")]
    Timeout(String),
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error("request: {0}")]
    Request(String),
    #[error("controller answered {status}: {body}")]
    Status { status: StatusCode, body: String },
}

fn load_certs(
    path: &std::path::Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, TransportError> {
    let bad = |message: String| TransportError::Credentials {
        path: path.display().to_string(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut bytes.as_slice())
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(bad("no PEM certificate".into()));
    }
    Ok(certs)
}

/// What is needed to open sessions; built once from the policy.
pub struct Transport {
    tls: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
    addr: String,
    base: String,
}

impl Transport {
    pub fn new(section: &ControllerSection) -> Result<Self, TransportError> {
        let uri: Uri = section
            .url
            .parse()
            .map_err(|_| TransportError::BadUrl(section.url.clone()))?;
        if uri.scheme_str() != Some("https") || uri.path() != "/" && !uri.path().is_empty() {
            return Err(TransportError::BadUrl(section.url.clone()));
        }
        let host = uri
            .host()
            .ok_or_else(|| TransportError::BadUrl(section.url.clone()))?;
        let port = uri.port_u16().unwrap_or(443);
        let bare_host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let server_name = ServerName::try_from(bare_host.clone())
            .map_err(|_| TransportError::BadUrl(section.url.clone()))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in load_certs(&section.ca)? {
            roots.add(c)?;
        }
        let key_bytes = std::fs::read(&section.key).map_err(|e| TransportError::Credentials {
            path: section.key.display().to_string(),
            message: e.to_string(),
        })?;
        let key = rustls_pemfile::private_key(&mut key_bytes.as_slice())
            .ok()
            .flatten()
            .ok_or_else(|| TransportError::Credentials {
                path: section.key.display().to_string(),
                message: "no PEM private key".into(),
            })?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(load_certs(&section.cert)?, key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let authority = if bare_host.contains(':') {
            format!("[{bare_host}]:{port}")
        } else {
            format!("{bare_host}:{port}")
        };
        Ok(Transport {
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name,
            addr: authority.clone(),
            base: format!("https://{authority}"),
        })
    }

    /// Open a session: one TLS connection carrying HTTP/2.
    pub async fn connect(&self) -> Result<Session, TransportError> {
        let connect = async {
            let tcp = tokio::net::TcpStream::connect(&self.addr)
                .await
                .map_err(|source| TransportError::Connect {
                    addr: self.addr.clone(),
                    error: source,
                })?;
            let _ = tcp.set_nodelay(true);
            let tls = self
                .tls
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|source| TransportError::Connect {
                    addr: self.addr.clone(),
                    error: source,
                })?;
            let mut builder = http2::Builder::new(TokioExecutor::new());
            // HTTP/2 pings notice a dead peer even when no order is due.
            builder
                .timer(TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(20));
            let (sender, conn) = builder.handshake(TokioIo::new(tls)).await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "controller connection ended");
                }
            });
            Ok::<_, TransportError>(sender)
        };
        let sender = tokio::time::timeout(Duration::from_secs(15), connect)
            .await
            .map_err(|_| TransportError::Timeout(self.addr.clone()))??;
        Ok(Session {
            sender,
            base: self.base.clone(),
        })
    }
}

/// One HTTP/2 connection; clones share it.
#[derive(Clone)]
pub struct Session {
    sender: http2::SendRequest<Full<Bytes>>,
    base: String,
}

impl Session {
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, TransportError> {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if body.is_some() {
            builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| TransportError::Request(e.to_string()))?;
        let mut sender = self.sender.clone();
        sender.ready().await?;
        Ok(sender.send_request(req).await?)
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
            .map_err(|e| TransportError::Request(format!("reading the answer: {e}")))?
            .to_bytes();
        if !status.is_success() {
            let body = String::from_utf8_lossy(&bytes[..bytes.len().min(1024)]).into_owned();
            return Err(TransportError::Status { status, body });
        }
        Ok(bytes)
    }
}
