//! `dp agent --manifests` end to end: one agent process per node of a
//! two-node namespace cluster, driven by a manifests directory. Editing a
//! file moves traffic within a second; a pod veth created after start is
//! served.

use std::{
    collections::BTreeSet,
    fs,
    net::SocketAddr,
    path::Path,
    process::Command,
    sync::mpsc::{self, Receiver},
    time::{Duration, Instant},
};

mod support;

use e2e::{parse_identity, require_root, tcp_echo_once, Cluster, Netns, TcpEchoServer};
use support::agents::*;

const WEB: &str = "10.96.0.10:80";

/// The web service with these backends (pod IPs, port 8080), written the
/// way an editor saves: a new file renamed over the old one.
fn write_web(dir: &Path, backends: &[(&str, &str)]) {
    let now = jiff::Timestamp::now();
    let endpoints: String = backends
        .iter()
        .map(|(ip, node)| format!("- {{addresses: [{ip}], nodeName: {node}}}\n"))
        .collect();
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\n\
         spec:\n  clusterIP: 10.96.0.10\n  ports: [{{port: 80}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: web-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\n\
         \x20 annotations: {{endpoints.kubernetes.io/last-change-trigger-time: \"{now}\"}}\n\
         addressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{endpoints}"
    );
    let tmp = dir.join(".web.yaml.tmp");
    fs::write(&tmp, yaml).unwrap();
    fs::rename(&tmp, dir.join("web.yaml")).unwrap();
}

fn whoami(ns: &Netns) -> String {
    try_whoami(ns).unwrap()
}

fn try_whoami(ns: &Netns) -> e2e::Result<String> {
    let web: SocketAddr = WEB.parse().unwrap();
    let (reply, _) = tcp_echo_once(ns, web, b"hi", TIMEOUT)?;
    Ok(parse_identity(&reply).unwrap().0)
}

#[test]
fn the_agent_programs_manifests_follows_edits_and_serves_new_pods() {
    require_root();
    let mut cluster = Cluster::new(&[2, 2]).unwrap();
    let servers = cluster.serve_named_tcp(8080).unwrap();
    let dir = manifests_dir("edits");
    let bpffs = Bpffs::new("edits");
    write_web(&dir, &[("10.244.1.11", "node1"), ("10.244.2.10", "node2")]);
    fs::write(
        dir.join("empty.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: empty, namespace: default}\n\
         spec:\n  clusterIP: 10.96.0.20\n  ports: [{port: 80}]\n",
    )
    .unwrap();
    let agents: Vec<Agent> = cluster
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let pins = bpffs.node(&n.name);
            Agent::start(cluster.node_ns(i), &n.name, &n.ip.to_string(), &dir, &pins)
        })
        .collect();
    for a in &agents {
        a.wait_for(&["synced", "frontends=2"]);
    }

    let client = cluster.pod_ns("pod-1-0");
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        seen.insert(whoami(client));
    }
    assert_eq!(
        seen,
        ["pod-1-1", "pod-2-0"].map(String::from).into(),
        "both backends serve"
    );

    // Metrics and health, as kube-proxy serves them, in node1's namespace.
    let metrics = http_get(cluster.node_ns(0), "127.0.0.1:10249", "/metrics");
    for expected in [
        "HTTP/1.1 200",
        "kubeproxy_sync_proxy_rules_duration_seconds_count 1",
        "kubeproxy_network_programming_duration_seconds_count 1",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds ",
        "dp_frontends 2",
        "dp_backends 2",
        "dp_packets_total{hook=\"tc/ingress\",reason=\"new_flow\"} 40",
        "dp_skipped_objects{kind=\"invalid\"} 0",
        "dp_conntrack_max_entries ",
    ] {
        assert!(
            metrics.contains(expected),
            "{expected:?} missing in\n{metrics}"
        );
    }
    let health = http_get(cluster.node_ns(0), "127.0.0.1:10256", "/healthz");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains("\"nodeEligible\": true"), "{health}");
    let live = http_get(cluster.node_ns(0), "127.0.0.1:10256", "/livez");
    assert!(live.starts_with("HTTP/1.1 200"), "{live}");

    // Inspection from the pinned maps, while the agent runs.
    let pins = bpffs.node("node1");
    let services = inspect(&pins, &["service", "list"]);
    let web = &services.as_array().unwrap()[0];
    assert_eq!(web["frontend"], "10.96.0.10:80/TCP");
    assert_eq!(web["name"], "default/web (ClusterIP)");
    let ready: Vec<&str> = web["ready"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(ready, ["on node1", "on node2"]);
    let flows = inspect(&pins, &["ct", "list", "--service", "default/web"]);
    assert!(
        flows.as_array().unwrap().len() >= 80,
        "two entries per connection"
    );
    assert!(flows
        .as_array()
        .unwrap()
        .iter()
        .all(|f| f["service"] == "default/web (ClusterIP)"));
    let by_ip = inspect(&pins, &["ct", "list", "--ip", "10.244.1.11"]);
    assert!(!by_ip.as_array().unwrap().is_empty());
    let stats = inspect(&pins, &["stats"]);
    assert!(stats
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["reason"] == "new_flow" && r["packets"] == 40));
    let backends = inspect(&pins, &["backend", "list"]);
    assert_eq!(backends.as_array().unwrap().len(), 2);

    // dp status, from node1's namespace (where the agent's health is).
    let out = Command::new("nsenter")
        .arg(format!("--net={}", cluster.node_ns(0).path().display()))
        .args([env!("CARGO_BIN_EXE_dp"), "status", "-o", "json", "--bpffs"])
        .arg(&pins)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["agent_health"], "200");
    let attached = status["attached"].as_array().unwrap();
    let pod_link = format!("{}@tc-ingress", cluster.pod("pod-1-0").host_device);
    for link in ["eth0@xdp", "eth0@tc-ingress", "eth0@tc-egress", &pod_link] {
        assert!(attached.iter().any(|a| a == link), "{link} in {attached:?}");
    }
    let services_map = &status["maps"][0];
    assert_eq!(services_map["name"], "DP_SERVICES");
    assert!(services_map["entries"].as_u64().unwrap() >= 5);

    // dp explain agrees with what real traffic does.
    let explain = |from: &str, to: &str| inspect(&pins, &["explain", "--from", from, "--to", to]);
    let e = explain("10.244.1.10", "10.96.0.10:80");
    assert_verdict(&e, "forward", "new_flow");
    assert_eq!(e["service"], "default/web");
    assert_eq!(
        e["backends"],
        serde_json::json!(["10.244.1.11:8080", "10.244.2.10:8080"])
    );
    assert_eq!(e["masquerade"], false);
    let e = explain("172.18.0.100", "10.96.0.10:80");
    assert_eq!(e["masquerade"], true, "outside the cluster CIDR");
    let refused = |to: &str| {
        let to: SocketAddr = to.parse().unwrap();
        client
            .run(|| std::net::TcpStream::connect_timeout(&to, TIMEOUT))
            .unwrap()
            .expect_err("refused")
            .kind()
    };
    let e = explain("10.244.1.10", "10.96.0.10:81");
    assert_verdict(&e, "reject", "port_not_served");
    assert_eq!(
        refused("10.96.0.10:81"),
        std::io::ErrorKind::ConnectionRefused
    );
    let e = explain("10.244.1.10", "10.96.0.20:80");
    assert_verdict(&e, "reject", "no_endpoints");
    assert_eq!(
        refused("10.96.0.20:80"),
        std::io::ErrorKind::ConnectionRefused
    );
    let e = explain("10.244.1.10", "10.244.2.10:8080/tcp");
    assert_verdict(&e, "pass", "no_service");
    // An established connection is pinned to its backend by conntrack.
    let web: SocketAddr = WEB.parse().unwrap();
    let (mut conn, local) = client
        .run(|| {
            let c = std::net::TcpStream::connect_timeout(&web, TIMEOUT).unwrap();
            let local = c.local_addr().unwrap();
            (c, local)
        })
        .unwrap();
    conn.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut first = [0u8; 128];
    let n = std::io::Read::read(&mut conn, &mut first).unwrap();
    let (serving, _, _) = parse_identity(&first[..n]).unwrap();
    let serving_ip = cluster.pod(&serving).ip;
    let e = explain(&local.to_string(), "10.96.0.10:80");
    assert_verdict(&e, "forward", "established");
    assert_eq!(
        e["backends"],
        serde_json::json!([format!("{serving_ip}:8080")])
    );
    drop(conn);

    // Edit the file: the service now has one backend, pod-2-1.
    let edited = Instant::now();
    write_web(&dir, &[("10.244.2.11", "node2")]);
    let mut in_a_row = 0;
    while in_a_row < 5 {
        assert!(
            edited.elapsed() < Duration::from_secs(1),
            "traffic did not move within a second of the edit"
        );
        // A connection in flight when its backend goes is reset (by design).
        let moved = try_whoami(client).is_ok_and(|name| name == "pod-2-1");
        in_a_row = if moved { in_a_row + 1 } else { 0 };
    }

    // Rewritten in place by a slow writer: the half-written file is not read
    // (the service keeps working), the finished one is.
    let text = fs::read_to_string(dir.join("web.yaml")).unwrap();
    let slow = text
        .replace("10.244.2.11", "10.244.1.11")
        .replace("node2", "node1");
    let (head, tail) = slow.split_at(slow.find("kind: EndpointSlice").unwrap());
    let mut file = fs::File::create(dir.join("web.yaml")).unwrap();
    std::io::Write::write_all(&mut file, head.as_bytes()).unwrap();
    // The writer pausing mid-file is the situation under test, not a wait.
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..5 {
        assert_eq!(
            whoami(client),
            "pod-2-1",
            "service changed by a half-written file"
        );
    }
    std::io::Write::write_all(&mut file, tail.as_bytes()).unwrap();
    drop(file);
    let finished = Instant::now();
    let mut in_a_row = 0;
    while in_a_row < 5 {
        assert!(
            finished.elapsed() < Duration::from_secs(1),
            "the finished in-place edit was not applied within a second"
        );
        let moved = try_whoami(client).is_ok_and(|name| name == "pod-1-1");
        in_a_row = if moved { in_a_row + 1 } else { 0 };
    }
    // Back to pod-2-1 for the rest of the test.
    write_web(&dir, &[("10.244.2.11", "node2")]);
    let restored = Instant::now();
    while try_whoami(client).ok().as_deref() != Some("pod-2-1") {
        assert!(restored.elapsed() < Duration::from_secs(1), "not restored");
    }

    // A pod created after the agent started: its veth gets attached, so its
    // own traffic to the service is served.
    let pod = cluster.add_pod(0).unwrap();
    agents[0].wait_for(&["attached tc to pod device", &pod.host_device]);
    assert_eq!(whoami(cluster.pod_ns(&pod.name)), "pod-2-1");
    let pin = dp::kernel::pin::link_pin(
        &bpffs.node("node1"),
        &pod.host_device,
        common::Hook::TcIngress,
    );
    assert!(pin.exists());
    // The pod goes: its device is forgotten and its link pins removed.
    cluster.remove_pod(&pod.name);
    agents[0].wait_for(&["pod device gone", &pod.host_device]);
    assert!(!pin.exists(), "stale pin {}", pin.display());

    drop(servers);
    for a in agents {
        a.stop();
    }
    // The agents are gone; the pinned maps still answer, with names.
    let services = inspect(&pins, &["service", "list"]);
    assert_eq!(services[0]["ready"][0]["addr"], "10.244.2.11:8080");
    assert_eq!(services[0]["ready"][0]["name"], "on node2");
    let flushed = inspect(&pins, &["ct", "flush", "--service", "default/web"]);
    assert!(flushed["flushed"].as_u64().unwrap() > 0);
    let left = inspect(&pins, &["ct", "list", "--service", "default/web"]);
    assert!(left.as_array().unwrap().is_empty());
}

