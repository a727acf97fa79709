//! BPF_PROG_TEST_RUN tests of IPv6 service handling on crafted frames:
//! output bytes, checksums (verified independently, over the IPv6
//! pseudo-header), conntrack state, the generated ICMPv6 port unreachable
//! and TCP reset, extension headers and fragments, and what passes
//! untouched. The node is dual-stack: its IPv4 settings are those of the
//! other test-run files, and nothing here depends on them.

mod support;

use common::{
    ct::{CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_FLAG_HAIRPIN, CT_FLAG_SNAT},
    proto::{IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP},
    Hook, Reason,
};
use dp::{BackendSlots, Datapath, Frontend, ServiceMaps};
use support::{ipv6::*, *};

/// kind's dual-stack defaults: pods in fd00:10:244::/56 (a /64 per node),
/// Services in fd00:10:96::/112, nodes on the docker network.
const NODE6: &str = "fc00:f853:ccd:e793::2";
const CLIENT6: &str = "fd00:10:244:1::5";
const OUTSIDE6: &str = "2001:db8:7::50";
const VIP6: &str = "fd00:10:96::10";
const B1_6: &str = "fd00:10:244:2::7";
const B2_6: &str = "fd00:10:244:2::8";
const SERVICE_ID: u32 = 20;

/// A dual-stack node (`load_node`'s IPv4 settings, and `NODE6` in
/// fd00:10:244::/56) with a TCP and a UDP frontend on [VIP6]:80 over the
/// given backends (port 8080).
fn setup(ready: &[(u32, &str)]) -> Datapath {
    let mut dp = load_node();
    dp.set_node(
        std::net::IpAddr::from(v6(NODE6)),
        Some((std::net::IpAddr::from(v6("fd00:10:244::")), 56)),
        false,
    )
    .unwrap();
    set_backends(&mut dp, ready);
    dp
}

fn set_backends(dp: &mut Datapath, ready: &[(u32, &str)]) {
    for (id, ip) in ready {
        dp.set_backend(*id, sa6(ip, 8080), IPPROTO_TCP, false)
            .unwrap();
    }
    let slots = BackendSlots {
        ready: ready.iter().map(|b| b.0).collect(),
        ..BackendSlots::default()
    };
    dp.set_service(&Frontend::tcp(sa6(VIP6, 80)), SERVICE_ID, &slots)
        .unwrap();
    dp.set_service(&Frontend::udp(sa6(VIP6, 80)), SERVICE_ID + 1, &slots)
        .unwrap();
}

/// Runs at tc ingress and checks it was forwarded with a valid checksum.
fn forward6(dp: &Datapath, frame: &[u8]) -> Vec<u8> {
    let (ret, out) = run(dp, Hook::TcIngress, frame);
    assert_eq!(
        ret, TC_ACT_OK,
        "forwarded (left to the stack: no route here)"
    );
    assert!(Ipv6View::new(&out).l4_checksum_ok(), "L4 checksum: {out:?}");
    out
}

fn packets(dp: &Datapath, hook: Hook, reason: Reason) -> u64 {
    dp.counters().unwrap().packets(hook, reason)
}

#[test]
fn an_ipv6_tcp_flow_is_dnated_tracked_and_answered_from_the_service_address() {
    let dp = setup(&[(1, B1_6)]);
    let syn = tcp6_syn(v6(CLIENT6), 40000, v6(VIP6), 80);
    let out = forward6(&dp, &syn);
    let v = Ipv6View::new(&out);
    assert_eq!(
        (v.src(), v.sport()),
        (v6(CLIENT6), 40000),
        "pod source kept"
    );
    assert_eq!((v.dst(), v.dport()), (v6(B1_6), 8080));
    assert_eq!(v.tcp_flags(), TCP_SYN);
    assert_eq!(v.hop_limit(), 64, "the hop limit is the stack's to lower");
    assert_eq!(packets(&dp, Hook::TcIngress, Reason::NewFlow), 1);

    let orig = ct_get(&dp, &ct_key6(v6(CLIENT6), 40000, v6(VIP6), 80, 6)).expect("original");
    assert_eq!(orig.direction, CT_DIR_ORIGINAL);
    assert_eq!(
        (orig.backend_id, orig.service_id, orig.flags),
        (1, SERVICE_ID, 0)
    );
    let reply = ct_get(&dp, &ct_key6(v6(B1_6), 8080, v6(CLIENT6), 40000, 6)).expect("reply");
    assert_eq!(reply.direction, CT_DIR_REPLY);
    assert_eq!(reply.nat_addr, v6(CLIENT6));

    // Data keeps its backend; the reply comes from the service address.
    let data = tcp6(
        v6(CLIENT6),
        40000,
        v6(VIP6),
        80,
        TCP_ACK | TCP_PSH,
        1001,
        5001,
        b"GET /",
    );
    let out = forward6(&dp, &data);
    let v = Ipv6View::new(&out);
    assert_eq!((v.dst(), v.dport()), (v6(B1_6), 8080));
    assert_eq!(v.payload(), b"GET /");
    let syn_ack = tcp6(
        v6(B1_6),
        8080,
        v6(CLIENT6),
        40000,
        TCP_SYN | TCP_ACK,
        5000,
        1001,
        &[],
    );
    let out = forward6(&dp, &syn_ack);
    let v = Ipv6View::new(&out);
    assert_eq!((v.src(), v.sport()), (v6(VIP6), 80), "reverse NAT");
    assert_eq!((v.dst(), v.dport()), (v6(CLIENT6), 40000));
    assert_eq!(packets(&dp, Hook::TcIngress, Reason::Established), 1);
    assert_eq!(packets(&dp, Hook::TcIngress, Reason::ReplyReverseNat), 1);
}

