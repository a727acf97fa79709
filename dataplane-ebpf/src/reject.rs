//! Answers built in the datapath, like kube-proxy's REJECT: an ICMP port
//! unreachable, or for IPv6 an ICMPv6 destination unreachable, port
//! unreachable (type 1 code 4, kube-proxy's `icmp6-port-unreachable`), for
//! a service without endpoints or a port not served; and a TCP reset (flow
//! to a removed backend). The packet is rewritten in place into the answer
//! and redirected back towards the sender.

use aya_ebpf::{bindings::BPF_F_INGRESS, helpers::bpf_skb_change_tail, programs::TcContext};
use common::{
    proto::{
        self, ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH,
        TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
    },
    DatapathConfig, Hook, Reason,
};

use crate::{
    action::TcAction,
    csum::{fold, sum_words},
    fib::redirect,
    maps::{DP_REPLY_BUDGET, DP_SCRATCH},
    packet::{load, skb_load, skb_store},
    parse::{EthHdr, Ipv4Hdr, ETH_HLEN, ICMP_HLEN, IPV6_HLEN, IPV6_MAX_EXT_LEN},
};

const IPV4_HLEN: usize = 20;
const TCP_HLEN: usize = 20;
/// The original IP header (with options) and the first 8 bytes after it.
const INNER_MAX: usize = 60 + 8;
const ICMP_REPLY_MAX: usize = ETH_HLEN + IPV4_HLEN + ICMP_HLEN + INNER_MAX;
/// How much of the packet an ICMPv6 error quotes at most: its IPv6 header,
/// extension headers up to the datapath's limit, and the start of its L4
/// header, so the sender finds its socket. (RFC 4443 allows up to 1 232
/// bytes; the sender needs no more than this.)
const QUOTE6_MAX: usize = IPV6_HLEN + IPV6_MAX_EXT_LEN + 16;
const ICMP6_REPLY_MAX: usize = ETH_HLEN + IPV6_HLEN + ICMP_HLEN + QUOTE6_MAX;
/// Size of a `DP_SCRATCH` buffer: fits every answer.
pub const SCRATCH_LEN: usize = 256;
const _: () = assert!(ICMP_REPLY_MAX <= SCRATCH_LEN);
const _: () = assert!(ICMP6_REPLY_MAX <= SCRATCH_LEN);
const TCP_RESET_LEN: usize = ETH_HLEN + IPV4_HLEN + TCP_HLEN;
const TCP6_RESET_LEN: usize = ETH_HLEN + IPV6_HLEN + TCP_HLEN;
/// Hop limit of the IPv6 answers (the kernel's default).
const HOP_LIMIT: u8 = 64;

/// Turns the packet into an ICMP port unreachable from its destination to
/// its source and redirects it back; returns the tc action.
#[inline(always)]
pub fn icmp_port_unreachable(ctx: &TcContext, hook: Hook) -> Result<TcAction, Reason> {
    let eth: EthHdr = load(ctx, 0)?;
    let ip: Ipv4Hdr = load(ctx, ETH_HLEN)?;
    // Explicit bounds on a fresh read: the verifier needs them for the
    // variable-length copy below. A packet too short to quote gets no answer.
    let inner_len = usize::from(ip.version_ihl & 0x0f) * 4 + 8;
    if inner_len < IPV4_HLEN + 8 || inner_len > INNER_MAX {
        return Err(Reason::RejectFailed);
    }
    if (ctx.len() as usize) < ETH_HLEN + inner_len {
        return Err(Reason::RejectFailed);
    }
    let buf = scratch()?;
    *buf = [0; SCRATCH_LEN];
    let inner_off = ETH_HLEN + IPV4_HLEN + ICMP_HLEN;
    let inner_end = inner_off + inner_len;
    if inner_end > SCRATCH_LEN {
        return Err(Reason::RejectFailed);
    }
    skb_load(ctx, ETH_HLEN, &mut buf[inner_off..inner_end])?;
    let total = inner_off + inner_len;

    write_eth_reply(buf, &eth);
    write_ipv4(
        buf,
        (IPV4_HLEN + ICMP_HLEN + inner_len) as u16,
        proto::IPPROTO_ICMP,
        ip.daddr,
        ip.saddr,
    );
    let icmp = ETH_HLEN + IPV4_HLEN;
    buf[icmp] = ICMP_DEST_UNREACH;
    buf[icmp + 1] = ICMP_PORT_UNREACH;
    let sum = fold(sum_words(buf, icmp, ICMP_HLEN + inner_len, 0));
    buf[icmp + 2..icmp + 4].copy_from_slice(&sum.to_be_bytes());
    send_back(ctx, hook, buf, total)
}

