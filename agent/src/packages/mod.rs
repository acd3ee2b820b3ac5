//! `[packages]`: the bundle's .deb or .rpm files, installed by `dpkg` or
//! `rpm` inside the run's sandbox (issue 13; docs/bundle-format.md).
//!
//! The agent itself does only what needs no trust in the packages, outside
//! the sandbox:
//! - before the sandbox starts: checks that the host's package database is
//!   the one the signed manifest names, and creates the package directories
//!   the derived scope names but the host lacks ([`prepare`]); Landlock
//!   rules attach to existing inodes and cannot grant creating a single
//!   directory, so creating them here (root:root 0755, which
//!   `rollguard bundle build` checked is how the packages ship them) is
//!   what lets the grant be as narrow as the package's own directories;
//! - the sandbox's command: the package manager first, then the bundle's
//!   own command, if any ([`sandbox_command`]);
//! - the package database read before and after the run: the versions
//!   for the report, and the files the run replaced or removed
//!   ([`Snapshot`]), for the stale-services scan. dpkg's is read directly
//!   ([`dpkg_db`], which says why and when it declines), rpm's with
//!   `rpm`; before the run, a dpkg database the direct read declines is
//!   read with dpkg-query, after it never ([`Fallback`]).
//!
//! dpkg and rpm and every maintainer script run confined: what they change
//! beyond the signed scope is denied by the kernel and reported.

pub mod dpkg_db;
pub mod expected;
mod no_symlinks;

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use rollguard_shared::manifest::{PackageKind, Packages};
use rollguard_shared::report::PackageChange;
use rollguard_shared::ScopePath;

/// dpkg's state of a configured package that waits for a trigger it
/// activated in another package (`activate-await`): with `--no-triggers`
/// the trigger runs when the host processes pending triggers (apt at its
/// end, `dpkg --triggers-only --pending`), and the package is installed as
/// far as the run goes. The interested packages are reported
/// (`triggers_pending`; docs/bundle-format.md says what waits meanwhile).
const DEFERRED_TRIGGER_STATE: &str = "triggers-awaited";

pub use rollguard_shared::manifest::packages::{DPKG_ADMINDIR, DPKG_LOG};

/// The top-level directories a merged-/usr host makes symlinks into
/// `/usr` (Debian 12, Fedora...).
const MERGED_USR: &[&str] = &["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"];

/// `p` with its derived paths as this host's real paths: a package built
/// for (or on) a split-/usr system names `/lib/foo`, and on a merged-/usr
/// host `/lib` is a symlink to `usr/lib`, which no scope may be reached
/// through (the sandbox refuses a scope path that is not its own real
/// path). Only these standard aliases are followed, and only when the
/// host's link is exactly `usr/X` (or `/usr/X`); every check and the
/// sandbox then see the real path. Signed paths stay as signed in the
/// manifest.
pub fn on_this_host(p: &Packages) -> Packages {
    let mut p = p.clone();
    for list in [&mut p.write, &mut p.delete] {
        for path in list.iter_mut() {
            if let Some(real) = merged_usr(path.as_path()) {
                tracing::info!(signed = %path, real = %real.display(), "derived scope path on a merged-/usr host");
                if let Some(real) = real.to_str().and_then(|r| ScopePath::parse(r).ok()) {
                    *path = real;
                }
            }
        }
        list.sort();
        list.dedup();
    }
    p
}

/// `path` beneath a merged-/usr alias that is a symlink on this host, as
/// its real path beneath `/usr`; `None` otherwise.
pub(crate) fn merged_usr(path: &Path) -> Option<PathBuf> {
    let alias = MERGED_USR.iter().find(|a| path.starts_with(a))?;
    let rest = path.strip_prefix(alias).ok()?;
    let name = alias.trim_start_matches('/');
    let link = std::fs::read_link(alias).ok()?;
    let target = Path::new("/usr").join(name);
    if link != Path::new("usr").join(name) && link != target {
        return None;
    }
    Some(if rest.as_os_str().is_empty() {
        target
    } else {
        target.join(rest)
    })
}

/// What could be wrong on this host before anything ran.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("{0}")]
    Host(String),
}

/// Checks and preparation before the sandbox starts (after every policy
/// check passed): the database is the signed one, missing package
/// directories exist.
pub fn prepare(p: &Packages) -> Result<(), PrepareError> {
    check_host(p)?;
    for path in missing(p) {
        let path = path.as_path();
        if path == Path::new(DPKG_LOG) {
            // dpkg creates its log 0644 root:root; so do we, whatever the
            // umask (the packaged unit's is 0077). Never through a link
            // or into a FIFO planted meanwhile.
            let host = |e: std::io::Error| PrepareError::Host(format!("{}: {e}", path.display()));
            let log = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o644)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
                .open(path)
                .map_err(host)?;
            if !log.metadata().map_err(host)?.is_file() {
                return Err(PrepareError::Host(format!(
                    "{}: not a regular file",
                    path.display()
                )));
            }
            log.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
                .map_err(host)?;
            continue;
        }
        create_dirs(path).map_err(|e| PrepareError::Host(format!("{}: {e}", path.display())))?;
    }
    Ok(())
}

