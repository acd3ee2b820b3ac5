//! Reading a bundle as hostile input, in two steps over one pass of the
//! stream: [`open`] reads the manifest and the signatures and stops at the
//! first payload entry; the caller verifies signatures and policy; then
//! [`OpenedBundle::unpack_payload`] or [`OpenedBundle::verify_payload`]
//! continues through the payload.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::entry::{check_signature, check_signer, signature_entry, EntryHeader, EntryName};
use super::stream::{decode, TarReader};
use super::{ArchiveError, Limits, StoredSignature, MAX_SIGNATURE_INDEX, MAX_SIGNER_BYTES};
use crate::manifest::{Manifest, PayloadFile, PayloadPath};

/// A bundle whose manifest and signatures have been read and checked for
/// form (not for trust: that is the caller's next step), positioned at its
/// payload. Nothing has been written to disk.
pub struct OpenedBundle<'a> {
    /// The exact bytes of `manifest.toml`, which signatures cover.
    pub manifest_bytes: Vec<u8>,
    /// The parsed manifest.
    pub manifest: Manifest,
    /// The signatures, in archive order.
    pub signatures: Vec<StoredSignature>,
    compressed: bool,
    limits: Limits,
    tar: TarReader<'a>,
    /// The header of the first payload entry (already read), or `None` when
    /// the end-of-archive marker came right after the signatures.
    first_payload: Option<EntryHeader>,
}

impl fmt::Debug for OpenedBundle<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenedBundle")
            .field("manifest", &self.manifest)
            .field("signatures", &self.signatures)
            .field("compressed", &self.compressed)
            .finish_non_exhaustive()
    }
}

/// What a payload pass checked (and, for unpacking, wrote).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadSummary {
    pub files: usize,
    pub bytes: u64,
}

/// Open a bundle from any reader: detect compression, read and check
/// `manifest.toml` and the signature entries, and stop before the payload.
pub fn open<'a, R: std::io::Read + Send + 'a>(
    reader: R,
    limits: &Limits,
) -> Result<OpenedBundle<'a>, ArchiveError> {
    let (stream, compressed) = decode(reader, limits)?;
    let mut tar = TarReader::new(stream);

    let first = tar.next_header()?.ok_or(ArchiveError::MissingManifest)?;
    if first.name != EntryName::Manifest {
        return Err(ArchiveError::ManifestNotFirst { found: first.path });
    }
    let manifest_limit = limits
        .max_manifest_bytes
        .min(crate::manifest::MAX_MANIFEST_BYTES);
    if first.size > manifest_limit as u64 {
        return Err(ArchiveError::ManifestTooLarge {
            size: first.size,
            limit: manifest_limit,
        });
    }
    let manifest_bytes = tar.read_small(first.size)?;
    let manifest = Manifest::parse(&manifest_bytes)?;
    check_payload_limits(&manifest.payload, limits)?;

    let max_signatures = limits.max_signatures.min(MAX_SIGNATURE_INDEX + 1);
    let mut signatures: Vec<StoredSignature> = Vec::new();
    let first_payload = loop {
        let Some(entry) = tar.next_header()? else {
            break None;
        };
        match entry.name {
            EntryName::Payload(_) => break Some(entry),
            EntryName::Manifest => return Err(ArchiveError::DuplicateEntry { path: entry.path }),
            EntryName::Signature(index) => {
                if index != signatures.len() {
                    let expected = signature_entry(signatures.len());
                    return Err(ArchiveError::SignatureOutOfOrder {
                        path: entry.path,
                        expected,
                    });
                }
                if signatures.len() >= max_signatures {
                    return Err(ArchiveError::TooManySignatures {
                        limit: max_signatures,
                    });
                }
                if entry.size > limits.max_signature_bytes as u64 {
                    return Err(ArchiveError::SignatureTooLarge {
                        path: entry.path,
                        size: entry.size,
                        limit: limits.max_signature_bytes,
                    });
                }
                let bytes = tar.read_small(entry.size)?;
                let armored = check_signature(&entry.path, &bytes, limits.max_signature_bytes)?;
                if signatures.iter().any(|s| s.armored == armored) {
                    return Err(ArchiveError::DuplicateSignature { path: entry.path });
                }
                signatures.push(StoredSignature {
                    armored,
                    signer: None,
                });
            }
            EntryName::Signer(index) => {
                // A signer line belongs to the signature right before it.
                let count = signatures.len();
                let Some(last) = signatures
                    .last_mut()
                    .filter(|s| index + 1 == count && s.signer.is_none())
                else {
                    let expected = signature_entry(signatures.len());
                    return Err(ArchiveError::SignatureOutOfOrder {
                        path: entry.path,
                        expected,
                    });
                };
                if entry.size > MAX_SIGNER_BYTES as u64 + 1 {
                    return Err(ArchiveError::BadSigner {
                        path: entry.path,
                        reason: "longer than 256 bytes",
                    });
                }
                let bytes = tar.read_small(entry.size)?;
                last.signer = Some(check_signer(&entry.path, &bytes)?);
            }
        }
    };

    Ok(OpenedBundle {
        manifest_bytes,
        manifest,
        signatures,
        compressed,
        limits: *limits,
        tar,
        first_payload,
    })
}

