//! Starting stage 2 directly inside the run cgroup: `clone3(2)` with
//! `CLONE_INTO_CGROUP`, then `execveat(2)` of an already opened and checked
//! file (`AT_EMPTY_PATH`), so no path is looked up between the check and
//! the exec; where `clone3` is refused with `ENOSYS`, `clone(2)` and a
//! write to the cgroup's `cgroup.procs` by the child itself before its
//! `execveat`.
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
//! clone, and the child does nothing but `sigaction`, `sigprocmask`,
//! `openat`, `write`, `close`, `dup2`, `chdir`, `close_range`, `execveat`
//! and `_exit`.
//!
//! **The `clone(2)` fallback.** A seccomp filter cannot read `clone3`'s
//! flags (they are behind a pointer), so filters that restrict namespace
//! creation make `clone3` fail with `ENOSYS` for libc to fall back to
//! `clone`: systemd does so for any unit with `RestrictNamespaces=`
//! (ours has it), and so do container runtimes' default profiles. The
//! agent then clones with `clone(2)` (the same flags but
//! `CLONE_INTO_CGROUP` and `CLONE_CLEAR_SIGHAND`) and the child moves
//! itself into the run cgroup (`openat` + `write("0")` on its
//! `cgroup.procs`) before its `execveat`: stage 2 never runs outside the
//! cgroup, it only pays the migration's RCU grace period. Without
//! `CLONE_CLEAR_SIGHAND` the parent's signal handlers would be inherited,
//! so the parent blocks every signal around the clone and the child resets
//! each caught signal to its default before unblocking, as
//! `posix_spawn(3)` does. Like `std::process::Command`, an exec
//! failure travels back over a close-on-exec pipe, so `spawn` returns only
//! once the child has either become the new program or failed to.
#![allow(unsafe_code)]

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
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

