//! Preview layers: in a preview run every write/delete scope is an overlay
//! whose upper layer lies on a private tmpfs, so the bundle runs against
//! the real host and nothing it writes reaches the disk (stage 2, step 3,
//! in place of the scopes' self-binds of [`super::readonly_mounts`]).
//!
//! Each layer is an overlay mounted on the tmpfs and bound onto the path
//! the bundle uses; what follows in step 3 (read-only elsewhere, the
//! layers writable again, pins, covers) and Landlock apply on top exactly
//! as in a real run, so a denied access is the same denial.
//!
//! - A directory scope is one layer; overlayfs does not cross the mount
//!   points of its lower layer, so every host mount beneath it is handled
//!   on its own: a writable one is a layer too, a read-only one is bound
//!   back as it was (never recursively: each mount beneath is its own
//!   entry, so no writable host mount comes back unlayered).
//! - A file scope is the file of a layer over its parent directory, bound
//!   alone: only that file is writable, as in a real run.
//!
//! The tmpfs is bounded like the run's `/tmp` (the host's `tmp` limit).
//! Layout, written only by stage 2 (the bundle never sees the tmpfs: it is
//! detached before the bundle exists, kept alive by the overlays and by
//! the descriptor the agent receives on the gate):
//!
//! ```text
//! layers.json       [{"index": 0, "lower": "/srv/app", "only": null}, ...]
//! N/upper, N/work   overlay N's upper and work directories
//! N/merged          where overlay N was mounted before the tmpfs went
//! ```
//!
//! The agent reads the changes from it after the run ([`crate::preview`]).

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use rollguard_shared::PathIoError;
use serde::{Deserialize, Serialize};

use super::mountinfo::{self, MountEntry};

/// The layer list at the tmpfs root.
pub const LAYERS_FILE: &str = "layers.json";
/// Where the tmpfs is mounted while the layers are built; the private
/// `/run` replaces it afterwards (as for the covers' staging tmpfs).
const STAGING: &str = "/run";
/// The overlay options of every layer beyond its directories (why: at
/// their use in `overlay`). Public for the sandbox bench, which measures
/// an overlay alone.
pub const OVERLAY_OPTIONS: &str = "redirect_dir=off,index=off,metacopy=off,xino=off";
/// Most layers in one run (scopes and writable mounts beneath them).
pub const MAX_LAYERS: usize = 256;

/// One overlay: its changes are in `<index>/upper` on the tmpfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    pub index: usize,
    /// The host directory beneath the overlay (a directory scope, a mount
    /// point beneath one, or a file scope's parent).
    pub lower: PathBuf,
    /// A file scope: the one entry of `lower` the bundle can reach through
    /// this layer.
    pub only: Option<String>,
}