/// `dp explain`'s verdict and reason.
fn assert_verdict(e: &serde_json::Value, verdict: &str, reason: &str) {
    assert_eq!(
        (e["verdict"].as_str(), e["reason"].as_str()),
        (Some(verdict), Some(reason)),
        "{e}"
    );
}

#[test]
fn a_killed_agent_leaves_traffic_flowing_and_its_successor_adopts_the_state() {
    killed_agent_under_load("restart", &[]);
}

/// The same with the tc programs as netlink filters (the attachment for
/// kernels before 6.6, forced here): the filter stays when the agent is
/// killed, the next agent replaces it in place (one dp filter per hook,
/// with the new program), and `dp cleanup` on the node removes them.
#[test]
fn with_netlink_tc_a_restart_under_load_keeps_traffic_flowing_and_cleanup_removes_the_filters() {
    let cluster = killed_agent_under_load("restart-nl", &["--tc-attach", "netlink"]);
    let node = cluster.node_ns(0);
    let (filters, ids) = dp_filters(node, "ingress");
    assert_eq!(filters, 0, "dp cleanup removed the filters: {ids:?}");
}

/// dp's netlink filters on node eth0 at `direction` (`tc filter show`):
/// how many, and their program ids.
fn dp_filters(node: &Netns, direction: &str) -> (usize, Vec<String>) {
    let text = e2e::stdout_of(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                node.name(),
                "tc",
                "filter",
                "show",
                "dev",
                "eth0",
            ])
            .arg(direction),
    );
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("dp_tc_")).collect();
    for l in &lines {
        assert!(l.contains("pref 1 ") && l.contains("handle 0xd9"), "{text}");
        assert!(l.contains("direct-action"), "{text}");
    }
    let ids = lines
        .iter()
        .filter_map(|l| l.split(" id ").nth(1))
        .map(|rest| {
            rest.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    (lines.len(), ids)
}

/// Two agents, traffic from a pod on node1 over TCP and UDP to a backend on
/// node2, node1's agent killed and started again under that load: no
/// exchange fails. `extra`: more agent flags.
fn killed_agent_under_load(name: &str, extra: &[&str]) -> Cluster {
    require_root();
    let netlink = extra.contains(&"netlink");
    let cluster = Cluster::new(&[1, 1]).unwrap();
    let backend = cluster.pod("pod-2-0").clone();
    let tcp = TcpEchoServer::start(
        cluster.pod_ns(&backend.name),
        SocketAddr::from((backend.ip, 8080)),
    )
    .unwrap();
    let udp = e2e::UdpEchoServer::start(
        cluster.pod_ns(&backend.name),
        SocketAddr::from((backend.ip, 5353)),
    )
    .unwrap();
    let dir = manifests_dir(name);
    let bpffs = Bpffs::new(name);
    write_web(&dir, &[("10.244.2.10", "node2")]);
    fs::write(
        dir.join("dns.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: dns, namespace: default}\n\
         spec:\n  clusterIP: 10.96.0.53\n  ports: [{port: 53, protocol: UDP}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: dns-1\n  namespace: default\n  labels: {kubernetes.io/service-name: dns}\n\
         addressType: IPv4\nports: [{port: 5353, protocol: UDP}]\n\
         endpoints:\n- {addresses: [10.244.2.10], nodeName: node2}\n",
    )
    .unwrap();
    let node1 = &cluster.nodes[0];
    let start = |i: usize| {
        let n = &cluster.nodes[i];
        Agent::start_with_args(
            cluster.node_ns(i),
            &n.name,
            &n.ip.to_string(),
            ("--manifests", &dir),
            &bpffs.node(&n.name),
            extra,
        )
    };
    let agent1 = start(0);
    let agent2 = start(1);
    let mode = if netlink {
        "tc_attach=netlink"
    } else {
        "tc_attach=tcx"
    };
    agent1.wait_for(&["node", mode]);
    agent1.wait_for(&["synced", "frontends=2"]);
    agent2.wait_for(&["synced", "frontends=2"]);
    let node1_ns = cluster.node_ns(0);
    let (before, first_ids) = dp_filters(node1_ns, "ingress");
    assert_eq!(before, usize::from(netlink), "dp filters: {first_ids:?}");

    // One TCP connection and one UDP socket, from the pod on node1, kept
    // busy by a thread that counts request/response exchanges.
    let client = cluster.pod_ns("pod-1-0");
    let web: SocketAddr = WEB.parse().unwrap();
    let dns: SocketAddr = "10.96.0.53:53".parse().unwrap();
    let (mut conn, sock) = client
        .run(|| {
            let c = std::net::TcpStream::connect_timeout(&web, TIMEOUT).unwrap();
            c.set_read_timeout(Some(TIMEOUT)).unwrap();
            let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            s.connect(dns).unwrap();
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
            (c, s)
        })
        .unwrap();
    let (progress_tx, progress) = mpsc::channel::<Result<u64, String>>();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopping = stop.clone();
    let traffic = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut n = 0u64;
        let mut buf = [0u8; 64];
        while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
            let msg = format!("{n:016}");
            let exchange = (|| -> std::io::Result<()> {
                conn.write_all(msg.as_bytes())?;
                conn.read_exact(&mut buf[..16])?;
                if &buf[..16] != msg.as_bytes() {
                    return Err(std::io::Error::other("TCP echo mismatch"));
                }
                sock.send(msg.as_bytes())?;
                let got = sock.recv(&mut buf)?;
                if &buf[..got] != msg.as_bytes() {
                    return Err(std::io::Error::other("UDP echo mismatch"));
                }
                Ok(())
            })();
            if let Err(e) = exchange {
                let _ = progress_tx.send(Err(format!("exchange {n}: {e}")));
                return;
            }
            n += 1;
            let _ = progress_tx.send(Ok(n));
        }
    });
    let wait_exchanges = |count: u64| {
        let target = progress_target(&progress, count);
        assert!(target.is_ok(), "{}", target.unwrap_err());
    };
    wait_exchanges(50);
    agent1.kill();
    // No agent on node1: the pinned programs and maps carry on.
    wait_exchanges(200);
    let agent1 = start(0);
    let adopted = agent1.wait_for(&["adopted pinned state"]);
    assert!(adopted.contains("frontends=2"), "{adopted}");
    let synced = agent1.wait_for(&["synced"]);
    assert!(
        synced.contains("backends_written=0") && synced.contains("backends_removed=0"),
        "ids kept: {synced}"
    );
    if netlink {
        // Replaced in place: still one filter, now with the new program.
        let (after, ids) = dp_filters(node1_ns, "ingress");
        assert_eq!(after, 1, "{ids:?}");
        assert_ne!(ids, first_ids, "the new agent's program");
        assert_eq!(dp_filters(node1_ns, "egress").0, 1);
    }
    wait_exchanges(200);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    traffic.join().unwrap();
    while let Ok(p) = progress.try_recv() {
        assert!(p.is_ok(), "{}", p.unwrap_err());
    }
    agent1.stop();
    agent2.stop();
    // Pins are left in place by a stopping agent; `dp cleanup`, on the
    // node, removes them (and netlink filters).
    let pins = bpffs.node(&node1.name);
    assert!(dp::kernel::pin::link_pin(&pins, "eth0", common::Hook::TcIngress).exists());
    let cleanup = e2e::stdout_of(
        Command::new("ip")
            .args(["netns", "exec", node1_ns.name()])
            .args([env!("CARGO_BIN_EXE_dp"), "cleanup", "--bpffs"])
            .arg(&pins),
    );
    let removed: usize = cleanup
        .lines()
        .find_map(|l| {
            l.strip_prefix("removed ")?
                .split(" pins")
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("{cleanup}"));
    assert!(removed >= 6, "{cleanup}");
    assert_eq!(cleanup.contains("netlink tc filters"), netlink, "{cleanup}");
    drop((tcp, udp));
    cluster
}

