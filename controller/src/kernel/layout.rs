//! Whether maps pinned by an earlier (or later) agent fit this dp's
//! definitions, and what to do when they do not.
//!
//! aya reuses a pinned map by name without comparing it with the object's
//! definition, and the kernel cannot change a map's type, key, value,
//! flags or capacity. So before loading, each pinned map is compared with
//! the definition this dp would create, and with its layout as the agent
//! that pinned it described it in `DP_LAYOUTS` (`common::layout`):
//!
//! - the same version and definition: adopted (a restart keeps its state);
//! - another version, capacity or flags: a new map is made and the old
//!   one's entries are converted field by field (`kernel::migrate`), so
//!   conntrack, affinity and the agent's own maps carry over an upgrade, a
//!   rollback or a resize. Counters, trace sessions, rings and recent drops
//!   start empty instead (nothing depends on them);
//! - a layout this dp cannot convert (no description, a version below its
//!   floor, a key field or required field it lacks): conntrack and
//!   affinity (the state the node's connections depend on) make the agent
//!   fail static, before anything changes; any other map starts empty (the
//!   agent writes it again).
//!
//! State pinned by a dp from before `DP_LAYOUTS` is taken as version 1 of
//! each map when its key and value sizes are version 1's.

use std::{fmt, path::Path};

use common::{
    layout::{MapLayout, PART_KEY},
    map_names,
};

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
    /// Its version and definition are this dp's: reuse it.
    Adopt,
    /// Make a new one and convert the entries from the layout `from`.
    Convert { from: Box<MapLayout>, why: String },
    /// Make a new, empty one.
    Fresh { why: String },
    /// Connection state this dp cannot read: the agent fails static.
    Unreadable { why: String },
}

/// Maps holding the node's connections, which only the datapath has.
pub fn connection_state(name: &str) -> bool {
    [map_names::CT, map_names::AFFINITY].contains(&name)
}

/// Maps that start empty whenever they are replaced: counters, trace
/// sessions and rings, recent drops.
pub fn starts_empty(name: &str) -> bool {
    name == map_names::COUNTERS
        || name == map_names::TRACE_SESSIONS
        || name == map_names::TRACE_LOST
        || name == map_names::RECENT
        || name == map_names::RECENT_HEAD
        || map_names::TRACE_RINGS.contains(&name)
}

/// The layout of a map pinned by a dp from before `DP_LAYOUTS`: this dp's
/// version 1, when the sizes are version 1's.
pub fn legacy_layout(wanted: &MapLayout, pinned: &MapShape) -> Option<MapLayout> {
    (wanted.version == 1
        && wanted.key_size == pinned.key_size
        && wanted.value_size == pinned.value_size)
        .then_some(*wanted)
}

/// Why entries of layout `from` cannot be converted into layout `to`, if
/// they cannot.
pub fn inconvertible(from: &MapLayout, to: &MapLayout) -> Option<String> {
    if from.version < to.floor || to.version < from.floor {
        return Some(format!(
            "version {} cannot be converted to version {} (floors {} and {})",
            from.version, to.version, from.floor, to.floor
        ));
    }
    for f in to.fields().iter().filter(|f| !f.is_padding()) {
        let name = String::from_utf8_lossy(f.name());
        match from.field(f.part, f.name()) {
            Some(g) if g.size != f.size => {
                return Some(format!(
                    "field {name} is {} B in version {} and {} B in version {}",
                    g.size, from.version, f.size, to.version
                ))
            }
            None if f.part == PART_KEY => {
                return Some(format!("version {} has no key field {name}", from.version))
            }
            None if f.flags & common::layout::FIELD_REQUIRED != 0 => {
                return Some(format!(
                    "version {} has no field {name}, which version {} requires",
                    from.version, to.version
                ))
            }
            _ => {}
        }
    }
    None
}

