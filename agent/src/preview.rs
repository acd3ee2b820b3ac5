//! What a preview run would have changed, read from its layers after the
//! run (the tmpfs stage 2 built them on, see
//! [`crate::sandbox::preview_layers`], handed to the agent on the gate).
//!
//! Each layer's upper directory holds exactly what the bundle changed
//! beneath it, in overlayfs's on-disk form: a new or modified entry is
//! there whole, a deleted one is a whiteout (a character device 0:0), a
//! directory deleted and made again is marked opaque. Each is compared
//! with the host's own entry beneath the layer's lower directory.
//!
//! Everything the bundle wrote is hostile input: the walk never follows a
//! symbolic link on either side, each side is walked by descriptor from its
//! root (`openat` with `O_NOFOLLOW`), and a host directory the run replaced
//! with something else is not descended into. Without that, a bundle that
//! turned a symbolic link to `/etc` into a directory and wrote `shadow` in
//! it would have the agent diff `/etc/shadow` into the report.

use std::collections::BTreeSet;
use std::ffi::{CStr, CString};
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rollguard_shared::report::{ChangeKind, FileKind, FileMeta, PathChange, Preview};
use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags};

use crate::sandbox::preview_layers::{Layer, LAYERS_FILE, MAX_LAYERS};

/// Most changes listed in a report; the rest are counted.
pub const MAX_LISTED: usize = 1000;
/// Most entries walked in all (a bound on the agent's work).
const MAX_WALKED: usize = 1_000_000;
/// Longest a diff may take to compute (Myers on two unrelated texts is
/// quadratic; past this, `similar` gives a coarser but correct diff).
const DIFF_DEADLINE: std::time::Duration = std::time::Duration::from_millis(50);
/// Most bytes of extended-attribute names, and of one value, compared.
const XATTR_MAX: usize = 64 * 1024;
/// Deepest directory walked.
const MAX_DEPTH: usize = 256;
/// Files up to this size on both sides get a diff, if they are text.
const DIFF_MAX_FILE: u64 = 64 * 1024;
/// A diff is cut at this length.
const DIFF_MAX: usize = 16 * 1024;

const OPAQUE_XATTR: &CStr = c"trusted.overlay.opaque";

#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("the layer list is invalid: {0}")]
    Layers(String),
    #[error(
        "more than {MAX_WALKED} entries or a tree deeper than {MAX_DEPTH} in the preview layers"
    )]
    TooBig,
}

fn io_at(what: impl Into<String>) -> impl FnOnce(rustix::io::Errno) -> PreviewError {
    let what = what.into();
    move |e| PreviewError::Io {
        what,
        source: e.into(),
    }
}

/// Whether the layers' tmpfs is full (a write there got ENOSPC): the
/// preview hit the run's `tmp` limit and is incomplete.
pub fn is_full(root: &OwnedFd) -> bool {
    rfs::fstatvfs(root)
        .is_ok_and(|s| s.f_blocks > 0 && (s.f_bavail == 0 || (s.f_files > 0 && s.f_favail == 0)))
}

/// The changes in the layers beneath `root`.
pub fn read_changes(root: &OwnedFd) -> Result<Preview, PreviewError> {
    let layers = read_layers(root)?;
    let mut walk = Walk::default();
    for layer in &layers {
        let upper_name = CString::new(layer.upper()).expect("no NUL in a layer number");
        let index_dir = open_dir_at(root, &CString::new(layer.index.to_string()).unwrap())
            .map_err(io_at(format!("opening preview layer {}", layer.index)))?;
        let upper = open_dir_at(&index_dir, c"upper")
            .map_err(io_at(format!("opening {}", upper_name.to_string_lossy())))?;
        let lower = rfs::open(
            &layer.lower,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_at(format!("opening {}", layer.lower.display())))?;
        if layer.only.is_none() {
            walk.layer_root(&upper, &lower, &layer.lower)?;
        }
        walk.dir(
            &upper,
            Some(&lower),
            &layer.lower,
            layer.only.as_deref(),
            Opaque::No,
            0,
        )?;
    }
    let mut changes = walk.changes;
    changes.sort_by(|a, b| a.path.cmp(&b.path));
    changes.dedup();
    Ok(Preview {
        changes,
        changes_dropped: walk.dropped,
        complete: true,
    })
}

