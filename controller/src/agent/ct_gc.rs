//! Conntrack garbage collection. The datapath treats an entry past its
//! deadline as absent, but only deletes what it overwrites; the LRU map
//! evicts only when full. Without collection the map fills up under any
//! steady traffic, and then every new flow evicts another (perhaps live)
//! one. A thread of its own walks the pinned map every interval and
//! deletes the entries past their deadline, so the agent's loop (health
//! requests, signals, syncs) never waits for it.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use common::{map_names, CtEntry, CtKey};
use tracing::{debug, warn};

use crate::kernel::{maps::monotonic_ns, pin};

/// What the collector has done, for `/metrics`.
#[derive(Debug, Default)]
pub struct CtGcStats {
    pub runs: AtomicU64,
    pub deleted: AtomicU64,
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
                Ok((entries, deleted)) => {
                    let micros = started.elapsed().as_micros() as u64;
                    shared.runs.fetch_add(1, Ordering::Relaxed);
                    shared.deleted.fetch_add(deleted, Ordering::Relaxed);
                    shared.last_entries.store(entries, Ordering::Relaxed);
                    shared.last_walk_micros.store(micros, Ordering::Relaxed);
                    debug!(entries, deleted, micros, "conntrack collected");
                }
                Err(e) => warn!(error = %e, "conntrack collection"),
            }
        })?;
    Ok(stats)
}

/// One walk: (entries seen, entries deleted).
fn collect(bpffs: &std::path::Path) -> anyhow::Result<(u64, u64)> {
    let path = pin::maps_dir(bpffs).join(map_names::CT);
    let data = MapData::from_pin(&path)?;
    let mut ct: HashMap<MapData, CtKey, CtEntry> = HashMap::try_from(Map::LruHashMap(data))?;
    let now = monotonic_ns();
    let mut seen = 0u64;
    let mut expired = Vec::new();
    for item in ct.iter() {
        match item {
            Ok((key, entry)) => {
                seen += 1;
                if entry.expires_ns <= now {
                    expired.push(key);
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
    Ok((seen, deleted))
}
