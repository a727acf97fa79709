//! Rewriting addresses and ports of an IPv4 TCP/UDP/SCTP packet in tc,
//! keeping the IP and L4 checksums valid (incrementally, via the kernel's
//! csum helpers; a UDP checksum of 0 stays 0; SCTP's CRC32c, which covers
//! no addresses, through `common::crc32c::port_change`).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use common::{crc32c, proto, FlowTuple, Reason};

use crate::{
    packet::{l3_csum_replace, l4_csum_replace, load, store},
    parse::{ETH_HLEN, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, SCTP_CSUM_OFF},
};

/// Rewrites the packet from tuple `from` to tuple `to` (fields that differ).
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    l4_off: usize,
    from: &FlowTuple,
    to: &FlowTuple,
) -> Result<(), Reason> {
    if from.protocol == proto::IPPROTO_SCTP {
        return rewrite_sctp(ctx, l4_off, from, to);
    }
    let (csum_off, l4_flags) = if from.protocol == proto::IPPROTO_TCP {
        (l4_off + 16, 0)
    } else {
        (l4_off + 6, u64::from(BPF_F_MARK_MANGLED_0))
    };
    if from.saddr != to.saddr {
        set_addr(ctx, IP_SRC_OFF, csum_off, &from.saddr, &to.saddr, l4_flags)?;
    }
    if from.daddr != to.daddr {
        set_addr(ctx, IP_DST_OFF, csum_off, &from.daddr, &to.daddr, l4_flags)?;
    }
    if from.sport != to.sport {
        set_port(ctx, l4_off, csum_off, from.sport, to.sport, l4_flags)?;
    }
    if from.dport != to.dport {
        set_port(ctx, l4_off + 2, csum_off, from.dport, to.dport, l4_flags)?;
    }
    Ok(())
}

/// SCTP: the addresses with the IP checksum only; the ports with the
/// CRC32c changed by what they change (its own BPF function: the CRC
/// arithmetic's loops stay out of the caller's frame).
#[inline(never)]
fn rewrite_sctp(
    ctx: &TcContext,
    l4_off: usize,
    from: &FlowTuple,
    to: &FlowTuple,
) -> Result<(), Reason> {
    for (off, old, new) in [
        (IP_SRC_OFF, &from.saddr, &to.saddr),
        (IP_DST_OFF, &from.daddr, &to.daddr),
    ] {
        if old != new {
            let (o, n) = (u64::from(word(old)), u64::from(word(new)));
            l3_csum_replace(ctx, IP_CSUM_OFF, o, n, 4)?;
            store(ctx, off, &word(new))?;
        }
    }
    if (from.sport, from.dport) == (to.sport, to.dport) {
        return Ok(());
    }
    let tot_len = u16::from_be_bytes(load::<[u8; 2]>(ctx, ETH_HLEN + 2)?);
    let sctp_len = u32::from(tot_len).saturating_sub((l4_off - ETH_HLEN) as u32);
    let delta = crc32c::port_change((from.sport, from.dport), (to.sport, to.dport), sctp_len);
    let mut sum: [u8; 4] = load(ctx, l4_off + SCTP_CSUM_OFF)?;
    let mut i = 0;
    while i < 4 {
        sum[i] ^= delta[i];
        i += 1;
    }
    store(
        ctx,
        l4_off,
        &[to.sport.to_be_bytes(), to.dport.to_be_bytes()],
    )?;
    store(ctx, l4_off + SCTP_CSUM_OFF, &sum)
}

/// The IPv4 address of a 16-byte (IPv4-mapped) address, as the 32-bit word
/// the checksum helpers take (network byte order in memory).
#[inline(always)]
fn word(a: &[u8; 16]) -> u32 {
    u32::from_ne_bytes([a[12], a[13], a[14], a[15]])
}

#[inline(always)]
fn set_addr(
    ctx: &TcContext,
    off: usize,
    csum_off: usize,
    from: &[u8; 16],
    to: &[u8; 16],
    l4_flags: u64,
) -> Result<(), Reason> {
    let (old, new) = (u64::from(word(from)), u64::from(word(to)));
    let pseudo = u64::from(BPF_F_PSEUDO_HDR) | 4 | l4_flags;
    l4_csum_replace(ctx, csum_off, old, new, pseudo)?;
    l3_csum_replace(ctx, IP_CSUM_OFF, old, new, 4)?;
    store(ctx, off, &word(to))
}

#[inline(always)]
fn set_port(
    ctx: &TcContext,
    off: usize,
    csum_off: usize,
    from: u16,
    to: u16,
    l4_flags: u64,
) -> Result<(), Reason> {
    let (old, new) = (u64::from(from.to_be()), u64::from(to.to_be()));
    l4_csum_replace(ctx, csum_off, old, new, 2 | l4_flags)?;
    store(ctx, off, &to.to_be())
}
