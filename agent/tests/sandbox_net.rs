//! Network confinement: no network scope means no reachable host
//! listener; a network scope allows exactly its protocol, address and port
//! (the run cgroup's BPF programs, with Landlock's TCP port rules and
//! seccomp's socket-type rules behind them). Every test brings its own
//! listeners, on loopback only, and checks they received nothing they
//! should not have.

mod sandbox_support;

use std::io::{ErrorKind, Read};
use std::net::{TcpListener, UdpSocket};
use std::time::Duration;

use rollguard_agent::sandbox::net_scope;
use rollguard_agent::sandbox::{FilterDenial, NetRule, RunOutcome};
use rollguard_shared::endpoint::NetworkEndpoint;
use sandbox_support::Tree;

const EPERM: i32 = libc::EPERM;
const EACCES: i32 = libc::EACCES;

fn rules(entries: &[String]) -> Vec<NetRule> {
    let endpoints: Vec<NetworkEndpoint> = entries
        .iter()
        .map(|e| NetworkEndpoint::parse(e).unwrap())
        .collect();
    net_scope::resolve(&endpoints, net_scope::system_lookup)
        .unwrap()
        .rules
}

/// Python helpers printed as `name=ok` or `name=<errno>`.
const PY_PRELUDE: &str = r#"
import socket, errno
def attempt(name, f):
    try:
        f(); print(name + '=ok')
    except OSError as e:
        print('%s=%s' % (name, e.errno))
def tcp(host, port, family=socket.AF_INET):
    s = socket.socket(family, socket.SOCK_STREAM); s.settimeout(5)
    s.connect((host, port)); s.sendall(b'hello'); s.close()
def udp_send(host, port, family=socket.AF_INET):
    s = socket.socket(family, socket.SOCK_DGRAM); s.sendto(b'hello', (host, port)); s.close()
def udp_connect(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect((host, port)); s.send(b'hello'); s.close()
def bind(kind, host, port, family=socket.AF_INET):
    s = socket.socket(family, kind); s.bind((host, port)); s.close()
def fastopen(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM); s.settimeout(5)
    s.sendto(b'hello', socket.MSG_FASTOPEN, (host, port)); s.close()
"#;

fn python(t: &Tree, network: Vec<NetRule>, body: &str) -> sandbox_support::Run {
    let mut spec = t.spec("");
    spec.scope.network = network;
    spec.command = vec![
        "/usr/bin/python3".into(),
        "-c".into(),
        format!("{PY_PRELUDE}\n{body}"),
    ];
    t.run(&spec)
}

fn tcp_listener(addr: &str) -> (TcpListener, u16) {
    let l = TcpListener::bind(addr).unwrap();
    l.set_nonblocking(true).unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

fn udp_listener(addr: &str) -> (UdpSocket, u16) {
    let s = UdpSocket::bind(addr).unwrap();
    s.set_nonblocking(true).unwrap();
    let port = s.local_addr().unwrap().port();
    (s, port)
}

fn assert_never_accepted(l: &TcpListener, what: &str) {
    match l.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("{what}: the host listener got a connection: {other:?}"),
    }
}

fn assert_no_datagram(s: &UdpSocket, what: &str) {
    let mut buf = [0u8; 64];
    match s.recv_from(&mut buf) {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("{what}: the host listener got a datagram: {other:?}"),
    }
}

/// The allowed connection really reached the host listener.
fn assert_received_hello(l: &TcpListener) {
    l.set_nonblocking(false).unwrap();
    let (mut conn, _) = l.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut got = Vec::new();
    conn.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"hello");
}

fn assert_datagram(s: &UdpSocket) {
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = s.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello");
}

fn filter_denials(outcome: &RunOutcome) -> Vec<FilterDenial> {
    outcome
        .filter_denials
        .clone()
        .expect("the cgroup filters' denials must be readable")
        .records
}

fn denied(outcome: &RunOutcome, access: &str, object: &str) -> bool {
    filter_denials(outcome)
        .iter()
        .any(|d| d.access == access && d.object == object)
}

#[test]
fn without_network_scope_host_listeners_are_unreachable() {
    let t = Tree::new();
    let (l, port) = tcp_listener("127.0.0.1:0");
    let run = python(
        &t,
        vec![],
        &format!("attempt('tcp', lambda: tcp('127.0.0.1', {port}))"),
    );
    assert_ne!(run.value("tcp"), "ok");
    assert_never_accepted(&l, "no-network run");
    let confinement = run.outcome.confinement.expect("confinement reported");
    assert!(confinement.private_network);
    assert!(confinement.tcp_connect_ports.is_empty());

    // Inside: a private namespace with only a loopback interface, up.
    let run = t.sh("cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' ' | tr '\\n' ' ' | sed 's/^/ifaces=/'; echo; \
                    cat /sys/class/net/lo/operstate /sys/class/net/lo/flags | tr '\\n' ' ' | sed 's/^/lo=/'; echo");
    assert_eq!(run.value("ifaces").trim(), "lo");
    // IFF_UP (0x1) is set on lo.
    let flags = run.value("lo");
    let flags = flags.split_whitespace().nth(1).unwrap();
    assert_eq!(
        u32::from_str_radix(flags.trim_start_matches("0x"), 16).unwrap() & 1,
        1,
        "lo is down: {flags}"
    );
}

