//! Capability sets of the bundle: cut to a short keep-list.
//!
//! The bundle runs as root because maintenance needs file ownership and
//! permission bypass (`chown`, editing root-owned files in scope). What it
//! never needs is the power to undo the sandbox: CAP_SYS_ADMIN (mount,
//! namespaces, BPF...), CAP_SYS_MODULE, CAP_SYS_PTRACE, CAP_SYS_RAWIO,
//! CAP_MKNOD, CAP_AUDIT_*, CAP_NET_ADMIN, CAP_SYS_BOOT... Dropping them
//! from the bounding set makes the drop survive `exec` of setuid binaries
//! and file capabilities; no_new_privs (set next) closes those paths too.

use caps::{CapSet, Capability, CapsHashSet};

/// What the bundle keeps.
pub const KEEP: [Capability; 8] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_KILL,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_NET_BIND_SERVICE,
];

/// The keep-list as a bit mask (as shown in `/proc/<pid>/status`).
pub fn keep_mask() -> u64 {
    KEEP.iter().fold(0, |mask, c| mask | c.bitmask())
}

#[derive(Debug, thiserror::Error)]
pub enum CapsDropError {
    #[error("{action}: {source}")]
    Caps {
        action: &'static str,
        source: caps::errors::CapsError,
    },
    #[error("capability sets are not as intended after dropping: {0}")]
    Verify(String),
}

fn ctx(action: &'static str) -> impl FnOnce(caps::errors::CapsError) -> CapsDropError {
    move |source| CapsDropError::Caps { action, source }
}

/// Drop everything outside [`KEEP`] from the bounding, permitted and
/// effective sets, clear inheritable and ambient, then verify the result in
/// `/proc/self/status` (which also catches capabilities newer than the
/// `caps` crate knows about).
pub fn drop_to_keep_list() -> Result<(), CapsDropError> {
    let keep: CapsHashSet = KEEP.into_iter().collect();
    // Only capabilities this kernel knows can be dropped (PR_CAPBSET_DROP
    // returns EINVAL for unknown ones).
    for cap in caps::runtime::thread_all_supported() {
        if !keep.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap)
                .map_err(ctx("dropping from the bounding set"))?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(ctx("clearing the ambient set"))?;
    caps::clear(None, CapSet::Inheritable).map_err(ctx("clearing the inheritable set"))?;
    // Effective must stay a subset of permitted: shrink effective first.
    caps::set(None, CapSet::Effective, &keep).map_err(ctx("setting the effective set"))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(ctx("setting the permitted set"))?;
    verify()
}

fn verify() -> Result<(), CapsDropError> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| CapsDropError::Verify(e.to_string()))?;
    let field = |name: &str| -> Result<u64, CapsDropError> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .ok_or_else(|| CapsDropError::Verify(format!("no {name} in /proc/self/status")))
    };
    let keep = keep_mask();
    for (name, expected) in [
        ("CapBnd:", keep),
        ("CapPrm:", keep),
        ("CapEff:", keep),
        ("CapInh:", 0),
        ("CapAmb:", 0),
    ] {
        let actual = field(name)?;
        // Effective/permitted may lack kept capabilities the agent never
        // had; nothing outside the keep-list may remain anywhere.
        if actual & !expected != 0 {
            return Err(CapsDropError::Verify(format!(
                "{name} is {actual:016x}, expected at most {expected:016x}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_mask_matches_the_kernel_numbers() {
        // CHOWN 0, DAC_OVERRIDE 1, FOWNER 3, FSETID 4, KILL 5, SETGID 6,
        // SETUID 7, NET_BIND_SERVICE 10.
        assert_eq!(keep_mask(), 0b100_1111_1011);
    }
}
