//! kube-proxy's iptables mode: the `iptables-restore` input of one sync, and
//! the jump rules from the built-in chains that it ensures on full syncs.
//!
//! Per service port (chain names `KUBE-{SVC,SVL,EXT,FW}-<hash16>`, endpoint
//! chains `KUBE-SEP-<hash16>`): ClusterIP/externalIP/LB IP capture rules in
//! nat `KUBE-SERVICES`, NodePorts in `KUBE-NODEPORTS`, endpoint choice by
//! `statistic --probability 1/(n-i)`, DNAT in the endpoint chain; REJECT
//! (DROP for a Local policy without local endpoints) in the filter table
//! for what has no endpoints.
//!
//! One family per restore input, as kube-proxy has one proxier per family:
//! the IPv6 input (for `ip6tables-restore`) has the same chains, hashes and
//! shapes with IPv6 addresses (`[ip]:port` endpoints), and none of IPv4's
//! localhost NodePort parts: no `KUBE-FIREWALL` localnet rule (that guards
//! `route_localnet`, which IPv6 does not have) and no NodePorts on `::1`.

use std::{collections::BTreeSet, fmt::Write as _};

use super::{categorize, endpoint_string, hash, proto, ProxyConfig, LARGE_CLUSTER_ENDPOINTS};
use crate::translate::{EndpointInfo, IpFamily, ServicePortInfo, ServicePortName};

/// `KUBE-SVC-…` and friends share this 16-character hash.
pub fn service_hash(sp: &ServicePortInfo) -> String {
    hash(&format!("{}{}", sp.service, proto(sp.protocol)), 16)
}

pub fn svc_chain(sp: &ServicePortInfo) -> String {
    format!("KUBE-SVC-{}", service_hash(sp))
}

pub fn sep_chain(sp: &ServicePortInfo, ep: &EndpointInfo) -> String {
    let input = format!(
        "{}{}{}",
        sp.service,
        proto(sp.protocol),
        endpoint_string(ep)
    );
    format!("KUBE-SEP-{}", hash(&input, 16))
}

/// The rules kube-proxy inserts into the built-in chains (table, chain,
/// rule arguments), in the order it ensures them (each at position 1).
pub fn jump_rules() -> Vec<(&'static str, &'static str, Vec<&'static str>)> {
    let new = ["-m", "conntrack", "--ctstate", "NEW"];
    let with = |extra: &[&'static str], comment: &'static str, target: &'static str| {
        let mut v: Vec<&'static str> = extra.to_vec();
        v.extend(["-m", "comment", "--comment", comment, "-j", target]);
        v
    };
    let ext = "kubernetes externally-visible service portals";
    let portals = "kubernetes service portals";
    let firewall = "kubernetes load balancer firewall";
    vec![
        ("filter", "INPUT", with(&new, ext, "KUBE-EXTERNAL-SERVICES")),
        (
            "filter",
            "FORWARD",
            with(&new, ext, "KUBE-EXTERNAL-SERVICES"),
        ),
        (
            "filter",
            "INPUT",
            with(
                &[],
                "kubernetes health check service ports",
                "KUBE-NODEPORTS",
            ),
        ),
        ("filter", "FORWARD", with(&new, portals, "KUBE-SERVICES")),
        ("filter", "OUTPUT", with(&new, portals, "KUBE-SERVICES")),
        (
            "filter",
            "FORWARD",
            with(&[], "kubernetes forwarding rules", "KUBE-FORWARD"),
        ),
        (
            "filter",
            "INPUT",
            with(&new, firewall, "KUBE-PROXY-FIREWALL"),
        ),
        (
            "filter",
            "OUTPUT",
            with(&new, firewall, "KUBE-PROXY-FIREWALL"),
        ),
        (
            "filter",
            "FORWARD",
            with(&new, firewall, "KUBE-PROXY-FIREWALL"),
        ),
        ("nat", "OUTPUT", with(&[], portals, "KUBE-SERVICES")),
        ("nat", "PREROUTING", with(&[], portals, "KUBE-SERVICES")),
        (
            "nat",
            "POSTROUTING",
            with(&[], "kubernetes postrouting rules", "KUBE-POSTROUTING"),
        ),
        ("filter", "INPUT", vec!["-j", "KUBE-FIREWALL"]),
        ("filter", "OUTPUT", vec!["-j", "KUBE-FIREWALL"]),
    ]
}