/// The plan for pinned map `name`, defined as `pinned` with the layout
/// `pinned_layout` (`None`: not described and not version 1's sizes),
/// where this dp would create `wanted` with layout `ours`.
pub fn plan(
    name: &str,
    pinned: MapShape,
    pinned_layout: Option<MapLayout>,
    wanted: MapShape,
    ours: &MapLayout,
) -> PinnedMapPlan {
    let Some(from) = pinned_layout else {
        let why = format!("its layout is not known ({pinned}; this dp's: {wanted})");
        return if connection_state(name) {
            PinnedMapPlan::Unreadable { why }
        } else {
            PinnedMapPlan::Fresh { why }
        };
    };
    if from.version == ours.version && pinned == wanted {
        return PinnedMapPlan::Adopt;
    }
    let why = if from.version != ours.version {
        format!(
            "layout version {} (this dp's: {})",
            from.version, ours.version
        )
    } else if pinned.max_entries != wanted.max_entries {
        format!(
            "capacity {} (asked for: {})",
            pinned.max_entries, wanted.max_entries
        )
    } else {
        format!("definition {pinned} (this dp's: {wanted})")
    };
    if starts_empty(name) {
        return PinnedMapPlan::Fresh { why };
    }
    match inconvertible(&from, ours) {
        None => PinnedMapPlan::Convert {
            from: Box::new(from),
            why,
        },
        Some(cause) if connection_state(name) => PinnedMapPlan::Unreadable {
            why: format!("{why}: {cause}"),
        },
        Some(cause) => PinnedMapPlan::Fresh {
            why: format!("{why}: {cause}"),
        },
    }
}

/// The definition of the map pinned at `path`, if one is.
pub fn pinned_shape(path: &Path) -> Option<MapShape> {
    aya::maps::MapInfo::from_pin(path)
        .ok()
        .map(|info| MapShape::of_info(&info))
}

/// One line of `common/layouts.lock` for pinned map `name`: its version,
/// its type and flags (and an array's or ring's capacity, which is part of
/// its meaning), and every field of its key and value with offset, size and
/// type. Any change to these without a version bump fails
/// `controller/tests/layouts.rs`.
pub fn fingerprint(name: &str, shape: &MapShape, d: &common::layout::Description) -> String {
    const ARRAY: u32 = 2;
    const PERCPU_ARRAY: u32 = 6;
    const RINGBUF: u32 = 27;
    let l = &d.layout;
    let capacity = match shape.map_type {
        ARRAY | PERCPU_ARRAY | RINGBUF => format!(" max_entries={}", shape.max_entries),
        _ => String::new(),
    };
    let mut line = format!(
        "{name} v{} floor={} type={} flags={:#x}{capacity} key={} value={}",
        l.version, l.floor, shape.map_type, shape.flags, l.key_size, l.value_size
    );
    for (f, ty) in l.fields().iter().zip(d.types) {
        let part = if f.part == PART_KEY { "k" } else { "v" };
        line.push_str(&format!(
            " {part}:{}@{}+{}:{}{}",
            String::from_utf8_lossy(f.name()),
            f.offset,
            f.size,
            ty.replace(' ', ""),
            match f.flags {
                0 => String::new(),
                flags => format!("/{flags:#x}"),
            }
        ));
    }
    line
}

/// Whether the fields of `d` cover its key and value exactly, without
/// overlap: a field added to a type but not to its description shows here.
/// `value_size`: the size the value fields must cover (a ring's records).
pub fn check_fields(name: &str, d: &common::layout::Description, value_size: u32) -> Vec<String> {
    let mut errors = Vec::new();
    for (part, size) in [(PART_KEY, d.layout.key_size), (1, value_size)] {
        let mut fields: Vec<_> = d
            .layout
            .fields()
            .iter()
            .filter(|f| f.part == part)
            .collect();
        fields.sort_by_key(|f| f.offset);
        let mut at = 0u32;
        for f in fields {
            if u32::from(f.offset) != at {
                errors.push(format!(
                    "{name}: field {} at {} where {at} was expected (a field missing from common::layout::describe, or overlapping)",
                    String::from_utf8_lossy(f.name()),
                    f.offset
                ));
            }
            at = u32::from(f.offset) + u32::from(f.size);
        }
        if at != size {
            errors.push(format!(
                "{name}: the described fields of the {} cover {at} of its {size} bytes (describe every field in common::layout::describe)",
                if part == PART_KEY { "key" } else { "value" }
            ));
        }
    }
    errors
}

