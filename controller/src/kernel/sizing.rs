//! How big the preallocated maps are on a node: conntrack and session
//! affinity (LRU maps, which the kernel always preallocates, so they cost
//! their capacity from the start). The maps only the agent writes are
//! created without preallocation and cost what they hold (`dataplane-ebpf`
//! `maps.rs`), so they keep fixed, generous capacities.
//!
//! The rule (docs/deploy.md, "Kernel memory and conntrack capacity"):
//! kube-proxy's `nf_conntrack_max = max(--conntrack-min,
//! --conntrack-max-per-core x cores)`, counted in connections, capped at a
//! fraction of the node's memory as Cilium's `--bpf-map-dynamic-size-ratio`
//! does, so that a node with many cores and little memory is not eaten by
//! its conntrack table. Counting per core also suits the table's per-CPU
//! LRU lists: the kernel gives each possible CPU an equal share. dp's defaults are a quarter of kube-proxy's: its
//! table holds only flows to services (nf_conntrack holds every connection
//! of the node), and when it is full the least recently used flow is
//! evicted instead of new ones being dropped.

use common::{AffinityKey, AffinityValue, CtEntry, CtKey};

/// What the rule reads from the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeResources {
    /// Online CPUs of the node (not the agent's cgroup quota: the traffic
    /// is the node's).
    pub cores: u32,
    /// `MemTotal` of `/proc/meminfo`, in bytes.
    pub memory_bytes: u64,
}

impl NodeResources {
    /// This node's CPUs and memory; 1 core and 1 GiB where they cannot be
    /// read (the rule then gives its floors).
    pub fn of_this_node() -> Self {
        // SAFETY: sysconf has no memory-safety preconditions.
        let cores = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        let memory_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        });
        NodeResources {
            cores: u32::try_from(cores).ok().filter(|&c| c > 0).unwrap_or(1),
            memory_bytes: memory_kib.map_or(1 << 30, |kib| kib * 1024),
        }
    }
}

/// The rule's settings (`dp agent --conntrack-*`, `--map-size-*`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConntrackSizing {
    /// Connections per core (kube-proxy's `--conntrack-max-per-core`).
    pub max_per_core: u32,
    /// Connections at least (kube-proxy's `--conntrack-min`).
    pub min: u32,
    /// At most this fraction of the node's memory for the conntrack table
    /// (Cilium's `--bpf-map-dynamic-size-ratio`, whose default this is).
    pub memory_ratio: f64,
    /// Conntrack map entries (two per connection), instead of the rule.
    pub entries: Option<u32>,
    /// Session-affinity entries, instead of one per four conntrack entries.
    pub affinity_entries: Option<u32>,
}

impl Default for ConntrackSizing {
    fn default() -> Self {
        ConntrackSizing {
            max_per_core: 16_384,
            min: 32_768,
            memory_ratio: 0.0025,
            entries: None,
            affinity_entries: None,
        }
    }
}

/// The capacities the rule gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackCapacity {
    /// `DP_CT` max_entries: two per connection.
    pub conntrack_entries: u32,
    /// `DP_AFFINITY` max_entries.
    pub affinity_entries: u32,
}

/// Kernel memory of one entry of a preallocated hash (or LRU hash) map:
/// the element header (`struct htab_elem`, 48 bytes on 64-bit), key and
/// value each rounded up to 8 bytes, and one 16-byte bucket. What
/// `memlock` in the map's fdinfo says, divided by max_entries.
pub const fn hash_entry_bytes(key: usize, value: usize) -> u64 {
    (48 + key.next_multiple_of(8) + value.next_multiple_of(8) + 16) as u64
}

/// One `DP_CT` entry.
pub const CT_ENTRY_BYTES: u64 = hash_entry_bytes(size_of::<CtKey>(), size_of::<CtEntry>());
/// One `DP_AFFINITY` entry.
pub const AFFINITY_ENTRY_BYTES: u64 =
    hash_entry_bytes(size_of::<AffinityKey>(), size_of::<AffinityValue>());

