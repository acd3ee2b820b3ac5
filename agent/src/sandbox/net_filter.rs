//! The run's network allow-list, compiled into
//! `BPF_PROG_TYPE_CGROUP_SOCK_ADDR` programs on the run cgroup: the kernel
//! checks protocol, destination address and port of every `connect(2)`
//! (TCP and UDP), every unconnected UDP `sendmsg(2)`/`sendto(2)` and every
//! `bind(2)`, by every process of the run, before anything leaves.
//!
//! Why cgroup BPF rather than a network namespace with nftables: the run
//! keeps the host's addresses and routes (a maintenance script talks to the
//! host's own services and mirrors), no veth, NAT or nftables state is set
//! up and torn down per run, and the check is on the socket call itself, so
//! a refusal is an immediate EPERM that names the process's attempt and can
//! be recorded ([`super::cgroup_filters`]) rather than a dropped packet.
//! Each run's list is fixed when the run starts, so it is emitted straight
//! into instructions (a chain of compares), no map lookup per packet.
//!
//! - `connect4`/`connect6`: allowed iff some rule matches protocol
//!   (the socket's: TCP or UDP), address block and port. IPv4 rules also
//!   match their IPv4-mapped IPv6 form (`::ffff:10.0.0.5`) in `connect6`.
//! - `sendmsg4`/`sendmsg6` (UDP to an explicit address): the same, UDP
//!   rules only. A connected UDP socket was checked at `connect`.
//! - `bind4`/`bind6`: only the wildcard address with port 0, which is what
//!   the kernel does implicitly for any client socket; a bundle never
//!   listens on or claims a port. (Landlock refuses every TCP bind before
//!   this program runs.)
//!
//! Which socket types exist at all (TCP and UDP only: no raw, packet or
//! MPTCP sockets) is seccomp's part ([`super::seccomp_filter`]).

use std::net::IpAddr;

use rollguard_shared::endpoint::{IpNet, Protocol};

use super::bpf_asm::{Asm, AsmError, Insn, R6};
use super::bpf_sys::AttachType;
use super::cgroup_filters::{emit_deny, Hook, REC_A, REC_ADDR, REC_B, REC_C, SCRATCH};
use super::spec::NetRule;

// `struct bpf_sock_addr` offsets (<linux/bpf.h>).
const CTX_USER_IP4: i16 = 4;
const CTX_USER_IP6: i16 = 8;
const CTX_USER_PORT: i16 = 24;
const CTX_TYPE: i16 = 32;
const CTX_PROTOCOL: i16 = 36;

const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    /// Offsets of the destination address words in the context.
    fn addr_words(self) -> Vec<i16> {
        match self {
            Family::V4 => vec![CTX_USER_IP4],
            Family::V6 => (0..4).map(|i| CTX_USER_IP6 + 4 * i).collect(),
        }
    }
}

