//! A small "cluster" of namespaces, shaped like a kind cluster:
//!
//! ```text
//!                 net (bridge br0 172.18.0.1/16: the node network)
//!        ┌──────────────┼───────────────────┬──────────────┐
//!   node1 eth0 172.18.0.2    node2 eth0 172.18.0.3    client eth0 172.18.0.100
//!    ├ veth1a2b3c4d ── pod eth0 10.244.1.10   ├ veth… ── pod 10.244.2.10
//!    ├ veth5e6f7a8b ── pod eth0 10.244.1.11   ...
//! ```
//!
//! A node is what kind's node image and kindnet make it (see
//! `../shared/reference/kind-node.md`), and no friendlier:
//!
//! - kind's sysctls: `rp_filter = 1` (strict reverse-path filtering) on
//!   `all`, `default` (so every device created later has it) and the
//!   loopback, `accept_local = 0`, `route_localnet = 1`, `arp_ignore = 0`,
//!   `ip_forward = 1`; `send_redirects` left at the kernel's default.
//! - kindnet's ptp shape: each pod's host-side veth is `veth` plus 8 hex
//!   digits and carries the node's pod gateway (10.244.N.1/32); the node
//!   has a /32 route per pod through it; the pod routes everything via the
//!   gateway.
//! - Pods keep TX checksum offload on, as kind pods do: their packets reach
//!   the node partially checksummed (`CHECKSUM_PARTIAL`).
//!
//! One thing differs, for a reason: the nodes' and the client's `eth0` finish
//! checksums in software (`full_checksums`). These tests run dp's XDP
//! program on `eth0`, which sees no skb metadata and sends frames back out
//! as they are (`XDP_TX`); on kind dp runs with `--xdp off`.
//!
//! Nodes route each other's pod CIDR (10.244.N.0/24) via the node network.
//! The client is outside the cluster CIDR (10.244.0.0/16). Nothing connects
//! to the caller's namespace.
//!
//! Dual-stack (`Cluster::new_dual`), as kind builds a cluster with
//! `ipFamily: dual`: IPv6 too everywhere, from kind's defaults. Nodes
//! fc00:f853:ccd:e793::N/64 on the node network (the gateway ::1, the
//! client ::100), pods fd00:10:244:N::M behind the node's pod gateway
//! fd00:10:244:N::1, the way kindnet's ptp plugin wires IPv6 pods; the
//! nodes get kind's IPv6 sysctls (`KIND_NODE_SYSCTLS_IPV6`: forwarding on).
//! Addresses are added without duplicate address detection, as a CNI
//! waits for it to settle before the pod runs.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::OwnedFd,
};

use crate::{Netns, Result, Topology};

pub const CLUSTER_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 244, 0, 0), 16);
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
pub const NODE_NETWORK_GATEWAY: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 1);
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);
/// kind's dual-stack defaults: the pod CIDR (a /64 per node) and the
/// Service CIDR.
pub const CLUSTER_CIDR6: (Ipv6Addr, u8) = (Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 0), 56);
pub const SERVICE_CIDR6: &str = "fd00:10:96::/112";
/// The node network's IPv6 prefix (a /64; Docker's IPv6 network for kind).
pub const NODE_NETWORK6: Ipv6Addr = Ipv6Addr::new(0xfc00, 0xf853, 0xccd, 0xe793, 0, 0, 0, 0);
pub const NODE_NETWORK_GATEWAY6: Ipv6Addr = node_network6(1);
pub const CLIENT_IP6: Ipv6Addr = node_network6(0x100);

/// Address `host` of the node network's IPv6 prefix.
pub const fn node_network6(host: u16) -> Ipv6Addr {
    let s = NODE_NETWORK6.segments();
    Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, host)
}

