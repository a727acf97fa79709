//! `cargo xtask kind up | test | down`: dp in place of kube-proxy on a kind
//! cluster (e2e/kind/cluster.yaml: no kube-proxy, a control plane and two
//! workers), as docs/kind.md describes.
//!
//! - `up`: creates the cluster, builds the image and loads it into the
//!   nodes, applies deploy/, waits for the agents, the nodes and CoreDNS.
//! - `test`: applies e2e/kind/workloads.yaml and checks, through kubectl
//!   and the nodes: a ClusterIP, DNS through the kube-dns Service, a
//!   NodePort from another node, a Service without endpoints (refused at
//!   once), externalTrafficPolicy: Local (served with the client's address
//!   on the node with the endpoint, dropped on the other), and `dp trace`
//!   in a dp pod showing the flows.
//!   On a dual-stack cluster (`up --ip-family dual`, cluster-dual.yaml)
//!   the Service checks run in each family.
//! - `down`: deletes the cluster.
//!
//! Each needs a Docker engine, kind and kubectl; without them it says what
//! is missing and fails.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

const CLUSTER: &str = "dp";
const CONTEXT: &str = "kind-dp";
const NAMESPACE: &str = "dp-e2e";

/// Whether `program` is on PATH.
fn installed(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// A Docker engine answers `docker info`; the client alone is not enough.
pub fn require_docker_engine() -> Result<()> {
    if !installed("docker") {
        bail!(
            "no Docker engine: the `docker` command is not installed. kind runs its nodes \
             as Docker containers; install Docker Engine and start it (docs/kind.md)"
        );
    }
    let out = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .context("cannot run `docker info`")?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        let why = why
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no reason given");
        bail!(
            "no Docker engine: `docker info` failed ({why}). The docker client is installed \
             but no engine answers: start dockerd, or point DOCKER_HOST at one (docs/kind.md)"
        );
    }
    Ok(())
}

/// Everything `kind up|test|down` needs, or one error naming all that is
/// missing.
pub fn require_tools() -> Result<()> {
    let mut missing = Vec::new();
    if let Err(e) = require_docker_engine() {
        missing.push(e.to_string());
    }
    for (tool, what) in [
        ("kind", "creates the cluster (https://kind.sigs.k8s.io)"),
        ("kubectl", "talks to it"),
    ] {
        if !installed(tool) {
            missing.push(format!("`{tool}` is not installed: it {what}"));
        }
    }
    if !missing.is_empty() {
        bail!(
            "cargo xtask kind cannot run here:\n  - {}\nSee docs/kind.md for what to install.",
            missing.join("\n  - ")
        );
    }
    Ok(())
}

fn kubectl() -> Command {
    let mut c = Command::new("kubectl");
    c.args(["--context", CONTEXT]);
    c
}

fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// kind's nodes run the host's kernel: the one dp will meet. Checked before
/// anything is created (`DP_KERNEL_RELEASE` stands in for the running one).
pub fn require_kernel() -> Result<()> {
    let release = std::env::var(common::kernel::KERNEL_RELEASE_OVERRIDE)
        .or_else(|_| std::fs::read_to_string("/proc/sys/kernel/osrelease"))
        .context("cannot read the kernel release")?;
    let release = release.trim();
    common::kernel::check(release).map_err(|e| anyhow::anyhow!("{e}"))?;
    crate::step(&format!("host kernel {release}: dp runs on it"));
    Ok(())
}

/// The kind config and, for a dual-stack cluster, the agents' CIDR pairs
/// (kind's defaults, as in the config).
fn cluster_config(dual: bool) -> (&'static str, Option<[&'static str; 2]>) {
    if dual {
        (
            "e2e/kind/cluster-dual.yaml",
            Some([
                "DP_CLUSTER_CIDR=10.244.0.0/16,fd00:10:244::/56",
                "DP_SERVICE_CIDR=10.96.0.0/16,fd00:10:96::/112",
            ]),
        )
    } else {
        ("e2e/kind/cluster.yaml", None)
    }
}