/// The derived write paths this host lacks, which [`prepare`] creates (a
/// preview, which changes nothing on the host, is refused instead).
pub fn missing(p: &Packages) -> Vec<PathBuf> {
    p.write
        .iter()
        .map(|w| w.as_path().to_path_buf())
        .filter(|w| std::fs::symlink_metadata(w).is_err())
        .collect()
}

/// The host's package database is the one the signed manifest names.
pub fn check_host(p: &Packages) -> Result<(), PrepareError> {
    match p.kind {
        PackageKind::Deb => {
            if p.database.as_path() != Path::new(DPKG_ADMINDIR) {
                return Err(PrepareError::Host(format!(
                    "the bundle's dpkg database is {}, this agent installs into {DPKG_ADMINDIR}",
                    p.database
                )));
            }
            if !Path::new(DPKG_ADMINDIR).join("status").is_file() {
                return Err(PrepareError::Host(format!(
                    "{DPKG_ADMINDIR}/status does not exist: dpkg is not set up on this host"
                )));
            }
        }
        PackageKind::Rpm => {
            let host = query(Command::new("rpm").args(["-E", "%_dbpath"]))
                .map_err(PrepareError::Host)?
                .unwrap_or_default();
            if Path::new(host.trim()) != p.database.as_path() {
                return Err(PrepareError::Host(format!(
                    "this host's rpm database is {:?}, the bundle was built for {}",
                    host.trim(),
                    p.database
                )));
            }
        }
    }
    Ok(())
}

/// Create `path` and its missing ancestors, each root:root 0755 whatever
/// the umask. Never through a symlink: the deepest existing ancestor must
/// be its own real path (the sandbox would refuse such a scope anyway),
/// and the walk from it goes by descriptor (no symlink resolution:
/// [`no_symlinks`], `mkdirat`, `fchmod`): a link planted meanwhile by another
/// writer of an ancestor (a concurrent run with a scope there, a local
/// user who owns it) is refused, never followed, and an entry made
/// meanwhile counts only if it is a root-owned directory.
fn create_dirs(path: &Path) -> std::io::Result<()> {
    let missing: Vec<&Path> = path
        .ancestors()
        .take_while(|a| std::fs::symlink_metadata(a).is_err())
        .collect();
    let Some(existing) = path.ancestors().nth(missing.len()) else {
        return Ok(());
    };
    if std::fs::canonicalize(existing)? != existing {
        return Err(std::io::Error::other(format!(
            "{} is reached through a symlink; no package directory is created there",
            existing.display()
        )));
    }
    let top_down: Vec<&Path> = missing.into_iter().rev().collect();
    create_beneath(existing, &top_down)
}

/// Create `missing` (each the child of the one before, the first a child
/// of `existing`) by descriptor from `existing`: see [`create_dirs`].
fn create_beneath(existing: &Path, missing: &[&Path]) -> std::io::Result<()> {
    use rustix::fs::{Mode, OFlags};
    let open = |dir: Option<&std::os::fd::OwnedFd>, name: &Path| {
        use std::os::fd::AsFd;
        no_symlinks::open(
            dir.map(|d| d.as_fd()),
            name,
            OFlags::RDONLY | OFlags::DIRECTORY,
        )
        .map_err(std::io::Error::from)
    };
    let refused = |dir: &Path, e: std::io::Error| match e.raw_os_error() {
        Some(libc::ENOTDIR) | Some(libc::ELOOP) => std::io::Error::other(format!(
            "{} is a symlink or not a directory; no package directory is created there",
            dir.display()
        )),
        _ => e,
    };
    let not_root = |dir: &Path, uid: u32| {
        std::io::Error::other(format!(
            "{} appeared meanwhile, owned by uid {uid}; no package directory is created there",
            dir.display()
        ))
    };
    let mut parent = open(None, existing).map_err(|e| refused(existing, e))?;
    if missing.is_empty() {
        // The directory itself appeared since it was found missing.
        let uid = rustix::fs::fstat(&parent)?.st_uid;
        if uid != 0 {
            return Err(not_root(existing, uid));
        }
    }
    for &dir in missing {
        let name = Path::new(dir.file_name().ok_or_else(|| {
            std::io::Error::other(format!("{}: no directory name", dir.display()))
        })?);
        let created = match rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o755)) {
            Ok(()) => true,
            Err(rustix::io::Errno::EXIST) => false,
            Err(e) => return Err(e.into()),
        };
        let made = open(Some(&parent), name).map_err(|e| refused(dir, e))?;
        let uid = rustix::fs::fstat(&made)?.st_uid;
        if uid != 0 {
            return Err(not_root(dir, uid));
        }
        // root:root whatever the parent (a setgid parent gives its group)
        // and the umask, as `bundle build` checked the package ships it.
        rustix::fs::fchown(
            &made,
            Some(rustix::fs::Uid::ROOT),
            Some(rustix::fs::Gid::ROOT),
        )?;
        rustix::fs::fchmod(&made, Mode::from_raw_mode(0o755))?;
        if created {
            tracing::info!(dir = %dir.display(), "created a package directory the derived scope names");
        }
        parent = made;
    }
    Ok(())
}

