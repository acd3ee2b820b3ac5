//! Refusals no security module audits: "report these system calls when they
//! fail with these errors, for this run".
//!
//! A read-only mount answers `EROFS` before Landlock is consulted, so
//! Landlock never logs the attempt; a cgroup BPF program answering `EPERM`
//! to `connect` logs nothing either. The kernel's audit *syscall-exit
//! filter* can: a rule `-a always,exit -F arch=… -S chmod,… -F exit=-EROFS
//! -F sessionid=N -k rollguard:erofs` makes the kernel emit, for every
//! matching call of the run's audit session, a `SYSCALL` record (`syscall=`,
//! `exit=`, `key=`) followed by `CWD` and `PATH` records naming the file.
//! The listener keeps those (`key` starts with [`KEY_PREFIX`]) and turns
//! each into a denial `<label>.<syscall>` with the path.
//!
//! Rules are per run, keyed on the run's audit session (the agent adds them
//! once stage 2 has sent it the session id, before it releases the run:
//! audit takes rule changes only from the initial PID namespace, and stage
//! 2 lives in the run's; the agent removes them when the run is over): while
//! *any* syscall rule exists, every system call of every process on the
//! host takes audit's slow path (names collected, rules walked at exit),
//! so rules exist only while a run does. A run whose rules could not be
//! added reports its denials as unknown.
//!
//! To report another kind of refusal, add an [`ExitWatch`] to [`WATCHES`]
//! (one kernel rule per exit code). Pick calls and codes that no LSM
//! already audits for the run (Landlock denies with `EACCES`/`EXDEV`,
//! seccomp with `EPERM` on its own calls), or they are reported twice.

use nix::errno::Errno;

use std::os::fd::AsRawFd;

use super::syscalls::{self, AUDIT_ARCH_AARCH64, AUDIT_ARCH_X86_64};
use super::{decode_nlmsgs, u32_at, AuditUnavailable, Control, NLMSG_ERROR, NLM_F_REQUEST};

/// Every rule key we add starts with this.
pub const KEY_PREFIX: &str = "rollguard:";

/// One kind of refusal to report: `syscalls` failing with one of `exits`,
/// reported as `<label>.<syscall>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitWatch {
    pub label: &'static str,
    pub syscalls: &'static [&'static str],
    pub exits: &'static [Errno],
}

/// Writes and metadata changes refused by a read-only mount
/// ([`crate::sandbox::readonly_mounts`]). Calls absent on an architecture
/// (`chmod` on aarch64) are skipped there.
pub const READ_ONLY_MOUNT: ExitWatch = ExitWatch {
    label: "erofs",
    syscalls: &[
        // metadata
        "chmod",
        "fchmod",
        "fchmodat",
        "fchmodat2",
        "chown",
        "fchown",
        "lchown",
        "fchownat",
        "utime",
        "utimes",
        "futimesat",
        "utimensat",
        "setxattr",
        "lsetxattr",
        "fsetxattr",
        "setxattrat",
        "removexattr",
        "lremovexattr",
        "fremovexattr",
        "removexattrat",
        // chattr: the ioctls (FS_IOC_SETFLAGS, FS_IOC_FSSETXATTR), and
        // file_setattr(2) (Linux 6.17)
        "ioctl",
        "file_setattr",
        // contents and names
        "open",
        "openat",
        "creat",
        "truncate",
        "unlink",
        "unlinkat",
        "rename",
        "renameat",
        "renameat2",
        "mkdir",
        "mkdirat",
        "rmdir",
        "link",
        "linkat",
        "symlink",
        "symlinkat",
        "mknod",
        "mknodat",
    ],
    exits: &[Errno::EROFS],
};

/// Removing, renaming away or renaming over a mount point: a pinned
/// protected path inside a scope, or a directory above one
/// ([`crate::sandbox::pins`]), refused with `EBUSY` after Landlock allowed
/// it (the scope grants the right), so no LSM records it. These calls
/// answer `EBUSY` for a mount point only (a pin, a directory above one, a
/// scope's own bind, a host mount beneath a scope), so every record is an
/// attempt to move or remove one.
pub const MOUNT_POINT: ExitWatch = ExitWatch {
    label: "ebusy",
    syscalls: &[
        "unlink",
        "unlinkat",
        "rename",
        "renameat",
        "renameat2",
        "rmdir",
    ],
    exits: &[Errno::EBUSY],
};

