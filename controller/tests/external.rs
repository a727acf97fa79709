//! Traffic from outside the cluster, end to end: a `dp agent --manifests`
//! per node of a two-node namespace cluster (XDP and tc on each node's
//! eth0), pods on both nodes serving TCP, and an external client namespace.
//! NodePort to local and remote backends, externalIPs, LoadBalancer IPs with
//! and without source ranges, externalTrafficPolicy and
//! internalTrafficPolicy Local, session affinity and the health-check node
//! port, checked from what clients and backends see.

mod support;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use support::agents::*;

const NODE1: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
const NODE2: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 3);
const CLIENT: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);

/// Pods: pod-1-0 10.244.1.10, pod-1-1 10.244.1.11 (node1), pod-2-0
/// 10.244.2.10, pod-2-1 10.244.2.11 (node2); all serve TCP 8080.
const MANIFESTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  externalIPs: [198.51.100.10]
  ports: [{port: 80, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.1.10], nodeName: node1}
- {addresses: [10.244.2.10], nodeName: node2}
---
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.11
  ports: [{port: 80, nodePort: 30081}]
status: {loadBalancer: {ingress: [{ip: 203.0.113.10}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: lb-1, namespace: default, labels: {kubernetes.io/service-name: lb}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.1.11], nodeName: node1}
- {addresses: [10.244.2.11], nodeName: node2}
---
apiVersion: v1
kind: Service
metadata: {name: node-agent, namespace: default}
spec:
  clusterIP: 10.96.0.14
  internalTrafficPolicy: Local
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: node-agent-1, namespace: default, labels: {kubernetes.io/service-name: node-agent}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.1.10], nodeName: node1}
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.15
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 2}}
  ports: [{port: 80, nodePort: 30084}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: sticky-1, namespace: default, labels: {kubernetes.io/service-name: sticky}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.1.10], nodeName: node1}
- {addresses: [10.244.1.11], nodeName: node1}
- {addresses: [10.244.2.10], nodeName: node2}
- {addresses: [10.244.2.11], nodeName: node2}
"#;

/// Local traffic policies with no usable endpoint anywhere: `gone`
/// (eTP=Local NodePort 30085, its endpoints deleted) and `unready`
/// (iTP=Local, its only endpoint neither ready nor serving).
const NO_USABLE_ENDPOINTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: gone, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.16
  externalTrafficPolicy: Local
  ports: [{port: 80, nodePort: 30085}]
---
apiVersion: v1
kind: Service
metadata: {name: unready, namespace: default}
spec:
  clusterIP: 10.96.0.17
  internalTrafficPolicy: Local
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: unready-1, namespace: default, labels: {kubernetes.io/service-name: unready}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.1.10], nodeName: node1, conditions: {ready: false, serving: false}}
"#;

/// `old`, created before the API validated addresses strictly: ClusterIP
/// 10.96.0.18, externalIP 198.51.100.18, NodePort 30086, its endpoint
/// pod-2-1, every address written with leading zeros.
const LEADING_ZEROS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: old, namespace: default}
spec:
  type: NodePort
  clusterIP: 010.096.000.018
  externalIPs: [198.051.100.018]
  ports: [{port: 80, nodePort: 30086}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: old-1, namespace: default, labels: {kubernetes.io/service-name: old}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [010.244.002.011], nodeName: node2}
"#;

/// Two LoadBalancers with two ingress IPs each, endpoint pod-2-0: `near`
/// (203.0.113.13, .14) whose source range contains the nodes, and `far`
/// (203.0.113.15, .16) whose range does not.
const LB_SOURCES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: near, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.19
  loadBalancerSourceRanges: [172.18.0.0/24]
  ports: [{port: 80, nodePort: 30087}]
