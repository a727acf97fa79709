//! The datapath skeleton on a real veth between two namespaces: real TCP and
//! UDP servers and clients, the tc and XDP programs attached inside the
//! server namespace, counters and ring-buffer events read back through aya.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use common::{proto, trace::FAMILY_IPV4, Hook, Reason, TraceEvent, Verdict};
use dp::Datapath;
use e2e::{require_root, tcp_echo_once, udp_echo_once, TcpEchoServer, Topology, UdpEchoServer};

const TIMEOUT: Duration = Duration::from_secs(5);
const CLIENT: [u8; 4] = [10, 201, 0, 1];
const SERVER: [u8; 4] = [10, 201, 0, 2];

fn v4(t: &[u8; 16]) -> [u8; 4] {
    common::addr::as_v4(t).expect("an IPv4 address")
}

#[test]
fn real_tcp_and_udp_are_counted_and_traced_at_every_hook() {
    require_root();
    let topo = Topology::pair("client", "server", "10.201.0").unwrap();
    let server_ns = topo.ns("server");
    let client_ns = topo.ns("client");

    let mut dp = Datapath::load().unwrap();
    dp.set_tracing(true).unwrap();
    let mut reader = dp.trace_reader().unwrap();
    let ifindex = server_ns
        .run(|| -> dp::error::Result<u32> {
            dp.attach_xdp("eth0")?;
            dp.attach_tc("eth0", Hook::TcIngress)?;
            dp.attach_tc("eth0", Hook::TcEgress)?;
            dp::kernel::loader::ifindex("eth0")
        })
        .unwrap()
        .unwrap();

    let tcp: SocketAddr = "10.201.0.2:8080".parse().unwrap();
    let udp: SocketAddr = "10.201.0.2:5353".parse().unwrap();
    let _tcp_server = TcpEchoServer::start(server_ns, tcp).unwrap();
    let _udp_server = UdpEchoServer::start(server_ns, udp).unwrap();

    let mut tcp_ports = Vec::new();
    for i in 0..3 {
        let msg = format!("tcp request {i}");
        let (reply, local) = tcp_echo_once(client_ns, tcp, msg.as_bytes(), TIMEOUT).unwrap();
        assert_eq!(reply, msg.as_bytes());
        tcp_ports.push(local.port());
    }
    let mut udp_ports = Vec::new();
    for i in 0..2 {
        let msg = format!("udp request {i}");
        let (reply, local) = udp_echo_once(client_ns, udp, msg.as_bytes(), TIMEOUT).unwrap();
        assert_eq!(reply, msg.as_bytes());
        udp_ports.push(local.port());
    }

    // Detach, then read: the counters and the ring buffer are final.
    dp.detach_all().unwrap();
    let events: Vec<TraceEvent> = reader.drain();
    let counters = dp.counters().unwrap();
    assert_eq!(dp.trace_lost().unwrap(), 0);

    // Every counted packet was traced, under the same hook and reason.
    let mut traced: BTreeMap<(Hook, Reason), u64> = BTreeMap::new();
    for e in &events {
        let hook = Hook::from_u8(e.hook).expect("valid hook");
        let reason = Reason::from_u32(e.reason).expect("valid reason");
        *traced.entry((hook, reason)).or_default() += 1;
        assert_eq!(e.ifindex, ifindex, "all events come from the server's eth0");
    }
    let counted: BTreeMap<(Hook, Reason), u64> = counters
        .by_reason
        .iter()
        .map(|(k, c)| (*k, c.packets))
        .collect();
    assert_eq!(counted, traced, "counters and trace events disagree");

    // IPv4 TCP/UDP: passed, no service; at least handshake + data + FIN each way.
    let flow = |e: &&TraceEvent, proto_: u8, port: u16, hook: Hook| {
        let t = &e.original;
        e.hook == hook as u8
            && t.family == FAMILY_IPV4
            && t.protocol == proto_
            && ((v4(&t.saddr) == CLIENT && t.sport == port)
                || (v4(&t.daddr) == CLIENT && t.dport == port))
    };
    for &port in &tcp_ports {
        for hook in [Hook::Xdp, Hook::TcIngress, Hook::TcEgress] {
            let seen: Vec<&TraceEvent> = events
                .iter()
                .filter(|e| flow(e, proto::IPPROTO_TCP, port, hook))
                .collect();
            assert!(
                seen.len() >= 3,
                "{} saw {} packets of TCP flow :{port}",
                hook.name(),
                seen.len()
            );
            // No service: XDP and tc both pass it.
            let reason = Reason::NoService;
            for e in &seen {
                assert_eq!(e.verdict, Verdict::Pass as u8);
                assert_eq!(e.reason, reason as u32);
                let inbound = hook != Hook::TcEgress;
                let (src, dst) = (v4(&e.original.saddr), v4(&e.original.daddr));
                assert_eq!(
                    (src, dst),
                    if inbound {
                        (CLIENT, SERVER)
                    } else {
                        (SERVER, CLIENT)
                    }
                );
            }
            let first = seen[0].tcp_flags;
            let expected = if hook == Hook::TcEgress { 0x12 } else { 0x02 };
            assert_eq!(
                first,
                expected,
                "{} first TCP packet of :{port}",
                hook.name()
            );
        }
        // XDP runs before tc ingress on the same packets.
        let at = |hook| {
            events
                .iter()
                .filter(|e| flow(e, proto::IPPROTO_TCP, port, hook))
                .count()
        };
        assert_eq!(at(Hook::Xdp), at(Hook::TcIngress));
    }
    for &port in &udp_ports {
        for hook in [Hook::Xdp, Hook::TcIngress, Hook::TcEgress] {
            let seen: Vec<&TraceEvent> = events
                .iter()
                .filter(|e| flow(e, proto::IPPROTO_UDP, port, hook))
                .collect();
            assert_eq!(
                seen.len(),
                1,
                "{}: one datagram of UDP flow :{port}",
                hook.name()
            );
            let t = seen[0].original;
            if hook == Hook::TcEgress {
                assert_eq!((t.sport, t.dport), (5353, port), "the reply");
            } else {
                assert_eq!((t.sport, t.dport), (port, 5353), "the request");
            }
            let reason = Reason::NoService;
            assert_eq!(seen[0].reason, reason as u32);
        }
    }
    // ARP went both ways too: passed as not IP.
    assert!(counters.packets(Hook::Xdp, Reason::NotIp) >= 1);
    assert!(counters.packets(Hook::TcEgress, Reason::NotIp) >= 1);
}

