//! Trace events: one record per packet in the `DP_TRACE` ring buffer while
//! tracing is enabled.

use bytemuck::{Pod, Zeroable};

/// Address family of a `FlowTuple`, as in `AF_INET` / `AF_INET6`.
pub const FAMILY_IPV4: u8 = 2;
pub const FAMILY_IPV6: u8 = 10;

/// A flow's addresses and ports. Addresses are 16 bytes (`crate::addr`:
/// IPv4-mapped for IPv4). Ports are in host order. All zero when the packet
/// had no such header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FlowTuple {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP); 0 when not IP.
    pub protocol: u8,
    /// `FAMILY_IPV4`, `FAMILY_IPV6` or 0 (not IP).
    pub family: u8,
    pub _pad: [u8; 2],
}

/// One datapath decision about one packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TraceEvent {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub timestamp_ns: u64,
    /// Interface the program ran on.
    pub ifindex: u32,
    /// Length of the packet as seen by the program.
    pub packet_len: u32,
    /// `Reason` number.
    pub reason: u32,
    /// `Hook` number.
    pub hook: u8,
    /// `Verdict` number.
    pub verdict: u8,
    /// TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10), 0 otherwise.
    pub tcp_flags: u8,
    pub _pad: u8,
    /// The service port's id (`ServiceValue::service_id`), 0 when none.
    pub service_id: u32,
    /// The backend's id (`DP_BACKENDS` key), 0 when none.
    pub backend_id: u32,
    /// The packet as it arrived.
    pub original: FlowTuple,
    /// The packet as it left (equal to `original` when not translated).
    pub translated: FlowTuple,
}

/// Ethertype and protocol numbers the datapath and its tests share.
pub mod proto {
    pub const ETH_P_IP: u16 = 0x0800;
    pub const ETH_P_IPV6: u16 = 0x86dd;
    pub const ETH_P_ARP: u16 = 0x0806;
    pub const IPPROTO_ICMP: u8 = 1;
    pub const IPPROTO_TCP: u8 = 6;
    pub const IPPROTO_UDP: u8 = 17;
}
