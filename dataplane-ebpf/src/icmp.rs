//! ICMP errors about translated flows (fragmentation needed, port
//! unreachable, time exceeded, parameter problem), translated like the flow
//! they quote, in either direction:
//!
//! - towards the client (a backend, or a router on the way to it, reports a
//!   problem with a client -> backend packet): the quoted destination becomes
//!   the service address again (and the quoted source the real client, if
//!   masqueraded); an error from the backend itself then comes from the
//!   service address.
//! - towards the backend (the client reports a problem with a reply it got
//!   from the service address): the quoted source becomes the backend and the
//!   error is sent to it.
//!
//! The quoted packet is the original IP header and 8 bytes of it (RFC 792),
//! rewritten in a scratch buffer with its checksums, then the ICMP checksum
//! is recomputed and the outer addresses rewritten.

use aya_ebpf::programs::TcContext;
use common::{
    addr::v4_mapped,
    ct::{CT_DIR_REPLY, CT_FLAG_SNAT},
    proto::{self, ICMP_DEST_UNREACH, ICMP_PARAMETERPROB, ICMP_TIME_EXCEEDED},
    CtKey, Reason, TraceEvent,
};

use crate::{
    conntrack as ct,
    csum::{fold, replace16, sum_words},
    lb,
    maps::DP_REVNAT,
    packet::{l3_csum_replace, load, skb_load, skb_store, store},
    parse::{Ipv4Hdr, ETH_HLEN, ICMP_HLEN, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF},
    reject::{scratch, SCRATCH_LEN},
};

/// Quoted IP header (with options) + 8 bytes.
const QUOTE_MAX: usize = 60 + 8;

/// What the quoted packet and the outer header become.
#[derive(Default)]
pub struct Rewrite {
    quote_len: usize,
    protocol: u8,
    quoted_src: [u8; 4],
    quoted_sport: u16,
    quoted_dst: [u8; 4],
    quoted_dport: u16,
    outer_src: [u8; 4],
    outer_dst: [u8; 4],
    old_outer_src: [u8; 4],
    old_outer_dst: [u8; 4],
}

/// Whether the ICMP message at `l4_off` is an error that quotes a packet.
#[inline(always)]
pub fn is_error(ctx: &TcContext, l4_off: usize) -> Result<bool, Reason> {
    Ok(matches!(
        load::<u8>(ctx, l4_off)?,
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB
    ))
}

/// Translates the ICMP error at `l4_off` if it is about a tracked flow.
/// `Ok(true)`: translated (`ev.translated` holds the new outer addresses);
/// `Ok(false)`: not about a tracked service flow; `Err`: why reading or
/// rewriting it failed.
/// The lookup and the rewrite are separate BPF functions, called one after
/// the other (not nested), to keep the call chain within the 512-byte stack.
/// A BPF function of its own: `datapath::icmp_error` serves both families,
/// and the IPv4 plan kept in its frame took the IPv6 chain past the stack.
#[inline(never)]
pub fn translate_error(
    ctx: &TcContext,
    l4_off: usize,
    ev: &mut TraceEvent,
) -> Result<bool, Reason> {
    let mut rw = Rewrite::default();
    if !plan(ctx, l4_off, ev, &mut rw)? {
        return Ok(false);
    }
    rewrite_icmp(ctx, l4_off, &rw)?;
    rewrite_outer(ctx, &rw)?;
    ev.translated.saddr = v4_mapped(rw.outer_src);
    ev.translated.daddr = v4_mapped(rw.outer_dst);
    Ok(true)
}

