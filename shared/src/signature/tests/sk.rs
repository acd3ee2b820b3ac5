//! Security keys (`sk-ssh-ed25519@openssh.com`): OpenSSH's own test
//! signature (testdata/openssh, see its README), variants of it, the flag
//! requirements of allowed_signers, and the real `ssh-keygen -Y verify` on
//! the same material.
//!
//! No authenticator is needed: OpenSSH's test key was made by its
//! `sk-dummy` software authenticator, which keeps the ed25519 secret in the
//! key handle, so [`SoftToken`] can sign with that very key exactly what a
//! token signs, with any flags. That it reproduces OpenSSH's signature byte
//! for byte is the first test.

use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer as _, SigningKey};
use jiff::Timestamp;
use sha2::{Digest, Sha256};
use ssh_key::public::{KeyData, SkEd25519};
use ssh_key::{Algorithm, HashAlg, LineEnding, PrivateKey, PublicKey, Signature, SshSig};

use super::interop::ssh_keygen_verifies;
use super::{keypair, public_line, run_ok, ssh_keygen, MANIFEST};
use crate::signature::sshsig::{self, Checked};
use crate::signature::{
    evaluate, load_private_key_with_passphrase, public_key_fingerprint, sign, AllowedSigners,
    RawSignature, Rejection, SignatureDiagnostic, SignatureError, SignatureOutcome, SkSignature,
    NAMESPACE,
};

const OPENSSH_SIG: &str = include_str!("testdata/openssh/ed25519_sk.sig");
const OPENSSH_PUB: &str = include_str!("testdata/openssh/ed25519_sk.pub");
const OPENSSH_KEY: &str = include_str!("testdata/openssh/ed25519_sk");
const OPENSSH_SIGNED_DATA: &[u8] = include_bytes!("testdata/openssh/signed-data");
const OPENSSH_NAMESPACE: &str = include_str!("testdata/openssh/namespace");
/// What OpenSSH's sk-dummy reports: user present, a fixed counter.
const OPENSSH_SK: SkSignature = SkSignature {
    flags: 0x01,
    counter: 0x1234_5678,
};

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/signature/tests/testdata/openssh")
        .join(name)
}

fn openssh_public() -> PublicKey {
    PublicKey::from_openssh(OPENSSH_PUB.trim()).expect("OpenSSH's ed25519_sk.pub")
}

/// `sk-ssh-ed25519@openssh.com AAAA...` without the comment.
fn openssh_public_line() -> String {
    let mut key = openssh_public();
    key.set_comment("");
    key.to_openssh().unwrap()
}

/// Parse (with the canonical-form check) and check in OpenSSH's namespace.
fn check_openssh(armored: &str, message: &[u8]) -> Result<Checked, Rejection> {
    let sig = sshsig::parse(armored)?;
    sshsig::check_in_namespace(&sig, OPENSSH_NAMESPACE, message)
}

/// A software authenticator holding OpenSSH's test key.
struct SoftToken {
    signing: SigningKey,
    public: SkEd25519,
}

impl SoftToken {
    fn openssh() -> Self {
        let key = PrivateKey::from_openssh(OPENSSH_KEY).expect("OpenSSH's ed25519_sk");
        let sk = key.key_data().sk_ed25519().expect("an sk-ed25519 key");
        // sk-dummy's key handle: the ed25519 seed, then the public key.
        let handle = sk.key_handle();
        assert_eq!(handle.len(), 64);
        let seed: [u8; 32] = handle[..32].try_into().unwrap();
        let signing = SigningKey::from_bytes(&seed);
        assert_eq!(signing.verifying_key().as_bytes(), &handle[32..]);
        assert_eq!(
            signing.verifying_key().as_bytes(),
            sk.public().public_key().as_ref()
        );
        assert_eq!(
            KeyData::from(sk.public().clone()),
            *openssh_public().key_data()
        );
        SoftToken {
            signing,
            public: sk.public().clone(),
        }
    }

