//! The denial reporter: reads the kernel's own audit records of what
//! Landlock and seccomp refused a bundle, so that an attempt is an alert —
//! with the path — even when the bundle's script exits 0.
//!
//! How it works:
//! - One `NETLINK_AUDIT` socket per agent process, shared by its runs: the
//!   first [`AuditListener::start`] makes sure audit is enabled (Landlock
//!   only logs when it is; if it was off we turn it on and say so in the
//!   log — we never turn it off again, another run may rely on it), and
//!   joins the `AUDIT_NLGRP_READLOG` multicast group. That group receives
//!   every record alongside auditd (if any), without taking auditd's place.
//!   A reader thread parses the records we use into [`AuditRecord`]s and
//!   keeps them in a bounded buffer, from the start of the oldest run still
//!   listening; it stops after a while with nobody listening. Every socket
//!   in the group gets every record of the host, so a socket per run would
//!   cost R deliveries and parses of each record with R runs at once.
//!   Start listening *before* the bundle executes so that nothing is missed.
//! - [`AuditListener::collect_for_run`] is called after the bundle's
//!   processes are gone. It first sends a marker record through the
//!   kernel: records are delivered in order, so once the marker arrives
//!   (the reader wakes the one collector waiting for it) every record the
//!   bundle caused has arrived too. It then finds the
//!   Landlock domain created by the sandbox's stage-2 process (the
//!   `status=allocated` record whose `pid` is stage 2), gathers that
//!   domain's denials, waits for the `status=deallocated` record whose
//!   `denials=N` is the kernel's authoritative count (it includes denials
//!   that were not logged), and gathers seccomp records of the run's audit
//!   session.
//! - Anything that could have lost records (socket overrun, our buffer
//!   overflowing, the kernel's `lost` counter moving, the marker not
//!   arriving) is reported in [`RunDenials::gaps`]; with gaps and no denial
//!   seen, the report says *unknown* (`denials: null`), never zero.
//!
//! Requirements on the sandbox (see the integration test for a working
//! example):
//! - Landlock: restrict with `LANDLOCK_RESTRICT_SELF_LOG_NEW_EXEC_ON`
//!   (`landlock`'s `log_new_exec(true)`): by default the kernel does not log
//!   denials after `execve`, which is exactly when the bundle runs.
//! - `stage2_pid` must be the pid (as the agent sees it) of the process that
//!   calls `landlock_restrict_self`.
//! - seccomp: only `KILL_*` verdicts are always logged; `ERRNO`/`TRAP`
//!   verdicts are logged only for filters installed with
//!   `SECCOMP_FILTER_FLAG_LOG`. Start a fresh audit session in stage 2 (write
//!   `/proc/self/loginuid`) so the run has its own session to match on.
//!
//! Program and nesting: a Landlock record carries no `exe`; it comes from
//! the `SYSCALL` record of the same event, which the kernel emits for a
//! process that has an audit context — one started after audit was enabled,
//! which is why the listener must start before the bundle. The same
//! `SYSCALL` records carry the audit session, through which denials are
//! found even when the bundle created a nested Landlock domain of its own
//! (they are then attributed to that domain, not stage 2's).
//!
//! Known limit: a bundle able to call `landlock_restrict_self` could create
//! a nested domain with logging turned off, and its denied attempts would
//! then be neither logged nor counted in our domain (the kernel counts a
//! denial in the youngest denying domain only). The sandbox's seccomp
//! filter should deny the `landlock_*` system calls to bundles, which turns
//! such an attempt into a reported `syscall.landlock_*` denial.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    bind, recv, recvfrom, send, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr,
    SockFlag, SockProtocol, SockType,
};
use nix::sys::time::{TimeVal, TimeValLike};
use rollguard_shared::report::Denial;

pub mod exit_rules;
mod handle;
mod janitor;
mod record;
mod syscalls;

pub use record::{
    parse_record, AuditRecord, AuditRecordError, EventId, LandlockAccess, LandlockDomain,
    PathRecord, RecordBody, SeccompAction, SeccompRecord, SyscallRecord, AUDIT_CWD,
    AUDIT_LANDLOCK_ACCESS, AUDIT_LANDLOCK_DOMAIN, AUDIT_PATH, AUDIT_SECCOMP, AUDIT_SYSCALL,
    AUDIT_TRUSTED_APP,
};
pub use syscalls::{syscall_name, AUDIT_ARCH_AARCH64, AUDIT_ARCH_X86_64};

/// Distinct denials kept per run; further distinct ones are only counted.
pub const MAX_DISTINCT_DENIALS: usize = 256;
/// Records kept in the listener's buffer (oldest dropped first, and the
/// drop is reported as a gap).
pub const BUFFER_RECORDS: usize = 32 * 1024;
/// How far back a `SYSCALL` record looks for the Landlock record of its event.
const RECENT_FOR_SYSCALL: usize = 512;
/// Text of the sync markers the listener sends itself.
const MARKER_PREFIX: &str = "rollguard-agent audit sync ";
/// Backlog we ask for when we enable audit ourselves (the kernel default,
/// 64, overflows on a burst of denials such as `rm -rf` on a protected tree).
const MIN_BACKLOG: u32 = 8192;
/// Receive buffer for the multicast socket.
const RCVBUF: usize = 8 * 1024 * 1024;
/// How long the reader blocks before checking whether it should stop.
const READER_TICK_MS: i64 = 200;
/// How long a control request may take.
const CONTROL_TIMEOUT_MS: i64 = 5000;

