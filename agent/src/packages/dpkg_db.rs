//! dpkg's database read directly: the `status` file and the packages'
//! `info/NAME.list` files, for the snapshot before and after a run.
//!
//! Why not `dpkg-query`: it parses the whole database (status, available,
//! diversions, triggers) in a process of its own, about 8 ms of CPU per
//! call here, and the snapshot needed three calls, a fifth of an
//! install's added cost (docs/sandbox.md, "Cost of a package install").
//! Reading the two files we need costs well under a millisecond.
//!
//! Why this is still what dpkg-query would say, and what happens when it
//! might not be:
//! - dpkg replaces `status` atomically (a new file renamed over it), so
//!   one read sees one consistent version of it;
//! - dpkg records changes not yet folded into `status` as journal files
//!   in `updates/` (names of digits), which dpkg-query applies on top. We
//!   do not: if `updates/` holds anything but dpkg's own temporary file,
//!   before or after `status` is read, [`lookup`] returns
//!   [`DbError::Journal`] and, before the run, the caller asks dpkg-query
//!   instead (after it, the packages' state is unknown and the run fails:
//!   dpkg-query would run as root outside the sandbox on a database, and
//!   where the scope holds them with a program and libraries, the run
//!   could have changed);
//! - the parser is strict (see [`parse`]): anything it does not expect is
//!   an error, handled the same way. So are instances of one package
//!   (Multi-Arch: same) at different versions or states, where "the"
//!   version is not one line; a state dpkg does not write; a version that
//!   is not 1-128 printable characters (the report and the run log carry
//!   it).
//!
//! Hostile input: during a run the bundle may write anything into the
//! database (it is in the derived write scope), including a symlink or a
//! FIFO in place of `status`, `updates/` or `info/`. Every path is opened
//! with no symlink resolution (`openat2(RESOLVE_NO_SYMLINKS)`, or the
//! same walk by hand where the agent's unit refuses `openat2`:
//! `no_symlinks`), so no component of it may be a
//! symlink (before a run, a host whose database is reached through one is
//! read with dpkg-query), files without blocking (`O_NONBLOCK`, `O_NOCTTY`); they
//! must be regular files and are read up to a bound; the parser's work is
//! linear in the input (n log n for a paragraph's field names); no content
//! of them goes into an error message, and what goes into the report is
//! bounded (a version of at most 128 printable characters, a state of
//! dpkg's own). The worst a forged database can do is make the report's versions
//! wrong (or unknown), which it could do to dpkg-query's answer too.
//!
//! A small parser rather than a deb822 crate: we need four fields of a
//! few paragraphs, must reject rather than repair anything unusual, and
//! read bytes (descriptions in `status`
//! need not be UTF-8).

use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::OFlags;

/// Largest `status` or `.list` file read (a big Debian host's `status` is
/// about 10 MB); beyond it, dpkg-query answers.
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// The name dpkg writes a journal entry under before renaming it to its
/// number; alone it is not a pending change.
pub const JOURNAL_TMP: &str = "tmp.i";
/// Longest file name of a list (the file system's limit).
const MAX_NAME_BYTES: usize = 255;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DbError {
    #[error("{0}: {1}")]
    Io(PathBuf, String),
    #[error("{0}: does not exist")]
    Missing(PathBuf),
    #[error("{0}: not a regular file")]
    NotRegular(PathBuf),
    #[error("{0}: larger than {MAX_FILE_BYTES} bytes")]
    TooLarge(PathBuf),
    #[error("dpkg's journal ({0}) holds changes not yet in the status file")]
    Journal(PathBuf),
    #[error("dpkg's journal ({0}) holds an entry dpkg does not write (only digits name its entries): remove it")]
    ForeignJournalEntry(PathBuf),
    #[error("status file line {0}: {1}")]
    Syntax(usize, &'static str),
    #[error("package {0}: {1}")]
    Ambiguous(String, &'static str),
}

/// One package as `status` has it: an instance whose state is neither
/// `not-installed` nor `config-files` (dpkg-query's "installed" in the
/// sense the report uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub version: String,
    /// dpkg's state word when it is not `installed` (`half-configured`,
    /// `unpacked`...).
    pub state: Option<String>,
    /// Its file list, `info/NAME.list` or `info/NAME:ARCH.list` for a
    /// `Multi-Arch: same` package (dpkg's naming).
    pub list: PathBuf,
}

/// The packages `names` as `ADMINDIR/status` has them, in the same order:
/// `None` for a package not installed.
pub fn lookup(admindir: &Path, names: &[&str]) -> Result<Vec<Option<Found>>, DbError> {
    lookup_all(admindir, names).map(|db| db.packages)
}

/// What the agent reads of the database: the packages asked for, and the
/// packages whose triggers are pending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    /// The packages asked for, in order; `None`: not installed.
    pub packages: Vec<Option<Found>>,
    /// Packages in dpkg's state `triggers-pending` (a trigger they are
    /// interested in was activated and has not run), sorted, at most
    /// [`MAX_TRIGGERS_PENDING`], names of other forms left out.
    pub triggers_pending: Vec<String>,
}

