//! BPF_PROG_TEST_RUN tests of the ClusterIP rules (kube-proxy's semantics) on
//! crafted frames: output bytes, checksums, return codes, conntrack and
//! counters, the generated ICMP errors and TCP resets.

mod support;

use std::net::IpAddr;

use common::{
    addr::v4_mapped,
    ct::{
        CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_FLAG_HAIRPIN, CT_FLAG_SNAT, CT_STATE_ESTABLISHED,
        CT_STATE_NEW,
    },
    CtTimeouts, Hook, Reason, Verdict,
};
use dp::{BackendSlots, Datapath, Frontend, MapSizes, ServiceMaps};
use support::*;

const CLIENT: [u8; 4] = [10, 244, 1, 5];
const OUTSIDE: [u8; 4] = [192, 168, 7, 50];
const VIP: [u8; 4] = [10, 96, 0, 10];
const B1: [u8; 4] = [10, 244, 2, 7];
const B2: [u8; 4] = [10, 244, 2, 8];
const B3: [u8; 4] = [10, 244, 3, 9];
const SERVICE_ID: u32 = 10;

/// A datapath with node 172.18.0.2, cluster CIDR 10.244.0.0/16 and one TCP
/// and one UDP frontend on 10.96.0.10:80 with the given backends (port 8080).
fn setup(ready: &[(u32, [u8; 4])], terminating: &[(u32, [u8; 4])]) -> Datapath {
    let mut dp = load_node();
    set_backends(&mut dp, ready, terminating);
    dp
}

fn set_backends(dp: &mut Datapath, ready: &[(u32, [u8; 4])], terminating: &[(u32, [u8; 4])]) {
    for (id, ip) in ready {
        dp.set_backend(*id, sa(*ip, 8080), 6, false).unwrap();
    }
    for (id, ip) in terminating {
        dp.set_backend(*id, sa(*ip, 8080), 6, true).unwrap();
    }
    let slots = BackendSlots {
        ready: ready.iter().map(|b| b.0).collect(),
        terminating: terminating.iter().map(|b| b.0).collect(),
        local_only: false,
        ..BackendSlots::default()
    };
    dp.set_service(&Frontend::tcp(sa(VIP, 80)), SERVICE_ID, &slots)
        .unwrap();
    dp.set_service(&Frontend::udp(sa(VIP, 80)), SERVICE_ID + 1, &slots)
        .unwrap();
}

#[test]
fn a_new_tcp_flow_is_dnated_to_its_backend_and_tracked() {
    let dp = setup(&[(1, B1)], &[]);
    let out = forward(&dp, &tcp_syn(CLIENT, 40000, VIP, 80));
    let v = Ipv4View::new(&out);
    assert_eq!((v.src(), v.sport()), (CLIENT, 40000), "pod source kept");
    assert_eq!((v.dst(), v.dport()), (B1, 8080));
    assert_eq!(v.tcp_flags(), TCP_SYN);
    assert_eq!(
        dp.counters()
            .unwrap()
            .packets(Hook::TcIngress, Reason::NewFlow),
        1
    );

    let orig = ct_get(&dp, &ct_key(CLIENT, 40000, VIP, 80, 6)).expect("original entry");
    assert_eq!(orig.direction, CT_DIR_ORIGINAL);
    assert_eq!((orig.backend_id, orig.service_id), (1, SERVICE_ID));
    assert_eq!((orig.state, orig.flags), (CT_STATE_NEW, 0));
    let reply = ct_get(&dp, &ct_key(B1, 8080, CLIENT, 40000, 6)).expect("reply entry");
    assert_eq!(reply.direction, CT_DIR_REPLY);
    let now = dp::kernel::maps::monotonic_ns();
    let syn_timeout = u64::from(CtTimeouts::DEFAULT.tcp_syn) * 1_000_000_000;
    assert!(orig.expires_ns > now && orig.expires_ns <= now + syn_timeout);
    assert_eq!(dp.ct_entries().unwrap().len(), 2);
}

#[test]
fn a_flow_keeps_its_backend_and_replies_come_from_the_service_address() {
    let dp = setup(&[(1, B1), (2, B2), (3, B3)], &[]);
    let first = forward(&dp, &tcp_syn(CLIENT, 40001, VIP, 80));
    let backend = Ipv4View::new(&first).dst();
    for i in 0..20 {
        let pkt = tcp(
            CLIENT,
            40001,
            VIP,
            80,
            TCP_ACK | TCP_PSH,
            1001 + i,
            5001,
            b"GET /",
        );
        let out = forward(&dp, &pkt);
        let v = Ipv4View::new(&out);
        assert_eq!((v.dst(), v.dport()), (backend, 8080), "same backend");
        assert_eq!(v.payload(), b"GET /");
    }
    let c = dp.counters().unwrap();
    assert_eq!(c.packets(Hook::TcIngress, Reason::Established), 20);

    let syn_ack = tcp(
        backend,
        8080,
        CLIENT,
        40001,
        TCP_SYN | TCP_ACK,
        5000,
        1001,
        &[],
    );
    let out = forward(&dp, &syn_ack);
    let v = Ipv4View::new(&out);
    assert_eq!((v.src(), v.sport()), (VIP, 80), "reverse NAT");
    assert_eq!((v.dst(), v.dport()), (CLIENT, 40001));
    assert_eq!(
        dp.counters()
            .unwrap()
            .packets(Hook::TcIngress, Reason::ReplyReverseNat),
        1
    );
    // The reply moved both directions to established (long timeout).
    let now = dp::kernel::maps::monotonic_ns();
    for key in [
        ct_key(CLIENT, 40001, VIP, 80, 6),
        ct_key(backend, 8080, CLIENT, 40001, 6),
    ] {
        let e = ct_get(&dp, &key).unwrap();
        assert_eq!(e.state, CT_STATE_ESTABLISHED, "{key:?}");
        assert!(e.expires_ns > now + 3600 * 1_000_000_000);
    }
}

