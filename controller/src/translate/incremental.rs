//! The translation kept current object by object: a change to one Service
//! or EndpointSlice re-translates that Service only (kube-proxy's rules,
//! `rules::service_frontends`) and reports the frontends whose spec
//! changed, so the map writer (`sync::MapWriter::apply_changes`) touches
//! only those. The cost of a change is proportional to what changed, not to
//! the number of services.
//!
//! The result is what `translate` gives for the same objects (the unit tests
//! check it over sequences of changes), with slices merged in name order.
//! What couples services is kept in indexes: the slices of each Service, and
//! for each frontend address the services that claim it (the first, in
//! namespace/name order, wins; the others are skipped, as in `translate`).
//! A change of the node (its addresses, zone, name) re-translates every
//! Service, as it should: NodePorts and topology depend on it.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::rules::{
    service_frontends, skip, slice_owner, CompactSlice, DesiredState, FrontendKey, FrontendSpec,
    NodeInfo, Skipped, TranslateOptions,
};

/// A Service or EndpointSlice by namespace and name. `copy` tells apart
/// objects of the same name (possible in manifest files, never from the
/// API): the n-th one read.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
    pub copy: u32,
}

impl ObjectKey {
    fn of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, copy: u32) -> Self {
        ObjectKey {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            copy,
        }
    }
}

/// One Service and what it translated to. The objects are shared with the
/// source that gave them (the manifest cache): one copy in the agent.
#[derive(Debug)]
struct ServiceEntry {
    service: Arc<Service>,
    /// Its frontends in claim order (an address may repeat: the first wins).
    frontends: Vec<(FrontendKey, Arc<FrontendSpec>)>,
    skipped: Vec<Skipped>,
}

#[derive(Debug)]
struct SliceEntry {
    slice: Arc<CompactSlice>,
    /// The Service (namespace, name) it belongs to, or why it is not served.
    owner: Result<(String, String), Skipped>,
}

/// What changed since the last `take_changes`.
#[derive(Debug, Default)]
pub struct Changes {
    /// Frontends added, removed or with a different spec.
    pub frontends: BTreeSet<FrontendKey>,
    /// Skips of the objects translated again (to log them once, when the
    /// object changes, not on every sync).
    pub skipped: Vec<Skipped>,
    /// EndpointSlices added, changed or removed (the trigger times of those
    /// there are measured; a removed one's is forgotten).
    pub slices: Vec<ObjectKey>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty() && self.skipped.is_empty() && self.slices.is_empty()
    }
}

/// Objects, their translation, and the indexes that keep it current.
#[derive(Debug, Default)]
pub struct IncrementalTranslation {
    node: NodeInfo,
    options: TranslateOptions,
    services: BTreeMap<ObjectKey, ServiceEntry>,
    slices: BTreeMap<ObjectKey, SliceEntry>,
    /// Service (namespace, name) -> its slices.
    slices_of: BTreeMap<(String, String), SmallSet<ObjectKey>>,
    /// Frontend -> the (service, index in its frontends) claiming it, in
    /// order: the first is served.
    claims: BTreeMap<FrontendKey, SmallSet<(ObjectKey, usize)>>,
    /// The served frontends (no `skipped`: see `skipped()`).
    desired: DesiredState,
    changes: Changes,
    /// Skips counted: (invalid, not served).
    skip_counts: (usize, usize),
}

impl IncrementalTranslation {
    pub fn new(node: NodeInfo, options: TranslateOptions) -> Self {
        IncrementalTranslation {
            node,
            options,
            ..Default::default()
        }
    }

    /// The frontends to serve; `skipped` is left empty (it would cost a walk
    /// over every object: `skipped()` and `skip_counts()` give it).
    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    /// Everything, as `translate` returns it (for tests and tools; walks
    /// every object).
    pub fn state(&self) -> DesiredState {
        DesiredState {
            frontends: self.desired.frontends.clone(),
            skipped: self.skipped(),
        }
    }

    /// The slice at `key` without its endpoints (metadata, address type,
    /// ports).
    pub fn slice(&self, key: &ObjectKey) -> Option<&EndpointSlice> {
        self.slices.get(key).map(|e| &e.slice.object)
    }

    /// (invalid, not served) among all skips, kept current.
    pub fn skip_counts(&self) -> (usize, usize) {
        self.skip_counts
    }

