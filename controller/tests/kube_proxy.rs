//! kube-proxy's rules from dp's input (`dp::kube_proxy`): the generator
//! against the reference's worked example (kube-proxy's own test fixtures,
//! `tests/kube_proxy/reference-*.txt`, taken from
//! `../shared/reference/kube-proxy-rules.md`), loaded into the kernel and
//! listed back, and driven by real traffic in a namespace cluster in all
//! three modes: it load-balances, rejects and masquerades, and partial syncs
//! move new connections.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use dp::{
    kube_proxy::{
        apply::{Applier, Backend},
        iptables, nftables, ProxyConfig,
    },
    source::manifests::{self, Objects},
    translate::{service_ports, NodeInfo, ServicePortInfo},
};
use e2e::{parse_identity, tcp_echo_once, Cluster, Netns, Topology};

fn reference(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/kube_proxy")
        .join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.starts_with("rc=") && !l.starts_with("nftrc="))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn worked_example() -> Vec<ServicePortInfo> {
    let mut objects = Objects::default();
    manifests::load_str(
        &reference("worked-example.yaml"),
        "worked-example",
        &mut objects,
    );
    let node = NodeInfo {
        name: "node1".into(),
        ips: vec![Ipv4Addr::new(192, 168, 0, 2).into()],
        zone: None,
    };
    let mut skipped = Vec::new();
    let ports = service_ports(&objects.services, &objects.slices, &node, &mut skipped);
    assert!(skipped.is_empty(), "{skipped:?}");
    ports
}

/// `NewFakeProxier`'s settings: detect-local 10.0.0.0/8, node 192.168.0.2,
/// localhost NodePorts, nfacct counters present, no `--random-fully`.
fn fixture_config() -> ProxyConfig {
    ProxyConfig {
        cluster_cidr: Some("10.0.0.0/8".parse().unwrap()),
        node_ips: vec![Ipv4Addr::new(192, 168, 0, 2).into()],
        service_cidr: Some("172.30.0.0/16".parse().unwrap()),
        nfacct: true,
        random_fully: false,
        ..ProxyConfig::default()
    }
}

#[test]
fn iptables_restore_input_is_the_references() {
    let restore = iptables::restore(&worked_example(), &fixture_config(), None, &BTreeSet::new());
    assert_eq!(restore.text, reference("reference-iptables-restore.txt"));
}

#[test]
fn nftables_transaction_is_golden() {
    let tx = nftables::transaction(&worked_example(), &fixture_config(), None);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kube_proxy/nft-transaction.txt");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &tx.text).unwrap();
    }
    assert_eq!(tx.text, std::fs::read_to_string(&path).unwrap());
}

/// Runs `program args` in `ns` and returns its stdout.
fn output(ns: &Netns, program: &str, args: &[&str]) -> String {
    let out = ns.exec(program, args).unwrap();
    String::from_utf8(out.stdout).unwrap()
}

fn in_ns(ns: &Netns) -> Vec<std::ffi::OsString> {
    vec![
        "nsenter".into(),
        format!("--net={}", ns.path().display()).into(),
    ]
}

/// Without the parts that need objects kube-proxy creates outside the
/// restore input (nfacct counters, the canary chains of its monitor).
fn without_monitor(listing: &str) -> String {
    let mut out = String::new();
    let mut in_mangle = false;
    for line in listing.lines() {
        if line.starts_with('#') || line.contains("KUBE-PROXY-CANARY") {
            continue;
        }
        if line == "*mangle" {
            in_mangle = true;
        }
        if !in_mangle {
            out.push_str(line);
            out.push('\n');
        }
        if line == "COMMIT" {
            in_mangle = false;
        }
    }
    out
}

#[test]
fn iptables_rules_load_and_list_as_in_the_reference() {
    e2e::require_root();
    let mut topo = Topology::new().unwrap();
    topo.add_ns("kp-ipt").unwrap();
    let ns = topo.ns("kp-ipt");
    // kube-proxy without nfacct counters drops the localhost NodePort rule
    // and the counter match, as the reference's lab listing does.
    let config = ProxyConfig {
        nfacct: false,
        ..fixture_config()
    };
    let mut applier = Applier::new(Backend::IptablesNft, config, in_ns(ns));
    let report = applier.sync(&worked_example(), false).unwrap();
    assert!(report.full);
    let listing = output(ns, "iptables-nft-save", &[]);
    assert_eq!(
        without_monitor(&listing),
        without_monitor(&reference("reference-iptables-save.txt"))
    );
    applier.cleanup().unwrap();
    let after = output(ns, "iptables-nft-save", &[]);
    assert!(!after.contains("KUBE-"), "{after}");
}

