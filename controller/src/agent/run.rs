//! `dp agent`: the per-node agent. Reads Services, EndpointSlices and its
//! Node from a source, translates them (`translate`) and keeps the datapath
//! maps in step (`sync`), attached to the node's devices and its pods'
//! host-side veths.
//!
//! State is pinned under `--bpffs` (see `pin`): an agent that stops or
//! crashes leaves programs attached and maps in place, and the next one
//! adopts them without a gap in service.
//!
//! Sources, feeding the same translation: `--manifests DIR` (a directory of
//! ordinary manifests, watched with inotify: a change is applied as soon as
//! it is written), or the Kubernetes API (`--kubeconfig`, `KUBECONFIG`, or
//! in-cluster; see `source::api`). Pod devices are followed with rtnetlink
//! link events.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CStr,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use common::Hook;
use notify::Watcher as _;
use regex::Regex;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    agent::{
        healthcheck::HealthCheckServer,
        links::LinkEvents,
        metrics::{self, AgentMetrics},
    },
    kernel::{pin, Datapath, MapSizes, TcAttach},
    source::{
        api::{self as kube_source, KubeChange, KubeSource, ObjectChange},
        manifests,
    },
    translate::sync::MapWriter,
    translate::{
        incremental::{IncrementalTranslation, ObjectKey},
        Cidr, FrontendKey, NodeInfo, Skipped, TranslateOptions,
    },
};

/// The flags of `dp agent` (kept stable: other tools drive it).
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub kubeconfig: Option<PathBuf>,
    pub manifests: Option<PathBuf>,
    pub node_name: String,
    /// `--node-ip`: the node's addresses, both families (empty: from the
    /// Node object).
    pub node_ips: Vec<IpAddr>,
    pub devices: Vec<String>,
    pub pod_devices: Option<Regex>,
    pub xdp: Xdp,
    pub tc_attach: TcAttachChoice,
    /// `--cluster-cidr`: at most one per family.
    pub cluster_cidrs: Vec<Cidr>,
    pub nodeport_addresses: Vec<Cidr>,
    /// `--service-cidr` (IPv4): traffic to an address in it that no
    /// Service has is dropped, unless the API's ServiceCIDR objects say
    /// otherwise.
    pub service_cidrs: Vec<Cidr>,
    pub masquerade_all: bool,
    /// `--reply-rate-limit` (0: none) and `--reply-burst`.
    pub reply_limit: (u32, u32),
    /// `--sync-period`: the maps are read back and repaired this often (0:
    /// never).
    pub sync_period: Duration,
    /// `--ct-gc-interval`: conntrack entries past their deadline are
    /// deleted this often (0: never; the LRU map then evicts when full).
    pub ct_gc_interval: Duration,
    pub bpffs: PathBuf,
    pub metrics_addr: SocketAddr,
    pub healthz_addr: SocketAddr,
    /// Map capacities (a pinned map keeps the size it was created with).
    pub map_sizes: MapSizes,
    /// `--socket-lb`: connect() and sendto() to a Service translated at
    /// the socket.
    pub socket_lb: SocketLb,
    /// `--cgroup-root`: where the socket hooks attach (default: the root
    /// of the cgroup v2 hierarchy).
    pub cgroup_root: Option<PathBuf>,
}

/// Socket-level load balancing (`--socket-lb`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum SocketLb {
    /// Every connection is translated per packet by tc.
    #[default]
    Off,
    /// Sockets of the node's own network namespace (its processes,
    /// hostNetwork pods) are pointed at a backend at connect(); pods keep
    /// tc.
    Host,
    /// Every network namespace's sockets under the cgroup root, pods' too.
    All,
}

/// The cgroup v2 hierarchy's mount point, from `/proc/self/mounts`
/// (`/sys/fs/cgroup` on a unified host, `/sys/fs/cgroup/unified` on a
/// hybrid one).
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, path, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(path))
    })
}

/// The cookie of this process's network namespace (`SO_NETNS_COOKIE`),
/// as the socket hooks see it (`bpf_get_netns_cookie`).
pub fn own_netns_cookie() -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let s = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket and an out buffer of the size given.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Where the health check node ports listen: all addresses of each family
/// the node has (kube-proxy's default, one server per family), or with
/// `--nodeport-addresses` the node addresses it allows, as kube-proxy
/// narrows them too (per family: no CIDR of a family allows all of it).
fn health_check_ips(nodeport_addresses: &[Cidr], node_ips: &[IpAddr]) -> Vec<IpAddr> {
    if nodeport_addresses.is_empty() {
        let mut any = vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)];
        if node_ips.iter().any(IpAddr::is_ipv6) {
            any.push(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED));
        }
        return any;
    }
    node_ips
        .iter()
        .copied()
        .filter(|ip| crate::translate::nodeport_address(nodeport_addresses, *ip))
        .collect()
}

/// Host-side pod veths of common CNIs: kindnet and the bridge/ptp plugins
/// (`veth…`), Calico (`cali…`), Cilium-style (`lxc…`).
pub const DEFAULT_POD_DEVICES: &str = "^(veth|cali|lxc)";

/// Whether the node devices get the XDP program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Xdp {
    On,
    /// tc only: for devices whose peer cannot receive `XDP_TX` frames
    /// (a veth whose peer has no XDP program, as on kind's nodes).
    Off,
}

/// How the tc programs are attached (`--tc-attach`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TcAttachChoice {
    /// tcx where the kernel has it (6.6 and newer), netlink tc filters
    /// before.
    Auto,
    Tcx,
    Netlink,
}