/// The sysctls of a kind node, set in each node namespace before any device
/// exists there (devices created later take `default`'s values). From
/// kind's `10-network-security.conf` and `10-network-magic.conf`; the rest
/// are the kernel's defaults, written out so a test cannot inherit others.
pub const KIND_NODE_SYSCTLS: [(&str, &str); 9] = [
    ("net.ipv4.ip_forward", "1"),
    ("net.ipv4.conf.all.rp_filter", "1"),
    ("net.ipv4.conf.default.rp_filter", "1"),
    ("net.ipv4.conf.lo.rp_filter", "1"),
    ("net.ipv4.conf.all.accept_local", "0"),
    ("net.ipv4.conf.default.accept_local", "0"),
    ("net.ipv4.conf.lo.accept_local", "0"),
    ("net.ipv4.conf.all.route_localnet", "1"),
    ("net.ipv4.conf.all.arp_ignore", "0"),
];

/// What kind adds on the nodes of a cluster with IPv6 (`networking.ipFamily:
/// ipv6` or `dual`): `docker run --sysctl` for both (kind's docker
/// provider, `provision.go`). IPv6 has no reverse-path filter or
/// `accept_local` of its own.
pub const KIND_NODE_SYSCTLS_IPV6: [(&str, &str); 2] = [
    ("net.ipv6.conf.all.disable_ipv6", "0"),
    ("net.ipv6.conf.all.forwarding", "1"),
];

#[derive(Clone, Debug)]
pub struct Node {
    /// Namespace role in the topology, e.g. `node1`.
    pub name: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 address in a dual-stack cluster.
    pub ip6: Option<Ipv6Addr>,
    /// The node-facing device.
    pub device: String,
    /// Host-side pod veths on this node.
    pub pod_devices: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Pod {
    /// Namespace role, e.g. `pod-1-0` (node 1, pod 0).
    pub name: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 address in a dual-stack cluster.
    pub ip6: Option<Ipv6Addr>,
    /// Index into `Cluster::nodes`.
    pub node: usize,
    /// The host-side veth on its node.
    pub host_device: String,
}

/// Nodes, pods and an external client; dropped with its topology.
pub struct Cluster {
    pub topo: Topology,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    /// Dual-stack: every node, pod and the client have IPv6 too.
    pub dual: bool,
    /// XDP pass programs on the bridge ports (see `attach_to_bridge`).
    _xdp_links: Vec<OwnedFd>,
}

impl Cluster {
    /// `pods_per_node[i]` pods on node `i + 1`.
    pub fn new(pods_per_node: &[usize]) -> Result<Self> {
        Self::build(Topology::new()?, pods_per_node)
    }

    /// The same cluster in a topology of the caller's (the lab's, with its
    /// own namespace prefix).
    pub fn build(topo: Topology, pods_per_node: &[usize]) -> Result<Self> {
        Self::build_with(topo, pods_per_node, false)
    }

    /// A dual-stack cluster (module comment).
    pub fn new_dual(pods_per_node: &[usize]) -> Result<Self> {
        Self::build_with(Topology::new()?, pods_per_node, true)
    }

