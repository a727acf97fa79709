//! Types shared by the dp datapath and userspace.
//!
//! Every BPF map key and value and every trace event type is defined here, once.
//! All are `#[repr(C)]` with bytemuck `Pod`/`Zeroable` derives, so the compiler
//! proves they have no hidden padding: the kernel and userspace see the same
//! bytes. With the `user` feature they also implement `aya::Pod`.
#![cfg_attr(not(test), no_std)]

pub mod addr;
pub mod config;
pub mod crc32c;
pub mod ct;
pub mod device;
pub mod kernel;
pub mod layout;
pub mod lb;
pub mod names;
pub mod prefilter;
pub mod proto;
pub mod reason;
pub mod rules;
pub mod stats;
pub mod trace;

pub use config::DatapathConfig;
pub use ct::{CtEntry, CtKey, CtTimeouts};
pub use device::DeviceInfo;
pub use lb::{
    AffinityKey, AffinityValue, Backend, MemberKey, RevNatValue, ServiceKey, ServiceValue,
    SourceRangeKey,
};
pub use reason::{Hook, Reason, Verdict};
pub use stats::{counter_index, counter_slot, ReasonCounter, COUNTER_SLOTS, REASON_SLOTS};
pub use trace::{FlowTuple, TraceEvent, TraceSession};

/// Names of the maps in the dp object, as userspace looks them up.
///
/// The kernel keeps 15 characters of a map name; these fit.
pub mod map_names {
    pub const COUNTERS: &str = "DP_COUNTERS";
    pub const CONFIG: &str = "DP_CONFIG";
    /// One trace ring buffer per session slot (`trace::TRACE_SESSIONS`).
    pub const TRACE_RINGS: [&str; 4] = ["DP_TRACE_0", "DP_TRACE_1", "DP_TRACE_2", "DP_TRACE_3"];
    pub const TRACE_SESSIONS: &str = "DP_TRACE_SESS";
    pub const RECENT: &str = "DP_RECENT";
    pub const RECENT_HEAD: &str = "DP_RECENT_HEAD";
    pub const TRACE_LOST: &str = "DP_TRACE_LOST";
    pub const SERVICES: &str = "DP_SERVICES";
    pub const BACKENDS: &str = "DP_BACKENDS";
    pub const REVNAT: &str = "DP_REVNAT";
    pub const CT: &str = "DP_CT";
    pub const NAMES: &str = "DP_NAMES";
    pub const AFFINITY: &str = "DP_AFFINITY";
    pub const MEMBERS: &str = "DP_MEMBERS";
    pub const SOURCE_RANGES: &str = "DP_SRC_RANGES";
    pub const DEVICES: &str = "DP_DEVICES";
    /// The layouts of the other pinned maps (`layout`), written by the agent.
    pub const LAYOUTS: &str = "DP_LAYOUTS";
    /// Per-CPU token bucket of the replies the datapath builds.
    pub const REPLY_BUDGET: &str = "DP_REPLY_BUDGET";
    /// Socket-level load balancing: socket cookie -> the service address
    /// the socket asked for (`lb::SockPeer`), for getpeername().
    pub const SOCK_PEERS: &str = "DP_SOCK_PEERS";
    /// Socket-level load balancing: the node's network namespace (cookie)
    /// and whether other namespaces' sockets are served too
    /// (`--socket-lb host|all`; `lb::SOCK_SCOPE_*`).
    pub const SOCK_SCOPE: &str = "DP_SOCK_SCOPE";
    /// Socket-level load balancing of unconnected UDP: (socket, service
    /// address) -> the backend its datagrams go to (`lb::SockBackend`).
    pub const SOCK_BACKENDS: &str = "DP_SOCK_BACKENDS";
    /// Socket-level load balancing of UDP: (socket, backend address) -> the
    /// service address replies appear to come from (`lb::SockPeer`).
    pub const SOCK_REVNAT: &str = "DP_SOCK_REVNAT";
    /// The pass-through filter's bit sets (`prefilter`): frontend
    /// addresses and backends, as hashed bits, and whether it is on.
    pub const PREFILTER: &str = "DP_PREFILTER";
}