#[test]
fn ipv6_udp_is_dnated_with_a_valid_checksum_and_spread_over_the_backends() {
    let dp = setup(&[(1, B1_6), (2, B2_6)]);
    let mut seen = std::collections::BTreeMap::new();
    for port in 0..40 {
        let out = forward6(&dp, &udp6(v6(CLIENT6), 5000 + port, v6(VIP6), 80, b"query"));
        let v = Ipv6View::new(&out);
        assert_eq!(v.dport(), 8080);
        assert_eq!(v.payload(), b"query");
        seen.insert(5000 + port, v.dst());
    }
    let used: std::collections::BTreeSet<_> = seen.values().copied().collect();
    assert_eq!(used, [v6(B1_6), v6(B2_6)].into(), "both backends used");
    // Each flow's reply, from its own backend, comes from the service.
    for (port, backend) in seen {
        let reply = forward6(&dp, &udp6(backend, 8080, v6(CLIENT6), port, b"answer"));
        let r = Ipv6View::new(&reply);
        assert_eq!((r.src(), r.sport()), (v6(VIP6), 80));
        assert_eq!((r.dst(), r.dport()), (v6(CLIENT6), port));
        assert_eq!(r.payload(), b"answer");
    }
    assert_eq!(packets(&dp, Hook::TcIngress, Reason::ReplyReverseNat), 40);
}

#[test]
fn ipv6_traffic_from_outside_the_cluster_cidr_is_masqueraded_to_the_nodes_ipv6_address() {
    let dp = setup(&[(1, B1_6)]);
    let out = forward6(&dp, &tcp6_syn(v6(OUTSIDE6), 40004, v6(VIP6), 80));
    let v = Ipv6View::new(&out);
    assert_eq!(
        (v.src(), v.sport()),
        (v6(NODE6), 40004),
        "SNAT to the node's IPv6"
    );
    assert_eq!((v.dst(), v.dport()), (v6(B1_6), 8080));
    let e = ct_get(&dp, &ct_key6(v6(OUTSIDE6), 40004, v6(VIP6), 80, 6)).unwrap();
    assert_eq!(e.flags, CT_FLAG_SNAT);

    let reply = tcp6(
        v6(B1_6),
        8080,
        v6(NODE6),
        40004,
        TCP_SYN | TCP_ACK,
        7,
        1001,
        &[],
    );
    let out = forward6(&dp, &reply);
    let v = Ipv6View::new(&out);
    assert_eq!((v.src(), v.sport()), (v6(VIP6), 80));
    assert_eq!(
        (v.dst(), v.dport()),
        (v6(OUTSIDE6), 40004),
        "back to the real client"
    );
}

#[test]
fn ipv6_hairpin_is_masqueraded_to_the_nodes_ipv6_address() {
    let dp = setup(&[(1, B1_6)]);
    let out = forward6(&dp, &tcp6_syn(v6(B1_6), 40005, v6(VIP6), 80));
    let v = Ipv6View::new(&out);
    assert_eq!(v.src(), v6(NODE6), "the backend sees the node, not itself");
    assert_eq!((v.dst(), v.dport()), (v6(B1_6), 8080));
    let e = ct_get(&dp, &ct_key6(v6(B1_6), 40005, v6(VIP6), 80, 6)).unwrap();
    assert_eq!(e.flags, CT_FLAG_SNAT | CT_FLAG_HAIRPIN);
}

#[test]
fn an_ipv6_flow_to_masquerade_on_a_node_without_an_ipv6_address_is_dropped() {
    // IPv4 settings only.
    let mut dp = load_node();
    set_backends(&mut dp, &[(1, B1_6)]);
    // Without an IPv6 cluster CIDR nothing is masqueraded for its source...
    forward6(&dp, &tcp6_syn(v6(OUTSIDE6), 40006, v6(VIP6), 80));
    // ...but hairpin must be, and there is no address to do it with.
    let syn = tcp6_syn(v6(B1_6), 40007, v6(VIP6), 80);
    assert_eq!(run(&dp, Hook::TcIngress, &syn), (TC_ACT_SHOT, syn.clone()));
    assert_eq!(packets(&dp, Hook::TcIngress, Reason::NoNodeAddress), 1);
    assert!(ct_get(&dp, &ct_key6(v6(B1_6), 40007, v6(VIP6), 80, 6)).is_none());
}

/// The ICMPv6 destination unreachable / port unreachable (type 1 code 4)
/// the datapath builds, byte by byte, for `request` from CLIENT6 to VIP6.
fn assert_port_unreachable6(ret: u32, out: &[u8], request: &[u8]) {
    assert_eq!(ret, TC_ACT_REDIRECT, "sent back to the client");
    let v = Ipv6View::new(out);
    assert_eq!((v.dst_mac(), v.src_mac()), (CLIENT_MAC, SERVER_MAC));
    assert_eq!(
        &out[14..18],
        &[0x60, 0, 0, 0],
        "version 6, no class or flow"
    );
    assert_eq!(v.protocol, IPPROTO_ICMPV6);
    assert_eq!(v.hop_limit(), 64);
    assert_eq!((v.src(), v.dst()), (v6(VIP6), v6(CLIENT6)));
    let icmp = v.l4();
    assert_eq!(
        (icmp[0], icmp[1]),
        (1, 4),
        "destination unreachable / port unreachable"
    );
    assert_eq!(&icmp[4..8], &[0; 4], "unused");
    assert!(v.l4_checksum_ok(), "ICMPv6 checksum: {out:?}");
    let quoted = &request[14..];
    assert_eq!(&icmp[8..], &quoted[..quoted.len().min(icmp.len() - 8)]);
    assert!(icmp.len() - 8 >= 48, "the IPv6 header and the ports quoted");
    assert_eq!(v.payload_len(), icmp.len());
    assert_eq!(out.len(), 54 + icmp.len());
}

