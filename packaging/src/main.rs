//! `rollguard-packaging`: generates the packages' man pages and completions
//! and checks the systemd units' command lines (see `packaging/build` and
//! `packaging/check`).

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "rollguard-packaging",
    about = "Build-time helper for rollguard's packages"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write man pages and shell completions beneath DIR/<package>/.
    GenAssets {
        /// Output directory.
        dir: PathBuf,
    },
    /// Check that every Exec*= line of the given units runs an installed
    /// program with arguments its CLI accepts.
    CheckExec {
        /// Unit files.
        #[arg(required = true)]
        units: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::GenAssets { dir } => match rollguard_packaging::generate_assets(&dir) {
            Ok(files) => {
                for file in files {
                    println!("{}", file.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::CheckExec { units } => {
            let mut failed = false;
            for unit in units {
                match rollguard_packaging::check_unit_exec_lines(&unit) {
                    Ok(0) => {
                        eprintln!("error: {}: no Exec*= line", unit.display());
                        failed = true;
                    }
                    Ok(n) => println!("{}: {n} command line(s) ok", unit.display()),
                    Err(e) => {
                        eprintln!("error: {e}");
                        failed = true;
                    }
                }
            }
            if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}
