//! The allowed_signers parser against ssh-keygen(1) "ALLOWED SIGNERS".

use jiff::tz::{Offset, TimeZone};
use jiff::Timestamp;
use proptest::prelude::*;

use super::{keypair, public_line};
use crate::signature::allowed_signers::{AllowedSigners, AllowedSignersError, LineError};
use crate::signature::pattern::PatternError;

const ECDSA: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBL7iGxi2H/9UdcpBPPlkGEiJhyRMx+onQwe3cQrPiLYzNNeunIlzRvy1qPVzktr1Ue2TRzSNGeQU2E/Mjfe8X1I=";
const RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDZXE6CBS4/GFIVFduMClcO40Y791NUpBzhX1TetuSghI7dIrFX01OqJd2vXWIyUi82MVQZw5adftZosNO0XSwr4jID/C2TLkrpzPbu9KT5DGfAbFGrTQYfxVoX2QseOEvxGZ9RaHUzKT1ldZCz/CcN/4o/vZx9m538k9Efk+EN+w==";

fn k(seed: u8) -> String {
    public_line(&keypair(seed))
}

fn parse(text: &str) -> Result<AllowedSigners, AllowedSignersError> {
    AllowedSigners::parse_with_time_zone(text, &TimeZone::UTC)
}

fn ok(text: &str) -> AllowedSigners {
    parse(text).unwrap_or_else(|e| panic!("{text:?} should parse: {e}"))
}

/// The line number and problem of a malformed file.
fn err(text: &str) -> (usize, LineError) {
    match parse(text) {
        Err(AllowedSignersError::Line { line, problem, .. }) => (line, problem),
        other => panic!("{text:?} should be a line error, got {other:?}"),
    }
}

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

#[test]
fn comments_blank_lines_and_whitespace() {
    let text = format!(
        "# a comment\n\n   \t\n  # indented comment\nalice@example.com {}\n\t bob@example.com\t {}   bob's laptop \r\n",
        k(1),
        k(2)
    );
    let a = ok(&text);
    assert_eq!(a.len(), 2);
    assert_eq!(a.entries()[0].line(), 5);
    assert_eq!(a.entries()[0].principals().to_string(), "alice@example.com");
    assert_eq!(
        a.entries()[0].public_key().key_data(),
        keypair(1).public_key().key_data()
    );
    assert_eq!(a.entries()[0].public_key().comment(), "");
    assert_eq!(a.entries()[1].line(), 6);
    assert_eq!(
        a.entries()[1].public_key().comment(),
        "bob's laptop",
        "CR and trailing blanks are not part of the comment"
    );
    assert!(ok("").is_empty());
    assert!(ok("# only\n\n").is_empty());
}

#[test]
fn principal_lists_wildcards_negation_and_quotes() {
    let a = ok(&format!(
        "alice@example.com,al@example.com {}\n*@example.com,!mallory@example.com {}\n\"carol@example.com,c?rl@example.com\" {}\n",
        k(1),
        k(2),
        k(3)
    ));
    let e = a.entries();
    assert_eq!(
        e[0].principals().literals().collect::<Vec<_>>(),
        vec!["alice@example.com", "al@example.com"]
    );
    assert!(e[1].principals().matches("bob@example.com"));
    assert!(!e[1].principals().matches("mallory@example.com"));
    assert_eq!(e[1].principals().literals().count(), 0);
    assert!(e[2].principals().matches("carl@example.com"));
    assert_eq!(
        e[2].principals().literals().collect::<Vec<_>>(),
        vec!["carol@example.com"]
    );
}

#[test]
fn options_each_kind() {
    let a = ok(&format!(
        "ca@example.com cert-authority {}\n\
         ns@example.com namespaces=\"rollguard-bundle,git\" {}\n\
         wild@example.com namespaces=\"rollguard-*,!rollguard-test\" {}\n\
         all@example.com cert-authority,namespaces=\"file\",valid-after=\"20240101Z\",valid-before=\"20250101Z\" {}\n",
        k(1),
        k(2),
        k(3),
        k(4)
    ));
    let e = a.entries();
    assert!(e[0].is_cert_authority());
    assert!(e[0].namespaces().is_none() && e[0].allows_namespace("anything"));
    assert!(!e[1].is_cert_authority());
    assert!(e[1].allows_namespace("rollguard-bundle") && e[1].allows_namespace("git"));
    assert!(!e[1].allows_namespace("file"));
    assert!(e[2].allows_namespace("rollguard-bundle"));
    assert!(!e[2].allows_namespace("rollguard-test"));
    assert!(e[3].is_cert_authority());
    assert!(!e[3].allows_namespace("rollguard-bundle"));
    assert_eq!(e[3].valid_after(), Some(ts("2024-01-01T00:00:00Z")));
    assert_eq!(e[3].valid_before(), Some(ts("2025-01-01T00:00:00Z")));
}

