//! Why the datapath did what it did.
//!
//! One enum of reasons for the whole datapath, shared with userspace (counters,
//! `dp trace`). A reason's number is part of the ABI between the programs,
//! pinned maps and tools: numbers are never reused or renumbered, retired
//! reasons keep their slot.

/// Where in the packet path a program ran.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    /// tc (tcx) ingress of an interface.
    TcIngress = 0,
    /// tc (tcx) egress of an interface.
    TcEgress = 1,
    /// XDP on an interface's receive path.
    Xdp = 2,
    /// The cgroup connect4 hook (socket-level load balancing): a socket's
    /// connect() to an IPv4 address, before any packet.
    SockConnect4 = 3,
    /// The same for IPv6 (and IPv4-mapped) addresses: connect6.
    SockConnect6 = 4,
    /// The cgroup sendmsg4 hook: a datagram sent on an unconnected UDP
    /// socket to an IPv4 address (sendto), before the packet exists.
    SockSendmsg4 = 5,
    /// The same for IPv6: sendmsg6.
    SockSendmsg6 = 6,
}

impl Hook {
    /// Number of hooks: the counter map has one block of reasons per hook.
    pub const COUNT: u32 = 7;
    pub const ALL: [Hook; Self::COUNT as usize] = [
        Hook::TcIngress,
        Hook::TcEgress,
        Hook::Xdp,
        Hook::SockConnect4,
        Hook::SockConnect6,
        Hook::SockSendmsg4,
        Hook::SockSendmsg6,
    ];

    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|h| *h as u8 == v)
    }

    pub fn name(self) -> &'static str {
        match self {
            Hook::TcIngress => "tc/ingress",
            Hook::TcEgress => "tc/egress",
            Hook::Xdp => "xdp",
            Hook::SockConnect4 => "sock/connect4",
            Hook::SockConnect6 => "sock/connect6",
            Hook::SockSendmsg4 => "sock/sendmsg4",
            Hook::SockSendmsg6 => "sock/sendmsg6",
        }
    }

    /// A socket hook (no packet: the decision is made for a socket call).
    pub fn is_socket(self) -> bool {
        matches!(
            self,
            Hook::SockConnect4 | Hook::SockConnect6 | Hook::SockSendmsg4 | Hook::SockSendmsg6
        )
    }
}

// Every hook is in `ALL` once, in number order: the counter map's blocks
// and the tools' tables are built from it.
const _: () = {
    let mut i = 0;
    while i < Hook::ALL.len() {
        assert!(Hook::ALL[i] as usize == i);
        i += 1;
    }
};

/// What happened to the packet.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    /// Handed to the kernel stack unchanged.
    Pass = 0,
    /// Dropped by the datapath.
    Drop = 1,
    /// Translated (DNAT, SNAT or reverse NAT) and sent on.
    Forward = 2,
    /// Dropped, and an ICMP error or TCP reset sent back to the client.
    Reject = 3,
}

impl Verdict {
    pub const ALL: [Verdict; 4] = [
        Verdict::Pass,
        Verdict::Drop,
        Verdict::Forward,
        Verdict::Reject,
    ];

    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|x| *x as u8 == v)
    }

    pub fn name(self) -> &'static str {
        match self {
            Verdict::Pass => "passed",
            Verdict::Drop => "dropped",
            Verdict::Forward => "forwarded",
            Verdict::Reject => "rejected",
        }
    }
}

