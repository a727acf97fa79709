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

/// IPv6-only Services for the external rules, the client
/// (`fc00:f853:ccd:e793::100`) reaching 2001:db8::/32 through node1:
/// - local6: LoadBalancer 2001:db8:1::20, eTP=Local, NodePort 30090,
///   health check 32190, its endpoint pod-1-1 on node1;
/// - admin6: LoadBalancer 2001:db8:1::21 open only to the client's /128,
///   NodePort 30091, its endpoint pod-1-0;
/// - sticky6: NodePort 30092 with ClientIP affinity (2 s) over pod-1-0 and
///   pod-2-0;
/// - sink6: NodePort 30093 over pod-2-1's port 9000 (a test's own server).
const EXTERNAL6: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: local6, namespace: default}
spec:
  type: LoadBalancer
  ipFamilies: [IPv6]
  clusterIP: "fd00:10:96::20"
  externalTrafficPolicy: Local
  healthCheckNodePort: 32190
  ports: [{port: 80, nodePort: 30090}]
status: {loadBalancer: {ingress: [{ip: "2001:db8:1::20"}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: local6-1, namespace: default, labels: {kubernetes.io/service-name: local6}}
addressType: IPv6
ports: [{port: 8080}]
endpoints:
- {addresses: ["fd00:10:244:1::11"], nodeName: node1}
---
apiVersion: v1
kind: Service
metadata: {name: admin6, namespace: default}
spec:
  type: LoadBalancer
  ipFamilies: [IPv6]
  clusterIP: "fd00:10:96::21"
  loadBalancerSourceRanges: ["fc00:f853:ccd:e793::100/128"]
  ports: [{port: 80, nodePort: 30091}]
status: {loadBalancer: {ingress: [{ip: "2001:db8:1::21"}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: admin6-1, namespace: default, labels: {kubernetes.io/service-name: admin6}}
addressType: IPv6
ports: [{port: 8080}]
endpoints:
- {addresses: ["fd00:10:244:1::10"], nodeName: node1}
---
apiVersion: v1
kind: Service
metadata: {name: sticky6, namespace: default}
spec:
  type: NodePort
  ipFamilies: [IPv6]
  clusterIP: "fd00:10:96::22"
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 2}}
  ports: [{port: 80, nodePort: 30092}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: sticky6-1, namespace: default, labels: {kubernetes.io/service-name: sticky6}}
addressType: IPv6
ports: [{port: 8080}]
endpoints:
- {addresses: ["fd00:10:244:1::10"], nodeName: node1}
- {addresses: ["fd00:10:244:2::10"], nodeName: node2}
---
apiVersion: v1
kind: Service
metadata: {name: sink6, namespace: default}
spec:
  type: NodePort
  ipFamilies: [IPv6]
  clusterIP: "fd00:10:96::23"
  ports: [{port: 80, nodePort: 30093}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: sink6-1, namespace: default, labels: {kubernetes.io/service-name: sink6}}
addressType: IPv6
ports: [{port: 9000}]
endpoints:
- {addresses: ["fd00:10:244:2::11"], nodeName: node2}
"#;

fn node6(f: &AgentCluster, i: usize) -> Ipv6Addr {
    f.cluster.nodes[i].ip6.unwrap()
}

#[test]
fn an_ipv6_local_traffic_policy_keeps_the_client_address_and_answers_health_checks() {
    let f = AgentCluster::new_dual(&[MANIFESTS, EXTERNAL6], "dual-etp-local");
    let client = f.cluster.client_ns();
    let client_ip = IpAddr::V6(e2e::cluster::CLIENT_IP6);
    for addr in [
        SocketAddr::from((node6(&f, 0), 30090)),
        SocketAddr::from((v6("2001:db8:1::20"), 80)),
    ] {
        let (pod, peer) = whoami(client, addr);
        assert_eq!(pod, "pod-1-1", "{addr}");
        assert_eq!(peer.ip(), client_ip, "{addr}: the client's address kept");
    }
    // node2 has no local endpoint: external traffic is dropped there...
    assert_dropped(client, SocketAddr::from((node6(&f, 1), 30090)));
    assert!(f.packets("node2", "no_local_endpoints") >= 1);
    // ...while its pods still reach the backend through it.
    let (pod, _) = whoami(
        f.cluster.pod_ns("pod-2-0"),
        SocketAddr::from((node6(&f, 1), 30090)),
    );
    assert_eq!(pod, "pod-1-1");

    // The health-check node port on each node's IPv6 address.
    let at = |i: usize| SocketAddr::from((node6(&f, i), 32190)).to_string();
    let ok = http_get(client, &at(0), "/healthz");
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains("\"localEndpoints\": 1"), "{ok}");
    let down = http_get(client, &at(1), "/healthz");
    assert!(down.starts_with("HTTP/1.1 503"), "{down}");
}

#[test]
fn ipv6_source_ranges_admit_the_client_and_drop_a_pod_outside_them() {
    let f = AgentCluster::new_dual(&[MANIFESTS, EXTERNAL6], "dual-ranges");
    let lb = SocketAddr::from((v6("2001:db8:1::21"), 80));
    let (pod, _) = whoami(f.cluster.client_ns(), lb);
    assert_eq!(pod, "pod-1-0", "the client's /128 is in the range");
    // A pod on node2 is not: node2 drops it.
    assert_dropped(f.cluster.pod_ns("pod-2-0"), lb);
    assert!(f.packets("node2", "source_range_denied") >= 1);
    // The ClusterIP is not subject to the ranges.
    let (pod, _) = whoami(
        f.cluster.pod_ns("pod-2-0"),
        SocketAddr::from((v6("fd00:10:96::21"), 80)),
    );
    assert_eq!(pod, "pod-1-0");
}

#[test]
fn ipv6_session_affinity_pins_a_client_then_expires() {
    let f = AgentCluster::new_dual(&[MANIFESTS, EXTERNAL6], "dual-affinity");
    let client = f.cluster.client_ns();
    let sticky = SocketAddr::from((node6(&f, 0), 30092));
    let (first, _) = whoami(client, sticky);
    for i in 1..30 {
        assert_eq!(whoami(client, sticky).0, first, "connection {i}");
    }
    let fresh = f.packets("node1", "new_flow");
    let affine = f.packets("node1", "new_flow_affinity");
    assert_eq!((fresh, affine), (1, 29), "one pick, then affinity");
    // timeoutSeconds: 2, counted from the last new connection.
    std::thread::sleep(Duration::from_millis(2_500));
    whoami(client, sticky);
    assert_eq!(f.packets("node1", "new_flow"), 2, "picked afresh");
}

/// The path to the backend narrows to IPv6's minimum MTU at its last hop
/// (pod-2-1's host-side veth on node2). node2 answers the client's full
/// sized segments, which node1 masqueraded, with packet too big to node1;
/// node1 must translate it for the client, or the upload stalls (IPv6
/// routers never fragment, and the client retransmits full segments
/// forever).
#[test]
fn an_ipv6_packet_too_big_on_the_backends_path_reaches_the_client() {
    use std::io::{Read, Write};
    let f = AgentCluster::new_dual(&[MANIFESTS, EXTERNAL6], "dual-ptb");
    let backend = f.cluster.pod("pod-2-1").clone();
    f.cluster
        .node_ns(1)
        .ip(&["link", "set", &backend.host_device, "mtu", "1280"])
        .unwrap();
    // A sink: reads until the client is done, answers with the count.
    let listen = SocketAddr::from((backend.ip6.unwrap(), 9000));
    let listener = f
        .cluster
        .pod_ns("pod-2-1")
        .run(move || std::net::TcpListener::bind(listen))
        .unwrap()
        .unwrap();
    let sink = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut data = Vec::new();
        s.read_to_end(&mut data).unwrap();
        s.write_all(data.len().to_string().as_bytes()).unwrap();
    });

    const SENT: usize = 256 * 1024;
    let entry = node6(&f, 0);
    let to = SocketAddr::from((entry, 30093));
    let counted = f
        .cluster
        .client_ns()
        .run(move || -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect_timeout(&to, TIMEOUT)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.set_write_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(&vec![7u8; SENT])?;
            s.shutdown(std::net::Shutdown::Write)?;
            let mut reply = String::new();
            s.read_to_string(&mut reply)?;
            Ok(reply)
        })
        .unwrap()
        .expect("the upload completes");
    assert_eq!(counted, SENT.to_string());
    sink.join().unwrap();

    // The client learnt the path's MTU from the translated error.
    let route = e2e::stdout_of(f.cluster.client_ns().command("ip").args([
        "-6",
        "route",
        "get",
        &entry.to_string(),
    ]));
    assert!(route.contains("mtu 1280"), "{route}");
    assert!(f.packets("node1", "icmp_error_translated") >= 1);
}

