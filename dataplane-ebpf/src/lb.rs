//! Service lookup and backend selection.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use common::{lb::SERVICE_FLAG_WILDCARD, Backend, Reason, ServiceKey, ServiceValue};

use crate::maps::{DP_BACKENDS, DP_SERVICES};

pub enum ServiceLookup {
    /// The destination is not a service address.
    NotAService,
    /// A service address, but not on this port and protocol.
    PortNotServed,
    /// The frontend's master entry.
    Frontend(ServiceKey, ServiceValue),
}

#[inline(always)]
pub fn lookup(daddr: &[u8; 16], dport: u16, protocol: u8) -> ServiceLookup {
    let wildcard = ServiceKey::wildcard(*daddr);
    match DP_SERVICES.get_ptr(&wildcard) {
        // SAFETY: map value pointer from a successful lookup.
        Some(v) if unsafe { (*v).flags } & SERVICE_FLAG_WILDCARD != 0 => {}
        _ => return ServiceLookup::NotAService,
    }
    let key = ServiceKey::master(*daddr, dport, protocol);
    match DP_SERVICES.get_ptr(&key) {
        // SAFETY: as above; the value is copied out.
        Some(v) => ServiceLookup::Frontend(key, unsafe { *v }),
        None => ServiceLookup::PortNotServed,
    }
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
