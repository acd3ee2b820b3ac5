//! Writing bundles: [`build`] from a source directory, [`add_signature`] to
//! an existing bundle, and [`write_bundle_file`] to put the bytes on disk.
//!
//! Output is deterministic: plain ustar headers with mtime, uid and gid 0,
//! empty user and group names, the manifest's modes, payload in sorted path
//! order, and (when compressing) zstd level 3, single-threaded, with a
//! content checksum. Building the same source twice gives the same bytes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use super::entry::{
    check_signature, check_signer, payload_entry, signature_entry, signer_entry, BLOCK,
};
use super::read::{check_payload_limits, open, PayloadSink};
use super::{
    ArchiveError, Limits, StoredSignature, MANIFEST_ENTRY, MAX_SIGNATURE_INDEX, SOURCE_MANIFEST,
};
use crate::manifest::{
    Manifest, ManifestError, PayloadFile, PayloadPath, SourceManifest, MAX_MANIFEST_BYTES,
};

/// Mode of the manifest and signature entries (never written to disk by a
/// reader; fixed for determinism).
const META_MODE: u32 = 0o644;
const ZSTD_LEVEL: i32 = 3;
/// Skipped wherever it occurs in a source tree, whatever its type: version
/// control metadata is not payload.
const SKIPPED_NAME: &str = ".git";

/// How to build a bundle.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// zstd-compress the tar.
    pub zstd: bool,
    /// The same limits readers apply; a source beyond them is refused.
    pub limits: Limits,
    /// The table derived from the source's `[packages]` (by the caller,
    /// who reads the packages with their package manager's tools).
    pub packages: Option<crate::manifest::Derivation>,
}

/// A freshly built, unsigned bundle.
#[derive(Debug, Clone)]
pub struct BuiltBundle {
    /// The bundle file's bytes.
    pub bytes: Vec<u8>,
    /// The exact bytes of its `manifest.toml` (what signers sign).
    pub manifest_bytes: Vec<u8>,
    pub manifest: Manifest,
}

/// Build a bundle from `source_dir`: `bundle.toml` plus every regular file
/// beneath it (except `bundle.toml` itself and anything named `.git`).
///
/// Symbolic links (never followed), devices, FIFOs and sockets are refused,
/// as are setuid, setgid and sticky modes. Each file's bytes are read twice
/// (to hash, then to archive) and the second read must match the first.
pub fn build(source_dir: &Path, opts: &BuildOptions) -> Result<BuiltBundle, ArchiveError> {
    let limits = &opts.limits;
    let source_text = read_source_manifest(source_dir, limits)?;
    SourceManifest::parse(&source_text)?;

    let sources = collect_sources(source_dir, limits)?;
    let files = sources
        .iter()
        .map(hash_source)
        .collect::<Result<Vec<_>, _>>()?;
    check_payload_limits(&files, limits)?;

    let built = SourceManifest::render_built_with(&source_text, opts.packages.as_ref(), &files);
    let manifest_limit = limits.max_manifest_bytes.min(MAX_MANIFEST_BYTES);
    if built.len() > manifest_limit {
        return Err(ArchiveError::ManifestTooLarge {
            size: built.len() as u64,
            limit: manifest_limit,
        });
    }
    // Parse what we will sign, so a built bundle always opens.
    let manifest = Manifest::parse(built.as_bytes())?;

    let mut tar = TarWriter::new(Output::new(opts.zstd)?);
    tar.file(MANIFEST_ENTRY, META_MODE, built.as_bytes())?;
    for (source, file) in sources.iter().zip(&files) {
        copy_source(&mut tar, source, file)?;
    }
    let bytes = tar.finish()?.finish()?;
    Ok(BuiltBundle {
        bytes,
        manifest_bytes: built.into_bytes(),
        manifest,
    })
}

