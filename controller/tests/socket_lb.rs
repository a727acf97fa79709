//! Socket-level load balancing (`dp agent --socket-lb host`) end to end: a
//! dp agent per node of a two-node namespace cluster (kind's sysctls:
//! `accept_local = 0`, strict `rp_filter`), each node's socket hooks on a
//! cgroup of the test's own that holds only that node's client processes.
//! Real sockets: a ClusterIP connect from the node goes to a backend at
//! connect() (tc translates none of its packets), getpeername() shows the
//! ClusterIP, a Service without endpoints is refused at once, rules that
//! need the packet are left to tc; and one node's hooks touch no other
//! namespace's sockets, no process outside their cgroup, and not the root
//! namespace's.

mod support;

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use support::agents::*;

/// web: ClusterIP 10.96.0.10 (80/TCP, 53/UDP) over pod-1-0 and pod-2-0.
/// none: no endpoints. sticky: ClientIP affinity over pod-1-0.
const MANIFESTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- {addresses: [10.244.1.10], nodeName: node1}
- {addresses: [10.244.2.10], nodeName: node2}
---
apiVersion: v1
kind: Service
metadata: {name: none, namespace: default}
spec:
  clusterIP: 10.96.0.11
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: default}
spec:
  clusterIP: 10.96.0.12
  sessionAffinity: ClientIP
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: sticky-1, namespace: default, labels: {kubernetes.io/service-name: sticky}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.1.10], nodeName: node1}
"#;

/// IPv6: web6 (fd00:10:96::10, 80/TCP) over pod-1-0 and pod-2-0; none6
/// (fd00:10:96::11) without endpoints.
const MANIFESTS6: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web6, namespace: default}
spec:
  ipFamilies: [IPv6]
  clusterIP: "fd00:10:96::10"
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web6-1, namespace: default, labels: {kubernetes.io/service-name: web6}}
addressType: IPv6
ports: [{port: 8080}]
endpoints:
- {addresses: ["fd00:10:244:1::10"], nodeName: node1}
- {addresses: ["fd00:10:244:2::10"], nodeName: node2}
---
apiVersion: v1
kind: Service
metadata: {name: none6, namespace: default}
spec:
  ipFamilies: [IPv6]
  clusterIP: "fd00:10:96::11"
  ports: [{port: 80}]
"#;

