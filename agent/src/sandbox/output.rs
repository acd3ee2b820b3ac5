//! Bounded capture of a run's stdout and stderr.
//!
//! The bundle writes into a pipe, not into the file: a thread of the agent
//! copies the first half of the limit into the file as it comes, keeps the
//! last half in a ring buffer, and counts what falls in between. At the
//! end, if anything was dropped, the file gets a one-line marker with the
//! count and then the tail. So a run that floods its output costs the host
//! at most `limit` bytes of disk per stream, and the report still shows how
//! the output began and how it ended. (A file limit such as RLIMIT_FSIZE
//! would also hit the bundle's legitimate writes, and a bundle can change
//! its own rlimits.)

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::mpsc;
use std::time::Duration;

/// What one capture kept and dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Captured {
    /// Bytes the run wrote to the stream.
    pub total: u64,
    /// Bytes dropped between the head and the tail.
    pub dropped: u64,
}

/// A running capture; [`Capture::finish`] once the run's processes are gone.
#[derive(Debug)]
pub struct Capture {
    done: mpsc::Receiver<io::Result<Captured>>,
}

/// Start capturing into `file` at most `limit` bytes. Returns the pipe's
/// write end, for the run's stdout or stderr (close-on-exec: the launcher
/// duplicates it onto 1 or 2 in the child, and the caller must drop it once
/// the child is started, or the capture never sees end-of-file).
pub fn start(file: File, limit: u64, name: &str) -> io::Result<(File, Capture)> {
    let (read, write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    let (tx, done) = mpsc::channel();
    let read = File::from(read);
    std::thread::Builder::new()
        .name(format!("capture-{name}"))
        .spawn(move || {
            let _ = tx.send(copy_bounded(read, file, limit));
        })?;
    Ok((File::from(write), Capture { done }))
}

impl Capture {
    /// Wait for end-of-file (every writer gone) for at most `wait`.
    pub fn finish(self, wait: Duration) -> io::Result<Captured> {
        match self.done.recv_timeout(wait) {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the run's output pipe is still open",
            )),
        }
    }
}

/// Copy `input` to `out`: the first `limit / 2` bytes as they come, the
/// last `limit - limit / 2` at the end, a marker with the count between.
pub fn copy_bounded(mut input: impl Read, mut out: impl Write, limit: u64) -> io::Result<Captured> {
    let head_limit = limit / 2;
    let tail_limit = usize::try_from(limit - head_limit).unwrap_or(usize::MAX);
    let mut head_written = 0u64;
    let mut tail: VecDeque<u8> = VecDeque::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        total += n as u64;
        let mut chunk = &buf[..n];
        if head_written < head_limit {
            let take = chunk
                .len()
                .min(usize::try_from(head_limit - head_written).unwrap_or(usize::MAX));
            out.write_all(&chunk[..take])?;
            head_written += take as u64;
            chunk = &chunk[take..];
        }
        tail.extend(chunk);
        if tail.len() > tail_limit {
            tail.drain(..tail.len() - tail_limit);
        }
    }
    let dropped = total - head_written - tail.len() as u64;
    if dropped > 0 {
        writeln!(out, "\n[rollguard: {dropped} bytes of output dropped here]")?;
    }
    let (a, b) = tail.as_slices();
    out.write_all(a)?;
    out.write_all(b)?;
    out.flush()?;
    Ok(Captured { total, dropped })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_head_and_tail_and_counts_the_rest() {
        let input: Vec<u8> = (0..100_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let mut out = Vec::new();
        let c = copy_bounded(&input[..], &mut out, 1000).unwrap();
        assert_eq!(c.total, 100_000);
        assert_eq!(c.dropped, 99_000);
        assert!(out.starts_with(&input[..500]));
        assert!(out.ends_with(&input[input.len() - 500..]));
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("[rollguard: 99000 bytes of output dropped here]"));

        let mut out = Vec::new();
        let c = copy_bounded(&b"short"[..], &mut out, 1000).unwrap();
        assert_eq!((c.total, c.dropped), (5, 0));
        assert_eq!(out, b"short");
    }
}
