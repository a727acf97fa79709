//! Kubernetes objects from a directory of ordinary manifests (`--manifests`):
//! `*.yaml`, `*.yml` and `*.json` files, multi-document, `kind: List`
//! accepted. Services, EndpointSlices and Nodes are read; other kinds are
//! ignored. A document that does not parse, or is larger than the API server
//! would accept, is skipped with a reason; the rest is kept.

use std::{
    fs,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};
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
    cache.load_dir(dir)?;
    Ok(cache.objects)
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
/// in name order (what `load_dir` returns by reference); each file records
/// how many of each it contributed, so a reload moves an unchanged file's
/// objects into the new set instead of copying them. A copy per file plus
/// the concatenation was two copies of every object: at 10 000 services
/// that was half the agent's memory.
#[derive(Default)]
pub struct ManifestCache {
    /// Cached files in name order, as their objects appear in `objects`.
    files: Vec<CachedFile>,
    objects: Objects,
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

/// The objects of the previous load, consumed in file order.
struct Previous {
    services: std::vec::IntoIter<Service>,
    slices: std::vec::IntoIter<EndpointSlice>,
    nodes: std::vec::IntoIter<Node>,
    skipped: std::vec::IntoIter<Skipped>,
}

impl Previous {
    /// Moves `file`'s objects into `to`, or drops them when `to` is None.
    fn take(&mut self, file: &CachedFile, to: Option<&mut Objects>) {
        let services = self.services.by_ref().take(file.services);
        let slices = self.slices.by_ref().take(file.slices);
        let nodes = self.nodes.by_ref().take(file.nodes);
        let skipped = self.skipped.by_ref().take(file.skipped);
        match to {
            Some(to) => {
                to.services.extend(services);
                to.slices.extend(slices);
                to.nodes.extend(nodes);
                to.skipped.extend(skipped);
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

impl ManifestCache {
    /// Like `load_dir`, parsing only files that changed since the last call.
    /// On an error reading the directory the previous objects are kept.
    pub fn load_dir(&mut self, dir: &Path) -> std::io::Result<&Objects> {
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
        let previous = std::mem::take(&mut self.objects);
        let mut previous = Previous {
            services: previous.services.into_iter(),
            slices: previous.slices.into_iter(),
            nodes: previous.nodes.into_iter(),
            skipped: previous.skipped.into_iter(),
        };
        let mut cached = std::mem::take(&mut self.files).into_iter().peekable();
        let mut all = Objects::default();
        for (path, stamp) in listed {
            let origin = path.display().to_string();
            // Files gone since the last load, before this one in name order.
            while let Some(gone) = cached.next_if(|c| c.path < path) {
                previous.take(&gone, None);
            }
            let unchanged = cached.next_if(|c| c.path == path).and_then(|old| {
                let same = stamp.as_ref().is_ok_and(|s| *s == old.stamp);
                if same {
                    previous.take(&old, Some(&mut all));
                    Some(old)
                } else {
                    previous.take(&old, None);
                    None
                }
            });
            if let Some(old) = unchanged {
                self.files.push(old);
                continue;
            }
            let stamp = match stamp {
                Ok(stamp) => stamp,
                Err(e) => {
                    // Not cached: read again next time.
                    all.skipped.push(invalid(&origin, e.to_string()));
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
            all.services.append(&mut parsed.services);
            all.slices.append(&mut parsed.slices);
            all.nodes.append(&mut parsed.nodes);
            all.skipped.append(&mut parsed.skipped);
        }
        // Growing by doubling leaves up to half of each list unused.
        all.services.shrink_to_fit();
        all.slices.shrink_to_fit();
        self.objects = all;
        Ok(&self.objects)
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

    /// The cache's objects after each change are those a fresh read finds.
    fn assert_fresh(cache: &mut ManifestCache, dir: &Path) -> Vec<String> {
        let cached = names(cache.load_dir(dir).unwrap());
        let fresh = names(&load_dir(dir).unwrap());
        assert_eq!(cached, fresh);
        cached
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
        // Unchanged files come from the cache, in order.
        assert_eq!(assert_fresh(&mut cache, &dir), ["a3", "b1", "c1"]);
        fs::remove_file(dir.join("a.yaml")).unwrap();
        assert_eq!(assert_fresh(&mut cache, &dir), ["b1", "c1"]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
