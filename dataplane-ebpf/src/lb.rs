//! Service lookup and backend selection: frontends, traffic-policy scopes,
//! source ranges and session affinity.

use aya_ebpf::{helpers::bpf_get_prandom_u32, maps::lpm_trie::Key};
use common::{
    lb::{
        BACKEND_FLAG_TERMINATING, SERVICE_FLAG_REJECT_UNSERVED, SERVICE_FLAG_WILDCARD,
        SOURCE_RANGE_PREFIX_BASE,
    },
    AffinityKey, AffinityValue, Backend, Reason, ServiceKey, ServiceValue, SourceRangeKey,
};

use crate::maps::{DP_AFFINITY, DP_BACKENDS, DP_SERVICES, DP_SRC_RANGES};

const NS_PER_SEC: u64 = 1_000_000_000;

pub enum ServiceLookup {
    /// The destination is not a service port (nor a ClusterIP).
    NotAService,
    /// A ClusterIP, but not on this port and protocol.
    PortNotServed,
    /// The frontend's master entry.
    Frontend(ServiceKey, ServiceValue),
}

/// Finds the frontend for a destination. The wildcard entry first: most
/// packets are not to a service address and stop after one lookup.
#[inline(always)]
pub fn lookup(daddr: &[u8; 16], dport: u16, protocol: u8) -> ServiceLookup {
    let wildcard = ServiceKey::wildcard(*daddr);
    // SAFETY: map value pointer from a successful lookup.
    let marker = match DP_SERVICES.get_ptr(&wildcard) {
        Some(v) if unsafe { (*v).flags } & SERVICE_FLAG_WILDCARD != 0 => unsafe { (*v).flags },
        _ => return ServiceLookup::NotAService,
    };
    let key = ServiceKey::master(*daddr, dport, protocol);
    match master(&key) {
        Some(v) => ServiceLookup::Frontend(key, v),
        None if marker & SERVICE_FLAG_REJECT_UNSERVED != 0 => ServiceLookup::PortNotServed,
        None => ServiceLookup::NotAService,
    }
}

/// The master entry at `key` (any scope), copied out.
#[inline(always)]
pub fn master(key: &ServiceKey) -> Option<ServiceValue> {
    // SAFETY: map value pointer, copied out.
    DP_SERVICES.get_ptr(key).map(|v| unsafe { *v })
}

/// Picks a backend for a new flow: a random ready backend; if none is ready,
/// a random serving-terminating one (kube-proxy's fallback).
#[inline(always)]
pub fn select_backend(key: &ServiceKey, master: &ServiceValue) -> Result<(u32, Backend), Reason> {
    let (first, n) = if master.count > 0 {
        (1u32, u32::from(master.count))
    } else if master.terminating_count > 0 {
        (
            u32::from(master.count) + 1,
            u32::from(master.terminating_count),
        )
    } else {
        return Err(Reason::NoEndpoints);
    };
    // SAFETY: helper without preconditions.
    let pick = unsafe { bpf_get_prandom_u32() } % n;
    let slot_key = key.with_slot((first + pick) as u16);
    let slot = DP_SERVICES
        .get_ptr(&slot_key)
        .ok_or(Reason::ServiceInconsistent)?;
    // SAFETY: map value pointer.
    let backend_id = unsafe { (*slot).backend_id };
    let backend = backend(backend_id).ok_or(Reason::ServiceInconsistent)?;
    Ok((backend_id, backend))
}

#[inline(always)]
pub fn backend(id: u32) -> Option<Backend> {
    // SAFETY: map value pointer, copied out.
    DP_BACKENDS.get_ptr(&id).map(|b| unsafe { *b })
}

/// Whether `saddr` is in one of the service's loadBalancerSourceRanges.
#[inline(always)]
pub fn source_allowed(service_id: u32, saddr: &[u8; 16]) -> bool {
    let key = Key::new(
        SOURCE_RANGE_PREFIX_BASE + 128,
        SourceRangeKey {
            service_id_be: service_id.to_be(),
            addr: *saddr,
        },
    );
    DP_SRC_RANGES.get(&key).is_some()
}

/// The client's session-affinity backend, if it is still valid: not timed
/// out, still a backend, and not terminating while ready backends exist
/// (kube-proxy checks affinity only against the endpoints in the chain).
#[inline(always)]
pub fn affinity_backend(
    service_id: u32,
    client: &[u8; 16],
    master: &ServiceValue,
    now: u64,
) -> Option<(u32, Backend)> {
    let key = AffinityKey {
        client: *client,
        service_id,
    };
    // SAFETY: map value pointer, copied out.
    let v = unsafe { *DP_AFFINITY.get_ptr(&key)? };
    let timeout = u64::from(master.affinity_timeout_s) * NS_PER_SEC;
    if now.saturating_sub(v.last_used_ns) > timeout {
        return None;
    }
    let b = backend(v.backend_id)?;
    if b.flags & BACKEND_FLAG_TERMINATING != 0 && master.count > 0 {
        return None;
    }
    Some((v.backend_id, b))
}

/// Records that a new flow of `client` went to `backend_id` now.
#[inline(always)]
pub fn remember_affinity(service_id: u32, client: &[u8; 16], backend_id: u32, now: u64) {
    let key = AffinityKey {
        client: *client,
        service_id,
    };
    let value = AffinityValue {
        backend_id,
        _pad: 0,
        last_used_ns: now,
    };
    // A full LRU map evicts its oldest entry; an insert can still fail under
    // memory pressure, and then the flow simply has no affinity record.
    if DP_AFFINITY.insert(&key, &value, 0).is_err() {
        crate::diag::affinity_not_recorded(service_id);
    }
}
