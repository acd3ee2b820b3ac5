//! Counting signatures: which principals each valid signature may stand
//! for, and how many *distinct* principals the set of signatures proves.
//!
//! A signature proves one key held the manifest bytes. An
//! `allowed_signers` entry says which principals that key may speak for,
//! in which namespaces and when. Two rules keep one person from meeting a
//! threshold alone: each key counts at most once (the same key signing
//! twice, or one key listed under several principals), and each principal
//! counts at most once (two keys of the same person). The number of
//! principals proved is therefore the size of a maximum matching between
//! keys and the principals they may stand for.
//!
//! A key listed under a wildcard pattern (`*@example.com`) and trusted
//! through the name its signature claims is not known to be that person:
//! the host only knows it belongs to *someone* the pattern matches, and
//! whoever holds two such keys can claim two names. So every signature
//! trusted only through a pattern stands for one shared identity,
//! [`WILDCARD_IDENTITY`]: all of them together count once. And since that
//! someone may be a principal listed by name, the wildcard identity does
//! not count at all when a named principal that one of its patterns
//! matches is counted too. (Named principals are the way to require two
//! people.)

use std::collections::BTreeSet;
use std::fmt;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use ssh_key::public::KeyData;
use ssh_key::HashAlg;

use super::allowed_signers::{AllowedSigner, AllowedSigners};
use super::sshsig::SkSignature;
use super::{sshsig, validate_principal, RawSignature, NAMESPACE};

/// The identity of every signature trusted only through a wildcard
/// pattern (see the module documentation). No claimed signer or literal
/// principal can be spelled this way (`*` makes a pattern).
const WILDCARD_IDENTITY: &str = "*";

/// Most signatures a bundle may carry; more is refused outright rather
/// than spending time on them.
pub const MAX_SIGNATURES: usize = 64;

/// Why one signature does not count. The `Display` text is the sentence
/// shown to operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Rejection {
    #[error("not a readable SSH signature: {detail}")]
    BadArmor { detail: String },
    #[error("the claimed signer is invalid: {detail}")]
    InvalidSigner { detail: String },
    #[error("signature is for namespace {namespace:?}, not {NAMESPACE:?}")]
    WrongNamespace { namespace: String },
    #[error("signature uses {algorithm}: only ed25519 keys (ssh-ed25519, sk-ssh-ed25519@openssh.com) are accepted")]
    NotEd25519 { algorithm: String },
    #[error("the signature is of type {signature} but its key is {key}")]
    KeyTypeMismatch { key: String, signature: String },
    #[error("the signature does not match the manifest (tampered manifest or corrupt signature)")]
    BadSignature,
    #[error("the signing key is not in allowed_signers")]
    KeyNotAllowed,
    #[error("the signing key is listed only as cert-authority (allowed_signers line {line}); certificates are not supported")]
    CertAuthorityOnly { line: usize },
    #[error("the signing key is not listed for principal {signer:?}")]
    SignerNotListed { signer: String },
    #[error("the signing key is listed only under wildcard principals (allowed_signers line {line}): the signature must name its signer")]
    SignerRequired { line: usize },
    #[error("the signing key may not sign in namespace {NAMESPACE:?} (namespaces= on allowed_signers line {line})")]
    NamespaceNotAllowed { line: usize },
    #[error(
        "the signing key is not valid yet: valid-after {valid_after} (allowed_signers line {line})"
    )]
    KeyNotYetValid { line: usize, valid_after: Timestamp },
    #[error(
        "the signing key has expired: valid-before {valid_before} (allowed_signers line {line})"
    )]
    KeyExpired {
        line: usize,
        valid_before: Timestamp,
    },
    #[error("the security key did not confirm user presence (flags 0x{flags:02x}: no touch), which allowed_signers line {line} requires (unless it says no-touch-required)")]
    UserPresenceNotConfirmed { line: usize, flags: u8 },
    #[error("the security key did not verify the user (flags 0x{flags:02x}: no PIN or biometric), which verify-required on allowed_signers line {line} requires")]
    UserVerificationNotConfirmed { line: usize, flags: u8 },
    #[error("not examined: a bundle may carry at most {MAX_SIGNATURES} signatures")]
    NotExamined,
}

