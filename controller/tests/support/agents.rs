//! Running `dp agent` processes in the namespaces of a test cluster, with
//! a private bpffs and a manifests directory, and talking to them.

use std::{
    fs,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc::{self, Receiver},
    time::{Duration, Instant},
};

use e2e::Netns;

/// How long a test waits for an agent's log line: a deadline, not a
/// pause. An agent syncs about 1.3 s after it starts here; with four
/// starting at once on a busy two-CPU machine the verifier alone took
/// over 5 s (a CI run's `dual_stack` tests, 2026-11-30).
pub const TIMEOUT: Duration = Duration::from_secs(15);

/// A `dp agent` running in a node's namespace; killed when dropped.
pub struct Agent {
    pub child: Child,
    pub log: Receiver<String>,
}

impl Agent {
    /// Runs `dp agent` in `ns`'s network namespace only (`nsenter --net`,
    /// unlike `ip netns exec`, keeps the mounts: the bpffs stays visible).
    pub fn start(ns: &Netns, node: &str, node_ip: &str, manifests: &Path, bpffs: &Path) -> Agent {
        Self::start_with(ns, node, node_ip, ("--manifests", manifests), bpffs)
    }

    /// With a source flag: `("--manifests", dir)` or `("--kubeconfig", file)`.
    pub fn start_with(
        ns: &Netns,
        node: &str,
        node_ip: &str,
        source: (&str, &Path),
        bpffs: &Path,
    ) -> Agent {
        Self::start_with_args(ns, node, node_ip, source, bpffs, &[])
    }

    /// And more flags.
    pub fn start_with_args(
        ns: &Netns,
        node: &str,
        node_ip: &str,
        source: (&str, &Path),
        bpffs: &Path,
        extra: &[&str],
    ) -> Agent {
        Self::start_bin(
            env!("CARGO_BIN_EXE_dp"),
            ns,
            node,
            node_ip,
            source,
            bpffs,
            extra,
        )
    }

    /// `start_with_args` with another dp binary (an upgrade's).
    pub fn start_bin(
        bin: &str,
        ns: &Netns,
        node: &str,
        node_ip: &str,
        source: (&str, &Path),
        bpffs: &Path,
        extra: &[&str],
    ) -> Agent {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", ns.path().display()))
            .args([bin, "agent"])
            .arg(source.0)
            .arg(source.1)
            .arg("--bpffs")
            .arg(bpffs)
            .args(["--node-name", node, "--node-ip", node_ip])
            .args(["--devices", "eth0"])
            .args(["--cluster-cidr", "10.244.0.0/16"])
            .args(extra);
        Self::spawn(cmd)
    }

    /// Runs an agent command line of the caller's making; its stderr is
    /// the log.
    pub fn spawn(mut cmd: Command) -> Agent {
        cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
        Self::spawn_as_is(cmd)
    }

    /// The same with the caller's environment for the agent.
    pub fn spawn_as_is(mut cmd: Command) -> Agent {
        let mut child = cmd
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start dp agent");
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[agent] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Agent { child, log }
    }

    /// Waits for a log line containing every one of `needles`.
    pub fn wait_for(&self, needles: &[&str]) -> String {
        self.log_until(needles).pop().unwrap()
    }

    /// The log lines up to and including the first that contains every one
    /// of `needles`.
    pub fn log_until(&self, needles: &[&str]) -> Vec<String> {
        let deadline = Instant::now() + TIMEOUT;
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) => {
                    let found = needles.iter().all(|n| line.contains(n));
                    lines.push(line);
                    if found {
                        return lines;
                    }
                }
                Err(e) => panic!("agent never logged {needles:?}: {e}"),
            }
        }
    }

    pub fn stop(mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "agent exited with {status}");
    }

    /// SIGKILL: no chance to clean up anything.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

/// A private bpffs for the test's agents (one subdirectory per node),
/// unpinned, unmounted and removed when dropped.
pub struct Bpffs {
    pub root: PathBuf,
}

impl Bpffs {
    pub fn new(test: &str) -> Bpffs {
        let root =
            std::env::temp_dir().join(format!("dp-bpffs-test-{}-{test}", std::process::id()));
        dp::kernel::pin::ensure_bpffs(&root).expect("mount a bpffs");
        assert!(dp::kernel::pin::is_bpffs(&root));
        Bpffs { root }
    }