#[test]
fn an_ipv6_service_without_endpoints_answers_icmpv6_port_unreachable() {
    let dp = setup(&[]);
    let long = vec![7u8; 600];
    for request in [
        tcp6_syn(v6(CLIENT6), 40002, v6(VIP6), 80),
        udp6(v6(CLIENT6), 5002, v6(VIP6), 80, b"q"),
        udp6(v6(CLIENT6), 5003, v6(VIP6), 80, &long),
    ] {
        let (ret, out) = run(&dp, Hook::TcIngress, &request);
        assert_port_unreachable6(ret, &out, &request);
    }
    assert_eq!(packets(&dp, Hook::TcIngress, Reason::NoEndpoints), 3);
    // A port the service does not serve is rejected the same way.
    let other_port = tcp6_syn(v6(CLIENT6), 40003, v6(VIP6), 81);
    let (ret, out) = run(&dp, Hook::TcIngress, &other_port);
    assert_port_unreachable6(ret, &out, &other_port);
    assert_eq!(packets(&dp, Hook::TcIngress, Reason::PortNotServed), 1);
    assert!(dp.ct_entries().unwrap().is_empty(), "nothing tracked");
}

#[test]
fn an_ipv6_tcp_flow_to_a_removed_backend_is_reset() {
    let mut dp = setup(&[(1, B1_6)]);
    forward6(&dp, &tcp6_syn(v6(CLIENT6), 40009, v6(VIP6), 80));
    forward6(
        &dp,
        &tcp6(
            v6(B1_6),
            8080,
            v6(CLIENT6),
            40009,
            TCP_SYN | TCP_ACK,
            4999,
            1001,
            &[],
        ),
    );
    set_backends(&mut dp, &[(2, B2_6)]);
    dp.remove_backend(1).unwrap();
    // With a hop-by-hop header, which the reset does not carry.
    let request = with_ext(
        &tcp6(
            v6(CLIENT6),
            40009,
            v6(VIP6),
            80,
            TCP_ACK | TCP_PSH,
            1001,
            5000,
            b"0123456789",
        ),
        &[(HOP_BY_HOP, options_header(8))],
    );
    let (ret, out) = run(&dp, Hook::TcIngress, &request);
    assert_eq!(ret, TC_ACT_REDIRECT, "sent back to the client");
    let v = Ipv6View::new(&out);
    assert_eq!((v.dst_mac(), v.src_mac()), (CLIENT_MAC, SERVER_MAC));
    assert_eq!((v.src(), v.sport()), (v6(VIP6), 80));
    assert_eq!((v.dst(), v.dport()), (v6(CLIENT6), 40009));
    assert_eq!(
        (v.protocol, v.l4_off, v.payload_len()),
        (IPPROTO_TCP, 54, 20)
    );
    assert_eq!(v.tcp_flags(), TCP_RST);
    assert_eq!(v.tcp_seq(), 5000, "RFC 793: seq = the segment's ack");
    assert!(v.l4_checksum_ok(), "TCP checksum: {out:?}");
    assert_eq!(out.len(), 74);
    assert_eq!(packets(&dp, Hook::TcIngress, Reason::BackendGoneReset), 1);
    assert!(ct_get(&dp, &ct_key6(v6(CLIENT6), 40009, v6(VIP6), 80, 6)).is_none());

    // A segment without ACK is acknowledged: its data and FIN. A flow of
    // its own to a removed backend first.
    set_backends(&mut dp, &[(3, B1_6)]);
    forward6(&dp, &tcp6_syn(v6(CLIENT6), 40010, v6(VIP6), 80));
    set_backends(&mut dp, &[(2, B2_6)]);
    dp.remove_backend(3).unwrap();
    let fin = tcp6(v6(CLIENT6), 40010, v6(VIP6), 80, TCP_FIN, 1001, 0, b"xy");
    let (ret, out) = run(&dp, Hook::TcIngress, &fin);
    assert_eq!(ret, TC_ACT_REDIRECT);
    let v = Ipv6View::new(&out);
    assert_eq!(v.tcp_flags(), TCP_RST | TCP_ACK);
    assert_eq!(v.tcp_ack(), 1001 + 2 + 1, "data and FIN acknowledged");
    assert!(v.l4_checksum_ok());
}