/// Waits until the traffic thread reports `count` more exchanges (or an error).
fn progress_target(progress: &Receiver<Result<u64, String>>, count: u64) -> Result<(), String> {
    let mut first = None;
    loop {
        match progress.recv_timeout(TIMEOUT) {
            Ok(Ok(n)) => {
                let start = *first.get_or_insert(n);
                if n - start + 1 >= count {
                    return Ok(());
                }
            }
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(format!("traffic stalled: {e}")),
        }
    }
}

#[test]
fn the_agent_follows_the_kubernetes_api_and_fails_static_when_it_is_down() {
    use e2e::apiserver::FakeApiServer;
    require_root();
    let cluster = Cluster::new(&[2, 1]).unwrap();
    let _servers = cluster.serve_named_tcp(8080).unwrap();
    // The API server is reachable from node1's namespace, where the agent runs.
    let api = FakeApiServer::start_in(cluster.node_ns(0)).unwrap();
    serve_web(&api);
    let dir = manifests_dir("kube");
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let bpffs = Bpffs::new("kube");
    let agent = Agent::start_with(
        cluster.node_ns(0),
        "node1",
        "172.18.0.2",
        ("--kubeconfig", &kubeconfig),
        &bpffs.node("node1"),
    );
    agent.wait_for(&["synced", "frontends=1"]);
    web_follows_the_watch(&cluster, &api, &agent);
    let client = cluster.pod_ns("pod-1-0");

    // The API's ServiceCIDR: traffic to an address in it that no Service
    // has is dropped (kube-proxy nftables mode).
    api.apply(
        serde_json::json!({"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
        "metadata": {"name": "kubernetes"}, "spec": {"cidrs": ["10.96.0.0/16"]}}),
    );
    agent.wait_for(&["unallocated ClusterIPs are dropped", "ServiceCIDR objects"]);
    let e = explain(&bpffs.node("node1"), "10.244.1.10", "10.96.0.99:80");
    assert_verdict(&e, "drop", "unallocated_cluster_ip");
    assert_dropped(client, "10.96.0.99:80".parse().unwrap());

    // The API goes down: what is programmed stays (fail static).
    api.set_down(true);
    for _ in 0..10 {
        assert_eq!(whoami(client), "pod-2-0");
    }
    agent.stop();
}