/// What a preview's bundle saw at one host path when it ended, as the
/// layers say (see [`read_file`]).
#[derive(Debug, PartialEq, Eq)]
pub enum FileAfter {
    /// The run wrote it: its bytes, from the upper layer.
    Changed(Vec<u8>),
    /// Not in any layer's upper directory: the host's file is what the
    /// bundle saw (no layer covers the path, or the run left it alone).
    Unchanged,
    /// The run deleted it (a whiteout, or inside a directory it re-made).
    Absent,
}

/// `path` as a preview left it, for the agent's own reads after the run
/// (dpkg's `status`, see `runner::execute`): the deepest layer over it,
/// and its upper directory walked by descriptor, never following a link.
/// What is in the upper directory is the bundle's: a link, a FIFO or
/// anything but a regular file at `path` is an error, and at most `max`
/// bytes are read.
pub fn read_file(root: &OwnedFd, path: &Path, max: u64) -> Result<FileAfter, PreviewError> {
    let layers = read_layers(root)?;
    let covering: Vec<(&Layer, &Path)> = layers
        .iter()
        .filter_map(|l| {
            let rel = path.strip_prefix(&l.lower).ok()?;
            let first = rel.components().next();
            // A file scope's layer reaches only its one entry.
            match (&l.only, first) {
                (None, _) => Some((l, rel)),
                (Some(only), Some(std::path::Component::Normal(c))) if c == only.as_str() => {
                    Some((l, rel))
                }
                _ => None,
            }
        })
        .collect();
    // The deepest layer is what the bundle saw; two as deep (a directory
    // scope's and a file scope's over the same directory) would leave the
    // answer to mount order, so that is an error, never a guess.
    let depth = |l: &Layer| l.lower.components().count();
    let Some(deepest) = covering.iter().map(|(l, _)| depth(l)).max() else {
        return Ok(FileAfter::Unchanged);
    };
    let mut at_depth = covering.into_iter().filter(|(l, _)| depth(l) == deepest);
    let (layer, rel) = at_depth.next().expect("the deepest is among them");
    if at_depth.next().is_some() {
        return Err(PreviewError::Layers(format!(
            "more than one preview layer lies directly over {}",
            path.display()
        )));
    }
    let names: Vec<CString> = rel
        .components()
        .map(|c| match c {
            std::path::Component::Normal(n) => {
                use std::os::unix::ffi::OsStrExt;
                CString::new(n.as_bytes()).map_err(|_| PreviewError::Layers("NUL in a path".into()))
            }
            _ => Err(PreviewError::Layers(format!(
                "{} is not a plain path beneath {}",
                path.display(),
                layer.lower.display()
            ))),
        })
        .collect::<Result<_, _>>()?;
    let Some((last, dirs)) = names.split_last() else {
        return Err(PreviewError::Layers(format!(
            "{} is a layer's own directory, not a file",
            path.display()
        )));
    };
    let what = |w: &str| format!("{w} {} in preview layer {}", path.display(), layer.index);
    let index_dir = open_dir_at(root, &CString::new(layer.index.to_string()).unwrap())
        .map_err(io_at(what("opening the layer of")))?;
    let mut dir = open_dir_at(&index_dir, c"upper").map_err(io_at(what("opening the layer of")))?;
    // Below a re-made (opaque) directory the host's entries are gone.
    let mut opaque = false;
    for name in dirs {
        match Entry::at(&dir, name).map_err(io_at(what("looking up")))? {
            None if opaque => return Ok(FileAfter::Absent),
            None => return Ok(FileAfter::Unchanged),
            Some(e) if e.is_whiteout() => return Ok(FileAfter::Absent),
            Some(e) if e.file_type() != FileType::Directory => {
                // The run put something else where a directory was.
                return Ok(FileAfter::Absent);
            }
            Some(_) => {
                dir = open_dir_at(&dir, name).map_err(io_at(what("opening a directory above")))?;
                opaque = opaque || is_opaque(&dir);
            }
        }
    }
    match Entry::at(&dir, last).map_err(io_at(what("looking up")))? {
        None if opaque => Ok(FileAfter::Absent),
        None => Ok(FileAfter::Unchanged),
        Some(e) if e.is_whiteout() => Ok(FileAfter::Absent),
        Some(e) if e.file_type() != FileType::RegularFile => Err(PreviewError::Layers(format!(
            "{} is not a regular file after the preview",
            path.display()
        ))),
        Some(e) if e.stat.st_size as u64 > max => Err(PreviewError::Layers(format!(
            "{} is larger than {max} bytes after the preview",
            path.display()
        ))),
        Some(_) => {
            let fd = open_file_at(&dir, last).map_err(io_at(what("opening")))?;
            let mut bytes = Vec::new();
            std::fs::File::from(fd)
                .take(max + 1)
                .read_to_end(&mut bytes)
                .map_err(|source| PreviewError::Io {
                    what: what("reading"),
                    source,
                })?;
            if bytes.len() as u64 > max {
                return Err(PreviewError::Layers(format!(
                    "{} is larger than {max} bytes after the preview",
                    path.display()
                )));
            }
            Ok(FileAfter::Changed(bytes))
        }
    }
}