/// Finds the flow the error is about and fills `rw`; `false` if none.
#[inline(never)]
fn plan(
    ctx: &TcContext,
    l4_off: usize,
    ev: &mut TraceEvent,
    rw: &mut Rewrite,
) -> Result<bool, Reason> {
    let quote_off = l4_off + ICMP_HLEN;
    let inner: Ipv4Hdr = load(ctx, quote_off)?;
    let quote_len = usize::from(inner.version_ihl & 0x0f) * 4 + 8;
    if quote_len < 28 || quote_len > QUOTE_MAX {
        return Ok(false);
    }
    if inner.protocol != proto::IPPROTO_TCP && inner.protocol != proto::IPPROTO_UDP {
        return Ok(false);
    }
    let ports_off = quote_off + quote_len - 8;
    let ports: [u8; 4] = load(ctx, ports_off)?;
    let (sport, dport) = (
        u16::from_be_bytes([ports[0], ports[1]]),
        u16::from_be_bytes([ports[2], ports[3]]),
    );
    // The quoted packet went from `inner.saddr` to `inner.daddr`; the flow's
    // entry for the other direction is keyed by the quote reversed.
    let key = CtKey {
        saddr: v4_mapped(inner.daddr),
        daddr: v4_mapped(inner.saddr),
        sport: dport,
        dport: sport,
        protocol: inner.protocol,
        _pad: [0; 3],
    };
    let Some(e) = ct::lookup(&key, ct::now_ns()) else {
        return Ok(false);
    };
    // SAFETY: map value pointer, copied.
    let entry = unsafe { *e };
    let outer: Ipv4Hdr = load(ctx, ETH_HLEN)?;
    let snat = entry.flags & CT_FLAG_SNAT != 0;
    *rw = Rewrite {
        quote_len,
        protocol: inner.protocol,
        quoted_src: inner.saddr,
        quoted_sport: sport,
        quoted_dst: inner.daddr,
        quoted_dport: dport,
        outer_src: outer.saddr,
        outer_dst: outer.daddr,
        old_outer_src: outer.saddr,
        old_outer_dst: outer.daddr,
    };
    if entry.direction == CT_DIR_REPLY {
        // Quoted: client (or masquerade address) -> backend. Towards the client.
        let Some(frontend) = DP_REVNAT.get_ptr(&entry.service_id) else {
            return Ok(false);
        };
        // SAFETY: map value pointer.
        let (vip, vport) = unsafe { (v4(&(*frontend).addr), (*frontend).port) };
        if outer.saddr == inner.daddr {
            rw.outer_src = vip;
        }
        rw.quoted_dst = vip;
        rw.quoted_dport = vport;
        if snat {
            rw.quoted_src = v4(&entry.nat_addr);
            rw.quoted_sport = entry.nat_port;
            rw.outer_dst = v4(&entry.nat_addr);
        }
    } else {
        // Quoted: service -> client (a reply). Towards the backend.
        let Some(backend) = lb::backend(entry.backend_id) else {
            return Ok(false);
        };
        rw.quoted_src = v4(&backend.addr);
        rw.quoted_sport = backend.port;
        rw.outer_dst = v4(&backend.addr);
        if snat {
            rw.quoted_dst = v4(&entry.nat_addr);
            rw.quoted_dport = entry.nat_port;
            rw.outer_src = v4(&entry.nat_addr);
        }
    }
    ev.service_id = entry.service_id;
    ev.backend_id = entry.backend_id;
    Ok(true)
}

#[inline(always)]
fn v4(a: &[u8; 16]) -> [u8; 4] {
    [a[12], a[13], a[14], a[15]]
}

