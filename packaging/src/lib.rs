//! Build-time helper for rollguard's packages.
//!
//! Man pages and shell completions are generated from the very clap
//! definitions the binaries parse with, so they cannot drift from the real
//! CLI. The same definitions check that every `Exec*=` line of the shipped
//! systemd units names an installed binary and parses as a valid command
//! line: a unit that starts a subcommand which does not exist would otherwise
//! only fail on an operator's host.

#![forbid(unsafe_code)]

use rollguard_shared::PathIoError;
use std::fs;
use std::path::{Path, PathBuf};

use clap_complete::Shell;

/// One installed program whose CLI is described by clap.
pub struct Program {
    /// The binary's file name.
    pub name: &'static str,
    /// Where the packages install it.
    pub bin_dir: &'static str,
    /// Manual section: 8 for the daemons (root's tools), 1 for the operator CLI.
    pub section: &'static str,
    /// The package that ships it.
    pub package: &'static str,
    /// The clap command (from the crate's library, the binary's source of truth).
    pub command: fn() -> clap::Command,
}

impl Program {
    /// The absolute path the packages install the binary at.
    pub fn installed_path(&self) -> PathBuf {
        Path::new(self.bin_dir).join(self.name)
    }
}

/// Every program the packages install.
pub fn programs() -> Vec<Program> {
    let mut all = vec![Program {
        name: "rollguard-agent",
        bin_dir: "/usr/sbin",
        section: "8",
        package: "rollguard-agent",
        command: rollguard_agent::cli::command,
    }];
    all.extend(controller_programs());
    all
}

/// The controller package's programs: the server and the operator CLI.
fn controller_programs() -> Vec<Program> {
    vec![
        Program {
            name: "rollguard-controller",
            bin_dir: "/usr/sbin",
            section: "8",
            package: "rollguard-controller",
            command: rollguard_controller::server_cli::command,
        },
        Program {
            name: "rollguard",
            bin_dir: "/usr/bin",
            section: "1",
            package: "rollguard-controller",
            command: rollguard_cli::command,
        },
    ]
}

/// Errors of asset generation and unit checks.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] PathIoError),
    #[error("{unit}:{line}: {message}")]
    Unit {
        unit: PathBuf,
        line: usize,
        message: String,
    },
}

/// Writes, for every program, its man pages and completions beneath
/// `out/<package>/`:
///
/// - `man/man<N>/<name>[-<subcommand>...].<N>` (one page per visible command)
/// - `completions/bash/<name>`, `completions/zsh/_<name>`,
///   `completions/fish/<name>.fish`
///
/// Returns the files written.
pub fn generate_assets(out: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut written = Vec::new();
    for program in programs() {
        let base = out.join(program.package);
        written.extend(write_man_pages(&program, &base.join("man"))?);
        written.extend(write_completions(&program, &base.join("completions"))?);
    }
    Ok(written)
}

fn write_man_pages(program: &Program, man_dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let dir = man_dir.join(format!("man{}", program.section));
    fs::create_dir_all(&dir).map_err(PathIoError::at("creating", &dir))?;
    // `build` resolves the display names of subcommands ("rollguard-agent-check"),
    // which become the page names and the cross-references in SEE ALSO.
    let mut command = (program.command)().disable_help_subcommand(true);
    command.build();
    let mut written = Vec::new();
    write_man_page_tree(&command, program.section, &dir, &mut written)?;
    Ok(written)
}

fn write_man_page_tree(
    command: &clap::Command,
    section: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> Result<(), Error> {
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_man_page_tree(sub, section, dir, written)?;
    }
    let name = command
        .get_display_name()
        .unwrap_or_else(|| command.get_name());
    let path = dir.join(format!("{name}.{section}"));
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone())
        .section(section)
        .manual("rollguard")
        .render(&mut page)
        .map_err(PathIoError::at("rendering", &path))?;
    fs::write(&path, page).map_err(PathIoError::at("writing", &path))?;
    written.push(path);
    Ok(())
}

fn write_completions(program: &Program, dir: &Path) -> Result<Vec<PathBuf>, Error> {
    // File names are the ones each shell's completion loader looks up.
    let targets = [
        (Shell::Bash, "bash", program.name.to_string()),
        (Shell::Zsh, "zsh", format!("_{}", program.name)),
        (Shell::Fish, "fish", format!("{}.fish", program.name)),
    ];
    let mut written = Vec::new();
    for (shell, sub, file) in targets {
        let shell_dir = dir.join(sub);
        fs::create_dir_all(&shell_dir).map_err(PathIoError::at("creating", &shell_dir))?;
        let path = shell_dir.join(file);
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut (program.command)(), program.name, &mut script);
        fs::write(&path, script).map_err(PathIoError::at("writing", &path))?;
        written.push(path);
    }
    Ok(written)
}