    /// The cluster in `topo`, dual-stack if `dual`.
    pub fn build_with(mut topo: Topology, pods_per_node: &[usize], dual: bool) -> Result<Self> {
        topo.add_ns("net")?;
        let net = topo.ns("net");
        net.ip(&["link", "add", "br0", "type", "bridge"])?;
        net.add_addr("br0", &format!("{NODE_NETWORK_GATEWAY}/16"))?;
        if dual {
            add_addr6(net, "br0", &format!("{NODE_NETWORK_GATEWAY6}/64"))?;
        }
        net.ip(&["link", "set", "br0", "up"])?;

        let mut nodes = Vec::new();
        let mut xdp_links = Vec::new();
        for i in 0..pods_per_node.len() {
            let name = format!("node{}", i + 1);
            let ip = Ipv4Addr::new(172, 18, 0, 2 + i as u8);
            topo.add_ns(&name)?;
            let node = topo.ns(&name);
            // Before any device exists, so new devices inherit them too.
            for (key, value) in KIND_NODE_SYSCTLS {
                node.sysctl(key, value)?;
            }
            if dual {
                for (key, value) in KIND_NODE_SYSCTLS_IPV6 {
                    node.sysctl(key, value)?;
                }
            }
            xdp_links.push(attach_to_bridge(&topo, &name, ip, &format!("n{}", i + 1))?);
            let node = topo.ns(&name);
            node.ip(&[
                "route",
                "add",
                "default",
                "via",
                &NODE_NETWORK_GATEWAY.to_string(),
            ])?;
            let ip6 = dual.then(|| node_network6(2 + i as u16));
            if let Some(ip6) = ip6 {
                add_addr6(node, "eth0", &format!("{ip6}/64"))?;
                let gw = NODE_NETWORK_GATEWAY6.to_string();
                node.ip(&["-6", "route", "add", "default", "via", &gw])?;
            }
            nodes.push(Node {
                name,
                ip,
                ip6,
                device: "eth0".into(),
                pod_devices: Vec::new(),
            });
        }
        for (i, node) in nodes.iter().enumerate() {
            for (j, other) in nodes.iter().enumerate() {
                if i != j {
                    let ns = topo.ns(&node.name);
                    ns.add_route(&format!("10.244.{}.0/24", j + 1), &other.ip.to_string())?;
                    if let Some(via) = other.ip6 {
                        let net = format!("{}/64", pod_cidr6(j));
                        ns.ip(&["-6", "route", "add", &net, "via", &via.to_string()])?;
                    }
                }
            }
        }

        topo.add_ns("client")?;
        xdp_links.push(attach_to_bridge(&topo, "client", CLIENT_IP, "c0")?);
        // The client reaches services through node1, like a router would.
        let client = topo.ns("client");
        client.add_route(SERVICE_CIDR, &nodes[0].ip.to_string())?;
        if let Some(node1) = nodes[0].ip6.filter(|_| dual) {
            add_addr6(client, "eth0", &format!("{CLIENT_IP6}/64"))?;
            let via = node1.to_string();
            client.ip(&["-6", "route", "add", SERVICE_CIDR6, "via", &via])?;
        }

        let mut cluster = Cluster {
            topo,
            nodes,
            pods: Vec::new(),
            dual,
            _xdp_links: xdp_links,
        };
        for (i, count) in pods_per_node.iter().enumerate() {
            for _ in 0..*count {
                cluster.add_pod(i)?;
            }
        }
        if dual {
            cluster.wait_for_ipv6()?;
        }
        Ok(cluster)
    }

    /// Waits until no address in the cluster is tentative. The addresses
    /// the cluster gives skip duplicate address detection (`nodad`), but
    /// the link-local ones the kernel adds to every device go through it
    /// for a second or two, and until then IPv6 between the namespaces
    /// loses packets (a node still detecting forwards nothing to its
    /// pods). A pod added later needs the same wait: [`wait_for_dad`].
    pub fn wait_for_ipv6(&self) -> Result<()> {
        let roles = self.nodes.iter().map(|n| n.name.as_str());
        let roles = roles.chain(self.pods.iter().map(|p| p.name.as_str()));
        for role in roles.chain(["net", "client"]) {
            wait_for_dad(self.ns(role))?;
        }
        Ok(())
    }

