//! The `rollguard` operator CLI: clap definitions, subcommand
//! implementations and the client of the controller's API. Kept in the
//! library so packaging can generate man pages and completions from the same
//! definitions. The client side only: the controller (the server) is the
//! `rollguard-controller` crate, and what both sides speak is in
//! `rollguard-shared` (`protocol`, `tls_client`).
#![forbid(unsafe_code)]

use clap::{CommandFactory, Parser, Subcommand};
pub use rollguard_shared::logging::LogFormat;

pub mod bundle;
pub mod client;
pub mod config;
pub mod kill;
pub mod packages;
pub mod preview_groups;
pub mod rollout;
pub mod rollout_events;
pub mod ui;

/// rollguard operator CLI: build, sign and inspect bundles; roll them out in
/// waves; stop everything with the kill switch.
#[derive(Debug, Parser)]
#[command(name = "rollguard", version, about, long_about = None)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build, sign, verify and inspect bundle files.
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
    /// Plan, start, follow, halt and resume staged rollouts.
    #[command(subcommand)]
    Rollout(rollout::RolloutCommand),
    /// The kill switch: kill running bundles fleet-wide (or one rollout's)
    /// and refuse new runs until `--lift`.
    Kill(kill::KillArgs),
    /// Registered agents and whether they are connected.
    Agents(rollout::AgentsArgs),
    /// A live web view of the fleet and its rollouts, on this machine,
    /// with your operator certificate (prints a one-time link).
    Ui(ui::UiArgs),
}

/// Logs go to stderr (stdout is for results and `--json`).
pub fn init_logging(format: LogFormat) {
    rollguard_shared::logging::init(format, "warn");
}

/// The clap command of `rollguard`, for man pages and completions.
pub fn command() -> clap::Command {
    rollguard_shared::exit::document(Cli::command())
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_definition_is_consistent() {
        super::command().debug_assert();
    }
}