    pub fn node(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        if let Ok(entries) = fs::read_dir(&self.root) {
            for e in entries.flatten() {
                let _ = dp::kernel::pin::cleanup(&e.path());
                let _ = fs::remove_dir(e.path());
            }
        }
        dp::kernel::pin::unmount_bpffs(&self.root);
        let _ = fs::remove_dir(&self.root);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A manifests directory for one test, removed when dropped (also when the
/// test panics).
pub struct ManifestsDir(pub PathBuf);

impl std::ops::Deref for ManifestsDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for ManifestsDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub fn manifests_dir(test: &str) -> ManifestsDir {
    let dir = std::env::temp_dir().join(format!("dp-agent-test-{}-{test}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    ManifestsDir(dir)
}

/// Runs `dp <args> --bpffs <pins> -o json` and parses its output.
pub fn inspect(pins: &Path, args: &[&str]) -> serde_json::Value {
    let out = e2e::stdout_of(
        Command::new(env!("CARGO_BIN_EXE_dp"))
            .args(args)
            .arg("--bpffs")
            .arg(pins)
            .args(["-o", "json"]),
    );
    serde_json::from_str(&out).unwrap()
}

/// A plain HTTP GET from inside `ns`; the whole response.
pub fn http_get(ns: &Netns, addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let addr: SocketAddr = addr.parse().unwrap();
    ns.run(|| {
        let mut conn = std::net::TcpStream::connect_timeout(&addr, TIMEOUT).unwrap();
        conn.set_read_timeout(Some(TIMEOUT)).unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        conn.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        conn.read_to_string(&mut response).unwrap();
        response
    })
    .unwrap()
}

/// A timeout long enough for a working path, short enough for dropped ones.
pub const DROPPED_AFTER: Duration = Duration::from_secs(1);

/// A two-node namespace cluster (pods pod-1-0 10.244.1.10, pod-1-1
/// 10.244.1.11 on node1 172.18.0.2; pod-2-0 10.244.2.10, pod-2-1
/// 10.244.2.11 on node2 172.18.0.3; all serve TCP 8080), the client
/// 172.18.0.100 with 198.51.100.0/24 and 203.0.113.0/24 routed to node1 (as
/// a router or a cloud load balancer would), and one `dp agent --manifests`
/// per node, programmed and ready.
pub struct AgentCluster {
    pub cluster: e2e::Cluster,
    _servers: Vec<e2e::TcpEchoServer>,
    /// Kept alive for the test (killed when dropped).
    _agents: Vec<Agent>,
    pub bpffs: Bpffs,
    _manifests: ManifestsDir,
    /// Each node's agent log up to its first sync.
    pub startup_logs: Vec<Vec<String>>,
}

impl AgentCluster {
    /// `manifests`: YAML documents, written as one file.
    pub fn new(manifests: &[&str], test: &str) -> Self {
        Self::new_with(manifests, test, &[])
    }

    /// With more `dp agent` flags for every agent.
    pub fn new_with(manifests: &[&str], test: &str, agent_args: &[&str]) -> Self {
        e2e::require_root();
        Self::start(
            e2e::Cluster::new(&[2, 2]).unwrap(),
            manifests,
            test,
            agent_args,
        )
    }

    /// The same over a dual-stack cluster (`e2e::Cluster::new_dual`): each
    /// agent gets its node's IPv6 address and the IPv6 cluster CIDR too.
    pub fn new_dual(manifests: &[&str], test: &str) -> Self {
        e2e::require_root();
        let cluster = e2e::Cluster::new_dual(&[2, 2]).unwrap();
        let cidr6 = format!(
            "{}/{}",
            e2e::cluster::CLUSTER_CIDR6.0,
            e2e::cluster::CLUSTER_CIDR6.1
        );
        Self::start(cluster, manifests, test, &["--cluster-cidr", &cidr6])
    }

    fn start(cluster: e2e::Cluster, manifests: &[&str], test: &str, agent_args: &[&str]) -> Self {
        let servers = cluster.serve_named_tcp(8080).unwrap();
        let client = cluster.client_ns();
        for net in ["198.51.100.0/24", "203.0.113.0/24"] {
            client.add_route(net, "172.18.0.2").unwrap();
        }
        // IPv6 external and LoadBalancer IPs (documentation prefix) through
        // node1 too.
        if let Some(node1) = cluster.nodes[0].ip6 {
            let via = node1.to_string();
            client
                .ip(&["-6", "route", "add", "2001:db8::/32", "via", &via])
                .unwrap();
        }
        let yaml = manifests.join("\n---\n");
        let manifests = manifests_dir(test);
        fs::write(manifests.join("services.yaml"), yaml).unwrap();
        let bpffs = Bpffs::new(test);
        let agents: Vec<Agent> = cluster
            .nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                let ip6 = node.ip6.map(|ip| ip.to_string());
                let mut args = agent_args.to_vec();
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
            .collect();
        let startup_logs = agents.iter().map(|a| a.log_until(&["synced"])).collect();
        AgentCluster {
            cluster,
            _servers: servers,
            _agents: agents,
            bpffs,
            _manifests: manifests,
            startup_logs,
        }
    }

    pub fn pins(&self, node: &str) -> PathBuf {
        self.bpffs.node(node)
    }

    /// Packets counted for `reason` on `node`, over every hook.
    pub fn packets(&self, node: &str, reason: &str) -> u64 {
        packets(&self.pins(node), reason)
    }
}

/// Packets the datapath pinned at `pins` counted for `reason`, over every
/// hook (`dp stats`).
pub fn packets(pins: &Path, reason: &str) -> u64 {
    inspect(pins, &["stats"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["reason"] == reason)
        .map(|r| r["packets"].as_u64().unwrap())
        .sum()
}

/// `dp explain --from FROM --to TO` on a node's pins (run in the root
/// network namespace), the whole answer.
pub fn explain(pins: &Path, from: &str, to: &str) -> serde_json::Value {
    inspect(pins, &["explain", "--from", from, "--to", to])
}

/// An explanation's (verdict, reason).
pub fn decision(e: &serde_json::Value) -> (&str, &str) {
    (
        e["verdict"].as_str().unwrap_or_default(),
        e["reason"].as_str().unwrap_or_default(),
    )
}

/// One TCP exchange from `ns` to `addr`: (backend pod, client address the
/// backend saw).
pub fn whoami(ns: &Netns, addr: SocketAddr) -> (String, SocketAddr) {
    let (reply, _) = e2e::tcp_echo_once(ns, addr, b"hi", TIMEOUT)
        .unwrap_or_else(|e| panic!("{addr} from {}: {e}", ns.name()));
    let (name, peer, echo) = e2e::parse_identity(&reply).expect("identity line");
    assert_eq!(echo, b"hi");
    (name, peer)
}

/// Asserts that nothing answers (the datapath drops; a reject would fail
/// the connect at once with "refused", not time out).
pub fn assert_dropped(ns: &Netns, addr: SocketAddr) {
    match e2e::tcp_echo_once(ns, addr, b"hi", DROPPED_AFTER) {
        Ok(r) => panic!("{addr} answered from {}: {r:?}", ns.name()),
        Err(e) => assert!(
            e.to_string().contains("timed out"),
            "{addr}: dropped, not refused: {e}"
        ),
    }
}

/// Asserts that the connection is refused at once (the datapath rejects
/// with ICMP port unreachable or a reset), neither answered nor dropped.
pub fn assert_refused(ns: &Netns, addr: SocketAddr) {
    refused_within(ns, addr, DROPPED_AFTER);
}

/// Asserts that a TCP connect from `ns` to `addr` is refused within
/// `within`; how long it took.
pub fn refused_within(ns: &Netns, addr: SocketAddr, within: Duration) -> Duration {
    let started = std::time::Instant::now();
    let r = ns
        .run(|| std::net::TcpStream::connect_timeout(&addr, within))
        .unwrap();
    match r {
        Ok(_) => panic!("{addr} answered from {}", ns.name()),
        Err(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{addr} from {}: refused, not {e}",
            ns.name()
        ),
    }
    started.elapsed()
}

/// A `dp trace` process in a node's namespace; its stdout lines arrive on
/// `lines`. Interrupted (SIGINT, as Ctrl-C) when dropped.
pub struct TraceProcess {
    pub child: Child,
    pub lines: Receiver<String>,
}

impl TraceProcess {
    /// Starts `dp trace --bpffs <pins> <args>` in `ns` and waits until its
    /// session is open (it says so on stderr).
    pub fn start(ns: &Netns, pins: &Path, args: &[&str]) -> TraceProcess {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", ns.path().display()))
            .args([env!("CARGO_BIN_EXE_dp"), "trace", "--bpffs"])
            .arg(pins)
            .args(args);
        Self::spawn(cmd)
    }

    /// Runs a `dp trace` command line of the caller's making, and waits
    /// until its session is open.
    pub fn spawn(mut cmd: Command) -> TraceProcess {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dp trace");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut first = String::new();
        stderr.read_line(&mut first).unwrap();
        assert!(
            first.contains("session") && first.contains("open"),
            "dp trace: {first}"
        );
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                eprintln!("[trace] {line}");
            }
        });
        TraceProcess { child, lines }
    }

    /// The next line, waiting at most `timeout`.
    pub fn next_line(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Ctrl-C, and the exit status.
    pub fn interrupt(&mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.child.wait().unwrap()
    }
}

impl Drop for TraceProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.interrupt();
        }
    }
}

/// A LoadBalancer `default/admin` (203.0.113.11:80, NodePort 30082) open
/// only to 172.18.0.100/32, its endpoint pod-1-0 on node1.
pub const ADMIN_WITH_SOURCE_RANGES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: admin, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.12
  loadBalancerSourceRanges: [172.18.0.100/32]
  ports: [{port: 80, nodePort: 30082}]
status: {loadBalancer: {ingress: [{ip: 203.0.113.11}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: admin-1, namespace: default, labels: {kubernetes.io/service-name: admin}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.1.10], nodeName: node1}
"#;

/// A LoadBalancer `default/local` (203.0.113.12:80, NodePort 30083,
/// health check 32100) with externalTrafficPolicy Local, its endpoint
/// pod-1-1 on node1.
pub const LOCAL_TRAFFIC_POLICY: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: local, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.13
  externalTrafficPolicy: Local
  healthCheckNodePort: 32100
  ports: [{port: 80, nodePort: 30083}]
status: {loadBalancer: {ingress: [{ip: 203.0.113.12}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: local-1, namespace: default, labels: {kubernetes.io/service-name: local}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.1.11], nodeName: node1}
"#;

/// The web EndpointSlice with one endpoint (port 8080), as the API serves it.
pub fn web_slice(ip: &str, node: &str) -> serde_json::Value {
    serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "default",
            "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": [{"port": 8080}],
        "endpoints": [{"addresses": [ip], "nodeName": node}]})
}

/// Gives the fake API server the web Service (10.96.0.10:80) with pod-1-1
/// as its endpoint, and node1 (172.18.0.2).
pub fn serve_web(api: &e2e::apiserver::FakeApiServer) {
    api.apply(serde_json::json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}}));
    api.apply(web_slice("10.244.1.11", "node1"));
    api.apply(
        serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"},
        "status": {"addresses": [{"type": "InternalIP", "address": "172.18.0.2"}]}}),
    );
}

/// Which pod answers pod-1-0 through the web Service (10.96.0.10:80).
pub fn web_whoami(cluster: &e2e::Cluster) -> String {
    let web: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let (reply, _) = e2e::tcp_echo_once(cluster.pod_ns("pod-1-0"), web, b"hi", TIMEOUT).unwrap();
    e2e::parse_identity(&reply).unwrap().0
}

/// With `serve_web`'s objects synced: pod-1-1 answers; the slice moves to
/// pod-2-0 through the watch, and then pod-2-0 does.
pub fn web_follows_the_watch(
    cluster: &e2e::Cluster,
    api: &e2e::apiserver::FakeApiServer,
    agent: &Agent,
) {
    assert_eq!(web_whoami(cluster), "pod-1-1");
    api.apply(web_slice("10.244.2.10", "node2"));
    agent.wait_for(&["synced", "backends_written=1"]);
    // node2 has no agent, but it needs none to deliver to its own pod.
    assert_eq!(web_whoami(cluster), "pod-2-0");
}
