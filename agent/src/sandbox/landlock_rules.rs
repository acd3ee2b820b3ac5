//! The Landlock domain of a run: what the bundle may read, write, delete,
//! execute and connect to.
//!
//! Landlock is allow-list only: every access right the kernel supports is
//! *handled* (denied unless a rule grants it), and rules grant rights on a
//! file or beneath a directory. A protected path therefore cannot be
//! "subtracted" from a grant on one of its ancestors; instead, to grant a
//! right on everything except the protected paths, we walk from the grant
//! root down towards each protected path and, at each ancestor directory,
//! grant the right on every entry *except* the one leading to the protected
//! path, into which we recurse. Nothing is ever granted on an ancestor
//! itself, and symlinks are never followed (rules attach to inodes; a
//! symlink entry is simply skipped).
//!
//! Consequences worth knowing:
//! - listing an ancestor of a protected path (`ls /`, `ls /srv`) is denied,
//!   because READ_DIR on it would extend to the protected path (except in
//!   an rpm install's run, `SandboxSpec::list_every_directory`: rpm needs
//!   to open every directory from `/` down; names become listable there,
//!   never a protected file's content);
//! - Landlock treats rename-over-an-existing-file as removing it, so
//!   `sed -i`-style replacement needs the directory in `scope.delete` too;
//! - `scope.delete` grants removing entries *beneath* a path, not the path
//!   itself (that would need a right on its parent);
//! - TCP is filtered by port only (no address filtering), and UDP is not
//!   filtered by Landlock at all (see [`super::seccomp_filter`] for what is
//!   blocked by socket family).
//!
//! Rule targets are opened with `O_PATH|O_NOFOLLOW` and the opened file's
//! real path is read back from `/proc/self/fd`: a scope path reached through
//! a symlink is refused (policy checks are lexical, so the lexical path must
//! be the real one), and overlap with protected paths is checked on what
//! was actually opened.

use rollguard_shared::PathIoError;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, NetPort, PathBeneath, Ruleset,
    RulesetAttr, RulesetCreated, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use std::os::unix::ffi::OsStrExt;

use super::spec::SandboxSpec;