/// The sandbox's command: `dpkg -i` (or `rpm -U`) of the packages, then the
/// bundle's own command (`exec`), if any, only when the install succeeded.
/// With a command, a small `/bin/sh` script (each argument single-quoted);
/// without one, the package manager itself, with no shell in between (a
/// shell's start is a millisecond of the install's cost).
pub fn sandbox_command(p: &Packages, command: &[String]) -> Vec<String> {
    let install = match p.kind {
        // --force-confdef/--force-confold: never prompt; keep a conffile
        // the host's administrator changed. The database and the log are
        // named explicitly: they are what the derived scope grants.
        // --no-triggers: triggers the packages activate in *other*
        // packages (libc-bin's ldconfig, man-db) are recorded, not run
        // (see DEFERRED_TRIGGER_STATE): run here they would write outside
        // the derived scope (ldconfig writes /etc/ld.so.cache, which the
        // agent protects), fail, and leave the interested package
        // half-configured on the host.
        PackageKind::Deb => vec![
            "/usr/bin/dpkg".to_string(),
            format!("--admindir={DPKG_ADMINDIR}"),
            format!("--log={DPKG_LOG}"),
            "--force-confdef".into(),
            "--force-confold".into(),
            "--no-triggers".into(),
            "--install".into(),
        ],
        // --oldpackage: a bundle carrying an older version is how a
        // revert is expressed (a new signed bundle); -U alone would refuse.
        // --ignoresize: rpm's disk space check counts a read-only file
        // system as full, and inside the sandbox every mount outside the
        // scope is read-only (the scope's binds share the device of the
        // mount they sit on, so rpm attributes its files to that one).
        // --define _install_script_path: rpm gives its scriptlets this
        // PATH (its default without the first entry), not the sandbox's,
        // so without it a scriptlet's `systemctl` would be the real one and
        // its request would not be captured (docs/services.md).
        PackageKind::Rpm => vec![
            "/usr/bin/rpm".to_string(),
            format!("--dbpath={}", p.database),
            "--define".into(),
            format!(
                "_install_script_path {}:/sbin:/bin:/usr/sbin:/usr/bin",
                crate::services::capture::SHIM_DIR
            ),
            "--upgrade".into(),
            "--oldpackage".into(),
            "--ignoresize".into(),
        ],
    };
    // Relative to the payload directory (the working directory), always
    // with `./` (and after `--`) so no name can read as an option.
    let files = p.install.iter().map(|pkg| format!("./{}", pkg.file));
    let own_triggers = p.kind == PackageKind::Deb && p.install.len() > 1;
    if command.is_empty() && !own_triggers {
        let mut argv = install;
        argv.push("--".into());
        argv.extend(files);
        return argv;
    }
    let mut script = quote_all(&install);
    script.push_str(" -- \"$@\" || exit $?");
    if own_triggers {
        script.push_str("; ");
        script.push_str(&own_triggers_script(p));
    }
    if !command.is_empty() {
        script.push_str("; exec ");
        script.push_str(&quote_all(command));
    }
    let mut argv = vec![
        "/bin/sh".to_string(),
        "-c".to_string(),
        script,
        "rollguard-packages".to_string(),
    ];
    argv.extend(files);
    argv
}

/// A trigger one package of the bundle activates in another package of
/// the bundle is the bundle's own: deferred by `--no-triggers` like any
/// other, it would leave that package `triggers-pending` (not installed:
/// the run fails) and the activating one `triggers-awaited`. So after the
/// install, the bundle's packages still pending have their triggers run,
/// by name only (`--triggers-only NAME`, never `--pending`, which would run
/// the host's too): their postinst, whose writes are the bundle's derived
/// scope. Still with `--no-triggers`, so what that activates elsewhere is
/// deferred to the host as before. dpkg refuses `--triggers-only` for a
/// package with nothing pending, hence the query first; a query that fails
/// ends the run with its status.
///
/// Only an instance at the bundle's own name *and* version is taken (a
/// `case` pattern per package, from the signed table): not another
/// version the database may hold under that name. Names and versions are
/// package tokens (letters, digits, `.+~:_-`): no glob character in a
/// pattern, and safe unquoted in the shell's word splitting. One pass: a
/// trigger that activates another of the bundle's leaves that one pending,
/// and the run fails on it.
fn own_triggers_script(p: &Packages) -> String {
    let names: Vec<String> = p.install.iter().map(|pkg| pkg.name.to_string()).collect();
    let query = quote_all(&[
        "/usr/bin/dpkg-query".to_string(),
        format!("--admindir={DPKG_ADMINDIR}"),
        "--show".into(),
        "--showformat=${db:Status-Status}=${Package}=${Version}=${binary:Package}\\n".into(),
        "--".into(),
    ]);
    let patterns = p
        .install
        .iter()
        .map(|pkg| quote_all(&[format!("triggers-pending={}={}=", pkg.name, pkg.version)]) + "*")
        .collect::<Vec<_>>()
        .join("|");
    let run = quote_all(&[
        "/usr/bin/dpkg".to_string(),
        format!("--admindir={DPKG_ADMINDIR}"),
        format!("--log={DPKG_LOG}"),
        "--no-triggers".into(),
        "--triggers-only".into(),
        "--".into(),
    ]);
    format!(
        "states=$({query} {}) || exit $?; pending=; \
         for s in $states; do case $s in {patterns}) pending=\"$pending ${{s##*=}}\";; esac; done; \
         [ -z \"$pending\" ] || {run} $pending || exit $?",
        quote_all(&names)
    )
}

