//! Services, EndpointSlices and the agent's Node, to the frontends the
//! datapath serves: kube-proxy's rules (its nftables mode, where it and the
//! iptables mode differ). Pure: objects in, `DesiredState` out; the map
//! writer (`sync`) makes the maps match it.
//!
//! - Skipped: ExternalName and headless Services, Services labelled
//!   `service.kubernetes.io/service-proxy-name` (another proxy's), FQDN
//!   EndpointSlices. TCP, UDP and SCTP ports are served.
//! - Each IP family is translated on its own, as kube-proxy runs one
//!   proxier per family: a Service is served in each family it has a
//!   ClusterIP of, with that family's externalIPs, LoadBalancer IPs,
//!   source ranges, node addresses and EndpointSlices (`addressType`)
//!   only. An IPv6 client never reaches an IPv4 endpoint.
//! - A Service port has frontends at its ClusterIPs, NodePort (on the node
//!   addresses allowed by `--nodeport-addresses`), externalIPs and
//!   LoadBalancer ingress IPs (not those with `ipMode: Proxy`).
//! - Its endpoints come from every EndpointSlice of the Service (label
//!   `kubernetes.io/service-name`, same namespace, of the family), matched to the
//!   Service port by port name and protocol, deduplicated by address:port.
//!   Conditions: `ready` unset means ready; `serving` unset means `ready`;
//!   `terminating` unset means false.
//! - New flows go to ready endpoints (after topology: node hints, then zone
//!   hints, when every ready endpoint has them and one matches this node);
//!   with none ready, to serving terminating ones (the datapath implements
//!   that fallback from the two slot lists). Endpoints that are neither stay
//!   known as backends for TCP (their established flows continue, as with
//!   kube-proxy's conntrack), not for UDP (whose flows move).
//! - `internalTrafficPolicy: Local` limits ClusterIP frontends, and
//!   `externalTrafficPolicy: Local` the external ones, to this node's
//!   endpoints; with none here but some elsewhere, packets are dropped (not
//!   rejected), as kube-proxy does. With no usable endpoint in the cluster,
//!   every frontend rejects whatever the policy (kube-proxy's cluster-wide
//!   "has endpoints"). eTP=Local frontends also keep the cluster-wide set
//!   for traffic from inside the node (`internal`).
//! - IPv4 addresses and CIDRs with leading zeros are read as decimal, as
//!   kube-proxy does (`address`).
//! - Bad input (unparsable address or CIDR, port out of range, unknown
//!   protocol) skips what it is part of, with a reason; the rest is kept.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
    sync::Arc,
};

use super::address;
use k8s_openapi::api::{
    core::v1::{Node, Service, ServicePort},
    discovery::v1::{Endpoint, EndpointSlice},
};

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// kube-proxy's default ClientIP affinity timeout (3 h).
pub const DEFAULT_AFFINITY_SECONDS: u32 = 10_800;

pub const TCP: u8 = common::proto::IPPROTO_TCP;
pub const UDP: u8 = common::proto::IPPROTO_UDP;
pub const SCTP: u8 = common::proto::IPPROTO_SCTP;

/// An IP family, as a Service's `ipFamilies` and an EndpointSlice's
/// `addressType` name it. kube-proxy runs one proxier per family; so does
/// the translation: a dual-stack Service is a set of frontends per family,
/// each with the endpoints of its own family only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() {
            IpFamily::V4
        } else {
            IpFamily::V6
        }
    }

    /// The API's name (`IPv4`, `IPv6`).
    pub fn name(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }

    /// Longest prefix of the family.
    pub fn bits(self) -> u8 {
        match self {
            IpFamily::V4 => 32,
            IpFamily::V6 => 128,
        }
    }
}

