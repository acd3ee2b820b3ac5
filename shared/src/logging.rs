//! Logging setup shared by the three binaries: `tracing` to stderr (stdout
//! is for results and `--json`), text or JSON lines, `RUST_LOG` overriding
//! the binary's default level.

/// The `--log-format` option of every binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Install the global subscriber. `default_level` applies when `RUST_LOG`
/// is unset (e.g. "warn" for CLIs, "info" for daemons).
pub fn init(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
