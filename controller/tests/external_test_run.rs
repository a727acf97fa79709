//! BPF_PROG_TEST_RUN tests of the rules for traffic entering a node from
//! outside (kube-proxy's semantics): NodePort, externalIPs and LoadBalancer
//! IPs with masquerade, external and internal traffic policies, source
//! ranges and session affinity, at tc and at XDP (output bytes, checksums,
//! return codes, conntrack, counters).

mod support;

use std::net::Ipv4Addr;

use common::{
    ct::{CT_DIR_ORIGINAL, CT_FLAG_SNAT},
    Hook, Reason,
};
use dp::{BackendSlots, Datapath, Frontend, ServiceMaps};
use e2e::Topology;
use support::*;

const OUTSIDE: [u8; 4] = [192, 168, 7, 50];
const STRANGER: [u8; 4] = [192, 168, 8, 1];
const POD_CLIENT: [u8; 4] = [10, 244, 1, 5];
const LOCAL_BACKEND: [u8; 4] = [10, 244, 1, 7];
const REMOTE_BACKEND: [u8; 4] = [10, 244, 2, 7];
const REMOTE_BACKEND2: [u8; 4] = [10, 244, 2, 8];
const VIP: [u8; 4] = [10, 96, 0, 10];
const EXTERNAL_IP: [u8; 4] = [198, 51, 100, 10];
const LB_IP: [u8; 4] = [203, 0, 113, 10];
const NODE_PORT: u16 = 30080;

const LOCAL_ID: u32 = 1;
const REMOTE_ID: u32 = 2;
const REMOTE2_ID: u32 = 3;

/// Node 172.18.0.2, cluster CIDR 10.244.0.0/16, backends on this node
/// (10.244.1.7) and on another (10.244.2.7, 10.244.2.8), TCP and UDP, port
/// 8080.
fn setup() -> Datapath {
    let mut dp = load_node();
    for (id, ip) in [
        (LOCAL_ID, LOCAL_BACKEND),
        (REMOTE_ID, REMOTE_BACKEND),
        (REMOTE2_ID, REMOTE_BACKEND2),
    ] {
        dp.set_backend(id, sa(ip, 8080), 6, false).unwrap();
        dp.set_backend(id + 100, sa(ip, 8080), 17, false).unwrap();
    }
    dp
}

fn external(ready: &[u32]) -> BackendSlots {
    BackendSlots {
        ready: ready.to_vec(),
        external: true,
        ..BackendSlots::default()
    }
}

/// eTP=Local: the node's backends outside, every backend inside.
fn etp_local(local: &[u32], all: &[u32]) -> BackendSlots {
    BackendSlots {
        ready: local.to_vec(),
        local_only: true,
        external: true,
        internal: Some((all.to_vec(), vec![])),
        ..BackendSlots::default()
    }
}

fn addr_port(out: &[u8]) -> (([u8; 4], u16), ([u8; 4], u16)) {
    let v = Ipv4View::new(out);
    ((v.src(), v.sport()), (v.dst(), v.dport()))
}

#[test]
fn a_node_port_to_a_remote_backend_is_masqueraded_and_reverse_nated() {
    let mut dp = setup();
    dp.set_service(
        &Frontend::tcp(sa(NODE, NODE_PORT)),
        10,
        &external(&[REMOTE_ID]),
    )
    .unwrap();
    let out = forward(&dp, &tcp_syn(OUTSIDE, 40000, NODE, NODE_PORT));
    assert_eq!(
        addr_port(&out),
        ((NODE, 40000), (REMOTE_BACKEND, 8080)),
        "DNAT to the backend, SNAT to the node so the reply comes back here"
    );
    let orig = ct_get(&dp, &ct_key(OUTSIDE, 40000, NODE, NODE_PORT, 6)).unwrap();
    assert_eq!(orig.direction, CT_DIR_ORIGINAL);
    assert_eq!(orig.flags & CT_FLAG_SNAT, CT_FLAG_SNAT);

    let reply = tcp(
        REMOTE_BACKEND,
        8080,
        NODE,
        40000,
        TCP_SYN | TCP_ACK,
        5000,
        1001,
        &[],
    );
    let back = forward(&dp, &reply);
    assert_eq!(
        addr_port(&back),
        ((NODE, NODE_PORT), (OUTSIDE, 40000)),
        "the client sees the node IP and node port"
    );
    let c = dp.counters().unwrap();
    assert_eq!(c.packets(Hook::TcIngress, Reason::NewFlow), 1);
    assert_eq!(c.packets(Hook::TcIngress, Reason::ReplyReverseNat), 1);
}

