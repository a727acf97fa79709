//! kube-proxy's rules for the same input dp reads: the rule sets its
//! iptables mode (`iptables-restore` input) and nftables mode (an `nft -f`
//! transaction) would write for a set of Services and EndpointSlices, and the
//! way it applies them (full sync at start, partial syncs after). The
//! benchmark compares dp with these, and the lab runs them.
//!
//! The shapes follow kube-proxy's proxiers (`pkg/proxy/iptables`,
//! `pkg/proxy/nftables`) as summarised in `../shared/reference/kube-proxy-rules.md`:
//! chain names hashed as kube-proxy hashes them, endpoints in its order, the
//! fixed rules, REJECT/DROP for services without (local) endpoints,
//! masquerade marks, traffic policies, session affinity, source ranges.
//! Services are emitted in namespace/name order (kube-proxy iterates a Go
//! map, so its order is random per sync); `order()` says which service port
//! a linear rule walk meets last.
//!
//! One rule set per IP family, as kube-proxy runs one proxier per family:
//! the generators take the family and use only the service ports, node IPs
//! and CIDRs of it (`ip6tables-restore` input and `table ip6 kube-proxy`
//! for IPv6); the applier syncs each family the node or the Services have.
//!
//! Uses: `translate` (the same `ServicePortInfo` dp's frontends come from)
//! and `error`; never the kernel side, the agent or the lab.

pub mod apply;
pub mod cleanup;
pub mod iptables;
pub mod nftables;

use std::net::IpAddr;

use crate::translate::{Cidr, EndpointInfo, IpFamily, ServicePortInfo, TCP, UDP};

/// kube-proxy's default masquerade mark (`--iptables-masquerade-bit` 14).
pub const MASQUERADE_MARK: &str = "0x4000";
/// Above this many endpoints in total, iptables mode drops the comments of
/// its per-endpoint rules (kube-proxy's `largeClusterEndpointsThreshold`).
pub const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

/// Node settings that shape the rules (kube-proxy's flags and defaults).
/// Addresses and CIDRs of both families; each family's rules use its own.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// `--cluster-cidr` (detect-local-mode ClusterCIDR), at most one per
    /// family; none for a family: no local detector there, so no "not from
    /// a pod" masquerade rules.
    pub cluster_cidrs: Vec<Cidr>,
    /// `--masquerade-all`.
    pub masquerade_all: bool,
    /// The node's IPs: nftables mode accepts NodePorts on these.
    pub node_ips: Vec<IpAddr>,
    /// The Service CIDRs, at most one per family: nftables mode drops
    /// traffic to unallocated ClusterIPs in them.
    pub service_cidrs: Vec<Cidr>,
    /// iptables mode: NodePorts on 127.0.0.1 too (kube-proxy's default).
    pub localhost_nodeports: bool,
    /// iptables mode: the nfacct counters exist (kube-proxy creates them when
    /// the kernel has nfacct); adds `-m nfacct` matches.
    pub nfacct: bool,
    /// iptables mode: `MASQUERADE --random-fully` (when the binary has it).
    pub random_fully: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            cluster_cidrs: Vec::new(),
            masquerade_all: false,
            node_ips: Vec::new(),
            service_cidrs: Vec::new(),
            localhost_nodeports: true,
            nfacct: false,
            random_fully: true,
        }
    }
}

impl ProxyConfig {
    /// The cluster CIDR of `family` (the first one given).
    pub fn cluster_cidr(&self, family: IpFamily) -> Option<Cidr> {
        self.cluster_cidrs
            .iter()
            .copied()
            .find(|c| c.family() == family)
    }

    /// The Service CIDR of `family` (the first one given).
    pub fn service_cidr(&self, family: IpFamily) -> Option<Cidr> {
        self.service_cidrs
            .iter()
            .copied()
            .find(|c| c.family() == family)
    }

