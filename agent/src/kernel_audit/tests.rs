use super::*;

fn rec(ty: u16, text: &str) -> AuditRecord {
    parse_record(ty, text).unwrap().unwrap()
}

fn buffer(records: &[(u16, &str)]) -> VecDeque<AuditRecord> {
    records.iter().map(|(t, s)| rec(*t, s)).collect()
}

fn denial(access: &str, path: Option<&str>, exe: Option<&str>) -> Denial {
    Denial {
        access: access.into(),
        path: path.map(Into::into),
        exe: exe.map(Into::into),
    }
}

const ALLOC_300: &str =
    "audit(100.000:10): domain=aaa status=allocated mode=enforcing pid=300 uid=0 exe=\"/usr/sbin/rollguard-agent\" comm=\"stage2\"";

#[test]
fn nlmsg_encoding() {
    let msg = encode_nlmsg(AUDIT_SET, NLM_F_REQUEST | NLM_F_ACK, 7, &[1, 2, 3]);
    assert_eq!(msg.len(), 20, "16-byte header + 3 bytes, padded to 4");
    assert_eq!(u32_at(&msg, 0), Some(19), "length excludes padding");
    assert_eq!(u16_at(&msg, 4), Some(AUDIT_SET));
    assert_eq!(u16_at(&msg, 6), Some(NLM_F_REQUEST | NLM_F_ACK));
    assert_eq!(u32_at(&msg, 8), Some(7));
    assert_eq!(u32_at(&msg, 12), Some(0));
    assert_eq!(&msg[16..], &[1, 2, 3, 0]);

    let mut two = encode_nlmsg(AUDIT_GET, 0, 1, &[9; 5]);
    two.extend(encode_nlmsg(NLMSG_ERROR, 0, 2, &[0; 4]));
    let msgs = decode_nlmsgs(&two);
    assert_eq!(msgs.len(), 2);
    assert_eq!(
        msgs[0],
        NlMsg {
            msg_type: AUDIT_GET,
            seq: 1,
            payload: &[9; 5]
        }
    );
    assert_eq!(
        msgs[1],
        NlMsg {
            msg_type: NLMSG_ERROR,
            seq: 2,
            payload: &[0; 4]
        }
    );
}

#[test]
fn nlmsg_decoding_is_defensive() {
    assert!(decode_nlmsgs(&[]).is_empty());
    assert!(decode_nlmsgs(&[1, 2, 3]).is_empty());
    // A length field larger than the datagram: take what is there.
    let mut msg = encode_nlmsg(1423, 0, 0, b"abcd");
    msg[0..4].copy_from_slice(&1000u32.to_ne_bytes());
    assert_eq!(decode_nlmsgs(&msg)[0].payload, b"abcd");
    // A length field smaller than a header (the old audit quirk).
    msg[0..4].copy_from_slice(&4u32.to_ne_bytes());
    assert_eq!(decode_nlmsgs(&msg)[0].payload, b"abcd");
    // Exactly a header, no payload.
    let bare = encode_nlmsg(3, 0, 0, &[]);
    assert_eq!(decode_nlmsgs(&bare)[0].payload, b"");
}

#[test]
fn audit_status_parsing() {
    let words: [u32; 11] = [0x7f, 1, 1, 4242, 0, 8192, 17, 3, 0x7f, 60000, 0];
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    assert_eq!(
        parse_status(&bytes),
        Some(AuditStatus {
            enabled: 1,
            pid: 4242,
            backlog_limit: 8192,
            lost: 17
        })
    );
    assert_eq!(parse_status(&bytes[..24]), None, "too short for `lost`");
}

