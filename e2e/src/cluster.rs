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

use std::{
    net::{IpAddr, Ipv4Addr},
    os::fd::OwnedFd,
};

use crate::{Netns, Result, Topology};

pub const CLUSTER_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 244, 0, 0), 16);
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
pub const NODE_NETWORK_GATEWAY: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 1);
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);

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
    pub fn build(mut topo: Topology, pods_per_node: &[usize]) -> Result<Self> {
        topo.add_ns("net")?;
        let net = topo.ns("net");
        net.ip(&["link", "add", "br0", "type", "bridge"])?;
        net.add_addr("br0", &format!("{NODE_NETWORK_GATEWAY}/16"))?;
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
            xdp_links.push(attach_to_bridge(&topo, &name, ip, &format!("n{}", i + 1))?);
            topo.ns(&name).ip(&[
                "route",
                "add",
                "default",
                "via",
                &NODE_NETWORK_GATEWAY.to_string(),
            ])?;
            nodes.push(Node {
                name,
                ip,
                device: "eth0".into(),
                pod_devices: Vec::new(),
            });
        }
        for (i, node) in nodes.iter().enumerate() {
            for (j, other) in nodes.iter().enumerate() {
                if i != j {
                    topo.ns(&node.name)
                        .add_route(&format!("10.244.{}.0/24", j + 1), &other.ip.to_string())?;
                }
            }
        }

        topo.add_ns("client")?;
        xdp_links.push(attach_to_bridge(&topo, "client", CLIENT_IP, "c0")?);
        // The client reaches services through node1, like a router would.
        topo.ns("client")
            .add_route(SERVICE_CIDR, &nodes[0].ip.to_string())?;

        let mut cluster = Cluster {
            topo,
            nodes,
            pods: Vec::new(),
            _xdp_links: xdp_links,
        };
        for (i, count) in pods_per_node.iter().enumerate() {
            for _ in 0..*count {
                cluster.add_pod(i)?;
            }
        }
        Ok(cluster)
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
        self.nodes[node].pod_devices.push(host_device.clone());
        let pod = Pod {
            name,
            ip,
            node,
            host_device,
        };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// A TCP echo server on `port` in every pod, each naming its pod in its
    /// replies (`identity_line`), so a client learns which backend answered.
    pub fn serve_named_tcp(&self, port: u16) -> Result<Vec<crate::TcpEchoServer>> {
        self.pods
            .iter()
            .map(|pod| {
                let addr = std::net::SocketAddr::from((pod.ip, port));
                crate::TcpEchoServer::start_named(
                    self.pod_ns(&pod.name),
                    addr,
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
            .find(|p| IpAddr::V4(p.ip) == ip)
            .map(|p| &self.nodes[p.node])
    }
}

/// The pod gateway of node `node` (index): the first address of its pod CIDR,
/// as host-local IPAM gives it to kindnet.
pub fn pod_gateway(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1 + node as u8, 1)
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