/// Default capacities of the maps; userspace may set others at load time
/// (the agent sizes conntrack and affinity from the node: see
/// `dp::kernel::sizing` and docs/deploy.md).
pub mod map_sizes {
    /// `BPF_F_NO_PREALLOC`: a hash map's entries are allocated as they are
    /// added, so it costs what it holds plus its buckets (16 bytes per max
    /// entry). The maps only the agent writes are created so.
    pub const BPF_F_NO_PREALLOC: u32 = 1;
    /// `BPF_F_NO_COMMON_LRU`: an LRU map keeps one LRU list per CPU
    /// instead of one shared list. When the table is full, an insert then
    /// evicts a few entries (4) from its own CPU's list, instead of 128 at
    /// once from the shared list under its lock, which made about one new
    /// flow in a hundred pay ~20 µs more (BENCHMARKS.md, "The tail of a new
    /// connection"). Each CPU's list holds `max_entries / possible CPUs`.
    pub const BPF_F_NO_COMMON_LRU: u32 = 2;
    /// Master + backend slots + wildcard entries (allocated on use). Twice
    /// Cilium's default `--bpf-lb-map-max` (65 536), which counts the same
    /// master and slot entries.
    pub const SERVICES: u32 = 131_072;
    /// Backends (allocated on use).
    pub const BACKENDS: u32 = 65_536;
    /// Service ids (allocated on use): at most one per two `SERVICES`
    /// entries (a frontend with endpoints holds a master entry and a slot).
    pub const REVNAT: u32 = SERVICES / 2;
    /// Conntrack entries, two per flow, when no node sizing is asked for
    /// (tests, benches): what the agent's rule gives a node of 2 cores.
    pub const CT: u32 = 65_536;
    /// Service and backend names (allocated on use): one per service id
    /// and one per backend.
    pub const NAMES: u32 = REVNAT + BACKENDS;
    /// Session-affinity entries (LRU: the oldest client is forgotten), one
    /// per four conntrack entries, when no node sizing is asked for.
    pub const AFFINITY: u32 = CT / 4;
    /// (service id, backend id) pairs: one per backend slot (allocated on
    /// use).
    pub const MEMBERS: u32 = SERVICES;
    /// loadBalancerSourceRanges CIDRs, over all services (allocated on use).
    pub const SOURCE_RANGES: u32 = 16_384;
    /// Devices the programs are attached to (node devices and pod veths;
    /// allocated on use).
    pub const DEVICES: u32 = 4_096;
    /// Sockets socket-level load balancing remembers the service address
    /// of (for getpeername); the oldest are forgotten first.
    pub const SOCK_PEERS: u32 = 65_536;
    pub const SOCK_BACKENDS: u32 = 65_536;
    pub const SOCK_REVNAT: u32 = 65_536;
}

/// Names of the programs in the dp object.
pub mod program_names {
    pub const TC_INGRESS: &str = "dp_tc_ingress";
    pub const TC_EGRESS: &str = "dp_tc_egress";
    pub const XDP: &str = "dp_xdp";
    /// Returns TC_ACT_OK and nothing else: the floor for benchmarks.
    pub const TC_NOOP: &str = "dp_tc_noop";
    /// `dp_tc_ingress` with tracing compiled out (benchmarks only).
    pub const TC_UNTRACED: &str = "dp_tc_untraced";
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: each type is `#[repr(C)]`, `bytemuck::Pod` (checked by the derive:
    // no padding, every bit pattern valid), which is what `aya::Pod` requires.
    unsafe impl aya::Pod for crate::DatapathConfig {}
    unsafe impl aya::Pod for crate::ReasonCounter {}
    unsafe impl aya::Pod for crate::TraceEvent {}
    unsafe impl aya::Pod for crate::TraceSession {}
    unsafe impl aya::Pod for crate::ServiceKey {}
    unsafe impl aya::Pod for crate::ServiceValue {}
    unsafe impl aya::Pod for crate::Backend {}
    unsafe impl aya::Pod for crate::RevNatValue {}
    unsafe impl aya::Pod for crate::CtKey {}
    unsafe impl aya::Pod for crate::CtEntry {}
    unsafe impl aya::Pod for crate::names::NameKey {}
    unsafe impl aya::Pod for crate::names::NameValue {}
    unsafe impl aya::Pod for crate::AffinityKey {}
    unsafe impl aya::Pod for crate::AffinityValue {}
    unsafe impl aya::Pod for crate::MemberKey {}
    unsafe impl aya::Pod for crate::SourceRangeKey {}
    unsafe impl aya::Pod for crate::lb::SockPeer {}
    unsafe impl aya::Pod for crate::lb::SockAddrKey {}
    unsafe impl aya::Pod for crate::lb::SockBackend {}
    unsafe impl aya::Pod for crate::DeviceInfo {}
    unsafe impl aya::Pod for crate::config::ReplyBudget {}
    unsafe impl aya::Pod for crate::layout::LayoutKey {}
    unsafe impl aya::Pod for crate::layout::MapLayout {}
}
