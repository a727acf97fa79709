//! Layout versions of the pinned maps, and the self-description an agent
//! pins next to them (`DP_LAYOUTS`) so that another dp (newer or older) can
//! carry their entries over field by field.
//!
//! Every pinned map has a version (`version_of`), bumped by any change to
//! its key, value, type or meaning. `describe` lists the fields of its key
//! and value by name, offset and size. An agent that finds a map of another
//! version (or capacity) makes a new one and converts each entry by field
//! name: a field both layouts have is copied, a field only the new one has
//! starts at zero, a field only the old one has is dropped. So:
//!
//! - a new field must mean "not known" when zero, or be marked
//!   `FIELD_REQUIRED` (then no layout without it can be converted);
//! - a field whose meaning changes gets a new name;
//! - a change that no renaming can describe raises the layout's `floor`
//!   (the lowest version it converts from or to).
//!
//! `DP_LAYOUTS` itself never changes: its key and value are frozen here.
//! The test `controller/tests/layouts.rs` fails when a type changes without
//! a version bump (it compares every description with
//! `common/layouts.lock`).

use bytemuck::{Pod, Zeroable};

use crate::map_names;

/// `FieldLayout::part`.
pub const PART_KEY: u8 = 0;
pub const PART_VALUE: u8 = 1;

/// `FieldLayout::flags`: a layout without this field cannot be converted
/// into one with it (zero is not a valid "not known").
pub const FIELD_REQUIRED: u8 = 1 << 0;
/// `FieldLayout::flags`: the entry's age (larger is more recent): when a
/// map shrinks, the most recent entries are kept; when entries are carried
/// over twice, the more recent copy wins.
pub const FIELD_RECENCY: u8 = 1 << 1;

/// Bytes of a field name (a path such as `ct_timeouts.tcp_syn`).
pub const FIELD_NAME_BYTES: usize = 24;
/// Fields of a key and value together.
pub const MAX_FIELDS: usize = 32;

/// One field of a map's key or value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct FieldLayout {
    /// NUL-padded UTF-8.
    pub name: [u8; FIELD_NAME_BYTES],
    pub offset: u16,
    pub size: u16,
    /// `PART_KEY` or `PART_VALUE`.
    pub part: u8,
    /// `FIELD_*` bits.
    pub flags: u8,
    pub _pad: [u8; 2],
}

impl FieldLayout {
    pub fn name(&self) -> &[u8] {
        let n = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(FIELD_NAME_BYTES);
        &self.name[..n]
    }

    /// Padding: never carried over.
    pub fn is_padding(&self) -> bool {
        self.name().first() == Some(&b'_')
    }
}

/// Key of `DP_LAYOUTS`: a pinned map, by name and kernel id (a map being
/// replaced and its replacement are both described while both exist).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct LayoutKey {
    /// The map's name, NUL-padded (names fit 15 bytes).
    pub name: [u8; 16],
    pub map_id: u32,
}

impl LayoutKey {
    pub fn new(name: &str, map_id: u32) -> Self {
        let mut key = LayoutKey {
            name: [0; 16],
            map_id,
        };
        let n = name.len().min(15);
        key.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        key
    }

    pub fn name(&self) -> &[u8] {
        let n = self.name.iter().position(|&b| b == 0).unwrap_or(16);
        &self.name[..n]
    }
}

/// Value of `DP_LAYOUTS`: what the map's entries look like.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct MapLayout {
    pub version: u32,
    /// The lowest version this layout can be converted from or to.
    pub floor: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub field_count: u32,
    pub _reserved: [u32; 3],
    pub fields: [FieldLayout; MAX_FIELDS],
}

impl MapLayout {
    pub fn fields(&self) -> &[FieldLayout] {
        &self.fields[..(self.field_count as usize).min(MAX_FIELDS)]
    }

    pub fn field(&self, part: u8, name: &[u8]) -> Option<&FieldLayout> {
        self.fields()
            .iter()
            .find(|f| f.part == part && f.name() == name)
    }

    /// The field marked `FIELD_RECENCY`, if any.
    pub fn recency(&self) -> Option<&FieldLayout> {
        self.fields().iter().find(|f| f.flags & FIELD_RECENCY != 0)
    }
}