#[test]
fn attributes_the_runs_landlock_domain_and_uses_the_kernel_count() {
    let records = buffer(&[
        (AUDIT_LANDLOCK_ACCESS, "audit(100.000:10): domain=aaa blockers=fs.remove_file path=\"/backup\" dev=\"vda\" ino=2"),
        (AUDIT_LANDLOCK_DOMAIN, ALLOC_300),
        (AUDIT_LANDLOCK_ACCESS, "audit(100.001:11): domain=aaa blockers=fs.remove_file path=\"/backup\" dev=\"vda\" ino=2"),
        (AUDIT_LANDLOCK_ACCESS, "audit(100.002:12): domain=aaa blockers=fs.write_file,fs.truncate path=\"/etc/passwd\" dev=\"vda\" ino=9"),
        // Another sandbox on the same host.
        (AUDIT_LANDLOCK_ACCESS, "audit(100.003:13): domain=bbb blockers=fs.remove_file path=\"/srv\" dev=\"vda\" ino=3"),
        (AUDIT_LANDLOCK_DOMAIN, "audit(100.003:13): domain=bbb status=allocated mode=enforcing pid=400 uid=0 exe=\"/x\" comm=\"x\""),
        (AUDIT_LANDLOCK_DOMAIN, "audit(100.010:14): domain=bbb status=deallocated denials=1"),
        // The kernel counted more than were logged (e.g. rate limits).
        (AUDIT_LANDLOCK_DOMAIN, "audit(100.020:15): domain=aaa status=deallocated denials=7"),
    ]);
    let d = attribute(&records, 300, None);
    assert_eq!(d.domains, vec![0xaaa]);
    assert!(d.landlock_count_final);
    assert_eq!(d.landlock_denials, 7);
    assert_eq!(d.seccomp_denials, 0);
    assert!(d.gaps.is_empty(), "{:?}", d.gaps);
    assert_eq!(
        d.denials,
        vec![
            DenialCount {
                denial: denial("fs.remove_file", Some("/backup"), None),
                records: 2
            },
            DenialCount {
                denial: denial("fs.write_file", Some("/etc/passwd"), None),
                records: 1
            },
            DenialCount {
                denial: denial("fs.truncate", Some("/etc/passwd"), None),
                records: 1
            },
        ]
    );
    assert_eq!(d.report_fields().1, Some(7));

    // The other sandbox sees only its own.
    let other = attribute(&records, 400, None);
    assert_eq!(
        other.denial_list(),
        vec![denial("fs.remove_file", Some("/srv"), None)]
    );
    assert_eq!(other.total(), 1);
}

#[test]
fn without_the_deallocation_record_the_count_is_a_lower_bound() {
    let records = buffer(&[
        (
            AUDIT_LANDLOCK_ACCESS,
            "audit(100.000:10): domain=aaa blockers=fs.remove_file path=\"/backup\"",
        ),
        (AUDIT_LANDLOCK_DOMAIN, ALLOC_300),
        (
            AUDIT_LANDLOCK_ACCESS,
            "audit(100.001:11): domain=aaa blockers=fs.remove_dir path=\"/backup\"",
        ),
    ]);
    let d = attribute(&records, 300, None);
    assert!(!d.landlock_count_final);
    assert_eq!(d.landlock_denials, 2);
    assert_eq!(d.gaps.len(), 1);
    assert!(d.gaps[0].contains("lower bound"));
    let (list, count) = d.report_fields();
    assert_eq!(
        list.map(|l| l.len()),
        Some(2),
        "what was seen is still reported"
    );
    assert_eq!(count, Some(2));
}

#[test]
fn no_denials_is_zero_only_when_complete() {
    let records = buffer(&[(
        AUDIT_LANDLOCK_DOMAIN,
        "audit(1.0:1): domain=1 status=deallocated denials=0",
    )]);
    let mut d = attribute(&records, 300, Some(5));
    assert!(d.domains.is_empty());
    assert!(
        d.landlock_count_final,
        "no domain was logged, so none is pending"
    );
    assert_eq!(d.report_fields(), (Some(vec![]), Some(0)));
    d.gaps.push("the sync marker did not come back".into());
    assert_eq!(
        d.report_fields(),
        (None, None),
        "unknown is never reported as zero"
    );
}

