//! One SSHSIG signature: make it, read it, check it.
//!
//! The `ssh-key` crate implements the format (PROTOCOL.sshsig) and the
//! ed25519 cryptography; this module pins the choices rollguard makes:
//! namespace [`NAMESPACE`], ed25519 keys only (plain, or on a FIDO security
//! key: `sk-ssh-ed25519@openssh.com`), SHA-512 (ssh-keygen's default) when
//! signing, LF-terminated PEM armor wrapped at 70 columns exactly like
//! ssh-keygen writes it.
//!
//! Security-key signatures are checked here, following OpenSSH's
//! `ssh_ed25519_sk_verify` (ssh-ed25519-sk.c), so that the authenticator's
//! flags and counter come out with the verdict ([`SkSignature`]).

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use ssh_key::public::{KeyData, SkEd25519};
use ssh_key::{Algorithm, HashAlg, LineEnding, PrivateKey, PublicKey, SshSig};

use super::threshold::Rejection;
use super::{validate_principal, RawSignature, SignatureError, NAMESPACE};

/// Largest armored signature we parse. An ed25519 SSHSIG is about 300
/// bytes; this leaves room for other key types to be recognized (and then
/// refused) without letting a bundle make us decode megabytes.
pub const MAX_ARMOR_BYTES: usize = 16 * 1024;

/// Sign the exact manifest bytes with an ed25519 key, in namespace
/// [`NAMESPACE`]. The armored text is what ssh-keygen would write (and, as
/// ed25519 is deterministic, byte-identical to `ssh-keygen -Y sign` with the
/// same key).
pub fn sign(
    manifest_bytes: &[u8],
    key: &PrivateKey,
    signer: Option<String>,
) -> Result<RawSignature, SignatureError> {
    check_signer(key.algorithm(), signer.as_deref())?;
    if key.is_encrypted() {
        return Err(SignatureError::EncryptedKey);
    }
    let sig = key
        .sign(NAMESPACE, HashAlg::Sha512, manifest_bytes)
        .map_err(|e| SignatureError::Sign(e.to_string()))?;
    let armored = sig
        .to_pem(LineEnding::LF)
        .map_err(|e| SignatureError::Sign(e.to_string()))?;
    Ok(RawSignature { armored, signer })
}

/// What rollguard signs with, whatever holds the key (a file or an
/// agent): an ed25519 key, and a well-formed principal if one is named.
pub(crate) fn check_signer(
    algorithm: Algorithm,
    signer: Option<&str>,
) -> Result<(), SignatureError> {
    if let Some(s) = signer {
        validate_principal(s)?;
    }
    if algorithm == Algorithm::SkEd25519 {
        return Err(SignatureError::SecurityKeySigning);
    }
    if algorithm != Algorithm::Ed25519 {
        return Err(SignatureError::UnsupportedKey {
            algorithm: algorithm.to_string(),
        });
    }
    Ok(())
}

/// The `SHA256:...` fingerprint of the key that made a signature, as
/// `ssh-keygen -l` prints it. Says nothing about validity.
pub fn public_key_fingerprint(sig: &RawSignature) -> Result<String, SignatureError> {
    let parsed = parse(&sig.armored).map_err(|r| SignatureError::Armor(r.to_string()))?;
    Ok(parsed.public_key().fingerprint(HashAlg::Sha256).to_string())
}

/// Decode the armor. Nothing about the content is checked yet.
pub(crate) fn parse(armored: &str) -> Result<SshSig, Rejection> {
    if armored.len() > MAX_ARMOR_BYTES {
        return Err(Rejection::BadArmor {
            detail: format!("longer than {MAX_ARMOR_BYTES} bytes"),
        });
    }
    let sig = SshSig::from_pem(armored).map_err(|e| Rejection::BadArmor {
        detail: e.to_string(),
    })?;
    // `ssh-key` refuses versions above 1; OpenSSH has only ever written 1.
    if sig.version() != SshSig::VERSION {
        return Err(Rejection::BadArmor {
            detail: format!("unsupported SSHSIG version {}", sig.version()),
        });
    }
    // `ssh-key`'s decoder is lenient about the length prefixes of nested
    // fields, so several different texts decode to the same signature.
    // Accept only the one encoding ssh-keygen (and `sign`) writes, modulo
    // CRLF line ends and a missing final newline: one signature, one text.
    let canonical = sig
        .to_pem(LineEnding::LF)
        .map_err(|e| Rejection::BadArmor {
            detail: e.to_string(),
        })?;
    let mut normalized = armored.replace("\r\n", "\n");
    if !normalized.ends_with('\n') {
        normalized.push('\n');
    }
    if normalized != canonical {
        return Err(Rejection::BadArmor {
            detail: "not in canonical form (length fields or line layout differ from what ssh-keygen writes)".into(),
        });
    }
    Ok(sig)
}

/// The user-presence flag of a FIDO authenticator (`SSH_SK_USER_PRESENCE_REQD`
/// in OpenSSH's sk-api.h): someone touched the key.
pub const SK_USER_PRESENCE: u8 = 0x01;
/// The user-verification flag (`SSH_SK_USER_VERIFICATION_REQD`): the
/// authenticator checked a PIN or a biometric.
pub const SK_USER_VERIFICATION: u8 = 0x04;

/// What the authenticator reported with a security-key signature, covered
/// by the signature (OpenSSH's `sshkey_sig_details`). Only ever built from
/// a signature that verified: unverified flags mean nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkSignature {
    /// The authenticator data flags (0x01 user present, 0x04 user verified).
    pub flags: u8,
    /// The authenticator's signature counter. Reported, never judged:
    /// OpenSSH does not check it either, and a host cannot know the
    /// counter of a key it shares with no one.
    pub counter: u32,
}

