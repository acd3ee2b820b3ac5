//! Stale services: processes that still map a file the run's packages
//! replaced or removed, so they run the old code until restarted (what
//! `needrestart` and `checkrestart` report).
//!
//! Read by hand from `/proc/PID/maps` and `/proc/PID/cgroup`: the two
//! formats are one line each, and the crates that parse them (`procfs`)
//! would bring a whole /proc model for two fields. The parsers are pure
//! functions over bytes, tested on fixtures below.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rollguard_shared::services::{
    ActionSource, PlannedAction, ServiceAction, StaleService, UnitName,
};

/// At most this many processes are reported: a replaced libc is mapped by
/// every process on the host, and the report must stay small. The units
/// are what matter, and they repeat.
pub const MAX_STALE_PROCESSES: usize = 256;
/// At most this many files are listed per process.
pub const MAX_FILES_PER_PROCESS: usize = 16;

/// The kernel's marker for a mapping whose file was unlinked.
const DELETED: &[u8] = b" (deleted)";

/// One file-backed line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub inode: u64,
    pub path: PathBuf,
    /// The kernel marked it ` (deleted)`: the file was unlinked.
    pub deleted: bool,
}

/// Parse one line of `/proc/PID/maps`:
/// `start-end perms offset major:minor inode   path`. `None` for
/// anonymous and pseudo mappings (`[heap]`, `[vdso]`, no path) and for
/// malformed lines.
///
/// The path is everything after the inode and the padding, spaces
/// included; the kernel escapes only a newline in it (as `\012`), which is
/// undone here.
pub fn parse_maps_line(line: &[u8]) -> Option<Mapping> {
    let mut rest = line;
    let mut fields = [&b""[..]; 5];
    for f in fields.iter_mut() {
        rest = trim_start(rest);
        let end = rest.iter().position(|&c| c == b' ').unwrap_or(rest.len());
        *f = &rest[..end];
        rest = &rest[end..];
    }
    let [range, _perms, _offset, dev, inode] = fields;
    if !range.contains(&b'-') || !dev.contains(&b':') {
        return None;
    }
    let inode: u64 = std::str::from_utf8(inode).ok()?.parse().ok()?;
    let path = trim_start(rest);
    if path.first() != Some(&b'/') || inode == 0 {
        return None;
    }
    let (path, deleted) = match path.strip_suffix(DELETED) {
        Some(p) => (p, true),
        None => (path, false),
    };
    Some(Mapping {
        inode,
        path: PathBuf::from(OsStr::from_bytes(&unescape_newline(path))),
        deleted,
    })
}

fn trim_start(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|&&c| c == b' ' || c == b'\t').count();
    &s[n..]
}

fn unescape_newline(p: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(p.len());
    let mut i = 0;
    while i < p.len() {
        if p[i..].starts_with(b"\\012") {
            out.push(b'\n');
            i += 4;
        } else {
            out.push(p[i]);
            i += 1;
        }
    }
    out
}

/// The system unit a process belongs to, from `/proc/PID/cgroup`: the
/// first `.service` component of its cgroup path in the unified (v2)
/// hierarchy (`0::/system.slice/postfix.service`), or else in the v1
/// `name=systemd` one. The first, because a user's services live beneath
/// `user@UID.service`, and that is the unit the host's systemd restarts.
/// `None` for processes outside any service (sessions: `session-3.scope`;
/// kernel threads).
pub fn unit_from_cgroup(content: &str) -> Option<UnitName> {
    let mut v1 = None;
    for line in content.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let unit = || {
            path.split('/')
                .find(|c| c.ends_with(".service"))
                .and_then(|c| UnitName::parse(c).ok())
        };
        if controllers.is_empty() {
            if let Some(u) = unit() {
                return Some(u);
            }
        } else if controllers.split(',').any(|c| c == "name=systemd") {
            v1 = unit();
        }
    }
    v1
}

/// What the replaced path is now, as the process sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Current {
    Inode(u64),
    /// No file there any more: the package removed it.
    Gone,
    /// Cannot tell (neither the process's view nor ours could be read).
    Unknown,
}

