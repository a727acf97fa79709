//! The manifests users apply (deploy/, and the kind test's workloads in
//! e2e/kind/): valid against the Kubernetes OpenAPI schemas offline
//! (kubernetes-validate, installed by `cargo xtask setup`), RBAC exactly
//! what the agent reads, a kustomization that lists every manifest, a
//! DaemonSet that fits the agent (its settings, its health endpoint, its
//! pins), and a kind config without kube-proxy.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use serde_norway::Value;

/// The Kubernetes version the schemas are taken from (k8s-openapi's
/// feature in Cargo.toml is the same).
const KUBERNETES_VERSION: &str = "1.34.0";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn deploy_manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(root().join("deploy"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| p.file_name().unwrap() != "kustomization.yaml")
        .collect();
    files.sort();
    files
}

/// Every object (YAML document) in `files`.
fn objects(files: &[PathBuf]) -> Vec<Value> {
    files
        .iter()
        .flat_map(|f| {
            let text = fs::read_to_string(f).unwrap();
            serde_norway::Deserializer::from_str(&text)
                .map(|d| Value::deserialize(d).unwrap())
                .filter(|v| !v.is_null())
                .collect::<Vec<_>>()
        })
        .collect()
}

use serde::Deserialize as _;

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn validator() -> PathBuf {
    let path = root().join("target/tools/venv/bin/kubernetes-validate");
    assert!(
        path.exists(),
        "{} is missing: `cargo xtask setup` installs it",
        path.display()
    );
    path
}

fn validate(files: &[PathBuf]) -> std::process::Output {
    Command::new(validator())
        .args(["--kubernetes-version", KUBERNETES_VERSION, "--strict"])
        .args(files)
        .output()
        .unwrap()
}

#[test]
fn the_manifests_pass_the_kubernetes_schemas_offline() {
    let mut files = deploy_manifests();
    files.push(root().join("e2e/kind/workloads.yaml"));
    let out = validate(&files);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    // One "passed" per object: nothing was skipped as unknown.
    let passed = text.lines().filter(|l| l.contains(" passed ")).count();
    assert_eq!(passed, objects(&files).len(), "{text}");

    // The check can fail: a misspelt field is refused.
    let bad = std::env::temp_dir().join(format!("dp-bad-daemonset-{}.yaml", std::process::id()));
    let ds = fs::read_to_string(root().join("deploy/daemonset.yaml")).unwrap();
    fs::write(&bad, ds.replace("hostNetwork: true", "hostNetwrok: true")).unwrap();
    let out = validate(std::slice::from_ref(&bad));
    let _ = fs::remove_file(&bad);
    assert!(!out.status.success(), "a misspelt field passed");
}

