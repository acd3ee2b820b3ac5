use super::*;
use proptest::prelude::*;

fn parse(ty: u16, text: &str) -> AuditRecord {
    parse_record(ty, text).unwrap().unwrap()
}

fn access(text: &str) -> LandlockAccess {
    match parse(AUDIT_LANDLOCK_ACCESS, text).body {
        RecordBody::LandlockAccess(a) => a,
        other => panic!("unexpected {other:?}"),
    }
}

// Examples below are copied from Documentation/admin-guide/LSM/landlock.rst
// (Linux 6.15+) unless noted; the `type=… msg=` prefix is what auditd adds,
// the netlink text starts at `audit(`.

#[test]
fn landlock_access_with_path() {
    let r = parse(
        AUDIT_LANDLOCK_ACCESS,
        "audit(1729738800.221:34): domain=1a6fdc679 blockers=fs.write_file path=\"/etc/passwd\" dev=\"vda2\" ino=143821",
    );
    assert_eq!(
        r.event,
        EventId {
            secs: 1729738800,
            millis: 221,
            serial: 34
        }
    );
    let RecordBody::LandlockAccess(a) = r.body else {
        panic!()
    };
    assert_eq!(a.domain, 0x1a6fdc679);
    assert_eq!(a.blockers, vec!["fs.write_file"]);
    assert_eq!(a.path.as_deref(), Some("/etc/passwd"));
    assert_eq!(a.dev.as_deref(), Some("vda2"));
    assert_eq!(a.ino, Some(143821));
    assert_eq!(a.object().as_deref(), Some("/etc/passwd"));
}

#[test]
fn landlock_access_with_several_blockers() {
    let a = access(
        "audit(1729738800.221:40): domain=195ba459b blockers=fs.make_reg,fs.refer path=\"/usr/local\" dev=\"vda2\" ino=365",
    );
    assert_eq!(a.blockers, vec!["fs.make_reg", "fs.refer"]);
    assert_eq!(a.object().as_deref(), Some("/usr/local"));
}

#[test]
fn landlock_access_signal_scope() {
    let a = access(
        "audit(1729738800.268:30): domain=1a6fdc66f blockers=scope.signal opid=1 ocomm=\"systemd\"",
    );
    assert_eq!(a.blockers, vec!["scope.signal"]);
    assert_eq!(a.opid, Some(1));
    assert_eq!(a.ocomm.as_deref(), Some("systemd"));
    assert_eq!(a.object().as_deref(), Some("pid 1 (systemd)"));
}

#[test]
fn landlock_access_network() {
    // security/lsm_audit.c print_ipv4_addr / print_ipv6_addr: address and
    // port are each omitted when zero.
    let a =
        access("audit(1.000:1): domain=195ba459b blockers=net.connect_tcp daddr=127.0.0.1 dest=80");
    assert_eq!(a.object().as_deref(), Some("127.0.0.1:80"));
    let a = access("audit(1.000:1): domain=195ba459b blockers=net.bind_tcp src=8080");
    assert_eq!(a.object().as_deref(), Some("*:8080"));
    let a = access(
        "audit(1.000:1): domain=195ba459b blockers=net.connect_tcp daddr=2001:db8::1 dest=443",
    );
    assert_eq!(a.object().as_deref(), Some("[2001:db8::1]:443"));
}

#[test]
fn landlock_access_dentry_and_no_object() {
    let a = access(
        "audit(1.000:1): domain=1 blockers=fs.change_topology name=\"x\" dev=\"tmpfs\" ino=7",
    );
    assert_eq!(a.object().as_deref(), Some("x"));
    let a = access("audit(1.000:1): domain=1 blockers=ptrace opid=0");
    assert_eq!(a.object().as_deref(), Some("pid 0"));
    let a = access("audit(1.000:1): domain=1 blockers=fs.execute");
    assert_eq!(a.object(), None);
}

