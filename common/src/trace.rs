//! Trace sessions and events.
//!
//! A `dp trace` session claims one of `TRACE_SESSIONS` slots in
//! `DP_TRACE_SESS` and writes its filter there; the datapath writes a
//! `TraceEvent` for each packet the filter matches into that slot's ring
//! buffer (`DP_TRACE_<slot>`). With no slot active the datapath reads the
//! slots' `active` words and nothing else.

use bytemuck::{Pod, Zeroable};

/// Address family of a `FlowTuple`, as in `AF_INET` / `AF_INET6`.
pub const FAMILY_IPV4: u8 = 2;
pub const FAMILY_IPV6: u8 = 10;

/// A flow's addresses and ports. Addresses are 16 bytes (`crate::addr`:
/// IPv4-mapped for IPv4). Ports are in host order. All zero when the packet
/// had no such header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FlowTuple {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// IP protocol number (`proto::IPPROTO_*`); 0 when not IP.
    pub protocol: u8,
    /// `FAMILY_IPV4`, `FAMILY_IPV6` or 0 (not IP).
    pub family: u8,
    pub _pad: [u8; 2],
}

/// One datapath decision about one packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct TraceEvent {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub timestamp_ns: u64,
    /// Interface the program ran on.
    pub ifindex: u32,
    /// Length of the packet as seen by the program.
    pub packet_len: u32,
    /// `Reason` number.
    pub reason: u32,
    /// `Hook` number.
    pub hook: u8,
    /// `Verdict` number.
    pub verdict: u8,
    /// TCP flags byte (`proto::TCP_*`), 0 otherwise.
    pub tcp_flags: u8,
    /// Bit per session slot that may want this packet (set on arrival).
    pub trace_sessions: u8,
    /// The service port's id (`ServiceValue::service_id`), 0 when none.
    pub service_id: u32,
    /// The backend's id (`DP_BACKENDS` key), 0 when none.
    pub backend_id: u32,
    /// The packet as it arrived.
    pub original: FlowTuple,
    /// The packet as it left (equal to `original` when not translated).
    pub translated: FlowTuple,
    /// How many bytes of `headers` hold the packet (0: none captured).
    pub headers_len: u16,
    /// Offset of the L4 header in the frame (past IPv4 options or IPv6
    /// extension headers); 0 when there is none (not IP, a later
    /// fragment). The programs carry it here rather than in a register:
    /// the verifier then walks the service handling once for every header
    /// length, not once per length.
    pub l4_off: u16,
    /// Where the program sent the packet itself (`bpf_redirect*`): the
    /// device's ifindex; 0 when it was left to the stack (or dropped).
    pub sent_ifindex: u32,
    /// The first bytes of the frame as it arrived, before any rewrite:
    /// Ethernet, IP and L4 headers (for `dp trace -w`).
    pub headers: [u8; TRACE_HEADER_BYTES],
    // After `headers`: tc's per-packet reset of the record stops there, and
    // tc never writes these, so they cost it nothing.
    /// Socket hooks (no packet, no interface): the calling thread's
    /// `bpf_get_current_pid_tgid()` (process id in the upper 32 bits,
    /// thread id in the lower), 0 otherwise.
    pub pid_tgid: u64,
    /// Socket hooks: the calling process's command name (NUL-padded).
    pub comm: [u8; 16],
    /// Socket hooks: the socket's network namespace cookie.
    pub netns_cookie: u64,
}

impl Default for TraceEvent {
    fn default() -> Self {
        Self::zeroed()
    }
}

/// Bytes of each traced frame kept in its event.
pub const TRACE_HEADER_BYTES: usize = 128;

/// Concurrent `dp trace` sessions: slots in `DP_TRACE_SESS`, one ring buffer each.
pub const TRACE_SESSIONS: u32 = 4;

/// Drops and rejects the datapath keeps per CPU for `dp trace --since`
/// (`DP_RECENT`), whether or not a session is open.
pub const RECENT_EVENTS: u32 = 64;