#[test]
fn external_cluster_policy_masquerades_even_traffic_from_pods() {
    // kube-proxy marks every packet to an external destination for
    // masquerade when externalTrafficPolicy is Cluster.
    let mut dp = setup();
    dp.set_service(
        &Frontend::tcp(sa(NODE, NODE_PORT)),
        10,
        &external(&[LOCAL_ID]),
    )
    .unwrap();
    let out = forward(&dp, &tcp_syn(POD_CLIENT, 40001, NODE, NODE_PORT));
    assert_eq!(addr_port(&out), ((NODE, 40001), (LOCAL_BACKEND, 8080)));
}

#[test]
fn external_ips_and_load_balancer_ips_are_dnated() {
    let mut dp = setup();
    dp.set_service(
        &Frontend::udp(sa(EXTERNAL_IP, 53)),
        10,
        &external(&[REMOTE_ID + 100]),
    )
    .unwrap();
    dp.set_service(&Frontend::tcp(sa(LB_IP, 443)), 11, &external(&[REMOTE_ID]))
        .unwrap();
    let out = forward(&dp, &udp(OUTSIDE, 5353, EXTERNAL_IP, 53, b"query"));
    assert_eq!(addr_port(&out), ((NODE, 5353), (REMOTE_BACKEND, 8080)));
    let back = forward(&dp, &udp(REMOTE_BACKEND, 8080, NODE, 5353, b"answer"));
    assert_eq!(addr_port(&back), ((EXTERNAL_IP, 53), (OUTSIDE, 5353)));
    assert_eq!(Ipv4View::new(&back).payload(), b"answer");

    let out = forward(&dp, &tcp_syn(OUTSIDE, 40002, LB_IP, 443));
    assert_eq!(addr_port(&out), ((NODE, 40002), (REMOTE_BACKEND, 8080)));
}

#[test]
fn other_ports_of_node_external_and_lb_addresses_pass_but_cluster_ips_reject() {
    let mut dp = setup();
    for (ip, id) in [(NODE, 10), (EXTERNAL_IP, 11), (LB_IP, 12)] {
        let port = if ip == NODE { NODE_PORT } else { 80 };
        dp.set_service(&Frontend::tcp(sa(ip, port)), id, &external(&[REMOTE_ID]))
            .unwrap();
    }
    dp.set_service(
        &Frontend::tcp(sa(VIP, 80)),
        13,
        &BackendSlots {
            ready: vec![REMOTE_ID],
            ..BackendSlots::default()
        },
    )
    .unwrap();
    for dst in [NODE, EXTERNAL_IP, LB_IP] {
        let frame = tcp_syn(OUTSIDE, 40003, dst, 22);
        assert_eq!(
            run(&dp, Hook::TcIngress, &frame),
            (TC_ACT_OK, frame.clone()),
            "ssh to {dst:?} is none of dp's business"
        );
    }
    let (ret, _) = run(&dp, Hook::TcIngress, &tcp_syn(OUTSIDE, 40003, VIP, 22));
    assert_eq!(
        ret, TC_ACT_REDIRECT,
        "a ClusterIP's unserved port is rejected"
    );
    let c = dp.counters().unwrap();
    assert_eq!(c.packets(Hook::TcIngress, Reason::NoService), 3);
    assert_eq!(c.packets(Hook::TcIngress, Reason::PortNotServed), 1);
}

#[test]
fn an_external_frontend_without_endpoints_rejects() {
    let mut dp = setup();
    dp.set_service(&Frontend::tcp(sa(NODE, NODE_PORT)), 10, &external(&[]))
        .unwrap();
    let (ret, out) = run(
        &dp,
        Hook::TcIngress,
        &tcp_syn(OUTSIDE, 40004, NODE, NODE_PORT),
    );
    assert_eq!(ret, TC_ACT_REDIRECT, "ICMP port unreachable back");
    let v = Ipv4View::new(&out);
    assert_eq!((v.src(), v.dst(), v.protocol()), (NODE, OUTSIDE, 1));
    assert_eq!((v.l4()[0], v.l4()[1]), (3, 3));
    let c = dp.counters().unwrap();
    assert_eq!(c.packets(Hook::TcIngress, Reason::NoEndpoints), 1);
}

#[test]
fn external_local_policy_keeps_the_client_ip_and_uses_only_local_backends() {
    let mut dp = setup();
    dp.set_service(
        &Frontend::tcp(sa(NODE, NODE_PORT)),
        10,
        &etp_local(&[LOCAL_ID], &[REMOTE_ID]),
    )
    .unwrap();
    for port in 41000..41020 {
        let out = forward(&dp, &tcp_syn(OUTSIDE, port, NODE, NODE_PORT));
        assert_eq!(
            addr_port(&out),
            ((OUTSIDE, port), (LOCAL_BACKEND, 8080)),
            "client IP preserved, local backend only"
        );
    }
    let back = forward(
        &dp,
        &tcp(
            LOCAL_BACKEND,
            8080,
            OUTSIDE,
            41000,
            TCP_SYN | TCP_ACK,
            1,
            1001,
            &[],
        ),
    );
    assert_eq!(addr_port(&back), ((NODE, NODE_PORT), (OUTSIDE, 41000)));
}

