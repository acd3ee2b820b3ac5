//! The HTTPS server: one TCP listener, rustls with mandatory client
//! certificates, HTTP/1.1 and HTTP/2 (agents use HTTP/2), axum routes.
//!
//! Every connection's verified client certificate is classified once
//! ([`crate::pki::classify`]) and attached to each request; every handler
//! states which roles may call it and re-checks the revocation list, so a
//! certificate revoked while its connection is open stops working at its
//! next request (and an agent's order stream closes at its next tick).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rollguard_shared::protocol::{
    AgentReport, ErrorBody, HaltRequest, KillAck, KillRequest, LiftRequest, Order, Register,
    ResumeRequest, RetryRequest, RolloutId, RolloutRequest, RolloutState, RolloutSummary,
    Sha256Hex, MAX_JSON_BODY, PING_INTERVAL_SECS,
};
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::alerts::AlertmanagerPayload;
use crate::cluster::Cluster;
use crate::config::ControllerConfig;
use crate::engine::{Engine, EngineError};
use crate::hub::{encode, Hub};
use crate::metrics::Metrics;
use crate::pki::{classify, Issuers, Peer, RevocationList, Role};
use crate::store::BundleMeta;

/// What the controller learns from a bundle's bytes (the archive is parsed
/// by `rollguard_shared::archive`; see [`crate::bundle::inspect`]).
pub type BundleInspector = fn(&[u8]) -> Result<BundleMeta, String>;

/// The deny list, re-read when its file changes (checked at most once a
/// second). If the file disappears the last list stays in force: deleting
/// it must not un-revoke anyone.
pub struct Revocations {
    path: PathBuf,
    state: RwLock<(Option<SystemTime>, RevocationList)>,
    /// Serials revoked in the database (`revoke --config`): what makes a
    /// revocation reach every replica sharing it. Polled every second.
    shared: RwLock<std::collections::HashSet<String>>,
    last_check: Mutex<Instant>,
    /// Bumped on every reload, so open order streams re-check at once.
    reloaded: tokio::sync::watch::Sender<u64>,
}