#[test]
fn option_keywords_are_case_insensitive() {
    let a = ok(&format!(
        "a Cert-Authority,NAMESPACES=\"x\",Valid-After=\"20240101z\",VALID-BEFORE=\"20240102utc\" {}\n",
        k(1)
    ));
    let e = &a.entries()[0];
    assert!(e.is_cert_authority());
    assert!(e.allows_namespace("x"));
    assert_eq!(e.valid_after(), Some(ts("2024-01-01T00:00:00Z")));
    assert_eq!(e.valid_before(), Some(ts("2024-01-02T00:00:00Z")));
    // The values themselves stay case-sensitive.
    assert!(!e.allows_namespace("X"));
}

#[test]
fn time_formats_utc_and_local() {
    let line = |after: &str| format!("a valid-after=\"{after}\" {}\n", k(1));
    let utc = |after: &str| ok(&line(after)).entries()[0].valid_after().unwrap();
    assert_eq!(utc("20240229Z"), ts("2024-02-29T00:00:00Z"));
    assert_eq!(utc("202402291230Z"), ts("2024-02-29T12:30:00Z"));
    assert_eq!(utc("20240229123059Z"), ts("2024-02-29T12:30:59Z"));
    assert_eq!(utc("20240229123059UTC"), ts("2024-02-29T12:30:59Z"));

    // Without Z: the local time of the system, here a fixed UTC+09:00.
    let tokyo = TimeZone::fixed(Offset::constant(9));
    let local = |after: &str| {
        AllowedSigners::parse_with_time_zone(&line(after), &tokyo)
            .unwrap()
            .entries()[0]
            .valid_after()
            .unwrap()
    };
    assert_eq!(local("20240229"), ts("2024-02-28T15:00:00Z"));
    assert_eq!(local("202402291230"), ts("2024-02-29T03:30:00Z"));
    assert_eq!(local("20240229123059"), ts("2024-02-29T03:30:59Z"));
    assert_eq!(
        local("20240229123059Z"),
        ts("2024-02-29T12:30:59Z"),
        "Z means UTC whatever the zone"
    );

    // `parse` uses the system zone, exactly as jiff resolves it.
    let system = TimeZone::try_system().expect("system time zone");
    assert_eq!(
        AllowedSigners::parse(&line("20240229")).unwrap().entries()[0]
            .valid_after()
            .unwrap(),
        system
            .to_timestamp("2024-02-29T00:00:00".parse().unwrap())
            .unwrap()
    );
}

#[test]
fn key_comment_and_display_round_trip() {
    let text = format!(
        "alice,!eve,b?b namespaces=\"rollguard-bundle\",valid-after=\"20240101Z\",valid-before=\"20300101123000Z\" {} alice laptop\n",
        k(1)
    );
    let a = ok(&text);
    let e = &a.entries()[0];
    assert_eq!(e.public_key().comment(), "alice laptop");
    let shown = e.to_string();
    assert!(shown.starts_with(
        "alice,!eve,b?b namespaces=\"rollguard-bundle\",valid-after=\"20240101000000Z\",valid-before=\"20300101123000Z\" ssh-ed25519 "
    ));
    let again = ok(&shown);
    assert_eq!(again.entries()[0].principals(), e.principals());
    assert_eq!(again.entries()[0].valid_before(), e.valid_before());
    assert_eq!(
        again.entries()[0].public_key().key_data(),
        e.public_key().key_data()
    );
}