/// [`lookup`], and the packages whose triggers are pending.
pub fn lookup_all(admindir: &Path, names: &[&str]) -> Result<Lookup, DbError> {
    let updates = admindir.join("updates");
    journal_empty(&updates)?;
    let status = read_bounded(&admindir.join("status"))?;
    // dpkg may have journaled a change meanwhile (and not yet folded it
    // into the status file we read).
    journal_empty(&updates)?;
    find(&status, admindir, names)
}

/// [`lookup_all`] on the status file's bytes `status` (a preview's
/// database, read from its layers; see [`crate::preview::read_file`]),
/// `admindir` naming their file lists. The journal is the caller's to
/// check.
pub fn lookup_status(status: &[u8], admindir: &Path, names: &[&str]) -> Result<Lookup, DbError> {
    find(status, admindir, names)
}

/// dpkg's state of a package whose triggers are pending.
const TRIGGERS_PENDING: &[u8] = b"triggers-pending";
/// Most packages listed as having triggers pending (the rest are not
/// named: a forged status file must not make the report large).
pub const MAX_TRIGGERS_PENDING: usize = 64;

/// dpkg's package states other than `not-installed` and `config-files`
/// (`dpkg-query(1)`, "Package states"): the package is there, fully or
/// not. Any other word is not dpkg's.
pub const INSTALLED_STATES: [&str; 6] = [
    "installed",
    "half-installed",
    "unpacked",
    "half-configured",
    "triggers-awaited",
    "triggers-pending",
];

/// A version as the report and the run log may carry it: 1-128 printable
/// ASCII characters, no space. Every Debian and rpm version fits (rpm's
/// `^`, and the looser versions dpkg accepts with a warning, included),
/// and no forged one can be large.
pub fn is_plain_version(version: &str) -> bool {
    (1..=MAX_VERSION_BYTES).contains(&version.len())
        && version.bytes().all(|b| b.is_ascii_graphic())
}

/// The longest version [`is_plain_version`] accepts (a manifest's may be
/// as long: `PackageToken`).
pub const MAX_VERSION_BYTES: usize = 128;

/// A package name as dpkg makes them (`[a-z0-9][a-z0-9+.-]*`, at most 128
/// bytes; upper case and `_` tolerated, as `found` does).
fn is_package_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name[0].is_ascii_alphanumeric()
        && name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"+-._".contains(b))
}

fn find(status: &[u8], admindir: &Path, names: &[&str]) -> Result<Lookup, DbError> {
    // The pending packages' names are collected as the parse goes, at most
    // MAX_TRIGGERS_PENDING of them and only plain package names: the file
    // may be the bundle's, and the list goes into the report.
    let pending: std::cell::RefCell<std::collections::BTreeSet<String>> = Default::default();
    let paragraphs = parse(status, &|p| {
        let is_pending = p
            .status
            .is_some_and(|s| s.rsplit(|b| *b == b' ').next() == Some(TRIGGERS_PENDING));
        if is_pending && is_package_name(p.package) {
            let mut pending = pending.borrow_mut();
            if pending.len() < MAX_TRIGGERS_PENDING {
                pending.insert(String::from_utf8_lossy(p.package).into_owned());
            }
        }
        names.iter().any(|n| n.as_bytes() == p.package)
    })?;
    let triggers_pending: Vec<String> = pending.into_inner().into_iter().collect();
    let packages = names
        .iter()
        .map(|name| {
            let mut found = paragraphs
                .iter()
                .filter(|p| p.package == name.as_bytes())
                .filter_map(|p| p.found(admindir).transpose());
            let Some(first) = found.next().transpose()? else {
                return Ok(None);
            };
            // Multi-Arch: same instances (libssl3:amd64 and :i386): dpkg
            // keeps them at one version; the first's file list stands for
            // them (the other's files are its own copies).
            for other in found {
                let other = other?;
                if (&other.version, &other.state) != (&first.version, &first.state) {
                    return Err(DbError::Ambiguous(
                        name.to_string(),
                        "installed instances at different versions or states",
                    ));
                }
            }
            Ok(Some(first))
        })
        .collect::<Result<_, _>>()?;
    Ok(Lookup {
        packages,
        triggers_pending,
    })
}

