//! The datapath's rules for a packet, as pure functions over the common
//! types: the programs (`dataplane-ebpf/src/service.rs`, `lb.rs`,
//! `conntrack.rs`) and `dp explain` (`controller/src/inspect/pinned.rs`) decide
//! with these same functions, so the two cannot drift apart. The map
//! lookups stay with each caller (BPF maps there, pinned maps here); where
//! a rule decides whether a lookup happens at all, it takes it as a
//! closure.
//!
//! The order of a new flow, as both apply it: the frontend
//! ([`frontend`]; not a service address: [`unallocated_cluster_ip`]), its
//! source ranges ([`source_ranges_apply`]), the scope
//! ([`internal_scope`]), session affinity ([`affinity_backend`]), else the
//! eligible backends ([`eligible`]) or, with none, [`no_endpoints`]; then
//! masquerade ([`masquerade`], [`reaches_this_node`]).

use crate::{
    addr::{in_prefix, is_v4_mapped},
    config::{CONFIG_MASQUERADE_ALL, SERVICE_CIDR_SLOTS},
    ct::{CT_STATE_CLOSED, CT_STATE_CLOSING},
    lb::{
        SERVICE_FLAG_AFFINITY, SERVICE_FLAG_EXTERNAL, SERVICE_FLAG_INTERNAL_SCOPE,
        SERVICE_FLAG_LOCAL_ONLY, SERVICE_FLAG_REJECT_UNSERVED, SERVICE_FLAG_SOURCE_RANGES,
        SERVICE_FLAG_WILDCARD,
    },
    proto::IPPROTO_TCP,
    AffinityValue, Backend, CtEntry, DatapathConfig, Reason, ServiceValue, Verdict,
};

const NS_PER_SEC: u64 = 1_000_000_000;

/// What a destination is for the service maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frontend<T> {
    /// Not a service address, or a port of a node, external or
    /// LoadBalancer address that no Service uses: left to the stack.
    NotAService,
    /// A ClusterIP, but not this port and protocol: rejected.
    PortNotServed,
    /// The frontend (what `master` returned).
    Found(T),
}

/// The frontend for a destination, from the flags of its address's wildcard
/// entry (`None`: no entry) and, only for a service address, its master
/// entry for the port and protocol. kube-proxy rejects the ports a
/// ClusterIP does not serve (the wildcard carries
/// `SERVICE_FLAG_REJECT_UNSERVED`) and leaves other addresses' to the host.
#[inline(always)]
pub fn frontend<T>(wildcard_flags: Option<u16>, master: impl FnOnce() -> Option<T>) -> Frontend<T> {
    match wildcard_flags {
        Some(flags) if flags & SERVICE_FLAG_WILDCARD != 0 => match master() {
            Some(m) => Frontend::Found(m),
            None if flags & SERVICE_FLAG_REJECT_UNSERVED != 0 => Frontend::PortNotServed,
            None => Frontend::NotAService,
        },
        _ => Frontend::NotAService,
    }
}

/// Whether `daddr`, which no Service has, is in a Service CIDR: kube-proxy's
/// nftables mode drops such traffic ("Drop traffic to unallocated
/// ClusterIPs"), so it never leaves the node towards the default route.
/// Known ClusterIPs on ports they do not serve were rejected before
/// (`Frontend::PortNotServed`); nothing is dropped while no CIDR is known.
#[inline(always)]
pub fn unallocated_cluster_ip(cfg: &DatapathConfig, daddr: &[u8; 16]) -> bool {
    let mut i = 0;
    while i < SERVICE_CIDR_SLOTS {
        let len = cfg.service_cidr_lens[i];
        if len != 0 && in_prefix(daddr, &cfg.service_cidrs[i], len) {
            return true;
        }
        i += 1;
    }
    false
}

/// Whether the source must be in the frontend's `loadBalancerSourceRanges`
/// (`DP_SRC_RANGES`); outside them the packet is dropped
/// (`SourceRangeDenied`), whoever sends it (kube-proxy filters before DNAT).
#[inline(always)]
pub fn source_ranges_apply(master: &ServiceValue) -> bool {
    master.flags & SERVICE_FLAG_SOURCE_RANGES != 0
}