/// Turns an IPv6 packet into an ICMPv6 port unreachable from its
/// destination to its source and redirects it back; returns the tc action.
#[inline(always)]
pub fn icmp6_port_unreachable(ctx: &TcContext, hook: Hook) -> Result<TcAction, Reason> {
    let eth: EthHdr = load(ctx, 0)?;
    let pkt_len = ctx.len() as usize;
    if pkt_len < ETH_HLEN + IPV6_HLEN {
        return Err(Reason::RejectFailed);
    }
    let mut quote = pkt_len - ETH_HLEN;
    if quote > QUOTE6_MAX {
        quote = QUOTE6_MAX;
    }
    let buf = scratch()?;
    *buf = [0; SCRATCH_LEN];
    let inner_off = ETH_HLEN + IPV6_HLEN + ICMP_HLEN;
    // Explicit bounds for the verifier (the variable-length copy).
    if quote < IPV6_HLEN || inner_off + quote > SCRATCH_LEN {
        return Err(Reason::RejectFailed);
    }
    skb_load(ctx, ETH_HLEN, &mut buf[inner_off..inner_off + quote])?;

    buf[0..6].copy_from_slice(&eth.src);
    buf[6..12].copy_from_slice(&eth.dst);
    buf[12..14].copy_from_slice(&proto::ETH_P_IPV6.to_be_bytes());
    let h = ETH_HLEN;
    let payload = ICMP_HLEN + quote;
    buf[h] = 0x60;
    buf[h + 4..h + 6].copy_from_slice(&(payload as u16).to_be_bytes());
    buf[h + 6] = proto::IPPROTO_ICMPV6;
    buf[h + 7] = HOP_LIMIT;
    // From the quoted packet's destination to its source.
    buf.copy_within(inner_off + 24..inner_off + 40, h + 8);
    buf.copy_within(inner_off + 8..inner_off + 24, h + 24);
    let c = h + IPV6_HLEN;
    buf[c] = ICMPV6_DEST_UNREACH;
    buf[c + 1] = ICMPV6_PORT_UNREACH;
    // Pseudo-header (addresses, upper-layer length, next header), then the
    // message; an odd length sums the zero byte after it (the buffer is
    // zeroed), as the checksum pads it.
    let mut sum = sum_words(buf, h + 8, 32, 0);
    sum += payload as u32 + u32::from(proto::IPPROTO_ICMPV6);
    let sum = fold(sum_words(buf, c, (payload + 1) & !1, sum));
    buf[c + 2..c + 4].copy_from_slice(&sum.to_be_bytes());
    send_back(ctx, hook, buf, inner_off + quote)
}

/// `tcp_reset` for IPv6: `l4_off` is past the extension headers, which the
/// reset does not carry.
#[inline(always)]
pub fn tcp6_reset(ctx: &TcContext, hook: Hook, l4_off: usize) -> Result<TcAction, Reason> {
    let buf = scratch()?;
    *buf = [0; SCRATCH_LEN];
    // Staging, after the answer: the original Ethernet + IPv6 header, and
    // the TCP header.
    const ORIG_IP: usize = TCP6_RESET_LEN + ETH_HLEN;
    const ORIG_TCP: usize = ORIG_IP + IPV6_HLEN;
    const _: () = assert!(ORIG_TCP + TCP_HLEN <= SCRATCH_LEN);
    skb_load(ctx, 0, &mut buf[ORIG_IP - ETH_HLEN..ORIG_IP + IPV6_HLEN])?;
    skb_load(ctx, l4_off, &mut buf[ORIG_TCP..ORIG_TCP + TCP_HLEN])?;
    let ext_len = l4_off.saturating_sub(ETH_HLEN + IPV6_HLEN);
    let doff = usize::from(buf[ORIG_TCP + 12] >> 4) * 4;
    let payload_len = usize::from(u16::from_be_bytes([buf[ORIG_IP + 4], buf[ORIG_IP + 5]]));
    let payload = payload_len.saturating_sub(ext_len + doff) as u32;
    let flags = buf[ORIG_TCP + 13];
    let seq = u32::from_be_bytes([
        buf[ORIG_TCP + 4],
        buf[ORIG_TCP + 5],
        buf[ORIG_TCP + 6],
        buf[ORIG_TCP + 7],
    ]);

    let e = ORIG_IP - ETH_HLEN;
    buf.copy_within(e + 6..e + 12, 0);
    buf.copy_within(e..e + 6, 6);
    buf[12..14].copy_from_slice(&proto::ETH_P_IPV6.to_be_bytes());
    let h = ETH_HLEN;
    buf[h] = 0x60;
    buf[h + 4..h + 6].copy_from_slice(&(TCP_HLEN as u16).to_be_bytes());
    buf[h + 6] = proto::IPPROTO_TCP;
    buf[h + 7] = HOP_LIMIT;
    buf.copy_within(ORIG_IP + 24..ORIG_IP + 40, h + 8);
    buf.copy_within(ORIG_IP + 8..ORIG_IP + 24, h + 24);
    let t = ETH_HLEN + IPV6_HLEN;
    reset_header(buf, t, ORIG_TCP, flags, seq, payload);
    let mut pseudo = sum_words(buf, h + 8, 32, 0);
    pseudo += u32::from(proto::IPPROTO_TCP) + TCP_HLEN as u32;
    let sum = fold(sum_words(buf, t, TCP_HLEN, pseudo));
    buf[t + 16..t + 18].copy_from_slice(&sum.to_be_bytes());
    send_back(ctx, hook, buf, TCP6_RESET_LEN)
}