/// The names a preview's bundle saw in the host directory `path` when it
/// ended (the host's entries, less those the run deleted, plus those it
/// made), sorted; for the agent's own reads after the run (dpkg's
/// journal). At most `max` names, else an error.
pub fn list_dir(root: &OwnedFd, path: &Path, max: usize) -> Result<Vec<CString>, PreviewError> {
    let host = rfs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io_at(format!("opening {}", path.display())))?;
    let mut names: BTreeSet<CString> = list_at_most(&host, max)
        .map_err(io_at(format!("listing {}", path.display())))?
        .into_iter()
        .collect();
    let layers = read_layers(root)?;
    if let Some(layer) = layers
        .iter()
        .filter(|l| l.only.is_none() && path.starts_with(&l.lower))
        .max_by_key(|l| l.lower.components().count())
    {
        let what = |w: &str| format!("{w} {} in preview layer {}", path.display(), layer.index);
        let index_dir = open_dir_at(root, &CString::new(layer.index.to_string()).unwrap())
            .map_err(io_at(what("opening the layer of")))?;
        let mut dir =
            open_dir_at(&index_dir, c"upper").map_err(io_at(what("opening the layer of")))?;
        let mut opaque = false;
        let rel = path
            .strip_prefix(&layer.lower)
            .expect("filtered on the prefix");
        let mut covered = true;
        for c in rel.components() {
            let std::path::Component::Normal(n) = c else {
                return Err(PreviewError::Layers(format!(
                    "{} is not a plain path",
                    path.display()
                )));
            };
            use std::os::unix::ffi::OsStrExt;
            let name = CString::new(n.as_bytes())
                .map_err(|_| PreviewError::Layers("NUL in a path".into()))?;
            match Entry::at(&dir, &name).map_err(io_at(what("looking up")))? {
                Some(e) if e.file_type() == FileType::Directory => {
                    dir = open_dir_at(&dir, &name).map_err(io_at(what("opening")))?;
                    opaque = opaque || is_opaque(&dir);
                }
                // Gone or replaced: the bundle saw no such directory,
                // which a real run's reader refuses too.
                Some(_) => {
                    return Err(PreviewError::Layers(format!(
                        "{} is not a directory after the preview",
                        path.display()
                    )))
                }
                None if opaque => {
                    return Err(PreviewError::Layers(format!(
                        "{} does not exist after the preview",
                        path.display()
                    )))
                }
                None => {
                    covered = false;
                    break;
                }
            }
        }
        if covered {
            if opaque {
                names.clear();
            }
            let bound = max.saturating_add(names.len());
            for name in list_at_most(&dir, bound).map_err(io_at(what("listing")))? {
                match Entry::at(&dir, &name).map_err(io_at(what("looking up")))? {
                    Some(e) if e.is_whiteout() => {
                        names.remove(&name);
                    }
                    Some(_) => {
                        names.insert(name);
                    }
                    None => {}
                }
            }
        }
    }
    if names.len() > max {
        return Err(PreviewError::Layers(format!(
            "more than {max} entries in {} after the preview",
            path.display()
        )));
    }
    Ok(names.into_iter().collect())
}