#[test]
fn seccomp_records_are_matched_on_the_session() {
    let records = buffer(&[
        (AUDIT_SECCOMP, "audit(5.000:1): auid=0 uid=0 gid=0 ses=42 pid=301 comm=\"mount\" exe=\"/usr/bin/mount\" sig=31 arch=c000003e syscall=165 compat=0 ip=0x1 code=0x80000000"),
        (AUDIT_SECCOMP, "audit(5.000:2): auid=0 uid=0 gid=0 ses=42 pid=302 comm=\"sh\" exe=\"/usr/bin/dash\" sig=0 arch=c000003e syscall=272 compat=0 ip=0x1 code=0x50001"),
        // Logged but allowed: not a denial.
        (AUDIT_SECCOMP, "audit(5.000:3): auid=0 uid=0 gid=0 ses=42 pid=302 comm=\"sh\" exe=\"/usr/bin/dash\" sig=0 arch=c000003e syscall=39 compat=0 ip=0x1 code=0x7ffc0000"),
        // Another session.
        (AUDIT_SECCOMP, "audit(5.000:4): auid=0 uid=0 gid=0 ses=43 pid=300 comm=\"x\" exe=\"/x\" sig=31 arch=c000003e syscall=165 compat=0 ip=0x1 code=0x80000000"),
    ]);
    let d = attribute(&records, 300, Some(42));
    assert_eq!(d.seccomp_denials, 2);
    assert_eq!(
        d.denial_list(),
        vec![
            denial("syscall.mount", None, Some("/usr/bin/mount")),
            denial("syscall.unshare", None, Some("/usr/bin/dash")),
        ]
    );
    // Without a session, only stage 2's own pid matches.
    let d = attribute(&records, 300, None);
    assert_eq!(
        d.denial_list(),
        vec![denial("syscall.mount", None, Some("/x"))]
    );
}

#[test]
fn syscall_records_add_exe_and_catch_nested_domains() {
    let records = buffer(&[
        (AUDIT_LANDLOCK_ACCESS, "audit(7.000:20): domain=aaa blockers=fs.remove_file path=\"/backup\""),
        (AUDIT_LANDLOCK_DOMAIN, "audit(7.000:20): domain=aaa status=allocated mode=enforcing pid=300 uid=0 exe=\"/a\" comm=\"a\""),
        (AUDIT_SYSCALL, "audit(7.000:20): arch=c000003e syscall=263 success=no exit=-13 ppid=300 pid=310 ses=42 comm=\"rm\" exe=\"/usr/bin/rm\""),
        // A domain the bundle created itself (pid 311 is the bundle's).
        (AUDIT_LANDLOCK_ACCESS, "audit(7.100:21): domain=ccc blockers=fs.write_file path=\"/etc/shadow\""),
        (AUDIT_LANDLOCK_DOMAIN, "audit(7.100:21): domain=ccc status=allocated mode=enforcing pid=311 uid=0 exe=\"/b\" comm=\"b\""),
        (AUDIT_SYSCALL, "audit(7.100:21): arch=c000003e syscall=257 success=no exit=-13 ppid=310 pid=311 ses=42 comm=\"b\" exe=\"/tmp/b\""),
        // Someone else's session.
        (AUDIT_LANDLOCK_ACCESS, "audit(7.200:22): domain=ddd blockers=fs.write_file path=\"/etc/hosts\""),
        (AUDIT_SYSCALL, "audit(7.200:22): arch=c000003e syscall=257 success=no exit=-13 ppid=1 pid=900 ses=7 comm=\"c\" exe=\"/c\""),
        (AUDIT_LANDLOCK_DOMAIN, "audit(7.300:23): domain=aaa status=deallocated denials=1"),
    ]);
    let d = attribute(&records, 300, Some(42));
    assert_eq!(
        d.denial_list(),
        vec![
            denial("fs.remove_file", Some("/backup"), Some("/usr/bin/rm")),
            denial("fs.write_file", Some("/etc/shadow"), Some("/tmp/b")),
        ]
    );
    assert_eq!(
        d.landlock_denials, 2,
        "1 from our domain's final count + 1 from the nested domain"
    );
    assert!(d.is_complete());
}