#[test]
fn trace_reader_wakes_up_on_the_next_event() {
    require_root();
    let mut topo = Topology::new().unwrap();
    topo.add_ns("a").unwrap();
    topo.add_ns("b").unwrap();
    topo.link(
        ("a", "eth0", "10.202.0.1/24"),
        ("b", "eth0", "10.202.0.2/24"),
    )
    .unwrap();
    let mut dp = Datapath::load().unwrap();
    dp.set_tracing(true).unwrap();
    let mut reader = dp.trace_reader().unwrap();
    topo.ns("b")
        .run(|| dp.attach_tc("eth0", Hook::TcIngress))
        .unwrap()
        .unwrap();
    let udp: SocketAddr = "10.202.0.2:7000".parse().unwrap();
    let _server = UdpEchoServer::start(topo.ns("b"), udp).unwrap();
    udp_echo_once(topo.ns("a"), udp, b"wake", TIMEOUT).unwrap();
    // The event is there (or arrives) without any sleep: poll(2) on the ring.
    let mut found = false;
    while let Some(e) = reader.next_timeout(TIMEOUT).unwrap() {
        if e.original.protocol == proto::IPPROTO_UDP && e.original.dport == 7000 {
            found = true;
            break;
        }
    }
    assert!(
        found,
        "no trace event for the UDP datagram within {TIMEOUT:?}"
    );
}