/// An IPv4 or IPv6 CIDR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    /// Whether `ip` is in the CIDR (never for an address of the other
    /// family).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(ip) & mask == u32::from(net) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(ip) & mask == u128::from(net) & mask
            }
            _ => false,
        }
    }

    pub fn family(&self) -> IpFamily {
        IpFamily::of(self.addr)
    }

    /// The CIDR of one address (`/32` or `/128`).
    pub fn host(addr: IpAddr) -> Self {
        Cidr {
            addr,
            len: IpFamily::of(addr).bits(),
        }
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: not a CIDR"))?;
        let addr: IpAddr = addr.parse().map_err(|_| format!("{s:?}: not an IP CIDR"))?;
        let len: u8 = len
            .parse()
            .map_err(|_| format!("{s:?}: bad prefix length"))?;
        let bits = IpFamily::of(addr).bits();
        if len > bits {
            return Err(format!("{s:?}: prefix longer than {bits}"));
        }
        Ok(Cidr { addr, len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// What the agent knows about its node.
#[derive(Clone, Debug, Default)]
pub struct NodeInfo {
    pub name: String,
    /// The node's addresses, both families (from `--node-ip`, else the
    /// Node object).
    pub ips: Vec<IpAddr>,
    pub zone: Option<String>,
}

impl NodeInfo {
    /// From the Node object (InternalIP and ExternalIP addresses, zone label).
    pub fn from_node(node: &Node) -> Self {
        let ips = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect();
        NodeInfo {
            name: node.metadata.name.clone().unwrap_or_default(),
            ips,
            zone: node
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(ZONE_LABEL).cloned()),
        }
    }
}

/// Options that change translation (kube-proxy's flags of these names).
#[derive(Clone, Debug, Default)]
pub struct TranslateOptions {
    /// `--nodeport-addresses`: NodePorts only on node IPs in these CIDRs;
    /// empty: on all node IPs.
    pub nodeport_addresses: Vec<Cidr>,
    /// NodePorts on 127.0.0.1 too (where `nodeport_addresses` allows it),
    /// as kube-proxy's iptables mode serves them: only socket-level load
    /// balancing can (a packet to 127.0.0.1 never reaches tc on a node
    /// device), so the agent sets it with `--socket-lb`.
    pub loopback_nodeports: bool,
}

/// `namespace/name:port-name` (or `namespace/name` for an unnamed port), as
/// kube-proxy names a service port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    pub port: String,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() {
            write!(f, "{}/{}", self.namespace, self.name)
        } else {
            write!(f, "{}/{}:{}", self.namespace, self.name, self.port)
        }
    }
}

/// A service port as clients address it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    pub addr: SocketAddr,
    pub protocol: u8,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, protocol_name(self.protocol))
    }
}

pub fn protocol_name(p: u8) -> &'static str {
    match p {
        TCP => "TCP",
        UDP => "UDP",
        SCTP => "SCTP",
        _ => "?",
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FrontendKind::ClusterIp => "ClusterIP",
            FrontendKind::NodePort => "NodePort",
            FrontendKind::ExternalIp => "ExternalIP",
            FrontendKind::LoadBalancer => "LoadBalancer",
        })
    }
}

/// One endpoint of a service port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct EndpointInfo {
    pub addr: SocketAddr,
    /// Shared by every frontend and slice that names the node.
    pub node: Option<Arc<str>>,
    /// `namespace/name` of the Pod behind it (`targetRef`), if given.
    pub pod: Option<String>,
}

/// Backends of one view of a frontend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Endpoints {
    /// Get new flows.
    pub ready: Vec<EndpointInfo>,
    /// Serving and terminating: new flows only when `ready` is empty.
    pub terminating: Vec<EndpointInfo>,
}

/// Everything the datapath needs for one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendSpec {
    pub service: ServicePortName,
    pub kind: FrontendKind,
    /// The backends for traffic to this frontend.
    pub endpoints: Endpoints,
    /// A traffic policy is Local and the service port has usable endpoints
    /// elsewhere: with none here, drop (not reject).
    pub local_only: bool,
    /// eTP=Local external frontends: the cluster-wide set, for traffic from
    /// pods and processes on this node.
    pub internal: Option<Endpoints>,
    /// Known endpoints that get no new flows but keep their flows (TCP).
    pub draining: Vec<EndpointInfo>,
    /// `sessionAffinity: ClientIP` timeout.
    pub affinity_seconds: Option<u32>,
    /// `loadBalancerSourceRanges` (LoadBalancer frontends).
    pub source_ranges: Vec<Cidr>,
    /// `healthCheckNodePort` (external frontends of an eTP=Local
    /// LoadBalancer Service).
    pub health_check_node_port: Option<u16>,
}

/// An object, or part of one, that was not programmed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Skipped {
    /// `Service ns/name`, `EndpointSlice ns/name`.
    pub object: String,
    pub reason: String,
    /// Bad input (counted as such), rather than a deliberate skip.
    pub invalid: bool,
}

/// What the maps should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// Shared: the incremental translation and the map writer hold the same
    /// specs (at 10 000 Services, a copy each was 15 MB).
    pub frontends: BTreeMap<FrontendKey, Arc<FrontendSpec>>,
    pub skipped: Vec<Skipped>,
}

