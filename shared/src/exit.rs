//! One table of exit statuses for every rollguard binary (`rollguard`,
//! `rollguard-agent`, `rollguard-controller`), so a script can tell "the
//! answer is no" from "refused" from "could not do the job" the same way
//! whichever command it runs. The table is printed by `--help` and in the
//! man pages from [`TABLE`], and the README repeats it.
//!
//! Status 2 is "refused", so command-line usage errors cannot keep clap's
//! default of 2: [`parse`] gives them 64, `EX_USAGE` of sysexits(3).

use std::process::ExitCode;

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Done, and nothing to report.
    Success,
    /// Done, and the answer is no: a run failed or reported a denied
    /// access, a rollout halted, a bundle or the run log did not verify, a
    /// kill was not acknowledged by every agent, the kernel lacks what the
    /// sandbox needs.
    Failed,
    /// The agent refused a bundle before anything ran (signature, targets,
    /// policy, kernel): nothing on the host changed.
    Refused,
    /// The command could not do its job: unreadable configuration, I/O,
    /// network, a controller that answered with an error.
    Error,
    /// The command line itself is wrong.
    Usage,
}

impl Exit {
    /// The process exit status.
    pub const fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Failed => 1,
            Exit::Refused => 2,
            Exit::Error => 3,
            Exit::Usage => 64,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit.code())
    }
}

/// The table as `--help` and the man pages show it.
pub const TABLE: &str = "\
Exit status:
  0   success
  1   failed: done, and the answer is no (a run failed or reported a
      denied access, a rollout halted, a bundle or the run log did not
      verify, a kill was not acknowledged by every agent, the kernel
      lacks what the sandbox needs)
  2   refused: the agent refused the bundle before anything ran
  3   error: the command could not do its job (configuration, I/O,
      network, an error from the controller)
  64  usage: the command line is wrong";

/// `command` with the exit-status table after its long help, and after
/// each subcommand's (each has its own man page).
pub fn document(command: clap::Command) -> clap::Command {
    command.after_long_help(TABLE).mut_subcommands(|sub| {
        if sub.get_name() == "help" {
            sub
        } else {
            document(sub)
        }
    })
}

/// Parse the process's arguments against `command` (built by the binary's
/// `command()`, so `--help` shows what the man page shows). `--help` and
/// `--version` exit 0; a usage error exits [`Exit::Usage`].
pub fn parse<T: clap::FromArgMatches>(mut command: clap::Command) -> T {
    let parsed = command
        .try_get_matches_from_mut(std::env::args_os())
        .and_then(|matches| T::from_arg_matches(&matches));
    match parsed {
        Ok(value) => value,
        Err(e) => {
            let e = e.format(&mut command);
            // Printing can only fail on a closed stdout/stderr; the status
            // still says what happened.
            let _ = e.print();
            std::process::exit(if e.use_stderr() {
                i32::from(Exit::Usage.code())
            } else {
                0
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lists_every_status() {
        for exit in [
            Exit::Success,
            Exit::Failed,
            Exit::Refused,
            Exit::Error,
            Exit::Usage,
        ] {
            let row = format!("\n  {:<4}", exit.code());
            assert!(TABLE.contains(&row), "{exit:?} missing from the table");
        }
    }

    #[test]
    fn every_subcommand_but_help_documents_the_table() {
        let command = document(
            clap::Command::new("x")
                .subcommand(clap::Command::new("a").subcommand(clap::Command::new("b"))),
        );
        let a = command.find_subcommand("a").unwrap();
        let b = a.find_subcommand("b").unwrap();
        for c in [&command, a, b] {
            assert_eq!(
                c.get_after_long_help().map(|h| h.to_string()).as_deref(),
                Some(TABLE)
            );
        }
    }
}
