//! Always-on counters per (hook, reason).

use common::{counter_slot, Hook, Reason, REASON_SLOTS};

use crate::maps::DP_COUNTERS;

#[inline(always)]
pub fn count(hook: Hook, reason: Reason, bytes: u32) {
    count_number(hook, reason as u32, bytes);
}

/// Counts under a reason number as the decision record holds it (no
/// conversion back to `Reason` on the per-packet path).
#[inline(always)]
pub fn count_number(hook: Hook, reason: u32, bytes: u32) {
    if reason >= REASON_SLOTS {
        return;
    }
    // Per-CPU slot: no other writer, so plain adds are exact.
    if let Some(c) = DP_COUNTERS.get_ptr_mut(counter_slot(hook, reason)) {
        // SAFETY: the pointer is the map's value for this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(bytes);
        }
    }
}
