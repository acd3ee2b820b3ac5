//! Which Landlock ABI the running kernel offers.
//!
//! The `landlock` crate deliberately keeps its runtime ABI probe private
//! (it wants callers to ask for features, not versions). We need the
//! number itself: to handle *every* access right the kernel can restrict,
//! to require scoping and audit flags when present, and to report it in
//! `rollguard-agent check`. The probe is one documented, side-effect-free
//! system call, so it lives here in a tiny unsafe module.
#![allow(unsafe_code)]

/// `LANDLOCK_CREATE_RULESET_VERSION` from `<linux/landlock.h>`.
const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1 << 0;

/// Why Landlock is unavailable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LandlockUnavailable {
    /// Built in but not enabled at boot (`EOPNOTSUPP`; add `landlock` to `lsm=`).
    Disabled,
    /// Not built into the kernel (`ENOSYS`).
    NotBuilt,
}

/// The kernel's Landlock ABI version (1, 2, ...).
pub fn probe() -> Result<u32, LandlockUnavailable> {
    // SAFETY: with a NULL attribute pointer, size 0 and the VERSION flag,
    // landlock_create_ruleset(2) reads no memory, creates no file
    // descriptor and only returns the ABI version (or -1 with errno).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if ret > 0 {
        return u32::try_from(ret).map_err(|_| LandlockUnavailable::NotBuilt);
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EOPNOTSUPP) => Err(LandlockUnavailable::Disabled),
        _ => Err(LandlockUnavailable::NotBuilt),
    }
}
