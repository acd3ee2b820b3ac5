//! Private mount (and, without a network scope, network) namespace, and the
//! private scratch and device mounts inside it.
//!
//! Mounts made here are visible only to the run: `/` is first made
//! recursively private so nothing propagates back to the host.
//!
//! - `/tmp`, `/var/tmp`: fresh tmpfs scratch (the bundle may write there
//!   freely; it vanishes with the run).
//! - `/run`: an empty tmpfs, which hides systemd's private socket, D-Bus,
//!   and other daemons' sockets, so `systemctl`/`systemd-run` cannot ask the
//!   host's init to run something outside the sandbox. (Socket creation is
//!   also blocked by seccomp; this is the second layer.) With a network
//!   scope, `/run/systemd/resolve` is bound back read-only so DNS via
//!   systemd-resolved's stub `resolv.conf` keeps working.
//! - `/dev`: a tmpfs with only null, zero, full, random, urandom and tty,
//!   the usual symlinks and a small `/dev/shm`. No block devices, so there
//!   is no `/dev/sda` to write to.

use rollguard_shared::PathIoError;
use std::fs;
use std::io;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::socket::{
    self, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};

#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error("unshare({flags}): {source}")]
    Unshare {
        flags: &'static str,
        source: nix::Error,
    },
    #[error("{what}: {source}")]
    Mount { what: String, source: nix::Error },
    #[error(transparent)]
    Io(#[from] PathIoError),
    #[error("bringing up the loopback interface: {0}")]
    Loopback(String),
}

fn mount_err(what: impl Into<String>) -> impl FnOnce(nix::Error) -> NamespaceError {
    let what = what.into();
    move |source| NamespaceError::Mount { what, source }
}

/// Enter a new mount namespace (and a new network namespace when
/// `private_network`), and stop mount propagation to the host.
pub fn enter(private_network: bool) -> Result<(), NamespaceError> {
    // A private IPC namespace always: SysV shared memory, semaphores and
    // message queues and POSIX message queues are otherwise the host's
    // (readable, writable and removable by a root bundle, and left behind
    // after the run).
    let (flags, name) = if private_network {
        (
            CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWNET,
            "CLONE_NEWNS|CLONE_NEWIPC|CLONE_NEWNET",
        )
    } else {
        (
            CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC,
            "CLONE_NEWNS|CLONE_NEWIPC",
        )
    };
    unshare(flags).map_err(|source| NamespaceError::Unshare {
        flags: name,
        source,
    })?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(mount_err("making / recursively private"))?;
    if private_network {
        loopback_up()?;
    }
    Ok(())
}

/// Set `lo` up in the new network namespace with one RTM_NEWLINK message.
///
/// Hand-built because no dependency we have speaks rtnetlink, and pulling
/// an async netlink stack into stage 2 for 32 bytes is not worth it. Safe
/// code only: nix sockets and a byte buffer laid out as `struct nlmsghdr`
/// followed by `struct ifinfomsg` (native endian, as netlink requires).
fn loopback_up() -> Result<(), NamespaceError> {
    let index =
        nix::net::if_::if_nametoindex("lo").map_err(|e| NamespaceError::Loopback(e.to_string()))?;
    let fd = socket::socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .map_err(|e| NamespaceError::Loopback(format!("netlink socket: {e}")))?;
    let mut msg = Vec::with_capacity(32);
    // struct nlmsghdr
    msg.extend_from_slice(&32u32.to_ne_bytes()); // nlmsg_len
    msg.extend_from_slice(&(libc::RTM_NEWLINK).to_ne_bytes()); // nlmsg_type (u16)
    msg.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes()); // nlmsg_flags
    msg.extend_from_slice(&1u32.to_ne_bytes()); // nlmsg_seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid
                                                // struct ifinfomsg
    msg.push(libc::AF_UNSPEC as u8); // ifi_family
    msg.push(0); // padding
    msg.extend_from_slice(&0u16.to_ne_bytes()); // ifi_type
    msg.extend_from_slice(&(index as i32).to_ne_bytes()); // ifi_index
    msg.extend_from_slice(&(libc::IFF_UP as u32).to_ne_bytes()); // ifi_flags
    msg.extend_from_slice(&(libc::IFF_UP as u32).to_ne_bytes()); // ifi_change
    debug_assert_eq!(msg.len(), 32);
    use std::os::fd::AsRawFd;
    socket::sendto(
        fd.as_raw_fd(),
        &msg,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map_err(|e| NamespaceError::Loopback(format!("send: {e}")))?;
    let mut reply = [0u8; 1024];
    let n = socket::recv(fd.as_raw_fd(), &mut reply, MsgFlags::empty())
        .map_err(|e| NamespaceError::Loopback(format!("receive: {e}")))?;
    // The ACK is an NLMSG_ERROR message whose first payload field is the
    // (negated) errno, 0 for success.
    if n < 20 {
        return Err(NamespaceError::Loopback("short netlink reply".into()));
    }
    let kind = u16::from_ne_bytes([reply[4], reply[5]]);
    let error = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
    if kind != libc::NLMSG_ERROR as u16 || error != 0 {
        return Err(NamespaceError::Loopback(format!(
            "kernel answered type {kind}, error {}",
            io::Error::from_raw_os_error(-error)
        )));
    }
    Ok(())
}

