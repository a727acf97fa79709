//! Always-on counters per (hook, reason).

use common::{counter_index, Hook, Reason};

use crate::maps::DP_COUNTERS;

#[inline(always)]
pub fn count(hook: Hook, reason: Reason, bytes: u32) {
    // Per-CPU slot: no other writer, so plain adds are exact.
    if let Some(c) = DP_COUNTERS.get_ptr_mut(counter_index(hook, reason)) {
        // SAFETY: the pointer is the map's value for this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(bytes);
        }
    }
}
