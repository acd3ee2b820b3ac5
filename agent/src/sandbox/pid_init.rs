//! Stage 2 as PID 1 of the run's own PID namespace.
//!
//! The launcher clones stage 2 with `CLONE_NEWPID` (see
//! [`super::clone_into_cgroup`]), so stage 2 is PID 1 of a fresh PID
//! namespace from its first instruction. Host processes then have no pid
//! in the run's namespace at all: no `kill`, `prlimit`, `setpriority`,
//! `ioprio_set`, `sched_setaffinity`, `migrate_pages`, `move_pages`,
//! `ptrace` or `/proc/<pid>` can name them (every pid argument is read in
//! the caller's namespace). This also closes the signal gap of Landlock
//! ABI 3-5, which cannot scope signals. Stage 2 mounts a fresh procfs for
//! the namespace (see [`super::namespaces`]), so `/proc` lists only the
//! run's processes.
//!
//! Stage 2 confines itself first (so the Landlock domain is created by the
//! pid the agent knows, which is how `kernel_audit` attributes denials),
//! then [`fork_main`] forks the bundle's main process, which inherits the
//! whole confinement and execs the bundle. Stage 2 stays behind as a tiny
//! init ([`reap_until_main_exits`]): it reaps every process re-parented to
//! it (no zombies accumulate), and when the main process exits it counts
//! the processes left behind and exits itself; the kernel then SIGKILLs
//! everything else in the namespace, and the agent's `cgroup.kill` still
//! reaches every process (the namespace is inside the run cgroup). Being
//! PID 1, it ignores every signal sent from inside the namespace (it
//! installs no handler), so the bundle cannot kill its own supervisor.
#![allow(unsafe_code)]

use std::fs;

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{ForkResult, Pid};

/// How the bundle's main process ended, and what it left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MainExit {
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal, if a signal killed it.
    pub signal: Option<i32>,
    /// Processes of the run still alive when it exited (they die with
    /// this init).
    pub leftover_processes: usize,
    /// `/tmp` or `/var/tmp` full when it exited.
    pub tmp_full: bool,
}

impl MainExit {
    /// Init's own exit status: the main process's code, or 128 + signal
    /// (PID 1 cannot die of a signal it sends itself).
    pub fn init_exit_code(&self) -> u8 {
        match (self.code, self.signal) {
            (Some(code), _) => (code & 0xff) as u8,
            (None, Some(signal)) => (128 + signal).clamp(0, 255) as u8,
            (None, None) => 255,
        }
    }
}

/// Fail closed unless this process is PID 1 of its PID namespace: without
/// a PID namespace of its own the bundle could reach host processes.
pub fn require_pid1() -> Result<(), String> {
    let pid = std::process::id();
    if pid == 1 {
        Ok(())
    } else {
        Err(format!(
            "stage 2 must start as PID 1 of a new PID namespace (the launcher clones it with CLONE_NEWPID), but its pid is {pid}"
        ))
    }
}

/// Which side of [`fork_main`] we are on.
pub enum Forked {
    /// The bundle's main process: exec the bundle.
    Main,
    /// Still init; `main` is the main process's pid.
    Init { main: Pid },
}

/// Fork the bundle's main process. Call only once confinement is complete
/// and the run is released: the child inherits Landlock, seccomp,
/// capabilities, namespaces and cgroup, and goes straight to `exec`.
pub fn fork_main() -> Result<Forked, Errno> {
    // SAFETY: stage 2 is single-threaded (checked in its step 0, before
    // anything else, and nothing since has started a thread), so the child
    // is a complete copy of the only thread: no lock can be held by a
    // thread that does not exist in the child, and it may allocate and run
    // ordinary Rust code until `exec`.
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Child => Ok(Forked::Main),
        ForkResult::Parent { child } => Ok(Forked::Init { main: child }),
    }
}

/// As init: reap every child until `main` has exited, then count the
/// processes left in the namespace. Never returns an error for an orphan
/// it reaps; only losing `main` itself (ECHILD) is an error.
pub fn reap_until_main_exits(main: Pid) -> Result<MainExit, Errno> {
    let (code, signal) = loop {
        match waitpid(None::<Pid>, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == main => break (Some(code), None),
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == main => {
                break (None, Some(signal as i32))
            }
            // An orphan re-parented to us, reaped.
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    };
    // Reap whatever has already exited, so only live processes are counted.
    while let Ok(status) = waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
    Ok(MainExit {
        code,
        signal,
        leftover_processes: live_processes_besides_init(),
        tmp_full: ["/tmp", "/var/tmp"].iter().any(|p| is_full(p)),
    })
}

/// Whether the tmpfs at `path` has no block or no inode left: a write
/// there got ENOSPC. Seen at the end of the run only (a bundle that fills
/// it and then deletes its files is not seen; the kernel keeps no peak).
fn is_full(path: &str) -> bool {
    nix::sys::statvfs::statvfs(path)
        .is_ok_and(|s| s.blocks() > 0 && (s.blocks_available() == 0 || s.files_available() == 0))
}

/// Processes in this namespace's `/proc` other than init itself.
fn live_processes_besides_init() -> usize {
    fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| *pid != 1)
                .count()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_exit_code_mirrors_the_main_process() {
        let exit = |code, signal| MainExit {
            code,
            signal,
            leftover_processes: 0,
            tmp_full: false,
        };
        assert_eq!(exit(Some(7), None).init_exit_code(), 7);
        assert_eq!(exit(None, Some(9)).init_exit_code(), 137);
        assert_eq!(exit(None, None).init_exit_code(), 255);
    }
}
