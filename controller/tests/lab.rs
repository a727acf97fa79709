//! `dp lab` driven as a user drives it: the `dp` binary's `lab up`, `exec`
//! (with curl, dig and nc inside the lab), `apply`, `status` and `down`, in
//! dp mode and in kube-proxy's iptables mode. The clients must see the same
//! things in both: which endpoints answer, refused against timed out, and
//! the client address the pod saw.

use std::{
    collections::BTreeSet,
    fs,
    path::Path,
    process::{Command, Output},
};

const DP: &str = env!("CARGO_BIN_EXE_dp");

fn dp(args: &[&str]) -> Output {
    Command::new(DP).args(args).output().expect("run dp")
}

fn dp_ok(args: &[&str]) -> String {
    let out = dp(args);
    assert!(
        out.status.success(),
        "dp {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A lab of this test process, taken down when dropped (also on panic).
struct TestLab {
    name: String,
}

impl TestLab {
    fn up(tag: &str, mode: &str) -> TestLab {
        Self::up_with(tag, mode, "ipv4")
    }

    /// `dp lab up --mode MODE --ip-family FAMILY`.
    fn up_with(tag: &str, mode: &str, family: &str) -> TestLab {
        e2e::require_root();
        sweep_dead_test_labs();
        let lab = TestLab {
            name: format!("t{tag}{}", std::process::id()),
        };
        let out = dp_ok(&[
            "lab",
            "up",
            "--name",
            &lab.name,
            "--mode",
            mode,
            "--ip-family",
            family,
        ]);
        assert!(out.contains(&format!("({mode} mode")), "{out}");
        lab
    }

    /// `dp lab exec NAME MEMBER -- ARGS`.
    fn exec(&self, member: &str, args: &[&str]) -> Output {
        let mut all = vec!["lab", "exec", "--name", &self.name, member, "--"];
        all.extend_from_slice(args);
        dp(&all)
    }

    fn curl(&self, member: &str, url: &str) -> Seen {
        // IPv6 TCP is refused on the SYN's retransmission, a second in
        // (the kernel's own REJECT too: see controller/tests/dual_stack.rs),
        // so a refusal needs longer than one second to show.
        let timeout = if url.contains('[') { "3" } else { "1" };
        let out = self.exec(member, &["curl", "-sSv", "--connect-timeout", timeout, url]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        match out.status.code() {
            Some(0) => Seen::answer(&String::from_utf8_lossy(&out.stdout)),
            Some(7) if stderr.contains("Connection refused") => Seen::Refused,
            Some(28) => Seen::TimedOut,
            other => panic!("curl {url} from {member}: {other:?} {stderr}"),
        }
    }

    fn dig(&self, member: &str, server: &str) -> Seen {
        let at = format!("@{server}");
        let out = self.exec(
            member,
            &["dig", &at, "+short", "+time=1", "+tries=1", "TXT", "x"],
        );
        assert!(out.status.success(), "{out:?}");
        Seen::answer(&String::from_utf8_lossy(&out.stdout).replace('"', ""))
    }

    fn path(&self) -> std::path::PathBuf {
        Path::new("/run/dp-lab").join(&self.name)
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        let _ = dp(&["lab", "down", "--name", &self.name]);
    }
}

/// Labs `t<tag><pid>` of test processes that died without taking them down.
fn sweep_dead_test_labs() {
    let Ok(entries) = fs::read_dir("/run/dp-lab") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid: String = name
            .chars()
            .rev()
            .take_while(char::is_ascii_digit)
            .collect();
        let pid: String = pid.chars().rev().collect();
        if name.starts_with('t') && !pid.is_empty() && !Path::new("/proc").join(&pid).exists() {
            let _ = dp(&["lab", "down", "--name", &name]);
        }
    }
}

/// What one request got.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Seen {
    /// By this pod, which saw this client address.
    Answer {
        pod: String,
        client: String,
    },
    Refused,
    TimedOut,
}

impl Seen {
    /// `pod=P node=N client=IP:PORT` (the lab's servers' reply).
    fn answer(text: &str) -> Seen {
        let line = text
            .lines()
            .find(|l| l.starts_with("pod="))
            .unwrap_or_else(|| panic!("no identity in {text:?}"));
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(k))
                .unwrap_or_else(|| panic!("no {k} in {line:?}"))
                .to_string()
        };
        let client: std::net::SocketAddr = field("client=").parse().unwrap();
        Seen::Answer {
            pod: field("pod="),
            client: as_node(&client.ip().to_string()),
        }
    }
}