/// Whether the run must be able to list every directory
/// ([`crate::sandbox::SandboxSpec::list_every_directory`]): rpm 4.18 opens
/// each directory from `/` down to the files it installs
/// (`openat(-1, "/", O_RDONLY)`, then `usr`, ...) and creates files
/// relative to those descriptors; Landlock asks READ_DIR for each open,
/// and a grant on `/` is the only one that covers the ancestors of the
/// host's protected paths. dpkg needs no such thing.
pub fn needs_directory_listings(p: &Packages) -> bool {
    p.kind == PackageKind::Rpm
}

fn quote_all(args: &[String]) -> String {
    args.iter()
        .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One package as the database had it.
#[derive(Debug, Clone, Default)]
struct Installed {
    version: Option<String>,
    /// dpkg's state word when not `installed`.
    state: Option<String>,
    error: Option<String>,
}

impl Installed {
    /// A package as dpkg's status file has it, and its file list.
    fn found(f: dpkg_db::Found) -> (Installed, PathBuf) {
        let installed = Installed {
            version: Some(f.version),
            state: f.state,
            error: None,
        };
        (installed, f.list)
    }
}

/// `path` with the symlinks of its directory resolved, as
/// `/proc/PID/maps` names what a process maps: on a merged-/usr host
/// dpkg's list says `/lib/x86_64-linux-gnu/libc.so.6` (libc6, zlib1g and
/// dozens more still list `/lib`), the kernel `/usr/lib/...`, and a
/// replaced file would match no mapping. The name itself is kept (it may
/// be a symlink the package ships); a directory that cannot be resolved
/// is kept as listed. `dirs` remembers each directory resolved.
fn as_mapped(path: &Path, dirs: &mut std::collections::HashMap<PathBuf, PathBuf>) -> PathBuf {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return path.to_path_buf();
    };
    let real = dirs
        .entry(dir.to_path_buf())
        .or_insert_with(|| std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()));
    real.join(name)
}

/// The database before the run: versions, and the identity of every
/// non-directory file the installed packages own (named as processes
/// map them: [`as_mapped`]).
pub struct Snapshot {
    before: Vec<Installed>,
    files: Vec<(PathBuf, u64, u64)>,
}

/// What the run did to the packages.
pub struct PackagesOutcome {
    pub changes: Vec<PackageChange>,
    /// Files the packages owned before the run that were replaced (another
    /// inode now) or removed: what still-running processes may map.
    pub replaced: BTreeSet<PathBuf>,
    /// Set when a package is not at its bundle's version afterwards.
    pub mismatch: Option<String>,
    /// Packages whose triggers are pending after the run (dpkg runs with
    /// `--no-triggers`; see [`sandbox_command`]).
    pub triggers_pending: Vec<String>,
}

impl Snapshot {
    pub fn take(p: &Packages) -> Snapshot {
        let mut files = Vec::new();
        let mut real_dirs = std::collections::HashMap::new();
        let before = read_states(p, Fallback::Query)
            .each
            .into_iter()
            .zip(&p.install)
            .map(|((state, list), pkg)| {
                if state.version.is_some() {
                    for path in owned_files(p, pkg.name.as_str(), list) {
                        if let Ok(m) = std::fs::symlink_metadata(&path) {
                            if !m.is_dir() {
                                let path = as_mapped(&path, &mut real_dirs);
                                files.push((path, m.dev(), m.ino()));
                            }
                        }
                    }
                }
                state
            })
            .collect();
        Snapshot { before, files }
    }

    pub fn finish(mut self, p: &Packages) -> PackagesOutcome {
        let states = read_states(p, Fallback::Unknown);
        let after = states.each.into_iter().map(|(state, _)| state).collect();
        let files = std::mem::take(&mut self.files);
        let mut outcome = self.compare(p, after, states.triggers_pending);
        outcome.replaced = files
            .into_iter()
            .filter(|(path, dev, ino)| match std::fs::symlink_metadata(path) {
                Ok(m) => (m.dev(), m.ino()) != (*dev, *ino),
                Err(_) => true,
            })
            .map(|(path, _, _)| path)
            .collect();
        outcome
    }

    /// After a preview: the versions its database says, read from its
    /// layers ([`PreviewAfter::read`]); nothing on the host was replaced.
    pub fn finish_preview(self, p: &Packages, after: PreviewAfter) -> PackagesOutcome {
        self.compare(p, after.packages, after.triggers_pending)
    }

