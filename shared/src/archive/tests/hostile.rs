//! Crafted hostile bundles: each must be refused with its own error, by
//! both unpack and verify, and nothing may appear outside `dest`
//! ([`reject`] checks a sentinel file next to `dest` and that nothing else
//! was created there).

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;

use proptest::prelude::*;

use super::*;

// ---- names -----------------------------------------------------------------------------

#[test]
fn absolute_path() {
    let sandbox = Sandbox::new();
    let target = sandbox.root.path().join("abs-evil");
    let name = target.to_str().unwrap();
    assert!(name.len() < 100);
    // Right after the manifest (refused by `open`) and after a valid file
    // (refused by the payload pass).
    for raw in [with_manifest(), with_apply()] {
        let bytes = raw.file(name, b"pwned", 0o644).end();
        assert!(matches!(reject(&bytes), ArchiveError::AbsolutePath { .. }));
    }
    // "payload//tmp/..." has an empty component: not a payload path.
    let payload_abs = with_apply()
        .file(&format!("payload/{name}"), b"pwned", 0o644)
        .end();
    assert!(matches!(
        reject(&payload_abs),
        ArchiveError::BadPayloadPath { .. }
    ));
    assert!(!target.exists());
}

#[test]
fn parent_components() {
    for name in [
        "payload/../evil",
        "../evil",
        "payload/conf/../../evil",
        "payload/../../sentinel",
    ] {
        for raw in [with_manifest(), with_apply()] {
            let bytes = raw.file(name, b"pwned", 0o644).end();
            let err = reject(&bytes);
            assert!(
                matches!(err, ArchiveError::DotComponent { .. }),
                "{name}: {err:?}"
            );
        }
    }
}

#[test]
fn dot_components() {
    for name in [
        "payload/./apply.sh",
        "./payload/apply.sh",
        "./manifest.toml",
    ] {
        let bytes = with_manifest().file(name, APPLY, 0o755).end();
        let err = reject(&bytes);
        assert!(
            matches!(err, ArchiveError::DotComponent { .. }),
            "{name}: {err:?}"
        );
    }
}

#[test]
fn entries_outside_the_three_namespaces() {
    for name in [
        "etc/passwd",
        "payload",
        "signatures/1.sig",
        "signatures/000.txt",
        "manifest.toml.bak",
        "Payload/x",
    ] {
        let bytes = with_apply().file(name, b"x", 0o644).end();
        let err = reject(&bytes);
        assert!(
            matches!(err, ArchiveError::UnexpectedEntry { .. }),
            "{name}: {err:?}"
        );
    }
}

#[test]
fn invalid_payload_paths() {
    for name in [
        "payload/a\\b",
        "payload/a//b",
        "payload/x/",
        "payload/tab\there",
    ] {
        let bytes = with_apply().file(name, b"x", 0o644).end();
        let err = reject(&bytes);
        assert!(
            matches!(err, ArchiveError::BadPayloadPath { .. }),
            "{name:?}: {err:?}"
        );
    }
    let bytes = with_apply()
        .header(&raw_header(b"payload/\xff", b'0', 1, 0o644), b"x")
        .end();
    assert!(matches!(reject(&bytes), ArchiveError::NonUtf8Path { .. }));
}

// ---- entry types ----------------------------------------------------------------------

/// A link entry named `payload/apply.sh` pointing at the sentinel, followed
/// by a regular entry of the same name: the classic write-through-a-link
/// attack.
fn link_then_write(type_flag: u8, target: &str) -> Vec<u8> {
    let mut link = raw_header(b"payload/apply.sh", type_flag, 0, 0o777);
    link.set_link_name(target).unwrap();
    link.set_cksum();
    with_manifest()
        .header(&link, b"")
        .file("payload/apply.sh", APPLY, 0o755)
        .end()
}