#[test]
fn malformed_lines_are_errors_with_line_numbers() {
    let key = k(1);
    let good = format!("good {key}\n");
    let cases: Vec<(String, LineError)> = vec![
        ("alice".into(), LineError::MissingKey),
        ("alice   ".into(), LineError::MissingKey),
        ("alice namespaces=\"x\"".into(), LineError::MissingKey),
        ("alice ssh-ed25519".into(), LineError::MissingKey),
        (
            format!("alice bogus {key}"),
            LineError::UnknownOption("bogus".into()),
        ),
        (
            format!("alice no-touch-required {key}"),
            LineError::SkOptionOnPlainKey("no-touch-required"),
        ),
        (
            format!("alice namespaces=\"x\",Verify-Required {key}"),
            LineError::SkOptionOnPlainKey("verify-required"),
        ),
        // sshd also takes the defaults spelled out; the documented options
        // are the ones that change something.
        (
            format!("alice touch-required {key}"),
            LineError::UnknownOption("touch-required".into()),
        ),
        (
            format!("alice no-verify-required {key}"),
            LineError::UnknownOption("no-verify-required".into()),
        ),
        (
            format!("alice verify-requiredX {key}"),
            LineError::UnknownOption("X".into()),
        ),
        (
            format!("alice cert-authorityX {key}"),
            LineError::UnknownOption("X".into()),
        ),
        (
            format!("alice namespaces=\"a\"x {key}"),
            LineError::UnknownOption("x".into()),
        ),
        (
            format!("alice namespaces=\"a\",namespaces=\"b\" {key}"),
            LineError::DuplicateOption("namespaces"),
        ),
        (
            format!("alice valid-after=\"20240101Z\",VALID-AFTER=\"20240102Z\" {key}"),
            LineError::DuplicateOption("valid-after"),
        ),
        (
            format!("alice namespaces=rollguard-bundle {key}"),
            LineError::MissingQuote("namespaces"),
        ),
        (
            format!("alice valid-before=20240101Z {key}"),
            LineError::MissingQuote("valid-before"),
        ),
        (
            format!("alice cert-authority, {key}"),
            LineError::TrailingComma,
        ),
        (
            format!("alice namespaces=\"a {key}"),
            LineError::UnterminatedOptionQuote,
        ),
        (
            format!("alice namespaces=\"\" {key}"),
            LineError::Namespaces(PatternError::Empty),
        ),
        (
            format!("alice namespaces=\"a b\" {key}"),
            LineError::Namespaces(PatternError::BadCharacter("a b".into())),
        ),
        (
            format!("alice namespaces=\"x\\\"y\" {key}"),
            LineError::Namespaces(PatternError::BadCharacter("x\"y".into())),
        ),
        (
            format!("alice valid-after=\"20241301Z\" {key}"),
            LineError::BadTime {
                option: "valid-after",
                value: "20241301Z".into(),
            },
        ),
        (
            format!("alice valid-after=\"20230229Z\" {key}"),
            LineError::BadTime {
                option: "valid-after",
                value: "20230229Z".into(),
            },
        ),
        (
            format!("alice valid-after=\"2024010Z\" {key}"),
            LineError::BadTime {
                option: "valid-after",
                value: "2024010Z".into(),
            },
        ),
        (
            format!("alice valid-after=\"2024-01-01\" {key}"),
            LineError::BadTime {
                option: "valid-after",
                value: "2024-01-01".into(),
            },
        ),
        (
            format!("alice valid-before=\"20240101246000Z\" {key}"),
            LineError::BadTime {
                option: "valid-before",
                value: "20240101246000Z".into(),
            },
        ),
        (
            format!("alice valid-before=\"Z\" {key}"),
            LineError::BadTime {
                option: "valid-before",
                value: "Z".into(),
            },
        ),
        (
            format!("alice valid-after=\"19700101Z\" {key}"),
            LineError::BadTime {
                option: "valid-after",
                value: "19700101Z".into(),
            },
        ),
        (
            format!("alice valid-after=\"20250101Z\",valid-before=\"20240101Z\" {key}"),
            LineError::EmptyValidity,
        ),
        (
            format!("alice valid-after=\"20240101Z\",valid-before=\"20240101Z\" {key}"),
            LineError::EmptyValidity,
        ),
        (
            format!("alice {RSA}"),
            LineError::UnsupportedKeyType("ssh-rsa".into()),
        ),
        (
            format!("alice {ECDSA}"),
            LineError::UnsupportedKeyType("ecdsa-sha2-nistp256".into()),
        ),
        (
            format!("alice cert-authority {RSA}"),
            LineError::UnsupportedKeyType("ssh-rsa".into()),
        ),
        (
            "alice ssh-ed25519-cert-v01@openssh.com AAAA".into(),
            LineError::UnsupportedKeyType("ssh-ed25519-cert-v01@openssh.com".into()),
        ),
        (
            "alice sk-ecdsa-sha2-nistp256@openssh.com AAAA".into(),
            LineError::UnsupportedKeyType("sk-ecdsa-sha2-nistp256@openssh.com".into()),
        ),
        (
            "alice sk-ssh-ed25519-cert-v01@openssh.com AAAA".into(),
            LineError::UnsupportedKeyType("sk-ssh-ed25519-cert-v01@openssh.com".into()),
        ),
        (
            format!("alice cert-authority nonsense {key}"),
            LineError::NotAKeyType("nonsense".into()),
        ),
        (
            format!("alice,,bob {key}"),
            LineError::Principals(PatternError::EmptyPattern("alice,,bob".into())),
        ),
        (format!("al\"ice {key}"), LineError::StrayQuote),
        (format!("\"alice\"x {key}"), LineError::StrayQuote),
        (
            format!("\"alice {key}"),
            LineError::UnterminatedPrincipalQuote,
        ),
        (
            format!("\"alice bob\" {key}"),
            LineError::Principals(PatternError::BadCharacter("alice bob".into())),
        ),
    ];
    for (bad, expected) in cases {
        // The broken line is the 3rd; the good lines around it must not hide it.
        let text = format!("# trust\n{good}{bad}\n{good}");
        let (line, problem) = err(&text);
        assert_eq!((line, &problem), (3, &expected), "line {bad:?}");
        let message = parse(&text).unwrap_err().to_string();
        assert!(message.starts_with("allowed_signers:3: "), "{message}");
    }
}