    /// What a token signs for an SSHSIG (ssh-ed25519-sk.c), SHA-512 as
    /// ssh-keygen uses.
    fn sign(&self, namespace: &str, message: &[u8], flags: u8, counter: u32) -> SshSig {
        let blob = SshSig::signed_data(namespace, HashAlg::Sha512, message).unwrap();
        let mut signed = Vec::new();
        signed.extend_from_slice(&Sha256::digest(self.public.application().as_bytes()));
        signed.push(flags);
        signed.extend_from_slice(&counter.to_be_bytes());
        signed.extend_from_slice(&Sha256::digest(&blob));
        let mut data = self.signing.sign(&signed).to_bytes().to_vec();
        data.push(flags);
        data.extend_from_slice(&counter.to_be_bytes());
        SshSig::new(
            KeyData::SkEd25519(self.public.clone()),
            namespace,
            HashAlg::Sha512,
            Signature::new(Algorithm::SkEd25519, data).unwrap(),
        )
        .unwrap()
    }

    /// A bundle signature (our namespace, over [`MANIFEST`]).
    fn bundle_signature(&self, flags: u8, counter: u32) -> RawSignature {
        RawSignature {
            armored: armor(&self.sign(NAMESPACE, MANIFEST, flags, counter)),
            signer: None,
        }
    }
}

fn armor(sig: &SshSig) -> String {
    sig.to_pem(LineEnding::LF).unwrap()
}

/// `sig` with its signature data (64 bytes, flags, counter) replaced.
fn with_data(sig: &SshSig, data: Vec<u8>) -> SshSig {
    SshSig::new(
        sig.public_key().clone(),
        sig.namespace(),
        sig.hash_alg(),
        Signature::new(sig.algorithm(), data).unwrap(),
    )
    .unwrap()
}

#[test]
fn openssh_signature_verifies_with_its_flags_and_counter() {
    let checked = check_openssh(OPENSSH_SIG, OPENSSH_SIGNED_DATA).expect("OpenSSH's signature");
    assert_eq!(checked.key, *openssh_public().key_data());
    assert_eq!(checked.sk, Some(OPENSSH_SK));
    assert_eq!(
        OPENSSH_SK.to_string(),
        "flags 0x01 (user present), counter 305419896"
    );
    // The namespace is part of what was signed.
    let sig = sshsig::parse(OPENSSH_SIG).unwrap();
    assert_eq!(
        sshsig::check(&sig, OPENSSH_SIGNED_DATA),
        Err(Rejection::WrongNamespace {
            namespace: "unittest".into()
        })
    );
}

#[test]
fn soft_token_reproduces_openssh_signature_byte_for_byte() {
    // ed25519 is deterministic: same key, same signed structure, same bytes.
    let sig = SoftToken::openssh().sign(
        OPENSSH_NAMESPACE,
        OPENSSH_SIGNED_DATA,
        OPENSSH_SK.flags,
        OPENSSH_SK.counter,
    );
    assert_eq!(armor(&sig), OPENSSH_SIG);
}