#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    #[error("Landlock is unavailable: {0:?}; rollguard will not run a bundle unconfined")]
    Unavailable(super::landlock_abi::LandlockUnavailable),
    #[error("the kernel's Landlock ABI is {found}, this run needs at least {needed}")]
    AbiTooOld { found: u32, needed: u32 },
    #[error(transparent)]
    Io(#[from] PathIoError),
    #[error("{what} {path} does not exist; scope paths must exist before the run")]
    Missing { what: &'static str, path: PathBuf },
    #[error("{what} {path} resolves to {real} (through a symlink or a moved directory); name the real path")]
    NotReal {
        what: &'static str,
        path: PathBuf,
        real: PathBuf,
    },
    #[error("{what} {path} overlaps the protected path {protected}")]
    OverlapsProtected {
        what: &'static str,
        path: PathBuf,
        protected: PathBuf,
    },
    #[error("the run directory {run_dir} lies within the {key} scope {scope}; the bundle could forge its own status")]
    RunDirInScope {
        run_dir: PathBuf,
        key: &'static str,
        scope: PathBuf,
    },
    #[error("landlock: {0}")]
    Ruleset(#[from] landlock::RulesetError),
    #[error("landlock ruleset was not fully enforced ({0:?})")]
    NotEnforced(RulesetStatus),
}

/// Read-only system locations needed to run programs when `scope.read`
/// confines reads. `/sys` is not included (only the CPU topology glibc and
/// runtimes read to size thread pools); `/proc` is (shells, runtimes and
/// `/proc/self/*` are everywhere; other processes' sensitive entries are
/// guarded by ptrace checks, which Landlock restricts to the run's domain).
const SYSTEM_READ: &[&str] = &[
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/hosts",
    "/etc/alternatives",
    "/proc",
    "/sys/devices/system/cpu",
    "/dev",
];

/// Extra read-only locations for name resolution and TLS, when the bundle
/// has a network scope.
const NETWORK_READ: &[&str] = &[
    "/etc/resolv.conf",
    "/etc/host.conf",
    "/etc/gai.conf",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/run/systemd/resolve",
];

/// Private scratch mounted by [`super::namespaces`] (fresh tmpfs: full
/// rights except device nodes, sockets and device ioctls).
const SCRATCH: &[&str] = &["/tmp", "/var/tmp", "/dev/shm"];

/// Device nodes the bundle may write (and ioctl, e.g. `isatty`).
const WRITABLE_DEVICES: &[&str] = &["/dev/null", "/dev/zero", "/dev/full", "/dev/tty"];

/// Summary of the enforced domain.
#[derive(Debug, Clone)]
pub struct Enforced {
    pub abi: u32,
    pub fs_rules: usize,
    pub tcp_ports: Vec<u16>,
    pub scoped: bool,
    pub log_new_exec: bool,
}

struct Rights {
    read: BitFlags<AccessFs>,
    write: BitFlags<AccessFs>,
    delete: BitFlags<AccessFs>,
    scratch: BitFlags<AccessFs>,
    device: BitFlags<AccessFs>,
    file: BitFlags<AccessFs>,
}

impl Rights {
    fn new(abi: ABI) -> Self {
        let all = AccessFs::from_all(abi);
        let read = AccessFs::ReadFile | AccessFs::ReadDir | AccessFs::Execute;
        let write = (AccessFs::WriteFile
            | AccessFs::MakeReg
            | AccessFs::MakeDir
            | AccessFs::MakeSym
            | AccessFs::Truncate
            | AccessFs::Refer)
            & all;
        let delete = (AccessFs::RemoveFile | AccessFs::RemoveDir | AccessFs::Refer) & all;
        // Scratch: everything except creating device nodes and sockets
        // (nothing could use a socket file: socket creation is blocked) and
        // device ioctls.
        let scratch = all
            & !(AccessFs::MakeChar
                | AccessFs::MakeBlock
                | AccessFs::MakeSock
                | AccessFs::IoctlDev
                | AccessFs::ResolveUnix);
        let device = (AccessFs::WriteFile | AccessFs::IoctlDev) & all;
        Rights {
            read,
            write,
            delete,
            scratch,
            device,
            file: AccessFs::from_file(abi),
        }
    }
}

/// Builds the rule set, one opened inode at a time.
struct Builder<'a> {
    ruleset: RulesetCreated,
    rights: &'a Rights,
    protected: &'a [PathBuf],
    rules: usize,
}

impl Builder<'_> {
    /// Add one rule on the inode at `path` (never following a symlink).
    fn add(
        &mut self,
        what: &'static str,
        path: &Path,
        access: BitFlags<AccessFs>,
    ) -> Result<(), LandlockError> {
        let (file, is_dir) = open_real(what, path)?;
        let access = if is_dir {
            access
        } else {
            access & self.rights.file
        };
        if access.is_empty() {
            return Ok(());
        }
        (&mut self.ruleset).add_rule(PathBeneath::new(file, access))?;
        self.rules += 1;
        Ok(())
    }

    /// Grant `access` on `path` and everything beneath it except the
    /// protected paths (see the module docs). Missing optional paths are
    /// skipped by the caller, not here.
    fn grant_excluding(
        &mut self,
        what: &'static str,
        path: &Path,
        access: BitFlags<AccessFs>,
    ) -> Result<(), LandlockError> {
        if self.protected.iter().any(|p| path.starts_with(p)) {
            return Ok(());
        }
        if !self.protected.iter().any(|p| p.starts_with(path)) {
            return self.add(what, path, access);
        }
        // `path` is a proper ancestor of a protected path: grant on its
        // entries, never on itself. The directory is opened (and its real
        // path checked) once; its entries are listed and opened relative to
        // that descriptor, each with O_NOFOLLOW, so an entry's real path is
        // by construction `path/name` and needs no check of its own. This
        // walk visits every entry of every ancestor (`/`, `/var`, ...), so
        // it is kept to three system calls per entry (open, fstat, add).
        let (dir, _) = open_real(what, path)?;
        let listing = rustix::fs::openat(
            &dir,
            c".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| PathIoError::new("opening", path, e.into()))?;
        let entries = rustix::fs::Dir::new(listing)
            .map_err(|e| PathIoError::new("listing", path, e.into()))?;
        for entry in entries {
            let entry = entry.map_err(|e| PathIoError::new("listing", path, e.into()))?;
            let name = entry.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            let child = path.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
            if self.protected.iter().any(|p| p == &child) {
                continue;
            }
            // From the directory entry itself (d_type), without a stat
            // unless the file system does not fill it in.
            let kind = match entry.file_type() {
                FileType::Unknown => {
                    match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                        Ok(st) => FileType::from_raw_mode(st.st_mode),
                        // Vanished since readdir: nothing to grant.
                        Err(rustix::io::Errno::NOENT) => continue,
                        Err(e) => {
                            return Err(PathIoError::new("inspecting", &child, e.into()).into())
                        }
                    }
                }
                kind => kind,
            };
            let result = match kind {
                FileType::Directory if self.protected.iter().any(|p| p.starts_with(&child)) => {
                    self.grant_excluding(what, &child, access)
                }
                FileType::Directory | FileType::RegularFile => {
                    self.add_entry(&dir, name, &child, access)
                }
                // Symlinks, sockets, FIFOs and device nodes next to a
                // protected path get nothing.
                _ => Ok(()),
            };
            match result {
                Err(LandlockError::Io(e)) if e.kind() == io::ErrorKind::NotFound => continue,
                other => other?,
            }
        }
        Ok(())
    }

    /// Add one rule on the entry `name` of the directory `dir`, never
    /// following a symlink. An entry that became something other than a
    /// file or directory since it was listed gets nothing.
    fn add_entry(
        &mut self,
        dir: &File,
        name: &std::ffi::CStr,
        child: &Path,
        access: BitFlags<AccessFs>,
    ) -> Result<(), LandlockError> {
        let fd = rustix::fs::openat(
            dir,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| PathIoError::new("opening", child, e.into()))?;
        let kind = rustix::fs::fstat(&fd)
            .map(|st| FileType::from_raw_mode(st.st_mode))
            .map_err(|e| PathIoError::new("inspecting", child, e.into()))?;
        let access = match kind {
            FileType::Directory => access,
            FileType::RegularFile => access & self.rights.file,
            _ => return Ok(()),
        };
        if access.is_empty() {
            return Ok(());
        }
        (&mut self.ruleset).add_rule(PathBeneath::new(fd, access))?;
        self.rules += 1;
        Ok(())
    }

    /// Let the bundle reopen its own stdin/stdout/stderr by path
    /// (`echo x > /dev/stderr` reopens `/proc/self/fd/2`): read/write on the
    /// files the agent opened for them (not on their directory). Pipes need
    /// nothing (Landlock does not restrict pseudo filesystems).
    fn grant_stdio(&mut self) -> Result<(), LandlockError> {
        for fd in 0..=2 {
            let link = PathBuf::from(format!("/proc/self/fd/{fd}"));
            // Following the magic link opens the very file behind the fd.
            let file = match OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH)
                .open(&link)
            {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(PathIoError::new("opening", link, e).into()),
            };
            let kind = file
                .metadata()
                .map_err(PathIoError::at("inspecting", &link))?
                .file_type();
            let access = if kind.is_file() {
                AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate
            } else if std::os::unix::fs::FileTypeExt::is_char_device(&kind) {
                AccessFs::ReadFile | AccessFs::WriteFile
            } else {
                continue;
            };
            (&mut self.ruleset).add_rule(PathBeneath::new(file, access & self.rights.file))?;
            self.rules += 1;
        }
        Ok(())
    }

    /// Like [`Self::grant_excluding`] for system locations that may be
    /// absent or be symlinks (`/lib64 -> usr/lib64` on merged-/usr hosts):
    /// those are skipped, their targets being covered on their own.
    fn grant_optional(
        &mut self,
        path: &str,
        access: BitFlags<AccessFs>,
    ) -> Result<(), LandlockError> {
        match fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => Ok(()),
            Ok(_) => self.grant_excluding("system path", Path::new(path), access),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(PathIoError::new("inspecting", path, e).into()),
        }
    }
}