/// Return `bundle` with `signature` appended after its existing signatures,
/// compressed if it was. The whole bundle is checked as [`super::open`] and
/// [`super::OpenedBundle::verify_payload`] do, so a signature is only ever
/// added to a well-formed bundle. An exact duplicate of an existing
/// signature is refused.
pub fn add_signature(
    bundle: &[u8],
    signature: StoredSignature,
    limits: &Limits,
) -> Result<Vec<u8>, ArchiveError> {
    let opened = open(bundle, limits)?;
    let max = limits.max_signatures.min(MAX_SIGNATURE_INDEX + 1);
    let index = opened.signatures.len();
    if index >= max {
        return Err(ArchiveError::TooManySignatures { limit: max });
    }
    let sig_path = signature_entry(index);
    let armored = check_signature(
        &sig_path,
        signature.armored.as_bytes(),
        limits.max_signature_bytes,
    )?;
    let signer = match &signature.signer {
        Some(s) => Some(check_signer(&signer_entry(index), s.as_bytes())?),
        None => None,
    };
    if opened.signatures.iter().any(|s| s.armored == armored) {
        return Err(ArchiveError::DuplicateSignature { path: sig_path });
    }

    let mut tar = TarWriter::new(Output::new(opened.is_compressed())?);
    tar.file(MANIFEST_ENTRY, META_MODE, &opened.manifest_bytes)?;
    let new = StoredSignature { armored, signer };
    for (i, sig) in opened
        .signatures
        .iter()
        .chain(std::iter::once(&new))
        .enumerate()
    {
        tar.file(&signature_entry(i), META_MODE, sig.armored.as_bytes())?;
        if let Some(signer) = &sig.signer {
            tar.file(
                &signer_entry(i),
                META_MODE,
                format!("{signer}\n").as_bytes(),
            )?;
        }
    }
    opened.payload_pass(&mut CopySink { tar: &mut tar })?;
    tar.finish()?.finish()
}

/// Write bundle bytes to `path` atomically: a temporary file in the same
/// directory, fsync, rename over `path`, fsync the directory.
pub fn write_bundle_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "bundle path has no file name")
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

// ---- the source tree --------------------------------------------------------

/// A payload file found in the source tree.
#[derive(Debug)]
struct SourceFile {
    path: PayloadPath,
    fs_path: PathBuf,
    size: u64,
    mode: u32,
}

fn source_err(path: &Path) -> impl FnOnce(io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Source {
        path: path.to_path_buf(),
        source,
    }
}

fn read_source_manifest(source_dir: &Path, limits: &Limits) -> Result<String, ArchiveError> {
    let path = source_dir.join(SOURCE_MANIFEST);
    let meta = fs::symlink_metadata(&path).map_err(source_err(&path))?;
    if meta.file_type().is_symlink() {
        return Err(ArchiveError::SourceSymlink { path });
    }
    if !meta.is_file() {
        return Err(ArchiveError::SourceSpecialFile {
            path,
            kind: file_kind(&meta.file_type()),
        });
    }
    let limit = limits.max_manifest_bytes.min(MAX_MANIFEST_BYTES);
    let mut bytes = Vec::new();
    open_source(&path)?
        .take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(source_err(&path))?;
    if bytes.len() > limit {
        return Err(ArchiveError::ManifestTooLarge {
            size: meta.len(),
            limit,
        });
    }
    String::from_utf8(bytes).map_err(|_| ArchiveError::Manifest(ManifestError::NotUtf8))
}

fn file_kind(ft: &fs::FileType) -> &'static str {
    if ft.is_symlink() {
        "symbolic link"
    } else if ft.is_dir() {
        "directory"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else {
        "special file"
    }
}