impl Rejection {
    /// How far an allowed_signers entry got before failing; the most
    /// advanced failure is the most useful one to report.
    fn stage(&self) -> u8 {
        match self {
            Rejection::CertAuthorityOnly { .. } => 1,
            Rejection::SignerNotListed { .. } | Rejection::SignerRequired { .. } => 2,
            Rejection::NamespaceNotAllowed { .. } => 3,
            Rejection::KeyNotYetValid { .. } | Rejection::KeyExpired { .. } => 4,
            Rejection::UserPresenceNotConfirmed { .. }
            | Rejection::UserVerificationNotConfirmed { .. } => 5,
            _ => 0,
        }
    }
}

/// What became of one signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum SignatureOutcome {
    /// Cryptographically valid and trusted for these principals (sorted).
    /// `counted_as` is the principal it was counted for; `None` when its
    /// key or all its principals were already counted through other
    /// signatures.
    Trusted {
        principals: Vec<String>,
        counted_as: Option<String>,
    },
    Rejected {
        reason: Rejection,
        /// `reason` as a sentence.
        message: String,
    },
}

/// Per-signature result, for `bundle verify --json` and `bundle inspect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureDiagnostic {
    /// Position in the bundle's signature list (0-based).
    pub index: usize,
    /// The principal the signature claims, if any.
    pub claimed_signer: Option<String>,
    /// `SHA256:...` of the signing key, when the armor could be read.
    pub key_fingerprint: Option<String>,
    /// e.g. `ssh-ed25519`, when the armor could be read.
    pub key_algorithm: Option<String>,
    /// For a security key's signature that verified: the authenticator's
    /// flags and counter (whether or not allowed_signers then trusts it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_key: Option<SkSignature>,
    #[serde(flatten)]
    pub outcome: SignatureOutcome,
}

impl SignatureDiagnostic {
    pub fn rejection(&self) -> Option<&Rejection> {
        match &self.outcome {
            SignatureOutcome::Rejected { reason, .. } => Some(reason),
            SignatureOutcome::Trusted { .. } => None,
        }
    }
}

impl fmt::Display for SignatureDiagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "signature #{}", self.index + 1)?;
        if let Some(s) = &self.claimed_signer {
            write!(f, " (signer {s})")?;
        }
        if let Some(fp) = &self.key_fingerprint {
            write!(f, " [{fp}]")?;
        }
        if let Some(sk) = &self.security_key {
            write!(f, " (security key: {sk})")?;
        }
        match &self.outcome {
            SignatureOutcome::Trusted {
                counted_as: Some(p),
                ..
            } => write!(f, ": valid, counted for {p}"),
            SignatureOutcome::Trusted {
                principals,
                counted_as: None,
            } => {
                write!(
                    f,
                    ": valid for {}, but its key or principal is already counted",
                    principals.join(", ")
                )
            }
            SignatureOutcome::Rejected { message, .. } => write!(f, ": rejected: {message}"),
        }
    }
}

/// The result of looking at all signatures, without a threshold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Distinct principals proved (a maximum matching), sorted.
    pub principals: Vec<String>,
    pub signatures: Vec<SignatureDiagnostic>,
}

/// A bundle whose signatures met the threshold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verified {
    /// Distinct principals proved, sorted; at least `threshold` of them.
    pub principals: Vec<String>,
    pub threshold: usize,
    pub signatures: Vec<SignatureDiagnostic>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("signature threshold 0 is invalid: at least one signature must be required")]
    ZeroThreshold,
    #[error("the bundle has no signatures")]
    NoSignatures,
    #[error("the bundle has {count} signatures; at most {MAX_SIGNATURES} are accepted")]
    TooManySignatures { count: usize },
    #[error("{valid} valid distinct signer(s){}, {required} required{}", list_principals(.principals), list_rejections(.signatures))]
    BelowThreshold {
        valid: usize,
        required: usize,
        principals: Vec<String>,
        signatures: Vec<SignatureDiagnostic>,
    },
}

impl VerifyError {
    /// Per-signature results, when signatures were examined.
    pub fn diagnostics(&self) -> &[SignatureDiagnostic] {
        match self {
            VerifyError::BelowThreshold { signatures, .. } => signatures,
            _ => &[],
        }
    }
}

fn list_principals(principals: &[String]) -> String {
    if principals.is_empty() {
        String::new()
    } else {
        format!(" ({})", principals.join(", "))
    }
}

fn list_rejections(signatures: &[SignatureDiagnostic]) -> String {
    let mut out = String::new();
    for d in signatures {
        if !matches!(
            d.outcome,
            SignatureOutcome::Trusted {
                counted_as: Some(_),
                ..
            }
        ) {
            out.push_str("; ");
            out.push_str(&d.to_string());
        }
    }
    out
}

