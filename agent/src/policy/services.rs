//! `[services]` of the host policy: which systemd services bundles may have
//! the agent reload or restart (docs/services.md).
//!
//! ```toml
//! [services]
//! allow = ["postfix.service", "php*-fpm.service"]
//! ```
//!
//! Absent or empty: nothing is allowed (fail closed), so a bundle that
//! declares a service action is refused and a captured request is a
//! denial. Patterns are globs (`*`, `?`, `[...]`, `{a,b}`) matched against
//! the whole unit name, case-sensitively as systemd names are; each must
//! end in `.service`, so a pattern can never reach another unit type. A
//! template's instance (`getty@tty1.service`) matches only patterns that
//! contain `@`.
//!
//! ```toml
//! [services]
//! allow = ["postfix.service"]
//! perform_when_denials_unknown = true   # default false
//! ```
//!
//! A run whose denials could not be observed (no kernel audit, as in a
//! container) has no known denial count: unknown is not zero, so by default
//! the agent performs no service action after it. A host that can never
//! observe denials opts in here, knowingly; the controller halts on the
//! report's unknown denials either way.

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use rollguard_shared::services::UnitName;
use serde::Deserialize;

/// Most patterns `allow` may hold.
const MAX_PATTERNS: usize = 256;
/// Longest pattern (systemd's `UNIT_NAME_MAX`).
const MAX_PATTERN_LEN: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServicesPolicyError {
    #[error("services.allow entry {pattern:?}: {why}")]
    BadPattern { pattern: String, why: String },
    #[error("services.allow has more than {MAX_PATTERNS} entries")]
    TooMany,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServicesPolicy {
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    perform_when_denials_unknown: bool,
}

/// The parsed `[services]`: an allow list of unit-name globs.
#[derive(Debug, Clone)]
pub struct ServicesPolicy {
    patterns: Vec<String>,
    /// The patterns without `@`, for plain names.
    plain: GlobSet,
    /// The patterns with `@`, for template instances.
    instances: GlobSet,
    perform_when_denials_unknown: bool,
}

impl Default for ServicesPolicy {
    /// Nothing allowed.
    fn default() -> Self {
        ServicesPolicy {
            patterns: Vec::new(),
            plain: GlobSet::empty(),
            instances: GlobSet::empty(),
            perform_when_denials_unknown: false,
        }
    }
}

impl ServicesPolicy {
    pub(super) fn parse(raw: Option<RawServicesPolicy>) -> Result<Self, ServicesPolicyError> {
        let raw = raw.unwrap_or_default();
        if raw.allow.len() > MAX_PATTERNS {
            return Err(ServicesPolicyError::TooMany);
        }
        // Two sets: an instance of a template (`getty@tty1.service`)
        // matches only the patterns that name one (contain `@`), so that a
        // `*` meant for part of a plain name (`php*-fpm.service`) never
        // lets a signer start any instance, with any instance string, of a
        // template whose name happens to fit.
        let mut plain = GlobSetBuilder::new();
        let mut instances = GlobSetBuilder::new();
        for p in &raw.allow {
            let bad = |why: &str| ServicesPolicyError::BadPattern {
                pattern: p.clone(),
                why: why.to_string(),
            };
            if p.is_empty() || p.len() > MAX_PATTERN_LEN {
                return Err(bad("empty or longer than a unit name may be"));
            }
            if !p.ends_with(".service") {
                return Err(bad("must end in .service (only services are acted upon)"));
            }
            // Unit-name characters plus glob syntax; no '/', no spaces.
            if let Some(c) = p
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || ":_.\\-@*?[]{},!".contains(*c)))
            {
                return Err(bad(&format!("character {c:?} cannot occur in a unit name")));
            }
            // Which set a pattern goes to is decided by its `@`; inside
            // `{a,b}` it would hold for one alternative only
            // (`{php*-fpm,getty@tty*}.service` would let `php*-fpm` match
            // instances).
            let mut depth = 0usize;
            for c in p.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth = depth.saturating_sub(1),
                    '@' if depth > 0 => {
                        return Err(bad(
                            "'@' inside {...}: write a template's instances as a pattern of their own (\"getty@tty*.service\")",
                        ))
                    }
                    _ => {}
                }
            }
            let glob = GlobBuilder::new(p)
                .literal_separator(false)
                .backslash_escape(false)
                .build()
                .map_err(|e| bad(&e.kind().to_string()))?;
            if p.contains('@') {
                instances.add(glob);
            } else {
                plain.add(glob);
            }
        }
        let build = |b: GlobSetBuilder| {
            b.build().map_err(|e| ServicesPolicyError::BadPattern {
                pattern: raw.allow.join(", "),
                why: e.to_string(),
            })
        };
        let (plain, instances) = (build(plain)?, build(instances)?);
        Ok(ServicesPolicy {
            patterns: raw.allow,
            plain,
            instances,
            perform_when_denials_unknown: raw.perform_when_denials_unknown,
        })
    }

    /// Whether bundles may have the agent act on `unit`.
    pub fn allows(&self, unit: &UnitName) -> bool {
        let set = if unit.as_str().contains('@') {
            &self.instances
        } else {
            &self.plain
        };
        unit.is_service() && set.is_match(unit.as_str())
    }

    /// A policy's `[services]` alone, from TOML text (tests elsewhere).
    #[cfg(test)]
    pub(crate) fn from_toml(toml_text: &str) -> Result<Self, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct W {
            services: Option<RawServicesPolicy>,
        }
        let w: W = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        ServicesPolicy::parse(w.services).map_err(|e| e.to_string())
    }

    /// Whether service actions follow a successful run whose denials are
    /// unknown (the host cannot observe them). Off unless the host says so.
    pub fn perform_when_denials_unknown(&self) -> bool {
        self.perform_when_denials_unknown
    }

    /// The patterns as written, for messages.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<ServicesPolicy, String> {
        ServicesPolicy::from_toml(toml_text)
    }

    fn unit(s: &str) -> UnitName {
        UnitName::parse(s).unwrap()
    }

    #[test]
    fn globs_match_whole_service_names() {
        let p = parse("[services]\nallow = [\"postfix.service\", \"php*-fpm.service\"]").unwrap();
        assert!(p.allows(&unit("postfix.service")));
        assert!(p.allows(&unit("php8.2-fpm.service")));
        assert!(!p.allows(&unit("postfix@x.service")));
        assert!(!p.allows(&unit("Postfix.service")));
        assert!(!p.allows(&unit("dovecot.service")));
        assert!(!p.allows(&unit("postfix.socket")));
        assert_eq!(p.patterns().len(), 2);
    }

    #[test]
    fn an_instance_matches_only_patterns_that_name_instances() {
        let p = parse(
            "[services]\nallow = [\"php*-fpm.service\", \"postfix*.service\", \"getty@tty*.service\"]",
        )
        .unwrap();
        assert!(p.allows(&unit("php8.2-fpm.service")));
        assert!(p.allows(&unit("postfix-out.service")));
        assert!(!p.allows(&unit("php-x@-fpm.service")));
        assert!(!p.allows(&unit("postfix@evil.service")));
        assert!(p.allows(&unit("getty@tty1.service")));
        assert!(!p.allows(&unit("getty@ttyS0x.socket")));
        assert!(!p.allows(&unit("serial-getty@ttyS0.service")));
    }

    #[test]
    fn absent_or_empty_allows_nothing() {
        for text in ["", "[services]\n", "[services]\nallow = []"] {
            let p = parse(text).unwrap();
            assert!(!p.allows(&unit("postfix.service")), "{text:?}");
        }
    }

    #[test]
    fn bad_entries_and_unknown_keys_are_errors() {
        for (text, want) in [
            ("[services]\nallowed = []", "unknown field"),
            ("[services]\nallow = \"x.service\"", "invalid type"),
            ("[services]\nallow = [\"postfix\"]", "must end in .service"),
            ("[services]\nallow = [\"*\"]", "must end in .service"),
            ("[services]\nallow = [\"a/b.service\"]", "character"),
            ("[services]\nallow = [\"\"]", "empty"),
            ("[services]\nallow = [\"[a.service\"]", "services.allow"),
            (
                "[services]\nallow = [\"{php*-fpm,getty@tty*}.service\"]",
                "inside {...}",
            ),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
