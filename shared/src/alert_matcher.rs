//! A rollout's `halt_on`: Alertmanager label matchers (`=`, `!=`, `=~`,
//! `!~`), parsed once into typed values (regexes compiled, anchored as
//! Alertmanager anchors them: the whole value must match).
//!
//! Syntax, as `--halt-on` and Alertmanager/amtool write it: comma-separated
//! `label OP value`, optionally wrapped in `{...}`; a value may be
//! double-quoted (with `\"` and `\\` escapes), which it must be when it
//! holds a comma or brace, e.g. `severity=critical,service=~"mail|web",
//! env!="staging"`. As in Alertmanager, a label the alert does not carry
//! counts as the empty string. An empty set of matchers matches nothing.
//!
//! Serialized form (the rollout's plan in the SQLite store, the wire
//! protocol): a set of equality matchers on distinct labels is written as
//! before this type existed, a JSON map `{"label": "value"}`, so rollouts
//! stored earlier, and older CLIs and controllers, read and write it
//! unchanged. Any other set is a JSON list of matcher strings in the syntax
//! above (`["severity=critical", "service=~\"mail|web\""]`): one map could
//! not hold an operator, nor two matchers on one label, and encoding the
//! operator inside a map value would make an old equality whose value
//! happens to start with `~` or `!` ambiguous. Both forms are accepted on
//! input.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Matchers in a set, at most.
pub const MAX_MATCHERS: usize = 32;
/// Size limit of one compiled regex (bytes), so a hostile pattern cannot
/// make the controller allocate without bound.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("halt_on matcher {input:?}: {reason}")]
pub struct MatcherError {
    pub input: String,
    pub reason: String,
}

fn err(input: &str, reason: impl Into<String>) -> MatcherError {
    MatcherError {
        input: input.to_string(),
        reason: reason.into(),
    }
}

/// A regex anchored at both ends, with its source kept for display and
/// serialization.
#[derive(Debug, Clone)]
pub struct AnchoredRegex {
    source: String,
    regex: regex::Regex,
}

impl AnchoredRegex {
    pub fn new(source: &str) -> Result<Self, regex::Error> {
        let regex = regex::RegexBuilder::new(&format!("^(?:{source})$"))
            .size_limit(REGEX_SIZE_LIMIT)
            .build()?;
        Ok(AnchoredRegex {
            source: source.to_string(),
            regex,
        })
    }
    pub fn as_str(&self) -> &str {
        &self.source
    }
    pub fn is_match(&self, value: &str) -> bool {
        self.regex.is_match(value)
    }
}

impl PartialEq for AnchoredRegex {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}
impl Eq for AnchoredRegex {}

/// What a matcher requires of its label's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MatchOp {
    Equal(String),
    NotEqual(String),
    Regex(AnchoredRegex),
    NotRegex(AnchoredRegex),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matcher {
    pub label: String,
    pub op: MatchOp,
}

impl Matcher {
    pub fn equal(label: &str, value: &str) -> Self {
        Matcher {
            label: label.to_string(),
            op: MatchOp::Equal(value.to_string()),
        }
    }

    /// Does the label's value (`""` when absent, as in Alertmanager) match?
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let v = labels.get(&self.label).map(String::as_str).unwrap_or("");
        match &self.op {
            MatchOp::Equal(x) => v == x,
            MatchOp::NotEqual(x) => v != x,
            MatchOp::Regex(r) => r.is_match(v),
            MatchOp::NotRegex(r) => !r.is_match(v),
        }
    }
}

fn needs_quotes(v: &str) -> bool {
    v.is_empty()
        || v.chars()
            .any(|c| matches!(c, ',' | '{' | '}' | '"' | '\\') || c.is_whitespace())
}

fn quote(v: &str) -> String {
    let mut s = String::with_capacity(v.len() + 2);
    s.push('"');
    for c in v.chars() {
        if c == '"' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('"');
    s
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (op, v) = match &self.op {
            MatchOp::Equal(x) => ("=", x.as_str()),
            MatchOp::NotEqual(x) => ("!=", x.as_str()),
            MatchOp::Regex(r) => ("=~", r.as_str()),
            MatchOp::NotRegex(r) => ("!~", r.as_str()),
        };
        if needs_quotes(v) {
            write!(f, "{}{op}{}", self.label, quote(v))
        } else {
            write!(f, "{}{op}{v}", self.label)
        }
    }
}

/// A label name: printable ASCII without the syntax's own characters.
fn label_char(c: char) -> bool {
    c.is_ascii_graphic() && !matches!(c, '=' | '!' | '~' | ',' | '{' | '}' | '"' | '\\')
}

/// All of a rollout's matchers: an alert halts it when it matches every one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Matchers(Vec<Matcher>);

impl Matchers {
    pub fn new(list: Vec<Matcher>) -> Self {
        Matchers(list)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Matcher> {
        self.0.iter()
    }

    /// True when every matcher matches; an empty set matches nothing.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        !self.0.is_empty() && self.0.iter().all(|m| m.matches(labels))
    }

