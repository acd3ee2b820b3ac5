//! The bundle file: a ustar tar, optionally zstd-compressed, holding the
//! built manifest, detached signatures over it, and the payload files.
//!
//! The layout and the reading rules are specified in `docs/bundle-format.md`;
//! this module is the one implementation of both sides:
//!
//! - [`build`] turns a source directory (`bundle.toml` + payload files) into
//!   bundle bytes, deterministically;
//! - [`add_signature`] appends a signature, keeping everything else;
//! - [`open`] / [`open_file`] read a bundle *as hostile input* in two steps:
//!   first the manifest and signatures only, with nothing written anywhere,
//!   so the caller can verify signatures and check policy; then
//!   [`OpenedBundle::unpack_payload`] (or [`OpenedBundle::verify_payload`])
//!   continues the same stream through the payload, checking every file
//!   against the signed manifest.
//!
//! Everything a reader accepts is a regular file under `manifest.toml`,
//! `signatures/` or `payload/`; every other kind of entry has its own
//! [`ArchiveError`] variant. Sizes, counts and the decompressed length are
//! bounded by [`Limits`] before anything is allocated or read.

use std::io;
use std::path::PathBuf;

use crate::manifest::{ManifestError, PayloadError, MAX_MANIFEST_BYTES};

mod entry;
mod read;
mod stream;
mod write;

pub use read::{open, open_file, OpenedBundle, PayloadSummary};
pub use write::{add_signature, build, write_bundle_file, BuildOptions, BuiltBundle};

/// Name of the manifest entry, always the first entry of a bundle.
pub const MANIFEST_ENTRY: &str = "manifest.toml";
/// Directory of signature entries (`signatures/NNN.sig`, `signatures/NNN.signer`).
pub const SIGNATURES_DIR: &str = "signatures";
/// Directory of payload entries (`payload/<path>`).
pub const PAYLOAD_DIR: &str = "payload";
/// Name of the source manifest in a source directory.
pub const SOURCE_MANIFEST: &str = "bundle.toml";
/// Longest signer line (the claimed principal), without its newline; the
/// same bound as `signature::MAX_PRINCIPAL_BYTES`.
pub const MAX_SIGNER_BYTES: usize = 256;
/// At most this many bytes of zero padding may follow the end-of-archive
/// block (tar writers pad to their record size, 10 KiB for GNU tar).
pub const MAX_TRAILING_ZEROS: u64 = 64 * 1024;
/// Signature entries are numbered with three digits.
pub const MAX_SIGNATURE_INDEX: usize = 999;
/// zstd magic number (little-endian 0xFD2FB528).
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// A detached signature as stored in a bundle: the armored SSHSIG text and,
/// optionally, the principal its signer claims. Both are opaque here; the
/// signature module verifies them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSignature {
    pub armored: String,
    pub signer: Option<String>,
}

/// Bounds applied when reading (and building) a bundle. A bundle that
/// exceeds any of them is refused before the excess is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Sum of the payload file sizes.
    pub max_payload_bytes: u64,
    /// Size of `manifest.toml` (never more than [`MAX_MANIFEST_BYTES`],
    /// which the manifest parser enforces on its own).
    pub max_manifest_bytes: usize,
    /// Number of signatures.
    pub max_signatures: usize,
    /// Size of one armored signature.
    pub max_signature_bytes: usize,
    /// Number of payload files.
    pub max_files: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: 256 * 1024 * 1024,
            max_manifest_bytes: MAX_MANIFEST_BYTES,
            max_signatures: 32,
            max_signature_bytes: 16 * 1024,
            max_files: 10_000,
        }
    }
}

impl Limits {
    /// The most entries a bundle within these limits can have.
    fn max_entries(&self) -> u64 {
        let sigs = self.max_signatures.min(MAX_SIGNATURE_INDEX + 1) as u64;
        1u64.saturating_add(sigs.saturating_mul(2))
            .saturating_add(self.max_files as u64)
    }