#[test]
fn nftables_rules_load_and_list_as_in_the_reference() {
    e2e::require_root();
    let mut topo = Topology::new().unwrap();
    topo.add_ns("kp-nft").unwrap();
    let ns = topo.ns("kp-nft");
    let mut applier = Applier::new(Backend::Nftables, fixture_config(), in_ns(ns));
    applier.sync(&worked_example(), false).unwrap();
    let listing = output(ns, "nft", &["list", "table", "ip", "kube-proxy"]);
    assert_eq!(listing, reference("reference-nft-list.txt"));
    applier.cleanup().unwrap();
    assert_eq!(output(ns, "nft", &["list", "ruleset"]), "");
}

/// ns1/svc1 (ClusterIP, two endpoints), ns2/svc2 (no endpoints) and ns3/svc3
/// (NodePort 30003, the same two endpoints) on the namespace cluster.
fn cluster_services(svc1_endpoints: &[Ipv4Addr]) -> Vec<ServicePortInfo> {
    let list = |ips: &[Ipv4Addr]| -> String {
        ips.iter()
            .map(|ip| format!("- addresses: [{ip}]\n  nodeName: node1\n"))
            .collect()
    };
    let backends = [Ipv4Addr::new(10, 244, 1, 11), Ipv4Addr::new(10, 244, 1, 12)];
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: svc1, namespace: ns1}}\n\
         spec: {{clusterIP: 10.96.0.41, ports: [{{name: p80, port: 80, targetPort: 8080}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: svc1-a, namespace: ns1, labels: {{kubernetes.io/service-name: svc1}}}}\n\
         addressType: IPv4\nports: [{{name: p80, port: 8080}}]\nendpoints:\n{}---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: svc2, namespace: ns2}}\n\
         spec: {{clusterIP: 10.96.0.42, ports: [{{name: p80, port: 80}}]}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: svc3, namespace: ns3}}\n\
         spec: {{type: NodePort, clusterIP: 10.96.0.43, ports: [{{name: p80, port: 80, targetPort: 8080, nodePort: 30003}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: svc3-a, namespace: ns3, labels: {{kubernetes.io/service-name: svc3}}}}\n\
         addressType: IPv4\nports: [{{name: p80, port: 8080}}]\nendpoints:\n{}",
        list(svc1_endpoints),
        list(&backends)
    );
    let mut objects = Objects::default();
    manifests::load_str(&yaml, "test", &mut objects);
    let node = NodeInfo {
        name: "node1".into(),
        ips: vec![Ipv4Addr::new(172, 18, 0, 2).into()],
        zone: None,
    };
    let mut skipped = Vec::new();
    let ports = service_ports(&objects.services, &objects.slices, &node, &mut skipped);
    assert!(skipped.is_empty(), "{skipped:?}");
    ports
}

/// Which pod answered, and the client address it saw.
fn ask(ns: &Netns, to: SocketAddr) -> (String, SocketAddr) {
    let (reply, _) = tcp_echo_once(ns, to, b"hi", Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("{to}: {e}"));
    let (pod, seen, _) = parse_identity(&reply).unwrap();
    (pod, seen)
}

fn refused(ns: &Netns, to: SocketAddr) -> bool {
    ns.run(move || {
        std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2))
            .err()
            .map(|e| e.kind())
    })
    .unwrap()
        == Some(std::io::ErrorKind::ConnectionRefused)
}

fn traffic_in_mode(backend: Backend) {
    let cluster = Cluster::new(&[3]).unwrap();
    let _servers = cluster.serve_named_tcp(8080).unwrap();
    let node = cluster.node_ns(0);
    let config = ProxyConfig {
        cluster_cidr: Some("10.244.0.0/16".parse().unwrap()),
        node_ips: vec![Ipv4Addr::new(172, 18, 0, 2).into()],
        service_cidr: Some("10.96.0.0/16".parse().unwrap()),
        ..ProxyConfig::default()
    };
    let both = [Ipv4Addr::new(10, 244, 1, 11), Ipv4Addr::new(10, 244, 1, 12)];
    let mut applier = Applier::new(backend, config, in_ns(node));
    assert!(applier.sync(&cluster_services(&both), false).unwrap().full);
    let pod = cluster.pod_ns("pod-1-0");
    let svc1: SocketAddr = "10.96.0.41:80".parse().unwrap();

    // Load-balanced over both endpoints; pod traffic is not masqueraded.
    let mut answered = BTreeSet::new();
    for _ in 0..40 {
        let (who, seen) = ask(pod, svc1);
        assert_eq!(seen.ip(), Ipv4Addr::new(10, 244, 1, 10), "{backend:?}");
        answered.insert(who);
    }
    assert_eq!(
        answered,
        BTreeSet::from(["pod-1-1".to_string(), "pod-1-2".to_string()]),
        "{backend:?}"
    );
    // No endpoints: refused at once.
    assert!(
        refused(pod, "10.96.0.42:80".parse().unwrap()),
        "{backend:?}"
    );
    // NodePort from outside: DNATed and masqueraded to the node's address
    // on the device towards the backend (MASQUERADE): for a pod on this node
    // the pod gateway on its veth, as kindnet's ptp plugin sets it up.
    let (who, seen) = ask(cluster.client_ns(), "172.18.0.2:30003".parse().unwrap());
    assert!(who == "pod-1-1" || who == "pod-1-2", "{who}");
    assert_eq!(seen.ip(), e2e::cluster::pod_gateway(0), "{backend:?}");

    // A partial sync: svc1 loses pod-1-1; new connections all go to pod-1-2
    // and the endpoint's chain is gone.
    let report = applier.sync(&cluster_services(&both[1..]), false).unwrap();
    assert!(!report.full);
    for _ in 0..20 {
        assert_eq!(ask(pod, svc1).0, "pod-1-2", "{backend:?}");
    }
    let listing = match backend {
        Backend::Nftables => output(node, "nft", &["list", "ruleset"]),
        Backend::IptablesNft => output(node, "iptables-nft-save", &[]),
        Backend::IptablesLegacy => output(node, "iptables-legacy-save", &[]),
    };
    let gone = match backend {
        Backend::Nftables => "ns1/svc1/tcp/p80__10.244.1.11/8080".to_string(),
        _ => {
            let sp = &cluster_services(&both)[0];
            let ep = &sp.cluster.ready[0];
            assert_eq!(ep.addr.ip(), both[0]);
            iptables::sep_chain(sp, ep)
        }
    };
    assert!(!listing.contains(&gone), "{backend:?}: {gone} still there");
    // svc3's rules were not rewritten, and still work.
    assert_eq!(
        ask(cluster.client_ns(), "172.18.0.2:30003".parse().unwrap())
            .1
            .ip(),
        e2e::cluster::pod_gateway(0)
    );
    applier.cleanup().unwrap();
}

