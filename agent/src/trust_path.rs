//! Who could replace a file the agent trusts.
//!
//! The agent runs as root and believes a few files without question: the
//! host policy, `allowed_signers`, its state directory, the stage-2
//! program. If anyone else can write one of them (or any directory on the
//! way to it, since a writable directory lets its writer rename another
//! file over the entry), that person decides what the agent trusts, which
//! signatures count, and what runs unconfined. So each is refused unless it
//! and every directory above it belong to root (or the agent's own user)
//! and are not writable by group or others.
//!
//! The one exception is a directory that is writable by others but has the
//! sticky bit (`/tmp`, mode 1777): there an entry can only be renamed or
//! removed by its own owner (or the directory's owner, root), and the entry
//! below it is checked to be ours, so nobody else can replace it.
//!
//! Both the path as written and its canonical form are checked: each
//! directory that holds a symlink along the way could re-point it, and each
//! directory along the target could replace what it points to.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What is wrong with a trusted path, with the fix in the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustPathError {
    #[error("{what} {path}: cannot inspect {inspected}: {error}")]
    Inspect {
        what: &'static str,
        path: PathBuf,
        inspected: PathBuf,
        error: String,
    },
    #[error("{what} {path}: {culprit} is owned by uid {uid} (mode {mode:04o}), so that user could replace it; fix: chown root {culprit}")]
    Owner {
        what: &'static str,
        path: PathBuf,
        culprit: PathBuf,
        uid: u32,
        mode: u32,
    },
    #[error("{what} {path}: {culprit} is writable by group or others (owner uid {uid}, mode {mode:04o}), so they could replace it; fix: chmod go-w {culprit}")]
    Writable {
        what: &'static str,
        path: PathBuf,
        culprit: PathBuf,
        uid: u32,
        mode: u32,
    },
}

/// Check `path` (a file or directory the agent trusts; `what` names it in
/// the error, e.g. "allowed_signers") and every directory above it, as
/// written and as resolved. Relative paths are taken from the working
/// directory.
pub fn check(path: &Path, what: &'static str) -> Result<(), TrustPathError> {
    let inspect = |inspected: &Path, e: std::io::Error| TrustPathError::Inspect {
        what,
        path: path.to_path_buf(),
        inspected: inspected.to_path_buf(),
        error: e.to_string(),
    };
    let absolute = std::path::absolute(path).map_err(|e| inspect(path, e))?;
    let canonical = fs::canonicalize(&absolute).map_err(|e| inspect(&absolute, e))?;
    for spelling in [&absolute, &canonical] {
        // The path itself, then each ancestor up to `/`. `metadata` follows
        // symlinks: a symlinked component is judged by what it points to
        // (the symlink itself is judged by the directory holding it, the
        // next ancestor).
        for (depth, p) in spelling.ancestors().enumerate() {
            let meta = fs::metadata(p).map_err(|e| inspect(p, e))?;
            check_one(path, what, p, &meta, depth == 0)?;
        }
    }
    Ok(())
}

fn check_one(
    path: &Path,
    what: &'static str,
    culprit: &Path,
    meta: &fs::Metadata,
    is_target: bool,
) -> Result<(), TrustPathError> {
    let uid = meta.uid();
    let mode = meta.mode() & 0o7777;
    let euid = nix::unistd::geteuid().as_raw();
    if uid != 0 && uid != euid {
        return Err(TrustPathError::Owner {
            what,
            path: path.to_path_buf(),
            culprit: culprit.to_path_buf(),
            uid,
            mode,
        });
    }
    let sticky_dir = meta.is_dir() && mode & 0o1000 != 0;
    if mode & 0o022 != 0 && (is_target || !sticky_dir) {
        return Err(TrustPathError::Writable {
            what,
            path: path.to_path_buf(),
            culprit: culprit.to_path_buf(),
            uid,
            mode,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(p: &Path, mode: u32) {
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_root_owned_file_in_private_directories_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("allowed_signers");
        fs::write(&f, "").unwrap();
        chmod(&f, 0o644);
        // Under /tmp (sticky, 1777) in a 0700 directory: fine.
        check(&f, "allowed_signers").unwrap();
        check(dir.path(), "state directory").unwrap();
    }

    #[test]
    fn a_group_writable_file_is_refused_with_owner_mode_and_fix() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("allowed_signers");
        fs::write(&f, "").unwrap();
        chmod(&f, 0o664);
        let e = check(&f, "allowed_signers").unwrap_err().to_string();
        assert!(e.contains("allowed_signers"), "{e}");
        assert!(e.contains("mode 0664"), "{e}");
        assert!(e.contains("owner uid 0"), "{e}");
        assert!(e.contains(&format!("chmod go-w {}", f.display())), "{e}");
        // A sticky bit on a file or on the checked directory itself is no
        // excuse.
        chmod(&f, 0o1666);
        assert!(check(&f, "allowed_signers").is_err());
        chmod(dir.path(), 0o1777);
        assert!(check(dir.path(), "state directory").is_err());
    }

    #[test]
    fn a_file_owned_by_another_user_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("agent.toml");
        fs::write(&f, "").unwrap();
        std::os::unix::fs::chown(&f, Some(65534), None).unwrap();
        let e = check(&f, "host policy").unwrap_err().to_string();
        assert!(e.contains("owned by uid 65534"), "{e}");
        assert!(e.contains(&format!("chown root {}", f.display())), "{e}");
    }

    #[test]
    fn a_writable_parent_or_grandparent_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("etc/rollguard");
        fs::create_dir_all(&sub).unwrap();
        let f = sub.join("allowed_signers");
        fs::write(&f, "").unwrap();
        chmod(&f, 0o600);
        check(&f, "allowed_signers").unwrap();
        chmod(&dir.path().join("etc"), 0o777);
        let e = check(&f, "allowed_signers").unwrap_err().to_string();
        assert!(
            e.contains(&format!("{}/etc is writable", dir.path().display())),
            "{e}"
        );
        chmod(&dir.path().join("etc"), 0o755);
        std::os::unix::fs::chown(&sub, Some(65534), None).unwrap();
        let e = check(&f, "allowed_signers").unwrap_err().to_string();
        assert!(e.contains("owned by uid 65534"), "{e}");
    }

    #[test]
    fn a_symlink_is_judged_by_its_target_and_the_directories_along_it() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        fs::create_dir(&open).unwrap();
        chmod(&open, 0o777);
        let target = open.join("real");
        fs::write(&target, "").unwrap();
        chmod(&target, 0o644);
        let link = dir.path().join("allowed_signers");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = check(&link, "allowed_signers").unwrap_err().to_string();
        assert!(
            e.contains(&format!("{} is writable", open.display())),
            "{e}"
        );
    }

    #[test]
    fn a_missing_file_is_an_error_not_a_pass() {
        let dir = tempfile::tempdir().unwrap();
        let e = check(&dir.path().join("nope"), "allowed_signers").unwrap_err();
        assert!(matches!(e, TrustPathError::Inspect { .. }), "{e}");
    }
}
