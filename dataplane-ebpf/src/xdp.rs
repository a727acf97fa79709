//! The XDP fast path on the node's external devices: service traffic whose
//! answer leaves by the device it came in on (NodePort, externalIP and
//! LoadBalancer flows to backends on other nodes, and their replies) is
//! translated and sent back out with `XDP_TX`, never entering the stack.
//! Drops (source ranges, eTP=Local without local endpoints) happen here too.
//! Everything else (rejects, backends behind another device, flows needing
//! repair) is passed untouched to tc, which shares the same conntrack. A new
//! flow XDP cannot send is still decided here: tracked, counted and traced
//! as forwarded with XDP's backend, then passed; tc finds it established.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};
use common::{
    crc32c, proto, trace::FAMILY_IPV6, DatapathConfig, FlowTuple, Hook, Reason, TraceEvent, Verdict,
};

use crate::{
    action::XdpAction,
    csum::replace16,
    fib,
    parse::{ETH_HLEN, IPV6_HLEN, IPV6_MAX_L4_OFF},
    service::{self, Flow, Step},
    trace::{decide, decide_drop},
};

/// Largest L4 offset: Ethernet plus an IPv4 header with every option.
const MAX_L4_OFF: usize = ETH_HLEN + 60;

/// Decides for a TCP/UDP/SCTP packet at XDP and carries the decision out.
#[inline(never)]
pub fn handle(ctx: &XdpContext, cfg: &DatapathConfig, ev: &mut TraceEvent) -> XdpAction {
    let l4_off = usize::from(ev.l4_off);
    let mut f = Flow::new(Hook::Xdp, cfg);
    let (reason, track_flags) = match service::first_step(&mut f, ev) {
        Step::Pass(reason) => {
            decide(ev, Verdict::Pass, reason);
            return XdpAction::Pass;
        }
        Step::Drop(reason) => return drop_packet(ev, reason),
        Step::Forward(reason) => (reason, None),
        Step::Reply => (Reason::ReplyReverseNat, None),
        Step::Track(flags, reason) => (reason, Some(flags)),
        Step::Reject(_) | Step::Reset | Step::BackendGone | Step::Reopen => return pass_to_tc(ev),
    };
    if let Some(flags) = track_flags {
        // Tracked here whichever program carries it out: tc finds the entry
        // and keeps this backend. (Choosing again in tc for the flows XDP
        // cannot send, those to local backends, gave remote ones 3/4.)
        match service::track(&f, ev, flags, reason) {
            Step::Forward(_) => {}
            Step::Drop(why) => return drop_packet(ev, why),
            _ => return pass_to_tc(ev),
        }
    }
    let Some(macs) = tx_macs(ctx, &ev.translated) else {
        if track_flags.is_some() {
            // The new flow is decided (and counted) here; tc carries it out.
            decide(ev, Verdict::Forward, reason);
            return XdpAction::Pass;
        }
        return pass_to_tc(ev);
    };
    if let Err(why) = rewrite(ctx, l4_off, &ev.original, &ev.translated, &macs) {
        return drop_packet(ev, why);
    }
    decide(ev, Verdict::Forward, reason);
    XdpAction::Tx
}

/// XDP: drops the packet for `reason`.
#[inline(always)]
fn drop_packet(ev: &mut TraceEvent, reason: Reason) -> XdpAction {
    decide_drop(ev, reason);
    XdpAction::Drop
}

/// Leaves the packet, untouched, to tc.
#[inline(always)]
fn pass_to_tc(ev: &mut TraceEvent) -> XdpAction {
    ev.translated = ev.original;
    ev.service_id = 0;
    ev.backend_id = 0;
    decide(ev, Verdict::Pass, Reason::XdpPassToTc);
    XdpAction::Pass
}

/// The MAC addresses (destination, then source) for sending the translated
/// packet `t` back out of the device it arrived on; `None` if the FIB routes
/// it elsewhere or has no neighbour entry yet (then tc and the stack do it).
#[inline(never)]
fn tx_macs(ctx: &XdpContext, t: &FlowTuple) -> Option<[u8; 12]> {
    let ifindex = ctx.ingress_ifindex() as u32;
    let mut slot = core::mem::MaybeUninit::uninit();
    let p = fib::params(
        &mut slot,
        t,
        ifindex,
        ctx.data_end() - ctx.data() - ETH_HLEN,
    );
    // SAFETY: valid context and params of the declared size.
    let rc = unsafe { bpf_fib_lookup(ctx.ctx.cast(), p, size_of::<FibParams>() as i32, 0) };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 || p.ifindex != ifindex {
        return None;
    }
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&p.dmac);
    macs[6..].copy_from_slice(&p.smac);
    Some(macs)
}

