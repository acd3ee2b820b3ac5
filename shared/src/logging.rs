//! Logging setup shared by the three binaries: `tracing` to stderr (stdout
//! is for results and `--json`), text or JSON lines, `RUST_LOG` overriding
//! the binary's default level.
//!
//! Under systemd, when stderr is the journal, records go to journald
//! natively instead (`tracing-journald`): each with its priority (error 3,
//! warn 4, info 5, debug 6, trace 7), so `journalctl -p warning` shows the
//! warnings, and with its fields as journal fields (`ROLLOUT=`,
//! `RUN_ID=`...), which `journalctl ROLLOUT=...` can filter on. A stderr
//! line would reach the journal at one priority for all, info.

use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The `--log-format` option of every binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Install the global subscriber. `default_level` applies when `RUST_LOG`
/// is unset (e.g. "warn" for CLIs, "info" for daemons). When stderr is the
/// journal, journald gets the records natively and `format` does not
/// apply; if journald's socket cannot be opened, stderr is used as
/// elsewhere.
pub fn init(format: LogFormat, default_level: &str) {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level))
    };
    let mut journald_error = None;
    if stderr_is_journal() {
        // Fields keep their own names (upper-cased by journald's rules), no
        // `F_` prefix: ours never name a journal field (PRIORITY, MESSAGE...).
        match tracing_journald::layer().map(|l| l.with_field_prefix(None)) {
            Ok(layer) => {
                tracing_subscriber::registry()
                    .with(filter())
                    .with(layer)
                    .init();
                return;
            }
            Err(e) => journald_error = Some(e),
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    if let Some(e) = journald_error {
        tracing::warn!(
            "stderr is the journal but journald's socket is not usable ({e}); logging to stderr"
        );
    }
}

/// stderr is the journal: systemd says so in `JOURNAL_STREAM` (the
/// device and inode of the stream it connected), and stderr is still that
/// stream (not redirected by whoever started us since).
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    value.to_str().is_some_and(stderr_is)
}

/// stderr is the stream `DEVICE:INODE` names.
fn stderr_is(journal_stream: &str) -> bool {
    let stat = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map(std::fs::File::from)
        .and_then(|f| f.metadata());
    match stat {
        Ok(m) => journal_stream_is(journal_stream, m.dev(), m.ino()),
        Err(_) => false,
    }
}

/// `JOURNAL_STREAM`'s `DEVICE:INODE` (decimal) names this device and inode.
fn journal_stream_is(value: &str, dev: u64, ino: u64) -> bool {
    match value.split_once(':') {
        Some((d, i)) => d.parse() == Ok(dev) && i.parse() == Ok(ino),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_names_one_device_and_inode() {
        assert!(journal_stream_is("8:123456", 8, 123456));
        assert!(!journal_stream_is("8:123456", 8, 123457));
        assert!(!journal_stream_is("9:123456", 8, 123456));
        for bad in ["", "8", "8:", ":1", "8:1:2", "x:1", "8:-1", " 8:1"] {
            assert!(!journal_stream_is(bad, 8, 1), "{bad:?}");
        }
    }

    /// stderr redirected elsewhere since systemd set the variable is not
    /// the journal; stderr itself is the stream its own numbers name.
    #[test]
    fn only_stderr_itself_is_the_journal_stream() {
        assert!(!stderr_is("0:0"));
        let m = std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map(std::fs::File::from)
            .and_then(|f| f.metadata())
            .unwrap();
        assert!(stderr_is(&format!("{}:{}", m.dev(), m.ino())));
    }
}
