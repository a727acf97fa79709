//! `dp-bench`: dp against kube-proxy's iptables mode (nft and legacy
//! backends) and nftables mode, on the same kernel, from the same input, in
//! one run; pod-to-pod traffic without a service as the floor. `cargo xtask
//! bench` runs it; BENCHMARKS.md explains the figures.
//!
//! For every N (services x 10 endpoints) and dataplane: a fresh namespace
//! cluster (one node, ten backend pods, a client pod, an external client),
//! the dataplane loaded once (load time, kernel memory, agent RSS). Then,
//! each repeated `--runs` times, a round over all dataplanes of that N
//! (their clusters side by side, the order rotating by run): new-connection latency to the ClusterIP a
//! linear rule walk meets last and to random ones, the new-connection rate
//! of a multi-threaded client, established request/response latency, UDP
//! packets per second, the same for NodePorts from the external client,
//! and finally one-endpoint changes (kube-proxy's partial sync vs dp's map
//! updates). Results: JSON, markdown tables and SVG plots in `--out`.

mod loadgen;
mod report;
mod scenario;

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use clap::Parser;
use serde::{Deserialize, Serialize};

use loadgen::{summary, Latencies, Servers, Summary};
use scenario::{Dataplane, Input};

#[derive(Parser)]
#[command(
    about = "dp vs kube-proxy (iptables, nftables): latency, rates, sync times, memory",
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    action: Option<Action>,
    /// A short run that proves the harness (N up to 1 000, a few seconds per point).
    #[arg(long)]
    quick: bool,
    /// Service counts (default 1,1000,10000; --quick: 1,1000).
    #[arg(long, value_delimiter = ',')]
    services: Option<Vec<usize>>,
    /// Also N = 30 000 (a full iptables-restore of it takes a long time).
    #[arg(long)]
    with_30k: bool,
    /// Repetitions of every traffic measurement (default 3; --quick 2).
    #[arg(long)]
    runs: Option<usize>,
    /// Dataplanes (default all: direct,dp,dp-socket-lb,iptables-nft,iptables-legacy,nftables).
    #[arg(long, value_delimiter = ',')]
    dataplanes: Option<Vec<String>>,
    /// Where results.json, tables.md and the plots go.
    #[arg(long, default_value = "target/dp-bench")]
    out: PathBuf,
    /// Replace the generated section of this markdown file with the tables.
    #[arg(long)]
    update_markdown: Option<PathBuf>,
    /// Longest a kube-proxy mode's first full sync may take; a dataplane
    /// that does not load in time is reported as such, without traffic figures.
    #[arg(long, default_value_t = 900)]
    load_timeout: u64,
    /// Keep the points of an earlier run in `--out/results.json` and
    /// measure only the missing ones.
    #[arg(long)]
    resume: bool,
    /// The command line to record in the results (what the user typed).
    #[arg(long, default_value = "cargo xtask bench")]
    command: String,
    /// `ipv6`: single-stack IPv6 Services on a dual-stack cluster, against
    /// kube-proxy's ip6tables rules and `table ip6`; its own section of the
    /// markdown file.
    #[arg(long, default_value = "ipv4", value_parser = ["ipv4", "ipv6"])]
    ip_family: String,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Render tables.md and the plots again from the results.json of an
    /// earlier run, measuring nothing (no root needed); results.json itself
    /// is left as it is.
    Report {
        /// The results.json to render.
        #[arg(long)]
        from: PathBuf,
        /// Where tables.md and the plots go (default: the directory of --from).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace the generated section of this markdown file with the tables.
        #[arg(long)]
        update_markdown: Option<PathBuf>,
    },
    /// Write the manifests the agent reads for N services (as the
    /// benchmark gives them to it) into a directory, and exit: for
    /// `cargo run --release -p dp --example agent_memory -- DIR`.
    WriteInput {
        #[arg(long)]
        services: usize,
        dir: PathBuf,
    },
    /// Where a new connection's tail comes from: for each dataplane (side
    /// by side, in rounds), new-connection latency to the last service on a
    /// fresh dataplane, then right after 10 s of the connection-rate load
    /// (conntrack full of closed flows), printed as a table.
    Tail {
        #[arg(long, default_value_t = 1)]
        services: usize,
        #[arg(long, value_delimiter = ',', default_value = "dp,nftables")]
        dataplanes: Vec<String>,
        /// New connections per phase.
        #[arg(long, default_value_t = 5000)]
        samples: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// What each of dp's programs costs per new connection: the kernel's
    /// BPF run-time statistics (on only while this runs: BPF_ENABLE_STATS)
    /// over the connection-rate load from the client pod and from the
    /// node, per program of each dataplane's agent, printed as a table.
    HookCost {
        #[arg(long, default_value_t = 1)]
        services: usize,
        #[arg(long, value_delimiter = ',', default_value = "dp,dp-socket-lb")]
        dataplanes: Vec<String>,
        /// Seconds of load per client.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// Socket LB's target judged on pairs: each dataplane on its own
    /// cluster, all loaded at once; many short rounds over them in a
    /// rotating order, each measuring new connections/s and the first
    /// connection's p50 (to the last service and to random ones) from the
    /// client pod and from the node; every figure compared with the first
    /// dataplane's (`direct`) of the same round, and the median of those
    /// ratios (with their quartiles) printed. The machine's speed drifts
    /// between rounds by more than the target's margin: the main run's
    /// medians of three runs cannot say met or missed within 3%.
    Pair {
        #[arg(long, default_value_t = 1)]
        services: usize,
        /// The first is the reference.
        #[arg(long, value_delimiter = ',', default_value = "direct,dp,dp-socket-lb")]
        dataplanes: Vec<String>,
        // `--first`: each to the last service, then as many to random ones.
        #[command(flatten)]
        rounds: Rounds,
    },
    /// What a tc program on every device of the path costs a new
    /// connection, whatever it does: on one cluster without a dataplane,
    /// connections from the node and from a pod straight to the pods, in
    /// rounds with nothing attached, with a no-op tc program (`dp_tc_noop`),
    /// with dp's tc programs (no services: every packet is a pass-through;
    /// the pass-through filter on, as the agent runs them) on the devices
    /// the agent attaches to, and with those and dp's socket
    /// hooks (`--socket-lb all`, on a cgroup of the run's own that the
    /// clients join). Printed as a table of new connections/s and their
    /// ratio to nothing attached in the same round.
    TcFloor {
        /// Rounds over the four.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Seconds of load per client and round.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Also the kernel's BPF run-time statistics (`BPF_ENABLE_STATS`,
        /// on for the whole run): ns per tc program run (tc programs only)
        /// and per connection (every program, socket hooks included), the
        /// no-op's beside dp's. The statistics' own clock reads add to
        /// every variant with a program, so the rates of such a run are not
        /// those of one without.
        #[arg(long)]
        run_time: bool,
    },
    /// Socket LB's target on one cluster: `pair` compares clusters, and
    /// two clusters without any dataplane differ by more than the target's
    /// margin. Here one cluster without a dataplane serves both sides of
    /// each round, in a rotating order: `direct` (nothing attached, the
    /// clients connect to the pods) and `dp-socket-lb` (dp's programs, as
    /// the agent attaches them with `--socket-lb all`, with the N Services'
    /// ClusterIPs and the pass-through filter on; the clients connect to
    /// the ClusterIPs from the socket hooks' cgroup). New connections/s and
    /// the first connection's p50 from the node and from the client pod,
    /// each compared with `direct` of the same round.
    SocketDirect {
        #[arg(long, default_value_t = 1)]
        services: usize,
        // `--first`: to random services, or for `direct` random pods.
        #[command(flatten)]
        rounds: Rounds,
    },
}

/// The rounds of `pair` and `socket-direct`.
#[derive(clap::Args, Clone, Copy, Debug)]
struct Rounds {
    #[arg(long, default_value_t = 21)]
    rounds: usize,
    /// Seconds of connection-rate load per client, side and round.
    #[arg(long, default_value_t = 1.5)]
    seconds: f64,
    /// First connections per client, side and round.
    #[arg(long, default_value_t = 200)]
    first: usize,
}

/// How much of each measurement one run does.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Settings {
    pub runs: usize,
    pub first_packets: usize,
    pub rr_round_trips: usize,
    pub rate_seconds: f64,
    pub udp_seconds: f64,
    pub client_threads: usize,
    pub changes: usize,
    pub client_cpu: Option<usize>,
    pub server_cpu: Option<usize>,
    /// Traffic runs as rounds over all dataplanes of an N (false in
    /// results of earlier runs, which measured one dataplane after another).
    #[serde(default, skip_serializing_if = "is_false")]
    pub interleaved: bool,
}

