//! BPF_PROG_TEST_RUN tests: the real programs, verified and run by the kernel
//! on crafted frames. Each test loads its own object, so maps are private.

mod support;

use common::{proto, trace::FAMILY_IPV4, Hook, Reason, TraceEvent, Verdict};
use etherparse::PacketBuilder;
use support::{
    fix_ipv4_checksum, load, run, CLIENT_MAC, SERVER_MAC, TC_ACT_OK, TC_ACT_SHOT, XDP_DROP,
    XDP_PASS,
};

const CLIENT_IP: [u8; 4] = [10, 244, 1, 5];
const SERVER_IP: [u8; 4] = [10, 96, 0, 20];

fn tcp_syn() -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
        .ipv4(CLIENT_IP, SERVER_IP, 64)
        .tcp(41234, 5432, 1000, 64240)
        .syn();
    let mut v = Vec::with_capacity(b.size(0));
    b.write(&mut v, &[]).unwrap();
    v
}

fn udp(payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
        .ipv4(CLIENT_IP, SERVER_IP, 64)
        .udp(53000, 53);
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload).unwrap();
    v
}

fn icmp_echo() -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
        .ipv4(CLIENT_IP, SERVER_IP, 64)
        .icmpv4_echo_request(7, 1);
    let mut v = Vec::new();
    b.write(&mut v, b"ping").unwrap();
    v
}

fn ipv6_udp() -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
        .ipv6([0xfd; 16], [0xfe; 16], 64)
        .udp(1, 2);
    let mut v = Vec::new();
    b.write(&mut v, b"v6").unwrap();
    v
}

fn arp_request() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&[0xff; 6]);
    v.extend_from_slice(&CLIENT_MAC);
    v.extend_from_slice(&0x0806u16.to_be_bytes());
    // htype 1, ptype IPv4, hlen 6, plen 4, op request
    v.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    v.extend_from_slice(&CLIENT_MAC);
    v.extend_from_slice(&CLIENT_IP);
    v.extend_from_slice(&[0; 6]);
    v.extend_from_slice(&SERVER_IP);
    v
}

/// A TCP SYN whose IPv4 header carries 4 bytes of options (IHL 6).
fn tcp_syn_with_ip_options() -> Vec<u8> {
    let mut f = tcp_syn();
    let opts = [1u8, 1, 1, 0]; // NOP NOP NOP EOL
    f.splice(34..34, opts);
    f[14] = 0x46;
    let tot = u16::from_be_bytes([f[16], f[17]]) + 4;
    f[16..18].copy_from_slice(&tot.to_be_bytes());
    fix_ipv4_checksum(&mut f);
    f
}

/// A later fragment (offset 1480 bytes) of a UDP datagram: no UDP header.
fn udp_later_fragment() -> Vec<u8> {
    let mut f = udp(&[0xab; 32]);
    let frag_off: u16 = 1480 / 8;
    f[20..22].copy_from_slice(&frag_off.to_be_bytes());
    fix_ipv4_checksum(&mut f);
    f
}

struct Case {
    name: &'static str,
    frame: Vec<u8>,
    verdict: Verdict,
    reason: Reason,
    /// BPF_PROG_TEST_RUN builds an skb for tc programs and refuses (EINVAL)
    /// an IPv4 ethertype with less than a full IPv4 header; such frames are
    /// run through XDP only.
    skb_test_run: bool,
}

