//! `dp cleanup-kube-proxy` on a node kube-proxy left behind: a network
//! namespace with kube-proxy's rules as it writes them (`dp
//! kube-proxy-rules --apply`, iptables mode through iptables-nft and
//! iptables-legacy, and nftables mode), kubelet's chains, and a CNI's
//! masquerade chain, for IPv4 and IPv6 (`ip6tables-*`, `table ip6
//! kube-proxy`: a dual-stack node's second proxier). Afterwards kube-proxy's
//! chains, jump rules and tables are gone, the others are as they were, and
//! a second run finds nothing.
//! Without the privileges to read a table it fails instead.

use std::path::Path;

use e2e::{require_root, Netns, Topology};

fn in_ns(ns: &Netns, args: &[&str]) -> String {
    e2e::stdout_of(ns.command(args[0]).args(&args[1..]))
}

fn dp(ns: &Netns, args: &[&str]) -> String {
    e2e::stdout_of(ns.command(env!("CARGO_BIN_EXE_dp")).args(args))
}

/// Every chain name and every jump target in an `iptables-save` listing.
fn chains_and_targets(save: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in save.lines() {
        if let Some(chain) = line.strip_prefix(':') {
            out.push(chain.split_whitespace().next().unwrap().to_string());
        }
        if line.starts_with("-A ") {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let Some(i) = words.iter().position(|w| *w == "-j") {
                out.push(words[i + 1].to_string());
            }
        }
    }
    out
}

/// What is not kube-proxy's: kubelet's chains and a CNI's masquerade chain.
const OTHERS: &str = "*nat
:KUBE-KUBELET-CANARY - [0:0]
:KIND-MASQ-AGENT - [0:0]
-A POSTROUTING -m addrtype ! --dst-type LOCAL -m comment --comment kind-masq-agent -j KIND-MASQ-AGENT
-A KIND-MASQ-AGENT -d 10.244.0.0/16 -m comment --comment kind-masq-agent -j RETURN
-A KIND-MASQ-AGENT -m comment --comment kind-masq-agent -j MASQUERADE
COMMIT
*filter
:KUBE-FIREWALL - [0:0]
-A INPUT -j KUBE-FIREWALL
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
COMMIT
";

/// The same for IPv6.
const OTHERS6: &str = "*nat
:KUBE-KUBELET-CANARY - [0:0]
:KIND-MASQ-AGENT - [0:0]
-A POSTROUTING -m addrtype ! --dst-type LOCAL -m comment --comment kind-masq-agent -j KIND-MASQ-AGENT
-A KIND-MASQ-AGENT -d fd00:10:244::/56 -m comment --comment kind-masq-agent -j RETURN
-A KIND-MASQ-AGENT -m comment --comment kind-masq-agent -j MASQUERADE
COMMIT
*filter
:KUBE-FIREWALL - [0:0]
-A INPUT -j KUBE-FIREWALL
COMMIT
";