impl SkSignature {
    pub fn user_present(&self) -> bool {
        self.flags & SK_USER_PRESENCE != 0
    }
    pub fn user_verified(&self) -> bool {
        self.flags & SK_USER_VERIFICATION != 0
    }
}

impl fmt::Display for SkSignature {
    /// `flags 0x05 (user present, user verified), counter 7`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut said = Vec::new();
        if self.user_present() {
            said.push("user present");
        }
        if self.user_verified() {
            said.push("user verified");
        }
        if said.is_empty() {
            said.push("no touch, no user verification");
        }
        write!(
            f,
            "flags 0x{:02x} ({}), counter {}",
            self.flags,
            said.join(", "),
            self.counter
        )
    }
}

/// A signature that verified: its key and, for a security key, what the
/// authenticator reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Checked {
    pub key: KeyData,
    pub sk: Option<SkSignature>,
}

/// Check a parsed signature over `message`: our namespace, an ed25519 or
/// sk-ed25519 key with a signature of the same type, and a valid
/// signature. On success, the signing key (and the authenticator's report).
pub(crate) fn check(sig: &SshSig, message: &[u8]) -> Result<Checked, Rejection> {
    check_in_namespace(sig, NAMESPACE, message)
}

/// [`check`] in another namespace: only for OpenSSH's test vectors, which
/// are signed in `unittest`.
pub(crate) fn check_in_namespace(
    sig: &SshSig,
    namespace: &str,
    message: &[u8],
) -> Result<Checked, Rejection> {
    if sig.namespace() != namespace {
        return Err(Rejection::WrongNamespace {
            namespace: sig.namespace().to_string(),
        });
    }
    let supported = |a: &Algorithm| matches!(a, Algorithm::Ed25519 | Algorithm::SkEd25519);
    let key_algorithm = sig.public_key().algorithm();
    if !supported(&key_algorithm) {
        return Err(Rejection::NotEd25519 {
            algorithm: key_algorithm.to_string(),
        });
    }
    if !supported(&sig.algorithm()) {
        return Err(Rejection::NotEd25519 {
            algorithm: sig.algorithm().to_string(),
        });
    }
    // OpenSSH: the signature's type must be the key's (KEY_TYPE_MISMATCH).
    if sig.algorithm() != key_algorithm {
        return Err(Rejection::KeyTypeMismatch {
            key: key_algorithm.to_string(),
            signature: sig.algorithm().to_string(),
        });
    }
    match sig.public_key() {
        KeyData::SkEd25519(key) => {
            let sk = verify_sk_ed25519(key, sig, namespace, message)?;
            Ok(Checked {
                key: sig.public_key().clone(),
                sk: Some(sk),
            })
        }
        _ => {
            let key = PublicKey::from(sig.public_key().clone());
            key.verify(namespace, message, sig)
                .map_err(|_| Rejection::BadSignature)?;
            Ok(Checked {
                key: sig.public_key().clone(),
                sk: None,
            })
        }
    }
}

/// OpenSSH's `ssh_ed25519_sk_verify`. The SSHSIG blob (magic, namespace,
/// hash algorithm, hash of the message) is what an ed25519 key would sign;
/// a FIDO authenticator instead signs its own structure around it:
///
/// ```text
/// SHA256(application) || flags || counter (u32, big-endian) || SHA256(SSHSIG blob)
/// ```
///
/// with the flags and counter sent next to the 64-byte signature. FIDO
/// extensions are not part of this format: OpenSSH requests none and its
/// verifier hashes none (only the `webauthn-sk-*` signature types carry
/// them), so neither does this.
fn verify_sk_ed25519(
    key: &SkEd25519,
    sig: &SshSig,
    namespace: &str,
    message: &[u8],
) -> Result<SkSignature, Rejection> {
    let blob = SshSig::signed_data(namespace, sig.hash_alg(), message).map_err(|e| {
        Rejection::BadArmor {
            detail: e.to_string(),
        }
    })?;
    // `ssh-key` stores an sk signature as the 64 signature bytes followed
    // by the flags and the counter, and decodes nothing else (a shorter
    // signature string, which OpenSSH lets through to fail later, is
    // already refused there).
    let bytes = sig.signature().as_bytes();
    let malformed = || Rejection::BadArmor {
        detail: "malformed sk-ssh-ed25519@openssh.com signature".into(),
    };
    let (signature, trailer) = bytes
        .split_first_chunk::<{ ed25519_dalek::SIGNATURE_LENGTH }>()
        .ok_or_else(malformed)?;
    let [flags, c0, c1, c2, c3] = *trailer else {
        return Err(malformed());
    };
    let counter = u32::from_be_bytes([c0, c1, c2, c3]);

    let mut signed = Vec::with_capacity(32 + 1 + 4 + 32);
    signed.extend_from_slice(&Sha256::digest(key.application().as_bytes()));
    signed.push(flags);
    signed.extend_from_slice(&counter.to_be_bytes());
    signed.extend_from_slice(&Sha256::digest(&blob));

    // Strict: no small-order key or R, canonical S. OpenSSH's reference
    // code is laxer only for signatures no honest authenticator makes.
    let verifying = ed25519_dalek::VerifyingKey::from_bytes(key.public_key().as_ref())
        .map_err(|_| Rejection::BadSignature)?;
    verifying
        .verify_strict(&signed, &ed25519_dalek::Signature::from_bytes(signature))
        .map_err(|_| Rejection::BadSignature)?;
    Ok(SkSignature { flags, counter })
}
