//! Both directions against the real `ssh-keygen -Y sign/verify`.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use jiff::tz::{Offset, TimeZone};
use jiff::Timestamp;

use super::{generate_key, public_line, public_line_of, run_ok, ssh_keygen, MANIFEST};
use crate::signature::{
    load_private_key_with_passphrase, public_key_fingerprint, sign, verify_threshold,
    AllowedSigners, RawSignature, Rejection, VerifyError, NAMESPACE,
};

/// `ssh-keygen -Y verify ... < manifest`; whether it accepted.
pub(super) fn ssh_keygen_verifies(
    allowed: &Path,
    principal: &str,
    namespace: &str,
    sig: &Path,
    manifest: &[u8],
    extra: &[&str],
) -> bool {
    let mut cmd = ssh_keygen();
    cmd.args(["-Y", "verify", "-f"])
        .arg(allowed)
        .args(["-I", principal, "-n", namespace, "-s"])
        .arg(sig)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    verify_with(cmd, manifest)
}

fn verify_with(mut cmd: Command, manifest: &[u8]) -> bool {
    let mut child = cmd.spawn().expect("spawn ssh-keygen");
    child.stdin.take().unwrap().write_all(manifest).unwrap();
    let out = child.wait_with_output().unwrap();
    out.status.success()
}

/// `ssh-keygen -Y sign -f KEY -n NAMESPACE FILE`; the armored `FILE.sig`.
fn ssh_keygen_sign(key: &Path, namespace: &str, dir: &Path, manifest: &[u8]) -> String {
    let file = dir.join(format!("manifest-{namespace}.toml"));
    std::fs::write(&file, manifest).unwrap();
    run_ok(
        ssh_keygen()
            .args(["-Y", "sign", "-f"])
            .arg(key)
            .args(["-n", namespace])
            .arg(&file),
    );
    std::fs::read_to_string(dir.join(format!("manifest-{namespace}.toml.sig"))).unwrap()
}

fn reason(err: VerifyError) -> Rejection {
    err.diagnostics()
        .first()
        .and_then(|d| d.rejection())
        .cloned()
        .expect("a rejected signature")
}

#[test]
fn our_signature_verifies_with_ssh_keygen() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = generate_key(dir.path(), "alice", "ed25519", "");
    let key = load_private_key_with_passphrase(&key_path, None).unwrap();
    let raw = sign(MANIFEST, &key, Some("alice@example.com".into())).unwrap();
    let sig_path = dir.path().join("bundle.sig");
    std::fs::write(&sig_path, &raw.armored).unwrap();

    // A file using options, read by both implementations.
    let allowed_text = format!(
        "# rollguard signers\nalice@example.com namespaces=\"rollguard-bundle\",valid-after=\"20200101Z\" {} alice\n",
        public_line_of(&key_path)
    );
    let allowed_path = dir.path().join("allowed_signers");
    std::fs::write(&allowed_path, &allowed_text).unwrap();
    let ours = AllowedSigners::load(&allowed_path).unwrap();
    assert_eq!(
        verify_threshold(
            MANIFEST,
            std::slice::from_ref(&raw),
            &ours,
            Timestamp::now(),
            1
        )
        .unwrap()
        .principals,
        vec!["alice@example.com"]
    );

    assert!(ssh_keygen_verifies(
        &allowed_path,
        "alice@example.com",
        NAMESPACE,
        &sig_path,
        MANIFEST,
        &[]
    ));

    // ssh-keygen rejects a tampered manifest, another namespace, another principal.
    let mut tampered = MANIFEST.to_vec();
    tampered[3] ^= 0x20;
    assert!(!ssh_keygen_verifies(
        &allowed_path,
        "alice@example.com",
        NAMESPACE,
        &sig_path,
        &tampered,
        &[]
    ));
    assert!(!ssh_keygen_verifies(
        &allowed_path,
        "alice@example.com",
        "file",
        &sig_path,
        MANIFEST,
        &[]
    ));
    assert!(!ssh_keygen_verifies(
        &allowed_path,
        "bob@example.com",
        NAMESPACE,
        &sig_path,
        MANIFEST,
        &[]
    ));
}