/// A service flow between two pods of one node is sent straight into the
/// destination pod (`bpf_redirect_peer`, the agent marks pod devices in
/// `DP_DEVICES`): neither the requests nor the replies pass the host-side
/// veth's egress, where dp's egress program would count them as
/// `no_service`. They did before (a redirect to that veth's egress), which
/// cost a program run and a backlog queue per packet.
#[test]
fn service_packets_to_a_pod_on_the_node_go_straight_into_it() {
    require_root();
    let cluster = Cluster::new(&[2]).unwrap();
    let _servers = cluster.serve_named_tcp(8080).unwrap();
    let dir = manifests_dir("peer");
    let bpffs = Bpffs::new("peer");
    write_web(&dir, &[("10.244.1.11", "node1")]);
    let node = cluster.node_ns(0);
    let n = &cluster.nodes[0];
    let agent = Agent::start(node, &n.name, &n.ip.to_string(), &dir, &bpffs.node(&n.name));
    agent.wait_for(&["synced", "frontends=1"]);
    let client = cluster.pod_ns("pod-1-0");
    let count = |hook: &str, reason: &str| -> u64 {
        let metrics = http_get(node, "127.0.0.1:10249", "/metrics");
        let key = format!("dp_packets_total{{hook=\"{hook}\",reason=\"{reason}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .map_or(0, |v| v.trim().parse().unwrap())
    };
    // The first packet each way may wait for its neighbour to be resolved
    // (`bpf_redirect_neigh`, through the veth's egress); the rest may not.
    assert_eq!(whoami(client), "pod-1-1");
    let egress_before = count("tc/egress", "no_service");
    let replies_before = count("tc/ingress", "reply_reverse_nat");
    for _ in 0..20 {
        assert_eq!(whoami(client), "pod-1-1");
    }
    assert_eq!(count("tc/ingress", "new_flow"), 21);
    assert!(count("tc/ingress", "reply_reverse_nat") >= replies_before + 40);
    assert_eq!(
        count("tc/egress", "no_service"),
        egress_before,
        "translated packets passed a pod veth's egress"
    );
    agent.stop();
}

/// kube-proxy still holding the health port (mid-migration): the agent
/// programs the node all the same, and serves /healthz once the port is
/// free.
#[test]
fn a_taken_health_port_is_served_once_free() {
    require_root();
    let cluster = Cluster::new(&[1]).unwrap();
    let dir = manifests_dir("port");
    let bpffs = Bpffs::new("port");
    write_web(&dir, &[("10.244.1.10", "node1")]);
    let node = cluster.node_ns(0);
    let squatter = node
        .run(|| std::net::TcpListener::bind("0.0.0.0:10256"))
        .unwrap()
        .unwrap();
    let n = &cluster.nodes[0];
    let agent = Agent::start(node, &n.name, &n.ip.to_string(), &dir, &bpffs.node(&n.name));
    agent.wait_for(&["cannot listen", "0.0.0.0:10256"]);
    agent.wait_for(&["synced", "frontends=1"]);
    drop(squatter);
    agent.wait_for(&["listening", "0.0.0.0:10256"]);
    let health = http_get(node, "127.0.0.1:10256", "/healthz");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    agent.stop();
}

/// On a kernel older than dp supports the agent stops at once and says
/// what it needs; on one without tcx (Debian 12's 6.1) it attaches with
/// netlink tc filters by itself. The running kernel is replaced by
/// `DP_KERNEL_RELEASE`.
#[test]
fn the_agent_refuses_an_old_kernel_and_uses_netlink_tc_on_one_without_tcx() {
    require_root();
    let dir = manifests_dir("kernel");
    let out = Command::new(env!("CARGO_BIN_EXE_dp"))
        .args(["agent", "--node-name", "node1", "--manifests"])
        .arg(&dir.0)
        .env("DP_KERNEL_RELEASE", "5.4.0-150-generic")
        .env("DP_BPFFS", "/nonexistent/dp-kernel-test")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("Linux 5.4.0-150-generic is too old for dp: it needs Linux 5.10 or newer"),
        "{stderr}"
    );
    assert!(
        !Path::new("/nonexistent/dp-kernel-test").exists(),
        "nothing was set up"
    );

    let cluster = Cluster::new(&[1]).unwrap();
    let bpffs = Bpffs::new("kernel");
    write_web(&dir, &[("10.244.1.10", "node1")]);
    let node = cluster.node_ns(0);
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", node.path().display()))
        .args([env!("CARGO_BIN_EXE_dp"), "agent", "--manifests"])
        .arg(&dir.0)
        .arg("--bpffs")
        .arg(bpffs.node("node1"))
        .args(["--node-name", "node1", "--node-ip", "172.18.0.2"])
        .args(["--devices", "eth0", "--cluster-cidr", "10.244.0.0/16"])
        .env("DP_KERNEL_RELEASE", "6.1.0-28-amd64")
        .env_remove("DP_TC_ATTACH");
    let agent = Agent::spawn(cmd);
    agent.wait_for(&["node", "kernel=6.1.0-28-amd64", "tc_attach=netlink"]);
    agent.wait_for(&["synced", "frontends=1"]);
    let (filters, _) = dp_filters(node, "ingress");
    assert_eq!(filters, 1);
    let client = cluster.pod_ns("pod-1-0");
    let _server = TcpEchoServer::start(client, "10.244.1.10:8080".parse().unwrap()).unwrap();
    let (reply, _) = tcp_echo_once(client, WEB.parse().unwrap(), b"hi", TIMEOUT).unwrap();
    assert_eq!(reply, b"hi", "served through the netlink filters (hairpin)");
    agent.stop();
}

