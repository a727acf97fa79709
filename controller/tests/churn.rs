//! Endpoint churn under traffic: a `dp agent` takes EndpointSlice changes at
//! a sustained rate (1 000 a second by default, through the manifests
//! directory or the fake API server's watch) while a pod keeps opening TCP
//! connections, holds long ones open and sends UDP to the churning Service.
//!
//! Every change carries its time in `endpoints.kubernetes.io/last-change-
//! trigger-time`; the agent names the newest one it programmed in each
//! sync's log line, which is timestamped after the maps were written. From
//! that log and what the backends saw arrive (a packet capture in each
//! backend's namespace logs every SYN and datagram with its time), the test
//! asserts:
//! - no connection or datagram reaches a backend after its removal was
//!   programmed (unless a later sync, already under way, added it back);
//! - no connection to a backend that stays is reset or stalls, no
//!   connection is refused or times out (endpoints always exist), every
//!   datagram is answered, and from the Service's address;
//! - every change is programmed; the lag from change to map (p50/p99) is
//!   printed.
//!
//! `cargo xtask churn --seconds N --rate R` runs the same tests longer;
//! `cargo xtask soak --seconds N` the soak (`soak_*`, ignored here).

use std::{
    collections::BTreeMap,
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

mod support;

use e2e::{
    apiserver::FakeApiServer,
    capture::{Arrival, ArrivalCapture, ArrivalLog},
    Cluster, TcpEchoServer, UdpEchoServer,
};
use serde_json::{json, Value};
use support::agents::*;

const CLIENT: &str = "pod-1-0";
/// In every state: the Service never runs out of endpoints.
const STAYERS: [&str; 2] = ["pod-1-1", "pod-2-1"];
/// Added and removed by the churn, one at a time, in turn.
const CHURNERS: [&str; 3] = ["pod-1-2", "pod-2-0", "pod-2-2"];
const VIP: &str = "10.96.0.50";
const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
const TCP_TARGET: u16 = 8080;
const UDP_TARGET: u16 = 5353;

/// The churn tests one at a time: each wants the machine's CPUs.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A number from the environment (`cargo xtask churn`, `soak`), else
/// `default`.
fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .map(|v| v.parse::<f64>().unwrap_or_else(|_| panic!("{name}={v}")))
        .unwrap_or(default)
}

/// `DP_CHURN_SECONDS` of churn (5) at `DP_CHURN_RATE` changes a second
/// (1 000) through `kind`, under traffic; every check.
fn churn_under_traffic(kind: FeedKind, test: &str) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let seconds = Duration::from_secs_f64(env_f64("DP_CHURN_SECONDS", 5.0));
    let rate = env_f64("DP_CHURN_RATE", 1000.0);
    let report = Bench::start(kind, test).run(seconds, rate);
    report.assert_clean(rate);
    report.assert_counters_add_up();
}

#[test]
fn churn_through_the_manifests_directory_under_traffic() {
    churn_under_traffic(FeedKind::Manifests, "churn-manifests");
}

#[test]
fn churn_through_the_api_watch_under_traffic() {
    churn_under_traffic(FeedKind::Api, "churn-api");
}

/// The soak (`cargo xtask soak --seconds N`): churn through the API watch
/// (`DP_CHURN_RATE`, default 200 changes/s) and the same traffic for
/// `DP_SOAK_SECONDS` (default 600), sampled every `DP_SOAK_SAMPLE_SECONDS`
/// (30). Past the warm-up (the first fifth), the agent's memory and the
/// conntrack fill stay flat; at the end, with the traffic stopped, the
/// datapath's counters add up to the packets the devices received.
#[test]
#[ignore = "ten minutes: cargo xtask soak"]
fn soak_churn_and_traffic() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let seconds = Duration::from_secs_f64(env_f64("DP_SOAK_SECONDS", 600.0));
    let rate = env_f64("DP_CHURN_RATE", 200.0);
    let every = Duration::from_secs_f64(env_f64("DP_SOAK_SAMPLE_SECONDS", 30.0));
    let bench = Bench::start(FeedKind::Api, "soak");
    let (report, samples) = bench.run_sampled(seconds, rate, Some(every));
    report.assert_clean(rate);
    report.assert_counters_add_up();
    // Past the warm-up, the later half of the samples peaks no higher than
    // the earlier half (within 10%, and 4 MiB or 1 000 entries of slack):
    // flat, though conntrack saw-tooths between collections.
    let after: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.elapsed >= seconds / 5)
        .collect();
    assert!(
        after.len() >= 4,
        "too few samples past the warm-up: {samples:?}"
    );
    let (earlier, later) = after.split_at(after.len() / 2);
    let peak = |part: &[&Sample], f: fn(&Sample) -> u64| part.iter().map(|s| f(s)).max().unwrap();
    let rss = (peak(earlier, |s| s.rss_kib), peak(later, |s| s.rss_kib));
    let ct = (
        peak(earlier, |s| s.ct_entries),
        peak(later, |s| s.ct_entries),
    );
    eprintln!(
        "soak: past the warm-up, peaks of the earlier and later halves: agent RSS {} / {} KiB, conntrack {} / {} entries",
        rss.0, rss.1, ct.0, ct.1
    );
    assert!(
        rss.1 <= rss.0 + rss.0 / 10 + 4096,
        "the agent's memory grew: {samples:?}"
    );
    assert!(
        ct.1 <= ct.0 + ct.0 / 10 + 1000,
        "conntrack kept filling: {samples:?}"
    );
    // Backends: the 10 live ones (5 pods, TCP and UDP) and the retired
    // ones conntrack still names; collected, they do not pile up.
    let backends = (
        peak(earlier, |s| s.backend_entries),
        peak(later, |s| s.backend_entries),
    );
    eprintln!(
        "soak: backend entries, peaks of the earlier and later halves: {} / {}",
        backends.0, backends.1
    );
    assert!(
        backends.1 <= backends.0 + backends.0 / 10 + 10,
        "retired backends piled up: {samples:?}"
    );
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum FeedKind {
    Manifests,
    Api,
}