/// Why a packet got its verdict. Every exit of every program carries one.
///
/// Numbers are stable (see the module comment). Slot 0 is never emitted, so an
/// all-zero record is recognisably empty.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// Retired (dp before IPv6): not an IPv4 frame. Now `NotIp`; the slot
    /// stays taken.
    NotIpv4 = 1,
    /// IP TCP, UDP or SCTP packet that matches no service: passed through.
    NoService = 2,
    /// IP with a protocol the datapath does not translate (ICMP other than
    /// errors about flows, ICMPv6 neighbour discovery, ...): passed through.
    UnsupportedProtocol = 3,
    /// A header is cut short or inconsistent (IHL < 5, total length below the
    /// header): dropped, as the stack would drop it.
    Malformed = 4,
    /// A non-first IPv4 or IPv6 fragment: no L4 header to look at, passed
    /// through.
    Fragment = 5,
    /// The headers were not in the skb's linear area and pulling them in
    /// failed (memory pressure): passed to the stack, which decides.
    HeaderPullFailed = 6,
    /// A new flow to a service: a backend was picked and the flow tracked.
    NewFlow = 7,
    /// A packet of a tracked flow, sent to its backend.
    Established = 8,
    /// A reply from a backend, translated back to the service address.
    ReplyReverseNat = 9,
    /// The service port has no usable backend: ICMP port unreachable back.
    NoEndpoints = 10,
    /// A service address on a port (or protocol) it does not serve: ICMP
    /// port unreachable back.
    PortNotServed = 11,
    /// A UDP flow whose backend was removed, moved to a live backend.
    BackendGoneRepicked = 12,
    /// A TCP flow whose backend was removed: answered with a TCP reset.
    BackendGoneReset = 13,
    /// The flow could not be tracked (conntrack table insert failed).
    ConntrackFull = 14,
    /// No free source port on the masquerade address for this flow.
    NatPortsExhausted = 15,
    /// A service slot or backend entry is missing (a writer broke the write
    /// order); dropped rather than sent to a wrong place.
    ServiceInconsistent = 16,
    /// An ICMP error about a translated flow, translated back for the client.
    IcmpErrorTranslated = 17,
    /// XDP leaves this packet to the tc programs: not something XDP serves
    /// (a reject, a backend behind another device, a flow needing repair).
    XdpPassToTc = 18,
    /// A translated packet from this host could not be routed to its backend.
    NoRouteToBackend = 19,
    /// Building the ICMP error or TCP reset failed: resizing the packet
    /// failed, or it is too short to quote.
    RejectFailed = 20,
    /// Rewriting the packet's addresses or ports failed: its headers are not
    /// where the rewrite can reach them (XDP), or an ICMP quote is too long.
    RewriteFailed = 21,
    /// The per-CPU scratch record was unavailable (an array map index that
    /// always exists; counted rather than assumed).
    ScratchUnavailable = 22,
    /// A Local traffic policy and no endpoint on this node: dropped.
    NoLocalEndpoints = 23,
    /// A LoadBalancer IP with `loadBalancerSourceRanges`, and the source is
    /// in none of them: dropped (kube-proxy's firewall chain).
    SourceRangeDenied = 24,
    /// A new flow sent to the backend the client's session affinity names.
    NewFlowAffinity = 25,
    /// Reading bytes of the packet failed: it is shorter than the headers
    /// the datapath had to read (e.g. an ICMP error quoting too little).
    PacketLoadFailed = 26,
    /// Writing bytes into the packet failed (the skb could not be made
    /// writable).
    PacketStoreFailed = 27,
    /// Updating an IP or L4 checksum with the kernel's helper failed.
    ChecksumUpdateFailed = 28,
    /// The kernel refused the redirect the datapath asked for.
    RedirectFailed = 29,
    /// An address in a Service CIDR that no Service has: dropped (kube-proxy
    /// nftables mode's "Drop traffic to unallocated ClusterIPs"), so it
    /// never leaves the node towards the default route.
    UnallocatedClusterIp = 30,
    /// From this node to one of its own addresses (e.g. its NodePort on its
    /// node IP): the kernel sends it over loopback, where no dp program
    /// runs, so no service answers. Only `dp explain` reports it (no
    /// program sees the packet) until socket-level load balancing serves it.
    NodeToOwnAddress = 31,
    /// A REJECT's ICMP port unreachable not sent: the per-CPU budget of
    /// replies the datapath builds was spent (`--reply-rate-limit`, like
    /// the kernel's `icmp_msgs_per_sec`). The packet is dropped.
    RejectRateLimited = 32,
    /// A TCP reset to a flow whose backend is gone not sent, for the same
    /// budget. The packet is dropped.
    ResetRateLimited = 33,
    /// The client's own reset of a flow whose backend was removed (but is
    /// still kept, retired, while conntrack names it): passed on to the
    /// backend, so its end of the connection closes too.
    BackendGoneClosed = 34,
    /// Not an IP frame (ARP, VLAN-tagged, ...): passed to the stack
    /// untouched.
    NotIp = 35,
    /// An IPv6 packet with more extension headers than the datapath walks
    /// (`parse::IPV6_MAX_EXT_HEADERS`, or longer than it pulls in): passed
    /// to the stack untouched, as a later fragment is.
    Ipv6HeaderChainTooLong = 36,
    /// The flow is to be masqueraded but the node has no address of the
    /// packet's family (an IPv6 flow on a node without an IPv6 address
    /// configured): dropped.
    NoNodeAddress = 37,
    /// Socket-level load balancing left a flow to a Service to the tc
    /// programs: its rules need the packet (source ranges need the
    /// client's address; a local policy without a local endpoint drops; a
    /// pod's flow that kube-proxy masquerades, hairpin included, must
    /// reach the backend from the node's address). The connect() or
    /// sendto() goes ahead untranslated.
    SockLeftToTc = 38,
    /// A TCP SYN to no service opens a connection from a client port whose
    /// reversed tuple is still the reply entry of a service flow that is
    /// closing or closed (a pod's service flows are not masqueraded, so
    /// their reply entries are keyed backend -> pod:port): the SYN passes
    /// untouched and the stale entry is deleted, so the new connection's
    /// replies are not rewritten to the service address (which the client
    /// would reset). netfilter gives such a connection another source port.
    StaleReplyEntry = 39,
}

