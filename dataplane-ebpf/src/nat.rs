//! Rewriting addresses and ports of an IPv4 or IPv6 TCP/UDP/SCTP packet in
//! tc, keeping the IP and L4 checksums valid (incrementally, via the
//! kernel's csum helpers; an IPv4 UDP checksum of 0 stays 0; IPv6 has no
//! header checksum, and its L4 checksums cover the 16-byte addresses of
//! the pseudo-header; SCTP's CRC32c, which covers no addresses, through
//! `common::crc32c::port_change`).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_csum_diff,
    programs::TcContext,
};
use common::{crc32c, proto, trace::FAMILY_IPV6, FlowTuple, Reason};

use crate::{
    packet::{l3_csum_replace, l4_csum_replace, load, store},
    parse::{
        ETH_HLEN, IP6_DST_OFF, IP6_SRC_OFF, IPV6_HLEN, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF,
        SCTP_CSUM_OFF,
    },
};

/// Rewrites the packet from tuple `from` to tuple `to` (fields that differ).
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    l4_off: usize,
    from: &FlowTuple,
    to: &FlowTuple,
) -> Result<(), Reason> {
    if from.family == FAMILY_IPV6 {
        return rewrite_v6(ctx, l4_off, from, to);
    }
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

/// IPv6: each changed address is stored whole and the L4 checksum moved
/// by the difference (`bpf_csum_diff` over the 16 bytes, applied to the
/// pseudo-header with `BPF_F_PSEUDO_HDR`, so a partially checksummed
/// packet from a pod stays right); the ports as for IPv4. SCTP: addresses
/// stored, ports through the CRC32c. Its own BPF function, out of IPv4's
/// way.
#[inline(never)]
fn rewrite_v6(
    ctx: &TcContext,
    l4_off: usize,
    from: &FlowTuple,
    to: &FlowTuple,
) -> Result<(), Reason> {
    let sctp = from.protocol == proto::IPPROTO_SCTP;
    let (csum_off, l4_flags) = if from.protocol == proto::IPPROTO_TCP {
        (l4_off + 16, 0)
    } else {
        // IPv6 UDP always has a checksum; a sum that comes out 0 is sent
        // as 0xffff, which the flag does.
        (l4_off + 6, u64::from(BPF_F_MARK_MANGLED_0))
    };
    for (off, old, new) in [
        (IP6_SRC_OFF, &from.saddr, &to.saddr),
        (IP6_DST_OFF, &from.daddr, &to.daddr),
    ] {
        if old != new {
            if !sctp {
                let diff = addr_diff(old, new)?;
                l4_csum_replace(
                    ctx,
                    csum_off,
                    0,
                    diff,
                    u64::from(BPF_F_PSEUDO_HDR) | l4_flags,
                )?;
            }
            store(ctx, off, new)?;
        }
    }
    if (from.sport, from.dport) == (to.sport, to.dport) {
        return Ok(());
    }
    if sctp {
        let payload = u16::from_be_bytes(load::<[u8; 2]>(ctx, ETH_HLEN + 4)?);
        let sctp_len =
            (u32::from(payload) + IPV6_HLEN as u32).saturating_sub((l4_off - ETH_HLEN) as u32);
        return sctp_ports(ctx, l4_off, from, to, sctp_len);
    }
    if from.sport != to.sport {
        set_port(ctx, l4_off, csum_off, from.sport, to.sport, l4_flags)?;
    }
    if from.dport != to.dport {
        set_port(ctx, l4_off + 2, csum_off, from.dport, to.dport, l4_flags)?;
    }
    Ok(())
}

/// The one's-complement difference between two 16-byte addresses, as the
/// checksum helpers take it.
#[inline(always)]
fn addr_diff(old: &[u8; 16], new: &[u8; 16]) -> Result<u64, Reason> {
    // SAFETY: both point at 16 readable bytes; the helper only reads them.
    let diff = unsafe {
        bpf_csum_diff(
            old.as_ptr() as *mut u32,
            16,
            new.as_ptr() as *mut u32,
            16,
            0,
        )
    };
    if diff < 0 {
        return Err(Reason::ChecksumUpdateFailed);
    }
    Ok(diff as u64)
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
    sctp_ports(ctx, l4_off, from, to, sctp_len)
}

/// SCTP's ports, with the CRC32c changed by what they change over an SCTP
/// packet of `sctp_len` bytes.
#[inline(always)]
fn sctp_ports(
    ctx: &TcContext,
    l4_off: usize,
    from: &FlowTuple,
    to: &FlowTuple,
    sctp_len: u32,
) -> Result<(), Reason> {
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
