//! The one client side of the controller connection, for the agent's daemon
//! and the operator CLI: the controller URL, the rustls client configuration
//! (aws-lc-rs, TLS 1.3 only, the fleet CA as the only root, a client
//! certificate) and one HTTP/2 connection over it.
//!
//! Both sides used to parse the URL on their own and disagreed on whether a
//! path was allowed; one type now decides, and refuses anything it would
//! otherwise have to ignore (a path, a query, user information).

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http2;
use hyper::{Method, Request, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// How long opening a connection (TCP, TLS, HTTP/2 handshake) may take,
/// per controller URL.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a controller URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("controller url {url:?} is invalid: {reason} (use https://HOST[:PORT])")]
pub struct UrlError {
    url: String,
    reason: &'static str,
}

/// Where the controller is: `https://HOST[:PORT]`, nothing else. The API
/// paths are fixed (`/v1/...`), so a path prefix, a query or user
/// information could only be ignored: they are refused instead, so that the
/// operator learns the URL does not mean what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerUrl {
    /// Without brackets for IPv6 addresses.
    host: String,
    port: u16,
    server_name: ServerName<'static>,
}

impl ControllerUrl {
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let bad = |reason| UrlError {
            url: url.to_string(),
            reason,
        };
        // `Uri` drops a fragment silently.
        if url.contains('#') {
            return Err(bad("a fragment is not allowed"));
        }
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        match uri.scheme_str() {
            Some("https") => {}
            Some(_) => return Err(bad("the scheme must be https")),
            None => return Err(bad("no scheme")),
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("user information is not allowed"));
        }
        if !matches!(uri.path(), "" | "/") {
            return Err(bad("a path is not allowed"));
        }
        if uri.query().is_some() {
            return Err(bad("a query is not allowed"));
        }
        // `Authority::port` is None for a port that is not a u16 (":65536"),
        // which would silently mean 443: read the port text ourselves.
        let port_text = authority
            .as_str()
            .strip_prefix(authority.host())
            .ok_or_else(|| bad("not a URL"))?;
        let port = match port_text {
            "" => 443,
            _ => match port_text
                .strip_prefix(':')
                .filter(|d| d.bytes().all(|b| b.is_ascii_digit()))
                .map(str::parse::<u16>)
            {
                Some(Ok(0)) => return Err(bad("port 0")),
                Some(Ok(p)) => p,
                Some(Err(_)) | None => {
                    return Err(bad("the port must be a number from 1 to 65535"))
                }
            },
        };
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let server_name = ServerName::try_from(host.clone())
            .map_err(|_| bad("the host is neither a DNS name nor an IP address"))?;
        Ok(ControllerUrl {
            host,
            port,
            server_name,
        })
    }

    /// `HOST:PORT` (`[ADDR]:PORT` for IPv6), as `connect` dials it.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The name the server certificate must match.
    pub fn server_name(&self) -> &ServerName<'static> {
        &self.server_name
    }
}

/// The controller's replicas: one or more [`ControllerUrl`]s, tried in
/// order when connecting (never empty). Written `url = "https://c1:8443"`
/// or `url = ["https://c1:8443", "https://c2:8443"]` in a TOML file, and
/// comma-separated on a command line or in an environment variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerUrls(Vec<ControllerUrl>);

impl ControllerUrls {
    /// One URL, or several separated by commas.
    pub fn parse(text: &str) -> Result<Self, UrlError> {
        let items: Vec<String> = text.split(',').map(|u| u.trim().to_string()).collect();
        Self::from_list(&items)
    }

    pub fn from_list(items: &[String]) -> Result<Self, UrlError> {
        if items.is_empty() {
            return Err(UrlError {
                url: String::new(),
                reason: "no controller URL given",
            });
        }
        items
            .iter()
            .map(|u| ControllerUrl::parse(u))
            .collect::<Result<Vec<_>, _>>()
            .map(ControllerUrls)
    }

    pub fn as_slice(&self) -> &[ControllerUrl] {
        &self.0
    }
}

impl From<ControllerUrl> for ControllerUrls {
    fn from(url: ControllerUrl) -> Self {
        ControllerUrls(vec![url])
    }
}

impl fmt::Display for ControllerUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all: Vec<String> = self.0.iter().map(|u| u.to_string()).collect();
        f.write_str(&all.join(", "))
    }
}