#[test]
fn rbac_grants_exactly_get_list_watch_on_the_kinds_the_agent_reads() {
    let objects = objects(&deploy_manifests());
    assert!(of_kind(&objects, "Role").is_empty());
    assert!(of_kind(&objects, "RoleBinding").is_empty());
    let roles = of_kind(&objects, "ClusterRole");
    assert_eq!(roles.len(), 1);
    let mut granted = BTreeSet::new();
    for rule in roles[0]["rules"].as_sequence().unwrap() {
        let keys: BTreeSet<&str> = rule
            .as_mapping()
            .unwrap()
            .keys()
            .map(|k| k.as_str().unwrap())
            .collect();
        // No resourceNames, no nonResourceURLs: whole resources, read only.
        assert_eq!(keys, BTreeSet::from(["apiGroups", "resources", "verbs"]));
        let list = |key: &str| -> Vec<String> {
            rule[key]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        };
        for group in list("apiGroups") {
            for resource in list("resources") {
                for verb in list("verbs") {
                    assert!(granted.insert((group.clone(), resource.clone(), verb)));
                }
            }
        }
    }
    let mut expected = BTreeSet::new();
    for (group, resource) in [
        ("", "services"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
        ("networking.k8s.io", "servicecidrs"),
    ] {
        for verb in ["get", "list", "watch"] {
            expected.insert((group.to_string(), resource.to_string(), verb.to_string()));
        }
    }
    assert_eq!(granted, expected);

    // Bound to the agent's ServiceAccount, the one the DaemonSet runs as.
    let bindings = of_kind(&objects, "ClusterRoleBinding");
    assert_eq!(bindings.len(), 1);
    let binding = bindings[0];
    assert_eq!(binding["roleRef"]["name"], roles[0]["metadata"]["name"]);
    let subjects = binding["subjects"].as_sequence().unwrap();
    assert_eq!(subjects.len(), 1);
    let sa = of_kind(&objects, "ServiceAccount");
    assert_eq!(sa.len(), 1);
    assert_eq!(subjects[0]["kind"], "ServiceAccount");
    assert_eq!(subjects[0]["name"], sa[0]["metadata"]["name"]);
    assert_eq!(subjects[0]["namespace"], sa[0]["metadata"]["namespace"]);
    let ds = of_kind(&objects, "DaemonSet")[0];
    assert_eq!(
        ds["spec"]["template"]["spec"]["serviceAccountName"],
        sa[0]["metadata"]["name"]
    );
}

#[test]
fn the_kustomization_lists_every_manifest_once() {
    let k: Value = serde_norway::from_str(
        &fs::read_to_string(root().join("deploy/kustomization.yaml")).unwrap(),
    )
    .unwrap();
    let listed: Vec<&str> = k["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    let unique: BTreeSet<&str> = listed.iter().copied().collect();
    assert_eq!(unique.len(), listed.len(), "listed twice: {listed:?}");
    let files: BTreeSet<String> = deploy_manifests()
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
        .collect();
    assert_eq!(
        unique,
        files.iter().map(String::as_str).collect::<BTreeSet<_>>()
    );
    // The image it sets is the one the DaemonSet names.
    let objects = objects(&deploy_manifests());
    let ds = of_kind(&objects, "DaemonSet")[0];
    let image = ds["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap();
    assert_eq!(
        image,
        format!(
            "{}:{}",
            k["images"][0]["name"].as_str().unwrap(),
            k["images"][0]["newTag"].as_str().unwrap()
        )
    );
}

#[test]
fn the_daemonset_fits_the_agent() {
    let objects = objects(&deploy_manifests());
    let ds = of_kind(&objects, "DaemonSet")[0];
    let cm = of_kind(&objects, "ConfigMap")[0];
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    // Every node, whatever its taints.
    let tolerations = pod["tolerations"].as_sequence().unwrap();
    assert!(tolerations
        .iter()
        .any(|t| t["operator"] == "Exists" && t.get("key").is_none() && t.get("effect").is_none()));
    // A rolling update that never runs two agents on a node.
    let update = &ds["spec"]["updateStrategy"];
    assert_eq!(update["type"], "RollingUpdate");
    assert_eq!(update["rollingUpdate"]["maxSurge"], 0);

    let agent = pod["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "agent")
        .unwrap();
    assert_eq!(agent["args"][0], "agent");
    let security = &agent["securityContext"];
    assert_eq!(security["privileged"], false);
    assert_eq!(security["capabilities"]["drop"][0], "ALL");
    // NODE_NAME from the downward API; the rest from the ConfigMap.
    let env = agent["env"].as_sequence().unwrap();
    assert!(env
        .iter()
        .any(|e| e["name"] == "NODE_NAME"
            && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"));
    assert_eq!(
        agent["envFrom"][0]["configMapRef"]["name"],
        cm["metadata"]["name"]
    );
    // Every ConfigMap key is a variable `dp agent` reads (or the API
    // server's address, which the in-cluster config reads).
    let help = Command::new(env!("CARGO_BIN_EXE_dp"))
        .args(["agent", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for key in cm["data"].as_mapping().unwrap().keys() {
        let key = key.as_str().unwrap();
        if key.starts_with("KUBERNETES_SERVICE_") {
            continue;
        }
        assert!(
            help.contains(&format!("[env: {key}=")),
            "{key} is not a dp agent setting"
        );
    }
    // Probes on the health address the ConfigMap gives the agent.
    let healthz_port: u16 = cm["data"]["DP_HEALTHZ_ADDR"]
        .as_str()
        .unwrap()
        .rsplit_once(':')
        .unwrap()
        .1
        .parse()
        .unwrap();
    for (probe, path) in [("readinessProbe", "/healthz"), ("livenessProbe", "/livez")] {
        assert_eq!(agent[probe]["httpGet"]["path"], path);
        assert_eq!(agent[probe]["httpGet"]["port"], u64::from(healthz_port));
    }
    // The pins live in the host's bpffs, where the next pod finds them.
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["hostPath"]["path"] == "/sys/fs/bpf")
        .expect("a hostPath volume for /sys/fs/bpf");
    let mount = agent["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume["name"])
        .expect("the agent mounts it");
    assert_eq!(mount["mountPath"], "/sys/fs/bpf");
    assert_eq!(mount["mountPropagation"], "HostToContainer");
}

#[test]
fn the_kind_cluster_has_no_kube_proxy() {
    let config: Value =
        serde_norway::from_str(&fs::read_to_string(root().join("e2e/kind/cluster.yaml")).unwrap())
            .unwrap();
    assert_eq!(config["kind"], "Cluster");
    assert_eq!(config["apiVersion"], "kind.x-k8s.io/v1alpha4");
    assert_eq!(config["networking"]["kubeProxyMode"], "none");
    let cm: Value =
        serde_norway::from_str(&fs::read_to_string(root().join("deploy/configmap.yaml")).unwrap())
            .unwrap();
    assert_eq!(
        config["networking"]["podSubnet"],
        cm["data"]["DP_CLUSTER_CIDR"]
    );
    assert_eq!(
        config["networking"]["serviceSubnet"],
        cm["data"]["DP_SERVICE_CIDR"]
    );
}
