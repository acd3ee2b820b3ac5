//! `/proc/self/mountinfo`, parsed into typed entries, and the question the
//! sandbox asks of it: where else is a protected path's data mounted?
//! The agent's one reader of the table: the cgroup hierarchies are found
//! through it too (`cgroup::cgroup2_mount`, `cgroup_limits`), so every
//! part reads escapes and fields alike, and strictly.
//!
//! A protected tree can be reachable through a second mount of the same
//! file system (a bind mount, or the whole volume mounted twice). Landlock
//! rules and scope checks are made on paths, so that second path would be
//! outside every protection: `rm -rf` beneath a delete scope that contains
//! such a mount deletes the protected data. Two mounts alias when they
//! share `major:minor` and one's root (the directory of the file system it
//! shows) contains the other's protected subtree, or lies within it.
//!
//! Format (proc(5)): `id parent major:minor root mount_point options
//! [optional fields...] - fstype source super_options`, with space, tab,
//! newline and backslash in paths written as octal escapes (`\040`).

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// One mount, as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub id: u32,
    pub parent: u32,
    pub major: u32,
    pub minor: u32,
    /// The directory of the file system this mount shows (`/` for a whole
    /// file system, `/srv/backup` for a bind mount of that directory).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`/`ro`, `nodev`, ...).
    pub options: Vec<String>,
    pub fstype: String,
    pub source: String,
    /// Per-superblock options (a cgroup v1 hierarchy's controllers are
    /// among them: `rw,cpu,cpuacct`).
    pub super_options: Vec<String>,
}

impl MountEntry {
    /// Writable as a mount (the file system itself may still be read-only).
    pub fn is_rw(&self) -> bool {
        self.options.iter().any(|o| o == "rw")
    }

    /// `mount 41 (/dev/vda:/srv/backup at /mnt/b)`, for messages.
    pub fn describe(&self) -> String {
        format!(
            "mount {} ({} {}:{} {} at {})",
            self.id,
            self.source,
            self.major,
            self.minor,
            self.root.display(),
            self.mount_point.display()
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MountinfoError {
    #[error("cannot read /proc/self/mountinfo: {0}")]
    Read(String),
    #[error("/proc/self/mountinfo line {line}: {why}")]
    Malformed { line: usize, why: &'static str },
}

/// Read and parse this process's mount table.
pub fn read_self() -> Result<Vec<MountEntry>, MountinfoError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| MountinfoError::Read(e.to_string()))?;
    parse(&text)
}

/// Parse the whole table. One malformed line fails the whole parse: a
/// mount we cannot read is a mount we cannot reason about.
pub fn parse(text: &str) -> Result<Vec<MountEntry>, MountinfoError> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| parse_line(l).map_err(|why| MountinfoError::Malformed { line: i + 1, why }))
        .collect()
}

fn parse_line(line: &str) -> Result<MountEntry, &'static str> {
    let mut f = line.split(' ');
    let mut next = |what| f.next().filter(|s| !s.is_empty()).ok_or(what);
    let id = next("mount id")?.parse().map_err(|_| "mount id")?;
    let parent = next("parent id")?.parse().map_err(|_| "parent id")?;
    let (major, minor) = next("major:minor")?
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .ok_or("major:minor")?;
    let root = unescape(next("root")?);
    let mount_point = unescape(next("mount point")?);
    let options = next("options")?.split(',').map(str::to_string).collect();
    // Optional fields up to the "-" separator.
    loop {
        if next("separator")? == "-" {
            break;
        }
    }
    let fstype = next("fstype")?.to_string();
    let source = next("source").map(str::to_string).unwrap_or_default();
    let super_options = next("super options")
        .map(|o| o.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    Ok(MountEntry {
        id,
        parent,
        major,
        minor,
        root,
        mount_point,
        options,
        fstype,
        source,
        super_options,
    })
}

