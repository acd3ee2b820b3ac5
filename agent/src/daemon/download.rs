//! A bundle's download: streamed from the controller to
//! `daemon/bundles/<rollout id>.bundle`, hashed as it arrives.
//!
//! Never held whole in memory: a bundle may be up to [`MAX_BUNDLE_BYTES`]
//! and [`super::MAX_CONCURRENT_RUNS`] download at once, on hosts whose
//! memory belongs to their customers. The body's frames go through a small
//! channel to a blocking thread that hashes and writes them, so the thread
//! that reads the orders (and the kill state) only moves buffers.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Method;
use rollguard_shared::protocol::Sha256Hex;
use sha2::Digest;

use super::transport::{ControllerSession, TransportError};

/// Largest bundle the agent downloads.
pub const MAX_BUNDLE_BYTES: u64 = 1024 * 1024 * 1024;

/// Frames queued between the network and the writer, at most (a frame is
/// an HTTP/2 DATA frame, 16 KiB by default).
const QUEUED_FRAMES: usize = 16;

/// What the controller sent is not the bundle it named: a refusal, not a
/// network hiccup to retry.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadDownload(pub String);

/// Download bundle `sha` (announced as `size` bytes) to `path`; three
/// attempts for network errors, none for a wrong bundle.
pub async fn download(
    session: ControllerSession,
    sha: Sha256Hex,
    size: u64,
    path: PathBuf,
) -> anyhow::Result<()> {
    if size > MAX_BUNDLE_BYTES {
        return Err(BadDownload(format!(
            "bundle of {size} bytes exceeds the agent's limit of {MAX_BUNDLE_BYTES}"
        ))
        .into());
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        match download_once(&session, &sha, size, &path).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is::<BadDownload>() => return Err(e),
            Err(e) if attempt < 3 => {
                tracing::warn!(bundle = %sha, error = format!("{e:#}"), "bundle download failed; retrying");
                tokio::time::sleep(Duration::from_secs(attempt)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn download_once(
    session: &ControllerSession,
    sha: &Sha256Hex,
    size: u64,
    path: &Path,
) -> anyhow::Result<()> {
    let resp = session
        .request(Method::GET, &format!("/v1/bundles/{sha}"), None)
        .await?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let text = http_body_util::Limited::new(body, 1024)
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        return Err(TransportError::Status { status, body: text }.into());
    }
    let (tx, rx) = tokio::sync::mpsc::channel(QUEUED_FRAMES);
    let sink = BundleSink::create(path, sha.clone(), size)?;
    let writer = tokio::task::spawn_blocking(move || sink.drain(rx));
    let received: anyhow::Result<()> = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| TransportError::Answer(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if tx.send(Chunk::Data(data)).await.is_err() {
                return Ok(()); // the writer stopped: its error says why
            }
        }
        let _ = tx.send(Chunk::End).await;
        Ok(())
    }
    .await;
    drop(tx);
    match (writer.await?, received) {
        // A wrong bundle is a refusal, whatever else happened.
        (Err(e), _) if e.is::<BadDownload>() => Err(e),
        // A body cut short is the network's fault: retried.
        (_, Err(e)) => Err(e),
        (written, Ok(())) => written,
    }
}

/// What the network side hands the writer.
enum Chunk {
    Data(Bytes),
    /// The body is complete: check it and put it in place.
    End,
}

/// The file being written, and the digest and length so far.
struct BundleSink {
    tmp: PathBuf,
    path: PathBuf,
    file: fs::File,
    hasher: sha2::Sha256,
    len: u64,
    sha: Sha256Hex,
    size: u64,
}

impl BundleSink {
    fn create(path: &Path, sha: Sha256Hex, size: u64) -> anyhow::Result<Self> {
        let tmp = path.with_extension("part");
        let file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        Ok(BundleSink {
            tmp,
            path: path.to_path_buf(),
            file,
            hasher: sha2::Sha256::new(),
            len: 0,
            sha,
            size,
        })
    }

    /// Write every chunk `rx` brings; at its end, check the digest and put
    /// the file in place. On any error (the channel closed before the end
    /// among them) the partial file is removed.
    fn drain(mut self, mut rx: tokio::sync::mpsc::Receiver<Chunk>) -> anyhow::Result<()> {
        let result = (|| loop {
            match rx.blocking_recv() {
                Some(Chunk::Data(chunk)) => self.push(&chunk)?,
                Some(Chunk::End) => return self.finish(),
                None => anyhow::bail!("the download of bundle {} ended early", self.sha),
            }
        })();
        if result.is_err() {
            let _ = fs::remove_file(&self.tmp);
        }
        result
    }

    fn push(&mut self, chunk: &[u8]) -> anyhow::Result<()> {
        self.len += chunk.len() as u64;
        if self.len > self.size {
            return Err(BadDownload(format!(
                "the controller sent more than the {} bytes it announced for bundle {}",
                self.size, self.sha
            ))
            .into());
        }
        self.hasher.update(chunk);
        self.file
            .write_all(chunk)
            .with_context(|| format!("writing {}", self.tmp.display()))
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        let got = Sha256Hex::from_digest(std::mem::take(&mut self.hasher));
        if got != self.sha {
            return Err(BadDownload(format!(
                "the controller sent a bundle that does not have SHA-256 {} ({} bytes received)",
                self.sha, self.len
            ))
            .into());
        }
        fs::rename(&self.tmp, &self.path)
            .with_context(|| format!("renaming {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn feed(sink: BundleSink, chunks: &[&[u8]], complete: bool) -> anyhow::Result<()> {
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUED_FRAMES);
        let writer = tokio::task::spawn_blocking(move || sink.drain(rx));
        for c in chunks {
            if tx
                .send(Chunk::Data(Bytes::copy_from_slice(c)))
                .await
                .is_err()
            {
                break;
            }
        }
        if complete {
            let _ = tx.send(Chunk::End).await;
        }
        drop(tx);
        writer.await.unwrap()
    }

    #[tokio::test]
    async fn a_bundle_is_written_chunk_by_chunk_and_put_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r-1.bundle");
        let sink = BundleSink::create(&path, Sha256Hex::of(b"hello world"), 11).unwrap();
        feed(sink, &[b"hello", b" ", b"world"], true).await.unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"hello world");
        assert!(!path.with_extension("part").exists());
    }

    #[tokio::test]
    async fn a_wrong_or_overlong_bundle_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r-1.bundle");
        for (sha, size, chunks) in [
            (
                Sha256Hex::of(b"hello world"),
                11,
                &[&b"hello"[..], b" there"][..],
            ),
            (
                Sha256Hex::of(b"hello world"),
                5,
                &[&b"hello"[..], b" world"][..],
            ),
        ] {
            let sink = BundleSink::create(&path, sha, size).unwrap();
            let err = feed(sink, chunks, true).await.unwrap_err();
            assert!(err.is::<BadDownload>(), "{err:#}");
            assert!(!path.exists());
            assert!(!path.with_extension("part").exists());
        }
    }

    /// Cut short by the network: not a wrong bundle (that would refuse the
    /// rollout on this host); an error the download retries.
    #[tokio::test]
    async fn a_body_cut_short_is_retried_not_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r-1.bundle");
        let sink = BundleSink::create(&path, Sha256Hex::of(b"hello world"), 11).unwrap();
        let err = feed(sink, &[b"hello"], false).await.unwrap_err();
        assert!(!err.is::<BadDownload>(), "{err:#}");
        assert!(!path.exists());
        assert!(!path.with_extension("part").exists());
    }
}