#[test]
fn external_local_policy_from_pods_and_the_host_uses_every_backend() {
    let mut dp = setup();
    // Only a remote backend in the cluster-wide view, so its use is visible.
    dp.set_service(
        &Frontend::tcp(sa(NODE, NODE_PORT)),
        10,
        &etp_local(&[LOCAL_ID], &[REMOTE_ID]),
    )
    .unwrap();
    let out = forward(&dp, &tcp_syn(POD_CLIENT, 40005, NODE, NODE_PORT));
    assert_eq!(
        addr_port(&out),
        ((POD_CLIENT, 40005), (REMOTE_BACKEND, 8080)),
        "pod traffic: short-circuited to the cluster-wide backends, no masquerade"
    );
    let out = forward(&dp, &tcp_syn(NODE, 40006, NODE, NODE_PORT));
    assert_eq!(
        addr_port(&out),
        ((NODE, 40006), (REMOTE_BACKEND, 8080)),
        "the host's own traffic: cluster-wide, masqueraded"
    );
    let orig = ct_get(&dp, &ct_key(NODE, 40006, NODE, NODE_PORT, 6)).unwrap();
    assert_eq!(orig.flags & CT_FLAG_SNAT, CT_FLAG_SNAT);
}

#[test]
fn external_local_policy_without_local_endpoints_drops_outside_traffic_only() {
    let mut dp = setup();
    dp.set_service(
        &Frontend::tcp(sa(NODE, NODE_PORT)),
        10,
        &etp_local(&[], &[REMOTE_ID]),
    )
    .unwrap();
    let (ret, _) = run(
        &dp,
        Hook::TcIngress,
        &tcp_syn(OUTSIDE, 40007, NODE, NODE_PORT),
    );
    assert_eq!(ret, TC_ACT_SHOT, "dropped, not rejected (kube-proxy)");
    let out = forward(&dp, &tcp_syn(POD_CLIENT, 40008, NODE, NODE_PORT));
    assert_eq!(
        addr_port(&out).1,
        (REMOTE_BACKEND, 8080),
        "pods still reach it"
    );
    let c = dp.counters().unwrap();
    assert_eq!(c.packets(Hook::TcIngress, Reason::NoLocalEndpoints), 1);
    assert_eq!(c.packets(Hook::TcIngress, Reason::NewFlow), 1);
}

#[test]
fn internal_local_policy_uses_only_local_backends_for_cluster_ip_traffic() {
    let mut dp = setup();
    let slots = BackendSlots {
        ready: vec![LOCAL_ID],
        local_only: true,
        ..BackendSlots::default()
    };
    dp.set_service(&Frontend::tcp(sa(VIP, 80)), 10, &slots)
        .unwrap();
    for port in 42000..42010 {
        let out = forward(&dp, &tcp_syn(POD_CLIENT, port, VIP, 80));
        assert_eq!(addr_port(&out), ((POD_CLIENT, port), (LOCAL_BACKEND, 8080)));
    }
}

fn lb_with_ranges(dp: &mut Datapath, ranges: &[(Ipv4Addr, u8)]) {
    let slots = BackendSlots {
        source_ranges: ranges
            .iter()
            .map(|(ip, len)| ((*ip).into(), *len))
            .collect(),
        ..external(&[REMOTE_ID])
    };
    dp.set_service(&Frontend::tcp(sa(LB_IP, 443)), 10, &slots)
        .unwrap();
}

#[test]
fn load_balancer_source_ranges_drop_other_sources() {
    let mut dp = setup();
    lb_with_ranges(&mut dp, &[(Ipv4Addr::new(192, 168, 7, 0), 24)]);
    forward(&dp, &tcp_syn(OUTSIDE, 40009, LB_IP, 443));
    let (ret, _) = run(&dp, Hook::TcIngress, &tcp_syn(STRANGER, 40009, LB_IP, 443));
    assert_eq!(ret, TC_ACT_SHOT);
    let (ret, _) = run(
        &dp,
        Hook::TcIngress,
        &tcp_syn(POD_CLIENT, 40010, LB_IP, 443),
    );
    assert_eq!(ret, TC_ACT_SHOT, "the firewall applies to pods too");
    let c = dp.counters().unwrap();
    assert_eq!(c.packets(Hook::TcIngress, Reason::SourceRangeDenied), 2);

    // Ranges follow the Service: widened, then removed.
    lb_with_ranges(&mut dp, &[(Ipv4Addr::new(192, 168, 0, 0), 16)]);
    forward(&dp, &tcp_syn(STRANGER, 40011, LB_IP, 443));
    assert_eq!(
        dp.read_source_ranges().unwrap().get(&10),
        Some(&vec![(Ipv4Addr::new(192, 168, 0, 0).into(), 16)])
    );
    lb_with_ranges(&mut dp, &[]);
    forward(&dp, &tcp_syn(POD_CLIENT, 40012, LB_IP, 443));
    assert!(dp.read_source_ranges().unwrap().is_empty());
}

