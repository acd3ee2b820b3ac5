//! Tests of the bundle file format. Shared helpers live here; hostile
//! archives are in `tests/hostile.rs`, source-tree refusals in
//! `tests/source.rs`.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tar::Header;

use super::*;
use crate::manifest::{PayloadFile, PayloadPath, SourceManifest};

mod hostile;
mod source;

pub(super) const SOURCE: &str = r#"# a maintenance bundle
[bundle]
name = "fix-mail-queue"
version = 7
description = "flush stuck queue"
expires = 2099-12-31T00:00:00Z

[targets]
hosts = ["mail-*"]

[scope]
write = ["/etc/postfix"]

[run]
command = ["./apply.sh", "--now"]
timeout = "5m"
"#;

pub(super) const APPLY: &[u8] = b"#!/bin/sh\necho ok\n";

pub(super) fn sha(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn write_file(path: &Path, data: &[u8], mode: u32) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(path, data).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Deterministic pseudo-random bytes (xorshift), so compression has work.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The payload files of [`source_tree`]: (path, bytes, mode).
fn expected_files() -> Vec<(&'static str, Vec<u8>, u32)> {
    vec![
        (".hidden", b"dotfiles are payload".to_vec(), 0o640),
        ("apply.sh", APPLY.to_vec(), 0o755),
        ("big.bin", noise(200_000, 7), 0o644),
        ("conf/main.cf", b"queue_run_delay = 300s\n".to_vec(), 0o644),
        ("conf/sub/deep.txt", b"deep\n".to_vec(), 0o600),
        ("empty.txt", Vec::new(), 0o444),
    ]
}

/// A source directory: bundle.toml, the expected files, and things the
/// builder must leave out (`.git`, an empty directory).
pub(super) fn source_tree() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_file(&dir.path().join("bundle.toml"), SOURCE.as_bytes(), 0o644);
    for (path, data, mode) in expected_files() {
        write_file(&dir.path().join(path), &data, mode);
    }
    write_file(
        &dir.path().join(".git/HEAD"),
        b"ref: refs/heads/main\n",
        0o644,
    );
    write_file(&dir.path().join("conf/.git"), b"gitdir: elsewhere\n", 0o644);
    fs::create_dir(dir.path().join("empty-dir")).unwrap();
    dir
}

pub(super) fn build_plain(dir: &Path) -> BuiltBundle {
    build(dir, &BuildOptions::default()).unwrap()
}

/// A scratch directory holding an empty `dest` and a `sentinel` file next
/// to it; after a rejected unpack nothing but these two may exist, and the
/// sentinel must be unchanged.
pub(super) struct Sandbox {
    pub root: tempfile::TempDir,
    pub dest: PathBuf,
}

const SENTINEL: &[u8] = b"untouched";

impl Sandbox {
    pub fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("dest");
        fs::create_dir(&dest).unwrap();
        fs::write(root.path().join("sentinel"), SENTINEL).unwrap();
        Sandbox { root, dest }
    }

    pub fn sentinel(&self) -> PathBuf {
        self.root.path().join("sentinel")
    }

    pub fn assert_untouched(&self) {
        assert_eq!(
            fs::read(self.sentinel()).unwrap(),
            SENTINEL,
            "sentinel next to dest was modified"
        );
        let names: BTreeSet<String> = fs::read_dir(self.root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            BTreeSet::from(["dest".to_string(), "sentinel".to_string()]),
            "something was created outside dest"
        );
    }
}

/// Open and unpack `bytes` into a fresh sandbox.
pub(super) fn unpack_in(
    bytes: &[u8],
    limits: &Limits,
    sandbox: &Sandbox,
) -> Result<PayloadSummary, ArchiveError> {
    open(bytes, limits)?.unpack_payload(&sandbox.dest)
}

/// Run `bytes` through unpack (in a sandbox) and through verify with the
/// default limits; both must fail with the same variant and nothing may
/// appear outside dest. Returns the unpack error.
pub(super) fn reject(bytes: &[u8]) -> ArchiveError {
    reject_with(bytes, &Limits::default())
}

