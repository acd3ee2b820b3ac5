//! AgentCommand-line interface of `rollguard-agent` (clap definitions only; the
//! binary in `main.rs` dispatches). Kept in the library so packaging can
//! generate man pages and shell completions from the same definitions.

use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand};
pub use rollguard_shared::logging::LogFormat;

/// The rollguard host agent: verifies signed bundles against this host's
/// policy and runs them confined by Landlock, seccomp, namespaces and cgroups.
#[derive(Debug, Parser)]
#[command(name = "rollguard-agent", version, about, long_about = None)]
pub struct AgentCli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: AgentCommand,
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Verify a bundle against the host policy and run it once, confined.
    ///
    /// Exit status 0 only when the bundle ran and succeeded without any
    /// denial; 1 when it failed, timed out, was killed or attempted a denied
    /// access; 2 when it was refused (nothing ran).
    Run(RunArgs),
    /// Validate a host policy and report what the kernel supports.
    Check(CheckArgs),
    /// The hash-chained run log of this host: every run started and
    /// finished, every refusal. (`audit` is the name it had before; kept as
    /// an alias so existing scripts and units still work.)
    #[command(subcommand, alias = "audit")]
    Log(RunLogCommand),
    /// Run as the fleet daemon: connect to the controller named in the
    /// policy's [controller] section, run the bundles it orders (each
    /// verified against this policy, exactly like `run`), obey kill orders.
    Serve(ServeArgs),
    /// Kill every running bundle on this host now and refuse new runs until
    /// `--lift` (talks to the daemon over its local socket; works when the
    /// controller is unreachable).
    Kill(LocalKillArgs),
    /// Get this host's certificate with a one-time token
    /// (`rollguard-controller token create`): the key is generated here
    /// and stays here; only a signing request is sent. The controller's CA
    /// is believed only if its fingerprint is the one given.
    Enroll(EnrollArgs),
}

#[derive(Debug, Args)]
pub struct EnrollArgs {
    /// The controller's enrollment listener (`[enrollment] listen`), https://HOST:PORT.
    #[arg(long)]
    pub url: String,
    /// The fleet CA's fingerprint, SHA256:HEX (printed by `rollguard-controller init`).
    #[arg(long)]
    pub ca_fingerprint: String,
    /// The one-time token (or set ROLLGUARD_ENROLL_TOKEN, which keeps it
    /// out of the process list).
    #[arg(long, env = "ROLLGUARD_ENROLL_TOKEN", hide_env_values = true)]
    pub token: String,
    /// This host's name: the token must have been made for it.
    #[arg(long)]
    pub name: String,
    /// Where to write agent.key, agent.crt and ca.crt.
    #[arg(long, default_value = "/etc/rollguard")]
    pub dir: PathBuf,
    /// Replace an existing agent.key.
    #[arg(long)]
    pub force: bool,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PolicyArg {
    /// The host policy (TOML).
    #[arg(
        long,
        short = 'p',
        env = "ROLLGUARD_POLICY",
        default_value = "/etc/rollguard/agent.toml"
    )]
    pub policy: PathBuf,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub policy: PolicyArg,
    /// The bundle file.
    pub bundle: PathBuf,
    /// Print the run report as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Run it as a preview: the same checks, sandbox and denial reports,
    /// but its write and delete scopes are throw-away overlays (nothing
    /// reaches the disk), service actions are reported, not performed, and
    /// the version is not used up. The report lists what it would change.
    #[arg(long)]
    pub preview: bool,
    /// Run again the version of this bundle last started on this host, as
    /// a retry: only if this host's own record says its last run here
    /// failed, timed out, was killed or was interrupted (no denial), and
    /// it ran fewer than 3 times. A version that succeeded never runs
    /// again; an older one never.
    #[arg(long, conflicts_with = "preview")]
    pub retry: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub policy: PolicyArg,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub policy: PolicyArg,
    /// The local control socket (root only) used by `rollguard-agent kill`.
    #[arg(
        long,
        env = "ROLLGUARD_AGENT_SOCKET",
        default_value = "/run/rollguard/agent.sock"
    )]
    pub socket: PathBuf,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["reason", "lift", "status"])))]
pub struct LocalKillArgs {
    /// Why (kept in the daemon's state and shown in every refusal).
    #[arg(long)]
    pub reason: Option<String>,
    /// Lift the local kill (a fleet-wide kill stays until the controller lifts it).
    #[arg(long)]
    pub lift: bool,
    /// Show the kill orders in force and the running bundles.
    #[arg(long)]
    pub status: bool,
    /// The daemon's local control socket.
    #[arg(
        long,
        env = "ROLLGUARD_AGENT_SOCKET",
        default_value = "/run/rollguard/agent.sock"
    )]
    pub socket: PathBuf,
    /// The host policy, read only when no daemon answers the socket: its
    /// state directory's kill switch is then set (or lifted) directly.
    #[arg(
        short,
        long,
        env = "ROLLGUARD_POLICY",
        default_value = "/etc/rollguard/agent.toml"
    )]
    pub policy: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum RunLogCommand {
    /// Check every entry's hash chain; report the first edited, removed or
    /// reordered line.
    Verify {
        #[command(flatten)]
        policy: PolicyArg,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// The clap command, for man pages and completions.
pub fn command() -> clap::Command {
    rollguard_shared::exit::document(AgentCli::command())
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_definition_is_consistent() {
        super::command().debug_assert();
    }

    #[test]
    fn the_run_log_answers_to_its_old_name_too() {
        use clap::FromArgMatches;
        for name in ["log", "audit"] {
            let matches = super::command()
                .try_get_matches_from(["rollguard-agent", name, "verify", "--policy", "/p"])
                .unwrap();
            let cli = super::AgentCli::from_arg_matches(&matches).unwrap();
            assert!(matches!(cli.command, super::AgentCommand::Log(_)), "{name}");
        }
    }
}
