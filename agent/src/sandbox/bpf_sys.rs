//! The `bpf(2)` calls the run cgroup's programs need: create an array map,
//! load a program (with the verifier's log on failure), attach it to a
//! cgroup, read a map element. No crate we use wraps `bpf(2)` without
//! compiled objects (aya and libbpf-rs load ELF files), and libc has no
//! `union bpf_attr`, hence this small unsafe module: each command's part of
//! the union is a `#[repr(C)]` struct copied from `<linux/bpf.h>`, passed
//! with its own size (the kernel accepts a shorter `bpf_attr` and treats the
//! missing tail as zero).
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::bpf_asm::Insn;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;

pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
pub const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
pub const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;

/// `enum bpf_attach_type` values used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum AttachType {
    CgroupDevice = 6,
    Inet4Bind = 8,
    Inet6Bind = 9,
    Inet4Connect = 10,
    Inet6Connect = 11,
    Udp4Sendmsg = 14,
    Udp6Sendmsg = 15,
}

/// The verifier log kept for an error message (its tail says why).
const LOG_SIZE: usize = 64 * 1024;
const BPF_OBJ_NAME_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("bpf(BPF_MAP_CREATE): {0}")]
    MapCreate(io::Error),
    #[error("bpf(BPF_MAP_LOOKUP_ELEM): {0}")]
    MapLookup(io::Error),
    #[error("bpf(BPF_PROG_LOAD) of {name}: {error}{}", if .log.is_empty() { String::new() } else { format!("; verifier log:\n{}", .log) })]
    ProgLoad {
        name: String,
        error: io::Error,
        log: String,
    },
    #[error("bpf(BPF_PROG_ATTACH) of {name} ({attach:?}): {error}")]
    Attach {
        name: String,
        attach: AttachType,
        error: io::Error,
    },
}

/// `bpf_attr` for BPF_MAP_CREATE, up to `map_name`.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; BPF_OBJ_NAME_LEN],
}

/// `bpf_attr` for BPF_MAP_*_ELEM.
#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `bpf_attr` for BPF_PROG_LOAD, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; BPF_OBJ_NAME_LEN],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `bpf_attr` for BPF_PROG_ATTACH.
#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

/// `bpf(cmd, attr, sizeof attr)`.
///
/// SAFETY (for callers): `attr` must be the `bpf_attr` part for `cmd`, and
/// every pointer inside it must be valid, for the sizes it states, for the
/// duration of the call.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, exclusively borrowed `#[repr(C)]` struct of
    // `size_of::<T>()` bytes; the kernel copies at most that many bytes in
    // (and for lookups writes only through the pointers inside it, which the
    // caller vouches for).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Take ownership of a descriptor the kernel just returned.
fn owned(ret: libc::c_long) -> io::Result<OwnedFd> {
    let fd = i32::try_from(ret).map_err(|_| io::Error::other("bpf(2) returned a bad fd"))?;
    // SAFETY: a non-negative return of a BPF_*_CREATE/LOAD command is a new
    // descriptor that nothing else owns (bpf(2) sets O_CLOEXEC on it).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn object_name(name: &str) -> [u8; BPF_OBJ_NAME_LEN] {
    let mut out = [0u8; BPF_OBJ_NAME_LEN];
    for (o, b) in out.iter_mut().zip(name.bytes().take(BPF_OBJ_NAME_LEN - 1)) {
        *o = b;
    }
    out
}

/// A `BPF_MAP_TYPE_ARRAY` with `u32` keys: the map's descriptor and its
/// value size, kept together so a lookup always has room for a value.
#[derive(Debug)]
pub struct ArrayMap {
    fd: OwnedFd,
    value_size: u32,
}

impl ArrayMap {
    /// `max_entries` values of `value_size` bytes, zero-filled.
    pub fn create(name: &str, value_size: u32, max_entries: u32) -> Result<Self, BpfError> {
        let mut attr = MapCreateAttr {
            map_type: BPF_MAP_TYPE_ARRAY,
            key_size: 4,
            value_size,
            max_entries,
            map_name: object_name(name),
            ..Default::default()
        };
        // SAFETY: the attr holds no pointers.
        let ret = unsafe { bpf(BPF_MAP_CREATE, &mut attr) }.map_err(BpfError::MapCreate)?;
        let fd = owned(ret).map_err(BpfError::MapCreate)?;
        Ok(ArrayMap { fd, value_size })
    }

