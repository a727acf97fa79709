//! ClusterIP end to end: two nodes with pods, a node-local client and an
//! external client, real TCP/UDP servers that report their name and the
//! client address they saw. One `Datapath` per node, attached to the node's
//! device and its pods' host-side veths (tc ingress and egress, XDP on the
//! node device), programmed with the same services, like one agent per node.

use std::{
    cell::RefCell,
    collections::BTreeMap,
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use common::{Hook, Reason};
use dp::{BackendSlots, Datapath, Frontend, ServiceMaps};
use e2e::{
    cluster::CLUSTER_CIDR, parse_identity, require_root, tcp_echo_once, Cluster, Netns,
    TcpEchoServer, UdpEchoServer,
};

const TIMEOUT: Duration = Duration::from_secs(5);
const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;

fn vip(last: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([10, 96, 0, last], port))
}

struct Fixture {
    cluster: Cluster,
    /// One per node; behind a RefCell so tests can program services while
    /// holding namespaces of the cluster.
    datapaths: RefCell<Vec<Datapath>>,
    _servers: (Vec<TcpEchoServer>, Vec<UdpEchoServer>),
}

/// The node's eth0 carries dp's tc programs the way `mode` attaches them:
/// a netlink filter (`tc filter show`), or none there (tcx). `cargo xtask
/// test` runs these tests in both modes (`DP_TC_ATTACH=netlink`).
fn assert_attached_as(cluster: &Cluster, node: usize, mode: dp::kernel::loader::TcAttach) {
    let filters = e2e::stdout_of(std::process::Command::new("ip").args([
        "netns",
        "exec",
        cluster.node_ns(node).name(),
        "tc",
        "filter",
        "show",
        "dev",
        "eth0",
        "ingress",
    ]));
    let netlink = filters.contains("dp_tc_ingress");
    assert_eq!(
        netlink,
        mode == dp::kernel::loader::TcAttach::Netlink,
        "{mode:?}: {filters}"
    );
}

impl Fixture {
    /// Two nodes with three pods each; every pod serves TCP 8080 and UDP 5353.
    fn new() -> Self {
        require_root();
        let cluster = Cluster::new(&[3, 3]).unwrap();
        let mut datapaths = Vec::new();
        for (i, node) in cluster.nodes.iter().enumerate() {
            let mut dp = Datapath::load().unwrap();
            dp.set_node(
                IpAddr::V4(node.ip),
                Some((IpAddr::V4(CLUSTER_CIDR.0), CLUSTER_CIDR.1)),
                false,
            )
            .unwrap();
            cluster
                .node_ns(i)
                .run(|| -> dp::error::Result<()> {
                    dp.attach_xdp(&node.device)?;
                    for dev in std::iter::once(&node.device).chain(&node.pod_devices) {
                        dp.attach_tc(dev, Hook::TcIngress)?;
                        dp.attach_tc(dev, Hook::TcEgress)?;
                    }
                    Ok(())
                })
                .unwrap()
                .unwrap();
            assert_attached_as(&cluster, i, dp.tc_attach());
            datapaths.push(dp);
        }
        let mut tcp = Vec::new();
        let mut udp = Vec::new();
        for pod in &cluster.pods {
            let ns = cluster.pod_ns(&pod.name);
            let name = Some(pod.name.clone());
            tcp.push(
                TcpEchoServer::start_named(ns, SocketAddr::from((pod.ip, TCP_PORT)), name.clone())
                    .unwrap(),
            );
            udp.push(
                UdpEchoServer::start_named(ns, SocketAddr::from((pod.ip, UDP_PORT)), name).unwrap(),
            );
        }
        Fixture {
            cluster,
            datapaths: RefCell::new(datapaths),
            _servers: (tcp, udp),
        }
    }

    fn backend_id(&self, pod: &str, protocol: u8) -> u32 {
        let i = self
            .cluster
            .pods
            .iter()
            .position(|p| p.name == pod)
            .unwrap() as u32;
        i * 2 + if protocol == 6 { 1 } else { 2 }
    }

