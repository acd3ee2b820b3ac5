//! Kernel confinement of a bundle run.
//!
//! One file per mechanism, composed in one place (the layout follows
//! Firecracker's jailer): the agent (parent) side creates a per-run cgroup
//! and spawns `rollguard-sandbox-exec PLAN.json` ([`launch`]); that process
//! ("stage 2", [`stage2`]) confines itself step by step and then `exec`s the
//! bundle's command in place, so the process that created the Landlock
//! domain *is* the bundle's main process. Stage 2 is a program of its own,
//! installed beside the agent, because it is exec'd on every run: it holds
//! only the confinement code, and loads in about half the time of the
//! 11 MB agent binary (see [`launch::Launcher::beside`]).
//!
//! Stage 2 applies the mechanisms in this fixed order (see [`stage2`] for
//! the reasons behind the order):
//!
//! 1. [`cgroup`]: join the run cgroup first, so nothing can escape the kill
//!    (stage 2 is cloned into it as PID 1 of a new PID namespace, see
//!    [`pid_init`]; its resource limits are set by then, see
//!    [`cgroup_limits`] and [`limits`]);
//! 2. [`audit_session`]: start a fresh audit session, so kernel audit records
//!    (which carry `ses=`) can be attributed to this run;
//! 3. [`namespaces`]: private mount namespace (and network namespace when the
//!    bundle has no network scope), private `/tmp`, `/var/tmp`, `/run` and a
//!    minimal `/dev`;
//! 4. [`capabilities`]: bounding/permitted/effective sets cut to a keep-list;
//! 5. `PR_SET_NO_NEW_PRIVS`;
//! 6. [`landlock_rules`]: filesystem, TCP and scoping rules (hard requirement);
//! 7. [`seccomp_filter`]: syscall deny-list, installed last;
//! 8. fork the bundle's main process (clean environment, `chdir` to the
//!    payload, `exec`); stage 2 stays as the namespace's init
//!    ([`pid_init`]). stdout and stderr go through the agent's bounded
//!    capture ([`output`]).
//!
//! Any failure makes stage 2 exit with [`status::EXIT_SETUP_FAILED`] without
//! running anything: the sandbox fails closed.
//!
//! What this does **not** cover (known and deliberate, or not yet done):
//!
//! - File metadata outside the scopes: Landlock (up to ABI 7) has no right
//!   for chmod, chown, utime or (user.*) xattrs, so a root bundle can
//!   change owner/mode/times of any file it can reach by path, protected
//!   ones included (their content stays intact). Only set-id bits are
//!   refused (seccomp). Read-only mounts outside the scopes would block
//!   these, but the mount check (EROFS) runs before the Landlock hook, so
//!   every out-of-scope write attempt would then go unaudited; left open.
//! - Aliases: a pre-existing hard link to a protected file, or another
//!   mount of a protected subtree, is reachable by its other path
//!   (read-only unless the alias lies in a write scope). Protection is by
//!   path, as Landlock is.
//! - Network: names in the scope are resolved once, at run start; a UDP
//!   socket bound implicitly receives from anyone (see [`net_filter`]).
//! - Resources: a full `/tmp` is seen only at the end of the run (tmpfs
//!   keeps no peak); CPU is throttled, never reported; disk I/O and space
//!   outside `/tmp` (beyond the write scopes) are not limited.
//! - Listing an ancestor of a protected path (`ls /`) is denied (see
//!   [`landlock_rules`]).
//!
//! Before stage 2 starts, the agent attaches BPF programs to the run cgroup
//! ([`cgroup_filters`]): a device allow-list ([`device_filter`]) and, with a
//! network scope, the protocol/address/port allow-list ([`net_filter`]).
//!
//! Only five tiny modules use `unsafe` ([`landlock_abi`], [`seccomp_install`],
//! [`clone_into_cgroup`], [`bpf_sys`] and [`pid_init`]'s fork): the raw
//! system calls no safe crate API exposes.

pub mod audit_session;
pub mod bpf_asm;
pub mod bpf_sys;
pub mod capabilities;
pub mod cgroup;
pub mod cgroup_filters;
pub mod cgroup_limits;
pub mod clone_into_cgroup;
pub mod device_filter;
pub mod kernel;
pub mod landlock_abi;
pub mod landlock_rules;
pub mod launch;
pub mod limits;
pub mod mount_setattr;
pub mod mountinfo;
pub mod namespaces;
pub mod net_filter;
pub mod net_scope;
pub mod output;
pub mod pid_init;
pub mod pins;
pub mod readonly_mounts;
pub mod seccomp_filter;
pub mod seccomp_install;
pub mod spec;
pub mod stage2;
pub mod status;

pub use cgroup::{CgroupError, RunCgroup};
pub use cgroup_filters::{FilterDenial, FilterDenials};
pub use kernel::{KernelSupport, KernelUnsupported};
pub use launch::{
    ConfinedChild, HeldChild, KillHandle, Launcher, RunOutcome, SandboxError, Termination,
};
pub use spec::{NetRule, SandboxScope, SandboxSpec, SpecError};
pub use stage2::stage2_command;
pub use status::Confinement;

/// The program that runs stage 2 (`rollguard-sandbox-exec PLAN.json`).
pub const STAGE2_PROGRAM: &str = "rollguard-sandbox-exec";
