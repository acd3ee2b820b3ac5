//! Tests of the signature layer. `interop` drives the real `ssh-keygen`.

use ssh_key::private::Ed25519Keypair;
use ssh_key::PrivateKey;

mod allowed_signers;
mod interop;
mod keys;
mod sk;
mod threshold;

/// A deterministic ed25519 key (tests must be reproducible).
fn keypair(seed: u8) -> PrivateKey {
    PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]))
}

/// `ssh-ed25519 AAAA...` for an allowed_signers line.
fn public_line(key: &PrivateKey) -> String {
    let mut public = key.public_key().clone();
    public.set_comment("");
    public.to_openssh().expect("encode public key")
}

/// A built-manifest-like byte string; the signature layer does not parse it.
const MANIFEST: &[u8] = b"[bundle]\nname = \"fix-mail\"\nversion = 3\n\n[payload]\nfiles = []\n";

/// The real ssh-keygen, for interop tests. These tests never skip: without
/// ssh-keygen they fail, saying what to install.
const SSH_KEYGEN: &str = "/usr/bin/ssh-keygen";

fn ssh_keygen() -> std::process::Command {
    assert!(
        std::path::Path::new(SSH_KEYGEN).is_file(),
        "interop tests need {SSH_KEYGEN} (Debian package openssh-client: apt-get install openssh-client)"
    );
    let mut cmd = std::process::Command::new(SSH_KEYGEN);
    // Never talk to an ssh-agent the developer happens to run.
    cmd.env_remove("SSH_AUTH_SOCK");
    cmd
}

/// Run a command that must succeed; its stdout.
fn run_ok(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().expect("spawn ssh-keygen");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ssh-keygen -t KIND -N PASSPHRASE -f DIR/NAME`; the private key path
/// (the public key is next to it with `.pub`).
fn generate_key(
    dir: &std::path::Path,
    name: &str,
    kind: &str,
    passphrase: &str,
) -> std::path::PathBuf {
    let path = dir.join(name);
    let mut cmd = ssh_keygen();
    cmd.args(["-q", "-t", kind, "-N", passphrase, "-C", name, "-f"])
        .arg(&path);
    if kind == "ecdsa" {
        cmd.args(["-b", "256"]);
    }
    run_ok(&mut cmd);
    path
}

/// `ssh-ed25519 AAAA...` from a `.pub` file written by ssh-keygen.
fn public_line_of(private_path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(private_path.with_extension("pub")).expect("read .pub");
    text.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}