status: {loadBalancer: {ingress: [{ip: 203.0.113.13}, {ip: 203.0.113.14}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: near-1, namespace: default, labels: {kubernetes.io/service-name: near}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.2.10], nodeName: node2}
---
apiVersion: v1
kind: Service
metadata: {name: far, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  loadBalancerSourceRanges: [172.18.0.100/32]
  ports: [{port: 80, nodePort: 30088}]
status: {loadBalancer: {ingress: [{ip: 203.0.113.15}, {ip: 203.0.113.16}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: far-1, namespace: default, labels: {kubernetes.io/service-name: far}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.2.10], nodeName: node2}
"#;

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// Through each node, the web NodePort reaches pod-1-0 and pod-2-0, and
/// the backend sees the entry node as the client.
fn node_ports_reach_both_backends(f: &AgentCluster) {
    let client = f.cluster.client_ns();
    for entry in [NODE1, NODE2] {
        let mut seen = BTreeMap::new();
        for _ in 0..20 {
            let (pod, peer) = whoami(client, sa(entry, 30080));
            assert_eq!(
                peer.ip(),
                IpAddr::V4(entry),
                "masqueraded to the entry node, so replies return through it"
            );
            *seen.entry(pod).or_insert(0) += 1;
        }
        assert_eq!(
            seen.keys().collect::<Vec<_>>(),
            ["pod-1-0", "pod-2-0"],
            "local and remote backends via {entry}"
        );
    }
}

/// As on kind's nodes (deploy/configmap.yaml: DP_XDP=off): tc alone serves
/// NodePorts to local and remote backends, and nothing is attached at XDP.
#[test]
fn node_ports_work_with_tc_alone_when_xdp_is_off() {
    let f = AgentCluster::new_with(&[MANIFESTS], "tc-only", &["--xdp", "off"]);
    node_ports_reach_both_backends(&f);
    assert!(f.packets("node1", "new_flow") >= 1);
    let stats = inspect(&f.pins("node1"), &["stats"]);
    let at_xdp: Vec<_> = stats
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["hook"] == "xdp")
        .collect();
    assert!(at_xdp.is_empty(), "{at_xdp:?}");
    let status = inspect(&f.pins("node1"), &["status"]);
    let attached = status["attached"].to_string();
    assert!(attached.contains("eth0@tc-ingress"), "{attached}");
    assert!(!attached.contains("eth0@xdp"), "{attached}");
}

#[test]
fn node_ports_reach_local_and_remote_backends_through_the_entry_node() {
    let f = AgentCluster::new(
        &[MANIFESTS, ADMIN_WITH_SOURCE_RANGES, LOCAL_TRAFFIC_POLICY],
        "nodeport",
    );
    node_ports_reach_both_backends(&f);
    // The XDP fast path served flows to the remote backend on node1.
    assert!(f.packets("node1", "new_flow") >= 1);
    let served_by_xdp = inspect(&f.pins("node1"), &["stats"])
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["hook"] == "xdp" && r["reason"] == "reply_reverse_nat");
    assert!(served_by_xdp, "replies reverse-NATed at XDP on node1");
}

#[test]
fn external_and_load_balancer_ips_are_served_and_source_ranges_enforced() {
    let f = AgentCluster::new(
        &[MANIFESTS, ADMIN_WITH_SOURCE_RANGES, LOCAL_TRAFFIC_POLICY],
        "lbip",
    );
    let client = f.cluster.client_ns();
    let (pod, peer) = whoami(client, "198.51.100.10:80".parse().unwrap());
    assert!(pod == "pod-1-0" || pod == "pod-2-0", "{pod}");
    assert_eq!(peer.ip(), IpAddr::V4(NODE1));
    let mut seen = BTreeMap::new();
    for _ in 0..16 {
        let (pod, _) = whoami(client, "203.0.113.10:80".parse().unwrap());
        *seen.entry(pod).or_insert(0) += 1;
    }
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["pod-1-1", "pod-2-1"]);

    // admin: only 172.18.0.100/32 may use its LB IP.
    let admin: SocketAddr = "203.0.113.11:80".parse().unwrap();
    assert_eq!(whoami(client, admin).0, "pod-1-0", "the client is allowed");
    // A pod on node2 is not in the range: node2 drops it.
    assert_dropped(f.cluster.pod_ns("pod-2-0"), admin);
    assert!(f.packets("node2", "source_range_denied") >= 1);
    // Its ClusterIP is not subject to the ranges.
    let (pod, _) = whoami(
        f.cluster.pod_ns("pod-2-0"),
        "10.96.0.12:80".parse().unwrap(),
    );
    assert_eq!(pod, "pod-1-0");
}

