//! Kubernetes objects from a directory of ordinary manifests (`--manifests`):
//! `*.yaml`, `*.yml` and `*.json` files, multi-document, `kind: List`
//! accepted. Services, EndpointSlices and Nodes are read; other kinds are
//! ignored. A document that does not parse, or is larger than the API server
//! would accept, is skipped with a reason; the rest is kept.

use std::{
    fs,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    core::v1::Node,
    core::v1::Service,
    discovery::v1::{Endpoint, EndpointConditions, EndpointSlice},
};
use serde::Deserialize;

use crate::translate::Skipped;

/// Larger documents are refused (the API server's request limit is 3 MiB).
pub const MAX_DOCUMENT_BYTES: usize = 3 << 20;
/// EndpointSlice validation limits.
pub const MAX_SLICE_ENDPOINTS: usize = 1000;
pub const MAX_SLICE_PORTS: usize = 100;

#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub nodes: Vec<Node>,
    pub skipped: Vec<Skipped>,
}

/// Reads every manifest file in `dir` (not recursive), in name order.
pub fn load_dir(dir: &Path) -> std::io::Result<Objects> {
    let mut cache = ManifestCache::default();
    let loaded = cache.load_dir(dir)?;
    // Taken from the cache before it compacts them.
    let mut objects = Objects::default();
    std::mem::swap(&mut objects, &mut loaded.cache.objects);
    Ok(objects)
}

/// Adds the objects of one file's text to `objects`.
pub fn load_str(text: &str, origin: &str, objects: &mut Objects) {
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let here = format!("{origin} document {}", i + 1);
        match serde_norway::Value::deserialize(doc) {
            Ok(serde_norway::Value::Null) => {}
            Ok(value) => add(value, &here, objects),
            Err(e) => {
                // After a syntax error the parser cannot find the next
                // document (it would report the same error forever): the
                // rest of this file is skipped.
                objects
                    .skipped
                    .push(invalid(&here, format!("{e}; rest of the file skipped")));
                break;
            }
        }
    }
}

fn add(value: serde_norway::Value, here: &str, objects: &mut Objects) {
    let size = serde_norway::to_string(&value).map_or(0, |s| s.len());
    if size > MAX_DOCUMENT_BYTES {
        objects.skipped.push(invalid(
            here,
            format!("{size} bytes, over {MAX_DOCUMENT_BYTES}"),
        ));
        return;
    }
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
    match kind {
        "List" => {
            let items = value.get("items").and_then(|i| i.as_sequence()).cloned();
            for (j, item) in items.into_iter().flatten().enumerate() {
                add(item, &format!("{here} item {}", j + 1), objects);
            }
        }
        "Service" => match serde_norway::from_value::<Service>(value) {
            Ok(svc) => objects.services.push(svc),
            Err(e) => objects.skipped.push(invalid(here, format!("Service: {e}"))),
        },
        "EndpointSlice" => match serde_norway::from_value::<EndpointSlice>(value) {
            Ok(slice) if slice.endpoints.len() > MAX_SLICE_ENDPOINTS => {
                objects.skipped.push(invalid(
                    here,
                    format!(
                        "EndpointSlice with {} endpoints, over {MAX_SLICE_ENDPOINTS}",
                        slice.endpoints.len()
                    ),
                ))
            }
            Ok(slice) if slice.ports.as_ref().map_or(0, Vec::len) > MAX_SLICE_PORTS => {
                objects.skipped.push(invalid(
                    here,
                    format!("EndpointSlice with over {MAX_SLICE_PORTS} ports"),
                ))
            }
            Ok(slice) => objects.slices.push(slice),
            Err(e) => objects
                .skipped
                .push(invalid(here, format!("EndpointSlice: {e}"))),
        },
        "Node" => match serde_norway::from_value::<Node>(value) {
            Ok(node) => objects.nodes.push(node),
            Err(e) => objects.skipped.push(invalid(here, format!("Node: {e}"))),
        },
        // Deployments, Pods, ...: not ours to read.
        _ => {}
    }
}

