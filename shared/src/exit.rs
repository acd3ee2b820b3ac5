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

impl Exit {
    /// Its name in a JSON error (`"status"`).
    pub const fn name(self) -> &'static str {
        match self {
            Exit::Success => "success",
            Exit::Failed => "failed",
            Exit::Refused => "refused",
            Exit::Error => "error",
            Exit::Usage => "usage",
        }
    }
}

/// The command line asked for JSON output: `--json` before any `--`.
/// Read from the raw arguments so that errors before or outside a
/// subcommand's parsed options (usage errors, a configuration that does
/// not load) are JSON too.
fn json_requested(args: impl IntoIterator<Item = std::ffi::OsString>) -> bool {
    args.into_iter()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json")
}

/// The JSON a failed command prints on stdout under `--json`, where a
/// script reads its result: `{"status": ..., "exit_code": ..., "error": ...}`.
fn json_error(exit: Exit, message: &str) -> String {
    serde_json::json!({
        "status": exit.name(),
        "exit_code": exit.code(),
        "error": message,
    })
    .to_string()
}

/// End a command that could not do its job ([`Exit::Error`]): the error
/// with its causes (`{:#}`) on stderr, or as JSON on stdout under
/// `--json`.
pub fn error(error: &dyn std::fmt::Display) -> ExitCode {
    let message = format!("{error:#}");
    if json_requested(std::env::args_os()) {
        println!("{}", json_error(Exit::Error, &message));
    } else {
        // A refusal may quote what hosts reported (a controller's reason
        // naming a denied path a bundle chose): escaped, line by line.
        let shown: Vec<String> = message.lines().map(crate::terminal::printable).collect();
        eprintln!("error: {}", shown.join("\n"));
    }
    Exit::Error.into()
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
            if e.use_stderr() && json_requested(std::env::args_os()) {
                let message = e.render().to_string();
                let message = message.trim_end();
                let message = message.strip_prefix("error: ").unwrap_or(message);
                println!("{}", json_error(Exit::Usage, message));
                std::process::exit(i32::from(Exit::Usage.code()));
            }
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
    fn json_is_asked_for_by_a_json_flag_before_any_double_dash() {
        let args = |a: &[&str]| a.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        assert!(json_requested(args(&["rollguard", "agents", "--json"])));
        assert!(json_requested(args(&["rollguard", "--json", "x"])));
        assert!(!json_requested(args(&["rollguard", "agents"])));
        assert!(
            !json_requested(args(&["--json"])),
            "argv[0] is not an option"
        );
        assert!(!json_requested(args(&["rollguard", "--", "--json"])));
        assert!(!json_requested(args(&["rollguard", "--jsonx"])));
    }

    #[test]
    fn a_json_error_is_one_object_with_status_code_and_message() {
        let v: serde_json::Value =
            serde_json::from_str(&json_error(Exit::Error, "controller: \"refused\"\nline 2"))
                .unwrap();
        assert_eq!(v["status"], "error");
        assert_eq!(v["exit_code"], 3);
        assert_eq!(v["error"], "controller: \"refused\"\nline 2");
    }

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
