//! Kernel confinement of a bundle run.
//!
//! One file per mechanism, composed in one place (the layout follows
//! Firecracker's jailer): the agent (parent) side creates a per-run cgroup
//! and spawns `rollguard-agent __sandbox-exec PLAN.json` ([`launch`]); that
//! process ("stage 2", [`stage2`]) confines itself step by step and then
//! `exec`s the bundle's command in place, so the process that created the
//! Landlock domain *is* the bundle's main process.
//!
//! Stage 2 applies the mechanisms in this fixed order (see [`stage2`] for
//! the reasons behind the order):
//!
//! 1. [`cgroup`]: join the run cgroup first, so nothing can escape the kill;
//! 2. [`audit_session`]: start a fresh audit session, so kernel audit records
//!    (which carry `ses=`) can be attributed to this run;
//! 3. [`namespaces`]: private mount namespace (and network namespace when the
//!    bundle has no network scope), private `/tmp`, `/var/tmp`, `/run` and a
//!    minimal `/dev`;
//! 4. [`capabilities`]: bounding/permitted/effective sets cut to a keep-list;
//! 5. `PR_SET_NO_NEW_PRIVS`;
//! 6. [`landlock_rules`]: filesystem, TCP and scoping rules (hard requirement);
//! 7. [`seccomp_filter`]: syscall deny-list, installed last;
//! 8. clean environment, `chdir` to the payload, `exec`.
//!
//! Any failure makes stage 2 exit with [`status::EXIT_SETUP_FAILED`] without
//! running anything: the sandbox fails closed.
//!
//! Only two tiny modules use `unsafe` ([`landlock_abi`] and
//! [`seccomp_install`]): the two raw system calls no safe crate API exposes.

pub mod audit_session;
pub mod capabilities;
pub mod cgroup;
pub mod kernel;
pub mod landlock_abi;
pub mod landlock_rules;
pub mod launch;
pub mod namespaces;
pub mod seccomp_filter;
pub mod seccomp_install;
pub mod spec;
pub mod stage2;
pub mod status;

pub use cgroup::{CgroupError, RunCgroup};
pub use kernel::{KernelSupport, KernelUnsupported};
pub use launch::{ConfinedChild, KillHandle, Launcher, RunOutcome, SandboxError, Termination};
pub use spec::{SandboxScope, SandboxSpec, SpecError, TcpEndpoint};
pub use stage2::stage2_main;
pub use status::Confinement;

/// The hidden sub-command of `rollguard-agent` that runs stage 2.
pub const STAGE2_COMMAND: &str = "__sandbox-exec";
