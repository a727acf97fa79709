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
    /// Reserved for lookup scopes (e.g. internal vs external traffic policy).
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
}

/// `ServiceValue::flags`: this entry is a wildcard (service address marker).
pub const SERVICE_FLAG_WILDCARD: u16 = 1 << 0;
/// `ServiceValue::flags` (master): a Local traffic policy limits this
/// frontend to the node's endpoints; with none, packets are dropped rather
/// than rejected (kube-proxy).
pub const SERVICE_FLAG_LOCAL_ONLY: u16 = 1 << 1;

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
}

/// `Backend::flags`: the endpoint is terminating (existing flows continue;
/// new flows only when no ready backend exists).
pub const BACKEND_FLAG_TERMINATING: u8 = 1 << 0;

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
