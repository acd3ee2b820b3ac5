//! End to end: what a bundle can reach of the run's init (stage 2, PID 1
//! of the run) and of the host's IPC, with real signed bundles run by
//! `rollguard-agent run` as root on the real kernel. Found by an attack
//! pass on the merged sandbox: the init was dumpable and kept descriptors
//! opened before the run's mount namespace, and the host's SysV/POSIX IPC
//! was shared.

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use rollguard_tests::host::{manifest, Host, Keys, PolicyOptions};

/// mode, owner, size, mtime of `path`.
fn stat(path: &Path) -> (u32, u32, u64, i64, i64) {
    let m = fs::metadata(path).unwrap();
    (m.mode(), m.uid(), m.size(), m.mtime(), m.mtime_nsec())
}

#[test]
fn the_runs_init_and_descriptors_of_the_agents_caller_are_out_of_reach() {
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-01.tokyo", &keys, PolicyOptions::default());
    let config = host.root().join("etc/mail/main.cf");
    let backup = host.root().join("backup/daily/customers.tar");
    // The agent's caller leaves a descriptor open (a lock file, say): a
    // file outside the bundle's scope, opened for writing.
    let leaked = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&config)
        .unwrap();
    nix::fcntl::fcntl(
        leaked.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    let watched = [
        config.clone(),
        backup.clone(),
        Path::new("/dev/null").to_path_buf(),
    ];
    let before: Vec<_> = watched.iter().map(|p| stat(p)).collect();
    let content = fs::read(&config).unwrap();
    let script = r#"#!/bin/sh
for f in /proc/1/fd/* /proc/1/exe /proc/self/fd/0; do
  chmod 0777 "$f" 2>/dev/null; touch -d 2001-01-01 "$f" 2>/dev/null
  echo owned >> "$f" 2>/dev/null
done
/usr/bin/python3 - <<'PY'
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
try:
    pidfd = os.pidfd_open(1)
except OSError as e:
    print("pidfd_open:", e)
else:
    for n in range(0, 256):
        fd = libc.syscall(438, pidfd, n, 0)  # pidfd_getfd
        if fd >= 0:
            print("GOT", n, os.readlink("/proc/self/fd/%d" % fd))
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
PY
echo done
"#;
    let src = host.bundle_source(
        "init",
        &manifest(
            "init",
            1,
            "\"mail-*.tokyo\"",
            "write = [\"@ROOT@/var/spool/tmp\"]",
        ),
        script,
    );
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    let (report, _code) = host.run(&bundle);
    drop(leaked);
    let stdout = report["stdout_tail"].as_str().unwrap_or_default();
    assert!(stdout.contains("done"), "{report:#}");
    assert!(
        !stdout.contains("GOT"),
        "the bundle took a descriptor of the init: {report:#}"
    );
    let after: Vec<_> = watched.iter().map(|p| stat(p)).collect();
    assert_eq!(after, before, "metadata changed: {report:#}");
    assert_eq!(fs::read(&config).unwrap(), content);
    // pidfd_getfd is refused by seccomp, and that is reported.
    let denials = report["denials"].as_array().expect("denials known here");
    assert!(
        denials.iter().any(|d| d["access"] == "syscall.pidfd_getfd"),
        "{report:#}"
    );
}

#[test]
fn the_run_has_its_own_ipc_namespace() {
    let keys = Keys::new(&["alice"]);
    let host = Host::new("mail-01.tokyo", &keys, PolicyOptions::default());
    // A host shared memory segment, as a database would hold.
    let out = Command::new("ipcmk").args(["-M", "4096"]).output().unwrap();
    assert!(out.status.success());
    let id: String = String::from_utf8_lossy(&out.stdout)
        .chars()
        .filter(|c| c.is_ascii_digit())
        .collect();
    struct Segment(String);
    impl Drop for Segment {
        fn drop(&mut self) {
            let _ = Command::new("ipcrm").args(["-m", &self.0]).status();
        }
    }
    let segment = Segment(id);
    let script = format!(
        "#!/bin/sh\nipcs -m\nipcrm -m {id} && echo REMOVED\nipcmk -M 8192\necho done\n",
        id = segment.0
    );
    let src = host.bundle_source(
        "ipc",
        &manifest(
            "ipc",
            1,
            "\"mail-*.tokyo\"",
            "write = [\"@ROOT@/var/spool/tmp\"]",
        ),
        &script,
    );
    let bundle = host.build_signed(&src, &keys, &["alice"]);
    let (report, _code) = host.run(&bundle);
    let stdout = report["stdout_tail"].as_str().unwrap_or_default();
    assert!(stdout.contains("done"), "{report:#}");
    assert!(!stdout.contains("REMOVED"), "{report:#}");
    // The host's segment is still there; the bundle's went with its
    // namespace.
    let host_ipcs = Command::new("ipcs")
        .args(["-m", "-i", &segment.0])
        .output()
        .unwrap();
    assert!(host_ipcs.status.success(), "the host's segment is gone");
    let listing = String::from_utf8_lossy(&Command::new("ipcs").arg("-m").output().unwrap().stdout)
        .to_string();
    assert!(
        !listing.contains(" 8192 "),
        "the bundle's segment is on the host: {listing}"
    );
}
