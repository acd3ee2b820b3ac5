use super::*;
use proptest::prelude::*;

const SOURCE: &str = r#"
[bundle]
name = "fix-mail-queue"
version = 7
description = "flush stuck queue"
expires = 2026-12-31T00:00:00Z

[targets]
hosts = ["mail-*.tokyo"]
labels = { role = "mail" }

[scope]
write  = ["/etc/postfix/", "/etc//postfix"]
delete = ["/var/spool/postfix/tmp"]
read   = []
network = []

[run]
command = ["./apply.sh", "--now"]
timeout = "5m"
"#;

fn digest(b: u8) -> [u8; 32] {
    [b; 32]
}

fn built(source: &str, files: &[PayloadFile]) -> String {
    SourceManifest::render_built(source, files)
}

fn apply_sh() -> PayloadFile {
    PayloadFile {
        path: PayloadPath::parse("apply.sh").unwrap(),
        size: 12,
        mode: 0o755,
        sha256: digest(1),
    }
}

#[test]
fn parses_the_documented_example() {
    let m = SourceManifest::parse(SOURCE).unwrap();
    assert_eq!(m.bundle.name.as_str(), "fix-mail-queue");
    assert_eq!(m.bundle.version, 7);
    assert_eq!(m.bundle.expires.to_string(), "2026-12-31T00:00:00Z");
    // duplicate spellings collapse into one normalized path
    assert_eq!(m.scope.write.len(), 1);
    assert_eq!(m.scope.write[0].to_string(), "/etc/postfix");
    assert_eq!(m.run.timeout, Duration::from_secs(300));
    assert_eq!(m.run.payload_program(), Some("apply.sh"));
}

#[test]
fn built_manifest_round_trips() {
    let files = vec![
        apply_sh(),
        PayloadFile {
            path: PayloadPath::parse("conf/main.cf").unwrap(),
            size: 0,
            mode: 0o644,
            sha256: digest(2),
        },
    ];
    let text = built(SOURCE, &files);
    assert!(text.starts_with(SOURCE), "source bytes are kept verbatim");
    let m = Manifest::parse(text.as_bytes()).unwrap();
    assert_eq!(m.payload, files);
    assert_eq!(m.payload_size(), 12);
}

#[test]
fn source_may_not_carry_payload_and_built_must() {
    let text = built(SOURCE, &[apply_sh()]);
    assert!(matches!(
        SourceManifest::parse(&text),
        Err(ManifestError::PayloadInSource)
    ));
    assert!(matches!(
        Manifest::parse(SOURCE.as_bytes()),
        Err(ManifestError::MissingPayload)
    ));
}

#[test]
fn missing_or_empty_targets_are_errors() {
    let no_targets = SOURCE.replace(
        "[targets]\nhosts = [\"mail-*.tokyo\"]\nlabels = { role = \"mail\" }\n",
        "",
    );
    assert!(matches!(
        SourceManifest::parse(&no_targets),
        Err(ManifestError::Targets(TargetError::NoHosts))
    ));
    let empty = SOURCE.replace("hosts = [\"mail-*.tokyo\"]", "hosts = []");
    assert!(matches!(
        SourceManifest::parse(&empty),
        Err(ManifestError::Targets(TargetError::NoHosts))
    ));
    let labels_only = SOURCE.replace("hosts = [\"mail-*.tokyo\"]\n", "");
    assert!(matches!(
        SourceManifest::parse(&labels_only),
        Err(ManifestError::Targets(TargetError::NoHosts))
    ));
}

#[test]
fn unknown_keys_are_errors_everywhere() {
    for (from, to) in [
        ("version = 7", "version = 7\nowner = \"bob\""),
        ("hosts = [", "all = true\nhosts = ["),
        ("network = []", "network = []\nexec = []"),
        ("timeout = \"5m\"", "timeout = \"5m\"\nuser = \"root\""),
        ("[run]", "[extra]\nx = 1\n[run]"),
    ] {
        let text = SOURCE.replace(from, to);
        let err = SourceManifest::parse(&text).unwrap_err();
        assert!(
            matches!(err, ManifestError::Toml(ref m) if m.contains("unknown field")),
            "{from}: {err}"
        );
    }
    let text = built(SOURCE, &[apply_sh()]).replace("sha256 = ", "owner = 0, sha256 = ");
    assert!(matches!(
        Manifest::parse(text.as_bytes()),
        Err(ManifestError::Toml(_))
    ));
}