/// Sends `count` TCP SYNs from `src` to `dst`, one every `gap`, on CPU 0
/// (the reply budget is per CPU), through a raw socket of the calling
/// namespace. Returns how long the flood took.
fn syn_flood(src: std::net::Ipv4Addr, dst: SocketAddr, count: u16, gap: Duration) -> Duration {
    let SocketAddr::V4(dst) = dst else {
        panic!("IPv4")
    };
    // SAFETY: plain socket calls on a descriptor owned here; the cpu set
    // is zeroed then filled with CPU 0.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0
        );
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        let started = Instant::now();
        for i in 0..count {
            let mut packet = Vec::new();
            etherparse::PacketBuilder::ipv4(src.octets(), dst.ip().octets(), 64)
                .tcp(20_000 + i, dst.port(), 1, 64_240)
                .syn()
                .write(&mut packet, &[])
                .unwrap();
            let sent = libc::sendto(
                fd,
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&to as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as u32,
            );
            assert_eq!(
                sent,
                packet.len() as isize,
                "{}",
                std::io::Error::last_os_error()
            );
            std::thread::sleep(gap);
        }
        let took = started.elapsed();
        libc::close(fd);
        took
    }
}

/// ICMP port unreachable messages arriving in the calling namespace until
/// none has come for `quiet`, counted by a raw ICMP socket opened by
/// `open` before the flood.
struct IcmpCounter(i32);

