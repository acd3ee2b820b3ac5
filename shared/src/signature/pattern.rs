//! OpenSSH pattern-lists (ssh_config(5) "PATTERNS"), as used by the
//! principals field and the `namespaces=` option of `allowed_signers`.
//!
//! A pattern-list is a comma-separated list of patterns; `*` matches any
//! sequence of characters (including none), `?` exactly one, and a pattern
//! prefixed with `!` negates: if any negated pattern matches, the list does
//! not match, whatever else does. Matching is case-sensitive (OpenSSH calls
//! `match_pattern_list(.., dolower = 0)` for both uses).
//!
//! Written by hand because it is the exact semantics of OpenSSH's
//! `match_pattern_list` (match.c), a dozen lines; `globset` has different
//! syntax (`[...]`, `{a,b}`, path separators) that would change meaning.

use std::fmt;

/// One pattern of a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    negated: bool,
    glob: String,
}

impl Pattern {
    pub fn is_negated(&self) -> bool {
        self.negated
    }
    /// The pattern without its `!`.
    pub fn glob(&self) -> &str {
        &self.glob
    }
    /// A pattern without `*` or `?` names exactly one string.
    pub fn is_literal(&self) -> bool {
        !self.glob.contains(['*', '?'])
    }
    fn matches(&self, candidate: &str) -> bool {
        glob_match(&self.glob, candidate)
    }
}

/// Why a pattern-list is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("empty pattern list")]
    Empty,
    #[error("empty pattern in list {0:?} (two commas in a row, or a leading/trailing comma)")]
    EmptyPattern(String),
    #[error("pattern {0:?} contains whitespace, a control character or a quote")]
    BadCharacter(String),
    #[error("pattern {0:?} is longer than {max} bytes", max = super::MAX_PRINCIPAL_BYTES)]
    TooLong(String),
}

/// A parsed, non-empty pattern-list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatternList(Vec<Pattern>);

impl PatternList {
    /// Parse `a,b*,!c`. Empty patterns are errors (OpenSSH would treat one
    /// as matching only the empty string, which is never a useful entry and
    /// usually a typo), as are whitespace, control characters and quotes.
    pub fn parse(raw: &str) -> Result<Self, PatternError> {
        if raw.is_empty() {
            return Err(PatternError::Empty);
        }
        let mut patterns = Vec::new();
        for part in raw.split(',') {
            let (negated, glob) = match part.strip_prefix('!') {
                Some(rest) => (true, rest),
                None => (false, part),
            };
            if glob.is_empty() {
                return Err(PatternError::EmptyPattern(raw.to_string()));
            }
            if glob.len() > super::MAX_PRINCIPAL_BYTES {
                return Err(PatternError::TooLong(part.to_string()));
            }
            if glob
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '"')
            {
                return Err(PatternError::BadCharacter(part.to_string()));
            }
            patterns.push(Pattern {
                negated,
                glob: glob.to_string(),
            });
        }
        Ok(PatternList(patterns))
    }

    pub fn patterns(&self) -> &[Pattern] {
        &self.0
    }

    /// OpenSSH `match_pattern_list(candidate, list, 0) == 1`.
    pub fn matches(&self, candidate: &str) -> bool {
        let mut positive = false;
        for pattern in &self.0 {
            if pattern.matches(candidate) {
                if pattern.negated {
                    return false;
                }
                positive = true;
            }
        }
        positive
    }

    /// The literal (wildcard-free, non-negated) patterns that the list as a
    /// whole matches: the identities this list names by themselves. `a,!a`
    /// names nobody.
    pub fn literals(&self) -> impl Iterator<Item = &str> {
        self.0
            .iter()
            .filter(|p| !p.negated && p.is_literal())
            .map(|p| p.glob.as_str())
            .filter(|l| self.matches(l))
    }
}

impl fmt::Display for PatternList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if p.negated {
                f.write_str("!")?;
            }
            f.write_str(&p.glob)?;
        }
        Ok(())
    }
}

