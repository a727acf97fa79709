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
/// none: no endpoints. sticky: ClientIP affinity over both pods. np:
/// NodePort 30080 over both; nplocal: NodePort 30081, eTP=Local, on
/// pod-2-0 (node2) only. self: 10.96.0.13 on pod-1-0 only (hairpin).
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
- {addresses: [10.244.2.10], nodeName: node2}
---
apiVersion: v1
kind: Service
metadata: {name: np, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.20
  ports: [{port: 80, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: np-1, namespace: default, labels: {kubernetes.io/service-name: np}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.1.10], nodeName: node1}
- {addresses: [10.244.2.10], nodeName: node2}
---
apiVersion: v1
kind: Service
metadata: {name: nplocal, namespace: default}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  clusterIP: 10.96.0.21
  ports: [{port: 80, nodePort: 30081}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: nplocal-1, namespace: default, labels: {kubernetes.io/service-name: nplocal}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.2.10], nodeName: node2}
---
apiVersion: v1
kind: Service
metadata: {name: self, namespace: default}
spec:
  clusterIP: 10.96.0.13
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: self-1, namespace: default, labels: {kubernetes.io/service-name: self}}
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
  ports: [{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web6-1, namespace: default, labels: {kubernetes.io/service-name: web6}}
addressType: IPv6
ports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]
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
    agents: Vec<Agent>,
    cgroups: Vec<TestCgroup>,
    bpffs: Bpffs,
    manifests: ManifestsDir,
    _servers: Vec<e2e::TcpEchoServer>,
    _udp: Vec<e2e::UdpEchoServer>,
    cluster: e2e::Cluster,
}

impl Fixture {
    fn new(test: &str) -> Fixture {
        Self::build(test, false, "host")
    }