#[test]
fn any_change_to_openssh_signature_fails() {
    let sig = sshsig::parse(OPENSSH_SIG).unwrap();
    let data = sig.signature().as_bytes().to_vec();
    assert_eq!(data.len(), 64 + 1 + 4);
    let changed = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut d = data.clone();
        f(&mut d);
        armor(&with_data(&sig, d))
    };
    let other_application = {
        let sk = sig.public_key().sk_ed25519().unwrap();
        let key = SkEd25519::new(*sk.public_key(), "ssh:other");
        armor(
            &SshSig::new(
                KeyData::SkEd25519(key),
                sig.namespace(),
                sig.hash_alg(),
                sig.signature().clone(),
            )
            .unwrap(),
        )
    };
    let other_hash = armor(
        &SshSig::new(
            sig.public_key().clone(),
            sig.namespace(),
            HashAlg::Sha256,
            sig.signature().clone(),
        )
        .unwrap(),
    );
    let cases: Vec<(&str, String, &[u8])> = vec![
        // Claiming user verification it did not report.
        (
            "flag UV added",
            changed(&|d| d[64] = 0x05),
            OPENSSH_SIGNED_DATA,
        ),
        (
            "flag UP dropped",
            changed(&|d| d[64] = 0x00),
            OPENSSH_SIGNED_DATA,
        ),
        (
            "counter + 1",
            changed(&|d| d[68] ^= 0x01),
            OPENSSH_SIGNED_DATA,
        ),
        (
            "counter high byte",
            changed(&|d| d[65] = 0),
            OPENSSH_SIGNED_DATA,
        ),
        (
            "signature bit",
            changed(&|d| d[10] ^= 0x40),
            OPENSSH_SIGNED_DATA,
        ),
        ("application", other_application, OPENSSH_SIGNED_DATA),
        ("hash algorithm", other_hash, OPENSSH_SIGNED_DATA),
        (
            "message",
            OPENSSH_SIG.to_string(),
            b"This is a test, this is only a test!",
        ),
        ("empty message", OPENSSH_SIG.to_string(), b""),
    ];
    for (what, armored, message) in cases {
        assert_eq!(
            check_openssh(&armored, message),
            Err(Rejection::BadSignature),
            "{what}"
        );
    }
}

#[test]
fn signature_type_must_match_key_type() {
    let sig = sshsig::parse(OPENSSH_SIG).unwrap();
    // The sk key with a plain ed25519 signature (its first 64 bytes).
    let plain_sig = Signature::new(Algorithm::Ed25519, &sig.signature().as_bytes()[..64]).unwrap();
    let mixed = SshSig::new(
        sig.public_key().clone(),
        sig.namespace(),
        sig.hash_alg(),
        plain_sig,
    )
    .unwrap();
    assert_eq!(
        check_openssh(&armor(&mixed), OPENSSH_SIGNED_DATA),
        Err(Rejection::KeyTypeMismatch {
            key: "sk-ssh-ed25519@openssh.com".into(),
            signature: "ssh-ed25519".into(),
        })
    );
    // A plain key with the sk signature.
    let plain_key = KeyData::Ed25519(*sig.public_key().sk_ed25519().unwrap().public_key());
    let mixed = SshSig::new(
        plain_key,
        sig.namespace(),
        sig.hash_alg(),
        sig.signature().clone(),
    )
    .unwrap();
    assert_eq!(
        check_openssh(&armor(&mixed), OPENSSH_SIGNED_DATA),
        Err(Rejection::KeyTypeMismatch {
            key: "ssh-ed25519".into(),
            signature: "sk-ssh-ed25519@openssh.com".into(),
        })
    );
}

fn allowed(options: &str) -> AllowedSigners {
    let line = if options.is_empty() {
        format!("alice@example.com {}\n", openssh_public_line())
    } else {
        format!("alice@example.com {options} {}\n", openssh_public_line())
    };
    AllowedSigners::parse(&line).unwrap()
}

fn judge_one(raw: &RawSignature, allowed: &AllowedSigners) -> SignatureDiagnostic {
    evaluate(
        MANIFEST,
        std::slice::from_ref(raw),
        allowed,
        Timestamp::now(),
    )
    .signatures
    .remove(0)
}

