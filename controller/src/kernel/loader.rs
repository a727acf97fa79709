//! The dp eBPF object: load, attach, and access its maps.

use std::{collections::BTreeMap, ffi::CString};

use aya::{
    include_bytes_aligned,
    maps::{Array, HashMap as BpfHashMap, Map, MapData, PerCpuArray, RingBuf},
    programs::{
        links::{FdLink, LinkOrder, PinnedLink},
        tc::{
            self, NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions, TcHandle,
        },
        xdp::{XdpLink, XdpLinkId},
        Program, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use common::{
    map_names, program_names, DatapathConfig, DeviceInfo, Hook, Reason, ReasonCounter, TraceSession,
};

use crate::{
    error::{Error, Result},
    kernel::{layout::MapShape, migrate::Migrated, ring::TraceReader, upgrade},
};

/// How many frontends use a service address, and how many of them are
/// ClusterIPs (whose unserved ports are rejected).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddressUse {
    pub frontends: u32,
    pub cluster_ips: u32,
}

/// The object built from `dataplane-ebpf` by `build.rs`.
static DATAPLANE_OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dataplane"));

/// The object `build.rs` embedded is real: with `DP_EBPF_STUB=1` (checking
/// and linting without the eBPF toolchain) it is empty, and loading says so
/// instead of failing on an unparsable ELF.
fn check_object(object: &[u8]) -> Result<()> {
    if object.is_empty() {
        return Err(Error::StubObject);
    }
    Ok(())
}

/// Map capacities chosen at load time (the agent's come from
/// `kernel::sizing` and its flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    pub services: u32,
    pub backends: u32,
    pub revnat: u32,
    pub conntrack: u32,
    pub affinity: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            services: common::map_sizes::SERVICES,
            backends: common::map_sizes::BACKENDS,
            revnat: common::map_sizes::REVNAT,
            conntrack: common::map_sizes::CT,
            affinity: common::map_sizes::AFFINITY,
        }
    }
}

impl MapSizes {
    /// The capacity set here for map `name`, if it is one of these.
    pub fn max_entries(&self, name: &str) -> Option<u32> {
        match name {
            map_names::SERVICES => Some(self.services),
            map_names::BACKENDS => Some(self.backends),
            map_names::REVNAT => Some(self.revnat),
            map_names::CT => Some(self.conntrack),
            map_names::AFFINITY => Some(self.affinity),
            // One (service, backend) pair per backend slot: as many as the
            // service map holds at most. Sized with it: a fixed size made
            // a large service map's backends fail to write.
            map_names::MEMBERS => Some(self.services),
            _ => None,
        }
    }
}

/// How the tc programs are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcAttach {
    /// tcx bpf links (Linux 6.6 and newer): pinned, and swapped atomically
    /// to a new agent's programs.
    Tcx,
    /// Netlink tc filters (`bpf` in direct-action mode on a `clsact` qdisc,
    /// at `NETLINK_PRIORITY`/`NETLINK_HANDLE`), for older kernels. Not
    /// pinnable: a new agent replaces the filter in place (one netlink
    /// request, never a moment without a program), and the program is
    /// pinned where a tcx link would be so the tools see it.
    Netlink,
}

/// The tc filter priority and handle dp's netlink filters use.
pub const NETLINK_PRIORITY: u16 = 1;
pub const NETLINK_HANDLE: u16 = 0xd9;

/// Environment variable naming the tc attachment (`tcx` or `netlink`);
/// `auto` or unset: what the kernel offers.
pub const TC_ATTACH_ENV: &str = "DP_TC_ATTACH";

impl TcAttach {
    /// What kernel `release` offers: tcx from 6.6 on.
    pub fn for_kernel(release: &str) -> Self {
        if common::kernel::has_tcx(release) {
            TcAttach::Tcx
        } else {
            TcAttach::Netlink
        }
    }

    /// `DP_TC_ATTACH` if it names a mode, else what the running kernel offers.
    pub fn from_env_or_kernel() -> Self {
        std::env::var(TC_ATTACH_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| Self::for_kernel(&crate::kernel::host::kernel_release()))
    }

    pub fn name(self) -> &'static str {
        match self {
            TcAttach::Tcx => "tcx",
            TcAttach::Netlink => "netlink",
        }
    }
}

impl std::str::FromStr for TcAttach {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "tcx" => Ok(TcAttach::Tcx),
            "netlink" => Ok(TcAttach::Netlink),
            other => Err(format!("{other:?}: tcx or netlink")),
        }
    }
}

fn netlink_options() -> TcAttachOptions {
    TcAttachOptions::Netlink(NlOptions {
        priority: NETLINK_PRIORITY,
        handle: TcHandle::new(0, NETLINK_HANDLE),
        ..NlOptions::default()
    })
}

/// Adds the `clsact` qdisc netlink filters need; one that is there already
/// is fine (a failure that matters shows in the attach that follows).
fn ensure_clsact(ifname: &str) {
    let _ = tc::qdisc_add_clsact(ifname);
}

/// Removes dp's netlink tc filters from the devices named by the tc pins
/// under `bpffs` (`<device>@tc-ingress|egress`), in the calling thread's
/// network namespace: `dp cleanup`, run on the node. Devices without such
/// a filter (tcx mode) are left as they are. Returns what it removed.
pub fn detach_netlink_filters(bpffs: &std::path::Path) -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(crate::kernel::pin::links_dir(bpffs)) else {
        return removed;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let (device, hook) = match name.rsplit_once('@') {
            Some((d, "tc-ingress")) => (d, Hook::TcIngress),
            Some((d, "tc-egress")) => (d, Hook::TcEgress),
            _ => continue,
        };
        let (Some(program), Some(attach_type)) = (tc_program_name(hook), tc_attach_type(hook))
        else {
            continue;
        };
        if tc::qdisc_detach_program(device, attach_type, program).is_ok() {
            removed.push(name);
        }
    }
    removed
}

fn tc_attach_type(hook: Hook) -> Option<TcAttachType> {
    match hook {
        Hook::TcIngress => Some(TcAttachType::Ingress),
        Hook::TcEgress => Some(TcAttachType::Egress),
        Hook::Xdp
        | Hook::SockConnect4
        | Hook::SockConnect6
        | Hook::SockSendmsg4
        | Hook::SockSendmsg6 => None,
    }
}