impl IcmpCounter {
    fn open() -> IcmpCounter {
        // SAFETY: a plain socket call.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
        assert!(
            fd >= 0,
            "raw ICMP socket: {}",
            std::io::Error::last_os_error()
        );
        IcmpCounter(fd)
    }

    fn port_unreachable(&self, quiet: Duration) -> u64 {
        let mut count = 0;
        let mut buf = [0u8; 256];
        loop {
            let mut pfd = libc::pollfd {
                fd: self.0,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd; a buffer of its length for recv.
            let n = unsafe {
                if libc::poll(&mut pfd, 1, quiet.as_millis() as i32) <= 0 {
                    return count;
                }
                libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), 0)
            };
            // IPv4 header (20 bytes here), then ICMP type 3 code 3.
            if n >= 22 && buf[20] == 3 && buf[21] == 3 {
                count += 1;
            }
        }
    }
}

impl Drop for IcmpCounter {
    fn drop(&mut self) {
        // SAFETY: our descriptor.
        unsafe { libc::close(self.0) };
    }
}

#[test]
fn a_syn_flood_to_a_service_without_endpoints_gets_replies_at_the_configured_rate() {
    require_root();
    let cluster = Cluster::new(&[1]).unwrap();
    let dir = manifests_dir("reply-rate");
    let bpffs = Bpffs::new("reply-rate");
    fs::write(
        dir.join("empty.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: empty, namespace: default}\n\
         spec:\n  clusterIP: 10.96.0.99\n  ports: [{port: 80}]\n",
    )
    .unwrap();
    let node = cluster.node_ns(0);
    let n = &cluster.nodes[0];
    // 100 replies a second per CPU, 20 at once.
    let agent = Agent::start_with_args(
        node,
        &n.name,
        &n.ip.to_string(),
        ("--manifests", &dir),
        &bpffs.node(&n.name),
        &["--reply-rate-limit", "100", "--reply-burst", "20"],
    );
    agent.wait_for(&["synced", "frontends=1"]);
    let pod = cluster.pod("pod-1-0").clone();
    let vip: SocketAddr = "10.96.0.99:80".parse().unwrap();
    const SYNS: u16 = 1_000;
    let (took, received) = cluster
        .pod_ns(&pod.name)
        .run(|| {
            let icmp = IcmpCounter::open();
            let took = syn_flood(pod.ip, vip, SYNS, Duration::from_millis(1));
            (took, icmp.port_unreachable(Duration::from_millis(300)))
        })
        .unwrap();
    let pins = bpffs.node(&n.name);
    let (answered, limited) = (
        packets(&pins, "no_endpoints"),
        packets(&pins, "reject_rate_limited"),
    );
    // Every SYN was decided; the client got exactly the replies counted.
    assert_eq!(answered + limited, u64::from(SYNS));
    assert_eq!(received, answered, "replies sent and received");
    // The burst, then 100 a second, over the flood's duration.
    let expected = 20.0 + 100.0 * took.as_secs_f64();
    eprintln!(
        "{SYNS} SYNs in {:.2} s: {answered} answered (expected {expected:.0}), {limited} dropped",
        took.as_secs_f64()
    );
    assert!(
        (answered as f64) >= expected * 0.8 && (answered as f64) <= expected * 1.1 + 2.0,
        "{answered} replies, expected about {expected:.0}"
    );
    agent.stop();
}

#[test]
fn a_sync_that_did_not_fit_is_retried_without_a_new_event() {
    use aya::maps::{HashMap as BpfHashMap, Map, MapData};
    use common::{ServiceKey, ServiceValue};
    require_root();
    let cluster = Cluster::new(&[2]).unwrap();
    let _servers = cluster.serve_named_tcp(8080).unwrap();
    let dir = manifests_dir("retry");
    let bpffs = Bpffs::new("retry");
    write_web(&dir, &[("10.244.1.11", "node1")]);
    let node = cluster.node_ns(0);
    let n = &cluster.nodes[0];
    let pins = bpffs.node(&n.name);
    // A services map of 8 entries: one frontend with one backend takes 3
    // (master, slot, the address's wildcard entry).
    let agent = Agent::start_with_args(
        node,
        &n.name,
        &n.ip.to_string(),
        ("--manifests", &dir),
        &pins,
        &["--map-size-services", "8"],
    );
    agent.wait_for(&["synced", "frontends=1"]);
    // Something else fills the map (here: the test, through the pin).
    let services = dp::kernel::pin::maps_dir(&pins).join(common::map_names::SERVICES);
    let mut map: BpfHashMap<MapData, ServiceKey, ServiceValue> =
        BpfHashMap::try_from(Map::HashMap(MapData::from_pin(&services).unwrap())).unwrap();
    let mut junk = Vec::new();
    for i in 0..8u8 {
        let key = ServiceKey {
            addr: common::addr::addr16([192, 0, 2, i].into()),
            port: 1,
            protocol: 6,
            ..ServiceKey::default()
        };
        if map.insert(key, ServiceValue::default(), 0).is_err() {
            break;
        }
        junk.push(key);
    }
    assert!(
        !junk.is_empty() && junk.len() < 8,
        "{} junk entries",
        junk.len()
    );
    // A second Service: the kernel refuses its entries.
    fs::write(
        dir.join("web2.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: web2, namespace: default}\n\
         spec:\n  clusterIP: 10.96.0.11\n  ports: [{port: 80}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: web2-1\n  namespace: default\n  labels: {kubernetes.io/service-name: web2}\n\
         addressType: IPv4\nports: [{port: 8080}]\nendpoints:\n- {addresses: [10.244.1.11], nodeName: node1}\n",
    )
    .unwrap();
    agent.wait_for(&["did not fit"]);
    let metrics = http_get(node, "127.0.0.1:10249", "/metrics");
    assert!(
        metrics.contains("dp_sync_errors_total{cause=\"not_programmed\"}"),
        "{metrics}"
    );
    // The room comes back; no manifest changes. The agent tries again by
    // itself and programs web2.
    for key in &junk {
        map.remove(key).unwrap();
    }
    let lines = agent.log_until(&["synced", "frontends=2"]);
    assert!(
        lines.iter().any(|l| l.contains("retrying the sync")),
        "{lines:#?}"
    );
    let web2: SocketAddr = "10.96.0.11:80".parse().unwrap();
    let (reply, _) = tcp_echo_once(cluster.pod_ns("pod-1-0"), web2, b"hi", TIMEOUT).unwrap();
    assert_eq!(parse_identity(&reply).unwrap().0, "pod-1-1");
    agent.stop();
}

/// A UDP Service `dns` (10.96.0.60:53 -> 5353) with these endpoints, as
/// one manifest file renamed into place.
fn write_dns(dir: &Path, endpoints: &[&str]) {
    let endpoints: String = endpoints
        .iter()
        .map(|ip| format!("- {{addresses: [{ip}]}}\n"))
        .collect();
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: dns, namespace: default}}\n\
         spec:\n  clusterIP: 10.96.0.60\n  ports: [{{port: 53, targetPort: 5353, protocol: UDP}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: dns-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: dns}}\n\
         addressType: IPv4\nports: [{{port: 5353, protocol: UDP}}]\nendpoints:\n{endpoints}"
    );
    let tmp = dir.join(".dns.yaml.tmp");
    fs::write(&tmp, yaml).unwrap();
    fs::rename(&tmp, dir.join("dns.yaml")).unwrap();
}