    /// Programs `frontend` with these ready and terminating pods on every
    /// node (the ports follow the protocol: TCP 8080, UDP 5353).
    fn service(&self, frontend: Frontend, id: u32, ready: &[&str], terminating: &[&str]) {
        let port = if frontend.protocol == 6 {
            TCP_PORT
        } else {
            UDP_PORT
        };
        let ids = |pods: &[&str]| {
            pods.iter()
                .map(|p| self.backend_id(p, frontend.protocol))
                .collect()
        };
        let slots = BackendSlots {
            ready: ids(ready),
            terminating: ids(terminating),
            local_only: false,
            ..BackendSlots::default()
        };
        let backends: Vec<(u32, SocketAddr, bool)> = ready
            .iter()
            .map(|p| (*p, false))
            .chain(terminating.iter().map(|p| (*p, true)))
            .map(|(p, term)| {
                let ip = self.cluster.pod(p).ip;
                (
                    self.backend_id(p, frontend.protocol),
                    SocketAddr::from((ip, port)),
                    term,
                )
            })
            .collect();
        for dp in self.datapaths.borrow_mut().iter_mut() {
            for (id, addr, term) in &backends {
                dp.set_backend(*id, *addr, frontend.protocol, *term)
                    .unwrap();
            }
            dp.set_service(&frontend, id, &slots).unwrap();
        }
    }

    fn remove_backend(&self, pod: &str, protocol: u8) {
        let id = self.backend_id(pod, protocol);
        for dp in self.datapaths.borrow_mut().iter_mut() {
            dp.remove_backend(id).unwrap();
        }
    }
}

/// One TCP request from `ns`: (backend name, client address it saw).
fn tcp_whoami(ns: &Netns, addr: SocketAddr) -> (String, SocketAddr) {
    let (reply, _) = tcp_echo_once(ns, addr, b"hi", TIMEOUT).unwrap();
    let (name, peer, echo) = parse_identity(&reply).expect("identity line");
    assert_eq!(echo, b"hi");
    (name, peer)
}

/// A UDP socket in `ns` (unconnected: each reply's source is checked).
fn udp_socket(ns: &Netns) -> UdpSocket {
    ns.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s
    })
    .unwrap()
}

/// One UDP request: (backend name, client address it saw); the reply must
/// come from the service address.
fn udp_whoami(sock: &UdpSocket, addr: SocketAddr) -> (String, SocketAddr) {
    sock.send_to(b"hi", addr).unwrap();
    let mut buf = [0u8; 1500];
    let (n, from) = sock.recv_from(&mut buf).expect("UDP reply");
    assert_eq!(from, addr, "the reply comes from the service address");
    let (name, peer, echo) = parse_identity(&buf[..n]).unwrap();
    assert_eq!(echo, b"hi");
    (name, peer)
}

fn pod_addr(f: &Fixture, pod: &str) -> IpAddr {
    IpAddr::V4(f.cluster.pod(pod).ip)
}

#[test]
fn connections_spread_over_local_and_remote_backends_and_replies_come_from_the_vip() {
    let f = Fixture::new();
    let web = vip(10, 80);
    f.service(
        Frontend::tcp(web),
        1,
        &["pod-1-1", "pod-2-0", "pod-2-1"],
        &[],
    );
    let client = f.cluster.pod_ns("pod-1-0");
    let mut hits = BTreeMap::new();
    for _ in 0..200 {
        let (name, peer) = tcp_whoami(client, web);
        assert_eq!(peer.ip(), pod_addr(&f, "pod-1-0"), "pod source kept");
        *hits.entry(name).or_insert(0) += 1;
    }
    assert_eq!(hits.len(), 3, "every backend got traffic: {hits:?}");
    // UDP: replies from the service address.
    let dns = vip(10, 53);
    f.service(Frontend::udp(dns), 2, &["pod-1-1", "pod-2-0"], &[]);
    let sock = udp_socket(client);
    let mut names = BTreeMap::new();
    for _ in 0..40 {
        let sock = udp_socket(client);
        let (name, _) = udp_whoami(&sock, dns);
        *names.entry(name).or_insert(0) += 1;
    }
    assert_eq!(names.len(), 2, "{names:?}");
    udp_whoami(&sock, dns);
    let c = f.datapaths.borrow()[0].counters().unwrap();
    assert!(c.packets(Hook::TcIngress, Reason::NewFlow) >= 200);
    assert!(c.packets(Hook::TcIngress, Reason::ReplyReverseNat) >= 200);
}