/// kube-proxy's health timeout (twice its 30 s sync period).
const HEALTH_GRACE: Duration = Duration::from_secs(60);
/// EndpointSlice annotation with the time of the change it reflects.
const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

pub async fn run(opts: AgentOptions) -> anyhow::Result<()> {
    // First, so a SIGTERM at any point ends the agent cleanly.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    if opts.manifests.is_some() && opts.kubeconfig.is_some() {
        bail!("--manifests and --kubeconfig exclude each other");
    }
    let kernel = crate::kernel::host::check_kernel()?;
    let tc_attach = match opts.tc_attach {
        TcAttachChoice::Auto => TcAttach::for_kernel(&kernel),
        TcAttachChoice::Tcx => TcAttach::Tcx,
        TcAttachChoice::Netlink => TcAttach::Netlink,
    };
    info!(
        %kernel,
        tc_attach = %tc_attach.name(),
        sysctls = %crate::kernel::host::Sysctls::read().describe(),
        "node"
    );
    // The manifests are parsed while the programs load and attach (each
    // about half of the start at 10 000 services); the first sync then
    // re-reads only files changed meanwhile.
    let parsing = parse_manifests_early(opts.manifests.clone());
    // Maps and links live in bpffs: they outlive this process, and a
    // restarted agent adopts them (same ids, so conntrack stays valid).
    pin::ensure_bpffs(&opts.bpffs).context("preparing --bpffs")?;
    let mut dp = match Datapath::load_pinned(&pin::maps_dir(&opts.bpffs), opts.map_sizes) {
        Ok(dp) => dp,
        Err(crate::error::Error::PinnedStateUnreadable { why }) => {
            return fail_static(&opts, &why, &mut sigterm).await;
        }
        Err(e) => return Err(anyhow::Error::from(e).context("loading the datapath")),
    };
    // The datapath's rare diagnostics, in this log (rate-limited).
    if let Err(e) = super::ebpf_log::forward_to_tracing(&dp) {
        warn!(error = %e, "not reading the datapath's log");
    }
    dp.set_tc_attach(tc_attach);
    // Removed backends stay, retired, while conntrack names them, so a
    // client's reset reaches them; the collector deletes them after.
    dp.retire_removed_backends(!opts.ct_gc_interval.is_zero());
    let mut writer = MapWriter::adopt(&mut dp).context("reading the pinned maps")?;
    // Conntrack may name backends removed before this agent started: new
    // backends get ids after those too.
    match dp.ct_entries() {
        Ok(entries) => {
            let named = entries.iter().map(|(_, e)| e.backend_id).max();
            writer.give_backend_ids_after(named.unwrap_or(0));
        }
        Err(e) => warn!(error = %e, "reading conntrack for the backend ids it names"),
    }
    info!(
        frontends = writer.frontend_count(),
        backends = writer.backend_count(),
        bpffs = %opts.bpffs.display(),
        "adopted pinned state"
    );
    // Requests from the HTTP handlers (metrics, health, service health
    // checks) to this loop, which owns the maps and the metrics.
    let (requests, mut incoming) = mpsc::channel(16);
    let node = NodeInfo {
        name: opts.node_name.clone(),
        ips: opts.node_ips.clone(),
        zone: None,
    };
    let health_ips = health_check_ips(&opts.nodeport_addresses, &node.ips);
    let options = TranslateOptions {
        nodeport_addresses: opts.nodeport_addresses.clone(),
        loopback_nodeports: opts.socket_lb != SocketLb::Off,
    };
    let mut agent = Agent {
        translation: IncrementalTranslation::new(node.clone(), options),
        node,
        source_skipped: Vec::new(),
        resource_version: None,
        health_frontends: BTreeSet::new(),
        health_checks_pending: true,
        listed: [false; 3],
        writer,
        attached: BTreeSet::new(),
        metrics: AgentMetrics::default(),
        seen_triggers: BTreeMap::new(),
        health_checks: HealthCheckServer::new(health_ips, requests.clone()),
        api_service_cidrs: None,
        retry: None,
        socket_lb_cgroup: None,
        opts,
    };
    agent.configure(&mut dp)?;
    let devices = if agent.opts.devices.is_empty() {
        let found = default_route_devices();
        if found.is_empty() {
            bail!("no --devices given and no IPv4 default route to take the device from");
        }
        info!(devices = ?found, "node devices from the default route");
        found
    } else {
        agent.opts.devices.clone()
    };
    for dev in devices {
        let bpffs = &agent.opts.bpffs;
        let xdp_pin = pin::link_pin(bpffs, &dev, Hook::Xdp);
        match agent.opts.xdp {
            Xdp::On => dp.attach_xdp_pinned(&dev, &xdp_pin),
            // An XDP link a previous agent pinned goes with its pin.
            Xdp::Off => match std::fs::remove_file(&xdp_pin) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(crate::error::Error::Io {
                        context: format!("remove {}", xdp_pin.display()),
                        source: e,
                    })
                }
                _ => Ok(()),
            },
        }
        .and_then(|()| {
            dp.attach_tc_pinned(
                &dev,
                Hook::TcIngress,
                &pin::link_pin(bpffs, &dev, Hook::TcIngress),
            )
        })
        .and_then(|()| {
            dp.attach_tc_pinned(
                &dev,
                Hook::TcEgress,
                &pin::link_pin(bpffs, &dev, Hook::TcEgress),
            )
        })
        .with_context(|| format!("attaching to device {dev}"))?;
        info!(device = %dev, xdp = agent.opts.xdp == Xdp::On, "attached tc ingress and egress");
        agent.attached.insert(dev);
    }
    agent.attach_pod_devices(&mut dp);
    if agent.opts.socket_lb != SocketLb::Off {
        let cgroup = agent
            .opts
            .cgroup_root
            .clone()
            .or_else(cgroup2_root)
            .context("--socket-lb: no cgroup v2 hierarchy is mounted (give --cgroup-root)")?;
        let netns = own_netns_cookie().context("this network namespace's cookie")?;
        dp.attach_socket_lb(&cgroup, netns, agent.opts.socket_lb == SocketLb::All)
            .with_context(|| format!("attaching the socket hooks to {}", cgroup.display()))?;
        info!(cgroup = %cgroup.display(), scope = ?agent.opts.socket_lb, "socket-level load balancing attached");
        agent.socket_lb_cgroup = Some(cgroup);
    }
    // Every link runs the new programs: a migration begun at load ends.
    match dp.finish_migration() {
        Ok(converted) if !converted.is_empty() => {
            agent.metrics.maps_converted = converted.len();
            info!(
                maps = ?converted,
                "migration finished: the new programs serve from the converted maps; the old maps are unpinned"
            );
        }
        Ok(_) => {}
        // The old maps stay in `previous/`: the next start converts from
        // them again.
        Err(e) => warn!(error = %e, "finishing the migration of the pinned maps"),
    }
    // The pass-through filter: its bits are set from what the adopted maps
    // and conntrack hold (what this agent writes from now on sets its own
    // first), then it is turned on. Without it every packet takes the
    // lookups, as before. (Programs an earlier agent left on a device this
    // one no longer attaches to keep that agent's filter and mark nothing
    // in this one: see `fill_prefilter`.)
    match dp.fill_prefilter().and_then(|filled| {
        dp.enable_prefilter()?;
        Ok(filled)
    }) {
        Ok(filled) => info!(
            frontend_addresses = filled.frontend_addresses,
            conntrack_entries = filled.conntrack_entries,
            "pass-through filter on"
        ),
        Err(e) => warn!(error = %e, "pass-through filter left off: every packet takes the lookups"),
    }

    // Manifest changes wake the loop through `tx`, API watch events come
    // through `kube_tx`; `_watcher` must live.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (kube_tx, mut kube_rx) = mpsc::unbounded_channel();
    let (source, _watcher) = match agent.opts.manifests.clone() {
        Some(dir) => {
            let mut watcher =
                notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                    if let Ok(e) = event {
                        if manifest_change_complete(&e.kind)
                            && e.paths.iter().any(|p| manifests::is_manifest(p))
                        {
                            let _ = tx.send(());
                        }
                    }
                })?;
            watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
            let cache = parsing
                .and_then(|thread| thread.join().ok())
                .unwrap_or_default();
            (Source::Manifests(dir, cache.into()), Some(watcher))
        }
        None => {
            let config = kube_source::config(agent.opts.kubeconfig.as_deref())
                .await
                .context("Kubernetes client configuration")?;
            let client = kube::Client::try_from(config).context("Kubernetes client")?;
            let kube = KubeSource::start(client, &agent.opts.node_name, kube_tx.clone());
            (Source::Kube(kube), None)
        }
    };
    // Listening before the first sync: health checks see 503 until then.
    let mut servers = Vec::new();
    for (addr, is_metrics) in [
        (agent.opts.metrics_addr, true),
        (agent.opts.healthz_addr, false),
    ] {
        let what = if is_metrics { "metrics" } else { "health" };
        let listener = match metrics::bind(addr) {
            Ok(listener) => {
                info!(%addr, what, "listening");
                Some(listener)
            }
            Err(e) => {
                // E.g. kube-proxy still holds the port: tried again until
                // it is free, as kube-proxy does.
                warn!(%addr, what, error = %e, "cannot listen; retrying every 2 s");
                None
            }
        };
        servers.push((addr, listener, is_metrics));
    }
    if let Source::Manifests(dir, cache) = &source {
        let started = Instant::now();
        agent.read_manifests(&mut dp, dir, cache);
        agent.sync(&mut dp, started);
    }
    if !agent.opts.ct_gc_interval.is_zero() {
        match super::ct_gc::spawn(agent.opts.bpffs.clone(), agent.opts.ct_gc_interval) {
            Ok(stats) => agent.metrics.ct_gc = Some(stats),
            Err(e) => warn!(error = %e, "not collecting conntrack"),
        }
    }

    for (addr, listener, is_metrics) in servers {
        let requests = requests.clone();
        tokio::spawn(async move {
            let listener = match listener {
                Some(l) => l,
                None => loop {
                    tokio::time::sleep(LISTEN_RETRY).await;
                    if let Ok(l) = metrics::bind(addr) {
                        info!(%addr, "listening");
                        break l;
                    }
                },
            };
            if let Err(e) = metrics::serve(listener, is_metrics, requests).await {
                warn!(error = %e, "metrics/health server stopped");
            }
        });
    }

    let mut links = LinkEvents::open().context("subscribing to link events")?;
    // Devices that appeared between the first listing and the subscription.
    agent.attach_pod_devices(&mut dp);
    // A burst of manifest events is taken in one sync once the directory
    // is quiet (or the burst too long): a deadline this loop waits for
    // alongside everything else, so health requests and SIGTERM are
    // answered meanwhile.
    let mut manifests_due: Option<(tokio::time::Instant, tokio::time::Instant)> = None;
    let mut resync = tokio::time::interval_at(
        tokio::time::Instant::now() + agent.opts.sync_period.max(Duration::from_millis(1)),
        agent.opts.sync_period.max(Duration::from_millis(1)),
    );
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let manifests_at = manifests_due
            .map(|(first, last)| (last + MANIFEST_QUIET).min(first + MANIFEST_BURST_MAX));
        let retry_at = agent.retry.map(|(at, _)| at);
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            Some(request) = incoming.recv() => match request {
                metrics::Request::Metrics(reply) => {
                    let _ = reply.send(metrics::render(&agent.metrics, &agent.writer, &dp));
                }
                metrics::Request::Health(reply) => {
                    let _ = reply.send(metrics::health(&agent.metrics, HEALTH_GRACE));
                }
            },
            Some(()) = rx.recv() => {
                let now = tokio::time::Instant::now();
                let first = manifests_due.map_or(now, |(first, _)| first);
                manifests_due = Some((first, now));
            }
            _ = sleep_until_or_never(manifests_at) => {
                manifests_due = None;
                if let Source::Manifests(dir, cache) = &source {
                    let started = Instant::now();
                    agent.read_manifests(&mut dp, dir, cache);
                    agent.sync(&mut dp, started);
                }
            }
            Some(change) = kube_rx.recv() => {
                // A watch event is applied at once (no quiet time: it is
                // complete as sent), with whatever else has arrived
                // meanwhile, in one sync.
                if let Source::Kube(kube) = &source {
                    let started = Instant::now();
                    agent.kube_change(&mut dp, kube, change);
                    while let Ok(change) = kube_rx.try_recv() {
                        agent.kube_change(&mut dp, kube, change);
                    }
                    if agent.listed.iter().all(|l| *l) {
                        agent.sync(&mut dp, started);
                    }
                }
            }
            _ = sleep_until_or_never(retry_at) => {
                // A sync that failed or left objects out, tried again
                // without waiting for another event.
                info!(attempt = agent.retry.map_or(0, |(_, n)| n), "retrying the sync");
                agent.sync(&mut dp, Instant::now());
            }
            _ = resync.tick(), if !agent.opts.sync_period.is_zero() => {
                // kube-proxy's periodic resync: the maps are read back and
                // whatever differs from the desired state is written again.
                agent.resync(&mut dp);
                // A socket the hooks pointed at a backend just before a
                // sync removed it may have connected after that sync's
                // sweep: the periodic one finds it.
                agent.close_stale_sockets(&dp);
            }
            changed = links.changed() => match changed {
                Ok(()) => agent.attach_pod_devices(&mut dp),
                Err(e) => warn!(error = %e, "link events"),
            },
        }
    }
    // Pinned programs and maps stay: traffic keeps flowing until the next
    // agent adopts them or `dp cleanup` removes them.
    info!("stopping; pinned state left in place");
    Ok(())
}

