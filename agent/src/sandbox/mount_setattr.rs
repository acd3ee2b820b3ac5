//! `mount_setattr(2)`: change the attributes of a mount, or of a whole
//! mount tree at once (`AT_RECURSIVE`).
//!
//! The old `mount(MS_REMOUNT|MS_BIND|MS_RDONLY)` changes one mount at a
//! time, and a mount covered by another one (stacked on the same path) or
//! created between listing and remounting would be missed. With
//! `AT_RECURSIVE` the kernel changes the whole tree under one lock, which
//! is what systemd's `ProtectSystem=strict` uses too. Neither nix nor
//! rustix wraps it, and the call takes a pointer to `struct mount_attr`,
//! hence this tiny unsafe module.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `MOUNT_ATTR_*` from `<linux/mount.h>`.
pub const MOUNT_ATTR_RDONLY: u64 = 0x0000_0001;
pub const MOUNT_ATTR_NOSUID: u64 = 0x0000_0002;
pub const MOUNT_ATTR_NODEV: u64 = 0x0000_0004;
pub const MOUNT_ATTR_NOEXEC: u64 = 0x0000_0008;

/// `struct mount_attr` (`MOUNT_ATTR_SIZE_VER0`, 32 bytes).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Whether the change applies to the mount at the path only, or to every
/// mount beneath it too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    This,
    Recursive,
}

/// Set the `set` attributes and clear the `clear` ones on the mount at
/// `path` (the topmost one, if several are stacked there), or on the whole
/// tree beneath it. Symlinks at the last component are not followed.
pub fn set(path: &Path, depth: Depth, set: u64, clear: u64) -> std::io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let attr = MountAttr {
        attr_set: set,
        attr_clr: clear,
        propagation: 0,
        userns_fd: 0,
    };
    let mut flags = libc::AT_SYMLINK_NOFOLLOW as libc::c_uint;
    if depth == Depth::Recursive {
        flags |= libc::AT_RECURSIVE as libc::c_uint;
    }
    // SAFETY: `c_path` is a NUL-terminated string and `attr` a properly
    // laid out `struct mount_attr`; both live for the whole call, and the
    // size passed is exactly `attr`'s. The kernel copies both in
    // (strncpy_from_user / copy_struct_from_user) and keeps no pointer.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c_path.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
