//! Carrying a pinned map's entries into a new map of another layout or
//! capacity (`kernel::layout` decides when), field by field.
//!
//! An upgrade (or rollback, or resize) runs in two passes around the swap
//! of the programs on the links:
//!
//! 1. before: the old maps' pins move to `<bpffs>/previous/`, the new maps
//!    are created and pinned in `<bpffs>/maps/`, and every entry is
//!    converted into them; the old programs keep serving from the old maps
//!    meanwhile;
//! 2. after the swap (`Datapath::finish_migration`): the connection state
//!    the old programs added or refreshed since pass 1 is converted again
//!    (an entry the new map lacks is added; one it has is replaced when the
//!    old copy is more recent), then the old pins are removed.
//!
//! An agent that stops between the two finds `previous/` and converts from
//! it again (and from the half-filled new map), so a crash in the middle
//! loses nothing the old maps held.

use std::{io, os::fd::AsFd, path::PathBuf};

use aya::maps::MapData;
use common::layout::{MapLayout, PART_KEY};

use super::rawmap::{RawMap, BPF_NOEXIST};

/// Copies between two layouts: (part, offset in the old, offset in the new,
/// size) for each field both have.
pub struct Converter {
    copies: Vec<(u8, usize, usize, usize)>,
    key_size: usize,
    value_size: usize,
    to_recency: Option<(usize, usize)>,
}

fn recency_of(layout: &MapLayout) -> Option<(usize, usize)> {
    layout
        .recency()
        .filter(|f| f.size <= 8)
        .map(|f| (f.offset as usize, f.size as usize))
}

fn read_uint(bytes: &[u8], (offset, size): (usize, usize)) -> u64 {
    let mut b = [0u8; 8];
    b[..size].copy_from_slice(&bytes[offset..offset + size]);
    u64::from_ne_bytes(b)
}

impl Converter {
    /// The converter from `from` to `to` (which `layout::inconvertible`
    /// accepted).
    pub fn new(from: &MapLayout, to: &MapLayout) -> Self {
        let copies = to
            .fields()
            .iter()
            .filter(|f| !f.is_padding())
            .filter_map(|f| {
                let g = from.field(f.part, f.name())?;
                (g.size == f.size).then_some((
                    f.part,
                    g.offset as usize,
                    f.offset as usize,
                    f.size as usize,
                ))
            })
            .collect();
        Converter {
            copies,
            key_size: to.key_size as usize,
            value_size: to.value_size as usize,
            to_recency: recency_of(to),
        }
    }

    /// One entry of the old layout in the new one.
    pub fn convert(&self, key: &[u8], value: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let mut k = vec![0u8; self.key_size];
        let mut v = vec![0u8; self.value_size];
        for &(part, from, to, size) in &self.copies {
            let (src, dst) = if part == PART_KEY {
                (key, &mut k)
            } else {
                (value, &mut v)
            };
            if from + size <= src.len() && to + size <= dst.len() {
                dst[to..to + size].copy_from_slice(&src[from..from + size]);
            }
        }
        (k, v)
    }

    /// The age of a converted entry, if its layout has one.
    pub fn new_recency(&self, value: &[u8]) -> Option<u64> {
        self.to_recency.map(|r| read_uint(value, r))
    }
}

/// How a map takes entries, for `fill`.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub max_entries: u32,
    /// An LRU map with one list per CPU (`BPF_F_NO_COMMON_LRU`): an insert
    /// takes a free entry from the inserting CPU's list only, so the
    /// entries are inserted from every online CPU in turn.
    pub per_cpu_lru: bool,
    /// An array: keys are indices below `max_entries`.
    pub array: bool,
}