/// The agent over pinned state it cannot read: it changes nothing (the
/// programs attached by the agent before it keep serving from their maps),
/// says why, answers `/metrics` (`dp_pinned_state_readable 0`) and
/// `/healthz` (503, with the cause), and waits to be stopped.
async fn fail_static(
    opts: &AgentOptions,
    why: &str,
    sigterm: &mut tokio::signal::unix::Signal,
) -> anyhow::Result<()> {
    let (requests, mut incoming) = mpsc::channel(16);
    for (addr, is_metrics) in [(opts.metrics_addr, true), (opts.healthz_addr, false)] {
        let requests = requests.clone();
        match metrics::bind(addr) {
            Ok(listener) => {
                tokio::spawn(async move {
                    let _ = metrics::serve(listener, is_metrics, requests).await;
                });
            }
            Err(e) => warn!(%addr, error = %e, "cannot listen"),
        }
    }
    // After binding: /metrics and /healthz answer once this is logged.
    tracing::error!(
        %why,
        bpffs = %opts.bpffs.display(),
        "fail static: the pinned state holds connection state this dp cannot read; the datapath is left as it is (run the dp version that pinned it, or `dp cleanup` and restart)"
    );
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            Some(request) = incoming.recv() => match request {
                metrics::Request::Metrics(reply) => {
                    let mut out = String::new();
                    metrics::pinned_state(&mut out, false, 0);
                    let _ = reply.send(out);
                }
                metrics::Request::Health(reply) => {
                    let body = serde_json::json!({ "failStatic": why, "nodeEligible": false });
                    let _ = reply.send((503, body.to_string()));
                }
            },
        }
    }
    info!("stopping; pinned state left in place");
    Ok(())
}

