//! Makes the datapath maps match a `DesiredState`, incrementally: only the
//! frontends and backends that changed are written, in the order that never
//! shows a packet a half-written service (`kernel/maps.rs`): new backends
//! first, then frontends, then removed frontends, then unused backends.
//!
//! Backends are identified by (address, port, protocol) and get ids in turn
//! (`RollingIds`: an id freed is not given again until the id space wraps,
//! because conntrack names a flow's backend by id); frontends (service
//! ports at one address) get the lowest free service id. Processing is in
//! sorted order, so the same input and history give the same ids.
//!
//! `apply` compares the whole desired state; `apply_changes` only the
//! frontends the caller names (`incremental::Changes`), with what couples
//! frontends kept in indexes (the frontends using each backend, the ids in
//! use), so a change costs what changed. Both give the same writes.
//!
//! Conntrack is left alone when a backend goes: the datapath moves UDP flows
//! and resets TCP flows of a removed backend on their next packet, which
//! deleting their entries here would prevent.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use super::rules::{
    protocol_name, DesiredState, EndpointInfo, FrontendKey, FrontendKind, FrontendSpec,
};
use crate::error::Result;

/// What was written in one `apply`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub frontends_written: usize,
    pub frontends_removed: usize,
    pub backends_written: usize,
    pub backends_removed: usize,
    /// Objects that could not be programmed (a full map, most likely), with
    /// the error; everything else was.
    pub not_programmed: Vec<(String, String)>,
}

impl SyncStats {
    pub fn is_empty(&self) -> bool {
        *self == SyncStats::default()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Applied {
    service_id: u32,
    slots: BackendSlots,
    /// `None` for a frontend adopted from the maps (written by an earlier
    /// agent): it is rewritten, in place and with its ids, on the first sync.
    /// Shared with the desired state it was written from.
    spec: Option<Arc<FrontendSpec>>,
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
        Frontend {
            addr,
            protocol: common::proto::IPPROTO_TCP,
        }
    }
    pub fn udp(addr: SocketAddr) -> Self {
        Frontend {
            addr,
            protocol: common::proto::IPPROTO_UDP,
        }
    }
}

/// The backends of one frontend, by id (`DP_BACKENDS` keys), and the
/// policies the datapath applies to its new flows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendSlots {
    /// Ready backends: new flows go to these.
    pub ready: Vec<u32>,
    /// Serving but terminating: new flows only when `ready` is empty.
    pub terminating: Vec<u32>,
    /// A Local traffic policy: with no backend, drop instead of reject.
    pub local_only: bool,
    /// A NodePort, externalIP or LoadBalancer frontend (not a ClusterIP).
    pub external: bool,
    /// eTP=Local: the cluster-wide (ready, terminating) backends, for
    /// traffic from pods and from the node itself.
    pub internal: Option<(Vec<u32>, Vec<u32>)>,
    /// `sessionAffinity: ClientIP` timeout, seconds.
    pub affinity_seconds: Option<u32>,
    /// `loadBalancerSourceRanges`; empty: every source.
    pub source_ranges: Vec<(IpAddr, u8)>,
}

/// What the service maps hold, read back (for adoption and inspection).
#[derive(Clone, Debug, Default)]
pub struct ProgrammedServices {
    /// Frontend -> (service id, slots as programmed).
    pub frontends: BTreeMap<Frontend, (u32, BackendSlots)>,
    /// Backend id -> (address, protocol, terminating).
    pub backends: BTreeMap<u32, (SocketAddr, u8, bool)>,
}

/// The datapath's service and name maps, as the writer programs them.
/// `Datapath` implements it on the real maps (`kernel::maps`); the unit
/// tests below implement it in memory, so kube-proxy's rules can be checked
/// through the writer without root.
pub trait ServiceMaps {
    /// Adds or replaces a backend.
    fn set_backend(
        &mut self,
        id: u32,
        addr: SocketAddr,
        protocol: u8,
        terminating: bool,
    ) -> Result<()>;
    /// Removes a backend (absent is fine).
    fn remove_backend(&mut self, id: u32) -> Result<()>;
    /// Adds or updates a frontend with its backend slots.
    fn set_service(
        &mut self,
        frontend: &Frontend,
        service_id: u32,
        slots: &BackendSlots,
    ) -> Result<()>;
    /// Removes a frontend (absent is fine).
    fn remove_service(&mut self, frontend: &Frontend) -> Result<()>;
    /// Names an id for traces and dumps.
    fn set_name(&mut self, kind: u32, id: u32, name: &str) -> Result<()>;
    /// Forgets the name of an id.
    fn remove_name(&mut self, kind: u32, id: u32) -> Result<()>;
    /// What the maps hold now (for adoption).
    fn read_services(&mut self) -> Result<ProgrammedServices>;
}