#[test]
fn malformed_key_material() {
    let key = k(1);
    let blob = key.split_whitespace().nth(1).unwrap();
    // Corrupt base64, a truncated blob, and an ECDSA blob labelled ed25519.
    assert!(matches!(
        err(&format!("alice ssh-ed25519 {}!", &blob[..20])).1,
        LineError::BadKey(..)
    ));
    assert!(matches!(
        err(&format!("alice ssh-ed25519 {}", &blob[..40])).1,
        LineError::BadKey(..)
    ));
    let ecdsa_blob = ECDSA.split_whitespace().nth(1).unwrap();
    assert!(matches!(
        err(&format!("alice ssh-ed25519 {ecdsa_blob}")).1,
        LineError::BadKey(..)
    ));
}

#[test]
fn first_error_wins_and_nothing_is_dropped() {
    let text = format!("a {}\nb bogus {}\nc {}\n", k(1), k(2), k(3));
    assert_eq!(err(&text), (2, LineError::UnknownOption("bogus".into())));
}

#[test]
fn load_reads_files_and_names_them_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("allowed_signers");
    std::fs::write(&path, format!("alice {}\n", k(1))).unwrap();
    assert_eq!(AllowedSigners::load(&path).unwrap().len(), 1);

    std::fs::write(&path, "alice\n").unwrap();
    let e = AllowedSigners::load(&path).unwrap_err().to_string();
    assert_eq!(
        e,
        format!("{}:1: the line has principals but no key", path.display())
    );

    let missing = dir.path().join("nope");
    let e = AllowedSigners::load(&missing).unwrap_err();
    assert!(matches!(e, AllowedSignersError::Io { .. }), "{e}");

    std::fs::write(&path, b"alice \xff\n").unwrap();
    assert!(matches!(
        AllowedSigners::load(&path),
        Err(AllowedSignersError::NotUtf8 { .. })
    ));

    std::fs::write(&path, "#".repeat(1024 * 1024 + 1)).unwrap();
    assert!(matches!(
        AllowedSigners::load(&path),
        Err(AllowedSignersError::TooLarge { .. })
    ));
}

/// Fragments that exercise the parser's branches when glued together.
fn fragment() -> impl Strategy<Value = String> {
    let key = k(7);
    prop_oneof![
        Just(key.clone()),
        Just("ssh-ed25519".to_string()),
        Just(key.split_whitespace().nth(1).unwrap().to_string()),
        Just(RSA.to_string()),
        Just("cert-authority".to_string()),
        Just("namespaces=\"".to_string()),
        Just("valid-after=\"2024".to_string()),
        Just("valid-before=\"20240101Z\"".to_string()),
        Just("\\\"".to_string()),
        Just("\"".to_string()),
        Just(",".to_string()),
        Just("!".to_string()),
        Just("*".to_string()),
        Just(" ".to_string()),
        Just("\t".to_string()),
        Just("\n".to_string()),
        Just("\r".to_string()),
        Just("#".to_string()),
        "[a-z@.]{1,8}",
        "\\PC{1,4}",
        "[0-9Zz]{1,15}",
    ]
}