/// Where changes go: files renamed into the manifests directory, or the
/// fake API server (and from it, the agent's watch).
enum Feed {
    Manifests(PathBuf),
    Api(FakeApiServer),
}

impl Feed {
    fn apply(&self, object: &Value) {
        match self {
            Feed::Manifests(dir) => {
                let name = object["metadata"]["name"].as_str().unwrap();
                // Renamed into place: the agent never reads half a file.
                let tmp = dir.join(format!(".{name}.json.tmp"));
                fs::write(&tmp, object.to_string()).unwrap();
                fs::rename(&tmp, dir.join(format!("{name}.json"))).unwrap();
            }
            Feed::Api(api) => {
                api.apply(object.clone());
            }
        }
    }
}

/// The cluster, its logging servers, the agent and the feed.
struct Bench {
    cluster: Cluster,
    arrivals: ArrivalLog,
    _servers: (Vec<TcpEchoServer>, Vec<UdpEchoServer>),
    _captures: Vec<ArrivalCapture>,
    agent: Agent,
    bpffs: Bpffs,
    feed: Arc<Feed>,
    _dir: ManifestsDir,
    /// The state of every change written, by its trigger time as written.
    states: BTreeMap<String, [bool; 3]>,
    /// Programmed: (started no later than, done, trigger) per sync, in log
    /// order.
    programmed: Vec<Sync>,
}

#[derive(Clone, Debug)]
struct Sync {
    /// When the sync began (before it read the change).
    start: SystemTime,
    /// Its log line's time: after the maps were written.
    done: SystemTime,
    trigger: String,
}