fn mount_tmpfs(target: &str, flags: MsFlags, options: &str) -> Result<(), NamespaceError> {
    mount(Some("tmpfs"), target, Some("tmpfs"), flags, Some(options))
        .map_err(mount_err(format!("mounting tmpfs on {target}")))
}

/// Bind `source` onto `target`, then remount that bind with `flags` (the
/// kernel ignores most flags on the first `MS_BIND`, so it takes two calls).
fn bind_with(source: &str, target: &str, flags: MsFlags, what: &str) -> Result<(), NamespaceError> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(mount_err(format!("binding {target}")))?;
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags,
        None::<&str>,
    )
    .map_err(mount_err(format!("making {target} {what}")))
}

/// Mount the private `/tmp`, `/var/tmp` (each at most `tmp_bytes`: tmpfs
/// lives in the host's RAM), `/run` and `/dev`.
pub fn mount_private_dirs(keep_resolver: bool, tmp_bytes: u64) -> Result<(), NamespaceError> {
    let scratch = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let options = format!("mode=1777,size={tmp_bytes}");
    mount_tmpfs("/tmp", scratch, &options)?;
    // A real directory only: on hosts where /var/tmp is a symlink to /tmp
    // it is already covered.
    if is_real_dir("/var/tmp") {
        mount_tmpfs("/var/tmp", scratch, &options)?;
    }
    mount_run(keep_resolver)?;
    mount_proc()?;
    mount_dev()
}

/// A procfs of the run's own PID namespace over `/proc` (stage 2 is PID 1
/// of it, see `pid_init`), so `/proc` lists only the run's processes: no
/// host command lines, environments or pids. Not `subset=pid`: scripts
/// legitimately read `/proc/meminfo`, `/proc/mounts`, `/proc/cpuinfo`;
/// writes to `/proc/sys` stay denied by Landlock as before. The host's
/// procfs underneath cannot be uncovered: umount needs CAP_SYS_ADMIN
/// (dropped) and is refused by seccomp.
fn mount_proc() -> Result<(), NamespaceError> {
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(mount_err("mounting the run's procfs on /proc"))
}

fn mount_run(keep_resolver: bool) -> Result<(), NamespaceError> {
    const RESOLVE: &str = "/run/systemd/resolve";
    // Open the resolver directory before it is hidden, to bind it back.
    let resolver = if keep_resolver && Path::new(RESOLVE).is_dir() {
        Some(fs::File::open(RESOLVE).map_err(PathIoError::at("opening", RESOLVE))?)
    } else {
        None
    };
    mount_tmpfs(
        "/run",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        "mode=0755",
    )?;
    if let Some(dir) = resolver {
        use std::os::fd::AsRawFd;
        fs::create_dir_all(RESOLVE).map_err(PathIoError::at("creating", RESOLVE))?;
        let source = format!("/proc/self/fd/{}", dir.as_raw_fd());
        bind_with(
            &source,
            RESOLVE,
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            "read-only",
        )?;
    }
    Ok(())
}

/// The character devices a maintenance script may legitimately use.
pub const DEVICES: [(&str, u64, u64); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

fn mount_dev() -> Result<(), NamespaceError> {
    // Not nodev: the nodes below live on this tmpfs. Nobody can add nodes
    // later (CAP_MKNOD dropped, mknod of devices blocked by seccomp,
    // Landlock MAKE_CHAR/MAKE_BLOCK never granted).
    mount_tmpfs(
        "/dev",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        "mode=0755,size=1m",
    )?;
    for (name, major, minor) in DEVICES {
        let path = format!("/dev/{name}");
        mknod(
            path.as_str(),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        )
        .map_err(mount_err(format!("creating {path}")))?;
        // mknod's mode is filtered by the umask; set it exactly.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666))
            .map_err(PathIoError::at("chmod", &path))?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(target, format!("/dev/{link}"))
            .map_err(PathIoError::at("creating", format!("/dev/{link}")))?;
    }
    fs::create_dir("/dev/shm").map_err(PathIoError::at("creating", "/dev/shm"))?;
    mount_tmpfs(
        "/dev/shm",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        "mode=1777,size=64m",
    )
}

/// A directory that is not reached through a symlink at its last component.
pub fn is_real_dir(path: &str) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
}

