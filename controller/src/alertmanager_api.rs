//! Level-triggered alert gates: the controller asks Alertmanager's API for
//! the alerts active right now (`GET /api/v2/alerts?active=true&
//! silenced=false&inhibited=false`) before it starts, resumes or dispatches
//! the next wave of a rollout. The webhook (`alerts.rs`) is edge-triggered:
//! Alertmanager posts an alert once and again only after its
//! `repeat_interval` (4 h by default), so an alert already firing when a
//! rollout starts would never halt it.
//!
//! Plain HTTP/1.1 (`http_out`), one connection per question, bounded in time (the configured timeout covers connecting,
//! sending and reading) and in size ([`MAX_RESPONSE_BYTES`]). Any failure is
//! an error the engine treats as "alert state unknown", which fails closed.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use serde::Deserialize;

use crate::http_out::{self, HttpOutError};

use crate::alerts::{Alert, AlertStatus};

/// Largest answer read from Alertmanager (16 MiB: some ten thousand alerts).
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// The query: alerts that are active and neither silenced nor inhibited.
const QUERY: &str = "/api/v2/alerts?active=true&silenced=false&inhibited=false";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("alertmanager url {url:?}: {reason}")]
pub struct BadUrl {
    url: String,
    reason: String,
}

/// `http://host[:port][/prefix]`: where Alertmanager's API is (the prefix
/// is its `--web.route-prefix`, if any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiUrl {
    raw: String,
    /// `host:port` as written (the Host header).
    authority: String,
    /// The host to connect to (brackets of an IPv6 literal removed).
    host: String,
    port: u16,
    /// Path prefix without a trailing slash ("" for none).
    prefix: String,
}

impl ApiUrl {
    pub fn parse(raw: &str) -> Result<Self, BadUrl> {
        let bad = |reason: &str| BadUrl {
            url: raw.to_string(),
            reason: reason.to_string(),
        };
        let rest = raw.strip_prefix("http://").ok_or_else(|| {
            bad("must start with http:// (the controller speaks plain HTTP to Alertmanager; https is not supported)")
        })?;
        if rest.contains(['?', '#', '@']) || rest.chars().any(|c| !c.is_ascii_graphic()) {
            return Err(bad(
                "must be http://host[:port][/prefix] (no credentials, query or fragment)",
            ));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("unclosed '[' in the host"))?;
            match after {
                "" => (host, None),
                p => (
                    host,
                    Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| bad("expected :port after the IPv6 address"))?,
                    ),
                ),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = match port {
            None => 80,
            Some(p) => p.parse().map_err(|_| bad("the port is not a number"))?,
        };
        Ok(ApiUrl {
            raw: raw.to_string(),
            authority: authority.to_string(),
            host: host.to_string(),
            port,
            prefix: path.trim_end_matches('/').to_string(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }
}

impl fmt::Display for ApiUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// Why the active alerts could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("HTTP: {0}")]
    Http(hyper::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("bad request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("answered HTTP {0}")]
    Status(hyper::StatusCode),
    #[error("reading the answer: {0}")]
    Body(String),
    #[error("not a list of alerts: {0}")]
    Json(#[from] serde_json::Error),
}

impl From<HttpOutError> for ApiError {
    fn from(e: HttpOutError) -> Self {
        match e {
            HttpOutError::Connect(e) => ApiError::Connect(e),
            HttpOutError::Tls(e) => ApiError::Tls(e),
            HttpOutError::Http(e) => ApiError::Http(e),
            HttpOutError::Body(e) => ApiError::Body(e),
        }
    }
}

/// One alert of `GET /api/v2/alerts` (Alertmanager's `gettableAlert`; what
/// we do not use is ignored, what we use is required).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GettableAlert {
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    starts_at: String,
    #[serde(default)]
    ends_at: String,
    #[serde(default)]
    fingerprint: String,
    status: GettableStatus,
}

#[derive(Debug, Deserialize)]
struct GettableStatus {
    /// "active", "suppressed" or "unprocessed".
    state: String,
}

/// Parse an answer of `GET /api/v2/alerts` into the alerts that count:
/// every one not suppressed (the query already asks for that; an
/// "unprocessed" alert, which Alertmanager has not yet routed, counts).
pub fn parse_alerts(body: &[u8]) -> Result<Vec<Alert>, serde_json::Error> {
    let list: Vec<GettableAlert> = serde_json::from_slice(body)?;
    Ok(list
        .into_iter()
        .filter(|a| a.status.state != "suppressed")
        .map(|a| Alert {
            status: AlertStatus::Firing,
            labels: a.labels,
            annotations: a.annotations,
            starts_at: a.starts_at,
            ends_at: a.ends_at,
            fingerprint: a.fingerprint,
        })
        .collect())
}

/// The `[alertmanager]` of the controller's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertmanagerApi {
    pub url: ApiUrl,
    /// Bounds one question, from connecting to the last byte of the answer.
    pub timeout: Duration,
}

impl AlertmanagerApi {
    /// The alerts active right now, neither silenced nor inhibited.
    pub async fn active_alerts(&self) -> Result<Vec<Alert>, ApiError> {
        tokio::time::timeout(self.timeout, self.fetch())
            .await
            .map_err(|_| ApiError::Timeout(self.timeout))?
    }

    async fn fetch(&self) -> Result<Vec<Alert>, ApiError> {
        let request = hyper::Request::get(format!("{}{QUERY}", self.url.prefix))
            .header(hyper::header::HOST, &self.url.authority)
            .header(hyper::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())?;
        let peer = http_out::Peer {
            host: &self.url.host,
            port: self.url.port,
            tls: None,
        };
        let (status, body) = http_out::exchange(&peer, request, MAX_RESPONSE_BYTES).await?;
        if status != hyper::StatusCode::OK {
            return Err(ApiError::Status(status));
        }
        Ok(parse_alerts(&body)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn urls() {
        let u = ApiUrl::parse("http://127.0.0.1:9093").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.prefix.as_str()),
            ("127.0.0.1", 9093, "")
        );
        let u = ApiUrl::parse("http://am.example/alertmanager/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.prefix.as_str()),
            ("am.example", 80, "/alertmanager")
        );
        let u = ApiUrl::parse("http://[::1]:9093").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 9093));
        for bad in [
            "https://127.0.0.1:9093",
            "127.0.0.1:9093",
            "http://",
            "http://:9093",
            "http://h:port",
            "http://u:p@h:1",
            "http://h:1/?x",
            "http://[::1",
        ] {
            assert!(ApiUrl::parse(bad).is_err(), "{bad:?}");
        }
    }