/// Every payload file beneath `root`, sorted by payload path.
fn collect_sources(root: &Path, limits: &Limits) -> Result<Vec<SourceFile>, ArchiveError> {
    let mut out = Vec::new();
    let mut total: u64 = 0;
    // (directory on disk, its payload path prefix: "" or "a/b/")
    let mut pending = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = pending.pop() {
        for entry in fs::read_dir(&dir).map_err(source_err(&dir))? {
            let entry = entry.map_err(source_err(&dir))?;
            let fs_path = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                return Err(ArchiveError::SourceNameNotUtf8 { path: fs_path });
            };
            if name == SKIPPED_NAME || (prefix.is_empty() && name == SOURCE_MANIFEST) {
                continue;
            }
            let rel = format!("{prefix}{name}");
            // lstat: a symlink is reported as itself, never followed.
            let meta = fs::symlink_metadata(&fs_path).map_err(source_err(&fs_path))?;
            let ft = meta.file_type();
            if ft.is_symlink() {
                return Err(ArchiveError::SourceSymlink { path: fs_path });
            }
            if ft.is_dir() {
                pending.push((fs_path, format!("{rel}/")));
                continue;
            }
            if !ft.is_file() {
                return Err(ArchiveError::SourceSpecialFile {
                    path: fs_path,
                    kind: file_kind(&ft),
                });
            }
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o7000 != 0 {
                return Err(ArchiveError::SourceSpecialMode {
                    path: fs_path,
                    mode,
                });
            }
            let path = PayloadPath::parse(&rel).map_err(|source| ArchiveError::SourceBadPath {
                path: fs_path.clone(),
                source,
            })?;
            ustar_header(&payload_entry(&path), 0, 0)?;

            out.push(SourceFile {
                path,
                fs_path,
                size: meta.len(),
                mode,
            });
            total = total.saturating_add(meta.len());
            if out.len() > limits.max_files {
                return Err(ArchiveError::TooManyFiles {
                    count: out.len(),
                    limit: limits.max_files,
                });
            }
            if total > limits.max_payload_bytes {
                return Err(ArchiveError::PayloadTooLarge {
                    size: total,
                    limit: limits.max_payload_bytes,
                });
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Open a source file without following a symlink and without blocking on
/// a FIFO swapped in since we looked, and check it is still a regular file
/// of the size we recorded.
fn open_source(path: &Path) -> Result<File, ArchiveError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => ArchiveError::SourceSymlink {
                path: path.to_path_buf(),
            },
            _ => ArchiveError::Source {
                path: path.to_path_buf(),
                source: e,
            },
        })?;
    let meta = file.metadata().map_err(source_err(path))?;
    if !meta.is_file() {
        return Err(ArchiveError::SourceChanged {
            path: path.to_path_buf(),
        });
    }
    Ok(file)
}

/// Stream exactly `size` bytes of `source` to `sink`, failing if the file
/// is shorter or longer now; returns the SHA-256.
fn read_exact_hashed(
    source: &SourceFile,
    mut sink: impl FnMut(&[u8]) -> Result<(), ArchiveError>,
) -> Result<[u8; 32], ArchiveError> {
    let mut file = open_source(&source.fs_path)?;
    if file.metadata().map_err(source_err(&source.fs_path))?.size() != source.size {
        return Err(ArchiveError::SourceChanged {
            path: source.fs_path.clone(),
        });
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut seen: u64 = 0;
    loop {
        let n = match file.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(ArchiveError::Source {
                    path: source.fs_path.clone(),
                    source: e,
                })
            }
        };
        if n == 0 {
            break;
        }
        seen += n as u64;
        if seen > source.size {
            return Err(ArchiveError::SourceChanged {
                path: source.fs_path.clone(),
            });
        }
        hasher.update(&buf[..n]);
        sink(&buf[..n])?;
    }
    if seen != source.size {
        return Err(ArchiveError::SourceChanged {
            path: source.fs_path.clone(),
        });
    }
    Ok(hasher.finalize().into())
}

fn hash_source(source: &SourceFile) -> Result<PayloadFile, ArchiveError> {
    let sha256 = read_exact_hashed(source, |_| Ok(()))?;
    Ok(PayloadFile {
        path: source.path.clone(),
        size: source.size,
        mode: source.mode,
        sha256,
    })
}

fn copy_source<W: Write>(
    tar: &mut TarWriter<W>,
    source: &SourceFile,
    file: &PayloadFile,
) -> Result<(), ArchiveError> {
    tar.begin(&payload_entry(&file.path), file.size, file.mode)?;
    let digest = read_exact_hashed(source, |chunk| tar.data(chunk))?;
    if digest != file.sha256 {
        return Err(ArchiveError::SourceChanged {
            path: source.fs_path.clone(),
        });
    }
    tar.end()
}

// ---- tar framing --------------------------------------------------------------