/// Directives whose value is a command line that systemd executes.
const EXEC_DIRECTIVES: &[&str] = &[
    "ExecStart",
    "ExecStartPre",
    "ExecStartPost",
    "ExecReload",
    "ExecStop",
    "ExecStopPost",
    "ExecCondition",
];

/// Checks every `Exec*=` line of a unit file: the executable must be the
/// installed path of a known program and its arguments must parse with that
/// program's CLI. Returns the number of command lines checked.
pub fn check_unit_exec_lines(unit: &Path) -> Result<usize, Error> {
    let text = fs::read_to_string(unit).map_err(PathIoError::at("reading", unit))?;
    let programs = programs();
    let mut checked = 0;
    for (index, raw) in text.lines().enumerate() {
        let unit_err = |message: String| Error::Unit {
            unit: unit.to_path_buf(),
            line: index + 1,
            message,
        };
        let line = raw.trim();
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if !EXEC_DIRECTIVES.contains(&key.trim()) {
            continue;
        }
        // systemd's prefixes: '-' ignore failure, '@' argv0, ':' no env
        // expansion, '+' '!' '!!' privilege handling. None change which
        // binary runs with which arguments except '@', which we do not use.
        let value = value.trim().trim_start_matches(['-', ':', '+', '!']);
        if value.starts_with('@') {
            return Err(unit_err(
                "'@' (custom argv[0]) is not supported by this check".into(),
            ));
        }
        if value.contains(['"', '\'', '\\', '$', '%']) {
            return Err(unit_err(
                "quoting, escapes, variables and specifiers are not supported by this check; \
                 spell the command line out"
                    .into(),
            ));
        }
        let argv: Vec<&str> = value.split_whitespace().collect();
        let Some(exe) = argv.first() else {
            return Err(unit_err(format!("{key} has no command")));
        };
        let Some(program) = programs
            .iter()
            .find(|p| p.installed_path() == Path::new(exe))
        else {
            let known: Vec<String> = programs
                .iter()
                .map(|p| p.installed_path().display().to_string())
                .collect();
            return Err(unit_err(format!(
                "{exe} is not a program the packages install (known: {})",
                known.join(", ")
            )));
        };
        (program.command)()
            .try_get_matches_from(argv.iter().copied())
            .map_err(|e| {
                unit_err(format!(
                    "`{value}` is not a valid {} command line:\n{e}",
                    program.name
                ))
            })?;
        checked += 1;
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent() -> Program {
        programs()
            .into_iter()
            .find(|p| p.name == "rollguard-agent")
            .expect("agent is listed")
    }

    fn write_unit(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("test.service");
        fs::write(&path, format!("[Service]\n{body}\n")).expect("write unit");
        path
    }

    #[test]
    fn man_pages_cover_every_visible_command_and_no_hidden_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = generate_assets(dir.path()).expect("generate");
        let man8 = dir.path().join("rollguard-agent/man/man8");
        for page in [
            "rollguard-agent",
            "rollguard-agent-run",
            "rollguard-agent-check",
            "rollguard-agent-log-verify",
        ] {
            let path = man8.join(format!("{page}.8"));
            assert!(files.contains(&path), "{page}.8 not generated");
            let text = fs::read_to_string(&path).expect("read page");
            assert!(text.contains(".TH"), "{page}.8 is not roff");
            assert!(text.contains(page), "{page}.8 does not name its command");
        }
        let cli_page = dir.path().join("rollguard-controller/man/man1/rollguard.1");
        assert!(files.contains(&cli_page), "rollguard.1 not generated");
        for page in ["rollguard-controller", "rollguard-controller-serve"] {
            let path = dir
                .path()
                .join(format!("rollguard-controller/man/man8/{page}.8"));
            assert!(files.contains(&path), "{page}.8 not generated");
        }
        assert!(
            !files
                .iter()
                .any(|f| f.to_string_lossy().contains("sandbox-exec")),
            "hidden internal command got a man page: {files:?}"
        );
    }

    #[test]
    fn completions_know_the_subcommands() {
        let dir = tempfile::tempdir().expect("tempdir");
        generate_assets(dir.path()).expect("generate");
        let base = dir.path().join("rollguard-agent/completions");
        for file in [
            "bash/rollguard-agent",
            "zsh/_rollguard-agent",
            "fish/rollguard-agent.fish",
        ] {
            let text = fs::read_to_string(base.join(file)).expect("read completion");
            assert!(
                text.contains("check") && text.contains("policy"),
                "{file} lacks subcommands/options"
            );
        }
    }

    #[test]
    fn exec_line_with_a_valid_command_passes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let unit = write_unit(
            dir.path(),
            "ExecStartPre=-/usr/sbin/rollguard-agent check --policy /etc/rollguard/agent.toml\nExecStart=/usr/sbin/rollguard-agent log verify --json",
        );
        assert_eq!(check_unit_exec_lines(&unit).expect("valid"), 2);
    }

    #[test]
    fn exec_line_with_an_unknown_subcommand_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let unit = write_unit(
            dir.path(),
            "ExecStart=/usr/sbin/rollguard-agent no-such-command --policy /x",
        );
        let err = check_unit_exec_lines(&unit)
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("test.service:2"), "{err}");
        assert!(err.contains("no-such-command"), "{err}");
    }

    #[test]
    fn exec_line_with_an_unknown_option_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let unit = write_unit(
            dir.path(),
            "ExecStart=/usr/sbin/rollguard-agent check --no-such-flag",
        );
        assert!(check_unit_exec_lines(&unit).is_err());
    }

    #[test]
    fn exec_line_must_use_the_installed_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let unit = write_unit(dir.path(), "ExecStart=/usr/bin/rollguard-agent check");
        let err = check_unit_exec_lines(&unit)
            .expect_err("wrong path")
            .to_string();
        assert!(err.contains("/usr/sbin/rollguard-agent"), "{err}");
        assert_eq!(
            agent().installed_path(),
            Path::new("/usr/sbin/rollguard-agent")
        );
    }

    #[test]
    fn exec_line_with_quoting_is_refused_rather_than_misread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let unit = write_unit(
            dir.path(),
            "ExecStart=/usr/sbin/rollguard-agent check --policy \"/etc/a b.toml\"",
        );
        assert!(check_unit_exec_lines(&unit).is_err());
    }

    /// The units shipped in packaging/systemd/ start valid command lines of
    /// installed programs (the same check packaging/check runs on them).
    #[test]
    fn shipped_units_run_valid_command_lines() {
        let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
        for unit in ["rollguard-agent.service", "rollguard-controller.service"] {
            let checked =
                check_unit_exec_lines(&units.join(unit)).unwrap_or_else(|e| panic!("{unit}: {e}"));
            assert!(checked >= 1, "{unit} has no Exec line");
        }
    }

    #[test]
    fn unit_without_exec_lines_counts_zero() {
        let dir = tempfile::tempdir().expect("tempdir");
        let unit = write_unit(dir.path(), "Type=notify");
        assert_eq!(check_unit_exec_lines(&unit).expect("no exec lines"), 0);
    }

    /// The policy template shipped as /etc/rollguard/agent.toml must be
    /// refused as it is (fail closed: no host name, so no bundle targets
    /// it), and be a complete, valid policy once the operator has filled in
    /// what it marks REQUIRED.
    #[test]
    fn shipped_agent_policy_is_refused_until_filled_in_then_valid() {
        let template = include_str!("../config/agent.toml");
        let err = rollguard_agent::policy::HostPolicy::parse(template)
            .expect_err("unconfigured policy accepted");
        assert!(
            matches!(err, rollguard_agent::policy::PolicyError::EmptyHostName),
            "refused for another reason than the empty host name: {err}"
        );

        let dir = tempfile::tempdir().expect("tempdir");
        let signers = dir.path().join("allowed_signers");
        fs::write(&signers, "alice@example.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKb8ajbHgPpzGM4Slq9rgDnXwGJiJ4Fv5ha/H1kqFSq6\n")
            .expect("write signers");
        let filled = template
            .replace("name = \"\"", "name = \"mail-03.tokyo\"")
            .replace(
                "/etc/rollguard/allowed_signers",
                &signers.display().to_string(),
            );
        let policy = rollguard_agent::policy::HostPolicy::parse(&filled)
            .expect("filled-in template is valid");
        assert_eq!(policy.state_dir(), Path::new("/var/lib/rollguard"));
        assert!(policy.trust().threshold >= 1);
    }
}