/// One Service port as kube-proxy sees it (`ServicePortInfo` plus its
/// endpoints): the unit both this dataplane's frontends and the kube-proxy
/// rule generator (`kube_proxy`) are built from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortInfo {
    pub service: ServicePortName,
    pub protocol: u8,
    /// `ClusterIP`, `NodePort` or `LoadBalancer`.
    pub service_type: String,
    /// The family this view of the port is for: a dual-stack Service port
    /// is two of them, as kube-proxy's two proxiers see it. Every address,
    /// range and endpoint below is of this family.
    pub family: IpFamily,
    /// The ClusterIP of this family (normally one).
    pub cluster_ips: Vec<IpAddr>,
    pub port: u16,
    pub node_port: Option<u16>,
    pub external_ips: Vec<IpAddr>,
    /// LoadBalancer ingress IPs (not `ipMode: Proxy` ones).
    pub lb_ips: Vec<IpAddr>,
    pub source_ranges: Vec<Cidr>,
    pub etp_local: bool,
    pub itp_local: bool,
    pub affinity_seconds: Option<u32>,
    /// `healthCheckNodePort` of an eTP=Local LoadBalancer Service.
    pub health_check_node_port: Option<u16>,
    /// Cluster-wide endpoints (after topology hints).
    pub cluster: Endpoints,
    /// Endpoints on this node.
    pub local: Endpoints,
    /// Known TCP endpoints that are not serving: no new flows, flows kept.
    pub draining: Vec<EndpointInfo>,
}

impl ServicePortInfo {
    /// Reachable from outside the cluster: a NodePort, externalIPs or
    /// LoadBalancer IPs.
    pub fn is_external(&self) -> bool {
        self.node_port.is_some() || !self.external_ips.is_empty() || !self.lb_ips.is_empty()
    }
}

impl Endpoints {
    /// What new flows may use: the ready endpoints, or with none ready the
    /// serving terminating ones (kube-proxy's fallback).
    pub fn usable(&self) -> &[EndpointInfo] {
        if self.ready.is_empty() {
            &self.terminating
        } else {
            &self.ready
        }
    }
}

/// The translation.
pub fn translate(
    services: &[Service],
    slices: &[EndpointSlice],
    node: &NodeInfo,
    options: &TranslateOptions,
) -> DesiredState {
    let mut state = DesiredState::default();
    let ports = service_ports(services, slices, node, &mut state.skipped);
    for sp in &ports {
        for (key, spec) in frontends_of(sp, node, options) {
            if let Some(existing) = state.frontends.get(&key) {
                state.skipped.push(skip(
                    format!("Service {}/{}", sp.service.namespace, sp.service.name),
                    format!("{key} is already {}", existing.service),
                    true,
                ));
                continue;
            }
            state.frontends.insert(key, Arc::new(spec));
        }
    }
    state.skipped.sort();
    state
}

/// Every served Service port with its endpoints, Services in
/// namespace/name order, ports in spec order. What is not served is added to
/// `skipped` with a reason.
pub fn service_ports(
    services: &[Service],
    slices: &[EndpointSlice],
    node: &NodeInfo,
    skipped: &mut Vec<Skipped>,
) -> Vec<ServicePortInfo> {
    let compact: Vec<CompactSlice> = slices.iter().cloned().map(CompactSlice::from).collect();
    let mut by_service: BTreeMap<(String, String), Vec<&CompactSlice>> = BTreeMap::new();
    for slice in &compact {
        match slice_owner(&slice.object) {
            Ok(owner) => by_service.entry(owner).or_default().push(slice),
            Err(s) => skipped.push(s),
        }
    }
    let mut sorted: Vec<&Service> = services.iter().collect();
    sorted.sort_by_key(|s| (s.metadata.namespace.clone(), s.metadata.name.clone()));
    let mut out = Vec::new();
    for svc in sorted {
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc.metadata.name.clone().unwrap_or_default();
        let slices = by_service
            .get(&(ns.clone(), name.clone()))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        match service_port_infos(svc, &ns, &name, slices, node, skipped) {
            Ok(ports) => out.extend(ports),
            Err(s) => skipped.push(s),
        }
    }
    out
}

