//! Enrollment without copying keys: one-time tokens
//! (`rollguard-controller token create`), the enrollment listener
//! (`[enrollment] listen`: server-authenticated TLS only, since a host
//! enrolling has no certificate yet) and the signing of agents' certificate
//! signing requests, for enrollment and for renewal (`POST
//! /v1/agent/renew` on the main, mutual-TLS listener).
//!
//! Security rules kept here:
//! - a token is 32 random bytes from the OS; only its SHA-256 is stored;
//!   it is used by one conditional update (unused and unexpired), so it
//!   works once even with replicas sharing the database;
//! - the request's self-signature is verified (its sender holds the key)
//!   and only its public key is used: the certificate's name is the
//!   token's host (renewal: the caller's certificate's name), its role,
//!   usages and validity are the controller's;
//! - every certificate issued is recorded (serial, name, expiry) before it
//!   is returned, so `agents remove` and `revoke --config` revoke it by
//!   name, and every enrollment and renewal is in the operator log.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rollguard_shared::protocol::{EnrollRequest, EnrollResponse, ErrorBody, MAX_ENROLL_BODY};
use sha2::Digest;
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::config::Enrollment;
use crate::pki::{valid_cert_name, AgentSigner, Csr, Issued, PkiError};
use crate::store::{now_ms, Millis, Store, StoreError};

/// What every token starts with (so one is recognisable in a paste).
pub const TOKEN_PREFIX: &str = "rgt_";
/// The longest a token may live.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 86400);

/// A new token: [`TOKEN_PREFIX`] and 32 random bytes from the OS, hex.
pub fn new_token() -> String {
    use rand_core::RngCore;
    let mut bytes = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut bytes);
    format!("{TOKEN_PREFIX}{}", hex::encode(bytes))
}