    /// The descriptor, for a program's map reference.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A copy of element `key`.
    pub fn get(&self, key: u32) -> Result<Vec<u8>, BpfError> {
        let mut value = vec![0u8; self.value_size as usize];
        let mut attr = MapElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: &key as *const u32 as u64,
            value: value.as_mut_ptr() as u64,
            ..Default::default()
        };
        // SAFETY: `key` lives on our stack and `value` is a buffer of
        // exactly the map's value size (the size it was created with), both
        // alive and not otherwise borrowed for the call; the kernel reads 4
        // key bytes and writes `value_size` bytes.
        unsafe { bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) }.map_err(BpfError::MapLookup)?;
        Ok(value)
    }
}

/// Load `insns` as a program of `prog_type` for `attach`. On failure, load
/// again with the verifier's log and put the log in the error.
pub fn load_program(
    name: &str,
    prog_type: u32,
    attach: AttachType,
    insns: &[Insn],
) -> Result<OwnedFd, BpfError> {
    match load_once(name, prog_type, attach, insns, None) {
        Ok(fd) => Ok(fd),
        Err(error) => {
            let mut log = vec![0u8; LOG_SIZE];
            let _ = load_once(name, prog_type, attach, insns, Some(&mut log));
            let log = CStr::from_bytes_until_nul(&log)
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default();
            Err(BpfError::ProgLoad {
                name: name.to_string(),
                error,
                log,
            })
        }
    }
}

fn load_once(
    name: &str,
    prog_type: u32,
    attach: AttachType,
    insns: &[Insn],
    log: Option<&mut [u8]>,
) -> io::Result<OwnedFd> {
    const LICENSE: &CStr = c"GPL";
    let (log_level, log_size, log_buf) = match log {
        Some(buf) => (1, buf.len() as u32, buf.as_mut_ptr() as u64),
        None => (0, 0, 0),
    };
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: u32::try_from(insns.len()).map_err(|_| io::Error::other("program too long"))?,
        insns: insns.as_ptr() as u64,
        license: LICENSE.as_ptr() as u64,
        log_level,
        log_size,
        log_buf,
        prog_name: object_name(name),
        expected_attach_type: attach as u32,
        ..Default::default()
    };
    // The verifier gives up with EAGAIN when the loading thread has a
    // signal pending (it checks between instructions): a SIGCHLD from
    // another run's exit is enough, as in a daemon running many at once.
    // The program is not at fault, so try again, as libbpf does (up to
    // five times).
    let mut attempts = PROG_LOAD_ATTEMPTS;
    loop {
        // SAFETY: `insns` (8-byte `#[repr(C)]` instructions, the kernel's
        // `struct bpf_insn` layout), the NUL-terminated license and the log
        // buffer (of `log_size` bytes, exclusively borrowed) all outlive the
        // call; the kernel copies the program in and writes at most
        // `log_size` bytes of log.
        match unsafe { bpf(BPF_PROG_LOAD, &mut attr) } {
            Ok(ret) => return owned(ret),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && attempts > 1 => attempts -= 1,
            Err(e) => return Err(e),
        }
    }
}

/// How many times a program load that the verifier broke off (EAGAIN) is
/// tried in all.
const PROG_LOAD_ATTEMPTS: u32 = 5;

/// Attach `prog` to the cgroup `cgroup` (a directory fd) at `attach`.
/// `flags` 0: the only program at this hook of this cgroup, and no cgroup
/// below it may attach one of its own (see [`super::cgroup_filters`]).
pub fn attach(
    name: &str,
    cgroup: BorrowedFd<'_>,
    prog: BorrowedFd<'_>,
    attach: AttachType,
) -> Result<(), BpfError> {
    let mut attr = ProgAttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: attach as u32,
        attach_flags: 0,
        replace_bpf_fd: 0,
    };
    // SAFETY: the attr holds no pointers.
    unsafe { bpf(BPF_PROG_ATTACH, &mut attr) }
        .map(drop)
        .map_err(|error| BpfError::Attach {
            name: name.to_string(),
            attach,
            error,
        })
}