impl Bench {
    fn start(kind: FeedKind, test: &str) -> Bench {
        e2e::require_root();
        let cluster = Cluster::new(&[3, 3]).unwrap();
        let arrivals = ArrivalLog::default();
        let mut tcp = Vec::new();
        let mut udp = Vec::new();
        let mut captures = Vec::new();
        for pod in cluster.pods.iter().filter(|p| p.name != CLIENT) {
            let ns = cluster.pod_ns(&pod.name);
            let name = Some(pod.name.clone());
            tcp.push(
                TcpEchoServer::start_named(ns, (pod.ip, TCP_TARGET).into(), name.clone()).unwrap(),
            );
            udp.push(UdpEchoServer::start_named(ns, (pod.ip, UDP_TARGET).into(), name).unwrap());
            captures.push(
                ArrivalCapture::start(ns, &pod.name, TCP_TARGET, UDP_TARGET, arrivals.clone())
                    .unwrap(),
            );
        }
        let dir = manifests_dir(test);
        let bpffs = Bpffs::new(test);
        let pins = bpffs.node("node1");
        let (feed, source) = match kind {
            FeedKind::Manifests => (
                Feed::Manifests(dir.to_path_buf()),
                ("--manifests", dir.to_path_buf()),
            ),
            FeedKind::Api => {
                // The API server listens in node1's namespace, where the
                // agent runs.
                let api = FakeApiServer::start_in(cluster.node_ns(0)).unwrap();
                let kubeconfig = dir.join("kubeconfig");
                api.write_kubeconfig(&kubeconfig).unwrap();
                api.apply(
                    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"},
                    "status": {"addresses": [{"type": "InternalIP", "address": "172.18.0.2"}]}}),
                );
                (Feed::Api(api), ("--kubeconfig", kubeconfig))
            }
        };
        let mut states = BTreeMap::new();
        let first = trigger_after(None);
        feed.apply(&service());
        feed.apply(&slice([true; 3], &first));
        states.insert(first.clone(), [true; 3]);
        let agent = Agent::start_with(
            cluster.node_ns(0),
            "node1",
            "172.18.0.2",
            (source.0, &source.1),
            &pins,
        );
        let mut bench = Bench {
            cluster,
            arrivals,
            _servers: (tcp, udp),
            _captures: captures,
            agent,
            bpffs,
            feed: Arc::new(feed),
            _dir: dir,
            states,
            programmed: Vec::new(),
        };
        bench.wait_programmed(&first);
        bench
    }

    fn pins(&self) -> PathBuf {
        self.bpffs.node("node1")
    }

    /// The devices' and the datapath's counters at one quiet moment: read
    /// again until the devices' counters did not move while the datapath's
    /// were read.
    fn read_counters(&self) -> Counters {
        let node = self.cluster.node_ns(0);
        let rx = || -> (u64, u64) {
            let out = node.exec("ip", &["-j", "-s", "link", "show"]).unwrap();
            let links: Value = serde_json::from_slice(&out.stdout).unwrap();
            let pods = &self.cluster.nodes[0].pod_devices;
            let (mut eth0, mut on_pods) = (0, 0);
            for l in links.as_array().unwrap() {
                let name = l["ifname"].as_str().unwrap_or_default();
                let n = l["stats64"]["rx"]["packets"].as_u64().unwrap_or(0);
                if name == "eth0" {
                    eth0 = n;
                } else if pods.iter().any(|p| p == name) {
                    on_pods += n;
                }
            }
            (eth0, on_pods)
        };
        for _ in 0..50 {
            let first = rx();
            let rows = inspect(&self.pins(), &["stats"]);
            let hook = |h: &str| -> u64 {
                rows.as_array()
                    .unwrap()
                    .iter()
                    .filter(|r| r["hook"] == h)
                    .map(|r| r["packets"].as_u64().unwrap())
                    .sum()
            };
            if rx() == first {
                return Counters {
                    eth0_rx: first.0,
                    pods_rx: first.1,
                    xdp: hook("xdp"),
                    tc_ingress: hook("tc/ingress"),
                };
            }
        }
        panic!("node1's devices never quiet");
    }

    /// Reads the agent's log until a sync names `trigger`, recording every
    /// sync on the way.
    fn wait_programmed(&mut self, trigger: &str) {
        loop {
            let line = self.agent.wait_for(&["trigger="]);
            if let Some(sync) = parse_sync(&line) {
                let done = sync.trigger == trigger;
                self.programmed.push(sync);
                if done {
                    return;
                }
            }
        }
    }

    /// Churns for `seconds` at `rate` changes a second under traffic, and
    /// gathers what everyone saw.
    fn run(self, seconds: Duration, rate: f64) -> Report {
        self.run_sampled(seconds, rate, None).0
    }

    /// `run`, and with `sample_every`, samples of the agent and the maps
    /// taken all along.
    fn run_sampled(
        mut self,
        seconds: Duration,
        rate: f64,
        sample_every: Option<Duration>,
    ) -> (Report, Vec<Sample>) {
        let counters_before = self.read_counters();
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = sample_every.map(|every| {
            let stop = stop.clone();
            let (pid, pins) = (self.agent.child.id(), self.pins());
            std::thread::spawn(move || sample_until(pid, &pins, every, &stop))
        });
        let client = self.cluster.pod_ns(CLIENT);
        let tcp_vip: SocketAddr = format!("{VIP}:{TCP_PORT}").parse().unwrap();
        let udp_vip: SocketAddr = format!("{VIP}:{UDP_PORT}").parse().unwrap();
        // Long connections, opened before the churn.
        let long: Vec<LongConn> = (0..12)
            .map(|_| client.run(|| LongConn::open(tcp_vip)).unwrap())
            .collect();
        let long_worker = {
            let stop = stop.clone();
            client
                .spawn(move || hold_long_connections(long, &stop))
                .unwrap()
        };
        let short_workers: Vec<JoinHandle<Vec<ShortConn>>> = (0..2)
            .map(|_| {
                let stop = stop.clone();
                client
                    .spawn(move || short_connections(tcp_vip, 200.0, &stop))
                    .unwrap()
            })
            .collect();
        // Busy UDP flows, and sparse ones: idle across several syncs, so
        // that their backend may be removed (and another added) between
        // two of their requests.
        let udp_workers: Vec<JoinHandle<UdpFlow>> =
            [200.0, 200.0, 200.0, 200.0, 3.0, 3.0, 3.0, 3.0]
                .into_iter()
                .map(|per_second| {
                    let stop = stop.clone();
                    client
                        .spawn(move || udp_flow(udp_vip, per_second, &stop))
                        .unwrap()
                })
                .collect();

        // The churn: churner i % 3 toggles at change i.
        let started = Instant::now();
        let churn_started = SystemTime::now();
        let total = (seconds.as_secs_f64() * rate).round() as u64;
        let mut present = [true; 3];
        let mut last = self.states.keys().next_back().cloned();
        let mut written = Vec::with_capacity(total as usize);
        for i in 0..total {
            // Paced to a schedule (not to the agent): behind it, no pause.
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            present[(i % 3) as usize] ^= true;
            let trigger = trigger_after(last.as_deref());
            self.feed.apply(&slice(present, &trigger));
            written.push((trigger.clone(), present));
            last = Some(trigger);
        }
        let churn_took = started.elapsed();
        for (t, p) in written {
            self.states.insert(t, p);
        }
        let last = last.unwrap();
        self.wait_programmed(&last);
        // Traffic a little past the last change, then everyone reports.
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::SeqCst);
        let long = long_worker.join().unwrap();
        let short: Vec<ShortConn> = short_workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        let udp: Vec<UdpFlow> = udp_workers.into_iter().map(|w| w.join().unwrap()).collect();
        let samples = sampler.map(|s| s.join().unwrap()).unwrap_or_default();
        let counters = (counters_before, self.read_counters());
        let arrivals = self.arrivals.lock().unwrap().clone();
        let report = Report {
            changes: total,
            churn_took,
            churn_started,
            states: self.states.clone(),
            programmed: self.programmed.clone(),
            arrivals,
            short,
            long,
            udp,
            counters,
            _bench: self,
        };
        (report, samples)
    }
}

