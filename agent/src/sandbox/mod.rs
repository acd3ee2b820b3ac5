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
//! Stage 2 applies the mechanisms in a fixed order; the order and the
//! reason for each position are listed once, in [`stage2`]'s module
//! documentation. Each mechanism is one module: [`cgroup`] (with
//! [`cgroup_limits`], [`limits`] and the launcher's [`clone_into_cgroup`]),
//! [`pid_init`], [`audit_session`], [`namespaces`] (with
//! [`readonly_mounts`] and [`pins`]), [`capabilities`], [`landlock_rules`],
//! [`seccomp_filter`], and the bundle's output capture ([`output`]).
//!
//! Any failure makes stage 2 exit with [`status::EXIT_SETUP_FAILED`] without
//! running anything: the sandbox fails closed.
//!
//! What it does not cover, and why, is listed once, in `docs/sandbox.md`
//! ("Known limits").
//!
//! Before stage 2 starts, the agent attaches BPF programs to the run cgroup
//! ([`cgroup_filters`]): a device allow-list ([`device_filter`]) and, with a
//! network scope, the protocol/address/port allow-list ([`net_filter`]).
//!
//! Only six small modules here use `unsafe` ([`landlock_abi`],
//! [`seccomp_install`], [`clone_into_cgroup`], [`bpf_sys`],
//! [`mount_setattr`] and [`pid_init`]'s fork), each with `allow(unsafe_code)`
//! at its top: the raw system calls no safe crate API exposes.

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
pub mod preview_layers;
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
    ConfinedChild, ExitRules, HeldChild, KillHandle, Launcher, RunOutcome, SandboxError,
    Termination,
};
pub use spec::{NetRule, SandboxScope, SandboxSpec, SpecError};
pub use stage2::stage2_command;
pub use status::Confinement;

/// The program that runs stage 2 (`rollguard-sandbox-exec PLAN.json`).
pub const STAGE2_PROGRAM: &str = "rollguard-sandbox-exec";