#[test]
fn node_local_and_remote_node_clients_reach_the_service() {
    let f = Fixture::new();
    let web = vip(10, 80);
    f.service(Frontend::tcp(web), 1, &["pod-1-1", "pod-2-0"], &[]);
    // A process in node1's own namespace (kube-proxy's OUTPUT path).
    let node1 = f.cluster.node_ns(0);
    let mut seen = BTreeMap::new();
    for _ in 0..40 {
        let (name, peer) = tcp_whoami(node1, web);
        assert_eq!(peer.ip(), IpAddr::V4(f.cluster.nodes[0].ip));
        *seen.entry(name).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "local and remote backends: {seen:?}");
    // UDP from the node too.
    let dns = vip(10, 53);
    f.service(Frontend::udp(dns), 2, &["pod-2-1"], &[]);
    let (name, _) = udp_whoami(&udp_socket(node1), dns);
    assert_eq!(name, "pod-2-1");
    // A pod on node2 reaching a backend on node1.
    f.service(Frontend::tcp(vip(11, 80)), 3, &["pod-1-2"], &[]);
    let (name, peer) = tcp_whoami(f.cluster.pod_ns("pod-2-2"), vip(11, 80));
    assert_eq!(
        (name.as_str(), peer.ip()),
        ("pod-1-2", pod_addr(&f, "pod-2-2"))
    );
}

#[test]
fn services_without_endpoints_and_unserved_ports_are_refused_at_once() {
    let f = Fixture::new();
    let empty = vip(20, 80);
    f.service(Frontend::tcp(empty), 1, &[], &[]);
    f.service(Frontend::udp(vip(20, 53)), 2, &[], &[]);
    for ns in [f.cluster.pod_ns("pod-1-0"), f.cluster.node_ns(0)] {
        for addr in [empty, vip(20, 81)] {
            let err = ns
                .run(|| TcpStream::connect_timeout(&addr, TIMEOUT))
                .unwrap()
                .expect_err("no endpoints");
            assert_eq!(
                err.kind(),
                ErrorKind::ConnectionRefused,
                "{} -> {addr}",
                ns.name()
            );
        }
        let sock = ns
            .run(|| {
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                s.connect(vip(20, 53)).unwrap();
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                s
            })
            .unwrap();
        sock.send(b"q").unwrap();
        let err = sock
            .recv(&mut [0u8; 64])
            .expect_err("ICMP port unreachable");
        assert_eq!(
            err.kind(),
            ErrorKind::ConnectionRefused,
            "UDP from {}",
            ns.name()
        );
    }
    let c = f.datapaths.borrow()[0].counters().unwrap();
    assert!(
        c.packets(Hook::TcIngress, Reason::NoEndpoints) >= 2,
        "pod path"
    );
    assert!(
        c.packets(Hook::TcEgress, Reason::NoEndpoints) >= 2,
        "node-local path"
    );
    assert!(c.packets(Hook::TcIngress, Reason::PortNotServed) >= 1);
}

#[test]
fn a_pod_reaches_itself_through_its_service() {
    let f = Fixture::new();
    let solo = vip(30, 80);
    f.service(Frontend::tcp(solo), 1, &["pod-1-1"], &[]);
    let (name, peer) = tcp_whoami(f.cluster.pod_ns("pod-1-1"), solo);
    assert_eq!(name, "pod-1-1", "hairpin");
    assert_eq!(
        peer.ip(),
        IpAddr::V4(f.cluster.nodes[0].ip),
        "masqueraded to the node"
    );
}

