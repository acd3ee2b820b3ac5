//! The path of a directory known only by device and inode number, for
//! denials of calls made relative to a directory descriptor (`rm -r`,
//! `find -delete`): audit records the name as passed and the directory's
//! inode, not its path.
//!
//! `open_by_handle_at(2)` opens an inode from a file handle. For ext4 and
//! XFS a handle of type `FILEID_INO32_GEN` with generation 0 is the inode
//! number alone (a zero generation is not checked), and a directory opened
//! that way is connected to its parents, so `/proc/self/fd/N` names its
//! current path. Other file systems (tmpfs, btrfs) refuse such a handle and
//! the inode is reported as it is. Needs CAP_DAC_READ_SEARCH (the agent is
//! root). One system call with a pointer to `struct file_handle`, hence
//! this tiny unsafe module.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

/// `FILEID_INO32_GEN` from `<linux/exportfs.h>`.
const FILEID_INO32_GEN: i32 = 1;

/// `struct file_handle` with room for an `FILEID_INO32_GEN` handle.
#[repr(C)]
struct FileHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u32; 2],
}

/// The current path of directory `ino` on the device `major:minor`, as
/// this process sees it, when the file system supports it.
pub fn dir_path(major: u32, minor: u32, ino: u64) -> Option<PathBuf> {
    let ino = u32::try_from(ino).ok()?;
    let mounts = crate::sandbox::mountinfo::read_self().ok()?;
    let mount = mounts.iter().find(|m| {
        (m.major, m.minor) == (major, minor)
            && matches!(m.fstype.as_str(), "ext4" | "ext3" | "ext2" | "xfs")
    })?;
    // Not O_PATH: open_by_handle_at refuses an O_PATH mount descriptor.
    let mount_fd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(&mount.mount_point)
        .ok()?;
    let handle = FileHandle {
        handle_bytes: 8,
        handle_type: FILEID_INO32_GEN,
        f_handle: [ino, 0],
    };
    // SAFETY: `handle` is a `struct file_handle` whose `handle_bytes` (8)
    // matches the bytes that follow it, alive for the whole call; the
    // kernel copies it in and keeps no pointer. `mount_fd` is an open
    // descriptor. A non-negative result is a new descriptor that nothing
    // else owns, handed to `File` to be closed exactly once.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount_fd.as_raw_fd(),
            &handle as *const FileHandle,
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: see above: `fd` was just returned by the kernel and is ours.
    let file = unsafe { File::from_raw_fd(fd) };
    let path = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()?;
    // A directory that was removed meanwhile reads "… (deleted)".
    path.is_absolute().then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_directory_on_ext4_is_found_by_its_inode() {
        std::fs::create_dir_all("/var/lib/rollguard-tests").unwrap();
        let dir = tempfile::tempdir_in("/var/lib/rollguard-tests").unwrap();
        let sub = dir.path().join("a b");
        std::fs::create_dir(&sub).unwrap();
        let m = std::fs::metadata(&sub).unwrap();
        let (major, minor) = (libc::major(m.dev()), libc::minor(m.dev()));
        let on_ext4 = crate::sandbox::mountinfo::read_self()
            .unwrap()
            .iter()
            .any(|e| (e.major, e.minor) == (major, minor) && e.fstype == "ext4");
        let found = dir_path(major, minor, m.ino());
        if on_ext4 {
            assert_eq!(found, Some(sub.canonicalize().unwrap()));
        }
        assert_eq!(dir_path(major, minor, u64::from(u32::MAX)), None);
    }
}
