//! Who may use the web view: whoever opened the one-time link, in the
//! browser that opened it, through the address it is served on.
//!
//! `rollguard ui` acts with the operator's certificate, so anything that
//! gets through this gate acts as the operator. It checks:
//!
//! 1. On every request, that the `Host` header names the address served on
//!    (or `localhost` with its port, on loopback). A page of another site
//!    whose DNS name is rebound to 127.0.0.1 sends its own name, and is
//!    refused.
//! 2. The link's token is good once: the first `GET /?token=...` spends it
//!    and gets the page with two new secrets. A copy of the link in a shell
//!    history or a log then opens nothing.
//!    - The page secret comes back as a cookie and lets the browser load
//!      the page again (a reload). It opens the page's HTML, script and
//!      style, which hold no data, and nothing else: browsers send
//!      127.0.0.1's cookies to every port, so another local web server the
//!      browser visits may see it.
//!    - The session secret is written into that one answer. The page keeps
//!      it in `localStorage` (per origin, port included) and sends it in
//!      the `X-Rollguard-Session` header with every API request (the event
//!      stream, which cannot send headers, in its query; no other route
//!      takes it there). Only it reaches data and actions.
//! 3. A request that changes something (any method but GET/HEAD) must also
//!    come from the page itself: `Origin` equal to ours and a JSON body. A
//!    page of another origin can send neither without a CORS preflight,
//!    which this server never grants.
//!
//! Without the token, the page cookie or the session, every request is
//! refused.

use std::net::SocketAddr;
use std::sync::Mutex;

use hyper::header::{HeaderMap, CONTENT_TYPE, COOKIE, HOST, ORIGIN};
use hyper::{Method, StatusCode};
use rand_core::{OsRng, RngCore};

/// The header that carries the session secret.
pub const SESSION_HEADER: &str = "x-rollguard-session";

/// 32 bytes from the operating system's generator, shown as 64 hex digits.
#[derive(Clone, PartialEq, Eq)]
struct Secret([u8; 32]);

impl Secret {
    fn random() -> Self {
        let mut b = [0u8; 32];
        OsRng.fill_bytes(&mut b);
        Secret(b)
    }

    fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Whether `candidate` (hex) is this secret, in time independent of
    /// where they differ.
    fn matches(&self, candidate: &str) -> bool {
        let mut got = [0u8; 32];
        if hex::decode_to_slice(candidate, &mut got).is_err() {
            return false;
        }
        self.0
            .iter()
            .zip(got)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// Why a request was refused.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub why: &'static str,
}

fn refuse(status: StatusCode, why: &'static str) -> Refusal {
    Refusal { status, why }
}

/// What a request needs beyond the right `Host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// The page (`root`: `/`, where the link signs in) or its script and
    /// style: the page cookie.
    Page { root: bool },
    /// An API call: the session, and a request from the page if it changes
    /// anything.
    Session,
    /// The event stream: the session, which `EventSource` can only send in
    /// the query.
    Stream,
}

/// What the gate lets through.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// The link's first use: answer with the page carrying `session`, and
    /// set the page cookie to `page`.
    SignIn {
        session: String,
        page: String,
    },
}

/// The refusal of a link that was used before (said on the terminal).
pub const USED_LINK: &str =
    "this link has been used (it works once): run `rollguard ui` again for a new one";
/// The refusal of a token that was never this server's (said too).
pub const WRONG_LINK: &str = "this is not the link this `rollguard ui` printed";

struct Secrets {
    session: Secret,
    page: Secret,
}

pub struct Gate {
    /// `Host` header values accepted.
    hosts: Vec<String>,
    /// The page cookie's name: one per port, so that two `rollguard ui` in
    /// one browser do not overwrite each other's.
    cookie: String,
    /// The link's token; `None` once spent.
    token: Mutex<Option<Secret>>,
    /// Made when the token is spent.
    secrets: Mutex<Option<Secrets>>,
}

impl Gate {
    /// A gate for a server listening on `addr`, and its link's token.
    pub fn new(addr: SocketAddr) -> (Gate, String) {
        let mut hosts = vec![addr.to_string()];
        if addr.ip().is_loopback() {
            hosts.push(format!("localhost:{}", addr.port()));
        }
        let token = Secret::random();
        let hex = token.hex();
        let gate = Gate {
            hosts,
            cookie: format!("rollguard_ui_{}", addr.port()),
            token: Mutex::new(Some(token)),
            secrets: Mutex::new(None),
        };
        (gate, hex)
    }