/// A thread filling a manifest cache from `dir`, if there is one. What it
/// cannot read is reported by the first sync, which reads again.
fn parse_manifests_early(
    dir: Option<PathBuf>,
) -> Option<std::thread::JoinHandle<manifests::ManifestCache>> {
    let dir = dir?;
    let spawned = std::thread::Builder::new()
        .name("dp-manifests".into())
        .spawn(move || {
            let mut cache = manifests::ManifestCache::default();
            let _ = cache.load_dir(&dir);
            cache
        });
    spawned.ok()
}

enum Source {
    Manifests(PathBuf, std::cell::RefCell<manifests::ManifestCache>),
    Kube(KubeSource),
}

struct Agent {
    opts: AgentOptions,
    node: NodeInfo,
    /// The objects and their translation, kept current change by change.
    translation: IncrementalTranslation,
    /// What the source itself could not read (manifest documents).
    source_skipped: Vec<Skipped>,
    /// The resourceVersion of the last API object taken in (logged with
    /// the sync that programs it).
    resource_version: Option<String>,
    /// Frontends with a `healthCheckNodePort`: the health checks are synced
    /// when one of them changes.
    health_frontends: BTreeSet<FrontendKey>,
    health_checks_pending: bool,
    /// Services, EndpointSlices, Nodes: whether the translation has taken
    /// in a complete list of each. Nothing is synced before (fail static):
    /// the store being ready is not enough, its list may still be on its
    /// way here.
    listed: [bool; 3],
    writer: MapWriter,
    attached: BTreeSet<String>,
    metrics: AgentMetrics,
    /// The trigger time last measured of each slice (one entry per live
    /// slice: a set of every pair seen grew with every change).
    seen_triggers: BTreeMap<ObjectKey, String>,
    /// `healthCheckNodePort` listeners, synced after every successful apply.
    health_checks: HealthCheckServer,
    /// The IPv4 CIDRs of the API's ServiceCIDR objects, once the API has
    /// said (None: not served, not yet listed, or manifests).
    api_service_cidrs: Option<Vec<Cidr>>,
    /// When the next retry of a failed (or partial) sync is due, and which
    /// attempt it is.
    retry: Option<(tokio::time::Instant, u32)>,
    /// The cgroup the socket hooks are attached to (`--socket-lb`).
    socket_lb_cgroup: Option<PathBuf>,
}