pub(super) fn reject_with(bytes: &[u8], limits: &Limits) -> ArchiveError {
    let sandbox = Sandbox::new();
    let unpacked = unpack_in(bytes, limits, &sandbox);
    sandbox.assert_untouched();
    let err = unpacked.expect_err("hostile bundle was unpacked");
    let verified = open(bytes, limits).and_then(|b| b.verify_payload());
    let verify_err = verified.expect_err("hostile bundle was verified");
    assert_eq!(
        std::mem::discriminant(&err),
        std::mem::discriminant(&verify_err),
        "unpack and verify disagree: {err:?} vs {verify_err:?}"
    );
    err
}

// ---- crafting raw archives ---------------------------------------------------------

/// A ustar header with the given raw name bytes (≤ 100, written directly so
/// that `..` and absolute names are possible) and raw type flag.
pub(super) fn raw_header(name: &[u8], type_flag: u8, size: u64, mode: u32) -> Header {
    let mut h = Header::new_ustar();
    h.as_ustar_mut().unwrap().name[..name.len()].copy_from_slice(name);
    h.set_size(size);
    h.set_mode(mode);
    h.as_mut_bytes()[156] = type_flag;
    h.set_cksum();
    h
}

/// A tar stream built entry by entry, with no validation at all.
#[derive(Default, Clone)]
pub(super) struct Raw(pub Vec<u8>);

impl Raw {
    pub fn header(mut self, header: &Header, data: &[u8]) -> Self {
        self.0.extend_from_slice(header.as_bytes());
        self.0.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.0.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    pub fn file(self, name: &str, data: &[u8], mode: u32) -> Self {
        let h = raw_header(name.as_bytes(), b'0', data.len() as u64, mode);
        self.header(&h, data)
    }

    pub fn end(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&[0u8; 1024]);
        self.0
    }
}

/// A built manifest listing the given files.
pub(super) fn manifest_listing(files: &[(&str, &[u8], u32)]) -> String {
    let files: Vec<PayloadFile> = files
        .iter()
        .map(|(p, d, m)| PayloadFile {
            path: PayloadPath::parse(p).unwrap(),
            size: d.len() as u64,
            mode: *m,
            sha256: sha(d),
        })
        .collect();
    SourceManifest::render_built(SOURCE, &files)
}

/// A raw archive starting with a manifest that lists only `apply.sh`.
pub(super) fn with_manifest() -> Raw {
    Raw::default().file(
        "manifest.toml",
        manifest_listing(&[("apply.sh", APPLY, 0o755)]).as_bytes(),
        0o644,
    )
}

/// [`with_manifest`] plus the valid `apply.sh` entry.
pub(super) fn with_apply() -> Raw {
    with_manifest().file("payload/apply.sh", APPLY, 0o755)
}

pub(super) fn zstd(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 3).unwrap()
}

pub(super) fn sig(n: u8) -> StoredSignature {
    StoredSignature {
        armored: format!(
            "-----BEGIN SSH SIGNATURE-----\nU1NIU0lH{n}\n-----END SSH SIGNATURE-----\n"
        ),
        signer: None,
    }
}

// ---- round trips -------------------------------------------------------------------------

fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