/// A node's pod gateway (10.244.N.1, on every pod veth of node N) stands for
/// the node's address (172.18.0.N+1). kube-proxy's MASQUERADE takes the
/// address of the device a packet leaves by, so a backend on the entry
/// node sees the gateway on its veth (as on a kind node with kindnet);
/// dp masquerades to the node's address, as Cilium does. Both are the
/// node's: the client sees the same node either way.
fn as_node(client: &str) -> String {
    let octets: Vec<&str> = client.split('.').collect();
    match octets[..] {
        ["10", "244", n, "1"] => format!("172.18.0.{}", n.parse::<u8>().unwrap() + 1),
        // IPv6: fd00:10:244:N::1 stands for fc00:f853:ccd:e793::N+1.
        _ => match client
            .strip_prefix("fd00:10:244:")
            .and_then(|r| r.strip_suffix("::1"))
        {
            Some(n) => format!("fc00:f853:ccd:e793::{}", n.parse::<u8>().unwrap() + 1),
            None => client.to_string(),
        },
    }
}

/// Which family a run of the observations uses: the lab's IPv4 addresses,
/// or the IPv6 ones of a dual-stack lab (examples/dual-stack/), which
/// follow them one to one.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    /// The address in this family: 10.96.0.X is fd00:10:96::X, 10.244.N.M
    /// fd00:10:244:N::M, 172.18.0.X fc00:f853:ccd:e793::X, 198.51.100.X
    /// 2001:db8:100::X.
    fn ip(self, v4: &str) -> String {
        if self == Family::V4 {
            return v4.to_string();
        }
        let o: Vec<&str> = v4.split('.').collect();
        match o[..] {
            ["10", "96", "0", x] => format!("fd00:10:96::{x}"),
            ["10", "244", n, m] => format!("fd00:10:244:{n}::{m}"),
            ["172", "18", "0", x] => format!("fc00:f853:ccd:e793::{x}"),
            ["198", "51", "100", x] => format!("2001:db8:100::{x}"),
            _ => panic!("no IPv6 twin for {v4}"),
        }
    }

    /// `http://ADDR[:port]/` for the IPv4 `host[:port]`.
    fn url(self, v4: &str) -> String {
        let (host, port) = match v4.split_once(':') {
            Some((h, p)) => (h, format!(":{p}")),
            None => (v4, String::new()),
        };
        match self {
            Family::V4 => format!("http://{host}{port}/"),
            Family::V6 => format!("http://[{}]{port}/", self.ip(host)),
        }
    }

    fn exercises(self) -> &'static str {
        match self {
            Family::V4 => "examples/exercises",
            Family::V6 => "examples/dual-stack/exercises",
        }
    }
}

/// `n` requests: the set of distinct results.
fn many(n: usize, mut one: impl FnMut() -> Seen) -> BTreeSet<Seen> {
    (0..n).map(|_| one()).collect()
}

fn answers(pods: &[&str], client: &str) -> BTreeSet<Seen> {
    pods.iter()
        .map(|p| Seen::Answer {
            pod: p.to_string(),
            client: client.to_string(),
        })
        .collect()
}