/// Packets node1's devices received, and the verdicts its programs gave.
#[derive(Clone, Debug, Default)]
struct Counters {
    eth0_rx: u64,
    pods_rx: u64,
    xdp: u64,
    tc_ingress: u64,
}

/// The agent and the maps at one time of a soak.
#[derive(Clone, Debug)]
struct Sample {
    elapsed: Duration,
    /// The agent's resident memory.
    rss_kib: u64,
    /// Conntrack entries (live or expired, until collected).
    ct_entries: u64,
    /// `DP_BACKENDS` entries, retired ones included (until collected).
    backend_entries: u64,
    /// Packets counted over every hook and reason.
    packets: u64,
}

fn sample_until(
    pid: u32,
    pins: &std::path::Path,
    every: Duration,
    stop: &AtomicBool,
) -> Vec<Sample> {
    let started = Instant::now();
    let mut out = Vec::new();
    eprintln!("soak: elapsed_s agent_rss_kib ct_entries backend_entries packets");
    for n in 0.. {
        // Paced to a schedule, waking often enough to stop with the run.
        let due = started + every * n;
        while Instant::now() < due {
            if stop.load(Ordering::SeqCst) {
                return out;
            }
            std::thread::sleep(Duration::from_millis(50).min(due - Instant::now()));
        }
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        let maps = inspect(pins, &["status"]);
        let entries = |name: &str| -> u64 {
            maps["maps"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["name"] == name)
                .and_then(|m| m["entries"].as_u64())
                .unwrap()
        };
        let ct_entries = entries(common::map_names::CT);
        let backend_entries = entries(common::map_names::BACKENDS);
        let packets = inspect(pins, &["stats"])
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["packets"].as_u64().unwrap())
            .sum();
        let sample = Sample {
            elapsed: started.elapsed(),
            rss_kib,
            ct_entries,
            backend_entries,
            packets,
        };
        eprintln!(
            "soak: {:.0} {} {} {} {}",
            sample.elapsed.as_secs_f64(),
            sample.rss_kib,
            sample.ct_entries,
            sample.backend_entries,
            sample.packets
        );
        out.push(sample);
    }
    out
}

/// A trigger time after `last` (RFC 3339, nanoseconds): now, or 1 ns past
/// `last` if the clock has not moved.
fn trigger_after(last: Option<&str>) -> String {
    let mut now = jiff::Timestamp::now();
    if let Some(last) = last.and_then(|l| l.parse::<jiff::Timestamp>().ok()) {
        if now <= last {
            now = last + jiff::SignedDuration::from_nanos(1);
        }
    }
    // Always with nine digits, so the strings sort as the times do.
    format!("{now:.9}")
}

fn time_of(trigger: &str) -> SystemTime {
    SystemTime::from(trigger.parse::<jiff::Timestamp>().unwrap())
}

/// The churning Service: TCP 80 -> 8080, UDP 53 -> 5353.
fn service() -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "churn", "namespace": "default"},
        "spec": {"clusterIP": VIP, "ports": [
            {"name": "tcp", "port": TCP_PORT, "targetPort": TCP_TARGET, "protocol": "TCP"},
            {"name": "udp", "port": UDP_PORT, "targetPort": UDP_TARGET, "protocol": "UDP"}]}})
}

fn pod_ip(name: &str) -> String {
    // pod-<node>-<n> is 10.244.<node>.<10 + n> (e2e::Cluster).
    let mut parts = name.split('-').skip(1);
    let node: u8 = parts.next().unwrap().parse().unwrap();
    let n: u8 = parts.next().unwrap().parse().unwrap();
    format!("10.244.{node}.{}", 10 + n)
}