/// Backend id of `addr` (`ip:port/UDP`) in the pinned maps.
fn backend_id(pins: &Path, addr: &str) -> Option<u64> {
    inspect(pins, &["backend", "list"])
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["addr"] == addr)
        .and_then(|b| b["id"].as_u64())
}

#[test]
fn a_restarted_agent_gives_no_new_backend_an_id_conntrack_still_names() {
    require_root();
    // pod-1-0 the client; pod-1-1 (a), pod-1-2 (c), pod-2-0 (b) serve UDP.
    let cluster = Cluster::new(&[3, 1]).unwrap();
    let servers: Vec<e2e::UdpEchoServer> = ["pod-1-1", "pod-1-2", "pod-2-0"]
        .iter()
        .map(|name| {
            let ip = cluster.pod(name).ip;
            e2e::UdpEchoServer::start_named(
                cluster.pod_ns(name),
                (ip, 5353).into(),
                Some(name.to_string()),
            )
            .unwrap()
        })
        .collect();
    let dir = manifests_dir("ids-restart");
    let bpffs = Bpffs::new("ids-restart");
    let node = cluster.node_ns(0);
    let pins = bpffs.node("node1");
    let start = || Agent::start(node, "node1", "172.18.0.2", &dir, &pins);
    let vip: SocketAddr = "10.96.0.60:53".parse().unwrap();
    let client = cluster.pod_ns("pod-1-0");
    // A flow pinned to c: unconnected sockets, so a reply from any address
    // is seen; the first whose flow lands on c is kept.
    write_dns(&dir, &["10.244.1.11", "10.244.1.12"]);
    let agent = start();
    agent.wait_for(&["synced", "frontends=1"]);
    let ask = |sock: &std::net::UdpSocket| -> (String, SocketAddr) {
        sock.send_to(b"hi", vip).unwrap();
        let mut buf = [0u8; 256];
        let (n, from) = sock.recv_from(&mut buf).unwrap();
        (parse_identity(&buf[..n]).unwrap().0, from)
    };
    let flow = client
        .run(|| {
            (0..64)
                .map(|_| {
                    let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                    s.set_read_timeout(Some(TIMEOUT)).unwrap();
                    s
                })
                .find(|s| ask(s).0 == "pod-1-2")
                .expect("a flow to pod-1-2")
        })
        .unwrap();
    let c_id = backend_id(&pins, "10.244.1.12:5353/UDP").unwrap();
    let a_id = backend_id(&pins, "10.244.1.11:5353/UDP").unwrap();
    assert!(c_id > a_id, "c has the highest id: {c_id} vs {a_id}");
    // c leaves (its id freed, above every id in use); the agent stops.
    write_dns(&dir, &["10.244.1.11"]);
    agent.wait_for(&["synced", "backends_removed=1"]);
    agent.stop();
    // b arrives while no agent runs. The next agent must not give b the id
    // the conntrack entry of the flow to c still names.
    write_dns(&dir, &["10.244.1.11", "10.244.2.10"]);
    let agent = start();
    agent.wait_for(&["synced", "frontends=1"]);
    let b_id = backend_id(&pins, "10.244.2.10:5353/UDP").unwrap();
    assert_ne!(b_id, c_id, "b got the id of c, which conntrack still names");
    // The flow of c moves to a backend that is there, and its answer comes
    // from the Service's address.
    let (backend, from) = client.run(|| ask(&flow)).unwrap();
    assert_eq!(from, vip, "answered by {backend}");
    assert!(backend == "pod-1-1" || backend == "pod-2-0", "{backend}");
    agent.stop();
    drop(servers);
}

