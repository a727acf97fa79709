//! The maps of the dp object. Their key/value types live in `common`; userspace
//! finds them by the names in `common::map_names`. Sizes here are defaults;
//! userspace may override them at load time.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use common::{
    map_sizes,
    names::{NameKey, NameValue},
    AffinityKey, AffinityValue, Backend, CtEntry, CtKey, DatapathConfig, DeviceInfo, ReasonCounter,
    RevNatValue, ServiceKey, ServiceValue, SourceRangeKey, TraceEvent, TraceSession, COUNTER_SLOTS,
};

/// Packets and bytes per (hook, reason); always on.
#[map(name = "DP_COUNTERS")]
pub static DP_COUNTERS: PerCpuArray<ReasonCounter> =
    PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Index 0: the datapath configuration, written by userspace.
#[map(name = "DP_CONFIG")]
pub static DP_CONFIG: Array<DatapathConfig> = Array::with_max_entries(1, 0);

/// `dp trace` session slots and their filters (`common::trace`).
#[map(name = "DP_TRACE_SESS")]
pub static DP_TRACE_SESS: Array<TraceSession> =
    Array::with_max_entries(common::trace::TRACE_SESSIONS, 0);

/// Trace events (`TraceEvent`) of session slot 0..3, read by `dp trace`.
#[map(name = "DP_TRACE_0")]
pub static DP_TRACE_0: RingBuf = RingBuf::with_byte_size(TRACE_RING_BYTES, 0);
#[map(name = "DP_TRACE_1")]
pub static DP_TRACE_1: RingBuf = RingBuf::with_byte_size(TRACE_RING_BYTES, 0);
#[map(name = "DP_TRACE_2")]
pub static DP_TRACE_2: RingBuf = RingBuf::with_byte_size(TRACE_RING_BYTES, 0);
#[map(name = "DP_TRACE_3")]
pub static DP_TRACE_3: RingBuf = RingBuf::with_byte_size(TRACE_RING_BYTES, 0);

/// The last `RECENT_EVENTS` drops and rejects of each CPU, a ring
/// (`dp trace --since`); written whether or not a session is open.
#[map(name = "DP_RECENT")]
pub static DP_RECENT: PerCpuArray<TraceEvent> =
    PerCpuArray::with_max_entries(common::trace::RECENT_EVENTS, 0);

/// Index 0: where this CPU writes its next `DP_RECENT` entry.
#[map(name = "DP_RECENT_HEAD")]
pub static DP_RECENT_HEAD: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Index 0: trace events that did not fit in `DP_TRACE` (reader too slow).
#[map(name = "DP_TRACE_LOST")]
pub static DP_TRACE_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

// The maps only the agent writes (services, backends, reverse NAT, names,
// source ranges, devices) are created without preallocation: they cost
// what they hold (plus the hash table's buckets, 16 bytes per max entry),
// so their capacity can be generous. The datapath only reads them.

/// Service frontends: master entries, backend slots, wildcard entries.
#[map(name = "DP_SERVICES")]
pub static DP_SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(map_sizes::SERVICES, BPF_F_NO_PREALLOC);

/// Backend id -> backend.
#[map(name = "DP_BACKENDS")]
pub static DP_BACKENDS: HashMap<u32, Backend> =
    HashMap::with_max_entries(map_sizes::BACKENDS, BPF_F_NO_PREALLOC);

/// Service id -> the address replies must come from.
#[map(name = "DP_REVNAT")]
pub static DP_REVNAT: HashMap<u32, RevNatValue> =
    HashMap::with_max_entries(map_sizes::REVNAT, BPF_F_NO_PREALLOC);

/// Connection tracking of service flows (see `common::ct`). LRU maps are
/// always preallocated; userspace sizes it from the node at load time.
/// Per-CPU LRU lists (`BPF_F_NO_COMMON_LRU`): a full table evicts a few
/// entries per insert rather than a batch of 128 (a new flow's tail).
#[map(name = "DP_CT")]
pub static DP_CT: LruHashMap<CtKey, CtEntry> =
    LruHashMap::with_max_entries(map_sizes::CT, map_sizes::BPF_F_NO_COMMON_LRU);

/// Session affinity: (client, service id) -> backend and last use.
#[map(name = "DP_AFFINITY")]
pub static DP_AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(map_sizes::AFFINITY, 0);

/// (service id, backend id) -> 1 for each backend in a service's slots:
/// a session-affinity record is used only while this holds.
#[map(name = "DP_MEMBERS")]
pub static DP_MEMBERS: HashMap<common::MemberKey, u8> =
    HashMap::with_max_entries(map_sizes::MEMBERS, BPF_F_NO_PREALLOC);

/// loadBalancerSourceRanges: (service id, source CIDR) -> 1.
#[map(name = "DP_SRC_RANGES")]
pub static DP_SRC_RANGES: LpmTrie<SourceRangeKey, u8> =
    LpmTrie::with_max_entries(map_sizes::SOURCE_RANGES, BPF_F_NO_PREALLOC);

