//! One error type for an I/O failure on a named path, shared by every
//! module that reads or writes files, so that each reports what it was
//! doing, where, and why, in the same words and the same shape.

use std::io;
use std::path::{Path, PathBuf};

/// An I/O error on a named path: what was being done, where, and why.
///
/// Displays as `"{action} {path}: {source}"`, e.g.
/// `reading /var/lib/rollguard/state: Permission denied (os error 13)`.
#[derive(Debug, thiserror::Error)]
#[error("{action} {}: {source}", path.display())]
pub struct PathIoError {
    /// What was being done, as a verb phrase that reads before the path
    /// (`"reading"`, `"creating"`, `"chmod 0755 of"`).
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl PathIoError {
    pub fn new(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        PathIoError {
            action,
            path: path.into(),
            source,
        }
    }

    /// For `map_err`: `fs::read(&p).map_err(PathIoError::at("reading", &p))?`.
    /// The path is copied only when an error occurs.
    pub fn at<P: AsRef<Path>>(action: &'static str, path: P) -> impl FnOnce(io::Error) -> Self {
        move |source| PathIoError::new(action, path.as_ref(), source)
    }

    /// The kind of the underlying error, for callers that treat e.g.
    /// `NotFound` differently.
    pub fn kind(&self) -> io::ErrorKind {
        self.source.kind()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_action_path_and_cause() {
        let e = PathIoError::at("reading", "/x/y")(io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let text = e.to_string();
        assert!(text.starts_with("reading /x/y: "), "{text}");
        assert!(std::error::Error::source(&e).is_some());
    }
}