    fn compare(
        self,
        p: &Packages,
        after: Vec<Installed>,
        triggers_pending: Vec<String>,
    ) -> PackagesOutcome {
        let mut changes = Vec::new();
        let mut mismatch = Vec::new();
        for ((pkg, before), after) in p.install.iter().zip(self.before).zip(after) {
            // Configured, waiting only for another package's trigger, which
            // dpkg deferred (`--no-triggers`): installed as far as this run
            // goes; the state is reported.
            let configured =
                after.state.is_none() || after.state.as_deref() == Some(DEFERRED_TRIGGER_STATE);
            if after.version.as_deref() != Some(pkg.version.as_str()) || !configured {
                mismatch.push(format!(
                    "{} is {} after the run, not {} installed",
                    pkg.name,
                    match (&after.version, &after.state, &after.error) {
                        (Some(v), Some(s), _) => format!("{v} ({s})"),
                        (Some(v), None, _) => v.clone(),
                        (None, _, Some(_)) => "unknown".into(),
                        (None, _, None) => "not installed".into(),
                    },
                    pkg.version
                ));
            }
            changes.push(PackageChange {
                manager: p.kind.manager().to_string(),
                name: pkg.name.to_string(),
                version: pkg.version.to_string(),
                before: before.version,
                after: after.version,
                state: after.state,
                error: before.error.or(after.error),
            });
        }
        PackagesOutcome {
            changes,
            replaced: BTreeSet::new(),
            mismatch: (!mismatch.is_empty()).then(|| mismatch.join("; ")),
            triggers_pending,
        }
    }
}

/// The packages as a preview left the database: read from the preview's
/// layers, since nothing reached the host's (only dpkg's `status` and its
/// journal are needed; an rpm preview is refused before it runs).
pub struct PreviewAfter {
    packages: Vec<Installed>,
    triggers_pending: Vec<String>,
}

impl PreviewAfter {
    /// Read from the preview's layers `layers` (the tmpfs stage 2 built
    /// them on). What cannot be read is each package's error, so the
    /// preview fails rather than guess.
    pub fn read(p: &Packages, layers: &std::os::fd::OwnedFd) -> PreviewAfter {
        let failed = |e: String| {
            tracing::warn!("the preview's package database: {e}");
            PreviewAfter {
                packages: p
                    .install
                    .iter()
                    .map(|_| Installed {
                        error: Some(e.clone()),
                        ..Installed::default()
                    })
                    .collect(),
                triggers_pending: Vec::new(),
            }
        };
        if p.kind != PackageKind::Deb {
            return failed("only dpkg's database is read from a preview".into());
        }
        let admindir = Path::new(DPKG_ADMINDIR);
        let updates = admindir.join("updates");
        match crate::preview::list_dir(layers, &updates, 10_000) {
            Ok(names)
                if names
                    .iter()
                    .all(|n| n.to_bytes() == dpkg_db::JOURNAL_TMP.as_bytes()) => {}
            Ok(_) => {
                return failed(format!(
                "dpkg's journal ({}) holds changes not yet in the status file after the preview",
                updates.display()
            ))
            }
            Err(e) => return failed(e.to_string()),
        }
        let status = admindir.join("status");
        let names: Vec<&str> = p.install.iter().map(|pkg| pkg.name.as_str()).collect();
        let found = match crate::preview::read_file(layers, &status, dpkg_db::MAX_FILE_BYTES) {
            Ok(crate::preview::FileAfter::Changed(bytes)) => {
                dpkg_db::lookup_status(&bytes, admindir, &names).map_err(|e| e.to_string())
            }
            // The run left the database alone: the host's answers.
            Ok(crate::preview::FileAfter::Unchanged) => {
                // The preview left the host's database alone.
                let states = read_states(p, Fallback::Query);
                return PreviewAfter {
                    packages: states.each.into_iter().map(|(s, _)| s).collect(),
                    triggers_pending: states.triggers_pending,
                };
            }
            Ok(crate::preview::FileAfter::Absent) => {
                Err(format!("{} was deleted by the preview", status.display()))
            }
            Err(e) => Err(e.to_string()),
        };
        match found {
            Ok(db) => PreviewAfter {
                packages: db
                    .packages
                    .into_iter()
                    .map(|f| f.map_or_else(Installed::default, |f| Installed::found(f).0))
                    .collect(),
                triggers_pending: db.triggers_pending,
            },
            Err(e) => failed(e),
        }
    }
}

/// The most of a query tool's stderr the log quotes.
const MAX_TOOL_ERROR: usize = 1024;

/// Run a query tool: `Ok(Some(stdout))` on success, `Ok(None)` when it
/// exits 1 (not installed), `Err` otherwise.
fn query(cmd: &mut Command) -> Result<Option<String>, String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| format!("{shown}: {e}"))?;
    match out.status.code() {
        Some(0) => Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned())),
        Some(1) => Ok(None),
        // The tool's words go to the log only (bounded), not into the
        // report: it may have parsed a database an earlier run wrote (a
        // symlink to a file no bundle may read), and its parse errors
        // quote what they read.
        _ => {
            let stderr = &out.stderr[..out.stderr.len().min(MAX_TOOL_ERROR)];
            tracing::warn!(
                command = %shown,
                stderr = %String::from_utf8_lossy(stderr).trim(),
                "package database query failed"
            );
            Err(format!(
                "{shown}: {} (its messages are in the agent's log)",
                out.status
            ))
        }
    }
}

