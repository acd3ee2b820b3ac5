//! What the controller reads from an uploaded bundle: identity, manifest
//! and the signers it claims. Nothing here authorizes anything — agents
//! verify signatures against their own policy — but the operator's plan
//! shows who signed, and a bundle whose archive or payload digests are
//! broken is refused at upload instead of at every agent.

use rollguard_shared::archive::{self, Limits};
use rollguard_shared::protocol::Sha256Hex;
use rollguard_shared::signature::{sshsig::public_key_fingerprint, RawSignature};

use crate::store::BundleMeta;

/// Parse and check an uploaded bundle (archive structure, manifest, payload
/// digests).
pub fn inspect(bytes: &[u8]) -> Result<BundleMeta, String> {
    let opened = archive::open(bytes, &Limits::default()).map_err(|e| e.to_string())?;
    let manifest_bytes = opened.manifest_bytes.clone();
    let manifest = opened.manifest.clone();
    let signers = opened
        .signatures
        .iter()
        .map(|s| {
            let raw = RawSignature {
                armored: s.armored.clone(),
                signer: s.signer.clone(),
            };
            let fp = public_key_fingerprint(&raw)
                .unwrap_or_else(|e| format!("unreadable signature: {e}"));
            match &s.signer {
                Some(who) => format!("{who} ({fp})"),
                None => format!("(no principal claimed) ({fp})"),
            }
        })
        .collect();
    opened.verify_payload().map_err(|e| e.to_string())?;
    Ok(BundleMeta {
        sha256: Sha256Hex::of(bytes),
        name: manifest.bundle.name.to_string(),
        version: manifest.bundle.version,
        size: bytes.len() as u64,
        manifest: manifest_bytes,
        signers,
    })
}
