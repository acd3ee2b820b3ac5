//! The OpenSSH `allowed_signers` file (ssh-keygen(1), "ALLOWED SIGNERS").
//!
//! ```text
//! # comment
//! principals [options] keytype base64-key [comment]
//! alice@example.com,al@example.com ssh-ed25519 AAAA... alice's laptop
//! *@example.com namespaces="rollguard-bundle",valid-before="20271231Z" ssh-ed25519 AAAA...
//! ```
//!
//! Hand-written: `ssh-key` 0.6 has no parser for this file, and the one in
//! the `sshcerts` crate does not follow ssh-keygen (it splits options on
//! spaces instead of commas and reads `valid-after` as a number instead of
//! `YYYYMMDD[HHMM[SS]][Z]`). This follows OpenSSH's `sshsig.c`
//! (`parse_principals_key_and_options`, `sshsigopt_parse`) and `misc.c`
//! (`opt_dequote`, `parse_absolute_time`), with deliberate differences,
//! all fail-closed:
//!
//! - any malformed line makes the whole file an error (ssh-keygen only
//!   notices a broken line when it reaches it while searching), so a typo
//!   can never silently drop a signer;
//! - keys other than `ssh-ed25519` and `sk-ssh-ed25519@openssh.com` (an
//!   ed25519 key on a FIDO security key) are errors, since rollguard
//!   accepts no other kind of signature;
//! - two options of sshd's `authorized_keys` apply to security keys,
//!   `no-touch-required` and `verify-required` ([`SkPolicy`]), with sshd's
//!   meaning. ssh-keygen's allowed_signers has neither: `ssh-keygen -Y
//!   verify` checks no authenticator flags at all and refuses a line that
//!   carries one. rollguard, like sshd, requires the user-presence flag (a
//!   touch) of every security-key signature unless its line says
//!   `no-touch-required`.
//!
//! `cert-authority` entries are parsed but never match a plain-key
//! signature: rollguard does not support certificates.

use std::fmt;
use std::path::Path;

use jiff::civil::DateTime;
use jiff::tz::TimeZone;
use jiff::Timestamp;
use ssh_key::PublicKey;

use super::pattern::{PatternError, PatternList};

/// Largest `allowed_signers` file [`AllowedSigners::load`] reads.
pub const MAX_ALLOWED_SIGNERS_BYTES: u64 = 1024 * 1024;

/// What an entry of a security key (`sk-ssh-ed25519@openssh.com`)
/// demands of its signatures: the flags the authenticator must have set
/// when it signed (sshd's `authorized_keys` options of the same names).
/// The flags are covered by the signature, so a signature that claims a
/// touch it did not get cannot be forged without the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SkPolicy {
    /// User presence (flag 0x01: someone touched the key). Required
    /// unless the line says `no-touch-required`.
    pub user_presence: bool,
    /// User verification (flag 0x04: PIN or biometric), required by
    /// `verify-required`.
    pub user_verification: bool,
}

impl Default for SkPolicy {
    /// sshd's default: a touch, no PIN.
    fn default() -> Self {
        SkPolicy {
            user_presence: true,
            user_verification: false,
        }
    }
}

/// One entry (line) of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedSigner {
    line: usize,
    principals: PatternList,
    cert_authority: bool,
    namespaces: Option<PatternList>,
    valid_after: Option<Timestamp>,
    valid_before: Option<Timestamp>,
    key: PublicKey,
    /// `Some` exactly when `key` is a security key.
    sk_policy: Option<SkPolicy>,
}

impl AllowedSigner {
    /// 1-based line number in the file.
    pub fn line(&self) -> usize {
        self.line
    }
    pub fn principals(&self) -> &PatternList {
        &self.principals
    }
    /// A CA entry: never matches a plain-key signature (no certificates).
    pub fn is_cert_authority(&self) -> bool {
        self.cert_authority
    }
    /// `namespaces=`; `None` means every namespace.
    pub fn namespaces(&self) -> Option<&PatternList> {
        self.namespaces.as_ref()
    }
    /// The key may be used at or after this instant.
    pub fn valid_after(&self) -> Option<Timestamp> {
        self.valid_after
    }
    /// The key may be used at or before this instant.
    pub fn valid_before(&self) -> Option<Timestamp> {
        self.valid_before
    }
    /// An `ssh-ed25519` or `sk-ssh-ed25519@openssh.com` key; the comment
    /// of the line is its comment.
    pub fn public_key(&self) -> &PublicKey {
        &self.key
    }
    /// For a security key, the authenticator flags its signatures need;
    /// `None` for a plain ed25519 key.
    pub fn sk_policy(&self) -> Option<SkPolicy> {
        self.sk_policy
    }
    /// Whether the entry's `namespaces=` (if any) admits `namespace`.
    pub fn allows_namespace(&self, namespace: &str) -> bool {
        self.namespaces
            .as_ref()
            .is_none_or(|n| n.matches(namespace))
    }
}