pub fn up(ws: &Path, dual: bool) -> Result<()> {
    require_kernel()?;
    require_tools()?;
    let (config, cidrs) = cluster_config(dual);
    let clusters = output(Command::new("kind").args(["get", "clusters"]))?;
    if clusters.lines().any(|c| c == CLUSTER) {
        crate::step("kind cluster dp: exists (kept with its address families)");
    } else {
        crate::step(&format!(
            "kind create cluster --config {config} (no kube-proxy)"
        ));
        crate::run(
            Command::new("kind")
                .args(["create", "cluster", "--config"])
                .arg(ws.join(config)),
        )?;
    }
    crate::image::build(ws)?;
    load_image(ws)?;
    crate::step("kubectl apply -k deploy/");
    crate::run(kubectl().arg("apply").arg("-k").arg(ws.join("deploy")))?;
    if let Some(cidrs) = cidrs {
        // deploy/'s ConfigMap has kind's IPv4 defaults; a dual-stack
        // cluster's agents need a CIDR of each family (env overrides
        // envFrom). The node addresses come from the Node objects.
        crate::step("kubectl set env: both families' cluster and service CIDRs");
        crate::run(
            kubectl()
                .args(["-n", "dp-system", "set", "env", "daemonset/dp-agent"])
                .args(cidrs),
        )?;
    }
    // A new image under the same tag: the pods must start again.
    crate::run(kubectl().args([
        "-n",
        "dp-system",
        "rollout",
        "restart",
        "daemonset/dp-agent",
    ]))?;
    crate::step("waiting for the agents, the nodes and CoreDNS");
    crate::run(kubectl().args([
        "-n",
        "dp-system",
        "rollout",
        "status",
        "daemonset/dp-agent",
        "--timeout=300s",
    ]))?;
    crate::run(kubectl().args([
        "wait",
        "--for=condition=Ready",
        "nodes",
        "--all",
        "--timeout=300s",
    ]))?;
    crate::run(kubectl().args([
        "-n",
        "kube-system",
        "rollout",
        "status",
        "deployment/coredns",
        "--timeout=300s",
    ]))?;
    println!("dp serves the cluster's Services. Next: cargo xtask kind test");
    Ok(())
}

/// Loads the image into the nodes: `kind load docker-image`, or, where
/// that fails (it does with Docker's containerd image store on some
/// versions), `docker save` and `kind load image-archive`.
fn load_image(ws: &Path) -> Result<()> {
    let tag = crate::image::tag();
    crate::step("kind load docker-image");
    let direct =
        crate::run(Command::new("kind").args(["load", "docker-image", &tag, "--name", CLUSTER]));
    let Err(e) = direct else {
        return Ok(());
    };
    println!("kind load docker-image failed ({e:#}); loading an image archive instead");
    let archive = ws.join("target/dp-image.tar");
    if let Some(dir) = archive.parent() {
        std::fs::create_dir_all(dir)?;
    }
    crate::step(&format!("docker save -o {} {tag}", archive.display()));
    crate::run(
        Command::new("docker")
            .arg("save")
            .arg("-o")
            .arg(&archive)
            .arg(&tag),
    )?;
    crate::step("kind load image-archive");
    let loaded = crate::run(
        Command::new("kind")
            .args(["load", "image-archive"])
            .arg(&archive)
            .args(["--name", CLUSTER]),
    );
    let _ = std::fs::remove_file(&archive);
    loaded
}

pub fn down() -> Result<()> {
    require_tools()?;
    crate::run(Command::new("kind").args(["delete", "cluster", "--name", CLUSTER]))
}

/// One check's outcome.
struct Checks {
    failed: Vec<String>,
}

impl Checks {
    fn check(&mut self, name: &str, result: Result<String>) {
        match result {
            Ok(detail) => println!("ok    {name}: {detail}"),
            Err(e) => {
                println!("FAIL  {name}: {e:#}");
                self.failed.push(name.to_string());
            }
        }
    }
}