#[test]
fn udp_checksums_stay_valid_and_a_zero_checksum_stays_zero() {
    let dp = setup(&[(1, B1)], &[]);
    let out = forward(&dp, &udp(CLIENT, 5000, VIP, 80, b"query"));
    let v = Ipv4View::new(&out);
    assert_eq!((v.dst(), v.dport()), (B1, 8080));
    assert_ne!(v.udp_checksum(), 0);

    let out = forward(&dp, &udp_no_checksum(CLIENT, 5001, VIP, 80, b"query"));
    let v = Ipv4View::new(&out);
    assert_eq!((v.dst(), v.dport()), (B1, 8080));
    assert_eq!(v.udp_checksum(), 0, "no checksum stays no checksum");

    let reply = forward(&dp, &udp(B1, 8080, CLIENT, 5000, b"answer"));
    let v = Ipv4View::new(&reply);
    assert_eq!((v.src(), v.sport()), (VIP, 80));
    assert_eq!(v.payload(), b"answer");
}

/// Checks an ICMP port unreachable answering `request`, redirected back.
fn assert_port_unreachable(ret: u32, out: &[u8], request: &[u8]) {
    assert_eq!(ret, TC_ACT_REDIRECT, "sent back to the client");
    let v = Ipv4View::new(out);
    assert_eq!(v.dst_mac(), CLIENT_MAC);
    assert_eq!(v.src_mac(), SERVER_MAC);
    assert_eq!((v.src(), v.dst(), v.protocol()), (VIP, CLIENT, 1));
    assert!(v.ip_checksum_ok());
    let icmp = v.l4();
    assert_eq!((icmp[0], icmp[1]), (3, 3), "destination / port unreachable");
    assert!(v.icmp_checksum_ok(), "ICMP checksum");
    assert_eq!(
        &icmp[8..],
        &request[14..14 + 28],
        "original IP header + 8 bytes"
    );
}

#[test]
fn a_service_without_endpoints_answers_port_unreachable() {
    let dp = setup(&[], &[]);
    for request in [
        tcp_syn(CLIENT, 40002, VIP, 80),
        udp(CLIENT, 5002, VIP, 80, b"q"),
    ] {
        let (ret, out) = run(&dp, Hook::TcIngress, &request);
        assert_port_unreachable(ret, &out, &request);
    }
    let c = dp.counters().unwrap();
    assert_eq!(c.packets(Hook::TcIngress, Reason::NoEndpoints), 2);
    assert!(dp.ct_entries().unwrap().is_empty(), "nothing tracked");
}

#[test]
fn a_port_the_service_does_not_serve_is_rejected() {
    let dp = setup(&[(1, B1)], &[]);
    let request = tcp_syn(CLIENT, 40003, VIP, 81);
    let (ret, out) = run(&dp, Hook::TcIngress, &request);
    assert_port_unreachable(ret, &out, &request);
    let c = dp.counters().unwrap();
    assert_eq!(c.packets(Hook::TcIngress, Reason::PortNotServed), 1);
    // Another address is not a service: passed through untouched.
    let other = tcp_syn(CLIENT, 40003, [10, 96, 0, 11], 81);
    assert_eq!(
        run(&dp, Hook::TcIngress, &other),
        (TC_ACT_OK, other.clone())
    );
    assert_eq!(
        dp.counters()
            .unwrap()
            .packets(Hook::TcIngress, Reason::NoService),
        1
    );
}

#[test]
fn traffic_from_outside_the_cluster_cidr_is_masqueraded() {
    let dp = setup(&[(1, B1)], &[]);
    let out = forward(&dp, &tcp_syn(OUTSIDE, 40004, VIP, 80));
    let v = Ipv4View::new(&out);
    assert_eq!((v.src(), v.sport()), (NODE, 40004), "SNAT to the node");
    assert_eq!((v.dst(), v.dport()), (B1, 8080));
    let e = ct_get(&dp, &ct_key(OUTSIDE, 40004, VIP, 80, 6)).unwrap();
    assert_eq!(e.flags, CT_FLAG_SNAT);

    let reply = forward(
        &dp,
        &tcp(B1, 8080, NODE, 40004, TCP_SYN | TCP_ACK, 7, 1001, &[]),
    );
    let v = Ipv4View::new(&reply);
    assert_eq!((v.src(), v.sport()), (VIP, 80));
    assert_eq!(
        (v.dst(), v.dport()),
        (OUTSIDE, 40004),
        "back to the real client"
    );
}

#[test]
fn masquerade_all_also_masquerades_pods() {
    let mut dp = setup(&[(1, B1)], &[]);
    dp.set_node(IpAddr::from(NODE), None, true).unwrap();
    let out = forward(&dp, &tcp_syn(CLIENT, 40005, VIP, 80));
    assert_eq!(Ipv4View::new(&out).src(), NODE);
    // Without it (and without a cluster CIDR) nothing is masqueraded.
    dp.set_node(IpAddr::from(NODE), None, false).unwrap();
    let out = forward(&dp, &tcp_syn(OUTSIDE, 40006, VIP, 80));
    assert_eq!(Ipv4View::new(&out).src(), OUTSIDE);
}

