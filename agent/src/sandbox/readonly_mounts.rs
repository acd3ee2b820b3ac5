//! Read-only, `nodev` mounts outside the write/delete scopes, and masks over
//! the protected paths (stage 2, inside the run's private mount namespace).
//!
//! Landlock has no access right for metadata: chmod, chown, utimes, extended
//! attributes (ACLs included) and `chattr` are outside its reach. A
//! read-only mount stops all of them (the kernel answers `EROFS`), so, as
//! systemd's `ProtectSystem=strict` with `ReadWritePaths=` does:
//!
//! 1. each write/delete scope is bind-mounted onto itself, recursively (so
//!    the mounts beneath it come along);
//! 2. the whole tree from `/` is made read-only and `nodev` in one
//!    `mount_setattr(AT_RECURSIVE)` call; only the sandbox's own minimal
//!    `/dev`, mounted afterwards by [`super::namespaces`], is not `nodev`;
//! 3. the scope binds, and the mounts beneath them that were writable on
//!    the host, are made writable again (one mount each; a mount that was
//!    read-only on the host stays so: a scope never widens the host), and
//!    lose `nodev`: a device node placed in a scope is refused by the run
//!    cgroup's device program, which records the attempt, where a `nodev`
//!    refusal (it comes first) would be recorded nowhere;
//! 4. the pins ([`super::pins`]): protected paths bundles may read that lie
//!    inside a scope are bound read-only onto themselves, and every
//!    directory between the outermost scope holding them and them becomes
//!    a mount point, so they can be neither changed nor renamed, removed
//!    or replaced;
//! 5. every protected path, and every other mount of a protected path's
//!    data ([`super::mountinfo::aliases`]), is covered by an empty
//!    read-only node (a mode-000 directory or file on a private tmpfs, as
//!    systemd's `InaccessiblePaths=`), so even its metadata cannot be read
//!    or changed through the sandbox. When the payload lies beneath a
//!    protected path (the agent's state directory), the cover is an empty
//!    read-only tmpfs with the payload alone bound back into it.
//!
//! The private `/tmp`, `/var/tmp`, `/run` and `/dev` are mounted after this
//! step (fresh, writable mounts on top of the read-only tree).
//!
//! `EROFS` is decided before Landlock sees (and audits) a write, so these
//! refusals are reported through audit syscall-exit rules instead
//! ([`crate::kernel_audit::exit_rules`]).

use rollguard_shared::PathIoError;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::mount_setattr::{
    self, Depth, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY,
};
use super::mountinfo::{self, MountEntry};
use super::spec::SandboxSpec;
use super::{pins, preview_layers};

/// Where the cover nodes are made. It is replaced by the private `/run`
/// right after this step, so nothing of it stays visible.
const STAGING: &str = "/run";
/// Paths the private mounts replace: protected paths there need no cover.
const REPLACED: &[&str] = &["/tmp", "/var/tmp", "/run", "/dev"];