#[test]
fn distinct_denials_are_bounded() {
    let mut lines = vec![(AUDIT_LANDLOCK_DOMAIN, ALLOC_300.to_string())];
    for i in 0..300 {
        lines.push((
            AUDIT_LANDLOCK_ACCESS,
            format!(
                "audit(100.000:{}): domain=aaa blockers=fs.remove_file path=\"/backup/f{i}\"",
                100 + i
            ),
        ));
    }
    lines.push((
        AUDIT_LANDLOCK_ACCESS,
        "audit(100.000:999): domain=aaa blockers=fs.remove_file path=\"/backup/f0\"".into(),
    ));
    lines.push((
        AUDIT_LANDLOCK_DOMAIN,
        "audit(101.000:1000): domain=aaa status=deallocated denials=301".into(),
    ));
    let records: VecDeque<_> = lines.iter().map(|(t, s)| rec(*t, s)).collect();
    let d = attribute(&records, 300, None);
    assert_eq!(d.denials.len(), MAX_DISTINCT_DENIALS);
    assert_eq!(d.omitted_records, (300 - MAX_DISTINCT_DENIALS) as u64);
    assert_eq!(
        d.denials[0].records, 2,
        "repeats of a listed denial are still counted"
    );
    assert_eq!(d.total(), 301);
}

#[test]
fn buffer_drops_oldest_and_counts() {
    let mut b = Buffer::default();
    // A listener from the start: nothing is let go as no longer needed.
    b.cursors.insert(1, 0);
    for i in 0..(BUFFER_RECORDS + 5) {
        b.push(rec(
            AUDIT_LANDLOCK_DOMAIN,
            &format!("audit(1.0:{i}): domain=1 status=deallocated denials={i}"),
        ));
    }
    assert_eq!(b.records.len(), BUFFER_RECORDS);
    assert_eq!(b.dropped, 5);
    assert_eq!(b.dropped_through, Some(4));
    assert_eq!(b.first_seq, 5);
    assert_eq!(b.records.front().map(|r| r.event.serial), Some(5));
    assert_eq!(b.deallocated(1), Some(5), "first remaining record wins");
    assert_eq!(
        b.since(BUFFER_RECORDS as u64 + 3)
            .map(|r| r.event.serial)
            .collect::<Vec<_>>(),
        vec![BUFFER_RECORDS as u64 + 3, BUFFER_RECORDS as u64 + 4]
    );
}

#[test]
fn records_no_listener_needs_are_let_go() {
    let mut b = Buffer::default();
    let alloc = |i: u64| {
        rec(
            AUDIT_LANDLOCK_DOMAIN,
            &format!("audit(1.0:{i}): domain={i} status=deallocated denials=0"),
        )
    };
    // Nobody listening: nothing is kept.
    b.push(alloc(1));
    assert!(b.records.is_empty());
    assert_eq!(b.next_seq(), 1);
    // Listeners from sequence 1 and 2: records from 1 on are kept.
    b.cursors.insert(7, 1);
    b.push(alloc(2));
    b.cursors.insert(8, 2);
    b.push(alloc(3));
    assert_eq!(b.since(1).count(), 2);
    assert_eq!(
        b.since(2).map(|r| r.event.serial).collect::<Vec<_>>(),
        vec![3]
    );
    // The older listener goes: its record goes with it.
    b.cursors.remove(&7);
    b.prune();
    assert_eq!(b.first_seq, 2);
    assert_eq!(b.records.len(), 1);
    assert_eq!(b.dropped, 0, "letting go is not dropping");
}

#[test]
fn a_sync_marker_wakes_only_its_waiter() {
    let mut b = Buffer::default();
    let marker = format!("{MARKER_PREFIX}1-2");
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    b.marker_waiters.insert(marker.clone(), tx);
    let (other_tx, other_rx) = std::sync::mpsc::sync_channel(1);
    b.marker_waiters
        .insert(format!("{MARKER_PREFIX}1-3"), other_tx);
    b.push(rec(
        AUDIT_TRUSTED_APP,
        &format!("audit(2.0:1): pid=1 uid=0 auid=0 ses=1 msg='{marker}'"),
    ));
    assert!(rx.try_recv().is_ok());
    assert!(other_rx.try_recv().is_err());
    assert_eq!(b.marker_waiters.len(), 1);
    assert!(b.records.is_empty(), "markers are not kept");
    // A reader that fails wakes every waiter with an error.
    b.fail("gone".into());
    assert!(matches!(other_rx.recv(), Err(std::sync::mpsc::RecvError)));
}