/// With `tcp:127.0.0.1:A` only: TCP to A works; every other way out is
/// refused, reported with its address and port, and reaches nobody.
#[test]
fn tcp_scope_allows_only_its_address_and_port() {
    let t = Tree::new();
    let (allowed, a) = tcp_listener("127.0.0.1:0");
    let (other_port, b) = tcp_listener("127.0.0.1:0");
    // The allowed port on another loopback address.
    let (other_addr, _) = tcp_listener(&format!("127.0.0.2:{a}"));
    let (udp, u) = udp_listener("127.0.0.1:0");
    let body = format!(
        r#"
attempt('allowed', lambda: tcp('127.0.0.1', {a}))
attempt('other_port', lambda: tcp('127.0.0.1', {b}))
attempt('other_addr', lambda: tcp('127.0.0.2', {a}))
attempt('fastopen_other_addr', lambda: fastopen('127.0.0.2', {a}))
attempt('mapped_other_addr', lambda: tcp('::ffff:127.0.0.2', {a}, socket.AF_INET6))
attempt('mptcp', lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262))
attempt('mptcp6', lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM, 262))
attempt('sctp', lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM, 132))
attempt('raw', lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
attempt('raw_nonblock', lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW | socket.SOCK_NONBLOCK, 255))
attempt('ping', lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP))
attempt('packet', lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0))
attempt('seqpacket', lambda: socket.socket(socket.AF_INET, socket.SOCK_SEQPACKET, 0))
attempt('udp_send', lambda: udp_send('127.0.0.1', {u}))
attempt('udp_connect', lambda: udp_connect('127.0.0.1', {u}))
attempt('udp_bind', lambda: bind(socket.SOCK_DGRAM, '127.0.0.1', 0))
attempt('tcp_bind', lambda: bind(socket.SOCK_STREAM, '127.0.0.1', 0))
attempt('udp_bind_any', lambda: bind(socket.SOCK_DGRAM, '0.0.0.0', 0))
attempt('listen', lambda: socket.socket().listen(1))
attempt('listen6', lambda: socket.socket(socket.AF_INET6).listen(1))
"#
    );
    let run = python(&t, rules(&[format!("tcp:127.0.0.1:{a}")]), &body);
    assert_eq!(run.value("allowed"), "ok", "{}", run.stderr);
    // Landlock's port rule refuses first (EACCES, audited by Landlock).
    assert_eq!(run.value("other_port"), EACCES.to_string());
    // The address is the cgroup program's (EPERM), also for TCP Fast Open
    // (which skips Landlock's connect hook) and IPv4-mapped IPv6.
    for name in ["other_addr", "fastopen_other_addr", "mapped_other_addr"] {
        assert_eq!(run.value(name), EPERM.to_string(), "{name}");
    }
    // No socket but TCP and UDP under IPv4/IPv6 (seccomp).
    for name in [
        "mptcp",
        "mptcp6",
        "sctp",
        "raw",
        "raw_nonblock",
        "ping",
        "packet",
        "seqpacket",
    ] {
        assert_eq!(run.value(name), EPERM.to_string(), "{name}");
    }
    // No UDP at all without a UDP entry; no bind but the implicit one.
    for name in ["udp_send", "udp_connect", "udp_bind"] {
        assert_eq!(run.value(name), EPERM.to_string(), "{name}");
    }
    assert_eq!(run.value("tcp_bind"), EACCES.to_string());
    assert_eq!(run.value("udp_bind_any"), "ok");
    // listen(2) binds an ephemeral port on every address by itself, past
    // Landlock's and the cgroup programs' bind hooks: seccomp refuses it.
    assert_eq!(run.value("listen"), EPERM.to_string());
    assert_eq!(run.value("listen6"), EPERM.to_string());

    assert_received_hello(&allowed);
    assert_never_accepted(&other_port, "other port");
    assert_never_accepted(&other_addr, "other address");
    assert_no_datagram(&udp, "udp");

    let o = &run.outcome;
    let addr_a = format!("127.0.0.2:{a}");
    assert!(
        denied(o, "net.connect_tcp", &addr_a),
        "{:?}",
        filter_denials(o)
    );
    assert!(
        denied(o, "net.connect_tcp", &format!("[::ffff:127.0.0.2]:{a}")),
        "{:?}",
        filter_denials(o)
    );
    let addr_u = format!("127.0.0.1:{u}");
    assert!(
        denied(o, "net.sendmsg_udp", &addr_u),
        "{:?}",
        filter_denials(o)
    );
    assert!(
        denied(o, "net.connect_udp", &addr_u),
        "{:?}",
        filter_denials(o)
    );
    assert!(
        denied(o, "net.bind_udp", "127.0.0.1:0"),
        "{:?}",
        filter_denials(o)
    );
    // Exactly the refusals above (fast open's connect counts once).
    assert_eq!(
        o.filter_denials.as_ref().unwrap().count,
        6,
        "{:?}",
        filter_denials(o)
    );
    let confinement = run
        .outcome
        .confinement
        .clone()
        .expect("confinement reported");
    assert!(!confinement.private_network);
    assert_eq!(confinement.tcp_connect_ports, vec![a]);
}

