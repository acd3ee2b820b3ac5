//! Who may use the web view: whoever opened the one-time link, in the
//! browser tab that opened it, through the address it is served on.
//!
//! `rollguard ui` acts with the operator's certificate, so anything that
//! gets through this gate acts as the operator. It checks:
//!
//! 1. On every request, that the `Host` header names the address served on
//!    (or `localhost` with its port, on loopback). A page of another site
//!    whose DNS name is rebound to 127.0.0.1 sends its own name, and is
//!    refused.
//! 2. The link's token is good once: the page trades it
//!    (`POST /api/session`) for a session secret and takes it out of the
//!    address bar; a copy of the link in a shell history or a log then
//!    opens nothing.
//! 3. Every API request carries that secret in the `X-Rollguard-Session`
//!    header (the event stream, which cannot send headers, in its query;
//!    no other route takes it there).
//!    Not in a cookie: browsers send cookies for 127.0.0.1 to every port,
//!    so any other local web server the browser visits would receive it.
//!    The page keeps it in `localStorage`, which is per origin, port
//!    included.
//! 4. A request that changes something (any method but GET/HEAD) must also
//!    come from the page itself: `Origin` equal to ours and a JSON body. A
//!    page of another origin can send neither without a CORS preflight,
//!    which this server never grants.
//!
//! The page's HTML, script and style are public: they hold no secret.

use std::net::SocketAddr;
use std::sync::Mutex;

use hyper::header::{HeaderMap, CONTENT_TYPE, HOST, ORIGIN};
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
    /// The page's static files.
    Nothing,
    /// Trading the link's token for a session: a request from the page.
    FromPage,
    /// An API call: the session, and a request from the page if it changes
    /// anything.
    Session,
    /// The event stream: the session, which `EventSource` can only send in
    /// the query.
    Stream,
}

pub struct Gate {
    /// `Host` header values accepted.
    hosts: Vec<String>,
    /// The link's token; `None` once spent.
    token: Mutex<Option<Secret>>,
    /// The one session, once the token is spent.
    session: Mutex<Option<Secret>>,
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
            token: Mutex::new(Some(token)),
            session: Mutex::new(None),
        };
        (gate, hex)
    }

    pub fn check(
        &self,
        need: Need,
        method: &Method,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<(), Refusal> {
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
        if need == Need::Nothing {
            return if changes {
                Err(refuse(StatusCode::METHOD_NOT_ALLOWED, "read-only"))
            } else {
                Ok(())
            };
        }
        if need == Need::Session || need == Need::Stream {
            // The query is accepted for the event stream only, a read.
            let presented = headers
                .get(SESSION_HEADER)
                .and_then(|v| v.to_str().ok())
                .or_else(|| {
                    query
                        .filter(|_| need == Need::Stream && !changes)
                        .and_then(session_of)
                });
            let valid = presented.is_some_and(|p| {
                self.session
                    .lock()
                    .expect("session lock")
                    .as_ref()
                    .is_some_and(|s| s.matches(p))
            });
            if !valid {
                return Err(refuse(
                    StatusCode::UNAUTHORIZED,
                    "not signed in: open the link `rollguard ui` printed",
                ));
            }
        }
        if changes || need == Need::FromPage {
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
        Ok(())
    }

    /// Trade the link's token for the session secret; once.
    pub fn sign_in(&self, token: &str) -> Result<String, Refusal> {
        let mut slot = self.token.lock().expect("token lock");
        if !slot.as_ref().is_some_and(|t| t.matches(token)) {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "this link has been used (it works once): run `rollguard ui` again for a new one",
            ));
        }
        *slot = None;
        let session = Secret::random();
        let hex = session.hex();
        *self.session.lock().expect("session lock") = Some(session);
        Ok(hex)
    }
}

/// `session=HEX` in a query string.
fn session_of(query: &str) -> Option<&str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "session")
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    const HOST_OK: &str = "127.0.0.1:4000";

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

    fn status(r: Result<(), Refusal>) -> StatusCode {
        r.expect_err("allowed").status
    }

    #[test]
    fn the_token_works_once_and_the_session_after_it() {
        let (gate, token) = gate();
        let h = headers(&[("host", HOST_OK)]);
        assert_eq!(
            status(gate.check(Need::Session, &Method::GET, None, &h)),
            StatusCode::UNAUTHORIZED
        );
        assert!(gate.sign_in(&"0".repeat(64)).is_err());
        assert!(gate.sign_in("not hex").is_err());
        let session = gate.sign_in(&token).unwrap();
        assert_eq!(
            gate.sign_in(&token).unwrap_err().status,
            StatusCode::FORBIDDEN,
            "spent: another browser with the same link gets nothing"
        );
        let with = headers(&[("host", "localhost:4000"), (SESSION_HEADER, &session)]);
        assert_eq!(gate.check(Need::Session, &Method::GET, None, &with), Ok(()));
        let query = format!("rollout=r-1&session={session}");
        assert_eq!(
            gate.check(Need::Stream, &Method::GET, Some(&query), &h),
            Ok(()),
            "the event stream's query"
        );
        assert_eq!(
            status(gate.check(Need::Session, &Method::GET, Some(&query), &h)),
            StatusCode::UNAUTHORIZED,
            "only the event stream takes the session in its query"
        );
        // The token is not a session, and a query cannot authorise a change.
        let by_token = headers(&[("host", HOST_OK), (SESSION_HEADER, &token)]);
        assert_eq!(
            status(gate.check(Need::Session, &Method::GET, None, &by_token)),
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
    fn other_host_names_are_refused_even_with_the_session() {
        let (gate, token) = gate();
        let session = gate.sign_in(&token).unwrap();
        for host in ["evil.example:4000", "127.0.0.1:4001", "127.0.0.1"] {
            let h = headers(&[("host", host), (SESSION_HEADER, &session)]);
            for need in [Need::Nothing, Need::FromPage, Need::Session] {
                assert_eq!(
                    status(gate.check(need, &Method::GET, None, &h)),
                    StatusCode::MISDIRECTED_REQUEST,
                    "{host}"
                );
            }
        }
        let (gate, _) = Gate::new("10.0.0.5:4000".parse().unwrap());
        let h = headers(&[("host", "localhost:4000")]);
        assert_eq!(
            status(gate.check(Need::Nothing, &Method::GET, None, &h)),
            StatusCode::MISDIRECTED_REQUEST,
            "localhost is only an alias of a loopback address"
        );
    }

    #[test]
    fn changes_and_sign_in_need_our_origin_and_json() {
        let (gate, token) = gate();
        let session = gate.sign_in(&token).unwrap();
        for need in [Need::FromPage, Need::Session] {
            let post = |pairs: &[(&'static str, &str)]| {
                let mut all = vec![("host", HOST_OK), (SESSION_HEADER, session.as_str())];
                all.extend_from_slice(pairs);
                gate.check(need, &Method::POST, None, &headers(&all))
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
                Ok(())
            );
        }
        let h = headers(&[("host", HOST_OK)]);
        assert_eq!(
            status(gate.check(Need::Nothing, &Method::POST, None, &h)),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