/// JSON trace lines from `trace` until one matches `wanted` (each line
/// within `WITHIN_TRACE` of the last).
fn trace_until(
    trace: &TraceProcess,
    wanted: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    loop {
        let line = trace
            .next_line(WITHIN_TRACE)
            .expect("a trace line within a second");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if wanted(&v) {
            return v;
        }
    }
}

const WITHIN_TRACE: Duration = Duration::from_secs(1);

/// `dp trace` (text, JSON, pcapng, an IPv6 address filter), `dp explain`
/// with `[v6]:port`, the service, backend and conntrack lists, conntrack
/// flush, stats and metrics, over IPv6 flows of a dual-stack node.
#[test]
fn the_tools_show_ipv6_flows_in_the_clusters_terms() {
    let f = AgentCluster::new_dual(&[MANIFESTS], "dual-tools");
    let pins1 = f.pins("node1");
    let node1 = f.cluster.node_ns(0);
    let pod_ip = f.cluster.pod("pod-1-1").ip6.unwrap().to_string();
    let pod_ns = f.cluster.pod_ns("pod-1-1");
    let pcap = std::env::temp_dir().join(format!("dp-trace6-{}.pcapng", std::process::id()));
    let text = TraceProcess::start(node1, &pins1, &["--ip", &pod_ip, "--proto", "tcp"]);
    let mut json = TraceProcess::start(
        node1,
        &pins1,
        &["-o", "json", "--ip", &pod_ip, "-w", pcap.to_str().unwrap()],
    );
    let icmp6 = TraceProcess::start(node1, &pins1, &["-o", "json", "--proto", "icmpv6"]);

    // A forwarded flow: the frontend, the backend and the NAT in IPv6
    // notation.
    let web = SocketAddr::from((v6("fd00:10:96::10"), 80));
    // Held open, so its conntrack entries stay for the lists below.
    let _held = pod_ns
        .run(move || std::net::TcpStream::connect_timeout(&web, TIMEOUT))
        .unwrap()
        .unwrap();
    let fwd = trace_until(&json, |v| v["reason"] == "new_flow");
    assert_eq!(fwd["source"]["ip"], pod_ip.as_str());
    assert_eq!(fwd["destination"]["ip"], "fd00:10:96::10");
    assert_eq!(fwd["service"]["frontend"], "[fd00:10:96::10]:80/TCP");
    assert_eq!(fwd["service"]["name"], "default/web");
    let backend = fwd["backend"]["ip"].as_str().unwrap().to_string();
    assert!(backend.starts_with("fd00:10:244:"), "{fwd}");
    assert_eq!(fwd["nat"]["destination"], format!("[{backend}]:8080"));
    let reply = trace_until(&json, |v| v["reason"] == "reply_reverse_nat");
    assert_eq!(reply["nat"]["source"], "[fd00:10:96::10]:80");

    // Rejects, and dp's own ICMPv6 error named as such.
    let none6 = v6("fd00:10:96::11");
    refused_within(
        pod_ns,
        SocketAddr::from((none6, 80)),
        Duration::from_secs(3),
    );
    let rej = trace_until(&json, |v| v["verdict"] == "rejected");
    assert_eq!(rej["reason"], "no_endpoints");
    assert_eq!(rej["service"]["name"], "default/none:tcp");
    let icmp = trace_until(&json, |v| v["protocol"] != "TCP");
    assert_eq!(
        (&icmp["protocol"], &icmp["source"]["ip"], &icmp["hook"]),
        (
            &"ICMPv6".into(),
            &"fd00:10:96::11".into(),
            &"tc/egress".into()
        ),
        "{icmp}"
    );
    // The ICMPv6-only session saw it too, and nothing of the TCP flows.
    let only = trace_until(&icmp6, |v| {
        assert_eq!(v["protocol"], "ICMPv6", "--proto icmpv6: {v}");
        v["source"]["ip"] == "fd00:10:96::11"
    });
    assert_eq!(only["hook"], "tc/egress");
    let udp = e2e::udp_echo_once(pod_ns, SocketAddr::from((none6, 53)), b"q", TIMEOUT);
    assert!(udp.is_err());
    let rej_udp = trace_until(&json, |v| v["protocol"] == "UDP");
    assert_eq!(rej_udp["verdict"], "rejected");
    json.interrupt();

    // The text session: the same flows in one line each, TCP only.
    let mut lines = Vec::new();
    while let Some(l) = text.next_line(WITHIN_TRACE) {
        lines.push(l);
    }
    let wanted = format!(
        "[{pod_ip}]:{} -> default/web ([fd00:10:96::10]:80) TCP SYN FORWARDED new flow",
        fwd["source"]["port"]
    );
    assert!(
        lines.iter().any(|l| l.contains(&wanted)),
        "{wanted} in {lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l
            .contains("-> default/none:tcp ([fd00:10:96::11]:80) TCP SYN REJECTED no endpoints")),
        "{lines:#?}"
    );
    assert!(
        lines.iter().all(|l| l.contains(" TCP ")),
        "--proto tcp: {lines:#?}"
    );

    // The pcapng: tshark decodes the IPv6 packets and shows the verdicts.
    let out = std::process::Command::new("tshark")
        .arg("-r")
        .arg(&pcap)
        .args([
            "-T",
            "fields",
            "-e",
            "ipv6.dst",
            "-e",
            "tcp.dstport",
            "-e",
            "udp.dstport",
        ])
        .args(["-e", "frame.comment"])
        .output()
        .expect("tshark (installed by cargo xtask setup)");
    let _ = std::fs::remove_file(&pcap);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = String::from_utf8_lossy(&out.stdout).to_string();
    for (row, verdict) in [
        ("fd00:10:96::10\t80\t\t", "forwarded: new flow to a backend"),
        ("fd00:10:96::11\t80\t\t", "rejected: no endpoints"),
        ("fd00:10:96::11\t\t53\t", "rejected: no endpoints"),
    ] {
        assert!(
            rows.lines()
                .any(|r| r.starts_with(row) && r.contains(verdict)),
            "{row:?} {verdict:?} in\n{rows}"
        );
    }

    // explain, with IPv6 sources and destinations.
    let e = explain(&pins1, &pod_ip, "[fd00:10:96::10]:80/tcp");
    assert_eq!(decision(&e), ("forward", "new_flow"), "{e}");
    assert_eq!(
        e["backends"],
        serde_json::json!(["[fd00:10:244:1::10]:8080", "[fd00:10:244:2::10]:8080"])
    );
    assert_eq!(e["masquerade"], false);
    let e = explain(
        &pins1,
        &format!("[{pod_ip}]:40000"),
        "[fd00:10:96::11]:53/udp",
    );
    assert_eq!(decision(&e), ("reject", "no_endpoints"), "{e}");
    let entry = format!("[{}]:30080", node6(&f, 0));
    let e = explain(&pins1, "[fc00:f853:ccd:e793::100]:1234", &entry);
    assert_eq!(decision(&e), ("forward", "new_flow"), "{e}");
    assert_eq!(e["masquerade"], true, "external traffic is masqueraded");

    // Lists: IPv6 frontends next to IPv4 ones, bracketed.
    let services = inspect(&pins1, &["service", "list"]);
    let frontend = |addr: &str| {
        services
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["frontend"] == addr)
            .unwrap_or_else(|| panic!("{addr} in {services}"))
            .clone()
    };
    let web6 = frontend("[fd00:10:96::10]:80/TCP");
    assert_eq!(web6["ready"].as_array().unwrap().len(), 2, "{web6}");
    assert_eq!(web6["ready"][0]["addr"], "[fd00:10:244:1::10]:8080");
    frontend(&format!("{entry}/TCP"));
    frontend("10.96.0.10:80/TCP");
    let backends = inspect(&pins1, &["backend", "list"]);
    assert!(
        backends
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["addr"] == "[fd00:10:244:2::11]:8053/UDP"),
        "{backends}"
    );
    let ct = inspect(&pins1, &["ct", "list", "--ip", &pod_ip]);
    let ct = ct.as_array().unwrap();
    let held_flow: Vec<_> = ct.iter().filter(|e| e["state"] == "established").collect();
    assert_eq!(held_flow.len(), 2, "the held flow, both directions: {ct:?}");
    assert!(held_flow.iter().any(|e| e["direction"] == "original"
        && e["dst"] == "[fd00:10:96::10]:80"
        && e["service"] == "default/web (ClusterIP)"));

    // Metrics count the IPv6 side per family; stats count its packets.
    let metrics = http_get(node1, "127.0.0.1:10249", "/metrics");
    for expected in [
        "dp_frontends_by_family{ip_family=\"IPv4\"} 4",
        "dp_frontends_by_family{ip_family=\"IPv6\"} 5",
        "dp_backends_by_family{ip_family=\"IPv6\"} 3",
        "dp_conntrack_entries_by_family{ip_family=\"IPv4\"} 0",
    ] {
        assert!(metrics.contains(expected), "{expected} in\n{metrics}");
    }
    let ct6 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("dp_conntrack_entries_by_family{ip_family=\"IPv6\"} "))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("IPv6 conntrack entries in\n{metrics}"));
    assert!(ct6 >= 2, "{ct6}");
    assert_eq!(f.packets("node1", "new_flow"), 1);
    assert!(f.packets("node1", "no_endpoints") >= 2);

    // Flushing by an IPv6 address removes the flow's entries.
    let flushed = inspect(&pins1, &["ct", "flush", "--ip", &pod_ip]);
    assert!(flushed["flushed"].as_u64().unwrap() >= 2, "{flushed}");
    assert_eq!(
        inspect(&pins1, &["ct", "list", "--ip", &pod_ip]),
        serde_json::json!([])
    );
}
