use std::ffi::OsStr;
use std::path::Path;
use std::process::ExitCode;

use rollguard_agent::sandbox::{stage2_main, STAGE2_COMMAND};

fn main() -> ExitCode {
    // Sandbox stage 2 (`__sandbox-exec PLAN.json`) must be dispatched before
    // anything else runs: it has to stay single-threaded and untouched by
    // CLI or logging setup.
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() == Some(OsStr::new(STAGE2_COMMAND)) {
        return match (args.next(), args.next()) {
            (Some(plan), None) => stage2_main(Path::new(&plan)),
            _ => {
                eprintln!("usage: rollguard-agent {STAGE2_COMMAND} PLAN.json");
                ExitCode::from(rollguard_agent::sandbox::status::EXIT_SETUP_FAILED)
            }
        };
    }
    println!("rollguard-agent: not yet built");
    ExitCode::SUCCESS
}
