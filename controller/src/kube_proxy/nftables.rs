//! kube-proxy's nftables mode: one `nft -f` transaction per sync on
//! `table ip kube-proxy`, or `table ip6 kube-proxy` for IPv6 (kube-proxy's
//! IPv6 proxier: `ip6` matches, `ipv6_addr` sets and maps, endpoint chain
//! names with the IP's `:` written as `.`).
//!
//! Dispatch is by verdict maps (`service-ips`, `service-nodeports`), the
//! endpoint by `numgen random mod n vmap`; chains `service-`, `local-`,
//! `external-`, `firewall-` and `endpoint-` named `<hash8>-<ns>/<svc>/<proto>/<port>`.
//! A full sync re-declares the table and empties the element containers; a
//! partial sync rewrites only the chains of changed service ports and the
//! elements whose value changed.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
};

use super::{categorize, hash, proto, ProxyConfig, MASQUERADE_MARK};
use crate::translate::{EndpointInfo, IpFamily, ServicePortInfo, ServicePortName};

/// The nftables family of kube-proxy's table for an IP family: `ip`, `ip6`
/// (also the keyword of its address matches, `ip daddr`, `ip6 daddr`).
pub fn nft_family(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    }
}

/// `ip kube-proxy`, `ip6 kube-proxy`: the table as commands name it.
fn table(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ip kube-proxy",
        IpFamily::V6 => "ip6 kube-proxy",
    }
}

/// The type of the family's addresses in sets and maps.
fn addr_type(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ipv4_addr",
        IpFamily::V6 => "ipv6_addr",
    }
}

/// `<hash8>-<name>`, cut to 240 characters, as kube-proxy names chains.
fn hash_and_truncate(name: &str) -> String {
    let mut s = format!("{}-{name}", hash(name, 8));
    if s.len() > 240 {
        s.truncate(237);
        s.push_str("...");
    }
    s
}

/// `ns/svc/proto/port`, the base of a service port's chain names.
fn service_base(sp: &ServicePortInfo) -> String {
    hash_and_truncate(&format!(
        "{}/{}/{}/{}",
        sp.service.namespace,
        sp.service.name,
        proto(sp.protocol),
        sp.service.port
    ))
}

/// `ns/svc/proto/port__ip/port`, the base of an endpoint's chain and
/// affinity set; an IPv6 address with `.` for `:` (names keep `:` out).
fn endpoint_base(sp: &ServicePortInfo, ep: &EndpointInfo) -> String {
    hash_and_truncate(&format!(
        "{}/{}/{}/{}__{}/{}",
        sp.service.namespace,
        sp.service.name,
        proto(sp.protocol),
        sp.service.port,
        ep.addr.ip().to_string().replace(':', "."),
        ep.addr.port()
    ))
}

/// Element containers a full sync empties before re-adding everything.
const ELEMENT_CONTAINERS: [&str; 6] = [
    "cluster-ips",
    "service-ips",
    "firewall-ips",
    "no-endpoint-services",
    "no-endpoint-nodeports",
    "service-nodeports",
];

/// The elements of the synced state: (container, key) -> rendered
/// `key [comment] [: value]`. kube-proxy keeps the same in memory to write
/// only what changed.
pub type Elements = BTreeMap<(String, String), String>;

/// One sync's transaction and what it leaves behind.
pub struct Transaction {
    pub text: String,
    /// Per-service chains (and affinity sets) of the synced state.
    pub active_chains: BTreeSet<String>,
    pub elements: Elements,
    /// Rules written, for reporting.
    pub rules: usize,
}