impl Revocations {
    pub fn load(path: PathBuf) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(&path)?;
        let mtime = std::fs::metadata(&path)?.modified().ok();
        Ok(Revocations {
            path,
            state: RwLock::new((mtime, RevocationList::parse(&text))),
            shared: RwLock::default(),
            last_check: Mutex::new(Instant::now()),
            reloaded: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Re-read the list if its file changed (at most once a second).
    pub fn refresh(&self) {
        {
            let mut last = self.last_check.lock().unwrap_or_else(|e| e.into_inner());
            if last.elapsed() < Duration::from_secs(1) {
                return;
            }
            *last = Instant::now();
        }
        let Ok(mtime) = std::fs::metadata(&self.path).and_then(|m| m.modified()) else {
            return;
        };
        if self.state.read().unwrap_or_else(|e| e.into_inner()).0 == Some(mtime) {
            return;
        }
        if let Ok(text) = std::fs::read_to_string(&self.path) {
            let list = RevocationList::parse(&text);
            tracing::info!(revoked = list.serials.len(), "revocation list reloaded");
            *self.state.write().unwrap_or_else(|e| e.into_inner()) = (Some(mtime), list);
            self.reloaded.send_modify(|n| *n += 1);
        }
    }

    /// Re-read the serials revoked in the database; open order streams
    /// re-check when they changed. A database error keeps the last list
    /// (a revocation is never forgotten because the database blinked).
    pub async fn refresh_shared(&self, store: &dyn crate::store::Store) {
        if let Err(e) = self.load_shared(store).await {
            tracing::warn!(error = %e, "cannot read the revoked serials from the database");
        }
    }

    /// [`Revocations::refresh_shared`], with the database's error. The
    /// server's first load, before it listens: until then the list is
    /// empty, and a certificate revoked in the database would pass.
    pub async fn load_shared(
        &self,
        store: &dyn crate::store::Store,
    ) -> Result<(), crate::store::StoreError> {
        let serials = store.revoked_serials().await?;
        let serials: std::collections::HashSet<String> = serials
            .into_iter()
            .map(|s| s.to_ascii_lowercase())
            .collect();
        let changed = {
            let mut shared = self.shared.write().unwrap_or_else(|e| e.into_inner());
            let grown = serials.difference(&shared).count() > 0;
            // Only ever grows: the database is not where revocations end.
            shared.extend(serials);
            grown
        };
        if changed {
            tracing::info!("revoked serials in the database changed");
            self.reloaded.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reloaded.subscribe()
    }

    pub fn is_revoked(&self, serial: &str) -> bool {
        self.refresh();
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .is_revoked(serial)
            || self
                .shared
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains(serial)
    }
}

pub struct App {
    pub engine: Arc<Engine>,
    pub revocations: Revocations,
    pub max_bundle_bytes: u64,
    pub inspect: BundleInspector,
    /// `[enrollment]`: signs renewals (and the enrollment listener's
    /// requests); `None`: renewal is refused.
    pub enroller: Option<Arc<crate::enroll::Enroller>>,
}

/// The classification of the connection's client certificate.
#[derive(Clone)]
struct PeerInfo(Result<Peer, String>);

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&ErrorBody {
            error: self.message,
        })
        .unwrap_or_default();
        (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let status = match &e {
            EngineError::BadRequest(_) => StatusCode::BAD_REQUEST,
            EngineError::NotFound(_) => StatusCode::NOT_FOUND,
            EngineError::Conflict(_) => StatusCode::CONFLICT,
            EngineError::Forbidden(_) => StatusCode::FORBIDDEN,
            EngineError::Store(err) => {
                tracing::error!(error = %err, "storage error");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError::new(status, e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn require(app: &App, peer: &PeerInfo, roles: &[Role]) -> ApiResult<Peer> {
    let peer = peer
        .0
        .clone()
        .map_err(|why| ApiError::new(StatusCode::FORBIDDEN, why))?;
    if app.revocations.is_revoked(&peer.serial) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("certificate of {} has been revoked", peer.name),
        ));
    }
    unexpired(&peer, crate::store::now_ms())?;
    if !roles.contains(&peer.role) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "{} certificates may not call this endpoint",
                peer.role.name()
            ),
        ));
    }
    Ok(peer)
}

/// The handshake checked the certificate's validity once; a connection kept
/// open (HTTP/2 pings) outlives it. An expired certificate is refused on
/// every request, so it can neither act nor renew itself into a new one.
fn unexpired(peer: &Peer, now: crate::store::Millis) -> ApiResult<()> {
    if peer.not_after <= now {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "certificate of {} expired at {}",
                peer.name,
                crate::store::rfc3339(peer.not_after)
            ),
        ));
    }
    Ok(())
}

/// Who may call what (the table at [`Role`]): one place for every
/// endpoint's rule.
mod may {
    use super::Role;
    /// Read rollouts, agents, the kill state, bundles.
    pub const READ: &[Role] = &[Role::Viewer, Role::Operator, Role::Admin];
    /// Change rollouts (plan, upload, start, halt, resume, retry) and kill.
    pub const OPERATE: &[Role] = &[Role::Operator, Role::Admin];
    /// Lift a kill; remove (deregister and revoke) an agent.
    pub const ADMINISTER: &[Role] = &[Role::Admin];
    /// Post alerts.
    pub const ALERT: &[Role] = &[Role::AlertSource, Role::Operator, Role::Admin];
    /// Scrape metrics.
    pub const METRICS: &[Role] = &[Role::AlertSource, Role::Viewer, Role::Operator, Role::Admin];
    /// Fetch a bundle: its agents, and people reviewing it.
    pub const FETCH_BUNDLE: &[Role] = &[Role::Agent, Role::Viewer, Role::Operator, Role::Admin];
    /// The agent protocol.
    pub const AGENT: &[Role] = &[Role::Agent];
}

fn parse_json<T: DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

fn json<T: serde::Serialize>(value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn rollout_id(raw: &str) -> ApiResult<RolloutId> {
    RolloutId::parse(raw).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))
}

type S = State<Arc<App>>;
type P = Extension<PeerInfo>;

// ---- agent endpoints ------------------------------------------------------------

