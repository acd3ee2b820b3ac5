//! The daemon's life with the controller: one session per connection
//! (register, deliver reports, follow the order stream), reconnects with
//! backoff, and the certificate's renewal on the way.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use http_body_util::BodyExt;
use hyper::Method;
use rollguard_shared::protocol::{
    KillAck, Order, Register, RolloutId, Sha256Hex, MAX_ORDER_LINE, PING_INTERVAL_SECS,
};
use tokio::sync::Notify;

use super::config::ControllerSection;
use super::download::download;
use super::transport::{ControllerSession, Transport};
use super::{Daemon, RunKind};

impl Daemon {
    /// One connection's life: register, then follow the order stream until
    /// it ends or fails, or until the certificate was renewed (then the
    /// next connection presents the new one).
    async fn session(self: &Arc<Self>, transport: &Transport) -> anyhow::Result<SessionEnd> {
        let session = transport.connect().await?;
        let register = Register {
            name: self.identity.name.clone(),
            labels: self.identity.labels.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            // For the controller's inventory (`rollguard agents`); probed
            // at each connect, so a kernel update shows after the reboot.
            kernel: crate::sandbox::kernel::kernel_release(),
            landlock_abi: crate::sandbox::landlock_abi::probe().ok(),
        };
        let resp = session
            .request(
                Method::POST,
                "/v1/agent/connect",
                Some(serde_json::to_vec(&register)?),
            )
            .await?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = http_body_util::Limited::new(resp.into_body(), 4096)
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            anyhow::bail!("controller refused registration ({status}): {body}");
        }
        tracing::info!(host = %self.identity.name, "connected to the controller");

        // Deliver reports on this connection whenever one is due.
        let outbox = {
            let me = self.clone();
            let s = session.clone();
            tokio::spawn(async move {
                loop {
                    let notified = me.outbox.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    if let Err(e) = me.flush_reports(&s).await {
                        tracing::warn!(error = %e, "could not deliver reports; retrying");
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        continue;
                    }
                    notified.await;
                }
            })
        };
        struct AbortOnDrop(tokio::task::JoinHandle<()>);
        impl Drop for AbortOnDrop {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let _outbox = AbortOnDrop(outbox);

        // Renew the certificate at two thirds of its lifetime.
        let renewed = Arc::new(Notify::new());
        let _renewal = AbortOnDrop({
            let s = session.clone();
            let section = transport.section().clone();
            let name = self.identity.name.clone();
            let done = renewed.clone();
            tokio::spawn(async move {
                if renew_when_due(&s, &section, &name).await {
                    done.notify_one();
                }
            })
        });

        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::new();
        let idle = Duration::from_secs(PING_INTERVAL_SECS * 3);
        loop {
            let frame = tokio::select! {
                frame = tokio::time::timeout(idle, body.frame()) => frame,
                () = renewed.notified() => return Ok(SessionEnd::Renewed),
            };
            let frame = match frame {
                Err(_) => anyhow::bail!("no word from the controller for {}s", idle.as_secs()),
                Ok(None) => return Ok(SessionEnd::Closed),
                Ok(Some(Err(e))) => return Err(e.into()),
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                self.handle_line(&session, &line[..line.len() - 1]);
            }
            if buf.len() > MAX_ORDER_LINE {
                anyhow::bail!("order line longer than {MAX_ORDER_LINE} bytes");
            }
        }
    }

