//! The per-run cgroup (cgroup v2): the one handle that reaches every
//! process a bundle starts, however it forks, daemonizes or re-parents.
//!
//! Runs live at `<cgroup2 mount><agent's own cgroup>/rollguard-runs/<run-id>`.
//! Controllers (pids, memory, cpu) are enabled only below `rollguard-runs`
//! (see `cgroup_limits`), which holds no process itself, so the agent may
//! stay in its own cgroup. Killing uses
//! `cgroup.kill` (Linux 5.14), which SIGKILLs every member atomically, with
//! no race against forks; without it we refuse to run.

use super::mountinfo::{self, MountEntry, MountinfoError};
use rollguard_shared::PathIoError;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Directory, beneath the agent's own cgroup, holding one cgroup per run.
pub const RUNS_DIR: &str = "rollguard-runs";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 filesystem is mounted (looked in /proc/self/mountinfo); rollguard needs cgroup v2 to contain and kill runs")]
    NoCgroup2,
    #[error("cannot find this process's cgroup v2 membership in /proc/self/cgroup")]
    NoOwnCgroup,
    #[error("the kernel has no cgroup.kill in {0} (needs Linux 5.14+); refusing to run without a reliable kill")]
    NoCgroupKill(PathBuf),
    #[error(transparent)]
    Io(#[from] PathIoError),
    #[error(transparent)]
    Mountinfo(#[from] MountinfoError),
    #[error("the {0} controller is available neither in cgroup v2 (for the runs' parent) nor in a cgroup v1 hierarchy; refusing to run without resource limits")]
    NoController(&'static str),
    #[error("cgroup {path} still has processes after {waited:?}")]
    NotEmpty { path: PathBuf, waited: Duration },
}

/// The mount point of the cgroup v2 hierarchy, and the path of the
/// hierarchy's root within it (`/` unless mounted from a sub-cgroup).
pub fn cgroup2_mount() -> Result<(PathBuf, String), CgroupError> {
    cgroup2_of(&mountinfo::read_self()?).ok_or(CgroupError::NoCgroup2)
}

/// The first cgroup v2 mount of `mounts`: its mount point and root.
fn cgroup2_of(mounts: &[MountEntry]) -> Option<(PathBuf, String)> {
    mounts
        .iter()
        .find(|m| m.fstype == "cgroup2")
        .map(mount_point_and_root)
}

/// A cgroup mount's point, and its root as the text `/proc/self/cgroup`
/// paths are compared with.
pub(crate) fn mount_point_and_root(m: &MountEntry) -> (PathBuf, String) {
    (m.mount_point.clone(), m.root.to_string_lossy().into_owned())
}

/// This process's cgroup v2 path (the `0::` line of `/proc/self/cgroup`).
pub fn own_cgroup() -> Result<String, CgroupError> {
    let text = fs::read_to_string("/proc/self/cgroup")
        .map_err(PathIoError::at("reading", "/proc/self/cgroup"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_end_matches(" (deleted)").to_string())
        .ok_or(CgroupError::NoOwnCgroup)
}

/// The directory of this process's own cgroup.
pub fn own_cgroup_dir() -> Result<PathBuf, CgroupError> {
    let (mount, root) = cgroup2_mount()?;
    let own = own_cgroup()?;
    // With a mount of a sub-hierarchy, /proc/self/cgroup is still relative
    // to the hierarchy root; strip the mounted root to get a path below the
    // mount point.
    let relative = if root == "/" {
        own.as_str()
    } else {
        own.strip_prefix(root.as_str()).unwrap_or(own.as_str())
    };
    let mut dir = mount;
    for part in relative.split('/').filter(|p| !p.is_empty()) {
        dir.push(part);
    }
    Ok(dir)
}

/// The leaf the agent lives in when its service manager delegates it a
/// cgroup with the agent in a subgroup (systemd's `Delegate=yes` with
/// `DelegateSubgroup=rollguard-agent`).
pub const AGENT_LEAF: &str = "rollguard-agent";

/// On a pure cgroup v2 host, move the agent into the leaf [`AGENT_LEAF`] of
/// its own cgroup, so that its own cgroup holds no process and may hand
/// the `pids`, `memory` and `cpu` controllers to the runs beside that leaf
/// (the "no internal processes" rule). systemd 254's
/// `DelegateSubgroup=rollguard-agent` does the same before the agent
/// starts; Debian 12's systemd 252 has no such setting, hence this. Done
/// once, at start, and only when the controllers reach the agent's cgroup
/// (a `Delegate=yes` unit on a v2 host): one migration of the whole
/// process, never per run. Returns whether it moved. On hosts whose
/// controllers live in cgroup v1 nothing is done (the runs use v1 there).
pub fn enter_agent_leaf() -> Result<bool, CgroupError> {
    let own = own_cgroup_dir()?;
    if own.file_name().is_some_and(|n| n == AGENT_LEAF) {
        return Ok(false);
    }
    let controllers = own.join("cgroup.controllers");
    let available =
        fs::read_to_string(&controllers).map_err(PathIoError::at("reading", &controllers))?;
    if !super::cgroup_limits::CONTROLLERS
        .iter()
        .all(|c| available.split_whitespace().any(|a| a == *c))
    {
        return Ok(false);
    }
    let leaf = own.join(AGENT_LEAF);
    match fs::create_dir(&leaf) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(PathIoError::new("creating", &leaf, e).into()),
    }
    // "0": the writing process, all its threads.
    let procs = leaf.join("cgroup.procs");
    fs::write(&procs, "0").map_err(PathIoError::at("writing", &procs))?;
    Ok(true)
}

/// The directory under which run cgroups are created: beside the agent's
/// leaf when it lives in [`AGENT_LEAF`], so that their common parent holds
/// no process and may enable the resource controllers (the cgroup v2 "no
/// internal processes" rule); beneath the agent's own cgroup otherwise.
pub fn runs_parent() -> Result<PathBuf, CgroupError> {
    Ok(runs_parent_of(own_cgroup_dir()?))
}

fn runs_parent_of(own: PathBuf) -> PathBuf {
    match (own.file_name(), own.parent()) {
        (Some(leaf), Some(base)) if leaf == AGENT_LEAF => base.join(RUNS_DIR),
        _ => own.join(RUNS_DIR),
    }
}

/// One run's cgroup directory.
#[derive(Debug, Clone)]
pub struct RunCgroup {
    dir: PathBuf,
}

impl RunCgroup {
    /// Create the cgroup for `run_id` (which must be a single path
    /// component; [`super::SandboxSpec::validate`] checks it). Fails if it
    /// already exists: a run id is used once.
    pub fn create(run_id: &str) -> Result<Self, CgroupError> {
        let parent = runs_parent()?;
        fs::create_dir_all(&parent).map_err(PathIoError::at("creating", &parent))?;
        let dir = parent.join(run_id);
        fs::create_dir(&dir).map_err(PathIoError::at("creating", &dir))?;
        let cgroup = RunCgroup { dir };
        if !cgroup.dir.join("cgroup.kill").exists() {
            let _ = fs::remove_dir(&cgroup.dir);
            return Err(CgroupError::NoCgroupKill(cgroup.dir));
        }
        Ok(cgroup)
    }

    /// An existing run cgroup (stage 2 gets its path from the plan).
    pub fn open(dir: &Path) -> Result<Self, CgroupError> {
        if !dir.join("cgroup.kill").exists() {
            return Err(CgroupError::NoCgroupKill(dir.to_path_buf()));
        }
        Ok(RunCgroup {
            dir: dir.to_path_buf(),
        })
    }

    /// The cgroup of an earlier run, if it still exists: after an agent
    /// crash, recovery finds runs it started and kills what is left of them
    /// ([`RunCgroup::kill_and_remove`]).
    pub fn existing(run_id: &str) -> Result<Option<Self>, CgroupError> {
        let dir = runs_parent()?.join(run_id);
        if run_id.is_empty() || run_id.contains('/') || !dir.is_dir() {
            return Ok(None);
        }
        Ok(Some(RunCgroup { dir }))
    }

    /// Run ids with a cgroup under this agent's cgroup.
    pub fn list_run_ids() -> Result<Vec<String>, CgroupError> {
        let parent = runs_parent()?;
        let entries = match fs::read_dir(&parent) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(PathIoError::new("listing", parent, e).into()),
        };
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(PathIoError::at("listing", &parent))?;
            if entry
                .file_type()
                .map_err(PathIoError::at("listing", &parent))?
                .is_dir()
            {
                ids.extend(entry.file_name().to_str().map(str::to_string));
            }
        }
        ids.sort();
        Ok(ids)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Whether the calling process is a member of exactly this cgroup.
    pub fn contains_self(&self) -> Result<bool, CgroupError> {
        Ok(own_cgroup_dir()? == self.dir)
    }

    /// Move a process (and all its threads) into this cgroup.
    pub fn add_process(&self, pid: u32) -> Result<(), CgroupError> {
        let file = self.dir.join("cgroup.procs");
        fs::write(&file, pid.to_string()).map_err(PathIoError::at("writing", &file))?;
        Ok(())
    }

    /// Processes currently in the cgroup (thread-group ids).
    pub fn processes(&self) -> Result<Vec<u32>, CgroupError> {
        let file = self.dir.join("cgroup.procs");
        let text = fs::read_to_string(&file).map_err(PathIoError::at("reading", &file))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Whether any live process is in the cgroup (`populated` in
    /// `cgroup.events`, which ignores zombies).
    pub fn is_populated(&self) -> Result<bool, CgroupError> {
        let file = self.dir.join("cgroup.events");
        let text = fs::read_to_string(&file).map_err(PathIoError::at("reading", &file))?;
        Ok(text.lines().any(|l| l.trim() == "populated 1"))
    }

    /// SIGKILL every process in the cgroup, atomically.
    pub fn kill(&self) -> Result<(), CgroupError> {
        let file = self.dir.join("cgroup.kill");
        fs::write(&file, "1").map_err(PathIoError::at("writing", &file))?;
        Ok(())
    }

    /// Wait until no live process is left; `false` on timeout.
    pub fn wait_empty(&self, timeout: Duration) -> Result<bool, CgroupError> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            if !self.is_populated()? {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Kill whatever is left, wait for it to die, and remove the cgroup.
    pub fn kill_and_remove(self, grace: Duration) -> Result<(), CgroupError> {
        if self.is_populated()? {
            self.kill()?;
            if !self.wait_empty(grace)? {
                return Err(CgroupError::NotEmpty {
                    path: self.dir,
                    waited: grace,
                });
            }
        }
        fs::remove_dir(&self.dir).map_err(PathIoError::at("removing", &self.dir))?;
        // The run's v1 cgroups (hybrid hosts), if any: empty now.
        match self.dir.file_name().and_then(|n| n.to_str()) {
            Some(run_id) => super::cgroup_limits::remove_v1(run_id, grace),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_live_beside_a_delegated_agent_leaf() {
        let service = PathBuf::from("/sys/fs/cgroup/system.slice/rollguard-agent.service");
        assert_eq!(
            runs_parent_of(service.join(AGENT_LEAF)),
            service.join(RUNS_DIR)
        );
        assert_eq!(runs_parent_of(service.clone()), service.join(RUNS_DIR));
        assert_eq!(
            runs_parent_of(PathBuf::from("/sys/fs/cgroup/unified")),
            PathBuf::from("/sys/fs/cgroup/unified").join(RUNS_DIR)
        );
    }

    #[test]
    fn finds_the_cgroup2_mount() {
        let info = "\
25 1 0:23 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
";
        let of = |text: &str| cgroup2_of(&mountinfo::parse(text).unwrap());
        assert_eq!(
            of(info),
            Some((PathBuf::from("/sys/fs/cgroup/unified"), "/".to_string()))
        );
        assert_eq!(
            of("25 1 0:23 / /sys/fs/cgroup rw - cgroup cgroup rw\n"),
            None
        );
        let escaped = "41 31 0:38 / /mnt/cg\\040two rw - cgroup2 cgroup2 rw\n";
        assert_eq!(of(escaped).unwrap().0, PathBuf::from("/mnt/cg two"));
    }
}