#[test]
fn flags_against_allowed_signers_options() {
    const UP: u8 = 0x01;
    const UV: u8 = 0x04;
    let token = SoftToken::openssh();
    let present = || Rejection::UserPresenceNotConfirmed { line: 1, flags: 0 };
    let cases: Vec<(&str, u8, Option<Rejection>)> = vec![
        // By default a touch is required, and enough.
        ("", UP, None),
        ("", UP | UV, None),
        ("", 0, Some(present())),
        (
            "",
            UV,
            Some(Rejection::UserPresenceNotConfirmed { line: 1, flags: UV }),
        ),
        // Other flag bits (e.g. 0x40, attested credential data) change nothing.
        ("", UP | 0x40, None),
        ("no-touch-required", 0, None),
        ("no-touch-required", UP, None),
        (
            "verify-required",
            UP,
            Some(Rejection::UserVerificationNotConfirmed { line: 1, flags: UP }),
        ),
        ("verify-required", UP | UV, None),
        // verify-required does not waive the touch.
        (
            "verify-required",
            UV,
            Some(Rejection::UserPresenceNotConfirmed { line: 1, flags: UV }),
        ),
        ("no-touch-required,verify-required", UV, None),
        (
            "no-touch-required,verify-required",
            0,
            Some(Rejection::UserVerificationNotConfirmed { line: 1, flags: 0 }),
        ),
    ];
    for (options, flags, expected) in cases {
        let raw = token.bundle_signature(flags, 7);
        let diag = judge_one(&raw, &allowed(options));
        // The signature verified, so its report is shown either way.
        assert_eq!(
            diag.security_key,
            Some(SkSignature { flags, counter: 7 }),
            "{options:?} {flags:#x}"
        );
        assert_eq!(
            diag.rejection(),
            expected.as_ref(),
            "{options:?} {flags:#x}"
        );
        if expected.is_none() {
            assert_eq!(
                diag.outcome,
                SignatureOutcome::Trusted {
                    principals: vec!["alice@example.com".into()],
                    counted_as: Some("alice@example.com".into()),
                }
            );
        }
    }
}

#[test]
fn rejections_and_report_say_what_the_token_reported() {
    let token = SoftToken::openssh();
    let diag = judge_one(
        &token.bundle_signature(0x01, 41),
        &allowed("verify-required"),
    );
    let text = diag.to_string();
    assert!(
        text.contains("(security key: flags 0x01 (user present), counter 41)"),
        "{text}"
    );
    assert!(
        text.ends_with("rejected: the security key did not verify the user (flags 0x01: no PIN or biometric), which verify-required on allowed_signers line 1 requires"),
        "{text}"
    );
    let diag = judge_one(&token.bundle_signature(0x00, 41), &allowed(""));
    assert!(
        diag.to_string().ends_with("rejected: the security key did not confirm user presence (flags 0x00: no touch), which allowed_signers line 1 requires (unless it says no-touch-required)"),
        "{diag}"
    );

    let diag = judge_one(&token.bundle_signature(0x05, 42), &allowed(""));
    assert_eq!(
        diag.key_algorithm.as_deref(),
        Some("sk-ssh-ed25519@openssh.com")
    );
    let json = serde_json::to_value(&diag).unwrap();
    assert_eq!(
        json["security_key"],
        serde_json::json!({"flags": 5, "counter": 42})
    );
    assert_eq!(
        diag.to_string(),
        format!(
            "signature #1 [{}] (security key: flags 0x05 (user present, user verified), counter 42): valid, counted for alice@example.com",
            openssh_public().fingerprint(HashAlg::Sha256)
        )
    );
    let back: SignatureDiagnostic = serde_json::from_value(json).unwrap();
    assert_eq!(back, diag);

    // A plain key's diagnostic has no such field.
    let plain = keypair(3);
    let raw = sign(MANIFEST, &plain, None).unwrap();
    let allowed_plain =
        AllowedSigners::parse(&format!("bob@example.com {}\n", public_line(&plain))).unwrap();
    let diag = judge_one(&raw, &allowed_plain);
    assert_eq!(diag.security_key, None);
    assert!(serde_json::to_value(&diag)
        .unwrap()
        .get("security_key")
        .is_none());
}

#[test]
fn unverified_flags_are_not_reported() {
    // The flags of a signature that does not verify are anyone's words.
    let token = SoftToken::openssh();
    let sig = token.sign(NAMESPACE, MANIFEST, 0x01, 9);
    let mut data = sig.signature().as_bytes().to_vec();
    data[64] = 0x05;
    let raw = RawSignature {
        armored: armor(&with_data(&sig, data)),
        signer: None,
    };
    let diag = judge_one(&raw, &allowed(""));
    assert_eq!(diag.rejection(), Some(&Rejection::BadSignature));
    assert_eq!(diag.security_key, None);
}