impl Settings {
    /// The settings of a tool run (`tail`, `hook-cost`, `pair`,
    /// `tc-floor`): TCP connections only, no round trips on established
    /// ones, no UDP, no endpoint changes; the client and the servers on
    /// CPUs of their own as in the main run.
    fn for_tool(runs: usize, first_packets: usize, rate_seconds: f64) -> Self {
        let (client_cpu, server_cpu) = pinned_cpus();
        Settings {
            runs,
            first_packets,
            rr_round_trips: 0,
            rate_seconds,
            udp_seconds: 0.0,
            client_threads: 4,
            changes: 0,
            client_cpu,
            server_cpu,
            interleaved: true,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: Option<Summary>,
    pub p90: Option<Summary>,
    pub p99: Option<Summary>,
    pub errors: u64,
}

/// Traffic figures for one entry point (ClusterIP from a pod, or NodePort
/// from the external client). Latencies in microseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Traffic {
    pub first_packet_last: Percentiles,
    pub first_packet_random: Percentiles,
    pub connections_per_second: Option<Summary>,
    pub rr_latency: Percentiles,
    pub udp_packets_per_second: Option<Summary>,
    pub errors: u64,
}

impl Traffic {
    /// Not measured (results of runs before this entry point existed).
    pub fn is_empty(&self) -> bool {
        self.first_packet_last.p50.is_none() && self.connections_per_second.is_none()
    }
}

/// dp-socket-lb only: the socket hooks' connect decisions over the whole
/// run (`dp stats`' `sock/connect4`/`sock/connect6` rows), the proof that
/// its clients were served at the socket and not by tc.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SocketConnects {
    /// `new_flow` and `new_flow_affinity`: the connect went to a backend.
    pub translated: u64,
    /// `sock_left_to_tc`: served by tc instead (none expected here).
    pub left_to_tc: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ChangeFigures {
    pub changes: usize,
    /// Until the dataplane has the change (kube-proxy: generate + tools;
    /// dp: file written until the agent logged its sync).
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// dp only: the agent's own time for the sync (translate + map writes).
    pub agent_p50_ms: Option<f64>,
    pub agent_p99_ms: Option<f64>,
}

impl ChangeFigures {
    /// p50/p99 of each change's total time and of the agent's own sync
    /// (dp only; empty for kube-proxy).
    fn from_durations(changes: usize, total: &[Duration], agent: &[Duration]) -> Self {
        let pct = |v: &[Duration], p: f64| {
            Latencies {
                samples_us: v.iter().map(|d| d.as_secs_f64() * 1e3).collect(),
                errors: 0,
            }
            .percentile(p)
        };
        ChangeFigures {
            changes,
            p50_ms: pct(total, 50.0).unwrap_or(f64::NAN),
            p99_ms: pct(total, 99.0).unwrap_or(f64::NAN),
            agent_p50_ms: pct(agent, 50.0),
            agent_p99_ms: pct(agent, 99.0),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Point {
    pub dataplane: Dataplane,
    pub services: usize,
    /// False: the first full sync did not finish within `load_seconds` and
    /// was stopped; nothing else was measured.
    #[serde(default = "finished")]
    pub load_finished: bool,
    /// Not attempted: this dataplane's first full sync had already not
    /// finished at this smaller N (a larger one only takes longer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_tried_after: Option<usize>,
    pub load_seconds: f64,
    /// Rules written (kube-proxy modes) or frontends programmed (dp).
    pub objects: usize,
    pub kernel_memory_bytes: u64,
    pub agent_rss_bytes: Option<u64>,
    pub cluster_ip: Traffic,
    pub node_port: Traffic,
    /// ClusterIP from a process in the node's network namespace (a host
    /// client); left out in results of runs before it was measured.
    #[serde(default, skip_serializing_if = "Traffic::is_empty")]
    pub from_node: Traffic,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_connects: Option<SocketConnects>,
    pub endpoint_change: Option<ChangeFigures>,
    /// dp only: the same changes as watch events from the (fake) API server
    /// to an agent with `--kubeconfig`, measured from the event to the
    /// agent's sync of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_change_watch: Option<ChangeFigures>,
    /// dp only: start to first sync of that `--kubeconfig` agent, its state
    /// listed from the (fake) API server instead of read from manifests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_seconds_watch: Option<f64>,
}

fn is_false(b: &bool) -> bool {
    !b
}

fn finished() -> bool {
    true
}

impl Point {
    /// A dataplane whose first full sync did not finish within
    /// `load_seconds` (or, with `not_tried_after`, was not attempted).
    pub fn not_loaded(
        dataplane: Dataplane,
        services: usize,
        load_seconds: f64,
        not_tried_after: Option<usize>,
    ) -> Self {
        Point {
            dataplane,
            services,
            load_finished: false,
            not_tried_after,
            load_seconds,
            objects: 0,
            kernel_memory_bytes: 0,
            agent_rss_bytes: None,
            cluster_ip: Traffic::default(),
            node_port: Traffic::default(),
            from_node: Traffic::default(),
            socket_connects: None,
            endpoint_change: None,
            endpoint_change_watch: None,
            load_seconds_watch: None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    pub nproc: usize,
    pub kernel: String,
    pub cpu: String,
    pub iptables: String,
    pub nft: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Results {
    pub schema: String,
    pub command: String,
    pub quick: bool,
    pub started: String,
    pub machine: Machine,
    pub settings: Settings,
    /// `ipv4` (left out, as in results of earlier runs) or `ipv6`.
    #[serde(default = "ipv4", skip_serializing_if = "is_ipv4")]
    pub ip_family: String,
    pub points: Vec<Point>,
}

fn ipv4() -> String {
    "ipv4".into()
}

fn is_ipv4(family: &str) -> bool {
    family == "ipv4"
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(Action::Report {
        from,
        out,
        update_markdown,
    }) = &args.action
    {
        return rerender(from, out.as_deref(), update_markdown.as_deref());
    }
    if let Some(Action::WriteInput { services, dir }) = &args.action {
        let input = scenario::Input {
            n: *services,
            moved: Vec::new(),
        };
        return input.write_dir(dir);
    }
    e2e::require_root();
    scenario::use_ipv6(args.ip_family == "ipv6");
    if let Some(Action::Tail {
        services,
        dataplanes,
        samples,
        rounds,
    }) = &args.action
    {
        return tail(*services, dataplanes, *samples, *rounds);
    }
    if let Some(Action::HookCost {
        services,
        dataplanes,
        seconds,
    }) = &args.action
    {
        return hook_cost(*services, dataplanes, *seconds);
    }
    if let Some(Action::Pair {
        services,
        dataplanes,
        rounds,
    }) = &args.action
    {
        return pair(*services, dataplanes, *rounds);
    }
    if let Some(Action::TcFloor {
        rounds,
        seconds,
        run_time,
    }) = &args.action
    {
        return tc_floor(*rounds, *seconds, *run_time);
    }
    if let Some(Action::SocketDirect { services, rounds }) = &args.action {
        return socket_direct(*services, *rounds);
    }
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (client_cpu, server_cpu) = pinned_cpus();
    let settings = if args.quick {
        Settings {
            runs: args.runs.unwrap_or(2),
            first_packets: 200,
            rr_round_trips: 500,
            rate_seconds: 1.0,
            udp_seconds: 0.5,
            client_threads: 4,
            changes: 10,
            client_cpu,
            server_cpu,
            interleaved: true,
        }
    } else {
        Settings {
            runs: args.runs.unwrap_or(3),
            first_packets: 1000,
            rr_round_trips: 5000,
            rate_seconds: 10.0,
            udp_seconds: 3.0,
            client_threads: 4,
            changes: 100,
            client_cpu,
            server_cpu,
            interleaved: true,
        }
    };
    let mut ns = args.services.clone().unwrap_or_else(|| {
        if args.quick {
            vec![1, 1000]
        } else {
            vec![1, 1000, 10_000]
        }
    });
    if args.with_30k {
        ns.push(30_000);
    }
    let dataplanes: Vec<Dataplane> = match &args.dataplanes {
        Some(list) => list
            .iter()
            .map(|d| Dataplane::parse(d).with_context(|| format!("unknown dataplane {d}")))
            .collect::<Result<_>>()?,
        None => {
            // Socket LB attaches to a cgroup v2 directory: without the
            // hierarchy the others are still measured.
            let socket_lb = dp::agent::cgroup2_root().is_some();
            if !socket_lb {
                progress("no cgroup v2 hierarchy mounted: dp-socket-lb is left out");
            }
            Dataplane::ALL
                .into_iter()
                .filter(|d| socket_lb || *d != Dataplane::DpSocketLb)
                .collect()
        }
    };
    std::fs::create_dir_all(&args.out)?;
    let work = std::env::temp_dir().join(format!("dp-bench-{}", std::process::id()));
    let mut results = Results {
        schema: "dp.bench/v1".into(),
        command: args.command.clone(),
        quick: args.quick,
        started: jiff::Timestamp::now().to_string(),
        machine: machine(nproc),
        settings: settings.clone(),
        ip_family: args.ip_family.clone(),
        points: Vec::new(),
    };
    let earlier = args.out.join("results.json");
    if args.resume && earlier.exists() {
        let old = report::read(&earlier).context("reading the earlier results")?;
        if old.quick != args.quick {
            bail!("--resume: the earlier run's --quick differs");
        }
        if old.ip_family != args.ip_family {
            bail!("--resume: the earlier run's --ip-family differs");
        }
        results.started = old.started;
        results.settings = old.settings;
        results.points = old.points;
    }
    let bench_start = Instant::now();
    for &n in &ns {
        let mut todo = Vec::new();
        for &dataplane in &dataplanes {
            if results
                .points
                .iter()
                .any(|p| p.dataplane == dataplane && p.services == n)
            {
                continue;
            }
            let failed_before = results
                .points
                .iter()
                .filter(|p| p.dataplane == dataplane && !p.load_finished && p.services < n)
                .map(|p| p.services)
                .min();
            if let Some(smaller) = failed_before {
                progress(&format!(
                    "{} at N = {n}: not tried, its first full sync did not finish at N = {smaller}",
                    dataplane.name()
                ));
                results.points.push(Point::not_loaded(
                    dataplane,
                    n,
                    args.load_timeout as f64,
                    Some(smaller),
                ));
            } else {
                todo.push(dataplane);
            }
        }
        if todo.is_empty() {
            continue;
        }
        progress(&format!(
            "N = {n} services x 10 endpoints: {} ({:.0} s so far)",
            todo.iter().map(|d| d.name()).collect::<Vec<_>>().join(", "),
            bench_start.elapsed().as_secs_f64()
        ));
        let limit = Duration::from_secs(args.load_timeout);
        let points = measure_points(&todo, n, &results.settings.clone(), &work, limit)
            .with_context(|| format!("N={n}"))?;
        results.points.extend(points);
        // Written after every N: a long run that stops keeps its figures.
        report::write(&results, &args.out)?;
    }
    let _ = std::fs::remove_dir_all(&work);
    report::write(&results, &args.out)?;
    if let Some(md) = &args.update_markdown {
        report::update_markdown(&results, md)?;
    }
    progress(&format!(
        "done in {:.0} s: {}",
        bench_start.elapsed().as_secs_f64(),
        args.out.display()
    ));
    Ok(())
}

/// `dp-bench report`: tables.md and the plots from an existing results.json.
fn rerender(
    from: &std::path::Path,
    out: Option<&std::path::Path>,
    update_markdown: Option<&std::path::Path>,
) -> Result<()> {
    let results = report::read(from)?;
    let out = match out {
        Some(out) => out.to_path_buf(),
        None => match from.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        },
    };
    std::fs::create_dir_all(&out)?;
    report::write_report(&results, &out)?;
    if let Some(md) = update_markdown {
        report::update_markdown(&results, md)?;
    }
    progress(&format!(
        "rendered {} into {}",
        from.display(),
        out.display()
    ));
    Ok(())
}

fn progress(line: &str) {
    eprintln!("==> {line}");
}

fn machine(nproc: usize) -> Machine {
    let first_line = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.lines().next().map(str::to_string))
            .unwrap_or_default()
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    Machine {
        nproc,
        kernel: first_line("uname", &["-r"]),
        cpu,
        iptables: first_line("iptables", &["--version"]),
        nft: first_line("nft", &["--version"]),
    }
}

/// Tiny deterministic PRNG (xorshift) for the random targets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn pick<T: Copy>(&mut self, from: &[T], count: usize) -> Vec<T> {
        (0..count)
            .map(|_| from[(self.next() % from.len() as u64) as usize])
            .collect()
    }
}

/// What the clients connect to for one dataplane (the client pod and a
/// process on the node alike: the ClusterIPs, or for `direct` the pods).
struct Targets {
    last: SocketAddr,
    random: Vec<SocketAddr>,
    udp: SocketAddr,
    node_port_last: SocketAddr,
    node_port_random: Vec<SocketAddr>,
    node_port_udp: SocketAddr,
}

fn targets(dataplane: Dataplane, n: usize, rng: &mut Rng) -> Targets {
    use scenario::*;
    if dataplane == Dataplane::Direct {
        let pods: Vec<SocketAddr> = backend_ips()
            .into_iter()
            .map(|ip| SocketAddr::from((ip, TARGET_PORT)))
            .collect();
        let last = *pods.last().expect("pods");
        let udp = SocketAddr::from((backend_ips()[0], UDP_TARGET_PORT));
        return Targets {
            last,
            random: rng.pick(&pods, 2000),
            udp,
            node_port_last: last,
            node_port_random: rng.pick(&pods, 2000),
            node_port_udp: udp,
        };
    }
    let vips: Vec<SocketAddr> = (0..n)
        .map(|i| SocketAddr::from((cluster_ip(i), TCP_PORT)))
        .collect();
    let node_ports: Vec<SocketAddr> = (0..n)
        .filter_map(node_port)
        .map(|p| SocketAddr::from((node_ip(), p)))
        .collect();
    Targets {
        last: last_service(n),
        random: rng.pick(&vips, 2000),
        udp: SocketAddr::from((Input::udp_cluster_ip(), UDP_PORT)),
        node_port_last: last_node_port(n),
        node_port_random: rng.pick(&node_ports, 2000),
        node_port_udp: SocketAddr::from((node_ip(), UDP_NODE_PORT)),
    }
}

/// Every dataplane of one N, each on its own cluster, all loaded at once
/// (one after the other, so load time and memory are each one's own); then
/// the traffic runs interleaved, a round over all dataplanes per run in a
/// rotating order, so a slower or busier stretch of a shared machine falls
/// on all of them alike; then each one's endpoint changes.
fn measure_points(
    dataplanes: &[Dataplane],
    n: usize,
    s: &Settings,
    work: &std::path::Path,
    load_timeout: Duration,
) -> Result<Vec<Point>> {
    let mut points = Vec::new();
    let mut ready = Vec::new();
    for &dataplane in dataplanes {
        progress(&format!(
            "  {} with {n} services: loading",
            dataplane.name()
        ));
        match Prepared::load(dataplane, n, s, work, load_timeout)
            .with_context(|| format!("{} at N={n}", dataplane.name()))?
        {
            Ok(prepared) => ready.push(prepared),
            Err(not_loaded) => points.push(not_loaded),
        }
    }
    in_rounds(&mut ready, s.runs, |run, prepared| {
        progress(&format!(
            "  traffic run {}/{}: {}",
            run + 1,
            s.runs,
            prepared.dataplane.name()
        ));
        prepared
            .traffic_run(s)
            .with_context(|| format!("{} at N={n}", prepared.dataplane.name()))
    })?;
    for prepared in ready {
        let dataplane = prepared.dataplane;
        points.push(
            prepared
                .finish(s, work)
                .with_context(|| format!("{} at N={n}", dataplane.name()))?,
        );
    }
    points.sort_by_key(|p| dataplanes.iter().position(|d| *d == p.dataplane));
    Ok(points)
}

/// `rounds` rounds over `ready`, each starting one later than the last, so
/// that no dataplane always follows the same one.
fn in_rounds(
    ready: &mut [Prepared],
    rounds: usize,
    mut each: impl FnMut(usize, &mut Prepared) -> Result<()>,
) -> Result<()> {
    let count = ready.len();
    for round in 0..rounds {
        for i in 0..count {
            each(round, &mut ready[(i + round) % count])?;
        }
    }
    Ok(())
}

/// The client's and the servers' CPUs: apart where there are two.
fn pinned_cpus() -> (Option<usize>, Option<usize>) {
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    if nproc >= 2 {
        (Some(1), Some(0))
    } else {
        (None, None)
    }
}

/// `dp-bench tail`: see `Action::Tail`.
fn tail(n: usize, dataplanes: &[String], samples: usize, rounds: usize) -> Result<()> {
    let s = Settings::for_tool(rounds, samples, 10.0);
    let work = WorkDir::new("tail");
    let mut ready = Vec::new();
    for d in dataplanes {
        let d = Dataplane::parse(d).with_context(|| format!("unknown dataplane {d}"))?;
        match Prepared::load(d, n, &s, &work, Duration::from_secs(600))? {
            Ok(p) => ready.push(p),
            Err(_) => bail!("{} did not load", d.name()),
        }
    }
    println!("| round | dataplane | phase | p50 / p90 / p99 / p99.9 / max µs | errors |");
    println!("| ---: | --- | --- | ---: | ---: |");
    in_rounds(&mut ready, rounds, |round, p| {
        let client = p.cluster.pod_ns(&p.cluster.pods[0].name);
        let row = |phase: &str, l: &Latencies| {
            let q = |v: f64| l.percentile(v).map_or("–".into(), |x| format!("{x:.1}"));
            println!(
                "| {} | {} | {phase} | {} / {} / {} / {} / {} | {} |",
                round + 1,
                p.dataplane.name(),
                q(50.0),
                q(90.0),
                q(99.0),
                q(99.9),
                q(100.0),
                l.errors
            );
        };
        // dp-socket-lb's clients in its cgroup, as in the main run.
        let _joined = p.loaded.join_socket_cgroup()?;
        let before = loadgen::first_packet(client, &[p.targets.last], samples, s.client_cpu)?;
        row("before the load", &before);
        let rate = loadgen::connection_rate(
            client,
            &p.targets.random,
            s.client_threads,
            Duration::from_secs_f64(s.rate_seconds),
            s.client_cpu.map(|c| vec![c]),
        )?;
        println!(
            "| {} | {} | load: {:.0} conn/s | | {} |",
            round + 1,
            p.dataplane.name(),
            rate.per_second,
            rate.errors
        );
        let after = loadgen::first_packet(client, &[p.targets.last], samples, s.client_cpu)?;
        row("right after the load", &after);
        Ok(())
    })?;
    drop(ready);
    Ok(())
}

/// Per program (run time, runs), connections, rates per round and failed
/// connections of one client's load to one set of targets.
type Sums = (
    std::collections::BTreeMap<String, (u64, u64)>,
    u64,
    Vec<f64>,
    u64,
);

/// `dp-bench hook-cost`: see `Action::HookCost`.
fn hook_cost(n: usize, dataplanes: &[String], seconds: f64) -> Result<()> {
    const ROUNDS: usize = 3;
    let s = Settings::for_tool(1, 0, seconds);
    let work = WorkDir::new("hooks");
    // Counted while this descriptor is open, machine-wide, then off again.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling BPF run-time statistics (BPF_ENABLE_STATS)")?;
    println!(
        "| dataplane | client | to | new conn/s (median of {ROUNDS}) | program | runs per connection | ns per run | ns per connection |"
    );
    println!("| --- | --- | --- | ---: | --- | ---: | ---: | ---: |");
    let pods = pod_targets();
    for d in dataplanes {
        let d = Dataplane::parse(d).with_context(|| format!("unknown dataplane {d}"))?;
        if !d.is_dp() {
            bail!(
                "{}: only dp's dataplanes have programs to measure",
                d.name()
            );
        }
        let p = match Prepared::load(d, n, &s, &work, Duration::from_secs(600))? {
            Ok(p) => p,
            Err(_) => bail!("{} did not load", d.name()),
        };
        let pid = p.loaded.agent_pid().context("the agent's pid")?;
        let clients = [
            ("pod", p.cluster.pod_ns(&p.cluster.pods[0].name)),
            ("node", p.cluster.node_ns(0)),
        ];
        for (client, ns) in clients {
            let _joined = p.loaded.join_socket_cgroup()?;
            // Services and the pods behind them alternately, on the same
            // cluster and programs: what translating costs on top of the
            // programs every packet meets anyway.
            let targets: [(&str, &[SocketAddr]); 2] =
                [("ClusterIPs", &p.targets.random), ("pod IPs", &pods)];
            let mut sums: [Sums; 2] = std::array::from_fn(|_| Default::default());
            for _ in 0..ROUNDS {
                for (i, (_, to)) in targets.iter().enumerate() {
                    let before = program_stats(pid)?;
                    let rate = loadgen::connection_rate(
                        ns,
                        to,
                        s.client_threads,
                        Duration::from_secs_f64(seconds),
                        s.client_cpu.map(|c| vec![c]),
                    )?;
                    let spent = program_stats_since(pid, &before)?;
                    let (programs, connections, rates, errors) = &mut sums[i];
                    for (name, (time, runs)) in spent {
                        let sum: &mut (u64, u64) = programs.entry(name).or_default();
                        sum.0 += time;
                        sum.1 += runs;
                    }
                    *connections += rate.total;
                    *errors += rate.errors;
                    rates.push(rate.per_second);
                }
            }
            for ((to, _), (programs, connections, rates, errors)) in targets.iter().zip(&sums) {
                let rate = summary(rates).median;
                let connections = (*connections).max(1) as f64;
                let mut total_ns = 0.0;
                for (name, &(time, runs)) in programs {
                    if runs == 0 {
                        continue;
                    }
                    total_ns += time as f64 / connections;
                    println!(
                        "| {} | {client} | {to} | {rate:.0} | {name} | {:.2} | {:.0} | {:.0} |",
                        d.name(),
                        runs as f64 / connections,
                        time as f64 / runs as f64,
                        time as f64 / connections
                    );
                }
                println!(
                    "| {} | {client} | {to} | {rate:.0} | all ({errors} connections failed) | | | {total_ns:.0} |",
                    d.name()
                );
            }
        }
        drop(p);
    }
    Ok(())
}

/// A tool run's scratch directory under the temporary directory, removed
/// when the run ends, whichever way.
struct WorkDir(std::path::PathBuf);

impl WorkDir {
    fn new(tool: &str) -> Self {
        WorkDir(std::env::temp_dir().join(format!("dp-bench-{tool}-{}", std::process::id())))
    }
}

impl std::ops::Deref for WorkDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Round-by-round ratios of one series to another (`pair`, `tc-floor`):
/// their median and quartiles (nearest rank). The machine's speed drifts
/// between rounds more than the setups differ, so each value is compared
/// with the reference's of the same round.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Paired {
    median: f64,
    q1: f64,
    q3: f64,
}

impl Paired {
    /// `values[i] / base[i]` for each round `i` both have (at least one).
    fn of(values: &[f64], base: &[f64]) -> Self {
        let mut ratios: Vec<f64> = values.iter().zip(base).map(|(x, b)| x / b).collect();
        assert!(!ratios.is_empty(), "no rounds to compare");
        ratios.sort_by(f64::total_cmp);
        let at = |q: f64| ratios[((ratios.len() - 1) as f64 * q).round() as usize];
        Paired {
            median: at(0.5),
            q1: at(0.25),
            q3: at(0.75),
        }
    }
}

impl std::fmt::Display for Paired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.3}x ({:.3}x - {:.3}x)", self.median, self.q1, self.q3)
    }
}