/// A program for one hook: its name, attach type and instructions.
pub type HookProgram = (&'static str, AttachType, Vec<Insn>);

/// One program per hook.
pub fn programs(rules: &[NetRule], map_fd: i32) -> Result<Vec<HookProgram>, AsmError> {
    let any = |_: &NetRule| true;
    let udp = |r: &NetRule| r.protocol == Protocol::Udp;
    Ok(vec![
        (
            "rg_connect4",
            AttachType::Inet4Connect,
            allow_list(rules, any, Family::V4, Hook::Connect4, map_fd)?,
        ),
        (
            "rg_connect6",
            AttachType::Inet6Connect,
            allow_list(rules, any, Family::V6, Hook::Connect6, map_fd)?,
        ),
        (
            "rg_sendmsg4",
            AttachType::Udp4Sendmsg,
            allow_list(rules, udp, Family::V4, Hook::Sendmsg4, map_fd)?,
        ),
        (
            "rg_sendmsg6",
            AttachType::Udp6Sendmsg,
            allow_list(rules, udp, Family::V6, Hook::Sendmsg6, map_fd)?,
        ),
        (
            "rg_bind4",
            AttachType::Inet4Bind,
            wildcard_bind_only(Family::V4, Hook::Bind4, map_fd)?,
        ),
        (
            "rg_bind6",
            AttachType::Inet6Bind,
            wildcard_bind_only(Family::V6, Hook::Bind6, map_fd)?,
        ),
    ])
}

/// The port as the context holds it: network byte order in the low half.
fn port_word(port: u16) -> u32 {
    u32::from(u16::from_ne_bytes(port.to_be_bytes()))
}

/// A 4-byte group of network-order bytes as the context's 32-bit load
/// sees it.
fn words(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks(4)
        .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The rule's block as seen by a socket of `family`, if it can match.
fn block_for(net: &IpNet, family: Family) -> Option<IpNet> {
    match (net.addr(), family) {
        (IpAddr::V4(_), Family::V4) | (IpAddr::V6(_), Family::V6) => Some(*net),
        (IpAddr::V4(_), Family::V6) => Some(net.to_ipv6_mapped()),
        (IpAddr::V6(_), Family::V4) => None,
    }
}

fn record_fields(family: Family) -> Vec<(i16, i16)> {
    let mut fields = vec![
        (CTX_PROTOCOL, REC_A),
        (CTX_USER_PORT, REC_B),
        (CTX_TYPE, REC_C),
    ];
    fields.extend(
        family
            .addr_words()
            .into_iter()
            .enumerate()
            .map(|(i, off)| (off, REC_ADDR + 4 * i as i16)),
    );
    fields
}

fn allow_list(
    rules: &[NetRule],
    applies: impl Fn(&NetRule) -> bool,
    family: Family,
    hook: Hook,
    map_fd: i32,
) -> Result<Vec<Insn>, AsmError> {
    let mut asm = Asm::new();
    let allow = asm.label();
    asm.mov64(R6, super::bpf_asm::R1);
    let mut any_rule = false;
    for rule in rules.iter().filter(|r| applies(r)) {
        let Some(block) = block_for(&rule.net, family) else {
            continue;
        };
        any_rule = true;
        let next = asm.label();
        let protocol = match rule.protocol {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        };
        asm.load32(SCRATCH, R6, CTX_PROTOCOL)
            .jne32_imm(SCRATCH, protocol, next);
        asm.load32(SCRATCH, R6, CTX_USER_PORT)
            .jne32_imm(SCRATCH, port_word(rule.port), next);
        let addr = words(&block.octets());
        let mask = words(&block.mask_octets());
        for ((off, want), mask) in family.addr_words().into_iter().zip(addr).zip(mask) {
            if mask == 0 {
                continue;
            }
            asm.load32(SCRATCH, R6, off);
            if mask != u32::MAX {
                asm.and32_imm(SCRATCH, mask);
            }
            asm.jne32_imm(SCRATCH, want, next);
        }
        asm.ja(allow);
        asm.bind(next);
    }
    emit_deny(&mut asm, map_fd, hook, &record_fields(family))?;
    // The verifier refuses unreachable instructions: without a rule for
    // this hook, the program only refuses.
    if any_rule {
        asm.bind(allow);
        asm.ret(1);
    }
    asm.finish()
}

fn wildcard_bind_only(family: Family, hook: Hook, map_fd: i32) -> Result<Vec<Insn>, AsmError> {
    let mut asm = Asm::new();
    let deny = asm.label();
    asm.mov64(R6, super::bpf_asm::R1);
    asm.load32(SCRATCH, R6, CTX_USER_PORT)
        .jne32_imm(SCRATCH, 0, deny);
    for off in family.addr_words() {
        asm.load32(SCRATCH, R6, off).jne32_imm(SCRATCH, 0, deny);
    }
    asm.ret(1);
    asm.bind(deny);
    emit_deny(&mut asm, map_fd, hook, &record_fields(family))?;
    asm.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_addresses_are_compared_in_network_order() {
        // 443 = 0x01bb travels as the bytes 01 bb.
        assert_eq!(port_word(443).to_ne_bytes()[..2], [0x01, 0xbb]);
        assert_eq!(words(&[127, 0, 0, 1])[0].to_ne_bytes(), [127, 0, 0, 1]);
    }

    #[test]
    fn every_hook_assembles() {
        let rules = vec![
            NetRule {
                protocol: Protocol::Tcp,
                net: IpNet::parse("10.0.0.0/24").unwrap(),
                port: 443,
            },
            NetRule {
                protocol: Protocol::Udp,
                net: IpNet::parse("::1").unwrap(),
                port: 53,
            },
        ];
        let programs = programs(&rules, 3).unwrap();
        assert_eq!(programs.len(), 6);
        // connect6 matches the IPv4 rule in its mapped form as well.
        let connect4 = &programs[0].2;
        let connect6 = &programs[1].2;
        assert!(connect6.len() > connect4.len());
    }
}
