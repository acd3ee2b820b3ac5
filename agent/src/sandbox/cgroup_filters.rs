//! BPF programs on the run cgroup: the kernel's network allow-list
//! ([`super::net_filter`]) and device allow-list ([`super::device_filter`]),
//! and the map in which they record what they refused.
//!
//! The agent attaches them to the run cgroup right after creating it and
//! before stage 2 is cloned into it ([`super::Launcher::spawn_held`]), so
//! no process of the run ever exists without them; effective programs are
//! inherited by every cgroup below. Each is attached without flags (not
//! `BPF_F_ALLOW_OVERRIDE`, not `BPF_F_ALLOW_MULTI`): it is the only program
//! at its hook on the run cgroup, and the kernel refuses any attachment in
//! a cgroup below it (the bundle has neither `bpf(2)` nor the capabilities
//! anyway). Programs an ancestor attached with `BPF_F_ALLOW_MULTI` (systemd's
//! `DevicePolicy=`, `IPAddressDeny=`) still run as well: every program must
//! allow an access, so neither side can widen the other.
//!
//! A cgroup BPF program can only answer EPERM; nothing is audited. So each
//! program, on refusing, appends a record (what, which address and port or
//! which device) to one array map per run: slot 0 counts every refusal,
//! slots 1-[`MAX_RECORDS`] keep the first ones. The agent holds the map's
//! descriptor and reads it after the run ([`CgroupFilters::read_denials`]);
//! if it cannot, the run's denials are unknown, never zero.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use serde::Serialize;

use super::bpf_asm::{self, Asm, AsmError, Label, Reg, R0, R1, R10, R2, R6, R7};
use super::bpf_sys::{self, ArrayMap, AttachType, BpfError};
use super::spec::NetRule;
use super::{device_filter, net_filter};

/// Records kept per run; the count in slot 0 goes on beyond it.
pub const MAX_RECORDS: u32 = 64;
/// Bytes per map value: `hook, a, b, c` (u32 each) and 16 address bytes.
const VALUE_SIZE: u32 = 32;
pub(super) const REC_HOOK: i16 = 0;
pub(super) const REC_A: i16 = 4;
pub(super) const REC_B: i16 = 8;
pub(super) const REC_C: i16 = 12;
pub(super) const REC_ADDR: i16 = 16;

#[derive(Debug, thiserror::Error)]
pub enum CgroupFilterError {
    #[error("cannot load the run cgroup's BPF programs (the agent needs CAP_BPF or CAP_SYS_ADMIN, CAP_NET_ADMIN and bpf(2) not filtered; the kernel CONFIG_CGROUP_BPF): {0}")]
    Bpf(#[from] BpfError),
    #[error("assembling a BPF program: {0}")]
    Asm(#[from] AsmError),
    #[error("opening the run cgroup {path}: {source}")]
    Cgroup {
        path: String,
        source: std::io::Error,
    },
}

/// Which program refused (the record's `hook` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Hook {
    Connect4 = 1,
    Connect6 = 2,
    Sendmsg4 = 3,
    Sendmsg6 = 4,
    Bind4 = 5,
    Bind6 = 6,
    Device = 7,
}

impl Hook {
    fn from_u32(v: u32) -> Option<Hook> {
        [
            Hook::Connect4,
            Hook::Connect6,
            Hook::Sendmsg4,
            Hook::Sendmsg6,
            Hook::Bind4,
            Hook::Bind6,
            Hook::Device,
        ]
        .into_iter()
        .find(|h| *h as u32 == v)
    }
}

/// One refusal recorded by a program.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FilterDenial {
    /// As in the report: `net.connect_tcp`, `net.sendmsg_udp`,
    /// `net.bind_udp`, `device.read_write`, ...
    pub access: String,
    /// `127.0.0.1:47012`, `[::1]:53`, `block 7:0`.
    pub object: String,
}

/// Everything the programs refused in one run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FilterDenials {
    /// Every refusal, including those beyond the kept records.
    pub count: u64,
    /// The first [`MAX_RECORDS`].
    pub records: Vec<FilterDenial>,
}

