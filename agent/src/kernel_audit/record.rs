//! Parsing the text of kernel audit records into typed values.
//!
//! A record arrives as one netlink message: the type in the header and a
//! text body `audit(<secs>.<millis>:<serial>): key=value key=value …`.
//! Formats checked against the kernel source:
//!
//! - `AUDIT_LANDLOCK_ACCESS` (1423), security/landlock/audit.c
//!   `landlock_log_denial` + security/lsm_audit.c `audit_log_lsm_data`:
//!   `domain=%llx blockers=<a>[,<b>…]` then the object: ` path=… dev=… ino=…`
//!   (files), ` name=… dev=… ino=…` (dentries), ` opid=%d ocomm=…` (signals),
//!   ` saddr=… src=… daddr=… dest=…` (network; address/port omitted when zero).
//! - `AUDIT_LANDLOCK_DOMAIN` (1424), `log_domain` / `landlock_log_drop_domain`:
//!   `domain=%llx status=allocated mode=enforcing pid=%d uid=%u exe=… comm=…`
//!   and `domain=%llx status=deallocated denials=%llu`.
//! - `AUDIT_SECCOMP` (1326), kernel/auditsc.c `audit_seccomp` + `audit_log_task`:
//!   `auid=%u uid=%u gid=%u ses=%u[ subj=…] pid=%d comm=… exe=… sig=%ld
//!   arch=%x syscall=%ld compat=%d ip=0x%lx code=0x%x`.
//! - `AUDIT_SYSCALL` (1300): the syscall record of the same event, emitted
//!   at syscall exit for processes that have an audit context, for `exe`
//!   and `ses`; and, for events our own syscall-exit rules asked for
//!   ([`super::exit_rules`]), `arch`, `syscall`, `exit` and `key`.
//! - `AUDIT_CWD` (1307) `cwd=…` and `AUDIT_PATH` (1302) `item=%d name=…
//!   inode=… dev=… … nametype=…`, kernel/auditsc.c `audit_log_exit` /
//!   `audit_log_name`: the names the call looked up (`name=(null)` for a
//!   call on a file descriptor).
//!
//! Strings that come from userspace (paths, `comm`, `exe`, device names)
//! are written by `audit_log_untrustedstring`: in double quotes when they
//! contain only printable ASCII other than `"` and space, otherwise as
//! unquoted upper-case hex of the raw bytes. [`untrusted`] decodes both.
//!
//! The parser takes untrusted input (any process can put odd bytes into a
//! path or `comm`) and must never panic: it returns `None`/errors instead,
//! and a property test feeds it arbitrary text.

/// Record types we use (include/uapi/linux/audit.h).
pub const AUDIT_SYSCALL: u16 = 1300;
/// A path a system call looked up (one per name, `item=` numbered).
pub const AUDIT_PATH: u16 = 1302;
/// The working directory of the process, for relative `PATH` names.
pub const AUDIT_CWD: u16 = 1307;
pub const AUDIT_SECCOMP: u16 = 1326;
pub const AUDIT_LANDLOCK_ACCESS: u16 = 1423;
pub const AUDIT_LANDLOCK_DOMAIN: u16 = 1424;
/// `AUDIT_TRUSTED_APP`, in the user-message range 1100-1199: the type of
/// the synchronization markers the listener sends itself.
pub const AUDIT_TRUSTED_APP: u16 = 1121;

/// `(unsigned int)-1`: the value of an unset login uid or session id.
pub const AUDIT_UNSET: u32 = u32::MAX;

/// Identifies an audit event: all records of one event share it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId {
    pub secs: u64,
    pub millis: u32,
    pub serial: u64,
}

/// One parsed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub event: EventId,
    pub body: RecordBody,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordBody {
    LandlockAccess(LandlockAccess),
    LandlockDomain(LandlockDomain),
    Seccomp(SeccompRecord),
    Syscall(SyscallRecord),
    Path(PathRecord),
    Cwd {
        cwd: Option<String>,
    },
    /// A userspace message (`msg='…'`), used for synchronization markers.
    User {
        msg: Option<String>,
    },
}

/// A request a Landlock domain denied.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LandlockAccess {
    pub domain: u64,
    /// E.g. `fs.remove_file`, `net.connect_tcp`, `scope.signal`.
    pub blockers: Vec<String>,
    pub path: Option<String>,
    pub name: Option<String>,
    pub dev: Option<String>,
    pub ino: Option<u64>,
    pub saddr: Option<String>,
    pub src: Option<u16>,
    pub daddr: Option<String>,
    pub dest: Option<u16>,
    pub opid: Option<u32>,
    pub ocomm: Option<String>,
}