    /// With `--socket-lb <mode>`; on a dual-stack cluster (kind's IPv6
    /// addresses), with `MANIFESTS6` too and each agent given its node's
    /// IPv6 address.
    fn build(test: &str, dual: bool, mode: &str) -> Fixture {
        e2e::require_root();
        let cluster = if dual {
            e2e::Cluster::new_dual(&[2, 2]).unwrap()
        } else {
            e2e::Cluster::new(&[2, 2]).unwrap()
        };
        let servers = cluster.serve_named_tcp(8080).unwrap();
        let udp = ["pod-1-0", "pod-2-0"]
            .iter()
            .flat_map(|p| {
                let pod = cluster.pod(p);
                let ips = [
                    Some(std::net::IpAddr::V4(pod.ip)),
                    pod.ip6.map(std::net::IpAddr::V6),
                ];
                ips.into_iter()
                    .flatten()
                    .map(move |ip| (p, ip, pod.name.clone()))
            })
            .map(|(p, ip, name)| {
                e2e::UdpEchoServer::start_named(
                    cluster.pod_ns(p),
                    SocketAddr::new(ip, 5353),
                    Some(name),
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
                let mut args = vec!["--socket-lb", mode, "--cgroup-root", &cg];
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
            agents,
            cgroups,
            bpffs,
            manifests,
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
         if not udp:\n    s.sendall(b'hi'); print('REPLY', *s.recv(200).decode().split()[:2])\n",
        udp = if udp_only { "True" } else { "False" },
        ip = to.ip(),
        port = to.port()
    );
    run_python(cgroup, netns, &py)
}

/// Runs the Python program `py` in network namespace `netns` (None: the
/// root one), inside `cgroup` (None: this test's own); its stdout.
fn run_python(cgroup: Option<&Path>, netns: Option<&e2e::Netns>, py: &str) -> String {
    let enter = cgroup.map_or(String::new(), |c| {
        format!("echo $$ > {}/cgroup.procs && ", c.display())
    });
    let netns = netns.map_or(String::new(), |n| format!("ip netns exec {} ", n.name()));
    let script = format!("{enter}exec {netns}python3 -c \"$0\"");
    let out = Command::new("sh")
        .args(["-c", &script, py])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// 20 connections from `ns` (on node1, in `cg`) to `to`: each reaches
/// the local or the remote backend (both do) with `to` as its peer, `hook`
/// counts them all, and tc translated none of their packets.
fn served_at_the_socket(f: &Fixture, cg: &Path, ns: &e2e::Netns, to: SocketAddr, hook: &str) {
    let new_flows = |hook| f.counted("node1", hook, "new_flow");
    let (before, tc_before) = (
        new_flows(hook),
        new_flows("tc/egress") + new_flows("tc/ingress"),
    );
    let mut pods = BTreeSet::new();
    for _ in 0..20 {
        let out = client(Some(cg), Some(ns), to, false);
        let peer = format!("PEER {} {}", to.ip(), to.port());
        assert!(out.contains(&peer), "{out}");
        pods.insert(reply_from(&out).0);
    }
    assert_eq!(
        pods,
        ["pod-1-0".to_string(), "pod-2-0".to_string()].into(),
        "local and remote backends"
    );
    assert_eq!(new_flows(hook) - before, 20);
    assert_eq!(
        new_flows("tc/egress") + new_flows("tc/ingress"),
        tc_before,
        "no packet translated by tc"
    );
}

/// The backend that answered a `client` and the peer it saw.
fn reply_from(out: &str) -> (String, SocketAddr) {
    let reply = out
        .lines()
        .find_map(|l| l.strip_prefix("REPLY "))
        .unwrap_or_else(|| panic!("no reply: {out}"));
    let (pod, peer) = reply.split_once(' ').unwrap();
    (pod.to_string(), peer.parse().unwrap())
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
    served_at_the_socket(&f, cg1, node1, web, "sock/connect4");
    // No endpoints: refused at once, by the hook.
    refused_at_once(cg1, node1, "10.96.0.11:80".parse().unwrap());
    assert_eq!(f.counted("node1", "sock/connect4", "no_endpoints"), 1);

    // `dp trace` shows a socket decision like a packet's: the hook, the
    // process, the Service and the backend; a refusal with its reason.
    let trace = TraceProcess::start(node1, &f.pins("node1"), &["--service", "default/web"]);
    let out = client(Some(cg1), Some(node1), web, false);
    let (pod, _) = reply_from(&out);
    let line = trace
        .next_line(Duration::from_secs(5))
        .expect("dp trace shows the connect");
    assert!(
        line.contains("sock/connect4 pid ")
            && line.contains("(python3) -> default/web:http (10.96.0.10:80) TCP FORWARDED")
            && line.contains(&format!("=> {}:8080", f.cluster.pod(&pod).ip)),
        "{line}"
    );
    drop(trace);
    // The refusal was kept (`--since`), with the process that was refused.
    let mut later = TraceProcess::start(
        node1,
        &f.pins("node1"),
        &[
            "-o",
            "json",
            "--since",
            "1m",
            "--reason",
            "no_endpoints",
            "--count",
            "1",
        ],
    );
    let kept: serde_json::Value = serde_json::from_str(
        &later
            .next_line(Duration::from_secs(5))
            .expect("the kept refusal"),
    )
    .unwrap();
    assert_eq!(kept["hook"], "sock/connect4", "{kept}");
    assert_eq!(kept["verdict"], "rejected", "{kept}");
    assert_eq!(kept["process"]["command"], "python3", "{kept}");
    assert_eq!(kept["service"]["name"], "default/none", "{kept}");
    assert!(later.interrupt().success());

    // Session affinity: the node's address is the client, so every
    // connection from the node goes to the backend the first one got.
    let sticky: SocketAddr = "10.96.0.12:80".parse().unwrap();
    let first = reply_from(&client(Some(cg1), Some(node1), sticky, false)).0;
    for _ in 0..9 {
        let out = client(Some(cg1), Some(node1), sticky, false);
        assert_eq!(reply_from(&out).0, first, "{out}");
    }
    // 20 + the traced one + 10.
    assert_eq!(f.counted("node1", "sock/connect4", "new_flow"), 31);
    assert_eq!(f.counted("node1", "sock/connect4", "sock_left_to_tc"), 0);
    assert_eq!(f.counted("node1", "tc/egress", "new_flow_affinity"), 0);

    // A connected UDP socket gets a backend too (connect sends nothing).
    let out = client(
        Some(cg1),
        Some(node1),
        "10.96.0.10:53".parse().unwrap(),
        true,
    );
    assert!(out.contains("PEER 10.96.0.10 53"), "{out}");
    assert_eq!(f.counted("node1", "sock/connect4", "new_flow"), 32);

    // The same UDP socket connected again, to a pod address: its peer is
    // that address now, not the Service (the record is forgotten, so the
    // agent's sweep of sockets on removed backends leaves it alone too).
    let pod = f.cluster.pod("pod-2-0").ip;
    let out = run_python(
        Some(cg1),
        Some(node1),
        &format!(
            "import socket\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.connect(('10.96.0.10', 53)); print('FIRST', *s.getpeername())\n\
             s.connect(('{pod}', 5353)); print('THEN', *s.getpeername())\n"
        ),
    );
    assert!(out.contains("FIRST 10.96.0.10 53"), "{out}");
    assert!(out.contains(&format!("THEN {pod} 5353")), "{out}");
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
    let f = Fixture::build("sock6", true, "host");
    let (node1, cg1) = (f.cluster.node_ns(0), &f.cgroups[0].0);
    let web6: SocketAddr = "[fd00:10:96::10]:80".parse().unwrap();
    served_at_the_socket(&f, cg1, node1, web6, "sock/connect6");
    refused_at_once(cg1, node1, "[fd00:10:96::11]:80".parse().unwrap());
    // Unconnected UDP over IPv6: sendmsg6 picks a backend and keeps it,
    // recvmsg6 shows the service as the sender.
    let mut udp = UdpClient::start(cg1, node1, "[fd00:10:96::10]:53".parse().unwrap(), false);
    let first = udp_reply_from(&udp.cmd("send"), "fd00:10:96::10");
    for _ in 0..3 {
        assert_eq!(udp_reply_from(&udp.cmd("send"), "fd00:10:96::10"), first);
    }
    assert_eq!(f.counted("node1", "sock/sendmsg6", "new_flow"), 1);
    assert_eq!(f.counted("node1", "sock/sendmsg6", "established"), 3);
    // IPv4 on the same node still goes through connect4.
    let out = client(Some(cg1), Some(node1), WEB.parse().unwrap(), false);
    assert!(out.contains("PEER 10.96.0.10 80"), "{out}");
    assert_eq!(f.counted("node1", "sock/connect4", "new_flow"), 1);
}

/// `dp explain --from <from> --to <to>`, run in node1's namespace (where
/// it tells the node's own addresses).
fn explain_on_node1(f: &Fixture, from: &str, to: &str) -> serde_json::Value {
    let out = e2e::stdout_of(
        Command::new("ip")
            .args(["netns", "exec", f.cluster.node_ns(0).name()])
            .arg(env!("CARGO_BIN_EXE_dp"))
            .args(["explain", "--from", from, "--to", to, "--bpffs"])
            .arg(f.pins("node1"))
            .args(["-o", "json"]),
    );
    serde_json::from_str(&out).unwrap()
}

/// A sysctl of `ns`.
fn sysctl(ns: &e2e::Netns, key: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name(), "sysctl", "-n", key])
        .output()
        .unwrap();
    assert!(out.status.success(), "sysctl {key}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// NodePorts from the node itself, at the socket: on 127.0.0.1 (as
/// kube-proxy's iptables mode serves them) and on the node's address
/// (a packet to which tc never sees: it goes over loopback), spread over
/// the local and the remote backend; eTP=Local serves the node's own
/// traffic from every endpoint in the cluster (kube-proxy's rule for
/// local traffic). All on kind's sysctls: `accept_local` stays off.
#[test]
fn node_ports_from_the_node_are_served_at_the_socket() {
    let f = Fixture::new("socknp");
    let (node1, cg1) = (f.cluster.node_ns(0), &f.cgroups[0].0);
    for key in [
        "net.ipv4.conf.all.accept_local",
        "net.ipv4.conf.eth0.accept_local",
    ] {
        assert_eq!(sysctl(node1, key), "0", "{key} as on a kind node");
    }
    let node_ip = f.cluster.nodes[0].ip;
    served_at_the_socket(
        &f,
        cg1,
        node1,
        "127.0.0.1:30080".parse().unwrap(),
        "sock/connect4",
    );
    served_at_the_socket(
        &f,
        cg1,
        node1,
        SocketAddr::from((node_ip, 30080)),
        "sock/connect4",
    );
    // eTP=Local, its only endpoint on node2: the node's own connection
    // still gets it.
    for to in [
        "127.0.0.1:30081".parse().unwrap(),
        SocketAddr::from((node_ip, 30081)),
    ] {
        let out = client(Some(cg1), Some(node1), to, false);
        assert_eq!(reply_from(&out).0, "pod-2-0", "{out}");
    }
    // `dp explain` says which path each source takes: the node's own
    // address at the socket, a pod's (with `host`) at tc.
    let node = node_ip.to_string();
    let e = explain_on_node1(&f, &node, "127.0.0.1:30080");
    assert_eq!(
        (e["verdict"].as_str(), e["path"].as_str()),
        (Some("forward"), Some("socket")),
        "{e}"
    );
    let e = explain_on_node1(&f, &node, WEB);
    assert_eq!(e["path"], "socket", "{e}");
    let pod = f.cluster.pod("pod-1-1").ip.to_string();
    let e = explain_on_node1(&f, &pod, WEB);
    assert_eq!(e["path"], "tc", "{e}");

    // Without the hook (a process outside the cgroup) nothing listens on
    // 127.0.0.1:30080: the hook is what serves it.
    let out = client(None, Some(node1), "127.0.0.1:30080".parse().unwrap(), false);
    assert_eq!(out.trim(), "ERR 111", "{out}");
}

/// A UDP client in a node's namespace and cgroup, driven line by line:
/// each `send` sends one datagram to the service and prints `FROM ip port
/// REPLY pod` (or `ERR errno`; a connected socket then connects again);
/// `new` does the same on a new socket.
struct UdpClient {
    child: std::process::Child,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl UdpClient {
    fn start(cg: &Path, ns: &e2e::Netns, to: SocketAddr, connected: bool) -> UdpClient {
        let py = format!(
            "import socket, sys\n\
             to = ('{ip}', {port})\n\
             family = socket.AF_INET6 if ':' in to[0] else socket.AF_INET\n\
             def fresh():\n    s = socket.socket(family, socket.SOCK_DGRAM)\n    s.settimeout(2)\n    \
                 {connect}\n    return s\n\
             s = fresh()\n\
             for line in sys.stdin:\n    \
                 if line.strip() == 'new':\n        s = fresh()\n    \
                 try:\n        \
                     s.send(b'hi') if {connected} else s.sendto(b'hi', to)\n        \
                     data, frm = s.recvfrom(200)\n        \
                     print('FROM', frm[0], frm[1], 'REPLY', data.decode().split()[0], flush=True)\n    \
                 except OSError as e:\n        print('ERR', e.errno, flush=True)\n        s = fresh()\n",
            ip = to.ip(),
            port = to.port(),
            connect = if connected { "s.connect(to)" } else { "pass" },
            connected = if connected { "True" } else { "False" },
        );
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec ip netns exec {} python3 -c \"$0\"",
            cg.display(),
            ns.name()
        );
        let mut child = Command::new("sh")
            .args(["-c", &script, &py])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        use std::io::BufRead;
        UdpClient {
            child,
            lines: std::io::BufReader::new(stdout).lines(),
        }
    }

    fn cmd(&mut self, what: &str) -> String {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{what}").unwrap();
        stdin.flush().unwrap();
        self.lines.next().expect("the client answers").unwrap()
    }
}

impl Drop for UdpClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pod that answered a `UdpClient` round, checking that the reply
/// came from the service address `10.96.0.10:53`.
fn udp_reply(line: &str) -> String {
    udp_reply_from(line, "10.96.0.10")
}

fn udp_reply_from(line: &str, service: &str) -> String {
    let rest = line
        .strip_prefix(&format!("FROM {service} 53 REPLY "))
        .unwrap_or_else(|| panic!("a reply from the service address: {line}"));
    rest.to_string()
}

/// UDP at the socket: an unconnected socket's datagrams to a ClusterIP
/// (sendmsg4) keep one backend, their replies come from the service
/// address (recvmsg4); when that backend is removed the next datagram
/// goes to another, and a connected socket pointed at it is destroyed
/// (it fails once, connects again and gets a live backend) rather than
/// sending into the void.
#[test]
fn udp_sockets_move_off_a_removed_backend() {
    let f = Fixture::new("sockudp");
    let (node1, cg1) = (f.cluster.node_ns(0), &f.cgroups[0].0);
    let dns: SocketAddr = "10.96.0.10:53".parse().unwrap();
    let mut connected = UdpClient::start(cg1, node1, dns, true);
    let gone = udp_reply(&connected.cmd("send"));
    // An unconnected socket whose backend is the same one.
    let mut unconnected = UdpClient::start(cg1, node1, dns, false);
    let mut picked = udp_reply(&unconnected.cmd("new"));
    for _ in 0..30 {
        if picked == gone {
            break;
        }
        picked = udp_reply(&unconnected.cmd("new"));
    }
    assert_eq!(picked, gone, "30 new sockets never picked {gone}");
    for _ in 0..5 {
        assert_eq!(
            udp_reply(&unconnected.cmd("send")),
            gone,
            "one backend per socket"
        );
    }
    assert!(f.counted("node1", "sock/sendmsg4", "established") >= 5);

    let gone_ip = f.cluster.pod(&gone).ip;
    let line = format!("- {{addresses: [{gone_ip}], nodeName: node");
    let at = MANIFESTS.find(&line).unwrap();
    let end = at + MANIFESTS[at..].find('\n').unwrap() + 1;
    let without = format!("{}{}", &MANIFESTS[..at], &MANIFESTS[end..]);
    let tmp = f.manifests.join(".services.yaml.tmp");
    std::fs::write(&tmp, without).unwrap();
    std::fs::rename(&tmp, f.manifests.join("services.yaml")).unwrap();
    f.agents[0].wait_for(&["destroyed sockets whose backend is gone", "sockets=1"]);
    f.agents[0].wait_for(&["synced"]);

    let other = udp_reply(&unconnected.cmd("send"));
    assert_ne!(other, gone, "the unconnected socket moved off");
    assert!(
        connected.cmd("send").starts_with("ERR "),
        "the destroyed socket fails once"
    );
    assert_eq!(
        udp_reply(&connected.cmd("send")),
        other,
        "connected again, to a live backend"
    );
}

/// `--socket-lb all`: a pod's connections are served at the socket too;
/// a pod's connection to a service whose backend is itself (hairpin) and
/// one kube-proxy masquerades (a NodePort with eTP=Cluster) are left to
/// tc, which masquerades them.
#[test]
fn with_all_pods_are_served_at_the_socket_and_hairpin_stays_masqueraded() {
    let f = Fixture::build("sockall", false, "all");
    let cg1 = &f.cgroups[0].0;
    let pod = f.cluster.pod_ns("pod-1-1");
    served_at_the_socket(&f, cg1, pod, WEB.parse().unwrap(), "sock/connect4");

    let pod_ip = f.cluster.pod("pod-1-1").ip.to_string();
    let e = explain_on_node1(&f, &pod_ip, WEB);
    assert_eq!(e["path"], "socket", "with all, pods too: {e}");

    let node_ip = f.cluster.nodes[0].ip;
    let out = client(
        Some(cg1),
        Some(f.cluster.pod_ns("pod-1-0")),
        "10.96.0.13:80".parse().unwrap(),
        false,
    );
    let (backend, seen) = reply_from(&out);
    assert_eq!(backend, "pod-1-0");
    assert_eq!(
        seen.ip(),
        std::net::IpAddr::V4(node_ip),
        "hairpin masqueraded: {out}"
    );
    assert_eq!(f.counted("node1", "sock/connect4", "sock_left_to_tc"), 1);

    let out = client(
        Some(cg1),
        Some(pod),
        SocketAddr::from((node_ip, 30080)),
        false,
    );
    let (_, seen) = reply_from(&out);
    assert_eq!(
        seen.ip(),
        std::net::IpAddr::V4(node_ip),
        "NodePort masqueraded: {out}"
    );
    assert_eq!(f.counted("node1", "sock/connect4", "sock_left_to_tc"), 2);
}

/// The id of node `i`'s agent's map `name` (the socket maps are not
/// pinned: the one among the agent's open map fds), for bpftool.
fn agent_map_id(f: &Fixture, i: usize, name: &str) -> String {
    let pid = f.agents[i].child.id();
    std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("map_id:"))
                .map(|id| id.trim().to_string())
        })
        .find(|id| {
            let out = Command::new("bpftool")
                .args(["-j", "map", "show", "id", id])
                .output()
                .expect("run bpftool");
            serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .is_ok_and(|m| m["name"] == name)
        })
        .unwrap_or_else(|| panic!("the agent's {name}"))
}

/// The entries of node `i`'s agent's map `name` whose key starts with
/// socket `cookie` (`DP_SOCK_PEERS` is keyed by it, `DP_SOCK_REVNAT` by
/// it and a backend).
fn entries_of_socket(f: &Fixture, i: usize, name: &str, cookie: u64) -> usize {
    let id = agent_map_id(f, i, name);
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "id", &id])
        .output()
        .expect("run bpftool");
    assert!(out.status.success(), "bpftool map dump {name}");
    let entries: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool's JSON");
    entries
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            let key: Vec<u8> = e["key"]
                .as_array()
                .expect("the key's bytes")
                .iter()
                .map(|b| {
                    u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
                })
                .collect();
            key[..8] == cookie.to_le_bytes()
        })
        .count()
}