/// Where a package's file list comes from.
enum FileList {
    /// dpkg's list file, from the direct read.
    Dpkg(PathBuf),
    /// The query tool.
    Query,
}

/// Every package of the bundle as the database has it now, in order, each
/// with where its file list comes from: dpkg's database read directly,
/// once for all packages; rpm's, or a dpkg database the direct read
/// declines (see [`dpkg_db`]), with the query tool.
struct States {
    /// Each package of the bundle, in order, with where its file list
    /// comes from.
    each: Vec<(Installed, FileList)>,
    /// Packages whose triggers are pending; empty when dpkg's database was
    /// read with dpkg-query or not at all (the report then lists none).
    triggers_pending: Vec<String>,
}

/// What [`read_states`] does when dpkg's database cannot be read
/// directly.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fallback {
    /// Ask dpkg-query: before the run (or after a preview, which left the
    /// database alone), the tool and the database are the host's.
    Query,
    /// The packages' state is unknown, each package's error: after the
    /// run, which could have written the database (a symlink to a file
    /// it may not read, which dpkg-query, run as root outside the
    /// sandbox, would open and quote back) and, where its scope holds
    /// them, dpkg-query's program and libraries. The run then fails.
    Unknown,
}

fn read_states(p: &Packages, fallback: Fallback) -> States {
    if p.kind == PackageKind::Deb {
        let names: Vec<&str> = p.install.iter().map(|pkg| pkg.name.as_str()).collect();
        match dpkg_db::lookup_all(Path::new(DPKG_ADMINDIR), &names) {
            Ok(db) => {
                let each = db
                    .packages
                    .into_iter()
                    .map(|f| match f {
                        Some(f) => {
                            let (installed, list) = Installed::found(f);
                            (installed, FileList::Dpkg(list))
                        }
                        None => (Installed::default(), FileList::Query),
                    })
                    .collect();
                return States {
                    each,
                    triggers_pending: db.triggers_pending,
                };
            }
            Err(e) if fallback == Fallback::Unknown => {
                let why = format!(
                    "dpkg's database could not be read after the run ({e}); the agent does not run dpkg-query on a database the run could write, so the packages' state is unknown"
                );
                tracing::warn!("{why}");
                return States {
                    each: p
                        .install
                        .iter()
                        .map(|_| {
                            let unknown = Installed {
                                error: Some(why.clone()),
                                ..Installed::default()
                            };
                            (unknown, FileList::Query)
                        })
                        .collect(),
                    triggers_pending: Vec::new(),
                };
            }
            Err(e) => tracing::info!("dpkg's database is read with dpkg-query: {e}"),
        }
    }
    States {
        each: p
            .install
            .iter()
            .map(|pkg| (installed(p, pkg.name.as_str()), FileList::Query))
            .collect(),
        triggers_pending: Vec::new(),
    }
}

fn installed(p: &Packages, name: &str) -> Installed {
    let result = match p.kind {
        PackageKind::Deb => query(
            Command::new("dpkg-query")
                .arg(format!("--admindir={DPKG_ADMINDIR}"))
                .args(["--show", "--showformat=${Version}\\t${Status}\\n", "--"])
                .arg(name),
        )
        .map(|out| {
            out.and_then(|text| {
                let line = text.lines().next()?.to_string();
                let (version, status) = line.split_once('\t')?;
                // "install ok installed": the last word is the state.
                let state = status.rsplit(' ').next().unwrap_or("").to_string();
                match state.as_str() {
                    "not-installed" | "config-files" | "" => None,
                    "installed" => Some((version.to_string(), None)),
                    _ => Some((version.to_string(), Some(state))),
                }
            })
        })
        .and_then(|found| match found {
            Some((_, Some(state))) if !dpkg_db::INSTALLED_STATES.contains(&state.as_str()) => Err(
                format!("dpkg-query reports {name} in a state dpkg does not write"),
            ),
            other => Ok(other),
        }),
        PackageKind::Rpm => query(
            Command::new("rpm")
                .arg(format!("--dbpath={}", p.database))
                .args([
                    "--query",
                    "--queryformat",
                    "%|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE}\\n",
                    "--",
                ])
                .arg(name),
        )
        .map(|out| out.and_then(|text| text.lines().last().map(|v| (v.to_string(), None)))),
    };
    let result = result.and_then(|found| match found {
        // Into the report and the run log: bounded, as the direct read's.
        Some((version, _)) if !dpkg_db::is_plain_version(&version) => Err(format!(
            "the database's version of {name} is not 1-128 printable ASCII characters without a space"
        )),
        other => Ok(other),
    });
    match result {
        Ok(Some((version, state))) => Installed {
            version: Some(version),
            state,
            error: None,
        },
        Ok(None) => Installed::default(),
        Err(e) => {
            tracing::warn!("package database query: {e}");
            Installed {
                error: Some(e),
                ..Installed::default()
            }
        }
    }
}