/// The Service (namespace, name) whose endpoints an EndpointSlice holds, or
/// why the slice is not served.
pub(super) fn slice_owner(slice: &EndpointSlice) -> Result<(String, String), Skipped> {
    let ns = slice.metadata.namespace.clone().unwrap_or_default();
    let name = slice.metadata.name.as_deref().unwrap_or_default();
    let owner = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL));
    match (owner, slice.address_type.as_str()) {
        (None, _) => Err(skip(
            format!("EndpointSlice {ns}/{name}"),
            format!("no {SERVICE_NAME_LABEL} label"),
            false,
        )),
        (Some(_), "FQDN") => Err(skip(
            format!("EndpointSlice {ns}/{name}"),
            format!("address type {} is not served", slice.address_type),
            false,
        )),
        (Some(svc), "IPv4" | "IPv6") => Ok((ns, svc.clone())),
        (Some(_), other) => Err(skip(
            format!("EndpointSlice {ns}/{name}"),
            format!("unknown address type {other:?}"),
            true,
        )),
    }
}

/// The frontends of one Service on this node, in the order `translate`
/// claims them (ports in spec order, then ClusterIPs, NodePorts,
/// externalIPs, LoadBalancer IPs); `slices` are the ones it owns. What is
/// not served goes to `skipped`.
pub(super) fn service_frontends(
    svc: &Service,
    slices: &[&CompactSlice],
    node: &NodeInfo,
    options: &TranslateOptions,
    skipped: &mut Vec<Skipped>,
) -> Vec<(FrontendKey, FrontendSpec)> {
    let ns = svc.metadata.namespace.clone().unwrap_or_default();
    let name = svc.metadata.name.clone().unwrap_or_default();
    match service_port_infos(svc, &ns, &name, slices, node, skipped) {
        Ok(ports) => ports
            .iter()
            .flat_map(|sp| frontends_of(sp, node, options))
            .collect(),
        Err(s) => {
            skipped.push(s);
            Vec::new()
        }
    }
}

pub(super) fn skip(object: String, reason: String, invalid: bool) -> Skipped {
    Skipped {
        object,
        reason,
        invalid,
    }
}