    /// The page cookie's name.
    pub fn cookie_name(&self) -> &str {
        &self.cookie
    }

    pub fn check(
        &self,
        need: Need,
        method: &Method,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<Verdict, Refusal> {
        let Some(host) = headers.get(HOST).and_then(|h| h.to_str().ok()) else {
            return Err(refuse(StatusCode::BAD_REQUEST, "no Host header"));
        };
        if !self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
            return Err(refuse(
                StatusCode::MISDIRECTED_REQUEST,
                "this server answers only to the address it printed",
            ));
        }
        let changes = method != Method::GET && method != Method::HEAD;
        if let Need::Page { root } = need {
            if changes {
                return Err(refuse(StatusCode::METHOD_NOT_ALLOWED, "read-only"));
            }
            // Any cookie of that name: another local server may have set
            // one of its own (a longer path is sent first).
            let has_page = self
                .secrets
                .lock()
                .expect("secrets lock")
                .as_ref()
                .is_some_and(|s| cookies(headers, &self.cookie).any(|c| s.page.matches(c)));
            // Only a GET that is not a browser's prefetch signs in: a HEAD,
            // or anything else that would not read the answer, must not
            // spend the link.
            let prefetch = headers
                .get("sec-purpose")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("prefetch"));
            let token = query
                .filter(|_| root && method == Method::GET && !prefetch)
                .and_then(|q| param(q, "token"));
            if let Some(token) = token {
                match self.sign_in(token) {
                    SignIn::Done(verdict) => return Ok(verdict),
                    // The same browser opening the link again keeps its page.
                    _ if has_page => {}
                    SignIn::Spent => return Err(refuse(StatusCode::FORBIDDEN, USED_LINK)),
                    SignIn::Wrong => return Err(refuse(StatusCode::FORBIDDEN, WRONG_LINK)),
                }
            }
            return if has_page {
                Ok(Verdict::Allowed)
            } else {
                Err(refuse(
                    StatusCode::UNAUTHORIZED,
                    "not signed in: open the link `rollguard ui` printed",
                ))
            };
        }
        // The query is accepted for the event stream only, a read.
        let presented = headers
            .get(SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .or_else(|| {
                query
                    .filter(|_| need == Need::Stream && !changes)
                    .and_then(|q| param(q, "session"))
            });
        let valid = presented.is_some_and(|p| {
            self.secrets
                .lock()
                .expect("secrets lock")
                .as_ref()
                .is_some_and(|s| s.session.matches(p))
        });
        if !valid {
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                "not signed in: open the link `rollguard ui` printed",
            ));
        }
        if changes {
            let origin_ok = headers
                .get(ORIGIN)
                .and_then(|o| o.to_str().ok())
                .and_then(|o| o.strip_prefix("http://"))
                .is_some_and(|o| o.eq_ignore_ascii_case(host));
            if !origin_ok {
                return Err(refuse(
                    StatusCode::FORBIDDEN,
                    "the request does not come from this page",
                ));
            }
            let json = headers
                .get(CONTENT_TYPE)
                .and_then(|c| c.to_str().ok())
                .is_some_and(|c| c.split(';').next() == Some("application/json"));
            if !json {
                return Err(refuse(StatusCode::UNSUPPORTED_MEDIA_TYPE, "send JSON"));
            }
        }
        Ok(Verdict::Allowed)
    }

    /// Spend the link's token, if `token` is it and it is unspent.
    fn sign_in(&self, token: &str) -> SignIn {
        let mut slot = self.token.lock().expect("token lock");
        match slot.as_ref() {
            None => return SignIn::Spent,
            Some(t) if !t.matches(token) => return SignIn::Wrong,
            Some(_) => {}
        }
        *slot = None;
        let secrets = Secrets {
            session: Secret::random(),
            page: Secret::random(),
        };
        let verdict = Verdict::SignIn {
            session: secrets.session.hex(),
            page: secrets.page.hex(),
        };
        *self.secrets.lock().expect("secrets lock") = Some(secrets);
        SignIn::Done(verdict)
    }
}

enum SignIn {
    Done(Verdict),
    Spent,
    Wrong,
}

