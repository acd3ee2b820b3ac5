//! Starting stage 2 directly inside the run cgroup: `clone3(2)` with
//! `CLONE_INTO_CGROUP`, then `execve(2)`.
//!
//! Why not `std::process::Command` and a write to `cgroup.procs`: moving a
//! process between cgroups takes the kernel's cgroup threadgroup rwsem for
//! writing, which waits for an RCU grace period when no migration happened
//! recently: 10-16 ms on the CI machines, on every run. A process cloned
//! into its cgroup is never migrated (the kernel only takes the rwsem for
//! reading), and there is no window in which it lives outside the run
//! cgroup at all, which is also the stronger property for `cgroup.kill`.
//! No crate we use exposes `clone3` (std, nix and rustix do not), and glibc
//! has no wrapper, hence this small unsafe module.
//!
//! The child is a `fork` of a possibly multi-threaded process (no
//! `CLONE_VM`): between `clone3` and `execve` it may only make
//! async-signal-safe calls, so everything it needs (C strings, pointer
//! arrays, file descriptors, the empty signal mask) is prepared before the
//! clone, and the child does nothing but `sigprocmask`, `dup2`, `chdir`,
//! `execve`, `write` and `_exit`. Like `std::process::Command`, an exec
//! failure travels back over a close-on-exec pipe, so `spawn` returns only
//! once the child has either become the new program or failed to.
#![allow(unsafe_code)]

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

/// `CLONE_CLEAR_SIGHAND` (Linux 5.5): reset every signal handler to its
/// default in the child, so no handler of the agent can run there.
const CLONE_CLEAR_SIGHAND: u64 = 0x1_0000_0000;
/// `CLONE_INTO_CGROUP` (Linux 5.7): start the child in `cgroup`.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
/// The child is PID 1 of a new PID namespace: stage 2 is the run's init
/// (see `pid_init`), and no host process has a pid the bundle can name.
const CLONE_NEWPID: u64 = libc::CLONE_NEWPID as u64;

/// `struct clone_args` from `<linux/sched.h>` up to `cgroup`
/// (`CLONE_ARGS_SIZE_VER2`, 88 bytes).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Where the child's standard streams go.
pub struct Stdio<'a> {
    pub stdin: &'a File,
    pub stdout: &'a File,
    pub stderr: &'a File,
}

/// Start `program` with `args` (after `argv[0]`, which is `program`), an
/// empty environment and `/` as working directory, as a child of the
/// calling process inside the cgroup directory `cgroup_dir`, as PID 1 of a
/// new PID namespace. Returns its
/// pid once it has exec'd; reap it with [`wait`].
pub fn spawn(
    program: &Path,
    args: &[&OsStr],
    cgroup_dir: &Path,
    stdio: Stdio<'_>,
) -> io::Result<u32> {
    let cgroup = File::options()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(cgroup_dir)?;
    // Everything the child touches, prepared now (no allocation after the
    // clone).
    let c_program = cstring(program.as_os_str())?;
    let c_args: Vec<CString> = std::iter::once(Ok(c_program.clone()))
        .chain(args.iter().map(|a| cstring(a)))
        .collect::<io::Result<_>>()?;
    let mut argv: Vec<*const libc::c_char> = c_args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let root = c"/";
    // The stdio files must not sit on 0-2 themselves (dup2 onto itself
    // would keep close-on-exec set): use high duplicates.
    let high = |f: &File| -> io::Result<OwnedFd> {
        let fd = fcntl(f.as_raw_fd(), FcntlArg::F_DUPFD_CLOEXEC(3)).map_err(io::Error::from)?;
        // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing
        // else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let fds = [high(stdio.stdin)?, high(stdio.stdout)?, high(stdio.stderr)?];
    let raw_fds: [RawFd; 3] = [fds[0].as_raw_fd(), fds[1].as_raw_fd(), fds[2].as_raw_fd()];
    let (err_read, err_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    let err_write_fd = err_write.as_raw_fd();
    // SAFETY: sigemptyset only initializes the set we own.
    let empty_mask = unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        set
    };

    let mut clone_args = CloneArgs {
        flags: CLONE_CLEAR_SIGHAND | CLONE_INTO_CGROUP | CLONE_NEWPID,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup.as_raw_fd() as u64,
        ..CloneArgs::default()
    };
    // SAFETY: `clone_args` is a valid, fully initialized `struct
    // clone_args` of the size we pass; without CLONE_VM (and with no stack)
    // the child gets its own copy of this address space, as with fork(2),
    // so it cannot corrupt the parent's memory. In the child (return value
    // 0) only async-signal-safe system calls follow, on data prepared
    // above, ending in execve or _exit: no allocation, no lock, no return
    // into Rust code that could observe a half-copied multi-threaded state.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut clone_args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if ret == 0 {
        // Child.
        // SAFETY: see above; every pointer refers to memory prepared before
        // the clone and still alive in this copy of the address space.
        unsafe {
            libc::sigprocmask(libc::SIG_SETMASK, &empty_mask, std::ptr::null_mut());
            for (from, to) in raw_fds.iter().zip(0..) {
                if libc::dup2(*from, to) < 0 {
                    child_fail(err_write_fd);
                }
            }
            if libc::chdir(root.as_ptr()) < 0 {
                child_fail(err_write_fd);
            }
            libc::execve(c_program.as_ptr(), argv.as_ptr(), envp.as_ptr());
            child_fail(err_write_fd);
        }
    }
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let pid = ret as u32;
    drop(err_write);
    drop(fds);
    // EOF: the child exec'd (the pipe closed on exec). Four bytes: the
    // errno of the step that failed, and the child has exited.
    let mut errno = [0u8; 4];
    let mut pipe = File::from(err_read);
    let mut got = 0;
    while got < errno.len() {
        match pipe.read(&mut errno[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if got == 0 {
        return Ok(pid);
    }
    let _ = wait(pid);
    Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)))
}