    /// Adds a pod to node `node` (index): `pod-<node+1>-<n>` at
    /// 10.244.<node+1>.<10+n>, behind a host-side `veth<8 hex digits>`, the
    /// way kindnet's ptp plugin wires it.
    pub fn add_pod(&mut self, node: usize) -> Result<Pod> {
        let j = self.nodes[node].pod_devices.len();
        let name = format!("pod-{}-{j}", node + 1);
        let ip = Ipv4Addr::new(10, 244, 1 + node as u8, 10 + j as u8);
        let gateway = pod_gateway(node);
        let host_device = host_veth_name(&name);
        self.topo.add_ns(&name)?;
        let node_ns = self.nodes[node].name.clone();
        self.topo.veth(&node_ns, &host_device, &name, "eth0")?;
        let host = self.topo.ns(&node_ns);
        host.add_addr(&host_device, &format!("{gateway}/32"))?;
        host.ip(&[
            "route",
            "add",
            &format!("{ip}/32"),
            "dev",
            &host_device,
            "scope",
            "host",
        ])?;
        let pod_ns = self.topo.ns(&name);
        pod_ns.ip(&[
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
            "noprefixroute",
        ])?;
        let gw = gateway.to_string();
        pod_ns.ip(&["route", "add", &gw, "dev", "eth0", "scope", "link"])?;
        pod_ns.ip(&["route", "add", "default", "via", &gw, "dev", "eth0"])?;
        // IPv6: the node's pod gateway fd00:10:244:N::1 on the host side,
        // a /128 route per pod, the pod routing everything through it.
        let ip6 = self.dual.then(|| pod_address6(node, j));
        if let Some(ip6) = ip6 {
            let gw6 = pod_gateway6(node).to_string();
            let host = self.topo.ns(&node_ns);
            add_addr6(host, &host_device, &format!("{gw6}/128"))?;
            host.ip(&[
                "-6",
                "route",
                "add",
                &format!("{ip6}/128"),
                "dev",
                &host_device,
            ])?;
            let pod_ns = self.topo.ns(&name);
            pod_ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{ip6}/64"),
                "dev",
                "eth0",
                "nodad",
                "noprefixroute",
            ])?;
            pod_ns.ip(&["-6", "route", "add", &gw6, "dev", "eth0"])?;
            pod_ns.ip(&["-6", "route", "add", "default", "via", &gw6, "dev", "eth0"])?;
        }
        self.nodes[node].pod_devices.push(host_device.clone());
        let pod = Pod {
            name,
            ip,
            ip6,
            node,
            host_device,
        };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// A TCP echo server on `port` in every pod, each naming its pod in its
    /// replies (`identity_line`), so a client learns which backend answered.
    /// In a dual-stack cluster, one on each of the pod's addresses.
    pub fn serve_named_tcp(&self, port: u16) -> Result<Vec<crate::TcpEchoServer>> {
        self.pods
            .iter()
            .flat_map(|pod| {
                let ips = [Some(IpAddr::V4(pod.ip)), pod.ip6.map(IpAddr::V6)];
                ips.into_iter().flatten().map(move |ip| (pod, ip))
            })
            .map(|(pod, ip)| {
                crate::TcpEchoServer::start_named(
                    self.pod_ns(&pod.name),
                    std::net::SocketAddr::new(ip, port),
                    Some(pod.name.clone()),
                )
            })
            .collect()
    }

    /// Deletes a pod: its namespace, and with it the veth pair.
    pub fn remove_pod(&mut self, name: &str) {
        self.topo.remove_ns(name);
        if let Some(i) = self.pods.iter().position(|p| p.name == name) {
            let pod = self.pods.remove(i);
            self.nodes[pod.node]
                .pod_devices
                .retain(|d| *d != pod.host_device);
        }
    }

    /// Leaves the cluster in place after this process: the namespaces stay,
    /// and the bridge ports' XDP links are pinned under `pin_dir` (a bpffs
    /// directory) so they outlive their file descriptors.
    pub fn keep(self, pin_dir: &std::path::Path) -> Result<()> {
        for (i, link) in self._xdp_links.iter().enumerate() {
            crate::xdp_pass::pin(link, &pin_dir.join(format!("xdp_pass_{i}")))?;
        }
        self.topo.keep();
        Ok(())
    }

    pub fn ns(&self, role: &str) -> &Netns {
        self.topo.ns(role)
    }

    pub fn node_ns(&self, index: usize) -> &Netns {
        self.topo.ns(&self.nodes[index].name)
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    pub fn pod_ns(&self, name: &str) -> &Netns {
        self.topo.ns(&self.pod(name).name)
    }

    pub fn client_ns(&self) -> &Netns {
        self.topo.ns("client")
    }

    /// The node a pod IP lives on, by address.
    pub fn node_of(&self, ip: IpAddr) -> Option<&Node> {
        self.pods
            .iter()
            .find(|p| IpAddr::V4(p.ip) == ip || p.ip6.map(IpAddr::V6) == Some(ip))
            .map(|p| &self.nodes[p.node])
    }
}

/// The pod gateway of node `node` (index): the first address of its pod CIDR,
/// as host-local IPAM gives it to kindnet.
pub fn pod_gateway(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1 + node as u8, 1)
}