/// `dp-bench pair`: see `Action::Pair`.
fn pair(n: usize, dataplanes: &[String], r: Rounds) -> Result<()> {
    let Rounds {
        rounds,
        seconds,
        first,
    } = r;
    let s = Settings::for_tool(rounds, first, seconds);
    let dataplanes: Vec<Dataplane> = dataplanes
        .iter()
        .map(|d| Dataplane::parse(d).with_context(|| format!("unknown dataplane {d}")))
        .collect::<Result<_>>()?;
    if dataplanes.len() < 2 {
        bail!("pair: a reference and at least one dataplane to compare with it");
    }
    ensure!(rounds >= 1, "pair: at least one round");
    let work = WorkDir::new("pair");
    let mut ready = Vec::new();
    for &d in &dataplanes {
        progress(&format!("  {} with {n} services: loading", d.name()));
        match Prepared::load(d, n, &s, &work, Duration::from_secs(900))? {
            Ok(p) => ready.push(p),
            Err(_) => bail!("{} did not load", d.name()),
        }
    }
    const CLIENTS: [&str; 2] = ["node", "pod"];
    // Figures: conn/s, p50 last, p50 random.
    const FIGURES: usize = 3;
    // [dataplane][client][figure] -> one value per round.
    let mut values: Vec<[[Vec<f64>; FIGURES]; 2]> = (0..ready.len())
        .map(|_| std::array::from_fn(|_| std::array::from_fn(|_| Vec::new())))
        .collect();
    // Failed connections (counted, as the main run does, not fatal: the
    // table says how many).
    let mut failed = vec![[0u64; 2]; ready.len()];
    for round in 0..rounds {
        progress(&format!("  round {}/{rounds}", round + 1));
        for k in 0..ready.len() {
            let i = (k + round) % ready.len();
            let p = &ready[i];
            let _joined = p.loaded.join_socket_cgroup()?;
            for (c, client) in CLIENTS.iter().enumerate() {
                let ns = if *client == "node" {
                    p.cluster.node_ns(0)
                } else {
                    p.cluster.pod_ns(&p.cluster.pods[0].name)
                };
                let t = &p.targets;
                let mut p50 = |targets: &[SocketAddr]| -> Result<f64> {
                    let l = loadgen::first_packet(ns, targets, first, s.client_cpu)?;
                    failed[i][c] += l.errors;
                    l.percentile(50.0).context("no first connection succeeded")
                };
                let last = p50(std::slice::from_ref(&t.last))?;
                let random = p50(&t.random)?;
                let rate = loadgen::connection_rate(
                    ns,
                    &t.random,
                    s.client_threads,
                    Duration::from_secs_f64(seconds),
                    s.client_cpu.map(|c| vec![c]),
                )?;
                failed[i][c] += rate.errors;
                let v = &mut values[i][c];
                v[0].push(rate.per_second);
                v[1].push(last);
                v[2].push(random);
            }
        }
    }
    let reference = dataplanes[0].name();
    println!(
        "N = {n}, {rounds} rounds of {seconds} s and {first} + {first} first connections per client and dataplane; ratios to {reference} of the same round: median (quartiles)\n"
    );
    println!(
        "| N | client | dataplane | new conn/s | vs {reference} | first conn p50, last service (µs) | vs {reference} | p50, random services (µs) | vs {reference} | socket LB target (>= 0.97x, <= 1.05x) | failed connections |"
    );
    println!("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |");
    for (c, client) in CLIENTS.iter().enumerate() {
        for (i, d) in dataplanes.iter().enumerate() {
            let mut cells = Vec::new();
            let mut ratios_median = [0.0; FIGURES];
            for f in 0..FIGURES {
                let mine = &values[i][c][f];
                let ratios = Paired::of(mine, &values[0][c][f]);
                ratios_median[f] = ratios.median;
                let digits = if f == 0 { 0 } else { 1 };
                cells.push(format!("{:.digits$}", summary(mine).median));
                cells.push(ratios.to_string());
            }
            let target = if i == 0 {
                ""
            } else if ratios_median[0] >= 0.97
                && ratios_median[1] <= 1.05
                && ratios_median[2] <= 1.05
            {
                "met"
            } else {
                "missed"
            };
            println!(
                "| {n} | {client} | {} | {} | {target} | {} |",
                d.name(),
                cells.join(" | "),
                failed[i][c]
            );
        }
    }
    drop(ready);
    Ok(())
}

