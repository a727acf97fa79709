//! The maps of the dp object. Their key/value types live in `common`; userspace
//! finds them by the names in `common::map_names`.

use aya_ebpf::{
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
};
use common::{DatapathConfig, ReasonCounter, TraceEvent, COUNTER_SLOTS};

/// Packets and bytes per (hook, reason); always on.
#[map(name = "DP_COUNTERS")]
pub static DP_COUNTERS: PerCpuArray<ReasonCounter> =
    PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Index 0: the datapath configuration, written by userspace.
#[map(name = "DP_CONFIG")]
pub static DP_CONFIG: Array<DatapathConfig> = Array::with_max_entries(1, 0);

/// Trace events (`TraceEvent`), read by `dp trace` and the tests.
#[map(name = "DP_TRACE")]
pub static DP_TRACE: RingBuf = RingBuf::with_byte_size(TRACE_RING_BYTES, 0);

/// Index 0: trace events that did not fit in `DP_TRACE` (reader too slow).
#[map(name = "DP_TRACE_LOST")]
pub static DP_TRACE_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// 1 MiB: about 10 000 events of buffering between reader wake-ups.
const TRACE_RING_BYTES: u32 = 1 << 20;

// The ring buffer hands out 8-byte aligned records.
const _: () = assert!(core::mem::size_of::<TraceEvent>() % 8 == 0);
