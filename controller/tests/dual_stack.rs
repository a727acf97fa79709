//! Dual-stack Services end to end, over IPv6 and IPv4: a `dp agent
//! --manifests` per node of a two-node dual-stack namespace cluster (kind's
//! `ipFamily: dual` addresses and sysctls), pods on both nodes serving TCP
//! on both families, real TCP and UDP clients. Each family is served by
//! its own rules: a dual-stack Service answers on both ClusterIPs, each
//! from endpoints of its own family.

mod support;

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use support::agents::*;

fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

/// web: dual-stack NodePort over pod-1-0 and pod-2-0 (a slice per family).
/// none: dual-stack, no endpoints. solo6: single-stack IPv6 over pod-2-1.
const MANIFESTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:10:96::10"]
  ports: [{port: 80, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v4, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.1.10], nodeName: node1}
- {addresses: [10.244.2.10], nodeName: node2}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{port: 8080}]
endpoints:
- {addresses: ["fd00:10:244:1::10"], nodeName: node1}
- {addresses: ["fd00:10:244:2::10"], nodeName: node2}
---
apiVersion: v1
kind: Service
metadata: {name: none, namespace: default}
spec:
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv6, IPv4]
  clusterIP: "fd00:10:96::11"
  clusterIPs: ["fd00:10:96::11", 10.96.0.11]
  ports: [{name: tcp, port: 80}, {name: udp, port: 53, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: solo6, namespace: default}
spec:
  ipFamilies: [IPv6]
  clusterIP: "fd00:10:96::12"
  ports: [{port: 80, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: solo6-1, namespace: default, labels: {kubernetes.io/service-name: solo6}}
addressType: IPv6
ports: [{port: 8053, protocol: UDP}]
endpoints:
- {addresses: ["fd00:10:244:2::11"], nodeName: node2}
"#;

/// Backends seen over `rounds` connections from `ns` to `addr`, and every
/// client address they saw.
fn spread(
    ns: &e2e::Netns,
    addr: SocketAddr,
    rounds: usize,
) -> (BTreeSet<String>, BTreeSet<IpAddr>) {
    let (mut pods, mut peers) = (BTreeSet::new(), BTreeSet::new());
    for _ in 0..rounds {
        let (pod, peer) = whoami(ns, addr);
        pods.insert(pod);
        peers.insert(peer.ip());
    }
    (pods, peers)
}

#[test]
fn a_dual_stack_service_answers_on_both_cluster_ips_each_from_its_own_family() {
    let f = AgentCluster::new_dual(&[MANIFESTS], "dual-clusterip");
    let client = f.cluster.pod("pod-1-1").clone();
    let ns = f.cluster.pod_ns("pod-1-1");
    let both: BTreeSet<String> = ["pod-1-0".into(), "pod-2-0".into()].into();

    // IPv6: local and remote backends, the pod's own IPv6 address kept,
    // and every reply from the ClusterIP (the connection would fail
    // otherwise).
    let (pods, peers) = spread(ns, SocketAddr::from((v6("fd00:10:96::10"), 80)), 20);
    assert_eq!(pods, both, "over IPv6");
    assert_eq!(
        peers,
        [IpAddr::V6(client.ip6.unwrap())].into(),
        "IPv6 to IPv6 endpoints, not masqueraded"
    );

    // IPv4: the same Service, its IPv4 endpoints.
    let (pods, peers) = spread(ns, SocketAddr::from((Ipv4Addr::new(10, 96, 0, 10), 80)), 20);
    assert_eq!(pods, both, "over IPv4");
    assert_eq!(peers, [IpAddr::V4(client.ip)].into());

    assert!(f.packets("node1", "new_flow") >= 40);
    assert_eq!(f.packets("node1", "no_node_address"), 0);
}

/// Without endpoints, both families reject: ICMPv6 (or ICMP) port
/// unreachable. UDP and IPv4 TCP fail at once. IPv6 TCP from a pod fails
/// on the SYN's retransmission, about a second later: the first ICMPv6
/// error comes back while `connect()` still holds the socket, and the
/// kernel's IPv6 TCP keeps it only as a soft error then. The kernel's own
/// REJECT (kube-proxy's `icmp6-port-unreachable`) does the same on this
/// path (`an_ipv6_reject_reaches_a_pod_as_the_kernels_own_reject_does`).
#[test]
fn both_families_without_endpoints_are_refused_from_a_pod_and_from_the_node() {
    let f = AgentCluster::new_dual(&[MANIFESTS], "dual-reject");
    let vip6 = IpAddr::V6(v6("fd00:10:96::11"));
    let vip4 = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 11));
    for ns in [f.cluster.pod_ns("pod-1-0"), f.cluster.node_ns(0)] {
        assert_refused(ns, SocketAddr::new(vip4, 80));
        refused_within(ns, SocketAddr::new(vip6, 80), Duration::from_secs(3));
        for vip in [vip6, vip4] {
            // UDP: the error fails the connected socket's receive at once.
            let started = std::time::Instant::now();
            let r = e2e::udp_echo_once(ns, SocketAddr::new(vip, 53), b"q", Duration::from_secs(3));
            let err = r.expect_err("no answer without endpoints").to_string();
            assert!(err.contains("refused"), "{vip} from {}: {err}", ns.name());
            assert!(started.elapsed() < Duration::from_secs(1), "at once");
        }
    }
    assert!(f.packets("node1", "no_endpoints") >= 8);
}