/// `dp-bench tc-floor`: see `Action::TcFloor`.
fn tc_floor(rounds: usize, seconds: f64, run_time: bool) -> Result<()> {
    ensure!(rounds >= 1, "tc-floor: at least one round");
    // Counted while this descriptor is open, machine-wide, then off again.
    let _stats = if run_time {
        Some(
            aya::sys::enable_stats(aya::sys::Stats::RunTime)
                .context("enabling BPF run-time statistics (BPF_ENABLE_STATS)")?,
        )
    } else {
        None
    };
    #[derive(Clone, Copy, PartialEq)]
    enum Attached {
        Nothing,
        Noop,
        Dp,
        DpSockets,
    }
    const VARIANTS: [(Attached, &str); 4] = [
        (Attached::Nothing, "nothing"),
        (Attached::Noop, "no-op tc program"),
        (Attached::Dp, "dp's tc programs, no services"),
        (
            Attached::DpSockets,
            "dp's tc programs and socket hooks (all), no services",
        ),
    ];
    let s = Settings::for_tool(1, 0, seconds);
    let work = WorkDir::new("floor");
    let p = Prepared::bare(1, &s, &work)?;
    let mut dp = dp::kernel::loader::Datapath::load().context("loading dp's programs")?;
    // As the agent runs them: the pass-through filter on (nothing marked:
    // no Service, no tracked flow).
    dp.fill_prefilter()?;
    dp.enable_prefilter()?;
    // The socket hooks of a second datapath, on a cgroup of this run's own
    // that dp-bench joins only while measuring that variant.
    let sockets = scenario::SocketCgroup::create()?;
    let mut dp_sockets = dp::kernel::loader::Datapath::load().context("loading dp's programs")?;
    let node_netns = p.node_netns_cookie()?;
    dp_sockets
        .attach_socket_lb(sockets.path(), node_netns, true)
        .context("attaching the socket hooks")?;
    let devices = p.node_devices();
    let pods = pod_targets();
    let clients = p.clients();
    // (variant, client) -> rates of each round.
    let mut rates: std::collections::BTreeMap<(usize, usize), Vec<f64>> = Default::default();
    // (variant, client) -> (BPF ns, of which tc, tc runs, connections), summed.
    let mut bpf: std::collections::BTreeMap<(usize, usize), [u64; 4]> = Default::default();
    let me = std::process::id();
    for round in 0..rounds {
        for k in 0..VARIANTS.len() {
            // Rotated per round: no variant always follows the same one.
            let v = (k + round) % VARIANTS.len();
            let (attached, _) = VARIANTS[v];
            dp.detach_all().context("detaching")?;
            if attached != Attached::Nothing {
                p.cluster.node_ns(0).run(|| -> Result<()> {
                    for dev in &devices {
                        for hook in [common::Hook::TcIngress, common::Hook::TcEgress] {
                            match attached {
                                Attached::Noop => dp.attach_noop_tc(dev, hook)?,
                                _ => dp.attach_tc(dev, hook)?,
                            }
                        }
                    }
                    Ok(())
                })??;
            }
            let _joined = match attached {
                Attached::DpSockets => Some(sockets.join()?),
                _ => None,
            };
            for (c, (_, ns)) in clients.iter().enumerate() {
                let before = if run_time {
                    program_stats(me)?
                } else {
                    Default::default()
                };
                let rate = loadgen::connection_rate(
                    ns,
                    &pods,
                    s.client_threads,
                    Duration::from_secs_f64(seconds),
                    s.client_cpu.map(|c| vec![c]),
                )?;
                if rate.errors != 0 {
                    bail!("{} connections failed", rate.errors);
                }
                rates.entry((v, c)).or_default().push(rate.per_second);
                if run_time {
                    let sum = bpf.entry((v, c)).or_default();
                    for (name, (time, runs)) in program_stats_since(me, &before)? {
                        sum[0] += time;
                        if name.starts_with("dp_tc_") {
                            sum[1] += time;
                            sum[2] += runs;
                        }
                    }
                    sum[3] += rate.total;
                }
            }
        }
    }
    dp.detach_all().context("detaching")?;
    drop(dp_sockets);
    // The machine's speed drifts between rounds more than these differ:
    // each round's rate is compared with the same round's `nothing`, and
    // the median of those ratios is the figure.
    let stats_head = if run_time {
        (
            " BPF ns per tc run | BPF ns per connection |",
            " ---: | ---: |",
        )
    } else {
        ("", "")
    };
    println!(
        "| client | attached to {} devices (ingress and egress) | new conn/s (median of {rounds} rounds) | vs nothing, same round (median; quartiles) |{}",
        devices.len(),
        stats_head.0
    );
    println!("| --- | --- | ---: | ---: |{}", stats_head.1);
    for (c, (client, _)) in clients.iter().enumerate() {
        let base = &rates[&(0, c)];
        for (v, (_, name)) in VARIANTS.iter().enumerate() {
            let r = &rates[&(v, c)];
            let stats = match bpf.get(&(v, c)) {
                Some(&[time, tc_time, tc_runs, connections]) if run_time => format!(
                    " {:.0} | {:.0} |",
                    tc_time as f64 / tc_runs.max(1) as f64,
                    time as f64 / connections.max(1) as f64
                ),
                _ if run_time => " – | – |".to_string(),
                _ => String::new(),
            };
            println!(
                "| {client} | {name} | {:.0} | {} |{stats}",
                summary(r).median,
                Paired::of(r, base)
            );
        }
    }
    drop(p);
    Ok(())
}