/// (text to replace, replacement, expected error)
type Case = (&'static str, &'static str, fn(&ManifestError) -> bool);

#[test]
fn bad_values_have_specific_errors() {
    let cases: &[Case] = &[
        ("name = \"fix-mail-queue\"", "name = \"Fix_Mail\"", |e| {
            matches!(e, ManifestError::BadName(_))
        }),
        ("name = \"fix-mail-queue\"", "name = \"-x\"", |e| {
            matches!(e, ManifestError::BadName(_))
        }),
        ("version = 7", "version = -1", |e| {
            matches!(e, ManifestError::Toml(_))
        }),
        ("2026-12-31T00:00:00Z", "2026-12-31T00:00:00", |e| {
            matches!(e, ManifestError::BadExpiry(_))
        }),
        ("2026-12-31T00:00:00Z", "2026-12-31", |e| {
            matches!(e, ManifestError::BadExpiry(_))
        }),
        ("\"/var/spool/postfix/tmp\"", "\"var/spool\"", |e| {
            matches!(e, ManifestError::ScopePath { key: "delete", .. })
        }),
        ("\"/var/spool/postfix/tmp\"", "\"/var/../etc\"", |e| {
            matches!(e, ManifestError::ScopePath { key: "delete", .. })
        }),
        ("\"/var/spool/postfix/tmp\"", "\"/\"", |e| {
            matches!(e, ManifestError::ScopePath { key: "delete", .. })
        }),
        ("network = []", "network = [\"example.com\"]", |e| {
            matches!(e, ManifestError::BadEndpoint { .. })
        }),
        ("network = []", "network = [\"example.com:0\"]", |e| {
            matches!(e, ManifestError::BadEndpoint { .. })
        }),
        ("network = []", "network = [\"example.com:70000\"]", |e| {
            matches!(e, ManifestError::BadEndpoint { .. })
        }),
        ("[\"./apply.sh\", \"--now\"]", "[]", |e| {
            matches!(e, ManifestError::EmptyCommand)
        }),
        ("[\"./apply.sh\", \"--now\"]", "[\"../apply.sh\"]", |e| {
            matches!(e, ManifestError::BadProgram(_))
        }),
        ("timeout = \"5m\"", "timeout = \"0s\"", |e| {
            matches!(e, ManifestError::BadTimeout(..))
        }),
        ("timeout = \"5m\"", "timeout = \"48h\"", |e| {
            matches!(e, ManifestError::BadTimeout(..))
        }),
        ("timeout = \"5m\"", "timeout = \"soon\"", |e| {
            matches!(e, ManifestError::BadTimeout(..))
        }),
    ];
    for (from, to, check) in cases {
        let text = SOURCE.replace(from, to);
        assert_ne!(text, SOURCE, "case {to} did not apply");
        let err = SourceManifest::parse(&text).unwrap_err();
        assert!(check(&err), "{to}: unexpected error {err}");
    }
}

#[test]
fn network_endpoints() {
    // Every form and every malformed form: see `endpoint::tests`. Here:
    // the manifest keeps the parsed, canonical entries.
    let e = NetworkEndpoint::parse("mirror.example.com:443").unwrap();
    assert_eq!(e.to_string(), "tcp:mirror.example.com:443");
    let text = SOURCE.replace(
        "network = []",
        "network = [\"udp:10.0.0.53:53\", \"[2001:db8::1]:80\"]",
    );
    let m = SourceManifest::parse(&text).unwrap();
    let shown: Vec<String> = m.scope.network.iter().map(|e| e.to_string()).collect();
    assert_eq!(shown, ["udp:10.0.0.53:53", "tcp:[2001:db8::1]:80"]);
    let err =
        SourceManifest::parse(&SOURCE.replace("network = []", "network = [\"10.0.0.5/24:443\"]"))
            .unwrap_err();
    assert!(err.to_string().contains("10.0.0.5/24:443"), "{err}");
}