fn affinity_service(dp: &mut Datapath, ready: &[u32], seconds: u32) {
    let slots = BackendSlots {
        ready: ready.to_vec(),
        affinity_seconds: Some(seconds),
        ..BackendSlots::default()
    };
    dp.set_service(&Frontend::tcp(sa(VIP, 80)), 10, &slots)
        .unwrap();
}

#[test]
fn session_affinity_keeps_a_client_on_its_backend_across_connections() {
    let mut dp = setup();
    affinity_service(&mut dp, &[LOCAL_ID, REMOTE_ID, REMOTE2_ID], 10_800);
    let first = forward(&dp, &tcp_syn(POD_CLIENT, 43000, VIP, 80));
    let backend = addr_port(&first).1;
    for port in 43001..43050 {
        let out = forward(&dp, &tcp_syn(POD_CLIENT, port, VIP, 80));
        assert_eq!(addr_port(&out).1, backend, "connection from port {port}");
    }
    let c = dp.counters().unwrap();
    assert_eq!(c.packets(Hook::TcIngress, Reason::NewFlow), 1);
    assert_eq!(c.packets(Hook::TcIngress, Reason::NewFlowAffinity), 49);

    // Its backend leaves the service and the maps: the entry is ignored.
    let (gone, rest): (Vec<u32>, Vec<u32>) = [LOCAL_ID, REMOTE_ID, REMOTE2_ID]
        .into_iter()
        .partition(|id| {
            [LOCAL_BACKEND, REMOTE_BACKEND, REMOTE_BACKEND2][*id as usize - 1] == backend.0
        });
    affinity_service(&mut dp, &rest, 10_800);
    dp.remove_backend(gone[0]).unwrap();
    let out = forward(&dp, &tcp_syn(POD_CLIENT, 43100, VIP, 80));
    let moved = addr_port(&out).1;
    assert_ne!(moved, backend);
    let out = forward(&dp, &tcp_syn(POD_CLIENT, 43101, VIP, 80));
    assert_eq!(
        addr_port(&out).1,
        moved,
        "and the new backend is remembered"
    );
}

/// Found by the fuzzer (fuzz_test_run.rs): an affinity record was used
/// as long as its backend existed anywhere. A backend that leaves the
/// service but stays a backend (of another service), and a service left
/// without endpoints, must not keep the client.
#[test]
fn session_affinity_ends_when_its_backend_leaves_the_service() {
    let mut dp = setup();
    affinity_service(&mut dp, &[LOCAL_ID, REMOTE_ID], 10_800);
    let first = forward(&dp, &tcp_syn(POD_CLIENT, 45000, VIP, 80));
    let backend = addr_port(&first).1;
    let (pinned, other) = if backend.0 == LOCAL_BACKEND {
        (LOCAL_ID, REMOTE_ID)
    } else {
        (REMOTE_ID, LOCAL_ID)
    };
    // Out of this service, still in DP_BACKENDS (another service's).
    affinity_service(&mut dp, &[other], 10_800);
    for port in 45001..45020 {
        let out = forward(&dp, &tcp_syn(POD_CLIENT, port, VIP, 80));
        assert_ne!(addr_port(&out).1, backend, "connection from port {port}");
    }
    // Back in: the client is remembered on the backend it went to since.
    affinity_service(&mut dp, &[pinned, other], 10_800);
    let out = forward(&dp, &tcp_syn(POD_CLIENT, 45100, VIP, 80));
    assert_ne!(addr_port(&out).1, backend);
    // No endpoints at all: rejected, whatever the record says.
    affinity_service(&mut dp, &[], 10_800);
    let (ret, _) = run(&dp, Hook::TcIngress, &tcp_syn(POD_CLIENT, 45200, VIP, 80));
    assert_eq!(ret, TC_ACT_REDIRECT, "ICMP port unreachable back");
    let c = dp.counters().unwrap();
    assert_eq!(c.packets(Hook::TcIngress, Reason::NoEndpoints), 1);
}