/// A translated socket's records live as long as the socket: the
/// release hook removes its service peer (getpeername's answer, the
/// sweep's key) and, for connected UDP, its reverse entry (recvmsg's) at
/// close(). Without it these LRU maps fill with closed sockets' entries,
/// and every connect() pays for an eviction (1.6 µs instead of 0.6 µs per
/// connect4 here; BENCHMARKS.md).
#[test]
fn a_closed_sockets_records_go_with_it() {
    let f = Fixture::new("sockrel");
    let (node1, cg1) = (f.cluster.node_ns(0), &f.cgroups[0].0);
    // Killed on the way out, also when an assertion fails: the test
    // cgroup goes only once its processes have.
    struct Client(std::process::Child);
    impl Drop for Client {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    for (kind, port, revnat) in [("SOCK_STREAM", 80, 0), ("SOCK_DGRAM", 53, 1)] {
        let py = format!(
            "import socket, sys\n\
             s = socket.socket(socket.AF_INET, socket.{kind})\n\
             s.settimeout(2)\n\
             s.connect(('10.96.0.10', {port}))\n\
             print(int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 57, 8), 'little'), s.getpeername()[0], flush=True)\n\
             sys.stdin.readline()\n\
             s.close()\n\
             print('closed', flush=True)\n\
             sys.stdin.readline()\n"
        );
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec ip netns exec {} python3 -c \"$0\"",
            cg1.display(),
            node1.name()
        );
        let mut client = Client(
            Command::new("sh")
                .args(["-c", &script, &py])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let child = &mut client.0;
        use std::io::{BufRead, Write};
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().expect("the client connects").unwrap();
        let (cookie, peer) = first.split_once(' ').expect("cookie and peer");
        let cookie: u64 = cookie.parse().unwrap();
        // Translated at the socket: the application sees the ClusterIP.
        assert_eq!(peer, "10.96.0.10", "{kind}");
        assert_eq!(
            entries_of_socket(&f, 0, "DP_SOCK_PEERS", cookie),
            1,
            "{kind}"
        );
        assert_eq!(
            entries_of_socket(&f, 0, "DP_SOCK_REVNAT", cookie),
            revnat,
            "{kind}"
        );
        let stdin = child.stdin.as_mut().unwrap();
        writeln!(stdin).unwrap();
        stdin.flush().unwrap();
        assert_eq!(lines.next().expect("the client closes").unwrap(), "closed");
        assert_eq!(
            entries_of_socket(&f, 0, "DP_SOCK_PEERS", cookie),
            0,
            "{kind}: closed"
        );
        assert_eq!(
            entries_of_socket(&f, 0, "DP_SOCK_REVNAT", cookie),
            0,
            "{kind}: closed"
        );
    }
}