/// A loaded dp object: its programs (verified, not yet attached) and maps.
///
/// Attachments are tcx/XDP links owned by this value: dropping it (or
/// [`Datapath::detach_all`]) detaches every program.
pub struct Datapath {
    ebpf: Ebpf,
    attachments: Vec<Attachment>,
    /// ifindex -> name of the interfaces this datapath is attached to, in the
    /// namespace it attached in (for rendering trace events).
    interfaces: BTreeMap<u32, String>,
    /// Frontends per service address: the wildcard entry lives while any
    /// exists, and rejects unserved ports while a ClusterIP one does.
    pub(crate) service_addresses: BTreeMap<[u8; 16], AddressUse>,
    /// Service id -> the source ranges written for it in `DP_SRC_RANGES`.
    pub(crate) source_ranges: BTreeMap<u32, Vec<(std::net::IpAddr, u8)>>,
    /// Service id -> the backend ids written for it in `DP_MEMBERS`.
    pub(crate) members: BTreeMap<u32, crate::kernel::maps::Members>,
    tc_attach: TcAttach,
    /// `remove_backend` keeps the entry, flagged `BACKEND_FLAG_RETIRED`,
    /// for a collector to delete once conntrack no longer names it.
    pub(crate) retire_removed_backends: bool,
    /// Maps converted at load whose old versions still feed the old
    /// programs until the swap (`finish_migration`).
    migrated: Vec<Migrated>,
    maps_dir: Option<std::path::PathBuf>,
    /// What `DP_PREFILTER`'s frontend words hold (this datapath's own map,
    /// created empty; only userspace writes them): a bit already set costs
    /// no syscall (`kernel::prefilter`).
    pub(crate) prefilter: Vec<u64>,
}