impl LandlockAccess {
    /// The object of the denial as one string for a report: a path, a
    /// network endpoint, or a signalled process.
    pub fn object(&self) -> Option<String> {
        if let Some(p) = self.path.as_ref().or(self.name.as_ref()) {
            return Some(p.clone());
        }
        let endpoint = |addr: &Option<String>, port: Option<u16>| -> Option<String> {
            let host = match addr {
                Some(a) if a.contains(':') => format!("[{a}]"),
                Some(a) => a.clone(),
                None => "*".to_string(),
            };
            match (addr, port) {
                (None, None) => None,
                (_, Some(p)) => Some(format!("{host}:{p}")),
                (Some(_), None) => Some(host),
            }
        };
        if let Some(e) = endpoint(&self.daddr, self.dest) {
            return Some(e);
        }
        if let Some(e) = endpoint(&self.saddr, self.src) {
            return Some(e);
        }
        match (self.opid, &self.ocomm) {
            (Some(pid), Some(comm)) => Some(format!("pid {pid} ({comm})")),
            (Some(pid), None) => Some(format!("pid {pid}")),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LandlockDomain {
    /// Logged with the first logged denial of a domain; describes the
    /// process that called `landlock_restrict_self`.
    Allocated {
        domain: u64,
        mode: Option<String>,
        pid: u32,
        uid: Option<u32>,
        exe: Option<String>,
        comm: Option<String>,
    },
    /// Logged when the domain is freed (its last process is gone);
    /// `denials` counts every denial, logged or not.
    Deallocated { domain: u64, denials: u64 },
}

/// A seccomp verdict that the kernel logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeccompRecord {
    pub auid: Option<u32>,
    pub uid: Option<u32>,
    /// Audit session, `None` when unset.
    pub ses: Option<u32>,
    pub pid: u32,
    pub comm: Option<String>,
    pub exe: Option<String>,
    pub sig: i64,
    pub arch: u32,
    pub syscall: u64,
    pub compat: bool,
    /// The filter's return value (`SECCOMP_RET_*` action | data).
    pub code: u32,
}

/// What a seccomp filter decided (`code & SECCOMP_RET_ACTION_FULL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeccompAction {
    KillProcess,
    KillThread,
    Trap,
    Errno(u16),
    UserNotif,
    Trace,
    /// Allowed, but logged.
    Log,
    Allow,
    Unknown(u32),
}

impl SeccompRecord {
    pub fn action(&self) -> SeccompAction {
        // include/uapi/linux/seccomp.h
        match self.code & 0xffff_0000 {
            0x8000_0000 => SeccompAction::KillProcess,
            0x0000_0000 => SeccompAction::KillThread,
            0x0003_0000 => SeccompAction::Trap,
            0x0005_0000 => SeccompAction::Errno((self.code & 0xffff) as u16),
            0x7fc0_0000 => SeccompAction::UserNotif,
            0x7ff0_0000 => SeccompAction::Trace,
            0x7ffc_0000 => SeccompAction::Log,
            0x7fff_0000 => SeccompAction::Allow,
            other => SeccompAction::Unknown(other),
        }
    }

    /// True when the call did not go through (everything but `LOG`/`ALLOW`;
    /// a user-notification or trace handler may still have allowed it, but
    /// the sandbox does not use those, so treat them as denials).
    pub fn is_denial(&self) -> bool {
        !matches!(self.action(), SeccompAction::Log | SeccompAction::Allow)
    }

    /// `syscall.<name>`, or `syscall.<nr>` when the number is not in our
    /// tables (another architecture, a compat call, a new syscall).
    pub fn access(&self) -> String {
        let name = if self.compat {
            None
        } else {
            super::syscalls::syscall_name(self.arch, self.syscall)
        };
        match name {
            Some(n) => format!("syscall.{n}"),
            None => format!("syscall.{}", self.syscall),
        }
    }
}

/// The parts of a `SYSCALL` record we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyscallRecord {
    pub pid: Option<u32>,
    pub ses: Option<u32>,
    pub exe: Option<String>,
    pub comm: Option<String>,
    pub arch: Option<u32>,
    pub syscall: Option<u64>,
    /// The return value (`-30` for `EROFS`).
    pub exit: Option<i64>,
    /// The key of the audit rule that asked for the record, if any.
    pub key: Option<String>,
    /// The first argument (a directory descriptor for the `*at` calls).
    pub a0: Option<u64>,
}

/// One name a system call looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathRecord {
    pub item: u32,
    /// As the process passed it (relative to `AUDIT_CWD` when relative);
    /// `None` for a call on a file descriptor.
    pub name: Option<String>,
    pub inode: Option<u64>,
    pub dev: Option<String>,
    /// `NORMAL`, `PARENT`, `CREATE`, `DELETE`, `UNKNOWN`.
    pub nametype: Option<String>,
}