/// What the database keeps of a token: SHA-256 of its text, hex.
pub fn token_hash(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

fn well_formed(token: &str) -> bool {
    token
        .strip_prefix(TOKEN_PREFIX)
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// Unknown, used or expired: one answer for all three, so a caller
    /// learns nothing about which tokens exist.
    #[error("enrollment token refused: unknown, already used, expired or made for another host")]
    Token,
    #[error("{0}")]
    BadRequest(String),
    #[error("the calling certificate has been revoked")]
    Revoked,
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl EnrollError {
    fn status(&self) -> StatusCode {
        match self {
            EnrollError::Token | EnrollError::Revoked => StatusCode::FORBIDDEN,
            EnrollError::BadRequest(_) => StatusCode::BAD_REQUEST,
            EnrollError::Pki(PkiError::BadCsr(_) | PkiError::BadName(_)) => StatusCode::BAD_REQUEST,
            EnrollError::Pki(_) | EnrollError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// `token create`: record a token for `host` valid for `ttl`; returns the
/// token (shown once, never stored) and when it expires.
pub async fn create_token(
    store: &dyn Store,
    host: &str,
    ttl: Duration,
) -> Result<(String, Millis), EnrollError> {
    if !valid_cert_name(host) {
        return Err(PkiError::BadName(host.to_string()).into());
    }
    if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
        return Err(EnrollError::BadRequest(
            "--ttl must be more than 0 and at most 30d".into(),
        ));
    }
    let token = new_token();
    let now = now_ms();
    let expires = now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
    store
        .create_enrollment_token(&token_hash(&token), host, now, expires)
        .await?;
    store
        .append_operator_log(
            "controller-cli",
            "token.create",
            &serde_json::json!({ "host": host, "expires_at": crate::store::rfc3339(expires) }),
        )
        .await?;
    Ok((token, expires))
}

/// Signs agents' requests; one per serving controller with `[enrollment]`.
pub struct Enroller {
    store: Arc<dyn Store>,
    signer: AgentSigner,
    ca_pem: String,
    lifetime: Duration,
}

impl Enroller {
    /// Load the agents CA key, refusing one that does not match
    /// `agents_ca` (the certificate the main listener trusts for agents).
    pub fn load(
        config: &Enrollment,
        agents_ca: &std::path::Path,
        store: Arc<dyn Store>,
    ) -> Result<Self, PkiError> {
        let signer = AgentSigner::load_matching(&config.agents_ca_key, agents_ca)?;
        let ca_pem = std::fs::read_to_string(&config.ca).map_err(|error| PkiError::Io {
            path: config.ca.clone(),
            error,
        })?;
        if crate::tls::load_certs(&config.ca)
            .map(|c| c.is_empty())
            .unwrap_or(true)
        {
            return Err(PkiError::BadPem(config.ca.clone()));
        }
        Ok(Enroller {
            store,
            signer,
            ca_pem,
            lifetime: config.cert_lifetime,
        })
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// `POST /v1/enroll`. The request is verified before the token is
    /// used, so a malformed request does not burn it.
    pub async fn enroll(&self, req: &EnrollRequest) -> Result<EnrollResponse, EnrollError> {
        if !well_formed(&req.token) {
            return Err(EnrollError::Token);
        }
        if !valid_cert_name(&req.name) {
            return Err(PkiError::BadName(req.name.clone()).into());
        }
        let csr = Csr::parse(&req.csr)?;
        let host = &req.name;
        if !self
            .store
            .consume_enrollment_token(&token_hash(&req.token), host, now_ms())
            .await?
        {
            return Err(EnrollError::Token);
        }
        self.issue(host, &csr, &format!("token:{host}"), "agent.enroll")
            .await
    }

    /// `POST /v1/agent/renew` by the agent `name` (its verified, unrevoked
    /// certificate's name and serial).
    ///
    /// A removal racing the renewal must not let the new certificate
    /// escape: the new serial is recorded first, then the caller's serial
    /// is looked up among the revoked ones; `Engine::remove_agent` revokes,
    /// then reads the recorded serials again. Whichever comes last sees the
    /// other's write, so either the removal revokes the new certificate or
    /// the renewal does.
    pub async fn renew(
        &self,
        name: &str,
        caller_serial: &str,
        csr_pem: &str,
    ) -> Result<EnrollResponse, EnrollError> {
        let csr = Csr::parse(csr_pem)?;
        let issued = self.sign_and_record(name, &csr).await?;
        let revoked = self.store.revoked_serials().await?;
        if revoked
            .iter()
            .any(|s| s.eq_ignore_ascii_case(caller_serial))
        {
            self.store
                .add_revocations(name, std::slice::from_ref(&issued.serial))
                .await?;
            return Err(EnrollError::Revoked);
        }
        self.log_issued(name, &issued, &format!("agent:{name}"), "agent.renew")
            .await
    }

    /// Revoke, in the database, every certificate issued to `name` here.
    pub async fn revoke_all_issued(&self, name: &str) -> Result<(), EnrollError> {
        let serials = self.store.issued_serials(name).await?;
        if !serials.is_empty() {
            self.store.add_revocations(name, &serials).await?;
        }
        Ok(())
    }

    async fn issue(
        &self,
        name: &str,
        csr: &Csr,
        actor: &str,
        action: &str,
    ) -> Result<EnrollResponse, EnrollError> {
        let issued = self.sign_and_record(name, csr).await?;
        self.log_issued(name, &issued, actor, action).await
    }

    async fn sign_and_record(&self, name: &str, csr: &Csr) -> Result<Issued, EnrollError> {
        let issued = self.signer.sign(name, csr, self.lifetime)?;
        // Recorded before it leaves: whatever is issued can be revoked.
        self.store
            .record_issued_cert(&issued.serial, name, issued.not_after)
            .await?;
        // A serial is the key's: a key already certified for another name
        // keeps that name's record, and this certificate would escape
        // revoking `name`. Never handed out.
        if !self
            .store
            .issued_serials(name)
            .await?
            .contains(&issued.serial)
        {
            return Err(EnrollError::BadRequest(format!(
                "this key is already certified for another name; {name} needs a key of its own"
            )));
        }
        Ok(issued)
    }

    async fn log_issued(
        &self,
        name: &str,
        issued: &Issued,
        actor: &str,
        action: &str,
    ) -> Result<EnrollResponse, EnrollError> {
        self.store
            .append_operator_log(
                actor,
                action,
                &serde_json::json!({
                    "agent": name,
                    "serial": issued.serial,
                    "not_after": crate::store::rfc3339(issued.not_after),
                }),
            )
            .await?;
        tracing::info!(agent = %name, serial = %issued.serial, %action, "agent certificate issued");
        Ok(EnrollResponse {
            cert: issued.cert_pem.clone(),
            ca: self.ca_pem.clone(),
        })
    }
}

pub(crate) fn error_response(status: StatusCode, message: String) -> Response {
    let body = serde_json::to_vec(&ErrorBody { error: message }).unwrap_or_default();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

pub(crate) fn enroll_error_response(e: EnrollError) -> Response {
    let status = e.status();
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        tracing::error!(error = %e, "enrollment failed");
        // The detail (database, files) is for the log, not for a caller
        // nobody has authenticated yet.
        return error_response(status, "internal error; see the controller's log".into());
    }
    tracing::warn!(error = %e, "enrollment refused");
    error_response(status, e.to_string())
}

/// Enrollment connections served at once; more are closed at accept.
const MAX_ENROLL_CONNECTIONS: usize = 64;
/// Of those, from one address: one client cannot hold them all idle and
/// keep every host from enrolling (many addresses still can; the listener
/// is for the fleet's network, not the internet). A quarter, so hosts
/// enrolling together from behind one NAT are not refused for it.
const MAX_ENROLL_CONNECTIONS_PER_SOURCE: usize = 16;

/// Connections open per source address, bounded.
#[derive(Clone)]
struct PerSource {
    open: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    max: usize,
}

/// One connection counted against its address until dropped.
struct SourceSlot {
    of: PerSource,
    ip: std::net::IpAddr,
}

impl PerSource {
    fn new(max: usize) -> Self {
        PerSource {
            open: Arc::default(),
            max,
        }
    }

    fn enter(&self, ip: std::net::IpAddr) -> Option<SourceSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            of: self.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = self.of.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

async fn get_ca(State(e): State<Arc<Enroller>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        e.ca_pem.clone(),
    )
        .into_response()
}

async fn post_enroll(State(e): State<Arc<Enroller>>, body: Bytes) -> Response {
    let req: EnrollRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(err) => {
            return error_response(StatusCode::BAD_REQUEST, format!("invalid JSON body: {err}"))
        }
    };
    match e.enroll(&req).await {
        Ok(resp) => match serde_json::to_vec(&resp) {
            Ok(b) => ([(header::CONTENT_TYPE, "application/json")], b).into_response(),
            Err(err) => error_response(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()),
        },
        Err(err) => enroll_error_response(err),
    }
}

async fn not_found() -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        "the enrollment listener serves only /v1/enroll and /v1/enroll/ca".into(),
    )
}

/// The enrollment listener's routes: nothing else is reachable on it.
pub fn router(enroller: Arc<Enroller>) -> Router {
    Router::new()
        .route("/v1/enroll/ca", get(get_ca))
        .route("/v1/enroll", post(post_enroll))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_ENROLL_BODY))
        .with_state(enroller)
}