enum Attachment {
    Tc(&'static str, SchedClassifierLinkId),
    /// A netlink tc filter, with the network namespace it was attached in:
    /// it is deleted by ifindex, which means something only there.
    TcNetlink(&'static str, SchedClassifierLinkId, std::os::fd::OwnedFd),
    Xdp(XdpLinkId),
    /// A link pinned in bpffs: it outlives this process (`dp cleanup` removes it).
    Pinned(#[allow(dead_code)] FdLink),
}

/// Whether pinned maps are compared with this dp's definitions.
#[derive(Clone, Copy)]
enum PinnedMaps {
    Checked,
    AsIs,
}

/// What this dp would create for each pinned map: the object's
/// definitions with `sizes` applied.
pub fn wanted_shapes(sizes: &MapSizes) -> Result<BTreeMap<&'static str, MapShape>> {
    let object =
        aya_obj::Object::parse(DATAPLANE_OBJECT).map_err(|e| Error::Object(e.to_string()))?;
    PINNED_MAPS
        .iter()
        .map(|&name| {
            let m = object.maps.get(name).ok_or(Error::MissingMap(name))?;
            let shape = MapShape {
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries: sizes.max_entries(name).unwrap_or(m.max_entries()),
                flags: m.map_flags(),
            };
            Ok((name, shape))
        })
        .collect()
}

/// Maps kept in bpffs, so a restarted agent (and the inspection commands)
/// find the same state. Scratch maps are private to each program version.
pub const PINNED_MAPS: [&str; 18] = [
    map_names::SERVICES,
    map_names::BACKENDS,
    map_names::REVNAT,
    map_names::CT,
    map_names::CONFIG,
    map_names::COUNTERS,
    map_names::TRACE_SESSIONS,
    map_names::TRACE_RINGS[0],
    map_names::TRACE_RINGS[1],
    map_names::TRACE_RINGS[2],
    map_names::TRACE_RINGS[3],
    map_names::TRACE_LOST,
    map_names::RECENT,
    map_names::RECENT_HEAD,
    map_names::NAMES,
    map_names::AFFINITY,
    map_names::SOURCE_RANGES,
    map_names::MEMBERS,
];

impl Datapath {
    /// Loads the embedded object and its programs into the kernel, with the
    /// default map sizes and configuration.
    pub fn load() -> Result<Self> {
        Self::load_with(MapSizes::default())
    }

    /// Loads with the given map capacities.
    pub fn load_with(sizes: MapSizes) -> Result<Self> {
        Self::load_inner(sizes, None)
    }

    /// Loads with the state maps pinned in `maps_dir` (on a bpffs): maps
    /// already pinned there are reused with their contents (a restarted
    /// agent adopts them), missing ones are created and pinned.
    pub fn load_pinned(maps_dir: &std::path::Path, sizes: MapSizes) -> Result<Self> {
        Self::load_inner(sizes, Some((maps_dir, PinnedMaps::Checked)))
    }

    /// `load_pinned`, adopting every map pinned in `maps_dir` as it is,
    /// without comparing it with this dp's definition (`kernel::layout`):
    /// for tests that stand a map of their own in for one of dp's.
    pub fn load_pinned_as_is(maps_dir: &std::path::Path, sizes: MapSizes) -> Result<Self> {
        Self::load_inner(sizes, Some((maps_dir, PinnedMaps::AsIs)))
    }

    fn load_inner(
        sizes: MapSizes,
        pinned_maps: Option<(&std::path::Path, PinnedMaps)>,
    ) -> Result<Self> {
        let maps_dir = pinned_maps.map(|(dir, _)| dir);
        if let Some(dir) = maps_dir {
            std::fs::create_dir_all(dir).map_err(|source| Error::Io {
                context: format!("create {}", dir.display()),
                source,
            })?;
        }
        check_object(DATAPLANE_OBJECT)?;
        let mut loader = EbpfLoader::new();
        for name in [
            map_names::SERVICES,
            map_names::BACKENDS,
            map_names::REVNAT,
            map_names::CT,
            map_names::AFFINITY,
            map_names::MEMBERS,
        ] {
            if let Some(max) = sizes.max_entries(name) {
                loader.map_max_entries(name, max);
            }
        }
        // Pinned maps of another layout or size are dealt with before aya
        // reuses them by name (it does not compare definitions).
        let prepared = match pinned_maps {
            Some((dir, PinnedMaps::Checked)) => {
                Some(upgrade::prepare(dir, &wanted_shapes(&sizes)?)?)
            }
            _ => None,
        };
        if let Some(dir) = maps_dir {
            for name in PINNED_MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        // Conntrack timeouts and the rest start from the documented
        // defaults unless a configuration was adopted or carried over.
        let pinned = match &prepared {
            Some(p) => p.config_carried,
            None => maps_dir.is_some_and(|d| d.join(map_names::CONFIG).exists()),
        };
        let mut ebpf = loader.load(DATAPLANE_OBJECT)?;
        let migrated = match (prepared, maps_dir) {
            (Some(p), Some(dir)) => upgrade::after_load(&ebpf, dir, &PINNED_MAPS, p)?,
            _ => Vec::new(),
        };
        load_programs(&mut ebpf)?;
        let mut datapath = Datapath {
            ebpf,
            attachments: Vec::new(),
            interfaces: BTreeMap::new(),
            service_addresses: BTreeMap::new(),
            source_ranges: BTreeMap::new(),
            members: BTreeMap::new(),
            tc_attach: TcAttach::from_env_or_kernel(),
            retire_removed_backends: false,
            migrated,
            maps_dir: maps_dir.map(|d| d.to_path_buf()),
            prefilter: vec![0; common::prefilter::FRONTEND_WORDS as usize],
        };
        if !pinned {
            datapath.set_config(DatapathConfig::default())?;
        }
        Ok(datapath)
    }

    /// Completes a migration begun at load (`kernel::upgrade`), once the
    /// programs are swapped onto every link: the connection state the old
    /// programs wrote meanwhile is carried over and the old maps unpinned.
    /// Returns the names of the maps that were converted.
    pub fn finish_migration(&mut self) -> Result<Vec<&'static str>> {
        let migrated = std::mem::take(&mut self.migrated);
        let names = migrated.iter().map(|m| m.name).collect();
        if let Some(dir) = &self.maps_dir {
            upgrade::finish(&self.ebpf, dir, migrated)?;
        }
        Ok(names)
    }

    /// How this datapath attaches its tc programs (by default `DP_TC_ATTACH`,
    /// else what the kernel offers).
    pub fn tc_attach(&self) -> TcAttach {
        self.tc_attach
    }

    pub fn set_tc_attach(&mut self, mode: TcAttach) {
        self.tc_attach = mode;
    }

    /// With `on`, a removed backend stays in `DP_BACKENDS`, retired, until
    /// the conntrack collector (`agent::ct_gc`) finds no entry naming it:
    /// meanwhile a client's reset of one of its flows is passed on to it.
    /// Only with a collector running: nothing else deletes retired entries.
    pub fn retire_removed_backends(&mut self, on: bool) {
        self.retire_removed_backends = on;
    }

    /// Attaches the tc program for `hook` (ingress or egress) to `ifname` in
    /// the calling thread's network namespace: as the last tcx program, or
    /// as dp's netlink filter (`TcAttach`).
    pub fn attach_tc(&mut self, ifname: &str, hook: Hook) -> Result<()> {
        let Some(name) = tc_program_name(hook) else {
            return self.attach_xdp(ifname);
        };
        self.attach_tc_program(name, ifname, hook)
    }

    /// Attaches `dp_tc_noop` (returns `TC_ACT_OK`, nothing else) where
    /// `attach_tc` would attach dp's program for `hook`: the benchmarks'
    /// floor of what any tc program on the path costs.
    pub fn attach_noop_tc(&mut self, ifname: &str, hook: Hook) -> Result<()> {
        self.attach_tc_program(program_names::TC_NOOP, ifname, hook)
    }

    fn attach_tc_program(&mut self, name: &'static str, ifname: &str, hook: Hook) -> Result<()> {
        let Some(attach_type) = tc_attach_type(hook) else {
            return Err(Error::NotTcHook(hook));
        };
        let ifindex = ifindex(ifname)?;
        let options = match self.tc_attach {
            TcAttach::Tcx => TcAttachOptions::TcxOrder(LinkOrder::default()),
            TcAttach::Netlink => {
                ensure_clsact(ifname);
                netlink_options()
            }
        };
        let link = tc_program_mut(&mut self.ebpf, name)?
            .attach_with_options(ifname, attach_type, options)
            .map_err(|source| Error::Program { name, source })?;
        let attachment = match self.tc_attach {
            TcAttach::Tcx => Attachment::Tc(name, link),
            TcAttach::Netlink => Attachment::TcNetlink(name, link, current_netns()?),
        };
        self.attachments.push(attachment);
        self.note_interface(ifindex, ifname)
    }

    /// Attaches the XDP program to `ifname` (driver mode where the device
    /// supports it, generic otherwise) in the calling thread's namespace.
    pub fn attach_xdp(&mut self, ifname: &str) -> Result<()> {
        let ifindex = ifindex(ifname)?;
        let link = xdp_program_mut(&mut self.ebpf)?
            .attach_to_if_index(ifindex, XdpMode::default())
            .map_err(|source| Error::Program {
                name: program_names::XDP,
                source,
            })?;
        self.attachments.push(Attachment::Xdp(link));
        self.note_interface(ifindex, ifname)
    }

    /// Attaches the tc program for `hook` to `ifname` through a link pinned
    /// at `pin`: an existing pinned link (left by an earlier agent) gets the
    /// new program atomically, without a moment unattached; otherwise a new
    /// link is attached and pinned. The link outlives this process.
    pub fn attach_tc_pinned(
        &mut self,
        ifname: &str,
        hook: Hook,
        pin: &std::path::Path,
    ) -> Result<()> {
        let (Some(name), Some(attach_type)) = (tc_program_name(hook), tc_attach_type(hook)) else {
            return self.attach_xdp_pinned(ifname, pin);
        };
        if self.tc_attach == TcAttach::Netlink {
            return self.attach_netlink_pinned(ifname, name, attach_type, pin);
        }
        let ifindex = ifindex(ifname)?;
        let prog = tc_program_mut(&mut self.ebpf, name)?;
        let program_err = |source| Error::Program { name, source };
        let adopted = adopt_link(pin)
            .and_then(|fd| {
                // Not a tcx link (a program pinned by an agent in netlink
                // mode): this pin is to be replaced.
                SchedClassifierLink::try_from(fd)
                    .inspect_err(|_| {
                        let _ = std::fs::remove_file(pin);
                    })
                    .ok()
            })
            .and_then(|link| swap_or_forget(prog.attach_to_link(link), pin));
        let id = match adopted {
            Some(id) => id,
            None => prog
                .attach_with_options(
                    ifname,
                    attach_type,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(program_err)?,
        };
        let link = prog.take_link(id).map_err(program_err)?;
        let fd = FdLink::try_from(link).map_err(|e| pin_err(pin, e))?;
        self.keep_pinned(fd, pin, ifindex, ifname)
    }

    /// `attach_tc_pinned` with a netlink filter: an existing dp filter on
    /// the device (an earlier agent's) gets the new program in place, by its
    /// priority and handle; otherwise one is created. The filter outlives
    /// this process; the program is pinned at `pin`, where a tcx link would
    /// be, so `dp status` lists it and `dp cleanup` finds it.
    fn attach_netlink_pinned(
        &mut self,
        ifname: &str,
        name: &'static str,
        attach_type: TcAttachType,
        pin: &std::path::Path,
    ) -> Result<()> {
        let ifindex = ifindex(ifname)?;
        ensure_clsact(ifname);
        let prog = tc_program_mut(&mut self.ebpf, name)?;
        let program_err = |source| Error::Program { name, source };
        let handle = TcHandle::new(0, NETLINK_HANDLE);
        let replaced =
            SchedClassifierLink::attached(ifname, attach_type, NETLINK_PRIORITY, handle, None)
                .ok()
                .and_then(|existing| prog.attach_to_link(existing).ok());
        let id = match replaced {
            Some(id) => id,
            None => prog
                .attach_with_options(ifname, attach_type, netlink_options())
                .map_err(program_err)?,
        };
        let link = prog.take_link(id).map_err(program_err)?;
        // Dropping the link would delete the filter; like a pinned link, it
        // stays when this process goes.
        std::mem::forget(link);
        let _ = std::fs::remove_file(pin);
        if let Some(dir) = pin.parent() {
            std::fs::create_dir_all(dir).map_err(|e| pin_err(pin, e))?;
        }
        prog.pin(pin).map_err(|e| pin_err(pin, e))?;
        self.note_interface(ifindex, ifname)
    }

    /// Like `attach_tc_pinned`, for the XDP program.
    pub fn attach_xdp_pinned(&mut self, ifname: &str, pin: &std::path::Path) -> Result<()> {
        let ifindex = ifindex(ifname)?;
        let name = program_names::XDP;
        let prog = xdp_program_mut(&mut self.ebpf)?;
        let program_err = |source| Error::Program { name, source };
        let adopted = adopt_link(pin)
            .and_then(|fd| XdpLink::try_from(fd).ok())
            .and_then(|link| swap_or_forget(prog.attach_to_link(link), pin));
        let id = match adopted {
            Some(id) => id,
            None => prog
                .attach_to_if_index(ifindex, XdpMode::default())
                .map_err(program_err)?,
        };
        let link = prog.take_link(id).map_err(program_err)?;
        let fd = FdLink::try_from(link).map_err(|e| pin_err(pin, e))?;
        self.keep_pinned(fd, pin, ifindex, ifname)
    }

    /// Pins `fd` at `pin` unless it is the link already pinned there, and
    /// records the attachment to `ifname`.
    fn keep_pinned(
        &mut self,
        fd: FdLink,
        pin: &std::path::Path,
        ifindex: u32,
        ifname: &str,
    ) -> Result<()> {
        let fd = if pin.exists() {
            fd
        } else {
            if let Some(dir) = pin.parent() {
                std::fs::create_dir_all(dir).map_err(|e| pin_err(pin, e))?;
            }
            FdLink::from(fd.pin(pin).map_err(|e| pin_err(pin, e))?)
        };
        self.attachments.push(Attachment::Pinned(fd));
        self.note_interface(ifindex, ifname)
    }

    /// Records an interface the programs are attached to: its name (for
    /// trace events) and, in `DP_DEVICES`, its MAC address (the datapath
    /// addresses packets it hands to this host through that device's
    /// ingress with it; see `dataplane-ebpf/src/fib.rs`). Called in the
    /// namespace of the interface.
    fn note_interface(&mut self, ifindex: u32, ifname: &str) -> Result<()> {
        let info = DeviceInfo {
            mac: device_mac(ifname)?,
            flags: 0,
            _pad: 0,
        };
        let name = map_names::DEVICES;
        let mut map: BpfHashMap<&mut MapData, u32, DeviceInfo> = self.map_mut(name)?;
        map.insert(ifindex, info, 0)
            .map_err(|source| Error::Map { name, source })?;
        self.interfaces.insert(ifindex, ifname.to_string());
        Ok(())
    }

    /// Marks `ifname` (already attached) as the host side of a pod's veth:
    /// translated packets whose next hop it is go straight into the pod
    /// (`common::device::DEVICE_POD`).
    ///
    /// Only veth (and netkit) devices have a peer to send to; another kind
    /// of pod device is left unmarked (packets to it go through its egress).
    pub fn mark_pod_device(&mut self, ifname: &str) -> Result<()> {
        if !matches!(device_driver(ifname)?.as_str(), "veth" | "netkit") {
            return Ok(());
        }
        let name = map_names::DEVICES;
        let ifindices: Vec<u32> = self
            .interfaces
            .iter()
            .filter(|(_, n)| *n == ifname)
            .map(|(ifindex, _)| *ifindex)
            .collect();
        let mut map: BpfHashMap<&mut MapData, u32, DeviceInfo> = self.map_mut(name)?;
        for ifindex in ifindices {
            let mut info = map
                .get(&ifindex, 0)
                .map_err(|source| Error::Map { name, source })?;
            info.flags |= common::device::DEVICE_POD;
            map.insert(ifindex, info, 0)
                .map_err(|source| Error::Map { name, source })?;
        }
        Ok(())
    }

    /// Forgets an interface that is gone (a deleted pod's veth): its name
    /// and its `DP_DEVICES` entry.
    pub fn forget_interface(&mut self, ifname: &str) -> Result<()> {
        let gone: Vec<u32> = self
            .interfaces
            .iter()
            .filter(|(_, name)| *name == ifname)
            .map(|(ifindex, _)| *ifindex)
            .collect();
        let mut map: BpfHashMap<&mut MapData, u32, DeviceInfo> =
            self.map_mut(map_names::DEVICES)?;
        for ifindex in &gone {
            let _ = map.remove(ifindex);
        }
        for ifindex in gone {
            self.interfaces.remove(&ifindex);
        }
        Ok(())
    }

    /// The `DP_DEVICES` entries: ifindex -> MAC.
    pub fn devices(&self) -> Result<Vec<(u32, [u8; 6])>> {
        let name = map_names::DEVICES;
        let map: BpfHashMap<&MapData, u32, DeviceInfo> = self.map_ref(name)?;
        map.iter()
            .map(|r| {
                r.map(|(k, v)| (k, v.mac))
                    .map_err(|source| Error::Map { name, source })
            })
            .collect()
    }

    /// Detaches every program this datapath attached.
    pub fn detach_all(&mut self) -> Result<()> {
        for attachment in self.attachments.drain(..) {
            match attachment {
                Attachment::Tc(name, link) => tc_program_mut(&mut self.ebpf, name)?
                    .detach(link)
                    .map_err(|source| Error::Program { name, source })?,
                Attachment::TcNetlink(name, link, netns) => {
                    let prog = tc_program_mut(&mut self.ebpf, name)?;
                    in_netns(&netns, || prog.detach(link))?
                        .map_err(|source| Error::Program { name, source })?
                }
                Attachment::Xdp(link) => {
                    xdp_program_mut(&mut self.ebpf)?
                        .detach(link)
                        .map_err(|source| Error::Program {
                            name: program_names::XDP,
                            source,
                        })?
                }
                // Pinned links stay until `dp cleanup` removes their pins.
                Attachment::Pinned(_) => {}
            }
        }
        Ok(())
    }

    /// Kernel ids of the loaded programs (as `bpftool prog show` lists them).
    pub fn program_ids(&self) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for name in [program_names::TC_INGRESS, program_names::TC_EGRESS] {
            let info = tc_program_ref(&self.ebpf, name)?
                .info()
                .map_err(|source| Error::Program { name, source })?;
            ids.push(info.id());
        }
        let info = self
            .xdp_program()?
            .info()
            .map_err(|source| Error::Program {
                name: program_names::XDP,
                source,
            })?;
        ids.push(info.id());
        Ok(ids)
    }

    /// Kernel memory of each map the tc ingress program uses (all of the
    /// datapath's maps), from `memlock` in the map fd's fdinfo, in bytes.
    pub fn map_memory(&self) -> Result<Vec<(String, u64)>> {
        use std::os::fd::{AsFd, AsRawFd};
        let name = program_names::TC_INGRESS;
        let program_err = |source| Error::Program { name, source };
        let info = tc_program_ref(&self.ebpf, name)?
            .info()
            .map_err(program_err)?;
        let ids = info.map_ids().map_err(program_err)?.unwrap_or_default();
        let map_err = |source| Error::Map {
            name: "map info",
            source,
        };
        let mut out = Vec::new();
        for id in ids {
            let map = aya::maps::MapInfo::from_id(id).map_err(map_err)?;
            let fd = map.fd().map_err(map_err)?;
            let raw = fd.as_fd().as_raw_fd();
            let fdinfo =
                std::fs::read_to_string(format!("/proc/self/fdinfo/{raw}")).map_err(|source| {
                    Error::Io {
                        context: "read map fdinfo".into(),
                        source,
                    }
                })?;
            let bytes = fdinfo
                .lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            out.push((map.name_as_str().unwrap_or("?").to_string(), bytes));
        }
        out.sort();
        Ok(out)
    }

    /// Names of the interfaces attached to, by ifindex.
    pub fn interfaces(&self) -> &BTreeMap<u32, String> {
        &self.interfaces
    }

    pub fn config(&self) -> Result<DatapathConfig> {
        let map: Array<&MapData, DatapathConfig> = self.map_ref(map_names::CONFIG)?;
        map.get(&0, 0).map_err(|source| Error::Map {
            name: map_names::CONFIG,
            source,
        })
    }

    pub fn set_config(&mut self, config: DatapathConfig) -> Result<()> {
        let mut map: Array<&mut MapData, DatapathConfig> = self.map_mut(map_names::CONFIG)?;
        map.set(0, config, 0).map_err(|source| Error::Map {
            name: map_names::CONFIG,
            source,
        })
    }

    /// Changes the configuration with `f` (read, modify, write).
    pub fn update_config(&mut self, f: impl FnOnce(&mut DatapathConfig)) -> Result<()> {
        let mut config = self.config()?;
        f(&mut config);
        self.set_config(config)
    }

    /// Sets the node's address of one family (the masquerade source for
    /// that family: `node_ip`'s), kube-proxy's `--cluster-cidr` of that
    /// family (traffic from outside it to a service is masqueraded; a CIDR
    /// of the other family is an error) and `--masquerade-all`. The other
    /// family's settings are left as they are: a dual-stack node calls this
    /// once per family.
    pub fn set_node(
        &mut self,
        node_ip: std::net::IpAddr,
        cluster_cidr: Option<(std::net::IpAddr, u8)>,
        masquerade_all: bool,
    ) -> Result<()> {
        if let Some((net, _)) = cluster_cidr {
            if net.is_ipv4() != node_ip.is_ipv4() {
                return Err(Error::Config(format!(
                    "cluster CIDR {net} is not of node address {node_ip}'s family"
                )));
            }
        }
        self.update_config(|c| {
            let (cidr, len) = match cluster_cidr {
                Some((net, len)) => (
                    common::addr::addr16(net),
                    if net.is_ipv4() { 96 + len } else { len },
                ),
                None => ([0; 16], 0),
            };
            if node_ip.is_ipv4() {
                c.node_ip = common::addr::addr16(node_ip);
                (c.cluster_cidr, c.cluster_cidr_len) = (cidr, len);
            } else {
                c.node_ip6 = common::addr::addr16(node_ip);
                (c.cluster_cidr6, c.cluster_cidr6_len) = (cidr, len);
            }
            if masquerade_all {
                c.flags |= common::config::CONFIG_MASQUERADE_ALL;
            } else {
                c.flags &= !common::config::CONFIG_MASQUERADE_ALL;
            }
        })
    }

    /// Records in the configuration which sockets the socket hooks serve
    /// (for `dp explain`; the programs read `DP_SOCK_SCOPE`).
    pub fn set_socket_lb_flags(&mut self, host: bool, all: bool) -> Result<()> {
        use common::config::{CONFIG_SOCKET_LB_ALL, CONFIG_SOCKET_LB_HOST};
        self.update_config(|c| {
            c.flags &= !(CONFIG_SOCKET_LB_HOST | CONFIG_SOCKET_LB_ALL);
            if host {
                c.flags |= CONFIG_SOCKET_LB_HOST;
            }
            if all {
                c.flags |= CONFIG_SOCKET_LB_ALL;
            }
        })
    }

    /// Limits the replies the datapath builds (ICMP port unreachable, TCP
    /// resets) to `rate_per_s` per CPU (0: no limit) with bursts of `burst`.
    pub fn set_reply_limit(&mut self, rate_per_s: u32, burst: u32) -> Result<()> {
        self.update_config(|c| {
            c.reply_rate_per_s = match rate_per_s {
                0 => common::config::REPLY_RATE_UNLIMITED,
                r => r,
            };
            c.reply_burst = burst.max(1);
        })
    }

    /// Sets the Service CIDRs (IPv4 and IPv6 networks and prefix lengths; at most
    /// `SERVICE_CIDR_SLOTS`, the rest are left out): traffic to an address
    /// in them that no Service has is dropped. Empty: none known, nothing
    /// dropped for it.
    pub fn set_service_cidrs(&mut self, cidrs: &[(std::net::IpAddr, u8)]) -> Result<()> {
        use common::config::SERVICE_CIDR_SLOTS;
        self.update_config(|c| {
            c.service_cidrs = [[0; 16]; SERVICE_CIDR_SLOTS];
            c.service_cidr_lens = [0; SERVICE_CIDR_SLOTS];
            for (i, (net, len)) in cidrs.iter().take(SERVICE_CIDR_SLOTS).enumerate() {
                c.service_cidrs[i] = common::addr::addr16(*net);
                c.service_cidr_lens[i] = if net.is_ipv4() { 96 + len } else { *len };
            }
        })
    }

    /// Turns per-packet trace events of every packet on or off, in session
    /// slot 0 (read with [`Datapath::trace_reader`]).
    pub fn set_tracing(&mut self, enabled: bool) -> Result<()> {
        let session = TraceSession {
            active: u32::from(enabled),
            ..TraceSession::default()
        };
        self.set_trace_session(0, &session)
    }

    /// Writes trace session slot `slot` (its filter; `active` 0 closes it).
    pub fn set_trace_session(&mut self, slot: u32, session: &TraceSession) -> Result<()> {
        let mut map: Array<&mut MapData, TraceSession> = self.map_mut(map_names::TRACE_SESSIONS)?;
        map.set(slot, session, 0).map_err(|source| Error::Map {
            name: map_names::TRACE_SESSIONS,
            source,
        })
    }

    /// Trace session slot `slot` as the datapath sees it.
    pub fn trace_session(&self, slot: u32) -> Result<TraceSession> {
        let map: Array<&MapData, TraceSession> = self.map_ref(map_names::TRACE_SESSIONS)?;
        map.get(&slot, 0).map_err(|source| Error::Map {
            name: map_names::TRACE_SESSIONS,
            source,
        })
    }

    /// The per-reason counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters> {
        let map: PerCpuArray<&MapData, ReasonCounter> = self.map_ref(map_names::COUNTERS)?;
        let mut counters = Counters::default();
        for hook in Hook::ALL {
            for reason in Reason::ALL {
                let index = common::counter_index(hook, reason);
                let per_cpu = map.get(&index, 0).map_err(|source| Error::Map {
                    name: map_names::COUNTERS,
                    source,
                })?;
                let sum = per_cpu
                    .iter()
                    .fold(ReasonCounter::default(), |a, c| ReasonCounter {
                        packets: a.packets + c.packets,
                        bytes: a.bytes + c.bytes,
                    });
                if sum.packets > 0 {
                    counters.by_reason.insert((hook, reason), sum);
                }
            }
        }
        Ok(counters)
    }

    /// Trace events that did not fit in the ring buffer, summed over CPUs.
    pub fn trace_lost(&self) -> Result<u64> {
        let map: PerCpuArray<&MapData, u64> = self.map_ref(map_names::TRACE_LOST)?;
        let per_cpu = map.get(&0, 0).map_err(|source| Error::Map {
            name: map_names::TRACE_LOST,
            source,
        })?;
        Ok(per_cpu.iter().sum())
    }

    /// Takes session slot 0's ring buffer out of the object (one reader).
    pub fn trace_reader(&mut self) -> Result<TraceReader> {
        self.trace_reader_of(0)
    }

    /// Takes session slot `slot`'s ring buffer out of the object.
    pub fn trace_reader_of(&mut self, slot: u32) -> Result<TraceReader> {
        let name = *map_names::TRACE_RINGS
            .get(slot as usize)
            .ok_or(Error::MissingMap("DP_TRACE_<slot>"))?;
        let map = self.ebpf.take_map(name).ok_or(Error::MissingMap(name))?;
        let ring = RingBuf::try_from(map).map_err(|source| Error::Map { name, source })?;
        TraceReader::new(ring)
    }

    /// Loads `dp_tc_ingress` with tracing compiled out (benchmarks: the
    /// cost of tracing with no session open); see `untraced_program`.
    pub fn load_untraced(&mut self) -> Result<()> {
        let name = program_names::TC_UNTRACED;
        tc_program_mut(&mut self.ebpf, name)?
            .load()
            .map_err(|source| Error::Program { name, source })
    }

    /// The program `load_untraced` loaded.
    pub fn untraced_program(&self) -> Result<&SchedClassifier> {
        tc_program_ref(&self.ebpf, program_names::TC_UNTRACED)
    }

    /// The program that does nothing (benchmark floor).
    pub fn noop_program(&self) -> Result<&SchedClassifier> {
        tc_program_ref(&self.ebpf, program_names::TC_NOOP)
    }

    /// The tc program for `hook`, e.g. for `TestRun`.
    pub fn tc_program(&self, hook: Hook) -> Result<&SchedClassifier> {
        let name = tc_program_name(hook).ok_or(Error::NotTcHook(hook))?;
        tc_program_ref(&self.ebpf, name)
    }

    pub fn xdp_program(&self) -> Result<&Xdp> {
        let name = program_names::XDP;
        self.ebpf
            .program(name)
            .ok_or(Error::MissingProgram(name))?
            .try_into()
            .map_err(|source| Error::Program { name, source })
    }

    /// The conntrack map's capacity in entries, as the kernel has it (an
    /// adopted map keeps the one it was created with).
    pub fn ct_max_entries(&self) -> Result<u32> {
        let name = map_names::CT;
        match self.ebpf.map(name).ok_or(Error::MissingMap(name))? {
            // A plain hash where tests stand one in (`load_pinned_as_is`).
            Map::LruHashMap(data) | Map::HashMap(data) => data
                .info()
                .map(|i| i.max_entries())
                .map_err(|source| Error::Map { name, source }),
            _ => Err(Error::MissingMap(name)),
        }
    }

    pub(crate) fn map_ref<'a, T>(&'a self, name: &'static str) -> Result<T>
    where
        T: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self.ebpf.map(name).ok_or(Error::MissingMap(name))?;
        T::try_from(map).map_err(|source| Error::Map { name, source })
    }