/// Why a record could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditRecordError {
    #[error("record has no audit(...) header")]
    NoHeader,
    #[error("record type {0}: field {1} is missing or malformed")]
    Field(u16, &'static str),
}

/// Parse one record. `Ok(None)` for record types we do not use.
pub fn parse_record(msg_type: u16, text: &str) -> Result<Option<AuditRecord>, AuditRecordError> {
    if !matches!(
        msg_type,
        AUDIT_SYSCALL
            | AUDIT_PATH
            | AUDIT_CWD
            | AUDIT_SECCOMP
            | AUDIT_LANDLOCK_ACCESS
            | AUDIT_LANDLOCK_DOMAIN
            | AUDIT_TRUSTED_APP
    ) {
        return Ok(None);
    }
    let (event, rest) = parse_header(text).ok_or(AuditRecordError::NoHeader)?;
    let f = Fields::parse(rest);
    let missing = |name| AuditRecordError::Field(msg_type, name);
    let body = match msg_type {
        AUDIT_LANDLOCK_ACCESS => RecordBody::LandlockAccess(LandlockAccess {
            domain: f.hex_u64("domain").ok_or(missing("domain"))?,
            blockers: f
                .raw("blockers")
                .ok_or(missing("blockers"))?
                .split(',')
                .filter(|b| !b.is_empty())
                .map(str::to_string)
                .collect(),
            path: f.untrusted("path"),
            name: f.untrusted("name"),
            dev: f.untrusted("dev"),
            ino: f.dec("ino"),
            saddr: f.raw("saddr").map(str::to_string),
            src: f.dec("src"),
            daddr: f.raw("daddr").map(str::to_string),
            dest: f.dec("dest"),
            opid: f.dec("opid"),
            ocomm: f.untrusted("ocomm"),
        }),
        AUDIT_LANDLOCK_DOMAIN => {
            let domain = f.hex_u64("domain").ok_or(missing("domain"))?;
            match f.raw("status") {
                Some("allocated") => RecordBody::LandlockDomain(LandlockDomain::Allocated {
                    domain,
                    mode: f.raw("mode").map(str::to_string),
                    pid: f.dec("pid").ok_or(missing("pid"))?,
                    uid: f.dec("uid"),
                    exe: f.untrusted("exe"),
                    comm: f.untrusted("comm"),
                }),
                Some("deallocated") => RecordBody::LandlockDomain(LandlockDomain::Deallocated {
                    domain,
                    denials: f.dec("denials").ok_or(missing("denials"))?,
                }),
                _ => return Err(missing("status")),
            }
        }
        AUDIT_SECCOMP => RecordBody::Seccomp(SeccompRecord {
            auid: f.id("auid"),
            uid: f.id("uid"),
            ses: f.id("ses"),
            pid: f.dec("pid").ok_or(missing("pid"))?,
            comm: f.untrusted("comm"),
            exe: f.untrusted("exe"),
            sig: f.dec("sig").unwrap_or(0),
            arch: f
                .raw("arch")
                .and_then(|a| u32::from_str_radix(a, 16).ok())
                .ok_or(missing("arch"))?,
            syscall: f.dec("syscall").ok_or(missing("syscall"))?,
            compat: f.dec::<u8>("compat").is_some_and(|c| c != 0),
            code: f
                .raw("code")
                .and_then(parse_0x_u32)
                .ok_or(missing("code"))?,
        }),
        AUDIT_SYSCALL => RecordBody::Syscall(SyscallRecord {
            pid: f.dec("pid"),
            ses: f.id("ses"),
            exe: f.untrusted("exe"),
            comm: f.untrusted("comm"),
            arch: f.raw("arch").and_then(|a| u32::from_str_radix(a, 16).ok()),
            syscall: f.dec("syscall"),
            exit: f.dec("exit"),
            key: f.untrusted("key"),
            a0: f.raw("a0").and_then(|a| u64::from_str_radix(a, 16).ok()),
        }),
        AUDIT_PATH => RecordBody::Path(PathRecord {
            item: f.dec("item").ok_or(missing("item"))?,
            name: f.untrusted("name"),
            inode: f.dec("inode"),
            dev: f.raw("dev").map(str::to_string),
            nametype: f.raw("nametype").map(str::to_string),
        }),
        AUDIT_CWD => RecordBody::Cwd {
            cwd: f.untrusted("cwd"),
        },
        _ => RecordBody::User {
            msg: f.untrusted("msg"),
        },
    };
    Ok(Some(AuditRecord { event, body }))
}