type BackendKey = (SocketAddr, u8);

/// How much an endpoint tells of its backend (pod, node): the backend is
/// named after the first frontend (in key order) whose endpoint tells most.
type Known = (bool, bool);

fn known(e: &EndpointInfo) -> Known {
    (e.pod.is_some(), e.node.is_some())
}

/// The frontends that use one backend, ordered so that the first names it,
/// and how many of them still send it new flows: a change updates both
/// without a walk over all users (dp-bench's ten pods back every service).
#[derive(Debug, Default)]
struct BackendUsers {
    /// (what the frontend's endpoint tells, most first; frontend), sorted.
    by_name: Vec<(std::cmp::Reverse<Known>, FrontendKey)>,
    /// Users with a reference that is not terminating.
    serving: usize,
}

impl BackendUsers {
    fn add(&mut self, frontend: FrontendKey, r: &Reference) {
        let entry = (std::cmp::Reverse(known(r.endpoint)), frontend);
        if let Err(i) = self.by_name.binary_search(&entry) {
            self.by_name.insert(i, entry);
        }
        self.serving += usize::from(!r.terminating);
    }

    fn remove(&mut self, frontend: FrontendKey, r: &Reference) {
        let entry = (std::cmp::Reverse(known(r.endpoint)), frontend);
        if let Ok(i) = self.by_name.binary_search(&entry) {
            self.by_name.remove(i);
        }
        self.serving -= usize::from(!r.terminating);
    }

    fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Terminating: no user sends it new flows.
    fn terminating(&self) -> bool {
        self.serving == 0
    }
}

/// How many of `addrs` are (IPv4, IPv6).
fn split_by_family(addrs: impl Iterator<Item = SocketAddr>) -> (usize, usize) {
    addrs.fold((0, 0), |(v4, v6), a| {
        if a.is_ipv4() {
            (v4 + 1, v6)
        } else {
            (v4, v6 + 1)
        }
    })
}

/// The agent's record of what it programmed.
#[derive(Debug, Default)]
pub struct MapWriter {
    frontends: BTreeMap<FrontendKey, Applied>,
    /// (address, protocol) -> (id, terminating).
    backends: BTreeMap<BackendKey, (u32, bool)>,
    /// What `DP_NAMES` holds: (kind, id) -> name.
    names: BTreeMap<(u32, u32), String>,
    /// The frontends of the last desired state that use each backend, in
    /// key order, with whether all their references are terminating.
    users: BTreeMap<BackendKey, BackendUsers>,
    /// Backend ids in use, and the last one handed out.
    backend_ids: RollingIds,
    /// Service ids in use (the lowest free one is the next).
    service_ids: Ids,
    /// The maps hold exactly the last desired state (an apply completed
    /// with nothing left out): only then can a change be applied alone.
    in_step: bool,
    /// Names to write after `apply_changes` ((kind, id) -> name, `None`:
    /// remove); `None` after `apply`: every name is compared.
    names_pending: Option<BTreeMap<(u32, u32), Option<String>>>,
}