    pub(crate) fn map_mut<'a, T>(&'a mut self, name: &'static str) -> Result<T>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self.ebpf.map_mut(name).ok_or(Error::MissingMap(name))?;
        T::try_from(map).map_err(|source| Error::Map { name, source })
    }
}

/// Packet counters per (hook, reason); only non-zero entries are present.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub by_reason: BTreeMap<(Hook, Reason), ReasonCounter>,
}

impl Counters {
    pub fn packets(&self, hook: Hook, reason: Reason) -> u64 {
        self.by_reason.get(&(hook, reason)).map_or(0, |c| c.packets)
    }

    pub fn bytes(&self, hook: Hook, reason: Reason) -> u64 {
        self.by_reason.get(&(hook, reason)).map_or(0, |c| c.bytes)
    }

    pub fn total_packets(&self) -> u64 {
        self.by_reason.values().map(|c| c.packets).sum()
    }
}

/// Verifies and loads the programs an agent attaches, each on a thread of
/// its own: the verifier takes most of an agent's start (0.77 s of the
/// 1.6 s to the first sync at 10 000 services on a 2-vCPU node, one
/// program after the other) and runs in the loading thread.
fn load_programs(ebpf: &mut Ebpf) -> Result<()> {
    const LOADED: [&str; 4] = [
        program_names::TC_INGRESS,
        program_names::TC_EGRESS,
        program_names::TC_NOOP,
        program_names::XDP,
    ];
    let programs: Vec<(&'static str, &mut Program)> = ebpf
        .programs_mut()
        .filter_map(|(name, program)| Some((*LOADED.iter().find(|n| **n == name)?, program)))
        .collect();
    if let Some(missing) = LOADED
        .iter()
        .find(|name| !programs.iter().any(|(n, _)| n == *name))
    {
        return Err(Error::MissingProgram(missing));
    }
    std::thread::scope(|scope| {
        let loading: Vec<_> = programs
            .into_iter()
            .map(|(name, program)| {
                scope.spawn(move || {
                    match program {
                        Program::SchedClassifier(p) => p.load(),
                        Program::Xdp(p) => p.load(),
                        _ => Err(ProgramError::UnexpectedProgramType),
                    }
                    .map_err(|source| Error::Program { name, source })
                })
            })
            .collect();
        loading
            .into_iter()
            .try_for_each(|thread| thread.join().expect("a program load panicked"))
    })
}

fn tc_program_name(hook: Hook) -> Option<&'static str> {
    match hook {
        Hook::TcIngress => Some(program_names::TC_INGRESS),
        Hook::TcEgress => Some(program_names::TC_EGRESS),
        Hook::Xdp
        | Hook::SockConnect4
        | Hook::SockConnect6
        | Hook::SockSendmsg4
        | Hook::SockSendmsg6 => None,
    }
}