/// Writes `entries` (in the new layout) into the new map `map`. When more
/// than it holds, the most recently used (by `last_used` of key and
/// value) are kept. Returns how many were written.
pub fn fill(
    map: RawMap<'_>,
    target: Target,
    mut entries: Vec<(Vec<u8>, Vec<u8>)>,
    last_used: impl Fn(&[u8], &[u8]) -> u64,
) -> io::Result<usize> {
    // Most recent first; the least recent are the ones cut.
    entries.sort_by_key(|(k, v)| std::cmp::Reverse(last_used(k, v)));
    if target.array {
        entries.retain(|(k, _)| {
            k.get(..4)
                .is_some_and(|i| u32::from_ne_bytes(i.try_into().unwrap()) < target.max_entries)
        });
    }
    if !target.per_cpu_lru {
        entries.truncate(target.max_entries as usize);
        // Least recent first: an LRU map that evicts early evicts those.
        for (k, v) in entries.iter().rev() {
            map.update(k, v, 0)?;
        }
        return Ok(entries.len());
    }
    let online = aya::util::online_cpus().map_err(|(_, e)| e)?;
    let possible = aya::util::nr_cpus().map_err(|(_, e)| e)?.max(1);
    let per_cpu = (target.max_entries as usize / possible).max(1);
    entries.truncate(per_cpu * online.len());
    let mut shares: Vec<Vec<&(Vec<u8>, Vec<u8>)>> = vec![Vec::new(); online.len()];
    for (i, e) in entries.iter().enumerate() {
        shares[i % online.len()].push(e);
    }
    std::thread::scope(|scope| {
        let workers: Vec<_> = online
            .iter()
            .zip(shares)
            .map(|(&cpu, share)| {
                scope.spawn(move || -> io::Result<()> {
                    pin_to_cpu(cpu)?;
                    for (k, v) in share.into_iter().rev() {
                        map.update(k, v, 0)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| io::Error::other("an insert thread panicked"))??;
        }
        Ok::<(), io::Error>(())
    })?;
    Ok(entries.len())
}

/// Runs the calling thread on `cpu` only.
fn pin_to_cpu(cpu: u32) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET stays in bounds
    // for cpu < CPU_SETSIZE (checked); pid 0 is the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu as usize >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::other(format!("CPU {cpu} beyond CPU_SETSIZE")));
        }
        libc::CPU_SET(cpu as usize, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Pass 2: the entries of `old` (converted) used at or after `since`
/// (pass 1's start, by `last_used` of the converted key and value) that
/// `new` lacks, or holds in a less recent copy, written into `new`. Older
/// entries were dealt with by pass 1 (carried over, or cut from a smaller
/// map). Returns how many.
pub fn merge(
    old: RawMap<'_>,
    converter: &Converter,
    new: RawMap<'_>,
    since: u64,
    last_used: impl Fn(&[u8], &[u8]) -> u64,
) -> io::Result<usize> {
    let mut written = 0;
    let mut current = vec![0u8; new.value_size];
    for (k, v) in old.entries()? {
        let (k, v) = converter.convert(&k, &v);
        if last_used(&k, &v) < since {
            continue;
        }
        let flags = if !new.lookup(&k, &mut current)? {
            // NOEXIST: a packet may have added it since.
            BPF_NOEXIST
        } else if last_used(&k, &v) > last_used(&k, &current) {
            0
        } else {
            continue;
        };
        match new.update(&k, &v, flags) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            r => {
                r?;
                written += 1;
            }
        }
    }
    Ok(written)
}

/// An old map whose entries are being carried over, until the migration
/// finishes.
pub struct OldMap {
    pub layout: MapLayout,
    pub map: MapData,
    /// Its pin under `previous/` (removed when the migration finishes).
    pub pin: Option<PathBuf>,
}

impl OldMap {
    pub fn raw(&self) -> RawMap<'_> {
        RawMap::new(
            self.map.fd().as_fd(),
            self.layout.key_size,
            self.layout.value_size,
        )
    }
}

/// A map made anew, with the maps it was made from.
pub struct Migrated {
    pub name: &'static str,
    pub sources: Vec<OldMap>,
    pub why: String,
    /// CLOCK_MONOTONIC when pass 1 read the old maps.
    pub converted_at_ns: u64,
}

#[cfg(test)]
mod tests {
    use common::{layout::describe, map_names, CtEntry, CtKey};

    use super::*;

    #[test]
    fn identical_layouts_copy_every_field_but_padding() {
        let ct = describe(map_names::CT).unwrap().layout;
        let c = Converter::new(&ct, &ct);
        let key = CtKey {
            saddr: [1; 16],
            daddr: [2; 16],
            sport: 3,
            dport: 4,
            protocol: 6,
            _pad: [9; 3],
        };
        let entry = CtEntry {
            expires_ns: 77,
            backend_id: 5,
            nat_port: 8,
            state: 1,
            ..CtEntry::default()
        };
        let (k, v) = c.convert(bytemuck::bytes_of(&key), bytemuck::bytes_of(&entry));
        let key_out: CtKey = bytemuck::pod_read_unaligned(&k);
        assert_eq!(
            key_out,
            CtKey {
                _pad: [0; 3],
                ..key
            }
        );
        assert_eq!(bytemuck::pod_read_unaligned::<CtEntry>(&v), entry);
        assert_eq!(
            c.new_recency(&v),
            Some(77),
            "expires_ns is the recency field"
        );
    }

    #[test]
    fn fields_are_matched_by_name_across_orders() {
        use bytemuck::Zeroable;
        use common::layout::{FieldLayout, MapLayout, MAX_FIELDS, PART_VALUE};
        let field = |name: &str, offset: u16, size: u16, part: u8| {
            let mut f = FieldLayout::zeroed();
            f.name[..name.len()].copy_from_slice(name.as_bytes());
            f.offset = offset;
            f.size = size;
            f.part = part;
            f
        };
        let layout = |version, value_size, fields: &[FieldLayout]| {
            let mut l = MapLayout {
                version,
                floor: 1,
                key_size: 4,
                value_size,
                field_count: fields.len() as u32,
                _reserved: [0; 3],
                fields: [FieldLayout::zeroed(); MAX_FIELDS],
            };
            l.fields[..fields.len()].copy_from_slice(fields);
            l
        };
        // v1: a@0 (4), b@4 (8). v2: new@0 (8), b@8 (8), a@16 (4).
        let v1 = layout(
            1,
            12,
            &[
                field("id", 0, 4, PART_KEY),
                field("a", 0, 4, PART_VALUE),
                field("b", 4, 8, PART_VALUE),
            ],
        );
        let v2 = layout(
            2,
            20,
            &[
                field("id", 0, 4, PART_KEY),
                field("new", 0, 8, PART_VALUE),
                field("b", 8, 8, PART_VALUE),
                field("a", 16, 4, PART_VALUE),
            ],
        );
        let mut old = vec![0u8; 12];
        old[..4].copy_from_slice(&7u32.to_ne_bytes());
        old[4..].copy_from_slice(&9u64.to_ne_bytes());
        let (k, v) = Converter::new(&v1, &v2).convert(&5u32.to_ne_bytes(), &old);
        assert_eq!(k, 5u32.to_ne_bytes());
        assert_eq!(&v[..8], &[0; 8], "a field v1 lacks starts at zero");
        assert_eq!(&v[8..16], &9u64.to_ne_bytes());
        assert_eq!(&v[16..], &7u32.to_ne_bytes());
        // And back: the field v1 lacks is dropped.
        let (_, back) = Converter::new(&v2, &v1).convert(&k, &v);
        assert_eq!(back, old);
    }
}
