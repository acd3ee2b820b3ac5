//! Both daemons tell systemd when they are ready (`Type=notify` units).
//!
//! systemd hands a `Type=notify` service a datagram socket in
//! `$NOTIFY_SOCKET` and kills it if `READY=1` never arrives. Here the test
//! plays systemd: it binds the socket, starts the real binary with the
//! variable set and waits for the datagram.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rollguard_tests::bin;
use rollguard_tests::fleet::{Fleet, PATIENCE};

/// Kills the daemon when the test ends, however it ends.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `cmd` with `$NOTIFY_SOCKET` at a socket of ours and return every
/// datagram it sends until one contains `READY=1` (panics if the daemon
/// exits or nothing arrives within [`PATIENCE`]).
fn start_and_wait_ready(cmd: &mut Command, socket: &Path) -> (Daemon, Vec<String>) {
    let _ = std::fs::remove_file(socket);
    let listener = UnixDatagram::bind(socket).expect("bind the notify socket");
    listener
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");
    let child = cmd
        .env("NOTIFY_SOCKET", socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let mut daemon = Daemon(child);
    let start = Instant::now();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Ok(n) = listener.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let ready = text.lines().any(|l| l == "READY=1");
            received.push(text);
            if ready {
                return (daemon, received);
            }
        }
        if let Some(status) = daemon.0.try_wait().expect("try_wait") {
            panic!("{cmd:?} exited ({status}) before READY=1; received {received:?}");
        }
        assert!(
            start.elapsed() < PATIENCE,
            "{cmd:?} never sent READY=1; received {received:?}"
        );
    }
}

#[test]
fn controller_and_agent_send_ready() {
    let fleet = Fleet::new(&[("web-01", &[])]);

    let (_controller, got) = start_and_wait_ready(
        Command::new(bin("rollguard-controller"))
            .arg("serve")
            .arg("--config")
            .arg(fleet.ctl().join("controller.toml")),
        &fleet.root().join("controller.notify"),
    );
    assert!(got.iter().any(|d| d.contains("READY=1")), "{got:?}");

    // Ready once its local control socket (the kill switch) answers; it
    // does not wait for the controller.
    let agent = &fleet.agents["web-01"];
    let (_agent, got) = start_and_wait_ready(
        Command::new(bin("rollguard-agent"))
            .args(["serve", "--policy"])
            .arg(agent.policy())
            .arg("--socket")
            .arg(agent.socket()),
        &fleet.root().join("agent.notify"),
    );
    assert!(got.iter().any(|d| d.contains("READY=1")), "{got:?}");
    assert!(
        agent.socket().exists(),
        "READY=1 before the local control socket exists"
    );
}