fn tc_program_ref<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a SchedClassifier> {
    ebpf.program(name)
        .ok_or(Error::MissingProgram(name))?
        .try_into()
        .map_err(|source| Error::Program { name, source })
}

fn tc_program_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
        .ok_or(Error::MissingProgram(name))?
        .try_into()
        .map_err(|source| Error::Program { name, source })
}

fn xdp_program_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    let name = program_names::XDP;
    ebpf.program_mut(name)
        .ok_or(Error::MissingProgram(name))?
        .try_into()
        .map_err(|source| Error::Program { name, source })
}

/// The link pinned at `pin`, if any.
fn adopt_link(pin: &std::path::Path) -> Option<FdLink> {
    PinnedLink::from_pin(pin).ok().map(FdLink::from)
}

/// The result of swapping the program in an adopted link. If that failed
/// (the link is defunct: its device was deleted and recreated), its pin is
/// removed and `None` says to attach afresh.
fn swap_or_forget<T>(
    swapped: std::result::Result<T, aya::programs::ProgramError>,
    pin: &std::path::Path,
) -> Option<T> {
    match swapped {
        Ok(id) => Some(id),
        Err(_) => {
            let _ = std::fs::remove_file(pin);
            None
        }
    }
}

fn pin_err(pin: &std::path::Path, e: impl std::fmt::Display) -> Error {
    Error::Pin {
        context: pin.display().to_string(),
        message: e.to_string(),
    }
}