/// Open a bundle file. The file stays open for the payload pass.
pub fn open_file(path: &Path, limits: &Limits) -> Result<OpenedBundle<'static>, ArchiveError> {
    let file = File::open(path).map_err(ArchiveError::Read)?;
    open(std::io::BufReader::new(file), limits)
}

/// The manifest's payload table against the limits, before any payload byte
/// is read. (The sum is computed with overflow checks: sizes are untrusted.)
pub(super) fn check_payload_limits(
    files: &[PayloadFile],
    limits: &Limits,
) -> Result<(), ArchiveError> {
    if files.len() > limits.max_files {
        return Err(ArchiveError::TooManyFiles {
            count: files.len(),
            limit: limits.max_files,
        });
    }
    let total = files
        .iter()
        .try_fold(0u64, |acc, f| acc.checked_add(f.size));
    match total {
        Some(t) if t <= limits.max_payload_bytes => Ok(()),
        other => Err(ArchiveError::PayloadTooLarge {
            size: other.unwrap_or(u64::MAX),
            limit: limits.max_payload_bytes,
        }),
    }
}

/// Where the payload pass puts each file's bytes.
pub(super) trait PayloadSink {
    type File;
    /// Start a file whose header matched the manifest.
    fn create(&mut self, file: &PayloadFile) -> Result<Self::File, ArchiveError>;
    /// Write a chunk of it.
    fn write(
        &mut self,
        handle: &mut Self::File,
        file: &PayloadFile,
        chunk: &[u8],
    ) -> Result<(), ArchiveError>;
    /// All bytes were written and the digest matched.
    fn finish(&mut self, handle: Self::File, file: &PayloadFile) -> Result<(), ArchiveError>;
}

impl<'a> OpenedBundle<'a> {
    /// Whether the bundle file was zstd-compressed.
    pub fn is_compressed(&self) -> bool {
        self.compressed
    }