#[test]
fn hairpin_traffic_is_masqueraded() {
    let dp = setup(&[(1, B1)], &[]);
    let out = forward(&dp, &tcp_syn(B1, 40007, VIP, 80));
    let v = Ipv4View::new(&out);
    assert_eq!(
        (v.src(), v.dst()),
        (NODE, B1),
        "the pod reaches itself via the node"
    );
    let e = ct_get(&dp, &ct_key(B1, 40007, VIP, 80, 6)).unwrap();
    assert_eq!(e.flags, CT_FLAG_SNAT | CT_FLAG_HAIRPIN);
    let reply = forward(
        &dp,
        &tcp(B1, 8080, NODE, 40007, TCP_SYN | TCP_ACK, 7, 1001, &[]),
    );
    let v = Ipv4View::new(&reply);
    assert_eq!(
        (v.src(), v.sport(), v.dst(), v.dport()),
        (VIP, 80, B1, 40007)
    );
}

#[test]
fn a_masquerade_port_collision_picks_another_port() {
    let dp = setup(&[(1, B1)], &[]);
    let a = forward(&dp, &tcp_syn(OUTSIDE, 40008, VIP, 80));
    let b = forward(&dp, &tcp_syn([192, 168, 7, 51], 40008, VIP, 80));
    let (pa, pb) = (Ipv4View::new(&a).sport(), Ipv4View::new(&b).sport());
    assert_eq!(pa, 40008);
    assert_ne!(pb, 40008, "the node's port 40008 to B1:8080 is taken");
    assert!((32768..61000).contains(&pb));
    let reply = forward(
        &dp,
        &tcp(B1, 8080, NODE, pb, TCP_SYN | TCP_ACK, 7, 1001, &[]),
    );
    let v = Ipv4View::new(&reply);
    assert_eq!((v.dst(), v.dport()), ([192, 168, 7, 51], 40008));
}

#[test]
fn a_reset_flow_gives_up_its_masquerade_port_once_quiet() {
    let dp = setup(&[(1, B1)], &[]);
    let a = forward(&dp, &tcp_syn(OUTSIDE, 40030, VIP, 80));
    assert_eq!(Ipv4View::new(&a).sport(), 40030);
    forward(
        &dp,
        &tcp(OUTSIDE, 40030, VIP, 80, TCP_RST | TCP_ACK, 2, 1, &[]),
    );
    let e = ct_get(&dp, &ct_key(OUTSIDE, 40030, VIP, 80, 6)).unwrap();
    assert_eq!(e.state, common::ct::CT_STATE_CLOSED);
    let b = forward(&dp, &tcp_syn([192, 168, 7, 52], 40030, VIP, 80));
    assert_ne!(
        Ipv4View::new(&b).sport(),
        40030,
        "a flow reset a moment ago keeps its port"
    );
    // The rule is about time since the reset's last packet; no event marks it.
    std::thread::sleep(std::time::Duration::from_millis(1_100));
    let c = forward(&dp, &tcp_syn([192, 168, 7, 53], 40030, VIP, 80));
    assert_eq!(
        Ipv4View::new(&c).sport(),
        40030,
        "quiet for a second: the reset flow's port goes to the new one"
    );
    let reply = forward(
        &dp,
        &tcp(B1, 8080, NODE, 40030, TCP_SYN | TCP_ACK, 7, 1001, &[]),
    );
    let v = Ipv4View::new(&reply);
    assert_eq!((v.dst(), v.dport()), ([192, 168, 7, 53], 40030));
}

#[test]
fn new_flows_are_spread_over_all_backends() {
    let dp = setup(&[(1, B1), (2, B2), (3, B3)], &[]);
    let mut hits = std::collections::BTreeMap::new();
    for port in 0..300u16 {
        let out = forward(&dp, &tcp_syn(CLIENT, 20000 + port, VIP, 80));
        *hits.entry(Ipv4View::new(&out).dst()).or_insert(0) += 1;
    }
    assert_eq!(hits.len(), 3, "{hits:?}");
    assert!(hits.values().all(|n| *n >= 50), "roughly uniform: {hits:?}");
}

#[test]
fn terminating_backends_keep_their_flows_and_get_new_ones_only_as_a_fallback() {
    let mut dp = setup(&[(1, B1), (2, B2)], &[]);
    // A flow that lands on B2 while it is ready.
    let mut on_b2 = None;
    for port in 30000..30100u16 {
        let out = forward(&dp, &udp(CLIENT, port, VIP, 80, b"x"));
        if Ipv4View::new(&out).dst() == B2 {
            on_b2 = Some(port);
            break;
        }
    }
    let on_b2 = on_b2.expect("some flow picked B2");
    // B2 starts terminating (still serving).
    set_backends(&mut dp, &[(1, B1)], &[(2, B2)]);
    for port in 31000..31050u16 {
        let out = forward(&dp, &udp(CLIENT, port, VIP, 80, b"x"));
        assert_eq!(
            Ipv4View::new(&out).dst(),
            B1,
            "new flows avoid the terminating backend"
        );
    }
    let out = forward(&dp, &udp(CLIENT, on_b2, VIP, 80, b"y"));
    assert_eq!(Ipv4View::new(&out).dst(), B2, "its existing flow continues");
    // No ready backend left: the serving-terminating one takes new flows.
    set_backends(&mut dp, &[], &[(2, B2)]);
    let out = forward(&dp, &udp(CLIENT, 32000, VIP, 80, b"z"));
    assert_eq!(Ipv4View::new(&out).dst(), B2);
}