/// The absolute paths a package's file list names (without dpkg's `/.`),
/// as `dpkg-query --listfiles` lists them. A missing list is an empty one,
/// as dpkg-query treats it.
pub fn list_files(list: &Path) -> Result<Vec<PathBuf>, DbError> {
    let bytes = match read_bounded(list) {
        Ok(b) => b,
        Err(DbError::Missing(_)) => return Ok(vec![]),
        Err(e) => return Err(e),
    };
    Ok(bytes
        .split(|b| *b == b'\n')
        .filter(|l| l.starts_with(b"/") && *l != b"/.")
        .map(|l| PathBuf::from(std::ffi::OsStr::from_bytes(l)))
        .collect())
}

/// `path` opened with no symlink in any of its components (nor a
/// `/proc` magic link), never blocking (a FIFO), never becoming a
/// controlling terminal ([`super::no_symlinks`]: `openat2`, or a walk
/// where the agent's unit refuses it).
fn open_no_symlinks(path: &Path, flags: OFlags) -> Result<OwnedFd, DbError> {
    super::no_symlinks::open(None, path, flags | OFlags::RDONLY | OFlags::NOCTTY).map_err(|e| {
        match e {
            rustix::io::Errno::NOENT => DbError::Missing(path.into()),
            e => DbError::Io(path.into(), std::io::Error::from(e).to_string()),
        }
    })
}

/// `updates/` holds no journal entry (only dpkg's temporary file, if
/// anything).
fn journal_empty(updates: &Path) -> Result<(), DbError> {
    let io =
        |e: rustix::io::Errno| DbError::Io(updates.into(), std::io::Error::from(e).to_string());
    let dir = open_no_symlinks(updates, OFlags::DIRECTORY)?;
    for entry in rustix::fs::Dir::new(dir).map_err(io)? {
        let name = entry.map_err(io)?.file_name().to_bytes().to_vec();
        if name == b"." || name == b".." || name == JOURNAL_TMP.as_bytes() {
            continue;
        }
        if name.iter().all(u8::is_ascii_digit) {
            return Err(DbError::Journal(updates.into()));
        }
        return Err(DbError::ForeignJournalEntry(updates.into()));
    }
    Ok(())
}

/// A regular file's bytes, not through a symlink, never blocking on a
/// FIFO, at most [`MAX_FILE_BYTES`].
fn read_bounded(path: &Path) -> Result<Vec<u8>, DbError> {
    let io = |e: std::io::Error| DbError::Io(path.into(), e.to_string());
    let file = File::from(open_no_symlinks(path, OFlags::NONBLOCK)?);
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(DbError::NotRegular(path.into()));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(DbError::TooLarge(path.into()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(DbError::TooLarge(path.into()));
    }
    Ok(bytes)
}

/// The fields of one paragraph we use.
#[derive(Debug, Default)]
struct Paragraph<'a> {
    package: &'a [u8],
    status: Option<&'a [u8]>,
    version: Option<&'a [u8]>,
    architecture: Option<&'a [u8]>,
    multi_arch: Option<&'a [u8]>,
}

