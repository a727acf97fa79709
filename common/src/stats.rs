//! Per-reason packet counters (always on, one per-CPU array).

use bytemuck::{Pod, Zeroable};

use crate::reason::{Hook, Reason};

/// Slots reserved per hook in the counter array; reasons are numbered below it.
pub const REASON_SLOTS: u32 = 64;
/// Entries of the `DP_COUNTERS` per-CPU array.
pub const COUNTER_SLOTS: u32 = Hook::COUNT * REASON_SLOTS;

/// Index of the counter for `reason` at `hook` in `DP_COUNTERS`.
#[inline(always)]
pub const fn counter_index(hook: Hook, reason: Reason) -> u32 {
    counter_slot(hook, reason as u32)
}

/// Index of the counter for a reason number at `hook`; the number must be
/// below `REASON_SLOTS`.
#[inline(always)]
pub const fn counter_slot(hook: Hook, reason: u32) -> u32 {
    hook as u32 * REASON_SLOTS + reason
}

/// Value of `DP_COUNTERS`: packets and bytes that got one reason at one hook.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ReasonCounter {
    pub packets: u64,
    pub bytes: u64,
}

// Reasons must fit in their block.
const _: () = {
    let mut i = 0;
    while i < Reason::ALL.len() {
        assert!((Reason::ALL[i] as u32) < REASON_SLOTS);
        i += 1;
    }
};