fn service_port_infos(
    svc: &Service,
    ns: &str,
    name: &str,
    slices: &[&CompactSlice],
    node: &NodeInfo,
    skipped: &mut Vec<Skipped>,
) -> Result<Vec<ServicePortInfo>, Skipped> {
    let object = format!("Service {ns}/{name}");
    let not_served = |reason: &str| Err(skip(object.clone(), reason.to_string(), false));
    let invalid = |reason: String| Err(skip(object.clone(), reason, true));
    let Some(spec) = svc.spec.as_ref() else {
        return invalid("no spec".into());
    };
    if svc
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL))
    {
        return not_served("handled by another proxy (service-proxy-name label)");
    }
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if svc_type == "ExternalName" {
        return not_served("ExternalName");
    }
    let cluster_ips: Vec<String> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.clone(),
        (_, Some(ip)) => vec![ip.clone()],
        _ => vec![],
    };
    if cluster_ips.iter().any(|ip| ip == "None") {
        return not_served("headless");
    }
    let mut all_cluster_ips = Vec::new();
    for ip in &cluster_ips {
        match address::parse_ip(&object, "clusterIPs", ip) {
            Some(ip) => all_cluster_ips.push(ip),
            None => return invalid(format!("clusterIP {ip:?} is not an IP address")),
        }
    }
    let mut external_ips = Vec::new();
    for ip in spec.external_ips.iter().flatten() {
        match address::parse_ip(&object, "externalIPs", ip) {
            Some(ip) => external_ips.push(ip),
            None => return invalid(format!("externalIP {ip:?} is not an IP address")),
        }
    }
    let mut lb_ips = Vec::new();
    if svc_type == "LoadBalancer" {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for ing in ingress.into_iter().flatten() {
            // ipMode Proxy: the load balancer proxies; traffic never arrives
            // addressed to the LB IP, so kube-proxy does not capture it.
            if ing.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            let Some(ip) = &ing.ip else { continue };
            match address::parse_ip(&object, "status.loadBalancer.ingress", ip) {
                Some(ip) => lb_ips.push(ip),
                None => {
                    return invalid(format!("loadBalancer ingress {ip:?} is not an IP address"))
                }
            }
        }
    }
    let mut source_ranges = Vec::new();
    for r in spec.load_balancer_source_ranges.iter().flatten() {
        match address::parse_cidr(&object, "loadBalancerSourceRanges", r) {
            Ok(c) => source_ranges.push(c),
            Err(e) => return invalid(format!("loadBalancerSourceRanges: {e}")),
        }
    }
    // The families served: those the Service has a ClusterIP of, primary
    // first (kube-proxy's proxier of a family ignores a Service without a
    // ClusterIP of its family). Everything else is split by family.
    let mut families: Vec<IpFamily> = Vec::new();
    let mut add = |f: IpFamily| {
        if !families.contains(&f) {
            families.push(f);
        }
    };
    if !all_cluster_ips.is_empty() {
        all_cluster_ips.iter().for_each(|ip| add(IpFamily::of(*ip)));
    } else {
        // No ClusterIP (manifests written by hand: the API always
        // allocates one): the families `ipFamilies` names, else one, the
        // single-stack default: that of the other addresses, else IPv4.
        for f in spec.ip_families.iter().flatten() {
            match f.as_str() {
                "IPv4" => add(IpFamily::V4),
                "IPv6" => add(IpFamily::V6),
                _ => {}
            }
        }
    }
    if families.is_empty() {
        let first = external_ips.iter().chain(&lb_ips).next();
        families.push(first.map_or(IpFamily::V4, |ip| IpFamily::of(*ip)));
    }
    let of = |family: IpFamily, ips: &[IpAddr]| -> Vec<IpAddr> {
        ips.iter()
            .copied()
            .filter(|ip| IpFamily::of(*ip) == family)
            .collect()
    };
    let affinity_seconds = if spec.session_affinity.as_deref() == Some("ClientIP") {
        let t = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds);
        Some(t.map_or(DEFAULT_AFFINITY_SECONDS, |t| t.clamp(1, 86_400) as u32))
    } else {
        None
    };
    let etp_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let itp_local = spec.internal_traffic_policy.as_deref() == Some("Local");

    let mut out = Vec::new();
    for port in spec.ports.iter().flatten() {
        let port_name = port.name.clone().unwrap_or_default();
        let spn = ServicePortName {
            namespace: ns.to_string(),
            name: name.to_string(),
            port: port_name.clone(),
        };
        let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => TCP,
            "UDP" => UDP,
            "SCTP" => SCTP,
            other => {
                skipped.push(skip(
                    object.clone(),
                    format!("port {spn}: unknown protocol {other:?}"),
                    true,
                ));
                continue;
            }
        };
        let Some(svc_port) = valid_port(port.port) else {
            skipped.push(skip(
                object.clone(),
                format!("port {spn}: {} out of range", port.port),
                true,
            ));
            continue;
        };
        let mut node_port = None;
        if matches!(svc_type, "NodePort" | "LoadBalancer") {
            match port.node_port.map(valid_port) {
                Some(Some(np)) => node_port = Some(np),
                Some(None) => skipped.push(skip(
                    object.clone(),
                    format!("port {spn}: nodePort {:?} out of range", port.node_port),
                    true,
                )),
                // LoadBalancer without node ports (allocateLoadBalancerNodePorts: false).
                None => {}
            }
        }
        for &family in &families {
            let all = endpoints_for(port, protocol, family, slices, skipped);
            out.push(ServicePortInfo {
                service: spn.clone(),
                protocol,
                service_type: svc_type.to_string(),
                family,
                cluster_ips: of(family, &all_cluster_ips),
                port: svc_port,
                node_port,
                external_ips: of(family, &external_ips),
                lb_ips: of(family, &lb_ips),
                source_ranges: source_ranges
                    .iter()
                    .copied()
                    .filter(|c| c.family() == family)
                    .collect(),
                etp_local,
                itp_local,
                affinity_seconds,
                health_check_node_port: if svc_type == "LoadBalancer" && etp_local {
                    spec.health_check_node_port.and_then(valid_port)
                } else {
                    None
                },
                cluster: select(&all, node, None),
                local: select(&all, node, Some(&node.name)),
                draining: all
                    .iter()
                    .filter(|e| !e.serving && protocol == TCP)
                    .map(|e| e.info.clone())
                    .collect(),
            });
        }
    }
    Ok(out)
}

