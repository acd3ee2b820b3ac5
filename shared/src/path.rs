//! Absolute, normalized filesystem paths used in scopes and host policies.
//!
//! A scope path is the unit of blast radius: every check downstream (overlap
//! with protected paths, ceilings, Landlock rules) compares these values
//! component by component, so they must have exactly one spelling. We parse
//! once into [`ScopePath`] and never handle raw strings again.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest path we accept (Linux `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;

/// Why a string is not a valid [`ScopePath`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is empty")]
    Empty,
    #[error("path {0:?} is not absolute (scope paths start with '/')")]
    NotAbsolute(String),
    #[error("path {0:?} contains '..'; scope paths may not climb out of a directory")]
    ParentComponent(String),
    #[error("path {0:?} contains a NUL or control character")]
    ControlCharacter(String),
    #[error("path {0:?} is the filesystem root; a scope must name a directory below '/'")]
    Root(String),
    #[error("path is longer than {MAX_PATH_LEN} bytes")]
    TooLong,
}

/// An absolute path with no `.`/`..` components, no repeated or trailing
/// slashes, and not `/` itself.
///
/// Spelling variants that mean the same path (`/etc//postfix/`, `/etc/./postfix`)
/// are normalized; anything that could change meaning depending on the
/// filesystem (`..`, which depends on symlinks) is rejected.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ScopePath(PathBuf);

impl ScopePath {
    /// Parse and normalize.
    pub fn parse(raw: &str) -> Result<Self, PathError> {
        if raw.is_empty() {
            return Err(PathError::Empty);
        }
        if raw.len() > MAX_PATH_LEN {
            return Err(PathError::TooLong);
        }
        if raw.chars().any(|c| c.is_control()) {
            return Err(PathError::ControlCharacter(raw.to_string()));
        }
        if !raw.starts_with('/') {
            return Err(PathError::NotAbsolute(raw.to_string()));
        }
        let mut out = PathBuf::from("/");
        for component in Path::new(raw).components() {
            match component {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(part) => out.push(part),
                Component::ParentDir => return Err(PathError::ParentComponent(raw.to_string())),
                Component::Prefix(_) => return Err(PathError::NotAbsolute(raw.to_string())),
            }
        }
        if out.as_os_str() == "/" {
            return Err(PathError::Root(raw.to_string()));
        }
        Ok(ScopePath(out))
    }

    pub fn as_path(&self) -> &Path {
        &self.0
    }

    /// True when `self` is `other` or lies beneath it (component-wise, so
    /// `/srv/backup2` is *not* beneath `/srv/backup`).
    pub fn is_within(&self, other: &ScopePath) -> bool {
        self.0.starts_with(&other.0)
    }

    /// True when one of the two paths contains the other.
    pub fn overlaps(&self, other: &ScopePath) -> bool {
        self.is_within(other) || other.is_within(self)
    }
}

impl fmt::Display for ScopePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.display(), f)
    }
}

impl std::str::FromStr for ScopePath {
    type Err = PathError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ScopePath::parse(s)
    }
}

impl Serialize for ScopePath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ScopePath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        ScopePath::parse(&raw).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn normalizes_spelling() {
        assert_eq!(
            ScopePath::parse("/etc//postfix/").unwrap().to_string(),
            "/etc/postfix"
        );
        assert_eq!(
            ScopePath::parse("/etc/./postfix").unwrap().to_string(),
            "/etc/postfix"
        );
        assert_eq!(ScopePath::parse("//var").unwrap().to_string(), "/var");
    }

    #[test]
    fn rejects_bad_paths() {
        assert_eq!(ScopePath::parse(""), Err(PathError::Empty));
        assert!(matches!(
            ScopePath::parse("etc"),
            Err(PathError::NotAbsolute(_))
        ));
        assert!(matches!(
            ScopePath::parse("./etc"),
            Err(PathError::NotAbsolute(_))
        ));
        assert!(matches!(
            ScopePath::parse("/etc/../root"),
            Err(PathError::ParentComponent(_))
        ));
        assert!(matches!(
            ScopePath::parse("/.."),
            Err(PathError::ParentComponent(_))
        ));
        assert!(matches!(ScopePath::parse("/"), Err(PathError::Root(_))));
        assert!(matches!(ScopePath::parse("/./"), Err(PathError::Root(_))));
        assert!(matches!(
            ScopePath::parse("/etc/\0x"),
            Err(PathError::ControlCharacter(_))
        ));
        assert!(matches!(
            ScopePath::parse("/etc/\nx"),
            Err(PathError::ControlCharacter(_))
        ));
        assert_eq!(
            ScopePath::parse(&format!("/{}", "a".repeat(5000))),
            Err(PathError::TooLong)
        );
    }

    #[test]
    fn containment_is_per_component() {
        let backup = ScopePath::parse("/srv/backup").unwrap();
        assert!(ScopePath::parse("/srv/backup/db")
            .unwrap()
            .is_within(&backup));
        assert!(ScopePath::parse("/srv/backup").unwrap().is_within(&backup));
        assert!(!ScopePath::parse("/srv/backup2").unwrap().is_within(&backup));
        assert!(ScopePath::parse("/srv").unwrap().overlaps(&backup));
        assert!(!ScopePath::parse("/srv/www").unwrap().overlaps(&backup));
    }

    proptest! {
        /// Whatever we accept is already in normal form: parsing it again is
        /// the identity, and it never contains `..`, `//`, or a trailing `/`.
        #[test]
        fn parse_is_idempotent(raw in "(/[a-z.]{0,4}){1,6}/?") {
            if let Ok(p) = ScopePath::parse(&raw) {
                let s = p.to_string();
                prop_assert_eq!(ScopePath::parse(&s).unwrap(), p.clone());
                prop_assert!(!s.contains("//"));
                prop_assert!(!s.ends_with('/'));
                prop_assert!(!s.split('/').any(|c| c == ".." || c == "."));
            }
        }

        /// Containment agrees with a plain string model on normalized paths.
        #[test]
        fn within_matches_string_model(a in "(/[ab]{1,2}){1,4}", b in "(/[ab]{1,2}){1,4}") {
            let pa = ScopePath::parse(&a).unwrap();
            let pb = ScopePath::parse(&b).unwrap();
            let model = a == b || a.starts_with(&format!("{b}/"));
            prop_assert_eq!(pa.is_within(&pb), model);
        }
    }
}