impl<'de> serde::Deserialize<'de> for ControllerUrls {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        UrlSetting::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// `url` as a TOML file writes it: one string or an array of strings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(untagged)]
pub enum UrlSetting {
    One(String),
    Many(Vec<String>),
}

impl UrlSetting {
    pub fn parse(&self) -> Result<ControllerUrls, UrlError> {
        match self {
            UrlSetting::One(u) => ControllerUrls::parse(u),
            UrlSetting::Many(list) => ControllerUrls::from_list(list),
        }
    }
}

impl fmt::Display for ControllerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "https://{}", self.authority())
    }
}

impl std::str::FromStr for ControllerUrl {
    type Err = UrlError;
    fn from_str(s: &str) -> Result<Self, UrlError> {
        Self::parse(s)
    }
}

/// Reading certificates and keys, building the rustls configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{0}: no PEM certificate found")]
    NoCert(String),
    #[error("{0}: no PEM private key found")]
    NoKey(String),
    #[error("{path}: malformed PEM: {error}")]
    Pem {
        path: String,
        error: rustls::pki_types::pem::Error,
    },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// aws-lc-rs, the only crypto provider rollguard builds.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Io {
        path: path.display().to_string(),
        error,
    })
}

/// Every PEM certificate in a file; none is an error, and so is a
/// malformed PEM section (a truncated or corrupted file is not a smaller
/// trust store). PEM through rustls' own types (`PemObject`), not the
/// unmaintained `rustls-pemfile` (RUSTSEC-2025-0134).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let text = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::Pem {
            path: path.display().to_string(),
            error,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCert(path.display().to_string()));
    }
    Ok(certs)
}

/// The first PEM private key in a file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let text = read(path)?;
    match PrivateKeyDer::from_pem_slice(&text) {
        Ok(key) => Ok(key),
        Err(rustls::pki_types::pem::Error::NoItemsFound) => {
            Err(TlsError::NoKey(path.display().to_string()))
        }
        Err(error) => Err(TlsError::Pem {
            path: path.display().to_string(),
            error,
        }),
    }
}

/// A root store holding every certificate of the given files.
pub fn root_store(paths: &[&Path]) -> Result<rustls::RootCertStore, TlsError> {
    let mut store = rustls::RootCertStore::empty();
    for p in paths {
        for c in load_certs(p)? {
            store.add(c)?;
        }
    }
    Ok(store)
}

/// Trusts only `ca` (the fleet CA), presents `cert`; TLS 1.3, HTTP/2.
pub fn client_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(root_store(&[ca])?)
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A client that presents no certificate (diagnostics and tests: the
/// controller must refuse it during the handshake).
pub fn anonymous_client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(root_store(&[ca])?)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Opening a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to {addr}")]
    Tcp {
        addr: String,
        #[source]
        error: std::io::Error,
    },
    #[error("TLS with {addr}")]
    Tls {
        addr: String,
        #[source]
        error: std::io::Error,
    },
    #[error("HTTP/2 handshake with {addr}")]
    Handshake {
        addr: String,
        #[source]
        error: hyper::Error,
    },
    #[error("connecting to {0} timed out")]
    Timeout(String),
    /// Every replica failed; one line per URL.
    #[error("no controller replica answered: {}", .0.join("; "))]
    NoReplica(Vec<String>),
}

/// A request on an open session failed before an answer arrived.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("request {method} {path}: {message}")]
    Build {
        method: Method,
        path: String,
        message: String,
    },
    #[error("{method} {path}")]
    Send {
        method: Method,
        path: String,
        #[source]
        error: hyper::Error,
    },
}

/// HTTP/2 pings on an idle connection, so that a dead peer is noticed even
/// when no request is due. Only for a connection whose runtime keeps
/// running between requests (the agent's daemon, not the blocking CLI).
#[derive(Debug, Clone, Copy)]
pub struct KeepAlive {
    pub interval: Duration,
    pub timeout: Duration,
}

/// Everything needed to open connections to the controller's replicas.
#[derive(Clone)]
pub struct Connector {
    tls: tokio_rustls::TlsConnector,
    urls: ControllerUrls,
    /// Index of the URL that last answered: tried first next time, so a
    /// client stays with a live replica instead of probing a dead one first.
    preferred: Arc<std::sync::atomic::AtomicUsize>,
    keep_alive: Option<KeepAlive>,
}

impl Connector {
    pub fn new(urls: impl Into<ControllerUrls>, config: Arc<rustls::ClientConfig>) -> Self {
        Connector {
            tls: tokio_rustls::TlsConnector::from(config),
            urls: urls.into(),
            preferred: Arc::default(),
            keep_alive: None,
        }
    }

