//! The run cgroup's resource limits (`pids`, `memory`, `cpu`), and which
//! of them the run ran into.
//!
//! cgroup v2 first: the controllers are enabled in
//! `<base>/rollguard-runs/cgroup.subtree_control` (and, if they are not yet
//! available there, in `<base>/cgroup.subtree_control`, which the kernel
//! allows only when `<base>` holds no process: the cgroup root, or a
//! delegated cgroup whose agent lives in the leaf `rollguard-agent`, see
//! [`super::cgroup::runs_parent`]). `<base>` is the agent's own cgroup, or
//! the parent of that leaf. Then
//! `pids.max`, `memory.max`, `memory.swap.max` and `cpu.max` of the run
//! cgroup are written before stage 2 is cloned into it.
//!
//! Hosts with the hybrid layout (systemd's legacy/hybrid mode, or a VM
//! whose init binds the controllers to cgroup v1, like the CI machines)
//! have no `pids`, `memory` or `cpu` in cgroup v2 at all: a controller
//! lives in one hierarchy only. There the limits go into a per-run cgroup
//! in each v1 hierarchy (`<mount><own v1 path>/rollguard-runs/<run-id>`),
//! which stage 2 joins itself, first thing, before anything of the run can
//! fork ([`join_v1`], without the RCU grace period a migration of a whole
//! process waits for). `cgroup.kill` of the v2 run cgroup still kills the
//! run; the v1 cgroups only limit and count.
//!
//! Neither available: the run is refused (fail closed, no unlimited runs).

use rollguard_shared::PathIoError;
use std::fs;
use std::path::{Path, PathBuf};

use super::cgroup::{self, CgroupError, RunCgroup, RUNS_DIR};
use super::limits::{LimitHit, RunLimits};
use super::mountinfo::{self, MountEntry};

/// The controllers every run needs.
pub const CONTROLLERS: [&str; 3] = ["pids", "memory", "cpu"];
/// `cpu.max` / `cpu.cfs_period_us` period, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(PathIoError::at("writing", path))?;
    Ok(())
}

/// Where a run's limits are enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enforcement {
    /// In the v2 run cgroup itself.
    V2,
    /// In these per-run v1 cgroups (pids, memory, cpu), which stage 2 joins.
    V1(Vec<PathBuf>),
}

impl Enforcement {
    /// The v1 cgroups stage 2 must join (none with v2).
    pub fn v1_dirs(&self) -> Vec<PathBuf> {
        match self {
            Enforcement::V2 => Vec::new(),
            Enforcement::V1(dirs) => dirs.clone(),
        }
    }
}

/// Set `limits` on the run `run`, in v2 when the controllers can be
/// enabled, else in v1; an error when neither (the run must be refused).
pub fn apply(
    run: &RunCgroup,
    run_id: &str,
    limits: &RunLimits,
) -> Result<Enforcement, CgroupError> {
    let quota = u64::from(limits.cpu_millicores) * CPU_PERIOD_US / 1000;
    if enable_v2(run.path())? {
        let dir = run.path();
        write(&dir.join("pids.max"), &limits.pids.to_string())?;
        write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
        // Swap would let the run's memory outgrow memory.max on disk.
        let swap = dir.join("memory.swap.max");
        if swap.exists() {
            write(&swap, "0")?;
        }
        write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
        return Ok(Enforcement::V2);
    }
    let dirs = v1_run_dirs(run_id)?;
    let mut created = Vec::new();
    let result = (|| {
        for (controller, dir) in &dirs {
            fs::create_dir_all(dir).map_err(PathIoError::at("creating", dir))?;
            created.push(dir.clone());
            match *controller {
                "pids" => write(&dir.join("pids.max"), &limits.pids.to_string())?,
                "memory" => {
                    write(
                        &dir.join("memory.limit_in_bytes"),
                        &limits.memory_bytes.to_string(),
                    )?;
                    // Present only with swap accounting; memory+swap.
                    let memsw = dir.join("memory.memsw.limit_in_bytes");
                    if memsw.exists() {
                        write(&memsw, &limits.memory_bytes.to_string())?;
                    }
                }
                _ => {
                    write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                }
            }
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(Enforcement::V1(
            dirs.into_iter().map(|(_, dir)| dir).collect(),
        )),
        Err(e) => {
            for dir in created {
                let _ = fs::remove_dir(dir);
            }
            Err(e)
        }
    }
}

/// Whether `pids`, `memory` and `cpu` are (now) enabled for the children
/// of the run cgroup's parent. An error only for a failure after they were
/// found available (then v1 must not be tried in their place: a v2
/// controller is never also in v1).
fn enable_v2(run_dir: &Path) -> Result<bool, CgroupError> {
    let Some(parent) = run_dir.parent() else {
        return Ok(false);
    };
    let available = |dir: &Path| -> bool {
        fs::read_to_string(dir.join("cgroup.controllers")).is_ok_and(|text| {
            CONTROLLERS
                .iter()
                .all(|c| text.split_whitespace().any(|w| w == *c))
        })
    };
    let enable = CONTROLLERS
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    if !available(parent) {
        // Only possible when the agent's own cgroup has no process of its
        // own (no internal processes rule); otherwise EBUSY, and v1 or a
        // refusal follows.
        if let Some(own) = parent.parent() {
            if available(own) {
                if let Err(e) = fs::write(own.join("cgroup.subtree_control"), &enable) {
                    tracing::debug!(cgroup = %own.display(), "cannot enable controllers for the runs: {e}");
                }
            }
        }
        if !available(parent) {
            return Ok(false);
        }
    }
    write(&parent.join("cgroup.subtree_control"), &enable)?;
    Ok(true)
}

/// The per-run v1 cgroup of each controller for `run_id`; an error if a
/// controller is in no v1 hierarchy either.
fn v1_run_dirs(run_id: &str) -> Result<Vec<(&'static str, PathBuf)>, CgroupError> {
    let mounts = mountinfo::read_self()?;
    let own = fs::read_to_string("/proc/self/cgroup")
        .map_err(PathIoError::at("reading", "/proc/self/cgroup"))?;
    CONTROLLERS
        .iter()
        .map(|controller| {
            let (mount, root) =
                v1_mount(&mounts, controller).ok_or(CgroupError::NoController(controller))?;
            let path =
                own_v1_path(&own, controller).ok_or(CgroupError::NoController(controller))?;
            let relative = if root == "/" {
                path.as_str()
            } else {
                path.strip_prefix(root.as_str()).unwrap_or(path.as_str())
            };
            let mut dir = mount;
            for part in relative.split('/').filter(|p| !p.is_empty()) {
                dir.push(part);
            }
            Ok((*controller, dir.join(RUNS_DIR).join(run_id)))
        })
        .collect()
}

/// Mount point and root of the v1 hierarchy carrying `controller` (one
/// of its superblock options).
fn v1_mount(mounts: &[MountEntry], controller: &str) -> Option<(PathBuf, String)> {
    mounts
        .iter()
        .find(|m| m.fstype == "cgroup" && m.super_options.iter().any(|o| o == controller))
        .map(cgroup::mount_point_and_root)
}

/// This process's path in the v1 hierarchy of `controller`
/// (`/proc/self/cgroup`: `id:controller[,controller...]:path`).
fn own_v1_path(proc_cgroup: &str, controller: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let _id = parts.next()?;
        let controllers = parts.next()?;
        let path = parts.next()?;
        controllers
            .split(',')
            .any(|c| c == controller)
            .then(|| path.to_string())
    })
}

