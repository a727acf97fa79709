//! The plain rendering of a trace event: addresses, protocol, TCP flags,
//! verdict and reason, without Kubernetes names (the tests and `dp trace
//! --raw`-style output use it; the named rendering is in `record`/`render`).

use std::net::IpAddr;

use common::{
    proto,
    trace::{FAMILY_IPV4, FAMILY_IPV6},
    FlowTuple, Hook, Reason, TraceEvent, Verdict,
};

/// An address of a `FlowTuple` (`None` when the packet was not IP).
pub fn tuple_addr(family: u8, bytes: &[u8; 16]) -> Option<IpAddr> {
    match family {
        FAMILY_IPV4 | FAMILY_IPV6 => Some(common::addr::ip_of(bytes)),
        _ => None,
    }
}

pub fn protocol_name(protocol: u8) -> String {
    match protocol {
        proto::IPPROTO_TCP => "TCP".into(),
        proto::IPPROTO_UDP => "UDP".into(),
        proto::IPPROTO_ICMP => "ICMP".into(),
        proto::IPPROTO_ICMPV6 => "ICMPv6".into(),
        proto::IPPROTO_SCTP => "SCTP".into(),
        p => format!("proto-{p}"),
    }
}

/// TCP flags as `SYN`, `SYN|ACK`, ...; empty when none are set.
pub fn tcp_flags_names(flags: u8) -> String {
    const NAMES: [(u8, &str); 6] = [
        (proto::TCP_SYN, "SYN"),
        (proto::TCP_ACK, "ACK"),
        (proto::TCP_PSH, "PSH"),
        (proto::TCP_FIN, "FIN"),
        (proto::TCP_RST, "RST"),
        (proto::TCP_URG, "URG"),
    ];
    NAMES
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join("|")
}

/// `10.0.0.1:41234 -> 10.0.0.2:8080 TCP SYN`, or `non-IP` when not IP.
pub fn describe_tuple(t: &FlowTuple, tcp_flags: u8) -> String {
    let (Some(src), Some(dst)) = (
        tuple_addr(t.family, &t.saddr),
        tuple_addr(t.family, &t.daddr),
    ) else {
        return "non-IP".into();
    };
    let with_port = |a: IpAddr, p: u16| match (a, t.protocol) {
        (_, proto::IPPROTO_TCP | proto::IPPROTO_UDP) => match a {
            IpAddr::V4(_) => format!("{a}:{p}"),
            IpAddr::V6(_) => format!("[{a}]:{p}"),
        },
        _ => a.to_string(),
    };
    let mut s = format!(
        "{} -> {} {}",
        with_port(src, t.sport),
        with_port(dst, t.dport),
        protocol_name(t.protocol)
    );
    if t.protocol == proto::IPPROTO_TCP && tcp_flags != 0 {
        s.push(' ');
        s.push_str(&tcp_flags_names(tcp_flags));
    }
    s
}

/// One line for a trace event, e.g.
/// `tc/ingress lxc0 10.244.1.10:41234 -> 10.96.0.10:80 TCP SYN forwarded: new
/// flow to a backend; service 1, backend 3; now 10.244.1.10:41234 -> 10.244.2.10:8080 TCP`.
pub fn describe_event(e: &TraceEvent, ifname: Option<&str>) -> String {
    let hook = Hook::from_u8(e.hook).map_or("hook?", Hook::name);
    let verdict = Verdict::from_u8(e.verdict).map_or("verdict?", Verdict::name);
    let reason = Reason::from_u32(e.reason).map_or_else(
        || format!("unknown reason {}", e.reason),
        |r| r.describe().to_string(),
    );
    let ifname = ifname.map_or_else(|| format!("if{}", e.ifindex), str::to_string);
    let mut line = format!(
        "{hook} {ifname} {} {verdict}: {reason}",
        describe_tuple(&e.original, e.tcp_flags)
    );
    if e.service_id != 0 {
        line.push_str(&format!("; service {}", e.service_id));
    }
    if e.backend_id != 0 {
        line.push_str(&format!(", backend {}", e.backend_id));
    }
    if e.translated != e.original && e.verdict == Verdict::Forward as u8 {
        line.push_str(&format!("; now {}", describe_tuple(&e.translated, 0)));
    }
    line
}
