//! Connection tracking for service flows (`DP_CT`, an LRU hash).
//!
//! A translated flow has two entries: the original direction, keyed by the
//! tuple the client sent (client -> service), and the reply direction, keyed
//! by the tuple the backend sends back (backend -> client, or -> the
//! masquerade address). The two tuples never coincide (an original tuple's
//! destination is a service address, a reply tuple's source is a backend), so
//! one lookup finds either, and `CtEntry::direction` says which it is.
//! Each direction refreshes its own entry; state changes go to both.

use bytemuck::{Pod, Zeroable};

pub const CT_DIR_ORIGINAL: u8 = 0;
pub const CT_DIR_REPLY: u8 = 1;

/// Key of `DP_CT`. Ports in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CtKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

/// `CtEntry::flags`: the source was masqueraded (SNAT to `nat_addr:nat_port`
/// in the original direction; restored from it in the reply direction).
pub const CT_FLAG_SNAT: u8 = 1 << 0;
/// `CtEntry::flags`: the client was the backend itself (hairpin).
pub const CT_FLAG_HAIRPIN: u8 = 1 << 1;
/// `CtEntry::flags`: the flow's service has ClientIP session affinity; its
/// tracking records the client's backend in `DP_AFFINITY`.
pub const CT_FLAG_AFFINITY: u8 = 1 << 2;

/// `CtEntry::state`, the protocol state that decides the timeout.
pub const CT_STATE_NEW: u8 = 0;
/// A reply has been seen (TCP: past the handshake; UDP: "stream").
pub const CT_STATE_ESTABLISHED: u8 = 1;
/// TCP FIN seen (the other side may still send: a half-close).
pub const CT_STATE_CLOSING: u8 = 2;
/// TCP RST seen: neither end keeps the connection (a reset leaves no
/// TIME_WAIT). The entries stay until they expire, for late packets, but
/// once quiet their masquerade port may go to a new flow
/// (`rules::frees_nat_port`).
pub const CT_STATE_CLOSED: u8 = 3;

/// Value of `DP_CT`.
#[cfg(not(feature = "layout-next"))]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CtEntry {
    /// CLOCK_MONOTONIC deadline (ns); past it the entry is dead and the GC
    /// deletes it.
    pub expires_ns: u64,
    pub backend_id: u32,
    pub service_id: u32,
    /// Original direction: the SNAT source. Reply direction: the client's
    /// real address to restore. Only with `CT_FLAG_SNAT`.
    pub nat_addr: [u8; 16],
    pub nat_port: u16,
    pub state: u8,
    pub flags: u8,
    /// `CT_DIR_ORIGINAL` or `CT_DIR_REPLY`.
    pub direction: u8,
    pub _pad: [u8; 3],
}

/// Value of `DP_CT` in the `layout-next` build: another size and field
/// order (a field added in front, `expires_ns` moved), so that the upgrade
/// and rollback tests run against a layout a byte copy would garble.
#[cfg(feature = "layout-next")]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CtEntry {
    /// Not written by the datapath; zero means "not known".
    pub created_ns: u64,
    pub backend_id: u32,
    pub service_id: u32,
    pub expires_ns: u64,
    pub nat_addr: [u8; 16],
    pub nat_port: u16,
    pub state: u8,
    pub flags: u8,
    pub direction: u8,
    pub _pad: [u8; 3],
}

/// Timeouts in seconds, in `DatapathConfig`. Defaults follow the kernel's
/// conntrack and kube-proxy (24 h established TCP).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct CtTimeouts {
    pub tcp_syn: u32,
    pub tcp_established: u32,
    pub tcp_closing: u32,
    pub udp: u32,
    pub udp_replied: u32,
    pub _pad: u32,
}

impl CtTimeouts {
    pub const DEFAULT: CtTimeouts = CtTimeouts {
        tcp_syn: 60,
        tcp_established: 86_400,
        tcp_closing: 10,
        udp: 30,
        udp_replied: 120,
        _pad: 0,
    };
}

impl Default for CtTimeouts {
    fn default() -> Self {
        Self::DEFAULT
    }
}