#[test]
fn payload_rules() {
    let text = |files: &[PayloadFile]| built(SOURCE, files);
    // program must be in the payload and executable
    assert!(matches!(
        Manifest::parse(text(&[]).as_bytes()),
        Err(ManifestError::ProgramNotInPayload(_))
    ));
    let mut noexec = apply_sh();
    noexec.mode = 0o644;
    assert!(matches!(
        Manifest::parse(text(&[noexec]).as_bytes()),
        Err(ManifestError::ProgramNotExecutable(..))
    ));
    // duplicates, file-as-directory
    assert!(matches!(
        Manifest::parse(text(&[apply_sh(), apply_sh()]).as_bytes()),
        Err(ManifestError::Payload(PayloadError::Duplicate(_)))
    ));
    let dir_clash = PayloadFile {
        path: PayloadPath::parse("apply.sh/x").unwrap(),
        ..apply_sh()
    };
    assert!(matches!(
        Manifest::parse(text(&[apply_sh(), dir_clash]).as_bytes()),
        Err(ManifestError::Payload(PayloadError::FileIsDirectory(_)))
    ));
    // hand-edited modes and digests
    let good = text(&[apply_sh()]);
    for (from, to) in [
        ("\"0755\"", "\"4755\""),
        ("\"0755\"", "\"rwx\""),
        ("\"0755\"", "\"0\""),
    ] {
        let bad = good.replace(from, to);
        assert!(
            matches!(
                Manifest::parse(bad.as_bytes()),
                Err(ManifestError::Payload(PayloadError::BadMode { .. }))
            ),
            "{to}"
        );
    }
    let upper = good.replace(
        &hex::encode(digest(1)),
        &hex::encode(digest(1)).replace('1', "A"),
    );
    assert!(matches!(
        Manifest::parse(upper.as_bytes()),
        Err(ManifestError::Payload(PayloadError::BadDigest { .. }))
    ));
}

#[test]
fn payload_paths() {
    for ok in ["a", "a/b", "apply.sh", ".hidden", "a/.b/c"] {
        assert!(PayloadPath::parse(ok).is_ok(), "{ok}");
    }
    for bad in [
        "", "/a", "a/", "a//b", "./a", "a/./b", "../a", "a/../b", "a\\b", "a\nb",
    ] {
        assert!(PayloadPath::parse(bad).is_err(), "{bad:?}");
    }
    let p = PayloadPath::parse("a/b/c").unwrap();
    assert_eq!(p.ancestors().collect::<Vec<_>>(), ["a", "a/b"]);
}

#[test]
fn oversized_and_non_utf8_manifests() {
    let big = vec![b'#'; MAX_MANIFEST_BYTES + 1];
    assert!(matches!(
        Manifest::parse(&big),
        Err(ManifestError::TooLarge)
    ));
    assert!(matches!(
        Manifest::parse(&[0xff, 0xfe]),
        Err(ManifestError::NotUtf8)
    ));
}

proptest! {
    /// No input makes the parser panic.
    #[test]
    fn parser_never_panics(text in "\\PC{0,400}") {
        let _ = SourceManifest::parse(&text);
        let _ = Manifest::parse(text.as_bytes());
    }

    /// Any payload list we render parses back to the same list.
    #[test]
    fn rendered_payload_round_trips(names in proptest::collection::btree_set("[a-z0-9_. -]{1,12}", 0..8), mode in 0u32..0o777) {
        let names: Vec<String> = names.into_iter().filter(|n| PayloadPath::parse(n).is_ok()).collect();
        let mut files: Vec<PayloadFile> = names.iter().enumerate().map(|(i, n)| PayloadFile {
            path: PayloadPath::parse(&format!("d/{n}")).unwrap(), size: i as u64, mode, sha256: digest(i as u8),
        }).collect();
        files.push(apply_sh());
        let m = Manifest::parse(built(SOURCE, &files).as_bytes()).unwrap();
        prop_assert_eq!(m.payload, files);
    }
}

