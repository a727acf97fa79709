//! Kubernetes objects from a directory of ordinary manifests (`--manifests`):
//! `*.yaml`, `*.yml` and `*.json` files, multi-document, `kind: List`
//! accepted. Services, EndpointSlices and Nodes are read; other kinds are
//! ignored. A document that does not parse, or is larger than the API server
//! would accept, is skipped with a reason; the rest is kept.

use std::{fs, path::Path};

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
    ManifestCache::default().load_dir(dir)
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

/// Parsed files by path, reused while a file's stamp is unchanged: a change
/// to one file re-parses that file only.
#[derive(Default)]
pub struct ManifestCache {
    files: std::collections::BTreeMap<std::path::PathBuf, (Stamp, Objects)>,
}

impl ManifestCache {
    /// Like `load_dir`, parsing only files that changed since the last call.
    pub fn load_dir(&mut self, dir: &Path) -> std::io::Result<Objects> {
        let mut files: Vec<_> = fs::read_dir(dir)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| is_manifest(p))
            .collect();
        files.sort();
        self.files.retain(|path, _| files.contains(path));
        let mut all = Objects::default();
        for file in files {
            let origin = file.display().to_string();
            let meta = match fs::metadata(&file) {
                Ok(m) => m,
                Err(e) => {
                    all.skipped.push(invalid(&origin, e.to_string()));
                    continue;
                }
            };
            let stamp: Stamp = (
                std::os::unix::fs::MetadataExt::ino(&meta),
                meta.modified()?,
                meta.len(),
            );
            let cached = self
                .files
                .get(&file)
                .filter(|(s, _)| *s == stamp)
                .map(|(_, o)| o.clone());
            let objects = match cached {
                Some(o) => o,
                None => {
                    let mut o = Objects::default();
                    match fs::read_to_string(&file) {
                        Ok(text) => load_str(&text, &origin, &mut o),
                        Err(e) => o.skipped.push(invalid(&origin, e.to_string())),
                    }
                    self.files.insert(file.clone(), (stamp, o.clone()));
                    o
                }
            };
            all.services.extend(objects.services);
            all.slices.extend(objects.slices);
            all.nodes.extend(objects.nodes);
            all.skipped.extend(objects.skipped);
        }
        Ok(all)
    }
}
