//! The web view's HTTP server: the gate first, then the embedded page, the
//! API the page calls and the event stream that pushes changes to it.
//!
//! Each API route is forwarded to one controller route with the operator's
//! certificate, so the controller's role rules apply as they do to the
//! CLI. What the page sends is parsed into the controller's own request
//! types first; identifiers in paths are parsed too, so nothing the page
//! sends can reach another controller route.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rollguard_shared::archive::{self, Limits};
use rollguard_shared::protocol::{
    ErrorBody, HaltRequest, KillRequest, ResumeRequest, RolloutId, Sha256Hex,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_util::io::{StreamReader, SyncIoBridge};

use super::assets;
use super::gate::{param, Gate, Need, Refusal, Verdict, USED_LINK, WRONG_LINK};
use super::upstream::Upstream;

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Largest request body the page sends (a reason).
const MAX_REQUEST: usize = 64 * 1024;
/// Event streams open at once (a few tabs; each polls the controller, and
/// the page closes its stream while hidden).
const MAX_STREAMS: usize = 8;
/// Rollouts on the list page, newest first.
const MAX_LISTED: usize = 200;
/// The longest pause while a bundle streams from the controller.
const BUNDLE_IDLE: Duration = Duration::from_secs(20);
/// More than any bundle the controller accepts (`max_bundle_bytes`, 256 MiB
/// by default): only a controller that never ends its answer reaches it.
const MAX_BUNDLE: u64 = 4 << 30;
/// Connections open at once.
const MAX_CONNECTIONS: usize = 64;
/// How often an event stream asks the controller what changed.
const POLL: Duration = Duration::from_millis(500);

pub struct Ui {
    gate: Gate,
    upstream: Upstream,
    streams: Arc<AtomicUsize>,
}

impl Ui {
    pub fn new(gate: Gate, upstream: Upstream) -> Self {
        Ui {
            gate,
            upstream,
            streams: Arc::default(),
        }
    }
}

/// Serve connections until the process ends.
pub async fn serve(listener: TcpListener, ui: Arc<Ui>) {
    // Bounded, so that a local process opening connections cannot take
    // every descriptor (and with it the operator's kill button).
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = connections.clone().acquire_owned().await else {
            return;
        };
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, usually: wait instead of spinning.
                tracing::warn!(error = %e, "accepting a connection");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let ui = ui.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let ui = ui.clone();
                async move { Ok::<_, Infallible>(ui.handle(req).await) }
            });
            // A connection that never finishes its headers is closed.
            if let Err(e) = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service)
                .await
            {
                tracing::debug!(error = %e, "web view connection ended");
            }
            drop(permit);
        });
    }
}