/// The MAC address of `ifname` in the calling thread's network namespace
/// (`SIOCGIFHWADDR`).
pub fn device_mac(ifname: &str) -> Result<[u8; 6]> {
    let no_such = || Error::NoSuchInterface(ifname.to_string());
    let name = ifname.as_bytes();
    // SAFETY: zeroed ifreq is valid; the name fits (checked) with its NUL.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(no_such());
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket call; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(Error::Io {
            context: "socket for SIOCGIFHWADDR".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: a valid socket and ifreq.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req) };
    // SAFETY: our fd.
    unsafe { libc::close(fd) };
    if rc < 0 {
        return Err(no_such());
    }
    // SAFETY: SIOCGIFHWADDR filled the hardware-address member.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (dst, src) in mac.iter_mut().zip(data.iter()) {
        *dst = *src as u8;
    }
    Ok(mac)
}

/// The driver of `ifname` (`ETHTOOL_GDRVINFO`), e.g. `veth`.
pub fn device_driver(ifname: &str) -> Result<String> {
    const ETHTOOL_GDRVINFO: u32 = 3;
    // struct ethtool_drvinfo: cmd, then driver[32], and more we do not read.
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 160],
    }
    let no_such = || Error::NoSuchInterface(ifname.to_string());
    let name = ifname.as_bytes();
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 160],
    };
    // SAFETY: zeroed ifreq is valid; the name fits (checked) with its NUL.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(no_such());
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&mut info as *mut DrvInfo).cast();
    // SAFETY: plain socket call; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(Error::Io {
            context: "socket for SIOCETHTOOL".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: a valid socket, ifreq and ethtool buffer (larger than the
    // kernel's struct ethtool_drvinfo).
    let rc = unsafe { libc::ioctl(fd, libc::SIOCETHTOOL, &mut req) };
    // SAFETY: our fd.
    unsafe { libc::close(fd) };
    if rc < 0 {
        return Err(no_such());
    }
    let len = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
    Ok(String::from_utf8_lossy(&info.driver[..len]).into_owned())
}

