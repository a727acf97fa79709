//! Whether maps pinned by an earlier agent fit this dp's definitions, and
//! what to do when they do not.
//!
//! aya reuses a pinned map by name without comparing it with the object's
//! definition, and the kernel cannot change a map's type, key, value,
//! flags or capacity. Adopted unchecked, an old-layout map either fails
//! the programs' verification or silently keeps its old shape (a
//! preallocated service map stays preallocated). So before loading, each
//! pinned map is compared with the definition this dp would create, and:
//!
//! - the same: adopted (a restart keeps its state);
//! - conntrack or affinity (the state the node's connections depend on,
//!   which only the datapath has) whose capacity or LRU lists
//!   (`BPF_F_NO_COMMON_LRU`) alone differ: adopted as it is (the programs
//!   use it the same way; the new definition applies once it is recreated,
//!   after `dp cleanup`), with a warning;
//! - conntrack or affinity of another type, key, value or other flags: refused,
//!   before anything changes. Carrying such state over is a migration
//!   (issue 21); `dp cleanup` removes it;
//! - any other map that differs: replaced by a new one. The agent writes
//!   services, backends, reverse NAT, names and source ranges whole, and
//!   their entries are copied over when key and value are the same (so
//!   the old programs' view and the new one agree until the agent's first
//!   sync); the configuration is written at start; counters, trace
//!   sessions, rings and recent drops start empty (a counter map with
//!   slots for new reasons must not be kept at its old size).

use std::{fmt, path::Path};

use common::{map_names, map_sizes::BPF_F_NO_COMMON_LRU};

/// A map's definition, as the kernel reports it (`bpf_map_info`) or as
/// the object declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapShape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl MapShape {
    pub fn of_info(info: &aya::maps::MapInfo) -> Self {
        MapShape {
            // An unknown type compares unequal to every known one.
            map_type: info.map_type().map_or(u32::MAX, |t| t as u32),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        }
    }

    /// Same type, key and value: entries can be copied from one to the other.
    fn same_entries(&self, other: &MapShape) -> bool {
        (self.map_type, self.key_size, self.value_size)
            == (other.map_type, other.key_size, other.value_size)
    }
}

impl fmt::Display for MapShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "type {}, key {} B, value {} B, max_entries {}, flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// What to do with one pinned map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinnedMapPlan {
    /// Its definition is this dp's: reuse it.
    Adopt,
    /// Connection state whose capacity or LRU lists alone differ: reuse it
    /// as it is.
    AdoptAsPinned { pinned: MapShape, wanted: MapShape },
    /// Make a new one, copying the entries if `copy` (a map the agent
    /// writes whole, same key and value).
    Replace { copy: bool },
    /// Connection state this dp cannot use: stop.
    Refuse { pinned: MapShape, wanted: MapShape },
}

/// Maps whose whole content the agent writes (and can write again).
pub fn written_only_by_agent(name: &str) -> bool {
    [
        map_names::SERVICES,
        map_names::BACKENDS,
        map_names::REVNAT,
        map_names::NAMES,
        map_names::SOURCE_RANGES,
    ]
    .contains(&name)
}

/// Maps holding the node's connections, which only the datapath has.
pub fn connection_state(name: &str) -> bool {
    [map_names::CT, map_names::AFFINITY].contains(&name)
}

/// The plan for the pinned map `name`, defined as `pinned`, where this dp
/// would create `wanted`.
pub fn plan(name: &str, pinned: MapShape, wanted: MapShape) -> PinnedMapPlan {
    if pinned == wanted {
        PinnedMapPlan::Adopt
    } else if !connection_state(name) {
        PinnedMapPlan::Replace {
            copy: written_only_by_agent(name) && pinned.same_entries(&wanted),
        }
    } else if pinned.same_entries(&wanted)
        && pinned.flags & !BPF_F_NO_COMMON_LRU == wanted.flags & !BPF_F_NO_COMMON_LRU
    {
        PinnedMapPlan::AdoptAsPinned { pinned, wanted }
    } else {
        PinnedMapPlan::Refuse { pinned, wanted }
    }
}

/// The definition of the map pinned at `path`, if one is.
pub fn pinned_shape(path: &Path) -> Option<MapShape> {
    aya::maps::MapInfo::from_pin(path)
        .ok()
        .map(|info| MapShape::of_info(&info))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: u32 = 1;
    const LRU_HASH: u32 = 9;

    fn shape(map_type: u32, value_size: u32, max_entries: u32, flags: u32) -> MapShape {
        MapShape {
            map_type,
            key_size: 40,
            value_size,
            max_entries,
            flags,
        }
    }

    #[test]
    fn same_definition_is_adopted() {
        let s = shape(LRU_HASH, 40, 65_536, 0);
        assert_eq!(plan(map_names::CT, s, s), PinnedMapPlan::Adopt);
    }

    #[test]
    fn old_preallocated_service_map_is_replaced_with_its_entries() {
        // dp before issue 17: DP_SERVICES preallocated, 262 144 entries.
        let old = shape(HASH, 16, 262_144, 0);
        let new = shape(HASH, 16, 131_072, 1);
        assert_eq!(
            plan(map_names::SERVICES, old, new),
            PinnedMapPlan::Replace { copy: true }
        );
        let other_value = shape(HASH, 24, 131_072, 1);
        assert_eq!(
            plan(map_names::SERVICES, other_value, new),
            PinnedMapPlan::Replace { copy: false }
        );
    }

    #[test]
    fn counters_with_slots_for_new_reasons_are_replaced() {
        const PERCPU_ARRAY: u32 = 6;
        let old = MapShape {
            map_type: PERCPU_ARRAY,
            key_size: 4,
            value_size: 16,
            max_entries: 3 * 64,
            flags: 0,
        };
        let new = MapShape {
            max_entries: 3 * 128,
            ..old
        };
        assert_eq!(
            plan(map_names::COUNTERS, old, new),
            PinnedMapPlan::Replace { copy: false }
        );
    }

    #[test]
    fn conntrack_of_another_capacity_is_kept() {
        let old = shape(LRU_HASH, 40, 262_144, BPF_F_NO_COMMON_LRU);
        let new = shape(LRU_HASH, 40, 65_536, BPF_F_NO_COMMON_LRU);
        assert_eq!(
            plan(map_names::CT, old, new),
            PinnedMapPlan::AdoptAsPinned {
                pinned: old,
                wanted: new
            }
        );
    }

    #[test]
    fn conntrack_with_one_shared_lru_list_is_kept() {
        // dp before per-CPU LRU lists: flags 0.
        let old = shape(LRU_HASH, 40, 65_536, 0);
        let new = shape(LRU_HASH, 40, 65_536, BPF_F_NO_COMMON_LRU);
        assert_eq!(
            plan(map_names::CT, old, new),
            PinnedMapPlan::AdoptAsPinned {
                pinned: old,
                wanted: new
            }
        );
    }

    #[test]
    fn conntrack_of_another_layout_is_refused() {
        let old = shape(LRU_HASH, 32, 262_144, 0);
        let new = shape(LRU_HASH, 40, 65_536, 0);
        assert_eq!(
            plan(map_names::CT, old, new),
            PinnedMapPlan::Refuse {
                pinned: old,
                wanted: new
            }
        );
        // BPF_F_ZERO_SEED: not a difference the plan lets through.
        let other_flags = shape(LRU_HASH, 40, 65_536, 0x40);
        assert!(matches!(
            plan(map_names::AFFINITY, other_flags, new),
            PinnedMapPlan::Refuse { .. }
        ));
    }
}