/// The transaction of one sync of `family`'s table, for the service ports
/// of that family. `previous`: None for a full sync; for a partial sync the
/// state after the last one of this family (its chains and elements) and
/// the service ports that changed since.
pub fn transaction(
    ports: &[ServicePortInfo],
    config: &ProxyConfig,
    family: IpFamily,
    previous: Option<(&BTreeSet<String>, &Elements, &BTreeSet<ServicePortName>)>,
) -> Transaction {
    let table = table(family);
    let mut out = String::new();
    if previous.is_none() {
        fixed(config, family, &mut out);
    }
    let mut elements = Elements::new();
    let mut active = BTreeSet::new();
    let mut chain_text = String::new();
    for sp in super::of_family(ports, family) {
        let write = previous.is_none_or(|(_, _, changed)| changed.contains(&sp.service));
        let mut text = String::new();
        active.extend(service(sp, config, &mut text, &mut elements));
        if write {
            chain_text.push_str(&text);
        }
    }
    out.push_str(&chain_text);
    match previous {
        None => {
            for ((set, _), value) in &elements {
                let _ = writeln!(out, "add element {table} {set} {{ {value} }}");
            }
        }
        Some((old_chains, old_elements, _)) => {
            for ((set, key), old) in old_elements {
                if elements.get(&(set.clone(), key.clone())) != Some(old) {
                    let _ = writeln!(out, "delete element {table} {set} {{ {key} }}");
                }
            }
            for ((set, key), value) in &elements {
                if old_elements.get(&(set.clone(), key.clone())) != Some(value) {
                    let _ = writeln!(out, "add element {table} {set} {{ {value} }}");
                }
            }
            // Stale chains: nothing refers to them once their elements are
            // gone (this kernel frees them at once; kube-proxy waits a second
            // for older ones).
            for chain in old_chains.iter().filter(|c| !active.contains(*c)) {
                if let Some(set) = chain.strip_prefix("set ") {
                    let _ = writeln!(out, "delete set {table} {set}");
                } else {
                    let _ = writeln!(out, "flush chain {table} {chain}");
                    let _ = writeln!(out, "delete chain {table} {chain}");
                }
            }
        }
    }
    let rules = out.lines().filter(|l| l.starts_with("add rule")).count();
    Transaction {
        text: out,
        active_chains: active,
        elements,
        rules,
    }
}

/// Table, base chains, sets, maps and the fixed rules (a full sync).
fn fixed(config: &ProxyConfig, family: IpFamily, out: &mut String) {
    let (table, l3, addr) = (table(family), nft_family(family), addr_type(family));
    let _ = writeln!(
        out,
        "add table {table} {{ comment \"rules for kube-proxy\" ; }}"
    );
    // In kube-proxy's order (nft lists chains in creation order).
    let chains: [(&str, &str); 16] = [
        ("cluster-ips-check", ""),
        (
            "filter-prerouting-pre-dnat",
            "type filter hook prerouting priority -110",
        ),
        (
            "filter-output-pre-dnat",
            "type filter hook output priority -110",
        ),
        ("filter-forward", "type filter hook forward priority 0"),
        ("filter-input", "type filter hook input priority 0"),
        ("filter-output", "type filter hook output priority 0"),
        ("firewall-check", ""),
        ("mark-for-masquerade", ""),
        ("masquerading", ""),
        ("nat-output", "type nat hook output priority -100"),
        ("nat-postrouting", "type nat hook postrouting priority 100"),
        ("nat-prerouting", "type nat hook prerouting priority -100"),
        ("nodeport-endpoints-check", ""),
        (
            "reject-chain",
            "comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\"",
        ),
        ("services", ""),
        ("service-endpoints-check", ""),
    ];
    for (name, spec) in chains {
        if spec.is_empty() {
            let _ = writeln!(out, "add chain {table} {name}");
        } else {
            let _ = writeln!(out, "add chain {table} {name} {{ {spec} ; }}");
        }
        let _ = writeln!(out, "flush chain {table} {name}");
    }
    let _ = writeln!(
        out,
        "add set {table} cluster-ips {{ type {addr} ; comment \"Active ClusterIPs\" ; }}"
    );
    let _ = writeln!(out, "add set {table} nodeport-ips {{ type {addr} ; comment \"IPs that accept NodePort traffic\" ; }}");
    let addr_map = format!("type {addr} . inet_proto . inet_service : verdict");
    let addr_map = addr_map.as_str();
    let port_map = "type inet_proto . inet_service : verdict";
    for (name, ty, comment) in [
        (
            "firewall-ips",
            addr_map,
            "destinations that are subject to LoadBalancerSourceRanges",
        ),
        (
            "no-endpoint-nodeports",
            port_map,
            "vmap to drop or reject packets to service nodeports with no endpoints",
        ),
        (
            "no-endpoint-services",
            addr_map,
            "vmap to drop or reject packets to services with no endpoints",
        ),
        (
            "service-ips",
            addr_map,
            "ClusterIP, ExternalIP and LoadBalancer IP traffic",
        ),
        ("service-nodeports", port_map, "NodePort traffic"),
    ] {
        let _ = writeln!(
            out,
            "add map {table} {name} {{ {ty} ; comment \"{comment}\" ; }}"
        );
    }
    for set in ELEMENT_CONTAINERS {
        let _ = writeln!(
            out,
            "flush {} {table} {set}",
            if set == "cluster-ips" { "set" } else { "map" }
        );
    }
    let _ = writeln!(out, "flush set {table} nodeport-ips");
    let mark = MASQUERADE_MARK;
    let mut rule = |chain: &str, body: &str| {
        let _ = writeln!(out, "add rule {table} {chain} {body}");
    };
    for (chain, target) in [
        ("filter-prerouting-pre-dnat", "firewall-check"),
        ("filter-output-pre-dnat", "firewall-check"),
        ("filter-input", "nodeport-endpoints-check"),
        ("filter-input", "service-endpoints-check"),
        ("filter-forward", "service-endpoints-check"),
        ("filter-forward", "cluster-ips-check"),
        ("filter-output", "service-endpoints-check"),
        ("filter-output", "cluster-ips-check"),
    ] {
        rule(chain, &format!("ct state new jump {target}"));
    }
    rule("nat-prerouting", "jump services");
    rule("nat-output", "jump services");
    rule("nat-postrouting", "jump masquerading");
    rule(
        "cluster-ips-check",
        &format!(
            "{l3} daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""
        ),
    );
    if let Some(cidr) = config.service_cidr(family) {
        rule(
            "cluster-ips-check",
            &format!(
                "{l3} daddr {{ {cidr} }} drop comment \"Drop traffic to unallocated ClusterIPs\""
            ),
        );
    }
    rule(
        "firewall-check",
        &format!("{l3} daddr . meta l4proto . th dport vmap @firewall-ips"),
    );
    rule("mark-for-masquerade", &format!("mark set mark or {mark}"));
    rule("masquerading", &format!("mark and {mark} == 0 return"));
    rule("masquerading", &format!("mark set mark xor {mark}"));
    rule("masquerading", "masquerade fully-random");
    rule(
        "nodeport-endpoints-check",
        &format!("{l3} daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports"),
    );
    rule("reject-chain", "reject");
    rule(
        "services",
        &format!("{l3} daddr . meta l4proto . th dport vmap @service-ips"),
    );
    rule(
        "services",
        &format!("{l3} daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"),
    );
    rule(
        "service-endpoints-check",
        &format!("{l3} daddr . meta l4proto . th dport vmap @no-endpoint-services"),
    );
    let ips: Vec<String> = config
        .node_ips_of(family)
        .iter()
        .map(ToString::to_string)
        .collect();
    if !ips.is_empty() {
        let _ = writeln!(
            out,
            "add element {table} nodeport-ips {{ {} }}",
            ips.join(", ")
        );
    }
}

