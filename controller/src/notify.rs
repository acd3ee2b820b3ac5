//! Notifications out: `[[notify]] url = "..."` in the controller's
//! configuration gets a JSON POST for each event operators want to hear
//! about without watching a terminal: a rollout started, halted (with the
//! reason and its first denials), completed; a kill issued or lifted.
//!
//! Delivery never blocks a rollout, a halt or a kill: events go into a
//! bounded queue per target ([`QUEUE`]), and a task per target posts them
//! in order. A failed post (no connection, a non-2xx answer, no answer
//! within [`ATTEMPT_TIMEOUT`]) is retried with exponential backoff, at most
//! [`ATTEMPTS`] times; then the event is dropped with an error in the log.
//! A target that cannot keep up loses events (a warning each), never the
//! controller's memory. The operator log (`rollguard-controller log`)
//! stays the record; notifications are the messenger.
//!
//! `http://` and `https://` (TLS 1.2/1.3, the system's trust store from
//! `ca-certificates`: chat services' hooks are on public CAs). The body is
//! the event as JSON: `{"event": "rollout.halted", "at": "...", ...}`.
//! One connection per post (`http_out`), which is plenty for a few events
//! a minute.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Uri};
use serde::Serialize;

use crate::http_out;
use tokio::sync::mpsc;

/// Events waiting per target before new ones are dropped.
pub const QUEUE: usize = 256;
/// Tries per event and target.
pub const ATTEMPTS: u32 = 6;
/// One try: connect, TLS, request and answer.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// The wait before the second try; doubled after each failure (1, 2, 4, 8,
/// 16 s: about half a minute in all).
const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// A notification target's URL, parsed: `http` or `https`, a host, no
/// user info.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyUrl(Uri);

impl NotifyUrl {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let uri: Uri = raw
            .parse()
            .map_err(|e| format!("notify url {raw:?}: {e}"))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err(format!("notify url {raw:?}: use http:// or https://")),
        }
        let Some(authority) = uri.authority() else {
            return Err(format!("notify url {raw:?}: no host"));
        };
        if authority.as_str().contains('@') {
            return Err(format!(
                "notify url {raw:?}: user info in a URL ends up in logs; put a token in the path"
            ));
        }
        Ok(NotifyUrl(uri))
    }

    fn https(&self) -> bool {
        self.0.scheme_str() == Some("https")
    }

    /// The host to connect to: an IPv6 literal without its URL brackets.
    fn host(&self) -> &str {
        let host = self.0.host().unwrap_or_default();
        host.strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
    }

    fn port(&self) -> u16 {
        self.0
            .port_u16()
            .unwrap_or(if self.https() { 443 } else { 80 })
    }

    /// Scheme, host and port only: the path of a chat hook is its secret.
    pub fn shown(&self) -> String {
        format!(
            "{}://{}:{}",
            self.0.scheme_str().unwrap_or("?"),
            self.host(),
            self.port()
        )
    }
}

/// What happened, as posted.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event")]
pub enum Event {
    #[serde(rename = "rollout.started")]
    RolloutStarted {
        rollout: String,
        bundle: String,
        version: u64,
        hosts: usize,
        by: String,
    },
    #[serde(rename = "rollout.halted")]
    RolloutHalted {
        rollout: String,
        reason: String,
        /// The first denied accesses reported by its hosts (host, access,
        /// path), at most [`FIRST_DENIALS`].
        denials: Vec<serde_json::Value>,
    },
    #[serde(rename = "rollout.completed")]
    RolloutCompleted { rollout: String },
    #[serde(rename = "kill.issued")]
    KillIssued {
        scope: serde_json::Value,
        reason: String,
        by: String,
    },
    #[serde(rename = "kill.lifted")]
    KillLifted {
        scope: serde_json::Value,
        by: String,
    },
}

/// How many denials a halt's notification carries.
pub const FIRST_DENIALS: usize = 5;

/// The event with the time it was seen: what is posted.
#[derive(Serialize)]
struct Posted {
    #[serde(flatten)]
    event: Event,
    at: String,
}

/// The sending side: cheap to clone, never blocks.
#[derive(Clone, Default)]
pub struct Notifier {
    targets: Arc<Vec<(NotifyUrl, mpsc::Sender<Arc<Posted>>)>>,
}