impl Agent {
    fn configure(&self, dp: &mut Datapath) -> anyhow::Result<()> {
        // Set again when the hooks attach; a restart without them clears it.
        dp.set_socket_lb_flags(false, false)
            .context("configuring the datapath")?;
        // Each family: the node's first address of it (the masquerade
        // source; none: all zero, and the datapath drops what it would have
        // to masquerade) and the cluster CIDR of it.
        for unspecified in [
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        ] {
            let v6 = unspecified.is_ipv6();
            let node_ip = self
                .node
                .ips
                .iter()
                .copied()
                .find(|ip| ip.is_ipv6() == v6)
                .unwrap_or(unspecified);
            let cidr = self
                .opts
                .cluster_cidrs
                .iter()
                .find(|c| c.addr.is_ipv6() == v6)
                .map(|c| (c.addr, c.len));
            dp.set_node(node_ip, cidr, self.opts.masquerade_all)?;
        }
        dp.set_reply_limit(self.opts.reply_limit.0, self.opts.reply_limit.1)?;
        self.configure_service_cidrs(dp)
    }

    /// Writes the Service CIDRs the datapath drops unallocated ClusterIPs
    /// in: the API's ServiceCIDR objects when it serves them, else
    /// `--service-cidr`; without either, none (and says so).
    fn configure_service_cidrs(&self, dp: &mut Datapath) -> anyhow::Result<()> {
        let (cidrs, from) = match &self.api_service_cidrs {
            Some(c) if !c.is_empty() => (c.as_slice(), "ServiceCIDR objects"),
            _ => (self.opts.service_cidrs.as_slice(), "--service-cidr"),
        };
        // Written before it is logged: the log line says it is in effect.
        let list: Vec<(IpAddr, u8)> = cidrs.iter().map(|c| (c.addr, c.len)).collect();
        dp.set_service_cidrs(&list)?;
        if cidrs.is_empty() {
            info!(
                "Service CIDRs unknown (no ServiceCIDR objects, no --service-cidr): traffic to \
                 unallocated ClusterIPs is left to the node's routes, not dropped as \
                 kube-proxy's nftables mode drops it"
            );
        } else {
            if cidrs.len() > common::config::SERVICE_CIDR_SLOTS {
                warn!(
                    count = cidrs.len(),
                    "more IPv4 Service CIDRs than the datapath holds: the first {} are used",
                    common::config::SERVICE_CIDR_SLOTS
                );
            }
            let shown: Vec<String> = cidrs.iter().map(ToString::to_string).collect();
            info!(cidrs = %shown.join(","), from, "Service CIDRs: unallocated ClusterIPs are dropped");
        }
        Ok(())
    }

    /// Attaches tc to every device matching `--pod-devices` not yet
    /// attached, and forgets devices that are gone (the kernel detached
    /// their links; their pins are removed).
    fn attach_pod_devices(&mut self, dp: &mut Datapath) {
        let Some(re) = &self.opts.pod_devices else {
            return;
        };
        let present = interfaces();
        let gone: Vec<String> = self
            .attached
            .iter()
            .filter(|d| re.is_match(d) && !present.contains(d))
            .cloned()
            .collect();
        for dev in gone {
            for hook in [Hook::TcIngress, Hook::TcEgress] {
                let _ = std::fs::remove_file(pin::link_pin(&self.opts.bpffs, &dev, hook));
            }
            self.attached.remove(&dev);
            if let Err(e) = dp.forget_interface(&dev) {
                warn!(device = %dev, error = %e, "forgetting a pod device");
            }
            info!(device = %dev, "pod device gone");
        }
        for dev in present {
            if !re.is_match(&dev) || self.attached.contains(&dev) {
                continue;
            }
            let bpffs = &self.opts.bpffs;
            let ingress = pin::link_pin(bpffs, &dev, Hook::TcIngress);
            let egress = pin::link_pin(bpffs, &dev, Hook::TcEgress);
            match dp
                .attach_tc_pinned(&dev, Hook::TcIngress, &ingress)
                .and_then(|()| dp.attach_tc_pinned(&dev, Hook::TcEgress, &egress))
                .and_then(|()| dp.mark_pod_device(&dev))
            {
                Ok(()) => {
                    info!(device = %dev, "attached tc to pod device");
                    self.attached.insert(dev);
                }
                Err(e) => warn!(device = %dev, error = %e, "could not attach to pod device"),
            }
        }
    }