/// Service capture, on the private `/run` (docs/services.md):
/// - `/run/systemd/system`, so maintainer scripts generated by debhelper
///   (`if [ -d /run/systemd/system ]`) take their systemd path, through
///   `deb-systemd-invoke` and `systemctl`;
/// - [`SHIM_DIR`](crate::services::capture::SHIM_DIR): links named
///   `systemctl`, `deb-systemd-invoke`, `invoke-rc.d`, `service` and
///   `policy-rc.d` to `stage2` (the stage-2 program, which records when
///   called by those names), on a read-only mount so the bundle cannot
///   replace them; it is first on the bundle's `PATH`;
/// - a tmpfs of its own on
///   [`REQUESTS_DIR`](crate::services::capture::REQUESTS_DIR), writable, not
///   executable, at most
///   [`REQUESTS_TMPFS_BYTES`](crate::services::capture::REQUESTS_TMPFS_BYTES)
///   and a few inodes, where the links append the requests. Not a directory
///   of the host's file systems: the bundle can write there whatever it
///   likes, and its disk space outside `/tmp` is bounded only by its
///   scopes. The directory is returned opened, for stage 2 to hand to the
///   agent (which reads the record through it after the run, when the
///   namespace is gone: the descriptor keeps the tmpfs).
pub fn mount_service_capture(stage2: &Path) -> Result<fs::File, NamespaceError> {
    use crate::services::capture::{
        REQUESTS_DIR, REQUESTS_TMPFS_BYTES, REQUESTS_TMPFS_INODES, SHIMS, SHIM_DIR,
    };
    fs::create_dir_all("/run/systemd/system")
        .map_err(PathIoError::at("creating", "/run/systemd/system"))?;
    fs::create_dir_all(SHIM_DIR).map_err(PathIoError::at("creating", SHIM_DIR))?;
    fs::create_dir_all(REQUESTS_DIR).map_err(PathIoError::at("creating", REQUESTS_DIR))?;
    for name in SHIMS {
        let link = Path::new(SHIM_DIR).join(name);
        symlink(stage2, &link).map_err(PathIoError::at("linking", &link))?;
    }
    // The links' own mount, read-only.
    bind_with(
        SHIM_DIR,
        SHIM_DIR,
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        "read-only",
    )?;
    // Bounded, and nothing written there can be executed or be a device.
    mount_tmpfs(
        REQUESTS_DIR,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        &format!("mode=0755,size={REQUESTS_TMPFS_BYTES},nr_inodes={REQUESTS_TMPFS_INODES}"),
    )?;
    let dir = fs::File::open(REQUESTS_DIR).map_err(PathIoError::at("opening", REQUESTS_DIR))?;
    create_append_only_record(&dir)?;
    Ok(dir)
}

/// The record, created empty and append-only (`FS_APPEND_FL`) in the
/// request directory `dir`: the bundle may add lines (the shims do, and so
/// may the bundle itself, which is no more than calling a shim) but never
/// truncate, overwrite, rename or remove what is there, a denied request
/// above all. Clearing the flag takes `CAP_LINUX_IMMUTABLE`, which the
/// bundle does not keep ([`super::capabilities::KEEP`]), and Landlock lets
/// it create nothing else in the directory. tmpfs has the flag since
/// Linux 6.0; a kernel without it refuses the run (never a record the
/// bundle can rewrite).
fn create_append_only_record(dir: &fs::File) -> Result<(), NamespaceError> {
    use crate::services::capture::{REQUESTS_FILE, REQUESTS_NAME};
    use rustix::fs::{ioctl_setflags, openat, IFlags, Mode, OFlags};
    let record = openat(
        dir,
        REQUESTS_NAME,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )
    .map_err(|e| PathIoError::new("creating", REQUESTS_FILE, e.into()))?;
    ioctl_setflags(&record, IFlags::APPEND)
        .map_err(|e| PathIoError::new("making append-only", REQUESTS_FILE, e.into()))?;
    Ok(())
}
