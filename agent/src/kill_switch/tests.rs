//! The kill switch's recovery on open. How it kills runs and refuses new
//! ones, through the daemon, is tested with the daemon (`daemon/tests.rs`).

use super::*;

fn open(dir: &std::path::Path) -> KillSwitch {
    let state = StateDir::open(dir).unwrap();
    let records = Records::open(dir).unwrap();
    KillSwitch::open(&state, &records).unwrap()
}

#[test]
fn a_host_kill_set_while_the_daemon_was_down_is_adopted() {
    let dir = tempfile::tempdir().unwrap();
    store::set_host_kill(&StateDir::open(dir.path()).unwrap(), "set by hand").unwrap();
    let k = open(dir.path());
    assert!(k.snapshot().local.unwrap().reason.contains("set by hand"));
    k.apply_fleet(KillState::default()).unwrap();
    assert!(
        store::host_kill_in_force(&StateDir::open(dir.path()).unwrap())
            .unwrap()
            .is_some(),
        "the controller cannot lift a local kill"
    );
}

#[test]
fn an_unreadable_daemon_record_is_a_local_kill_in_force() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    std::fs::write(dir.path().join("daemon/kill.json"), b"{garbage").unwrap();
    let k = open(dir.path());
    let order = k
        .host_wide()
        .expect("a corrupt record must count as a kill");
    assert!(order.reason.contains("unreadable"), "{}", order.reason);
    assert!(
        store::host_kill_in_force(&StateDir::open(dir.path()).unwrap())
            .unwrap()
            .is_some(),
        "and it arms the runner's own switch"
    );
}