/// The frontends of one Service port on this node.
fn frontends_of(
    sp: &ServicePortInfo,
    node: &NodeInfo,
    options: &TranslateOptions,
) -> Vec<(FrontendKey, FrontendSpec)> {
    // kube-proxy lets the node's own traffic to a LoadBalancer IP through
    // (a cloud or the stack may SNAT it to that IP): when a range contains
    // a node address, the service's LB IPs are allowed sources too.
    let mut lb_sources = sp.source_ranges.clone();
    if sp
        .source_ranges
        .iter()
        .any(|r| node.ips.iter().any(|ip| r.contains(*ip)))
    {
        lb_sources.extend(sp.lb_ips.iter().map(|&addr| Cidr::host(addr)));
    }
    let frontend = |kind: FrontendKind, local_policy: bool| FrontendSpec {
        service: sp.service.clone(),
        kind,
        endpoints: if local_policy {
            sp.local.clone()
        } else {
            sp.cluster.clone()
        },
        // kube-proxy's "has endpoints" is cluster-wide: with no usable
        // endpoint anywhere, every frontend rejects, Local policy or not.
        // Drop ("no local endpoints") is only for endpoints elsewhere.
        local_only: local_policy && !sp.cluster.usable().is_empty(),
        internal: (local_policy && kind != FrontendKind::ClusterIp).then(|| sp.cluster.clone()),
        draining: sp.draining.clone(),
        affinity_seconds: sp.affinity_seconds,
        source_ranges: if kind == FrontendKind::LoadBalancer {
            lb_sources.clone()
        } else {
            vec![]
        },
        // Every external frontend of the service carries it, so the
        // health check is served even before an ingress IP is assigned.
        health_check_node_port: if kind != FrontendKind::ClusterIp {
            sp.health_check_node_port
        } else {
            None
        },
    };
    let key = |ip: IpAddr, p: u16| FrontendKey {
        addr: SocketAddr::from((ip, p)),
        protocol: sp.protocol,
    };
    let mut out = Vec::new();
    for ip in &sp.cluster_ips {
        out.push((
            key(*ip, sp.port),
            frontend(FrontendKind::ClusterIp, sp.itp_local),
        ));
    }
    if let Some(np) = sp.node_port {
        let node_port_ips = node
            .ips
            .iter()
            .copied()
            .filter(|ip| nodeport_address(&options.nodeport_addresses, *ip))
            .filter(|ip| IpFamily::of(*ip) == sp.family);
        for ip in node_port_ips {
            out.push((key(ip, np), frontend(FrontendKind::NodePort, sp.etp_local)));
        }
        // IPv4 only: kube-proxy never serves NodePorts on ::1.
        let loopback = IpAddr::from(std::net::Ipv4Addr::LOCALHOST);
        if options.loopback_nodeports
            && sp.family == IpFamily::of(loopback)
            && nodeport_address(&options.nodeport_addresses, loopback)
        {
            out.push((
                key(loopback, np),
                frontend(FrontendKind::NodePort, sp.etp_local),
            ));
        }
    }
    for ip in &sp.external_ips {
        out.push((
            key(*ip, sp.port),
            frontend(FrontendKind::ExternalIp, sp.etp_local),
        ));
    }
    for ip in &sp.lb_ips {
        out.push((
            key(*ip, sp.port),
            frontend(FrontendKind::LoadBalancer, sp.etp_local),
        ));
    }
    out
}

/// Whether NodePorts are served on node address `ip` under
/// `--nodeport-addresses`: per family, as kube-proxy's proxier of each
/// family reads the flag; no CIDR of the address's family (or none at all)
/// means every address of it.
pub fn nodeport_address(nodeport_addresses: &[Cidr], ip: IpAddr) -> bool {
    let family = IpFamily::of(ip);
    let mut of_family = nodeport_addresses
        .iter()
        .filter(|c| c.family() == family)
        .peekable();
    of_family.peek().is_none() || of_family.any(|c| c.contains(ip))
}

