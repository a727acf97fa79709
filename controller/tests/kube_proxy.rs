//! kube-proxy's rules from dp's input (`dp::kube_proxy`): the generator
//! against the reference's worked example (kube-proxy's own test fixtures,
//! `tests/kube_proxy/reference-*.txt`, taken from
//! `../shared/reference/kube-proxy-rules.md`), loaded into the kernel and
//! listed back, and driven by real traffic in a namespace cluster in all
//! three modes: it load-balances, rejects and masquerades, and partial syncs
//! move new connections. The same for IPv6 (`tests/kube_proxy/ipv6/`: an
//! IPv6 and dual-stack example, its `ip6tables-restore` input and `ip6`
//! transaction, their listings after loading), and over IPv6 in a
//! dual-stack namespace cluster.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use dp::{
    kube_proxy::{
        apply::{Applier, Backend},
        iptables, nftables, ProxyConfig,
    },
    source::manifests::{self, Objects},
    translate::{service_ports, IpFamily, NodeInfo, ServicePortInfo},
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
        cluster_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
        node_ips: vec![Ipv4Addr::new(192, 168, 0, 2).into()],
        service_cidrs: vec!["172.30.0.0/16".parse().unwrap()],
        nfacct: true,
        random_fully: false,
        ..ProxyConfig::default()
    }
}

#[test]
fn iptables_restore_input_is_the_references() {
    let restore = iptables::restore(
        &worked_example(),
        &fixture_config(),
        IpFamily::V4,
        None,
        &BTreeSet::new(),
    );
    assert_eq!(restore.text, reference("reference-iptables-restore.txt"));
}

#[test]
fn nftables_transaction_is_golden() {
    let tx = nftables::transaction(&worked_example(), &fixture_config(), IpFamily::V4, None);
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
        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        node_ips: vec![Ipv4Addr::new(172, 18, 0, 2).into()],
        service_cidrs: vec!["10.96.0.0/16".parse().unwrap()],
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
    let text = iptables::restore(&ports, &config, IpFamily::V4, None, &BTreeSet::new()).text;
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
    let tx = nftables::transaction(&ports, &config, IpFamily::V4, None).text;
    assert!(
        tx.contains("ip saddr != { 192.168.0.0/24, 203.0.113.0/24, 1.2.3.4 } drop"),
        "{tx}"
    );
}

// IPv6: kube-proxy's IPv6 proxier's rules (`ip6tables-restore` input,
// `table ip6 kube-proxy`), golden files under tests/kube_proxy/ipv6/.

const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);

/// The IPv6 worked example (its file says what is in it) as node1 sees it.
fn ipv6_example() -> Vec<ServicePortInfo> {
    let mut objects = Objects::default();
    manifests::load_str(
        &reference("ipv6/worked-example.yaml"),
        "ipv6/worked-example",
        &mut objects,
    );
    let node = NodeInfo {
        name: "node1".into(),
        ips: vec![Ipv4Addr::new(192, 168, 0, 2).into(), NODE_IP6.into()],
        zone: None,
    };
    let mut skipped = Vec::new();
    let ports = service_ports(&objects.services, &objects.slices, &node, &mut skipped);
    assert!(skipped.is_empty(), "{skipped:?}");
    ports
}

/// The fixture's settings on a dual-stack node: each family's own cluster
/// CIDR, Service CIDR and node IP.
fn ipv6_config() -> ProxyConfig {
    ProxyConfig {
        cluster_cidrs: vec![
            "10.0.0.0/8".parse().unwrap(),
            "fd00:10::/32".parse().unwrap(),
        ],
        node_ips: vec![Ipv4Addr::new(192, 168, 0, 2).into(), NODE_IP6.into()],
        service_cidrs: vec![
            "172.30.0.0/16".parse().unwrap(),
            "fd00:172:30::/112".parse().unwrap(),
        ],
        nfacct: true,
        random_fully: false,
        ..ProxyConfig::default()
    }
}

/// Compares `text` with the golden file `name` (rewritten first with
/// UPDATE_GOLDEN set).
fn assert_golden(text: &str, name: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/kube_proxy")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, text).unwrap();
    }
    let golden =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(text, golden, "{name}");
}

