//! Loading private keys, plain and encrypted (keys made by ssh-keygen).

use std::path::Path;

use jiff::Timestamp;
use ssh_key::LineEnding;

use super::{generate_key, keypair, public_line_of, MANIFEST};
use crate::signature::{
    load_private_key, load_private_key_with_passphrase, sign, verify_threshold, AllowedSigners,
    SignatureError, PASSPHRASE_ENV,
};

/// The key signs, and the signature verifies against its `.pub`.
fn assert_signs_as_its_public_key(key: &ssh_key::PrivateKey, private_path: &Path) {
    let allowed =
        AllowedSigners::parse(&format!("alice {}\n", public_line_of(private_path))).unwrap();
    let sig = sign(MANIFEST, key, None).unwrap();
    let v = verify_threshold(MANIFEST, &[sig], &allowed, Timestamp::now(), 1).unwrap();
    assert_eq!(v.principals, vec!["alice"]);
}

#[test]
fn unencrypted_key_from_ssh_keygen() {
    let dir = tempfile::tempdir().unwrap();
    let path = generate_key(dir.path(), "alice", "ed25519", "");
    let key = load_private_key_with_passphrase(&path, None).unwrap();
    assert_signs_as_its_public_key(&key, &path);
    // A passphrase for an unencrypted key is ignored, and the env wrapper
    // loads it whatever the environment holds.
    let again = load_private_key_with_passphrase(&path, Some("unused")).unwrap();
    assert_eq!(again.public_key().key_data(), key.public_key().key_data());
    assert_eq!(
        load_private_key(&path).unwrap().public_key().key_data(),
        key.public_key().key_data()
    );
}

#[test]
fn encrypted_key_needs_the_passphrase() {
    let dir = tempfile::tempdir().unwrap();
    let path = generate_key(dir.path(), "alice", "ed25519", "correct horse");

    let key = load_private_key_with_passphrase(&path, Some("correct horse")).unwrap();
    assert!(!key.is_encrypted());
    assert_signs_as_its_public_key(&key, &path);

    let e = load_private_key_with_passphrase(&path, None).unwrap_err();
    assert!(
        matches!(e, SignatureError::PassphraseRequired { .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains(PASSPHRASE_ENV), "{e}");

    let e = load_private_key_with_passphrase(&path, Some("wrong")).unwrap_err();
    assert!(matches!(e, SignatureError::WrongPassphrase { .. }), "{e:?}");
    let e = load_private_key_with_passphrase(&path, Some("")).unwrap_err();
    assert!(matches!(e, SignatureError::WrongPassphrase { .. }), "{e:?}");
}

/// Environment variables are process-global and tests run in parallel, so
/// the env-var path is exercised in a child process running
/// [`env_child`] with its own environment.
#[test]
fn passphrase_comes_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let path = generate_key(dir.path(), "alice", "ed25519", "pw");
    for (passphrase, expect) in [
        (Some("pw"), "ok"),
        (None, "required"),
        (Some("nope"), "wrong"),
    ] {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "signature::tests::keys::env_child",
            "--exact",
            "--ignored",
            "--test-threads=1",
        ])
        .env("ROLLGUARD_TEST_KEY", &path)
        .env("ROLLGUARD_TEST_EXPECT", expect);
        match passphrase {
            Some(p) => cmd.env(PASSPHRASE_ENV, p),
            None => cmd.env_remove(PASSPHRASE_ENV),
        };
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{expect}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
#[ignore = "run by passphrase_comes_from_the_environment in a child process"]
fn env_child() {
    let path = std::env::var_os("ROLLGUARD_TEST_KEY")
        .expect("only run by passphrase_comes_from_the_environment");
    let result = load_private_key(Path::new(&path));
    match std::env::var("ROLLGUARD_TEST_EXPECT").unwrap().as_str() {
        "ok" => assert!(result.is_ok(), "{result:?}"),
        "required" => assert!(
            matches!(result, Err(SignatureError::PassphraseRequired { .. })),
            "{result:?}"
        ),
        "wrong" => assert!(
            matches!(result, Err(SignatureError::WrongPassphrase { .. })),
            "{result:?}"
        ),
        other => panic!("unknown expectation {other}"),
    }
}

#[test]
fn key_written_by_ssh_key_loads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k");
    let key = keypair(9);
    key.write_openssh_file(&path, LineEnding::LF).unwrap();
    assert_eq!(load_private_key_with_passphrase(&path, None).unwrap(), key);
}

#[test]
fn other_key_types_and_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ecdsa = generate_key(dir.path(), "ec", "ecdsa", "");
    let e = load_private_key_with_passphrase(&ecdsa, None).unwrap_err();
    assert!(
        matches!(&e, SignatureError::UnsupportedKey { algorithm } if algorithm == "ecdsa-sha2-nistp256"),
        "{e:?}"
    );
    // Refused before any decryption is attempted.
    let ecdsa_pw = generate_key(dir.path(), "ecpw", "ecdsa", "pw");
    assert!(matches!(
        load_private_key_with_passphrase(&ecdsa_pw, None),
        Err(SignatureError::UnsupportedKey { .. })
    ));

    let ed = generate_key(dir.path(), "ed", "ed25519", "");
    let e = load_private_key_with_passphrase(&ed.with_extension("pub"), None).unwrap_err();
    assert!(
        matches!(e, SignatureError::KeyFormat { .. }),
        "a public key is not a private key: {e:?}"
    );

    let garbage = dir.path().join("garbage");
    std::fs::write(
        &garbage,
        "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
    )
    .unwrap();
    assert!(matches!(
        load_private_key_with_passphrase(&garbage, None),
        Err(SignatureError::KeyFormat { .. })
    ));

    let big = dir.path().join("big");
    std::fs::write(&big, vec![b'A'; 70 * 1024]).unwrap();
    assert!(matches!(
        load_private_key_with_passphrase(&big, None),
        Err(SignatureError::KeyTooLarge { .. })
    ));

    let e = load_private_key_with_passphrase(&dir.path().join("missing"), None).unwrap_err();
    assert!(matches!(e, SignatureError::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("missing"), "{e}");
}