/// Where a new flow comes from, as the rules see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    /// This node: a local process, or the node's address as source.
    pub from_host: bool,
    /// The source is in the cluster CIDR (a pod).
    pub from_pod: bool,
    /// A process on this node, its packet seen at tc egress.
    pub local_process: bool,
    /// The cluster CIDR of the source's family is set (without it, nothing
    /// is masqueraded for coming from outside it).
    pub cluster_cidr_known: bool,
}

impl Origin {
    /// The origin of a packet from `saddr`; `local_process`: seen at tc
    /// egress, so sent by this node. Each family has its own node address
    /// and cluster CIDR, as kube-proxy runs one proxier per family.
    #[inline(always)]
    pub fn of(cfg: &DatapathConfig, saddr: &[u8; 16], local_process: bool) -> Self {
        let v6 = !is_v4_mapped(saddr);
        let (cidr, len) = if v6 {
            (&cfg.cluster_cidr6, cfg.cluster_cidr6_len)
        } else {
            (&cfg.cluster_cidr, cfg.cluster_cidr_len)
        };
        Origin {
            from_host: local_process || *saddr == *node_address(cfg, v6),
            from_pod: len != 0 && in_prefix(saddr, cidr, len),
            local_process,
            cluster_cidr_known: len != 0,
        }
    }
}

/// The node's address of a family (`v6`: IPv6): the masquerade source. All
/// zero when the node has none of that family.
#[inline(always)]
pub fn node_address(cfg: &DatapathConfig, v6: bool) -> &[u8; 16] {
    if v6 {
        &cfg.node_ip6
    } else {
        &cfg.node_ip
    }
}

/// Whether the flow uses the frontend's cluster-wide backends (the
/// `SCOPE_INTERNAL` master) rather than its own: eTP=Local frontends keep
/// external clients on this node's endpoints, but traffic from pods and
/// the node itself goes anywhere in the cluster.
#[inline(always)]
pub fn internal_scope(frontend: &ServiceValue, origin: Origin) -> bool {
    frontend.flags & SERVICE_FLAG_INTERNAL_SCOPE != 0 && (origin.from_host || origin.from_pod)
}

/// The backend slots a new flow picks from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Eligible {
    /// First slot (`ServiceKey::slot`) of the run.
    pub first_slot: u16,
    pub count: u16,
    /// The serving-terminating backends (no ready one exists).
    pub terminating: bool,
}

/// The backends a new flow may go to: the ready ones (slots
/// `1..=count`); if none is ready, the serving-terminating ones
/// (kube-proxy's fallback); `None` if there are neither.
#[inline(always)]
pub fn eligible(master: &ServiceValue) -> Option<Eligible> {
    if master.count > 0 {
        Some(Eligible {
            first_slot: 1,
            count: master.count,
            terminating: false,
        })
    } else if master.terminating_count > 0 {
        Some(Eligible {
            first_slot: master.count + 1,
            count: master.terminating_count,
            terminating: true,
        })
    } else {
        None
    }
}

/// What happens to a new flow without eligible backends: a Local traffic
/// policy drops it (`NoLocalEndpoints`), anything else rejects it
/// (`NoEndpoints`, ICMP port unreachable), as kube-proxy does. `master`:
/// the one the backends were looked for in.
#[inline(always)]
pub fn no_endpoints(master: &ServiceValue) -> (Verdict, Reason) {
    if master.flags & SERVICE_FLAG_LOCAL_ONLY != 0 {
        (Verdict::Drop, Reason::NoLocalEndpoints)
    } else {
        (Verdict::Reject, Reason::NoEndpoints)
    }
}

/// Whether the frontend has `sessionAffinity: ClientIP`.
#[inline(always)]
pub fn has_affinity(master: &ServiceValue) -> bool {
    master.flags & SERVICE_FLAG_AFFINITY != 0
}