/// Runs a command in the client pod.
fn in_client(args: &[&str]) -> Command {
    let mut c = kubectl();
    c.args(["-n", NAMESPACE, "exec", "client", "--"]).args(args);
    c
}

fn jsonpath(args: &[&str], path: &str) -> Result<String> {
    output(
        kubectl()
            .args(args)
            .arg("-o")
            .arg(format!("jsonpath={path}")),
    )
}

/// A node's InternalIP of one family (a dual-stack node has one of each).
fn node_ip(node: &str, v6: bool) -> Result<String> {
    let all = jsonpath(
        &["get", "node", node],
        "{.status.addresses[?(@.type==\"InternalIP\")].address}",
    )?;
    all.split_whitespace()
        .find(|ip| ip.contains(':') == v6)
        .map(str::to_string)
        .with_context(|| format!("{node} has no {} InternalIP ({all})", family(v6)))
}

fn family(v6: bool) -> &'static str {
    if v6 {
        "IPv6"
    } else {
        "IPv4"
    }
}

/// An address as a URL or `agnhost connect` writes it: IPv6 in brackets.
fn host(ip: &str) -> String {
    if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    }
}

/// A Service's ClusterIPs (one per family on a dual-stack cluster).
fn cluster_ips(service: &str) -> Result<Vec<String>> {
    let ips = jsonpath(
        &["-n", NAMESPACE, "get", "service", service],
        "{.spec.clusterIPs[*]}",
    )?;
    Ok(ips.split_whitespace().map(str::to_string).collect())
}

/// `curl` from a kind node (a client outside the cluster's pods).
fn curl_from_node(node: &str, url: &str, seconds: u32) -> Command {
    let mut c = Command::new("docker");
    c.args([
        "exec",
        node,
        "curl",
        "-sS",
        "--max-time",
        &seconds.to_string(),
        url,
    ]);
    c
}

pub fn test(ws: &Path) -> Result<()> {
    require_tools()?;
    crate::step("kubectl apply -f e2e/kind/workloads.yaml");
    crate::run(
        kubectl()
            .arg("apply")
            .arg("-f")
            .arg(ws.join("e2e/kind/workloads.yaml")),
    )?;
    for d in ["deployment/web", "deployment/local"] {
        crate::run(kubectl().args(["-n", NAMESPACE, "rollout", "status", d, "--timeout=300s"]))?;
    }
    crate::run(kubectl().args([
        "-n",
        NAMESPACE,
        "wait",
        "--for=condition=Ready",
        "pod/client",
        "--timeout=300s",
    ]))?;

    let web_ips = cluster_ips("web")?;
    let web_ip = web_ips.first().context("web has no ClusterIP")?.clone();
    let web_pods: BTreeSet<String> = jsonpath(
        &["-n", NAMESPACE, "get", "pods", "-l", "app=web"],
        "{.items[*].metadata.name}",
    )?
    .split_whitespace()
    .map(str::to_string)
    .collect();
    let agents = agent_pods()?;
    wait_until_programmed(&agents)?;

    let mut checks = Checks { failed: Vec::new() };
    // Each family of the (PreferDualStack) Services: one on an IPv4
    // cluster, both on a dual-stack one.
    for ip in &web_ips {
        let v6 = ip.contains(':');
        // Named by family where there are two.
        let fam = if web_ips.len() > 1 {
            format!("{}: ", family(v6))
        } else {
            String::new()
        };
        let nodes = Nodes {
            worker: node_ip("dp-worker", v6)?,
            worker2: node_ip("dp-worker2", v6)?,
            control_plane: node_ip("dp-control-plane", v6)?,
        };
        checks.check(
            &format!("{fam}ClusterIP reaches both web pods"),
            cluster_ip(ip, &web_pods),
        );
        checks.check(
            &format!("{fam}NodePort from another node"),
            node_port(&nodes, &web_pods),
        );
        checks.check(
            &format!("{fam}a Service without endpoints is refused at once"),
            no_endpoints(v6),
        );
        checks.check(
            &format!("{fam}externalTrafficPolicy: Local"),
            local_policy(&nodes),
        );
    }
    checks.check("DNS through the kube-dns Service", dns(&web_ip));
    checks.check(
        "dp trace in a dp pod shows the flows",
        trace_in_a_dp_pod(&web_ip),
    );
    if checks.failed.is_empty() {
        println!("all checks passed");
        Ok(())
    } else {
        diagnose(&agents);
        bail!(
            "{} checks failed: {}",
            checks.failed.len(),
            checks.failed.join(", ")
        )
    }
}