impl Paragraph<'_> {
    /// The instance, if installed in the report's sense.
    fn found(&self, admindir: &Path) -> Result<Option<Found>, DbError> {
        let name = String::from_utf8_lossy(self.package).into_owned();
        let bad = |why| DbError::Ambiguous(name.clone(), why);
        let status = self.status.ok_or_else(|| bad("no Status field"))?;
        let status = std::str::from_utf8(status).map_err(|_| bad("Status is not UTF-8"))?;
        // "want flag state", e.g. "install ok installed".
        let words: Vec<&str> = status.split(' ').collect();
        let [_, _, state] = words[..] else {
            return Err(bad("Status is not three words"));
        };
        match state {
            "not-installed" | "config-files" => return Ok(None),
            s if INSTALLED_STATES.contains(&s) => {}
            _ => return Err(bad("Status has a state dpkg does not write")),
        }
        let version = self.version.ok_or_else(|| bad("no Version field"))?;
        let version = std::str::from_utf8(version).map_err(|_| bad("Version is not UTF-8"))?;
        // The version goes into the report and the run log: the run may
        // have written this file, and a version of megabytes would make
        // every later log line unreadable.
        if !is_plain_version(version) {
            return Err(bad(
                "Version is not 1-128 printable ASCII characters without a space",
            ));
        }
        let list_name = match self.multi_arch {
            Some(b"same") => {
                let arch = self
                    .architecture
                    .ok_or_else(|| bad("Multi-Arch: same without an Architecture"))?;
                let mut n = self.package.to_vec();
                n.push(b':');
                n.extend_from_slice(arch);
                n
            }
            _ => self.package.to_vec(),
        };
        // The name becomes a file name: nothing that could leave info/,
        // and short (it goes into error messages).
        if list_name.is_empty()
            || list_name.len() > MAX_NAME_BYTES - ".list".len()
            || list_name
                .iter()
                .any(|b| !(b.is_ascii_alphanumeric() || b"+-.:_".contains(b)))
            || list_name.starts_with(b".")
        {
            return Err(bad("name or architecture is not a plain word"));
        }
        let mut list = list_name;
        list.extend_from_slice(b".list");
        Ok(Some(Found {
            version: version.to_string(),
            state: (state != "installed").then(|| state.to_string()),
            list: admindir
                .join("info")
                .join(std::ffi::OsStr::from_bytes(&list)),
        }))
    }
}

/// The paragraphs of a status file, strictly: every line is a field
/// (`Name: value`, the name non-empty, without whitespace, not starting
/// with `#` or `-`), a continuation of the previous field (starting with
/// a space or a tab), or an empty line between paragraphs; no CR, no
/// field twice in a paragraph (reported at the paragraph's end), every
/// paragraph has one `Package`. Values are trimmed of surrounding spaces
/// and tabs; the fields we use must be one line. Anything else is an
/// error (the caller then asks dpkg-query).
///
/// Only the paragraphs `keep` wants are returned (every one is checked):
/// the file may be the bundle's (a preview's database), and a list of
/// every tiny paragraph it could hold would be memory for it to take.
///
/// It runs twice per package install, over the whole file (766 kB on a
/// plain Debian host, ten times that on a big one), so the scan is
/// `memchr`'s (vectorised) and nothing is allocated per line.
fn parse<'a>(
    text: &'a [u8],
    keep: &dyn Fn(&Paragraph) -> bool,
) -> Result<Vec<Paragraph<'a>>, DbError> {
    let mut paragraphs = Vec::new();
    // The paragraph being read.
    let mut current: Option<Paragraph> = None;
    // The names of its fields so far: checked for duplicates when it
    // ends, sorted (a pairwise check would be quadratic in a hostile
    // paragraph's field count).
    let mut seen: Vec<&[u8]> = Vec::new();
    // Whether the previous line set one of our fields (a continuation of
    // it is refused).
    let mut last_ours = false;
    fn finish<'a>(
        current: &mut Option<Paragraph<'a>>,
        seen: &mut Vec<&'a [u8]>,
        paragraphs: &mut Vec<Paragraph<'a>>,
        keep: &dyn Fn(&Paragraph) -> bool,
        line: usize,
    ) -> Result<(), DbError> {
        if let Some(p) = current.take() {
            if p.package.is_empty() {
                return Err(DbError::Syntax(line, "a paragraph without a Package field"));
            }
            if has_duplicate(seen) {
                return Err(DbError::Syntax(line, "a field twice in one paragraph"));
            }
            seen.clear();
            if keep(&p) {
                paragraphs.push(p);
            }
        }
        Ok(())
    }
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    // The first carriage return, found once: a line holding it is refused
    // when the scan reaches it, so errors keep the order of the lines.
    let first_cr = memchr::memchr(b'\r', body).unwrap_or(usize::MAX);
    let mut n_lines = 0;
    let mut start = 0;
    let ends = memchr::memchr_iter(b'\n', body).chain(std::iter::once(body.len()));
    for (i, end) in ends.enumerate() {
        let n = i + 1;
        n_lines = n;
        let line = &body[start..end];
        let line_start = std::mem::replace(&mut start, end + 1);
        if (line_start..end).contains(&first_cr) {
            return Err(DbError::Syntax(n, "a carriage return"));
        }
        let Some(&first) = line.first() else {
            finish(&mut current, &mut seen, &mut paragraphs, keep, n)?;
            last_ours = false;
            continue;
        };
        if first == b' ' || first == b'\t' {
            if current.is_none() {
                return Err(DbError::Syntax(n, "a continuation line outside a field"));
            }
            if last_ours {
                return Err(DbError::Syntax(n, "a field we read spans lines"));
            }
            continue;
        }
        let colon =
            memchr::memchr(b':', line).ok_or(DbError::Syntax(n, "a line that is not a field"))?;
        let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
        if name.is_empty()
            || name[0] == b'#'
            || name[0] == b'-'
            || name.iter().any(|b| !b.is_ascii_graphic())
        {
            return Err(DbError::Syntax(n, "a bad field name"));
        }
        let p = current.get_or_insert_with(Default::default);
        seen.push(name);
        // Field names are case-insensitive (dpkg writes them capitalised).
        let is = |field: &str| name.eq_ignore_ascii_case(field.as_bytes());
        let slot = if is("package") {
            if value.is_empty() {
                return Err(DbError::Syntax(n, "an empty Package field"));
            }
            p.package = value;
            last_ours = true;
            continue;
        } else if is("status") {
            &mut p.status
        } else if is("version") {
            &mut p.version
        } else if is("architecture") {
            &mut p.architecture
        } else if is("multi-arch") {
            &mut p.multi_arch
        } else {
            last_ours = false;
            continue;
        };
        *slot = Some(value);
        last_ours = true;
    }
    finish(&mut current, &mut seen, &mut paragraphs, keep, n_lines)?;
    Ok(paragraphs)
}