#[test]
fn external_traffic_policy_local_keeps_the_client_ip_and_answers_health_checks() {
    let f = AgentCluster::new(
        &[MANIFESTS, ADMIN_WITH_SOURCE_RANGES, LOCAL_TRAFFIC_POLICY],
        "etplocal",
    );
    let client = f.cluster.client_ns();
    for addr in [sa(NODE1, 30083), "203.0.113.12:80".parse().unwrap()] {
        let (pod, peer) = whoami(client, addr);
        assert_eq!(pod, "pod-1-1");
        assert_eq!(peer.ip(), IpAddr::V4(CLIENT), "client IP preserved");
    }
    // node2 has no local endpoint: external traffic is dropped there...
    assert_dropped(client, sa(NODE2, 30083));
    assert!(f.packets("node2", "no_local_endpoints") >= 1);
    // ...while pods on node2 still reach the backend through it.
    let (pod, _) = whoami(f.cluster.pod_ns("pod-2-0"), sa(NODE2, 30083));
    assert_eq!(pod, "pod-1-1");

    // The inspection view of the frontend: local backends, and the
    // cluster-wide ones for traffic from inside.
    let services = inspect(&f.pins("node2"), &["service", "list"]);
    let node_port = services
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["frontend"] == "172.18.0.3:30083/TCP")
        .expect("node2's NodePort frontend");
    assert_eq!(node_port["local_only"], true);
    assert_eq!(node_port["ready"].as_array().unwrap().len(), 0);
    assert_eq!(node_port["from_inside"][0][0]["addr"], "10.244.1.11:8080");

    // The health-check node port, as a cloud load balancer probes it.
    let ok = http_get(client, &sa(NODE1, 32100).to_string(), "/healthz");
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains("\"localEndpoints\": 1"), "{ok}");
    assert!(ok.contains("\"name\": \"local\""), "{ok}");
    let down = http_get(client, &sa(NODE2, 32100).to_string(), "/healthz");
    assert!(down.starts_with("HTTP/1.1 503"), "{down}");
    assert!(down.contains("\"localEndpoints\": 0"), "{down}");
}

#[test]
fn internal_traffic_policy_local_serves_only_pods_on_nodes_with_an_endpoint() {
    let f = AgentCluster::new(
        &[MANIFESTS, ADMIN_WITH_SOURCE_RANGES, LOCAL_TRAFFIC_POLICY],
        "itplocal",
    );
    let vip: SocketAddr = "10.96.0.14:80".parse().unwrap();
    let (pod, peer) = whoami(f.cluster.pod_ns("pod-1-1"), vip);
    assert_eq!(pod, "pod-1-0");
    assert_eq!(peer.ip(), "10.244.1.11".parse::<IpAddr>().unwrap());
    assert_dropped(f.cluster.pod_ns("pod-2-0"), vip);
    assert!(f.packets("node2", "no_local_endpoints") >= 1);
}

