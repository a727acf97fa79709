//! What a new user meets on a first try of dp: the agent started the way
//! people try things in a namespace (`ip netns exec`, default `--bpffs`),
//! inspection commands with no agent state, and the agent's log read from
//! a pipe (as `kubectl logs` reads it) in text and JSON.

use std::{net::SocketAddr, path::Path, process::Command};

mod support;

use e2e::{require_root, Cluster, Netns};
use support::agents::*;

const MANIFESTS: &str = "apiVersion: v1\nkind: Service\n\
    metadata: {name: web, namespace: default}\n\
    spec:\n  clusterIP: 10.96.0.10\n  ports: [{port: 80}]\n---\n\
    apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
    metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}\n\
    addressType: IPv4\nports: [{port: 8080}]\n\
    endpoints:\n- {addresses: [10.244.1.11], nodeName: node1}\n";

/// `ip netns exec NS dp ARGS...` with the default `--bpffs`; stdout, or
/// the failure's stderr.
fn dp_in(ns: &Netns, args: &[&str]) -> Result<String, String> {
    let out = ns
        .command(env!("CARGO_BIN_EXE_dp"))
        .args(args)
        .env_remove("DP_BPFFS")
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `ip netns exec NODE dp agent` with the default `--bpffs`: the agent
/// mounts a bpffs on `/sys/fs/bpf` of its own mount namespace (the one
/// `ip netns exec` made), serves, and `ip netns exec NODE dp service list`
/// finds its state. Its log to a pipe, with NO_COLOR unset, has no escape
/// codes; with `--log-format json` every line is a JSON object. The
/// machine's own `/sys/fs/bpf` is left as it was.
#[test]
fn the_agent_runs_under_ip_netns_exec_with_the_default_bpffs() {
    require_root();
    let host_bpffs_before = dp::kernel::pin::is_bpffs(Path::new("/sys/fs/bpf"));
    let cluster = Cluster::new(&[2]).unwrap();
    let _servers = cluster.serve_named_tcp(8080).unwrap();
    let dir = manifests_dir("netns-exec");
    std::fs::write(dir.join("web.yaml"), MANIFESTS).unwrap();
    let node = cluster.node_ns(0);
    let start = |extra: &[&str]| {
        let mut cmd = node.command(env!("CARGO_BIN_EXE_dp"));
        cmd.arg("agent")
            .arg("--manifests")
            .arg(&*dir)
            .args(["--node-name", "node1", "--node-ip", "172.18.0.2"])
            .args(["--devices", "eth0", "--cluster-cidr", "10.244.0.0/16"])
            .args(extra)
            .env_remove("DP_BPFFS")
            .env_remove("NO_COLOR");
        Agent::spawn_as_is(cmd)
    };
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();

    let agent = start(&[]);
    let log = agent.log_until(&["synced"]);
    assert!(
        log.iter().all(|l| !l.contains('\x1b')),
        "escape codes in a piped log: {log:?}"
    );
    assert!(
        log.iter()
            .any(|l| l.contains("mounted a bpffs on /sys/fs/bpf")),
        "{log:?}"
    );
    assert_eq!(whoami(cluster.pod_ns("pod-1-0"), vip).0, "pod-1-1");
    let services: serde_json::Value =
        serde_json::from_str(&dp_in(node, &["service", "list", "-o", "json"]).unwrap()).unwrap();
    assert_eq!(services[0]["frontend"], "10.96.0.10:80/TCP", "{services}");
    let status = dp_in(node, &["status"]).unwrap();
    assert!(status.contains("DP_SERVICES"), "{status}");
    agent.stop();
    // The state lived in the agent's mount namespace, and went with it.
    let gone = dp_in(node, &["service", "list"]).unwrap_err();
    assert!(gone.contains("no dp state under /sys/fs/bpf/dp"), "{gone}");

    let agent = start(&["--log-format", "json"]);
    let log = agent.log_until(&["synced"]);
    for line in &log {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
    assert!(log.last().unwrap().contains("\"synced\""), "{log:?}");
    agent.stop();
    assert_eq!(
        dp::kernel::pin::is_bpffs(Path::new("/sys/fs/bpf")),
        host_bpffs_before,
        "the machine's /sys/fs/bpf untouched"
    );
}

/// With no agent state, an inspection command says what is missing and
/// what to check, for each way it can be missing.
#[test]
fn inspection_commands_without_agent_state_say_what_is_missing() {
    require_root();
    let run = |bpffs: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_dp"))
            .args(["service", "list", "--bpffs"])
            .arg(bpffs)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let empty = Bpffs::new("no-state");
    let plain = manifests_dir("no-state-plain");
    let cases = [
        (empty.root.clone(), "nothing is pinned in"),
        (plain.join("missing"), "does not exist"),
        (plain.to_path_buf(), "is not on a bpffs"),
    ];
    for (dir, detail) in cases {
        let err = run(&dir);
        for needle in [
            &format!("no dp state under {}", dir.display()),
            detail,
            "Is `dp agent` running on this node",
            "--bpffs",
        ] {
            assert!(err.contains(needle), "{needle:?} in {err:?}");
        }
        assert!(!err.contains("BPF_OBJ_GET"), "{err}");
    }
}

/// `dp agent --help` tells a kube-proxy user which settings carry over and
/// where dp differs.
#[test]
fn the_agent_help_lists_kube_proxy_settings_and_differences() {
    let out = e2e::stdout_of(Command::new(env!("CARGO_BIN_EXE_dp")).args(["agent", "--help"]));
    for needle in [
        "dp and kube-proxy",
        "--nodeport-addresses",
        "--service-cidr",
        "IPv6",
        "localhost:NodePort",
        "node_to_own_address",
        "--log-format",
    ] {
        assert!(out.contains(needle), "{needle:?} in dp agent --help");
    }
}