impl MapWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts from what the maps already hold (pinned maps left by an
    /// earlier agent): the same backend and service ids are kept, so the
    /// conntrack entries that refer to them stay right.
    pub fn adopt(dp: &mut (impl ServiceMaps + ?Sized)) -> Result<Self> {
        let programmed = dp.read_services()?;
        let mut writer = MapWriter::new();
        for (id, (addr, protocol, terminating)) in programmed.backends {
            writer.backends.insert((addr, protocol), (id, terminating));
        }
        for (frontend, (service_id, slots)) in programmed.frontends {
            let key = FrontendKey {
                addr: frontend.addr,
                protocol: frontend.protocol,
            };
            writer.frontends.insert(
                key,
                Applied {
                    service_id,
                    slots,
                    spec: None,
                },
            );
        }
        writer.backend_ids = RollingIds::used(writer.backends.values().map(|(id, _)| *id), 0);
        Ok(writer)
    }

    /// The backend id handed out last (or the highest in use).
    pub fn last_backend_id(&self) -> u32 {
        self.backend_ids.last
    }

    /// New backends get ids after `id` (and after those in use): ids that
    /// flows in conntrack, or an earlier writer, may still name are not
    /// given to another backend.
    pub fn give_backend_ids_after(&mut self, id: u32) {
        self.backend_ids.last = self.backend_ids.last.max(id);
    }

    /// Service id -> `namespace/name:port (kind)`, for dumps and traces.
    pub fn service_names(&self) -> BTreeMap<u32, String> {
        self.frontends
            .values()
            .filter_map(|a| {
                let spec = a.spec.as_ref()?;
                let label = crate::translate::labels::service_label(
                    &spec.service.to_string(),
                    &spec.kind.to_string(),
                );
                Some((a.service_id, label))
            })
            .collect()
    }

    /// Keeps `DP_NAMES` in step: service ids -> `ns/name:port (Kind)`,
    /// backend ids -> `ns/pod on node`, `on node` or `ns/pod` (what is
    /// known of them beyond their address).
    pub fn write_names(&mut self, dp: &mut (impl ServiceMaps + ?Sized)) -> Result<()> {
        use common::names::{NAME_KIND_BACKEND, NAME_KIND_SERVICE};
        if let Some(pending) = self.names_pending.take() {
            // Only the ids `apply_changes` touched.
            self.names_pending = Some(BTreeMap::new());
            for (key, name) in pending {
                match name {
                    Some(name) if self.names.get(&key) != Some(&name) => {
                        dp.set_name(key.0, key.1, &name)?;
                        self.names.insert(key, name);
                    }
                    None if self.names.contains_key(&key) => {
                        dp.remove_name(key.0, key.1)?;
                        self.names.remove(&key);
                    }
                    _ => {}
                }
            }
            return Ok(());
        }
        let mut wanted: BTreeMap<(u32, u32), String> = self
            .service_names()
            .into_iter()
            .map(|(id, n)| ((NAME_KIND_SERVICE, id), n))
            .collect();
        for (id, ep) in self.backend_endpoints() {
            // What is known beyond the address: the pod and its node.
            let Some(name) =
                crate::translate::labels::backend_label(ep.pod.as_deref(), ep.node.as_deref())
            else {
                continue;
            };
            wanted.insert((NAME_KIND_BACKEND, id), name);
        }
        for (key, name) in &wanted {
            if self.names.get(key) != Some(name) {
                dp.set_name(key.0, key.1, name)?;
            }
        }
        for key in self.names.keys() {
            if !wanted.contains_key(key) {
                dp.remove_name(key.0, key.1)?;
            }
        }
        self.names = wanted;
        self.names_pending = Some(BTreeMap::new());
        Ok(())
    }

    /// Backend id -> node name, where known.
    pub fn backend_nodes(&self) -> BTreeMap<u32, String> {
        self.backend_endpoints()
            .into_iter()
            .filter_map(|(id, ep)| Some((id, ep.node.as_deref()?.to_string())))
            .collect()
    }

    /// Backend id -> the endpoint it was programmed for (as translated).
    fn backend_endpoints(&self) -> BTreeMap<u32, &EndpointInfo> {
        let mut out: BTreeMap<u32, &EndpointInfo> = BTreeMap::new();
        for (key, a) in &self.frontends {
            let Some(spec) = &a.spec else { continue };
            for (ep, _) in backends_of(spec) {
                if let Some((id, _)) = self.backends.get(&(ep.addr, key.protocol)) {
                    // One backend may be in several slices; the one that
                    // names the pod wins.
                    let known = |e: &EndpointInfo| (e.pod.is_some(), e.node.is_some());
                    match out.get(id) {
                        Some(prev) if known(prev) >= known(ep) => {}
                        _ => {
                            out.insert(*id, ep);
                        }
                    }
                }
            }
        }
        out
    }

    pub fn frontend_count(&self) -> usize {
        self.frontends.len()
    }

    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// (IPv4, IPv6) frontends programmed.
    pub fn frontends_by_family(&self) -> (usize, usize) {
        split_by_family(self.frontends.keys().map(|k| k.addr))
    }

    /// (IPv4, IPv6) backends programmed.
    pub fn backends_by_family(&self) -> (usize, usize) {
        split_by_family(self.backends.keys().map(|k| k.0))
    }

    pub fn apply(
        &mut self,
        dp: &mut (impl ServiceMaps + ?Sized),
        desired: &DesiredState,
    ) -> Result<SyncStats> {
        let mut stats = SyncStats::default();
        self.in_step = false;
        self.names_pending = None;
        // 1. Backends the desired state needs, with their terminating flag
        // (terminating only if every reference is).
        self.users.clear();
        for (key, spec) in &desired.frontends {
            for (backend, r) in references(key.protocol, spec) {
                let users = self.users.entry(backend).or_default();
                users
                    .by_name
                    .push((std::cmp::Reverse(known(r.endpoint)), *key));
                users.serving += usize::from(!r.terminating);
            }
        }
        for users in self.users.values_mut() {
            users.by_name.sort_unstable();
        }
        let wanted: BTreeMap<BackendKey, bool> = self
            .users
            .iter()
            .map(|(b, users)| (*b, users.terminating()))
            .collect();
        let mut used_ids = RollingIds::used(
            self.backends.values().map(|(id, _)| *id),
            self.backend_ids.last,
        );
        for (backend, terminating) in &wanted {
            let (id, changed) = match self.backends.get(backend) {
                Some((id, t)) => (*id, t != terminating),
                None => (used_ids.take(), true),
            };
            if changed {
                if let Err(e) = dp.set_backend(id, backend.0, backend.1, *terminating) {
                    used_ids.release(id);
                    let what = format!("backend {}/{}", backend.0, protocol_name(backend.1));
                    stats.not_programmed.push((what, e.to_string()));
                    continue;
                }
                self.backends.insert(*backend, (id, *terminating));
                stats.backends_written += 1;
            }
        }
        // 2. Frontends, new or changed.
        let mut used_services = Ids::used(self.frontends.values().map(|a| a.service_id));
        for (key, spec) in &desired.frontends {
            // Unchanged spec, every endpoint in a slot: nothing to write. (A
            // backend keeps its id while referenced, so the slots match.)
            if let Some(a) = self.frontends.get(key) {
                let e = &spec.endpoints;
                let complete = a.slots.ready.len() == e.ready.len()
                    && a.slots.terminating.len() == e.terminating.len()
                    && a.slots.internal.as_ref().map(|i| (i.0.len(), i.1.len()))
                        == spec
                            .internal
                            .as_ref()
                            .map(|i| (i.ready.len(), i.terminating.len()));
                if complete && a.spec.as_ref() == Some(spec) {
                    continue;
                }
            }
            self.write_frontend(dp, key, spec, &mut used_services, &mut stats);
        }
        // 3. Frontends that are gone.
        let gone: Vec<FrontendKey> = self
            .frontends
            .keys()
            .filter(|k| !desired.frontends.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            dp.remove_service(&frontend(&key))?;
            self.frontends.remove(&key);
            stats.frontends_removed += 1;
        }
        // 4. Backends nothing uses any more.
        let unused: Vec<(SocketAddr, u8)> = self
            .backends
            .keys()
            .filter(|b| !wanted.contains_key(b))
            .copied()
            .collect();
        for backend in unused {
            if let Some((id, _)) = self.backends.remove(&backend) {
                dp.remove_backend(id)?;
                stats.backends_removed += 1;
            }
        }
        self.backend_ids =
            RollingIds::used(self.backends.values().map(|(id, _)| *id), used_ids.last);
        self.service_ids = Ids::used(self.frontends.values().map(|a| a.service_id));
        self.in_step = stats.not_programmed.is_empty();
        Ok(stats)
    }

    /// Writes frontend `key`'s slots unless the maps already hold this spec
    /// with these slots. A new frontend takes its id from `ids`, and gives
    /// it back if the write fails (then noted as not programmed).
    fn write_frontend(
        &mut self,
        dp: &mut (impl ServiceMaps + ?Sized),
        key: &FrontendKey,
        spec: &Arc<FrontendSpec>,
        ids: &mut Ids,
        stats: &mut SyncStats,
    ) {
        let slots = self.slots_of(key.protocol, spec);
        let service_id = match self.frontends.get(key) {
            Some(a) if a.slots == slots && a.spec.as_ref() == Some(spec) => return,
            Some(a) => a.service_id,
            None => ids.take_lowest(),
        };
        if let Err(e) = dp.set_service(&frontend(key), service_id, &slots) {
            if !self.frontends.contains_key(key) {
                ids.release(service_id);
            }
            let what = format!("frontend {key} ({})", spec.service);
            stats.not_programmed.push((what, e.to_string()));
            return;
        }
        self.frontends.insert(
            *key,
            Applied {
                service_id,
                slots,
                spec: Some(spec.clone()),
            },
        );
        stats.frontends_written += 1;
    }

    /// What `apply` writes, when `desired` differs from the state last
    /// applied only in the frontends `changed` names; the cost is that of
    /// the change. When the maps may not hold the last state (adopted, or
    /// something did not fit), `apply` compares everything instead.
    pub fn apply_changes(
        &mut self,
        dp: &mut (impl ServiceMaps + ?Sized),
        desired: &DesiredState,
        changed: &BTreeSet<FrontendKey>,
    ) -> Result<SyncStats> {
        use common::names::{NAME_KIND_BACKEND, NAME_KIND_SERVICE};
        if !self.in_step {
            return self.apply(dp, desired);
        }
        self.in_step = false;
        let mut stats = SyncStats::default();
        // The backends the changed frontends used and use, with their users.
        // The backends whose use by a changed frontend changed (added,
        // removed, terminating or named otherwise), with their ids before.
        // A backend the frontend uses as before is not looked at: a
        // backend many services share costs nothing when one of them
        // changes elsewhere.
        let mut touched: BTreeMap<BackendKey, Option<u32>> = BTreeMap::new();
        let mut old_service_ids = Vec::new();
        for key in changed {
            let old = match self.frontends.get(key) {
                Some(applied) => {
                    old_service_ids.push(applied.service_id);
                    let spec = applied
                        .spec
                        .as_ref()
                        .expect("in step: every frontend has its spec");
                    references(key.protocol, spec)
                }
                None => BTreeMap::new(),
            };
            let new = desired
                .frontends
                .get(key)
                .map(|spec| references(key.protocol, spec))
                .unwrap_or_default();
            let both: BTreeSet<&BackendKey> = old.keys().chain(new.keys()).collect();
            for backend in both {
                let now = new.get(backend);
                if old.get(backend) == now {
                    continue;
                }
                let id_before = self.backends.get(backend).map(|(id, _)| *id);
                touched.entry(*backend).or_insert(id_before);
                let users = self.users.entry(*backend).or_default();
                if let Some(before) = old.get(backend) {
                    users.remove(*key, before);
                }
                if let Some(now) = now {
                    users.add(*key, now);
                }
            }
        }
        // 1. Backends now used, new or with a changed terminating flag.
        for backend in touched.keys() {
            let Some(users) = self.users.get(backend).filter(|u| !u.is_empty()) else {
                continue;
            };
            let terminating = users.terminating();
            let (id, write) = match self.backends.get(backend) {
                Some((id, t)) => (*id, *t != terminating),
                None => (self.backend_ids.take(), true),
            };
            if write {
                if let Err(e) = dp.set_backend(id, backend.0, backend.1, terminating) {
                    self.backend_ids.release(id);
                    let what = format!("backend {}/{}", backend.0, protocol_name(backend.1));
                    stats.not_programmed.push((what, e.to_string()));
                    continue;
                }
                self.backends.insert(*backend, (id, terminating));
                stats.backends_written += 1;
            }
        }
        // 2. Changed frontends that are still wanted.
        for key in changed {
            let Some(spec) = desired.frontends.get(key) else {
                continue;
            };
            // Taken out for the call: the writer lends its own id set.
            let mut ids = std::mem::take(&mut self.service_ids);
            self.write_frontend(dp, key, spec, &mut ids, &mut stats);
            self.service_ids = ids;
        }
        // 3. Changed frontends that are gone.
        for key in changed {
            if desired.frontends.contains_key(key) {
                continue;
            }
            if let Some(applied) = self.frontends.remove(key) {
                dp.remove_service(&frontend(key))?;
                self.service_ids.release(applied.service_id);
                stats.frontends_removed += 1;
            }
        }
        // 4. Backends nothing uses any more.
        for backend in touched.keys() {
            if self.users.get(backend).is_some_and(|u| !u.is_empty()) {
                continue;
            }
            self.users.remove(backend);
            if let Some((id, _)) = self.backends.remove(backend) {
                dp.remove_backend(id)?;
                self.backend_ids.release(id);
                stats.backends_removed += 1;
            }
        }
        // The names of the ids involved: the old ones go unless reused.
        if let Some(pending) = &mut self.names_pending {
            for id in old_service_ids {
                pending.insert((NAME_KIND_SERVICE, id), None);
            }
            for id in touched.values().flatten() {
                pending.insert((NAME_KIND_BACKEND, *id), None);
            }
        }
        let mut names = Vec::new();
        for key in changed {
            if let Some(a) = self.frontends.get(key) {
                if let Some(spec) = &a.spec {
                    let label = crate::translate::labels::service_label(
                        &spec.service.to_string(),
                        &spec.kind.to_string(),
                    );
                    names.push(((NAME_KIND_SERVICE, a.service_id), Some(label)));
                }
            }
        }
        for backend in touched.keys() {
            if let Some((id, _)) = self.backends.get(backend) {
                names.push(((NAME_KIND_BACKEND, *id), self.backend_name(backend)));
            }
        }
        if let Some(pending) = &mut self.names_pending {
            pending.extend(names);
        }
        self.in_step = stats.not_programmed.is_empty();
        Ok(stats)
    }

    /// What `DP_NAMES` says of one backend: as `write_names` finds it, from
    /// the endpoint of the first frontend (in key order) that knows most.
    fn backend_name(&self, backend: &BackendKey) -> Option<String> {
        let (_, key) = self.users.get(backend)?.by_name.first()?;
        let spec = self.frontends.get(key)?.spec.as_ref()?;
        let refs = references(key.protocol, spec);
        let ep = refs.get(backend)?.endpoint;
        crate::translate::labels::backend_label(ep.pod.as_deref(), ep.node.as_deref())
    }

    fn slots_of(&self, protocol: u8, spec: &FrontendSpec) -> BackendSlots {
        let ids = |eps: &[EndpointInfo]| -> Vec<u32> {
            eps.iter()
                .filter_map(|e| self.backends.get(&(e.addr, protocol)).map(|(id, _)| *id))
                .collect()
        };
        BackendSlots {
            ready: ids(&spec.endpoints.ready),
            terminating: ids(&spec.endpoints.terminating),
            local_only: spec.local_only,
            external: spec.kind != FrontendKind::ClusterIp,
            internal: spec
                .internal
                .as_ref()
                .map(|i| (ids(&i.ready), ids(&i.terminating))),
            affinity_seconds: spec.affinity_seconds,
            source_ranges: spec.source_ranges.iter().map(|c| (c.addr, c.len)).collect(),
        }
    }
}

