//! `dp lab`: a Kubernetes-shaped network of namespaces on one machine that
//! stays up between commands, with real servers in its pods and either dp or
//! kube-proxy's rules as each node's dataplane.
//!
//! A lab called NAME is, on the machine:
//! - network namespaces `dp-NAME-net` (the node network's bridge),
//!   `dp-NAME-node1..N`, `dp-NAME-pod-N-M` and `dp-NAME-client`, shaped by
//!   [`e2e::Cluster`];
//! - `/run/dp-lab/NAME/`: `lab.json` (members, mode, processes),
//!   `manifests/` (what the dataplane serves), `logs/`, and a bpffs mounted
//!   at `bpffs/` (each node agent's pins, and the bridge ports' XDP links);
//! - processes: `dp lab serve` in every pod, and in dp mode `dp agent` in
//!   every node. In iptables and nftables mode the rules kube-proxy would
//!   write ([`crate::kube_proxy`]) are loaded into each node's namespace.
//!
//! [`Lab::down`] finds all of it by name, not from `lab.json` alone, so it
//! also cleans up after a crash.
//!
//! Files: `up` (build and start), `apply` (new manifests), `status` (exec,
//! status), `down` (remove), `process` (the lab's processes and logs),
//! `demo`, `probe` (the demo's clients), `serve` (the pods' servers),
//! `family` (the IPv6 half of dual-stack manifests).
//!
//! Uses: `kube_proxy`, `kernel` (pins), `source` (manifests), `translate`,
//! and `e2e`'s namespace topology (`Cluster`); it is the top layer.

mod apply;
pub mod demo;
mod down;
mod family;
pub mod probe;
mod process;
pub mod serve;
mod status;
mod up;

use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{ensure, Context as _};
pub use family::ipv6_half;
use process::is_lab_role;
use serde::{Deserialize, Serialize};

/// Where labs keep their state, one directory per lab.
pub const STATE_ROOT: &str = "/run/dp-lab";
pub const DEFAULT_NAME: &str = "lab";
/// Ports every pod serves (see [`serve`]).
pub const HTTP_PORT: u16 = 8080;
pub const UDP_ECHO_PORT: u16 = 9090;
pub const DNS_PORT: u16 = 53;
const PODS_PER_NODE: usize = 2;
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The example manifests (`examples/`), built into the binary so `dp lab up`
/// works from anywhere.
pub const EXAMPLES: &[(&str, &str)] = &[
    ("dns.yaml", include_str!("../../../examples/dns.yaml")),
    (
        "draining.yaml",
        include_str!("../../../examples/draining.yaml"),
    ),
    (
        "no-endpoints.yaml",
        include_str!("../../../examples/no-endpoints.yaml"),
    ),
    ("sticky.yaml", include_str!("../../../examples/sticky.yaml")),
    (
        "web-local.yaml",
        include_str!("../../../examples/web-local.yaml"),
    ),
    (
        "web-nodeport.yaml",
        include_str!("../../../examples/web-nodeport.yaml"),
    ),
    ("web.yaml", include_str!("../../../examples/web.yaml")),
];

/// The dual-stack example manifests (`examples/dual-stack/`): the same
/// Services in both families. `--ip-family ipv6` serves their IPv6 half.
pub const EXAMPLES_DUAL_STACK: &[(&str, &str)] = &[
    (
        "dns.yaml",
        include_str!("../../../examples/dual-stack/dns.yaml"),
    ),
    (
        "draining.yaml",
        include_str!("../../../examples/dual-stack/draining.yaml"),
    ),
    (
        "no-endpoints.yaml",
        include_str!("../../../examples/dual-stack/no-endpoints.yaml"),
    ),
    (
        "sticky.yaml",
        include_str!("../../../examples/dual-stack/sticky.yaml"),
    ),
    (
        "web-local.yaml",
        include_str!("../../../examples/dual-stack/web-local.yaml"),
    ),
    (
        "web-nodeport.yaml",
        include_str!("../../../examples/dual-stack/web-nodeport.yaml"),
    ),
    (
        "web.yaml",
        include_str!("../../../examples/dual-stack/web.yaml"),
    ),
];