fn cases() -> Vec<Case> {
    let mut truncated_ip = tcp_syn();
    truncated_ip.truncate(14 + 10);
    let mut truncated_tcp = tcp_syn();
    truncated_tcp.truncate(14 + 20 + 8);
    let mut short_ihl = tcp_syn();
    short_ihl[14] = 0x44;
    fix_ipv4_checksum(&mut short_ihl);
    let mut wrong_version = tcp_syn();
    wrong_version[14] = 0x65;
    let mut truncated_udp = udp(b"");
    truncated_udp.truncate(14 + 20 + 4);
    let pass = Verdict::Pass;
    let drop = Verdict::Drop;
    vec![
        Case {
            name: "tcp syn",
            frame: tcp_syn(),
            verdict: pass,
            reason: Reason::NoService,
            skb_test_run: true,
        },
        Case {
            name: "udp",
            frame: udp(b"query"),
            verdict: pass,
            reason: Reason::NoService,
            skb_test_run: true,
        },
        Case {
            name: "udp, empty payload",
            frame: udp(b""),
            verdict: pass,
            reason: Reason::NoService,
            skb_test_run: true,
        },
        Case {
            name: "tcp, ip options",
            frame: tcp_syn_with_ip_options(),
            verdict: pass,
            reason: Reason::NoService,
            skb_test_run: true,
        },
        Case {
            name: "arp",
            frame: arp_request(),
            verdict: pass,
            reason: Reason::NotIp,
            skb_test_run: true,
        },
        Case {
            name: "ipv6 udp",
            frame: ipv6_udp(),
            verdict: pass,
            reason: Reason::NoService,
            skb_test_run: true,
        },
        Case {
            name: "icmp echo",
            frame: icmp_echo(),
            verdict: pass,
            reason: Reason::UnsupportedProtocol,
            skb_test_run: true,
        },
        Case {
            name: "later fragment",
            frame: udp_later_fragment(),
            verdict: pass,
            reason: Reason::Fragment,
            skb_test_run: true,
        },
        Case {
            name: "ipv4 header cut short",
            frame: truncated_ip,
            verdict: drop,
            reason: Reason::Malformed,
            skb_test_run: false,
        },
        Case {
            name: "tcp header cut short",
            frame: truncated_tcp,
            verdict: drop,
            reason: Reason::Malformed,
            skb_test_run: true,
        },
        Case {
            name: "udp header cut short",
            frame: truncated_udp,
            verdict: drop,
            reason: Reason::Malformed,
            skb_test_run: true,
        },
        Case {
            name: "ihl 4",
            frame: short_ihl,
            verdict: drop,
            reason: Reason::Malformed,
            skb_test_run: true,
        },
        Case {
            name: "version 6 in an IPv4 frame",
            frame: wrong_version,
            verdict: drop,
            reason: Reason::Malformed,
            skb_test_run: true,
        },
    ]
}

fn expected_return(hook: Hook, verdict: Verdict) -> u32 {
    match (hook, verdict) {
        (Hook::Xdp, Verdict::Pass | Verdict::Forward) => XDP_PASS,
        (Hook::Xdp, Verdict::Drop | Verdict::Reject) => XDP_DROP,
        (_, Verdict::Pass | Verdict::Forward) => TC_ACT_OK,
        (_, Verdict::Drop | Verdict::Reject) => TC_ACT_SHOT,
    }
}

/// XDP decides TCP/UDP like tc (no service here: passed); ICMP is left to
/// tc, which translates errors about flows.
fn expected_reason(hook: Hook, reason: Reason) -> Reason {
    match (hook, reason) {
        (Hook::Xdp, Reason::UnsupportedProtocol) => Reason::XdpPassToTc,
        (_, r) => r,
    }
}

/// Each crafted frame, at each hook: return code, frame untouched, exactly one
/// packet counted under the expected (hook, reason) with its length in bytes.
fn check_hook(hook: Hook) {
    for case in cases() {
        let dp = load();
        if hook != Hook::Xdp && !case.skb_test_run {
            continue;
        }
        let (ret, out) = run(&dp, hook, &case.frame);
        assert_eq!(
            ret,
            expected_return(hook, case.verdict),
            "{}: {} return code",
            case.name,
            hook.name()
        );
        if case.verdict == Verdict::Pass {
            assert_eq!(
                out, case.frame,
                "{}: the frame must pass unchanged",
                case.name
            );
        }
        let counters = dp.counters().unwrap();
        assert_eq!(
            counters.total_packets(),
            1,
            "{}: exactly one counter hit, got {:?}",
            case.name,
            counters.by_reason
        );
        let reason = expected_reason(hook, case.reason);
        assert_eq!(counters.packets(hook, reason), 1, "{}: reason", case.name);
        assert_eq!(
            counters.bytes(hook, reason),
            case.frame.len() as u64,
            "{}: bytes",
            case.name
        );
    }
}

#[test]
fn tc_ingress_verdicts_and_counters() {
    check_hook(Hook::TcIngress);
}

#[test]
fn tc_egress_verdicts_and_counters() {
    check_hook(Hook::TcEgress);
}