/// Everything a client sees of the example Services, and of live changes.
fn observe(lab: &TestLab, f: Family) -> Vec<(&'static str, BTreeSet<Seen>)> {
    // Random over two endpoints: 20 requests miss one with p = 2^-19.
    let mut seen = vec![
        (
            "web from a pod",
            many(20, || lab.curl("pod-1-1", &f.url("10.96.0.80"))),
        ),
        (
            "web from the client",
            many(20, || lab.curl("client", &f.url("10.96.0.80"))),
        ),
        (
            "dns from a pod",
            many(20, || lab.dig("pod-2-1", &f.ip("10.96.0.10"))),
        ),
        (
            "NodePort eTP=Cluster via node2",
            many(20, || lab.curl("client", &f.url("172.18.0.3:30080"))),
        ),
        (
            "NodePort eTP=Local via node2",
            many(3, || lab.curl("client", &f.url("172.18.0.3:30081"))),
        ),
        (
            "NodePort eTP=Local via node1",
            many(1, || lab.curl("client", &f.url("172.18.0.2:30081"))),
        ),
        (
            "no endpoints",
            many(2, || lab.curl("pod-1-0", &f.url("10.96.0.83"))),
        ),
    ];
    let sticky = many(8, || lab.curl("client", &f.url("10.96.0.84")));
    assert_eq!(
        sticky.len(),
        1,
        "session affinity: one endpoint, got {sticky:?}"
    );
    seen.push(("session affinity", any_pod(sticky, "(one)")));
    seen.push((
        "terminating endpoint",
        many(8, || lab.curl("pod-1-0", &f.url("10.96.0.85"))),
    ));

    seen.push((
        "hairpin",
        many(2, || lab.curl("pod-1-1", &f.url("10.96.0.85"))),
    ));

    // UDP echo with nc: the reply names the pod, then echoes the datagram.
    let nc = format!("echo hello | nc -u -w1 {} 9090", f.ip("10.96.0.80"));
    let out = lab.exec("pod-1-1", &["sh", "-c", &nc]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.ends_with("hello\n"), "{out:?}");
    let echo = Seen::answer(&text);
    assert!(
        matches!(&echo, Seen::Answer { pod, .. } if pod == "pod-1-0" || pod == "pod-2-0"),
        "{echo:?}"
    );
    seen.push(("udp echo", any_pod(BTreeSet::from([echo]), "(either)")));

    // Live changes: the exercises of docs/lab.md, applied in turn.
    let apply = |exercise: &str| {
        let file = format!(
            "{}/../{}/{exercise}.yaml",
            env!("CARGO_MANIFEST_DIR"),
            f.exercises()
        );
        let out = dp_ok(&["lab", "apply", "--name", &lab.name, "-f", &file]);
        assert!(out.contains(&format!("{exercise}.yaml applied")), "{out}");
    };
    apply("web-scaled-to-zero");
    // From pod-1-0: pod-1-1 has just sent hairpin traffic, which a node
    // with kube-proxy's rules routes back out of the veth it came in on,
    // sending pod-1-1 ICMP redirects (kind keeps `send_redirects = 1`).
    // Redirects and errors share the kernel's per-destination ICMP rate
    // limit, so for a while only one port unreachable a second reaches
    // pod-1-1, and iptables mode times out every other connection. dp sends
    // the hairpin on itself (no redirect) and builds its own rejects.
    seen.push((
        "web scaled to zero",
        many(2, || lab.curl("pod-1-0", &f.url("10.96.0.80"))),
    ));
    apply("web-one-terminating");
    seen.push((
        "web with one endpoint terminating",
        many(8, || lab.curl("pod-1-1", &f.url("10.96.0.80"))),
    ));
    apply("web-all-terminating");
    seen.push((
        "web with every endpoint terminating",
        many(20, || lab.curl("pod-1-1", &f.url("10.96.0.80"))),
    ));
    apply("web-all-terminating-not-serving");
    seen.push((
        "web with no endpoint serving",
        many(2, || lab.curl("pod-1-1", &f.url("10.96.0.80"))),
    ));
    apply("web-local-cluster");
    seen.push((
        "web-local switched to eTP=Cluster, via node1",
        many(3, || lab.curl("client", &f.url("172.18.0.2:30081"))),
    ));
    let (lb_net, node1) = match f {
        Family::V4 => ("198.51.100.0/24", "172.18.0.2"),
        Family::V6 => ("2001:db8:100::/64", "fc00:f853:ccd:e793::2"),
    };
    let route = lab.exec("client", &["ip", "route", "add", lb_net, "via", node1]);
    assert!(route.status.success(), "{route:?}");
    apply("web-lb-other-sources");
    seen.push((
        "LoadBalancer, client not in the source ranges",
        many(1, || lab.curl("client", &f.url("198.51.100.10"))),
    ));
    apply("web-lb");
    seen.push((
        "LoadBalancer, client in the source ranges",
        many(20, || lab.curl("client", &f.url("198.51.100.10"))),
    ));
    seen
}

/// The results with the pod's name replaced by `label`: where which
/// endpoint answers is random, but not how many or what they saw.
fn any_pod(seen: BTreeSet<Seen>, label: &str) -> BTreeSet<Seen> {
    seen.into_iter()
        .map(|s| match s {
            Seen::Answer { client, .. } => Seen::Answer {
                pod: label.into(),
                client,
            },
            other => other,
        })
        .collect()
}