/// Names of services and backends for the tools (`common::names`). Written
/// by the agent only; declared here so it is created and pinned with the rest.
#[map(name = "DP_NAMES")]
pub static DP_NAMES: HashMap<NameKey, NameValue> =
    HashMap::with_max_entries(map_sizes::NAMES, BPF_F_NO_PREALLOC);

/// ifindex -> MAC of each device the programs are attached to, written by
/// userspace when it attaches (`common::device`).
#[map(name = "DP_DEVICES")]
pub static DP_DEVICES: HashMap<u32, DeviceInfo> =
    HashMap::with_max_entries(map_sizes::DEVICES, BPF_F_NO_PREALLOC);

/// `BPF_F_NO_PREALLOC`: entries are allocated as they are added.
const BPF_F_NO_PREALLOC: u32 = common::map_sizes::BPF_F_NO_PREALLOC;

/// One decision record per CPU, built while a packet is handled and copied
/// to `DP_TRACE` when traced (see `trace`).
#[map(name = "DP_DECISION")]
pub static DP_DECISION: PerCpuArray<TraceEvent> = PerCpuArray::with_max_entries(1, 0);

/// Index 0: this CPU's budget of replies built here (ICMP port
/// unreachable, TCP resets): a token bucket, so a flood to a Service without
/// endpoints gets replies at the configured rate (`reject::budget`).
#[map(name = "DP_REPLY_BUDGET")]
pub static DP_REPLY_BUDGET: PerCpuArray<common::config::ReplyBudget> =
    PerCpuArray::with_max_entries(1, 0);

/// One scratch buffer per CPU for building ICMP errors and TCP resets.
#[map(name = "DP_SCRATCH")]
pub static DP_SCRATCH: PerCpuArray<[u8; crate::reject::SCRATCH_LEN]> =
    PerCpuArray::with_max_entries(1, 0);

/// 1 MiB per session: about 4 000 events of buffering between reader
/// wake-ups.
const TRACE_RING_BYTES: u32 = 1 << 20;

// The ring buffer hands out 8-byte aligned records.
const _: () = assert!(core::mem::size_of::<TraceEvent>() % 8 == 0);
// One ring buffer per session slot.
const _: () = assert!(common::trace::TRACE_SESSIONS == 4);

/// Socket-level load balancing: socket cookie -> the service address it
/// connected to, for getpeername() and the agent's sweep. The entry goes
/// when the socket closes (`dp_sock_release`), so a plain hash map: an
/// insert takes a free entry from per-CPU free lists that borrow from
/// each other, with no shared lock (the LRU's one shared list was a lock
/// per connect(), BENCHMARKS.md, "Where the socket path's time goes"), and
/// no CPU's share of the capacity runs out before the map does (as with
/// per-CPU LRU lists). Full, a new socket goes unrecorded (getpeername()
/// shows its backend) rather than a live one losing its record.
#[map(name = "DP_SOCK_PEERS")]
pub static DP_SOCK_PEERS: HashMap<u64, common::lb::SockPeer> =
    HashMap::with_max_entries(map_sizes::SOCK_PEERS, 0);

/// Socket-level load balancing: the node's network namespace cookie and
/// whether every namespace is served (`common::lb::SOCK_SCOPE_*`).
#[map(name = "DP_SOCK_SCOPE")]
pub static DP_SOCK_SCOPE: Array<u64> = Array::with_max_entries(2, 0);

/// Socket-level load balancing of unconnected UDP: (socket, service
/// address) -> its backend, so a socket's datagrams to a service keep
/// going to one backend while it stays the service's. LRU: entries of
/// closed sockets age out.
#[map(name = "DP_SOCK_BACKENDS")]
pub static DP_SOCK_BACKENDS: LruHashMap<common::lb::SockAddrKey, common::lb::SockBackend> =
    LruHashMap::with_max_entries(map_sizes::SOCK_BACKENDS, 0);

/// The trace event of a socket call, built per CPU (a `TraceEvent` is too
/// large for the BPF stack of the socket hooks' call chain). Not
/// `DP_DECISION`: tc may run on this CPU in the middle of a socket hook.
#[map(name = "DP_SOCK_EVENT")]
pub static DP_SOCK_EVENT: PerCpuArray<TraceEvent> = PerCpuArray::with_max_entries(1, 0);

/// Socket-level load balancing of UDP: (socket, backend address) -> the
/// service address, for recvmsg() to show replies coming from it. A
/// connected socket's entry goes when it closes (`dp_sock_release`), an
/// unconnected one's ages out (LRU).
#[map(name = "DP_SOCK_REVNAT")]
pub static DP_SOCK_REVNAT: LruHashMap<common::lb::SockAddrKey, common::lb::SockPeer> =
    LruHashMap::with_max_entries(map_sizes::SOCK_REVNAT, 0);

/// The pass-through filter (`common::prefilter`): word 0 says whether it
/// is on, then the frontend-address bits (written by the agent), then the
/// tracked-backend words and the tracked-backend-address words (marked by
/// the datapath before each reply entry, and by the agent at start for the
/// conntrack it adopts). Not pinned:
/// each agent fills its own at start.
#[map(name = "DP_PREFILTER")]
pub static DP_PREFILTER: Array<u64> = Array::with_max_entries(common::prefilter::WORDS, 0);