/// The Service's one slice: the stayers and the churners `present`.
fn slice(present: [bool; 3], trigger: &str) -> Value {
    let endpoints: Vec<Value> = STAYERS
        .iter()
        .chain(
            CHURNERS
                .iter()
                .zip(present)
                .filter(|(_, p)| *p)
                .map(|(c, _)| c),
        )
        .map(|pod| {
            let node = format!("node{}", &pod[4..5]);
            json!({"addresses": [pod_ip(pod)], "nodeName": node,
                "targetRef": {"kind": "Pod", "name": pod, "namespace": "default"},
                "conditions": {"ready": true, "serving": true, "terminating": false}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "churn-1", "namespace": "default",
            "labels": {"kubernetes.io/service-name": "churn"},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": trigger}},
        "addressType": "IPv4",
        "ports": [{"name": "tcp", "port": TCP_TARGET, "protocol": "TCP"},
                  {"name": "udp", "port": UDP_TARGET, "protocol": "UDP"}],
        "endpoints": endpoints})
}

/// A sync's log line: `<time> INFO ...: synced ... trigger=<t> ...
/// began=<t>` (also the periodic resync's, which programs pending changes
/// too).
fn parse_sync(line: &str) -> Option<Sync> {
    let field = |name: &str| -> Option<&str> {
        let at = line.find(&format!(" {name}="))? + name.len() + 2;
        let rest = &line[at..];
        let end = rest.find(' ').unwrap_or(rest.len());
        Some(rest[..end].trim_matches('"'))
    };
    let trigger = field("trigger")?;
    if trigger.is_empty() {
        return None;
    }
    // When it began, as the agent computed it (the line's own time may
    // come later than its fields were computed, by a preemption).
    let began = time_of(field("began")?);
    let done = time_of(line.split_whitespace().next()?);
    Some(Sync {
        start: began,
        done,
        trigger: trigger.to_string(),
    })
}

/// One short connection: connect, one exchange, close with a reset (no
/// TIME_WAIT, so the client's ports last the run).
#[derive(Clone, Debug)]
struct ShortConn {
    sent: SystemTime,
    ended: SystemTime,
    port: Option<u16>,
    outcome: Result<String, String>,
    /// The connect itself failed (refused, timed out).
    connect_failed: bool,
}

fn short_connections(vip: SocketAddr, per_second: f64, stop: &AtomicBool) -> Vec<ShortConn> {
    let mut out = Vec::new();
    let started = Instant::now();
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let due = started + Duration::from_secs_f64(i as f64 / per_second);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        i += 1;
        let sent = SystemTime::now();
        let (port, conn) = connect_from_known_port(vip);
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                out.push(ShortConn {
                    sent,
                    ended: SystemTime::now(),
                    port: Some(port),
                    outcome: Err(format!("connect: {e}")),
                    connect_failed: e.kind() != std::io::ErrorKind::ConnectionReset,
                });
                continue;
            }
        };
        let port = Some(port);
        let outcome = exchange_first(&conn, b"x");
        let _ = e2e::rst_on_close(&conn);
        drop(conn);
        out.push(ShortConn {
            sent,
            ended: SystemTime::now(),
            port,
            outcome,
            connect_failed: false,
        });
    }
    out
}

/// A TCP connection to `to` from a port bound first, so that a connect
/// that fails still says which port it was from (the backends log ports).
/// A reset during connect means the handshake completed: the backend saw
/// it.
fn connect_from_known_port(to: SocketAddr) -> (u16, std::io::Result<TcpStream>) {
    use std::os::fd::FromRawFd as _;
    let last = std::io::Error::last_os_error;
    // SAFETY: plain socket calls on a descriptor this function owns; the
    // address structures are valid for their lengths.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", last());
        let stream = TcpStream::from_raw_fd(fd);
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as u16;
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let rc = libc::bind(fd, (&addr as *const libc::sockaddr_in).cast(), len);
        assert_eq!(rc, 0, "bind: {}", last());
        let mut len_out = len;
        let rc = libc::getsockname(
            fd,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len_out,
        );
        assert_eq!(rc, 0, "getsockname: {}", last());
        let port = u16::from_be(addr.sin_port);
        // A blocking connect gives up after SO_SNDTIMEO.
        stream
            .set_write_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let SocketAddr::V4(v4) = to else {
            unreachable!("IPv4 Service")
        };
        let mut dst: libc::sockaddr_in = std::mem::zeroed();
        dst.sin_family = libc::AF_INET as u16;
        dst.sin_port = v4.port().to_be();
        dst.sin_addr.s_addr = u32::from(*v4.ip()).to_be();
        if libc::connect(fd, (&dst as *const libc::sockaddr_in).cast(), len) != 0 {
            return (port, Err(last()));
        }
        (port, Ok(stream))
    }
}

