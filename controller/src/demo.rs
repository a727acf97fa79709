//! `dp demo`: a ClusterIP service in a two-node lab of network namespaces,
//! served by the datapath, with the trace and counters it produced.
//! Everything it creates is removed before it returns.

use std::{
    collections::BTreeMap,
    io::Write,
    net::{IpAddr, SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{ensure, Context as _};
use common::Hook;
use e2e::{cluster::CLUSTER_CIDR, parse_identity, tcp_echo_once, Cluster, TcpEchoServer};

use crate::{trace::describe_event, BackendSlots, Datapath, Frontend};

const TIMEOUT: Duration = Duration::from_secs(5);
const WEB: &str = "10.96.0.10:80";
const EMPTY: &str = "10.96.0.11:80";
const BACKEND_PORT: u16 = 8080;
const CONNECTIONS: usize = 20;

pub fn run(out: &mut impl Write) -> anyhow::Result<()> {
    writeln!(
        out,
        "dp demo: a ClusterIP service in a two-node lab of network namespaces"
    )?;
    let cluster = Cluster::new(&[2, 2]).context("building the lab")?;
    for node in &cluster.nodes {
        let pods: Vec<String> = cluster
            .pods
            .iter()
            .filter(|p| cluster.nodes[p.node].name == node.name)
            .map(|p| format!("{} {}", p.name, p.ip))
            .collect();
        writeln!(out, "  {} {}: {}", node.name, node.ip, pods.join(", "))?;
    }
    writeln!(out, "  names: {}", cluster.topo.netns_names().join(" "))?;

    // One datapath per node, like one agent per node.
    let mut datapaths = Vec::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        let mut dp = Datapath::load().context("loading the eBPF object")?;
        dp.set_node(
            IpAddr::V4(node.ip),
            Some((IpAddr::V4(CLUSTER_CIDR.0), CLUSTER_CIDR.1)),
            false,
        )?;
        cluster.node_ns(i).run(|| -> crate::error::Result<()> {
            dp.attach_xdp(&node.device)?;
            for dev in std::iter::once(&node.device).chain(&node.pod_devices) {
                dp.attach_tc(dev, Hook::TcIngress)?;
                dp.attach_tc(dev, Hook::TcEgress)?;
            }
            Ok(())
        })??;
        datapaths.push(dp);
    }
    writeln!(
        out,
        "  loaded one datapath per node: xdp + tc on eth0, tc on every pod veth"
    )?;

    let backends = ["pod-1-1", "pod-2-0"];
    let mut servers = Vec::new();
    for name in backends {
        let pod = cluster.pod(name);
        let addr = SocketAddr::from((pod.ip, BACKEND_PORT));
        servers.push(TcpEchoServer::start_named(
            cluster.pod_ns(name),
            addr,
            Some(name.to_string()),
        )?);
    }
    let web: SocketAddr = WEB.parse()?;
    let empty: SocketAddr = EMPTY.parse()?;
    for dp in &mut datapaths {
        for (i, name) in backends.iter().enumerate() {
            let pod = cluster.pod(name);
            dp.set_backend(
                i as u32 + 1,
                SocketAddr::from((pod.ip, BACKEND_PORT)),
                6,
                false,
            )?;
        }
        let slots = BackendSlots {
            ready: vec![1, 2],
            terminating: vec![],
            local_only: false,
            ..BackendSlots::default()
        };
        dp.set_service(&Frontend::tcp(web), 1, &slots)?;
        dp.set_service(&Frontend::tcp(empty), 2, &BackendSlots::default())?;
        dp.set_tracing(true)?;
    }
    writeln!(
        out,
        "  service 1: {WEB}/TCP -> backend 1 pod-1-1:{BACKEND_PORT}, backend 2 pod-2-0:{BACKEND_PORT}"
    )?;
    writeln!(out, "  service 2: {EMPTY}/TCP -> no endpoints")?;
    let mut reader = datapaths[0].trace_reader()?;

    let client = cluster.pod_ns("pod-1-0");
    let mut answered = BTreeMap::new();
    for _ in 0..CONNECTIONS {
        let (reply, _) = tcp_echo_once(client, web, b"hello", TIMEOUT)?;
        let (name, seen, _) = parse_identity(&reply).context("backend reply")?;
        ensure!(
            seen.ip() == IpAddr::V4(cluster.pod("pod-1-0").ip),
            "the backend saw {seen}"
        );
        *answered.entry(name).or_insert(0) += 1;
    }
    let spread: Vec<String> = answered.iter().map(|(n, c)| format!("{n} x{c}")).collect();
    writeln!(
        out,
        "\n{CONNECTIONS} TCP connections from pod-1-0 to {WEB}: answered by {}; each backend saw the client's own address",
        spread.join(", ")
    )?;
    ensure!(
        answered.len() == backends.len(),
        "not every backend answered"
    );
    let refused = client.run(|| TcpStream::connect_timeout(&empty, TIMEOUT))?;
    let err = refused
        .err()
        .context("a service without endpoints accepted a connection")?;
    writeln!(
        out,
        "a connection from pod-1-0 to {EMPTY}: {err} (answered by the datapath)"
    )?;
    ensure!(err.kind() == std::io::ErrorKind::ConnectionRefused);

    let events = reader.drain();
    // The first connection's packets, and the reject.
    let rejected = common::Verdict::Reject as u8;
    let first_flow = events.iter().filter(|e| e.service_id == 1).take(5);
    let rejects = events.iter().filter(|e| e.verdict == rejected);
    let interesting: Vec<_> = first_flow.chain(rejects).collect();
    writeln!(
        out,
        "\ntrace on node1 ({} events; the first connection's and the reject):",
        events.len()
    )?;
    let names = node_interfaces(&cluster);
    for e in interesting {
        let ifname = names.get(&e.ifindex).map(String::as_str);
        writeln!(out, "  {}", describe_event(e, ifname))?;
    }

    let counters = datapaths[0].counters()?;
    writeln!(out, "\ncounters on node1 (DP_COUNTERS, summed over CPUs):")?;
    writeln!(
        out,
        "  {:<11} {:<22} {:>8} {:>8}",
        "hook", "reason", "packets", "bytes"
    )?;
    for ((hook, reason), c) in &counters.by_reason {
        writeln!(
            out,
            "  {:<11} {:<22} {:>8} {:>8}",
            hook.name(),
            reason.id(),
            c.packets,
            c.bytes
        )?;
    }

    let names = cluster.topo.netns_names();
    drop(servers);
    drop(datapaths);
    drop(cluster);
    let left: Vec<_> = names
        .iter()
        .filter(|n| std::path::Path::new("/run/netns").join(n).exists())
        .collect();
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    writeln!(
        out,
        "\nteardown: programs detached and unloaded, namespaces deleted"
    )?;
    Ok(())
}

/// ifindex -> device name in node1, for the trace lines.
fn node_interfaces(cluster: &Cluster) -> BTreeMap<u32, String> {
    let node = &cluster.nodes[0];
    cluster
        .node_ns(0)
        .run(|| {
            std::iter::once(&node.device)
                .chain(&node.pod_devices)
                .filter_map(|d| crate::datapath::ifindex(d).ok().map(|i| (i, d.clone())))
                .collect()
        })
        .unwrap_or_default()
}