/// Undo the kernel's octal escapes (`\040` for a space) in a path field.
fn unescape(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        // An escape only when it is a byte (the kernel writes `\ooo` of
        // one byte); anything else is kept as written.
        let byte = octal.and_then(|d| {
            u8::try_from(
                u32::from(d[0] - b'0') * 64 + u32::from(d[1] - b'0') * 8 + u32::from(d[2] - b'0'),
            )
            .ok()
        });
        match (b[i], byte) {
            (b'\\', Some(v)) => {
                out.push(v);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

/// The mount a path lies on: the entry with the longest mount point that
/// contains it, the last listed one when several are stacked (the kernel
/// lists a mount after the one it covers).
pub fn mount_of<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    let mut best: Option<&MountEntry> = None;
    for m in mounts.iter().filter(|m| path.starts_with(&m.mount_point)) {
        if best.is_none_or(|b| {
            m.mount_point.components().count() >= b.mount_point.components().count()
        }) {
            best = Some(m);
        }
    }
    best
}

/// Another mount through which (part of) a protected path's data is
/// reachable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alias {
    /// The protected path as configured.
    pub protected: PathBuf,
    /// The mount the protected path lies on.
    pub holder: MountEntry,
    /// The other mount of the same file system.
    pub alias: MountEntry,
    /// Where the protected data appears through `alias`.
    pub exposed_at: PathBuf,
}

impl std::fmt::Display for Alias {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} shows the protected path {} (on {}) at {}",
            self.alias.describe(),
            self.protected.display(),
            self.holder.describe(),
            self.exposed_at.display()
        )
    }
}

/// Every other mount of a file-system subtree that holds one of
/// `protected`. A mount beneath the protected path itself is not an alias
/// (it is hidden with the protected path).
pub fn aliases(mounts: &[MountEntry], protected: &[PathBuf]) -> Vec<Alias> {
    let mut out = Vec::new();
    for p in protected {
        let Some(holder) = mount_of(mounts, p) else {
            continue;
        };
        let Ok(rel) = p.strip_prefix(&holder.mount_point) else {
            continue;
        };
        // The protected subtree, as a path within its file system.
        let in_fs = holder.root.join(rel);
        for m in mounts {
            if m.id == holder.id || (m.major, m.minor) != (holder.major, holder.minor) {
                continue;
            }
            let exposed_at = if let Ok(below) = in_fs.strip_prefix(&m.root) {
                // (joining an empty path would add a trailing slash)
                if below.as_os_str().is_empty() {
                    m.mount_point.clone()
                } else {
                    m.mount_point.join(below)
                }
            } else if m.root.starts_with(&in_fs) {
                m.mount_point.clone()
            } else {
                continue;
            };
            if exposed_at.starts_with(p) {
                continue;
            }
            out.push(Alias {
                protected: p.clone(),
                holder: holder.clone(),
                alias: m.clone(),
                exposed_at,
            });
        }
    }
    out
}

/// The first alias that a write or delete scope reaches: its exposed path
/// lies at or beneath the scope, or the scope lies within it.
pub fn alias_in_scope<'a>(aliases: &'a [Alias], scope: &Path) -> Option<&'a Alias> {
    aliases
        .iter()
        .find(|a| a.exposed_at.starts_with(scope) || scope.starts_with(&a.exposed_at))
}

/// A write or delete scope that reaches another mount of protected data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("scope.{key} path {} contains another mount of protected data: {alias}", scope.display())]
pub struct AliasedScope {
    pub key: &'static str,
    pub scope: PathBuf,
    pub alias: Box<Alias>,
}