/// The watches every run gets.
pub const WATCHES: &[ExitWatch] = &[READ_ONLY_MOUNT, MOUNT_POINT];

// include/uapi/linux/audit.h
const AUDIT_ADD_RULE: u16 = 1011;
const AUDIT_DEL_RULE: u16 = 1012;
const AUDIT_LIST_RULES: u16 = 1013;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_DONE: u16 = 3;
/// Byte offsets in `struct audit_rule_data`.
const FIELD_COUNT_AT: usize = 8;
const FIELDS_AT: usize = 4 * (3 + AUDIT_BITMASK_SIZE);
const VALUES_AT: usize = FIELDS_AT + 4 * AUDIT_MAX_FIELDS;
const BUFLEN_AT: usize = VALUES_AT + 8 * AUDIT_MAX_FIELDS;
const BUF_AT: usize = BUFLEN_AT + 4;
const AUDIT_FILTER_EXIT: u32 = 0x04;
const AUDIT_ALWAYS: u32 = 2;
const AUDIT_BITMASK_SIZE: usize = 64;
const AUDIT_MAX_FIELDS: usize = 64;
const AUDIT_ARCH: u32 = 11;
const AUDIT_SESSIONID: u32 = 25;
const AUDIT_EXIT: u32 = 103;
const AUDIT_FILTERKEY: u32 = 210;
const AUDIT_EQUAL: u32 = 0x4000_0000;

/// The running architecture's audit arch and syscall table.
fn native() -> (u32, &'static [(u32, &'static str)]) {
    if cfg!(target_arch = "aarch64") {
        (AUDIT_ARCH_AARCH64, syscalls::AARCH64)
    } else {
        (AUDIT_ARCH_X86_64, syscalls::X86_64)
    }
}

/// `struct audit_rule_data` for one watch, one exit code, one session.
fn rule(watch: &ExitWatch, exit: Errno, session: u32) -> Vec<u8> {
    let (arch, table) = native();
    let mut mask = [0u32; AUDIT_BITMASK_SIZE];
    for name in watch.syscalls {
        if let Some((nr, _)) = table.iter().find(|(_, n)| n == name) {
            let nr = *nr as usize;
            mask[nr / 32] |= 1 << (nr % 32);
        }
    }
    let key = format!("{KEY_PREFIX}{}", watch.label);
    let fields = [
        (AUDIT_ARCH, arch),
        (AUDIT_EXIT, (-(exit as i32)) as u32),
        (AUDIT_SESSIONID, session),
        (AUDIT_FILTERKEY, key.len() as u32),
    ];
    let mut words: Vec<u32> = vec![AUDIT_FILTER_EXIT, AUDIT_ALWAYS, fields.len() as u32];
    words.extend_from_slice(&mask);
    let mut f = [0u32; AUDIT_MAX_FIELDS];
    let mut v = [0u32; AUDIT_MAX_FIELDS];
    let mut ops = [0u32; AUDIT_MAX_FIELDS];
    for (i, (field, value)) in fields.iter().enumerate() {
        f[i] = *field;
        v[i] = *value;
        ops[i] = AUDIT_EQUAL;
    }
    words.extend_from_slice(&f);
    words.extend_from_slice(&v);
    words.extend_from_slice(&ops);
    words.push(key.len() as u32);
    let mut out: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    out.extend_from_slice(key.as_bytes());
    out
}

/// Add every watch's rules for `session`. On failure the rules added so
/// far are removed again.
pub fn install(session: u32) -> Result<(), AuditUnavailable> {
    let mut control = Control::open()?;
    let mut added: Vec<Vec<u8>> = Vec::new();
    for watch in WATCHES {
        for exit in watch.exits {
            let data = rule(watch, *exit, session);
            if let Err(e) = control.request_ack("add a syscall-exit rule", AUDIT_ADD_RULE, &data) {
                for done in &added {
                    let _ = control.request_ack("remove a syscall-exit rule", AUDIT_DEL_RULE, done);
                }
                return Err(e);
            }
            added.push(data);
        }
    }
    Ok(())
}

