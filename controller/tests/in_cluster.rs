//! The agent as its DaemonSet pod runs it (deploy/): the in-cluster config
//! (token, CA and namespace under /var/run/secrets/kubernetes.io/
//! serviceaccount, laid out in a mount namespace of its own; the API server
//! from KUBERNETES_SERVICE_HOST/PORT over TLS with that CA), the node name
//! from NODE_NAME (the downward API), the node addresses from the Node
//! object, the node device from the default route, pod veths by the default
//! pattern, the other settings from deploy/configmap.yaml's variables, and
//! exactly the capabilities deploy/daemonset.yaml lists. `dp trace`, as
//! `kubectl exec` runs it in that container, with the same capabilities.

mod support;

use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use e2e::{
    apiserver::{FakeApiServer, TlsFiles},
    require_root, Cluster, Netns,
};
use support::agents::*;

const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

fn deploy_file(name: &str) -> serde_norway::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(name);
    serde_norway::from_str(&fs::read_to_string(&path).unwrap()).unwrap()
}

/// deploy/configmap.yaml's data: the agent's environment.
fn configmap_env() -> BTreeMap<String, String> {
    let cm = deploy_file("configmap.yaml");
    serde_norway::from_value(cm["data"].clone()).unwrap()
}

/// The agent container's added capabilities, for `setpriv`: `+bpf,+...`.
fn daemonset_capabilities() -> String {
    let ds = deploy_file("daemonset.yaml");
    let agent = ds["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "agent")
        .unwrap();
    let caps = &agent["securityContext"]["capabilities"];
    assert_eq!(
        caps["drop"][0], "ALL",
        "the agent starts from no capabilities"
    );
    caps["add"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| format!("+{}", c.as_str().unwrap().to_lowercase()))
        .collect::<Vec<_>>()
        .join(",")
}

/// `nsenter --net=NS [unshare ...] setpriv <only the DaemonSet's
/// capabilities> dp ARGS`.
fn in_pod(ns: &Netns, service_account: Option<&Path>, args: &[&str]) -> Command {
    let setpriv = format!(
        "setpriv --bounding-set=-all,{caps} --inh-caps=-all {dp}",
        caps = daemonset_capabilities(),
        dp = env!("CARGO_BIN_EXE_dp")
    );
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", ns.path().display()));
    match service_account {
        // A private mount namespace with a tmpfs on /run (so nothing of the
        // machine's changes), where the service account files go as kubelet
        // puts them.
        Some(dir) => {
            let script = format!(
                "set -e; mount -t tmpfs tmpfs /run; mkdir -p {SERVICE_ACCOUNT_DIR}; \
                 cp {dir}/token {dir}/ca.crt {dir}/namespace {SERVICE_ACCOUNT_DIR}/; \
                 exec {setpriv} \"$@\"",
                dir = dir.display()
            );
            cmd.args(["unshare", "--mount", "--propagation", "private", "sh", "-c"])
                .arg(script)
                .arg("sh");
        }
        None => {
            cmd.args(setpriv.split_whitespace());
        }
    }
    cmd.args(args)
        // No kubeconfig to find: the in-cluster config it is.
        .env_remove("KUBECONFIG")
        .env("HOME", "/nonexistent");
    cmd
}

struct TempDir(PathBuf);

/// A cgroup v2 directory of the test, removed when dropped.
struct TestCgroup(PathBuf);

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_agent_runs_as_in_its_pod_with_the_in_cluster_config_and_the_listed_capabilities() {
    require_root();
    let cluster = Cluster::new(&[2, 1]).unwrap();
    let _servers = cluster.serve_named_tcp(8080).unwrap();
    let node1 = cluster.node_ns(0);

    let token = format!("dp-agent-token-{}", std::process::id());
    let tls = TlsFiles::for_ip(Ipv4Addr::LOCALHOST.into()).unwrap();
    let api = FakeApiServer::start_tls_in(node1, &tls, &token).unwrap();
    serve_web(&api);

    // What kubelet mounts into the pod.
    let sa = TempDir(std::env::temp_dir().join(format!("dp-sa-{}", std::process::id())));
    fs::create_dir_all(&sa.0).unwrap();
    fs::write(sa.0.join("token"), &token).unwrap();
    fs::write(sa.0.join("ca.crt"), &tls.ca_pem).unwrap();
    fs::write(sa.0.join("namespace"), "dp-system").unwrap();

    let bpffs = Bpffs::new("in-cluster");
    // The DaemonSet's DP_CGROUP_ROOT is the node's cgroup v2 root; here a
    // cgroup of this test's (the ConfigMap turns socket LB on), which no
    // process joins: the hooks attach and translate nothing.
    let cgroup = TestCgroup(
        dp::agent::cgroup2_root()
            .expect("a cgroup v2 hierarchy")
            .join(format!("dp-test-{}-in-cluster", std::process::id())),
    );
    fs::create_dir_all(&cgroup.0).unwrap();
    let mut agent_cmd = in_pod(node1, Some(&sa.0), &["agent"]);
    // The ConfigMap, except where the API server is: this test's.
    agent_cmd
        .envs(configmap_env())
        .env("DP_CGROUP_ROOT", &cgroup.0)
        .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        .env("KUBERNETES_SERVICE_PORT", api.addr().port().to_string())
        .env("NODE_NAME", "node1")
        .env("DP_BPFFS", bpffs.node("node1"));
    let agent = Agent::spawn(agent_cmd);
    agent.wait_for(&["node devices from the default route", "eth0"]);
    agent.wait_for(&["attached tc ingress and egress", "eth0", "xdp=false"]);
    // Pod veths by the default pattern: node1's two pods.
    for _ in 0..2 {
        agent.wait_for(&["attached tc to pod device"]);
    }
    // deploy/'s socket LB (`host`), with the DaemonSet's capabilities only.
    agent.wait_for(&["socket-level load balancing attached", "scope=Host"]);
    agent.wait_for(&["node addresses from the Node object", "172.18.0.2"]);
    agent.wait_for(&["synced", "frontends=1"]);

    web_follows_the_watch(&cluster, &api, &agent);

    // Every request bore the service account's token (the server answers
    // 401 otherwise), and the Node was watched by the name from NODE_NAME.
    let auth = api.authorizations();
    assert!(!auth.is_empty());
    assert!(
        auth.iter().all(|a| *a == format!("Bearer {token}")),
        "{auth:?}"
    );
    let requests = api.requests();
    assert_eq!(requests.len(), auth.len(), "a request without the token");
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("GET /api/v1/nodes?") && r.contains("metadata.name%3Dnode1")),
        "{requests:?}"
    );

    // `kubectl exec <dp pod> -- dp trace`: the same capabilities, the same
    // pins (DP_BPFFS as the pod's default /sys/fs/bpf/dp).
    let mut trace_cmd = in_pod(node1, None, &["trace", "--service", "default/web"]);
    trace_cmd.env("DP_BPFFS", bpffs.node("node1"));
    let mut trace = TraceProcess::spawn(trace_cmd);
    assert_eq!(web_whoami(&cluster), "pod-2-0");
    let line = trace
        .next_line(Duration::from_secs(5))
        .expect("dp trace shows the flow");
    assert!(line.contains("default/web"), "{line}");
    assert!(line.contains("10.244.2.10"), "{line}");
    assert!(trace.interrupt().success());
    agent.stop();
}
