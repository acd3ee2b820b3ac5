//! One tar header, judged as hostile input: what kind of entry it is and
//! which of the three namespaces (manifest, signatures, payload) it names.
//!
//! We parse the header fields with the `tar` crate's [`tar::Header`] but do
//! not use its `Entries` iterator: that iterator applies GNU long-name and
//! pax extension records to the next entry, treats end of input as end of
//! archive, and offers `unpack`, all of which we want to refuse or control.
//! Our writer only ever emits plain ustar regular-file headers, so the
//! reader accepts exactly those.

use tar::Header;

use super::{ArchiveError, MANIFEST_ENTRY, PAYLOAD_DIR, SIGNATURES_DIR};
use crate::manifest::PayloadPath;

pub(super) const BLOCK: usize = 512;
/// Byte offset of the type flag in a tar header.
const TYPEFLAG_OFFSET: usize = 156;

/// What an accepted entry is, by its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum EntryName {
    Manifest,
    Signature(usize),
    Signer(usize),
    Payload(PayloadPath),
}

/// An accepted header: a ustar regular file with a valid name.
#[derive(Debug, Clone)]
pub(super) struct EntryHeader {
    pub name: EntryName,
    /// The path as written in the header, for messages.
    pub path: String,
    pub size: u64,
    pub mode: u32,
}

/// Parse one non-zero header block found at `offset`.
pub(super) fn parse_header(block: &[u8; BLOCK], offset: u64) -> Result<EntryHeader, ArchiveError> {
    let header = Header::from_byte_slice(block);

    // The checksum first: a header that fails it tells us nothing reliable.
    let computed: u32 = block[..148]
        .iter()
        .chain(&block[156..])
        .map(|b| u32::from(*b))
        .sum::<u32>()
        + 8 * 32;
    match header.cksum() {
        Ok(stored) if stored == computed => {}
        _ => return Err(ArchiveError::BadChecksum { offset }),
    }

    let path_bytes = header.path_bytes();
    let path = String::from_utf8_lossy(&path_bytes).into_owned();
    let link_target = || {
        header
            .link_name_bytes()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };

    match block[TYPEFLAG_OFFSET] {
        b'0' => {}
        b'1' => {
            return Err(ArchiveError::Hardlink {
                path,
                target: link_target(),
            })
        }
        b'2' => {
            return Err(ArchiveError::Symlink {
                path,
                target: link_target(),
            })
        }
        b'3' => return Err(ArchiveError::CharDevice { path }),
        b'4' => return Err(ArchiveError::BlockDevice { path }),
        b'5' => return Err(ArchiveError::Directory { path }),
        b'6' => return Err(ArchiveError::Fifo { path }),
        b'S' => return Err(ArchiveError::SparseFile { path }),
        // '\0' (pre-POSIX regular file), '7' (contiguous), 'x'/'g' (pax),
        // 'L'/'K' (GNU long names), 'V', 'M', ... : nothing we write.
        other => {
            return Err(ArchiveError::UnsupportedEntryType {
                path,
                type_flag: char::from(other),
            })
        }
    }

    // Exactly "ustar\0" "00": GNU headers ("ustar  \0") may carry sparse
    // maps and base-256 fields we do not want to interpret differently
    // from other tools.
    if header.as_ustar().is_none() {
        return Err(ArchiveError::NotUstar { path });
    }

    let bad = |reason: String| ArchiveError::BadHeader {
        offset,
        path: path.clone(),
        reason,
    };
    let size = header.entry_size().map_err(|e| bad(format!("size: {e}")))?;
    let mode = header.mode().map_err(|e| bad(format!("mode: {e}")))?;

    let name = classify(&path_bytes, &path)?;
    Ok(EntryHeader {
        name,
        path,
        size,
        mode,
    })
}

/// Which namespace a path names, refusing anything that could point
/// elsewhere before looking at the namespace.
fn classify(raw: &[u8], lossy: &str) -> Result<EntryName, ArchiveError> {
    let path = std::str::from_utf8(raw).map_err(|_| ArchiveError::NonUtf8Path {
        path: lossy.to_string(),
    })?;
    if path.starts_with('/') {
        return Err(ArchiveError::AbsolutePath {
            path: path.to_string(),
        });
    }
    if path.split('/').any(|c| c == "." || c == "..") {
        return Err(ArchiveError::DotComponent {
            path: path.to_string(),
        });
    }
    if path == MANIFEST_ENTRY {
        return Ok(EntryName::Manifest);
    }
    if let Some(rest) = path
        .strip_prefix(PAYLOAD_DIR)
        .and_then(|r| r.strip_prefix('/'))
    {
        return PayloadPath::parse(rest)
            .map(EntryName::Payload)
            .map_err(|source| ArchiveError::BadPayloadPath {
                path: path.to_string(),
                source,
            });
    }
    if let Some(rest) = path
        .strip_prefix(SIGNATURES_DIR)
        .and_then(|r| r.strip_prefix('/'))
    {
        if let Some(index) = rest.strip_suffix(".sig").and_then(parse_index) {
            return Ok(EntryName::Signature(index));
        }
        if let Some(index) = rest.strip_suffix(".signer").and_then(parse_index) {
            return Ok(EntryName::Signer(index));
        }
    }
    Err(ArchiveError::UnexpectedEntry {
        path: path.to_string(),
    })
}

/// Exactly three ASCII digits.
fn parse_index(digits: &str) -> Option<usize> {
    if digits.len() == 3 && digits.bytes().all(|b| b.is_ascii_digit()) {
        digits.parse().ok()
    } else {
        None
    }
}

pub(super) fn signature_entry(index: usize) -> String {
    format!("{SIGNATURES_DIR}/{index:03}.sig")
}

pub(super) fn signer_entry(index: usize) -> String {
    format!("{SIGNATURES_DIR}/{index:03}.signer")
}

pub(super) fn payload_entry(path: &PayloadPath) -> String {
    format!("{PAYLOAD_DIR}/{path}")
}

/// Check an armored signature's text (opaque beyond these bounds).
pub(super) fn check_signature(
    path: &str,
    bytes: &[u8],
    max: usize,
) -> Result<String, ArchiveError> {
    if bytes.len() > max {
        return Err(ArchiveError::SignatureTooLarge {
            path: path.to_string(),
            size: bytes.len() as u64,
            limit: max,
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|_| ArchiveError::BadSignature {
        path: path.to_string(),
        reason: "not UTF-8",
    })?;
    if text.trim().is_empty() {
        return Err(ArchiveError::BadSignature {
            path: path.to_string(),
            reason: "empty",
        });
    }
    if text.contains('\0') {
        return Err(ArchiveError::BadSignature {
            path: path.to_string(),
            reason: "contains a NUL byte",
        });
    }
    Ok(text.to_string())
}

/// Check a signer entry: one line, the principal, optionally ending in '\n'.
/// Returns the principal without the newline.
pub(super) fn check_signer(path: &str, bytes: &[u8]) -> Result<String, ArchiveError> {
    let bad = |reason| ArchiveError::BadSigner {
        path: path.to_string(),
        reason,
    };
    let line = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    if line.len() > super::MAX_SIGNER_BYTES {
        return Err(bad("longer than 256 bytes"));
    }
    let text = std::str::from_utf8(line).map_err(|_| bad("not UTF-8"))?;
    if text.is_empty() {
        return Err(bad("empty"));
    }
    if text.chars().any(char::is_control) {
        return Err(bad("contains a control character or more than one line"));
    }
    Ok(text.to_string())
}