impl Reason {
    /// Every reason, in number order.
    pub const ALL: [Reason; 39] = [
        Reason::NotIpv4,
        Reason::NoService,
        Reason::UnsupportedProtocol,
        Reason::Malformed,
        Reason::Fragment,
        Reason::HeaderPullFailed,
        Reason::NewFlow,
        Reason::Established,
        Reason::ReplyReverseNat,
        Reason::NoEndpoints,
        Reason::PortNotServed,
        Reason::BackendGoneRepicked,
        Reason::BackendGoneReset,
        Reason::ConntrackFull,
        Reason::NatPortsExhausted,
        Reason::ServiceInconsistent,
        Reason::IcmpErrorTranslated,
        Reason::XdpPassToTc,
        Reason::NoRouteToBackend,
        Reason::RejectFailed,
        Reason::RewriteFailed,
        Reason::ScratchUnavailable,
        Reason::NoLocalEndpoints,
        Reason::SourceRangeDenied,
        Reason::NewFlowAffinity,
        Reason::PacketLoadFailed,
        Reason::PacketStoreFailed,
        Reason::ChecksumUpdateFailed,
        Reason::RedirectFailed,
        Reason::UnallocatedClusterIp,
        Reason::NodeToOwnAddress,
        Reason::RejectRateLimited,
        Reason::ResetRateLimited,
        Reason::BackendGoneClosed,
        Reason::NotIp,
        Reason::Ipv6HeaderChainTooLong,
        Reason::NoNodeAddress,
        Reason::SockLeftToTc,
        Reason::StaleReplyEntry,
    ];