    /// The node's IPs of `family`, in the order given.
    pub fn node_ips_of(&self, family: IpFamily) -> Vec<IpAddr> {
        self.node_ips
            .iter()
            .copied()
            .filter(|ip| IpFamily::of(*ip) == family)
            .collect()
    }
}

/// The families a node's kube-proxy runs a proxier for, given its Service
/// ports: IPv4 and/or IPv6, each when the node has an address of it or a
/// Service port is of it (IPv4 alone when neither says, as a node without
/// addresses configured is an IPv4 one).
pub fn families(ports: &[ServicePortInfo], config: &ProxyConfig) -> Vec<IpFamily> {
    let wanted: Vec<IpFamily> = [IpFamily::V4, IpFamily::V6]
        .into_iter()
        .filter(|&f| {
            ports.iter().any(|sp| sp.family == f)
                || config.node_ips.iter().any(|ip| IpFamily::of(*ip) == f)
        })
        .collect();
    if wanted.is_empty() {
        vec![IpFamily::V4]
    } else {
        wanted
    }
}

/// The proxy modes whose rules are generated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Iptables,
    Nftables,
}

/// `tcp`, `udp`: the protocol as kube-proxy spells it in rules and hashes.
pub fn proto(p: u8) -> &'static str {
    match p {
        TCP => "tcp",
        UDP => "udp",
        _ => "sctp",
    }
}

/// `ip:port` (`[ip]:port` for IPv6), the endpoint string kube-proxy sorts
/// and hashes.
pub fn endpoint_string(e: &EndpointInfo) -> String {
    e.addr.to_string()
}

/// Endpoints in kube-proxy's order: sorted by their `ip:port` string
/// (so 10.0.0.10:80 comes before 10.0.0.2:80), duplicates removed.
pub fn sorted_endpoints<'a>(eps: impl IntoIterator<Item = &'a EndpointInfo>) -> Vec<EndpointInfo> {
    let mut v: Vec<EndpointInfo> = eps.into_iter().cloned().collect();
    v.sort_by_key(endpoint_string);
    v.dedup_by(|a, b| a.addr == b.addr);
    v
}

/// How kube-proxy splits a service port's endpoints by traffic policy
/// (`CategorizeEndpoints`, no topology beyond what `translate` applied).
#[derive(Clone, Debug)]
pub struct Categorized {
    /// For the Cluster policy chain (empty when no policy uses it).
    pub cluster: Vec<EndpointInfo>,
    /// For the Local policy chain (empty when no policy uses it).
    pub local: Vec<EndpointInfo>,
    /// Every endpoint a chain may jump to (endpoint chains are made for these).
    pub all: Vec<EndpointInfo>,
    pub uses_cluster_chain: bool,
    pub uses_local_chain: bool,
    /// Some endpoint may be used: nat chains exist.
    pub has_endpoints: bool,
    /// ClusterIP traffic has endpoints under its policy.
    pub has_internal: bool,
    /// External traffic has endpoints under its policy.
    pub has_external: bool,
    /// The external-destinations chain (`KUBE-EXT-`, `external-`) exists.
    pub uses_external_chain: bool,
    /// The source-range firewall chain (`KUBE-FW-`, `firewall-`) exists.
    pub uses_firewall_chain: bool,
}

pub fn categorize(sp: &ServicePortInfo) -> Categorized {
    let external = sp.is_external();
    // eTP=Local still short-circuits pod and host traffic to the cluster set.
    let uses_cluster = !sp.itp_local || external;
    let uses_local = sp.itp_local || (external && sp.etp_local);
    let cluster = if uses_cluster {
        sorted_endpoints(sp.cluster.usable())
    } else {
        Vec::new()
    };
    let local = if uses_local {
        sorted_endpoints(sp.local.usable())
    } else {
        Vec::new()
    };
    let all = sorted_endpoints(cluster.iter().chain(local.iter()));
    let has_endpoints = !all.is_empty();
    Categorized {
        uses_cluster_chain: !cluster.is_empty(),
        uses_local_chain: !local.is_empty(),
        has_internal: has_endpoints && (!sp.itp_local || !local.is_empty()),
        has_external: has_endpoints && (!sp.etp_local || !local.is_empty()),
        uses_external_chain: has_endpoints && sp.is_external(),
        uses_firewall_chain: has_endpoints && !sp.lb_ips.is_empty() && !sp.source_ranges.is_empty(),
        has_endpoints,
        cluster,
        local,
        all,
    }
}