/// Sends `payload` and reads the identity line and the echo: the backend.
fn exchange_first(mut conn: &TcpStream, payload: &[u8]) -> Result<String, String> {
    conn.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    conn.write_all(payload).map_err(|e| format!("send: {e}"))?;
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        let n = conn.read(&mut buf).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err(format!("closed after {got:?}"));
        }
        got.extend_from_slice(&buf[..n]);
        if let Some((name, _, echo)) = e2e::parse_identity(&got) {
            if echo.len() >= payload.len() {
                return Ok(name);
            }
        }
    }
}

/// A connection held open through the churn, exchanging all along.
struct LongConn {
    conn: TcpStream,
    backend: String,
    exchanges: u64,
    failed: Option<(SystemTime, std::io::ErrorKind, String)>,
}

impl LongConn {
    fn open(vip: SocketAddr) -> LongConn {
        let conn = TcpStream::connect_timeout(&vip, Duration::from_secs(2)).unwrap();
        let backend = exchange_first(&conn, b"hello").unwrap();
        // A connection whose backend goes is reset; one that stalls fails.
        conn.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        LongConn {
            conn,
            backend,
            exchanges: 1,
            failed: None,
        }
    }

    fn exchange(&mut self) {
        if self.failed.is_some() {
            return;
        }
        let r = (|| -> std::io::Result<()> {
            let mut c = &self.conn;
            c.write_all(b"ping")?;
            let mut buf = [0u8; 4];
            c.read_exact(&mut buf)?;
            if &buf != b"ping" {
                return Err(std::io::Error::other(format!("echo {buf:?}")));
            }
            Ok(())
        })();
        match r {
            Ok(()) => self.exchanges += 1,
            Err(e) => self.failed = Some((SystemTime::now(), e.kind(), e.to_string())),
        }
    }
}

