//! An agent starting over pinned state: which maps it adopts, converts or
//! makes anew (`layout::plan`), the moves of their pins, and the layouts
//! it records in `DP_LAYOUTS` for the next agent. The conversion itself is
//! `migrate`.
//!
//! `<bpffs>/maps/DP_LAYOUTS` (a hash map created by userspace, never read
//! by the programs) holds, for each pinned map by name and kernel id, its
//! `common::layout::MapLayout`. It describes the maps in `maps/` and, while
//! a migration runs, the old ones in `previous/`.

use std::{
    collections::{BTreeMap, HashMap},
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Map, MapData},
    Ebpf,
};
use common::{
    layout::{self as desc, LayoutKey, MapLayout},
    map_names,
};

use super::{
    layout::{self, MapShape, PinnedMapPlan},
    migrate::{self, Converter, Migrated, OldMap, Target},
    rawmap::RawMap,
};
use crate::error::{Error, Result};

const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

/// The definition of `DP_LAYOUTS`, frozen: a dp that finds another cannot
/// read the state's layouts.
pub fn layouts_shape() -> MapShape {
    MapShape {
        map_type: BPF_MAP_TYPE_HASH,
        key_size: size_of::<LayoutKey>() as u32,
        value_size: size_of::<MapLayout>() as u32,
        max_entries: desc::LAYOUTS_MAX_ENTRIES,
        flags: 0,
    }
}

/// Where the maps being replaced are pinned until a migration finishes:
/// `previous/` next to `maps/`.
pub fn previous_dir(maps_dir: &Path) -> PathBuf {
    maps_dir.parent().unwrap_or(maps_dir).join("previous")
}

fn io_err(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { context, source }
}

/// The layouts recorded in `DP_LAYOUTS` pinned in `maps_dir`: `None` if it
/// is not pinned (state from a dp before it, or none); an error if it is
/// of another definition.
pub fn read_layouts(maps_dir: &Path) -> Result<Option<BTreeMap<(String, u32), MapLayout>>> {
    let path = maps_dir.join(map_names::LAYOUTS);
    let Some(shape) = layout::pinned_shape(&path) else {
        return Ok(None);
    };
    if shape != layouts_shape() {
        return Err(Error::PinnedStateUnreadable {
            why: format!(
                "{} is {shape}, not the layout record this dp knows ({})",
                map_names::LAYOUTS,
                layouts_shape()
            ),
        });
    }
    let map = MapData::from_pin(&path).map_err(|source| Error::Map {
        name: map_names::LAYOUTS,
        source,
    })?;
    let raw = RawMap::new(map.fd().as_fd(), shape.key_size, shape.value_size);
    let entries = raw
        .entries()
        .map_err(io_err(format!("reading {}", path.display())))?;
    Ok(Some(
        entries
            .into_iter()
            .map(|(k, v)| {
                let key: LayoutKey = bytemuck::pod_read_unaligned(&k);
                let value: MapLayout = bytemuck::pod_read_unaligned(&v);
                (
                    (String::from_utf8_lossy(key.name()).into_owned(), key.map_id),
                    value,
                )
            })
            .collect(),
    ))
}

/// One pinned map as found: its pin, definition, kernel id and layout (as
/// recorded, or version 1's for state from before `DP_LAYOUTS`).
#[derive(Clone, Debug)]
pub struct Found {
    pub path: PathBuf,
    pub shape: MapShape,
    pub id: u32,
    pub layout: Option<MapLayout>,
}

/// The map pinned at `path`, if one is.
pub fn find(
    name: &str,
    path: PathBuf,
    recorded: Option<&BTreeMap<(String, u32), MapLayout>>,
) -> Option<Found> {
    let info = aya::maps::MapInfo::from_pin(&path).ok()?;
    let shape = MapShape::of_info(&info);
    let ours = desc::describe(name)?.layout;
    let layout = recorded
        .and_then(|r| r.get(&(name.to_string(), info.id())).copied())
        .or_else(|| layout::legacy_layout(&ours, &shape));
    Some(Found {
        path,
        shape,
        id: info.id(),
        layout,
    })
}

/// What `prepare` did: the maps to convert once the new ones exist, and
/// whether the configuration was carried over.
pub struct Prepared {
    converting: Vec<Migrated>,
    pub config_carried: bool,
}