/// One sync's restore input, and the per-service nat chains it leaves active.
pub struct Restore {
    pub text: String,
    /// `KUBE-{SVC,SVL,EXT,FW,SEP}-*` chains of the synced state.
    pub active_chains: BTreeSet<String>,
    /// Rules written (both tables), for reporting.
    pub rules: usize,
}

/// The input of one `iptables-restore --noflush` (`ip6tables-restore` for
/// `IpFamily::V6`), for the service ports of `family`.
///
/// `changed`: None for a full sync; for a partial sync the service ports
/// whose chains are rewritten (the others' chains are left as they are, the
/// top-level chains are always written in full). `stale`: chains to delete.
pub fn restore(
    ports: &[ServicePortInfo],
    config: &ProxyConfig,
    family: IpFamily,
    changed: Option<&BTreeSet<ServicePortName>>,
    stale: &BTreeSet<String>,
) -> Restore {
    let total_endpoints: usize = super::of_family(ports, family)
        .map(|sp| categorize(sp).all.len())
        .sum();
    let large = total_endpoints > LARGE_CLUSTER_ENDPOINTS;
    let mark = super::MASQUERADE_MARK;
    let mut filter_rules = String::new();
    let mut nat_chains = String::new();
    let mut nat_rules = String::new();
    let mut active = BTreeSet::new();
    let ipv4 = family == IpFamily::V4;
    let localhost_nodeports = serves_localhost_nodeports(family, config);

    if localhost_nodeports {
        filter_rules.push_str("-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n");
    }
    let _ = writeln!(
        nat_rules,
        "-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN"
    );
    let _ = writeln!(nat_rules, "-A KUBE-POSTROUTING -j MARK --xor-mark {mark}");
    let _ = writeln!(
        nat_rules,
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE{}",
        if config.random_fully { " --random-fully" } else { "" }
    );
    let _ = writeln!(nat_rules, "-A KUBE-MARK-MASQ -j MARK --or-mark {mark}");

    for sp in super::of_family(ports, family) {
        let write_chains = changed.is_none_or(|c| c.contains(&sp.service));
        let mut chains = String::new();
        let mut rules = String::new();
        let keep = service_rules(
            sp,
            config,
            large,
            &mut filter_rules,
            &mut nat_rules,
            &mut chains,
            &mut rules,
        );
        active.extend(keep);
        if write_chains {
            nat_chains.push_str(&chains);
            nat_rules.push_str(&rules);
        }
    }
    let last = "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL";
    if !ipv4 {
        let _ = writeln!(nat_rules, "{last} ! -d ::1/128 -j KUBE-NODEPORTS");
    } else if localhost_nodeports {
        let _ = writeln!(nat_rules, "{last} -j KUBE-NODEPORTS");
    } else {
        let _ = writeln!(nat_rules, "{last} ! -d 127.0.0.0/8 -j KUBE-NODEPORTS");
    }
    for chain in stale.iter().filter(|c| !active.contains(*c)) {
        let _ = writeln!(nat_chains, ":{chain} - [0:0]");
        let _ = writeln!(nat_rules, "-X {chain}");
    }

    let mut text = String::new();
    text.push_str("*filter\n");
    for c in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
    ] {
        let _ = writeln!(text, ":{c} - [0:0]");
    }
    // IPv6 writes no rule into kubelet's KUBE-FIREWALL, so it leaves the
    // chain alone (declaring it would flush it).
    if ipv4 {
        text.push_str(":KUBE-FIREWALL - [0:0]\n");
    }
    text.push_str(&filter_rules);
    let nfacct = if config.nfacct {
        " -m nfacct --nfacct-name ct_state_invalid_dropped_pkts"
    } else {
        ""
    };
    let _ = writeln!(
        text,
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID{nfacct} -j DROP"
    );
    let _ = writeln!(text, "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {mark}/{mark} -j ACCEPT");
    text.push_str("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
    text.push_str("COMMIT\n*nat\n");
    for c in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(text, ":{c} - [0:0]");
    }
    text.push_str(&nat_chains);
    text.push_str(&nat_rules);
    text.push_str("COMMIT\n");
    let rules = text.lines().filter(|l| l.starts_with("-A ")).count();
    Restore {
        text,
        active_chains: active,
        rules,
    }
}

/// NodePorts on the loopback addresses: IPv4 only (kube-proxy never serves
/// them on ::1, which the kernel cannot route to another host), and with
/// them the rule that guards `route_localnet`.
fn serves_localhost_nodeports(family: IpFamily, config: &ProxyConfig) -> bool {
    family == IpFamily::V4 && config.localhost_nodeports
}

