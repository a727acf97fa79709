use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};
use dp::{
    agent::AgentOptions,
    inspect::pinned::{text, CtFilter, PinnedMaps},
    kernel::sizing::{ConntrackSizing, NodeResources},
    translate::Cidr,
};
use regex::Regex;

/// dp: an eBPF dataplane that replaces kube-proxy.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines (on stderr) as `text`, coloured only on a terminal and
    /// never with NO_COLOR set, or as `json`, one object per line, for log
    /// pipelines.
    #[arg(long, global = true, env = "DP_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

/// A `--service-cidr` element: an IPv4 or IPv6 CIDR.
fn service_cidr(s: &str) -> Result<Option<Cidr>, String> {
    s.trim().parse().map(Some)
}

/// CIDRs of a flag that takes at most one per family (`--cluster-cidr`).
fn one_per_family(flag: &str, cidrs: Vec<Cidr>) -> anyhow::Result<Vec<Cidr>> {
    for family in [dp::translate::IpFamily::V4, dp::translate::IpFamily::V6] {
        if cidrs.iter().filter(|c| c.family() == family).count() > 1 {
            anyhow::bail!("{flag}: more than one {} CIDR", family.name());
        }
    }
    Ok(cidrs)
}

/// The log subscriber: RUST_LOG's filter (default `info`), on stderr.
fn init_logging(format: &str) {
    use std::io::IsTerminal as _;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        // `kubectl logs` and files get plain text (https://no-color.org).
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        builder
            .with_ansi(std::io::stderr().is_terminal() && !no_color)
            .init();
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the per-node agent: keep the datapath in step with the cluster's
    /// Services and EndpointSlices.
    Agent(Box<AgentArgs>),
    /// Service frontends and their backends, from the pinned maps.
    Service {
        #[command(subcommand)]
        command: ListCommand,
    },
    /// Backends, from the pinned maps.
    Backend {
        #[command(subcommand)]
        command: ListCommand,
    },
    /// Connection tracking entries: list or flush.
    Ct {
        #[command(subcommand)]
        command: CtCommand,
    },
    /// Packets and bytes per hook and reason.
    Stats(Inspect),
    /// The agent's health, what is attached, how full the maps are.
    Status {
        #[command(flatten)]
        inspect: Inspect,
        /// The agent's --healthz-addr, as reachable from here.
        #[arg(long, default_value = "127.0.0.1:10256")]
        healthz_addr: SocketAddr,
    },
    /// What the datapath will do with a packet, from the live (pinned)
    /// maps, without sending one.
    Explain {
        #[command(flatten)]
        inspect: Inspect,
        /// Source: IP or IP:PORT (with a port, conntrack is consulted too).
        #[arg(long)]
        from: String,
        /// Destination: IP:PORT or IP:PORT/PROTO (tcp, udp, sctp; default tcp).
        #[arg(long)]
        to: String,
    },
    /// Stream the datapath's decisions, one line per packet, in Kubernetes
    /// terms. Filters run in the kernel; Ctrl-C stops.
    Trace(TraceArgs),
    /// Detach everything and remove dp's pinned maps and links.
    Cleanup {
        /// The agent's bpffs directory.
        #[arg(long, default_value = "/sys/fs/bpf/dp", env = "DP_BPFFS")]
        bpffs: PathBuf,
    },
    /// Remove what kube-proxy's iptables and nftables modes left on this
    /// node (its chains and jump rules, IPv4 and IPv6, nft and legacy; its
    /// nftables tables), as its `--cleanup` does; kubelet's and other
    /// programs' rules stay. Not IPVS mode. Run after deleting kube-proxy's
    /// DaemonSet, with root (docs/deploy.md).
    CleanupKubeProxy {
        /// Print the iptables-restore input and nft commands instead.
        #[arg(long)]
        dry_run: bool,
    },
    /// A Kubernetes networking lab of network namespaces on this machine:
    /// nodes, pods with servers, a client, dp or kube-proxy's rules.
    Lab {
        #[command(subcommand)]
        command: LabCommand,
    },
    /// Print (or apply here) the rules kube-proxy would write for a
    /// directory of manifests: `iptables-restore` input or an `nft -f`
    /// transaction.
    KubeProxyRules {
        /// `iptables` or `nftables`.
        #[arg(long, default_value = "iptables")]
        mode: String,
        #[arg(long)]
        manifests: PathBuf,
        #[arg(long, default_value = "node1")]
        node_name: String,
        /// The node's addresses, of one or both families (repeat the flag).
        #[arg(long = "node-ip")]
        node_ips: Vec<std::net::IpAddr>,
        /// detect-local-mode ClusterCIDR, one per family, comma-separated
        /// (e.g. `10.244.0.0/16,fd00:10:244::/56`).
        #[arg(long, value_delimiter = ',')]
        cluster_cidr: Vec<Cidr>,
        /// nftables mode: drop traffic to unallocated ClusterIPs in it; one
        /// per family, comma-separated.
        #[arg(long, value_delimiter = ',')]
        service_cidr: Vec<Cidr>,
        /// Which family's rules to print, as kube-proxy's proxier for it
        /// writes them: `ipv4` (`iptables-restore` input, `table ip
        /// kube-proxy`) or `ipv6` (`ip6tables-restore` input, `table ip6
        /// kube-proxy`), from the Service ports of that family. `--apply`
        /// ignores it and syncs every family the node addresses or the
        /// Services have.
        #[arg(long, default_value = "ipv4", value_parser = ["ipv4", "ipv6"])]
        family: String,
        /// Apply them in this network namespace (a full sync, as kube-proxy
        /// starts) instead of printing; iptables mode uses `iptables-nft`
        /// (`ip6tables-nft` for IPv6) unless `--legacy`.
        #[arg(long)]
        apply: bool,
        #[arg(long)]
        legacy: bool,
    },
}

