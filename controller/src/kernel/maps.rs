//! Programming services into the datapath maps, and reading conntrack.
//!
//! Write order (so a packet never sees a half-written service; see
//! `common::lb` and ARCHITECTURE.md):
//! - set: backends, reverse NAT, backend slots, then the master entry (which
//!   makes the new slots reachable), then the wildcard; slots beyond the new
//!   count are deleted last.
//! - remove: master entry first (the frontend disappears at once), then the
//!   slots, reverse NAT and, with its last frontend, the wildcard.
//! - eTP=Local frontends: the internal-scope slots and master are written
//!   before the external master that points to them, removed after it.
//!   Source ranges likewise: before the master that enables them.

use std::net::{IpAddr, SocketAddr};

/// A service's backends in `DP_MEMBERS`: id -> `MEMBER_READY` or
/// `MEMBER_TERMINATING`.
pub type Members = std::collections::BTreeMap<u32, u8>;

use aya::maps::{
    lpm_trie::{Key as LpmKey, LpmTrie},
    HashMap, MapData,
};
use common::{
    addr::{addr16, as_v4, ip_of},
    lb::{
        BACKEND_FLAG_RETIRED, BACKEND_FLAG_TERMINATING, MEMBER_INTERNAL_READY,
        MEMBER_INTERNAL_TERMINATING, MEMBER_READY, MEMBER_TERMINATING, SCOPE_EXTERNAL,
        SCOPE_INTERNAL, SERVICE_FLAG_AFFINITY, SERVICE_FLAG_EXTERNAL, SERVICE_FLAG_INTERNAL_SCOPE,
        SERVICE_FLAG_LOCAL_ONLY, SERVICE_FLAG_REJECT_UNSERVED, SERVICE_FLAG_SOURCE_RANGES,
        SERVICE_FLAG_WILDCARD, SOURCE_RANGE_PREFIX_BASE,
    },
    map_names, Backend, CtEntry, CtKey, MemberKey, RevNatValue, ServiceKey, ServiceValue,
    SourceRangeKey,
};

use super::loader::{AddressUse, Datapath};
use crate::{
    error::{Error, Result},
    translate::sync::{BackendSlots, Frontend, ProgrammedServices, ServiceMaps},
};