/// `dp-bench socket-direct`: see `Action::SocketDirect`.
fn socket_direct(n: usize, r: Rounds) -> Result<()> {
    let Rounds {
        rounds,
        seconds,
        first,
    } = r;
    use dp::ServiceMaps;
    ensure!(rounds >= 1, "socket-direct: at least one round");
    ensure!(
        (1..=10_000).contains(&n),
        "socket-direct: 1 to 10 000 services"
    );
    ensure!(!scenario::ipv6(), "socket-direct: IPv4 only");
    let s = Settings::for_tool(1, first, seconds);
    let work = WorkDir::new("socket-direct");
    let p = Prepared::bare(n, &s, &work)?;
    // dp as the agent programs it: the node, the ClusterIPs with the ten
    // pods as backends, the tc programs on the node's devices, the socket
    // hooks (all) on a cgroup of the run's own, the filter on.
    let sizes = dp::MapSizes {
        services: ((n * (scenario::ENDPOINTS + 2)) as u32)
            .next_power_of_two()
            .max(common::map_sizes::SERVICES),
        ..dp::MapSizes::default()
    };
    let mut dp = dp::kernel::loader::Datapath::load_with(sizes).context("loading dp")?;
    let cidr = scenario::cluster_cidr();
    let (net, len) = cidr.split_once('/').context("cluster CIDR")?;
    dp.set_node(
        scenario::node_ip(),
        Some((net.parse()?, len.parse()?)),
        false,
    )?;
    let pods: Vec<SocketAddr> = scenario::backend_ips()
        .into_iter()
        .map(|ip| SocketAddr::from((ip, scenario::TARGET_PORT)))
        .collect();
    for (i, pod) in pods.iter().enumerate() {
        dp.set_backend(i as u32 + 1, *pod, common::proto::IPPROTO_TCP, false)?;
    }
    let slots = dp::BackendSlots {
        ready: (1..=pods.len() as u32).collect(),
        ..dp::BackendSlots::default()
    };
    progress(&format!("  writing {n} ClusterIPs"));
    let vips: Vec<SocketAddr> = (0..n)
        .map(|i| SocketAddr::from((scenario::cluster_ip(i), scenario::TCP_PORT)))
        .collect();
    for (i, vip) in vips.iter().enumerate() {
        dp.set_service(&dp::Frontend::tcp(*vip), i as u32 + 1, &slots)?;
    }
    dp.fill_prefilter()?;
    dp.enable_prefilter()?;
    let sockets = scenario::SocketCgroup::create()?;
    let node_netns = p.node_netns_cookie()?;
    dp.attach_socket_lb(sockets.path(), node_netns, true)
        .context("attaching the socket hooks")?;
    let devices = p.node_devices();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ n as u64);
    let targets = [rng.pick(&pods, 2000), rng.pick(&vips, 2000)];
    let clients = p.clients();
    const SIDES: [&str; 2] = ["direct", "dp-socket-lb"];
    // [side][client] -> (rates, p50s), one per round.
    let mut values = [
        [(Vec::new(), Vec::new()), (Vec::new(), Vec::new())],
        [(Vec::new(), Vec::new()), (Vec::new(), Vec::new())],
    ];
    for round in 0..rounds {
        progress(&format!("  round {}/{rounds}", round + 1));
        for k in 0..SIDES.len() {
            let side = (k + round) % SIDES.len();
            dp.detach_all().context("detaching")?;
            if side == 1 {
                p.cluster.node_ns(0).run(|| -> Result<()> {
                    for dev in &devices {
                        for hook in [common::Hook::TcIngress, common::Hook::TcEgress] {
                            dp.attach_tc(dev, hook)?;
                        }
                    }
                    for dev in &p.cluster.nodes[0].pod_devices {
                        dp.mark_pod_device(dev)?;
                    }
                    Ok(())
                })??;
            }
            let _joined = if side == 1 {
                Some(sockets.join()?)
            } else {
                None
            };
            for (c, (_, ns)) in clients.iter().enumerate() {
                let l = loadgen::first_packet(ns, &targets[side], first, s.client_cpu)?;
                let rate = loadgen::connection_rate(
                    ns,
                    &targets[side],
                    s.client_threads,
                    Duration::from_secs_f64(seconds),
                    s.client_cpu.map(|c| vec![c]),
                )?;
                if l.errors + rate.errors != 0 {
                    bail!("{} connections failed", l.errors + rate.errors);
                }
                let v = &mut values[side][c];
                v.0.push(rate.per_second);
                v.1.push(l.percentile(50.0).context("no first connection")?);
            }
        }
    }
    dp.detach_all().context("detaching")?;
    drop(dp);
    println!(
        "N = {n}, one cluster, {rounds} rounds of {seconds} s and {first} first connections per client and side; ratios to direct of the same round: median (quartiles)\n"
    );
    println!(
        "| N | client | side | new conn/s | vs direct | first conn p50 (µs) | vs direct | target (>= 0.97x, <= 1.05x) |"
    );
    println!("| ---: | --- | --- | ---: | ---: | ---: | ---: | --- |");
    for (c, (client, _)) in clients.iter().enumerate() {
        for (side, name) in SIDES.iter().enumerate() {
            let (rate, p50) = &values[side][c];
            let (base_rate, base_p50) = &values[0][c];
            let (r, l) = (Paired::of(rate, base_rate), Paired::of(p50, base_p50));
            let target = match side {
                0 => "",
                _ if r.median >= 0.97 && l.median <= 1.05 => "met",
                _ => "missed",
            };
            println!(
                "| {n} | {client} | {name} | {:.0} | {r} | {:.1} | {l} | {target} |",
                summary(rate).median,
                summary(p50).median,
            );
        }
    }
    drop(p);
    Ok(())
}