/// The address families of the lab's members and Services (kind's
/// `networking.ipFamily`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IpFamilies {
    /// IPv4 addresses and Services.
    #[default]
    Ipv4,
    /// IPv6 Services: the IPv6 half of the dual-stack examples. The
    /// members keep their IPv4 addresses for the lab's own plumbing.
    Ipv6,
    /// Both: every member has an address of each family, Services both
    /// ClusterIPs.
    Dual,
}

impl IpFamilies {
    pub fn name(self) -> &'static str {
        match self {
            IpFamilies::Ipv4 => "ipv4",
            IpFamilies::Ipv6 => "ipv6",
            IpFamilies::Dual => "dual",
        }
    }

    pub fn has_ipv4(self) -> bool {
        self != IpFamilies::Ipv6
    }

    pub fn has_ipv6(self) -> bool {
        self != IpFamilies::Ipv4
    }

    /// The cluster CIDRs (kind's defaults), one per family served.
    pub fn cluster_cidrs(self) -> Vec<String> {
        let (v6, len) = e2e::cluster::CLUSTER_CIDR6;
        self.pick("10.244.0.0/16".into(), format!("{v6}/{len}"))
    }

    /// The Service CIDRs (kind's defaults), one per family served.
    pub fn service_cidrs(self) -> Vec<String> {
        self.pick(
            e2e::cluster::SERVICE_CIDR.into(),
            e2e::cluster::SERVICE_CIDR6.into(),
        )
    }

    fn pick(self, v4: String, v6: String) -> Vec<String> {
        let mut out = Vec::new();
        if self.has_ipv4() {
            out.push(v4);
        }
        if self.has_ipv6() {
            out.push(v6);
        }
        out
    }

    /// A manifest file as the lab serves it: as written, or its IPv6 half.
    pub fn manifest(self, text: &str) -> anyhow::Result<String> {
        match self {
            IpFamilies::Ipv6 => ipv6_half(text),
            _ => Ok(text.to_string()),
        }
    }
}

/// Each node's dataplane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A `dp agent` per node, reading the lab's manifests.
    Dp,
    /// kube-proxy's iptables mode (iptables-nft), rules from the same manifests.
    Iptables,
    /// kube-proxy's nftables mode.
    Nftables,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Dp => "dp",
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
        }
    }
}

/// A member of the lab: a node, a pod or the client.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Member {
    /// `node1`, `pod-1-0`, `client`.
    pub name: String,
    pub ip: Ipv4Addr,
    /// A pod's node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// A node's pod gateway (on each of its pod veths): also the node's
    /// address, the one kube-proxy's MASQUERADE gives traffic to a pod on
    /// this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_gateway: Option<Ipv4Addr>,
    /// The IPv6 address, in an IPv6 or dual-stack lab.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    /// A node's IPv6 pod gateway (fd00:10:244:N::1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_gateway6: Option<Ipv6Addr>,
}

impl Member {
    /// Its addresses, IPv4 then IPv6: `10.244.1.10 fd00:10:244:1::10`.
    pub fn addresses(&self) -> String {
        match self.ip6 {
            Some(ip6) => format!("{} {ip6}", self.ip),
            None => self.ip.to_string(),
        }
    }
}

/// A process the lab started.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Process {
    pub pid: u32,
    /// The member it runs in.
    pub member: String,
    /// `agent` or `servers`.
    pub what: String,
}

/// `lab.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    pub name: String,
    pub mode: Mode,
    /// Labs from before dual-stack are IPv4.
    #[serde(default)]
    pub ip_family: IpFamilies,
    /// `dp lab up --socket-lb`: the agents' socket hooks, each on its
    /// node's cgroup (`Lab::node_cgroup`); labs from before have none.
    #[serde(default)]
    pub socket_lb: crate::agent::SocketLb,
    pub nodes: Vec<Member>,
    pub pods: Vec<Member>,
    pub client: Member,
    pub processes: Vec<Process>,
}