/// What is attached to one run's cgroup, and the map to read afterwards.
#[derive(Debug)]
pub struct CgroupFilters {
    denials: ArrayMap,
    /// Network hooks attached (0 without a network scope: the run has a
    /// private network namespace then).
    pub net_hooks: usize,
}

/// Load and attach the device program, and the network programs when
/// `network` is not empty, to the cgroup at `cgroup_dir`.
pub fn attach(cgroup_dir: &Path, network: &[NetRule]) -> Result<CgroupFilters, CgroupFilterError> {
    let denials = ArrayMap::create("rg_denials", VALUE_SIZE, MAX_RECORDS + 1)?;
    let cgroup = File::open(cgroup_dir).map_err(|source| CgroupFilterError::Cgroup {
        path: cgroup_dir.display().to_string(),
        source,
    })?;
    let map_fd = denials.fd().as_raw_fd();
    let mut programs = vec![(
        "rg_device",
        bpf_sys::BPF_PROG_TYPE_CGROUP_DEVICE,
        AttachType::CgroupDevice,
        device_filter::program(map_fd)?,
    )];
    if !network.is_empty() {
        for (name, attach, insns) in net_filter::programs(network, map_fd)? {
            programs.push((name, bpf_sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR, attach, insns));
        }
    }
    let net_hooks = programs.len() - 1;
    for (name, prog_type, attach, insns) in programs {
        let prog = bpf_sys::load_program(name, prog_type, attach, &insns)?;
        bpf_sys::attach(name, cgroup.as_fd(), prog.as_fd(), attach)?;
        // The cgroup holds the program from here on; our descriptor can go.
    }
    tracing::debug!(cgroup = %cgroup_dir.display(), net_hooks, "cgroup BPF programs attached");
    Ok(CgroupFilters { denials, net_hooks })
}

/// Whether this process can load a cgroup BPF program at all (the kernel
/// has CONFIG_CGROUP_BPF, the agent CAP_BPF or CAP_SYS_ADMIN, and no
/// seccomp filter of the service refuses `bpf(2)`). Loads the smallest
/// device program ("allow") and drops it: nothing is attached.
pub fn can_load() -> bool {
    let mut asm = Asm::new();
    asm.ret(1);
    asm.finish().is_ok_and(|insns| {
        bpf_sys::load_program(
            "rg_probe",
            bpf_sys::BPF_PROG_TYPE_CGROUP_DEVICE,
            AttachType::CgroupDevice,
            &insns,
        )
        .is_ok()
    })
}

impl CgroupFilters {
    /// What the programs refused (read once the run's processes are gone).
    pub fn read_denials(&self) -> Result<FilterDenials, BpfError> {
        let header = self.denials.get(0)?;
        let count = u64::from_ne_bytes(header[..8].try_into().unwrap_or_default());
        let kept = count.min(u64::from(MAX_RECORDS)) as u32;
        let mut records = Vec::with_capacity(kept as usize);
        for key in 1..=kept {
            let value = self.denials.get(key)?;
            // A slot claimed but not yet written when the run was killed
            // reads as zeros (hook 0): counted, not described.
            if let Some(record) = decode(&value) {
                records.push(record);
            }
        }
        Ok(FilterDenials { count, records })
    }
}

fn word(value: &[u8], off: i16) -> u32 {
    let off = off as usize;
    u32::from_ne_bytes(value[off..off + 4].try_into().unwrap_or_default())
}

