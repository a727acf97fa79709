//! The inspection commands (`dp service list`, `dp backend list`,
//! `dp ct list|flush`, `dp stats`) read the maps the agent pinned under
//! `--bpffs`, not the agent: they work while it is down, and name things
//! from `DP_NAMES`, which the agent keeps current.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use aya::maps::{HashMap, LpmTrie, Map, MapData, PerCpuArray};
use common::{
    addr::ip_of,
    ct::{CT_DIR_REPLY, CT_FLAG_SNAT, CT_STATE_CLOSED, CT_STATE_CLOSING, CT_STATE_ESTABLISHED},
    lb::SOURCE_RANGE_PREFIX_BASE,
    map_names,
    names::{NameKey, NameValue, NAME_KIND_BACKEND, NAME_KIND_SERVICE},
    AffinityKey, AffinityValue, Backend, CtEntry, CtKey, Hook, Reason, ReasonCounter, ServiceKey,
    ServiceValue, SourceRangeKey,
};
use serde::Serialize;

use crate::{
    error::{Error, Result},
    kernel::{
        maps::{monotonic_ns, programmed_services},
        pin,
    },
    translate::protocol_name,
};

/// dp's maps, opened from their pins.
pub struct PinnedMaps {
    config: aya::maps::Array<MapData, common::DatapathConfig>,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
    ct: HashMap<MapData, CtKey, CtEntry>,
    names: HashMap<MapData, NameKey, NameValue>,
    counters: PerCpuArray<MapData, ReasonCounter>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    members: HashMap<MapData, common::MemberKey, u8>,
}

fn open(bpffs: &Path, name: &'static str) -> Result<MapData> {
    let path = pin::maps_dir(bpffs).join(name);
    MapData::from_pin(&path).map_err(|source| Error::Map { name, source })
}

fn typed<T: TryFrom<Map, Error = aya::maps::MapError>>(name: &'static str, map: Map) -> Result<T> {
    T::try_from(map).map_err(|source| Error::Map { name, source })
}