impl State {
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.nodes
            .iter()
            .chain(&self.pods)
            .chain(std::iter::once(&self.client))
    }

    /// The member with this address (a node's pod gateway is the node's).
    pub fn member_at(&self, ip: Ipv4Addr) -> Option<&Member> {
        self.members()
            .find(|m| m.ip == ip || m.pod_gateway == Some(ip))
    }

    /// The pod with this address.
    pub fn pod_at(&self, ip: Ipv4Addr) -> Option<&Member> {
        self.pods.iter().find(|p| p.ip == ip)
    }
}

/// What `dp lab up` builds.
#[derive(Clone, Debug)]
pub struct UpOptions {
    pub nodes: usize,
    pub mode: Mode,
    pub ip_family: IpFamilies,
    /// The agents' `--socket-lb` (dp mode).
    pub socket_lb: crate::agent::SocketLb,
    /// Manifests to serve instead of the examples.
    pub manifests: Option<PathBuf>,
}

/// What `dp lab down` removed.
#[derive(Debug, Default)]
pub struct Removed {
    pub processes: usize,
    pub namespaces: usize,
    pub state: bool,
}

/// A lab by name; its state is on the machine, not in this value.
pub struct Lab {
    pub name: String,
    root: PathBuf,
}

impl Lab {
    pub fn new(name: &str) -> anyhow::Result<Lab> {
        // Only letters and digits: `dp-NAME-` must not prefix another lab's
        // namespaces (a dash would let lab `a` claim lab `a-b`'s).
        ensure!(
            !name.is_empty()
                && name.len() <= 16
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "lab name {name:?}: use 1 to 16 lowercase letters and digits"
        );
        Ok(Lab {
            name: name.to_string(),
            root: Path::new(STATE_ROOT).join(name),
        })
    }

    fn prefix(&self) -> String {
        format!("dp-{}-", self.name)
    }

    /// The network namespace of a member (`node1`, `pod-1-0`, `client`).
    pub fn netns_path(&self, member: &str) -> PathBuf {
        Path::new("/run/netns").join(format!("{}{member}", self.prefix()))
    }

    pub fn manifests_dir(&self) -> PathBuf {
        self.root.join("manifests")
    }

    fn bpffs(&self) -> PathBuf {
        self.root.join("bpffs")
    }

    /// A node agent's `--bpffs` directory.
    /// The cgroup v2 directory of a node's processes (its agent's socket
    /// hooks attach there; `dp lab exec <node>` runs in it), if the host
    /// has a cgroup v2 hierarchy.
    pub fn node_cgroup(&self, node: &str) -> Option<PathBuf> {
        crate::agent::cgroup2_root().map(|r| r.join(format!("dp-lab-{}-{node}", self.name)))
    }

    pub fn node_bpffs(&self, node: &str) -> PathBuf {
        self.bpffs().join(node)
    }

    fn log(&self, member: &str, what: &str) -> PathBuf {
        self.root.join("logs").join(format!("{member}-{what}.log"))
    }

    fn state_file(&self) -> PathBuf {
        self.root.join("lab.json")
    }

