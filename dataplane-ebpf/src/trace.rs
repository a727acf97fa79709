//! Trace events into the `DP_TRACE` ring buffer, only while tracing is on.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use common::{FlowTuple, Hook, Reason, TraceEvent, Verdict};

use crate::maps::{DP_CONFIG, DP_TRACE, DP_TRACE_LOST};

/// What the program knows about the packet when it decides.
pub struct Decision {
    pub verdict: Verdict,
    pub reason: Reason,
    pub original: FlowTuple,
    pub tcp_flags: u8,
}

#[inline(always)]
pub fn enabled() -> bool {
    match DP_CONFIG.get(0) {
        Some(cfg) => cfg.trace_enabled != 0,
        None => false,
    }
}

#[inline(always)]
pub fn emit(hook: Hook, ifindex: u32, packet_len: u32, d: &Decision) {
    match DP_TRACE.reserve::<TraceEvent>(0) {
        Some(mut entry) => {
            entry.write(TraceEvent {
                // SAFETY: helper without preconditions.
                timestamp_ns: unsafe { bpf_ktime_get_ns() },
                ifindex,
                packet_len,
                reason: d.reason as u32,
                hook: hook as u8,
                verdict: d.verdict as u8,
                tcp_flags: d.tcp_flags,
                _pad: 0,
                original: d.original,
            });
            entry.submit(0);
        }
        None => {
            // The reader is behind: count what it missed rather than stall.
            if let Some(lost) = DP_TRACE_LOST.get_ptr_mut(0) {
                // SAFETY: per-CPU map value.
                unsafe { *lost += 1 };
            }
        }
    }
}