async fn agent_connect(State(app): S, Extension(peer): P, body: Bytes) -> ApiResult<Response> {
    let me = require(&app, &peer, may::AGENT)?;
    let reg: Register = parse_json(&body)?;
    if reg.name != me.name {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "agent certificate is for {:?}, cannot register as {:?}",
                me.name, reg.name
            ),
        ));
    }
    for (k, v) in &reg.labels {
        rollguard_shared::targets::validate_label(k, v)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    }
    app.engine.register_agent(&me.name, &reg.labels).await?;
    let registration = app.engine.hub.connect_with(
        &me.name,
        reg.labels.clone(),
        Some(crate::presence::Arrival {
            agent_version: reg.agent_version.clone(),
            kernel: reg.kernel.clone(),
            landlock_abi: reg.landlock_abi,
            cert_serial: me.serial.clone(),
            cert_not_after: Some(me.not_after),
        }),
    );
    let greeting: Vec<Bytes> = app
        .engine
        .greeting(&me.name)
        .await?
        .iter()
        .map(encode)
        .collect();
    tracing::info!(agent = %me.name, version = %reg.agent_version, "agent connected");

    struct StreamState {
        registration: crate::hub::Registration,
        greeting: std::vec::IntoIter<Bytes>,
        ticker: tokio::time::Interval,
        app: Arc<App>,
        me: Peer,
        revocations: tokio::sync::watch::Receiver<u64>,
    }
    let mut ticker = tokio::time::interval(Duration::from_secs(PING_INTERVAL_SECS));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = StreamState {
        registration,
        greeting: greeting.into_iter(),
        ticker,
        app: app.clone(),
        me,
        revocations: app.revocations.subscribe(),
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        if let Some(line) = st.greeting.next() {
            return Some((Ok::<Bytes, Infallible>(line), st));
        }
        tokio::select! {
            line = st.registration.rx.recv() => line.map(|l| (Ok(l), st)),
            _ = st.revocations.changed() => {
                if st.app.revocations.is_revoked(&st.me.serial) {
                    tracing::warn!("closing the order stream of a revoked certificate");
                    return None;
                }
                Some((Ok(encode(&Order::Ping)), st))
            }
            _ = st.ticker.tick() => {
                if st.app.revocations.is_revoked(&st.me.serial) {
                    tracing::warn!("closing the order stream of a revoked certificate");
                    return None;
                }
                if unexpired(&st.me, crate::store::now_ms()).is_err() {
                    tracing::warn!("closing the order stream of an expired certificate");
                    return None;
                }
                Some((Ok(encode(&Order::Ping)), st))
            }
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

async fn agent_report(State(app): S, Extension(peer): P, body: Bytes) -> ApiResult<StatusCode> {
    let me = require(&app, &peer, may::AGENT)?;
    let report: AgentReport = parse_json(&body)?;
    app.engine.ingest_report(&me.name, report).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn agent_kill_ack(State(app): S, Extension(peer): P, body: Bytes) -> ApiResult<StatusCode> {
    let me = require(&app, &peer, may::AGENT)?;
    let ack: KillAck = parse_json(&body)?;
    tracing::info!(agent = %me.name, generation = ack.generation, killed = ack.killed, "kill state acknowledged");
    app.engine.hub.record_kill_ack(&me.name, ack.generation);
    Ok(StatusCode::NO_CONTENT)
}

async fn agent_renew(State(app): S, Extension(peer): P, body: Bytes) -> Response {
    let me = match require(&app, &peer, may::AGENT) {
        Ok(me) => me,
        Err(e) => return e.into_response(),
    };
    let Some(enroller) = app.enroller.clone() else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "certificate renewal is not enabled on this controller (no [enrollment] section)",
        )
        .into_response();
    };
    let req: rollguard_shared::protocol::RenewRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    // The new certificate's name is the caller's, never the request's.
    match enroller.renew(&me.name, &me.serial, &req.csr).await {
        // Revoked through this controller's own revoked.list meanwhile
        // (the database's list was checked after recording): the new
        // certificate is revoked too, in the database, and not handed out.
        Ok(_) if app.revocations.is_revoked(&me.serial) => {
            if let Err(e) = enroller.revoke_all_issued(&me.name).await {
                tracing::error!(agent = %me.name, error = %e, "cannot revoke a certificate renewed for a revoked caller");
            }
            ApiError::new(
                StatusCode::FORBIDDEN,
                format!("certificate of {} has been revoked", me.name),
            )
            .into_response()
        }
        Ok(resp) => json(&resp),
        Err(e) => crate::enroll::enroll_error_response(e),
    }
}

async fn get_bundle(
    State(app): S,
    Extension(peer): P,
    Path(sha): Path<String>,
) -> ApiResult<Response> {
    require(&app, &peer, may::FETCH_BUNDLE)?;
    let sha = Sha256Hex::parse(&sha)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    let bytes = app.engine.bundle_bytes(&sha).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

// ---- operator endpoints -----------------------------------------------------------

async fn put_bundle(
    State(app): S,
    Extension(peer): P,
    Path(sha): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let me = require(&app, &peer, may::OPERATE)?;
    let sha = Sha256Hex::parse(&sha)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    if Sha256Hex::of(&body) != sha {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the uploaded bytes do not have the SHA-256 named in the URL",
        ));
    }
    let inspect = app.inspect;
    let bytes = body.clone();
    let meta = tokio::task::spawn_blocking(move || inspect(&bytes))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("not a valid bundle: {e}")))?;
    app.engine
        .store
        .put_bundle(&meta, &body)
        .await
        .map_err(EngineError::from)?;
    app.engine
        .store
        .append_operator_log(
            &me.name,
            "bundle.upload",
            &serde_json::json!({ "sha256": sha, "name": meta.name, "version": meta.version }),
        )
        .await
        .map_err(EngineError::from)?;
    Ok(json(&rollguard_shared::protocol::BundleSummary {
        sha256: meta.sha256,
        name: meta.name,
        version: meta.version,
        size: meta.size,
    }))
}