// Netlink and audit constants (include/uapi/linux/netlink.h, audit.h).
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const AUDIT_GET: u16 = 1000;
const AUDIT_SET: u16 = 1001;
const AUDIT_STATUS_ENABLED: u32 = 0x0001;
const AUDIT_STATUS_BACKLOG_LIMIT: u32 = 0x0010;
const AUDIT_NLGRP_READLOG: u32 = 1;
/// `struct audit_status` is 11 `__u32`s in current kernels; older kernels
/// accept a longer message (they copy what they know).
const AUDIT_STATUS_WORDS: usize = 11;

/// Why denials cannot be observed on this host. The run report then says
/// `denials: null` (unknown), never zero.
#[derive(Debug, thiserror::Error)]
pub enum AuditUnavailable {
    #[error("cannot open the kernel audit socket: {0} (is the kernel built with CONFIG_AUDIT, and is the agent in the initial network namespace?)")]
    Socket(Errno),
    #[error("not permitted to {what}: {errno} (the agent must run as root, with CAP_AUDIT_CONTROL and CAP_AUDIT_READ)")]
    NotPermitted { what: &'static str, errno: Errno },
    #[error("kernel audit {what} failed: {why}")]
    Protocol { what: &'static str, why: String },
}

/// The fields of `struct audit_status` we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditStatus {
    /// 0 off, 1 on, 2 on and locked.
    pub enabled: u32,
    pub pid: u32,
    pub backlog_limit: u32,
    /// Records the kernel dropped since boot (or since the counter was reset).
    pub lost: u32,
}

/// One distinct denial and how many records named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenialCount {
    pub denial: Denial,
    pub records: u64,
}

/// What the kernel refused one run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RunDenials {
    /// Distinct denials (access, object, program), first seen first; at
    /// most [`MAX_DISTINCT_DENIALS`].
    pub denials: Vec<DenialCount>,
    /// Records not listed because the distinct list was full.
    pub omitted_records: u64,
    /// The run's Landlock domain(s).
    pub domains: Vec<u64>,
    /// Landlock denials: the kernel's count from the deallocation records
    /// where they arrived, otherwise the records seen (a lower bound).
    pub landlock_denials: u64,
    /// True when every domain's deallocation record (with the kernel's
    /// authoritative count) arrived.
    pub landlock_count_final: bool,
    /// seccomp records that were denials.
    pub seccomp_denials: u64,
    /// Calls refused without an LSM record (a read-only mount's `EROFS`),
    /// seen through our syscall-exit rules ([`exit_rules`]).
    pub syscall_exit_denials: u64,
    /// Reasons the picture may be incomplete; empty when it is complete.
    pub gaps: Vec<String>,
}

impl RunDenials {
    pub fn is_complete(&self) -> bool {
        self.gaps.is_empty()
    }

    /// Total denials known: Landlock, seccomp and syscall-exit rules.
    pub fn total(&self) -> u64 {
        self.landlock_denials + self.seccomp_denials + self.syscall_exit_denials
    }

    /// Move the denials `explain` recognises out of the list and out of
    /// the totals, each with its records and the reason `explain` gives.
    /// Only seccomp (`syscall.*`) and read-only-mount (`erofs.*`) denials
    /// can be moved: Landlock's count comes from the kernel per domain,
    /// and nothing here excuses a Landlock denial. Used for the narrow,
    /// typed cases in [`crate::packages::expected`].
    pub fn take_expected(
        &mut self,
        explain: impl Fn(&Denial) -> Option<&'static str>,
    ) -> Vec<(DenialCount, &'static str)> {
        let mut taken = Vec::new();
        let mut kept = Vec::with_capacity(self.denials.len());
        for d in std::mem::take(&mut self.denials) {
            let counter = if d.denial.access.starts_with("syscall.") {
                &mut self.seccomp_denials
            } else if d.denial.access.starts_with("erofs.") {
                &mut self.syscall_exit_denials
            } else {
                kept.push(d);
                continue;
            };
            match explain(&d.denial) {
                Some(reason) if *counter >= d.records => {
                    *counter -= d.records;
                    taken.push((d, reason));
                }
                _ => kept.push(d),
            }
        }
        self.denials = kept;
        taken
    }

    pub fn denial_list(&self) -> Vec<Denial> {
        self.denials.iter().map(|d| d.denial.clone()).collect()
    }

    /// The values for `RunReport::denials` and `RunReport::denial_count`:
    /// when the picture is incomplete and nothing was seen, both are `None`
    /// (unknown — an alert), never an empty list.
    pub fn report_fields(&self) -> (Option<Vec<Denial>>, Option<u64>) {
        if self.is_complete() || self.total() > 0 || !self.denials.is_empty() {
            (Some(self.denial_list()), Some(self.total()))
        } else {
            (None, None)
        }
    }

    fn add(&mut self, denial: Denial) {
        if let Some(existing) = self.denials.iter_mut().find(|d| d.denial == denial) {
            existing.records += 1;
        } else if self.denials.len() < MAX_DISTINCT_DENIALS {
            self.denials.push(DenialCount { denial, records: 1 });
        } else {
            self.omitted_records += 1;
        }
    }
}

// ---- netlink plumbing -----------------------------------------------------