/// Also from the fuzzer: an eTP=Local frontend's external clients pick
/// from its local endpoints only; an affinity record naming one of its
/// cluster-wide endpoints is none of theirs (here a record left by the
/// frontend that had the service id before).
#[test]
fn an_external_clients_affinity_stays_within_the_local_endpoints() {
    let mut dp = setup();
    let before = Frontend::tcp(sa(VIP, 80));
    let pinned_remote = BackendSlots {
        ready: vec![REMOTE_ID],
        affinity_seconds: Some(10_800),
        ..BackendSlots::default()
    };
    dp.set_service(&before, 20, &pinned_remote).unwrap();
    let out = forward(&dp, &tcp_syn(STRANGER, 46000, VIP, 80));
    assert_eq!(addr_port(&out).1 .0, REMOTE_BACKEND);
    dp.remove_service(&before).unwrap();
    // Service id 20 now an eTP=Local NodePort: local LOCAL_ID, cluster-wide
    // REMOTE_ID (for pods and the node).
    let node_port = Frontend::tcp(sa(NODE, NODE_PORT));
    let slots = BackendSlots {
        affinity_seconds: Some(10_800),
        ..etp_local(&[LOCAL_ID], &[REMOTE_ID])
    };
    dp.set_service(&node_port, 20, &slots).unwrap();
    for port in 46001..46010 {
        let out = forward(&dp, &tcp_syn(STRANGER, port, NODE, NODE_PORT));
        assert_eq!(addr_port(&out).1 .0, LOCAL_BACKEND, "port {port}");
    }
}

#[test]
fn session_affinity_expires_after_its_timeout() {
    let mut dp = setup();
    affinity_service(&mut dp, &[LOCAL_ID, REMOTE_ID], 1);
    forward(&dp, &tcp_syn(POD_CLIENT, 44000, VIP, 80));
    forward(&dp, &tcp_syn(POD_CLIENT, 44001, VIP, 80));
    // The timeout is the event waited for: 1 s since the last new flow.
    std::thread::sleep(std::time::Duration::from_millis(1_200));
    forward(&dp, &tcp_syn(POD_CLIENT, 44002, VIP, 80));
    let c = dp.counters().unwrap();
    assert_eq!(c.packets(Hook::TcIngress, Reason::NewFlowAffinity), 1);
    assert_eq!(
        c.packets(Hook::TcIngress, Reason::NewFlow),
        2,
        "after the timeout the backend is picked afresh"
    );
}

/// A node namespace for the XDP tests: eth0 (172.18.0.2/16) towards the
/// node network, where 172.18.0.3 (the other node, owner of 10.244.2.0/24)
/// and the gateway 172.18.0.1 (to 192.168.0.0/16) have fixed neighbour
/// entries, and veth00000001 (kindnet-style) towards a local pod (10.244.1.0/24).
struct XdpNode {
    topo: Topology,
}

const NODE2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 3];
const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 4];
const ETH0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

impl XdpNode {
    fn new() -> Self {
        let mut topo = Topology::new().unwrap();
        topo.add_ns("node").unwrap();
        topo.add_ns("net").unwrap();
        topo.add_ns("pod").unwrap();
        topo.veth("node", "eth0", "net", "eth0").unwrap();
        topo.veth("node", "veth00000001", "pod", "eth0").unwrap();
        let node = topo.ns("node");
        node.ip(&["link", "set", "eth0", "address", "02:00:00:00:00:02"])
            .unwrap();
        node.add_addr("eth0", "172.18.0.2/16").unwrap();
        for (key, value) in e2e::KIND_NODE_SYSCTLS {
            node.sysctl(key, value).unwrap();
        }
        for (ip, mac) in [
            ("172.18.0.3", "02:00:00:00:00:03"),
            ("172.18.0.1", "02:00:00:00:00:04"),
        ] {
            node.ip(&[
                "neigh",
                "replace",
                ip,
                "lladdr",
                mac,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ])
            .unwrap();
        }
        node.add_route("10.244.2.0/24", "172.18.0.3").unwrap();
        node.add_route("192.168.0.0/16", "172.18.0.1").unwrap();
        node.ip(&["route", "add", "10.244.1.0/24", "dev", "veth00000001"])
            .unwrap();
        XdpNode { topo }
    }

    fn run(&self, dp: &Datapath, frame: &[u8]) -> (u32, Vec<u8>) {
        run_xdp_on(dp, self.topo.ns("node"), "eth0", frame)
    }

    /// Runs at XDP and checks the frame was sent back out (XDP_TX) with
    /// valid checksums.
    fn tx(&self, dp: &Datapath, frame: &[u8]) -> Vec<u8> {
        let (ret, out) = self.run(dp, frame);
        assert_eq!(ret, XDP_TX, "served by XDP");
        let v = Ipv4View::new(&out);
        assert!(v.ip_checksum_ok(), "IP checksum");
        assert!(v.l4_checksum_ok(), "L4 checksum");
        assert_eq!(v.src_mac(), ETH0_MAC);
        out
    }
}