/// Whether a directory of an upper layer hides the host's directory
/// beneath it: marked opaque (deleted and made again), or inside one that
/// is (a directory made in a re-made directory is new, whatever the host
/// had at its path).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Opaque {
    No,
    Yes,
}

fn read_layers(root: &OwnedFd) -> Result<Vec<Layer>, PreviewError> {
    let name = CString::new(LAYERS_FILE).unwrap();
    let fd = rfs::openat(
        root,
        &name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io_at("opening the layer list"))?;
    let mut body = Vec::new();
    std::fs::File::from(fd)
        .take(1 << 20)
        .read_to_end(&mut body)
        .map_err(|source| PreviewError::Io {
            what: "reading the layer list".into(),
            source,
        })?;
    let layers: Vec<Layer> =
        serde_json::from_slice(&body).map_err(|e| PreviewError::Layers(e.to_string()))?;
    let well_formed = layers.len() <= MAX_LAYERS
        && layers.iter().enumerate().all(|(i, l)| {
            l.index == i
                && l.lower.is_absolute()
                && l.only
                    .as_deref()
                    .is_none_or(|n| !n.is_empty() && !n.contains('/') && n != "." && n != "..")
        });
    if !well_formed {
        return Err(PreviewError::Layers(
            "numbering, paths or names out of form".into(),
        ));
    }
    Ok(layers)
}

