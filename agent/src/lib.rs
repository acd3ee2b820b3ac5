// `deny`, not `forbid`: four small modules opt back in with
// `#![allow(unsafe_code)]` for raw system calls no safe crate exposes
// (sandbox::landlock_abi: the Landlock ABI probe; sandbox::seccomp_install:
// seccomp(2) with SECCOMP_FILTER_FLAG_LOG; sandbox::clone_into_cgroup:
// clone3 with CLONE_INTO_CGROUP, execveat of the checked stage-2 program;
// sandbox::pid_init: fork of the main process by single-threaded stage 2).
// Everything else stays safe.
#![deny(unsafe_code)]

pub mod cli;
pub mod daemon;
pub mod enroll;
pub mod kernel_audit;
pub mod kill_switch;
pub mod packages;
pub mod policy;
pub mod preview;
pub mod recovery;
pub mod run_log;
pub mod runner;
pub mod sandbox;
pub mod services;
pub mod state;
pub mod trust_path;