    /// Parse `label OP value[, ...]` (optionally in `{}`); empty is an error.
    pub fn parse(raw: &str) -> Result<Self, MatcherError> {
        let mut s = raw.trim();
        if let Some(inner) = s.strip_prefix('{') {
            s = inner
                .strip_suffix('}')
                .ok_or_else(|| err(raw, "a '{' without its closing '}'"))?;
        }
        let mut out = Vec::new();
        let mut rest = s.trim_start();
        while !rest.is_empty() {
            let (m, after) = parse_one(raw, rest)?;
            out.push(m);
            rest = after.trim_start();
            match rest.strip_prefix(',') {
                Some(r) => rest = r.trim_start(),
                None if rest.is_empty() => {}
                None => return Err(err(raw, format!("expected ',' before {rest:?}"))),
            }
        }
        if out.is_empty() {
            return Err(err(
                raw,
                "no matchers: use label=value, label!=value, label=~regex or label!~regex, comma-separated",
            ));
        }
        if out.len() > MAX_MATCHERS {
            return Err(err(raw, format!("more than {MAX_MATCHERS} matchers")));
        }
        Ok(Matchers(out))
    }

    /// The old serialized form, when it can express these matchers.
    fn as_equality_map(&self) -> Option<BTreeMap<&str, &str>> {
        let mut map = BTreeMap::new();
        for m in &self.0 {
            let MatchOp::Equal(v) = &m.op else {
                return None;
            };
            if map.insert(m.label.as_str(), v.as_str()).is_some() {
                return None;
            }
        }
        Some(map)
    }
}

fn parse_one<'a>(raw: &str, s: &'a str) -> Result<(Matcher, &'a str), MatcherError> {
    let end = s.find(|c: char| !label_char(c)).unwrap_or(s.len());
    let label = &s[..end];
    if label.is_empty() {
        return Err(err(raw, format!("expected a label name at {s:?}")));
    }
    let rest = s[end..].trim_start();
    let (op, rest) = if let Some(r) = rest.strip_prefix("=~") {
        ("=~", r)
    } else if let Some(r) = rest.strip_prefix("!~") {
        ("!~", r)
    } else if let Some(r) = rest.strip_prefix("!=") {
        ("!=", r)
    } else if let Some(r) = rest.strip_prefix('=') {
        ("=", r)
    } else {
        return Err(err(
            raw,
            format!("expected =, !=, =~ or !~ after label {label:?}"),
        ));
    };
    let rest = rest.trim_start();
    let (value, rest) = if let Some(q) = rest.strip_prefix('"') {
        let mut value = String::new();
        let mut chars = q.char_indices();
        let mut close = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    close = Some(i);
                    break;
                }
                '\\' => match chars.next() {
                    Some((_, e)) => value.push(e),
                    None => break,
                },
                c => value.push(c),
            }
        }
        let close = close.ok_or_else(|| err(raw, "a '\"' without its closing '\"'"))?;
        (value, &q[close + 1..])
    } else {
        let end = rest.find([',', '{', '}', '"']).unwrap_or(rest.len());
        let v = rest[..end].trim();
        if v.is_empty() {
            return Err(err(
                raw,
                format!("label {label:?} has no value (write \"\" for the empty string)"),
            ));
        }
        (v.to_string(), &rest[end..])
    };
    let regex = |v: &str| {
        AnchoredRegex::new(v).map_err(|e| err(raw, format!("bad regex for {label:?}: {e}")))
    };
    let op = match op {
        "=" => MatchOp::Equal(value),
        "!=" => MatchOp::NotEqual(value),
        "=~" => MatchOp::Regex(regex(&value)?),
        _ => MatchOp::NotRegex(regex(&value)?),
    };
    Ok((
        Matcher {
            label: label.to_string(),
            op,
        },
        rest,
    ))
}

impl fmt::Display for Matchers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(Matcher::to_string).collect();
        f.write_str(&parts.join(","))
    }
}

impl FromIterator<Matcher> for Matchers {
    fn from_iter<I: IntoIterator<Item = Matcher>>(iter: I) -> Self {
        Matchers(iter.into_iter().collect())
    }
}