    /// The longest tar stream (decompressed) a bundle within these limits
    /// can be: every entry's header and padding, every byte of data the
    /// limits allow, the end-of-archive marker and the allowed trailing
    /// zeros. Reading past it means the input is not such a bundle (a zstd
    /// bomb, or padding), and reading stops there.
    pub fn max_stream_bytes(&self) -> u64 {
        let sigs = self.max_signatures.min(MAX_SIGNATURE_INDEX + 1) as u64;
        let per_sig = (self.max_signature_bytes as u64).saturating_add(MAX_SIGNER_BYTES as u64 + 1);
        self.max_entries()
            .saturating_mul(1024) // header block + at most one block of padding
            .saturating_add(self.max_manifest_bytes.min(MAX_MANIFEST_BYTES) as u64)
            .saturating_add(sigs.saturating_mul(per_sig))
            .saturating_add(self.max_payload_bytes)
            .saturating_add(1024) // end-of-archive marker
            .saturating_add(MAX_TRAILING_ZEROS)
    }

    /// The largest compressed input accepted: the stream bound plus zstd's
    /// worst-case expansion of incompressible data (< 1/128) and slack for
    /// frame headers. Bounds input that decompresses to nothing (skippable
    /// frames).
    pub fn max_input_bytes(&self) -> u64 {
        let stream = self.max_stream_bytes();
        stream
            .saturating_add(stream / 128)
            .saturating_add(1024 * 1024)
    }
}

