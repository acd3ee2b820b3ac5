use super::*;
use proptest::prelude::*;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Barrier};

fn setup() -> (tempfile::TempDir, StateDir, RunLog) {
    let tmp = tempfile::tempdir().unwrap();
    let state = StateDir::open(&tmp.path().join("state")).unwrap();
    let log = RunLog::new(&state);
    (tmp, state, log)
}

fn bundle() -> BundleRef {
    BundleRef {
        name: "postfix-tls".into(),
        version: 7,
    }
}

fn started(run: &str) -> RunLogEvent {
    RunLogEvent::RunStarted {
        run_id: run.into(),
        bundle: bundle(),
        manifest_sha256: "ab".repeat(32),
        signers: vec!["alice".into(), "bob".into()],
        scope: ScopeSummary {
            write: vec!["/etc/postfix".into()],
            delete: vec![],
            read: vec![],
            network: vec!["smtp.example:25".into()],
        },
        attempt: None,
    }
}

fn refused(reason: &str) -> RunLogEvent {
    RunLogEvent::Refused {
        bundle: Some(bundle()),
        manifest_sha256: Some("cd".repeat(32)),
        refusal: RefusalKind::ProtectedPath,
        reason: reason.into(),
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).unwrap();
}

/// A log with five entries.
fn five() -> (tempfile::TempDir, StateDir, RunLog) {
    let (tmp, state, log) = setup();
    log.append(started("r1")).unwrap();
    log.append(RunLogEvent::RunFinished {
        run_id: "r1".into(),
        bundle: bundle(),
        manifest_sha256: "ab".repeat(32),
        status: RunStatus::Succeeded,
        exit_code: Some(0),
        reason: None,
        denials: Some(vec![Denial {
            access: "fs.remove_file".into(),
            path: Some("/backup".into()),
            exe: None,
        }]),
        denial_count: Some(3),
        duration_ms: 12,
        expected_denials: vec![],
        packages: vec![],
    })
    .unwrap();
    log.append(refused(
        "scope.delete /srv overlaps protected path /srv/backup",
    ))
    .unwrap();
    log.append(RunLogEvent::KillSet {
        reason: "wave 2 denials".into(),
    })
    .unwrap();
    log.append(RunLogEvent::KillCleared).unwrap();
    (tmp, state, log)
}

fn broken(result: Result<VerifyReport, RunLogError>) -> (u64, ChainBreak) {
    match result {
        Err(RunLogError::Broken { line, kind }) => (line, kind),
        other => panic!("expected a broken chain, got {other:?}"),
    }
}

