//! Installing a compiled seccomp filter, with or without
//! `SECCOMP_FILTER_FLAG_LOG`.
//!
//! seccompiler compiles our filters but its `apply_filter` passes no flags.
//! We need `SECCOMP_FILTER_FLAG_LOG` so every non-allow result (our EPERMs)
//! is written to the kernel audit log (type 1326, `AUDIT_SECCOMP`, with the
//! run's `ses=`): an attempt is an alert. That is one `seccomp(2)` call
//! with a pointer to the program, hence this tiny unsafe module. The kernel
//! logs a result when the filter that *chose* it was installed with the
//! flag (`seccomp_log`, `match->log`), so a filter whose answers are not
//! refusals (the ENOSYS fallbacks) is installed without it.
#![allow(unsafe_code)]

use seccompiler::sock_filter;

/// `struct sock_fprog` from `<linux/filter.h>`, pointing at seccompiler's
/// `#[repr(C)]` `sock_filter` (same layout as the kernel's).
#[repr(C)]
struct SockFprog {
    len: libc::c_ushort,
    filter: *const sock_filter,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("the seccomp program is empty or longer than 65535 instructions")]
    BadLength,
    #[error("seccomp(SECCOMP_SET_MODE_FILTER) failed: {0}")]
    Syscall(std::io::Error),
}

/// Install `program` on the calling thread (stage 2 is single-threaded and
/// checks it), its non-allow results audited. Requires
/// `PR_SET_NO_NEW_PRIVS` (or CAP_SYS_ADMIN).
pub fn install_logged(program: &[sock_filter]) -> Result<(), InstallError> {
    install(program, libc::SECCOMP_FILTER_FLAG_LOG)
}

/// As [`install_logged`], its results not audited: only for answers that
/// are not refusals (see `seccomp_filter::enosys_fallbacks`).
pub fn install_unlogged(program: &[sock_filter]) -> Result<(), InstallError> {
    install(program, 0)
}

fn install(program: &[sock_filter], flags: libc::c_ulong) -> Result<(), InstallError> {
    let len = libc::c_ushort::try_from(program.len()).map_err(|_| InstallError::BadLength)?;
    if len == 0 {
        return Err(InstallError::BadLength);
    }
    let fprog = SockFprog {
        len,
        filter: program.as_ptr(),
    };
    // SAFETY: `fprog` points at `program`, a live slice of exactly `len`
    // instructions, for the whole call; the kernel copies the program
    // (copy_from_user) before returning and keeps no pointer to our memory.
    // The flags and operation are plain integers.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags,
            &fprog as *const SockFprog,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(InstallError::Syscall(std::io::Error::last_os_error()))
    }
}
