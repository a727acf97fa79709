//! Types shared by the dp datapath and userspace.
//!
//! Every BPF map key and value and every trace event type is defined here, once.
//! All are `#[repr(C)]` with bytemuck `Pod`/`Zeroable` derives, so the compiler
//! proves they have no hidden padding: the kernel and userspace see the same
//! bytes. With the `user` feature they also implement `aya::Pod`.
#![cfg_attr(not(test), no_std)]

pub mod config;
pub mod reason;
pub mod stats;
pub mod trace;

pub use config::DatapathConfig;
pub use reason::{Hook, Reason, Verdict};
pub use stats::{counter_index, ReasonCounter, COUNTER_SLOTS, REASON_SLOTS};
pub use trace::{FlowTuple, TraceEvent};

/// Names of the maps in the dp object, as userspace looks them up.
///
/// The kernel keeps 15 characters of a map name; these fit.
pub mod map_names {
    pub const COUNTERS: &str = "DP_COUNTERS";
    pub const CONFIG: &str = "DP_CONFIG";
    pub const TRACE_EVENTS: &str = "DP_TRACE";
    pub const TRACE_LOST: &str = "DP_TRACE_LOST";
}

/// Names of the programs in the dp object.
pub mod program_names {
    pub const TC_INGRESS: &str = "dp_tc_ingress";
    pub const TC_EGRESS: &str = "dp_tc_egress";
    pub const XDP: &str = "dp_xdp";
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: each type is `#[repr(C)]`, `bytemuck::Pod` (checked by the derive:
    // no padding, every bit pattern valid), which is what `aya::Pod` requires.
    unsafe impl aya::Pod for crate::DatapathConfig {}
    unsafe impl aya::Pod for crate::ReasonCounter {}
    unsafe impl aya::Pod for crate::TraceEvent {}
}