#[test]
fn untrusted_strings_in_hex_are_decoded() {
    // audit_log_n_untrustedstring: a string with a space, quote, control or
    // non-ASCII byte is logged as upper-case hex without quotes.
    let a = access(&format!(
        "audit(1.000:1): domain=1 blockers=fs.remove_file path={} dev=\"vda\" ino=5",
        hex::encode_upper("/backup/my file")
    ));
    assert_eq!(a.path.as_deref(), Some("/backup/my file"));
    let a = access(&format!(
        "audit(1.000:1): domain=1 blockers=fs.remove_file path={}",
        hex::encode_upper("/srv/\"quoted\"\n")
    ));
    assert_eq!(a.path.as_deref(), Some("/srv/\"quoted\"\n"));
    // Non-UTF-8 bytes survive lossily rather than failing the record.
    let a = access("audit(1.000:1): domain=1 blockers=fs.remove_file path=2F78FF");
    assert_eq!(a.path.as_deref(), Some("/x\u{fffd}"));
    // audit_log_d_path failures are written literally.
    let a = access("audit(1.000:1): domain=1 blockers=fs.read_file path=<too_long>");
    assert_eq!(a.path.as_deref(), Some("<too_long>"));
    // An abstract UNIX socket name (lsm_audit.c: audit_log_n_hex of sun_path).
    let a = access("audit(1.000:1): domain=1 blockers=scope.abstract_unix_socket path=00616263");
    assert_eq!(a.path.as_deref(), Some("@abc"));
}

#[test]
fn a_path_cannot_inject_fields() {
    // A file named `x domain=2 path="/etc"` is logged in hex, so the
    // kernel's own fields are the first ones and win.
    let evil = hex::encode_upper("/tmp/x domain=2 path=\"/etc\"");
    let a = access(&format!(
        "audit(1.000:1): domain=1 blockers=fs.remove_file path={evil} dev=\"vda\" ino=1"
    ));
    assert_eq!(a.domain, 1);
    assert_eq!(a.path.as_deref(), Some("/tmp/x domain=2 path=\"/etc\""));
}

#[test]
fn landlock_domain_records() {
    let r = parse(
        AUDIT_LANDLOCK_DOMAIN,
        "audit(1729738800.268:30): domain=1a6fdc66f status=allocated mode=enforcing pid=286 uid=0 exe=\"/root/sandboxer\" comm=\"sandboxer\"",
    );
    assert_eq!(
        r.body,
        RecordBody::LandlockDomain(LandlockDomain::Allocated {
            domain: 0x1a6fdc66f,
            mode: Some("enforcing".into()),
            pid: 286,
            uid: Some(0),
            exe: Some("/root/sandboxer".into()),
            comm: Some("sandboxer".into()),
        })
    );
    let r = parse(
        AUDIT_LANDLOCK_DOMAIN,
        "audit(1729738800.324:31): domain=1a6fdc66f status=deallocated denials=1",
    );
    assert_eq!(r.event.serial, 31);
    assert_eq!(
        r.body,
        RecordBody::LandlockDomain(LandlockDomain::Deallocated {
            domain: 0x1a6fdc66f,
            denials: 1
        })
    );
    // An exe path with a space is hex.
    let r = parse(
        AUDIT_LANDLOCK_DOMAIN,
        &format!(
            "audit(1.000:2): domain=5 status=allocated mode=enforcing pid=7 uid=0 exe={} comm=\"x\"",
            hex::encode_upper("/opt/my agent")
        ),
    );
    let RecordBody::LandlockDomain(LandlockDomain::Allocated { exe, .. }) = r.body else {
        panic!()
    };
    assert_eq!(exe.as_deref(), Some("/opt/my agent"));
}