#[test]
fn extension_headers_are_walked_and_kept() {
    let dp = setup(&[(1, B1_6)]);
    let syn = with_ext(
        &tcp6_syn(v6(CLIENT6), 40011, v6(VIP6), 80),
        &[
            (HOP_BY_HOP, options_header(8)),
            (ROUTING, {
                // Type 4 (segment routing) with no segments left: passed by.
                let mut h = options_header(8);
                h[2] = 4;
                h[3] = 0;
                h
            }),
            (DESTINATION_OPTIONS, options_header(16)),
        ],
    );
    let out = forward6(&dp, &syn);
    let v = Ipv6View::new(&out);
    assert_eq!(v.l4_off, 54 + 32);
    assert_eq!((v.dst(), v.dport()), (v6(B1_6), 8080));
    assert_eq!(&out[54..86], &syn[54..86], "extension headers untouched");
    assert!(ct_get(&dp, &ct_key6(v6(CLIENT6), 40011, v6(VIP6), 80, 6)).is_some());

    // The reply's headers may differ; it is found all the same.
    let reply = with_ext(
        &tcp6(
            v6(B1_6),
            8080,
            v6(CLIENT6),
            40011,
            TCP_SYN | TCP_ACK,
            5,
            1001,
            &[],
        ),
        &[(DESTINATION_OPTIONS, options_header(8))],
    );
    let v_out = forward6(&dp, &reply);
    assert_eq!(Ipv6View::new(&v_out).src(), v6(VIP6));
}

#[test]
fn a_first_fragment_is_translated_and_a_later_one_passes() {
    let dp = setup(&[(1, B1_6)]);
    // The whole datagram, flagged as if more fragments followed: its UDP
    // header is here, so it is translated like any first packet.
    let first = with_ext(
        &udp6(v6(CLIENT6), 5010, v6(VIP6), 80, b"part one"),
        &[(FRAGMENT, fragment_header(0, true))],
    );
    let out = forward6(&dp, &first);
    let v = Ipv6View::new(&out);
    assert_eq!((v.dst(), v.dport()), (v6(B1_6), 8080));
    assert_eq!(&out[54..62], &first[54..62], "fragment header untouched");

    // A later fragment has no UDP header: left to the stack untouched.
    let mut later = with_ext(
        &udp6(v6(CLIENT6), 5010, v6(VIP6), 80, b"part two"),
        &[(FRAGMENT, fragment_header(2, false))],
    );
    later[62..66].copy_from_slice(b"\xde\xad\xbe\xef");
    assert_eq!(
        run(&dp, Hook::TcIngress, &later),
        (TC_ACT_OK, later.clone())
    );
    assert_eq!(packets(&dp, Hook::TcIngress, Reason::Fragment), 1);
    assert_eq!(packets(&dp, Hook::TcIngress, Reason::NewFlow), 1);
}

#[test]
fn more_extension_headers_than_the_datapath_walks_pass_untouched() {
    let dp = setup(&[(1, B1_6)]);
    let chain: Vec<_> = (0..5)
        .map(|_| (DESTINATION_OPTIONS, options_header(8)))
        .collect();
    let syn = with_ext(&tcp6_syn(v6(CLIENT6), 40012, v6(VIP6), 80), &chain);
    assert_eq!(run(&dp, Hook::TcIngress, &syn), (TC_ACT_OK, syn.clone()));
    assert_eq!(
        packets(&dp, Hook::TcIngress, Reason::Ipv6HeaderChainTooLong),
        1
    );
    // Four are walked.
    let syn = with_ext(&tcp6_syn(v6(CLIENT6), 40013, v6(VIP6), 80), &chain[..4]);
    let out = forward6(&dp, &syn);
    assert_eq!(Ipv6View::new(&out).dst(), v6(B1_6));
}

/// A neighbour solicitation for `target` from `src` (RFC 4861 4.3), with
/// its ICMPv6 checksum.
fn neighbour_solicitation(src: [u8; 16], target: [u8; 16]) -> Vec<u8> {
    let mut dst = v6("ff02::1:ff00:0");
    dst[13..].copy_from_slice(&target[13..]);
    let mut f = Vec::new();
    f.extend_from_slice(&[0x33, 0x33, 0xff, target[13], target[14], target[15]]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0, 0, 32, IPPROTO_ICMPV6, 255]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&target);
    // Source link-layer address option.
    icmp.extend_from_slice(&[1, 1]);
    icmp.extend_from_slice(&CLIENT_MAC);
    let mut sum = sum16(&src, 0) + sum16(&dst, 0);
    sum += icmp.len() as u32 + u32::from(IPPROTO_ICMPV6);
    let c = !fold(sum16(&icmp, sum));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&icmp);
    f
}

#[test]
fn neighbour_discovery_and_other_icmpv6_pass_untouched() {
    let dp = setup(&[(1, B1_6)]);
    // Even for the service address: neighbour discovery is the stack's.
    let ns = neighbour_solicitation(v6(CLIENT6), v6(VIP6));
    assert!(Ipv6View::new(&ns).l4_checksum_ok());
    for hook in [Hook::TcIngress, Hook::TcEgress, Hook::Xdp] {
        let (ret, out) = run(&dp, hook, &ns);
        // XDP leaves all ICMPv6 to tc, which judges errors about flows.
        let (pass, reason) = if hook == Hook::Xdp {
            (XDP_PASS, Reason::XdpPassToTc)
        } else {
            (TC_ACT_OK, Reason::UnsupportedProtocol)
        };
        assert_eq!((ret, &out), (pass, &ns), "{hook:?}");
        assert_eq!(packets(&dp, hook, reason), 1, "{hook:?}");
    }
    // An echo request to the service address passes too.
    let mut echo = ns.clone();
    echo[54] = 128;
    let (ret, out) = run(&dp, Hook::TcIngress, &echo);
    assert_eq!((ret, out), (TC_ACT_OK, echo));
    assert!(dp.ct_entries().unwrap().is_empty());
}