/// `*` and `?` glob over characters, iterative with single-star
/// backtracking (linear memory, no recursion on untrusted input).
fn glob_match(pattern: &str, candidate: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let s: Vec<char> = candidate.chars().collect();
    let (mut pi, mut si) = (0usize, 0usize);
    // Position of the last '*' seen and the candidate index it resumes at.
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, si));
                pi += 1;
            }
            Some(&c) if c == '?' || c == s[si] => {
                pi += 1;
                si += 1;
            }
            _ => match star {
                Some((star_pi, star_si)) => {
                    pi = star_pi + 1;
                    si = star_si + 1;
                    star = Some((star_pi, star_si + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn list(s: &str) -> PatternList {
        PatternList::parse(s).unwrap()
    }

    #[test]
    fn globs() {
        assert!(glob_match("alice@example.com", "alice@example.com"));
        assert!(!glob_match("alice@example.com", "alice@example.co"));
        assert!(glob_match("*@example.com", "bob@example.com"));
        assert!(glob_match("*@example.com", "@example.com"));
        assert!(!glob_match("*@example.com", "bob@example.org"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("*", ""));
        assert!(glob_match("**a**", "xxaxx"));
        assert!(glob_match("*b*b", "abcabb"));
        assert!(!glob_match("*b*b", "abca"));
        assert!(
            glob_match("ä?", "äö"),
            "matching is per character, not per byte"
        );
        assert!(
            !glob_match("Alice", "alice"),
            "case-sensitive like OpenSSH for principals"
        );
    }

    #[test]
    fn lists_and_negation() {
        let l = list("*@example.com,!mallory@example.com");
        assert!(l.matches("alice@example.com"));
        assert!(!l.matches("mallory@example.com"));
        assert!(!l.matches("alice@example.org"));
        // Negation alone never matches (OpenSSH returns 0, not 1).
        assert!(!list("!bob").matches("alice"));
        assert_eq!(
            list("alice,bob*,!carol,!dave")
                .literals()
                .collect::<Vec<_>>(),
            vec!["alice"]
        );
        assert_eq!(list("alice,!alice").literals().count(), 0);
        assert_eq!(list("alice,!a*").literals().count(), 0);
        assert_eq!(list("x,!y,z*").to_string(), "x,!y,z*");
    }

    #[test]
    fn malformed_lists() {
        assert_eq!(PatternList::parse(""), Err(PatternError::Empty));
        assert!(matches!(
            PatternList::parse("a,,b"),
            Err(PatternError::EmptyPattern(_))
        ));
        assert!(matches!(
            PatternList::parse("a,"),
            Err(PatternError::EmptyPattern(_))
        ));
        assert!(matches!(
            PatternList::parse("!"),
            Err(PatternError::EmptyPattern(_))
        ));
        assert!(matches!(
            PatternList::parse("a b"),
            Err(PatternError::BadCharacter(_))
        ));
        assert!(matches!(
            PatternList::parse("a\"b"),
            Err(PatternError::BadCharacter(_))
        ));
        assert!(matches!(
            PatternList::parse(&"a".repeat(300)),
            Err(PatternError::TooLong(_))
        ));
    }

    /// A reference matcher (exponential, fine for short inputs) to check the
    /// iterative one against.
    fn reference(p: &[char], s: &[char]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some(('*', rest)) => (0..=s.len()).any(|i| reference(rest, &s[i..])),
            Some((c, rest)) => match s.split_first() {
                Some((d, srest)) => (*c == '?' || c == d) && reference(rest, srest),
                None => false,
            },
        }
    }

    proptest! {
        #[test]
        fn glob_agrees_with_reference(p in "[ab*?]{0,8}", s in "[ab]{0,10}") {
            let pc: Vec<char> = p.chars().collect();
            let sc: Vec<char> = s.chars().collect();
            prop_assert_eq!(glob_match(&p, &s), reference(&pc, &sc));
        }

        #[test]
        fn parse_never_panics(raw in "\\PC{0,40}", candidate in "\\PC{0,20}") {
            if let Ok(l) = PatternList::parse(&raw) {
                let _ = l.matches(&candidate);
                let _ = l.literals().count();
            }
        }
    }
}
