//! The per-packet decision record and trace events.
//!
//! The decision about a packet is built directly in a per-CPU scratch
//! `TraceEvent` (the BPF stack is too small to carry it through the call
//! chain); when the packet is traced, that record is copied into the
//! `DP_TRACE` ring buffer as it is.

use common::{
    config::{TRACE_FILTER_ADDR, TRACE_FILTER_PORT, TRACE_FILTER_PROTOCOL},
    DatapathConfig, FlowTuple, Hook, Reason, TraceEvent, Verdict,
};

use crate::{
    conntrack::now_ns,
    maps::{DP_DECISION, DP_TRACE, DP_TRACE_LOST},
};

/// This CPU's decision record, reset for a new packet.
#[inline(always)]
pub fn start(hook: Hook, ifindex: u32, packet_len: u32) -> Option<&'static mut TraceEvent> {
    // SAFETY: per-CPU map value; tc and XDP programs do not nest on a CPU.
    let ev = unsafe { &mut *DP_DECISION.get_ptr_mut(0)? };
    ev.timestamp_ns = 0;
    ev.ifindex = ifindex;
    ev.packet_len = packet_len;
    ev.reason = 0;
    ev.hook = hook as u8;
    ev.verdict = Verdict::Pass as u8;
    ev.tcp_flags = 0;
    ev._pad = 0;
    ev.service_id = 0;
    ev.backend_id = 0;
    ev.original = FlowTuple::default();
    ev.translated = FlowTuple::default();
    Some(ev)
}

/// Records the verdict and reason; the packet is not translated (yet).
#[inline(always)]
pub fn decide(ev: &mut TraceEvent, verdict: Verdict, reason: Reason) {
    ev.verdict = verdict as u8;
    ev.reason = reason as u32;
}

/// Whether this packet is to be traced.
#[inline(always)]
pub fn wanted(cfg: &DatapathConfig, t: &FlowTuple) -> bool {
    if cfg.trace_enabled == 0 {
        return false;
    }
    let f = &cfg.trace_filter;
    if f.flags & TRACE_FILTER_ADDR != 0 && t.saddr != f.addr && t.daddr != f.addr {
        return false;
    }
    if f.flags & TRACE_FILTER_PORT != 0 && t.sport != f.port && t.dport != f.port {
        return false;
    }
    if f.flags & TRACE_FILTER_PROTOCOL != 0 && t.protocol != f.protocol {
        return false;
    }
    true
}

#[inline(always)]
pub fn emit(ev: &mut TraceEvent) {
    ev.timestamp_ns = now_ns();
    if DP_TRACE.output::<TraceEvent>(&*ev, 0).is_err() {
        // The reader is behind: count what it missed rather than stall.
        if let Some(lost) = DP_TRACE_LOST.get_ptr_mut(0) {
            // SAFETY: per-CPU map value.
            unsafe { *lost += 1 };
        }
    }
}