/// kube-proxy rejects every frontend of a service port with no usable
/// endpoint in the cluster, whatever its traffic policies; it drops
/// ("no local endpoints") only when endpoints exist elsewhere
/// (kube-proxy-rules.md 2.5 items 1, 2 and 4). The datapath and
/// `dp explain` agree.
#[test]
fn local_policies_without_any_usable_endpoint_reject_like_kube_proxy() {
    let f = AgentCluster::new(
        &[MANIFESTS, LOCAL_TRAFFIC_POLICY, NO_USABLE_ENDPOINTS],
        "nousable",
    );
    let explain = |node: &str, from: Ipv4Addr, to: SocketAddr| {
        let e = explain(&f.pins(node), &from.to_string(), &to.to_string());
        let (verdict, reason) = decision(&e);
        (verdict.to_string(), reason.to_string())
    };
    let reject = ("reject".to_string(), "no_endpoints".to_string());
    let client = f.cluster.client_ns();
    // eTP=Local, no endpoints at all: refused on both nodes.
    for (node, ip) in [("node1", NODE1), ("node2", NODE2)] {
        assert_refused(client, sa(ip, 30085));
        assert_eq!(explain(node, CLIENT, sa(ip, 30085)), reject, "{node}");
    }
    // iTP=Local, its one endpoint unusable: refused from pods on both nodes.
    let unready = sa(Ipv4Addr::new(10, 96, 0, 17), 80);
    for pod in ["pod-1-1", "pod-2-0"] {
        assert_refused(f.cluster.pod_ns(pod), unready);
    }
    assert_eq!(
        explain("node2", Ipv4Addr::new(10, 244, 2, 10), unready),
        reject
    );
    assert!(f.packets("node1", "no_endpoints") >= 2);
    assert!(f.packets("node2", "no_endpoints") >= 2);
    // Endpoints elsewhere but none here is still a drop (`local`'s
    // endpoint is on node1).
    assert_dropped(client, sa(NODE2, 30083));
    assert_eq!(
        explain("node2", CLIENT, sa(NODE2, 30083)),
        ("drop".to_string(), "no_local_endpoints".to_string())
    );
}

/// Addresses with leading zeros are read as decimal, as kube-proxy reads
/// them (kube-proxy-rules.md: ParseIPSloppy), and each is logged once.
#[test]
fn addresses_with_leading_zeros_are_served_and_logged_once() {
    let f = AgentCluster::new(&[MANIFESTS, LEADING_ZEROS], "zeros");
    let client = f.cluster.client_ns();
    for addr in [sa(NODE1, 30086), "198.51.100.18:80".parse().unwrap()] {
        assert_eq!(whoami(client, addr).0, "pod-2-1", "{addr}");
    }
    let vip: SocketAddr = "10.96.0.18:80".parse().unwrap();
    assert_eq!(whoami(f.cluster.pod_ns("pod-1-0"), vip).0, "pod-2-1");
    let e = explain(&f.pins("node1"), "10.244.1.10", "10.96.0.18:80");
    assert_eq!(decision(&e), ("forward", "new_flow"), "{e}");
    assert_eq!(e["backends"], serde_json::json!(["10.244.2.11:8080"]));
    // No Service CIDR known (no --service-cidr): an unallocated ClusterIP is
    // left to the node's routes, as before.
    let e = explain(&f.pins("node1"), "10.244.1.10", "10.96.0.99:80");
    assert_eq!(e["reason"], "no_service", "{e}");
    assert!(f.startup_logs[0]
        .iter()
        .any(|l| l.contains("Service CIDRs unknown")));
    for given in ["010.096.000.018", "198.051.100.018", "010.244.002.011"] {
        let lines: Vec<&String> = f.startup_logs[0]
            .iter()
            .filter(|l| l.contains(given) && l.contains("leading zeros"))
            .collect();
        assert_eq!(lines.len(), 1, "{given} logged once: {lines:?}");
    }
}