/// The ten pods' TCP servers, straight.
fn pod_targets() -> Vec<SocketAddr> {
    scenario::backend_ips()
        .into_iter()
        .map(|ip| SocketAddr::from((ip, scenario::TARGET_PORT)))
        .collect()
}

impl Prepared {
    /// A cluster without a dataplane, for the tools that attach dp's
    /// programs themselves (`tc-floor`, `socket-direct`).
    fn bare(n: usize, s: &Settings, work: &std::path::Path) -> Result<Prepared> {
        match Prepared::load(Dataplane::Direct, n, s, work, Duration::from_secs(60))? {
            Ok(p) => Ok(p),
            Err(_) => bail!("the cluster did not come up"),
        }
    }

    /// The node's network namespace cookie: the socket hooks' "host".
    fn node_netns_cookie(&self) -> Result<u64> {
        self.cluster
            .node_ns(0)
            .run(dp::agent::own_netns_cookie)?
            .context("the node's network namespace cookie")
    }

    /// The node's devices the agent attaches to: `eth0`, then the pod veths.
    fn node_devices(&self) -> Vec<String> {
        let node = &self.cluster.nodes[0];
        std::iter::once(node.device.clone())
            .chain(node.pod_devices.iter().cloned())
            .collect()
    }

    /// The two clients: a process on the node and the client pod.
    fn clients(&self) -> [(&'static str, &e2e::Netns); 2] {
        [
            ("node", self.cluster.node_ns(0)),
            ("pod", self.cluster.pod_ns(&self.cluster.pods[0].name)),
        ]
    }
}

/// Run time (ns) and runs per program name since `before` (an earlier
/// `program_stats(pid)`).
fn program_stats_since(
    pid: u32,
    before: &std::collections::BTreeMap<String, (u64, u64)>,
) -> Result<std::collections::BTreeMap<String, (u64, u64)>> {
    Ok(program_stats(pid)?
        .into_iter()
        .map(|(name, (time, runs))| {
            let (time0, runs0) = before.get(&name).copied().unwrap_or_default();
            (name, (time - time0, runs - runs0))
        })
        .collect())
}

/// Run time (ns) and runs per program name, over the programs process
/// `pid` holds open (an agent's, or dp-bench's own).
fn program_stats(pid: u32) -> Result<std::collections::BTreeMap<String, (u64, u64)>> {
    let ids: std::collections::BTreeSet<u32> = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))?
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|id| id.trim().parse().ok())
        })
        .collect();
    let mut out = std::collections::BTreeMap::new();
    for info in aya::programs::loaded_programs().flatten() {
        if !ids.contains(&info.id()) {
            continue;
        }
        let name = info.name_as_str().unwrap_or("?").to_string();
        let entry: &mut (u64, u64) = out.entry(name).or_default();
        entry.0 += info.run_time().as_nanos() as u64;
        entry.1 += info.run_count();
    }
    Ok(out)
}