    pub fn state(&self) -> anyhow::Result<State> {
        let path = self.state_file();
        let text = fs::read_to_string(&path).with_context(|| {
            format!(
                "no lab {:?} is up ({} unreadable); start one with `dp lab up`",
                self.name,
                path.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    fn save(&self, state: &State) -> anyhow::Result<()> {
        let tmp = self.root.join(".lab.json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(state)?)?;
        fs::rename(&tmp, self.state_file())?;
        Ok(())
    }

    /// Whether anything of this lab is on the machine.
    pub fn exists(&self) -> bool {
        self.root.exists() || !self.namespaces().is_empty()
    }

    /// This lab's namespaces: `dp-NAME-<role>` for the roles a lab has.
    fn namespaces(&self) -> Vec<String> {
        let prefix = self.prefix();
        let Ok(entries) = fs::read_dir("/run/netns") else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.strip_prefix(&prefix).is_some_and(is_lab_role))
            .collect();
        names.sort();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_roles_are_matched_exactly() {
        for role in ["net", "client", "node1", "node12", "pod-1-0", "pod-3-11"] {
            assert!(is_lab_role(role), "{role}");
        }
        for role in [
            "x-node1", "node", "pod-1", "pod-1-x", "nodes", "net2", "b-net",
        ] {
            assert!(!is_lab_role(role), "{role}");
        }
    }

    #[test]
    fn lab_names_cannot_prefix_each_other() {
        assert!(Lab::new("a").is_ok());
        assert!(Lab::new("demo2").is_ok());
        for bad in ["", "a-b", "A", "a/b", "a.b", "abcdefghijklmnopq"] {
            assert!(Lab::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_examples_parse_without_skips() {
        let mut objects = crate::source::manifests::Objects::default();
        for (name, text) in EXAMPLES {
            crate::source::manifests::load_str(text, name, &mut objects);
        }
        assert!(objects.skipped.is_empty(), "{:?}", objects.skipped);
        assert_eq!(objects.services.len(), EXAMPLES.len());
        assert_eq!(objects.slices.len(), EXAMPLES.len());
        let files: std::collections::BTreeSet<String> =
            fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples"))
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".yaml"))
                .collect();
        let embedded: std::collections::BTreeSet<String> =
            EXAMPLES.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(files, embedded, "every examples/*.yaml is embedded");
    }

    #[test]
    fn the_dual_stack_examples_mirror_the_ipv4_ones_in_both_families() {
        let names = |list: &[(&str, &str)]| -> Vec<String> {
            list.iter().map(|(n, _)| n.to_string()).collect()
        };
        assert_eq!(names(EXAMPLES), names(EXAMPLES_DUAL_STACK));
        let mut objects = crate::source::manifests::Objects::default();
        for (name, text) in EXAMPLES_DUAL_STACK {
            crate::source::manifests::load_str(text, name, &mut objects);
        }
        assert!(objects.skipped.is_empty(), "{:?}", objects.skipped);
        // A slice per family for every Service.
        assert_eq!(objects.slices.len(), 2 * objects.services.len());
        let node = crate::translate::NodeInfo {
            name: "node1".into(),
            ips: vec![
                "172.18.0.2".parse().unwrap(),
                "fc00:f853:ccd:e793::2".parse().unwrap(),
            ],
            zone: None,
        };
        let mut skipped = Vec::new();
        let ports = crate::translate::service_ports(
            &objects.services,
            &objects.slices,
            &node,
            &mut skipped,
        );
        let families = |f| ports.iter().filter(|p| p.family == f).count();
        use crate::translate::IpFamily;
        assert_eq!(families(IpFamily::V4), families(IpFamily::V6));
        assert!(families(IpFamily::V6) > 0);
    }

    #[test]
    fn the_ipv6_half_of_a_dual_stack_manifest_is_single_stack_ipv6() {
        let text = EXAMPLES_DUAL_STACK
            .iter()
            .map(|(_, t)| *t)
            .collect::<Vec<_>>()
            .join("\n---\n");
        let v6 = ipv6_half(&text).unwrap();
        let mut objects = crate::source::manifests::Objects::default();
        crate::source::manifests::load_str(&v6, "v6", &mut objects);
        assert!(objects.skipped.is_empty(), "{:?}", objects.skipped);
        assert_eq!(objects.services.len(), EXAMPLES.len());
        assert_eq!(objects.slices.len(), EXAMPLES.len(), "IPv4 slices dropped");
        assert!(!v6.contains("10.96.0."), "{v6}");
        assert!(!v6.contains("addressType: IPv4"), "{v6}");
        assert!(v6.contains("clusterIP: fd00:10:96::80"), "{v6}");
    }
}