fn invalid(object: &str, reason: String) -> Skipped {
    Skipped {
        object: object.to_string(),
        reason,
        invalid: true,
    }
}

/// What identifies a file's version: inode (an editor's save-by-rename
/// makes a new one), modification time and size.
type Stamp = (u64, std::time::SystemTime, u64);

/// Whether a directory entry is read as manifests: by its extension, so an
/// editor's temporary files are not.
pub fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// Parsed files, reused while a file's stamp is unchanged: a change to one
/// file re-parses that file only.
///
/// The objects are held once, as the concatenation of every file's objects
/// in name order; each file records how many of each it contributed, so a
/// reload moves an unchanged file's objects into the new set instead of
/// copying them (a copy per file plus the concatenation was two copies of
/// every object: at 10 000 services, half the agent's memory).
///
/// Between loads the slices' endpoints are held compactly
/// (`CompactEndpoint`), and `load_dir` expands them for as long as its
/// `Loaded` lives: k8s-openapi's `Endpoint` is 352 bytes however few of its
/// fields are set, which at 100 000 endpoints was 35 MB.
#[derive(Default)]
pub struct ManifestCache {
    /// Cached files in name order, as their objects appear in `objects`.
    files: Vec<CachedFile>,
    /// The slices' `endpoints` are empty here between loads.
    objects: Objects,
    /// The endpoints of `objects.slices[i]`.
    endpoints: Vec<Vec<CompactEndpoint>>,
}

/// One parsed file: its version and how many objects of each kind it added
/// (the `skipped` count is of its invalid documents).
struct CachedFile {
    path: PathBuf,
    stamp: Stamp,
    services: usize,
    slices: usize,
    nodes: usize,
    skipped: usize,
}

/// An endpoint as the cache keeps it: the fields most endpoints have, and
/// the rest of the object only when it has more (hints, hostname,
/// targetRef, zone).
#[derive(Clone, Debug, PartialEq)]
struct CompactEndpoint {
    addresses: Vec<String>,
    node_name: Option<String>,
    conditions: Option<EndpointConditions>,
    /// The endpoint with the fields above taken out, when anything is left.
    rest: Option<Box<Endpoint>>,
}

impl From<Endpoint> for CompactEndpoint {
    fn from(mut endpoint: Endpoint) -> Self {
        let addresses = std::mem::take(&mut endpoint.addresses);
        let node_name = endpoint.node_name.take();
        let conditions = endpoint.conditions.take();
        let rest = (endpoint != Endpoint::default()).then(|| Box::new(endpoint));
        CompactEndpoint {
            addresses,
            node_name,
            conditions,
            rest,
        }
    }
}

impl CompactEndpoint {
    /// The endpoint, its fields moved out (`From<Endpoint>` puts them back):
    /// expanding every endpoint for each sync allocates one list per slice,
    /// not a copy of every string.
    fn expand(&mut self) -> Endpoint {
        let mut endpoint = self
            .rest
            .take()
            .map_or_else(Endpoint::default, |rest| *rest);
        endpoint.addresses = std::mem::take(&mut self.addresses);
        endpoint.node_name = self.node_name.take();
        endpoint.conditions = self.conditions.take();
        endpoint
    }
}

/// What a `ManifestCache` holds, consumed in file order by the next load.
struct Previous {
    services: std::vec::IntoIter<Service>,
    slices: std::vec::IntoIter<EndpointSlice>,
    endpoints: std::vec::IntoIter<Vec<CompactEndpoint>>,
    nodes: std::vec::IntoIter<Node>,
    skipped: std::vec::IntoIter<Skipped>,
}

impl Previous {
    /// Moves `file`'s objects into `cache`, or drops them when it is None.
    fn take(&mut self, file: &CachedFile, cache: Option<&mut ManifestCache>) {
        let services = self.services.by_ref().take(file.services);
        let slices = self.slices.by_ref().take(file.slices);
        let endpoints = self.endpoints.by_ref().take(file.slices);
        let nodes = self.nodes.by_ref().take(file.nodes);
        let skipped = self.skipped.by_ref().take(file.skipped);
        match cache {
            Some(cache) => {
                cache.objects.services.extend(services);
                cache.objects.slices.extend(slices);
                cache.endpoints.extend(endpoints);
                cache.objects.nodes.extend(nodes);
                cache.objects.skipped.extend(skipped);
            }
            None => {
                services.for_each(drop);
                slices.for_each(drop);
                endpoints.for_each(drop);
                nodes.for_each(drop);
                skipped.for_each(drop);
            }
        }
    }
}