    pub fn keep_alive(mut self, keep_alive: KeepAlive) -> Self {
        self.keep_alive = Some(keep_alive);
        self
    }

    pub fn urls(&self) -> &ControllerUrls {
        &self.urls
    }

    /// One TLS connection carrying HTTP/2 to the first replica that
    /// answers, starting with the one that answered last; its driver is
    /// spawned on the current Tokio runtime. At most [`CONNECT_TIMEOUT`]
    /// per replica.
    pub async fn connect(&self) -> Result<Session, ConnectError> {
        use std::sync::atomic::Ordering;
        let urls = self.urls.as_slice();
        let first = self.preferred.load(Ordering::Relaxed) % urls.len();
        let mut failures = Vec::new();
        for i in (0..urls.len()).map(|k| (first + k) % urls.len()) {
            match self.connect_to(&urls[i]).await {
                Ok(session) => {
                    if i != first {
                        tracing::info!(controller = %urls[i], "connected to another controller replica");
                    }
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok(session);
                }
                Err(e) if urls.len() == 1 => return Err(e),
                Err(e) => {
                    tracing::debug!(controller = %urls[i], error = %e, "controller replica unreachable");
                    failures.push(format!("{}: {}", urls[i], error_chain(&e)));
                }
            }
        }
        Err(ConnectError::NoReplica(failures))
    }

    async fn connect_to(&self, url: &ControllerUrl) -> Result<Session, ConnectError> {
        let addr = url.authority();
        let connect = async {
            let tcp = tokio::net::TcpStream::connect(&addr)
                .await
                .map_err(|error| ConnectError::Tcp {
                    addr: addr.clone(),
                    error,
                })?;
            let _ = tcp.set_nodelay(true);
            let tls = self
                .tls
                .connect(url.server_name().clone(), tcp)
                .await
                .map_err(|error| ConnectError::Tls {
                    addr: addr.clone(),
                    error,
                })?;
            let mut builder = http2::Builder::new(TokioExecutor::new());
            if let Some(k) = self.keep_alive {
                builder
                    .timer(TokioTimer::new())
                    .keep_alive_interval(k.interval)
                    .keep_alive_timeout(k.timeout);
            }
            let (sender, conn) = builder
                .handshake(TokioIo::new(tls))
                .await
                .map_err(|error| ConnectError::Handshake {
                    addr: addr.clone(),
                    error,
                })?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "controller connection ended");
                }
            });
            Ok(sender)
        };
        let sender = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| ConnectError::Timeout(addr.clone()))??;
        Ok(Session {
            sender,
            base: url.to_string(),
        })
    }
}

/// One HTTP/2 connection to the controller; clones share it.
#[derive(Clone)]
pub struct Session {
    sender: http2::SendRequest<Full<Bytes>>,
    base: String,
}

impl Session {
    /// Send a request for `path` (`/v1/...`) with an optional body and its
    /// content type; the answer's body is the caller's to read.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<(Vec<u8>, &str)>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, RequestError> {
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(format!("{}{path}", self.base));
        let body = match body {
            Some((bytes, content_type)) => {
                builder = builder.header(hyper::header::CONTENT_TYPE, content_type);
                bytes
            }
            None => Vec::new(),
        };
        let req = builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| RequestError::Build {
                method: method.clone(),
                path: path.to_string(),
                message: e.to_string(),
            })?;
        let send = |error| RequestError::Send {
            method: method.clone(),
            path: path.to_string(),
            error,
        };
        let mut sender = self.sender.clone();
        sender.ready().await.map_err(send)?;
        sender.send_request(req).await.map_err(send)
    }
}