    /// The limits this bundle was opened with (and the payload pass uses).
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Check every payload file against the manifest (listed, size, mode,
    /// SHA-256, none missing, nothing after the end) without writing
    /// anything.
    pub fn verify_payload(self) -> Result<PayloadSummary, ArchiveError> {
        struct Verify;
        impl PayloadSink for Verify {
            type File = std::io::Sink;
            fn create(&mut self, _: &PayloadFile) -> Result<Self::File, ArchiveError> {
                Ok(std::io::sink())
            }
            fn write(
                &mut self,
                _: &mut Self::File,
                _: &PayloadFile,
                _: &[u8],
            ) -> Result<(), ArchiveError> {
                Ok(())
            }
            fn finish(&mut self, _: Self::File, _: &PayloadFile) -> Result<(), ArchiveError> {
                Ok(())
            }
        }
        self.payload_pass(&mut Verify)
    }

    /// Check the payload as [`verify_payload`](Self::verify_payload) does
    /// and write it beneath `dest`, which must be an existing, empty
    /// directory (not a symlink) that only the caller can write to.
    ///
    /// Directories are created with mode 0755, files with `O_CREAT|O_EXCL|
    /// O_NOFOLLOW` and mode 0600, and each file gets its manifest mode only
    /// once all its bytes are written and its digest matched.
    ///
    /// On error, `dest` may hold partial output (including a file whose
    /// digest did not match, left at mode 0600): the caller must delete it.
    pub fn unpack_payload(self, dest: &Path) -> Result<PayloadSummary, ArchiveError> {
        check_destination(dest)?;
        let mut sink = Unpacker {
            dest: dest.to_path_buf(),
            made: BTreeSet::new(),
        };
        self.payload_pass(&mut sink)
    }

    /// Run the payload pass into `sink`, through the end of the input.
    pub(super) fn payload_pass<S: PayloadSink>(
        self,
        sink: &mut S,
    ) -> Result<PayloadSummary, ArchiveError> {
        let OpenedBundle {
            manifest,
            mut tar,
            first_payload,
            limits,
            ..
        } = self;
        let expected: BTreeMap<&PayloadPath, &PayloadFile> =
            manifest.payload.iter().map(|f| (&f.path, f)).collect();
        let mut seen: HashSet<&PayloadPath> = HashSet::with_capacity(expected.len());
        let mut summary = PayloadSummary { files: 0, bytes: 0 };

        let mut next = first_payload;
        while let Some(entry) = next {
            let EntryName::Payload(path) = &entry.name else {
                // `open` and the loop below only hand us payload entries.
                return Err(ArchiveError::UnexpectedEntry { path: entry.path });
            };
            let Some((listed_path, file)) = expected.get_key_value(path) else {
                return Err(ArchiveError::UnlistedFile { path: entry.path });
            };
            if !seen.insert(*listed_path) {
                return Err(ArchiveError::DuplicateEntry { path: entry.path });
            }
            if entry.size != file.size {
                return Err(ArchiveError::SizeMismatch {
                    path: entry.path,
                    expected: file.size,
                    actual: entry.size,
                });
            }
            if entry.mode != file.mode {
                return Err(ArchiveError::ModeMismatch {
                    path: entry.path,
                    expected: file.mode,
                    actual: entry.mode,
                });
            }
            // Redundant with the manifest check in `open` (sizes match the
            // manifest and paths are unique) but cheap, and it keeps this
            // loop bounded on its own.
            summary.files += 1;
            summary.bytes = summary.bytes.saturating_add(entry.size);
            if summary.bytes > limits.max_payload_bytes {
                return Err(ArchiveError::PayloadTooLarge {
                    size: summary.bytes,
                    limit: limits.max_payload_bytes,
                });
            }

            let mut handle = sink.create(file)?;
            let mut hasher = Sha256::new();
            tar.read_data(entry.size, |chunk| {
                hasher.update(chunk);
                sink.write(&mut handle, file, chunk)
            })?;
            let actual: [u8; 32] = hasher.finalize().into();
            if actual != file.sha256 {
                return Err(ArchiveError::DigestMismatch {
                    path: entry.path,
                    expected: hex::encode(file.sha256),
                    actual: hex::encode(actual),
                });
            }
            sink.finish(handle, file)?;

            next = match tar.next_header()? {
                None => None,
                Some(e) => match e.name {
                    EntryName::Payload(_) => Some(e),
                    EntryName::Manifest => {
                        return Err(ArchiveError::DuplicateEntry { path: e.path })
                    }
                    EntryName::Signature(_) | EntryName::Signer(_) => {
                        return Err(ArchiveError::SignatureAfterPayload { path: e.path })
                    }
                },
            };
        }

        let missing: Vec<&&PayloadPath> = expected.keys().filter(|p| !seen.contains(**p)).collect();
        if let Some(first) = missing.first() {
            return Err(ArchiveError::MissingFile {
                path: first.to_string(),
                missing: missing.len(),
            });
        }
        tar.finish()?;
        Ok(summary)
    }
}

/// `dest` must be a real directory (not a symlink to one) and empty.
fn check_destination(dest: &Path) -> Result<(), ArchiveError> {
    let bad = |reason: String| ArchiveError::BadDestination {
        dest: dest.to_path_buf(),
        reason,
    };
    let meta = fs::symlink_metadata(dest).map_err(|e| bad(e.to_string()))?;
    if meta.file_type().is_symlink() {
        return Err(bad("it is a symbolic link".into()));
    }
    if !meta.is_dir() {
        return Err(bad("it is not a directory".into()));
    }
    let mut entries = fs::read_dir(dest).map_err(|e| bad(e.to_string()))?;
    if entries.next().is_some() {
        return Err(bad("it is not empty".into()));
    }
    Ok(())
}

/// Writes payload files beneath `dest`.
///
/// Paths are joined from validated [`PayloadPath`]s (relative, no `.`/`..`)
/// onto a directory we checked is empty; the only things created beneath it
/// are the directories and regular files below, so no component can be a
/// symlink unless someone else writes into `dest` concurrently, which the
/// caller rules out by owning it. `O_NOFOLLOW` and the checks on existing
/// directories are a second line behind that.
struct Unpacker {
    dest: PathBuf,
    /// Directories (relative) we created.
    made: BTreeSet<String>,
}

impl Unpacker {
    fn ensure_dir(&mut self, rel: &str) -> Result<(), ArchiveError> {
        if self.made.contains(rel) {
            return Ok(());
        }
        let path = self.dest.join(rel);
        match DirBuilder::new().mode(0o755).create(&path) {
            Ok(()) => {
                // The umask may have removed bits; directories are 0755 exactly.
                fs::set_permissions(&path, Permissions::from_mode(0o755)).map_err(|source| {
                    ArchiveError::Unpack {
                        path: path.clone(),
                        source,
                    }
                })?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(ArchiveError::UnpackConflict { path });
            }
            Err(source) => return Err(ArchiveError::Unpack { path, source }),
        }
        self.made.insert(rel.to_string());
        Ok(())
    }
}

impl PayloadSink for Unpacker {
    type File = File;