fn expected(f: Family) -> Vec<(&'static str, BTreeSet<Seen>)> {
    let answers = |pods: &[&str], client: &str| answers(pods, &f.ip(client));
    let one = |pod: &str, client: &str| answers(&[pod], client);
    vec![
        (
            "web from a pod",
            answers(&["pod-1-0", "pod-2-0"], "10.244.1.11"),
        ),
        (
            "web from the client",
            answers(&["pod-1-0", "pod-2-0"], "172.18.0.2"),
        ),
        (
            "dns from a pod",
            answers(&["pod-1-0", "pod-2-0"], "10.244.2.11"),
        ),
        (
            "NodePort eTP=Cluster via node2",
            answers(&["pod-1-1", "pod-2-1"], "172.18.0.3"),
        ),
        (
            "NodePort eTP=Local via node2",
            one("pod-2-1", "172.18.0.100"),
        ),
        (
            "NodePort eTP=Local via node1",
            BTreeSet::from([Seen::TimedOut]),
        ),
        ("no endpoints", BTreeSet::from([Seen::Refused])),
        ("session affinity", one("(one)", "172.18.0.2")),
        ("terminating endpoint", one("pod-1-1", "10.244.1.10")),
        ("hairpin", one("pod-1-1", "172.18.0.2")),
        ("udp echo", one("(either)", "10.244.1.11")),
        ("web scaled to zero", BTreeSet::from([Seen::Refused])),
        (
            "web with one endpoint terminating",
            one("pod-2-0", "10.244.1.11"),
        ),
        (
            "web with every endpoint terminating",
            answers(&["pod-1-0", "pod-2-0"], "10.244.1.11"),
        ),
        (
            "web with no endpoint serving",
            BTreeSet::from([Seen::Refused]),
        ),
        (
            "web-local switched to eTP=Cluster, via node1",
            one("pod-2-1", "172.18.0.2"),
        ),
        (
            "LoadBalancer, client not in the source ranges",
            BTreeSet::from([Seen::TimedOut]),
        ),
        (
            "LoadBalancer, client in the source ranges",
            answers(&["pod-1-0", "pod-2-0"], "172.18.0.2"),
        ),
    ]
}

/// A lab node has kind's sysctls: strict reverse-path filtering
/// (`rp_filter = 1`) and `accept_local = 0` on `all`, `default` and every
/// device, the pods' kindnet-style veths included.
fn assert_kind_sysctls(lab: &TestLab, node: &str) {
    let script = "for d in /proc/sys/net/ipv4/conf/*; do \
                  echo ${d##*/} $(cat $d/rp_filter) $(cat $d/accept_local); done";
    let out = lab.exec(node, &["sh", "-c", script]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split(' ').collect()).collect();
    for dev in ["all", "default", "lo", "eth0"] {
        assert!(rows.iter().any(|r| r[0] == dev), "{dev} in {text}");
    }
    assert!(rows.iter().any(|r| r[0].starts_with("veth")), "{text}");
    for row in &rows {
        assert_eq!(
            row[1..],
            ["1", "0"],
            "{node} {}: rp_filter, accept_local",
            row[0]
        );
    }
}

