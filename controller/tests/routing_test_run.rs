//! BPF_PROG_TEST_RUN tests of where tc sends the packets it translates
//! (`dataplane-ebpf/src/fib.rs`), in a node namespace with kind's sysctls,
//! real routes and neighbours: at ingress the program redirects them itself,
//! so that strict reverse-path filtering and `accept_local = 0` never see a
//! service address arriving from a pod's veth or the node's own address
//! arriving from outside.
//!
//! The node: eth0 (172.18.0.2/16, default route via 172.18.0.1, the other
//! node 172.18.0.3 owning 10.244.2.0/24), and two pods behind kindnet-style
//! veths: the client 10.244.1.5 and the backend 10.244.1.7, each with a /32
//! route; the backend's neighbour entry is known, the client's too.

mod support;

use common::{trace::TRACE_MATCH_ADDR, Hook, Reason, TraceSession};
use dp::{BackendSlots, Datapath, Frontend, ServiceMaps};
use e2e::{Netns, Topology, KIND_NODE_SYSCTLS};
use support::*;

const OUTSIDE: [u8; 4] = [192, 168, 7, 50];
const POD_CLIENT: [u8; 4] = [10, 244, 1, 5];
const LOCAL_BACKEND: [u8; 4] = [10, 244, 1, 7];
const REMOTE_BACKEND: [u8; 4] = [10, 244, 2, 7];
const VIP: [u8; 4] = [10, 96, 0, 10];
const NODE_PORT: u16 = 30080;

const ETH0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];
const NODE2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 3];
const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 4];
const CLIENT_POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 5];
const BACKEND_POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 7];
const CLIENT_VETH_MAC: [u8; 6] = [0x02, 0, 0, 0, 2, 5];
const BACKEND_VETH_MAC: [u8; 6] = [0x02, 0, 0, 0, 2, 7];
const CLIENT_VETH: &str = "veth00000005";
const BACKEND_VETH: &str = "veth00000007";

struct Node {
    topo: Topology,
    dp: Datapath,
}

impl Node {
    /// The node namespace and a datapath whose tc programs are attached to
    /// eth0 and both veths there (so `DP_DEVICES` knows their MACs), with a
    /// ClusterIP and a NodePort (eTP=Cluster) served by `backends`.
    fn new(backends: &[(u32, [u8; 4])]) -> Node {
        let mut topo = Topology::new().unwrap();
        topo.add_ns("node").unwrap();
        let node = topo.ns("node");
        for (key, value) in KIND_NODE_SYSCTLS {
            node.sysctl(key, value).unwrap();
        }
        for role in ["net", "client", "backend"] {
            topo.add_ns(role).unwrap();
        }
        topo.veth("node", "eth0", "net", "eth0").unwrap();
        topo.veth("node", CLIENT_VETH, "client", "eth0").unwrap();
        topo.veth("node", BACKEND_VETH, "backend", "eth0").unwrap();
        let node = topo.ns("node");
        set_mac(node, "eth0", ETH0_MAC);
        set_mac(node, CLIENT_VETH, CLIENT_VETH_MAC);
        set_mac(node, BACKEND_VETH, BACKEND_VETH_MAC);
        node.add_addr("eth0", "172.18.0.2/16").unwrap();
        for dev in [CLIENT_VETH, BACKEND_VETH] {
            node.add_addr(dev, "10.244.1.1/32").unwrap();
        }
        for (ip, mac, dev) in [
            ("172.18.0.3", NODE2_MAC, "eth0"),
            ("172.18.0.1", GATEWAY_MAC, "eth0"),
            ("10.244.1.5", CLIENT_POD_MAC, CLIENT_VETH),
            ("10.244.1.7", BACKEND_POD_MAC, BACKEND_VETH),
        ] {
            node.ip(&[
                "neigh",
                "replace",
                ip,
                "lladdr",
                &mac_str(mac),
                "dev",
                dev,
                "nud",
                "permanent",
            ])
            .unwrap();
        }
        node.ip(&["route", "add", "default", "via", "172.18.0.1"])
            .unwrap();
        node.add_route("10.244.2.0/24", "172.18.0.3").unwrap();
        node.ip(&["route", "add", "10.244.1.5/32", "dev", CLIENT_VETH])
            .unwrap();
        node.ip(&["route", "add", "10.244.1.7/32", "dev", BACKEND_VETH])
            .unwrap();

        let mut dp = load_node();
        for (id, ip) in backends {
            dp.set_backend(*id, sa(*ip, 8080), 6, false).unwrap();
        }
        let ids: Vec<u32> = backends.iter().map(|b| b.0).collect();
        let cluster = BackendSlots {
            ready: ids.clone(),
            ..BackendSlots::default()
        };
        dp.set_service(&Frontend::tcp(sa(VIP, 80)), 10, &cluster)
            .unwrap();
        let external = BackendSlots {
            ready: ids,
            external: true,
            ..BackendSlots::default()
        };
        dp.set_service(&Frontend::tcp(sa(NODE, NODE_PORT)), 11, &external)
            .unwrap();
        node.run(|| {
            for dev in ["eth0", CLIENT_VETH, BACKEND_VETH] {
                dp.attach_tc(dev, Hook::TcIngress).unwrap();
                dp.attach_tc(dev, Hook::TcEgress).unwrap();
            }
        })
        .unwrap();
        Node { topo, dp }
    }