#[derive(Debug, thiserror::Error)]
pub enum ReadOnlyError {
    #[error(transparent)]
    Mountinfo(#[from] mountinfo::MountinfoError),
    #[error(transparent)]
    Io(#[from] PathIoError),
    #[error("{what} {path}: {source}")]
    Mount {
        what: &'static str,
        path: PathBuf,
        source: nix::Error,
    },
    #[error("scope path {scope} overlaps the protected path {protected}")]
    OverlapsProtected { scope: PathBuf, protected: PathBuf },
    #[error("scope path {scope} reaches protected data: {alias}")]
    AliasInScope { scope: PathBuf, alias: String },
    #[error("pinning: {0}")]
    Pins(#[from] pins::PinMountError),
    #[error("preview layers: {0}")]
    Preview(#[from] preview_layers::PreviewLayerError),
}

fn mount_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(nix::Error) -> ReadOnlyError + 'a {
    move |source| ReadOnlyError::Mount {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// What was done, for the run's confinement summary.
#[derive(Debug, Default)]
pub struct Applied {
    /// Mounts made writable again (scope binds and mounts beneath them).
    pub writable_mounts: usize,
    /// Mounts made for pins (read-only pins and the directories above them).
    pub pinned: usize,
    /// Paths covered: protected paths and other mounts of their data.
    pub masked: Vec<PathBuf>,
    /// A preview: the root of the tmpfs holding the layers' changes.
    pub preview: Option<std::os::fd::OwnedFd>,
}

/// Steps 1-5 of the module docs. Must run in the run's private mount
/// namespace, after `/` was made private, before the private scratch
/// mounts and before Landlock (whose rules attach to the inodes seen here).
pub fn apply(spec: &SandboxSpec) -> Result<Applied, ReadOnlyError> {
    let before = mountinfo::read_self()?;
    let aliases = mountinfo::aliases(&before, &spec.protected);
    let scopes = scope_paths(spec);
    // The agent refuses such a run before it starts; the table may have
    // changed since, so check again on what this namespace holds.
    for scope in &scopes {
        // Checked by the agent and again by the Landlock step; here because
        // a scope bind over a protected path would make it writable.
        // A protected path may lie inside a scope only beneath a pin,
        // which step 4 makes read-only before step 5 covers it.
        if let Some(p) = spec.protected.iter().find(|p| {
            scope.starts_with(p) || (p.starts_with(scope) && !spec.pinned_within(scope, p))
        }) {
            return Err(ReadOnlyError::OverlapsProtected {
                scope: scope.clone(),
                protected: p.clone(),
            });
        }
        if let Some(alias) = mountinfo::alias_in_scope(&aliases, scope) {
            return Err(ReadOnlyError::AliasInScope {
                scope: scope.clone(),
                alias: alias.to_string(),
            });
        }
    }

    // 1. Scope binds, or in a preview the scopes' overlays (which take
    // their place). A missing scope is left to the Landlock step, which
    // refuses it with a clearer message.
    let preview = if spec.preview {
        Some(preview_layers::apply(
            &scopes,
            &before,
            spec.limits.tmp_bytes,
        )?)
    } else {
        None
    };
    for scope in scopes.iter().filter(|_| preview.is_none()) {
        match mount(
            Some(scope.as_path()),
            scope.as_path(),
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        ) {
            Ok(()) | Err(nix::Error::ENOENT) => {}
            Err(e) => return Err(mount_err("binding scope", scope)(e)),
        }
    }
    let bound = mountinfo::read_self()?;
    let writable = writable_again(&bound, &scopes);

    // 2. Everything read-only and nodev.
    mount_setattr::set(
        Path::new("/"),
        Depth::Recursive,
        MOUNT_ATTR_RDONLY | MOUNT_ATTR_NODEV,
        0,
    )
    .map_err(PathIoError::at(
        "making every mount read-only and nodev from",
        "/",
    ))?;

    // 3. Scopes writable again, and without nodev: a device node in a
    // scope is refused by the run cgroup's device program instead, which
    // records the attempt (a nodev refusal comes first and is recorded
    // nowhere). Outside the scopes nodev stays, a second layer.
    for path in &writable {
        mount_setattr::set(path, Depth::This, 0, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NODEV)
            .map_err(PathIoError::at("making writable again", path))?;
    }

    // 4. Pins: protected paths bundles may read inside the scopes, bound
    // read-only onto themselves, every directory above them up to their
    // scope a mount point (see `pins`). Planned again here, on what this
    // namespace sees now.
    let pinned = if spec.pins.is_empty() {
        0
    } else {
        let plan = pins::plan(&scopes, &spec.pins).map_err(pins::PinMountError::from)?;
        pins::apply(&plan)?
    };

    // 5. Covers.
    let mut targets: Vec<PathBuf> = spec
        .protected
        .iter()
        .cloned()
        .chain(aliases.iter().map(|a| a.exposed_at.clone()))
        .filter(|p| !REPLACED.iter().any(|r| p.starts_with(r)))
        .collect();
    targets.sort();
    targets.dedup();
    let masked = mask(spec, &targets)?;
    Ok(Applied {
        writable_mounts: writable.len(),
        pinned,
        masked,
        preview,
    })
}

/// The write and delete scopes, each once.
fn scope_paths(spec: &SandboxSpec) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = spec
        .scope
        .write
        .iter()
        .chain(&spec.scope.delete)
        .map(|s| s.as_path().to_path_buf())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Mount points at or beneath a scope whose topmost mount is writable:
/// the scope binds themselves and the host's writable mounts beneath them.
fn writable_again(mounts: &[MountEntry], scopes: &[PathBuf]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for scope in scopes {
        for m in mounts.iter().filter(|m| m.mount_point.starts_with(scope)) {
            let topmost =
                mountinfo::mount_of(mounts, &m.mount_point).is_some_and(|top| top.id == m.id);
            if topmost && m.is_rw() && !out.contains(&m.mount_point) {
                out.push(m.mount_point.clone());
            }
        }
    }
    out
}

/// Cover each existing target with an empty read-only node (see the module
/// docs); returns the paths covered.
fn mask(spec: &SandboxSpec, targets: &[PathBuf]) -> Result<Vec<PathBuf>, ReadOnlyError> {
    // Classify first: nothing to cover for what does not exist, and a
    // symlink is not followed (its target, if protected, is listed too).
    let mut dirs = Vec::new();
    let mut others = Vec::new();
    for t in targets {
        match fs::symlink_metadata(t) {
            Ok(m) if m.file_type().is_symlink() => {}
            Ok(m) if m.is_dir() => dirs.push(t.clone()),
            Ok(_) => others.push(t.clone()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(PathIoError::new("inspecting protected path", t, e).into()),
        }
    }
    if dirs.is_empty() && others.is_empty() {
        return Ok(Vec::new());
    }
    // The payload, opened before anything covers it.
    let payload = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(&spec.payload_dir)
        .map_err(PathIoError::at("opening payload", &spec.payload_dir))?;

    let staging = Path::new(STAGING);
    mount(
        Some("tmpfs"),
        staging,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0700,size=16k,nr_inodes=8"),
    )
    .map_err(mount_err("mounting a staging tmpfs on", staging))?;
    let empty_dir = staging.join("dir");
    let empty_file = staging.join("file");
    fs::DirBuilder::new()
        .mode(0o000)
        .create(&empty_dir)
        .map_err(PathIoError::at("creating", &empty_dir))?;
    fs::set_permissions(&empty_dir, fs::Permissions::from_mode(0o000))
        .map_err(PathIoError::at("chmod", &empty_dir))?;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o000)
        .open(&empty_file)
        .map_err(PathIoError::at("creating", &empty_file))?;
    fs::set_permissions(&empty_file, fs::Permissions::from_mode(0o000))
        .map_err(PathIoError::at("chmod", &empty_file))?;
    let sealed = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC;
    mount_setattr::set(staging, Depth::This, sealed, 0)
        .map_err(PathIoError::at("sealing the staging tmpfs", staging))?;

    let mut masked = Vec::new();
    for (target, source) in dirs
        .iter()
        .map(|d| (d, &empty_dir))
        .chain(others.iter().map(|o| (o, &empty_file)))
    {
        if spec.payload_dir.starts_with(target) {
            cover_keeping_payload(target, &spec.payload_dir, payload.as_raw_fd())?;
        } else {
            mount(
                Some(source.as_path()),
                target.as_path(),
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(mount_err("covering protected path", target))?;
            mount_setattr::set(target, Depth::This, sealed, 0)
                .map_err(PathIoError::at("sealing the cover of", target))?;
        }
        masked.push(target.clone());
    }
    // The covers hold their own references to the nodes; the staging mount
    // itself goes (the private /run is mounted next).
    umount2(staging, MntFlags::MNT_DETACH).map_err(mount_err("detaching", staging))?;
    Ok(masked)
}

/// Cover `target` with an empty tmpfs that holds only the path down to the
/// payload, with the payload bound back (read-only, as everything outside
/// the scopes) at its own path.
fn cover_keeping_payload(
    target: &Path,
    payload_dir: &Path,
    payload_fd: i32,
) -> Result<(), ReadOnlyError> {
    mount(
        Some("tmpfs"),
        target,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755,size=16k"),
    )
    .map_err(mount_err("covering protected path", target))?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(payload_dir)
        .map_err(PathIoError::at(
            "creating the payload path in the cover of",
            target,
        ))?;
    mount(
        Some(Path::new(&format!("/proc/self/fd/{payload_fd}"))),
        payload_dir,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(mount_err("binding the payload back at", payload_dir))?;
    mount_setattr::set(
        target,
        Depth::Recursive,
        MOUNT_ATTR_RDONLY | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOSUID,
        0,
    )
    .map_err(PathIoError::at("sealing the cover of", target))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_and_host_writable_mounts_beneath_them_become_writable() {
        let table = "\
27 1 254:0 / / rw - ext4 /dev/vda rw
70 27 254:0 /srv/app /srv/app rw - ext4 /dev/vda rw
71 70 0:50 / /srv/app/cache rw - tmpfs tmpfs rw
72 70 0:51 / /srv/app/ro ro - tmpfs tmpfs rw
73 27 254:0 /etc /etc rw - ext4 /dev/vda rw
74 73 0:52 / /etc/x rw - tmpfs tmpfs rw
75 74 0:53 / /etc/x ro - tmpfs tmpfs rw
";
        let mounts = mountinfo::parse(table).unwrap();
        let w = writable_again(&mounts, &[PathBuf::from("/srv/app"), PathBuf::from("/etc")]);
        assert_eq!(
            w,
            vec![
                PathBuf::from("/srv/app"),
                PathBuf::from("/srv/app/cache"),
                PathBuf::from("/etc"),
            ]
        );
    }
}