/// A parsed `allowed_signers` file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedSigners {
    entries: Vec<AllowedSigner>,
}

/// What is wrong with one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("the line has principals but no key")]
    MissingKey,
    #[error("principals: {0}")]
    Principals(PatternError),
    #[error("principals: unterminated quote")]
    UnterminatedPrincipalQuote,
    #[error("principals: a quote may only enclose the whole field")]
    StrayQuote,
    #[error("options: unterminated quote")]
    UnterminatedOptionQuote,
    #[error("unknown option {0:?} (known: cert-authority, namespaces=\"...\", valid-after=\"...\", valid-before=\"...\", no-touch-required, verify-required)")]
    UnknownOption(String),
    #[error("option {0} is given twice")]
    DuplicateOption(&'static str),
    #[error("option {0}: the value must be in double quotes, e.g. {0}=\"...\"")]
    MissingQuote(&'static str),
    #[error("options end with a comma")]
    TrailingComma,
    #[error("namespaces: {0}")]
    Namespaces(PatternError),
    #[error("{option}: {value:?} is not a time: use YYYYMMDD, YYYYMMDDHHMM or YYYYMMDDHHMMSS, with Z for UTC")]
    BadTime { option: &'static str, value: String },
    #[error("{option}: {value:?} is local time, but the system time zone is unknown ({detail}); add Z to mean UTC")]
    NoLocalTimeZone {
        option: &'static str,
        value: String,
        detail: String,
    },
    #[error("valid-before is not after valid-after")]
    EmptyValidity,
    #[error("key type {0} is not supported: rollguard accepts ssh-ed25519 and sk-ssh-ed25519@openssh.com keys only")]
    UnsupportedKeyType(String),
    #[error("{0:?} is not a key type (expected ssh-ed25519 or sk-ssh-ed25519@openssh.com)")]
    NotAKeyType(String),
    #[error("the {0} key is malformed: {1}")]
    BadKey(&'static str, String),
    #[error("option {0} applies to security keys (sk-ssh-ed25519@openssh.com) only, and this is a plain ssh-ed25519 key")]
    SkOptionOnPlainKey(&'static str),
}

#[derive(Debug, thiserror::Error)]
pub enum AllowedSignersError {
    #[error("cannot read allowed signers file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("allowed signers file {path} is larger than {MAX_ALLOWED_SIGNERS_BYTES} bytes")]
    TooLarge { path: String },
    #[error("allowed signers file {path} is not UTF-8")]
    NotUtf8 { path: String },
    #[error("{origin}:{line}: {problem}")]
    Line {
        origin: String,
        line: usize,
        problem: LineError,
    },
}

/// Where local (non-`Z`) times are interpreted.
enum LocalZone<'a> {
    System,
    Given(&'a TimeZone),
}

impl AllowedSigners {
    /// Read and parse a file. Local times are in the system time zone.
    pub fn load(path: &Path) -> Result<Self, AllowedSignersError> {
        use std::io::Read;
        let shown = path.display().to_string();
        let io = |source| AllowedSignersError::Io {
            path: shown.clone(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let mut bytes = Vec::new();
        file.take(MAX_ALLOWED_SIGNERS_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        if bytes.len() as u64 > MAX_ALLOWED_SIGNERS_BYTES {
            return Err(AllowedSignersError::TooLarge { path: shown });
        }
        let text = String::from_utf8(bytes).map_err(|_| AllowedSignersError::NotUtf8 {
            path: shown.clone(),
        })?;
        Self::parse_inner(&text, &shown, LocalZone::System)
    }

    /// Parse file contents. Local times are in the system time zone
    /// (`TZ`, else `/etc/localtime`), as ssh-keygen does.
    pub fn parse(text: &str) -> Result<Self, AllowedSignersError> {
        Self::parse_inner(text, "allowed_signers", LocalZone::System)
    }

    /// Parse file contents, interpreting local times in `zone`.
    pub fn parse_with_time_zone(text: &str, zone: &TimeZone) -> Result<Self, AllowedSignersError> {
        Self::parse_inner(text, "allowed_signers", LocalZone::Given(zone))
    }

    fn parse_inner(
        text: &str,
        origin: &str,
        zone: LocalZone<'_>,
    ) -> Result<Self, AllowedSignersError> {
        let mut entries = Vec::new();
        // `split('\n')`, not `lines()`: numbering must match what an editor
        // shows, and a lone '\r' is not a line break for ssh-keygen either.
        for (index, raw) in text.split('\n').enumerate() {
            let line = index + 1;
            let raw = raw.strip_suffix('\r').unwrap_or(raw);
            match parse_line(raw, line, &zone) {
                Ok(Some(entry)) => entries.push(entry),
                Ok(None) => {}
                Err(problem) => {
                    return Err(AllowedSignersError::Line {
                        origin: origin.to_string(),
                        line,
                        problem,
                    });
                }
            }
        }
        Ok(AllowedSigners { entries })
    }

    pub fn entries(&self) -> &[AllowedSigner] {
        &self.entries
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

const SEPARATORS: [char; 2] = [' ', '\t'];

fn skip_space(s: &str) -> &str {
    s.trim_start_matches(SEPARATORS)
}

/// Split off the first space-separated word.
fn take_word(s: &str) -> (&str, &str) {
    match s.find(SEPARATORS) {
        Some(i) => (&s[..i], skip_space(&s[i..])),
        None => (s, ""),
    }
}

fn parse_line(
    raw: &str,
    line: usize,
    zone: &LocalZone<'_>,
) -> Result<Option<AllowedSigner>, LineError> {
    let s = skip_space(raw);
    if s.is_empty() || s.starts_with('#') {
        return Ok(None);
    }
    let (principals, rest) = take_principals(s)?;
    let principals = PatternList::parse(principals).map_err(LineError::Principals)?;
    if rest.is_empty() {
        return Err(LineError::MissingKey);
    }

    // SignerOptions are present when the second field is not a key type; that is
    // how ssh-keygen decides too (it tries to read a key first).
    let (options, rest) = if key_type(take_word(rest).0).is_some() {
        (SignerOptions::default(), rest)
    } else {
        let (token, rest) = take_options_token(rest)?;
        (parse_options(token, zone)?, rest)
    };

    let (type_name, rest) = take_word(rest);
    if type_name.is_empty() {
        return Err(LineError::MissingKey);
    }
    let (kind, type_name) = match key_type(type_name) {
        Some(KeyType::Ed25519) => (KeyType::Ed25519, "ssh-ed25519"),
        Some(KeyType::SkEd25519) => (KeyType::SkEd25519, "sk-ssh-ed25519@openssh.com"),
        Some(KeyType::Other) => return Err(LineError::UnsupportedKeyType(type_name.to_string())),
        None => return Err(LineError::NotAKeyType(type_name.to_string())),
    };
    let (base64, comment) = take_word(rest);
    if base64.is_empty() {
        return Err(LineError::MissingKey);
    }
    let bad_key = |detail: String| LineError::BadKey(type_name, detail);
    let mut key = PublicKey::from_openssh(&format!("{type_name} {base64}"))
        .map_err(|e| bad_key(e.to_string()))?;
    // The encoded blob must say the same type as the text.
    let blob_matches = match kind {
        KeyType::Ed25519 => key.key_data().is_ed25519(),
        KeyType::SkEd25519 => key.key_data().is_sk_ed25519(),
        KeyType::Other => false,
    };
    if !blob_matches {
        return Err(bad_key(format!(
            "the key data is {}, not {type_name}",
            key.algorithm()
        )));
    }
    key.set_comment(comment.trim_end_matches(SEPARATORS));
    let sk_policy = match kind {
        KeyType::SkEd25519 => Some(SkPolicy {
            user_presence: !options.no_touch_required,
            user_verification: options.verify_required,
        }),
        // A plain key has no authenticator to confirm anything: an option
        // that asks for a touch or a PIN would be a promise nothing keeps
        // (and `no-touch-required` there says the line means another key).
        _ if options.verify_required => {
            return Err(LineError::SkOptionOnPlainKey("verify-required"))
        }
        _ if options.no_touch_required => {
            return Err(LineError::SkOptionOnPlainKey("no-touch-required"))
        }
        _ => None,
    };

    Ok(Some(AllowedSigner {
        line,
        principals,
        cert_authority: options.cert_authority,
        namespaces: options.namespaces,
        valid_after: options.valid_after,
        valid_before: options.valid_before,
        key,
        sk_policy,
    }))
}

/// The principals field: a word, or one double-quoted string (OpenSSH's
/// `strdelimw`). Quotes elsewhere in the field are refused rather than
/// reproducing OpenSSH's odd splicing of `a"b c"`.
fn take_principals(s: &str) -> Result<(&str, &str), LineError> {
    if let Some(quoted) = s.strip_prefix('"') {
        let end = quoted
            .find('"')
            .ok_or(LineError::UnterminatedPrincipalQuote)?;
        let after = &quoted[end + 1..];
        if !(after.is_empty() || after.starts_with(SEPARATORS)) {
            return Err(LineError::StrayQuote);
        }
        return Ok((&quoted[..end], skip_space(after)));
    }
    let (word, rest) = take_word(s);
    if word.contains('"') {
        return Err(LineError::StrayQuote);
    }
    Ok((word, rest))
}

/// The options field ends at the first space or tab outside double quotes;
/// `\"` inside quotes is an escaped quote (OpenSSH's
/// `sshkey_advance_past_options`).
fn take_options_token(s: &str) -> Result<(&str, &str), LineError> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ' ' | '\t' if !quoted => return Ok((&s[..i], skip_space(&s[i..]))),
            _ => {}
        }
    }
    if quoted {
        return Err(LineError::UnterminatedOptionQuote);
    }
    Ok((s, ""))
}

#[derive(Debug, Default)]
struct SignerOptions {
    cert_authority: bool,
    namespaces: Option<PatternList>,
    valid_after: Option<Timestamp>,
    valid_before: Option<Timestamp>,
    no_touch_required: bool,
    verify_required: bool,
}

/// `cert-authority`, `namespaces="..."`, `valid-after="..."`,
/// `valid-before="..."`, `no-touch-required`, `verify-required`,
/// comma-separated, keywords case-insensitive. Like `cert-authority`, a
/// flag given twice means the same as once.
fn parse_options(token: &str, zone: &LocalZone<'_>) -> Result<SignerOptions, LineError> {
    let mut opts = SignerOptions::default();
    let mut rest = token;
    loop {
        if let Some(r) = strip_prefix_ci(rest, "cert-authority") {
            opts.cert_authority = true;
            rest = r;
        } else if let Some(r) = strip_prefix_ci(rest, "no-touch-required") {
            opts.no_touch_required = true;
            rest = r;
        } else if let Some(r) = strip_prefix_ci(rest, "verify-required") {
            opts.verify_required = true;
            rest = r;
        } else if let Some(r) = strip_prefix_ci(rest, "namespaces=") {
            if opts.namespaces.is_some() {
                return Err(LineError::DuplicateOption("namespaces"));
            }
            let (value, r) = dequote(r, "namespaces")?;
            opts.namespaces = Some(PatternList::parse(&value).map_err(LineError::Namespaces)?);
            rest = r;
        } else if let Some(r) = strip_prefix_ci(rest, "valid-after=") {
            if opts.valid_after.is_some() {
                return Err(LineError::DuplicateOption("valid-after"));
            }
            let (value, r) = dequote(r, "valid-after")?;
            opts.valid_after = Some(parse_time("valid-after", &value, zone)?);
            rest = r;
        } else if let Some(r) = strip_prefix_ci(rest, "valid-before=") {
            if opts.valid_before.is_some() {
                return Err(LineError::DuplicateOption("valid-before"));
            }
            let (value, r) = dequote(r, "valid-before")?;
            opts.valid_before = Some(parse_time("valid-before", &value, zone)?);
            rest = r;
        } else {
            let name = rest.split([',', '=']).next().unwrap_or(rest);
            return Err(LineError::UnknownOption(name.to_string()));
        }
        if rest.is_empty() {
            break;
        }
        // Anything but a comma right after an option (e.g.
        // `cert-authorityX`, `namespaces="a"x`) is unknown text.
        rest = match rest.strip_prefix(',') {
            Some(r) => r,
            None => return Err(LineError::UnknownOption(rest.to_string())),
        };
        if rest.is_empty() {
            return Err(LineError::TrailingComma);
        }
    }
    if let (Some(after), Some(before)) = (opts.valid_after, opts.valid_before) {
        if before <= after {
            return Err(LineError::EmptyValidity);
        }
    }
    Ok(opts)
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    if head.eq_ignore_ascii_case(prefix) {
        s.get(prefix.len()..)
    } else {
        None
    }
}

/// A double-quoted value with `\"` escapes (OpenSSH `opt_dequote`).
fn dequote<'a>(s: &'a str, option: &'static str) -> Result<(String, &'a str), LineError> {
    let body = s.strip_prefix('"').ok_or(LineError::MissingQuote(option))?;
    let mut value = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((value, &body[i + 1..])),
            '\\' if body[i + 1..].starts_with('"') => {
                value.push('"');
                chars.next();
            }
            _ => value.push(c),
        }
    }
    Err(LineError::UnterminatedOptionQuote)
}

/// `YYYYMMDD`, `YYYYMMDDHHMM` or `YYYYMMDDHHMMSS`, then optionally `Z` or
/// `UTC` (any case) for UTC; otherwise local time. Like OpenSSH, instants
/// at or before the Unix epoch are refused.
fn parse_time(
    option: &'static str,
    value: &str,
    zone: &LocalZone<'_>,
) -> Result<Timestamp, LineError> {
    let bad = || LineError::BadTime {
        option,
        value: value.to_string(),
    };
    let (digits, utc) = if let Some(d) = strip_suffix_ci(value, "Z") {
        (d, true)
    } else if let Some(d) = strip_suffix_ci(value, "UTC") {
        (d, true)
    } else {
        (value, false)
    };
    if !matches!(digits.len(), 8 | 12 | 14) || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    // All ASCII digits, so these slices are on character boundaries.
    let field = |range: std::ops::Range<usize>| -> Result<i16, LineError> {
        digits
            .get(range)
            .and_then(|f| f.parse::<i16>().ok())
            .ok_or_else(bad)
    };
    let small = |range: std::ops::Range<usize>| -> Result<i8, LineError> {
        if range.end > digits.len() {
            return Ok(0);
        }
        i8::try_from(field(range)?).map_err(|_| bad())
    };
    let dt = DateTime::new(
        field(0..4)?,
        small(4..6)?,
        small(6..8)?,
        small(8..10)?,
        small(10..12)?,
        small(12..14)?,
        0,
    )
    .map_err(|_| bad())?;
    let ts = if utc {
        TimeZone::UTC.to_timestamp(dt)
    } else {
        match zone {
            LocalZone::Given(tz) => tz.to_timestamp(dt),
            LocalZone::System => match TimeZone::try_system() {
                Ok(tz) => tz.to_timestamp(dt),
                Err(e) => {
                    return Err(LineError::NoLocalTimeZone {
                        option,
                        value: value.to_string(),
                        detail: e.to_string(),
                    })
                }
            },
        }
    }
    .map_err(|_| bad())?;
    if ts <= Timestamp::UNIX_EPOCH {
        return Err(bad());
    }
    Ok(ts)
}

fn strip_suffix_ci<'a>(s: &'a str, suffix: &str) -> Option<&'a str> {
    let cut = s.len().checked_sub(suffix.len())?;
    // OpenSSH requires something before the suffix.
    if cut == 0 {
        return None;
    }
    let tail = s.get(cut..)?;
    if tail.eq_ignore_ascii_case(suffix) {
        s.get(..cut)
    } else {
        None
    }
}

enum KeyType {
    Ed25519,
    SkEd25519,
    Other,
}

/// Recognize the key types OpenSSH knows, so that an unsupported key gets
/// a clear "unsupported" error instead of being read as options.
fn key_type(word: &str) -> Option<KeyType> {
    const OTHER: &[&str] = &[
        "ssh-rsa",
        "ssh-dss",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ecdsa-sha2-nistp256@openssh.com",
        "ssh-xmss@openssh.com",
    ];
    if word == "ssh-ed25519" {
        Some(KeyType::Ed25519)
    } else if word == "sk-ssh-ed25519@openssh.com" {
        Some(KeyType::SkEd25519)
    } else if OTHER.contains(&word) || word.ends_with("-cert-v01@openssh.com") {
        Some(KeyType::Other)
    } else {
        None
    }
}

impl fmt::Display for AllowedSigner {
    /// The entry as an `allowed_signers` line (times in UTC).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let principals = self.principals.to_string();
        if principals.starts_with('#') {
            // Unquoted, it would read as a comment line.
            write!(f, "\"{principals}\"")?;
        } else {
            f.write_str(&principals)?;
        }
        let mut options = Vec::new();
        if self.cert_authority {
            options.push("cert-authority".to_string());
        }
        if let Some(ns) = &self.namespaces {
            options.push(format!("namespaces=\"{ns}\""));
        }
        if let Some(t) = self.valid_after {
            options.push(format!("valid-after=\"{}\"", t.strftime("%Y%m%d%H%M%SZ")));
        }
        if let Some(t) = self.valid_before {
            options.push(format!("valid-before=\"{}\"", t.strftime("%Y%m%d%H%M%SZ")));
        }
        if let Some(policy) = self.sk_policy {
            if !policy.user_presence {
                options.push("no-touch-required".to_string());
            }
            if policy.user_verification {
                options.push("verify-required".to_string());
            }
        }
        if !options.is_empty() {
            write!(f, " {}", options.join(","))?;
        }
        match self.key.to_openssh() {
            Ok(key) => write!(f, " {key}"),
            Err(_) => Err(fmt::Error),
        }
    }
}