#[test]
fn xdp_verdicts_and_counters() {
    check_hook(Hook::Xdp);
}

#[test]
fn counters_accumulate_over_packets() {
    let dp = load();
    let frames = [tcp_syn(), udp(b"a"), udp(b"bb"), arp_request()];
    for f in &frames {
        run(&dp, Hook::TcIngress, f);
    }
    let c = dp.counters().unwrap();
    assert_eq!(c.packets(Hook::TcIngress, Reason::NoService), 3);
    assert_eq!(
        c.bytes(Hook::TcIngress, Reason::NoService),
        (frames[0].len() + frames[1].len() + frames[2].len()) as u64
    );
    assert_eq!(c.packets(Hook::TcIngress, Reason::NotIp), 1);
    assert_eq!(c.total_packets(), 4);
}

#[test]
fn no_trace_events_while_tracing_is_off() {
    let mut dp = load();
    for slot in 0..common::trace::TRACE_SESSIONS {
        assert_eq!(
            dp.trace_session(slot).unwrap().active,
            0,
            "no trace session is open by default"
        );
    }
    let mut reader = dp.trace_reader().unwrap();
    run(&dp, Hook::TcIngress, &tcp_syn());
    run(&dp, Hook::Xdp, &udp(b"x"));
    assert!(reader.drain().is_empty());
    assert_eq!(
        dp.counters().unwrap().total_packets(),
        2,
        "counters stay on"
    );
}

#[test]
fn trace_events_describe_each_packet() {
    let mut dp = load();
    dp.set_tracing(true).unwrap();
    let mut reader = dp.trace_reader().unwrap();
    let syn = tcp_syn();
    let mut short = tcp_syn();
    short.truncate(30);
    run(&dp, Hook::TcIngress, &syn);
    run(&dp, Hook::Xdp, &short);
    run(&dp, Hook::TcEgress, &udp(b"abc"));
    let events: Vec<TraceEvent> = reader.drain();
    assert_eq!(events.len(), 3, "{events:?}");

    let e = &events[0];
    assert_eq!(e.hook, Hook::TcIngress as u8);
    assert_eq!(e.verdict, Verdict::Pass as u8);
    assert_eq!(e.reason, Reason::NoService as u32);
    assert_eq!(e.packet_len, syn.len() as u32);
    assert_eq!(e.tcp_flags, 0x02, "SYN");
    assert_ne!(e.timestamp_ns, 0);
    let t = e.original;
    assert_eq!((t.family, t.protocol), (FAMILY_IPV4, proto::IPPROTO_TCP));
    assert_eq!(t.saddr, common::addr::v4_mapped(CLIENT_IP));
    assert_eq!(t.daddr, common::addr::v4_mapped(SERVER_IP));
    assert_eq!(e.translated, e.original, "not translated");
    assert_eq!((e.service_id, e.backend_id), (0, 0));
    assert_eq!((t.sport, t.dport), (41234, 5432));
    assert_eq!(
        dp::inspect::trace::describe::describe_event(e, Some("lxc0")),
        "tc/ingress lxc0 10.244.1.5:41234 -> 10.96.0.20:5432 TCP SYN passed: no service for this destination"
    );

    let e = &events[1];
    assert_eq!(e.hook, Hook::Xdp as u8, "{e:?}");
    assert_eq!(e.verdict, Verdict::Drop as u8);
    assert_eq!(e.reason, Reason::Malformed as u32);
    assert_eq!(e.packet_len, 30);

    let e = &events[2];
    assert_eq!(e.hook, Hook::TcEgress as u8);
    assert_eq!(e.original.protocol, proto::IPPROTO_UDP);
    assert_eq!((e.original.sport, e.original.dport), (53000, 53));
    assert!(events
        .windows(2)
        .all(|w| w[0].timestamp_ns <= w[1].timestamp_ns));
    assert_eq!(dp.trace_lost().unwrap(), 0);

    // Turning tracing off stops the events; the counters go on.
    dp.set_tracing(false).unwrap();
    run(&dp, Hook::TcIngress, &syn);
    assert!(reader.drain().is_empty());
    assert_eq!(dp.counters().unwrap().total_packets(), 4);
}