/// Check that at least `threshold` distinct principals signed the exact
/// `manifest_bytes`, trusting `allowed` at instant `now`.
pub fn verify_threshold(
    manifest_bytes: &[u8],
    signatures: &[RawSignature],
    allowed: &AllowedSigners,
    now: Timestamp,
    threshold: usize,
) -> Result<Verified, VerifyError> {
    if threshold == 0 {
        return Err(VerifyError::ZeroThreshold);
    }
    if signatures.is_empty() {
        return Err(VerifyError::NoSignatures);
    }
    if signatures.len() > MAX_SIGNATURES {
        return Err(VerifyError::TooManySignatures {
            count: signatures.len(),
        });
    }
    let Evaluation {
        principals,
        signatures,
    } = evaluate(manifest_bytes, signatures, allowed, now);
    if principals.len() < threshold {
        return Err(VerifyError::BelowThreshold {
            valid: principals.len(),
            required: threshold,
            principals,
            signatures,
        });
    }
    Ok(Verified {
        principals,
        threshold,
        signatures,
    })
}

/// Examine every signature and count distinct principals, without judging
/// against a threshold (for `bundle inspect`). At most [`MAX_SIGNATURES`]
/// are examined; the rest are reported as rejected.
pub fn evaluate(
    manifest_bytes: &[u8],
    signatures: &[RawSignature],
    allowed: &AllowedSigners,
    now: Timestamp,
) -> Evaluation {
    let mut diagnostics = Vec::with_capacity(signatures.len());
    // Distinct keys of trusted signatures, with the principals each may
    // stand for.
    let mut keys: Vec<(KeyData, BTreeSet<String>)> = Vec::new();
    // For each trusted signature: its index into `keys`.
    let mut key_of: Vec<Option<usize>> = Vec::with_capacity(signatures.len());

    for (index, raw) in signatures.iter().enumerate() {
        let mut diag = SignatureDiagnostic {
            index,
            claimed_signer: raw.signer.clone(),
            key_fingerprint: None,
            key_algorithm: None,
            security_key: None,
            outcome: SignatureOutcome::Trusted {
                principals: vec![],
                counted_as: None,
            },
        };
        let result = if index >= MAX_SIGNATURES {
            Err(Rejection::NotExamined)
        } else {
            judge(raw, manifest_bytes, allowed, now, &mut diag)
        };
        match result {
            Ok((key, principals)) => {
                let slot = match keys.iter().position(|(k, _)| *k == key) {
                    Some(i) => i,
                    None => {
                        keys.push((key, BTreeSet::new()));
                        keys.len() - 1
                    }
                };
                keys[slot].1.extend(principals.iter().cloned());
                diag.outcome = SignatureOutcome::Trusted {
                    principals: principals.into_iter().collect(),
                    counted_as: None,
                };
                key_of.push(Some(slot));
            }
            Err(reason) => {
                diag.outcome = SignatureOutcome::Rejected {
                    message: reason.to_string(),
                    reason,
                };
                key_of.push(None);
            }
        }
        diagnostics.push(diag);
    }

    let mut assignment = match_keys_to_principals(&keys);
    // The wildcard identity is credited with the name its signature claimed
    // (for the report), unless a named principal it could be was counted.
    for slot in 0..assignment.len() {
        if assignment[slot].as_deref() != Some(WILDCARD_IDENTITY) {
            continue;
        }
        let claim = key_of
            .iter()
            .zip(signatures)
            .find(|(k, _)| **k == Some(slot))
            .and_then(|(_, raw)| raw.signer.clone())
            .unwrap_or_default();
        let patterns: Vec<&AllowedSigner> = allowed
            .entries()
            .iter()
            .filter(|e| e.public_key().key_data() == &keys[slot].0)
            .filter(|e| e.principals().matches(&claim))
            .collect();
        let shadowed = assignment.iter().flatten().any(|named| {
            named != WILDCARD_IDENTITY && patterns.iter().any(|e| e.principals().matches(named))
        });
        assignment[slot] = (!shadowed).then(|| wildcard_name(&claim, &patterns));
        if let Some(name) = &assignment[slot] {
            keys[slot].1.insert(name.clone());
        }
    }
    // Credit each matched principal to the first signature of its key that
    // may stand for it.
    for (slot, principal) in assignment.iter().enumerate() {
        let Some(principal) = principal else { continue };
        for (diag, k) in diagnostics.iter_mut().zip(&key_of) {
            if *k != Some(slot) {
                continue;
            }
            if let SignatureOutcome::Trusted {
                principals,
                counted_as,
            } = &mut diag.outcome
            {
                if principals.contains(principal)
                    || (principals.iter().any(|p| p == WILDCARD_IDENTITY)
                        && keys[slot].1.contains(principal))
                {
                    *counted_as = Some(principal.clone());
                    break;
                }
            }
        }
    }
    let mut principals: Vec<String> = assignment.into_iter().flatten().collect();
    principals.sort();
    Evaluation {
        principals,
        signatures: diagnostics,
    }
}

