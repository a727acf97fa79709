//! Log records (aya-log) for conditions that should never happen: a map
//! update the datapath relies on failing, per-CPU scratch space missing, a
//! packet write, checksum update or redirect failing. The agent forwards
//! them to its log, rate-limited. Decisions about packets are not logged:
//! those are counters and trace events.
//!
//! Each function is a BPF function of its own, called only on a failure
//! path, so the log call's stack frame is stacked on the call chain only
//! there (and kept out of the frames of the hot path's functions).

use aya_log_ebpf::{error, warn};
use common::{Hook, TraceEvent};

/// A packet dropped for a fault reason (`Reason::is_fault`).
#[inline(never)]
pub fn fault(ev: &TraceEvent) {
    let hook = match Hook::from_u8(ev.hook) {
        Some(h) => h.name(),
        None => "?",
    };
    error!(
        &(),
        "dropped: reason {} at {} on ifindex {} (service {}, backend {})",
        ev.reason,
        hook,
        ev.ifindex,
        ev.service_id,
        ev.backend_id
    );
}

/// The per-CPU decision record (`DP_DECISION`) was not there: the packet
/// passed, counted as `ScratchUnavailable`, untraced.
#[inline(never)]
pub fn no_decision_record(hook: Hook) {
    error!(
        &(),
        "no per-CPU decision record at {}: packet passed untraced",
        hook.name()
    );
}

/// The MAC addresses for a FIB redirect could not be written: the packet
/// went to the stack instead.
#[inline(never)]
pub fn mac_store_failed(ifindex: u32) {
    warn!(
        &(),
        "could not write the MAC addresses to send to ifindex {}: left to the stack", ifindex
    );
}

/// A session-affinity record could not be written: the flow goes on, the
/// client's next connection may get another backend.
#[inline(never)]
pub fn affinity_not_recorded(service_id: u32) {
    warn!(
        &(),
        "DP_AFFINITY update failed for service {}: affinity not recorded", service_id
    );
}