#[test]
fn skeleton_parses_and_builds() {
    let m = SourceManifest::parse(SKELETON).unwrap();
    assert_eq!(m.run.payload_program(), Some("apply.sh"));
    assert!(Manifest::parse(built(SKELETON, &[apply_sh()]).as_bytes()).is_ok());
}

#[test]
fn run_resources_are_optional_typed_and_strict() {
    let m = SourceManifest::parse(SOURCE).unwrap();
    assert!(m.run.resources.is_empty());
    let with = format!("{SOURCE}\n[run.resources]\npids = 64\ntmp_mib = 16\n");
    let m = SourceManifest::parse(&with).unwrap();
    assert_eq!(m.run.resources.pids, Some(64));
    assert_eq!(m.run.resources.tmp_mib, Some(16));
    assert_eq!(m.run.resources.memory_mib, None);
    let typo = format!("{SOURCE}\n[run.resources]\nmemory = 64\n");
    assert!(SourceManifest::parse(&typo).is_err());
}

#[test]
fn services_section_is_optional_typed_and_strict() {
    let m = SourceManifest::parse(SOURCE).unwrap();
    assert!(m.services.is_empty());
    let with = format!(
        "{SOURCE}\n[services]\nreload = [\"postfix.service\"]\nrestart = [\"dovecot.service\", \"php8.2-fpm.service\"]\nrestart_stale = true\n"
    );
    let m = SourceManifest::parse(&with).unwrap();
    assert_eq!(m.services.reload[0].as_str(), "postfix.service");
    assert_eq!(m.services.restart.len(), 2);
    assert!(m.services.restart_stale);
    // In the signed (built) manifest as written.
    let b = Manifest::parse(built(&with, &[apply_sh()]).as_bytes()).unwrap();
    assert_eq!(b.services, m.services);
    let json = serde_json::to_value(&b).unwrap();
    assert_eq!(json["services"]["reload"][0], "postfix.service");
    // Absent when empty.
    let plain = Manifest::parse(built(SOURCE, &[apply_sh()]).as_bytes()).unwrap();
    assert!(serde_json::to_value(&plain)
        .unwrap()
        .get("services")
        .is_none());

    let bad = |section: &str| {
        SourceManifest::parse(&format!("{SOURCE}\n[services]\n{section}\n"))
            .unwrap_err()
            .to_string()
    };
    assert!(bad("stop = [\"x.service\"]").contains("unknown field"));
    assert!(bad("reload = [\"postfix\"]").contains("services.reload"));
    assert!(bad("restart = [\"x.socket\"]").contains("not a .service"));
    assert!(bad("restart = [\"getty@.service\"]").contains("services.restart"));
    assert!(bad("restart = [\"a.service\", \"a.service\"]").contains("twice"));
    assert!(bad("reload = [\"a.service\"]\nrestart = [\"a.service\"]").contains("both"));
    assert!(bad("restart_stale = \"yes\"").contains("invalid type"));
    let many: Vec<String> = (0..=MAX_SERVICE_UNITS)
        .map(|i| format!("\"u{i}.service\""))
        .collect();
    assert!(bad(&format!("restart = [{}]", many.join(","))).contains("more than"));
}

// ---- [packages] -------------------------------------------------------------

const PACKAGES_SOURCE: &str = r#"
[bundle]
name = "patch-openssl"
version = 1
expires = 2026-12-31T00:00:00Z

[targets]
hosts = ["mail-*"]

[packages]
install = ["debs/libssl3_3.0.15_amd64.deb"]

[run]
timeout = "5m"
"#;