    fn handle_line(self: &Arc<Self>, session: &ControllerSession, line: &[u8]) {
        let order: Order = match serde_json::from_slice(line) {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "ignoring an order the agent does not understand");
                return;
            }
        };
        match order {
            Order::Ping => {}
            Order::KillState(state) => {
                let generation = state.generation;
                // Kill now; write it down off this thread (it serves every
                // order of this host, and of every host of a simulated fleet);
                // acknowledge once durable.
                let killed = self.kill.enforce_fleet(state);
                let me = self.clone();
                let s = session.clone();
                tokio::spawn(async move {
                    let persisted = tokio::task::spawn_blocking(move || me.kill.persist())
                        .await
                        .map_err(anyhow::Error::from)
                        .and_then(|r| r);
                    if let Err(e) = persisted {
                        // Not acknowledged: the controller reports this host as pending.
                        tracing::error!(error = %e, "could not record the kill state");
                        return;
                    }
                    let body =
                        serde_json::to_vec(&KillAck { generation, killed }).unwrap_or_default();
                    if let Err(e) = s
                        .call(Method::POST, "/v1/agent/kill-ack", Some(body), 4096)
                        .await
                    {
                        tracing::warn!(error = %e, "could not acknowledge the kill state");
                    }
                });
            }
            Order::Run {
                rollout_id,
                bundle_sha256,
                bundle_size,
                retry,
            } => self.spawn_run(
                session,
                rollout_id,
                bundle_sha256,
                bundle_size,
                if retry { RunKind::Retry } else { RunKind::Real },
            ),
            Order::Preview {
                rollout_id,
                bundle_sha256,
                bundle_size,
            } => self.spawn_run(
                session,
                rollout_id,
                bundle_sha256,
                bundle_size,
                RunKind::Preview,
            ),
        }
    }

    fn spawn_run(
        self: &Arc<Self>,
        session: &ControllerSession,
        rollout_id: RolloutId,
        bundle_sha256: Sha256Hex,
        bundle_size: u64,
        kind: RunKind,
    ) {
        let s = session.clone();
        let sha = bundle_sha256.clone();
        let fetch = move |path: PathBuf| download(s, sha, bundle_size, path);
        tokio::spawn(
            self.clone()
                .run_order(rollout_id, bundle_sha256, kind, fetch),
        );
    }

    /// Connect, follow orders, reconnect with backoff; forever.
    pub async fn run_forever(self: Arc<Self>, mut transport: Transport) {
        let mut backoff = Duration::from_secs(1);
        loop {
            let started = std::time::Instant::now();
            match self.session(&transport).await {
                Ok(SessionEnd::Renewed) => {
                    match Transport::new(transport.section()) {
                        Ok(t) => {
                            tracing::info!("certificate renewed; reconnecting with it");
                            transport = t;
                            backoff = Duration::from_secs(1);
                            continue;
                        }
                        // The old credentials were replaced only once the
                        // new ones were complete; if they cannot be loaded
                        // the connection fails and is retried like any.
                        Err(e) => {
                            tracing::error!(error = %e, "cannot load the renewed certificate")
                        }
                    }
                }
                Ok(SessionEnd::Closed) => tracing::warn!("the controller closed the order stream"),
                Err(e) => tracing::warn!(error = format!("{e:#}"), "controller connection failed"),
            }
            if started.elapsed() > Duration::from_secs(60) {
                backoff = Duration::from_secs(1);
            }
            tokio::time::sleep(backoff + jitter(backoff)).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
            // The credentials on disk, each time: a renewal whose session
            // ended before it could say so has still replaced them.
            match Transport::new(transport.section()) {
                Ok(t) => transport = t,
                Err(e) => {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "cannot reload the credentials; reconnecting with those loaded before"
                    )
                }
            }
        }
    }
}

/// Why a session ended without an error.
enum SessionEnd {
    /// The controller closed the order stream.
    Closed,
    /// The certificate was renewed: reconnect with the new one.
    Renewed,
}

/// Wait until the certificate is due for renewal (two thirds of its
/// lifetime), then renew it on `session` (`POST /v1/agent/renew`): a key
/// generated here, the certificate put in place crash-safely. Retried with
/// backoff; true once renewed, false if the certificate cannot be read
/// (nothing to renew from).
async fn renew_when_due(
    session: &ControllerSession,
    section: &ControllerSection,
    name: &str,
) -> bool {
    use crate::enroll;
    let validity = std::fs::read_to_string(&section.cert)
        .map_err(anyhow::Error::from)
        .and_then(|pem| enroll::validity(&pem));
    let (not_before, not_after) = match validity {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(cert = %section.cert.display(), error = format!("{e:#}"), "cannot read the certificate's validity; it will not be renewed");
            return false;
        }
    };
    let due = enroll::renewal_due(not_before, not_after);
    if let Ok(wait) = due.duration_since(std::time::SystemTime::now()) {
        tracing::debug!(in_secs = wait.as_secs(), "certificate renewal scheduled");
        tokio::time::sleep(wait).await;
    }
    let mut backoff = Duration::from_secs(5);
    loop {
        match renew_once(session, section, name).await {
            Ok(()) => {
                tracing::info!(cert = %section.cert.display(), "certificate renewed");
                return true;
            }
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "certificate renewal failed; retrying"
                );
                tokio::time::sleep(backoff + jitter(backoff)).await;
                backoff = (backoff * 2).min(Duration::from_secs(300));
            }
        }
    }
}

async fn renew_once(
    session: &ControllerSession,
    section: &ControllerSection,
    name: &str,
) -> anyhow::Result<()> {
    use rollguard_shared::protocol::{EnrollResponse, RenewRequest};
    let name = name.to_string();
    let new_key =
        tokio::task::spawn_blocking(move || crate::enroll::NewKey::generate(&name)).await??;
    let body = serde_json::to_vec(&RenewRequest {
        csr: new_key.csr_pem.clone(),
    })?;
    let answer = session
        .call(Method::POST, "/v1/agent/renew", Some(body), 64 * 1024)
        .await?;
    let answer: EnrollResponse = serde_json::from_slice(&answer).context("the renewal answer")?;
    new_key.check_cert(&answer.cert)?;
    let (cert, key) = (section.cert.clone(), section.key.clone());
    tokio::task::spawn_blocking(move || {
        crate::enroll::install_renewed(&cert, &key, &new_key.key_pem, &answer.cert)
    })
    .await??;
    Ok(())
}

/// Up to a quarter of `d`, from the clock's nanoseconds: spreads a fleet's
/// reconnects after a controller restart. Not security relevant, so no
/// random-number crate for it.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    d.mul_f64((nanos % 1000) as f64 / 4000.0)
}