fn open_dir_at(dir: impl AsFd, name: &CStr) -> rustix::io::Result<OwnedFd> {
    rfs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// The walk's findings: the first [`MAX_LISTED`] changes in full (their
/// diffs made only for them), the rest counted.
#[derive(Default)]
struct Walk {
    changes: Vec<PathChange>,
    dropped: u64,
    walked: usize,
}

/// An entry as `fstatat` without following saw it.
struct Entry {
    stat: rfs::Stat,
}

impl Entry {
    fn at(dir: impl AsFd, name: &CStr) -> rustix::io::Result<Option<Entry>> {
        match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => Ok(Some(Entry { stat })),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn file_type(&self) -> FileType {
        FileType::from_raw_mode(self.stat.st_mode)
    }

    fn is_whiteout(&self) -> bool {
        self.file_type() == FileType::CharacterDevice && self.stat.st_rdev == 0
    }

    fn meta(&self) -> FileMeta {
        FileMeta {
            kind: match self.file_type() {
                FileType::RegularFile => FileKind::File,
                FileType::Directory => FileKind::Dir,
                FileType::Symlink => FileKind::Symlink,
                _ => FileKind::Other,
            },
            mode: self.stat.st_mode & 0o7777,
            uid: self.stat.st_uid,
            gid: self.stat.st_gid,
            size: self.stat.st_size as u64,
        }
    }
}

impl Walk {
    /// The root of a directory scope's layer: its upper directory took the
    /// host directory's mode and owner when it was made, so a difference
    /// is the run's chmod or chown of the scope itself.
    fn layer_root(
        &mut self,
        upper: &OwnedFd,
        lower: &OwnedFd,
        path: &Path,
    ) -> Result<(), PreviewError> {
        let stat = |fd: &OwnedFd| {
            rfs::fstat(fd)
                .map(|stat| Entry { stat }.meta())
                .map_err(io_at(format!("inspecting {}", path.display())))
        };
        let (after, before) = (stat(upper)?, stat(lower)?);
        if (after.mode, after.uid, after.gid) != (before.mode, before.uid, before.gid) {
            self.push(PathChange {
                path: path.display().to_string(),
                change: ChangeKind::Modified,
                before: Some(before),
                after: Some(after),
                diff: None,
                xattrs_changed: false,
            });
        }
        Ok(())
    }

    /// Compare the upper directory `upper` with the host's `lower` (absent:
    /// nothing there, or not a directory the walk may enter), both at
    /// `path`; `only`: the one name to look at (a file scope's layer).
    fn dir(
        &mut self,
        upper: &OwnedFd,
        lower: Option<&OwnedFd>,
        path: &Path,
        only: Option<&str>,
        above: Opaque,
        depth: usize,
    ) -> Result<(), PreviewError> {
        if depth > MAX_DEPTH {
            return Err(PreviewError::TooBig);
        }
        let names =
            list(upper).map_err(io_at(format!("listing the layer at {}", path.display())))?;
        // A directory deleted and made again, or made inside one: what the
        // host had in it is gone, save what the upper directory has again.
        let opaque = if above == Opaque::Yes || (depth > 0 && is_opaque(upper)) {
            Opaque::Yes
        } else {
            Opaque::No
        };
        if let (Opaque::Yes, Some(lower)) = (opaque, lower) {
            let present: BTreeSet<&CString> = names.iter().collect();
            for name in list(lower).map_err(io_at(format!("listing {}", path.display())))? {
                self.visit()?;
                if present.contains(&name) {
                    continue;
                }
                if let Some(before) = Entry::at(lower, &name)
                    .map_err(io_at(format!("inspecting {}", path.display())))?
                {
                    self.push(PathChange {
                        path: join(path, &name).display().to_string(),
                        change: ChangeKind::Deleted,
                        before: Some(before.meta()),
                        after: None,
                        diff: None,
                        xattrs_changed: false,
                    });
                }
            }
        }
        for name in &names {
            if only.is_some_and(|o| o.as_bytes() != name.as_bytes()) {
                continue;
            }
            self.visit()?;
            self.entry(upper, lower, path, name, opaque, depth)?;
        }
        Ok(())
    }

    fn entry(
        &mut self,
        upper: &OwnedFd,
        lower: Option<&OwnedFd>,
        dir_path: &Path,
        name: &CString,
        opaque: Opaque,
        depth: usize,
    ) -> Result<(), PreviewError> {
        let path = join(dir_path, name);
        let shown = path.display().to_string();
        let Some(after) =
            Entry::at(upper, name).map_err(io_at(format!("inspecting the layer's {shown}")))?
        else {
            return Ok(());
        };
        let before = match lower {
            Some(l) => Entry::at(l, name).map_err(io_at(format!("inspecting {shown}")))?,
            None => None,
        };
        if after.is_whiteout() {
            if let Some(before) = before {
                self.push(PathChange {
                    path: shown,
                    change: ChangeKind::Deleted,
                    before: Some(before.meta()),
                    after: None,
                    diff: None,
                    xattrs_changed: false,
                });
            }
            return Ok(());
        }
        let (after_meta, before_meta) = (after.meta(), before.as_ref().map(Entry::meta));
        if after.file_type() == FileType::Directory {
            let upper_child =
                open_dir_at(upper, name).map_err(io_at(format!("opening the layer's {shown}")))?;
            // Entered on the host side only if it is a directory there too
            // (never through a link).
            let lower_child = match (lower, &before) {
                (Some(l), Some(b)) if b.file_type() == FileType::Directory => {
                    Some(open_dir_at(l, name).map_err(io_at(format!("opening {shown}")))?)
                }
                _ => None,
            };
            let xattrs_changed = match &lower_child {
                Some(l) => !same_xattrs(&upper_child, l)
                    .map_err(io_at(format!("comparing the attributes of {shown}")))?,
                None => false,
            };
            // A directory copied up keeps its mode, owner and attributes;
            // only a new one or a changed one is a change of its own (its
            // size is the file system's business).
            let changed = xattrs_changed
                || match &before_meta {
                    None => true,
                    Some(b) => {
                        b.kind != after_meta.kind
                            || b.mode != after_meta.mode
                            || b.uid != after_meta.uid
                            || b.gid != after_meta.gid
                    }
                };
            if changed {
                self.push(PathChange {
                    path: shown.clone(),
                    change: if before_meta.is_some() {
                        ChangeKind::Modified
                    } else {
                        ChangeKind::Created
                    },
                    before: before_meta,
                    after: Some(after_meta),
                    diff: None,
                    xattrs_changed,
                });
            }
            return self.dir(
                &upper_child,
                lower_child.as_ref(),
                &path,
                None,
                opaque,
                depth + 1,
            );
        }
        // A file, link or other node: copied up or made by the run.
        let (same_content, xattrs_changed) = match (&before, lower) {
            (Some(b), Some(l)) if b.file_type() == after.file_type() => {
                let compare = || -> rustix::io::Result<(bool, bool)> {
                    let same = same_content(upper, l, name, &after, b)?;
                    let xattrs = after.file_type() == FileType::RegularFile
                        && !same_xattrs(&open_file_at(upper, name)?, &open_file_at(l, name)?)?;
                    Ok((same, xattrs))
                };
                compare().map_err(io_at(format!("comparing {shown}")))?
            }
            _ => (false, false),
        };
        if same_content && !xattrs_changed && before_meta == Some(after_meta) {
            return Ok(());
        }
        let diff = if same_content || !self.listing() {
            None
        } else {
            text_diff(upper, lower.filter(|_| before.is_some()), name, &shown)
        };
        self.push(PathChange {
            path: shown,
            change: if before.is_some() {
                ChangeKind::Modified
            } else {
                ChangeKind::Created
            },
            before: before_meta,
            after: Some(after_meta),
            diff,
            xattrs_changed,
        });
        Ok(())
    }

    /// One more entry looked at: the bound on the agent's work.
    fn visit(&mut self) -> Result<(), PreviewError> {
        self.walked += 1;
        if self.walked > MAX_WALKED {
            return Err(PreviewError::TooBig);
        }
        Ok(())
    }

    /// Whether a change found now is listed (else only counted).
    fn listing(&self) -> bool {
        self.changes.len() < MAX_LISTED
    }

    fn push(&mut self, change: PathChange) {
        if self.listing() {
            self.changes.push(change);
        } else {
            self.dropped += 1;
        }
    }
}

fn join(dir: &Path, name: &CStr) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    dir.join(std::ffi::OsStr::from_bytes(name.to_bytes()))
}

/// The names in a directory, without `.` and `..`, sorted; more than
/// [`MAX_WALKED`] is an error.
fn list(dir: &OwnedFd) -> rustix::io::Result<Vec<CString>> {
    list_at_most(dir, MAX_WALKED)
}

/// [`list`] with a bound of `max` names (`ENOMEM` beyond).
fn list_at_most(dir: &OwnedFd, max: usize) -> rustix::io::Result<Vec<CString>> {
    let mut names = Vec::new();
    let mut entries = rfs::Dir::read_from(dir)?;
    entries.rewind();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
        if names.len() > max {
            return Err(rustix::io::Errno::NOMEM);
        }
    }
    names.sort();
    Ok(names)
}