#[test]
fn ip6tables_restore_input_is_golden() {
    let ports = ipv6_example();
    let restore = iptables::restore(&ports, &ipv6_config(), IpFamily::V6, None, &BTreeSet::new());
    assert_golden(&restore.text, "ipv6/ip6tables-restore.txt");
    let text = &restore.text;
    // Not IPv4's: no route_localnet guard, no localhost NodePort, no IPv4
    // address; NodePorts never on ::1.
    assert!(!text.contains("KUBE-FIREWALL"), "{text}");
    assert!(!text.contains("localhost_nps"), "{text}");
    assert!(!text.contains("172.30.0.41"), "{text}");
    assert!(text.contains("-m addrtype --dst-type LOCAL ! -d ::1/128 -j KUBE-NODEPORTS"));
    // The dual-stack Service's IPv4 half is the IPv4 input's, with the
    // same chain name (the hash input has no address).
    let v4 = iptables::restore(&ports, &ipv6_config(), IpFamily::V4, None, &BTreeSet::new()).text;
    assert!(v4.contains("-d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O"));
    assert!(text.contains("-d fd00:172:30::41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O"));
    assert!(!v4.contains("fd00:"), "{v4}");
}

#[test]
fn nftables_ip6_transaction_is_golden() {
    let ports = ipv6_example();
    let tx = nftables::transaction(&ports, &ipv6_config(), IpFamily::V6, None);
    assert_golden(&tx.text, "ipv6/nft-transaction.txt");
    assert!(tx.text.lines().all(|l| l.contains(" ip6 kube-proxy ")));
    let v4 = nftables::transaction(&ports, &ipv6_config(), IpFamily::V4, None).text;
    assert!(v4.lines().all(|l| l.contains(" ip kube-proxy ")));
    assert!(!v4.contains("fd00:") && !v4.contains("2001:db8"), "{v4}");
}