/// Build one netlink message by hand: a 16-byte header and the payload,
/// padded to 4 bytes. Written out rather than pulling in a netlink crate:
/// the audit protocol needs three fixed-layout requests.
fn encode_nlmsg(msg_type: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + payload.len();
    let mut buf = Vec::with_capacity(len + 3);
    buf.extend_from_slice(&(len as u32).to_ne_bytes());
    buf.extend_from_slice(&msg_type.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    buf.extend_from_slice(payload);
    while buf.len() % 4 != 0 {
        buf.push(0);
    }
    buf
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NlMsg<'a> {
    msg_type: u16,
    seq: u32,
    payload: &'a [u8],
}

fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(buf.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

/// Split a datagram into netlink messages. A length field that is too
/// small or too large ends the walk with the rest of the datagram as the
/// last payload (audit once had an off-by-header length quirk).
fn decode_nlmsgs(buf: &[u8]) -> Vec<NlMsg<'_>> {
    let mut out = Vec::new();
    let mut off = 0;
    while let (Some(len), Some(msg_type), Some(seq)) =
        (u32_at(buf, off), u16_at(buf, off + 4), u32_at(buf, off + 8))
    {
        let len = len as usize;
        let start = off + NLMSG_HDRLEN;
        if start > buf.len() {
            break;
        }
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            out.push(NlMsg {
                msg_type,
                seq,
                payload: &buf[start..],
            });
            break;
        }
        out.push(NlMsg {
            msg_type,
            seq,
            payload: &buf[start..off + len],
        });
        off += (len + 3) & !3;
    }
    out
}

fn parse_status(payload: &[u8]) -> Option<AuditStatus> {
    Some(AuditStatus {
        enabled: u32_at(payload, 4)?,
        pid: u32_at(payload, 12)?,
        backlog_limit: u32_at(payload, 20)?,
        lost: u32_at(payload, 24)?,
    })
}

fn set_timeout(fd: &OwnedFd, ms: i64) -> Result<(), Errno> {
    setsockopt(fd, sockopt::ReceiveTimeout, &TimeVal::milliseconds(ms))
}

fn audit_socket() -> Result<OwnedFd, AuditUnavailable> {
    socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkAudit,
    )
    .map_err(AuditUnavailable::Socket)
}

/// The unicast control channel to the kernel's audit subsystem.
struct Control {
    fd: OwnedFd,
    seq: u32,
}

impl Control {
    fn open() -> Result<Self, AuditUnavailable> {
        let fd = audit_socket()?;
        set_timeout(&fd, CONTROL_TIMEOUT_MS).map_err(|e| AuditUnavailable::Protocol {
            what: "socket setup",
            why: e.to_string(),
        })?;
        Ok(Control { fd, seq: 0 })
    }

    fn send(
        &mut self,
        what: &'static str,
        msg_type: u16,
        flags: u16,
        payload: &[u8],
    ) -> Result<u32, AuditUnavailable> {
        self.seq = self.seq.wrapping_add(1);
        let msg = encode_nlmsg(msg_type, flags, self.seq, payload);
        match send(self.fd.as_raw_fd(), &msg, MsgFlags::empty()) {
            Ok(_) => Ok(self.seq),
            Err(errno @ (Errno::EPERM | Errno::EACCES)) => {
                Err(AuditUnavailable::NotPermitted { what, errno })
            }
            Err(e) => Err(AuditUnavailable::Protocol {
                what,
                why: e.to_string(),
            }),
        }
    }

    /// Wait for the reply to `seq`: `Ok(Some(payload))` for a message of
    /// `want_type`, `Ok(None)` for a zero-error acknowledgement.
    fn reply(
        &mut self,
        what: &'static str,
        seq: u32,
        want_type: u16,
    ) -> Result<Option<Vec<u8>>, AuditUnavailable> {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => {
                    return Err(AuditUnavailable::Protocol {
                        what,
                        why: "no reply from the kernel".into(),
                    })
                }
                Err(e) => {
                    return Err(AuditUnavailable::Protocol {
                        what,
                        why: e.to_string(),
                    })
                }
            };
            for msg in decode_nlmsgs(&buf[..n]) {
                if msg.seq != seq {
                    continue;
                }
                if msg.msg_type == NLMSG_ERROR {
                    let code = u32_at(msg.payload, 0)
                        .map(|c| c as i32)
                        .unwrap_or(-libc_eproto());
                    if code == 0 {
                        return Ok(None);
                    }
                    let errno = Errno::from_raw(-code);
                    return Err(match errno {
                        Errno::EPERM | Errno::EACCES => {
                            AuditUnavailable::NotPermitted { what, errno }
                        }
                        _ => AuditUnavailable::Protocol {
                            what,
                            why: errno.to_string(),
                        },
                    });
                }
                if msg.msg_type == want_type {
                    return Ok(Some(msg.payload.to_vec()));
                }
            }
        }
    }

    fn status(&mut self) -> Result<AuditStatus, AuditUnavailable> {
        let what = "status request (AUDIT_GET)";
        let seq = self.send(what, AUDIT_GET, NLM_F_REQUEST, &[])?;
        loop {
            if let Some(payload) = self.reply(what, seq, AUDIT_GET)? {
                return parse_status(&payload).ok_or_else(|| AuditUnavailable::Protocol {
                    what,
                    why: "short audit_status reply".into(),
                });
            }
        }
    }

    /// Send a request and wait for its acknowledgement.
    fn request_ack(
        &mut self,
        what: &'static str,
        msg_type: u16,
        payload: &[u8],
    ) -> Result<(), AuditUnavailable> {
        let seq = self.send(what, msg_type, NLM_F_REQUEST | NLM_F_ACK, payload)?;
        loop {
            if self.reply(what, seq, NLMSG_ERROR)?.is_none() {
                return Ok(());
            }
        }
    }

    fn set(&mut self, mask: u32, enabled: u32, backlog_limit: u32) -> Result<(), AuditUnavailable> {
        let mut words = [0u32; AUDIT_STATUS_WORDS];
        words[0] = mask;
        words[1] = enabled;
        words[5] = backlog_limit;
        let payload: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        self.request_ack("enable (AUDIT_SET)", AUDIT_SET, &payload)
    }
}

