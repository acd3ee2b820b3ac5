use super::*;
use proptest::prelude::*;
use rollguard_shared::manifest::NetworkEndpoint;

/// A scratch filesystem with an allowed-signers file.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("allowed_signers"), "").unwrap();
        Fixture { dir }
    }
    fn root(&self) -> String {
        self.dir.path().to_str().unwrap().to_string()
    }
    fn p(&self, rel: &str) -> String {
        format!("{}/{rel}", self.root())
    }
    fn policy_text(&self, protect: &[&str], allow: &[&str]) -> String {
        let list = |v: &[&str]| {
            v.iter()
                .map(|s| format!("{:?}", self.p(s)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            r#"
[host]
name = "mail-03.tokyo"
labels = {{ role = "mail", site = "tokyo" }}
[trust]
allowed_signers = "{signers}"
threshold = 1
delete_threshold = 2
[protect]
paths = [{protect}]
[limits]
allow_scopes = [{allow}]
[state]
dir = "{state}"
"#,
            signers = self.p("allowed_signers"),
            protect = list(protect),
            allow = list(allow),
            state = self.p("state"),
        )
    }
    fn policy(&self, protect: &[&str], allow: &[&str]) -> HostPolicy {
        HostPolicy::parse(&self.policy_text(protect, allow)).unwrap()
    }
    fn mkdir(&self, rel: &str) {
        std::fs::create_dir_all(self.p(rel)).unwrap();
    }
    fn symlink(&self, target: &str, link: &str) {
        std::os::unix::fs::symlink(target, self.p(link)).unwrap();
    }
    fn sp(&self, rel: &str) -> ScopePath {
        ScopePath::parse(&self.p(rel)).unwrap()
    }
    fn scope(&self, write: &[&str], delete: &[&str], read: &[&str]) -> Scope {
        let v = |l: &[&str]| l.iter().map(|r| self.sp(r)).collect();
        Scope {
            write: v(write),
            delete: v(delete),
            read: v(read),
            network: Vec::<NetworkEndpoint>::new(),
        }
    }
}

fn err(text: &str) -> String {
    HostPolicy::parse(text).unwrap_err().to_string()
}

#[test]
fn parses_the_documented_example() {
    let f = Fixture::new();
    let policy = f.policy(&["backup", "srv/backup"], &["etc", "srv"]);
    let id = policy.identity();
    assert_eq!(id.name, "mail-03.tokyo");
    assert_eq!(id.labels.get("role").map(String::as_str), Some("mail"));
    assert_eq!(policy.trust().threshold, 1);
    assert_eq!(policy.trust().delete_threshold, 2);
    assert_eq!(
        policy.trust().allowed_signers,
        PathBuf::from(f.p("allowed_signers"))
    );
    assert_eq!(policy.allow_scopes(), &[f.sp("etc"), f.sp("srv")]);
    assert_eq!(policy.state_dir(), Path::new(&f.p("state")));
    let reasons: Vec<_> = policy
        .protected()
        .iter()
        .map(|p| (p.path.clone(), p.reason))
        .collect();
    assert!(reasons.contains(&(f.sp("backup"), ProtectionReason::Configured)));
    assert!(reasons.contains(&(f.sp("srv/backup"), ProtectionReason::Configured)));
    assert!(reasons.contains(&(f.sp("state"), ProtectionReason::StateDir)));
    assert!(reasons.contains(&(f.sp("allowed_signers"), ProtectionReason::TrustFile)));
}

#[test]
fn state_section_is_optional() {
    let f = Fixture::new();
    let text = f.policy_text(&[], &["etc"]);
    let text = text.split("[state]").next().unwrap();
    let policy = HostPolicy::parse(text).unwrap();
    assert_eq!(policy.state_dir(), Path::new(DEFAULT_STATE_DIR));
}

#[test]
fn unknown_tables_and_keys_are_errors() {
    let f = Fixture::new();
    let base = f.policy_text(&["backup"], &["etc"]);
    // A table this version does not know.
    let e = err(&format!("{base}\n[updates]\nchannel = \"beta\"\n"));
    assert!(e.contains("updates"), "{e}");
    // A typo in a table name must not silently drop protection.
    let e = err(&base.replace("[protect]", "[protected]"));
    assert!(e.contains("protected"), "{e}");
    let e = err(&base.replace("threshold = 1", "threshold = 1\nthreshhold = 3"));
    assert!(e.contains("threshhold"), "{e}");
    let e = err(&base.replace("[host]", "[host]\nrole = \"mail\""));
    assert!(e.contains("role"), "{e}");
}

#[test]
fn required_sections() {
    let f = Fixture::new();
    let base = f.policy_text(&["backup"], &["etc"]);
    let without = |section: &str| {
        let mut out = String::new();
        let mut skip = false;
        for line in base.lines() {
            if line.starts_with('[') {
                skip = line == section;
            }
            if !skip {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    };
    for section in ["[host]", "[trust]", "[protect]", "[limits]"] {
        let e = err(&without(section));
        let name = section.trim_matches(['[', ']']);
        assert!(e.contains(name), "missing {section}: {e}");
    }
    let e = err(&base.replace("delete_threshold = 2\n", ""));
    assert!(e.contains("delete_threshold"), "{e}");
    let e = err(&base.replace(
        &format!("allowed_signers = \"{}\"\n", f.p("allowed_signers")),
        "",
    ));
    assert!(e.contains("allowed_signers"), "{e}");
}

#[test]
fn bad_values() {
    let f = Fixture::new();
    let base = f.policy_text(&["backup"], &["etc"]);
    let e = err(&base.replace("name = \"mail-03.tokyo\"", "name = \"\""));
    assert!(e.contains("host.name is empty"), "{e}");
    let e = err(&base.replace("name = \"mail-03.tokyo\"", "name = \"mail 03\""));
    assert!(e.contains("host.name"), "{e}");
    let e = err(&base.replace("role = \"mail\"", "role = \"ma il\""));
    assert!(e.contains("label"), "{e}");
    let e = err(&base.replace("role = \"mail\"", "\"\" = \"mail\""));
    assert!(e.contains("label"), "{e}");
    let e = err(&base.replace("threshold = 1", "threshold = 0"));
    assert!(e.contains("at least 1"), "{e}");
    let e = err(&base.replace("threshold = 1", "threshold = 3"));
    assert!(
        e.contains("delete_threshold (2) must be at least trust.threshold (3)"),
        "{e}"
    );
    let e = err(&base.replace("threshold = 1", "threshold = -1"));
    assert!(e.contains("threshold"), "{e}");
    let e = err(&base.replace(&format!("\"{}\"]", f.p("backup")), "\"backup\"]"));
    assert!(
        e.contains("protect.paths") && e.contains("not absolute"),
        "{e}"
    );
    let e = err(&base.replace(
        &format!("allow_scopes = [\"{}\"]", f.p("etc")),
        "allow_scopes = [\"/\"]",
    ));
    assert!(
        e.contains("limits.allow_scopes") && e.contains("root"),
        "{e}"
    );
    let e = err(&base.replace(&format!("dir = \"{}\"", f.p("state")), "dir = \"var/lib\""));
    assert!(e.contains("state.dir"), "{e}");
    let e = err(&base.replace(&f.p("allowed_signers"), "etc/allowed_signers"));
    assert!(e.contains("trust.allowed_signers"), "{e}");
}

#[test]
fn allowed_signers_must_exist() {
    let f = Fixture::new();
    let base = f.policy_text(&["backup"], &["etc"]);
    std::fs::remove_file(f.p("allowed_signers")).unwrap();
    let e = err(&base);
    assert!(e.contains("does not exist"), "{e}");
    std::fs::create_dir(f.p("allowed_signers")).unwrap();
    let e = err(&base);
    assert!(e.contains("not a regular file"), "{e}");
}

#[test]
fn load_protects_the_policy_file_itself() {
    let f = Fixture::new();
    f.mkdir("etc/rollguard");
    let path = f.p("etc/rollguard/policy.toml");
    std::fs::write(&path, f.policy_text(&["backup"], &["etc"])).unwrap();
    let policy = HostPolicy::load(Path::new(&path)).unwrap();
    let protected = policy.protected();
    assert!(protected
        .iter()
        .any(|p| p.path == f.sp("etc/rollguard/policy.toml")
            && p.reason == ProtectionReason::PolicyFile));
    assert!(protected
        .iter()
        .any(|p| p.reason == ProtectionReason::AgentExecutable));
    // So a bundle that wants to write the directory holding it is refused.
    let e = policy
        .check_scope(&f.scope(&["etc/rollguard"], &[], &[]))
        .unwrap_err();
    assert!(
        matches!(
            e,
            ScopeViolation::ProtectedPath {
                reason: ProtectionReason::PolicyFile,
                ..
            }
        ),
        "{e}"
    );
    let missing = HostPolicy::load(Path::new(&f.p("nope.toml"))).unwrap_err();
    assert!(missing.to_string().contains("nope.toml"), "{missing}");
}

#[test]
fn thresholds() {
    let f = Fixture::new();
    let policy = f.policy(&[], &["etc"]);
    assert_eq!(policy.required_threshold(&f.scope(&["etc/x"], &[], &[])), 1);
    assert_eq!(
        policy.required_threshold(&f.scope(&["etc/x"], &["etc/x/old"], &[])),
        2
    );
}

#[test]
fn protected_overlap_in_both_directions() {
    let f = Fixture::new();
    let policy = f.policy(&["srv/backup"], &["srv", "etc"]);
    // Beneath the protected path.
    let e = policy
        .check_scope(&f.scope(&["srv/backup/db"], &[], &[]))
        .unwrap_err();
    assert_eq!(e.refusal_kind(), RefusalKind::ProtectedPath);
    assert!(e.to_string().contains("scope.write"), "{e}");
    // An ancestor of it: a rule on /srv covers /srv/backup.
    let e = policy
        .check_scope(&f.scope(&[], &["srv"], &[]))
        .unwrap_err();
    assert!(
        matches!(&e, ScopeViolation::ProtectedPath { key: "delete", .. }),
        "{e}"
    );
    // Reads too.
    let e = policy
        .check_scope(&f.scope(&[], &[], &["srv/backup"]))
        .unwrap_err();
    assert!(
        matches!(&e, ScopeViolation::ProtectedPath { key: "read", .. }),
        "{e}"
    );
    // A sibling with a common prefix is fine.
    policy
        .check_scope(&f.scope(&["srv/backup2", "srv/www"], &["srv/www/old"], &["etc"]))
        .unwrap();
}

#[test]
fn state_dir_and_trust_file_are_protected() {
    let f = Fixture::new();
    let policy = f.policy(&[], &[""]);
    // allow_scopes is the whole fixture; still the agent's own files are out of reach.
    let e = policy
        .check_scope(&f.scope(&["state"], &[], &[]))
        .unwrap_err();
    assert!(
        matches!(
            e,
            ScopeViolation::ProtectedPath {
                reason: ProtectionReason::StateDir,
                ..
            }
        ),
        "{e}"
    );
    let e = policy
        .check_scope(&f.scope(&[], &[], &["allowed_signers"]))
        .unwrap_err();
    assert!(
        matches!(
            e,
            ScopeViolation::ProtectedPath {
                reason: ProtectionReason::TrustFile,
                ..
            }
        ),
        "{e}"
    );
    let e = policy.check_scope(&f.scope(&[""], &[], &[])).unwrap_err();
    assert_eq!(e.refusal_kind(), RefusalKind::ProtectedPath);
}

#[test]
fn ceiling_applies_to_write_and_delete_not_read() {
    let f = Fixture::new();
    let policy = f.policy(&[], &["etc", "srv"]);
    let e = policy
        .check_scope(&f.scope(&["var/lib/x"], &[], &[]))
        .unwrap_err();
    assert_eq!(e.refusal_kind(), RefusalKind::ScopeCeiling);
    assert!(
        e.to_string().contains("outside this host's allow_scopes"),
        "{e}"
    );
    let e = policy
        .check_scope(&f.scope(&[], &["home"], &[]))
        .unwrap_err();
    assert!(
        matches!(e, ScopeViolation::ScopeCeiling { key: "delete", .. }),
        "{e}"
    );
    // `/etc2` is not within `/etc`.
    assert!(policy.check_scope(&f.scope(&["etc2"], &[], &[])).is_err());
    // Reads outside the ceiling are allowed (reading changes nothing).
    policy
        .check_scope(&f.scope(&["etc/postfix"], &[], &["usr/share/zoneinfo"]))
        .unwrap();
}

#[test]
fn scope_through_a_symlink_to_a_protected_path_is_caught() {
    let f = Fixture::new();
    f.mkdir("backup");
    f.mkdir("srv");
    f.symlink(&f.p("backup"), "srv/data");
    let policy = f.policy(&["backup"], &["srv"]);
    // The scope as written is inside the ceiling and not protected, but
    // resolves into /backup.
    let e = policy
        .check_scope(&f.scope(&["srv/data"], &[], &[]))
        .unwrap_err();
    match &e {
        ScopeViolation::ProtectedPath {
            via: Some(via),
            protected,
            ..
        } => {
            assert_eq!(protected, &f.sp("backup"));
            assert_eq!(via, &f.p("backup"));
        }
        other => panic!("unexpected {other:?}"),
    }
    // Also when the scope names a not-yet-existing path beneath the link.
    let e = policy
        .check_scope(&f.scope(&["srv/data/new/dir"], &[], &[]))
        .unwrap_err();
    assert_eq!(e.refusal_kind(), RefusalKind::ProtectedPath);
    // And a relative symlink.
    f.symlink("../backup", "srv/rel");
    let e = policy
        .check_scope(&f.scope(&[], &["srv/rel"], &[]))
        .unwrap_err();
    assert_eq!(e.refusal_kind(), RefusalKind::ProtectedPath);
}

#[test]
fn dangling_symlink_into_protected_path_is_caught() {
    let f = Fixture::new();
    f.mkdir("srv");
    // /backup/future does not exist yet; the bundle could create it through the link.
    f.mkdir("backup");
    f.symlink(&f.p("backup/future"), "srv/later");
    let policy = f.policy(&["backup"], &["srv"]);
    let e = policy
        .check_scope(&f.scope(&["srv/later"], &[], &[]))
        .unwrap_err();
    assert_eq!(e.refusal_kind(), RefusalKind::ProtectedPath);
}

#[test]
fn protected_symlink_protects_its_target_too() {
    let f = Fixture::new();
    f.mkdir("mnt/disk1/backup");
    f.symlink(&f.p("mnt/disk1/backup"), "backup");
    let policy = f.policy(&["backup"], &["mnt", "srv"]);
    let canon = policy.protected_canonical();
    assert!(canon.contains(&f.sp("backup")));
    assert!(canon.contains(&f.sp("mnt/disk1/backup")));
    let e = policy
        .check_scope(&f.scope(&["mnt/disk1"], &[], &[]))
        .unwrap_err();
    assert_eq!(e.refusal_kind(), RefusalKind::ProtectedPath);
    let e = policy
        .check_scope(&f.scope(&[], &["mnt/disk1/backup/old"], &[]))
        .unwrap_err();
    assert_eq!(e.refusal_kind(), RefusalKind::ProtectedPath);
    policy
        .check_scope(&f.scope(&["mnt/disk2"], &[], &[]))
        .unwrap();
}

#[test]
fn protected_symlink_created_after_load_is_still_followed() {
    let f = Fixture::new();
    f.mkdir("mnt/new");
    let policy = f.policy(&["backup"], &["mnt"]);
    // At load time /backup did not exist.
    assert!(!policy.protected_canonical().contains(&f.sp("mnt/new")));
    f.symlink(&f.p("mnt/new"), "backup");
    let e = policy
        .check_scope(&f.scope(&["mnt/new/x"], &[], &[]))
        .unwrap_err();
    assert_eq!(e.refusal_kind(), RefusalKind::ProtectedPath);
}

#[test]
fn ceiling_is_checked_on_the_resolved_path() {
    let f = Fixture::new();
    f.mkdir("etc");
    f.mkdir("root/.ssh");
    f.symlink(&f.p("root/.ssh"), "etc/keys");
    let policy = f.policy(&[], &["etc"]);
    let e = policy
        .check_scope(&f.scope(&["etc/keys"], &[], &[]))
        .unwrap_err();
    match &e {
        ScopeViolation::ScopeCeiling { via: Some(via), .. } => assert_eq!(via, &f.p("root/.ssh")),
        other => panic!("unexpected {other:?}"),
    }
    // A ceiling entry that is itself a symlink: its target is the ceiling too.
    f.mkdir("data/var");
    f.symlink(&f.p("data/var"), "var");
    let policy = f.policy(&[], &["var"]);
    policy
        .check_scope(&f.scope(&["var/lib/app"], &[], &[]))
        .unwrap();
}

#[test]
fn symlink_to_root_and_loops_fail_closed() {
    let f = Fixture::new();
    f.mkdir("srv");
    f.symlink("/", "srv/everything");
    f.symlink(&f.p("srv/loop2"), "srv/loop1");
    f.symlink(&f.p("srv/loop1"), "srv/loop2");
    let policy = f.policy(&[], &["srv"]);
    assert_eq!(
        resolve_symlinks(&f.sp("srv/everything")),
        ResolvedPath::Root
    );
    assert_eq!(
        resolve_symlinks(&f.sp("srv/loop1/x")),
        ResolvedPath::Unresolvable
    );
    let e = policy
        .check_scope(&f.scope(&[], &[], &["srv/everything"]))
        .unwrap_err();
    assert_eq!(e.refusal_kind(), RefusalKind::ProtectedPath);
    let e = policy
        .check_scope(&f.scope(&["srv/loop1"], &[], &[]))
        .unwrap_err();
    assert_eq!(e.refusal_kind(), RefusalKind::ProtectedPath);
}

#[test]
fn resolve_keeps_missing_components() {
    let f = Fixture::new();
    f.mkdir("a");
    f.symlink(&f.p("a"), "b");
    assert_eq!(
        resolve_symlinks(&f.sp("b/c/d")),
        ResolvedPath::Path(f.sp("a/c/d"))
    );
    assert_eq!(
        resolve_symlinks(&f.sp("x/y")),
        ResolvedPath::Path(f.sp("x/y"))
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Arbitrary text never panics the parser.
    #[test]
    fn parse_never_panics_on_text(text in "\\PC{0,400}") {
        let _ = HostPolicy::parse(&text);
    }

    /// Mutations of a valid policy never panic either, and a policy that
    /// parses always has a usable threshold ordering.
    #[test]
    fn parse_never_panics_on_mutations(
        cut in 0usize..2000,
        insert in "[\\[\\]=\"/a-z0-9 ,{}\n.-]{0,20}",
    ) {
        let f = Fixture::new();
        let mut text = f.policy_text(&["backup"], &["etc"]);
        let mut at = cut.min(text.len());
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        text.insert_str(at, &insert);
        if let Ok(p) = HostPolicy::parse(&text) {
            prop_assert!(p.trust().threshold >= 1);
            prop_assert!(p.trust().delete_threshold >= p.trust().threshold);
            prop_assert!(!p.identity().name.is_empty());
        }
    }
}

/// The shipped examples in `policy-examples/` parse (with the signers file
/// pointed at a scratch file) and mean what their comments say.
#[test]
fn shipped_policy_examples_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy-examples");
    let f = Fixture::new();
    let mut parsed = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("\"/etc/rollguard/allowed_signers\""),
            "{}",
            path.display()
        );
        let text = text.replace(
            "\"/etc/rollguard/allowed_signers\"",
            &format!("{:?}", f.p("allowed_signers")),
        );
        let policy = HostPolicy::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        parsed.insert(
            path.file_name().unwrap().to_str().unwrap().to_string(),
            policy,
        );
    }
    for name in ["minimal.toml", "mail-host.toml", "db-host.toml"] {
        assert!(parsed.contains_key(name), "{name} missing");
    }
    let scope = |write: &[&str], delete: &[&str]| Scope {
        write: write.iter().map(|p| ScopePath::parse(p).unwrap()).collect(),
        delete: delete
            .iter()
            .map(|p| ScopePath::parse(p).unwrap())
            .collect(),
        read: vec![],
        network: vec![],
    };
    let mail = &parsed["mail-host.toml"];
    assert_eq!(
        mail.identity().labels.get("role").map(String::as_str),
        Some("mail")
    );
    // The incident script: delete everything under /var.
    let e = mail.check_scope(&scope(&[], &["/var"])).unwrap_err();
    assert_eq!(e.refusal_kind(), RefusalKind::ProtectedPath);
    assert_eq!(
        mail.required_threshold(&scope(&[], &["/var/spool/postfix/old"])),
        2
    );
    assert!(mail
        .check_scope(&scope(&["/etc/postfix"], &["/var/spool/postfix/deferred"]))
        .is_ok());
    let e = mail.check_scope(&scope(&["/etc/nginx"], &[])).unwrap_err();
    assert_eq!(e.refusal_kind(), RefusalKind::ScopeCeiling);
    let db = &parsed["db-host.toml"];
    assert_eq!(
        db.required_threshold(&scope(&[], &["/var/log/postgresql/old"])),
        3
    );
    let e = db.check_scope(&scope(&["/var/lib"], &[])).unwrap_err();
    assert_eq!(e.refusal_kind(), RefusalKind::ProtectedPath);
    assert_eq!(
        parsed["minimal.toml"].state_dir(),
        Path::new(DEFAULT_STATE_DIR)
    );
}

#[test]
fn resources_default_to_the_built_in_limits_and_a_bundle_can_only_lower_them() {
    let f = Fixture::new();
    let policy = HostPolicy::parse(&f.policy_text(&[], &["etc"])).unwrap();
    let r = policy.resources();
    assert_eq!(r.default, RunLimits::default());
    assert_eq!(r.max, RunLimits::default());
    let lower = ResourceRequest {
        pids: Some(64),
        ..Default::default()
    };
    assert_eq!(r.for_run(&lower).unwrap().pids, 64);
    let higher = ResourceRequest {
        memory_mib: Some(2048),
        ..Default::default()
    };
    assert!(matches!(
        r.for_run(&higher),
        Err(LimitsError::AboveCeiling { name: "memory", .. })
    ));
    let absurd = ResourceRequest {
        pids: Some(1),
        ..Default::default()
    };
    assert!(matches!(
        r.for_run(&absurd),
        Err(LimitsError::TooLow { name: "pids", .. })
    ));
}

#[test]
fn resources_table_sets_defaults_and_max() {
    let f = Fixture::new();
    let text = format!(
        "{}\n[resources]\npids = 100\ntmp_mib = 8\n[resources.max]\npids = 1000\nmemory_mib = 4096\n",
        f.policy_text(&[], &["etc"])
    );
    let policy = HostPolicy::parse(&text).unwrap();
    let r = policy.resources();
    assert_eq!(r.default.pids, 100);
    assert_eq!(r.default.tmp_bytes, 8 * MIB);
    assert_eq!(r.max.pids, 1000);
    assert_eq!(r.max.memory_bytes, 4096 * MIB);
    // Unset max keys are the host's default: tmp cannot be raised.
    assert_eq!(r.max.tmp_bytes, 8 * MIB);
    let asks = ResourceRequest {
        pids: Some(1000),
        memory_mib: Some(3000),
        ..Default::default()
    };
    let limits = r.for_run(&asks).unwrap();
    assert_eq!((limits.pids, limits.memory_bytes), (1000, 3000 * MIB));

    // A default above the max, a typo, a zero: errors, not silently ignored.
    for bad in [
        "[resources]\npids = 100\n[resources.max]\npids = 50\n",
        "[resources]\npid = 100\n",
        "[resources]\nmemory_mib = 0\n",
    ] {
        let text = format!("{}\n{bad}", f.policy_text(&[], &["etc"]));
        assert!(HostPolicy::parse(&text).is_err(), "{bad}");
    }
}

#[test]
fn the_agents_programs_loader_and_unit_are_protected_from_writes_not_reads() {
    let f = Fixture::new();
    let mut policy = f.policy(&[], &["opt"]);
    // A source install under a tree bundles may change (the attack: a
    // bundle scoped to the stage-2 program replaced it).
    f.mkdir("opt/rollguard/bin");
    policy.protect_agent_programs(Path::new(&f.p("opt/rollguard/bin/rollguard-agent")));
    let refused = |write: &str| {
        let scope = Scope {
            write: vec![ScopePath::parse(write).unwrap()],
            delete: vec![],
            read: vec![],
            network: vec![],
        };
        policy.check_scope(&scope).unwrap_err()
    };
    for (path, reason) in [
        (
            f.p("opt/rollguard/bin/rollguard-sandbox-exec"),
            ProtectionReason::AgentPrograms,
        ),
        // Where it would be looked for next, and not there yet.
        (
            f.p("opt/rollguard/lib/rollguard/rollguard-sandbox-exec"),
            ProtectionReason::AgentPrograms,
        ),
        (
            f.p("opt/rollguard/bin/other"),
            ProtectionReason::AgentPrograms,
        ),
        ("/etc/ld.so.preload".into(), ProtectionReason::DynamicLoader),
        (
            "/etc/ld.so.conf.d/evil.conf".into(),
            ProtectionReason::DynamicLoader,
        ),
        (
            "/etc/systemd/system/rollguard-agent.service".into(),
            ProtectionReason::ServiceUnit,
        ),
        (
            "/etc/systemd/system/rollguard-agent.service.d/override.conf".into(),
            ProtectionReason::ServiceUnit,
        ),
        (
            "/usr/lib/systemd/system/rollguard-agent.service".into(),
            ProtectionReason::ServiceUnit,
        ),
        (
            "/etc/systemd/system/service.d/all.conf".into(),
            ProtectionReason::ServiceUnit,
        ),
        (
            "/etc/systemd/system.attached/rollguard-agent.service.d/x.conf".into(),
            ProtectionReason::ServiceUnit,
        ),
        (
            "/etc/rollguard/new".into(),
            ProtectionReason::AgentConfigDir,
        ),
    ] {
        let e = refused(&path);
        assert!(
            matches!(&e, ScopeViolation::ProtectedPath { reason: r, .. } if *r == reason),
            "{path}: {e}"
        );
        assert_eq!(e.refusal_kind(), RefusalKind::ProtectedPath);
    }
    // The directory itself too: a scope cannot be pinned.
    let e = refused(&f.p("opt/rollguard/bin"));
    assert_eq!(e.refusal_kind(), RefusalKind::ProtectedPath, "{e}");
    // An ancestor of the install is accepted: what lies inside is pinned.
    let pins = policy
        .check_scope(&f.scope(&["opt"], &["opt/rollguard"], &[]))
        .unwrap();
    for pinned in [
        "opt/rollguard/bin",
        "opt/rollguard/bin/rollguard-sandbox-exec",
        "opt/rollguard/lib/rollguard",
        "opt/rollguard/lib/rollguard/rollguard-sandbox-exec",
        "opt/rollguard/libexec/rollguard",
    ] {
        assert!(pins.paths.contains(&f.sp(pinned)), "{pinned}: {pins:?}");
    }
    assert!(
        pins.paths.windows(2).all(|w| w[0] < w[1]),
        "sorted, once each"
    );
    // The message says why.
    let e = refused(&f.p("opt/rollguard/bin/rollguard-sandbox-exec"));
    assert!(e.to_string().contains("stage 2 runs unconfined"), "{e}");

    // Reading them is fine, and the sandbox does not hide them.
    let read = Scope {
        write: vec![],
        delete: vec![],
        read: vec![
            ScopePath::parse("/etc/ld.so.cache").unwrap(),
            f.sp("opt/rollguard/bin"),
        ],
        network: vec![],
    };
    policy.check_scope(&read).unwrap();
    let canon = policy.protected_canonical();
    assert!(!canon.contains(&ScopePath::parse("/etc/ld.so.cache").unwrap()));
    assert!(!canon.contains(&f.sp("opt/rollguard/bin")));
    assert!(canon.contains(&f.sp("allowed_signers")));
}

#[test]
fn protected_canonical_follows_a_symlink_repointed_after_load() {
    // The daemon loads the policy once; the sandbox of each later run must
    // hide the protected symlink's *current* target.
    let f = Fixture::new();
    f.mkdir("mnt/old");
    f.mkdir("mnt/new");
    f.symlink(&f.p("mnt/old"), "backup");
    let policy = f.policy(&["backup"], &["srv"]);
    assert!(policy.protected_canonical().contains(&f.sp("mnt/old")));
    std::fs::remove_file(f.p("backup")).unwrap();
    f.symlink(&f.p("mnt/new"), "backup");
    let canon = policy.protected_canonical();
    assert!(canon.contains(&f.sp("mnt/new")), "{canon:?}");
    // The old target stays protected too (it may hold the same data).
    assert!(canon.contains(&f.sp("mnt/old")), "{canon:?}");
}

#[test]
fn a_trust_file_others_could_edit_is_refused_at_load() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fixture::new();
    let signers = f.p("allowed_signers");
    std::fs::set_permissions(&signers, std::fs::Permissions::from_mode(0o664)).unwrap();
    let e = HostPolicy::parse(&f.policy_text(&[], &["etc"]))
        .unwrap_err()
        .to_string();
    assert!(e.contains(&signers), "{e}");
    assert!(e.contains("mode 0664"), "{e}");
    assert!(e.contains("chmod go-w"), "{e}");
    std::fs::set_permissions(&signers, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::chown(&signers, Some(65534), None).unwrap();
    let e = HostPolicy::parse(&f.policy_text(&[], &["etc"]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("owned by uid 65534"), "{e}");
    assert!(e.contains("chown root"), "{e}");
    std::os::unix::fs::chown(&signers, Some(0), None).unwrap();

    // The policy file itself, and its directory.
    f.mkdir("etc/rollguard");
    let path = f.p("etc/rollguard/agent.toml");
    std::fs::write(&path, f.policy_text(&[], &["etc"])).unwrap();
    HostPolicy::load(Path::new(&path)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let e = HostPolicy::load(Path::new(&path)).unwrap_err().to_string();
    assert!(e.contains("host policy") && e.contains("mode 0666"), "{e}");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(f.p("etc/rollguard"), std::fs::Permissions::from_mode(0o775)).unwrap();
    let e = HostPolicy::load(Path::new(&path)).unwrap_err().to_string();
    assert!(e.contains("etc/rollguard is writable by group"), "{e}");
}

#[test]
fn network_ceiling_applies_to_resolved_rules() {
    use crate::sandbox::net_scope;
    let f = Fixture::new();
    let with = |ceiling: &str| {
        HostPolicy::parse(
            &f.policy_text(&[], &["etc"])
                .replace("[state]", &format!("allow_network = [{ceiling}]\n[state]")),
        )
    };
    let rules = |entries: &[&str]| {
        let endpoints: Vec<NetworkEndpoint> = entries
            .iter()
            .map(|e| NetworkEndpoint::parse(e).unwrap())
            .collect();
        net_scope::resolve(&endpoints, |name, _| match name {
            "mirror.internal" => Ok(vec!["10.0.0.7".parse().unwrap()]),
            _ => Ok(vec!["192.0.2.1".parse().unwrap()]),
        })
        .unwrap()
        .by_entry
    };
    // No ceiling: anything.
    let open = f.policy(&[], &["etc"]);
    open.check_network(&rules(&["tcp:192.0.2.9:25"])).unwrap();

    let p = with(r#""tcp:10.0.0.0/24:443", "udp:10.0.0.53:53", "tcp:[2001:db8::/32]:80""#).unwrap();
    for ok in [
        "tcp:10.0.0.5:443",
        "tcp:10.0.0.128/25:443",
        "udp:10.0.0.53:53",
        "tcp:mirror.internal:443",
        "tcp:[2001:db8::1]:80",
    ] {
        p.check_network(&rules(&[ok]))
            .unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    for refused in [
        "tcp:10.0.1.5:443",      // outside the block
        "tcp:10.0.0.0/16:443",   // wider than the block
        "udp:10.0.0.5:443",      // other protocol
        "tcp:10.0.0.5:8443",     // other port
        "tcp:other.example:443", // a name resolving outside
        "tcp:[2001:db9::1]:80",
    ] {
        let err = p.check_network(&rules(&[refused])).unwrap_err();
        assert_eq!(err.refusal_kind(), RefusalKind::ScopeCeiling, "{refused}");
        assert!(err.to_string().contains("allow_network"), "{err}");
    }
    // An empty ceiling allows no network at all.
    let none = with("").unwrap();
    assert!(none.check_network(&rules(&["tcp:10.0.0.5:443"])).is_err());
    none.check_network(&[]).unwrap();

    // The ceiling itself must not depend on a resolver, and must parse.
    let e = with(r#""tcp:mirror.internal:443""#)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("limits.allow_network") && e.contains("host names"),
        "{e}"
    );
    let e = with(r#""tcp:10.0.0.5/24:443""#).unwrap_err().to_string();
    assert!(e.contains("limits.allow_network"), "{e}");
}

#[test]
fn only_paths_bundles_may_read_are_pinned_inside_a_write_scope() {
    let f = Fixture::new();
    f.mkdir("opt/rg/bin");
    // The trust file beneath the agent's directory: not readable, but
    // read-only with the pin above it.
    std::fs::write(f.p("opt/rg/bin/allowed_signers"), "").unwrap();
    let text = f
        .policy_text(&["srv/backup", "opt/rg/bin/local"], &["opt", "srv"])
        .replace(&f.p("allowed_signers"), &f.p("opt/rg/bin/allowed_signers"));
    let without_local = f
        .policy_text(&["srv/backup"], &["opt", "srv"])
        .replace(&f.p("allowed_signers"), &f.p("opt/rg/bin/allowed_signers"));
    let mut policy = HostPolicy::parse(&without_local).unwrap();
    policy.protect_agent_programs(Path::new(&f.p("opt/rg/bin/rollguard-agent")));
    let pins = policy.check_scope(&f.scope(&["opt/rg"], &[], &[])).unwrap();
    assert!(pins.paths.contains(&f.sp("opt/rg/bin")), "{pins:?}");
    // Neither the trust file nor the operator's own path is a pin.
    assert!(!pins.paths.contains(&f.sp("opt/rg/bin/allowed_signers")));
    // An operator's `[protect]` path inside a scope stays refused, even
    // beneath a pin, and the message names it.
    policy = HostPolicy::parse(&text).unwrap();
    policy.protect_agent_programs(Path::new(&f.p("opt/rg/bin/rollguard-agent")));
    let e = policy
        .check_scope(&f.scope(&["opt"], &[], &[]))
        .unwrap_err();
    assert!(
        matches!(
            &e,
            ScopeViolation::ProtectedPath {
                reason: ProtectionReason::Configured,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("opt/rg/bin/local"), "{e}");
    let e = policy
        .check_scope(&f.scope(&[], &["srv"], &[]))
        .unwrap_err();
    assert!(
        matches!(
            &e,
            ScopeViolation::ProtectedPath {
                key: "delete",
                reason: ProtectionReason::Configured,
                ..
            }
        ),
        "{e}"
    );
    // A non-readable path not beneath a pin (the state directory): refused.
    let e = policy.check_scope(&f.scope(&[""], &[], &[])).unwrap_err();
    assert!(
        matches!(
            &e,
            ScopeViolation::ProtectedPath {
                reason: ProtectionReason::StateDir | ProtectionReason::Configured,
                ..
            }
        ),
        "{e}"
    );
    // Read scopes pin nothing: a read scope over a path bundles may not
    // read is refused as before; over the agent's programs it is fine.
    let e = policy
        .check_scope(&f.scope(&[], &[], &["opt/rg"]))
        .unwrap_err();
    assert!(
        matches!(&e, ScopeViolation::ProtectedPath { key: "read", .. }),
        "{e}"
    );
    let pins = policy
        .check_scope(&f.scope(&[], &[], &["opt/rg/lib"]))
        .unwrap();
    assert!(pins.paths.is_empty());
}

#[test]
fn a_pin_is_found_through_a_symlinked_scope_too() {
    // The scope as written is a symlink to the install's parent: the
    // resolved spelling contains the agent's programs, and they are pinned
    // (stage 2 refuses a scope that is not its real path anyway).
    let f = Fixture::new();
    f.mkdir("opt/rg/bin");
    f.mkdir("srv");
    f.symlink(&f.p("opt/rg"), "srv/rg");
    let mut policy = f.policy(&[], &["opt", "srv"]);
    policy.protect_agent_programs(Path::new(&f.p("opt/rg/bin/rollguard-agent")));
    let pins = policy.check_scope(&f.scope(&["srv/rg"], &[], &[])).unwrap();
    assert!(pins.paths.contains(&f.sp("opt/rg/bin")), "{pins:?}");
}

#[test]
fn only_the_units_drop_in_directories_may_be_created_as_placeholders() {
    let f = Fixture::new();
    let text = f
        .policy_text(&[], &["etc"])
        .replace(&format!("{:?}", f.p("etc")), "\"/etc\"");
    let mut policy = HostPolicy::parse(&text).unwrap();
    policy.protect_agent_programs(Path::new(&f.p("opt/rg/bin/rollguard-agent")));
    let scope = |w: &str| Scope {
        write: vec![ScopePath::parse(w).unwrap()],
        delete: vec![],
        read: vec![],
        network: vec![],
    };
    let sp = |s: &str| ScopePath::parse(s).unwrap();
    let pins = policy.check_scope(&scope("/etc/systemd/system")).unwrap();
    let drop_ins = [
        "/etc/systemd/system/rollguard-agent.service.d",
        "/etc/systemd/system/rollguard-.service.d",
        "/etc/systemd/system/service.d",
    ];
    for d in drop_ins {
        assert!(pins.paths.contains(&sp(d)), "{d}: {pins:?}");
        assert!(pins.drop_in_dirs.contains(&sp(d)), "{d}: {pins:?}");
    }
    // The unit file is a pin, never a placeholder.
    let unit = sp("/etc/systemd/system/rollguard-agent.service");
    assert!(pins.paths.contains(&unit), "{pins:?}");
    assert_eq!(pins.drop_in_dirs.len(), drop_ins.len(), "{pins:?}");
    // Nor the loader's files, in a wider scope.
    let pins = policy.check_scope(&scope("/etc")).unwrap();
    let preload = sp("/etc/ld.so.preload");
    assert!(pins.paths.contains(&preload), "{pins:?}");
    assert!(!pins.drop_in_dirs.contains(&preload), "{pins:?}");
    assert!(pins
        .drop_in_dirs
        .iter()
        .all(|d| d.as_path().to_str().unwrap().ends_with(".d")));
    assert!(pins.drop_in_dirs.iter().all(|d| pins.paths.contains(d)));
}

#[test]
fn the_agents_enablement_links_that_exist_are_found_in_each_unit_directory() {
    use std::os::unix::fs::symlink;
    let root = tempfile::tempdir().unwrap();
    let etc = root.path().join("etc");
    let lib = root.path().join("lib");
    for dir in [
        "etc/multi-user.target.wants",
        "etc/sockets.target.wants",
        "etc/x.requires",
        "etc/y.upholds",
        "etc/.wants",
        "etc/other.d",
        "lib/graphical.target.wants",
    ] {
        fs::create_dir_all(root.path().join(dir)).unwrap();
    }
    for dir in [
        "etc/multi-user.target.wants",
        "etc/x.requires",
        "etc/y.upholds",
        "etc/.wants",
        "etc/other.d",
        "lib/graphical.target.wants",
    ] {
        symlink("/dev/null", root.path().join(dir).join(AGENT_UNIT)).unwrap();
    }
    // A file with an enablement directory's name holds nothing.
    fs::write(etc.join("file.wants"), "").unwrap();
    // A symlinked enablement directory is one (systemd follows it).
    fs::create_dir_all(root.path().join("elsewhere")).unwrap();
    symlink("/dev/null", root.path().join("elsewhere").join(AGENT_UNIT)).unwrap();
    symlink(root.path().join("elsewhere"), etc.join("z.target.wants")).unwrap();
    let links = agent_unit_links(&[
        etc.to_str().unwrap(),
        lib.to_str().unwrap(),
        root.path().join("missing").to_str().unwrap(),
    ]);
    // The link in the lower-priority `lib` is also protected by name in
    // `etc`, where an entry would override (mask) it; not the other way.
    let expected: Vec<PathBuf> = [
        "etc/graphical.target.wants",
        "etc/multi-user.target.wants",
        "etc/x.requires",
        "etc/y.upholds",
        "etc/z.target.wants",
        "lib/graphical.target.wants",
    ]
    .iter()
    .map(|d| root.path().join(d).join(AGENT_UNIT))
    .collect();
    assert_eq!(links, expected);
}

#[test]
fn a_symlink_pin_whose_target_a_scope_could_redirect_is_refused() {
    use std::os::unix::fs::symlink;
    let f = Fixture::new();
    // The agent's directory is a link `opt/rg/bin -> ../cur/bin`, and
    // `opt/cur -> v1` another one on the way to the real directory.
    f.mkdir("opt/v1/bin");
    f.mkdir("opt/rg");
    symlink("v1", f.p("opt/cur")).unwrap();
    symlink("../cur/bin", f.p("opt/rg/bin")).unwrap();
    let mut policy = f.policy(&[], &["opt"]);
    policy.protect_agent_programs(Path::new(&f.p("opt/rg/bin/rollguard-agent")));
    // A scope holding the link only: the link is a pin (as the link), its
    // target another, and the bundle cannot reach `opt/cur`.
    let pins = policy.check_scope(&f.scope(&["opt/rg"], &[], &[])).unwrap();
    assert!(pins.paths.contains(&f.sp("opt/rg/bin")), "{pins:?}");
    // A scope holding `opt/cur` too: replacing it would redirect the link.
    for (write, delete) in [(vec!["opt"], vec![]), (vec!["opt/rg"], vec!["opt"])] {
        let e = policy
            .check_scope(&f.scope(&write, &delete, &[]))
            .unwrap_err();
        assert!(
            matches!(&e, ScopeViolation::RedirectablePin { link, .. } if *link == Path::new(&f.p("opt/cur"))),
            "{e}"
        );
        assert_eq!(e.refusal_kind(), RefusalKind::ProtectedPath);
    }
}