#[test]
fn an_sk_key_is_not_its_plain_twin() {
    // Same 32-byte ed25519 key, listed as a plain key: a different key.
    let token = SoftToken::openssh();
    let twin = KeyData::Ed25519(*token.public.public_key());
    let twin_line = PublicKey::from(twin).to_openssh().unwrap();
    let as_plain = AllowedSigners::parse(&format!("alice@example.com {twin_line}\n")).unwrap();
    let diag = judge_one(&token.bundle_signature(0x01, 1), &as_plain);
    assert_eq!(diag.rejection(), Some(&Rejection::KeyNotAllowed));

    // Another application is another key too (OpenSSH compares both).
    let other_app = PublicKey::from(SkEd25519::new(*token.public.public_key(), "ssh:other"))
        .to_openssh()
        .unwrap();
    let listed = AllowedSigners::parse(&format!("alice@example.com {other_app}\n")).unwrap();
    let diag = judge_one(&token.bundle_signature(0x01, 1), &listed);
    assert_eq!(diag.rejection(), Some(&Rejection::KeyNotAllowed));
}

#[test]
fn the_most_advanced_failure_is_reported() {
    // Two lines for the token: one for another namespace, one that needs a
    // PIN. The PIN is what is missing.
    let token = SoftToken::openssh();
    let key = openssh_public_line();
    let text = format!(
        "alice@example.com namespaces=\"git\" {key}\nalice@example.com verify-required {key}\n"
    );
    let diag = judge_one(
        &token.bundle_signature(0x01, 1),
        &AllowedSigners::parse(&text).unwrap(),
    );
    assert_eq!(
        diag.rejection(),
        Some(&Rejection::UserVerificationNotConfirmed { line: 2, flags: 1 })
    );
    // And a line that accepts it wins over one that does not.
    let text = format!("alice@example.com verify-required {key}\nalice@example.com {key}\n");
    let diag = judge_one(
        &token.bundle_signature(0x01, 1),
        &AllowedSigners::parse(&text).unwrap(),
    );
    assert_eq!(diag.rejection(), None);
}

#[test]
fn fingerprints_match_openssh_test_data() {
    let key =
        PublicKey::from_openssh(include_str!("testdata/openssh/ed25519_sk1.pub").trim()).unwrap();
    assert_eq!(
        key.fingerprint(HashAlg::Sha256).to_string(),
        include_str!("testdata/openssh/ed25519_sk1.fp").trim()
    );
    let raw = RawSignature {
        armored: OPENSSH_SIG.into(),
        signer: None,
    };
    let fp = public_key_fingerprint(&raw).unwrap();
    assert_eq!(
        fp,
        openssh_public().fingerprint(HashAlg::Sha256).to_string()
    );
    // And as ssh-keygen prints it.
    let out = run_ok(ssh_keygen().arg("-lf").arg(testdata("ed25519_sk.pub")));
    assert!(out.contains(&fp), "{out}");
}

#[test]
fn signing_with_a_security_key_is_refused() {
    let err = load_private_key_with_passphrase(&testdata("ed25519_sk"), None).unwrap_err();
    assert!(matches!(err, SignatureError::SecurityKeySigning), "{err}");
    assert!(
        err.to_string()
            .contains("ssh-keygen -Y sign -n rollguard-bundle"),
        "{err}"
    );
    // Nor through an agent: refused before any socket is opened.
    let err = crate::signature::agent::sign(
        MANIFEST,
        &openssh_public(),
        Path::new("/nonexistent/agent.sock"),
        None,
    )
    .unwrap_err();
    assert!(matches!(err, SignatureError::SecurityKeySigning), "{err}");
}

