//! Audit rule changes the run does not wait for.
//!
//! Removing an audit rule is slow: `audit_del_rule` waits for an RCU grace
//! period (`synchronize_rcu`) before the `AUDIT_DEL_RULE` request returns.
//! On Linux 6.18 that is 8-20 ms on an idle 2-core machine (the kernel
//! stack of the waiting agent reads `audit_del_rule` →
//! `synchronize_rcu_normal`), more than everything else a trivial run
//! costs together. Adding a rule takes about 0.05 ms.
//!
//! Nothing of the run depends on that wait: the rules are removed once the
//! run's processes are gone, so no record can match them any more, and the
//! report does not change. So the request is handed to a detached process
//! of its own that makes the calls and exits, and the agent goes on (a
//! one-shot `rollguard-agent run` exits, the daemon reports):
//!
//! - the socket is opened, and the messages encoded, by the agent; the
//!   process is forked twice (the middle one exits at once and is reaped
//!   here), so the one that waits is nobody's child to reap: init (or
//!   systemd) reaps it, in a one-shot run and in the daemon alike;
//! - it closes every descriptor but the socket (the agent's stdout above
//!   all: a caller reading the report to its end would wait for it), then
//!   makes only `send` and `_exit` system calls on memory prepared
//!   before the fork (a multi-threaded process may only do
//!   async-signal-safe things after `fork`), with every signal blocked,
//!   and in a session of its own, so that neither a terminal's hang-up nor
//!   a unit's stop `SIGTERM` interrupts it between two messages; the kernel
//!   handles an audit request inside `send`, so when `send` returns the
//!   rule is gone;
//! - it asks for no acknowledgement: nobody would read it. A rule it could
//!   not remove (the process was `SIGKILL`ed first) is an orphan, which
//!   the daemon removes at its start and every ten minutes while it runs
//!   (`exit_rules::sweep_orphans`). If no grandchild could be started at
//!   all (the middle process could not fork, or was killed), the caller
//!   removes the rules itself, synchronously.
//!
//! The cost to the run is one `fork` of the agent and one short `waitpid`,
//! well under a millisecond.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};

/// Send `messages` (complete netlink messages) on `socket` from a detached
/// process, and return once that process exists. Errors are those of
/// starting it; what the messages achieve is not observed.
pub fn send_detached(socket: OwnedFd, messages: &[Vec<u8>]) -> Result<(), Errno> {
    // Everything the grandchild touches exists before the fork: the
    // socket, the encoded messages (and their slices, borrowed here).
    let fd = socket.as_raw_fd();
    let all = SigSet::all();
    let mut previous = SigSet::empty();
    // Signals stay blocked across the fork so that the children start with
    // them blocked; no handler of the agent ever runs in them.
    pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&all), Some(&mut previous))?;
    // SAFETY: after `fork` in a multi-threaded process the child may only
    // make async-signal-safe calls until it execs or exits. Both children
    // below call only `close_range`, `setsid`, `fork`, `send` and `_exit` (raw system calls
    // through libc, no allocation, no lock, no Rust runtime) on memory that
    // was prepared before the fork and is not freed in the child. The
    // parent's side is ordinary code.
    let forked = unsafe { fork() };
    let result = match forked {
        Ok(ForkResult::Child) => {
            // SAFETY: async-signal-safe calls only (see above). glibc's
            // `fork` is safe to call again here: this process has one
            // thread, and glibc reset its own locks in it after the fork.
            unsafe {
                // Hold nothing of the agent's but the socket: not its
                // stdout (a caller reading the report to its end would wait
                // for this process), nor its state lock.
                // Exit status 1 tells the parent no grandchild was
                // started, so it removes the rules itself.
                let raw = fd as libc::c_uint;
                if raw > 0 && libc::syscall(libc::SYS_close_range, 0, raw - 1, 0) != 0 {
                    libc::_exit(1)
                }
                if libc::syscall(libc::SYS_close_range, raw + 1, libc::c_uint::MAX, 0) != 0 {
                    libc::_exit(1)
                }
                libc::setsid();
                match libc::fork() {
                    0 => {
                        for m in messages {
                            // An error leaves an orphan rule for the
                            // daemon's sweep; there is nobody to tell.
                            let _ = libc::send(fd, m.as_ptr().cast(), m.len(), 0);
                        }
                        libc::_exit(0)
                    }
                    -1 => libc::_exit(1),
                    _ => libc::_exit(0),
                }
            }
        }
        Ok(ForkResult::Parent { child }) => loop {
            // The middle process exits at once; reap it. Only its clean
            // exit means the grandchild took over; anything else (it could
            // not fork, or was killed first) is an error, and the caller
            // removes the rules itself (removing one already gone is
            // harmless).
            match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, 0)) => break Ok(()),
                Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) => {
                    break Err(Errno::ECHILD)
                }
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => break Err(e),
            }
        },
        Err(e) => Err(e),
    };
    pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&previous), None)?;
    drop(socket);
    result
}
