//! Kernel memory of the maps (issue 17): the maps only the agent writes are
//! allocated on use, conntrack and affinity have the capacities asked for,
//! `dp status` shows every pinned map's type, fill, capacity and memory,
//! and an agent started over maps pinned by an older dp (another layout or
//! capacity) converts or refuses them as `kernel::layout` says (issue 21),
//! keeping the most recently used conntrack entries when it shrinks.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use aya::maps::{HashMap, Map, MapData, MapInfo};
use common::{map_names, map_sizes::BPF_F_NO_PREALLOC, Backend, CtEntry, CtKey};
use dp::{Datapath, MapSizes, ServiceMaps};

/// A bpffs mounted on a directory of its own, unmounted and removed on drop.
struct Bpffs(PathBuf);

impl Bpffs {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("dpt-{}-{test}", std::process::id()));
        dp::kernel::pin::ensure_bpffs(&dir).expect("mount a bpffs");
        Bpffs(dir)
    }

    fn maps(&self) -> PathBuf {
        dp::kernel::pin::maps_dir(&self.0)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        dp::kernel::pin::unmount_bpffs(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn info(maps: &Path, name: &str) -> MapInfo {
    MapInfo::from_pin(maps.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// `bpftool map create` of a hash-type map at `maps/name`.
fn pin_map(maps: &Path, name: &str, kind: &str, key: usize, value: usize, entries: u32) {
    std::fs::create_dir_all(maps).unwrap();
    let status = Command::new("bpftool")
        .arg("map")
        .arg("create")
        .arg(maps.join(name))
        .args(["type", kind, "key", &key.to_string()])
        .args(["value", &value.to_string(), "entries", &entries.to_string()])
        .args(["name", name])
        .status()
        .expect("run bpftool");
    assert!(status.success(), "bpftool map create {name}");
}

fn backends(maps: &Path) -> HashMap<MapData, u32, Backend> {
    let data = MapData::from_pin(maps.join(map_names::BACKENDS)).unwrap();
    HashMap::try_from(Map::HashMap(data)).unwrap()
}

#[test]
fn agent_maps_are_allocated_on_use_and_state_maps_have_the_asked_capacity() {
    e2e::require_root();
    let bpffs = Bpffs::new("sizes");
    let sizes = MapSizes {
        conntrack: 4_096,
        affinity: 1_024,
        ..MapSizes::default()
    };
    let mut dp = Datapath::load_pinned(&bpffs.maps(), sizes).expect("load (run as root)");
    dp.set_backend(7, SocketAddr::from(([10, 244, 2, 7], 8080)), 6, false)
        .unwrap();
    let maps = bpffs.maps();
    for name in [
        map_names::SERVICES,
        map_names::BACKENDS,
        map_names::REVNAT,
        map_names::NAMES,
        map_names::SOURCE_RANGES,
    ] {
        let i = info(&maps, name);
        assert_ne!(
            i.map_flags() & BPF_F_NO_PREALLOC,
            0,
            "{name} allocated on use"
        );
    }
    assert_eq!(
        info(&maps, map_names::SERVICES).max_entries(),
        sizes.services
    );
    assert_eq!(
        info(&maps, map_names::BACKENDS).max_entries(),
        sizes.backends
    );
    let ct = info(&maps, map_names::CT);
    // Per-CPU LRU lists: a full table evicts a few entries per insert.
    assert_eq!(
        (ct.max_entries(), ct.map_flags()),
        (4_096, common::map_sizes::BPF_F_NO_COMMON_LRU)
    );
    assert_eq!(info(&maps, map_names::AFFINITY).max_entries(), 1_024);

    // dp status: every pinned map, with its type, fill, capacity, memory.
    let out = Command::new(env!("CARGO_BIN_EXE_dp"))
        .args(["status", "-o", "json", "--bpffs"])
        .arg(&bpffs.0)
        .args(["--healthz-addr", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed = status["maps"].as_array().unwrap();
    let names: Vec<&str> = listed.iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, dp::kernel::loader::PINNED_MAPS);
    let map = |name: &str| listed.iter().find(|m| m["name"] == name).unwrap().clone();
    let backends_row = map(map_names::BACKENDS);
    assert_eq!(backends_row["map_type"], "hash");
    assert_eq!(backends_row["allocated_on_use"], true);
    assert_eq!(backends_row["entries"], 1);
    assert_eq!(backends_row["max_entries"], sizes.backends);
    let ct_row = map(map_names::CT);
    assert_eq!(ct_row["map_type"], "lru_hash");
    assert_eq!(ct_row["allocated_on_use"], false);
    assert_eq!(ct_row["entries"], 0);
    assert_eq!(ct_row["max_entries"], 4_096);
    // Preallocated: at least its entries' worth (144 bytes each), however
    // empty; the kernel adds its LRU lists.
    let ct_memory = ct_row["memory_bytes"].as_u64().unwrap();
    assert!(
        ct_memory >= 4_096 * dp::kernel::sizing::CT_ENTRY_BYTES,
        "{ct_memory}"
    );
    // Allocated on use: 1 backend costs far less than 65 536 preallocated
    // ones would (6 MiB), its buckets (16 B each) and little more.
    let backends_memory = backends_row["memory_bytes"].as_u64().unwrap();
    assert!(backends_memory < 2 << 20, "{backends_memory}");
    assert_eq!(map(map_names::TRACE_RINGS[0])["map_type"], "ringbuf");
    assert!(map(map_names::TRACE_RINGS[0])["entries"].is_null());
    assert_eq!(map(map_names::CONFIG)["entries"], 1);
    let text = Command::new(env!("CARGO_BIN_EXE_dp"))
        .args(["status", "--bpffs"])
        .arg(&bpffs.0)
        .args(["--healthz-addr", "127.0.0.1:1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("DP_CT ") && l.contains("lru_hash") && l.contains("4096")),
        "{text}"
    );
    assert!(text.contains("maps' kernel memory:"), "{text}");
    eprintln!("{text}");

    // A restart with the same settings adopts every map as it is.
    let ids: Vec<u32> = dp::kernel::loader::PINNED_MAPS
        .iter()
        .map(|name| info(&maps, name).id())
        .collect();
    drop(dp);
    let dp = Datapath::load_pinned(&bpffs.maps(), sizes).expect("load again");
    let again: Vec<u32> = dp::kernel::loader::PINNED_MAPS
        .iter()
        .map(|name| info(&maps, name).id())
        .collect();
    assert_eq!(ids, again);
    assert!(backends(&maps).get(&7, 0).is_ok());
    drop(dp);
}

fn ct(maps: &Path) -> HashMap<MapData, CtKey, CtEntry> {
    let data = MapData::from_pin(maps.join(map_names::CT)).unwrap();
    HashMap::try_from(Map::LruHashMap(data)).unwrap()
}

#[test]
fn old_layout_pins_are_converted_or_refused() {
    e2e::require_root();
    let bpffs = Bpffs::new("old-layout");
    let maps = bpffs.maps();
    // As a dp before issue 17 pinned them (and before DP_LAYOUTS): backends
    // preallocated (flags 0) with 1 024 entries, one backend in it;
    // conntrack of another capacity and with one LRU list shared by all
    // CPUs (flags 0, before per-CPU lists), one flow in it.
    pin_map(
        &maps,
        map_names::BACKENDS,
        "hash",
        size_of::<u32>(),
        size_of::<Backend>(),
        1_024,
    );
    let backend = Backend {
        addr: common::addr::addr16([10, 244, 2, 7].into()),
        port: 8080,
        protocol: 6,
        flags: 0,
    };
    backends(&maps).insert(7, backend, 0).unwrap();
    pin_map(
        &maps,
        map_names::CT,
        "lru_hash",
        size_of::<CtKey>(),
        size_of::<CtEntry>(),
        1_024,
    );
    let key = CtKey {
        saddr: common::addr::addr16([10, 244, 1, 5].into()),
        daddr: common::addr::addr16([10, 96, 0, 10].into()),
        sport: 40_000,
        dport: 80,
        protocol: 6,
        _pad: [0; 3],
    };
    let entry = CtEntry {
        expires_ns: u64::MAX / 2,
        backend_id: 7,
        service_id: 3,
        state: common::ct::CT_STATE_ESTABLISHED,
        ..CtEntry::default()
    };
    ct(&maps).insert(key, entry, 0).unwrap();

    let dp = Datapath::load_pinned(&maps, MapSizes::default()).expect("load over old pins");
    // Made anew: allocated on use, this dp's capacity, the backend converted.
    let b = info(&maps, map_names::BACKENDS);
    assert_ne!(b.map_flags() & BPF_F_NO_PREALLOC, 0);
    assert_eq!(b.max_entries(), MapSizes::default().backends);
    assert_eq!(backends(&maps).get(&7, 0).unwrap(), backend);
    // Conntrack too, with this dp's capacity and per-CPU LRU lists, and
    // its flow carried over.
    let c = info(&maps, map_names::CT);
    assert_eq!(
        (c.max_entries(), c.map_flags()),
        (
            MapSizes::default().conntrack,
            common::map_sizes::BPF_F_NO_COMMON_LRU
        )
    );
    assert_eq!(ct(&maps).get(&key, 0).unwrap(), entry);
    // The old maps wait in previous/ until the programs are swapped.
    let previous = dp::kernel::upgrade::previous_dir(&maps);
    assert!(previous.join(map_names::CT).exists());
    // An agent that stops here (before the swap) leaves them; the next
    // one converts from them again, and from the half-done new maps.
    drop(dp);
    let mut dp = Datapath::load_pinned(&maps, MapSizes::default()).expect("load again");
    assert_eq!(ct(&maps).get(&key, 0).unwrap(), entry);
    assert_eq!(backends(&maps).get(&7, 0).unwrap(), backend);
    assert_eq!(dp.finish_migration().unwrap().len(), 2);
    assert!(!previous.exists());
    drop(dp);
    // Then a restart adopts everything as it is.
    let ct_id = info(&maps, map_names::CT).id();
    let mut dp = Datapath::load_pinned(&maps, MapSizes::default()).expect("restart");
    assert!(dp.finish_migration().unwrap().is_empty());
    assert_eq!(info(&maps, map_names::CT).id(), ct_id);
    drop(dp);

    // Conntrack of another value layout, not described: unreadable,
    // nothing changed (the agent fails static).
    let bpffs = Bpffs::new("old-layout-refused");
    let maps = bpffs.maps();
    pin_map(
        &maps,
        map_names::BACKENDS,
        "hash",
        size_of::<u32>(),
        size_of::<Backend>(),
        1_024,
    );
    pin_map(
        &maps,
        map_names::CT,
        "lru_hash",
        size_of::<CtKey>(),
        size_of::<CtEntry>() - 8,
        1_024,
    );
    let err = Datapath::load_pinned(&maps, MapSizes::default())
        .err()
        .expect("refused");
    let message = err.to_string();
    assert!(
        message.contains(map_names::CT)
            && message.contains("fail static")
            && message.contains("dp cleanup"),
        "{message}"
    );
    assert_eq!(info(&maps, map_names::BACKENDS).map_flags(), 0);
    assert!(!maps.join(map_names::SERVICES).exists());
    assert!(!maps.join(map_names::LAYOUTS).exists());
}

#[test]
fn a_smaller_conntrack_keeps_the_most_recently_used_entries() {
    use common::ct::{CT_STATE_ESTABLISHED, CT_STATE_NEW};
    e2e::require_root();
    let bpffs = Bpffs::new("shrink");
    let maps = bpffs.maps();
    let dp = Datapath::load_pinned(&maps, MapSizes::default()).expect("load");
    drop(dp);
    // 300 TCP flows, flow i last used at i s; every other one still in its
    // handshake (60 s to live, against 24 h for the established ones), so
    // the deadlines alone would keep the established ones, not the recent.
    const S: u64 = 1_000_000_000;
    let t = common::CtTimeouts::DEFAULT;
    let key = |i: u32| CtKey {
        saddr: common::addr::addr16([10, 244, 1, 5].into()),
        daddr: common::addr::addr16([10, 96, 0, 10].into()),
        sport: 10_000 + i as u16,
        dport: 80,
        protocol: 6,
        _pad: [0; 3],
    };
    let mut table = ct(&maps);
    for i in 0..300u32 {
        let state = if i % 2 == 0 {
            CT_STATE_ESTABLISHED
        } else {
            CT_STATE_NEW
        };
        let last_used = 1_000 * S + u64::from(i) * S;
        let entry = CtEntry {
            expires_ns: last_used + common::rules::ct_lifetime_ns(6, state, &t),
            backend_id: i + 1,
            state,
            ..CtEntry::default()
        };
        table.insert(key(i), entry, 0).unwrap();
    }
    // Room for 128: 64 in each of the 2 CPUs' LRU lists on this machine.
    let possible = aya::util::nr_cpus().unwrap() as u32;
    let online = aya::util::online_cpus().unwrap().len() as u32;
    let sizes = MapSizes {
        conntrack: 64 * possible,
        ..MapSizes::default()
    };
    let mut dp = Datapath::load_pinned(&maps, sizes).expect("load smaller");
    dp.finish_migration().unwrap();
    let kept: BTreeSet<u32> = ct(&maps)
        .iter()
        .map(|e| e.unwrap().1.backend_id - 1)
        .collect();
    let room = 64 * online;
    let recent: BTreeSet<u32> = (300 - room..300).collect();
    assert_eq!(
        kept, recent,
        "the {room} most recently used, whatever their state"
    );
    drop(dp);
}
