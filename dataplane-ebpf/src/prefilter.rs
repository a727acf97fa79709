//! The pass-through filter (`common::prefilter`): which packets can skip
//! the conntrack and service lookups.

use common::{
    prefilter::{backend_slot, frontend_slot, ENABLED_WORD},
    proto::{IPPROTO_TCP, TCP_ACK, TCP_SYN},
    rules, DatapathConfig, FlowTuple,
};

use crate::maps::DP_PREFILTER;

/// What the filter says about a packet.
pub enum Filtered {
    /// It may be a tracked flow's or a frontend's: look it up.
    LookUp,
    /// Its source may be a backend: it may be a tracked flow's reply, but
    /// its destination is no frontend: conntrack only.
    ConntrackOnly,
    /// No conntrack entry and no frontend can match it.
    NoService,
    /// As `NoService`, but a TCP SYN to a backend: a closing reply entry
    /// on its reversed tuple may need clearing (`StaleReplyEntry`).
    SynToBackend,
}

#[inline(always)]
fn has(slot: (u32, u64)) -> bool {
    DP_PREFILTER.get(slot.0).is_none_or(|w| w & slot.1 != 0)
}

/// Its own BPF function: three outcomes, one call site's worth of
/// verification.
#[inline(never)]
pub fn check(cfg: &DatapathConfig, t: &FlowTuple, tcp_flags: u8) -> Filtered {
    if DP_PREFILTER.get(ENABLED_WORD).is_none_or(|w| *w == 0) {
        return Filtered::LookUp;
    }
    if has(frontend_slot(&t.daddr)) || rules::unallocated_cluster_ip(cfg, &t.daddr) {
        return Filtered::LookUp;
    }
    if has(backend_slot(&t.saddr, t.sport, t.protocol)) {
        return Filtered::ConntrackOnly;
    }
    let syn = t.protocol == IPPROTO_TCP && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if syn && has(backend_slot(&t.daddr, t.dport, t.protocol)) {
        Filtered::SynToBackend
    } else {
        Filtered::NoService
    }
}