fn hold_long_connections(mut conns: Vec<LongConn>, stop: &AtomicBool) -> Vec<LongConn> {
    while !stop.load(Ordering::SeqCst) {
        for c in &mut conns {
            c.exchange();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    conns
}

/// One UDP flow (one client port) sending a numbered request at a time.
#[derive(Debug, Default)]
struct UdpFlow {
    port: u16,
    /// Send time of each request, by number.
    sent: Vec<SystemTime>,
    /// Requests answered: (number, backend, reply source).
    answered: Vec<(usize, String, SocketAddr)>,
    /// Requests not answered within a second.
    lost: Vec<usize>,
}

fn udp_flow(vip: SocketAddr, per_second: f64, stop: &AtomicBool) -> UdpFlow {
    let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut flow = UdpFlow {
        port: sock.local_addr().unwrap().port(),
        ..UdpFlow::default()
    };
    let started = Instant::now();
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::SeqCst) {
        let n = flow.sent.len();
        let due = started + Duration::from_secs_f64(n as f64 / per_second);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        flow.sent.push(SystemTime::now());
        // Unconnected: a reply from any address is seen, not filtered.
        sock.send_to(format!("{n}").as_bytes(), vip).unwrap();
        let deadline = Instant::now() + Duration::from_secs(1);
        let answered = loop {
            if Instant::now() >= deadline {
                break false;
            }
            let Ok((len, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            let Some((backend, _, echo)) = e2e::parse_identity(&buf[..len]) else {
                continue;
            };
            let number: Option<usize> =
                std::str::from_utf8(&echo).ok().and_then(|s| s.parse().ok());
            if number == Some(n) {
                flow.answered.push((n, backend, from));
                break true;
            }
            // A late answer to an earlier request: already counted lost.
        };
        if !answered {
            flow.lost.push(n);
        }
    }
    flow
}

/// Everything a churn run saw.
struct Report {
    changes: u64,
    churn_took: Duration,
    churn_started: SystemTime,
    states: BTreeMap<String, [bool; 3]>,
    programmed: Vec<Sync>,
    arrivals: Vec<Arrival>,
    short: Vec<ShortConn>,
    long: Vec<LongConn>,
    udp: Vec<UdpFlow>,
    /// Before the traffic, and after it stopped.
    counters: (Counters, Counters),
    _bench: Bench,
}

fn churner_index(name: &str) -> Option<usize> {
    CHURNERS.iter().position(|c| *c == name)
}

impl Report {
    /// The churners' presence as sync `i` programmed it.
    fn state(&self, i: usize) -> [bool; 3] {
        self.states[&self.programmed[i].trigger]
    }

    /// Whether `backend` could take a new flow sent at `sent` and seen at
    /// `seen`: in the state programmed last before `sent`, or in one that
    /// a sync under way by `seen` was writing.
    fn may_take(&self, backend: &str, sent: SystemTime, seen: SystemTime) -> bool {
        let Some(c) = churner_index(backend) else {
            return STAYERS.contains(&backend);
        };
        // Syncs are in log order: their times and trigger times only grow.
        let k = self
            .programmed
            .partition_point(|s| s.done <= sent)
            .checked_sub(1)
            .expect("the first sync precedes all traffic");
        (k..self.programmed.len())
            .take_while(|&j| j == k || self.programmed[j].start <= seen)
            .any(|j| self.state(j)[c])
    }

    /// Whether a sync that overlapped `[from, to]` removed `backend`.
    fn removed_during(&self, backend: &str, from: SystemTime, to: SystemTime) -> bool {
        let Some(c) = churner_index(backend) else {
            return false;
        };
        let first = self.programmed.partition_point(|s| s.done < from);
        (first..self.programmed.len())
            .take_while(|&j| self.programmed[j].start <= to)
            .any(|j| !self.state(j)[c])
    }

    /// Lag from each change to the sync that programmed it, sorted.
    fn lags(&self) -> Vec<Duration> {
        let mut lags: Vec<Duration> = self
            .states
            .keys()
            .filter(|t| time_of(t) >= self.churn_started)
            .map(|t| {
                let j = self
                    .programmed
                    .partition_point(|s| s.trigger.as_str() < t.as_str());
                let sync = self
                    .programmed
                    .get(j)
                    .unwrap_or_else(|| panic!("change {t} never programmed"));
                sync.done.duration_since(time_of(t)).unwrap_or_default()
            })
            .collect();
        lags.sort();
        lags
    }

    fn assert_clean(&self, rate: f64) {
        let mut problems: Vec<String> = Vec::new();
        // Client ports -> send times of the short connections from them;
        // ports -> TCP arrivals (both in time order).
        let mut sent_from: BTreeMap<u16, Vec<SystemTime>> = BTreeMap::new();
        for c in &self.short {
            if let Some(port) = c.port {
                sent_from.entry(port).or_default().push(c.sent);
            }
        }
        let mut syns_from: BTreeMap<u16, Vec<&Arrival>> = BTreeMap::new();
        for a in self.arrivals.iter().filter(|a| a.protocol == "tcp") {
            syns_from.entry(a.peer.port()).or_default().push(a);
        }
        // 1. No arrival at a backend after its removal was programmed.
        let (mut tcp_checked, mut udp_checked) = (0usize, 0usize);
        for a in &self.arrivals {
            if a.at < self.churn_started {
                continue;
            }
            let sent = if a.protocol == "udp" {
                udp_checked += 1;
                self.udp_sent_before(a.peer.port(), a.at)
            } else {
                tcp_checked += 1;
                sent_from
                    .get(&a.peer.port())
                    .and_then(|sent| sent.iter().rev().find(|s| **s <= a.at).copied())
            };
            let Some(sent) = sent else {
                problems.push(format!("{a:?}: no client sent it"));
                continue;
            };
            if !self.may_take(&a.backend, sent, a.at) {
                problems.push(format!(
                    "{}: a flow sent at {} reached it at {}, after its removal was programmed",
                    a.backend,
                    fmt_time(sent),
                    fmt_time(a.at)
                ));
            }
        }
        // 2. Short connections: none refused or timed out; a reset only
        // where its backend was removed meanwhile.
        let mut resets_after_removal = 0;
        for c in &self.short {
            let Err(e) = &c.outcome else { continue };
            if c.connect_failed {
                problems.push(format!("connect at {} failed: {e}", fmt_time(c.sent)));
                continue;
            }
            // Its backend: the first to see a SYN from its port after it
            // was sent.
            let backend = c.port.and_then(|port| {
                syns_from
                    .get(&port)?
                    .iter()
                    .find(|a| a.at >= c.sent && a.at <= c.ended + Duration::from_millis(100))
                    .map(|a| a.backend.clone())
            });
            match backend {
                Some(b) if self.removed_during(&b, c.sent, c.ended) => resets_after_removal += 1,
                b => problems.push(format!(
                    "connection at {} to {b:?} failed, its backend not removed: {e}",
                    fmt_time(c.sent)
                )),
            }
        }
        // 3. Long connections to backends that stay: never broken; to
        // churning ones: reset when their backend goes, never left to stall.
        for c in &self.long {
            let Some((at, kind, e)) = &c.failed else {
                continue;
            };
            if STAYERS.contains(&c.backend.as_str()) || *kind != std::io::ErrorKind::ConnectionReset
            {
                problems.push(format!(
                    "long connection to {} broke at {} after {} exchanges: {e}",
                    c.backend,
                    fmt_time(*at),
                    c.exchanges
                ));
            }
        }
        // 4. UDP: every request answered, from the Service's address.
        let vip: SocketAddr = format!("{VIP}:{UDP_PORT}").parse().unwrap();
        for f in &self.udp {
            for n in &f.lost {
                problems.push(format!(
                    "UDP request {n} from port {} at {} not answered",
                    f.port,
                    fmt_time(f.sent[*n])
                ));
            }
            for (n, backend, from) in &f.answered {
                if *from != vip {
                    problems.push(format!(
                        "UDP request {n} from port {} answered by {backend} from {from}, not {vip}",
                        f.port
                    ));
                }
            }
        }
        // Connections whose SYN a backend saw more than once (a retransmit:
        // the first SYN or its answer was lost).
        let mut resent = Vec::new();
        for c in &self.short {
            let Some(port) = c.port else { continue };
            let syns: Vec<&&Arrival> = syns_from
                .get(&port)
                .map(|v| {
                    v.iter()
                        .filter(|a| a.at >= c.sent && a.at <= c.ended)
                        .collect()
                })
                .unwrap_or_default();
            if syns.len() > 1 {
                resent.push(format!(
                    "{}: {:?} ({:?})",
                    fmt_time(c.sent),
                    syns.iter()
                        .map(|a| (a.backend.clone(), fmt_time(a.at)))
                        .collect::<Vec<_>>(),
                    c.outcome
                ));
            }
        }
        if std::env::var_os("DP_CHURN_DEBUG").is_some() {
            eprintln!(
                "SYN seen more than once: {}\n{}",
                resent.len(),
                resent.join("\n")
            );
        }
        let lags = self.lags();
        let pct = |p: f64| lags[((lags.len() - 1) as f64 * p).round() as usize];
        let held = self.changes as f64 / self.churn_took.as_secs_f64();
        let short_ok = self.short.iter().filter(|c| c.outcome.is_ok()).count();
        let udp_sent: usize = self.udp.iter().map(|f| f.sent.len()).sum();
        let long_reset = self.long.iter().filter(|c| c.failed.is_some()).count();
        let long_exchanges: u64 = self.long.iter().map(|c| c.exchanges).sum();
        let to_churners = self
            .arrivals
            .iter()
            .filter(|a| a.at >= self.churn_started && churner_index(&a.backend).is_some())
            .count();
        eprintln!(
            "churn: {} changes in {:.2} s ({held:.0}/s), {} syncs; lag change -> map p50 {:.1} ms, \
             p99 {:.1} ms, max {:.1} ms\n\
             traffic: {} short TCP connections ({short_ok} served, {resets_after_removal} reset after \
             their backend's removal), {} long ones ({long_exchanges} exchanges; {long_reset} to churning \
             backends reset), {udp_sent} UDP \
             requests; {tcp_checked} TCP and {udp_checked} UDP arrivals checked at the backends \
             ({to_churners} at churning ones); {} connections' SYN seen twice (DP_CHURN_DEBUG=1 lists them)",
            self.changes,
            self.churn_took.as_secs_f64(),
            self.programmed.len(),
            ms(pct(0.5)),
            ms(pct(0.99)),
            ms(*lags.last().unwrap()),
            self.short.len(),
            self.long.len(),
            resent.len(),
        );
        assert!(
            problems.is_empty(),
            "{} problems under churn:\n{}",
            problems.len(),
            problems
                .iter()
                .take(40)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
        // The churn was what it says, and traffic reached churning backends.
        assert!(held >= rate * 0.9, "only {held:.0} changes/s held");
        assert!(to_churners > 0, "no traffic reached a churning backend");
        assert!(short_ok > 0 && udp_sent > 0);
    }

    /// Every packet node1's devices received while the run went on got a
    /// verdict: XDP one for each packet eth0 received; tc ingress one for
    /// each the pod devices received and at most one for each XDP let
    /// through (the rest XDP forwarded or dropped itself).
    fn assert_counters_add_up(&self) {
        let (b, a) = (&self.counters.0, &self.counters.1);
        let eth0 = a.eth0_rx - b.eth0_rx;
        let pods = a.pods_rx - b.pods_rx;
        let xdp = a.xdp - b.xdp;
        let tc = a.tc_ingress - b.tc_ingress;
        eprintln!(
            "counters over the run: eth0 received {eth0}, XDP verdicts {xdp}; pod devices received \
             {pods}, tc ingress verdicts {tc} (between {pods} and {})",
            pods + eth0
        );
        assert_eq!(xdp, eth0, "XDP verdicts vs packets eth0 received");
        assert!(
            (pods..=pods + eth0).contains(&tc),
            "tc ingress verdicts {tc} vs {pods} received by the pod devices and {eth0} by eth0"
        );
    }

    /// The send time of the request of UDP flow `port` that arrived at
    /// `at`: its last one sent before.
    fn udp_sent_before(&self, port: u16, at: SystemTime) -> Option<SystemTime> {
        let f = self.udp.iter().find(|f| f.port == port)?;
        let i = f.sent.partition_point(|s| *s <= at).checked_sub(1)?;
        Some(f.sent[i])
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn fmt_time(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t)
        .map(|t| format!("{t:.6}"))
        .unwrap_or_default()
}