#[test]
fn seccomp_records() {
    // kernel/auditsc.c audit_seccomp; the shape matches records in
    // Documentation/userspace-api/seccomp_filter.rst-era logs.
    let r = parse(
        AUDIT_SECCOMP,
        "audit(1389110883.180:1234): auid=4294967295 uid=0 gid=0 ses=42 subj=unconfined pid=9422 comm=\"mkdir\" exe=\"/usr/bin/mkdir\" sig=31 arch=c000003e syscall=83 compat=0 ip=0x7f3c5f2e1b47 code=0x80000000",
    );
    let RecordBody::Seccomp(s) = r.body else {
        panic!()
    };
    assert_eq!(s.auid, None);
    assert_eq!(s.uid, Some(0));
    assert_eq!(s.ses, Some(42));
    assert_eq!(s.pid, 9422);
    assert_eq!(s.exe.as_deref(), Some("/usr/bin/mkdir"));
    assert_eq!(s.sig, 31);
    assert_eq!(s.arch, 0xc000_003e);
    assert_eq!(s.action(), SeccompAction::KillProcess);
    assert!(s.is_denial());
    assert_eq!(s.access(), "syscall.mkdir");

    let r = parse(
        AUDIT_SECCOMP,
        "audit(1.000:5): auid=0 uid=0 gid=0 ses=4294967295 pid=3 comm=\"x\" exe=\"/x\" sig=0 arch=c00000b7 syscall=40 compat=0 ip=0xffff code=0x50001",
    );
    let RecordBody::Seccomp(s) = r.body else {
        panic!()
    };
    assert_eq!(s.ses, None);
    assert_eq!(s.action(), SeccompAction::Errno(1));
    assert_eq!(s.access(), "syscall.mount");

    let log = parse(
        AUDIT_SECCOMP,
        "audit(1.000:6): auid=0 uid=0 gid=0 ses=1 pid=3 comm=\"x\" exe=(null) sig=0 arch=c000003e syscall=999 compat=0 ip=0x1 code=0x7ffc0000",
    );
    let RecordBody::Seccomp(s) = log.body else {
        panic!()
    };
    assert_eq!(s.exe, None);
    assert_eq!(s.action(), SeccompAction::Log);
    assert!(!s.is_denial());
    assert_eq!(s.access(), "syscall.999");

    // A 32-bit compat call is not looked up in the 64-bit table.
    let compat = parse(
        AUDIT_SECCOMP,
        "audit(1.000:7): auid=0 uid=0 gid=0 ses=1 pid=3 comm=\"x\" exe=\"/x\" sig=0 arch=40000003 syscall=21 compat=1 ip=0x1 code=0x30000",
    );
    let RecordBody::Seccomp(s) = compat.body else {
        panic!()
    };
    assert_eq!(s.action(), SeccompAction::Trap);
    assert_eq!(s.access(), "syscall.21");
}

#[test]
fn syscall_and_user_records() {
    let r = parse(
        AUDIT_SYSCALL,
        "audit(1729738800.221:33): arch=c000003e syscall=257 success=no exit=-13 a0=ffffff9c a1=55d1 a2=241 a3=1b6 items=0 ppid=272 pid=289 auid=0 uid=0 gid=0 euid=0 suid=0 fsuid=0 egid=0 sgid=0 fsgid=0 tty=pts0 ses=1 comm=\"sh\" exe=\"/usr/bin/dash\" key=(null)",
    );
    assert_eq!(
        r.body,
        RecordBody::Syscall(SyscallRecord {
            pid: Some(289),
            ses: Some(1),
            exe: Some("/usr/bin/dash".into()),
            comm: Some("sh".into()),
            arch: Some(0xc000_003e),
            syscall: Some(257),
            exit: Some(-13),
            key: None,
            a0: Some(0xffffff9c),
        })
    );
    let r = parse(
        AUDIT_SYSCALL,
        "audit(1729738800.221:40): arch=c000003e syscall=268 success=no exit=-30 a0=ffffff9c a1=55d1 a2=0 a3=0 items=1 ppid=272 pid=290 auid=0 uid=0 gid=0 euid=0 suid=0 fsuid=0 egid=0 sgid=0 fsgid=0 tty=(none) ses=7 comm=\"chmod\" exe=\"/usr/bin/chmod\" key=\"rollguard:erofs\"",
    );
    let RecordBody::Syscall(s) = r.body else {
        panic!("{r:?}")
    };
    assert_eq!(
        (s.exit, s.syscall, s.key.as_deref()),
        (Some(-30), Some(268), Some("rollguard:erofs"))
    );
    let r = parse(
        AUDIT_PATH,
        "audit(1729738800.221:40): item=0 name=\"../other/notes.txt\" inode=1234 dev=fe:00 mode=0100644 ouid=0 ogid=0 rdev=00:00 nametype=NORMAL cap_fp=0 cap_fi=0 cap_fe=0 cap_fver=0 cap_frootid=0",
    );
    assert_eq!(
        r.body,
        RecordBody::Path(PathRecord {
            item: 0,
            name: Some("../other/notes.txt".into()),
            inode: Some(1234),
            dev: Some("fe:00".into()),
            nametype: Some("NORMAL".into()),
        })
    );
    let r = parse(
        AUDIT_PATH,
        "audit(1.0:4): item=0 name=(null) inode=9 dev=00:1f nametype=UNKNOWN",
    );
    assert!(matches!(
        r.body,
        RecordBody::Path(PathRecord {
            name: None,
            inode: Some(9),
            ..
        })
    ));
    let r = parse(AUDIT_CWD, "audit(1.0:4): cwd=2F7661722F6C6962");
    assert_eq!(
        r.body,
        RecordBody::Cwd {
            cwd: Some("/var/lib".into())
        }
    );
    let r = parse(
        AUDIT_TRUSTED_APP,
        "audit(1.002:3): pid=1 uid=0 auid=4294967295 ses=4294967295 subj=unconfined msg='rollguard-agent audit sync 00ff'",
    );
    assert_eq!(
        r.body,
        RecordBody::User {
            msg: Some("rollguard-agent audit sync 00ff".into())
        }
    );
}

