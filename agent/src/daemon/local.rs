//! The host-local control socket: `rollguard-agent kill` reaches the
//! running daemon here when the controller is unreachable.
//!
//! A Unix socket, mode 0600, and every peer's credentials are checked
//! (`SO_PEERCRED`): only root (or the daemon's own user) may use it. One
//! JSON request line, one JSON answer line.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::kill_switch::KillFile;

/// Default socket path.
pub const DEFAULT_SOCKET: &str = "/run/rollguard/agent.sock";
const MAX_REQUEST: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum LocalRequest {
    /// Kill every running bundle and refuse new runs until lifted here.
    Kill {
        reason: String,
    },
    /// Lift the local kill (a fleet kill stays until the controller lifts it).
    Lift,
    Status,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalResponse {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Bundles killed by this request.
    #[serde(default)]
    pub killed: u32,
    /// Rollouts running now.
    #[serde(default)]
    pub running: Vec<String>,
    #[serde(default)]
    pub kill: KillFile,
}

/// What the socket asks of the daemon.
pub trait LocalControl: Send + Sync + 'static {
    fn handle(&self, req: LocalRequest) -> LocalResponse;
}

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(
        "cannot reach the agent daemon at {path}: {error} (is `rollguard-agent serve` running?)"
    )]
    Connect {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("talking to the agent daemon: {0}")]
    Io(#[from] std::io::Error),
    #[error("the agent daemon answered nonsense: {0}")]
    Answer(String),
}

/// Send one request to the daemon (blocking; for the CLI).
pub fn request(socket: &Path, req: &LocalRequest) -> Result<LocalResponse, LocalError> {
    let mut stream =
        std::os::unix::net::UnixStream::connect(socket).map_err(|source| LocalError::Connect {
            path: socket.to_path_buf(),
            error: source,
        })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_vec(req).map_err(|e| LocalError::Answer(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(stream)
        .take(MAX_REQUEST as u64 * 64)
        .read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(|e| LocalError::Answer(e.to_string()))
}

/// Bind the socket (replacing a stale one) with mode 0600.
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serve the socket forever.
pub async fn serve(listener: tokio::net::UnixListener, control: std::sync::Arc<dyn LocalControl>) {
    let own_uid = nix::unistd::geteuid().as_raw();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "local socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let control = control.clone();
        tokio::spawn(async move {
            let allowed = stream
                .peer_cred()
                .map(|c| c.uid() == 0 || c.uid() == own_uid)
                .unwrap_or(false);
            let (read, mut write) = stream.into_split();
            let mut reader = tokio::io::BufReader::new(read.take(MAX_REQUEST as u64));
            let mut line = String::new();
            let answer = if !allowed {
                LocalResponse {
                    ok: false,
                    error: Some("only root may use this socket".into()),
                    ..empty()
                }
            } else {
                match reader.read_line(&mut line).await {
                    Err(e) => LocalResponse {
                        ok: false,
                        error: Some(e.to_string()),
                        ..empty()
                    },
                    Ok(_) => match serde_json::from_str::<LocalRequest>(&line) {
                        Err(e) => LocalResponse {
                            ok: false,
                            error: Some(format!("bad request: {e}")),
                            ..empty()
                        },
                        Ok(req) => {
                            tracing::warn!(?req, "local control request");
                            control.handle(req)
                        }
                    },
                }
            };
            let mut out = serde_json::to_vec(&answer).unwrap_or_default();
            out.push(b'\n');
            let _ = write.write_all(&out).await;
        });
    }
}

fn empty() -> LocalResponse {
    LocalResponse {
        ok: true,
        error: None,
        killed: 0,
        running: vec![],
        kill: KillFile::default(),
    }
}