/// Open `path` itself with `O_PATH|O_NOFOLLOW` and check that its real path
/// (as the kernel reports it) is exactly `path`.
fn open_real(what: &'static str, path: &Path) -> Result<(File, bool), LandlockError> {
    // std always adds O_CLOEXEC. (On glibc O_PATH is outside O_ACCMODE, so
    // std passes it through; the fstat below would catch any surprise.)
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)
        .map_err(PathIoError::at("opening", path))?;
    let meta = file
        .metadata()
        .map_err(PathIoError::at("inspecting", path))?;
    if meta.file_type().is_symlink() {
        return Err(LandlockError::NotReal {
            what,
            path: path.to_path_buf(),
            real: PathBuf::from("(a symlink)"),
        });
    }
    let real = fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(PathIoError::at("resolving", path))?;
    if real != path {
        return Err(LandlockError::NotReal {
            what,
            path: path.to_path_buf(),
            real,
        });
    }
    Ok((file, meta.is_dir()))
}

/// Scope paths must exist, be real (no symlink on the way), and not overlap
/// a protected path; the run directory must not be writable by the bundle.
fn check_scope_paths(spec: &SandboxSpec) -> Result<(), LandlockError> {
    let keyed = spec
        .scope
        .write
        .iter()
        .map(|p| ("scope.write", p))
        .chain(spec.scope.delete.iter().map(|p| ("scope.delete", p)))
        .chain(spec.scope.read.iter().map(|p| ("scope.read", p)));
    for (what, scope) in keyed {
        let path = scope.as_path();
        match open_real(what, path) {
            Ok(_) => {}
            Err(LandlockError::Io(e)) if e.kind() == io::ErrorKind::NotFound => {
                return Err(LandlockError::Missing {
                    what,
                    path: path.to_path_buf(),
                })
            }
            Err(e) => return Err(e),
        }
        // Reads may cover an ancestor of a protected path (handled by the
        // walk); writes and deletes beneath a path would reach it, unless
        // it lies beneath a pin (read-only, and covered: see `pins`).
        for protected in &spec.protected {
            let overlaps = if what == "scope.read" {
                path.starts_with(protected)
            } else {
                path.starts_with(protected)
                    || (protected.starts_with(path) && !spec.pinned_within(path, protected))
            };
            if overlaps {
                return Err(LandlockError::OverlapsProtected {
                    what,
                    path: path.to_path_buf(),
                    protected: protected.clone(),
                });
            }
        }
    }
    for (key, scopes) in [("write", &spec.scope.write), ("delete", &spec.scope.delete)] {
        for scope in scopes {
            if spec.run_dir.starts_with(scope.as_path()) {
                return Err(LandlockError::RunDirInScope {
                    run_dir: spec.run_dir.clone(),
                    key,
                    scope: scope.as_path().to_path_buf(),
                });
            }
        }
    }
    Ok(())
}

