//! The controller binary as an operator uses it: `rollguard-controller
//! init/enroll/revoke` on a fresh directory. (Also makes `cargo test` build
//! the binary, which the fleet tests in `tests/` drive.)

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn controller() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rollguard-controller"))
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
fn init_enroll_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca-dir");
    ok(controller()
        .arg("init")
        .arg("--dir")
        .arg(&ca)
        .args(["--san", "controller.example"]));
    for (file, mode) in [
        ("ca/root.key", 0o600),
        ("ca/agents-ca.key", 0o600),
        ("ca/operators-ca.key", 0o600),
        ("server.key", 0o600),
        ("operator.key", 0o600),
        ("ca.crt", 0o644),
        ("controller.toml", 0o644),
    ] {
        let meta = std::fs::metadata(ca.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
    }
    let config = std::fs::read_to_string(ca.join("controller.toml")).unwrap();
    assert!(
        config.contains("agents_ca") && config.starts_with('#'),
        "commented config"
    );

    // A second init must not overwrite the CA.
    let again = controller()
        .arg("init")
        .arg("--dir")
        .arg(&ca)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    let out = dir.path().join("out");
    ok(controller()
        .args(["enroll", "--dir"])
        .arg(&ca)
        .arg("mail-01.tokyo")
        .arg("--out")
        .arg(&out));
    assert!(out.join("mail-01.tokyo.crt").exists());
    assert_eq!(
        std::fs::metadata(out.join("mail-01.tokyo.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let bad = controller()
        .args(["enroll", "--dir"])
        .arg(&ca)
        .arg("../etc")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a valid host name"));

    let revoked = ok(controller()
        .args(["revoke", "--dir"])
        .arg(&ca)
        .arg("mail-01.tokyo"));
    let serial = revoked.split_whitespace().last().unwrap().to_string();
    let list = std::fs::read_to_string(ca.join("revoked.list")).unwrap();
    assert!(list.contains(&serial), "{list}");
    let unknown = controller()
        .args(["revoke", "--dir"])
        .arg(&ca)
        .arg("nobody")
        .output()
        .unwrap();
    assert!(!unknown.status.success());
}

/// The same commands with `--json`, as an enrollment script would call them.
#[test]
fn init_enroll_revoke_json() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca-dir");
    let parse = |text: String| -> serde_json::Value {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    };
    let init = parse(ok(controller().args(["init", "--json", "--dir"]).arg(&ca)));
    assert_eq!(init["ca"], ca.join("ca.crt").to_str().unwrap());
    assert!(std::path::Path::new(init["operator_key"].as_str().unwrap()).exists());

    let enrolled = parse(ok(controller()
        .args(["enroll", "--json", "--dir"])
        .arg(&ca)
        .arg("web-07")));
    assert_eq!(enrolled["name"], "web-07");
    for field in ["cert", "key"] {
        let path = enrolled[field].as_str().unwrap();
        assert!(std::path::Path::new(path).exists(), "{field}: {path}");
    }

    let revoked = parse(ok(controller()
        .args(["revoke", "--json", "--dir"])
        .arg(&ca)
        .arg("web-07")));
    let serials = revoked["revoked_serials"].as_array().unwrap();
    assert_eq!(serials.len(), 1, "{revoked}");
    let list = std::fs::read_to_string(ca.join("revoked.list")).unwrap();
    assert!(list.contains(serials[0].as_str().unwrap()), "{list}");
}