/// kube-proxy-rules.md 2.5 item 8: traffic to a LoadBalancer IP whose
/// source is one of the service's LB IPs (the node's own traffic, SNATed
/// to it on the way) passes when a source range contains the node, and
/// only then. The client plays the load balancer: it sends from one LB IP
/// of the service to the other.
#[test]
fn source_ranges_containing_the_node_accept_the_services_own_lb_ips() {
    let f = AgentCluster::new(&[MANIFESTS, LB_SOURCES], "lbsources");
    let client = f.cluster.client_ns();
    let node1 = f.cluster.node_ns(0);
    for (to, from) in [
        ("203.0.113.13", "203.0.113.14"),
        ("203.0.113.15", "203.0.113.16"),
    ] {
        client.add_addr("eth0", &format!("{from}/32")).unwrap();
        client
            .ip(&[
                "route",
                "add",
                &format!("{to}/32"),
                "via",
                "172.18.0.2",
                "src",
                from,
            ])
            .unwrap();
        node1
            .add_route(&format!("{from}/32"), "172.18.0.100")
            .unwrap();
    }
    let explain = |from: &str, to: &str| {
        let e = explain(&f.pins("node1"), from, to);
        (e["verdict"].clone(), e["reason"].clone())
    };
    let (pod, peer) = whoami(client, "203.0.113.13:80".parse().unwrap());
    assert_eq!(pod, "pod-2-0");
    assert_eq!(peer.ip(), IpAddr::V4(NODE1), "masqueraded (eTP=Cluster)");
    assert_eq!(
        explain("203.0.113.14", "203.0.113.13:80"),
        ("forward".into(), "new_flow".into())
    );
    let denied_before = f.packets("node1", "source_range_denied");
    assert_dropped(client, "203.0.113.15:80".parse().unwrap());
    assert!(f.packets("node1", "source_range_denied") > denied_before);
    assert_eq!(
        explain("203.0.113.16", "203.0.113.15:80"),
        ("drop".into(), "source_range_denied".into())
    );
}

/// kube-proxy nftables mode's "Drop traffic to unallocated ClusterIPs"
/// (kube-proxy-rules.md 3.2): with the Service CIDR known
/// (`--service-cidr`), a packet to an address in it that no Service has is
/// dropped on the node, from pods and from outside; a ClusterIP's unserved
/// port is still rejected.
#[test]
fn traffic_to_unallocated_cluster_ips_is_dropped_when_the_service_cidr_is_known() {
    let f = AgentCluster::new_with(
        &[MANIFESTS],
        "unallocated",
        &["--service-cidr", "10.96.0.0/16,fd00:10:96::/108"],
    );
    let nowhere: SocketAddr = "10.96.0.99:80".parse().unwrap();
    assert_dropped(f.cluster.pod_ns("pod-1-0"), nowhere);
    assert_dropped(f.cluster.client_ns(), nowhere);
    assert!(f.packets("node1", "unallocated_cluster_ip") >= 2);
    let e = explain(&f.pins("node1"), "10.244.1.10", "10.96.0.99:80");
    assert_eq!(decision(&e), ("drop", "unallocated_cluster_ip"), "{e}");
    assert_refused(
        f.cluster.pod_ns("pod-1-0"),
        "10.96.0.10:81".parse().unwrap(),
    );
    // Outside the Service CIDR nothing changes.
    let e = explain(&f.pins("node1"), "10.244.1.10", "10.97.0.1:80");
    assert_eq!(e["reason"], "no_service", "{e}");
}

/// `--nodeport-addresses` narrows the health check node ports as it
/// narrows NodePorts (kube-proxy does the same): listening on the node
/// address in the CIDR, not on every address (loopback included).
#[test]
fn health_checks_listen_only_on_the_nodeport_addresses() {
    let f = AgentCluster::new_with(
        &[MANIFESTS, LOCAL_TRAFFIC_POLICY],
        "hcaddr",
        &["--nodeport-addresses", "172.18.0.0/24"],
    );
    let ok = http_get(
        f.cluster.client_ns(),
        &sa(NODE1, 32100).to_string(),
        "/healthz",
    );
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let loopback: SocketAddr = "127.0.0.1:32100".parse().unwrap();
    let refused = f
        .cluster
        .node_ns(0)
        .run(|| std::net::TcpStream::connect_timeout(&loopback, Duration::from_secs(1)))
        .unwrap();
    assert_eq!(
        refused.map(drop).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionRefused),
        "not on 0.0.0.0"
    );
}