/// Capacity of `DP_LAYOUTS`: two entries per pinned map (old and new during
/// a migration), with room to spare.
pub const LAYOUTS_MAX_ENTRIES: u32 = 128;

/// Layout versions of the pinned maps. Bump on any change to a map's key,
/// value, type or meaning (and record it: `UPDATE_LAYOUTS=1 cargo test -p
/// dp --test layouts`).
pub mod versions {
    pub const SERVICES: u32 = 1;
    pub const BACKENDS: u32 = 1;
    pub const REVNAT: u32 = 1;
    /// Version 2 exists only in the `layout-next` build (the upgrade and
    /// rollback tests' other dp).
    pub const CT: u32 = if cfg!(feature = "layout-next") { 2 } else { 1 };
    /// 2: the reply rate limit (`reply_rate_per_s`, `reply_burst`; zero
    /// means the defaults, so a version 1 configuration converts).
    /// 3: the IPv6 node address and cluster CIDR (`node_ip6`,
    /// `cluster_cidr6`, `cluster_cidr6_len`; zero means not set).
    pub const CONFIG: u32 = 3;
    /// 2: a block of reasons for the socket hook (`Hook::SockConnect4`),
    /// four blocks instead of three. 3: one for `Hook::SockConnect6`.
    /// 4: two more, `Hook::SockSendmsg4` and `Hook::SockSendmsg6`.
    /// Counters start empty when their map is replaced (`starts_empty`),
    /// so nothing converts.
    pub const COUNTERS: u32 = 4;
    pub const TRACE_SESSIONS: u32 = 1;
    /// 2: `l4_off` (was padding; zero means not known). 3: `pid_tgid`,
    /// `comm` and `netns_cookie` of socket hook events (32 bytes more).
    /// 4: those three moved after `headers`, out of tc's per-packet reset.
    pub const TRACE_RING: u32 = 4;
    pub const TRACE_LOST: u32 = 1;
    /// 2: `TraceEvent::l4_off` (was padding; zero means not known). 3:
    /// `pid_tgid`, `comm`, `netns_cookie`. 4: those after `headers`.
    /// Starts empty when replaced.
    pub const RECENT: u32 = 4;
    pub const RECENT_HEAD: u32 = 1;
    pub const NAMES: u32 = 1;
    pub const AFFINITY: u32 = 1;
    pub const SOURCE_RANGES: u32 = 1;
    pub const MEMBERS: u32 = 1;
}

/// Builds a `MapLayout` (and the field types, for the lock file).
pub struct Description {
    pub layout: MapLayout,
    pub types: [&'static str; MAX_FIELDS],
}

impl Description {
    fn new(version: u32, key_size: usize, value_size: usize) -> Self {
        Description {
            layout: MapLayout {
                version,
                floor: 1,
                key_size: key_size as u32,
                value_size: value_size as u32,
                field_count: 0,
                _reserved: [0; 3],
                fields: [FieldLayout::zeroed(); MAX_FIELDS],
            },
            types: [""; MAX_FIELDS],
        }
    }

    fn push(&mut self, part: u8, name: &str, offset: usize, size: usize, ty: &'static str) {
        let i = self.layout.field_count as usize;
        assert!(i < MAX_FIELDS, "too many fields");
        let mut f = FieldLayout::zeroed();
        let n = name.len().min(FIELD_NAME_BYTES);
        f.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        f.offset = offset as u16;
        f.size = size as u16;
        f.part = part;
        self.layout.fields[i] = f;
        self.types[i] = ty;
        self.layout.field_count += 1;
    }

    fn flag(&mut self, part: u8, name: &str, flag: u8) {
        let n = self.layout.field_count as usize;
        if let Some(f) = self.layout.fields[..n]
            .iter_mut()
            .find(|f| f.part == part && f.name() == name.as_bytes())
        {
            f.flags |= flag;
        }
    }
}

fn type_name_of<T>(_: &T) -> &'static str {
    core::any::type_name::<T>()
}