#[test]
fn other_types_are_ignored_and_bad_records_are_errors() {
    assert_eq!(
        parse_record(1327, "audit(1.0:1): proctitle=6B696C6C0031"),
        Ok(None)
    );
    assert_eq!(
        parse_record(AUDIT_LANDLOCK_ACCESS, "domain=1 blockers=x"),
        Err(AuditRecordError::NoHeader)
    );
    assert_eq!(
        parse_record(AUDIT_LANDLOCK_ACCESS, "audit(1.0:1): blockers=x"),
        Err(AuditRecordError::Field(AUDIT_LANDLOCK_ACCESS, "domain"))
    );
    assert_eq!(
        parse_record(AUDIT_LANDLOCK_ACCESS, "audit(1.0:1): domain=zz blockers=x"),
        Err(AuditRecordError::Field(AUDIT_LANDLOCK_ACCESS, "domain"))
    );
    assert_eq!(
        parse_record(AUDIT_LANDLOCK_DOMAIN, "audit(1.0:1): domain=1 status=weird"),
        Err(AuditRecordError::Field(AUDIT_LANDLOCK_DOMAIN, "status"))
    );
    assert_eq!(
        parse_record(
            AUDIT_LANDLOCK_DOMAIN,
            "audit(1.0:1): domain=1 status=deallocated"
        ),
        Err(AuditRecordError::Field(AUDIT_LANDLOCK_DOMAIN, "denials"))
    );
    assert_eq!(
        parse_record(AUDIT_SECCOMP, "audit(1.0:1): pid=1"),
        Err(AuditRecordError::Field(AUDIT_SECCOMP, "arch"))
    );
    assert_eq!(
        parse_record(AUDIT_SECCOMP, "audit(x.0:1): pid=1"),
        Err(AuditRecordError::NoHeader)
    );
    // Trailing NULs and newlines (some kernels pad) are tolerated.
    let r = parse(
        AUDIT_LANDLOCK_DOMAIN,
        "audit(1.0:1): domain=a status=deallocated denials=2\n\0\0",
    );
    assert_eq!(
        r.body,
        RecordBody::LandlockDomain(LandlockDomain::Deallocated {
            domain: 10,
            denials: 2
        })
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn never_panics_on_arbitrary_text(
        ty in prop::sample::select(vec![AUDIT_SYSCALL, AUDIT_SECCOMP, AUDIT_LANDLOCK_ACCESS, AUDIT_LANDLOCK_DOMAIN, AUDIT_TRUSTED_APP, 1]),
        text in "\\PC{0,200}",
    ) {
        let _ = parse_record(ty, &text);
        let _ = parse_record(ty, &format!("audit(1.2:3): {text}"));
    }

    /// Field-shaped noise: many keys the parser knows, odd quoting, hex.
    #[test]
    fn never_panics_on_field_soup(
        ty in prop::sample::select(vec![AUDIT_SYSCALL, AUDIT_SECCOMP, AUDIT_LANDLOCK_ACCESS, AUDIT_LANDLOCK_DOMAIN, AUDIT_TRUSTED_APP]),
        fields in prop::collection::vec(
            (prop::sample::select(vec!["domain", "blockers", "path", "status", "pid", "denials", "arch", "syscall", "code", "ses", "exe", "msg", "dest", "opid"]),
             "[\"'=0-9A-Fa-fx,. ()<>\u{0}-]{0,12}"),
            0..10),
    ) {
        let body: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let text = format!("audit(1.2:3): {}", body.join(" "));
        if let Ok(Some(r)) = parse_record(ty, &text) {
            prop_assert_eq!(r.event.serial, 3);
            if let RecordBody::LandlockAccess(a) = r.body {
                let _ = a.object();
            }
        }
    }
}