/// What a pod sees of an IPv6 TCP reject: dp's (a Service without
/// endpoints) and the kernel's own (`ip6tables -j REJECT --reject-with
/// icmp6-port-unreachable` on the node, as kube-proxy's iptables mode
/// writes it) on the same path, and the IPv4 ones. Each is refused; the
/// time each took is printed (`--nocapture`): docs/deploy.md has a run.
#[test]
fn an_ipv6_reject_reaches_a_pod_as_the_kernels_own_reject_does() {
    let f = AgentCluster::new_dual(&[MANIFESTS], "dual-kernel-reject");
    let node = f.cluster.node_ns(0);
    for (tool, net) in [("ip6tables", "fd00:10:96::99"), ("iptables", "10.96.0.99")] {
        let reject = if tool == "ip6tables" {
            "icmp6-port-unreachable"
        } else {
            "icmp-port-unreachable"
        };
        let out = node
            .exec(
                tool,
                &[
                    "-I",
                    "FORWARD",
                    "-d",
                    net,
                    "-p",
                    "tcp",
                    "-j",
                    "REJECT",
                    "--reject-with",
                    reject,
                ],
            )
            .unwrap();
        assert!(
            out.status.success(),
            "{tool}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let ns = f.cluster.pod_ns("pod-1-0");
    for (what, addr) in [
        ("dp, IPv6", SocketAddr::from((v6("fd00:10:96::11"), 80))),
        ("kernel, IPv6", SocketAddr::from((v6("fd00:10:96::99"), 80))),
        (
            "dp, IPv4",
            SocketAddr::from((Ipv4Addr::new(10, 96, 0, 11), 80)),
        ),
        (
            "kernel, IPv4",
            SocketAddr::from((Ipv4Addr::new(10, 96, 0, 99), 80)),
        ),
    ] {
        let took = refused_within(ns, addr, Duration::from_secs(3));
        println!("{what} reject ({addr}): refused after {took:?}");
    }
}

#[test]
fn an_ipv6_node_port_is_masqueraded_to_the_entry_nodes_ipv6_address() {
    let f = AgentCluster::new_dual(&[MANIFESTS], "dual-nodeport");
    let client = f.cluster.client_ns();
    for node in &f.cluster.nodes {
        let entry = node.ip6.unwrap();
        let (pods, peers) = spread(client, SocketAddr::from((entry, 30080)), 20);
        assert_eq!(pods.len(), 2, "local and remote backends via {entry}");
        assert_eq!(
            peers,
            [IpAddr::V6(entry)].into(),
            "masqueraded to the entry node"
        );
    }
}

#[test]
fn ipv6_hairpin_is_masqueraded_to_the_nodes_ipv6_address() {
    let f = AgentCluster::new_dual(&[MANIFESTS], "dual-hairpin");
    let pod = f.cluster.pod("pod-1-0").clone();
    let ns = f.cluster.pod_ns("pod-1-0");
    let node1 = f.cluster.nodes[0].ip6.unwrap();
    let mut to_itself = 0;
    for _ in 0..30 {
        let (backend, peer) = whoami(ns, SocketAddr::from((v6("fd00:10:96::10"), 80)));
        if backend == pod.name {
            to_itself += 1;
            assert_eq!(
                peer.ip(),
                IpAddr::V6(node1),
                "hairpin: the backend sees the node"
            );
        } else {
            assert_eq!(peer.ip(), IpAddr::V6(pod.ip6.unwrap()));
        }
    }
    assert!(to_itself > 0, "30 connections, none to itself");
}

#[test]
fn a_single_stack_ipv6_udp_service_answers_from_its_cluster_ip() {
    let f = AgentCluster::new_dual(&[MANIFESTS], "dual-udp");
    let backend = f.cluster.pod("pod-2-1").clone();
    let _server = e2e::UdpEchoServer::start_named(
        f.cluster.pod_ns("pod-2-1"),
        SocketAddr::from((backend.ip6.unwrap(), 8053)),
        Some(backend.name.clone()),
    )
    .unwrap();
    let vip = SocketAddr::from((v6("fd00:10:96::12"), 80));
    for ns in [f.cluster.pod_ns("pod-1-0"), f.cluster.node_ns(0)] {
        // A connected socket: only a reply from the ClusterIP reaches it.
        let (reply, _) = e2e::udp_echo_once(ns, vip, b"ping", TIMEOUT)
            .unwrap_or_else(|e| panic!("{vip} from {}: {e}", ns.name()));
        assert!(reply.ends_with(b"ping"), "{reply:?}");
    }
}
