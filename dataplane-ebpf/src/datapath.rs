//! The decision for one packet, shared by every hook.

use common::{trace::proto, FlowTuple, Hook, Reason, Verdict};

use crate::{
    packet::Packet,
    parse::{parse, Parsed},
    stats, trace,
    trace::Decision,
};

/// Decides, counts and (if enabled) traces one packet.
#[inline(always)]
pub fn run<P: Packet>(pkt: &mut P, hook: Hook) -> Verdict {
    let decision = decide(pkt);
    let len = pkt.len();
    stats::count(hook, decision.reason, len);
    if trace::enabled() {
        trace::emit(hook, pkt.ifindex(), len, &decision);
    }
    decision.verdict
}

#[inline(always)]
fn decide<P: Packet>(pkt: &P) -> Decision {
    let parsed = match parse(pkt) {
        Ok(p) => p,
        // Headers we could not pull in are not proof of a bad packet: leave
        // it to the stack.
        Err(_) if pkt.pull_failed() => {
            return verdict(
                Verdict::Pass,
                Reason::HeaderPullFailed,
                FlowTuple::default(),
                0,
            );
        }
        Err(reason) => return verdict(Verdict::Drop, reason, FlowTuple::default(), 0),
    };
    let ip = match parsed {
        Parsed::NotIpv4 => {
            return verdict(Verdict::Pass, Reason::NotIpv4, FlowTuple::default(), 0);
        }
        Parsed::Ipv4(ip) => ip,
    };
    let reason = if ip.later_fragment {
        Reason::Fragment
    } else {
        match ip.tuple.protocol {
            // No service maps yet: every TCP/UDP packet passes through.
            proto::IPPROTO_TCP | proto::IPPROTO_UDP => Reason::NoService,
            _ => Reason::UnsupportedProtocol,
        }
    };
    verdict(Verdict::Pass, reason, ip.tuple, ip.tcp_flags)
}

#[inline(always)]
fn verdict(verdict: Verdict, reason: Reason, original: FlowTuple, tcp_flags: u8) -> Decision {
    Decision {
        verdict,
        reason,
        original,
        tcp_flags,
    }
}