impl Ui {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let need = match req.uri().path() {
            "/" => Need::Page { root: true },
            "/app.js" | "/app.css" => Need::Page { root: false },
            "/api/events" => Need::Stream,
            _ => Need::Session,
        };
        let user_agent = req
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("unknown browser")
            .to_string();
        let checked = self
            .gate
            .check(need, req.method(), req.uri().query(), req.headers());
        let mut resp = match checked {
            // Said on the terminal: the operator sees who took the link,
            // and any later use of it.
            Ok(Verdict::SignIn { session, page }) => {
                eprintln!("rollguard ui: signed in ({user_agent})");
                self.signed_in(&session, &page)
            }
            Ok(Verdict::Allowed) => self.route(req).await,
            Err(Refusal { status, why }) => {
                if why == USED_LINK {
                    eprintln!(
                        "rollguard ui: WARNING: the link was opened again after its use ({user_agent}); \
                         if that was not you, stop this process (Ctrl-C)"
                    );
                } else if why == WRONG_LINK {
                    eprintln!("rollguard ui: WARNING: a wrong link was refused ({user_agent})");
                }
                if matches!(need, Need::Page { .. }) {
                    full(
                        status,
                        "text/plain; charset=utf-8",
                        Bytes::from(format!("{why}\n")),
                    )
                } else {
                    problem(status, why)
                }
            }
        };
        let h = resp.headers_mut();
        // The page's own script and style only; no framing, no referrer.
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                 img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
        );
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        // No other page that opened this one can drive it (its address).
        h.insert(
            "cross-origin-opener-policy",
            HeaderValue::from_static("same-origin"),
        );
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        resp
    }

    async fn route(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (&method, segments.as_slice()) {
            (&Method::GET, [""]) => asset(assets::INDEX_HTML, "text/html; charset=utf-8"),
            (&Method::GET, ["app.js"]) => asset(assets::APP_JS, "text/javascript; charset=utf-8"),
            (&Method::GET, ["app.css"]) => asset(assets::APP_CSS, "text/css; charset=utf-8"),
            (&Method::GET, ["api", "agents"]) => {
                self.forward(Method::GET, "/v1/agents", None).await
            }
            (&Method::GET, ["api", "rollouts"]) => {
                let path = format!("/v1/rollouts?summary=true&limit={MAX_LISTED}");
                self.forward(Method::GET, &path, None).await
            }
            (&Method::GET, ["api", "kill"]) => self.forward(Method::GET, "/v1/kill", None).await,
            (&Method::GET, ["api", "rollouts", id]) => match RolloutId::parse(id) {
                Ok(id) => {
                    self.forward(Method::GET, &format!("/v1/rollouts/{id}"), None)
                        .await
                }
                Err(e) => problem(StatusCode::BAD_REQUEST, &e.to_string()),
            },
            (&Method::GET, ["api", "bundles", sha]) => match Sha256Hex::parse(sha) {
                Ok(sha) => self.bundle(sha).await,
                Err(e) => problem(StatusCode::BAD_REQUEST, &e.to_string()),
            },
            (&Method::GET, ["api", "events"]) => {
                let rollout = param(&query, "rollout").map(RolloutId::parse);
                match rollout.transpose() {
                    Ok(rollout) => self.events(rollout),
                    Err(e) => problem(StatusCode::BAD_REQUEST, &e.to_string()),
                }
            }
            (&Method::POST, ["api", "rollouts", id, action @ ("halt" | "resume")]) => {
                let id = match RolloutId::parse(id) {
                    Ok(id) => id,
                    Err(e) => return problem(StatusCode::BAD_REQUEST, &e.to_string()),
                };
                let reason = match read_json::<Reason>(req).await.and_then(Reason::given) {
                    Ok(r) => r,
                    Err(why) => return problem(StatusCode::BAD_REQUEST, &why),
                };
                let body = if *action == "halt" {
                    serde_json::to_vec(&HaltRequest { reason })
                } else {
                    serde_json::to_vec(&ResumeRequest {
                        reason: Some(reason),
                    })
                };
                let path = format!("/v1/rollouts/{id}/{action}");
                self.act(path, body.ok()).await
            }
            (&Method::POST, ["api", "kill"]) => {
                let kill = match read_json::<KillRequest>(req).await {
                    Ok(k) if !k.reason.trim().is_empty() => k,
                    Ok(_) => return problem(StatusCode::BAD_REQUEST, "a kill needs a reason"),
                    Err(why) => return problem(StatusCode::BAD_REQUEST, &why),
                };
                let body = serde_json::to_vec(&kill).ok();
                self.act("/v1/kill".to_string(), body).await
            }
            _ => problem(StatusCode::NOT_FOUND, "no such page"),
        }
    }

    /// The controller's answer, status and body, as the page's.
    async fn forward(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Response<Body> {
        match self.upstream.call(method, path, body).await {
            Ok(a) => json_bytes(a.status, a.body),
            Err(e) => problem(StatusCode::BAD_GATEWAY, &format!("{e:#}")),
        }
    }

    /// The page for the browser that has just used the link: the session
    /// written into this one answer, and the page cookie.
    fn signed_in(&self, session: &str, page: &str) -> Response<Body> {
        let html = assets::INDEX_HTML.replacen(
            assets::SESSION_SLOT,
            &format!("<meta name=\"rollguard-session\" content=\"{session}\">"),
            1,
        );
        let mut r = full(
            StatusCode::OK,
            "text/html; charset=utf-8",
            Bytes::from(html),
        );
        let cookie = format!(
            "{}={page}; Path=/; HttpOnly; SameSite=Strict",
            self.gate.cookie_name()
        );
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
        r
    }

    /// An action (halt, resume, kill), run to its end even if the page goes
    /// away meanwhile: a dropped request would cancel the controller's
    /// handler half-way. A failure to hear back is an unknown outcome, not
    /// a refusal.
    async fn act(self: Arc<Self>, path: String, body: Option<Vec<u8>>) -> Response<Body> {
        let ui = self.clone();
        let task = tokio::spawn(async move { ui.upstream.call(Method::POST, &path, body).await });
        match task.await {
            // A server error may come after the action took effect (a kill
            // stored and pushed, then a failed bookkeeping step).
            Ok(Ok(a)) if a.status.is_server_error() => problem(
                StatusCode::BAD_GATEWAY,
                &format!(
                    "OUTCOME UNKNOWN (the controller answered {}: {}); check the kill state and the rollout",
                    a.status,
                    ErrorBody::message_of(&a.body)
                ),
            ),
            Ok(Ok(a)) => json_bytes(a.status, a.body),
            Ok(Err(e)) => problem(
                StatusCode::BAD_GATEWAY,
                &format!("OUTCOME UNKNOWN (no answer from the controller: {e:#}); check the kill state and the rollout"),
            ),
            Err(e) => problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("OUTCOME UNKNOWN ({e}); check the kill state and the rollout"),
            ),
        }
    }

    /// What `rollguard bundle inspect --json` shows of a bundle the
    /// controller holds (its signatures are listed, not judged: each host
    /// judges them against its own signers).
    async fn bundle(&self, sha: Sha256Hex) -> Response<Body> {
        let resp = match self.upstream.stream(&format!("/v1/bundles/{sha}")).await {
            Ok(r) => r,
            Err(e) => return problem(StatusCode::BAD_GATEWAY, &format!("{e:#}")),
        };
        let status = resp.status();
        if !status.is_success() {
            let body = Limited::new(resp.into_body(), MAX_REQUEST)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return json_bytes(status, body);
        }
        // Read as it comes: the manifest is at the front, and the rest only
        // passes through the digest, so a large bundle is never held whole.
        // A controller that stops sending mid-body fails the read instead of
        // holding a blocking thread.
        let body = resp.into_body().into_data_stream();
        let stream = futures_util::stream::unfold(body, |mut body| async move {
            match tokio::time::timeout(BUNDLE_IDLE, body.next()).await {
                Ok(Some(chunk)) => Some((chunk.map_err(std::io::Error::other), body)),
                Ok(None) => None,
                Err(_) => Some((
                    Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the controller stopped sending the bundle",
                    )),
                    body,
                )),
            }
        });
        let reader = SyncIoBridge::new(StreamReader::new(Box::pin(stream)));
        let parsed = tokio::task::spawn_blocking(move || {
            let mut hashed = Hashed {
                inner: reader,
                hash: Sha256::new(),
            };
            let view = {
                let opened = archive::open(&mut hashed, &Limits::default())
                    .map_err(|e| format!("not a valid bundle: {e}"))?;
                crate::bundle::inspection(&opened, None, jiff::Timestamp::now())
            };
            use std::io::Read;
            let rest = std::io::copy(&mut (&mut hashed).take(MAX_BUNDLE), &mut std::io::sink())
                .map_err(|e| format!("reading the bundle: {e}"))?;
            if rest == MAX_BUNDLE {
                return Err("the controller's bundle is larger than any bundle can be".into());
            }
            if hex::encode(hashed.hash.finalize()) != sha.to_string() {
                return Err(format!("the controller's bundle is not {sha}"));
            }
            Ok(view)
        })
        .await;
        match parsed {
            Ok(Ok(v)) => json_bytes(StatusCode::OK, Bytes::from(v.to_string())),
            Ok(Err(e)) => problem(StatusCode::BAD_GATEWAY, &e),
            Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        }
    }

    /// Server-sent events: `agents`, `rollouts`, `kill` and, with
    /// `?rollout=ID`, `rollout` (or `rollout_error`), each sent when the
    /// controller's answer changes; `health` when the controller stops or
    /// starts answering.
    fn events(self: Arc<Self>, rollout: Option<RolloutId>) -> Response<Body> {
        let Some(guard) = StreamSlot::take(&self.streams) else {
            return problem(StatusCode::SERVICE_UNAVAILABLE, "too many open pages");
        };
        let mut sources = vec![
            ("kill", "/v1/kill".to_string(), 1),
            // Summaries of the newest: the full list carries every host's
            // report of every rollout ever.
            (
                "rollouts",
                format!("/v1/rollouts?summary=true&limit={MAX_LISTED}"),
                2,
            ),
            ("agents", "/v1/agents".to_string(), 4),
        ];
        if let Some(id) = rollout {
            sources.insert(0, ("rollout", format!("/v1/rollouts/{id}"), 1));
        }
        // After a stall (a slow controller), carry on at the normal pace
        // rather than firing the missed polls back to back.
        let mut interval = tokio::time::interval(POLL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let state = EventState {
            ui: self,
            sources,
            last: HashMap::new(),
            problems: HashMap::new(),
            health: None,
            queue: VecDeque::new(),
            tick: 0,
            interval,
            _slot: guard,
        };
        let stream = futures_util::stream::unfold(state, |mut st| async move {
            loop {
                if let Some(b) = st.queue.pop_front() {
                    return Some((Ok::<_, Infallible>(Frame::data(b)), st));
                }
                st.interval.tick().await;
                st.poll().await;
            }
        });
        let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        r
    }
}