/// The backend a client's session-affinity record sends its new flow to:
/// the record is younger than the timeout (counted from the client's last
/// new flow, like `recent --rcheck --seconds`), its backend still exists
/// (`backend` looks it up, only for a live record) and is not terminating
/// while ready backends exist (kube-proxy checks affinity only against the
/// endpoints in the chain).
#[inline(always)]
pub fn affinity_backend(
    master: &ServiceValue,
    record: &AffinityValue,
    now_ns: u64,
    internal: bool,
    member: impl FnOnce(u32) -> Option<u8>,
    backend: impl FnOnce(u32) -> Option<Backend>,
) -> Option<Backend> {
    use crate::lb::{
        MEMBER_INTERNAL_READY, MEMBER_INTERNAL_TERMINATING, MEMBER_READY, MEMBER_TERMINATING,
    };
    let timeout = u64::from(master.affinity_timeout_s) * NS_PER_SEC;
    if now_ns.saturating_sub(record.last_used_ns) > timeout {
        return None;
    }
    // Only a backend that is still in the slots this flow picks from
    // (kube-proxy's `recent` checks exist for the chain's current
    // endpoints only: an eTP=Local frontend's external clients see its
    // local endpoints), and a terminating one only while no ready one
    // exists.
    let m = member(record.backend_id)?;
    let (ready, terminating) = if internal {
        (MEMBER_INTERNAL_READY, MEMBER_INTERNAL_TERMINATING)
    } else {
        (MEMBER_READY, MEMBER_TERMINATING)
    };
    if m & ready == 0 && (m & terminating == 0 || master.count > 0) {
        return None;
    }
    backend(record.backend_id)
}

/// Whether a backend at `backend_addr` is this node reached by local
/// delivery: a host-network endpoint, for a packet that arrived from
/// elsewhere (a local process's packet, at tc egress, is not delivered so).
#[inline(always)]
pub fn reaches_this_node(cfg: &DatapathConfig, backend_addr: &[u8; 16], origin: Origin) -> bool {
    !origin.local_process && *backend_addr == *node_address(cfg, !is_v4_mapped(backend_addr))
}

/// Whether a new flow is masqueraded (source -> the node's address).
/// kube-proxy: external destinations (NodePort, externalIP, LoadBalancer)
/// masquerade everything with eTP=Cluster and only the host's own traffic
/// with eTP=Local; ClusterIPs masquerade what comes from outside the
/// cluster CIDR (or everything with `--masquerade-all`); hairpin traffic
/// (the client is the backend) always. Never a flow to this node itself
/// (`to_this_node`, see [`reaches_this_node`]): local delivery skips
/// kube-proxy's POSTROUTING, and the node's address as source would be a
/// martian there (`accept_local = 0`). `frontend_flags`: the flags of the
/// frontend's own master (not its internal-scope one).
#[inline(always)]
pub fn masquerade(
    cfg: &DatapathConfig,
    frontend_flags: u16,
    origin: Origin,
    hairpin: bool,
    to_this_node: bool,
) -> bool {
    let by_policy = if frontend_flags & SERVICE_FLAG_EXTERNAL != 0 {
        frontend_flags & SERVICE_FLAG_INTERNAL_SCOPE == 0 || origin.from_host
    } else {
        cfg.flags & CONFIG_MASQUERADE_ALL != 0 || (origin.cluster_cidr_known && !origin.from_pod)
    };
    !to_this_node && (hairpin || by_policy)
}

/// How long an entry of `protocol` in `state` lives past its last packet
/// (the conntrack timeouts, as the kernel's and kube-proxy's).
#[inline(always)]
pub fn ct_lifetime_ns(protocol: u8, state: u8, t: &crate::CtTimeouts) -> u64 {
    use crate::{
        ct::{CT_STATE_ESTABLISHED, CT_STATE_NEW},
        proto::IPPROTO_SCTP,
    };
    let secs = match (protocol, state) {
        (IPPROTO_TCP, CT_STATE_NEW) => t.tcp_syn,
        (IPPROTO_TCP, CT_STATE_ESTABLISHED) => t.tcp_established,
        (IPPROTO_TCP, _) => t.tcp_closing,
        // An association lives like a TCP connection once answered (its
        // heartbeats keep it fresh); its chunks are not followed.
        (IPPROTO_SCTP, CT_STATE_ESTABLISHED) => t.tcp_established,
        (_, CT_STATE_NEW) => t.udp,
        _ => t.udp_replied,
    };
    u64::from(secs) * NS_PER_SEC
}