/// Whether `m`, a mapping of a replaced path, still holds the old file:
/// the kernel says it was unlinked, or the path is now another inode, or
/// is gone. When the current file cannot be looked at, only the kernel's
/// word counts: a guess would restart services for nothing.
///
/// Only inodes are compared, not devices: on overlayfs (containers) and
/// btrfs the device in `maps` is the underlying one and never equals
/// `stat`'s, which would make every mapping look stale.
fn holds_old_file(m: &Mapping, current: Current) -> bool {
    m.deleted
        || match current {
            Current::Inode(ino) => ino != m.inode,
            Current::Gone => true,
            Current::Unknown => false,
        }
}

/// The path's inode as process `dir` sees it: through its own root (a
/// service with its own mount namespace, a container), which needs
/// CAP_SYS_PTRACE for a process of another user; without it, as the
/// agent sees it (a service's view of /usr is the host's in practice).
fn current_inode(dir: &Path, path: &Path) -> Current {
    let rel = path.strip_prefix("/").unwrap_or(path);
    let lookup = |p: &Path| match std::fs::metadata(p) {
        Ok(md) => Some(Current::Inode(md.ino())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(Current::Gone),
        Err(_) => None,
    };
    lookup(&dir.join("root").join(rel))
        .or_else(|| lookup(path))
        .unwrap_or(Current::Unknown)
}

/// Scan the host's processes for mappings of `replaced` files that are
/// not the current ones. Processes that exit mid-scan, and those whose
/// files cannot be read, are skipped. Sorted by PID, at most
/// [`MAX_STALE_PROCESSES`].
pub fn scan(replaced: &BTreeSet<PathBuf>) -> Vec<StaleService> {
    scan_in(Path::new("/proc"), replaced)
}

/// [`scan`] over another procfs mount.
pub fn scan_in(proc: &Path, replaced: &BTreeSet<PathBuf>) -> Vec<StaleService> {
    if replaced.is_empty() {
        return Vec::new();
    }
    let entries = match std::fs::read_dir(proc) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(proc = %proc.display(), error = %e, "cannot list processes");
            return Vec::new();
        }
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    let mut out = Vec::new();
    let mut more = 0usize;
    for pid in pids {
        let Some(s) = scan_process(proc, pid, replaced) else {
            continue;
        };
        if out.len() < MAX_STALE_PROCESSES {
            out.push(s);
        } else {
            more += 1;
        }
    }
    if more > 0 {
        tracing::warn!(
            reported = out.len(),
            more,
            "more processes map replaced files than the report lists"
        );
    }
    out
}

fn scan_process(proc: &Path, pid: u32, replaced: &BTreeSet<PathBuf>) -> Option<StaleService> {
    let dir = proc.join(pid.to_string());
    // Gone (ENOENT, ESRCH) or not readable: nothing to say about it.
    let maps = std::fs::read(dir.join("maps")).ok()?;
    let mut files: BTreeSet<PathBuf> = BTreeSet::new();
    // The same file is mapped several times (text, data, ...): one stat
    // per path.
    let mut current: BTreeMap<PathBuf, Current> = BTreeMap::new();
    for line in maps.split(|&c| c == b'\n') {
        let Some(m) = parse_maps_line(line) else {
            continue;
        };
        if !replaced.contains(&m.path) {
            continue;
        }
        let cur = *current
            .entry(m.path.clone())
            .or_insert_with(|| current_inode(&dir, &m.path));
        if holds_old_file(&m, cur) {
            files.insert(m.path);
        }
    }
    if files.is_empty() {
        return None;
    }
    let unit = std::fs::read_to_string(dir.join("cgroup"))
        .ok()
        .and_then(|c| unit_from_cgroup(&c));
    // The exe link needs CAP_SYS_PTRACE for another user's process; its
    // argv[0] does not (and says what runs, if not where from).
    let exe = std::fs::read_link(dir.join("exe"))
        .map(|p| p.to_string_lossy().into_owned())
        .or_else(|_| {
            let cmdline = std::fs::read(dir.join("cmdline"))?;
            let argv0 = cmdline.split(|&c| c == 0).next().unwrap_or_default();
            Ok::<_, std::io::Error>(String::from_utf8_lossy(argv0).into_owned())
        })
        .unwrap_or_default();
    Some(StaleService {
        unit: unit.map(String::from),
        pid,
        exe,
        files: files
            .iter()
            .take(MAX_FILES_PER_PROCESS)
            .map(|p| p.to_string_lossy().into_owned())
            .collect(),
    })
}

