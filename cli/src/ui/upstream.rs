//! The web view's connection to the controller: one HTTP/2 connection with
//! the operator's certificate, opened again when it drops (a replica
//! restarted, a network blip), so a page left open keeps working.

use anyhow::{anyhow, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::{Method, StatusCode};
use rollguard_shared::tls_client::{Connector, KeepAlive, Session};
use std::time::Duration;
use tokio::sync::Mutex;

/// Largest answer read from the controller.
const MAX_ANSWER: usize = 16 * 1024 * 1024;

/// How long one call may take, connection included.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Upstream {
    connector: Connector,
    session: Mutex<Option<Session>>,
}

/// The controller's answer: its status and body, passed on to the page.
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Upstream {
    pub fn new(connector: Connector) -> Self {
        // Unlike the one-shot CLI, this runtime keeps running between
        // calls, so HTTP/2 pings can notice a dead controller early.
        let connector = connector.keep_alive(KeepAlive {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(10),
        });
        Upstream {
            connector,
            session: Mutex::new(None),
        }
    }

    async fn session(&self) -> Result<Session> {
        let mut slot = self.session.lock().await;
        if let Some(s) = slot.as_ref() {
            return Ok(s.clone());
        }
        let s = self.connector.connect().await?;
        *slot = Some(s.clone());
        Ok(s)
    }

    /// One call to the controller. A GET whose connection failed is tried
    /// once more on a new connection; anything else is not, since the
    /// controller may have acted on it.
    pub async fn call(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<Answer> {
        let attempt = || async {
            let session = self.session().await?;
            let content = body.clone().map(|b| (b, "application/json"));
            match session.request(method.clone(), path, content).await {
                Ok(resp) => {
                    let status = resp.status();
                    let body = Limited::new(resp.into_body(), MAX_ANSWER)
                        .collect()
                        .await
                        .map_err(|e| anyhow!("reading the answer to {method} {path}: {e}"))?
                        .to_bytes();
                    Ok(Answer { status, body })
                }
                Err(e) => {
                    self.session.lock().await.take();
                    Err(anyhow::Error::new(e))
                }
            }
        };
        let timed = || async {
            match tokio::time::timeout(CALL_TIMEOUT, attempt()).await {
                Ok(answer) => answer,
                Err(_) => {
                    // A connection that stalls a call is not used again.
                    self.session.lock().await.take();
                    Err(anyhow!(
                        "the controller did not answer {method} {path} in time"
                    ))
                }
            }
        };
        match timed().await {
            Err(e) if method == Method::GET => {
                tracing::debug!(error = %e, "controller call failed; reconnecting");
                timed().await
            }
            other => other,
        }
    }
}