/// When an entry last saw a packet (CLOCK_MONOTONIC ns): its deadline less
/// its lifetime. What "most recently used" means when a smaller conntrack
/// keeps only some of the entries.
pub fn ct_last_used_ns(protocol: u8, entry: &CtEntry, t: &crate::CtTimeouts) -> u64 {
    entry
        .expires_ns
        .saturating_sub(ct_lifetime_ns(protocol, entry.state, t))
}

/// Whether a conntrack entry is live at `now_ns`: an expired one counts as
/// absent (the GC deletes it later).
#[inline(always)]
pub fn ct_live(entry: &CtEntry, now_ns: u64) -> bool {
    entry.expires_ns > now_ns
}

/// Whether a flow in `state` is ending (FIN or RST seen): a new SYN on its
/// original direction starts a new flow instead.
#[inline(always)]
pub fn ct_closing(state: u8) -> bool {
    state == CT_STATE_CLOSING || state == CT_STATE_CLOSED
}

/// How long a reset flow must have been quiet before its masquerade port
/// goes to a new flow: a connection that goes on after a RST its peer
/// ignored (out of window) keeps refreshing its entries, so it keeps its
/// port.
pub const NAT_PORT_REUSE_QUIET_NS: u64 = NS_PER_SEC;

/// Whether an existing entry leaves its tuple (the masquerade port towards
/// its backend) free for a new flow: it expired, or it was reset and has
/// been quiet for `NAT_PORT_REUSE_QUIET_NS` (a reset leaves neither end
/// with state for the tuple, no TIME_WAIT). Without this a client making
/// short connections at a few thousand per second ran out of ports, each
/// closed flow holding one for `tcp_closing` seconds.
#[inline(always)]
pub fn frees_nat_port(entry: &CtEntry, now_ns: u64, tcp_closing_s: u32) -> bool {
    if !ct_live(entry, now_ns) {
        return true;
    }
    let last_seen = entry
        .expires_ns
        .saturating_sub(u64::from(tcp_closing_s) * NS_PER_SEC);
    entry.state == CT_STATE_CLOSED && now_ns.saturating_sub(last_seen) >= NAT_PORT_REUSE_QUIET_NS
}

