//! `dp agent --manifests` end to end: one agent process per node of a
//! two-node namespace cluster, driven by a manifests directory. Editing a
//! file moves traffic within a second; a pod veth created after start is
//! served.

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc::{self, Receiver},
    time::{Duration, Instant},
};

use e2e::{parse_identity, require_root, tcp_echo_once, Cluster, Netns, TcpEchoServer};

const TIMEOUT: Duration = Duration::from_secs(5);
const WEB: &str = "10.96.0.10:80";

/// A `dp agent` running in a node's namespace; killed when dropped.
struct Agent {
    child: Child,
    log: Receiver<String>,
}

impl Agent {
    fn start(ns: &Netns, node: &str, node_ip: &str, manifests: &Path) -> Agent {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns.name(),
                env!("CARGO_BIN_EXE_dp"),
                "agent",
            ])
            .arg("--manifests")
            .arg(manifests)
            .args(["--node-name", node, "--node-ip", node_ip])
            .args(["--devices", "eth0", "--pod-devices", "^lxc"])
            .args(["--cluster-cidr", "10.244.0.0/16"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
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
    fn wait_for(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if needles.iter().all(|n| line.contains(n)) => return line,
                Ok(_) => continue,
                Err(e) => panic!("agent never logged {needles:?}: {e}"),
            }
        }
    }

    fn stop(mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "agent exited with {status}");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn manifests_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dp-agent-test-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// The web service with these backends (pod IPs, port 8080), written the
/// way an editor saves: a new file renamed over the old one.
fn write_web(dir: &Path, backends: &[(&str, &str)]) {
    let endpoints: String = backends
        .iter()
        .map(|(ip, node)| format!("- {{addresses: [{ip}], nodeName: {node}}}\n"))
        .collect();
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\n\
         spec:\n  clusterIP: 10.96.0.10\n  ports: [{{port: 80}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: web-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\n\
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
    let mut servers = Vec::new();
    for pod in cluster.pods.clone() {
        let addr = SocketAddr::from((pod.ip, 8080));
        servers.push(
            TcpEchoServer::start_named(cluster.pod_ns(&pod.name), addr, Some(pod.name.clone()))
                .unwrap(),
        );
    }
    let dir = manifests_dir();
    write_web(&dir, &[("10.244.1.11", "node1"), ("10.244.2.10", "node2")]);
    let agents: Vec<Agent> = cluster
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| Agent::start(cluster.node_ns(i), &n.name, &n.ip.to_string(), &dir))
        .collect();
    for a in &agents {
        a.wait_for(&["synced", "frontends=1"]);
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

    // A pod created after the agent started: its veth gets attached, so its
    // own traffic to the service is served.
    let pod = cluster.add_pod(0).unwrap();
    agents[0].wait_for(&["attached tc to pod device", &pod.host_device]);
    assert_eq!(whoami(cluster.pod_ns(&pod.name)), "pod-2-1");

    drop(servers);
    for a in agents {
        a.stop();
    }
    let _ = fs::remove_dir_all(&dir);
}
