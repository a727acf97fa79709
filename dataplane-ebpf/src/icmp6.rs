//! ICMPv6 errors about translated flows (destination unreachable, packet
//! too big, time exceeded, parameter problem), translated like the flow
//! they quote, in either direction, as `icmp` does for IPv4. Packet too big
//! matters most: IPv6 routers never fragment, so a client learns its path
//! MTU only from these, and one about the backend's address would find no
//! socket.
//!
//! Two differences from IPv4: the ICMPv6 checksum covers a pseudo-header
//! with the outer addresses, so a change of those moves it too; and the
//! quote is usually long (up to 1 232 bytes), so the quoted TCP checksum
//! is there to follow the rewrite as well as UDP's. Quotes whose IPv6
//! header is followed by extension headers are left alone (passed): the
//! sender sent the original without any, as the datapath's own packets go.

use aya_ebpf::programs::TcContext;
use common::{
    ct::{CT_DIR_REPLY, CT_FLAG_SNAT},
    proto, CtKey, Reason, TraceEvent,
};

use crate::{
    conntrack as ct,
    csum::{fold, replace16, sum_words},
    lb,
    maps::DP_REVNAT,
    packet::{load, skb_load, skb_store},
    parse::{ICMP_HLEN, IP6_DST_OFF, IP6_SRC_OFF, IPV6_HLEN},
    reject::scratch,
};

/// The quoted bytes read and rewritten: the IPv6 header and a TCP header's
/// first 20 bytes (ports, and the checksum at 16), or a UDP header.
const QUOTE_TCP: usize = IPV6_HLEN + 20;
const QUOTE_UDP: usize = IPV6_HLEN + 8;
/// Where, in the scratch buffer, the message's first bytes go (offset 0)
/// and the outer addresses, old and new, are kept (the BPF stack is too
/// small for them next to the callers' frames).
const OUTER_OLD: usize = 96;
const OUTER_NEW: usize = OUTER_OLD + 32;

/// What the quoted packet becomes.
struct Quote {
    len: usize,
    protocol: u8,
    sport: u16,
    dport: u16,
}

/// Whether the ICMPv6 message at `l4_off` is an error (types below 128;
/// neighbour discovery, echo and the rest are informational).
#[inline(always)]
pub fn is_error(ctx: &TcContext, l4_off: usize) -> Result<bool, Reason> {
    Ok(matches!(
        load::<u8>(ctx, l4_off)?,
        proto::ICMPV6_DEST_UNREACH
            | proto::ICMPV6_PKT_TOOBIG
            | proto::ICMPV6_TIME_EXCEED
            | proto::ICMPV6_PARAMPROB
    ))
}

/// Translates the ICMPv6 error at `l4_off` if it is about a tracked flow.
/// `Ok(true)`: translated (`ev.translated` holds the new outer addresses);
/// `Ok(false)`: not about a tracked service flow.
#[inline(never)]
pub fn translate_error(
    ctx: &TcContext,
    l4_off: usize,
    ev: &mut TraceEvent,
) -> Result<bool, Reason> {
    let Some(q) = plan(ctx, l4_off, ev)? else {
        return Ok(false);
    };
    rewrite(ctx, l4_off, &q)?;
    let buf = scratch()?;
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&buf[OUTER_NEW..OUTER_NEW + 16]);
    dst.copy_from_slice(&buf[OUTER_NEW + 16..OUTER_NEW + 32]);
    ev.translated.saddr = src;
    ev.translated.daddr = dst;
    Ok(true)
}

/// Finds the flow the error is about; leaves the quoted packet's first
/// bytes at the start of the scratch buffer, rewritten in place but for
/// the ports and checksums (`rewrite` does those), and the outer addresses,
/// old and new, after them.
#[inline(never)]
fn plan(ctx: &TcContext, l4_off: usize, ev: &mut TraceEvent) -> Result<Option<Quote>, Reason> {
    let quote_off = l4_off + ICMP_HLEN;
    let head: [u8; 8] = load(ctx, quote_off)?;
    let protocol = head[6];
    let len = match protocol {
        proto::IPPROTO_TCP => QUOTE_TCP,
        proto::IPPROTO_UDP => QUOTE_UDP,
        _ => return Ok(None),
    };
    let buf = scratch()?;
    // The ICMPv6 header, then the quote's first bytes.
    let total = ICMP_HLEN + len;
    if total > OUTER_OLD || (ctx.len() as usize) < l4_off + total {
        return Ok(None);
    }
    skb_load(
        ctx,
        l4_off,
        buf.get_mut(..total).ok_or(Reason::RewriteFailed)?,
    )?;
    skb_load(ctx, IP6_SRC_OFF, &mut buf[OUTER_OLD..OUTER_OLD + 32])?;
    buf.copy_within(OUTER_OLD..OUTER_OLD + 32, OUTER_NEW);
    let q = ICMP_HLEN;
    let l4 = q + IPV6_HLEN;
    let (sport, dport) = (
        u16::from_be_bytes([buf[l4], buf[l4 + 1]]),
        u16::from_be_bytes([buf[l4 + 2], buf[l4 + 3]]),
    );
    // The quoted packet went from its source to its destination; the
    // flow's entry for the other direction is keyed by the quote reversed.
    let mut key = CtKey {
        saddr: [0; 16],
        daddr: [0; 16],
        sport: dport,
        dport: sport,
        protocol,
        _pad: [0; 3],
    };
    key.saddr.copy_from_slice(&buf[q + 24..q + 40]);
    key.daddr.copy_from_slice(&buf[q + 8..q + 24]);
    let Some(e) = ct::lookup(&key, ct::now_ns()) else {
        return Ok(None);
    };
    // SAFETY: map value pointer, copied.
    let entry = unsafe { *e };
    let snat = entry.flags & CT_FLAG_SNAT != 0;
    let mut quote = Quote {
        len,
        protocol,
        sport,
        dport,
    };
    if entry.direction == CT_DIR_REPLY {
        // Quoted: client (or masquerade address) -> backend. Towards the
        // client: the quoted destination is the service again; an error
        // from the backend itself comes from the service.
        let Some(frontend) = DP_REVNAT.get_ptr(&entry.service_id) else {
            return Ok(None);
        };
        // SAFETY: map value pointer.
        let (vip, vport) = unsafe { ((*frontend).addr, (*frontend).port) };
        if same16(buf, OUTER_OLD, q + 24) {
            buf[OUTER_NEW..OUTER_NEW + 16].copy_from_slice(&vip);
        }
        buf[q + 24..q + 40].copy_from_slice(&vip);
        quote.dport = vport;
        if snat {
            buf[q + 8..q + 24].copy_from_slice(&entry.nat_addr);
            quote.sport = entry.nat_port;
            buf[OUTER_NEW + 16..OUTER_NEW + 32].copy_from_slice(&entry.nat_addr);
        }
    } else {
        // Quoted: service -> client (a reply). Towards the backend.
        let Some(backend) = lb::backend(entry.backend_id) else {
            return Ok(None);
        };
        buf[q + 8..q + 24].copy_from_slice(&backend.addr);
        quote.sport = backend.port;
        buf[OUTER_NEW + 16..OUTER_NEW + 32].copy_from_slice(&backend.addr);
        if snat {
            buf[q + 24..q + 40].copy_from_slice(&entry.nat_addr);
            quote.dport = entry.nat_port;
            buf[OUTER_NEW..OUTER_NEW + 16].copy_from_slice(&entry.nat_addr);
        }
    }
    ev.service_id = entry.service_id;
    ev.backend_id = entry.backend_id;
    Ok(Some(quote))
}