/// One dataplane loaded on its own cluster, with its servers and the
/// figures of its traffic runs so far.
struct Prepared {
    dataplane: Dataplane,
    n: usize,
    input: Input,
    targets: Targets,
    loaded: scenario::Loaded,
    cluster_runs: TrafficRuns,
    node_port_runs: TrafficRuns,
    from_node_runs: TrafficRuns,
    // Dropped after the dataplane, before the cluster (field order).
    _servers: Servers,
    cluster: e2e::Cluster,
}

impl Prepared {
    /// A cluster with servers and the dataplane loaded, or the point of a
    /// dataplane that did not load in time.
    fn load(
        dataplane: Dataplane,
        n: usize,
        s: &Settings,
        work: &std::path::Path,
        load_timeout: Duration,
    ) -> Result<std::result::Result<Self, Point>> {
        let cluster = if scenario::ipv6() {
            e2e::Cluster::new_dual(&[scenario::ENDPOINTS + 1])?
        } else {
            e2e::Cluster::new(&[scenario::ENDPOINTS + 1])?
        };
        // The floor's external client reaches pods through the node.
        let via = scenario::node_ip().to_string();
        cluster
            .client_ns()
            .ip(&["route", "add", &scenario::cluster_cidr(), "via", &via])?;
        let pods: Vec<(&e2e::Netns, std::net::IpAddr)> = cluster.pods[1..]
            .iter()
            .map(|p| {
                let ip = match p.ip6 {
                    Some(ip6) if scenario::ipv6() => ip6.into(),
                    _ => p.ip.into(),
                };
                (cluster.pod_ns(&p.name), ip)
            })
            .collect();
        let servers = Servers::start(
            &pods,
            scenario::TARGET_PORT,
            scenario::UDP_TARGET_PORT,
            s.server_cpu,
        )?;
        let input = Input {
            n,
            moved: Vec::new(),
        };
        let loaded = match scenario::load(dataplane, &cluster, &input, work, load_timeout) {
            Ok(l) => l,
            Err(e) if is_timeout(&e) => {
                progress(&format!("    {e:#}"));
                return Ok(Err(Point::not_loaded(
                    dataplane,
                    n,
                    load_timeout.as_secs_f64(),
                    None,
                )));
            }
            Err(e) => return Err(e),
        };
        progress(&format!(
            "    loaded in {:.2} s ({} {}, kernel memory {:.1} MiB)",
            loaded.load_seconds,
            loaded.objects,
            if dataplane.is_dp() {
                "frontends"
            } else {
                "rules"
            },
            loaded.kernel_bytes as f64 / 1048576.0
        ));
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ n as u64);
        let t = targets(dataplane, n, &mut rng);
        let client = cluster.pod_ns(&cluster.pods[0].name);
        // Fails loudly if the dataplane does not carry traffic at all.
        let (probe, probe_node) = {
            let _joined = loaded.join_socket_cgroup()?;
            (
                loadgen::first_packet(client, &[t.last], 3, None)?,
                loadgen::first_packet(cluster.node_ns(0), &[t.last], 3, None)?,
            )
        };
        let probe_np = loadgen::first_packet(cluster.client_ns(), &[t.node_port_last], 3, None)?;
        if probe.errors > 0 || probe_node.errors > 0 || probe_np.errors > 0 {
            bail!(
                "{} does not answer {} (from the pod: {} errors, from the node: {}) / {} ({})",
                dataplane.name(),
                t.last,
                probe.errors,
                probe_node.errors,
                t.node_port_last,
                probe_np.errors
            );
        }
        Ok(Ok(Prepared {
            dataplane,
            n,
            input,
            targets: t,
            loaded,
            cluster_runs: TrafficRuns::default(),
            node_port_runs: TrafficRuns::default(),
            from_node_runs: TrafficRuns::default(),
            _servers: servers,
            cluster,
        }))
    }

    /// One run of every traffic measurement: ClusterIP from the client pod,
    /// ClusterIP from the node, then NodePort from the external client. For
    /// dp-socket-lb the first two from inside its socket cgroup, the
    /// external client's from outside (no node's hooks see its sockets).
    fn traffic_run(&mut self, s: &Settings) -> Result<()> {
        let t = &self.targets;
        let client = self.cluster.pod_ns(&self.cluster.pods[0].name);
        {
            let _joined = self.loaded.join_socket_cgroup()?;
            self.cluster_runs
                .measure(client, &t.last, Some(&t.random), &t.random, t.udp, s)?;
            self.from_node_runs.measure(
                self.cluster.node_ns(0),
                &t.last,
                Some(&t.random),
                &t.random,
                t.udp,
                s,
            )?;
        }
        self.node_port_runs.measure(
            self.cluster.client_ns(),
            &t.node_port_last,
            None,
            &t.node_port_random,
            t.node_port_udp,
            s,
        )
    }

    /// The one-endpoint changes, then the point; the cluster goes.
    fn finish(mut self, s: &Settings, work: &std::path::Path) -> Result<Point> {
        let (dataplane, n) = (self.dataplane, self.n);
        // Before the changes: only the traffic runs' connects.
        let socket_connects = if dataplane == Dataplane::DpSocketLb {
            self.loaded
                .socket_connects()?
                .map(|(translated, left_to_tc)| SocketConnects {
                    translated,
                    left_to_tc,
                })
        } else {
            None
        };
        let endpoint_change = if dataplane == Dataplane::Direct {
            None
        } else {
            progress(&format!(
                "  {}: {} one-endpoint changes",
                dataplane.name(),
                s.changes
            ));
            let (mut total, mut agent) = (Vec::new(), Vec::new());
            for c in 0..s.changes {
                let i = (c * 7919) % n;
                let (d, a) = self.loaded.change_endpoint(&mut self.input, i, c + 1)?;
                total.push(d);
                agent.extend(a);
            }
            Some(ChangeFigures::from_durations(s.changes, &total, &agent))
        };
        let mut point = Point {
            dataplane,
            services: n,
            load_finished: true,
            not_tried_after: None,
            load_seconds: self.loaded.load_seconds,
            objects: self.loaded.objects,
            kernel_memory_bytes: self.loaded.kernel_bytes,
            agent_rss_bytes: self.loaded.agent_rss_bytes,
            cluster_ip: std::mem::take(&mut self.cluster_runs).finish(),
            node_port: std::mem::take(&mut self.node_port_runs).finish(),
            from_node: std::mem::take(&mut self.from_node_runs).finish(),
            socket_connects,
            endpoint_change,
            endpoint_change_watch: None,
            load_seconds_watch: None,
        };
        let Prepared {
            loaded,
            mut input,
            cluster,
            _servers,
            ..
        } = self;
        loaded.unload()?;
        if dataplane == Dataplane::Dp {
            if let Some((start, changes)) = watch_changes(&cluster, &mut input, work, s)? {
                point.load_seconds_watch = Some(start.as_secs_f64());
                point.endpoint_change_watch = Some(changes);
            }
        }
        Ok(point)
    }
}