#[test]
fn symlinks() {
    for target in ["../../sentinel", "/etc/passwd"] {
        let err = reject(&link_then_write(b'2', target));
        assert!(
            matches!(&err, ArchiveError::Symlink { target: t, .. } if t == target),
            "{err:?}"
        );
    }
    // Also after a valid file, to hit the payload pass.
    let mut link = raw_header(b"payload/conf", b'2', 0, 0o777);
    link.set_link_name("..").unwrap();
    link.set_cksum();
    assert!(matches!(
        reject(&with_apply().header(&link, b"").end()),
        ArchiveError::Symlink { .. }
    ));
}

#[test]
fn hardlinks() {
    for target in [
        "../sentinel",
        "/etc/shadow",
        "payload/apply.sh",
        "manifest.toml",
    ] {
        let err = reject(&link_then_write(b'1', target));
        assert!(matches!(err, ArchiveError::Hardlink { .. }), "{err:?}");
    }
}

fn special(type_flag: u8) -> Vec<u8> {
    with_apply()
        .header(&raw_header(b"payload/dev", type_flag, 0, 0o666), b"")
        .end()
}

#[test]
fn devices_fifos_directories() {
    assert!(matches!(
        reject(&special(b'3')),
        ArchiveError::CharDevice { .. }
    ));
    assert!(matches!(
        reject(&special(b'4')),
        ArchiveError::BlockDevice { .. }
    ));
    assert!(matches!(reject(&special(b'6')), ArchiveError::Fifo { .. }));
    let dir = with_manifest()
        .header(&raw_header(b"payload/conf/", b'5', 0, 0o755), b"")
        .end();
    assert!(matches!(reject(&dir), ArchiveError::Directory { .. }));
}

#[test]
fn gnu_sparse_files() {
    let mut h = tar::Header::new_gnu();
    h.set_path("payload/apply.sh").unwrap();
    h.set_size(APPLY.len() as u64);
    h.set_mode(0o755);
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_cksum();
    let bytes = with_manifest().header(&h, APPLY).end();
    assert!(matches!(reject(&bytes), ArchiveError::SparseFile { .. }));
}

#[test]
fn other_entry_types_including_extension_records() {
    // pax local/global headers, GNU long name/link, contiguous file, the
    // pre-POSIX '\0' regular-file flag, and nonsense.
    for flag in [b'x', b'g', b'L', b'K', b'7', b'\0', b'V', b'Z'] {
        let ext = raw_header(b"././@LongLink", flag, 5, 0o644);
        let bytes = with_manifest()
            .header(&ext, b"pwned")
            .file("payload/apply.sh", APPLY, 0o755)
            .end();
        let err = reject(&bytes);
        assert!(
            matches!(err, ArchiveError::UnsupportedEntryType { type_flag, .. } if type_flag == char::from(flag)),
            "{flag}: {err:?}"
        );
    }
}

#[test]
fn gnu_and_old_headers_are_not_ustar() {
    let mut gnu = tar::Header::new_gnu();
    gnu.set_path("payload/apply.sh").unwrap();
    gnu.set_size(APPLY.len() as u64);
    gnu.set_mode(0o755);
    gnu.set_entry_type(tar::EntryType::Regular);
    gnu.set_cksum();
    assert!(matches!(
        reject(&with_manifest().header(&gnu, APPLY).end()),
        ArchiveError::NotUstar { .. }
    ));

    let mut old = tar::Header::new_old();
    old.set_path("payload/apply.sh").unwrap();
    old.set_size(APPLY.len() as u64);
    old.set_mode(0o755);
    old.set_entry_type(tar::EntryType::Regular);
    old.set_cksum();
    assert!(matches!(
        reject(&with_manifest().header(&old, APPLY).end()),
        ArchiveError::NotUstar { .. }
    ));
}

#[test]
fn bad_checksum() {
    let mut bytes = with_apply().end();
    let at = find(&bytes, b"payload/apply.sh");
    bytes[at] = b'P'; // header changed, checksum not
    assert!(matches!(reject(&bytes), ArchiveError::BadChecksum { .. }));
}

#[test]
fn malformed_size_field() {
    let mut h = raw_header(b"payload/apply.sh", b'0', 0, 0o755);
    h.as_ustar_mut().unwrap().size = *b"99999999999z";
    h.set_cksum();
    assert!(matches!(
        reject(&with_manifest().header(&h, b"").end()),
        ArchiveError::BadHeader { .. }
    ));
}

