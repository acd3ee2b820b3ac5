//! Pins: protected paths inside a write or delete scope, kept unchanged
//! (stage 2, inside the run's private mount namespace, right after the
//! scopes are made writable again; see [`super::readonly_mounts`]).
//!
//! A Landlock rule on a directory covers its whole subtree, so a write
//! scope such as `/usr/lib` would reach the stage-2 program beneath it. The
//! host policy lets a scope contain such a path only when the path is one
//! bundles may read (the agent's programs, its configuration directory, the
//! loader's files, its unit: see `ProtectedNow::check_scope`), and the
//! sandbox then pins it:
//!
//! - the pin is bound onto itself (recursively) and made read-only: writing,
//!   truncating, chmod, chown, utimes, xattrs answer `EROFS`; it is a mount
//!   point, so unlinking it, renaming it away, renaming something over it
//!   or removing it answer `EBUSY`; a hard link to it would cross mounts
//!   (`EXDEV`);
//! - every directory strictly between the outermost scope holding the pin
//!   and the pin (other than the scopes themselves, which are bound
//!   already) is bound onto itself (writable, as it was): a mount point
//!   cannot be renamed or removed (`EBUSY`). The kernel does let a
//!   directory that merely *contains* a mount point be renamed
//!   (`vfs_rename` checks the moved and the replaced entry only), which
//!   would leave the pin's path free to be recreated by the bundle; hence
//!   every ancestor up to the outermost scope, whose own bind makes it a
//!   mount point too. Not only up to the innermost scope: with scopes
//!   `/usr/local/lib` and `/usr/local/lib/systemd/system`, renaming
//!   `/usr/local/lib/systemd` would carry the inner scope and its pins
//!   away, and the bundle could make a fresh unit directory in its place.
//!
//! Every bind is made with `open_tree(OPEN_TREE_CLONE | AT_RECURSIVE |
//! AT_SYMLINK_NOFOLLOW)` and `move_mount` onto the same path, which never
//! follows a symlink at the last component (`mount(MS_BIND)` would bind the
//! link's target instead). So a pin that is itself a symlink (an
//! enablement link of the agent's unit in a `.wants` directory, a unit
//! masked or linked from elsewhere) is pinned as the link: a mount point,
//! it cannot be removed, renamed or replaced (`EBUSY`), and a link's target
//! cannot be changed in place. What it points to is protected under its
//! own (resolved) name.
//!
//! A pin that does not exist cannot be bound. Its nearest existing real
//! directory is pinned instead (read-only as a whole), so the path cannot
//! be created there; when that directory is the scope itself, the run is
//! refused: the bundle could create the path.
//! Except for a drop-in directory of the agent's unit: the agent creates it
//! beforehand, empty ([`plan_with_placeholders`], [`create_placeholder`];
//! `policy::Pins::drop_in_dirs` says which pins qualify), and it is then
//! pinned like any existing directory. Stage 2 only ever uses [`plan`].
//! A component inside the scope above the pin that is a symlink or a file
//! ends the walk the same way (the file is pinned itself: it cannot then be
//! replaced by a directory).
//!
//! The bundle cannot undo any of this: it has no `CAP_SYS_ADMIN`, and
//! seccomp refuses `mount`, `umount2`, `move_mount`, `open_tree`,
//! `mount_setattr`, `unshare`, `setns`, new namespaces and
//! `open_by_handle_at` (which could reopen the pin's inode through the
//! writable scope mount).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::mount_setattr::{self, Depth, MOUNT_ATTR_RDONLY};
use super::mountinfo;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PinError {
    #[error("protected path {pin} lies in no write or delete scope")]
    OutsideScopes { pin: PathBuf },
    #[error("protected path {pin} {what}, and the nearest directory that could hold it read-only is the scope {scope} itself: a bundle writing there could create it")]
    NoRoom {
        pin: PathBuf,
        scope: PathBuf,
        what: &'static str,
    },
    #[error("inspecting {path}: {why}")]
    Inspect { path: PathBuf, why: String },
}