#[test]
fn ipv4_and_ipv6_frontends_of_one_service_stay_in_their_family() {
    let mut dp = setup(&[(1, B1_6)]);
    // The IPv4 side of a dual-stack Service: its own frontend and backend.
    let vip4 = [10, 96, 0, 10];
    dp.set_backend(9, sa([10, 244, 2, 9], 8080), IPPROTO_TCP, false)
        .unwrap();
    let slots = BackendSlots {
        ready: vec![9],
        ..BackendSlots::default()
    };
    dp.set_service(&Frontend::tcp(sa(vip4, 80)), SERVICE_ID + 2, &slots)
        .unwrap();
    let out = forward(&dp, &tcp_syn([10, 244, 1, 5], 41000, vip4, 80));
    assert_eq!(Ipv4View::new(&out).dst(), [10, 244, 2, 9]);
    let out = forward6(&dp, &tcp6_syn(v6(CLIENT6), 41000, v6(VIP6), 80));
    assert_eq!(Ipv6View::new(&out).dst(), v6(B1_6));
    // An IPv4 client from outside is masqueraded to the node's IPv4
    // address, an IPv6 one to its IPv6 address.
    let out = forward(&dp, &tcp_syn([192, 168, 7, 50], 41001, vip4, 80));
    assert_eq!(Ipv4View::new(&out).src(), NODE);
    let out = forward6(&dp, &tcp6_syn(v6(OUTSIDE6), 41001, v6(VIP6), 80));
    assert_eq!(Ipv6View::new(&out).src(), v6(NODE6));
}

#[test]
fn ipv6_sctp_ports_are_translated_with_the_crc_kept_valid() {
    let mut dp = setup(&[]);
    dp.set_backend(5, sa6(B1_6, 8080), common::proto::IPPROTO_SCTP, false)
        .unwrap();
    let slots = BackendSlots {
        ready: vec![5],
        ..BackendSlots::default()
    };
    let frontend = Frontend {
        addr: sa6(VIP6, 80),
        protocol: common::proto::IPPROTO_SCTP,
    };
    dp.set_service(&frontend, SERVICE_ID + 3, &slots).unwrap();
    // An SCTP INIT over IPv6 (the IPv4 helper's SCTP packet, re-wrapped).
    let v4 = sctp_init([10, 244, 1, 5], 7000, [10, 96, 0, 10], 80, 20);
    let sctp = &v4[34..];
    let mut f = Vec::new();
    f.extend_from_slice(&v4[..12]);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&(sctp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[common::proto::IPPROTO_SCTP, 64]);
    f.extend_from_slice(&v6(CLIENT6));
    f.extend_from_slice(&v6(VIP6));
    f.extend_from_slice(sctp);
    let (ret, out) = run(&dp, Hook::TcIngress, &f);
    assert_eq!(ret, TC_ACT_OK);
    let v = Ipv6View::new(&out);
    assert_eq!((v.dst(), v.dport()), (v6(B1_6), 8080));
    let l4 = v.l4();
    let mut zeroed = l4.to_vec();
    zeroed[8..12].fill(0);
    assert_eq!(
        u32::from_le_bytes(l4[8..12].try_into().unwrap()),
        crc32c(&zeroed),
        "CRC32c over the rewritten packet"
    );
}

// The XDP fast path for an IPv6 NodePort flow: a node whose eth0 routes the
// backend's pod network to another node, and the client's to a gateway.
struct XdpNode6 {
    topo: e2e::Topology,
}

const NODE2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 3];
const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 4];
const ETH0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