/// Sources a LoadBalancer's firewall lets through: its source ranges, and
/// its LB IPs when a range contains the node (so the node's own traffic to
/// the LB IP, whose source may be that IP, still passes).
pub fn firewall_sources(sp: &ServicePortInfo, config: &ProxyConfig) -> Vec<String> {
    let mut allowed: Vec<String> = sp.source_ranges.iter().map(ToString::to_string).collect();
    let node_in_range = sp
        .source_ranges
        .iter()
        .any(|r| config.node_ips.iter().any(|ip| r.contains(*ip)));
    if node_in_range {
        allowed.extend(sp.lb_ips.iter().map(ToString::to_string));
    }
    allowed
}

/// The service ports of one family's rules: a dual-stack Service port is
/// one of them in each family.
pub fn of_family(
    ports: &[ServicePortInfo],
    family: IpFamily,
) -> impl Iterator<Item = &ServicePortInfo> {
    ports.iter().filter(move |sp| sp.family == family)
}

/// Standard base32 (RFC 4648, `A-Z2-7`) without padding.
fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &b in bytes {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// The first `len` base32 characters of sha256(`input`).
pub fn hash(input: &str, len: usize) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(input.as_bytes());
    let mut s = base32(&digest);
    s.truncate(len);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_match_real_cluster_chain_names() {
        // Well-known chains of every cluster (kubernetes, kube-dns).
        assert_eq!(hash("default/kubernetes:httpstcp", 16), "NPX46M4PTMTKRN6Y");
        assert_eq!(hash("kube-system/kube-dns:dnsudp", 16), "TCOU7JCQXEZGVUNU");
        assert_eq!(hash("ns1/svc1/tcp/p80", 8), "ULMVA6XW");
    }

    #[test]
    fn families_follow_node_addresses_and_service_ports() {
        let config = |ips: &[&str]| ProxyConfig {
            node_ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            ..ProxyConfig::default()
        };
        let v4 = vec![IpFamily::V4];
        assert_eq!(families(&[], &config(&[])), v4);
        assert_eq!(families(&[], &config(&["192.168.0.2"])), v4);
        assert_eq!(
            families(&[], &config(&["192.168.0.2", "2001:db8::2"])),
            [IpFamily::V4, IpFamily::V6]
        );
        assert_eq!(families(&[], &config(&["2001:db8::2"])), [IpFamily::V6]);
        let dual = ProxyConfig {
            cluster_cidrs: vec![
                "fd00:10::/32".parse().unwrap(),
                "10.0.0.0/8".parse().unwrap(),
            ],
            ..config(&["192.168.0.2", "2001:db8::2"])
        };
        assert_eq!(
            dual.cluster_cidr(IpFamily::V4),
            Some("10.0.0.0/8".parse().unwrap())
        );
        assert_eq!(dual.service_cidr(IpFamily::V6), None);
        assert_eq!(
            dual.node_ips_of(IpFamily::V6),
            ["2001:db8::2".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn endpoints_sort_as_strings() {
        let e = |s: &str| EndpointInfo {
            addr: s.parse().unwrap(),
            node: None,
            pod: None,
        };
        let sorted = sorted_endpoints(&[e("10.180.0.2:80"), e("10.180.0.10:80")]);
        assert_eq!(sorted[0].addr, "10.180.0.10:80".parse().unwrap());
    }
}