/// Compares the maps pinned in `maps_dir` (and `previous/`, left by a
/// migration that did not finish) with `wanted` and carries out
/// `layout::plan`: fails (changing nothing) if connection state cannot be
/// read; moves the pins of the maps to convert to `previous/` (keeping
/// them open); removes those to make anew.
pub fn prepare(maps_dir: &Path, wanted: &BTreeMap<&'static str, MapShape>) -> Result<Prepared> {
    let previous = previous_dir(maps_dir);
    let recorded = read_layouts(maps_dir)?;
    struct Step {
        name: &'static str,
        plan: PinnedMapPlan,
        current: Option<Found>,
        old: Option<(Found, PinnedMapPlan)>,
    }
    let mut steps = Vec::new();
    let mut unreadable = Vec::new();
    for (&name, &wanted) in wanted {
        let ours = desc::describe(name).ok_or(Error::MissingMap(name))?.layout;
        let plan_of = |f: &Found| layout::plan(name, f.shape, f.layout, wanted, &ours);
        let current = find(name, maps_dir.join(name), recorded.as_ref());
        let old = find(name, previous.join(name), recorded.as_ref()).map(|f| {
            let p = plan_of(&f);
            (f, p)
        });
        let plan = match (&old, &current) {
            // A migration that did not finish: redone from the old map.
            (Some((_, p)), _) => p.clone(),
            (None, Some(c)) => plan_of(c),
            (None, None) => continue,
        };
        if let PinnedMapPlan::Unreadable { why } = &plan {
            unreadable.push(format!("{name}: {why}"));
        }
        steps.push(Step {
            name,
            plan,
            current,
            old,
        });
    }
    if !unreadable.is_empty() {
        return Err(Error::PinnedStateUnreadable {
            why: unreadable.join("; "),
        });
    }
    let open = |name: &'static str, path: &Path| {
        MapData::from_pin(path).map_err(|source| Error::Map { name, source })
    };
    let remove = |path: &Path| {
        std::fs::remove_file(path).map_err(io_err(format!("unpin {}", path.display())))
    };
    let mut prepared = Prepared {
        converting: Vec::new(),
        config_carried: false,
    };
    for Step {
        name,
        plan,
        current,
        old,
    } in steps
    {
        let ours = desc::describe(name).expect("described above").layout;
        match (plan, old) {
            (PinnedMapPlan::Adopt, None) => {
                prepared.config_carried |= name == map_names::CONFIG;
            }
            (PinnedMapPlan::Fresh { why }, old) => {
                tracing::warn!(map = name, %why, "pinned map replaced by an empty one");
                for f in old.map(|(f, _)| f).into_iter().chain(current) {
                    remove(&f.path)?;
                }
            }
            (PinnedMapPlan::Convert { from, why }, None) => {
                let c = current.expect("planned from it");
                let map = open(name, &c.path)?;
                std::fs::create_dir_all(&previous)
                    .map_err(io_err(format!("create {}", previous.display())))?;
                let to = previous.join(name);
                std::fs::rename(&c.path, &to).map_err(io_err(format!(
                    "move {} to {}",
                    c.path.display(),
                    to.display()
                )))?;
                prepared.config_carried |= name == map_names::CONFIG;
                prepared.converting.push(Migrated {
                    name,
                    sources: vec![OldMap {
                        map,
                        layout: *from,
                        pin: Some(to),
                    }],
                    why,
                    converted_at_ns: 0,
                });
            }
            (plan, Some((o, _))) => {
                // Interrupted: from the old map, then from what the new one
                // got before the stop (if this dp can read it).
                let layout = match plan {
                    PinnedMapPlan::Convert { from, .. } => *from,
                    _ => ours,
                };
                let mut sources = vec![OldMap {
                    map: open(name, &o.path)?,
                    layout,
                    pin: Some(o.path.clone()),
                }];
                if let Some(c) = current {
                    let readable = c
                        .layout
                        .filter(|l| layout::inconvertible(l, &ours).is_none());
                    if let Some(layout) = readable {
                        sources.push(OldMap {
                            map: open(name, &c.path)?,
                            layout,
                            pin: None,
                        });
                    }
                    remove(&c.path)?;
                }
                prepared.config_carried |= name == map_names::CONFIG;
                prepared.converting.push(Migrated {
                    name,
                    sources,
                    why: "a migration that did not finish".to_string(),
                    converted_at_ns: 0,
                });
            }
            (PinnedMapPlan::Unreadable { .. }, None) => unreachable!("refused above"),
        }
    }
    Ok(prepared)
}