#[test]
fn xdp_serves_a_node_port_flow_to_a_remote_backend_and_its_replies() {
    let node = XdpNode::new();
    let mut dp = setup();
    dp.set_service(
        &Frontend::tcp(sa(NODE, NODE_PORT)),
        10,
        &external(&[REMOTE_ID]),
    )
    .unwrap();
    let out = node.tx(&dp, &tcp_syn(OUTSIDE, 40000, NODE, NODE_PORT));
    assert_eq!(addr_port(&out), ((NODE, 40000), (REMOTE_BACKEND, 8080)));
    assert_eq!(
        Ipv4View::new(&out).dst_mac(),
        NODE2_MAC,
        "to the other node"
    );
    assert!(ct_get(&dp, &ct_key(OUTSIDE, 40000, NODE, NODE_PORT, 6)).is_some());

    let data = tcp(
        OUTSIDE,
        40000,
        NODE,
        NODE_PORT,
        TCP_ACK | TCP_PSH,
        1001,
        5001,
        b"GET /",
    );
    let out = node.tx(&dp, &data);
    assert_eq!(addr_port(&out), ((NODE, 40000), (REMOTE_BACKEND, 8080)));
    assert_eq!(Ipv4View::new(&out).payload(), b"GET /");

    let reply = tcp(
        REMOTE_BACKEND,
        8080,
        NODE,
        40000,
        TCP_ACK | TCP_PSH,
        5001,
        1006,
        b"200 OK",
    );
    let back = node.tx(&dp, &reply);
    assert_eq!(addr_port(&back), ((NODE, NODE_PORT), (OUTSIDE, 40000)));
    assert_eq!(Ipv4View::new(&back).dst_mac(), GATEWAY_MAC);
    let c = dp.counters().unwrap();
    assert_eq!(c.packets(Hook::Xdp, Reason::NewFlow), 1);
    assert_eq!(c.packets(Hook::Xdp, Reason::Established), 1);
    assert_eq!(c.packets(Hook::Xdp, Reason::ReplyReverseNat), 1);
    assert_eq!(
        c.packets(Hook::TcIngress, Reason::NewFlow),
        0,
        "tc saw nothing"
    );
}

#[test]
fn xdp_udp_keeps_a_zero_checksum_and_fixes_others() {
    let node = XdpNode::new();
    let mut dp = setup();
    dp.set_service(
        &Frontend::udp(sa(NODE, NODE_PORT)),
        10,
        &external(&[REMOTE_ID + 100]),
    )
    .unwrap();
    let out = node.tx(&dp, &udp(OUTSIDE, 5000, NODE, NODE_PORT, b"q"));
    assert_ne!(Ipv4View::new(&out).udp_checksum(), 0);
    let out = node.tx(&dp, &udp_no_checksum(OUTSIDE, 5001, NODE, NODE_PORT, b"q"));
    assert_eq!(Ipv4View::new(&out).udp_checksum(), 0);
    assert_eq!(addr_port(&out), ((NODE, 5001), (REMOTE_BACKEND, 8080)));
}

#[test]
fn xdp_tracks_a_flow_to_a_local_backend_before_leaving_it_to_tc() {
    let node = XdpNode::new();
    let mut dp = setup();
    dp.set_service(
        &Frontend::tcp(sa(NODE, NODE_PORT)),
        10,
        &external(&[LOCAL_ID]),
    )
    .unwrap();
    let syn = tcp_syn(OUTSIDE, 40020, NODE, NODE_PORT);
    let (ret, out) = node.run(&dp, &syn);
    assert_eq!((ret, &out), (XDP_PASS, &syn), "passed untouched");
    assert_eq!(dp.ct_entries().unwrap().len(), 2, "tracked, both ways");
    let out = forward(&dp, &syn);
    assert_eq!(addr_port(&out), ((NODE, 40020), (LOCAL_BACKEND, 8080)));
    let c = dp.counters().unwrap();
    assert_eq!(c.packets(Hook::Xdp, Reason::NewFlow), 1, "decided in XDP");
    assert_eq!(c.packets(Hook::Xdp, Reason::XdpPassToTc), 0);
    assert_eq!(c.packets(Hook::TcIngress, Reason::Established), 1);
    assert_eq!(c.packets(Hook::TcIngress, Reason::NewFlow), 0);
}