/// Rewrites the quoted packet and the ICMP checksum, in the scratch buffer.
#[inline(never)]
fn rewrite_icmp(ctx: &TcContext, l4_off: usize, rw: &Rewrite) -> Result<(), Reason> {
    let (quote_len, protocol) = (rw.quote_len, rw.protocol);
    let buf = scratch()?;
    let len = ICMP_HLEN + quote_len;
    // `plan` bounds the quote; the verifier wants to see it here.
    if len > SCRATCH_LEN || !(36..=ICMP_HLEN + QUOTE_MAX).contains(&len) {
        return Err(Reason::RewriteFailed);
    }
    skb_load(ctx, l4_off, &mut buf[..len])?;
    // The ICMP checksum covers the whole message, and a quote often goes
    // on past what is loaded here (Linux quotes up to 576 bytes): it is
    // updated for the bytes that change (RFC 1624), never recomputed over
    // the loaded part alone. Found by the fuzzer (an odd byte past the 8
    // quoted bytes).
    let icmp_csum = u16::from_be_bytes([buf[2], buf[3]]);
    buf[2] = 0;
    buf[3] = 0;
    let before = sum_words(buf, 0, len, 0);
    let q = ICMP_HLEN; // quoted IP header
    let ihl = quote_len - 8;
    let l4 = q + ihl; // quoted ports
                      // Variable offsets go through get/put: no panic path for the verifier.
    let (old_src, old_dst) = (word(buf, q + 12), word(buf, q + 16));
    let (old_sport, old_dport) = (half(buf, l4), half(buf, l4 + 2));
    // The quoted UDP checksum (TCP's lies beyond the 8 quoted bytes) follows
    // the address and port changes; zero means none.
    if protocol == proto::IPPROTO_UDP {
        let mut c = half(buf, l4 + 6);
        if c != 0 {
            c = replace_words(c, &old_src, &rw.quoted_src);
            c = replace_words(c, &old_dst, &rw.quoted_dst);
            c = replace16(c, old_sport, rw.quoted_sport);
            c = replace16(c, old_dport, rw.quoted_dport);
            put(buf, l4 + 6, &c.to_be_bytes());
        }
    }
    put(buf, q + 12, &rw.quoted_src);
    put(buf, q + 16, &rw.quoted_dst);
    put(buf, l4, &rw.quoted_sport.to_be_bytes());
    put(buf, l4 + 2, &rw.quoted_dport.to_be_bytes());
    buf[q + 10] = 0;
    buf[q + 11] = 0;
    let ip_sum = fold(sum_words(buf, q, ihl, 0));
    buf[q + 10..q + 12].copy_from_slice(&ip_sum.to_be_bytes());
    let after = sum_words(buf, 0, len, 0);
    // HC' = ~(~HC + ~m + m'): `fold` of the old sum is its complement.
    let icmp_sum = fold(u32::from(!icmp_csum) + u32::from(fold(before)) + after);
    buf[2..4].copy_from_slice(&icmp_sum.to_be_bytes());
    skb_store(ctx, l4_off, &buf[..len])?;
    Ok(())
}

#[inline(always)]
fn word(buf: &[u8], off: usize) -> [u8; 4] {
    let mut w = [0u8; 4];
    if let Some(b) = buf.get(off..off.saturating_add(4)) {
        w.copy_from_slice(b);
    }
    w
}

#[inline(always)]
fn half(buf: &[u8], off: usize) -> u16 {
    match buf.get(off..off.saturating_add(2)) {
        Some(b) => u16::from_be_bytes([b[0], b[1]]),
        None => 0,
    }
}

#[inline(always)]
fn put<const N: usize>(buf: &mut [u8], off: usize, bytes: &[u8; N]) {
    if let Some(dst) = buf.get_mut(off..off.saturating_add(N)) {
        dst.copy_from_slice(bytes);
    }
}

/// Checksum `c` after the 4 bytes `old` become `new` (two 16-bit words).
#[inline(always)]
fn replace_words(c: u16, old: &[u8; 4], new: &[u8; 4]) -> u16 {
    let c = replace16(
        c,
        u16::from_be_bytes([old[0], old[1]]),
        u16::from_be_bytes([new[0], new[1]]),
    );
    replace16(
        c,
        u16::from_be_bytes([old[2], old[3]]),
        u16::from_be_bytes([new[2], new[3]]),
    )
}

/// The outer addresses; ICMP has no pseudo header, so only the IP checksum.
#[inline(always)]
fn rewrite_outer(ctx: &TcContext, rw: &Rewrite) -> Result<(), Reason> {
    for (off, old, new) in [
        (IP_SRC_OFF, rw.old_outer_src, rw.outer_src),
        (IP_DST_OFF, rw.old_outer_dst, rw.outer_dst),
    ] {
        if old != new {
            let (o, n) = (u32::from_ne_bytes(old), u32::from_ne_bytes(new));
            l3_csum_replace(ctx, IP_CSUM_OFF, u64::from(o), u64::from(n), 4)?;
            store(ctx, off, &n)?;
        }
    }
    Ok(())
}