// ---- duplicates and order ------------------------------------------------------------

#[test]
fn duplicate_payload_entry() {
    let bytes = with_apply().file("payload/apply.sh", APPLY, 0o755).end();
    assert!(matches!(
        reject(&bytes),
        ArchiveError::DuplicateEntry { .. }
    ));
}

#[test]
fn duplicate_manifest() {
    let m = manifest_listing(&[("apply.sh", APPLY, 0o755)]);
    let before_payload = with_manifest()
        .file("manifest.toml", m.as_bytes(), 0o644)
        .end();
    assert!(matches!(
        reject(&before_payload),
        ArchiveError::DuplicateEntry { .. }
    ));
    let after_payload = with_apply()
        .file("manifest.toml", m.as_bytes(), 0o644)
        .end();
    assert!(matches!(
        reject(&after_payload),
        ArchiveError::DuplicateEntry { .. }
    ));
}

#[test]
fn manifest_not_first() {
    let m = manifest_listing(&[("apply.sh", APPLY, 0o755)]);
    let bytes = Raw::default()
        .file("payload/apply.sh", APPLY, 0o755)
        .file("manifest.toml", m.as_bytes(), 0o644)
        .end();
    assert!(
        matches!(reject(&bytes), ArchiveError::ManifestNotFirst { found } if found == "payload/apply.sh")
    );
    let sig_first = Raw::default()
        .file("signatures/000.sig", sig(0).armored.as_bytes(), 0o644)
        .end();
    assert!(matches!(
        reject(&sig_first),
        ArchiveError::ManifestNotFirst { .. }
    ));
}

#[test]
fn empty_archive() {
    assert!(matches!(
        reject(&Raw::default().end()),
        ArchiveError::MissingManifest
    ));
    assert!(matches!(reject(&[]), ArchiveError::Truncated(_)));
}

#[test]
fn signature_after_payload() {
    let bytes = with_apply()
        .file("signatures/000.sig", sig(0).armored.as_bytes(), 0o644)
        .end();
    assert!(matches!(
        reject(&bytes),
        ArchiveError::SignatureAfterPayload { .. }
    ));
}

#[test]
fn signatures_out_of_order() {
    let s = |n: u8| sig(n).armored;
    let skipped = with_manifest()
        .file("signatures/001.sig", s(1).as_bytes(), 0o644)
        .end();
    assert!(matches!(
        reject(&skipped),
        ArchiveError::SignatureOutOfOrder { .. }
    ));
    let signer_first = with_manifest()
        .file("signatures/000.signer", b"alice\n", 0o644)
        .end();
    assert!(matches!(
        reject(&signer_first),
        ArchiveError::SignatureOutOfOrder { .. }
    ));
    let late_signer = with_manifest()
        .file("signatures/000.sig", s(0).as_bytes(), 0o644)
        .file("signatures/001.sig", s(1).as_bytes(), 0o644)
        .file("signatures/000.signer", b"alice\n", 0o644)
        .end();
    assert!(matches!(
        reject(&late_signer),
        ArchiveError::SignatureOutOfOrder { .. }
    ));
    let two_signers = with_manifest()
        .file("signatures/000.sig", s(0).as_bytes(), 0o644)
        .file("signatures/000.signer", b"alice\n", 0o644)
        .file("signatures/000.signer", b"bob\n", 0o644)
        .end();
    assert!(matches!(
        reject(&two_signers),
        ArchiveError::SignatureOutOfOrder { .. }
    ));
}