    fn create(&mut self, file: &PayloadFile) -> Result<File, ArchiveError> {
        for dir in file.path.ancestors() {
            self.ensure_dir(dir)?;
        }
        let path = self.dest.join(file.path.as_str());
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|source| ArchiveError::Unpack { path, source })
    }

    fn write(
        &mut self,
        handle: &mut File,
        file: &PayloadFile,
        chunk: &[u8],
    ) -> Result<(), ArchiveError> {
        handle
            .write_all(chunk)
            .map_err(|source| ArchiveError::Unpack {
                path: self.dest.join(file.path.as_str()),
                source,
            })
    }

    fn finish(&mut self, handle: File, file: &PayloadFile) -> Result<(), ArchiveError> {
        // fchmod on the descriptor we wrote through: no path lookup.
        handle
            .set_permissions(Permissions::from_mode(file.mode))
            .map_err(|source| ArchiveError::Unpack {
                path: self.dest.join(file.path.as_str()),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// If something other than us puts a symlink inside `dest` while we
    /// unpack (the caller's job is to rule that out), we still do not write
    /// through it: neither as a parent directory nor as the file itself.
    #[test]
    fn unpacker_does_not_follow_symlinks_planted_in_dest() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("dest");
        let outside = root.path().join("outside");
        fs::create_dir(&dest).unwrap();
        fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, dest.join("conf")).unwrap();
        std::os::unix::fs::symlink(outside.join("file"), dest.join("apply.sh")).unwrap();

        let mut sink = Unpacker {
            dest: dest.clone(),
            made: BTreeSet::new(),
        };
        let file = |p: &str| PayloadFile {
            path: PayloadPath::parse(p).unwrap(),
            size: 0,
            mode: 0o644,
            sha256: [0; 32],
        };
        assert!(matches!(
            sink.create(&file("conf/main.cf")),
            Err(ArchiveError::UnpackConflict { .. })
        ));
        assert!(matches!(
            sink.create(&file("apply.sh")),
            Err(ArchiveError::Unpack { .. })
        ));
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    }
}