/// An error and its sources on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(url: &str) -> ControllerUrl {
        ControllerUrl::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    fn refused(url: &str, reason: &str) {
        let e = ControllerUrl::parse(url).expect_err(url).to_string();
        assert!(e.contains(reason), "{url}: {e}");
        assert!(e.contains("use https://HOST[:PORT]"), "{url}: {e}");
    }

    /// A damaged trust file is an error, never a smaller trust store.
    #[test]
    fn malformed_or_missing_pem_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let garbage = file(
            "garbage.pem",
            "-----BEGIN CERTIFICATE-----\n!!not base64!!\n-----END CERTIFICATE-----\n",
        );
        let truncated = file("truncated.pem", "-----BEGIN CERTIFICATE-----\nMIIB\n");
        let empty = file("empty.pem", "no PEM here\n");
        for p in [&garbage, &truncated] {
            assert!(
                matches!(load_certs(p), Err(TlsError::Pem { .. })),
                "{}",
                p.display()
            );
        }
        assert!(matches!(load_certs(&empty), Err(TlsError::NoCert(_))));
        assert!(matches!(load_key(&empty), Err(TlsError::NoKey(_))));
        assert!(matches!(
            load_key(&truncated.with_file_name("absent.pem")),
            Err(TlsError::Io { .. })
        ));
    }

    #[test]
    fn accepts_host_and_port() {
        let u = ok("https://controller.example:8443");
        assert_eq!((u.host(), u.port()), ("controller.example", 8443));
        assert_eq!(u.authority(), "controller.example:8443");
        assert_eq!(u.to_string(), "https://controller.example:8443");
        assert!(matches!(u.server_name(), ServerName::DnsName(_)));

        assert_eq!(ok("https://controller.example").port(), 443);
        assert_eq!(
            ok("https://controller.example/"),
            ok("https://controller.example:443")
        );

        let ip = ok("https://127.0.0.1:9443/");
        assert!(matches!(ip.server_name(), ServerName::IpAddress(_)));
        assert_eq!(ip.to_string(), "https://127.0.0.1:9443");

        let v6 = ok("https://[::1]:8443");
        assert_eq!(v6.host(), "::1");
        assert_eq!(v6.authority(), "[::1]:8443");
        assert!(matches!(v6.server_name(), ServerName::IpAddress(_)));
    }

    #[test]
    fn refuses_what_it_would_ignore() {
        refused(
            "https://controller.example:8443/rollguard",
            "a path is not allowed",
        );
        refused("https://controller.example/v1/", "a path is not allowed");
        refused("https://controller.example/?x=1", "a query is not allowed");
        refused("https://controller.example?x=1", "a query is not allowed");
        refused("https://op@controller.example", "user information");
        refused(
            "https://op:secret@controller.example:8443",
            "user information",
        );
    }

    #[test]
    fn refuses_other_schemes_and_no_host() {
        refused("http://controller.example:8443", "the scheme must be https");
        refused("ftp://controller.example", "the scheme must be https");
        refused("controller.example:8443", "");
        refused("/v1/agents", "");
        refused("", "not a URL");
        refused("https://", "");
        refused("https:///", "");
        refused("https://:8443", "");
    }

    #[test]
    fn refuses_bad_ports_and_hosts() {
        refused("https://controller.example:0", "port 0");
        refused("https://controller.example:65536", "from 1 to 65535");
        refused("https://controller.example:-1", "");
        refused("https://controller.example:port", "");
        refused("https://controller.example:", "from 1 to 65535");
        refused("https://controller.example:+443", "");
        refused("https://controller example", "");
        refused(
            "https://controller.example#frag",
            "a fragment is not allowed",
        );
        refused("https://controller.example/#", "a fragment is not allowed");
        refused("https://[::1", "");
        refused("https://-bad-.example!", "");
    }

    proptest::proptest! {
        /// Any input: a value or an error, never a panic.
        #[test]
        fn never_panics(s in "\\PC{0,64}") {
            let _ = ControllerUrl::parse(&s);
        }

        #[test]
        fn never_panics_on_url_like_input(s in "https://[a-z0-9:@/?#\\[\\]%.-]{0,40}") {
            if let Ok(u) = ControllerUrl::parse(&s) {
                // What parses prints as a URL that parses to the same value.
                proptest::prop_assert_eq!(ControllerUrl::parse(&u.to_string()), Ok(u));
            }
        }
    }

    #[test]
    fn replicas_are_one_url_or_several() {
        let one = ControllerUrls::parse("https://c1:8443").unwrap();
        assert_eq!(one.as_slice().len(), 1);
        let two = ControllerUrls::parse("https://c1:8443, https://c2:8443").unwrap();
        assert_eq!(two.to_string(), "https://c1:8443, https://c2:8443");
        let list: UrlSetting = toml::from_str::<std::collections::BTreeMap<String, UrlSetting>>(
            "url = [\"https://c1:8443\", \"https://c2\"]",
        )
        .unwrap()
        .remove("url")
        .unwrap();
        assert_eq!(list.parse().unwrap().as_slice()[1].port(), 443);
        for bad in ["", "https://c1:8443,", "https://c1, http://c2"] {
            assert!(ControllerUrls::parse(bad).is_err(), "{bad:?}");
        }
        assert!(UrlSetting::Many(vec![]).parse().is_err());
    }
}
