//! Upgrades without losing a flow (issue 21): node1's agent is replaced
//! under load by a dp whose conntrack has another layout (the
//! `layout-next` build: `cargo xtask build-layout-next`), then rolled back;
//! restarted with another conntrack capacity, up and down; and started over
//! state it cannot read (fail static). Long-lived TCP connections (through
//! a ClusterIP, and through a NodePort from outside the cluster, which is
//! masqueraded) and a UDP flow exchange messages throughout: none fails,
//! and the conntrack entries are carried over (checked in the maps).

use std::{
    collections::BTreeSet,
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver},
        Arc,
    },
    thread::JoinHandle,
};

mod support;

use aya::maps::{HashMap, Map, MapData};
use common::{
    layout::{LayoutKey, MapLayout},
    map_names,
};
use e2e::{require_root, Cluster, TcpEchoServer, UdpEchoServer};
use support::agents::*;

const WEB: &str = "10.96.0.10:80";
const DNS: &str = "10.96.0.53:53";
const NODE_PORT: u16 = 30080;
const THIS_DP: &str = env!("CARGO_BIN_EXE_dp");

/// The dp with the other conntrack layout, built by `cargo xtask test`
/// (`cargo xtask build-layout-next`).
fn next_dp() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/layout-next/dp");
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask build-layout-next` (cargo xtask test does)",
        path.display()
    );
    path.canonicalize().unwrap().display().to_string()
}

/// The cluster, its servers, node1's state and the traffic.
/// Fields drop in order: the agent, servers and pins before the
/// namespaces.
struct Fixture {
    _agent2: Agent,
    _servers: Vec<(TcpEchoServer, UdpEchoServer)>,
    bpffs: Bpffs,
    dir: ManifestsDir,
    cluster: Cluster,
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        require_root();
        // Three backends (one on node1): a flow whose conntrack entry were
        // lost would be sent to another one (and reset) two times in three.
        let cluster = Cluster::new(&[2, 2]).unwrap();
        let mut servers = Vec::new();
        let mut endpoints = String::new();
        for name in ["pod-1-1", "pod-2-0", "pod-2-1"] {
            let pod = cluster.pod(name).clone();
            let ns = cluster.pod_ns(name);
            servers.push((
                TcpEchoServer::start(ns, SocketAddr::from((pod.ip, 8080))).unwrap(),
                UdpEchoServer::start(ns, SocketAddr::from((pod.ip, 5353))).unwrap(),
            ));
            let node = if name.starts_with("pod-1") {
                "node1"
            } else {
                "node2"
            };
            endpoints.push_str(&format!(
                "- {{addresses: [{}], nodeName: {node}}}\n",
                pod.ip
            ));
        }
        let dir = manifests_dir(name);
        fs::write(
            dir.join("services.yaml"),
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\n\
                 spec:\n  type: NodePort\n  clusterIP: 10.96.0.10\n  ports: [{{port: 80, nodePort: {NODE_PORT}}}]\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata:\n  name: web-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\n\
                 addressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{endpoints}---\n\
                 apiVersion: v1\nkind: Service\nmetadata: {{name: dns, namespace: default}}\n\
                 spec:\n  clusterIP: 10.96.0.53\n  ports: [{{port: 53, protocol: UDP}}]\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata:\n  name: dns-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: dns}}\n\
                 addressType: IPv4\nports: [{{port: 5353, protocol: UDP}}]\nendpoints:\n{endpoints}",
            ),
        )
        .unwrap();
        let bpffs = Bpffs::new(name);
        let n2 = &cluster.nodes[1];
        let agent2 = Agent::start(
            cluster.node_ns(1),
            &n2.name,
            &n2.ip.to_string(),
            &dir,
            &bpffs.node(&n2.name),
        );
        agent2.wait_for(&["synced", "frontends="]);
        Fixture {
            _servers: servers,
            dir,
            bpffs,
            _agent2: agent2,
            cluster,
        }
    }

    fn node1_pins(&self) -> PathBuf {
        self.bpffs.node(&self.cluster.nodes[0].name)
    }

    /// node1's agent, from `bin`, with `extra` flags.
    fn start_node1(&self, bin: &str, extra: &[&str]) -> Agent {
        let n = &self.cluster.nodes[0];
        Agent::start_bin(
            bin,
            self.cluster.node_ns(0),
            &n.name,
            &n.ip.to_string(),
            ("--manifests", &self.dir),
            &self.node1_pins(),
            extra,
        )
    }

    /// `dp status`'s layout row of node1's DP_CT.
    fn ct_layout(&self) -> serde_json::Value {
        inspect(&self.node1_pins(), &["status"])["layouts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == map_names::CT)
            .unwrap()
            .clone()
    }

    /// node1's conntrack as `bin` reads it: (direction, protocol, source,
    /// destination, backend, state, masqueraded) of every entry.
    fn conntrack(&self, bin: &str) -> BTreeSet<String> {
        let out = e2e::stdout_of(
            Command::new(bin)
                .args(["ct", "list", "-o", "json", "--bpffs"])
                .arg(self.node1_pins()),
        );
        let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                format!(
                    "{} {} {} -> {} backend {} {} masq={}",
                    r["direction"],
                    r["protocol"],
                    r["src"],
                    r["dst"],
                    r["backend"],
                    r["state"],
                    r["masqueraded"]
                )
            })
            .collect()
    }
}

/// Long-lived flows exchanging messages until stopped: a TCP connection
/// and a connected UDP socket from pod-1-0 to ClusterIPs, and a TCP
/// connection from the client outside the cluster to node1's NodePort.
struct Traffic {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    progress: Receiver<Result<u64, String>>,
}

impl Traffic {
    fn start(f: &Fixture) -> Traffic {
        let web: SocketAddr = WEB.parse().unwrap();
        let dns: SocketAddr = DNS.parse().unwrap();
        let node_port = SocketAddr::from((f.cluster.nodes[0].ip, NODE_PORT));
        let (pod_tcp, pod_udp) = f
            .cluster
            .pod_ns("pod-1-0")
            .run(|| {
                let c = TcpStream::connect_timeout(&web, TIMEOUT).unwrap();
                c.set_read_timeout(Some(TIMEOUT)).unwrap();
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                s.connect(dns).unwrap();
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                (c, s)
            })
            .unwrap();
        let outside = f
            .cluster
            .client_ns()
            .run(|| {
                let c = TcpStream::connect_timeout(&node_port, TIMEOUT).unwrap();
                c.set_read_timeout(Some(TIMEOUT)).unwrap();
                c
            })
            .unwrap();
        let (tx, progress) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut pod_tcp, pod_udp, mut outside) = (pod_tcp, pod_udp, outside);
            let mut buf = [0u8; 64];
            let mut n = 0u64;
            while !stopping.load(Ordering::Relaxed) {
                let msg = format!("{n:016}");
                let exchange = (|| -> std::io::Result<()> {
                    for (what, conn) in [
                        ("ClusterIP TCP", &mut pod_tcp),
                        ("NodePort TCP", &mut outside),
                    ] {
                        conn.write_all(msg.as_bytes())?;
                        conn.read_exact(&mut buf[..16])
                            .map_err(|e| std::io::Error::other(format!("{what}: {e}")))?;
                        if &buf[..16] != msg.as_bytes() {
                            return Err(std::io::Error::other(format!("{what}: echo mismatch")));
                        }
                    }
                    pod_udp.send(msg.as_bytes())?;
                    let got = pod_udp
                        .recv(&mut buf)
                        .map_err(|e| std::io::Error::other(format!("UDP: {e}")))?;
                    if &buf[..got] != msg.as_bytes() {
                        return Err(std::io::Error::other("UDP: echo mismatch"));
                    }
                    Ok(())
                })();
                if let Err(e) = exchange {
                    let _ = tx.send(Err(format!("exchange {n}: {e}")));
                    return;
                }
                n += 1;
                let _ = tx.send(Ok(n));
            }
        });
        Traffic {
            stop,
            thread: Some(thread),
            progress,
        }
    }

    /// Waits for `count` more exchanges; fails on the first failed one.
    fn exchanges(&self, count: u64) {
        let mut first = None;
        loop {
            match self.progress.recv_timeout(TIMEOUT) {
                Ok(Ok(n)) => {
                    let start = *first.get_or_insert(n);
                    if n - start + 1 >= count {
                        return;
                    }
                }
                Ok(Err(e)) => panic!("a failed exchange: {e}"),
                Err(e) => panic!("traffic stalled: {e}"),
            }
        }
    }

    /// Stops the traffic; every exchange up to here succeeded.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        let mut last = 0;
        while let Ok(p) = self.progress.try_recv() {
            last = p.unwrap_or_else(|e| panic!("a failed exchange: {e}"));
        }
        last
    }
}

/// The entries of our three flows (both directions): six, one of them
/// pair masqueraded.
fn assert_flows(ct: &BTreeSet<String>) {
    assert_eq!(ct.len(), 6, "{ct:#?}");
    assert_eq!(
        ct.iter().filter(|e| e.contains("masq=true")).count(),
        2,
        "{ct:#?}"
    );
    assert!(ct.iter().all(|e| e.contains("established")), "{ct:#?}");
}

#[test]
fn an_upgrade_to_another_conntrack_layout_and_the_rollback_keep_every_flow() {
    let next = next_dp();
    let f = Fixture::new("upgrade");
    let agent = f.start_node1(THIS_DP, &[]);
    agent.wait_for(&["synced", "frontends="]);
    let traffic = Traffic::start(&f);
    traffic.exchanges(50);
    let before = f.conntrack(THIS_DP);
    assert_flows(&before);

    // Upgrade: DP_CT v1 -> v2 (another size and field order).
    agent.stop();
    traffic.exchanges(20);
    let agent = f.start_node1(&next, &[]);
    let converted = agent.wait_for(&["pinned map converted", "map=\"DP_CT\""]);
    assert!(
        converted.contains("from_version=[1]") && converted.contains("to_version=2"),
        "{converted}"
    );
    agent.wait_for(&["migration finished", "DP_CT"]);
    agent.wait_for(&["synced"]);
    traffic.exchanges(200);
    assert_eq!(f.conntrack(&next), before, "conntrack carried over into v2");
    assert!(
        !dp::kernel::upgrade::previous_dir(&dp::kernel::pin::maps_dir(&f.node1_pins())).exists()
    );
    // This dp's inspection commands do not misread v2: they say whose it is.
    let out = Command::new(THIS_DP)
        .args(["ct", "list", "--bpffs"])
        .arg(f.node1_pins())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("DP_CT is in layout version 2"),
        "{stderr}"
    );
    // `dp status` (of this dp) says the state is of v2, convertible.
    let ct_layout = f.ct_layout();
    assert_eq!(ct_layout["pinned_version"], 2, "{ct_layout}");
    assert_eq!(ct_layout["state"], "convertible", "{ct_layout}");

    // Rollback: v2 -> v1.
    agent.stop();
    traffic.exchanges(20);
    let agent = f.start_node1(THIS_DP, &[]);
    let converted = agent.wait_for(&["pinned map converted", "map=\"DP_CT\""]);
    assert!(
        converted.contains("from_version=[2]") && converted.contains("to_version=1"),
        "{converted}"
    );
    agent.wait_for(&["migration finished"]);
    traffic.exchanges(200);
    assert_eq!(
        f.conntrack(THIS_DP),
        before,
        "conntrack carried back into v1"
    );
    let status = inspect(&f.node1_pins(), &["status"]);
    assert!(
        status["layouts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["state"] == "same"),
        "{}",
        status["layouts"]
    );
    agent.stop();
    let n = traffic.finish();
    assert!(n >= 490, "{n} exchanges");
}

#[test]
fn a_conntrack_resize_up_and_down_keeps_every_flow() {
    let f = Fixture::new("resize");
    let agent = f.start_node1(THIS_DP, &["--map-size-conntrack", "65536"]);
    agent.wait_for(&["synced", "frontends="]);
    let traffic = Traffic::start(&f);
    traffic.exchanges(50);
    let before = f.conntrack(THIS_DP);
    assert_flows(&before);
    let capacity = || {
        inspect(&f.node1_pins(), &["status"])["maps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == map_names::CT)
            .unwrap()["max_entries"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(capacity(), 65_536);
    for size in ["262144", "16384"] {
        agent_restart(&f, &traffic, size);
        assert_eq!(capacity(), size.parse::<u64>().unwrap());
        assert_eq!(
            f.conntrack(THIS_DP),
            before,
            "conntrack carried over at {size}"
        );
    }
    traffic.finish();

    fn agent_restart(f: &Fixture, traffic: &Traffic, size: &str) {
        let agent = f.start_node1(THIS_DP, &["--map-size-conntrack", size]);
        let converted = agent.wait_for(&["pinned map converted", "map=\"DP_CT\""]);
        assert!(
            converted.contains(&format!("max_entries={size}")),
            "{converted}"
        );
        assert!(converted.contains("written=6"), "{converted}");
        agent.wait_for(&["migration finished"]);
        traffic.exchanges(100);
        agent.stop();
    }
}

/// `DP_LAYOUTS`'s record of the map `name` pinned at `pins`.
fn recorded_layout(pins: &Path, name: &str) -> (HashMap<MapData, LayoutKey, MapLayout>, LayoutKey) {
    let maps = dp::kernel::pin::maps_dir(pins);
    let id = aya::maps::MapInfo::from_pin(maps.join(name)).unwrap().id();
    let data = MapData::from_pin(maps.join(map_names::LAYOUTS)).unwrap();
    (
        HashMap::try_from(Map::HashMap(data)).unwrap(),
        LayoutKey::new(name, id),
    )
}

#[test]
fn an_agent_over_state_it_cannot_read_fails_static_and_says_so() {
    let f = Fixture::new("fail-static");
    let agent = f.start_node1(THIS_DP, &[]);
    agent.wait_for(&["synced", "frontends="]);
    let traffic = Traffic::start(&f);
    traffic.exchanges(50);
    agent.stop();
    let before = f.conntrack(THIS_DP);

    // As a newer dp would leave it: DP_CT in a version whose floor is
    // above this dp's.
    let (mut layouts, key) = recorded_layout(&f.node1_pins(), map_names::CT);
    let ours = layouts.get(&key, 0).unwrap();
    let newer = MapLayout {
        version: 99,
        floor: 99,
        ..ours
    };
    layouts.insert(key, newer, 0).unwrap();
    let ct_id = key.map_id;

    let agent = f.start_node1(THIS_DP, &[]);
    let line = agent.wait_for(&["fail static"]);
    assert!(
        line.contains("DP_CT") && line.contains("version 99"),
        "{line}"
    );
    // Traffic goes on through the programs the earlier agent attached.
    traffic.exchanges(100);
    let metrics = http_get(f.cluster.node_ns(0), "127.0.0.1:10249", "/metrics");
    assert!(metrics.contains("dp_pinned_state_readable 0"), "{metrics}");
    let health = http_get(f.cluster.node_ns(0), "127.0.0.1:10256", "/healthz");
    assert!(
        health.starts_with("HTTP/1.1 503") && health.contains("failStatic"),
        "{health}"
    );
    let row = f.ct_layout();
    assert_eq!(row["pinned_version"], 99, "{row}");
    assert!(
        row["state"].as_str().unwrap().starts_with("unreadable"),
        "{row}"
    );
    // Nothing was changed: the same conntrack map, its entries.
    let maps = dp::kernel::pin::maps_dir(&f.node1_pins());
    assert_eq!(
        aya::maps::MapInfo::from_pin(maps.join(map_names::CT))
            .unwrap()
            .id(),
        ct_id
    );
    agent.stop();

    // The dp that wrote it (here: the record restored) takes over again.
    layouts.insert(key, ours, 0).unwrap();
    let agent = f.start_node1(THIS_DP, &[]);
    agent.wait_for(&["synced", "frontends="]);
    traffic.exchanges(100);
    let metrics = http_get(f.cluster.node_ns(0), "127.0.0.1:10249", "/metrics");
    assert!(metrics.contains("dp_pinned_state_readable 1"), "{metrics}");
    assert_eq!(f.conntrack(THIS_DP), before);
    agent.stop();
    traffic.finish();
}