#[test]
fn iptables_nft_mode_balances_rejects_and_masquerades() {
    e2e::require_root();
    traffic_in_mode(Backend::IptablesNft);
}

#[test]
fn iptables_legacy_mode_balances_rejects_and_masquerades() {
    e2e::require_root();
    traffic_in_mode(Backend::IptablesLegacy);
}

#[test]
fn nftables_mode_balances_rejects_and_masquerades() {
    e2e::require_root();
    traffic_in_mode(Backend::Nftables);
}

#[test]
fn cli_prints_the_same_transaction() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kube_proxy");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dp"))
        .args(["kube-proxy-rules", "--mode", "nftables", "--manifests"])
        .arg(&dir)
        .args(["--node-name", "node1", "--node-ip", "192.168.0.2"])
        .args([
            "--cluster-cidr",
            "10.0.0.0/8",
            "--service-cidr",
            "172.30.0.0/16",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        std::fs::read_to_string(dir.join("nft-transaction.txt")).unwrap()
    );
}

#[test]
fn source_ranges_allow_the_lb_ip_when_a_range_holds_the_node() {
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: lb, namespace: ns}\n\
        spec: {type: LoadBalancer, clusterIP: 172.30.0.50, loadBalancerSourceRanges: [192.168.0.0/24, 203.0.113.0/24],\n\
        \x20 ports: [{name: p80, port: 80, nodePort: 30050}]}\n\
        status: {loadBalancer: {ingress: [{ip: 1.2.3.4}]}}\n---\n\
        apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
        metadata: {name: lb-a, namespace: ns, labels: {kubernetes.io/service-name: lb}}\n\
        addressType: IPv4\nports: [{name: p80, port: 80}]\nendpoints: [{addresses: [10.180.0.1]}]\n";
    let mut objects = Objects::default();
    manifests::load_str(yaml, "lb", &mut objects);
    let node = NodeInfo {
        name: "node1".into(),
        ips: vec![Ipv4Addr::new(192, 168, 0, 2).into()],
        zone: None,
    };
    let ports = service_ports(&objects.services, &objects.slices, &node, &mut Vec::new());
    let config = fixture_config();
    let fw = format!("KUBE-FW-{}", iptables::service_hash(&ports[0]));
    let text = iptables::restore(&ports, &config, None, &BTreeSet::new()).text;
    let fw_rules: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(&format!("-A {fw} ")))
        .collect();
    assert_eq!(fw_rules.len(), 4, "{text}");
    assert!(
        fw_rules[0].contains("-s 192.168.0.0/24 -j KUBE-EXT-"),
        "{text}"
    );
    assert!(
        fw_rules[1].contains("-s 203.0.113.0/24 -j KUBE-EXT-"),
        "{text}"
    );
    assert!(fw_rules[2].contains("-s 1.2.3.4 -j KUBE-EXT-"), "{text}");
    assert!(
        text.contains(&format!("traffic not accepted by {fw}")),
        "{text}"
    );
    let tx = nftables::transaction(&ports, &config, None).text;
    assert!(
        tx.contains("ip saddr != { 192.168.0.0/24, 203.0.113.0/24, 1.2.3.4 } drop"),
        "{tx}"
    );
}