fn deb_file() -> PayloadFile {
    PayloadFile {
        path: PayloadPath::parse("debs/libssl3_3.0.15_amd64.deb").unwrap(),
        size: 10,
        mode: 0o644,
        sha256: digest(3),
    }
}

fn derivation() -> Derivation {
    Derivation {
        kind: PackageKind::Deb,
        packages: vec![DerivedPackage {
            file: PayloadPath::parse("debs/libssl3_3.0.15_amd64.deb").unwrap(),
            name: packages::PackageToken::parse("libssl3").unwrap(),
            version: packages::PackageToken::parse("3.0.15-1~deb12u1").unwrap(),
        }],
        database: ScopePath::parse("/var/lib/dpkg").unwrap(),
        write: ["/usr/lib/x86_64-linux-gnu", "/var/lib/dpkg"]
            .iter()
            .map(|p| ScopePath::parse(p).unwrap())
            .collect(),
        delete: ["/usr/lib/x86_64-linux-gnu", "/var/lib/dpkg"]
            .iter()
            .map(|p| ScopePath::parse(p).unwrap())
            .collect(),
    }
}

#[test]
fn packages_make_the_command_optional_and_the_derived_table_round_trips() {
    let source = SourceManifest::parse(PACKAGES_SOURCE).unwrap();
    assert!(source.run.command.is_empty());
    assert_eq!(source.packages.unwrap().kind, PackageKind::Deb);
    let text =
        SourceManifest::render_built_with(PACKAGES_SOURCE, Some(&derivation()), &[deb_file()]);
    let m = Manifest::parse(text.as_bytes()).unwrap();
    let p = m.packages.as_ref().unwrap();
    assert_eq!(p.install[0].version.as_str(), "3.0.15-1~deb12u1");
    assert_eq!(p.write.len(), 2);
    // The effective scope is the union; the author's stays empty.
    assert!(m.scope.write.is_empty());
    assert_eq!(m.effective_scope().delete, p.delete);
    // The derived table may not be written by the author.
    let without_payload = text
        .split("\n# --- generated by `rollguard bundle build`;")
        .next()
        .unwrap();
    assert!(matches!(
        SourceManifest::parse(without_payload),
        Err(ManifestError::DerivedInSource)
    ));
}

#[test]
fn a_built_manifest_with_packages_needs_the_derived_table() {
    let text = SourceManifest::render_built(PACKAGES_SOURCE, &[deb_file()]);
    assert!(matches!(
        Manifest::parse(text.as_bytes()),
        Err(ManifestError::Packages(_))
    ));
    // The package must be in the payload.
    let text = SourceManifest::render_built_with(PACKAGES_SOURCE, Some(&derivation()), &[]);
    assert!(matches!(
        Manifest::parse(text.as_bytes()),
        Err(ManifestError::PackageNotInPayload(_))
    ));
}

#[test]
fn packages_are_checked() {
    for (install, why) in [
        ("[]", "empty"),
        ("[\"a.deb\", \"b.rpm\"]", "mixes"),
        ("[\"a.tar\"]", "neither"),
        ("[\"a.deb\", \"./a.deb\"]", "twice"),
        ("[\"../a.deb\"]", "invalid"),
    ] {
        let text = PACKAGES_SOURCE.replace("[\"debs/libssl3_3.0.15_amd64.deb\"]", install);
        let err = SourceManifest::parse(&text).unwrap_err().to_string();
        assert!(err.contains(why), "{install}: {err}");
    }
    // Without [packages] the command stays required.
    let text = PACKAGES_SOURCE.replace(
        "[packages]\ninstall = [\"debs/libssl3_3.0.15_amd64.deb\"]\n",
        "",
    );
    assert!(matches!(
        SourceManifest::parse(&text),
        Err(ManifestError::EmptyCommand)
    ));
    assert!(packages::PackageToken::parse("-rf").is_none());
    assert!(packages::PackageToken::parse("a b").is_none());
    assert!(packages::PackageToken::parse("1:2.0~rc1+dfsg-3").is_some());
}