    /// Every skip, sorted (walks every object).
    pub fn skipped(&self) -> Vec<Skipped> {
        let mut out: Vec<Skipped> = self
            .slices
            .values()
            .filter_map(|e| e.owner.as_ref().err().cloned())
            .collect();
        for entry in self.services.values() {
            out.extend(entry.skipped.iter().cloned());
        }
        for (key, claims) in &self.claims {
            out.extend(self.conflicts(key, claims));
        }
        out.sort();
        out
    }

    /// What changed since the last call.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// A new node description: every Service is translated again (only
    /// frontends whose spec changes are reported).
    pub fn set_node(&mut self, node: NodeInfo) {
        if node.name == self.node.name && node.ips == self.node.ips && node.zone == self.node.zone {
            return;
        }
        self.node = node;
        let all: Vec<ObjectKey> = self.services.keys().cloned().collect();
        for key in all {
            self.retranslate(&key);
        }
    }

    /// A Service added or changed (from a watch).
    pub fn upsert_service(&mut self, service: Service) {
        let key = ObjectKey::of(&service.metadata, 0);
        self.put_service(key, Arc::new(service));
    }

    /// A Service deleted.
    pub fn remove_service(&mut self, namespace: &str, name: &str) {
        let key = ObjectKey {
            namespace: namespace.to_string(),
            name: name.to_string(),
            copy: 0,
        };
        self.drop_service(&key);
    }

    /// An EndpointSlice added or changed (from a watch).
    pub fn upsert_slice(&mut self, slice: EndpointSlice) {
        let key = ObjectKey::of(&slice.metadata, 0);
        self.put_slice(key, Arc::new(CompactSlice::from(slice)));
    }

    /// An EndpointSlice deleted.
    pub fn remove_slice(&mut self, namespace: &str, name: &str) {
        let key = ObjectKey {
            namespace: namespace.to_string(),
            name: name.to_string(),
            copy: 0,
        };
        self.drop_slice(&key);
    }

    /// The complete set of Services (a relist, or the manifest files read
    /// again): compared object by object, only the differences are applied.
    pub fn replace_services(&mut self, services: Vec<Service>) {
        self.replace_shared_services(services.into_iter().map(Arc::new));
    }

    /// `replace_services` with Services shared with the source.
    pub fn replace_shared_services(&mut self, services: impl IntoIterator<Item = Arc<Service>>) {
        let keyed = with_copies(services, |s| &s.metadata);
        let gone: Vec<ObjectKey> = self
            .services
            .keys()
            .filter(|k| !keyed.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            self.drop_service(&key);
        }
        for (key, service) in keyed {
            self.put_service(key, service);
        }
    }

    /// The complete set of EndpointSlices, as `replace_services`.
    pub fn replace_slices(&mut self, slices: Vec<EndpointSlice>) {
        self.replace_compact_slices(slices.into_iter().map(|s| Arc::new(CompactSlice::from(s))));
    }

    /// `replace_slices` with slices compacted (and shared) by the source.
    pub fn replace_compact_slices(&mut self, slices: impl IntoIterator<Item = Arc<CompactSlice>>) {
        let keyed = with_copies(slices, |s| &s.object.metadata);
        let gone: Vec<ObjectKey> = self
            .slices
            .keys()
            .filter(|k| !keyed.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            self.drop_slice(&key);
        }
        for (key, slice) in keyed {
            self.put_slice(key, slice);
        }
    }

    fn put_service(&mut self, key: ObjectKey, service: Arc<Service>) {
        if self
            .services
            .get(&key)
            .is_some_and(|e| Arc::ptr_eq(&e.service, &service) || e.service == service)
        {
            return;
        }
        let entry = ServiceEntry {
            service,
            frontends: Vec::new(),
            skipped: Vec::new(),
        };
        if let Some(old) = self.services.insert(key.clone(), entry) {
            self.forget_translation(&key, old);
        }
        self.translate_entry(&key);
    }

    fn drop_service(&mut self, key: &ObjectKey) {
        if let Some(old) = self.services.remove(key) {
            self.forget_translation(key, old);
        }
    }