/// A process on node1 connecting to node1's own NodePort: the packet goes
/// over `lo`, where no dp program runs, and the node's stack resets it
/// (kube-proxy's OUTPUT chain would serve it; socket-level load balancing
/// will). `dp explain` says so instead of claiming a forward.
#[test]
fn a_node_connecting_to_its_own_node_port_is_not_served_and_explain_says_so() {
    let f = AgentCluster::new(&[MANIFESTS], "ownnodeport");
    let own = sa(NODE1, 30080);
    assert_refused(f.cluster.node_ns(0), own);
    let explain = |from: &str| {
        let out = e2e::stdout_of(
            std::process::Command::new("nsenter")
                .arg(format!("--net={}", f.cluster.node_ns(0).path().display()))
                .args([env!("CARGO_BIN_EXE_dp"), "explain", "--bpffs"])
                .arg(f.pins("node1"))
                .args(["--from", from, "--to", "172.18.0.2:30080", "-o", "json"]),
        );
        let e: serde_json::Value = serde_json::from_str(&out).unwrap();
        (e["verdict"].clone(), e["reason"].clone())
    };
    assert_eq!(
        explain("172.18.0.2"),
        ("pass".into(), "node_to_own_address".into())
    );
    // From elsewhere the same NodePort is served.
    assert_eq!(
        explain("172.18.0.100"),
        ("forward".into(), "new_flow".into())
    );
    assert_eq!(whoami(f.cluster.client_ns(), own).0.len(), "pod-1-0".len());
}

#[test]
fn session_affinity_pins_a_client_for_fifty_connections_then_expires() {
    let f = AgentCluster::new(
        &[MANIFESTS, ADMIN_WITH_SOURCE_RANGES, LOCAL_TRAFFIC_POLICY],
        "affinity",
    );
    let client = f.cluster.client_ns();
    let sticky = sa(NODE1, 30084);
    let (first, _) = whoami(client, sticky);
    for i in 1..50 {
        assert_eq!(whoami(client, sticky).0, first, "connection {i}");
    }
    let services = inspect(&f.pins("node1"), &["service", "list"]);
    let frontend = services
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["frontend"] == "172.18.0.2:30084/TCP")
        .expect("the sticky NodePort");
    assert_eq!(frontend["affinity_seconds"], 2);
    let affine = f.packets("node1", "new_flow_affinity");
    let fresh = f.packets("node1", "new_flow");
    assert_eq!((fresh, affine), (1, 49), "one pick, then affinity");
    // timeoutSeconds: 2, counted from the last new connection.
    std::thread::sleep(Duration::from_millis(2_500));
    whoami(client, sticky);
    assert_eq!(
        f.packets("node1", "new_flow"),
        2,
        "after the timeout the backend is picked afresh"
    );
}

/// Short connections (connect, one exchange, RST) from `threads` threads in
/// `ns` to `addr`, `per_thread` each: (completed, SYNs retransmitted), the
/// latter from each socket's `tcpi_total_retrans` right after connect.
fn short_connections(
    ns: &e2e::Netns,
    addr: SocketAddr,
    threads: usize,
    per_thread: usize,
) -> (usize, u64) {
    use std::{
        io::{Read, Write},
        net::TcpStream,
        os::fd::AsRawFd,
    };
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            ns.spawn(move || {
                let (mut done, mut retransmitted) = (0usize, 0u64);
                for _ in 0..per_thread {
                    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
                    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
                    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
                    // SAFETY: a connected socket, and an out buffer with its length.
                    let rc = unsafe {
                        libc::getsockopt(
                            s.as_raw_fd(),
                            libc::IPPROTO_TCP,
                            libc::TCP_INFO,
                            (&mut info as *mut libc::tcp_info).cast(),
                            &mut len,
                        )
                    };
                    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
                    retransmitted += u64::from(info.tcpi_total_retrans);
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    s.write_all(b"hi").unwrap();
                    let mut buf = [0u8; 64];
                    assert!(s.read(&mut buf).unwrap() > 0, "a reply from {addr}");
                    e2e::rst_on_close(&s).unwrap();
                    done += 1;
                }
                (done, retransmitted)
            })
            .unwrap()
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .fold((0, 0), |(d, r), (d2, r2)| (d + d2, r + r2))
}