/// dp's one-endpoint changes again, delivered by the API server's watch
/// (`scenario::watch_changes`), after the manifest agent is gone; with that
/// agent's start to first sync. Skipped, with a word, when the fake API
/// server binary was not built.
fn watch_changes(
    cluster: &e2e::Cluster,
    input: &mut Input,
    work: &std::path::Path,
    s: &Settings,
) -> Result<Option<(Duration, ChangeFigures)>> {
    let Some(binary) = scenario::fake_apiserver_binary() else {
        progress("    no fake-apiserver next to dp-bench: watch variant skipped (cargo xtask bench builds it)");
        return Ok(None);
    };
    progress(&format!(
        "    {} one-endpoint changes by API watch",
        s.changes
    ));
    let (start, total, agent) =
        scenario::watch_changes(&binary, cluster, input, work, s.changes, s.changes + 1)?;
    progress(&format!(
        "    started from the API list in {:.2} s",
        start.as_secs_f64()
    ));
    Ok(Some((
        start,
        ChangeFigures::from_durations(s.changes, &total, &agent),
    )))
}

fn is_timeout(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<dp::kube_proxy::apply::ApplyError>(),
            Some(dp::kube_proxy::apply::ApplyError::Timeout { .. })
        )
    })
}

/// Per-run figures, summarised over runs at the end.
#[derive(Default)]
struct TrafficRuns {
    first_last: [Vec<f64>; 3],
    first_random: [Vec<f64>; 3],
    rr: [Vec<f64>; 3],
    rate: Vec<f64>,
    udp: Vec<f64>,
    errors: u64,
    first_errors: (u64, u64, u64),
}

const PERCENTILES: [f64; 3] = [50.0, 90.0, 99.0];

impl TrafficRuns {
    fn add(into: &mut [Vec<f64>; 3], l: &Latencies) {
        for (i, p) in PERCENTILES.iter().enumerate() {
            if let Some(v) = l.percentile(*p) {
                into[i].push(v);
            }
        }
    }

    fn measure(
        &mut self,
        ns: &e2e::Netns,
        last: &SocketAddr,
        random_first: Option<&[SocketAddr]>,
        random: &[SocketAddr],
        udp: SocketAddr,
        s: &Settings,
    ) -> Result<()> {
        let l = loadgen::first_packet(
            ns,
            std::slice::from_ref(last),
            s.first_packets,
            s.client_cpu,
        )?;
        self.first_errors.0 += l.errors;
        Self::add(&mut self.first_last, &l);
        if let Some(targets) = random_first {
            let l = loadgen::first_packet(ns, targets, s.first_packets, s.client_cpu)?;
            self.first_errors.1 += l.errors;
            Self::add(&mut self.first_random, &l);
        }
        let rate = loadgen::connection_rate(
            ns,
            random,
            s.client_threads,
            Duration::from_secs_f64(s.rate_seconds),
            s.client_cpu.map(|c| vec![c]),
        )?;
        self.errors += rate.errors;
        self.rate.push(rate.per_second);
        let l = loadgen::established_rr(ns, *last, s.rr_round_trips, s.client_cpu)?;
        self.first_errors.2 += l.errors;
        Self::add(&mut self.rr, &l);
        let u = loadgen::udp_rate(
            ns,
            udp,
            Duration::from_secs_f64(s.udp_seconds),
            64,
            s.client_cpu,
        )?;
        self.udp.push(u.per_second);
        Ok(())
    }

    fn finish(self) -> Traffic {
        let pct = |v: &[Vec<f64>; 3], errors: u64| Percentiles {
            p50: (!v[0].is_empty()).then(|| summary(&v[0])),
            p90: (!v[1].is_empty()).then(|| summary(&v[1])),
            p99: (!v[2].is_empty()).then(|| summary(&v[2])),
            errors,
        };
        Traffic {
            first_packet_last: pct(&self.first_last, self.first_errors.0),
            first_packet_random: pct(&self.first_random, self.first_errors.1),
            connections_per_second: (!self.rate.is_empty()).then(|| summary(&self.rate)),
            rr_latency: pct(&self.rr, self.first_errors.2),
            udp_packets_per_second: (!self.udp.is_empty()).then(|| summary(&self.udp)),
            errors: self.errors,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Paired;

    #[test]
    fn paired_ratios_are_taken_round_by_round() {
        // Rates that drift together: every ratio is 0.9 or 1.0, although
        // the series' own medians are far apart from round to round.
        let base = [100.0, 200.0, 300.0, 400.0, 500.0];
        let mine = [90.0, 180.0, 300.0, 360.0, 450.0];
        let p = Paired::of(&mine, &base);
        assert_eq!((p.q1, p.median, p.q3), (0.9, 0.9, 0.9));
        assert_eq!(p.to_string(), "0.900x (0.900x - 0.900x)");
        let one = Paired::of(&[50.0], &[100.0]);
        assert_eq!((one.q1, one.median, one.q3), (0.5, 0.5, 0.5));
        let spread = Paired::of(&[1.0, 2.0, 3.0, 4.0, 5.0], &[1.0; 5]);
        assert_eq!((spread.q1, spread.median, spread.q3), (2.0, 3.0, 4.0));
    }
}