proptest! {
    #[test]
    fn parser_never_panics_on_arbitrary_text(text in "\\PC{0,200}") {
        let _ = parse(&text);
        let _ = AllowedSigners::parse(&text);
    }

    #[test]
    fn parser_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = parse(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn parser_never_panics_on_near_valid_lines(parts in proptest::collection::vec(fragment(), 0..12)) {
        let text = parts.concat();
        if let Ok(a) = parse(&text) {
            // Whatever parses must display as a line that parses to the same entry.
            for e in a.entries() {
                let again = parse(&e.to_string()).expect("display output parses");
                prop_assert_eq!(again.entries()[0].principals(), e.principals());
                prop_assert_eq!(again.entries()[0].is_cert_authority(), e.is_cert_authority());
                prop_assert_eq!(again.entries()[0].valid_after(), e.valid_after());
            }
        }
    }
}

/// OpenSSH's regress security key (see testdata/openssh/README.md).
const SK_KEY: &str = "sk-ssh-ed25519@openssh.com AAAAGnNrLXNzaC1lZDI1NTE5QG9wZW5zc2guY29tAAAAIJsaDYXQYruc6bilCYDIK4YSOeG+zmrRO2M9t03//7LHAAAABHNzaDo=";

#[test]
fn security_keys_and_their_options() {
    use crate::signature::SkPolicy;
    let text = format!(
        "alice {SK_KEY} alice's token\n\
         bob no-touch-required {SK_KEY}\n\
         carol VERIFY-REQUIRED,namespaces=\"rollguard-bundle\" {SK_KEY}\n\
         dave no-touch-required,verify-required,no-touch-required {SK_KEY}\n\
         erin {}\n",
        k(1)
    );
    let signers = ok(&text);
    let policies: Vec<Option<SkPolicy>> = signers.entries().iter().map(|e| e.sk_policy()).collect();
    let policy = |user_presence, user_verification| {
        Some(SkPolicy {
            user_presence,
            user_verification,
        })
    };
    assert_eq!(
        policies,
        vec![
            policy(true, false),
            policy(false, false),
            policy(true, true),
            policy(false, true),
            None
        ]
    );
    let alice = &signers.entries()[0];
    let sk = alice
        .public_key()
        .key_data()
        .sk_ed25519()
        .expect("an sk key");
    assert_eq!(sk.application(), "ssh:");
    assert_eq!(alice.public_key().comment(), "alice's token");

    // Written back, each line means the same (options in a fixed order).
    let lines: Vec<String> = signers.entries().iter().map(|e| e.to_string()).collect();
    assert_eq!(lines[0], format!("alice {SK_KEY} alice's token"));
    assert_eq!(lines[1], format!("bob no-touch-required {SK_KEY}"));
    assert_eq!(
        lines[2],
        format!("carol namespaces=\"rollguard-bundle\",verify-required {SK_KEY}")
    );
    assert_eq!(
        lines[3],
        format!("dave no-touch-required,verify-required {SK_KEY}")
    );
    assert_eq!(ok(&lines.join("\n")), signers);
}

#[test]
fn malformed_security_keys() {
    let sk_blob = SK_KEY.split_whitespace().nth(1).unwrap();
    let ed_blob = k(1).split_whitespace().nth(1).unwrap().to_string();
    // The text says one kind, the blob another: either way round.
    for line in [
        format!("alice sk-ssh-ed25519@openssh.com {ed_blob}"),
        format!("alice ssh-ed25519 {sk_blob}"),
        // Truncated (no application), and corrupt base64.
        format!("alice sk-ssh-ed25519@openssh.com {}", &sk_blob[..60]),
        format!("alice sk-ssh-ed25519@openssh.com {}!", &sk_blob[..20]),
        "alice sk-ssh-ed25519@openssh.com AAAA".to_string(),
    ] {
        let (n, problem) = err(&line);
        assert_eq!(n, 1);
        assert!(
            matches!(problem, LineError::BadKey(..)),
            "{line}: {problem:?}"
        );
    }
    let (_, problem) = err(&format!("alice sk-ssh-ed25519@openssh.com {ed_blob}"));
    assert!(
        problem
            .to_string()
            .starts_with("the sk-ssh-ed25519@openssh.com key is malformed: "),
        "{problem}"
    );
}