/// Compares `current` lines (`fingerprint`) with the lock file's: each
/// must be in it. A line for a map and version the lock holds differently
/// is a layout change without a version bump; a version the lock lacks
/// is a bump to record.
pub fn check_lock(lock: &str, current: &[String]) -> Vec<String> {
    let head = |l: &str| l.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    let recorded: Vec<&str> = lock
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let mut errors = Vec::new();
    for line in current {
        if recorded.contains(&line.as_str()) {
            continue;
        }
        match recorded.iter().find(|r| head(r) == head(line)) {
            Some(r) => errors.push(format!(
                "{} changed without a version bump: bump its version in common::layout::versions (and say what an agent converting from the old one does in common::layout::describe)\n  recorded: {r}\n  now:      {line}",
                head(line)
            )),
            None => errors.push(format!(
                "{} is not recorded in common/layouts.lock: run `UPDATE_LAYOUTS=1 cargo test -p dp --test layouts` and commit it\n  now: {line}",
                head(line)
            )),
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use common::{layout::describe, map_sizes::BPF_F_NO_COMMON_LRU};

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

    fn ct() -> MapLayout {
        describe(map_names::CT).unwrap().layout
    }

    #[test]
    fn same_version_and_definition_is_adopted() {
        let s = shape(LRU_HASH, 40, 65_536, 0);
        assert_eq!(
            plan(map_names::CT, s, Some(ct()), s, &ct()),
            PinnedMapPlan::Adopt
        );
    }

    #[test]
    fn another_capacity_or_lru_lists_is_converted() {
        let new = shape(LRU_HASH, 40, 65_536, BPF_F_NO_COMMON_LRU);
        for old in [
            shape(LRU_HASH, 40, 262_144, BPF_F_NO_COMMON_LRU),
            shape(LRU_HASH, 40, 65_536, 0),
        ] {
            assert!(
                matches!(
                    plan(map_names::CT, old, Some(ct()), new, &ct()),
                    PinnedMapPlan::Convert { .. }
                ),
                "{old}"
            );
        }
    }

    #[test]
    fn counters_of_another_definition_start_empty() {
        const PERCPU_ARRAY: u32 = 6;
        let counters = describe(map_names::COUNTERS).unwrap().layout;
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
        assert!(matches!(
            plan(map_names::COUNTERS, old, Some(counters), new, &counters),
            PinnedMapPlan::Fresh { .. }
        ));
    }

    #[test]
    fn connection_state_of_an_unknown_layout_is_unreadable_others_start_empty() {
        let old = shape(LRU_HASH, 32, 65_536, 0);
        let new = shape(LRU_HASH, 40, 65_536, 0);
        assert_eq!(legacy_layout(&ct(), &old), None, "not version 1's sizes");
        assert!(matches!(
            plan(map_names::CT, old, None, new, &ct()),
            PinnedMapPlan::Unreadable { .. }
        ));
        let services = describe(map_names::SERVICES).unwrap().layout;
        assert!(matches!(
            plan(
                map_names::SERVICES,
                shape(HASH, 8, 1, 0),
                None,
                shape(HASH, 16, 1, 1),
                &services
            ),
            PinnedMapPlan::Fresh { .. }
        ));
    }

    #[test]
    fn a_layout_below_the_floor_or_without_a_key_field_is_inconvertible() {
        let ours = ct();
        let mut newer = ours;
        newer.version = ours.version + 1;
        assert_eq!(
            inconvertible(&newer, &ours),
            None,
            "a described newer layout converts"
        );
        newer.floor = newer.version;
        assert!(inconvertible(&newer, &ours).unwrap().contains("floor"));
        let mut keyless = ours;
        keyless.version = ours.version + 1;
        let i = keyless
            .fields()
            .iter()
            .position(|f| f.part == PART_KEY && f.name() == b"dport")
            .unwrap();
        keyless.fields[i].name = [0; common::layout::FIELD_NAME_BYTES];
        keyless.fields[i].name[..5].copy_from_slice(b"dport");
        keyless.fields[i].name[0] = b'x';
        assert!(inconvertible(&keyless, &ours)
            .unwrap()
            .contains("key field dport"));
        let s = shape(LRU_HASH, 40, 65_536, 0);
        assert!(matches!(
            plan(map_names::CT, s, Some(keyless), s, &ours),
            PinnedMapPlan::Unreadable { .. }
        ));
    }
}
