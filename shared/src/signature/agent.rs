//! Signing through `ssh-agent` (`rollguard bundle sign --agent`): the
//! private key stays in the agent (or in a token behind it), and the agent
//! signs the SSHSIG blob exactly as `ssh-keygen -Y sign -f KEY.pub` asks it
//! to.
//!
//! Only one message of the agent protocol (draft-miller-ssh-agent) is
//! needed, `SSH_AGENTC_SIGN_REQUEST`, and it is written here by hand: the
//! agent crates bring an async runtime and a server side for one request
//! and its answer, both a few lines of `ssh-encoding`. What the agent
//! answers is not trusted: the signature is checked against the public key
//! and the message before it is returned, as any bundle's signature is.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use ssh_key::{HashAlg, LineEnding, PublicKey, Signature, SshSig};

use super::{sshsig, RawSignature, SignatureError, NAMESPACE};

const SSH_AGENT_FAILURE: u8 = 5;
const SSH_AGENTC_SIGN_REQUEST: u8 = 13;
const SSH_AGENT_SIGN_RESPONSE: u8 = 14;
/// Largest answer read (an ed25519 signature answer is about 90 bytes).
const MAX_ANSWER: u32 = 64 * 1024;
/// An agent that does not answer (a token waiting for a touch may take a
/// while; a dead one never answers).
const TIMEOUT: Duration = Duration::from_secs(60);

/// The agent's socket, from `SSH_AUTH_SOCK`.
pub fn socket_from_env() -> Result<std::path::PathBuf, SignatureError> {
    std::env::var_os("SSH_AUTH_SOCK")
        .filter(|s| !s.is_empty())
        .map(Into::into)
        .ok_or_else(|| {
            SignatureError::Agent("SSH_AUTH_SOCK is not set: no ssh-agent to ask".into())
        })
}

/// Sign the exact manifest bytes with the agent's key `public`, in
/// namespace [`NAMESPACE`], SHA-512, as [`sshsig::sign`] does with a key
/// file (for ed25519, the same bytes).
pub fn sign(
    manifest_bytes: &[u8],
    public: &PublicKey,
    socket: &Path,
    signer: Option<String>,
) -> Result<RawSignature, SignatureError> {
    sshsig::check_signer(public.algorithm(), signer.as_deref())?;
    let agent_err = |what: &str, e: &dyn std::fmt::Display| {
        SignatureError::Agent(format!("{what} ({}): {e}", socket.display()))
    };
    let signed = SshSig::signed_data(NAMESPACE, HashAlg::Sha512, manifest_bytes)
        .map_err(|e| SignatureError::Sign(e.to_string()))?;
    // The key's wire encoding (the public key blob).
    let key_blob = public
        .to_bytes()
        .map_err(|e| SignatureError::Sign(e.to_string()))?;

    // uint32 length, byte type, string key blob, string data, uint32 flags.
    let mut body = vec![SSH_AGENTC_SIGN_REQUEST];
    put_string(&mut body, &key_blob);
    put_string(&mut body, &signed);
    body.extend_from_slice(&0u32.to_be_bytes());
    let mut stream = UnixStream::connect(socket).map_err(|e| agent_err("cannot connect", &e))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .map_err(|e| agent_err("socket", &e))?;
    let len = u32::try_from(body.len()).map_err(|e| agent_err("request", &e))?;
    stream
        .write_all(&len.to_be_bytes())
        .and_then(|()| stream.write_all(&body))
        .map_err(|e| agent_err("cannot send the request", &e))?;

    let mut len = [0u8; 4];
    stream
        .read_exact(&mut len)
        .map_err(|e| agent_err("no answer", &e))?;
    let len = u32::from_be_bytes(len);
    if len == 0 || len > MAX_ANSWER {
        return Err(agent_err("bad answer", &format!("length {len}")));
    }
    let mut answer = vec![0u8; len as usize];
    stream
        .read_exact(&mut answer)
        .map_err(|e| agent_err("short answer", &e))?;
    let sig_blob = match answer.split_first() {
        Some((&SSH_AGENT_SIGN_RESPONSE, rest)) => {
            get_string(rest).ok_or_else(|| agent_err("bad answer", &"truncated signature"))?
        }
        Some((&SSH_AGENT_FAILURE, _)) => {
            return Err(SignatureError::Agent(format!(
                "the agent ({}) refused to sign: is the key {} loaded (ssh-add -l)?",
                socket.display(),
                public.fingerprint(HashAlg::Sha256)
            )))
        }
        Some((t, _)) => return Err(agent_err("bad answer", &format!("message type {t}"))),
        None => return Err(agent_err("bad answer", &"empty")),
    };
    let signature = Signature::try_from(sig_blob).map_err(|e| agent_err("bad signature", &e))?;
    let sig = SshSig::new(
        public.key_data().clone(),
        NAMESPACE,
        HashAlg::Sha512,
        signature,
    )
    .map_err(|e| SignatureError::Sign(e.to_string()))?;
    // Trust nothing the agent said: the signature must verify.
    sshsig::check(&sig, manifest_bytes)
        .map_err(|r| agent_err("the agent's signature does not verify", &r))?;
    let armored = sig
        .to_pem(LineEnding::LF)
        .map_err(|e| SignatureError::Sign(e.to_string()))?;
    Ok(RawSignature { armored, signer })
}

fn put_string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// The first SSH `string` of `bytes`: its contents, if complete.
fn get_string(bytes: &[u8]) -> Option<&[u8]> {
    let (len, rest) = bytes.split_first_chunk::<4>()?;
    rest.get(..u32::from_be_bytes(*len) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_length_prefixed_and_bounded() {
        let mut v = Vec::new();
        put_string(&mut v, b"abc");
        assert_eq!(v, [0, 0, 0, 3, b'a', b'b', b'c']);
        assert_eq!(get_string(&v), Some(&b"abc"[..]));
        assert_eq!(get_string(&v[..5]), None, "truncated");
        assert_eq!(get_string(&[0, 0]), None);
        assert_eq!(get_string(&[255, 255, 255, 255, 1]), None);
    }

    #[test]
    fn without_ssh_auth_sock_there_is_no_agent_to_ask() {
        let key = PublicKey::from_openssh(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEy6k9wDWwVXPJg7Fh2RiaDSRXMbfJjPKWvfX9wN8wTe x",
        )
        .unwrap();
        let e = sign(b"m", &key, Path::new("/nonexistent/agent.sock"), None).unwrap_err();
        assert!(e.to_string().contains("cannot connect"), "{e}");
    }
}