#[test]
fn appends_a_verifiable_chain() {
    let (_tmp, state, log) = five();
    let report = verify(log.path()).unwrap();
    assert_eq!(report.entries, 5);
    let all = lines(log.path());
    let last = report.head.unwrap();
    assert_eq!(last.seq, 5);
    assert_eq!(last.hash, hex::encode(Sha256::digest(all[4].as_bytes())));
    assert_eq!(head(log.path()).unwrap(), Some(last));

    // The documented shape, and entries read back as typed values.
    let first: RunLogEntry = serde_json::from_str(&all[0]).unwrap();
    assert_eq!(first.seq, 1);
    assert_eq!(first.prev, GENESIS_PREV);
    assert_eq!(first.event, started("r1"));
    let v: serde_json::Value = serde_json::from_str(&all[0]).unwrap();
    let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
    assert_eq!(keys.len(), 4);
    assert!(all[0].starts_with("{\"seq\":1,\"time\":\""), "{}", all[0]);
    assert_eq!(v["event"]["type"], "run_started");
    let second: RunLogEntry = serde_json::from_str(&all[1]).unwrap();
    assert_eq!(second.prev, hex::encode(Sha256::digest(all[0].as_bytes())));
    let fifth: serde_json::Value = serde_json::from_str(&all[4]).unwrap();
    assert_eq!(fifth["event"], serde_json::json!({"type": "kill_cleared"}));

    let mode = std::fs::metadata(log.path()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Another handle on the same state directory continues the chain.
    RunLog::new(&StateDir::open(state.root()).unwrap())
        .append(RunLogEvent::KillCleared)
        .unwrap();
    assert_eq!(verify(log.path()).unwrap().entries, 6);
}

#[test]
fn run_finished_from_a_report() {
    let report = RunReport {
        exit_code: Some(2),
        reason: Some("exit 2".into()),
        bundle: Some(bundle()),
        duration_ms: 5,
        run_id: Some("r9".into()),
        ..RunReport::new("h", RunStatus::Failed)
    };
    let e = RunLogEvent::run_finished(&report, "r9", bundle(), "ee");
    let v = serde_json::to_value(&e).unwrap();
    assert_eq!(v["type"], "run_finished");
    assert_eq!(v["status"], "failed");
    assert_eq!(
        v["denials"],
        serde_json::Value::Null,
        "unknown stays unknown"
    );
    assert_eq!(serde_json::from_value::<RunLogEvent>(v).unwrap(), e);
}

#[test]
fn empty_and_missing_logs() {
    let (_tmp, _state, log) = setup();
    assert!(matches!(verify(log.path()), Err(RunLogError::Io { .. })));
    std::fs::write(log.path(), "").unwrap();
    assert_eq!(
        verify(log.path()).unwrap(),
        VerifyReport {
            entries: 0,
            head: None
        }
    );
}

#[test]
fn detects_an_edited_line() {
    let (_tmp, _state, log) = five();
    let mut all = lines(log.path());
    // Still valid JSON, still the right seq: only the next prev exposes it.
    all[2] = all[2].replace("overlaps protected path", "was fine, no problem at");
    write_lines(log.path(), &all);
    assert_eq!(broken(verify(log.path())), (4, ChainBreak::PrevMismatch));
}

#[test]
fn detects_an_edit_that_breaks_the_json() {
    let (_tmp, _state, log) = five();
    let mut all = lines(log.path());
    let cut = all[1].len() - 3;
    all[1].truncate(cut);
    write_lines(log.path(), &all);
    let (line, kind) = broken(verify(log.path()));
    assert_eq!(line, 2);
    assert!(matches!(kind, ChainBreak::Malformed(_)), "{kind:?}");
}

#[test]
fn detects_a_removed_line() {
    let (_tmp, _state, log) = five();
    let mut all = lines(log.path());
    all.remove(2);
    write_lines(log.path(), &all);
    assert_eq!(
        broken(verify(log.path())),
        (
            3,
            ChainBreak::UnexpectedSeq {
                expected: 3,
                found: 4
            }
        )
    );

    // Removing a line and renumbering the rest still breaks the hashes.
    let (_tmp, _state, log) = five();
    let mut all = lines(log.path());
    all.remove(2);
    for (i, l) in all.iter_mut().enumerate().skip(2) {
        *l = l.replacen(
            &format!("\"seq\":{}", i + 2),
            &format!("\"seq\":{}", i + 1),
            1,
        );
    }
    write_lines(log.path(), &all);
    assert_eq!(broken(verify(log.path())), (3, ChainBreak::PrevMismatch));

    // Removing the first line.
    let (_tmp, _state, log) = five();
    let all = lines(log.path());
    write_lines(log.path(), &all[1..]);
    assert_eq!(
        broken(verify(log.path())),
        (
            1,
            ChainBreak::UnexpectedSeq {
                expected: 1,
                found: 2
            }
        )
    );
}

#[test]
fn detects_reordered_lines() {
    let (_tmp, _state, log) = five();
    let mut all = lines(log.path());
    all.swap(1, 3);
    write_lines(log.path(), &all);
    assert_eq!(
        broken(verify(log.path())),
        (
            2,
            ChainBreak::UnexpectedSeq {
                expected: 2,
                found: 4
            }
        )
    );
}

#[test]
fn detects_a_truncated_last_line_and_refuses_to_extend_it() {
    let (_tmp, _state, log) = five();
    let text = std::fs::read_to_string(log.path()).unwrap();
    std::fs::write(log.path(), &text[..text.len() - 10]).unwrap();
    assert_eq!(
        broken(verify(log.path())),
        (5, ChainBreak::TruncatedLastLine)
    );
    let e = log.append(RunLogEvent::KillCleared).unwrap_err();
    assert!(matches!(e, RunLogError::DamagedTail { .. }), "{e}");
    // A torn line that happens to end in a newline is caught too.
    std::fs::write(log.path(), format!("{}\n", &text[..text.len() - 10])).unwrap();
    assert!(matches!(
        log.append(RunLogEvent::KillCleared),
        Err(RunLogError::DamagedTail { .. })
    ));
}

#[test]
fn malformed_fields_are_reported() {
    let (_tmp, _state, log) = five();
    let all = lines(log.path());
    for (from, to, what) in [
        ("\"seq\":1,", "\"seq\":1,\"extra\":1,", "unknown field"),
        ("\"time\":\"", "\"time\":\"yesterday ", "RFC 3339"),
        (
            GENESIS_PREV,
            &GENESIS_PREV.to_uppercase().replace('0', "A"),
            "64 lowercase hex",
        ),
        ("\"type\":\"run_started\",", "", "no type"),
    ] {
        let mut edited = all.clone();
        edited[0] = edited[0].replacen(from, to, 1);
        assert_ne!(edited[0], all[0], "{what}");
        write_lines(log.path(), &edited);
        let (line, kind) = broken(verify(log.path()));
        assert_eq!(line, 1, "{what}");
        assert!(kind.to_string().contains(what), "{what}: {kind}");
    }
}

#[test]
fn limits_of_a_self_consistent_chain_and_the_anchor() {
    // Editing the *last* line, or cutting lines off the end, leaves a chain
    // that is consistent with itself: only a head kept elsewhere exposes it.
    let (_tmp, _state, log) = five();
    let anchor = verify(log.path()).unwrap().head.unwrap();
    verify_anchored(log.path(), &anchor).unwrap();

    let mut all = lines(log.path());
    all[4] = all[4].replace("kill_cleared", "kill_set\",\"reason\":\"x");
    write_lines(log.path(), &all);
    verify(log.path()).unwrap();
    let e = verify_anchored(log.path(), &anchor).unwrap_err();
    assert!(
        matches!(e, RunLogError::AnchorMismatch { seq: 5, .. }),
        "{e}"
    );

    write_lines(log.path(), &all[..3]);
    assert_eq!(verify(log.path()).unwrap().entries, 3);
    let e = verify_anchored(log.path(), &anchor).unwrap_err();
    assert!(e.to_string().contains("cut"), "{e}");

    // An anchor in the middle still verifies a log that grew since.
    let (_tmp, _state, log) = five();
    let all = lines(log.path());
    let mid = Head {
        seq: 3,
        hash: hex::encode(Sha256::digest(all[2].as_bytes())),
    };
    log.append(RunLogEvent::KillCleared).unwrap();
    assert_eq!(verify_anchored(log.path(), &mid).unwrap().entries, 6);
}

#[test]
fn long_lines_are_found_from_the_end() {
    let (_tmp, _state, log) = setup();
    log.append(refused(&"x".repeat(50_000))).unwrap();
    log.append(refused(&"y".repeat(20_000))).unwrap();
    let head = log.append(RunLogEvent::KillCleared).unwrap();
    assert_eq!(head.seq, 3);
    assert_eq!(verify(log.path()).unwrap().head, Some(head));
}

#[test]
fn concurrent_appends_keep_one_chain() {
    let (_tmp, state, log) = setup();
    let threads = 6;
    let per_thread = 15;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let log = RunLog::new(&StateDir::open(state.root()).unwrap());
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                for i in 0..per_thread {
                    log.append(RunLogEvent::KillSet {
                        reason: format!("{t}-{i}"),
                    })
                    .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let report = verify(log.path()).unwrap();
    assert_eq!(report.entries, (threads * per_thread) as u64);
}

#[test]
fn symlinked_log_is_not_followed() {
    let (tmp, _state, log) = setup();
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::write(&elsewhere, "").unwrap();
    std::os::unix::fs::symlink(&elsewhere, log.path()).unwrap();
    assert!(matches!(
        log.append(RunLogEvent::KillCleared),
        Err(RunLogError::Io { .. })
    ));
    assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Arbitrary bytes never panic the verifier, and what it accepts is a
    /// chain (first prev is the genesis value).
    #[test]
    fn verify_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("log");
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(report) = verify(&path) {
            prop_assert!(report.entries == 0 || report.head.is_some());
        }
    }

    /// Flipping any one byte of a valid log is detected, except in the last
    /// line (the documented limit, covered by anchors).
    #[test]
    fn any_single_byte_edit_before_the_last_line_is_detected(pos in 0usize..10_000, byte in any::<u8>()) {
        let (_tmp, _state, log) = five();
        let mut bytes = std::fs::read(log.path()).unwrap();
        let last_line_start = bytes[..bytes.len() - 1].iter().rposition(|b| *b == b'\n').unwrap() + 1;
        let pos = pos % last_line_start;
        prop_assume!(bytes[pos] != byte);
        bytes[pos] = byte;
        std::fs::write(log.path(), &bytes).unwrap();
        prop_assert!(verify(log.path()).is_err());
    }
}
