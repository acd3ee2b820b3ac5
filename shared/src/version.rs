//! Rollback protection: a host runs each bundle name only with strictly
//! increasing versions. The agent stores the highest version it has started
//! per name (durably, before running) and calls [`check_newer`].

/// A bundle version that is not newer than one already run on this host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bundle {name:?} version {candidate} is not newer than version {last} already run on this host (rollback protection)")]
pub struct NotNewer {
    pub name: String,
    pub candidate: u64,
    pub last: u64,
}

/// `Ok` when `candidate` is strictly greater than the last version run.
pub fn check_newer(name: &str, last: Option<u64>, candidate: u64) -> Result<(), NotNewer> {
    match last {
        Some(last) if candidate <= last => Err(NotNewer {
            name: name.to_string(),
            candidate,
            last,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_must_increase() {
        assert!(check_newer("x", None, 0).is_ok());
        assert!(check_newer("x", Some(6), 7).is_ok());
        assert_eq!(check_newer("x", Some(7), 7).unwrap_err().last, 7);
        assert!(check_newer("x", Some(7), 3).is_err());
    }
}
