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

/// Largest answer read whole from the controller (as the CLI's).
const MAX_ANSWER: usize = 64 * 1024 * 1024;

/// How long a read may take, connection included. Actions (POST) have no
/// limit: a kill waits for the agents' acknowledgements as long as the
/// controller's `kill_ack_timeout` says, and giving up early would only
/// hide its outcome.
const READ_TIMEOUT: Duration = Duration::from_secs(20);

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

    /// A GET whose body the caller reads as it comes (a bundle: its size is
    /// bounded by the controller's limit, not by [`MAX_ANSWER`]).
    pub async fn stream(&self, path: &str) -> Result<hyper::Response<hyper::body::Incoming>> {
        let session = self.session().await?;
        match tokio::time::timeout(READ_TIMEOUT, session.request(Method::GET, path, None)).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => {
                self.session.lock().await.take();
                Err(anyhow::Error::new(e))
            }
            Err(_) => {
                self.session.lock().await.take();
                Err(anyhow!("the controller did not answer GET {path} in time"))
            }
        }
    }

    /// One call to the controller. A GET whose connection failed is tried
    /// once more on a new connection; anything else is not, since the
    /// controller may have acted on it.
    pub async fn call(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<Answer> {
        self.call_with(method, path, body, true).await
    }

    /// A GET tried once (the event stream's polls: its next tick is the
    /// retry, and a failure must show on the page quickly).
    pub async fn poll(&self, path: &str) -> Result<Answer> {
        self.call_with(Method::GET, path, None, false).await
    }

    async fn call_with(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        retry: bool,
    ) -> Result<Answer> {
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
        if method != Method::GET {
            return attempt().await;
        }
        let timed = || async {
            match tokio::time::timeout(READ_TIMEOUT, attempt()).await {
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
            Err(e) if retry => {
                tracing::debug!(error = %e, "controller call failed; reconnecting");
                timed().await
            }
            other => other,
        }
    }
}