/// In the child: report errno over the pipe and exit.
///
/// # Safety
/// Only async-signal-safe calls; `fd` is the write end of the error pipe.
unsafe fn child_fail(fd: RawFd) -> ! {
    let errno = *libc::__errno_location();
    let bytes = errno.to_ne_bytes();
    libc::write(fd, bytes.as_ptr().cast(), bytes.len());
    libc::_exit(127)
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: contains a NUL byte", s.to_string_lossy()),
        )
    })
}

/// Wait for the child `pid` to exit and return its status.
pub fn wait(pid: u32) -> io::Result<std::process::ExitStatus> {
    use std::os::unix::process::ExitStatusExt;
    let pid = Pid::from_raw(pid as i32);
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => {
                return Ok(std::process::ExitStatus::from_raw((code & 0xff) << 8))
            }
            Ok(WaitStatus::Signaled(_, signal, core)) => {
                let raw = signal as i32 | if core { 0x80 } else { 0 };
                return Ok(std::process::ExitStatus::from_raw(raw));
            }
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::RunCgroup;

    fn null() -> File {
        File::open("/dev/null").unwrap()
    }

    #[test]
    fn the_child_is_born_in_the_cgroup_with_the_given_stdio() {
        let id = format!("clone-test-{}", std::process::id());
        let cgroup = RunCgroup::create(&id).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out_path = dir.path().join("out");
        let out = File::create(&out_path).unwrap();
        let pid = spawn(
            Path::new("/bin/sh"),
            &[
                OsStr::new("-c"),
                OsStr::new("cat /proc/self/cgroup; pwd; env | wc -l; exit 3"),
            ],
            cgroup.path(),
            Stdio {
                stdin: &null(),
                stdout: &out,
                stderr: &null(),
            },
        )
        .unwrap();
        let status = wait(pid).unwrap();
        assert_eq!(status.code(), Some(3));
        let text = std::fs::read_to_string(&out_path).unwrap();
        let v2 = text.lines().find(|l| l.starts_with("0::")).unwrap();
        assert!(v2.ends_with(&format!("/rollguard-runs/{id}")), "{text}");
        let mut lines = text.lines().skip_while(|l| !l.starts_with("0::")).skip(1);
        assert_eq!(lines.next(), Some("/"), "working directory: {text}");
        // sh itself sets a few variables (PWD, ...); nothing is inherited.
        let env_count: usize = lines.next().unwrap().trim().parse().unwrap();
        assert!(env_count <= 4, "{text}");
        cgroup
            .kill_and_remove(std::time::Duration::from_secs(5))
            .unwrap();
    }

    #[test]
    fn an_exec_failure_is_returned_not_hidden_in_an_exit_status() {
        let id = format!("clone-test-fail-{}", std::process::id());
        let cgroup = RunCgroup::create(&id).unwrap();
        let e = spawn(
            Path::new("/nonexistent/rollguard-agent"),
            &[],
            cgroup.path(),
            Stdio {
                stdin: &null(),
                stdout: &null(),
                stderr: &null(),
            },
        )
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        // The failed child was reaped and is gone from the cgroup.
        assert!(cgroup.processes().unwrap().is_empty());
        cgroup
            .kill_and_remove(std::time::Duration::from_secs(5))
            .unwrap();
    }

    #[test]
    fn a_missing_cgroup_is_an_error() {
        let e = spawn(
            Path::new("/bin/true"),
            &[],
            &crate::sandbox::cgroup::runs_parent()
                .unwrap()
                .join("does-not-exist"),
            Stdio {
                stdin: &null(),
                stdout: &null(),
                stderr: &null(),
            },
        )
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
    }
}