fn libc_eproto() -> i32 {
    Errno::EPROTO as i32
}

// ---- the listener -----------------------------------------------------------

/// How long the shared reader keeps running with no run listening before it
/// stops (and closes its socket); the next run starts it again.
const IDLE_STOP: Duration = Duration::from_secs(10);

/// The records of one process's audit socket, shared by every run of the
/// process that is listening.
///
/// One socket per process, not per run: every socket in the multicast group
/// receives every record on the host, so with one per run a host running R
/// bundles at once would have the kernel deliver, and the agent parse, each
/// record R times (a million deliveries at 1,000 runs).
#[derive(Default)]
struct Buffer {
    records: VecDeque<AuditRecord>,
    /// Sequence number of `records[0]`; `records[i]` has `first_seq + i`.
    first_seq: u64,
    /// The first sequence number of every live listener (by listener id):
    /// records before the oldest are of no use to anyone and are let go.
    cursors: BTreeMap<u64, u64>,
    /// Records dropped because the buffer was full, and the sequence number
    /// of the last one: a listener that started at or before it lost some.
    dropped: u64,
    dropped_through: Option<u64>,
    /// Times the socket reported ENOBUFS (the kernel dropped multicast
    /// records for us because we did not read fast enough), and the
    /// sequence number when it last did.
    overruns: u64,
    last_overrun_seq: Option<u64>,
    unparsable: u64,
    /// Datagrams that claimed to come from a userspace process.
    forged: u64,
    reader_failed: Option<String>,
    /// The reader went idle and stopped; a new hub must be started.
    stopped: bool,
    /// Sync markers of this process being waited for, and whom to wake.
    marker_waiters: HashMap<String, SyncSender<()>>,
}

impl Buffer {
    fn next_seq(&self) -> u64 {
        self.first_seq + self.records.len() as u64
    }

    /// Whether a record is worth keeping. On a host whose auditd loads
    /// syscall rules, `SYSCALL` records arrive by the thousand; keeping them
    /// all would push the records we need out of the buffer. We keep only
    /// the `SYSCALL` records of events that carry a Landlock denial (they
    /// follow it, at syscall exit). Sync markers wake their waiter and are
    /// not kept.
    fn wanted(&self, record: &AuditRecord) -> bool {
        match &record.body {
            // Asked for by one of our syscall-exit rules.
            RecordBody::Syscall(s)
                if s.key
                    .as_deref()
                    .is_some_and(|k| exit_rules::label_of(k).is_some()) =>
            {
                true
            }
            RecordBody::Syscall(_) => self.records.iter().rev().take(RECENT_FOR_SYSCALL).any(|r| {
                r.event == record.event && matches!(r.body, RecordBody::LandlockAccess(_))
            }),
            // The names of an event we keep (they follow its SYSCALL record).
            RecordBody::Path(_) | RecordBody::Cwd { .. } => self
                .records
                .iter()
                .rev()
                .take(RECENT_FOR_SYSCALL)
                .any(|r| r.event == record.event && matches!(r.body, RecordBody::Syscall(_))),
            RecordBody::User { .. } => false,
            _ => true,
        }
    }

    fn push(&mut self, record: AuditRecord) {
        if let RecordBody::User { msg: Some(m) } = &record.body {
            if let Some(waiter) = self.marker_waiters.remove(m.as_str()) {
                let _ = waiter.try_send(());
            }
        }
        if !self.wanted(&record) {
            return;
        }
        if self.records.len() >= BUFFER_RECORDS {
            self.records.pop_front();
            self.dropped_through = Some(self.first_seq);
            self.first_seq += 1;
            self.dropped += 1;
        }
        self.records.push_back(record);
        self.prune();
    }

    /// Let go of the records every live listener started after.
    fn prune(&mut self) {
        let keep_from = self
            .cursors
            .values()
            .min()
            .copied()
            .unwrap_or_else(|| self.next_seq());
        while self.first_seq < keep_from && self.records.pop_front().is_some() {
            self.first_seq += 1;
        }
    }

    /// The records from sequence number `seq` on.
    fn since(&self, seq: u64) -> std::collections::vec_deque::Iter<'_, AuditRecord> {
        let skip = usize::try_from(seq.saturating_sub(self.first_seq)).unwrap_or(usize::MAX);
        self.records.range(skip.min(self.records.len())..)
    }

    fn deallocated(&self, domain: u64) -> Option<u64> {
        deallocated_in(&self.records, domain)
    }

    /// The reader is gone: nobody will be woken by a marker again.
    fn fail(&mut self, why: String) {
        self.reader_failed = Some(why);
        self.marker_waiters.clear();
    }
}

