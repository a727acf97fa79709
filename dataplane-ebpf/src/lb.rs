//! Service lookup and backend selection: frontends, traffic-policy scopes,
//! source ranges and session affinity.

use aya_ebpf::{helpers::bpf_get_prandom_u32, maps::lpm_trie::Key};
use common::{
    lb::SOURCE_RANGE_PREFIX_BASE,
    rules::{self, Frontend},
    AffinityKey, AffinityValue, Backend, Reason, ServiceKey, ServiceValue, SourceRangeKey,
};

use crate::maps::{DP_AFFINITY, DP_BACKENDS, DP_MEMBERS, DP_SERVICES, DP_SRC_RANGES};

/// The frontend for a destination (`rules::frontend`): its master key and
/// entry. The wildcard entry first: most packets are not to a service
/// address and stop after one lookup.
#[inline(always)]
pub fn lookup(daddr: &[u8; 16], dport: u16, protocol: u8) -> Frontend<(ServiceKey, ServiceValue)> {
    rules::frontend(wildcard_flags(daddr), || {
        let key = ServiceKey::master(*daddr, dport, protocol);
        master(&key).map(|m| (key, m))
    })
}

/// `lookup` for the socket hooks, where most calls that reach a lookup are
/// to a Service: the master entry first, and the wildcard only when there
/// is none (to tell a port a ClusterIP does not serve from no service).
/// One lookup fewer per translated connect(), and the same answers once
/// a frontend's entries are written: the agent writes a frontend's
/// wildcard after its master and deletes it after the last master of the
/// address, so a master found has complete slots whether its wildcard is
/// written yet or not (ARCHITECTURE.md, "A service in the maps, and the
/// write order"); until the wildcard is there (a moment, or until the
/// agent's retry of a failed sync) the socket hooks serve a frontend tc
/// does not yet.
#[inline(always)]
pub fn lookup_master_first(
    daddr: &[u8; 16],
    dport: u16,
    protocol: u8,
) -> Frontend<(ServiceKey, ServiceValue)> {
    let key = ServiceKey::master(*daddr, dport, protocol);
    if let Some(m) = master(&key) {
        return Frontend::Found((key, m));
    }
    rules::frontend(wildcard_flags(daddr), || None::<(ServiceKey, ServiceValue)>)
}

/// The flags of the address's wildcard entry, if it is a service address.
#[inline(always)]
fn wildcard_flags(daddr: &[u8; 16]) -> Option<u16> {
    // SAFETY: map value pointer from a successful lookup.
    DP_SERVICES
        .get_ptr(&ServiceKey::wildcard(*daddr))
        .map(|v| unsafe { (*v).flags })
}

/// The master entry at `key` (any scope), copied out.
#[inline(always)]
pub fn master(key: &ServiceKey) -> Option<ServiceValue> {
    // SAFETY: map value pointer, copied out.
    DP_SERVICES.get_ptr(key).map(|v| unsafe { *v })
}

/// Picks a random one of the eligible backends (`rules::eligible`) for a
/// new flow.
#[inline(always)]
pub fn select_backend(key: &ServiceKey, master: &ServiceValue) -> Result<(u32, Backend), Reason> {
    let Some(e) = rules::eligible(master) else {
        return Err(Reason::NoEndpoints);
    };
    // SAFETY: helper without preconditions.
    let pick = unsafe { bpf_get_prandom_u32() } % u32::from(e.count);
    let slot_key = key.with_slot((u32::from(e.first_slot) + pick) as u16);
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

/// The client's session-affinity backend, if its record still holds
/// (`rules::affinity_backend`).
#[inline(always)]
pub fn affinity_backend(
    service_id: u32,
    client: &[u8; 16],
    master: &ServiceValue,
    now: u64,
    internal: bool,
) -> Option<(u32, Backend)> {
    let key = AffinityKey {
        client: *client,
        service_id,
    };
    // SAFETY: map value pointer, copied out.
    let v = unsafe { *DP_AFFINITY.get_ptr(&key)? };
    // Whether the backend is still the service's, and how: a record of a
    // backend removed from it (or whose id is now another's) is no
    // affinity. Found by the fuzzer (fuzz_test_run.rs).
    let member = |backend_id| {
        let key = common::MemberKey {
            service_id,
            backend_id,
        };
        // SAFETY: map value pointer, copied out.
        DP_MEMBERS.get_ptr(&key).map(|m| unsafe { *m })
    };
    rules::affinity_backend(master, &v, now, internal, member, backend).map(|b| (v.backend_id, b))
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