/// Pushes the named fields of struct `$t` (paths for nested fields) into
/// description `$d` as part `$part`, with their offsets and sizes.
macro_rules! fields {
    ($d:expr, $part:expr, $t:ty, $prefix:expr, [$($($f:ident).+),* $(,)?]) => {{
        let z: $t = Zeroable::zeroed();
        $(
            $d.push(
                $part,
                concat!($(stringify!($f), "."),+).trim_end_matches('.'),
                $prefix + core::mem::offset_of!($t, $($f).+),
                core::mem::size_of_val(&z.$($f).+),
                type_name_of(&z.$($f).+),
            );
        )*
    }};
}

/// A map keyed by array index or id: one `u32` field.
fn u32_key(d: &mut Description, name: &str) {
    d.push(PART_KEY, name, 0, 4, "u32");
}

/// The fields of a `TraceEvent` (a value of `DP_RECENT`).
fn trace_event(d: &mut Description) {
    use crate::TraceEvent;
    fields!(
        d,
        PART_VALUE,
        TraceEvent,
        0,
        [
            timestamp_ns,
            ifindex,
            packet_len,
            reason,
            hook,
            verdict,
            tcp_flags,
            trace_sessions,
            service_id,
            backend_id,
            original.saddr,
            original.daddr,
            original.sport,
            original.dport,
            original.protocol,
            original.family,
            original._pad,
            translated.saddr,
            translated.daddr,
            translated.sport,
            translated.dport,
            translated.protocol,
            translated.family,
            translated._pad,
            headers_len,
            l4_off,
            sent_ifindex,
            headers,
            pid_tgid,
            comm,
            netns_cookie,
        ]
    );
}

/// The conntrack entry's fields, in its declared order.
#[cfg(not(feature = "layout-next"))]
fn ct_entry(d: &mut Description) {
    use crate::CtEntry;
    fields!(
        d,
        PART_VALUE,
        CtEntry,
        0,
        [expires_ns, backend_id, service_id, nat_addr, nat_port, state, flags, direction, _pad]
    );
}

#[cfg(feature = "layout-next")]
fn ct_entry(d: &mut Description) {
    use crate::CtEntry;
    fields!(
        d,
        PART_VALUE,
        CtEntry,
        0,
        [
            created_ns, backend_id, service_id, expires_ns, nat_addr, nat_port, state, flags,
            direction, _pad
        ]
    );
}

/// The version of pinned map `name` in this dp, if it is one.
pub fn version_of(name: &str) -> Option<u32> {
    describe(name).map(|d| d.layout.version)
}