/// `ssh-keygen -Y verify` on OpenSSH's own material.
#[test]
fn ssh_keygen_verifies_openssh_material() {
    let dir = tempfile::tempdir().unwrap();
    let allowed_path = dir.path().join("allowed_signers");
    std::fs::write(
        &allowed_path,
        format!("test@example.com {}\n", openssh_public_line()),
    )
    .unwrap();
    let sig_path = dir.path().join("sig");
    std::fs::write(&sig_path, OPENSSH_SIG).unwrap();
    let verifies = |message: &[u8]| {
        ssh_keygen_verifies(
            &allowed_path,
            "test@example.com",
            OPENSSH_NAMESPACE,
            &sig_path,
            message,
            &[],
        )
    };
    assert!(verifies(OPENSSH_SIGNED_DATA));
    assert!(!verifies(b"This is a test, this is only a test!"));
}

/// What the soft token makes, ssh-keygen accepts, including a signature
/// without the user-presence flag: `ssh-keygen -Y verify` checks no flags
/// (only sshd does, for authorized_keys). rollguard refuses that one unless
/// the line says no-touch-required. A changed flag fails both.
#[test]
fn ssh_keygen_agrees_on_soft_token_signatures_but_checks_no_flags() {
    let dir = tempfile::tempdir().unwrap();
    let allowed_path = dir.path().join("allowed_signers");
    let allowed_text = format!("alice@example.com {}\n", openssh_public_line());
    std::fs::write(&allowed_path, &allowed_text).unwrap();
    let ours = AllowedSigners::parse(&allowed_text).unwrap();
    let token = SoftToken::openssh();
    for flags in [0x00, 0x01, 0x05] {
        let sig = token.sign(NAMESPACE, MANIFEST, flags, 1000);
        let sig_path = dir.path().join(format!("sig-{flags}"));
        std::fs::write(&sig_path, armor(&sig)).unwrap();
        assert!(
            ssh_keygen_verifies(
                &allowed_path,
                "alice@example.com",
                NAMESPACE,
                &sig_path,
                MANIFEST,
                &[]
            ),
            "ssh-keygen, flags {flags:#x}"
        );
        let diag = judge_one(
            &RawSignature {
                armored: armor(&sig),
                signer: None,
            },
            &ours,
        );
        if flags & 0x01 == 0 {
            assert!(matches!(
                diag.rejection(),
                Some(Rejection::UserPresenceNotConfirmed { .. })
            ));
        } else {
            assert_eq!(diag.rejection(), None, "flags {flags:#x}");
        }

        let mut data = sig.signature().as_bytes().to_vec();
        data[64] ^= 0x04;
        let tampered = armor(&with_data(&sig, data));
        let tampered_path = dir.path().join(format!("tampered-{flags}"));
        std::fs::write(&tampered_path, &tampered).unwrap();
        assert!(!ssh_keygen_verifies(
            &allowed_path,
            "alice@example.com",
            NAMESPACE,
            &tampered_path,
            MANIFEST,
            &[]
        ));
        let diag = judge_one(
            &RawSignature {
                armored: tampered,
                signer: None,
            },
            &ours,
        );
        assert_eq!(diag.rejection(), Some(&Rejection::BadSignature));
    }
}

/// The two options are sshd's, not ssh-keygen's: a line with one of them
/// does not work with `ssh-keygen -Y verify` (documented, so an operator
/// who shares the file with git's signing knows).
#[test]
fn ssh_keygen_does_not_know_the_sk_options() {
    let dir = tempfile::tempdir().unwrap();
    let sig_path = dir.path().join("sig");
    std::fs::write(
        &sig_path,
        armor(&SoftToken::openssh().sign(NAMESPACE, MANIFEST, 0x05, 1)),
    )
    .unwrap();
    for options in ["verify-required", "no-touch-required"] {
        let allowed_path = dir.path().join(format!("allowed-{options}"));
        let text = format!("alice@example.com {options} {}\n", openssh_public_line());
        std::fs::write(&allowed_path, &text).unwrap();
        assert!(!ssh_keygen_verifies(
            &allowed_path,
            "alice@example.com",
            NAMESPACE,
            &sig_path,
            MANIFEST,
            &[]
        ));
        assert!(AllowedSigners::parse(&text).is_ok());
    }
}