/// Start the program open at `exe` (`argv[0]` is `program`, then `args`),
/// with an empty environment and `/` as working directory, as a child of
/// the calling process inside the cgroup directory `cgroup_dir`, as PID 1 of
/// a new PID namespace (with `clone3` or the `clone` fallback). Returns
/// its pid once it has exec'd; reap it with [`wait`].
///
/// `exe` is executed with `execveat(exe, "", ..., AT_EMPTY_PATH)`: the
/// file checked by the caller is the file that runs, whatever happened to
/// its path since. It may be close-on-exec (it should be, so the program
/// does not inherit it): the kernel opens an ELF binary before it closes
/// those descriptors. (A `#!` script would fail with ENOENT, since its
/// interpreter would need `/dev/fd/N`; stage 2 is ELF.)
pub fn spawn(
    program: &Path,
    exe: BorrowedFd<'_>,
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
    let exe_fd = exe.as_raw_fd();
    let empty = c"";
    // SAFETY: sigemptyset only initializes the set we own.
    let empty_mask = unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        set
    };

    let procs_name = c"cgroup.procs";
    // glibc's SIGRTMAX is a function; read it here, not in the child.
    let last_signal = libc::SIGRTMAX();
    let cgroup_fd = cgroup.as_raw_fd();

    let mut clone_args = CloneArgs {
        flags: CLONE_CLEAR_SIGHAND | CLONE_INTO_CGROUP | CLONE_NEWPID,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup_fd as u64,
        ..CloneArgs::default()
    };
    // SAFETY: `clone_args` is a valid, fully initialized `struct
    // clone_args` of the size we pass; without CLONE_VM (and with no stack)
    // the child gets its own copy of this address space, as with fork(2),
    // so it cannot corrupt the parent's memory. In the child (return value
    // 0) only async-signal-safe system calls follow, on data prepared
    // above, ending in execve or _exit: no allocation, no lock, no return
    // into Rust code that could observe a half-copied multi-threaded state.
    let mut ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut clone_args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    let mut join_cgroup = false;
    if ret < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
        join_cgroup = true;
        ret = clone_fallback();
    }
    if ret == 0 {
        // Child.
        // SAFETY: see above; every pointer refers to memory prepared before
        // the clone and still alive in this copy of the address space.
        unsafe {
            if join_cgroup {
                reset_signal_handlers(last_signal);
                // "0" moves the writer itself; the descriptor is the
                // cgroup directory opened above.
                let procs = libc::openat(
                    cgroup_fd,
                    procs_name.as_ptr(),
                    libc::O_WRONLY | libc::O_CLOEXEC,
                );
                if procs < 0 || libc::write(procs, b"0".as_ptr().cast(), 1) != 1 {
                    child_fail(err_write_fd);
                }
                libc::close(procs);
            }
            libc::sigprocmask(libc::SIG_SETMASK, &empty_mask, std::ptr::null_mut());
            for (from, to) in raw_fds.iter().zip(0..) {
                if libc::dup2(*from, to) < 0 {
                    child_fail(err_write_fd);
                }
            }
            if libc::chdir(root.as_ptr()) < 0 {
                child_fail(err_write_fd);
            }
            // Nothing but stdin, stdout and stderr may reach stage 2: a
            // descriptor the agent's caller left open (a lock file, a
            // directory) points into the host's writable mounts, outside
            // the run's read-only view, and stage 2 lives as long as the
            // run. Close-on-exec rather than closed: the program's own
            // descriptor must survive until the execveat below.
            if libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) < 0
            {
                child_fail(err_write_fd);
            }
            libc::syscall(
                libc::SYS_execveat,
                exe_fd,
                empty.as_ptr(),
                argv.as_ptr(),
                envp.as_ptr(),
                libc::AT_EMPTY_PATH,
            );
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

/// `clone(2)` as `fork(2)` would, with every signal blocked across it in the
/// calling thread (restored before returning in the parent; the child
/// unblocks once its handlers are reset). Returns like the system call:
/// the child's pid, 0 in the child, -1 with `errno` set on failure.
fn clone_fallback() -> libc::c_long {
    // SAFETY: sigfillset/pthread_sigmask only touch the sets we own. The
    // raw clone(2) without CLONE_VM and with a null stack is fork(2):
    // the child runs on its own copy of this address space and stack and,
    // like the clone3 child, makes only async-signal-safe calls (see
    // `spawn`). The raw system call, unlike glibc's fork(), runs no
    // atfork handlers, which could take locks held by other threads.
    unsafe {
        let mut all = std::mem::zeroed::<libc::sigset_t>();
        let mut old = std::mem::zeroed::<libc::sigset_t>();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        // flags, then stack, tids and tls, all unused (their order
        // differs between architectures).
        let ret = libc::syscall(
            libc::SYS_clone,
            // PID 1 of a new PID namespace, as with clone3 (see
            // CLONE_NEWPID above).
            (libc::SIGCHLD | libc::CLONE_NEWPID) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        );
        let errno = *libc::__errno_location();
        if ret != 0 {
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            *libc::__errno_location() = errno;
        }
        ret
    }
}

/// In the `clone(2)` child, with every signal blocked: reset each signal
/// the parent catches to its default, so no handler of the agent can run
/// here (what `CLONE_CLEAR_SIGHAND` does for `clone3`; ignored signals stay
/// ignored in both cases, as across `execve`).
///
/// # Safety
/// Only async-signal-safe calls (`sigaction`).
unsafe fn reset_signal_handlers(last_signal: libc::c_int) {
    for signal in 1..=last_signal {
        let mut current = std::mem::zeroed::<libc::sigaction>();
        if libc::sigaction(signal, std::ptr::null(), &mut current) == 0
            && current.sa_sigaction != libc::SIG_IGN
            && current.sa_sigaction != libc::SIG_DFL
        {
            let mut default = std::mem::zeroed::<libc::sigaction>();
            default.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(signal, &default, std::ptr::null_mut());
        }
    }
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
    use std::os::fd::AsFd;

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
        let sh = File::open("/bin/sh").unwrap();
        let pid = spawn(
            Path::new("/bin/sh"),
            sh.as_fd(),
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

    /// What systemd's `RestrictNamespaces=` (and container runtimes'
    /// default seccomp profiles) do: `clone3` answers ENOSYS. The child must
    /// still start inside the cgroup, through `clone(2)`.
    #[test]
    fn with_clone3_refused_the_child_still_starts_in_the_cgroup() {
        let id = format!("clone-test-enosys-{}", std::process::id());
        let cgroup = RunCgroup::create(&id).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out_path = dir.path().join("out");
        let out = File::create(&out_path).unwrap();
        let cgroup_dir = cgroup.path().to_path_buf();
        // A thread of its own: the filter stays on that thread (no TSYNC).
        let pid = std::thread::spawn(move || {
            let filter = seccompiler::SeccompFilter::new(
                [(libc::SYS_clone3, vec![])].into_iter().collect(),
                seccompiler::SeccompAction::Allow,
                seccompiler::SeccompAction::Errno(libc::ENOSYS as u32),
                std::env::consts::ARCH.try_into().unwrap(),
            )
            .unwrap();
            let program: seccompiler::BpfProgram = filter.try_into().unwrap();
            seccompiler::apply_filter(&program).unwrap();
            // The filter is in force: clone3 itself says ENOSYS here.
            // SAFETY: a null clone_args with size 0 only makes the kernel
            // (or here, the filter) return an error.
            let probe = unsafe { libc::syscall(libc::SYS_clone3, 0usize, 0usize) };
            assert_eq!(probe, -1);
            assert_eq!(
                io::Error::last_os_error().raw_os_error(),
                Some(libc::ENOSYS)
            );
            let sh = File::open("/bin/sh").unwrap();
            spawn(
                Path::new("/bin/sh"),
                sh.as_fd(),
                &[
                    OsStr::new("-c"),
                    OsStr::new("cat /proc/self/cgroup; exit 4"),
                ],
                &cgroup_dir,
                Stdio {
                    stdin: &null(),
                    stdout: &out,
                    stderr: &null(),
                },
            )
            .unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(wait(pid).unwrap().code(), Some(4));
        let text = std::fs::read_to_string(&out_path).unwrap();
        let v2 = text.lines().find(|l| l.starts_with("0::")).unwrap();
        assert!(v2.ends_with(&format!("/rollguard-runs/{id}")), "{text}");
        cgroup
            .kill_and_remove(std::time::Duration::from_secs(5))
            .unwrap();
    }

    #[test]
    fn an_exec_failure_is_returned_not_hidden_in_an_exit_status() {
        let id = format!("clone-test-fail-{}", std::process::id());
        let cgroup = RunCgroup::create(&id).unwrap();
        // Not executable: the exec itself fails in the child.
        let not_exe = File::open("/dev/null").unwrap();
        let e = spawn(
            Path::new("/dev/null"),
            not_exe.as_fd(),
            &[],
            cgroup.path(),
            Stdio {
                stdin: &null(),
                stdout: &null(),
                stderr: &null(),
            },
        )
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        // The failed child was reaped and is gone from the cgroup.
        assert!(cgroup.processes().unwrap().is_empty());
        cgroup
            .kill_and_remove(std::time::Duration::from_secs(5))
            .unwrap();
    }

    #[test]
    fn a_missing_cgroup_is_an_error() {
        let t = File::open("/bin/true").unwrap();
        let e = spawn(
            Path::new("/bin/true"),
            t.as_fd(),
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
