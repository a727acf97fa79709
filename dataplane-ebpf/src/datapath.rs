//! The decision for one packet: parse, then (tc) service handling, then
//! count and trace. Every path records a verdict and a reason in the
//! packet's decision record (`trace::start`).

use aya_ebpf::programs::{TcContext, XdpContext};
use common::{
    proto, reason::is_fault_number, trace::FAMILY_IPV6, DatapathConfig, Hook, Reason, TraceEvent,
    Verdict,
};

use crate::{
    action::{TcAction, XdpAction},
    diag, icmp, icmp6,
    maps::DP_CONFIG,
    packet::{Packet, SkbPacket, XdpPacket},
    parse::{parse, IpPacket, Parsed},
    service, stats,
    trace::{self, decide},
    xdp,
};

/// All zero: tracing off, no masquerade. Used only if `DP_CONFIG` index 0
/// were missing, which an array map cannot be; the verifier wants the check.
static EMPTY_CONFIG: DatapathConfig = unsafe { core::mem::zeroed() };

#[inline(always)]
pub(crate) fn config() -> &'static DatapathConfig {
    DP_CONFIG.get(0).unwrap_or(&EMPTY_CONFIG)
}

/// `TRACED` false compiles tracing out (the benchmarks' `dp_tc_untraced`,
/// to show that with no session open tracing costs nothing measurable).
#[inline(always)]
pub fn run_tc<const TRACED: bool>(ctx: &TcContext, hook: Hook) -> TcAction {
    let pkt = SkbPacket::new(ctx);
    let cfg = config();
    let Some(ev) = trace::start(hook, pkt.ifindex(), pkt.len()) else {
        stats::count(hook, Reason::ScratchUnavailable, pkt.len());
        diag::no_decision_record(hook);
        return TcAction::Pass;
    };
    let ip = classify(&pkt, ev);
    if TRACED {
        trace::arrival(&pkt, ev);
    }
    let action = match ip {
        Some(ip) if ip.protocol == proto::IPPROTO_ICMP || ip.protocol == proto::IPPROTO_ICMPV6 => {
            icmp_error(ctx, hook, ev)
        }
        Some(_) => service::handle(ctx, hook, cfg, ev),
        None => tc_action(ev),
    };
    finish::<TRACED>(hook, ev);
    action
}

#[inline(always)]
pub fn run_xdp(ctx: &XdpContext) -> XdpAction {
    let pkt = XdpPacket::new(ctx);
    let cfg = config();
    let Some(ev) = trace::start(Hook::Xdp, pkt.ifindex(), pkt.len()) else {
        stats::count(Hook::Xdp, Reason::ScratchUnavailable, pkt.len());
        diag::no_decision_record(Hook::Xdp);
        return XdpAction::Pass;
    };
    let ip = classify(&pkt, ev);
    trace::arrival(&pkt, ev);
    let action = match ip {
        // ICMP and ICMPv6 errors about flows are translated in tc.
        Some(ip) if ip.protocol == proto::IPPROTO_ICMP || ip.protocol == proto::IPPROTO_ICMPV6 => {
            decide(ev, Verdict::Pass, Reason::XdpPassToTc);
            XdpAction::Pass
        }
        Some(_) => xdp::handle(ctx, cfg, ev),
        None if ev.verdict == Verdict::Drop as u8 => XdpAction::Drop,
        None => XdpAction::Pass,
    };
    finish::<true>(Hook::Xdp, ev);
    action
}

