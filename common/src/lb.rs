//! Service load-balancing maps: frontends with backend slots, backends,
//! reverse NAT. The shape follows Cilium's lb4_services / lb4_backends /
//! lb4_reverse_nat.
//!
//! A service port (frontend) is a run of `DP_SERVICES` entries with the same
//! (address, port, protocol): slot 0 is the master entry (counts, service id,
//! flags); slots `1..=count` hold the backend ids of ready backends; slots
//! `count+1..=count+terminating_count` hold serving-terminating backends, used
//! for new flows only when no backend is ready. Each service address also has
//! a wildcard entry (port 0, protocol 0), so traffic to a service IP on a port
//! it does not serve is recognised and rejected.
//!
//! Userspace write order (never exposes a half-written service to a packet):
//! backends first, then slots, then the master entry last; removal in the
//! opposite order. See ARCHITECTURE.md.

use bytemuck::{Pod, Zeroable};

/// Key of `DP_SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ServiceKey {
    /// Service address (`addr::v4_mapped` for IPv4).
    pub addr: [u8; 16],
    /// Service port, host order; 0 in the wildcard entry.
    pub port: u16,
    /// IP protocol (6 TCP, 17 UDP); 0 in the wildcard entry.
    pub protocol: u8,
    /// `SCOPE_EXTERNAL` (every frontend) or `SCOPE_INTERNAL` (the
    /// cluster-wide backends of an eTP=Local frontend, for traffic from
    /// inside the cluster).
    pub scope: u8,
    /// 0: master entry; 1..: backend slots.
    pub slot: u16,
    pub _pad: [u8; 2],
}

impl ServiceKey {
    pub const fn master(addr: [u8; 16], port: u16, protocol: u8) -> Self {
        ServiceKey {
            addr,
            port,
            protocol,
            scope: 0,
            slot: 0,
            _pad: [0; 2],
        }
    }

    /// The wildcard entry that marks `addr` as a service address.
    pub const fn wildcard(addr: [u8; 16]) -> Self {
        Self::master(addr, 0, 0)
    }

    pub const fn with_slot(self, slot: u16) -> Self {
        ServiceKey { slot, ..self }
    }

    pub const fn with_scope(self, scope: u8) -> Self {
        ServiceKey { scope, ..self }
    }
}

/// `ServiceKey::scope` of every frontend's own entries.
pub const SCOPE_EXTERNAL: u8 = 0;
/// `ServiceKey::scope` of the cluster-wide view of an eTP=Local frontend.
pub const SCOPE_INTERNAL: u8 = 1;

/// `ServiceValue::flags`: this entry is a wildcard (service address marker).
pub const SERVICE_FLAG_WILDCARD: u16 = 1 << 0;
/// `ServiceValue::flags` (master): a Local traffic policy limits this
/// frontend to the node's endpoints; with none, packets are dropped rather
/// than rejected (kube-proxy).
pub const SERVICE_FLAG_LOCAL_ONLY: u16 = 1 << 1;
/// `ServiceValue::flags` (master): a NodePort, externalIP or LoadBalancer
/// frontend. External traffic policy rules apply: with eTP=Cluster every
/// new flow is masqueraded; with eTP=Local only the host's own.
pub const SERVICE_FLAG_EXTERNAL: u16 = 1 << 2;
/// `ServiceValue::flags` (master): eTP=Local; a `SCOPE_INTERNAL` master
/// with the cluster-wide backends exists for traffic from pods and the host.
pub const SERVICE_FLAG_INTERNAL_SCOPE: u16 = 1 << 3;
/// `ServiceValue::flags` (master): `sessionAffinity: ClientIP`, timeout in
/// `affinity_timeout_s`.
pub const SERVICE_FLAG_AFFINITY: u16 = 1 << 4;
/// `ServiceValue::flags` (master): `loadBalancerSourceRanges`; sources not
/// in `DP_SOURCE_RANGES` for this service id are dropped.
pub const SERVICE_FLAG_SOURCE_RANGES: u16 = 1 << 5;
/// `ServiceValue::flags` (wildcard): the address is a ClusterIP, so ports it
/// does not serve are rejected (kube-proxy's cluster-ips-check). Node IPs,
/// externalIPs and LoadBalancer IPs pass such traffic to the stack.
pub const SERVICE_FLAG_REJECT_UNSERVED: u16 = 1 << 6;

/// Value of `DP_SERVICES`. Slot 0 uses the counts, id and flags; backend
/// slots use `backend_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceValue {
    /// Backend slots: the backend's id in `DP_BACKENDS`.
    pub backend_id: u32,
    /// Master: ready backends, in slots `1..=count`.
    pub count: u16,
    /// Master: serving-terminating backends, after the ready ones.
    pub terminating_count: u16,
    /// Master: the service port's id; key of `DP_REVNAT`, shown in traces.
    pub service_id: u32,
    pub flags: u16,
    pub _pad: u16,
    /// Master with `SERVICE_FLAG_AFFINITY`: the affinity timeout, seconds.
    pub affinity_timeout_s: u32,
}