/// The bound enrollment listener.
pub struct EnrollListener {
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    router: Router,
}

impl EnrollListener {
    pub async fn bind(
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        enroller: Arc<Enroller>,
    ) -> std::io::Result<Self> {
        Ok(EnrollListener {
            listener: TcpListener::bind(addr).await?,
            tls: tokio_rustls::TlsAcceptor::from(tls),
            router: router(enroller),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn run(self) {
        tracing::info!(addr = %self.listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "enrollment listening");
        let connections = Arc::new(tokio::sync::Semaphore::new(MAX_ENROLL_CONNECTIONS));
        let per_source = PerSource::new(MAX_ENROLL_CONNECTIONS_PER_SOURCE);
        loop {
            let (tcp, addr) = match self.listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed (enrollment)");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // A bounded number of enrollment connections at once: nobody
            // is authenticated here yet, so nobody gets to open thousands.
            let Some(from_source) = per_source.enter(addr.ip()) else {
                tracing::warn!(%addr, "too many enrollment connections from this address; refused");
                drop(tcp);
                continue;
            };
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                tracing::warn!(%addr, "too many enrollment connections; refused");
                drop(tcp);
                continue;
            };
            let tls = self.tls.clone();
            let router = self.router.clone();
            tokio::spawn(async move {
                let _permit = (permit, from_source);
                let stream =
                    match tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::info!(%addr, error = %e, "TLS handshake refused (enrollment)");
                            return;
                        }
                        Err(_) => return,
                    };
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let router = router.clone();
                        async move {
                            Ok::<_, Infallible>(
                                router
                                    .oneshot(req.map(Body::new))
                                    .await
                                    .unwrap_or_else(|e| match e {}),
                            )
                        }
                    });
                let mut builder =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                builder
                    .http2()
                    .max_concurrent_streams(4)
                    .max_header_list_size(16 * 1024);
                // An enrollment is a few requests: a connection lives at
                // most a minute.
                let serve = builder.serve_connection(TokioIo::new(stream), service);
                match tokio::time::timeout(Duration::from_secs(60), serve).await {
                    Ok(Err(e)) => tracing::debug!(%addr, error = %e, "enrollment connection ended"),
                    Err(_) => tracing::debug!(%addr, "enrollment connection timed out"),
                    Ok(Ok(())) => {}
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA directory, a SQLite store and an `[enrollment]` section, in `dir`.
    async fn enrollment_in(
        dir: &std::path::Path,
    ) -> (crate::pki::CaDir, Arc<dyn Store>, Enrollment) {
        let ca = crate::pki::CaDir::new(dir);
        crate::pki::init(&ca, &crate::pki::InitOptions::default()).unwrap();
        let store: Arc<dyn Store> = Arc::new(
            crate::store::sqlite::SqliteStore::open(&dir.join("c.db"))
                .await
                .unwrap(),
        );
        let config = Enrollment {
            listen: "127.0.0.1:0".parse().unwrap(),
            agents_ca_key: dir.join("ca/agents-ca.key"),
            ca: dir.join("ca.crt"),
            cert_lifetime: Duration::from_secs(3600),
        };
        (ca, store, config)
    }

    /// A signing request for a fresh key.
    fn new_csr() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap()
    }

    /// The enrollment listener serves its two endpoints and nothing else
    /// (no client certificate is asked for on it).
    #[tokio::test]
    async fn the_enrollment_listener_serves_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, store, config) = enrollment_in(dir.path()).await;
        // The operators CA's key is not the agents CA's.
        let wrong = Enrollment {
            agents_ca_key: dir.path().join("ca/operators-ca.key"),
            ..config.clone()
        };
        assert!(matches!(
            Enroller::load(&wrong, &ca.agents_ca_cert(), store.clone()),
            Err(PkiError::KeyMismatch(..))
        ));
        let app = router(Arc::new(
            Enroller::load(&config, &ca.agents_ca_cert(), store.clone()).unwrap(),
        ));
        let call = |method: &str, path: &str, body: &str| {
            let req = Request::builder()
                .method(method)
                .uri(path)
                .body(Body::from(body.to_string()))
                .unwrap();
            app.clone().oneshot(req)
        };
        let resp = call("GET", "/v1/enroll/ca", "").await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        for (method, path) in [
            ("GET", "/v1/agents"),
            ("POST", "/v1/agent/connect"),
            ("POST", "/v1/agent/renew"),
            ("GET", "/metrics"),
        ] {
            let resp = call(method, path, "{}").await.unwrap();
            assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{method} {path}");
        }
        // Unknown fields, garbage and oversized bodies are refused.
        let csr = new_csr();
        let (token, _) = create_token(store.as_ref(), "web-1", Duration::from_secs(60))
            .await
            .unwrap();
        let body = |extra: &str| {
            serde_json::json!({ "token": token, "name": "web-1", "csr": csr })
                .to_string()
                .replacen('{', &format!("{{{extra}"), 1)
        };
        for bad in [
            body("\"surprise\":1,"),
            "garbage".into(),
            "x".repeat(40_000),
        ] {
            let resp = call("POST", "/v1/enroll", &bad).await.unwrap();
            assert!(resp.status().is_client_error(), "{}", resp.status());
        }
        // None of that used the token up.
        let resp = call("POST", "/v1/enroll", &body("")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let resp = call("POST", "/v1/enroll", &body("")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert_eq!(store.issued_serials("web-1").await.unwrap().len(), 1);
    }

    /// A key certified for one name is not certified again for another:
    /// its serial (the key's) stays recorded under the first, so revoking
    /// the second would miss it.
    #[tokio::test]
    async fn one_key_is_never_certified_for_two_names() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, store, config) = enrollment_in(dir.path()).await;
        let enroller = Enroller::load(&config, &ca.agents_ca_cert(), store.clone()).unwrap();
        let csr = new_csr();
        enroller.renew("web-2", "00", &csr).await.unwrap();
        assert!(matches!(
            enroller.renew("web-1", "01", &csr).await,
            Err(EnrollError::BadRequest(_))
        ));
        assert!(store.issued_serials("web-1").await.unwrap().is_empty());
    }

    #[test]
    fn one_address_holds_only_a_few_enrollment_connections() {
        let limit = PerSource::new(2);
        let a: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let b: std::net::IpAddr = "10.0.0.2".parse().unwrap();
        let first = limit.enter(a).unwrap();
        let _second = limit.enter(a).unwrap();
        assert!(limit.enter(a).is_none());
        assert!(limit.enter(b).is_some(), "another address is not held back");
        drop(first);
        assert!(
            limit.enter(a).is_some(),
            "a closed connection frees its slot"
        );
    }

    #[test]
    fn tokens_are_random_and_hashed() {
        let a = new_token();
        let b = new_token();
        assert_ne!(a, b);
        assert!(well_formed(&a), "{a}");
        assert_eq!(a.len(), TOKEN_PREFIX.len() + 64);
        assert_eq!(token_hash(&a), token_hash(&a));
        assert_ne!(token_hash(&a), token_hash(&b));
        assert!(!token_hash(&a).contains(&a[TOKEN_PREFIX.len()..]));
        for bad in ["", "rgt_", "rgt_zz", &a[1..], &format!("{a}0")] {
            assert!(!well_formed(bad), "{bad}");
        }
    }
}