fn valid_port(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

/// An endpoint of one service port with its conditions and hints.
#[derive(Clone, Debug)]
struct Candidate {
    info: EndpointInfo,
    ready: bool,
    serving: bool,
    terminating: bool,
    zone_hints: Option<BTreeSet<String>>,
    node_hints: Option<BTreeSet<String>>,
}

/// Every endpoint of the service port, from all its slices, deduplicated by
/// address:port (a ready copy wins), sorted by address.
fn endpoints_for(
    port: &ServicePort,
    protocol: u8,
    family: IpFamily,
    slices: &[&CompactSlice],
    skipped: &mut Vec<Skipped>,
) -> Vec<Candidate> {
    let want = port.name.clone().unwrap_or_default();
    let mut found: BTreeMap<SocketAddr, Candidate> = BTreeMap::new();
    for CompactSlice {
        object: slice,
        endpoints,
    } in slices
    {
        // Each family's endpoints come from the slices of its address type.
        if slice.address_type != family.name() {
            continue;
        }
        let object = format!(
            "EndpointSlice {}/{}",
            slice.metadata.namespace.as_deref().unwrap_or_default(),
            slice.metadata.name.as_deref().unwrap_or_default()
        );
        let matching = slice.ports.iter().flatten().find(|p| {
            p.name.clone().unwrap_or_default() == want
                && p.protocol.as_deref().unwrap_or("TCP") == protocol_name(protocol)
        });
        let Some(target) = matching.and_then(|p| p.port) else {
            continue;
        };
        let Some(target) = valid_port(target) else {
            skipped.push(skip(
                object,
                format!("port {want:?}: {target} out of range"),
                true,
            ));
            continue;
        };
        for ep in endpoints {
            match ep {
                Ok(facts) => {
                    let c = candidate(facts, target);
                    let keep_existing = found
                        .get(&c.info.addr)
                        .is_some_and(|old| old.ready && !c.ready);
                    if !keep_existing {
                        found.insert(c.info.addr, c);
                    }
                }
                Err(reason) => skipped.push(skip(object.clone(), reason.clone(), true)),
            }
        }
    }
    found.into_values().collect()
}

/// An EndpointSlice as the translation keeps it: the object without its
/// endpoints, and each endpoint reduced to what the rules read.
/// k8s-openapi's `Endpoint` is 352 bytes however few of its fields are set:
/// at 10 000 Services of ten endpoints, the full slices were a third of the
/// agent's memory.
#[derive(Clone, Debug, PartialEq)]
pub struct CompactSlice {
    /// The slice with `endpoints` empty: metadata, address type, ports.
    pub object: EndpointSlice,
    /// Its endpoints in order, or why each cannot be used.
    endpoints: Vec<Result<EndpointFacts, String>>,
}

impl From<EndpointSlice> for CompactSlice {
    fn from(mut object: EndpointSlice) -> Self {
        let endpoints = std::mem::take(&mut object.endpoints);
        let family = object.address_type.clone();
        let name = format!(
            "EndpointSlice {}/{}",
            object.metadata.namespace.as_deref().unwrap_or_default(),
            object.metadata.name.as_deref().unwrap_or_default()
        );
        // A slice's endpoints are on a few nodes: one name for each.
        let mut nodes: Vec<Arc<str>> = Vec::new();
        let mut node = |name: &str| -> Arc<str> {
            if let Some(known) = nodes.iter().find(|n| &***n == name) {
                return known.clone();
            }
            let new: Arc<str> = name.into();
            if nodes.len() < 16 {
                nodes.push(new.clone());
            }
            new
        };
        CompactSlice {
            object,
            endpoints: endpoints
                .iter()
                .map(|ep| endpoint_facts(&name, &family, ep, &mut node))
                .collect(),
        }
    }
}

impl CompactSlice {
    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }
}

/// What the rules read of an endpoint (its port comes from the slice).
#[derive(Clone, Debug, PartialEq)]
struct EndpointFacts {
    ip: IpAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    node: Option<Arc<str>>,
    /// `namespace/name` of a Pod `targetRef`.
    pod: Option<String>,
    /// Topology hints, rare: boxed.
    hints: Option<Box<Hints>>,
}

#[derive(Clone, Debug, PartialEq)]
struct Hints {
    zones: Option<BTreeSet<String>>,
    nodes: Option<BTreeSet<String>>,
}

fn candidate(facts: &EndpointFacts, port: u16) -> Candidate {
    Candidate {
        info: EndpointInfo {
            addr: SocketAddr::from((facts.ip, port)),
            node: facts.node.clone(),
            pod: facts.pod.clone(),
        },
        ready: facts.ready,
        serving: facts.serving,
        terminating: facts.terminating,
        zone_hints: facts.hints.as_ref().and_then(|h| h.zones.clone()),
        node_hints: facts.hints.as_ref().and_then(|h| h.nodes.clone()),
    }
}