#[test]
fn clients_outside_the_cluster_cidr_are_masqueraded() {
    let f = Fixture::new();
    let web = vip(40, 80);
    f.service(Frontend::tcp(web), 1, &["pod-1-0", "pod-2-0"], &[]);
    let mut seen = BTreeMap::new();
    for _ in 0..20 {
        let (name, peer) = tcp_whoami(f.cluster.client_ns(), web);
        assert_eq!(
            peer.ip(),
            IpAddr::V4(f.cluster.nodes[0].ip),
            "SNAT to the entry node"
        );
        *seen.entry(name).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
}

#[test]
fn a_udp_flow_survives_the_removal_of_its_backend() {
    let f = Fixture::new();
    let dns = vip(50, 53);
    f.service(Frontend::udp(dns), 1, &["pod-1-1", "pod-2-1"], &[]);
    let sock = udp_socket(f.cluster.pod_ns("pod-1-0"));
    let (first, _) = udp_whoami(&sock, dns);
    let other = if first == "pod-1-1" {
        "pod-2-1"
    } else {
        "pod-1-1"
    };
    // The endpoint goes away: its slot first, then the backend.
    f.service(Frontend::udp(dns), 1, &[other], &[]);
    f.remove_backend(&first, 17);
    for _ in 0..3 {
        let (name, _) = udp_whoami(&sock, dns);
        assert_eq!(name, other, "the same socket moved to a live backend");
    }
    let c = f.datapaths.borrow()[0].counters().unwrap();
    assert_eq!(c.packets(Hook::TcIngress, Reason::BackendGoneRepicked), 1);
}

#[test]
fn a_tcp_flow_to_a_removed_backend_is_reset() {
    let f = Fixture::new();
    let web = vip(60, 80);
    f.service(Frontend::tcp(web), 1, &["pod-2-2"], &[]);
    let mut conn = f
        .cluster
        .pod_ns("pod-1-0")
        .run(|| TcpStream::connect_timeout(&web, TIMEOUT))
        .unwrap()
        .unwrap();
    conn.set_read_timeout(Some(TIMEOUT)).unwrap();
    conn.write_all(b"one").unwrap();
    let mut buf = [0u8; 256];
    let n = conn.read(&mut buf).unwrap();
    assert!(parse_identity(&buf[..n]).is_some() || n > 0);
    f.service(Frontend::tcp(web), 1, &[], &[]);
    f.remove_backend("pod-2-2", 6);
    conn.write_all(b"two").unwrap();
    let mut outcome = Ok(0);
    // Drain what the backend sent before; the reset ends the stream.
    for _ in 0..4 {
        outcome = conn.read(&mut buf);
        if !matches!(outcome, Ok(n) if n > 0) {
            break;
        }
    }
    let err = outcome.expect_err("the client is reset");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
    let c = f.datapaths.borrow()[0].counters().unwrap();
    assert_eq!(c.packets(Hook::TcIngress, Reason::BackendGoneReset), 1);
}

#[test]
fn terminating_backends_keep_their_connections_and_serve_only_as_a_fallback() {
    let f = Fixture::new();
    let web = vip(70, 80);
    f.service(Frontend::tcp(web), 1, &["pod-1-2"], &[]);
    let client = f.cluster.pod_ns("pod-1-0");
    let mut long = client
        .run(|| TcpStream::connect_timeout(&web, TIMEOUT))
        .unwrap()
        .unwrap();
    long.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut buf = [0u8; 256];
    let n = long.read(&mut buf).unwrap();
    let (name, _, _) = parse_identity(&buf[..n]).unwrap();
    assert_eq!(name, "pod-1-2");
    // pod-1-2 terminates (still serving); pod-2-0 is ready.
    f.service(Frontend::tcp(web), 1, &["pod-2-0"], &["pod-1-2"]);
    for _ in 0..20 {
        assert_eq!(
            tcp_whoami(client, web).0,
            "pod-2-0",
            "new connections avoid it"
        );
    }
    long.write_all(b"still here").unwrap();
    let n = long.read(&mut buf).unwrap();
    assert_eq!(
        &buf[..n],
        b"still here",
        "its existing connection continues"
    );
    // No ready endpoint left: the serving-terminating one takes new flows.
    f.service(Frontend::tcp(web), 1, &[], &["pod-1-2"]);
    assert_eq!(tcp_whoami(client, web).0, "pod-1-2");
}

#[test]
fn trace_events_explain_forwarding_and_rejects() {
    let f = Fixture::new();
    let web = vip(80, 80);
    f.service(Frontend::tcp(web), 7, &["pod-2-0"], &[]);
    f.service(Frontend::tcp(vip(81, 80)), 8, &[], &[]);
    f.datapaths.borrow_mut()[0].set_tracing(true).unwrap();
    let mut reader = f.datapaths.borrow_mut()[0].trace_reader().unwrap();
    let client = f.cluster.pod_ns("pod-1-0");
    tcp_whoami(client, web);
    let refused = client
        .run(|| TcpStream::connect_timeout(&vip(81, 80), TIMEOUT))
        .unwrap();
    assert!(refused.is_err());
    let events = reader.drain();
    let with = |reason: Reason| events.iter().filter(|e| e.reason == reason as u32).count();
    assert!(with(Reason::NewFlow) >= 1, "{events:?}");
    assert!(with(Reason::Established) >= 1);
    assert!(with(Reason::ReplyReverseNat) >= 1);
    assert_eq!(with(Reason::NoEndpoints), 1);
    let new = events
        .iter()
        .find(|e| e.reason == Reason::NewFlow as u32)
        .unwrap();
    assert_eq!(new.service_id, 7);
    let backend = common::addr::ip_of(&new.translated.daddr);
    assert_eq!(backend, pod_addr(&f, "pod-2-0"));
    let reject = events
        .iter()
        .find(|e| e.reason == Reason::NoEndpoints as u32)
        .unwrap();
    assert_eq!(reject.service_id, 8);
    assert_eq!(
        common::addr::ip_of(&reject.original.daddr),
        IpAddr::V4(Ipv4Addr::new(10, 96, 0, 81))
    );
}

#[test]
fn fragmentation_needed_about_a_service_flow_reaches_the_client_socket() {
    let f = Fixture::new();
    let dns = vip(90, 53);
    f.service(Frontend::udp(dns), 1, &["pod-2-0"], &[]);
    // The path to the backend narrows: node2 forwards onto a 1000-byte MTU.
    f.cluster
        .node_ns(1)
        .ip(&[
            "link",
            "set",
            &f.cluster.pod("pod-2-0").host_device,
            "mtu",
            "1000",
        ])
        .unwrap();
    let sock = f
        .cluster
        .pod_ns("pod-1-0")
        .run(|| {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.connect(dns).unwrap();
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
            s
        })
        .unwrap();
    let dont_fragment: libc::c_int = libc::IP_PMTUDISC_DO;
    // SAFETY: a valid socket and option value.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&dont_fragment as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    sock.send(&[0u8; 1400]).unwrap();
    // node2 answers "fragmentation needed" quoting pod -> backend; only once
    // node1 translates the quote back to pod -> service does the kernel find
    // this socket and report the error on it.
    let err = sock.recv(&mut [0u8; 64]).expect_err("fragmentation needed");
    assert_eq!(err.raw_os_error(), Some(libc::EMSGSIZE), "{err}");
    let c = f.datapaths.borrow()[0].counters().unwrap();
    assert_eq!(c.packets(Hook::TcIngress, Reason::IcmpErrorTranslated), 1);
}