#[derive(Subcommand)]
enum LabCommand {
    /// Build the lab: nodes, pods serving HTTP/UDP/DNS, a client, the
    /// dataplane, and the example Services (or --manifests).
    Up {
        #[command(flatten)]
        lab: LabName,
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        #[arg(long, value_enum, default_value = "dp")]
        mode: dp::lab::Mode,
        /// Address families: members get addresses of each (kind's
        /// fd00:10:244::/56 pods, fd00:10:96::/112 Services), and the
        /// dual-stack examples are loaded (`ipv6`: their IPv6 half).
        #[arg(long, value_enum, default_value = "ipv4")]
        ip_family: dp::lab::IpFamilies,
        /// The agents' socket-level load balancing (dp mode): each node's
        /// hooks on a cgroup of its own, which `dp lab exec <node>` (with
        /// `all`, also `<pod>`) runs in.
        #[arg(long, value_enum, default_value = "off")]
        socket_lb: dp::agent::SocketLb,
        /// A directory of Service/EndpointSlice manifests to serve instead
        /// of the examples (`--ip-family ipv6`: their IPv6 half).
        #[arg(long)]
        manifests: Option<PathBuf>,
    },
    /// Remove everything of the lab (also after a crash).
    Down {
        #[command(flatten)]
        lab: LabName,
    },
    /// Members, processes and services.
    Status {
        #[command(flatten)]
        lab: LabName,
    },
    /// Run a command in a member's network namespace: a pod (pod-1-0), a
    /// node (node1; `dp` commands there use its pins) or the client.
    Exec {
        #[command(flatten)]
        lab: LabName,
        /// `node1`, `pod-1-0`, `client` (see `dp lab status`).
        member: String,
        /// The command, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Add or replace a manifest file; returns once every node serves it.
    Apply {
        #[command(flatten)]
        lab: LabName,
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// The guided tour: a lab with dp, then with kube-proxy's iptables
    /// rules, the same traffic, what explains it, a comparison; then down.
    Demo,
    /// (internal) The servers of one lab pod.
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        pod: String,
        #[arg(long)]
        node: String,
        /// The lab's state directory (names the process as the lab's).
        #[arg(long)]
        state_dir: PathBuf,
    },
}

#[derive(Args)]
struct LabName {
    /// Which lab (letters and digits); several can run side by side.
    #[arg(long, default_value = dp::lab::DEFAULT_NAME, env = "DP_LAB")]
    name: String,
}

impl LabName {
    fn lab(&self) -> anyhow::Result<dp::lab::Lab> {
        dp::lab::Lab::new(&self.name)
    }
}

/// Where the maps are, and how to print.
#[derive(Args)]
struct Inspect {
    /// The agent's bpffs directory.
    #[arg(long, default_value = "/sys/fs/bpf/dp", env = "DP_BPFFS")]
    bpffs: PathBuf,
    /// `text` or `json` (one JSON document).
    #[arg(short = 'o', long, default_value = "text")]
    output: String,
}

#[derive(Args)]
struct TraceArgs {
    #[command(flatten)]
    inspect: Inspect,
    /// Only packets to or from this Service (`namespace/name`).
    #[arg(long)]
    service: Option<String>,
    /// Only packets with this source or destination address (as they arrived).
    #[arg(long)]
    ip: Option<std::net::IpAddr>,
    /// Only packets with this source or destination port (as they arrived).
    #[arg(long)]
    port: Option<u16>,
    /// Only this protocol: tcp, udp, sctp, icmp, icmpv6 or a number.
    #[arg(long = "proto")]
    protocol: Option<String>,
    /// Only these verdicts: forwarded, rejected, dropped, passed.
    #[arg(long, value_delimiter = ',')]
    verdict: Vec<String>,
    /// Only these reasons: ids as in `dp stats` (no_endpoints) or numbers.
    #[arg(long, value_delimiter = ',')]
    reason: Vec<String>,
    /// Only packets seen on this interface.
    #[arg(long)]
    interface: Option<String>,
    /// Stop after N packets.
    #[arg(long)]
    count: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// First print the drops and rejects the datapath kept (the last 64 per
    /// CPU) from this long ago: `90s`, `5m`, `1h`.
    #[arg(long)]
    since: Option<String>,
    /// Also write the packets' headers to FILE as pcapng, with the verdict
    /// and reason as each packet's comment.
    #[arg(short = 'w', long = "write")]
    write: Option<PathBuf>,
    /// For drops and rejects: the likely cause and the next command to run.
    #[arg(long)]
    explain: bool,
}

impl TraceArgs {
    fn filter(&self) -> anyhow::Result<dp::inspect::trace::TraceFilter> {
        use dp::inspect::trace::{parse_protocol, parse_reason, parse_verdict, TraceFilter};
        Ok(TraceFilter {
            service: self.service.clone(),
            ip: self.ip,
            port: self.port,
            protocol: match &self.protocol {
                Some(p) => Some(parse_protocol(p).ok_or_else(|| {
                    anyhow::anyhow!("--proto {p}: use tcp, udp, sctp, icmp, icmpv6 or a number")
                })?),
                None => None,
            },
            verdicts: self
                .verdict
                .iter()
                .map(|v| {
                    parse_verdict(v).ok_or_else(|| {
                        anyhow::anyhow!("--verdict {v}: use forwarded, rejected, dropped or passed")
                    })
                })
                .collect::<anyhow::Result<_>>()?,
            reasons: self
                .reason
                .iter()
                .map(|r| {
                    parse_reason(r).ok_or_else(|| {
                        anyhow::anyhow!("--reason {r}: not a reason id or number (see `dp stats`)")
                    })
                })
                .collect::<anyhow::Result<_>>()?,
            interface: self.interface.clone(),
        })
    }
}

#[derive(Subcommand)]
enum ListCommand {
    List(Inspect),
}

#[derive(Subcommand)]
enum CtCommand {
    List {
        #[command(flatten)]
        inspect: Inspect,
        #[command(flatten)]
        filter: CtFilterArgs,
    },
    Flush {
        #[command(flatten)]
        inspect: Inspect,
        #[command(flatten)]
        filter: CtFilterArgs,
    },
}

#[derive(Args)]
struct CtFilterArgs {
    /// Only entries of this service (`namespace/name`).
    #[arg(long)]
    service: Option<String>,
    /// Only entries with this address (client, service, backend or masquerade).
    #[arg(long)]
    ip: Option<std::net::IpAddr>,
}

fn print<T: serde::Serialize>(inspect: &Inspect, rows: &T, text: String) -> anyhow::Result<()> {
    match inspect.output.as_str() {
        "json" => println!("{}", serde_json::to_string_pretty(rows)?),
        "text" => print!("{text}"),
        other => anyhow::bail!("-o {other}: use text or json"),
    }
    Ok(())
}

/// `dp agent --help`'s closing text: kube-proxy's settings and behaviours
/// and dp's (docs/deploy.md has the full table).
const KUBE_PROXY_PARITY: &str = "\
dp and kube-proxy (nftables mode where its modes differ; docs/deploy.md has the full table):
  --cluster-cidr, --masquerade-all, --nodeport-addresses  same flags, same rules
                                  (--nodeport-addresses also narrows health check ports)
  --conntrack-max-per-core, --conntrack-min  same names: size dp's own conntrack map
  --healthz-bind-address, --metrics-bind-address  --healthz-addr, --metrics-addr
  Service CIDRs                   ServiceCIDR objects, else --service-cidr: unallocated
                                  ClusterIPs dropped
  no usable endpoints             REJECT on every frontend; DROP only for a Local policy
                                  with endpoints elsewhere
  loadBalancerSourceRanges, leading-zero addresses, SCTP  as kube-proxy
Differences:
  IPv6/dual-stack                 not served yet
  localhost:NodePort              not served (as in nftables mode)
  a node to its own IP:NodePort   not served: over lo, where no dp program runs
                                  (`dp explain` says node_to_own_address)
  --conntrack-*-timeout-*         not read: fixed timeouts";

/// `dp agent`'s flags. Each can also be set by the environment variable
/// named in `--help` (a DaemonSet takes them from a ConfigMap: see
/// deploy/configmap.yaml).
#[derive(Args)]
#[command(after_long_help = KUBE_PROXY_PARITY)]
struct AgentArgs {
    /// Kubeconfig file (or KUBECONFIG); without either, the in-cluster
    /// config (service account token and CA, KUBERNETES_SERVICE_HOST/PORT).
    #[arg(long, conflicts_with = "manifests")]
    kubeconfig: Option<PathBuf>,
    /// A directory of Service, EndpointSlice and Node manifests, watched.
    #[arg(long, env = "DP_MANIFESTS")]
    manifests: Option<PathBuf>,
    /// This node's name (its Node object, `nodeName` of local endpoints); in
    /// a pod, from the downward API.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// This node's addresses, IPv4 and IPv6, comma-separated (default:
    /// from the Node object). The first of each family is the masquerade
    /// source for that family.
    #[arg(long = "node-ip", env = "DP_NODE_IPS", value_delimiter = ',')]
    node_ips: Vec<std::net::IpAddr>,
    /// Node-facing devices (external traffic enters, SNATed traffic leaves);
    /// default: the device of the IPv4 default route.
    #[arg(long, env = "DP_DEVICES", value_delimiter = ',')]
    devices: Vec<String>,
    /// Regex of host-side pod veth names, attached as they appear. The
    /// default fits kindnet and bridge CNIs (veth*), Calico (cali*) and
    /// Cilium-style names (lxc*).
    #[arg(long, env = "DP_POD_DEVICES", default_value = dp::agent::DEFAULT_POD_DEVICES)]
    pod_devices: Regex,
    /// XDP on the node devices: `on`, or `off` where the device's peer
    /// cannot take XDP_TX frames (veth nodes such as kind's): tc alone then
    /// does the same work.
    #[arg(long, env = "DP_XDP", value_enum, default_value = "on")]
    xdp: dp::agent::Xdp,
    /// How the tc programs attach: `tcx` (Linux 6.6 and newer), `netlink`
    /// (tc filters on a clsact qdisc, for older kernels), or `auto` (tcx
    /// where the kernel has it).
    #[arg(long, env = "DP_TC_ATTACH", value_enum, default_value = "auto")]
    tc_attach: dp::agent::TcAttachChoice,
    /// Socket-level load balancing: `host` points the node's own sockets
    /// (its processes, hostNetwork pods) at a backend at connect() or
    /// sendto(), so tc translates none of their packets, and serves
    /// NodePorts on 127.0.0.1; `all` pods' sockets too (what kube-proxy
    /// masquerades stays with tc); `off` leaves every connection to tc
    /// (docs/deploy.md).
    #[arg(long, env = "DP_SOCKET_LB", value_enum, default_value = "off")]
    socket_lb: dp::agent::SocketLb,
    /// The cgroup v2 directory the socket hooks attach to (default: the
    /// hierarchy's root, from /proc/self/mounts).
    #[arg(long, env = "DP_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    /// kube-proxy's --cluster-cidr, one per family, comma-separated (e.g.
    /// `10.244.0.0/16,fd00:10:244::/56`): service traffic from outside the
    /// CIDR of its family is masqueraded.
    #[arg(long, env = "DP_CLUSTER_CIDR", value_delimiter = ',')]
    cluster_cidr: Vec<Cidr>,
    /// NodePorts only on node addresses in these CIDRs (default: all).
    #[arg(long, env = "DP_NODEPORT_ADDRESSES", value_delimiter = ',')]
    nodeport_addresses: Vec<Cidr>,
    /// The Service CIDRs, one per family, comma-separated: traffic to an
    /// address in them that no Service has is dropped (kube-proxy nftables
    /// mode). The API's ServiceCIDR objects take precedence where served.
    #[arg(long, env = "DP_SERVICE_CIDR", value_delimiter = ',', value_parser = service_cidr)]
    service_cidr: Vec<Option<Cidr>>,
    /// Masquerade all service traffic (kube-proxy's --masquerade-all).
    #[arg(long, env = "DP_MASQUERADE_ALL")]
    masquerade_all: bool,
    /// Replies the datapath builds itself (REJECT's ICMP port unreachable,
    /// TCP resets to removed backends) per second and CPU; 0: no limit. The
    /// kernel's ICMP rate limit does not see them; this is theirs (the
    /// default is the kernel's icmp_msgs_per_sec). Replies over it are not
    /// sent: the packet is dropped and counted (reject_rate_limited,
    /// reset_rate_limited).
    #[arg(long, env = "DP_REPLY_RATE_LIMIT", default_value_t = common::config::DEFAULT_REPLY_RATE)]
    reply_rate_limit: u32,
    /// How many such replies may go at once, per CPU (the kernel's
    /// icmp_msgs_burst).
    #[arg(long, env = "DP_REPLY_BURST", default_value_t = common::config::DEFAULT_REPLY_BURST)]
    reply_burst: u32,
    /// How often the maps are read back and whatever differs from the
    /// desired state written again, in seconds (kube-proxy's --sync-period);
    /// 0: never. A failed sync is retried sooner, with backoff.
    #[arg(long, env = "DP_SYNC_PERIOD", default_value_t = 30)]
    sync_period: u64,
    /// How often conntrack entries past their deadline are deleted, in
    /// seconds (on a thread of the agent's own); 0: never (the LRU map then
    /// evicts entries, perhaps live ones, once full).
    #[arg(long, env = "DP_CT_GC_INTERVAL", default_value_t = 30)]
    ct_gc_interval: u64,
    /// bpffs directory for pinned maps and links (a bpffs is mounted on
    /// /sys/fs/bpf, or there, if it is not on one).
    #[arg(long, default_value = "/sys/fs/bpf/dp", env = "DP_BPFFS")]
    bpffs: PathBuf,
    /// Prometheus metrics address.
    #[arg(long, env = "DP_METRICS_ADDR", default_value = "127.0.0.1:10249")]
    metrics_addr: SocketAddr,
    /// /healthz and /livez address.
    #[arg(long, env = "DP_HEALTHZ_ADDR", default_value = "0.0.0.0:10256")]
    healthz_addr: SocketAddr,
    /// Capacity of the service map (frontends x (slots + 1) + addresses);
    /// allocated on use, so a large one costs only its buckets (16 B per
    /// entry). The reverse-NAT map gets half of it.
    #[arg(long, env = "DP_MAP_SIZE_SERVICES", default_value_t = common::map_sizes::SERVICES)]
    map_size_services: u32,
    /// Capacity of the backend map (allocated on use).
    #[arg(long, env = "DP_MAP_SIZE_BACKENDS", default_value_t = common::map_sizes::BACKENDS)]
    map_size_backends: u32,
    /// Capacity of the conntrack map in entries (two per connection),
    /// instead of the rule of the --conntrack-* flags.
    #[arg(long, env = "DP_MAP_SIZE_CONNTRACK")]
    map_size_conntrack: Option<u32>,
    /// Conntrack connections per CPU core of the node (kube-proxy's flag of
    /// the same name); the conntrack map holds max(--conntrack-min, this x
    /// cores) connections, capped by --conntrack-memory-ratio.
    #[arg(long, env = "DP_CONNTRACK_MAX_PER_CORE", default_value_t = ConntrackSizing::default().max_per_core)]
    conntrack_max_per_core: u32,
    /// Conntrack connections at least, whatever the cores (kube-proxy's flag
    /// of the same name).
    #[arg(long, env = "DP_CONNTRACK_MIN", default_value_t = ConntrackSizing::default().min)]
    conntrack_min: u32,
    /// At most this fraction of the node's memory for the conntrack map
    /// (Cilium's --bpf-map-dynamic-size-ratio default).
    #[arg(long, env = "DP_CONNTRACK_MEMORY_RATIO", default_value_t = ConntrackSizing::default().memory_ratio)]
    conntrack_memory_ratio: f64,
    /// Capacity of the session-affinity map (LRU), instead of one entry per
    /// four conntrack entries.
    #[arg(long, env = "DP_MAP_SIZE_AFFINITY")]
    map_size_affinity: Option<u32>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    match cli.command {
        Command::Lab { command } => lab(command),
        Command::CleanupKubeProxy { dry_run } => {
            let report = dp::kube_proxy::cleanup::cleanup(dry_run)?;
            let verb = if dry_run { "would remove" } else { "removed" };
            if report.is_empty() {
                println!("nothing of kube-proxy's found");
            }
            for line in report {
                println!("{verb} {line}");
            }
            Ok(())
        }
        Command::Service {
            command: ListCommand::List(i),
        } => {
            let rows = PinnedMaps::open(&i.bpffs)?.services()?;
            print(&i, &rows, text::services(&rows))
        }
        Command::Backend {
            command: ListCommand::List(i),
        } => {
            let rows = PinnedMaps::open(&i.bpffs)?.backends()?;
            print(&i, &rows, text::backends_table(&rows))
        }
        Command::Ct {
            command: CtCommand::List { inspect, filter },
        } => {
            let filter = CtFilter {
                service: filter.service,
                ip: filter.ip,
            };
            let rows = PinnedMaps::open(&inspect.bpffs)?.conntrack(&filter)?;
            print(&inspect, &rows, text::conntrack(&rows))
        }
        Command::Ct {
            command: CtCommand::Flush { inspect, filter },
        } => {
            let filter = CtFilter {
                service: filter.service,
                ip: filter.ip,
            };
            let n = PinnedMaps::open(&inspect.bpffs)?.flush_conntrack(&filter)?;
            print(
                &inspect,
                &serde_json::json!({"flushed": n}),
                format!("flushed {n} entries\n"),
            )
        }
        Command::Explain { inspect, from, to } => {
            let (from_ip, from_port) = match from.parse::<std::net::SocketAddr>() {
                Ok(sa) => (sa.ip(), Some(sa.port())),
                Err(_) => (from.parse()?, None),
            };
            let (to, protocol) = match to.split_once('/') {
                Some((addr, "tcp" | "TCP")) => (addr.parse()?, common::proto::IPPROTO_TCP),
                Some((addr, "udp" | "UDP")) => (addr.parse()?, common::proto::IPPROTO_UDP),
                Some((addr, "sctp" | "SCTP")) => (addr.parse()?, common::proto::IPPROTO_SCTP),
                Some((_, p)) => anyhow::bail!("--to: protocol {p:?}: use tcp, udp or sctp"),
                None => (to.parse()?, common::proto::IPPROTO_TCP),
            };
            let e = PinnedMaps::open(&inspect.bpffs)?.explain(from_ip, from_port, to, protocol)?;
            print(&inspect, &e, text::explanation(&e))
        }
        Command::Status {
            inspect,
            healthz_addr,
        } => {
            let s = dp::inspect::pinned::status(&inspect.bpffs, healthz_addr)?;
            print(&inspect, &s, text::status(&s))
        }
        Command::Stats(i) => {
            let rows = PinnedMaps::open(&i.bpffs)?.stats()?;
            print(&i, &rows, text::stats(&rows))
        }
        Command::Trace(t) => {
            let json = match t.inspect.output.as_str() {
                "json" => true,
                "text" => false,
                other => anyhow::bail!("-o {other}: use text or json"),
            };
            let opts = dp::inspect::trace::StreamOptions {
                json,
                explain: t.explain,
                count: t.count,
                duration: t.duration.map(std::time::Duration::from_secs_f64),
                pcapng: t.write.clone(),
                since: match &t.since {
                    Some(s) => Some(
                        dp::inspect::trace::parse_duration(s)
                            .ok_or_else(|| anyhow::anyhow!("--since {s}: use 90s, 5m or 1h"))?,
                    ),
                    None => None,
                },
            };
            let filter = t.filter()?;
            dp::inspect::trace::stream(
                &t.inspect.bpffs,
                &filter,
                &opts,
                &mut std::io::stdout().lock(),
            )?;
            Ok(())
        }
        Command::KubeProxyRules {
            mode,
            manifests,
            node_name,
            node_ips,
            cluster_cidr,
            service_cidr,
            family,
            apply,
            legacy,
        } => {
            use dp::kube_proxy::{
                apply::{Applier, Backend},
                iptables, nftables, ProxyConfig,
            };
            let objects = dp::source::manifests::load_dir(&manifests)?;
            let node = dp::translate::NodeInfo {
                name: node_name,
                ips: node_ips.clone(),
                zone: None,
            };
            let mut skipped = objects.skipped.clone();
            let ports = dp::translate::service_ports(
                &objects.services,
                &objects.slices,
                &node,
                &mut skipped,
            );
            for s in &skipped {
                eprintln!("skipped {}: {}", s.object, s.reason);
            }
            let config = ProxyConfig {
                cluster_cidrs: one_per_family("--cluster-cidr", cluster_cidr)?,
                service_cidrs: one_per_family("--service-cidr", service_cidr)?,
                node_ips,
                ..ProxyConfig::default()
            };
            let family = if family == "ipv6" {
                dp::translate::IpFamily::V6
            } else {
                dp::translate::IpFamily::V4
            };
            let backend = match (mode.as_str(), legacy) {
                ("iptables", false) => Backend::IptablesNft,
                ("iptables", true) => Backend::IptablesLegacy,
                ("nftables", _) => Backend::Nftables,
                (other, _) => anyhow::bail!("--mode {other}: iptables or nftables"),
            };
            if apply {
                let report = Applier::new(backend, config, Vec::new()).sync(&ports, true)?;
                println!(
                    "{}: {} rules applied in {:.3} s",
                    backend.name(),
                    report.rules,
                    (report.generate + report.apply).as_secs_f64()
                );
            } else if backend == Backend::Nftables {
                let tx = nftables::transaction(&ports, &config, family, None);
                print!("{}", tx.text);
            } else {
                let empty = std::collections::BTreeSet::new();
                let restore = iptables::restore(&ports, &config, family, None, &empty);
                print!("{}", restore.text);
            }
            Ok(())
        }
        Command::Cleanup { bpffs } => {
            // Also an agent's state seen through its process (`ip netns exec`).
            let bpffs = dp::kernel::pin::find_state(&bpffs).unwrap_or(bpffs);
            let filters = dp::kernel::loader::detach_netlink_filters(&bpffs);
            if !filters.is_empty() {
                println!(
                    "removed {} netlink tc filters: {}",
                    filters.len(),
                    filters.join(", ")
                );
            }
            let removed = dp::kernel::pin::cleanup(&bpffs)?;
            println!("removed {} pins under {}", removed.len(), bpffs.display());
            Ok(())
        }
        Command::Agent(a) => {
            let a = *a;
            let opts = AgentOptions {
                kubeconfig: a.kubeconfig,
                manifests: a.manifests,
                node_name: a.node_name,
                node_ips: a.node_ips,
                devices: a.devices,
                pod_devices: Some(a.pod_devices),
                xdp: a.xdp,
                tc_attach: a.tc_attach,
                socket_lb: a.socket_lb,
                cgroup_root: a.cgroup_root,
                cluster_cidrs: one_per_family("--cluster-cidr", a.cluster_cidr)?,
                nodeport_addresses: a.nodeport_addresses,
                service_cidrs: a.service_cidr.into_iter().flatten().collect(),
                masquerade_all: a.masquerade_all,
                reply_limit: (a.reply_rate_limit, a.reply_burst),
                sync_period: std::time::Duration::from_secs(a.sync_period),
                ct_gc_interval: std::time::Duration::from_secs(a.ct_gc_interval),
                bpffs: a.bpffs,
                metrics_addr: a.metrics_addr,
                healthz_addr: a.healthz_addr,
                map_sizes: {
                    let node = NodeResources::of_this_node();
                    let capacity = ConntrackSizing {
                        max_per_core: a.conntrack_max_per_core,
                        min: a.conntrack_min,
                        memory_ratio: a.conntrack_memory_ratio,
                        entries: a.map_size_conntrack,
                        affinity_entries: a.map_size_affinity,
                    }
                    .capacity(node);
                    tracing::info!(
                        cores = node.cores,
                        memory_mib = node.memory_bytes >> 20,
                        conntrack_entries = capacity.conntrack_entries,
                        affinity_entries = capacity.affinity_entries,
                        "map sizes"
                    );
                    dp::MapSizes {
                        services: a.map_size_services,
                        backends: a.map_size_backends,
                        revnat: (a.map_size_services / 2).max(1),
                        conntrack: capacity.conntrack_entries,
                        affinity: capacity.affinity_entries,
                    }
                },
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(dp::agent::run(opts))
        }
    }
}

fn lab(command: LabCommand) -> anyhow::Result<()> {
    let out = &mut std::io::stdout().lock();
    match command {
        LabCommand::Up {
            lab,
            nodes,
            mode,
            ip_family,
            socket_lb,
            manifests,
        } => {
            let lab = lab.lab()?;
            lab.up(
                &dp::lab::UpOptions {
                    nodes,
                    mode,
                    ip_family,
                    socket_lb,
                    manifests,
                },
                out,
            )?;
            use std::io::Write;
            let url = if ip_family == dp::lab::IpFamilies::Ipv4 {
                "http://10.96.0.80/"
            } else {
                "http://[fd00:10:96::80]/"
            };
            writeln!(
                out,
                "try: dp lab exec{} client -- curl -s {url}   (dp lab status, dp lab down)",
                if lab.name == dp::lab::DEFAULT_NAME {
                    String::new()
                } else {
                    format!(" --name {}", lab.name)
                }
            )?;
            Ok(())
        }
        LabCommand::Down { lab } => {
            let lab = lab.lab()?;
            let r = lab.down()?;
            use std::io::Write;
            if r.namespaces == 0 && r.processes == 0 && !r.state {
                writeln!(out, "no lab {:?} here", lab.name)?;
            } else {
                writeln!(
                    out,
                    "lab {:?} removed: {} processes stopped, {} namespaces deleted",
                    lab.name, r.processes, r.namespaces
                )?;
            }
            Ok(())
        }
        LabCommand::Status { lab } => lab.lab()?.status(out),
        LabCommand::Exec {
            lab,
            member,
            command,
        } => lab.lab()?.exec(&member, &command),
        LabCommand::Apply { lab, file } => lab.lab()?.apply(&file, out),
        LabCommand::Demo => dp::lab::demo::run(out),
        LabCommand::Serve {
            pod,
            node,
            state_dir: _,
        } => dp::lab::serve::run(dp::lab::serve::Identity { pod, node }),
    }
}
