//! Bundle signatures and the trust that decides which of them count.
//!
//! Format: OpenSSH SSHSIG (`ssh-keygen -Y sign`), ed25519 keys only (plain
//! `ssh-ed25519`, or `sk-ssh-ed25519@openssh.com` on a FIDO security key,
//! whose signatures are verified but never made here), in the
//! fixed namespace [`NAMESPACE`], over the *exact* bytes of the built
//! manifest (never a re-serialization: a signature must mean the bytes a
//! reviewer read). Trust comes from an OpenSSH `allowed_signers` file
//! ([`AllowedSigners`]), and a bundle is authorized when valid signatures
//! from at least `threshold` **distinct principals** are present
//! ([`verify_threshold`]).
//!
//! - [`sshsig`]: sign, parse and check one signature (the `ssh-key` crate
//!   does the format and the cryptography).
//! - [`allowed_signers`]: the trust file parser (hand-written; see there).
//! - [`pattern`]: OpenSSH pattern-lists (`*`, `?`, `!`) used by that file.
//! - [`threshold`]: which principals each signature may stand for, and the
//!   matching that counts each key and each principal at most once.
//! - [`keys`]: loading (and decrypting) the operator's private key.
//!
//! Certificates (`cert-authority` entries, `*-cert-v01@openssh.com` keys)
//! are not supported: such entries are parsed so a shared file still loads,
//! but they never authorize anything.

use serde::{Deserialize, Serialize};

pub mod agent;
pub mod allowed_signers;
pub mod keys;
pub mod pattern;
pub mod sshsig;
pub mod threshold;

#[cfg(test)]
mod tests;

pub use allowed_signers::{
    AllowedSigner, AllowedSigners, AllowedSignersError, LineError, SkPolicy,
};
pub use keys::{load_private_key, load_private_key_with_passphrase, PASSPHRASE_ENV};
pub use pattern::{Pattern, PatternList};
/// Key types of the public API, re-exported so callers need not depend on
/// `ssh-key` themselves.
pub use ssh_key::{PrivateKey, PublicKey};
pub use sshsig::{public_key_fingerprint, sign, SkSignature};
pub use threshold::{
    evaluate, verify_threshold, Evaluation, Rejection, SignatureDiagnostic, SignatureOutcome,
    Verified, VerifyError, MAX_SIGNATURES,
};

/// The SSHSIG namespace of bundle signatures. A signature made for another
/// purpose (`git`, `file`...) with the same key never verifies as a bundle
/// signature, and ours never verify as theirs.
pub const NAMESPACE: &str = "rollguard-bundle";

/// Longest principal we accept, in bytes.
pub const MAX_PRINCIPAL_BYTES: usize = 256;

/// One signature as a bundle stores it: the armored text exactly as
/// `ssh-keygen -Y sign` (or [`sign`]) produced it, and optionally the
/// principal the signer claims to be.
///
/// The claim is not covered by the signature; it only narrows which
/// `allowed_signers` entries the signature may match (like
/// `ssh-keygen -Y verify -I principal`), and gives wildcard entries an
/// identity. A false claim can only make a signature count for less.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawSignature {
    /// `-----BEGIN SSH SIGNATURE-----` ... `-----END SSH SIGNATURE-----`.
    pub armored: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
}

/// Why a principal string is unacceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrincipalError {
    #[error("principal is empty")]
    Empty,
    #[error("principal is longer than {MAX_PRINCIPAL_BYTES} bytes")]
    TooLong,
    #[error("principal {0:?} contains whitespace, a control character, a comma or a quote")]
    BadCharacter(String),
    #[error("principal {0:?} contains a pattern character ('*', '?' or a leading '!'): name one identity")]
    Pattern(String),
}

/// Check a principal (an identity such as `alice@example.com`): non-empty,
/// at most [`MAX_PRINCIPAL_BYTES`], printable, no whitespace, commas or
/// quotes (they are separators in `allowed_signers`), and no pattern
/// characters (a claimed identity must name one person, not a set).
pub fn validate_principal(principal: &str) -> Result<(), PrincipalError> {
    if principal.is_empty() {
        return Err(PrincipalError::Empty);
    }
    if principal.len() > MAX_PRINCIPAL_BYTES {
        return Err(PrincipalError::TooLong);
    }
    if principal
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == ',' || c == '"')
    {
        return Err(PrincipalError::BadCharacter(principal.to_string()));
    }
    if principal.starts_with('!') || principal.contains(['*', '?']) {
        return Err(PrincipalError::Pattern(principal.to_string()));
    }
    Ok(())
}

/// Errors of signing, key loading and reading one signature.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is larger than {max} bytes: not a private key")]
    KeyTooLarge { path: String, max: usize },
    #[error("{path} is not an OpenSSH private key (expected -----BEGIN OPENSSH PRIVATE KEY-----): {detail}")]
    KeyFormat { path: String, detail: String },
    #[error("{path} is encrypted: set {PASSPHRASE_ENV} to its passphrase")]
    PassphraseRequired { path: String },
    #[error("{PASSPHRASE_ENV} is not valid UTF-8")]
    PassphraseNotUtf8,
    #[error("cannot decrypt {path}: wrong passphrase")]
    WrongPassphrase { path: String },
    #[error("cannot decrypt {path}: {detail}")]
    Decrypt { path: String, detail: String },
    #[error("key type {algorithm} is not supported: rollguard accepts ed25519 keys only")]
    UnsupportedKey { algorithm: String },
    #[error("this is a FIDO security key (sk-ssh-ed25519@openssh.com): rollguard verifies its signatures but cannot sign with it; sign the output of `rollguard bundle manifest` with `ssh-keygen -Y sign -n {NAMESPACE} -f KEY` and attach the .sig with `rollguard bundle attach-signature`")]
    SecurityKeySigning,
    #[error("the private key is still encrypted")]
    EncryptedKey,
    #[error("invalid signer: {0}")]
    Principal(#[from] PrincipalError),
    #[error("signing failed: {0}")]
    Sign(String),
    #[error("malformed signature: {0}")]
    Armor(String),
    #[error("ssh-agent: {0}")]
    Agent(String),
}

impl From<crate::archive::StoredSignature> for RawSignature {
    fn from(s: crate::archive::StoredSignature) -> Self {
        RawSignature {
            armored: s.armored,
            signer: s.signer,
        }
    }
}
