//! Process-level confinement: seccomp, capabilities, no_new_privs, the
//! minimal /dev and unix-socket escapes, observed from inside a run.

mod sandbox_support;

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::os::unix::net::UnixListener;

use sandbox_support::Tree;

/// Each dangerous syscall, called with harmless arguments from python3's
/// ctypes, must fail with EPERM (not ENOSYS, not success). x86_64 numbers.
const SYSCALL_PROBE: &str = r#"
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
buf = ctypes.create_string_buffer(4096)
def call(nr, *args):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    if r == 0 and nr in (56,):
        os._exit(0)  # a clone that succeeded: the child leaves at once
    return 0 if r >= 0 else ctypes.get_errno()
S_IFBLK, S_IFCHR = 0o060000, 0o020000
results = {
    "mount": call(165, b"none", b"/mnt", b"tmpfs", 0, None),
    "umount2": call(166, b"/proc", 2),
    "pivot_root": call(155, b"/tmp", b"/tmp"),
    "chroot": call(161, b"/tmp"),
    "mknod_block": call(133, b"/tmp/sda", S_IFBLK | 0o600, (8 << 8) | 0),
    "mknodat_char": call(259, -100, b"/tmp/mem", S_IFCHR | 0o600, (1 << 8) | 1),
    "io_uring_setup": call(425, 1, buf),
    "ptrace_traceme": call(101, 0, 0, 0, 0),
    "bpf": call(321, 0, buf, 128),
    "perf_event_open": call(298, buf, 0, -1, -1, 0),
    "kexec_load": call(246, 0, 0, None, 0),
    "init_module": call(175, buf, 16, b""),
    "finit_module": call(313, 0, b"", 0),
    "delete_module": call(176, b"nonexistent", 0),
    "unshare_user": call(272, 0x10000000),
    "unshare_mount": call(272, 0x00020000),
    "setns": call(308, 0, 0),
    "clone_newuser": call(56, 0x10000000 | 17, 0, 0, 0, 0),
    "keyctl": call(250, 0, -3, 0),
    "landlock_create_ruleset": call(444, None, 0, 1),
    "landlock_add_rule": call(445, -1, 1, buf, 0),
    "landlock_restrict_self": call(446, -1, 0),
    "add_key": call(248, b"user", b"k", b"v", 1, -3),
    "userfaultfd": call(323, 0),
    "open_by_handle_at": call(304, -100, buf, 0),
    "name_to_handle_at": call(303, -100, b"/", buf, buf, 0),
    "process_vm_readv": call(310, 1, buf, 1, buf, 1, 0),
    "fsopen": call(430, b"tmpfs", 0),
    "open_tree": call(428, -100, b"/", 1),
    "swapon": call(167, b"/nonexistent", 0),
    "reboot": call(169, 0, 0, 0, None),
    "settimeofday": call(164, None, None),
    "syslog": call(103, 3, buf, 16),
    "acct": call(163, None),
    "chmod_setuid": call(90, b"/tmp/f", 0o4755),
    "fchmodat_setgid": call(268, -100, b"/tmp/f", 0o2755),
    "open_creat_setuid": call(2, b"/tmp/suid", os.O_CREAT | os.O_WRONLY, 0o4755),
    "x32_getpid": call(0x40000000 | 39),
    "ioctl_tiocsti": call(16, 0, 0x5412, buf),
    "ioctl_tioclinux": call(16, 0, 0x541C, buf),
}
import socket
def sock(family, kind, proto=0):
    try:
        socket.socket(family, kind, proto).close()
        return 0
    except OSError as e:
        return e.errno
results["socket_unix"] = sock(socket.AF_UNIX, socket.SOCK_STREAM)
results["socket_vsock"] = sock(40, socket.SOCK_STREAM)
results["socket_packet"] = sock(17, socket.SOCK_RAW)
results["socket_netlink_audit"] = sock(16, socket.SOCK_RAW, 9)
results["socket_netlink_uevent"] = sock(16, socket.SOCK_DGRAM, 15)
extra = {
    "clone3": call(435, buf, 88),
    "openat2": call(437, -100, b"/tmp/x", buf, 24),
    "socket_netlink_route": sock(16, socket.SOCK_RAW, 0),
    "socket_inet": sock(socket.AF_INET, socket.SOCK_STREAM),
    "socketpair_unix": (lambda: (socket.socketpair(), 0)[1])(),
    "chmod_plain": (open("/tmp/f", "w").close(), call(90, b"/tmp/f", 0o640))[1],
    "setuid_file_exists": int(os.path.exists("/tmp/suid")),
}
print("RESULTS=" + json.dumps(results))
print("EXTRA=" + json.dumps(extra))
"#;

