//! Programming services into the datapath maps, and reading conntrack.
//!
//! Write order (so a packet never sees a half-written service; see
//! `common::lb` and ARCHITECTURE.md):
//! - set: backends, reverse NAT, backend slots, then the master entry (which
//!   makes the new slots reachable), then the wildcard; slots beyond the new
//!   count are deleted last.
//! - remove: master entry first (the frontend disappears at once), then the
//!   slots, reverse NAT and, with its last frontend, the wildcard.

use std::net::{IpAddr, SocketAddr};

use aya::maps::{HashMap, MapData};
use common::{
    addr::{as_v4, v4_mapped},
    lb::{BACKEND_FLAG_TERMINATING, SERVICE_FLAG_LOCAL_ONLY, SERVICE_FLAG_WILDCARD},
    map_names, Backend, CtEntry, CtKey, RevNatValue, ServiceKey, ServiceValue,
};

use crate::{
    datapath::Datapath,
    error::{Error, Result},
};

/// The 16-byte map form of an address.
pub fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address of a 16-byte map form.
pub fn ip_of(a: &[u8; 16]) -> IpAddr {
    match as_v4(a) {
        Some(v4) => IpAddr::from(v4),
        None => IpAddr::from(*a),
    }
}

/// A service port as clients address it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: SocketAddr,
    /// IP protocol number (6 TCP, 17 UDP).
    pub protocol: u8,
}

impl Frontend {
    pub fn tcp(addr: SocketAddr) -> Self {
        Frontend { addr, protocol: 6 }
    }
    pub fn udp(addr: SocketAddr) -> Self {
        Frontend { addr, protocol: 17 }
    }
    fn master_key(&self) -> ServiceKey {
        ServiceKey::master(addr16(self.addr.ip()), self.addr.port(), self.protocol)
    }
}

/// The backends of one frontend, by id (`DP_BACKENDS` keys).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendSlots {
    /// Ready backends: new flows go to these.
    pub ready: Vec<u32>,
    /// Serving but terminating: new flows only when `ready` is empty.
    pub terminating: Vec<u32>,
    /// A Local traffic policy: with no backend, drop instead of reject.
    pub local_only: bool,
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> Error {
    move |source| Error::Map { name, source }
}

impl Datapath {
    /// Adds or replaces a backend. `terminating` marks it for traces and
    /// inspection; whether it gets new flows depends on the slots it is in.
    pub fn set_backend(
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
    /// (TCP) by the datapath on their next packet.
    pub fn remove_backend(&mut self, id: u32) -> Result<()> {
        let mut map: HashMap<&mut MapData, u32, Backend> = self.map_mut(map_names::BACKENDS)?;
        match map.remove(&id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(map_names::BACKENDS)(e)),
        }
    }

    /// Adds or updates a frontend with its backend slots, in the safe order.
    pub fn set_service(
        &mut self,
        frontend: &Frontend,
        service_id: u32,
        slots: &BackendSlots,
    ) -> Result<()> {
        let key = frontend.master_key();
        let reply_source = RevNatValue {
            addr: key.addr,
            port: key.port,
            _pad: [0; 2],
        };
        self.map_mut::<HashMap<&mut MapData, u32, RevNatValue>>(map_names::REVNAT)?
            .insert(service_id, reply_source, 0)
            .map_err(map_err(map_names::REVNAT))?;
        let existed = self.write_slots(&key, service_id, slots)?;
        if !existed {
            *self.service_addresses.entry(key.addr).or_default() += 1;
        }
        Ok(())
    }