/// Fewest conntrack entries the rule gives, whatever the node: 1 024
/// connections.
const MIN_CT_ENTRIES: u32 = 2_048;

impl ConntrackSizing {
    /// The capacities for `node`: `max(min, max_per_core x cores)`
    /// connections, two entries each, capped at `memory_ratio` of the
    /// node's memory; affinity one entry per four conntrack entries.
    pub fn capacity(&self, node: NodeResources) -> ConntrackCapacity {
        let conntrack_entries = self.entries.unwrap_or_else(|| {
            let connections =
                u64::from(self.min).max(u64::from(self.max_per_core) * u64::from(node.cores));
            let by_memory = (node.memory_bytes as f64 * self.memory_ratio.clamp(0.0, 1.0)
                / CT_ENTRY_BYTES as f64) as u64;
            (connections * 2)
                .min(by_memory)
                .clamp(u64::from(MIN_CT_ENTRIES), u64::from(u32::MAX)) as u32
        });
        ConntrackCapacity {
            conntrack_entries,
            affinity_entries: self
                .affinity_entries
                .unwrap_or((conntrack_entries / 4).max(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn node(cores: u32, memory_gib: u64) -> NodeResources {
        NodeResources {
            cores,
            memory_bytes: memory_gib * GIB,
        }
    }

    #[test]
    fn entry_sizes_are_the_kernels() {
        // 36 MiB for 262 144 entries and 6.5 MiB for 65 536, as
        // `bpftool map show` reported them (BENCHMARKS.md).
        assert_eq!(CT_ENTRY_BYTES, 144);
        assert_eq!(AFFINITY_ENTRY_BYTES, 104);
    }

    #[test]
    fn small_node_gets_the_minimum() {
        // This machine: 2 cores, 23 GiB. max(32 768, 2 x 16 384) connections.
        let c = ConntrackSizing::default().capacity(node(2, 23));
        assert_eq!(c.conntrack_entries, 65_536);
        assert_eq!(c.affinity_entries, 16_384);
        // 9 MiB of conntrack, 1.6 MiB of affinity.
        assert_eq!(u64::from(c.conntrack_entries) * CT_ENTRY_BYTES, 9 << 20);
    }

    #[test]
    fn grows_with_cores() {
        let c = ConntrackSizing::default().capacity(node(32, 128));
        assert_eq!(c.conntrack_entries, 2 * 32 * 16_384);
    }

    #[test]
    fn memory_caps_many_cores_on_little_memory() {
        // 64 cores would ask 2 M entries (288 MiB); 0.25% of 4 GiB is
        // 10.2 MiB, 74 565 entries of 144 bytes.
        let c = ConntrackSizing::default().capacity(node(64, 4));
        assert_eq!(c.conntrack_entries, (4 * GIB / 400 / 144) as u32);
        assert!(u64::from(c.conntrack_entries) * CT_ENTRY_BYTES <= 4 * GIB / 400);
    }

    #[test]
    fn never_below_the_floor() {
        let c = ConntrackSizing {
            memory_ratio: 0.0,
            ..ConntrackSizing::default()
        }
        .capacity(node(1, 1));
        assert_eq!(c.conntrack_entries, MIN_CT_ENTRIES);
    }

    #[test]
    fn settings_override_the_rule() {
        let sizing = ConntrackSizing {
            max_per_core: 65_536,
            min: 131_072,
            ..ConntrackSizing::default()
        };
        // kube-proxy's defaults on 2 cores: 131 072 connections.
        assert_eq!(sizing.capacity(node(2, 64)).conntrack_entries, 262_144);
        let fixed = ConntrackSizing {
            entries: Some(1_000),
            affinity_entries: Some(10),
            ..ConntrackSizing::default()
        }
        .capacity(node(2, 23));
        assert_eq!(
            fixed,
            ConntrackCapacity {
                conntrack_entries: 1_000,
                affinity_entries: 10
            }
        );
    }
}
