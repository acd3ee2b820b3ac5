//! The run's device allow-list: a `BPF_PROG_TYPE_CGROUP_DEVICE` program on
//! the run cgroup. Every open or mknod of a device node by a process of the
//! run is allowed only for the character devices of the sandbox's minimal
//! `/dev` ([`super::namespaces`]: null, zero, full, random, urandom, tty);
//! everything else, block devices in particular, is refused with EPERM and
//! recorded ([`super::cgroup_filters`]).
//!
//! This is the second layer behind the minimal `/dev` (no block device
//! node exists there, mknod of devices is refused by seccomp, Landlock and
//! the dropped CAP_MKNOD): a device node the bundle finds elsewhere (in a
//! write scope, on another mount) still cannot be opened.

use super::bpf_asm::{Asm, AsmError, Insn, R1, R6};
use super::cgroup_filters::{emit_deny, FilterDenial, Hook, REC_A, REC_B, REC_C, SCRATCH};
use super::namespaces::DEVICES;

// `struct bpf_cgroup_dev_ctx` offsets (<linux/bpf.h>).
const CTX_ACCESS_TYPE: i16 = 0;
const CTX_MAJOR: i16 = 4;
const CTX_MINOR: i16 = 8;
// `access_type` is `(BPF_DEVCG_ACC_* << 16) | BPF_DEVCG_DEV_*`.
const DEV_BLOCK: u32 = 1;
const DEV_CHAR: u32 = 2;
const ACC_MKNOD: u32 = 1;
const ACC_READ: u32 = 2;
const ACC_WRITE: u32 = 4;

/// The program: allow the listed character devices (any access: stage 2
/// creates them with mknod inside the run cgroup), refuse the rest.
pub fn program(map_fd: i32) -> Result<Vec<Insn>, AsmError> {
    let mut asm = Asm::new();
    let allow = asm.label();
    let deny = asm.label();
    asm.mov64(R6, R1);
    asm.load32(SCRATCH, R6, CTX_ACCESS_TYPE)
        .and32_imm(SCRATCH, 0xffff)
        .jne32_imm(SCRATCH, DEV_CHAR, deny);
    for (_, major, minor) in DEVICES {
        let next = asm.label();
        asm.load32(SCRATCH, R6, CTX_MAJOR)
            .jne32_imm(SCRATCH, major as u32, next);
        asm.load32(SCRATCH, R6, CTX_MINOR)
            .jeq32_imm(SCRATCH, minor as u32, allow);
        asm.bind(next);
    }
    asm.bind(deny);
    emit_deny(
        &mut asm,
        map_fd,
        Hook::Device,
        &[
            (CTX_ACCESS_TYPE, REC_A),
            (CTX_MAJOR, REC_B),
            (CTX_MINOR, REC_C),
        ],
    )?;
    asm.bind(allow);
    asm.ret(1);
    asm.finish()
}

/// A recorded refusal as a report entry: `device.read_write` on
/// `block 7:0`.
pub fn describe(access_type: u32, major: u32, minor: u32) -> FilterDenial {
    let kind = match access_type & 0xffff {
        DEV_BLOCK => "block",
        DEV_CHAR => "char",
        _ => "device",
    };
    let acc = access_type >> 16;
    let mut what = Vec::new();
    if acc & ACC_MKNOD != 0 {
        what.push("mknod");
    }
    if acc & ACC_READ != 0 {
        what.push("read");
    }
    if acc & ACC_WRITE != 0 {
        what.push("write");
    }
    if what.is_empty() {
        what.push("access");
    }
    FilterDenial {
        access: format!("device.{}", what.join("_")),
        object: format!("{kind} {major}:{minor}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembles_and_describes() {
        assert!(program(3).unwrap().len() > DEVICES.len() * 4);
        let d = describe((ACC_READ | ACC_WRITE) << 16 | DEV_BLOCK, 7, 0);
        assert_eq!(d.access, "device.read_write");
        assert_eq!(d.object, "block 7:0");
    }
}