#[test]
fn a_flow_xdp_passes_keeps_the_backend_xdp_chose() {
    // One local and one remote backend: XDP sends remote flows itself and
    // passes local ones. If tc chose again, half of those would go remote
    // and the remote backend would get 3/4 of the flows.
    let node = XdpNode::new();
    let mut dp = setup();
    dp.set_service(
        &Frontend::tcp(sa(NODE, NODE_PORT)),
        10,
        &external(&[LOCAL_ID, REMOTE_ID]),
    )
    .unwrap();
    let mut passed = 0;
    for port in 41000..41040 {
        let syn = tcp_syn(OUTSIDE, port, NODE, NODE_PORT);
        let (ret, out) = node.run(&dp, &syn);
        if ret == XDP_PASS {
            passed += 1;
            let out = forward(&dp, &syn);
            assert_eq!(addr_port(&out).1, (LOCAL_BACKEND, 8080), "port {port}");
        } else {
            assert_eq!(addr_port(&out).1, (REMOTE_BACKEND, 8080), "port {port}");
        }
    }
    assert!(
        (1..40).contains(&passed),
        "both backends chosen: {passed} of 40 local"
    );
}

#[test]
fn xdp_continues_a_flow_tc_started_with_the_same_backend() {
    let node = XdpNode::new();
    let mut dp = setup();
    dp.set_service(
        &Frontend::tcp(sa(NODE, NODE_PORT)),
        10,
        &external(&[REMOTE_ID, REMOTE2_ID]),
    )
    .unwrap();
    let first = forward(&dp, &tcp_syn(OUTSIDE, 40030, NODE, NODE_PORT));
    let backend = addr_port(&first).1;
    for seq in 0..10 {
        let pkt = tcp(
            OUTSIDE,
            40030,
            NODE,
            NODE_PORT,
            TCP_ACK,
            1001 + seq,
            1,
            b"x",
        );
        let out = node.tx(&dp, &pkt);
        assert_eq!(addr_port(&out).1, backend, "one flow, one backend");
    }
}

#[test]
fn xdp_drops_what_policy_drops_and_leaves_rejects_to_tc() {
    let node = XdpNode::new();
    let mut dp = setup();
    lb_with_ranges(&mut dp, &[(Ipv4Addr::new(192, 168, 7, 0), 24)]);
    dp.set_service(
        &Frontend::tcp(sa(NODE, NODE_PORT)),
        11,
        &etp_local(&[], &[REMOTE_ID]),
    )
    .unwrap();
    dp.set_service(&Frontend::tcp(sa(NODE, NODE_PORT + 1)), 12, &external(&[]))
        .unwrap();
    let (ret, _) = node.run(&dp, &tcp_syn(STRANGER, 40040, LB_IP, 443));
    assert_eq!(ret, XDP_DROP, "source range");
    let (ret, _) = node.run(&dp, &tcp_syn(OUTSIDE, 40041, NODE, NODE_PORT));
    assert_eq!(ret, XDP_DROP, "eTP=Local without local endpoints");
    let syn = tcp_syn(OUTSIDE, 40042, NODE, NODE_PORT + 1);
    let (ret, out) = node.run(&dp, &syn);
    assert_eq!((ret, out), (XDP_PASS, syn.clone()), "reject: left to tc");
    let (ret, _) = run(&dp, Hook::TcIngress, &syn);
    assert_eq!(ret, TC_ACT_REDIRECT, "tc answers port unreachable");
    let c = dp.counters().unwrap();
    assert_eq!(c.packets(Hook::Xdp, Reason::SourceRangeDenied), 1);
    assert_eq!(c.packets(Hook::Xdp, Reason::NoLocalEndpoints), 1);
    assert_eq!(c.packets(Hook::Xdp, Reason::XdpPassToTc), 1);
    assert_eq!(c.packets(Hook::TcIngress, Reason::NoEndpoints), 1);
}

const SCTP: u8 = common::proto::IPPROTO_SCTP;

/// SCTP backends (ids 201..203) next to `setup`'s TCP and UDP ones.
fn sctp_backends(dp: &mut Datapath) {
    for (id, ip) in [
        (LOCAL_ID, LOCAL_BACKEND),
        (REMOTE_ID, REMOTE_BACKEND),
        (REMOTE2_ID, REMOTE_BACKEND2),
    ] {
        dp.set_backend(id + 200, sa(ip, 8080), SCTP, false).unwrap();
    }
}

fn sctp_frontend(ip: [u8; 4], port: u16) -> Frontend {
    Frontend {
        addr: sa(ip, port),
        protocol: SCTP,
    }
}