impl Drop for Datapath {
    /// Netlink filters are deleted in their own namespace (aya would delete
    /// them by ifindex in the dropping thread's); tcx and XDP links go with
    /// their file descriptors.
    fn drop(&mut self) {
        let netlink: Vec<Attachment> = self
            .attachments
            .extract_if(.., |a| matches!(a, Attachment::TcNetlink(..)))
            .collect();
        for attachment in netlink {
            if let Attachment::TcNetlink(name, link, netns) = attachment {
                if let Ok(prog) = tc_program_mut(&mut self.ebpf, name) {
                    let _ = in_netns(&netns, || prog.detach(link));
                }
            }
        }
    }
}

/// The calling thread's network namespace, as a file descriptor.
fn current_netns() -> Result<std::os::fd::OwnedFd> {
    std::fs::File::open("/proc/thread-self/ns/net")
        .map(std::os::fd::OwnedFd::from)
        .map_err(|source| Error::Io {
            context: "open /proc/thread-self/ns/net".into(),
            source,
        })
}

/// Runs `f` on a thread in network namespace `netns`.
fn in_netns<T: Send>(netns: &std::os::fd::OwnedFd, f: impl FnOnce() -> T + Send) -> Result<T> {
    use std::os::fd::AsRawFd;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: a network namespace fd; affects this thread only.
                if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(Error::Io {
                        context: "setns into an attachment's namespace".into(),
                        source: std::io::Error::last_os_error(),
                    });
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| {
                Err(Error::Io {
                    context: "detaching thread".into(),
                    source: std::io::Error::other("panicked"),
                })
            })
    })
}

