//! Conntrack garbage collection. The datapath treats an entry past its
//! deadline as absent, but only deletes what it overwrites; the LRU map
//! evicts only when full. Without collection the map fills up under any
//! steady traffic, and then every new flow evicts another (perhaps live)
//! one. A thread of its own walks the pinned map every interval and
//! deletes the entries past their deadline, so the agent's loop (health
//! requests, signals, syncs) never waits for it. The same walk tells which
//! backend ids conntrack still names: retired backends (removed from every
//! service, kept for their flows) that no entry names are deleted.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use common::{ct::CT_DIR_ORIGINAL, lb::BACKEND_FLAG_RETIRED, map_names, Backend, CtEntry, CtKey};
use tracing::{debug, warn};

use crate::kernel::{maps::monotonic_ns, pin};

/// What the collector has done, for `/metrics`.
#[derive(Debug, Default)]
pub struct CtGcStats {
    pub runs: AtomicU64,
    pub deleted: AtomicU64,
    /// Retired backends deleted once no entry named them.
    pub retired_deleted: AtomicU64,
    /// Entries found in the last walk, live or not.
    pub last_entries: AtomicU64,
    pub last_walk_micros: AtomicU64,
}

/// Starts the collector over the conntrack map pinned under `bpffs`, every
/// `every`. The map is opened again each time: an upgrade may replace it.
pub fn spawn(bpffs: PathBuf, every: Duration) -> std::io::Result<Arc<CtGcStats>> {
    let stats = Arc::new(CtGcStats::default());
    let shared = stats.clone();
    std::thread::Builder::new()
        .name("dp-ct-gc".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            let started = Instant::now();
            match collect(&bpffs) {
                Ok(Walk {
                    entries,
                    deleted,
                    retired_deleted,
                }) => {
                    let micros = started.elapsed().as_micros() as u64;
                    shared.runs.fetch_add(1, Ordering::Relaxed);
                    shared.deleted.fetch_add(deleted, Ordering::Relaxed);
                    shared
                        .retired_deleted
                        .fetch_add(retired_deleted, Ordering::Relaxed);
                    shared.last_entries.store(entries, Ordering::Relaxed);
                    shared.last_walk_micros.store(micros, Ordering::Relaxed);
                    debug!(
                        entries,
                        deleted, retired_deleted, micros, "conntrack collected"
                    );
                }
                Err(e) => warn!(error = %e, "conntrack collection"),
            }
        })?;
    Ok(stats)
}

/// What one walk did.
struct Walk {
    /// Conntrack entries seen, live or not.
    entries: u64,
    deleted: u64,
    retired_deleted: u64,
}

fn collect(bpffs: &std::path::Path) -> anyhow::Result<Walk> {
    let maps = pin::maps_dir(bpffs);
    let data = MapData::from_pin(maps.join(map_names::CT))?;
    let mut ct: HashMap<MapData, CtKey, CtEntry> = HashMap::try_from(Map::LruHashMap(data))?;
    let now = monotonic_ns();
    let mut seen = 0u64;
    let mut expired = Vec::new();
    // Backend ids the live entries of the client's direction name.
    let mut named = BTreeSet::new();
    for item in ct.iter() {
        match item {
            Ok((key, entry)) => {
                seen += 1;
                if entry.expires_ns <= now {
                    expired.push(key);
                } else if entry.direction == CT_DIR_ORIGINAL {
                    // Only the client's side looks its backend up; a
                    // reply is translated from its own entry.
                    named.insert(entry.backend_id);
                }
            }
            // Deleted or evicted while we walk.
            Err(aya::maps::MapError::KeyNotFound) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let mut deleted = 0;
    for key in expired {
        // Read again just before deleting: a new flow on the same tuple
        // may have replaced the dead entry since the walk. (A window of a
        // few microseconds remains between this read and the delete.)
        let still_dead = ct
            .get(&key, 0)
            .is_ok_and(|e| e.expires_ns <= monotonic_ns());
        if still_dead && ct.remove(&key).is_ok() {
            deleted += 1;
        }
    }
    // Retired backends no live entry names. No new entry can name one
    // meanwhile: no slot holds it, and a flow of it that moves takes
    // another backend.
    let data = MapData::from_pin(maps.join(map_names::BACKENDS))?;
    let mut backends: HashMap<MapData, u32, Backend> = HashMap::try_from(Map::HashMap(data))?;
    let retired: Vec<u32> = backends
        .iter()
        .filter_map(|item| item.ok())
        .filter(|(id, b)| b.flags & BACKEND_FLAG_RETIRED != 0 && !named.contains(id))
        .map(|(id, _)| id)
        .collect();
    let mut retired_deleted = 0;
    for id in retired {
        // Read again: the agent may have given the id to a new backend.
        let still_retired = backends
            .get(&id, 0)
            .is_ok_and(|b| b.flags & BACKEND_FLAG_RETIRED != 0);
        if still_retired && backends.remove(&id).is_ok() {
            retired_deleted += 1;
        }
    }
    Ok(Walk {
        entries: seen,
        deleted,
        retired_deleted,
    })
}
