//! What `build` refuses in a source tree, and what it leaves out.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};

use super::*;
use crate::manifest::ManifestError;

fn build_err(dir: &Path) -> ArchiveError {
    build(dir, &BuildOptions::default()).expect_err("build should refuse this source")
}

#[test]
fn refuses_symlinks_without_following_them() {
    let src = source_tree();
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("secret"), b"secret").unwrap();
    symlink(outside.path().join("secret"), src.path().join("conf/link")).unwrap();
    assert!(
        matches!(build_err(src.path()), ArchiveError::SourceSymlink { path } if path.ends_with("conf/link"))
    );

    // A link to a directory is refused too, not walked.
    let src = source_tree();
    symlink(outside.path(), src.path().join("linked-dir")).unwrap();
    assert!(matches!(
        build_err(src.path()),
        ArchiveError::SourceSymlink { .. }
    ));

    // Dangling links as well.
    let src = source_tree();
    symlink("/nonexistent/target", src.path().join("dangling")).unwrap();
    assert!(matches!(
        build_err(src.path()),
        ArchiveError::SourceSymlink { .. }
    ));
}

#[test]
fn refuses_a_symlinked_source_manifest() {
    let src = source_tree();
    let real = src.path().join("real.toml");
    fs::rename(src.path().join("bundle.toml"), &real).unwrap();
    symlink(&real, src.path().join("bundle.toml")).unwrap();
    assert!(matches!(
        build_err(src.path()),
        ArchiveError::SourceSymlink { .. }
    ));
}

#[test]
fn refuses_fifos_and_sockets() {
    let src = source_tree();
    let fifo = src.path().join("conf/queue.fifo");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(matches!(
        build_err(src.path()),
        ArchiveError::SourceSpecialFile { kind: "FIFO", .. }
    ));

    let src = source_tree();
    let _listener =
        std::os::unix::net::UnixListener::bind(src.path().join("control.sock")).unwrap();
    assert!(matches!(
        build_err(src.path()),
        ArchiveError::SourceSpecialFile { kind: "socket", .. }
    ));
}

#[test]
fn refuses_device_nodes() {
    // Device nodes cannot be created in a tempdir portably without
    // privileges; the tests run as root, so try and skip nothing if it
    // works. A bind of /dev/null is not possible without mount, so use mknod.
    let src = source_tree();
    let dev = src.path().join("null");
    let status = std::process::Command::new("mknod")
        .arg(&dev)
        .args(["c", "1", "3"])
        .status()
        .unwrap();
    assert!(status.success(), "mknod failed: the tests run as root");
    assert!(matches!(
        build_err(src.path()),
        ArchiveError::SourceSpecialFile {
            kind: "character device",
            ..
        }
    ));
}

#[test]
fn refuses_setuid_setgid_and_sticky_modes() {
    for mode in [0o4755, 0o2755, 0o1644, 0o6777] {
        let src = source_tree();
        let path = src.path().join("apply.sh");
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        let err = build_err(src.path());
        assert!(
            matches!(err, ArchiveError::SourceSpecialMode { mode: m, .. } if m == mode),
            "{mode:o}: {err:?}"
        );
    }
}

#[test]
fn refuses_non_utf8_names() {
    let src = source_tree();
    fs::write(src.path().join(OsStr::from_bytes(b"bad\xffname")), b"x").unwrap();
    assert!(matches!(
        build_err(src.path()),
        ArchiveError::SourceNameNotUtf8 { .. }
    ));
}

#[test]
fn refuses_names_that_are_not_payload_paths() {
    let src = source_tree();
    fs::write(src.path().join("back\\slash"), b"x").unwrap();
    assert!(matches!(
        build_err(src.path()),
        ArchiveError::SourceBadPath { .. }
    ));
}

#[test]
fn refuses_paths_that_do_not_fit_ustar() {
    let src = source_tree();
    fs::write(src.path().join("n".repeat(101)), b"x").unwrap();
    assert!(matches!(
        build_err(src.path()),
        ArchiveError::PathTooLongForTar { .. }
    ));
}

#[test]
fn enforces_the_reading_limits() {
    let src = source_tree();
    let limits = Limits {
        max_files: 2,
        ..Limits::default()
    };
    let err = build(
        src.path(),
        &BuildOptions {
            zstd: false,
            limits,
            packages: None,
        },
    )
    .unwrap_err();
    assert!(matches!(err, ArchiveError::TooManyFiles { .. }));
    let limits = Limits {
        max_payload_bytes: 100_000,
        ..Limits::default()
    };
    let err = build(
        src.path(),
        &BuildOptions {
            zstd: false,
            limits,
            packages: None,
        },
    )
    .unwrap_err();
    assert!(matches!(err, ArchiveError::PayloadTooLarge { .. }));
    let limits = Limits {
        max_manifest_bytes: SOURCE.len() + 10,
        ..Limits::default()
    };
    let err = build(
        src.path(),
        &BuildOptions {
            zstd: false,
            limits,
            packages: None,
        },
    )
    .unwrap_err();
    assert!(matches!(err, ArchiveError::ManifestTooLarge { .. }));
}

#[test]
fn refuses_invalid_source_manifests() {
    let src = source_tree();
    fs::remove_file(src.path().join("apply.sh")).unwrap();
    assert!(matches!(
        build_err(src.path()),
        ArchiveError::Manifest(ManifestError::ProgramNotInPayload(_))
    ));

    let src = source_tree();
    fs::set_permissions(
        src.path().join("apply.sh"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    assert!(matches!(
        build_err(src.path()),
        ArchiveError::Manifest(ManifestError::ProgramNotExecutable(..))
    ));

    let src = source_tree();
    let with_payload = format!("{SOURCE}\n[payload]\nfiles = []\n");
    fs::write(src.path().join("bundle.toml"), with_payload).unwrap();
    assert!(matches!(
        build_err(src.path()),
        ArchiveError::Manifest(ManifestError::PayloadInSource)
    ));

    let src = source_tree();
    fs::write(
        src.path().join("bundle.toml"),
        SOURCE.replace("[run]", "[run]\nuser = \"root\""),
    )
    .unwrap();
    assert!(matches!(
        build_err(src.path()),
        ArchiveError::Manifest(ManifestError::Toml(_))
    ));

    let src = source_tree();
    fs::remove_file(src.path().join("bundle.toml")).unwrap();
    assert!(matches!(build_err(src.path()), ArchiveError::Source { .. }));
}

#[test]
fn git_metadata_is_skipped_even_when_it_is_a_symlink() {
    let src = source_tree();
    fs::remove_dir_all(src.path().join(".git")).unwrap();
    symlink("/etc", src.path().join(".git")).unwrap();
    let built = build_plain(src.path());
    assert!(built
        .manifest
        .payload
        .iter()
        .all(|f| !f.path.as_str().contains(".git")));
}