/// The reset's TCP header at `t`, from the original one staged at `orig`:
/// ports swapped, RFC 793's sequence rules (checksum left to the caller).
#[inline(always)]
fn reset_header(
    buf: &mut [u8; SCRATCH_LEN],
    t: usize,
    orig: usize,
    flags: u8,
    seq: u32,
    payload: u32,
) {
    buf.copy_within(orig + 2..orig + 4, t);
    buf.copy_within(orig..orig + 2, t + 2);
    if flags & TCP_ACK != 0 {
        buf.copy_within(orig + 8..orig + 12, t + 4);
        buf[t + 13] = TCP_RST;
    } else {
        let mut ack = seq.wrapping_add(payload);
        if flags & TCP_SYN != 0 {
            ack = ack.wrapping_add(1);
        }
        if flags & TCP_FIN != 0 {
            ack = ack.wrapping_add(1);
        }
        buf[t + 8..t + 12].copy_from_slice(&ack.to_be_bytes());
        buf[t + 13] = TCP_RST | TCP_ACK;
    }
    buf[t + 12] = (TCP_HLEN as u8 / 4) << 4;
}

/// Turns a TCP packet into a reset from its destination to its source, as a
/// closed port would answer it (RFC 793), and redirects it back. The original
/// headers are staged in the scratch buffer after the answer's bytes, not on
/// the stack (the call chain's 512 bytes are tight).
#[inline(always)]
pub fn tcp_reset(ctx: &TcContext, hook: Hook, l4_off: usize) -> Result<TcAction, Reason> {
    let buf = scratch()?;
    *buf = [0; SCRATCH_LEN];
    // Staging, after the answer's TCP_RESET_LEN bytes: the original
    // Ethernet + IPv4 header, and the TCP header.
    const ORIG_IP: usize = TCP_RESET_LEN + ETH_HLEN;
    const ORIG_TCP: usize = ORIG_IP + IPV4_HLEN;
    const _: () = assert!(ORIG_TCP + TCP_HLEN <= SCRATCH_LEN);
    skb_load(ctx, 0, &mut buf[ORIG_IP - ETH_HLEN..ORIG_IP + IPV4_HLEN])?;
    skb_load(ctx, l4_off, &mut buf[ORIG_TCP..ORIG_TCP + TCP_HLEN])?;
    let ihl = usize::from(buf[ORIG_IP] & 0x0f) * 4;
    let doff = usize::from(buf[ORIG_TCP + 12] >> 4) * 4;
    let tot_len = usize::from(u16::from_be_bytes([buf[ORIG_IP + 2], buf[ORIG_IP + 3]]));
    let payload = tot_len.saturating_sub(ihl + doff) as u32;
    let flags = buf[ORIG_TCP + 13];
    let seq = u32::from_be_bytes([
        buf[ORIG_TCP + 4],
        buf[ORIG_TCP + 5],
        buf[ORIG_TCP + 6],
        buf[ORIG_TCP + 7],
    ]);

    // Ethernet: addresses swapped.
    let e = ORIG_IP - ETH_HLEN;
    buf.copy_within(e + 6..e + 12, 0);
    buf.copy_within(e..e + 6, 6);
    buf[12..14].copy_from_slice(&proto::ETH_P_IP.to_be_bytes());
    // IPv4: from the packet's destination to its source.
    let h = ETH_HLEN;
    buf[h] = 0x45;
    buf[h + 2..h + 4].copy_from_slice(&((IPV4_HLEN + TCP_HLEN) as u16).to_be_bytes());
    buf[h + 6] = 0x40; // DF
    buf[h + 8] = 64; // TTL
    buf[h + 9] = proto::IPPROTO_TCP;
    buf.copy_within(ORIG_IP + 16..ORIG_IP + 20, h + 12);
    buf.copy_within(ORIG_IP + 12..ORIG_IP + 16, h + 16);
    let sum = fold(sum_words(buf, h, IPV4_HLEN, 0));
    buf[h + 10..h + 12].copy_from_slice(&sum.to_be_bytes());
    // TCP: ports swapped; RFC 793 sequence rules.
    let t = ETH_HLEN + IPV4_HLEN;
    reset_header(buf, t, ORIG_TCP, flags, seq, payload);
    // Pseudo header: addresses, protocol, TCP length.
    let mut pseudo = sum_words(buf, ETH_HLEN + 12, 8, 0);
    pseudo += u32::from(proto::IPPROTO_TCP) + TCP_HLEN as u32;
    let sum = fold(sum_words(buf, t, TCP_HLEN, pseudo));
    buf[t + 16..t + 18].copy_from_slice(&sum.to_be_bytes());
    send_back(ctx, hook, buf, TCP_RESET_LEN)
}

