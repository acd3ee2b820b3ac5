//! One SSHSIG signature: make it, read it, check it.
//!
//! The `ssh-key` crate implements the format (PROTOCOL.sshsig) and the
//! ed25519 cryptography; this module pins the choices rollguard makes:
//! namespace [`NAMESPACE`], ed25519 only, SHA-512 (ssh-keygen's default)
//! when signing, LF-terminated PEM armor wrapped at 70 columns exactly like
//! ssh-keygen writes it.

use ssh_key::public::KeyData;
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

/// Check a parsed signature over `message`: our namespace, an ed25519 key
/// and signature, and a valid signature. On success, the signing key.
pub(crate) fn check(sig: &SshSig, message: &[u8]) -> Result<KeyData, Rejection> {
    if sig.namespace() != NAMESPACE {
        return Err(Rejection::WrongNamespace {
            namespace: sig.namespace().to_string(),
        });
    }
    if !sig.public_key().is_ed25519() {
        return Err(Rejection::NotEd25519 {
            algorithm: sig.public_key().algorithm().to_string(),
        });
    }
    if sig.algorithm() != Algorithm::Ed25519 {
        return Err(Rejection::NotEd25519 {
            algorithm: sig.algorithm().to_string(),
        });
    }
    let key = PublicKey::from(sig.public_key().clone());
    key.verify(NAMESPACE, message, sig)
        .map_err(|_| Rejection::BadSignature)?;
    Ok(sig.public_key().clone())
}
