//! Network confinement: no network scope means no reachable host
//! listener; a network scope allows TCP connect to the listed ports only.

mod sandbox_support;

use std::io::{ErrorKind, Read};
use std::net::TcpListener;
use std::time::Duration;

use rollguard_agent::sandbox::TcpEndpoint;
use sandbox_support::Tree;

fn connect_script(ports: &[(&str, u16)]) -> String {
    let mut py = String::from("import socket\n");
    for (name, port) in ports {
        py.push_str(&format!(
            "try:\n  s=socket.create_connection(('127.0.0.1', {port}), timeout=5); s.sendall(b'hello'); s.close(); print('{name}=ok')\n\
             except OSError as e:\n  print('{name}=%s' % e.errno)\n"
        ));
    }
    py
}

fn listener() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

fn assert_never_accepted(l: &TcpListener, what: &str) {
    match l.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("{what}: the host listener got a connection: {other:?}"),
    }
}

#[test]
fn without_network_scope_host_listeners_are_unreachable() {
    let t = Tree::new();
    let (l, port) = listener();
    let mut spec = t.spec("");
    spec.command = vec![
        "/usr/bin/python3".into(),
        "-c".into(),
        connect_script(&[("tcp", port)]),
    ];
    let run = t.run(&spec);
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

#[test]
fn network_scope_allows_only_the_listed_port() {
    let t = Tree::new();
    let (allowed, allowed_port) = listener();
    let (denied, denied_port) = listener();
    let mut spec = t.spec("");
    spec.scope.network = vec![TcpEndpoint {
        host: "127.0.0.1".into(),
        port: allowed_port,
    }];
    spec.command = vec![
        "/usr/bin/python3".into(),
        "-c".into(),
        connect_script(&[("allowed", allowed_port), ("denied", denied_port)]),
    ];
    let run = t.run(&spec);
    assert_eq!(run.value("allowed"), "ok", "{}", run.stderr);
    assert_eq!(run.value("denied"), libc::EACCES.to_string());
    assert_never_accepted(&denied, "denied port");
    // The allowed connection really reached the host listener.
    allowed.set_nonblocking(false).unwrap();
    let (mut conn, _) = allowed.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut got = Vec::new();
    conn.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"hello");
    let confinement = run.outcome.confinement.expect("confinement reported");
    assert!(!confinement.private_network);
    assert_eq!(confinement.tcp_connect_ports, vec![allowed_port]);

    // Binding (listening) is never allowed.
    let mut spec = t.spec("");
    spec.scope.network = vec![TcpEndpoint {
        host: "127.0.0.1".into(),
        port: allowed_port,
    }];
    spec.command = vec![
        "/usr/bin/python3".into(),
        "-c".into(),
        "import socket\ns=socket.socket()\ntry:\n  s.bind(('127.0.0.1', 0)); print('bind=ok')\nexcept OSError as e:\n  print('bind=%d' % e.errno)"
            .into(),
    ];
    let run = t.run(&spec);
    assert_eq!(run.value("bind"), libc::EACCES.to_string());
}