struct Shared {
    buffer: Mutex<Buffer>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Buffer> {
        // A panic in the reader thread must not take collection down with
        // it: the buffer is plain data, still consistent.
        self.buffer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait until `done` holds or `deadline` passes; returns `done`'s last value.
    fn wait_until(&self, deadline: Instant, mut done: impl FnMut(&Buffer) -> bool) -> bool {
        let mut guard = self.lock();
        loop {
            if done(&guard) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline || guard.reader_failed.is_some() {
                return false;
            }
            guard = match self.changed.wait_timeout(guard, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }
}

/// The process's audit socket, its reader thread and the records they keep.
struct AuditHub {
    shared: Arc<Shared>,
    /// The kernel's lost-record counter as last read (see
    /// [`AuditListener::start`]).
    last_lost: AtomicU32,
    enabled_by_us: bool,
}

/// The hub of this process, started by the first run that listens.
static AUDIT_HUB: Mutex<Option<Arc<AuditHub>>> = Mutex::new(None);
static LISTENER_IDS: AtomicU64 = AtomicU64::new(0);

impl AuditHub {
    /// Enable audit if needed, join the multicast group, start the reader.
    fn start() -> Result<Self, AuditUnavailable> {
        let mut control = Control::open()?;
        let status = control.status()?;
        let mut enabled_by_us = false;
        if status.enabled == 0 {
            let mut mask = AUDIT_STATUS_ENABLED;
            let backlog = if status.backlog_limit < MIN_BACKLOG {
                mask |= AUDIT_STATUS_BACKLOG_LIMIT;
                MIN_BACKLOG
            } else {
                status.backlog_limit
            };
            control.set(mask, 1, backlog)?;
            enabled_by_us = true;
            tracing::warn!(
                backlog_limit = backlog,
                "kernel audit was disabled; enabled it so that Landlock and seccomp denials are reported \
                 (it stays enabled; without auditd the kernel also copies records to its log)"
            );
        }
        // Each AUDIT_GET costs a kernel thread spawn (audit_send_reply), a
        // few milliseconds on a busy host: re-read the status only when we
        // changed it.
        let status = if enabled_by_us {
            control.status()?
        } else {
            status
        };
        if status.enabled == 0 {
            return Err(AuditUnavailable::Protocol {
                what: "enable",
                why: "audit is still disabled".into(),
            });
        }

        let fd = audit_socket()?;
        bind(
            fd.as_raw_fd(),
            &NetlinkAddr::new(0, 1 << (AUDIT_NLGRP_READLOG - 1)),
        )
        .map_err(|errno| match errno {
            Errno::EPERM | Errno::EACCES => AuditUnavailable::NotPermitted {
                what: "join the audit log multicast group",
                errno,
            },
            e => AuditUnavailable::Protocol {
                what: "join the audit log multicast group",
                why: e.to_string(),
            },
        })?;
        // A large buffer absorbs bursts; RcvBufForce (root) can exceed rmem_max.
        if setsockopt(&fd, sockopt::RcvBufForce, &RCVBUF).is_err() {
            let _ = setsockopt(&fd, sockopt::RcvBuf, &RCVBUF);
        }
        set_timeout(&fd, READER_TICK_MS).map_err(|e| AuditUnavailable::Protocol {
            what: "socket setup",
            why: e.to_string(),
        })?;

        let shared = Arc::new(Shared {
            buffer: Mutex::new(Buffer::default()),
            changed: Condvar::new(),
        });
        let reader_shared = shared.clone();
        std::thread::Builder::new()
            .name("audit-reader".into())
            .spawn(move || read_loop(fd, &reader_shared))
            .map_err(|e| AuditUnavailable::Protocol {
                what: "start reader thread",
                why: e.to_string(),
            })?;
        Ok(AuditHub {
            shared,
            last_lost: AtomicU32::new(status.lost),
            enabled_by_us,
        })
    }
}

/// Listens to the kernel's audit records for the lifetime of a run.
pub struct AuditListener {
    hub: Arc<AuditHub>,
    id: u64,
    /// Sequence number of the first record this run may own.
    start_seq: u64,
    lost_at_start: u32,
}

impl std::fmt::Debug for AuditListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditListener")
            .field("start_seq", &self.start_seq)
            .field("lost_at_start", &self.lost_at_start)
            .finish_non_exhaustive()
    }
}

static MARKER_COUNTER: AtomicU64 = AtomicU64::new(0);

impl AuditListener {
    /// Start listening: every record the kernel sends from now on is kept
    /// until this listener is dropped. The first listener of the process
    /// opens the audit socket (enabling audit if needed) and starts the
    /// reader; later ones join it, with no kernel round trip.
    ///
    /// The kernel's lost counter at the start is the last value this
    /// process read, not a fresh one (each read spawns a kernel thread): if
    /// the counter moved since, the run reports a gap it may not have had,
    /// which errs on the side of "unknown", never of a false zero.
    pub fn start() -> Result<Self, AuditUnavailable> {
        let mut slot = AUDIT_HUB.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(hub) = slot.as_ref() {
                let mut buffer = hub.shared.lock();
                if !buffer.stopped && buffer.reader_failed.is_none() {
                    let id = LISTENER_IDS.fetch_add(1, Ordering::Relaxed);
                    let start_seq = buffer.next_seq();
                    buffer.cursors.insert(id, start_seq);
                    drop(buffer);
                    return Ok(AuditListener {
                        hub: hub.clone(),
                        id,
                        start_seq,
                        lost_at_start: hub.last_lost.load(Ordering::Relaxed),
                    });
                }
            }
            *slot = Some(Arc::new(AuditHub::start()?));
        }
    }