/// Finishes the quote (ports, its L4 checksum) and moves the ICMPv6
/// checksum by everything that changed, the outer addresses of its
/// pseudo-header included, then writes the message's first bytes and the
/// outer addresses back. The checksum is updated, never recomputed: the
/// quote goes on past the bytes read here.
#[inline(never)]
fn rewrite(ctx: &TcContext, l4_off: usize, quote: &Quote) -> Result<(), Reason> {
    let buf = scratch()?;
    let len = ICMP_HLEN + quote.len;
    if len > ICMP_HLEN + QUOTE_TCP || len < ICMP_HLEN + QUOTE_UDP {
        return Err(Reason::RewriteFailed);
    }
    // What the checksum covered before: the original bytes, read again.
    let mut before = [0u8; ICMP_HLEN + QUOTE_TCP];
    // `get`, not indexing: no panic path for the verifier to refuse.
    skb_load(
        ctx,
        l4_off,
        before.get_mut(..len).ok_or(Reason::RewriteFailed)?,
    )?;
    let old_csum = u16::from_be_bytes([before[2], before[3]]);
    before[2] = 0;
    before[3] = 0;
    let mut old_sum = sum_words(&before, 0, len, 0);
    old_sum = sum_words(buf, OUTER_OLD, 32, old_sum);

    let l4 = ICMP_HLEN + IPV6_HLEN;
    buf[l4..l4 + 2].copy_from_slice(&quote.sport.to_be_bytes());
    buf[l4 + 2..l4 + 4].copy_from_slice(&quote.dport.to_be_bytes());
    // The quoted L4 checksum follows its addresses and ports (UDP's 0 is
    // "none" only over IPv4; kept as it is if met).
    let csum_at = if quote.protocol == proto::IPPROTO_TCP {
        l4 + 16
    } else {
        l4 + 6
    };
    let mut c = u16::from_be_bytes([buf[csum_at], buf[csum_at + 1]]);
    if c != 0 {
        let mut i = ICMP_HLEN + 8;
        while i < l4 + 4 {
            c = replace16(
                c,
                u16::from_be_bytes([before[i], before[i + 1]]),
                u16::from_be_bytes([buf[i], buf[i + 1]]),
            );
            i += 2;
        }
        buf[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
    }
    buf[2] = 0;
    buf[3] = 0;
    let mut new_sum = sum_words(buf, 0, len, 0);
    new_sum = sum_words(buf, OUTER_NEW, 32, new_sum);
    // HC' = ~(~HC + ~m + m'): `fold` of the old sum is its complement.
    let sum = fold(u32::from(!old_csum) + u32::from(fold(old_sum)) + new_sum);
    buf[2..4].copy_from_slice(&sum.to_be_bytes());
    skb_store(ctx, l4_off, buf.get(..len).ok_or(Reason::RewriteFailed)?)?;
    skb_store(ctx, IP6_SRC_OFF, &buf[OUTER_NEW..OUTER_NEW + 16])?;
    skb_store(ctx, IP6_DST_OFF, &buf[OUTER_NEW + 16..OUTER_NEW + 32])?;
    Ok(())
}

/// Whether the 16 bytes at `a` and at `b` in `buf` are equal (a loop, not
/// a slice comparison: BPF programs have no `memcmp`).
#[inline(always)]
fn same16(buf: &[u8], a: usize, b: usize) -> bool {
    let mut i = 0;
    while i < 16 {
        if buf.get(a + i) != buf.get(b + i) {
            return false;
        }
        i += 1;
    }
    true
}