/// Whether two entries carry the same extended attributes (ACLs
/// included), overlayfs's own (`trusted.overlay.*`) left out.
fn same_xattrs(upper: &OwnedFd, lower: &OwnedFd) -> rustix::io::Result<bool> {
    Ok(xattrs(upper)? == xattrs(lower)?)
}

/// An entry's extended attributes, sorted; larger than [`XATTR_MAX`] is an
/// error (`E2BIG`), never a partial answer.
fn xattrs(fd: &OwnedFd) -> rustix::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut names = vec![0u8; XATTR_MAX];
    let n = rfs::flistxattr(fd, &mut names)?;
    let mut out = Vec::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if name.starts_with(b"trusted.overlay.") {
            continue;
        }
        let cname = CString::new(name).map_err(|_| rustix::io::Errno::INVAL)?;
        let mut value = vec![0u8; XATTR_MAX];
        let len = rfs::fgetxattr(fd, &cname, &mut value)?;
        value.truncate(len);
        out.push((name.to_vec(), value));
    }
    out.sort();
    Ok(out)
}

fn is_opaque(dir: &OwnedFd) -> bool {
    let mut value = [0u8; 4];
    rfs::fgetxattr(dir, OPAQUE_XATTR, &mut value).is_ok_and(|n| n >= 1 && value[0] == b'y')
}