    /// True when this process had to enable kernel audit.
    pub fn enabled_audit(&self) -> bool {
        self.hub.enabled_by_us
    }

    /// A copy of the records received since this listener started (for
    /// diagnostics and tests).
    pub fn records(&self) -> Vec<AuditRecord> {
        self.hub
            .shared
            .lock()
            .since(self.start_seq)
            .cloned()
            .collect()
    }

    /// Send a marker through the kernel and wait for it to come back: after
    /// that, every record logged before the call has been received.
    fn sync(&self, control: &mut Control, deadline: Instant) -> Result<(), String> {
        let n = MARKER_COUNTER.fetch_add(1, Ordering::Relaxed);
        let marker = format!("{MARKER_PREFIX}{}-{n}", std::process::id());
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        {
            let mut buffer = self.hub.shared.lock();
            if let Some(why) = &buffer.reader_failed {
                return Err(format!("the audit reader stopped: {why}"));
            }
            buffer.marker_waiters.insert(marker.clone(), tx);
        }
        // The kernel overwrites the last byte with a NUL terminator
        // (audit_receive_msg), so send one.
        let mut payload = marker.clone().into_bytes();
        payload.push(0);
        let sent = control
            .request_ack("send a sync marker", AUDIT_TRUSTED_APP, &payload)
            .map_err(|e| e.to_string());
        let back = sent.and_then(|()| {
            rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .map_err(|_| {
                    "the sync marker did not come back in time: records may still be in flight"
                        .to_string()
                })
        });
        if back.is_err() {
            self.hub.shared.lock().marker_waiters.remove(&marker);
        }
        back
    }

    /// Everything the kernel denied the run whose stage-2 process (the one
    /// that called `landlock_restrict_self`) had pid `stage2_pid`. Call it
    /// once the run's processes are gone. `audit_session` is the run's audit
    /// session (started in stage 2); without it, seccomp records are matched
    /// on `stage2_pid` only (so children's are missed). Waits at most about
    /// `wait` in total for in-flight records.
    pub fn collect_for_run(
        &self,
        stage2_pid: u32,
        audit_session: Option<u32>,
        wait: Duration,
    ) -> RunDenials {
        let deadline = Instant::now() + wait;
        let mut control = Control::open();
        let synced = match &mut control {
            Ok(control) => self.sync(control, deadline),
            Err(e) => Err(e.to_string()),
        };
        let shared = &self.hub.shared;

        let domains = domains_of(shared.lock().since(self.start_seq), stage2_pid);
        // The deallocation record follows the last process's exit
        // asynchronously (the kernel frees the domain from a work queue).
        if !domains.is_empty() {
            shared.wait_until(deadline, |b| {
                domains.iter().all(|d| b.deallocated(*d).is_some())
            });
        }

        let buffer = shared.lock();
        let mut out = attribute_resolving(
            buffer.since(self.start_seq),
            stage2_pid,
            audit_session,
            &handle::dir_path,
        );
        if let Err(why) = synced {
            out.gaps.insert(0, why);
        }
        if buffer.dropped_through >= Some(self.start_seq) {
            out.gaps.push(format!(
                "audit records were dropped from the listener's buffer ({} so far)",
                buffer.dropped
            ));
        }
        if buffer.last_overrun_seq >= Some(self.start_seq) {
            out.gaps.push(format!(
                "the audit socket overflowed during the run ({} times so far)",
                buffer.overruns
            ));
        }
        if let Some(why) = &buffer.reader_failed {
            out.gaps.push(format!("the audit reader stopped: {why}"));
        }
        drop(buffer);

        match control.and_then(|mut c| c.status()) {
            Ok(s) => {
                self.hub.last_lost.store(s.lost, Ordering::Relaxed);
                if s.enabled == 0 {
                    out.gaps
                        .push("kernel audit was disabled during the run".into());
                } else if s.lost != self.lost_at_start {
                    out.gaps.push(format!(
                        "the kernel dropped audit records during the run (lost counter {} -> {})",
                        self.lost_at_start, s.lost
                    ));
                }
            }
            Err(e) => out.gaps.push(format!("cannot re-check audit status: {e}")),
        }
        out
    }
}

impl Drop for AuditListener {
    fn drop(&mut self) {
        let mut buffer = self.hub.shared.lock();
        buffer.cursors.remove(&self.id);
        buffer.prune();
    }
}

/// The kernel's denial count for `domain`, from its deallocation record.
fn deallocated_in<'a>(
    records: impl IntoIterator<Item = &'a AuditRecord>,
    domain: u64,
) -> Option<u64> {
    records.into_iter().find_map(|r| match r.body {
        RecordBody::LandlockDomain(LandlockDomain::Deallocated { domain: d, denials })
            if d == domain =>
        {
            Some(denials)
        }
        _ => None,
    })
}