impl Serialize for Matchers {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.as_equality_map() {
            Some(map) => map.serialize(s),
            None => self
                .0
                .iter()
                .map(Matcher::to_string)
                .collect::<Vec<_>>()
                .serialize(s),
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawMatchers {
    /// The old form: equalities.
    Map(BTreeMap<String, String>),
    List(Vec<String>),
}

impl<'de> Deserialize<'de> for Matchers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match RawMatchers::deserialize(d)? {
            RawMatchers::Map(map) => {
                if map.len() > MAX_MATCHERS {
                    return Err(D::Error::custom(format!(
                        "halt_on: more than {MAX_MATCHERS} matchers"
                    )));
                }
                Ok(map.iter().map(|(k, v)| Matcher::equal(k, v)).collect())
            }
            RawMatchers::List(list) => {
                if list.len() > MAX_MATCHERS {
                    return Err(D::Error::custom(format!(
                        "halt_on: more than {MAX_MATCHERS} matchers"
                    )));
                }
                let mut out = Vec::with_capacity(list.len());
                for item in &list {
                    let (m, rest) = parse_one(item, item.trim()).map_err(D::Error::custom)?;
                    if !rest.trim().is_empty() {
                        return Err(D::Error::custom(format!(
                            "halt_on matcher {item:?}: one matcher per list entry"
                        )));
                    }
                    out.push(m);
                }
                Ok(Matchers(out))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn all_four_operators() {
        let m = Matchers::parse(
            r#"severity=critical, service=~"mail|web", env!=staging, instance!~"test-.*""#,
        )
        .unwrap();
        assert_eq!(m.iter().count(), 4);
        let alert = labels(&[
            ("severity", "critical"),
            ("service", "mail"),
            ("env", "prod"),
            ("instance", "mail-01"),
        ]);
        assert!(m.matches(&alert));
        let mut other = alert.clone();
        other.insert("severity".into(), "warning".into());
        assert!(!m.matches(&other), "=");
        let mut other = alert.clone();
        other.insert("service".into(), "db".into());
        assert!(!m.matches(&other), "=~");
        let mut other = alert.clone();
        other.insert("env".into(), "staging".into());
        assert!(!m.matches(&other), "!=");
        let mut other = alert.clone();
        other.insert("instance".into(), "test-01".into());
        assert!(!m.matches(&other), "!~");
        // A missing label is the empty string: != and !~ match it.
        let mut other = alert.clone();
        other.remove("env");
        other.remove("instance");
        assert!(m.matches(&other));
    }

    #[test]
    fn regexes_are_anchored_as_alertmanager_anchors_them() {
        let m = Matchers::parse("service=~mail").unwrap();
        assert!(m.matches(&labels(&[("service", "mail")])));
        assert!(!m.matches(&labels(&[("service", "mailer")])));
        assert!(!m.matches(&labels(&[("service", "webmail")])));
        // The alternation is inside the anchors, not `^a|b$`.
        let m = Matchers::parse(r#"service=~"a|b""#).unwrap();
        assert!(!m.matches(&labels(&[("service", "ab")])));
        assert!(!m.matches(&labels(&[("service", "xb")])));
        assert!(m.matches(&labels(&[("service", "b")])));
        let m = Matchers::parse("service!~mail").unwrap();
        assert!(m.matches(&labels(&[("service", "mailer")])));
        assert!(!m.matches(&labels(&[("service", "mail")])));
    }

    #[test]
    fn bad_matchers_are_refused() {
        for bad in [
            "",
            " , ",
            "severity",
            "=critical",
            "severity=",
            "severity~critical",
            "service=~\"(unclosed\"",
            "service=~(unclosed",
            "service!~[z-a]",
            "a=\"unterminated",
            "{a=b",
            "a=b c=d\"x\"",
        ] {
            assert!(Matchers::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let e = Matchers::parse("service=~(").unwrap_err();
        assert!(e.to_string().contains("bad regex"), "{e}");
    }

    #[test]
    fn quoting_braces_and_empty_values() {
        let m =
            Matchers::parse(r#"{ severity = "critical", team=~"a{1,3}", note="x\"y" }"#).unwrap();
        assert!(m.matches(&labels(&[
            ("severity", "critical"),
            ("team", "aa"),
            ("note", "x\"y")
        ])));
        // `label=""` matches an alert without the label.
        let m = Matchers::parse(r##"alertname=Foo,silence="""##).unwrap();
        assert!(m.matches(&labels(&[("alertname", "Foo")])));
        assert!(!m.matches(&labels(&[("alertname", "Foo"), ("silence", "1")])));
        assert!(!Matchers::default().matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn serialized_form_is_the_old_map_for_equalities_and_a_list_otherwise() {
        // Old rows and old clients: a JSON map of equalities.
        let old: Matchers =
            serde_json::from_str(r#"{"severity":"critical","service":"mail"}"#).unwrap();
        assert_eq!(
            old,
            Matchers::parse("service=mail,severity=critical").unwrap()
        );
        assert_eq!(
            serde_json::to_string(&old).unwrap(),
            r#"{"service":"mail","severity":"critical"}"#
        );
        let empty: Matchers = serde_json::from_str("{}").unwrap();
        assert!(empty.is_empty());

        let new = Matchers::parse(r##"severity=critical,service=~"mail|web,x",env!="""##).unwrap();
        let json = serde_json::to_string(&new).unwrap();
        assert_eq!(
            json,
            r#"["severity=critical","service=~\"mail|web,x\"","env!=\"\""]"#
        );
        let back: Matchers = serde_json::from_str(&json).unwrap();
        assert_eq!(back, new);
        // Two matchers on one label cannot be a map.
        let two = Matchers::parse("a=x,a=y").unwrap();
        assert!(serde_json::to_string(&two).unwrap().starts_with('['));

        assert!(serde_json::from_str::<Matchers>(r#"["service=~(("]"#).is_err());
        assert!(serde_json::from_str::<Matchers>(r#"["a=b,c=d"]"#).is_err());
        assert!(serde_json::from_str::<Matchers>("3").is_err());
    }
}