/// `audit(1729738800.268:30): rest` → event id and `rest`.
fn parse_header(text: &str) -> Option<(EventId, &str)> {
    let text = text.trim_start();
    let inner_start = text.strip_prefix("audit(")?;
    let close = inner_start.find("):")?;
    let inner = &inner_start[..close];
    let rest = &inner_start[close + 2..];
    let (time, serial) = inner.split_once(':')?;
    let (secs, millis) = time.split_once('.')?;
    Some((
        EventId {
            secs: secs.parse().ok()?,
            millis: millis.parse().ok()?,
            serial: serial.parse().ok()?,
        },
        rest,
    ))
}

fn parse_0x_u32(s: &str) -> Option<u32> {
    u32::from_str_radix(s.strip_prefix("0x")?, 16).ok()
}

/// What separates fields (the kernel uses spaces; NULs and newlines appear
/// as padding at the end of some records).
const SEPARATORS: [char; 4] = [' ', '\n', '\t', '\0'];

/// A value as written in the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Value<'a> {
    /// Between double (or, for `msg=`, single) quotes.
    Quoted(&'a str),
    Bare(&'a str),
}

/// The `key=value` fields of a record body, in order. Later duplicates are
/// ignored: the first occurrence is the kernel's own field (a bundle can
/// only influence the *values* of untrusted strings, which cannot contain
/// spaces or quotes unencoded, so it cannot inject a field).
struct Fields<'a>(Vec<(&'a str, Value<'a>)>);

impl<'a> Fields<'a> {
    fn parse(body: &'a str) -> Self {
        let mut out = Vec::new();
        let mut rest = body;
        loop {
            rest = rest.trim_start_matches(SEPARATORS);
            if rest.is_empty() {
                break;
            }
            let token_end = rest.find(SEPARATORS).unwrap_or(rest.len());
            let Some(eq) = rest[..token_end].find('=') else {
                // Not a key=value token (free text): skip it.
                rest = &rest[token_end..];
                continue;
            };
            let key = &rest[..eq];
            let after = &rest[eq + 1..];
            let quote = after.chars().next().filter(|c| *c == '"' || *c == '\'');
            let (value, remaining) = match quote {
                Some(q) => match after[1..].find(q) {
                    Some(end) => (Value::Quoted(&after[1..1 + end]), &after[1 + end + 1..]),
                    // Unterminated quote: take the rest as the value.
                    None => (Value::Quoted(&after[1..]), ""),
                },
                None => {
                    let end = after.find(SEPARATORS).unwrap_or(after.len());
                    (Value::Bare(&after[..end]), &after[end..])
                }
            };
            out.push((key, value));
            rest = remaining;
        }
        Fields(out)
    }

    fn get(&self, key: &str) -> Option<Value<'a>> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    /// The value exactly as written (quoted or not).
    fn raw(&self, key: &str) -> Option<&'a str> {
        self.get(key).map(|v| match v {
            Value::Quoted(s) | Value::Bare(s) => s,
        })
    }

    fn dec<T: std::str::FromStr>(&self, key: &str) -> Option<T> {
        self.raw(key)?.parse().ok()
    }

    fn hex_u64(&self, key: &str) -> Option<u64> {
        u64::from_str_radix(self.raw(key)?, 16).ok()
    }

    /// A login uid or session id; `None` when unset (4294967295).
    fn id(&self, key: &str) -> Option<u32> {
        self.dec::<u32>(key).filter(|v| *v != AUDIT_UNSET)
    }

    fn untrusted(&self, key: &str) -> Option<String> {
        untrusted(self.get(key)?)
    }
}

/// Decode a string logged by `audit_log_untrustedstring` (or `_n_hex`):
/// quoted text as is; unquoted upper-case hex as the bytes it encodes;
/// `(null)` as absent; anything else (`<too_long>`, `?`) as written. An
/// abstract UNIX socket name (leading NUL) is shown as `@name`.
fn untrusted(v: Value<'_>) -> Option<String> {
    match v {
        Value::Quoted(s) => Some(s.to_string()),
        Value::Bare("(null)") | Value::Bare("") => None,
        Value::Bare(s) => {
            let is_hex = s.len() % 2 == 0
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b));
            match hex::decode(s) {
                Ok(bytes) if is_hex => {
                    let text = String::from_utf8_lossy(&bytes).into_owned();
                    Some(match text.strip_prefix('\0') {
                        Some(abstract_name) => format!("@{}", abstract_name.trim_end_matches('\0')),
                        None => text,
                    })
                }
                _ => Some(s.to_string()),
            }
        }
    }
}

#[cfg(test)]
mod tests;