/// The Landlock domains created by process `pid`.
fn domains_of<'a>(records: impl IntoIterator<Item = &'a AuditRecord>, pid: u32) -> BTreeSet<u64> {
    records
        .into_iter()
        .filter_map(|r| match r.body {
            RecordBody::LandlockDomain(LandlockDomain::Allocated { domain, pid: p, .. })
                if p == pid =>
            {
                Some(domain)
            }
            _ => None,
        })
        .collect()
}

/// Attribute buffered records to one run (the pure part of
/// [`AuditListener::collect_for_run`]):
/// - Landlock records of the domains stage 2 created, plus Landlock records
///   of any event whose `SYSCALL` record is in the run's audit session;
/// - seccomp denials of the run's session (or of `stage2_pid` without one).
///
/// The Landlock count is the kernel's deallocation count where present,
/// else the records seen, with a gap saying it is a lower bound.
#[cfg(test)]
fn attribute<'a, R>(records: R, stage2_pid: u32, audit_session: Option<u32>) -> RunDenials
where
    R: IntoIterator<Item = &'a AuditRecord>,
    R::IntoIter: Clone,
{
    attribute_resolving(records, stage2_pid, audit_session, &|_, _, _| None)
}

/// A directory's current path from its device (major, minor) and inode.
type ResolveDir<'r> = &'r dyn Fn(u32, u32, u64) -> Option<std::path::PathBuf>;

/// [`attribute`], naming directories known only by inode with `resolve`.
fn attribute_resolving<'a, R>(
    records: R,
    stage2_pid: u32,
    audit_session: Option<u32>,
    resolve: ResolveDir<'_>,
) -> RunDenials
where
    R: IntoIterator<Item = &'a AuditRecord>,
    R::IntoIter: Clone,
{
    let records = records.into_iter();
    let mut out = RunDenials::default();
    let domains = domains_of(records.clone(), stage2_pid);
    let session_events: BTreeSet<EventId> = match audit_session {
        Some(ses) => records
            .clone()
            .filter(|r| matches!(&r.body, RecordBody::Syscall(s) if s.ses == Some(ses)))
            .map(|r| r.event)
            .collect(),
        None => BTreeSet::new(),
    };
    let exe_of = |event: EventId| {
        records.clone().find_map(|r| match &r.body {
            RecordBody::Syscall(s) if r.event == event => s.exe.clone(),
            _ => None,
        })
    };
    let deallocated = |domain: u64| deallocated_in(records.clone(), domain);
    let mut records_per_domain: std::collections::BTreeMap<u64, u64> = Default::default();
    let mut other_domain_records = 0;
    for r in records.clone() {
        match &r.body {
            RecordBody::LandlockAccess(a)
                if domains.contains(&a.domain) || session_events.contains(&r.event) =>
            {
                if domains.contains(&a.domain) {
                    *records_per_domain.entry(a.domain).or_default() += 1;
                } else {
                    other_domain_records += 1;
                }
                let exe = exe_of(r.event);
                let path = a.object();
                for blocker in &a.blockers {
                    out.add(Denial {
                        access: blocker.clone(),
                        path: path.clone(),
                        exe: exe.clone(),
                    });
                }
            }
            RecordBody::Syscall(s) => {
                let label = s.key.as_deref().and_then(exit_rules::label_of);
                let (Some(label), Some(ses), Some(exit)) = (label, audit_session, s.exit) else {
                    continue;
                };
                if s.ses != Some(ses) || !exit_rules::watches(label, exit) {
                    continue;
                }
                out.syscall_exit_denials += 1;
                let name = s
                    .arch
                    .zip(s.syscall)
                    .and_then(|(arch, nr)| syscall_name(arch, nr))
                    .map(str::to_string)
                    .or_else(|| s.syscall.map(|n| n.to_string()))
                    .unwrap_or_else(|| "unknown".into());
                // A name relative to a directory descriptor (`rm -r`, `find
                // -delete` work that way) cannot be made absolute: audit
                // logs the working directory as its parent.
                let dirfd =
                    s.a0.filter(|_| DIRFD_FIRST.contains(&name.as_str()))
                        .map(|a0| a0 as u32 as i32)
                        .filter(|fd| *fd != libc::AT_FDCWD);
                out.add(Denial {
                    access: format!("{label}.{name}"),
                    path: path_of(records.clone(), r.event, dirfd, resolve),
                    exe: s.exe.clone(),
                });
            }
            RecordBody::Seccomp(s) if s.is_denial() => {
                let ours = match audit_session {
                    Some(ses) => s.ses == Some(ses),
                    None => s.pid == stage2_pid,
                };
                if ours {
                    out.seccomp_denials += 1;
                    out.add(Denial {
                        access: s.access(),
                        path: None,
                        exe: s.exe.clone(),
                    });
                }
            }
            _ => {}
        }
    }
    out.domains = domains.iter().copied().collect();
    out.landlock_count_final = domains.iter().all(|d| deallocated(*d).is_some());
    out.landlock_denials = other_domain_records
        + domains
            .iter()
            .map(|d| {
                deallocated(*d).unwrap_or_else(|| records_per_domain.get(d).copied().unwrap_or(0))
            })
            .sum::<u64>();
    if !out.landlock_count_final {
        out.gaps.push("a Landlock domain of the run was not released in time: its denial count is a lower bound".into());
    }
    out
}

