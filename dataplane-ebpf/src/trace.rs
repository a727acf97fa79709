//! The per-packet decision record and trace events.
//!
//! The decision about a packet is built directly in a per-CPU scratch
//! `TraceEvent` (the BPF stack is too small to carry it through the call
//! chain). Tracing costs nothing but a look at the session slots while no
//! `dp trace` runs: `candidates` finds the sessions whose address, port,
//! protocol and interface filter the packet passes, and only for those the
//! headers are copied (before anything rewrites them) and, once the
//! decision is made, `emit` checks verdict, reason and service and copies
//! the record into each matching session's ring buffer.

use aya_ebpf::maps::RingBuf;
use common::{trace::RECENT_EVENTS, Hook, Reason, TraceEvent, TraceSession, Verdict};

use crate::{
    conntrack::now_ns,
    maps::{
        DP_DECISION, DP_RECENT, DP_RECENT_HEAD, DP_TRACE_0, DP_TRACE_1, DP_TRACE_2, DP_TRACE_3,
        DP_TRACE_LOST, DP_TRACE_SESS,
    },
    packet::Packet,
};

/// This CPU's decision record, reset for a new packet.
#[inline(always)]
pub fn start(hook: Hook, ifindex: u32, packet_len: u32) -> Option<&'static mut TraceEvent> {
    // SAFETY: per-CPU map value; tc and XDP programs do not nest on a CPU.
    let ev = unsafe { &mut *DP_DECISION.get_ptr_mut(0)? };
    // Everything before `headers` (captured only for a session) is reset:
    // word stores, not the byte-wise `memset` field resets compile to.
    const RESET_WORDS: usize = core::mem::offset_of!(TraceEvent, headers) / 8;
    const { assert!(core::mem::offset_of!(TraceEvent, headers) % 8 == 0) };
    // SAFETY: a map value, 8-byte aligned, larger than `RESET_WORDS` words.
    unsafe { crate::zero::words64::<RESET_WORDS>((ev as *mut TraceEvent).cast::<u64>()) };
    ev.ifindex = ifindex;
    ev.packet_len = packet_len;
    ev.hook = hook as u8;
    ev.verdict = Verdict::Pass as u8;
    Some(ev)
}

/// Records the verdict and reason; the packet is not translated (yet).
#[inline(always)]
pub fn decide(ev: &mut TraceEvent, verdict: Verdict, reason: Reason) {
    ev.verdict = verdict as u8;
    ev.reason = reason as u32;
}

/// Records a drop for `reason`: whatever translation was planned, the
/// packet leaves as it came (it does not leave).
#[inline(always)]
pub fn decide_drop(ev: &mut TraceEvent, reason: Reason) {
    ev.translated = ev.original;
    decide(ev, Verdict::Drop, reason);
}

/// Notes in the record which sessions may want this packet, judged on the
/// packet as it arrived, and keeps its headers for them. With no session
/// open, the slot checks are all tracing costs.
///
/// A BPF function of its own, leaving its result in the record (map
/// memory) rather than in a register: the verifier then need not walk the
/// rest of the program once per outcome.
#[inline(never)]
pub fn arrival<P: Packet>(pkt: &P, ev: &mut TraceEvent) {
    let sessions = candidates(ev);
    if sessions != 0 {
        capture(pkt, ev);
    }
    ev.trace_sessions = sessions as u8;
}

/// Whether any `dp trace` session is open: the socket hooks build their
/// record only then (or for a refusal, which `remember` keeps).
#[inline(always)]
pub fn any_session() -> bool {
    let mut slot = 0;
    while slot < common::trace::TRACE_SESSIONS {
        if DP_TRACE_SESS.get(slot).is_some_and(|s| s.active != 0) {
            return true;
        }
        slot += 1;
    }
    false
}

/// Sends a record built whole (a socket hook's: no packet arrives first)
/// to the sessions whose filters it passes.
#[inline(always)]
pub fn emit_built(ev: &mut TraceEvent) {
    let sessions = candidates(ev);
    if sessions != 0 {
        ev.trace_sessions = sessions as u8;
        emit(ev);
    }
}