/// How a frontend uses one backend.
#[derive(Debug, PartialEq, Eq)]
struct Reference<'a> {
    /// Every reference to it is terminating.
    terminating: bool,
    /// Its first endpoint that knows most of it (pod, node): what the
    /// frontend tells `DP_NAMES` about the backend.
    endpoint: &'a EndpointInfo,
}

/// The backends a frontend refers to.
fn references(protocol: u8, spec: &FrontendSpec) -> BTreeMap<BackendKey, Reference<'_>> {
    let mut out: BTreeMap<BackendKey, Reference> = BTreeMap::new();
    for (ep, terminating) in backends_of(spec) {
        let r = out.entry((ep.addr, protocol)).or_insert(Reference {
            terminating,
            endpoint: ep,
        });
        r.terminating &= terminating;
        if known(ep) > known(r.endpoint) {
            r.endpoint = ep;
        }
    }
    out
}

/// Every endpoint a frontend refers to, with whether it is terminating.
fn backends_of(spec: &FrontendSpec) -> impl Iterator<Item = (&EndpointInfo, bool)> {
    let e = &spec.endpoints;
    let internal = spec.internal.iter().flat_map(|i| {
        i.ready
            .iter()
            .map(|ep| (ep, false))
            .chain(i.terminating.iter().map(|ep| (ep, true)))
    });
    e.ready
        .iter()
        .map(|ep| (ep, false))
        .chain(e.terminating.iter().map(|ep| (ep, true)))
        .chain(spec.draining.iter().map(|ep| (ep, true)))
        .chain(internal)
}