#[test]
fn a_udp_flow_moves_to_a_live_backend_when_its_backend_is_removed() {
    let mut dp = setup(&[(1, B1)], &[]);
    forward(&dp, &udp(CLIENT, 5353, VIP, 80, b"q1"));
    set_backends(&mut dp, &[(2, B2)], &[]);
    dp.remove_backend(1).unwrap();
    let out = forward(&dp, &udp(CLIENT, 5353, VIP, 80, b"q2"));
    assert_eq!(Ipv4View::new(&out).dst(), B2, "moved, no stale conntrack");
    let c = dp.counters().unwrap();
    assert_eq!(c.packets(Hook::TcIngress, Reason::BackendGoneRepicked), 1);
    let reply = forward(&dp, &udp(B2, 8080, CLIENT, 5353, b"a2"));
    assert_eq!(
        Ipv4View::new(&reply).src(),
        VIP,
        "the new backend's reply is reverse-NATed"
    );
    let out = forward(&dp, &udp(CLIENT, 5353, VIP, 80, b"q3"));
    assert_eq!(Ipv4View::new(&out).dst(), B2);
    assert_eq!(
        dp.counters()
            .unwrap()
            .packets(Hook::TcIngress, Reason::Established),
        1
    );
}

#[test]
fn a_tcp_flow_to_a_removed_backend_is_reset() {
    let mut dp = setup(&[(1, B1)], &[]);
    forward(&dp, &tcp_syn(CLIENT, 40009, VIP, 80));
    forward(
        &dp,
        &tcp(B1, 8080, CLIENT, 40009, TCP_SYN | TCP_ACK, 4999, 1001, &[]),
    );
    set_backends(&mut dp, &[(2, B2)], &[]);
    dp.remove_backend(1).unwrap();
    let request = tcp(
        CLIENT,
        40009,
        VIP,
        80,
        TCP_ACK | TCP_PSH,
        1001,
        5000,
        b"0123456789",
    );
    let (ret, out) = run(&dp, Hook::TcIngress, &request);
    assert_eq!(ret, TC_ACT_REDIRECT, "sent back to the client");
    let v = Ipv4View::new(&out);
    assert_eq!((v.dst_mac(), v.src_mac()), (CLIENT_MAC, SERVER_MAC));
    assert_eq!((v.src(), v.sport()), (VIP, 80));
    assert_eq!((v.dst(), v.dport()), (CLIENT, 40009));
    assert_eq!(v.tcp_flags(), TCP_RST);
    assert_eq!(v.tcp_seq(), 5000, "RFC 793: seq = the segment's ack");
    assert!(v.payload().is_empty());
    assert!(v.ip_checksum_ok(), "IP checksum: {out:?}");
    assert!(v.l4_checksum_ok(), "TCP checksum: {out:?}");
    assert_eq!(
        dp.counters()
            .unwrap()
            .packets(Hook::TcIngress, Reason::BackendGoneReset),
        1
    );
    assert!(ct_get(&dp, &ct_key(CLIENT, 40009, VIP, 80, 6)).is_none());
}

#[test]
fn a_retired_backend_gets_its_clients_reset_and_nothing_else() {
    let mut dp = setup(&[(1, B1)], &[]);
    dp.retire_removed_backends(true);
    for port in [40031, 40032] {
        forward(&dp, &tcp_syn(CLIENT, port, VIP, 80));
        forward(
            &dp,
            &tcp(B1, 8080, CLIENT, port, TCP_SYN | TCP_ACK, 4999, 1001, &[]),
        );
    }
    // A third flow has only sent its SYN so far.
    forward(&dp, &tcp_syn(CLIENT, 40033, VIP, 80));
    set_backends(&mut dp, &[(2, B2)], &[]);
    dp.remove_backend(1).unwrap();
    // Retired: kept in DP_BACKENDS, out of what is programmed.
    assert!(!dp.read_services().unwrap().backends.contains_key(&1));
    // The client's data: reset, as for a backend that is gone.
    let data = tcp(CLIENT, 40031, VIP, 80, TCP_ACK | TCP_PSH, 1001, 5000, b"x");
    let (ret, out) = run(&dp, Hook::TcIngress, &data);
    assert_eq!(ret, TC_ACT_REDIRECT, "reset back to the client");
    assert_eq!(Ipv4View::new(&out).tcp_flags(), TCP_RST);
    // Both of its conntrack entries go (the reply side's would otherwise
    // keep naming the retired backend for the established timeout).
    assert!(ct_get(&dp, &ct_key(CLIENT, 40031, VIP, 80, 6)).is_none());
    assert!(ct_get(&dp, &ct_key(B1, 8080, CLIENT, 40031, 6)).is_none());
    // The client's own reset: passed on to the backend, translated, so
    // that the backend's socket closes too.
    let rst = tcp(CLIENT, 40032, VIP, 80, TCP_RST | TCP_ACK, 1001, 5000, &[]);
    let out = forward(&dp, &rst);
    let v = Ipv4View::new(&out);
    assert_eq!((v.dst(), v.dport()), (B1, 8080));
    assert_eq!(v.tcp_flags(), TCP_RST | TCP_ACK);
    // Its SYN again (a retransmission): a new connection, to a backend
    // that is there, not reset as the retired backend's flow.
    let out = forward(&dp, &tcp_syn(CLIENT, 40033, VIP, 80));
    assert_eq!(Ipv4View::new(&out).dst(), B2);
    let counters = dp.counters().unwrap();
    assert_eq!(
        counters.packets(Hook::TcIngress, Reason::BackendGoneClosed),
        1
    );
    assert_eq!(
        counters.packets(Hook::TcIngress, Reason::BackendGoneReset),
        1
    );
}

#[test]
fn a_reset_for_a_segment_without_ack_acknowledges_it() {
    let mut dp = setup(&[(1, B1)], &[]);
    forward(&dp, &tcp_syn(CLIENT, 40010, VIP, 80));
    dp.remove_backend(1).unwrap();
    let fin = tcp(CLIENT, 40010, VIP, 80, TCP_FIN | TCP_PSH, 777, 0, b"abc");
    let (ret, out) = run(&dp, Hook::TcIngress, &fin);
    assert_eq!(ret, TC_ACT_REDIRECT);
    let v = Ipv4View::new(&out);
    assert_eq!(v.tcp_flags(), TCP_RST | TCP_ACK);
    assert_eq!((v.tcp_seq(), v.tcp_ack()), (0, 781), "3 bytes and the FIN");
    assert!(v.l4_checksum_ok());
}