#[test]
fn kube_proxys_leftovers_go_and_everything_else_stays() {
    require_root();
    let mut topo = Topology::new().unwrap();
    let ns = topo.add_ns("node").unwrap();
    let manifests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let manifests = manifests.to_str().unwrap();
    let common = [
        "kube-proxy-rules",
        "--manifests",
        manifests,
        "--node-name",
        "node1",
        "--node-ip",
        "172.18.0.2",
        "--cluster-cidr",
        "10.244.0.0/16",
        "--service-cidr",
        "10.96.0.0/16",
        "--apply",
    ];
    // IPv6 (and the IPv4 half of its dual-stack Service) first: the runs
    // after it, on an IPv4-only node, leave the IPv6 rules alone.
    let ipv6_manifests = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kube_proxy/ipv6");
    let dual = [
        "kube-proxy-rules",
        "--manifests",
        ipv6_manifests.to_str().unwrap(),
        "--node-name",
        "node1",
        "--node-ip",
        "172.18.0.2",
        "--node-ip",
        "fc00:f853:ccd:e793::2",
        "--cluster-cidr",
        "10.244.0.0/16,fd00:10:244::/56",
        "--service-cidr",
        "10.96.0.0/16,fd00:10:96::/112",
        "--apply",
    ];
    for mode in [
        &["--mode", "iptables"][..],
        &["--mode", "iptables", "--legacy"],
        &["--mode", "nftables"],
    ] {
        dp(ns, &[&dual[..], mode].concat());
    }
    dp(ns, &[&common[..], &["--mode", "iptables"]].concat());
    dp(
        ns,
        &[&common[..], &["--mode", "iptables", "--legacy"]].concat(),
    );
    dp(ns, &[&common[..], &["--mode", "nftables"]].concat());
    for (tool, others) in [
        ("iptables-nft-restore", OTHERS),
        ("iptables-legacy-restore", OTHERS),
        ("ip6tables-nft-restore", OTHERS6),
        ("ip6tables-legacy-restore", OTHERS6),
    ] {
        let mut child = ns
            .command(tool)
            .arg("--noflush")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), others.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "{tool}");
    }
    let saves = [
        ("iptables-nft-save", OTHERS),
        ("iptables-legacy-save", OTHERS),
        ("ip6tables-nft-save", OTHERS6),
        ("ip6tables-legacy-save", OTHERS6),
    ];
    // kube-proxy's rules are there to begin with.
    for (save, _) in saves {
        let before = chains_and_targets(&in_ns(ns, &[save]));
        assert!(before.iter().any(|c| c.starts_with("KUBE-SVC-")), "{save}");
        assert!(before.iter().any(|c| c == "KUBE-SERVICES"), "{save}");
    }
    let tables = in_ns(ns, &["nft", "list", "tables"]);
    assert!(tables.contains("table ip kube-proxy"), "{tables}");
    assert!(tables.contains("table ip6 kube-proxy"), "{tables}");

    // Without NET_RAW (as in the agent's container) iptables-legacy cannot
    // read its tables: that is an error, never "nothing found".
    let denied = ns
        .command("setpriv")
        .args([
            "--bounding-set=-all,+bpf,+perfmon,+net_admin",
            "--inh-caps=-all",
        ])
        .args([env!("CARGO_BIN_EXE_dp"), "cleanup-kube-proxy", "--dry-run"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(!denied.status.success(), "{stderr}");
    assert!(
        stderr.contains("iptables-legacy: listing table"),
        "{stderr}"
    );

    let dry = dp(ns, &["cleanup-kube-proxy", "--dry-run"]);
    assert!(dry.contains("would remove iptables-nft nat:"), "{dry}");
    // A dry run changes nothing.
    assert!(in_ns(ns, &["iptables-nft-save"]).contains(":KUBE-SERVICES"));

    let report = dp(ns, &["cleanup-kube-proxy"]);
    for expected in [
        "removed iptables-nft nat:",
        "removed iptables-nft filter:",
        "removed iptables-legacy nat:",
        "removed iptables-legacy filter:",
        "removed ip6tables-nft nat:",
        "removed ip6tables-nft filter:",
        "removed ip6tables-legacy nat:",
        "removed ip6tables-legacy filter:",
        "removed nftables: table ip kube-proxy",
        "removed nftables: table ip6 kube-proxy",
    ] {
        assert!(report.contains(expected), "{expected}: {report}");
    }
    for (save, others) in saves {
        let listing = in_ns(ns, &[save]);
        let after = chains_and_targets(&listing);
        let kube_proxys: Vec<&String> = after
            .iter()
            .filter(|c| c.starts_with("KUBE-"))
            .filter(|c| !["KUBE-KUBELET-CANARY", "KUBE-FIREWALL"].contains(&c.as_str()))
            .collect();
        assert!(kube_proxys.is_empty(), "{save}: {kube_proxys:?}\n{listing}");
        // The others, with every rule.
        for rule in others.lines().filter(|l| l.starts_with(['-', ':'])) {
            assert!(
                listing.contains(rule.trim_end_matches(" [0:0]")),
                "{save} lost {rule}\n{listing}"
            );
        }
    }
    assert!(!in_ns(ns, &["nft", "list", "tables"]).contains("kube-proxy"));
    assert_eq!(
        dp(ns, &["cleanup-kube-proxy"]).trim(),
        "nothing of kube-proxy's found"
    );
}