fn endpoint_facts(
    object: &str,
    family: &str,
    ep: &Endpoint,
    node: &mut impl FnMut(&str) -> Arc<str>,
) -> Result<EndpointFacts, String> {
    let Some(first) = ep.addresses.first() else {
        return Err("endpoint without addresses".into());
    };
    let Some(ip) = address::parse_ip(object, "endpoints.addresses", first) else {
        return Err(format!("endpoint address {first:?} is not an IP address"));
    };
    if IpFamily::of(ip).name() != family {
        return Err(format!(
            "endpoint address {first:?} is not an {family} address"
        ));
    }
    let c = ep.conditions.as_ref();
    let ready = c.and_then(|c| c.ready).unwrap_or(true);
    let serving = c.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
    let hints = ep.hints.as_ref();
    let zones = hints
        .and_then(|h| h.for_zones.as_ref())
        .map(|z| z.iter().map(|z| z.name.clone()).collect());
    let nodes = hints
        .and_then(|h| h.for_nodes.as_ref())
        .map(|n| n.iter().map(|n| n.name.clone()).collect());
    Ok(EndpointFacts {
        ip,
        node: ep.node_name.as_deref().map(node),
        pod: ep
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .and_then(|r| {
                Some(format!(
                    "{}/{}",
                    r.namespace.as_deref()?,
                    r.name.as_deref()?
                ))
            }),
        ready,
        serving,
        terminating,
        hints: (zones.is_some() || nodes.is_some()).then(|| Box::new(Hints { zones, nodes })),
    })
}

/// Ready and serving-terminating endpoints, on `only_node` if given, with
/// topology hints applied to the ready ones (cluster-wide view only).
fn select(all: &[Candidate], node: &NodeInfo, only_node: Option<&str>) -> Endpoints {
    let here = |c: &&Candidate| only_node.is_none_or(|n| c.info.node.as_deref() == Some(n));
    let ready: Vec<&Candidate> = all.iter().filter(|c| c.ready).filter(here).collect();
    let ready = if only_node.is_none() {
        topology_filter(ready, node)
    } else {
        ready
    };
    Endpoints {
        ready: ready.into_iter().map(|c| c.info.clone()).collect(),
        terminating: all
            .iter()
            .filter(|c| !c.ready && c.serving && c.terminating)
            .filter(here)
            .map(|c| c.info.clone())
            .collect(),
    }
}

/// kube-proxy's topology: if every ready endpoint has node hints and some
/// name this node, those; else if every one has zone hints and some name this
/// node's zone, those; else all.
fn topology_filter<'a>(ready: Vec<&'a Candidate>, node: &NodeInfo) -> Vec<&'a Candidate> {
    if ready.is_empty() {
        return ready;
    }
    if ready.iter().all(|c| c.node_hints.is_some()) {
        let mine: Vec<&Candidate> = ready
            .iter()
            .copied()
            .filter(|c| {
                c.node_hints
                    .as_ref()
                    .is_some_and(|h| h.contains(&node.name))
            })
            .collect();
        if !mine.is_empty() {
            return mine;
        }
    }
    if let Some(zone) = &node.zone {
        if ready.iter().all(|c| c.zone_hints.is_some()) {
            let mine: Vec<&Candidate> = ready
                .iter()
                .copied()
                .filter(|c| c.zone_hints.as_ref().is_some_and(|h| h.contains(zone)))
                .collect();
            if !mine.is_empty() {
                return mine;
            }
        }
    }
    ready
}

impl DesiredState {
    /// One line per frontend (and its views), stable, for golden files.
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let list = |eps: &[EndpointInfo]| -> String {
            if eps.is_empty() {
                return "-".into();
            }
            eps.iter()
                .map(|e| match &e.node {
                    Some(n) => format!("{} ({n})", e.addr),
                    None => e.addr.to_string(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut out = String::new();
        for (key, f) in &self.frontends {
            let _ = write!(out, "{key} {} {}", f.kind, f.service);
            if f.local_only {
                out.push_str(" policy=Local");
            }
            if let Some(t) = f.affinity_seconds {
                let _ = write!(out, " affinity=ClientIP/{t}s");
            }
            if !f.source_ranges.is_empty() {
                let r: Vec<String> = f.source_ranges.iter().map(ToString::to_string).collect();
                let _ = write!(out, " source-ranges={}", r.join(","));
            }
            if let Some(p) = f.health_check_node_port {
                let _ = write!(out, " health-check-node-port={p}");
            }
            let _ = writeln!(out);
            let _ = writeln!(out, "    ready: {}", list(&f.endpoints.ready));
            let _ = writeln!(out, "    terminating: {}", list(&f.endpoints.terminating));
            if !f.draining.is_empty() {
                let _ = writeln!(out, "    draining: {}", list(&f.draining));
            }
            if let Some(i) = &f.internal {
                let _ = writeln!(
                    out,
                    "    from this node: ready {}; terminating {}",
                    list(&i.ready),
                    list(&i.terminating)
                );
            }
        }
        out
    }
}