#[test]
fn a_syn_reusing_the_tuple_of_a_dead_flow_starts_a_new_flow() {
    let mut dp = setup(&[(1, B1)], &[]);
    forward(&dp, &tcp_syn(CLIENT, 40021, VIP, 80));
    set_backends(&mut dp, &[(2, B2)], &[]);
    dp.remove_backend(1).unwrap();
    let out = forward(&dp, &tcp_syn(CLIENT, 40021, VIP, 80));
    assert_eq!(Ipv4View::new(&out).dst(), B2, "not reset: a new connection");
    // Likewise after the flow closed (FIN seen), with its backend still there.
    forward(
        &dp,
        &tcp(CLIENT, 40021, VIP, 80, TCP_FIN | TCP_ACK, 1001, 1, &[]),
    );
    let new_flows = |dp: &Datapath| {
        dp.counters()
            .unwrap()
            .packets(Hook::TcIngress, Reason::NewFlow)
    };
    let before = new_flows(&dp);
    forward(&dp, &tcp_syn(CLIENT, 40021, VIP, 80));
    assert_eq!(new_flows(&dp), before + 1);
}

/// A pod's service flow is not masqueraded, so its reply entry is keyed
/// (backend:8080 -> pod:port). A later connection from the same port
/// straight to the backend, while the closed flow's entries wait out their
/// closing time, must get its SYN-ACK untouched: rewritten to the service
/// address (as it was), the client resets it and connects again a second
/// later. netfilter gives such a connection another source port. Found by
/// `dp-bench hook-cost` (a pod's direct connections after its service
/// ones: 12 to 14 connections/s, with failures).
#[test]
fn a_direct_connection_from_a_closed_service_flows_port_gets_its_syn_ack_untouched() {
    let dp = setup(&[(1, B1)], &[]);
    forward(&dp, &tcp_syn(CLIENT, 40030, VIP, 80));
    let syn_ack = tcp(B1, 8080, CLIENT, 40030, TCP_SYN | TCP_ACK, 5000, 1001, &[]);
    let out = forward(&dp, &syn_ack);
    assert_eq!(
        Ipv4View::new(&out).src(),
        VIP,
        "the service flow's own SYN-ACK is reverse-NATed"
    );
    forward(
        &dp,
        &tcp(CLIENT, 40030, VIP, 80, TCP_RST | TCP_ACK, 1001, 5001, &[]),
    );
    let reply_key = ct_key(B1, 8080, CLIENT, 40030, 6);
    assert!(ct_get(&dp, &reply_key).is_some(), "closed, not gone yet");
    let counted = |r| dp.counters().unwrap().packets(Hook::TcIngress, r);

    let direct_syn = tcp_syn(CLIENT, 40030, B1, 8080);
    assert_eq!(
        forward(&dp, &direct_syn),
        direct_syn,
        "no service: untouched"
    );
    assert_eq!(counted(Reason::StaleReplyEntry), 1);
    assert!(ct_get(&dp, &reply_key).is_none(), "the stale entry is gone");
    let direct_syn_ack = tcp(B1, 8080, CLIENT, 40030, TCP_SYN | TCP_ACK, 9000, 1001, &[]);
    assert_eq!(
        forward(&dp, &direct_syn_ack),
        direct_syn_ack,
        "from the backend, as the client's socket expects"
    );
    let data = tcp(
        B1,
        8080,
        CLIENT,
        40030,
        TCP_ACK | TCP_PSH,
        9001,
        1001,
        b"hi",
    );
    assert_eq!(forward(&dp, &data), data, "and the rest of the flow");
    assert_eq!(
        counted(Reason::ReplyReverseNat),
        1,
        "only the service flow's"
    );
}

/// The SYN is what proves a new connection, not a SYN-ACK: a late
/// duplicate SYN-ACK of a flow the client has half closed (its FIN went
/// out) is still that flow's, and stays translated; so do its later
/// replies. And a direct SYN from another port leaves the entry alone.
#[test]
fn a_late_syn_ack_of_a_half_closed_service_flow_stays_translated() {
    let dp = setup(&[(1, B1)], &[]);
    forward(&dp, &tcp_syn(CLIENT, 40031, VIP, 80));
    let syn_ack = tcp(B1, 8080, CLIENT, 40031, TCP_SYN | TCP_ACK, 5000, 1001, &[]);
    forward(&dp, &syn_ack);
    forward(
        &dp,
        &tcp(CLIENT, 40031, VIP, 80, TCP_FIN | TCP_ACK, 1001, 5001, &[]),
    );
    forward(&dp, &tcp_syn(CLIENT, 40032, B1, 8080));
    let out = forward(&dp, &syn_ack);
    assert_eq!(Ipv4View::new(&out).src(), VIP, "still the service flow's");
    let fin = tcp(B1, 8080, CLIENT, 40031, TCP_FIN | TCP_ACK, 5001, 1002, &[]);
    assert_eq!(Ipv4View::new(&forward(&dp, &fin)).src(), VIP);
    let counted = |r| dp.counters().unwrap().packets(Hook::TcIngress, r);
    assert_eq!(counted(Reason::ReplyReverseNat), 3);
    assert_eq!(counted(Reason::StaleReplyEntry), 0);
}