/// A try-restart for each unit in `stale` that `allow` permits, one per
/// unit, sorted by name. Try-restart, not restart: a unit that stopped in
/// the meantime stays stopped. Never the agent's own units
/// ([`super::own_units`]): restarting one would kill the run that is
/// reporting (it is still listed as stale).
pub fn restart_plan(
    stale: &[StaleService],
    allow: &dyn Fn(&UnitName) -> bool,
) -> Vec<PlannedAction> {
    restart_plan_except(stale, allow, &super::own_units())
}

fn restart_plan_except(
    stale: &[StaleService],
    allow: &dyn Fn(&UnitName) -> bool,
    own: &[UnitName],
) -> Vec<PlannedAction> {
    let units: BTreeSet<UnitName> = stale
        .iter()
        .filter_map(|s| UnitName::parse(s.unit.as_deref()?).ok())
        .collect();
    units
        .into_iter()
        .filter(|u| {
            if own.contains(u) {
                tracing::warn!(unit = %u, "the agent's own unit maps replaced files; not restarting it");
                return false;
            }
            let ok = u.is_service() && allow(u);
            if !ok {
                tracing::info!(unit = %u, "stale, but not in [services] allow: not restarted");
            }
            ok
        })
        .map(|unit| PlannedAction {
            unit,
            action: ServiceAction::TryRestart,
            source: ActionSource::Stale,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines() {
        let m = parse_maps_line(
            b"7f2c1a200000-7f2c1a228000 r--p 00000000 fd:01 1315170                    /usr/lib/x86_64-linux-gnu/libc.so.6",
        )
        .unwrap();
        assert_eq!(m.inode, 1315170);
        assert_eq!(m.path, Path::new("/usr/lib/x86_64-linux-gnu/libc.so.6"));
        assert!(!m.deleted);

        let m = parse_maps_line(
            b"55d0c8a00000-55d0c8a02000 r-xp 00002000 00:2a 17 /opt/my app/bin/srv (deleted)",
        )
        .unwrap();
        assert_eq!(m.inode, 17);
        assert_eq!(m.path, Path::new("/opt/my app/bin/srv"));
        assert!(m.deleted);

        // Spaces at both ends of a name are the name's.
        let m = parse_maps_line(b"1000-2000 r--p 00000000 08:02 9   /srv/ odd name  ").unwrap();
        assert_eq!(m.path, Path::new("/srv/ odd name  "));

        let m = parse_maps_line(b"1000-2000 r--p 00000000 08:02 9 /srv/new\\012line (deleted)")
            .unwrap();
        assert_eq!(m.path, Path::new("/srv/new\nline"));
        assert!(m.deleted);

        for none in [
            &b"7ffd5a1e6000-7ffd5a207000 rw-p 00000000 00:00 0                          [stack]"[..],
            b"7f2c1a400000-7f2c1a401000 rw-p 00000000 00:00 0 ",
            b"ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0  [vsyscall]",
            b"",
            b"garbage",
            b"1000-2000 r--p 00000000 08:02 notanumber /x",
            b"1000-2000 r--p 00000000 08:02 5 relative/path",
        ] {
            assert_eq!(
                parse_maps_line(none),
                None,
                "{}",
                String::from_utf8_lossy(none)
            );
        }
        // A memfd is a file-backed mapping with a path-like name; it is
        // never in a replaced set, so it does no harm.
        let m = parse_maps_line(b"1000-2000 rw-s 00000000 00:01 1034 /memfd:wayland (deleted)")
            .unwrap();
        assert!(m.deleted);
    }

    #[test]
    fn cgroup_lines() {
        let u = |s: &str| unit_from_cgroup(s).map(String::from);
        // cgroup v2.
        assert_eq!(
            u("0::/system.slice/postfix.service\n").as_deref(),
            Some("postfix.service")
        );
        // A delegated subtree beneath the service.
        assert_eq!(
            u("0::/system.slice/rollguard-agent.service/runs/r1\n").as_deref(),
            Some("rollguard-agent.service")
        );
        // A user's services: the system unit is the user manager.
        assert_eq!(
            u("0::/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service\n")
                .as_deref(),
            Some("user@1000.service")
        );
        assert_eq!(u("0::/user.slice/user-1000.slice/session-3.scope\n"), None);
        assert_eq!(u("0::/\n"), None);
        // cgroup v1 (and hybrid without a unit in the v2 line).
        let v1 = "12:pids:/system.slice/dovecot.service\n\
                  5:cpu,cpuacct:/system.slice/dovecot.service\n\
                  1:name=systemd:/system.slice/dovecot.service\n\
                  0::/\n";
        assert_eq!(u(v1).as_deref(), Some("dovecot.service"));
        // Hybrid: the v2 line wins when it names a unit.
        let hybrid = "1:name=systemd:/system.slice/a.service\n0::/system.slice/b.service\n";
        assert_eq!(u(hybrid).as_deref(), Some("b.service"));
        // A container seen from the host.
        assert_eq!(
            u("0::/nspawn-x/payload/system.slice/php8.2-fpm.service\n").as_deref(),
            Some("php8.2-fpm.service")
        );
        // Only controller lines other than name=systemd: no unit.
        assert_eq!(u("4:memory:/system.slice/x.service\n"), None);
        // An invalid unit name is not a unit.
        assert_eq!(u("0::/system.slice/bad name.service\n"), None);
        assert_eq!(u(""), None);
        assert_eq!(u("garbage\n"), None);
    }

    #[test]
    fn the_old_file_is_a_deleted_or_different_inode() {
        let m = |inode, deleted| Mapping {
            inode,
            path: "/usr/sbin/x".into(),
            deleted,
        };
        use Current::*;
        assert!(holds_old_file(&m(5, true), Inode(5)));
        assert!(holds_old_file(&m(5, true), Unknown));
        assert!(holds_old_file(&m(5, false), Inode(6)));
        assert!(holds_old_file(&m(5, false), Gone));
        assert!(!holds_old_file(&m(5, false), Inode(5)));
        assert!(!holds_old_file(&m(5, false), Unknown));
    }

    #[test]
    fn restart_plan_is_one_try_restart_per_allowed_unit() {
        let s = |unit: Option<&str>, pid| StaleService {
            unit: unit.map(str::to_string),
            pid,
            exe: "/usr/sbin/x".into(),
            files: vec!["/usr/lib/libssl.so.3".into()],
        };
        let stale = [
            s(Some("postfix.service"), 10),
            s(Some("dovecot.service"), 11),
            s(Some("postfix.service"), 12),
            s(None, 13),
            s(Some("sshd.service"), 14),
            s(Some("rollguard-agent.service"), 15),
        ];
        let own = [UnitName::parse("rollguard-agent.service").unwrap()];
        let plan = restart_plan_except(&stale, &|u| u.as_str() != "sshd.service", &own);
        let units: Vec<_> = plan.iter().map(|p| p.unit.as_str()).collect();
        assert_eq!(units, ["dovecot.service", "postfix.service"]);
        assert!(plan
            .iter()
            .all(|p| p.action == ServiceAction::TryRestart && p.source == ActionSource::Stale));
    }

    /// On this machine's real /proc: this test process maps its own
    /// executable; while that file is unchanged it is not stale, and a set
    /// without it finds nothing.
    #[test]
    fn a_current_mapping_is_not_stale() {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let own = std::process::id();
        let found = scan(&BTreeSet::from([exe.clone()]));
        assert!(!found.iter().any(|s| s.pid == own), "{found:?}");
        assert!(scan(&BTreeSet::new()).is_empty());
    }
}