    /// Backend slots, then the master entry, then the wildcard; stale slots
    /// last. Returns whether the frontend existed before.
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
        let master = ServiceValue {
            backend_id: 0,
            count: slots.ready.len() as u16,
            terminating_count: slots.terminating.len() as u16,
            service_id,
            flags: if slots.local_only {
                SERVICE_FLAG_LOCAL_ONLY
            } else {
                0
            },
            _pad: 0,
        };
        services
            .insert(key, master, 0)
            .map_err(map_err(map_names::SERVICES))?;
        let marker = ServiceValue {
            flags: SERVICE_FLAG_WILDCARD,
            ..ServiceValue::default()
        };
        services
            .insert(ServiceKey::wildcard(key.addr), marker, 0)
            .map_err(map_err(map_names::SERVICES))?;
        let new_slots = (slots.ready.len() + slots.terminating.len()) as u32;
        for slot in new_slots + 1..=old_slots {
            let _ = services.remove(&key.with_slot(slot as u16));
        }
        Ok(old.is_some())
    }

    /// Removes a frontend, in the safe order.
    pub fn remove_service(&mut self, frontend: &Frontend) -> Result<()> {
        let key = frontend.master_key();
        let Some(master) = self.remove_slots(&key)? else {
            return Ok(());
        };
        let remaining = self
            .service_addresses
            .get(&key.addr)
            .copied()
            .unwrap_or(1)
            .saturating_sub(1);
        if remaining == 0 {
            self.service_addresses.remove(&key.addr);
            let _ = self
                .map_mut::<HashMap<&mut MapData, ServiceKey, ServiceValue>>(map_names::SERVICES)?
                .remove(&ServiceKey::wildcard(key.addr));
        } else {
            self.service_addresses.insert(key.addr, remaining);
        }
        let _ = self
            .map_mut::<HashMap<&mut MapData, u32, RevNatValue>>(map_names::REVNAT)?
            .remove(&master.service_id);
        Ok(())
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

/// What the service maps hold, read back (for adoption and inspection).
#[derive(Clone, Debug, Default)]
pub struct ProgrammedServices {
    /// Frontend -> (service id, slots as programmed).
    pub frontends: std::collections::BTreeMap<Frontend, (u32, BackendSlots)>,
    /// Backend id -> (address, protocol, terminating).
    pub backends: std::collections::BTreeMap<u32, (SocketAddr, u8, bool)>,
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
            slots.insert((k.addr, k.port, k.protocol, k.slot), v.backend_id);
        }
    }
    for (k, v) in masters {
        let ids = |from: u16, n: u16| -> Vec<u32> {
            (from..from + n)
                .filter_map(|s| slots.get(&(k.addr, k.port, k.protocol, s)).copied())
                .collect()
        };
        let frontend = Frontend {
            addr: SocketAddr::new(ip_of(&k.addr), k.port),
            protocol: k.protocol,
        };
        let programmed = BackendSlots {
            ready: ids(1, v.count),
            terminating: ids(1 + v.count, v.terminating_count),
            local_only: v.flags & SERVICE_FLAG_LOCAL_ONLY != 0,
        };
        out.frontends.insert(frontend, (v.service_id, programmed));
    }
    for item in backends.iter() {
        let (id, b) = match item {
            Ok(kv) => kv,
            Err(aya::maps::MapError::KeyNotFound) => continue,
            Err(e) => return Err(map_err(map_names::BACKENDS)(e)),
        };
        let addr = SocketAddr::new(ip_of(&b.addr), b.port);
        let terminating = b.flags & BACKEND_FLAG_TERMINATING != 0;
        out.backends.insert(id, (addr, b.protocol, terminating));
    }
    Ok(out)
}

impl Datapath {
    /// Reads the programmed services back from the maps, and rebuilds the
    /// per-address frontend counts the wildcard entries depend on.
    pub fn read_services(&mut self) -> Result<ProgrammedServices> {
        let programmed = {
            let services: HashMap<&MapData, ServiceKey, ServiceValue> =
                self.map_ref(map_names::SERVICES)?;
            let backends: HashMap<&MapData, u32, Backend> = self.map_ref(map_names::BACKENDS)?;
            programmed_services(&services, &backends)?
        };
        self.service_addresses.clear();
        for frontend in programmed.frontends.keys() {
            *self
                .service_addresses
                .entry(addr16(frontend.addr.ip()))
                .or_default() += 1;
        }
        Ok(programmed)
    }
}

impl Datapath {
    /// Sets the name of a service or backend id in `DP_NAMES`.
    pub fn set_name(&mut self, kind: u32, id: u32, name: &str) -> Result<()> {
        let mut map: HashMap<&mut MapData, common::names::NameKey, common::names::NameValue> =
            self.map_mut(map_names::NAMES)?;
        map.insert(
            common::names::NameKey { kind, id },
            common::names::NameValue::new(name),
            0,
        )
        .map_err(map_err(map_names::NAMES))
    }

    pub fn remove_name(&mut self, kind: u32, id: u32) -> Result<()> {
        let mut map: HashMap<&mut MapData, common::names::NameKey, common::names::NameValue> =
            self.map_mut(map_names::NAMES)?;
        match map.remove(&common::names::NameKey { kind, id }) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(map_names::NAMES)(e)),
        }
    }
}