fn frontend(key: &FrontendKey) -> Frontend {
    Frontend {
        addr: key.addr,
        protocol: key.protocol,
    }
}

/// Backend ids handed out in turn: the one after the last handed out that
/// is free, wrapping past `u32::MAX` to 1 (0 is no backend). A conntrack
/// entry names its flow's backend by id; were a freed id given at once to
/// another backend, the flows of the removed one would go on to the new one
/// (and its replies, which no entry expects, back untranslated) instead of
/// being moved (UDP) or reset (TCP). Cilium's backend ids roll the same way.
#[derive(Debug, Default)]
struct RollingIds {
    used: BTreeSet<u32>,
    /// The id handed out last (or the highest in use, if higher).
    last: u32,
}

impl RollingIds {
    fn used(ids: impl Iterator<Item = u32>, last: u32) -> Self {
        let used: BTreeSet<u32> = ids.collect();
        let last = used.last().copied().unwrap_or(0).max(last);
        RollingIds { used, last }
    }

    fn take(&mut self) -> u32 {
        let mut id = self.last;
        loop {
            id = if id == u32::MAX { 1 } else { id + 1 };
            // Ends: a map holds far fewer than 2^32 backends.
            if self.used.insert(id) {
                self.last = id;
                return id;
            }
        }
    }

