//! Kubernetes objects from a directory of ordinary manifests (`--manifests`):
//! `*.yaml`, `*.yml` and `*.json` files, multi-document, `kind: List`
//! accepted. Services, EndpointSlices and Nodes are read; other kinds are
//! ignored. A document that does not parse, or is larger than the API server
//! would accept, is skipped with a reason; the rest is kept.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};
use serde::Deserialize;

use crate::translate::{CompactSlice, Skipped};

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
    let mut objects = Objects::default();
    for (path, stamp) in list_dir(dir)? {
        match stamp {
            Ok(_) => load_file(&path, &mut objects),
            Err(e) => objects
                .skipped
                .push(invalid(&path.display().to_string(), e.to_string())),
        }
    }
    Ok(objects)
}

/// Adds the objects of one file's text to `objects`.
pub fn load_str(text: &str, origin: &str, objects: &mut Objects) {
    // No document of a text within the limit can be over it: measuring
    // each (writing it out again) was a third of the parse.
    let measure = text.len() > MAX_DOCUMENT_BYTES;
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let here = format!("{origin} document {}", i + 1);
        match serde_norway::Value::deserialize(doc) {
            Ok(serde_norway::Value::Null) => {}
            Ok(value) => add(value, &here, measure, objects),
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

fn add(value: serde_norway::Value, here: &str, measure: bool, objects: &mut Objects) {
    let size = if measure {
        serde_norway::to_string(&value).map_or(0, |s| s.len())
    } else {
        0
    };
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
                add(item, &format!("{here} item {}", j + 1), measure, objects);
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
/// copying them. They are shared (`Arc`) with the translation that takes
/// them, and the slices are held compacted (`CompactSlice`): one small copy
/// of every object in the agent.
#[derive(Default)]
pub struct ManifestCache {
    /// Cached files in name order, as their objects appear in `objects`.
    files: Vec<CachedFile>,
    objects: SharedObjects,
}

/// Objects as a `ManifestCache` holds and lends them.
#[derive(Clone, Debug, Default)]
pub struct SharedObjects {
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<CompactSlice>>,
    pub nodes: Vec<Node>,
    pub skipped: Vec<Skipped>,
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

/// What a `ManifestCache` holds, consumed in file order by the next load.
struct Previous {
    services: std::vec::IntoIter<Arc<Service>>,
    slices: std::vec::IntoIter<Arc<CompactSlice>>,
    nodes: std::vec::IntoIter<Node>,
    skipped: std::vec::IntoIter<Skipped>,
}

impl Previous {
    /// Moves `file`'s objects into `into`, or drops them when it is None.
    fn take(&mut self, file: &CachedFile, into: Option<&mut SharedObjects>) {
        let services = self.services.by_ref().take(file.services);
        let slices = self.slices.by_ref().take(file.slices);
        let nodes = self.nodes.by_ref().take(file.nodes);
        let skipped = self.skipped.by_ref().take(file.skipped);
        match into {
            Some(into) => {
                into.services.extend(services);
                into.slices.extend(slices);
                into.nodes.extend(nodes);
                into.skipped.extend(skipped);
            }
            None => {
                services.for_each(drop);
                slices.for_each(drop);
                nodes.for_each(drop);
                skipped.for_each(drop);
            }
        }
    }
}

/// The manifest files of `dir` in name order, each with its stamp (or why
/// it has none).
fn list_dir(dir: &Path) -> std::io::Result<Vec<(PathBuf, std::io::Result<Stamp>)>> {
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| is_manifest(p))
        .collect();
    paths.sort();
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
    Ok(listed)
}

/// Parses one file into `objects`.
fn load_file(path: &Path, objects: &mut Objects) {
    let origin = path.display().to_string();
    match fs::read_to_string(path) {
        Ok(text) => load_str(&text, &origin, objects),
        Err(e) => objects.skipped.push(invalid(&origin, e.to_string())),
    }
}

impl ManifestCache {
    /// Like `load_dir`, parsing only files that changed since the last call.
    /// On an error reading the directory the cache is left as it was.
    pub fn load_dir(&mut self, dir: &Path) -> std::io::Result<&SharedObjects> {
        // Every stamp first: an error here leaves the cache as it was.
        let listed = list_dir(dir)?;
        let held = std::mem::take(&mut self.objects);
        let mut previous = Previous {
            services: held.services.into_iter(),
            slices: held.slices.into_iter(),
            nodes: held.nodes.into_iter(),
            skipped: held.skipped.into_iter(),
        };
        let mut cached = std::mem::take(&mut self.files).into_iter().peekable();
        for (path, stamp) in listed {
            // Files gone since the last load, before this one in name order.
            while let Some(gone) = cached.next_if(|c| c.path < path) {
                previous.take(&gone, None);
            }
            if let Some(old) = cached.next_if(|c| c.path == path) {
                if stamp.as_ref().is_ok_and(|s| *s == old.stamp) {
                    previous.take(&old, Some(&mut self.objects));
                    self.files.push(old);
                    continue;
                }
                previous.take(&old, None);
            }
            let stamp = match stamp {
                Ok(stamp) => stamp,
                Err(e) => {
                    // Not cached: read again next time.
                    let origin = path.display().to_string();
                    self.objects.skipped.push(invalid(&origin, e.to_string()));
                    continue;
                }
            };
            let mut parsed = Objects::default();
            load_file(&path, &mut parsed);
            self.files.push(CachedFile {
                path,
                stamp,
                services: parsed.services.len(),
                slices: parsed.slices.len(),
                nodes: parsed.nodes.len(),
                skipped: parsed.skipped.len(),
            });
            let objects = &mut self.objects;
            objects
                .services
                .extend(parsed.services.into_iter().map(Arc::new));
            objects.slices.extend(
                parsed
                    .slices
                    .into_iter()
                    .map(|s| Arc::new(CompactSlice::from(s))),
            );
            objects.nodes.append(&mut parsed.nodes);
            objects.skipped.append(&mut parsed.skipped);
        }
        // Growing by doubling leaves up to half of each list unused.
        self.objects.services.shrink_to_fit();
        self.objects.slices.shrink_to_fit();
        Ok(&self.objects)
    }
}

#[cfg(test)]
mod tests {
    use super::{load_dir, ManifestCache};
    use crate::translate::CompactSlice;
    use std::{fs, path::Path};

    fn service(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: t}}\n\
             spec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n---\n"
        )
    }

    fn names<'a>(
        services: impl Iterator<Item = &'a k8s_openapi::api::core::v1::Service>,
        skipped: &[crate::translate::Skipped],
    ) -> Vec<String> {
        let mut out: Vec<String> = services
            .map(|s| s.metadata.name.clone().unwrap_or_default())
            .collect();
        out.extend(skipped.iter().map(|s| s.object.clone()));
        out
    }

    fn slice(name: &str, endpoints: &str) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}, namespace: t, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: {endpoints}\n---\n"
        )
    }

    #[test]
    fn a_document_over_the_api_servers_limit_is_skipped_and_the_rest_read() {
        let big = "x".repeat(super::MAX_DOCUMENT_BYTES);
        let text = format!(
            "{}apiVersion: v1\nkind: Service\nmetadata: {{name: big, namespace: t, \
             annotations: {{note: {big}}}}}\nspec: {{clusterIP: 10.96.0.2, ports: [{{port: 80}}]}}\n---\n{}",
            service("before", "10.96.0.1"),
            service("after", "10.96.0.3")
        );
        let mut objects = super::Objects::default();
        super::load_str(&text, "f.yaml", &mut objects);
        assert_eq!(
            names(objects.services.iter(), &objects.skipped),
            ["before", "after", "f.yaml document 2"]
        );
        assert!(objects.skipped[0].invalid);
        assert!(
            objects.skipped[0].reason.contains(" bytes, over "),
            "{:?}",
            objects.skipped[0]
        );
    }

    /// The cache's objects after each change are those a fresh read finds.
    fn assert_fresh(cache: &mut ManifestCache, dir: &Path) -> Vec<String> {
        let cached = cache.load_dir(dir).unwrap();
        let fresh = load_dir(dir).unwrap();
        let compacted: Vec<CompactSlice> = fresh.slices.into_iter().map(Into::into).collect();
        let cached_slices: Vec<&CompactSlice> = cached.slices.iter().map(|s| &**s).collect();
        assert_eq!(cached_slices, compacted.iter().collect::<Vec<_>>());
        let cached_names = names(cached.services.iter().map(|s| &**s), &cached.skipped);
        assert_eq!(cached_names, names(fresh.services.iter(), &fresh.skipped));
        cached_names
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
        let held = cache.load_dir(&dir).unwrap().clone();
        assert_eq!(held.slices[0].endpoint_count(), 3);
        // Unchanged files come from the cache, in order, the same objects.
        assert_eq!(assert_fresh(&mut cache, &dir), ["a3", "b1", "c1"]);
        let again = cache.load_dir(&dir).unwrap();
        assert!(std::sync::Arc::ptr_eq(&held.slices[0], &again.slices[0]));
        assert!(std::sync::Arc::ptr_eq(
            &held.services[0],
            &again.services[0]
        ));
        fs::remove_file(dir.join("a.yaml")).unwrap();
        assert_eq!(assert_fresh(&mut cache, &dir), ["b1", "c1"]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