#[inline(always)]
fn candidates(ev: &TraceEvent) -> u32 {
    let mut mask = 0;
    let mut slot = 0;
    while slot < common::trace::TRACE_SESSIONS {
        if let Some(s) = DP_TRACE_SESS.get(slot) {
            if s.active != 0 && arrival_matches(s, ev) {
                mask |= 1 << slot;
            }
        }
        slot += 1;
    }
    mask
}

// The filter checks live in `common` (userspace applies them to recorded
// events too); here each is its own BPF function, verified once.
#[inline(never)]
fn arrival_matches(s: &TraceSession, ev: &TraceEvent) -> bool {
    s.arrival_matches(ev)
}

#[inline(never)]
fn decision_matches(s: &TraceSession, ev: &TraceEvent) -> bool {
    s.decision_matches(ev)
}

/// Keeps a drop or reject in this CPU's `DP_RECENT` ring (`dp trace
/// --since`): a cost on those paths only.
#[inline(never)]
pub fn remember(ev: &mut TraceEvent) {
    if ev.timestamp_ns == 0 {
        ev.timestamp_ns = now_ns();
    }
    let Some(head) = DP_RECENT_HEAD.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU map values; programs do not nest on a CPU.
    unsafe {
        let i = *head % RECENT_EVENTS;
        if let Some(slot) = DP_RECENT.get_ptr_mut(i) {
            *slot = *ev;
            *head = i + 1;
        }
    }
}

/// Copies the frame's first bytes into the record, for the sessions' pcapng.
#[inline(always)]
fn capture<P: Packet>(pkt: &P, ev: &mut TraceEvent) {
    const MAX: u32 = common::trace::TRACE_HEADER_BYTES as u32;
    let len = pkt.len();
    if len >= MAX {
        if pkt.load(0, &mut ev.headers).is_ok() {
            ev.headers_len = MAX as u16;
        }
        return;
    }
    // A shorter frame: the helper wants a length the verifier can prove is
    // in 1..MAX. LLVM would pass on an unbounded copy of `len` that it knows
    // is small; a volatile round trip through the record, a mask and a zero
    // test on the masked register give the verifier its own proof.
    ev.headers_len = len as u16;
    // SAFETY: reads a field of a valid record.
    let n = u32::from(unsafe { core::ptr::read_volatile(&ev.headers_len) }) & (MAX - 1);
    ev.headers_len = 0;
    if n == 0 {
        return;
    }
    if pkt.load(0, &mut ev.headers[..n as usize]).is_ok() {
        ev.headers_len = n as u16;
    }
}

/// Sends the record to each session noted on arrival whose verdict, reason
/// and service filter it passes.
#[inline(never)]
pub fn emit(ev: &mut TraceEvent) {
    let candidates = u32::from(ev.trace_sessions);
    ev.timestamp_ns = now_ns();
    // One call per slot: a map must be known to the verifier at each call.
    emit_to(0, &DP_TRACE_0, candidates, ev);
    emit_to(1, &DP_TRACE_1, candidates, ev);
    emit_to(2, &DP_TRACE_2, candidates, ev);
    emit_to(3, &DP_TRACE_3, candidates, ev);
}

#[inline(always)]
fn emit_to(slot: u32, ring: &RingBuf, candidates: u32, ev: &TraceEvent) {
    if candidates & (1 << slot) == 0 {
        return;
    }
    if let Some(s) = DP_TRACE_SESS.get(slot) {
        if decision_matches(s, ev) {
            output(ring, ev);
        }
    }
}

#[inline(always)]
fn output(ring: &RingBuf, ev: &TraceEvent) {
    if ring.output::<TraceEvent>(ev, 0).is_err() {
        // The reader is behind: count what it missed rather than stall.
        if let Some(lost) = DP_TRACE_LOST.get_ptr_mut(0) {
            // SAFETY: per-CPU map value.
            unsafe { *lost += 1 };
        }
    }
}