#[test]
fn signature_entries_are_checked() {
    let s = sig(0).armored;
    let dup = with_manifest()
        .file("signatures/000.sig", s.as_bytes(), 0o644)
        .file("signatures/001.sig", s.as_bytes(), 0o644)
        .end();
    assert!(matches!(
        reject(&dup),
        ArchiveError::DuplicateSignature { .. }
    ));
    let bad_signer = with_manifest()
        .file("signatures/000.sig", s.as_bytes(), 0o644)
        .file("signatures/000.signer", b"alice\nroot\n", 0o644)
        .end();
    assert!(matches!(
        reject(&bad_signer),
        ArchiveError::BadSigner { .. }
    ));
    let not_utf8 = with_manifest()
        .file("signatures/000.sig", b"\xff\xfe", 0o644)
        .end();
    assert!(matches!(
        reject(&not_utf8),
        ArchiveError::BadSignature { .. }
    ));

    let limits = Limits {
        max_signatures: 1,
        max_signature_bytes: 100,
        ..Limits::default()
    };
    let too_many = with_manifest()
        .file("signatures/000.sig", sig(0).armored.as_bytes(), 0o644)
        .file("signatures/001.sig", sig(1).armored.as_bytes(), 0o644)
        .end();
    assert!(matches!(
        reject_with(&too_many, &limits),
        ArchiveError::TooManySignatures { limit: 1 }
    ));
    let too_big = with_manifest()
        .file("signatures/000.sig", &[b'A'; 101], 0o644)
        .end();
    assert!(matches!(
        reject_with(&too_big, &limits),
        ArchiveError::SignatureTooLarge { .. }
    ));
}

#[test]
fn signatures_and_signers_are_read() {
    let bytes = with_manifest()
        .file("signatures/000.sig", sig(0).armored.as_bytes(), 0o644)
        .file("signatures/000.signer", b"alice@example.com\n", 0o644)
        .file("signatures/001.sig", sig(1).armored.as_bytes(), 0o644)
        .file("payload/apply.sh", APPLY, 0o755)
        .end();
    let opened = open(&bytes[..], &Limits::default()).unwrap();
    assert_eq!(
        opened.signatures,
        vec![
            StoredSignature {
                signer: Some("alice@example.com".into()),
                ..sig(0)
            },
            sig(1)
        ]
    );
    assert_eq!(opened.verify_payload().unwrap().files, 1);
}

// ---- payload against the manifest -------------------------------------------------------

#[test]
fn unlisted_payload_file() {
    let bytes = with_apply()
        .file("payload/extra.sh", b"rm -rf /\n", 0o755)
        .end();
    assert!(
        matches!(reject(&bytes), ArchiveError::UnlistedFile { path } if path == "payload/extra.sh")
    );
}

#[test]
fn listed_file_missing() {
    let conf: &[u8] = b"conf";
    let m = manifest_listing(&[("apply.sh", APPLY, 0o755), ("conf/main.cf", conf, 0o644)]);
    let bytes = Raw::default()
        .file("manifest.toml", m.as_bytes(), 0o644)
        .file("payload/apply.sh", APPLY, 0o755)
        .end();
    assert!(
        matches!(reject(&bytes), ArchiveError::MissingFile { path, missing: 1 } if path == "conf/main.cf")
    );
}

#[test]
fn size_mismatch() {
    let bytes = with_manifest()
        .file("payload/apply.sh", &APPLY[..5], 0o755)
        .end();
    assert!(matches!(
        reject(&bytes),
        ArchiveError::SizeMismatch {
            expected: 18,
            actual: 5,
            ..
        }
    ));
    // A header claiming far more than the manifest is refused before reading.
    let h = raw_header(b"payload/apply.sh", b'0', 0o77777777777, 0o755);
    let huge = with_manifest().header(&h, b"").end();
    assert!(matches!(reject(&huge), ArchiveError::SizeMismatch { .. }));
}

#[test]
fn mode_mismatch() {
    for mode in [0o777, 0o4755, 0o644] {
        let bytes = with_manifest().file("payload/apply.sh", APPLY, mode).end();
        let err = reject(&bytes);
        assert!(
            matches!(err, ArchiveError::ModeMismatch { expected: 0o755, actual, .. } if actual == mode),
            "{err:?}"
        );
    }
}