/// Build the domain for `spec` and restrict the calling thread to it.
/// Must run after the private mounts exist (rules attach to the inodes of
/// the private `/tmp`, `/dev`, ...) and before seccomp.
pub fn restrict_self(spec: &SandboxSpec) -> Result<Enforced, LandlockError> {
    let abi_number = super::landlock_abi::probe().map_err(LandlockError::Unavailable)?;
    let needed = spec.required_landlock_abi();
    if abi_number < needed {
        return Err(LandlockError::AbiTooOld {
            found: abi_number,
            needed,
        });
    }
    let abi = ABI::from(i32::try_from(abi_number).unwrap_or(i32::MAX));
    check_scope_paths(spec)?;

    let rights = Rights::new(abi);
    // Hard requirement everywhere: if anything we ask for is unsupported the
    // build fails instead of silently weakening the sandbox.
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(abi))?;
    // TCP is handled whenever the kernel can (ABI 4): with no network scope
    // that denies all TCP bind/connect even inside the private namespace.
    // UDP (and addresses) are filtered by the run cgroup's BPF programs
    // (`net_filter`), which the agent attaches before stage 2 starts.
    let handles_tcp = abi >= ABI::V4;
    if handles_tcp {
        ruleset = ruleset.handle_access(AccessNet::BindTcp | AccessNet::ConnectTcp)?;
    }
    let scoped = abi >= ABI::V6;
    if scoped {
        ruleset = ruleset.scope(Scope::from_all(abi))?;
    }
    let mut created = ruleset.create()?;
    let log_new_exec = abi >= ABI::V7;
    if log_new_exec {
        // Denials after exec are not audited by default; we want every one.
        created = created.log_new_exec(true)?;
    }

    let mut b = Builder {
        ruleset: created,
        rights: &rights,
        protected: &spec.protected,
        rules: 0,
    };

    // Directory listings everywhere, for an rpm install (see the spec):
    // names only; file contents stay as granted below.
    if spec.list_every_directory && spec.scope.read.is_empty() {
        b.add("root", Path::new("/"), AccessFs::ReadDir.into())?;
    }
    // Reads (and execution).
    if spec.scope.read.is_empty() {
        if spec.protected.is_empty() {
            b.add("root", Path::new("/"), rights.read)?;
        } else {
            b.grant_excluding("root", Path::new("/"), rights.read)?;
        }
    } else {
        for path in SYSTEM_READ {
            b.grant_optional(path, rights.read)?;
        }
        if !spec.scope.network.is_empty() {
            for path in NETWORK_READ {
                b.grant_optional(path, rights.read)?;
            }
        }
        for scope in spec
            .scope
            .read
            .iter()
            .chain(&spec.scope.write)
            .chain(&spec.scope.delete)
        {
            b.grant_excluding("scope path", scope.as_path(), rights.read)?;
        }
    }
    // The payload is read and executed even if it lies beneath a protected
    // path (e.g. the agent's state directory): the rule is on its own inode.
    // (A protected path beneath the payload still gets nothing.)
    if spec
        .protected
        .iter()
        .any(|p| spec.payload_dir.starts_with(p))
    {
        b.add("payload directory", &spec.payload_dir, rights.read)?;
    } else {
        b.grant_excluding("payload directory", &spec.payload_dir, rights.read)?;
    }

    for scope in &spec.scope.write {
        b.add("scope.write", scope.as_path(), rights.write)?;
    }
    for scope in &spec.scope.delete {
        b.add("scope.delete", scope.as_path(), rights.delete)?;
    }
    // The private scratch tmpfs never holds host files, protected or not.
    for path in SCRATCH {
        if super::namespaces::is_real_dir(path) {
            b.add("scratch directory", Path::new(path), rights.scratch)?;
        }
    }
    // Service capture (`services::capture`): the links' target, this
    // program, executable whatever the read scope; in the request
    // directory, writes to the record stage 2 made there (append-only)
    // and nothing else: no new file, no truncation.
    if let Ok(exe) = std::env::current_exe() {
        if exe.is_file() && !spec.protected.iter().any(|p| exe.starts_with(p)) {
            b.add("service capture program", &exe, rights.read)?;
        }
    }
    let requests = crate::services::capture::REQUESTS_DIR;
    if super::namespaces::is_real_dir(requests) {
        b.add(
            "service request directory",
            Path::new(requests),
            (AccessFs::ReadFile | AccessFs::ReadDir | AccessFs::WriteFile)
                & AccessFs::from_all(abi),
        )?;
    }
    for path in WRITABLE_DEVICES {
        b.add("device", Path::new(path), rights.device)?;
    }
    b.grant_stdio()?;

    let fs_rules = b.rules;
    let mut created = b.ruleset;
    let tcp_ports = spec.scope.tcp_ports();
    for port in &tcp_ports {
        created = created.add_rule(NetPort::new(*port, AccessNet::ConnectTcp))?;
    }
    let status = created.restrict_self()?;
    if status.ruleset != RulesetStatus::FullyEnforced {
        return Err(LandlockError::NotEnforced(status.ruleset));
    }
    Ok(Enforced {
        abi: abi_number,
        fs_rules,
        tcp_ports: if handles_tcp { tcp_ports } else { Vec::new() },
        scoped,
        log_new_exec,
    })
}