    fn put_slice(&mut self, key: ObjectKey, slice: Arc<CompactSlice>) {
        if self
            .slices
            .get(&key)
            .is_some_and(|e| Arc::ptr_eq(&e.slice, &slice) || e.slice == slice)
        {
            return;
        }
        let owner = slice_owner(&slice.object);
        if let Err(s) = &owner {
            self.count_skips(std::slice::from_ref(s), 1);
            self.changes.skipped.push(s.clone());
        }
        if let Ok(owner) = &owner {
            self.slices_of
                .entry(owner.clone())
                .or_default()
                .insert(key.clone());
        }
        let new_owner = owner.as_ref().ok().cloned();
        let old = self.slices.insert(key.clone(), SliceEntry { slice, owner });
        let old_owner = old.and_then(|old| self.unindex_slice(&key, old));
        self.changes.slices.push(key);
        // The Services it belonged to and belongs to now.
        for owner in [old_owner, new_owner].into_iter().flatten() {
            self.retranslate_owner(&owner);
        }
    }

    fn drop_slice(&mut self, key: &ObjectKey) {
        if let Some(old) = self.slices.remove(key) {
            self.changes.slices.push(key.clone());
            if let Some(owner) = self.unindex_slice(key, old) {
                self.retranslate_owner(&owner);
            }
        }
    }

    /// Takes a replaced or removed slice out of the index; its owner.
    fn unindex_slice(&mut self, key: &ObjectKey, old: SliceEntry) -> Option<(String, String)> {
        match old.owner {
            Ok(owner) => {
                if let Some(set) = self.slices_of.get_mut(&owner) {
                    // The replacing slice may have the same owner: keep it.
                    if self.slices.get(key).and_then(|e| e.owner.as_ref().ok()) != Some(&owner) {
                        set.remove(key);
                    }
                    if set.is_empty() {
                        self.slices_of.remove(&owner);
                    }
                }
                Some(owner)
            }
            Err(s) => {
                self.count_skips(std::slice::from_ref(&s), -1);
                None
            }
        }
    }

    /// Translates again every Service of that namespace and name.
    fn retranslate_owner(&mut self, (namespace, name): &(String, String)) {
        let first = ObjectKey {
            namespace: namespace.clone(),
            name: name.clone(),
            copy: 0,
        };
        let keys: Vec<ObjectKey> = self
            .services
            .range(first..)
            .take_while(|(k, _)| k.namespace == *namespace && k.name == *name)
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            self.retranslate(&key);
        }
    }

    fn retranslate(&mut self, key: &ObjectKey) {
        let Some(entry) = self.services.get_mut(key) else {
            return;
        };
        let old = ServiceEntry {
            service: Arc::default(),
            frontends: std::mem::take(&mut entry.frontends),
            skipped: std::mem::take(&mut entry.skipped),
        };
        self.forget_translation(key, old);
        self.translate_entry(key);
    }

    /// Withdraws what a Service's old translation claimed and counted.
    fn forget_translation(&mut self, key: &ObjectKey, old: ServiceEntry) {
        self.count_skips(&old.skipped, -1);
        let mut touched = BTreeSet::new();
        for (i, (frontend, _)) in old.frontends.iter().enumerate() {
            let conflicts_before = self.conflict_count(frontend);
            if let Some(claims) = self.claims.get_mut(frontend) {
                claims.remove(&(key.clone(), i));
                if claims.is_empty() {
                    self.claims.remove(frontend);
                }
            }
            self.skip_counts.0 -= conflicts_before - self.conflict_count(frontend);
            touched.insert(*frontend);
        }
        // The old specs are still in `desired` for comparison: resolve
        // against the remaining claims now.
        for frontend in touched {
            self.resolve(&frontend);
        }
    }

    /// Translates the Service at `key` (its entry holds no translation) and
    /// claims its frontends.
    fn translate_entry(&mut self, key: &ObjectKey) {
        let Some(entry) = self.services.get(key) else {
            return;
        };
        let slices: Vec<&CompactSlice> = self
            .slices_of
            .get(&(key.namespace.clone(), key.name.clone()))
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k).map(|e| &*e.slice))
            .collect();
        let mut skipped = Vec::new();
        let frontends = service_frontends(
            &entry.service,
            &slices,
            &self.node,
            &self.options,
            &mut skipped,
        );
        self.count_skips(&skipped, 1);
        self.changes.skipped.extend(skipped.iter().cloned());
        let mut touched = BTreeSet::new();
        for (i, (frontend, _)) in frontends.iter().enumerate() {
            let conflicts_before = self.conflict_count(frontend);
            self.claims
                .entry(*frontend)
                .or_default()
                .insert((key.clone(), i));
            self.skip_counts.0 += self.conflict_count(frontend) - conflicts_before;
            touched.insert(*frontend);
        }
        let entry = self.services.get_mut(key).expect("looked up above");
        entry.frontends = frontends
            .into_iter()
            .map(|(key, spec)| (key, Arc::new(spec)))
            .collect();
        entry.skipped = skipped;
        for frontend in touched {
            self.resolve(&frontend);
        }
        // Skips of conflicts this Service lost, to log.
        let lost: Vec<Skipped> = self.services[key]
            .frontends
            .iter()
            .filter_map(|(f, _)| Some((f, self.claims.get(f)?)))
            .flat_map(|(f, claims)| self.conflicts(f, claims))
            .filter(|s| s.object == format!("Service {}/{}", key.namespace, key.name))
            .collect();
        self.changes.skipped.extend(lost);
    }

    /// Serves the first claim of `frontend` (or nothing), noting a change.
    fn resolve(&mut self, frontend: &FrontendKey) {
        let winner = self
            .claims
            .get(frontend)
            .and_then(|c| c.first())
            .and_then(|(k, i)| Some(self.services.get(k)?.frontends.get(*i)?.1.clone()));
        let current = self.desired.frontends.get(frontend);
        if current == winner.as_ref() {
            return;
        }
        match winner {
            Some(spec) => self.desired.frontends.insert(*frontend, spec),
            None => self.desired.frontends.remove(frontend),
        };
        self.changes.frontends.insert(*frontend);
    }

    /// Claims of `frontend` beyond the first (each is a skip).
    fn conflict_count(&self, frontend: &FrontendKey) -> usize {
        self.claims
            .get(frontend)
            .map_or(0, |c| c.len().saturating_sub(1))
    }

    /// The skips of the claims that lost `frontend`, as `translate` words
    /// them.
    fn conflicts<'a>(
        &'a self,
        frontend: &'a FrontendKey,
        claims: &'a SmallSet<(ObjectKey, usize)>,
    ) -> impl Iterator<Item = Skipped> + 'a {
        let spec_of = |(k, i): &(ObjectKey, usize)| -> Option<&Arc<FrontendSpec>> {
            Some(&self.services.get(k)?.frontends.get(*i)?.1)
        };
        let winner = claims.first().and_then(spec_of);
        claims.iter().skip(1).filter_map(move |(k, _)| {
            let winner = winner?;
            Some(skip(
                format!("Service {}/{}", k.namespace, k.name),
                format!("{frontend} is already {}", winner.service),
                true,
            ))
        })
    }

    fn count_skips(&mut self, skips: &[Skipped], sign: isize) {
        for s in skips {
            let count = if s.invalid {
                &mut self.skip_counts.0
            } else {
                &mut self.skip_counts.1
            };
            *count = count.checked_add_signed(sign).expect("skip counts in step");
        }
    }
}