    pub fn from_u32(v: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|r| *r as u32 == v)
    }

    /// Whether the reason is a fault: something the datapath relies on
    /// failed (a map update, the scratch buffer, a packet write, a checksum
    /// helper, a redirect), which should never happen. The datapath also
    /// logs those (aya-log), unlike decisions about packets, which only
    /// traces show.
    pub const fn is_fault(self) -> bool {
        matches!(
            self,
            Reason::ConntrackFull
                | Reason::RejectFailed
                | Reason::RewriteFailed
                | Reason::ScratchUnavailable
                | Reason::PacketStoreFailed
                | Reason::ChecksumUpdateFailed
                | Reason::RedirectFailed
        )
    }

    /// Short stable identifier, used in JSON output and metric labels.
    pub fn id(self) -> &'static str {
        match self {
            Reason::NotIpv4 => "not_ipv4",
            Reason::NoService => "no_service",
            Reason::UnsupportedProtocol => "unsupported_protocol",
            Reason::Malformed => "malformed",
            Reason::Fragment => "fragment",
            Reason::HeaderPullFailed => "header_pull_failed",
            Reason::NewFlow => "new_flow",
            Reason::Established => "established",
            Reason::ReplyReverseNat => "reply_reverse_nat",
            Reason::NoEndpoints => "no_endpoints",
            Reason::PortNotServed => "port_not_served",
            Reason::BackendGoneRepicked => "backend_gone_repicked",
            Reason::BackendGoneReset => "backend_gone_reset",
            Reason::ConntrackFull => "conntrack_full",
            Reason::NatPortsExhausted => "nat_ports_exhausted",
            Reason::ServiceInconsistent => "service_inconsistent",
            Reason::IcmpErrorTranslated => "icmp_error_translated",
            Reason::XdpPassToTc => "xdp_pass_to_tc",
            Reason::NoRouteToBackend => "no_route_to_backend",
            Reason::RejectFailed => "reject_failed",
            Reason::RewriteFailed => "rewrite_failed",
            Reason::ScratchUnavailable => "scratch_unavailable",
            Reason::NoLocalEndpoints => "no_local_endpoints",
            Reason::SourceRangeDenied => "source_range_denied",
            Reason::NewFlowAffinity => "new_flow_affinity",
            Reason::PacketLoadFailed => "packet_load_failed",
            Reason::PacketStoreFailed => "packet_store_failed",
            Reason::ChecksumUpdateFailed => "checksum_update_failed",
            Reason::RedirectFailed => "redirect_failed",
            Reason::UnallocatedClusterIp => "unallocated_cluster_ip",
            Reason::NodeToOwnAddress => "node_to_own_address",
            Reason::RejectRateLimited => "reject_rate_limited",
            Reason::ResetRateLimited => "reset_rate_limited",
            Reason::BackendGoneClosed => "backend_gone_closed",
            Reason::NotIp => "not_ip",
            Reason::Ipv6HeaderChainTooLong => "ipv6_header_chain_too_long",
            Reason::NoNodeAddress => "no_node_address",
            Reason::SockLeftToTc => "sock_left_to_tc",
            Reason::StaleReplyEntry => "stale_reply_entry",
        }
    }

    /// The reason in words, for people.
    pub fn describe(self) -> &'static str {
        match self {
            Reason::NotIpv4 => "not IPv4 (retired: dp before IPv6)",
            Reason::NoService => "no service for this destination",
            Reason::UnsupportedProtocol => "protocol not handled by the datapath",
            Reason::Malformed => "malformed packet",
            Reason::Fragment => "non-first IP fragment",
            Reason::HeaderPullFailed => "headers could not be pulled into the linear skb",
            Reason::NewFlow => "new flow to a backend",
            Reason::Established => "established flow",
            Reason::ReplyReverseNat => "reply, reverse-NATed to the service address",
            Reason::NoEndpoints => "no endpoints",
            Reason::PortNotServed => "service address, port not served",
            Reason::BackendGoneRepicked => "backend removed, UDP flow moved to a live backend",
            Reason::BackendGoneReset => "backend removed, TCP flow reset",
            Reason::ConntrackFull => "conntrack table full",
            Reason::NatPortsExhausted => "no free masquerade port",
            Reason::ServiceInconsistent => "service entry inconsistent (mid-update)",
            Reason::IcmpErrorTranslated => "ICMP error about a service flow, translated",
            Reason::XdpPassToTc => "left to the tc programs",
            Reason::NoRouteToBackend => "no route to the backend",
            Reason::RejectFailed => "could not build the reject reply",
            Reason::RewriteFailed => "could not rewrite the packet",
            Reason::ScratchUnavailable => "per-CPU scratch unavailable",
            Reason::NoLocalEndpoints => "traffic policy Local and no endpoint on this node",
            Reason::SourceRangeDenied => "source not in the service's loadBalancerSourceRanges",
            Reason::NewFlowAffinity => "new flow to the client's session-affinity backend",
            Reason::PacketLoadFailed => {
                "could not read the packet's bytes (shorter than its headers)"
            }
            Reason::PacketStoreFailed => "could not write into the packet",
            Reason::ChecksumUpdateFailed => "could not update a checksum",
            Reason::RedirectFailed => "the kernel refused the redirect",
            Reason::UnallocatedClusterIp => "Service CIDR address that no Service has",
            Reason::NodeToOwnAddress => {
                "from this node to its own address: over loopback, not served by dp"
            }
            Reason::RejectRateLimited => "reject reply not sent: reply rate limit reached",
            Reason::ResetRateLimited => "TCP reset not sent: reply rate limit reached",
            Reason::BackendGoneClosed => "backend removed, the client's reset passed on to it",
            Reason::NotIp => "not IP",
            Reason::Ipv6HeaderChainTooLong => "more IPv6 extension headers than the datapath walks",
            Reason::NoNodeAddress => "masquerade needs a node address of this family, none set",
            Reason::SockLeftToTc => "left to the tc programs by socket-level load balancing",
            Reason::StaleReplyEntry => {
                "a new connection's SYN reuses a closing service flow's reply tuple: that entry deleted, SYN passed untouched"
            }
        }
    }
}

/// Bit `1 << n` for each reason number `n` that `Reason::is_fault`, for
/// the datapath's check on a number.
pub const FAULT_REASONS: u64 = {
    let mut mask = 0;
    let mut i = 0;
    while i < Reason::ALL.len() {
        if Reason::ALL[i].is_fault() {
            mask |= 1 << Reason::ALL[i] as u32;
        }
        i += 1;
    }
    mask
};

