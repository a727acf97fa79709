//! Connection tracking of service flows: lookup, creation, refresh, state.
//! Layout and semantics: `common::ct`.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use common::{
    ct::{CT_STATE_CLOSED, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_NEW},
    proto::{self, TCP_FIN, TCP_RST},
    rules, CtEntry, CtKey, CtTimeouts, FlowTuple, Reason,
};

use crate::maps::DP_CT;

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
pub fn key(t: &FlowTuple) -> CtKey {
    CtKey {
        saddr: t.saddr,
        daddr: t.daddr,
        sport: t.sport,
        dport: t.dport,
        protocol: t.protocol,
        _pad: [0; 3],
    }
}

/// The live entry for `key`; an expired entry counts as absent.
#[inline(always)]
pub fn lookup(key: &CtKey, now: u64) -> Option<*mut CtEntry> {
    live(get(key)?, now)
}

/// The entry for `key`, live or not (`live` judges it).
#[inline(always)]
pub fn get(key: &CtKey) -> Option<*mut CtEntry> {
    DP_CT.get_ptr_mut(key)
}

/// `e` if it is still live at `now`.
#[inline(always)]
pub fn live(e: *mut CtEntry, now: u64) -> Option<*mut CtEntry> {
    // SAFETY: map value pointer.
    rules::ct_live(unsafe { &*e }, now).then_some(e)
}

#[inline(always)]
pub fn lifetime_ns(protocol: u8, state: u8, t: &CtTimeouts) -> u64 {
    rules::ct_lifetime_ns(protocol, state, t)
}

/// The flow's state after a packet with `tcp_flags` in the given direction.
#[inline(always)]
pub fn next_state(protocol: u8, state: u8, tcp_flags: u8, is_reply: bool) -> u8 {
    if protocol == proto::IPPROTO_TCP && tcp_flags & TCP_RST != 0 {
        CT_STATE_CLOSED
    } else if protocol == proto::IPPROTO_TCP && tcp_flags & TCP_FIN != 0 {
        // A FIN after a reset does not reopen anything.
        if state == CT_STATE_CLOSED {
            CT_STATE_CLOSED
        } else {
            CT_STATE_CLOSING
        }
    } else if is_reply && state == CT_STATE_NEW {
        CT_STATE_ESTABLISHED
    } else {
        state
    }
}

/// Refreshes `entry` for a packet; returns the new state if it changed (the
/// caller then updates the other direction's entry too).
#[inline(always)]
pub fn refresh(
    entry: *mut CtEntry,
    protocol: u8,
    tcp_flags: u8,
    is_reply: bool,
    now: u64,
    t: &CtTimeouts,
) -> Option<u8> {
    // SAFETY: map value pointer from `lookup`.
    let e = unsafe { &mut *entry };
    let state = next_state(protocol, e.state, tcp_flags, is_reply);
    e.expires_ns = now + lifetime_ns(protocol, state, t);
    if state != e.state {
        e.state = state;
        Some(state)
    } else {
        None
    }
}

/// Puts the other direction's entry in `state` (if it still exists).
#[inline(always)]
pub fn set_state(key: &CtKey, protocol: u8, state: u8, now: u64, t: &CtTimeouts) {
    if let Some(e) = lookup(key, now) {
        // SAFETY: map value pointer.
        let e = unsafe { &mut *e };
        e.state = state;
        e.expires_ns = now + lifetime_ns(protocol, state, t);
    }
}

/// Creates or replaces the entry at `key`. An LRU map evicts to make room,
/// so a failure means even that was impossible.
#[inline(always)]
pub fn insert(key: &CtKey, entry: &CtEntry) -> Result<(), Reason> {
    DP_CT
        .insert(key, entry, 0)
        .map_err(|_| Reason::ConntrackFull)
}

/// Whether `key` is taken for a new flow's reply direction: a live entry
/// holds it unless it was reset and has gone quiet (`rules::frees_nat_port`).
#[inline(always)]
pub fn holds_tuple(key: &CtKey, now: u64, t: &CtTimeouts) -> bool {
    match DP_CT.get_ptr_mut(key) {
        // SAFETY: map value pointer.
        Some(e) => !rules::frees_nat_port(unsafe { &*e }, now, t.tcp_closing),
        None => false,
    }
}

#[inline(always)]
pub fn remove(key: &CtKey) {
    let _ = DP_CT.remove(key);
}
