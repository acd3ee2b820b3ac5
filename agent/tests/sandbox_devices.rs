//! Devices: the run cgroup's device program allows only the character
//! devices of the sandbox's minimal `/dev`. A device node the bundle finds
//! elsewhere (here: created by the test inside a write scope, where the
//! bundle can reach it) cannot be opened, and the attempt is recorded.

mod sandbox_support;

use std::fs;
use std::os::unix::fs::FileTypeExt;

use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use sandbox_support::Tree;

/// The first loop device, and `/dev/mem`'s sibling `/dev/port` (1:4), a
/// character device outside the allow-list.
const LOOP0: (u64, u64) = (7, 0);
const PORT: (u64, u64) = (1, 4);

#[test]
fn only_the_minimal_dev_nodes_can_be_opened() {
    let t = Tree::new();
    let block = t.p("etc/app/loop0");
    let chr = t.p("etc/app/port");
    mknod(
        &block,
        SFlag::S_IFBLK,
        Mode::from_bits_truncate(0o666),
        makedev(LOOP0.0, LOOP0.1),
    )
    .unwrap();
    mknod(
        &chr,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        makedev(PORT.0, PORT.1),
    )
    .unwrap();
    let before = t.snapshot();
    let script = format!(
        "for n in {block} {chr}; do \
           if dd if=$n of=/dev/null bs=512 count=1 2>/dev/null; then echo read_$(basename $n)=ok; else echo read_$(basename $n)=refused; fi; \
           if printf x 2>/dev/null > $n; then echo write_$(basename $n)=ok; else echo write_$(basename $n)=refused; fi; \
         done; \
         head -c 4 /dev/urandom > /dev/null && echo urandom=ok; \
         head -c 4 /dev/zero > /dev/null && echo zero=ok; \
         echo x > /dev/null && echo null=ok",
        block = block.display(),
        chr = chr.display(),
    );
    let run = t.sh(&script);
    for name in ["read_loop0", "write_loop0", "read_port", "write_port"] {
        assert_eq!(run.value(name), "refused", "{name}\n{}", run.stderr);
    }
    for name in ["urandom", "zero", "null"] {
        assert_eq!(run.value(name), "ok", "{name}\n{}", run.stderr);
    }
    // The nodes are untouched (still device nodes; no byte written).
    assert!(fs::metadata(&block).unwrap().file_type().is_block_device());
    assert!(fs::metadata(&chr).unwrap().file_type().is_char_device());
    assert_eq!(t.snapshot(), before);

    // Refused by the cgroup's device program (not by a nodev mount or
    // Landlock), and recorded with the device number.
    let denials = run
        .outcome
        .filter_denials
        .clone()
        .expect("the cgroup filters' denials must be readable");
    let has = |access: &str, object: &str| {
        denials
            .records
            .iter()
            .any(|d| d.access == access && d.object == object)
    };
    assert!(has("device.read", "block 7:0"), "{denials:?}");
    assert!(has("device.write", "block 7:0"), "{denials:?}");
    assert!(has("device.read", "char 1:4"), "{denials:?}");
    assert!(has("device.write", "char 1:4"), "{denials:?}");
    assert_eq!(denials.count, 4, "{denials:?}");
}

/// A run that touches no device outside the list has no device denial,
/// and the program is there for runs without a network scope too (the
/// count is known, zero).
#[test]
fn a_quiet_run_records_nothing() {
    let t = Tree::new();
    let run = t.sh("cat /dev/null; head -c 1 /dev/urandom >/dev/null; echo done=yes");
    assert_eq!(run.value("done"), "yes");
    let denials = run.outcome.filter_denials.clone().unwrap();
    assert_eq!(denials.count, 0);
    assert!(denials.records.is_empty());
}
