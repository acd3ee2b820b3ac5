//! The syscall deny-list of a run, compiled with seccompiler.
//!
//! Default allow, EPERM for what a maintenance script never needs and an
//! escape or a kernel attack would: mounting and namespace games, module
//! and kexec loading, BPF and perf, ptrace and cross-process memory access,
//! io_uring (which bypasses syscall filtering for the I/O it performs),
//! file handles (`open_by_handle_at` escapes mount-based confinement), the
//! kernel keyring, userfaultfd, clock and swap changes, raw device nodes.
//! No `listen` (an unbound socket that listens gets a port by itself).
//! Sockets are limited by family to IPv4, IPv6 and NETLINK_ROUTE, and
//! under IPv4/IPv6 to TCP and UDP (no raw sockets, no MPTCP): in
//! particular no `AF_UNIX` socket can be created, because Landlock (before
//! ABI 9) cannot filter connecting to a pathname socket such as
//! `/run/systemd/private`, and seccomp cannot inspect `connect`'s address.
//! `socketpair` stays allowed (it has no address). `AF_VSOCK` (the
//! hypervisor channel), `AF_PACKET`, `AF_ALG` etc. are blocked too.
//! Setting the setuid/setgid bit (chmod family, or creating a file with
//! such a mode) is denied: Landlock does not cover file metadata, and a
//! root bundle could otherwise plant a setuid-root binary for the host's
//! users. `clone3` and `openat2` answer ENOSYS (see [`enosys_fallbacks`]).
//!
//! Architecture mismatch kills the process (seccompiler's preamble), so the
//! 32-bit syscall table cannot be used to dodge the list. On x86_64 a
//! second, hand-written four-instruction filter also denies the x32 ABI
//! (syscall numbers with bit 30 set share the x86_64 audit arch): the
//! deny-list is keyed by exact syscall number, so it cannot express
//! "every number with that bit" itself.
//!
//! Installed last (after Landlock) with `SECCOMP_FILTER_FLAG_LOG`, so each
//! EPERM is audited ([`super::seccomp_install`]); the ENOSYS fallbacks
//! without it (see [`enosys_fallbacks`]).

use std::collections::BTreeMap;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

#[derive(Debug, thiserror::Error)]
pub enum SeccompFilterError {
    #[error("seccomp filters are not built for the {0} architecture")]
    UnsupportedArch(&'static str),
    #[error("compiling the seccomp filter: {0}")]
    Compile(#[from] seccompiler::BackendError),
}

fn target_arch() -> Result<TargetArch, SeccompFilterError> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| SeccompFilterError::UnsupportedArch(std::env::consts::ARCH))
}

/// `open_tree_attr`, not yet in the libc crate.
const SYS_OPEN_TREE_ATTR: libc::c_long = 467;

/// Denied whatever their arguments.
fn denied_syscalls() -> Vec<libc::c_long> {
    let mut list = vec![
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_mount_setattr,
        libc::SYS_chroot,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        // Another process's descriptor (the run's init holds the status
        // file and its gate): a bundle must reach nothing it did not open.
        libc::SYS_pidfd_getfd,
        // open_tree_attr(2) (Linux 6.15), the new mount API's clone with
        // attributes: the same number on every architecture.
        SYS_OPEN_TREE_ATTR,
        libc::SYS_reboot,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_keyctl,
        // A bundle must not stack its own Landlock domain: the kernel counts
        // a denial only in the youngest denying domain, so a nested domain
        // created without audit logging would hide the bundle's attempts.
        libc::SYS_landlock_create_ruleset,
        libc::SYS_landlock_add_rule,
        libc::SYS_landlock_restrict_self,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_userfaultfd,
        libc::SYS_acct,
        libc::SYS_quotactl,
        libc::SYS_quotactl_fd,
        libc::SYS_syslog,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
        libc::SYS_adjtimex,
        libc::SYS_lookup_dcookie,
        // A socket that listens without bind(2) gets an ephemeral port on
        // every address, past Landlock's and the run cgroup's bind hooks;
        // in the host's network namespace (a network scope) that would be
        // an inbound channel whose replies no connect/sendmsg check sees.
        // A bundle never serves: no listen at all (unix sockets cannot be
        // created anyway).
        libc::SYS_listen,
    ];
    #[cfg(target_arch = "x86_64")]
    list.extend([libc::SYS_iopl, libc::SYS_ioperm]);
    list
}