    /// In the shape of Alertmanager 0.25's `GET /api/v2/alerts` answer (its
    /// `gettableAlerts` schema; written by hand, not recorded).
    const ANSWER: &str = r#"[{"annotations":{"summary":"queue stuck"},"endsAt":"2026-12-06T04:10:00.000Z","fingerprint":"9a1c","receivers":[{"name":"null"}],"startsAt":"2026-12-06T04:05:00.000Z","status":{"inhibitedBy":[],"silencedBy":[],"state":"active"},"updatedAt":"2026-12-06T04:05:00.000Z","labels":{"alertname":"MailQueueStuck","severity":"critical"}},
      {"annotations":{},"endsAt":"x","fingerprint":"1","receivers":[],"startsAt":"x","status":{"inhibitedBy":[],"silencedBy":["s"],"state":"suppressed"},"updatedAt":"x","labels":{"alertname":"Silenced","severity":"critical"}}]"#;

    #[test]
    fn answers_parse_and_suppressed_alerts_do_not_count() {
        let alerts = parse_alerts(ANSWER.as_bytes()).unwrap();
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].name(), "MailQueueStuck");
        assert!(alerts[0].describe().contains("queue stuck"));
        assert!(parse_alerts(b"[]").unwrap().is_empty());
        for garbage in [
            &b"{}"[..],
            b"<html>",
            b"[{\"labels\":{}}]",
            b"[{\"labels\":{\"a\":1},\"status\":{\"state\":\"active\"}}]",
        ] {
            assert!(parse_alerts(garbage).is_err());
        }
    }

    /// A one-shot HTTP server answering `response` to the first request.
    async fn serve_once(response: Vec<u8>) -> AlertmanagerApi {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                got.extend_from_slice(&buf[..n]);
            }
            let head = String::from_utf8_lossy(&got);
            assert!(head.starts_with(&format!("GET {QUERY} HTTP/1.1")), "{head}");
            let _ = s.write_all(&response).await;
            // Hold the connection open (a server that never finishes).
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        AlertmanagerApi {
            url: ApiUrl::parse(&format!("http://127.0.0.1:{port}")).unwrap(),
            timeout: Duration::from_millis(500),
        }
    }

    fn http(status: &str, body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    #[tokio::test]
    async fn the_client_reads_alerts_and_fails_on_anything_else() {
        let api = serve_once(http("200 OK", ANSWER)).await;
        assert_eq!(api.active_alerts().await.unwrap().len(), 1);

        let api = serve_once(http("200 OK", "garbage")).await;
        assert!(matches!(api.active_alerts().await, Err(ApiError::Json(_))));

        let api = serve_once(http("500 Internal Server Error", "[]")).await;
        assert!(matches!(
            api.active_alerts().await,
            Err(ApiError::Status(_))
        ));

        // Headers but never the whole body: the timeout ends it.
        let api = serve_once(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n[".to_vec()).await;
        assert!(matches!(
            api.active_alerts().await,
            Err(ApiError::Timeout(_))
        ));

        // Larger than the limit.
        let mut big = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
            MAX_RESPONSE_BYTES + 1
        )
        .into_bytes();
        big.resize(big.len() + MAX_RESPONSE_BYTES + 1, b' ');
        let mut api = serve_once(big).await;
        api.timeout = Duration::from_secs(20);
        assert!(matches!(api.active_alerts().await, Err(ApiError::Body(_))));

        // Nobody listening.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let api = AlertmanagerApi {
            url: ApiUrl::parse(&format!("http://127.0.0.1:{port}")).unwrap(),
            timeout: Duration::from_secs(2),
        };
        assert!(matches!(
            api.active_alerts().await,
            Err(ApiError::Connect(_))
        ));
    }
}