/// The description of pinned map `name` in this dp.
pub fn describe(name: &str) -> Option<Description> {
    use core::mem::size_of;

    use crate::{
        lb::*,
        names::{NameKey, NameValue},
        CtEntry, CtKey, DatapathConfig, ReasonCounter, TraceEvent, TraceSession,
    };
    let d = match name {
        map_names::SERVICES => {
            let mut d = Description::new(
                versions::SERVICES,
                size_of::<ServiceKey>(),
                size_of::<ServiceValue>(),
            );
            fields!(
                d,
                PART_KEY,
                ServiceKey,
                0,
                [addr, port, protocol, scope, slot, _pad]
            );
            fields!(
                d,
                PART_VALUE,
                ServiceValue,
                0,
                [
                    backend_id,
                    count,
                    terminating_count,
                    service_id,
                    flags,
                    _pad,
                    affinity_timeout_s
                ]
            );
            d
        }
        map_names::BACKENDS => {
            let mut d = Description::new(versions::BACKENDS, 4, size_of::<Backend>());
            u32_key(&mut d, "backend_id");
            fields!(d, PART_VALUE, Backend, 0, [addr, port, protocol, flags]);
            d
        }
        map_names::REVNAT => {
            let mut d = Description::new(versions::REVNAT, 4, size_of::<RevNatValue>());
            u32_key(&mut d, "service_id");
            fields!(d, PART_VALUE, RevNatValue, 0, [addr, port, _pad]);
            d
        }
        map_names::CT => {
            let mut d = Description::new(versions::CT, size_of::<CtKey>(), size_of::<CtEntry>());
            fields!(
                d,
                PART_KEY,
                CtKey,
                0,
                [saddr, daddr, sport, dport, protocol, _pad]
            );
            ct_entry(&mut d);
            d.flag(PART_VALUE, "expires_ns", FIELD_RECENCY);
            d
        }
        map_names::CONFIG => {
            let mut d = Description::new(versions::CONFIG, 4, size_of::<DatapathConfig>());
            u32_key(&mut d, "index");
            fields!(
                d,
                PART_VALUE,
                DatapathConfig,
                0,
                [
                    flags,
                    cluster_cidr_len,
                    _pad,
                    node_ip,
                    cluster_cidr,
                    ct_timeouts.tcp_syn,
                    ct_timeouts.tcp_established,
                    ct_timeouts.tcp_closing,
                    ct_timeouts.udp,
                    ct_timeouts.udp_replied,
                    ct_timeouts._pad,
                    service_cidrs,
                    service_cidr_lens,
                    reply_rate_per_s,
                    reply_burst,
                    node_ip6,
                    cluster_cidr6,
                    cluster_cidr6_len,
                    _pad6
                ]
            );
            d
        }
        map_names::COUNTERS => {
            let mut d = Description::new(versions::COUNTERS, 4, size_of::<ReasonCounter>());
            u32_key(&mut d, "slot");
            fields!(d, PART_VALUE, ReasonCounter, 0, [packets, bytes]);
            d
        }
        map_names::TRACE_SESSIONS => {
            let mut d = Description::new(versions::TRACE_SESSIONS, 4, size_of::<TraceSession>());
            u32_key(&mut d, "slot");
            fields!(
                d,
                PART_VALUE,
                TraceSession,
                0,
                [
                    active,
                    match_flags,
                    owner_pid,
                    ifindex,
                    addr,
                    port,
                    protocol,
                    verdicts,
                    service_count,
                    service_ids,
                    reasons
                ]
            );
            d
        }
        n if map_names::TRACE_RINGS.contains(&n) => {
            // A ring buffer has no key or value: its records are
            // `TraceEvent`s, described here for the lock file.
            let mut d = Description::new(versions::TRACE_RING, 0, 0);
            trace_event(&mut d);
            d
        }
        map_names::TRACE_LOST => {
            let mut d = Description::new(versions::TRACE_LOST, 4, 8);
            u32_key(&mut d, "index");
            d.push(PART_VALUE, "lost", 0, 8, "u64");
            d
        }
        map_names::RECENT => {
            let mut d = Description::new(versions::RECENT, 4, size_of::<TraceEvent>());
            u32_key(&mut d, "index");
            trace_event(&mut d);
            d
        }
        map_names::RECENT_HEAD => {
            let mut d = Description::new(versions::RECENT_HEAD, 4, 4);
            u32_key(&mut d, "index");
            d.push(PART_VALUE, "head", 0, 4, "u32");
            d
        }
        map_names::NAMES => {
            let mut d = Description::new(
                versions::NAMES,
                size_of::<NameKey>(),
                size_of::<NameValue>(),
            );
            fields!(d, PART_KEY, NameKey, 0, [kind, id]);
            fields!(d, PART_VALUE, NameValue, 0, [len, bytes]);
            d
        }
        map_names::AFFINITY => {
            let mut d = Description::new(
                versions::AFFINITY,
                size_of::<AffinityKey>(),
                size_of::<AffinityValue>(),
            );
            fields!(d, PART_KEY, AffinityKey, 0, [client, service_id]);
            fields!(
                d,
                PART_VALUE,
                AffinityValue,
                0,
                [backend_id, _pad, last_used_ns]
            );
            d.flag(PART_VALUE, "last_used_ns", FIELD_RECENCY);
            d
        }
        map_names::MEMBERS => {
            let mut d = Description::new(versions::MEMBERS, size_of::<MemberKey>(), 1);
            fields!(d, PART_KEY, MemberKey, 0, [service_id, backend_id]);
            d.push(PART_VALUE, "member", 0, 1, "u8");
            d
        }
        map_names::SOURCE_RANGES => {
            // An LPM trie's key: the prefix length, then the data.
            let mut d =
                Description::new(versions::SOURCE_RANGES, 4 + size_of::<SourceRangeKey>(), 1);
            d.push(PART_KEY, "prefix_len", 0, 4, "u32");
            fields!(d, PART_KEY, SourceRangeKey, 4, [service_id_be, addr]);
            d.push(PART_VALUE, "allowed", 0, 1, "u8");
            d
        }
        _ => return None,
    };
    Some(d)
}