/// The only kind of header we write: ustar, regular file, fixed metadata.
fn ustar_header(path: &str, size: u64, mode: u32) -> Result<Header, ArchiveError> {
    let mut header = Header::new_ustar();
    // `set_path` splits into the ustar prefix and name fields, and fails
    // when the path does not fit; we never fall back to GNU long names.
    header
        .set_path(path)
        .map_err(|_| ArchiveError::PathTooLongForTar {
            path: path.to_string(),
        })?;
    header.set_entry_type(EntryType::Regular);
    header.set_size(size);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_cksum();
    Ok(header)
}

/// Minimal streaming tar writer (header, data, zero padding, end marker).
/// Written by hand because `tar::Builder` takes each entry's data as one
/// reader and would emit GNU long-name records for long paths; we want to
/// stream through a hasher and refuse such paths instead.
pub(super) struct TarWriter<W> {
    out: W,
    /// Size and remaining bytes of the open entry.
    size: u64,
    left: u64,
}

fn write_err(e: io::Error) -> ArchiveError {
    ArchiveError::Write(e)
}

impl<W: Write> TarWriter<W> {
    pub fn new(out: W) -> Self {
        TarWriter {
            out,
            size: 0,
            left: 0,
        }
    }

    pub fn begin(&mut self, path: &str, size: u64, mode: u32) -> Result<(), ArchiveError> {
        let header = ustar_header(path, size, mode)?;
        self.out.write_all(header.as_bytes()).map_err(write_err)?;
        self.size = size;
        self.left = size;
        Ok(())
    }

    pub fn data(&mut self, chunk: &[u8]) -> Result<(), ArchiveError> {
        if chunk.len() as u64 > self.left {
            return Err(write_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "entry data longer than its header says",
            )));
        }
        self.left -= chunk.len() as u64;
        self.out.write_all(chunk).map_err(write_err)
    }

    pub fn end(&mut self) -> Result<(), ArchiveError> {
        if self.left != 0 {
            return Err(write_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "entry data shorter than its header says",
            )));
        }
        let padding = (BLOCK - (self.size % BLOCK as u64) as usize) % BLOCK;
        self.out
            .write_all(&[0u8; BLOCK][..padding])
            .map_err(write_err)
    }

    pub fn file(&mut self, path: &str, mode: u32, bytes: &[u8]) -> Result<(), ArchiveError> {
        self.begin(path, bytes.len() as u64, mode)?;
        self.data(bytes)?;
        self.end()
    }

    /// Two zero blocks, as POSIX specifies.
    pub fn finish(mut self) -> Result<W, ArchiveError> {
        self.out.write_all(&[0u8; 2 * BLOCK]).map_err(write_err)?;
        Ok(self.out)
    }
}

/// Copies verified payload entries into another tar (for [`add_signature`]).
struct CopySink<'t, W> {
    tar: &'t mut TarWriter<W>,
}

impl<W: Write> PayloadSink for CopySink<'_, W> {
    type File = ();
    fn create(&mut self, file: &PayloadFile) -> Result<(), ArchiveError> {
        self.tar
            .begin(&payload_entry(&file.path), file.size, file.mode)
    }
    fn write(&mut self, _: &mut (), _: &PayloadFile, chunk: &[u8]) -> Result<(), ArchiveError> {
        self.tar.data(chunk)
    }
    fn finish(&mut self, _: (), _: &PayloadFile) -> Result<(), ArchiveError> {
        self.tar.end()
    }
}

/// The bundle bytes, compressed or not.
enum Output {
    Plain(Vec<u8>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
}

impl Output {
    fn new(compress: bool) -> Result<Self, ArchiveError> {
        if !compress {
            return Ok(Output::Plain(Vec::new()));
        }
        let mut encoder =
            zstd::stream::write::Encoder::new(Vec::new(), ZSTD_LEVEL).map_err(write_err)?;
        encoder.include_checksum(true).map_err(write_err)?;
        Ok(Output::Zstd(encoder))
    }

    fn finish(self) -> Result<Vec<u8>, ArchiveError> {
        match self {
            Output::Plain(v) => Ok(v),
            Output::Zstd(encoder) => encoder.finish().map_err(write_err),
        }
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Output::Plain(v) => v.write(buf),
            Output::Zstd(e) => e.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Output::Plain(v) => v.flush(),
            Output::Zstd(e) => e.flush(),
        }
    }
}