fn parse(json: &str) -> BTreeMap<String, i64> {
    serde_json::from_str(json).unwrap()
}

#[cfg(target_arch = "x86_64")]
#[test]
fn dangerous_syscalls_fail_with_eperm() {
    let t = Tree::new();
    let mut spec = t.spec("");
    spec.command = vec!["/usr/bin/python3".into(), "-c".into(), SYSCALL_PROBE.into()];
    let run = t.run(&spec);
    assert_eq!(run.exit_code(), 0, "{}", run.stderr);
    let results = parse(&run.value("RESULTS"));
    assert!(results.len() > 30);
    for (name, errno) in &results {
        assert_eq!(
            *errno,
            libc::EPERM as i64,
            "{name} returned errno {errno}, expected EPERM"
        );
    }
    let extra = parse(&run.value("EXTRA"));
    // clone3/openat2 answer ENOSYS so libc falls back to checkable calls.
    assert_eq!(extra["clone3"], libc::ENOSYS as i64);
    assert_eq!(extra["openat2"], libc::ENOSYS as i64);
    // What stays allowed.
    assert_eq!(extra["socket_netlink_route"], 0);
    assert_eq!(extra["socket_inet"], 0);
    assert_eq!(extra["socketpair_unix"], 0);
    assert_eq!(extra["chmod_plain"], 0);
    assert_eq!(extra["setuid_file_exists"], 0);
}

#[test]
fn capabilities_no_new_privs_and_seccomp_are_in_force() {
    let t = Tree::new();
    let run = t.sh("grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status | tr -d '\\t' | sed 's/:/=/'; id -u | sed 's/^/uid=/'");
    assert_eq!(run.exit_code(), 0, "{}", run.stderr);
    let keep = format!(
        "{:016x}",
        rollguard_agent::sandbox::capabilities::keep_mask()
    );
    assert_eq!(keep, "00000000000004fb");
    assert_eq!(run.value("CapBnd"), keep);
    assert_eq!(run.value("CapPrm"), keep);
    assert_eq!(run.value("CapEff"), keep);
    assert_eq!(run.value("CapInh"), "0000000000000000");
    assert_eq!(run.value("CapAmb"), "0000000000000000");
    assert_eq!(run.value("NoNewPrivs"), "1");
    assert_eq!(run.value("Seccomp"), "2");
    assert_eq!(run.value("uid"), "0");
}

#[test]
fn dev_has_no_block_devices_and_disks_cannot_be_written() {
    let t = Tree::new();
    let run = t.sh("echo dev=$(ls /dev | tr '\\n' ' '); \
         echo blocks=$(find /dev -type b | wc -l); \
         printf x > /dev/sda 2>/dev/null; echo sda=$?; \
         printf x > /dev/vda 2>/dev/null; echo vda=$?; \
         mknod /tmp/sda b 8 0 2>/dev/null; echo mknod=$?; \
         printf x > /dev/null; echo null=$?; \
         head -c 8 /dev/urandom | wc -c | sed 's/^/urandom=/'");
    assert_eq!(
        run.value("dev"),
        "fd full null random shm stderr stdin stdout tty urandom zero"
    );
    assert_eq!(run.value("blocks"), "0");
    assert_ne!(run.value("sda"), "0");
    assert_ne!(run.value("vda"), "0");
    assert_ne!(run.value("mknod"), "0");
    assert_eq!(run.value("null"), "0");
    assert_eq!(run.value("urandom"), "8");
}

#[test]
fn threads_still_work_through_the_clone3_fallback() {
    let t = Tree::new();
    let mut spec = t.spec("");
    spec.command = vec![
        "/usr/bin/python3".into(),
        "-c".into(),
        "import threading\nout=[]\nts=[threading.Thread(target=out.append, args=(i,)) for i in range(8)]\n\
         [x.start() for x in ts]\n[x.join() for x in ts]\nprint('threads=%d' % len(out))"
            .into(),
    ];
    let run = t.run(&spec);
    assert_eq!(run.value("threads"), "8", "{}", run.stderr);
}