/// The absolute paths the database lists for an installed package.
fn owned_files(p: &Packages, name: &str, list: FileList) -> Vec<PathBuf> {
    if let FileList::Dpkg(list) = list {
        match dpkg_db::list_files(&list) {
            Ok(files) => return files,
            Err(e) => tracing::info!("dpkg's file list is read with dpkg-query: {e}"),
        }
    }
    let out = match p.kind {
        PackageKind::Deb => query(
            Command::new("dpkg-query")
                .arg(format!("--admindir={DPKG_ADMINDIR}"))
                .args(["--listfiles", "--"])
                .arg(name),
        ),
        PackageKind::Rpm => query(
            Command::new("rpm")
                .arg(format!("--dbpath={}", p.database))
                .args(["--query", "--list", "--"])
                .arg(name),
        ),
    };
    match out {
        Ok(Some(text)) => text
            .lines()
            // Diversion notes and "(contains no files)" are not paths.
            .filter(|l| l.starts_with('/') && *l != "/.")
            .map(PathBuf::from)
            .collect(),
        Ok(None) => vec![],
        Err(e) => {
            tracing::warn!("package file list: {e}");
            vec![]
        }
    }
}

/// After the run: the package changes into the report, and the run fails
/// if a package is not installed at its bundle's version afterwards (a
/// maintainer script failed, or the bundle's command changed it again),
/// whatever the exit status said. Returns the files the packages replaced
/// or removed.
pub fn after_run(
    p: &Packages,
    before: Snapshot,
    report: &mut rollguard_shared::report::RunReport,
) -> BTreeSet<PathBuf> {
    record(before.finish(p), report)
}

/// After a preview: the package changes it would make into the report,
/// from its layers ([`PreviewAfter`]); the preview fails, as the run
/// would, if a package would not be installed at its bundle's version.
pub fn after_preview(
    p: &Packages,
    before: Snapshot,
    after: PreviewAfter,
    report: &mut rollguard_shared::report::RunReport,
) {
    record(before.finish_preview(p, after), report);
}

fn record(
    outcome: PackagesOutcome,
    report: &mut rollguard_shared::report::RunReport,
) -> BTreeSet<PathBuf> {
    use rollguard_shared::report::RunStatus;
    if !outcome.triggers_pending.is_empty() {
        tracing::info!(
            packages = %outcome.triggers_pending.join(", "),
            "triggers pending, not run: apt runs them at its end, or dpkg --triggers-only --pending"
        );
    }
    report.triggers_pending = outcome.triggers_pending;
    log_changes(&outcome.changes);
    report.packages = outcome.changes;
    if let Some(m) = outcome.mismatch {
        if report.status == RunStatus::Succeeded {
            report.status = RunStatus::Failed;
        }
        let note = format!("packages: {m}");
        report.reason = Some(match report.reason.take() {
            Some(r) => format!("{r}; {note}"),
            None => note,
        });
    }
    outcome.replaced
}