#[test]
fn expired_entries_are_not_used_and_the_gc_deletes_them() {
    let mut dp = setup(&[(1, B1)], &[]);
    dp.update_config(|c| {
        c.ct_timeouts = CtTimeouts {
            tcp_syn: 0,
            tcp_established: 0,
            tcp_closing: 0,
            udp: 0,
            udp_replied: 0,
            _pad: 0,
        }
    })
    .unwrap();
    forward(&dp, &udp(CLIENT, 6000, VIP, 80, b"a"));
    forward(&dp, &udp(CLIENT, 6000, VIP, 80, b"b"));
    let c = dp.counters().unwrap();
    assert_eq!(
        c.packets(Hook::TcIngress, Reason::NewFlow),
        2,
        "expired = absent"
    );
    assert_eq!(c.packets(Hook::TcIngress, Reason::Established), 0);
    assert_eq!(dp.ct_entries().unwrap().len(), 2);
    assert_eq!(dp.ct_gc().unwrap(), 2);
    assert!(dp.ct_entries().unwrap().is_empty());
}

#[test]
fn the_gc_keeps_live_entries() {
    let mut dp = setup(&[(1, B1)], &[]);
    forward(&dp, &udp(CLIENT, 6001, VIP, 80, b"a"));
    assert_eq!(dp.ct_gc().unwrap(), 0);
    assert_eq!(dp.ct_entries().unwrap().len(), 2);
}

#[test]
fn a_full_conntrack_table_keeps_the_datapath_forwarding() {
    e2e::require_root();
    let mut dp = Datapath::load_with(MapSizes {
        conntrack: 16,
        ..MapSizes::default()
    })
    .unwrap();
    set_backends(&mut dp, &[(1, B1)], &[]);
    for port in 0..100u16 {
        let out = forward(&dp, &udp(CLIENT, 7000 + port, VIP, 80, b"x"));
        assert_eq!(Ipv4View::new(&out).dst(), B1);
    }
    let c = dp.counters().unwrap();
    assert_eq!(c.packets(Hook::TcIngress, Reason::NewFlow), 100);
    // The LRU table evicts the least recently used flows instead of failing.
    assert!(dp.ct_entries().unwrap().len() <= 16);
    // The most recent flow is tracked.
    assert!(ct_get(&dp, &ct_key(CLIENT, 7099, VIP, 80, 17)).is_some());
}

#[test]
fn trace_events_carry_service_backend_and_both_tuples() {
    let mut dp = setup(&[(1, B1)], &[]);
    dp.set_tracing(true).unwrap();
    let mut reader = dp.trace_reader().unwrap();
    forward(&dp, &tcp_syn(OUTSIDE, 40011, VIP, 80));
    forward(
        &dp,
        &tcp(B1, 8080, NODE, 40011, TCP_SYN | TCP_ACK, 7, 1001, &[]),
    );
    let events = reader.drain();
    assert_eq!(events.len(), 2);
    let (new, reply) = (&events[0], &events[1]);
    assert_eq!(
        (new.verdict, new.reason),
        (Verdict::Forward as u8, Reason::NewFlow as u32)
    );
    assert_eq!((new.service_id, new.backend_id), (SERVICE_ID, 1));
    assert_eq!(new.original.daddr, v4_mapped(VIP));
    assert_eq!(new.translated.saddr, v4_mapped(NODE));
    assert_eq!(
        (new.translated.daddr, new.translated.dport),
        (v4_mapped(B1), 8080)
    );
    assert_eq!(reply.reason, Reason::ReplyReverseNat as u32);
    assert_eq!(
        (reply.translated.saddr, reply.translated.sport),
        (v4_mapped(VIP), 80)
    );
    assert_eq!(reply.translated.daddr, v4_mapped(OUTSIDE));
    assert_eq!(
        dp::inspect::trace::describe::describe_event(new, Some("eth0")),
        "tc/ingress eth0 192.168.7.50:40011 -> 10.96.0.10:80 TCP SYN forwarded: new flow to a backend; \
         service 10, backend 1; now 172.18.0.2:40011 -> 10.244.2.7:8080 TCP"
    );
}

#[test]
fn each_trace_session_gets_the_packets_its_kernel_filter_matches() {
    use common::{trace::*, TraceSession};
    let mut dp = setup(&[(1, B1)], &[]);
    // Slot 0: everything from OUTSIDE. Slot 1: UDP port 80. Slot 2: rejects
    // and drops of this service only. Slot 3: another interface.
    let mut from_outside = TraceSession {
        active: 1,
        match_flags: TRACE_MATCH_ADDR,
        addr: v4_mapped(OUTSIDE),
        ..TraceSession::default()
    };
    dp.set_trace_session(0, &from_outside).unwrap();
    let udp80 = TraceSession {
        active: 1,
        match_flags: TRACE_MATCH_PORT | TRACE_MATCH_PROTOCOL,
        port: 80,
        protocol: 17,
        ..TraceSession::default()
    };
    dp.set_trace_session(1, &udp80).unwrap();
    let mut refused = TraceSession {
        active: 1,
        match_flags: TRACE_MATCH_VERDICT | TRACE_MATCH_SERVICE,
        verdicts: 1 << Verdict::Reject as u8 | 1 << Verdict::Drop as u8,
        service_count: 1,
        ..TraceSession::default()
    };
    refused.service_ids[0] = SERVICE_ID;
    dp.set_trace_session(2, &refused).unwrap();
    let elsewhere = TraceSession {
        active: 1,
        match_flags: TRACE_MATCH_IFINDEX,
        ifindex: 9999,
        ..TraceSession::default()
    };
    dp.set_trace_session(3, &elsewhere).unwrap();
    let mut readers: Vec<_> = (0..4).map(|s| dp.trace_reader_of(s).unwrap()).collect();

    forward(&dp, &tcp_syn(CLIENT, 40012, VIP, 80));
    let syn_from_outside = tcp_syn(OUTSIDE, 40012, VIP, 80);
    forward(&dp, &syn_from_outside);
    forward(&dp, &udp(CLIENT, 40012, VIP, 80, b"x"));
    // Port 81 is not served: a reject of no service port (service id 0),
    // then the service emptied: a reject of this service.
    run(&dp, Hook::TcIngress, &tcp_syn(CLIENT, 40013, VIP, 81));
    dp.set_service(
        &Frontend::tcp(sa(VIP, 80)),
        SERVICE_ID,
        &BackendSlots::default(),
    )
    .unwrap();
    run(&dp, Hook::TcIngress, &tcp_syn(CLIENT, 40014, VIP, 80));

    let events: Vec<Vec<TraceEvent>> = readers.iter_mut().map(|r| r.drain()).collect();
    assert_eq!(events[0].len(), 1, "only the packet from {OUTSIDE:?}");
    assert_eq!(events[0][0].original.saddr, v4_mapped(OUTSIDE));
    // The headers are the frame as it arrived, before DNAT.
    let e = &events[0][0];
    assert_eq!(
        &e.headers[..e.headers_len as usize],
        &syn_from_outside[..],
        "the whole (short) frame, untranslated"
    );
    assert_eq!(events[1].len(), 1);
    assert_eq!(events[1][0].original.protocol, 17);
    assert_eq!(
        events[2]
            .iter()
            .map(|e| (e.reason, e.service_id))
            .collect::<Vec<_>>(),
        [(Reason::NoEndpoints as u32, SERVICE_ID)],
        "the unserved port has no service id"
    );
    assert!(events[3].is_empty());

    // A closed slot gets nothing; the others keep theirs.
    from_outside.active = 0;
    dp.set_trace_session(0, &from_outside).unwrap();
    run(&dp, Hook::TcIngress, &tcp_syn(OUTSIDE, 40015, VIP, 80));
    assert!(readers[0].drain().is_empty());
    assert_eq!(readers[2].drain().len(), 1);
}