#[test]
fn ssh_keygen_signature_verifies_with_us() {
    let dir = tempfile::tempdir().unwrap();
    let alice_path = generate_key(dir.path(), "alice", "ed25519", "");
    let bob_path = generate_key(dir.path(), "bob", "ed25519", "");
    let armored = ssh_keygen_sign(&alice_path, NAMESPACE, dir.path(), MANIFEST);

    let allowed = AllowedSigners::parse(&format!(
        "alice@example.com {}\nbob@example.com {}\n",
        public_line_of(&alice_path),
        public_line_of(&bob_path)
    ))
    .unwrap();
    let from_ssh_keygen = RawSignature {
        armored: armored.clone(),
        signer: None,
    };
    let v = verify_threshold(
        MANIFEST,
        std::slice::from_ref(&from_ssh_keygen),
        &allowed,
        Timestamp::now(),
        1,
    )
    .unwrap();
    assert_eq!(v.principals, vec!["alice@example.com"]);

    // ed25519 is deterministic and both hash with SHA-512: our armor is
    // byte-for-byte ssh-keygen's.
    let alice = load_private_key_with_passphrase(&alice_path, None).unwrap();
    assert_eq!(sign(MANIFEST, &alice, None).unwrap().armored, armored);

    // Mixed sources meet a 2-of-2 threshold.
    let bob = load_private_key_with_passphrase(&bob_path, None).unwrap();
    let sigs = [
        from_ssh_keygen.clone(),
        sign(MANIFEST, &bob, Some("bob@example.com".into())).unwrap(),
    ];
    let v = verify_threshold(MANIFEST, &sigs, &allowed, Timestamp::now(), 2).unwrap();
    assert_eq!(v.principals, vec!["alice@example.com", "bob@example.com"]);

    // And we reject it over other bytes.
    let mut tampered = MANIFEST.to_vec();
    tampered.pop();
    let e =
        verify_threshold(&tampered, &[from_ssh_keygen], &allowed, Timestamp::now(), 1).unwrap_err();
    assert_eq!(reason(e), Rejection::BadSignature);
}

#[test]
fn ssh_keygen_signature_in_another_namespace_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let alice_path = generate_key(dir.path(), "alice", "ed25519", "");
    let allowed =
        AllowedSigners::parse(&format!("alice {}\n", public_line_of(&alice_path))).unwrap();
    for namespace in ["git", "file", "rollguard-bundle-test"] {
        let armored = ssh_keygen_sign(&alice_path, namespace, dir.path(), MANIFEST);
        let e = verify_threshold(
            MANIFEST,
            &[RawSignature {
                armored,
                signer: None,
            }],
            &allowed,
            Timestamp::now(),
            1,
        )
        .unwrap_err();
        assert_eq!(
            reason(e),
            Rejection::WrongNamespace {
                namespace: namespace.into()
            }
        );
    }
}

#[test]
fn ssh_keygen_ecdsa_signature_is_not_ed25519() {
    let dir = tempfile::tempdir().unwrap();
    let ec_path = generate_key(dir.path(), "ec", "ecdsa", "");
    let armored = ssh_keygen_sign(&ec_path, NAMESPACE, dir.path(), MANIFEST);
    let e = verify_threshold(
        MANIFEST,
        &[RawSignature {
            armored,
            signer: None,
        }],
        &AllowedSigners::default(),
        Timestamp::now(),
        1,
    )
    .unwrap_err();
    assert_eq!(
        reason(e),
        Rejection::NotEd25519 {
            algorithm: "ecdsa-sha2-nistp256".into()
        }
    );
}

#[test]
fn fingerprint_matches_ssh_keygen() {
    let dir = tempfile::tempdir().unwrap();
    let alice_path = generate_key(dir.path(), "alice", "ed25519", "");
    let armored = ssh_keygen_sign(&alice_path, NAMESPACE, dir.path(), MANIFEST);
    let listed = run_ok(
        ssh_keygen()
            .args(["-l", "-E", "sha256", "-f"])
            .arg(alice_path.with_extension("pub")),
    );
    let theirs = listed.split_whitespace().nth(1).unwrap().to_string();
    assert!(theirs.starts_with("SHA256:"));
    assert_eq!(
        public_key_fingerprint(&RawSignature {
            armored,
            signer: None
        })
        .unwrap(),
        theirs
    );
}