/// A cgroup v2 directory of this test, removed when dropped (its
/// processes are gone by then: each client exits).
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn new(name: &str) -> TestCgroup {
        let root = dp::agent::cgroup2_root().expect("a cgroup v2 hierarchy");
        let dir = root.join(format!("dp-test-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TestCgroup(dir)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The cluster, an agent per node with `--socket-lb host` on the node's
/// test cgroup. Field order is drop order: agents (and their hooks) first.
struct Fixture {
    _agents: Vec<Agent>,
    cgroups: Vec<TestCgroup>,
    bpffs: Bpffs,
    _manifests: ManifestsDir,
    _servers: Vec<e2e::TcpEchoServer>,
    _udp: Vec<e2e::UdpEchoServer>,
    cluster: e2e::Cluster,
}

impl Fixture {
    fn new(test: &str) -> Fixture {
        Self::build(test, false)
    }

    /// On a dual-stack cluster (kind's IPv6 addresses), with `MANIFESTS6`
    /// too and each agent given its node's IPv6 address.
    fn build(test: &str, dual: bool) -> Fixture {
        e2e::require_root();
        let cluster = if dual {
            e2e::Cluster::new_dual(&[2, 2]).unwrap()
        } else {
            e2e::Cluster::new(&[2, 2]).unwrap()
        };
        let servers = cluster.serve_named_tcp(8080).unwrap();
        let udp = ["pod-1-0", "pod-2-0"]
            .iter()
            .map(|p| {
                let pod = cluster.pod(p);
                e2e::UdpEchoServer::start_named(
                    cluster.pod_ns(p),
                    SocketAddr::from((pod.ip, 5353)),
                    Some(pod.name.clone()),
                )
                .unwrap()
            })
            .collect();
        let manifests = manifests_dir(test);
        std::fs::write(manifests.join("services.yaml"), MANIFESTS).unwrap();
        if dual {
            std::fs::write(manifests.join("services6.yaml"), MANIFESTS6).unwrap();
        }
        let bpffs = Bpffs::new(test);
        let cgroups: Vec<TestCgroup> = cluster
            .nodes
            .iter()
            .map(|n| TestCgroup::new(&format!("{test}-{}", n.name)))
            .collect();
        let agents = cluster
            .nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                let cg = cgroups[i].0.to_str().unwrap().to_string();
                let ip6 = node.ip6.map(|ip| ip.to_string());
                let mut args = vec!["--socket-lb", "host", "--cgroup-root", &cg];
                if let Some(ip6) = &ip6 {
                    args.extend(["--node-ip", ip6]);
                }
                Agent::start_with_args(
                    cluster.node_ns(i),
                    &node.name,
                    &node.ip.to_string(),
                    ("--manifests", &manifests),
                    &bpffs.node(&node.name),
                    &args,
                )
            })
            .collect::<Vec<_>>();
        // The hooks attach before the first sync.
        for a in &agents {
            a.wait_for(&["socket-level load balancing attached"]);
            a.wait_for(&["synced"]);
        }
        Fixture {
            _agents: agents,
            cgroups,
            bpffs,
            _manifests: manifests,
            _servers: servers,
            _udp: udp,
            cluster,
        }
    }

    fn pins(&self, node: &str) -> PathBuf {
        self.bpffs.node(node)
    }

    /// Packets (here: connect() calls) counted at `hook` for `reason`.
    fn counted(&self, node: &str, hook: &str, reason: &str) -> u64 {
        inspect(&self.pins(node), &["stats"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["hook"] == hook && r["reason"] == reason)
            .map(|r| r["packets"].as_u64().unwrap())
            .sum()
    }

    /// Everything counted at the socket hook of `node`.
    fn at_socket_hook(&self, node: &str) -> u64 {
        inspect(&self.pins(node), &["stats"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["hook"] == "sock/connect4")
            .map(|r| r["packets"].as_u64().unwrap())
            .sum()
    }
}

/// A Python client run in network namespace `netns` (None: the root one),
/// inside `cgroup` (None: this test's own): a TCP connect to `to` (or with
/// `udp_only`, a UDP connect, which sends nothing), then getpeername(),
/// and for TCP one exchange. Prints `PEER ip port`, `REPLY text` or `ERR
/// errno`.
fn client(
    cgroup: Option<&Path>,
    netns: Option<&e2e::Netns>,
    to: SocketAddr,
    udp_only: bool,
) -> String {
    let enter = cgroup.map_or(String::new(), |c| {
        format!("echo $$ > {}/cgroup.procs && ", c.display())
    });
    let netns = netns.map_or(String::new(), |n| format!("ip netns exec {} ", n.name()));
    let py = format!(
        "import socket\n\
         udp = {udp}\n\
         family = socket.AF_INET6 if ':' in '{ip}' else socket.AF_INET\n\
         s = socket.socket(family, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)\n\
         s.settimeout(3)\n\
         try:\n    s.connect(('{ip}', {port}))\n\
         except OSError as e:\n    print('ERR', e.errno); raise SystemExit\n\
         ip, port = s.getpeername()[:2]\n\
         print('PEER', ip, port)\n\
         if not udp:\n    s.sendall(b'hi'); print('REPLY', s.recv(200).decode().split()[0])\n",
        udp = if udp_only { "True" } else { "False" },
        ip = to.ip(),
        port = to.port()
    );
    let script = format!("{enter}exec {netns}python3 -c \"$0\"");
    let out = Command::new("sh")
        .args(["-c", &script, &py])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// 20 connections from node1 (in `cg`) to `to`: each reaches the local
/// or the remote backend (both do) with `to` as its peer, `hook` counts
/// them all, and tc translated none of their packets.
fn served_at_the_socket(f: &Fixture, cg: &Path, to: SocketAddr, hook: &str) {
    let mut pods = BTreeSet::new();
    for _ in 0..20 {
        let out = client(Some(cg), Some(f.cluster.node_ns(0)), to, false);
        let peer = format!("PEER {} {}", to.ip(), to.port());
        assert!(out.contains(&peer), "{out}");
        let pod = out
            .lines()
            .find_map(|l| l.strip_prefix("REPLY "))
            .unwrap_or_else(|| panic!("no reply: {out}"));
        pods.insert(pod.to_string());
    }
    assert_eq!(
        pods,
        ["pod-1-0".to_string(), "pod-2-0".to_string()].into(),
        "local and remote backends"
    );
    assert_eq!(f.counted("node1", hook, "new_flow"), 20);
    assert_eq!(
        f.counted("node1", "tc/egress", "new_flow") + f.counted("node1", "tc/ingress", "new_flow"),
        0,
        "no packet translated by tc"
    );
}

/// A connect from `ns` (in `cg`) to `to` fails with ECONNREFUSED within a
/// second.
fn refused_at_once(cg: &Path, ns: &e2e::Netns, to: SocketAddr) {
    let started = Instant::now();
    let out = client(Some(cg), Some(ns), to, false);
    assert_eq!(out.trim(), "ERR 111", "ECONNREFUSED from {to}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "at once: {:?}",
        started.elapsed()
    );
}

const WEB: &str = "10.96.0.10:80";

#[test]
fn a_node_process_reaches_cluster_ips_through_the_socket_hook() {
    let f = Fixture::new("socklb");
    let (node1, cg1) = (f.cluster.node_ns(0), &f.cgroups[0].0);
    let web: SocketAddr = WEB.parse().unwrap();

    // Spread over the local and the remote backend; the application sees
    // the ClusterIP as its peer; tc translated none of these packets.
    served_at_the_socket(&f, cg1, web, "sock/connect4");
    // No endpoints: refused at once, by the hook.
    refused_at_once(cg1, node1, "10.96.0.11:80".parse().unwrap());
    assert_eq!(f.counted("node1", "sock/connect4", "no_endpoints"), 1);

    // Session affinity needs the client's address: left to tc, which
    // serves it as before.
    let out = client(
        Some(cg1),
        Some(node1),
        "10.96.0.12:80".parse().unwrap(),
        false,
    );
    assert!(out.contains("REPLY pod-1-0"), "{out}");
    assert_eq!(f.counted("node1", "sock/connect4", "sock_left_to_tc"), 1);
    assert_eq!(
        f.counted("node1", "tc/egress", "new_flow_affinity")
            + f.counted("node1", "tc/egress", "new_flow"),
        1
    );

    // A connected UDP socket gets a backend too (connect sends nothing).
    let out = client(
        Some(cg1),
        Some(node1),
        "10.96.0.10:53".parse().unwrap(),
        true,
    );
    assert!(out.contains("PEER 10.96.0.10 53"), "{out}");
    assert_eq!(f.counted("node1", "sock/connect4", "new_flow"), 21);
}

#[test]
fn one_nodes_socket_hook_leaves_other_namespaces_and_processes_alone() {
    let f = Fixture::new("sockscope");
    let (node1, cg1) = (f.cluster.node_ns(0), &f.cgroups[0].0);
    let web: SocketAddr = WEB.parse().unwrap();
    let udp: SocketAddr = "10.96.0.10:53".parse().unwrap();

    // The control: node1's own process in node1's cgroup is served.
    client(Some(cg1), Some(node1), udp, true);
    let served = f.at_socket_hook("node1");
    assert_eq!(served, 1);

    // node1's process outside the cgroup: tc serves it, the hook never ran.
    let out = client(None, Some(node1), web, false);
    assert!(out.contains("REPLY pod-"), "{out}");
    // A pod's process and node2's, both in node1's cgroup: other network
    // namespaces, so node1's hooks leave them (tc serves them).
    let out = client(Some(cg1), Some(f.cluster.pod_ns("pod-1-1")), web, false);
    assert!(out.contains("REPLY pod-"), "{out}");
    let out = client(Some(cg1), Some(f.cluster.node_ns(1)), web, false);
    assert!(out.contains("REPLY pod-"), "{out}");
    // The root namespace's process in node1's cgroup: a UDP connect (no
    // packet leaves) that node1's hooks must not count or translate.
    let out = client(Some(cg1), None, udp, true);
    assert!(out.contains("PEER 10.96.0.10 53"), "{out}");
    assert_eq!(
        f.at_socket_hook("node1"),
        served,
        "node1's hooks ran only for node1"
    );
    assert_eq!(
        f.at_socket_hook("node2"),
        0,
        "node2's hooks are on its own cgroup"
    );
    assert!(
        f.counted("node1", "tc/egress", "new_flow") >= 1,
        "tc served node1's other process"
    );
}

/// connect6: the same over IPv6. A refusal comes at once here, where the
/// ICMPv6 reject at tc takes a second to show (docs/deploy.md).
#[test]
fn an_ipv6_cluster_ip_is_served_through_the_socket_hook_too() {
    let f = Fixture::build("sock6", true);
    let (node1, cg1) = (f.cluster.node_ns(0), &f.cgroups[0].0);
    let web6: SocketAddr = "[fd00:10:96::10]:80".parse().unwrap();
    served_at_the_socket(&f, cg1, web6, "sock/connect6");
    refused_at_once(cg1, node1, "[fd00:10:96::11]:80".parse().unwrap());
    // IPv4 on the same node still goes through connect4.
    let out = client(Some(cg1), Some(node1), WEB.parse().unwrap(), false);
    assert!(out.contains("PEER 10.96.0.10 80"), "{out}");
    assert_eq!(f.counted("node1", "sock/connect4", "new_flow"), 1);
}