/// Fails when one of `names` is pinned in another layout version than
/// this dp reads (an agent of another version pinned it).
fn check_layouts(maps_dir: &Path, names: &[&'static str]) -> Result<()> {
    use crate::kernel::upgrade;
    let recorded = upgrade::read_layouts(maps_dir)?;
    for &name in names {
        let Some(found) = upgrade::find(name, maps_dir.join(name), recorded.as_ref()) else {
            continue;
        };
        let ours = common::layout::version_of(name).unwrap_or(0);
        if found.layout.map(|l| l.version) != Some(ours) {
            return Err(Error::OtherLayout {
                name,
                pinned: found.layout.map_or("an unknown version".to_string(), |l| {
                    format!("version {}", l.version)
                }),
                ours,
            });
        }
    }
    Ok(())
}

impl PinnedMaps {
    /// The maps the agent pinned under `bpffs` (`pin::find_state`).
    pub fn open(bpffs: &Path) -> Result<Self> {
        use map_names::*;
        let bpffs = &pin::find_state(bpffs)?;
        check_layouts(
            &pin::maps_dir(bpffs),
            &[
                CONFIG,
                SERVICES,
                BACKENDS,
                CT,
                NAMES,
                COUNTERS,
                SOURCE_RANGES,
                AFFINITY,
            ],
        )?;
        Ok(PinnedMaps {
            config: typed(CONFIG, Map::Array(open(bpffs, CONFIG)?))?,
            services: typed(SERVICES, Map::HashMap(open(bpffs, SERVICES)?))?,
            backends: typed(BACKENDS, Map::HashMap(open(bpffs, BACKENDS)?))?,
            ct: typed(CT, Map::LruHashMap(open(bpffs, CT)?))?,
            names: typed(NAMES, Map::HashMap(open(bpffs, NAMES)?))?,
            counters: typed(COUNTERS, Map::PerCpuArray(open(bpffs, COUNTERS)?))?,
            source_ranges: typed(SOURCE_RANGES, Map::LpmTrie(open(bpffs, SOURCE_RANGES)?))?,
            affinity: typed(AFFINITY, Map::LruHashMap(open(bpffs, AFFINITY)?))?,
            members: typed(MEMBERS, Map::HashMap(open(bpffs, MEMBERS)?))?,
        })
    }

    fn name(&self, kind: u32, id: u32) -> Option<String> {
        let v = self.names.get(&NameKey { kind, id }, 0).ok()?;
        Some(String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    pub fn services(&self) -> Result<Vec<ServiceRow>> {
        let programmed = programmed_services(&self.services, &self.backends)?;
        let backend = |id: u32| BackendRef {
            id,
            addr: programmed.backends.get(&id).map(|b| b.0),
            name: self.name(NAME_KIND_BACKEND, id),
        };
        Ok(programmed
            .frontends
            .iter()
            .map(|(f, (service_id, slots))| ServiceRow {
                frontend: format!("{}/{}", f.addr, protocol_name(f.protocol)),
                service_id: *service_id,
                name: self.name(NAME_KIND_SERVICE, *service_id),
                local_only: slots.local_only,
                external: slots.external,
                affinity_seconds: slots.affinity_seconds,
                ready: slots.ready.iter().map(|id| backend(*id)).collect(),
                terminating: slots.terminating.iter().map(|id| backend(*id)).collect(),
                from_inside: slots.internal.as_ref().map(|(ready, terminating)| {
                    (
                        ready.iter().map(|id| backend(*id)).collect(),
                        terminating.iter().map(|id| backend(*id)).collect(),
                    )
                }),
            })
            .collect())
    }

    pub fn backends(&self) -> Result<Vec<BackendRow>> {
        let programmed = programmed_services(&self.services, &self.backends)?;
        Ok(programmed
            .backends
            .iter()
            .map(|(id, (addr, protocol, terminating))| BackendRow {
                id: *id,
                addr: format!("{addr}/{}", protocol_name(*protocol)),
                terminating: *terminating,
                name: self.name(NAME_KIND_BACKEND, *id),
            })
            .collect())
    }

    /// Conntrack entries matching `filter` (live and not yet collected).
    pub fn conntrack(&self, filter: &CtFilter) -> Result<Vec<CtRow>> {
        let now = monotonic_ns();
        let mut rows = Vec::new();
        for item in self.ct.iter() {
            let (k, e) = match item {
                Ok(kv) => kv,
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(source) => {
                    return Err(Error::Map {
                        name: map_names::CT,
                        source,
                    })
                }
            };
            let row = CtRow {
                direction: if e.direction == CT_DIR_REPLY {
                    "reply"
                } else {
                    "original"
                },
                protocol: protocol_name(k.protocol),
                src: SocketAddr::new(ip_of(&k.saddr), k.sport).to_string(),
                dst: SocketAddr::new(ip_of(&k.daddr), k.dport).to_string(),
                service_id: e.service_id,
                service: self.name(NAME_KIND_SERVICE, e.service_id),
                backend_id: e.backend_id,
                backend: self.name(NAME_KIND_BACKEND, e.backend_id),
                state: match e.state {
                    CT_STATE_ESTABLISHED => "established",
                    CT_STATE_CLOSING => "closing",
                    CT_STATE_CLOSED => "closed",
                    _ => "new",
                },
                masqueraded: e.flags & CT_FLAG_SNAT != 0,
                expires_in_s: (e.expires_ns.saturating_sub(now) / 1_000_000_000) as i64
                    * if e.expires_ns > now { 1 } else { -1 },
                key: k,
            };
            if filter.matches(&row, &k, &e) {
                rows.push(row);
            }
        }
        rows.sort_by(|a, b| (&a.src, &a.dst, a.direction).cmp(&(&b.src, &b.dst, b.direction)));
        Ok(rows)
    }

    /// Deletes the conntrack entries matching `filter`; returns how many.
    pub fn flush_conntrack(&mut self, filter: &CtFilter) -> Result<usize> {
        let keys: Vec<CtKey> = self.conntrack(filter)?.iter().map(|r| r.key).collect();
        let mut n = 0;
        for k in keys {
            if self.ct.remove(&k).is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Packets and bytes per (hook, reason), summed over CPUs.
    pub fn stats(&self) -> Result<Vec<StatsRow>> {
        let mut rows = Vec::new();
        for hook in Hook::ALL {
            for reason in Reason::ALL {
                let per_cpu = self
                    .counters
                    .get(&common::counter_index(hook, reason), 0)
                    .map_err(|source| Error::Map {
                        name: map_names::COUNTERS,
                        source,
                    })?;
                let (packets, bytes) = per_cpu
                    .iter()
                    .fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes));
                if packets > 0 {
                    rows.push(StatsRow {
                        hook: hook.name(),
                        reason: reason.id(),
                        packets,
                        bytes,
                    });
                }
            }
        }
        Ok(rows)
    }
}

/// `dp status`: the agent's health, what is attached, how full the maps are.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// `/healthz` status code, or why it could not be asked.
    pub agent_health: String,
    /// Pinned links: `<device>@<hook>`.
    pub attached: Vec<String>,
    pub maps: Vec<MapFill>,
    /// The running kernel's release, and whether dp supports it.
    pub kernel: String,
    pub kernel_supported: bool,
    /// The node's reverse-path and local-source sysctls (dp needs none
    /// relaxed).
    pub sysctls: crate::kernel::host::Sysctls,
    /// The layout version of each pinned map and of this dp's.
    pub layouts: Vec<LayoutRow>,
    /// Old maps of a migration that did not finish are still pinned
    /// (`<bpffs>/previous/`): the next agent start converts from them.
    pub unfinished_migration: bool,
}

/// One pinned map's layout in `dp status`.
#[derive(Clone, Debug, Serialize)]
pub struct LayoutRow {
    pub name: &'static str,
    /// As recorded in `DP_LAYOUTS` (or version 1 for state pinned before
    /// it); none when not known.
    pub pinned_version: Option<u32>,
    /// This dp's (`common::layout::versions`).
    pub this_dp: u32,
    /// `same`, `convertible` (an agent of this dp converts it at start) or
    /// `unreadable: <why>` (connection state: the agent fails static;
    /// other maps: it starts them empty).
    pub state: String,
}

/// The layout of each map pinned in `maps_dir`, against this dp's.
fn layouts(maps_dir: &Path) -> Vec<LayoutRow> {
    use crate::kernel::{layout, upgrade};
    let recorded = match upgrade::read_layouts(maps_dir) {
        Ok(r) => r,
        Err(e) => {
            return vec![LayoutRow {
                name: map_names::LAYOUTS,
                pinned_version: None,
                this_dp: 0,
                state: format!("unreadable: {e}"),
            }]
        }
    };
    crate::kernel::loader::PINNED_MAPS
        .iter()
        .filter_map(|&name| {
            let found = upgrade::find(name, maps_dir.join(name), recorded.as_ref())?;
            let ours = common::layout::describe(name)?.layout;
            let state = match found.layout {
                None => "unreadable: its layout is not known".to_string(),
                Some(l) if l.version == ours.version => "same".to_string(),
                Some(l) => match layout::inconvertible(&l, &ours) {
                    None => "convertible".to_string(),
                    Some(why) => format!("unreadable: {why}"),
                },
            };
            Some(LayoutRow {
                name,
                pinned_version: found.layout.map(|l| l.version),
                this_dp: ours.version,
                state,
            })
        })
        .collect()
}

/// One pinned map in `dp status`: its definition, how full it is and the
/// kernel memory it takes.
#[derive(Clone, Debug, Serialize)]
pub struct MapFill {
    pub name: &'static str,
    /// The kernel's name of its type: `hash`, `lru_hash`, `array`,
    /// `percpu_array`, `lpm_trie`, `ringbuf`.
    pub map_type: String,
    /// Entries allocated as they are added (`BPF_F_NO_PREALLOC`): the map
    /// costs what it holds, not its capacity.
    pub allocated_on_use: bool,
    /// Entries it holds; arrays are always full; none for a ring buffer.
    pub entries: Option<u64>,
    /// Its capacity (a ring buffer's: bytes).
    pub max_entries: u32,
    /// Kernel memory it takes (`memlock` in its fdinfo), in bytes.
    pub memory_bytes: u64,
}

/// The kernel's name of map type `t` (`bpf_map_type`) for the types dp uses.
fn map_type_name(t: u32) -> String {
    match t {
        1 => "hash".into(),
        2 => "array".into(),
        6 => "percpu_array".into(),
        9 => "lru_hash".into(),
        11 => "lpm_trie".into(),
        27 => "ringbuf".into(),
        other => format!("type {other}"),
    }
}

/// What `dp status` says about the map pinned at `path`. Read through the
/// raw definition (key size from the kernel), so a map of another layout
/// than this dp's (an older agent's) is shown too.
fn map_fill(name: &'static str, path: &Path) -> Result<MapFill> {
    use std::os::fd::{AsFd, AsRawFd};
    let map_err = |source| Error::Map { name, source };
    let info = aya::maps::MapInfo::from_pin(path).map_err(map_err)?;
    let data = MapData::from_pin(path).map_err(map_err)?;
    let fd = data.fd().as_fd();
    let map_type = info.map_type().map_or(u32::MAX, |t| t as u32);
    let entries = match map_type_name(map_type).as_str() {
        "array" | "percpu_array" => Some(u64::from(info.max_entries())),
        "ringbuf" => None,
        _ => Some(
            count_keys(fd, info.key_size() as usize).map_err(|source| Error::Io {
                context: format!("counting the entries of {name}"),
                source,
            })?,
        ),
    };
    let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
        .unwrap_or_default();
    let memory_bytes = fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Ok(MapFill {
        name,
        map_type: map_type_name(map_type),
        allocated_on_use: info.map_flags() & common::map_sizes::BPF_F_NO_PREALLOC != 0,
        entries,
        max_entries: info.max_entries(),
        memory_bytes,
    })
}

/// Keys in the map `fd` (keys of `key_size` bytes), by
/// `BPF_MAP_GET_NEXT_KEY`.
fn count_keys(fd: std::os::fd::BorrowedFd<'_>, key_size: usize) -> std::io::Result<u64> {
    let map = crate::kernel::rawmap::RawMap::new(fd, key_size as u32, 0);
    let mut key: Option<Vec<u8>> = None;
    let mut count = 0u64;
    loop {
        let mut next = vec![0u8; key_size];
        if !map.next_key(key.as_deref(), &mut next)? {
            return Ok(count);
        }
        count += 1;
        key = Some(next);
    }
}

/// The status, from the pins under `bpffs` and the agent's health address.
pub fn status(bpffs: &Path, healthz: SocketAddr) -> Result<Status> {
    let bpffs = &pin::find_state(bpffs)?;
    let mut attached: Vec<String> = std::fs::read_dir(pin::links_dir(bpffs))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    attached.sort();
    let maps = crate::kernel::loader::PINNED_MAPS
        .iter()
        .map(|&name| (name, pin::maps_dir(bpffs).join(name)))
        .filter(|(_, path)| path.exists())
        .map(|(name, path)| map_fill(name, &path))
        .collect::<Result<Vec<_>>>()?;
    let kernel = crate::kernel::host::kernel_release();
    let maps_dir = pin::maps_dir(bpffs);
    let unfinished_migration = std::fs::read_dir(crate::kernel::upgrade::previous_dir(&maps_dir))
        .is_ok_and(|mut d| d.next().is_some());
    Ok(Status {
        layouts: layouts(&maps_dir),
        unfinished_migration,
        agent_health: health(healthz),
        attached,
        maps,
        kernel_supported: common::kernel::check(&kernel).is_ok(),
        kernel,
        sysctls: crate::kernel::host::Sysctls::read(),
    })
}

/// `GET /healthz` on the agent: the status code, or the error.
fn health(addr: SocketAddr) -> String {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(2);
    let answer = (|| -> std::io::Result<String> {
        let mut conn = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        conn.set_read_timeout(Some(timeout))?;
        conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: dp\r\n\r\n")?;
        let mut response = String::new();
        conn.read_to_string(&mut response)?;
        Ok(response
            .split_whitespace()
            .nth(1)
            .unwrap_or("no answer")
            .to_string())
    })();
    answer.unwrap_or_else(|e| format!("unreachable ({e})"))
}

/// What `dp explain` says the datapath will do with a packet.
#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    /// `forward`, `reject`, `drop` or `pass`.
    pub verdict: &'static str,
    /// The reason's id, as in counters and traces.
    pub reason: &'static str,
    /// `namespace/name:port-name` (or `namespace/name`), if a service.
    pub service: Option<String>,
    /// Every `ip:port` the packet may be sent to (one if conntrack pins it).
    pub backends: Vec<String>,
    /// The source will be SNATed to the node address.
    pub masquerade: bool,
    /// The client is one of the possible backends (hairpin: masqueraded
    /// when it picks itself).
    pub hairpin_possible: bool,
    /// Where the decision is made: `socket` (the agent's socket hooks
    /// translate a connect() or sendto() from this source once, no packet
    /// is translated) or `tc` (every packet, at the node's and pods'
    /// devices).
    pub path: &'static str,
}

impl PinnedMaps {
    /// Walks the maps the way a packet from `from` to `to` would go, at tc
    /// ingress (pod or node device), without sending one.
    pub fn explain(
        &self,
        from: IpAddr,
        from_port: Option<u16>,
        to: SocketAddr,
        protocol: u8,
    ) -> Result<Explanation> {
        use common::addr::addr16;
        use common::{
            lb::SCOPE_INTERNAL,
            rules::{self, Frontend, Origin},
            Verdict,
        };
        let cfg = self.config.get(&0, 0).map_err(|source| Error::Map {
            name: map_names::CONFIG,
            source,
        })?;
        let programmed = programmed_services(&self.services, &self.backends)?;
        let backend_addr = |id: u32| programmed.backends.get(&id).map(|b| b.0.to_string());
        let spn = |id: u32| {
            self.name(NAME_KIND_SERVICE, id).map(|n| {
                crate::translate::labels::split_service_label(&n)
                    .0
                    .to_string()
            })
        };
        let mut out = Explanation {
            verdict: "pass",
            reason: Reason::NoService.id(),
            service: None,
            backends: vec![],
            masquerade: false,
            hairpin_possible: false,
            path: "tc",
        };
        // Which sockets the agent's socket hooks serve: the node's own
        // (a source that is one of its addresses), with `all` pods' too.
        let local = local_addresses();
        let socket_host =
            cfg.flags & common::config::CONFIG_SOCKET_LB_HOST != 0 && local.contains(&from);
        let socket_pod = cfg.flags & common::config::CONFIG_SOCKET_LB_ALL != 0
            && !local.contains(&from)
            && Origin::of(&cfg, &addr16(from), false).from_pod;
        // A tracked flow decides first.
        if let Some(sport) = from_port {
            let key = CtKey {
                saddr: addr16(from),
                daddr: addr16(to.ip()),
                sport,
                dport: to.port(),
                protocol,
                _pad: [0; 3],
            };
            if let Ok(e) = self.ct.get(&key, 0) {
                if rules::ct_live(&e, monotonic_ns()) && e.direction != CT_DIR_REPLY {
                    out.service = spn(e.service_id);
                    out.masquerade = e.flags & CT_FLAG_SNAT != 0;
                    match backend_addr(e.backend_id) {
                        Some(b) => {
                            out.verdict = "forward";
                            out.reason = Reason::Established.id();
                            out.backends = vec![b];
                            return Ok(out);
                        }
                        None if rules::resets_when_backend_gone(protocol) => {
                            out.verdict = "reject";
                            out.reason = Reason::BackendGoneReset.id();
                            return Ok(out);
                        }
                        // UDP: moved to a live backend, chosen as for a new flow.
                        None => {}
                    }
                }
            }
        }
        // A new flow: the datapath's rules (`common::rules`), on the pinned maps.
        let master_key = ServiceKey::master(addr16(to.ip()), to.port(), protocol);
        let wildcard = self.services.get(&ServiceKey::wildcard(addr16(to.ip())), 0);
        let lookup = || self.services.get(&master_key, 0).ok();
        let mut m = match rules::frontend(wildcard.ok().map(|w| w.flags), lookup) {
            Frontend::Found(m) => m,
            Frontend::NotAService if rules::unallocated_cluster_ip(&cfg, &addr16(to.ip())) => {
                out.verdict = "drop";
                out.reason = Reason::UnallocatedClusterIp.id();
                return Ok(out);
            }
            Frontend::NotAService => return Ok(out),
            Frontend::PortNotServed => {
                out.verdict = "reject";
                out.reason = Reason::PortNotServed.id();
                if socket_host || socket_pod {
                    out.path = "socket";
                }
                return Ok(out);
            }
        };
        out.service = spn(m.service_id);
        // This node to its own address goes over `lo`, where no program
        // runs: the node's stack answers (a reset), not the service;
        // unless the socket hooks translate it first.
        if local.contains(&from) && local.contains(&to.ip()) && !socket_host {
            out.verdict = "pass";
            out.reason = Reason::NodeToOwnAddress.id();
            return Ok(out);
        }
        let from16 = addr16(from);
        // The socket hooks leave frontends with source ranges to tc.
        let source_ranges = rules::source_ranges_apply(&m);
        if source_ranges && !self.source_allowed(m.service_id, from)? {
            out.verdict = "drop";
            out.reason = Reason::SourceRangeDenied.id();
            return Ok(out);
        }
        // `dp explain` has no hook: a host source is taken as the node's
        // address arriving, not a local process at tc egress.
        let mut origin = Origin::of(&cfg, &from16, false);
        // The socket hooks take any local source as the host (127.0.0.1,
        // another of its addresses), as kube-proxy's rules for local
        // traffic do.
        origin.from_host |= socket_host;
        let frontend_flags = m.flags;
        let frontend = crate::translate::sync::Frontend { addr: to, protocol };
        let slots = programmed
            .frontends
            .get(&frontend)
            .map(|(_, s)| s.clone())
            .unwrap_or_default();
        let internal = rules::internal_scope(&m, origin);
        let (ready, terminating) = if internal {
            m = self
                .services
                .get(&master_key.with_scope(SCOPE_INTERNAL), 0)
                .map_err(|source| Error::Map {
                    name: map_names::SERVICES,
                    source,
                })?;
            slots.internal.clone().unwrap_or_default()
        } else {
            (slots.ready.clone(), slots.terminating.clone())
        };
        let eligible = match rules::eligible(&m) {
            Some(e) if e.terminating => &terminating,
            Some(_) => &ready,
            None => &Vec::new(),
        };
        out.backends = eligible.iter().filter_map(|id| backend_addr(*id)).collect();
        let remembered = rules::has_affinity(&m)
            .then(|| self.affinity_backend(&m, from16, internal))
            .flatten()
            .and_then(backend_addr);
        if let Some(addr) = remembered {
            out.verdict = "forward";
            out.reason = Reason::NewFlowAffinity.id();
            out.backends = vec![addr];
        } else if out.backends.is_empty() {
            let (verdict, reason) = rules::no_endpoints(&m);
            out.verdict = if verdict == Verdict::Drop {
                "drop"
            } else {
                // Refused at connect() by the socket hooks (a drop is
                // tc's), unless they leave the frontend to tc anyway.
                let pod_masqueraded = rules::masquerade(&cfg, frontend_flags, origin, false, false);
                if !source_ranges && (socket_host || (socket_pod && !pod_masqueraded)) {
                    out.path = "socket";
                }
                "reject"
            };
            out.reason = reason.id();
            return Ok(out);
        } else {
            out.verdict = "forward";
            out.reason = Reason::NewFlow.id();
        }
        out.hairpin_possible = eligible
            .iter()
            .filter_map(|id| programmed.backends.get(id))
            .any(|b| b.0.ip() == from);
        // Over the backends the flow may get: hairpin if the only one is
        // the client, to this node if all are the node itself.
        let to_this_node = eligible
            .iter()
            .filter_map(|id| programmed.backends.get(id))
            .all(|b| rules::reaches_this_node(&cfg, &addr16(b.0.ip()), origin));
        let hairpin = out.hairpin_possible && out.backends.len() == 1;
        out.masquerade = rules::masquerade(&cfg, frontend_flags, origin, hairpin, to_this_node);
        // The socket hooks serve the node's own flows, and a pod's unless
        // kube-proxy would masquerade it (a pod that picks itself, the
        // hairpin case, is left to tc too: see `hairpin_possible`).
        let pod_masqueraded = rules::masquerade(&cfg, frontend_flags, origin, false, false);
        if !source_ranges && (socket_host || (socket_pod && !pod_masqueraded)) {
            out.path = "socket";
        }
        Ok(out)
    }

    /// Service id -> its `loadBalancerSourceRanges` as `a.b.c.d/len`.
    pub fn source_ranges(&self) -> Result<BTreeMap<u32, Vec<String>>> {
        Ok(crate::kernel::maps::source_ranges_in(&self.source_ranges)?
            .into_iter()
            .map(|(id, v)| (id, v.iter().map(|(a, l)| format!("{a}/{l}")).collect()))
            .collect())
    }

    /// Whether `from` is in the service's `loadBalancerSourceRanges`.
    fn source_allowed(&self, service_id: u32, from: IpAddr) -> Result<bool> {
        let key = aya::maps::lpm_trie::Key::new(
            SOURCE_RANGE_PREFIX_BASE + 128,
            SourceRangeKey {
                service_id_be: service_id.to_be(),
                addr: common::addr::addr16(from),
            },
        );
        Ok(self.source_ranges.get(&key, 0).is_ok())
    }

    /// The backend session affinity pins this client to, if the record
    /// holds (`rules::affinity_backend`, as the datapath decides).
    fn affinity_backend(&self, m: &ServiceValue, client: [u8; 16], internal: bool) -> Option<u32> {
        let key = AffinityKey {
            client,
            service_id: m.service_id,
        };
        let v = self.affinity.get(&key, 0).ok()?;
        let member = |backend_id| {
            let key = common::MemberKey {
                service_id: m.service_id,
                backend_id,
            };
            self.members.get(&key, 0).ok()
        };
        let backend = |id| self.backends.get(&id, 0).ok();
        common::rules::affinity_backend(m, &v, monotonic_ns(), internal, member, backend)
            .map(|_| v.backend_id)
    }
}

/// The addresses of this network namespace's interfaces (where `dp
/// explain` runs: the node).
fn local_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below; each entry's address
    // is read only when present and of its family.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return out;
        }
        let mut entry = list;
        while !entry.is_null() {
            let a = (*entry).ifa_addr;
            if !a.is_null() && i32::from((*a).sa_family) == libc::AF_INET {
                let sin = &*(a as *const libc::sockaddr_in);
                out.push(IpAddr::V4(std::net::Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))));
            } else if !a.is_null() && i32::from((*a).sa_family) == libc::AF_INET6 {
                let sin6 = &*(a as *const libc::sockaddr_in6);
                out.push(IpAddr::V6(std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
            }
            entry = (*entry).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    out
}

/// `--service NS/NAME` and `--ip IP` of the conntrack commands.
#[derive(Clone, Debug, Default)]
pub struct CtFilter {
    pub service: Option<String>,
    pub ip: Option<IpAddr>,
}

impl CtFilter {
    fn matches(&self, row: &CtRow, k: &CtKey, e: &CtEntry) -> bool {
        let service_ok = self.service.as_ref().is_none_or(|want| {
            row.service.as_deref().is_some_and(|name| {
                name == want
                    || name.starts_with(&format!("{want}:"))
                    || name.starts_with(&format!("{want} "))
            })
        });
        let ip_ok = self.ip.is_none_or(|ip| {
            [ip_of(&k.saddr), ip_of(&k.daddr)].contains(&ip)
                || (e.flags & CT_FLAG_SNAT != 0 && ip_of(&e.nat_addr) == ip)
        });
        service_ok && ip_ok
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct BackendRef {
    pub id: u32,
    pub addr: Option<SocketAddr>,
    pub name: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServiceRow {
    pub frontend: String,
    pub service_id: u32,
    pub name: Option<String>,
    pub local_only: bool,
    /// NodePort, externalIP or LoadBalancer (not a ClusterIP).
    pub external: bool,
    /// `sessionAffinity: ClientIP` timeout, seconds.
    pub affinity_seconds: Option<u32>,
    pub ready: Vec<BackendRef>,
    pub terminating: Vec<BackendRef>,
    /// eTP=Local: the backends traffic from pods and the node itself uses
    /// (ready, terminating).
    pub from_inside: Option<(Vec<BackendRef>, Vec<BackendRef>)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BackendRow {
    pub id: u32,
    pub addr: String,
    pub terminating: bool,
    pub name: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CtRow {
    pub direction: &'static str,
    pub protocol: &'static str,
    pub src: String,
    pub dst: String,
    pub service_id: u32,
    pub service: Option<String>,
    pub backend_id: u32,
    pub backend: Option<String>,
    pub state: &'static str,
    pub masqueraded: bool,
    /// Seconds to expiry; negative once expired (the GC has not run yet).
    pub expires_in_s: i64,
    #[serde(skip)]
    pub key: CtKey,
}

#[derive(Clone, Debug, Serialize)]
pub struct StatsRow {
    pub hook: &'static str,
    pub reason: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

/// Text tables for people.
pub mod text {
    use super::*;

    fn backends(list: &[BackendRef]) -> String {
        if list.is_empty() {
            return "-".into();
        }
        list.iter()
            .map(|b| {
                let addr = b
                    .addr
                    .map_or_else(|| format!("#{}", b.id), |a| a.to_string());
                match &b.name {
                    Some(n) => format!("{addr} ({n})"),
                    None => addr,
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn services(rows: &[ServiceRow]) -> String {
        let mut out = String::new();
        for r in rows {
            let name = r.name.as_deref().unwrap_or("?");
            let mut tags = String::new();
            if r.local_only {
                tags.push_str(" [traffic policy Local]");
            }
            if let Some(t) = r.affinity_seconds {
                tags.push_str(&format!(" [affinity ClientIP {t}s]"));
            }
            out.push_str(&format!(
                "{} service {} {name}{tags}\n",
                r.frontend, r.service_id
            ));
            out.push_str(&format!("    ready:       {}\n", backends(&r.ready)));
            out.push_str(&format!("    terminating: {}\n", backends(&r.terminating)));
            if let Some((ready, terminating)) = &r.from_inside {
                out.push_str(&format!(
                    "    from pods and this node: ready {}; terminating {}\n",
                    backends(ready),
                    backends(terminating)
                ));
            }
        }
        out
    }

    pub fn backends_table(rows: &[BackendRow]) -> String {
        let mut by_id: BTreeMap<u32, &BackendRow> = BTreeMap::new();
        for r in rows {
            by_id.insert(r.id, r);
        }
        by_id
            .values()
            .map(|r| {
                format!(
                    "{:>6} {:<24} {}{}\n",
                    r.id,
                    r.addr,
                    r.name.as_deref().unwrap_or("-"),
                    if r.terminating { " [terminating]" } else { "" }
                )
            })
            .collect()
    }

    pub fn conntrack(rows: &[CtRow]) -> String {
        rows.iter()
            .map(|r| {
                format!(
                    "{:<8} {} {} -> {} {} service {} backend {} {}expires in {}s\n",
                    r.direction,
                    r.protocol,
                    r.src,
                    r.dst,
                    r.state,
                    r.service.as_deref().unwrap_or("?"),
                    r.backend.as_deref().unwrap_or("?"),
                    if r.masqueraded { "masqueraded " } else { "" },
                    r.expires_in_s
                )
            })
            .collect()
    }

    pub fn status(s: &Status) -> String {
        let mut out = format!("agent health: {}\n", s.agent_health);
        out.push_str(&format!(
            "attached:     {}\n",
            if s.attached.is_empty() {
                "-".to_string()
            } else {
                s.attached.join(", ")
            }
        ));
        out.push_str(&format!(
            "{:<20} {:<26} {:>9} {:>10} {:>10}  {}\n",
            "map", "type", "entries", "max", "memory", "layout (pinned, this dp)"
        ));
        for m in &s.maps {
            let kind = if m.allocated_on_use {
                format!("{} (allocated on use)", m.map_type)
            } else {
                m.map_type.clone()
            };
            let entries = m.entries.map_or("-".to_string(), |n| n.to_string());
            let layout = s
                .layouts
                .iter()
                .find(|l| l.name == m.name)
                .map_or("-".to_string(), |l| {
                    let pinned = l
                        .pinned_version
                        .map_or("?".to_string(), |v| format!("v{v}"));
                    format!("{pinned}, v{}", l.this_dp)
                });
            out.push_str(&format!(
                "{:<20} {kind:<26} {entries:>9} {:>10} {:>10}  {layout}\n",
                m.name,
                m.max_entries,
                memory(m.memory_bytes)
            ));
        }
        let total: u64 = s.maps.iter().map(|m| m.memory_bytes).sum();
        out.push_str(&format!("maps' kernel memory: {}\n", memory(total)));
        let kernel = match common::kernel::check(&s.kernel) {
            Ok(()) => format!("{} (supported)", s.kernel),
            Err(e) => e.to_string(),
        };
        out.push_str(&format!("kernel:       {kernel}\n"));
        out.push_str(&format!("sysctls:      {}\n", s.sysctls.describe()));
        let differing: Vec<String> = s
            .layouts
            .iter()
            .filter(|l| l.state != "same")
            .map(|l| {
                let pinned = l.pinned_version.map_or("?".to_string(), |v| v.to_string());
                format!(
                    "{} v{pinned} (this dp: v{}, {})",
                    l.name, l.this_dp, l.state
                )
            })
            .collect();
        let layout = if differing.is_empty() {
            format!(
                "every pinned map at this dp's version ({} maps)",
                s.layouts.len()
            )
        } else {
            differing.join("; ")
        };
        out.push_str(&format!("layouts:      {layout}\n"));
        if s.unfinished_migration {
            out.push_str("migration:    not finished (old maps pinned in previous/); the next agent start completes it\n");
        }
        out
    }

    /// `bytes` in KiB below a MiB, else in MiB.
    fn memory(bytes: u64) -> String {
        if bytes < 1 << 20 {
            format!("{:.0} KiB", bytes as f64 / 1024.0)
        } else {
            format!("{:.1} MiB", bytes as f64 / 1_048_576.0)
        }
    }

    pub fn explanation(e: &Explanation) -> String {
        let mut out = format!("{}: {}\n", e.verdict, e.reason);
        if let Some(s) = &e.service {
            out.push_str(&format!("service:    {s}\n"));
        }
        if !e.backends.is_empty() {
            out.push_str(&format!("backends:   {}\n", e.backends.join(", ")));
        }
        out.push_str(&format!("masquerade: {}\n", e.masquerade));
        if e.hairpin_possible {
            out.push_str("hairpin:    the client is one of the backends\n");
        }
        out.push_str(match e.path {
            "socket" => {
                "path:       socket (translated once at connect()/sendto(), no packet translated)\n"
            }
            _ => "path:       tc (every packet, at the devices)\n",
        });
        out
    }

    pub fn stats(rows: &[StatsRow]) -> String {
        let mut out = format!(
            "{:<13} {:<24} {:>12} {:>14}\n",
            "hook", "reason", "packets", "bytes"
        );
        for r in rows {
            out.push_str(&format!(
                "{:<13} {:<24} {:>12} {:>14}\n",
                r.hook, r.reason, r.packets, r.bytes
            ));
        }
        out
    }
}