/// Two of `names` are equal but for case (field names are
/// case-insensitive). dpkg writes 10-20 fields a paragraph: those are
/// compared pairwise (no allocation, no sort: this runs for every
/// paragraph); a hostile paragraph with more is sorted, so the work stays
/// n log n. Names equal but for case have the same length, so sorting by
/// length first keeps them adjacent.
fn has_duplicate(names: &mut [&[u8]]) -> bool {
    const PAIRWISE_UP_TO: usize = 32;
    if names.len() <= PAIRWISE_UP_TO {
        return names
            .iter()
            .enumerate()
            .any(|(i, a)| names[i + 1..].iter().any(|b| a.eq_ignore_ascii_case(b)));
    }
    names.sort_unstable_by(|a, b| {
        let lower = u8::to_ascii_lowercase;
        a.len()
            .cmp(&b.len())
            .then_with(|| a.iter().map(lower).cmp(b.iter().map(lower)))
    });
    names.windows(2).any(|w| w[0].eq_ignore_ascii_case(w[1]))
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "\
Package: a
Status: install ok installed
Priority: optional
Version: 1.0-1
Description: a package
 with a long description
 .
 and more

Package: b
Status: deinstall ok config-files
Version: 2.0

Package: c
Status: install reinstreq half-configured
Architecture: amd64
Version: 1:3.0
Multi-Arch: same

Package: d
Status: purge ok not-installed
";

    #[test]
    fn packages_whose_triggers_are_pending_are_listed() {
        let status = format!(
            "{STATUS}\nPackage: man-db\nStatus: install ok triggers-pending\nVersion: 2.11\nTriggers-Pending: /usr/share/man\n\nPackage: libc-bin\nStatus: install ok triggers-pending\nVersion: 2.36\n"
        );
        let dir = admindir(&status);
        let db = lookup_all(dir.path(), &["a"]).unwrap();
        assert_eq!(db.triggers_pending, ["libc-bin", "man-db"]);
        assert_eq!(db.packages[0].as_ref().unwrap().version, "1.0-1");
        // A package asked for that is itself pending is both.
        let db = lookup_status(status.as_bytes(), dir.path(), &["man-db"]).unwrap();
        assert_eq!(
            db.packages[0].as_ref().unwrap().state.as_deref(),
            Some("triggers-pending")
        );
        assert_eq!(
            lookup_all(admindir(STATUS).path(), &["a"])
                .unwrap()
                .triggers_pending,
            Vec::<String>::new()
        );
        // Bounded, and only plain names.
        let mut many = String::new();
        for i in 0..1000 {
            many.push_str(&format!(
                "Package: p{i:04}\nStatus: install ok triggers-pending\n\n"
            ));
        }
        many.push_str("Package: ../x\nStatus: install ok triggers-pending\n");
        let db = lookup_status(many.as_bytes(), dir.path(), &[]).unwrap();
        assert_eq!(db.triggers_pending.len(), MAX_TRIGGERS_PENDING);
        assert_eq!(db.triggers_pending[0], "p0000");
        assert!(!db.triggers_pending.iter().any(|n| n.contains('/')));
    }

    fn admindir(status: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("updates")).unwrap();
        std::fs::create_dir(dir.path().join("info")).unwrap();
        std::fs::write(dir.path().join("status"), status).unwrap();
        dir
    }

    #[test]
    fn versions_and_states_as_dpkg_query_reports_them() {
        let dir = admindir(STATUS);
        let got = lookup(dir.path(), &["a", "b", "c", "d", "e"]).unwrap();
        assert_eq!(
            got[0],
            Some(Found {
                version: "1.0-1".into(),
                state: None,
                list: dir.path().join("info/a.list"),
            })
        );
        assert_eq!(got[1], None);
        assert_eq!(
            got[2],
            Some(Found {
                version: "1:3.0".into(),
                state: Some("half-configured".into()),
                list: dir.path().join("info/c:amd64.list"),
            })
        );
        assert_eq!(got[3], None);
        assert_eq!(got[4], None);
    }

    #[test]
    fn a_pending_journal_entry_defers_to_dpkg_query() {
        let dir = admindir(STATUS);
        std::fs::write(dir.path().join("updates/tmp.i"), "").unwrap();
        assert!(lookup(dir.path(), &["a"]).is_ok());
        std::fs::write(dir.path().join("updates/0000"), "Package: a\n").unwrap();
        assert!(matches!(
            lookup(dir.path(), &["a"]),
            Err(DbError::Journal(_))
        ));
        // A name dpkg does not write: said so (dpkg --configure -a would
        // not remove it).
        std::fs::remove_file(dir.path().join("updates/0000")).unwrap();
        std::fs::write(dir.path().join("updates/stray"), "").unwrap();
        assert!(matches!(
            lookup(dir.path(), &["a"]),
            Err(DbError::ForeignJournalEntry(_))
        ));
    }

    #[test]
    fn anything_unexpected_is_an_error() {
        let bad = [
            "Package: a\r\nStatus: install ok installed\n",
            "Package: a\nDescription: x\n y\r\n",
            "Package: a\nVersion: 1\nX: y\r",
            " continuation first\n",
            "Package: a\nnot a field\n",
            "Package: a\nPackage: a\n",
            "Package: a\npackage: b\n",
            "Status: install ok installed\n",
            "Package:\n",
            "Package: a\nVersion: 1.0\n 2.0\n",
            "Package: a\n#comment: x\n",
            "Package: a\nbad name: x\n",
        ];
        for text in bad {
            assert!(
                matches!(parse(text.as_bytes(), &|_| true), Err(DbError::Syntax(..))),
                "{text:?}"
            );
        }
        let odd = [
            "Package: a\nStatus: install ok\nVersion: 1\n",
            "Package: a\nStatus: install ok installed\n",
            "Package: a\nStatus: install ok installed\nVersion: 1 2\n",
            "Package: ../a\nStatus: install ok installed\nVersion: 1\n",
            "Package: a\nStatus: install ok installed\nVersion: 1\nMulti-Arch: same\n",
            "Package: a\nStatus: install ok installed\nVersion: 1\nArchitecture: x/y\nMulti-Arch: same\n",
            // A state dpkg does not write, and versions no report may
            // carry (the run may have written this file).
            "Package: a\nStatus: install ok configured-by-bundle\nVersion: 1\n",
            "Package: a\nStatus: install ok installed\nVersion: 1\u{e9}\n",
            &format!(
                "Package: a\nStatus: install ok installed\nVersion: {}\n",
                "9".repeat(129)
            ),
        ];
        for text in odd {
            let dir = admindir(text);
            assert!(
                matches!(
                    lookup(dir.path(), &["a", "../a"]),
                    Err(DbError::Ambiguous(..))
                ),
                "{text:?}"
            );
        }
    }

    #[test]
    fn instances_at_one_version_are_one_answer_and_at_two_defer() {
        let dir = admindir(
            "Package: a\nStatus: install ok installed\nArchitecture: amd64\nMulti-Arch: same\nVersion: 1\n\n\
             Package: a\nStatus: install ok installed\nArchitecture: i386\nMulti-Arch: same\nVersion: 1\n\n\
             Package: b\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1\n\n\
             Package: b\nStatus: deinstall ok config-files\nArchitecture: i386\nVersion: 1\n\n\
             Package: c\nStatus: install ok installed\nArchitecture: amd64\nMulti-Arch: same\nVersion: 1\n\n\
             Package: c\nStatus: install ok unpacked\nArchitecture: i386\nMulti-Arch: same\nVersion: 2\n",
        );
        assert_eq!(
            lookup(dir.path(), &["a"]).unwrap()[0],
            Some(Found {
                version: "1".into(),
                state: None,
                list: dir.path().join("info/a:amd64.list"),
            })
        );
        assert!(matches!(
            lookup(dir.path(), &["c"]),
            Err(DbError::Ambiguous(..))
        ));
        assert_eq!(
            lookup(dir.path(), &["b"]).unwrap()[0]
                .as_ref()
                .unwrap()
                .version,
            "1"
        );
    }

    #[test]
    fn descriptions_need_not_be_utf8() {
        let mut text =
            b"Package: x\nStatus: install ok installed\nVersion: 1\nMaintainer: J\xf6rg\n\n"
                .to_vec();
        text.extend_from_slice(STATUS.as_bytes());
        let dir = admindir("");
        std::fs::write(dir.path().join("status"), &text).unwrap();
        assert_eq!(
            lookup(dir.path(), &["x"]).unwrap()[0]
                .as_ref()
                .unwrap()
                .version,
            "1"
        );
    }

    #[test]
    fn no_symlink_and_no_fifo_is_read() {
        let dir = admindir(STATUS);
        let status = dir.path().join("status");
        std::fs::rename(&status, dir.path().join("real")).unwrap();
        std::os::unix::fs::symlink("real", &status).unwrap();
        assert!(matches!(lookup(dir.path(), &["a"]), Err(DbError::Io(..))));
        std::fs::remove_file(&status).unwrap();
        nix::unistd::mkfifo(&status, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(matches!(
            lookup(dir.path(), &["a"]),
            Err(DbError::NotRegular(_))
        ));
    }

    #[test]
    fn no_directory_is_reached_through_a_symlink() {
        // `updates/` as a symlink to an empty directory would hide a
        // pending journal entry; `info/` as one would read lists elsewhere.
        let dir = admindir(STATUS);
        std::fs::write(dir.path().join("updates/0001"), "").unwrap();
        std::fs::rename(dir.path().join("updates"), dir.path().join("u")).unwrap();
        std::fs::create_dir(dir.path().join("empty")).unwrap();
        std::os::unix::fs::symlink("empty", dir.path().join("updates")).unwrap();
        assert!(matches!(lookup(dir.path(), &["a"]), Err(DbError::Io(..))));
        std::fs::remove_file(dir.path().join("updates")).unwrap();
        std::fs::create_dir(dir.path().join("updates")).unwrap();
        let list = lookup(dir.path(), &["a"]).unwrap()[0].clone().unwrap().list;
        std::fs::rename(dir.path().join("info"), dir.path().join("i")).unwrap();
        std::fs::write(dir.path().join("i/a.list"), "/usr\n").unwrap();
        std::os::unix::fs::symlink("i", dir.path().join("info")).unwrap();
        assert!(matches!(list_files(&list), Err(DbError::Io(..))));
        let through = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path(), &through).unwrap();
        assert!(matches!(lookup(&through, &["a"]), Err(DbError::Io(..))));
    }

    #[test]
    fn a_long_list_name_is_refused() {
        let name = "a".repeat(251);
        let dir = admindir(&format!(
            "Package: {name}\nStatus: install ok installed\nVersion: 1\n"
        ));
        assert!(matches!(
            lookup(dir.path(), &[&name]),
            Err(DbError::Ambiguous(..))
        ));
        let name = "a".repeat(250);
        let dir = admindir(&format!(
            "Package: {name}\nStatus: install ok installed\nVersion: 1\n"
        ));
        assert!(lookup(dir.path(), &[&name]).unwrap()[0].is_some());
    }

    #[test]
    fn many_fields_are_checked_for_duplicates_in_any_case() {
        let mut text = String::from("Package: a\n");
        for i in 0..100_000 {
            text.push_str(&format!("X-{i}: v\n"));
        }
        assert_eq!(parse(text.as_bytes(), &|_| true).unwrap().len(), 1);
        assert_eq!(parse(text.as_bytes(), &|_| false).unwrap().len(), 0);
        text.push_str("x-99999: v\n");
        assert!(matches!(
            parse(text.as_bytes(), &|_| false),
            Err(DbError::Syntax(_, "a field twice in one paragraph"))
        ));
    }

    #[test]
    fn file_lists_as_dpkg_query_lists_them() {
        let dir = admindir(STATUS);
        let list = dir.path().join("info/a.list");
        assert_eq!(list_files(&list).unwrap(), Vec::<PathBuf>::new());
        std::fs::write(&list, "/.\n/usr\n/usr/share/a\n/usr/share/a/f\u{e9}\n").unwrap();
        assert_eq!(
            list_files(&list).unwrap(),
            ["/usr", "/usr/share/a", "/usr/share/a/fé"]
                .map(PathBuf::from)
                .to_vec()
        );
    }

    /// On this host's real database (read only): every package as
    /// dpkg-query shows it, and every installed one's file list as
    /// dpkg-query lists it.
    #[test]
    fn agrees_with_dpkg_query_on_this_host() {
        let admindir = Path::new(crate::packages::DPKG_ADMINDIR);
        let out = std::process::Command::new("dpkg-query")
            .arg("--admindir=/var/lib/dpkg")
            .args([
                "--show",
                "--showformat=${Package}\\t${Version}\\t${Status}\\n",
            ])
            .env("LC_ALL", "C")
            .output()
            .unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let mut expected: std::collections::BTreeMap<&str, Vec<(&str, &str)>> = Default::default();
        for line in text.lines() {
            let mut f = line.split('\t');
            let (name, version, status) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
            let state = status.rsplit(' ').next().unwrap();
            if !matches!(state, "not-installed" | "config-files") {
                expected.entry(name).or_default().push((version, state));
            }
        }
        assert!(expected.len() > 10, "{} packages", expected.len());
        let names: Vec<&str> = expected
            .keys()
            .copied()
            .filter(|n| expected[n].len() == 1)
            .collect();
        let found = lookup(admindir, &names).unwrap();
        for (name, found) in names.iter().zip(&found) {
            let found = found.as_ref().unwrap_or_else(|| panic!("{name} not found"));
            let (version, state) = expected[name][0];
            assert_eq!(found.version, version, "{name}");
            assert_eq!(
                found.state.as_deref().unwrap_or("installed"),
                state,
                "{name}"
            );
        }
        for name in expected.keys().filter(|n| expected[*n].len() > 1) {
            assert!(
                matches!(lookup(admindir, &[name]), Err(DbError::Ambiguous(..))),
                "{name}"
            );
        }
        // File lists: a few packages, each against dpkg-query --listfiles.
        for (name, found) in names.iter().zip(&found).step_by(names.len() / 8 + 1) {
            let out = std::process::Command::new("dpkg-query")
                .args(["--admindir=/var/lib/dpkg", "--listfiles", "--", name])
                .env("LC_ALL", "C")
                .output()
                .unwrap();
            let listed: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.starts_with('/') && *l != "/.")
                .map(PathBuf::from)
                .collect();
            let list = list_files(&found.as_ref().unwrap().list).unwrap();
            assert_eq!(list, listed, "{name}");
        }
    }
}
