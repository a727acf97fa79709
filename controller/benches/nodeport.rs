//! NodePort forwarding rate, the same topology for three dataplanes in one
//! run: dp with its XDP fast path, dp with tc only, and the rules kube-proxy's
//! iptables mode writes for the same Service (in the entry node's namespace
//! only). An external client sends UDP to node1:30090, whose only backend
//! is a pod on node2 (DNAT + SNAT, forwarded back out of node1's eth0); a
//! sink in the pod counts what arrives. Every figure is the median of
//! several interleaved rounds. Prints a markdown table (see BENCHMARKS.md).
//!
//! Run as root: `cargo xtask bench` (or `cargo bench -p dp --bench nodeport`).

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::Hook;
use dp::{BackendSlots, Datapath, Frontend, ServiceMaps};
use e2e::{cluster::CLUSTER_CIDR, Cluster};

const NODE_PORT: u16 = 30090;
const BACKEND_PORT: u16 = 9000;
const FLOWS: u16 = 64;
const PAYLOAD: usize = 64;

fn seconds() -> f64 {
    std::env::var("DP_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3.0)
}

fn rounds() -> usize {
    std::env::var("DP_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Xdp,
    TcOnly,
    Iptables,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Xdp => "dp, XDP + tc",
            Mode::TcOnly => "dp, tc only",
            Mode::Iptables => "kube-proxy iptables rules (nft backend)",
        }
    }
}

/// kube-proxy's iptables-mode rules for one eTP=Cluster NodePort with one
/// endpoint (chain names shortened; the rule path is the same).
fn iptables_rules(node_ip: &str, pod: &str) -> String {
    format!(
        "*nat\n\
         :PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         :KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n\
         :KUBE-MARK-MASQ - [0:0]\n:KUBE-EXT-BENCH - [0:0]\n:KUBE-SVC-BENCH - [0:0]\n:KUBE-SEP-BENCH - [0:0]\n\
         -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-NODEPORTS -m comment --comment bench/sink -m udp -p udp --dport {NODE_PORT} -j KUBE-EXT-BENCH\n\
         -A KUBE-EXT-BENCH -m comment --comment \"masquerade traffic for bench/sink external destinations\" -j KUBE-MARK-MASQ\n\
         -A KUBE-EXT-BENCH -j KUBE-SVC-BENCH\n\
         -A KUBE-SVC-BENCH -m comment --comment \"bench/sink -> {pod}:{BACKEND_PORT}\" -j KUBE-SEP-BENCH\n\
         -A KUBE-SEP-BENCH -m comment --comment bench/sink -s {pod} -j KUBE-MARK-MASQ\n\
         -A KUBE-SEP-BENCH -m comment --comment bench/sink -m udp -p udp -j DNAT --to-destination {pod}:{BACKEND_PORT}\n\
         -A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -d {node_ip}/32 -j KUBE-NODEPORTS\n\
         COMMIT\n\
         *filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:KUBE-FORWARD - [0:0]\n\
         -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         COMMIT\n"
    )
}