/// ifindex of `ifname` in the calling thread's network namespace.
pub fn ifindex(ifname: &str) -> Result<u32> {
    let c = CString::new(ifname).map_err(|_| Error::NoSuchInterface(ifname.to_string()))?;
    // SAFETY: a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(Error::NoSuchInterface(ifname.to_string())),
        i => Ok(i),
    }
}

impl Datapath {
    /// Socket LB: the sockets the hooks pointed at a backend (socket
    /// cookie -> the service address they asked for).
    pub fn sock_peers(&self) -> Result<aya::maps::HashMap<&MapData, u64, common::lb::SockPeer>> {
        self.map_ref(map_names::SOCK_PEERS)
    }
}

/// `--socket-lb`'s programs, in the order they attach.
const SOCKET_LB_PROGRAMS: [&str; 8] = [
    "dp_sock_connect4",
    "dp_sock_connect6",
    "dp_sock_sendmsg4",
    "dp_sock_sendmsg6",
    "dp_sock_recvmsg4",
    "dp_sock_recvmsg6",
    "dp_sock_getpeername4",
    "dp_sock_getpeername6",
];

/// The cgroup sock program that forgets a closing socket's service peer
/// (a `cgroup/sock_release` hook, not a sock_addr one).
const SOCKET_RELEASE_PROGRAM: &str = "dp_sock_release";

impl Datapath {
    /// Socket-level load balancing: loads the cgroup sock_addr programs
    /// and attaches them to the cgroup v2 directory `cgroup` (they act on
    /// the sockets of its processes and its descendants'). Sockets of the
    /// node's network namespace (`node_netns`, its cookie) are served, and
    /// with `all` every other namespace's too (`--socket-lb all`: pods).
    /// The hooks stay attached while this `Datapath` lives; after it,
    /// every connection is left to tc again.
    pub fn attach_socket_lb(
        &mut self,
        cgroup: &std::path::Path,
        node_netns: u64,
        all: bool,
    ) -> Result<()> {
        let name = map_names::SOCK_SCOPE;
        let mut scope: aya::maps::Array<&mut MapData, u64> = self
            .ebpf
            .map_mut(name)
            .ok_or(Error::MissingMap(name))?
            .try_into()
            .map_err(|source| Error::Map { name, source })?;
        scope
            .set(common::lb::SOCK_SCOPE_NODE_NETNS, node_netns, 0)
            .and_then(|()| scope.set(common::lb::SOCK_SCOPE_ALL, u64::from(all), 0))
            .map_err(|source| Error::Map { name, source })?;
        self.load_socket_programs()?;
        let open = || {
            std::fs::File::open(cgroup).map_err(|source| Error::Io {
                context: format!("opening the cgroup {}", cgroup.display()),
                source,
            })
        };
        // The release hook first: no socket gets a peer entry that its
        // close would not remove.
        let name = SOCKET_RELEASE_PROGRAM;
        self.release_program_mut()?
            .attach(open()?, aya::programs::CgroupAttachMode::Single)
            .map_err(|source| Error::Program { name, source })?;
        for name in SOCKET_LB_PROGRAMS {
            let prog = self.socket_program_mut(name)?;
            prog.attach(open()?, aya::programs::CgroupAttachMode::Single)
                .map_err(|source| Error::Program { name, source })?;
        }
        // Only once every hook is attached: the tools read it as a fact.
        self.set_socket_lb_flags(true, all)
    }

    /// Loads (verifies) the socket hook programs, without attaching them;
    /// once.
    pub fn load_socket_programs(&mut self) -> Result<()> {
        for name in SOCKET_LB_PROGRAMS {
            let prog = self.socket_program_mut(name)?;
            if prog.fd().is_err() {
                prog.load()
                    .map_err(|source| Error::Program { name, source })?;
            }
        }
        let name = SOCKET_RELEASE_PROGRAM;
        let prog = self.release_program_mut()?;
        if prog.fd().is_err() {
            prog.load()
                .map_err(|source| Error::Program { name, source })?;
        }
        Ok(())
    }

    /// The socket hook programs by name, with their kernel info once
    /// loaded (`load_socket_programs`).
    pub fn socket_programs(&self) -> Vec<(&'static str, Result<aya::programs::ProgramInfo>)> {
        SOCKET_LB_PROGRAMS
            .iter()
            .copied()
            .chain([SOCKET_RELEASE_PROGRAM])
            .map(|name| {
                let info = self
                    .ebpf
                    .program(name)
                    .ok_or(Error::MissingProgram(name))
                    .and_then(|p| p.info().map_err(|source| Error::Program { name, source }));
                (name, info)
            })
            .collect()
    }

    fn release_program_mut(&mut self) -> Result<&mut aya::programs::CgroupSock> {
        let name = SOCKET_RELEASE_PROGRAM;
        self.ebpf
            .program_mut(name)
            .ok_or(Error::MissingProgram(name))?
            .try_into()
            .map_err(|source| Error::Program { name, source })
    }

    fn socket_program_mut(
        &mut self,
        name: &'static str,
    ) -> Result<&mut aya::programs::CgroupSockAddr> {
        self.ebpf
            .program_mut(name)
            .ok_or(Error::MissingProgram(name))?
            .try_into()
            .map_err(|source| Error::Program { name, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stub_object_is_refused_with_how_to_build_the_real_one() {
        let err = check_object(&[]).unwrap_err();
        assert!(matches!(err, Error::StubObject));
        assert!(err.to_string().contains("DP_EBPF_STUB"), "{err}");
        check_object(DATAPLANE_OBJECT).expect("the tests embed the real object");
    }
}