/// An ICMP error frame `src -> dst` quoting `quoted` (IP header + 8 bytes).
fn icmp_error(src: [u8; 4], dst: [u8; 4], code: u8, quoted: &[u8]) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
        .ipv4(src, dst, 64)
        .icmpv4_raw(3, code, [0, 0, 0x05, 0xdc]);
    let mut v = Vec::new();
    b.write(&mut v, quoted).unwrap();
    v
}

/// IP header + UDP header of an empty datagram (what an ICMP error quotes).
fn quote(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    udp(src, sport, dst, dport, b"")[14..42].to_vec()
}

#[test]
fn an_icmp_error_from_the_backend_is_translated_back_to_the_client() {
    let dp = setup(&[(1, B1)], &[]);
    forward(&dp, &udp(CLIENT, 5000, VIP, 80, b""));
    // Fragmentation needed, from the backend, quoting client -> backend.
    let err = icmp_error(B1, CLIENT, 4, &quote(CLIENT, 5000, B1, 8080));
    let (ret, out) = run(&dp, Hook::TcIngress, &err);
    assert_eq!(ret, TC_ACT_OK);
    let v = Ipv4View::new(&out);
    assert_eq!(
        (v.src(), v.dst()),
        (VIP, CLIENT),
        "from the service address"
    );
    assert!(v.ip_checksum_ok() && v.icmp_checksum_ok());
    assert_eq!(&v.l4()[..2], &err[34..36], "type and code untouched");
    assert_eq!(&v.l4()[4..8], &err[38..42], "next-hop MTU untouched");
    assert_eq!(
        &v.l4()[8..],
        &quote(CLIENT, 5000, VIP, 80)[..],
        "the quoted packet is the one the client sent, checksums included"
    );
    let c = dp.counters().unwrap();
    assert_eq!(c.packets(Hook::TcIngress, Reason::IcmpErrorTranslated), 1);

    // From a router on the way: only the quote changes.
    let err = icmp_error([172, 18, 0, 1], CLIENT, 4, &quote(CLIENT, 5000, B1, 8080));
    let (_, out) = run(&dp, Hook::TcIngress, &err);
    let v = Ipv4View::new(&out);
    assert_eq!((v.src(), v.dst()), ([172, 18, 0, 1], CLIENT));
    assert_eq!(&v.l4()[8..], &quote(CLIENT, 5000, VIP, 80)[..]);
}

#[test]
fn an_icmp_error_about_a_masqueraded_flow_reaches_the_real_client() {
    let dp = setup(&[(1, B1)], &[]);
    forward(&dp, &udp(OUTSIDE, 5001, VIP, 80, b""));
    let err = icmp_error(B1, NODE, 4, &quote(NODE, 5001, B1, 8080));
    let (ret, out) = run(&dp, Hook::TcIngress, &err);
    assert_eq!(ret, TC_ACT_OK);
    let v = Ipv4View::new(&out);
    assert_eq!((v.src(), v.dst()), (VIP, OUTSIDE));
    assert!(v.ip_checksum_ok() && v.icmp_checksum_ok());
    assert_eq!(&v.l4()[8..], &quote(OUTSIDE, 5001, VIP, 80)[..]);
}

#[test]
fn an_icmp_error_from_the_client_about_a_reply_goes_to_the_backend() {
    let dp = setup(&[(1, B1)], &[]);
    forward(&dp, &udp(CLIENT, 5002, VIP, 80, b""));
    // The client's socket is gone: port unreachable about VIP:80 -> client.
    let err = icmp_error(CLIENT, VIP, 3, &quote(VIP, 80, CLIENT, 5002));
    let (ret, out) = run(&dp, Hook::TcIngress, &err);
    assert_eq!(ret, TC_ACT_OK);
    let v = Ipv4View::new(&out);
    assert_eq!((v.src(), v.dst()), (CLIENT, B1));
    assert!(v.ip_checksum_ok() && v.icmp_checksum_ok());
    assert_eq!(&v.l4()[8..], &quote(B1, 8080, CLIENT, 5002)[..]);
}

