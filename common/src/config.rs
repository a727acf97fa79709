//! Datapath configuration written by userspace, read per packet.

use bytemuck::{Pod, Zeroable};

use crate::ct::CtTimeouts;

/// `DatapathConfig::flags`: masquerade all service traffic
/// (kube-proxy `--masquerade-all`).
pub const CONFIG_MASQUERADE_ALL: u32 = 1 << 0;

/// `TraceFilter::flags` bits: which fields must match.
pub const TRACE_FILTER_ADDR: u8 = 1 << 0;
pub const TRACE_FILTER_PORT: u8 = 1 << 1;
pub const TRACE_FILTER_PROTOCOL: u8 = 1 << 2;

/// In-kernel trace filter: a packet is traced when every set field matches
/// its source or its destination (before translation).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TraceFilter {
    pub addr: [u8; 16],
    pub port: u16,
    pub protocol: u8,
    pub flags: u8,
}

/// The single value of the `DP_CONFIG` array (index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DatapathConfig {
    /// Non-zero: packets (matching `trace_filter`) also emit a `TraceEvent`.
    pub trace_enabled: u32,
    /// `CONFIG_*` bits.
    pub flags: u32,
    /// The node's address: the source of masqueraded and hairpin traffic.
    pub node_ip: [u8; 16],
    /// kube-proxy's `--cluster-cidr`: service traffic from outside it is
    /// masqueraded. Prefix length 0: not set (nothing is masqueraded for it).
    pub cluster_cidr: [u8; 16],
    /// Prefix length in the 16-byte form (IPv4 /16 is 112).
    pub cluster_cidr_len: u8,
    pub _pad: [u8; 3],
    pub trace_filter: TraceFilter,
    pub ct_timeouts: CtTimeouts,
}