/// Node `node`'s (index) IPv6 pod CIDR, fd00:10:244:N::/64 (N from 1).
pub fn pod_cidr6(node: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, 1 + node as u16, 0, 0, 0, 0)
}

/// The IPv6 pod gateway of node `node` (index): fd00:10:244:N::1.
pub fn pod_gateway6(node: usize) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(pod_cidr6(node)) + 1)
}

/// The IPv6 address of pod `j` of node `node`: fd00:10:244:N::(10+j) in hex
/// digits, e.g. pod-1-0 is fd00:10:244:1::10.
pub fn pod_address6(node: usize, j: usize) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(pod_cidr6(node)) + 0x10 + j as u128)
}

/// An IPv6 address without duplicate address detection (usable at once).
/// Waits until `ns` has no tentative IPv6 address. The address monitor
/// starts before the first look, so the event that ends detection cannot
/// be missed.
pub fn wait_for_dad(ns: &Netns) -> Result<()> {
    use std::io::BufRead as _;
    let mut monitor = ns
        .command("ip")
        .args(["-6", "monitor", "address"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(crate::io_err("ip -6 monitor address"))?;
    let events = monitor.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for _ in std::io::BufReader::new(events).lines() {
            if tx.send(()).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let result = loop {
        let tentative = ns.exec("ip", &["-6", "addr", "show", "tentative"])?;
        if String::from_utf8_lossy(&tentative.stdout).trim().is_empty() {
            break Ok(());
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if rx.recv_timeout(left).is_err() {
            break Err(crate::Error::Setup(format!(
                "{}: IPv6 addresses still tentative after 10 s",
                ns.name()
            )));
        }
    };
    let _ = monitor.kill();
    let _ = monitor.wait();
    result
}

fn add_addr6(ns: &Netns, ifname: &str, cidr: &str) -> Result<()> {
    ns.ip(&["-6", "addr", "add", cidr, "dev", ifname, "nodad"])
}

/// kindnet's host-side veth name for a pod: `veth` and 8 hex digits (the
/// ptp plugin makes them random; these are derived from the pod's name, so
/// a test's names are stable and differ per pod).
pub fn host_veth_name(pod: &str) -> String {
    // FNV-1a, 32 bits.
    let hash = pod.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("veth{hash:08x}")
}

/// `role`'s eth0 <-> `bridge_port` on br0 in `net`, with `ip/16` on eth0.
fn attach_to_bridge(
    topo: &Topology,
    role: &str,
    ip: Ipv4Addr,
    bridge_port: &str,
) -> Result<OwnedFd> {
    topo.veth(role, "eth0", "net", bridge_port)?;
    let net = topo.ns("net");
    net.ip(&["link", "set", bridge_port, "master", "br0"])?;
    // A frame a node's XDP program sends back out of eth0 (XDP_TX) goes
    // straight to this peer's XDP receive queue, which is served promptly
    // only while an XDP program is attached here. (GRO on the peer also
    // creates the queue, but frames then waited for later traffic.)
    let link = crate::xdp_pass::attach_xdp_pass(net, bridge_port)?;
    full_checksums(topo.ns(role))?;
    topo.ns(role).add_addr("eth0", &format!("{ip}/16"))?;
    Ok(link)
}

/// Makes `ns`'s eth0 finish checksums in software, so its packets carry full
/// checksums like packets off a wire. A veth otherwise hands on partial
/// (offloaded) checksums, which only skb metadata explains; XDP sees no
/// metadata, and a frame it sends back out (XDP_TX) would keep the partial
/// checksum. tc programs still meet partial checksums in the host's own
/// traffic.
fn full_checksums(ns: &Netns) -> Result<()> {
    ns.exec("ethtool", &["-K", "eth0", "tx", "off"]).map(drop)
}