/// The values of the cookies named `name` in the `Cookie` header(s).
fn cookies<'h>(headers: &'h HeaderMap, name: &'h str) -> impl Iterator<Item = &'h str> + 'h {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .filter(move |(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The value of `key` in a query string.
pub(super) fn param<'q>(query: &'q str, key: &str) -> Option<&'q str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    const HOST_OK: &str = "127.0.0.1:4000";
    const ROOT: Need = Need::Page { root: true };

    fn gate() -> (Gate, String) {
        Gate::new(HOST_OK.parse().unwrap())
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn status(r: Result<Verdict, Refusal>) -> StatusCode {
        r.expect_err("allowed").status
    }

    /// Sign in with the link; the session and the page cookie's header.
    fn sign_in(gate: &Gate, token: &str) -> (String, String) {
        let h = headers(&[("host", HOST_OK)]);
        match gate.check(ROOT, &Method::GET, Some(&format!("token={token}")), &h) {
            Ok(Verdict::SignIn { session, page }) => {
                (session, format!("other=x; {}={page}", gate.cookie_name()))
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn nothing_without_the_token_and_the_token_once() {
        let (gate, token) = gate();
        let h = headers(&[("host", HOST_OK)]);
        for need in [
            ROOT,
            Need::Page { root: false },
            Need::Session,
            Need::Stream,
        ] {
            assert_eq!(
                status(gate.check(need, &Method::GET, None, &h)),
                StatusCode::UNAUTHORIZED,
                "{need:?}"
            );
        }
        let wrong = format!("token={}", "0".repeat(64));
        let refused = gate
            .check(ROOT, &Method::GET, Some(&wrong), &h)
            .unwrap_err();
        assert_eq!(
            (refused.status, refused.why),
            (StatusCode::FORBIDDEN, WRONG_LINK)
        );
        // A HEAD or a prefetch does not spend the link (nor sign in).
        let link = format!("token={token}");
        assert_eq!(
            status(gate.check(ROOT, &Method::HEAD, Some(&link), &h)),
            StatusCode::UNAUTHORIZED
        );
        let prefetch = headers(&[("host", HOST_OK), ("sec-purpose", "prefetch;prerender")]);
        assert_eq!(
            status(gate.check(ROOT, &Method::GET, Some(&link), &prefetch)),
            StatusCode::UNAUTHORIZED
        );
        // The token signs in at `/` only.
        let at_script = format!("token={token}");
        assert_eq!(
            status(gate.check(
                Need::Page { root: false },
                &Method::GET,
                Some(&at_script),
                &h
            )),
            StatusCode::UNAUTHORIZED
        );
        let (session, page) = sign_in(&gate, &token);
        // Spent: another browser with the same link gets nothing.
        let again = format!("token={token}");
        let refused = gate
            .check(ROOT, &Method::GET, Some(&again), &h)
            .unwrap_err();
        assert_eq!(
            (refused.status, refused.why),
            (StatusCode::FORBIDDEN, USED_LINK)
        );
        // The browser that signed in reloads the page, and opens the link again.
        let with_page = headers(&[("host", "localhost:4000"), ("cookie", &page)]);
        assert_eq!(
            gate.check(ROOT, &Method::GET, None, &with_page),
            Ok(Verdict::Allowed)
        );
        assert_eq!(
            gate.check(ROOT, &Method::GET, Some(&again), &with_page),
            Ok(Verdict::Allowed)
        );
        // The page cookie opens the page, never the API.
        assert_eq!(
            status(gate.check(Need::Session, &Method::GET, None, &with_page)),
            StatusCode::UNAUTHORIZED
        );
        let with_session = headers(&[("host", HOST_OK), (SESSION_HEADER, &session)]);
        assert_eq!(
            gate.check(Need::Session, &Method::GET, None, &with_session),
            Ok(Verdict::Allowed)
        );
        // Neither the token nor the page secret is a session, in the
        // header or in the stream's query; the token is no page cookie.
        let page_secret = page.rsplit('=').next().unwrap();
        for not_session in [token.as_str(), page_secret] {
            let h = headers(&[("host", HOST_OK), (SESSION_HEADER, not_session)]);
            assert_eq!(
                status(gate.check(Need::Session, &Method::GET, None, &h)),
                StatusCode::UNAUTHORIZED
            );
            let bare = headers(&[("host", HOST_OK)]);
            let q = format!("session={not_session}");
            assert_eq!(
                status(gate.check(Need::Stream, &Method::GET, Some(&q), &bare)),
                StatusCode::UNAUTHORIZED
            );
        }
        let token_cookie = format!("{}={token}", gate.cookie_name());
        let h = headers(&[("host", HOST_OK), ("cookie", &token_cookie)]);
        assert_eq!(
            status(gate.check(ROOT, &Method::GET, None, &h)),
            StatusCode::UNAUTHORIZED
        );
        // A planted cookie of the same name does not hide the real one.
        let planted = format!("{}={}; {page}", gate.cookie_name(), "1".repeat(64));
        let h = headers(&[("host", HOST_OK), ("cookie", &planted)]);
        assert_eq!(
            gate.check(ROOT, &Method::GET, None, &h),
            Ok(Verdict::Allowed)
        );
    }

    #[test]
    fn the_session_in_a_query_only_for_the_event_stream() {
        let (gate, token) = gate();
        let (session, _) = sign_in(&gate, &token);
        let h = headers(&[("host", HOST_OK)]);
        let query = format!("rollout=r-1&session={session}");
        assert_eq!(
            gate.check(Need::Stream, &Method::GET, Some(&query), &h),
            Ok(Verdict::Allowed)
        );
        assert_eq!(
            status(gate.check(Need::Session, &Method::GET, Some(&query), &h)),
            StatusCode::UNAUTHORIZED
        );
        let page = headers(&[
            ("host", HOST_OK),
            ("origin", "http://127.0.0.1:4000"),
            ("content-type", "application/json"),
        ]);
        for need in [Need::Session, Need::Stream] {
            assert_eq!(
                status(gate.check(need, &Method::POST, Some(&query), &page)),
                StatusCode::UNAUTHORIZED
            );
        }
    }

    #[test]
    fn other_host_names_are_refused_even_signed_in() {
        let (gate, token) = gate();
        let (session, page) = sign_in(&gate, &token);
        for host in ["evil.example:4000", "127.0.0.1:4001", "127.0.0.1"] {
            let h = headers(&[
                ("host", host),
                (SESSION_HEADER, &session),
                ("cookie", &page),
            ]);
            for need in [ROOT, Need::Session, Need::Stream] {
                assert_eq!(
                    status(gate.check(need, &Method::GET, None, &h)),
                    StatusCode::MISDIRECTED_REQUEST,
                    "{host}"
                );
            }
        }
        let (gate, token) = Gate::new("10.0.0.5:4000".parse().unwrap());
        let h = headers(&[("host", "localhost:4000")]);
        assert_eq!(
            status(gate.check(ROOT, &Method::GET, Some(&format!("token={token}")), &h)),
            StatusCode::MISDIRECTED_REQUEST,
            "localhost is only an alias of a loopback address"
        );
    }

    #[test]
    fn changes_need_our_origin_and_json() {
        let (gate, token) = gate();
        let (session, page) = sign_in(&gate, &token);
        let post = |pairs: &[(&'static str, &str)]| {
            let mut all = vec![("host", HOST_OK), (SESSION_HEADER, session.as_str())];
            all.extend_from_slice(pairs);
            gate.check(Need::Session, &Method::POST, None, &headers(&all))
        };
        assert_eq!(
            status(post(&[("content-type", "application/json")])),
            StatusCode::FORBIDDEN
        );
        for origin in ["http://evil.example", "http://127.0.0.1:4001", "null"] {
            assert_eq!(
                status(post(&[
                    ("origin", origin),
                    ("content-type", "application/json")
                ])),
                StatusCode::FORBIDDEN,
                "{origin}"
            );
        }
        assert_eq!(
            status(post(&[
                ("origin", "http://127.0.0.1:4000"),
                ("content-type", "text/plain")
            ])),
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        assert_eq!(
            post(&[
                ("origin", "http://127.0.0.1:4000"),
                ("content-type", "application/json; charset=utf-8")
            ]),
            Ok(Verdict::Allowed)
        );
        let h = headers(&[("host", HOST_OK), ("cookie", &page)]);
        assert_eq!(
            status(gate.check(ROOT, &Method::POST, None, &h)),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