/// The unacknowledged bytes (`ss` Send-Q) of each established TCP
/// connection on port 8080 in `ns`.
fn send_queues_on_8080(ns: &Netns) -> Vec<u64> {
    let out = ns
        .exec("ss", &["-Htn", "state", "established", "( sport = :8080 )"])
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect()
}

#[test]
fn a_removed_backend_stays_retired_while_conntrack_names_it_and_hears_the_clients_reset() {
    use aya::maps::{HashMap as BpfHashMap, Map, MapData};
    require_root();
    let cluster = Cluster::new(&[2, 1]).unwrap();
    let _servers = cluster.serve_named_tcp(8080).unwrap();
    let dir = manifests_dir("retired");
    let bpffs = Bpffs::new("retired");
    let pins = bpffs.node("node1");
    write_web(&dir, &[("10.244.1.11", "node1"), ("10.244.2.10", "node2")]);
    let agent = Agent::start_with_args(
        cluster.node_ns(0),
        "node1",
        "172.18.0.2",
        ("--manifests", &dir),
        &pins,
        &["--ct-gc-interval", "1"],
    );
    agent.wait_for(&["synced", "frontends=1"]);
    // A connection held open; which backend it has.
    let web: SocketAddr = WEB.parse().unwrap();
    let conn = cluster
        .pod_ns("pod-1-0")
        .run(|| std::net::TcpStream::connect_timeout(&web, TIMEOUT).unwrap())
        .unwrap();
    conn.set_read_timeout(Some(TIMEOUT)).unwrap();
    std::io::Write::write_all(&mut &conn, b"hi").unwrap();
    let mut buf = [0u8; 256];
    let n = std::io::Read::read(&mut &conn, &mut buf).unwrap();
    let backend = parse_identity(&buf[..n]).unwrap().0;
    let (ip, stays) = match backend.as_str() {
        "pod-1-1" => ("10.244.1.11", ("10.244.2.10", "node2")),
        _ => ("10.244.2.10", ("10.244.1.11", "node1")),
    };
    assert_eq!(send_queues_on_8080(cluster.pod_ns(&backend)).len(), 1);
    // The client has acknowledged all it received (the backend has nothing
    // unacknowledged): no delayed ACK of the client's meets the removal,
    // which would get it reset there, leaving the backend half-open.
    let deadline = std::time::Instant::now() + TIMEOUT;
    while send_queues_on_8080(cluster.pod_ns(&backend))
        .iter()
        .sum::<u64>()
        > 0
    {
        assert!(std::time::Instant::now() < deadline, "never acknowledged");
        std::thread::sleep(Duration::from_millis(10));
    }
    let id = backend_id(&pins, &format!("{ip}:8080/TCP")).unwrap() as u32;
    // Its backend leaves the Service.
    write_web(&dir, &[stays]);
    agent.wait_for(&["synced", "backends_removed=1"]);
    let backends_map = dp::kernel::pin::maps_dir(&pins).join(common::map_names::BACKENDS);
    let raw = || -> Option<common::Backend> {
        let map: BpfHashMap<MapData, u32, common::Backend> =
            BpfHashMap::try_from(Map::HashMap(MapData::from_pin(&backends_map).unwrap())).unwrap();
        map.get(&id, 0).ok()
    };
    let metric = |name: &str| -> u64 {
        http_get(cluster.node_ns(0), "127.0.0.1:10249", "/metrics")
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0)
    };
    // Kept, retired, while the connection's entries name it: the collector
    // has walked twice since and left it.
    let runs = metric("dp_conntrack_gc_runs_total");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while metric("dp_conntrack_gc_runs_total") < runs + 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the collector does not run"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let b = raw().expect("kept while conntrack names it");
    assert_ne!(b.flags & common::lb::BACKEND_FLAG_RETIRED, 0);
    assert!(
        backend_id(&pins, &format!("{ip}:8080/TCP")).is_none(),
        "not listed"
    );
    // The client closes with a reset: it reaches the backend, whose end of
    // the connection closes too.
    e2e::rst_on_close(&conn).unwrap();
    drop(conn);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !send_queues_on_8080(cluster.pod_ns(&backend)).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the backend's socket stays open ({backend})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        support::agents::packets(&pins, "backend_gone_closed"),
        1,
        "the reset passed on"
    );
    // Once the closed flow's entries are collected (closing: 10 s), no
    // entry names it: deleted.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while raw().is_some() {
        assert!(std::time::Instant::now() < deadline, "never deleted");
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(metric("dp_backends_retired_deleted_total") >= 1);
    agent.stop();
}