/// Takes one reply from this CPU's budget (`DatapathConfig::reply_rate_per_s`
/// and `reply_burst`): `Err(limited)` when it is spent, so the packet is
/// dropped for that reason instead of answered. The kernel's own ICMP rate
/// limit never sees replies built here.
#[inline(always)]
pub fn budget(cfg: &DatapathConfig, now: u64, limited: Reason) -> Result<(), Reason> {
    // SAFETY: per-CPU value; programs do not nest on one CPU in tc.
    let b = DP_REPLY_BUDGET
        .get_ptr_mut(0)
        .map(|p| unsafe { &mut *p })
        .ok_or(Reason::ScratchUnavailable)?;
    if b.take(now, cfg.reply_rate_per_s, cfg.reply_burst) {
        Ok(())
    } else {
        Err(limited)
    }
}

/// This CPU's scratch buffer (too big for the 512-byte BPF stack).
#[inline(always)]
pub fn scratch() -> Result<&'static mut [u8; SCRATCH_LEN], Reason> {
    // SAFETY: per-CPU value; programs do not nest on one CPU in tc.
    DP_SCRATCH
        .get_ptr_mut(0)
        .map(|p| unsafe { &mut *p })
        .ok_or(Reason::ScratchUnavailable)
}

/// Ethernet header of a reply: addresses swapped, IPv4.
#[inline(always)]
fn write_eth_reply(buf: &mut [u8], eth: &EthHdr) {
    buf[0..6].copy_from_slice(&eth.src);
    buf[6..12].copy_from_slice(&eth.dst);
    buf[12..14].copy_from_slice(&proto::ETH_P_IP.to_be_bytes());
}

/// A 20-byte IPv4 header at `ETH_HLEN` with its checksum.
#[inline(always)]
fn write_ipv4(buf: &mut [u8], tot_len: u16, protocol: u8, saddr: [u8; 4], daddr: [u8; 4]) {
    let h = ETH_HLEN;
    buf[h] = 0x45;
    buf[h + 2..h + 4].copy_from_slice(&tot_len.to_be_bytes());
    buf[h + 6] = 0x40; // DF
    buf[h + 8] = 64; // TTL
    buf[h + 9] = protocol;
    buf[h + 12..h + 16].copy_from_slice(&saddr);
    buf[h + 16..h + 20].copy_from_slice(&daddr);
    let sum = fold(sum_words(buf, h, IPV4_HLEN, 0));
    buf[h + 10..h + 12].copy_from_slice(&sum.to_be_bytes());
}

/// Replaces the packet with `buf[..len]` and redirects it to the sender: out
/// of the interface it came in on (ingress), or up into this host's stack
/// (egress: the sender is a local process).
#[inline(always)]
fn send_back<const N: usize>(
    ctx: &TcContext,
    hook: Hook,
    buf: &[u8; N],
    len: usize,
) -> Result<TcAction, Reason> {
    if len > N {
        return Err(Reason::RejectFailed);
    }
    let skb = ctx.skb.skb;
    // SAFETY: the context pointer; `len` is within `buf`.
    if unsafe { bpf_skb_change_tail(skb, len as u32, 0) } != 0 {
        return Err(Reason::RejectFailed);
    }
    skb_store(ctx, 0, &buf[..len])?;
    // SAFETY: the context pointer.
    let ifindex = unsafe { (*skb).ifindex };
    let flags = if hook == Hook::TcEgress {
        u64::from(BPF_F_INGRESS)
    } else {
        0
    };
    redirect(ifindex, flags)
}