/// The key of a frontend's master entry (slot 0, external scope).
fn master_key(frontend: &Frontend) -> ServiceKey {
    ServiceKey::master(
        addr16(frontend.addr.ip()),
        frontend.addr.port(),
        frontend.protocol,
    )
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> Error {
    move |source| Error::Map { name, source }
}

impl Datapath {
    /// The address's wildcard entry, as its frontends need it.
    fn write_wildcard(&mut self, addr: [u8; 16], use_: AddressUse) -> Result<()> {
        let mut services: HashMap<&mut MapData, ServiceKey, ServiceValue> =
            self.map_mut(map_names::SERVICES)?;
        let wildcard = ServiceKey::wildcard(addr);
        if use_.frontends == 0 {
            let _ = services.remove(&wildcard);
            return Ok(());
        }
        let flags = SERVICE_FLAG_WILDCARD
            | if use_.cluster_ips > 0 {
                SERVICE_FLAG_REJECT_UNSERVED
            } else {
                0
            };
        if services.get(&wildcard, 0).is_ok_and(|v| v.flags == flags) {
            return Ok(());
        }
        // The filter admits the address before the wildcard makes it a
        // frontend to tc and XDP.
        self.prefilter_frontend(&addr)?;
        let mut services: HashMap<&mut MapData, ServiceKey, ServiceValue> =
            self.map_mut(map_names::SERVICES)?;
        let marker = ServiceValue {
            flags,
            ..ServiceValue::default()
        };
        services
            .insert(wildcard, marker, 0)
            .map_err(map_err(map_names::SERVICES))
    }

    /// Makes `DP_SRC_RANGES` hold exactly `ranges` for `service_id`: new
    /// ones are added before old ones go.
    fn write_source_ranges(&mut self, service_id: u32, ranges: &[(IpAddr, u8)]) -> Result<()> {
        let old = self
            .source_ranges
            .get(&service_id)
            .cloned()
            .unwrap_or_default();
        if old == ranges {
            return Ok(());
        }
        let mut trie: LpmTrie<&mut MapData, SourceRangeKey, u8> =
            self.map_mut(map_names::SOURCE_RANGES)?;
        for (ip, len) in ranges {
            trie.insert(&source_range_key(service_id, *ip, *len), 1, 0)
                .map_err(map_err(map_names::SOURCE_RANGES))?;
        }
        for (ip, len) in &old {
            if !ranges.contains(&(*ip, *len)) {
                let _ = trie.remove(&source_range_key(service_id, *ip, *len));
            }
        }
        if ranges.is_empty() {
            self.source_ranges.remove(&service_id);
        } else {
            self.source_ranges.insert(service_id, ranges.to_vec());
        }
        Ok(())
    }

    /// Makes `DP_MEMBERS` hold exactly `backends` (id -> `MEMBER_*`) for
    /// `service_id`.
    fn write_members(&mut self, service_id: u32, backends: Members) -> Result<()> {
        let old = self.members.get(&service_id).cloned().unwrap_or_default();
        if old == backends {
            return Ok(());
        }
        let mut map: HashMap<&mut MapData, MemberKey, u8> = self.map_mut(map_names::MEMBERS)?;
        for (&backend_id, &how) in &backends {
            if old.get(&backend_id) != Some(&how) {
                let key = MemberKey {
                    service_id,
                    backend_id,
                };
                map.insert(key, how, 0)
                    .map_err(map_err(map_names::MEMBERS))?;
            }
        }
        for &backend_id in old.keys().filter(|id| !backends.contains_key(id)) {
            let _ = map.remove(&MemberKey {
                service_id,
                backend_id,
            });
        }
        if backends.is_empty() {
            self.members.remove(&service_id);
        } else {
            self.members.insert(service_id, backends);
        }
        Ok(())
    }

    /// Every backend id in `slots`, with the `MEMBER_*` bits of the scopes
    /// and sets it is in.
    fn members_of(slots: &BackendSlots) -> Members {
        let mut out = Members::new();
        let mut mark = |ids: &[u32], ready: bool, bits: (u8, u8)| {
            for id in ids {
                let m = out.entry(*id).or_default();
                // Ready wins: terminating only where not ready.
                if ready {
                    *m = (*m & !bits.1) | bits.0;
                } else if *m & bits.0 == 0 {
                    *m |= bits.1;
                }
            }
        };
        let own = (MEMBER_READY, MEMBER_TERMINATING);
        mark(&slots.ready, true, own);
        mark(&slots.terminating, false, own);
        if let Some((ready, terminating)) = &slots.internal {
            let internal = (MEMBER_INTERNAL_READY, MEMBER_INTERNAL_TERMINATING);
            mark(ready, true, internal);
            mark(terminating, false, internal);
        }
        out
    }

    /// Backend slots, then the master entry; stale slots last. Returns
    /// whether the frontend existed before.
    fn write_slots(
        &mut self,
        key: &ServiceKey,
        service_id: u32,
        slots: &BackendSlots,
    ) -> Result<bool> {
        let mut services: HashMap<&mut MapData, ServiceKey, ServiceValue> =
            self.map_mut(map_names::SERVICES)?;
        let old = services.get(key, 0).ok();
        let old_slots = old.map_or(0, |v| u32::from(v.count) + u32::from(v.terminating_count));
        let all = slots.ready.iter().chain(&slots.terminating);
        for (i, backend_id) in all.enumerate() {
            let value = ServiceValue {
                backend_id: *backend_id,
                ..ServiceValue::default()
            };
            services
                .insert(key.with_slot(i as u16 + 1), value, 0)
                .map_err(map_err(map_names::SERVICES))?;
        }
        let flag = |on: bool, f: u16| if on { f } else { 0 };
        let master = ServiceValue {
            backend_id: 0,
            count: slots.ready.len() as u16,
            terminating_count: slots.terminating.len() as u16,
            service_id,
            flags: flag(slots.local_only, SERVICE_FLAG_LOCAL_ONLY)
                | flag(slots.external, SERVICE_FLAG_EXTERNAL)
                | flag(slots.internal.is_some(), SERVICE_FLAG_INTERNAL_SCOPE)
                | flag(slots.affinity_seconds.is_some(), SERVICE_FLAG_AFFINITY)
                | flag(!slots.source_ranges.is_empty(), SERVICE_FLAG_SOURCE_RANGES),
            _pad: 0,
            affinity_timeout_s: slots.affinity_seconds.unwrap_or(0),
        };
        services
            .insert(key, master, 0)
            .map_err(map_err(map_names::SERVICES))?;
        let new_slots = (slots.ready.len() + slots.terminating.len()) as u32;
        for slot in new_slots + 1..=old_slots {
            let _ = services.remove(&key.with_slot(slot as u16));
        }
        Ok(old.is_some())
    }

    /// Master entry first, then its slots; returns the old master entry.
    fn remove_slots(&mut self, key: &ServiceKey) -> Result<Option<ServiceValue>> {
        let mut services: HashMap<&mut MapData, ServiceKey, ServiceValue> =
            self.map_mut(map_names::SERVICES)?;
        let Ok(master) = services.get(key, 0) else {
            return Ok(None);
        };
        services.remove(key).map_err(map_err(map_names::SERVICES))?;
        let slots = u32::from(master.count) + u32::from(master.terminating_count);
        for slot in 1..=slots {
            let _ = services.remove(&key.with_slot(slot as u16));
        }
        Ok(Some(master))
    }

    /// The conntrack entry of `key`, if there is one (live or not).
    pub fn ct_lookup(&self, key: &CtKey) -> Result<Option<CtEntry>> {
        let map: HashMap<&MapData, CtKey, CtEntry> = self.map_ref(map_names::CT)?;
        match map.get(key, 0) {
            Ok(e) => Ok(Some(e)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(map_names::CT)(e)),
        }
    }

    /// Every conntrack entry (live or expired).
    pub fn ct_entries(&self) -> Result<Vec<(CtKey, CtEntry)>> {
        let map: HashMap<&MapData, CtKey, CtEntry> = self.map_ref(map_names::CT)?;
        let mut out = Vec::new();
        for item in map.iter() {
            match item {
                Ok(kv) => out.push(kv),
                // An entry deleted (or evicted) while we walk: skip it.
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(map_err(map_names::CT)(e)),
            }
        }
        Ok(out)
    }

    /// Deletes expired conntrack entries; returns how many.
    pub fn ct_gc(&mut self) -> Result<usize> {
        let now = monotonic_ns();
        let expired: Vec<CtKey> = self
            .ct_entries()?
            .into_iter()
            .filter(|(_, e)| e.expires_ns <= now)
            .map(|(k, _)| k)
            .collect();
        let mut map: HashMap<&mut MapData, CtKey, CtEntry> = self.map_mut(map_names::CT)?;
        let mut removed = 0;
        for k in &expired {
            if map.remove(k).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// The `DP_SRC_RANGES` key of CIDR `ip/len` of a service (an IPv4 prefix
/// counted in the 16-byte, IPv4-mapped form).
pub fn source_range_key(service_id: u32, ip: IpAddr, len: u8) -> LpmKey<SourceRangeKey> {
    let mapped = if ip.is_ipv4() { 96 } else { 0 };
    LpmKey::new(
        SOURCE_RANGE_PREFIX_BASE + mapped + u32::from(len),
        SourceRangeKey {
            service_id_be: service_id.to_be(),
            addr: addr16(ip),
        },
    )
}

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Reads the programmed services back from service and backend maps, owned
/// by a `Datapath` or opened from pins.
pub fn programmed_services<S, B>(
    services: &HashMap<S, ServiceKey, ServiceValue>,
    backends: &HashMap<B, u32, Backend>,
) -> Result<ProgrammedServices>
where
    S: std::borrow::Borrow<MapData>,
    B: std::borrow::Borrow<MapData>,
{
    let mut out = ProgrammedServices::default();
    let mut masters = Vec::new();
    let mut slots = std::collections::BTreeMap::new();
    for item in services.iter() {
        let (k, v) = match item {
            Ok(kv) => kv,
            // Removed while we walk: skip it.
            Err(aya::maps::MapError::KeyNotFound) => continue,
            Err(e) => return Err(map_err(map_names::SERVICES)(e)),
        };
        if v.flags & SERVICE_FLAG_WILDCARD != 0 {
            continue;
        }
        if k.slot == 0 {
            masters.push((k, v));
        } else {
            slots.insert((k.addr, k.port, k.protocol, k.scope, k.slot), v.backend_id);
        }
    }
    let internal_masters: std::collections::BTreeMap<_, _> = masters
        .iter()
        .filter(|(k, _)| k.scope == SCOPE_INTERNAL)
        .map(|(k, v)| ((k.addr, k.port, k.protocol), *v))
        .collect();
    for (k, v) in masters.iter().filter(|(k, _)| k.scope == SCOPE_EXTERNAL) {
        let ids = |scope: u8, from: u16, n: u16| -> Vec<u32> {
            (from..from + n)
                .filter_map(|s| slots.get(&(k.addr, k.port, k.protocol, scope, s)).copied())
                .collect()
        };
        let frontend = Frontend {
            addr: SocketAddr::new(ip_of(&k.addr), k.port),
            protocol: k.protocol,
        };
        let internal = internal_masters
            .get(&(k.addr, k.port, k.protocol))
            .map(|i| {
                (
                    ids(SCOPE_INTERNAL, 1, i.count),
                    ids(SCOPE_INTERNAL, 1 + i.count, i.terminating_count),
                )
            });
        let programmed = BackendSlots {
            ready: ids(SCOPE_EXTERNAL, 1, v.count),
            terminating: ids(SCOPE_EXTERNAL, 1 + v.count, v.terminating_count),
            local_only: v.flags & SERVICE_FLAG_LOCAL_ONLY != 0,
            external: v.flags & SERVICE_FLAG_EXTERNAL != 0,
            internal,
            affinity_seconds: (v.flags & SERVICE_FLAG_AFFINITY != 0)
                .then_some(v.affinity_timeout_s),
            source_ranges: Vec::new(),
        };
        out.frontends.insert(frontend, (v.service_id, programmed));
    }
    for item in backends.iter() {
        let (id, b) = match item {
            Ok(kv) => kv,
            Err(aya::maps::MapError::KeyNotFound) => continue,
            Err(e) => return Err(map_err(map_names::BACKENDS)(e)),
        };
        // Retired: in no service any more, only kept for conntrack.
        if b.flags & BACKEND_FLAG_RETIRED != 0 {
            continue;
        }
        let addr = SocketAddr::new(ip_of(&b.addr), b.port);
        let terminating = b.flags & BACKEND_FLAG_TERMINATING != 0;
        out.backends.insert(id, (addr, b.protocol, terminating));
    }
    Ok(out)
}

impl Datapath {
    /// Service id -> its source ranges, read from `DP_SRC_RANGES`.
    pub fn read_source_ranges(&self) -> Result<std::collections::BTreeMap<u32, Vec<(IpAddr, u8)>>> {
        let trie: LpmTrie<&MapData, SourceRangeKey, u8> = self.map_ref(map_names::SOURCE_RANGES)?;
        source_ranges_in(&trie)
    }
}

/// Service id -> its source ranges, from a `DP_SRC_RANGES` trie (owned by a
/// `Datapath` or opened from its pin).
pub fn source_ranges_in<T: std::borrow::Borrow<MapData>>(
    trie: &LpmTrie<T, SourceRangeKey, u8>,
) -> Result<std::collections::BTreeMap<u32, Vec<(IpAddr, u8)>>> {
    let mut out: std::collections::BTreeMap<u32, Vec<(IpAddr, u8)>> =
        std::collections::BTreeMap::new();
    for key in trie.keys() {
        let key = key.map_err(map_err(map_names::SOURCE_RANGES))?;
        let data = key.data();
        let bits = key.prefix_len().saturating_sub(SOURCE_RANGE_PREFIX_BASE);
        let (ip, len) = match as_v4(&data.addr) {
            Some(v4) => (IpAddr::from(v4), bits.saturating_sub(96) as u8),
            None => (IpAddr::from(data.addr), bits as u8),
        };
        out.entry(u32::from_be(data.service_id_be))
            .or_default()
            .push((ip, len));
    }
    Ok(out)
}

impl ServiceMaps for Datapath {
    /// Adds or replaces a backend. `terminating` marks it for traces and
    /// inspection; whether it gets new flows depends on the slots it is in.
    fn set_backend(
        &mut self,
        id: u32,
        addr: SocketAddr,
        protocol: u8,
        terminating: bool,
    ) -> Result<()> {
        let backend = Backend {
            addr: addr16(addr.ip()),
            port: addr.port(),
            protocol,
            flags: if terminating {
                BACKEND_FLAG_TERMINATING
            } else {
                0
            },
        };
        let mut map: HashMap<&mut MapData, u32, Backend> = self.map_mut(map_names::BACKENDS)?;
        map.insert(id, backend, 0)
            .map_err(map_err(map_names::BACKENDS))
    }
    /// Removes a backend. Flows still pinned to it are moved (UDP) or reset
    /// (TCP) by the datapath on their next packet. Retiring
    /// (`retire_removed_backends`), the entry stays, flagged, so that a
    /// client's reset still reaches the backend; the collector deletes it.
    fn remove_backend(&mut self, id: u32) -> Result<()> {
        let retire = self.retire_removed_backends;
        let mut map: HashMap<&mut MapData, u32, Backend> = self.map_mut(map_names::BACKENDS)?;
        if retire {
            if let Ok(mut b) = map.get(&id, 0) {
                b.flags |= BACKEND_FLAG_RETIRED;
                return map.insert(id, b, 0).map_err(map_err(map_names::BACKENDS));
            }
        }
        match map.remove(&id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(map_names::BACKENDS)(e)),
        }
    }
    /// Adds or updates a frontend with its backend slots, in the safe order.
    fn set_service(
        &mut self,
        frontend: &Frontend,
        service_id: u32,
        slots: &BackendSlots,
    ) -> Result<()> {
        let key = master_key(frontend);
        let reply_source = RevNatValue {
            addr: key.addr,
            port: key.port,
            _pad: [0; 2],
        };
        self.map_mut::<HashMap<&mut MapData, u32, RevNatValue>>(map_names::REVNAT)?
            .insert(service_id, reply_source, 0)
            .map_err(map_err(map_names::REVNAT))?;
        self.write_source_ranges(service_id, &slots.source_ranges)?;
        let internal_key = key.with_scope(SCOPE_INTERNAL);
        if let Some((ready, terminating)) = &slots.internal {
            let internal = BackendSlots {
                ready: ready.clone(),
                terminating: terminating.clone(),
                internal: None,
                source_ranges: Vec::new(),
                local_only: false,
                ..slots.clone()
            };
            self.write_slots(&internal_key, service_id, &internal)?;
        }
        // Members before the slots that use them: a record of an affinity
        // to a backend holds once the backend is the service's.
        let mut members = self.members.get(&service_id).cloned().unwrap_or_default();
        // Until the slots are written, the old backends stay members.
        members.extend(Self::members_of(slots));
        self.write_members(service_id, members)?;
        let existed = self.write_slots(&key, service_id, slots)?;
        self.write_members(service_id, Self::members_of(slots))?;
        if slots.internal.is_none() {
            self.remove_slots(&internal_key)?;
        }
        if slots.source_ranges.is_empty() {
            self.write_source_ranges(service_id, &[])?;
        }
        let use_ = self.service_addresses.entry(key.addr).or_default();
        if !existed {
            use_.frontends += 1;
            use_.cluster_ips += u32::from(!slots.external);
        }
        let use_ = *use_;
        self.write_wildcard(key.addr, use_)
    }
    /// Removes a frontend, in the safe order.
    fn remove_service(&mut self, frontend: &Frontend) -> Result<()> {
        let key = master_key(frontend);
        let Some(master) = self.remove_slots(&key)? else {
            return Ok(());
        };
        self.remove_slots(&key.with_scope(SCOPE_INTERNAL))?;
        self.write_source_ranges(master.service_id, &[])?;
        self.write_members(master.service_id, Default::default())?;
        let mut use_ = self
            .service_addresses
            .get(&key.addr)
            .copied()
            .unwrap_or_default();
        use_.frontends = use_.frontends.saturating_sub(1);
        if master.flags & SERVICE_FLAG_EXTERNAL == 0 {
            use_.cluster_ips = use_.cluster_ips.saturating_sub(1);
        }
        if use_.frontends == 0 {
            self.service_addresses.remove(&key.addr);
        } else {
            self.service_addresses.insert(key.addr, use_);
        }
        self.write_wildcard(key.addr, use_)?;
        let _ = self
            .map_mut::<HashMap<&mut MapData, u32, RevNatValue>>(map_names::REVNAT)?
            .remove(&master.service_id);
        Ok(())
    }
    /// Sets the name of a service or backend id in `DP_NAMES`.
    fn set_name(&mut self, kind: u32, id: u32, name: &str) -> Result<()> {
        let mut map: HashMap<&mut MapData, common::names::NameKey, common::names::NameValue> =
            self.map_mut(map_names::NAMES)?;
        map.insert(
            common::names::NameKey { kind, id },
            common::names::NameValue::new(name),
            0,
        )
        .map_err(map_err(map_names::NAMES))
    }
    fn remove_name(&mut self, kind: u32, id: u32) -> Result<()> {
        let mut map: HashMap<&mut MapData, common::names::NameKey, common::names::NameValue> =
            self.map_mut(map_names::NAMES)?;
        match map.remove(&common::names::NameKey { kind, id }) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(map_names::NAMES)(e)),
        }
    }
    /// Reads the programmed services back from the maps, and rebuilds the
    /// per-address frontend counts the wildcard entries depend on.
    fn read_services(&mut self) -> Result<ProgrammedServices> {
        let mut programmed = {
            let services: HashMap<&MapData, ServiceKey, ServiceValue> =
                self.map_ref(map_names::SERVICES)?;
            let backends: HashMap<&MapData, u32, Backend> = self.map_ref(map_names::BACKENDS)?;
            programmed_services(&services, &backends)?
        };
        self.service_addresses.clear();
        for (frontend, (_, slots)) in &programmed.frontends {
            let use_ = self
                .service_addresses
                .entry(addr16(frontend.addr.ip()))
                .or_default();
            use_.frontends += 1;
            use_.cluster_ips += u32::from(!slots.external);
        }
        self.source_ranges = self.read_source_ranges()?;
        for (id, slots) in programmed.frontends.values_mut() {
            slots.source_ranges = self.source_ranges.get(id).cloned().unwrap_or_default();
        }
        // DP_MEMBERS made to match the slots read back (it may be new, or
        // behind after an interrupted write).
        let mut members: std::collections::BTreeMap<u32, Members> = Default::default();
        {
            let map: HashMap<&MapData, MemberKey, u8> = self.map_ref(map_names::MEMBERS)?;
            for entry in map.iter() {
                let (key, how) = entry.map_err(map_err(map_names::MEMBERS))?;
                members
                    .entry(key.service_id)
                    .or_default()
                    .insert(key.backend_id, how);
            }
        }
        self.members = members;
        let wanted: std::collections::BTreeMap<u32, Members> = programmed
            .frontends
            .values()
            .map(|(id, slots)| (*id, Self::members_of(slots)))
            .collect();
        let stale: Vec<u32> = self
            .members
            .keys()
            .filter(|id| !wanted.contains_key(id))
            .copied()
            .collect();
        for id in stale {
            self.write_members(id, Default::default())?;
        }
        for (id, backends) in wanted {
            self.write_members(id, backends)?;
        }
        Ok(programmed)
    }
}