fn cond(
    arg: u8,
    len: SeccompCmpArgLen,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, SeccompFilterError> {
    Ok(SeccompCondition::new(arg, len, op, value)?)
}

/// `(mode & bit) == bit` for the setuid and setgid bits.
fn setid_conditions(mode_arg: u8) -> Result<Vec<SeccompCondition>, SeccompFilterError> {
    [libc::S_ISUID, libc::S_ISGID]
        .into_iter()
        .map(|bit| {
            let bit = u64::from(bit);
            cond(
                mode_arg,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(bit),
                bit,
            )
        })
        .collect()
}

/// chmod-family calls that set the setuid or setgid bit. Landlock (up to
/// ABI 7) does not cover file metadata, and a root bundle owns every
/// root-owned file, so without this a bundle could turn any binary into a
/// setuid-root one for the host's users. Normal chmod stays allowed.
fn setid_chmod_rules(mode_arg: u8) -> Result<Vec<SeccompRule>, SeccompFilterError> {
    setid_conditions(mode_arg)?
        .into_iter()
        .map(|c| Ok(SeccompRule::new(vec![c])?))
        .collect()
}

/// File creation (`O_CREAT` or `O_TMPFILE`) with the setuid or setgid bit
/// in the mode, which open(2) honours.
fn setid_create_rules(flags_arg: u8, mode_arg: u8) -> Result<Vec<SeccompRule>, SeccompFilterError> {
    const O_TMPFILE_BIT: u64 = 0o20000000; // __O_TMPFILE, without O_DIRECTORY
    let mut rules = Vec::new();
    for flag in [libc::O_CREAT as u64, O_TMPFILE_BIT] {
        for mode in setid_conditions(mode_arg)? {
            rules.push(SeccompRule::new(vec![
                cond(
                    flags_arg,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::MaskedEq(flag),
                    flag,
                )?,
                mode,
            ])?);
        }
    }
    Ok(rules)
}

/// `(mode & S_IFMT) == S_IFCHR` or `S_IFBLK`: creating device nodes
/// (FIFOs and regular files via mknod stay allowed), plus set-id modes.
fn mknod_rules(mode_arg: u8) -> Result<Vec<SeccompRule>, SeccompFilterError> {
    let fmt = u64::from(libc::S_IFMT);
    let mut rules = [libc::S_IFCHR, libc::S_IFBLK]
        .into_iter()
        .map(|kind| {
            Ok(SeccompRule::new(vec![cond(
                mode_arg,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(fmt),
                u64::from(kind),
            )?])?)
        })
        .collect::<Result<Vec<_>, SeccompFilterError>>()?;
    rules.extend(setid_chmod_rules(mode_arg)?);
    Ok(rules)
}

/// Any socket family other than IPv4/IPv6/netlink, and netlink other than
/// NETLINK_ROUTE (reading addresses for getaddrinfo; changing them needs
/// CAP_NET_ADMIN, which is dropped). Audit netlink is thus unreachable.
/// Under IPv4/IPv6 only TCP and UDP sockets: type stream or datagram,
/// protocol 0, TCP or UDP. No raw sockets, and no MPTCP (`IPPROTO_MPTCP`
/// stream sockets), SCTP or UDP-Lite, whose connects neither Landlock's TCP
/// rules nor the run cgroup's address filter are written for.
/// (`socket` is not a hot syscall: checking its arguments costs nothing
/// that matters, unlike `read` or `openat`.)
fn socket_rules() -> Result<Vec<SeccompRule>, SeccompFilterError> {
    let family = |op, value: libc::c_int| cond(0, SeccompCmpArgLen::Dword, op, value as u64);
    let mut rules = vec![
        SeccompRule::new(vec![
            family(SeccompCmpOp::Ne, libc::AF_INET)?,
            family(SeccompCmpOp::Ne, libc::AF_INET6)?,
            family(SeccompCmpOp::Ne, libc::AF_NETLINK)?,
        ])?,
        SeccompRule::new(vec![
            family(SeccompCmpOp::Eq, libc::AF_NETLINK)?,
            cond(
                2,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Ne,
                libc::NETLINK_ROUTE as u64,
            )?,
        ])?,
    ];
    // The type's low four bits (SOCK_NONBLOCK and SOCK_CLOEXEC live above
    // them) must be SOCK_STREAM (1) or SOCK_DGRAM (2): refuse 0 and 3
    // (SOCK_RAW), and anything with bit 2 or 3 set (4-15: SOCK_RDM,
    // SOCK_SEQPACKET, SOCK_DCCP, SOCK_PACKET, ...).
    let type_is = |mask: u64, value: u64| {
        cond(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(mask),
            value,
        )
    };
    for inet in [libc::AF_INET, libc::AF_INET6] {
        for kind in [
            type_is(0xf, 0)?,
            type_is(0xf, libc::SOCK_RAW as u64)?,
            type_is(0xc, 0x4)?,
            type_is(0xc, 0x8)?,
            type_is(0xc, 0xc)?,
        ] {
            rules.push(SeccompRule::new(vec![
                family(SeccompCmpOp::Eq, inet)?,
                kind,
            ])?);
        }
        let protocol =
            |value: libc::c_int| cond(2, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, value as u64);
        rules.push(SeccompRule::new(vec![
            family(SeccompCmpOp::Eq, inet)?,
            protocol(0)?,
            protocol(libc::IPPROTO_TCP)?,
            protocol(libc::IPPROTO_UDP)?,
        ])?);
    }
    Ok(rules)
}

/// Terminal input injection: `TIOCSTI` (push characters into a terminal's
/// input queue, run by the shell that owns it) and `TIOCLINUX` (same for
/// virtual consoles). Stage 2 also starts a new session without a
/// controlling terminal; this is the second layer.
fn tty_injection_rules() -> Result<Vec<SeccompRule>, SeccompFilterError> {
    [libc::TIOCSTI, libc::TIOCLINUX]
        .into_iter()
        .map(|request| {
            // libc's ioctl request type is c_ulong on glibc, c_int on musl.
            #[allow(clippy::unnecessary_cast)]
            let request = request as u64;
            Ok(SeccompRule::new(vec![cond(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                request,
            )?])?)
        })
        .collect()
}

/// `clone` with any namespace flag (CLONE_NEWTIME shares its bit with
/// CSIGNAL in `clone`, so it can only be requested via clone3/unshare,
/// both of which are handled elsewhere).
fn clone_rules() -> Result<Vec<SeccompRule>, SeccompFilterError> {
    [
        libc::CLONE_NEWNS,
        libc::CLONE_NEWUTS,
        libc::CLONE_NEWIPC,
        libc::CLONE_NEWUSER,
        libc::CLONE_NEWPID,
        libc::CLONE_NEWNET,
        libc::CLONE_NEWCGROUP,
    ]
    .into_iter()
    .map(|flag| {
        let flag = flag as u64;
        Ok(SeccompRule::new(vec![cond(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(flag),
            flag,
        )?])?)
    })
    .collect()
}

/// `prlimit64` on another process with a new limit (pid != 0, new_limit
/// != NULL). Host processes have no pid in the run's namespace anyway; this
/// keeps the bundle from lowering the limits of stage 2, the run's init
/// (RLIMIT_FSIZE would stop it from writing the run's final status), and
/// makes the attempt an audited denial. `setrlimit` and `ulimit` on oneself
/// use pid 0 and stay allowed.
fn prlimit_rules() -> Result<Vec<SeccompRule>, SeccompFilterError> {
    Ok(vec![SeccompRule::new(vec![
        cond(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, 0)?,
        cond(2, SeccompCmpArgLen::Qword, SeccompCmpOp::Ne, 0)?,
    ])?])
}

/// The deny-list: EPERM on match, allow otherwise.
pub fn deny_list() -> Result<BpfProgram, SeccompFilterError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = denied_syscalls()
        .into_iter()
        .map(|nr| (nr, Vec::new()))
        .collect();
    #[cfg(target_arch = "x86_64")]
    {
        rules.insert(libc::SYS_mknod, mknod_rules(1)?);
        rules.insert(libc::SYS_chmod, setid_chmod_rules(1)?);
        rules.insert(libc::SYS_open, setid_create_rules(1, 2)?);
        rules.insert(libc::SYS_creat, setid_chmod_rules(1)?);
    }
    rules.insert(libc::SYS_mknodat, mknod_rules(2)?);
    rules.insert(libc::SYS_fchmod, setid_chmod_rules(1)?);
    rules.insert(libc::SYS_fchmodat, setid_chmod_rules(2)?);
    rules.insert(libc::SYS_fchmodat2, setid_chmod_rules(2)?);
    rules.insert(libc::SYS_openat, setid_create_rules(2, 3)?);
    rules.insert(libc::SYS_socket, socket_rules()?);
    rules.insert(libc::SYS_clone, clone_rules()?);
    rules.insert(libc::SYS_ioctl, tty_injection_rules()?);
    rules.insert(libc::SYS_prlimit64, prlimit_rules()?);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        target_arch()?,
    )?;
    Ok(filter.try_into()?)
}