#[test]
fn icmp_that_is_not_about_a_service_flow_passes_untouched() {
    let dp = setup(&[(1, B1)], &[]);
    let err = icmp_error(B1, CLIENT, 4, &quote(CLIENT, 5003, B1, 8080));
    assert_eq!(run(&dp, Hook::TcIngress, &err), (TC_ACT_OK, err.clone()));
    let c = dp.counters().unwrap();
    assert_eq!(c.packets(Hook::TcIngress, Reason::UnsupportedProtocol), 1);
}

#[test]
fn a_local_traffic_policy_without_local_endpoints_drops_instead_of_rejecting() {
    let mut dp = setup(&[], &[]);
    let slots = BackendSlots {
        local_only: true,
        ..BackendSlots::default()
    };
    dp.set_service(&Frontend::tcp(sa(VIP, 80)), SERVICE_ID, &slots)
        .unwrap();
    let (ret, out) = run(&dp, Hook::TcIngress, &tcp_syn(CLIENT, 40020, VIP, 80));
    assert_eq!(ret, TC_ACT_SHOT, "dropped, no ICMP: {out:?}");
    let c = dp.counters().unwrap();
    assert_eq!(c.packets(Hook::TcIngress, Reason::NoLocalEndpoints), 1);
    assert_eq!(c.packets(Hook::TcIngress, Reason::NoEndpoints), 0);
}

/// Runs the calling thread on CPU 0 only: the reply budget is per CPU.
fn on_cpu0() {
    // SAFETY: a zeroed cpu_set_t is empty; CPU 0 is in bounds; pid 0 is
    // the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
}

#[test]
fn rejects_beyond_the_reply_budget_are_dropped_and_counted() {
    on_cpu0();
    let mut dp = setup(&[], &[]);
    // One reply a second, three at once.
    dp.set_reply_limit(1, 3).unwrap();
    let verdicts: Vec<u32> = (0..10)
        .map(|i| {
            let request = tcp_syn(CLIENT, 41_000 + i, VIP, 80);
            let (ret, out) = run(&dp, Hook::TcIngress, &request);
            if ret == TC_ACT_REDIRECT {
                assert_port_unreachable(ret, &out, &request);
            }
            ret
        })
        .collect();
    assert_eq!(
        verdicts,
        [[TC_ACT_REDIRECT; 3].as_slice(), [TC_ACT_SHOT; 7].as_slice()].concat()
    );
    let c = dp.counters().unwrap();
    assert_eq!(c.packets(Hook::TcIngress, Reason::NoEndpoints), 3);
    assert_eq!(c.packets(Hook::TcIngress, Reason::RejectRateLimited), 7);
    // Without a limit, every one is answered.
    dp.set_reply_limit(0, 1).unwrap();
    for i in 0..100 {
        let (ret, _) = run(&dp, Hook::TcIngress, &tcp_syn(CLIENT, 42_000 + i, VIP, 80));
        assert_eq!(ret, TC_ACT_REDIRECT);
    }
}

/// Found by the fuzzer (fuzz_test_run.rs, seed 21): a TCP segment whose
/// data offset is below 5 words was translated as a new flow. The kernel's
/// conntrack marks it INVALID (never NATed) and its TCP drops it.
#[test]
fn a_tcp_header_shorter_than_its_fixed_part_is_dropped_as_malformed() {
    let dp = setup(&[(1, B1)], &[]);
    for doff in 0..5u8 {
        let mut frame = tcp_syn(CLIENT, 43_000 + u16::from(doff), VIP, 80);
        frame[14 + 20 + 12] = doff << 4;
        let (ret, out) = run(&dp, Hook::TcIngress, &frame);
        assert_eq!(ret, TC_ACT_SHOT, "data offset {doff}");
        assert_eq!(out, frame, "not rewritten");
    }
    let c = dp.counters().unwrap();
    assert_eq!(c.packets(Hook::TcIngress, Reason::Malformed), 5);
    assert_eq!(c.packets(Hook::TcIngress, Reason::NewFlow), 0);
    assert!(dp.ct_entries().unwrap().is_empty());
}

/// Found by the fuzzer (`cargo xtask fuzz --seed 1`, state 2621): an ICMP
/// error quoting more than the 8 bytes after the IP header (Linux quotes up
/// to 576 bytes) left translated with a wrong ICMP checksum, recomputed
/// over the part the program had loaded. The receiver's ICMP drops such a
/// message (`icmp_rcv` validates the sum), so PMTU discovery and port
/// unreachable broke for service flows with data.
#[test]
fn an_icmp_error_quoting_a_whole_packet_keeps_a_valid_checksum() {
    let dp = setup(&[(1, B1)], &[]);
    for payload in [&b"q"[..], &[0x5a; 100][..], &[0xa5; 301][..]] {
        let sport = 5100 + payload.len() as u16;
        forward(&dp, &udp(CLIENT, sport, VIP, 80, payload));
        let whole = udp(CLIENT, sport, B1, 8080, payload)[14..].to_vec();
        let err = icmp_error(B1, CLIENT, 4, &whole);
        let (ret, out) = run(&dp, Hook::TcIngress, &err);
        assert_eq!(ret, TC_ACT_OK);
        let v = Ipv4View::new(&out);
        assert_eq!((v.src(), v.dst()), (VIP, CLIENT));
        assert!(v.ip_checksum_ok(), "{} bytes quoted", whole.len());
        assert!(v.icmp_checksum_ok(), "{} bytes quoted", whole.len());
        assert_eq!(
            &v.l4()[8..],
            &udp(CLIENT, sport, VIP, 80, payload)[14..],
            "the whole quote is the packet the client sent"
        );
    }
}
