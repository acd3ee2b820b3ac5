//! Helpers for rollguard's end-to-end tests: they drive the real binaries
//! (`rollguard`, `rollguard-agent`) against real directory trees, real keys
//! (made by `ssh-keygen`) and the real kernel, and then look at the disk.
#![forbid(unsafe_code)]

pub mod browser;
pub mod fleet;
pub mod fleet_host;
pub mod host;
pub mod packages;
pub mod postgres;
pub mod scale;
pub mod simulate;
pub mod systemd_container;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Path of a workspace binary. Integration tests of this crate cannot use
/// `CARGO_BIN_EXE_*` for other packages' binaries, so we look next to the
/// test executable (`target/<profile>/deps/..`). `cargo test --workspace`
/// builds them (the agent, controller and cli packages have integration tests).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// Give a file or directory the agent trusts (a policy, `allowed_signers`,
/// a directory above them) a mode only root may change it under, whatever
/// the umask: the agent refuses trust files that group or others may write
/// (docs/sandbox.md).
pub fn root_only(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode & 0o022, 0, "{mode:o} is writable by group or others");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// Copy the program `from` to `to`, to be executed from there. The copy is
/// made by `cp` in a child process, not by `fs::copy`: tests run on
/// threads, and a child another thread forks while this process holds the
/// copy open for writing inherits that descriptor until it execs, so
/// executing the copy meanwhile fails with ETXTBSY ("Text file busy").
pub fn install_program(from: &Path, to: &Path) {
    run_ok(Command::new("cp").arg("--preserve=mode").arg(from).arg(to));
}

/// Run a command, returning its output; panics with stdout/stderr if it
/// could not start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

/// Run and require exit status 0.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The `rollguard` CLI.
pub fn rollguard() -> Command {
    Command::new(bin("rollguard"))
}

/// `rollguard bundle build SRC -o OUT`, then `rollguard bundle sign OUT`
/// with `key` as `signer`. Returns `out`.
pub fn build_and_sign(src: &Path, out: &Path, key: &Path, signer: &str) -> PathBuf {
    run_ok(
        rollguard()
            .args(["bundle", "build"])
            .arg(src)
            .arg("-o")
            .arg(out),
    );
    run_ok(
        rollguard()
            .args(["bundle", "sign"])
            .arg(out)
            .arg("--key")
            .arg(key)
            .args(["--signer", signer]),
    );
    out.to_path_buf()
}

/// The `rollguard` CLI as the operator of the controller whose CA directory
/// is `ctl` (created by `rollguard-controller init`), at `url`. No CLI
/// configuration file is read: `scratch/no-cli.toml` is an empty one.
pub fn operator_cli(url: &str, ctl: &Path, scratch: &Path) -> Command {
    let no_config = scratch.join("no-cli.toml");
    if !no_config.exists() {
        std::fs::write(&no_config, "").expect("write no-cli.toml");
    }
    let mut cmd = rollguard();
    cmd.env("ROLLGUARD_URL", url)
        .env("ROLLGUARD_CA", ctl.join("ca.crt"))
        .env("ROLLGUARD_CERT", ctl.join("operator.crt"))
        .env("ROLLGUARD_KEY", ctl.join("operator.key"))
        .env("ROLLGUARD_CLI_CONFIG", no_config);
    cmd
}

/// Run `cmd ARGS --json`, requiring success, and parse stdout.
pub fn cli_json(mut cmd: Command, args: &[&str]) -> serde_json::Value {
    let out = run_ok(cmd.args(args).arg("--json"));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "rollguard {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// `rollguard rollout start BUNDLE ARGS --json` with `cli`; returns the
/// rollout id.
pub fn start_rollout(mut cli: Command, bundle: &Path, args: &[&str]) -> String {
    let out = run_ok(
        cli.args(["rollout", "start"])
            .arg(bundle)
            .args(args)
            .arg("--json"),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("rollout start JSON");
    v["id"].as_str().expect("rollout id").to_string()
}

/// `rollguard rollout status ID --json` with `cli`. It exits 1 for a halted
/// rollout; the JSON is what we want.
pub fn rollout_status(mut cli: Command, id: &str) -> serde_json::Value {
    let out = run(cli.args(["rollout", "status", id, "--json"]));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "rollout status printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The `rollguard-agent` binary.
pub fn agent() -> Command {
    Command::new(bin("rollguard-agent"))
}

/// Every file beneath `dir` with its bytes, for before/after comparisons
/// (a missing directory is empty).
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.expect("directory entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                out.insert(p, bytes);
            }
        }
    }
    out
}