/// Packets a node's stack dropped for failing the reverse-path check.
fn rp_filter_drops(lab: &TestLab, node: &str) -> u64 {
    let out = lab.exec(node, &["nstat", "-asz", "TcpExtIPReversePathFilter"]);
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("TcpExtIPReversePathFilter"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .expect("nstat prints the counter")
}

/// Every flow of the lab (and of `dp lab demo`: pod to local and remote
/// backends, client masquerade, NodePort eTP=Cluster and Local, hairpin,
/// DNS, affinity, terminating, and more) on nodes with kind's sysctls, with
/// dp and with kube-proxy's rules. dp sends what it translates on itself,
/// so the nodes' strict reverse-path filter drops none of it: if the
/// datapath handed such packets to the stack again, flows would time out
/// and the counter would grow.
#[test]
fn clients_see_the_same_in_dp_and_iptables_mode() {
    let dp_lab = TestLab::up("dp", "dp");
    for node in ["node1", "node2"] {
        assert_kind_sysctls(&dp_lab, node);
    }
    // dp's own view from inside a node: `dp` finds the node's pins.
    let out = dp_lab.exec("node1", &["dp", "service", "list", "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    let services = String::from_utf8_lossy(&out.stdout);
    assert!(services.contains("default/web:http"), "{services}");
    let status = dp_ok(&["lab", "status", "--name", &dp_lab.name]);
    assert!(status.contains("dp mode"), "{status}");
    assert_eq!(status.matches("running").count(), 6, "{status}");
    let with_dp = observe(&dp_lab, Family::V4);
    for node in ["node1", "node2"] {
        assert_eq!(
            rp_filter_drops(&dp_lab, node),
            0,
            "{node} dropped packets for failing the reverse-path check"
        );
    }
    drop(dp_lab);

    let ipt_lab = TestLab::up("ipt", "iptables");
    let out = ipt_lab.exec("node1", &["iptables-nft-save", "-t", "nat"]);
    let rules = String::from_utf8_lossy(&out.stdout);
    assert!(
        rules.contains("-A KUBE-SERVICES -d 10.96.0.80/32 -p tcp"),
        "{rules}"
    );
    let with_iptables = observe(&ipt_lab, Family::V4);
    drop(ipt_lab);

    for ((what, dp), (_, ipt)) in with_dp.iter().zip(&with_iptables) {
        assert_eq!(dp, ipt, "{what}: dp against iptables");
    }
    assert_eq!(with_dp, expected(Family::V4));
}

/// Every exercise of docs/lab.md over IPv6, in a dual-stack lab (`dp lab
/// up --ip-family dual`, examples/dual-stack/): clients see what they see
/// over IPv4, in the IPv6 twins of the same addresses, with dp and with
/// kube-proxy's IPv6 rules (ip6tables-nft).
#[test]
fn every_exercise_runs_over_ipv6_in_a_dual_stack_lab() {
    let lab = TestLab::up_with("dual", "dp", "dual");
    for node in ["node1", "node2"] {
        assert_kind_sysctls(&lab, node);
    }
    let status = dp_ok(&["lab", "status", "--name", &lab.name]);
    assert!(status.contains("dp mode, dual"), "{status}");
    assert!(status.contains("10.244.1.10 fd00:10:244:1::10"), "{status}");
    assert!(status.contains("[fd00:10:96::80]:80"), "{status}");
    let with_dp = observe(&lab, Family::V6);
    // The IPv4 side of the same Services answers too (web-nodeport's
    // ClusterIP; the exercises left web without endpoints).
    let (pod, client) = answered(lab.curl("pod-1-0", "http://10.96.0.81/"));
    assert!(pod == "pod-1-1" || pod == "pod-2-1", "{pod}");
    assert_eq!(client, "10.244.1.10");
    drop(lab);

    // kube-proxy's IPv6 rules (ip6tables-nft) in the same lab: the same.
    let ipt = TestLab::up_with("dual6i", "iptables", "dual");
    let out = ipt.exec("node1", &["ip6tables-nft-save", "-t", "nat"]);
    let rules = String::from_utf8_lossy(&out.stdout);
    assert!(
        rules.contains("-A KUBE-SERVICES -d fd00:10:96::80/128 -p tcp"),
        "{rules}"
    );
    let with_iptables = observe(&ipt, Family::V6);
    drop(ipt);
    for ((what, dp), (_, ipt)) in with_dp.iter().zip(&with_iptables) {
        assert_eq!(dp, ipt, "{what}: dp against ip6tables");
    }
    assert_eq!(with_dp, expected(Family::V6));
}

/// `--ip-family ipv6`: the IPv6 half of the dual-stack examples, and
/// nothing of their IPv4 side.
#[test]
fn an_ipv6_lab_serves_the_ipv6_half_of_the_examples() {
    let lab = TestLab::up_with("six", "dp", "ipv6");
    let out = lab.exec("node1", &["dp", "service", "list", "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    let services: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let frontends: Vec<&str> = services
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["frontend"].as_str().unwrap())
        .collect();
    assert!(
        frontends.contains(&"[fd00:10:96::80]:80/TCP"),
        "{frontends:?}"
    );
    assert!(
        frontends.iter().all(|f| f.starts_with('[')),
        "IPv6 only: {frontends:?}"
    );
    let (pod, client) = answered(lab.curl("pod-1-1", &Family::V6.url("10.96.0.80")));
    assert!(pod == "pod-1-0" || pod == "pod-2-0", "{pod}");
    assert_eq!(client, "fd00:10:244:1::11");
}

/// `dp lab up --socket-lb host`: a node's curl (run by `dp lab exec` in
/// the node's cgroup) reaches a ClusterIP and the NodePort on 127.0.0.1
/// through the socket hook, a Service without endpoints is refused there,
/// `dp explain` and `dp stats` say so, and `dp lab down` leaves no cgroup.
#[test]
fn a_lab_with_socket_lb_serves_node_clients_at_the_socket() {
    e2e::require_root();
    sweep_dead_test_labs();
    let lab = TestLab {
        name: format!("tsock{}", std::process::id()),
    };
    let out = dp_ok(&["lab", "up", "--name", &lab.name, "--socket-lb", "host"]);
    assert!(out.contains("socket-level load balancing"), "{out}");
    let status = dp_ok(&["lab", "status", "--name", &lab.name]);
    assert!(status.contains("socket LB for the nodes"), "{status}");

    answered(lab.curl("node1", "http://10.96.0.80/"));
    answered(lab.curl("node1", "http://127.0.0.1:30080/"));
    assert_eq!(lab.curl("node1", "http://10.96.0.83/"), Seen::Refused);
    let out = lab.exec("node1", &["dp", "stats", "-o", "json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let at = |reason: &str| -> u64 {
        rows.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["hook"] == "sock/connect4" && r["reason"] == reason)
            .map(|r| r["packets"].as_u64().unwrap())
            .sum()
    };
    assert_eq!((at("new_flow"), at("no_endpoints")), (2, 1), "{rows}");
    let out = lab.exec(
        "node1",
        &[
            "dp",
            "explain",
            "--from",
            "172.18.0.2",
            "--to",
            "127.0.0.1:30080",
            "-o",
            "json",
        ],
    );
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(e["path"], "socket", "{e}");

    let cgroup = dp::agent::cgroup2_root()
        .unwrap()
        .join(format!("dp-lab-{}-node1", lab.name));
    assert!(cgroup.exists());
    drop(lab);
    assert!(!cgroup.exists(), "dp lab down removed {}", cgroup.display());
}

/// (pod, client) of an answer.
fn answered(seen: Seen) -> (String, String) {
    match seen {
        Seen::Answer { pod, client } => (pod, client),
        other => panic!("no answer: {other:?}"),
    }
}

#[test]
fn down_removes_a_crashed_lab_and_whatever_runs_in_it() {
    let lab = TestLab::up("crash", "dp");
    let state: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(lab.path().join("lab.json")).unwrap()).unwrap();
    let pids: Vec<i32> = state["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pid"].as_i64().unwrap() as i32)
        .collect();
    assert_eq!(pids.len(), 6);

    // A second `up` of the same name is refused, not merged.
    let again = dp(&["lab", "up", "--name", &lab.name]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists already"));

    // Something a user left running in a pod, then a crash: the agent and
    // one pod's servers killed outright, and the state file lost.
    let mut leftover = Command::new(DP)
        .args(["lab", "exec", "--name", &lab.name, "pod-1-0", "--"])
        .args(["sh", "-c", "echo started; exec sleep 600"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut started = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(leftover.stdout.take().unwrap()),
        &mut started,
    )
    .unwrap();
    assert_eq!(started, "started\n");
    let agent = pids[pids.len() - 1];
    for pid in [agent, pids[0]] {
        // SAFETY: a process of this test's lab.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    }
    fs::remove_file(lab.path().join("lab.json")).unwrap();

    let out = dp_ok(&["lab", "down", "--name", &lab.name]);
    assert!(out.contains("8 namespaces deleted"), "{out}");
    assert!(
        leftover.wait().unwrap().code().is_none(),
        "killed by a signal"
    );
    for pid in pids {
        let alive = fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| !s.rsplit_once(')').unwrap().1.trim_start().starts_with('Z'));
        assert!(!alive, "pid {pid} still runs");
    }
    let prefix = format!("dp-{}-", lab.name);
    let left: Vec<String> = fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    assert!(!lab.path().exists());
    let mounts = fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains(&*lab.path().to_string_lossy()), "{mounts}");
    // And a second down has nothing to do.
    assert!(dp_ok(&["lab", "down", "--name", &lab.name]).contains("no lab"));
}

#[test]
fn the_demo_runs_end_to_end_and_leaves_nothing() {
    e2e::require_root();
    let out = dp(&["lab", "demo"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "FORWARDED new flow to a backend",
        "REVERSE-NATED",
        "REJECTED no endpoints",
        "DROPPED traffic policy Local",
        "-j REJECT",
        "has no local endpoints",
        "-j DNAT --to-destination",
        "10 of 10 flows",
        "The lab is gone",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    assert!(!Path::new("/run/dp-lab/demo").exists());
    let left: Vec<String> = fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("dp-demo-"))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}