/// `udp:127.0.0.1:U` allows datagrams to U only.
#[test]
fn udp_scope_allows_only_its_port() {
    let t = Tree::new();
    let (allowed, u) = udp_listener("127.0.0.1:0");
    let (other, u2) = udp_listener("127.0.0.1:0");
    let (tcp, a) = tcp_listener("127.0.0.1:0");
    let body = format!(
        r#"
attempt('send', lambda: udp_send('127.0.0.1', {u}))
attempt('send_other', lambda: udp_send('127.0.0.1', {u2}))
attempt('tcp_same_port', lambda: tcp('127.0.0.1', {u}))
attempt('tcp', lambda: tcp('127.0.0.1', {a}))
"#
    );
    let run = python(&t, rules(&[format!("udp:127.0.0.1:{u}")]), &body);
    assert_eq!(run.value("send"), "ok", "{}", run.stderr);
    assert_eq!(run.value("send_other"), EPERM.to_string());
    // A UDP entry grants no TCP (Landlock: no TCP port at all).
    assert_eq!(run.value("tcp_same_port"), EACCES.to_string());
    assert_eq!(run.value("tcp"), EACCES.to_string());
    assert_datagram(&allowed);
    assert_no_datagram(&other, "other udp port");
    assert_never_accepted(&tcp, "tcp");
    assert!(denied(
        &run.outcome,
        "net.sendmsg_udp",
        &format!("127.0.0.1:{u2}")
    ));
    assert_eq!(run.outcome.filter_denials.as_ref().unwrap().count, 1);
}

/// A CIDR block allows its addresses and no other; IPv6 entries work.
#[test]
fn cidr_and_ipv6_entries() {
    let t = Tree::new();
    let (in_block, a) = tcp_listener("127.0.0.2:0");
    let (outside, _) = tcp_listener(&format!("127.0.0.5:{a}"));
    let (v6, p6) = tcp_listener("[::1]:0");
    let (v6_other, p6_other) = tcp_listener("[::1]:0");
    let body = format!(
        r#"
attempt('in_block', lambda: tcp('127.0.0.2', {a}))
attempt('outside', lambda: tcp('127.0.0.5', {a}))
attempt('v6', lambda: tcp('::1', {p6}, socket.AF_INET6))
attempt('v6_other', lambda: tcp('::1', {p6_other}, socket.AF_INET6))
attempt('v6_wrong_addr', lambda: tcp('::2', {p6}, socket.AF_INET6))
"#
    );
    let network = rules(&[format!("tcp:127.0.0.0/30:{a}"), format!("tcp:[::1]:{p6}")]);
    let run = python(&t, network, &body);
    assert_eq!(run.value("in_block"), "ok", "{}", run.stderr);
    assert_eq!(run.value("outside"), EPERM.to_string());
    assert_eq!(run.value("v6"), "ok", "{}", run.stderr);
    assert_eq!(run.value("v6_other"), EACCES.to_string());
    assert_eq!(run.value("v6_wrong_addr"), EPERM.to_string());
    assert_received_hello(&in_block);
    assert_received_hello(&v6);
    assert_never_accepted(&outside, "outside the block");
    assert_never_accepted(&v6_other, "other IPv6 port");
    let o = &run.outcome;
    assert!(denied(o, "net.connect_tcp", &format!("127.0.0.5:{a}")));
    assert!(denied(o, "net.connect_tcp", &format!("[::2]:{p6}")));
}

/// A name is resolved when the run starts (here `localhost`, from
/// `/etc/hosts`), and its addresses are what the kernel allows.
#[test]
fn names_resolve_at_run_start() {
    let t = Tree::new();
    let (l, a) = tcp_listener("127.0.0.1:0");
    let endpoint = NetworkEndpoint::parse(&format!("tcp:localhost:{a}")).unwrap();
    let resolved = net_scope::resolve(&[endpoint], net_scope::system_lookup).unwrap();
    assert_eq!(resolved.grants[0].entry, format!("tcp:localhost:{a}"));
    assert!(
        resolved.grants[0]
            .addresses
            .contains(&"127.0.0.1".to_string()),
        "{:?}",
        resolved.grants
    );
    let body = format!("attempt('by_address', lambda: tcp('127.0.0.1', {a}))");
    let run = python(&t, resolved.rules, &body);
    assert_eq!(run.value("by_address"), "ok", "{}", run.stderr);
    assert_received_hello(&l);
}