impl XdpNode6 {
    fn new() -> Self {
        let mut topo = e2e::Topology::new().unwrap();
        topo.add_ns("node").unwrap();
        topo.add_ns("net").unwrap();
        topo.veth("node", "eth0", "net", "eth0").unwrap();
        let node = topo.ns("node");
        for (key, value) in e2e::KIND_NODE_SYSCTLS
            .iter()
            .chain(&e2e::KIND_NODE_SYSCTLS_IPV6)
        {
            node.sysctl(key, value).unwrap();
        }
        node.ip(&["link", "set", "eth0", "address", "02:00:00:00:00:02"])
            .unwrap();
        node.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{NODE6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])
        .unwrap();
        for (ip, mac) in [
            ("fc00:f853:ccd:e793::3", "02:00:00:00:00:03"),
            ("fc00:f853:ccd:e793::1", "02:00:00:00:00:04"),
        ] {
            node.ip(&[
                "-6",
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
        node.ip(&[
            "-6",
            "route",
            "add",
            "fd00:10:244:2::/64",
            "via",
            "fc00:f853:ccd:e793::3",
        ])
        .unwrap();
        node.ip(&[
            "-6",
            "route",
            "add",
            "2001:db8::/32",
            "via",
            "fc00:f853:ccd:e793::1",
        ])
        .unwrap();
        XdpNode6 { topo }
    }

    /// Runs at XDP and checks the frame was sent back out (XDP_TX) with a
    /// valid checksum.
    fn tx(&self, dp: &Datapath, frame: &[u8]) -> Vec<u8> {
        let (ret, out) = run_xdp_on(dp, self.topo.ns("node"), "eth0", frame);
        let c = dp.counters().unwrap();
        let seen: Vec<_> = Reason::ALL
            .iter()
            .filter(|r| c.packets(Hook::Xdp, **r) > 0)
            .collect();
        assert_eq!(ret, XDP_TX, "served by XDP: {seen:?}");
        let v = Ipv6View::new(&out);
        assert!(v.l4_checksum_ok(), "L4 checksum: {out:?}");
        assert_eq!(v.src_mac(), ETH0_MAC);
        out
    }
}

#[test]
fn xdp_serves_an_ipv6_node_port_flow_to_a_remote_backend_and_its_replies() {
    let node = XdpNode6::new();
    let mut dp = setup(&[]);
    const NODE_PORT: u16 = 30080;
    for (protocol, id) in [(IPPROTO_TCP, 7), (IPPROTO_UDP, 8)] {
        dp.set_backend(id, sa6(B1_6, 8080), protocol, false)
            .unwrap();
        let slots = BackendSlots {
            ready: vec![id],
            external: true,
            ..BackendSlots::default()
        };
        let frontend = Frontend {
            addr: sa6(NODE6, NODE_PORT),
            protocol,
        };
        dp.set_service(&frontend, 30 + id, &slots).unwrap();
    }
    let out = node.tx(&dp, &tcp6_syn(v6(OUTSIDE6), 40000, v6(NODE6), NODE_PORT));
    let v = Ipv6View::new(&out);
    assert_eq!(
        (v.src(), v.sport()),
        (v6(NODE6), 40000),
        "masqueraded (eTP=Cluster)"
    );
    assert_eq!((v.dst(), v.dport()), (v6(B1_6), 8080));
    assert_eq!(v.dst_mac(), NODE2_MAC, "to the other node");

    let reply = tcp6(
        v6(B1_6),
        8080,
        v6(NODE6),
        40000,
        TCP_SYN | TCP_ACK,
        5000,
        1001,
        &[],
    );
    let back = node.tx(&dp, &reply);
    let v = Ipv6View::new(&back);
    assert_eq!((v.src(), v.sport()), (v6(NODE6), NODE_PORT));
    assert_eq!((v.dst(), v.dport()), (v6(OUTSIDE6), 40000));
    assert_eq!(v.dst_mac(), GATEWAY_MAC);

    let out = node.tx(&dp, &udp6(v6(OUTSIDE6), 5000, v6(NODE6), NODE_PORT, b"q"));
    let v = Ipv6View::new(&out);
    assert_eq!((v.dst(), v.dport()), (v6(B1_6), 8080));
    assert_eq!(v.payload(), b"q");
    let c = dp.counters().unwrap();
    assert_eq!(c.packets(Hook::Xdp, Reason::NewFlow), 2);
    assert_eq!(c.packets(Hook::Xdp, Reason::ReplyReverseNat), 1);
    assert_eq!(
        c.packets(Hook::TcIngress, Reason::NewFlow),
        0,
        "tc saw nothing"
    );
}

/// An ICMPv6 error of `icmp_type`/`code` from `src` to `dst` quoting
/// `quoted` (a frame: its IPv6 packet is quoted), with its checksum.
fn icmp6_error(src: [u8; 16], dst: [u8; 16], icmp_type: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let mut icmp = vec![icmp_type, code, 0, 0];
    // Packet too big carries the MTU; the others 4 unused bytes.
    let word: u32 = if icmp_type == 2 { 1280 } else { 0 };
    icmp.extend_from_slice(&word.to_be_bytes());
    icmp.extend_from_slice(&quoted[14..]);
    let mut sum = sum16(&src, 0) + sum16(&dst, 0);
    sum += icmp.len() as u32 + u32::from(IPPROTO_ICMPV6);
    let c = !fold(sum16(&icmp, sum));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&SERVER_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[IPPROTO_ICMPV6, 64]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&icmp);
    f
}

/// Translates `error` at tc ingress and returns (outer source, outer
/// destination, quoted packet), checking the ICMPv6 checksum.
fn translated_error(dp: &Datapath, error: &[u8]) -> ([u8; 16], [u8; 16], Vec<u8>) {
    let out = forward6(dp, error);
    let v = Ipv6View::new(&out);
    assert_eq!(v.protocol, IPPROTO_ICMPV6);
    (v.src(), v.dst(), v.l4()[8..].to_vec())
}

#[test]
fn icmpv6_errors_about_a_flow_are_translated_back_to_the_service() {
    let dp = setup(&[(1, B1_6)]);
    let router = v6("fd00:10:244:2::1");
    // The client's SYN as it reached the backend, and the backend's reply.
    let syn = tcp6_syn(v6(CLIENT6), 40020, v6(VIP6), 80);
    let sent = forward6(&dp, &syn);
    let reply = tcp6(
        v6(B1_6),
        8080,
        v6(CLIENT6),
        40020,
        TCP_SYN | TCP_ACK,
        9,
        1001,
        &[],
    );

    // A router on the way to the backend: packet too big, to the client.
    // The client must find its own packet in it: to the service address,
    // with its own checksum.
    let (src, dst, quote) = translated_error(&dp, &icmp6_error(router, v6(CLIENT6), 2, 0, &sent));
    assert_eq!((src, dst), (router, v6(CLIENT6)), "outer addresses kept");
    assert_eq!(quote, syn[14..], "the quote is the packet the client sent");

    // The backend itself (port unreachable): from the service address.
    let (src, dst, quote) = translated_error(&dp, &icmp6_error(v6(B1_6), v6(CLIENT6), 1, 4, &sent));
    assert_eq!((src, dst), (v6(VIP6), v6(CLIENT6)));
    assert_eq!(quote, syn[14..]);

    // The client about a reply it got from the service: to the backend,
    // quoting the reply as the backend sent it.
    let got = forward6(&dp, &reply);
    let (src, dst, quote) = translated_error(&dp, &icmp6_error(v6(CLIENT6), v6(VIP6), 1, 4, &got));
    assert_eq!((src, dst), (v6(CLIENT6), v6(B1_6)));
    assert_eq!(quote, reply[14..]);
    assert_eq!(
        packets(&dp, Hook::TcIngress, Reason::IcmpErrorTranslated),
        3
    );

    // About a flow dp does not track: passed untouched.
    let stranger = tcp6_syn(v6(CLIENT6), 40021, v6(B2_6), 8080);
    let error = icmp6_error(router, v6(CLIENT6), 2, 0, &stranger);
    assert_eq!(
        run(&dp, Hook::TcIngress, &error),
        (TC_ACT_OK, error.clone())
    );
}

#[test]
fn an_icmpv6_packet_too_big_reaches_a_masqueraded_client() {
    let dp = setup(&[(1, B1_6)]);
    let router = v6("fd00:10:244:2::1");
    let data = vec![0x55u8; 1300];
    let first = udp6(v6(OUTSIDE6), 6000, v6(VIP6), 80, &data);
    let sent = forward6(&dp, &first);
    assert_eq!(Ipv6View::new(&sent).src(), v6(NODE6), "masqueraded");
    // Routers quote as much as fits in 1 280 bytes.
    let error = icmp6_error(router, v6(NODE6), 2, 0, &sent[..14 + 1232]);
    let (src, dst, quote) = translated_error(&dp, &error);
    assert_eq!((src, dst), (router, v6(OUTSIDE6)), "to the real client");
    assert_eq!(quote, first[14..14 + 1232], "its own datagram, quoted");
}

/// The health check node ports listen on both families on one port, as
/// kube-proxy's two servers do: the IPv6 listener takes IPv6 only, so the
/// IPv4 one on the same port still binds (`[::]` alone would take both
/// with the kernel's default `bindv6only = 0`).
#[test]
fn health_check_listeners_of_both_families_share_a_port() {
    e2e::require_root();
    let mut topo = e2e::Topology::new().unwrap();
    topo.add_ns("node").unwrap();
    let ns = topo.ns("node");
    ns.ip(&["link", "set", "lo", "up"]).unwrap();
    ns.run(|| {
        use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
        let v4 = dp::agent::metrics::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))).unwrap();
        let port = v4.local_addr().unwrap().port();
        let v6 = dp::agent::metrics::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
            .expect("the IPv6 listener binds next to the IPv4 one");
        TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
        TcpStream::connect((Ipv6Addr::LOCALHOST, port)).unwrap();
        // Each connection went to its own family's listener.
        v4.set_nonblocking(false).unwrap();
        v6.set_nonblocking(false).unwrap();
        assert!(v4.accept().unwrap().1.is_ipv4());
        assert!(v6.accept().unwrap().1.is_ipv6());
    })
    .unwrap();
}

