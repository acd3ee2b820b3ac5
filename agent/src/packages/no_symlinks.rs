//! Opening a path with no symlink in any of its components, where
//! `openat2` may be refused.
//!
//! `openat2(RESOLVE_NO_SYMLINKS)` says it in one call, but the agent's own
//! unit answers `openat2` with ENOSYS: systemd's `RestrictSUIDSGID=`
//! cannot read the mode behind its pointer, so it refuses the call whole
//! (as it does `clone3` for `RestrictNamespaces=`). There the same walk is
//! done by hand, one component at a time from `/` (or the given
//! directory), each opened `O_NOFOLLOW` relative to the one before: a
//! symlink anywhere fails the open (ELOOP, or ENOTDIR where a directory
//! was asked for), as `openat2` would. No crate we use has this fallback.

use std::ffi::OsStr;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Component, Path};

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// Open `path` (absolute; or relative to `dir`) with `flags` (plus
/// `O_NOFOLLOW | O_CLOEXEC`), following no symlink on the way. A `..`
/// component is refused (EINVAL): nothing here needs one.
pub fn open(dir: Option<BorrowedFd<'_>>, path: &Path, flags: OFlags) -> Result<OwnedFd, Errno> {
    let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let resolve = ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    let tried = match dir {
        Some(dir) => rustix::fs::openat2(dir, path, flags, Mode::empty(), resolve),
        None => rustix::fs::openat2(rustix::fs::CWD, path, flags, Mode::empty(), resolve),
    };
    match tried {
        Err(Errno::NOSYS) => walk(dir, path, flags),
        other => other,
    }
}

/// [`open`] without `openat2`.
fn walk(dir: Option<BorrowedFd<'_>>, path: &Path, flags: OFlags) -> Result<OwnedFd, Errno> {
    let mut names: Vec<&OsStr> = Vec::new();
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(name) => names.push(name),
            Component::ParentDir | Component::Prefix(_) => return Err(Errno::INVAL),
        }
    }
    let through = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    // The start: opened with `flags` itself when it is what was asked for.
    let start_flags = if names.is_empty() { flags } else { through };
    let mut at = match dir.filter(|_| path.is_relative()) {
        Some(dir) => rustix::fs::openat(dir, ".", start_flags, Mode::empty())?,
        None => rustix::fs::openat(rustix::fs::CWD, "/", start_flags, Mode::empty())?,
    };
    for (i, name) in names.iter().enumerate() {
        let last = i + 1 == names.len();
        at = rustix::fs::openat(
            &at,
            *name,
            if last { flags } else { through },
            Mode::empty(),
        )?;
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// The hand walk refuses a symlink anywhere, as openat2 does, and
    /// opens what has none.
    #[test]
    fn the_walk_follows_no_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/f"), b"x").unwrap();
        std::os::unix::fs::symlink("a", root.join("link")).unwrap();
        std::os::unix::fs::symlink("f", root.join("a/b/flink")).unwrap();
        let file = OFlags::RDONLY;
        assert!(walk(None, &root.join("a/b/f"), file | OFlags::NOFOLLOW).is_ok());
        assert!(walk(None, &root.join("link/b/f"), file | OFlags::NOFOLLOW).is_err());
        assert!(walk(None, &root.join("a/b/flink"), file | OFlags::NOFOLLOW).is_err());
        assert!(walk(None, &root.join("a/../a/b/f"), file).is_err());
        let dir = walk(
            None,
            &root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW,
        )
        .unwrap();
        assert!(walk(
            Some(dir.as_fd()),
            Path::new("a/b/f"),
            file | OFlags::NOFOLLOW
        )
        .is_ok());
        assert!(walk(
            Some(dir.as_fd()),
            Path::new("link/b/f"),
            file | OFlags::NOFOLLOW
        )
        .is_err());
        // Where openat2 exists, `open` gives the same answers.
        assert!(open(None, &root.join("a/b/f"), file).is_ok());
        assert!(open(None, &root.join("link/b/f"), file).is_err());
    }
}