/// The objects of a `ManifestCache::load_dir`, endpoints expanded; they are
/// compacted again when this is dropped.
pub struct Loaded<'a> {
    cache: &'a mut ManifestCache,
}

impl std::ops::Deref for Loaded<'_> {
    type Target = Objects;
    fn deref(&self) -> &Objects {
        &self.cache.objects
    }
}

impl Drop for Loaded<'_> {
    fn drop(&mut self) {
        let cache = &mut *self.cache;
        for (slice, compact) in cache.objects.slices.iter_mut().zip(&mut cache.endpoints) {
            // Unchanged since `expand` (lent as shared references only).
            let expanded = std::mem::take(&mut slice.endpoints);
            for (to, endpoint) in compact.iter_mut().zip(expanded) {
                *to = CompactEndpoint::from(endpoint);
            }
        }
    }
}

impl ManifestCache {
    /// Like `load_dir`, parsing only files that changed since the last call.
    /// On an error reading the directory the cache is left as it was.
    pub fn load_dir(&mut self, dir: &Path) -> std::io::Result<Loaded<'_>> {
        let mut paths: Vec<PathBuf> = fs::read_dir(dir)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| is_manifest(p))
            .collect();
        paths.sort();
        // Every stamp first: an error here leaves the cache as it was.
        let mut listed = Vec::with_capacity(paths.len());
        for path in paths {
            let stamp = match fs::metadata(&path) {
                Ok(meta) => Ok((
                    std::os::unix::fs::MetadataExt::ino(&meta),
                    meta.modified()?,
                    meta.len(),
                )),
                Err(e) => Err(e),
            };
            listed.push((path, stamp));
        }
        let held = std::mem::take(&mut self.objects);
        let mut previous = Previous {
            services: held.services.into_iter(),
            slices: held.slices.into_iter(),
            endpoints: std::mem::take(&mut self.endpoints).into_iter(),
            nodes: held.nodes.into_iter(),
            skipped: held.skipped.into_iter(),
        };
        let mut cached = std::mem::take(&mut self.files).into_iter().peekable();
        for (path, stamp) in listed {
            let origin = path.display().to_string();
            // Files gone since the last load, before this one in name order.
            while let Some(gone) = cached.next_if(|c| c.path < path) {
                previous.take(&gone, None);
            }
            if let Some(old) = cached.next_if(|c| c.path == path) {
                if stamp.as_ref().is_ok_and(|s| *s == old.stamp) {
                    previous.take(&old, Some(self));
                    self.files.push(old);
                    continue;
                }
                previous.take(&old, None);
            }
            let stamp = match stamp {
                Ok(stamp) => stamp,
                Err(e) => {
                    // Not cached: read again next time.
                    self.objects.skipped.push(invalid(&origin, e.to_string()));
                    continue;
                }
            };
            let mut parsed = Objects::default();
            match fs::read_to_string(&path) {
                Ok(text) => load_str(&text, &origin, &mut parsed),
                Err(e) => parsed.skipped.push(invalid(&origin, e.to_string())),
            }
            self.files.push(CachedFile {
                path,
                stamp,
                services: parsed.services.len(),
                slices: parsed.slices.len(),
                nodes: parsed.nodes.len(),
                skipped: parsed.skipped.len(),
            });
            for slice in &mut parsed.slices {
                let endpoints = std::mem::take(&mut slice.endpoints);
                // A new allocation: `collect` would reuse the 352-byte
                // slots of `endpoints` in place, and keep them.
                let mut compact = Vec::with_capacity(endpoints.len());
                compact.extend(endpoints.into_iter().map(CompactEndpoint::from));
                self.endpoints.push(compact);
            }
            self.objects.services.append(&mut parsed.services);
            self.objects.slices.append(&mut parsed.slices);
            self.objects.nodes.append(&mut parsed.nodes);
            self.objects.skipped.append(&mut parsed.skipped);
        }
        // Growing by doubling leaves up to half of each list unused.
        self.objects.services.shrink_to_fit();
        self.objects.slices.shrink_to_fit();
        self.endpoints.shrink_to_fit();
        for (slice, compact) in self.objects.slices.iter_mut().zip(&mut self.endpoints) {
            slice.endpoints = compact.iter_mut().map(CompactEndpoint::expand).collect();
        }
        Ok(Loaded { cache: self })
    }
}