    /// Reads the manifest directory (parsing the files that changed) and
    /// takes in the objects that differ. Whatever cannot be read leaves the
    /// programmed state as it is (fail static).
    fn read_manifests(
        &mut self,
        dp: &mut Datapath,
        dir: &std::path::Path,
        cache: &std::cell::RefCell<manifests::ManifestCache>,
    ) {
        let mut cache = cache.borrow_mut();
        let objects = match cache.load_dir(dir) {
            Ok(o) => o,
            Err(e) => return warn!(error = %e, dir = %dir.display(), "cannot read manifests"),
        };
        for s in objects.skipped.iter().filter(|s| s.invalid) {
            warn!(object = %s.object, reason = %s.reason, "skipped invalid input");
        }
        self.source_skipped = objects.skipped.clone();
        if let Some(node) = objects
            .nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(&self.opts.node_name))
        {
            self.node_seen(dp, node);
        }
        // Shared with the cache: an unchanged object is the same allocation,
        // compared by address.
        self.translation
            .replace_shared_services(objects.services.iter().cloned());
        self.translation
            .replace_compact_slices(objects.slices.iter().cloned());
        // What the parse and the old objects took goes back to the kernel
        // now, not at the peak of the next read.
        release_freed_memory();
    }

    /// Takes in one watch event.
    fn kube_change(&mut self, dp: &mut Datapath, kube: &KubeSource, change: KubeChange) {
        use k8s_openapi::Metadata as _;
        let key = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            (
                meta.namespace.clone().unwrap_or_default(),
                meta.name.clone().unwrap_or_default(),
            )
        };
        let version = match &change {
            KubeChange::Service(ObjectChange::Applied(o) | ObjectChange::Deleted(o)) => {
                o.metadata().resource_version.clone()
            }
            KubeChange::Slice(ObjectChange::Applied(o) | ObjectChange::Deleted(o)) => {
                o.metadata().resource_version.clone()
            }
            _ => None,
        };
        if version.is_some() {
            self.resource_version = version;
        }
        match change {
            KubeChange::Service(ObjectChange::Applied(service)) => {
                self.translation.upsert_service(*service)
            }
            KubeChange::Service(ObjectChange::Deleted(service)) => {
                let (ns, name) = key(&service.metadata);
                self.translation.remove_service(&ns, &name);
            }
            KubeChange::Service(ObjectChange::Relisted) => {
                self.listed[0] = true;
                self.translation.replace_services(kube.services())
            }
            KubeChange::Slice(ObjectChange::Applied(slice)) => {
                self.translation.upsert_slice(*slice)
            }
            KubeChange::Slice(ObjectChange::Deleted(slice)) => {
                let (ns, name) = key(&slice.metadata);
                self.translation.remove_slice(&ns, &name);
            }
            KubeChange::Slice(ObjectChange::Relisted) => {
                self.listed[1] = true;
                self.translation.replace_slices(kube.slices())
            }
            KubeChange::Node(ObjectChange::Applied(node)) => self.node_seen(dp, &node),
            KubeChange::Node(ObjectChange::Relisted) => {
                self.listed[2] = true;
                let nodes = kube.nodes();
                let mine = nodes
                    .iter()
                    .find(|n| n.metadata.name.as_deref() == Some(&self.opts.node_name));
                if let Some(node) = mine {
                    self.node_seen(dp, node);
                }
            }
            // A deleted Node changes nothing (the last addresses stay).
            KubeChange::Node(ObjectChange::Deleted(_)) | KubeChange::Ready => {}
            KubeChange::ServiceCidrs(cidrs) => {
                // Both families.
                let parsed: Vec<Cidr> = cidrs.iter().filter_map(|c| c.parse().ok()).collect();
                if self.api_service_cidrs.as_ref() != Some(&parsed) {
                    self.api_service_cidrs = Some(parsed);
                    if let Err(e) = self.configure_service_cidrs(dp) {
                        warn!(error = %e, "cannot write the Service CIDRs");
                    }
                }
            }
        }
    }

    /// The agent's Node object: its zone, and its addresses unless
    /// `--node-ip` gave them. A change translates every Service again.
    fn node_seen(&mut self, dp: &mut Datapath, node: &k8s_openapi::api::core::v1::Node) {
        let from_object = NodeInfo::from_node(node);
        self.node.zone = from_object.zone;
        if self.opts.node_ips.is_empty() && self.node.ips != from_object.ips {
            info!(ips = ?from_object.ips, "node addresses from the Node object");
            self.node.ips = from_object.ips;
            if let Err(e) = self.configure(dp) {
                warn!(error = %e, "cannot configure the node address");
            }
        }
        self.translation.set_node(self.node.clone());
        let ips = health_check_ips(&self.opts.nodeport_addresses, &self.node.ips);
        if self.health_checks.set_bind_ips(ips) {
            self.health_checks_pending = true;
        }
    }

    /// Programs what changed in the translation since the last sync: only
    /// the frontends (and their backends and names) that changed are
    /// compared and written (the first sync, after adopting the pinned
    /// maps, compares everything). `started`: when the change was taken in
    /// (the sync's duration, logged and observed, counts from there).
    fn sync(&mut self, dp: &mut Datapath, started: Instant) {
        self.sync_as(dp, started, "synced");
    }

    /// `sync`, logging `done` (the periodic resync's line must not pass for
    /// a sync of a change).
    fn sync_as(&mut self, dp: &mut Datapath, started: Instant, done: &'static str) {
        let changes = self.translation.take_changes();
        for s in changes.skipped.iter().filter(|s| s.invalid) {
            warn!(object = %s.object, reason = %s.reason, "skipped invalid input");
        }
        let (invalid, not_served) = self.translation.skip_counts();
        let source_invalid = self.source_skipped.iter().filter(|s| s.invalid).count();
        self.metrics.skipped_invalid = invalid + source_invalid;
        self.metrics.skipped_not_served = not_served + self.source_skipped.len() - source_invalid;
        let triggers = new_triggers(
            changes
                .slices
                .iter()
                .map(|key| (key, self.translation.slice(key))),
            &mut self.seen_triggers,
        );
        let desired = self.translation.desired();
        // Health checks follow the frontends that carry one.
        for key in &changes.frontends {
            let has_check = desired
                .frontends
                .get(key)
                .is_some_and(|f| f.health_check_node_port.is_some());
            let had_check = if has_check {
                !self.health_frontends.insert(*key)
            } else {
                self.health_frontends.remove(key)
            };
            self.health_checks_pending |= has_check || had_check;
        }
        match self.writer.apply_changes(dp, desired, &changes.frontends) {
            Ok(stats) => {
                if let Err(e) = self.writer.write_names(dp) {
                    warn!(error = %e, "writing names");
                }
                for (what, error) in &stats.not_programmed {
                    warn!(object = %what, %error, "did not fit: not programmed");
                }
                self.metrics.not_programmed = stats.not_programmed.len();
                self.retry = if stats.not_programmed.is_empty() {
                    None
                } else {
                    self.metrics.count_sync_error("not_programmed");
                    Some(next_retry(self.retry))
                };
                if !changes.frontends.is_empty() {
                    self.close_stale_sockets(dp);
                }
                if self.health_checks_pending {
                    // Logs what it cannot bind; tried again next sync.
                    let report = self.health_checks.sync(desired);
                    self.health_checks_pending = !report.failed.is_empty();
                }
                let now = std::time::SystemTime::now();
                self.metrics
                    .sync_duration
                    .observe(started.elapsed().as_secs_f64());
                self.metrics.last_sync = Some(now);
                self.metrics.failing_since = None;
                for t in &triggers.times {
                    if let Ok(d) = now.duration_since(*t) {
                        self.metrics.network_programming.observe(d.as_secs_f64());
                    }
                }
                info!(
                    frontends = self.writer.frontend_count(),
                    backends = self.writer.backend_count(),
                    written = stats.frontends_written,
                    removed = stats.frontends_removed,
                    backends_written = stats.backends_written,
                    backends_removed = stats.backends_removed,
                    resource_version = self.resource_version.as_deref().unwrap_or(""),
                    trigger = triggers
                        .newest
                        .as_ref()
                        .map_or("", |(_, as_written)| as_written.as_str()),
                    micros = started.elapsed().as_micros() as u64,
                    began = %jiff::Timestamp::try_from(
                        std::time::SystemTime::now() - started.elapsed()
                    )
                    .unwrap_or_default(),
                    "{done}"
                );
                // A large sync (the first, a relist) frees what it compared
                // and built; a small one has little to give back.
                if stats.frontends_written + stats.frontends_removed > LARGE_SYNC {
                    release_freed_memory();
                }
            }
            Err(e) => {
                self.metrics.count_sync_error(e.cause());
                self.metrics
                    .failing_since
                    .get_or_insert_with(std::time::SystemTime::now);
                self.retry = Some(next_retry(self.retry));
                warn!(error = %e, cause = e.cause(), "programming the maps failed");
            }
        }
    }

    /// Socket LB: destroys the sockets pointed at a backend that is no
    /// longer their frontend's (`sock_lb`).
    fn close_stale_sockets(&self, dp: &Datapath) {
        let Some(cgroup) = &self.socket_lb_cgroup else {
            return;
        };
        let peers = match dp.sock_peers() {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "opening the socket LB peers");
                return;
            }
        };
        let peer_of = |cookie: u64| peers.get(&cookie, 0).ok();
        let all = self.opts.socket_lb == SocketLb::All;
        let closed = super::sock_lb::close_stale(&peer_of, self.translation.desired(), all, cgroup);
        if closed > 0 {
            info!(sockets = closed, "destroyed sockets whose backend is gone");
        }
    }

    /// Reads the maps back into the writer and syncs: what differs from
    /// the desired state (an entry changed or removed behind the agent's
    /// back, a write that failed) is written again.
    fn resync(&mut self, dp: &mut Datapath) {
        // Nothing before the API's first complete lists (fail static).
        if self.opts.manifests.is_none() && !self.listed.iter().all(|l| *l) {
            return;
        }
        let started = Instant::now();
        match MapWriter::adopt(dp) {
            Ok(mut writer) => {
                // Ids handed out since keep rolling on.
                writer.give_backend_ids_after(self.writer.last_backend_id());
                self.writer = writer;
                self.sync_as(dp, started, "periodic resync: maps read back and repaired");
            }
            Err(e) => {
                self.metrics.count_sync_error(e.cause());
                warn!(error = %e, "reading the maps back for the periodic resync");
            }
        }
    }
}

