//! Loading the operator's signing key: an OpenSSH private key file
//! (`ssh-keygen -t ed25519`), decrypted with a passphrase when it is
//! encrypted.

use std::io::Read;
use std::path::Path;

use ssh_key::{Algorithm, PrivateKey};
use zeroize::Zeroizing;

use super::SignatureError;

/// Environment variable holding the passphrase of an encrypted key.
pub const PASSPHRASE_ENV: &str = "ROLLGUARD_KEY_PASSPHRASE";

/// An OpenSSH ed25519 private key is about 400 bytes (encrypted: ~460).
const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;

/// Load an ed25519 private key; if it is encrypted, decrypt it with the
/// passphrase in [`PASSPHRASE_ENV`].
pub fn load_private_key(path: &Path) -> Result<PrivateKey, SignatureError> {
    let passphrase = match std::env::var(PASSPHRASE_ENV) {
        Ok(p) => Some(Zeroizing::new(p)),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(_)) => return Err(SignatureError::PassphraseNotUtf8),
    };
    load_private_key_with_passphrase(path, passphrase.as_ref().map(|p| p.as_str()))
}

/// Load an ed25519 private key, decrypting it with `passphrase` if it is
/// encrypted (an encrypted key without a passphrase is an error; a
/// passphrase for an unencrypted key is ignored).
pub fn load_private_key_with_passphrase(
    path: &Path,
    passphrase: Option<&str>,
) -> Result<PrivateKey, SignatureError> {
    let shown = path.display().to_string();
    let io = |source| SignatureError::Io {
        path: shown.clone(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut text = Zeroizing::new(Vec::new());
    file.take(MAX_KEY_FILE_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(io)?;
    if text.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(SignatureError::KeyTooLarge {
            path: shown,
            max: MAX_KEY_FILE_BYTES as usize,
        });
    }
    let key = PrivateKey::from_openssh(&*text).map_err(|e| SignatureError::KeyFormat {
        path: shown.clone(),
        detail: e.to_string(),
    })?;
    // The algorithm is in the unencrypted public half: refuse other key
    // types before spending a KDF on them. A security key's file holds only
    // a handle for the token, which rollguard does not talk to.
    if key.algorithm() == Algorithm::SkEd25519 {
        return Err(SignatureError::SecurityKeySigning);
    }
    if key.algorithm() != Algorithm::Ed25519 {
        return Err(SignatureError::UnsupportedKey {
            algorithm: key.algorithm().to_string(),
        });
    }
    if !key.is_encrypted() {
        return Ok(key);
    }
    let Some(passphrase) = passphrase else {
        return Err(SignatureError::PassphraseRequired { path: shown });
    };
    key.decrypt(passphrase).map_err(|e| match e {
        // A wrong passphrase derives a wrong key; the check integers of the
        // decrypted block then differ, which `ssh-key` reports as Crypto.
        ssh_key::Error::Crypto => SignatureError::WrongPassphrase {
            path: shown.clone(),
        },
        other => SignatureError::Decrypt {
            path: shown.clone(),
            detail: other.to_string(),
        },
    })
}