/// A tracked flow whose backend is gone: TCP is reset
/// (`BackendGoneReset`), anything else moves to a live backend
/// (`BackendGoneRepicked`).
#[inline(always)]
pub fn resets_when_backend_gone(protocol: u8) -> bool {
    protocol == IPPROTO_TCP
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{addr::v4_mapped, proto::IPPROTO_UDP};

    const NODE: [u8; 4] = [172, 18, 0, 2];

    fn cfg() -> DatapathConfig {
        DatapathConfig {
            node_ip: v4_mapped(NODE),
            cluster_cidr: v4_mapped([10, 244, 0, 0]),
            cluster_cidr_len: 96 + 16,
            ..DatapathConfig::default()
        }
    }

    fn master(flags: u16, count: u16, terminating_count: u16) -> ServiceValue {
        ServiceValue {
            flags,
            count,
            terminating_count,
            ..ServiceValue::default()
        }
    }

    #[test]
    fn frontends_and_unserved_ports() {
        let wildcard = SERVICE_FLAG_WILDCARD;
        let cluster_ip = SERVICE_FLAG_WILDCARD | SERVICE_FLAG_REJECT_UNSERVED;
        assert_eq!(frontend(None, || Some(1)), Frontend::NotAService);
        assert_eq!(frontend(Some(0), || Some(1)), Frontend::NotAService);
        assert_eq!(frontend(Some(wildcard), || Some(1)), Frontend::Found(1));
        assert_eq!(frontend(Some(cluster_ip), || Some(1)), Frontend::Found(1));
        assert_eq!(
            frontend(Some(cluster_ip), || None::<u8>),
            Frontend::PortNotServed
        );
        assert_eq!(
            frontend(Some(wildcard), || None::<u8>),
            Frontend::NotAService,
            "node, external and LB addresses leave other ports to the host"
        );
        // No master lookup for an address that is not a service address.
        let mut looked = false;
        let _ = frontend(None, || {
            looked = true;
            Some(1)
        });
        assert!(!looked);
    }

    #[test]
    fn unallocated_cluster_ips_are_those_in_a_known_service_cidr() {
        let mut c = cfg();
        let ip = v4_mapped([10, 96, 7, 7]);
        assert!(!unallocated_cluster_ip(&c, &ip), "no CIDR known: nothing");
        c.service_cidrs[1] = v4_mapped([10, 96, 0, 0]);
        c.service_cidr_lens[1] = 96 + 12;
        assert!(unallocated_cluster_ip(&c, &ip));
        assert!(unallocated_cluster_ip(&c, &v4_mapped([10, 111, 255, 255])));
        assert!(!unallocated_cluster_ip(&c, &v4_mapped([10, 112, 0, 0])));
        assert!(!unallocated_cluster_ip(&c, &v4_mapped([10, 244, 1, 5])));
    }

    #[test]
    fn origins() {
        let c = cfg();
        let pod = Origin::of(&c, &v4_mapped([10, 244, 1, 5]), false);
        assert_eq!((pod.from_host, pod.from_pod), (false, true));
        let node = Origin::of(&c, &v4_mapped(NODE), false);
        assert_eq!((node.from_host, node.from_pod), (true, false));
        let outside = Origin::of(&c, &v4_mapped([192, 168, 7, 50]), false);
        assert_eq!((outside.from_host, outside.from_pod), (false, false));
        let local = Origin::of(&c, &v4_mapped([192, 168, 7, 50]), true);
        assert!(local.from_host && local.local_process);
        let no_cidr = DatapathConfig {
            cluster_cidr_len: 0,
            ..c
        };
        assert!(!Origin::of(&no_cidr, &v4_mapped([10, 244, 1, 5]), false).from_pod);
    }

    fn v6(s: &str) -> [u8; 16] {
        s.parse::<core::net::Ipv6Addr>().unwrap().octets()
    }

    /// Each family has its own node address and cluster CIDR, as kube-proxy
    /// has one proxier per family.
    #[test]
    fn each_family_has_its_own_node_address_and_cluster_cidr() {
        let v4_only = cfg();
        // An IPv6 source on a node with only the IPv4 CIDR: not a pod, and
        // nothing to masquerade it for.
        let o = Origin::of(&v4_only, &v6("fd00:10:244:1::5"), false);
        assert_eq!(
            (o.from_host, o.from_pod, o.cluster_cidr_known),
            (false, false, false)
        );
        assert!(!masquerade(&v4_only, 0, o, false, false));

        let dual = DatapathConfig {
            node_ip6: v6("fc00:f853:ccd:e793::2"),
            cluster_cidr6: v6("fd00:10:244::"),
            cluster_cidr6_len: 56,
            ..cfg()
        };
        let pod6 = Origin::of(&dual, &v6("fd00:10:244:1::5"), false);
        assert_eq!((pod6.from_host, pod6.from_pod), (false, true));
        assert!(!masquerade(&dual, 0, pod6, false, false));
        let outside6 = Origin::of(&dual, &v6("2001:db8::7"), false);
        assert_eq!(
            (outside6.from_pod, outside6.cluster_cidr_known),
            (false, true)
        );
        assert!(masquerade(&dual, 0, outside6, false, false));
        let node6 = Origin::of(&dual, &v6("fc00:f853:ccd:e793::2"), false);
        assert!(node6.from_host && !node6.from_pod);
        // The IPv4 side is unchanged by the IPv6 settings.
        let pod4 = Origin::of(&dual, &v4_mapped([10, 244, 1, 5]), false);
        assert_eq!((pod4.from_host, pod4.from_pod), (false, true));
        assert!(!Origin::of(&dual, &v4_mapped([10, 244, 1, 5]), false).from_host);
        assert_eq!(node_address(&dual, true), &dual.node_ip6);
        assert_eq!(node_address(&dual, false), &dual.node_ip);
        // A host-network IPv6 endpoint on this node is reached locally.
        assert!(reaches_this_node(&dual, &dual.node_ip6, outside6));
        assert!(!reaches_this_node(&dual, &v6("fd00:10:244:1::5"), outside6));
    }

    #[test]
    fn scope_source_ranges_and_affinity_flags() {
        let c = cfg();
        let etp_local = master(SERVICE_FLAG_EXTERNAL | SERVICE_FLAG_INTERNAL_SCOPE, 1, 0);
        let pod = Origin::of(&c, &v4_mapped([10, 244, 1, 5]), false);
        let host = Origin::of(&c, &v4_mapped(NODE), false);
        let outside = Origin::of(&c, &v4_mapped([192, 168, 7, 50]), false);
        assert!(internal_scope(&etp_local, pod));
        assert!(internal_scope(&etp_local, host));
        assert!(!internal_scope(&etp_local, outside));
        assert!(!internal_scope(&master(SERVICE_FLAG_EXTERNAL, 1, 0), pod));
        assert!(source_ranges_apply(&master(
            SERVICE_FLAG_SOURCE_RANGES,
            1,
            0
        )));
        assert!(!source_ranges_apply(&etp_local));
        assert!(has_affinity(&master(SERVICE_FLAG_AFFINITY, 1, 0)));
        assert!(!has_affinity(&etp_local));
    }

    #[test]
    fn ready_then_terminating_then_none() {
        assert_eq!(
            eligible(&master(0, 2, 3)),
            Some(Eligible {
                first_slot: 1,
                count: 2,
                terminating: false
            })
        );
        assert_eq!(
            eligible(&master(0, 0, 3)),
            Some(Eligible {
                first_slot: 1,
                count: 3,
                terminating: true
            })
        );
        assert_eq!(eligible(&master(0, 0, 0)), None);
        assert_eq!(
            no_endpoints(&master(SERVICE_FLAG_LOCAL_ONLY, 0, 0)),
            (Verdict::Drop, Reason::NoLocalEndpoints)
        );
        assert_eq!(
            no_endpoints(&master(SERVICE_FLAG_EXTERNAL, 0, 0)),
            (Verdict::Reject, Reason::NoEndpoints)
        );
    }

    #[test]
    fn affinity_records() {
        let s = NS_PER_SEC;
        let m = ServiceValue {
            affinity_timeout_s: 10,
            ..master(SERVICE_FLAG_AFFINITY, 1, 0)
        };
        let record = AffinityValue {
            backend_id: 7,
            _pad: 0,
            last_used_ns: 100 * s,
        };
        use crate::lb::{MEMBER_READY, MEMBER_TERMINATING};
        let b = Backend::default();
        let backend = |id: u32| (id == 7).then_some(b);
        let member = |how: u8| move |id: u32| (id == 7).then_some(how);
        assert_eq!(
            affinity_backend(&m, &record, 110 * s, false, member(MEMBER_READY), backend),
            Some(b)
        );
        assert_eq!(
            affinity_backend(
                &m,
                &record,
                110 * s + 1,
                false,
                member(MEMBER_READY),
                backend
            ),
            None,
            "expired"
        );
        assert_eq!(
            affinity_backend(&m, &record, 105 * s, false, member(MEMBER_READY), |_| None),
            None,
            "gone"
        );
        assert_eq!(
            affinity_backend(&m, &record, 105 * s, false, |_| None, backend),
            None,
            "no longer the service's (its id may be another's)"
        );
        assert_eq!(
            affinity_backend(
                &m,
                &record,
                105 * s,
                false,
                member(MEMBER_TERMINATING),
                backend
            ),
            None,
            "terminating in this service while a ready backend exists"
        );
        let only_terminating = ServiceValue { count: 0, ..m };
        assert_eq!(
            affinity_backend(
                &only_terminating,
                &record,
                105 * s,
                false,
                member(MEMBER_TERMINATING),
                backend
            ),
            Some(b)
        );
        // The cluster-wide slots of an eTP=Local frontend are another
        // scope: a member there is none for its external clients.
        use crate::lb::MEMBER_INTERNAL_READY;
        assert_eq!(
            affinity_backend(
                &m,
                &record,
                105 * s,
                false,
                member(MEMBER_INTERNAL_READY),
                backend
            ),
            None
        );
        assert_eq!(
            affinity_backend(
                &m,
                &record,
                105 * s,
                true,
                member(MEMBER_INTERNAL_READY),
                backend
            ),
            Some(b)
        );
        // An expired record looks nothing up.
        let mut looked = false;
        let _ = affinity_backend(
            &m,
            &record,
            200 * s,
            false,
            |_| {
                looked = true;
                None
            },
            |_| None,
        );
        assert!(!looked);
    }

    #[test]
    fn masquerade_rules() {
        let c = cfg();
        let all = DatapathConfig {
            flags: CONFIG_MASQUERADE_ALL,
            ..c
        };
        let pod = Origin::of(&c, &v4_mapped([10, 244, 1, 5]), false);
        let host = Origin::of(&c, &v4_mapped(NODE), false);
        let local = Origin::of(&c, &v4_mapped(NODE), true);
        let outside = Origin::of(&c, &v4_mapped([192, 168, 7, 50]), false);
        let cluster_ip = 0;
        let etp_cluster = SERVICE_FLAG_EXTERNAL;
        let etp_local = SERVICE_FLAG_EXTERNAL | SERVICE_FLAG_INTERNAL_SCOPE;
        // ClusterIP: from outside the cluster CIDR, or everything with
        // --masquerade-all.
        assert!(!masquerade(&c, cluster_ip, pod, false, false));
        assert!(masquerade(&c, cluster_ip, outside, false, false));
        assert!(masquerade(&c, cluster_ip, host, false, false));
        assert!(masquerade(&all, cluster_ip, pod, false, false));
        // eTP=Cluster: everything; eTP=Local: only the host's own.
        assert!(masquerade(&c, etp_cluster, pod, false, false));
        assert!(masquerade(&c, etp_cluster, outside, false, false));
        assert!(!masquerade(&c, etp_local, outside, false, false));
        assert!(!masquerade(&c, etp_local, pod, false, false));
        assert!(masquerade(&c, etp_local, host, false, false));
        // Hairpin always; a flow to this node itself never.
        assert!(masquerade(&c, cluster_ip, pod, true, false));
        assert!(!masquerade(&c, etp_cluster, outside, true, true));
        // This node itself, unless the sender is a local process.
        let node = v4_mapped(NODE);
        assert!(reaches_this_node(&c, &node, outside));
        assert!(reaches_this_node(&c, &node, host));
        assert!(!reaches_this_node(&c, &node, local));
        assert!(!reaches_this_node(&c, &v4_mapped([10, 244, 2, 7]), outside));
    }

    #[test]
    fn conntrack_liveness_and_gone_backends() {
        let e = CtEntry {
            expires_ns: 100,
            ..CtEntry::default()
        };
        assert!(ct_live(&e, 99));
        assert!(!ct_live(&e, 100));
        assert!(resets_when_backend_gone(IPPROTO_TCP));
        assert!(!resets_when_backend_gone(IPPROTO_UDP));
    }

    #[test]
    fn a_reset_flow_frees_its_masquerade_port_once_quiet() {
        const S: u64 = NS_PER_SEC;
        // Reset at 100 s, tcp_closing 10 s: expires at 110 s.
        let reset = CtEntry {
            expires_ns: 110 * S,
            state: CT_STATE_CLOSED,
            ..CtEntry::default()
        };
        assert!(!frees_nat_port(&reset, 100 * S + S / 2, 10), "just reset");
        assert!(frees_nat_port(&reset, 101 * S, 10), "quiet for 1 s");
        let fin = CtEntry {
            state: CT_STATE_CLOSING,
            ..reset
        };
        assert!(!frees_nat_port(&fin, 105 * S, 10), "a half-close may go on");
        assert!(frees_nat_port(&fin, 110 * S, 10), "expired");
        assert!(ct_closing(CT_STATE_CLOSING) && ct_closing(CT_STATE_CLOSED));
        assert!(!ct_closing(crate::ct::CT_STATE_ESTABLISHED));
    }
}
