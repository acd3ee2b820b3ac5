//! The `rollguard` command tree as an operator meets it. (Also makes
//! `cargo test` build the binary, which the fleet tests in `tests/` drive.)

use std::process::Command;

fn rollguard() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rollguard"))
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn operator_cli_has_rollout_and_kill() {
    let help = ok(rollguard().arg("--help"));
    for cmd in ["bundle", "rollout", "kill", "agents"] {
        assert!(help.contains(cmd), "{cmd} missing from:\n{help}");
    }
    // Without a controller URL the CLI says how to give one.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cli.toml"), "").unwrap();
    let out = rollguard()
        .args(["rollout", "list"])
        .env_remove("ROLLGUARD_URL")
        .env("ROLLGUARD_CLI_CONFIG", dir.path().join("cli.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no controller URL") && err.contains("--url"),
        "{err}"
    );
    // An unknown key in cli.toml is an error, not silently ignored.
    std::fs::write(dir.path().join("cli.toml"), "urll = \"https://x\"\n").unwrap();
    let out = rollguard()
        .args(["rollout", "list"])
        .env("ROLLGUARD_CLI_CONFIG", dir.path().join("cli.toml"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field"));
}

#[test]
fn controller_url_with_a_path_is_refused() {
    // The API paths are fixed: a URL whose path the client would ignore is
    // an error before anything is read or dialled.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    std::fs::write(dir.path().join("cli.toml"), "").unwrap();
    let out = rollguard()
        .args(["agents", "--url", "https://127.0.0.1:1/rollguard"])
        .arg("--ca")
        .arg(&missing)
        .arg("--cert")
        .arg(&missing)
        .arg("--key")
        .arg(&missing)
        .env("ROLLGUARD_CLI_CONFIG", dir.path().join("cli.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("a path is not allowed") && err.contains("https://HOST[:PORT]"),
        "{err}"
    );
}

#[test]
fn exit_statuses_follow_the_one_table() {
    // --help prints the table (the man pages render the same text) ...
    let help = ok(rollguard().args(["rollout", "--help"]));
    assert!(
        help.contains(rollguard_shared::exit::TABLE),
        "no exit-status table in:\n{help}"
    );
    // ... and a wrong command line is a usage error (64), not clap's 2,
    // which the table gives to "refused".
    let out = rollguard().arg("--no-such-flag").output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(i32::from(rollguard_shared::exit::Exit::Usage.code()))
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-such-flag"));
}

/// Under `--json`, a failure is one JSON object on stdout (where a script
/// reads the result), whatever failed: the command line or the job.
#[test]
fn errors_under_json_are_json() {
    let json_of = |args: &[&str], exit: rollguard_shared::exit::Exit| {
        let out = rollguard().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(i32::from(exit.code())), "{args:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: stdout is not JSON ({e}): {out:?}"));
        assert_eq!(v["status"], exit.name(), "{v}");
        assert_eq!(v["exit_code"], exit.code(), "{v}");
        v["error"].as_str().unwrap().to_string()
    };
    use rollguard_shared::exit::Exit;
    let error = json_of(
        &["agents", "--json", "--cli-config", "/nonexistent/cli.toml"],
        Exit::Error,
    );
    assert!(error.contains("/nonexistent/cli.toml"), "{error}");
    let usage = json_of(&["agents", "--json", "--no-such-flag"], Exit::Usage);
    assert!(usage.contains("--no-such-flag"), "{usage}");
    // Without --json, the error stays text on stderr.
    let out = rollguard()
        .args(["agents", "--cli-config", "/nonexistent/cli.toml"])
        .output()
        .unwrap();
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: "));
}