/// What stage 2 mounts for a run's pins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PinPlan {
    /// Directories between the outermost scope holding a pin and the pin
    /// (scopes excepted), bound onto themselves (writable), shallowest
    /// first.
    pub ancestors: Vec<PathBuf>,
    /// Paths bound onto themselves read-only: the pins, or for a pin that
    /// cannot be bound, its nearest existing directory (none beneath
    /// another).
    pub read_only: Vec<PathBuf>,
}

/// Work out what to mount for `pins` inside `scopes` (the write and delete
/// scopes), looking at the filesystem now (`lstat`, never following a
/// symlink). The agent calls it before a run (a refusal then names the
/// reason) and stage 2 again just before it mounts.
pub fn plan(scopes: &[PathBuf], pins: &[PathBuf]) -> Result<PinPlan, PinError> {
    plan_with_placeholders(scopes, pins, &[]).map(|(plan, _)| plan)
}

/// A missing pin the agent creates as an empty directory before the run
/// (see [`create_placeholder`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placeholder {
    /// The scope it lies directly in (its parent).
    pub scope: PathBuf,
    pub path: PathBuf,
}

/// [`plan`], except that a pin listed in `may_create` that does not exist
/// directly in its scope (which [`plan`] refuses: the bundle could create
/// it) is returned as a [`Placeholder`] and planned as if it were the
/// directory the agent will create there. Only the agent uses it, before
/// the sandbox starts; it then plans again with [`plan`], which must
/// succeed, and so does stage 2.
pub fn plan_with_placeholders(
    scopes: &[PathBuf],
    pins: &[PathBuf],
    may_create: &[PathBuf],
) -> Result<(PinPlan, Vec<Placeholder>), PinError> {
    let mut read_only: Vec<PathBuf> = Vec::new();
    let mut ancestors: Vec<PathBuf> = Vec::new();
    let mut placeholders: Vec<Placeholder> = Vec::new();
    for pin in pins {
        // The innermost scope: its bind is the mount the pin lies on, and
        // a mount point itself.
        let scope = scopes
            .iter()
            .filter(|s| pin.starts_with(s) && pin != *s)
            .max_by_key(|s| s.components().count())
            .ok_or_else(|| PinError::OutsideScopes { pin: pin.clone() })?;
        let target = match target_of(scope, pin) {
            Err(PinError::NoRoom {
                what: "does not exist",
                ..
            }) if may_create.contains(pin) && pin.parent() == Some(scope.as_path()) => {
                placeholders.push(Placeholder {
                    scope: scope.clone(),
                    path: pin.clone(),
                });
                pin.clone()
            }
            other => other?,
        };
        // Up to the outermost scope holding the pin, not the innermost: a
        // directory between two nested scopes is not a mount point, and
        // renaming it would carry the inner scope (and the pin) away.
        let outermost = scopes
            .iter()
            .filter(|s| pin.starts_with(s) && pin != *s)
            .min_by_key(|s| s.components().count())
            .unwrap_or(scope);
        let mut between = target.parent();
        while let Some(dir) = between {
            if dir == outermost.as_path() || !dir.starts_with(outermost) {
                break;
            }
            // A scope is bound onto itself already: a mount point.
            if !scopes.iter().any(|s| s == dir) {
                ancestors.push(dir.to_path_buf());
            }
            between = dir.parent();
        }
        read_only.push(target);
    }
    read_only.sort();
    read_only.dedup();
    // A read-only bind covers everything beneath it.
    let covered = |p: &Path, list: &[PathBuf]| list.iter().any(|r| p.starts_with(r) && p != r);
    let outer: Vec<PathBuf> = read_only
        .iter()
        .filter(|p| !covered(p, &read_only))
        .cloned()
        .collect();
    ancestors.sort_by_key(|a| (a.components().count(), a.clone()));
    ancestors.dedup();
    ancestors.retain(|a| !outer.iter().any(|r| a.starts_with(r)));
    placeholders.sort_by(|a, b| a.path.cmp(&b.path));
    placeholders.dedup();
    Ok((
        PinPlan {
            ancestors,
            read_only: outer,
        },
        placeholders,
    ))
}