fn assert_unpacked(dest: &Path) {
    for (path, data, mode) in expected_files() {
        let p = dest.join(path);
        assert_eq!(fs::read(&p).unwrap(), data, "{path}");
        assert_eq!(mode_of(&p), mode, "{path}");
    }
    for dir in ["conf", "conf/sub"] {
        assert!(fs::symlink_metadata(dest.join(dir)).unwrap().is_dir());
        assert_eq!(mode_of(&dest.join(dir)), 0o755, "{dir}");
    }
    // Nothing else: no .git, no bundle.toml, no empty directory.
    let mut found = BTreeSet::new();
    let mut stack = vec![dest.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                found.insert(p.strip_prefix(dest).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let want: BTreeSet<String> = expected_files()
        .into_iter()
        .map(|(p, _, _)| p.to_string())
        .collect();
    assert_eq!(found, want);
}

#[test]
fn round_trip_plain() {
    let src = source_tree();
    let built = build_plain(src.path());
    assert!(
        built.manifest_bytes.starts_with(SOURCE.as_bytes()),
        "source manifest kept verbatim"
    );

    let opened = open(&built.bytes[..], &Limits::default()).unwrap();
    assert!(!opened.is_compressed());
    assert_eq!(opened.manifest_bytes, built.manifest_bytes);
    assert_eq!(opened.manifest, built.manifest);
    assert!(opened.signatures.is_empty());
    let paths: Vec<&str> = opened
        .manifest
        .payload
        .iter()
        .map(|f| f.path.as_str())
        .collect();
    let want: Vec<&str> = expected_files().iter().map(|(p, _, _)| *p).collect();
    assert_eq!(paths, want, "payload sorted, .git and bundle.toml left out");

    let sandbox = Sandbox::new();
    let summary = opened.unpack_payload(&sandbox.dest).unwrap();
    let total: usize = expected_files().iter().map(|(_, d, _)| d.len()).sum();
    assert_eq!(
        summary,
        PayloadSummary {
            files: expected_files().len(),
            bytes: total as u64
        }
    );
    assert_unpacked(&sandbox.dest);
    sandbox.assert_untouched();
}

#[test]
fn round_trip_zstd() {
    let src = source_tree();
    let built = build(
        src.path(),
        &BuildOptions {
            zstd: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(built.bytes[..4], ZSTD_MAGIC);
    let plain = build_plain(src.path());
    assert_eq!(
        zstd::decode_all(&built.bytes[..]).unwrap(),
        plain.bytes,
        "same tar inside"
    );

    let opened = open(&built.bytes[..], &Limits::default()).unwrap();
    assert!(opened.is_compressed());
    let sandbox = Sandbox::new();
    opened.unpack_payload(&sandbox.dest).unwrap();
    assert_unpacked(&sandbox.dest);

    let summary = open(&built.bytes[..], &Limits::default())
        .unwrap()
        .verify_payload()
        .unwrap();
    assert_eq!(summary.files, expected_files().len());
}

#[test]
fn open_file_reads_from_disk() {
    let src = source_tree();
    let built = build(
        src.path(),
        &BuildOptions {
            zstd: true,
            ..Default::default()
        },
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("b.bundle");
    write_bundle_file(&path, &built.bytes).unwrap();
    assert_eq!(fs::read(&path).unwrap(), built.bytes);
    // No temporary file left behind.
    assert_eq!(fs::read_dir(out.path()).unwrap().count(), 1);
    let opened = open_file(&path, &Limits::default()).unwrap();
    assert_eq!(opened.manifest, built.manifest);
    let sandbox = Sandbox::new();
    opened.unpack_payload(&sandbox.dest).unwrap();
    assert_unpacked(&sandbox.dest);
}

#[test]
fn builds_are_deterministic() {
    let a = source_tree();
    let b = source_tree();
    // Different mtimes and directory names must not matter.
    let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
    fs::File::options()
        .write(true)
        .open(b.path().join("apply.sh"))
        .unwrap()
        .set_modified(old)
        .unwrap();
    for zstd in [false, true] {
        let opts = BuildOptions {
            zstd,
            ..Default::default()
        };
        let first = build(a.path(), &opts).unwrap();
        let second = build(a.path(), &opts).unwrap();
        let other = build(b.path(), &opts).unwrap();
        assert_eq!(first.bytes, second.bytes);
        assert_eq!(first.bytes, other.bytes);
    }
}

#[test]
fn written_headers_are_plain_ustar_with_fixed_metadata() {
    let src = source_tree();
    let built = build_plain(src.path());
    // Read back with the tar crate's own iterator as an independent reader.
    let mut archive = tar::Archive::new(&built.bytes[..]);
    let mut names = Vec::new();
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        let h = entry.header();
        assert!(h.as_ustar().is_some());
        assert_eq!(h.entry_type(), tar::EntryType::Regular);
        assert_eq!(h.mtime().unwrap(), 0);
        assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (0, 0));
        assert_eq!(h.username_bytes(), Some(&b""[..]));
        assert_eq!(h.groupname_bytes(), Some(&b""[..]));
        names.push(String::from_utf8(entry.path_bytes().into_owned()).unwrap());
    }
    let mut want = vec!["manifest.toml".to_string()];
    want.extend(
        expected_files()
            .iter()
            .map(|(p, _, _)| format!("payload/{p}")),
    );
    assert_eq!(names, want);
    // Ends with the two zero blocks.
    assert!(built.bytes.ends_with(&[0u8; 1024]));
    assert_eq!(built.bytes.len() % 512, 0);
}

#[test]
fn long_paths_use_the_ustar_prefix() {
    let src = source_tree();
    let deep = format!("{}/{}", "d".repeat(120), "f".repeat(90));
    write_file(&src.path().join(&deep), b"x", 0o644);
    let built = build_plain(src.path());
    let opened = open(&built.bytes[..], &Limits::default()).unwrap();
    assert!(opened.manifest.payload_file(&deep).is_some());
    let sandbox = Sandbox::new();
    opened.unpack_payload(&sandbox.dest).unwrap();
    assert_eq!(fs::read(sandbox.dest.join(&deep)).unwrap(), b"x");
}

// ---- signatures ----------------------------------------------------------------------------

#[test]
fn add_signature_appends_and_keeps_everything_else() {
    let src = source_tree();
    for zstd in [false, true] {
        let built = build(
            src.path(),
            &BuildOptions {
                zstd,
                ..Default::default()
            },
        )
        .unwrap();
        let limits = Limits::default();
        let one = add_signature(&built.bytes, sig(1), &limits).unwrap();
        let signed_by = StoredSignature {
            signer: Some("alice@example.com".into()),
            ..sig(2)
        };
        let two = add_signature(&one, signed_by.clone(), &limits).unwrap();
        assert_eq!(two[..4] == ZSTD_MAGIC, zstd, "compression kept");

        let opened = open(&two[..], &limits).unwrap();
        assert_eq!(
            opened.manifest_bytes, built.manifest_bytes,
            "signed bytes unchanged"
        );
        assert_eq!(opened.signatures, vec![sig(1), signed_by.clone()]);
        let sandbox = Sandbox::new();
        opened.unpack_payload(&sandbox.dest).unwrap();
        assert_unpacked(&sandbox.dest);

        // Deterministic too.
        assert_eq!(add_signature(&one, signed_by, &limits).unwrap(), two);
    }
}

#[test]
fn add_signature_refuses_duplicates_and_bad_signatures() {
    let src = source_tree();
    let built = build_plain(src.path());
    let limits = Limits::default();
    let one = add_signature(&built.bytes, sig(1), &limits).unwrap();
    let dup = StoredSignature {
        signer: Some("someone".into()),
        ..sig(1)
    };
    assert!(matches!(
        add_signature(&one, dup, &limits),
        Err(ArchiveError::DuplicateSignature { .. })
    ));

    let empty = StoredSignature {
        armored: " \n".into(),
        signer: None,
    };
    assert!(matches!(
        add_signature(&one, empty, &limits),
        Err(ArchiveError::BadSignature { .. })
    ));
    let huge = StoredSignature {
        armored: "A".repeat(limits.max_signature_bytes + 1),
        signer: None,
    };
    assert!(matches!(
        add_signature(&one, huge, &limits),
        Err(ArchiveError::SignatureTooLarge { .. })
    ));
    let two_lines = StoredSignature {
        signer: Some("alice\nroot".into()),
        ..sig(3)
    };
    assert!(matches!(
        add_signature(&one, two_lines, &limits),
        Err(ArchiveError::BadSigner { .. })
    ));

    let few = Limits {
        max_signatures: 2,
        ..limits
    };
    let two = add_signature(&one, sig(2), &few).unwrap();
    assert!(matches!(
        add_signature(&two, sig(3), &few),
        Err(ArchiveError::TooManySignatures { limit: 2 })
    ));
}

#[test]
fn add_signature_refuses_a_tampered_bundle() {
    let src = source_tree();
    let mut bytes = build_plain(src.path()).bytes;
    let at = find(&bytes, APPLY);
    bytes[at] ^= 1;
    assert!(matches!(
        add_signature(&bytes, sig(1), &Limits::default()),
        Err(ArchiveError::DigestMismatch { .. })
    ));
}

pub(super) fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("needle not found")
}