/// A reader that hashes what passes through it.
struct Hashed<R> {
    inner: R,
    hash: Sha256,
}

impl<R: std::io::Read> std::io::Read for Hashed<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// One open event stream, counted while it lives.
struct StreamSlot(Arc<AtomicUsize>);

impl StreamSlot {
    fn take(count: &Arc<AtomicUsize>) -> Option<Self> {
        let prev = count.fetch_add(1, Ordering::SeqCst);
        let slot = StreamSlot(count.clone());
        (prev < MAX_STREAMS).then_some(slot)
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct EventState {
    ui: Arc<Ui>,
    /// Event name, controller path, polled every N ticks.
    sources: Vec<(&'static str, String, u64)>,
    last: HashMap<&'static str, Bytes>,
    /// Each source's latest failure, if its latest poll failed.
    problems: HashMap<&'static str, String>,
    /// The last `health` sent: `None` before the first.
    health: Option<Result<(), String>>,
    queue: VecDeque<Bytes>,
    tick: u64,
    interval: tokio::time::Interval,
    _slot: StreamSlot,
}

impl EventState {
    async fn poll(&mut self) {
        let tick = self.tick;
        self.tick += 1;
        // A comment every 5 s: a closed page is noticed on the write, and
        // the stream stops polling the controller for it.
        if tick % 10 == 9 {
            self.queue
                .push_back(Bytes::from_static(b": keep-alive\n\n"));
        }
        // While the controller is not answering, ask every 2 s, not 0.5.
        if matches!(self.health, Some(Err(_))) && tick % 4 != 0 {
            return;
        }
        // All at once: one slow answer must not hold back the others, nor
        // the page's word that the controller is not answering.
        let due: Vec<(&'static str, String)> = self
            .sources
            .iter()
            .filter(|(_, _, every)| tick % every == 0)
            .map(|(name, path, _)| (*name, path.clone()))
            .collect();
        let upstream = &self.ui.upstream;
        let answers =
            futures_util::future::join_all(due.iter().map(|(_, path)| upstream.poll(path))).await;
        for ((name, path), answer) in due.into_iter().zip(answers) {
            match answer {
                Ok(a) if a.status.is_success() => {
                    self.problems.remove(name);
                    // After an error, the same answer as before is news.
                    if name == "rollout" && self.last.remove("rollout_error").is_some() {
                        self.last.remove("rollout");
                    }
                    if self.last.get(name) != Some(&a.body) {
                        self.queue.push_back(event(name, &a.body));
                        self.last.insert(name, a.body);
                    }
                }
                // The followed rollout's own refusal (no such rollout, a
                // malformed id) is the page's to show, not a sign that the
                // controller is down.
                Ok(a)
                    if name == "rollout"
                        && matches!(a.status, StatusCode::NOT_FOUND | StatusCode::BAD_REQUEST) =>
                {
                    self.problems.remove(name);
                    self.last.remove("rollout");
                    let body = serde_json::json!({
                        "status": a.status.as_u16(),
                        "error": ErrorBody::message_of(&a.body),
                    });
                    let body = Bytes::from(body.to_string());
                    if self.last.get("rollout_error") != Some(&body) {
                        self.queue.push_back(event("rollout_error", &body));
                        self.last.insert("rollout_error", body);
                    }
                }
                Ok(a) => {
                    self.problems.insert(
                        name,
                        format!(
                            "the controller answered {path} with {}: {}",
                            a.status,
                            ErrorBody::message_of(&a.body)
                        ),
                    );
                }
                Err(e) => {
                    self.problems.insert(name, format!("{e:#}"));
                }
            }
        }
        // Every source's latest answer counts, not only this tick's.
        let health = match self.problems.values().min() {
            None => Ok(()),
            Some(p) => Err(p.clone()),
        };
        if self.health.as_ref() != Some(&health) {
            let body = match &health {
                Ok(()) => serde_json::json!({ "ok": true }),
                Err(e) => serde_json::json!({ "ok": false, "error": e }),
            };
            self.queue
                .push_back(event("health", body.to_string().as_bytes()));
            self.health = Some(health);
        }
    }
}

/// One server-sent event; each line of `data` on its own `data:` line.
fn event(name: &str, data: &[u8]) -> Bytes {
    let mut out = format!("event: {name}\n");
    for line in String::from_utf8_lossy(data).split('\n') {
        out.push_str("data: ");
        out.push_str(line.trim_end_matches('\r'));
        out.push('\n');
    }
    out.push('\n');
    Bytes::from(out)
}

/// The body of halt and resume: why.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Reason {
    reason: String,
}

impl Reason {
    fn given(self) -> Result<String, String> {
        if self.reason.trim().is_empty() {
            Err("a reason is required".into())
        } else {
            Ok(self.reason)
        }
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, String> {
    // Bounded in time too: a body sent a byte at a time would hold one of
    // the few connections for good.
    let read = Limited::new(req.into_body(), MAX_REQUEST).collect();
    let bytes = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .map_err(|_| "the request body took too long".to_string())?
        .map_err(|e| format!("reading the request: {e}"))?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| format!("invalid request: {e}"))
}

fn full(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut r = Response::new(Full::new(body).boxed_unsync());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn asset(body: &'static str, content_type: &'static str) -> Response<Body> {
    full(
        StatusCode::OK,
        content_type,
        Bytes::from_static(body.as_bytes()),
    )
}

fn json_bytes(status: StatusCode, body: Bytes) -> Response<Body> {
    full(status, "application/json", body)
}

/// An error the page shows: `{"error": ...}`, as the controller's.
fn problem(status: StatusCode, why: &str) -> Response<Body> {
    let body = serde_json::to_vec(&ErrorBody {
        error: why.to_string(),
    })
    .unwrap_or_default();
    json_bytes(status, Bytes::from(body))
}