/// Whether the upper and lower entries `name` hold the same bytes (a
/// file's content, a link's target); other nodes compare equal.
fn same_content(
    upper: &OwnedFd,
    lower: &OwnedFd,
    name: &CStr,
    after: &Entry,
    before: &Entry,
) -> rustix::io::Result<bool> {
    match after.file_type() {
        FileType::Symlink => {
            Ok(rfs::readlinkat(upper, name, Vec::new())?
                == rfs::readlinkat(lower, name, Vec::new())?)
        }
        FileType::RegularFile => {
            if after.stat.st_size != before.stat.st_size {
                return Ok(false);
            }
            let mut a = std::io::BufReader::new(std::fs::File::from(open_file_at(upper, name)?));
            let mut b = std::io::BufReader::new(std::fs::File::from(open_file_at(lower, name)?));
            let (mut x, mut y) = ([0u8; 8192], [0u8; 8192]);
            loop {
                let n = read_full(&mut a, &mut x)?;
                let m = read_full(&mut b, &mut y)?;
                if n != m || x[..n] != y[..m] {
                    return Ok(false);
                }
                if n == 0 {
                    return Ok(true);
                }
            }
        }
        _ => Ok(true),
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> rustix::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(rustix::io::Errno::from_raw_os_error(
                    e.raw_os_error().unwrap_or(libc::EIO),
                ))
            }
        }
    }
    Ok(filled)
}

fn open_file_at(dir: &OwnedFd, name: &CStr) -> rustix::io::Result<OwnedFd> {
    rfs::openat(
        dir,
        name,
        // NOATIME: reading the host's files for the comparison changes
        // nothing of them, not even their access time.
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOATIME,
        Mode::empty(),
    )
}

/// A small text file's content (regular, at most [`DIFF_MAX_FILE`],
/// UTF-8 without NUL); `None` otherwise.
fn small_text(dir: &OwnedFd, name: &CStr) -> Option<String> {
    let entry = Entry::at(dir, name).ok()??;
    if entry.file_type() != FileType::RegularFile || entry.stat.st_size as u64 > DIFF_MAX_FILE {
        return None;
    }
    let mut body = Vec::new();
    std::fs::File::from(open_file_at(dir, name).ok()?)
        .take(DIFF_MAX_FILE + 1)
        .read_to_end(&mut body)
        .ok()?;
    if body.len() as u64 > DIFF_MAX_FILE || body.contains(&0) {
        return None;
    }
    String::from_utf8(body).ok()
}

/// A unified diff of a small text file, before (empty when created) and
/// after; `None` when either side is not small text.
fn text_diff(upper: &OwnedFd, lower: Option<&OwnedFd>, name: &CStr, path: &str) -> Option<String> {
    let after = small_text(upper, name)?;
    let before = match lower {
        Some(l) => small_text(l, name)?,
        None => String::new(),
    };
    let diff = similar::TextDiff::configure()
        .timeout(DIFF_DEADLINE)
        .diff_lines(&before, &after);
    let mut text = diff
        .unified_diff()
        .context_radius(3)
        .header(&format!("a{path}"), &format!("b{path}"))
        .to_string();
    if text.len() > DIFF_MAX {
        let mut cut = DIFF_MAX;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("\n[diff cut]\n");
    }
    Some(text)
}

#[cfg(test)]
mod tests {
    //! The agent's reads of what a preview left ([`read_file`],
    //! [`list_dir`]) on hand-made layers: a host directory and an upper
    //! directory in overlayfs's on-disk form, as the bundle could leave it.
    use super::*;
    use std::os::unix::fs::symlink;

    struct Fixture {
        _tmp: tempfile::TempDir,
        host: PathBuf,
        upper: PathBuf,
        root: OwnedFd,
    }