/// Backends 1..=3 (TCP :8080): B1_6, B2_6 and a third on node1's pods.
fn three_backends(dp: &mut Datapath) -> [&'static str; 3] {
    let addrs = [B1_6, B2_6, "fd00:10:244:1::7"];
    for (i, ip) in addrs.iter().enumerate() {
        dp.set_backend(i as u32 + 1, sa6(ip, 8080), IPPROTO_TCP, false)
            .unwrap();
    }
    addrs
}

#[test]
fn ipv6_source_ranges_admit_their_prefixes_only() {
    let mut dp = setup(&[]);
    three_backends(&mut dp);
    let lb = "2001:db8:ff::9";
    let slots = BackendSlots {
        ready: vec![1],
        external: true,
        source_ranges: vec![(v6("2001:db8:7::").into(), 48)],
        ..BackendSlots::default()
    };
    dp.set_service(&Frontend::tcp(sa6(lb, 443)), 40, &slots)
        .unwrap();
    let out = forward6(&dp, &tcp6_syn(v6(OUTSIDE6), 40030, v6(lb), 443));
    assert_eq!(
        Ipv6View::new(&out).dst(),
        v6(B1_6),
        "2001:db8:7::50 is in the range"
    );
    let stranger = tcp6_syn(v6("2001:db8:8::1"), 40031, v6(lb), 443);
    assert_eq!(
        run(&dp, Hook::TcIngress, &stranger),
        (TC_ACT_SHOT, stranger.clone())
    );
    assert_eq!(packets(&dp, Hook::TcIngress, Reason::SourceRangeDenied), 1);
    assert_eq!(
        dp.read_source_ranges().unwrap().get(&40),
        Some(&vec![(v6("2001:db8:7::").into(), 48)]),
        "read back as written"
    );
}

#[test]
fn ipv6_external_local_policy_keeps_the_client_address_and_the_local_backends() {
    let mut dp = setup(&[]);
    let addrs = three_backends(&mut dp);
    // Backend 3 is this node's; pods and the node use all three.
    let slots = BackendSlots {
        ready: vec![3],
        local_only: true,
        external: true,
        internal: Some((vec![1, 2, 3], vec![])),
        ..BackendSlots::default()
    };
    dp.set_service(&Frontend::tcp(sa6(NODE6, 30090)), 41, &slots)
        .unwrap();
    for port in 0..10 {
        let out = forward6(&dp, &tcp6_syn(v6(OUTSIDE6), 41000 + port, v6(NODE6), 30090));
        let v = Ipv6View::new(&out);
        assert_eq!(v.dst(), v6(addrs[2]), "outside: the local backend only");
        assert_eq!(v.src(), v6(OUTSIDE6), "the client's address kept");
    }
    let mut inside = std::collections::BTreeSet::new();
    for port in 0..40 {
        let out = forward6(&dp, &tcp6_syn(v6(CLIENT6), 42000 + port, v6(NODE6), 30090));
        inside.insert(Ipv6View::new(&out).dst());
    }
    assert_eq!(inside.len(), 3, "a pod uses every backend");
    // Without a local backend, outside traffic is dropped, not rejected.
    let slots = BackendSlots {
        ready: vec![],
        ..slots
    };
    dp.set_service(&Frontend::tcp(sa6(NODE6, 30090)), 41, &slots)
        .unwrap();
    let syn = tcp6_syn(v6(OUTSIDE6), 43000, v6(NODE6), 30090);
    assert_eq!(run(&dp, Hook::TcIngress, &syn), (TC_ACT_SHOT, syn.clone()));
    assert_eq!(packets(&dp, Hook::TcIngress, Reason::NoLocalEndpoints), 1);
}