async fn plan_rollout(State(app): S, Extension(peer): P, body: Bytes) -> ApiResult<Response> {
    require(&app, &peer, may::OPERATE)?;
    let req: RolloutRequest = parse_json(&body)?;
    let (plan, _) = app.engine.plan(&req).await?;
    Ok(json(&plan))
}

async fn start_rollout(State(app): S, Extension(peer): P, body: Bytes) -> ApiResult<Response> {
    let me = require(&app, &peer, may::OPERATE)?;
    let req: RolloutRequest = parse_json(&body)?;
    let engine = app.engine.clone();
    Ok(json(
        &to_completion(async move { engine.start(&req, &me.name).await }).await?,
    ))
}

/// `GET /v1/rollouts[?summary=true][&limit=N]`: every rollout in full
/// (oldest first), or summaries; `limit` keeps the newest N.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    #[serde(default)]
    summary: bool,
    #[serde(default)]
    limit: Option<usize>,
}

async fn list_rollouts(
    State(app): S,
    Extension(peer): P,
    Query(q): Query<ListQuery>,
) -> ApiResult<Response> {
    require(&app, &peer, may::READ)?;
    let mut all = app.engine.list().await?;
    if let Some(n) = q.limit {
        all.drain(..all.len().saturating_sub(n));
    }
    Ok(if q.summary {
        json(&all.iter().map(RolloutSummary::from).collect::<Vec<_>>())
    } else {
        json(&all)
    })
}

async fn rollout_status(
    State(app): S,
    Extension(peer): P,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    require(&app, &peer, may::READ)?;
    Ok(json(&app.engine.status(&rollout_id(&id)?).await?))
}

async fn halt_rollout(
    State(app): S,
    Extension(peer): P,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let me = require(&app, &peer, may::OPERATE)?;
    let req: HaltRequest = parse_json(&body)?;
    if req.reason.trim().is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "a halt needs a reason",
        ));
    }
    let id = rollout_id(&id)?;
    let engine = app.engine.clone();
    Ok(json(
        &to_completion(async move { engine.halt(&id, &req.reason, &me.name).await }).await?,
    ))
}