/// Remove every watch's rules for `session`; a rule that is not there
/// (never added, or already removed) is not an error.
pub fn remove(session: u32) -> Result<(), AuditUnavailable> {
    let mut control = Control::open()?;
    let mut first_error = None;
    for watch in WATCHES {
        for exit in watch.exits {
            match control.request_ack(
                "remove a syscall-exit rule",
                AUDIT_DEL_RULE,
                &rule(watch, *exit, session),
            ) {
                Ok(()) => {}
                Err(AuditUnavailable::Protocol { why, .. }) if why == Errno::ENOENT.to_string() => {
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Remove every watch's rules for `session` without waiting for the
/// kernel's grace period: a detached process makes the requests (see
/// [`super::janitor`]). If that process cannot be started, the rules are
/// removed here, synchronously.
pub fn remove_detached(session: u32) -> Result<(), AuditUnavailable> {
    let socket = super::audit_socket()?;
    let messages: Vec<Vec<u8>> = WATCHES
        .iter()
        .flat_map(|w| w.exits.iter().map(move |e| rule(w, *e, session)))
        .enumerate()
        .map(|(i, data)| super::encode_nlmsg(AUDIT_DEL_RULE, NLM_F_REQUEST, i as u32 + 1, &data))
        .collect();
    match super::janitor::send_detached(socket, &messages) {
        Ok(()) => Ok(()),
        Err(e) => {
            tracing::debug!(
                session,
                "cannot detach the audit rules' removal ({e}); removing them now"
            );
            remove(session)
        }
    }
}

/// Remove our rules whose audit session no live process has any more:
/// left behind by an agent killed between starting stage 2 and recording
/// the run (recovery removes those of recorded runs), or by stage 2 run
/// by hand. Rules of runs still going (another `rollguard-agent run`) are
/// kept. Called when the daemon starts; returns how many were removed.
pub fn sweep_orphans() -> Result<usize, AuditUnavailable> {
    let mut control = Control::open()?;
    let sessions = list_sessions(&mut control)?;
    if sessions.is_empty() {
        return Ok(0);
    }
    let live = live_sessions();
    let mut removed = 0;
    for session in sessions.into_iter().filter(|s| !live.contains(s)) {
        remove(session)?;
        removed += 1;
    }
    Ok(removed)
}

/// The audit sessions that have rules of ours in the kernel now.
pub fn sessions_with_rules() -> Result<Vec<u32>, AuditUnavailable> {
    list_sessions(&mut Control::open()?)
}

/// The sessions of the rules with our key prefix (AUDIT_LIST_RULES dump).
fn list_sessions(control: &mut Control) -> Result<Vec<u32>, AuditUnavailable> {
    let what = "list the audit rules";
    let seq = control.send(what, AUDIT_LIST_RULES, NLM_F_REQUEST | NLM_F_DUMP, &[])?;
    let mut sessions = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match nix::sys::socket::recv(
            control.fd.as_raw_fd(),
            &mut buf,
            nix::sys::socket::MsgFlags::empty(),
        ) {
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                return Err(AuditUnavailable::Protocol {
                    what,
                    why: e.to_string(),
                })
            }
        };
        for msg in decode_nlmsgs(&buf[..n])
            .into_iter()
            .filter(|m| m.seq == seq)
        {
            match msg.msg_type {
                NLMSG_DONE => return Ok(sessions),
                NLMSG_ERROR => {
                    let code = u32_at(msg.payload, 0).unwrap_or(0) as i32;
                    if code != 0 {
                        return Err(AuditUnavailable::Protocol {
                            what,
                            why: Errno::from_raw(-code).to_string(),
                        });
                    }
                }
                AUDIT_LIST_RULES => sessions.extend(session_of_rule(msg.payload)),
                _ => {}
            }
        }
    }
}

/// The session of one of our rules, from its `struct audit_rule_data`.
fn session_of_rule(rule: &[u8]) -> Option<u32> {
    let count = (u32_at(rule, FIELD_COUNT_AT)? as usize).min(AUDIT_MAX_FIELDS);
    let buflen = u32_at(rule, BUFLEN_AT)? as usize;
    let key = rule.get(BUF_AT..BUF_AT + buflen)?;
    if !key.starts_with(KEY_PREFIX.as_bytes()) {
        return None;
    }
    (0..count).find_map(|i| {
        (u32_at(rule, FIELDS_AT + 4 * i)? == AUDIT_SESSIONID)
            .then(|| u32_at(rule, VALUES_AT + 4 * i))?
    })
}

/// Audit sessions of the live processes.
fn live_sessions() -> std::collections::BTreeSet<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            e.file_name().to_str()?.parse::<u32>().ok()?;
            std::fs::read_to_string(e.path().join("sessionid"))
                .ok()?
                .trim()
                .parse()
                .ok()
        })
        .collect()
}