    /// A host directory `host` (holding `status` and `updates/keep`) and
    /// layer 0 over it.
    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let host = tmp.path().join("host");
        std::fs::create_dir_all(host.join("updates")).unwrap();
        std::fs::write(host.join("status"), "host\n").unwrap();
        std::fs::write(host.join("updates/keep"), "").unwrap();
        let layers = tmp.path().join("layers");
        let upper = layers.join("0/upper");
        std::fs::create_dir_all(&upper).unwrap();
        let list = vec![Layer {
            index: 0,
            lower: host.clone(),
            only: None,
        }];
        std::fs::write(layers.join(LAYERS_FILE), serde_json::to_vec(&list).unwrap()).unwrap();
        let root = rfs::open(
            &layers,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        Fixture {
            _tmp: tmp,
            host,
            upper,
            root,
        }
    }

    fn whiteout(path: &Path) {
        rfs::mknodat(
            rfs::CWD,
            path,
            FileType::CharacterDevice,
            Mode::empty(),
            rfs::makedev(0, 0),
        )
        .expect("mknod a whiteout (root)");
    }

    #[test]
    fn a_file_is_read_from_the_upper_layer_or_left_to_the_host() {
        let f = fixture();
        let status = f.host.join("status");
        assert_eq!(
            read_file(&f.root, &status, 100).unwrap(),
            FileAfter::Unchanged
        );
        std::fs::write(f.upper.join("status"), "after\n").unwrap();
        assert_eq!(
            read_file(&f.root, &status, 100).unwrap(),
            FileAfter::Changed(b"after\n".to_vec())
        );
        // Beyond the bound: an error, never a partial answer.
        assert!(read_file(&f.root, &status, 3).is_err());
        // A path no layer covers is the host's.
        assert_eq!(
            read_file(&f.root, Path::new("/etc/hostname"), 100).unwrap(),
            FileAfter::Unchanged
        );
    }

    #[test]
    fn what_the_bundle_put_in_place_of_a_file_is_never_followed() {
        let f = fixture();
        let status = f.host.join("status");
        symlink("/etc/shadow", f.upper.join("status")).unwrap();
        assert!(read_file(&f.root, &status, 1 << 20).is_err());
        std::fs::remove_file(f.upper.join("status")).unwrap();
        nix::unistd::mkfifo(&f.upper.join("status"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(read_file(&f.root, &status, 1 << 20).is_err(), "a FIFO");
        // A directory above the file replaced by a link: the bundle saw
        // no such directory, and the agent does not go through it.
        let nested = f.host.join("updates/keep");
        symlink("/etc", f.upper.join("updates")).unwrap();
        assert_eq!(read_file(&f.root, &nested, 100).unwrap(), FileAfter::Absent);
        // And a journal directory that is not one is an error, as the real
        // run's reader has it.
        assert!(list_dir(&f.root, &f.host.join("updates"), 10).is_err());
    }

    #[test]
    fn deletions_and_remade_directories_hide_the_host() {
        let f = fixture();
        let status = f.host.join("status");
        whiteout(&f.upper.join("status"));
        assert_eq!(read_file(&f.root, &status, 100).unwrap(), FileAfter::Absent);
        // updates/ re-made by the run: the host's entry is gone, the
        // run's own are there, a whiteout removes a name.
        let updates = f.upper.join("updates");
        std::fs::create_dir(&updates).unwrap();
        std::fs::write(updates.join("0001"), "").unwrap();
        let listed = list_dir(&f.root, &f.host.join("updates"), 10).unwrap();
        assert_eq!(listed, vec![c"0001".to_owned(), c"keep".to_owned()]);
        whiteout(&updates.join("keep"));
        let listed = list_dir(&f.root, &f.host.join("updates"), 10).unwrap();
        assert_eq!(listed, vec![c"0001".to_owned()]);
        rfs::setxattr(&updates, OPAQUE_XATTR, b"y", rfs::XattrFlags::empty()).unwrap();
        std::fs::remove_file(updates.join("keep")).unwrap();
        assert_eq!(
            read_file(&f.root, &f.host.join("updates/keep"), 100).unwrap(),
            FileAfter::Absent
        );
        let listed = list_dir(&f.root, &f.host.join("updates"), 10).unwrap();
        assert_eq!(listed, vec![c"0001".to_owned()]);
        assert!(
            list_dir(&f.root, &f.host.join("updates"), 0).is_err(),
            "bounded"
        );
    }
}