#[derive(Debug, thiserror::Error)]
pub enum PlaceholderError {
    #[error("{path}: not directly inside the scope {scope}")]
    NotInScope { scope: PathBuf, path: PathBuf },
    #[error("the scope {scope} is not its own real path ({real}): no placeholder is created through a symlink")]
    NotRealPath { scope: PathBuf, real: PathBuf },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// Create `p` as an empty directory, root:root 0755, in its scope; `false`
/// when something already has its name (nothing is touched then: the
/// caller plans again, and what is there is pinned or refused as usual).
///
/// Never through a symlink: the scope is opened with `O_NOFOLLOW |
/// O_DIRECTORY`, the opened directory must be the scope's own real path
/// (checked on the descriptor, so no component above it was a symlink),
/// and the directory is made with `mkdirat` on that descriptor (which
/// never follows a symlink in the last component: an existing entry,
/// symlink or not, is `EEXIST`).
pub fn create_placeholder(p: &Placeholder) -> Result<bool, PlaceholderError> {
    use rustix::fs::{fchmod, fchown, mkdirat, openat, Gid, Mode, OFlags, Uid, CWD};
    use std::os::fd::AsRawFd;

    let io_err = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |e: rustix::io::Errno| PlaceholderError::Io {
            what,
            path,
            source: e.into(),
        }
    };
    let name = match p.path.file_name() {
        Some(name) if p.path.parent() == Some(p.scope.as_path()) => name,
        _ => {
            return Err(PlaceholderError::NotInScope {
                scope: p.scope.clone(),
                path: p.path.clone(),
            })
        }
    };
    let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let scope = openat(CWD, &p.scope, dir_flags, Mode::empty())
        .map_err(io_err("opening the scope", &p.scope))?;
    let real = fs::read_link(format!("/proc/self/fd/{}", scope.as_raw_fd())).map_err(|source| {
        PlaceholderError::Io {
            what: "reading the path of the opened scope",
            path: p.scope.clone(),
            source,
        }
    })?;
    if real != p.scope {
        return Err(PlaceholderError::NotRealPath {
            scope: p.scope.clone(),
            real,
        });
    }
    match mkdirat(&scope, name, Mode::from_raw_mode(0o755)) {
        Ok(()) => {}
        Err(rustix::io::Errno::EXIST) => return Ok(false),
        Err(e) => return Err(io_err("creating", &p.path)(e)),
    }
    // Whatever the umask and the scope's group (setgid) made of it.
    let dir = openat(&scope, name, dir_flags, Mode::empty())
        .map_err(io_err("opening the created", &p.path))?;
    fchown(&dir, Some(Uid::ROOT), Some(Gid::ROOT))
        .map_err(io_err("chown root:root of", &p.path))?;
    fchmod(&dir, Mode::from_raw_mode(0o755)).map_err(io_err("chmod 0755 of", &p.path))?;
    Ok(true)
}

/// What to bind read-only for `pin` inside `scope` (see the module docs).
fn target_of(scope: &Path, pin: &Path) -> Result<PathBuf, PinError> {
    let rest = pin.strip_prefix(scope).unwrap_or(Path::new(""));
    let mut at = scope.to_path_buf();
    for component in rest.components() {
        let next = at.join(component);
        let what = match fs::symlink_metadata(&next) {
            // The pin itself: bound as the link (see the module docs).
            Ok(m) if m.file_type().is_symlink() && next == pin => return Ok(next),
            Ok(m) if m.file_type().is_symlink() => "is a symlink",
            Ok(m) if m.is_dir() => {
                at = next;
                continue;
            }
            // A file (or another non-directory): pinned itself, so it can
            // be neither changed nor replaced by a directory.
            Ok(_) => return Ok(next),
            Err(e) if e.kind() == io::ErrorKind::NotFound => "does not exist",
            Err(e) => {
                return Err(PinError::Inspect {
                    path: next,
                    why: e.to_string(),
                })
            }
        };
        if at == scope {
            return Err(PinError::NoRoom {
                pin: pin.to_path_buf(),
                scope: scope.to_path_buf(),
                what,
            });
        }
        return Ok(at);
    }
    Ok(at)
}