/// (packets per second sent, packets per second the sink received) while
/// the client sent for `seconds()`.
fn measure(cluster: &Cluster, node_ip: IpAddr) -> (f64, f64) {
    let pod = cluster.pods[0].clone();
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sink = {
        let (received, stop) = (received.clone(), stop.clone());
        let sock = cluster
            .pod_ns(&pod.name)
            .run(|| UdpSocket::bind(SocketAddr::from((pod.ip, BACKEND_PORT))).unwrap())
            .unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if sock.recv(&mut buf).is_ok() {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let sockets: Vec<UdpSocket> = cluster
        .client_ns()
        .run(|| {
            (0..FLOWS)
                .map(|_| {
                    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                    s.connect(SocketAddr::new(node_ip, NODE_PORT)).unwrap();
                    s
                })
                .collect()
        })
        .unwrap();
    // Warm-up: conntrack entries and neighbours exist before timing.
    for s in &sockets {
        let _ = s.send(&[0u8; PAYLOAD]);
    }
    std::thread::sleep(Duration::from_millis(200));
    let before = received.load(Ordering::Relaxed);
    let start = Instant::now();
    let duration = Duration::from_secs_f64(seconds());
    let payload = [0u8; PAYLOAD];
    let mut i = 0usize;
    let mut sent = 0u64;
    while start.elapsed() < duration {
        for _ in 0..256 {
            if sockets[i % sockets.len()].send(&payload).is_ok() {
                sent += 1;
            }
            i += 1;
        }
    }
    let elapsed = start.elapsed();
    // Let what is in flight arrive before counting.
    std::thread::sleep(Duration::from_millis(200));
    let got = received.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    sink.join().unwrap();
    let secs = elapsed.as_secs_f64();
    (sent as f64 / secs, got as f64 / secs)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    e2e::require_root();
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let cluster = Cluster::new(&[0, 1]).unwrap();
    let node = cluster.nodes[0].clone();
    let node_ip = IpAddr::V4(node.ip);
    let pod_ip = cluster.pods[0].ip;
    let node_ns = cluster.node_ns(0);

    let mut results: Vec<(Mode, Vec<(f64, f64)>)> = [Mode::Xdp, Mode::TcOnly, Mode::Iptables]
        .into_iter()
        .map(|m| (m, Vec::new()))
        .collect();
    for round in 0..rounds() {
        for (mode, samples) in results.iter_mut() {
            let mut dp = None;
            match mode {
                Mode::Xdp | Mode::TcOnly => {
                    let mut d = Datapath::load().unwrap();
                    d.set_node(
                        node_ip,
                        Some((IpAddr::V4(CLUSTER_CIDR.0), CLUSTER_CIDR.1)),
                        false,
                    )
                    .unwrap();
                    d.set_backend(1, SocketAddr::from((pod_ip, BACKEND_PORT)), 17, false)
                        .unwrap();
                    let slots = BackendSlots {
                        ready: vec![1],
                        external: true,
                        ..BackendSlots::default()
                    };
                    d.set_service(
                        &Frontend::udp(SocketAddr::new(node_ip, NODE_PORT)),
                        1,
                        &slots,
                    )
                    .unwrap();
                    let xdp = *mode == Mode::Xdp;
                    node_ns
                        .run(|| -> dp::error::Result<()> {
                            if xdp {
                                d.attach_xdp(&node.device)?;
                            }
                            d.attach_tc(&node.device, Hook::TcIngress)?;
                            d.attach_tc(&node.device, Hook::TcEgress)
                        })
                        .unwrap()
                        .unwrap();
                    dp = Some(d);
                }
                Mode::Iptables => {
                    let mut child = node_ns
                        .command("iptables-restore")
                        .stdin(Stdio::piped())
                        .spawn()
                        .expect("iptables-restore (cargo xtask setup installs iptables)");
                    use std::io::Write;
                    child
                        .stdin
                        .take()
                        .unwrap()
                        .write_all(
                            iptables_rules(&node.ip.to_string(), &pod_ip.to_string()).as_bytes(),
                        )
                        .unwrap();
                    assert!(child.wait().unwrap().success(), "iptables-restore");
                }
            }
            let (sent, pps) = measure(&cluster, node_ip);
            eprintln!(
                "round {round}: {}: sent {sent:.0}/s, received {pps:.0}/s",
                mode.name()
            );
            samples.push((sent, pps));
            if let Some(d) = dp.as_mut() {
                let c = d.counters().unwrap();
                let at_xdp = c.packets(Hook::Xdp, common::Reason::Established);
                let at_tc = c.packets(Hook::TcIngress, common::Reason::Established);
                eprintln!("  established packets: xdp {at_xdp}, tc {at_tc}");
                if *mode == Mode::Xdp {
                    assert!(at_xdp > at_tc, "the XDP path served the flows");
                } else {
                    assert_eq!(at_xdp, 0);
                }
            }
            drop(dp);
            if *mode == Mode::Iptables {
                for table in ["nat", "filter"] {
                    let status = node_ns
                        .command("iptables")
                        .args(["-t", table, "-F"])
                        .status()
                        .unwrap();
                    assert!(status.success());
                    node_ns
                        .command("iptables")
                        .args(["-t", table, "-X"])
                        .status()
                        .unwrap();
                }
                let _ = node_ns
                    .command("conntrack")
                    .arg("-F")
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let received = |samples: &[(f64, f64)]| -> Vec<f64> { samples.iter().map(|s| s.1).collect() };
    let iptables_median = median(&mut received(&results[2].1));
    println!(
        "\nNodePort, UDP {PAYLOAD}-byte payload, {FLOWS} flows, remote backend; {} rounds of {}s; {nproc} CPUs, kernel {kernel}\n",
        rounds(),
        seconds()
    );
    println!("| dataplane | received packets/s (median) | min | max | sent packets/s (median) | vs iptables |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (mode, samples) in &results {
        let mut r = received(samples);
        let med = median(&mut r);
        let mut sent: Vec<f64> = samples.iter().map(|s| s.0).collect();
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2}x |",
            mode.name(),
            med,
            r[0],
            r[r.len() - 1],
            median(&mut sent),
            med / iptables_median
        );
    }
}
