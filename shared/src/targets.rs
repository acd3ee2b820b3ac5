//! Which hosts a bundle may run on.
//!
//! The 2012 incident began with a program that had no target list and so ran
//! everywhere. Here a target set is a value that cannot be empty: parsing
//! rejects a missing or empty `hosts`, so "no targets" can never silently
//! mean "all hosts". The agent and the controller both call
//! [`Targets::matches`], so they agree on who is in scope.

use std::collections::BTreeMap;
use std::fmt;

use globset::{Glob, GlobBuilder, GlobMatcher};
use serde::Serialize;

/// Why a target specification was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("[targets] hosts is empty: a bundle must name the hosts it may run on (an empty list means no host, so it is refused)")]
    NoHosts,
    #[error("host pattern {0:?} is invalid: {1}")]
    BadPattern(String, String),
    #[error(
        "label {0:?} is invalid: label keys and values are non-empty and printable, without spaces"
    )]
    BadLabel(String),
    #[error("too many {0} (at most {1})")]
    TooMany(&'static str, usize),
}

const MAX_PATTERNS: usize = 1024;
const MAX_LABELS: usize = 64;

/// A glob over host names, matched case-insensitively (DNS names are).
#[derive(Clone)]
pub struct HostPattern {
    source: String,
    matcher: GlobMatcher,
}

impl HostPattern {
    pub fn parse(raw: &str) -> Result<Self, TargetError> {
        let bad = |why: &str| TargetError::BadPattern(raw.to_string(), why.to_string());
        if raw.is_empty() {
            return Err(bad("empty pattern"));
        }
        if raw.len() > 253 {
            return Err(bad("longer than a DNS name may be"));
        }
        // Host names are letters, digits, '-', '.', '_'; patterns add glob syntax.
        if let Some(c) = raw
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "-._*?[]{},!".contains(*c)))
        {
            return Err(bad(&format!("character {c:?} cannot occur in a host name")));
        }
        let glob: Glob = GlobBuilder::new(raw)
            .case_insensitive(true)
            .literal_separator(false)
            .build()
            .map_err(|e| bad(&e.kind().to_string()))?;
        Ok(HostPattern {
            source: raw.to_string(),
            matcher: glob.compile_matcher(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn matches(&self, host: &str) -> bool {
        self.matcher.is_match(host)
    }

    /// True when the pattern is a bare wildcard that matches every name.
    /// Allowed (an operator may mean it), but shown loudly by `inspect`.
    pub fn is_match_all(&self) -> bool {
        self.source.chars().all(|c| c == '*')
    }
}

impl fmt::Debug for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostPattern({:?})", self.source)
    }
}

impl PartialEq for HostPattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}
impl Eq for HostPattern {}

impl Serialize for HostPattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

/// Parsed on the way in ([`HostPattern::parse`]): a request carrying a
/// pattern that is not one is refused as a whole.
impl<'de> serde::Deserialize<'de> for HostPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        HostPattern::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// A host's identity as the agent knows it from its own policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostIdentity {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// The non-empty set of hosts a bundle may run on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Targets {
    hosts: Vec<HostPattern>,
    labels: BTreeMap<String, String>,
}

/// Why a host is not in a bundle's targets; shown in refusals.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetMismatch {
    #[error("host {host:?} matches none of the bundle's host patterns {patterns:?}")]
    HostName { host: String, patterns: Vec<String> },
    #[error("host {host:?} label {key:?} is {actual:?}, the bundle requires {expected:?}")]
    Label {
        host: String,
        key: String,
        expected: String,
        actual: Option<String>,
    },
}

pub fn validate_label(key: &str, value: &str) -> Result<(), TargetError> {
    let ok = |s: &str| !s.is_empty() && s.len() <= 253 && s.chars().all(|c| c.is_ascii_graphic());
    if ok(key) && ok(value) {
        Ok(())
    } else {
        Err(TargetError::BadLabel(format!("{key}={value}")))
    }
}

impl Targets {
    pub fn new(hosts: &[String], labels: BTreeMap<String, String>) -> Result<Self, TargetError> {
        if hosts.is_empty() {
            return Err(TargetError::NoHosts);
        }
        if hosts.len() > MAX_PATTERNS {
            return Err(TargetError::TooMany("host patterns", MAX_PATTERNS));
        }
        if labels.len() > MAX_LABELS {
            return Err(TargetError::TooMany("labels", MAX_LABELS));
        }
        for (k, v) in &labels {
            validate_label(k, v)?;
        }
        let hosts = hosts
            .iter()
            .map(|h| HostPattern::parse(h))
            .collect::<Result<_, _>>()?;
        Ok(Targets { hosts, labels })
    }

    pub fn hosts(&self) -> &[HostPattern] {
        &self.hosts
    }

    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }

    /// True when any host pattern matches every host name.
    pub fn matches_every_name(&self) -> bool {
        self.hosts.iter().any(HostPattern::is_match_all)
    }

    /// A host is in scope when its name matches at least one pattern and it
    /// carries every required label with the required value.
    pub fn check(&self, host: &HostIdentity) -> Result<(), TargetMismatch> {
        if !self.hosts.iter().any(|p| p.matches(&host.name)) {
            return Err(TargetMismatch::HostName {
                host: host.name.clone(),
                patterns: self.hosts.iter().map(|p| p.source.clone()).collect(),
            });
        }
        for (key, expected) in &self.labels {
            let actual = host.labels.get(key);
            if actual != Some(expected) {
                return Err(TargetMismatch::Label {
                    host: host.name.clone(),
                    key: key.clone(),
                    expected: expected.clone(),
                    actual: actual.cloned(),
                });
            }
        }
        Ok(())
    }

    pub fn matches(&self, host: &HostIdentity) -> bool {
        self.check(host).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, labels: &[(&str, &str)]) -> HostIdentity {
        HostIdentity {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn empty_targets_mean_no_host() {
        assert_eq!(
            Targets::new(&[], BTreeMap::new()),
            Err(TargetError::NoHosts)
        );
    }

    #[test]
    fn glob_and_labels() {
        let labels = BTreeMap::from([("role".to_string(), "mail".to_string())]);
        let t = Targets::new(&["mail-*.tokyo".into()], labels).unwrap();
        assert!(t.matches(&host(
            "mail-03.tokyo",
            &[("role", "mail"), ("site", "tokyo")]
        )));
        assert!(t.matches(&host("MAIL-03.Tokyo", &[("role", "mail")])));
        assert!(!t.matches(&host("mail-03.osaka", &[("role", "mail")])));
        assert!(!t.matches(&host("web-01.tokyo", &[("role", "mail")])));
        assert!(matches!(
            t.check(&host("mail-03.tokyo", &[("role", "web")])),
            Err(TargetMismatch::Label { .. })
        ));
        assert!(matches!(
            t.check(&host("mail-03.tokyo", &[])),
            Err(TargetMismatch::Label { .. })
        ));
    }

    #[test]
    fn bad_patterns() {
        assert!(HostPattern::parse("").is_err());
        assert!(HostPattern::parse("mail 1").is_err());
        assert!(HostPattern::parse("mail/1").is_err());
        assert!(HostPattern::parse("mail-[").is_err());
        assert!(HostPattern::parse("*").unwrap().is_match_all());
    }
}