/// The file an event's system call was refused on, from its `PATH`
/// records: the name created, deleted or acted on (not its parent
/// directory), made absolute with the event's `CWD`. A call on a file
/// descriptor has no name: its inode and device are given instead, and a
/// call with no `PATH` record at all (`ioctl`) has no path.
/// Calls whose first argument is a directory descriptor the name is
/// relative to.
const DIRFD_FIRST: &[&str] = &[
    "openat",
    "fchmodat",
    "fchmodat2",
    "fchownat",
    "futimesat",
    "utimensat",
    "unlinkat",
    "renameat",
    "renameat2",
    "mkdirat",
    "linkat",
    "mknodat",
    "setxattrat",
    "removexattrat",
    "file_setattr",
];

fn path_of<'a>(
    records: impl Iterator<Item = &'a AuditRecord>,
    event: EventId,
    dirfd: Option<i32>,
    resolve: ResolveDir<'_>,
) -> Option<String> {
    let mut cwd = None;
    let mut items: Vec<&PathRecord> = Vec::new();
    for r in records.filter(|r| r.event == event) {
        match &r.body {
            RecordBody::Cwd { cwd: c } => cwd = c.clone(),
            RecordBody::Path(p) => items.push(p),
            _ => {}
        }
    }
    let item = items
        .iter()
        .find(|p| p.nametype.as_deref() != Some("PARENT"))
        .or_else(|| items.first())?;
    if let Some(fd) = dirfd {
        let relative = item.name.as_deref().filter(|n| !n.starts_with('/'));
        if relative.is_some() || item.nametype.as_deref() == Some("PARENT") {
            // The directory the name is relative to is the PARENT item.
            let dir = items
                .iter()
                .find(|p| p.nametype.as_deref() == Some("PARENT"))
                .and_then(|p| {
                    let (major, minor) = p.dev.as_deref()?.split_once(':')?;
                    resolve(
                        u32::from_str_radix(major, 16).ok()?,
                        u32::from_str_radix(minor, 16).ok()?,
                        p.inode?,
                    )
                });
            if let Some(dir) = dir {
                return Some(match (item.nametype.as_deref(), relative) {
                    (Some("PARENT"), _) | (_, None) => dir.display().to_string(),
                    (_, Some(name)) => dir.join(name).display().to_string(),
                });
            }
            return Some(format!(
                "{} in the directory open as descriptor {fd} (inode {} on device {})",
                match (item.nametype.as_deref(), relative) {
                    (Some("PARENT"), _) | (_, None) => "an entry",
                    (_, Some(n)) => n,
                },
                item.inode.map_or("?".to_string(), |i| i.to_string()),
                item.dev.as_deref().unwrap_or("?")
            ));
        }
    }
    match (&item.name, &cwd) {
        (Some(name), _) if name.starts_with('/') => Some(name.clone()),
        (Some(name), Some(cwd)) => Some(format!("{}/{name}", cwd.trim_end_matches('/'))),
        (Some(name), None) => Some(name.clone()),
        (None, _) => Some(format!(
            "inode {} on device {}",
            item.inode.map_or("?".to_string(), |i| i.to_string()),
            item.dev.as_deref().unwrap_or("?")
        )),
    }
}

/// The reader thread: receive, check the sender is the kernel, parse, store.
/// It stops, closing the socket, after [`IDLE_STOP`] with no run listening.
fn read_loop(fd: OwnedFd, shared: &Shared) {
    // Audit records are at most MAX_AUDIT_MESSAGE_LENGTH (8970) bytes.
    let mut buf = vec![0u8; 64 * 1024];
    let mut idle_since: Option<Instant> = None;
    loop {
        match recvfrom::<NetlinkAddr>(fd.as_raw_fd(), &mut buf) {
            Ok((n, from)) => {
                let mut b = shared.lock();
                // Only the kernel (port id 0) may speak here; a root process
                // could otherwise multicast forged records.
                if from.map(|a| a.pid()) != Some(0) {
                    b.forged += 1;
                    continue;
                }
                let (Some(msg_type), Some(payload)) = (u16_at(&buf, 4), buf.get(NLMSG_HDRLEN..n))
                else {
                    b.unparsable += 1;
                    continue;
                };
                // One record per multicast datagram; take the whole payload
                // rather than trusting the length field (see decode_nlmsgs).
                let text = String::from_utf8_lossy(payload);
                match parse_record(msg_type, text.trim_end_matches(['\0', '\n'])) {
                    Ok(Some(record)) => {
                        let domain_record = matches!(record.body, RecordBody::LandlockDomain(_));
                        b.push(record);
                        // Only waits for a domain's release use the
                        // condition variable (markers wake their waiter
                        // directly): no herd of collectors per record.
                        if domain_record {
                            shared.changed.notify_all();
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        b.unparsable += 1;
                        tracing::debug!(error = %e, "unparsable audit record");
                    }
                }
            }
            Err(Errno::EAGAIN | Errno::EINTR) => {}
            Err(Errno::ENOBUFS) => {
                let mut b = shared.lock();
                b.overruns += 1;
                b.last_overrun_seq = Some(b.next_seq());
            }
            Err(e) => {
                shared.lock().fail(e.to_string());
                shared.changed.notify_all();
                tracing::error!(error = %e, "audit reader stopped");
                return;
            }
        }
        let mut b = shared.lock();
        if !b.cursors.is_empty() {
            idle_since = None;
        } else if idle_since.get_or_insert_with(Instant::now).elapsed() >= IDLE_STOP {
            b.stopped = true;
            return;
        }
    }
}

#[cfg(test)]
mod tests;