/// Runs at tc ingress and checks the SCTP frame was forwarded with valid IP
/// and CRC32c checksums.
fn forward_sctp(dp: &Datapath, frame: &[u8]) -> Vec<u8> {
    let (ret, out) = run(dp, Hook::TcIngress, frame);
    assert_eq!(ret, TC_ACT_OK, "forwarded");
    let v = Ipv4View::new(&out);
    assert!(v.ip_checksum_ok(), "IP checksum");
    assert!(v.sctp_checksum_ok(), "CRC32c");
    out
}

/// kube-proxy serves SCTP Service ports: a ClusterIP association is DNATed
/// (address and port: the CRC32c, which covers no addresses, changes with
/// the port), tracked by its ports, and its replies reverse-NATed, the
/// CRC32c valid by an independent computation at every length.
#[test]
fn sctp_cluster_ip_associations_are_dnated_tracked_and_reverse_nated() {
    let mut dp = setup();
    sctp_backends(&mut dp);
    dp.set_service(
        &sctp_frontend(VIP, 80),
        20,
        &BackendSlots {
            ready: vec![REMOTE_ID + 200],
            ..BackendSlots::default()
        },
    )
    .unwrap();
    for (i, body_len) in [0usize, 4, 100, 1400].into_iter().enumerate() {
        let sport = 5000 + i as u16;
        let init = sctp_init(POD_CLIENT, sport, VIP, 80, body_len);
        let out = forward_sctp(&dp, &init);
        assert_eq!(
            addr_port(&out),
            ((POD_CLIENT, sport), (REMOTE_BACKEND, 8080))
        );
        assert_eq!(
            Ipv4View::new(&out).l4()[12..],
            init[34 + 12..],
            "chunks untouched"
        );
        let entry = ct_get(&dp, &ct_key(POD_CLIENT, sport, VIP, 80, SCTP)).expect("tracked");
        assert_eq!(entry.backend_id, REMOTE_ID + 200);
        let init_ack = sctp(
            REMOTE_BACKEND,
            8080,
            POD_CLIENT,
            sport,
            0x1234_5678,
            2,
            &[7; 24],
        );
        let back = forward_sctp(&dp, &init_ack);
        assert_eq!(addr_port(&back), ((VIP, 80), (POD_CLIENT, sport)));
    }
    let c = dp.counters().unwrap();
    assert_eq!(c.packets(Hook::TcIngress, Reason::NewFlow), 4);
    assert_eq!(c.packets(Hook::TcIngress, Reason::ReplyReverseNat), 4);
}

/// A NodePort association from outside to a remote backend: DNAT and
/// masquerade at tc, and at XDP on the node device, the CRC32c valid.
#[test]
fn sctp_node_ports_are_masqueraded_at_tc_and_served_at_xdp() {
    let mut dp = setup();
    sctp_backends(&mut dp);
    dp.set_service(
        &sctp_frontend(NODE, NODE_PORT),
        21,
        &external(&[REMOTE_ID + 200]),
    )
    .unwrap();
    let out = forward_sctp(&dp, &sctp_init(OUTSIDE, 6000, NODE, NODE_PORT, 32));
    let ((src, _), dst) = addr_port(&out);
    assert_eq!((src, dst), (NODE, (REMOTE_BACKEND, 8080)), "masqueraded");

    let node = XdpNode::new();
    let (ret, out) = node.run(&dp, &sctp_init(OUTSIDE, 6001, NODE, NODE_PORT, 64));
    assert_eq!(ret, XDP_TX, "served by XDP");
    let v = Ipv4View::new(&out);
    assert!(v.ip_checksum_ok() && v.sctp_checksum_ok());
    assert_eq!((v.dst(), v.dport()), (REMOTE_BACKEND, 8080));
    assert_eq!(v.src(), NODE);
    let c = dp.counters().unwrap();
    assert_eq!(c.packets(Hook::Xdp, Reason::NewFlow), 1);
}

/// No endpoints: ICMP port unreachable back, as for UDP (kube-proxy's
/// REJECT).
#[test]
fn an_sctp_service_without_endpoints_rejects() {
    let mut dp = setup();
    dp.set_service(&sctp_frontend(VIP, 80), 22, &BackendSlots::default())
        .unwrap();
    let (ret, out) = run(
        &dp,
        Hook::TcIngress,
        &sctp_init(POD_CLIENT, 5100, VIP, 80, 0),
    );
    assert_eq!(ret, TC_ACT_REDIRECT, "ICMP port unreachable back");
    let v = Ipv4View::new(&out);
    assert_eq!((v.src(), v.dst(), v.protocol()), (VIP, POD_CLIENT, 1));
    assert_eq!((v.l4()[0], v.l4()[1]), (3, 3));
    assert!(v.icmp_checksum_ok());
    assert_eq!(
        dp.counters()
            .unwrap()
            .packets(Hook::TcIngress, Reason::NoEndpoints),
        1
    );
}