#[test]
fn validity_windows_agree_with_ssh_keygen_in_local_time() {
    // valid-after in local time (UTC+9 here), valid-before in UTC; both
    // implementations judge the same instants around each bound.
    let dir = tempfile::tempdir().unwrap();
    let key_path = generate_key(dir.path(), "alice", "ed25519", "");
    let key = load_private_key_with_passphrase(&key_path, None).unwrap();
    let sig_path = dir.path().join("bundle.sig");
    let raw = sign(MANIFEST, &key, None).unwrap();
    std::fs::write(&sig_path, &raw.armored).unwrap();
    let text = format!(
        "alice valid-after=\"203001010000\",valid-before=\"20300102Z\" {}\n",
        public_line(&key)
    );
    let allowed_path = dir.path().join("allowed_signers");
    std::fs::write(&allowed_path, &text).unwrap();
    let ours =
        AllowedSigners::parse_with_time_zone(&text, &TimeZone::fixed(Offset::constant(9))).unwrap();

    for (at, expected) in [
        ("20291231145959Z", false),
        ("20291231150000Z", true),
        ("20300102000000Z", true),
        ("20300102000001Z", false),
    ] {
        let mut cmd = ssh_keygen();
        cmd.env("TZ", "JST-9")
            .args(["-Y", "verify", "-f"])
            .arg(&allowed_path)
            .args(["-I", "alice", "-n", NAMESPACE, "-s"])
            .arg(&sig_path)
            .arg(format!("-Overify-time={at}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let theirs = verify_with(cmd, MANIFEST);
        let now: Timestamp = jiff::civil::DateTime::strptime("%Y%m%d%H%M%SZ", at)
            .unwrap()
            .to_zoned(TimeZone::UTC)
            .unwrap()
            .timestamp();
        let mine = verify_threshold(MANIFEST, std::slice::from_ref(&raw), &ours, now, 1).is_ok();
        assert_eq!((theirs, mine), (expected, expected), "at {at}");
    }
}

/// `ssh-agent` in the foreground on its own socket; killed on drop.
struct Agent {
    child: std::process::Child,
    socket: std::path::PathBuf,
}

impl Agent {
    fn start(dir: &Path) -> Agent {
        let socket = dir.join("agent.sock");
        let child = Command::new("/usr/bin/ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&socket)
            .stdout(Stdio::null())
            .spawn()
            .expect("ssh-agent (Debian package openssh-client)");
        for _ in 0..200 {
            if socket.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(
            socket.exists(),
            "ssh-agent did not create {}",
            socket.display()
        );
        Agent { child, socket }
    }

    fn add(&self, key: &Path) {
        run_ok(
            Command::new("/usr/bin/ssh-add")
                .env("SSH_AUTH_SOCK", &self.socket)
                .arg("-q")
                .arg(key),
        );
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `bundle sign --agent`: the real ssh-agent signs, the private key never
/// leaves it. For ed25519 the signature is byte for byte the one made from
/// the key file, and `ssh-keygen -Y verify` accepts it. A key the agent does
/// not hold is refused with the hint to load it.
#[test]
fn the_real_ssh_agent_signs_what_the_key_file_would() {
    let dir = tempfile::tempdir().unwrap();
    let key = generate_key(dir.path(), "alice", "ed25519", "");
    let other = generate_key(dir.path(), "bob", "ed25519", "");
    let agent = Agent::start(dir.path());
    agent.add(&key);
    let public = |k: &Path| {
        ssh_key::PublicKey::from_openssh(
            std::fs::read_to_string(k.with_extension("pub"))
                .unwrap()
                .trim(),
        )
        .unwrap()
    };

    let by_agent =
        crate::signature::agent::sign(MANIFEST, &public(&key), &agent.socket, Some("alice".into()))
            .unwrap();
    let by_file = sign(
        MANIFEST,
        &load_private_key_with_passphrase(&key, None).unwrap(),
        Some("alice".into()),
    )
    .unwrap();
    assert_eq!(by_agent.armored, by_file.armored);

    let allowed = dir.path().join("allowed_signers");
    std::fs::write(
        &allowed,
        format!(
            "alice namespaces=\"{NAMESPACE}\" {}\n",
            public_line_of(&key)
        ),
    )
    .unwrap();
    let sig = dir.path().join("manifest.sig");
    std::fs::write(&sig, &by_agent.armored).unwrap();
    assert!(ssh_keygen_verifies(
        &allowed,
        "alice",
        NAMESPACE,
        &sig,
        MANIFEST,
        &[]
    ));

    let e =
        crate::signature::agent::sign(MANIFEST, &public(&other), &agent.socket, None).unwrap_err();
    assert!(
        e.to_string().contains("refused to sign") && e.to_string().contains("ssh-add -l"),
        "{e}"
    );
}