#[derive(Debug, thiserror::Error)]
pub enum PinMountError {
    #[error(transparent)]
    Plan(#[from] PinError),
    #[error("{what} {path}: {source}")]
    Mount {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(transparent)]
    Mountinfo(#[from] mountinfo::MountinfoError),
    #[error("after pinning, {0} is not a read-only mount point")]
    NotPinned(PathBuf),
}

/// Mount `plan` (see the module docs). Must run in the run's private mount
/// namespace, after the scopes were bound and made writable, before the
/// protected paths are covered (a cover beneath a pin goes on top of it).
/// Returns how many mounts were made.
pub fn apply(plan: &PinPlan) -> Result<usize, PinMountError> {
    let bind = |path: &Path, what: &'static str| {
        bind_onto_itself(path).map_err(|source| PinMountError::Mount {
            what,
            path: path.to_path_buf(),
            source,
        })
    };
    // Shallowest first: a recursive bind copies the mounts beneath it, and
    // the deeper ones do not exist yet.
    for dir in &plan.ancestors {
        bind(dir, "binding the directory above a pin")?;
    }
    for pin in &plan.read_only {
        bind(pin, "binding the pin")?;
        mount_setattr::set(pin, Depth::Recursive, MOUNT_ATTR_RDONLY, 0).map_err(|source| {
            PinMountError::Mount {
                what: "making the pin read-only",
                path: pin.clone(),
                source,
            }
        })?;
    }
    // Checked on what the kernel now lists, not on what we asked for.
    let mounts = mountinfo::read_self()?;
    for pin in &plan.read_only {
        let pinned =
            mountinfo::mount_of(&mounts, pin).is_some_and(|m| m.mount_point == *pin && !m.is_rw());
        if !pinned {
            return Err(PinMountError::NotPinned(pin.clone()));
        }
    }
    for dir in &plan.ancestors {
        if mountinfo::mount_of(&mounts, dir).is_none_or(|m| m.mount_point != *dir) {
            return Err(PinMountError::NotPinned(dir.clone()));
        }
    }
    Ok(plan.ancestors.len() + plan.read_only.len())
}

/// Bind `path` onto itself with the mounts beneath it, never following a
/// symlink at its last component: `open_tree` clones the mount tree at the
/// path itself (`AT_SYMLINK_NOFOLLOW`: a symlink stays the link), and
/// `move_mount` without `MOVE_MOUNT_T_SYMLINKS` attaches the clone at that
/// same path. The components above are the host's own directories, as
/// `plan` found them (the bundle does not exist yet); `apply` checks the
/// result in the mount table.
fn bind_onto_itself(path: &Path) -> io::Result<()> {
    use rustix::fs::CWD;
    use rustix::mount::{move_mount, open_tree, MoveMountFlags, OpenTreeFlags};
    let tree = open_tree(
        CWD,
        path,
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_RECURSIVE
            | OpenTreeFlags::AT_SYMLINK_NOFOLLOW,
    )?;
    move_mount(
        &tree,
        "",
        CWD,
        path,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        fs::create_dir_all(root.join("usr/lib/rollguard")).unwrap();
        fs::write(root.join("usr/lib/rollguard/stage2"), "").unwrap();
        fs::create_dir_all(root.join("usr/lib/systemd/system")).unwrap();
        fs::create_dir_all(root.join("usr/sbin")).unwrap();
        fs::write(root.join("usr/sbin/agent"), "").unwrap();
        std::os::unix::fs::symlink("elsewhere", root.join("usr/lib/link")).unwrap();
        (dir, root)
    }

    #[test]
    fn pins_existing_paths_and_every_directory_above_them() {
        let (_d, r) = tree();
        let scopes = [r.join("usr")];
        let p = plan(
            &scopes,
            &[
                r.join("usr/lib/rollguard/stage2"),
                r.join("usr/lib/rollguard"),
                r.join("usr/sbin/agent"),
            ],
        )
        .unwrap();
        // The file beneath a pinned directory needs nothing of its own.
        assert_eq!(
            p.read_only,
            vec![r.join("usr/lib/rollguard"), r.join("usr/sbin/agent")]
        );
        assert_eq!(p.ancestors, vec![r.join("usr/lib"), r.join("usr/sbin")]);
    }

    #[test]
    fn directories_between_nested_scopes_above_a_pin_are_pinned_too() {
        let (_d, r) = tree();
        let units = r.join("usr/lib/systemd/system");
        fs::write(units.join("agent.service"), "").unwrap();
        let scopes = [r.join("usr"), units.clone()];
        let p = plan(&scopes, &[units.join("agent.service")]).unwrap();
        assert_eq!(p.read_only, vec![units.join("agent.service")]);
        assert_eq!(
            p.ancestors,
            vec![r.join("usr/lib"), r.join("usr/lib/systemd")]
        );
    }

    #[test]
    fn a_missing_pin_pins_its_nearest_directory_or_is_refused() {
        let (_d, r) = tree();
        let scopes = [r.join("usr"), r.join("usr/lib/systemd/system")];
        // Nothing of it below the scope: refused.
        let p = plan(&scopes, &[r.join("usr/libexec/rollguard/stage2")]);
        assert!(
            matches!(&p, Err(PinError::NoRoom { scope, what: "does not exist", .. }) if *scope == r.join("usr")),
            "{p:?}"
        );
        // Its directory exists below the scope: that directory goes
        // read-only.
        let p = plan(&scopes, &[r.join("usr/lib/rollguard/missing")]).unwrap();
        assert_eq!(p.read_only, vec![r.join("usr/lib/rollguard")]);
        assert_eq!(p.ancestors, vec![r.join("usr/lib")]);
        // Directly in the (innermost) scope: refused.
        let e = plan(&scopes, &[r.join("usr/lib/systemd/system/x.service.d")]).unwrap_err();
        assert!(
            e.to_string().contains("could create it") && e.to_string().contains("system"),
            "{e}"
        );
        // A symlink above the pin ends the walk: what is beneath it is
        // elsewhere.
        let e = plan(&scopes, &[r.join("usr/lib/link/x")]).unwrap();
        assert_eq!(e.read_only, vec![r.join("usr/lib")]);
        assert!(e.ancestors.is_empty());
        let e = plan(&[r.join("usr/lib")], &[r.join("usr/lib/link/x")]).unwrap_err();
        assert!(
            matches!(
                e,
                PinError::NoRoom {
                    what: "is a symlink",
                    ..
                }
            ),
            "{e}"
        );
        // A pin that is a symlink is pinned as the link, even directly in
        // its scope.
        let p = plan(&[r.join("usr/lib")], &[r.join("usr/lib/link")]).unwrap();
        assert_eq!(p.read_only, vec![r.join("usr/lib/link")]);
        assert!(p.ancestors.is_empty());
        // A file on the way is pinned itself.
        let p = plan(&scopes, &[r.join("usr/sbin/agent/x")]).unwrap();
        assert_eq!(p.read_only, vec![r.join("usr/sbin/agent")]);
        // Outside every scope, or the scope itself: not a pin.
        assert!(matches!(
            plan(&scopes, &[r.join("etc/x")]),
            Err(PinError::OutsideScopes { .. })
        ));
        assert!(matches!(
            plan(&scopes, &[r.join("usr")]),
            Err(PinError::OutsideScopes { .. })
        ));
    }

    #[test]
    fn a_missing_drop_in_directory_directly_in_a_scope_becomes_a_placeholder() {
        use std::os::unix::fs::MetadataExt;
        let (_d, r) = tree();
        let units = r.join("usr/lib/systemd/system");
        let scopes = [units.clone()];
        let drop_in = units.join("rollguard-agent.service.d");
        let preload = units.join("ld.so.preload");
        let pins = [drop_in.clone(), preload.clone()];
        // Not allowed to be created: refused as by `plan`.
        let e = plan_with_placeholders(&scopes, &pins, std::slice::from_ref(&drop_in));
        assert!(
            matches!(e, Err(PinError::NoRoom { ref pin, .. }) if *pin == preload),
            "{e:?}"
        );
        let (p, holders) = plan_with_placeholders(
            &scopes,
            std::slice::from_ref(&drop_in),
            std::slice::from_ref(&drop_in),
        )
        .unwrap();
        assert_eq!(p.read_only, vec![drop_in.clone()]);
        assert!(p.ancestors.is_empty());
        let holder = Placeholder {
            scope: units.clone(),
            path: drop_in.clone(),
        };
        assert_eq!(holders, vec![holder.clone()]);
        // Only directly in the scope: deeper, the nearest directory is
        // pinned as before; with nothing between, refused.
        let deeper = r.join("usr/lib/systemd/system/x/service.d");
        let (p, holders) = plan_with_placeholders(
            &[r.join("usr/lib/systemd")],
            std::slice::from_ref(&deeper),
            std::slice::from_ref(&deeper),
        )
        .unwrap();
        assert_eq!(p.read_only, vec![units.clone()]);
        assert!(holders.is_empty());
        let e = plan_with_placeholders(
            &[r.join("usr/lib")],
            std::slice::from_ref(&deeper),
            std::slice::from_ref(&deeper),
        )
        .unwrap();
        assert_eq!(e.0.read_only, vec![units.clone()]);
        let deeper = r.join("usr/lib/nothing/service.d");
        let e = plan_with_placeholders(
            &[r.join("usr/lib")],
            std::slice::from_ref(&deeper),
            std::slice::from_ref(&deeper),
        );
        assert!(matches!(e, Err(PinError::NoRoom { .. })), "{e:?}");

        // Created empty, 0755 root:root whatever the umask; then `plan`
        // (stage 2's) accepts it.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let created = create_placeholder(&holder);
        nix::sys::stat::umask(old);
        assert!(created.unwrap());
        let m = fs::symlink_metadata(&drop_in).unwrap();
        assert!(m.is_dir());
        assert_eq!(m.mode() & 0o7777, 0o755);
        assert_eq!((m.uid(), m.gid()), (0, 0));
        assert_eq!(fs::read_dir(&drop_in).unwrap().count(), 0);
        assert_eq!(
            plan(&scopes, std::slice::from_ref(&drop_in))
                .unwrap()
                .read_only,
            vec![drop_in.clone()]
        );
        // Existing now: left alone.
        assert!(!create_placeholder(&holder).unwrap());
        // Never through a symlink: not at the name, not above it.
        fs::remove_dir(&drop_in).unwrap();
        std::os::unix::fs::symlink(r.join("usr/sbin"), &drop_in).unwrap();
        assert!(!create_placeholder(&holder).unwrap());
        assert!(fs::symlink_metadata(&drop_in)
            .unwrap()
            .file_type()
            .is_symlink());
        fs::remove_file(&drop_in).unwrap();
        std::os::unix::fs::symlink(&units, r.join("units")).unwrap();
        let via_link = Placeholder {
            scope: r.join("units"),
            path: r.join("units/service.d"),
        };
        assert!(matches!(
            create_placeholder(&via_link),
            Err(PlaceholderError::Io { .. })
        ));
        let via_parent_link = Placeholder {
            scope: r.join("usr/lib/link2/system"),
            path: r.join("usr/lib/link2/system/service.d"),
        };
        std::os::unix::fs::symlink(r.join("usr/lib/systemd"), r.join("usr/lib/link2")).unwrap();
        assert!(matches!(
            create_placeholder(&via_parent_link),
            Err(PlaceholderError::NotRealPath { .. })
        ));
        assert!(!units.join("service.d").exists());
        // Not directly in its scope: refused.
        let bad = Placeholder {
            scope: r.join("usr/lib"),
            path: drop_in.clone(),
        };
        assert!(matches!(
            create_placeholder(&bad),
            Err(PlaceholderError::NotInScope { .. })
        ));
    }
}
