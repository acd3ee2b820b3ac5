//! `rollguard-simulate`: many real agent daemons in one process, for the
//! scale test and benchmarks (see `rollguard_tests::simulate`). Built with
//! the tests crate, never packaged.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use rollguard_tests::simulate::{simulate, Executor, SimulateOptions};

/// Run many agent daemons in this one process, each with its own policy
/// (DIR/ggg/PREFIXnnnnn/agent.toml, ggg = nnnnn / 100: own name,
/// certificate, state directory), each with its own connection to the
/// controller and running bundles through the real verifier and sandbox.
#[derive(Debug, Parser)]
#[command(name = "rollguard-simulate")]
struct Args {
    /// The directory with one sub-directory (ggg/PREFIXnnnnn) per host.
    #[arg(long)]
    dir: PathBuf,
    /// Host directory name prefix.
    #[arg(long, default_value = "sim-")]
    prefix: String,
    /// The first host index.
    #[arg(long, default_value_t = 0)]
    first: usize,
    /// How many hosts, from --first on.
    #[arg(long)]
    count: usize,
    /// Bundles running at once in this process, at most (0: unbounded).
    /// All simulated hosts share one kernel audit subsystem, which does not
    /// keep up with hundreds of runs at once.
    #[arg(long, default_value_t = 4)]
    max_running: usize,
    /// What answers a run order: the real sandbox, or `harness` (nothing
    /// runs; a success report at once: the control plane measured alone).
    #[arg(long, value_enum, default_value = "sandbox")]
    executor: Executor,
}

fn main() -> ExitCode {
    let args = Args::parse();
    rollguard_shared::logging::init(rollguard_shared::logging::LogFormat::Text, "warn");
    match simulate(&SimulateOptions {
        dir: args.dir,
        prefix: args.prefix,
        first: args.first,
        count: args.count,
        max_running: args.max_running,
        executor: args.executor,
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