/// The test workloads' Services, as `dp service list` names them.
const WORKLOAD_SERVICES: [&str; 4] = [
    "dp-e2e/web",
    "dp-e2e/web-nodeport",
    "dp-e2e/empty",
    "dp-e2e/local",
];

/// How often a connection is tried before a check fails: a first SYN can
/// be lost to a neighbour entry being resolved, a DNS query to a busy
/// CoreDNS.
const ATTEMPTS: u32 = 3;

fn retried(mut attempt: impl FnMut() -> Result<String>) -> Result<String> {
    let mut last = None;
    for i in 0..ATTEMPTS {
        match attempt() {
            Ok(out) => return Ok(out),
            Err(e) => {
                println!("      attempt {}/{ATTEMPTS}: {e:#}", i + 1);
                last = Some(e);
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
    Err(last.expect("at least one attempt"))
}

/// `kubectl` arguments that list the dp agent pods.
const AGENT_PODS: [&str; 6] = [
    "-n",
    "dp-system",
    "get",
    "pods",
    "-l",
    "app.kubernetes.io/name=dp",
];

/// The dp agent pods, with their nodes.
fn agent_pods() -> Result<Vec<(String, String)>> {
    let text = jsonpath(
        &AGENT_PODS,
        "{range .items[*]}{.metadata.name} {.spec.nodeName}{\"\\n\"}{end}",
    )?;
    let pods: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(pod, node)| (pod.to_string(), node.to_string()))
        .collect();
    if pods.is_empty() {
        bail!("no dp agent pods in dp-system: is dp deployed (cargo xtask kind up)?");
    }
    Ok(pods)
}

/// `kubectl exec` into an agent pod's agent container.
fn in_agent(pod: &str, args: &[&str]) -> Command {
    let mut c = kubectl();
    c.args(["-n", "dp-system", "exec", pod, "-c", "agent", "--"])
        .args(args);
    c
}

/// Waits until every agent's maps hold the test workloads' Services (the
/// agents sync on their own schedule after `kubectl apply`).
fn wait_until_programmed(agents: &[(String, String)]) -> Result<()> {
    crate::step("waiting until every agent's `dp service list` shows the workloads");
    let deadline = Instant::now() + Duration::from_secs(120);
    for (pod, node) in agents {
        loop {
            let listed = output(&mut in_agent(pod, &["dp", "service", "list"])).unwrap_or_default();
            let missing: Vec<&str> = WORKLOAD_SERVICES
                .iter()
                .copied()
                .filter(|s| !listed.contains(s))
                .collect();
            if missing.is_empty() {
                println!("      {pod} ({node}): programmed");
                break;
            }
            if Instant::now() > deadline {
                diagnose(agents);
                bail!("{pod} ({node}) has not programmed {missing:?} after 120 s");
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    Ok(())
}

/// What a failed run prints so that it says why: from each agent, the
/// drops and rejects of the last five minutes with their causes, the
/// per-reason counters, and the node's counters of packets the stack
/// refused (strict reverse-path filtering, martian addresses, no route).
fn diagnose(agents: &[(String, String)]) {
    const NODE_COUNTERS: &str =
        "TcpExtIPReversePathFilter IpInAddrErrors IpInNoRoutes IpInDiscards IpOutNoRoutes";
    for (pod, node) in agents {
        println!("\n==> {node} ({pod})");
        for (what, args) in [
            (
                "dp trace --since 5m --verdict dropped,rejected --explain",
                vec![
                    "dp",
                    "trace",
                    "--since",
                    "5m",
                    "--verdict",
                    "dropped,rejected",
                    "--explain",
                    "--duration",
                    "1",
                ],
            ),
            ("dp stats", vec!["dp", "stats"]),
            ("dp status", vec!["dp", "status"]),
            (
                "nstat (the node's stack)",
                ["nstat", "-asz"]
                    .into_iter()
                    .chain(NODE_COUNTERS.split(' '))
                    .collect(),
            ),
        ] {
            println!("--- {what}");
            match in_agent(pod, &args).output() {
                Ok(out) => {
                    print!("{}", String::from_utf8_lossy(&out.stdout));
                    print!("{}", String::from_utf8_lossy(&out.stderr));
                }
                Err(e) => println!("cannot run kubectl: {e}"),
            }
        }
    }
}

struct Nodes {
    worker: String,
    worker2: String,
    control_plane: String,
}

/// `curl` from the client pod to `web`'s ClusterIP until both pods answered.
fn cluster_ip(web_ip: &str, web_pods: &BTreeSet<String>) -> Result<String> {
    let url = format!("http://{}/hostname", host(web_ip));
    let mut seen = BTreeSet::new();
    for _ in 0..30 {
        seen.insert(retried(|| {
            output(&mut in_client(&["curl", "-sS", "--max-time", "5", &url]))
        })?);
        if seen == *web_pods {
            return Ok(format!("{web_ip}:80 answered by {seen:?}"));
        }
    }
    bail!("answered by {seen:?}, expected {web_pods:?}")
}

/// The client's resolver is the kube-dns ClusterIP (UDP through dp).
fn dns(web_ip: &str) -> Result<String> {
    let name = format!("web.{NAMESPACE}.svc.cluster.local");
    let answer = retried(|| output(&mut in_client(&["nslookup", &name])))?;
    if !answer.contains(web_ip) {
        bail!("{name} did not resolve to {web_ip}: {answer}");
    }
    Ok(format!("{name} -> {web_ip}"))
}

/// From the control-plane node to dp-worker2's NodePort: its local pod and
/// the remote one both answer.
fn node_port(nodes: &Nodes, web_pods: &BTreeSet<String>) -> Result<String> {
    let url = format!("http://{}:30080/hostname", host(&nodes.worker2));
    let mut seen = BTreeSet::new();
    for _ in 0..30 {
        seen.insert(retried(|| {
            output(&mut curl_from_node("dp-control-plane", &url, 5))
        })?);
        if seen == *web_pods {
            return Ok(format!("{url} answered by {seen:?}"));
        }
    }
    bail!("only {seen:?} answered (a local and a remote backend expected)")
}

/// kube-proxy's REJECT: refused, well before the 5 s timeout (IPv6 TCP
/// about a second in, on the SYN's retransmission: docs/deploy.md).
fn no_endpoints(v6: bool) -> Result<String> {
    let ips = cluster_ips("empty")?;
    let ip = ips
        .iter()
        .find(|ip| ip.contains(':') == v6)
        .with_context(|| format!("empty has no {} ClusterIP: {ips:?}", family(v6)))?;
    let started = Instant::now();
    let out = in_client(&[
        "/agnhost",
        "connect",
        &format!("{}:80", host(ip)),
        "--timeout=5s",
        "--protocol=tcp",
    ])
    .output()?;
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || !stderr.contains("REFUSED") {
        bail!("expected REFUSED, got: {}", stderr.trim());
    }
    // kubectl exec itself takes a moment; a timeout would take 5 s.
    if took > Duration::from_secs(4) {
        bail!("refused only after {took:?}");
    }
    Ok(format!("{ip}:80 REFUSED in {took:?}"))
}

/// dp-worker (the endpoint's node) keeps the client's address; dp-worker2
/// (none) drops, so curl times out.
fn local_policy(nodes: &Nodes) -> Result<String> {
    let url = format!("http://{}:30081/clientip", host(&nodes.worker));
    // agnhost answers `IP:port`.
    let seen = retried(|| output(&mut curl_from_node("dp-control-plane", &url, 5)))?;
    let seen_ip = seen.rsplit_once(':').map_or(seen.as_str(), |(ip, _)| ip);
    let seen_ip = seen_ip.trim_start_matches('[').trim_end_matches(']');
    if seen_ip != nodes.control_plane {
        bail!(
            "the backend saw {seen}, not the client {}",
            nodes.control_plane
        );
    }
    // Dropped: curl times out (exit 28). Refused (7) would mean the
    // NodePort is not programmed at all.
    let other = format!("http://{}:30081/clientip", host(&nodes.worker2));
    let status = curl_from_node("dp-control-plane", &other, 3)
        .output()?
        .status;
    if status.code() != Some(28) {
        bail!("dp-worker2 (no endpoint): curl exited {status}, expected a timeout (28)");
    }
    Ok(format!(
        "dp-worker kept the client address {}; dp-worker2 (no endpoint) dropped",
        nodes.control_plane
    ))
}

/// `kubectl exec` into the dp pod on the client's node: `dp trace` shows
/// the client's request to `web`.
fn trace_in_a_dp_pod(web_ip: &str) -> Result<String> {
    let pod = jsonpath(
        &[
            &AGENT_PODS[..],
            &["--field-selector", "spec.nodeName=dp-worker2"],
        ]
        .concat(),
        "{.items[0].metadata.name}",
    )?;
    let service = format!("{NAMESPACE}/web");
    let child = kubectl()
        .args(["-n", "dp-system", "exec", &pod, "-c", "agent", "--"])
        .args(["dp", "trace", "--service", &service])
        .args(["--count", "3", "--duration", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut trace = KillOnDrop(Some(child));
    // The session is open once it says so (kubectl may say other things
    // first); then the traffic.
    let stderr = trace.0.as_mut().and_then(|c| c.stderr.take()).unwrap();
    let mut stderr = BufReader::new(stderr);
    let mut said = String::new();
    loop {
        let mut line = String::new();
        if stderr.read_line(&mut line)? == 0 {
            bail!("dp trace ended before its session opened: {said}");
        }
        said.push_str(&line);
        if line.contains("session") && line.contains("open") {
            break;
        }
    }
    output(&mut in_client(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        &format!("http://{}/hostname", host(web_ip)),
    ]))?;
    let out = trace.0.take().unwrap().wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !text.contains(&service) {
        bail!("no {service} flow in the trace: {text}");
    }
    Ok(format!(
        "{pod}: {}",
        text.lines().next().unwrap_or_default()
    ))
}

/// A child process killed if a check gives up on it.
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agents' CIDR pairs are the ones the kind config gives the
    /// cluster, so dp and the cluster agree on what is a pod.
    #[test]
    fn the_dual_stack_config_and_the_agents_cidrs_agree() {
        let ws = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let (file, cidrs) = cluster_config(true);
        let config = std::fs::read_to_string(ws.join(file)).unwrap();
        assert!(config.contains("ipFamily: dual"), "{config}");
        assert!(config.contains("kubeProxyMode: \"none\""), "{config}");
        let [cluster, service] = cidrs.unwrap();
        let value = |kv: &str| kv.split_once('=').unwrap().1.to_string();
        assert!(config.contains(&format!("podSubnet: {}", value(cluster))));
        assert!(config.contains(&format!("serviceSubnet: {}", value(service))));
        let (file, cidrs) = cluster_config(false);
        assert!(ws.join(file).exists());
        assert!(cidrs.is_none());
    }

    #[test]
    fn ipv6_hosts_are_bracketed() {
        assert_eq!(host("10.96.0.1"), "10.96.0.1");
        assert_eq!(host("fd00:10:96::1"), "[fd00:10:96::1]");
    }
}