/// Rewrites the frame from `from` to `to` in place (addresses, ports, IP and
/// L4 checksums incrementally; a UDP checksum of 0 stays 0) and sets the
/// Ethernet addresses.
#[inline(never)]
fn rewrite(
    ctx: &XdpContext,
    l4_off: usize,
    from: &FlowTuple,
    to: &FlowTuple,
    macs: &[u8; 12],
) -> Result<(), Reason> {
    if from.family == FAMILY_IPV6 {
        return rewrite_v6(ctx, l4_off, from, to, macs);
    }
    // Bounds for the verifier: `parse` checked these headers on this frame.
    if l4_off > MAX_L4_OFF {
        return Err(Reason::RewriteFailed);
    }
    if from.protocol == proto::IPPROTO_SCTP {
        return rewrite_sctp(ctx, l4_off, from, to, macs);
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    let l4 = data + l4_off;
    let is_tcp = from.protocol == proto::IPPROTO_TCP;
    if data + ETH_HLEN + 20 > end || l4 + 8 > end {
        return Err(Reason::RewriteFailed);
    }
    // TCP's checksum ends at byte 18 of its header, UDP's at 8.
    let csum_ptr = if is_tcp {
        if l4 + 18 > end {
            return Err(Reason::RewriteFailed);
        }
        l4 + 16
    } else {
        l4 + 6
    } as *mut [u8; 2];
    let ip = data + ETH_HLEN;
    // SAFETY: every access below is inside [data, end), checked above.
    unsafe {
        let mut l4_csum = u16::from_be_bytes(*csum_ptr);
        let fix_l4 = is_tcp || l4_csum != 0;
        l4_csum = set_addresses(ip, from, to, l4_csum);
        for (off, old, new) in [(l4, from.sport, to.sport), (l4 + 2, from.dport, to.dport)] {
            l4_csum = replace16(l4_csum, old, new);
            *(off as *mut [u8; 2]) = new.to_be_bytes();
        }
        if fix_l4 {
            // 0 means "no checksum" for UDP; its one's-complement twin is used.
            if !is_tcp && l4_csum == 0 {
                l4_csum = 0xffff;
            }
            *csum_ptr = l4_csum.to_be_bytes();
        }
        *(data as *mut [u8; 12]) = *macs;
    }
    Ok(())
}

/// `rewrite` for IPv6: the addresses stored whole, the L4 checksum moved
/// word by word for them (the pseudo-header) and for the ports; SCTP's CRC
/// for the ports only.
#[inline(never)]
fn rewrite_v6(
    ctx: &XdpContext,
    l4_off: usize,
    from: &FlowTuple,
    to: &FlowTuple,
    macs: &[u8; 12],
) -> Result<(), Reason> {
    // Bounds for the verifier: `parse` checked these headers on this frame.
    if l4_off > IPV6_MAX_L4_OFF {
        return Err(Reason::RewriteFailed);
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    let ip = data + ETH_HLEN;
    let l4 = data + l4_off;
    // The fixed part of each L4 header, its checksum included.
    let (csum_off, l4_len) = match from.protocol {
        proto::IPPROTO_TCP => (16, 20),
        proto::IPPROTO_UDP => (6, 8),
        _ => (8, 12),
    };
    if ip + IPV6_HLEN > end || l4 + l4_len > end {
        return Err(Reason::RewriteFailed);
    }
    // SAFETY: every access below is inside [data, end), checked above.
    unsafe {
        if from.protocol == proto::IPPROTO_SCTP {
            let payload = u16::from_be_bytes(*((ip + 4) as *const [u8; 2]));
            let sctp_len =
                (u32::from(payload) + IPV6_HLEN as u32).saturating_sub((l4_off - ETH_HLEN) as u32);
            sctp_crc_for_ports(l4, sctp_len, from, to);
        } else {
            let csum_ptr = (l4 + csum_off) as *mut [u8; 2];
            let mut sum = u16::from_be_bytes(*csum_ptr);
            sum = words_changed(sum, &from.saddr, &to.saddr);
            sum = words_changed(sum, &from.daddr, &to.daddr);
            sum = replace16(sum, from.sport, to.sport);
            sum = replace16(sum, from.dport, to.dport);
            // IPv6 UDP always has a checksum; 0 is sent as its twin.
            if sum == 0 && from.protocol == proto::IPPROTO_UDP {
                sum = 0xffff;
            }
            *csum_ptr = sum.to_be_bytes();
        }
        *((ip + 8) as *mut [u8; 16]) = to.saddr;
        *((ip + 24) as *mut [u8; 16]) = to.daddr;
        *(l4 as *mut [u8; 2]) = to.sport.to_be_bytes();
        *((l4 + 2) as *mut [u8; 2]) = to.dport.to_be_bytes();
        *(data as *mut [u8; 12]) = *macs;
    }
    Ok(())
}

/// `sum` updated for a 16-byte address changing from `old` to `new`.
#[inline(always)]
fn words_changed(mut sum: u16, old: &[u8; 16], new: &[u8; 16]) -> u16 {
    let mut i = 0;
    while i < 16 {
        let (o, n) = (
            u16::from_be_bytes([old[i], old[i + 1]]),
            u16::from_be_bytes([new[i], new[i + 1]]),
        );
        sum = replace16(sum, o, n);
        i += 2;
    }
    sum
}

/// Writes `to`'s addresses into the IPv4 header at `ip` with its checksum
/// updated, and returns `l4_csum` updated for them (the TCP/UDP
/// pseudo-header).
///
/// # Safety
/// The 20 bytes of the IPv4 header at `ip` lie inside the frame.
#[inline(always)]
unsafe fn set_addresses(ip: usize, from: &FlowTuple, to: &FlowTuple, mut l4_csum: u16) -> u16 {
    let mut ip_csum = u16::from_be_bytes(*((ip + 10) as *const [u8; 2]));
    let words = [
        (ip + 12, &from.saddr, &to.saddr),
        (ip + 16, &from.daddr, &to.daddr),
    ];
    for (off, old, new) in words {
        let mut i = 12;
        while i < 16 {
            let (o, n) = (
                u16::from_be_bytes([old[i], old[i + 1]]),
                u16::from_be_bytes([new[i], new[i + 1]]),
            );
            ip_csum = replace16(ip_csum, o, n);
            l4_csum = replace16(l4_csum, o, n);
            i += 2;
        }
        *(off as *mut [u8; 4]) = [new[12], new[13], new[14], new[15]];
    }
    *((ip + 10) as *mut [u8; 2]) = ip_csum.to_be_bytes();
    l4_csum
}

/// `rewrite` for SCTP: the IP checksum for the addresses, the CRC32c for the
/// ports (`common::crc32c::port_change`: no pass over the chunks).
#[inline(never)]
fn rewrite_sctp(
    ctx: &XdpContext,
    l4_off: usize,
    from: &FlowTuple,
    to: &FlowTuple,
    macs: &[u8; 12],
) -> Result<(), Reason> {
    if l4_off > MAX_L4_OFF {
        return Err(Reason::RewriteFailed);
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    let l4 = data + l4_off;
    if data + ETH_HLEN + 20 > end || l4 + 12 > end {
        return Err(Reason::RewriteFailed);
    }
    let ip = data + ETH_HLEN;
    // SAFETY: every access below is inside [data, end), checked above.
    unsafe {
        let tot_len = u16::from_be_bytes(*((ip + 2) as *const [u8; 2]));
        // SCTP's CRC covers no addresses: the L4 sum is not kept.
        set_addresses(ip, from, to, 0);
        let sctp_len = u32::from(tot_len).saturating_sub((l4_off - ETH_HLEN) as u32);
        sctp_crc_for_ports(l4, sctp_len, from, to);
        *(l4 as *mut [u8; 2]) = to.sport.to_be_bytes();
        *((l4 + 2) as *mut [u8; 2]) = to.dport.to_be_bytes();
        *(data as *mut [u8; 12]) = *macs;
    }
    Ok(())
}

/// SCTP's CRC32c (at `l4 + 8`) changed by what the ports change from
/// `from`'s to `to`'s, over an SCTP packet of `sctp_len` bytes
/// (`common::crc32c::port_change`); the ports are the caller's to write.
///
/// # Safety
/// The 12 bytes of the SCTP common header at `l4` lie inside the frame.
#[inline(always)]
unsafe fn sctp_crc_for_ports(l4: usize, sctp_len: u32, from: &FlowTuple, to: &FlowTuple) {
    let delta = crc32c::port_change((from.sport, from.dport), (to.sport, to.dport), sctp_len);
    let sum = (l4 + 8) as *mut [u8; 4];
    let mut i = 0;
    while i < 4 {
        // SAFETY: within the header, as the caller promises.
        unsafe { (*sum)[i] ^= delta[i] };
        i += 1;
    }
}