/// Log the package changes (one line each) for operators reading the
/// agent's journal.
pub fn log_changes(changes: &[PackageChange]) {
    for c in changes {
        tracing::info!(
            manager = %c.manager,
            package = %c.name,
            before = c.before.as_deref().unwrap_or("(none)"),
            after = c.after.as_deref().unwrap_or("(none)"),
            "package changed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rollguard_shared::manifest::packages::PackageToken;
    use rollguard_shared::manifest::{DerivedPackage, PayloadPath};
    use rollguard_shared::ScopePath;

    /// A file listed beneath a symlinked directory (merged /usr) is named
    /// by its real directory, as `/proc/PID/maps` names it; the name
    /// itself is not followed, and what cannot be resolved stays as is.
    #[test]
    fn replaced_files_are_named_as_processes_map_them() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        std::fs::create_dir(root.join("usr-lib")).unwrap();
        std::os::unix::fs::symlink("usr-lib", root.join("lib")).unwrap();
        std::fs::write(root.join("usr-lib/libx.so.1.2"), b"").unwrap();
        std::os::unix::fs::symlink("libx.so.1.2", root.join("usr-lib/libx.so.1")).unwrap();
        let mut dirs = std::collections::HashMap::new();
        assert_eq!(
            as_mapped(&root.join("lib/libx.so.1.2"), &mut dirs),
            root.join("usr-lib/libx.so.1.2")
        );
        assert_eq!(
            as_mapped(&root.join("lib/libx.so.1"), &mut dirs),
            root.join("usr-lib/libx.so.1")
        );
        assert_eq!(
            as_mapped(&root.join("gone/libx.so"), &mut dirs),
            root.join("gone/libx.so")
        );
    }

    fn packages(kind: PackageKind) -> Packages {
        Packages {
            kind,
            install: vec![DerivedPackage {
                file: PayloadPath::parse("debs/it's.deb").unwrap(),
                name: PackageToken::parse("rgtest").unwrap(),
                version: PackageToken::parse("2.0").unwrap(),
            }],
            database: ScopePath::parse(DPKG_ADMINDIR).unwrap(),
            write: vec![],
            delete: vec![],
        }
    }

    #[test]
    fn the_command_installs_then_runs_the_bundle_command() {
        let argv = sandbox_command(
            &packages(PackageKind::Deb),
            &["./apply.sh".to_string(), "it's".to_string()],
        );
        assert_eq!(argv[0], "/bin/sh");
        assert_eq!(argv[3], "rollguard-packages");
        assert_eq!(argv[4], "./debs/it's.deb");
        assert!(argv[2].contains("'/usr/bin/dpkg' '--admindir=/var/lib/dpkg'"));
        assert!(
            argv[2].ends_with(r"exec './apply.sh' 'it'\''s'"),
            "{}",
            argv[2]
        );
    }

    #[test]
    fn directories_are_created_0755_and_never_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        let deep = real.join("a/b/c");
        create_dirs(&deep).unwrap();
        for p in [real.join("a"), real.join("a/b"), deep.clone()] {
            let mode = std::fs::metadata(&p).unwrap().permissions();
            assert_eq!(
                std::os::unix::fs::PermissionsExt::mode(&mode) & 0o7777,
                0o755
            );
        }
        std::os::unix::fs::symlink(real.join("a"), real.join("link")).unwrap();
        let err = create_dirs(&real.join("link/x/y")).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        assert!(!real.join("a/x").exists());
        // What the walk meets is opened without following links: a link
        // where a directory is to be made (planted between the check and
        // the mkdir) is refused, and nothing is made through it.
        std::fs::create_dir(real.join("elsewhere")).unwrap();
        let racy = real.join("a/b/c/d");
        std::fs::create_dir(&racy).unwrap();
        std::fs::remove_dir(&racy).unwrap();
        std::os::unix::fs::symlink(real.join("elsewhere"), &racy).unwrap();
        let err = create_beneath(&real.join("a/b/c"), &[&racy, &racy.join("e")]).unwrap_err();
        assert!(!real.join("elsewhere/e").exists(), "{err}");
        // A directory made meanwhile by someone else is not taken over.
        let theirs = real.join("a/b/c/theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let err = create_beneath(&real.join("a/b/c"), &[&theirs, &theirs.join("e")]).unwrap_err();
        assert!(err.to_string().contains("uid 65534"), "{err}");
        assert!(!theirs.join("e").exists());
        // ... nor one that appeared where the last one was to be made.
        let err = create_beneath(&theirs, &[]).unwrap_err();
        assert!(err.to_string().contains("uid 65534"), "{err}");
        // Beneath a setgid directory of another group: still root:root.
        let shared = real.join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::os::unix::fs::chown(&shared, Some(0), Some(65534)).unwrap();
        std::fs::set_permissions(
            &shared,
            std::os::unix::fs::PermissionsExt::from_mode(0o2775),
        )
        .unwrap();
        create_dirs(&shared.join("pkg")).unwrap();
        let made = std::fs::metadata(shared.join("pkg")).unwrap();
        assert_eq!(
            (made.uid(), made.gid(), made.mode() & 0o7777),
            (0, 0, 0o755)
        );
    }

    #[test]
    fn two_debs_get_their_own_pending_triggers_run_by_name() {
        let mut p = packages(PackageKind::Deb);
        let mut other = p.install[0].clone();
        other.name = PackageToken::parse("rgother").unwrap();
        p.install.push(other);
        let argv = sandbox_command(&p, &[]);
        assert_eq!(argv[0], "/bin/sh");
        let script = &argv[2];
        assert!(
            script.contains(
                "'--showformat=${db:Status-Status}=${Package}=${Version}=${binary:Package}\\n' '--' 'rgtest' 'rgother') || exit $?"
            ),
            "{script}"
        );
        // The bundle's own name and version only.
        assert!(
            script.contains(
                "case $s in 'triggers-pending=rgtest=2.0='*|'triggers-pending=rgother=2.0='*) pending=\"$pending ${s##*=}\""
            ),
            "{script}"
        );
        assert!(
            script.ends_with(
                "'/usr/bin/dpkg' '--admindir=/var/lib/dpkg' '--log=/var/log/dpkg.log' '--no-triggers' '--triggers-only' '--' $pending || exit $?"
            ),
            "{script}"
        );
        assert!(!script.contains("--pending"), "{script}");
        // An rpm bundle has no such step.
        let mut r = p.clone();
        r.kind = PackageKind::Rpm;
        assert_eq!(sandbox_command(&r, &[])[0], "/usr/bin/rpm");
    }

    #[test]
    fn without_a_command_only_the_install_runs_with_no_shell() {
        let argv = sandbox_command(&packages(PackageKind::Deb), &[]);
        assert_eq!(argv[0], "/usr/bin/dpkg");
        assert_eq!(argv[argv.len() - 2..], ["--", "./debs/it's.deb"]);
        assert!(argv.iter().all(|a| !a.contains("exec")));
    }
}