/// Many short connections through a NodePort, as `cargo xtask bench`'s
/// connection-rate run makes them: every one is masqueraded to the entry
/// node, so each needs a free source port towards its backend while the
/// conntrack entries of the closed ones are still there. All get their
/// first SYN through: none is dropped for want of a masquerade port (a
/// dropped SYN costs the client a 1 s retransmission).
#[test]
fn concurrent_short_node_port_connections_all_pass_on_their_first_syn() {
    let f = AgentCluster::new(&[MANIFESTS], "short-connections");
    let client = f.cluster.client_ns();
    let (done, retransmitted) = short_connections(client, sa(NODE2, 30080), 4, 5_000);
    assert_eq!(done, 20_000);
    assert_eq!(f.packets("node2", "nat_ports_exhausted"), 0);
    assert_eq!(retransmitted, 0, "SYNs retransmitted by the client");
}

/// An SCTP Service (this kernel has no SCTP sockets, so no association is
/// made here: `external_test_run.rs` sends crafted SCTP packets through the
/// programs). The agent programs its ports, and `dp explain` follows them.
#[test]
fn sctp_services_are_programmed_and_explained() {
    const SCTP_SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: signalling, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.21
  ports: [{name: s1ap, port: 36412, protocol: SCTP, nodePort: 30412}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: signalling-1, namespace: default, labels: {kubernetes.io/service-name: signalling}}
addressType: IPv4
ports: [{name: s1ap, port: 36412, protocol: SCTP}]
endpoints:
- {addresses: [10.244.2.11], nodeName: node2}
"#;
    let f = AgentCluster::new(&[MANIFESTS, SCTP_SERVICE], "sctp");
    let services = inspect(&f.pins("node1"), &["service", "list"]);
    let frontends: Vec<&str> = services
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["frontend"].as_str())
        .filter(|s| s.ends_with("/SCTP"))
        .collect();
    assert_eq!(
        frontends,
        ["10.96.0.21:36412/SCTP", "172.18.0.2:30412/SCTP"]
    );
    for (from, to) in [
        ("10.244.1.10", "10.96.0.21:36412/sctp"),
        ("172.18.0.100", "172.18.0.2:30412/sctp"),
    ] {
        let e = explain(&f.pins("node1"), from, to);
        assert_eq!(decision(&e), ("forward", "new_flow"), "{e}");
        assert_eq!(e["backends"], serde_json::json!(["10.244.2.11:36412"]));
    }
    // The TCP port of the same number is not the SCTP one.
    let e = explain(&f.pins("node1"), "10.244.1.10", "10.96.0.21:36412/tcp");
    assert_eq!(e["reason"], "port_not_served", "{e}");
}

#[test]
fn conntrack_entries_past_their_deadline_are_collected_by_the_agent() {
    let f = AgentCluster::new_with(&[MANIFESTS], "ct-gc", &["--ct-gc-interval", "1"]);
    let pins = f.pins("node1");
    let pod = f.cluster.pod_ns("pod-1-1");
    let web: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let (_, local) = whoami(pod, web);
    let ours = |rows: &serde_json::Value| -> Vec<serde_json::Value> {
        rows.as_array()
            .unwrap()
            .iter()
            .filter(|r| {
                let (src, dst) = (r["src"].to_string(), r["dst"].to_string());
                src.contains(&local.to_string()) || dst.contains(&local.to_string())
            })
            .cloned()
            .collect()
    };
    // Closed: both entries wait out the closing timeout (10 s).
    let before = ours(&inspect(&pins, &["ct", "list"]));
    assert_eq!(before.len(), 2, "{before:?}");
    // The collector, every second, deletes them once past their deadline
    // (the LRU map alone would keep them until full). Its counter is the
    // event waited for.
    let deleted = || -> u64 {
        let metrics = http_get(f.cluster.node_ns(0), "127.0.0.1:10249", "/metrics");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("dp_conntrack_gc_deleted_total "))
            .map_or(0, |v| v.trim().parse().unwrap())
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while deleted() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "not collected: {:?}",
            inspect(&pins, &["ct", "list"])
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let after = ours(&inspect(&pins, &["ct", "list"]));
    assert!(after.is_empty(), "{after:?}");
}