/// An ICMP or ICMPv6 error about a tracked flow is translated like the
/// flow (`icmp`, `icmp6`); other ICMP and ICMPv6 (echo, neighbour
/// discovery, ...) passes untouched.
#[inline(never)]
fn icmp_error(ctx: &TcContext, hook: Hook, ev: &mut TraceEvent) -> TcAction {
    let l4_off = usize::from(ev.l4_off);
    // Read from the record, not passed in: one path to this function.
    let v6 = ev.original.family == FAMILY_IPV6;
    let is_error = if v6 {
        icmp6::is_error(ctx, l4_off)
    } else {
        icmp::is_error(ctx, l4_off)
    };
    match is_error {
        Ok(true) => {}
        Ok(false) => {
            decide(ev, Verdict::Pass, Reason::UnsupportedProtocol);
            return TcAction::Pass;
        }
        // Too short to have a type: nothing to translate; the stack judges
        // it (and drops it).
        Err(reason) => {
            decide(ev, Verdict::Pass, reason);
            return TcAction::Pass;
        }
    }
    let translated = if v6 {
        icmp6::translate_error(ctx, l4_off, ev)
    } else {
        icmp::translate_error(ctx, l4_off, ev)
    };
    let sent = match translated {
        Ok(false) => {
            decide(ev, Verdict::Pass, Reason::UnsupportedProtocol);
            return TcAction::Pass;
        }
        // Sent on as a translated packet of a flow is (the FIB at ingress,
        // a redirect at egress).
        Ok(true) => service::send_on(ctx, hook, ev, false),
        Err(reason) => Err(reason),
    };
    match sent {
        Ok(action) => {
            decide(ev, Verdict::Forward, Reason::IcmpErrorTranslated);
            action
        }
        Err(reason) => {
            decide(ev, Verdict::Drop, reason);
            TcAction::Drop
        }
    }
}

/// The tc action for a decision that needs no more than the verdict.
#[inline(always)]
fn tc_action(ev: &TraceEvent) -> TcAction {
    if ev.verdict == Verdict::Drop as u8 {
        TcAction::Drop
    } else {
        TcAction::Pass
    }
}

/// Parses the packet into `ev.original` (and `ev.translated`, its copy
/// until something translates it). `Some`: a TCP, UDP or SCTP packet (first
/// fragment), an IPv4 ICMP or IPv6 ICMPv6 one, for service handling; `None`: the
/// decision is made.
#[inline(always)]
fn classify<P: Packet>(pkt: &P, ev: &mut TraceEvent) -> Option<IpPacket> {
    let ip = match parse(pkt, &mut ev.original) {
        Ok(Parsed::Ip(ip)) => ip,
        Ok(Parsed::NotIp) => {
            decide(ev, Verdict::Pass, Reason::NotIp);
            return None;
        }
        Ok(Parsed::Ipv6ChainTooLong) => {
            decide(ev, Verdict::Pass, Reason::Ipv6HeaderChainTooLong);
            return None;
        }
        // Headers we could not pull in are not proof of a bad packet: leave
        // it to the stack.
        Err(_) if pkt.pull_failed() => {
            decide(ev, Verdict::Pass, Reason::HeaderPullFailed);
            return None;
        }
        Err(reason) => {
            decide(ev, Verdict::Drop, reason);
            return None;
        }
    };
    ev.translated = ev.original;
    ev.tcp_flags = ip.tcp_flags;
    // Read back by the handlers from the record (see `TraceEvent::l4_off`).
    ev.l4_off = ip.l4_off as u16;
    if ip.later_fragment {
        decide(ev, Verdict::Pass, Reason::Fragment);
        return None;
    }
    match ip.protocol {
        proto::IPPROTO_TCP | proto::IPPROTO_UDP | proto::IPPROTO_SCTP => Some(ip),
        proto::IPPROTO_ICMP if !ip.v6 => Some(ip),
        proto::IPPROTO_ICMPV6 if ip.v6 => Some(ip),
        _ => {
            decide(ev, Verdict::Pass, Reason::UnsupportedProtocol);
            None
        }
    }
}

/// Counts the decision and traces it if a session wants it.
#[inline(always)]
fn finish<const TRACED: bool>(hook: Hook, ev: &mut TraceEvent) {
    stats::count_number(hook, ev.reason, ev.packet_len);
    if !TRACED {
        return;
    }
    if ev.trace_sessions != 0 {
        trace::emit(ev);
    }
    if ev.verdict == Verdict::Drop as u8 || ev.verdict == Verdict::Reject as u8 {
        trace::remember(ev);
        // Faults are drops: checked on that path only.
        if is_fault_number(ev.reason) {
            diag::fault(ev);
        }
    }
}
