//! The pass-through filter (`common::prefilter`): which packets can skip
//! the conntrack and service lookups.

use common::{
    prefilter::{backend_address_word, backend_word, frontend_slot, ENABLED_WORD},
    proto::{IPPROTO_TCP, TCP_ACK, TCP_SYN},
    rules, CtKey, DatapathConfig, FlowTuple,
};

use crate::maps::DP_PREFILTER;

/// What the filter says about a packet.
pub enum Filtered {
    /// It may be a tracked flow's or a frontend's: look it up.
    LookUp,
    /// Its source may be a tracked backend: it may be a tracked flow's
    /// reply, but its destination is no frontend: conntrack only.
    ConntrackOnly,
    /// No conntrack entry and no frontend can match it.
    NoService,
    /// As `NoService`, but a TCP SYN to a tracked backend: a closing reply
    /// entry on its reversed tuple may need clearing (`StaleReplyEntry`).
    SynToBackend,
}

/// A mark that cannot be read counts as set: the lookups decide.
#[inline(always)]
fn has(slot: (u32, u64)) -> bool {
    DP_PREFILTER.get(slot.0).is_none_or(|w| w & slot.1 != 0)
}

#[inline(always)]
fn tracked(word: u32) -> bool {
    DP_PREFILTER.get(word).is_none_or(|w| *w != 0)
}

/// Whether (address, port, protocol) may be a tracked backend: its
/// address's word first (few, in cache), the port's word only then.
#[inline(always)]
fn tracked_backend(addr: &[u8; 16], port: u16, protocol: u8) -> bool {
    tracked(backend_address_word(addr)) && tracked(backend_word(addr, port, protocol))
}

/// Marks the backend a reply entry at `reply_key` is keyed on (its
/// source), before the entry is written. A plain store of 1: idempotent,
/// so CPUs marking at once cannot lose a mark.
#[inline(always)]
pub fn mark_backend(reply_key: &CtKey) {
    mark(backend_address_word(&reply_key.saddr));
    mark(backend_word(
        &reply_key.saddr,
        reply_key.sport,
        reply_key.protocol,
    ));
}

#[inline(always)]
fn mark(word: u32) {
    if let Some(w) = DP_PREFILTER.get_ptr_mut(word) {
        // SAFETY: an array map value, 8-byte aligned.
        unsafe {
            if *w == 0 {
                *w = 1;
            }
        }
    }
}

/// Its own BPF function: four outcomes, one call site's worth of
/// verification.
#[inline(never)]
pub fn check(cfg: &DatapathConfig, t: &FlowTuple, tcp_flags: u8) -> Filtered {
    if DP_PREFILTER.get(ENABLED_WORD).is_none_or(|w| *w == 0) {
        return Filtered::LookUp;
    }
    if has(frontend_slot(&t.daddr)) || rules::unallocated_cluster_ip(cfg, &t.daddr) {
        return Filtered::LookUp;
    }
    if tracked_backend(&t.saddr, t.sport, t.protocol) {
        return Filtered::ConntrackOnly;
    }
    let syn = t.protocol == IPPROTO_TCP && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if syn && tracked_backend(&t.daddr, t.dport, t.protocol) {
        Filtered::SynToBackend
    } else {
        Filtered::NoService
    }
}
