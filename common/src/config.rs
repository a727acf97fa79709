//! Datapath configuration written by userspace, read per packet.

use bytemuck::{Pod, Zeroable};

/// The single value of the `DP_CONFIG` array (index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DatapathConfig {
    /// Non-zero: every packet also emits a `TraceEvent` into `DP_TRACE`.
    /// Zero (the default): only the counters are updated.
    pub trace_enabled: u32,
    /// Reserved, zero.
    pub _reserved: u32,
}
