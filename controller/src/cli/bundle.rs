//! `rollguard bundle ...` — placeholder; the integrator owns this file and
//! replaces its contents.

/// Bundle subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum BundleCommand {}

/// Run a bundle subcommand.
pub fn run(command: BundleCommand) -> anyhow::Result<()> {
    match command {}
}