/// The `MapData` of a map of the object.
pub fn map_data(map: &Map) -> Option<&MapData> {
    match map {
        Map::Array(m)
        | Map::HashMap(m)
        | Map::LruHashMap(m)
        | Map::LpmTrie(m)
        | Map::PerCpuArray(m)
        | Map::PerCpuHashMap(m)
        | Map::RingBuf(m) => Some(m),
        _ => None,
    }
}

/// After the object is loaded (its new maps pinned): records the layouts
/// of every pinned map in `DP_LAYOUTS` (creating it if needed), and
/// converts the entries of the maps being replaced into the new ones
/// (pass 1). Returns what `finish` must complete after the swap.
pub fn after_load(
    ebpf: &Ebpf,
    maps_dir: &Path,
    pinned: &[&'static str],
    prepared: Prepared,
) -> Result<Vec<Migrated>> {
    let layouts = open_or_create_layouts(maps_dir)?;
    let layouts_raw = RawMap::new(
        layouts.fd().as_fd(),
        layouts_shape().key_size,
        layouts_shape().value_size,
    );
    for &name in pinned {
        let (Some(id), Some(d)) = (map_id(ebpf, name), desc::describe(name)) else {
            continue;
        };
        layouts_raw
            .update(
                bytemuck::bytes_of(&LayoutKey::new(name, id)),
                bytemuck::bytes_of(&d.layout),
                0,
            )
            .map_err(io_err(format!("record the layout of {name}")))?;
    }
    let mut migrated = Vec::new();
    let timeouts = ct_timeouts(ebpf);
    for Migrated {
        name, sources, why, ..
    } in prepared.converting
    {
        let converted_at_ns = super::maps::monotonic_ns();
        let ours = desc::describe(name).expect("a pinned map").layout;
        let new = ebpf
            .map(name)
            .and_then(map_data)
            .ok_or(Error::MissingMap(name))?;
        let info = new.info().map_err(|source| Error::Map { name, source })?;
        let shape = MapShape::of_info(&info);
        let raw = RawMap::new(new.fd().as_fd(), shape.key_size, shape.value_size);
        // Later sources (a half-filled new map) win over earlier ones
        // unless less recent, by the same measure as the cut below.
        let identity = Converter::new(&ours, &ours);
        let recent = last_used(name, &identity, timeouts);
        let mut entries: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        let mut read = 0usize;
        for source in &sources {
            let c = Converter::new(&source.layout, &ours);
            for (k, v) in source
                .raw()
                .entries()
                .map_err(io_err(format!("read the entries of the old {name}")))?
            {
                read += 1;
                let (k, v) = c.convert(&k, &v);
                match entries.get(&k) {
                    Some(had) if recent(&k, had) > recent(&k, &v) => {}
                    _ => {
                        entries.insert(k, v);
                    }
                }
            }
        }
        let target = Target {
            max_entries: shape.max_entries,
            per_cpu_lru: shape.map_type == BPF_MAP_TYPE_LRU_HASH
                && shape.flags & common::map_sizes::BPF_F_NO_COMMON_LRU != 0,
            array: matches!(
                shape.map_type,
                BPF_MAP_TYPE_ARRAY | BPF_MAP_TYPE_PERCPU_ARRAY
            ),
        };
        let written = migrate::fill(raw, target, entries.into_iter().collect(), &recent)
            .map_err(io_err(format!("write the entries of the new {name}")))?;
        let from: Vec<u32> = sources.iter().map(|s| s.layout.version).collect();
        tracing::info!(
            map = name,
            %why,
            from_version = ?from,
            to_version = ours.version,
            max_entries = shape.max_entries,
            read,
            written,
            "pinned map converted into a new one"
        );
        migrated.push(Migrated {
            name,
            sources,
            why,
            converted_at_ns,
        });
    }
    Ok(migrated)
}

/// When an entry of map `name` in this dp's layout was last used (larger:
/// more recent): a conntrack entry's deadline less its lifetime, else the
/// layout's recency field (0 without one).
fn last_used<'a>(
    name: &str,
    ours: &'a Converter,
    timeouts: common::CtTimeouts,
) -> impl Fn(&[u8], &[u8]) -> u64 + 'a {
    let conntrack = name == map_names::CT;
    move |k: &[u8], v: &[u8]| {
        if conntrack {
            let key: common::CtKey = bytemuck::pod_read_unaligned(k);
            let entry: common::CtEntry = bytemuck::pod_read_unaligned(v);
            common::rules::ct_last_used_ns(key.protocol, &entry, &timeouts)
        } else {
            ours.new_recency(v).unwrap_or(0)
        }
    }
}

