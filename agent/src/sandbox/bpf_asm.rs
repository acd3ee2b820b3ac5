//! A tiny eBPF assembler: the handful of instructions the run cgroup's
//! programs need ([`super::net_filter`], [`super::device_filter`]), with
//! forward labels. No BPF toolchain is available at build time and the BPF
//! crates (aya, libbpf-rs) load compiled objects; each run's allow-list is
//! fixed, so the agent emits it straight into instructions instead.
//!
//! Encodings follow `<linux/bpf.h>` and `<linux/bpf_common.h>`. Comparisons
//! of 32-bit context fields use the JMP32 class (Linux 5.1), so an
//! immediate is compared with the low 32 bits only.

/// One `struct bpf_insn` (8 bytes). `regs` packs `dst_reg` (low nibble) and
/// `src_reg` (high nibble), as the bit-fields are laid out on a
/// little-endian machine; big-endian machines are refused at build time.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

#[cfg(not(target_endian = "little"))]
compile_error!("the BPF instruction encoding here assumes a little-endian machine");

/// Registers: R0 return value, R1-R5 helper arguments (clobbered by calls),
/// R6-R9 callee-saved, R10 read-only frame pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reg(pub u8);
pub const R0: Reg = Reg(0);
pub const R1: Reg = Reg(1);
pub const R2: Reg = Reg(2);
pub const R6: Reg = Reg(6);
pub const R7: Reg = Reg(7);
pub const R10: Reg = Reg(10);

// Classes.
const BPF_LD: u8 = 0x00;
const BPF_LDX: u8 = 0x01;
const BPF_ST: u8 = 0x02;
const BPF_STX: u8 = 0x03;
const BPF_ALU: u8 = 0x04;
const BPF_JMP: u8 = 0x05;
const BPF_JMP32: u8 = 0x06;
const BPF_ALU64: u8 = 0x07;
// Sizes and modes.
const BPF_W: u8 = 0x00;
const BPF_DW: u8 = 0x18;
const BPF_IMM: u8 = 0x00;
const BPF_MEM: u8 = 0x60;
const BPF_ATOMIC: u8 = 0xc0;
// Operations and sources.
const BPF_K: u8 = 0x00;
const BPF_X: u8 = 0x08;
const BPF_ADD: u8 = 0x00;
const BPF_AND: u8 = 0x50;
const BPF_MOV: u8 = 0xb0;
const BPF_JA: u8 = 0x00;
const BPF_JEQ: u8 = 0x10;
const BPF_JGE: u8 = 0x30;
const BPF_JNE: u8 = 0x50;
const BPF_CALL: u8 = 0x80;
const BPF_EXIT: u8 = 0x90;
const BPF_FETCH: i32 = 0x01;
/// `src_reg` of a 64-bit immediate load that names a map by fd.
const BPF_PSEUDO_MAP_FD: u8 = 1;

/// Helper `bpf_map_lookup_elem(map, key)`.
pub const HELPER_MAP_LOOKUP_ELEM: i32 = 1;

/// A jump target, placed with [`Asm::bind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Label(usize);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AsmError {
    #[error("label {0} used but never placed")]
    Unbound(usize),
    #[error("jump from instruction {0} is out of range")]
    TooFar(usize),
}

/// An instruction list under construction.
#[derive(Debug, Default)]
pub struct Asm {
    insns: Vec<Insn>,
    labels: Vec<Option<usize>>,
    /// (instruction index, label) of each jump to patch.
    fixups: Vec<(usize, Label)>,
}

fn ins(code: u8, dst: Reg, src: Reg, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (dst.0 & 0x0f) | (src.0 << 4),
        off,
        imm,
    }
}

impl Asm {
    pub fn new() -> Self {
        Asm::default()
    }

    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    /// Place `label` at the next instruction.
    pub fn bind(&mut self, label: Label) {
        self.labels[label.0] = Some(self.insns.len());
    }

    fn push(&mut self, insn: Insn) -> &mut Self {
        self.insns.push(insn);
        self
    }

    fn jump(&mut self, insn: Insn, to: Label) -> &mut Self {
        self.fixups.push((self.insns.len(), to));
        self.push(insn)
    }

    /// `dst = src` (64-bit).
    pub fn mov64(&mut self, dst: Reg, src: Reg) -> &mut Self {
        self.push(ins(BPF_ALU64 | BPF_MOV | BPF_X, dst, src, 0, 0))
    }

    /// `dst = imm` (64-bit, sign-extended).
    pub fn mov64_imm(&mut self, dst: Reg, imm: i32) -> &mut Self {
        self.push(ins(BPF_ALU64 | BPF_MOV | BPF_K, dst, R0, 0, imm))
    }

    /// `dst += imm` (64-bit).
    pub fn add64_imm(&mut self, dst: Reg, imm: i32) -> &mut Self {
        self.push(ins(BPF_ALU64 | BPF_ADD | BPF_K, dst, R0, 0, imm))
    }

    /// `dst &= imm` (32-bit: the upper half is cleared).
    pub fn and32_imm(&mut self, dst: Reg, imm: u32) -> &mut Self {
        self.push(ins(BPF_ALU | BPF_AND | BPF_K, dst, R0, 0, imm as i32))
    }

    /// `dst = *(u32 *)(src + off)`.
    pub fn load32(&mut self, dst: Reg, src: Reg, off: i16) -> &mut Self {
        self.push(ins(BPF_LDX | BPF_MEM | BPF_W, dst, src, off, 0))
    }