#[test]
fn tampered_payload_byte() {
    let src = source_tree();
    let mut bytes = build_plain(src.path()).bytes;
    let at = find(&bytes, APPLY) + 3;
    bytes[at] ^= 0x20;
    let sandbox = Sandbox::new();
    let err = unpack_in(&bytes, &Limits::default(), &sandbox).unwrap_err();
    assert!(
        matches!(&err, ArchiveError::DigestMismatch { path, .. } if path == "payload/apply.sh"),
        "{err:?}"
    );
    sandbox.assert_untouched();
    // The bad file is left for the caller to delete, and never got its
    // executable mode.
    let left = sandbox.dest.join("apply.sh");
    assert_eq!(
        fs::metadata(&left).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(matches!(
        reject(&bytes),
        ArchiveError::DigestMismatch { .. }
    ));
}

#[test]
fn tampered_manifest_is_still_parsed_strictly() {
    let src = source_tree();
    let built = build_plain(src.path());
    let mut bytes = built.bytes.clone();
    // Flip a digest character: same size, so the tar stays well formed.
    let digest = hex::encode(sha(APPLY));
    let at = find(&bytes, digest.as_bytes());
    bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
    assert!(matches!(
        reject(&bytes),
        ArchiveError::DigestMismatch { .. }
    ));
}

// ---- limits ------------------------------------------------------------------------------

#[test]
fn payload_above_limit() {
    let src = source_tree();
    let built = build_plain(src.path());
    let total = built.manifest.payload.iter().map(|f| f.size).sum::<u64>();
    let limits = Limits {
        max_payload_bytes: total - 1,
        ..Limits::default()
    };
    assert!(matches!(
        reject_with(&built.bytes, &limits),
        ArchiveError::PayloadTooLarge { .. }
    ));
    let exact = Limits {
        max_payload_bytes: total,
        ..Limits::default()
    };
    open(&built.bytes[..], &exact)
        .unwrap()
        .verify_payload()
        .unwrap();

    // Sizes that overflow u64 when summed are refused, not wrapped (TOML
    // integers stop at i64::MAX, so it takes three).
    let big = |name: &str| PayloadFile {
        path: PayloadPath::parse(name).unwrap(),
        size: i64::MAX as u64,
        mode: 0o755,
        sha256: [0; 32],
    };
    let m = SourceManifest::render_built(SOURCE, &[big("apply.sh"), big("b"), big("c")]);
    let bytes = Raw::default()
        .file("manifest.toml", m.as_bytes(), 0o644)
        .end();
    assert!(matches!(
        reject(&bytes),
        ArchiveError::PayloadTooLarge { size: u64::MAX, .. }
    ));
}

#[test]
fn too_many_files() {
    let src = source_tree();
    let built = build_plain(src.path());
    let limits = Limits {
        max_files: expected_files().len() - 1,
        ..Limits::default()
    };
    assert!(matches!(
        reject_with(&built.bytes, &limits),
        ArchiveError::TooManyFiles { .. }
    ));
}

#[test]
fn manifest_above_limit() {
    let src = source_tree();
    let built = build_plain(src.path());
    let limits = Limits {
        max_manifest_bytes: built.manifest_bytes.len() - 1,
        ..Limits::default()
    };
    assert!(matches!(
        reject_with(&built.bytes, &limits),
        ArchiveError::ManifestTooLarge { .. }
    ));
    // A header claiming a huge manifest is refused before anything is read
    // or allocated.
    let h = raw_header(b"manifest.toml", b'0', 0o77777777777, 0o644);
    assert!(matches!(
        reject(&Raw::default().header(&h, b"").end()),
        ArchiveError::ManifestTooLarge { .. }
    ));
}

#[test]
fn invalid_manifest() {
    let bytes = Raw::default()
        .file("manifest.toml", SOURCE.as_bytes(), 0o644)
        .end();
    assert!(matches!(
        reject(&bytes),
        ArchiveError::Manifest(crate::manifest::ManifestError::MissingPayload)
    ));
}

// ---- the end of the archive --------------------------------------------------------------

#[test]
fn trailing_zero_padding_is_accepted() {
    let mut bytes = with_apply().end();
    bytes.extend_from_slice(&[0u8; 9 * 1024]); // GNU tar pads to 10 KiB records
    let sandbox = Sandbox::new();
    unpack_in(&bytes, &Limits::default(), &sandbox).unwrap();
    assert_eq!(fs::read(sandbox.dest.join("apply.sh")).unwrap(), APPLY);
}

#[test]
fn trailing_garbage() {
    let mut garbage = with_apply().end();
    garbage.extend_from_slice(b"#!/bin/sh\nrm -rf /\n");
    assert!(matches!(reject(&garbage), ArchiveError::TrailingData));

    // A whole hidden entry after the end-of-archive marker.
    let mut hidden = with_apply().end();
    hidden.extend(Raw::default().file("payload/extra.sh", b"x", 0o755).end());
    assert!(matches!(reject(&hidden), ArchiveError::TrailingData));

    let mut too_many_zeros = with_apply().end();
    too_many_zeros.extend(std::iter::repeat_n(0u8, MAX_TRAILING_ZEROS as usize + 1));
    assert!(matches!(
        reject(&too_many_zeros),
        ArchiveError::TrailingData
    ));
}

#[test]
fn truncated_archives() {
    let full = with_apply().end();
    let no_marker = &full[..full.len() - 1024];
    assert!(matches!(reject(no_marker), ArchiveError::Truncated(_)));
    let mid_data = &full[..full.len() - 1024 - 512 + 4];
    assert!(matches!(reject(mid_data), ArchiveError::Truncated(_)));
    let mid_header = &full[..full.len() - 1024 - 512 - 100];
    assert!(matches!(reject(mid_header), ArchiveError::Truncated(_)));
}

#[test]
fn compressed_garbage_after_the_frame() {
    let mut bytes = zstd(&with_apply().end());
    bytes.extend_from_slice(b"not a zstd frame");
    assert!(matches!(reject(&bytes), ArchiveError::Read(_)));
}

#[test]
fn corrupt_compressed_stream() {
    let mut bytes = zstd(&with_apply().end());
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    // Which error depends on where the corruption lands; `reject` checks
    // that it is an error for both passes and that nothing escaped.
    reject(&bytes);
}

// ---- decompression bombs -------------------------------------------------------------------

const BOMB_BYTES: u64 = 64 * 1024 * 1024;

fn small_limits() -> Limits {
    Limits {
        max_payload_bytes: 1024 * 1024,
        max_files: 4,
        max_signatures: 2,
        max_manifest_bytes: 64 * 1024,
        max_signature_bytes: 4096,
    }
}

/// zstd of `prefix` followed by `BOMB_BYTES` zero bytes, compressed as a stream.
fn bomb(prefix: &[u8]) -> Vec<u8> {
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    std::io::Write::write_all(&mut encoder, prefix).unwrap();
    std::io::copy(&mut std::io::repeat(0).take(BOMB_BYTES), &mut encoder).unwrap();
    encoder.finish().unwrap()
}

#[test]
fn zstd_bomb_is_cut_off_at_the_stream_bound() {
    let limits = small_limits();
    let bytes = bomb(b"");
    assert!(
        bytes.len() < 64 * 1024,
        "a real bomb: {} bytes",
        bytes.len()
    );
    let bound = limits.max_stream_bytes();
    assert!(bound < BOMB_BYTES / 16);
    let (yielded, result) = super::super::stream::drain_for_test(&bytes, &limits);
    assert!(
        matches!(result, Err(ArchiveError::StreamTooLarge { limit }) if limit == bound),
        "{result:?}"
    );
    assert_eq!(yielded, bound, "reading stopped exactly at the bound");
}

#[test]
fn zstd_bomb_after_a_valid_bundle() {
    // The bundle itself is fine; gigabytes of zeros follow its end marker.
    let bytes = bomb(&with_apply().end());
    assert!(matches!(
        reject_with(&bytes, &small_limits()),
        ArchiveError::TrailingData
    ));
    assert!(matches!(reject(&bytes), ArchiveError::TrailingData));
}

#[test]
fn zstd_bomb_in_a_payload_file() {
    // The manifest lists a 64 MiB file: above the limit, so it is refused
    // from the manifest before any payload byte is decompressed (which is
    // also why its digest does not matter here).
    let zeros = PayloadFile {
        path: PayloadPath::parse("zeros").unwrap(),
        size: BOMB_BYTES,
        mode: 0o644,
        sha256: [0; 32],
    };
    let apply = PayloadFile {
        path: PayloadPath::parse("apply.sh").unwrap(),
        size: APPLY.len() as u64,
        mode: 0o755,
        sha256: sha(APPLY),
    };
    let m = SourceManifest::render_built(SOURCE, &[apply, zeros]);
    let h = raw_header(b"payload/zeros", b'0', BOMB_BYTES, 0o644);
    let prefix = Raw::default()
        .file("manifest.toml", m.as_bytes(), 0o644)
        .file("payload/apply.sh", APPLY, 0o755)
        .header(&h, b"");
    let bytes = bomb(&prefix.0);
    assert!(matches!(
        reject_with(&bytes, &small_limits()),
        ArchiveError::PayloadTooLarge { .. }
    ));
}

#[test]
fn compressed_input_that_decompresses_to_nothing_is_bounded() {
    // Skippable frames (magic 0x184D2A50) are consumed without output.
    let limits = small_limits();
    let mut bytes = zstd(&with_apply().end());
    let frame = 1024 * 1024u32;
    while (bytes.len() as u64) <= limits.max_input_bytes() {
        bytes.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
        bytes.extend_from_slice(&frame.to_le_bytes());
        bytes.extend(std::iter::repeat_n(0u8, frame as usize));
    }
    assert!(matches!(
        reject_with(&bytes, &limits),
        ArchiveError::InputTooLarge { .. }
    ));
}

// ---- destination ---------------------------------------------------------------------------

#[test]
fn destination_must_be_an_empty_real_directory() {
    let bytes = with_apply().end();
    let sandbox = Sandbox::new();
    fs::write(sandbox.dest.join("already"), b"x").unwrap();
    let err = unpack_in(&bytes, &Limits::default(), &sandbox).unwrap_err();
    assert!(matches!(err, ArchiveError::BadDestination { .. }));

    let root = tempfile::tempdir().unwrap();
    let real = root.path().join("real");
    fs::create_dir(&real).unwrap();
    let link = root.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let err = open(&bytes[..], &Limits::default())
        .unwrap()
        .unpack_payload(&link)
        .unwrap_err();
    assert!(matches!(err, ArchiveError::BadDestination { .. }));
    assert_eq!(fs::read_dir(&real).unwrap().count(), 0);
    let err = open(&bytes[..], &Limits::default())
        .unwrap()
        .unpack_payload(&root.path().join("missing"))
        .unwrap_err();
    assert!(matches!(err, ArchiveError::BadDestination { .. }));
}

// ---- never panic ---------------------------------------------------------------------------

fn run_everything(bytes: &[u8]) {
    let limits = small_limits();
    if let Ok(opened) = open(bytes, &limits) {
        let _ = opened.verify_payload();
    }
    let _ = add_signature(bytes, sig(9), &limits);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn open_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        run_everything(&bytes);
    }

    #[test]
    fn open_never_panics_on_arbitrary_zstd_input(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut input = ZSTD_MAGIC.to_vec();
        input.extend(bytes);
        run_everything(&input);
    }

    /// Mutating a valid bundle never panics, and whatever still verifies
    /// has exactly the original payload (a mutation can only land in bytes
    /// that carry no meaning, like header metadata or padding).
    #[test]
    fn mutated_bundles_never_panic_and_never_verify_wrong_content(
        edits in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let original = with_manifest()
            .file("signatures/000.sig", sig(0).armored.as_bytes(), 0o644)
            .file("payload/apply.sh", APPLY, 0o755)
            .end();
        let mut bytes = original.clone();
        for (at, value) in &edits {
            let i = at.index(bytes.len());
            bytes[i] = *value;
        }
        run_everything(&bytes);
        let sandbox = Sandbox::new();
        if unpack_in(&bytes, &small_limits(), &sandbox).is_ok() {
            prop_assert_eq!(fs::read(sandbox.dest.join("apply.sh")).unwrap(), APPLY);
        }
        sandbox.assert_untouched();
    }
}