/// Sleeps until `at`, or forever without one (a `select!` arm that never
/// fires).
async fn sleep_until_or_never(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The next retry of a sync after `last` (none: the first), later each
/// time it fails again.
fn next_retry(last: Option<(tokio::time::Instant, u32)>) -> (tokio::time::Instant, u32) {
    let attempt = last.map_or(1, |(_, n)| n + 1);
    let wait = RETRY_FIRST
        .saturating_mul(1 << (attempt - 1).min(16))
        .min(RETRY_MAX);
    (tokio::time::Instant::now() + wait, attempt)
}

/// The first retry of a failed sync comes after this; each next one after
/// twice as long, up to `RETRY_MAX`.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Frontends written or removed by a sync after which the heap is trimmed.
const LARGE_SYNC: usize = 1000;

/// Returns the heap's free pages to the kernel. A sync frees the whole
/// translated state it built, but glibc keeps freed memory in the process
/// (only a free top of the heap is returned, and rarely): without this the
/// agent's RSS stays at the peak of its largest sync.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// How often a metrics or health address that was taken is tried again.
const LISTEN_RETRY: Duration = Duration::from_secs(2);

/// Quiet time after a manifest change before it is read.
const MANIFEST_QUIET: Duration = Duration::from_millis(20);
/// Longest a stream of changes postpones the read.
const MANIFEST_BURST_MAX: Duration = Duration::from_millis(200);

/// Whether a directory event ends a change worth re-reading: a file closed
/// after writing, renamed or removed. Anything else may be a write in
/// progress (a file created or truncated, data or times modified): a
/// half-written file read then would drop the services it has not reached
/// yet, and its close-write follows. Our own reads raise access events,
/// which are ignored too.
fn manifest_change_complete(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind};
    matches!(
        kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(_))
            | EventKind::Create(CreateKind::Folder)
            | EventKind::Remove(_)
    )
}

