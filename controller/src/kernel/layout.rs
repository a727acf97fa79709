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
//! - a map only the agent writes (services, backends, reverse NAT, names,
//!   source ranges) that differs in any way: replaced by a new one, its
//!   entries copied over when key and value are the same (so the old
//!   programs' view and the new one agree until the agent's first sync);
//! - a map the datapath writes (conntrack, affinity, counters, trace
//!   state) whose capacity alone differs: adopted, keeping its capacity
//!   (its state matters more than its size; the new size applies once it
//!   is recreated, after `dp cleanup`), with a warning;
//! - anything else (a datapath-written map of another type, key, value or
//!   flags): refused, before anything changes. Carrying such state over is
//!   a migration (issue 21); `dp cleanup` removes it.

use std::{fmt, path::Path};

use common::map_names;

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
    /// Only its capacity differs, and its state is the datapath's: reuse
    /// it at its old capacity.
    AdoptOldCapacity { pinned: u32, wanted: u32 },
    /// Written only by the agent: make a new one, copying the entries if
    /// `copy` (same key and value).
    Replace { copy: bool },
    /// Datapath state this dp cannot use: stop.
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

/// The plan for the pinned map `name`, defined as `pinned`, where this dp
/// would create `wanted`.
pub fn plan(name: &str, pinned: MapShape, wanted: MapShape) -> PinnedMapPlan {
    if pinned == wanted {
        PinnedMapPlan::Adopt
    } else if written_only_by_agent(name) {
        PinnedMapPlan::Replace {
            copy: pinned.same_entries(&wanted),
        }
    } else if pinned.same_entries(&wanted) && pinned.flags == wanted.flags {
        PinnedMapPlan::AdoptOldCapacity {
            pinned: pinned.max_entries,
            wanted: wanted.max_entries,
        }
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
    fn conntrack_of_another_capacity_is_kept() {
        let old = shape(LRU_HASH, 40, 262_144, 0);
        let new = shape(LRU_HASH, 40, 65_536, 0);
        assert_eq!(
            plan(map_names::CT, old, new),
            PinnedMapPlan::AdoptOldCapacity {
                pinned: 262_144,
                wanted: 65_536
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
        let other_flags = shape(LRU_HASH, 40, 65_536, 2);
        assert!(matches!(
            plan(map_names::AFFINITY, other_flags, new),
            PinnedMapPlan::Refuse { .. }
        ));
    }
}