/// Everything that can be wrong with a bundle or a bundle source, each with
/// what it concerns.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    // ---- the byte stream --------------------------------------------------
    #[error("reading the bundle: {0}")]
    Read(#[source] io::Error),
    #[error("the bundle is truncated: {0}")]
    Truncated(&'static str),
    #[error("the bundle's tar stream is longer than the {limit} bytes these limits allow (a zstd decompression bomb, or padding)")]
    StreamTooLarge { limit: u64 },
    #[error("the bundle file is longer than the {limit} bytes these limits allow")]
    InputTooLarge { limit: u64 },
    #[error("data follows the end of the archive: only zero padding (at most {MAX_TRAILING_ZEROS} bytes) may follow it")]
    TrailingData,
    #[error("tar header at offset {offset} has a bad checksum")]
    BadChecksum { offset: u64 },
    #[error("tar header of {path:?} at offset {offset} is malformed: {reason}")]
    BadHeader {
        offset: u64,
        path: String,
        reason: String,
    },
    #[error("entry {path:?} does not have a POSIX ustar header (old, GNU and pax formats are not accepted)")]
    NotUstar { path: String },

    // ---- entry types: only regular files are accepted ----------------------
    #[error(
        "entry {path:?} is a symbolic link (to {target:?}); bundles contain regular files only"
    )]
    Symlink { path: String, target: String },
    #[error("entry {path:?} is a hard link (to {target:?}); bundles contain regular files only")]
    Hardlink { path: String, target: String },
    #[error("entry {path:?} is a character device; bundles contain regular files only")]
    CharDevice { path: String },
    #[error("entry {path:?} is a block device; bundles contain regular files only")]
    BlockDevice { path: String },
    #[error("entry {path:?} is a FIFO; bundles contain regular files only")]
    Fifo { path: String },
    #[error("entry {path:?} is a directory; bundles contain regular files only (directories are implied)")]
    Directory { path: String },
    #[error("entry {path:?} is a GNU sparse file; bundles contain regular files only")]
    SparseFile { path: String },
    #[error("entry {path:?} has unsupported type flag {type_flag:?}; bundles contain regular files (type '0') only")]
    UnsupportedEntryType { path: String, type_flag: char },

    // ---- entry names ---------------------------------------------------------
    #[error("entry path {path:?} is not UTF-8")]
    NonUtf8Path { path: String },
    #[error("entry path {path:?} is absolute")]
    AbsolutePath { path: String },
    #[error("entry path {path:?} has a '.' or '..' component")]
    DotComponent { path: String },
    #[error("entry {path:?} is not manifest.toml, signatures/NNN.sig, signatures/NNN.signer or payload/...")]
    UnexpectedEntry { path: String },
    #[error("entry {path:?}: {source}")]
    BadPayloadPath { path: String, source: PayloadError },
    #[error("entry {path:?} occurs twice")]
    DuplicateEntry { path: String },

    // ---- structure -------------------------------------------------------------
    #[error("the bundle is empty: it has no manifest.toml")]
    MissingManifest,
    #[error("the first entry is {found:?}, but manifest.toml must come first")]
    ManifestNotFirst { found: String },
    #[error("manifest.toml is {size} bytes, more than the {limit} allowed")]
    ManifestTooLarge { size: u64, limit: usize },
    #[error("manifest: {0}")]
    Manifest(#[from] ManifestError),
    #[error(
        "signature entry {path:?} comes after payload entries; signatures must precede the payload"
    )]
    SignatureAfterPayload { path: String },
    #[error("signature entry {path:?} is out of order: expected {expected}")]
    SignatureOutOfOrder { path: String, expected: String },
    #[error("more than {limit} signatures")]
    TooManySignatures { limit: usize },
    #[error("signature {path:?} is {size} bytes, more than the {limit} allowed")]
    SignatureTooLarge {
        path: String,
        size: u64,
        limit: usize,
    },
    #[error("signature {path:?} is invalid: {reason}")]
    BadSignature { path: String, reason: &'static str },
    #[error("signer {path:?} is invalid: {reason}")]
    BadSigner { path: String, reason: &'static str },
    #[error("signature {path:?} is an exact duplicate of an earlier signature")]
    DuplicateSignature { path: String },

    // ---- payload against the manifest -------------------------------------------------
    #[error("payload file {path:?} is not listed in the manifest")]
    UnlistedFile { path: String },
    #[error("payload file {path:?} is listed in the manifest but missing from the bundle ({missing} missing in all)")]
    MissingFile { path: String, missing: usize },
    #[error("payload file {path:?} is {actual} bytes, but the manifest says {expected}")]
    SizeMismatch {
        path: String,
        expected: u64,
        actual: u64,
    },
    #[error("payload file {path:?} has mode {actual:04o}, but the manifest says {expected:04o}")]
    ModeMismatch {
        path: String,
        expected: u32,
        actual: u32,
    },
    #[error("payload file {path:?} has SHA-256 {actual}, but the manifest says {expected}")]
    DigestMismatch {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("the payload is {size} bytes, more than the {limit} allowed")]
    PayloadTooLarge { size: u64, limit: u64 },
    #[error("the payload has {count} files, more than the {limit} allowed")]
    TooManyFiles { count: usize, limit: usize },

    // ---- unpacking ---------------------------------------------------------------
    #[error("unpack destination {dest:?} is not usable: {reason}")]
    BadDestination { dest: PathBuf, reason: String },
    #[error("unpacking {path:?}: {source}")]
    Unpack { path: PathBuf, source: io::Error },
    #[error("unpacking {path:?}: something other than a directory we created is in the way")]
    UnpackConflict { path: PathBuf },

    // ---- building ---------------------------------------------------------------------
    #[error("{path:?}: {source}")]
    Source { path: PathBuf, source: io::Error },
    #[error("{path:?} is a symbolic link; bundle sources may contain only regular files and directories (links are not followed)")]
    SourceSymlink { path: PathBuf },
    #[error("{path:?} is a {kind}; bundle sources may contain only regular files and directories")]
    SourceSpecialFile { path: PathBuf, kind: &'static str },
    #[error(
        "{path:?} has mode {mode:04o}; setuid, setgid and sticky bits are not allowed in a bundle"
    )]
    SourceSpecialMode { path: PathBuf, mode: u32 },
    #[error("{path:?}: file names in a bundle must be UTF-8")]
    SourceNameNotUtf8 { path: PathBuf },
    #[error("{path:?}: {source}")]
    SourceBadPath { path: PathBuf, source: PayloadError },
    #[error("payload path {path:?} does not fit a ustar header (at most 100 bytes of file name and 155 of directory, after \"payload/\")")]
    PathTooLongForTar { path: String },
    #[error("{path:?} changed while the bundle was being built")]
    SourceChanged { path: PathBuf },
    #[error("writing the bundle: {0}")]
    Write(#[source] io::Error),
}

#[cfg(test)]
mod tests;