#[test]
fn unix_socket_escapes_are_blocked() {
    let t = Tree::new();
    // A pathname unix socket listening outside the sandbox, in reach of the
    // path (the tree is readable), e.g. like /run/systemd/private.
    let sock_path = t.p("other/agent.sock");
    let listener = UnixListener::bind(&sock_path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let marker = t.p("spool/tmp/escaped");
    let script = format!(
        "python3 -c \"import socket,sys\ntry:\n  s=socket.socket(socket.AF_UNIX); s.connect('{sock}'); s.send(b'hi'); print('connect=ok')\n\
         except OSError as e:\n  print('connect=%d' % e.errno)\"; \
         systemd-run --wait --quiet /bin/sh -c 'touch {marker}' >/dev/null 2>&1; echo systemd_run=$?; \
         /usr/bin/systemctl start nonexistent.service >/dev/null 2>&1; echo systemctl=$?; \
         test -e /run/systemd/private; echo private_socket_visible=$?; \
         test -e /run/dbus/system_bus_socket; echo dbus_visible=$?",
        sock = sock_path.display(),
        marker = marker.display()
    );
    let run = t.sh(&script);
    assert_eq!(run.value("connect"), libc::EPERM.to_string());
    assert_ne!(run.value("systemd_run"), "0");
    // The real systemctl, by its path: a bare `systemctl` is the capture
    // shim first on PATH (docs/services.md), which records and succeeds.
    assert_ne!(run.value("systemctl"), "0");
    assert_eq!(run.value("private_socket_visible"), "1");
    assert_eq!(run.value("dbus_visible"), "1");
    assert!(
        !marker.exists(),
        "systemd-run ran a command outside the sandbox"
    );
    match listener.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("the unix listener outside the sandbox got a connection: {other:?}"),
    }
}

#[test]
fn environment_is_clean() {
    let t = Tree::new();
    let mut spec = t.spec("env | sort");
    spec.env.insert("ROLLGUARD_BUNDLE".into(), "demo".into());
    let run = t.run(&spec);
    let names: Vec<&str> = run
        .stdout
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    // /bin/sh adds PWD itself.
    assert_eq!(
        names,
        [
            "HOME",
            "LANG",
            "PATH",
            "PWD",
            "ROLLGUARD_BUNDLE",
            "ROLLGUARD_PAYLOAD_DIR",
            "ROLLGUARD_RUN_ID",
            "TMPDIR"
        ],
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains(&format!("PWD={}", t.s("payload"))));
}

#[test]
fn stdio_can_be_reopened_by_path() {
    let t = Tree::new();
    let run = t.sh("echo to-stderr > /dev/stderr; echo err=$?; cat /dev/stdin; echo in=$?");
    assert_eq!(run.value("err"), "0");
    assert_eq!(run.value("in"), "0");
    assert_eq!(run.stderr, "to-stderr\n");
}

#[test]
fn host_processes_cannot_be_signalled_or_inspected() {
    let t = Tree::new();
    let mut host = std::process::Command::new("sleep")
        .arg("1006")
        .env("ROLLGUARD_TEST_SECRET", "hunter2")
        .spawn()
        .unwrap();
    let pid = host.id();
    let run = t.sh(&format!(
        "kill -TERM {pid} 2>/dev/null; echo kill=$?; kill -0 {pid} 2>/dev/null; echo probe=$?; \
         cat /proc/{pid}/environ > /dev/null 2>&1; echo environ=$?; \
         ls -l /proc/{pid}/root/ > /dev/null 2>&1; echo root=$?"
    ));
    assert_ne!(run.value("kill"), "0");
    assert_ne!(run.value("probe"), "0");
    assert_ne!(run.value("environ"), "0");
    assert_ne!(run.value("root"), "0");
    assert!(
        host.try_wait().unwrap().is_none(),
        "the host process was killed from inside the sandbox"
    );
    host.kill().unwrap();
    host.wait().unwrap();
}
