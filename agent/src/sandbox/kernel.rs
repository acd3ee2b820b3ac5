//! What the running kernel can enforce, probed without side effects.
//!
//! Used by `rollguard-agent check` and by the runner, which refuses a run
//! (RefusalKind::KernelUnsupported) instead of running it with less
//! confinement than designed.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::landlock_abi::{self, LandlockUnavailable};
use super::spec::{MIN_LANDLOCK_ABI, NETWORK_LANDLOCK_ABI};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KernelSupport {
    /// `uname -r`.
    pub kernel_release: String,
    /// Landlock ABI version, or why Landlock is unavailable.
    pub landlock_abi: Option<u32>,
    pub landlock_unavailable: Option<LandlockUnavailable>,
    /// seccomp filter mode (`/proc/sys/kernel/seccomp/actions_avail` exists).
    pub seccomp_filter: bool,
    /// EPERM results of our filters are written to the audit log
    /// (`errno` is in `/proc/sys/kernel/seccomp/actions_logged`).
    pub seccomp_errno_logged: bool,
    /// Mount point of the cgroup v2 hierarchy.
    pub cgroup2_mount: Option<PathBuf>,
    /// Why the cgroup v2 hierarchy could not be looked up, when the mount
    /// table itself could not be read or parsed (not said when it was
    /// read and holds no such mount).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup2_unreadable: Option<String>,
    /// `cgroup.kill` exists (Linux 5.14+).
    pub cgroup_kill: bool,
    pub mount_namespaces: bool,
    pub network_namespaces: bool,
    pub user_namespaces: bool,
    /// Audit sessions can be assigned (`/proc/self/loginuid` and
    /// `/proc/self/sessionid` exist: CONFIG_AUDITSYSCALL).
    pub audit_sessions: bool,
    /// BPF programs can be loaded for the run cgroup's device and network
    /// allow-lists (a trial load, nothing attached).
    pub cgroup_bpf: bool,
}

/// The kernel lacks something a run needs; each entry says what and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("this kernel cannot confine bundles: {}", .missing.join("; "))]
pub struct KernelUnsupported {
    pub missing: Vec<String>,
}

/// Whether the kernel writes our seccomp filters' EPERM results to the
/// audit log now: `errno` in `/proc/sys/kernel/seccomp/actions_logged`
/// (`SECCOMP_FILTER_FLAG_LOG` only logs the actions listed there). Without
/// it a refused syscall leaves no record, so a run's denials are unknown.
/// Unreadable counts as not logged.
pub fn seccomp_errno_logged() -> bool {
    fs::read_to_string("/proc/sys/kernel/seccomp/actions_logged")
        .is_ok_and(|logged| logged.split_whitespace().any(|a| a == "errno"))
}

impl KernelSupport {
    pub fn probe() -> Self {
        let (landlock_abi, landlock_unavailable) = match landlock_abi::probe() {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some(e)),
        };
        let seccomp_dir = Path::new("/proc/sys/kernel/seccomp");
        let (cgroup2_mount, cgroup2_unreadable) = match super::cgroup::cgroup2_mount() {
            Ok((mount, _)) => (Some(mount), None),
            Err(super::cgroup::CgroupError::NoCgroup2) => (None, None),
            Err(e) => (None, Some(e.to_string())),
        };
        let cgroup_kill = cgroup2_mount.as_deref().is_some_and(has_cgroup_kill);
        KernelSupport {
            kernel_release: kernel_release(),
            landlock_abi,
            landlock_unavailable,
            seccomp_filter: seccomp_dir.join("actions_avail").exists(),
            seccomp_errno_logged: seccomp_errno_logged(),
            cgroup2_mount,
            cgroup2_unreadable,
            cgroup_kill,
            mount_namespaces: Path::new("/proc/self/ns/mnt").exists(),
            network_namespaces: Path::new("/proc/self/ns/net").exists(),
            user_namespaces: Path::new("/proc/self/ns/user").exists(),
            audit_sessions: Path::new("/proc/self/loginuid").exists()
                && Path::new("/proc/self/sessionid").exists(),
            cgroup_bpf: super::cgroup_filters::can_load(),
        }
    }

    /// Everything missing for a run (with a network scope or not), or Ok.
    pub fn require(&self, network_scope: bool) -> Result<(), KernelUnsupported> {
        let mut missing = Vec::new();
        let needed = if network_scope {
            NETWORK_LANDLOCK_ABI
        } else {
            MIN_LANDLOCK_ABI
        };
        match (self.landlock_abi, self.landlock_unavailable) {
            (Some(v), _) if v >= needed => {}
            (Some(v), _) => missing.push(format!(
                "Landlock ABI {v} is too old (need {needed}{})",
                if network_scope {
                    " for TCP port rules"
                } else {
                    " for truncate control"
                }
            )),
            (None, Some(LandlockUnavailable::Disabled)) => missing.push(
                "Landlock is built in but disabled (add \"landlock\" to the lsm= boot parameter)"
                    .into(),
            ),
            (None, _) => missing
                .push("Landlock is not built into this kernel (CONFIG_SECURITY_LANDLOCK)".into()),
        }
        if !self.seccomp_filter {
            missing.push("seccomp filters are unavailable (CONFIG_SECCOMP_FILTER)".into());
        }
        if self.cgroup2_mount.is_none() {
            missing.push(match &self.cgroup2_unreadable {
                Some(why) => format!("the cgroup v2 hierarchy cannot be looked up: {why}"),
                None => "no cgroup v2 hierarchy is mounted".into(),
            });
        } else if !self.cgroup_kill {
            missing
                .push("cgroup.kill is missing (Linux 5.14+ needed to kill a run reliably)".into());
        }
        if !self.mount_namespaces {
            missing.push("mount namespaces are unavailable".into());
        }
        if !network_scope && !self.network_namespaces {
            missing
                .push("network namespaces are unavailable (needed to run without network)".into());
        }
        if !self.cgroup_bpf {
            missing.push("cgroup BPF programs cannot be loaded (needs CONFIG_CGROUP_BPF, CAP_BPF or CAP_SYS_ADMIN, and bpf(2) not filtered by the service); the device and network allow-lists could not be enforced".into());
        }
        if !self.audit_sessions {
            missing.push("audit sessions are unavailable (CONFIG_AUDITSYSCALL); denials could not be attributed".into());
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(KernelUnsupported { missing })
        }
    }
}

/// Whether non-root cgroups under `mount` offer `cgroup.kill`: look at the
/// agent's own cgroup, else at any child of the root (the root cgroup never
/// has the file), else fall back on the kernel version.
fn has_cgroup_kill(mount: &Path) -> bool {
    if let Ok(parent) = super::cgroup::runs_parent() {
        if let Some(own) = parent.parent() {
            if own != mount {
                return own.join("cgroup.kill").exists();
            }
        }
    }
    if let Ok(entries) = fs::read_dir(mount) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                return entry.path().join("cgroup.kill").exists();
            }
        }
    }
    kernel_at_least(5, 14)
}

fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = kernel_release();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    match (parts.next(), parts.next()) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        _ => false,
    }
}

/// The running kernel's release (`uname -r`), empty if unreadable.
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