    fn ns(&self) -> &Netns {
        self.topo.ns("node")
    }

    /// Runs `frame` at `hook` of `dev`; checks the checksums of what comes out.
    fn run(&self, hook: Hook, dev: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        let (ret, out) = run_tc_on(&self.dp, hook, self.ns(), dev, frame);
        let v = Ipv4View::new(&out);
        assert!(v.ip_checksum_ok(), "IP checksum");
        assert!(v.l4_checksum_ok(), "L4 checksum");
        (ret, out)
    }

    /// Runs `frame` at tc ingress of `dev` and checks the program sent it on
    /// itself (`TC_ACT_REDIRECT`); the frame as it left.
    fn redirected(&self, dev: &str, frame: &[u8]) -> Vec<u8> {
        let (ret, out) = self.run(Hook::TcIngress, dev, frame);
        assert_eq!(ret, TC_ACT_REDIRECT, "sent on by the program");
        out
    }

    /// A trace session (slot 0) for packets from or to `addr`, and its reader.
    fn trace(&mut self, addr: [u8; 4]) -> dp::kernel::ring::TraceReader {
        let session = TraceSession {
            active: 1,
            match_flags: TRACE_MATCH_ADDR,
            addr: common::addr::v4_mapped(addr),
            ..TraceSession::default()
        };
        self.dp.set_trace_session(0, &session).unwrap();
        self.dp.trace_reader_of(0).unwrap()
    }

    /// The device a traced packet was sent to (`TraceEvent::sent_ifindex`),
    /// by name.
    fn sent_to(&self, ifindex: u32) -> String {
        self.dp
            .interfaces()
            .get(&ifindex)
            .cloned()
            .unwrap_or_else(|| format!("ifindex {ifindex}"))
    }
}

fn set_mac(ns: &Netns, dev: &str, mac: [u8; 6]) {
    ns.ip(&["link", "set", dev, "address", &mac_str(mac)])
        .unwrap();
}