/// Trigger times of EndpointSlice changes not measured yet, with the
/// newest one as written (`None`: a slice deleted, whose entry goes).
fn new_triggers<'a>(
    slices: impl Iterator<
        Item = (
            &'a ObjectKey,
            Option<&'a k8s_openapi::api::discovery::v1::EndpointSlice>,
        ),
    >,
    seen: &mut BTreeMap<ObjectKey, String>,
) -> NewTriggers {
    let mut out = NewTriggers::default();
    for (key, slice) in slices {
        let Some(slice) = slice else {
            seen.remove(key);
            continue;
        };
        let Some(value) = slice
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(TRIGGER_TIME))
        else {
            continue;
        };
        if seen.get(key) == Some(value) {
            continue;
        }
        seen.insert(key.clone(), value.clone());
        if let Ok(ts) = value.parse::<jiff::Timestamp>() {
            if out.newest.as_ref().is_none_or(|(newest, _)| ts > *newest) {
                out.newest = Some((ts, value.clone()));
            }
            out.times.push(std::time::SystemTime::from(ts));
        }
    }
    out
}

/// EndpointSlice changes a sync takes in, by their trigger times.
#[derive(Debug, Default)]
struct NewTriggers {
    times: Vec<std::time::SystemTime>,
    /// The newest trigger time, and as the annotation wrote it: the sync's
    /// log line names it, so whoever made a change learns when it was
    /// programmed.
    newest: Option<(jiff::Timestamp, String)>,
}

/// Devices of the IPv4 default routes in this network namespace (the main
/// table, as `/proc/net/route` lists it).
fn default_route_devices() -> Vec<String> {
    let table = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    parse_default_routes(&table)
}

/// `Iface Destination Gateway Flags ...` rows whose destination and mask
/// are 0 and that are up (flag 0x1).
fn parse_default_routes(table: &str) -> Vec<String> {
    let mut out = Vec::new();
    for row in table.lines().skip(1) {
        let f: Vec<&str> = row.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let up = u32::from_str_radix(f[3], 16).is_ok_and(|flags| flags & 1 == 1);
        if f[1] == "00000000" && f[7] == "00000000" && up && !out.iter().any(|d| d == f[0]) {
            out.push(f[0].to_string());
        }
    }
    out
}

/// Interface names in this network namespace.
fn interfaces() -> Vec<String> {
    let mut names = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed
    // below with if_freenameindex.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return names;
        }
        let mut p = list;
        while (*p).if_index != 0 {
            names.push(CStr::from_ptr((*p).if_name).to_string_lossy().into_owned());
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    names
}

#[cfg(test)]
mod tests {
    use super::{health_check_ips, manifest_change_complete, parse_default_routes};
    use notify::event::{
        AccessKind, AccessMode, CreateKind, DataChange, EventKind, MetadataKind, ModifyKind,
        RemoveKind, RenameMode,
    };

    #[test]
    fn health_checks_listen_where_nodeports_are_served() {
        let ips = [
            "172.18.0.2".parse().unwrap(),
            "192.168.9.2".parse().unwrap(),
        ];
        assert_eq!(
            health_check_ips(&[], &ips),
            ["0.0.0.0".parse::<std::net::IpAddr>().unwrap()]
        );
        let narrowed = health_check_ips(&["172.18.0.0/24".parse().unwrap()], &ips);
        assert_eq!(
            narrowed,
            ["172.18.0.2".parse::<std::net::IpAddr>().unwrap()]
        );
        assert!(health_check_ips(&["10.0.0.0/8".parse().unwrap()], &ips).is_empty());
    }

    #[test]
    fn the_default_route_names_the_node_device() {
        let table =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t00000000\t010012AC\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
            eth0\t000012AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
            veth1\t0A01F40A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n";
        assert_eq!(parse_default_routes(table), ["eth0"]);
        assert!(parse_default_routes("Iface\tDestination\n").is_empty());
    }

    #[test]
    fn only_finished_changes_trigger_a_reread() {
        let finished = [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Remove(RemoveKind::File),
        ];
        let in_progress = [
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            // Truncation by `open(O_TRUNC)` raises this one.
            EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)),
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
        ];
        for kind in finished {
            assert!(manifest_change_complete(&kind), "{kind:?}");
        }
        for kind in in_progress {
            assert!(!manifest_change_complete(&kind), "{kind:?}");
        }
    }
}