#[test]
fn cli_prints_the_ipv6_rules_with_family_ipv6() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kube_proxy");
    // The CLI's defaults: no nfacct counters, MASQUERADE --random-fully.
    let config = ProxyConfig {
        nfacct: false,
        random_fully: true,
        ..ipv6_config()
    };
    let empty = BTreeSet::new();
    for (mode, expected) in [
        (
            "iptables",
            iptables::restore(&ipv6_example(), &config, IpFamily::V6, None, &empty).text,
        ),
        (
            "nftables",
            nftables::transaction(&ipv6_example(), &config, IpFamily::V6, None).text,
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_dp"))
            .args(["kube-proxy-rules", "--mode", mode, "--family", "ipv6"])
            .arg("--manifests")
            .arg(dir.join("ipv6"))
            .args(["--node-ip", "192.168.0.2", "--node-ip", "2001:db8::2"])
            .args(["--cluster-cidr", "10.0.0.0/8,fd00:10::/32"])
            .args(["--service-cidr", "172.30.0.0/16,fd00:172:30::/112"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8(out.stdout).unwrap(), expected, "{mode}");
    }
}

/// The `ip6tables-save` or `nft list` listing of the IPv6 rules as loaded.
fn ipv6_listing(ns: &Netns, backend: Backend) -> String {
    match backend {
        Backend::IptablesNft => without_monitor(&output(ns, "ip6tables-nft-save", &[])),
        Backend::IptablesLegacy => without_monitor(&output(ns, "ip6tables-legacy-save", &[])),
        Backend::Nftables => output(ns, "nft", &["list", "table", "ip6", "kube-proxy"]),
    }
}

#[test]
fn ipv6_rules_load_and_list_as_golden() {
    e2e::require_root();
    for (backend, golden) in [
        (Backend::IptablesNft, Some("ipv6/ip6tables-nft-save.txt")),
        (Backend::IptablesLegacy, None),
        (Backend::Nftables, Some("ipv6/nft-list.txt")),
    ] {
        let mut topo = Topology::new().unwrap();
        let ns = topo.add_ns("kp-ip6").unwrap();
        // Without nfacct counters, as the IPv4 listing (none are used for
        // IPv6 but the INVALID drop's).
        let config = ProxyConfig {
            nfacct: false,
            ..ipv6_config()
        };
        let mut applier = Applier::new(backend, config, in_ns(ns));
        assert!(applier.sync(&ipv6_example(), false).unwrap().full);
        let listing = ipv6_listing(ns, backend);
        match golden {
            Some(name) => assert_golden(&listing, name),
            None => {
                for line in [
                    "-j REJECT --reject-with icmp6-port-unreachable",
                    "-d fd00:172:30::42/128",
                    "! -d ::1/128",
                    "-j DNAT --to-destination [fd00:10:180::10]:80",
                    "-s fd00:10:180::10/128",
                ] {
                    assert!(listing.contains(line), "{backend:?}: {line}\n{listing}");
                }
            }
        }
        // The IPv4 half went to the IPv4 tables.
        let v4 = match backend {
            Backend::IptablesNft => output(ns, "iptables-nft-save", &["-t", "nat"]),
            Backend::IptablesLegacy => output(ns, "iptables-legacy-save", &["-t", "nat"]),
            Backend::Nftables => output(ns, "nft", &["list", "table", "ip", "kube-proxy"]),
        };
        assert!(v4.contains("10.180.0.1"), "{backend:?}: {v4}");
        assert!(!v4.contains("fd00:"), "{backend:?}: {v4}");
        applier.cleanup().unwrap();
        let after = match backend {
            Backend::Nftables => output(ns, "nft", &["list", "ruleset"]),
            Backend::IptablesNft => output(ns, "ip6tables-nft-save", &[]),
            Backend::IptablesLegacy => output(ns, "ip6tables-legacy-save", &[]),
        };
        assert!(
            !after.contains("KUBE-") && !after.contains("kube-proxy"),
            "{backend:?}: {after}"
        );
    }
}

/// ns1/svc1 (dual-stack ClusterIP, two endpoints per family), ns2/svc2
/// (IPv6, no endpoints) and ns3/svc3 (IPv6 NodePort 30003, the same two
/// endpoints) on the dual-stack namespace cluster; `svc1_pods` indexes
/// node1's pods.
fn dual_stack_services(svc1_pods: &[u16]) -> Vec<ServicePortInfo> {
    let v4 = |pods: &[u16]| -> String {
        pods.iter()
            .map(|j| format!("- addresses: [10.244.1.{}]\n  nodeName: node1\n", 10 + j))
            .collect()
    };
    let v6 = |pods: &[u16]| -> String {
        pods.iter()
            .map(|&j| {
                let ip = e2e::cluster::pod_address6(0, usize::from(j));
                format!("- addresses: [\"{ip}\"]\n  nodeName: node1\n")
            })
            .collect()
    };
    let slice = |name: &str, svc: &str, ns: &str, family: &str, endpoints: String| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}, namespace: {ns}, labels: {{kubernetes.io/service-name: {svc}}}}}\n\
             addressType: {family}\nports: [{{name: p80, port: 8080}}]\nendpoints:\n{endpoints}---\n"
        )
    };
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: svc1, namespace: ns1}}\n\
         spec: {{ipFamilyPolicy: RequireDualStack, ipFamilies: [IPv4, IPv6], clusterIP: 10.96.0.41,\n\
         \x20 clusterIPs: [10.96.0.41, \"fd00:10:96::41\"], ports: [{{name: p80, port: 80, targetPort: 8080}}]}}\n---\n\
         {}{}\
         apiVersion: v1\nkind: Service\nmetadata: {{name: svc2, namespace: ns2}}\n\
         spec: {{ipFamilies: [IPv6], clusterIP: \"fd00:10:96::42\", ports: [{{name: p80, port: 80}}]}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: svc3, namespace: ns3}}\n\
         spec: {{type: NodePort, ipFamilies: [IPv6], clusterIP: \"fd00:10:96::43\",\n\
         \x20 ports: [{{name: p80, port: 80, targetPort: 8080, nodePort: 30003}}]}}\n---\n\
         {}",
        slice("svc1-v4", "svc1", "ns1", "IPv4", v4(svc1_pods)),
        slice("svc1-v6", "svc1", "ns1", "IPv6", v6(svc1_pods)),
        slice("svc3-v6", "svc3", "ns3", "IPv6", v6(&[1, 2])),
    );
    let mut objects = Objects::default();
    manifests::load_str(&yaml, "dual", &mut objects);
    let node = NodeInfo {
        name: "node1".into(),
        ips: vec![
            Ipv4Addr::new(172, 18, 0, 2).into(),
            e2e::cluster::node_network6(2).into(),
        ],
        zone: None,
    };
    let mut skipped = Vec::new();
    let ports = service_ports(&objects.services, &objects.slices, &node, &mut skipped);
    assert!(skipped.is_empty(), "{skipped:?}");
    assert_eq!(ports.len(), 4, "{ports:?}");
    ports
}

/// Whether a TCP connection to `to` is refused. IPv6 gets a few seconds:
/// the ICMPv6 error may be seen only on the SYN's retransmission.
fn refused_within(ns: &Netns, to: SocketAddr, limit: Duration) -> bool {
    ns.run(move || {
        std::net::TcpStream::connect_timeout(&to, limit)
            .err()
            .map(|e| e.kind())
    })
    .unwrap()
        == Some(std::io::ErrorKind::ConnectionRefused)
}

fn ipv6_traffic_in_mode(backend: Backend) {
    let cluster = Cluster::new_dual(&[3]).unwrap();
    let _servers = cluster.serve_named_tcp(8080).unwrap();
    let node = cluster.node_ns(0);
    let node_ip6 = e2e::cluster::node_network6(2);
    let config = ProxyConfig {
        cluster_cidrs: vec![
            "10.244.0.0/16".parse().unwrap(),
            "fd00:10:244::/56".parse().unwrap(),
        ],
        node_ips: vec![Ipv4Addr::new(172, 18, 0, 2).into(), node_ip6.into()],
        service_cidrs: vec![
            e2e::cluster::SERVICE_CIDR.parse().unwrap(),
            e2e::cluster::SERVICE_CIDR6.parse().unwrap(),
        ],
        ..ProxyConfig::default()
    };
    let mut applier = Applier::new(backend, config, in_ns(node));
    assert!(
        applier
            .sync(&dual_stack_services(&[1, 2]), false)
            .unwrap()
            .full
    );
    let pod = cluster.pod_ns("pod-1-0");
    let pod_ip6 = e2e::cluster::pod_address6(0, 0);
    let svc1_v6: SocketAddr = "[fd00:10:96::41]:80".parse().unwrap();
    let svc1_v4: SocketAddr = "10.96.0.41:80".parse().unwrap();
    let both = BTreeSet::from(["pod-1-1".to_string(), "pod-1-2".to_string()]);

    // Balanced over both endpoints in each family; pod traffic is not
    // masqueraded.
    for (svc, client_ip) in [
        (svc1_v6, IpAddr::from(pod_ip6)),
        (svc1_v4, Ipv4Addr::new(10, 244, 1, 10).into()),
    ] {
        let mut answered = BTreeSet::new();
        for _ in 0..40 {
            let (who, seen) = ask(pod, svc);
            assert_eq!(seen.ip(), client_ip, "{backend:?} {svc}");
            answered.insert(who);
        }
        assert_eq!(answered, both, "{backend:?} {svc}");
    }
    // No endpoints: refused (ICMPv6 port unreachable), not dropped.
    let svc2: SocketAddr = "[fd00:10:96::42]:80".parse().unwrap();
    assert!(
        refused_within(pod, svc2, Duration::from_secs(5)),
        "{backend:?}"
    );
    // From outside the cluster CIDR: the ClusterIP and the NodePort on the
    // node's IPv6 address, DNATed and masqueraded to the node's address
    // towards the backend (its pod gateway).
    let gateway6 = IpAddr::from(e2e::cluster::pod_gateway6(0));
    let nodeport = SocketAddr::new(node_ip6.into(), 30003);
    for to in [svc1_v6, nodeport] {
        let (who, seen) = ask(cluster.client_ns(), to);
        assert!(both.contains(&who), "{backend:?} {to}: {who}");
        assert_eq!(seen.ip(), gateway6, "{backend:?} {to}");
    }

    // A partial sync: svc1 loses pod-1-1 (both families); new connections
    // all go to pod-1-2 and the IPv6 endpoint's chain is gone.
    let report = applier.sync(&dual_stack_services(&[2]), false).unwrap();
    assert!(!report.full);
    for svc in [svc1_v6, svc1_v4] {
        for _ in 0..20 {
            assert_eq!(ask(pod, svc).0, "pod-1-2", "{backend:?} {svc}");
        }
    }
    let gone = match backend {
        Backend::Nftables => "ns1/svc1/tcp/p80__fd00.10.244.1..11/8080".to_string(),
        _ => {
            let ports = dual_stack_services(&[1, 2]);
            let sp = ports
                .iter()
                .find(|sp| sp.family == IpFamily::V6 && sp.service.name == "svc1")
                .unwrap();
            let ep = &sp.cluster.ready[0];
            assert_eq!(ep.addr.ip(), IpAddr::from(e2e::cluster::pod_address6(0, 1)));
            iptables::sep_chain(sp, ep)
        }
    };
    let listing = ipv6_listing(node, backend);
    assert!(!listing.contains(&gone), "{backend:?}: {gone} still there");
    // svc3's rules were not rewritten, and still work.
    assert_eq!(ask(cluster.client_ns(), nodeport).1.ip(), gateway6);
    applier.cleanup().unwrap();
    let after = match backend {
        Backend::Nftables => output(node, "nft", &["list", "ruleset"]),
        _ => ipv6_listing(node, backend),
    };
    assert!(
        !after.contains("KUBE-") && !after.contains("kube-proxy"),
        "{backend:?}: {after}"
    );
}

#[test]
fn ip6tables_nft_mode_balances_rejects_and_masquerades_over_ipv6() {
    e2e::require_root();
    ipv6_traffic_in_mode(Backend::IptablesNft);
}

#[test]
fn ip6tables_legacy_mode_balances_rejects_and_masquerades_over_ipv6() {
    e2e::require_root();
    ipv6_traffic_in_mode(Backend::IptablesLegacy);
}

#[test]
fn nftables_ip6_mode_balances_rejects_and_masquerades_over_ipv6() {
    e2e::require_root();
    ipv6_traffic_in_mode(Backend::Nftables);
}