/// The label of a watch from a record's `key=`, if the rule was ours.
pub fn label_of(key: &str) -> Option<&str> {
    key.strip_prefix(KEY_PREFIX)
}

/// Whether `exit` is one of the codes `label`'s watch reports.
pub fn watches(label: &str, exit: i64) -> bool {
    WATCHES
        .iter()
        .filter(|w| w.label == label)
        .any(|w| w.exits.iter().any(|e| -(*e as i64) == exit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_is_laid_out_as_struct_audit_rule_data() {
        let r = rule(&READ_ONLY_MOUNT, Errno::EROFS, 42);
        let word = |i: usize| u32::from_ne_bytes(r[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!(r.len(), 1040 + "rollguard:erofs".len());
        assert_eq!(
            (word(0), word(1), word(2)),
            (AUDIT_FILTER_EXIT, AUDIT_ALWAYS, 4)
        );
        let (_, table) = native();
        let chmod = table.iter().find(|(_, n)| *n == "fchmodat").unwrap().0 as usize;
        assert_ne!(word(3 + chmod / 32) & (1 << (chmod % 32)), 0);
        let fields = 3 + 64;
        let values = fields + 64;
        assert_eq!(word(fields + 1), AUDIT_EXIT);
        assert_eq!(word(values + 1) as i32, -30);
        assert_eq!(word(values + 2), 42);
        assert_eq!(word(values + 3) as usize, "rollguard:erofs".len());
        assert_eq!(&r[1040..], b"rollguard:erofs");
        assert!(watches("erofs", -30));
        assert!(!watches("erofs", -13));
        assert!(watches("ebusy", -16));
        assert!(!watches("erofs", -16));
        assert_eq!(label_of("rollguard:erofs"), Some("erofs"));
        assert_eq!(session_of_rule(&r), Some(42));
        let mut other = r.clone();
        other[BUF_AT] = b'x';
        assert_eq!(session_of_rule(&other), None);
    }

    /// Real kernel, as root: a rule of a session no process has is swept;
    /// one of a live session (ours, once set) is kept.
    #[test]
    fn rules_of_dead_sessions_are_swept() {
        // Session ids count up from 1 per boot; this one is never reached.
        let dead = 3_999_999_999;
        install(dead).unwrap();
        let mut control = Control::open().unwrap();
        assert!(list_sessions(&mut control).unwrap().contains(&dead));
        assert!(sweep_orphans().unwrap() >= 1);
        assert!(!list_sessions(&mut control).unwrap().contains(&dead));
        // Removing what is not there is not an error.
        remove(dead).unwrap();
    }

    /// Real kernel, as root: a detached removal returns before the kernel's
    /// grace period and the rules are gone once the detached process is,
    /// which holds none of our descriptors but its socket.
    #[test]
    fn a_detached_removal_removes_the_rules() {
        let session = 3_999_999_998;
        install(session).unwrap();
        // A pipe whose write end only we hold: the middle process closes
        // its copy before it forks the detached one, and we reap it before
        // `remove_detached` returns, so the read sees the end of file at
        // once; a detached process that kept it would make it EAGAIN.
        let (read_end, write_end) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)
                .unwrap();
        remove_detached(session).unwrap();
        drop(write_end);
        let mut buf = [0u8; 1];
        assert_eq!(nix::unistd::read(read_end.as_raw_fd(), &mut buf), Ok(0));
        let mut control = Control::open().unwrap();
        // Bounded for a broken kernel, not a timing claim: the removal
        // takes one grace period (milliseconds).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while list_sessions(&mut control).unwrap().contains(&session) {
            assert!(std::time::Instant::now() < deadline, "rules still there");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