/// Key of `DP_AFFINITY` (LRU): a client of a service port with
/// `sessionAffinity: ClientIP`. Keyed by address only, like kube-proxy's
/// `recent` lists.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AffinityKey {
    pub client: [u8; 16],
    pub service_id: u32,
}

/// `DP_MEMBERS` value bits: the backend is in the frontend's own ready
/// slots; in its serving-terminating ones only; the same two for the
/// cluster-wide (`SCOPE_INTERNAL`) slots of an eTP=Local frontend.
pub const MEMBER_READY: u8 = 1;
pub const MEMBER_TERMINATING: u8 = 2;
pub const MEMBER_INTERNAL_READY: u8 = 4;
pub const MEMBER_INTERNAL_TERMINATING: u8 = 8;

/// Key of `DP_MEMBERS` (value: `MEMBER_*`): a backend in a service port's
/// slots (ready or terminating, either scope). A session-affinity record holds
/// only while its backend is still the service's, as kube-proxy's `recent`
/// checks exist only for the service's current endpoints.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct MemberKey {
    pub service_id: u32,
    pub backend_id: u32,
}

/// Value of `DP_AFFINITY`: the client's backend and when a new flow last
/// went to it (the timeout runs from there, as `recent --rcheck --seconds`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
    pub last_used_ns: u64,
}

/// Data part of a `DP_SOURCE_RANGES` key (an LPM trie): the service id (all
/// 32 bits always match) then the source address. A CIDR a.b.c.d/n of
/// service s is stored with prefix length `SOURCE_RANGE_PREFIX_BASE + 96 + n`
/// (the address is IPv4-mapped); the value is 1.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SourceRangeKey {
    /// Big-endian service id, so the trie's bit order is the id's.
    pub service_id_be: u32,
    pub addr: [u8; 16],
}

/// Bits of `SourceRangeKey` before the address.
pub const SOURCE_RANGE_PREFIX_BASE: u32 = 32;

/// `Backend::flags`: the endpoint is terminating (existing flows continue;
/// new flows only when no ready backend exists).
pub const BACKEND_FLAG_TERMINATING: u8 = 1 << 0;
/// `Backend::flags`: out of every service, kept only while conntrack may
/// name it (the agent's collector deletes it once no entry does). New flows
/// never reach it (no slot holds it); a flow of it is treated as one whose
/// backend is gone, except the client's own reset, which is passed on so
/// that the backend's end closes too.
pub const BACKEND_FLAG_RETIRED: u8 = 1 << 1;

/// Value of `DP_BACKENDS` (key: backend id, `u32`, never 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Backend {
    pub addr: [u8; 16],
    /// Target port, host order.
    pub port: u16,
    pub protocol: u8,
    pub flags: u8,
}

/// Value of `DP_REVNAT` (key: service id, `u32`): the frontend replies must
/// come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RevNatValue {
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: [u8; 2],
}

/// Value of `DP_SOCK_PEERS` (key: the socket's cookie, `u64`): the service
/// address a socket connected to before socket-level load balancing
/// pointed it at a backend; getpeername() shows it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockPeer {
    /// The service address (`addr::v4_mapped` for IPv4).
    pub addr: [u8; 16],
    /// The service port, host order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Key of `DP_SOCK_BACKENDS` and `DP_SOCK_REVNAT`: a socket (its cookie)
/// and an address it sent to or heard from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockAddrKey {
    pub cookie: u64,
    /// `addr::v4_mapped` for IPv4.
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Value of `DP_SOCK_BACKENDS` (key: the socket and the service address
/// it sends to): the backend an unconnected UDP socket's datagrams to
/// that service go to, kept while the backend stays the service's, as
/// conntrack keeps a UDP flow's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockBackend {
    pub backend_id: u32,
    /// The service port whose member it must stay (`MemberKey`).
    pub service_id: u32,
}

/// `DP_SOCK_SCOPE` index: the node's network namespace cookie (its
/// sockets are the host's: node processes, hostNetwork pods).
pub const SOCK_SCOPE_NODE_NETNS: u32 = 0;
/// `DP_SOCK_SCOPE` index: non-zero when sockets of every namespace in the
/// cgroup are served (`--socket-lb all`), zero for the node's only.
pub const SOCK_SCOPE_ALL: u32 = 1;

/// The session-affinity client of a socket outside the node's network
/// namespace (a pod's, `--socket-lb all`): its address is not known at
/// connect(), so the namespace stands for it, as an address in the IPv6
/// discard prefix `100::/64` (RFC 6666) that no packet carries.
pub const fn sock_affinity_client(netns_cookie: u64) -> [u8; 16] {
    let c = netns_cookie.to_be_bytes();
    [
        0x01, 0x00, 0, 0, 0, 0, 0, 0, c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7],
    ]
}