#[test]
fn buffer_keeps_only_what_collection_can_use() {
    let mut b = Buffer::default();
    b.cursors.insert(1, 0);
    // Another application's trusted-app message, and SYSCALL records of
    // events without a Landlock denial (auditd rules on a busy host).
    b.push(rec(
        AUDIT_TRUSTED_APP,
        "audit(2.0:1): pid=1 uid=0 auid=0 ses=1 msg='op=login acct=root'",
    ));
    for i in 0..1000 {
        b.push(rec(
            AUDIT_SYSCALL,
            &format!("audit(3.0:{i}): arch=c000003e syscall=2 pid=5 ses=1 exe=\"/bin/x\""),
        ));
    }
    assert!(b.records.is_empty());
    // The SYSCALL record of a Landlock denial's event is kept.
    b.push(rec(
        AUDIT_LANDLOCK_ACCESS,
        "audit(4.0:7): domain=1 blockers=fs.remove_file path=\"/backup\"",
    ));
    b.push(rec(
        AUDIT_SYSCALL,
        "audit(4.0:8): arch=c000003e syscall=87 pid=5 ses=1 exe=\"/bin/rm\"",
    ));
    b.push(rec(
        AUDIT_SYSCALL,
        "audit(4.0:7): arch=c000003e syscall=87 pid=5 ses=1 exe=\"/bin/rm\"",
    ));
    let serials: Vec<_> = b.records.iter().map(|r| r.event.serial).collect();
    assert_eq!(serials, vec![7, 7]);
}

#[test]
fn refusals_seen_by_our_exit_rules_become_denials_with_their_path() {
    let sys = |serial: u32, nr: u32, a0: &str, ses: u32, key: &str| {
        format!("audit(200.000:{serial}): arch=c000003e syscall={nr} success=no exit=-30 a0={a0} a1=1 a2=2 a3=3 items=1 ppid=1 pid=301 auid=0 uid=0 gid=0 euid=0 suid=0 fsuid=0 egid=0 sgid=0 fsgid=0 tty=(none) ses={ses} comm=\"chmod\" exe=\"/usr/bin/chmod\" key={key}")
    };
    let records = [
        // chmod of a relative name: made absolute with the cwd.
        (
            AUDIT_SYSCALL,
            sys(1, 268, "ffffff9c", 7, "\"rollguard:erofs\""),
        ),
        (AUDIT_CWD, "audit(200.000:1): cwd=\"/srv\"".to_string()),
        (
            AUDIT_PATH,
            "audit(200.000:1): item=0 name=\"data/x\" inode=5 dev=fe:00 nametype=NORMAL"
                .to_string(),
        ),
        // unlinkat relative to a directory descriptor: named by inode.
        (AUDIT_SYSCALL, sys(2, 263, "5", 7, "\"rollguard:erofs\"")),
        (AUDIT_CWD, "audit(200.000:2): cwd=\"/srv\"".to_string()),
        (
            AUDIT_PATH,
            "audit(200.000:2): item=0 name=\"/srv\" inode=77 dev=fe:00 nametype=PARENT".to_string(),
        ),
        // Another session, and a record no rule of ours asked for.
        (
            AUDIT_SYSCALL,
            sys(3, 268, "ffffff9c", 8, "\"rollguard:erofs\""),
        ),
        (AUDIT_SYSCALL, sys(4, 268, "ffffff9c", 7, "(null)")),
    ];
    let records: Vec<AuditRecord> = records.iter().map(|(t, s)| rec(*t, s)).collect();
    let out = attribute(&records, 301, Some(7));
    assert_eq!(out.syscall_exit_denials, 2);
    assert_eq!(out.total(), 2);
    assert_eq!(
        out.denial_list(),
        vec![
            denial(
                "erofs.fchmodat",
                Some("/srv/data/x"),
                Some("/usr/bin/chmod")
            ),
            denial(
                "erofs.unlinkat",
                Some("an entry in the directory open as descriptor 5 (inode 77 on device fe:00)"),
                Some("/usr/bin/chmod")
            ),
        ]
    );
    // The buffer keeps them (and their names), not other SYSCALL records.
    let mut b = Buffer::default();
    b.cursors.insert(0, 0);
    for r in records {
        b.push(r);
    }
    assert_eq!(b.records.len(), 7);
}