async fn resume_rollout(
    State(app): S,
    Extension(peer): P,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let me = require(&app, &peer, may::OPERATE)?;
    // An empty body (as before resume took a reason) resumes without one.
    let req: ResumeRequest = if body.is_empty() {
        ResumeRequest::default()
    } else {
        parse_json(&body)?
    };
    if req.reason.as_ref().is_some_and(|r| r.trim().is_empty()) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "an empty reason: give one, or none",
        ));
    }
    let id = rollout_id(&id)?;
    let engine = app.engine.clone();
    Ok(json(
        &to_completion(async move { engine.resume(&id, req.reason.as_deref(), &me.name).await })
            .await?,
    ))
}

async fn retry_rollout(
    State(app): S,
    Extension(peer): P,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let me = require(&app, &peer, may::OPERATE)?;
    let req: RetryRequest = parse_json(&body)?;
    let id = rollout_id(&id)?;
    let engine = app.engine.clone();
    Ok(json(
        &to_completion(async move { engine.retry(&id, req.failed, &me.name).await }).await?,
    ))
}

async fn kill(State(app): S, Extension(peer): P, body: Bytes) -> ApiResult<Response> {
    let me = require(&app, &peer, may::OPERATE)?;
    let req: KillRequest = parse_json(&body)?;
    let engine = app.engine.clone();
    Ok(json(
        &to_completion(async move { engine.kill(req.scope, &req.reason, &me.name).await }).await?,
    ))
}

async fn lift(State(app): S, Extension(peer): P, body: Bytes) -> ApiResult<Response> {
    let me = require(&app, &peer, may::ADMINISTER)?;
    let req: LiftRequest = if body.is_empty() {
        LiftRequest::default()
    } else {
        parse_json(&body)?
    };
    let engine = app.engine.clone();
    Ok(json(
        &to_completion(async move { engine.lift(req.scope, &me.name).await }).await?,
    ))
}

/// Run an operator's action to its end even if the client goes away: a
/// dropped request cancels its handler, and a kill stored but never pushed
/// (or a halt recorded but never notified, a rollout recorded but never
/// driven) must not be the result of a closed laptop or a Ctrl-C.
async fn to_completion<T: Send + 'static>(
    action: impl std::future::Future<Output = Result<T, EngineError>> + Send + 'static,
) -> ApiResult<T> {
    match tokio::spawn(action).await {
        Ok(result) => Ok(result?),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the action did not finish: {e}"),
        )),
    }
}

async fn kill_state(State(app): S, Extension(peer): P) -> ApiResult<Response> {
    require(&app, &peer, may::READ)?;
    Ok(json(
        &app.engine
            .store
            .kill_state()
            .await
            .map_err(EngineError::from)?,
    ))
}

async fn list_agents(State(app): S, Extension(peer): P) -> ApiResult<Response> {
    require(&app, &peer, may::READ)?;
    Ok(json(&app.engine.inventory().await?))
}

async fn remove_agent(
    State(app): S,
    Extension(peer): P,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let me = require(&app, &peer, may::ADMINISTER)?;
    let removed = app.engine.remove_agent(&name, &me.name).await?;
    // Refuse its certificate here at once; other replicas poll the
    // database every second.
    app.revocations
        .refresh_shared(app.engine.store.as_ref())
        .await;
    Ok(json(&removed))
}