/// Whether reason number `reason` is a fault (`Reason::is_fault`).
#[inline(always)]
pub const fn is_fault_number(reason: u32) -> bool {
    reason < 64 && FAULT_REASONS & (1 << reason) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The numbers are an ABI (pinned maps, trace consumers): this list only
    /// ever grows.
    #[test]
    fn reason_numbers_are_stable() {
        let expected = [
            (Reason::NotIpv4, 1, "not_ipv4"),
            (Reason::NoService, 2, "no_service"),
            (Reason::UnsupportedProtocol, 3, "unsupported_protocol"),
            (Reason::Malformed, 4, "malformed"),
            (Reason::Fragment, 5, "fragment"),
            (Reason::HeaderPullFailed, 6, "header_pull_failed"),
            (Reason::NewFlow, 7, "new_flow"),
            (Reason::Established, 8, "established"),
            (Reason::ReplyReverseNat, 9, "reply_reverse_nat"),
            (Reason::NoEndpoints, 10, "no_endpoints"),
            (Reason::PortNotServed, 11, "port_not_served"),
            (Reason::BackendGoneRepicked, 12, "backend_gone_repicked"),
            (Reason::BackendGoneReset, 13, "backend_gone_reset"),
            (Reason::ConntrackFull, 14, "conntrack_full"),
            (Reason::NatPortsExhausted, 15, "nat_ports_exhausted"),
            (Reason::ServiceInconsistent, 16, "service_inconsistent"),
            (Reason::IcmpErrorTranslated, 17, "icmp_error_translated"),
            (Reason::XdpPassToTc, 18, "xdp_pass_to_tc"),
            (Reason::NoRouteToBackend, 19, "no_route_to_backend"),
            (Reason::RejectFailed, 20, "reject_failed"),
            (Reason::RewriteFailed, 21, "rewrite_failed"),
            (Reason::ScratchUnavailable, 22, "scratch_unavailable"),
            (Reason::NoLocalEndpoints, 23, "no_local_endpoints"),
            (Reason::SourceRangeDenied, 24, "source_range_denied"),
            (Reason::NewFlowAffinity, 25, "new_flow_affinity"),
            (Reason::PacketLoadFailed, 26, "packet_load_failed"),
            (Reason::PacketStoreFailed, 27, "packet_store_failed"),
            (Reason::ChecksumUpdateFailed, 28, "checksum_update_failed"),
            (Reason::RedirectFailed, 29, "redirect_failed"),
            (Reason::UnallocatedClusterIp, 30, "unallocated_cluster_ip"),
            (Reason::NodeToOwnAddress, 31, "node_to_own_address"),
            (Reason::RejectRateLimited, 32, "reject_rate_limited"),
            (Reason::ResetRateLimited, 33, "reset_rate_limited"),
            (Reason::BackendGoneClosed, 34, "backend_gone_closed"),
            (Reason::NotIp, 35, "not_ip"),
            (
                Reason::Ipv6HeaderChainTooLong,
                36,
                "ipv6_header_chain_too_long",
            ),
            (Reason::NoNodeAddress, 37, "no_node_address"),
            (Reason::SockLeftToTc, 38, "sock_left_to_tc"),
            (Reason::StaleReplyEntry, 39, "stale_reply_entry"),
        ];
        assert_eq!(Reason::ALL.len(), expected.len(), "update this list");
        for (reason, number, id) in expected {
            assert_eq!(reason as u32, number, "{reason:?}");
            assert_eq!(reason.id(), id);
            assert_eq!(Reason::from_u32(number), Some(reason));
        }
        assert_eq!(Reason::from_u32(0), None, "0 means no reason");
    }

    #[test]
    fn faults_by_number_are_the_faults() {
        for r in Reason::ALL {
            assert_eq!(is_fault_number(r as u32), r.is_fault(), "{r:?}");
        }
        assert!(!is_fault_number(0));
        assert!(!is_fault_number(64));
        assert!(Reason::PacketStoreFailed.is_fault());
        // Decisions about packets, which a sender can cause, are not faults.
        assert!(!Reason::PacketLoadFailed.is_fault());
        assert!(!Reason::NoRouteToBackend.is_fault());
    }

    #[test]
    fn ids_are_unique() {
        let mut ids: Vec<_> = Reason::ALL.iter().map(|r| r.id()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), Reason::ALL.len());
    }

    #[test]
    fn hooks_and_verdicts_round_trip() {
        for h in Hook::ALL {
            assert_eq!(Hook::from_u8(h as u8), Some(h));
        }
        for v in Verdict::ALL {
            assert_eq!(Verdict::from_u8(v as u8), Some(v));
        }
        assert_eq!(Hook::ALL.len() as u32, Hook::COUNT);
    }
}