impl Layer {
    /// The upper directory, relative to the tmpfs root.
    pub fn upper(&self) -> String {
        format!("{}/upper", self.index)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PreviewLayerError {
    #[error(transparent)]
    Io(#[from] PathIoError),
    #[error("{what} {path}: {source}")]
    Mount {
        what: &'static str,
        path: PathBuf,
        source: nix::Error,
    },
    #[error("more than {MAX_LAYERS} preview layers (scopes and mounts beneath them)")]
    TooMany,
    #[error("scope {0} has no parent directory to layer")]
    NoParent(PathBuf),
    #[error("scope {0} is at or beneath /run, where the preview layers are built")]
    UnderStaging(PathBuf),
}

fn mount_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(nix::Error) -> PreviewLayerError + 'a {
    move |source| PreviewLayerError::Mount {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// What to put at one path, planned before anything is mounted (the paths
/// change meaning as the layers go on).
enum Target {
    /// An overlay over `lower` (opened now), bound at `at` (or, for a file
    /// scope, its file `only`).
    Layer {
        at: PathBuf,
        lower: File,
        lower_path: PathBuf,
        only: Option<String>,
    },
    /// A read-only host mount beneath a directory scope, bound back alone.
    Rebind { at: PathBuf, mount: File },
}

impl Target {
    fn at(&self) -> &Path {
        match self {
            Target::Layer { at, .. } | Target::Rebind { at, .. } => at,
        }
    }
}

/// Build the layers for `scopes` (sorted, each once) over the mount table
/// `mounts` read before anything was mounted; returns the tmpfs's root, to
/// hand to the agent. Must run in the run's private mount namespace, with
/// `/` private, before the read-only step.
pub fn apply(
    scopes: &[PathBuf],
    mounts: &[MountEntry],
    tmp_bytes: u64,
) -> Result<OwnedFd, PreviewLayerError> {
    let targets = plan(scopes, mounts)?;
    let staging = Path::new(STAGING);
    let inodes = (tmp_bytes / 4096).clamp(1024, 1 << 20);
    mount(
        Some("tmpfs"),
        staging,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(format!("mode=0700,size={tmp_bytes},nr_inodes={inodes}").as_str()),
    )
    .map_err(mount_err("mounting the preview tmpfs on", staging))?;
    let mut layers = Vec::new();
    for target in &targets {
        match target {
            Target::Layer {
                at,
                lower,
                lower_path,
                only,
            } => {
                let index = layers.len();
                let merged = overlay(staging, index, lower)?;
                let source = match only {
                    Some(name) => merged.join(name),
                    None => merged,
                };
                bind(&source, at).map_err(mount_err("binding the preview layer onto", at))?;
                layers.push(Layer {
                    index,
                    lower: lower_path.clone(),
                    only: only.clone(),
                });
            }
            Target::Rebind { at, mount: m } => {
                let source = PathBuf::from(format!("/proc/self/fd/{}", m.as_raw_fd()));
                bind(&source, at).map_err(mount_err("binding back the read-only mount", at))?;
            }
        }
    }
    let list = staging.join(LAYERS_FILE);
    let body = serde_json::to_vec(&layers).map_err(|e| {
        PathIoError::new(
            "writing",
            &list,
            io::Error::new(io::ErrorKind::InvalidData, e),
        )
    })?;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&list)
        .and_then(|mut f| f.write_all(&body))
        .map_err(PathIoError::at("writing", &list))?;
    let root = File::open(staging).map_err(PathIoError::at("opening", staging))?;
    // The overlays hold their own references to the tmpfs (overlayfs
    // clones the upper layer's mount), the agent gets `root`; the staging
    // mount itself goes, with the overlays' own mount points beneath it.
    umount2(staging, MntFlags::MNT_DETACH).map_err(mount_err("detaching", staging))?;
    Ok(root.into())
}

/// A plain, non-recursive bind of `source` onto `at`.
fn bind(source: &Path, at: &Path) -> nix::Result<()> {
    mount(
        Some(source),
        at,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
}

/// Overlay number `index` over `lower`, mounted at `<staging>/<index>/merged`,
/// its root given the lower root's mode and owner (an overlay's root takes
/// its upper directory's, which would otherwise show as the tmpfs's).
fn overlay(staging: &Path, index: usize, lower: &File) -> Result<PathBuf, PreviewLayerError> {
    let base = staging.join(index.to_string());
    let (upper, work, merged) = (base.join("upper"), base.join("work"), base.join("merged"));
    for dir in [&base, &upper, &work, &merged] {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(PathIoError::at("creating", dir))?;
    }
    let meta = lower
        .metadata()
        .map_err(PathIoError::at("inspecting the lower layer of", &upper))?;
    std::os::unix::fs::chown(&upper, Some(meta.uid()), Some(meta.gid()))
        .map_err(PathIoError::at("chown", &upper))?;
    fs::set_permissions(
        &upper,
        std::os::unix::fs::PermissionsExt::from_mode(meta.mode() & 0o7777),
    )
    .map_err(PathIoError::at("chmod", &upper))?;
    // Plain overlay semantics, the same on every kernel: no renamed
    // directories by redirect (a directory that exists below is moved by
    // copy and delete, EXDEV to `rename(2)`, as `mv` handles), no index,
    // no metadata-only copy-up (a chmod copies the file up whole, so the
    // agent reads both sides plainly), no inode-number remapping.
    let options = format!(
        "lowerdir=/proc/self/fd/{},upperdir={},workdir={},{OVERLAY_OPTIONS}",
        lower.as_raw_fd(),
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        merged.as_path(),
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(mount_err("mounting the preview overlay on", &merged))?;
    Ok(merged)
}

/// Open each layer's lower directory and each read-only mount to bind
/// back, shallow first, while the paths still mean the host's.
fn plan(scopes: &[PathBuf], mounts: &[MountEntry]) -> Result<Vec<Target>, PreviewLayerError> {
    let mut targets: Vec<Target> = Vec::new();
    let open_dir = |path: &Path| {
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(path)
            .map_err(PathIoError::at(
                "opening the preview layer's lower directory",
                path,
            ))
    };
    for scope in scopes {
        if scope.starts_with(STAGING) {
            return Err(PreviewLayerError::UnderStaging(scope.clone()));
        }
        // A scope on a mount the host has read-only stays so, as in a real
        // run (its writes are refused and reported, not layered); writable
        // mounts beneath it are still layered below.
        let writable = mountinfo::mount_of(mounts, scope).is_some_and(MountEntry::is_rw);
        let meta = match fs::metadata(scope) {
            Ok(m) => m,
            // Left to the Landlock step, which refuses it clearly.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(PathIoError::new("inspecting scope", scope, e).into()),
        };
        if targets.iter().any(|t| t.at() == scope.as_path()) {
            continue;
        }
        if !meta.is_dir() {
            if !writable {
                continue;
            }
            let parent = scope
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .ok_or_else(|| PreviewLayerError::NoParent(scope.clone()))?;
            let name = scope
                .file_name()
                .map(OsStr::as_bytes)
                .and_then(|n| std::str::from_utf8(n).ok())
                .ok_or_else(|| PreviewLayerError::NoParent(scope.clone()))?;
            targets.push(Target::Layer {
                at: scope.clone(),
                lower: open_dir(parent)?,
                lower_path: parent.to_path_buf(),
                only: Some(name.to_string()),
            });
            continue;
        }
        if writable {
            targets.push(Target::Layer {
                at: scope.clone(),
                lower: open_dir(scope)?,
                lower_path: scope.clone(),
                only: None,
            });
        }
        // Every mount beneath it, the topmost at each mount point.
        let mut beneath: Vec<&MountEntry> = mounts
            .iter()
            .filter(|m| m.mount_point.starts_with(scope) && m.mount_point != *scope)
            .filter(|m| mountinfo::mount_of(mounts, &m.mount_point).is_some_and(|t| t.id == m.id))
            .collect();
        beneath.sort_by(|a, b| a.mount_point.cmp(&b.mount_point));
        for m in beneath {
            let at = m.mount_point.clone();
            if targets.iter().any(|t| t.at() == at.as_path()) {
                continue;
            }
            if m.is_rw() {
                targets.push(Target::Layer {
                    lower: open_dir(&at)?,
                    lower_path: at.clone(),
                    at,
                    only: None,
                });
            } else {
                let mount = fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_PATH)
                    .open(&at)
                    .map_err(PathIoError::at("opening the read-only mount", &at))?;
                targets.push(Target::Rebind { at, mount });
            }
        }
    }
    if targets.len() > MAX_LAYERS {
        return Err(PreviewLayerError::TooMany);
    }
    // Shallow first: a deeper path is bound on top of the layer above it.
    targets.sort_by(|a, b| a.at().cmp(b.at()));
    Ok(targets)
}