/// The agent's check before a run: no write or delete scope may contain
/// (or lie within) another mount of a protected path's data, in `mounts`
/// (the agent's own mount table, which stage 2's namespace copies).
pub fn check_scopes<'a>(
    mounts: &[MountEntry],
    protected: &[PathBuf],
    scopes: impl IntoIterator<Item = (&'static str, &'a Path)>,
) -> Result<(), AliasedScope> {
    let aliases = aliases(mounts, protected);
    if aliases.is_empty() {
        return Ok(());
    }
    for (key, scope) in scopes {
        // Symlinks resolved where possible, as the policy's own check does.
        let real = std::fs::canonicalize(scope).unwrap_or_else(|_| scope.to_path_buf());
        for path in [scope, real.as_path()] {
            if let Some(alias) = alias_in_scope(&aliases, path) {
                return Err(AliasedScope {
                    key,
                    scope: scope.to_path_buf(),
                    alias: Box::new(alias.clone()),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
22 27 0:21 / /proc rw,relatime - proc proc rw
60 27 254:0 /srv/backup /mnt/b rw,relatime shared:1 master:2 - ext4 /dev/vda rw
61 27 254:0 / /mnt/whole ro,relatime - ext4 /dev/vda rw
62 27 254:0 /srv/backup/daily /var/spool/tmp/d rw - ext4 /dev/vda rw
63 27 0:40 / /srv/backup/extra rw - tmpfs tmpfs rw
64 27 254:0 /home /mnt/with\\040space rw - ext4 /dev/vda rw
65 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:9 master:3 - cgroup  rw,cpu,cpuacct
";

    #[test]
    fn parses_fields_and_escapes() {
        let m = parse(TABLE).unwrap();
        assert_eq!(m.len(), 8);
        assert_eq!(m[2].id, 60);
        assert_eq!(m[2].root, PathBuf::from("/srv/backup"));
        assert_eq!(m[2].mount_point, PathBuf::from("/mnt/b"));
        assert_eq!((m[2].major, m[2].minor), (254, 0));
        assert_eq!(m[2].fstype, "ext4");
        assert!(m[2].is_rw());
        assert!(!m[3].is_rw());
        assert_eq!(m[6].mount_point, PathBuf::from("/mnt/with space"));
        // Optional fields skipped, an empty source, the superblock options
        // (a cgroup v1 hierarchy's controllers).
        assert_eq!(m[7].fstype, "cgroup");
        assert_eq!(m[7].source, "");
        assert_eq!(m[7].super_options, ["rw", "cpu", "cpuacct"]);
        assert_eq!(
            m[7].mount_point,
            PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")
        );
        // An octal escape beyond a byte is not one: kept as written.
        assert_eq!(unescape("/a\\777b"), PathBuf::from("/a\\777b"));
        assert_eq!(unescape("/a\\134b"), PathBuf::from("/a\\b"));
        assert!(parse("27 1 x / / rw - ext4 a rw").is_err());
        assert!(parse("27 1 1:2 / / rw").is_err());
    }

    #[test]
    fn finds_every_other_mount_of_a_protected_subtree() {
        let m = parse(TABLE).unwrap();
        let a = aliases(&m, &[PathBuf::from("/srv/backup")]);
        let at: Vec<_> = a
            .iter()
            .map(|a| (a.alias.id, a.exposed_at.clone()))
            .collect();
        assert_eq!(
            at,
            vec![
                (60, PathBuf::from("/mnt/b")),
                (61, PathBuf::from("/mnt/whole/srv/backup")),
                (62, PathBuf::from("/var/spool/tmp/d")),
            ]
        );
        assert_eq!(
            alias_in_scope(&a, Path::new("/var/spool/tmp")).map(|a| a.alias.id),
            Some(62)
        );
        assert_eq!(
            alias_in_scope(&a, Path::new("/mnt/b/x")).map(|a| a.alias.id),
            Some(60)
        );
        assert!(alias_in_scope(&a, Path::new("/etc")).is_none());
        let protected = [PathBuf::from("/srv/backup")];
        let err = check_scopes(&m, &protected, [("delete", Path::new("/var/spool/tmp"))])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/var/spool/tmp/d") && err.contains("mount 62"),
            "{err}"
        );
        assert!(
            err.contains("protected path /srv/backup") && err.contains("mount 27"),
            "{err}"
        );
        assert!(check_scopes(&m, &protected, [("write", Path::new("/etc"))]).is_ok());
        // A path on another file system has no alias.
        assert!(aliases(&m, &[PathBuf::from("/srv/backup/extra/x")]).is_empty());
    }
}