/// One service port: its chains and rules into `out`, its elements into
/// `elements`. Returns its chains (and `set <name>` for affinity sets).
fn service(
    sp: &ServicePortInfo,
    config: &ProxyConfig,
    out: &mut String,
    elements: &mut Elements,
) -> Vec<String> {
    let (table, l3, addr) = (
        table(sp.family),
        nft_family(sp.family),
        addr_type(sp.family),
    );
    let cluster_cidr = config.cluster_cidr(sp.family);
    let c = categorize(sp);
    let spn = sp.service.to_string();
    let p = proto(sp.protocol);
    let base = service_base(sp);
    let svc = format!("service-{base}");
    let local = format!("local-{base}");
    let ext = format!("external-{base}");
    let fw = format!("firewall-{base}");
    let internal_chain = if sp.itp_local { &local } else { &svc };
    let (uses_ext, uses_fw) = (c.uses_external_chain, c.uses_firewall_chain);
    let no_endpoints = if c.has_endpoints {
        "drop"
    } else {
        "goto reject-chain"
    };
    let mut element = |set: &str, key: String, comment: bool, value: Option<String>| {
        let mut v = key.clone();
        if comment {
            let _ = write!(v, " comment \"{spn}\"");
        }
        if let Some(value) = value {
            let _ = write!(v, " : {value}");
        }
        elements.insert((set.to_string(), key), v);
    };

    for ip in &sp.cluster_ips {
        element("cluster-ips", ip.to_string(), false, None);
        let key = format!("{ip} . {p} . {}", sp.port);
        if c.has_internal {
            element(
                "service-ips",
                key,
                false,
                Some(format!("goto {internal_chain}")),
            );
        } else {
            element("no-endpoint-services", key, true, Some(no_endpoints.into()));
        }
    }
    for ip in sp.external_ips.iter().chain(&sp.lb_ips) {
        let key = format!("{ip} . {p} . {}", sp.port);
        if c.has_endpoints {
            element(
                "service-ips",
                key.clone(),
                false,
                Some(format!("goto {ext}")),
            );
        }
        if !c.has_external {
            element("no-endpoint-services", key, true, Some(no_endpoints.into()));
        }
    }
    if uses_fw {
        for ip in &sp.lb_ips {
            let key = format!("{ip} . {p} . {}", sp.port);
            element("firewall-ips", key, false, Some(format!("goto {fw}")));
        }
    }
    if let Some(np) = sp.node_port {
        let key = format!("{p} . {np}");
        if c.has_endpoints {
            element(
                "service-nodeports",
                key.clone(),
                false,
                Some(format!("goto {ext}")),
            );
        }
        if !c.has_external {
            element(
                "no-endpoint-nodeports",
                key,
                true,
                Some(no_endpoints.into()),
            );
        }
    }
    if !c.has_endpoints {
        return Vec::new();
    }

    let mut own = Vec::new();
    let mut chains = Vec::new();
    if c.uses_cluster_chain {
        chains.push(svc.clone());
    }
    if c.uses_local_chain {
        chains.push(local.clone());
    }
    if uses_ext {
        chains.push(ext.clone());
    }
    if uses_fw {
        chains.push(fw.clone());
    }
    for ep in &c.all {
        chains.push(format!("endpoint-{}", endpoint_base(sp, ep)));
    }
    for chain in &chains {
        let _ = writeln!(out, "add chain {table} {chain}");
        let _ = writeln!(out, "flush chain {table} {chain}");
    }
    if sp.affinity_seconds.is_some() {
        for ep in &c.all {
            let set = format!("affinity-{}", endpoint_base(sp, ep));
            let _ = writeln!(
                out,
                "add set {table} {set} {{ type {addr} ; flags dynamic,timeout ; timeout {}s ; }}",
                sp.affinity_seconds.unwrap_or_default()
            );
            own.push(format!("set {set}"));
        }
    }
    own.extend(chains);
    let mut rule = |chain: &str, body: String| {
        let _ = writeln!(out, "add rule {table} {chain} {body}");
    };
    let choose = |chain: &str, eps: &[EndpointInfo], rule: &mut dyn FnMut(&str, String)| {
        if c.has_internal && chain == internal_chain {
            for ip in &sp.cluster_ips {
                if config.masquerade_all {
                    rule(chain, format!("{l3} daddr {ip} jump mark-for-masquerade"));
                } else if let Some(cidr) = cluster_cidr {
                    rule(
                        chain,
                        format!("{l3} daddr {ip} {l3} saddr != {cidr} jump mark-for-masquerade"),
                    );
                }
            }
        }
        if sp.affinity_seconds.is_some() {
            for ep in eps {
                let b = endpoint_base(sp, ep);
                rule(chain, format!("{l3} saddr @affinity-{b} goto endpoint-{b}"));
            }
        }
        let targets: Vec<String> = eps
            .iter()
            .enumerate()
            .map(|(i, ep)| format!("{i} : goto endpoint-{}", endpoint_base(sp, ep)))
            .collect();
        rule(
            chain,
            format!(
                "numgen random mod {} vmap {{ {} }}",
                eps.len(),
                targets.join(" , ")
            ),
        );
    };
    if c.uses_cluster_chain {
        choose(&svc, &c.cluster, &mut rule);
    }
    if c.uses_local_chain {
        choose(&local, &c.local, &mut rule);
    }
    if uses_ext {
        if !sp.etp_local {
            rule(&ext, "jump mark-for-masquerade".into());
            rule(&ext, format!("goto {svc}"));
        } else {
            if let Some(cidr) = cluster_cidr {
                rule(
                    &ext,
                    format!("{l3} saddr {cidr} goto {svc} comment \"short-circuit pod traffic\""),
                );
            }
            rule(
                &ext,
                "fib saddr type local jump mark-for-masquerade comment \"masquerade local traffic\""
                    .into(),
            );
            rule(
                &ext,
                format!("fib saddr type local goto {svc} comment \"short-circuit local traffic\""),
            );
            if c.uses_local_chain {
                rule(&ext, format!("goto {local}"));
            }
        }
    }
    if uses_fw {
        let allowed = super::firewall_sources(sp, config);
        rule(
            &fw,
            format!("{l3} saddr != {{ {} }} drop", allowed.join(", ")),
        );
    }
    for ep in &c.all {
        let b = endpoint_base(sp, ep);
        let chain = format!("endpoint-{b}");
        rule(
            &chain,
            format!("{l3} saddr {} jump mark-for-masquerade", ep.addr.ip()),
        );
        if sp.affinity_seconds.is_some() {
            rule(&chain, format!("update @affinity-{b} {{ {l3} saddr }}"));
        }
        rule(&chain, format!("meta l4proto {p} dnat to {}", ep.addr));
    }
    own
}