impl Notifier {
    /// A notifier for `urls`, with a delivery task each on the current
    /// Tokio runtime. No URL: a notifier that sends nothing.
    pub fn spawn(urls: &[NotifyUrl]) -> Self {
        let tls = if urls.iter().any(NotifyUrl::https) {
            http_out::system_tls()
        } else {
            None
        };
        let targets = urls
            .iter()
            .map(|url| {
                let (tx, rx) = mpsc::channel(QUEUE);
                tokio::spawn(deliver(url.clone(), tls.clone(), rx));
                (url.clone(), tx)
            })
            .collect();
        Notifier {
            targets: Arc::new(targets),
        }
    }

    /// Queue `event` for every target; never waits.
    pub fn send(&self, event: Event) {
        if self.targets.is_empty() {
            return;
        }
        // One copy, shared by the targets' queues.
        let posted = Arc::new(Posted {
            event,
            at: jiff::Timestamp::now().to_string(),
        });
        for (url, tx) in self.targets.iter() {
            if tx.try_send(posted.clone()).is_err() {
                tracing::warn!(target = %url.shown(), "notification queue full: event dropped");
            }
        }
    }
}

type TlsConfig = Option<Arc<rustls::ClientConfig>>;

/// Largest answer read from a hook (its body is not used).
const MAX_ANSWER: usize = 64 * 1024;

/// One target's delivery task: its events in order, each retried.
async fn deliver(url: NotifyUrl, tls: TlsConfig, mut rx: mpsc::Receiver<Arc<Posted>>) {
    while let Some(posted) = rx.recv().await {
        let body = match serde_json::to_vec(&*posted) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                tracing::error!("notification not encoded: {e}");
                continue;
            }
        };
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1..=ATTEMPTS {
            let result = tokio::time::timeout(ATTEMPT_TIMEOUT, post(&url, &tls, body.clone()))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {ATTEMPT_TIMEOUT:?}")));
            match result {
                Ok(()) => break,
                Err(e) if attempt == ATTEMPTS => {
                    tracing::error!(target = %url.shown(), attempts = ATTEMPTS, error = %e, "notification dropped");
                }
                Err(e) => {
                    tracing::warn!(target = %url.shown(), attempt, error = %e, "notification failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
            }
        }
    }
}

/// One POST; `Ok` on a 2xx answer.
async fn post(url: &NotifyUrl, tls: &TlsConfig, body: Bytes) -> Result<(), String> {
    let request = Request::builder()
        .method(Method::POST)
        .uri(url.0.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
        .header(
            hyper::header::HOST,
            url.0.authority().map(|a| a.as_str()).unwrap_or_default(),
        )
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(
            hyper::header::USER_AGENT,
            concat!("rollguard-controller/", env!("CARGO_PKG_VERSION")),
        )
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let peer = http_out::Peer {
        host: url.host(),
        port: url.port(),
        tls: if url.https() {
            Some(tls.clone().ok_or("no TLS configuration")?)
        } else {
            None
        },
    };
    let (status, _) = http_out::exchange(&peer, request, MAX_ANSWER)
        .await
        .map_err(|e| e.to_string())?;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("answered {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_http_or_https_with_a_host_and_no_user_info() {
        let u = NotifyUrl::parse("https://hooks.example.com/services/T0/B0/secret").unwrap();
        assert_eq!(u.shown(), "https://hooks.example.com:443");
        assert_eq!(
            NotifyUrl::parse("http://127.0.0.1:8080/x").unwrap().port(),
            8080
        );
        for bad in [
            "ftp://x/",
            "hooks.example.com/x",
            "https:///x",
            "https://user:pw@hooks.example.com/",
            "",
        ] {
            assert!(NotifyUrl::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn events_are_tagged_json() {
        let e = Event::RolloutHalted {
            rollout: "r-1".into(),
            reason: "mail-01: denied".into(),
            denials: vec![serde_json::json!({"host": "mail-01", "path": "/srv/backup"})],
        };
        let v = serde_json::to_value(Posted {
            event: e,
            at: "t".into(),
        })
        .unwrap();
        assert_eq!(v["event"], "rollout.halted");
        assert_eq!(v["at"], "t");
        assert_eq!(v["denials"][0]["path"], "/srv/backup");
    }
}