    fn release(&mut self, id: u32) {
        self.used.remove(&id);
    }
}

/// Ids in use, 1 and up; the next one given is the lowest free. The holes
/// below the highest are kept, so that is found without a scan (a scan per
/// id made the first sync quadratic, and a change cost a walk to the hole
/// the last one left).
#[derive(Debug, Default)]
struct Ids {
    /// Every id below this one is used or in `holes`.
    next: u32,
    holes: BTreeSet<u32>,
}

impl Ids {
    fn used(ids: impl Iterator<Item = u32>) -> Self {
        let used: BTreeSet<u32> = ids.collect();
        let next = used.last().map_or(1, |last| last + 1);
        let holes = (1..next).filter(|id| !used.contains(id)).collect();
        Ids { next, holes }
    }

    fn take_lowest(&mut self) -> u32 {
        if let Some(id) = self.holes.pop_first() {
            return id;
        }
        let id = self.next.max(1);
        self.next = id + 1;
        id
    }

    fn release(&mut self, id: u32) {
        if id == 0 || id >= self.next || self.holes.contains(&id) {
            return;
        }
        if id + 1 == self.next {
            self.next = id;
            // The holes just below are now above the highest id in use.
            while self.next > 1 && self.holes.remove(&(self.next - 1)) {
                self.next -= 1;
            }
        } else {
            self.holes.insert(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Ids, RollingIds};
    use std::collections::BTreeSet;

    #[test]
    fn a_freed_backend_id_is_not_given_again_until_the_ids_wrap() {
        let mut ids = RollingIds::used([1, 2, 3].into_iter(), 0);
        ids.release(2);
        // Not the hole 2: the next after the last handed out.
        assert_eq!(ids.take(), 4);
        ids.release(4);
        assert_eq!(ids.take(), 5);
        // An agent after a restart: past the ids conntrack still names.
        let mut after_restart = RollingIds::used([1, 3, 5].into_iter(), 9);
        assert_eq!(after_restart.take(), 10);
        // At the end of the space: round to 1, past the ids in use.
        let mut wrapping = RollingIds::used([1, 2, u32::MAX - 1].into_iter(), 0);
        assert_eq!(wrapping.take(), u32::MAX);
        assert_eq!(wrapping.take(), 3);
    }

    #[test]
    fn ids_are_the_lowest_free_ones() {
        let mut ids = Ids::used([1, 2, 5].into_iter());
        let mut used: BTreeSet<u32> = [1, 2, 5].into();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..5000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x.is_multiple_of(3) && !used.is_empty() {
                let id = *used.iter().nth((x / 3) as usize % used.len()).unwrap();
                used.remove(&id);
                ids.release(id);
            } else {
                let lowest = (1..).find(|id| !used.contains(id)).unwrap();
                assert_eq!(ids.take_lowest(), lowest);
                used.insert(lowest);
            }
        }
    }
}
