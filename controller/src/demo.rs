//! `dp demo`: the datapath in a throwaway namespace pair, counting and
//! tracing real TCP and UDP traffic. Everything it creates is removed before
//! it returns.

use std::{io::Write, net::SocketAddr, time::Duration};

use anyhow::{ensure, Context as _};
use common::Hook;
use e2e::{tcp_echo_once, udp_echo_once, TcpEchoServer, Topology, UdpEchoServer};

use crate::{trace::describe_event, Datapath};

const SUBNET: &str = "10.200.0";
const CLIENT_ADDR: &str = "10.200.0.1/24";
const SERVER_ADDR: &str = "10.200.0.2/24";
const TCP_SERVER: &str = "10.200.0.2:8080";
const UDP_SERVER: &str = "10.200.0.2:5353";
const IFACE: &str = "eth0";
const TIMEOUT: Duration = Duration::from_secs(5);

pub fn run(out: &mut impl Write) -> anyhow::Result<()> {
    writeln!(
        out,
        "dp demo: the datapath in a throwaway pair of network namespaces"
    )?;
    let topo = Topology::pair("client", "server", SUBNET)?;
    writeln!(
        out,
        "  created namespaces {} joined by a veth pair: client {IFACE} {CLIENT_ADDR} <-> server {IFACE} {SERVER_ADDR}",
        topo.netns_names().join(", ")
    )?;

    let mut datapath = Datapath::load().context("loading the eBPF object")?;
    datapath.set_tracing(true)?;
    let mut reader = datapath.trace_reader()?;
    let server = topo.ns("server");
    server.run(|| -> crate::error::Result<()> {
        datapath.attach_xdp(IFACE)?;
        datapath.attach_tc(IFACE, Hook::TcIngress)?;
        datapath.attach_tc(IFACE, Hook::TcEgress)
    })??;
    writeln!(
        out,
        "  loaded the dp object; attached xdp, tc/ingress and tc/egress to {IFACE} in the server namespace; tracing on"
    )?;

    let tcp: SocketAddr = TCP_SERVER.parse()?;
    let udp: SocketAddr = UDP_SERVER.parse()?;
    let tcp_server = TcpEchoServer::start(server, tcp)?;
    let udp_server = UdpEchoServer::start(server, udp)?;
    let client = topo.ns("client");
    let (reply, local) = tcp_echo_once(client, tcp, b"hello over TCP", TIMEOUT)?;
    ensure!(
        reply == b"hello over TCP",
        "TCP echo came back wrong: {reply:?}"
    );
    writeln!(out, "  TCP {local} -> {tcp}: sent 14 bytes, echoed back")?;
    let (reply, local) = udp_echo_once(client, udp, b"hello over UDP", TIMEOUT)?;
    ensure!(
        reply == b"hello over UDP",
        "UDP echo came back wrong: {reply:?}"
    );
    writeln!(out, "  UDP {local} -> {udp}: sent 14 bytes, echoed back")?;
    drop((tcp_server, udp_server));

    // Detach first so the counters and the trace are final when read.
    datapath.detach_all()?;
    let events = reader.drain();
    writeln!(
        out,
        "\ntrace ({} events, one per packet and hook):",
        events.len()
    )?;
    for event in &events {
        let ifname = datapath
            .interfaces()
            .get(&event.ifindex)
            .map(String::as_str);
        writeln!(out, "  {}", describe_event(event, ifname))?;
    }

    let counters = datapath.counters()?;
    writeln!(out, "\ncounters (DP_COUNTERS, summed over CPUs):")?;
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
    ensure!(
        counters.total_packets() == events.len() as u64,
        "every counted packet should have been traced: {} counted, {} traced, {} lost",
        counters.total_packets(),
        events.len(),
        datapath.trace_lost()?
    );

    let names = topo.netns_names();
    drop(datapath);
    drop(topo);
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