fn mac_str(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn macs(out: &[u8]) -> ([u8; 6], [u8; 6]) {
    let v = Ipv4View::new(out);
    (v.dst_mac(), v.src_mac())
}

/// The backend's answer to a SYN from `dst:dport`.
fn syn_ack(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    tcp(src, sport, dst, dport, TCP_SYN | TCP_ACK, 5000, 1001, b"")
}

fn addr_port(out: &[u8]) -> (([u8; 4], u16), ([u8; 4], u16)) {
    let v = Ipv4View::new(out);
    ((v.src(), v.sport()), (v.dst(), v.dport()))
}

#[test]
fn a_pod_to_a_local_backend_is_sent_to_the_backends_veth_and_the_reply_to_the_clients() {
    let node = Node::new(&[(1, LOCAL_BACKEND)]);
    let out = node.redirected(CLIENT_VETH, &tcp_syn(POD_CLIENT, 40000, VIP, 80));
    assert_eq!(
        addr_port(&out),
        ((POD_CLIENT, 40000), (LOCAL_BACKEND, 8080))
    );
    assert_eq!(macs(&out), (BACKEND_POD_MAC, BACKEND_VETH_MAC));

    // The reply's source becomes the ClusterIP: from the backend's veth the
    // stack's strict reverse-path check would refuse it (the route to
    // 10.96.0.10 is eth0's), so the program sends it to the client's veth.
    let reply = syn_ack(LOCAL_BACKEND, 8080, POD_CLIENT, 40000);
    let back = node.redirected(BACKEND_VETH, &reply);
    assert_eq!(addr_port(&back), ((VIP, 80), (POD_CLIENT, 40000)));
    assert_eq!(macs(&back), (CLIENT_POD_MAC, CLIENT_VETH_MAC));
}

#[test]
fn a_pod_to_a_remote_backend_is_sent_out_of_eth0_to_the_other_node() {
    let node = Node::new(&[(2, REMOTE_BACKEND)]);
    let out = node.redirected(CLIENT_VETH, &tcp_syn(POD_CLIENT, 40001, VIP, 80));
    assert_eq!(addr_port(&out).1, (REMOTE_BACKEND, 8080));
    assert_eq!(macs(&out), (NODE2_MAC, ETH0_MAC));

    // The reply arrives on eth0 and goes to the client's veth.
    let reply = syn_ack(REMOTE_BACKEND, 8080, POD_CLIENT, 40001);
    let back = node.redirected("eth0", &reply);
    assert_eq!(addr_port(&back), ((VIP, 80), (POD_CLIENT, 40001)));
    assert_eq!(macs(&back), (CLIENT_POD_MAC, CLIENT_VETH_MAC));
}

#[test]
fn masqueraded_node_port_traffic_never_reaches_the_stack_with_the_nodes_own_source() {
    let node = Node::new(&[(1, LOCAL_BACKEND)]);
    // From outside to the NodePort, backend on this node: the source becomes
    // 172.18.0.2, which `accept_local = 0` would refuse on eth0.
    let out = node.redirected("eth0", &tcp_syn(OUTSIDE, 40002, NODE, NODE_PORT));
    assert_eq!(addr_port(&out), ((NODE, 40002), (LOCAL_BACKEND, 8080)));
    assert_eq!(macs(&out), (BACKEND_POD_MAC, BACKEND_VETH_MAC));

    // The reply (from 172.18.0.2:30080 once translated) leaves by eth0
    // towards the gateway.
    let reply = syn_ack(LOCAL_BACKEND, 8080, NODE, 40002);
    let back = node.redirected(BACKEND_VETH, &reply);
    assert_eq!(addr_port(&back), ((NODE, NODE_PORT), (OUTSIDE, 40002)));
    assert_eq!(macs(&back), (GATEWAY_MAC, ETH0_MAC));
}

#[test]
fn a_reply_to_a_host_process_enters_the_host_through_the_device_that_routes_to_the_service() {
    let mut node = Node::new(&[(1, LOCAL_BACKEND)]);
    let mut events = node.trace(LOCAL_BACKEND);
    // A process on the node connects to the ClusterIP: eth0 egress sends it
    // to the backend's veth.
    let (ret, out) = node.run(Hook::TcEgress, "eth0", &tcp_syn(NODE, 40003, VIP, 80));
    assert_eq!(ret, TC_ACT_REDIRECT);
    assert_eq!(addr_port(&out), ((NODE, 40003), (LOCAL_BACKEND, 8080)));

    // The reply, from 10.96.0.10 once translated, is for this host. Strict
    // reverse-path filtering accepts that source only on eth0 (the route to
    // the service CIDR), so it is redirected into eth0's ingress, addressed
    // to eth0's MAC.
    let reply = syn_ack(LOCAL_BACKEND, 8080, NODE, 40003);
    let back = node.redirected(BACKEND_VETH, &reply);
    assert_eq!(addr_port(&back), ((VIP, 80), (NODE, 40003)));
    assert_eq!(Ipv4View::new(&back).dst_mac(), ETH0_MAC);

    let traced = events.drain();
    let reply_event = traced
        .iter()
        .find(|e| e.reason == Reason::ReplyReverseNat as u32)
        .expect("the reply was traced");
    assert_eq!(node.sent_to(reply_event.sent_ifindex), "eth0");
}

#[test]
fn a_packet_left_to_the_stack_is_traced_as_sent_nowhere_after_one_that_was_sent() {
    let mut node = Node::new(&[(1, LOCAL_BACKEND)]);
    let mut events = node.trace(POD_CLIENT);
    // Both runs on CPU 0: the second reuses the first's decision record.
    let _ = node.redirected(CLIENT_VETH, &tcp_syn(POD_CLIENT, 40005, VIP, 80));
    let not_a_service = tcp_syn(POD_CLIENT, 40006, REMOTE_BACKEND, 8080);
    let (ret, _) = node.run(Hook::TcIngress, CLIENT_VETH, &not_a_service);
    assert_eq!(ret, TC_ACT_OK);
    let traced = events.drain();
    assert_eq!(traced.len(), 2, "{traced:?}");
    assert_eq!(node.sent_to(traced[0].sent_ifindex), BACKEND_VETH);
    assert_eq!(traced[1].reason, Reason::NoService as u32);
    assert_eq!(traced[1].sent_ifindex, 0, "left to the stack");
}

#[test]
fn a_host_network_backend_is_reached_without_masquerade_through_the_stack() {
    // A NodePort whose endpoint is this node itself (hostNetwork): local
    // delivery, where kube-proxy's masquerade does not apply, and where the
    // node's own address as source would be a martian.
    let node = Node::new(&[(3, NODE)]);
    let (ret, out) = node.run(
        Hook::TcIngress,
        "eth0",
        &tcp_syn(OUTSIDE, 40004, NODE, NODE_PORT),
    );
    assert_eq!(ret, TC_ACT_OK, "left to the stack: it is for this host");
    assert_eq!(addr_port(&out), ((OUTSIDE, 40004), (NODE, 8080)));
    let c = node.dp.counters().unwrap();
    assert_eq!(c.packets(Hook::TcIngress, Reason::NewFlow), 1);
}