/// Service ids one session can filter on in the kernel.
pub const TRACE_SERVICE_IDS: usize = 16;

/// `TraceSession::match_flags`: which fields must match. Address, port,
/// protocol and interface are checked before the packet is handled, against
/// the packet as it arrived (source or destination); verdict, reason and
/// service after the decision.
pub const TRACE_MATCH_ADDR: u32 = 1 << 0;
pub const TRACE_MATCH_PORT: u32 = 1 << 1;
pub const TRACE_MATCH_PROTOCOL: u32 = 1 << 2;
pub const TRACE_MATCH_IFINDEX: u32 = 1 << 3;
pub const TRACE_MATCH_VERDICT: u32 = 1 << 4;
pub const TRACE_MATCH_REASON: u32 = 1 << 5;
pub const TRACE_MATCH_SERVICE: u32 = 1 << 6;

/// One `dp trace` session's slot and in-kernel filter.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct TraceSession {
    /// Non-zero while a session reads this slot's ring buffer.
    pub active: u32,
    /// `TRACE_MATCH_*` bits.
    pub match_flags: u32,
    /// The process that owns the slot (a slot whose owner is gone may be
    /// claimed again). Not read by the datapath.
    pub owner_pid: u32,
    pub ifindex: u32,
    pub addr: [u8; 16],
    pub port: u16,
    pub protocol: u8,
    /// Bit `1 << v` for each wanted `Verdict` number `v`.
    pub verdicts: u8,
    /// How many of `service_ids` are used.
    pub service_count: u32,
    /// The service port ids (`ServiceValue::service_id`) wanted.
    pub service_ids: [u32; TRACE_SERVICE_IDS],
    /// Bit `n % 64` of word `n / 64` for each wanted `Reason` number `n`.
    pub reasons: [u64; 2],
}

impl Default for TraceSession {
    fn default() -> Self {
        Self::zeroed()
    }
}

impl TraceSession {
    /// Whether `reason` is among the wanted reasons.
    #[inline(always)]
    pub fn wants_reason(&self, reason: u32) -> bool {
        let word = (reason / 64) as usize;
        word < self.reasons.len() && self.reasons[word] & (1 << (reason % 64)) != 0
    }

    /// The checks on the packet as it arrived: interface, protocol, and
    /// address and port (source or destination).
    #[inline(always)]
    pub fn arrival_matches(&self, ev: &TraceEvent) -> bool {
        let t = &ev.original;
        let f = self.match_flags;
        !(f & TRACE_MATCH_IFINDEX != 0 && ev.ifindex != self.ifindex
            || f & TRACE_MATCH_PROTOCOL != 0 && t.protocol != self.protocol
            || f & TRACE_MATCH_ADDR != 0 && t.saddr != self.addr && t.daddr != self.addr
            || f & TRACE_MATCH_PORT != 0 && t.sport != self.port && t.dport != self.port)
    }

    /// The checks on the decision: verdict, reason, service.
    #[inline(always)]
    pub fn decision_matches(&self, ev: &TraceEvent) -> bool {
        let f = self.match_flags;
        if f & TRACE_MATCH_VERDICT != 0 && self.verdicts & (1 << (ev.verdict & 7)) == 0 {
            return false;
        }
        if f & TRACE_MATCH_REASON != 0 && !self.wants_reason(ev.reason) {
            return false;
        }
        if f & TRACE_MATCH_SERVICE != 0 {
            let mut found = false;
            let mut i = 0;
            while i < TRACE_SERVICE_IDS {
                if (i as u32) < self.service_count && self.service_ids[i] == ev.service_id {
                    found = true;
                }
                i += 1;
            }
            return found;
        }
        true
    }

    pub fn add_reason(&mut self, reason: u32) {
        let word = (reason / 64) as usize;
        if word < self.reasons.len() {
            self.reasons[word] |= 1 << (reason % 64);
        }
    }
}