/// Stage 2: move the calling process into each per-run v1 cgroup.
///
/// Through `tasks` with `0` (the calling thread, whatever its pid
/// namespace), not `cgroup.procs`: the kernel moves a thread that migrates
/// itself without taking the global threadgroup lock for writing, which
/// waits for an RCU grace period (13 ms per run measured here with
/// `cgroup.procs`, almost nothing this way). Stage 2 is single-threaded
/// (checked before this), so its one thread is the whole process, and
/// everything it forks inherits the cgroups.
pub fn join_v1(dirs: &[PathBuf]) -> Result<(), CgroupError> {
    for dir in dirs {
        write(&dir.join("tasks"), "0")?;
    }
    Ok(())
}

/// Remove the per-run v1 cgroups of `run_id`, once its processes are gone
/// (a dying task can keep a v1 cgroup busy for a moment: retried).
pub fn remove_v1(run_id: &str, grace: std::time::Duration) -> Result<(), CgroupError> {
    let dirs = match v1_run_dirs(run_id) {
        Ok(dirs) => dirs,
        // No v1 hierarchy for a controller: the run made no v1 cgroups.
        Err(CgroupError::NoController(_)) => return Ok(()),
        // The tables could not be read: said, not taken for "none".
        Err(e) => return Err(e),
    };
    let deadline = std::time::Instant::now() + grace;
    for (_, dir) in dirs {
        loop {
            match fs::remove_dir(&dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                Err(e) => return Err(PathIoError::new("removing", &dir, e).into()),
            }
        }
    }
    Ok(())
}

/// The limits the run ran into, read from the cgroups' event counters.
/// Call before the cgroups are removed.
pub fn limits_hit(run: &RunCgroup, enforcement: &Enforcement) -> Vec<LimitHit> {
    let counter = |file: PathBuf, keys: &[&str]| -> bool {
        fs::read_to_string(&file).is_ok_and(|text| {
            text.lines().any(|line| {
                let mut words = line.split_whitespace();
                matches!((words.next(), words.next()), (Some(k), Some(v))
                    if keys.contains(&k) && v.parse::<u64>().is_ok_and(|n| n > 0))
            })
        })
    };
    let mut hits = Vec::new();
    let (pids, memory) = match enforcement {
        Enforcement::V2 => (
            counter(run.path().join("pids.events"), &["max"]),
            counter(run.path().join("memory.events"), &["oom", "oom_kill"]),
        ),
        Enforcement::V1(dirs) => {
            let of = |controller: &str| {
                dirs.iter()
                    .zip(CONTROLLERS)
                    .find(|(_, c)| *c == controller)
                    .map(|(d, _)| d.clone())
                    .unwrap_or_default()
            };
            (
                counter(of("pids").join("pids.events"), &["max"]),
                counter(of("memory").join("memory.oom_control"), &["oom_kill"]),
            )
        }
    };
    if pids {
        hits.push(LimitHit::Pids);
    }
    if memory {
        hits.push(LimitHit::Memory);
    }
    hits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_v1_hierarchies_and_own_paths() {
        let info = "\
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        let mounts = mountinfo::parse(info).unwrap();
        assert_eq!(
            v1_mount(&mounts, "cpu"),
            Some((PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"), "/".into()))
        );
        assert_eq!(v1_mount(&mounts, "pids"), None);
        let own = "4:memory:/process_api/x\n2:cpu,cpuacct:/\n0::/\n";
        assert_eq!(
            own_v1_path(own, "memory").as_deref(),
            Some("/process_api/x")
        );
        assert_eq!(own_v1_path(own, "cpu").as_deref(), Some("/"));
        assert_eq!(own_v1_path(own, "pids"), None);
    }
}