/// Writes one service port's rules. Filter rules and the top-level nat
/// rules (`KUBE-SERVICES`, `KUBE-NODEPORTS`) go to `filter`/`top`, its own
/// chains to `chains`/`rules`. Returns the names of its own chains.
fn service_rules(
    sp: &ServicePortInfo,
    config: &ProxyConfig,
    large: bool,
    filter: &mut String,
    top: &mut String,
    chains: &mut String,
    rules: &mut String,
) -> Vec<String> {
    let c = categorize(sp);
    let spn = sp.service.to_string();
    let p = proto(sp.protocol);
    let m = format!("-m {p} -p {p}");
    let h = service_hash(sp);
    let svc = format!("KUBE-SVC-{h}");
    let svl = format!("KUBE-SVL-{h}");
    let ext = format!("KUBE-EXT-{h}");
    let fw = format!("KUBE-FW-{h}");
    let internal_chain = if sp.itp_local { &svl } else { &svc };
    let external_policy_chain = if sp.etp_local { &svl } else { &svc };
    let (uses_ext, uses_fw) = (c.uses_external_chain, c.uses_firewall_chain);
    let lb_chain = if uses_fw { &fw } else { &ext };
    // What packets that find no endpoint get (filter table).
    let (internal_target, internal_comment) = if !c.has_endpoints {
        ("REJECT", "has no endpoints")
    } else {
        ("DROP", "has no local endpoints")
    };
    let (external_target, external_comment) = (internal_target, internal_comment);

    for ip in &sp.cluster_ips {
        if c.has_internal {
            let _ = writeln!(top, "-A KUBE-SERVICES -m comment --comment \"{spn} cluster IP\" {m} -d {ip} --dport {} -j {internal_chain}", sp.port);
        } else {
            let _ = writeln!(filter, "-A KUBE-SERVICES -m comment --comment \"{spn} {internal_comment}\" {m} -d {ip} --dport {} -j {internal_target}", sp.port);
        }
    }
    for ip in &sp.external_ips {
        if c.has_endpoints {
            let _ = writeln!(top, "-A KUBE-SERVICES -m comment --comment \"{spn} external IP\" {m} -d {ip} --dport {} -j {ext}", sp.port);
        }
        if !c.has_external {
            let _ = writeln!(filter, "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{spn} {external_comment}\" {m} -d {ip} --dport {} -j {external_target}", sp.port);
        }
    }
    for ip in &sp.lb_ips {
        if c.has_endpoints {
            let _ = writeln!(top, "-A KUBE-SERVICES -m comment --comment \"{spn} loadbalancer IP\" {m} -d {ip} --dport {} -j {lb_chain}", sp.port);
        }
        if uses_fw {
            let _ = writeln!(filter, "-A KUBE-PROXY-FIREWALL -m comment --comment \"{spn} traffic not accepted by {fw}\" {m} -d {ip} --dport {} -j DROP", sp.port);
        }
    }
    if !c.has_external {
        for ip in &sp.lb_ips {
            let _ = writeln!(filter, "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{spn} {external_comment}\" {m} -d {ip} --dport {} -j {external_target}", sp.port);
        }
    }
    if let Some(np) = sp.node_port {
        if c.has_endpoints {
            if serves_localhost_nodeports(sp.family, config) && config.nfacct {
                let _ = writeln!(top, "-A KUBE-NODEPORTS -m comment --comment {spn} {m} -d 127.0.0.0/8 --dport {np} -m nfacct --nfacct-name localhost_nps_accepted_pkts -j {ext}");
            }
            let _ = writeln!(
                top,
                "-A KUBE-NODEPORTS -m comment --comment {spn} {m} --dport {np} -j {ext}"
            );
        }
        if !c.has_external {
            let _ = writeln!(filter, "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{spn} {external_comment}\" -m addrtype --dst-type LOCAL {m} --dport {np} -j {external_target}");
        }
    }
    if let Some(hc) = sp.health_check_node_port {
        let _ = writeln!(filter, "-A KUBE-NODEPORTS -m comment --comment \"{spn} health check node port\" -m tcp -p tcp --dport {hc} -j ACCEPT");
    }
    if !c.has_endpoints {
        return Vec::new();
    }

    let mut own = Vec::new();
    let mut declare = |name: &str| {
        let _ = writeln!(chains, ":{name} - [0:0]");
        own.push(name.to_string());
    };
    if uses_ext {
        declare(&ext);
    }
    if uses_fw {
        declare(&fw);
    }
    if c.uses_cluster_chain {
        declare(&svc);
    }
    if c.uses_local_chain {
        declare(&svl);
    }
    for ep in &c.all {
        declare(&sep_chain(sp, ep));
    }

    let cluster_cidr = config.cluster_cidr(sp.family);
    // Internal traffic: masquerade what does not come from a pod.
    if c.has_internal {
        for ip in &sp.cluster_ips {
            let base = format!(
                "-A {internal_chain} -m comment --comment \"{spn} cluster IP\" {m} -d {ip} --dport {}",
                sp.port
            );
            if config.masquerade_all {
                let _ = writeln!(rules, "{base} -j KUBE-MARK-MASQ");
            } else if let Some(cidr) = cluster_cidr {
                let _ = writeln!(rules, "{base} ! -s {cidr} -j KUBE-MARK-MASQ");
            }
        }
    }
    if uses_ext {
        if !sp.etp_local {
            let _ = writeln!(rules, "-A {ext} -m comment --comment \"masquerade traffic for {spn} external destinations\" -j KUBE-MARK-MASQ");
        } else {
            if let Some(cidr) = cluster_cidr {
                let _ = writeln!(rules, "-A {ext} -m comment --comment \"pod traffic for {spn} external destinations\" -s {cidr} -j {svc}");
            }
            let _ = writeln!(rules, "-A {ext} -m comment --comment \"masquerade LOCAL traffic for {spn} external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ");
            let _ = writeln!(rules, "-A {ext} -m comment --comment \"route LOCAL traffic for {spn} external destinations\" -m addrtype --src-type LOCAL -j {svc}");
        }
        if !sp.etp_local || c.uses_local_chain {
            let _ = writeln!(rules, "-A {ext} -j {external_policy_chain}");
        }
    }
    if uses_fw {
        for source in super::firewall_sources(sp, config) {
            let _ = writeln!(
                rules,
                "-A {fw} -m comment --comment \"{spn} loadbalancer IP\" -s {source} -j {ext}"
            );
        }
        let _ = writeln!(rules, "-A {fw} -m comment --comment \"other traffic to {spn} will be dropped by KUBE-PROXY-FIREWALL\"");
    }
    if c.uses_cluster_chain {
        endpoint_choice(sp, &svc, &c.cluster, large, rules);
    }
    if c.uses_local_chain {
        endpoint_choice(sp, &svl, &c.local, large, rules);
    }
    for ep in &c.all {
        let sep = sep_chain(sp, ep);
        let comment = if large {
            String::new()
        } else {
            format!(" -m comment --comment {spn}")
        };
        let ip = ep.addr.ip();
        let _ = writeln!(rules, "-A {sep}{comment} -s {ip} -j KUBE-MARK-MASQ");
        let recent = match sp.affinity_seconds {
            Some(_) => format!(" -m recent --name {sep} --set"),
            None => String::new(),
        };
        let _ = writeln!(
            rules,
            "-A {sep}{comment}{recent} {m} -j DNAT --to-destination {}",
            ep.addr
        );
    }
    own
}

/// `statistic --mode random` rules choosing uniformly among `eps`, after
/// the session-affinity checks.
fn endpoint_choice(
    sp: &ServicePortInfo,
    chain: &str,
    eps: &[EndpointInfo],
    large: bool,
    out: &mut String,
) {
    let comment = |ep: &EndpointInfo| {
        if large {
            String::new()
        } else {
            format!(" -m comment --comment \"{} -> {}\"", sp.service, ep.addr)
        }
    };
    if let Some(t) = sp.affinity_seconds {
        for ep in eps {
            let sep = sep_chain(sp, ep);
            let _ = writeln!(
                out,
                "-A {chain}{} -m recent --name {sep} --rcheck --seconds {t} --reap -j {sep}",
                comment(ep)
            );
        }
    }
    let n = eps.len();
    for (i, ep) in eps.iter().enumerate() {
        let sep = sep_chain(sp, ep);
        if i + 1 < n {
            let _ = writeln!(
                out,
                "-A {chain}{} -m statistic --mode random --probability {:.10} -j {sep}",
                comment(ep),
                1.0 / (n - i) as f64
            );
        } else {
            let _ = writeln!(out, "-A {chain}{} -j {sep}", comment(ep));
        }
    }
}