fn decode(value: &[u8]) -> Option<FilterDenial> {
    let hook = Hook::from_u32(word(value, REC_HOOK))?;
    if hook == Hook::Device {
        return Some(device_filter::describe(
            word(value, REC_A),
            word(value, REC_B),
            word(value, REC_C),
        ));
    }
    let protocol = match word(value, REC_A) {
        6 => "tcp".to_string(),
        17 => "udp".to_string(),
        other => format!("proto{other}"),
    };
    // The port as the kernel stores it: network byte order in the low half.
    let port_bytes = word(value, REC_B).to_ne_bytes();
    let port = u16::from_be_bytes([port_bytes[0], port_bytes[1]]);
    let addr_bytes = &value[REC_ADDR as usize..REC_ADDR as usize + 16];
    let (verb, addr) = match hook {
        Hook::Connect4 | Hook::Sendmsg4 | Hook::Bind4 => {
            let a: [u8; 4] = addr_bytes[..4].try_into().unwrap_or_default();
            (hook, IpAddr::V4(Ipv4Addr::from(a)))
        }
        _ => {
            let a: [u8; 16] = addr_bytes.try_into().unwrap_or_default();
            (hook, IpAddr::V6(Ipv6Addr::from(a)))
        }
    };
    let verb = match verb {
        Hook::Connect4 | Hook::Connect6 => "connect",
        Hook::Sendmsg4 | Hook::Sendmsg6 => "sendmsg",
        _ => "bind",
    };
    let object = match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    };
    Some(FilterDenial {
        access: format!("net.{verb}_{protocol}"),
        object,
    })
}

/// Emit the refusal path: count it, record `fields` (context offset →
/// record offset, 32-bit each) in the next free slot, return 0 (EPERM).
/// The context pointer must be in R6.
pub(super) fn emit_deny(
    asm: &mut Asm,
    map_fd: i32,
    hook: Hook,
    fields: &[(i16, i16)],
) -> Result<(), AsmError> {
    let out: Label = asm.label();
    // key = 0 on the stack; r0 = &slot[0].
    asm.store32_imm(R10, -4, 0);
    lookup(asm, map_fd);
    asm.jeq64_imm(R0, 0, out);
    // r1 = atomic_fetch_add(slot[0].count, 1): our index among refusals.
    asm.mov64_imm(R1, 1).fetch_add64(R0, 0, R1);
    asm.jge64_imm(R1, MAX_RECORDS as i32, out);
    asm.add64_imm(R1, 1).store32(R10, -4, R1);
    lookup(asm, map_fd);
    asm.jeq64_imm(R0, 0, out);
    asm.mov64(R7, R0);
    asm.store32_imm(R7, REC_HOOK, hook as u32);
    for &(ctx_off, rec_off) in fields {
        asm.load32(R1, R6, ctx_off).store32(R7, rec_off, R1);
    }
    asm.bind(out);
    asm.ret(0);
    Ok(())
}

/// `r0 = bpf_map_lookup_elem(map, r10 - 4)`.
fn lookup(asm: &mut Asm, map_fd: i32) {
    asm.load_map_fd(R1, map_fd)
        .mov64(R2, R10)
        .add64_imm(R2, -4)
        .call(bpf_asm::HELPER_MAP_LOOKUP_ELEM);
}

/// Register holding a loaded context field while comparing.
pub(super) const SCRATCH: Reg = R2;

#[cfg(test)]
mod tests {
    use super::*;

    fn record(hook: Hook, a: u32, b: [u8; 4], c: u32, addr: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; VALUE_SIZE as usize];
        v[0..4].copy_from_slice(&(hook as u32).to_ne_bytes());
        v[4..8].copy_from_slice(&a.to_ne_bytes());
        v[8..12].copy_from_slice(&b);
        v[12..16].copy_from_slice(&c.to_ne_bytes());
        v[16..16 + addr.len()].copy_from_slice(addr);
        v
    }

    #[test]
    fn records_decode_to_report_entries() {
        let port = 47012u16.to_be_bytes();
        let v = record(
            Hook::Connect4,
            6,
            [port[0], port[1], 0, 0],
            1,
            &[127, 0, 0, 1],
        );
        assert_eq!(
            decode(&v).unwrap(),
            FilterDenial {
                access: "net.connect_tcp".into(),
                object: "127.0.0.1:47012".into()
            }
        );
        let v6 = Ipv6Addr::LOCALHOST.octets();
        let v = record(Hook::Sendmsg6, 17, [0, 53, 0, 0], 2, &v6);
        assert_eq!(decode(&v).unwrap().object, "[::1]:53");
        assert_eq!(decode(&v).unwrap().access, "net.sendmsg_udp");
        assert_eq!(decode(&[0u8; 32]), None);
    }
}