/// How a signature counted for the wildcard identity is named in reports:
/// the name it claimed and the patterns that vouch for it.
fn wildcard_name(claim: &str, entries: &[&AllowedSigner]) -> String {
    let lists: Vec<String> = entries.iter().map(|e| e.principals().to_string()).collect();
    format!("{claim} (by pattern {})", lists.join(" / "))
}

/// Everything about one signature: armor (first, so that diagnostics can
/// name the key), claim, namespace, algorithm, cryptography, then trust.
/// On success, its key and candidate principals.
fn judge(
    raw: &RawSignature,
    message: &[u8],
    allowed: &AllowedSigners,
    now: Timestamp,
    diag: &mut SignatureDiagnostic,
) -> Result<(KeyData, BTreeSet<String>), Rejection> {
    let sig = sshsig::parse(&raw.armored)?;
    diag.key_fingerprint = Some(sig.public_key().fingerprint(HashAlg::Sha256).to_string());
    diag.key_algorithm = Some(sig.public_key().algorithm().to_string());
    if let Some(signer) = &raw.signer {
        validate_principal(signer).map_err(|e| Rejection::InvalidSigner {
            detail: e.to_string(),
        })?;
    }
    let checked = sshsig::check(&sig, message)?;
    diag.security_key = checked.sk;
    let principals = trusted_principals(&checked, raw.signer.as_deref(), allowed, now)?;
    Ok((checked.key, principals))
}

/// The principals a valid signature by `key` may stand for: from every
/// entry with this key that is not a CA, admits our namespace and is
/// valid at `now` (and, for a security key, whose flag requirements the
/// signature meets). Literal principals count by themselves; a wildcard
/// pattern only through a claimed signer it matches. With a claim, only
/// the claim can be a candidate (`ssh-keygen -Y verify -I`).
fn trusted_principals(
    checked: &sshsig::Checked,
    claim: Option<&str>,
    allowed: &AllowedSigners,
    now: Timestamp,
) -> Result<BTreeSet<String>, Rejection> {
    let mut found = BTreeSet::new();
    let mut best: Option<Rejection> = None;
    let mut any_entry = false;
    for entry in allowed
        .entries()
        .iter()
        .filter(|e| e.public_key().key_data() == &checked.key)
    {
        any_entry = true;
        match entry_principals(entry, claim, checked.sk, now) {
            Ok(p) => found.extend(p),
            Err(r) => {
                if best.as_ref().is_none_or(|b| r.stage() > b.stage()) {
                    best = Some(r);
                }
            }
        }
    }
    if !found.is_empty() {
        return Ok(found);
    }
    if !any_entry {
        return Err(Rejection::KeyNotAllowed);
    }
    Err(best.unwrap_or(Rejection::KeyNotAllowed))
}

fn entry_principals(
    entry: &AllowedSigner,
    claim: Option<&str>,
    sk: Option<SkSignature>,
    now: Timestamp,
) -> Result<Vec<String>, Rejection> {
    let line = entry.line();
    if entry.is_cert_authority() {
        return Err(Rejection::CertAuthorityOnly { line });
    }
    let candidates: Vec<String> = match claim {
        // Named on this line: that principal.
        Some(c) if entry.principals().literals().any(|l| l == c) => vec![c.to_string()],
        // Only matched by a pattern: someone the pattern matches.
        Some(c) if entry.principals().matches(c) => vec![WILDCARD_IDENTITY.to_string()],
        Some(c) => {
            return Err(Rejection::SignerNotListed {
                signer: c.to_string(),
            })
        }
        None => entry.principals().literals().map(str::to_string).collect(),
    };
    if candidates.is_empty() {
        return Err(Rejection::SignerRequired { line });
    }
    if !entry.allows_namespace(NAMESPACE) {
        return Err(Rejection::NamespaceNotAllowed { line });
    }
    // ssh-keygen compares whole seconds, both bounds inclusive.
    let now_s = now.as_second();
    if let Some(after) = entry.valid_after() {
        if now_s < after.as_second() {
            return Err(Rejection::KeyNotYetValid {
                line,
                valid_after: after,
            });
        }
    }
    if let Some(before) = entry.valid_before() {
        if now_s > before.as_second() {
            return Err(Rejection::KeyExpired {
                line,
                valid_before: before,
            });
        }
    }
    // sshd's order (auth2-pubkey.c): presence, then verification. An sk
    // entry only matches an sk key, so `sk` is there; were it not, no flag
    // would be set, and the check fails closed.
    if let Some(policy) = entry.sk_policy() {
        let flags = sk.map_or(0, |s| s.flags);
        if policy.user_presence && flags & sshsig::SK_USER_PRESENCE == 0 {
            return Err(Rejection::UserPresenceNotConfirmed { line, flags });
        }
        if policy.user_verification && flags & sshsig::SK_USER_VERIFICATION == 0 {
            return Err(Rejection::UserVerificationNotConfirmed { line, flags });
        }
    }
    Ok(candidates)
}