async fn alertmanager(State(app): S, Extension(peer): P, body: Bytes) -> ApiResult<Response> {
    let me = require(&app, &peer, may::ALERT)?;
    let payload = AlertmanagerPayload::parse(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    // To completion like an operator's halt: a webhook that outlasts
    // Alertmanager's timeout must not stop halfway through its halts.
    let engine = app.engine.clone();
    Ok(json(
        &to_completion(async move { engine.alert(&payload, &me.name).await }).await?,
    ))
}

async fn metrics(State(app): S, Extension(peer): P) -> ApiResult<Response> {
    require(&app, &peer, may::METRICS)?;
    let mut counts: BTreeMap<&'static str, (RolloutState, usize)> = BTreeMap::new();
    for s in [
        RolloutState::Running,
        RolloutState::Halted,
        RolloutState::Completed,
    ] {
        counts.insert(s.as_str(), (s, 0));
    }
    for r in app
        .engine
        .store
        .rollouts()
        .await
        .map_err(EngineError::from)?
    {
        if let Some(c) = counts.get_mut(r.state.as_str()) {
            c.1 += 1;
        }
    }
    let by_state: Vec<_> = counts.into_values().collect();
    let now = crate::store::now_ms();
    let expiry: Vec<(String, i64)> = app
        .engine
        .store
        .list_agents()
        .await
        .map_err(EngineError::from)?
        .into_iter()
        .filter_map(|a| Some((a.name, (a.inventory.cert_not_after? - now) / 1000)))
        .collect();
    let text = app.engine.metrics.render(
        app.engine.hub.connected_count(),
        app.engine.cluster.is_leader(),
        &by_state,
        &expiry,
    );
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint")
}

pub fn router(app: Arc<App>) -> Router {
    let bundle_limit = usize::try_from(app.max_bundle_bytes).unwrap_or(usize::MAX);
    Router::new()
        .route("/v1/agent/connect", post(agent_connect))
        .route("/v1/agent/reports", post(agent_report))
        .route("/v1/agent/kill-ack", post(agent_kill_ack))
        .route("/v1/agent/renew", post(agent_renew))
        .route(
            "/v1/bundles/{sha}",
            get(get_bundle)
                .put(put_bundle)
                .layer(DefaultBodyLimit::max(bundle_limit)),
        )
        .route("/v1/rollouts/plan", post(plan_rollout))
        .route("/v1/rollouts", post(start_rollout).get(list_rollouts))
        .route("/v1/rollouts/{id}", get(rollout_status))
        .route("/v1/rollouts/{id}/halt", post(halt_rollout))
        .route("/v1/rollouts/{id}/resume", post(resume_rollout))
        .route("/v1/rollouts/{id}/retry", post(retry_rollout))
        .route("/v1/kill", post(kill).get(kill_state))
        .route("/v1/kill/lift", post(lift))
        .route("/v1/agents", get(list_agents))
        .route("/v1/agents/{name}", axum::routing::delete(remove_agent))
        .route("/v1/alerts/alertmanager", post(alertmanager))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        .with_state(app)
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Tls(#[from] crate::tls::ServerTlsError),
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("cannot listen on {addr}: {error}")]
    Listen {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("revocation list {path}: {error}")]
    Revocations {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// HTTP/2 streams one connection may have open at once (an agent uses one
/// long-lived order stream plus a few short requests).
const MAX_STREAMS_PER_CONNECTION: u32 = 32;
/// Flow-control windows: what one peer may make us buffer, per stream and
/// per connection. Enough for bundle uploads at LAN speed.
const STREAM_WINDOW: u32 = 256 * 1024;
const CONNECTION_WINDOW: u32 = 512 * 1024;
/// Bytes buffered per stream before the sender waits.
const SEND_BUFFER: usize = 64 * 1024;

/// A bound, ready server; `run` serves until the process ends.
pub struct Server {
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    issuers: Arc<Issuers>,
    router: Router,
    pub app: Arc<App>,
    /// `[enrollment] listen`, bound.
    enrollment: Option<crate::enroll::EnrollListener>,
}

impl Server {
    pub async fn bind(
        config: &ControllerConfig,
        inspect: BundleInspector,
    ) -> Result<Self, ServeError> {
        let tls = crate::tls::server_config(
            &config.cert,
            &config.key,
            &[&config.agents_ca, &config.operators_ca],
        )?;
        let issuers = Arc::new(Issuers::from_pem_files(
            &config.agents_ca,
            &config.operators_ca,
        )?);
        let revocations = Revocations::load(config.revoked.clone()).map_err(|source| {
            ServeError::Revocations {
                path: config.revoked.clone(),
                error: source,
            }
        })?;
        let opened = crate::store::open(&config.storage).await?;
        // Before anything listens: a revocation only the database holds
        // (`agents remove`, `revoke --config`) must apply from the first
        // request. A database that cannot say is a controller that does
        // not start (systemd starts it again).
        revocations.load_shared(opened.store.as_ref()).await?;
        // How the inventory names this controller: host name and port.
        let name = format!("{}:{}", crate::presence::host_name(), config.listen.port());
        let cluster = match opened.postgres {
            Some(pool) => Cluster::replica(pool, name),
            None => Cluster::alone_named(name),
        };
        let engine = Engine::new(
            opened.store,
            cluster,
            Hub::new(),
            Arc::new(Metrics::new()),
            config.result_margin,
            config.kill_ack_timeout,
            config.alertmanager.clone(),
            crate::notify::Notifier::spawn(&config.notify),
        );
        let (enroller, enrollment) = match &config.enrollment {
            None => (None, None),
            Some(e) => {
                let enroller = Arc::new(crate::enroll::Enroller::load(
                    e,
                    &config.agents_ca,
                    engine.store.clone(),
                )?);
                let tls = crate::tls::server_auth_only_config(&config.cert, &config.key)?;
                let listener = crate::enroll::EnrollListener::bind(e.listen, tls, enroller.clone())
                    .await
                    .map_err(|source| ServeError::Listen {
                        addr: e.listen,
                        error: source,
                    })?;
                (Some(enroller), Some(listener))
            }
        };
        let app = Arc::new(App {
            engine,
            revocations,
            max_bundle_bytes: config.max_bundle_bytes,
            inspect,
            enroller,
        });
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServeError::Listen {
                    addr: config.listen,
                    error: source,
                })?;
        Ok(Server {
            listener,
            tls: tokio_rustls::TlsAcceptor::from(tls),
            issuers,
            router: router(app.clone()),
            app,
            enrollment,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn run(self) -> Result<(), ServeError> {
        // Alone (SQLite) this resumes every running rollout now; as a
        // replica, once this replica wins the leadership.
        self.app
            .engine
            .cluster
            .clone()
            .run(self.app.engine.clone())
            .await;
        // Revocations take effect within a second, open streams included.
        let app = self.app.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                app.revocations.refresh();
                app.revocations
                    .refresh_shared(app.engine.store.as_ref())
                    .await;
            }
        });
        if let Some(enrollment) = self.enrollment {
            tokio::spawn(enrollment.run());
        }
        tracing::info!(addr = %self.listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "controller listening");
        loop {
            let (tcp, addr) = match self.listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let tls = self.tls.clone();
            let issuers = self.issuers.clone();
            let router = self.router.clone();
            tokio::spawn(async move {
                let stream =
                    match tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::info!(%addr, error = %e, "TLS handshake refused");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(%addr, "TLS handshake timed out");
                            return;
                        }
                    };
                let peer = match stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                {
                    Some(cert) => classify(&issuers, cert.as_ref()).map_err(|e| e.to_string()),
                    None => Err("no client certificate".to_string()),
                };
                let peer = PeerInfo(peer);
                let service =
                    hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                        req.extensions_mut().insert(peer.clone());
                        router.clone().oneshot(req.map(Body::new))
                    });
                let mut builder =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                // HTTP/2 pings find agents that vanished without closing
                // their connection (power loss, network cut), so they stop
                // counting as connected and their memory is freed.
                builder
                    .http2()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .keep_alive_interval(Some(Duration::from_secs(30)))
                    .keep_alive_timeout(Duration::from_secs(20))
                    // Per-connection bounds sized for 10,000 mostly idle
                    // agents (see docs/scale.md): an agent keeps one order
                    // stream open and makes a few small requests, so a few
                    // concurrent streams suffice; smaller flow-control
                    // windows and send buffer cap what one connection can
                    // make us buffer (1 MiB windows × 10,000 agents would
                    // allow 10 GiB).
                    .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
                    .initial_stream_window_size(STREAM_WINDOW)
                    .initial_connection_window_size(CONNECTION_WINDOW)
                    .max_send_buf_size(SEND_BUFFER)
                    .max_header_list_size(16 * 1024);
                if let Err(e) = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(%addr, error = %e, "connection ended");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expired_certificate_is_refused_on_a_connection_that_outlived_it() {
        let peer = Peer {
            role: Role::Agent,
            name: "web-1".into(),
            serial: "01".into(),
            not_after: 1_000_000,
        };
        assert!(unexpired(&peer, 999_999).is_ok());
        let e = unexpired(&peer, 1_000_000).unwrap_err();
        assert_eq!(e.status, StatusCode::FORBIDDEN);
    }
}
