//! `rollguard`: the operator CLI (bundles, rollouts, kill switch).
//! A thin binary: the subcommands live in `rollguard_cli`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use rollguard_cli::{Cli, Command};
use rollguard_shared::exit;

fn main() -> ExitCode {
    let cli: Cli = exit::parse(rollguard_cli::command());
    rollguard_cli::init_logging(cli.log_format);
    let result = match cli.command {
        Command::Bundle(cmd) => rollguard_cli::bundle::run(cmd),
        Command::Rollout(cmd) => rollguard_cli::rollout::run(cmd),
        Command::Kill(args) => rollguard_cli::kill::run(args),
        Command::Agents(args) => rollguard_cli::rollout::agents(args),
        Command::Ui(args) => rollguard_cli::ui::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => exit::error(&e),
    }
}
