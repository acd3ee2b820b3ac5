//! The real-systemd harness itself, in the modes other tests use: a
//! private copy of the root, host files bound in read-only, extra nspawn
//! options, and two instances side by side, each cleaned up.

use std::path::Path;

use rollguard_tests::systemd_container::{BootOptions, SystemdContainer};

#[test]
fn a_private_copy_with_a_read_only_bind_boots_beside_an_overlay_instance() {
    // Not under /tmp (test trees never are; see tests/src/host.rs).
    let base = Path::new("/var/lib/rollguard-tests");
    std::fs::create_dir_all(base).unwrap();
    let shared = tempfile::Builder::new()
        .prefix("ct-bind-")
        .tempdir_in(base)
        .unwrap();
    std::fs::write(shared.path().join("hello"), "from the host\n").unwrap();

    let copy = SystemdContainer::boot_with(BootOptions {
        nspawn_args: vec![
            format!("--bind-ro={}:/mnt/host", shared.path().display()),
            "--capability=CAP_NET_ADMIN".into(),
            "--private-network".into(),
        ],
        private_copy: true,
    });
    let overlay = SystemdContainer::boot();
    assert_ne!(copy.pid1(), overlay.pid1());
    assert_eq!(copy.sh("cat /mnt/host/hello"), "from the host\n");
    // Read-only: the container cannot write the host's directory.
    assert!(!copy
        .command(["sh", "-c", "echo x > /mnt/host/other"])
        .status()
        .unwrap()
        .success());
    // CAP_NET_ADMIN (bit 12) is in the container's bounding set.
    assert!(copy.sh("cat /proc/1/status").lines().any(|l| {
        l.starts_with("CapBnd:")
            && u64::from_str_radix(l.split_whitespace().nth(1).unwrap(), 16).unwrap() & (1 << 12)
                != 0
    }));
    // Writes stay in each instance.
    copy.sh("echo copy > /etc/which");
    overlay.sh("echo overlay > /etc/which");
    assert_eq!(copy.sh("cat /etc/which"), "copy\n");
    assert_eq!(overlay.sh("cat /etc/which"), "overlay\n");
    assert!(copy.bus_address().ends_with("/run/dbus/system_bus_socket"));
    assert!(copy.root().join("run/dbus/system_bus_socket").exists());

    let cgroups = |ct: &SystemdContainer| {
        ["unified", "systemd", ""]
            .iter()
            .map(|h| {
                Path::new("/sys/fs/cgroup")
                    .join(h)
                    .join(format!("rollguard-ct-{}", ct.name()))
            })
            .filter(|p| p.exists())
            .collect::<Vec<_>>()
    };
    let left = cgroups(&copy);
    assert!(!left.is_empty(), "each instance has cgroups of its own");
    drop(copy);
    for c in left {
        assert!(!c.exists(), "{} was not removed", c.display());
    }
    // The other instance is unaffected.
    assert_eq!(overlay.sh("cat /etc/which"), "overlay\n");
}