#[cfg(test)]
mod tests {
    use super::{load_dir, ManifestCache};
    use std::{fs, path::Path};

    fn service(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: t}}\n\
             spec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n---\n"
        )
    }

    fn names(objects: &super::Objects) -> Vec<String> {
        let mut out: Vec<String> = objects
            .services
            .iter()
            .map(|s| s.metadata.name.clone().unwrap_or_default())
            .collect();
        out.extend(objects.skipped.iter().map(|s| s.object.clone()));
        out
    }

    fn slice(name: &str, endpoints: &str) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}, namespace: t, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: {endpoints}\n---\n"
        )
    }

    /// The cache's objects after each change are those a fresh read finds.
    fn assert_fresh(cache: &mut ManifestCache, dir: &Path) -> Vec<String> {
        let cached = cache.load_dir(dir).unwrap();
        let fresh = load_dir(dir).unwrap();
        assert_eq!(cached.slices, fresh.slices);
        assert_eq!(names(&cached), names(&fresh));
        names(&cached)
    }

    #[test]
    fn the_cache_follows_edits_additions_and_removals() {
        let dir = std::env::temp_dir().join(format!("dp-manifest-cache-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("a.yaml"),
            service("a1", "10.96.0.1") + &service("a2", "10.96.0.2"),
        )
        .unwrap();
        fs::write(dir.join("c.yaml"), service("c1", "10.96.0.3")).unwrap();
        // Endpoints with few fields and with every field.
        let endpoints = "[{addresses: [10.244.0.1], nodeName: n1}, \
            {addresses: [10.244.0.2], conditions: {ready: false, terminating: true}}, \
            {addresses: [10.244.0.3], nodeName: n2, zone: z, hostname: h, \
             hints: {forZones: [{name: z}]}, deprecatedTopology: {a: b}, \
             targetRef: {kind: Pod, namespace: t, name: p, uid: u}}]";
        fs::write(dir.join("c2.yaml"), slice("c1", endpoints)).unwrap();
        fs::write(dir.join("d.yaml"), "kind: [").unwrap();
        let mut cache = ManifestCache::default();
        let first = assert_fresh(&mut cache, &dir);
        assert_eq!(first[..3], ["a1", "a2", "c1"]);
        assert_eq!(first.len(), 4, "{first:?}");
        // A file in the middle, an edit that changes the size, a removal.
        fs::write(dir.join("b.yaml"), service("b1", "10.96.0.4")).unwrap();
        fs::write(dir.join("a.yaml"), service("a3", "10.96.0.5")).unwrap();
        fs::remove_file(dir.join("d.yaml")).unwrap();
        assert_eq!(assert_fresh(&mut cache, &dir), ["a3", "b1", "c1"]);
        {
            let loaded = cache.load_dir(&dir).unwrap();
            assert_eq!(loaded.slices[0].endpoints.len(), 3);
            let target = loaded.slices[0].endpoints[2].target_ref.as_ref();
            assert_eq!(target.unwrap().uid.as_deref(), Some("u"));
        }
        // Compacted between loads, expanded by the next.
        assert!(cache.objects.slices[0].endpoints.is_empty());
        // Unchanged files come from the cache, in order.
        assert_eq!(assert_fresh(&mut cache, &dir), ["a3", "b1", "c1"]);
        fs::remove_file(dir.join("a.yaml")).unwrap();
        assert_eq!(assert_fresh(&mut cache, &dir), ["b1", "c1"]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