/// The conntrack timeouts of the (adopted or converted) configuration, or
/// the defaults when it has none yet.
fn ct_timeouts(ebpf: &Ebpf) -> common::CtTimeouts {
    let config = ebpf
        .map(map_names::CONFIG)
        .and_then(map_data)
        .and_then(|m| {
            let raw = RawMap::new(
                m.fd().as_fd(),
                4,
                size_of::<common::DatapathConfig>() as u32,
            );
            let mut value = vec![0u8; raw.value_size];
            raw.lookup(&0u32.to_ne_bytes(), &mut value)
                .ok()?
                .then(|| bytemuck::pod_read_unaligned::<common::DatapathConfig>(&value))
        });
    match config {
        Some(c) if c.ct_timeouts.tcp_established != 0 => c.ct_timeouts,
        _ => common::CtTimeouts::DEFAULT,
    }
}

fn map_id(ebpf: &Ebpf, name: &str) -> Option<u32> {
    ebpf.map(name)
        .and_then(map_data)
        .and_then(|m| m.info().ok())
        .map(|i| i.id())
}

fn open_or_create_layouts(maps_dir: &Path) -> Result<MapData> {
    let path = maps_dir.join(map_names::LAYOUTS);
    let name = map_names::LAYOUTS;
    if path.exists() {
        return MapData::from_pin(&path).map_err(|source| Error::Map { name, source });
    }
    let s = layouts_shape();
    let def =
        aya_obj::Map::new_from_params(s.map_type, s.key_size, s.value_size, s.max_entries, s.flags);
    let map = MapData::create(def, name, None).map_err(|source| Error::Map { name, source })?;
    map.pin(&path).map_err(|e| Error::Pin {
        context: path.display().to_string(),
        message: e.to_string(),
    })?;
    Ok(map)
}

/// Pass 2, after the programs were swapped: the connection state the old
/// programs wrote since pass 1, merged into the new maps; then the old
/// pins removed and `DP_LAYOUTS` keeps only the maps now pinned.
pub fn finish(ebpf: &Ebpf, maps_dir: &Path, migrated: Vec<Migrated>) -> Result<()> {
    for m in &migrated {
        if !layout::connection_state(m.name) {
            continue;
        }
        let ours = desc::describe(m.name).expect("a pinned map").layout;
        let new = ebpf
            .map(m.name)
            .and_then(map_data)
            .ok_or(Error::MissingMap(m.name))?;
        let raw = RawMap::new(new.fd().as_fd(), ours.key_size, ours.value_size);
        let mut merged = 0;
        let identity = Converter::new(&ours, &ours);
        let last_used = last_used(m.name, &identity, ct_timeouts(ebpf));
        for old in &m.sources {
            let c = Converter::new(&old.layout, &ours);
            merged += migrate::merge(old.raw(), &c, raw, m.converted_at_ns, &last_used)
                .map_err(io_err(format!("merge the old {} into the new", m.name)))?;
        }
        tracing::info!(
            map = m.name,
            merged,
            "entries written by the old programs since the conversion carried over"
        );
    }
    for m in &migrated {
        for old in &m.sources {
            if let Some(pin) = &old.pin {
                std::fs::remove_file(pin).map_err(io_err(format!("unpin {}", pin.display())))?;
            }
        }
    }
    let _ = std::fs::remove_dir(previous_dir(maps_dir));
    prune_layouts(maps_dir)
}

/// Removes the `DP_LAYOUTS` entries of maps no longer pinned in
/// `maps_dir` or `previous/`.
pub fn prune_layouts(maps_dir: &Path) -> Result<()> {
    let path = maps_dir.join(map_names::LAYOUTS);
    let Ok(map) = MapData::from_pin(&path) else {
        return Ok(());
    };
    let s = layouts_shape();
    let raw = RawMap::new(map.fd().as_fd(), s.key_size, s.value_size);
    let pinned_ids: Vec<u32> = [maps_dir.to_path_buf(), previous_dir(maps_dir)]
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|d| d.flatten())
        .filter_map(|e| aya::maps::MapInfo::from_pin(e.path()).ok())
        .map(|i| i.id())
        .collect();
    for (k, _) in raw
        .entries()
        .map_err(io_err(format!("read {}", path.display())))?
    {
        let key: LayoutKey = bytemuck::pod_read_unaligned(&k);
        if !pinned_ids.contains(&key.map_id) {
            raw.delete(&k)
                .map_err(io_err(format!("prune {}", path.display())))?;
        }
    }
    Ok(())
}