/// iTP=Local: a ClusterIP's new flows go to this node's backends only, the
/// pod's address kept; with none here, dropped (kube-proxy's DROP for
/// "no local endpoints"), not rejected.
#[test]
fn ipv6_internal_local_policy_uses_only_the_nodes_backends() {
    let mut dp = setup(&[]);
    let addrs = three_backends(&mut dp);
    let slots = BackendSlots {
        ready: vec![3],
        local_only: true,
        ..BackendSlots::default()
    };
    dp.set_service(&Frontend::tcp(sa6(VIP6, 80)), 43, &slots)
        .unwrap();
    for port in 0..10 {
        let out = forward6(&dp, &tcp6_syn(v6(CLIENT6), 46000 + port, v6(VIP6), 80));
        let v = Ipv6View::new(&out);
        assert_eq!(v.dst(), v6(addrs[2]), "the local backend only");
        assert_eq!(v.src(), v6(CLIENT6), "the pod's address kept");
    }
    let slots = BackendSlots {
        ready: vec![],
        ..slots
    };
    dp.set_service(&Frontend::tcp(sa6(VIP6, 80)), 43, &slots)
        .unwrap();
    let syn = tcp6_syn(v6(CLIENT6), 46100, v6(VIP6), 80);
    assert_eq!(run(&dp, Hook::TcIngress, &syn), (TC_ACT_SHOT, syn.clone()));
    assert_eq!(packets(&dp, Hook::TcIngress, Reason::NoLocalEndpoints), 1);
    assert_eq!(packets(&dp, Hook::TcIngress, Reason::NoEndpoints), 0);
}

#[test]
fn ipv6_session_affinity_keeps_a_client_on_its_backend() {
    let mut dp = setup(&[]);
    three_backends(&mut dp);
    let slots = BackendSlots {
        ready: vec![1, 2, 3],
        affinity_seconds: Some(10_800),
        ..BackendSlots::default()
    };
    dp.set_service(&Frontend::tcp(sa6(VIP6, 80)), 42, &slots)
        .unwrap();
    let first = Ipv6View::new(&forward6(&dp, &tcp6_syn(v6(CLIENT6), 44000, v6(VIP6), 80))).dst();
    for port in 1..20 {
        let out = forward6(&dp, &tcp6_syn(v6(CLIENT6), 44000 + port, v6(VIP6), 80));
        assert_eq!(Ipv6View::new(&out).dst(), first, "the same backend");
    }
    assert_eq!(packets(&dp, Hook::TcIngress, Reason::NewFlowAffinity), 19);
}

#[test]
fn ipv6_terminating_backends_serve_only_when_none_is_ready() {
    let mut dp = setup(&[]);
    three_backends(&mut dp);
    let slots = BackendSlots {
        ready: vec![],
        terminating: vec![2],
        ..BackendSlots::default()
    };
    dp.set_service(&Frontend::tcp(sa6(VIP6, 80)), SERVICE_ID, &slots)
        .unwrap();
    let out = forward6(&dp, &tcp6_syn(v6(CLIENT6), 45000, v6(VIP6), 80));
    assert_eq!(
        Ipv6View::new(&out).dst(),
        v6(B2_6),
        "the terminating one, as a fallback"
    );
    let slots = BackendSlots {
        ready: vec![1],
        ..slots
    };
    dp.set_service(&Frontend::tcp(sa6(VIP6, 80)), SERVICE_ID, &slots)
        .unwrap();
    for port in 1..10 {
        let out = forward6(&dp, &tcp6_syn(v6(CLIENT6), 45000 + port, v6(VIP6), 80));
        assert_eq!(Ipv6View::new(&out).dst(), v6(B1_6), "a ready one exists");
    }
}

#[test]
fn an_ipv6_udp_flow_moves_off_a_removed_backend() {
    let mut dp = setup(&[(1, B1_6)]);
    let out = forward6(&dp, &udp6(v6(CLIENT6), 5050, v6(VIP6), 80, b"one"));
    assert_eq!(Ipv6View::new(&out).dst(), v6(B1_6));
    set_backends(&mut dp, &[(2, B2_6)]);
    dp.remove_backend(1).unwrap();
    let out = forward6(&dp, &udp6(v6(CLIENT6), 5050, v6(VIP6), 80, b"two"));
    let v = Ipv6View::new(&out);
    assert_eq!(
        (v.dst(), v.payload()),
        (v6(B2_6), &b"two"[..]),
        "moved, not lost"
    );
    assert_eq!(
        packets(&dp, Hook::TcIngress, Reason::BackendGoneRepicked),
        1
    );
    // Its replies come back from the service address.
    let reply = forward6(&dp, &udp6(v6(B2_6), 8080, v6(CLIENT6), 5050, b"ok"));
    assert_eq!(Ipv6View::new(&reply).src(), v6(VIP6));
}