/// Maximum bipartite matching of keys to principals (Kuhn's augmenting
/// paths; a bundle has a handful of signatures, so O(V·E) is nothing).
/// Returns, for each key, the principal it is matched to.
fn match_keys_to_principals(keys: &[(KeyData, BTreeSet<String>)]) -> Vec<Option<String>> {
    let principals: Vec<&String> = keys
        .iter()
        .flat_map(|(_, p)| p)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let adjacency: Vec<Vec<usize>> = keys
        .iter()
        .map(|(_, ps)| {
            ps.iter()
                .filter_map(|p| principals.binary_search(&p).ok())
                .collect()
        })
        .collect();
    // owner[principal] = key matched to it.
    let mut owner: Vec<Option<usize>> = vec![None; principals.len()];
    for key in 0..keys.len() {
        let mut visited = vec![false; principals.len()];
        augment(key, &adjacency, &mut visited, &mut owner);
    }
    let mut assignment = vec![None; keys.len()];
    for (p, k) in owner.iter().enumerate() {
        if let Some(k) = k {
            assignment[*k] = Some(principals[p].clone());
        }
    }
    assignment
}

/// Try to match `key`, re-routing already matched keys along an
/// augmenting path. Recursion depth is bounded by the number of keys
/// (at most [`MAX_SIGNATURES`]).
fn augment(
    key: usize,
    adjacency: &[Vec<usize>],
    visited: &mut [bool],
    owner: &mut [Option<usize>],
) -> bool {
    for &p in &adjacency[key] {
        if visited[p] {
            continue;
        }
        visited[p] = true;
        let free = match owner[p] {
            None => true,
            Some(other) => augment(other, adjacency, visited, owner),
        };
        if free {
            owner[p] = Some(key);
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> KeyData {
        let kp = ssh_key::private::Ed25519Keypair::from_seed(&[n; 32]);
        KeyData::from(kp.public)
    }

    fn set(ps: &[&str]) -> BTreeSet<String> {
        ps.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn matching_finds_augmenting_paths() {
        // Greedy would give k1→alice and strand k2; the maximum is 2.
        let keys = vec![(key(1), set(&["alice", "bob"])), (key(2), set(&["alice"]))];
        let a = match_keys_to_principals(&keys);
        assert_eq!(a, vec![Some("bob".to_string()), Some("alice".to_string())]);
    }

    #[test]
    fn matching_counts_each_side_once() {
        // One key, three principals: 1. Three keys, one principal: 1.
        let one_key = vec![(key(1), set(&["a", "b", "c"]))];
        assert_eq!(
            match_keys_to_principals(&one_key)
                .into_iter()
                .flatten()
                .count(),
            1
        );
        let one_principal = vec![
            (key(1), set(&["a"])),
            (key(2), set(&["a"])),
            (key(3), set(&["a"])),
        ];
        assert_eq!(
            match_keys_to_principals(&one_principal)
                .into_iter()
                .flatten()
                .count(),
            1
        );
        assert!(match_keys_to_principals(&[]).is_empty());
    }

    #[test]
    fn matching_is_maximum_on_a_chain() {
        // k1:{a,b} k2:{b,c} k3:{c,d} k4:{a} → 4 with re-routing.
        let keys = vec![
            (key(1), set(&["a", "b"])),
            (key(2), set(&["b", "c"])),
            (key(3), set(&["c", "d"])),
            (key(4), set(&["a"])),
        ];
        let mut got: Vec<String> = match_keys_to_principals(&keys)
            .into_iter()
            .flatten()
            .collect();
        got.sort();
        assert_eq!(got, vec!["a", "b", "c", "d"]);
    }
}