    /// `*(u32 *)(dst + off) = src`.
    pub fn store32(&mut self, dst: Reg, off: i16, src: Reg) -> &mut Self {
        self.push(ins(BPF_STX | BPF_MEM | BPF_W, dst, src, off, 0))
    }

    /// `*(u32 *)(dst + off) = imm`.
    pub fn store32_imm(&mut self, dst: Reg, off: i16, imm: u32) -> &mut Self {
        self.push(ins(BPF_ST | BPF_MEM | BPF_W, dst, R0, off, imm as i32))
    }

    /// `src = atomic_fetch_add((u64 *)(dst + off), src)`.
    pub fn fetch_add64(&mut self, dst: Reg, off: i16, src: Reg) -> &mut Self {
        self.push(ins(
            BPF_STX | BPF_ATOMIC | BPF_DW,
            dst,
            src,
            off,
            i32::from(BPF_ADD) | BPF_FETCH,
        ))
    }

    /// `dst = map` (the map's fd, resolved by the kernel at load time):
    /// two instruction slots.
    pub fn load_map_fd(&mut self, dst: Reg, map_fd: i32) -> &mut Self {
        self.push(ins(
            BPF_LD | BPF_DW | BPF_IMM,
            dst,
            Reg(BPF_PSEUDO_MAP_FD),
            0,
            map_fd,
        ));
        self.push(ins(0, R0, R0, 0, 0))
    }

    /// `if (u32)dst != imm goto to`.
    pub fn jne32_imm(&mut self, dst: Reg, imm: u32, to: Label) -> &mut Self {
        self.jump(ins(BPF_JMP32 | BPF_JNE | BPF_K, dst, R0, 0, imm as i32), to)
    }

    /// `if (u32)dst == imm goto to`.
    pub fn jeq32_imm(&mut self, dst: Reg, imm: u32, to: Label) -> &mut Self {
        self.jump(ins(BPF_JMP32 | BPF_JEQ | BPF_K, dst, R0, 0, imm as i32), to)
    }

    /// `if dst == imm goto to` (64-bit).
    pub fn jeq64_imm(&mut self, dst: Reg, imm: i32, to: Label) -> &mut Self {
        self.jump(ins(BPF_JMP | BPF_JEQ | BPF_K, dst, R0, 0, imm), to)
    }

    /// `if dst >= imm goto to` (64-bit, unsigned).
    pub fn jge64_imm(&mut self, dst: Reg, imm: i32, to: Label) -> &mut Self {
        self.jump(ins(BPF_JMP | BPF_JGE | BPF_K, dst, R0, 0, imm), to)
    }

    pub fn ja(&mut self, to: Label) -> &mut Self {
        self.jump(ins(BPF_JMP | BPF_JA, R0, R0, 0, 0), to)
    }

    pub fn call(&mut self, helper: i32) -> &mut Self {
        self.push(ins(BPF_JMP | BPF_CALL, R0, R0, 0, helper))
    }

    pub fn exit(&mut self) -> &mut Self {
        self.push(ins(BPF_JMP | BPF_EXIT, R0, R0, 0, 0))
    }

    /// `return imm`.
    pub fn ret(&mut self, imm: i32) -> &mut Self {
        self.mov64_imm(R0, imm).exit()
    }

    /// The finished program, every jump resolved.
    pub fn finish(mut self) -> Result<Vec<Insn>, AsmError> {
        for (at, label) in std::mem::take(&mut self.fixups) {
            let target = self.labels[label.0].ok_or(AsmError::Unbound(label.0))?;
            let off = target as i64 - (at as i64 + 1);
            self.insns[at].off = i16::try_from(off).map_err(|_| AsmError::TooFar(at))?;
        }
        Ok(self.insns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_the_kernel_headers() {
        let mut a = Asm::new();
        let done = a.label();
        a.load32(R7, R6, 36) // ldxw r7, [r6+36]
            .jne32_imm(R7, 6, done)
            .load_map_fd(R1, 9)
            .fetch_add64(R0, 0, R1);
        a.bind(done);
        a.ret(1);
        let p = a.finish().unwrap();
        assert_eq!(
            p[0],
            Insn {
                code: 0x61,
                regs: 0x67,
                off: 36,
                imm: 0
            }
        );
        // Jumps over the two-slot map load and the atomic add.
        assert_eq!(
            p[1],
            Insn {
                code: 0x56,
                regs: 0x07,
                off: 3,
                imm: 6
            }
        );
        assert_eq!(
            p[2],
            Insn {
                code: 0x18,
                regs: 0x11,
                off: 0,
                imm: 9
            }
        );
        assert_eq!(
            p[3],
            Insn {
                code: 0,
                regs: 0,
                off: 0,
                imm: 0
            }
        );
        assert_eq!(
            p[4],
            Insn {
                code: 0xdb,
                regs: 0x10,
                off: 0,
                imm: 1
            }
        );
        assert_eq!(
            p[5],
            Insn {
                code: 0xb7,
                regs: 0x00,
                off: 0,
                imm: 1
            }
        );
        assert_eq!(
            p[6],
            Insn {
                code: 0x95,
                regs: 0,
                off: 0,
                imm: 0
            }
        );
        assert_eq!(std::mem::size_of::<Insn>(), 8);
    }

    #[test]
    fn unplaced_labels_are_an_error() {
        let mut a = Asm::new();
        let nowhere = a.label();
        a.ja(nowhere);
        assert_eq!(a.finish(), Err(AsmError::Unbound(0)));
    }
}