/// ENOSYS for calls whose arguments live in a struct seccomp cannot read:
/// `clone3` (namespace flags) and `openat2` (file mode). ENOSYS makes glibc
/// and most runtimes fall back to `clone`/`openat`, which we can check.
///
/// Not audited ([`Filter::logged`] is false): glibc's `pthread_create`
/// tries `clone3` first, so every program that starts a thread (dpkg-deb
/// unpacking an xz package, python's thread pools) would otherwise report
/// a denial and halt the rollout. ENOSYS is not a refusal of what the call
/// asks: the fallback (`clone`, `openat`) is checked, and refused and
/// audited there. What stays unseen is a program that calls `clone3` for
/// namespaces and gives up on ENOSYS (docs/sandbox.md, "Known limits").
pub fn enosys_fallbacks() -> Result<BpfProgram, SeccompFilterError> {
    let rules = BTreeMap::from([
        (libc::SYS_clone3, Vec::new()),
        (libc::SYS_openat2, Vec::new()),
    ]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        target_arch()?,
    )?;
    Ok(filter.try_into()?)
}

/// x86_64 only: deny every x32-ABI syscall (number with bit 30 set).
#[cfg(target_arch = "x86_64")]
pub fn x32_guard() -> BpfProgram {
    const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const BPF_JMP_JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const BPF_JMP_JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
    const BPF_RET_K: u16 = 0x06;
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    const OFFSET_NR: u32 = 0;
    const OFFSET_ARCH: u32 = 4;
    let ins = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    vec![
        ins(BPF_LD_W_ABS, 0, 0, OFFSET_ARCH),
        // Other architectures: leave to the deny-list's arch check (kill).
        ins(BPF_JMP_JEQ_K, 0, 3, AUDIT_ARCH_X86_64),
        ins(BPF_LD_W_ABS, 0, 0, OFFSET_NR),
        ins(BPF_JMP_JSET_K, 0, 1, X32_SYSCALL_BIT),
        ins(
            BPF_RET_K,
            0,
            0,
            libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        ),
        ins(BPF_RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ]
}

/// One compiled filter and whether its non-allow results are audited.
pub struct Filter {
    pub program: BpfProgram,
    /// Installed with `SECCOMP_FILTER_FLAG_LOG`: its answers are refusals,
    /// each an alert.
    pub logged: bool,
}

/// Every filter to install, in order.
pub fn all_filters() -> Result<Vec<Filter>, SeccompFilterError> {
    #[allow(unused_mut)]
    let mut filters = vec![
        Filter {
            program: deny_list()?,
            logged: true,
        },
        Filter {
            program: enosys_fallbacks()?,
            logged: false,
        },
    ];
    #[cfg(target_arch = "x86_64")]
    filters.push(Filter {
        program: x32_guard(),
        logged: true,
    });
    Ok(filters)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_for_this_architecture() {
        let filters = all_filters().unwrap();
        assert!(filters
            .iter()
            .all(|f| !f.program.is_empty() && f.program.len() < 4096));
        // Only the ENOSYS fallbacks go unaudited.
        assert_eq!(filters.iter().filter(|f| !f.logged).count(), 1);
    }
}