/// An ordered set in one allocation of what it holds: most frontends have
/// one claim and most Services one slice, where a `BTreeSet` allocates a
/// node for eleven (at 10 000 Services, 13 MB of the translation).
#[derive(Debug)]
struct SmallSet<T>(Vec<T>);

impl<T> Default for SmallSet<T> {
    fn default() -> Self {
        SmallSet(Vec::new())
    }
}

impl<T: Ord> SmallSet<T> {
    fn insert(&mut self, value: T) {
        if let Err(i) = self.0.binary_search(&value) {
            // Exactly: `insert` alone would make room for four.
            self.0.reserve_exact(1);
            self.0.insert(i, value);
        }
    }

    fn remove(&mut self, value: &T) {
        if let Ok(i) = self.0.binary_search(value) {
            self.0.remove(i);
            if self.0.len() * 2 < self.0.capacity() {
                self.0.shrink_to_fit();
            }
        }
    }

    fn first(&self) -> Option<&T> {
        self.0.first()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }
}

impl<'a, T> IntoIterator for &'a SmallSet<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// Objects keyed by namespace/name, the n-th of a repeated name as copy n.
fn with_copies<T>(
    objects: impl IntoIterator<Item = T>,
    meta: impl Fn(&T) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> BTreeMap<ObjectKey, T> {
    let mut out = BTreeMap::new();
    let mut seen: BTreeMap<(String, String), u32> = BTreeMap::new();
    for object in objects {
        let first = ObjectKey::of(meta(&object), 0);
        let copy = seen
            .entry((first.namespace.clone(), first.name.clone()))
            .or_insert(0);
        let key = ObjectKey {
            copy: *copy,
            ..first
        };
        *copy += 1;
        out.insert(key, object);
    }
    out
}
